#!/usr/bin/env python3
"""Time the Deepgrow 2D network five ways on this machine, in one sitting (issue 5).

(a) ort: ONNX Runtime, CPUExecutionProvider, --threads intra-op threads, ORT_ENABLE_ALL;
(b) ov-f32: OpenVINO, CPU plugin, INFERENCE_PRECISION_HINT f32, INFERENCE_NUM_THREADS --threads,
    PERFORMANCE_HINT LATENCY, reading the same ONNX file; checked against (a)'s output (max abs diff must be
    <= --max-diff);
(c) ov: OpenVINO as (b) but with the CPU plugin's default inference precision (bf16 on CPUs with AMX or
    AVX-512-BF16, f32 elsewhere). The precision it used (compiled_model.get_property("INFERENCE_PRECISION_HINT"))
    is in the table and the JSON. Its diff against (a) is reported; it is held to --max-diff if it ran in f32,
    else only to the sanity bound --max-diff-reduced (default 1.0);
(d) torch: PyTorch CPU, torch.set_num_threads(--threads), MONAI's BasicUNet (tools/deepgrow_model.py) with the
    ONNX file's weights (read from its initializers with the onnx package), checked against (a)'s
    output (max abs diff must be <= --max-diff, default 1e-3);
(e) server: deepgrow-server over HTTP: it starts the release binary on a free port (or uses --url), records the
    time from spawn to the first 200 from /ready, the kernels it logs at start, idle RSS (VmRSS), RSS after
    creating a session with the CT (and a second one, then deleted), then times --runs clicks with the session
    and --runs clicks with an upload (wall time from the request's start to the reply's last byte) and reads the
    server's own stage latencies from each reply's params part.

(a)-(d) each run in a fresh subprocess of this script, one after the other; the server runs after them.
Each gets --warmup untimed runs, then --runs timed ones; the same seeded N(0,1) input goes to every engine.
With --rounds N the whole set is run N times in turn (ort, ov-f32, ov, torch, server, ort, ov-f32, ...), so
that drift on the machine hits every engine alike: the children are spawned afresh each round, the server is
started once and reused (each round repeats its warm-up clicks), and each engine's median is over the timed
runs of all rounds (the per-round medians are printed and kept in the JSON). The CPU model and its
AVX2 / AVX-512 / AMX flags are printed above the table and recorded.

    tools/.venv/bin/python tools/compare_engines.py                       # defaults: 2 threads, 2 + 11 runs
    tools/.venv/bin/python tools/compare_engines.py --runs 3 --warmup 1   # quick
    tools/.venv/bin/python tools/compare_engines.py --rounds 3 --runs 5   # interleaved, 15 timed runs each
    tools/.venv/bin/python tools/compare_engines.py --engines ort,ov-f32,ov --runs 3 --warmup 1   # no server
    tools/.venv/bin/python tools/compare_engines.py --engines server --url http://127.0.0.1:5000 --pid 1234
    tools/.venv/bin/python tools/compare_engines.py --json /tmp/engines.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
import loadtest as lt  # noqa: E402  (stdlib-only HTTP / multipart / process helpers)

REPO = TOOLS.parent
DEFAULT_ONNX = REPO / "models" / "deepgrow_2d" / "model.onnx"
MIB = 1024 * 1024
# The engines, in the order of a round; the first four run in child processes of this script.
ENGINES = ("ort", "ov-f32", "ov", "torch", "server")
CHILD_ENGINES = ENGINES[:4]
# /proc/cpuinfo flags that decide which kernels ORT, OpenVINO, torch and the server can use.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")

# --------------------------------------------------------------------------------------------------------------
# The ONNX model's initializers, Identity aliases and graph input/output shapes (read with the onnx package).
# --------------------------------------------------------------------------------------------------------------


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in value_info.type.tensor_type.shape.dim]


def read_onnx(data: bytes) -> dict:
    """{'initializers': {name: array}, 'aliases': {Identity output: initializer name}, 'inputs': [(name, dims)],
    'outputs': [(name, dims)]} of an ONNX ModelProto."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(data).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input and n.output}
    inputs = [(v.name, _dims(v)) for v in graph.input if v.name not in inits]
    outputs = [(v.name, _dims(v)) for v in graph.output]
    return {"initializers": inits, "aliases": aliases, "inputs": inputs, "outputs": outputs}


def onnx_state_dict(model: dict) -> dict:
    """The TorchScript exporter names initializers by their state-dict keys; deduplicated tensors reappear as
    Identity outputs carrying the key. Returns {key: numpy array}."""
    sd = dict(model["initializers"])
    for out, src in model["aliases"].items():
        if src in model["initializers"]:
            sd[out] = model["initializers"][src]
    return sd


# --------------------------------------------------------------------------------------------------------------
# Statistics and formatting (pure)
# --------------------------------------------------------------------------------------------------------------


def summarize(times_ms) -> dict:
    return {"median_ms": lt.median(times_ms), "min_ms": min(times_ms) if times_ms else None,
            "max_ms": max(times_ms) if times_ms else None, "n": len(times_ms), "runs_ms": list(times_ms)}


def ratio(x, ref):
    return None if x is None or not ref else x / ref


def format_table(rows, ref_median) -> str:
    """rows: [(label, summary dict)]; ratio column against ref_median. A row's "max_abs_diff_vs_ort" (if any)
    fills the "max|d| ORT" column."""
    w = max([28] + [len(label) for label, _ in rows])
    head = f"{'engine':<{w}} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'n':>3} {'max|d| ORT':>10} {'x ORT':>7}"
    lines = [head, "-" * len(head)]
    for label, s in rows:
        if not s or s.get("median_ms") is None:
            lines.append(f"{label:<{w}} {'-':>10} {'-':>9} {'-':>9} {'-':>3} {'-':>10} {'-':>7}")
            continue
        r = ratio(s["median_ms"], ref_median)
        d = s.get("max_abs_diff_vs_ort")
        lines.append(f"{label:<{w}} {s['median_ms']:>10.1f} {s['min_ms']:>9.1f} {s['max_ms']:>9.1f} {s['n']:>3} "
                     f"{'-' if d is None else f'{d:.2e}':>10} {'-' if r is None else f'{r:.2f}':>7}")
    return "\n".join(lines)


def schedule(engines, rounds: int) -> list:
    """[(round, engine)] in the order they run: every round runs the chosen engines in ENGINES order (ORT first,
    so that the others can be compared with its output), rounds one after the other."""
    chosen = [e for e in ENGINES if e in set(engines)]
    return [(r, e) for r in range(rounds) for e in chosen]


def pool_rounds(results) -> dict:
    """One engine's child results of all rounds (each with "times_ms"), as one: the first round's fields, the timed
    runs of all rounds pooled in times_ms and its summary, the per-round medians, setup times and wall times, the
    largest diffs against ORT and the largest peak RSS."""
    res = dict(results[0])
    res["times_ms"] = [t for r in results for t in r["times_ms"]]
    res.update(summarize(res["times_ms"]))
    res["rounds"] = len(results)
    res["round_medians_ms"] = [lt.median(r["times_ms"]) for r in results]
    res["round_setup_s"] = [r.get("setup_s") for r in results]
    res["round_process_s"] = [r.get("process_s") for r in results]
    for k in ("max_abs_diff_vs_ort", "mean_abs_diff_vs_ort", "mask_mismatch_vs_ort"):
        if k in res:
            vals = [r[k] for r in results if r.get(k) is not None]
            res[k] = max(vals) if vals else None
    hwm = [r["vm_hwm_kib"] for r in results if r.get("vm_hwm_kib") is not None]
    if hwm:
        res["vm_hwm_kib"] = max(hwm)
    return res


def ov_diff_limit(engine, precision, max_diff: float, max_diff_reduced: float) -> tuple:
    """(limit, its name) for an OpenVINO engine's max abs diff against ORT: --max-diff for ov-f32, and for ov when
    it ran in f32; the sanity bound --max-diff-reduced when ov ran in a reduced precision (bf16, f16)."""
    if engine == "ov-f32" or precision == "f32":
        return max_diff, "limit --max-diff"
    return max_diff_reduced, "sanity bound --max-diff-reduced"


def cpu_flags(cpuinfo_text: str, names=CPU_FLAGS) -> dict:
    """{flag: present} for names, from the first "flags" line of /proc/cpuinfo text (all False if none)."""
    for line in cpuinfo_text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return {n: n in have for n in names}
    return {n: False for n in names}


def read_cpu_flags() -> dict:
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return {n: None for n in CPU_FLAGS}


def format_flags(flags: dict) -> str:
    have = [n for n, v in flags.items() if v]
    lack = [n for n, v in flags.items() if v is False]
    return (" ".join(have) or "none of them") + (f" (no {' '.join(lack)})" if lack else "")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def server_kernels(log_text: str) -> list:
    """The kernels the server logged for each model at start ("kernels=Fast" in text logs, with or without ANSI
    colours, or "kernels":"Fast" in JSON logs), in log order."""
    text = _ANSI.sub("", log_text)
    return re.findall(r'(?:\bkernels=|"kernels"\s*:\s*")(\w+)', text)


# --------------------------------------------------------------------------------------------------------------
# Engine children (each in its own process)
# --------------------------------------------------------------------------------------------------------------


def compare_outputs(y, ref) -> dict:
    """An engine's logits against ORT's: max and mean abs diff, and the pixels whose mask (logit >= 0, i.e.
    sigmoid >= 0.5) differs, out of all."""
    import numpy as np

    d = np.abs(y.astype(np.float64) - ref.astype(np.float64))
    return {"max_abs_diff_vs_ort": float(d.max()), "mean_abs_diff_vs_ort": float(d.mean()),
            "mask_mismatch_vs_ort": int(np.count_nonzero((y >= 0) != (ref >= 0))), "mask_pixels": int(y.size)}


def make_input(shape, seed=0):
    import numpy as np

    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def child_ort(a) -> dict:
    import numpy as np
    import onnxruntime as ort

    x = make_input(a.shape)
    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(a.model), sess_options=so, providers=["CPUExecutionProvider"])
    setup = time.perf_counter() - t0
    feed = {a.input_name: x}
    for _ in range(a.warmup):
        sess.run([a.output_name], feed)
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        y = sess.run([a.output_name], feed)[0]
        times.append((time.perf_counter() - t0) * 1000)
    np.save(Path(a.io_dir) / "ort_out.npy", y)
    return {"engine": "onnxruntime", "version": ort.__version__, "providers": sess.get_providers(),
            "threads": a.threads, "setup_s": setup, "times_ms": times,
            "output_shape": list(y.shape), "output_range": [float(y.min()), float(y.max())]}


def child_torch(a) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    import deepgrow_model as dm

    x = make_input(a.shape)
    t0 = time.perf_counter()
    model = read_onnx(Path(a.model).read_bytes())
    sd = onnx_state_dict(model)
    net = dm.build_net()
    keys = list(net.state_dict().keys())
    missing = [k for k in keys if k not in sd]
    if missing:
        raise SystemExit(f"the ONNX file lacks {len(missing)} state-dict tensors, e.g. {missing[:5]}")
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(sd[k])) for k in keys}, strict=True)
    net.eval()
    setup = time.perf_counter() - t0
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        for _ in range(a.warmup):
            net(xt)
        times = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            y = net(xt)
            times.append((time.perf_counter() - t0) * 1000)
    y = y.numpy()
    ref = Path(a.io_dir) / "ort_out.npy"
    diff = float(np.abs(y - np.load(ref)).max()) if ref.exists() else None
    return {"engine": "torch", "version": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
            "setup_s": setup, "times_ms": times, "params": dm.count_params(net),
            "max_abs_diff_vs_ort": diff, "output_shape": list(y.shape)}


def _ov_prop(obj, name, *args):
    """A property of an OpenVINO Core (with a device name) or CompiledModel as a JSON-friendly value, None if the
    plugin does not have it."""
    try:
        v = obj.get_property(*args, name)
    except Exception:  # noqa: BLE001  (RuntimeError or a pybind error, depending on the version)
        return None
    if hasattr(v, "get_type_name"):  # openvino.Type: "f32", "bf16", "f16"
        return v.get_type_name()
    if isinstance(v, (list, tuple)):
        return [x if isinstance(x, (int, float, bool, str)) else str(x) for x in v]
    if isinstance(v, (int, float, bool, str)) or v is None:
        return v
    return str(v).split(".")[-1]  # enums: PerformanceMode.LATENCY -> LATENCY


def child_ov(a) -> dict:
    """OpenVINO's CPU plugin on the ONNX file: "ov-f32" forces f32 inference, "ov" keeps the plugin's default
    (bf16 where the CPU has AMX / AVX-512-BF16)."""
    import numpy as np
    import openvino as ov

    x = make_input(a.shape)
    t0 = time.perf_counter()
    core = ov.Core()
    model = core.read_model(str(a.model))
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": a.threads}
    if a.child == "ov-f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(model, "CPU", config)
    setup = time.perf_counter() - t0
    req = compiled.create_infer_request()
    feed = {a.input_name: x}
    for _ in range(a.warmup):
        req.infer(feed)
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        y = req.infer(feed)[compiled.output(a.output_name)]
        times.append((time.perf_counter() - t0) * 1000)
    y = np.array(y, dtype=np.float32, copy=True)
    ref = Path(a.io_dir) / "ort_out.npy"
    cmp = compare_outputs(y, np.load(ref)) if ref.exists() else {"max_abs_diff_vs_ort": None}
    props = {k: _ov_prop(compiled, k) for k in (
        "INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "NUM_STREAMS",
        "EXECUTION_MODE_HINT", "ENABLE_CPU_PINNING", "ENABLE_HYPER_THREADING", "SCHEDULING_CORE_TYPE",
        "EXECUTION_DEVICES")}
    return {"engine": "openvino", "version": ov.get_version(), "device": "CPU",
            "device_name": _ov_prop(core, "FULL_DEVICE_NAME", "CPU"),
            "capabilities": _ov_prop(core, "OPTIMIZATION_CAPABILITIES", "CPU"),
            "config": config, "compiled_properties": props, "precision": props["INFERENCE_PRECISION_HINT"],
            "threads": props["INFERENCE_NUM_THREADS"], "setup_s": setup, "times_ms": times, **cmp,
            "output_shape": list(y.shape), "output_range": [float(y.min()), float(y.max())]}


def child_main(a) -> int:
    res = {"ort": child_ort, "ov-f32": child_ov, "ov": child_ov, "torch": child_torch}[a.child](a)
    res["vm_hwm_kib"] = lt.proc_status_kib(os.getpid(), "VmHWM")
    res["vm_rss_kib"] = lt.proc_status_kib(os.getpid(), "VmRSS")
    res["python"] = platform.python_version()
    (Path(a.io_dir) / f"{a.child}.json").write_text(json.dumps(res))
    return 0


def run_child(engine, args, io_dir, shape, in_name, out_name, label="") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--model", str(args.model),
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--runs", str(args.runs),
           "--io-dir", str(io_dir), "--shape", ",".join(str(s) for s in shape),
           "--input-name", in_name, "--output-name", out_name]
    print(f"[{engine}{label}] {args.warmup} warm-up + {args.runs} runs, {args.threads} threads ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} child failed with exit code {proc.returncode}")
    res = json.loads((Path(io_dir) / f"{engine}.json").read_text())
    res["process_s"] = time.perf_counter() - t0
    res.update(summarize(res["times_ms"]))
    return res


# --------------------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------------------


def timed(host, port, method, path, body=None, headers=None, timeout=600):
    t0 = time.perf_counter()
    status, hdrs, data = lt.http_request(host, port, method, path, body, headers, timeout=timeout)
    return status, hdrs, data, (time.perf_counter() - t0) * 1000


class ServerBench:
    """The server engine. The first round() starts the server (unless --url), waits for /ready, reads the kernels
    from its log and the idle RSS, creates two sessions (deleting the second); every round() then times the
    session clicks and the upload clicks (each after its warm-up); finish() pools the rounds, reads RSS and stops
    the server. Started once, reused by every round."""

    def __init__(self, args):
        self.args = args
        self.image = args.image.read_bytes()
        shape = lt.nifti_shape(self.image)
        click = tuple(int(v) for v in args.click.split(",")) if args.click else lt.default_click(args.image, shape)
        bg = [min(click[0] + 40, shape[0] - 1), max(click[1] - 40, 0), click[2]]
        self.params = json.dumps({"foreground": [list(click)], "background": [bg]})
        self.res = {"image": str(args.image), "shape": list(shape), "click": list(click),
                    "params": json.loads(self.params)}
        self.server = None
        self.started = False
        self.series = None
        self.rounds = {"session": [], "upload": []}  # per round: (walls, lats, mask_bytes, reply params)

    def start(self):
        args, res = self.args, self.res
        self.started = True
        if args.url:
            self.host, self.port = lt.parse_url(args.url)
            self.pid = args.pid
        else:
            extra = ["--inference-threads", str(args.threads), *args.server_arg]
            env = dict(kv.split("=", 1) for kv in args.server_env)
            self.server = lt.ServerProcess(args.binary, args.models_dir, extra_args=extra, env=env)
            self.host, self.port = self.server.host, self.server.port
            res["server_cmd"] = self.server.cmd
            res["server_env"] = env
            res["server_version"] = lt.server_version(args.binary)
            print(f"[server] {' '.join(self.server.cmd)}  (log {self.server.log_path})", flush=True)
            self.server.start()
            self.pid = self.server.pid
        host, port, pid = self.host, self.port, self.pid
        if self.server:
            res["ready_s"] = self.server.wait_ready()
            try:
                res["kernels"] = server_kernels(self.server.log_path.read_text(errors="replace"))
            except OSError:
                res["kernels"] = []
        res["rss_idle_kib"] = lt.proc_status_kib(pid) if pid else None

        sess_ct, sess_body = lt.encode_multipart(files=[("image", args.image.name, self.image)])
        sids, rss_after, create_ms = [], [], []
        for _ in range(2):
            st, _, data, ms = timed(host, port, "PUT", "/session/?expiry=3600", sess_body,
                                    {"Content-Type": sess_ct})
            if st != 200:
                raise SystemExit(f"session create answered {st}: {data[:300]!r}")
            sids.append(json.loads(data)["session_id"])
            create_ms.append(ms)
            time.sleep(0.2)
            rss_after.append(lt.proc_status_kib(pid) if pid else None)
        h = json.loads(lt.http_request(host, port, "GET", "/health")[2])
        res["session_bytes_each"] = h.get("session_bytes", 0) / max(h.get("sessions", 1), 1)
        st, _, data = lt.http_request(host, port, "DELETE", f"/session/{sids[1]}")
        if st != 200:
            print(f"[server] warning: DELETE /session/{sids[1]} answered {st}: {data[:200]!r}")
        res["session_create_ms"] = create_ms
        res["rss_after_session_kib"] = rss_after
        sid = sids[0]

        click_ct, click_body = lt.encode_multipart([("params", self.params)])
        up_ct, up_body = lt.encode_multipart([("params", self.params)],
                                             [("datapoint", args.image.name, self.image)])
        self.series = {
            "session": ("POST", f"/v1/deepgrow?model={args.model_name}&session_id={sid}", click_body, click_ct,
                        args.warmup),
            "upload": ("POST", f"/v1/deepgrow?model={args.model_name}", up_body, up_ct, min(args.warmup, 1)),
        }

    def round(self, label=""):
        if not self.started:
            self.start()
        args = self.args
        for name, (method, path, body, ct, warm) in self.series.items():
            print(f"[server{label}] click with {name}: {warm} warm-up + {args.runs} runs ...", flush=True)
            walls, lats = [], []
            for n in range(warm + args.runs):
                st, hdrs, data, ms = timed(self.host, self.port, method, path, body, {"Content-Type": ct})
                if st != 200:
                    raise SystemExit(f"click ({name}) answered {st}: {data[:300]!r}")
                p, mask_bytes = lt.click_reply_params(hdrs.get("content-type", ""), data)
                if n >= warm:
                    walls.append(ms)
                    lats.append(p.get("latencies", {}))
            self.rounds[name].append((walls, lats, mask_bytes, {k: v for k, v in p.items() if k != "latencies"}))

    def finish(self) -> dict:
        res = self.res
        for name, rounds in self.rounds.items():
            if not rounds:
                continue
            walls = [w for r in rounds for w in r[0]]
            lats = [l for r in rounds for l in r[1]]
            s = summarize(walls)
            s["latencies_ms"] = lats
            s["latencies_median_ms"] = {k: lt.median([l[k] for l in lats if isinstance(l.get(k), (int, float))])
                                        for k in ("wait", "decode", "pre", "infer", "post", "write", "total")}
            s["mask_bytes"] = rounds[-1][2]
            s["reply_params_example"] = rounds[-1][3]
            s["rounds"] = len(rounds)
            s["round_medians_ms"] = [lt.median(r[0]) for r in rounds]
            res["click_" + name] = s
        if self.started:
            res["rss_after_clicks_kib"] = lt.proc_status_kib(self.pid) if self.pid else None
            res["vm_hwm_kib"] = lt.proc_status_kib(self.pid, "VmHWM") if self.pid else None
        self.stop()
        return res

    def stop(self):
        if self.server:
            self.server.stop()


def run_server(args) -> dict:
    """One round of the server engine: start, time, stop."""
    bench = ServerBench(args)
    try:
        bench.round()
        return bench.finish()
    finally:
        bench.stop()


# --------------------------------------------------------------------------------------------------------------


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_ONNX)
    ap.add_argument("--threads", type=int, default=2, help="intra-op / torch / server inference threads (default 2)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=11, help="timed runs per engine and round (default 11)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole set of engines this many times in turn, pooling each engine's timed runs "
                         "(default 1)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated subset of {','.join(ENGINES)} (default all; they always run in this "
                         "order within a round)")
    ap.add_argument("--max-diff", type=float, default=1e-3,
                    help="torch / ov-f32 (and ov, if it ran in f32) vs ORT tolerance (default 1e-3)")
    ap.add_argument("--max-diff-reduced", type=float, default=1.0,
                    help="sanity bound for ov when it runs in a reduced precision such as bf16 (default 1.0); "
                         "its diff is reported, not held to --max-diff")
    ap.add_argument("--binary", type=Path, default=lt.DEFAULT_BINARY)
    ap.add_argument("--models-dir", type=Path, default=lt.DEFAULT_MODELS)
    ap.add_argument("--model-name", default=lt.MODEL)
    ap.add_argument("--url", help="use a running server instead of starting one")
    ap.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS")
    ap.add_argument("--image", type=Path, default=lt.FULL_CT)
    ap.add_argument("--click", help="foreground click i,j,k (default: a liver voxel of the known CTs)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra server argument (repeatable)")
    ap.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    ap.add_argument("--json", type=Path, help="write everything as JSON here")
    # internal: child mode
    ap.add_argument("--child", choices=CHILD_ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--io-dir", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--input-name", default="image", help=argparse.SUPPRESS)
    ap.add_argument("--output-name", default="pred", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        args.shape = tuple(int(v) for v in args.shape.split(","))
        return child_main(args)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = set(engines) - set(ENGINES)
    if bad:
        raise SystemExit(f"unknown engines {sorted(bad)}")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    load_start = os.getloadavg()
    flags = read_cpu_flags()
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if v is not None},
           "cpu": lt.cpu_model(), "cpu_flags": flags, "cores": os.cpu_count(), "python": platform.python_version(),
           "git": git_rev(), "loadavg_start": load_start, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)

    plan = schedule(engines, args.rounds)
    out["schedule"] = [f"{r + 1}:{e}" for r, e in plan]
    if any(e in CHILD_ENGINES for e in engines):
        model = read_onnx(args.model.read_bytes())
        (in_name, in_dims), (out_name, _) = model["inputs"][0], model["outputs"][0]
        if not all(isinstance(d, int) and d > 0 for d in in_dims):
            raise SystemExit(f"model input {in_name} has a non-fixed shape {in_dims}")
        out["model"] = {"path": str(args.model), "input": [in_name, in_dims], "output": out_name,
                        "initializers": len(model["initializers"])}
        del model
    bench = ServerBench(args) if "server" in engines else None
    child_rounds = {e: [] for e in CHILD_ENGINES}
    try:
        with tempfile.TemporaryDirectory(prefix="compare_engines-") as io_dir:
            for r, e in plan:
                label = f" round {r + 1}/{args.rounds}" if args.rounds > 1 else ""
                if e == "server":
                    bench.round(label)
                else:
                    child_rounds[e].append(run_child(e, args, io_dir, in_dims, in_name, out_name, label))
        for e, results in child_rounds.items():
            if results:
                out[e] = pool_rounds(results)
        if bench:
            out["server"] = bench.finish()
    finally:
        if bench:
            bench.stop()
    out["loadavg_end"] = os.getloadavg()

    # ---- report
    ort_r, pt, srv = out.get("ort"), out.get("torch"), out.get("server")
    ovf, ovd = out.get("ov-f32"), out.get("ov")
    ref = ort_r["median_ms"] if ort_r else None
    rows = [(f"ORT ({args.threads} threads)", ort_r),
            (f"OpenVINO f32 ({args.threads} threads)", ovf),
            (f"OpenVINO default{'=' + str(ovd['precision']) if ovd else ''} ({args.threads} threads)", ovd),
            (f"PyTorch ({args.threads} threads)", pt)]
    if srv:
        rows += [("server click (session)", srv.get("click_session")),
                 ("server click (upload)", srv.get("click_upload"))]
    print()
    print(f"CPU: {out['cpu']}, {out['cores']} cores; flags: {format_flags(flags)}")
    if srv and srv.get("kernels") is not None:
        print(f"server kernels: {', '.join(srv['kernels']) or 'not found in its log'}")
    if args.rounds > 1:
        print(f"{args.rounds} interleaved rounds of {', '.join(e for e in ENGINES if e in engines)}; "
              f"{args.runs} timed runs per engine and round, pooled")
    print(format_table(rows, ref))
    if args.rounds > 1:
        per = [(lbl, r.get("round_medians_ms")) for lbl, r in rows if r and r.get("round_medians_ms")]
        for lbl, meds in per:
            print(f"per-round medians, {lbl}: {' / '.join(f'{m:.1f}' for m in meds)} ms")
    failed = False
    if srv:
        for name in ("session", "upload"):
            lm = srv[f"click_{name}"]["latencies_median_ms"]
            print(f"server latencies, click with {name} (median ms): " +
                  " / ".join(f"{k} {lt.fmt_ms(lm.get(k))}" for k in ("wait", "decode", "pre", "infer", "post", "write",
                                                                     "total")))
        cs = srv["click_session"]
        lm = cs["latencies_median_ms"]
        pp = [l["pre"] + l["post"] for l in cs["latencies_ms"]]
        srv["pre_post_pct_of_session_click"] = 100 * lt.median(pp) / cs["median_ms"]
        srv["infer_pct_of_session_click"] = 100 * lm["infer"] / cs["median_ms"]
        print(f"pre+post: {lt.median(pp):.2f} ms = {srv['pre_post_pct_of_session_click']:.2f} % of the session "
              f"click ({cs['median_ms']:.1f} ms); infer {lm['infer']:.1f} ms = "
              f"{srv['infer_pct_of_session_click']:.1f} %; server infer / ORT median: "
              f"{'-' if ref is None else format(lm['infer'] / ref, '.2f') + 'x'}")
        if srv.get("ready_s") is not None:
            print(f"server ready {srv['ready_s']:.2f} s after spawn")
        idle, after = srv.get("rss_idle_kib"), srv.get("rss_after_session_kib") or [None, None]
        print(f"server RSS idle {lt.fmt_mib(idle)}; after 1 session {lt.fmt_mib(after[0])}, after 2 "
              f"{lt.fmt_mib(after[1])}; per session +{lt.fmt_mib(after[0] - idle) if idle and after[0] else '-'} "
              f"(first), +{lt.fmt_mib(after[1] - after[0]) if after[0] and after[1] else '-'} (second); volume "
              f"{srv['session_bytes_each'] / MIB:.1f} MiB per session; after the clicks "
              f"{lt.fmt_mib(srv.get('rss_after_clicks_kib'))} (VmHWM {lt.fmt_mib(srv.get('vm_hwm_kib'))})")
        print(f"session create (upload + decode): {' / '.join(f'{v:.0f}' for v in srv['session_create_ms'])} ms; "
              f"image {Path(srv['image']).name} {srv['shape']}, click {srv['click']}")
    for label, r in (("ORT", ort_r), ("OpenVINO f32", ovf), ("OpenVINO default", ovd), ("PyTorch", pt)):
        if r:
            print(f"{label}: setup {r['setup_s']:.2f} s, process peak RSS {lt.fmt_mib(r['vm_hwm_kib'])}")
    for label, r in (("OpenVINO f32", ovf), ("OpenVINO default", ovd)):
        if r:
            cp = r.get("compiled_properties") or {}
            print(f"{label}: precision {r['precision']}, {cp.get('INFERENCE_NUM_THREADS')} threads, "
                  f"{cp.get('NUM_STREAMS')} stream(s), hint {cp.get('PERFORMANCE_HINT')}, "
                  f"CPU capabilities {' '.join(r.get('capabilities') or []) or '-'}")
    for label, e, r in (("OpenVINO f32", "ov-f32", ovf), ("OpenVINO default", "ov", ovd)):
        if r and r.get("max_abs_diff_vs_ort") is not None:
            limit, what = ov_diff_limit(e, r.get("precision"), args.max_diff, args.max_diff_reduced)
            ok = r["max_abs_diff_vs_ort"] <= limit
            failed |= not ok
            print(f"{label} ({r['precision']}) vs ORT output: max abs diff {r['max_abs_diff_vs_ort']:.2e} "
                  f"({'OK' if ok else 'FAIL'}, {what} {limit:g}), mean {r['mean_abs_diff_vs_ort']:.2e}; mask "
                  f"(logit >= 0) differs in {r['mask_mismatch_vs_ort']} of {r['mask_pixels']} pixels")
    if pt and pt.get("max_abs_diff_vs_ort") is not None:
        ok = pt["max_abs_diff_vs_ort"] <= args.max_diff
        failed |= not ok
        print(f"PyTorch vs ORT output: max abs diff {pt['max_abs_diff_vs_ort']:.2e} "
              f"({'OK' if ok else 'FAIL'}, limit {args.max_diff:g}); {pt['params']:,} params")
    versions = [f"python {out['python']}"]
    if pt:
        versions.append(f"torch {pt['version']}")
    if ort_r:
        versions.append(f"onnxruntime {ort_r['version']}")
    if ovf or ovd:
        versions.append(f"openvino {(ovf or ovd)['version']}")
    if srv and srv.get("server_version"):
        versions.append(srv["server_version"])
    print("versions: " + ", ".join(versions) + f"; git {out['git']}")
    print(f"CPU: {out['cpu']}, {out['cores']} cores; threads: {args.threads} "
          f"(torch reports {pt['threads'] if pt else '-'}); load average start {load_start[0]:.2f}, "
          f"end {out['loadavg_end'][0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
