//! Golden comparison of the Deepgrow 2D pipeline against MONAI.
//!
//! Every folder under `tests/fixtures/golden` was produced by `tools/reference_harness.py` from
//! MONAI's own transforms (see the README there). For each case this test runs the Rust stages
//! and compares them at every stage boundary with the tolerances of spec section 6: integers and
//! crop boxes exact, resampled slice and network channel 0 within 1 float32 ulp (with a tiny
//! absolute floor near zero, where cancellation makes ulps meaningless), guidance channels within
//! 1e-6, restored mask exact given the same logits. (Against the committed files, generated with
//! torch on an FMA-capable x86-64 CPU, every stage is in fact bit-exact; the report lists it.) The slice is fed the way the server
//! does it: a non-contiguous `(H, W)` view of a column-major (NIfTI order) volume, and also
//! row-major; both must give identical results.

use deepgrow_server::deepgrow::{
    self, choose_slice,
    clicks::scale_points,
    crop::guidance_crop,
    in_plane_spacing,
    resample::{resample_slice, ResamplePlan},
    Clicks, PipelineConfig,
};
use flate2::read::GzDecoder;
use ndarray::{s, Array2, Array3, ArrayView2, Axis, ShapeBuilder};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct Case {
    name: String,
    volume: Volume,
    affine_bits: [[u64; 4]; 4],
    clicks: CaseClicks,
    config: PipelineConfig,
    expected: Expected,
    files: BTreeMap<String, Vec<usize>>,
}

#[derive(Deserialize)]
struct Volume {
    shape: [usize; 3],
}

#[derive(Deserialize)]
struct CaseClicks {
    foreground: Vec<[f64; 3]>,
    background: Vec<[f64; 3]>,
    slice: Option<i64>,
}

#[derive(Deserialize)]
struct Points {
    positive: Vec<[i64; 2]>,
    negative: Vec<[i64; 2]>,
}

#[derive(Deserialize)]
struct Expected {
    slice: usize,
    spacing: [f64; 2],
    resampled_shape: [usize; 2],
    guidance_resampled: Points,
    crop_start: [usize; 2],
    crop_end: [usize; 2],
    cropped_shape: [usize; 2],
    guidance_cropped: Points,
    guidance_model: Points,
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

fn read_gz(path: &Path) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    GzDecoder::new(file)
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    out
}

fn read_f32(dir: &Path, case: &Case, name: &str) -> (Vec<usize>, Vec<f32>) {
    let shape = case.files[name].clone();
    let bytes = read_gz(&dir.join(name));
    let data: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>(), "{name}");
    (shape, data)
}

fn read_2d(dir: &Path, case: &Case, name: &str) -> Array2<f32> {
    let (shape, data) = read_f32(dir, case, name);
    Array2::from_shape_vec((shape[0], shape[1]), data).unwrap()
}

/// Distance in float32 units in the last place (0 for +0 vs -0).
fn ulps(a: f32, b: f32) -> u64 {
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        i64::from(if i < 0 { i32::MIN - i } else { i })
    };
    key(a).abs_diff(key(b))
}

/// Absolute differences below which a pixel counts as equal whatever its ulp distance: values
/// near zero come from cancellation (e.g. -2 and 2 interpolated half-way), where a last-bit
/// difference in an intermediate shows as a huge ulp distance of the result.
const RESAMPLED_ABS_FLOOR: f32 = 1e-6; // HU
const NORMALISED_ABS_FLOOR: f32 = 1e-7; // about 1 ulp of the subtrahend, over the divisor

#[derive(Default, Debug)]
struct UlpStats {
    /// Largest ulp distance among pixels above the absolute floor.
    max_ulps: u64,
    max_abs: f32,
    differing: usize,
    total: usize,
}

fn ulp_stats(got: ArrayView2<f32>, want: ArrayView2<f32>, abs_floor: f32) -> UlpStats {
    assert_eq!(got.dim(), want.dim());
    let mut st = UlpStats::default();
    for (&g, &w) in got.iter().zip(want.iter()) {
        let u = ulps(g, w);
        st.total += 1;
        if u > 0 {
            st.differing += 1;
            st.max_abs = st.max_abs.max((g - w).abs());
            if (g - w).abs() > abs_floor {
                st.max_ulps = st.max_ulps.max(u);
            }
        }
    }
    st
}

fn max_abs(got: ArrayView2<f32>, want: ArrayView2<f32>) -> f32 {
    assert_eq!(got.dim(), want.dim());
    got.iter()
        .zip(want.iter())
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f32::max)
}

/// The slice as the server passes it: plane k of an `(H, W, D)` column-major volume, i.e. a
/// view with strides `(1, H)`. The other planes hold garbage that must not be read.
fn nifti_order_volume(slice: &Array2<f32>, k: usize, depth: usize) -> Array3<f32> {
    let (h, w) = slice.dim();
    let mut vol = Array3::from_elem((h, w, depth).f(), f32::NAN);
    vol.index_axis_mut(Axis(2), k).assign(slice);
    vol
}

fn run_case(dir: &Path) -> String {
    let case: Case =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let name = &case.name;
    let e = &case.expected;
    let cfg = &case.config;
    cfg.validate().unwrap();

    // Section 3: spacing from nibabel's affine (bit patterns, no decimal parsing).
    let affine = case.affine_bits.map(|row| row.map(f64::from_bits));
    let spacing = in_plane_spacing(&affine).unwrap();
    for d in 0..2 {
        assert!(
            (spacing[d] - e.spacing[d]).abs() <= 1e-15 * e.spacing[d],
            "{name}: spacing {spacing:?} vs {:?}",
            e.spacing
        );
    }

    // S1.
    let clicks = Clicks {
        foreground: case.clicks.foreground.clone(),
        background: case.clicks.background.clone(),
        slice: case.clicks.slice,
    };
    let guidance = choose_slice(&clicks, case.volume.shape).unwrap();
    assert_eq!(guidance.slice, e.slice, "{name}: slice");

    // S2 geometry and S1 step 5.
    let [h, w, depth] = case.volume.shape;
    let plan = ResamplePlan::new([h, w], spacing, cfg.target_spacing).unwrap();
    assert_eq!(
        plan.output_shape, e.resampled_shape,
        "{name}: resampled shape"
    );
    let pos = scale_points(&guidance.foreground, [h, w], plan.output_shape);
    let neg = scale_points(&guidance.background, [h, w], plan.output_shape);
    assert_eq!(pos, e.guidance_resampled.positive, "{name}: pos after S1");
    assert_eq!(neg, e.guidance_resampled.negative, "{name}: neg after S1");

    // S2/S3 pixels.
    let slice = read_2d(dir, &case, "slice_input.f32.gz");
    assert_eq!(slice.dim(), (h, w));
    let volume = nifti_order_volume(&slice, guidance.slice, depth);
    let view = volume.index_axis(Axis(2), guidance.slice);
    assert_eq!(view.strides(), &[1, h as isize], "the server's layout");
    let resampled = resample_slice(view, spacing, cfg.target_spacing).unwrap();
    let want_resampled = read_2d(dir, &case, "resampled.f32.gz");
    let rs = ulp_stats(resampled.view(), want_resampled.view(), RESAMPLED_ABS_FLOOR);
    assert!(rs.max_ulps <= 1, "{name}: resampled {rs:?}");
    assert_eq!(
        resample_slice(slice.view(), spacing, cfg.target_spacing).unwrap(),
        resampled,
        "{name}: layouts differ"
    );

    // S4 box and guidance shift, S6.
    let all: Vec<[i64; 2]> = pos.iter().chain(&neg).copied().collect();
    let crop = guidance_crop(&all, plan.output_shape, cfg.crop_size, cfg.margin).unwrap();
    assert_eq!(crop.start, e.crop_start, "{name}: crop start");
    assert_eq!(crop.end, e.crop_end, "{name}: crop end");
    assert_eq!(crop.shape, e.cropped_shape, "{name}: cropped shape");
    assert_eq!(crop.shift_points(&pos), e.guidance_cropped.positive);
    assert_eq!(crop.shift_points(&neg), e.guidance_cropped.negative);

    // S2-S8 end to end, both layouts.
    let pre = deepgrow::preprocess(view, spacing, &guidance, cfg).unwrap();
    let pre_rowmajor = deepgrow::preprocess(slice.view(), spacing, &guidance, cfg).unwrap();
    assert_eq!(pre, pre_rowmajor, "{name}: layouts differ");
    let r = &pre.restore;
    assert_eq!(r.original_shape, [h, w]);
    assert_eq!(r.resampled_shape, e.resampled_shape);
    assert_eq!(r.crop_start, e.crop_start);
    assert_eq!(r.crop_end, e.crop_end);
    assert_eq!(r.cropped_shape, e.cropped_shape);
    assert_eq!(r.model_size, cfg.model_size);
    assert_eq!(r.slice, e.slice);
    assert_eq!(
        pre.model_points.positive, e.guidance_model.positive,
        "{name}"
    );
    assert_eq!(
        pre.model_points.negative, e.guidance_model.negative,
        "{name}"
    );

    let (shape, data) = read_f32(dir, &case, "network_input.f32.gz");
    assert_eq!(shape, vec![1, 3, cfg.model_size[0], cfg.model_size[1]]);
    let want_input = ndarray::Array4::from_shape_vec((1, 3, shape[2], shape[3]), data).unwrap();
    assert_eq!(pre.input.dim(), want_input.dim());
    let ch0 = ulp_stats(
        pre.input.slice(s![0, 0, .., ..]),
        want_input.slice(s![0, 0, .., ..]),
        NORMALISED_ABS_FLOOR,
    );
    assert!(ch0.max_ulps <= 1, "{name}: network channel 0 {ch0:?}");
    let pos_map = max_abs(
        pre.input.slice(s![0, 1, .., ..]),
        want_input.slice(s![0, 1, .., ..]),
    );
    let neg_map = max_abs(
        pre.input.slice(s![0, 2, .., ..]),
        want_input.slice(s![0, 2, .., ..]),
    );
    assert!(
        pos_map <= 1e-6 && neg_map <= 1e-6,
        "{name}: guidance {pos_map} {neg_map}"
    );

    // S9-S10.
    let logits = read_2d(dir, &case, "logits.f32.gz");
    let mask = deepgrow::postprocess(logits.view(), &pre.restore);
    let (mshape, mbytes) = {
        let shape = case.files["mask.u8.gz"].clone();
        (shape, read_gz(&dir.join("mask.u8.gz")))
    };
    let want_mask = Array2::from_shape_vec((mshape[0], mshape[1]), mbytes).unwrap();
    let wrong = mask
        .iter()
        .zip(want_mask.iter())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(wrong, 0, "{name}: {wrong} mask pixels differ");
    let logits_t = logits.t().to_owned();
    assert_eq!(
        deepgrow::postprocess(logits_t.t(), &pre.restore),
        mask,
        "{name}: logits layout"
    );

    format!(
        "{name:<38} resampled {:>6}/{:<6} px 1-ulp (max {:.2e}) | ch0 {:>5}/{:<6} px 1-ulp (max {:.2e}) | \
         guidance max |d| {:.1e} / {:.1e} | mask {} px, exact",
        rs.differing,
        rs.total,
        rs.max_abs,
        ch0.differing,
        ch0.total,
        ch0.max_abs,
        pos_map,
        neg_map,
        mask.iter().filter(|&&v| v == 1).count()
    )
}

#[test]
fn golden_cases_match_monai() {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("tests/fixtures/golden")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 10, "golden cases missing: {dirs:?}");
    for dir in &dirs {
        eprintln!("{}", run_case(dir));
    }
}

#[test]
fn spec_worked_example_b_is_reproduced() {
    // Spec section 5 B, via the golden case generated from the same inputs.
    let dir = golden_dir().join("spec_example_b_anisotropic");
    let case: Case =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    assert_eq!(case.expected.resampled_shape, [219, 227]);
    assert_eq!(case.expected.guidance_resampled.positive, vec![[211, 218]]);
    assert_eq!(case.expected.guidance_resampled.negative, vec![[182, 202]]);
    assert_eq!(case.expected.crop_start, [62, 76]);
    assert_eq!(case.expected.crop_end, [318, 332]);
    assert_eq!(case.expected.cropped_shape, [157, 151]);
    assert_eq!(case.expected.guidance_model.positive, vec![[242, 240]]);
    assert_eq!(case.expected.guidance_model.negative, vec![[195, 213]]);
}
