//! [`OnnxEncoder`]: a BERT-style encoder graph run by ONNX Runtime, with
//! the same contract as the candle [`crate::encoder::Encoder`] (token ids
//! and attention mask in, token embeddings out), so the sentence pipeline
//! (tokenizer, pooling, normalization) is shared.
//!
//! The graph's inputs must be `input_ids`, `attention_mask` and optionally
//! `token_type_ids` (int64 `[batch, sequence]`); its token embeddings are
//! the output named `last_hidden_state` or `token_embeddings`, else the
//! first float output of rank 3. Pooling outputs the graph may also have
//! are ignored: pooling follows the folder's sentence-transformers files.
//! A merge is served by replacing the graph's initializers with the merged
//! tensors (ONNX Runtime's `AddInitializer`); no model file is written.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use ort::session::Session;

use super::model::{onnx_file, OnnxModel};
use super::proto::{DataType, Dim};
use crate::encoder::EncoderConfig;
use crate::error::{Result, RuntimeError};

/// An ONNX encoder session. One run at a time per model (`Session::run`
/// takes `&mut`); ONNX Runtime parallelizes inside a run.
pub struct OnnxEncoder {
    model: Arc<OnnxModel>,
    session: Mutex<Session>,
    config: EncoderConfig,
    output: String,
    token_types: bool,
    /// Tensors replaced by a merge (0 for the file's own weights).
    replaced: usize,
}

impl std::fmt::Debug for OnnxEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxEncoder")
            .field("model", &self.model)
            .field("output", &self.output)
            .field("replaced", &self.replaced)
            .finish()
    }
}

fn ort_error(path: &Path, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Onnx {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

impl OnnxEncoder {
    /// Loads `dir/model.onnx` with the folder's config.json.
    pub fn load(dir: &Path) -> Result<OnnxEncoder> {
        let file = onnx_file(dir).ok_or_else(|| RuntimeError::NoWeights {
            path: dir.to_path_buf(),
        })?;
        // Refuse before reading a large file when there is no runtime.
        super::library::environment()?;
        let model = Arc::new(OnnxModel::open(&file)?);
        Self::with_weights(model, EncoderConfig::from_dir(dir)?, &HashMap::new())
    }

    /// A session over `model`'s graph with the initializers of `tensors`
    /// (Hugging Face names and layout, a merge's result) replacing the
    /// file's.
    pub fn with_weights(
        model: Arc<OnnxModel>,
        config: EncoderConfig,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<OnnxEncoder> {
        let env = super::library::environment()?;
        let path = model.path().to_path_buf();
        let graph = model.graph();
        let mut token_types = false;
        for input in &graph.inputs {
            if graph.initializer(&input.name).is_some() {
                continue;
            }
            match input.name.as_str() {
                "input_ids" | "attention_mask" => {}
                "token_type_ids" => token_types = true,
                other => {
                    return Err(ort_error(
                        &path,
                        format!(
                            "graph input `{other}` is not one of input_ids, attention_mask, token_type_ids"
                        ),
                    ))
                }
            }
        }
        for need in ["input_ids", "attention_mask"] {
            if !graph.inputs.iter().any(|i| i.name == need) {
                return Err(ort_error(&path, format!("the graph has no `{need}` input")));
            }
        }
        let rank3 = |o: &&super::proto::ValueInfo| {
            o.elem_type == Some(DataType::Float) && o.shape.as_ref().is_some_and(|s| s.len() == 3)
        };
        let output = graph
            .outputs
            .iter()
            .find(|o| o.name == "last_hidden_state" || o.name == "token_embeddings")
            .or_else(|| graph.outputs.iter().find(rank3))
            .ok_or_else(|| {
                ort_error(
                    &path,
                    "no token-embedding output (`last_hidden_state`, or a float output of rank 3)",
                )
            })?;
        if let Some(Dim::Value(h)) = output.shape.as_ref().and_then(|s| s.get(2)) {
            if *h as usize != config.hidden_size {
                return Err(ort_error(
                    &path,
                    format!(
                        "output `{}` has width {h} but config.json says hidden_size {}",
                        output.name, config.hidden_size
                    ),
                ));
            }
        }
        let output = output.name.clone();
        let replacements = if tensors.is_empty() {
            Vec::new()
        } else {
            model.initializers_for(tensors)?
        };
        let mut builder = Session::builder(env).map_err(|e| ort_error(&path, e))?;
        let replaced = replacements.len();
        for (name, (dims, values)) in replacements {
            let value = ort::value::Tensor::from_array((dims, values))
                .map_err(|e| ort_error(&path, format!("initializer `{name}`: {e}")))?;
            builder = builder
                .with_initializer(&name, Arc::new(value.into_dyn()))
                .map_err(|e| ort_error(&path, format!("initializer `{name}`: {e}")))?;
        }
        let session = builder
            .commit_from_memory(model.bytes())
            .map_err(|e| ort_error(&path, e))?;
        Ok(OnnxEncoder {
            model,
            session: Mutex::new(session),
            config,
            output,
            token_types,
            replaced,
        })
    }

    /// The config (from the folder's config.json).
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// The parsed model.
    pub fn model(&self) -> &Arc<OnnxModel> {
        &self.model
    }

    /// How many initializers a merge replaced.
    pub fn replaced(&self) -> usize {
        self.replaced
    }

    /// Bytes the model holds in memory (its initializers).
    pub fn resident_bytes(&self) -> u64 {
        self.model.weight_bytes()
    }

    /// Token embeddings `[batch, width, hidden]` (f32, on the CPU) of
    /// `ids` and `mask` (`[batch, width]`, row-major).
    pub fn forward(&self, ids: &[u32], mask: &[u32], batch: usize, width: usize) -> Result<Tensor> {
        let path = self.model.path();
        let shape = vec![batch, width];
        let as_i64 = |v: &[u32]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
        let tensor = |v: Vec<i64>| {
            ort::value::Tensor::from_array((shape.clone(), v)).map_err(|e| ort_error(path, e))
        };
        let mut inputs: Vec<(
            std::borrow::Cow<'static, str>,
            ort::session::SessionInputValue,
        )> = vec![
            ("input_ids".into(), tensor(as_i64(ids))?.into()),
            ("attention_mask".into(), tensor(as_i64(mask))?.into()),
        ];
        if self.token_types {
            inputs.push((
                "token_type_ids".into(),
                tensor(vec![0; batch * width])?.into(),
            ));
        }
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run(inputs).map_err(|e| ort_error(path, e))?;
        let (dims, data) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| ort_error(path, e))?;
        let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        if dims != [batch, width, self.config.hidden_size] {
            return Err(ort_error(
                path,
                format!(
                    "output `{}` has shape {dims:?}, expected [{batch}, {width}, {}]",
                    self.output, self.config.hidden_size
                ),
            ));
        }
        Ok(Tensor::from_slice(data, dims.as_slice(), &Device::Cpu)?)
    }
}

/// Whether `dir` is an ONNX checkpoint folder (a `model.onnx`, no
/// safetensors).
pub fn is_onnx_folder(dir: &Path) -> bool {
    onnx_file(dir).is_some()
}
