//! 3 × 3 convolution (stride 1, zero padding 1) by Winograd's minimal filtering F(m × m, 3 × 3) (Lavin & Gray,
//! 2016) on NHWC tensors: each m × m output tile costs (m + 2)² multiplies per channel pair instead of 9 m²
//! (16 instead of 36 for F(2, 3), 36 instead of 144 for F(4, 3)).
//!
//! Per block of tiles: the input transform `V = Bᵀ d B` (vectorised over 16 channels) writes one row per tile,
//! [`kernel`] multiplies each of the (m + 2)² planes of V with the pre-transformed weights `U = G g Gᵀ`, and the
//! output transform `Y = Aᵀ M A` adds the bias, writes the tile and sums each channel for the instance norm.
//! Several inputs are read as one (their channels concatenated), so a Concat in front of the convolution costs
//! nothing. The transform points are (0, ±1, ∞) for F(2, 3) and (0, ±1, ±2, ∞) for F(4, 3). In float32,
//! F(2, 3) keeps a trained network's logits within 1e-4 of the exact model (`tests/model_parity.rs`); F(4, 3)
//! is a few times less exact, hence opt-in. A convolution with few input channels (the first layer) is computed
//! directly instead.

use super::bf16::{self, DirectBf16};
use super::kernel::{self, isa_dispatch, Dst, Rows, MR, NR};
use super::layers::Dense;
use super::parallel::{Parallel, SyncPtr};

/// SIMD lanes of the transforms (channels processed together).
const L: usize = 16;

/// Largest patch (9 × input channels) convolved directly rather than by Winograd.
const DIRECT_MAX_DEPTH: usize = 64;

const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
const G2: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// How a 3 × 3 convolution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// In float32, by Winograd F(m × m, 3 × 3).
    Winograd(Tile),
    /// In bfloat16 with float32 sums, directly, on AMX or AVX-512-BF16 ([`bf16`]); Winograd F(2 × 2, 3 × 3)
    /// where the CPU has neither.
    Bf16,
}

/// Output tile size m of F(m × m, 3 × 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tile {
    F2,
    F4,
}

impl Tile {
    pub fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }
    fn alpha(self) -> usize {
        self.m() + 2
    }
}

/// A 3 × 3 convolution, ready to run.
#[derive(Debug)]
pub struct Conv3x3 {
    algorithm: Algorithm,
}

#[derive(Debug)]
enum Algorithm {
    /// Few input channels (the first layer): a matrix product over 3 × 3 × c_in patches, since the Winograd
    /// transforms would cost more than the products they save.
    Direct(Dense),
    Winograd(Winograd),
    /// bfloat16 products on AMX or AVX-512-BF16.
    DirectBf16(DirectBf16),
}

/// A 3 × 3 convolution's weights in the Winograd domain, packed for [`kernel`]:
/// `u[ξ][panel][c][NR]` for each of the (m + 2)² transform planes ξ.
#[derive(Debug)]
struct Winograd {
    tile: Tile,
    c_in: usize,
    k_out: usize,
    panels: usize,
    u: Vec<f32>,
    /// Zero-padded to whole panels.
    bias: Vec<f32>,
}

/// Per-channel sums of one part of a convolution's output, for the instance norm's mean: sums of `x − shift`,
/// with `shift` the part's first pixel, so that the float32 partial sums work at the channel's own level.
pub(super) struct ChannelSums {
    pixels: usize,
    shift: Vec<f32>,
    sum: Vec<f64>,
}

impl ChannelSums {
    fn new(channels: usize) -> Self {
        ChannelSums {
            pixels: 0,
            shift: vec![0.0; channels],
            sum: vec![0.0; channels],
        }
    }

    /// The sums of NHWC `pixels` (`k` channels each): float32 over 16 pixels at a time (vectorised),
    /// accumulated in f64.
    pub(super) fn of_pixels(pixels: &[f32], k: usize) -> Self {
        let mut sums = ChannelSums::new(k);
        sums.pixels = pixels.len() / k;
        sums.shift.copy_from_slice(&pixels[..k]);
        let mut s = vec![0f32; k];
        for group in pixels.chunks(16 * k) {
            s.fill(0.0);
            for px in group.chunks_exact(k) {
                for ((a, &v), &sh) in s.iter_mut().zip(px).zip(&sums.shift) {
                    *a += v - sh;
                }
            }
            for (total, &part) in sums.sum.iter_mut().zip(&s) {
                *total += part as f64;
            }
        }
        sums
    }

    /// The mean per channel of all the parts together.
    pub(super) fn mean(parts: &[ChannelSums], channels: usize) -> Vec<f64> {
        let n: usize = parts.iter().map(|p| p.pixels).sum();
        let mut mean = vec![0f64; channels];
        for p in parts {
            for (c, m) in mean.iter_mut().enumerate() {
                *m += p.shift[c] as f64 * p.pixels as f64 + p.sum[c];
            }
        }
        mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
        mean
    }
}

impl Conv3x3 {
    /// `weights` is ONNX's `[k_out][c_in][3][3]`, `bias` has `k_out` values.
    pub fn new(method: Method, weights: &[f32], bias: &[f32], k_out: usize, c_in: usize) -> Self {
        assert_eq!(weights.len(), k_out * c_in * 9);
        assert_eq!(bias.len(), k_out);
        let algorithm = match (method, bf16::hardware()) {
            (Method::Bf16, Some(isa)) if c_in * 9 > DIRECT_MAX_DEPTH => {
                Algorithm::DirectBf16(DirectBf16::new(isa, weights, bias, k_out, c_in))
            }
            _ if c_in * 9 <= DIRECT_MAX_DEPTH => {
                // patch element j = (tap, c) with tap = 3·dy + dx
                let weight = |k: usize, j: usize| weights[(k * c_in + j % c_in) * 9 + j / c_in];
                Algorithm::Direct(Dense::new(k_out, 9 * c_in, weight, bias))
            }
            (Method::Winograd(tile), _) => {
                Algorithm::Winograd(Winograd::new(tile, weights, bias, k_out, c_in))
            }
            (Method::Bf16, _) => {
                Algorithm::Winograd(Winograd::new(Tile::F2, weights, bias, k_out, c_in))
            }
        };
        Conv3x3 { algorithm }
    }

    pub fn k_out(&self) -> usize {
        match &self.algorithm {
            Algorithm::Direct(product) => product.k_out(),
            Algorithm::Winograd(wg) => wg.k_out,
            Algorithm::DirectBf16(conv) => conv.k_out(),
        }
    }

    pub fn c_in(&self) -> usize {
        match &self.algorithm {
            Algorithm::Direct(product) => product.c_in() / 9,
            Algorithm::Winograd(wg) => wg.c_in,
            Algorithm::DirectBf16(conv) => conv.c_in(),
        }
    }

    /// How the convolution is computed, for logs and dumps.
    pub fn algorithm(&self) -> String {
        match &self.algorithm {
            Algorithm::Direct(_) => "direct".into(),
            Algorithm::Winograd(wg) => format!("Winograd F({m}x{m}, 3x3)", m = wg.tile.m()),
            Algorithm::DirectBf16(conv) => format!("direct bfloat16 ({:?})", conv.isa()),
        }
    }

    /// Convolves the channel-concatenation of `inputs` (each NHWC `h × w × channels`) into `out`
    /// (NHWC `h × w × k_out`), bias included, and returns the per-channel means of `out`, and its variances
    /// where they come at no extra pass (bfloat16: float32 sums of shifted squares, exact enough there).
    pub fn run(
        &self,
        inputs: &[(&[f32], usize)],
        h: usize,
        w: usize,
        out: &mut [f32],
        par: &Parallel,
    ) -> Moments {
        assert_eq!(inputs.iter().map(|i| i.1).sum::<usize>(), self.c_in());
        for (data, c) in inputs {
            assert_eq!(data.len(), h * w * c);
        }
        assert_eq!(out.len(), h * w * self.k_out());
        let partials = match &self.algorithm {
            Algorithm::Direct(product) => run_direct(product, inputs, h, w, out, par),
            Algorithm::Winograd(wg) => wg.run(inputs, h, w, out, par),
            Algorithm::DirectBf16(conv) => {
                let (mean, variance) = conv.run(inputs, h, w, out, par);
                return Moments {
                    mean,
                    variance: Some(variance),
                };
            }
        };
        Moments {
            mean: ChannelSums::mean(&partials, self.k_out()),
            variance: None,
        }
    }
}

/// Per-channel statistics of a convolution's output, for the instance norm that follows it.
pub struct Moments {
    pub mean: Vec<f64>,
    /// When the convolution had them at hand; else the norm computes them from the centred values.
    pub variance: Option<Vec<f64>>,
}

/// Direct convolution, one output row per block: the row's 3 × 3 × c_in patches, then their product with the
/// weights.
fn run_direct(
    product: &Dense,
    inputs: &[(&[f32], usize)],
    h: usize,
    w: usize,
    out: &mut [f32],
    par: &Parallel,
) -> Vec<ChannelSums> {
    let c_in: usize = inputs.iter().map(|i| i.1).sum();
    let depth = 9 * c_in;
    let k = product.k_out();
    let out_ptr = SyncPtr(out.as_mut_ptr());
    par.map_blocks(
        h,
        || vec![0f32; w * depth],
        |patches, y| {
            for x in 0..w {
                let row = &mut patches[x * depth..][..depth];
                for tap in 0..9 {
                    let (sy, sx) = (
                        y as isize + tap as isize / 3 - 1,
                        x as isize + tap as isize % 3 - 1,
                    );
                    let inside = sy >= 0 && sx >= 0 && sy < h as isize && sx < w as isize;
                    let mut c_off = tap * c_in;
                    for &(data, c) in inputs {
                        let dst = &mut row[c_off..][..c];
                        if inside {
                            dst.copy_from_slice(&data[(sy as usize * w + sx as usize) * c..][..c]);
                        } else {
                            dst.fill(0.0);
                        }
                        c_off += c;
                    }
                }
            }
            // SAFETY: row y of the output belongs to this block.
            let out_row = unsafe {
                product.rows(patches, 0, w, out_ptr.get().add(y * w * k), k);
                std::slice::from_raw_parts(out_ptr.get().add(y * w * k), w * k)
            };
            ChannelSums::of_pixels(out_row, k)
        },
    )
}

impl Winograd {
    /// The weights' transform is computed in f64.
    fn new(tile: Tile, weights: &[f32], bias: &[f32], k_out: usize, c_in: usize) -> Self {
        let panels = k_out.div_ceil(NR);
        let mut padded_bias = bias.to_vec();
        padded_bias.resize(panels * NR, 0.0);
        let alpha = tile.alpha();
        let g: &[[f64; 3]] = match tile {
            Tile::F2 => &G2,
            Tile::F4 => &G4,
        };
        // U[ξ = i·α + j][k][c] = Σ_{a,b} G[i][a] g[k][c][a][b] G[j][b]
        let mut u_dense = vec![0f32; alpha * alpha * k_out * c_in];
        for k in 0..k_out {
            for c in 0..c_in {
                let w = &weights[(k * c_in + c) * 9..][..9];
                for i in 0..alpha {
                    for j in 0..alpha {
                        let mut acc = 0f64;
                        for a in 0..3 {
                            for b in 0..3 {
                                acc += g[i][a] * w[a * 3 + b] as f64 * g[j][b];
                            }
                        }
                        u_dense[((i * alpha + j) * k_out + k) * c_in + c] = acc as f32;
                    }
                }
            }
        }
        let mut u = Vec::with_capacity(alpha * alpha * panels * c_in * NR);
        for xi in 0..alpha * alpha {
            let plane = &u_dense[xi * k_out * c_in..][..k_out * c_in];
            u.extend(kernel::pack_panels(k_out, c_in, |k, c| plane[k * c_in + c]));
        }
        Winograd {
            tile,
            c_in,
            k_out,
            panels,
            u,
            bias: padded_bias,
        }
    }

    fn run(
        &self,
        inputs: &[(&[f32], usize)],
        h: usize,
        w: usize,
        out: &mut [f32],
        par: &Parallel,
    ) -> Vec<ChannelSums> {
        let m = self.tile.m();
        let alpha2 = self.tile.alpha().pow(2);
        let geometry = Geometry {
            h,
            w,
            tiles_w: w.div_ceil(m),
            tiles: h.div_ceil(m) * w.div_ceil(m),
        };
        let kp = self.panels * NR;
        // Tiles per block: the block's V planes stay within about 1 MiB of cache, but a block is at least
        // half a weight panel's width of rows (so large weight sets are not re-read for few tiles), and the
        // tiles are shared across the threads.
        let by_cache = (1 << 18) / (alpha2 * self.c_in).max(1);
        let per_thread = geometry.tiles.div_ceil(par.threads());
        let block = by_cache.max(kp / 2).min(per_thread).max(1).div_ceil(MR) * MR;
        let blocks = geometry.tiles.div_ceil(block);
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let (v_len, m_len) = (alpha2 * block * self.c_in, alpha2 * block * kp);
        par.map_blocks(
            blocks,
            || Scratch::take(v_len, m_len),
            |scratch, b| {
                let t0 = b * block;
                let t1 = (t0 + block).min(geometry.tiles);
                let mut sums = ChannelSums::new(self.k_out);
                // SAFETY: blocks cover disjoint tiles, so disjoint output pixels.
                let job = Job {
                    inputs,
                    geo: &geometry,
                    tiles: t0..t1,
                    block,
                    out: out_ptr.get(),
                };
                unsafe { run_block(self, &job, scratch, &mut sums) };
                sums
            },
        )
    }

    #[inline(always)]
    unsafe fn block_tiles<const M: usize, const A: usize, T: Transforms<M, A>>(
        &self,
        job: &Job,
        scratch: &mut Scratch,
        sums: &mut ChannelSums,
    ) {
        let Job {
            inputs,
            geo,
            ref tiles,
            block,
            out,
        } = *job;
        let tiles = tiles.clone();
        let c_all = self.c_in;
        let kp = self.panels * NR;
        let n = tiles.len();
        let rows = n.div_ceil(MR) * MR;
        let v = scratch.v.as_mut_ptr();
        let mbuf = scratch.m.as_mut_ptr();
        let (h, w) = (geo.h as isize, geo.w as isize);

        // Input transform: one row of c_all channels per tile and plane.
        for (r, t) in tiles.clone().enumerate() {
            let y0 = (t / geo.tiles_w * M) as isize - 1;
            let x0 = (t % geo.tiles_w * M) as isize - 1;
            let interior = y0 >= 0 && x0 >= 0 && y0 + A as isize <= h && x0 + A as isize <= w;
            let mut c_off = 0;
            for &(data, c_count) in inputs {
                let pixel = |y: isize, x: isize| data.as_ptr().add((y * w + x) as usize * c_count);
                let v_row = v.add(r * c_all + c_off);
                let mut c0 = 0;
                while c0 + L <= c_count {
                    if interior {
                        let base = pixel(y0, x0).add(c0);
                        input_tile::<M, A, T>(
                            |i, j| {
                                std::ptr::read_unaligned(
                                    base.add((i * geo.w + j) * c_count) as *const Vector
                                )
                            },
                            |xi, vec| {
                                std::ptr::write_unaligned(
                                    v_row.add(xi * block * c_all + c0) as *mut Vector,
                                    *vec,
                                )
                            },
                        );
                    } else {
                        input_tile::<M, A, T>(
                            |i, j| {
                                let (y, x) = (y0 + i as isize, x0 + j as isize);
                                if y < 0 || x < 0 || y >= h || x >= w {
                                    [0.0; L]
                                } else {
                                    std::ptr::read_unaligned(pixel(y, x).add(c0) as *const Vector)
                                }
                            },
                            |xi, vec| {
                                std::ptr::write_unaligned(
                                    v_row.add(xi * block * c_all + c0) as *mut Vector,
                                    *vec,
                                )
                            },
                        );
                    }
                    c0 += L;
                }
                if c0 < c_count {
                    // the last channels (fewer than a vector): zero-padded lanes, only the real ones stored
                    let lanes = c_count - c0;
                    input_tile::<M, A, T>(
                        |i, j| {
                            let (y, x) = (y0 + i as isize, x0 + j as isize);
                            let mut vec = [0.0; L];
                            if y >= 0 && x >= 0 && y < h && x < w {
                                let src = pixel(y, x).add(c0);
                                for (l, e) in vec.iter_mut().enumerate().take(lanes) {
                                    *e = *src.add(l);
                                }
                            }
                            vec
                        },
                        |xi, vec| {
                            let dst = v_row.add(xi * block * c_all + c0);
                            for (l, e) in vec.iter().enumerate().take(lanes) {
                                *dst.add(l) = *e;
                            }
                        },
                    );
                }
                c_off += c_count;
            }
        }
        // Rows past the last tile only need to be finite (they are computed and dropped).
        for xi in 0..A * A {
            std::ptr::write_bytes(v.add((xi * block + n) * c_all), 0, (rows - n) * c_all);
        }

        // One matrix product per plane: M[ξ] = V[ξ] · U[ξ].
        for xi in 0..A * A {
            for p in 0..self.panels {
                let u = self.u.as_ptr().add((xi * self.panels + p) * c_all * NR);
                for r in (0..rows).step_by(MR) {
                    kernel::run(
                        c_all,
                        Rows {
                            v: v.add((xi * block + r) * c_all),
                            v_stride: c_all,
                            rows: MR,
                        },
                        u,
                        None,
                        Dst {
                            ptr: mbuf.add((xi * block + r) * kp + p * NR),
                            stride: kp,
                            lanes: NR,
                        },
                    );
                }
            }
        }

        // Output transform, bias, and the channel sums.
        for (r, t) in tiles.enumerate() {
            let y0 = t / geo.tiles_w * M;
            let x0 = t % geo.tiles_w * M;
            let ys = (geo.h - y0).min(M);
            let xs = (geo.w - x0).min(M);
            sums.pixels += ys * xs;
            let m_row = mbuf.add(r * kp);
            let mut k0 = 0;
            while k0 < self.k_out {
                let lanes = (self.k_out - k0).min(L);
                let bias = std::ptr::read_unaligned(self.bias.as_ptr().add(k0) as *const Vector);
                let mut s = [0f32; L];
                // the block's first pixel (the tile's (0, 0), always inside the image) is its shift
                let mut shift = [0f32; L];
                for (l, v) in shift.iter_mut().enumerate().take(lanes) {
                    *v = sums.shift[k0 + l];
                }
                output_tile::<M, A, T>(
                    |xi| std::ptr::read_unaligned(m_row.add(xi * block * kp + k0) as *const Vector),
                    |i, j, y| {
                        if i < ys && j < xs {
                            let px = lanes_of(|l| y[l] + bias[l]);
                            if r == 0 && i == 0 && j == 0 {
                                shift = px;
                            }
                            for l in 0..L {
                                s[l] += px[l] - shift[l];
                            }
                            let dst = out.add(((y0 + i) * geo.w + x0 + j) * self.k_out + k0);
                            if lanes == L {
                                std::ptr::write_unaligned(dst as *mut Vector, px);
                            } else {
                                for (l, e) in px.iter().enumerate().take(lanes) {
                                    *dst.add(l) = *e;
                                }
                            }
                        }
                    },
                );
                sums.shift[k0..k0 + lanes].copy_from_slice(&shift[..lanes]);
                for (total, &part) in sums.sum[k0..k0 + lanes].iter_mut().zip(&s) {
                    *total += part as f64;
                }
                k0 += L;
            }
        }
    }
}

isa_dispatch! {
/// One block of tiles of one convolution call.
///
/// # Safety
/// `job.out` must be valid for the whole output tensor, and no other thread may write the pixels of the job's
/// tiles.
unsafe fn run_block(conv: &Winograd, job: &Job, scratch: &mut Scratch, sums: &mut ChannelSums) {
    match conv.tile {
        Tile::F2 => conv.block_tiles::<2, 4, F2>(job, scratch, sums),
        Tile::F4 => conv.block_tiles::<4, 6, F4>(job, scratch, sums),
    }
}
}

/// One block of tiles of one convolution call.
struct Job<'a> {
    inputs: &'a [(&'a [f32], usize)],
    geo: &'a Geometry,
    tiles: std::ops::Range<usize>,
    /// rows of the scratch planes (the block size, a multiple of MR)
    block: usize,
    out: *mut f32,
}

struct Geometry {
    h: usize,
    w: usize,
    tiles_w: usize,
    tiles: usize,
}

/// A thread's V and M buffers, kept between calls (allocating and zeroing them per layer costs more than the
/// small layers' work). Nothing is read before it is written in a call, except V's padding rows, which each block
/// zeroes.
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

impl Scratch {
    fn take(v_len: usize, m_len: usize) -> ScratchGuard {
        let mut s = SCRATCH
            .with(|cell| cell.borrow_mut().take())
            .unwrap_or(Scratch {
                v: Vec::new(),
                m: Vec::new(),
            });
        if s.v.len() < v_len {
            s.v.resize(v_len, 0.0);
        }
        if s.m.len() < m_len {
            s.m.resize(m_len, 0.0);
        }
        ScratchGuard(Some(s))
    }
}

/// Gives the scratch back to its thread when the call is done.
struct ScratchGuard(Option<Scratch>);

impl std::ops::Deref for ScratchGuard {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        self.0.as_ref().expect("scratch present until drop")
    }
}

impl std::ops::DerefMut for ScratchGuard {
    fn deref_mut(&mut self) -> &mut Scratch {
        self.0.as_mut().expect("scratch present until drop")
    }
}

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        let scratch = self.0.take();
        SCRATCH.with(|cell| *cell.borrow_mut() = scratch);
    }
}

type Vector = [f32; L];

#[inline(always)]
fn lanes_of(f: impl Fn(usize) -> f32) -> Vector {
    let mut v = [0f32; L];
    for (l, x) in v.iter_mut().enumerate() {
        *x = f(l);
    }
    v
}

/// The 1D transforms of one Winograd variant, written out (the matrices have many zeros and ±1s).
trait Transforms<const M: usize, const A: usize> {
    /// `Bᵀ d` of one column of the input tile.
    fn input(d: &[Vector; A]) -> [Vector; A];
    /// `Aᵀ m` of one column of the product tile.
    fn output(m: &[Vector; A]) -> [Vector; M];
}

/// F(2 × 2, 3 × 3), points (0, 1, −1, ∞).
struct F2;

impl Transforms<2, 4> for F2 {
    #[inline(always)]
    fn input(d: &[Vector; 4]) -> [Vector; 4] {
        [
            lanes_of(|l| d[0][l] - d[2][l]),
            lanes_of(|l| d[1][l] + d[2][l]),
            lanes_of(|l| d[2][l] - d[1][l]),
            lanes_of(|l| d[1][l] - d[3][l]),
        ]
    }
    #[inline(always)]
    fn output(m: &[Vector; 4]) -> [Vector; 2] {
        [
            lanes_of(|l| m[0][l] + m[1][l] + m[2][l]),
            lanes_of(|l| m[1][l] - m[2][l] - m[3][l]),
        ]
    }
}

/// F(4 × 4, 3 × 3), points (0, 1, −1, 2, −2, ∞).
struct F4;

impl Transforms<4, 6> for F4 {
    #[inline(always)]
    fn input(d: &[Vector; 6]) -> [Vector; 6] {
        let a = lanes_of(|l| d[4][l] - 4.0 * d[2][l]);
        let b = lanes_of(|l| d[3][l] - 4.0 * d[1][l]);
        let c = lanes_of(|l| d[4][l] - d[2][l]);
        let e = lanes_of(|l| 2.0 * (d[3][l] - d[1][l]));
        [
            lanes_of(|l| 4.0 * d[0][l] - 5.0 * d[2][l] + d[4][l]),
            lanes_of(|l| a[l] + b[l]),
            lanes_of(|l| a[l] - b[l]),
            lanes_of(|l| c[l] + e[l]),
            lanes_of(|l| c[l] - e[l]),
            lanes_of(|l| 4.0 * d[1][l] - 5.0 * d[3][l] + d[5][l]),
        ]
    }
    #[inline(always)]
    fn output(m: &[Vector; 6]) -> [Vector; 4] {
        let s12 = lanes_of(|l| m[1][l] + m[2][l]);
        let d12 = lanes_of(|l| m[1][l] - m[2][l]);
        let s34 = lanes_of(|l| m[3][l] + m[4][l]);
        let d34 = lanes_of(|l| m[3][l] - m[4][l]);
        [
            lanes_of(|l| m[0][l] + s12[l] + s34[l]),
            lanes_of(|l| d12[l] + 2.0 * d34[l]),
            lanes_of(|l| s12[l] + 4.0 * s34[l]),
            lanes_of(|l| d12[l] + 8.0 * d34[l] + m[5][l]),
        ]
    }
}

/// `V = Bᵀ d B` of one tile: `load(i, j)` gives the input vector at tile row i, column j; `store(ξ, v)` takes
/// plane ξ = i·A + j of the result.
#[inline(always)]
fn input_tile<const M: usize, const A: usize, T: Transforms<M, A>>(
    load: impl Fn(usize, usize) -> Vector,
    mut store: impl FnMut(usize, &Vector),
) {
    let mut tmp = [[[0f32; L]; A]; A];
    for j in 0..A {
        let col: [Vector; A] = std::array::from_fn(|i| load(i, j));
        for (row, v) in tmp.iter_mut().zip(T::input(&col)) {
            row[j] = v;
        }
    }
    for (i, row) in tmp.iter().enumerate() {
        for (j, v) in T::input(row).iter().enumerate() {
            store(i * A + j, v);
        }
    }
}

/// `Y = Aᵀ m A` of one tile: `load(ξ)` gives plane ξ of the product; `store(i, j, y)` takes output pixel (i, j).
#[inline(always)]
fn output_tile<const M: usize, const A: usize, T: Transforms<M, A>>(
    load: impl Fn(usize) -> Vector,
    mut store: impl FnMut(usize, usize, &Vector),
) {
    let mut tmp = [[[0f32; L]; A]; M];
    for j in 0..A {
        let col: [Vector; A] = std::array::from_fn(|i| load(i * A + j));
        for (row, v) in tmp.iter_mut().zip(T::output(&col)) {
            row[j] = v;
        }
    }
    for (i, row) in tmp.iter().enumerate() {
        for (j, y) in T::output(row).iter().enumerate() {
            store(i, j, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fast::test_support::{direct_conv, values};

    #[test]
    fn convolutions_match_the_direct_sum_on_odd_sizes_and_concatenated_inputs() {
        // 19 x 22 is not a multiple of either tile; 3 + 20 channels (Winograd) exercise partial lanes and two
        // inputs, 2 + 3 channels take the direct path; 40 outputs leave a partial weight panel.
        for (c1, c2) in [(3, 20), (2, 3)] {
            check_conv(19, 22, c1, c2, 40);
        }
    }

    fn check_conv(h: usize, w: usize, c1: usize, c2: usize, k: usize) {
        let a = values(h * w * c1, 1);
        let b = values(h * w * c2, 2);
        let wt = values(k * (c1 + c2) * 9, 3);
        let bias = values(k, 4);
        // the reference sees the concatenation
        let mut cat = vec![0f32; h * w * (c1 + c2)];
        for p in 0..h * w {
            cat[p * (c1 + c2)..][..c1].copy_from_slice(&a[p * c1..][..c1]);
            cat[p * (c1 + c2) + c1..][..c2].copy_from_slice(&b[p * c2..][..c2]);
        }
        let want = direct_conv(&cat, [h, w, c1 + c2], &wt, &bias, k, |v| v as f64);
        for threads in [1, 2] {
            let par = Parallel::new(threads);
            for tile in [Tile::F2, Tile::F4] {
                let conv = Conv3x3::new(Method::Winograd(tile), &wt, &bias, k, c1 + c2);
                let mut out = vec![f32::NAN; h * w * k];
                let means = conv.run(&[(&a, c1), (&b, c2)], h, w, &mut out, &par).mean;
                let what = format!(
                    "{} ({c1} + {c2} channels), {threads} threads",
                    conv.algorithm()
                );
                let max = want
                    .iter()
                    .zip(&out)
                    .map(|(w, g)| (w - *g as f64).abs())
                    .fold(0f64, f64::max);
                assert!(max < 2e-4, "{what}: max |diff| {max}");
                for kk in 0..k {
                    let n = (h * w) as f64;
                    let mean: f64 = (0..h * w).map(|p| out[p * k + kk] as f64).sum::<f64>() / n;
                    let err = (means[kk] - mean).abs();
                    assert!(err < 1e-6 * (1.0 + mean.abs()), "{what}: mean {kk}");
                }
            }
        }
    }
}
