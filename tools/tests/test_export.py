"""Export of the Deepgrow 2D BasicUNet: parameter count, ONNX checker, torch vs onnxruntime, bundled files."""

import json

import numpy as np
import onnx
import pytest
import torch

import check_model
import deepgrow_model as dm

CONFIG_KEYS = ["name", "type", "deepgrow", "description", "version", "labels", "network", "pipeline"]
PIPELINE_KEYS = ["model_size", "crop_size", "margin", "subtrahend", "divisor", "sigma", "target_spacing"]


@pytest.fixture(scope="module")
def net():
    return dm.build_net(seed=0).eval()


@pytest.fixture(scope="module")
def small_onnx(net):
    return dm.export_onnx_bytes(net, (64, 96))


def test_param_count(net):
    assert dm.count_params(net) == dm.EXPECTED_PARAMS == 7_783_425
    assert len(net.state_dict()) == 82


def test_seeded_init_is_reproducible(net):
    other = dm.build_net(seed=0).state_dict()
    assert all(torch.equal(v, other[k]) for k, v in net.state_dict().items())


def test_onnx_checker_and_io(small_onnx):
    m = onnx.load_from_string(small_onnx)
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version == 17
    name, shape, out_name, out_shape = check_model.io_info(m)
    assert (name, shape, out_name, out_shape) == ("image", [1, 3, 64, 96], "pred", [1, 1, 64, 96])
    assert not {"Pad", "ConstantOfShape"} & {n.op_type for n in m.graph.node}


def test_export_is_deterministic(small_onnx):
    assert dm.export_onnx_bytes(dm.build_net(seed=0), (64, 96)) == small_onnx


def test_onnx_weights_round_trip(net, small_onnx):
    sd = check_model.onnx_state_dict(onnx.load_from_string(small_onnx))
    ref = net.state_dict()
    assert all(torch.equal(ref[k], sd[k]) for k in ref)


def test_torch_vs_onnxruntime(net, small_onnx, tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(small_onnx)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 96)).astype(np.float32)
    assert np.abs(dm.run_torch(net, x) - dm.run_ort(p, x)).max() < 1e-4


def test_odd_size_export_still_matches(tmp_path):
    # 72 is not divisible by 16: BasicUNet's replicate padding stays in the graph and must still be right.
    n = dm.build_net(seed=1).eval()
    p = tmp_path / "odd.onnx"
    dm.export_onnx(n, p, (72, 64))
    onnx.checker.check_model(onnx.load(str(p)), full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 72, 64)).astype(np.float32)
    assert np.abs(dm.run_torch(n, x) - dm.run_ort(p, x)).max() < 1e-4


def test_fixture_input_formula():
    x = dm.fixture_input(512, 512)
    assert x.shape == (1, 3, 512, 512) and x.dtype == np.float32
    for c, h, w in [(0, 0, 0), (1, 3, 5), (2, 511, 511), (0, 100, 37)]:
        assert x[0, c, h, w] == np.float32(((h * 7 + w * 13 + c * 101) % 256) / 128.0 - 1.0)


def test_make_config_schema():
    cfg = dm.make_config(description="x")
    assert list(cfg) == CONFIG_KEYS
    assert list(cfg["pipeline"]) == PIPELINE_KEYS
    assert json.loads(dm.dumps_json(cfg)) == cfg


def test_bundled_config():
    cfg = json.loads((dm.MODEL_DIR / "config.json").read_text())
    assert list(cfg) == CONFIG_KEYS and list(cfg["pipeline"]) == PIPELINE_KEYS
    assert cfg["type"] == "deepgrow" and cfg["deepgrow"] == "2D" and cfg["name"] == "deepgrow_2d"
    assert cfg["network"] == {"input_name": "image", "output_name": "pred"}
    pipeline = cfg["pipeline"]
    # version 3 serves at 256 x 256 (its graph declares 512; the server sets the input to model_size): the crop
    # is the input, BasicUNet's four poolings need multiples of 16, and the rest is the pipeline it trained with
    assert pipeline["model_size"] == pipeline["crop_size"] and all(v % 16 == 0 for v in pipeline["model_size"])
    assert {k: v for k, v in pipeline.items() if k not in ("model_size", "crop_size")} == {
        k: v for k, v in dm.DEFAULT_PIPELINE.items() if k not in ("model_size", "crop_size")}


def test_bundled_model_and_fixture_agree():
    model = dm.MODEL_DIR / "model.onnx"
    m = onnx.load(str(model))
    onnx.checker.check_model(m, full_check=True)
    assert check_model.io_info(m) == ("image", [1, 3, 512, 512], "pred", [1, 1, 512, 512])
    summary = json.loads((dm.FIXTURE_DIR / "summary.json").read_text())
    assert summary["model_sha256"] == dm.sha256_file(model), "model.onnx changed: rerun check_model.py --write-fixture"
    assert (dm.FIXTURE_DIR / "logits_stride4.f32").stat().st_size == 128 * 128 * 4
