//! The other layers of a U-Net on NHWC tensors: instance norm with LeakyReLU (applied in place after a
//! convolution), 2 × 2 max pooling, 2 × 2 stride-2 transposed convolution and 1 × 1 convolution. The matrix
//! products run on [`kernel`]; everything is split over the inference's threads by rows.

use super::bf16::{Bf16Isa, Upsample2x2Bf16};
use super::kernel::{self, isa_dispatch, Dst, Rows, MR, NR};
use super::parallel::{Parallel, SyncPtr};

/// Instance normalisation (per-image statistics, affine) followed by an optional LeakyReLU.
#[derive(Debug, Clone)]
pub struct NormAct {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub epsilon: f32,
    /// LeakyReLU's slope for negative inputs, when the norm is followed by one.
    pub leaky: Option<f32>,
}

impl NormAct {
    /// Normalises `data` (NHWC, `pixels × channels`) in place given its channel means, then applies the
    /// activation: `(x − mean) · (γ / √(var + ε)) + β`. As in the reference, the variance is a second pass over
    /// the centred values and the mean is subtracted first: from running sums of squares, or folded into one
    /// multiply-add, the variance and the result cancel badly where a channel's mean is large next to its
    /// spread (up to 6e-4 on a trained network's logits).
    ///
    /// `variance`, when the convolution computed it along the way, saves the second pass.
    pub fn apply(
        &self,
        data: &mut [f32],
        pixels: usize,
        means: &[f64],
        variance: Option<&[f64]>,
        par: &Parallel,
    ) {
        let channels = self.gamma.len();
        assert_eq!(data.len(), pixels * channels);
        // the mean as a float32 pair (hi + lo): x − hi is exact near the mean, so the centring loses nothing
        let mean: Vec<f32> = means.iter().map(|&m| m as f32).collect();
        let mean_lo: Vec<f32> = means
            .iter()
            .zip(&mean)
            .map(|(&m, &hi)| (m - hi as f64) as f32)
            .collect();
        let var: Vec<f64> = match variance {
            Some(variance) => variance.to_vec(),
            None => {
                // a few large ranges per thread: each returns one vector of sums
                let ranges = (4 * par.threads()).min(pixels.max(1));
                let range = |b: usize| (b * pixels / ranges)..((b + 1) * pixels / ranges);
                let partial = par.map_blocks(
                    ranges,
                    || (),
                    |_, b| {
                        let r = range(b);
                        centred_squares(
                            &data[r.start * channels..r.end * channels],
                            [&mean, &mean_lo],
                        )
                    },
                );
                let mut m2 = vec![0f64; channels];
                for p in &partial {
                    for (a, b) in m2.iter_mut().zip(p) {
                        *a += b;
                    }
                }
                m2.iter().map(|s| s / pixels.max(1) as f64).collect()
            }
        };
        let scale: Vec<f32> = (0..channels)
            .map(|c| (self.gamma[c] as f64 / (var[c] + self.epsilon as f64).sqrt()) as f32)
            .collect();
        let beta = &self.beta;
        let slope = self.leaky.unwrap_or(1.0);
        let ptr = SyncPtr(data.as_mut_ptr());
        let chunk = 256;
        par.for_each(pixels.div_ceil(chunk), |b| {
            let p0 = b * chunk;
            let p1 = (p0 + chunk).min(pixels);
            // SAFETY: chunks are disjoint pixel ranges of `data`.
            let rows = unsafe {
                std::slice::from_raw_parts_mut(ptr.get().add(p0 * channels), (p1 - p0) * channels)
            };
            normalize_leaky(rows, [&mean, &mean_lo], &scale, beta, slope)
        });
    }
}

isa_dispatch! {
/// Σ (x − mean[c])² per channel over the pixels of NHWC `rows` (float32 over 16 pixels, then f64); `mean` is
/// given as a float32 pair (hi, lo).
fn centred_squares(rows: &[f32], mean: [&[f32]; 2]) -> Vec<f64> {
    let [hi, lo] = mean;
    let c = hi.len();
    let mut total = vec![0f64; c];
    let mut part = vec![0f32; c];
    for group in rows.chunks(16 * c) {
        part.fill(0.0);
        for px in group.chunks_exact(c) {
            for (((a, &x), &h), &l) in part.iter_mut().zip(px).zip(hi).zip(lo) {
                let d = (x - h) - l;
                *a += d * d;
            }
        }
        for (t, &p) in total.iter_mut().zip(&part) {
            *t += p as f64;
        }
    }
    total
}
}

isa_dispatch! {
/// `x = (x − mean[c]) · scale[c] + beta[c]`, then `x < 0 ? slope · x : x`, for every pixel of NHWC `rows`;
/// `mean` is given as a float32 pair (hi, lo).
fn normalize_leaky(rows: &mut [f32], mean: [&[f32]; 2], scale: &[f32], beta: &[f32], slope: f32) {
    const V: usize = 16;
    let [hi, lo] = mean;
    let c = scale.len();
    let op = |x: f32, h: f32, l: f32, s: f32, b: f32| {
        let y = ((x - h) - l) * s + b;
        if y < 0.0 {
            y * slope
        } else {
            y
        }
    };
    for px in rows.chunks_exact_mut(c) {
        let mut k = 0;
        while k + V <= c {
            let (x, h, l) = (&mut px[k..k + V], &hi[k..k + V], &lo[k..k + V]);
            let (s, b) = (&scale[k..k + V], &beta[k..k + V]);
            for j in 0..V {
                x[j] = op(x[j], h[j], l[j], s[j], b[j]);
            }
            k += V;
        }
        for j in k..c {
            px[j] = op(px[j], hi[j], lo[j], scale[j], beta[j]);
        }
    }
}
}

/// 2 × 2 max pooling with stride 2 (no padding; odd sizes drop the last row or column, like ONNX floor mode).
pub fn max_pool_2x2(x: &[f32], h: usize, w: usize, c: usize, out: &mut [f32], par: &Parallel) {
    let (ho, wo) = (h / 2, w / 2);
    assert_eq!(x.len(), h * w * c);
    assert_eq!(out.len(), ho * wo * c);
    let ptr = SyncPtr(out.as_mut_ptr());
    par.for_each(ho, |y| {
        // SAFETY: one output row per block.
        let row = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(y * wo * c), wo * c) };
        let r0 = &x[2 * y * w * c..][..w * c];
        let r1 = &x[(2 * y + 1) * w * c..][..w * c];
        for (xo, o) in row.chunks_exact_mut(c).enumerate() {
            let (a, b) = (&r0[2 * xo * c..][..2 * c], &r1[2 * xo * c..][..2 * c]);
            for (ch, v) in o.iter_mut().enumerate() {
                *v = a[ch].max(a[c + ch]).max(b[ch]).max(b[c + ch]);
            }
        }
    });
}

/// A matrix product over pixels, `out[p][k] = bias[k] + Σ_c x[p][c] w[k][c]`, with weights packed in panels.
#[derive(Debug)]
pub struct Dense {
    c_in: usize,
    k_out: usize,
    panels: usize,
    /// `[panel][c][NR]`
    u: Vec<f32>,
    /// zero-padded to whole panels
    bias: Vec<f32>,
}

impl Dense {
    pub fn new(k_out: usize, c_in: usize, w: impl Fn(usize, usize) -> f32, bias: &[f32]) -> Self {
        let panels = k_out.div_ceil(NR);
        let mut b = bias.to_vec();
        b.resize(panels * NR, 0.0);
        Dense {
            c_in,
            k_out,
            panels,
            u: kernel::pack_panels(k_out, c_in, w),
            bias: b,
        }
    }

    pub fn k_out(&self) -> usize {
        self.k_out
    }

    pub fn c_in(&self) -> usize {
        self.c_in
    }

    /// Computes the products for pixels `x[p0..p1]` (rows of `c_in` floats): pixel `p0`'s output row starts at
    /// `dst`, and consecutive pixels' rows lie `dst_stride` floats apart.
    ///
    /// # Safety
    /// `dst + (p − p0) · dst_stride .. + k_out` must be valid and owned by the caller for every `p` in `p0..p1`.
    pub(super) unsafe fn rows(
        &self,
        x: &[f32],
        p0: usize,
        p1: usize,
        dst: *mut f32,
        dst_stride: usize,
    ) {
        let c = self.c_in;
        let mut p = p0;
        while p < p1 {
            let n = (p1 - p).min(MR);
            // the kernel reads MR rows: past the end of `x`, read a zero-padded copy instead
            let mut padded = Vec::new();
            let v = if (p + MR) * c <= x.len() {
                x.as_ptr().add(p * c)
            } else {
                padded.resize(MR * c, 0.0);
                padded[..n * c].copy_from_slice(&x[p * c..(p + n) * c]);
                padded.as_ptr()
            };
            for panel in 0..self.panels {
                let bias = &*(self.bias.as_ptr().add(panel * NR) as *const [f32; NR]);
                kernel::run(
                    c,
                    Rows {
                        v,
                        v_stride: c,
                        rows: n,
                    },
                    self.u.as_ptr().add(panel * c * NR),
                    Some(bias),
                    Dst {
                        ptr: dst.add((p - p0) * dst_stride + panel * NR),
                        stride: dst_stride,
                        lanes: (self.k_out - panel * NR).min(NR),
                    },
                );
            }
            p += n;
        }
    }

    /// A 1 × 1 convolution: `x` is `pixels × c_in`, `out` is `pixels × k_out`.
    pub fn pointwise(&self, x: &[f32], pixels: usize, out: &mut [f32], par: &Parallel) {
        assert_eq!(x.len(), pixels * self.c_in);
        assert_eq!(out.len(), pixels * self.k_out);
        let chunk = 16 * MR;
        let ptr = SyncPtr(out.as_mut_ptr());
        par.for_each(pixels.div_ceil(chunk), |b| {
            let p0 = b * chunk;
            let p1 = (p0 + chunk).min(pixels);
            // SAFETY: disjoint pixel ranges.
            unsafe { self.rows(x, p0, p1, ptr.get().add(p0 * self.k_out), self.k_out) }
        });
    }
}

/// A 2 × 2 transposed convolution with stride 2 (each input pixel writes its own 2 × 2 output block).
#[derive(Debug)]
pub struct Upsample2x2 {
    products: UpsampleProducts,
}

#[derive(Debug)]
enum UpsampleProducts {
    /// One product per kernel position (i, j), in the order (0,0), (0,1), (1,0), (1,1).
    F32([Dense; 4]),
    Bf16(Upsample2x2Bf16),
}

impl Upsample2x2 {
    /// `w` is ONNX ConvTranspose's `[c_in][k_out][2][2]` (group 1); in bfloat16 on `bf16`'s hardware when given.
    pub fn new(w: &[f32], bias: &[f32], c_in: usize, k_out: usize, bf16: Option<Bf16Isa>) -> Self {
        assert_eq!(w.len(), c_in * k_out * 4);
        let products = match bf16 {
            Some(isa) => UpsampleProducts::Bf16(Upsample2x2Bf16::new(isa, w, bias, c_in, k_out)),
            None => {
                let tap =
                    |t: usize| Dense::new(k_out, c_in, |k, c| w[(c * k_out + k) * 4 + t], bias);
                UpsampleProducts::F32([tap(0), tap(1), tap(2), tap(3)])
            }
        };
        Upsample2x2 { products }
    }

    pub fn k_out(&self) -> usize {
        match &self.products {
            UpsampleProducts::F32(taps) => taps[0].k_out,
            UpsampleProducts::Bf16(up) => up.k_out(),
        }
    }

    pub fn c_in(&self) -> usize {
        match &self.products {
            UpsampleProducts::F32(taps) => taps[0].c_in,
            UpsampleProducts::Bf16(up) => up.c_in(),
        }
    }

    /// `x` is `h × w × c_in`, `out` is `2h × 2w × k_out`.
    pub fn run(&self, x: &[f32], h: usize, w: usize, out: &mut [f32], par: &Parallel) {
        let taps = match &self.products {
            UpsampleProducts::F32(taps) => taps,
            UpsampleProducts::Bf16(up) => return up.run(x, h, w, out, par),
        };
        let k = self.k_out();
        assert_eq!(out.len(), 4 * h * w * k);
        let ptr = SyncPtr(out.as_mut_ptr());
        par.for_each(h, |y| {
            for (t, tap) in taps.iter().enumerate() {
                let (i, j) = (t / 2, t % 2);
                // SAFETY: input row y owns output rows 2y and 2y + 1.
                unsafe {
                    let dst = ptr.get().add(((2 * y + i) * 2 * w + j) * k);
                    tap.rows(x, y * w, (y + 1) * w, dst, 2 * k);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fast::test_support::values;

    #[test]
    fn upsample_and_pointwise_match_naive_loops() {
        let (h, w, c, k) = (5, 7, 19, 36);
        let x = values(h * w * c, 1);
        let wt = values(c * k * 4, 2);
        let b = values(k, 3);
        let up = Upsample2x2::new(&wt, &b, c, k, None);
        for threads in [1, 2] {
            let par = Parallel::new(threads);
            let mut out = vec![f32::NAN; 4 * h * w * k];
            up.run(&x, h, w, &mut out, &par);
            for y in 0..2 * h {
                for xx in 0..2 * w {
                    for kk in 0..k {
                        let (sy, sx, i, j) = (y / 2, xx / 2, y % 2, xx % 2);
                        let want: f32 = b[kk]
                            + (0..c)
                                .map(|cc| {
                                    x[(sy * w + sx) * c + cc] * wt[((cc * k + kk) * 2 + i) * 2 + j]
                                })
                                .sum::<f32>();
                        let got = out[(y * 2 * w + xx) * k + kk];
                        assert!((got - want).abs() < 1e-4, "({y},{xx},{kk}) {got} vs {want}");
                    }
                }
            }
            let dense = Dense::new(3, c, |kk, cc| wt[kk * c + cc], &b[..3]);
            let mut o = vec![f32::NAN; h * w * 3];
            dense.pointwise(&x, h * w, &mut o, &par);
            for p in 0..h * w {
                for kk in 0..3 {
                    let want: f32 = b[kk]
                        + (0..c)
                            .map(|cc| x[p * c + cc] * wt[kk * c + cc])
                            .sum::<f32>();
                    assert!((o[p * 3 + kk] - want).abs() < 1e-4);
                }
            }
        }
    }

    #[test]
    fn norm_act_normalises_each_channel_then_leaks() {
        let (pixels, c) = (300, 5);
        let mut x = values(pixels * c, 4);
        // channel 3 sits far from zero: its mean must not cancel its spread away
        for p in 0..pixels {
            x[p * c + 3] += 1000.0;
        }
        let channel = |x: &[f32], ch: usize| {
            (0..pixels)
                .map(|p| x[p * c + ch] as f64)
                .collect::<Vec<_>>()
        };
        let means: Vec<f64> = (0..c)
            .map(|ch| channel(&x, ch).iter().sum::<f64>() / pixels as f64)
            .collect();
        let norm = NormAct {
            gamma: vec![1.0, 2.0, 0.5, 1.0, 1.0],
            beta: vec![0.0, 1.0, -1.0, 0.0, 0.0],
            epsilon: 1e-5,
            leaky: Some(0.1),
        };
        let orig = x.clone();
        norm.apply(&mut x, pixels, &means, None, &Parallel::new(2));
        for ch in 0..c {
            let vals: Vec<f64> = (0..pixels).map(|p| orig[p * c + ch] as f64).collect();
            let mean = vals.iter().sum::<f64>() / pixels as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / pixels as f64;
            for p in 0..pixels {
                let y = norm.gamma[ch] as f64 * (vals[p] - mean) / (var + 1e-5).sqrt()
                    + norm.beta[ch] as f64;
                let want = if y < 0.0 { 0.1 * y } else { y };
                assert!((x[p * c + ch] as f64 - want).abs() < 1e-4, "channel {ch}");
            }
        }
        let mut pooled = vec![0f32; 2 * 3 * c];
        max_pool_2x2(&orig[..4 * 7 * c], 4, 7, c, &mut pooled, &Parallel::new(1));
        for y in 0..2 {
            for xx in 0..3 {
                for ch in 0..c {
                    let at = |yy: usize, xxx: usize| orig[(yy * 7 + xxx) * c + ch];
                    let want = at(2 * y, 2 * xx)
                        .max(at(2 * y, 2 * xx + 1))
                        .max(at(2 * y + 1, 2 * xx))
                        .max(at(2 * y + 1, 2 * xx + 1));
                    assert_eq!(pooled[(y * 3 + xx) * c + ch], want);
                }
            }
        }
    }
}
