//! The one matrix-multiply micro-kernel every fast op runs: a block of `MR` rows by 32 output channels,
//! `dst[t][0..32] = bias + Σ_c v[t][c] · u[c][0..32]`, with `u` a packed panel of 32 output channels.
//!
//! Rows of `v` are read with a stride (rows of an NHWC tensor, or of a Winograd buffer), so nothing is packed
//! on the activation side. The AVX-512 version holds 14 × 2 accumulators in registers, the AVX2 version works
//! in passes of 6 rows × 16 channels, and the portable version serves every other CPU.

use std::sync::OnceLock;

/// The instruction set the fast kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
}

/// The best instruction set of this CPU, or a lower one named by `DEEPGROW_FAST_ISA` (`avx2`, `portable`), so
/// that every code path can be tested and compared on one machine.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[allow(unused_mut)]
        let mut best = Isa::Portable;
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                best = Isa::Avx2;
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                best = Isa::Avx512;
            }
        }
        let cap = match std::env::var("DEEPGROW_FAST_ISA").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        };
        best.min(cap)
    })
}

/// Defines a function whose body is compiled three times, for AVX-512, for AVX2 + FMA and for the baseline
/// instruction set, and runs the copy [`isa`] selects. What the body inlines (the transforms, the lane loops)
/// is vectorised for each copy's instructions. `unsafe fn` keeps its contract; a safe `fn` stays safe.
macro_rules! isa_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn baseline($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                baseline($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                baseline($($arg),*)
            }
            match $crate::engine::fast::kernel::isa() {
                // SAFETY: isa() found these instructions on this CPU.
                #[cfg(target_arch = "x86_64")]
                $crate::engine::fast::kernel::Isa::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::engine::fast::kernel::Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => baseline($($arg),*),
            }
        }
    };
    ($(#[$meta:meta])* $vis:vis unsafe fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            unsafe fn baseline($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                baseline($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                baseline($($arg),*)
            }
            match $crate::engine::fast::kernel::isa() {
                #[cfg(target_arch = "x86_64")]
                $crate::engine::fast::kernel::Isa::Avx512 => avx512($($arg),*),
                #[cfg(target_arch = "x86_64")]
                $crate::engine::fast::kernel::Isa::Avx2 => avx2($($arg),*),
                _ => baseline($($arg),*),
            }
        }
    };
}
pub(crate) use isa_dispatch;

/// Output channels of one packed weight panel.
pub const NR: usize = 32;
/// Rows computed per kernel call.
pub const MR: usize = 14;

/// Packs `w[k][c]` (row-major `k_count × c_count`, any strides given by `at`) into panels of `NR` output
/// channels: `out[panel][c][NR]`, zero-padded past `k_count`.
pub fn pack_panels(k_count: usize, c_count: usize, at: impl Fn(usize, usize) -> f32) -> Vec<f32> {
    let panels = k_count.div_ceil(NR);
    let mut out = vec![0f32; panels * c_count * NR];
    for k in 0..k_count {
        let (p, lane) = (k / NR, k % NR);
        for c in 0..c_count {
            out[(p * c_count + c) * NR + lane] = at(k, c);
        }
    }
    out
}

/// A block of rows for [`run`]: `rows` rows starting at `v`, `v_stride` floats apart; each of the `MR`
/// rows from `v` must be readable (rows past `rows` are computed and dropped).
#[derive(Clone, Copy)]
pub struct Rows {
    pub v: *const f32,
    pub v_stride: usize,
    pub rows: usize,
}

/// Where the block's results go: row `t` at `dst + t * dst_stride`, `NR` floats (or fewer with `lanes`).
#[derive(Clone, Copy)]
pub struct Dst {
    pub ptr: *mut f32,
    pub stride: usize,
    /// Output channels to store of the `NR` (the last panel of a layer may be partial).
    pub lanes: usize,
}

/// Computes one `MR × NR` block over `depth` input channels from the panel `u` (`depth × NR` floats), adding
/// `bias` (`NR` floats) when given.
///
/// # Safety
/// `rows.v` must be valid for `MR` rows of `depth` floats at `rows.v_stride`, `u` for `depth * NR` floats,
/// `dst` for `rows.rows` rows of `dst.lanes` floats, and `bias`, when given, for `NR` floats.
#[inline]
pub unsafe fn run(depth: usize, rows: Rows, u: *const f32, bias: Option<&[f32; NR]>, dst: Dst) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::kernel_avx512(depth, rows, u, bias, dst),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::kernel_avx2(depth, rows, u, bias, dst),
        _ => portable(depth, rows, u, bias, dst),
    }
}

#[inline]
unsafe fn store(acc: &[[f32; NR]; MR], rows: usize, dst: Dst) {
    for (t, row) in acc.iter().enumerate().take(rows.min(MR)) {
        std::ptr::copy_nonoverlapping(row.as_ptr(), dst.ptr.add(t * dst.stride), dst.lanes);
    }
}

unsafe fn portable(depth: usize, rows: Rows, u: *const f32, bias: Option<&[f32; NR]>, dst: Dst) {
    let mut acc = [bias.copied().unwrap_or([0.0; NR]); MR];
    for c in 0..depth {
        let panel = std::slice::from_raw_parts(u.add(c * NR), NR);
        for (t, row) in acc.iter_mut().enumerate() {
            let x = *rows.v.add(t * rows.v_stride + c);
            for (a, w) in row.iter_mut().zip(panel) {
                // no mul_add: without hardware FMA it is a slow library call
                *a += x * *w;
            }
        }
    }
    store(&acc, rows.rows, dst);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Dst, Rows, MR, NR};

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel_avx512(
        depth: usize,
        rows: Rows,
        u: *const f32,
        bias: Option<&[f32; NR]>,
        dst: Dst,
    ) {
        let (b0, b1) = match bias {
            Some(b) => (
                _mm512_loadu_ps(b.as_ptr()),
                _mm512_loadu_ps(b.as_ptr().add(16)),
            ),
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        let mut acc = [[b0, b1]; MR];
        // Two row bases so that every row address is base + index * {0, 1, 2, 4} + c.
        let s = rows.v_stride;
        let v0 = rows.v;
        let v7 = rows.v.add(7 * s);
        let mut up = u;
        for c in 0..depth {
            let u0 = _mm512_loadu_ps(up);
            let u1 = _mm512_loadu_ps(up.add(16));
            up = up.add(NR);
            macro_rules! row {
                ($t:expr, $base:expr, $off:expr) => {{
                    let x = _mm512_set1_ps(*$base.add($off + c));
                    acc[$t][0] = _mm512_fmadd_ps(x, u0, acc[$t][0]);
                    acc[$t][1] = _mm512_fmadd_ps(x, u1, acc[$t][1]);
                }};
            }
            row!(0, v0, 0);
            row!(1, v0, s);
            row!(2, v0, 2 * s);
            row!(3, v0, 3 * s);
            row!(4, v0, 4 * s);
            row!(5, v0, 5 * s);
            row!(6, v0, 6 * s);
            row!(7, v7, 0);
            row!(8, v7, s);
            row!(9, v7, 2 * s);
            row!(10, v7, 3 * s);
            row!(11, v7, 4 * s);
            row!(12, v7, 5 * s);
            row!(13, v7, 6 * s);
        }
        let n = rows.rows.min(MR);
        if dst.lanes == NR {
            for (t, a) in acc.iter().enumerate().take(n) {
                let p = dst.ptr.add(t * dst.stride);
                _mm512_storeu_ps(p, a[0]);
                _mm512_storeu_ps(p.add(16), a[1]);
            }
        } else {
            let mut out = [[0f32; NR]; MR];
            for (o, a) in out.iter_mut().zip(&acc) {
                _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
                _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
            }
            super::store(&out, n, dst);
        }
    }

    /// Rows `r0 .. r0 + R` of the block, 16 channels (`half`) at a time: 2R accumulators, two weight
    /// registers and a broadcast fit AVX2's 16 registers for R = 6.
    #[inline(always)]
    unsafe fn pass_avx2<const R: usize>(
        depth: usize,
        rows: Rows,
        r0: usize,
        u: *const f32,
        bias: Option<&[f32; NR]>,
        out: &mut [[f32; NR]; MR],
    ) {
        for half in 0..2 {
            let (b0, b1) = match bias {
                Some(b) => (
                    _mm256_loadu_ps(b.as_ptr().add(16 * half)),
                    _mm256_loadu_ps(b.as_ptr().add(16 * half + 8)),
                ),
                None => (_mm256_setzero_ps(), _mm256_setzero_ps()),
            };
            let mut acc = [[b0, b1]; R];
            let v = rows.v.add(r0 * rows.v_stride);
            for c in 0..depth {
                let w = u.add(c * NR + 16 * half);
                let u0 = _mm256_loadu_ps(w);
                let u1 = _mm256_loadu_ps(w.add(8));
                for (t, a) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_ps(*v.add(t * rows.v_stride + c));
                    a[0] = _mm256_fmadd_ps(x, u0, a[0]);
                    a[1] = _mm256_fmadd_ps(x, u1, a[1]);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out[r0 + t].as_mut_ptr().add(16 * half), a[0]);
                _mm256_storeu_ps(out[r0 + t].as_mut_ptr().add(16 * half + 8), a[1]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel_avx2(
        depth: usize,
        rows: Rows,
        u: *const f32,
        bias: Option<&[f32; NR]>,
        dst: Dst,
    ) {
        let mut out = [[0f32; NR]; MR];
        let n = rows.rows.min(MR);
        pass_avx2::<6>(depth, rows, 0, u, bias, &mut out);
        if n > 6 {
            pass_avx2::<6>(depth, rows, 6, u, bias, &mut out);
        }
        if n > 12 {
            pass_avx2::<2>(depth, rows, 12, u, bias, &mut out);
        }
        super::store(&out, n, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_naive_sums_with_bias_partial_rows_and_lanes() {
        let depth = 37;
        let k_count = 20; // one partial panel
        let v: Vec<f32> = (0..MR * 41)
            .map(|i| ((i * 7919) % 97) as f32 / 31.0 - 1.5)
            .collect();
        let w = |k: usize, c: usize| ((k * 31 + c * 17) % 23) as f32 / 11.0 - 1.0;
        let u = pack_panels(k_count, depth, w);
        let bias: [f32; NR] = std::array::from_fn(|k| k as f32 * 0.25);
        type Kernel = unsafe fn(usize, Rows, *const f32, Option<&[f32; NR]>, Dst);
        let mut kernels: Vec<(&str, Kernel)> = vec![("portable", portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if isa() >= Isa::Avx2 {
                kernels.push(("avx2", x86::kernel_avx2));
            }
            if isa() >= Isa::Avx512 {
                kernels.push(("avx512", x86::kernel_avx512));
            }
        }
        for (rows, (name, kernel)) in [MR, 5, 13, 7]
            .into_iter()
            .flat_map(|r| kernels.iter().map(move |k| (r, *k)))
        {
            let mut out = vec![f32::NAN; MR * 24];
            unsafe {
                kernel(
                    depth,
                    Rows {
                        v: v.as_ptr(),
                        v_stride: 41,
                        rows,
                    },
                    u.as_ptr(),
                    Some(&bias),
                    Dst {
                        ptr: out.as_mut_ptr(),
                        stride: 24,
                        lanes: k_count,
                    },
                );
            }
            for t in 0..MR {
                for k in 0..24 {
                    let got = out[t * 24 + k];
                    if t >= rows || k >= k_count {
                        assert!(got.is_nan(), "{name}: row {t} lane {k} written");
                        continue;
                    }
                    let want = (0..depth).fold(bias[k] as f64, |a, c| {
                        a + v[t * 41 + c] as f64 * w(k, c) as f64
                    });
                    assert!(
                        (got as f64 - want).abs() < 1e-4,
                        "row {t} lane {k}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
