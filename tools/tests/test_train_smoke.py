"""tools/train.py end to end (train, resume, eval, export) on a tiny synthetic NIfTI dataset, in a temp dir."""

import json

import nibabel as nib
import numpy as np
import onnx

import train


def _write_case(root, name, rng, organs):
    img = rng.normal(40, 30, size=(40, 36, 3)).astype(np.int16)
    lab = np.zeros(img.shape, dtype=np.uint8)
    yy, xx = np.mgrid[:40, :36]
    for i, (cy, cx, r) in enumerate(organs):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        lab[disc, :] = [1, 5, 7][i]
        img[disc, :] += 150
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    for sub, arr in (("imagesTr", img), ("labelsTr", lab)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, aff), str(root / sub / f"{name}.nii.gz"))


def test_train_resume_eval_export(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    _write_case(data, "case_a", rng, [(10, 10, 5), (25, 20, 8)])
    _write_case(data, "case_b", rng, [(20, 12, 6), (12, 25, 5), (30, 28, 4)])
    _write_case(data, "held_out", rng, [(15, 15, 6), (28, 22, 7)])
    work = tmp_path / "work"
    common = ["--smoke", "--data-dir", str(data), "--val-case", "held_out", "--work-dir", str(work)]

    assert train.main(common + ["--steps", "2"]) == 0
    assert train.main(common + ["--steps", "3", "--resume"]) == 0
    log = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in log)

    # the held-out case is never in the training samples
    args = train.parse_args(common)
    cases = train.load_cases(args, train.list_cases(data))
    train_samples = train.make_samples({k: v for k, v in cases.items() if k != "held_out"}, args.min_area)
    assert train_samples and all(s[0] != "held_out" for s in train_samples)
    assert cases["held_out"][0].shape == (3, 79, 71)  # (D, H', W') at 1 mm in-plane

    assert train.main(common + ["--eval", "--checkpoint", str(work / "last.pt")]) == 0
    rep = json.loads((work / "eval_step3.json").read_text())["report"]
    assert rep["spleen (1)"]["slices"] == 3 and rep["kidney_right (2)"] == "not present"
    assert set(rep["liver (5)"]) == {"slices", "dice@1", "dice@3", "dice@5", "dice@10"}

    out = tmp_path / "export"
    assert train.main(common + ["--export", "--checkpoint", str(work / "best.pt"), "--out-dir", str(out)]) == 0
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pipeline"]["model_size"] == [64, 64] and cfg["pipeline"]["divisor"] == 308.0

    # the served model folder evaluates like the checkpoint it was exported from
    assert train.main(common + ["--eval", "--checkpoint", str(work / "best.pt")]) == 0
    best_step = train.load_checkpoint(work / "best.pt")["step"]
    from_pt = json.loads((work / f"eval_step{best_step}.json").read_text())["report"]
    assert train.main(common + ["--eval", "--checkpoint", str(out / "model.onnx")]) == 0
    from_onnx = json.loads((work / f"eval_step{out.name}.json").read_text())["report"]
    assert from_onnx.keys() == from_pt.keys()
    for organ, r in from_pt.items():
        if isinstance(r, dict):
            assert all(abs(from_onnx[organ][k] - v) < 1e-6 for k, v in r.items()), organ


def _write_pair(root, name, rng, spacing, depth):
    """A NAME_img/NAME_lbl pair (the layout of ct_labeled_extra and ct_labeled_hn): one disc, label 2, on every slice."""
    img = rng.normal(40, 30, size=(24, 20, depth)).astype(np.float32)
    lab = np.zeros(img.shape, dtype=np.uint8)
    yy, xx = np.mgrid[:24, :20]
    lab[(yy - 12) ** 2 + (xx - 10) ** 2 < 25, :] = 2
    aff = np.diag([spacing, spacing, 3.0, 1.0])
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img, aff), str(root / f"{name}_img.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), str(root / f"{name}_lbl.nii.gz"))


def test_extra_and_head_neck_data_keep_the_held_out_patient_out(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    _write_case(data, "case_a", rng, [(10, 10, 5)])
    _write_case(data, "held_out", rng, [(15, 15, 6)])
    _write_pair(tmp_path / "extra", "held_out_full", rng, 3.0, 6)  # the held-out patient: its slices 2-4 are held_out
    _write_pair(tmp_path / "hn", "openkbp_pt_1", rng, 5.0, 2)
    monkeypatch.setattr(train, "SAME_PATIENT", {"held_out": {"held_out_full": (2, 5)}})
    work = tmp_path / "work"
    common = ["--smoke", "--data-dir", str(data), "--val-case", "held_out", "--work-dir", str(work),
              "--extra-dir", str(tmp_path / "extra"), "--hn-dir", str(tmp_path / "hn"), "--hn-share", "0.25",
              "--same-patient-gap", "1", "--lr-schedule", "cosine"]
    assert train.main(common + ["--steps", "2"]) == 0

    # slices resampled to 1 mm when drawn: 24 x 20 at 5 mm -> 120 x 100
    hn = train.load_native_case(tmp_path / "hn", "openkbp_pt_1", [1.0, 1.0])
    image, label = hn.slice_at(1)
    assert image.shape == label.shape == (120, 100) and set(np.unique(label)) == {0, 2}
    excluded = train.held_out_slices("held_out", 1)
    assert excluded == {"held_out_full": {1, 2, 3, 4, 5}}
    cases = {"held_out_full": train.load_native_case(tmp_path / "extra", "held_out_full", [1.0, 1.0]), "openkbp_pt_1": hn}
    samples = train.make_samples(cases, 10, excluded=excluded)
    assert sorted(s[1] for s in samples if s[0] == "held_out_full") == [0]
    ds = train.SliceDataset(cases, samples, train.pre_transforms(train.parse_args(common), True), 0,
                            shares={"abdomen": 0.75, "head_neck": 0.25})
    p = {train.source_of(g[0][0]): float(q) for g, q in zip(ds.structures, ds.structure_p)}
    assert abs(p["head_neck"] - 0.25) < 1e-9 and abs(p["abdomen"] - 0.75) < 1e-9

    # a fine-tune starts from the given weights, and the cosine schedule ends at --lr-min
    init = tmp_path / "init"
    assert train.main(common + ["--steps", "2", "--init", str(work / "last.pt"), "--work-dir", str(init)]) == 0
    log = [json.loads(line) for line in (init / "train_log.jsonl").read_text().splitlines()]
    args = train.parse_args(common + ["--steps", "2"])
    assert log[0]["lr"] == args.lr and abs(train.learning_rate(args, 2) - args.lr_min) < 1e-12


def test_elastic_augmentation_and_dice_bce_loss(tmp_path):
    # the elastic deformation moves the slice and its label together and keeps the object in view
    yy, xx = np.mgrid[:120, :100]
    disc = ((yy - 60) ** 2 + (xx - 50) ** 2 < 20 ** 2).astype(np.float32)[None]
    image = (disc * 200.0 - 100.0).astype(np.float32)
    moved_image, moved_label = train.elastic_deform(image, disc, seed=4)
    assert moved_image.shape == image.shape and moved_label.shape == disc.shape
    assert not np.array_equal(moved_label, disc)
    assert 0.6 < moved_label.sum() / disc.sum() < 1.5
    # the image followed the label: bright where the moved object is, dark elsewhere (bar the bilinear rim)
    inside, outside = moved_image[moved_label > 0.5], moved_image[moved_label < 0.5]
    assert np.median(inside) > 90 and np.median(outside) < -90
    # it is off by default, and off it leaves the result (and so the shipped runs) as they were without the option
    d = {"image": image, "label": disc}
    plain = train.augment(d, np.random.default_rng(7))
    off = train.augment(d, np.random.default_rng(7), 0.0)
    assert np.array_equal(plain["image"], off["image"]) and np.array_equal(plain["label"], off["label"])

    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    _write_case(data, "case_a", rng, [(10, 10, 5), (25, 20, 8)])
    _write_case(data, "held_out", rng, [(15, 15, 6), (28, 22, 7)])
    work = tmp_path / "work"
    common = ["--smoke", "--data-dir", str(data), "--val-case", "held_out", "--work-dir", str(work),
              "--steps", "2", "--val-every", "0", "--loss", "dice-bce", "--elastic", "1.0"]
    assert train.main(common) == 0
    log = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    # Dice + BCE is not bounded by 1 as Dice alone is, but stays finite and positive
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    assert train.parse_args(common).loss == "dice-bce"
