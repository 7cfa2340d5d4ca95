//! The generation-facing part of the gateway: a served model wraps a
//! [`TextModel`] (model + tokenizer + chat template) built from a loaded
//! checkpoint or from merged tensors. Everything here is synchronous tensor
//! work, called from blocking threads, never from the async runtime.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use merger::checkpoint::Checkpoint;
use merger::generate::TextModel;
use merger::model::{Model, ModelConfig, ModelOptions};

pub use merger::generate::{ChatMessage, Completion, FinishReason, SamplingParams, TokenEvent};

/// A model ready to answer requests, shared read-only between requests.
pub struct Engine {
    text: TextModel,
    bytes: u64,
}

impl Engine {
    /// Loads a registered checkpoint (weights from its memory map).
    pub fn from_checkpoint(ck: &Checkpoint, opts: &ModelOptions) -> merger::Result<Self> {
        let config = ModelConfig::from_dir(ck.dir())?;
        let model = Model::from_checkpoint(config, ck, opts)?;
        Self::new(model, ck.dir())
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

    /// Token ids of a chat: the chat template with the generation prompt.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> merger::Result<Vec<u32>> {
        let text = self.text.apply_chat_template(messages)?;
        self.text.encode(&text)
    }

    /// Token ids of a raw completion prompt.
    pub fn text_prompt(&self, prompt: &str) -> merger::Result<Vec<u32>> {
        self.text.encode(prompt)
    }

    /// Generates from `prompt`; `on_token` gets each text delta and returns
    /// false to stop (the client went away).
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> merger::Result<Completion> {
        self.text.generate(prompt, params, on_token)
    }

    /// Mean-pooled embeddings of `texts` and the number of tokens read.
    pub fn embed(&self, texts: &[String]) -> merger::Result<(Vec<Vec<f32>>, usize)> {
        self.text.embed(texts)
    }
}
