//! S2-S3: in-plane resampling to the target spacing (`Spacingd(pixdim, mode=bilinear)`).
//!
//! MONAI resamples with `grid_sample` in float64, border padding, `align_corners=False`, corner
//! (index 0) aligned: output pixel `(a, b)` samples the input near `(a / r_i, b / r_j)` with
//! `r = s / t` (voxel spacing over effective target spacing). Reproduced here, bit for bit on
//! torch's x86-64 CPU kernels (AVX2/AVX-512, which fuse multiply-adds):
//!
//! * an axis whose spacing is within `AFFINE_TOL` (1e-3) of the target keeps its own spacing
//!   (`Spacing`'s `min_pixdim`/`max_pixdim` rule), so it is not interpolated;
//! * output size `round_half_even((n - 1) * r + 1)` (`compute_shape_offset`);
//! * the no-resample shortcut of `spatial_resample` (same size and source affine ~ destination
//!   affine, or transform ~ identity, within `atol 1e-3, rtol 1e-5`);
//! * the sampling coordinates along MONAI's path: source-to-destination transform from
//!   `zoom_affine` and `solve`, normalised (`to_norm_affine`), `affine_grid` (fused-multiply-add
//!   `linspace`, times `(n - 1) / n`), then `grid_sample`'s fused un-normalisation;
//! * `grid_sample`'s bilinear weights, summed as one product and three fused multiply-adds, with
//!   zero for neighbours past the edge; float64 -> float32 at the end.
//!
//! Only orthogonal in-plane axes are handled ([`in_plane_spacing`]); for rotated (non axis-aligned)
//! ones the per-axis coordinates are the same up to float64 rounding.

use super::plane::Plane;
use super::DeepgrowError;
use ndarray::{Array2, ArrayView2};
use std::ops::Range;

/// MONAI `AFFINE_TOL`.
const AFFINE_TOL: f64 = 1e-3;
/// `allclose` default relative tolerance (torch and numpy).
const RTOL: f64 = 1e-5;
/// Largest resampled slice, in pixels, that [`ResamplePlan::new`] accepts (256 MiB of float32).
pub const MAX_RESAMPLED_PIXELS: usize = 1 << 26;
/// Largest `|cos|` of the angle between the two in-plane axes that [`in_plane_spacing`] treats as
/// orthogonal. MONAI would shear the sampling grid by about `cos * extent` pixels; at 1e-6 that is
/// at most ~0.005 px for a 4096-pixel slice, while float32 rounding of a rotated affine stays
/// near 1e-7.
pub const ORTHOGONALITY_TOL: f64 = 1e-6;

/// In-plane spacing `[s_i, s_j]` (mm) from the voxel-to-world affine: the norms of columns 0 and 1
/// of its upper-left 2 x 2 block (`affine_to_spacing` after `to_affine_nd(2, A)`), as in spec S2.
///
/// Rejects a sheared block (columns not orthogonal within [`ORTHOGONALITY_TOL`]) with
/// [`DeepgrowError::ObliqueInPlane`], and zero, non-finite or singular blocks with
/// [`DeepgrowError::InvalidSpacing`]. Rotations, flips and axis permutations are fine.
pub fn in_plane_spacing(affine: &[[f64; 4]; 4]) -> Result<[f64; 2], DeepgrowError> {
    let c0 = [affine[0][0], affine[1][0]];
    let c1 = [affine[0][1], affine[1][1]];
    let spacing = [
        (c0[0] * c0[0] + c0[1] * c0[1]).sqrt(),
        (c1[0] * c1[0] + c1[1] * c1[1]).sqrt(),
    ];
    if spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(DeepgrowError::InvalidSpacing { spacing });
    }
    let cos = (c0[0] * c1[0] + c0[1] * c1[1]) / (spacing[0] * spacing[1]);
    if cos.is_nan() || cos.abs() > ORTHOGONALITY_TOL {
        return Err(DeepgrowError::ObliqueInPlane);
    }
    Ok(spacing)
}

/// Geometry of the S2 resampling for one slice.
#[derive(Debug, Clone, PartialEq)]
pub struct ResamplePlan {
    /// `(H, W)` of the input slice.
    pub input_shape: [usize; 2],
    /// `(H', W')` after resampling.
    pub output_shape: [usize; 2],
    /// Target spacing actually used per axis: the configured one, or the voxel's own spacing
    /// when that is within 1e-3 of it.
    pub effective_target: [f64; 2],
    /// MONAI's no-resample shortcut applies: the output is the input, unchanged.
    pub identity: bool,
    axes: [AxisGrid; 2],
}

impl ResamplePlan {
    /// `spacing` is the slice's `[s_i, s_j]` in mm, `target` the configured `pixdim`.
    pub fn new(
        input_shape: [usize; 2],
        spacing: [f64; 2],
        target: [f64; 2],
    ) -> Result<ResamplePlan, DeepgrowError> {
        if spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(DeepgrowError::InvalidSpacing { spacing });
        }
        if input_shape.contains(&0) {
            return Err(DeepgrowError::EmptyImage { shape: input_shape });
        }
        if target.iter().any(|t| !(t.is_finite() && *t > 0.0)) {
            return Err(DeepgrowError::InvalidConfig(format!(
                "target_spacing {target:?}: each value must be finite and greater than 0"
            )));
        }
        let mut sizes = [0.0f64; 2];
        let mut effective_target = [0.0; 2];
        let mut src_dst_close = true;
        let mut xform_identity = true;
        for d in 0..2 {
            let (s, t) = (spacing[d], target[d]);
            // `Spacing`: keep the voxel's own spacing when it is within AFFINE_TOL of the target.
            let t = if (t - AFFINE_TOL) <= s && s <= (t + AFFINE_TOL) {
                s
            } else {
                t
            };
            effective_target[d] = t;
            // `zoom_affine`: rotation = A * inv(cholesky factor), one diagonal entry is
            // s * (1 / s) (not always exactly 1); the destination affine entry is that times t.
            let dst = (s * (1.0 / s)) * t;
            // `compute_shape_offset`: solve(dst, src) (triangular solves multiply by reciprocals).
            let ratio = s * (1.0 / dst);
            sizes[d] = ((input_shape[d] - 1) as f64 * ratio + 1.0).round_ties_even();
            // `spatial_resample` shortcut tests: allclose(src, dst) and allclose(solve(src, dst), I).
            src_dst_close &= (s - dst).abs() <= AFFINE_TOL + RTOL * dst.abs();
            xform_identity &= (dst * (1.0 / s) - 1.0).abs() <= AFFINE_TOL + RTOL;
        }
        // Both sizes are >= 1 (positive ratio); the product check also bounds each side.
        if sizes[0] * sizes[1] > MAX_RESAMPLED_PIXELS as f64 || sizes.iter().any(|n| n.is_nan()) {
            return Err(DeepgrowError::ImageTooLarge {
                shape: sizes.map(|n| n as usize),
                limit: MAX_RESAMPLED_PIXELS,
            });
        }
        let output_shape = sizes.map(|n| n as usize);
        let axes = [0, 1].map(|d| {
            AxisGrid::new(
                input_shape[d],
                output_shape[d],
                spacing[d],
                effective_target[d],
            )
        });
        Ok(ResamplePlan {
            input_shape,
            output_shape,
            effective_target,
            identity: output_shape == input_shape && (src_dst_close || xform_identity),
            axes,
        })
    }

    /// Resampled pixels `rows x cols` of the output grid (indices past the grid sample the
    /// clamped border rather than panic).
    ///
    /// `slice` must have shape `input_shape` (else the result is all zeros); any memory layout is
    /// read in place.
    pub fn resample_region(
        &self,
        slice: ArrayView2<f32>,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Array2<f32> {
        let (h, w) = (self.input_shape[0], self.input_shape[1]);
        let out_shape = (rows.len(), cols.len());
        if slice.dim() != (h, w) || h == 0 || w == 0 {
            return Array2::zeros(out_shape);
        }
        let plane = Plane::new(slice);
        if self.identity {
            let mut data = Vec::with_capacity(out_shape.0 * out_shape.1);
            for a in rows {
                let a = a.min(h - 1);
                data.extend(cols.clone().map(|b| plane.get(a, b.min(w - 1))));
            }
            return Array2::from_shape_vec(out_shape, data)
                .unwrap_or_else(|_| Array2::zeros(out_shape));
        }
        let ys: Vec<Tap> = rows.map(|a| self.axes[0].tap(a)).collect();
        let xs: Vec<Tap> = cols.map(|b| self.axes[1].tap(b)).collect();
        let mut data = Vec::with_capacity(ys.len() * xs.len());
        for y in &ys {
            // grid_sample names: n = y - y0, s = 1 - n; w = x - x0, e = 1 - w.
            let (n, s) = (y.frac, y.rest);
            for x in &xs {
                let (wf, e) = (x.frac, x.rest);
                let (nw, ne, sw, se) = (s * e, s * wf, n * e, n * wf);
                let v00 = f64::from(plane.get(y.i0, x.i0));
                let v01 = x.i1.map_or(0.0, |i1| f64::from(plane.get(y.i0, i1)));
                let v10 = y.i1.map_or(0.0, |i1| f64::from(plane.get(i1, x.i0)));
                let v11 = match (y.i1, x.i1) {
                    (Some(r), Some(c)) => f64::from(plane.get(r, c)),
                    _ => 0.0,
                };
                let v = v11.mul_add(se, v10.mul_add(sw, v01.mul_add(ne, v00 * nw)));
                data.push(v as f32);
            }
        }
        Array2::from_shape_vec(out_shape, data).unwrap_or_else(|_| Array2::zeros(out_shape))
    }
}

/// MONAI's sampling grid along one axis: output index -> input coordinate.
#[derive(Debug, Clone, PartialEq)]
struct AxisGrid {
    n_in: usize,
    n_out: usize,
    /// Normalised transform `g = u * t0 + t1` (`to_norm_affine`).
    t0: f64,
    t1: f64,
    /// `linspace(-1, 1, n_out)` step.
    step: f64,
}

impl AxisGrid {
    fn new(n_in: usize, n_out: usize, s: f64, t: f64) -> AxisGrid {
        // solve(src, dst) diagonal entry.
        let xf = ((s * (1.0 / s)) * t) * (1.0 / s);
        // to_norm_affine: src_norm @ xform @ inv(dst_norm), normalize_transform(align_corners=False)
        // = diag(2 / n) with translation 1 / n - 1; the inverse (LAPACK) has 1 / d and -(e * (1 / d)).
        let a = 2.0 / n_in as f64;
        let c = 1.0 / n_in as f64 - 1.0;
        let d = 2.0 / n_out as f64;
        let e = 1.0 / n_out as f64 - 1.0;
        let t0 = (a * xf) * (1.0 / d);
        let t1 = (a * xf) * -(e * (1.0 / d)) + c;
        let step = if n_out > 1 {
            2.0 / (n_out - 1) as f64
        } else {
            0.0
        };
        AxisGrid {
            n_in,
            n_out,
            t0,
            t1,
            step,
        }
    }

    /// Input coordinate (border-clamped) and bilinear tap for output index `b`.
    fn tap(&self, b: usize) -> Tap {
        let n_out = self.n_out;
        // affine_grid base: torch linspace (fused multiply-add, from the nearer end), then
        // `* (n - 1) / n` as two operations; a single step is 0.
        let u = if n_out <= 1 {
            0.0
        } else {
            let lin = if b < n_out / 2 {
                self.step.mul_add(b as f64, -1.0)
            } else {
                (-self.step).mul_add(n_out.saturating_sub(1 + b) as f64, 1.0)
            };
            (lin * (n_out - 1) as f64) / n_out as f64
        };
        let g = u * self.t0 + self.t1;
        // grid_sample un-normalisation ((g + 1) * n / 2 - 0.5, fused) and border clamp.
        let x = (g + 1.0)
            .mul_add(self.n_in as f64 / 2.0, -0.5)
            .clamp(0.0, (self.n_in - 1) as f64);
        Tap::at(x, self.n_in)
    }
}

/// One axis of a bilinear tap: lower index, upper index (None past the edge: zero value),
/// and the weights `frac = x - x0`, `rest = 1 - frac`.
struct Tap {
    i0: usize,
    i1: Option<usize>,
    frac: f64,
    rest: f64,
}

impl Tap {
    fn at(x: f64, n: usize) -> Tap {
        let x0 = x.floor();
        let frac = x - x0;
        let i0 = (x0 as usize).min(n - 1);
        Tap {
            i0,
            i1: (i0 + 1 < n).then_some(i0 + 1),
            frac,
            rest: 1.0 - frac,
        }
    }
}

/// S2 + S3 on a whole slice: the resampled `(H', W')` float32 image MONAI's `Spacingd` gives.
pub fn resample_slice(
    slice: ArrayView2<f32>,
    spacing: [f64; 2],
    target: [f64; 2],
) -> Result<Array2<f32>, DeepgrowError> {
    let (h, w) = slice.dim();
    let plan = ResamplePlan::new([h, w], spacing, target)?;
    let [oh, ow] = plan.output_shape;
    Ok(plan.resample_region(slice, 0..oh, 0..ow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, ShapeBuilder};

    fn affine(block: [[f64; 2]; 2]) -> [[f64; 4]; 4] {
        [
            [block[0][0], block[0][1], 0.0, 12.5],
            [block[1][0], block[1][1], 0.0, -3.0],
            [0.0, 0.0, 2.5, 7.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }

    #[test]
    fn spacing_from_affine() {
        assert_eq!(
            in_plane_spacing(&affine([[-0.7, 0.0], [0.0, 0.8]])).unwrap(),
            [0.7, 0.8]
        );
        // Permuted axes (DeepLesion: i -> -y, j -> -x).
        assert_eq!(
            in_plane_spacing(&affine([[0.0, -0.9375], [-0.9375, 0.0]])).unwrap(),
            [0.9375, 0.9375]
        );
        // Rotation: norms of the columns.
        let (c, s) = (0.6, 0.8);
        let sp = in_plane_spacing(&affine([[c * 2.0, -s * 3.0], [s * 2.0, c * 3.0]])).unwrap();
        assert!((sp[0] - 2.0).abs() < 1e-15 && (sp[1] - 3.0).abs() < 1e-15);
    }

    #[test]
    fn sheared_or_degenerate_affines_are_rejected() {
        assert_eq!(
            in_plane_spacing(&affine([[1.0, 0.1], [0.0, 1.0]])),
            Err(DeepgrowError::ObliqueInPlane)
        );
        for bad in [
            [[0.0, 0.0], [0.0, 1.0]],
            [[f64::NAN, 0.0], [0.0, 1.0]],
            [[1.0, 0.0], [0.0, f64::INFINITY]],
        ] {
            assert!(matches!(
                in_plane_spacing(&affine(bad)),
                Err(DeepgrowError::InvalidSpacing { .. })
            ));
        }
        // Parallel columns.
        assert_eq!(
            in_plane_spacing(&affine([[1.0, 1.0], [0.0, 0.0]])),
            Err(DeepgrowError::ObliqueInPlane)
        );
    }

    #[test]
    fn output_sizes_match_spec_examples() {
        let t = [1.0, 1.0];
        let cases: [([usize; 2], [f64; 2], [usize; 2]); 4] = [
            (
                [512, 512],
                [0.699999988079071, 0.699999988079071],
                [359, 359],
            ),
            ([512, 300], [0.977, 0.73], [500, 219]),
            ([280, 200], [0.81, 1.3], [227, 260]),
            // (512 - 1) * 0.7 + 1 = 358.7 -> 359; check a true tie: (5 - 1) * 0.625 + 1 = 3.5 -> 4,
            // (3 - 1) * 1.25 + 1 = 3.5 -> 4; (7 - 1) * 0.25 + 1 = 2.5 -> 2 (half to even).
            ([7, 5], [0.25, 0.625], [2, 4]),
        ];
        for (shape, sp, want) in cases {
            assert_eq!(
                ResamplePlan::new(shape, sp, t).unwrap().output_shape,
                want,
                "{shape:?} {sp:?}"
            );
        }
    }

    #[test]
    fn shortcut_near_one_mm() {
        let t = [1.0, 1.0];
        let p = ResamplePlan::new([512, 512], [1.0009, 0.9991], t).unwrap();
        assert!(p.identity);
        assert_eq!(p.output_shape, [512, 512]);
        let p = ResamplePlan::new([512, 512], [1.0011, 1.0], t).unwrap();
        assert!(!p.identity);
        assert_eq!(p.output_shape, [513, 512]);
        // Mixed: the near-1 axis keeps its spacing (no interpolation), the other is resampled.
        let p = ResamplePlan::new([100, 100], [1.0005, 0.8], t).unwrap();
        assert!(!p.identity);
        assert_eq!(p.effective_target, [1.0005, 1.0]);
        assert_eq!(p.output_shape, [100, 80]);
        // Just past AFFINE_TOL, but the size is unchanged and allclose(atol 1e-3, rtol 1e-5) holds.
        let p = ResamplePlan::new([100, 100], [1.001005, 1.0], t).unwrap();
        assert!(p.identity);
    }

    #[test]
    fn invalid_spacing_and_huge_output_are_errors() {
        for sp in [
            [0.0, 1.0],
            [-1.0, 1.0],
            [f64::NAN, 1.0],
            [1.0, f64::INFINITY],
        ] {
            assert!(matches!(
                ResamplePlan::new([10, 10], sp, [1.0, 1.0]),
                Err(DeepgrowError::InvalidSpacing { .. })
            ));
        }
        assert!(matches!(
            ResamplePlan::new([512, 512], [1e6, 1e6], [1.0, 1.0]),
            Err(DeepgrowError::ImageTooLarge { .. })
        ));
        assert!(matches!(
            ResamplePlan::new([512, 512], [1e300, 1.0], [1.0, 1.0]),
            Err(DeepgrowError::ImageTooLarge { .. })
        ));
        assert!(matches!(
            ResamplePlan::new([0, 5], [1.0, 1.0], [1.0, 1.0]),
            Err(DeepgrowError::EmptyImage { .. })
        ));
        for t in [[0.0, 1.0], [1.0, -1.0], [f64::NAN, 1.0]] {
            assert!(matches!(
                ResamplePlan::new([5, 5], [1.0, 1.0], t),
                Err(DeepgrowError::InvalidConfig(_))
            ));
        }
    }

    #[test]
    fn bilinear_border_and_layouts() {
        // 2 mm -> 1 mm doubles the grid; values are linear so interpolation is exact.
        let src = Array2::from_shape_fn((3, 4), |(r, c)| (10 * r + c) as f32);
        let out = resample_slice(src.view(), [2.0, 2.0], [1.0, 1.0]).unwrap();
        assert_eq!(out.dim(), (5, 7));
        for ((a, b), &v) in out.indexed_iter() {
            let want = 10.0 * (a as f32 / 2.0) + b as f32 / 2.0;
            assert_eq!(v, want, "({a}, {b})");
        }
        // Up-sampling past the last voxel clamps to the border.
        let out = resample_slice(src.view(), [1.3, 1.3], [1.0, 1.0]).unwrap();
        assert_eq!(out.dim(), (4, 5));
        assert_eq!(out[[3, 4]], 23.0);
        // Column-major and transposed views give the same result.
        let f = Array2::from_shape_fn((3, 4).f(), |(r, c)| (10 * r + c) as f32);
        let tt = src.t().to_owned();
        for v in [f.view(), tt.t()] {
            let o2 = resample_slice(v, [1.3, 1.3], [1.0, 1.0]).unwrap();
            assert_eq!(o2, out);
        }
        // A region equals the same window of the full result.
        let src = Array2::from_shape_fn((40, 30), |(r, c)| ((r * 7 + c * 3) % 11) as f32 - 5.0);
        let plan = ResamplePlan::new([40, 30], [0.7, 0.9], [1.0, 1.0]).unwrap();
        let full = plan.resample_region(src.view(), 0..28, 0..27);
        let part = plan.resample_region(src.view(), 5..20, 3..27);
        assert_eq!(part, full.slice(s![5..20, 3..27]));
    }

    #[test]
    fn identity_returns_input() {
        let src = Array2::from_shape_fn((6, 5), |(r, c)| (r * 5 + c) as f32 * 0.1);
        let out = resample_slice(src.t().t(), [1.0, 1.0], [1.0, 1.0]).unwrap();
        assert_eq!(out, src);
        // Non-finite values pass through the shortcut untouched, and interpolate like torch
        // (a past-the-edge neighbour contributes 0, not NaN).
        let mut src = Array2::<f32>::ones((3, 3));
        src[[2, 2]] = f32::INFINITY;
        let out = resample_slice(src.view(), [1.3, 1.3], [1.0, 1.0]).unwrap();
        assert_eq!(out[[3, 3]], f32::INFINITY);
        assert_eq!(out[[0, 0]], 1.0);
    }
}
