#!/usr/bin/env python3
"""Golden files for the Rust Deepgrow 2D pipeline, produced by the reference MONAI stage list.

For every case below this script

1. writes a small NIfTI volume (a crop of a real CT from /work/shared/data, or a synthetic
   phantom), keeping the stored dtype and scl_slope/scl_inter;
2. runs MONAI's own transforms on it, in MONAI Label's order (specs/DEEPGROW_2D.md section 2):
   LoadImaged -> Transposed([2,0,1]) -> Spacingd(pixdim, bilinear) -> AddGuidanceFromPointsd(2D)
   -> Fetch2DSliced -> EnsureChannelFirstd(no_channel) -> SpatialCropGuidanced(crop, margin)
   -> Resized(model, area) -> ResizeGuidanced -> NormalizeIntensityd(sub, div)
   -> AddGuidanceSignald(sigma), recording the image and the guidance after each stage;
3. feeds deterministic synthetic logits (a smooth function with both signs) as `pred` through
   Activationsd(sigmoid) -> AsDiscreted(threshold=0.5) -> ToNumpyd -> RestoreLabeld(nearest)
   -> AsChannelLastd, and keeps the mask of the chosen slice;
4. writes tests/fixtures/golden/<case>/ (see README.md there for the file formats).

Run from the repository root:

    tools/.venv/bin/python tools/reference_harness.py --out tests/fixtures/golden

The output is deterministic (fixed seeds, gzip mtime 0). Nothing here is copied from MONAI: it
only calls MONAI's public transforms.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import platform
import shutil
import struct
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import monai
from monai.transforms import (
    Activationsd,
    AsChannelLastd,
    AsDiscreted,
    EnsureChannelFirstd,
    LoadImaged,
    NormalizeIntensityd,
    Resized,
    Spacingd,
    ToNumpyd,
    Transposed,
)
from monai.apps.deepgrow.transforms import (
    AddGuidanceFromPointsd,
    AddGuidanceSignald,
    Fetch2DSliced,
    ResizeGuidanced,
    RestoreLabeld,
    SpatialCropGuidanced,
)

DATA = Path("/work/shared/data")

# Source files: licence and origin as given in /work/shared/data/SOURCES.md.
SOURCES = {
    "ct_labeled/imagesTr/totalseg_example_ct_dicom.nii.gz": {
        "origin": "wasserth/TotalSegmentator @ 0e65a448d557, tests/reference_files/example_ct_dicom/ "
        "(DICOM series converted to NIfTI with pydicom+nibabel by the data collector)",
        "licence": "repository Apache-2.0; TotalSegmentator public dataset CC BY 4.0",
    },
    "ct_labeled/imagesTr/totalseg_aorta_ct_cropped.nii.gz": {
        "origin": "wasserth/TotalSegmentator @ 0e65a448d557, "
        "tests/reference_files/aorta_report/test_result/models/ct_cropped.nii.gz",
        "licence": "repository Apache-2.0; TotalSegmentator public dataset CC BY 4.0",
    },
    "ct_labeled/imagesTr/totalseg_example_ct_sm.nii.gz": {
        "origin": "wasserth/TotalSegmentator @ 0e65a448d557, tests/reference_files/example_ct_sm.nii.gz",
        "licence": "repository Apache-2.0; TotalSegmentator public dataset CC BY 4.0",
    },
    "ct_unlabeled/deeplesion_000015_01_01_103-115.nii.gz": {
        "origin": "bowang-lab/MedSAM2 @ 667e0542d6c7, quick_validation/data/000015_01_01_103-115.nii.gz",
        "licence": "repository Apache-2.0; data NIH DeepLesion (cite Yan et al., JMI 2018)",
    },
    "ct_unlabeled/niivue_CT_AVM.nii.gz": {
        "origin": "niivue/niivue-demo-images @ f6f98294c1fa, CT_AVM.nii.gz "
        "(from github.com/IbisNeuronav/PRISMDatabase)",
        "licence": "repository BSD-2-Clause",
    },
}

NGC = dict(margin=20, subtrahend=208.0, divisor=388.0, sigma=2.0, target_spacing=[1.0, 1.0])


def cfg(model, crop, **kw):
    c = dict(NGC)
    c.update(model_size=list(model), crop_size=list(crop))
    c.update(kw)
    return c


def affine(block, z=2.5, origin=(-40.25, 17.5, 3.0)):
    """4x4 affine with the given in-plane 2x2 block."""
    a = np.eye(4)
    a[:2, :2] = np.asarray(block, dtype=np.float64)
    a[2, 2] = z
    a[:3, 3] = origin
    return a


# Each case: volume (synthetic phantom or crop of a real file), clicks [i, j, k], optional slice,
# pipeline configuration (the Rust PipelineConfig fields), and a seed for the synthetic logits.
CASES = [
    dict(
        name="spec_example_b_anisotropic",
        description="Spec section 5 example B: 300x280 at 0.73 x 0.81 mm, clicks near the high i "
        "and high j edges; crop window runs past the image (157 x 151, area up-sampled to 256).",
        volume=dict(kind="synthetic", shape=(300, 280, 5), dtype="int16",
                    affine=affine([[0.73, 0], [0, 0.81]]), seed=1),
        clicks=dict(foreground=[[290, 270, 4]], background=[[250, 250, 4]]),
        config=cfg((256, 256), (256, 256)),
    ),
    dict(
        name="flipped_affine_low_edges",
        description="Negative diagonal (both in-plane axes flipped), float32 0.7 mm "
        "(0.699999988 -> 126 x 105), clicks near the low i and low j edges.",
        volume=dict(kind="synthetic", shape=(180, 150, 4), dtype="int16",
                    affine=affine([[-0.7, 0], [0, -0.7]], z=-3.0), seed=2),
        clicks=dict(foreground=[[2, 40, 1], [30, 3, 1]], background=[[90, 0, 1]]),
        config=cfg((128, 128), (128, 128)),
    ),
    dict(
        name="box_larger_than_crop_upsampled",
        description="1.3 mm (up-sampling 200 x 120 -> 260 x 156); clicks at both i edges give a "
        "box of 260 x 112 rows/cols, larger than the 128 crop in one axis only: anisotropic crop "
        "stretched to 128 x 128.",
        volume=dict(kind="synthetic", shape=(200, 120, 3), dtype="int16",
                    affine=affine([[1.3, 0], [0, 1.3]]), seed=3),
        clicks=dict(foreground=[[1, 60, 1], [199, 70, 1]], background=[[100, 2, 1]]),
        config=cfg((128, 128), (128, 128)),
    ),
    dict(
        name="explicit_slice_two_slices",
        description="Clicks on slices 0 and 2 with slice=2 (not the lowest); two foreground "
        "clicks 3 px apart (overlapping Gaussians), high-j edge click.",
        volume=dict(kind="synthetic", shape=(140, 130, 3), dtype="int16",
                    affine=affine([[0.85, 0], [0, 0.9]]), seed=4),
        clicks=dict(foreground=[[70, 60, 0], [70, 60, 2], [73, 62, 2]],
                    background=[[20, 129, 2], [100, 100, 0]], slice=2),
        config=cfg((96, 96), (96, 96)),
    ),
    dict(
        name="spacing_1p0009_shortcut",
        description="Spacing 1.0009 x 0.9995 mm: within 1e-3 of 1 mm, MONAI returns the slice "
        "unchanged.",
        volume=dict(kind="synthetic", shape=(120, 100, 2), dtype="int16",
                    affine=affine([[1.0009, 0], [0, 0.9995]]), seed=5),
        clicks=dict(foreground=[[60, 50, 1]], background=[[30, 80, 1]]),
        config=cfg((64, 64), (96, 96)),
    ),
    dict(
        name="spacing_1p0011_resampled",
        description="Spacing 1.0011 mm: just outside the shortcut; same size (120 x 100) but "
        "interpolated.",
        volume=dict(kind="synthetic", shape=(120, 100, 2), dtype="int16",
                    affine=affine([[1.0011, 0], [0, 1.0011]]), seed=6),
        clicks=dict(foreground=[[60, 50, 0]], background=[[100, 20, 0]]),
        config=cfg((64, 64), (96, 96)),
    ),
    dict(
        name="spacing_keep_axis_mixed",
        description="Spacing 1.0005 x 0.8 mm: the i axis is within 1e-3 of the target and keeps "
        "its spacing (no interpolation along i), the j axis is resampled 100 -> 80.",
        volume=dict(kind="synthetic", shape=(100, 100, 2), dtype="int16",
                    affine=affine([[1.0005, 0], [0, 0.8]]), seed=7),
        clicks=dict(foreground=[[50, 50, 1]], background=[]),
        config=cfg((64, 64), (64, 64)),
    ),
    dict(
        name="spacing_allclose_edge",
        description="Spacing 1.001005 x 1.0 mm on 100 x 100: past the 1e-3 keep rule but within "
        "allclose(atol=1e-3, rtol=1e-5) and the same size, so the shortcut applies.",
        volume=dict(kind="synthetic", shape=(100, 100, 2), dtype="int16",
                    affine=affine([[1.001005, 0], [0, 1.0]]), seed=8),
        clicks=dict(foreground=[[40, 45, 0]], background=[[70, 10, 0]]),
        config=cfg((64, 64), (64, 64)),
    ),
    dict(
        name="float32_float_clicks_background_only",
        description="float32 volume with fractional values; OHIF-style float clicks (truncated); "
        "the lowest clicked slice has only background clicks (empty positive channel).",
        volume=dict(kind="synthetic", shape=(96, 80, 3), dtype="float32",
                    affine=affine([[0.8125, 0], [0, 0.8125]]), seed=9),
        clicks=dict(foreground=[[40.7, 30.2, 2.0]], background=[[20.9, 60.99, 1.5], [-0.5, 10.0, 1.0]]),
        config=cfg((64, 64), (64, 64)),
    ),
    dict(
        name="nondefault_params",
        description="Non-default configuration: margin 5, sigma 1.5, subtrahend -100.5, divisor "
        "250.25, target spacing 0.8 x 1.2 mm, non-square crop 80 x 112 and model 96 x 64.",
        volume=dict(kind="synthetic", shape=(110, 90, 2), dtype="int16",
                    affine=affine([[0.9, 0], [0, 1.1]]), seed=10),
        clicks=dict(foreground=[[50, 40, 1], [58, 44, 1]], background=[[30, 70, 1]]),
        config=cfg((96, 64), (80, 112), margin=5, sigma=1.5, subtrahend=-100.5, divisor=250.25,
                   target_spacing=[0.8, 1.2]),
    ),
    dict(
        name="uint8_scl_slope_avm",
        description="Real head CTA, uint8 with scl_slope 2.2086 (niivue CT_AVM), 0.7199 x 0.7209 mm; "
        "the resampled slice (101 x 101) is smaller than the 256 crop: whole slice up-sampled.",
        volume=dict(kind="file", path="ct_unlabeled/niivue_CT_AVM.nii.gz",
                    crop=((60, 200), (50, 190), (70, 73))),
        clicks=dict(foreground=[[70, 75, 1]], background=[[20, 30, 1]]),
        config=cfg((256, 256), (256, 256)),
    ),
    dict(
        name="real_ct_totalseg_0p9766",
        description="Real abdominal CT (TotalSegmentator example DICOM series), int16, 0.9766 mm, "
        "LAS; 200 x 200 crop -> 195 x 195; 160 crop area down-sampled to 128.",
        volume=dict(kind="file", path="ct_labeled/imagesTr/totalseg_example_ct_dicom.nii.gz",
                    crop=((160, 360), (180, 380), (8, 11))),
        clicks=dict(foreground=[[100, 90, 1], [120, 110, 1]], background=[[40, 170, 1]]),
        config=cfg((128, 128), (160, 160)),
    ),
    dict(
        name="real_ct_deeplesion_permuted",
        description="Real pelvic CT (DeepLesion), int16, 0.9375 mm, permuted sform (i -> -y, "
        "j -> -x); 128 crop area down-sampled to 64.",
        volume=dict(kind="file", path="ct_unlabeled/deeplesion_000015_01_01_103-115.nii.gz",
                    crop=((200, 330), (180, 330), (5, 8))),
        clicks=dict(foreground=[[60, 70, 1]], background=[[90, 40, 1], [20, 140, 2]]),
        config=cfg((64, 64), (128, 128)),
    ),
    dict(
        name="real_ct_aorta_1p5mm",
        description="Real thoracic CTA (TotalSegmentator aorta crop), int16, 1.5 mm, LPS "
        "(negative diagonal): up-sampled 120 x 126 -> 180 x 188, both sizes exact .5 ties "
        "(179.5 and 188.5, rounded half to even).",
        volume=dict(kind="file", path="ct_labeled/imagesTr/totalseg_aorta_ct_cropped.nii.gz",
                    crop=((0, 120), (0, 126), (80, 83))),
        clicks=dict(foreground=[[60, 63, 1]], background=[[10, 10, 1], [119, 125, 1]]),
        config=cfg((128, 128), (128, 128)),
    ),
    dict(
        name="real_ct_3mm_upsampled",
        description="Real abdominal CT at 3 mm (TotalSegmentator example_ct_sm), int16: "
        "up-sampled 122 x 101 -> 364 x 301; 256 crop area down-sampled to 128.",
        volume=dict(kind="file", path="ct_labeled/imagesTr/totalseg_example_ct_sm.nii.gz",
                    crop=((0, 122), (0, 101), (14, 16))),
        clicks=dict(foreground=[[61, 50, 0], [80, 60, 0]], background=[[5, 95, 0]]),
        config=cfg((128, 128), (256, 256)),
    ),
    dict(
        name="model512_crop512_real_ct",
        description="The bundled model's geometry (model 512, crop 512) on a real CT crop "
        "(TotalSegmentator DICOM, 0.9766 mm, 120 x 110 -> 117 x 107): whole slice up-sampled to 512.",
        volume=dict(kind="file", path="ct_labeled/imagesTr/totalseg_example_ct_dicom.nii.gz",
                    crop=((200, 320), (230, 340), (10, 12))),
        clicks=dict(foreground=[[60, 55, 0]], background=[[10, 100, 0]]),
        config=cfg((512, 512), (512, 512)),
    ),
]


# ----------------------------------------------------------------------------------------------
# Inputs


def phantom(shape, dtype, seed):
    """A deterministic CT-like phantom in HU: air, an elliptical body with organs, a bone ring,
    smooth gradients and mild noise (so bilinear interpolation is exercised everywhere)."""
    rng = np.random.default_rng(seed)
    h, w, d = shape
    i = (np.arange(h)[:, None, None] + 0.5) / h * 2 - 1
    j = (np.arange(w)[None, :, None] + 0.5) / w * 2 - 1
    k = np.arange(d)[None, None, :] / max(d - 1, 1)
    v = np.full(shape, -1000.0)
    body = (i / 0.9) ** 2 + (j / 0.8) ** 2 < 1
    v = np.where(body, 40.0 + 30.0 * i - 20.0 * j + 10.0 * k, v)
    for ci, cj, r, hu in [(-0.3, -0.2, 0.25, 160.0), (0.35, 0.1, 0.18, -80.0), (0.0, 0.45, 0.12, 300.0)]:
        v = np.where((i - ci) ** 2 + (j - cj) ** 2 < (r * (1 + 0.2 * k)) ** 2, hu, v)
    ring = np.abs(np.hypot(i / 0.9, j / 0.8) - 0.85) < 0.04
    v = np.where(ring, 900.0, v)
    v = v + 25.0 * np.sin(7 * i + 3 * k) * np.cos(5 * j) + rng.normal(0, 4, shape)
    if dtype == "float32":
        return (v + rng.uniform(-0.5, 0.5, shape)).astype(np.float32)
    return np.round(v).astype(np.dtype(dtype))


def nifti_bytes(raw, aff, slope=None, inter=None, template=None):
    """Uncompressed NIfTI-1 bytes of `raw` with `aff` (sform and qform), keeping the dtype;
    scl_slope/scl_inter are patched in afterwards because nibabel resets them on save."""
    hdr = template.copy() if template is not None else nib.Nifti1Header()
    hdr.set_data_dtype(raw.dtype)
    img = nib.Nifti1Image(raw, aff, header=hdr)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    b = bytearray(img.to_bytes())
    if slope is not None and np.isfinite(slope) and slope != 0:
        b[112:116] = struct.pack("<f", slope)
        b[116:120] = struct.pack("<f", inter or 0.0)
    return bytes(b)


def make_volume(spec, path):
    """Writes input.nii.gz for a case and returns provenance."""
    if spec["kind"] == "synthetic":
        raw = phantom(spec["shape"], spec["dtype"], spec["seed"])
        data = nifti_bytes(raw, spec["affine"])
        prov = dict(kind="synthetic", generator="reference_harness.phantom", seed=spec["seed"],
                    licence="generated here, no third-party data")
    else:
        src_path = DATA / spec["path"]
        src = nib.load(str(src_path))
        (i0, i1), (j0, j1), (k0, k1) = spec["crop"]
        raw = np.asanyarray(src.dataobj.get_unscaled())[i0:i1, j0:j1, k0:k1]
        raw = np.ascontiguousarray(raw)
        aff = src.affine @ np.array([[1, 0, 0, i0], [0, 1, 0, j0], [0, 0, 1, k0], [0, 0, 0, 1]], float)
        slope, inter = src.dataobj.slope, src.dataobj.inter
        data = nifti_bytes(raw, aff, slope=slope, inter=inter)
        prov = dict(kind="crop of real CT", file=str(spec["path"]),
                    sha256=hashlib.sha256(src_path.read_bytes()).hexdigest(),
                    crop_ijk=[[i0, i1], [j0, j1], [k0, k1]], **SOURCES[spec["path"]])
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    back = nib.load(str(path))
    assert np.array_equal(np.asanyarray(back.dataobj.get_unscaled()), raw)
    if spec["kind"] == "file":
        assert back.dataobj.slope == np.float32(src.dataobj.slope)
    return prov


# Logits right at torch's float32 sigmoid(x) >= 0.5 boundary (bits), placed on the centre row.
BOUNDARY_LOGITS = np.array(
    [0xB43FFFFE, 0xB43FFFFF, 0xB4400000, 0x80000000, 0x00000000, 0x0DA24260, 0x8DA24260,
     0xB3D6BF95, 0xB58637BD], dtype=np.uint32).view(np.float32)


def synthetic_logits(h, w, seed):
    """Smooth logits with both signs, quantised to 1/8 (so the files compress) and kept away from
    0, plus a few values exactly at the float32 sigmoid threshold on the centre row (each repeated
    over 4 columns so that the nearest-neighbour restore samples them)."""
    rng = np.random.default_rng(1000 + seed)
    a, b, c = rng.uniform(0.5, 2.0, 3)
    r = np.arange(h)[:, None] / h
    q = np.arange(w)[None, :] / w
    x = 4.0 * np.sin(2 * np.pi * a * r + c) * np.cos(2 * np.pi * b * q - 0.3) + 1.5 - 6.0 * (
        (r - 0.5) ** 2 + (q - 0.55) ** 2
    )
    x = np.round(x * 8) / 8 + np.where(np.round(x * 8) == 0, np.copysign(0.125, x), 0.0)
    x = x.astype(np.float32)
    special = np.repeat(BOUNDARY_LOGITS, 4)[: w]
    x[h // 2, w // 2 - len(special) // 2: w // 2 - len(special) // 2 + len(special)] = special
    return x


# ----------------------------------------------------------------------------------------------
# Reference run


def points(g):
    return [[int(v) for v in p] for p in g]


def run_reference(nii: Path, clicks, config, logits_seed: int):
    data = {"image": str(nii), "foreground": clicks["foreground"], "background": clicks["background"]}
    if clicks.get("slice") is not None:
        data["slice"] = clicks["slice"]
    out = {}

    d = LoadImaged(keys="image", image_only=False, reader="NibabelReader")(data)
    volume = np.asarray(d["image"])  # (H, W, D) float32, nibabel scaling semantics
    assert volume.dtype == np.float32
    out["affine"] = np.asarray(d["image_meta_dict"]["affine"], dtype=np.float64)
    d = Transposed(keys="image", indices=[2, 0, 1])(d)
    d = Spacingd(keys="image", pixdim=config["target_spacing"], mode="bilinear")(d)
    out["resampled_shape"] = list(d["image"].shape[1:])
    d = AddGuidanceFromPointsd(ref_image="image", guidance="guidance", spatial_dims=2)(d)
    pos, neg, k = d["guidance"]
    out["slice"] = int(k)
    out["guidance_resampled"] = dict(positive=points(pos), negative=points(neg))
    out["slice_input"] = volume[:, :, int(k)]
    d = Fetch2DSliced(keys="image", guidance="guidance")(d)
    out["resampled"] = np.asarray(d["image"], dtype=np.float32)
    d = EnsureChannelFirstd(keys="image", channel_dim="no_channel")(d)
    d = SpatialCropGuidanced(keys="image", guidance="guidance", spatial_size=config["crop_size"],
                             margin=config["margin"])(d)
    meta = d["image_meta_dict"]
    out["crop_start"] = [int(v) for v in meta["foreground_start_coord"]]
    out["crop_end"] = [int(v) for v in meta["foreground_end_coord"]]
    out["cropped_shape"] = [int(v) for v in meta["foreground_cropped_shape"][1:]]
    out["guidance_cropped"] = dict(positive=points(d["guidance"][0]), negative=points(d["guidance"][1]))
    d = Resized(keys="image", spatial_size=config["model_size"], mode="area")(d)
    d = ResizeGuidanced(guidance="guidance", ref_image="image")(d)
    out["guidance_model"] = dict(positive=points(d["guidance"][0]), negative=points(d["guidance"][1]))
    d = NormalizeIntensityd(keys="image", subtrahend=config["subtrahend"], divisor=config["divisor"])(d)
    d = AddGuidanceSignald(image="image", guidance="guidance", sigma=config["sigma"])(d)
    net = np.asarray(d["image"], dtype=np.float32)
    out["network_input"] = net[None]

    h, w = config["model_size"]
    logits = synthetic_logits(h, w, logits_seed)
    out["logits"] = logits
    d["pred"] = torch.from_numpy(logits[None].copy())
    d = Activationsd(keys="pred", sigmoid=True)(d)
    d = AsDiscreted(keys="pred", threshold=0.5)(d)
    d = ToNumpyd(keys="pred")(d)
    d = RestoreLabeld(keys="pred", ref_image="image", mode="nearest")(d)
    d = AsChannelLastd(keys="pred")(d)
    vol = np.asarray(d["pred"])
    assert vol.shape == volume.shape, (vol.shape, volume.shape)
    others = np.delete(vol, int(k), axis=2)
    assert not others.any(), "mask outside the chosen slice"
    mask = vol[:, :, int(k)]
    assert set(np.unique(mask)) <= {0.0, 1.0}
    out["mask"] = mask.astype(np.uint8)
    return out


def bits(a):
    return [[struct.unpack("<Q", struct.pack("<d", float(v)))[0] for v in row] for row in a]


def write_array(path: Path, a: np.ndarray, dtype):
    a = np.ascontiguousarray(a, dtype=dtype)
    path.write_bytes(gzip.compress(a.astype(np.dtype(dtype).newbyteorder("<")).tobytes(), 9, mtime=0))
    return list(a.shape)


def write_case(case, root: Path):
    out_dir = root / case["name"]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    nii = out_dir / "input.nii.gz"
    prov = make_volume(case["volume"], nii)
    seed = int.from_bytes(hashlib.sha256(case["name"].encode()).digest()[:4], "little")
    ref = run_reference(nii, case["clicks"], case["config"], seed)
    img = nib.load(str(nii))
    spacing = np.sqrt((ref["affine"][:2, :2] ** 2).sum(0))
    files = {
        "slice_input.f32.gz": write_array(out_dir / "slice_input.f32.gz", ref["slice_input"], np.float32),
        "resampled.f32.gz": write_array(out_dir / "resampled.f32.gz", ref["resampled"], np.float32),
        "network_input.f32.gz": write_array(out_dir / "network_input.f32.gz", ref["network_input"], np.float32),
        "logits.f32.gz": write_array(out_dir / "logits.f32.gz", ref["logits"], np.float32),
        "mask.u8.gz": write_array(out_dir / "mask.u8.gz", ref["mask"], np.uint8),
    }
    meta = dict(
        name=case["name"],
        description=case["description"],
        source=prov,
        volume=dict(shape=list(img.shape), dtype=str(img.get_data_dtype()),
                    scl_slope=float(img.dataobj.slope), scl_inter=float(img.dataobj.inter)),
        affine=ref["affine"].tolist(),
        affine_bits=bits(ref["affine"]),
        clicks=dict(foreground=case["clicks"]["foreground"], background=case["clicks"]["background"],
                    slice=case["clicks"].get("slice")),
        config=case["config"],
        expected=dict(
            slice=ref["slice"],
            spacing=spacing.tolist(),
            resampled_shape=ref["resampled_shape"],
            guidance_resampled=ref["guidance_resampled"],
            crop_start=ref["crop_start"],
            crop_end=ref["crop_end"],
            cropped_shape=ref["cropped_shape"],
            guidance_cropped=ref["guidance_cropped"],
            guidance_model=ref["guidance_model"],
            mask_foreground_pixels=int(ref["mask"].sum()),
        ),
        files=files,
    )
    (out_dir / "case.json").write_text(json.dumps(meta, indent=1) + "\n")
    e = meta["expected"]
    print(f"{case['name']}: slice {e['slice']} {list(img.shape)} -> {e['resampled_shape']} crop "
          f"{e['crop_start']}..{e['crop_end']} ({e['cropped_shape']}) -> {case['config']['model_size']}, "
          f"mask {e['mask_foreground_pixels']} px")
    return meta


def versions():
    return dict(python=platform.python_version(), monai=monai.__version__, torch=torch.__version__,
                nibabel=nib.__version__, numpy=np.__version__)


def write_readme(root: Path, metas):
    v = versions()
    lines = [
        "# Golden files for the Deepgrow 2D pipeline",
        "",
        "Generated by `tools/reference_harness.py` (do not edit by hand; rerun it instead):",
        "",
        "    tools/.venv/bin/python tools/reference_harness.py --out tests/fixtures/golden",
        "",
        f"Reference stack: MONAI {v['monai']}, torch {v['torch']} (CPU), nibabel {v['nibabel']}, "
        f"numpy {v['numpy']}, Python {v['python']}. The expected values are MONAI's own outputs "
        "(MONAI Label stage list, specs/DEEPGROW_2D.md section 2), never the Rust code's.",
        "",
        "Checked by `tests/golden_pipeline.rs` with the spec's tolerances (section 6).",
        "",
        "## Files in each case folder",
        "",
        "* `input.nii.gz`: the NIfTI-1 volume fed to MONAI (`LoadImaged`, NibabelReader): stored "
        "dtype and scl_slope/scl_inter kept; sform = qform (code 1).",
        "* `case.json`: clicks, optional `slice`, the pipeline configuration (the Rust "
        "`PipelineConfig` fields), nibabel's affine (also as IEEE-754 bit patterns in "
        "`affine_bits`, so no decimal parsing is involved), and MONAI's integer results: chosen "
        "slice, resampled shape, guidance after AddGuidanceFromPointsd / SpatialCropGuidanced / "
        "ResizeGuidanced (`[row, col]`), crop start/end (end unclamped) and cropped shape.",
        "* Arrays, gzip-compressed raw little-endian, C order (shapes in `case.json` `files`):",
        "  * `slice_input.f32.gz`: the chosen slice `(H, W)` as MONAI loaded it (float32 after "
        "scaling), indexed `[i][j]`;",
        "  * `resampled.f32.gz`: after Spacingd + Fetch2DSliced, `(H', W')`;",
        "  * `network_input.f32.gz`: after AddGuidanceSignald, `(1, 3, h, w)`;",
        "  * `logits.f32.gz`: synthetic logits `(h, w)`: smooth, both signs, quantised to 1/8, "
        "plus values exactly at torch's float32 `sigmoid(x) >= 0.5` boundary on the centre row;",
        "  * `mask.u8.gz`: the restored mask of the chosen slice `(H, W)`, `[i][j]` "
        "(RestoreLabeld + AsChannelLastd; all other slices were checked to be zero).",
        "",
        "## Cases",
        "",
        "| case | input | source | licence |",
        "|---|---|---|---|",
    ]
    for m in metas:
        s = m["source"]
        src = s.get("file", "synthetic phantom (seed %s)" % s.get("seed"))
        if "crop_ijk" in s:
            src += " crop i/j/k %s" % s["crop_ijk"]
        vol = m["volume"]
        lines.append(f"| `{m['name']}` | {vol['shape']} {vol['dtype']} | {src} | {s['licence']} |")
    lines += ["", "Descriptions:", ""]
    for m in metas:
        lines.append(f"* `{m['name']}`: {m['description']}")
    lines += [
        "",
        "## Sources",
        "",
        "Real CT crops come from `/work/shared/data` (see its SOURCES.md); origin, licence and the "
        "SHA-256 of each source file are also in each `case.json` under `source`.",
        "",
    ]
    for path, s in SOURCES.items():
        if any(m["source"].get("file") == path for m in metas):
            lines.append(f"* `{path}`: {s['origin']}. Licence: {s['licence']}.")
    lines += [
        "",
        "Synthetic phantoms are generated by the harness (`phantom()`: ellipses, a bone ring, "
        "gradients and seeded noise) and carry no third-party data.",
        "",
    ]
    (root / "README.md").write_text("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/golden"))
    ap.add_argument("--case", action="append", help="only these cases (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    metas = []
    for case in CASES:
        if args.case and case["name"] not in args.case:
            continue
        metas.append(write_case(case, root))
    if not args.case:
        write_readme(root, metas)
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"{len(metas)} cases, {total / 1e6:.2f} MB in {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
