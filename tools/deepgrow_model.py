"""Shared code for the Python tools: the Deepgrow 2D network, ONNX export, config.json and the parity input.

The network is MONAI ``BasicUNet(spatial_dims=2, in_channels=3, out_channels=1,
features=(32, 64, 128, 256, 512, 32))`` with every other argument at its default
(see /work/shared/specs/DEEPGROW_2D.md section 8). It has 7,783,425 trainable parameters.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

FEATURES = (32, 64, 128, 256, 512, 32)
EXPECTED_PARAMS = 7_783_425
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "pred"

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "models" / "deepgrow_2d"
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "model_reference"

# Pipeline defaults of the model we bundle (issue 4). Note: NVIDIA's Clara model uses 256 x 256 and divisor 388;
# the converter reads those from its config_aiaa.json instead.
DEFAULT_PIPELINE = {
    "model_size": [512, 512],
    "crop_size": [512, 512],
    "margin": 20,
    "subtrahend": 208.0,
    "divisor": 308.0,
    "sigma": 2.0,
    "target_spacing": [1.0, 1.0],
}

FIXTURE_FORMULA = "x[0,c,h,w] = ((h*7 + w*13 + c*101) % 256) as f32 / 128.0 - 1.0"


def build_net(seed: int | None = None) -> torch.nn.Module:
    """The Deepgrow 2D BasicUNet. With ``seed`` the initial weights are reproducible."""
    from monai.networks.nets import BasicUNet

    if seed is not None:
        torch.manual_seed(seed)
    return BasicUNet(spatial_dims=2, in_channels=3, out_channels=1, features=FEATURES)


def count_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def _disable_odd_size_padding(net: torch.nn.Module, size: Sequence[int]) -> None:
    """BasicUNet's UpCat replicate-pads the upsampled tensor only when a side is odd after pooling.

    When every side is divisible by 16 that pad is always empty, but the tracer still records a
    Pad plus the ops that build its pads vector. Switching ``is_pad`` off gives the same numbers with
    a cleaner graph (no Pad/ConstantOfShape/Slice/...)."""
    if all(int(s) % 16 == 0 for s in size):
        from monai.networks.nets.basic_unet import UpCat

        for m in net.modules():
            if isinstance(m, UpCat):
                m.is_pad = False


def export_onnx_bytes(
    net: torch.nn.Module,
    size: Sequence[int] = (512, 512),
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
) -> bytes:
    """Export with the TorchScript exporter (dynamo=False), opset 17, fixed input 1x3xHxW. Deterministic."""
    net = net.cpu().eval()
    _disable_odd_size_padding(net, size)
    dummy = torch.zeros(1, 3, int(size[0]), int(size[1]), dtype=torch.float32)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy-exporter deprecation notice, tracer notes, and "instance_norm is set to train=True" (MONAI's
        # InstanceNorm has no running stats, so per-image statistics are the intended eval behaviour).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (dummy,),
            buf,
            export_params=True,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=[input_name],
            output_names=[output_name],
            dynamo=False,
            training=torch.onnx.TrainingMode.EVAL,
        )
    return buf.getvalue()


def export_onnx(net: torch.nn.Module, path: os.PathLike, size: Sequence[int] = (512, 512), **kw) -> str:
    """Export to ``path`` and return its sha256."""
    data = export_onnx_bytes(net, size, **kw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_config(
    name: str = "deepgrow_2d",
    description: str = "",
    version: str = "1",
    labels: list | None = None,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
    **pipeline,
) -> dict:
    """config.json in the schema the Rust model registry parses."""
    p = dict(DEFAULT_PIPELINE)
    for k, v in pipeline.items():
        if k not in p:
            raise KeyError(f"unknown pipeline key {k!r}")
        p[k] = v
    p = {
        "model_size": [int(v) for v in p["model_size"]],
        "crop_size": [int(v) for v in p["crop_size"]],
        "margin": int(p["margin"]),
        "subtrahend": float(p["subtrahend"]),
        "divisor": float(p["divisor"]),
        "sigma": float(p["sigma"]),
        "target_spacing": [float(v) for v in p["target_spacing"]],
    }
    return {
        "name": name,
        "type": "deepgrow",
        "deepgrow": "2D",
        "description": description,
        "version": str(version),
        "labels": list(labels or []),
        "network": {"input_name": input_name, "output_name": output_name},
        "pipeline": p,
    }


def dumps_json(obj) -> str:
    """json.dumps(indent=2), with lists of numbers and empty lists kept on one line."""
    text = json.dumps(obj, indent=2)
    return re.sub(
        r"\[\s*([-0-9.eE+,\s]*?)\s*\]",
        lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",") if v.strip()) + "]",
        text,
    ) + "\n"


def write_config(path: os.PathLike, cfg: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(dumps_json(cfg))


def fixture_input(h: int = 512, w: int = 512) -> np.ndarray:
    """The parity input both Python and Rust compute: see FIXTURE_FORMULA. Exact in float32."""
    c = np.arange(3, dtype=np.int64)[:, None, None]
    hh = np.arange(h, dtype=np.int64)[None, :, None]
    ww = np.arange(w, dtype=np.int64)[None, None, :]
    x = ((hh * 7 + ww * 13 + c * 101) % 256).astype(np.float32) / np.float32(128.0) - np.float32(1.0)
    return x[None].astype(np.float32)


def ort_session(path: os.PathLike, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def run_ort(path: os.PathLike, x: np.ndarray, input_name: str = INPUT_NAME, threads: int = 1) -> np.ndarray:
    sess = ort_session(path, threads)
    return sess.run(None, {input_name: x})[0]


def run_torch(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    net = net.cpu().eval()
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def load_state_dict_into_net(sd: dict) -> torch.nn.Module:
    """A BasicUNet with ``sd`` loaded (strict). Accepts {"model": sd}, {"state_dict": sd} and 'module.' prefixes."""
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}
    net = build_net()
    net.load_state_dict(sd, strict=True)
    return net.eval()
