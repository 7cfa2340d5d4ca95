//! The model runtime of Fusion Gateway: what it takes to run one model.
//!
//! - [`checkpoint`]: Hugging Face checkpoint folders (safetensors, single
//!   file or sharded), read as hostile input into owned buffers, and the
//!   streaming writer;
//! - [`architectures`]: the registry of architecture families, recognised
//!   from a `config.json` (a new family is one module plus one entry there);
//! - [`model`]: the decoder-only transformer (Llama, Mistral, Qwen2) on
//!   candle;
//! - [`encoder`]: the BERT encoder and sentence embeddings as
//!   sentence-transformers computes them;
//! - [`generate`]: tokenizer, chat template, sampling, KV cache, token stream,
//!   log-likelihoods and embeddings ([`generate::TextModel`]);
//! - [`vision`]: CLIP's vision tower (image embeddings);
//! - [`runnable`]: a loaded model of either kind ([`Runnable`]);
//! - [`device`]: `auto | cpu | cuda:N`.
//!
//! The runtime knows no merge method: merged weights reach it as a tensor
//! map or a folder, and routed ensembles as replacement MLPs
//! ([`model::Model::set_mlp`]).
//!
//! Load a checkpoint folder and run it (here a tiny random Llama written
//! first):
//!
//! ```
//! use candle_core::{DType, Tensor};
//! use runtime::checkpoint::Checkpoint;
//! use runtime::model::random::{random_weights, write_checkpoint};
//! use runtime::model::{Model, ModelConfig, ModelOptions};
//!
//! # fn main() -> runtime::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let config = ModelConfig::from_json(
//!     r#"{"model_type": "llama", "vocab_size": 40, "hidden_size": 32,
//!         "intermediate_size": 48, "num_hidden_layers": 2,
//!         "num_attention_heads": 4, "num_key_value_heads": 2,
//!         "max_position_embeddings": 16}"#,
//!     dir.path(),
//! )?;
//! write_checkpoint(dir.path(), &config, &random_weights(&config, 0, 0.02)?, DType::F32)?;
//!
//! // The checkpoint: every tensor's name, dtype and shape, read lazily.
//! let ck = Checkpoint::open("tiny", dir.path())?;
//! assert_eq!(ck.entry("model.embed_tokens.weight").unwrap().shape, [40, 32]);
//!
//! // The model: logits for every position.
//! let model = Model::load(dir.path(), &ModelOptions::default())?;
//! let ids = Tensor::new(&[[1u32, 5, 7]], model.device())?;
//! assert_eq!(model.forward(&ids, None)?.dims(), [1, 3, 40]);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod architectures;
pub mod cache;
pub mod checkpoint;
pub mod device;
pub mod encoder;
pub mod error;
pub mod generate;
pub mod model;
pub mod onnx;
pub mod runnable;
pub mod vision;

pub use error::{ErrorKind, Result, RuntimeError};
pub use runnable::{Embedded, Runnable};
