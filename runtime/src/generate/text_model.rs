//! [`TextModel`]: a [`Model`] with its tokenizer, chat template and
//! end-of-sequence ids, and the decoding loop.
//!
//! `generate` runs the prompt through the model once (filling a KV cache of
//! its own), then feeds one token at a time. It stops at an end-of-sequence
//! id (config.json's `eos_token_id`, generation_config.json's, and
//! tokenizer_config.json's `eos_token`), after `max_tokens`, when the
//! sequence reaches `max_position_embeddings`, or at a stop sequence. Every
//! generated token is reported to `on_token` with the text it releases:
//! complete characters only, held back while it may start a stop sequence.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;

use super::sampling::SamplingParams;
use super::sequence::Sequence;
use super::template::{ChatMessage, ChatTemplate};
use super::tokenizer::TextTokenizer;
use crate::error::{Result, RuntimeError};
use crate::model::{Model, ModelDelta, ModelOptions};

/// One generated token, as streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEvent {
    /// The token id.
    pub token: u32,
    /// New text released with this token (may be empty: part of a
    /// character, a special token, or text that may start a stop sequence).
    pub text: String,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop sequence, or the caller asked to stop.
    Stop,
    /// `max_tokens`, or the model's context (`max_position_embeddings`) is full.
    Length,
}

impl FinishReason {
    /// OpenAI's name: `"stop"` or `"length"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The result of [`TextModel::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The completion text (special tokens and the stop sequence left out);
    /// the concatenation of every streamed [`TokenEvent::text`].
    pub text: String,
    /// Every generated token id, an end-of-sequence token included.
    pub tokens: Vec<u32>,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (`tokens.len()`).
    pub completion_tokens: usize,
    /// Why generation ended.
    pub finish_reason: FinishReason,
}

/// A language model ready to generate text: weights, tokenizer, chat
/// template. Shared read-only (`Send + Sync`); each call has its own cache.
pub struct TextModel {
    model: Model,
    tokenizer: TextTokenizer,
    template: Arc<ChatTemplate>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for TextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextModel")
            .field("config", self.model.config())
            .field("tokenizer", &self.tokenizer)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl TextModel {
    /// Loads a checkpoint folder: config.json, weights, tokenizer.json,
    /// tokenizer_config.json (optional) and generation_config.json (optional).
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<TextModel> {
        let model = Model::load(dir, opts)?;
        Self::from_model(model, dir)
    }

    /// Wraps a built model (merged weights, say) with the tokenizer files of
    /// `tokenizer_dir` (the base checkpoint's folder).
    pub fn from_model(model: Model, tokenizer_dir: &Path) -> Result<TextModel> {
        let tokenizer = TextTokenizer::load(tokenizer_dir)?;
        let vocab = model.config().vocab_size;
        if tokenizer.vocab_size() > vocab {
            return Err(RuntimeError::Tokenizer {
                path: tokenizer.path().to_path_buf(),
                reason: format!(
                    "has {} tokens but the model's vocab_size is {vocab}",
                    tokenizer.vocab_size()
                ),
            });
        }
        let c = tokenizer.config();
        let template = ChatTemplate::new(
            c.chat_template.as_deref(),
            c.bos_token.as_deref(),
            c.eos_token.as_deref(),
        )?;
        let mut eos_ids = model.config().eos_token_ids.clone();
        eos_ids.extend(generation_config_eos(tokenizer_dir)?);
        eos_ids.extend(tokenizer.eos_id());
        eos_ids.sort_unstable();
        eos_ids.dedup();
        eos_ids.retain(|&id| (id as usize) < vocab);
        Ok(TextModel {
            model,
            tokenizer,
            template: Arc::new(template),
            eos_ids,
        })
    }

    /// This model with a merge's `delta` over its weights
    /// ([`Model::with_delta`]): the same tokenizer, template and weights
    /// (shared, not copied), plus the delta.
    pub fn with_delta(&self, delta: Arc<ModelDelta>) -> Result<TextModel> {
        Ok(TextModel {
            model: Model::with_delta(&self.model, delta)?,
            tokenizer: self.tokenizer.clone(),
            template: self.template.clone(),
            eos_ids: self.eos_ids.clone(),
        })
    }

    /// The underlying model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The tokenizer (raw encoding without a BOS: [`TextTokenizer::encode`]).
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Token ids of a text prompt as Hugging Face's `tokenizer(text)` gives
    /// them: the tokenizer.json post-processor adds what the checkpoint
    /// declares (a BOS for Llama-style tokenizers, nothing without a
    /// post-processor); special-token markers in the text are parsed.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode_with_special_tokens(text)
    }

    /// Token ids of a conversation rendered by the chat template with the
    /// generation prompt. With `split_special_tokens` (Hugging Face's name),
    /// special-token markers inside message content (`<|assistant|>`,
    /// `</s>`) are encoded as plain text, so only the template inserts
    /// special tokens and a message cannot forge a turn; without it the
    /// rendered text is encoded as a whole, markers parsed everywhere (the
    /// Hugging Face default). As `apply_chat_template(tokenize=True)` does,
    /// the rendered text is encoded without the post-processor: the template
    /// writes its own BOS (`{{ bos_token }}`) or none.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        split_special_tokens: bool,
    ) -> Result<Vec<u32>> {
        if !split_special_tokens {
            return self.tokenizer.encode(&self.apply_chat_template(messages)?);
        }
        let chat = self.template.render_with_content(messages, true)?;
        self.tokenizer
            .encode_with_literals(&chat.text, &chat.content)
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true)
    }

    /// The conversation rendered by the chat template, ending with the
    /// generation prompt (the start of the assistant's turn).
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        self.template.render(messages, true)
    }

    /// Generates a completion of `prompt` (token ids, BOS included if the
    /// model wants one: see [`TextModel::encode`]). `on_token` sees every
    /// generated token; returning `false` stops generation (the client left).
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<Completion> {
        let mut seq = Sequence::new(self, prompt, params)?;
        let device = self.model.device();
        let mut cache = self.model.new_cache();
        let input = Tensor::new(prompt, device)?.unsqueeze(0)?;
        let mut logits = self.model.forward_last(&input, Some(&mut cache))?;
        let finish_reason = loop {
            let mut row = logits.squeeze(0)?.to_vec1::<f32>()?;
            let (event, end) = seq.accept(self, &mut row)?;
            let token = event.token;
            let go_on = on_token(&event);
            if let Some(reason) = end {
                break reason;
            }
            if !go_on {
                break FinishReason::Stop;
            }
            let next = Tensor::new(&[token], device)?.unsqueeze(0)?;
            logits = self.model.forward_last(&next, Some(&mut cache))?;
        };
        Ok(seq.finish(finish_reason))
    }
}

/// `eos_token_id` (one id or a list) of `DIR/generation_config.json`, if the
/// file exists.
fn generation_config_eos(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| RuntimeError::io(&path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| RuntimeError::ModelConfig {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let bad = || RuntimeError::ModelConfig {
        path: path.clone(),
        reason: "`eos_token_id` must be a token id or a list of ids".into(),
    };
    let id = |x: &serde_json::Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(bad)
    };
    match v.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(a)) => a.iter().map(id).collect(),
        Some(x) => Ok(vec![id(x)?]),
    }
}
