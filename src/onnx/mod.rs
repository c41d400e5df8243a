//! ONNX: finprint writes its networks to ONNX from its own module graph (the model files emit
//! their layers into a [`Graph`]) and runs them with tract (`OnnxNet`, pure Rust), so that
//! a trained run identifies photos without libtorch, or with onnxruntime (`OrtNet`), whose
//! convolutions are the fastest on a CPU for the large backbones.
//!
//! Only what the networks need is written: float tensors, opset 17, a batch dimension `N` and
//! fixed channels and pixels (the run's input size).

#[cfg(feature = "onnxruntime")]
mod onnxruntime;
pub mod proto;
#[cfg(feature = "onnx")]
mod run;

#[cfg(feature = "onnxruntime")]
pub use onnxruntime::{OrtNet, LIBRARY_VAR};
use proto::Message;
#[cfg(feature = "onnx")]
pub use run::OnnxNet;
use std::collections::{HashMap, HashSet};

/// What a written network takes and gives: one input `[N, C, H, W]` and one output `[N, D]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetShape {
    /// Channels, height and width of one input.
    pub chw: [usize; 3],
    /// Width of one output row.
    pub dim: usize,
}

impl NetShape {
    /// The values of one input image, after checking that `inputs` holds `n` of them.
    pub fn image_len(&self, inputs: &[f32], n: usize) -> anyhow::Result<usize> {
        let one: usize = self.chw.iter().product();
        anyhow::ensure!(
            inputs.len() == n * one,
            "{} input values for {n} images of {:?}",
            inputs.len(),
            self.chw
        );
        Ok(one)
    }
}

/// The operator set the graphs are written in.
pub const OPSET: i64 = 17;
/// ONNX IR version 8 (ONNX 1.10 and later read it).
const IR_VERSION: i64 = 8;
/// `TensorProto.DataType`.
const FLOAT: i64 = 1;
const INT64: i64 = 7;

/// A tensor of the graph being built: its name and shape, the batch dimension as −1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    pub name: String,
    pub shape: Vec<i64>,
}

impl Value {
    /// `[N, C, H, W]` of a feature map.
    pub fn nchw(&self) -> [i64; 4] {
        match self.shape[..] {
            [n, c, h, w] => [n, c, h, w],
            _ => panic!("{}: shape {:?} is not [N, C, H, W]", self.name, self.shape),
        }
    }
}

/// The geometry of a square 2-D convolution ([`Graph::conv2d`]).
#[derive(Clone, Copy, Debug)]
pub struct Conv {
    pub kernel: i64,
    pub stride: i64,
    pub dilation: i64,
    pub groups: i64,
    /// Padding at the top, left, bottom and right.
    pub pads: [i64; 4],
}

/// A node attribute.
#[derive(Clone, Debug)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// An ONNX graph under construction: nodes in the order they run, weights as initializers
/// under the checkpoint's variable names.
#[derive(Default)]
pub struct Graph {
    nodes: Vec<Message>,
    initializers: Vec<Message>,
    inputs: Vec<Message>,
    outputs: Vec<Message>,
    names: HashSet<String>,
    /// Constants already written, by name hint and bytes: written once, used by many nodes.
    constants: HashMap<(String, Vec<u8>), String>,
}

/// `ValueInfoProto` of a float tensor; −1 dimensions are the symbolic batch `N`.
fn value_info(v: &Value) -> Message {
    let mut shape = Message::default();
    for &d in &v.shape {
        let mut dim = Message::default();
        if d < 0 {
            dim.string(2, "N");
        } else {
            dim.int(1, d);
        }
        shape.message(1, &dim);
    }
    let mut tensor = Message::default();
    tensor.int(1, FLOAT).message(2, &shape);
    let mut ty = Message::default();
    ty.message(1, &tensor);
    let mut info = Message::default();
    info.string(1, &v.name).message(2, &ty);
    info
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    /// `hint`, or `hint` with the first free suffix `_1`, `_2`…: every name in a graph is unique.
    fn unique(&mut self, hint: &str) -> String {
        let mut name = hint.to_string();
        let mut k = 0;
        while !self.names.insert(name.clone()) {
            k += 1;
            name = format!("{hint}_{k}");
        }
        name
    }

    /// A float input of this shape (−1: the batch).
    pub fn input(&mut self, name: &str, shape: &[i64]) -> Value {
        let v = Value {
            name: self.unique(name),
            shape: shape.to_vec(),
        };
        self.inputs.push(value_info(&v));
        v
    }

    /// Mark `v` a graph output.
    pub fn output(&mut self, v: &Value) {
        self.outputs.push(value_info(v));
    }

    fn initializer(&mut self, name: &str, dims: &[i64], data_type: i64, raw: Vec<u8>) -> String {
        let name = self.unique(name);
        let mut t = Message::default();
        t.packed_ints(1, dims)
            .int(2, data_type)
            .string(8, &name)
            .bytes(9, &raw);
        self.initializers.push(t);
        name
    }

    /// A float weight of shape `dims` (row-major `data`); returns its name.
    pub fn weight(&mut self, name: &str, dims: &[i64], data: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<i64>(), data.len() as i64, "{name}");
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, dims, FLOAT, raw)
    }

    /// A constant, written once for all the nodes that use the same value under the same hint.
    fn constant(&mut self, name: &str, dims: &[i64], data_type: i64, raw: Vec<u8>) -> String {
        let key = (name.to_string(), raw);
        if let Some(known) = self.constants.get(&key) {
            return known.clone();
        }
        let written = self.initializer(name, dims, data_type, key.1.clone());
        self.constants.insert(key, written.clone());
        written
    }

    /// A float scalar (shape `[]`).
    pub fn scalar(&mut self, name: &str, v: f32) -> String {
        self.constant(name, &[], FLOAT, v.to_le_bytes().to_vec())
    }

    /// An int64 vector (shapes, axes).
    pub fn ints(&mut self, name: &str, data: &[i64]) -> String {
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant(name, &[data.len() as i64], INT64, raw)
    }

    /// Node `op` on `inputs` (names; "" for an omitted optional input), with one output of
    /// `shape` named after `name`.
    pub fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attrs: &[(&str, Attr)],
        shape: Vec<i64>,
    ) -> Value {
        let out = self.unique(name);
        let mut node = Message::default();
        for input in inputs {
            node.string(1, input);
        }
        node.string(2, &out).string(3, &out).string(4, op);
        for (key, value) in attrs {
            let mut a = Message::default();
            a.string(1, key);
            match value {
                Attr::Float(f) => a.float(2, *f).int(20, 1),
                Attr::Int(i) => a.int(3, *i).int(20, 2),
                Attr::Ints(is) => a.packed_ints(8, is).int(20, 7),
            };
            node.message(5, &a);
        }
        self.nodes.push(node);
        Value { name: out, shape }
    }

    /// A `Conv` node named `name` on the feature map `x`: weights `[C_out, C_in / groups, k, k]`
    /// and an optional bias, written as `NAME.weight` and `NAME.bias`.
    pub fn conv2d(
        &mut self,
        name: &str,
        x: &Value,
        (dims, weights): (&[i64], &[f32]),
        bias: Option<&[f32]>,
        c: Conv,
    ) -> Value {
        let [n, _, h, w] = x.nchw();
        let span = c.dilation * (c.kernel - 1);
        let [top, left, bottom, right] = c.pads;
        let out = |size: i64, pad: i64| (size + pad - span - 1) / c.stride + 1;
        let weight = self.weight(&format!("{name}.weight"), dims, weights);
        let bias = bias.map(|b| self.weight(&format!("{name}.bias"), &[dims[0]], b));
        let mut inputs = vec![x.name.as_str(), weight.as_str()];
        inputs.extend(bias.as_deref());
        let attrs = [
            ("kernel_shape", Attr::Ints(vec![c.kernel; 2])),
            ("strides", Attr::Ints(vec![c.stride; 2])),
            ("dilations", Attr::Ints(vec![c.dilation; 2])),
            ("pads", Attr::Ints(c.pads.to_vec())),
            ("group", Attr::Int(c.groups)),
        ];
        let shape = vec![n, dims[0], out(h, top + bottom), out(w, left + right)];
        self.node("Conv", name, &inputs, &attrs, shape)
    }

    /// The model file: `ModelProto` bytes.
    pub fn to_bytes(&self, name: &str) -> Vec<u8> {
        let mut graph = Message::default();
        for n in &self.nodes {
            graph.message(1, n);
        }
        graph.string(2, name);
        for t in &self.initializers {
            graph.message(5, t);
        }
        for v in &self.inputs {
            graph.message(11, v);
        }
        for v in &self.outputs {
            graph.message(12, v);
        }
        let mut opset = Message::default();
        opset.string(1, "").int(2, OPSET);
        let mut model = Message::default();
        model
            .int(1, IR_VERSION)
            .string(2, "finprint")
            .string(3, env!("CARGO_PKG_VERSION"))
            .message(7, &graph)
            .message(8, &opset);
        model.into_bytes()
    }
}
