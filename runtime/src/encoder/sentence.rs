//! [`SentenceEncoder`]: an [`Encoder`] with its tokenizer and
//! sentence-transformers pipeline, computing sentence embeddings as
//! `SentenceTransformer.encode` does: each text tokenized with the
//! tokenizer.json post-processor (`[CLS]` … `[SEP]`), saved padding off,
//! truncated to `max_seq_length`; batches of similar lengths right-padded
//! under an attention mask; pooled and (with a `Normalize` module)
//! L2-normalized.

use std::path::Path;

use candle_core::Tensor;

use super::bert::Encoder;
use super::config::EncoderConfig;
use super::pooling::SentenceConfig;
use crate::error::{Result, RuntimeError};
use crate::generate::TextTokenizer;
use crate::model::{Hooks, ModelOptions};
use crate::onnx::{is_onnx_folder, OnnxEncoder};

/// Most texts in one forward pass.
const BATCH_TEXTS: usize = 32;
/// Most padded tokens in one forward pass.
const BATCH_TOKENS: usize = 8192;

/// Sentence embeddings of a list of texts.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceEmbeddings {
    /// One vector per text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens read per text (special tokens included, after truncation).
    pub tokens: Vec<usize>,
    /// Per text: whether it was cut to `max_seq_length`.
    pub truncated: Vec<bool>,
}

/// The network that turns token ids into token embeddings.
#[derive(Debug)]
pub enum Backbone {
    /// The candle encoder (safetensors weights).
    Candle(Encoder),
    /// An ONNX graph run by ONNX Runtime.
    Onnx(OnnxEncoder),
}

impl Backbone {
    /// The encoder's config.
    pub fn config(&self) -> &EncoderConfig {
        match self {
            Backbone::Candle(e) => e.config(),
            Backbone::Onnx(e) => e.config(),
        }
    }

    /// Bytes of weights in memory.
    pub fn resident_bytes(&self) -> u64 {
        match self {
            Backbone::Candle(e) => e.resident_bytes(),
            Backbone::Onnx(e) => e.resident_bytes(),
        }
    }

    /// `candle` or `onnxruntime`.
    pub fn runtime(&self) -> &'static str {
        match self {
            Backbone::Candle(_) => "candle",
            Backbone::Onnx(_) => "onnxruntime",
        }
    }

    /// Token embeddings `[batch, width, hidden]` of right-padded `ids`
    /// under `mask` (row-major `[batch, width]`).
    fn forward(
        &self,
        ids: Vec<u32>,
        mask: Vec<u32>,
        batch: usize,
        width: usize,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            Backbone::Candle(e) => {
                let device = e.device();
                let ids = Tensor::from_vec(ids, (batch, width), device)?;
                let mask = Tensor::from_vec(mask, (batch, width), device)?;
                let hidden = e.forward(&ids, None, Some(&mask), &mut Hooks::default())?;
                Ok((hidden, mask))
            }
            Backbone::Onnx(e) => {
                let hidden = e.forward(&ids, &mask, batch, width)?;
                let mask = Tensor::from_vec(mask, (batch, width), hidden.device())?;
                Ok((hidden, mask))
            }
        }
    }
}

impl From<Encoder> for Backbone {
    fn from(e: Encoder) -> Self {
        Backbone::Candle(e)
    }
}

impl From<OnnxEncoder> for Backbone {
    fn from(e: OnnxEncoder) -> Self {
        Backbone::Onnx(e)
    }
}

/// A sentence-embedding model: encoder, tokenizer, pooling. Shared
/// read-only (`Send + Sync`).
pub struct SentenceEncoder {
    encoder: Backbone,
    tokenizer: TextTokenizer,
    sentence: SentenceConfig,
}

impl std::fmt::Debug for SentenceEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEncoder")
            .field("encoder", &self.encoder)
            .field("sentence", &self.sentence)
            .finish()
    }
}

impl SentenceEncoder {
    /// Loads a checkpoint folder: config.json, weights (safetensors, or a
    /// `model.onnx` run by ONNX Runtime), tokenizer.json and the
    /// sentence-transformers files.
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<Self> {
        if is_onnx_folder(dir) {
            Self::from_encoder(OnnxEncoder::load(dir)?, dir)
        } else {
            Self::from_encoder(Encoder::load(dir, opts)?, dir)
        }
    }

    /// Wraps a built encoder (merged weights, say) with the tokenizer and
    /// sentence-transformers files of `side_files` (the base's folder).
    pub fn from_encoder(encoder: impl Into<Backbone>, side_files: &Path) -> Result<Self> {
        let encoder = encoder.into();
        let c = encoder.config();
        let sentence = SentenceConfig::from_dir(side_files, c.max_position_embeddings)?;
        let tokenizer = TextTokenizer::load(side_files)?;
        if tokenizer.vocab_size() > c.vocab_size {
            return Err(RuntimeError::Tokenizer {
                path: tokenizer.path().to_path_buf(),
                reason: format!(
                    "has {} tokens but the model's vocab_size is {}",
                    tokenizer.vocab_size(),
                    c.vocab_size
                ),
            });
        }
        let tokenizer = tokenizer.truncating(sentence.max_seq_length)?;
        Ok(SentenceEncoder {
            encoder,
            tokenizer,
            sentence,
        })
    }

    /// The encoder.
    pub fn encoder(&self) -> &Backbone {
        &self.encoder
    }

    /// The pooling pipeline.
    pub fn sentence_config(&self) -> &SentenceConfig {
        &self.sentence
    }

    /// The tokenizer (truncating to `max_seq_length`).
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Width of the embeddings.
    pub fn dimension(&self) -> usize {
        self.sentence.dimension(self.encoder.config().hidden_size)
    }

    /// Token ids of `text` as the model reads it, and whether it was cut.
    pub fn tokenize(&self, text: &str) -> Result<(Vec<u32>, bool)> {
        if self.sentence.lower_case {
            self.tokenizer.encode_truncated(&text.to_lowercase())
        } else {
            self.tokenizer.encode_truncated(text)
        }
    }

    /// The sentence embeddings of `texts`.
    pub fn embed(&self, texts: &[String]) -> Result<SentenceEmbeddings> {
        self.embed_until(texts, &|| false)
    }

    /// [`SentenceEncoder::embed`] that stops with [`RuntimeError::Cancelled`]
    /// once `cancelled()` says so (checked before each text is tokenized
    /// and before each batch runs).
    pub fn embed_until(
        &self,
        texts: &[String],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<SentenceEmbeddings> {
        let stop = || {
            if cancelled() {
                Err(RuntimeError::Cancelled)
            } else {
                Ok(())
            }
        };
        let mut seqs = Vec::with_capacity(texts.len());
        let mut truncated = Vec::with_capacity(texts.len());
        for (i, t) in texts.iter().enumerate() {
            stop()?;
            let (ids, cut) = self.tokenize(t)?;
            if ids.is_empty() {
                return Err(RuntimeError::InvalidInput(format!(
                    "input {i} has no tokens"
                )));
            }
            seqs.push(ids);
            truncated.push(cut);
        }
        // Longest first, as sentence-transformers sorts, so that batches
        // hold texts of similar lengths.
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
        let mut vectors = vec![Vec::new(); seqs.len()];
        let pad = self.encoder.config().pad_token_id;
        let mut start = 0;
        while start < order.len() {
            stop()?;
            let width = seqs[order[start]].len();
            let take = BATCH_TEXTS.min((BATCH_TOKENS / width).max(1));
            let batch = &order[start..(start + take).min(order.len())];
            let mut ids = Vec::with_capacity(batch.len() * width);
            let mut mask = Vec::with_capacity(batch.len() * width);
            for &i in batch {
                let s = &seqs[i];
                ids.extend_from_slice(s);
                ids.extend(std::iter::repeat_n(pad, width - s.len()));
                mask.extend(std::iter::repeat_n(1u32, s.len()));
                mask.extend(std::iter::repeat_n(0u32, width - s.len()));
            }
            let (hidden, mask) = self.encoder.forward(ids, mask, batch.len(), width)?;
            let pooled = self.sentence.pool(&hidden, &mask)?.to_vec2::<f32>()?;
            for (&i, v) in batch.iter().zip(pooled) {
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(RuntimeError::NonFinite {
                        what: format!("the embedding of input {i}"),
                        reason: "NaN or infinity after pooling".into(),
                    });
                }
                vectors[i] = v;
            }
            start += batch.len();
        }
        Ok(SentenceEmbeddings {
            vectors,
            tokens: seqs.iter().map(Vec::len).collect(),
            truncated,
        })
    }
}
