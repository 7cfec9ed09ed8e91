"""tools/convert_monailabel.py on checkpoints saved here in MONAI Label's layout (no downloaded weights): the
radiology app's trainer saves {"model": state_dict} of MONAI's BasicUNet; a bare state dict loads too. The
converted folder is then served by the server binary and answers a click."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import convert_monailabel as ml
import deepgrow_model as dm
import loadtest as lt

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def net():
    return dm.build_net(seed=321).eval()


@pytest.fixture(scope="module")
def checkpoints(net, tmp_path_factory):
    d = tmp_path_factory.mktemp("monailabel")
    sd = net.state_dict()
    # MONAI's BasicUNet key names, as the radiology app's network has them
    assert "conv_0.conv_0.conv.weight" in sd and "upcat_1.upsample.deconv.weight" in sd
    torch.save({"model": sd}, d / "radiology_deepgrow_2d_bunet.pt")
    torch.save(sd, d / "deepgrow_2d.pt")
    return d


@pytest.mark.parametrize("fname", ["radiology_deepgrow_2d_bunet.pt", "deepgrow_2d.pt"])
def test_convert_writes_monai_labels_pipeline(net, checkpoints, fname, tmp_path):
    out = tmp_path / "monailabel_deepgrow_2d"
    res = ml.convert(checkpoints / fname, out)
    assert res["params"] == dm.EXPECTED_PARAMS
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["name"] == "monailabel_deepgrow_2d" and cfg["type"] == "deepgrow" and cfg["deepgrow"] == "2D"
    # MONAI Label's radiology Deepgrow infer task: 256 x 256, (x - 208) / 388, sigma 2, margin 20, 1 mm
    assert cfg["pipeline"] == {"model_size": [256, 256], "crop_size": [256, 256], "margin": 20,
                               "subtrahend": 208.0, "divisor": 388.0, "sigma": 2.0, "target_spacing": [1.0, 1.0]}
    assert "spleen" in cfg["labels"]
    m = onnx.load(str(out / "model.onnx"))
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 256, 256]
    x = np.random.default_rng(5).standard_normal((1, 3, 256, 256)).astype(np.float32)
    assert np.abs(dm.run_torch(net, x) - dm.run_ort(out / "model.onnx", x)).max() < 1e-4
    assert ml.RELEASE_URL in (out / "README.md").read_text()


def test_another_network_is_refused(tmp_path):
    sd = dm.build_net(seed=1).state_dict()
    sd.pop("final_conv.bias")
    torch.save({"model": sd}, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="final_conv.bias"):
        ml.convert(tmp_path / "broken.pt", tmp_path / "out", check=False)


def test_the_converted_folder_is_served(checkpoints, tmp_path):
    binary = next((b for b in (REPO / "target/release/deepgrow-server", REPO / "target/debug/deepgrow-server")
                   if b.exists()), None)
    if binary is None:
        pytest.skip("no server binary (cargo build)")
    models = tmp_path / "models"
    assert ml.main(["--weights", str(checkpoints / "radiology_deepgrow_2d_bunet.pt"),
                    "--out-dir", str(models / "monailabel_deepgrow_2d")]) == 0
    server = lt.ServerProcess(binary=binary, models_dir=models).start()
    try:
        server.wait_ready()
        status, _, body = lt.http_request(server.host, server.port, "GET", "/v1/models")
        assert status == 200 and json.loads(body)[0]["name"] == "monailabel_deepgrow_2d"
        image = lt.SMALL_CT.read_bytes()
        click = list(lt.default_click(lt.SMALL_CT, lt.nifti_shape(image)))
        ct, form = lt.encode_multipart(fields=[("params", json.dumps({"foreground": [click], "background": []}))],
                                       files=[("datapoint", lt.SMALL_CT.name, image)])
        status, headers, body = lt.http_request(server.host, server.port, "POST",
                                                "/v1/deepgrow?model=monailabel_deepgrow_2d", form,
                                                {"Content-Type": ct})
        assert status == 200, body[:300]
        params, mask_bytes = lt.click_reply_params(headers["content-type"], body)
        assert params["slice"] == click[2] and mask_bytes > 0
    finally:
        server.stop()
