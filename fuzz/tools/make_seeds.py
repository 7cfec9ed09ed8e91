#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (run from the repository root).

nifti_decode: the repository's NIfTI fixtures up to 128 KiB (plus gzip / gunzip variants) and synthetic
files for every datatype in both byte orders. http_request: raw-mode multipart bodies built from small
fixtures for every route and boundary, and a few structured-mode byte strings. click_params: the params
JSON every AIAA client sends, and malformed variants.
"""
import gzip
import hashlib
import json
import os
import random
import struct
import sys

ROOT = os.getcwd()
OUT = os.path.join(ROOT, "fuzz", "corpus")
MAX = 128 * 1024


def put(target, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def synthetic(shape, datatype, bitpix, data, big=False, qform=False, scl=(0.0, 0.0), ndim=3):
    e = ">" if big else "<"
    h = bytearray(352)
    struct.pack_into(e + "i", h, 0, 348)
    dims = [ndim] + list(shape) + [1] * (7 - len(shape))
    struct.pack_into(e + "8h", h, 40, *dims)
    struct.pack_into(e + "hh", h, 70, datatype, bitpix)
    struct.pack_into(e + "8f", h, 76, -1.0 if qform else 1.0, 0.8, 0.8, 2.5, 1, 1, 1, 1)
    struct.pack_into(e + "f", h, 108, 352.0)
    struct.pack_into(e + "ff", h, 112, *scl)
    if qform:
        struct.pack_into(e + "hh", h, 252, 1, 0)
        struct.pack_into(e + "6f", h, 256, 0.0, 0.0, 0.70710677, 1.0, 2.0, 3.0)
    else:
        struct.pack_into(e + "hh", h, 252, 0, 2)
        struct.pack_into(e + "12f", h, 280, -0.8, 0, 0, 10, 0, 0.8, 0, -20, 0, 0, 2.5, 30)
    h[344:348] = b"n+1\0"
    return bytes(h) + data


def fixtures():
    out = []
    for base in ["tests/fixtures/nifti_corpus", "tests/fixtures/nifti", "tests/fixtures/ct"]:
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for name in sorted(files):
                if name.endswith((".md", ".json")):
                    continue
                with open(os.path.join(dirpath, name), "rb") as f:
                    out.append((name, f.read()))
    return out


def nifti_decode():
    for name, data in fixtures():
        if len(data) <= MAX:
            put("nifti_decode", data)
        if data[:2] == b"\x1f\x8b":
            try:
                raw = gzip.decompress(data)
            except Exception:
                continue
            if len(raw) <= MAX:
                put("nifti_decode", raw)
        elif len(data) <= 16 * 1024:
            put("nifti_decode", gzip.compress(data, 1))
    types = [(2, 8, "B"), (256, 8, "b"), (4, 16, "h"), (512, 16, "H"), (8, 32, "i"), (768, 32, "I"),
             (1024, 64, "q"), (1280, 64, "Q"), (16, 32, "f"), (64, 64, "d")]
    for datatype, bitpix, fmt in types:
        for big in (False, True):
            n = 4 * 3 * 2
            values = [v % 100 for v in range(n)]
            data = struct.pack((">" if big else "<") + fmt * n, *values)
            put("nifti_decode", synthetic((4, 3, 2), datatype, bitpix, data, big))
    put("nifti_decode", synthetic((5, 4, 3), 4, 16, bytes(120), qform=True))
    put("nifti_decode", synthetic((5, 4, 3), 2, 8, bytes(range(60)), scl=(2.0, -3.0)))
    put("nifti_decode", gzip.compress(synthetic((8, 8, 4), 2, 8, bytes(256), big=True), 1))
    put("nifti_decode", synthetic((2, 2, 2, 1, 1), 2, 8, bytes(8), ndim=5))


BOUNDARIES = ["----------lImIt_of_THE_fIle_eW_$", "MIME_boundary_0123456789ABCDEF", "----WebKitFormBoundaryAbC123", "x"]


def multipart(boundary, params, file_name, file_field, data):
    parts = []
    if params is not None:
        parts.append(b'Content-Disposition: form-data; name="params"\r\n\r\n' + params.encode())
    if data is not None:
        disp = 'form-data; name="%s"' % file_field
        if file_name:
            disp += '; filename="%s"' % file_name
        parts.append(("Content-Disposition: %s\r\nContent-Type: application/octet-stream\r\n\r\n" % disp).encode() + data)
    body = b""
    for p in parts:
        body += b"--" + boundary.encode() + b"\r\n" + p + b"\r\n"
    return body + b"--" + boundary.encode() + b"--\r\n"


def http_request():
    vol = synthetic((16, 12, 3), 4, 16, struct.pack("<576h", *[(v * 37) % 2000 - 1000 for v in range(576)]))
    params = [
        '{"foreground":[[8,6,1]],"background":[],"current_point":[[8,6,1]],"spatial_size":[128,128]}',
        '{"foreground":[[8.5,6.2,2]],"background":[[1,1,2]],"current_point":[[8.5,6.2,2]],"result_extension":".nrrd","result_dtype":"uint16","result_compress":true}',
        '{"foreground":[[1,2,0]],"background":[[4,5,0]]}',
        '{"foreground":"[[3,3,1]]","slice":1,"result_extension":".nii.gz"}',
        '{}',
    ]
    for route in range(7):
        for kind in range(4):
            b = BOUNDARIES[kind]
            p = params[(route + kind) % len(params)]
            data = vol if (route + kind) % 3 else gzip.compress(vol, 1)
            field, fname = [("image", "C:\\data\\ct.nii"), ("datapoint", "/tmp/ct.nii.gz"), ("file", None), ("image", "ct.nii")][kind]
            body = multipart(b, p if route not in (2, 5) else None, fname, field, data)
            put("http_request", bytes([0, route, kind]) + body)
    put("http_request", bytes([0, 0, 0]) + multipart(BOUNDARIES[0], params[0], None, "image", None))
    put("http_request", bytes([0, 2, 8]) + b"not multipart")
    rng = random.Random(6)
    for n in (16, 64, 256, 1024, 4096):
        put("http_request", bytes([1]) + bytes(rng.randrange(256) for _ in range(n)))


def click_params():
    texts = [
        '{"foreground":[[10,20,5]],"background":[],"current_point":[[10,20,5]],"spatial_size":[128,128]}',
        '{"foreground":[[10,20,5]],"current_point":[10,20,5]}',
        '{"foreground":[[1,2,3]],"background":[[4,5,3]]}',
        '{"foreground":[[250.7,100.2,3]],"background":[],"current_point":[[250.7,100.2,3]],"result_extension":".nrrd","result_dtype":"uint16","result_compress":true}',
        '{"foreground":[[1,2,3]],"current_point":[[1,2,3]],"slice":7}',
        '{"foreground":"[[30,40,1]]","background":"[[3,4,1]]","slice":"1","result_extension":".nii","result_compress":"yes"}',
        '{"foreground":[[0,0,0]],"background":[[63,63,0]],"result_extension":"nii.gz","result_dtype":"UINT8","result_compress":0}',
        '{"foreground":[[5,5,0],[500,500,0]],"background":[[0.5,899.9,1]]}',
        '{"background":[[3,3,2]],"current_point":[]}',
        '', 'null', '{}', '{', '[1,2]', '{"foreground":[[1,2]]}', '{"foreground":[["a",2,3]]}',
        '{"foreground":5}', '{"slice":2.5,"foreground":[[1,2,3]]}', '{"result_extension":".png"}',
        '{"foreground":[[1e300,0,0]]}', '{"foreground":[[-0.5,-0.9,0]],"slice":-0}',
    ]
    for t in texts:
        put("click_params", t.encode())


if __name__ == "__main__":
    for f in (nifti_decode, http_request, click_params):
        f()
    for t in os.listdir(OUT):
        files = os.listdir(os.path.join(OUT, t))
        print(t, len(files), sum(os.path.getsize(os.path.join(OUT, t, n)) for n in files))
