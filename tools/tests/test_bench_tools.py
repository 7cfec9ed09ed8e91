"""Pure helpers of tools/loadtest.py and tools/compare_engines.py (no server binary, no network run; the round
logic of compare_engines' server engine runs against a stub HTTP server on loopback)."""

import argparse
import gzip
import http.server
import json
import struct
import threading

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


def test_table_with_openvino_rows_and_diffs():
    ort = dict(ce.summarize([10.0, 12.0, 11.0]), max_abs_diff_vs_ort=None)
    ovf = dict(ce.summarize([5.0, 6.0]), max_abs_diff_vs_ort=2.5e-6)
    ovd = dict(ce.summarize([2.75]), max_abs_diff_vs_ort=0.125, precision="bf16")
    long_label = "OpenVINO default=bf16 (2 threads)"
    table = ce.format_table([("ORT (2 threads)", ort), ("OpenVINO f32 (2 threads)", ovf), (long_label, ovd),
                             ("PyTorch (2 threads)", None)], ort["median_ms"])
    lines = table.splitlines()
    assert lines[0].split()[-3:] == ["ORT", "x", "ORT"] and "max|d|" in lines[0]
    assert len({len(l) for l in lines[:2]}) == 1
    assert lines[2].split()[-2:] == ["-", "1.00"]
    assert lines[3].split()[-2:] == ["2.50e-06", "0.50"] and lines[3].split()[-3] == "2"
    assert lines[4].startswith(long_label + " ") and lines[4].split()[-2:] == ["1.25e-01", "0.25"]
    assert lines[5].split()[-2:] == ["-", "-"]
    # columns line up although one label is longer than the default width
    assert len({l.index(" ", len(long_label)) for l in lines[2:]}) == 1


def test_schedule_interleaves_rounds_in_engine_order():
    assert ce.schedule(["server", "ort", "ov"], 1) == [(0, "ort"), (0, "ov"), (0, "server")]
    plan = ce.schedule(list(ce.ENGINES), 2)
    assert [e for _, e in plan] == ["ort", "ov-f32", "ov", "torch", "server"] * 2
    assert [r for r, _ in plan] == [0] * 5 + [1] * 5
    assert ce.schedule(["torch"], 3) == [(0, "torch"), (1, "torch"), (2, "torch")]
    assert ce.ENGINES[:4] == ce.CHILD_ENGINES and ce.ENGINES[0] == "ort"


def test_pool_rounds():
    r1 = {"engine": "openvino", "times_ms": [3.0, 1.0, 2.0], "setup_s": 0.5, "process_s": 4.0,
          "max_abs_diff_vs_ort": 0.01, "vm_hwm_kib": 1000, "precision": "bf16"}
    r2 = {"engine": "openvino", "times_ms": [10.0, 9.0, 11.0], "setup_s": 0.4, "process_s": 5.0,
          "max_abs_diff_vs_ort": 0.02, "vm_hwm_kib": 900, "precision": "bf16"}
    p = ce.pool_rounds([r1, r2])
    assert p["times_ms"] == [3.0, 1.0, 2.0, 10.0, 9.0, 11.0] and p["n"] == 6
    assert (p["median_ms"], p["min_ms"], p["max_ms"]) == (6.0, 1.0, 11.0)
    assert p["round_medians_ms"] == [2.0, 10.0] and p["rounds"] == 2
    assert p["round_setup_s"] == [0.5, 0.4] and p["round_process_s"] == [4.0, 5.0]
    assert p["max_abs_diff_vs_ort"] == 0.02 and p["vm_hwm_kib"] == 1000
    assert p["setup_s"] == 0.5 and p["precision"] == "bf16"
    assert r1["times_ms"] == [3.0, 1.0, 2.0]  # the inputs are left alone
    one = ce.pool_rounds([{"times_ms": [4.0, 2.0], "setup_s": 1.0}])
    assert (one["median_ms"], one["n"], one["round_medians_ms"]) == (3.0, 2, [3.0])
    assert "max_abs_diff_vs_ort" not in one  # ORT has no diff against itself
    nodiff = ce.pool_rounds([{"times_ms": [1.0], "max_abs_diff_vs_ort": None}] * 2)
    assert nodiff["max_abs_diff_vs_ort"] is None
    mm = ce.pool_rounds([{"times_ms": [1.0], "mask_mismatch_vs_ort": 3},
                         {"times_ms": [1.0], "mask_mismatch_vs_ort": 5}])
    assert mm["mask_mismatch_vs_ort"] == 5


def test_compare_outputs():
    ref = np.array([[-1.0, 0.5], [2.0, -0.25]], np.float32)
    y = np.array([[-1.0, -0.5], [2.5, -0.25]], np.float32)
    c = ce.compare_outputs(y, ref)
    assert c == {"max_abs_diff_vs_ort": 1.0, "mean_abs_diff_vs_ort": 0.375, "mask_mismatch_vs_ort": 1,
                 "mask_pixels": 4}


def test_ov_diff_limit():
    assert ce.ov_diff_limit("ov", "f32", 1e-3, 1.0)[0] == 1e-3
    assert ce.ov_diff_limit("ov", "bf16", 1e-3, 1.0)[0] == 1.0
    assert ce.ov_diff_limit("ov", None, 1e-3, 1.0)[0] == 1.0
    assert ce.ov_diff_limit("ov-f32", "bf16", 1e-3, 1.0)[0] == 1e-3  # asked for f32: always held to --max-diff


def test_cpu_flags():
    text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile\n\n"
            "processor\t: 1\nflags\t\t: fpu\n")
    f = ce.cpu_flags(text)
    assert list(f) == list(ce.CPU_FLAGS)
    assert f["avx2"] and f["avx512f"] and f["avx512_bf16"] and f["amx_bf16"] and f["amx_tile"]
    assert not f["avx512_fp16"] and not f["amx_int8"]
    assert ce.cpu_flags("no flags here") == {n: False for n in ce.CPU_FLAGS}
    assert ce.format_flags({"avx2": True, "amx_bf16": False}) == "avx2 (no amx_bf16)"
    assert ce.format_flags({"avx2": True}) == "avx2"
    assert set(ce.read_cpu_flags()) == set(ce.CPU_FLAGS)


def test_server_kernels_from_log():
    text = ("2026-01-01T00:00:00Z  INFO deepgrow_server: model optimised and warmed up path=models/a/model.onnx "
            "kernels=Fast load_ms=300 warmup_ms=200\n"
            "WARN no AVX2 on this CPU: tract's own kernels are faster here than the fast ones\n")
    assert ce.server_kernels(text) == ["Fast"]
    ansi = "\x1b[2mdeepgrow\x1b[0m \x1b[3mkernels\x1b[0m\x1b[2m=\x1b[0mFastF4 \x1b[3mload_ms\x1b[0m\x1b[2m=\x1b[0m3"
    assert ce.server_kernels(ansi) == ["FastF4"]
    js = json.dumps({"fields": {"message": "model optimised and warmed up", "kernels": "Tract"}})
    assert ce.server_kernels(js) == ["Tract"]
    assert ce.server_kernels("listening on 127.0.0.1:5000\n") == []


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


class _StubServer(http.server.ThreadingHTTPServer):
    """Answers the requests compare_engines' server engine makes, and counts them."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.counts = {}
        self.sessions = 0


class _StubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _reply(self, status, body, ct="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ct)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _count(self):
        key = f"{self.command} {self.path.split('?')[0]}"
        self.server.counts[key] = self.server.counts.get(key, 0) + 1
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n)

    def do_PUT(self):
        self._count()
        self.server.sessions += 1
        self._reply(200, json.dumps({"session_id": f"s{self.server.sessions}"}).encode())

    def do_GET(self):
        self._count()
        self._reply(200, json.dumps({"sessions": self.server.sessions, "session_bytes": 1000}).encode())

    def do_DELETE(self):
        self._count()
        self.server.sessions -= 1
        self._reply(200, b"{}")

    def do_POST(self):
        self._count()
        lat = {"decode": 0.0, "pre": 1.0, "infer": 10.0, "post": 0.5, "write": 0.25, "total": 12.0}
        ct, body = lt.encode_multipart([("params", json.dumps({"latencies": lat, "label": "x"}))],
                                       [("image", "mask.nii.gz", b"mask")])
        self._reply(200, body, ct)


def _running(srv):
    """Serves `srv` on a daemon thread for one test."""
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def stub_server():
    yield from _running(_StubServer())


def test_server_bench_reuses_one_server_across_rounds(stub_server):
    args = argparse.Namespace(url=f"http://127.0.0.1:{stub_server.server_address[1]}", pid=None,
                              image=lt.SMALL_CT, click=None, model_name=lt.MODEL, warmup=2, runs=3, threads=2)
    bench = ce.ServerBench(args)
    bench.round(" round 1/2")
    bench.round(" round 2/2")
    res = bench.finish()
    c = stub_server.counts
    assert c["PUT /session/"] == 2 and c["DELETE /session/s2"] == 1 and c["GET /health"] == 1  # set up once
    assert c["POST /v1/deepgrow"] == 2 * ((2 + 3) + (1 + 3))  # each round repeats its warm-up
    for name in ("session", "upload"):
        s = res[f"click_{name}"]
        assert s["n"] == 6 and s["rounds"] == 2 and len(s["round_medians_ms"]) == 2
        assert len(s["latencies_ms"]) == 6 and s["latencies_median_ms"]["infer"] == 10.0
        assert s["mask_bytes"] == 4 and s["reply_params_example"] == {"label": "x"}
    assert res["shape"] == [122, 101, 30] and res["session_create_ms"] and "kernels" not in res


def test_main_server_engine_rounds_against_stub(stub_server, tmp_path, capsys):
    out = tmp_path / "engines.json"
    rc = ce.main(["--engines", "server", "--url", f"http://127.0.0.1:{stub_server.server_address[1]}",
                  "--image", str(lt.SMALL_CT), "--runs", "2", "--warmup", "1", "--rounds", "2",
                  "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "[server round 2/2] click with session" in text and "per-round medians, server click (session)" in text
    assert "flags:" in text.split("engine ")[0]  # the CPU flags come above the table
    d = json.loads(out.read_text())
    assert d["schedule"] == ["1:server", "2:server"] and d["server"]["click_session"]["n"] == 4
    assert set(d["cpu_flags"]) == set(ce.CPU_FLAGS) and stub_server.counts["PUT /session/"] == 2


# ---- issue 14: the big uploads and the burst


def test_slices_for_mib():
    assert lt.slices_for_mib(200) == 400 and lt.slices_for_mib(900) == 1800
    assert lt.slices_for_mib(0.1) == 1 and lt.slices_for_mib(1, 100, 100) == 52


def test_nifti1_header_and_big_volume():
    h = lt.nifti1_header((512, 512, 7))
    assert len(h) == lt.NIFTI_HEADER_BYTES == 352 and h[344:348] == b"n+1\0" and h[348:] == b"\0" * 4
    assert lt.nifti_shape(h) == (512, 512, 7)
    assert struct.unpack_from("<hh", h, 70) == (4, 16) and struct.unpack_from("<f", h, 108) == (352.0,)
    v = lt.make_big_volume(1.0)
    assert v["shape"] == (512, 512, 2) and v["click"] == (256, 256, 1) and not v["gzip"]
    assert len(v["data"]) == v["raw_bytes"] == 352 + 512 * 512 * 2 * 2 and v["name"] == "big_phantom.nii"
    assert lt.nifti_shape(v["data"]) == (512, 512, 2)
    vol = np.frombuffer(v["data"], "<i2", offset=352).reshape(2, 512, 512)  # z, y, x
    assert vol[1, 256, 256] == pytest.approx(lt.HU_LIVER, abs=10)  # the click lands in the liver-like ellipse
    assert vol[0, 0, 0] == lt.HU_AIR and vol.max() == lt.HU_BONE
    assert np.abs(np.diff(vol[1, 200:300, 256].astype(int))).max() <= 1  # smooth inside the organ
    g = lt.make_big_volume(1.0, gzip_level=1)
    assert g["gzip"] and g["name"].endswith(".nii.gz") and gzip.decompress(g["data"]) == v["data"]
    assert len(g["data"]) < len(v["data"]) // 10 and lt.nifti_shape(g["data"]) == (512, 512, 2)
    nib = pytest.importorskip("nibabel")
    img = nib.Nifti1Image.from_bytes(v["data"])
    assert img.shape == (512, 512, 2) and img.get_data_dtype() == np.int16
    assert img.header.get_zooms() == pytest.approx((0.8, 0.8, 1.0))
    assert np.asanyarray(img.dataobj)[256, 256, 1] == vol[1, 256, 256]


@pytest.mark.parametrize("fields", [[], [("params", '{"foreground": [[256, 256, 1]], "background": []}')]])
def test_multipart_frame_matches_encode_multipart(fields):
    data = b"\x00\x01\r\n--x\r\n\xff" * 3
    ct, head, tail = lt.multipart_frame(fields, "datapoint", "big.nii")
    ref_ct, ref = lt.encode_multipart(fields, [("datapoint", "big.nii", data)])
    assert ct == ref_ct and head + data + tail == ref
    assert len(head) < 400 and tail == b"\r\n--" + lt.BOUNDARY.encode() + b"--\r\n"
    body, headers = lt.framed_body(ct, head, data, tail)
    assert body[1] is data  # shared, not copied
    assert headers == {"Content-Type": ct, "Content-Length": str(len(ref))}
    parts = lt.parse_multipart(ct, b"".join(body))
    assert [p["name"] for p in parts] == [f[0] for f in fields] + ["datapoint"] and parts[-1]["data"] == data


def test_session_create_comparison_and_ratio():
    assert lt.load_ratio(30.0, 20.0) == 1.5
    assert lt.load_ratio(None, 20.0) is None and lt.load_ratio(3.0, 0) is None and lt.load_ratio(3.0, None) is None
    d, line = lt.session_create_comparison([0.010, 0.030, 0.020], [0.05, 0.03])
    assert d["unloaded_p50_ms"] == pytest.approx(20.0) and d["loaded_p50_ms"] == pytest.approx(40.0)
    assert d["ratio"] == pytest.approx(2.0) and d["within_goal"] is True and (d["unloaded_n"], d["loaded_n"]) == (3, 2)
    assert line == ("session_create p50: unloaded 20.0 ms (n 3), under load 40.0 ms (n 2); ratio 2.00x "
                    "(within the 2x goal)")
    d, line = lt.session_create_comparison([0.01], [0.05])
    assert d["within_goal"] is False and line.endswith("ratio 5.00x (OVER the 2x goal)")
    d, line = lt.session_create_comparison([], [0.05])
    assert d["ratio"] is None and d["within_goal"] is None and line.endswith("ratio -")
    assert lt.fmt_bytes(None) == "-" and lt.fmt_bytes(3 * lt.GIB) == "3.00 GiB" and lt.fmt_bytes(lt.MIB) == "1.0 MiB" and lt.fmt_bytes(512) == "0.5 KiB"


def _client(idx, status, **kw):
    rec = {"idx": idx, "kind": "session", "status": status, "wall_s": 1.0 + idx, "error": None, "sent_all": True,
           "retry_after": "1" if status == 503 else None, "aiaa_error": True if status != 200 else None,
           "reply_ok": True if status == 200 else None}
    rec.update(kw)
    return rec


def test_summarize_burst_passes():
    clients = [_client(0, 200), _client(1, 503), _client(2, 200, kind="click")]
    monitor = [{"status": 200, "latency_s": 0.1}, {"status": 200, "latency_s": 0.3}, {"status": 503},
               {"status": 440, "latency_s": 0.01}, {"status": 200, "latency_s": 0.2}]
    s = lt.summarize_burst(clients, monitor, rss_before_kib=100 * 1024, hwm_kib=1100 * 1024,
                           inflight_budget_bytes=2 * lt.GIB, session_budget_bytes=8 * lt.GIB, kind="mixed",
                           idle_clicks_s=[0.1, 0.1])
    assert not s["failed"] and s["problems"] == []
    assert s["counts"] == {"200": 2, "503": 1, "other": 0, "no_status": 0}
    assert s["wall_s"] == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert s["rss"]["rise_bytes"] == 1000 * lt.MIB and s["rss"]["peak_source"] == "VmHWM"
    assert s["budgets"]["bound_bytes"] == 10 * lt.GIB and s["budgets"]["rise_within_bound"] is True
    sc = s["session_clicks"]
    assert (sc["n"], sc["attempts"], sc["p50_ms"], sc["max_ms"]) == (3, 5, pytest.approx(200.0), pytest.approx(300.0))
    assert sc["statuses"] == {"200": 3, "440": 1, "503": 1} and sc["ratio_to_idle"] == pytest.approx(2.0)
    text = lt.format_burst_report(s, clients)
    lines = text.splitlines()
    assert lines[0].split() == ["client", "kind", "status", "wall", "s", "note"]
    assert lines[1].split() == ["0", "session", "200", "1.00"] and lines[2].split()[:5] == ["1", "session", "503",
                                                                                           "2.00", "Retry-After"]
    assert "statuses: 200: 2, 503: 1, other: 0, no status (connection reset or error): 0" in text
    assert "rise 1000.0 MiB" in text and "bound 10.00 GiB (in-flight + sessions): within" in text
    assert "n 3 (of 5), p50 200.0 ms, max 300.0 ms; idle p50 100.0 ms (n 2), 2.00x idle" in text
    assert "FAIL" not in text


def test_summarize_burst_failures():
    clients = [_client(0, None, error="reply: ConnectionResetError: [Errno 104]", wall_s=0.5),
               _client(1, 413), _client(2, 503, retry_after=None), _client(3, 503, aiaa_error=False),
               _client(4, 200, kind="click", reply_ok=False, reply_error="no mask"), _client(5, 200)]
    monitor = [{"status": None, "error": "ConnectionRefusedError: x"}, {"status": 500, "latency_s": 0.1}]
    s = lt.summarize_burst(clients, monitor, rss_before_kib=100, sampled_peak_kib=300,
                           inflight_budget_bytes=100 * 1024, session_budget_bytes=10 ** 9, kind="click",
                           server_alive=False)
    assert s["failed"]
    assert s["counts"] == {"200": 2, "503": 2, "other": 1, "no_status": 1}
    assert s["problems"] == [
        "client 0 (session): no status (reply: ConnectionResetError: [Errno 104])",
        "client 1 (session): status 413",
        "client 2 (session): 503 without Retry-After",
        "client 3 (session): 503 body is not the AIAA error JSON",
        "client 4 (click): malformed 200 reply (no mask)",
        "session click: ConnectionRefusedError: x",
        "session click: status 500",
        "the server died (or stopped answering)",
    ]
    # no VmHWM: the sampled peak; a click burst is bounded by the in-flight budget alone
    assert s["rss"]["peak_source"] == "sampled" and s["rss"]["rise_bytes"] == 200 * 1024
    assert s["budgets"]["bound_bytes"] == 100 * 1024 and s["budgets"]["rise_within_bound"] is False
    assert s["session_clicks"]["n"] == 0 and s["session_clicks"]["p50_ms"] is None
    text = lt.format_burst_report(s, clients)
    assert "EXCEEDED" in text and text.count("FAIL: ") == 8 and "(in-flight):" in text
    empty = lt.summarize_burst([], [])
    assert not empty["failed"] and empty["rss"]["rise_bytes"] is None and empty["budgets"]["bound_bytes"] is None
    assert "unavailable" in lt.format_burst_report(empty, [])


def test_burst_kinds():
    assert lt.burst_kinds(3, "session") == ["session"] * 3
    assert lt.burst_kinds(3, "mixed") == ["session", "click", "session"]


class _BigStub(http.server.ThreadingHTTPServer):
    """Enough of the server for loadtest's burst and big-mix runs: it parses every multipart body, records each
    upload's part names and file size, and answers every second big upload with 503 + Retry-After."""

    BIG = 512 * 1024

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _BigHandler)
        self.lock = threading.Lock()
        self.uploads = []  # (method, path, [part names], file bytes)
        self.big_seen = 0
        self.sessions = set()
        self.n = 0


class _BigHandler(_StubHandler):
    def _body(self):
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _err(self, status, kind):
        body = json.dumps({"error": {"message": [kind], "type": kind}, "success": False}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 503:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)

    def _upload(self):
        """(parts, busy): the request's parts, and whether this big upload gets a 503."""
        data = self._body()
        parts = lt.parse_multipart(self.headers.get("Content-Type", ""), data)
        files = [p for p in parts if p["filename"] is not None]
        size = len(files[0]["data"]) if files else 0
        srv = self.server
        with srv.lock:
            srv.uploads.append((self.command, self.path, [p["name"] for p in parts], size))
            busy = False
            if size > srv.BIG:
                srv.big_seen += 1
                busy = srv.big_seen % 2 == 0
        return parts, busy

    def do_PUT(self):
        _, busy = self._upload()
        if busy:
            return self._err(503, "Overloaded")
        with self.server.lock:
            self.server.n += 1
            sid = f"s{self.server.n}"
            self.server.sessions.add(sid)
        self._reply(200, json.dumps({"session_id": sid, "session_info": {}}).encode())

    def do_GET(self):
        if self.path.startswith("/health"):
            return self._reply(200, json.dumps({"sessions": len(self.server.sessions), "session_bytes": 0,
                                                "inflight_bytes": 0, "inflight_budget_bytes": 64 * lt.MIB}).encode())
        self._reply(200, b'{"models": []}')

    def do_DELETE(self):
        with self.server.lock:
            self.server.sessions.discard(self.path.rsplit("/", 1)[-1])
        self._reply(200, b"{}")

    def do_POST(self):
        _, busy = self._upload()
        if busy:
            return self._err(503, "Overloaded")
        ct, body = lt.encode_multipart([("params", json.dumps({"latencies": {"total": 1.0}}))],
                                       [("image", "mask.nii.gz", b"mask")])
        self._reply(200, body, ct)


@pytest.fixture
def big_stub():
    yield from _running(_BigStub())


def test_burst_against_stub(big_stub, tmp_path, capsys):
    import os
    out = tmp_path / "burst.json"
    url = f"http://127.0.0.1:{big_stub.server_address[1]}"
    rc = lt.main(["--burst", "4", "--burst-mib", "1", "--burst-kind", "mixed", "--url", url, "--pid",
                  str(os.getpid()), "--image", str(lt.SMALL_CT), "--session-memory-bytes", str(lt.GIB),
                  "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "RESULT: PASS" in text and "statuses: 200: 2, 503: 2, other: 0" in text
    size = 512 * 512 * 2 * 2 + 352
    big = [u for u in big_stub.uploads if u[3] > _BigStub.BIG]
    assert len(big) == 4 and all(u[3] == size for u in big)
    assert sorted(u[2] for u in big) == [["image"]] * 2 + [["params", "datapoint"]] * 2  # params first
    d = json.loads(out.read_text())
    s = d["summary"]
    assert d["mode"] == "burst" and not d["failed"] and s["counts"]["no_status"] == 0
    assert s["budgets"] == {"inflight_bytes": 64 * lt.MIB, "session_bytes": lt.GIB, "bound_bytes": 64 * lt.MIB + lt.GIB,
                            "bound_includes_sessions": True, "rise_within_bound": s["budgets"]["rise_within_bound"]}
    assert s["rss"]["before_kib"] is not None and len(d["clients"]) == 4
    assert d["session_clicks_idle_ms"] and s["session_clicks"]["attempts"] >= 0
    assert not big_stub.sessions  # the burst's sessions and the clicker's were deleted


def test_big_mix_load_against_stub(big_stub, tmp_path, capsys):
    out = tmp_path / "load.json"
    url = f"http://127.0.0.1:{big_stub.server_address[1]}"
    zero = ["bad_image", "bad_params", "unknown_model", "unknown_session", "unknown_route", "wrong_method",
            "session_info", "session_delete"]
    args = ["--url", url, "--image", str(lt.SMALL_CT), "--duration", "1", "--clients", "2", "--no-expiry-wait",
            "--big-mix", "--big-mib", "1", "--baseline-n", "3", "--weight", "big_session=20", "--weight",
            "big_click=20", "--json", str(out)]
    for k in zero:
        args += ["--weight", f"{k}=0"]
    rc = lt.main(args)
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "session_create p50: unloaded" in text and "RESULT: PASS" in text
    d = json.loads(out.read_text())
    assert d["config"]["weights"]["big_session"] == 20 and d["big"]["shape"] == [512, 512, 2]
    assert len(d["session_create_unloaded_ms"]) == 3 and d["session_create_vs_unloaded"]["unloaded_n"] == 3
    k = d["kinds"]
    assert k["big_session"]["n"] + k["big_click"]["n"] > 0 and d["expected_503"] == big_stub.big_seen // 2
    assert d["retry_after_missing"] == 0 and not d["unexpected"]
    big = [u for u in big_stub.uploads if u[3] > _BigStub.BIG]
    assert big and all(u[3] == 512 * 512 * 2 * 2 + 352 for u in big)
    assert all(u[2] == ["params", "datapoint"] for u in big if u[0] == "POST")
