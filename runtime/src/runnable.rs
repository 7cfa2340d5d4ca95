//! [`Runnable`]: a loaded model of any kind the runtime runs, a text
//! generator ([`TextModel`]), a sentence encoder ([`SentenceEncoder`]) or
//! an image encoder ([`ImageEncoder`]), with what they share (embeddings)
//! and a clear error for what only some can (generate, score, embed texts
//! or images).

use std::path::Path;
use std::sync::Arc;

use crate::architectures::{self, Kind};
use crate::encoder::SentenceEncoder;
use crate::error::{Result, RuntimeError};
use crate::generate::TextModel;
use crate::model::ModelOptions;
use crate::vision::{ImageEncoder, RgbImage};

/// A model ready to run.
#[derive(Debug)]
// Both variants are a few KB (tokenizers, configs; the weights live in
// tensors); one Runnable per model, never copied in a loop.
#[allow(clippy::large_enum_variant)]
pub enum Runnable {
    /// A decoder with its tokenizer and chat template.
    Text(Arc<TextModel>),
    /// An encoder with its tokenizer and sentence-transformers pooling.
    Embedding(SentenceEncoder),
    /// A vision tower with its image processor.
    Vision(ImageEncoder),
}

/// Embeddings of a list of texts.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// One vector per text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens read, all texts together (after truncation).
    pub tokens: usize,
    /// Texts cut to the model's `max_seq_length`.
    pub truncated: usize,
}

impl Runnable {
    /// Loads a plain checkpoint folder of any registered family.
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<Runnable> {
        match architectures::of_dir(dir)?.kind {
            Kind::Decoder => Ok(Runnable::Text(Arc::new(TextModel::load(dir, opts)?))),
            Kind::Encoder => Ok(Runnable::Embedding(SentenceEncoder::load(dir, opts)?)),
            Kind::Vision => Ok(Runnable::Vision(ImageEncoder::load(dir, opts)?)),
        }
    }

    /// The kind of network.
    pub fn kind(&self) -> Kind {
        match self {
            Runnable::Text(_) => Kind::Decoder,
            Runnable::Embedding(_) => Kind::Encoder,
            Runnable::Vision(_) => Kind::Vision,
        }
    }

    /// The text generator, or [`RuntimeError::WrongKind`] naming `what`
    /// needs one (`"chat completions"`).
    pub fn text(&self, what: &str) -> Result<&TextModel> {
        match self {
            Runnable::Text(t) => Ok(t),
            Runnable::Embedding(_) => Err(RuntimeError::WrongKind(format!(
                "{what} need a text-generation model; this is an embedding model, which only embeds texts"
            ))),
            Runnable::Vision(_) => Err(RuntimeError::WrongKind(format!(
                "{what} need a text-generation model; this is an image model, which only embeds \
                 (and classifies) images"
            ))),
        }
    }

    /// The image encoder, or [`RuntimeError::WrongKind`] naming `what`
    /// needs one.
    pub fn vision(&self, what: &str) -> Result<&ImageEncoder> {
        match self {
            Runnable::Vision(v) => Ok(v),
            other => Err(RuntimeError::WrongKind(format!(
                "{what} need an image model; this is a {} model",
                other.kind().task()
            ))),
        }
    }

    /// Longest input in tokens: the decoder's context, the encoder's
    /// `max_seq_length` (longer inputs are truncated to it), or a vision
    /// tower's positions (patches and the class token).
    pub fn context_length(&self) -> usize {
        match self {
            Runnable::Text(t) => t.model().config().max_position_embeddings,
            Runnable::Embedding(e) => e.sentence_config().max_seq_length,
            Runnable::Vision(v) => v.config().num_positions(),
        }
    }

    /// Width of the embeddings.
    pub fn dimension(&self) -> usize {
        match self {
            Runnable::Text(t) => t.model().config().hidden_size,
            Runnable::Embedding(e) => e.dimension(),
            Runnable::Vision(v) => v.dimension(),
        }
    }

    /// Embeddings of `texts`: sentence-transformers pooling for an encoder,
    /// mean-pooled final hidden states for a decoder. Stops with
    /// [`RuntimeError::Cancelled`] once `cancelled()` says so.
    pub fn embed_until(&self, texts: &[String], cancelled: &dyn Fn() -> bool) -> Result<Embedded> {
        match self {
            Runnable::Text(t) => {
                let (vectors, tokens) = t.embed_until(texts, cancelled)?;
                Ok(Embedded {
                    vectors,
                    tokens,
                    truncated: 0,
                })
            }
            Runnable::Embedding(e) => {
                let out = e.embed_until(texts, cancelled)?;
                Ok(Embedded {
                    vectors: out.vectors,
                    tokens: out.tokens.iter().sum(),
                    truncated: out.truncated.iter().filter(|&&t| t).count(),
                })
            }
            Runnable::Vision(_) => Err(RuntimeError::WrongKind(
                "this is an image model: it embeds images (data URLs or files), not texts".into(),
            )),
        }
    }

    /// Embeddings of `count` images decoded one at a time by `image(i)`
    /// (an image model only; others say so). See
    /// [`ImageEncoder::embed_each_until`].
    pub fn embed_each_image_until(
        &self,
        count: usize,
        image: &dyn Fn(usize) -> Result<RgbImage>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<Vec<f32>>> {
        self.vision("image embeddings")?
            .embed_each_until(count, image, cancelled)
    }

    /// Embeddings of `images` (an image model only; others say so).
    pub fn embed_images_until(
        &self,
        images: &[RgbImage],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<Vec<f32>>> {
        self.vision("image embeddings")?
            .embed_until(images, cancelled)
    }

    /// [`Runnable::embed_until`] without cancellation.
    pub fn embed(&self, texts: &[String]) -> Result<Embedded> {
        self.embed_until(texts, &|| false)
    }
}
