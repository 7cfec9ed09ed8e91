//! The bundled model does its job, through the whole click path (decode, pipeline, fast kernels, restore,
//! encode): on the held-out CT of `tests/fixtures/ct` (never trained on), one foreground click at the centre of
//! the liver, the spleen and each kidney, on the slice where that organ is largest, returns a mask that overlaps
//! the organ's label, two corrective clicks (at the centre of the larger error) make it closer, and a click in
//! the liver does not return the spleen.

use std::path::Path;
use std::sync::Arc;

use deepgrow_server::admission::Inline;
use deepgrow_server::annotate::{annotate, ImageSource, MaskFormat, OutputOptions};
use deepgrow_server::deepgrow::Clicks;
use deepgrow_server::engine::{Kernels, TractEngine};
use deepgrow_server::models::{read_model_config, Model};
use deepgrow_server::nifti_io::{decode, DecodeLimits, MaskDtype, Volume};
use ndarray::Array2;

const LIMITS: DecodeLimits = DecodeLimits {
    max_decompressed_bytes: 1 << 30,
};

fn fixture(name: &str) -> Volume {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ct")
        .join(name);
    decode(&std::fs::read(path).unwrap(), LIMITS).unwrap()
}

fn bundled_model() -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/deepgrow_2d");
    let config = read_model_config(&dir).unwrap().unwrap();
    let size = config.pipeline.model_size;
    let engine = TractEngine::load(&dir.join("model.onnx"), size, 2, Kernels::Fast).unwrap();
    Model {
        info: config.info,
        pipeline: config.pipeline,
        engine: Arc::new(engine),
    }
}

/// The pixel farthest (chessboard distance) from the region's border: where an annotator clicks.
fn centre(region: &Array2<bool>) -> [usize; 2] {
    let (h, w) = region.dim();
    let mut dist =
        Array2::<u32>::from_shape_fn((h, w), |p| if region[p] { u32::MAX / 2 } else { 0 });
    for pass in 0..2 {
        let order: Vec<(usize, usize)> = if pass == 0 {
            (0..h).flat_map(|i| (0..w).map(move |j| (i, j))).collect()
        } else {
            (0..h)
                .rev()
                .flat_map(|i| (0..w).rev().map(move |j| (i, j)))
                .collect()
        };
        for (i, j) in order {
            if !region[[i, j]] {
                continue;
            }
            let mut best = dist[[i, j]];
            for (di, dj) in [
                (-1, -1),
                (-1, 0),
                (-1, 1),
                (0, -1),
                (0, 1),
                (1, -1),
                (1, 0),
                (1, 1),
            ] {
                let (ni, nj) = (i as isize + di, j as isize + dj);
                let d = if ni < 0 || nj < 0 || ni >= h as isize || nj >= w as isize {
                    0
                } else {
                    dist[[ni as usize, nj as usize]]
                };
                best = best.min(d + 1);
            }
            dist[[i, j]] = best;
        }
    }
    let (mut at, mut most) = ([0, 0], 0);
    for ((i, j), &d) in dist.indexed_iter() {
        if d > most {
            (at, most) = ([i, j], d);
        }
    }
    at
}

struct Overlap {
    dice: f64,
    inside: f64,
}

fn overlap(mask: &Array2<bool>, organ: &Array2<bool>) -> Overlap {
    let both = mask.iter().zip(organ).filter(|(m, o)| **m && **o).count() as f64;
    let (m, o) = (
        mask.iter().filter(|v| **v).count() as f64,
        organ.iter().filter(|v| **v).count() as f64,
    );
    Overlap {
        dice: 2.0 * both / (m + o).max(1.0),
        inside: both / m.max(1.0),
    }
}

#[test]
fn one_click_segments_liver_spleen_and_kidneys_on_the_held_out_ct() {
    let volume = Arc::new(fixture("totalseg_example_ct_sm.nii.gz"));
    let labels = fixture("totalseg_example_ct_sm_label.nii.gz");
    assert_eq!(volume.geometry.shape, labels.geometry.shape);
    let model = bundled_model();
    let depth = volume.geometry.shape[2];
    // TotalSegmentator ids, and the Dice floors after 1 and after 3 clicks: below what this model measures
    // (model card), above what a model that ignores the clicks or the image could reach.
    for (id, organ, floor_1, floor_3) in [
        (5, "liver", 0.82, 0.88),
        (1, "spleen", 0.88, 0.92),
        (2, "kidney_right", 0.55, 0.75),
        (3, "kidney_left", 0.52, 0.7),
    ] {
        let region = |k: usize| labels.slice_f32(k).mapv(|v| v == id as f32);
        let k = (0..depth)
            .max_by_key(|&k| region(k).iter().filter(|v| **v).count())
            .unwrap();
        let organ_mask = region(k);
        let [i, j] = centre(&organ_mask);
        let mut clicks = Clicks {
            foreground: vec![[i as f64, j as f64, k as f64]],
            background: vec![],
            slice: None,
        };
        let mut dice = Vec::new();
        for round in 1..=3 {
            let output = OutputOptions {
                format: Some(MaskFormat::Nifti),
                dtype: MaskDtype::U8,
            };
            let reply = annotate(
                &model,
                ImageSource::Session(volume.clone()),
                &clicks,
                output,
                LIMITS,
                &Inline,
            )
            .unwrap();
            let mask = decode(&reply.file.to_vec(), LIMITS)
                .unwrap()
                .slice_f32(k)
                .mapv(|v| v > 0.5);
            let o = overlap(&mask, &organ_mask);
            eprintln!(
                "{organ}: slice {k}, {round} click(s): Dice {:.3}, {:.1} % of the mask inside the organ",
                o.dice,
                100.0 * o.inside
            );
            dice.push(o.dice);
            if round == 1 && organ == "liver" {
                let spleen = labels.slice_f32(k).mapv(|v| v == 1.0);
                assert!(
                    overlap(&mask, &spleen).dice < 0.1,
                    "a liver click returned the spleen"
                );
            }
            // the annotator's next click: at the centre of the larger error, missed organ or leaked background
            let missed = ndarray::Zip::from(&organ_mask)
                .and(&mask)
                .map_collect(|o, m| *o && !*m);
            let leaked = ndarray::Zip::from(&organ_mask)
                .and(&mask)
                .map_collect(|o, m| !*o && *m);
            let count = |a: &Array2<bool>| a.iter().filter(|v| **v).count();
            let (target, foreground) = if count(&missed) >= count(&leaked) {
                (missed, true)
            } else {
                (leaked, false)
            };
            let [ci, cj] = centre(&target);
            let click = [ci as f64, cj as f64, k as f64];
            if foreground {
                clicks.foreground.push(click);
            } else {
                clicks.background.push(click);
            }
        }
        assert!(
            dice[0] >= floor_1,
            "{organ}: Dice {:.3} after 1 click < {floor_1}",
            dice[0]
        );
        assert!(
            dice[2] >= floor_3,
            "{organ}: Dice {:.3} after 3 clicks < {floor_3}",
            dice[2]
        );
    }
}
