//! The one native execution path behind every OpenAI route: resolve the
//! model, make it resident (merging if needed, waiting at most
//! `merge.max_wait`), take a generation slot, then tokenize and generate on
//! the blocking pool, streaming text deltas through a channel.
//!
//! A resident model is served only while the checkpoint files it was made
//! from are unchanged on disk ([`resident`]); a stale one is evicted, and
//! the request resolves the model again from the files as they are now.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use merger::spec::MergeSpec;
use tokio::sync::{mpsc, oneshot};

use crate::cache::CacheStatus;
use crate::engine::{ChatMessage, Completion, SamplingParams, TokenEvent};
use crate::error::{GatewayError, Result};
use crate::merges::Served;
use crate::registry::Target;
use crate::state::AppState;

/// A resident model as a request got it.
pub struct ModelHandle {
    /// The model.
    pub served: Arc<Served>,
    /// Hit, miss or joined.
    pub status: CacheStatus,
}

impl ModelHandle {
    /// The public model name (`merge-<id>` or `pool/name`).
    pub fn name(&self) -> &str {
        &self.served.name
    }

    /// The merge id, for merges.
    pub fn merge_id(&self) -> Option<&str> {
        self.served
            .method
            .as_ref()
            .map(|_| self.served.name.as_str())
    }
}

/// Resolves a request's `model` / `merge` fields to a target (no loading).
pub fn target(state: &AppState, model: Option<&str>, merge: Option<MergeSpec>) -> Result<Target> {
    if let Some(spec) = merge {
        return state.registry.resolve_spec(spec);
    }
    let model = model.ok_or_else(|| {
        GatewayError::bad_param("model", "`model` is required (or a structured `merge`)")
    })?;
    state
        .registry
        .resolve_model(model.trim(), &|id| state.merges.spec_of(id))
}

/// The resident model a request names, merging it if needed.
pub async fn model(
    state: &AppState,
    model: Option<&str>,
    merge: Option<MergeSpec>,
) -> Result<ModelHandle> {
    // A resident `merge-<id>` needs no planning at all.
    if merge.is_none() {
        if let Some(name) = model.map(str::trim).filter(|m| m.starts_with("merge-")) {
            let key = name.to_ascii_lowercase();
            if let Some(served) = resident(state, &key).await {
                return Ok(ModelHandle {
                    served,
                    status: CacheStatus::Hit,
                });
            }
        }
    }
    let target = target(state, model, merge)?;
    acquire(state, target).await
}

/// Makes `target` resident: a cache hit, or a load (one per key however
/// many requests ask) awaited for at most `merge.max_wait`; past it, 503
/// with Retry-After while the load goes on in the background.
pub async fn acquire(state: &AppState, target: Target) -> Result<ModelHandle> {
    let key = target.cache_key();
    if let Some(served) = resident(state, &key).await {
        state.merges.note(&target, true)?;
        return Ok(ModelHandle {
            served,
            status: CacheStatus::Hit,
        });
    }
    let started = Instant::now();
    let target_name = target.model_name();
    let task = start_load(state, target)?;
    let max_wait = state.config.merge.max_wait;
    match tokio::time::timeout(max_wait, task).await {
        Ok(Ok(Ok((served, status)))) => Ok(ModelHandle { served, status }),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(join)) => Err(GatewayError::Internal(format!(
            "loading `{target_name}` failed: {join}"
        ))),
        Err(_) => Err(GatewayError::MergePending {
            id: target_name,
            waited: started.elapsed(),
            retry_after: retry_after(max_wait),
        }),
    }
}

/// The resident model `key`, counting a hit, unless a checkpoint file it
/// was made from changed since: then it is evicted and `None` returned.
/// Once a checkpoint has been reopened (its files changed), every resident
/// model made from the old files is evicted first.
pub async fn resident(state: &AppState, key: &str) -> Option<Arc<Served>> {
    if state.registry.take_reopened() {
        evict_stale(state).await;
    }
    let mut stale = None;
    let served = state
        .cache
        .lookup_fresh(key, |s| {
            stale = s.stale();
            stale.is_none()
        })
        .await;
    if let Some((file, change)) = stale {
        tracing::info!(model = %key, file = %file.display(), change = %change,
            "resident model is stale (a checkpoint file changed); evicted");
        evict_stale(state).await;
    }
    served
}

/// Evicts every resident model made from checkpoint files that changed.
async fn evict_stale(state: &AppState) {
    for key in state.cache.evict_where(|s| s.stale().is_some()).await {
        tracing::info!(model = %key, "resident model is stale (a checkpoint file changed); evicted");
    }
}

/// How long a client should wait before asking again for a merge still
/// running: the configured wait, between 1 and 30 seconds.
fn retry_after(max_wait: Duration) -> Duration {
    max_wait.clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Starts loading `target` in a task of its own, so that the load goes on
/// when the request that started it stops waiting; a 503 when the book of
/// merges has no room for it.
pub fn start_load(state: &AppState, target: Target) -> Result<LoadTask> {
    if target.is_merge() {
        state.merges.note(&target, false)?;
        state.merges.mark_pending(&target.model_name());
    }
    let key = target.cache_key();
    let load = state.merges.loader(target);
    let cache = state.cache.clone();
    Ok(tokio::spawn(async move { cache.load(key, load).await }))
}

/// A load running in a task of its own: the resident model and how the
/// cache answered.
pub type LoadTask = tokio::task::JoinHandle<Result<(Arc<Served>, CacheStatus)>>;

/// The prompt of a generation.
pub enum Prompt {
    /// Chat messages, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text.
    Text(String),
}

/// What a running generation sends.
pub enum Event {
    /// New text.
    Delta(String),
    /// The end, with the full completion.
    Finished(Completion),
    /// Generation failed after it started.
    Failed(GatewayError),
}

/// A generation that has started.
pub struct Generation {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Deltas, then one `Finished` or `Failed`.
    pub events: mpsc::Receiver<Event>,
}

/// Token ids of a prompt, checked to leave room for a completion.
fn prompt_ids(
    engine: &crate::engine::Engine,
    prompt: &Prompt,
    split_special_tokens: bool,
) -> Result<Vec<u32>> {
    let (ids, param) = match prompt {
        Prompt::Chat(messages) => (
            engine.chat_prompt(messages, split_special_tokens)?,
            "messages",
        ),
        Prompt::Text(text) => (engine.text_prompt(text)?, "prompt"),
    };
    let context = engine.context_length();
    if ids.len() >= context {
        return Err(GatewayError::BadRequest {
            message: format!(
                "the prompt is {} tokens; the model's context is {context} tokens",
                ids.len()
            ),
            param: Some(param.to_string()),
            code: "context_length_exceeded",
        });
    }
    Ok(ids)
}

/// Deltas buffered between the generating thread and the response.
const EVENT_BUFFER: usize = 64;

/// Takes a generation slot (429 when the queue is full), then tokenizes the
/// prompt and generates on the blocking pool. Returns once the prompt is
/// tokenized and checked, so prompt errors are plain HTTP errors.
pub async fn generate(
    state: &AppState,
    handle: &ModelHandle,
    prompt: Prompt,
    mut params: SamplingParams,
) -> Result<Generation> {
    let slot = state.admission.admit().await?;
    let served = handle.served.clone();
    let metrics = state.metrics.clone();
    let split_special_tokens = state.config.server.split_special_tokens;
    let (ready_tx, ready_rx) = oneshot::channel::<Result<usize>>();
    let (tx, events) = mpsc::channel(EVENT_BUFFER);
    tokio::task::spawn_blocking(move || {
        let engine = &served.engine;
        let ids = match prompt_ids(engine, &prompt, split_special_tokens) {
            Ok(ids) => ids,
            Err(e) => {
                drop(slot);
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let context = engine.context_length();
        // The completion stops at the end of the context.
        params.max_tokens = params.max_tokens.min(context - ids.len());
        if ready_tx.send(Ok(ids.len())).is_err() {
            return; // the request is gone
        }
        let start = Instant::now();
        let mut first = true;
        let mut on_token = |ev: &TokenEvent| -> bool {
            if first {
                metrics
                    .time_to_first_token
                    .observe(start.elapsed().as_secs_f64());
                first = false;
            }
            if ev.text.is_empty() {
                return !tx.is_closed();
            }
            tx.blocking_send(Event::Delta(ev.text.clone())).is_ok()
        };
        let result = engine.generate(&ids, &params, &mut on_token);
        // Free the slot before the client can see the end, so a request sent
        // after a response never finds it still taken.
        drop(slot);
        let event = match result {
            Ok(done) => {
                metrics
                    .generated_tokens
                    .inc_by(done.completion_tokens as u64);
                Event::Finished(done)
            }
            Err(e) => Event::Failed(e.into()),
        };
        let _ = tx.blocking_send(event);
    });
    let prompt_tokens = ready_rx
        .await
        .map_err(|_| GatewayError::Internal("the generation task ended early".to_string()))??;
    Ok(Generation {
        prompt_tokens,
        events,
    })
}

/// Waits for the end of a generation: the completion (its text is the
/// deltas joined).
pub async fn finish(mut generation: Generation) -> Result<Completion> {
    while let Some(ev) = generation.events.recv().await {
        match ev {
            Event::Delta(_) => {}
            Event::Finished(done) => return Ok(done),
            Event::Failed(e) => return Err(e),
        }
    }
    Err(GatewayError::Internal(
        "the generation task ended without a result".to_string(),
    ))
}

/// Embeddings of `texts` (one slot of the generation admission).
pub async fn embed(
    state: &AppState,
    handle: &ModelHandle,
    texts: Vec<String>,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let slot = state.admission.admit().await?;
    let served = handle.served.clone();
    // Set when this future is dropped (the client went away): the blocking
    // task stops at its next text or batch and frees its slot.
    let left = ClientGone::default();
    let flag = left.0.clone();
    let result = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        served
            .engine
            .embed_until(&texts, &|| flag.load(Ordering::Relaxed))
    })
    .await
    .map_err(|e| GatewayError::Internal(format!("the embedding task failed: {e}")))?
    .map_err(|e| GatewayError::from(e).or_param("input"));
    drop(left);
    result
}

/// Raises its flag when dropped.
#[derive(Default)]
struct ClientGone(Arc<AtomicBool>);

impl Drop for ClientGone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
