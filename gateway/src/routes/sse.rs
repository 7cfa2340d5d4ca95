//! Server-sent events in OpenAI's chunk format.
//!
//! Chat streams open with a chunk carrying `delta.role`, then one chunk per
//! text delta, then a chunk with `finish_reason` and `usage`, then
//! `data: [DONE]`. Text completions stream `choices[0].text` the same way.
//! An error after the stream has started is sent as
//! `data: {"error": {...}}` (the OpenAI error document) before `[DONE]`.
//! A comment line keeps idle connections alive.

use std::convert::Infallible;
use std::time::Duration;

use actix_web::web::Bytes;
use actix_web::HttpResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::{model_headers, Usage};
use crate::error::GatewayError;
use crate::serving::{Event, Generation};
use crate::store::ModelHandle;

/// Interval of `: keep-alive` comments while no token arrives.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Which OpenAI stream format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `chat.completion.chunk` objects.
    Chat,
    /// `text_completion` objects.
    Completion,
}

/// A chunk of a chat completion stream.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// Same for every chunk of the stream.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix time of the request.
    pub created: u64,
    /// The canonical model name (`merge-<id>` or `pool/name`).
    pub model: String,
    /// One choice.
    pub choices: Vec<ChatChunkChoice>,
    /// Token counts, in the final chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// The choice of a chat chunk.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    /// Always 0.
    pub index: u32,
    /// The new text.
    pub delta: ChatDelta,
    /// `stop` or `length` in the final chunk.
    pub finish_reason: Option<String>,
}

/// New text of a chat stream.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    /// `assistant`, in the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Text delta.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A chunk of a text completion stream.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChunk {
    /// Same for every chunk of the stream.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix time of the request.
    pub created: u64,
    /// The canonical model name.
    pub model: String,
    /// One choice.
    pub choices: Vec<CompletionChunkChoice>,
    /// Token counts, in the final chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// The choice of a text completion chunk.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChunkChoice {
    /// Always 0.
    pub index: u32,
    /// Text delta.
    pub text: String,
    /// `stop` or `length` in the final chunk.
    pub finish_reason: Option<String>,
}

/// Identity of a stream, repeated in every chunk.
#[derive(Debug, Clone)]
pub struct StreamMeta {
    /// Which format.
    pub kind: StreamKind,
    /// Response id.
    pub id: String,
    /// Unix time.
    pub created: u64,
    /// Model name.
    pub model: String,
}

impl StreamMeta {
    /// One `data:` event for a delta, or for the end when `finish` is set.
    fn chunk(&self, text: Option<String>, role: bool, finish: Option<(&str, Usage)>) -> Bytes {
        let finish_reason = finish.map(|(r, _)| r.to_string());
        let usage = finish.map(|(_, u)| u);
        let json = match self.kind {
            StreamKind::Chat => serde_json::to_string(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChatChunkChoice {
                    index: 0,
                    delta: ChatDelta {
                        role: role.then(|| "assistant".to_string()),
                        content: text,
                    },
                    finish_reason,
                }],
                usage,
            }),
            StreamKind::Completion => serde_json::to_string(&CompletionChunk {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChunkChoice {
                    index: 0,
                    text: text.unwrap_or_default(),
                    finish_reason,
                }],
                usage,
            }),
        }
        .expect("chunks serialize");
        event(&json)
    }
}

fn event(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

const DONE: &str = "data: [DONE]\n\n";

enum Phase {
    Start,
    Streaming,
    Done,
}

struct StreamState {
    meta: StreamMeta,
    generation: Generation,
    phase: Phase,
}

fn error_event(e: &GatewayError) -> Bytes {
    let body = serde_json::to_string(&e.body()).expect("errors serialize");
    Bytes::from(format!("data: {body}\n\n{DONE}"))
}

/// The SSE response of a started generation.
pub fn response(meta: StreamMeta, handle: &ModelHandle, generation: Generation) -> HttpResponse {
    let state = StreamState {
        meta,
        generation,
        phase: Phase::Start,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        let bytes = match s.phase {
            Phase::Done => return None,
            Phase::Start => {
                s.phase = Phase::Streaming;
                match s.meta.kind {
                    StreamKind::Chat => s.meta.chunk(Some(String::new()), true, None),
                    // Text completions have no role chunk: go straight to the first event.
                    StreamKind::Completion => next_event(&mut s).await,
                }
            }
            Phase::Streaming => next_event(&mut s).await,
        };
        Some((Ok::<Bytes, Infallible>(bytes), s))
    });
    let mut res = HttpResponse::Ok();
    res.content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .insert_header(("x-accel-buffering", "no"));
    model_headers(&mut res, handle);
    res.streaming(stream)
}

async fn next_event(s: &mut StreamState) -> Bytes {
    let prompt_tokens = s.generation.prompt_tokens;
    match tokio::time::timeout(KEEP_ALIVE, s.generation.events.recv()).await {
        Err(_) => Bytes::from_static(b": keep-alive\n\n"),
        Ok(Some(Event::Delta(text))) => s.meta.chunk(Some(text), false, None),
        Ok(Some(Event::Finished(done))) => {
            s.phase = Phase::Done;
            let usage = Usage::new(prompt_tokens, done.completion_tokens);
            let last = s
                .meta
                .chunk(None, false, Some((done.finish_reason.as_str(), usage)));
            let mut out = last.to_vec();
            out.extend_from_slice(DONE.as_bytes());
            Bytes::from(out)
        }
        Ok(Some(Event::Failed(e))) => {
            s.phase = Phase::Done;
            error_event(&e)
        }
        Ok(None) => {
            s.phase = Phase::Done;
            error_event(&GatewayError::Internal(
                "the generation ended without a result".to_string(),
            ))
        }
    }
}
