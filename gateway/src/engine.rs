//! The generation-facing part of the gateway: a served model wraps a
//! [`Runnable`]: a [`TextModel`] (model + tokenizer + chat template) or a
//! sentence encoder (model + tokenizer + pooling), built from a loaded
//! checkpoint or from merged tensors. Everything here is synchronous tensor
//! work, called from blocking threads, never from the async runtime.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor};
use merger::error::MergeError;
use merger::moe::MoeModel;
use runtime::architectures::Kind;
use runtime::checkpoint::Checkpoint;
use runtime::generate::{Scheduler, SchedulerLimits, StepObserver, TextModel};
use runtime::model::{KvBudget, ModelDelta, ModelOptions};
pub use runtime::Embedded;
use runtime::Runnable;

pub use runtime::generate::{ChatMessage, Completion, FinishReason, SamplingParams, TokenEvent};

/// A model ready to answer requests, shared read-only between requests.
pub struct Engine {
    model: Runnable,
    bytes: u64,
    /// The batching step loop of a text model, started by its first
    /// generation; `None` inside when the model cannot be batched.
    batch: OnceLock<Option<Scheduler>>,
    /// A merge held as a delta: the resident base it shares (whose
    /// scheduler batches it with the base's other merges) and its delta.
    shared: Option<(Arc<Engine>, Arc<ModelDelta>)>,
}

impl Engine {
    /// Loads a registered checkpoint (weights from its memory map). A saved
    /// routed ensemble (a folder `fusion merge` wrote for `we_moe`, ...)
    /// loads as the routed model it holds.
    pub fn from_checkpoint(ck: &Checkpoint, opts: &ModelOptions) -> merger::Result<Self> {
        let loaded = merger::load::load_checkpoint(ck, opts)?;
        let bytes = loaded.resident_bytes;
        Ok(Engine {
            model: loaded.into_runnable()?,
            bytes,
            batch: OnceLock::new(),
            shared: None,
        })
    }

    /// Builds a model from merged tensors; the architecture and side files
    /// (tokenizer, chat template, pooling) come from `reference` (the
    /// merge's base, or its first model, as the merge opened it).
    pub fn from_merge(
        merged: HashMap<String, Tensor>,
        reference: &Checkpoint,
        opts: &ModelOptions,
    ) -> merger::Result<Self> {
        Self::from_servable(merger::load::from_tensors(merged, reference, opts)?)
    }

    /// Serves a model built by the merger (a data-driven merge's), weighed
    /// by its resident bytes.
    pub fn from_servable(built: merger::load::Servable) -> merger::Result<Self> {
        let bytes = built.resident_bytes;
        Ok(Engine {
            model: built.into_runnable()?,
            bytes,
            batch: OnceLock::new(),
            shared: None,
        })
    }

    /// Serves a routed ensemble, weighed by its resident bytes (backbone,
    /// experts and routers); the tokenizer comes from `tokenizer_dir` (the
    /// base's, or the saved ensemble's copy of it). With a KV cache,
    /// per-sequence routing is computed on the prompt and kept for the
    /// generated tokens.
    pub fn from_moe(built: MoeModel, tokenizer_dir: &Path) -> merger::Result<Self> {
        let bytes = built.bytes();
        let text = TextModel::from_model(built.into_model(), tokenizer_dir)?;
        Ok(Engine {
            model: Runnable::Text(Arc::new(text)),
            bytes,
            batch: OnceLock::new(),
            shared: None,
        })
    }

    /// A merge held as `delta` over `base` (a text model that can be
    /// batched): it shares every tensor of the base, weighs its delta's
    /// bytes only, and generates in the base's scheduler, whose steps
    /// batch it with the base and its other merges.
    pub fn from_delta(base: Arc<Engine>, delta: ModelDelta) -> merger::Result<Self> {
        let text = base.delta_base()?;
        let delta = Arc::new(delta);
        let model = text.with_delta(delta.clone())?;
        Ok(Engine {
            model: Runnable::Text(Arc::new(model)),
            bytes: delta.own_bytes(),
            batch: OnceLock::new(),
            shared: Some((base, delta)),
        })
    }

    /// The text model a delta can be held over: one the scheduler batches
    /// (not itself a delta); the 400-class error of any other.
    fn delta_base(&self) -> merger::Result<&Arc<TextModel>> {
        match &self.model {
            Runnable::Text(t) if t.model().batchable() && self.shared.is_none() => Ok(t),
            _ => Err(MergeError::Unsupported {
                feature: "a merge held as a delta over this base".into(),
                hint: "lowrank and sparse forms serve text-generation bases (Llama-family \
                       decoders); serve this merge dense (drop `form`)"
                    .into(),
            }),
        }
    }

    /// The dtype a delta over this model is held in (its weights'); the
    /// error of [`Engine::from_delta`] for a model no delta can be held over.
    pub fn delta_dtype(&self) -> merger::Result<DType> {
        Ok(self.delta_base()?.model().dtype())
    }

    /// The delta this merge adds to its shared base (what its sequences
    /// carry into the base's batch); `None` for a model of its own.
    pub fn batch_delta(&self) -> Option<Arc<ModelDelta>> {
        self.shared.as_ref().map(|(_, d)| d.clone())
    }

    /// The runnable model (what evaluations score).
    pub fn runnable(&self) -> &Runnable {
        &self.model
    }

    /// What the model is: a text generator or an embedding model.
    pub fn kind(&self) -> Kind {
        self.model.kind()
    }

    /// The text generator, or a 400-class error saying that `what`
    /// (`"chat completions"`) need one.
    fn text(&self, what: &str) -> merger::Result<&TextModel> {
        Ok(self.model.text(what)?)
    }

    /// Bytes of the model's weights in memory (what the cache weighs).
    pub fn resident_bytes(&self) -> u64 {
        self.bytes
    }

    /// Longest sequence the model accepts: prompt and completion of a
    /// text model; an embedding model's `max_seq_length` (longer inputs
    /// are truncated to it).
    pub fn context_length(&self) -> usize {
        self.model.context_length()
    }

    /// Width of the embeddings.
    pub fn dimension(&self) -> usize {
        self.model.dimension()
    }

    /// Token ids of a chat: the chat template with the generation prompt;
    /// with `split_special_tokens`, special-token markers in message content
    /// are plain text (see [`runtime::generate::TextModel::encode_chat`]).
    pub fn chat_prompt(
        &self,
        messages: &[ChatMessage],
        split_special_tokens: bool,
    ) -> merger::Result<Vec<u32>> {
        Ok(self
            .text("chat completions")?
            .encode_chat(messages, split_special_tokens)?)
    }

    /// Token ids of a raw completion prompt.
    pub fn text_prompt(&self, prompt: &str) -> merger::Result<Vec<u32>> {
        Ok(self.text("completions")?.encode(prompt)?)
    }

    /// The batching scheduler of a text model, started on the first call
    /// with `limits` (its bounds and the key/value budget it shares with
    /// the other models) and `observer`; `None` for a model that is not
    /// batched (an embedding model, or a routed merge, whose routing is
    /// per sequence): it generates with [`Engine::generate`]. A merge held
    /// as a delta answers with its base's scheduler (submit with
    /// [`Engine::batch_delta`]).
    pub fn scheduler(
        &self,
        limits: impl FnOnce() -> (SchedulerLimits, Arc<KvBudget>),
        observer: impl FnOnce() -> Arc<dyn StepObserver>,
    ) -> Option<&Scheduler> {
        if let Some((base, _)) = &self.shared {
            return base.scheduler(limits, observer);
        }
        self.batch
            .get_or_init(|| match &self.model {
                Runnable::Text(t) if t.model().batchable() => {
                    let (limits, budget) = limits();
                    match Scheduler::with_budget(t.clone(), limits, &budget, observer()) {
                        Ok(s) => Some(s),
                        Err(e) => {
                            tracing::warn!(error = %e, "generating without batching");
                            None
                        }
                    }
                }
                _ => None,
            })
            .as_ref()
    }

    /// The scheduler [`Engine::scheduler`] started, if it did.
    pub fn started_scheduler(&self) -> Option<&Scheduler> {
        if let Some((base, _)) = &self.shared {
            return base.started_scheduler();
        }
        self.batch.get().and_then(Option::as_ref)
    }

    /// Generates from `prompt`; `on_token` gets each text delta and returns
    /// false to stop (the client went away).
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> merger::Result<Completion> {
        Ok(self
            .text("completions")?
            .generate(prompt, params, on_token)?)
    }

    /// Embeddings of `texts`: sentence-transformers pooling for an
    /// embedding model, mean-pooled hidden states for a text model.
    pub fn embed(&self, texts: &[String]) -> merger::Result<Embedded> {
        Ok(self.model.embed(texts)?)
    }

    /// [`Engine::embed`] that stops once `cancelled()` (the client left).
    pub fn embed_until(
        &self,
        texts: &[String],
        cancelled: &dyn Fn() -> bool,
    ) -> merger::Result<Embedded> {
        Ok(self.model.embed_until(texts, cancelled)?)
    }
}
