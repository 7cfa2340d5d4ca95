//! The one native execution path behind the OpenAI routes, once the
//! [model store](crate::store) has made the model resident: tokenize and
//! check the prompt, then hand it to the model's batching scheduler
//! ([`crate::batching`]; 429 when its queue is full), whose step loop
//! streams text deltas through a channel. A model that cannot be batched
//! (a routed merge) takes a generation slot instead (429 when that queue
//! is full) and generates alone on the blocking pool; embeddings too.
//!
//! Errors of the prompt are the request's (4xx). What fails once generation
//! runs is mapped at [`Stage::Execution`]: a model that fails in its
//! forward pass or produces non-finite logits is a 500 `internal_error`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use runtime::generate::{EventSink, Priority, SchedulerEvent};

use crate::engine::{ChatMessage, Completion, Embedded, Engine, SamplingParams, TokenEvent};
use crate::error::{GatewayError, Result, Stage};
use crate::state::AppState;
use crate::store::ModelHandle;

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
    pub events: mpsc::UnboundedReceiver<Event>,
}

/// Token ids of a prompt, checked to leave room for a completion in the
/// model's context: the gateway's one check of a prompt's length (the
/// runtime caps the completion at the end of the context).
fn prompt_ids(engine: &Engine, prompt: &Prompt, split_special_tokens: bool) -> Result<Vec<u32>> {
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

/// Starts a generation: in the model's batch when it has one, else alone
/// in a generation slot. Returns once the prompt is tokenized and checked
/// (and, batched, queued), so prompt errors are plain HTTP errors.
///
/// The events of a generation are never more than its `max_tokens`
/// deltas, so their channel needs no bound; a closed channel (the client
/// went away) ends the sequence.
pub async fn generate(
    state: &AppState,
    handle: &ModelHandle,
    prompt: Prompt,
    params: SamplingParams,
) -> Result<Generation> {
    if state.batching.scheduler_of(&handle.served.engine).is_some() {
        return generate_batched(state, handle, prompt, params).await;
    }
    generate_alone(state, handle, prompt, params).await
}

/// Tokenizes on the blocking pool and submits to the model's scheduler.
async fn generate_batched(
    state: &AppState,
    handle: &ModelHandle,
    prompt: Prompt,
    params: SamplingParams,
) -> Result<Generation> {
    let served = handle.served.clone();
    let metrics = state.metrics.clone();
    let split_special_tokens = state.config.server.split_special_tokens;
    let (tx, events) = mpsc::unbounded_channel();
    // Held by the sink: released when the scheduler drops it (the end, or
    // the client gone), or at once when the submission fails.
    let traffic = state.traffic.enter();
    let prompt_tokens = tokio::task::spawn_blocking(move || -> Result<usize> {
        let engine = &served.engine;
        let ids = prompt_ids(engine, &prompt, split_special_tokens)?;
        let n = ids.len();
        let Some(scheduler) = engine.started_scheduler() else {
            return Err(GatewayError::Internal(
                "the model's scheduler did not start".to_string(),
            ));
        };
        let sink: EventSink = Box::new(move |ev| {
            let _traffic = &traffic;
            match ev {
                SchedulerEvent::Token(t) if t.text.is_empty() => !tx.is_closed(),
                SchedulerEvent::Token(t) => tx.send(Event::Delta(t.text)).is_ok(),
                SchedulerEvent::Done(Ok(done)) => {
                    metrics
                        .generated_tokens
                        .inc_by(done.completion_tokens as u64);
                    tx.send(Event::Finished(done)).is_ok()
                }
                SchedulerEvent::Done(Err(e)) => tx
                    .send(Event::Failed(GatewayError::at_runtime(Stage::Execution, e)))
                    .is_ok(),
                // A generation's sink never receives a scoring's end.
                SchedulerEvent::Scored(_) => false,
            }
        });
        scheduler
            .submit_with(ids, &params, Priority::Traffic, engine.batch_delta(), sink)
            .map_err(GatewayError::from)?;
        Ok(n)
    })
    .await
    .map_err(|e| GatewayError::Internal(format!("the generation task failed: {e}")))??;
    Ok(Generation {
        prompt_tokens,
        events,
    })
}

/// Takes a generation slot (429 when the queue is full), then tokenizes the
/// prompt and generates on the blocking pool.
async fn generate_alone(
    state: &AppState,
    handle: &ModelHandle,
    prompt: Prompt,
    params: SamplingParams,
) -> Result<Generation> {
    let traffic = state.traffic.enter();
    let slot = state.admission.admit().await?;
    let served = handle.served.clone();
    let metrics = state.metrics.clone();
    let split_special_tokens = state.config.server.split_special_tokens;
    let (ready_tx, ready_rx) = oneshot::channel::<Result<usize>>();
    let (tx, events) = mpsc::unbounded_channel();
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
            tx.send(Event::Delta(ev.text.clone())).is_ok()
        };
        let result = engine.generate(&ids, &params, &mut on_token);
        // Free the slot before the client can see the end, so a request sent
        // after a response never finds it still taken.
        drop(slot);
        drop(traffic);
        let event = match result {
            Ok(done) => {
                metrics
                    .generated_tokens
                    .inc_by(done.completion_tokens as u64);
                Event::Finished(done)
            }
            Err(e) => Event::Failed(GatewayError::at(Stage::Execution, e)),
        };
        let _ = tx.send(event);
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
pub async fn embed(state: &AppState, handle: &ModelHandle, texts: Vec<String>) -> Result<Embedded> {
    let traffic = state.traffic.enter();
    let slot = state.admission.admit().await?;
    let served = handle.served.clone();
    // Set when this future is dropped (the client went away): the blocking
    // task stops at its next text or batch and frees its slot.
    let left = ClientGone::default();
    let flag = left.0.clone();
    let result = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let _traffic = traffic;
        served
            .engine
            .embed_until(&texts, &|| flag.load(Ordering::Relaxed))
    })
    .await
    .map_err(|e| GatewayError::Internal(format!("the embedding task failed: {e}")))?
    .map_err(|e| GatewayError::at(Stage::Execution, e).or_param("input"));
    drop(left);
    result
}

/// Decodes `images` (data URLs, `data:image/png;base64,...`) and embeds
/// them with the handle's image model, off the async threads, one decoded
/// image at a time; an input that is not an image is a 400 naming its
/// index.
pub async fn embed_images(
    state: &AppState,
    handle: &ModelHandle,
    images: Vec<String>,
) -> Result<Vec<Vec<f32>>> {
    let traffic = state.traffic.enter();
    let slot = state.admission.admit().await?;
    let served = handle.served.clone();
    let left = ClientGone::default();
    let flag = left.0.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<Vec<Vec<f32>>> {
        let _slot = slot;
        let _traffic = traffic;
        // Decoded one at a time and preprocessed at once: a request of many
        // large (or highly compressed) images never holds more than one.
        let decode =
            |i: usize| runtime::vision::RgbImage::from_data_url(&images[i], &format!("input {i}"));
        served
            .engine
            .runnable()
            .embed_each_image_until(images.len(), &decode, &|| flag.load(Ordering::Relaxed))
            .map_err(|e| GatewayError::at_runtime(Stage::Execution, e).or_param("input"))
    })
    .await
    .map_err(|e| GatewayError::Internal(format!("the embedding task failed: {e}")))?;
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
