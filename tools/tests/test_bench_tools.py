"""Pure helpers of tools/loadtest.py and tools/compare_engines.py (no server, no network run)."""

import gzip
import json
import struct

import numpy as np
import pytest

import compare_engines as ce
import loadtest as lt


def test_multipart_roundtrip():
    ct, body = lt.encode_multipart([("params", '{"foreground": [[1, 2, 3]]}')],
                                   [("datapoint", "ct.nii.gz", b"\x00\x01\r\n--x\r\n\xff")])
    assert ct.startswith("multipart/form-data; boundary=")
    assert body.startswith(b"--" + lt.BOUNDARY.encode() + b"\r\n")
    parts = lt.parse_multipart(ct, body)
    assert [(p["name"], p["filename"]) for p in parts] == [("params", None), ("datapoint", "ct.nii.gz")]
    assert json.loads(parts[0]["data"]) == {"foreground": [[1, 2, 3]]}
    assert parts[1]["data"] == b"\x00\x01\r\n--x\r\n\xff"
    assert parts[1]["headers"]["content-type"] == "application/octet-stream"


def test_parse_multipart_quoted_boundary_and_reply():
    body = (b'--abc\r\nContent-Disposition: form-data; name="params"\r\nContent-Type: application/json\r\n\r\n'
            b'{"latencies": {"infer": 5.0}}\r\n--abc\r\nContent-Disposition: form-data; name="image"; '
            b'filename="mask.nii.gz"\r\n\r\nMASK\r\n--abc--\r\n')
    params, n = lt.click_reply_params('multipart/form-data; boundary="abc"', body)
    assert params["latencies"]["infer"] == 5.0 and n == 4


@pytest.mark.parametrize("ct,body", [
    ("multipart/form-data", b"--abc\r\n"),
    ("multipart/form-data; boundary=abc", b"preamble\r\n--abc--\r\n"),
    ("multipart/form-data; boundary=abc", b'--abc\r\nContent-Disposition: form-data; name="p"\r\n\r\nx'),
])
def test_parse_multipart_rejects(ct, body):
    with pytest.raises(ValueError):
        lt.parse_multipart(ct, body)


def test_click_reply_needs_params_and_file():
    ct, body = lt.encode_multipart([("params", "{}")])
    with pytest.raises(ValueError):
        lt.click_reply_params(ct, body)


def test_is_aiaa_error():
    assert lt.is_aiaa_error(b'{"error": {"message": ["x"], "type": "BadRequest"}, "success": false}')
    assert not lt.is_aiaa_error(b'{"error": {"message": "x", "type": "BadRequest"}, "success": false}')
    assert not lt.is_aiaa_error(b'{"error": {"message": ["x"]}, "success": false}')
    assert not lt.is_aiaa_error(b"<html>404</html>")
    assert not lt.is_aiaa_error(b"[]")


def _nifti_header(dims, order="<"):
    h = bytearray(348)
    h[0:4] = struct.pack(order + "i", 348)
    d = [len(dims), *dims] + [1] * (7 - len(dims))
    h[40:56] = struct.pack(order + "8h", *d)
    return bytes(h) + b"\0" * 4


def test_nifti_shape():
    assert lt.nifti_shape(_nifti_header((512, 512, 20))) == (512, 512, 20)
    assert lt.nifti_shape(_nifti_header((122, 101, 30), ">")) == (122, 101, 30)
    assert lt.nifti_shape(gzip.compress(_nifti_header((7, 8, 9)) + b"\0" * 1000)) == (7, 8, 9)
    with pytest.raises(ValueError):
        lt.nifti_shape(b"\0" * 400)


def test_nifti_shape_of_fixture():
    assert lt.nifti_shape(lt.SMALL_CT.read_bytes()) == (122, 101, 30)


def test_default_click():
    assert lt.default_click(lt.SMALL_CT, (122, 101, 30)) == (81, 59, 15)
    assert lt.default_click("/x/other.nii.gz", (10, 20, 5)) == (5, 10, 2)


def test_percentile_matches_numpy():
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 100):
        xs = list(rng.random(n))
        for q in (0, 50, 95, 99, 100):
            assert lt.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert lt.percentile([], 50) is None


def test_parse_url():
    assert lt.parse_url("http://127.0.0.1:5077/") == ("127.0.0.1", 5077)
    assert lt.parse_url("localhost:5000") == ("localhost", 5000)
    with pytest.raises(ValueError):
        lt.parse_url("https://x")


def test_read_onnx_small_model():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 5.5
    raw = numpy_helper.from_array(w, "conv.weight")
    listed = helper.make_tensor("conv.bias", TensorProto.FLOAT, [2], [0.5, -1.25])  # float_data, not raw
    ints = helper.make_tensor("shape", TensorProto.INT64, [3], [1, -1, 4])
    nodes = [helper.make_node("Identity", ["conv.weight"], ["other.weight"]),
             helper.make_node("Add", ["x", "conv.bias"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", 2])],
                              [raw, listed, ints])
    data = helper.make_model(graph).SerializeToString()
    m = ce.read_onnx(data)
    assert m["inputs"] == [("x", [1, "n", 2])] and m["outputs"] == [("y", [1, "n", 2])]
    np.testing.assert_array_equal(m["initializers"]["conv.weight"], w)
    np.testing.assert_array_equal(m["initializers"]["conv.bias"], np.array([0.5, -1.25], np.float32))
    np.testing.assert_array_equal(m["initializers"]["shape"], np.array([1, -1, 4], np.int64))
    sd = ce.onnx_state_dict(m)
    np.testing.assert_array_equal(sd["other.weight"], w)
    assert onnx is not None


def test_summarize_and_table():
    s = ce.summarize([3.0, 1.0, 2.0])
    assert (s["median_ms"], s["min_ms"], s["max_ms"], s["n"]) == (2.0, 1.0, 3.0, 3)
    table = ce.format_table([("ORT", s), ("other", ce.summarize([4.0])), ("missing", None)], 2.0)
    lines = table.splitlines()
    assert lines[2].split()[-1] == "1.00" and lines[3].split()[-1] == "2.00" and lines[4].split()[-1] == "-"


def test_parse_smaps():
    text = """55d0c0000000-55d0c1000000 rw-p 00000000 00:00 0                          [heap]
Size:              16384 kB
Rss:                1000 kB
7f0000000000-7f0002000000 rw-p 00000000 00:00 0
Rss:                 300 kB
7f0002000000-7f0004000000 ---p 00000000 00:00 0
Rss:                   0 kB
7f0004100000-7f0005100000 rw-p 00000000 00:00 0
Rss:                  50 kB
7f1000000000-7f1000100000 r-xp 00000000 08:01 1234                       /usr/lib/libc.so.6
Rss:                  20 kB
7ffc00000000-7ffc00100000 rw-p 00000000 00:00 0                          [stack]
Rss:                   8 kB
"""
    assert lt.parse_smaps(text) == {"heap": 1000, "arena_heaps": 300, "anon_other": 50, "file": 20, "stack": 8,
                                    "arena_heap_count": 1}
