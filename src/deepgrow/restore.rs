//! S9-S10: threshold and restore (`Activationsd(sigmoid)`, `AsDiscreted(threshold=0.5)`,
//! `RestoreLabeld(mode=nearest)`).
//!
//! The three inverse steps (nearest resize model -> crop, paste into the resampled slice,
//! nearest resize resampled -> original) are separable index maps, so the restored mask is
//! computed directly on the original grid, without building the intermediate images.

use super::resize::nearest_indices;
use ndarray::{Array2, ArrayView2};

/// Geometry recorded by the pre-processing, needed to put the network output back.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreInfo {
    /// `(H, W)` of the original slice (`[i, j]`).
    pub original_shape: [usize; 2],
    /// `(H', W')` after S2.
    pub resampled_shape: [usize; 2],
    /// S4 crop start in the resampled slice.
    pub crop_start: [usize; 2],
    /// S4 crop end, unclamped (may exceed `resampled_shape`).
    pub crop_end: [usize; 2],
    /// `(c_h, c_w)`: pixels actually cropped.
    pub cropped_shape: [usize; 2],
    /// Network input `H x W`.
    pub model_size: [usize; 2],
    /// The slice index k the mask belongs to.
    pub slice: usize,
}

/// The smallest float32 logit that torch (CPU, float32) maps to `sigmoid(x) >= 0.5`:
/// `-(3 * 2^-24 - 2^-45)` = -1.788139e-7 (bits `0xb43ffffe`, measured with torch 2.x and derived
/// from `1 + f32(exp(-x)) <= 2`). So S9 is `x >= -1.788139e-7`, not `x >= 0`; on GPU the reference
/// may differ for |x| < 2e-7, which spec S9 calls negligible.
pub const FOREGROUND_MIN_LOGIT: f32 = f32::from_bits(0xb43f_fffe);

/// S9: `sigmoid(logit) >= 0.5` as float32 torch on CPU computes it (NaN is background).
#[inline(always)]
pub fn logit_is_foreground(logit: f32) -> bool {
    logit >= FOREGROUND_MIN_LOGIT
}

/// For every index of the original axis, the index into the model-grid output, if the pixel
/// falls inside the crop (else the mask is 0 there).
fn axis_map(
    original: usize,
    resampled: usize,
    crop_start: usize,
    cropped: usize,
    model: usize,
) -> Vec<Option<usize>> {
    let to_resampled = nearest_indices(resampled, original);
    let to_model = nearest_indices(model, cropped);
    to_resampled
        .into_iter()
        .map(|r| {
            r.checked_sub(crop_start)
                .and_then(|c| to_model.get(c).copied())
        })
        .collect()
}

/// S10 with a per-pixel map: restores `model` (the network-grid image; its own shape is used, as
/// MONAI uses the prediction's shape) onto the original `(H, W)` grid, `f(value)` inside the crop
/// and 0 elsewhere.
pub fn restore_map<T: Copy>(
    model: ArrayView2<T>,
    info: &RestoreInfo,
    f: impl Fn(T) -> u8,
) -> Array2<u8> {
    let [h, w] = info.original_shape;
    let (mh, mw) = model.dim();
    let mut out = Array2::zeros((h, w));
    if mh == 0 || mw == 0 {
        return out;
    }
    let rows = axis_map(
        h,
        info.resampled_shape[0],
        info.crop_start[0],
        info.cropped_shape[0],
        mh,
    );
    let cols = axis_map(
        w,
        info.resampled_shape[1],
        info.crop_start[1],
        info.cropped_shape[1],
        mw,
    );
    for (mut out_row, r) in out.rows_mut().into_iter().zip(&rows) {
        let Some(r) = *r else { continue };
        let src = model.row(r);
        for (o, c) in out_row.iter_mut().zip(&cols) {
            if let Some(c) = *c {
                *o = f(src[c]);
            }
        }
    }
    out
}

/// S10 on a thresholded model-grid mask (values 0/1).
pub fn restore_slice(mask: ArrayView2<u8>, info: &RestoreInfo) -> Array2<u8> {
    restore_map(mask, info, |v| v)
}

/// S9: threshold a model-grid logit image to 0/1.
pub fn threshold(logits: ArrayView2<f32>) -> Array2<u8> {
    logits.mapv(|l| u8::from(logit_is_foreground(l)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deepgrow::resize::nearest_resize;
    use ndarray::s;

    #[test]
    fn threshold_is_torch_sigmoid_half() {
        // 1 + exp(3 * 2^-24 - 2^-45) still rounds to 2 in float32; one ulp further does not.
        assert_eq!(
            FOREGROUND_MIN_LOGIT,
            -(3.0 * 2f32.powi(-24) - 2f32.powi(-45))
        );
        let below = f32::from_bits(FOREGROUND_MIN_LOGIT.to_bits() + 1); // more negative
        assert!(logit_is_foreground(FOREGROUND_MIN_LOGIT));
        assert!(!logit_is_foreground(below));
        for (x, want) in [
            (0.0, true),
            (-0.0, true),
            (-1e-7, true),
            (-1e-6, false),
            (3.0, true),
            (-3.0, false),
            (f32::INFINITY, true),
            (f32::NEG_INFINITY, false),
            (f32::NAN, false),
        ] {
            assert_eq!(logit_is_foreground(x), want, "{x}");
        }
    }

    /// The literal MONAI sequence: nearest model -> crop, paste, nearest resampled -> original.
    fn literal(mask: &Array2<u8>, info: &RestoreInfo) -> Array2<u8> {
        let crop = if mask.dim() == (info.cropped_shape[0], info.cropped_shape[1]) {
            mask.clone()
        } else {
            nearest_resize(mask.view(), info.cropped_shape)
        };
        let mut full = Array2::<u8>::zeros((info.resampled_shape[0], info.resampled_shape[1]));
        let [st0, st1] = info.crop_start;
        full.slice_mut(s![
            st0..st0 + info.cropped_shape[0],
            st1..st1 + info.cropped_shape[1]
        ])
        .assign(&crop);
        nearest_resize(full.view(), info.original_shape)
    }

    #[test]
    fn composed_maps_equal_literal_restore() {
        let infos = [
            // Spec example B.
            RestoreInfo {
                original_shape: [300, 280],
                resampled_shape: [219, 227],
                crop_start: [62, 76],
                crop_end: [318, 332],
                cropped_shape: [157, 151],
                model_size: [256, 256],
                slice: 4,
            },
            // Spec example A (identity resize).
            RestoreInfo {
                original_shape: [512, 512],
                resampled_shape: [359, 359],
                crop_start: [2, 12],
                crop_end: [258, 268],
                cropped_shape: [256, 256],
                model_size: [256, 256],
                slice: 5,
            },
            // Anisotropic crop bigger than the model, up-sampled slice.
            RestoreInfo {
                original_shape: [200, 120],
                resampled_shape: [260, 156],
                crop_start: [0, 40],
                crop_end: [260, 100],
                cropped_shape: [260, 60],
                model_size: [64, 64],
                slice: 0,
            },
        ];
        for info in infos {
            let [mh, mw] = info.model_size;
            let logits =
                Array2::from_shape_fn((mh, mw), |(r, c)| ((r * 7 + c * 13) % 17) as f32 - 8.5);
            let mask = threshold(logits.view());
            let want = literal(&mask, &info);
            assert_eq!(restore_slice(mask.view(), &info), want);
            assert_eq!(crate::deepgrow::postprocess(logits.view(), &info), want);
            assert_eq!(
                crate::deepgrow::postprocess(logits.t(), &info).dim(),
                want.dim()
            );
        }
    }

    #[test]
    fn empty_logits_give_empty_mask() {
        let info = RestoreInfo {
            original_shape: [10, 12],
            resampled_shape: [10, 12],
            crop_start: [0, 0],
            crop_end: [256, 256],
            cropped_shape: [10, 12],
            model_size: [256, 256],
            slice: 0,
        };
        let m = crate::deepgrow::postprocess(Array2::<f32>::zeros((0, 5)).view(), &info);
        assert_eq!(m, Array2::<u8>::zeros((10, 12)));
        // Inconsistent geometry does not panic.
        let bad = RestoreInfo {
            crop_start: [50, 50],
            ..info
        };
        let m = crate::deepgrow::postprocess(Array2::<f32>::ones((8, 8)).view(), &bad);
        assert_eq!(m.sum(), 0);
    }
}
