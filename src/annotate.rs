//! One deepgrow click, top to bottom: decode -> choose slice -> preprocess -> infer -> postprocess -> encode.
//! Synchronous CPU work; the HTTP layer runs it on the blocking pool behind the worker permits.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::admission::Stages;
use crate::deepgrow::{self, Clicks};
use crate::error::ApiError;
use crate::image::{self, Upload};
use crate::models::Model;
use crate::nifti_io::{self, DecodeLimits, Geometry, MaskDtype, MaskFile, Volume};
use ndarray::Axis;

/// Where the click's image comes from.
pub enum ImageSource<'a> {
    /// An upload (a NIfTI file in memory or arriving as a stream, or a DICOM series): only the clicked slice
    /// is decoded.
    Upload(Upload<'a>),
    /// A session's decoded volume.
    Session(Arc<Volume>),
}

/// Container of the returned mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskFormat {
    NiftiGz,
    Nifti,
    Nrrd { compress: bool },
}

/// How the client wants the mask written; `format: None` mirrors the input (`.nii` in, `.nii` out).
#[derive(Debug, Clone, Copy)]
pub struct OutputOptions {
    pub format: Option<MaskFormat>,
    pub dtype: MaskDtype,
}

/// The mask file and the reply's `params` JSON.
pub struct Annotation {
    pub file: MaskFile,
    pub file_name: &'static str,
    pub params: AnnotationParams,
}

#[derive(Debug, Serialize)]
pub struct AnnotationParams {
    pub model: String,
    pub slice: usize,
    pub foreground: Vec<[i64; 3]>,
    pub background: Vec<[i64; 3]>,
    pub mask_pixels: usize,
    pub latencies: Latencies,
}

/// Milliseconds per stage (MONAI Label reports the same kind of breakdown).
#[derive(Debug, Default, Serialize)]
pub struct Latencies {
    /// Waiting for an inference worker (other clicks were running the network).
    pub wait: f64,
    pub decode: f64,
    pub pre: f64,
    pub infer: f64,
    pub post: f64,
    pub write: f64,
    pub total: f64,
}

fn millis_since(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e4).round() / 10.0
}

/// The clicks in the volume's stored order: a client addresses the rows of a volume stored with reversed
/// rows (a DICOM series, see `Geometry::rows_reversed`) in its images' own order.
fn stored_clicks<'c>(clicks: &'c Clicks, geometry: &Geometry) -> Cow<'c, Clicks> {
    if !geometry.rows_reversed {
        return Cow::Borrowed(clicks);
    }
    // the voxel a coordinate falls in (truncated, as `choose_slice` reads it), counted from the other end
    let last_row = geometry.shape[1] as f64 - 1.0;
    let flip = |points: &[[f64; 3]]| -> Vec<[f64; 3]> {
        points
            .iter()
            .map(|&[i, j, k]| [i, last_row - j.trunc(), k])
            .collect()
    };
    Cow::Owned(Clicks {
        foreground: flip(&clicks.foreground),
        background: flip(&clicks.background),
        slice: clicks.slice,
    })
}

/// One click. `stages` says where its CPU stages run: the decode of an upload on a decode worker, the network
/// on an inference worker.
pub fn annotate(
    model: &Model,
    source: ImageSource<'_>,
    clicks: &Clicks,
    output: OutputOptions,
    limits: DecodeLimits,
    stages: &impl Stages,
) -> Result<Annotation, ApiError> {
    let start = Instant::now();
    let mut latencies = Latencies::default();

    // The image's geometry, the clicks' slice k, and slice k alone: an upload is read (or inflated) no
    // further than the end of that slice.
    let session;
    let (geometry, was_compressed, guidance, slice) = match source {
        ImageSource::Upload(bytes) => {
            let (geometry, was_compressed, guidance, slice) = stages.decode(|| {
                let file = image::open(bytes, limits)?;
                let clicks = stored_clicks(clicks, file.geometry());
                let guidance = deepgrow::choose_slice(&clicks, file.geometry().shape)?;
                let geometry = file.geometry().clone();
                let was_compressed = file.was_compressed();
                let slice = file.read_slice(guidance.slice)?;
                Ok::<_, ApiError>((geometry, was_compressed, guidance, slice))
            })??;
            (Cow::Owned(geometry), was_compressed, guidance, slice)
        }
        ImageSource::Session(volume) => {
            session = volume;
            let clicks = stored_clicks(clicks, &session.geometry);
            let guidance = deepgrow::choose_slice(&clicks, session.geometry.shape)?;
            let slice = session.slice_f32(guidance.slice);
            (
                Cow::Borrowed(&session.geometry),
                session.was_compressed,
                guidance,
                slice,
            )
        }
    };
    latencies.decode = millis_since(start);

    let stage = Instant::now();
    let spacing = deepgrow::in_plane_spacing(&geometry.affine)?;
    let prepared = deepgrow::preprocess(slice.view(), spacing, &guidance, &model.pipeline)?;
    latencies.pre = millis_since(stage);

    let stage = Instant::now();
    let (logits, started) = stages.infer(|| {
        let started = Instant::now();
        (model.engine.infer(prepared.input), started)
    })?;
    let logits = logits?;
    latencies.wait = millis_since(stage) - millis_since(started);
    latencies.infer = millis_since(stage) - latencies.wait;

    let stage = Instant::now();
    let mut mask = deepgrow::postprocess(logits.view(), &prepared.restore);
    let reversed = geometry.rows_reversed;
    // back into the order the client addresses the image in
    let presented = geometry.as_presented();
    if geometry.rows_reversed {
        mask.invert_axis(Axis(1));
    }
    let geometry = presented;
    latencies.post = millis_since(stage);

    let stage = Instant::now();
    let format = output.format.unwrap_or(if was_compressed {
        MaskFormat::NiftiGz
    } else {
        MaskFormat::Nifti
    });
    let (file, file_name) = match format {
        MaskFormat::NiftiGz => (
            nifti_io::encode_mask_nifti(&geometry, guidance.slice, mask.view(), output.dtype, true),
            "mask.nii.gz",
        ),
        MaskFormat::Nifti => (
            nifti_io::encode_mask_nifti(
                &geometry,
                guidance.slice,
                mask.view(),
                output.dtype,
                false,
            ),
            "mask.nii",
        ),
        MaskFormat::Nrrd { compress } => (
            nifti_io::encode_mask_nrrd(
                &geometry,
                guidance.slice,
                mask.view(),
                output.dtype,
                compress,
            ),
            "mask.nrrd",
        ),
    };
    latencies.write = millis_since(stage);
    latencies.total = millis_since(start);

    let last_row = geometry.shape[1] as i64 - 1;
    let with_k = |points: &[[i64; 2]]| {
        points
            .iter()
            .map(|p| {
                let j = if reversed { last_row - p[1] } else { p[1] };
                [p[0], j, guidance.slice as i64]
            })
            .collect()
    };
    Ok(Annotation {
        file,
        file_name,
        params: AnnotationParams {
            model: model.info.name.clone(),
            slice: guidance.slice,
            foreground: with_k(&guidance.foreground),
            background: with_k(&guidance.background),
            mask_pixels: mask.iter().filter(|&&v| v != 0).count(),
            latencies,
        },
    })
}

#[cfg(test)]
mod properties {
    //! Property tests of the whole click (issue 6): any valid click set on any valid geometry gives a mask of
    //! the input's shape and affine, in {0, 1}, zero outside the chosen slice; invalid clicks are refused
    //! with a client error, never a panic or a 500.

    use super::*;
    use crate::admission::Inline;
    use crate::deepgrow::PipelineConfig;
    use crate::engine::{Engine, EngineError};
    use crate::models::ModelInfo;
    use crate::nifti_io::tests::synthetic_nifti_with_sform;
    use ndarray::{s, Array2, Array4};
    use proptest::prelude::*;

    /// Logits = positive guidance - 0.5: a blob around the foreground clicks.
    struct GuidanceEngine([usize; 2]);

    impl Engine for GuidanceEngine {
        fn input_size(&self) -> [usize; 2] {
            self.0
        }

        fn infer(&self, input: Array4<f32>) -> Result<Array2<f32>, EngineError> {
            assert_eq!(input.dim(), (1, 3, self.0[0], self.0[1]));
            Ok(input.slice(s![0, 1, .., ..]).mapv(|v| v - 0.5))
        }
    }

    fn model(model_side: usize, crop_side: usize) -> Model {
        Model {
            info: ModelInfo {
                name: "deepgrow_2d".into(),
                labels: vec![],
                description: String::new(),
                version: "1".into(),
                model_type: "deepgrow".into(),
                deepgrow: Some("2D".into()),
            },
            pipeline: PipelineConfig {
                model_size: [model_side; 2],
                crop_size: [crop_side; 2],
                ..PipelineConfig::clara_deepgrow_2d()
            },
            engine: Arc::new(GuidanceEngine([model_side; 2])),
        }
    }

    /// A volume of `shape` whose in-plane axes map to world axes `axes` (a permutation) with signed spacings.
    #[derive(Debug, Clone)]
    struct Case {
        shape: [u16; 3],
        swap_axes: bool,
        spacing: [f32; 3],
        signs: [bool; 3],
        voxels: Vec<i16>,
        foreground: Vec<[f64; 3]>,
        background: Vec<[f64; 3]>,
        slice: Option<i64>,
        model_side: usize,
        crop_side: usize,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            (1u16..40, 1u16..40, 1u16..5),
            any::<bool>(),
            (0.3f32..3.0, 0.3f32..3.0, 0.5f32..5.0),
            any::<[bool; 3]>(),
            (16usize..64, 8usize..96),
        )
            .prop_flat_map(
                |(shape, swap_axes, spacing, signs, (model_side, crop_side))| {
                    let [ni, nj, nk] = [shape.0, shape.1, shape.2].map(f64::from);
                    // Clicks anywhere in the volume, some of them just outside it.
                    let point = (-0.5..ni + 0.5, -0.5..nj + 0.5, -0.5..nk + 0.5)
                        .prop_map(|(i, j, k)| [i, j, k]);
                    let n = usize::from(shape.0) * usize::from(shape.1) * usize::from(shape.2);
                    (
                        Just((shape, swap_axes, spacing, signs, model_side, crop_side)),
                        proptest::collection::vec(-1100i16..1900, n),
                        proptest::collection::vec(point.clone(), 0..4),
                        proptest::collection::vec(point, 0..3),
                        proptest::option::of(-1i64..i64::from(shape.2) + 1),
                    )
                },
            )
            .prop_map(
                |(
                    (shape, swap_axes, spacing, signs, model_side, crop_side),
                    voxels,
                    foreground,
                    background,
                    slice,
                )| {
                    Case {
                        shape: [shape.0, shape.1, shape.2],
                        swap_axes,
                        spacing: [spacing.0, spacing.1, spacing.2],
                        signs,
                        voxels,
                        foreground,
                        background,
                        slice,
                        model_side,
                        crop_side,
                    }
                },
            )
    }

    fn file(case: &Case) -> Vec<u8> {
        let mut srows = [[0.0f32; 4]; 3];
        let rows = if case.swap_axes { [1, 0, 2] } else { [0, 1, 2] };
        for axis in 0..3 {
            let sign = if case.signs[axis] { -1.0 } else { 1.0 };
            srows[rows[axis]][axis] = sign * case.spacing[axis];
            srows[axis][3] = 10.0 * axis as f32 - 7.5;
        }
        let data: Vec<u8> = case.voxels.iter().flat_map(|v| v.to_le_bytes()).collect();
        synthetic_nifti_with_sform(case.shape, 4, 16, &data, false, srows)
    }

    /// Inside the volume once truncated toward zero, as clients' float clicks are.
    fn in_bounds(point: &[f64; 3], shape: [u16; 3]) -> bool {
        point
            .iter()
            .zip(shape)
            .all(|(&p, n)| p.trunc() >= 0.0 && p.trunc() < f64::from(n))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn every_click_set_gives_a_mask_on_the_input_grid_or_a_client_error(case in case()) {
            let model = model(case.model_side, case.crop_side);
            let clicks = Clicks {
                foreground: case.foreground.clone(),
                background: case.background.clone(),
                slice: case.slice,
            };
            let input = file(&case);
            let limits = DecodeLimits { max_decompressed_bytes: 1 << 30 };
            let options = OutputOptions { format: Some(MaskFormat::Nifti), dtype: MaskDtype::U8 };
            let result = annotate(&model, ImageSource::Upload(Upload::Nifti(crate::nifti_io::FileBytes::Memory(&input))), &clicks, options, limits, &Inline);
            // The contract of `choose_slice`: some click, every click inside the volume, and an explicit
            // slice inside the volume with a click on it.
            let all: Vec<_> = case.foreground.iter().chain(&case.background).collect();
            let valid = !all.is_empty()
                && all.iter().all(|p| in_bounds(p, case.shape))
                && case.slice.is_none_or(|k| all.iter().any(|p| p[2] as i64 == k));
            match result {
                Ok(annotation) => {
                    let k = annotation.params.slice;
                    prop_assert!(k < usize::from(case.shape[2]));
                    let mask = nifti_io::decode(&annotation.file.to_vec(), limits).expect("our own mask decodes");
                    let source = nifti_io::decode(&input, limits).unwrap();
                    prop_assert_eq!(mask.geometry.shape, source.geometry.shape);
                    prop_assert_eq!(mask.geometry.affine, source.geometry.affine);
                    let [ni, nj, _] = mask.geometry.shape;
                    let nifti_io::VoxelData::U8(values) = &mask.data else {
                        panic!("u8 mask expected, got {}", mask.data.datatype_name());
                    };
                    let mut on_slice = 0;
                    for (index, &v) in values.iter().enumerate() {
                        prop_assert!(v <= 1, "mask value {v}");
                        if index / (ni * nj) != k {
                            prop_assert_eq!(v, 0, "voxel {} off slice {}", index, k);
                        } else {
                            on_slice += usize::from(v);
                        }
                    }
                    prop_assert_eq!(on_slice, annotation.params.mask_pixels);
                }
                Err(error) => {
                    prop_assert!(!valid, "valid clicks refused: {error}");
                    prop_assert!(error.status().is_client_error(), "{error} is a {}", error.status());
                }
            }
        }
    }
}
