#!/usr/bin/env python3
"""Time Python DICOM readers on a 512 x 512 x N CT series, so BENCHMARKS.md can set the Rust decoder beside them.

It builds two series of N slices (default 200) from the project's fixtures, one per transfer syntax:

  explicit_le   tests/fixtures/dicom/transfer_syntaxes/slice10_explicit_le.dcm  (1.2.840.10008.1.2.1, uncompressed)
  j2k_lossless  tests/fixtures/dicom/ct_series_j2k/slice_10.dcm                  (1.2.840.10008.1.2.4.90)

Slice k is a copy of the source with ImagePositionPatient z = z0 + 2.0*k (x, y kept), InstanceNumber k+1,
SliceLocation z (if the source has one), a fresh SOPInstanceUID (also in the file meta) and one
SeriesInstanceUID per series; the pixel data bytes are untouched (the J2K codestream is the source's), and the
original transfer syntax is kept (pydicom save_as with enforce_file_format=True). Files are
<out>/<series>/slice_0000.dcm ... (older slice_*.dcm files there are removed first).

Then, per series and decoder, it times --rounds whole reads: parse every file from bytes already in memory (the
files are read before the timing), decode the pixel data, apply RescaleSlope/Intercept to int16 HU and stack a
(N, 512, 512) int16 volume sorted by ImagePositionPatient z. Decoders:

  pydicom        pydicom 3 parse; numpy for uncompressed, pylibjpeg + pylibjpeg-openjpeg (C OpenJPEG) for J2K
  pydicom-gdcm   pydicom 3 parse, GDCM codec (pydicom's "gdcm" decoding plugin, python-gdcm); J2K only, since
                 pydicom decodes native (uncompressed) data itself
  gdcm           python-gdcm alone: gdcm.ImageReader parses and decodes each file. python-gdcm can only read from
                 a path, so this decoder reads the files from the page cache (warmed before the timing), not
                 from the in-memory bytes

All runs are single-threaded (OMP/OPENBLAS/MKL/OPJ threads = 1, no multiprocessing), except the --jobs J
variant (default 2; 1 switches it off): a concurrent.futures.ProcessPoolExecutor (fork, created and warmed
outside the timing) whose J workers each parse and decode a contiguous share of the slices and send back their
HU slices; the parent sorts and stacks. Before the timing each decoder's volume is checked once: it must equal
every other decoder's, and every slice must equal (stored - 1024) of the source, read straight from the
uncompressed fixture's PixelData.

A JSON summary goes to stdout (and to --json FILE): per series x decoder x jobs the median and min seconds, the
HU output rate in MB/s (N*512*512*2 bytes / seconds, MB = 10^6 bytes), the input bytes, plus the CPU model and
its AVX2/AVX-512/AMX flags and the package versions. Progress goes to stderr.

    tools/.venv/bin/python tools/compare_dicom.py                               # 200 slices, 5 rounds, jobs 1 and 2
    tools/.venv/bin/python tools/compare_dicom.py --slices 4 --rounds 1         # quick sanity run
    tools/.venv/bin/python tools/compare_dicom.py --decoders pydicom --jobs 1 --json /tmp/dicom.json
    tools/.venv/bin/python tools/compare_dicom.py --write-only --out /tmp/ct200  # just write the two series
    tools/.venv/bin/python tools/compare_dicom.py --out /tmp/ct200              # write (keep) and time them
"""

from __future__ import annotations

import os

# Single-threaded decoders: set before numpy (and anything linking OpenMP/BLAS/OpenJPEG) is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS", "OPJ_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import copy  # noqa: E402
import importlib.metadata  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
FIXTURES = REPO / "tests" / "fixtures" / "dicom"
# series name -> (source fixture, expected transfer syntax UID)
SERIES = {
    "explicit_le": (FIXTURES / "transfer_syntaxes" / "slice10_explicit_le.dcm", "1.2.840.10008.1.2.1"),
    "j2k_lossless": (FIXTURES / "ct_series_j2k" / "slice_10.dcm", "1.2.840.10008.1.2.4.90"),
}
# The uncompressed fixture's PixelData is the decoder-free reference of the stored values (both fixtures hold
# the same slice: the J2K one is its lossless encoding).
REFERENCE = SERIES["explicit_le"][0]
DECODERS = ("pydicom", "pydicom-gdcm", "gdcm")
Z_STEP = 2.0
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
VERSION_PACKAGES = ("pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "numpy", "python-gdcm")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- building


def write_series(out_dir: Path, n: int) -> dict:
    """Write the two series of n slices under out_dir/<series>/slice_NNNN.dcm; returns {series: info}."""
    import pydicom
    from pydicom.uid import generate_uid

    info = {}
    for name, (src_path, tsyntax) in SERIES.items():
        src = pydicom.dcmread(src_path)
        if str(src.file_meta.TransferSyntaxUID) != tsyntax:
            raise SystemExit(f"{src_path}: transfer syntax {src.file_meta.TransferSyntaxUID}, expected {tsyntax}")
        pixel_bytes = bytes(src.PixelData)
        x, y, z0 = (float(v) for v in src.ImagePositionPatient)
        series_uid = generate_uid()
        d = out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("slice_*.dcm"):  # a longer earlier series in the same --out
            stale.unlink()
        paths = series_paths(d, n)
        for k in range(n):
            ds = copy.deepcopy(src)
            z = z0 + Z_STEP * k
            ds.ImagePositionPatient = [x, y, z]
            if "SliceLocation" in ds:
                ds.SliceLocation = z
            ds.InstanceNumber = k + 1
            sop_uid = generate_uid()
            ds.SOPInstanceUID = sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.SeriesInstanceUID = series_uid
            assert bytes(ds.PixelData) == pixel_bytes
            ds.save_as(paths[k], enforce_file_format=True)
        info[name] = {
            "dir": str(d),
            "source": str(src_path.relative_to(REPO)),
            "transfer_syntax": tsyntax,
            "files": n,
            "input_bytes": sum(p.stat().st_size for p in paths),
            "pixel_data_bytes": n * len(pixel_bytes),
            "z0": z0,
            "z_step": Z_STEP,
        }
    return info


def series_paths(d: Path, n: int) -> list[Path]:
    return [Path(d) / f"slice_{k:04d}.dcm" for k in range(n)]


# ---------------------------------------------------------------------------------------------------- decoding


def to_hu(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """stored * slope + intercept as int16 (integer arithmetic when slope is 1 and the intercept integral)."""
    if slope == 1 and float(intercept).is_integer():
        return np.add(stored, np.int32(intercept), dtype=np.int32).astype(np.int16)
    return np.rint(stored * np.float64(slope) + np.float64(intercept)).astype(np.int16)


def _pydicom_slice(blob: bytes, plugin: str | None) -> tuple[float, np.ndarray]:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(blob))
    if plugin is not None:
        ds.pixel_array_options(decoding_plugin=plugin)
    stored = ds.pixel_array
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return float(ds.ImagePositionPatient[2]), to_hu(stored, slope, intercept)


_GDCM_DTYPES = {"UINT16": "<u2", "INT16": "<i2", "UINT8": "u1", "INT8": "i1", "UINT32": "<u4", "INT32": "<i4"}


def _gdcm_slice(path: str) -> tuple[float, np.ndarray]:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(path)
    if not reader.Read():
        raise RuntimeError(f"gdcm could not read {path}")
    img = reader.GetImage()
    cols, rows = img.GetDimension(0), img.GetDimension(1)
    dtype = _GDCM_DTYPES[img.GetPixelFormat().GetScalarTypeAsString()]
    # python-gdcm hands the buffer back as a str of surrogate-escaped bytes (as pydicom's gdcm plugin reads it).
    buf = img.GetBuffer().encode("utf-8", "surrogateescape")
    stored = np.frombuffer(buf, dtype=dtype).reshape(rows, cols)
    return float(img.GetOrigin()[2]), to_hu(stored, img.GetSlope(), img.GetIntercept())


def decode_slice(decoder: str, series: str, blob: bytes, path: str) -> tuple[float, np.ndarray]:
    """(z, HU slice) of one file, with the named decoder."""
    if decoder == "pydicom":
        return _pydicom_slice(blob, "pylibjpeg" if series == "j2k_lossless" else None)
    if decoder == "pydicom-gdcm":
        return _pydicom_slice(blob, "gdcm")
    if decoder == "gdcm":
        return _gdcm_slice(path)
    raise ValueError(decoder)


def stack_sorted(items: list[tuple[float, np.ndarray]]) -> tuple[np.ndarray, list[float]]:
    items = sorted(items, key=lambda t: t[0])
    return np.stack([a for _, a in items]), [z for z, _ in items]


def read_series(decoder: str, series: str, blobs: list[bytes], paths: list[str]):
    """The timed unit, single-threaded: every file -> (N, rows, cols) int16 HU sorted by z, and the z list."""
    return stack_sorted([decode_slice(decoder, series, b, p) for b, p in zip(blobs, paths)])


# Parallel variant: the in-memory files sit in this module global before the (fork) pool is made, so the workers
# inherit them and are sent only index ranges.
_SHARED: dict = {}


def _worker_chunk(decoder: str, series: str, lo: int, hi: int):
    blobs, paths = _SHARED[series]
    items = [decode_slice(decoder, series, blobs[i], paths[i]) for i in range(lo, hi)]
    return [z for z, _ in items], np.stack([a for _, a in items])


def chunks(n: int, jobs: int) -> list[tuple[int, int]]:
    """jobs contiguous [lo, hi) ranges covering range(n), sizes differing by at most one (empty ones dropped)."""
    q, r = divmod(n, jobs)
    out, lo = [], 0
    for j in range(jobs):
        hi = lo + q + (1 if j < r else 0)
        if hi > lo:
            out.append((lo, hi))
        lo = hi
    return out


def read_series_parallel(pool, jobs: int, decoder: str, series: str, n: int):
    futs = [pool.submit(_worker_chunk, decoder, series, lo, hi) for lo, hi in chunks(n, jobs)]
    items = []
    for f in futs:
        zs, arr = f.result()
        items.extend(zip(zs, arr))
    return stack_sorted(items)


# ---------------------------------------------------------------------------------------------------- availability


def decoder_available(decoder: str, series: str) -> str | None:
    """None if the decoder can run on the series, else why not."""
    try:
        import pydicom  # noqa: F401
    except ImportError as e:
        if decoder != "gdcm":
            return f"pydicom not importable: {e}"
    if decoder in ("pydicom-gdcm", "gdcm"):
        try:
            import gdcm  # noqa: F401
        except ImportError as e:
            return f"missing: python-gdcm not importable ({e})"
        if decoder == "pydicom-gdcm" and series == "explicit_le":
            return "not applicable: pydicom decodes native (uncompressed) pixel data itself, without plugins"
    if decoder == "pydicom" and series == "j2k_lossless":
        try:
            import openjpeg  # noqa: F401
            import pylibjpeg  # noqa: F401
        except ImportError as e:
            return f"missing: pylibjpeg / pylibjpeg-openjpeg not importable ({e})"
    if decoder == "pydicom-gdcm":
        from pydicom.pixels.decoders import JPEG2000LosslessDecoder

        if "gdcm" not in JPEG2000LosslessDecoder.available_plugins:
            return "missing: pydicom's gdcm plugin is not available"
    return None


# ---------------------------------------------------------------------------------------------------- reporting


def cpu_info(cpuinfo_text: str | None = None) -> dict:
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo_text = ""
    model, flags = None, set()
    for line in cpuinfo_text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = val.strip()
        elif key == "flags" and not flags:
            flags = set(val.split())
    model = model or platform.processor() or None
    out = {"model": model, "logical_cpus": os.cpu_count()}
    out.update({f: f in flags for f in CPU_FLAGS})
    out["amx"] = any(f.startswith("amx") for f in flags)
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        from openjpeg.utils import get_openjpeg_version

        out["openjpeg_c"] = ".".join(map(str, get_openjpeg_version()))
    except Exception:  # noqa: BLE001
        out["openjpeg_c"] = None
    try:
        import gdcm

        out["gdcm_c"] = gdcm.Version.GetVersion()
    except Exception:  # noqa: BLE001
        out["gdcm_c"] = None
    return out


def summarize(times: list[float], out_bytes: int) -> dict:
    med, best = statistics.median(times), min(times)
    return {
        "median_s": round(med, 6),
        "min_s": round(best, 6),
        "mb_s_median": round(out_bytes / med / 1e6, 2),
        "mb_s_best": round(out_bytes / best / 1e6, 2),
        "times_s": [round(t, 6) for t in times],
    }


# ---------------------------------------------------------------------------------------------------- checks


def reference_hu() -> np.ndarray:
    """(stored - 1024) of the source slice, from the uncompressed fixture's PixelData without any decoder."""
    import pydicom

    ds = pydicom.dcmread(REFERENCE)
    if (ds.BitsAllocated, ds.PixelRepresentation, ds.SamplesPerPixel) != (16, 0, 1):
        raise SystemExit(f"{REFERENCE}: expected 16-bit unsigned single-sample pixels")
    if float(ds.RescaleSlope) != 1 or float(ds.RescaleIntercept) != -1024:
        raise SystemExit(f"{REFERENCE}: expected RescaleSlope 1, RescaleIntercept -1024")
    stored = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
    return (stored.astype(np.int32) - 1024).astype(np.int16)


def check_volume(vol: np.ndarray, zs: list[float], n: int, z0: float, ref: np.ndarray) -> str | None:
    """None if vol is the expected (n, rows, cols) int16 volume sorted by z, else what is wrong."""
    if vol.shape != (n, *ref.shape) or vol.dtype != np.int16:
        return f"shape/dtype {vol.shape} {vol.dtype}, expected {(n, *ref.shape)} int16"
    if not np.allclose(zs, [z0 + Z_STEP * k for k in range(n)]):
        return f"z not sorted z0 + {Z_STEP}*k: {zs[:4]}..."
    bad = [k for k in range(n) if not np.array_equal(vol[k], ref)]
    if bad:
        return f"slices {bad[:8]} differ from (stored - 1024) of the source"
    return None


# ---------------------------------------------------------------------------------------------------- main


def run(args) -> dict:
    n, rounds = args.slices, args.rounds
    out_bytes = n * 512 * 512 * 2
    with tempfile.TemporaryDirectory(prefix="compare_dicom_") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        log(f"writing 2 series of {n} slices under {root}")
        info = write_series(root, n)
        report = {
            "slices": n,
            "rounds": rounds,
            "jobs": args.jobs,
            "hu_output_bytes": out_bytes,
            "mb": "10^6 bytes",
            "cpu": cpu_info(),
            "versions": versions(),
            "threads": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPJ_NUM_THREADS")},
            "series": info,
            "results": [],
            "skipped": [],
            "notes": [
                "timed: parse + decode + rescale to int16 HU + stack sorted by z, from in-memory file bytes",
                "gdcm (python-gdcm ImageReader) reads the files by path from the page cache: no in-memory reader",
            ],
        }
        if args.out is None:
            for s in info.values():
                s["dir"] = None  # the temp dir is gone when the report is printed
        ref = reference_hu()
        ctx = multiprocessing.get_context("fork")
        for series in SERIES:
            paths = [str(p) for p in series_paths(root / series, n)]
            blobs = [Path(p).read_bytes() for p in paths]  # outside the timing
            _SHARED[series] = (blobs, paths)
            z0 = info[series]["z0"]
            volumes = {}
            pool = None
            if args.jobs > 1:
                pool = concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx)
            try:
                for decoder in args.decoders:
                    why = decoder_available(decoder, series)
                    if why:
                        report["skipped"].append({"series": series, "decoder": decoder, "reason": why})
                        log(f"{series:13s} {decoder:13s} skipped: {why}")
                        continue
                    variants = [1] + ([args.jobs] if pool is not None else [])
                    for jobs in variants:
                        def once():
                            if jobs == 1:
                                return read_series(decoder, series, blobs, paths)
                            return read_series_parallel(pool, jobs, decoder, series, n)

                        vol, zs = once()  # correctness check, and warm-up (pool workers, imports, page cache)
                        err = check_volume(vol, zs, n, z0, ref)
                        if err:
                            raise SystemExit(f"{series} {decoder} jobs={jobs}: {err}")
                        for other, v in volumes.items():
                            if not np.array_equal(vol, v):
                                raise SystemExit(f"{series} {decoder} jobs={jobs}: volume differs from {other}")
                        volumes[f"{decoder}/jobs{jobs}"] = vol
                        del vol
                        times = []
                        for _ in range(rounds):
                            t0 = time.perf_counter()
                            once()
                            times.append(time.perf_counter() - t0)
                        row = {"series": series, "decoder": decoder, "jobs": jobs,
                               "input_bytes": info[series]["input_bytes"]}
                        row.update(summarize(times, out_bytes))
                        report["results"].append(row)
                        log(f"{series:13s} {decoder:13s} jobs={jobs} median {row['median_s']:.4f} s "
                            f"min {row['min_s']:.4f} s  {row['mb_s_median']:.1f} MB/s")
            finally:
                if pool is not None:
                    pool.shutdown()
                _SHARED.pop(series, None)
            report.setdefault("correctness", {})[series] = {
                "checked": sorted(volumes),
                "equal_across_decoders": True,
                "equal_to_stored_minus_1024": True,
            }
    return report


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=200, help="slices per series (default 200)")
    ap.add_argument("--rounds", type=int, default=5, help="timed whole reads per series x decoder (default 5)")
    ap.add_argument("--decoders", default=",".join(DECODERS),
                    help=f"comma-separated, of {','.join(DECODERS)} (default all)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="also time a ProcessPoolExecutor variant with this many workers (default 2; 1 = off)")
    ap.add_argument("--out", help="write the series here and keep them (default: a temp dir)")
    ap.add_argument("--write-only", action="store_true", help="only write the two series to --out")
    ap.add_argument("--json", help="also write the JSON summary to this file")
    args = ap.parse_args(argv)
    args.decoders = [d for d in args.decoders.split(",") if d]
    for d in args.decoders:
        if d not in DECODERS:
            ap.error(f"unknown decoder {d!r}")
    if args.slices < 1 or args.rounds < 1 or args.jobs < 1:
        ap.error("--slices, --rounds and --jobs must be >= 1")
    if args.write_only and not args.out:
        ap.error("--write-only needs --out DIR")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.write_only:
        report = {"slices": args.slices, "series": write_series(Path(args.out), args.slices)}
    else:
        report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
