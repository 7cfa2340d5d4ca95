//! Encoder models (the BERT family) and sentence embeddings as
//! sentence-transformers computes them.
//!
//! - [`config`]: `EncoderConfig` from a Hugging Face `config.json`
//!   (`model_type: bert`);
//! - [`bert`]: the [`Encoder`] (`BertModel`) on candle, fed weights by their
//!   Hugging Face names, with the decoder's hooks (captured linear inputs,
//!   a differentiable forward);
//! - [`pooling`]: the sentence-transformers pipeline of a checkpoint folder
//!   (`modules.json`, `1_Pooling/config.json`, `Normalize`,
//!   `sentence_bert_config.json`);
//! - [`sentence`]: [`SentenceEncoder`], the encoder with its tokenizer and
//!   pooling: texts in, embeddings out.

pub mod bert;
pub mod config;
pub mod pooling;
pub mod sentence;

pub use bert::Encoder;
pub use config::{Activation, EncoderConfig};
pub use pooling::{PoolingMode, SentenceConfig};
pub use sentence::{Backbone, SentenceEmbeddings, SentenceEncoder};
