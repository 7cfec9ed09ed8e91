//! One deepgrow click, top to bottom: decode -> choose slice -> preprocess -> infer -> postprocess -> encode.
//! Synchronous CPU work; the HTTP layer runs it on the blocking pool behind the worker permits.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

use crate::deepgrow::{self, Clicks};
use crate::error::ApiError;
use crate::models::Model;
use crate::nifti_io::{self, DecodeLimits, MaskDtype, Volume};

/// Where the click's image comes from.
pub enum ImageSource {
    Upload(Bytes),
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
    pub file: Vec<u8>,
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

pub fn annotate(
    model: &Model,
    source: ImageSource,
    clicks: &Clicks,
    output: OutputOptions,
    limits: DecodeLimits,
) -> Result<Annotation, ApiError> {
    let start = Instant::now();
    let mut latencies = Latencies::default();

    let volume = match source {
        ImageSource::Upload(bytes) => Arc::new(nifti_io::decode(&bytes, limits)?),
        ImageSource::Session(volume) => volume,
    };
    latencies.decode = millis_since(start);

    let stage = Instant::now();
    let guidance = deepgrow::choose_slice(clicks, volume.geometry.shape)?;
    let spacing = deepgrow::in_plane_spacing(&volume.geometry.affine)?;
    let slice = volume.slice_f32(guidance.slice);
    let prepared = deepgrow::preprocess(slice.view(), spacing, &guidance, &model.pipeline)?;
    latencies.pre = millis_since(stage);

    let stage = Instant::now();
    let logits = model.engine.infer(prepared.input)?;
    latencies.infer = millis_since(stage);

    let stage = Instant::now();
    let mask = deepgrow::postprocess(logits.view(), &prepared.restore);
    latencies.post = millis_since(stage);

    let stage = Instant::now();
    let format = output.format.unwrap_or(if volume.was_compressed {
        MaskFormat::NiftiGz
    } else {
        MaskFormat::Nifti
    });
    let (file, file_name) = match format {
        MaskFormat::NiftiGz => (
            nifti_io::encode_mask_nifti(
                &volume.geometry,
                guidance.slice,
                mask.view(),
                output.dtype,
                true,
            ),
            "mask.nii.gz",
        ),
        MaskFormat::Nifti => (
            nifti_io::encode_mask_nifti(
                &volume.geometry,
                guidance.slice,
                mask.view(),
                output.dtype,
                false,
            ),
            "mask.nii",
        ),
        MaskFormat::Nrrd { compress } => (
            nifti_io::encode_mask_nrrd(
                &volume.geometry,
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

    let with_k = |points: &[[i64; 2]]| {
        points
            .iter()
            .map(|p| [p[0], p[1], guidance.slice as i64])
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
