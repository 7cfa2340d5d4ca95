//! The model runtime of Fusion Gateway: what it takes to run one model.
//!
//! - [`checkpoint`]: Hugging Face checkpoint folders (safetensors, single
//!   file or sharded), read as hostile input into owned buffers, and the
//!   streaming writer;
//! - [`model`]: the architecture families on candle, configured from a
//!   `config.json` (a new family is one module plus one registration, see
//!   [`model::Family`]);
//! - [`generate`]: tokenizer, chat template, sampling, KV cache, token stream,
//!   log-likelihoods and embeddings ([`generate::TextModel`]);
//! - [`device`]: `auto | cpu | cuda:N`.
//!
//! The runtime knows no merge method: merged weights reach it as a tensor
//! map or a folder, and routed ensembles as replacement MLPs
//! ([`model::Model::set_mlp`]).

pub mod checkpoint;
pub mod device;
pub mod error;
pub mod generate;
pub mod model;

pub use error::{ErrorKind, Result, RuntimeError};
