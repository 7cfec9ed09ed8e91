#!/usr/bin/env python3
"""Fleet test for deepgrow-server (issue 13). Standard library only; Debian's redis-server and nginx.

On loopback it starts redis-server, R replicas of the server (`--session-store redis://...`, `--shutdown-delay`)
and nginx as their load balancer (round robin: the worst case for the replicas' local caches), then:

1. Throughput: C clients click their own session for --throughput-s seconds, first against one replica
   directly, then through nginx against all R. Reported: clicks/s, p50/p95.
2. Chaos: C clients, through nginx, each create a session, click it --clicks times, create the next, and so
   on, for --duration seconds. At 30 % of it one replica is SIGKILLed (and stays dead); at 55 % another gets
   SIGTERM, and is started again once it has exited.
3. Every session created is then clicked again through nginx and through each live replica directly.

Before these, with --cache-mib M (one or more sizes), a cache miss is measured against a hit: for each size a
generated 512 x 512 x k int16 CT-like volume of M MiB (tools/loadtest.py's phantom, gzipped) is made a session through
replica 0, then clicked --cache-n times through replica 1, each time after replica 1 dropped its cached copy
(a miss: the volume comes from Redis), and as often while it holds it (a hit). Reported: click latency
p50 of each, and replica 1's fetch time (deepgrow_session_fetch_seconds).

Every 200 click reply's mask must equal the first mask its session gave (same click, same model). Reported:
sessions lost (a session that answered anything but 200 with its own mask, at any time; goal 0), 5xx and
connection errors (goal 0, apart from requests in flight on the killed replica, counted apart), p50/p95
click latency, and the replicas' cache hits and misses from their /metrics. Exits 1 if a session was lost, a
mask differed, or a 5xx or connection error happened outside the killed replica's in-flight window.

    python3 tools/fleet.py --binary target/release/deepgrow-server --json /tmp/fleet.json
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadtest as lt  # noqa: E402  (the shared HTTP, multipart and server-process helpers)

REPO = lt.REPO


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not happen within {timeout} s")


class Redis:
    def __init__(self, workdir: Path):
        self.port = lt.free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, 20, "redis-server answering PING")

    def ping(self) -> bool:
        import socket
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


NGINX_CONF = """
# workers as this user (under root they would be nobody's, who cannot write the temp paths here)
user {user};
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
daemon off;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # whole CT volumes, and clicks that may queue
    client_max_body_size 1g;
    proxy_read_timeout 600s;
    proxy_send_timeout 600s;
    upstream deepgrow {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://deepgrow;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # A click is a pure function of its session and its clicks: one that failed on a dying replica is
            # safe to send to the next (the body is buffered, so it can be).
            proxy_next_upstream error timeout non_idempotent;
            proxy_next_upstream_tries 3;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, workdir: Path, upstreams: list[int]):
        self.port = lt.free_port()
        self.dir = workdir / "nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in upstreams)
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, servers=servers, port=self.port, user=getpass.getuser()))
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def up():
            try:
                return lt.http_request("127.0.0.1", self.port, "GET", "/health", timeout=2)[0] == 200
            except OSError:
                return False
        wait_for(up, 20, "nginx proxying /health")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class Fleet:
    def __init__(self, args, workdir: Path, replicas: int, balanced=True, extra=None):
        """`extra`: more flags for some replicas, by index."""
        self.args = args
        self.redis = Redis(workdir)
        self.replicas = []
        for n in range(replicas):
            server = lt.ServerProcess(
                binary=args.binary, models_dir=args.models_dir, log_path=workdir / f"replica{n}.log",
                extra_args=["--session-store", self.redis.url, "--shutdown-delay", str(args.shutdown_delay),
                            "--inference-threads", str(args.inference_threads), "--workers", "1",
                            "--decode-workers", "1", *(extra or {}).get(n, [])])
            self.replicas.append(server)
        for server in self.replicas:
            server.start()
        for server in self.replicas:
            server.wait_ready()
        self.nginx = Nginx(workdir, [s.port for s in self.replicas]) if balanced else None

    def restart(self, server: lt.ServerProcess) -> dict:
        """SIGTERM, wait for the exit (in-flight requests finish first), start it again on its port."""
        t0 = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(120)
        exited = time.perf_counter() - t0
        server._log.close()
        server.start()
        server.wait_ready()
        return {"exit_code": code, "exit_s": round(exited, 2), "back_s": round(time.perf_counter() - t0, 2)}

    def stop(self):
        for server in self.replicas:
            if server.alive():
                server.proc.kill()
                server.proc.wait()
        if self.nginx:
            self.nginx.stop()
        self.redis.stop()


def mask_of(status, headers, body) -> bytes | None:
    if status != 200:
        return None
    parts = lt.parse_multipart(headers.get("content-type", ""), body)
    files = [p for p in parts if p["filename"] is not None]
    return files[0]["data"] if len(files) == 1 else None


class Sessions:
    """Every session created, its reference mask, and whether it was ever lost."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reference: dict[str, bytes] = {}
        self.lost: dict[str, str] = {}
        self.wrong_masks = 0

    def check(self, sid: str, status: int, mask: bytes | None, where: str):
        with self.lock:
            if status == 440 or status == 404:
                self.lost.setdefault(sid, f"{status} from {where}")
            elif status == 200 and mask is not None:
                ref = self.reference.setdefault(sid, mask)
                if ref != mask:
                    self.wrong_masks += 1
                    self.lost.setdefault(sid, f"a different mask from {where}")


class Client(threading.Thread):
    """Clicks through `port` until `stop_at`: its own `session` alone (the throughput runs), or sessions it
    creates, `clicks_per_session` clicks each (the chaos run). Every reply is recorded and checked."""

    def __init__(self, port, sessions: Sessions, upload, params, where="the load balancer", stop_at=0.0,
                 clicks_per_session=None, session=None):
        super().__init__(daemon=True)
        self.port, self.sessions, self.where, self.stop_at = port, sessions, where, stop_at
        self.clicks_per_session, self.session = clicks_per_session, session
        self.upload, self.params = upload, params
        self.records = []  # (kind, start, end, status or None, error)
        self.created = []

    def request(self, kind, method, path, body=None, headers=None):
        start = time.perf_counter()
        try:
            status, rh, data = lt.http_request("127.0.0.1", self.port, method, path, body=body, headers=headers,
                                               timeout=120)
            self.records.append((kind, start, time.perf_counter(), status, None))
            return status, rh, data
        except OSError as error:
            self.records.append((kind, start, time.perf_counter(), None, repr(error)))
            return None, {}, b""

    def create(self) -> str | None:
        ct, body = self.upload
        status, _, data = self.request("create", "PUT", "/session/?expiry=3600", body, {"Content-Type": ct})
        if status != 200:
            return None
        sid = json.loads(data)["session_id"]
        self.created.append(sid)
        return sid

    def click(self, sid: str) -> int | None:
        ct, body = self.params
        status, rh, data = self.request("click", "POST", f"/v1/deepgrow?model={lt.MODEL}&session_id={sid}", body,
                                        {"Content-Type": ct})
        if status is not None:
            self.sessions.check(sid, status, mask_of(status, rh, data), self.where)
        return status

    def run(self):
        if self.session is not None:
            while time.perf_counter() < self.stop_at:
                self.click(self.session)
            return
        sid, done = None, 0
        while time.perf_counter() < self.stop_at:
            if sid is None or (self.clicks_per_session and done >= self.clicks_per_session):
                sid, done = self.create(), 0
                if sid is None:
                    time.sleep(0.2)
                    continue
            self.click(sid)
            done += 1


def summarize(records, t0: float, kill_at: float | None):
    clicks = [r for r in records if r[0] == "click"]
    ok = [r for r in clicks if r[3] == 200]
    lat = [(r[2] - r[1]) * 1000 for r in ok]
    failures = [r for r in records if r[3] is None or r[3] >= 500]
    in_flight = [r for r in failures if kill_at is not None and r[1] <= kill_at <= r[2] + 0.05]
    span = (max(r[2] for r in records) - min(r[1] for r in records)) if records else 0.0
    return {
        "requests": len(records),
        "clicks_ok": len(ok),
        "clicks_per_s": round(len(ok) / span, 2) if span else 0.0,
        "click_p50_ms": round(lt.percentile(lat, 50) or 0, 1),
        "click_p95_ms": round(lt.percentile(lat, 95) or 0, 1),
        "5xx_or_errors": len(failures),
        "5xx_or_errors_in_flight_on_killed": len(in_flight),
        "5xx_or_errors_elsewhere": len(failures) - len(in_flight),
        "statuses": {str(s): sum(1 for r in records if r[3] == s) for s in sorted({r[3] for r in records}, key=str)},
        "failure_examples": [(r[0], round(r[1] - t0, 2), r[3], r[4]) for r in failures[:5]],
    }


def throughput(args, port: int, upload, params, seconds: float) -> dict:
    sessions = Sessions()
    clients = []
    for _ in range(args.clients):
        setup = Client(port, sessions, upload, params)
        sid = setup.create()
        setup.click(sid)  # warm: the first click of a session may be a cache miss
        clients.append(Client(port, sessions, upload, params, session=sid))
    stop_at = time.perf_counter() + seconds
    for c in clients:
        c.stop_at = stop_at
        c.start()
    for c in clients:
        c.join()
    result = summarize([r for c in clients for r in c.records], 0, None)
    result["sessions_lost"] = len(sessions.lost)
    return result


def cache_miss_vs_hit(fleet: Fleet, mib: float, n: int) -> dict:
    """Click latency on replica 1 (run with --max-sessions 1) with the session's volume fetched from Redis (a
    miss) and held (a hit)."""
    # gzipped, as viewers send volumes: the reply's mask is then small, and the click's time is the click's
    volume = lt.make_big_volume(mib, gzip_level=1)
    ct, body = lt.encode_multipart(files=[("image", volume["name"], volume["data"])])
    creator, clicker = fleet.replicas[0], fleet.replicas[1]
    status, _, data = lt.http_request("127.0.0.1", creator.port, "PUT", "/session/?expiry=600", body,
                                      {"Content-Type": ct})
    if status != 200:
        raise RuntimeError(f"session of {mib} MiB: {status} {data[:200]!r}")
    sid = json.loads(data)["session_id"]
    pct, params = lt.encode_multipart(fields=[("params", json.dumps({"foreground": [list(volume["click"])],
                                                                     "background": []}))])
    path = f"/v1/deepgrow?model={lt.MODEL}&session_id={sid}"

    def click_ms():
        t = time.perf_counter()
        status, _, _ = lt.http_request("127.0.0.1", clicker.port, "POST", path, params, {"Content-Type": pct})
        if status != 200:
            raise RuntimeError(f"click: {status}")
        return (time.perf_counter() - t) * 1000

    def fetch_seconds():
        text = lt.http_request("127.0.0.1", clicker.port, "GET", "/metrics")[2].decode()
        return metric_sum(text, "deepgrow_session_fetch_seconds_sum"), metric_sum(
            text, "deepgrow_session_fetch_seconds_count")

    miss, hit = [], []
    sum0, count0 = fetch_seconds()
    for _ in range(n):
        # replica 1 holds one volume: a session of its own evicts this one's from its cache (not from Redis)
        filler = lt.http_request("127.0.0.1", clicker.port, "PUT", "/session/?expiry=600", body,
                                 {"Content-Type": ct})
        filler_sid = json.loads(filler[2])["session_id"]
        miss.append(click_ms())
        hit.append(click_ms())
        lt.http_request("127.0.0.1", clicker.port, "DELETE", f"/session/{filler_sid}")
    sum1, count1 = fetch_seconds()
    lt.http_request("127.0.0.1", creator.port, "DELETE", f"/session/{sid}")
    return {"mib": mib, "shape": volume["shape"], "n": n,
            "miss_click_p50_ms": round(lt.percentile(miss, 50), 1),
            "hit_click_p50_ms": round(lt.percentile(hit, 50), 1),
            "fetch_mean_ms": round((sum1 - sum0) / max(1.0, count1 - count0) * 1000, 1),
            "fetches": int(count1 - count0)}


def metric_sum(text: str, name: str, label: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=str(lt.DEFAULT_BINARY))
    p.add_argument("--models-dir", default=str(lt.DEFAULT_MODELS))
    p.add_argument("--image", default=str(lt.SMALL_CT))
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--clicks", type=int, default=5, help="clicks per session in the chaos phase")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of the chaos phase (0: skip the fleet)")
    p.add_argument("--throughput-s", type=float, default=15.0, help="seconds of each throughput run (0: skip)")
    p.add_argument("--inference-threads", type=int, default=1)
    p.add_argument("--shutdown-delay", type=float, default=1.0)
    p.add_argument("--cache-mib", type=float, nargs="*", default=[],
                   help="volume sizes (MiB) to measure a cache miss against a hit with (needs --cache-n)")
    p.add_argument("--cache-n", type=int, default=5)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    if args.replicas < 3:
        p.error("the chaos phase kills one replica and restarts another: --replicas 3 at least")

    image = Path(args.image)
    data = image.read_bytes()
    click = list(lt.default_click(image, lt.nifti_shape(data)))
    upload = lt.encode_multipart(files=[("image", image.name, data)])
    params = lt.encode_multipart(fields=[("params", json.dumps({"foreground": [click], "background": []}))])

    workdir = Path(tempfile.mkdtemp(prefix="deepgrow-fleet-"))
    report = {"cpu": lt.cpu_model(), "cores": os.cpu_count(), "replicas": args.replicas, "clients": args.clients,
              "image": image.name, "click": click, "binary": args.binary}
    if args.cache_mib:
        pair = Fleet(args, workdir, 2, balanced=False, extra={1: ["--max-sessions", "1"]})
        try:
            report["cache"] = [cache_miss_vs_hit(pair, mib, args.cache_n) for mib in args.cache_mib]
        finally:
            pair.stop()
    if args.duration <= 0:
        print(json.dumps(report, indent=2))
        return 0
    fleet = Fleet(args, workdir, args.replicas)
    try:
        if args.throughput_s > 0:
            report["throughput_1_replica"] = throughput(args, fleet.replicas[0].port, upload, params,
                                                        args.throughput_s)
            report["throughput_all_replicas"] = throughput(args, fleet.nginx.port, upload, params,
                                                           args.throughput_s)

        sessions = Sessions()
        t0 = time.perf_counter()
        stop_at = t0 + args.duration
        clients = [Client(fleet.nginx.port, sessions, upload, params, stop_at=stop_at,
                          clicks_per_session=args.clicks) for _ in range(args.clients)]
        for c in clients:
            c.start()
        killed, restarted = fleet.replicas[0], fleet.replicas[1]
        time.sleep(args.duration * 0.3)
        kill_at = time.perf_counter()
        killed.proc.kill()
        killed.proc.wait()
        time.sleep(max(0.0, t0 + args.duration * 0.55 - time.perf_counter()))
        report["restart"] = fleet.restart(restarted)
        for c in clients:
            c.join()
        chaos = summarize([r for c in clients for r in c.records], t0, kill_at)
        chaos["kill_at_s"] = round(kill_at - t0, 2)

        # every session, through the balancer and through each live replica
        created = [sid for c in clients for sid in c.created]
        checker = Client(fleet.nginx.port, sessions, upload, params)
        direct = {server.port: Client(server.port, sessions, upload, params, where=f"replica :{server.port}")
                  for server in fleet.replicas if server.alive()}
        for sid in created:
            checker.click(sid)
            for port, client in direct.items():
                status = client.click(sid)
                if status != 200:
                    sessions.lost.setdefault(sid, f"{status} from replica :{port} at the end")
        chaos["sessions_created"] = len(created)
        chaos["sessions_lost"] = len(sessions.lost)
        chaos["lost_examples"] = list(sessions.lost.items())[:5]
        chaos["wrong_masks"] = sessions.wrong_masks
        cache = {}
        for server in fleet.replicas:
            if server.alive():
                _, _, text = lt.http_request("127.0.0.1", server.port, "GET", "/metrics")
                text = text.decode()
                cache[str(server.port)] = {
                    result: metric_sum(text, "deepgrow_session_cache_total", f'result="{result}"')
                    for result in ("hit", "miss", "gone")}
        chaos["cache_by_replica"] = cache
        report["chaos"] = chaos
    finally:
        fleet.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    bad = (report["chaos"]["sessions_lost"] or report["chaos"]["wrong_masks"]
           or report["chaos"]["5xx_or_errors_elsewhere"] or report["restart"]["exit_code"] != 0)
    if not bad:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"FAILED; logs in {workdir}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
