#!/usr/bin/env python3
"""Training recipe for the bundled Deepgrow 2D model (issue 4): train, evaluate, export.

Data: every labelled CT volume in --data-dir (imagesTr/X.nii.gz + labelsTr/X.nii.gz), and (issue 15) the
NAME_img/NAME_lbl pairs of --extra-dir and --hn-dir, kept at their own spacing and resampled to 1 mm slice by slice
when drawn. Every non-zero label id on a slice is a separate binary target (deepgrow is class-agnostic). The case
--val-case (default totalseg_example_ct_sm: the only one with liver, spleen and both kidneys) is held out for
validation and is never trained on, nor are the slices of the same patient's other file that show it (SAME_PATIENT)
and --same-patient-gap slices either side. Training samples are drawn per structure (case, label id), weighted by
the square root of its mean area, then one of its slices; the head-and-neck cases get --hn-share of the draws.

Pre-processing is the serving pipeline (config.json "pipeline"), done with MONAI's transforms:
  volume (H, W, D) -> slice axis first (EnsureChannelFirstd(channel_dim=-1), as AsChannelFirstd at inference)
  -> Spacingd(pixdim=[1, 1]) in-plane (bilinear image, nearest label) -> one 2D slice
  -> SpatialCropForegroundd(crop_size) -> Resized(model_size, area / nearest) -> (x - 208) / 308
  -> AddInitialSeedPointd -> AddGuidanceSignald(sigma 2).
No RAS reorientation (unlike monai.apps.deepgrow.dataset.create_dataset): the server does not reorient either.
Augmentation on the 1 mm slice, before the crop (--no-augment turns it off): the 8 in-plane orientations (flips and
a transpose, since the server sees volumes in their stored order), a smaller field of view around the object (so that
the crop + resize stretches it, as the server does with small images), loss of in-plane resolution (down- then
up-sampling, as for 3 mm data), and small intensity shifts, scalings and noise; with --elastic P, also (with
probability P) MONAI's Rand2DElasticd with a rotation of up to 0.2 rad and a scaling of up to 15 %.

Cost on 2 CPU cores: with --patch-size, steps before --patch-until run every click round and the update on a random
patch of the network input that contains the object (the network is fully convolutional); later steps use the
whole 512 x 512 input, so that the InstanceNorm statistics of the served input are the ones trained on last.
--bf16 runs the forward passes under CPU bf16 autocast (weights and optimizer stay float32).

Click simulation is MONAI's Deepgrow one (monai.apps.deepgrow.interaction.Interaction, run by simulate_clicks) with
Activationsd(sigmoid) -> FindDiscrepancyRegionsd -> AddRandomGuidanced -> AddGuidanceSignald, up to
--max-interactions (15) rounds per step (Sakinis et al. 2019). Loss DiceLoss(sigmoid=True) (--loss dice-bce: MONAI's
DiceCELoss, Dice + binary cross-entropy), Adam lr 1e-4 (constant,
or cosine-annealed with --lr-schedule cosine); --init starts from a checkpoint's or a served model.onnx's weights.

    # train (GPU if available), checkpoints in --work-dir every --ckpt-every steps; --resume continues from last.pt
    tools/.venv/bin/python tools/train.py --work-dir scratch/train --steps 20000
    tools/.venv/bin/python tools/train.py --work-dir scratch/train --steps 40000 --resume
    # Dice on the held-out case per organ after 1, 3, 5, 10 simulated clicks (a checkpoint, or a served model.onnx)
    tools/.venv/bin/python tools/train.py --eval --checkpoint models/deepgrow_2d/model.onnx
    # export into the served model folder (model.onnx + config.json), then refresh the parity fixture
    tools/.venv/bin/python tools/train.py --export --checkpoint scratch/train/best.pt --out-dir models/deepgrow_2d
    tools/.venv/bin/python tools/check_model.py --write-fixture
    # smoke run (seconds on CPU)
    tools/.venv/bin/python tools/train.py --smoke --work-dir /tmp/dg_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepgrow_model as dm  # noqa: E402

ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}  # TotalSegmentator "total" ids
SHARED_DATA = Path("/work/shared/data")
DEFAULT_DATA = SHARED_DATA / "ct_labeled"
DEFAULT_VAL_CASE = "totalseg_example_ct_sm"
# data/SOURCES.md: totalseg_example_ct_sm is slices 82-111 of the 112-slice original (same patient, same scan)
SAME_PATIENT = {"totalseg_example_ct_sm": {"totalseg_examplect112": (82, 112)}}


# ------------------------------------------------------------------------------------------------ data

def list_cases(data_dir: Path) -> list[str]:
    names = []
    for p in sorted((data_dir / "imagesTr").glob("*.nii*")):
        name = p.name.split(".nii")[0]
        if list((data_dir / "labelsTr").glob(name + ".nii*")):
            names.append(name)
    return names


def _case_files(data_dir: Path, name: str) -> tuple[str, str]:
    img = sorted((data_dir / "imagesTr").glob(name + ".nii*"))[0]
    lab = sorted((data_dir / "labelsTr").glob(name + ".nii*"))[0]
    return str(img), str(lab)


def resample_case(data_dir: Path, name: str, pixdim) -> tuple[np.ndarray, np.ndarray]:
    """(D, H', W') float32 image and int16 label at `pixdim` mm in-plane, exactly as the server's S1-S3."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Spacingd

    img, lab = _case_files(data_dir, name)
    t = Compose([
        LoadImaged(keys=["image", "label"], image_only=True),
        EnsureChannelFirstd(keys=["image", "label"], channel_dim=-1),  # slice axis first, like AsChannelFirstd
        Spacingd(keys=["image", "label"], pixdim=list(pixdim), mode=["bilinear", "nearest"]),
    ])
    d = t({"image": img, "label": lab})
    image = np.asarray(d["image"].numpy(), dtype=np.float32)
    label = np.rint(np.asarray(d["label"].numpy())).astype(np.int16)
    return image, label


def load_cases(args, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Resampled volumes, cached as .npz under work-dir/cache (keyed by pixdim)."""
    cache = Path(args.work_dir) / "cache" / ("pixdim_" + "x".join(f"{p:g}" for p in args.pixdim))
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        f = cache / f"{name}.npz"
        if f.is_file():
            z = np.load(f)
            out[name] = (z["image"], z["label"])
        else:
            image, label = resample_case(Path(args.data_dir), name, args.pixdim)
            np.savez(f, image=image, label=label)
            out[name] = (image, label)
    return out


def make_samples(cases: dict, min_area: int, regions: set[int] | None = None,
                 excluded: dict[str, set[int]] | None = None) -> list[tuple[str, int, int, float]]:
    """(case, slice, region id, area in target pixels) for every non-zero label id with >= min_area pixels on a
    slice at the target spacing, except the slices `excluded` names per case."""
    samples = []
    for name, case in cases.items():
        label, px_scale = (case.label, case.pixel_scale) if isinstance(case, NativeCase) else (case[1], 1.0)
        skip = (excluded or {}).get(name, set())
        for s in range(label.shape[0]):
            if s in skip:
                continue
            ids, counts = np.unique(label[s], return_counts=True)
            for i, c in zip(ids.tolist(), counts.tolist()):
                area = c * px_scale
                if i != 0 and area >= min_area and (regions is None or i in regions):
                    samples.append((name, s, int(i), float(area)))
    return samples


class NativeCase:
    """A volume kept at its own spacing (slice axis first) whose slices are resampled to the target spacing when
    drawn: the 283 head-and-neck CTs at 5 mm would take ~200 MB each at 1 mm."""

    def __init__(self, image: np.ndarray, label: np.ndarray, spacing: tuple[float, float], pixdim):
        self.image, self.label = image, label
        self.size = [max(1, round(n * sp / pd)) for n, sp, pd in zip(image.shape[1:], spacing, pixdim)]
        self.pixel_scale = float(np.prod(self.size) / np.prod(image.shape[1:]))

    def slice_at(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        f = torch.nn.functional
        image = f.interpolate(torch.from_numpy(self.image[s])[None, None], size=self.size, mode="bilinear",
                              align_corners=False)[0, 0].numpy()
        label = f.interpolate(torch.from_numpy(self.label[s].astype(np.float32))[None, None], size=self.size,
                              mode="nearest")[0, 0].numpy().astype(np.int16)
        return image, label


def list_pair_cases(data_dir: Path) -> list[str]:
    """Names of the NAME_img.nii.gz + NAME_lbl.nii.gz pairs in a directory (ct_labeled_extra, ct_labeled_hn)."""
    return sorted(p.name[: -len("_img.nii.gz")] for p in data_dir.glob("*_img.nii.gz")
                  if (data_dir / (p.name[: -len("_img.nii.gz")] + "_lbl.nii.gz")).is_file())


def load_native_case(data_dir: Path, name: str, pixdim) -> NativeCase:
    import nibabel as nib

    img = nib.load(str(data_dir / f"{name}_img.nii.gz"))
    lab = nib.load(str(data_dir / f"{name}_lbl.nii.gz"))
    image = np.ascontiguousarray(np.moveaxis(img.get_fdata(dtype=np.float32), -1, 0))
    label = np.ascontiguousarray(np.moveaxis(np.rint(lab.get_fdata()).astype(np.int16), -1, 0))
    return NativeCase(image, label, tuple(float(z) for z in img.header.get_zooms()[:2]), pixdim)


def source_of(case: str) -> str:
    return "head_neck" if case.startswith("openkbp_") else "abdomen"


def held_out_slices(val_case: str, gap: int) -> dict[str, set[int]]:
    """Slices of other files that show the held-out patient near the held-out slices, which training never uses."""
    out = {}
    for other, (lo, hi) in SAME_PATIENT.get(val_case, {}).items():
        out[other] = set(range(max(lo - gap, 0), hi + gap))
    return out


def slice_at(case, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(H', W') image and label of slice s at the target spacing: a pre-resampled (image, label) pair, or a
    NativeCase that resamples the slice it is asked for."""
    if isinstance(case, NativeCase):
        return case.slice_at(s)
    return case[0][s], case[1][s]


def sample_dict(cases: dict, sample: tuple) -> dict:
    name, s, region = sample[:3]
    image, label = slice_at(cases[name], s)
    return {
        "image": image[None].astype(np.float32),
        "label": (label == region)[None].astype(np.float32),
        "image_meta_dict": {},
        "label_meta_dict": {},
        "case": name, "slice": s, "region": region,
    }


# ------------------------------------------------------------------------------------------------ transforms

def pre_transforms(args, train: bool):
    """The serving pipeline's crop, resize and normalisation, then (after the optional training patch) the first
    click. Returns (geometry, clicks): two Composes, applied in that order."""
    from monai.apps.deepgrow.transforms import AddGuidanceSignald, AddInitialSeedPointd, SpatialCropForegroundd
    from monai.transforms import Compose, DeleteItemsd, EnsureTyped, NormalizeIntensityd, Resized, ToNumpyd

    keys = ["image", "label"]
    geometry = Compose([
        SpatialCropForegroundd(keys=keys, source_key="label", spatial_size=args.crop_size),
        Resized(keys=keys, spatial_size=args.model_size, mode=["area", "nearest"]),
        NormalizeIntensityd(keys="image", subtrahend=args.subtrahend, divisor=args.divisor),
        ToNumpyd(keys=keys),
    ])
    first_click = Compose([
        AddInitialSeedPointd(label="label", guidance="guidance"),
        AddGuidanceSignald(image="image", guidance="guidance", sigma=args.sigma),
        DeleteItemsd(keys=["image_meta_dict", "label_meta_dict"]),
        EnsureTyped(keys=keys, track_meta=False),
    ])
    return geometry, first_click


def apply_pre(transforms, d: dict, seed: int, rng: np.random.Generator | None = None, patch: int = 0) -> dict:
    """geometry -> (a random patch of `patch` x `patch` that holds part of the object, if patch) -> first click."""
    geometry, first_click = transforms
    geometry.set_random_state(seed=seed)
    first_click.set_random_state(seed=seed + 1)
    d = geometry(d)
    if patch:
        d = random_patch(d, patch, rng)
    return first_click(d)


def augment(d: dict, rng: np.random.Generator, elastic: float = 0.0) -> dict:
    """Training augmentation of one (1, H, W) slice at 1 mm and its binary label (see the module docstring);
    with probability `elastic`, also MONAI's elastic deformation with a small rotation and scaling."""
    image, label = d["image"], d["label"]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if rng.random() < 0.5:
        image, label = image[:, :, ::-1], label[:, :, ::-1]
    if rng.random() < 0.5:
        image, label = image.transpose(0, 2, 1), label.transpose(0, 2, 1)
    if rng.random() < 0.4:
        # a smaller field of view that still holds the object and the crop margin
        box = []
        for axis in (0, 1):
            nz = np.nonzero(label[0].any(axis=1 - axis))[0]
            n = label.shape[axis + 1]
            lo_max = max(int(nz[0]) - 20, 0)
            hi_min = min(int(nz[-1]) + 21, n)
            lo = int(rng.integers(0, lo_max + 1))
            hi = int(rng.integers(hi_min, n + 1))
            box.append((lo, hi))
        (y0, y1), (x0, x1) = box
        image, label = image[:, y0:y1, x0:x1], label[:, y0:y1, x0:x1]
    image = np.ascontiguousarray(image, dtype=np.float32)
    label = np.ascontiguousarray(label, dtype=np.float32)
    # drawn only when asked for, so that runs without it keep their random streams
    if elastic and rng.random() < elastic:
        image, label = elastic_deform(image, label, int(rng.integers(2**31)))
    if rng.random() < 0.25 and min(image.shape[1:]) >= 32:
        # coarser in-plane resolution (e.g. 1.5-3 mm data resampled to 1 mm)
        f = rng.uniform(1.5, 3.2)
        t = torch.from_numpy(image)[None]
        small = torch.nn.functional.interpolate(
            t, size=[max(8, round(n / f)) for n in image.shape[1:]], mode="area")
        image = torch.nn.functional.interpolate(
            small, size=list(image.shape[1:]), mode="bilinear", align_corners=False)[0].numpy()
    if rng.random() < 0.5:
        image = image * np.float32(rng.uniform(0.92, 1.08)) + np.float32(rng.uniform(-25.0, 25.0))
    if rng.random() < 0.2:
        image = image + rng.normal(0.0, rng.uniform(2.0, 20.0), image.shape).astype(np.float32)
    return {**d, "image": image.astype(np.float32), "label": label}


def elastic_deform(image: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rand2DElasticd: control points every 40 mm moved by 2-5 mm (a mean displacement of about 3 mm), a rotation
    of up to 0.2 rad and a scaling of up to 15 %. Keeps the input when the object would fall out of view."""
    from monai.transforms import Rand2DElasticd

    deform = Rand2DElasticd(keys=("image", "label"), spacing=(40, 40), magnitude_range=(2, 5), prob=1.0,
                            rotate_range=(0.2,), scale_range=(0.15, 0.15), mode=("bilinear", "nearest"),
                            padding_mode=("border", "zeros"))
    deform.set_random_state(seed=seed)
    out = deform({"image": image, "label": label})
    new_label = np.ascontiguousarray(np.asarray(out["label"]), dtype=np.float32)
    if new_label.sum() < max(10.0, 0.5 * float(label.sum())):
        return image, label
    return np.ascontiguousarray(np.asarray(out["image"]), dtype=np.float32), new_label


def random_patch(d: dict, patch: int, rng: np.random.Generator) -> dict:
    """A patch x patch window of the network input around a random object pixel (jittered by a quarter patch)."""
    label = np.asarray(d["label"])
    ys, xs = np.nonzero(label[0] > 0.5)
    k = int(rng.integers(len(ys)))
    window = []
    for c, n in ((int(ys[k]), label.shape[1]), (int(xs[k]), label.shape[2])):
        size = min(patch, n)
        start = c - size // 2 + int(rng.integers(-(patch // 4), patch // 4 + 1))
        start = min(max(start, 0), n - size)
        start = min(start, c)  # the chosen object pixel stays inside
        start = max(start, c - size + 1)
        window.append(slice(start, start + size))
    sl = (slice(None), *window)
    return {**d, "image": np.ascontiguousarray(np.asarray(d["image"])[sl]),
            "label": np.ascontiguousarray(label[sl])}


def click_transforms(args):
    from monai.apps.deepgrow.transforms import AddGuidanceSignald, AddRandomGuidanced, FindDiscrepancyRegionsd
    from monai.transforms import Activationsd, Compose, EnsureTyped, ToNumpyd

    return Compose([
        Activationsd(keys="pred", sigmoid=True),
        ToNumpyd(keys=["image", "label", "pred"]),
        FindDiscrepancyRegionsd(label="label", pred="pred", discrepancy="discrepancy"),
        AddRandomGuidanced(guidance="guidance", discrepancy="discrepancy", probability="probability"),
        AddGuidanceSignald(image="image", guidance="guidance", sigma=args.sigma),
        EnsureTyped(keys=["image", "label"], track_meta=False),
    ])


class SliceDataset(torch.utils.data.Dataset):
    """Item g of an endless, seeded stream: a structure (case, label id) is drawn with probability proportional to the
    square root of its mean area, then one of its slices; augmentation, patch and first click are seeded by (seed, g). Items of steps before
    `patch_until` are patches of `patch_size` (0: the whole network input)."""

    def __init__(self, cases, samples, transforms, seed: int, augment: bool = True, patch_size: int = 0,
                 patch_until: int = 0, batch_size: int = 1, shares: dict[str, float] | None = None,
                 elastic: float = 0.0):
        self.cases, self.transforms, self.seed, self.augment = cases, transforms, seed, augment
        self.elastic = elastic
        self.patch_size, self.patch_until, self.batch_size = patch_size, patch_until, batch_size
        by_structure: dict[tuple[str, int], list] = {}
        for sample in samples:
            by_structure.setdefault((sample[0], sample[2]), []).append(sample)
        self.structures = [by_structure[k] for k in sorted(by_structure)]
        # sqrt of the mean area: large organs (long boundaries, the hard cases) are drawn more often than the many
        # small ribs and vessels, without drowning them
        areas = [np.mean([sample[3] for sample in group]) for group in self.structures]
        weights = np.sqrt(np.asarray(areas, dtype=np.float64))
        if shares:
            # each source (abdomen, head and neck) gets its share of the draws, whatever its number of structures
            source = np.asarray([source_of(group[0][0]) for group in self.structures])
            for name in set(source.tolist()):
                mask = source == name
                weights[mask] *= shares.get(name, 0.0) / weights[mask].sum()
        self.structure_p = weights / weights.sum()

    def __len__(self):
        return sum(len(s) for s in self.structures)

    def patch_for(self, g: int) -> int:
        return self.patch_size if g // self.batch_size < self.patch_until else 0

    def __getitem__(self, g: int):
        rng = np.random.default_rng([self.seed, g])
        group = self.structures[int(rng.choice(len(self.structures), p=self.structure_p))]
        d = sample_dict(self.cases, group[int(rng.integers(len(group)))])
        if self.augment:
            d = augment(d, rng, self.elastic)
        return apply_pre(self.transforms, d, int(rng.integers(2**31)), rng, self.patch_for(g))


# ------------------------------------------------------------------------------------------------ helpers

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_all(seed: int) -> None:
    from monai.utils import set_determinism

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_determinism(seed=seed)


def dice(pred: np.ndarray, label: np.ndarray) -> float:
    p, g = pred > 0, label > 0.5
    denom = p.sum() + g.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, g).sum() / denom)


def save_checkpoint(path: Path, net, opt, step: int, args, best: float | None, extra: dict | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({
        "model": net.state_dict(), "optimizer": opt.state_dict() if opt else None, "step": step,
        "best_val_dice": best, "args": vars(args), **(extra or {}),
    }, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(net, cases, samples, args, device, clicks=(1, 3, 5, 10), batch_size: int = 8) -> dict:
    """Dice after k simulated clicks (first click: AddInitialSeedPointd; then one click per round where the
    discrepancy is largest, AddRandomGuidanced with probability 1, as Interaction(train=False)).
    Dice is computed in network space (crop + resize), per (slice, region); reported as means per organ."""
    from monai.data import decollate_batch, list_data_collate

    pre = pre_transforms(args, train=False)
    clk = click_transforms(args)
    net.eval()
    kmax = max(clicks)
    scores = {k: [] for k in clicks}
    regions = []
    for b0 in range(0, len(samples), batch_size):
        items = []
        for i in range(b0, min(b0 + batch_size, len(samples))):
            items.append(apply_pre(pre, sample_dict(cases, samples[i]), args.seed * 7919 + i))
            regions.append(samples[i][2])
        for k in range(1, kmax + 1):
            batch = list_data_collate(items)
            logits = net(batch["image"].to(device)).float()
            if k in clicks:
                for j in range(len(items)):
                    scores[k].append(dice(logits[j].cpu().numpy(), items[j]["label"].numpy()))
            if k == kmax:
                break
            batch["pred"] = logits
            batch["probability"] = torch.ones(len(items))
            new = []
            for j, d in enumerate(decollate_batch(batch, detach=True)):
                d["probability"] = 1.0
                clk.set_random_state(seed=args.seed * 104729 + (b0 + j) * 131 + k)
                d = clk(d)
                new.append({key: d[key] for key in ("image", "label", "guidance")})
            items = new
    regions = np.asarray(regions)
    report = {}
    groups = {f"{ORGANS[r]} ({r})": regions == r for r in ORGANS}
    groups["all evaluated regions"] = np.ones_like(regions, dtype=bool)
    for gname, mask in groups.items():
        n = int(mask.sum())
        if n == 0:
            report[gname] = "not present"
            continue
        report[gname] = {"slices": n, **{f"dice@{k}": float(np.mean(np.asarray(scores[k])[mask])) for k in clicks}}
    return report


def print_report(report: dict, clicks) -> None:
    head = f"{'organ':28s} {'n':>4s} " + " ".join(f"{'dice@' + str(k):>8s}" for k in clicks)
    print(head)
    for g, r in report.items():
        if isinstance(r, str):
            print(f"{g:28s} {r}")
        else:
            print(f"{g:28s} {r['slices']:4d} " + " ".join(f"{r['dice@' + str(k)]:8.4f}" for k in clicks))


# ------------------------------------------------------------------------------------------------ training

def autocast(args, device):
    """bf16 autocast for the forward passes on CPU with --bf16 (fp16 autocast on CUDA with --amp)."""
    if device.type == "cuda":
        return torch.autocast("cuda", enabled=args.amp)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)


def simulate_clicks(net, items: list[dict], clicks, args, device, rng: np.random.Generator) -> list[dict]:
    """MONAI's Deepgrow click simulation (monai.apps.deepgrow.interaction.Interaction, train=True): in round j of
    --max-interactions, each sample gets a click with probability 1 - j / max_interactions, placed by
    FindDiscrepancyRegionsd + AddRandomGuidanced in its largest error region of the network's current prediction.
    Equivalent, but only the samples that click this round are run through the network (the others' inputs, and
    so their predictions, do not change)."""
    n_rounds = args.max_interactions
    net.eval()
    for j in range(n_rounds):
        p = 1.0 - j / n_rounds
        clicking = [i for i in range(len(items)) if rng.random() < p]
        if not clicking:
            continue
        x = torch.stack([torch.as_tensor(items[i]["image"]) for i in clicking]).to(device)
        with torch.no_grad(), autocast(args, device):
            logits = net(x).float().cpu()
        for k, i in enumerate(clicking):
            d = dict(items[i])
            d["pred"], d["probability"] = logits[k], 1.0
            clicks.set_random_state(seed=int(rng.integers(2**31)))
            d = clicks(d)
            items[i] = {key: d[key] for key in ("image", "label", "guidance")}
    return items


def learning_rate(args, step: int) -> float:
    """--lr, constant or cosine-annealed to --lr-min over --steps (a function of the step, so --resume keeps it)."""
    if args.lr_schedule == "constant":
        return args.lr
    return args.lr_min + 0.5 * (args.lr - args.lr_min) * (1.0 + np.cos(np.pi * min(step / args.steps, 1.0)))


def train(args) -> int:
    from monai.data import list_data_collate
    from monai.losses import DiceCELoss, DiceLoss

    seed_all(args.seed)
    device = pick_device(args.device)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    names = list_cases(Path(args.data_dir))
    if args.val_case not in names:
        raise SystemExit(f"validation case {args.val_case} not found in {args.data_dir}")
    train_names = [n for n in names if n != args.val_case]
    assert args.val_case not in train_names
    cases = load_cases(args, names)
    train_cases = {n: cases[n] for n in train_names}
    for pair_dir, limit in [(d, 0) for d in args.extra_dir] + ([(args.hn_dir, args.hn_limit)] if args.hn_dir else []):
        names_here = [n for n in list_pair_cases(pair_dir) if n != args.val_case]
        if limit and len(names_here) > limit:
            names_here = [names_here[int(i)] for i in np.linspace(0, len(names_here) - 1, limit)]
        for name in names_here:
            train_cases[name] = load_native_case(pair_dir, name, args.pixdim)
    val_cases = {args.val_case: cases[args.val_case]}
    excluded = held_out_slices(args.val_case, args.same_patient_gap)
    train_samples = make_samples(train_cases, args.min_area, excluded=excluded)
    for name, skip in excluded.items():
        # the held-out patient's own slices (and their neighbours) never reach training
        assert not any(smp[0] == name and smp[1] in skip for smp in train_samples)
        if name in train_cases:
            print(f"{name}: slices {min(skip)}-{max(skip)} excluded (the held-out {args.val_case} and "
                  f"{args.same_patient_gap} slices either side)", flush=True)
    val_samples = make_samples(val_cases, args.min_area, set(ORGANS))
    if args.val_limit and len(val_samples) > args.val_limit:
        # an evenly spread, fixed subset (every organ keeps some slices)
        val_samples = [val_samples[int(i)] for i in np.linspace(0, len(val_samples) - 1, args.val_limit)]
    ds = SliceDataset(train_cases, train_samples, pre_transforms(args, train=True), args.seed,
                      augment=args.augment, patch_size=args.patch_size, patch_until=args.patch_until,
                      batch_size=args.batch_size, elastic=args.elastic,
                      shares={"abdomen": 1.0 - args.hn_share, "head_neck": args.hn_share} if args.hn_dir else None)
    train_names = sorted(train_cases)
    print(f"device {device}; {len(train_names)} train cases: {len(train_samples)} (slice, region) samples in "
          f"{len(ds.structures)} structures; validation {args.val_case}: {len(val_samples)} organ samples",
          flush=True)

    net = dm.build_net(seed=args.seed).to(device)
    assert dm.count_params(net) == dm.EXPECTED_PARAMS
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    # Dice alone (MONAI's deepgrow recipe) or Dice + binary cross-entropy (the model card's ablation)
    loss_fn = DiceLoss(sigmoid=True) if args.loss == "dice" else DiceCELoss(sigmoid=True)
    step, best = 0, None
    last = work / "last.pt"
    if args.init and not args.resume:
        init_args = SimpleNamespace(**{**vars(args), "checkpoint": args.init})
        net.load_state_dict(load_for_eval(init_args)[0].state_dict())
        print(f"initialised from {args.init}", flush=True)
    if args.resume:
        if not last.is_file():
            raise SystemExit(f"--resume: {last} not found")
        ck = load_checkpoint(last)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, best = int(ck["step"]), ck.get("best_val_dice")
        print(f"resumed from {last} at step {step} (best val dice {best})", flush=True)
    if step >= args.steps:
        print(f"already at step {step} >= --steps {args.steps}")
        return 0

    clicks = click_transforms(args)
    use_amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    log = open(work / "train_log.jsonl", "a")
    t0 = time.time()
    while step < args.steps:
        g0 = step * args.batch_size
        items = [ds[g] for g in range(g0, g0 + args.batch_size)]
        items = [{key: d[key] for key in ("image", "label", "guidance")} for d in items]
        items = simulate_clicks(net, items, clicks, args, device, np.random.default_rng([args.seed, step, 2]))
        batch = list_data_collate(items)
        x, y = batch["image"].to(device), batch["label"].to(device)
        net.train()
        for group in opt.param_groups:
            group["lr"] = learning_rate(args, step)
        opt.zero_grad(set_to_none=True)
        with autocast(args, device):
            out = net(x)
        loss = loss_fn(out.float(), y)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        step += 1
        rec = {"step": step, "loss": float(loss.detach()), "size": int(x.shape[-1]), "sec": round(time.time() - t0, 3),
               "lr": opt.param_groups[0]["lr"]}
        if step % args.log_every == 0 or step == args.steps:
            print(json.dumps(rec), flush=True)
        if args.val_every and (step % args.val_every == 0 or step == args.steps) and val_samples:
            rep = evaluate(net, cases, val_samples, args, device, clicks=(args.val_clicks,), batch_size=args.batch_size)
            val = rep["all evaluated regions"][f"dice@{args.val_clicks}"]
            rec["val_dice"] = val
            print(json.dumps({"step": step, f"val_dice@{args.val_clicks}": val}), flush=True)
            if best is None or val > best:
                best = val
                save_checkpoint(work / "best.pt", net, None, step, args, best)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(last, net, opt, step, args, best)
            if args.keep_checkpoints:
                save_checkpoint(work / f"step_{step:07d}.pt", net, opt, step, args, best)
    log.close()
    print(f"done: step {step}, {time.time() - t0:.1f} s, checkpoints in {work}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ eval / export

def _args_from_checkpoint(args, ck: dict):
    """The pipeline a checkpoint was trained with wins over the command line (sizes, normalisation, sigma)."""
    saved = ck.get("args", {})
    for k in ("model_size", "crop_size", "subtrahend", "divisor", "sigma", "pixdim"):
        if k in saved:
            setattr(args, k, saved[k])
    return args


def load_for_eval(args):
    """(net, checkpoint info, args) from a training checkpoint, or from a served model folder's model.onnx (its
    weights read back from the ONNX initializers, its pipeline from the config.json beside it)."""
    path = Path(args.checkpoint)
    if path.suffix != ".onnx":
        ck = load_checkpoint(path)
        return dm.load_state_dict_into_net(ck), ck, _args_from_checkpoint(args, ck)
    import onnx
    from check_model import net_from_onnx

    net = net_from_onnx(onnx.load(str(path)))
    pipeline = json.loads((path.parent / "config.json").read_text())["pipeline"]
    for key, arg in [("model_size", "model_size"), ("crop_size", "crop_size"), ("subtrahend", "subtrahend"),
                     ("divisor", "divisor"), ("sigma", "sigma"), ("target_spacing", "pixdim")]:
        setattr(args, arg, pipeline[key])
    return net, {"step": path.parent.name}, args


def run_eval(args) -> int:
    seed_all(args.seed)
    device = pick_device(args.device)
    net, ck, args = load_for_eval(args)
    net = net.to(device)
    cases = load_cases(args, [args.val_case])
    samples = make_samples(cases, args.min_area, None if args.eval_all_regions else set(ORGANS))
    samples = samples[: args.eval_limit or None]
    print(f"eval {args.checkpoint} (step {ck.get('step')}) on {args.val_case}: {len(samples)} (slice, region) samples, "
          f"network {args.model_size}, device {device}", flush=True)
    rep = evaluate(net, cases, samples, args, device, clicks=tuple(args.eval_clicks), batch_size=args.batch_size)
    print_report(rep, args.eval_clicks)
    out = Path(args.work_dir) / f"eval_step{ck.get('step')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "step": ck.get("step"), "val_case": args.val_case,
                               "clicks": args.eval_clicks, "report": rep}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def run_export(args) -> int:
    from export_onnx import export_model_dir

    ck = load_checkpoint(args.checkpoint)
    args = _args_from_checkpoint(args, ck)
    net = dm.load_state_dict_into_net(ck)
    desc = args.description or (
        f"Deepgrow 2D BasicUNet trained with tools/train.py (step {ck.get('step')}) on the project's labelled CT slices.")
    sha = export_model_dir(
        net, Path(args.out_dir), tuple(args.onnx_size or args.model_size), name=args.name, description=desc,
        version=args.version,
        model_size=list(args.model_size), crop_size=list(args.crop_size), subtrahend=args.subtrahend,
        divisor=args.divisor, sigma=args.sigma, target_spacing=list(args.pixdim),
    )
    print(f"wrote {args.out_dir}/model.onnx (sha256 {sha}) and config.json")
    print("next: tools/.venv/bin/python tools/check_model.py --model "
          f"{Path(args.out_dir) / 'model.onnx'} [--write-fixture]; update the model card")
    return 0


# ------------------------------------------------------------------------------------------------ CLI

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--eval", action="store_true",
                      help="evaluate --checkpoint (a .pt checkpoint or a served model.onnx) on the held-out case")
    mode.add_argument("--export", action="store_true", help="export --checkpoint to --out-dir (model.onnx + config.json)")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny settings that prove the pipeline runs end to end")

    g = ap.add_argument_group("data and pipeline")
    g.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    g.add_argument("--val-case", default=DEFAULT_VAL_CASE)
    g.add_argument("--work-dir", type=Path, default=dm.REPO_ROOT / "scratch" / "train")
    g.add_argument("--pixdim", type=float, nargs=2, default=dm.DEFAULT_PIPELINE["target_spacing"])
    g.add_argument("--model-size", type=int, nargs=2, default=dm.DEFAULT_PIPELINE["model_size"])
    g.add_argument("--crop-size", type=int, nargs=2, default=dm.DEFAULT_PIPELINE["crop_size"])
    g.add_argument("--subtrahend", type=float, default=dm.DEFAULT_PIPELINE["subtrahend"])
    g.add_argument("--divisor", type=float, default=dm.DEFAULT_PIPELINE["divisor"])
    g.add_argument("--sigma", type=float, default=dm.DEFAULT_PIPELINE["sigma"])
    g.add_argument("--extra-dir", type=Path, nargs="*", default=[],
                   help="more training data: directories of NAME_img.nii.gz + NAME_lbl.nii.gz pairs (abdomen share), "
                        f"e.g. {SHARED_DATA / 'ct_labeled_extra'}")
    g.add_argument("--hn-dir", type=Path, default=None,
                   help=f"head-and-neck CTs (NAME_img/NAME_lbl pairs), e.g. {SHARED_DATA / 'ct_labeled_hn'}")
    g.add_argument("--hn-limit", type=int, default=0, help="at most this many head-and-neck cases, evenly spread (0: all)")
    g.add_argument("--hn-share", type=float, default=0.3, help="share of the draws that come from --hn-dir")
    g.add_argument("--same-patient-gap", type=int, default=5,
                   help="slices either side of the held-out case's own slices that training skips in a file of the "
                        "same patient (totalseg_examplect112 holds totalseg_example_ct_sm)")
    g.add_argument("--min-area", type=int, default=10, help="skip label regions smaller than this (pixels at 1 mm)")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no random in-plane flips")
    g.add_argument("--elastic", type=float, default=0.0,
                   help="probability of an elastic deformation with rotation and scaling per sample (0: none)")

    g = ap.add_argument_group("training")
    g.add_argument("--steps", type=int, default=20000)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--loss", choices=["dice", "dice-bce"], default="dice",
                   help="DiceLoss(sigmoid=True), or DiceCELoss(sigmoid=True): Dice + binary cross-entropy")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    g.add_argument("--lr-min", type=float, default=1e-6, help="the cosine schedule's last learning rate")
    g.add_argument("--init", type=Path, default=None,
                   help="start from these weights (a .pt checkpoint or a served model.onnx) instead of random ones")
    g.add_argument("--max-interactions", type=int, default=15)
    g.add_argument("--ckpt-every", type=int, default=500)
    g.add_argument("--keep-checkpoints", action="store_true", help="also keep step_NNNNNNN.pt files")
    g.add_argument("--val-every", type=int, default=1000, help="0: no validation during training")
    g.add_argument("--val-clicks", type=int, default=5)
    g.add_argument("--val-limit", type=int, default=0, help="at most this many validation samples (0: all)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--resume", action="store_true", help="continue from work-dir/last.pt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for forward passes on CPU")
    g.add_argument("--patch-size", type=int, default=0,
                   help="train on patches of this size of the network input (0: the whole input)")
    g.add_argument("--patch-until", type=int, default=0, help="use --patch-size for steps before this one")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")

    g = ap.add_argument_group("eval")
    g.add_argument("--eval-clicks", type=int, nargs="+", default=[1, 3, 5, 10])
    g.add_argument("--eval-limit", type=int, default=0)
    g.add_argument("--eval-all-regions", action="store_true", help="every label id, not only spleen/kidneys/liver")

    g = ap.add_argument_group("export")
    g.add_argument("--out-dir", type=Path, default=dm.MODEL_DIR)
    g.add_argument("--name", default="deepgrow_2d")
    g.add_argument("--version", default="2")
    g.add_argument("--onnx-size", type=int, nargs=2, default=None,
                   help="the input size the graph declares (default: --model-size); the server sets the input to the "
                        "config's model_size, the network being fully convolutional")
    g.add_argument("--description", default=None)

    args = ap.parse_args(argv)
    if args.smoke:
        args.model_size, args.crop_size = [64, 64], [64, 64]
        args.batch_size, args.max_interactions = 2, 3
        args.patch_size, args.patch_until = args.patch_size or 32, args.patch_until or 2
        args.steps = args.steps if args.steps != 20000 else 4
        args.ckpt_every, args.val_every, args.val_limit, args.log_every = 2, 2, 4, 1
        args.eval_limit = args.eval_limit or 6
        args.threads = args.threads or 1
    if (args.eval or args.export) and not args.checkpoint:
        ap.error("--eval/--export need --checkpoint")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval:
        return run_eval(args)
    if args.export:
        return run_export(args)
    return train(args)


if __name__ == "__main__":
    raise SystemExit(main())
