//! 3 × 3 and 2 × 2 transposed convolutions in bfloat16 with float32 accumulation, computed directly: the nine
//! taps of a 3 × 3 convolution are nine shifted matrix products of the (zero-padded, bfloat16) input with the
//! tap's weights, accumulated in place; the four positions of a transposed convolution are four products.
//!
//! On a CPU with AMX the products run on its tiles: a block of 32 output pixels × 32 output channels is four
//! 16 × 16 float32 tiles, and each step over 32 input channels of one tap loads two input tiles (16 pixels × 32
//! channels, read straight from the padded NHWC input) and two weight tiles and issues four `tdpbf16ps`. Where
//! only AVX-512-BF16 is present, `vdpbf16ps` computes the same block 14 pixels at a time. A portable version of
//! the same arithmetic serves the tests everywhere. With products this cheap, Winograd's transforms would cost
//! more than the multiplies they save, so there are none: the input is converted once, and the output is written
//! once, with the bias and the instance norm's mean and variance.
//!
//! The input and weights are rounded to bfloat16 (8 significant bits, round to nearest even); every product is
//! exact in float32 and every sum is float32. That costs the network's logits a few 1e-2 against the exact
//! model (at most 0.081 on the golden inputs; `tests/model_parity.rs` holds the bound of 0.25 and the masks).

use std::sync::OnceLock;

use super::parallel::{Parallel, SyncPtr};

/// Input channels per step (one AMX tile row of bfloat16), and output channels per weight panel.
const CB: usize = 32;
/// Pixels past a padded row's end that a block may read (computed and dropped).
const SLACK: usize = 32;

/// How the bfloat16 products are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Isa {
    /// Plain float32 arithmetic on bfloat16 values (tests, comparisons).
    Portable,
    /// AVX-512-BF16 dot products (`vdpbf16ps`), 14 pixels × 32 channels at a time.
    Avx512Bf16,
    /// AMX tiles (`tdpbf16ps`), 32 pixels × 32 channels at a time.
    Amx,
}

impl Bf16Isa {
    /// Output pixels per block.
    fn pixels(self) -> usize {
        match self {
            Bf16Isa::Amx => 32,
            Bf16Isa::Avx512Bf16 => 14,
            Bf16Isa::Portable => 16,
        }
    }
}

/// The best bfloat16 hardware of this CPU, if any: AMX (once Linux has granted this process the tile data
/// state), else AVX-512-BF16. `DEEPGROW_FAST_ISA=avx512bf16` leaves AMX unused, and a lower value (`avx512`,
/// `avx2`, `portable`) both, so that every code path can be tested and compared on one machine.
pub fn hardware() -> Option<Bf16Isa> {
    static ISA: OnceLock<Option<Bf16Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("DEEPGROW_FAST_ISA").unwrap_or_default();
        let (allow_amx, allow_dot) = match cap.as_str() {
            "avx512bf16" => (false, true),
            "avx512" | "avx2" | "portable" => (false, false),
            _ => (true, true),
        };
        if allow_amx && x86::amx_usable() {
            Some(Bf16Isa::Amx)
        } else if allow_dot && x86::avx512_bf16() {
            Some(Bf16Isa::Avx512Bf16)
        } else {
            None
        }
    })
}

/// float32 → bfloat16, rounding to nearest even (what `vcvtne2ps2bf16` does for finite values).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// A matrix product `out[p][k] = bias[k] + Σ_j a[p][j] · w[k][j]` over rows of bfloat16 `a`, with bfloat16
/// weights packed for the block kernels: `w[panel][kb][half][pair][16][2]`, i.e. per (panel of 32 outputs,
/// block `kb` of 32 `j`) two 16 × 32 AMX weight tiles (outputs 0-15 and 16-31 of the panel, `j` pairs as rows).
/// Each block of `j` reads its own input tile, so that one product serves the convolution's nine shifted taps
/// as well as plain rows.
#[derive(Debug)]
pub struct ProductBf16 {
    isa: Bf16Isa,
    /// Blocks of 32 along `j`.
    blocks: usize,
    k_out: usize,
    panels: usize,
    w: Vec<u16>,
    /// Zero-padded to whole panels.
    bias: Vec<f32>,
}

impl ProductBf16 {
    /// `weight(k, j)` for `k < k_out`, `j < depth`.
    pub fn new(
        isa: Bf16Isa,
        k_out: usize,
        depth: usize,
        weight: impl Fn(usize, usize) -> f32,
        bias: &[f32],
    ) -> Self {
        assert_eq!(bias.len(), k_out);
        let blocks = depth.div_ceil(CB);
        let panels = k_out.div_ceil(CB);
        let mut w = vec![0u16; panels * blocks * 2 * 16 * CB];
        for k in 0..k_out {
            let (p, half, n) = (k / CB, k % CB / 16, k % 16);
            for j in 0..depth {
                let (kb, pair, e) = (j / CB, j % CB / 2, j % 2);
                w[((((p * blocks + kb) * 2 + half) * 16 + pair) * 16 + n) * 2 + e] =
                    to_bf16(weight(k, j));
            }
        }
        let mut padded_bias = bias.to_vec();
        padded_bias.resize(panels * CB, 0.0);
        ProductBf16 {
            isa,
            blocks,
            k_out,
            panels,
            w,
            bias: padded_bias,
        }
    }

    pub fn isa(&self) -> Bf16Isa {
        self.isa
    }

    pub fn k_out(&self) -> usize {
        self.k_out
    }

    /// The two weight tiles of (panel, block).
    #[inline(always)]
    fn weights(&self, p: usize, kb: usize) -> *const u16 {
        self.w[(p * self.blocks + kb) * 2 * 16 * CB..].as_ptr()
    }

    pub fn panels(&self) -> usize {
        self.panels
    }

    /// Output rows `0..rows` (bias added) into `dst + r · dst_stride`, every panel. Row `r`'s input for block
    /// `kb` is at `a(kb) + r · a_stride`, and must be readable for `r` up to the block kernel's pixels past
    /// `rows` (computed and dropped).
    ///
    /// # Safety
    /// The inputs as above, `dst` valid for `rows` rows of `k_out` floats, and on AMX the calling thread's
    /// tiles configured ([`Tiles::configure`]).
    pub unsafe fn rows(
        &self,
        rows: usize,
        a: impl Fn(usize) -> *const u16,
        a_stride: usize,
        dst: *mut f32,
        dst_stride: usize,
    ) {
        for p in 0..self.panels {
            let dst = Rows {
                ptr: dst,
                stride: dst_stride,
            };
            self.panel_rows(p, rows, &a, a_stride, dst, None);
        }
    }

    /// [`Self::rows`] for the outputs of panel `p` alone; with `moments`, the outputs' per-channel sums and
    /// sums of squares are added to it as they are written.
    ///
    /// # Safety
    /// As for [`Self::rows`].
    pub unsafe fn panel_rows(
        &self,
        p: usize,
        rows: usize,
        a: impl Fn(usize) -> *const u16,
        a_stride: usize,
        dst: Rows,
        mut moments: Option<&mut PanelMoments>,
    ) {
        let Rows {
            ptr: dst,
            stride: dst_stride,
        } = dst;
        let pixels = self.isa.pixels();
        let mut block = [0f32; 32 * CB];
        let lanes = (self.k_out - p * CB).min(CB);
        let bias = self.bias[p * CB..][..CB].as_ptr();
        let w = |kb: usize| self.weights(p, kb);
        let mut r0 = 0;
        while r0 < rows {
            let n = pixels.min(rows - r0);
            let a0 = |kb: usize| a(kb).add(r0 * a_stride);
            let out = dst.add(r0 * dst_stride + p * CB);
            // a whole block writes the output in place; a partial one goes through `block`
            let direct = n == pixels && lanes == CB;
            let (target, target_stride) = if direct {
                (out, dst_stride)
            } else {
                (block.as_mut_ptr(), CB)
            };
            match self.isa {
                #[cfg(target_arch = "x86_64")]
                Bf16Isa::Amx => {
                    // the next block's input, while this one computes
                    let next = a(0).add((r0 + pixels) * a_stride);
                    x86::amx_block(
                        self.blocks,
                        a0,
                        a_stride,
                        w,
                        bias,
                        next,
                        target,
                        target_stride,
                    )
                }
                #[cfg(target_arch = "x86_64")]
                Bf16Isa::Avx512Bf16 => {
                    x86::dot_block(self.blocks, a0, a_stride, w, bias, target, target_stride)
                }
                _ => portable_block(self.blocks, a0, a_stride, w, bias, target, target_stride),
            }
            if !direct {
                for r in 0..n {
                    std::ptr::copy_nonoverlapping(
                        block.as_ptr().add(r * CB),
                        out.add(r * dst_stride),
                        lanes,
                    );
                }
            }
            if let Some(moments) = moments.as_deref_mut() {
                moments.add(out, n, dst_stride, lanes);
            }
            r0 += pixels;
        }
    }
}

/// Where a product's output rows go: row `r` at `ptr + r · stride`.
#[derive(Clone, Copy)]
pub struct Rows {
    pub ptr: *mut f32,
    pub stride: usize,
}

/// Per-channel sums of one panel's outputs, for the instance norm: sums of `x − shift` and of `(x − shift)²`
/// (`shift` the first pixel, so that the float32 partial sums work at the channel's own level), in f64.
#[derive(Debug, Clone)]
pub struct PanelMoments {
    panel: usize,
    pixels: usize,
    shift: [f32; CB],
    sum: [f64; CB],
    squares: [f64; CB],
}

impl PanelMoments {
    pub fn new(panel: usize) -> Self {
        PanelMoments {
            panel,
            pixels: 0,
            shift: [0.0; CB],
            sum: [0.0; CB],
            squares: [0.0; CB],
        }
    }

    /// Adds `n` pixels at `out`, `stride` floats apart, `lanes` channels each.
    unsafe fn add(&mut self, out: *const f32, n: usize, stride: usize, lanes: usize) {
        if self.pixels == 0 {
            std::ptr::copy_nonoverlapping(out, self.shift.as_mut_ptr(), lanes);
        }
        self.pixels += n;
        let (mut s, mut q) = ([0f32; CB], [0f32; CB]);
        if lanes == CB {
            accumulate(out, n, stride, &self.shift, &mut s, &mut q);
        } else {
            for r in 0..n {
                let px = std::slice::from_raw_parts(out.add(r * stride), lanes);
                for l in 0..lanes {
                    let d = px[l] - self.shift[l];
                    s[l] += d;
                    q[l] += d * d;
                }
            }
        }
        for l in 0..lanes {
            self.sum[l] += s[l] as f64;
            self.squares[l] += q[l] as f64;
        }
    }

    /// Mean and (population) variance per channel of all the parts together.
    pub fn moments(parts: &[PanelMoments], channels: usize) -> (Vec<f64>, Vec<f64>) {
        let mut mean = vec![0f64; channels];
        let mut var = vec![0f64; channels];
        for (c, (m, v)) in mean.iter_mut().zip(&mut var).enumerate() {
            let (p, l) = (c / CB, c % CB);
            let n: usize = parts
                .iter()
                .filter(|part| part.panel == p)
                .map(|part| part.pixels)
                .sum();
            let n = n.max(1) as f64;
            // Σ over parts with different shifts: E[x] and E[x²] about a common point (the first part's shift)
            let origin = parts
                .iter()
                .find(|part| part.panel == p)
                .map_or(0.0, |part| part.shift[l] as f64);
            let (mut s1, mut s2) = (0f64, 0f64);
            for part in parts.iter().filter(|part| part.panel == p) {
                let delta = part.shift[l] as f64 - origin;
                let k = part.pixels as f64;
                s1 += part.sum[l] + k * delta;
                s2 += part.squares[l] + 2.0 * delta * part.sum[l] + k * delta * delta;
            }
            *m = origin + s1 / n;
            *v = (s2 / n - (s1 / n).powi(2)).max(0.0);
        }
        (mean, var)
    }
}

super::kernel::isa_dispatch! {
/// `s += px − shift`, `q += (px − shift)²`, lane by lane, over `n` pixels of `CB` floats at `out`, `stride`
/// floats apart.
///
/// # Safety
/// `out` must be valid for `n` such pixels.
unsafe fn accumulate(out: *const f32, n: usize, stride: usize, shift: &[f32; CB], s: &mut [f32; CB], q: &mut [f32; CB]) {
    let (mut sv, mut qv) = (*s, *q);
    for r in 0..n {
        let px = &*(out.add(r * stride) as *const [f32; CB]);
        for l in 0..CB {
            let d = px[l] - shift[l];
            sv[l] += d;
            qv[l] += d * d;
        }
    }
    *s = sv;
    *q = qv;
}
}

/// The portable block: 16 rows × 32 outputs, bias included, into `target + r · target_stride`, in float32
/// arithmetic in the order the hardware sums.
unsafe fn portable_block(
    blocks: usize,
    a: impl Fn(usize) -> *const u16,
    a_stride: usize,
    w: impl Fn(usize) -> *const u16,
    bias: *const f32,
    target: *mut f32,
    target_stride: usize,
) {
    let rows = Bf16Isa::Portable.pixels();
    let mut block = [[0f32; CB]; 16];
    for row in block.iter_mut() {
        std::ptr::copy_nonoverlapping(bias, row.as_mut_ptr(), CB);
    }
    for kb in 0..blocks {
        let (input, weights) = (a(kb), w(kb));
        for (r, row) in block.iter_mut().enumerate().take(rows) {
            for pair in 0..CB / 2 {
                let at = input.add(r * a_stride + 2 * pair);
                let (x0, x1) = (from_bf16(*at), from_bf16(*at.add(1)));
                for (k, out) in row.iter_mut().enumerate() {
                    let (half, n) = (k / 16, k % 16);
                    let at = weights.add(((half * 16 + pair) * 16 + n) * 2);
                    *out += x0 * from_bf16(*at) + x1 * from_bf16(*at.add(1));
                }
            }
        }
    }
    for (r, row) in block.iter().enumerate() {
        std::ptr::copy_nonoverlapping(row.as_ptr(), target.add(r * target_stride), CB);
    }
}

/// A 3 × 3 convolution (stride 1, zero padding 1) as one [`ProductBf16`] over its nine taps, which read the
/// zero-padded input shifted in place (`j = tap · c_pad + c`). The first layer (3 input channels) stays in
/// float32 (`winograd::Conv3x3`): rounding the CT itself to bfloat16 cost a head CT angiography case a mask
/// Dice of 0.9937 against the exact model, where every later layer in bfloat16 keeps it at 0.9998.
#[derive(Debug)]
pub struct DirectBf16 {
    c_in: usize,
    /// The input row's channels in the converted buffer: c_in rounded up to whole blocks.
    c_pad: usize,
    product: ProductBf16,
}

impl DirectBf16 {
    /// `weights` is ONNX's `[k_out][c_in][3][3]`, `bias` has `k_out` values.
    pub fn new(isa: Bf16Isa, weights: &[f32], bias: &[f32], k_out: usize, c_in: usize) -> Self {
        assert_eq!(weights.len(), k_out * c_in * 9);
        let c_pad = c_in.div_ceil(CB) * CB;
        let weight = |k: usize, j: usize| {
            let (tap, c) = (j / c_pad, j % c_pad);
            if c < c_in {
                weights[(k * c_in + c) * 9 + tap]
            } else {
                0.0
            }
        };
        DirectBf16 {
            c_in,
            c_pad,
            product: ProductBf16::new(isa, k_out, 9 * c_pad, weight, bias),
        }
    }

    pub fn k_out(&self) -> usize {
        self.product.k_out
    }

    pub fn c_in(&self) -> usize {
        self.c_in
    }

    pub fn isa(&self) -> Bf16Isa {
        self.product.isa
    }

    /// Convolves the channel-concatenation of `inputs` (each NHWC `h × w × channels`) into `out` (NHWC
    /// `h × w × k_out`), bias included; returns the output's per-channel mean and variance.
    pub(super) fn run(
        &self,
        inputs: &[(&[f32], usize)],
        h: usize,
        w: usize,
        out: &mut [f32],
        par: &Parallel,
    ) -> (Vec<f64>, Vec<f64>) {
        let k_out = self.k_out();
        let c_pad = self.c_pad;
        // padded rows of (w + 2 + SLACK) pixels
        let (rows, row_px) = (h + 2, w + 2 + SLACK);
        let mut x = Converted::take(rows * row_px * c_pad);
        let x_ptr = SyncPtr(x.0.as_mut_ptr());
        par.for_each(rows, |r| {
            // SAFETY: one converted row per block.
            let row = unsafe {
                std::slice::from_raw_parts_mut(x_ptr.get().add(r * row_px * c_pad), row_px * c_pad)
            };
            fill_padded(inputs, w, c_pad, (1..=h).contains(&r).then(|| r - 1), row);
        });
        let x = &x.0;
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let blocks_per_tap = c_pad / CB;
        // One range of rows per thread, panels outermost: a panel's weights (up to 9 × 16 blocks of 2 KiB for
        // 512 channels) are read from memory once per range, not once per row.
        let ranges = par.threads().min(h).max(1);
        let range = |b: usize| (b * h / ranges)..((b + 1) * h / ranges);
        let parts = par.map_blocks(
            ranges,
            || Tiles::configure(self.isa()),
            |_, b| {
                let rows = range(b);
                let mut moments: Vec<PanelMoments> =
                    (0..self.product.panels()).map(PanelMoments::new).collect();
                // SAFETY: these rows of the output belong to this block; the converted rows hold every input
                // the rows' blocks read (SLACK pixels past each row's end).
                unsafe {
                    for (p, moments) in moments.iter_mut().enumerate() {
                        for y in rows.clone() {
                            let dst = Rows {
                                ptr: out_ptr.get().add(y * w * k_out),
                                stride: k_out,
                            };
                            let input = |kb: usize| {
                                let (tap, b) = (kb / blocks_per_tap, kb % blocks_per_tap);
                                let (dy, dx) = (tap / 3, tap % 3);
                                x.as_ptr().add(((y + dy) * row_px + dx) * c_pad + b * CB)
                            };
                            self.product
                                .panel_rows(p, w, input, c_pad, dst, Some(moments));
                        }
                    }
                }
                moments
            },
        );
        let parts: Vec<PanelMoments> = parts.into_iter().flatten().collect();
        PanelMoments::moments(&parts, k_out)
    }
}

/// A 2 × 2 transposed convolution with stride 2 in bfloat16: one product per kernel position over the input's
/// pixels, each writing its own pixel of every 2 × 2 output block.
#[derive(Debug)]
pub struct Upsample2x2Bf16 {
    c_in: usize,
    c_pad: usize,
    /// Kernel positions (0,0), (0,1), (1,0), (1,1).
    taps: [ProductBf16; 4],
}

impl Upsample2x2Bf16 {
    /// `w` is ONNX ConvTranspose's `[c_in][k_out][2][2]` (group 1).
    pub fn new(isa: Bf16Isa, w: &[f32], bias: &[f32], c_in: usize, k_out: usize) -> Self {
        assert_eq!(w.len(), c_in * k_out * 4);
        let tap =
            |t: usize| ProductBf16::new(isa, k_out, c_in, |k, c| w[(c * k_out + k) * 4 + t], bias);
        Upsample2x2Bf16 {
            c_in,
            c_pad: c_in.div_ceil(CB) * CB,
            taps: [tap(0), tap(1), tap(2), tap(3)],
        }
    }

    pub fn k_out(&self) -> usize {
        self.taps[0].k_out
    }

    pub fn c_in(&self) -> usize {
        self.c_in
    }

    /// `x` is `h × w × c_in`, `out` is `2h × 2w × k_out`.
    pub fn run(&self, x: &[f32], h: usize, w: usize, out: &mut [f32], par: &Parallel) {
        let k = self.k_out();
        let c_pad = self.c_pad;
        assert_eq!(x.len(), h * w * self.c_in);
        assert_eq!(out.len(), 4 * h * w * k);
        let row_px = w + SLACK;
        let mut converted = Converted::take(h * row_px * c_pad);
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let x_ptr = SyncPtr(converted.0.as_mut_ptr());
        par.map_blocks(
            h,
            || Tiles::configure(self.taps[0].isa),
            |_, y| {
                // SAFETY: input row y is converted and read by this block alone, and owns output rows 2y and
                // 2y + 1.
                unsafe {
                    let row = std::slice::from_raw_parts_mut(
                        x_ptr.get().add(y * row_px * c_pad),
                        row_px * c_pad,
                    );
                    fill_padded(&[(x, self.c_in)], w, c_pad, Some(y), row);
                    // fill_padded leaves a zero pixel in front of the row's first one
                    let input = row.as_ptr().add(c_pad);
                    for (t, tap) in self.taps.iter().enumerate() {
                        let (i, j) = (t / 2, t % 2);
                        let dst = out_ptr.get().add(((2 * y + i) * 2 * w + j) * k);
                        tap.rows(w, |kb| input.add(kb * CB), c_pad, dst, 2 * k);
                    }
                }
            },
        );
    }
}

super::kernel::isa_dispatch! {
/// Row `y` of the channel-concatenation of `inputs` in the padded bfloat16 layout: a zero pixel, the row's
/// pixels (channels zero-padded to `c_pad`), zero pixels to the end; all zeros for a border row (`None`).
fn fill_padded(inputs: &[(&[f32], usize)], w: usize, c_pad: usize, y: Option<usize>, row: &mut [u16]) {
    let Some(y) = y else {
        row.fill(0);
        return;
    };
    row[..c_pad].fill(0);
    row[(w + 1) * c_pad..].fill(0);
    if let [(data, c)] = inputs {
        if *c == c_pad {
            // one input filling whole blocks: the row converts as one run
            for (d, &s) in row[c_pad..(w + 1) * c_pad].iter_mut().zip(&data[y * w * c..][..w * c]) {
                *d = to_bf16(s);
            }
            return;
        }
    }
    for x in 0..w {
        let px = &mut row[(x + 1) * c_pad..][..c_pad];
        let mut offset = 0;
        for &(data, c) in inputs {
            for (d, &s) in px[offset..offset + c].iter_mut().zip(&data[(y * w + x) * c..][..c]) {
                *d = to_bf16(s);
            }
            offset += c;
        }
        px[offset..].fill(0);
    }
}
}

/// The calling thread's buffer for converted inputs, kept from one layer to the next of a network run
/// (allocating it per layer costs more than the small layers' work) and dropped by [`release_buffers`] when the
/// run is done, so that a pool of threads taking turns at inference holds one buffer per run in flight, not one
/// per thread. It never shrinks within a run, so that alternating layer sizes do not zero it again and again;
/// every element a call reads, the call writes first.
struct Converted(Vec<u16>);

thread_local! {
    static CONVERTED: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Converted {
    fn take(len: usize) -> Self {
        let mut buffer = CONVERTED.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
        if buffer.len() < len {
            buffer.resize(len, 0);
        }
        Converted(buffer)
    }
}

impl Drop for Converted {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.0);
        CONVERTED.with(|cell| *cell.borrow_mut() = buffer);
    }
}

/// Frees the calling thread's buffer of converted inputs; the engine calls it after each network run.
pub fn release_buffers() {
    CONVERTED.with(|cell| drop(std::mem::take(&mut *cell.borrow_mut())));
}

/// A thread's AMX tile configuration for the blocks it runs (eight 16 × 64-byte tiles), released after them.
struct Tiles(bool);

impl Tiles {
    fn configure(isa: Bf16Isa) -> Self {
        #[cfg(target_arch = "x86_64")]
        if isa == Bf16Isa::Amx {
            // SAFETY: hardware() saw AMX and Linux's permission for this process.
            unsafe { x86::load_tile_config() };
            return Tiles(true);
        }
        let _ = isa;
        Tiles(false)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if self.0 {
            // SAFETY: the tiles were configured by this thread.
            unsafe { x86::release_tiles() };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub fn amx_usable() -> bool {
        false
    }
    pub fn avx512_bf16() -> bool {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::CB;

    pub fn avx512_bf16() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }

    /// AMX-TILE and AMX-BF16 in CPUID, and Linux's permission for this process to use the tile data state.
    pub fn amx_usable() -> bool {
        let leaf7 = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        amx_bf16 && amx_tile && request_tile_permission()
    }

    #[cfg(target_os = "linux")]
    fn request_tile_permission() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes this process's permitted xsave features.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tile_permission() -> bool {
        false
    }

    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    /// Tiles 0-3: the 16 × 16 float32 accumulators; 4-5: input tiles; 6-7: weight tiles.
    pub unsafe fn load_tile_config() {
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            config.bytes_per_row[t] = 64;
            config.rows[t] = 16;
        }
        asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
    }

    pub unsafe fn release_tiles() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// 32 rows × 32 outputs, `bias` (32 floats) included, into `target + r · target_stride`: block `kb`'s
    /// input tiles at `a(kb)` and `a(kb) + 16 · a_stride`, its weight tiles at `w(kb)`. The 32 rows at `next`
    /// (one 64-byte line each, the next block's first input block) are prefetched.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub unsafe fn amx_block(
        blocks: usize,
        a: impl Fn(usize) -> *const u16,
        a_stride: usize,
        w: impl Fn(usize) -> *const u16,
        bias: *const f32,
        next: *const u16,
        target: *mut f32,
        target_stride: usize,
    ) {
        let input_stride = a_stride * 2;
        for r in 0..32 {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * a_stride) as *const i8);
        }
        // every row of an accumulator starts as the bias (a stride of 0 repeats one row)
        asm!(
            "tileloadd tmm0, [{b0} + {zero}*1]",
            "tileloadd tmm1, [{b1} + {zero}*1]",
            "tileloadd tmm2, [{b0} + {zero}*1]",
            "tileloadd tmm3, [{b1} + {zero}*1]",
            b0 = in(reg) bias,
            b1 = in(reg) bias.add(16),
            zero = in(reg) 0usize,
            options(nostack, readonly)
        );
        for kb in 0..blocks {
            let a0 = a(kb);
            let a1 = a0.add(16 * a_stride);
            let w0 = w(kb);
            let w1 = w0.add(16 * CB);
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{w0} + {sw}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{w1} + {sw}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                w0 = in(reg) w0,
                w1 = in(reg) w1,
                sa = in(reg) input_stride,
                sw = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) target,
            c1 = in(reg) target.add(16),
            c2 = in(reg) target.add(16 * target_stride),
            c3 = in(reg) target.add(16 * target_stride + 16),
            s = in(reg) target_stride * 4,
            options(nostack)
        );
    }

    /// 14 rows × 32 outputs, bias included, into `target + r · target_stride`, as [`amx_block`] reads them.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dot_block(
        blocks: usize,
        a: impl Fn(usize) -> *const u16,
        a_stride: usize,
        w: impl Fn(usize) -> *const u16,
        bias: *const f32,
        target: *mut f32,
        target_stride: usize,
    ) {
        const R: usize = 14;
        let mut acc = [[_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16))]; R];
        for kb in 0..blocks {
            let (input, weights) = (a(kb), w(kb));
            for pair in 0..CB / 2 {
                let u0: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                    weights.add(pair * 32) as *const __m512i
                ));
                let u1: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                    weights.add(16 * CB + pair * 32) as *const __m512i,
                ));
                let at = input.add(2 * pair);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                        std::ptr::read_unaligned(at.add(r * a_stride) as *const i32),
                    ));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, u0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, u1);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(target.add(r * target_stride), acc[0]);
            _mm512_storeu_ps(target.add(r * target_stride + 16), acc[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fast::test_support::{direct_conv, values};

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to the even one, 1
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
    }

    /// The paths this machine can run.
    fn paths() -> Vec<Bf16Isa> {
        let mut paths = vec![Bf16Isa::Portable];
        if x86::avx512_bf16() {
            paths.push(Bf16Isa::Avx512Bf16);
        }
        if hardware() == Some(Bf16Isa::Amx) {
            paths.push(Bf16Isa::Amx);
        }
        paths
    }

    #[test]
    fn every_path_matches_the_rounded_direct_sum() {
        // 19 x 37 is not a multiple of any block's pixels; 20 + 25 channels are two concatenated inputs that do
        // not fill whole blocks of 32; 40 outputs leave a partial panel; a single input of 32 channels converts
        // as one run per row, and 64 outputs are whole panels, stored in place.
        check_conv(19, 37, 20, 25, 40);
        check_conv(9, 70, 32, 0, 64);
    }

    fn check_conv(h: usize, w: usize, c1: usize, c2: usize, k: usize) {
        let a = values(h * w * c1, 1);
        let b = values(h * w * c2, 2);
        let wt = values(k * (c1 + c2) * 9, 3);
        let bias = values(k, 4);
        let mut cat = vec![0f32; h * w * (c1 + c2)];
        for p in 0..h * w {
            cat[p * (c1 + c2)..][..c1].copy_from_slice(&a[p * c1..][..c1]);
            cat[p * (c1 + c2) + c1..][..c2].copy_from_slice(&b[p * c2..][..c2]);
        }
        // the reference sees the concatenation, rounded as the kernels round it
        let round = |v: f32| from_bf16(to_bf16(v)) as f64;
        let want = direct_conv(&cat, [h, w, c1 + c2], &wt, &bias, k, round);
        for isa in paths() {
            for threads in [1, 2] {
                let conv = DirectBf16::new(isa, &wt, &bias, k, c1 + c2);
                let what = format!("{isa:?}, {c1} + {c2} channels, {threads} threads");
                let mut out = vec![f32::NAN; h * w * k];
                let inputs: Vec<(&[f32], usize)> = if c2 == 0 {
                    vec![(&a, c1)]
                } else {
                    vec![(&a, c1), (&b, c2)]
                };
                let (means, variances) = conv.run(&inputs, h, w, &mut out, &Parallel::new(threads));
                let max = want
                    .iter()
                    .zip(&out)
                    .map(|(w, g)| (w - *g as f64).abs())
                    .fold(0f64, f64::max);
                // float32 sums of up to 405 exact products of size ~1
                assert!(max < 1e-4, "{what}: max |diff| {max}");
                for kk in 0..k {
                    let values: Vec<f64> = (0..h * w).map(|p| out[p * k + kk] as f64).collect();
                    let mean = values.iter().sum::<f64>() / values.len() as f64;
                    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>()
                        / values.len() as f64;
                    assert!(
                        (means[kk] - mean).abs() < 1e-6 * (1.0 + mean.abs()),
                        "{what}: mean {kk}"
                    );
                    assert!(
                        (variances[kk] - var).abs() < 1e-5 * var,
                        "{what}: variance {kk}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_transposed_convolution_matches_the_rounded_sum_on_every_path() {
        let (h, w, c, k) = (5, 37, 19, 64);
        let x = values(h * w * c, 1);
        let wt = values(c * k * 4, 2);
        let b = values(k, 3);
        let r = |v: f32| from_bf16(to_bf16(v)) as f64;
        for isa in paths() {
            let up = Upsample2x2Bf16::new(isa, &wt, &b, c, k);
            for threads in [1, 2] {
                let mut out = vec![f32::NAN; 4 * h * w * k];
                up.run(&x, h, w, &mut out, &Parallel::new(threads));
                for y in 0..2 * h {
                    for xx in 0..2 * w {
                        for kk in 0..k {
                            let (sy, sx, i, j) = (y / 2, xx / 2, y % 2, xx % 2);
                            let want = b[kk] as f64
                                + (0..c)
                                    .map(|cc| {
                                        r(x[(sy * w + sx) * c + cc])
                                            * r(wt[((cc * k + kk) * 2 + i) * 2 + j])
                                    })
                                    .sum::<f64>();
                            let got = out[(y * 2 * w + xx) * k + kk] as f64;
                            assert!(
                                (got - want).abs() < 1e-5,
                                "{isa:?} ({y},{xx},{kk}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
