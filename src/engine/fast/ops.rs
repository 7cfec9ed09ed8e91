//! The fast layers as tract ops on NHWC tensors (`[1, H, W, C]`), and the ONNX op parsers that build them from
//! the custom nodes [`super::rewrite`] puts in the graph. Weights are inputs of those nodes (the model's
//! initializers); the parsers read them as constants and transform them once, at load time.

use std::sync::Arc;

use tract_hir::internal::*;
use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;

use super::layers::{max_pool_2x2, Dense, NormAct, Upsample2x2};
use super::parallel::Parallel;
use super::winograd::{Conv3x3, Tile};

pub const CONV3X3: &str = "DeepgrowConv3x3";
pub const POINTWISE: &str = "DeepgrowConv1x1";
pub const MAX_POOL: &str = "DeepgrowMaxPool2x2";
pub const UPSAMPLE: &str = "DeepgrowConvTranspose2x2";
/// The domain of the custom nodes (they never leave the process).
pub const DOMAIN: &str = "deepgrow.fast";

/// Registers the parsers of the custom nodes.
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert(CONV3X3, parse_conv3x3);
    reg.insert(POINTWISE, parse_pointwise);
    reg.insert(MAX_POOL, parse_max_pool);
    reg.insert(UPSAMPLE, parse_upsample);
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

/// Rules shared by the parsers: float32 in and out, rank 4, the batch and the given output channels.
fn nhwc_rules<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
    k_out: Option<usize>,
) -> InferenceResult {
    check_output_arity(outputs, 1)?;
    s.equals(&outputs[0].datum_type, f32::datum_type())?;
    s.equals(&inputs[0].datum_type, f32::datum_type())?;
    s.equals(&outputs[0].rank, 4)?;
    s.equals(&inputs[0].rank, 4)?;
    s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
    if let Some(k) = k_out {
        s.equals(&outputs[0].shape[3], k.to_dim())?;
    } else {
        s.equals(&outputs[0].shape[3], &inputs[0].shape[3])?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------ 3 x 3 conv

/// 3 × 3 convolution (stride 1, padding 1) of the channel-concatenation of its inputs, with an optional
/// instance norm and LeakyReLU after it.
#[derive(Debug, Clone)]
pub struct ConvBlock {
    conv: Arc<Conv3x3>,
    channels: TVec<usize>,
    norm: Option<Arc<NormAct>>,
}

impl PartialEq for ConvBlock {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.conv, &other.conv)
    }
}
impl Eq for ConvBlock {}

impl Op for ConvBlock {
    fn name(&self) -> StaticName {
        CONV3X3.into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} {:?} -> {}, norm: {}",
            self.conv.algorithm(),
            self.channels,
            self.conv.k_out(),
            self.norm.is_some()
        )])
    }
    op_as_typed_op!();
}

impl EvalOp for ConvBlock {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == self.channels.len());
        let [h, w, _] = nhwc_of(inputs[0].shape())?;
        let mut parts = Vec::with_capacity(inputs.len());
        for (t, &c) in inputs.iter().zip(&self.channels) {
            ensure!(
                t.shape() == [1, h, w, c],
                "input shape {:?}, expected [1, {h}, {w}, {c}]",
                t.shape()
            );
            parts.push((plain(t)?, c));
        }
        let par = Parallel::current();
        let out = f32_output([1, h, w, self.conv.k_out()], |data| {
            let sums = self.conv.run(&parts, h, w, data, &par);
            if let Some(norm) = &self.norm {
                norm.apply(data, h * w, &sums, &par);
            }
        })?;
        Ok(tvec!(out))
    }
}

impl TypedOp for ConvBlock {
    as_op!();
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [h, w, _] = nhwc(inputs[0])?;
        Ok(tvec!(f32::fact([1, h, w, self.conv.k_out()])))
    }
}

#[derive(Debug, Clone)]
struct ConvBlockExpansion {
    tile: Tile,
    inputs: usize,
    k_out: usize,
    norm: bool,
    epsilon: f32,
    leaky: Option<f32>,
}

fn parse_conv3x3(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let norm = node.get_attr_opt::<i64>("norm")?.unwrap_or(0) == 1;
    let leaky = node.get_attr_opt::<f32>("leaky_alpha")?;
    let tile = match node.get_attr_opt::<i64>("winograd_m")? {
        Some(4) => Tile::F4,
        _ => Tile::F2,
    };
    Ok((
        expand(ConvBlockExpansion {
            tile,
            inputs: node.get_attr::<i64>("inputs")? as usize,
            k_out: node.get_attr::<i64>("k_out")? as usize,
            norm,
            epsilon: node.get_attr_opt::<f32>("epsilon")?.unwrap_or(1e-5),
            leaky,
        }),
        vec![],
    ))
}

impl Expansion for ConvBlockExpansion {
    fn name(&self) -> StaticName {
        CONV3X3.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, self.inputs + 2 + 2 * self.norm as usize)?;
        nhwc_rules(s, inputs, outputs, Some(self.k_out))?;
        s.equals(&outputs[0].shape[1], &inputs[0].shape[1])?;
        s.equals(&outputs[0].shape[2], &inputs[0].shape[2])?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let n = self.inputs;
        let weights = const_input(model, inputs[n], "conv weights")?;
        let bias = const_input(model, inputs[n + 1], "conv bias")?;
        let ws = weights.shape();
        ensure!(
            ws.len() == 4 && ws[0] == self.k_out && ws[2] == 3 && ws[3] == 3,
            "conv weights {ws:?}"
        );
        let mut channels = tvec!();
        for &i in &inputs[..n] {
            channels.push(nhwc(model.outlet_fact(i)?)?[2]);
        }
        ensure!(
            channels.iter().sum::<usize>() == ws[1],
            "inputs {channels:?} vs weights {ws:?}"
        );
        let conv = Conv3x3::new(
            self.tile,
            plain(&weights)?,
            plain(&bias)?,
            self.k_out,
            ws[1],
        );
        let norm = if self.norm {
            let gamma = const_input(model, inputs[n + 2], "norm scale")?;
            let beta = const_input(model, inputs[n + 3], "norm bias")?;
            Some(Arc::new(NormAct {
                gamma: plain(&gamma)?.to_vec(),
                beta: plain(&beta)?.to_vec(),
                epsilon: self.epsilon,
                leaky: self.leaky,
            }))
        } else {
            None
        };
        let op = ConvBlock {
            conv: Arc::new(conv),
            channels,
            norm,
        };
        model.wire_node(prefix, op, &inputs[..n])
    }
}

// ------------------------------------------------------------------------------------------------ 1 x 1 conv

/// 1 × 1 convolution.
#[derive(Debug, Clone)]
pub struct Pointwise(Arc<Dense>);

impl PartialEq for Pointwise {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for Pointwise {}

impl Op for Pointwise {
    fn name(&self) -> StaticName {
        POINTWISE.into()
    }
    op_as_typed_op!();
}

impl EvalOp for Pointwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [h, w, _] = nhwc_of(inputs[0].shape())?;
        let x = plain(&inputs[0])?;
        let out = f32_output([1, h, w, self.0.k_out()], |data| {
            self.0.pointwise(x, h * w, data, &Parallel::current())
        })?;
        Ok(tvec!(out))
    }
}

impl TypedOp for Pointwise {
    as_op!();
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [h, w, _] = nhwc(inputs[0])?;
        Ok(tvec!(f32::fact([1, h, w, self.0.k_out()])))
    }
}

#[derive(Debug, Clone)]
struct PointwiseExpansion {
    k_out: usize,
}

fn parse_pointwise(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let k_out = node.get_attr::<i64>("k_out")? as usize;
    Ok((expand(PointwiseExpansion { k_out }), vec![]))
}

impl Expansion for PointwiseExpansion {
    fn name(&self) -> StaticName {
        POINTWISE.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        nhwc_rules(s, inputs, outputs, Some(self.k_out))?;
        s.equals(&outputs[0].shape[1], &inputs[0].shape[1])?;
        s.equals(&outputs[0].shape[2], &inputs[0].shape[2])?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let weights = const_input(model, inputs[1], "conv weights")?;
        let bias = const_input(model, inputs[2], "conv bias")?;
        let ws = weights.shape().to_vec();
        ensure!(
            ws.len() == 4 && ws[0] == self.k_out && ws[2] == 1 && ws[3] == 1,
            "1x1 conv weights {ws:?}"
        );
        let c_in = ws[1];
        ensure!(
            nhwc(model.outlet_fact(inputs[0])?)?[2] == c_in,
            "1x1 conv input channels"
        );
        let w = plain(&weights)?;
        let dense = Dense::new(self.k_out, c_in, |k, c| w[k * c_in + c], plain(&bias)?);
        model.wire_node(prefix, Pointwise(Arc::new(dense)), &inputs[..1])
    }
}

// ------------------------------------------------------------------------------------------------ max pool

/// 2 × 2 max pooling, stride 2.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaxPool2x2;

impl Op for MaxPool2x2 {
    fn name(&self) -> StaticName {
        MAX_POOL.into()
    }
    op_as_typed_op!();
}

impl EvalOp for MaxPool2x2 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [h, w, c] = nhwc_of(inputs[0].shape())?;
        let x = plain(&inputs[0])?;
        let out = f32_output([1, h / 2, w / 2, c], |data| {
            max_pool_2x2(x, h, w, c, data, &Parallel::current())
        })?;
        Ok(tvec!(out))
    }
}

impl TypedOp for MaxPool2x2 {
    as_op!();
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [h, w, c] = nhwc(inputs[0])?;
        Ok(tvec!(f32::fact([1, h / 2, w / 2, c])))
    }
}

#[derive(Debug, Clone)]
struct MaxPoolExpansion;

fn parse_max_pool(
    _ctx: &ParsingContext,
    _node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(MaxPoolExpansion), vec![]))
}

impl Expansion for MaxPoolExpansion {
    fn name(&self) -> StaticName {
        MAX_POOL.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        nhwc_rules(s, inputs, outputs, None)?;
        for axis in [1, 2] {
            s.given(&inputs[0].shape[axis], move |s, d| {
                s.equals(&outputs[0].shape[axis], d.clone() / 2)
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
        model.wire_node(prefix, MaxPool2x2, inputs)
    }
}

// ------------------------------------------------------------------------------------------------ upsample

/// 2 × 2 transposed convolution with stride 2.
#[derive(Debug, Clone)]
pub struct Upsample(Arc<Upsample2x2>);

impl PartialEq for Upsample {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for Upsample {}

impl Op for Upsample {
    fn name(&self) -> StaticName {
        UPSAMPLE.into()
    }
    op_as_typed_op!();
}

impl EvalOp for Upsample {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [h, w, _] = nhwc_of(inputs[0].shape())?;
        let x = plain(&inputs[0])?;
        let out = f32_output([1, 2 * h, 2 * w, self.0.k_out()], |data| {
            self.0.run(x, h, w, data, &Parallel::current())
        })?;
        Ok(tvec!(out))
    }
}

impl TypedOp for Upsample {
    as_op!();
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [h, w, _] = nhwc(inputs[0])?;
        Ok(tvec!(f32::fact([1, 2 * h, 2 * w, self.0.k_out()])))
    }
}

#[derive(Debug, Clone)]
struct UpsampleExpansion {
    k_out: usize,
}

fn parse_upsample(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let k_out = node.get_attr::<i64>("k_out")? as usize;
    Ok((expand(UpsampleExpansion { k_out }), vec![]))
}

impl Expansion for UpsampleExpansion {
    fn name(&self) -> StaticName {
        UPSAMPLE.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        nhwc_rules(s, inputs, outputs, Some(self.k_out))?;
        for axis in [1, 2] {
            s.given(&inputs[0].shape[axis], move |s, d| {
                s.equals(&outputs[0].shape[axis], d.clone() * 2)
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
        let weights = const_input(model, inputs[1], "transposed conv weights")?;
        let bias = const_input(model, inputs[2], "transposed conv bias")?;
        let ws = weights.shape().to_vec();
        ensure!(
            ws.len() == 4 && ws[1] == self.k_out && ws[2] == 2 && ws[3] == 2,
            "transposed conv weights {ws:?}"
        );
        ensure!(
            nhwc(model.outlet_fact(inputs[0])?)?[2] == ws[0],
            "transposed conv input channels"
        );
        let up = Upsample2x2::new(plain(&weights)?, plain(&bias)?, ws[0], self.k_out);
        model.wire_node(prefix, Upsample(Arc::new(up)), &inputs[..1])
    }
}
