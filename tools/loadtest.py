#!/usr/bin/env python3
"""Load test for deepgrow-server (issues 6 and 14). Standard library only.

It starts the release binary on a free port with a short session expiry (or drives a running server given with
--url, and --pid for RSS), then runs N concurrent clients over loopback for --duration seconds. Each client
has its own connections (even-numbered clients keep one keep-alive connection, odd-numbered clients open a new
connection per request, as the AIAA Python client does) and picks request kinds at random from this mix
(--weight KIND=W changes a weight):

    kind             request                                               expected           weight
    session_create   PUT /session/ with the CT                             200                5
    click_session    POST /v1/deepgrow?session_id=<own session>            200 (440 once the  30
                                                                           session aged out)
    click_upload     POST /v1/deepgrow with the CT as 'datapoint'          200                10
    session_info     GET /session/<own session>                            200 (440 as above) 3
    session_delete   DELETE /session/<own session>                         200                1
    models           GET /v1/models                                        200                8
    health           GET /health                                           200                8
    bad_image        garbage bytes as the image (click or session)         422                4
    bad_params       malformed params JSON                                 400                4
    unknown_model    ?model=no_such_model, GET /v1/models?model=...        404                3
    unknown_session  random session id (click, GET, DELETE)                440                4
    unknown_route    GET /v2/..., POST /v1/nothing                         404                3
    wrong_method     GET /v1/deepgrow, DELETE /v1/models, POST /health     405                3
    big_session      PUT /session/ with the big volume (below), then       200 or 503         0 (2 with
                     DELETE of the session it made (big_session_delete)    (DELETE: 200)      --big-mix)
    big_click        POST /v1/deepgrow?model=... with the big volume as    200 or 503         0 (2 with
                     'datapoint', the params part first                                       --big-mix)

A 503 must carry Retry-After and the AIAA error JSON; it is expected only for the big kinds, for every other
kind it is a failure. The big volume is generated once (--big-mib M, default 200): a little-endian int16
NIfTI-1 .nii (352-byte header) of 512 x 512 x k slices, k = M MiB / 512 KiB, with a smooth CT-like phantom
(air, body, a liver-like ellipse around the centre, a vertebra); its clicks go to the centre of the middle slice.
--big-gzip sends it gzipped (compressed once, level 1). All clients share one bytes object: a big request is
sent as [multipart head, volume, multipart tail] with an explicit Content-Length, never copied.

Before the load, --baseline-n (default 5) sequential session_create requests with the CT time session creation
on the idle server (each session is deleted again); the report gives session_create p50 under load against
that unloaded p50 (issue 14's goal: within 2x).

It reports throughput, p50/p95/p99 latency per kind, counts per status code, connection errors, dropped
connections and unexpected statuses (including error bodies that are not the AIAA error JSON and 200 click
replies without a params part and a mask file), and the server's RSS: baseline before the load, peak during it,
at its end, and after every session has expired (the server sweeps every 30 s; /health is polled until it
reports sessions == 0, then RSS is read after a short pause). It exits 1 if any unexpected 5xx, connection
error, dropped connection or unexpected status occurred, or if the server died.

Burst mode (--burst N) runs instead of the load: once the server is ready, one more thread creates a small
session with the CT (and times 3 idle clicks on it); then the server's RSS is read and its peak reset
(echo 5 > /proc/PID/clear_refs), and N clients, each on a connection opened beforehand, send one big upload
(--burst-mib M, default 900; --burst-kind session, click or mixed) at the same moment (a barrier), all sharing
one generated volume. While they run, the extra thread clicks with its session in a loop. It reports every
client's status and wall time (a connection reset or other error, i.e. no status, is counted apart), the
200/503/other counts, the server's peak RSS rise (VmHWM after - RSS before) against the in-flight budget
(inflight_budget_bytes of /health) and the session budget (--session-memory-bytes, passed to the server when
given; default the server's 8 GiB), and the session clicks' latencies during the burst (p50, max, n). The
sessions the burst created are deleted afterwards. It exits 1 if a client got no status or one outside
{200, 503}, a 503 lacked Retry-After or the AIAA error JSON, a 200 click reply was malformed, the session
clicks got an error or a status outside {200, 440, 503}, or the server died.

    python3 tools/loadtest.py                                   # 8 clients, 60 s, the 512x512x20 CT
    python3 tools/loadtest.py --small --duration 15             # quick run with the 122x101x30 fixture
    python3 tools/loadtest.py --big-mix --duration 60           # the mix plus 200 MiB uploads
    python3 tools/loadtest.py --big-mix --big-mib 400 --big-gzip --server-arg=--max-inflight-bytes=2000000000
    python3 tools/loadtest.py --burst 12 --burst-mib 900        # 12 simultaneous 900 MiB session uploads
    python3 tools/loadtest.py --burst 12 --burst-kind mixed --session-memory-bytes 4294967296 --json /tmp/burst.json
    python3 tools/loadtest.py --burst 8 --url http://127.0.0.1:5000 --pid 1234
    python3 tools/loadtest.py --url http://127.0.0.1:5000 --pid 1234 --session-expiry 3600
    python3 tools/loadtest.py --server-env MALLOC_ARENA_MAX=2 --json /tmp/load.json

compare_engines.py imports the HTTP, multipart, NIfTI-header and process helpers from this file.
"""

from __future__ import annotations

import argparse
import array
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
import zlib
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
GIB = 1024 * MIB
# The server's --session-memory-bytes default (what the burst report assumes unless told otherwise).
DEFAULT_SESSION_MEMORY = 8 * GIB
NIFTI_HEADER_BYTES = 352  # the 348-byte NIfTI-1 header and the 4-byte extension flag of a single-file .nii

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


def fmt_bytes(n) -> str:
    """Bytes as GiB (from 1 GiB), MiB (from 1 MiB) or KiB; "-" for None."""
    if n is None:
        return "-"
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB" if abs(n) >= MIB else f"{n / 1024:.1f} KiB"


def fmt_s(v) -> str:
    return "-" if v is None else f"{v:.2f}"


# ---- the big generated volume (issue 14)


def nifti1_header(shape, spacing=(0.8, 0.8, 1.0), datatype=4, bitpix=16,
                  descrip=b"deepgrow-server loadtest phantom") -> bytes:
    """A little-endian NIfTI-1 single-file header (348 bytes + the 4-byte empty extension flag = 352, the
    vox_offset), int16 by default, scl_slope 1, qform and sform both the scaled identity (method 2 and 3 agree)."""
    h = bytearray(348)
    struct.pack_into("<i", h, 0, 348)
    h[38] = ord("r")
    dims = [len(shape), *[int(d) for d in shape]] + [1] * (7 - len(shape))
    struct.pack_into("<8h", h, 40, *dims)
    struct.pack_into("<hh", h, 70, datatype, bitpix)
    pixdim = [1.0, *[float(v) for v in spacing]] + [1.0] * (7 - len(spacing))  # pixdim[0] is qfac
    struct.pack_into("<8f", h, 76, *pixdim)
    struct.pack_into("<fff", h, 108, float(NIFTI_HEADER_BYTES), 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    h[123] = 2 | 8  # xyzt_units: mm, s
    h[148:148 + min(len(descrip), 79)] = descrip[:79]
    struct.pack_into("<hh", h, 252, 1, 1)  # qform_code, sform_code: scanner
    sp = list(spacing) + [1.0] * (3 - len(spacing))
    struct.pack_into("<4f", h, 280, sp[0], 0.0, 0.0, 0.0)
    struct.pack_into("<4f", h, 296, 0.0, sp[1], 0.0, 0.0)
    struct.pack_into("<4f", h, 312, 0.0, 0.0, sp[2], 0.0)
    h[344:348] = b"n+1\0"
    return bytes(h) + b"\0\0\0\0"


def slices_for_mib(mib: float, nx: int = 512, ny: int = 512) -> int:
    """Slices of nx x ny int16 that make about mib MiB (at least 1)."""
    return max(1, int(round(mib * MIB / (nx * ny * 2))))


# Hounsfield units of the phantom
HU_AIR, HU_FAT, HU_LIVER, HU_BONE = -1000, -90, 60, 700


def _span(y, xc, yc, a, b, nx):
    """[x0, x1) of row y inside the ellipse centred (xc, yc) with semi-axes a (x) and b (y), or None."""
    dy = (y - yc) / b
    if abs(dy) >= 1.0:
        return None
    half = a * math.sqrt(1.0 - dy * dy)
    x0, x1 = max(0, math.ceil(xc - half)), min(nx, math.floor(xc + half) + 1)
    return (x0, x1) if x1 > x0 else None


def ct_like_slice(nx: int = 512, ny: int = 512, variant: float = 1.0) -> bytes:
    """One slice (x fastest) of int16 little-endian voxels: air, an elliptic body (a rim of fat around soft tissue
    that brightens smoothly from top to bottom), a liver-like ellipse that holds the centre (its size grows with
    variant, 0..1, and its value varies smoothly by row) and a vertebra below it. Built row by row from runs, so
    512 x 512 takes milliseconds."""
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    s = 0.7 + 0.3 * max(0.0, min(1.0, variant))
    parts = []
    for y in range(ny):
        row = array.array("h", [HU_AIR]) * nx
        for (xc, yc, a, b), value in (
                ((cx, cy, 0.46 * nx, 0.38 * ny), HU_FAT),
                ((cx, cy, 0.42 * nx, 0.34 * ny), int(round(25 + 20 * y / max(1, ny - 1)))),
                ((cx - 0.06 * nx, cy - 0.02 * ny, 0.22 * nx * s, 0.16 * ny * s),
                 int(round(HU_LIVER + 6 * math.cos(math.pi * y / max(1, ny - 1))))),
                ((cx, cy + 0.27 * ny, 0.05 * nx, 0.05 * ny), HU_BONE)):
            sp = _span(y, xc, yc, a, b, nx)
            if sp:
                row[sp[0]:sp[1]] = array.array("h", [value]) * (sp[1] - sp[0])
        if sys.byteorder != "little":
            row.byteswap()
        parts.append(row.tobytes())
    return b"".join(parts)


def make_big_volume(mib: float, gzip_level=None, nx: int = 512, ny: int = 512, variants: int = 8) -> dict:
    """The big upload, generated once: a NIfTI-1 .nii of nx x ny x k int16 (k from mib) whose slices cycle
    through a few sizes of the phantom (larger in the middle), joined into one bytes object (or, with
    gzip_level, deflated slice by slice into one gzip member, so that the raw volume is never held). Returns
    {"data", "name", "shape", "click" (centre of the middle slice), "raw_bytes", "gzip"}."""
    k = slices_for_mib(mib, nx, ny)
    nv = max(1, min(variants, k))
    kinds = [ct_like_slice(nx, ny, math.sin(math.pi * (v + 0.5) / nv)) for v in range(nv)]
    slices = [kinds[z * nv // k] for z in range(k)]  # references, not copies
    header = nifti1_header((nx, ny, k))
    if gzip_level is None:
        data = b"".join([header, *slices])
    else:
        comp = zlib.compressobj(gzip_level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip wrapper, mtime 0
        data = b"".join([comp.compress(header), *(comp.compress(sl) for sl in slices), comp.flush()])
    return {"data": data, "name": "big_phantom.nii" + (".gz" if gzip_level is not None else ""),
            "shape": (nx, ny, k), "click": (nx // 2, ny // 2, k // 2),
            "raw_bytes": NIFTI_HEADER_BYTES + nx * ny * k * 2, "gzip": gzip_level is not None}


def multipart_frame(fields, file_field: str, filename: str, boundary: str = BOUNDARY) -> tuple[str, bytes, bytes]:
    """(content_type, head, tail) such that head + data + tail == encode_multipart(fields, [(file_field,
    filename, data)])[1] for any data: the framing of a body whose one file part is sent without copying it."""
    ct, empty = encode_multipart(fields, [(file_field, filename, b"")], boundary)
    tail = b"\r\n--" + boundary.encode() + b"--\r\n"
    if not empty.endswith(tail):
        raise AssertionError("encode_multipart's closing boundary changed")
    return ct, empty[:-len(tail)], tail


def framed_body(ct: str, head: bytes, data: bytes, tail: bytes) -> tuple[tuple, dict]:
    """(body, headers) for http.client: the body is the tuple (head, data, tail), which http.client sends chunk
    by chunk (data itself is handed to sendall, not copied), with an explicit Content-Length."""
    return (head, data, tail), {"Content-Type": ct, "Content-Length": str(len(head) + len(data) + len(tail))}


def load_ratio(loaded, unloaded):
    """loaded / unloaded, or None when either is missing or unloaded is not positive."""
    if loaded is None or unloaded is None or unloaded <= 0:
        return None
    return loaded / unloaded


def session_create_comparison(unloaded_s, loaded_s, goal: float = 2.0) -> tuple[dict, str]:
    """session_create p50 on the idle server against under load (lists of seconds): (JSON dict, report line)."""
    u = median([x * 1000 for x in unloaded_s])
    l = median([x * 1000 for x in loaded_s])
    r = load_ratio(l, u)
    d = {"unloaded_n": len(unloaded_s), "unloaded_p50_ms": u, "loaded_n": len(loaded_s), "loaded_p50_ms": l,
         "ratio": r, "goal_ratio": goal, "within_goal": None if r is None else r <= goal}
    verdict = "-" if r is None else f"{r:.2f}x ({'within' if r <= goal else 'OVER'} the {goal:g}x goal)"
    line = (f"session_create p50: unloaded {fmt_ms(u)} ms (n {len(unloaded_s)}), under load {fmt_ms(l)} ms "
            f"(n {len(loaded_s)}); ratio {verdict}")
    return d, line


# ---- the burst's summary


BURST_OK = {200, 503}
MONITOR_OK = {200, 440, 503}


def summarize_burst(clients, monitor, rss_before_kib=None, hwm_kib=None, sampled_peak_kib=None,
                    inflight_budget_bytes=None, session_budget_bytes=None, kind="session", server_alive=True,
                    idle_clicks_s=()) -> dict:
    """The burst's verdict from its records (pure; tested with fake ones).

    clients: one dict per burst client: "status" (None: no reply), "wall_s", "error" (why no status),
    "retry_after", "aiaa_error" (the body is the AIAA error JSON), "reply_ok" (200 click: params + mask).
    monitor: one dict per session click during the burst: "status" (None on an error), "latency_s", "error".
    The peak rise is VmHWM (since its reset) minus VmRSS before, or the sampled peak minus it without VmHWM;
    its bound is the in-flight budget, plus the session budget when sessions were uploaded."""
    counts = {"200": 0, "503": 0, "other": 0, "no_status": 0}
    problems = []
    for i, c in enumerate(clients):
        st = c.get("status")
        who = f"client {c.get('idx', i)} ({c.get('kind', kind)})"
        if st is None:
            counts["no_status"] += 1
            problems.append(f"{who}: no status ({c.get('error') or 'no reply'})")
            continue
        counts[str(st) if st in BURST_OK else "other"] += 1
        if st not in BURST_OK:
            problems.append(f"{who}: status {st}")
        elif st == 503:
            if not c.get("retry_after"):
                problems.append(f"{who}: 503 without Retry-After")
            if not c.get("aiaa_error"):
                problems.append(f"{who}: 503 body is not the AIAA error JSON")
        elif c.get("reply_ok") is False:
            problems.append(f"{who}: malformed 200 reply ({c.get('reply_error')})")
    walls = [c["wall_s"] for c in clients if c.get("wall_s") is not None]

    ok_lat = [m["latency_s"] * 1000 for m in monitor if m.get("status") == 200 and m.get("latency_s") is not None]
    mon_status = Counter(str(m["status"]) if m.get("status") is not None else "error" for m in monitor)
    mon_bad = [m for m in monitor if m.get("status") not in MONITOR_OK]
    for m in mon_bad[:5]:
        problems.append(f"session click: {m.get('error') or 'status ' + str(m.get('status'))}")
    if len(mon_bad) > 5:
        problems.append(f"session click: {len(mon_bad) - 5} more failures")
    idle = [x * 1000 for x in idle_clicks_s]

    peak = hwm_kib if hwm_kib is not None else sampled_peak_kib
    rise = None if peak is None or rss_before_kib is None else (peak - rss_before_kib) * 1024
    with_sessions = kind in ("session", "mixed")
    bound = None
    if inflight_budget_bytes is not None:
        bound = inflight_budget_bytes + ((session_budget_bytes or 0) if with_sessions else 0)
    if not server_alive:
        problems.append("the server died (or stopped answering)")
    return {
        "clients": len(clients), "counts": counts, "problems": problems, "failed": bool(problems),
        "wall_s": {"min": min(walls) if walls else None, "median": median(walls), "max": max(walls) if walls else None},
        "rss": {"before_kib": rss_before_kib, "vm_hwm_kib": hwm_kib, "sampled_peak_kib": sampled_peak_kib,
                "peak_source": "VmHWM" if hwm_kib is not None else ("sampled" if sampled_peak_kib is not None else None),
                "rise_bytes": rise},
        "budgets": {"inflight_bytes": inflight_budget_bytes, "session_bytes": session_budget_bytes,
                    "bound_bytes": bound, "bound_includes_sessions": with_sessions,
                    "rise_within_bound": None if rise is None or bound is None else rise <= bound},
        "session_clicks": {"n": len(ok_lat), "p50_ms": median(ok_lat), "max_ms": max(ok_lat) if ok_lat else None,
                           "attempts": len(monitor), "statuses": dict(sorted(mon_status.items())),
                           "idle_p50_ms": median(idle), "idle_n": len(idle),
                           "ratio_to_idle": load_ratio(median(ok_lat), median(idle))},
        "server_alive": server_alive,
    }


def format_burst_report(summary: dict, clients) -> str:
    """The burst's report: one line per client, then the counts, memory against the budgets and the session
    clicks."""
    lines = [f"{'client':>6} {'kind':<8} {'status':>6} {'wall s':>8}  note"]
    for i, c in enumerate(clients):
        st = c.get("status")
        note = c.get("error") or ""
        if st == 503:
            note = f"Retry-After {c.get('retry_after')}" + ("" if c.get("aiaa_error") else ", body not AIAA JSON")
        elif st == 200 and c.get("reply_ok") is False:
            note = f"malformed reply: {c.get('reply_error')}"
        elif st not in (None, 200):
            note = (c.get("body") or "")[:120]
        if c.get("sent_all") is False:
            note = ("reply before the whole body was sent; " + note).strip("; ")
        wall = c.get("wall_s")
        lines.append(f"{c.get('idx', i):>6} {c.get('kind', ''):<8} {'-' if st is None else st:>6} "
                     f"{fmt_s(wall):>8}  {note}")
    n = summary["counts"]
    w = summary["wall_s"]
    lines.append(f"statuses: 200: {n['200']}, 503: {n['503']}, other: {n['other']}, no status (connection reset "
                 f"or error): {n['no_status']}; wall s min {fmt_s(w['min'])}, median {fmt_s(w['median'])}, "
                 f"max {fmt_s(w['max'])}")
    r, b = summary["rss"], summary["budgets"]
    peak = r["vm_hwm_kib"] if r["vm_hwm_kib"] is not None else r["sampled_peak_kib"]
    within = b["rise_within_bound"]
    lines.append(
        f"server RSS: before {fmt_mib(r['before_kib'])}, peak {fmt_mib(peak)} ({r['peak_source'] or 'unavailable'}"
        + (f"; sampled {fmt_mib(r['sampled_peak_kib'])}" if r["vm_hwm_kib"] is not None and r["sampled_peak_kib"]
           is not None else "") + f"), rise {fmt_bytes(r['rise_bytes'])}; in-flight budget "
        f"{fmt_bytes(b['inflight_bytes'])}, session budget {fmt_bytes(b['session_bytes'])}; bound "
        f"{fmt_bytes(b['bound_bytes'])} ({'in-flight + sessions' if b['bound_includes_sessions'] else 'in-flight'}"
        f"): {'-' if within is None else ('within' if within else 'EXCEEDED')}")
    s = summary["session_clicks"]
    ratio = s["ratio_to_idle"]
    lines.append(f"session clicks during the burst: n {s['n']} (of {s['attempts']}), p50 {fmt_ms(s['p50_ms'])} ms, "
                 f"max {fmt_ms(s['max_ms'])} ms; idle p50 {fmt_ms(s['idle_p50_ms'])} ms (n {s['idle_n']})"
                 + ("" if ratio is None else f", {ratio:.2f}x idle") + "; statuses "
                 + (", ".join(f"{k}: {v}" for k, v in s["statuses"].items()) or "none"))
    for p in summary["problems"]:
        lines.append(f"  FAIL: {p}")
    return "\n".join(lines)


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
    "big_session": 0,
    "big_click": 0,
}
# The weights --big-mix gives the big kinds (against about 86 for the rest of the mix: ~4.5% of the requests).
BIG_MIX_WEIGHTS = {"big_session": 2, "big_click": 2}
BIG_KINDS = tuple(BIG_MIX_WEIGHTS)
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
    "big_session": {200, 503},
    "big_session_delete": {200},
    "big_click": {200, 503},
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
            if resp.status not in EXPECTED.get(kind, ()):
                self.stats.bad(kind, resp.status, "5xx", data, path)
            if resp.status == 503 and "retry-after" not in hdrs:
                with self.stats.lock:
                    self.stats.retry_after_missing += 1
                if resp.status in EXPECTED.get(kind, ()):
                    self.stats.bad(kind, resp.status, "503 without Retry-After", data, path)
        return resp.status, hdrs, data, t0

    # ---- helpers
    def check(self, kind, res, path, allow_expired_since=None):
        """Judge a reply against EXPECTED[kind]; 440 is accepted for an own session whose last use is old enough."""
        if res is None:
            return None
        status, hdrs, data, _ = res
        if status >= 500 and status not in EXPECTED[kind]:
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
                    for stage in ("wait", "decode", "pre", "infer", "post", "write", "total"):
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

    def do_big_session(self):
        big = self.cfg["big"]
        path = "/session/"
        body, headers = framed_body(big["session_ct"], big["session_head"], big["data"], big["tail"])
        res = self.request("big_session", "PUT", path, body, headers)
        if self.check("big_session", res, path) == 200:
            try:
                sid = json.loads(res[2])["session_id"]
            except (ValueError, KeyError, TypeError):
                self.stats.bad("big_session", 200, "no session_id in the reply", res[2], path)
                return
            # delete it at once: big sessions left to expire would evict the clients' own (LRU) and show as 440s
            path = f"/session/{sid}"
            self.check("big_session_delete", self.request("big_session_delete", "DELETE", path), path)

    def do_big_click(self):
        big = self.cfg["big"]
        path = f"/v1/deepgrow?model={MODEL}"
        i, j, k = big["click"]
        params = json.dumps({"foreground": [[i, j, k]], "background": []})
        ct, head, tail = multipart_frame([("params", params)], "datapoint", big["name"])  # params first
        body, headers = framed_body(ct, head, big["data"], tail)
        res = self.request("big_click", "POST", path, body, headers)
        if self.check("big_click", res, path) == 200:
            self._click_ok("big_click", res, path)

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


def idle_session_creates(host, port, body, headers, n, timeout=300.0) -> tuple[list, list]:
    """n sequential PUT /session/ (each deleted again) on the idle server: (seconds of each 200, problems)."""
    times, problems = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            st, _, data = http_request(host, port, "PUT", "/session/", body, headers, timeout=timeout)
            dt = time.perf_counter() - t0
            if st != 200:
                problems.append(f"status {st}: {data[:160]!r}")
                continue
            times.append(dt)
            sid = json.loads(data)["session_id"]
            http_request(host, port, "DELETE", f"/session/{sid}", timeout=timeout)
        except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as e:
            problems.append(f"{type(e).__name__}: {e}")
    return times, problems


def build_big(volume: dict) -> dict:
    """The shared parts of the big requests: the volume's bytes (one object for every thread), the session
    upload's multipart head and the closing tail (the click's head carries its params and is built per request)."""
    ct, head, tail = multipart_frame([], "image", volume["name"])
    return {**volume, "session_ct": ct, "session_head": head, "tail": tail}


# --------------------------------------------------------------------------------------------------------------
# Burst mode (issue 14): N big uploads at the same moment, one session clicking through it
# --------------------------------------------------------------------------------------------------------------


def burst_kinds(n: int, kind: str) -> list:
    """The request kind of each of n burst clients: all "session", all "click", or alternating for "mixed"."""
    if kind == "mixed":
        return ["session" if i % 2 == 0 else "click" for i in range(n)]
    return [kind] * n


def burst_request(kind: str, big: dict) -> tuple[str, str, tuple, dict]:
    """(method, path, body, headers) of a burst client's upload; body shares big["data"]."""
    if kind == "session":
        body, headers = framed_body(big["session_ct"], big["session_head"], big["data"], big["tail"])
        return "PUT", "/session/", body, headers
    i, j, k = big["click"]
    ct, head, tail = multipart_frame([("params", json.dumps({"foreground": [[i, j, k]], "background": []}))],
                                     "datapoint", big["name"])
    body, headers = framed_body(ct, head, big["data"], tail)
    return "POST", f"/v1/deepgrow?model={MODEL}", body, headers


class BurstClient(threading.Thread):
    """One big upload on a connection opened before the barrier; every outcome ends in self.rec."""

    def __init__(self, idx, kind, big, host, port, timeout, barrier):
        super().__init__(name=f"burst-{idx}", daemon=True)
        self.kind, self.big, self.host, self.port, self.timeout, self.barrier = kind, big, host, port, timeout, barrier
        self.rec = {"idx": idx, "kind": kind, "status": None, "wall_s": None, "error": None, "sent_all": None,
                    "retry_after": None, "aiaa_error": None, "reply_ok": None, "reply_error": None, "body": None,
                    "session_id": None}

    def run(self):
        rec = self.rec
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            method, path, body, headers = burst_request(self.kind, self.big)
            conn.connect()
        except Exception as e:  # noqa: BLE001  (reach the barrier whatever happened)
            rec["error"] = f"connect: {type(e).__name__}: {e}"
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            rec["error"] = rec["error"] or "the start barrier broke"
            conn.close()
            return
        if rec["error"]:
            conn.close()
            return
        t0 = time.perf_counter()
        try:
            try:
                conn.request(method, path, body=body, headers=headers)
                rec["sent_all"] = True
            except OSError as e:  # the server may have answered and closed before the body was through
                rec["sent_all"] = False
                rec["error"] = f"send: {type(e).__name__}: {e}"
            resp = conn.getresponse()
            data = resp.read()
            rec["wall_s"] = time.perf_counter() - t0
            rec["status"] = resp.status
            rec["error"] = None if rec["sent_all"] else rec["error"]
        except (OSError, http.client.HTTPException) as e:
            rec["wall_s"] = time.perf_counter() - t0
            rec["error"] = (rec["error"] + "; " if rec["error"] else "") + f"reply: {type(e).__name__}: {e}"
            return
        finally:
            conn.close()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        rec["retry_after"] = hdrs.get("retry-after")
        if resp.status != 200:
            rec["aiaa_error"] = is_aiaa_error(data)
            rec["body"] = data[:300].decode("utf-8", "replace")
        elif self.kind == "session":
            try:
                rec["session_id"] = json.loads(data)["session_id"]
                rec["reply_ok"] = True
            except (ValueError, KeyError, TypeError) as e:
                rec["reply_ok"], rec["reply_error"] = False, f"no session_id: {e}"
        else:
            try:
                params, mask_bytes = click_reply_params(hdrs.get("content-type", ""), data)
                rec["reply_ok"] = True
                rec["latencies"] = params.get("latencies")
                rec["mask_bytes"] = mask_bytes
            except ValueError as e:
                rec["reply_ok"], rec["reply_error"] = False, str(e)


class BurstMonitor(threading.Thread):
    """Creates a small session with the CT, times a few idle clicks on it, sets self.ready, waits at the barrier,
    then clicks with the session in a loop until self.done is set (440: the session was evicted, made anew)."""

    IDLE_CLICKS = 3

    def __init__(self, host, port, timeout, session_body, session_headers, click, barrier):
        super().__init__(name="burst-monitor", daemon=True)
        self.host, self.port, self.timeout = host, port, timeout
        self.session_body, self.session_headers, self.click, self.barrier = session_body, session_headers, click, barrier
        self.ready, self.done = threading.Event(), threading.Event()
        self.sid = None
        self.records, self.idle_s, self.setup_problems, self.sessions_made = [], [], [], []

    def create(self):
        st, hd, data = http_request(self.host, self.port, "PUT", "/session/", self.session_body,
                                    self.session_headers, timeout=self.timeout)
        if st != 200:
            raise RuntimeError(f"session create: status {st} {data[:160]!r}")
        self.sid = json.loads(data)["session_id"]
        self.sessions_made.append(self.sid)

    def click_once(self):
        body_ct, body = encode_multipart([("params", json.dumps({"foreground": [list(self.click)], "background": []}))])
        t0 = time.perf_counter()
        st, hd, data = http_request(self.host, self.port, "POST", f"/v1/deepgrow?model={MODEL}&session_id={self.sid}",
                                    body, {"Content-Type": body_ct}, timeout=self.timeout)
        dt = time.perf_counter() - t0
        if st == 200:
            click_reply_params(hd.get("content-type", ""), data)  # ValueError if malformed
        return st, dt, data

    def run(self):
        try:
            self.create()
            for _ in range(self.IDLE_CLICKS):
                st, dt, data = self.click_once()
                if st == 200:
                    self.idle_s.append(dt)
                else:
                    self.setup_problems.append(f"idle click: status {st} {data[:160]!r}")
        except Exception as e:  # noqa: BLE001  (whatever it is, the burst must not wait for this thread)
            self.setup_problems.append(f"{type(e).__name__}: {e}")
        finally:
            self.ready.set()
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            return
        t_start = time.perf_counter()
        while not self.done.is_set() and self.sid is not None:
            rec = {"t_s": round(time.perf_counter() - t_start, 3), "status": None, "latency_s": None, "error": None}
            try:
                rec["status"], rec["latency_s"], data = self.click_once()
                if rec["status"] == 440:
                    self.create()
                elif rec["status"] == 503:
                    time.sleep(0.2)
            except (OSError, ValueError, KeyError, TypeError, RuntimeError, http.client.HTTPException) as e:
                rec["error"] = f"{type(e).__name__}: {e}"
                self.done.wait(0.2)
            self.records.append(rec)


def reset_peak_rss(pid) -> bool:
    """echo 5 > /proc/PID/clear_refs: VmHWM restarts from the current RSS. False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5\n")
        return True
    except OSError:
        return False


def run_burst(args, host, port, pid, server, image, click, big, ready_s) -> int:
    n = args.burst
    kinds = burst_kinds(n, args.burst_kind)
    session_ct, session_body = encode_multipart(files=[("image", args.image.name, image)])
    session_budget = args.session_memory_bytes if args.session_memory_bytes is not None else DEFAULT_SESSION_MEMORY
    try:
        h0 = health(host, port)
    except OSError as e:
        raise SystemExit(f"the server does not answer /health: {e}")
    budget = h0.get("inflight_budget_bytes")
    print(f"burst: {n} x {args.burst_kind} of {big['name']} {big['shape']}, {fmt_bytes(len(big['data']))} each"
          + (f" ({fmt_bytes(big['raw_bytes'])} raw)" if big["gzip"] else "") + f", one shared buffer; in-flight "
          f"budget {fmt_bytes(budget)}, session budget {fmt_bytes(session_budget)}"
          + ("" if args.session_memory_bytes is not None else " (the server's default)"), flush=True)
    if budget is not None and len(big["data"]) > budget:
        print(f"  note: one upload is larger than the in-flight budget; expect 413 (a failure here)", flush=True)

    barrier = threading.Barrier(n + 2, timeout=max(120.0, args.timeout))
    monitor = BurstMonitor(host, port, args.timeout, session_body, {"Content-Type": session_ct}, click, barrier)
    clients = [BurstClient(i, kinds[i], big, host, port, args.timeout, barrier) for i in range(n)]
    monitor.start()
    monitor.ready.wait()
    if monitor.setup_problems:
        print(f"  session clicker set-up: {monitor.setup_problems}", flush=True)
    for c in clients:
        c.start()
    rss_before = proc_status_kib(pid) if pid else None
    reset_ok = reset_peak_rss(pid) if pid else False
    if pid and not reset_ok:
        print("  note: cannot write /proc/PID/clear_refs; the peak is the sampled RSS", flush=True)
    sampler = RssSampler(pid, period=0.05) if pid else None
    if sampler:
        sampler.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        print("  the start barrier broke (a thread did not arrive in time)", flush=True)
    t0 = time.perf_counter()
    for c in clients:
        c.join()
    burst_s = time.perf_counter() - t0
    monitor.done.set()
    monitor.join(args.timeout + 5)
    if sampler:
        sampler.stop()
    hwm = proc_status_kib(pid, "VmHWM") if (pid and reset_ok) else None

    # ---- after: the server's state, then the burst's sessions (and the clicker's) are deleted
    server_alive = server.alive() if server else True
    if pid and not Path(f"/proc/{pid}").exists():
        server_alive = False
    h1 = None
    released_after_s = None
    t_h = time.perf_counter()
    while server_alive:
        try:
            h1 = health(host, port)
        except OSError:
            server_alive = False
            break
        if "inflight_bytes" not in h1:  # a server without the in-flight budget
            break
        if h1["inflight_bytes"] == 0:
            released_after_s = time.perf_counter() - t_h
            break
        if time.perf_counter() - t_h > 10:
            break
        time.sleep(0.2)
    records = [c.rec for c in clients]
    deleted = 0
    for sid in [r["session_id"] for r in records if r.get("session_id")] + monitor.sessions_made:
        try:
            st, _, _ = http_request(host, port, "DELETE", f"/session/{sid}", timeout=30)
            deleted += st == 200
        except OSError:
            pass
    rss_after = proc_status_kib(pid) if pid else None

    summary = summarize_burst(records, monitor.records, rss_before, hwm, sampler.peak if sampler else None,
                              budget, session_budget, args.burst_kind, server_alive, monitor.idle_s)
    if monitor.setup_problems:
        summary["problems"].append(f"session clicker set-up: {'; '.join(monitor.setup_problems)}")
        summary["failed"] = True
    print()
    print(format_burst_report(summary, records))
    print(f"burst took {burst_s:.2f} s; /health after: inflight_bytes {(h1 or {}).get('inflight_bytes')}"
          + (f" (0 after {released_after_s:.1f} s)" if released_after_s is not None else "")
          + f", sessions {(h1 or {}).get('sessions')}; deleted {deleted} sessions; RSS then {fmt_mib(rss_after)}")
    log_counts, log_bad = (log_levels(server.log_path) if server else (Counter(), []))
    if server:
        print(f"server log levels: {dict(log_counts)}")
        for line in log_bad[:10]:
            print(f"  {line[:300]}")
    print(f"server alive at the end: {server_alive}")
    print("RESULT: " + ("FAIL" if summary["failed"] else "PASS"))
    if args.json:
        out = {
            "mode": "burst",
            "config": {"burst": n, "burst_kind": args.burst_kind, "burst_mib": args.burst_mib, "gzip": big["gzip"],
                       "volume": {"name": big["name"], "shape": big["shape"], "bytes": len(big["data"]),
                                  "raw_bytes": big["raw_bytes"], "click": big["click"]},
                       "session_memory_bytes": session_budget,
                       "session_memory_bytes_given": args.session_memory_bytes is not None,
                       "image": str(args.image), "click": click,
                       "server_cmd": server.cmd if server else None,
                       "server_env": server.env_extra if server else None, "url": f"http://{host}:{port}"},
            "ready_s": ready_s, "burst_s": burst_s, "summary": summary, "clients": records,
            "session_clicks": monitor.records, "session_clicks_idle_ms": [x * 1000 for x in monitor.idle_s],
            "rss_kib": {"before": rss_before, "vm_hwm": hwm, "sampled_peak": sampler.peak if sampler else None,
                        "after_cleanup": rss_after, "samples": sampler.samples if sampler else []},
            "health": {"before": h0, "after": h1}, "inflight_released_after_s": released_after_s,
            "sessions_deleted": deleted, "cpu": cpu_model(), "cores": os.cpu_count(),
            "server_log_levels": dict(log_counts), "server_log_warn_error": log_bad[:50],
            "server_alive": server_alive, "failed": summary["failed"],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 1 if summary["failed"] else 0


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
    ap.add_argument("--baseline-n", type=int, default=5,
                    help="sequential session_create requests timed on the idle server before the load (default 5)")
    ap.add_argument("--big-mix", action="store_true",
                    help="add the big uploads to the mix: " + ", ".join(f"{k}={v}" for k, v in BIG_MIX_WEIGHTS.items()))
    ap.add_argument("--big-mib", type=float, default=200.0,
                    help="size of the generated big volume for --big-mix, MiB (default 200)")
    ap.add_argument("--big-gzip", action="store_true", help="send the big volume gzipped (compressed once, level 1)")
    ap.add_argument("--burst", type=int, metavar="N",
                    help="burst mode instead of the load: N big uploads at the same moment, one session clicking")
    ap.add_argument("--burst-mib", type=float, default=900.0, help="size of each burst upload, MiB (default 900)")
    ap.add_argument("--burst-kind", choices=("session", "click", "mixed"), default="session",
                    help="burst uploads: PUT /session/, clicks with the volume (params first), or alternating")
    ap.add_argument("--session-memory-bytes", type=int,
                    help="server --session-memory-bytes (passed when this script starts the server) and the session "
                         f"budget the burst report uses (default: the server's, {DEFAULT_SESSION_MEMORY})")
    ap.add_argument("--json", type=Path, help="write all results as JSON here")
    args = ap.parse_args(argv)
    if args.burst is not None and args.burst < 1:
        raise SystemExit("--burst needs at least 1 client")
    if args.burst is not None and args.big_mix:
        raise SystemExit("--burst runs instead of the load loop; --big-mix does not apply to it")

    if args.small:
        args.image = SMALL_CT
    image = args.image.read_bytes()
    shape = nifti_shape(image)
    click = tuple(int(v) for v in args.click.split(",")) if args.click else default_click(args.image, shape)
    weights = dict(WEIGHTS)
    if args.big_mix:
        weights.update(BIG_MIX_WEIGHTS)
    for w in args.weight:
        k, _, v = w.partition("=")
        if k not in weights:
            raise SystemExit(f"unknown kind {k!r}; kinds: {', '.join(weights)}")
        weights[k] = float(v)
    workers = args.workers or os.cpu_count() or 2
    clients = args.clients or 4 * workers

    # ---- the big volume, generated once and shared by every thread
    big = None
    big_mib = args.burst_mib if args.burst is not None else args.big_mib
    if args.burst is not None or any(weights.get(k, 0) > 0 for k in BIG_KINDS):
        t0 = time.perf_counter()
        big = build_big(make_big_volume(big_mib, 1 if args.big_gzip else None))
        print(f"generated {big['name']} {big['shape']}: {fmt_bytes(len(big['data']))}"
              + (f" gzipped from {fmt_bytes(big['raw_bytes'])}" if big["gzip"] else "")
              + f" in {time.perf_counter() - t0:.1f} s", flush=True)

    server = None
    if args.url:
        host, port = parse_url(args.url)
        pid = args.pid
        ready_s = None
    else:
        extra = ["--session-expiry", str(args.session_expiry), "--log-format", "json", *args.server_arg]
        if args.session_memory_bytes is not None:
            extra += ["--session-memory-bytes", str(args.session_memory_bytes)]
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
        if args.burst is not None:
            return run_burst(args, host, port, pid, server, image, click, big, ready_s)
        return run_load(args, host, port, pid, server, image, shape, click, weights, workers, clients, ready_s, big)
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


def run_load(args, host, port, pid, server, image, shape, click, weights, workers, clients, ready_s, big=None) -> int:
    session_ct, session_body = encode_multipart(files=[("image", args.image.name, image)])
    cfg = {
        "host": host, "port": port, "timeout": args.timeout, "session_expiry": args.session_expiry,
        "image": image, "image_name": args.image.name, "shape": shape, "click": click, "weights": weights,
        "session_body": session_body, "session_headers": {"Content-Type": session_ct}, "big": big,
    }
    load_before = os.getloadavg()
    h0 = health(host, port)
    time.sleep(1.0)
    rss_base = proc_status_kib(pid) if pid else None
    idle_creates, idle_problems = idle_session_creates(host, port, session_body, {"Content-Type": session_ct},
                                                       args.baseline_n, args.timeout)
    if args.baseline_n:
        print(f"session_create on the idle server: p50 {fmt_ms(median([x * 1000 for x in idle_creates]))} ms "
              f"(n {len(idle_creates)})" + (f"; problems: {idle_problems}" if idle_problems else ""), flush=True)
    if big is not None and any(weights.get(k, 0) > 0 for k in BIG_KINDS):
        print(f"big uploads: {big['name']} {big['shape']}, {fmt_bytes(len(big['data']))} sent"
              + (f" ({fmt_bytes(big['raw_bytes'])} raw)" if big["gzip"] else "") + f", click {list(big['click'])}; "
              + ", ".join(f"{k} weight {weights.get(k, 0):g}" for k in BIG_KINDS), flush=True)
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
    n5xx = sum(n for kind, c in stats.status.items() for s, n in c.items()
               if s >= 500 and s not in EXPECTED.get(kind, ()))
    n503_expected = sum(c.get(503, 0) for kind, c in stats.status.items() if 503 in EXPECTED.get(kind, ()))
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
    for kind in [*WEIGHTS, *sorted(k for k in stats.latency if k not in WEIGHTS)]:
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
              " / ".join(f"{s} {fmt_ms(median(stages[s]))}" for s in ("wait", "decode", "pre", "infer", "post", "write", "total")
                         if s in stages))
    print(f"440 for own sessions that aged out (expected): {stats.expired_440}")
    create_cmp, create_line = session_create_comparison(idle_creates, stats.latency.get("session_create", []))
    print(create_line)
    if n503_expected:
        print(f"503 for the big uploads (expected, with Retry-After and the AIAA error JSON unless listed below): "
              f"{n503_expected}")
    print(f"unexpected 5xx: {n5xx}; connection errors: {err_by_cat['connection_error']}; timeouts: {err_by_cat['timeout']}; "
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
            "session_create_unloaded_ms": [x * 1000 for x in idle_creates],
            "session_create_unloaded_problems": idle_problems, "session_create_vs_unloaded": create_cmp,
            "big": None if big is None else {"name": big["name"], "shape": big["shape"], "bytes": len(big["data"]),
                                             "raw_bytes": big["raw_bytes"], "gzip": big["gzip"],
                                             "click": big["click"], "mib": args.big_mib},
            "expected_503": n503_expected, "retry_after_missing": stats.retry_after_missing,
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
