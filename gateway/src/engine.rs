//! The generation-facing part of the gateway: a served model wraps a
//! [`TextModel`] (model + tokenizer + chat template) built from a loaded
//! checkpoint or from merged tensors. Everything here is synchronous tensor
//! work, called from blocking threads, never from the async runtime.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use merger::moe::MoeModel;
use runtime::checkpoint::Checkpoint;
use runtime::generate::TextModel;
use runtime::model::{Model, ModelConfig, ModelOptions};

pub use runtime::generate::{ChatMessage, Completion, FinishReason, SamplingParams, TokenEvent};

/// A model ready to answer requests, shared read-only between requests.
pub struct Engine {
    text: TextModel,
    bytes: u64,
}

impl Engine {
    /// Loads a registered checkpoint (weights from its memory map). A saved
    /// routed ensemble (a folder `fusion merge` wrote for `we_moe`, ...)
    /// loads as the routed model it holds.
    pub fn from_checkpoint(ck: &Checkpoint, opts: &ModelOptions) -> merger::Result<Self> {
        let loaded = merger::load::load_checkpoint(ck, opts)?;
        let bytes = loaded.resident_bytes;
        Ok(Engine {
            text: loaded.into_text_model()?,
            bytes,
        })
    }

    /// Builds a model from merged tensors; the config and tokenizer come from
    /// `reference_dir` (the merge's base, or its first model).
    pub fn from_merge(
        merged: HashMap<String, Tensor>,
        reference_dir: &Path,
        opts: &ModelOptions,
    ) -> merger::Result<Self> {
        let config = ModelConfig::from_dir(reference_dir)?;
        let model = Model::from_tensors(config, merged, opts)?;
        Self::new(model, reference_dir)
    }

    /// Serves a routed ensemble, weighed by its resident bytes (backbone,
    /// experts and routers); the tokenizer comes from `tokenizer_dir` (the
    /// base's, or the saved ensemble's copy of it). With a KV cache,
    /// per-sequence routing is computed on the prompt and kept for the
    /// generated tokens.
    pub fn from_moe(built: MoeModel, tokenizer_dir: &Path) -> merger::Result<Self> {
        let bytes = built.bytes();
        let text = TextModel::from_model(built.into_model(), tokenizer_dir)?;
        Ok(Engine { text, bytes })
    }

    fn new(model: Model, tokenizer_dir: &Path) -> merger::Result<Self> {
        let bytes = (model.config().num_parameters() * model.dtype().size_in_bytes()) as u64;
        let text = TextModel::from_model(model, tokenizer_dir)?;
        Ok(Engine { text, bytes })
    }

    /// The runnable model (what evaluations score).
    pub fn text_model(&self) -> &TextModel {
        &self.text
    }

    /// Bytes of the model's weights in memory (what the cache weighs).
    pub fn resident_bytes(&self) -> u64 {
        self.bytes
    }

    /// Longest sequence (prompt and completion) the model accepts.
    pub fn context_length(&self) -> usize {
        self.text.model().config().max_position_embeddings
    }

    /// Token ids of a chat: the chat template with the generation prompt;
    /// with `split_special_tokens`, special-token markers in message content
    /// are plain text (see [`runtime::generate::TextModel::encode_chat`]).
    pub fn chat_prompt(
        &self,
        messages: &[ChatMessage],
        split_special_tokens: bool,
    ) -> merger::Result<Vec<u32>> {
        Ok(self.text.encode_chat(messages, split_special_tokens)?)
    }

    /// Token ids of a raw completion prompt.
    pub fn text_prompt(&self, prompt: &str) -> merger::Result<Vec<u32>> {
        Ok(self.text.encode(prompt)?)
    }

    /// Generates from `prompt`; `on_token` gets each text delta and returns
    /// false to stop (the client went away).
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> merger::Result<Completion> {
        Ok(self.text.generate(prompt, params, on_token)?)
    }

    /// Mean-pooled embeddings of `texts` and the number of tokens read.
    pub fn embed(&self, texts: &[String]) -> merger::Result<(Vec<Vec<f32>>, usize)> {
        Ok(self.text.embed(texts)?)
    }

    /// [`Engine::embed`] that stops once `cancelled()` (the client left).
    pub fn embed_until(
        &self,
        texts: &[String],
        cancelled: &dyn Fn() -> bool,
    ) -> merger::Result<(Vec<Vec<f32>>, usize)> {
        Ok(self.text.embed_until(texts, cancelled)?)
    }
}
