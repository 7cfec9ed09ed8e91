//! The inference engine behind a small trait: the tract implementation for serving, a fake for API tests.
//! No tract type leaves this module.

pub mod fast;
mod tract;

use ndarray::{Array2, Array4};

pub use self::tract::TractEngine;

/// Which kernels run the network's layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernels {
    /// The fastest kernels that keep the masks of the exact model on this CPU: `fast-bf16` where it has AMX,
    /// `fast` elsewhere (BENCHMARKS.md: on AMX, bfloat16 is ~2× faster with masks at Dice ≥ 0.999; where only
    /// AVX-512-BF16 dot products are present, the direct bfloat16 products do 2.25× the multiplies of
    /// Winograd's, so float32 Winograd stays the default there).
    Auto,
    /// The convolution layers on this crate's fast ops (Winograd F(2 × 2, 3 × 3) convolutions, fused norms),
    /// the rest on tract; falls back to `tract` for a graph they cannot take. Within 1e-4 of the exact model.
    Fast,
    /// As `fast`, with Winograd F(4 × 4, 3 × 3): fewer multiplies, but float32 errors of a few 1e-4 on the
    /// logits of a trained network (opt-in; see BENCHMARKS.md for its mask agreement).
    FastF4,
    /// As `fast`, with the 3 × 3 convolutions in bfloat16 (float32 sums) on AMX tiles or AVX-512-BF16 dot
    /// products, whichever the CPU has (as `fast` on a CPU with neither). Logits within a few 1e-2 of the exact
    /// model; see BENCHMARKS.md for its masks.
    FastBf16,
    /// tract's own kernels for every layer (the unmodified graph).
    Tract,
}

impl Kernels {
    /// What `Auto` means on this CPU; the other choices as they are.
    pub fn resolve(self) -> Kernels {
        match self {
            Kernels::Auto if fast::bf16::hardware() == Some(fast::bf16::Bf16Isa::Amx) => {
                Kernels::FastBf16
            }
            Kernels::Auto => Kernels::Fast,
            other => other,
        }
    }

    /// How the fast kernels compute 3 × 3 convolutions, `None` for tract's own.
    pub fn conv3x3_method(self) -> Option<fast::winograd::Method> {
        use fast::winograd::{Method, Tile};
        match self.resolve() {
            Kernels::Auto => unreachable!("resolved above"),
            Kernels::Fast => Some(Method::Winograd(Tile::F2)),
            Kernels::FastF4 => Some(Method::Winograd(Tile::F4)),
            Kernels::FastBf16 => Some(Method::Bf16),
            Kernels::Tract => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("could not load model {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("inference failed: {0}")]
    Run(String),
}

/// Runs one network on a `(1, 3, H, W)` input and returns the `(H, W)` logits of its single output channel.
pub trait Engine: Send + Sync + 'static {
    /// The fixed network input size `[H, W]` the engine was built for.
    fn input_size(&self) -> [usize; 2];
    fn infer(&self, input: Array4<f32>) -> Result<Array2<f32>, EngineError>;

    /// The kernels it runs the network with, as metrics and logs name them.
    fn kernel_name(&self) -> String {
        "unknown".to_owned()
    }
}
