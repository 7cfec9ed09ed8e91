//! S4: the guidance crop (`SpatialCropGuidanced(spatial_size, margin)`).

/// The crop window in the resampled slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row/column of the crop.
    pub start: [usize; 2],
    /// `start + crop_size` or the box end, as MONAI records it: **not** clamped to the image.
    pub end: [usize; 2],
    /// The pixels actually taken: `min(end, N) - start` per axis (always >= 1).
    pub shape: [usize; 2],
}

impl CropBox {
    /// Points relative to the crop start (S4 "shift the guidance").
    pub fn shift_points(&self, points: &[[i64; 2]]) -> Vec<[i64; 2]> {
        points
            .iter()
            .map(|p| [p[0] - self.start[0] as i64, p[1] - self.start[1] as i64])
            .collect()
    }
}

/// S4. `points` are all guidance points (positive then negative) in the resampled slice of shape
/// `image_shape`. Returns `None` when there are no points (MONAI would fail).
///
/// Per axis: the box is `[max(min p - margin, 0), min(N, max p + margin + 1))`. If the box is
/// smaller than `crop_size` on **both** axes, a `crop_size` window is centred on it
/// (start `max(centre - size / 2, 0)`, end `start + size`, unclamped); otherwise the box itself is
/// the crop, which may be anisotropic.
pub fn guidance_crop(
    points: &[[i64; 2]],
    image_shape: [usize; 2],
    crop_size: [usize; 2],
    margin: usize,
) -> Option<CropBox> {
    let first = points.first()?;
    let margin = margin as i64;
    let mut box_start = [0i64; 2];
    let mut box_end = [0i64; 2];
    for d in 0..2 {
        let (lo, hi) = points.iter().fold((first[d], first[d]), |(lo, hi), p| {
            (lo.min(p[d]), hi.max(p[d]))
        });
        box_start[d] = (lo - margin).max(0);
        box_end[d] = (image_shape[d] as i64).min(hi + margin + 1);
    }
    let box_size = [box_end[0] - box_start[0], box_end[1] - box_start[1]];
    let centred = (0..2).all(|d| box_size[d] < crop_size[d] as i64);

    let mut start = [0usize; 2];
    let mut end = [0usize; 2];
    let mut shape = [0usize; 2];
    for d in 0..2 {
        let (st, en) = if centred {
            // np.mean([start, end]).astype(int): truncation of a non-negative mean.
            let centre = (box_start[d] + box_end[d]) / 2;
            let st = (centre - crop_size[d] as i64 / 2).max(0);
            (st, st + crop_size[d] as i64)
        } else {
            let st = box_start[d].max(0);
            (st, box_end[d].max(st))
        };
        // Clamp for the pixels actually taken; keep at least one so a malformed input
        // (points outside the image) cannot give an empty crop.
        let n = image_shape[d] as i64;
        let st_c = st.min(n - 1).max(0);
        start[d] = st_c as usize;
        end[d] = en.max(st_c) as usize;
        shape[d] = (en.min(n) - st_c).max(1) as usize;
    }
    Some(CropBox { start, end, shape })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example_a_centred_full_window() {
        // 359 x 359, pos (175,182) (189,210), neg (70,70).
        let c = guidance_crop(
            &[[175, 182], [189, 210], [70, 70]],
            [359, 359],
            [256, 256],
            20,
        )
        .unwrap();
        assert_eq!(
            c,
            CropBox {
                start: [2, 12],
                end: [258, 268],
                shape: [256, 256]
            }
        );
        assert_eq!(
            c.shift_points(&[[175, 182], [189, 210], [70, 70]]),
            vec![[173, 170], [187, 198], [68, 58]]
        );
    }

    #[test]
    fn spec_example_b_near_high_edge_end_unclamped() {
        let c = guidance_crop(&[[211, 218], [182, 202]], [219, 227], [256, 256], 20).unwrap();
        assert_eq!(
            c,
            CropBox {
                start: [62, 76],
                end: [318, 332],
                shape: [157, 151]
            }
        );
    }

    #[test]
    fn near_low_edge_window_starts_at_zero() {
        let c = guidance_crop(&[[3, 0]], [400, 400], [256, 256], 20).unwrap();
        assert_eq!(c.start, [0, 0]);
        assert_eq!(c.end, [256, 256]);
        assert_eq!(c.shape, [256, 256]);
    }

    #[test]
    fn image_smaller_than_crop_is_taken_whole() {
        let c = guidance_crop(&[[50, 60]], [120, 90], [256, 256], 20).unwrap();
        assert_eq!(c.start, [0, 0]);
        assert_eq!(c.end, [256, 256]);
        assert_eq!(c.shape, [120, 90]);
    }

    #[test]
    fn box_at_least_crop_in_one_axis_gives_anisotropic_crop() {
        // Rows span 10..=300 (+margin 20 -> [0, 321)), columns 100..=120 -> [80, 141).
        let c = guidance_crop(&[[10, 100], [300, 120]], [400, 400], [256, 256], 20).unwrap();
        assert_eq!(
            c,
            CropBox {
                start: [0, 80],
                end: [321, 141],
                shape: [321, 61]
            }
        );
        // Exactly crop_size (not strictly smaller) also takes the box.
        let c = guidance_crop(&[[20, 20], [235, 30]], [400, 400], [256, 256], 20).unwrap();
        assert_eq!(c.start, [0, 0]);
        assert_eq!(c.shape, [256, 51]);
    }

    #[test]
    fn odd_crop_size_and_zero_margin() {
        let c = guidance_crop(&[[100, 100]], [400, 400], [255, 3], 0).unwrap();
        // Box [100, 101): centre 100; start 100 - 127 = -27 -> 0 (rows), 100 - 1 = 99 (cols).
        assert_eq!(c.start, [0, 99]);
        assert_eq!(c.end, [255, 102]);
        assert_eq!(c.shape, [255, 3]);
    }

    #[test]
    fn no_points_and_malformed_points_do_not_panic() {
        assert_eq!(guidance_crop(&[], [10, 10], [4, 4], 1), None);
        let c = guidance_crop(&[[-50, 500]], [10, 10], [4, 4], 1).unwrap();
        assert!(c.shape[0] >= 1 && c.shape[1] >= 1);
        assert!(c.start[0] < 10 && c.start[1] < 10);
    }
}
