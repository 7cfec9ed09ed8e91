#!/usr/bin/env python3
"""Load test for deepgrow-server (issue 6). Standard library only.

It starts the release binary on a free port with a short session expiry (or drives a running server given with
--url, and --pid for RSS), then runs N concurrent clients over loopback for --duration seconds. Each client
has its own connections (even-numbered clients keep one keep-alive connection, odd-numbered clients open a new
connection per request, as the AIAA Python client does) and picks request kinds at random from this mix:

    session_create   PUT /session/ with the CT                            -> 200
    click_session    POST /v1/deepgrow?session_id=<own session>           -> 200 (440 only once the session aged out)
    click_upload     POST /v1/deepgrow with the CT as 'datapoint'         -> 200
    session_info     GET /session/<own session>                           -> 200 (440 as above)
    session_delete   DELETE /session/<own session>                        -> 200
    models           GET /v1/models                                       -> 200
    health           GET /health                                          -> 200
    bad_image        garbage bytes as the image (click or session)        -> 422
    bad_params       malformed params JSON                                -> 400
    unknown_model    ?model=no_such_model, GET /v1/models?model=...       -> 404
    unknown_session  random session id (click, GET, DELETE)               -> 440
    unknown_route    GET /v2/..., POST /v1/nothing                        -> 404
    wrong_method     GET /v1/deepgrow, DELETE /v1/models, POST /health    -> 405

It reports throughput, p50/p95/p99 latency per kind, counts per status code, connection errors, dropped
connections and unexpected statuses (including error bodies that are not the AIAA error JSON and 200 click
replies without a params part and a mask file), and the server's RSS: baseline before the load, peak during it,
at its end, and after every session has expired (the server sweeps every 30 s; /health is polled until it
reports sessions == 0, then RSS is read after a short pause). It exits 1 if any 5xx, connection error, dropped
connection or unexpected status occurred, or if the server died.

    python3 tools/loadtest.py                                   # 8 clients, 60 s, the 512x512x20 CT
    python3 tools/loadtest.py --small --duration 15             # quick run with the 122x101x30 fixture
    python3 tools/loadtest.py --url http://127.0.0.1:5000 --pid 1234 --session-expiry 3600
    python3 tools/loadtest.py --server-env MALLOC_ARENA_MAX=2 --json /tmp/load.json

compare_engines.py imports the HTTP, multipart, NIfTI-header and process helpers from this file.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import io
import json
import math
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BINARY = REPO / "target" / "release" / "deepgrow-server"
DEFAULT_MODELS = REPO / "models"
FULL_CT = Path("/work/shared/data/ct_labeled/imagesTr/totalseg_example_ct_dicom.nii.gz")
SMALL_CT = REPO / "tests" / "fixtures" / "ct" / "totalseg_example_ct_sm.nii.gz"
MODEL = "deepgrow_2d"
BOUNDARY = "----------deepgrowBenchBoundary7Mq2"

# A liver voxel (label 5 of the TotalSegmentator label map) for the known test volumes; others get the centre.
KNOWN_CLICKS = {
    "totalseg_example_ct_dicom.nii.gz": (177, 232, 10),
    "totalseg_example_ct_sm.nii.gz": (81, 59, 15),
}

MIB = 1024 * 1024

# --------------------------------------------------------------------------------------------------------------
# Pure helpers (tested in tools/tests/test_bench_tools.py)
# --------------------------------------------------------------------------------------------------------------


def encode_multipart(fields=(), files=(), boundary: str = BOUNDARY) -> tuple[str, bytes]:
    """multipart/form-data body as the AIAA Python client frames it: text fields first, then files, CRLF lines.

    fields: (name, str value); files: (name, filename, bytes). Returns (content_type, body)."""
    crlf = b"\r\n"
    out = []
    for name, value in fields:
        out += [
            b"--" + boundary.encode(),
            f'Content-Disposition: form-data; name="{name}"'.encode(),
            b"",
            value.encode("utf-8") if isinstance(value, str) else bytes(value),
        ]
    for name, filename, data in files:
        out += [
            b"--" + boundary.encode(),
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'.encode(),
            b"Content-Type: application/octet-stream",
            b"",
            bytes(data),
        ]
    out += [b"--" + boundary.encode() + b"--", b""]
    return f"multipart/form-data; boundary={boundary}", crlf.join(out)


def boundary_of(content_type: str) -> str | None:
    m = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type or "", re.I)
    return (m.group(1) or m.group(2)) if m else None


def parse_multipart(content_type: str, body: bytes) -> list[dict]:
    """Split a multipart body into parts: {'name', 'filename', 'headers', 'data'}. Raises ValueError if malformed."""
    b = boundary_of(content_type)
    if not b:
        raise ValueError(f"no boundary in content type {content_type!r}")
    delim = b"--" + b.encode()
    if not body.startswith(delim):
        raise ValueError("body does not start with the boundary")
    segments = (b"\r\n" + body).split(b"\r\n" + delim)
    parts = []
    closed = False
    for seg in segments[1:]:
        if seg.startswith(b"--"):
            closed = True
            break
        if not seg.startswith(b"\r\n"):
            raise ValueError("boundary line not followed by CRLF")
        head, sep, data = seg[2:].partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("part without a header/body separator")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        disp = headers.get("content-disposition", "")
        name = re.search(r'\bname="([^"]*)"', disp)
        filename = re.search(r'\bfilename="([^"]*)"', disp)
        parts.append({
            "name": name.group(1) if name else None,
            "filename": filename.group(1) if filename else None,
            "headers": headers,
            "data": data,
        })
    if not closed:
        raise ValueError("no closing boundary")
    return parts


def click_reply_params(content_type: str, body: bytes) -> tuple[dict, int]:
    """(params JSON, mask byte count) of a deepgrow multipart reply; ValueError if either part is missing."""
    parts = parse_multipart(content_type, body)
    params = [p for p in parts if p["filename"] is None and p["name"] == "params"]
    files = [p for p in parts if p["filename"] is not None]
    if len(params) != 1 or len(files) != 1:
        raise ValueError(f"expected one params part and one file part, got {[(p['name'], p['filename']) for p in parts]}")
    if not files[0]["data"]:
        raise ValueError("empty mask file part")
    return json.loads(params[0]["data"].decode("utf-8")), len(files[0]["data"])


def is_aiaa_error(body: bytes) -> bool:
    """True if body is {"error": {"message": [str...], "type": str}, "success": false}."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    err = obj.get("error") if isinstance(obj, dict) else None
    return (
        isinstance(err, dict)
        and isinstance(err.get("message"), list)
        and all(isinstance(m, str) for m in err["message"])
        and isinstance(err.get("type"), str)
        and obj.get("success") is False
    )


def nifti_shape(data: bytes) -> tuple[int, ...]:
    """Spatial shape of a NIfTI-1 file (.nii or .nii.gz bytes), read from the header's dim field."""
    if data[:2] == b"\x1f\x8b":
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            head = f.read(348)
    else:
        head = data[:348]
    if len(head) < 348:
        raise ValueError("shorter than a NIfTI-1 header")
    for order in "<>":
        if struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            return tuple(int(d) for d in dims[1:1 + dims[0]])
    raise ValueError("not a NIfTI-1 header (sizeof_hdr != 348)")


def default_click(path: Path, shape) -> tuple[int, int, int]:
    """A foreground click: the liver voxel for the known test volumes, else the centre of the volume."""
    if Path(path).name in KNOWN_CLICKS:
        return KNOWN_CLICKS[Path(path).name]
    return tuple(int(s) // 2 for s in shape[:3])


def percentile(values, q: float):
    """q-th percentile with linear interpolation (numpy's default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values):
    return percentile(values, 50)


def parse_url(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if u.scheme != "http":
        raise ValueError("only http:// URLs are supported")
    return u.hostname or "127.0.0.1", u.port or 80


def proc_status_kib(pid: int, field: str = "VmRSS") -> int | None:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, ...), or None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt_mib(kib) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


# --------------------------------------------------------------------------------------------------------------
# HTTP and the server process
# --------------------------------------------------------------------------------------------------------------


def http_request(host, port, method, path, body=None, headers=None, timeout=300.0, conn=None):
    """One request; returns (status, headers with lower-case names, body). A new connection unless conn is given."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        if own:
            conn.close()


class ServerProcess:
    """The release binary on a free loopback port; output goes to a log file."""

    def __init__(self, binary=DEFAULT_BINARY, models_dir=DEFAULT_MODELS, port=None, extra_args=(), env=None,
                 log_path=None):
        self.binary = str(binary)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.cmd = [self.binary, "--host", self.host, "--port", str(self.port), "--models-dir", str(models_dir),
                    *[str(a) for a in extra_args]]
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.env_extra = dict(env or {})
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="deepgrow-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.proc = None
        self.t_spawn = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def start(self):
        if not Path(self.binary).exists():
            raise SystemExit(f"server binary not found: {self.binary} (cargo build --release)")
        self._log = open(self.log_path, "wb")
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(REPO))
        return self

    def wait_ready(self, timeout=180.0) -> float:
        """Seconds from spawn to the first 200 from /ready."""
        deadline = self.t_spawn + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            try:
                status, _, _ = http_request(self.host, self.port, "GET", "/ready", timeout=2.0)
                if status == 200:
                    return time.perf_counter() - self.t_spawn
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n=30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()


def parse_smaps(text: str) -> dict:
    """RSS (kB) of /proc/PID/smaps text by kind: glibc's main heap ([heap]), secondary malloc arena heaps
    (anonymous rw mappings that start on a 64 MiB boundary, <= 64 MiB), other anonymous mappings (large mmap'd
    allocations, thread stacks), file-backed mappings; plus the number of arena heaps (an arena may chain several)."""
    out = {"heap": 0, "arena_heaps": 0, "anon_other": 0, "file": 0, "stack": 0, "arena_heap_count": 0}
    current = None
    for line in text.splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            name = head[5] if len(head) >= 6 else ""
            if name == "[heap]":
                current = "heap"
            elif name.startswith("[stack"):
                current = "stack"
            elif name.startswith("/") or (name and not name.startswith("[")):
                current = "file"
            elif name:
                current = "anon_other"
            elif lo % (64 * MIB) == 0 and hi - lo <= 64 * MIB and head[1].startswith("rw"):
                current = "arena_heaps"
                out["arena_heap_count"] += 1
            else:
                current = "anon_other"
        elif line.startswith("Rss:") and current:
            out[current] += int(line.split()[1])
    return out


def summarize_smaps(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/smaps") as f:
            return parse_smaps(f.read())
    except OSError:
        return None


def server_version(binary) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_levels(log_path: Path) -> tuple[Counter, list[str]]:
    """Counts of log levels in a --log-format json log, and the WARN/ERROR lines."""
    counts, bad = Counter(), []
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return counts, bad
    for line in lines:
        try:
            level = json.loads(line).get("level", "?")
        except ValueError:
            level = "non-json"
        counts[level] += 1
        if level in ("WARN", "ERROR", "non-json"):
            bad.append(line)
    return counts, bad


# --------------------------------------------------------------------------------------------------------------
# The load
# --------------------------------------------------------------------------------------------------------------

WEIGHTS = {
    "session_create": 5,
    "click_session": 30,
    "click_upload": 10,
    "session_info": 3,
    "session_delete": 1,
    "models": 8,
    "health": 8,
    "bad_image": 4,
    "bad_params": 4,
    "unknown_model": 3,
    "unknown_session": 4,
    "unknown_route": 3,
    "wrong_method": 3,
}
EXPECTED = {
    "session_create": {200},
    "click_session": {200},
    "click_upload": {200},
    "session_info": {200},
    "session_delete": {200},
    "models": {200},
    "health": {200},
    "bad_image": {422},
    "bad_params": {400},
    "unknown_model": {404},
    "unknown_session": {440},
    "unknown_route": {404},
    "wrong_method": {405},
}
BAD_PARAMS = ['{"foreground": [[1, 2, 3]]', "not json at all", '{"foreground": [[1,2,3]],}', "{'foreground': []}"]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency = defaultdict(list)  # kind -> seconds
        self.status = defaultdict(Counter)  # kind -> status -> n
        self.errors = Counter()  # (category, kind, exception name) -> n
        self.unexpected = []  # dicts
        self.expired_440 = 0
        self.server_latencies = defaultdict(lambda: defaultdict(list))  # kind -> stage -> ms
        self.retry_after_missing = 0

    def add(self, kind, status, seconds):
        with self.lock:
            self.latency[kind].append(seconds)
            self.status[kind][status] += 1

    def error(self, category, kind, exc):
        with self.lock:
            self.errors[(category, kind, type(exc).__name__ + (f": {exc}" if str(exc) else ""))] += 1

    def bad(self, kind, status, why, body=b"", path=""):
        with self.lock:
            self.unexpected.append({"kind": kind, "status": status, "why": why, "path": path,
                                    "body": body[:300].decode("utf-8", "replace")})


class Client(threading.Thread):
    def __init__(self, idx, cfg, stats, stop_at, rng_seed):
        super().__init__(name=f"client-{idx}", daemon=True)
        self.idx = idx
        self.cfg = cfg
        self.stats = stats
        self.stop_at = stop_at
        self.rng = random.Random(rng_seed)
        self.keep_alive = idx % 2 == 0
        self.conn = None
        self.conn_used = False
        self.sessions = {}  # id -> perf_counter at the start of the last request that used it
        kinds = [k for k in WEIGHTS if cfg["weights"].get(k, 0) > 0]
        self.kinds = kinds
        self.weights = [cfg["weights"][k] for k in kinds]

    # ---- connection handling
    def _conn(self):
        if not self.keep_alive:
            self.conn_used = False
            return http.client.HTTPConnection(self.cfg["host"], self.cfg["port"], timeout=self.cfg["timeout"])
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.cfg["host"], self.cfg["port"], timeout=self.cfg["timeout"])
            self.conn_used = False
        return self.conn

    def _drop_conn(self, conn):
        try:
            conn.close()
        except OSError:
            pass
        if self.keep_alive:
            self.conn = None

    def request(self, kind, method, path, body=None, headers=None):
        """Returns (status, headers, body, t_start) or None after a transport error (recorded)."""
        conn = self._conn()
        reused = self.keep_alive and self.conn_used
        t0 = time.perf_counter()
        phase = "connect"
        try:
            if conn.sock is None:
                conn.connect()
            phase = "request"
            conn.request(method, path, body=body, headers=headers or {})
            phase = "response"
            resp = conn.getresponse()
            data = resp.read()
            t1 = time.perf_counter()
        except (socket.timeout, TimeoutError) as e:
            self.stats.error("timeout", kind, e)
            self._drop_conn(conn)
            return None
        except (OSError, http.client.HTTPException) as e:
            if phase == "connect":
                self.stats.error("connection_error", kind, e)
            else:
                self.stats.error("dropped_reused_conn" if reused else "dropped_connection", kind, e)
            self._drop_conn(conn)
            return None
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        if self.keep_alive:
            self.conn_used = True
            if resp.will_close:
                self._drop_conn(conn)
        else:
            conn.close()
        self.stats.add(kind, resp.status, t1 - t0)
        if resp.status >= 500:
            self.stats.bad(kind, resp.status, "5xx", data, path)
            if resp.status == 503 and "retry-after" not in hdrs:
                with self.stats.lock:
                    self.stats.retry_after_missing += 1
        return resp.status, hdrs, data, t0

    # ---- helpers
    def check(self, kind, res, path, allow_expired_since=None):
        """Judge a reply against EXPECTED[kind]; 440 is accepted for an own session whose last use is old enough."""
        if res is None:
            return None
        status, hdrs, data, _ = res
        if status >= 500:
            return status  # already recorded
        if status in EXPECTED[kind]:
            if status >= 400 and not is_aiaa_error(data):
                self.stats.bad(kind, status, "error body is not the AIAA error JSON", data, path)
            return status
        if status == 440 and allow_expired_since is not None:
            age = time.perf_counter() - allow_expired_since
            if age > self.cfg["session_expiry"] - 1.0:
                with self.stats.lock:
                    self.stats.expired_440 += 1
                return status
            self.stats.bad(kind, status, f"440 for a session last used {age:.1f} s ago (expiry "
                                         f"{self.cfg['session_expiry']} s)", data, path)
            return status
        self.stats.bad(kind, status, f"expected {sorted(EXPECTED[kind])}", data, path)
        return status

    def live_session(self):
        now = time.perf_counter()
        limit = self.cfg["session_expiry"] * 0.6
        for sid, t in list(self.sessions.items()):
            if now - t > self.cfg["session_expiry"] + 5:
                del self.sessions[sid]
        live = [sid for sid, t in self.sessions.items() if now - t < limit]
        return self.rng.choice(live) if live else None

    def click_params(self):
        i, j, k = self.cfg["click"]
        sh = self.cfg["shape"]
        i = min(max(i + self.rng.randint(-5, 5), 0), sh[0] - 1)
        j = min(max(j + self.rng.randint(-5, 5), 0), sh[1] - 1)
        fg = [[i, j, k]]
        bg = [[min(max(i + 40, 0), sh[0] - 1), min(max(j - 40, 0), sh[1] - 1), k]] if self.rng.random() < 0.5 else []
        return json.dumps({"foreground": fg, "background": bg})

    def mp(self, fields=(), files=()):
        ct, body = encode_multipart(fields, files)
        return body, {"Content-Type": ct}

    # ---- request kinds
    def do_session_create(self):
        q = self.rng.choice(["", "?expiry=0", f"?expiry={self.cfg['session_expiry']}"])
        path = "/session/" + q
        res = self.request("session_create", "PUT", path, self.cfg["session_body"], self.cfg["session_headers"])
        if self.check("session_create", res, path) == 200:
            try:
                sid = json.loads(res[2])["session_id"]
                self.sessions[sid] = res[3]
            except (ValueError, KeyError, TypeError):
                self.stats.bad("session_create", 200, "no session_id in the reply", res[2], path)

    def _click_ok(self, kind, res, path):
        status = res[0] if res else None
        if status == 200:
            try:
                params, _ = click_reply_params(res[1].get("content-type", ""), res[2])
                lat = params.get("latencies", {})
                with self.stats.lock:
                    for stage in ("decode", "pre", "infer", "post", "write", "total"):
                        if isinstance(lat.get(stage), (int, float)):
                            self.stats.server_latencies[kind][stage].append(float(lat[stage]))
            except ValueError as e:
                self.stats.bad(kind, 200, f"malformed click reply: {e}", res[2][:200], path)

    def do_click_session(self):
        sid = self.live_session()
        if sid is None:
            return self.do_session_create()
        path = f"/v1/deepgrow?model={MODEL}&session_id={sid}"
        body, headers = self.mp([("params", self.click_params())])
        last = self.sessions[sid]
        res = self.request("click_session", "POST", path, body, headers)
        status = self.check("click_session", res, path, allow_expired_since=last)
        if status == 200:
            self.sessions[sid] = res[3]
            self._click_ok("click_session", res, path)
        elif status == 440:
            self.sessions.pop(sid, None)

    def do_click_upload(self):
        path = f"/v1/deepgrow?model={MODEL}"
        body, headers = self.mp([("params", self.click_params())],
                                [("datapoint", self.cfg["image_name"], self.cfg["image"])])
        res = self.request("click_upload", "POST", path, body, headers)
        if self.check("click_upload", res, path) == 200:
            self._click_ok("click_upload", res, path)

    def do_session_info(self):
        sid = self.live_session()
        if sid is None:
            return self.do_health()
        path = f"/session/{sid}" + self.rng.choice(["", "?update_ts=true"])
        last = self.sessions[sid]
        res = self.request("session_info", "GET", path)
        status = self.check("session_info", res, path, allow_expired_since=last)
        if status == 200 and "update_ts" in path:
            self.sessions[sid] = res[3]
        elif status == 440:
            self.sessions.pop(sid, None)

    def do_session_delete(self):
        sid = self.live_session()
        if sid is None:
            return self.do_models()
        path = f"/session/{sid}"
        last = self.sessions.pop(sid)
        res = self.request("session_delete", "DELETE", path)
        self.check("session_delete", res, path, allow_expired_since=last)

    def do_models(self):
        path = self.rng.choice(["/v1/models", "/v1/models?type=deepgrow", f"/v1/models?model={MODEL}"])
        res = self.request("models", "GET", path)
        if self.check("models", res, path) == 200:
            try:
                json.loads(res[2])
            except ValueError:
                self.stats.bad("models", 200, "reply is not JSON", res[2], path)

    def do_health(self):
        path = self.rng.choice(["/health", "/ready"])
        res = self.request("health", "GET", path)
        self.check("health", res, path)

    def do_bad_image(self):
        junk = os.urandom(self.rng.choice([16, 400, 4096, 65536]))
        if self.rng.random() < 0.5:
            path = f"/v1/deepgrow?model={MODEL}"
            body, headers = self.mp([("params", self.click_params())], [("datapoint", "junk.nii.gz", junk)])
            res = self.request("bad_image", "POST", path, body, headers)
        else:
            path = "/session/"
            body, headers = self.mp(files=[("image", "junk.nii", junk)])
            res = self.request("bad_image", "PUT", path, body, headers)
        self.check("bad_image", res, path)

    def do_bad_params(self):
        path = f"/v1/deepgrow?model={MODEL}"
        files = [("datapoint", self.cfg["image_name"], self.cfg["image"])] if self.rng.random() < 0.3 else []
        body, headers = self.mp([("params", self.rng.choice(BAD_PARAMS))], files)
        res = self.request("bad_params", "POST", path, body, headers)
        self.check("bad_params", res, path)

    def do_unknown_model(self):
        if self.rng.random() < 0.5:
            path = "/v1/deepgrow?model=no_such_model"
            body, headers = self.mp([("params", self.click_params())], [("datapoint", "x.nii.gz", b"\0" * 64)])
            res = self.request("unknown_model", "POST", path, body, headers)
        else:
            path = "/v1/models?model=no_such_model"
            res = self.request("unknown_model", "GET", path)
        self.check("unknown_model", res, path)

    def do_unknown_session(self):
        sid = str(uuid.uuid4())
        r = self.rng.random()
        if r < 0.6:
            path = f"/v1/deepgrow?model={MODEL}&session_id={sid}"
            body, headers = self.mp([("params", self.click_params())])
            res = self.request("unknown_session", "POST", path, body, headers)
        elif r < 0.8:
            path = f"/session/{sid}"
            res = self.request("unknown_session", "GET", path)
        else:
            path = f"/session/{sid}"
            res = self.request("unknown_session", "DELETE", path)
        self.check("unknown_session", res, path)

    def do_unknown_route(self):
        method, path = self.rng.choice([("GET", "/v2/models"), ("POST", "/v1/nothing"), ("GET", "/no/such/path")])
        body = b"x" * 32 if method == "POST" else None
        res = self.request("unknown_route", method, path, body)
        self.check("unknown_route", res, path)

    def do_wrong_method(self):
        method, path = self.rng.choice([("GET", f"/v1/deepgrow?model={MODEL}"), ("DELETE", "/v1/models"),
                                        ("POST", "/health"), ("PUT", "/v1/models")])
        res = self.request("wrong_method", method, path)
        self.check("wrong_method", res, path)

    def run(self):
        while time.perf_counter() < self.stop_at:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            try:
                getattr(self, "do_" + kind)()
            except Exception as e:  # a bug in this script must not look like a server fault
                self.stats.error("client_bug", kind, e)
        if self.conn is not None:
            self.conn.close()


class RssSampler(threading.Thread):
    def __init__(self, pid, period=0.25):
        super().__init__(daemon=True, name="rss")
        self.pid, self.period = pid, period
        self.peak = None
        self.samples = []
        self._stop_evt = threading.Event()
        self.t0 = time.perf_counter()

    def run(self):
        while not self._stop_evt.is_set():
            v = proc_status_kib(self.pid)
            if v is not None:
                self.samples.append((round(time.perf_counter() - self.t0, 2), v))
                self.peak = v if self.peak is None else max(self.peak, v)
            self._stop_evt.wait(self.period)

    def stop(self):
        self._stop_evt.set()
        self.join()


def health(host, port):
    status, _, data = http_request(host, port, "GET", "/health", timeout=30)
    return json.loads(data) if status == 200 else {"status": status}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", type=Path, default=DEFAULT_BINARY)
    ap.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS)
    ap.add_argument("--url", help="drive a running server instead of starting one")
    ap.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS")
    ap.add_argument("--image", type=Path, default=FULL_CT)
    ap.add_argument("--small", action="store_true", help=f"use the small fixture CT ({SMALL_CT.name})")
    ap.add_argument("--click", help="foreground click i,j,k (default: a liver voxel of the known CTs, else the centre)")
    ap.add_argument("--workers", type=int, help="server --workers (default: the server's, = number of cores)")
    ap.add_argument("--clients", type=int, help="concurrent clients (default 4 x workers)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    ap.add_argument("--session-expiry", type=int, default=10,
                    help="server --session-expiry, and what the clients assume (default 10 s)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra server argument (repeatable)")
    ap.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request socket timeout (default 300 s)")
    ap.add_argument("--expiry-wait", type=float, default=None,
                    help="longest wait for sessions to be swept after the load (default expiry + 75 s)")
    ap.add_argument("--settle", type=float, default=5.0, help="pause after sessions==0 before reading RSS")
    ap.add_argument("--no-expiry-wait", action="store_true", help="skip the wait for the sessions to expire")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat load + expiry wait this many times on the same server (leak vs allocator retention)")
    ap.add_argument("--smaps", action="store_true", help="summarise /proc/PID/smaps at the end (where RSS lives)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight", action="append", default=[], help="KIND=W to change the mix (repeatable)")
    ap.add_argument("--json", type=Path, help="write all results as JSON here")
    args = ap.parse_args(argv)

    if args.small:
        args.image = SMALL_CT
    image = args.image.read_bytes()
    shape = nifti_shape(image)
    click = tuple(int(v) for v in args.click.split(",")) if args.click else default_click(args.image, shape)
    weights = dict(WEIGHTS)
    for w in args.weight:
        k, _, v = w.partition("=")
        if k not in weights:
            raise SystemExit(f"unknown kind {k!r}; kinds: {', '.join(weights)}")
        weights[k] = float(v)
    workers = args.workers or os.cpu_count() or 2
    clients = args.clients or 4 * workers

    server = None
    if args.url:
        host, port = parse_url(args.url)
        pid = args.pid
        ready_s = None
    else:
        extra = ["--session-expiry", str(args.session_expiry), "--log-format", "json", *args.server_arg]
        if args.workers:
            extra += ["--workers", str(args.workers)]
        env = dict(kv.split("=", 1) for kv in args.server_env)
        server = ServerProcess(args.binary, args.models_dir, extra_args=extra, env=env)
        host, port = server.host, server.port
        print(f"server: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(server.cmd)}", flush=True)
        print(f"server log: {server.log_path}", flush=True)
        server.start()
        pid = server.pid
    try:
        if server:
            ready_s = server.wait_ready()
            print(f"ready after {ready_s:.2f} s", flush=True)
        return run_load(args, host, port, pid, server, image, shape, click, weights, workers, clients, ready_s)
    finally:
        if server:
            server.stop()


def run_round(args, cfg, stats, host, port, pid, server, clients, rnd) -> dict:
    """One load window, then the wait for every session to be swept; returns the RSS figures of the round."""
    sampler = RssSampler(pid) if pid else None
    if sampler:
        sampler.start()
    t_start = time.perf_counter()
    stop_at = t_start + args.duration
    threads = [Client(i, cfg, stats, stop_at, args.seed * 1000 + rnd * 100 + i) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    load_after = os.getloadavg()
    if sampler:
        sampler.stop()
    r = {"round": rnd + 1, "elapsed_s": elapsed, "loadavg_after_load": load_after,
         "rss_peak_kib": sampler.peak if sampler else None, "rss_samples": sampler.samples if sampler else [],
         "rss_end_kib": proc_status_kib(pid) if pid else None, "vm_hwm_kib": proc_status_kib(pid, "VmHWM") if pid else None,
         "health_end": None, "health_after": None, "rss_after_kib": None, "swept_after_s": None}
    if server is not None and not server.alive():
        return r
    try:
        r["health_end"] = health(host, port)
    except OSError as e:
        stats.error("connection_error", "health(final)", e)
        return r
    if args.no_expiry_wait:
        return r
    limit = args.expiry_wait if args.expiry_wait is not None else args.session_expiry + 75
    h = r["health_end"]
    print(f"round {rnd + 1}: load done; {h.get('sessions')} sessions ({h.get('session_bytes', 0) / MIB:.1f} MiB) held, "
          f"RSS {fmt_mib(r['rss_end_kib'])}; waiting up to {limit:.0f} s for them to expire and be swept ...",
          flush=True)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        try:
            r["health_after"] = health(host, port)
        except OSError as e:
            stats.error("connection_error", "health(sweep)", e)
            break
        if r["health_after"].get("sessions") == 0:
            r["swept_after_s"] = time.perf_counter() - t0
            break
        time.sleep(1.0)
    if r["swept_after_s"] is not None:
        time.sleep(args.settle)
        r["rss_after_kib"] = proc_status_kib(pid) if pid else None
        print(f"round {rnd + 1}: sessions == 0 after {r['swept_after_s']:.0f} s; RSS {args.settle:.0f} s later "
              f"{fmt_mib(r['rss_after_kib'])}", flush=True)
    return r


def run_load(args, host, port, pid, server, image, shape, click, weights, workers, clients, ready_s) -> int:
    session_ct, session_body = encode_multipart(files=[("image", args.image.name, image)])
    cfg = {
        "host": host, "port": port, "timeout": args.timeout, "session_expiry": args.session_expiry,
        "image": image, "image_name": args.image.name, "shape": shape, "click": click, "weights": weights,
        "session_body": session_body, "session_headers": {"Content-Type": session_ct},
    }
    load_before = os.getloadavg()
    h0 = health(host, port)
    time.sleep(1.0)
    rss_base = proc_status_kib(pid) if pid else None
    print(f"{clients} clients, {args.duration:.0f} s, image {args.image.name} {shape}, click {list(click)}, "
          f"session expiry {args.session_expiry} s; load average before {load_before[0]:.2f}", flush=True)

    stats = Stats()
    rounds = []
    for rnd in range(args.rounds):
        r = run_round(args, cfg, stats, host, port, pid, server, clients, rnd)
        rounds.append(r)
        if server is not None and not server.alive():
            break
    elapsed = sum(r["elapsed_s"] for r in rounds)
    load_after = rounds[-1]["loadavg_after_load"]
    last = rounds[-1]
    rss_end, hwm, h_end, h_swept = last["rss_end_kib"], last["vm_hwm_kib"], last["health_end"], last["health_after"]
    rss_after, swept_after_s = last["rss_after_kib"], last["swept_after_s"]
    peak = max((r["rss_peak_kib"] for r in rounds if r["rss_peak_kib"] is not None), default=None)
    smaps = summarize_smaps(pid) if (pid and args.smaps) else None

    # ---- a final click to show the server still works
    final_ok = None
    if (server is None or server.alive()):
        try:
            body_ct, body = encode_multipart([("params", json.dumps({"foreground": [list(click)], "background": []}))],
                                             [("datapoint", args.image.name, image)])
            st, hd, data = http_request(host, port, "POST", f"/v1/deepgrow?model={MODEL}", body,
                                        {"Content-Type": body_ct}, timeout=args.timeout)
            click_reply_params(hd.get("content-type", ""), data)
            final_ok = st == 200
        except (OSError, ValueError, http.client.HTTPException):
            final_ok = False
    server_alive = server.alive() if server else None

    # ---- report
    all_lat = [x for v in stats.latency.values() for x in v]
    total = len(all_lat)
    status_total = Counter()
    for c in stats.status.values():
        status_total.update(c)
    n5xx = sum(n for s, n in status_total.items() if s >= 500)
    err_by_cat = Counter()
    for (cat, _, _), n in stats.errors.items():
        err_by_cat[cat] += n

    print()
    load_s = args.duration * len(rounds)
    print(f"requests: {total} in {elapsed:.1f} s ({load_s:.0f} s of load + {elapsed - load_s:.1f} s for "
          f"the requests in flight to finish) = {total / elapsed:.2f} req/s; clicks (200): "
          f"{stats.status['click_session'][200] + stats.status['click_upload'][200]} = "
          f"{(stats.status['click_session'][200] + stats.status['click_upload'][200]) / elapsed:.2f}/s")
    hdr = f"{'kind':<16} {'n':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'max ms':>9}  statuses"
    print(hdr)
    print("-" * len(hdr))
    report_kinds = {}
    for kind in WEIGHTS:
        lat = [x * 1000 for x in stats.latency.get(kind, [])]
        st = dict(sorted(stats.status.get(kind, {}).items()))
        report_kinds[kind] = {"n": len(lat), "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95),
                              "p99_ms": percentile(lat, 99), "max_ms": max(lat) if lat else None,
                              "statuses": {str(k): v for k, v in st.items()}}
        if not lat:
            continue
        print(f"{kind:<16} {len(lat):>6} {fmt_ms(percentile(lat, 50)):>9} {fmt_ms(percentile(lat, 95)):>9} "
              f"{fmt_ms(percentile(lat, 99)):>9} {fmt_ms(max(lat)):>9}  "
              + " ".join(f"{k}:{v}" for k, v in st.items()))
    print("status codes: " + ", ".join(f"{k}: {v}" for k, v in sorted(status_total.items())))
    srv_lat = {}
    for kind, stages in stats.server_latencies.items():
        srv_lat[kind] = {s: median(v) for s, v in stages.items()}
        print(f"server latencies {kind} (median ms): " +
              " / ".join(f"{s} {fmt_ms(median(stages[s]))}" for s in ("decode", "pre", "infer", "post", "write", "total")
                         if s in stages))
    print(f"440 for own sessions that aged out (expected): {stats.expired_440}")
    print(f"5xx: {n5xx}; connection errors: {err_by_cat['connection_error']}; timeouts: {err_by_cat['timeout']}; "
          f"dropped connections: {err_by_cat['dropped_connection']} (+{err_by_cat['dropped_reused_conn']} on reused "
          f"keep-alive connections); unexpected statuses/bodies: {len(stats.unexpected)}; "
          f"client bugs: {err_by_cat['client_bug']}")
    if stats.retry_after_missing:
        print(f"503 without Retry-After: {stats.retry_after_missing}")
    for (cat, kind, what), n in sorted(stats.errors.items()):
        print(f"  {cat} {kind}: {what} x{n}")
    for u in stats.unexpected[:20]:
        print(f"  unexpected {u['kind']} {u['path']} -> {u['status']} ({u['why']}): {u['body'][:160]!r}")
    if len(stats.unexpected) > 20:
        print(f"  ... {len(stats.unexpected) - 20} more")

    print(f"RSS: baseline {fmt_mib(rss_base)}, peak during load {fmt_mib(peak)} (VmHWM {fmt_mib(hwm)}), "
          f"end of load {fmt_mib(rss_end)} with {h_end and h_end.get('sessions')} sessions "
          f"({(h_end or {}).get('session_bytes', 0) / MIB:.1f} MiB of volumes)")
    for r in rounds:
        after = r["rss_after_kib"]
        delta = "-" if after is None or rss_base is None else f"{(after - rss_base) / 1024:+.1f} MiB vs baseline"
        print(f"  round {r['round']}: peak {fmt_mib(r['rss_peak_kib'])}, end of load {fmt_mib(r['rss_end_kib'])}, "
              + (f"sessions == 0 after {r['swept_after_s']:.0f} s of waiting, RSS {args.settle:.0f} s later "
                 f"{fmt_mib(after)} ({delta})" if r["swept_after_s"] is not None else
                 ("no expiry wait" if args.no_expiry_wait else f"sessions not 0 within the wait: {r['health_after']}")))
    if smaps:
        print("smaps at the end: " + ", ".join(f"{k} {v if k == 'arena_heap_count' else fmt_mib(v)}"
                                               for k, v in smaps.items()))
    print(f"load average: before {load_before[0]:.2f}, after the load {load_after[0]:.2f} (1 min); "
          f"CPU {cpu_model()}, {os.cpu_count()} cores")
    print(f"server alive at the end: {server_alive}; final click after the load: {'200' if final_ok else final_ok}")
    log_counts, log_bad = (log_levels(server.log_path) if server else (Counter(), []))
    if server:
        print(f"server log levels: {dict(log_counts)}")
        for line in log_bad[:10]:
            print(f"  {line[:300]}")

    failed = bool(n5xx or err_by_cat["connection_error"] or err_by_cat["timeout"] or err_by_cat["dropped_connection"]
                  or err_by_cat["dropped_reused_conn"] or stats.unexpected or err_by_cat["client_bug"]
                  or (server is not None and not server_alive) or final_ok is False)
    print("RESULT: " + ("FAIL" if failed else "PASS"))

    if args.json:
        out = {
            "config": {"clients": clients, "workers": workers, "duration_s": args.duration, "image": str(args.image),
                       "shape": shape, "click": click, "session_expiry_s": args.session_expiry, "weights": weights,
                       "server_cmd": server.cmd if server else None,
                       "server_env": server.env_extra if server else None, "url": f"http://{host}:{port}"},
            "ready_s": ready_s, "elapsed_s": elapsed, "requests": total, "throughput_rps": total / elapsed,
            "kinds": report_kinds, "statuses": {str(k): v for k, v in sorted(status_total.items())},
            "server_latencies_median_ms": srv_lat, "expired_440": stats.expired_440,
            "errors": [{"category": c, "kind": k, "what": w, "n": n} for (c, k, w), n in stats.errors.items()],
            "unexpected": stats.unexpected,
            "rss_kib": {"baseline": rss_base, "peak": peak, "vm_hwm": hwm, "end_of_load": rss_end,
                        "after_expiry": rss_after, "smaps": smaps},
            "rounds": rounds,
            "health": {"before": h0, "end_of_load": h_end, "after_wait": h_swept}, "swept_after_s": swept_after_s,
            "rounds_n": len(rounds),
            "loadavg": {"before": load_before, "after_load": load_after},
            "cpu": cpu_model(), "cores": os.cpu_count(), "server_alive": server_alive, "final_click_ok": final_ok,
            "server_log_levels": dict(log_counts), "server_log_warn_error": log_bad[:50], "failed": failed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
