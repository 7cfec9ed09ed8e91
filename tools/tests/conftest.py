import sys
import warnings
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOOLS))
torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=DeprecationWarning)
