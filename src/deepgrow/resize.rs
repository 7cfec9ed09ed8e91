//! S5 and S10 resizes, as PyTorch's `interpolate` computes them on CPU.
//!
//! * `area` (adaptive average pooling): output row `r` averages input rows
//!   `[floor(r * in / out), ceil((r + 1) * in / out))`; the window is summed in float32 in
//!   row-major order, then divided by its height, then by its width.
//! * legacy `nearest`: source index `min(floor(f32(i) * f32(in / out)), in - 1)`, the scale being a
//!   float32 division (not the exact rational), identity when the sizes are equal.

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

/// `[start, end)` input windows of adaptive average pooling from `input` to `output` cells.
pub fn area_windows(input: usize, output: usize) -> Vec<(usize, usize)> {
    (0..output)
        .map(|r| {
            let start = (r * input) / output;
            let end = ((r + 1) * input).div_ceil(output);
            (start, end)
        })
        .collect()
}

/// S5: area resize of `src` into `dst` (whose shape is the target), applying `map` to every
/// output value (used to fuse S7's normalisation). Equal shapes copy through `map`.
pub fn area_resize_map(
    src: ArrayView2<f32>,
    mut dst: ArrayViewMut2<f32>,
    map: impl Fn(f32) -> f32,
) {
    let (ih, iw) = src.dim();
    let (oh, ow) = dst.dim();
    if ih == 0 || iw == 0 {
        dst.fill(map(0.0));
        return;
    }
    if (ih, iw) == (oh, ow) {
        dst.zip_mut_with(&src, |d, &s| *d = map(s));
        return;
    }
    let rows = area_windows(ih, oh);
    let cols = area_windows(iw, ow);
    let src = src.as_standard_layout();
    let Some(data) = src.as_slice() else {
        return;
    };
    for (mut out_row, &(r0, r1)) in dst.rows_mut().into_iter().zip(&rows) {
        let kh = (r1 - r0) as f32;
        for (o, &(c0, c1)) in out_row.iter_mut().zip(&cols) {
            let mut sum = 0.0f32;
            for r in r0..r1 {
                for &v in &data[r * iw + c0..r * iw + c1] {
                    sum += v;
                }
            }
            *o = map(sum / kh / (c1 - c0) as f32);
        }
    }
}

/// S5 on its own: `Resized(spatial_size, mode="area")` of a 2D image.
pub fn area_resize(src: ArrayView2<f32>, shape: [usize; 2]) -> Array2<f32> {
    let mut out = Array2::zeros((shape[0], shape[1]));
    area_resize_map(src, out.view_mut(), |x| x);
    out
}

/// Source index of each of `output` cells for PyTorch legacy `nearest` from `input` cells.
pub fn nearest_indices(input: usize, output: usize) -> Vec<usize> {
    if input == output {
        return (0..output).collect();
    }
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| ((i as f32 * scale).floor() as usize).min(input.saturating_sub(1)))
        .collect()
}

/// `Resize(spatial_size, mode="nearest")` of a 2D image.
pub fn nearest_resize<T: Copy + Default>(src: ArrayView2<T>, shape: [usize; 2]) -> Array2<T> {
    let (ih, iw) = src.dim();
    if ih == 0 || iw == 0 {
        return Array2::from_elem((shape[0], shape[1]), T::default());
    }
    let rows = nearest_indices(ih, shape[0]);
    let cols = nearest_indices(iw, shape[1]);
    Array2::from_shape_fn((shape[0], shape[1]), |(r, c)| src[[rows[r], cols[c]]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_match_adaptive_pooling() {
        assert_eq!(area_windows(5, 3), vec![(0, 2), (1, 4), (3, 5)]);
        assert_eq!(area_windows(2, 4), vec![(0, 1), (0, 1), (1, 2), (1, 2)]);
        assert_eq!(area_windows(3, 3), vec![(0, 1), (1, 2), (2, 3)]);
    }

    #[test]
    fn area_down_and_up() {
        let src = Array2::from_shape_fn((4, 4), |(r, c)| (r * 4 + c) as f32);
        let out = area_resize(src.view(), [2, 2]);
        assert_eq!(out, ndarray::arr2(&[[2.5, 4.5], [10.5, 12.5]]));
        let up = area_resize(src.view(), [8, 8]);
        assert_eq!(up[[0, 0]], 0.0);
        assert_eq!(up[[7, 7]], 15.0);
        assert_eq!(up[[1, 1]], 0.0);
        let same = area_resize(src.view(), [4, 4]);
        assert_eq!(same, src);
        // Anisotropic, non-integer ratios: windows overlap.
        let out = area_resize(src.view(), [3, 1]);
        let want: Vec<f32> = [(0, 2), (1, 3), (2, 4)]
            .iter()
            .map(|&(r0, r1)| {
                let mut s = 0.0f32;
                for r in r0..r1 {
                    for c in 0..4 {
                        s += src[[r, c]];
                    }
                }
                s / (r1 - r0) as f32 / 4.0
            })
            .collect();
        assert_eq!(out.iter().copied().collect::<Vec<_>>(), want);
    }

    #[test]
    fn nearest_uses_float32_scale() {
        assert_eq!(nearest_indices(4, 8), vec![0, 0, 1, 1, 2, 2, 3, 3]);
        assert_eq!(nearest_indices(3, 3), vec![0, 1, 2]);
        // 256 -> 157: scale f32(256/157); the exact rational would differ at some indices,
        // but these are what torch computes.
        let idx = nearest_indices(256, 157);
        let scale = 256.0f32 / 157.0;
        for (i, &j) in idx.iter().enumerate() {
            assert_eq!(j, ((i as f32 * scale).floor() as usize).min(255));
        }
        // The last index is clamped to in - 1.
        assert!(nearest_indices(219, 300).iter().all(|&j| j < 219));
        assert_eq!(nearest_indices(0, 3), vec![0, 0, 0]);
    }

    #[test]
    fn nearest_resize_picks_sources() {
        let src = ndarray::arr2(&[[1u8, 2], [3, 4]]);
        let out = nearest_resize(src.view(), [3, 3]);
        assert_eq!(out, ndarray::arr2(&[[1, 1, 2], [1, 1, 2], [3, 3, 4]]));
    }
}
