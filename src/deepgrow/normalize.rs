//! S7: intensity normalisation (`NormalizeIntensityd(subtrahend, divisor)`, no clipping, no mask).

use ndarray::ArrayViewMut2;

/// `f32(f32(x - subtrahend) / divisor)`: a true division, as torch does (a reciprocal
/// multiplication would differ in the last bit).
#[inline(always)]
pub fn normalize_value(x: f32, subtrahend: f32, divisor: f32) -> f32 {
    (x - subtrahend) / divisor
}

/// S7 in place.
pub fn normalize(mut image: ArrayViewMut2<f32>, subtrahend: f32, divisor: f32) {
    image.mapv_inplace(|x| normalize_value(x, subtrahend, divisor));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hu_window_maps_to_unit_range() {
        assert_eq!(normalize_value(-180.0, 208.0, 388.0), -1.0);
        assert_eq!(normalize_value(596.0, 208.0, 388.0), 1.0);
        assert_eq!(normalize_value(208.0, 208.0, 388.0), 0.0);
        let mut a = ndarray::arr2(&[[-180.0f32, 596.0]]);
        normalize(a.view_mut(), 208.0, 388.0);
        assert_eq!(a, ndarray::arr2(&[[-1.0, 1.0]]));
    }

    #[test]
    fn division_not_reciprocal() {
        // Some x where (x - 208) / 388 != (x - 208) * (1 / 388) in float32.
        let r = 1.0f32 / 388.0;
        let x = (0..100_000)
            .map(|i| -1024.0 + i as f32 * 0.0371)
            .find(|&x| (x - 208.0) / 388.0 != (x - 208.0) * r)
            .expect("a value where division and reciprocal differ");
        assert_eq!(normalize_value(x, 208.0, 388.0), (x - 208.0) / 388.0);
    }
}
