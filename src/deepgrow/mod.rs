//! The Deepgrow 2D transforms: everything between a decoded volume and the network, and back.
//!
//! This module implements `specs/DEEPGROW_2D.md` (sections 3, 4, 10): the MONAI Label stage list
//! for `clara_pt_deepgrow_2d_annotation`, reproduced bit-for-bit where the spec says so. It is
//! pure and synchronous: no I/O, no async, no engine types, and no panics on any input.
//!
//! A request flows through it like this:
//!
//! 1. [`choose_slice`] (S1): validate the clicks against the volume, pick the slice, keep its clicks.
//! 2. [`in_plane_spacing`] (section 3): the in-plane voxel size from the affine.
//! 3. [`preprocess`] (S2-S8): resample, crop, resize, normalise, guidance maps -> `1 x 3 x H x W`.
//! 4. the network (not here).
//! 5. [`postprocess`] (S9-S10): threshold the logits and map them back onto the original slice.
//!
//! Each stage is also public in its own submodule, so that tests can compare every stage
//! boundary with the reference.

pub mod clicks;
pub mod config;
pub mod crop;
pub mod guidance;
pub mod normalize;
pub mod resample;
pub mod resize;
pub mod restore;

mod error;
mod plane;

pub use clicks::{choose_slice, ClickKind, Clicks, SliceGuidance};
pub use config::PipelineConfig;
pub use error::DeepgrowError;
pub use resample::in_plane_spacing;
pub use restore::RestoreInfo;

use ndarray::{s, Array2, Array4, ArrayView2};

/// The network input and what is needed to map the network output back.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessed {
    /// `(1, 3, model_size[0], model_size[1])`: normalised image, positive map, negative map.
    pub input: Array4<f32>,
    /// Geometry of every stage, for [`postprocess`].
    pub restore: RestoreInfo,
    /// The guidance points as they entered the guidance maps (model coordinates, S6).
    pub model_points: GuidancePoints,
}

/// Positive and negative guidance points `[row, col]` in one coordinate frame.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GuidancePoints {
    pub positive: Vec<[i64; 2]>,
    pub negative: Vec<[i64; 2]>,
}

/// S2-S8: turn the chosen slice and its clicks into the network input.
///
/// `slice` is the chosen plane indexed `[i, j]` (shape `(H, W)`), in any memory layout; a
/// transposed view of a NIfTI volume (strides `(1, H)`) is read without copying.
/// `spacing` is `[s_i, s_j]` in mm (see [`in_plane_spacing`]).
pub fn preprocess(
    slice: ArrayView2<f32>,
    spacing: [f64; 2],
    guidance: &SliceGuidance,
    config: &PipelineConfig,
) -> Result<Preprocessed, DeepgrowError> {
    config.validate().map_err(DeepgrowError::InvalidConfig)?;
    let (h, w) = slice.dim();
    let original = [h, w];
    if h == 0 || w == 0 {
        return Err(DeepgrowError::EmptyImage { shape: original });
    }
    for &p in guidance.foreground.iter().chain(&guidance.background) {
        if p[0] < 0 || p[1] < 0 || p[0] >= h as i64 || p[1] >= w as i64 {
            return Err(DeepgrowError::GuidanceOutOfRange {
                point: p,
                shape: original,
            });
        }
    }

    // S2: output geometry only; pixels are resampled below, for the crop window alone.
    let plan = resample::ResamplePlan::new(original, spacing, config.target_spacing)?;
    let resampled = plan.output_shape;

    // S1.5: clicks into the resampled frame.
    let pos = clicks::scale_points(&guidance.foreground, original, resampled);
    let neg = clicks::scale_points(&guidance.background, original, resampled);

    // S4: guidance crop.
    let all: Vec<[i64; 2]> = pos.iter().chain(&neg).copied().collect();
    let crop = crop::guidance_crop(&all, resampled, config.crop_size, config.margin).ok_or(
        DeepgrowError::NoClickOnSlice {
            slice: guidance.slice,
        },
    )?;

    // S2 + S3 + S4 pixels: resample just the crop window (identical to cropping the full slice).
    let cropped = plan.resample_region(
        slice,
        crop.start[0]..crop.start[0] + crop.shape[0],
        crop.start[1]..crop.start[1] + crop.shape[1],
    );

    // S5 + S7: area resize straight into channel 0, normalising each output pixel.
    let model = config.model_size;
    let mut input = Array4::<f32>::zeros((1, 3, model[0], model[1]));
    resize::area_resize_map(cropped.view(), input.slice_mut(s![0, 0, .., ..]), |x| {
        normalize::normalize_value(x, config.subtrahend, config.divisor)
    });

    // S4 shift + S6 rescale of the guidance.
    let to_model = |pts: &[[i64; 2]]| -> Vec<[i64; 2]> {
        let shifted = crop.shift_points(pts);
        clicks::scale_points(&shifted, crop.shape, model)
    };
    let model_points = GuidancePoints {
        positive: to_model(&pos),
        negative: to_model(&neg),
    };

    // S8: guidance channels.
    let kernel = guidance::gaussian_kernel(config.sigma);
    guidance::guidance_map(
        &model_points.positive,
        &kernel,
        input.slice_mut(s![0, 1, .., ..]),
    );
    guidance::guidance_map(
        &model_points.negative,
        &kernel,
        input.slice_mut(s![0, 2, .., ..]),
    );

    Ok(Preprocessed {
        input,
        restore: RestoreInfo {
            original_shape: original,
            resampled_shape: resampled,
            crop_start: crop.start,
            crop_end: crop.end,
            cropped_shape: crop.shape,
            model_size: model,
            slice: guidance.slice,
        },
        model_points,
    })
}

/// S9 + S10: threshold the logits (`sigmoid >= 0.5`) and restore them onto the original
/// slice grid `(H, W)`, indexed `[i, j]`, values 0/1.
///
/// `logits` is the network output for one image, normally `model_size`; like the reference,
/// its actual shape is what gets resized back to the crop. An empty `logits` gives an all-zero mask.
pub fn postprocess(logits: ArrayView2<f32>, restore: &RestoreInfo) -> Array2<u8> {
    restore::restore_map(logits, restore, |l| {
        u8::from(restore::logit_is_foreground(l))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array2};

    fn image(h: usize, w: usize) -> Array2<f32> {
        Array2::from_shape_fn((h, w), |(i, j)| {
            ((i * 7 + j * 3) % 50) as f32 * 10.0 - 100.0
        })
    }

    fn cfg(model: usize, crop: usize) -> PipelineConfig {
        PipelineConfig {
            model_size: [model, model],
            crop_size: [crop, crop],
            ..PipelineConfig::clara_deepgrow_2d()
        }
    }

    fn guidance(fg: &[[i64; 2]], bg: &[[i64; 2]]) -> SliceGuidance {
        SliceGuidance {
            slice: 0,
            foreground: fg.to_vec(),
            background: bg.to_vec(),
        }
    }

    #[test]
    fn spec_example_a_geometry() {
        let img = image(512, 512);
        let g = guidance(&[[250, 260], [270, 300]], &[[100, 100]]);
        let sp = f64::from(0.7f32);
        let p = preprocess(img.view(), [sp, sp], &g, &cfg(256, 256)).unwrap();
        assert_eq!(p.input.dim(), (1, 3, 256, 256));
        assert_eq!(p.restore.resampled_shape, [359, 359]);
        assert_eq!(p.restore.crop_start, [2, 12]);
        assert_eq!(p.restore.crop_end, [258, 268]);
        assert_eq!(p.restore.cropped_shape, [256, 256]);
        assert_eq!(p.model_points.positive, vec![[173, 170], [187, 198]]);
        assert_eq!(p.model_points.negative, vec![[68, 58]]);
        assert_eq!(p.input[[0, 1, 173, 170]], 1.0);
        assert_eq!(p.input[[0, 2, 68, 58]], 1.0);
    }

    #[test]
    fn only_background_clicks_give_empty_positive_channel() {
        let img = image(100, 80);
        let g = guidance(&[], &[[50, 40]]);
        let p = preprocess(img.view(), [1.0, 1.0], &g, &cfg(64, 64)).unwrap();
        assert!(p.input.slice(s![0, 1, .., ..]).iter().all(|&v| v == 0.0));
        assert_eq!(
            p.input
                .slice(s![0, 2, .., ..])
                .iter()
                .fold(0.0f32, |a, &b| a.max(b)),
            1.0
        );
        // All-negative logits restore to an empty mask: a valid reply.
        let mask = postprocess(Array2::from_elem((64, 64), -3.0f32).view(), &p.restore);
        assert_eq!(mask.dim(), (100, 80));
        assert_eq!(mask.sum(), 0);
    }

    #[test]
    fn image_smaller_than_crop_is_stretched_whole() {
        let img = image(40, 30);
        let g = guidance(&[[20, 15]], &[]);
        let p = preprocess(img.view(), [1.0, 1.0], &g, &cfg(256, 256)).unwrap();
        assert_eq!(p.restore.crop_start, [0, 0]);
        assert_eq!(p.restore.cropped_shape, [40, 30]);
        // Area up-sampling replicates pixels: the top-left model pixel is the normalised (0, 0).
        assert_eq!(p.input[[0, 0, 0, 0]], (img[[0, 0]] - 208.0) / 388.0);
        // Positive logits everywhere restore to the whole slice.
        let mask = postprocess(Array2::from_elem((256, 256), 1.0f32).view(), &p.restore);
        assert_eq!(mask, Array2::<u8>::ones((40, 30)));
    }

    #[test]
    fn anisotropic_crop_when_box_reaches_crop_in_one_axis() {
        let img = image(300, 200);
        let g = guidance(&[[5, 100], [290, 110]], &[]);
        let p = preprocess(img.view(), [1.0, 1.0], &g, &cfg(64, 128)).unwrap();
        assert_eq!(p.restore.crop_start, [0, 80]);
        assert_eq!(p.restore.crop_end, [300, 131]);
        assert_eq!(p.restore.cropped_shape, [300, 51]);
        assert_eq!(p.input.dim(), (1, 3, 64, 64));
    }

    #[test]
    fn strided_and_transposed_views_match_row_major() {
        let img = image(90, 70);
        let g = guidance(&[[45, 35]], &[[10, 60]]);
        let c = cfg(64, 64);
        let want = preprocess(img.view(), [0.8, 1.3], &g, &c).unwrap();
        let t = img.t().to_owned();
        assert_eq!(preprocess(t.t(), [0.8, 1.3], &g, &c).unwrap(), want);
        let big = Array2::from_shape_fn((180, 140), |(i, j)| img[[i / 2, j / 2]]);
        let strided = big.slice(s![..;2, ..;2]);
        assert_eq!(preprocess(strided, [0.8, 1.3], &g, &c).unwrap(), want);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let img = image(20, 20);
        let g = guidance(&[[5, 5]], &[]);
        let c = cfg(16, 16);
        assert!(matches!(
            preprocess(Array2::<f32>::zeros((0, 5)).view(), [1.0, 1.0], &g, &c),
            Err(DeepgrowError::EmptyImage { .. })
        ));
        let outside = guidance(&[[20, 5]], &[]);
        let err = preprocess(img.view(), [1.0, 1.0], &outside, &c).unwrap_err();
        assert!(matches!(err, DeepgrowError::GuidanceOutOfRange { .. }));
        assert!(!err.is_client_error());
        let none = guidance(&[], &[]);
        assert!(matches!(
            preprocess(img.view(), [1.0, 1.0], &none, &c),
            Err(DeepgrowError::NoClickOnSlice { slice: 0 })
        ));
        for sp in [[0.0, 1.0], [f64::NAN, 1.0], [1.0, -2.0]] {
            assert!(matches!(
                preprocess(img.view(), sp, &g, &c),
                Err(DeepgrowError::InvalidSpacing { .. })
            ));
        }
        assert!(matches!(
            preprocess(img.view(), [1e7, 1.0], &g, &c),
            Err(DeepgrowError::ImageTooLarge { .. })
        ));
        let bad_cfg = PipelineConfig {
            divisor: 0.0,
            ..c.clone()
        };
        let err = preprocess(img.view(), [1.0, 1.0], &g, &bad_cfg).unwrap_err();
        assert!(matches!(err, DeepgrowError::InvalidConfig(_)));
        assert!(!err.is_client_error());
    }

    #[test]
    fn tiny_and_non_finite_images_do_not_panic() {
        let g = guidance(&[[0, 0]], &[]);
        let p = preprocess(
            Array2::from_elem((1, 1), 5.0f32).view(),
            [1.0, 1.0],
            &g,
            &cfg(1, 1),
        )
        .unwrap();
        assert_eq!(p.input.dim(), (1, 3, 1, 1));
        // A 1 x 1 guidance map is constant: MONAI would divide 0 by 0; we write 0.
        assert_eq!(p.input[[0, 1, 0, 0]], 0.0);
        let mut img = image(30, 30);
        img[[3, 3]] = f32::NAN;
        img[[4, 4]] = f32::INFINITY;
        let g = guidance(&[[10, 10]], &[]);
        let p = preprocess(img.view(), [0.7, 0.7], &g, &cfg(32, 32)).unwrap();
        assert!(p
            .input
            .slice(s![0, 1.., .., ..])
            .iter()
            .all(|v| v.is_finite()));
        let mask = postprocess(Array2::from_elem((32, 32), f32::NAN).view(), &p.restore);
        assert_eq!(mask.sum(), 0);
    }

    #[test]
    fn errors_read_well() {
        let e = DeepgrowError::ClickOutOfRange {
            kind: ClickKind::Background,
            index: 2,
            point: [512.0, 3.0, 1.0],
            shape: [512, 512, 20],
        };
        assert_eq!(
            e.to_string(),
            "background click #2 [512.0, 3.0, 1.0] is outside the volume: voxel indices [i, j, k] \
             must lie in 0..512 x 0..512 x 0..20"
        );
        assert!(e.is_client_error());
    }
}
