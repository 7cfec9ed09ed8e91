//! tract-onnx on CPU: loaded once with its fixed input shape, optimised, made runnable and shared.

use std::path::Path;
use std::sync::Arc;

use ndarray::{Array2, Array4, Ix2};
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;

use super::{Engine, EngineError};

type Plan = Arc<TypedRunnableModel>;

pub struct TractEngine {
    plan: Plan,
    executor: Executor,
    input_size: [usize; 2],
}

impl TractEngine {
    /// Loads `model.onnx` for input `(1, 3, H, W)`, optimises it and builds a pool of `threads` for its kernels.
    pub fn load(path: &Path, input_size: [usize; 2], threads: usize) -> Result<Self, EngineError> {
        let load_error = |e: TractError| EngineError::Load {
            path: path.display().to_string(),
            reason: format!("{e:#}"),
        };
        let [h, w] = input_size;
        let plan = tract_onnx::onnx()
            .model_for_path(path)
            .and_then(|model| model.with_input_fact(0, f32::fact([1, 3, h, w]).into()))
            .and_then(|model| model.into_optimized())
            .and_then(|model| model.into_runnable())
            .map_err(load_error)?;
        // A private pool: tract's "multithread(1)" would still use rayon's global pool.
        let executor = if threads > 1 {
            Executor::multithread(threads)
        } else {
            Executor::SingleThread
        };
        Ok(TractEngine {
            plan,
            executor,
            input_size,
        })
    }
}

impl Engine for TractEngine {
    fn input_size(&self) -> [usize; 2] {
        self.input_size
    }

    fn infer(&self, input: Array4<f32>) -> Result<Array2<f32>, EngineError> {
        let [h, w] = self.input_size;
        if input.shape() != [1, 3, h, w] {
            return Err(EngineError::Run(format!(
                "input shape {:?} does not match the network's [1, 3, {h}, {w}]",
                input.shape()
            )));
        }
        let tensor: Tensor = input.into_dyn().into();
        let outputs = multithread_tract_scope(self.executor.clone(), || {
            self.plan.run(tvec!(tensor.into()))
        })
        .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        let logits = outputs[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        let shape = logits.shape().to_vec();
        if shape.len() != 4 || shape[0] != 1 || shape[1] != 1 {
            return Err(EngineError::Run(format!(
                "unexpected output shape {shape:?}"
            )));
        }
        logits
            .index_axis_move(ndarray::Axis(0), 0)
            .index_axis_move(ndarray::Axis(0), 0)
            .into_dimensionality::<Ix2>()
            .map(|view| view.to_owned())
            .map_err(|e| EngineError::Run(e.to_string()))
    }
}
