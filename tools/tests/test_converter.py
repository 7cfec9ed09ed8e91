"""tools/convert_clara_mmar.py on self-made checkpoints in the Clara key layout (no NVIDIA weights)."""

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import convert_clara_mmar as conv
import deepgrow_model as dm

# The same reconstructed Clara config the Rust registry is tested on.
AIAA = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "clara" / "config_aiaa.json"


@pytest.fixture(scope="module")
def net():
    return dm.build_net(seed=123).eval()


@pytest.fixture(scope="module")
def checkpoints(net, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    sd = net.state_dict()
    assert len(sd) == 82
    assert tuple(sd["upcat_4.upsample.deconv.weight"].shape) == (512, 256, 2, 2)
    assert tuple(sd["final_conv.weight"].shape) == (1, 32, 1, 1)
    assert "conv_0.conv_0.adn.N.weight" in sd
    torch.save(sd, d / "plain.pt")
    torch.save({"model": sd, "epoch": 3}, d / "wrapped.pt")
    torch.jit.trace(copy.deepcopy(net), torch.zeros(1, 3, 64, 64)).save(str(d / "model.ts"))
    return d


def test_pipeline_from_aiaa():
    p = conv.pipeline_from_aiaa(json.loads(AIAA.read_text()))
    assert p == {
        "model_size": [256, 256], "crop_size": [256, 256], "margin": 20, "subtrahend": 208.0,
        "divisor": 388.0, "sigma": 2.0, "target_spacing": [1.0, 1.0],
    }


def test_pipeline_unprefixed_names_and_explicit_args():
    cfg = json.loads(AIAA.read_text())
    for t in cfg["pre_transforms"]:
        t["name"] = t["name"].split(".")[-1]
        if t["name"] == "SpatialCropGuidanced":
            t["args"]["margin"] = 10
        if t["name"] == "AddGuidanceSignald":
            t["args"]["sigma"] = 3
    p = conv.pipeline_from_aiaa(cfg)
    assert (p["margin"], p["sigma"], p["model_size"]) == (10, 3.0, [256, 256])


def test_size_mismatch_is_an_error():
    cfg = json.loads(AIAA.read_text())
    cfg["inference"]["trtis"]["input"][0]["dims"] = [3, 128, 128]
    with pytest.raises(ValueError, match="disagree"):
        conv.pipeline_from_aiaa(cfg)


@pytest.mark.parametrize("fname", ["plain.pt", "wrapped.pt", "model.ts"])
def test_convert(net, checkpoints, fname, tmp_path):
    out = tmp_path / "out"
    res = conv.convert(checkpoints / fname, AIAA, out, name="clara_deepgrow_2d")
    assert res["params"] == 7_783_425
    assert conv.is_torchscript(checkpoints / fname) == fname.endswith(".ts")

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["name"] == "clara_deepgrow_2d" and cfg["type"] == "deepgrow" and cfg["deepgrow"] == "2D"
    pl = cfg["pipeline"]
    assert pl["model_size"] == [256, 256] and pl["crop_size"] == [256, 256]
    assert (pl["subtrahend"], pl["divisor"], pl["margin"], pl["sigma"]) == (208.0, 388.0, 20, 2.0)
    assert pl["target_spacing"] == [1.0, 1.0]

    m = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 256, 256]
    x = np.random.default_rng(7).standard_normal((1, 3, 256, 256)).astype(np.float32)
    y_onnx = dm.run_ort(out / "model.onnx", x)
    assert y_onnx.shape == (1, 1, 256, 256)
    assert np.abs(dm.run_torch(net, x) - y_onnx).max() < 1e-4


def test_mmar_folder_layout(checkpoints, tmp_path):
    mmar = tmp_path / "mmar"
    (mmar / "models").mkdir(parents=True)
    (mmar / "config").mkdir()
    (mmar / "models" / "model.pt").write_bytes((checkpoints / "wrapped.pt").read_bytes())
    (mmar / "config" / "config_aiaa.json").write_text(AIAA.read_text())
    w, c = conv.resolve_inputs(mmar, None, None)
    assert w.name == "model.pt" and c.name == "config_aiaa.json"
    assert conv.main(["--mmar", str(mmar), "--out-dir", str(tmp_path / "o"), "--no-check"]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["name"] == "deepgrow_2d_clara"


def test_wrong_architecture_is_rejected(tmp_path):
    from monai.networks.nets import BasicUNet

    other = BasicUNet(spatial_dims=2, in_channels=3, out_channels=1)  # default features: 1.98M params
    torch.save(other.state_dict(), tmp_path / "bad.pt")
    with pytest.raises(RuntimeError):
        conv.convert(tmp_path / "bad.pt", AIAA, tmp_path / "out")
