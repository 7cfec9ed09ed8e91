//! Fast CPU kernels for the convolution networks this server runs, plugged into tract as custom ops by a
//! load-time rewrite of the ONNX graph (see `rewrite`). tract still loads, checks, optimises and runs the
//! graph; the convolutions, norms, pooling and upsampling of a U-Net run here, on NHWC tensors: 3 × 3
//! convolutions by Winograd F(2 × 2, 3 × 3) (or F(4 × 4, 3 × 3), opt-in) on a register-blocked AVX-512 or AVX2
//! matrix kernel, with the Concat before them and the instance norm and LeakyReLU after them fused in.
//!
//! `rewrite` and `register` take tract-onnx's protobuf and op registry: they are public for the per-op
//! profiler (`benches/tract_profile.rs`) and the tests; the server reaches them only through `TractEngine`.

pub mod bf16;
pub mod kernel;
pub mod layers;
mod ops;
pub mod parallel;
pub mod rewrite;
pub mod winograd;

pub use ops::register;
pub use rewrite::{rewrite, Report};

use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::TractResult;
use tract_onnx::Onnx;

/// Rewrites `proto` onto the fast ops (3 × 3 convolutions by `method`) and registers their parsers in `onnx`;
/// fails when the graph has nothing the fast ops implement.
pub fn install(
    onnx: &mut Onnx,
    proto: &mut ModelProto,
    method: winograd::Method,
) -> TractResult<Report> {
    let report = rewrite(proto, method);
    if report.replaced() == 0 {
        return Err(anyhow::anyhow!("no layer the fast kernels implement"));
    }
    register(&mut onnx.op_register);
    Ok(report)
}

/// Whether the fast kernels beat tract's own on this CPU: they need AVX2 (or AVX-512); their portable version
/// (about tract's speed) runs only when `DEEPGROW_FAST_ISA=portable` asks for it.
pub fn worthwhile() -> bool {
    kernel::isa() >= kernel::Isa::Avx2
        || std::env::var("DEEPGROW_FAST_ISA").as_deref() == Ok("portable")
}

/// Inputs and references the fast kernels' unit tests share.
#[cfg(test)]
pub(crate) mod test_support {
    /// Deterministic values in [−1, 1).
    pub fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 1013) as f32 / 506.5) - 1.0)
            .collect()
    }

    /// The 3 × 3 convolution (stride 1, zero padding 1) of NHWC `x` (`h × w × c`) with ONNX weights `wt`
    /// (`[k][c][3][3]`) and bias `b`, summed in f64 over the values as `read` gives them (as they are, or
    /// rounded as a kernel rounds them).
    #[allow(clippy::too_many_arguments)]
    pub fn direct_conv(
        x: &[f32],
        [h, w, c]: [usize; 3],
        wt: &[f32],
        b: &[f32],
        k: usize,
        read: impl Fn(f32) -> f64,
    ) -> Vec<f64> {
        let mut y = vec![0f64; h * w * k];
        for yy in 0..h {
            for xx in 0..w {
                for kk in 0..k {
                    let mut acc = b[kk] as f64;
                    for cc in 0..c {
                        for tap in 0..9 {
                            let (sy, sx) = (
                                yy as isize + tap as isize / 3 - 1,
                                xx as isize + tap as isize % 3 - 1,
                            );
                            if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                                continue;
                            }
                            acc += read(x[(sy as usize * w + sx as usize) * c + cc])
                                * read(wt[(kk * c + cc) * 9 + tap]);
                        }
                    }
                    y[(yy * w + xx) * k + kk] = acc;
                }
            }
        }
        y
    }
}
