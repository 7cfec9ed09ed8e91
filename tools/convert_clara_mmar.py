#!/usr/bin/env python3
"""Convert NVIDIA's Clara deepgrow 2D MMAR (clara_pt_deepgrow_2d_annotation) into a model folder the server serves.

Input:  the MMAR's weights, either `models/model.pt` (a BasicUNet state dict, possibly wrapped as {"model": ...})
        or `models/model.ts` (TorchScript), plus `config/config_aiaa.json`. Pass the files, or the MMAR folder.
Output: OUT_DIR/model.onnx (input `image` [1,3,H,W], output `pred` [1,1,H,W], H x W from the config: 256 x 256
        for NVIDIA's), OUT_DIR/config.json (the server's schema), OUT_DIR/README.md (provenance).

    tools/.venv/bin/python tools/convert_clara_mmar.py --mmar ~/clara_pt_deepgrow_2d_annotation --out-dir models/clara_deepgrow_2d
    tools/.venv/bin/python tools/convert_clara_mmar.py --weights model.ts --config config_aiaa.json --out-dir OUT --name clara_2d

NVIDIA's weights are under the NGC terms of use, not Apache-2.0: check them before redistributing a converted model.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepgrow_model as dm  # noqa: E402


# ---------------------------------------------------------------- config_aiaa.json

def _tname(t: dict) -> str:
    """Transform name without its module prefix ("monai.transforms.Resized" -> "Resized")."""
    return str(t.get("name") or t.get("path") or "").split(".")[-1]


def find_transform(cfg: dict, name: str) -> dict | None:
    for t in cfg.get("pre_transforms", []):
        if _tname(t) == name:
            return t.get("args", {}) or {}
    return None


def _pair(v, what: str) -> list[int]:
    if isinstance(v, (int, float)):
        v = [v, v]
    v = list(v)
    if len(v) < 2:
        raise ValueError(f"{what}: expected 2 values, got {v}")
    return [int(x) for x in v[:2]]


def triton_input_hw(cfg: dict) -> list[int] | None:
    """H, W from the Triton/TRTIS model config in `inference` (dims [3, H, W])."""
    inf = cfg.get("inference", {}) or {}
    for key in ("trtis", "triton", "tritonserver"):
        spec = inf.get(key)
        if isinstance(spec, dict):
            for inp in spec.get("input", []) or []:
                dims = list(inp.get("dims", []))
                if len(dims) >= 3 and int(dims[-3]) == 3:
                    return [int(dims[-2]), int(dims[-1])]
    return None


def pipeline_from_aiaa(cfg: dict) -> dict:
    """The server's `pipeline` block from a Clara config_aiaa.json."""
    crop = find_transform(cfg, "SpatialCropGuidanced")
    resized = find_transform(cfg, "Resized")
    norm = find_transform(cfg, "NormalizeIntensityd")
    signal = find_transform(cfg, "AddGuidanceSignald")
    spacing = find_transform(cfg, "Spacingd")

    trt = triton_input_hw(cfg)
    if resized and "spatial_size" in resized:
        model_size = _pair(resized["spatial_size"], "Resized.spatial_size")
    elif trt:
        model_size = trt
    elif crop and "spatial_size" in crop:
        model_size = _pair(crop["spatial_size"], "SpatialCropGuidanced.spatial_size")
    else:
        raise ValueError("cannot find the network input size (Resized / inference.trtis.input dims)")
    if trt and trt != model_size:
        raise ValueError(f"Triton input dims {trt} disagree with Resized spatial_size {model_size}")
    crop_size = _pair(crop["spatial_size"], "SpatialCropGuidanced.spatial_size") if crop and "spatial_size" in crop else model_size

    if norm is None or "subtrahend" not in norm or "divisor" not in norm:
        raise ValueError("NormalizeIntensityd with fixed subtrahend and divisor is required (per-image z-scoring is not supported)")
    if spacing is None or "pixdim" not in spacing:
        raise ValueError("Spacingd with pixdim is required")
    pixdim = spacing["pixdim"]
    pixdim = [pixdim, pixdim] if isinstance(pixdim, (int, float)) else list(pixdim)[:2]
    return {
        "model_size": model_size,
        "crop_size": crop_size,
        "margin": int((crop or {}).get("margin", 20)),
        "subtrahend": float(norm["subtrahend"]),
        "divisor": float(norm["divisor"]),
        "sigma": float((signal or {}).get("sigma", 2.0)),
        "target_spacing": [float(v) for v in pixdim],
    }


# ---------------------------------------------------------------- weights

def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with a code/ folder and constants.pkl; torch.save state dicts are not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names)


def load_weights(path: Path, size=(256, 256)) -> tuple[torch.nn.Module, str]:
    """A BasicUNet (eval) holding the weights in `path`, and a word on how they were read."""
    path = Path(path)
    if is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            ts = torch.jit.load(str(path), map_location="cpu")
        sd = {k: v.detach().clone() for k, v in ts.state_dict().items()}
        net = dm.load_state_dict_into_net(sd)
        # The copy must behave like the TorchScript module itself (checked at the network input size).
        x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, *size)).astype(np.float32))
        with torch.no_grad():
            ref = ts.eval()(x)
            ref = ref[0] if isinstance(ref, (tuple, list)) else ref
            diff = float((net(x) - ref).abs().max())
        if diff > 1e-4:
            raise ValueError(f"BasicUNet with the TorchScript weights differs from the TorchScript module by {diff}")
        return net, f"TorchScript (state dict copied into BasicUNet; max abs diff vs the TorchScript module {diff:.2e})"
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # older MMAR checkpoints may pickle extra objects
        warnings.warn(f"{path}: not loadable with weights_only=True; loading with full unpickling (trusted file only)")
        sd = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(sd, torch.nn.Module):
        sd = sd.state_dict()
    wrapped = isinstance(sd, dict) and any(k in sd for k in ("model", "state_dict"))
    return dm.load_state_dict_into_net(sd), "state dict" + (" (wrapped)" if wrapped else "")


# ---------------------------------------------------------------- conversion

def resolve_inputs(mmar: Path | None, weights: Path | None, config: Path | None) -> tuple[Path, Path]:
    if mmar is not None:
        mmar = Path(mmar)
        if weights is None:
            for cand in ("models/model.pt", "models/model.ts", "model.pt", "model.ts"):
                if (mmar / cand).is_file():
                    weights = mmar / cand
                    break
        if config is None:
            for cand in ("config/config_aiaa.json", "config_aiaa.json"):
                if (mmar / cand).is_file():
                    config = mmar / cand
                    break
    if weights is None or config is None:
        raise SystemExit("need the weights (model.pt or model.ts) and config_aiaa.json (or --mmar DIR)")
    return Path(weights), Path(config)


def convert(weights: Path, config: Path, out_dir: Path, name: str | None = None, check: bool = True) -> dict:
    cfg = json.loads(Path(config).read_text())
    if str(cfg.get("type", "deepgrow")).lower() != "deepgrow":
        raise ValueError(f"config type is {cfg.get('type')!r}, not deepgrow")
    dims = str((cfg.get("inference", {}).get("meta_data", {}) or {}).get("deepgrow", "2D")).upper()
    if dims != "2D":
        raise ValueError(f"this converter handles deepgrow 2D only (config says {dims})")
    pipeline = pipeline_from_aiaa(cfg)
    net, how = load_weights(weights, tuple(pipeline["model_size"]))
    name = name or cfg.get("name") or "deepgrow_2d_clara"
    return write_model_dir(
        net, pipeline, out_dir, name=name,
        description=cfg.get("description") or "Deepgrow 2D (converted from a Clara MMAR)",
        version=str(cfg.get("version", "1")), labels=cfg.get("labels", []),
        source=f"`tools/convert_clara_mmar.py` from `{Path(weights).name}` ({how}) and `{Path(config).name}`",
        licence="the weights come from NVIDIA's MMAR and stay under its terms (NGC terms of use), not this "
                "repository's Apache-2.0. Check them before redistributing.",
        weights_read_as=how, check=check)


def write_model_dir(net: torch.nn.Module, pipeline: dict, out_dir: Path, *, name: str, description: str,
                    version: str, labels: list, source: str, licence: str, weights_read_as: str,
                    check: bool = True) -> dict:
    """A model folder the server serves: model.onnx at the pipeline's model size, config.json, README.md (the
    provenance). With `check`, the ONNX checker and torch against onnxruntime (max abs diff <= 1e-4)."""
    n_params = dm.count_params(net)
    if n_params != dm.EXPECTED_PARAMS:
        raise ValueError(f"parameter count {n_params} != {dm.EXPECTED_PARAMS}")
    out_dir = Path(out_dir)
    size = tuple(pipeline["model_size"])
    sha = dm.export_onnx(net, out_dir / "model.onnx", size)
    out_cfg = dm.make_config(name=name, description=description, version=version, labels=labels, **pipeline)
    dm.write_config(out_dir / "config.json", out_cfg)

    result = {"model_sha256": sha, "params": n_params, "weights_read_as": weights_read_as, "config": out_cfg}
    if check:
        import onnx

        onnx.checker.check_model(onnx.load(str(out_dir / "model.onnx")), full_check=True)
        x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
        diff = float(np.abs(dm.run_torch(net, x) - dm.run_ort(out_dir / "model.onnx", x)).max())
        result["torch_vs_ort_max_abs_diff"] = diff
        if diff > 1e-4:
            raise ValueError(f"torch vs onnxruntime max abs diff {diff} > 1e-4")

    (out_dir / "README.md").write_text(
        f"# {name}\n\nConverted by {source}.\n\n* BasicUNet 2D, features {list(dm.FEATURES)}, {n_params:,} parameters\n"
        f"* model.onnx: input `image` [1, 3, {size[0]}, {size[1]}], output `pred` [1, 1, {size[0]}, {size[1]}], "
        f"opset {dm.OPSET}, sha256 `{sha}`\n"
        + (f"* torch vs onnxruntime max abs diff: {result['torch_vs_ort_max_abs_diff']:.2e}\n" if check else "")
        + f"\nLicence: {licence}\n"
    )
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mmar", type=Path, help="MMAR folder (finds models/model.pt|ts and config/config_aiaa.json)")
    ap.add_argument("--weights", type=Path, help="model.pt (state dict) or model.ts (TorchScript)")
    ap.add_argument("--config", type=Path, help="config_aiaa.json")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--name", help="model name in config.json (default: config's name or deepgrow_2d_clara)")
    ap.add_argument("--no-check", action="store_true", help="skip the ONNX checker and torch-vs-onnxruntime check")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    weights, config = resolve_inputs(args.mmar, args.weights, args.config)
    res = convert(weights, config, args.out_dir, name=args.name, check=not args.no_check)
    report(weights, args.out_dir, res)
    return 0


def report(weights: Path, out_dir: Path, res: dict) -> None:
    """What a conversion wrote, as both converters print it."""
    print(f"weights: {weights} ({res['weights_read_as']}), params {res['params']:,}")
    print(f"wrote {out_dir}/model.onnx sha256 {res['model_sha256']}")
    if "torch_vs_ort_max_abs_diff" in res:
        print(f"torch vs onnxruntime max abs diff {res['torch_vs_ort_max_abs_diff']:.3e}")
    print(f"wrote {out_dir}/config.json: {json.dumps(res['config']['pipeline'])}")


if __name__ == "__main__":
    raise SystemExit(main())
