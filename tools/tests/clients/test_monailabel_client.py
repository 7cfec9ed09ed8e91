"""MONAI Label's own Python client (monailabel.client.MONAILabelClient 0.8.5, the same code as Slicer's
MONAILabelLib/client.py) against the real server binary and the bundled model: info, a session, clicks through
the session and through an inline file, and removal. The label comes back as NRRD on the CT's exact grid, on the
clicked slice only, over the fixture's liver."""

import gzip
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

client_module = pytest.importorskip("monailabel.client.client")
MONAILabelClient = client_module.MONAILabelClient
MONAILabelClientException = client_module.MONAILabelClientException

REPO = Path(__file__).resolve().parents[3]
CT = REPO / "tests/fixtures/ct/totalseg_example_ct_sm.nii.gz"
LABEL = REPO / "tests/fixtures/ct/totalseg_example_ct_sm_label.nii.gz"
LIVER = 5
SLICE = 14
MODEL = "deepgrow_2d"


def read_nifti(path):
    """(shape, affine rows from the sform, flat voxel list in file order) of a NIfTI-1 file; uint8/int16 only."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    dims = struct.unpack_from("<8h", data, 40)
    datatype = struct.unpack_from("<h", data, 70)[0]
    offset = int(struct.unpack_from("<f", data, 108)[0])
    srows = [struct.unpack_from("<4f", data, 280 + 16 * r) for r in range(3)]
    shape = dims[1:4]
    count = shape[0] * shape[1] * shape[2]
    code = {2: "B", 4: "h"}[datatype]
    values = struct.unpack_from(f"<{count}{code}", data, offset)
    return shape, srows, values


def read_nrrd(path):
    data = Path(path).read_bytes()
    assert data.startswith(b"NRRD000"), data[:16]
    head, _, body = data.partition(b"\n\n")
    fields = dict(line.split(": ", 1) for line in head.decode().splitlines()[1:] if not line.startswith("#"))
    if fields["encoding"] in ("gzip", "gz"):
        body = gzip.decompress(body)
    return fields, body


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_binary():
    named = os.environ.get("DEEPGROW_SERVER_BIN")
    if named:
        return named
    built = [path for path in (REPO / "target" / profile / "deepgrow-server" for profile in ("release", "debug"))
             if path.exists()]
    if not built:
        pytest.skip("no server binary: run cargo build first, or set DEEPGROW_SERVER_BIN")
    # the one built last, so that a stale release build is not tested after a debug rebuild
    return str(max(built, key=lambda path: path.stat().st_mtime))


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process = subprocess.Popen(
        [server_binary(), "--host", "127.0.0.1", "--port", str(port), "--models-dir", str(REPO / "models")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError("server did not start: " + process.stderr.read().decode()[-2000:])
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def liver_click():
    """A liver voxel near the liver's centroid on SLICE, and the liver's voxels on that slice."""
    (h, w, _), _, labels = read_nifti(LABEL)
    liver = {(i, j) for j in range(w) for i in range(h) if labels[i + h * (j + w * SLICE)] == LIVER}
    ci = sum(i for i, _ in liver) / len(liver)
    cj = sum(j for _, j in liver) / len(liver)
    i, j = min(liver, key=lambda p: ((p[0] - ci) ** 2 + (p[1] - cj) ** 2, p))
    return [i, j, SLICE], liver


def check_label(path, liver):
    """The label file is the CT's grid (sizes, directions, origin), uint8, non-zero only on SLICE, over the
    liver; returns its non-zero (i, j)."""
    assert path.endswith(".nrrd"), path
    fields, body = read_nrrd(path)
    shape, srows, _ = read_nifti(CT)
    h, w, d = shape
    assert fields["sizes"].split() == [str(h), str(w), str(d)]
    assert fields["type"] in ("uint8", "unsigned char")
    assert fields["space"] == "right-anterior-superior"
    directions = [tuple(float(v) for v in vector.strip("()").split(","))
                  for vector in fields["space directions"].split()]
    origin = tuple(float(v) for v in fields["space origin"].strip("()").split(","))
    for axis in range(3):
        for row in range(3):
            assert directions[axis][row] == pytest.approx(srows[row][axis], abs=1e-4)
    assert origin == pytest.approx(tuple(srows[row][3] for row in range(3)), abs=1e-4)
    assert len(body) == h * w * d
    on = set()
    for index, value in enumerate(body):
        if value:
            assert value == 1
            i, rest = index % h, index // h
            j, k = rest % w, rest // w
            assert k == SLICE, f"label voxel off the clicked slice: {(i, j, k)}"
            on.add((i, j))
    dice = 2 * len(on & liver) / (len(on) + len(liver))
    assert dice >= 0.5, f"liver Dice {dice:.3f}"
    return on


def test_info_session_infer_and_remove(server, liver_click, tmp_path):
    point, liver = liver_click
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    assert client.auth_enabled() is False
    assert client.train_status(check_if_running=True) is False

    info = client.info()
    model = info["models"][MODEL]
    assert model["type"] == "deepgrow" and model["dimension"] == 2 and model["description"]
    assert info["labels"] and "config" not in info

    # Slicer writes the volume to a temporary .nii.gz and uploads it as a session.
    upload = tmp_path / "tmpab12cd34.nii.gz"
    shutil.copy(CT, upload)
    session = client.create_session(str(upload))
    session_id = session["session_id"]
    assert client.get_session(session_id)

    params = {"label": "liver", "foreground": [point], "background": [], "slice": SLICE,
              "reset_state": True, "result_extension": ".nrrd", "result_dtype": "uint8"}
    label_file, result = client.infer(MODEL, "CT 1", params, session_id=session_id)
    assert isinstance(result, dict), result
    assert result["label_names"] == ["liver"] and "latencies" in result and result["centroids"] == {}
    through_session = check_label(label_file, liver)
    assert tuple(point[:2]) in through_session

    # The image inline, without a session (the Python client's file=).
    inline_file, inline_result = client.infer(MODEL, "", params, file=str(CT))
    assert json.loads(json.dumps(inline_result))["slice"] == SLICE
    assert check_label(inline_file, liver) == through_session

    removed = client.remove_session(session_id)
    assert removed["session_id"] == session_id
    with pytest.raises(MONAILabelClientException) as error:
        client.get_session(session_id)
    assert error.value.status_code == 404
    with pytest.raises(MONAILabelClientException):
        client.infer(MODEL, "CT 1", params, session_id=session_id)


def nrrd_js():
    """The node_modules folder holding nrrd-js 0.2.1 (.ci/run installs it into tools/.node-clients), or None."""
    folder = REPO / "tools/.node-clients/node_modules"
    if shutil.which("node") and (folder / "nrrd-js").is_dir():
        return folder
    return None


def test_ohif_v3_label_parses_with_nrrd_js(server, liver_click, tmp_path):
    """OHIF v3 asks for output=image and copies the NRRD's voxels 1:1 into its labelmap: nrrd-js must parse the
    raw label, as uint8, one element per voxel."""
    modules = nrrd_js()
    if modules is None:
        assert not os.environ.get("DEEPGROW_REQUIRE_NRRD_JS"), "nrrd-js is required here but not installed"
        pytest.skip("nrrd-js not installed (npm install --prefix tools/.node-clients nrrd-js@0.2.1)")
    point, liver = liver_click
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    upload = tmp_path / "tmpohif.nii.gz"
    shutil.copy(CT, upload)
    session_id = client.create_session(str(upload))["session_id"]
    params = {"foreground": [point], "background": [], "result_extension": ".nrrd", "result_dtype": "uint8",
              "result_compress": False, "restore_label_idx": False}
    boundary = "----WebKitFormBoundaryAbC123"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n'
            f'--{boundary}--\r\n').encode()
    request = urllib.request.Request(
        f"{server}/infer/{MODEL}?image=1.2.3&output=image&session_id={session_id}", data=body, method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Origin": "http://localhost:3000"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200
        assert reply.headers["Access-Control-Allow-Origin"]
        label = reply.read()
    path = tmp_path / "label.nrrd"
    path.write_bytes(label)
    parsed = json.loads(subprocess.run(
        ["node", str(Path(__file__).with_name("nrrd_check.js")), str(path)], check=True, capture_output=True,
        text=True, env={**os.environ, "NODE_PATH": str(modules)}).stdout)
    (h, w, d), _, _ = read_nifti(CT)
    assert parsed["type"] == "uint8" and parsed["encoding"] == "raw", parsed
    assert parsed["sizes"] == [h, w, d] and parsed["length"] == h * w * d and parsed["bytesPerElement"] == 1
    assert parsed["nonzero"] == len(check_label(str(path), liver))
