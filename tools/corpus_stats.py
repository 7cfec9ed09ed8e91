#!/usr/bin/env python3
"""Golden statistics for the NIfTI corpus test (tests/nifti_corpus.rs), computed with nibabel.

    tools/.venv/bin/python tools/corpus_stats.py            # rewrites tests/fixtures/nifti_corpus/expected.json
    tools/.venv/bin/python tools/corpus_stats.py --check    # exits 1 if expected.json is not what it would write

For every file under tests/fixtures/nifti_corpus (SOURCES.md and expected.json excepted) it decides, with nibabel,
what the server must do:

* ACCEPT: a single-file NIfTI-1 (.nii / .nii.gz, magic "n+1") holding a 3D scalar volume (dim[0] == 3, or every
  dimension beyond the third equal to 1), any integer or float datatype, that nibabel reads.
* REJECT, with every reason that applies (``reasons``; ``reason`` is the first of them in the order below):
  ``pair`` (a .hdr/.img half of a header-image pair, Analyze 7.5 included, or a header-only "ni1" magic),
  ``nifti2`` (sizeof_hdr 540), ``malformed`` (nibabel cannot read it: bad gzip, or a NIfTI magic with a broken
  sizeof_hdr as in the fuzzer files), ``not_nifti`` (sizeof_hdr is neither 348 nor 540, or a 348-byte header
  without a NIfTI-1 magic), ``2d`` (fewer than 3 dimensions), ``series`` (4D+ with more than one volume),
  ``rgb``, ``complex``.

For accepted files the volume is read as MONAI's NibabelReader does: ``np.asanyarray(img.dataobj)`` (nibabel's
scl_slope/scl_inter rules) then ``.astype(np.float32)``, reshaped to its first three dimensions. Stored: shape,
``img.affine`` (as floats and as exact float64 bit patterns), whole-volume nan-sum in float64, min/max (float32
bits, NaN ignored), NaN count, ``data_end`` (offset of the first byte after the voxel data in the uncompressed
file), and for slices k = 0 and D // 2: the float64 nan-sum of the float32 slice, its NaN count, and the float32
bit patterns of the voxels [0, 0, k], [H-1, W-1, k], [H//2, W//3, k], [H//3, W//2, k]; volumes of at most
4096 voxels also store every voxel's float32 bits (``all_f32_bits``, file order).

``VARIANTS`` adds in-memory variants of corpus files (header fields patched, e.g. the first volume of a 4D series,
or a scl_slope/scl_inter pair) so that the scaling rules are checked on accepted files too; the Rust test applies
the same ``patch`` (field offset, type, value, written in the file's byte order) before decoding.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import pathlib
import struct
import sys
import zlib

import nibabel as nib
import numpy as np

# nibabel logs its header fix-ups ('sizeof_hdr should be 348 ...'); the reasons are recorded in 'detail' instead.
nib.imageglobals.logger.setLevel(logging.CRITICAL)

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / 'tests' / 'fixtures' / 'nifti_corpus'
OUT = CORPUS / 'expected.json'
NOT_CORPUS = {'SOURCES.md', 'expected.json'}
REASON_ORDER = ['pair', 'nifti2', 'malformed', 'not_nifti', '2d', 'series', 'rgb', 'complex']
ALL_VOXELS_UP_TO = 4096  # volumes this small store every voxel's float32 bits
PAIR_SUFFIXES = ('.hdr', '.img', '.hdr.gz', '.img.gz')

# name -> (source file, [(offset, type, value)]). Offsets are NIfTI-1 header byte offsets.
DIM0, DIM4, SCL_SLOPE, SCL_INTER = 40, 48, 112, 116
VARIANTS = {
    'nibabel/functional.nii#vol0': ('nibabel/functional.nii', [(DIM0, 'i16', 3), (DIM4, 'i16', 1)]),
    'nifti-reader-js/5D_small.nii#vol0': ('nifti-reader-js/5D_small.nii', [(DIM0, 'i16', 3)]),
    'nifti-rs/27/uint8.nii#scaled': (
        'nifti-rs/27/uint8.nii',
        [(SCL_SLOPE, 'f32', 0.0027581409), (SCL_INTER, 'f32', 0.076919)],
    ),
    'nifti-rs/27/int16.nii#scaled': (
        'nifti-rs/27/int16.nii',
        [(SCL_SLOPE, 'f32', 0.3), (SCL_INTER, 'f32', 0.7)],
    ),
    'nifti-rs/27/int32.nii#scaled': (
        'nifti-rs/27/int32.nii',
        [(SCL_SLOPE, 'f32', 0.1), (SCL_INTER, 'f32', -1024.3)],
    ),
    'nifti-rs/27/float32.nii#scaled': (
        'nifti-rs/27/float32.nii',
        [(SCL_SLOPE, 'f32', 0.3), (SCL_INTER, 'f32', 0.7)],
    ),
    'nifti-rs/27/float64.nii#scaled': (
        'nifti-rs/27/float64.nii',
        [(SCL_SLOPE, 'f32', 0.1), (SCL_INTER, 'f32', -1024.3)],
    ),
}


def gunzip_if_needed(data: bytes) -> tuple[bytes, bool]:
    if data[:2] == b'\x1f\x8b':
        return gzip.decompress(data), True
    return data, False


def byte_order(raw: bytes) -> str | None:
    """'<' or '>' when sizeof_hdr reads 348 or 540 in that order, else None."""
    if len(raw) < 4:
        return None
    for order in '<>':
        if struct.unpack(order + 'i', raw[:4])[0] in (348, 540):
            return order
    return None


def apply_patch(raw: bytes, patch: list) -> bytes:
    order = byte_order(raw)
    assert order is not None
    out = bytearray(raw)
    for offset, kind, value in patch:
        fmt = order + {'i16': 'h', 'f32': 'f'}[kind]
        struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def f32_bits(value) -> int:
    return int(np.asarray(value, dtype=np.float32).view(np.uint32))


def f64_bits(value) -> int:
    return int(np.asarray(value, dtype=np.float64).view(np.uint64))


KNOWN_MAGICS = (b'n+1\x00', b'ni1\x00')


def nibabel_error(raw: bytes) -> str:
    """What nibabel says when asked to read the bytes as a single-file NIfTI-1."""
    try:
        img = nib.Nifti1Image.from_bytes(raw)
        np.asanyarray(img.dataobj)
    except Exception as e:
        return f'nibabel: {type(e).__name__}: {e}'
    return 'nibabel reads it'


def classify(name: str, raw: bytes | None, gzip_error: str | None):
    """(reasons, detail, image or None): reasons is empty for ACCEPT."""
    reasons: list[str] = []
    if name.endswith(PAIR_SUFFIXES):
        reasons.append('pair')
    if gzip_error is not None:
        return reasons + ['malformed'], f'gzip: {gzip_error}', None
    order = byte_order(raw)
    if order is None:
        reasons.append('not_nifti')
        if len(raw) >= 348 and raw[344:348] in KNOWN_MAGICS:
            # A NIfTI magic with a broken sizeof_hdr (the fuzzer files): a corrupted NIfTI header.
            reasons.append('malformed')
        return sorted(set(reasons), key=REASON_ORDER.index), 'sizeof_hdr is not 348 or 540; ' + nibabel_error(raw), None
    sizeof_hdr = struct.unpack(order + 'i', raw[:4])[0]
    if sizeof_hdr == 540:
        magic = raw[4:8]
        reasons.append('nifti2')
        return sorted(set(reasons), key=REASON_ORDER.index), f'NIfTI-2 header, magic {magic!r}', None
    if len(raw) < 348:
        return sorted(set(reasons + ['malformed']), key=REASON_ORDER.index), f'{len(raw)} bytes', None
    magic = raw[344:348]
    if magic == b'ni1\x00':
        reasons.append('pair')
    elif magic != b'n+1\x00':
        reasons.append('not_nifti')
    if reasons:
        return sorted(set(reasons), key=REASON_ORDER.index), f'magic {magic!r}', None
    try:
        img = nib.Nifti1Image.from_bytes(raw)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel's own refusal
        return ['malformed'], f'nibabel: {type(e).__name__}: {e}', None
    shape = data.shape
    if len(shape) < 3:
        reasons.append('2d')
    elif any(n != 1 for n in shape[3:]):
        reasons.append('series')
    if data.dtype.fields is not None:
        reasons.append('rgb')
    elif data.dtype.kind == 'c':
        reasons.append('complex')
    elif data.dtype.kind not in 'iuf':
        reasons.append('malformed')
    detail = f'shape {shape}, {img.get_data_dtype()}'
    return reasons, detail, (img, data)


def golden(raw: bytes, img, data) -> dict:
    hdr = img.header
    vol = data.astype(np.float32)
    vol = vol.reshape(vol.shape[:3])
    h, w, d = vol.shape
    finite_or_nan = vol[~np.isnan(vol)]
    itemsize = img.get_data_dtype().itemsize
    offset = int(img.dataobj.offset)  # the header's vox_offset, as nibabel used it (it zeroes the field)
    slices = []
    for k in sorted({0, d // 2}):
        plane = vol[:, :, k]
        samples = []
        # Up to 4 positions: duplicates (tiny volumes) are listed once.
        for i, j in dict.fromkeys([(0, 0), (h - 1, w - 1), (h // 2, w // 3), (h // 3, w // 2)]):
            samples.append({'i': i, 'j': j, 'f32_bits': f32_bits(plane[i, j]), 'value': repr(float(plane[i, j]))})
        slices.append({
            'k': k,
            'nansum_f64': float(np.nansum(plane, dtype=np.float64)),
            'nan_count': int(np.isnan(plane).sum()),
            'samples': samples,
        })
    affine = np.asarray(img.affine, dtype=np.float64)
    slope, inter = img.dataobj.slope, img.dataobj.inter
    return {
        'shape': [h, w, d],
        'on_disk_dtype': str(img.get_data_dtype()),
        'scl_slope_inter': [float(slope), float(inter)],
        'qform_sform_codes': [int(hdr['qform_code']), int(hdr['sform_code'])],
        'affine': affine.tolist(),
        'affine_f64_bits': [[f64_bits(v) for v in row] for row in affine],
        'nansum_f64': float(np.nansum(vol, dtype=np.float64)),
        'nan_count': int(np.isnan(vol).sum()),
        'min_f32_bits': f32_bits(finite_or_nan.min()) if finite_or_nan.size else None,
        'max_f32_bits': f32_bits(finite_or_nan.max()) if finite_or_nan.size else None,
        'min': float(finite_or_nan.min()) if finite_or_nan.size else None,
        'max': float(finite_or_nan.max()) if finite_or_nan.size else None,
        'data_end': offset + h * w * d * itemsize,
        'slices': slices,
        # Small volumes: every voxel, float32 bits in file order (i fastest, then j, then k).
        'all_f32_bits': [f32_bits(v) for v in vol.ravel(order='F')] if vol.size <= ALL_VOXELS_UP_TO else None,
    }


def magic_of(raw: bytes | None) -> str | None:
    """The NIfTI magic ("n+1", "ni1", "n+2", "ni2") where the header has one, else None."""
    if raw is None:
        return None
    for at in (344, 4):
        magic = raw[at : at + 4]
        if magic in (b'n+1\x00', b'ni1\x00', b'n+2\x00', b'ni2\x00'):
            return magic[:3].decode()
    return None


def entry(name: str, file_bytes: bytes, source: str, patch: list | None) -> dict:
    try:
        raw, compressed = gunzip_if_needed(file_bytes)
        gzip_error = None
    except (OSError, EOFError, zlib.error) as e:
        raw, compressed, gzip_error = None, True, str(e)
    if patch:
        raw = apply_patch(raw, patch)
    reasons, detail, image = classify(name, raw, gzip_error)
    out = {
        'file': source,
        'size': len(file_bytes),
        'gzip': compressed,
        'magic': magic_of(raw),
        'detail': detail,
    }
    if patch:
        out['patch'] = [{'offset': o, 'type': t, 'value': v} for o, t, v in patch]
    if reasons:
        out['action'] = 'REJECT'
        out['reason'] = reasons[0]
        out['reasons'] = reasons
    else:
        out['action'] = 'ACCEPT'
        out.update(golden(raw, *image))
    return out


def build() -> dict:
    files = sorted(
        p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob('*') if p.is_file() and p.name not in NOT_CORPUS
    )
    entries = {name: entry(name, (CORPUS / name).read_bytes(), name, None) for name in files}
    for name, (source, patch) in VARIANTS.items():
        entries[name] = entry(source, (CORPUS / source).read_bytes(), source, patch)
    return {
        'generator': 'tools/corpus_stats.py',
        'nibabel': nib.__version__,
        'numpy': np.__version__,
        'entries': entries,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--check', action='store_true', help='compare with expected.json instead of writing it')
    args = parser.parse_args()
    text = json.dumps(build(), indent=1, sort_keys=True, allow_nan=False) + '\n'
    if args.check:
        if OUT.read_text() != text:
            print(f'{OUT} is out of date; rerun tools/corpus_stats.py', file=sys.stderr)
            return 1
        print(f'{OUT} is up to date')
        return 0
    OUT.write_text(text)
    doc = json.loads(text)['entries']
    counts: dict[str, int] = {}
    for e in doc.values():
        key = 'ACCEPT' if e['action'] == 'ACCEPT' else f"REJECT/{e['reason']}"
        counts[key] = counts.get(key, 0) + 1
    print(f'wrote {OUT.relative_to(ROOT)}: {len(doc)} entries', json.dumps(dict(sorted(counts.items()))))
    return 0


if __name__ == '__main__':
    sys.exit(main())
