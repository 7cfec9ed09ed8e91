//! The load-time graph rewrite: ONNX nodes the fast ops implement exactly are replaced by custom nodes (parsed by
//! [`super::ops`]), on NHWC tensors, with Transposes inserted where the layout changes. Everything else is left to
//! tract as it is.
//!
//! Replaced, when their weights are initializers and their attributes are the plain case:
//! * `Conv` 3 × 3 (stride 1, padding 1, group 1), together with a `Concat` on channels in front of it and an
//!   `InstanceNormalization` (+ `LeakyRelu`) after it when nothing else reads the fused tensors;
//! * `Conv` 1 × 1 (stride 1, no padding, group 1);
//! * `MaxPool` 2 × 2 stride 2 and `ConvTranspose` 2 × 2 stride 2 whose input is already NHWC.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{AttributeProto, GraphProto, ModelProto, NodeProto};

use super::ops::{CONV3X3, DOMAIN, MAX_POOL, POINTWISE, UPSAMPLE};
use super::winograd::Method;

/// What the rewrite did (for the log and the tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub conv3x3: usize,
    pub pointwise: usize,
    pub max_pool: usize,
    pub upsample: usize,
    pub fused_concats: usize,
    pub fused_norms: usize,
    pub transposes: usize,
}

impl Report {
    pub fn replaced(&self) -> usize {
        self.conv3x3 + self.pointwise + self.max_pool + self.upsample
    }
}

const TO_NHWC: [i64; 4] = [0, 2, 3, 1];
const TO_NCHW: [i64; 4] = [0, 3, 1, 2];

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

fn int(node: &NodeProto, name: &str) -> Option<i64> {
    attr(node, name).map(|a| a.i)
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: 2,
        i,
        ..Default::default()
    }
}

fn float_attr(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: 1,
        f,
        ..Default::default()
    }
}

/// Whether `node` has `name` unset or equal to `want`.
fn ints_are(node: &NodeProto, name: &str, want: &[i64]) -> bool {
    ints(node, name).is_none_or(|v| v == want)
}

fn plain_auto_pad(node: &NodeProto) -> bool {
    attr(node, "auto_pad").is_none_or(|a| a.s.is_empty() || a.s == b"NOTSET")
}

struct Graph<'a> {
    /// dims of every initializer, by name (Identity aliases resolved to their source)
    constants: HashMap<String, Vec<i64>>,
    /// Identity outputs that alias an initializer
    alias: HashMap<String, String>,
    /// the nodes reading each tensor (graph outputs count as readers too)
    readers: HashMap<String, Vec<usize>>,
    producer: HashMap<String, usize>,
    nodes: &'a [NodeProto],
}

impl<'a> Graph<'a> {
    fn new(graph: &'a GraphProto) -> Self {
        let mut constants: HashMap<String, Vec<i64>> = graph
            .initializer
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone()))
            .collect();
        let mut alias = HashMap::new();
        let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
        let mut producer = HashMap::new();
        for (i, node) in graph.node.iter().enumerate() {
            if node.op_type == "Identity" && node.input.len() == 1 && node.output.len() == 1 {
                let src = alias
                    .get(&node.input[0])
                    .cloned()
                    .unwrap_or(node.input[0].clone());
                if let Some(dims) = constants.get(&src).cloned() {
                    constants.insert(node.output[0].clone(), dims);
                    alias.insert(node.output[0].clone(), src);
                }
            }
            for input in node.input.iter().filter(|s| !s.is_empty()) {
                readers.entry(input.clone()).or_default().push(i);
            }
            for output in &node.output {
                producer.insert(output.clone(), i);
            }
        }
        for output in &graph.output {
            readers
                .entry(output.name.clone())
                .or_default()
                .push(usize::MAX);
        }
        Graph {
            constants,
            alias,
            readers,
            producer,
            nodes: &graph.node,
        }
    }

    /// The initializer behind `name`, with its dims.
    fn constant(&self, name: &str) -> Option<(String, &Vec<i64>)> {
        let root = self.alias.get(name).map_or(name, String::as_str);
        self.constants.get(root).map(|d| (root.to_owned(), d))
    }

    /// The only node reading `tensor`, if exactly one node (and not a graph output) reads it.
    fn sole_reader(&self, tensor: &str) -> Option<usize> {
        match self.readers.get(tensor).map(Vec::as_slice) {
            Some(&[i]) if i != usize::MAX => Some(i),
            _ => None,
        }
    }
}

/// A node of the new graph to emit at the position of `at` (the first node it replaces).
struct Fused {
    /// activation inputs (in NCHW naming of the original graph)
    inputs: Vec<String>,
    constants: Vec<String>,
    output: String,
    op_type: &'static str,
    attributes: Vec<AttributeProto>,
}

/// Rewrites `model`'s main graph in place, with 3 × 3 convolutions computed by `method`, and says what it
/// replaced.
pub fn rewrite(model: &mut ModelProto, method: Method) -> Report {
    let Some(graph) = model.graph.as_mut() else {
        return Report::default();
    };
    let mut report = Report::default();
    let (plans, removed) = plan(graph, method, &mut report);
    let graph_outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();

    let mut out = Vec::with_capacity(graph.node.len());
    let mut layouts = Layouts::default();
    for (i, node) in graph.node.iter().enumerate() {
        if let Some(fused) = plans.get(&i) {
            let mut inputs: Vec<String> = fused
                .inputs
                .iter()
                .map(|x| layouts.nhwc(x, &mut out, &mut report))
                .collect();
            inputs.extend(fused.constants.iter().cloned());
            let nhwc_name = if graph_outputs.contains(&fused.output) {
                format!("{}__nhwc", fused.output)
            } else {
                fused.output.clone()
            };
            out.push(NodeProto {
                name: format!(
                    "{}__fast",
                    if node.name.is_empty() {
                        &fused.output
                    } else {
                        &node.name
                    }
                ),
                op_type: fused.op_type.into(),
                domain: DOMAIN.into(),
                input: inputs,
                output: vec![nhwc_name.clone()],
                attribute: fused.attributes.clone(),
                ..Default::default()
            });
            layouts.produced_nhwc(&fused.output, &nhwc_name);
            if nhwc_name != fused.output {
                // graph outputs keep their name and layout
                out.push(transpose(&nhwc_name, &fused.output, TO_NCHW));
                report.transposes += 1;
                layouts
                    .nchw
                    .insert(fused.output.clone(), fused.output.clone());
            }
        } else if !removed.contains(&i) {
            let mut node = node.clone();
            for input in node.input.iter_mut().filter(|s| !s.is_empty()) {
                *input = layouts.nchw(input, &mut out, &mut report);
            }
            out.push(node);
        }
    }
    graph.node = out;
    // shape hints of tensors that are NHWC now would contradict their producers
    graph
        .value_info
        .retain(|v| !layouts.produced.contains(&v.name));
    report
}

/// Decides the replacements: the fused node for each replaced node that comes first, and every node it absorbs.
fn plan(
    graph: &GraphProto,
    method: Method,
    report: &mut Report,
) -> (HashMap<usize, Fused>, HashSet<usize>) {
    let g = Graph::new(graph);
    let mut plans = HashMap::new();
    let mut removed = HashSet::new();
    // tensors the fast ops will produce (NHWC), for the ops that only pay off on NHWC inputs
    let mut fast_tensors: HashSet<String> = HashSet::new();
    for (i, node) in graph.node.iter().enumerate() {
        if removed.contains(&i) {
            continue;
        }
        let fused = match node.op_type.as_str() {
            "Conv" => conv(&g, i, node, method, &mut removed, report),
            "MaxPool" if fast_tensors.contains(&node.input[0]) => max_pool(node, report),
            "ConvTranspose" if fast_tensors.contains(&node.input[0]) => {
                upsample(&g, node, method, report)
            }
            _ => None,
        };
        if let Some(f) = fused {
            fast_tensors.insert(f.output.clone());
            plans.insert(i, f);
        }
    }
    (plans, removed)
}

fn conv(
    g: &Graph,
    i: usize,
    node: &NodeProto,
    method: Method,
    removed: &mut HashSet<usize>,
    report: &mut Report,
) -> Option<Fused> {
    if node.input.len() < 2 || node.output.len() != 1 || !plain_auto_pad(node) {
        return None;
    }
    let (weights, dims) = g.constant(&node.input[1])?;
    let bias = match node.input.get(2).filter(|s| !s.is_empty()) {
        Some(b) => g.constant(b)?.0,
        None => return None,
    };
    if dims.len() != 4
        || int(node, "group").unwrap_or(1) != 1
        || !ints_are(node, "strides", &[1, 1])
    {
        return None;
    }
    if !ints_are(node, "dilations", &[1, 1]) {
        return None;
    }
    let k_out = dims[0];
    let kernel = [dims[2], dims[3]];
    if !ints_are(node, "kernel_shape", &kernel) {
        return None;
    }
    if kernel == [1, 1] && ints_are(node, "pads", &[0, 0, 0, 0]) {
        report.pointwise += 1;
        return Some(Fused {
            inputs: vec![node.input[0].clone()],
            constants: vec![weights, bias],
            output: node.output[0].clone(),
            op_type: POINTWISE,
            attributes: vec![int_attr("k_out", k_out)],
        });
    }
    if kernel != [3, 3] || ints(node, "pads").as_deref() != Some(&[1, 1, 1, 1]) {
        return None;
    }
    let mut inputs = vec![node.input[0].clone()];
    // a channel Concat only this convolution reads
    if let Some(&c) = g.producer.get(&node.input[0]) {
        let concat = &g.nodes[c];
        if concat.op_type == "Concat"
            && matches!(int(concat, "axis"), Some(1) | Some(-3))
            && g.sole_reader(&concat.output[0]) == Some(i)
            && concat.input.iter().all(|s| !s.is_empty())
        {
            inputs = concat.input.clone();
            removed.insert(c);
            report.fused_concats += 1;
        }
    }
    let mut constants = vec![weights, bias];
    let mut output = node.output[0].clone();
    let mut attributes = vec![
        int_attr("inputs", inputs.len() as i64),
        int_attr("k_out", k_out),
    ];
    attributes.push(match method {
        Method::Winograd(tile) => int_attr("winograd_m", tile.m() as i64),
        Method::Bf16 => int_attr("bf16", 1),
    });
    // an InstanceNormalization (with constant scale and bias) only this convolution feeds, and its LeakyRelu
    if let Some(n) = g.sole_reader(&output) {
        let norm = &g.nodes[n];
        let params = (norm.op_type == "InstanceNormalization"
            && norm.input.len() == 3
            && norm.input[0] == output)
            .then(|| Some((g.constant(&norm.input[1])?.0, g.constant(&norm.input[2])?.0)))
            .flatten();
        if let Some((scale, shift)) = params {
            removed.insert(n);
            report.fused_norms += 1;
            constants.extend([scale, shift]);
            attributes.push(int_attr("norm", 1));
            attributes.push(float_attr(
                "epsilon",
                attr(norm, "epsilon").map_or(1e-5, |a| a.f),
            ));
            output = norm.output[0].clone();
            if let Some(a) = g.sole_reader(&output) {
                let act = &g.nodes[a];
                if act.op_type == "LeakyRelu" && act.input[0] == output {
                    removed.insert(a);
                    attributes.push(float_attr(
                        "leaky_alpha",
                        attr(act, "alpha").map_or(0.01, |a| a.f),
                    ));
                    output = act.output[0].clone();
                }
            }
        }
    }
    report.conv3x3 += 1;
    Some(Fused {
        inputs,
        constants,
        output,
        op_type: CONV3X3,
        attributes,
    })
}

fn max_pool(node: &NodeProto, report: &mut Report) -> Option<Fused> {
    let plain = node.output.len() == 1
        && ints(node, "kernel_shape").as_deref() == Some(&[2, 2])
        && ints(node, "strides").as_deref() == Some(&[2, 2])
        && ints_are(node, "pads", &[0, 0, 0, 0])
        && ints_are(node, "dilations", &[1, 1])
        && int(node, "ceil_mode").unwrap_or(0) == 0
        && int(node, "storage_order").unwrap_or(0) == 0
        && plain_auto_pad(node);
    plain.then(|| {
        report.max_pool += 1;
        Fused {
            inputs: vec![node.input[0].clone()],
            constants: vec![],
            output: node.output[0].clone(),
            op_type: MAX_POOL,
            attributes: vec![],
        }
    })
}

fn upsample(g: &Graph, node: &NodeProto, method: Method, report: &mut Report) -> Option<Fused> {
    let (weights, dims) = g.constant(node.input.get(1)?)?;
    let bias = g.constant(node.input.get(2).filter(|s| !s.is_empty())?)?.0;
    let plain = node.output.len() == 1
        && dims.len() == 4
        && dims[2..] == [2, 2]
        && ints_are(node, "kernel_shape", &[2, 2])
        && ints(node, "strides").as_deref() == Some(&[2, 2])
        && ints_are(node, "pads", &[0, 0, 0, 0])
        && ints_are(node, "dilations", &[1, 1])
        && ints_are(node, "output_padding", &[0, 0])
        && attr(node, "output_shape").is_none()
        && int(node, "group").unwrap_or(1) == 1
        && plain_auto_pad(node);
    plain.then(|| {
        report.upsample += 1;
        Fused {
            inputs: vec![node.input[0].clone()],
            constants: vec![weights, bias],
            output: node.output[0].clone(),
            op_type: UPSAMPLE,
            attributes: vec![
                int_attr("k_out", dims[1]),
                int_attr("bf16", (method == Method::Bf16) as i64),
            ],
        }
    })
}

fn transpose(input: &str, output: &str, perm: [i64; 4]) -> NodeProto {
    NodeProto {
        name: format!("{output}__transpose"),
        op_type: "Transpose".into(),
        input: vec![input.into()],
        output: vec![output.into()],
        attribute: vec![AttributeProto {
            name: "perm".into(),
            r#type: 7,
            ints: perm.to_vec(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The names of each tensor's NHWC and NCHW versions, with Transposes emitted on first need.
#[derive(Default)]
struct Layouts {
    /// tensor -> its NHWC version
    nhwc: HashMap<String, String>,
    /// tensor produced NHWC by a fast op -> its NCHW version, once one exists
    nchw: HashMap<String, String>,
    produced: HashSet<String>,
}

impl Layouts {
    fn produced_nhwc(&mut self, tensor: &str, nhwc_name: &str) {
        self.produced.insert(tensor.into());
        self.nhwc.insert(tensor.into(), nhwc_name.into());
    }

    fn nhwc(&mut self, tensor: &str, out: &mut Vec<NodeProto>, report: &mut Report) -> String {
        if let Some(n) = self.nhwc.get(tensor) {
            return n.clone();
        }
        let name = format!("{tensor}__nhwc");
        out.push(transpose(tensor, &name, TO_NHWC));
        report.transposes += 1;
        self.nhwc.insert(tensor.into(), name.clone());
        name
    }

    fn nchw(&mut self, tensor: &str, out: &mut Vec<NodeProto>, report: &mut Report) -> String {
        if !self.produced.contains(tensor) {
            return tensor.into();
        }
        if let Some(n) = self.nchw.get(tensor) {
            return n.clone();
        }
        let name = format!("{tensor}__nchw");
        out.push(transpose(&self.nhwc[tensor], &name, TO_NCHW));
        report.transposes += 1;
        self.nchw.insert(tensor.into(), name.clone());
        name
    }
}
