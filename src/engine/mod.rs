//! The inference engine behind a small trait: the tract implementation for serving, a fake for API tests.
//! No tract type leaves this module.

mod tract;

use ndarray::{Array2, Array4};

pub use self::tract::TractEngine;

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
}
