#!/usr/bin/env python3
"""The same click through the AIAA and the MONAI Label API, with a session and with the upload, interleaved (the four
requests in turn, the order reversed every round), against a running server; prints median and min ms per case.

    tools/compare_apis.py PORT CT.nii.gz ROUNDS SLICE     e.g. tools/compare_apis.py 5000 /tmp/ct200.nii.gz 12 100
"""
import http.client, json, statistics, sys, time, uuid
host, port = "127.0.0.1", int(sys.argv[1]); path = sys.argv[2]; rounds = int(sys.argv[3]); k = int(sys.argv[4])
data = open(path, "rb").read()
def form(parts):
    b = uuid.uuid4().hex; body = b""
    for name, filename, payload in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{b}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + payload + b"\r\n"
    return b, body + f"--{b}--\r\n".encode()
def post(method, target, parts):
    b, body = form(parts); c = http.client.HTTPConnection(host, port, timeout=600)
    t = time.perf_counter(); c.request(method, target, body, {"Content-Type": f"multipart/form-data; boundary={b}"})
    r = c.getresponse(); out = r.read(); dt = time.perf_counter() - t; c.close()
    assert r.status == 200, (r.status, out[:300]); return dt, out
params = json.dumps({"label": "liver", "foreground": [[300, 250, k]], "background": [[100, 100, k]], "slice": k,
                     "result_extension": ".nrrd", "result_dtype": "uint8"}).encode()
_, out = post("PUT", "/session/", [("files", "ct.nii.gz", data)]); sid = json.loads(out)["session_id"]
cases = {"aiaa_session": ("POST", f"/v1/deepgrow?model=deepgrow_2d&session_id={sid}", [("params", None, params)]),
         "monai_session": ("POST", f"/infer/deepgrow_2d?image=ct&session_id={sid}", [("params", None, params)]),
         "aiaa_upload": ("POST", "/v1/deepgrow?model=deepgrow_2d", [("params", None, params), ("datapoint", "ct.nii.gz", data)]),
         "monai_file": ("POST", "/infer/deepgrow_2d", [("params", None, params), ("file", "ct.nii.gz", data)])}
times = {name: [] for name in cases}
for name in cases: post(*cases[name])  # warm-up
for r in range(rounds):
    order = list(cases) if r % 2 == 0 else list(reversed(cases))
    for name in order: times[name].append(post(*cases[name])[0])
print(json.dumps({n: {"median_ms": round(1000 * statistics.median(t), 1), "min_ms": round(1000 * min(t), 1)} for n, t in times.items()}))
