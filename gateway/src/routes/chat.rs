//! `POST /v1/chat/completions`.

use actix_web::{post, web, HttpResponse};
use merger::spec::MergeSpec;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::sse::{self, StreamKind, StreamMeta};
use super::{model_headers, response_id, SamplingFields, Usage};
use crate::clock::unix_time;
use crate::engine::ChatMessage;
use crate::error::{ErrorResponse, GatewayError, Result};
use crate::serving::{self, Prompt};
use crate::state::AppState;

/// Roles a message may have.
const ROLES: &[&str] = &["system", "user", "assistant"];

/// A chat completion request (OpenAI fields plus `merge`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// A preset, a checkpoint (`pool/name` or `name`), a compact merge
    /// (`ties_merging(math,code;density=0.2)`) or `merge-<id>`.
    #[serde(default)]
    #[schema(example = "task_arithmetic(math,code;scaling_coefficient=0.5)")]
    pub model: Option<String>,
    /// A structured merge spec `{method, pool?, base?, models: [{name, weight?, parameters?}],
    /// parameters?, seed?, dtype?}`; when present it names the model and `model` is ignored.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub merge: Option<MergeSpec>,
    /// The conversation.
    pub messages: Vec<ChatMessageIn>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// One message of the conversation.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text, or a list of `{"type": "text", "text": ...}` parts.
    pub content: MessageContent,
    /// Participant name (accepted, not used).
    #[serde(default)]
    pub name: Option<String>,
}

/// Message content: a string or text parts.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Text parts, joined.
    Parts(Vec<ContentPart>),
}

/// A content part; only `text` parts are supported.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ContentPart {
    /// `text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// A chat completion.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionResponse {
    /// Response id.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix time.
    pub created: u64,
    /// The canonical model name: `merge-<id>` for merges, `pool/name` for checkpoints.
    pub model: String,
    /// One choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The choice of a chat completion.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    /// Always 0.
    pub index: u32,
    /// The answer.
    pub message: AssistantMessage,
    /// `stop` (end of sequence or a stop sequence) or `length`.
    pub finish_reason: String,
}

/// The assistant's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessageIn {
    fn validate(&self, i: usize) -> Result<ChatMessage> {
        if !ROLES.contains(&self.role.as_str()) {
            return Err(GatewayError::bad_param(
                &format!("messages[{i}].role"),
                format!(
                    "role `{}` is not supported (expected one of {})",
                    self.role,
                    ROLES.join(", ")
                ),
            ));
        }
        let content = match &self.content {
            MessageContent::Text(t) => t.clone(),
            MessageContent::Parts(parts) => {
                let mut out = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        _ => {
                            return Err(GatewayError::bad_param(
                                &format!("messages[{i}].content[{j}]"),
                                format!("content part of type `{}` is not supported (only `text` with a `text` field)", p.kind),
                            ))
                        }
                    }
                }
                out
            }
        };
        Ok(ChatMessage {
            role: self.role.clone(),
            content,
        })
    }
}

/// Chat completion on a checkpoint, a preset or a merge named in the request.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion (JSON), or with `stream: true` server-sent events \
            of `ChatCompletionChunk` ending with `data: [DONE]`", body = ChatCompletionResponse,
            headers(("x-merge-id" = String, description = "The merge id, for merges"),
                    ("x-merge-cache" = String, description = "hit, miss or joined"))),
        (status = 400, description = "Malformed request or merge spec", body = ErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "Unknown model or checkpoint", body = ErrorResponse),
        (status = 413, description = "Body, merge string or expert count over a limit", body = ErrorResponse),
        (status = 422, description = "Impossible merge (shapes, expert count)", body = ErrorResponse),
        (status = 429, description = "Generation queue full (Retry-After)", body = ErrorResponse),
        (status = 503, description = "Merge still running after merge.max_wait (Retry-After)", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
#[post("/v1/chat/completions")]
pub async fn chat_completions(
    state: web::Data<AppState>,
    body: web::Json<ChatCompletionRequest>,
) -> Result<HttpResponse> {
    let req = body.into_inner();
    let (params, stream) = req.sampling.validate(state.registry.limits())?;
    if req.messages.is_empty() {
        return Err(GatewayError::bad_param("messages", "`messages` is empty"));
    }
    let messages = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| m.validate(i))
        .collect::<Result<Vec<_>>>()?;
    let handle = state
        .models
        .text_model(req.model.as_deref(), req.merge, "/v1/chat/completions")
        .await?;
    let generation = serving::generate(&state, &handle, Prompt::Chat(messages), params).await?;
    let meta = StreamMeta {
        kind: StreamKind::Chat,
        id: response_id("chatcmpl"),
        created: unix_time(),
        model: handle.name().to_string(),
    };
    if stream {
        return Ok(sse::response(meta, &handle, generation));
    }
    let prompt_tokens = generation.prompt_tokens;
    let done = serving::finish(generation).await?;
    let mut res = HttpResponse::Ok();
    model_headers(&mut res, &handle);
    Ok(res.json(ChatCompletionResponse {
        id: meta.id,
        object: "chat.completion".to_string(),
        created: meta.created,
        model: meta.model,
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".to_string(),
                content: done.text,
            },
            finish_reason: done.finish_reason.as_str().to_string(),
        }],
        usage: Usage::new(prompt_tokens, done.completion_tokens),
    }))
}
