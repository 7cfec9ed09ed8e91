//! The fast layers as tract ops on NHWC tensors (`[1, H, W, C]`), and the ONNX op parsers that build them from
//! the custom nodes [`super::rewrite`] puts in the graph. Weights are inputs of those nodes (the model's
//! initializers); the parsers read them as constants and transform them once, at load time.

use std::fmt;
use std::sync::Arc;

use tract_hir::internal::*;
use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;

use super::layers::{max_pool_2x2, Dense, NormAct, Upsample2x2};
use super::parallel::Parallel;
use super::winograd::{Conv3x3, Method, Tile};

pub const CONV3X3: &str = "DeepgrowConv3x3";
pub const POINTWISE: &str = "DeepgrowConv1x1";
pub const MAX_POOL: &str = "DeepgrowMaxPool2x2";
pub const UPSAMPLE: &str = "DeepgrowConvTranspose2x2";
/// The domain of the custom nodes (they never leave the process).
pub const DOMAIN: &str = "deepgrow.fast";

/// Registers the parser of the custom nodes.
pub fn register(reg: &mut OnnxOpRegister) {
    for name in [CONV3X3, POINTWISE, MAX_POOL, UPSAMPLE] {
        reg.insert(name, parse);
    }
}

fn nhwc(input: &TypedFact) -> TractResult<[usize; 3]> {
    nhwc_of(
        input
            .shape
            .as_concrete()
            .context("fast ops need concrete shapes")?,
    )
}

fn nhwc_of(shape: &[usize]) -> TractResult<[usize; 3]> {
    ensure!(
        shape.len() == 4 && shape[0] == 1,
        "fast ops take one [1, H, W, C] image, got {shape:?}"
    );
    Ok([shape[1], shape[2], shape[3]])
}

fn plain(t: &Tensor) -> TractResult<&[f32]> {
    t.try_as_plain_ram()?.as_slice::<f32>()
}

/// A new float32 tensor of `shape`, filled by `fill` (which must write every element).
fn f32_output(shape: [usize; 4], fill: impl FnOnce(&mut [f32])) -> TractResult<TValue> {
    // SAFETY: `fill` writes every element before the tensor is read.
    let mut out = unsafe { Tensor::uninitialized::<f32>(&shape)? };
    fill(out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
    Ok(out.into_tvalue())
}

fn const_input(model: &TypedModel, outlet: OutletId, what: &str) -> TractResult<Arc<Tensor>> {
    let t = model
        .outlet_fact(outlet)?
        .konst
        .clone()
        .with_context(|| format!("{what} must be a constant"))?;
    ensure!(
        t.datum_type() == f32::datum_type(),
        "{what} must be float32"
    );
    Ok(t)
}

// ------------------------------------------------------------------------------------------------ the ops

/// One layer on NHWC images, as a fast op computes it.
trait Layer: fmt::Debug + Send + Sync + 'static {
    const NAME: &'static str;
    /// The output's `[h, w, c]` from the inputs' (checked against what the layer was built for).
    fn output_dims(&self, inputs: &[[usize; 3]]) -> TractResult<[usize; 3]>;
    /// Writes every element of `out` from `inputs` (NHWC data with its `[h, w, c]`).
    fn compute(&self, inputs: &[(&[f32], [usize; 3])], out: &mut [f32], par: &Parallel);
    fn info(&self) -> String {
        String::new()
    }
}

/// The tract op of a [`Layer`]: shared, built once at load time, compared by identity.
#[derive(Debug)]
struct FastOp<L: Layer>(Arc<L>);

impl<L: Layer> Clone for FastOp<L> {
    fn clone(&self) -> Self {
        FastOp(self.0.clone())
    }
}

impl<L: Layer> PartialEq for FastOp<L> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl<L: Layer> Eq for FastOp<L> {}

impl<L: Layer> Op for FastOp<L> {
    fn name(&self) -> StaticName {
        L::NAME.into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.0.info()])
    }
    op_as_typed_op!();
}

impl<L: Layer> EvalOp for FastOp<L> {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let dims = inputs
            .iter()
            .map(|t| nhwc_of(t.shape()))
            .collect::<TractResult<Vec<_>>>()?;
        let [h, w, c] = self.0.output_dims(&dims)?;
        let data = inputs
            .iter()
            .map(|t| plain(t))
            .collect::<TractResult<Vec<_>>>()?;
        let parts: Vec<_> = data.into_iter().zip(dims).collect();
        let out = f32_output([1, h, w, c], |out| {
            self.0.compute(&parts, out, &Parallel::current())
        })?;
        Ok(tvec!(out))
    }
}

impl<L: Layer> TypedOp for FastOp<L> {
    as_op!();
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let dims = inputs
            .iter()
            .map(|f| nhwc(f))
            .collect::<TractResult<Vec<_>>>()?;
        let [h, w, c] = self.0.output_dims(&dims)?;
        Ok(tvec!(f32::fact([1, h, w, c])))
    }
}

/// 3 × 3 convolution (stride 1, padding 1) of the channel-concatenation of its inputs, with an optional
/// instance norm and LeakyReLU after it.
#[derive(Debug)]
struct ConvBlock {
    conv: Conv3x3,
    channels: Vec<usize>,
    norm: Option<NormAct>,
}

impl Layer for ConvBlock {
    const NAME: &'static str = CONV3X3;

    fn output_dims(&self, inputs: &[[usize; 3]]) -> TractResult<[usize; 3]> {
        let [h, w, _] = inputs[0];
        let channels: Vec<usize> = inputs.iter().map(|d| d[2]).collect();
        ensure!(
            inputs.iter().all(|d| d[..2] == [h, w]) && channels == self.channels,
            "inputs {inputs:?}, expected {h} x {w} images of {:?} channels",
            self.channels
        );
        Ok([h, w, self.conv.k_out()])
    }

    fn compute(&self, inputs: &[(&[f32], [usize; 3])], out: &mut [f32], par: &Parallel) {
        let [h, w, _] = inputs[0].1;
        let parts: Vec<(&[f32], usize)> = inputs.iter().map(|(data, d)| (*data, d[2])).collect();
        let moments = self.conv.run(&parts, h, w, out, par);
        if let Some(norm) = &self.norm {
            norm.apply(out, h * w, &moments.mean, moments.variance.as_deref(), par);
        }
    }

    fn info(&self) -> String {
        let norm = if self.norm.is_some() {
            ", instance norm"
        } else {
            ""
        };
        format!(
            "{} {:?} -> {}{norm}",
            self.conv.algorithm(),
            self.channels,
            self.conv.k_out()
        )
    }
}

impl Layer for Dense {
    const NAME: &'static str = POINTWISE;

    fn output_dims(&self, inputs: &[[usize; 3]]) -> TractResult<[usize; 3]> {
        let [h, w, c] = inputs[0];
        ensure!(
            c == self.c_in(),
            "1x1 conv of {c} channels, expected {}",
            self.c_in()
        );
        Ok([h, w, self.k_out()])
    }

    fn compute(&self, inputs: &[(&[f32], [usize; 3])], out: &mut [f32], par: &Parallel) {
        let (x, [h, w, _]) = inputs[0];
        self.pointwise(x, h * w, out, par)
    }
}

/// 2 × 2 max pooling, stride 2.
#[derive(Debug)]
struct MaxPool2x2;

impl Layer for MaxPool2x2 {
    const NAME: &'static str = MAX_POOL;

    fn output_dims(&self, inputs: &[[usize; 3]]) -> TractResult<[usize; 3]> {
        let [h, w, c] = inputs[0];
        Ok([h / 2, w / 2, c])
    }

    fn compute(&self, inputs: &[(&[f32], [usize; 3])], out: &mut [f32], par: &Parallel) {
        let (x, [h, w, c]) = inputs[0];
        max_pool_2x2(x, h, w, c, out, par)
    }
}

impl Layer for Upsample2x2 {
    const NAME: &'static str = UPSAMPLE;

    fn output_dims(&self, inputs: &[[usize; 3]]) -> TractResult<[usize; 3]> {
        let [h, w, c] = inputs[0];
        ensure!(
            c == self.c_in(),
            "transposed conv of {c} channels, expected {}",
            self.c_in()
        );
        Ok([2 * h, 2 * w, self.k_out()])
    }

    fn compute(&self, inputs: &[(&[f32], [usize; 3])], out: &mut [f32], par: &Parallel) {
        let (x, [h, w, _]) = inputs[0];
        self.run(x, h, w, out, par)
    }
}

// ------------------------------------------------------------------------------------------------ parsing

/// A custom node as parsed: which layer, and its attributes. Its inputs are the activations, then the
/// constants (weights, bias, and for a norm its scale and bias).
#[derive(Debug, Clone)]
enum FastNode {
    Conv3x3 {
        method: Method,
        inputs: usize,
        k_out: usize,
        norm: Option<(f32, Option<f32>)>,
    },
    Pointwise {
        k_out: usize,
    },
    MaxPool,
    Upsample {
        k_out: usize,
        bf16: bool,
    },
}

fn parse(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let k_out = || -> TractResult<usize> { Ok(node.get_attr::<i64>("k_out")? as usize) };
    let parsed = match node.op_type.as_str() {
        CONV3X3 => FastNode::Conv3x3 {
            method: match (
                node.get_attr_opt::<i64>("bf16")?,
                node.get_attr_opt::<i64>("winograd_m")?,
            ) {
                (Some(1), _) => Method::Bf16,
                (_, Some(4)) => Method::Winograd(Tile::F4),
                _ => Method::Winograd(Tile::F2),
            },
            inputs: node.get_attr::<i64>("inputs")? as usize,
            k_out: k_out()?,
            norm: (node.get_attr_opt::<i64>("norm")? == Some(1)).then_some((
                node.get_attr_opt::<f32>("epsilon")?.unwrap_or(1e-5),
                node.get_attr_opt::<f32>("leaky_alpha")?,
            )),
        },
        POINTWISE => FastNode::Pointwise { k_out: k_out()? },
        MAX_POOL => FastNode::MaxPool,
        UPSAMPLE => FastNode::Upsample {
            k_out: k_out()?,
            bf16: node.get_attr_opt::<i64>("bf16")? == Some(1),
        },
        other => bail!("not a fast node: {other}"),
    };
    Ok((expand(parsed), vec![]))
}

impl FastNode {
    /// (activation inputs, constant inputs, output channels, spatial scale of the output)
    fn arity(&self) -> (usize, usize, Option<usize>, Scale) {
        match *self {
            FastNode::Conv3x3 {
                inputs,
                k_out,
                norm,
                ..
            } => (
                inputs,
                2 + 2 * norm.is_some() as usize,
                Some(k_out),
                Scale::Same,
            ),
            FastNode::Pointwise { k_out } => (1, 2, Some(k_out), Scale::Same),
            FastNode::MaxPool => (1, 0, None, Scale::Half),
            FastNode::Upsample { k_out, .. } => (1, 2, Some(k_out), Scale::Double),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Scale {
    Same,
    Half,
    Double,
}

impl Expansion for FastNode {
    fn name(&self) -> StaticName {
        match self {
            FastNode::Conv3x3 { .. } => CONV3X3,
            FastNode::Pointwise { .. } => POINTWISE,
            FastNode::MaxPool => MAX_POOL,
            FastNode::Upsample { .. } => UPSAMPLE,
        }
        .into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        let (activations, constants, k_out, scale) = self.arity();
        check_input_arity(inputs, activations + constants)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, 4)?;
        s.equals(&inputs[0].rank, 4)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        match k_out {
            Some(k) => s.equals(&outputs[0].shape[3], k.to_dim())?,
            None => s.equals(&outputs[0].shape[3], &inputs[0].shape[3])?,
        }
        for axis in [1, 2] {
            s.given(&inputs[0].shape[axis], move |s, d| {
                let d = match scale {
                    Scale::Same => d,
                    Scale::Half => d / 2,
                    Scale::Double => d * 2,
                };
                s.equals(&outputs[0].shape[axis], d)
            })?;
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let (n, constants, _, _) = self.arity();
        let consts = (0..constants)
            .map(|i| const_input(model, inputs[n + i], "a fast node's weights"))
            .collect::<TractResult<Vec<_>>>()?;
        let dims = inputs[..n]
            .iter()
            .map(|&i| nhwc(model.outlet_fact(i)?))
            .collect::<TractResult<Vec<_>>>()?;
        let shape = |i: usize| consts[i].shape().to_vec();
        match *self {
            FastNode::Conv3x3 {
                method,
                k_out,
                norm,
                ..
            } => {
                let ws = shape(0);
                let channels: Vec<usize> = dims.iter().map(|d| d[2]).collect();
                ensure!(
                    ws.len() == 4
                        && ws[0] == k_out
                        && ws[2..] == [3, 3]
                        && channels.iter().sum::<usize>() == ws[1],
                    "3x3 conv weights {ws:?} for inputs of {channels:?} channels"
                );
                let conv =
                    Conv3x3::new(method, plain(&consts[0])?, plain(&consts[1])?, k_out, ws[1]);
                let norm = match norm {
                    Some((epsilon, leaky)) => Some(NormAct {
                        gamma: plain(&consts[2])?.to_vec(),
                        beta: plain(&consts[3])?.to_vec(),
                        epsilon,
                        leaky,
                    }),
                    None => None,
                };
                let layer = ConvBlock {
                    conv,
                    channels,
                    norm,
                };
                model.wire_node(prefix, FastOp(Arc::new(layer)), &inputs[..n])
            }
            FastNode::Pointwise { k_out } => {
                let ws = shape(0);
                ensure!(
                    ws.len() == 4 && ws[0] == k_out && ws[2..] == [1, 1],
                    "1x1 conv weights {ws:?}"
                );
                let (c_in, w) = (ws[1], plain(&consts[0])?);
                let dense = Dense::new(k_out, c_in, |k, c| w[k * c_in + c], plain(&consts[1])?);
                model.wire_node(prefix, FastOp(Arc::new(dense)), &inputs[..n])
            }
            FastNode::MaxPool => {
                model.wire_node(prefix, FastOp(Arc::new(MaxPool2x2)), &inputs[..n])
            }
            FastNode::Upsample { k_out, bf16 } => {
                let ws = shape(0);
                ensure!(
                    ws.len() == 4 && ws[1] == k_out && ws[2..] == [2, 2],
                    "transposed conv weights {ws:?}"
                );
                let bf16 = bf16.then(super::bf16::hardware).flatten();
                let up =
                    Upsample2x2::new(plain(&consts[0])?, plain(&consts[1])?, ws[0], k_out, bf16);
                model.wire_node(prefix, FastOp(Arc::new(up)), &inputs[..n])
            }
        }
    }
}
