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
use super::pooling::SentenceConfig;
use crate::error::{Result, RuntimeError};
use crate::generate::TextTokenizer;
use crate::model::{Hooks, ModelOptions};

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

/// A sentence-embedding model: encoder, tokenizer, pooling. Shared
/// read-only (`Send + Sync`).
pub struct SentenceEncoder {
    encoder: Encoder,
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
    /// Loads a checkpoint folder: config.json, weights, tokenizer.json and
    /// the sentence-transformers files.
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<Self> {
        Self::from_encoder(Encoder::load(dir, opts)?, dir)
    }

    /// Wraps a built encoder (merged weights, say) with the tokenizer and
    /// sentence-transformers files of `side_files` (the base's folder).
    pub fn from_encoder(encoder: Encoder, side_files: &Path) -> Result<Self> {
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
    pub fn encoder(&self) -> &Encoder {
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
        let device = self.encoder.device();
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
            let ids = Tensor::from_vec(ids, (batch.len(), width), device)?;
            let mask = Tensor::from_vec(mask, (batch.len(), width), device)?;
            let hidden = self
                .encoder
                .forward(&ids, None, Some(&mask), &mut Hooks::default())?;
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
