#!/usr/bin/env python3
"""Convert MONAI Label's released deepgrow 2D weights (its radiology app) into a model folder the server serves.

MONAI Label publishes them as a release asset, tag `pretrained`:

    curl -L -o radiology_deepgrow_2d_bunet.pt \\
        https://github.com/Project-MONAI/MONAILabel/releases/download/pretrained/radiology_deepgrow_2d_bunet.pt
    tools/.venv/bin/python tools/convert_monailabel.py --weights radiology_deepgrow_2d_bunet.pt \\
        --out-dir models/monailabel_deepgrow_2d

then `cargo run --release` serves it beside the bundled model (`?model=monailabel_deepgrow_2d`).

What MONAI Label does with them, read from its source (commit 058ddfc):
- `sample-apps/radiology/lib/configs/deepgrow_2d.py`: `BasicUNet(spatial_dims=2, in_channels=3,
  out_channels=1, features=(32, 64, 128, 256, 512, 32))` with MONAI's defaults (instance norm with affine,
  LeakyReLU 0.1, deconv upsampling), the file `radiology_deepgrow_2d_bunet.pt` from
  `{PRE_TRAINED_PATH}` = `https://github.com/Project-MONAI/MONAILabel/releases/download/pretrained`
  (`monailabel/interfaces/config.py`).
- `monailabel/tasks/infer/basic_infer.py`: `torch.load`, then `checkpoint.get("model", checkpoint)`: a bare
  state dict or `{"model": state_dict}` (what its trainer saves). MONAI Label loads it with `strict=False`; this
  converter loads strictly, so that a file of another network is refused instead of served with random layers.
- `sample-apps/radiology/lib/infers/deepgrow.py` (`Deepgrow`, `spatial_size` = `model_size` = (256, 256)):
  `Spacingd(pixdim=[1.0, 1.0])`, `SpatialCropGuidanced(spatial_size=(256, 256))` (MONAI's default margin 20),
  `Resized((256, 256), mode="area")`, `NormalizeIntensityd(subtrahend=208, divisor=388)`,
  `AddGuidanceSignald` (sigma 2), then sigmoid and threshold 0.5. These are the server's pipeline fields
  (shared/specs/DEEPGROW_2D.md), written into config.json below.

Output: OUT_DIR/model.onnx (input `image` [1, 3, 256, 256], output `pred`), OUT_DIR/config.json, OUT_DIR/README.md.
The weights are a release asset of MONAI Label's repository (Apache-2.0); the README says where they came from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_clara_mmar as clara  # noqa: E402  (the weight reader and the model-folder writer)

RELEASE_URL = "https://github.com/Project-MONAI/MONAILabel/releases/download/pretrained/radiology_deepgrow_2d_bunet.pt"

# sample-apps/radiology/lib/infers/deepgrow.py and lib/configs/deepgrow_2d.py, MONAI Label 058ddfc
PIPELINE = {
    "model_size": [256, 256],
    "crop_size": [256, 256],
    "margin": 20,
    "subtrahend": 208.0,
    "divisor": 388.0,
    "sigma": 2.0,
    "target_spacing": [1.0, 1.0],
}
LABELS = ["spleen", "right kidney", "left kidney", "liver", "stomach", "aorta", "inferior vena cava"]


def convert(weights: Path, out_dir: Path, name: str = "monailabel_deepgrow_2d", check: bool = True) -> dict:
    net, how = clara.load_weights(Path(weights), tuple(PIPELINE["model_size"]))
    return clara.write_model_dir(
        net, PIPELINE, out_dir, name=name,
        description="Deepgrow 2D of MONAI Label's radiology app (BasicUNet, abdominal CT), converted",
        version="1", labels=LABELS,
        source=f"`tools/convert_monailabel.py` from `{Path(weights).name}` ({how}), MONAI Label's radiology "
               f"app weights ({RELEASE_URL})",
        licence="MONAI Label's weights, a release asset of its repository (Apache-2.0); check its release notes "
                "before redistributing them.",
        weights_read_as=how, check=check)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, required=True, help="radiology_deepgrow_2d_bunet.pt (or deepgrow_2d.pt)")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--name", default="monailabel_deepgrow_2d", help="model name in config.json")
    ap.add_argument("--no-check", action="store_true", help="skip the ONNX checker and torch-vs-onnxruntime check")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    res = convert(args.weights, args.out_dir, name=args.name, check=not args.no_check)
    clara.report(args.weights, args.out_dir, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
