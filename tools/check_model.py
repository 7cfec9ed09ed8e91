#!/usr/bin/env python3
"""Check a Deepgrow 2D model.onnx three ways, and (re)write the Rust parity fixture.

1. onnx.checker.check_model(full_check=True)
2. parameter count: the ONNX weights are loaded back into MONAI BasicUNet (strict) and counted (7,783,425)
3. PyTorch (that BasicUNet) vs onnxruntime CPU: max abs diff on the fixture input and on a seeded N(0,1) input

    tools/.venv/bin/python tools/check_model.py                    # checks models/deepgrow_2d/model.onnx
    tools/.venv/bin/python tools/check_model.py --write-fixture    # also rewrites tests/fixtures/model_reference/
    tools/.venv/bin/python tools/check_model.py --model DIR/model.onnx --seed 0   # also: weights == seeded init?
    tools/.venv/bin/python tools/check_model.py --write-golden-references   # also rewrites .../model_reference/golden_f64/

`--write-golden-references` runs the model in PyTorch float64 on the network input of every golden case
(tests/fixtures/golden/*/network_input.f32.gz) and stores the exact mask (bit-packed) and every 4th logit.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepgrow_model as dm  # noqa: E402

STRIDE = 4


def onnx_state_dict(model_proto) -> dict:
    """Recover the BasicUNet state dict from the ONNX initializers.

    The TorchScript exporter stores each parameter under its state-dict name, except that identical tensors
    are deduplicated: the duplicate is then an Identity node whose output carries the state-dict name."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model_proto.graph.initializer}
    sd = dict(inits)
    for node in model_proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            sd[node.output[0]] = inits[node.input[0]]
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


def net_from_onnx(model_proto) -> torch.nn.Module:
    """MONAI's BasicUNet with the weights of an exported model.onnx (strict: every parameter must be there)."""
    sd = onnx_state_dict(model_proto)
    net = dm.build_net()
    net.load_state_dict({k: sd[k] for k in net.state_dict().keys()}, strict=True)
    return net.eval()


def io_info(model_proto):
    inp = model_proto.graph.input[0]
    out = model_proto.graph.output[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    oshape = [d.dim_value for d in out.type.tensor_type.shape.dim]
    return inp.name, shape, out.name, oshape


def check(model_path: Path, seed: int | None = None, threads: int = 1) -> dict:
    import onnx
    import onnxruntime

    model_path = Path(model_path)
    proto = onnx.load(str(model_path))
    onnx.checker.check_model(proto, full_check=True)
    in_name, in_shape, out_name, out_shape = io_info(proto)

    net = net_from_onnx(proto)
    n_params = dm.count_params(net)

    seeded_equal = None
    if seed is not None:
        ref = dm.build_net(seed=seed).state_dict()
        seeded_equal = all(torch.equal(ref[k], net.state_dict()[k]) for k in ref)

    h, w = in_shape[2], in_shape[3]
    sess = dm.ort_session(model_path, threads)
    x_fix = dm.fixture_input(h, w)
    rng = np.random.default_rng(0)
    x_rand = rng.standard_normal((1, 3, h, w)).astype(np.float32)

    y_ort_fix = sess.run([out_name], {in_name: x_fix})[0]
    y_ort_rand = sess.run([out_name], {in_name: x_rand})[0]
    y_pt_fix = dm.run_torch(net, x_fix)
    y_pt_rand = dm.run_torch(net, x_rand)
    with torch.no_grad():
        y_f64_fix = net.double()(torch.from_numpy(x_fix).double()).numpy()
    net.float()

    return {
        "model": str(model_path),
        "model_sha256": dm.sha256_file(model_path),
        "checker_full_check": "ok",
        "input": [in_name, in_shape],
        "output": [out_name, out_shape],
        "params": n_params,
        "params_ok": n_params == dm.EXPECTED_PARAMS,
        "weights_equal_seeded_init": seeded_equal,
        "torch_vs_ort_max_abs_diff_fixture": float(np.abs(y_pt_fix - y_ort_fix).max()),
        "torch_vs_ort_max_abs_diff_randn": float(np.abs(y_pt_rand - y_ort_rand).max()),
        "torch_f64_vs_ort_max_abs_diff_fixture": float(np.abs(y_f64_fix - y_ort_fix).max()),
        "torch_f64_vs_torch_f32_max_abs_diff_fixture": float(np.abs(y_f64_fix - y_pt_fix).max()),
        "ort_output_range_fixture": [float(y_ort_fix.min()), float(y_ort_fix.max())],
        "onnxruntime_version": onnxruntime.__version__,
        "torch_version": torch.__version__,
        "_y_ort_fix": y_ort_fix,
        "_y_f64_fix": y_f64_fix,
        "_net": net,
    }


REAL_CT_INPUT = dm.REPO_ROOT / "tests" / "fixtures" / "golden" / "uint8_scl_slope_avm" / "network_input.f32.gz"


def real_ct_logits_f64(net: torch.nn.Module) -> np.ndarray:
    """PyTorch float64 logits (H, W) of `net` on MONAI's network input for the golden case REAL_CT_INPUT."""
    import gzip

    x = np.frombuffer(gzip.open(REAL_CT_INPUT).read(), dtype="<f4").reshape(1, 3, 256, 256).copy()
    with torch.no_grad():
        y = net.double().eval()(torch.from_numpy(x).double())[0, 0].numpy()
    net.float()
    return y


def write_fixture(report: dict, out_dir: Path) -> None:
    import onnxruntime

    y = report["_y_ort_fix"]
    if list(y.shape) != [1, 1, 512, 512]:
        raise SystemExit(f"the fixture is defined for a 1x1x512x512 output, got {list(y.shape)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    sub = np.ascontiguousarray(y[0, 0, ::STRIDE, ::STRIDE]).astype("<f4")
    (out_dir / "logits_stride4.f32").write_bytes(sub.tobytes())
    # the exact model's answer (PyTorch in float64), rounded to float32: what engines are measured against
    exact = np.ascontiguousarray(report["_y_f64_fix"][0, 0, ::STRIDE, ::STRIDE]).astype("<f4")
    (out_dir / "logits_f64_stride4.f32").write_bytes(exact.tobytes())
    # and on real CT: MONAI's 256 x 256 network input of a golden case (head CT angiography), the same way
    exact_ct = real_ct_logits_f64(report["_net"])
    (out_dir / "ct_logits_f64_stride4.f32").write_bytes(
        np.ascontiguousarray(exact_ct[::STRIDE, ::STRIDE]).astype("<f4").tobytes())
    y64 = y.astype(np.float64)
    summary = {
        "formula": dm.FIXTURE_FORMULA,
        "shape": list(y.shape),
        "stride": STRIDE,
        "mean": float(y64.mean()),
        "std": float(y64.std()),
        "min": float(y64.min()),
        "max": float(y64.max()),
        "onnxruntime_version": onnxruntime.__version__,
        "model_sha256": report["model_sha256"],
        "stats_of": "all 1x1x512x512 logits (float64 accumulation, population std)",
        "values_file": "logits_stride4.f32: little-endian float32 pred[0,0,::4,::4], 128x128, row-major (h, then w)",
        "exact_values_file": "logits_f64_stride4.f32: the same positions from PyTorch in float64, rounded to float32",
        "ct_exact_values_file": "ct_logits_f64_stride4.f32: PyTorch float64 logits[::4, ::4] (64x64, rounded to float32) "
                                "for tests/fixtures/golden/uint8_scl_slope_avm/network_input.f32.gz (1x3x256x256)",
        "torch_vs_onnxruntime_max_abs_diff": report["torch_vs_ort_max_abs_diff_fixture"],
        "torch_float64_vs_onnxruntime_max_abs_diff": report["torch_f64_vs_ort_max_abs_diff_fixture"],
        "torch_float64_vs_torch_float32_max_abs_diff": report["torch_f64_vs_torch_f32_max_abs_diff_fixture"],
    }
    (out_dir / "summary.json").write_text(dm.dumps_json(summary))


GOLDEN_DIR = dm.REPO_ROOT / "tests" / "fixtures" / "golden"
GOLDEN_F64_DIR = dm.FIXTURE_DIR / "golden_f64"
GOLDEN_COMMAND = "tools/.venv/bin/python tools/check_model.py --write-golden-references"
NEAR_THRESHOLDS = (0.05, 0.2)


def pack_mask_bits(mask: np.ndarray) -> bytes:
    """A boolean (H, W) mask, row-major, bit-packed LSB-first: bit n is (byte[n // 8] >> (n % 8)) & 1, pixel
    n = row * W + col; the last byte is zero-padded. ceil(H * W / 8) bytes."""
    flat = np.ascontiguousarray(mask, dtype=bool).ravel()
    return np.packbits(flat, bitorder="little").tobytes()


def unpack_mask_bits(data: bytes, h: int, w: int) -> np.ndarray:
    """Inverse of pack_mask_bits: the boolean (h, w) mask (fails unless the length is ceil(h * w / 8))."""
    if len(data) != (h * w + 7) // 8:
        raise ValueError(f"{len(data)} bytes for a {h} x {w} mask, expected {(h * w + 7) // 8}")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=h * w, bitorder="little").astype(bool).reshape(h, w)


def stride_f32(y: np.ndarray, stride: int = STRIDE) -> bytes:
    """y[::stride, ::stride] of a (H, W) array ((H+stride-1)//stride x (W+stride-1)//stride), rounded to float32,
    raw little-endian, row-major."""
    return np.ascontiguousarray(np.asarray(y)[::stride, ::stride]).astype("<f4").tobytes()


def golden_cases(golden_dir: Path = GOLDEN_DIR) -> list:
    """(name, network input (1, 3, h, w) float32) for every golden case folder, sorted by name."""
    out = []
    for case_json in sorted(Path(golden_dir).glob("*/case.json")):
        shape = json.loads(case_json.read_text())["files"]["network_input.f32.gz"]
        raw = gzip.decompress((case_json.parent / "network_input.f32.gz").read_bytes())
        x = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
        out.append((case_json.parent.name, x))
    return out


def golden_reference(net64: torch.nn.Module, net32: torch.nn.Module, x: np.ndarray) -> tuple:
    """(float64 logits (H, W), summary row) of one network input: net64 in float64, net32 for the f32 diff."""
    with torch.no_grad():
        y64 = net64(torch.from_numpy(x).double())[0, 0].numpy()
        y32 = net32(torch.from_numpy(x))[0, 0].numpy()
    a = np.abs(y64)
    mask = y64 >= 0
    row = {
        "shape": list(y64.shape),
        "mask_px": int(mask.sum()),
        "max_abs_logit": float(a.max()),
        "min_abs_logit": float(a.min()),
        **{f"px_abs_logit_lt_{t}": int((a < t).sum()) for t in NEAR_THRESHOLDS},
        "torch_f32_vs_f64_max_abs_diff": float(np.abs(y32.astype(np.float64) - y64).max()),
        "torch_f32_mask_px_differing": int(((y32 >= 0) != mask).sum()),
    }
    return y64, row


def write_golden_references(net: torch.nn.Module, model_sha256: str, out_dir: Path = GOLDEN_F64_DIR,
                            golden_dir: Path = GOLDEN_DIR, command: str = GOLDEN_COMMAND) -> dict:
    """For every golden case: <case>.mask.bits.gz and <case>.logits_stride4.f32 from PyTorch float64, and one
    summary.json. Returns the summary."""
    import monai

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net32 = net.float().eval()
    net64 = copy.deepcopy(net32).double().eval()
    cases = {}
    for name, x in golden_cases(golden_dir):
        y64, row = golden_reference(net64, net32, x)
        (out_dir / f"{name}.mask.bits.gz").write_bytes(gzip.compress(pack_mask_bits(y64 >= 0), mtime=0))
        (out_dir / f"{name}.logits_stride4.f32").write_bytes(stride_f32(y64))
        cases[name] = row
        print(f"  {name}: {row}", flush=True)
    summary = {
        "what": "PyTorch float64 (MONAI BasicUNet with the model.onnx weights, .double()) on each golden case's "
                "network_input.f32.gz (float32, promoted to float64)",
        "mask_file": "<case>.mask.bits.gz: gzip of the mask logits >= 0, H x W row-major, bit-packed LSB-first "
                     "(pixel n = row * W + col is (byte[n // 8] >> (n % 8)) & 1; the last byte zero-padded)",
        "logits_file": "<case>.logits_stride4.f32: float64 logits[::4, ::4] (ceil(H/4) x ceil(W/4)) rounded to "
                       "float32, raw little-endian, row-major",
        "near_threshold": "px_abs_logit_lt_T: pixels with |float64 logit| < T; min_abs_logit: the closest one",
        "f32_diff": "torch_f32_vs_f64_max_abs_diff: max |PyTorch float32 - float64| over all H x W logits; "
                    "torch_f32_mask_px_differing: pixels where the float32 mask (logit >= 0) differs",
        "model_sha256": model_sha256,
        "torch_version": torch.__version__,
        "monai_version": monai.__version__,
        "numpy_version": np.__version__,
        "command": command,
        "cases": cases,
    }
    (out_dir / "summary.json").write_text(dm.dumps_json(summary))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=dm.MODEL_DIR / "model.onnx")
    ap.add_argument("--seed", type=int, default=None, help="also check that the weights equal BasicUNet's init under this seed")
    # (the version 2 weights measured 8.2e-5 there, version 3 1.6e-4: onnxruntime's float32 is the looser one)
    ap.add_argument("--max-diff", type=float, default=2.5e-4,
                    help="fail if torch vs onnxruntime differs more on the N(0, 1) input (default 2.5e-4)")
    # The fixture's striped pattern drives the trained network's activations far beyond what CT does; there
    # float32 engines stray from float64 by up to a few 1e-3 (onnxruntime 2.4e-3, PyTorch 1e-4 on the shipped
    # weights), so it is checked against a looser bound.
    ap.add_argument("--max-diff-fixture", type=float, default=5e-3,
                    help="fail if torch vs onnxruntime differs more on the fixture input (default 5e-3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write-fixture", action="store_true", help="rewrite tests/fixtures/model_reference/")
    ap.add_argument("--fixture-dir", type=Path, default=dm.FIXTURE_DIR)
    ap.add_argument("--write-golden-references", action="store_true",
                    help="rewrite tests/fixtures/model_reference/golden_f64/ (float64 mask + stride-4 logits per golden case)")
    ap.add_argument("--golden-dir", type=Path, default=GOLDEN_DIR)
    ap.add_argument("--golden-out-dir", type=Path, default=GOLDEN_F64_DIR)
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(args.threads)
    rep = check(args.model, seed=args.seed, threads=args.threads)
    for k, v in rep.items():
        if not k.startswith("_"):
            print(f"{k}: {v}")
    ok = rep["params_ok"] and rep["torch_vs_ort_max_abs_diff_fixture"] <= args.max_diff_fixture \
        and rep["torch_vs_ort_max_abs_diff_randn"] <= args.max_diff and rep["weights_equal_seeded_init"] is not False
    if args.write_fixture:
        write_fixture(rep, args.fixture_dir)
        print(f"wrote {args.fixture_dir}/logits_stride4.f32, logits_f64_stride4.f32, ct_logits_f64_stride4.f32 "
              "and summary.json")
    if args.write_golden_references:
        cmd = "tools/.venv/bin/python tools/check_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_golden_references(rep["_net"], rep["model_sha256"], args.golden_out_dir, args.golden_dir, cmd)
        print(f"wrote {args.golden_out_dir}/*.mask.bits.gz, *.logits_stride4.f32 and summary.json")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
