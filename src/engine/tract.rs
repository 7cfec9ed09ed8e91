//! tract-onnx on CPU: loaded once with its fixed input shape, optimised, made runnable and shared.

use std::path::Path;
use std::sync::Arc;

use ndarray::{Array2, Array4, Ix2};
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;

use super::{fast, Engine, EngineError, Kernels};

type Plan = Arc<TypedRunnableModel>;

pub struct TractEngine {
    plan: Plan,
    executor: Executor,
    input_size: [usize; 2],
    kernels: Kernels,
}

impl TractEngine {
    /// Loads `model.onnx` for input `(1, 3, H, W)`, optimises it and builds a pool of `threads` for its kernels.
    /// With [`Kernels::Fast`], the graph's convolution layers are first rewritten onto the fast ops; a graph
    /// they cannot take is loaded as it is, with a warning.
    pub fn load(
        path: &Path,
        input_size: [usize; 2],
        threads: usize,
        kernels: Kernels,
    ) -> Result<Self, EngineError> {
        let load_error = |e: TractError| EngineError::Load {
            path: path.display().to_string(),
            reason: format!("{e:#}"),
        };
        let mut kernels = kernels.resolve();
        if kernels == Kernels::FastBf16 && fast::bf16::hardware().is_none() {
            tracing::info!(
                "no AMX or AVX-512-BF16 on this CPU: the convolutions run in float32 (as --kernels fast)"
            );
            kernels = Kernels::Fast;
        }
        let plan = match kernels {
            Kernels::Auto => unreachable!("resolved above"),
            Kernels::Tract => Self::plan(path, input_size, kernels).map_err(load_error)?,
            Kernels::Fast | Kernels::FastF4 | Kernels::FastBf16 if !fast::worthwhile() => {
                tracing::info!(
                    "no AVX2 on this CPU: tract's own kernels are faster here than the fast ones"
                );
                return Self::load(path, input_size, threads, Kernels::Tract);
            }
            Kernels::Fast | Kernels::FastF4 | Kernels::FastBf16 => {
                match Self::plan(path, input_size, kernels) {
                    Ok(plan) => plan,
                    Err(error) => {
                        tracing::warn!(path = %path.display(), error = %format!("{error:#}"),
                        "the fast kernels cannot run this model; using tract's own");
                        return Self::load(path, input_size, threads, Kernels::Tract);
                    }
                }
            }
        };
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
            kernels,
        })
    }

    fn plan(path: &Path, [h, w]: [usize; 2], kernels: Kernels) -> TractResult<Plan> {
        let mut onnx = tract_onnx::onnx();
        let mut proto = onnx.proto_model_for_path(path)?;
        if let Some(method) = kernels.conv3x3_method() {
            let report = fast::install(&mut onnx, &mut proto, method)?;
            tracing::debug!(path = %path.display(), ?report, "graph rewritten onto the fast kernels");
        }
        onnx.model_for_proto_model(&proto)?
            .with_input_fact(0, f32::fact([1, 3, h, w]).into())?
            .into_optimized()?
            .into_runnable()
    }

    /// The kernels this engine ended up with.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }
}

impl Engine for TractEngine {
    fn input_size(&self) -> [usize; 2] {
        self.input_size
    }

    fn kernel_name(&self) -> String {
        clap::ValueEnum::to_possible_value(&self.kernels()).map_or_else(
            || format!("{:?}", self.kernels()),
            |v| v.get_name().to_owned(),
        )
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
        });
        fast::bf16::release_buffers();
        let outputs = outputs.map_err(|e| EngineError::Run(format!("{e:#}")))?;
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
