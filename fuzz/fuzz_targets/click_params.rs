//! Arbitrary text -> `DeepgrowParams::parse`; on success, `choose_slice` against a few volume shapes, then the
//! pure pipeline (`preprocess` -> fake network -> `postprocess`) and the whole click (`annotate::annotate` on a
//! decoded synthetic volume, which also writes the mask file the params ask for).
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use std::sync::{Arc, OnceLock};

use deepgrow_server::admission::Inline;
use deepgrow_server::annotate::{annotate, ImageSource};
use deepgrow_server::api::DeepgrowParams;
use deepgrow_server::deepgrow::{self, PipelineConfig};
use deepgrow_server::engine::Engine;
use deepgrow_server::models::Model;
use deepgrow_server::nifti_io::{self, DecodeLimits, Volume, VoxelData};
use libfuzzer_sys::fuzz_target;
use ndarray::Array2;

use common::{GuidanceEngine, NiftiSpec};

const LIMITS: DecodeLimits = DecodeLimits {
    max_decompressed_bytes: 64 << 20,
};

/// `[H, W, D]` shapes the clicks are checked against (the pure pipeline runs on each).
const SHAPES: [[usize; 3]; 5] = [
    [512, 512, 20],
    [64, 64, 8],
    [1, 1, 1],
    [300, 17, 3],
    [7, 900, 2],
];
/// In-plane spacings `[s_i, s_j]` the pure pipeline runs with, one per shape.
const SPACINGS: [[f64; 2]; 5] = [[0.7, 0.7], [1.0, 1.0], [1.0, 1.0], [2.5, 0.5], [0.3, 3.0]];

/// `DEEPGROW_FUZZ_TRACE=1` prints whether each fixture volume's click went through (to see how deep a corpus gets).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("DEEPGROW_FUZZ_TRACE").is_some())
}

struct Fixture {
    model: Arc<Model>,
    volumes: Vec<Arc<Volume>>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let model = common::fake_model("deepgrow_2d");
        let mut volumes = Vec::new();
        // [128, 96, 6] int16, axis-aligned, little-endian, gzip-compressed.
        let mut spec = NiftiSpec::simple([128, 96, 6]);
        spec.datatype = 4;
        spec.bitpix = 16;
        let data: Vec<u8> = (0..128 * 96 * 6u32)
            .flat_map(|n| (((n * 37) % 2000) as i16 - 1000).to_le_bytes())
            .collect();
        volumes.push(common::gzip(&spec.write(&data)));
        // [33, 17, 3] float32, big-endian, rotated in-plane by 90 degrees (qform), anisotropic spacing.
        let mut spec = NiftiSpec::simple([33, 17, 3]);
        spec.big_endian = true;
        spec.datatype = 16;
        spec.bitpix = 32;
        spec.sform_code = 0;
        spec.qform_code = 1;
        spec.quatern = [0.0, 0.0, std::f32::consts::FRAC_1_SQRT_2, 1.0, 2.0, 3.0];
        spec.pixdim = [1.0, 0.4, 2.2, 5.0, 1.0, 1.0, 1.0, 1.0];
        let data: Vec<u8> = (0..33 * 17 * 3u32)
            .flat_map(|n| (n as f32 * 0.5).to_be_bytes())
            .collect();
        volumes.push(spec.write(&data));
        // [1, 1, 1] uint8 with scaling.
        let mut spec = NiftiSpec::simple([1, 1, 1]);
        spec.scl_slope = 2.0;
        spec.scl_inter = -7.0;
        volumes.push(spec.write(&[9]));
        let volumes = volumes
            .iter()
            .map(|file| Arc::new(nifti_io::decode(file, LIMITS).expect("fixture volume decodes")))
            .collect();
        Fixture { model, volumes }
    })
}

fn check_pipeline(
    params: &DeepgrowParams,
    shape: [usize; 3],
    spacing: [f64; 2],
    config: &PipelineConfig,
) {
    let Ok(guidance) = deepgrow::choose_slice(&params.clicks, shape) else {
        return;
    };
    let [h, w, d] = shape;
    assert!(guidance.slice < d);
    assert!(!guidance.foreground.is_empty() || !guidance.background.is_empty());
    for p in guidance.foreground.iter().chain(&guidance.background) {
        assert!(
            p[0] >= 0 && p[1] >= 0 && (p[0] as usize) < h && (p[1] as usize) < w,
            "{p:?} outside {shape:?}"
        );
    }
    let slice = Array2::from_shape_fn((h, w), |(i, j)| {
        ((i * 7 + j * 3) % 50) as f32 * 10.0 - 100.0
    });
    // choose_slice accepted the clicks, the spacing and the configuration are valid: preprocess must succeed.
    let prepared =
        deepgrow::preprocess(slice.view(), spacing, &guidance, config).unwrap_or_else(|e| {
            panic!("preprocess refused accepted clicks {guidance:?} on {shape:?}: {e}")
        });
    assert_eq!(
        prepared.input.dim(),
        (1, 3, config.model_size[0], config.model_size[1])
    );
    assert!(prepared
        .input
        .iter()
        .skip(config.model_size[0] * config.model_size[1])
        .all(|v| v.is_finite()));
    let engine = GuidanceEngine {
        size: config.model_size,
    };
    let logits = engine
        .infer(prepared.input)
        .expect("the fake engine never fails");
    let restore = prepared.restore.clone();
    let mask = deepgrow::postprocess(logits.view(), &restore);
    assert_eq!(mask.dim(), (h, w), "mask shape differs from the slice");
    assert!(mask.iter().all(|&v| v <= 1));
    // With one foreground click, the fake network's blob is centred on it: the clicked pixel must be in the mask.
    if guidance.foreground.len() == 1 {
        let [i, j] = guidance.foreground[0];
        assert_eq!(
            mask[[i as usize, j as usize]],
            1,
            "the single foreground click {:?} is not in the mask ({} pixels) on {shape:?}, spacing {spacing:?}, restore {:?}",
            guidance.foreground[0],
            mask.iter().filter(|&&v| v != 0).count(),
            restore
        );
    }
}

fn fitted_geometry(
    params: &DeepgrowParams,
    selector: usize,
) -> Option<([usize; 3], [f64; 2], PipelineConfig)> {
    const SPACING: [[f64; 2]; 9] = [
        [1.0, 1.0],
        [0.6, 0.6],
        [2.0, 0.5],
        [0.3, 0.3],
        [1.0005, 0.9995],
        [3.7, 1.3],
        [0.123, 7.0],
        [1.5, 1.5],
        [0.6666666, 1.3333333],
    ];
    // [model side, crop side]: equal, down-sampling (crop > model), up-sampling (crop < model), non-square.
    const SIZES: [([usize; 2], [usize; 2]); 5] = [
        ([64, 64], [64, 64]),
        ([64, 64], [128, 128]),
        ([64, 64], [16, 16]),
        ([48, 80], [30, 100]),
        ([7, 3], [5, 11]),
    ];
    let mut max = [0.0f64; 3];
    for p in params
        .clicks
        .foreground
        .iter()
        .chain(&params.clicks.background)
    {
        for axis in 0..3 {
            max[axis] = max[axis].max(p[axis].trunc());
        }
    }
    if max.iter().any(|&m| m > 2048.0) {
        return None;
    }
    let extra = selector % 5;
    let shape = [
        max[0] as usize + 1 + extra,
        max[1] as usize + 1 + extra / 2,
        max[2] as usize + 1,
    ];
    let (model_size, crop_size) = SIZES[selector / 9 % SIZES.len()];
    let config = PipelineConfig {
        model_size,
        crop_size,
        margin: selector / 45 % 3 * 10,
        ..PipelineConfig::clara_deepgrow_2d()
    };
    Some((shape, SPACING[selector % SPACING.len()], config))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(params) = DeepgrowParams::parse(Some(text)) else {
        if trace() {
            eprintln!("TRACE params refused");
        }
        return;
    };
    for p in params
        .clicks
        .foreground
        .iter()
        .chain(&params.clicks.background)
    {
        assert!(
            p.iter().all(|c| c.is_finite()),
            "parse let a non-finite coordinate through: {p:?}"
        );
    }
    let small = common::small_pipeline();
    for (shape, spacing) in SHAPES.iter().zip(SPACINGS) {
        check_pipeline(&params, *shape, spacing, &small);
    }
    // The Clara 256 x 256 configuration on the one mid-size shape.
    check_pipeline(
        &params,
        SHAPES[1],
        [0.8, 0.8],
        &PipelineConfig::clara_deepgrow_2d(),
    );
    // A geometry the input controls: the smallest volume holding every click (plus a margin picked by the text's
    // length), with a spacing and a crop / network size picked the same way.
    if let Some((shape, spacing, config)) = fitted_geometry(&params, text.len()) {
        check_pipeline(&params, shape, spacing, &config);
    }

    let fixture = fixture();
    for volume in &fixture.volumes {
        let shape = volume.geometry.shape;
        let accepted = deepgrow::choose_slice(&params.clicks, shape);
        let result = annotate(
            &fixture.model,
            ImageSource::Session(volume.clone()),
            &params.clicks,
            params.output,
            LIMITS,
            &Inline,
        );
        if trace() {
            eprintln!(
                "TRACE {shape:?} annotate {}",
                if result.is_ok() { "ok" } else { "refused" }
            );
        }
        let annotation = match (accepted, result) {
            (Ok(_), Ok(annotation)) => annotation,
            (Err(_), Err(_)) => continue,
            (Ok(g), Err(e)) => panic!("annotate failed on accepted clicks {g:?} on {shape:?}: {e}"),
            (Err(e), Ok(_)) => panic!("annotate succeeded although choose_slice refused: {e}"),
        };
        assert!(annotation.params.slice < shape[2]);
        let file = annotation.file.to_vec();
        if annotation.file_name.ends_with(".nrrd") {
            assert!(file.starts_with(b"NRRD0004\n"));
            continue;
        }
        let mask = nifti_io::decode(&file, LIMITS).expect("the mask file decodes");
        assert_eq!(mask.geometry.shape, shape);
        assert_eq!(mask.geometry.affine, volume.geometry.affine);
        assert_eq!(annotation.file_name.ends_with(".gz"), mask.was_compressed);
        let set = match &mask.data {
            VoxelData::U8(v) => v.iter().filter(|&&x| x != 0).count(),
            VoxelData::U16(v) => v.iter().filter(|&&x| x != 0).count(),
            other => panic!("mask decoded as {}", other.datatype_name()),
        };
        assert_eq!(set, annotation.params.mask_pixels);
    }
});
