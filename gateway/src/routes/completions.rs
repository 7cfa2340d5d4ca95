//! `POST /v1/completions`.

use actix_web::{post, web, HttpResponse};
use merger::spec::MergeSpec;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::sse::{self, StreamKind, StreamMeta};
use super::{model_headers, response_id, SamplingFields, Usage};
use crate::clock::unix_time;
use crate::error::{ErrorResponse, GatewayError, Result};
use crate::serving::{self, Prompt};
use crate::state::AppState;

/// A text completion request (OpenAI fields plus `merge`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// A preset, a checkpoint, a compact merge or `merge-<id>`.
    #[serde(default)]
    #[schema(example = "demo/base")]
    pub model: Option<String>,
    /// A structured merge spec; when present `model` is ignored.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub merge: Option<MergeSpec>,
    /// The prompt: a string, or a list holding one string.
    pub prompt: PromptInput,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// A prompt: one string or a list of one string.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    /// One prompt.
    One(String),
    /// A list (only one prompt per request is supported).
    Many(Vec<String>),
}

/// A text completion.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionResponse {
    /// Response id.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix time.
    pub created: u64,
    /// The canonical model name.
    pub model: String,
    /// One choice.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The choice of a text completion.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    /// The generated text.
    pub text: String,
    /// Always 0.
    pub index: u32,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// Raw text completion.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion (JSON), or with `stream: true` server-sent events \
            of `CompletionChunk` ending with `data: [DONE]`", body = CompletionResponse,
            headers(("x-merge-id" = String, description = "The merge id, for merges"),
                    ("x-merge-cache" = String, description = "hit, miss or joined"))),
        (status = 400, description = "Malformed request", body = ErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Over a limit", body = ErrorResponse),
        (status = 422, description = "Impossible merge", body = ErrorResponse),
        (status = 429, description = "Queue full", body = ErrorResponse),
        (status = 503, description = "Merge still running", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
#[post("/v1/completions")]
pub async fn completions(
    state: web::Data<AppState>,
    body: web::Json<CompletionRequest>,
) -> Result<HttpResponse> {
    let req = body.into_inner();
    let (params, stream) = req.sampling.validate(state.registry.limits())?;
    let prompt = match req.prompt {
        PromptInput::One(p) => p,
        PromptInput::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptInput::Many(v) => {
            return Err(GatewayError::bad_param(
                "prompt",
                format!("`prompt` holds {} prompts; send one per request", v.len()),
            ))
        }
    };
    let handle = state
        .models
        .text_model(req.model.as_deref(), req.merge, "/v1/completions")
        .await?;
    let generation = serving::generate(&state, &handle, Prompt::Text(prompt), params).await?;
    let meta = StreamMeta {
        kind: StreamKind::Completion,
        id: response_id("cmpl"),
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
    Ok(res.json(CompletionResponse {
        id: meta.id,
        object: "text_completion".to_string(),
        created: meta.created,
        model: meta.model,
        choices: vec![CompletionChoice {
            text: done.text,
            index: 0,
            finish_reason: done.finish_reason.as_str().to_string(),
        }],
        usage: Usage::new(prompt_tokens, done.completion_tokens),
    }))
}
