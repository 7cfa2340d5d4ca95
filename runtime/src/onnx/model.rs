//! [`OnnxModel`]: an ONNX model file read as hostile input, with its float
//! initializers named as the Hugging Face checkpoint names them.
//!
//! Exported transformer graphs name biases, LayerNorm and embedding tensors
//! by module path under an exporter prefix (`model.0.auto_model.`,
//! `inner.`), but give Linear weights anonymous names and the transposed
//! layout (`onnx::MatMul_470`, `[in, out]`). [`proto::hf_weight_names`]
//! follows the graph (the MatMul an initializer feeds and the named bias
//! added to its output) to map them; the prefix is the text before
//! `embeddings.word_embeddings.weight`. A merge reads the mapped tensors in
//! Hugging Face layout ([`OnnxModel::hf_tensors`]) and hands its results back
//! as initializers of the same graph ([`OnnxModel::initializers_for`]); a
//! fine-tune can be written as a copy of the file with its initializers
//! replaced in place ([`OnnxModel::patched`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::proto::{self, DataType};
use crate::error::{Result, RuntimeError};

/// The model file of an ONNX checkpoint folder.
pub const MODEL_FILE: &str = "model.onnx";

/// A tensor's shape and its f32 values, row-major.
pub type Shaped = (Vec<usize>, Vec<f32>);

/// One mapped initializer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// Its name in the graph.
    pub initializer: String,
    /// Stored as the transpose of the Hugging Face tensor.
    pub transposed: bool,
    /// Its dims in the graph.
    pub dims: Vec<usize>,
    /// Index into the graph's initializers.
    index: usize,
}

impl Mapped {
    /// The shape of the Hugging Face tensor.
    pub fn hf_shape(&self) -> Vec<usize> {
        if self.transposed {
            self.dims.iter().rev().copied().collect()
        } else {
            self.dims.clone()
        }
    }
}

/// A parsed ONNX model with its Hugging Face name mapping.
pub struct OnnxModel {
    path: PathBuf,
    bytes: Vec<u8>,
    graph: proto::Graph,
    prefix: String,
    /// Hugging Face name (prefix stripped) → initializer.
    names: BTreeMap<String, Mapped>,
    /// Integer initializers that hold weights (`*_q` of a quantized model).
    quantized: Vec<(String, DataType)>,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("path", &self.path)
            .field("prefix", &self.prefix)
            .field("mapped", &self.names.len())
            .field("quantized", &self.quantized.len())
            .finish()
    }
}

/// The model file of `dir`, when the folder holds one (and no safetensors:
/// a folder with both is served from its safetensors).
pub fn onnx_file(dir: &Path) -> Option<PathBuf> {
    let f = dir.join(MODEL_FILE);
    let has_safetensors = dir.join("model.safetensors").is_file()
        || dir.join("model.safetensors.index.json").is_file();
    (f.is_file() && !has_safetensors).then_some(f)
}

impl OnnxModel {
    /// Reads and parses `path` and maps its initializers.
    pub fn open(path: &Path) -> Result<OnnxModel> {
        let bytes = std::fs::read(path).map_err(|e| RuntimeError::io(path, e))?;
        Self::parse(path, bytes)
    }

    /// [`OnnxModel::open`] on bytes already read; `path` names them in
    /// errors.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<OnnxModel> {
        let corrupt = |e: proto::ProtoError| RuntimeError::CorruptOnnx {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let model = proto::Model::parse(&bytes).map_err(corrupt)?;
        let graph = model.graph;
        let mapped = proto::hf_weight_names(&graph).map_err(|e| RuntimeError::Onnx {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        const ANCHOR: &str = "embeddings.word_embeddings.weight";
        let prefix = graph
            .initializers
            .iter()
            .find_map(|t| t.name.find(ANCHOR).map(|i| t.name[..i].to_string()))
            .unwrap_or_default();
        let index: HashMap<&str, usize> = graph
            .initializers
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let mut names = BTreeMap::new();
        for m in mapped {
            let i = index[m.initializer.as_str()];
            let t = &graph.initializers[i];
            if t.data_type != DataType::Float {
                continue;
            }
            let hf = m
                .hf_name
                .strip_prefix(&prefix)
                .unwrap_or(&m.hf_name)
                .to_string();
            names.insert(
                hf,
                Mapped {
                    initializer: m.initializer,
                    transposed: m.transposed,
                    dims: t.dims.iter().map(|&d| d as usize).collect(),
                    index: i,
                },
            );
        }
        let quantized = graph
            .initializers
            .iter()
            .filter(|t| matches!(t.data_type, DataType::Int8 | DataType::Uint8))
            .map(|t| (t.name.clone(), t.data_type))
            .collect();
        Ok(OnnxModel {
            path: path.to_path_buf(),
            bytes,
            graph,
            prefix,
            names,
            quantized,
        })
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The parsed graph.
    pub fn graph(&self) -> &proto::Graph {
        &self.graph
    }

    /// The exporter's prefix of module paths (`model.0.auto_model.`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Hugging Face name → initializer, for every float initializer mapped.
    pub fn names(&self) -> &BTreeMap<String, Mapped> {
        &self.names
    }

    /// Integer (quantized) initializers holding weights.
    pub fn quantized(&self) -> &[(String, DataType)] {
        &self.quantized
    }

    /// Bytes of the float initializers (what the model weighs in memory).
    pub fn weight_bytes(&self) -> u64 {
        self.graph
            .initializers
            .iter()
            .map(|t| t.data.len() as u64)
            .sum()
    }

    fn error(&self, reason: String) -> RuntimeError {
        RuntimeError::Onnx {
            path: self.path.clone(),
            reason,
        }
    }

    /// Fails when the model has quantized initializers: they cannot be
    /// merged (a quantized model serves as it is).
    pub fn check_mergeable(&self) -> Result<()> {
        if let Some((name, dt)) = self.quantized.first() {
            return Err(self.error(format!(
                "initializer `{name}` is quantized ({dt}): a quantized model can be served \
                 but not merged ({} quantized initializers)",
                self.quantized.len()
            )));
        }
        Ok(())
    }

    /// One mapped tensor in Hugging Face layout (f32), by its Hugging Face
    /// name.
    pub fn hf_tensor(&self, name: &str) -> Result<Shaped> {
        let m = self
            .names
            .get(name)
            .ok_or_else(|| self.error(format!("no initializer maps to `{name}`")))?;
        let t = &self.graph.initializers[m.index];
        let values = t
            .to_f32()
            .map_err(|e| self.error(format!("initializer `{}`: {e}", m.initializer)))?;
        Ok(if m.transposed {
            (m.hf_shape(), transpose(&values, m.dims[0], m.dims[1]))
        } else {
            (m.dims.clone(), values)
        })
    }

    /// Every mapped tensor in Hugging Face layout; quantized models fail
    /// ([`OnnxModel::check_mergeable`]).
    pub fn hf_tensors(&self) -> Result<BTreeMap<String, Shaped>> {
        self.check_mergeable()?;
        self.names
            .keys()
            .map(|n| Ok((n.clone(), self.hf_tensor(n)?)))
            .collect()
    }

    /// The graph initializers that replace this model's for the tensors
    /// `tensors` (Hugging Face names and layout): initializer name, its dims
    /// and the values in the graph's layout. A tensor with no initializer, or of
    /// another shape than its initializer, fails naming it.
    pub fn initializers_for(
        &self,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<Vec<(String, Shaped)>> {
        self.check_mergeable()?;
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let t = &tensors[name];
            let m = self.names.get(name.as_str()).ok_or_else(|| {
                self.error(format!(
                    "merged tensor `{name}` has no initializer in the graph"
                ))
            })?;
            if t.dims() != m.hf_shape().as_slice() {
                return Err(self.error(format!(
                    "merged tensor `{name}` has shape {:?} but initializer `{}` holds {:?}",
                    t.dims(),
                    m.initializer,
                    m.hf_shape()
                )));
            }
            let values: Vec<f32> = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let values = if m.transposed {
                transpose(&values, m.dims[1], m.dims[0])
            } else {
                values
            };
            out.push((m.initializer.clone(), (m.dims.clone(), values)));
        }
        Ok(out)
    }

    /// A copy of the model file with the initializers of `tensors` (Hugging
    /// Face names and layout) replaced in place: the same graph, new weights.
    pub fn patched(&self, tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
        let mut out = self.bytes.clone();
        for (init, (_, values)) in self.initializers_for(tensors)? {
            let t = self
                .graph
                .initializer(&init)
                .expect("initializers_for names graph initializers");
            let at = t.raw_offset.ok_or_else(|| {
                self.error(format!(
                    "initializer `{init}` is not stored as raw data; it cannot be replaced in place"
                ))
            })?;
            let bytes: &[u8] = bytemuck::cast_slice(&values);
            out[at..at + bytes.len()].copy_from_slice(bytes);
        }
        Ok(out)
    }
}

/// The transpose of a row-major `rows × cols` matrix.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_is_an_involution_and_moves_elements() {
        let v: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let t = transpose(&v, 2, 3);
        assert_eq!(t, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(transpose(&t, 3, 2), v);
    }
}
