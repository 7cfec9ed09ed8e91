#!/usr/bin/env python3
"""Export the Deepgrow 2D BasicUNet to ONNX plus config.json, in the layout the server serves.

Without --checkpoint it writes seeded random (untrained) weights, for tests and timing; with --checkpoint it exports
trained weights (a state dict, {"model": state_dict}, or a train.py checkpoint). --out-dir is required, so that the
bundled trained model is never overwritten by accident.

    tools/.venv/bin/python tools/export_onnx.py --out-dir /tmp/random                # seed 0 random weights
    tools/.venv/bin/python tools/export_onnx.py --checkpoint runs/x/best.pt --out-dir OUT --description "..."
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepgrow_model as dm  # noqa: E402

PLACEHOLDER_DESCRIPTION = (
    "PLACEHOLDER: Deepgrow 2D BasicUNet with seeded random (untrained) weights; "
    "it exercises the serving path but its masks are meaningless."
)


def export_model_dir(
    net: torch.nn.Module,
    out_dir: Path,
    size=(512, 512),
    name: str = "deepgrow_2d",
    description: str = PLACEHOLDER_DESCRIPTION,
    version: str = "1",
    write_config: bool = True,
    **pipeline,
) -> str:
    """Write out_dir/model.onnx (and config.json). Returns the model's sha256."""
    n = dm.count_params(net)
    if n != dm.EXPECTED_PARAMS:
        raise SystemExit(f"parameter count {n} != {dm.EXPECTED_PARAMS}")
    out_dir = Path(out_dir)
    sha = dm.export_onnx(net, out_dir / "model.onnx", size)
    if write_config:
        pipeline.setdefault("model_size", list(size))
        pipeline.setdefault("crop_size", list(size))
        cfg = dm.make_config(name=name, description=description, version=version, **pipeline)
        dm.write_config(out_dir / "config.json", cfg)
    return sha


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="trained weights; default: seeded random weights")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random init (default 0)")
    ap.add_argument("--out-dir", type=Path, required=True, help="model folder to write (e.g. models/NAME)")
    ap.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    ap.add_argument("--name", default="deepgrow_2d")
    ap.add_argument("--version", default="1")
    ap.add_argument("--description", default=None)
    ap.add_argument("--no-config", action="store_true", help="write model.onnx only")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=".*instance_norm.*")
    torch.set_num_threads(1)

    if args.checkpoint:
        sd = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        net = dm.load_state_dict_into_net(sd)
        desc = args.description or "Deepgrow 2D BasicUNet (trained weights)."
    else:
        net = dm.build_net(seed=args.seed).eval()
        desc = args.description or PLACEHOLDER_DESCRIPTION
    sha = export_model_dir(
        net, args.out_dir, tuple(args.size), name=args.name, description=desc,
        version=args.version, write_config=not args.no_config,
    )
    print(f"params {dm.count_params(net):,}")
    print(f"wrote {args.out_dir / 'model.onnx'} sha256 {sha}")
    if not args.no_config:
        print(f"wrote {args.out_dir / 'config.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
