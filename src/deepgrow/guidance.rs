//! S8: guidance channels (`AddGuidanceSignald`): one-pixel deltas, a separable Gaussian
//! (MONAI `GaussianFilter`, "erf" kernel, zero padding, H axis then W axis), min-max to [0, 1].
//!
//! Only the neighbourhood of the points is computed. The sums run over the kernel taps in
//! ascending order, skipping terms whose input is zero, which gives exactly the same float32
//! result as the dense ascending sum (adding `+0.0` changes nothing).

use ndarray::{s, Array3, ArrayViewMut2};

/// MONAI `gaussian_1d(2.0, truncated=4, approx="erf")` in float32 (spec S8 table), t = -8..=8.
const KERNEL_SIGMA_2_BITS: [u32; 9] = [
    0x3e4a268b, 0x3e32dbba, 0x3df7c318, 0x3d865460, 0x3ce40590, 0x3c177720, 0x3b1d7700, 0x3a001600,
    0x38a30000,
];

/// The 1D kernel MONAI uses for `sigma` (float32, not normalised, `2 * tail + 1` taps with
/// `tail = int(max(4 * sigma, 0.5) + 0.5)`). Sigma 2 returns the spec's exact table; other values
/// follow the same float32 formula `max(0, 0.5 * (erf(c * (x + 0.5)) - erf(c * (x - 0.5))))` with
/// `c = f32(0.70710678) / sigma`, with erf evaluated in float64 (within one float32 ulp of torch).
pub fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    if sigma == 2.0 {
        let half: Vec<f32> = KERNEL_SIGMA_2_BITS
            .iter()
            .map(|&b| f32::from_bits(b))
            .collect();
        return (-8i32..=8)
            .map(|t| half[t.unsigned_abs() as usize])
            .collect();
    }
    let sigma = sigma.abs();
    let tail = ((f64::from(sigma) * 4.0).max(0.5) + 0.5) as i64;
    // MONAI's literal (which rounds to the same float32 as 1/sqrt(2)).
    #[allow(clippy::approx_constant)]
    let c = 0.707_106_78_f32 / sigma;
    (-tail..=tail)
        .map(|x| {
            let x = x as f32;
            let hi = erf(f64::from(c * (x + 0.5))) as f32;
            let lo = erf(f64::from(c * (x - 0.5))) as f32;
            (0.5f32 * (hi - lo)).max(0.0)
        })
        .collect()
}

/// The error function in float64, accurate to ~1e-13 (Taylor series below 3, continued
/// fraction for erfc above), enough for float32 kernels.
pub(crate) fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < 3.0 {
        // erf(a) = 2/sqrt(pi) * sum_n (-1)^n a^(2n+1) / (n! (2n+1))
        let a2 = a * a;
        let mut term = a; // (-1)^n a^(2n+1) / n!
        let mut sum = a;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc(a) = exp(-a^2) / sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + 2/(a + ...)))))
        let mut t = a;
        for k in (1..=80).rev() {
            t = a + (k as f64 / 2.0) / t;
        }
        1.0 - (-a * a).exp() * (0.5 * std::f64::consts::FRAC_2_SQRT_PI) / t
    };
    r.copysign(x)
}

/// S8 for one channel: writes the guidance map of `points` (model coordinates `[row, col]`)
/// into `out`. Points with a negative coordinate are skipped, the others clamped into the image
/// (as MONAI does). No points: all zeros. A constant map (only possible for tiny images, where
/// MONAI divides 0 by 0) is written as zeros.
pub fn guidance_map(points: &[[i64; 2]], kernel: &[f32], mut out: ArrayViewMut2<f32>) {
    out.fill(0.0);
    let (h, w) = out.dim();
    if h == 0 || w == 0 || kernel.is_empty() {
        return;
    }
    let tail = kernel.len() / 2;

    // Deltas as (col, row), sorted so that each column's rows ascend; duplicates overwrite.
    let mut deltas: Vec<(usize, usize)> = points
        .iter()
        .filter(|p| p[0] >= 0 && p[1] >= 0)
        .map(|p| {
            (
                (p[1] as u64).min(w as u64 - 1) as usize,
                (p[0] as u64).min(h as u64 - 1) as usize,
            )
        })
        .collect();
    if deltas.is_empty() {
        return;
    }
    deltas.sort_unstable();
    deltas.dedup();

    // Pass 1, along H: tmp[y][c] = sum_t k[t] * delta[y + t][c], only for delta columns c.
    let mut columns: Vec<(usize, Vec<f32>)> = Vec::new();
    for &(c, r) in &deltas {
        if columns.last().is_none_or(|(lc, _)| *lc != c) {
            columns.push((c, vec![0.0; h]));
        }
        let Some((_, col)) = columns.last_mut() else {
            continue;
        };
        // Rows ascend within a column, so each tmp[y] accumulates its taps t = r - y in order.
        for (y, v) in col
            .iter_mut()
            .enumerate()
            .take((r + tail + 1).min(h))
            .skip(r.saturating_sub(tail))
        {
            *v += kernel[r + tail - y];
        }
    }

    // Pass 2, along W: out[y][x] = sum_t k[t] * tmp[y][x + t]; columns ascend, so taps t = c - x
    // ascend for every x.
    let row_lo = deltas
        .iter()
        .map(|d| d.1)
        .min()
        .unwrap_or(0)
        .saturating_sub(tail);
    let row_hi = (deltas.iter().map(|d| d.1).max().unwrap_or(0) + tail + 1).min(h);
    let col_lo = columns.first().map_or(0, |c| c.0).saturating_sub(tail);
    let col_hi = (columns.last().map_or(0, |c| c.0) + tail + 1).min(w);
    for y in row_lo..row_hi {
        let mut row = out.row_mut(y);
        for (c, col) in &columns {
            let v = col[y];
            if v == 0.0 {
                continue;
            }
            let x_lo = c.saturating_sub(tail);
            let x_hi = (c + tail + 1).min(w);
            for x in x_lo..x_hi {
                row[x] += kernel[c + tail - x] * v;
            }
        }
    }

    // Min-max over the whole image; pixels outside the touched box are 0 (and stay 0).
    let touched = s![row_lo..row_hi, col_lo..col_hi];
    let covers_all = row_lo == 0 && col_lo == 0 && row_hi == h && col_hi == w;
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in out.slice(touched) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !covers_all {
        lo = lo.min(0.0);
    }
    let range = hi - lo;
    if range.is_nan() || range <= 0.0 {
        out.fill(0.0);
        return;
    }
    if lo == 0.0 {
        out.slice_mut(touched).mapv_inplace(|v| v / range);
    } else {
        out.mapv_inplace(|v| (v - lo) / range);
    }
}

/// S8 for both channels: `(2, H, W)` = [positive map, negative map].
pub fn guidance_maps(
    positive: &[[i64; 2]],
    negative: &[[i64; 2]],
    shape: [usize; 2],
    sigma: f32,
) -> Array3<f32> {
    let kernel = gaussian_kernel(sigma);
    let mut out = Array3::zeros((2, shape[0], shape[1]));
    guidance_map(positive, &kernel, out.slice_mut(s![0, .., ..]));
    guidance_map(negative, &kernel, out.slice_mut(s![1, .., ..]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// Dense reference: zero-padded separable correlation, taps in ascending order, then min-max.
    fn dense(points: &[[i64; 2]], kernel: &[f32], h: usize, w: usize) -> Array2<f32> {
        let tail = kernel.len() as i64 / 2;
        let mut d = Array2::<f32>::zeros((h, w));
        for p in points.iter().filter(|p| p[0] >= 0 && p[1] >= 0) {
            d[[(p[0] as usize).min(h - 1), (p[1] as usize).min(w - 1)]] = 1.0;
        }
        if d.iter().all(|&v| v == 0.0) {
            return d;
        }
        let get = |a: &Array2<f32>, y: i64, x: i64| {
            if y < 0 || x < 0 || y >= h as i64 || x >= w as i64 {
                0.0
            } else {
                a[[y as usize, x as usize]]
            }
        };
        let t1 = Array2::from_shape_fn((h, w), |(y, x)| {
            let mut s = 0.0f32;
            for t in -tail..=tail {
                s += kernel[(t + tail) as usize] * get(&d, y as i64 + t, x as i64);
            }
            s
        });
        let t2 = Array2::from_shape_fn((h, w), |(y, x)| {
            let mut s = 0.0f32;
            for t in -tail..=tail {
                s += kernel[(t + tail) as usize] * get(&t1, y as i64, x as i64 + t);
            }
            s
        });
        let lo = t2.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = t2.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        t2.mapv(|v| (v - lo) / (hi - lo))
    }

    #[test]
    fn kernel_table_matches_formula() {
        let table = gaussian_kernel(2.0);
        assert_eq!(table.len(), 17);
        assert_eq!(table[8].to_bits(), 0x3e4a268b);
        assert_eq!(table[0].to_bits(), 0x38a30000);
        assert_eq!(table[16], table[0]);
        // The formula path (used for other sigmas) agrees with torch's table within 1e-8.
        #[allow(clippy::approx_constant)]
        let c = 0.707_106_78_f32 / 2.0;
        for (i, &k) in table.iter().enumerate() {
            let x = i as f32 - 8.0;
            let v = 0.5f32
                * (erf(f64::from(c * (x + 0.5))) as f32 - erf(f64::from(c * (x - 0.5))) as f32);
            assert!((v - k).abs() <= 1e-8, "tap {i}: {v} vs {k}");
        }
        let sum: f32 = table.iter().sum();
        assert!((sum - 0.99998).abs() < 1e-5);
    }

    #[test]
    fn kernel_other_sigmas() {
        assert_eq!(gaussian_kernel(1.0).len(), 9);
        assert_eq!(gaussian_kernel(0.1).len(), 3); // tail = int(max(0.4, 0.5) + 0.5) = 1
        assert_eq!(gaussian_kernel(3.0).len(), 25);
        let k = gaussian_kernel(1.0);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert!(k.iter().all(|&v| v >= 0.0));
    }

    #[test]
    fn erf_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (2.9, 0.999_958_902_121_900_1),
            (3.0, 0.999_977_909_503_001_4),
            (4.0, 0.999_999_984_582_742_1),
            (-1.0, -0.842_700_792_949_714_9),
        ] {
            assert!((erf(x) - want).abs() < 1e-13, "erf({x}) = {}", erf(x));
        }
    }

    #[test]
    fn single_point_patch_is_exact() {
        let k = gaussian_kernel(2.0);
        let m = guidance_maps(&[[100, 50]], &[], [256, 256], 2.0);
        let centre = k[8] * k[8];
        assert_eq!(m[[0, 100, 50]], 1.0);
        for a in 0..17 {
            for b in 0..17 {
                let want = (k[a] * k[b]) / centre;
                assert_eq!(m[[0, 100 + a - 8, 50 + b - 8]], want);
            }
        }
        assert_eq!(m[[0, 100, 59]], 0.0);
        assert!(m.slice(s![1, .., ..]).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn sparse_equals_dense() {
        let k = gaussian_kernel(2.0);
        let cases: Vec<Vec<[i64; 2]>> = vec![
            vec![[10, 10], [12, 15], [12, 15], [30, 5], [0, 0], [63, 47]],
            vec![[5, 40], [9, 41], [-1, 3], [200, 200]],
            vec![[0, 0]],
            // Points everywhere: min > 0.
            (0..64)
                .step_by(4)
                .flat_map(|r| (0..48).step_by(4).map(move |c| [r, c]))
                .collect(),
        ];
        for pts in cases {
            let mut out = Array2::zeros((64, 48));
            guidance_map(&pts, &k, out.view_mut());
            assert_eq!(out, dense(&pts, &k, 64, 48), "{pts:?}");
        }
        let k1 = gaussian_kernel(0.7);
        let pts = [[3, 3], [4, 6]];
        let mut out = Array2::zeros((20, 9));
        guidance_map(&pts, &k1, out.view_mut());
        assert_eq!(out, dense(&pts, &k1, 20, 9));
    }

    #[test]
    fn degenerate_maps_are_zero() {
        let k = gaussian_kernel(2.0);
        let mut out = Array2::from_elem((1, 1), 7.0f32);
        guidance_map(&[[0, 0]], &k, out.view_mut());
        assert_eq!(out[[0, 0]], 0.0);
        let mut out = Array2::from_elem((4, 4), 7.0f32);
        guidance_map(&[[-1, 2], [2, -5]], &k, out.view_mut());
        assert!(out.iter().all(|&v| v == 0.0));
        guidance_map(&[[1, 1]], &[], out.view_mut());
        assert!(out.iter().all(|&v| v == 0.0));
    }
}
