//! `POST /v1/embeddings`: mean-pooled final hidden states.

use actix_web::{post, web, HttpResponse};
use merger::spec::MergeSpec;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::model_headers;
use crate::error::{ErrorResponse, GatewayError, Result};
use crate::serving;
use crate::state::AppState;

/// Most inputs in one request.
pub const MAX_INPUTS: usize = 2048;

/// An embeddings request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    /// A preset, a checkpoint, a compact merge or `merge-<id>`.
    #[serde(default)]
    pub model: Option<String>,
    /// A structured merge spec; when present `model` is ignored.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub merge: Option<MergeSpec>,
    /// One text or a list of texts.
    pub input: EmbeddingInput,
    /// Only `float` is supported.
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// End-user id (not used).
    #[serde(default)]
    pub user: Option<String>,
}

/// Texts to embed.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    One(String),
    /// Several texts.
    Many(Vec<String>),
}

/// The embeddings.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingResponse {
    /// `list`.
    pub object: String,
    /// One embedding per input, in order.
    pub data: Vec<Embedding>,
    /// The canonical model name.
    pub model: String,
    /// Token counts.
    pub usage: EmbeddingUsage,
}

/// One embedding.
#[derive(Debug, Serialize, ToSchema)]
pub struct Embedding {
    /// `embedding`.
    pub object: String,
    /// Position of the input.
    pub index: usize,
    /// The vector (hidden size of the model).
    pub embedding: Vec<f32>,
}

/// Token counts of an embeddings request.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingUsage {
    /// Tokens read.
    pub prompt_tokens: usize,
    /// Same as `prompt_tokens`.
    pub total_tokens: usize,
}

/// Embeddings (mean-pooled hidden states after the final norm).
#[utoipa::path(
    post,
    path = "/v1/embeddings",
    tag = "openai",
    request_body = EmbeddingRequest,
    responses(
        (status = 200, description = "Embeddings", body = EmbeddingResponse),
        (status = 400, description = "Malformed request", body = ErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Over a limit", body = ErrorResponse),
        (status = 429, description = "Queue full", body = ErrorResponse),
        (status = 503, description = "Merge still running", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
#[post("/v1/embeddings")]
pub async fn embeddings(
    state: web::Data<AppState>,
    body: web::Json<EmbeddingRequest>,
) -> Result<HttpResponse> {
    let req = body.into_inner();
    if let Some(f) = req.encoding_format.as_deref() {
        if f != "float" {
            return Err(GatewayError::bad_param(
                "encoding_format",
                format!("encoding_format `{f}` is not supported (only `float`)"),
            ));
        }
    }
    let texts = match req.input {
        EmbeddingInput::One(t) => vec![t],
        EmbeddingInput::Many(v) => v,
    };
    if texts.is_empty() || texts.len() > MAX_INPUTS {
        return Err(GatewayError::bad_param(
            "input",
            format!(
                "`input` must hold 1..={MAX_INPUTS} texts, got {}",
                texts.len()
            ),
        ));
    }
    if texts.iter().any(String::is_empty) {
        return Err(GatewayError::bad_param(
            "input",
            "`input` holds an empty text",
        ));
    }
    let handle = state.models.model(req.model.as_deref(), req.merge).await?;
    let (vectors, tokens) = serving::embed(&state, &handle, texts).await?;
    let mut res = HttpResponse::Ok();
    model_headers(&mut res, &handle);
    Ok(res.json(EmbeddingResponse {
        object: "list".to_string(),
        data: vectors
            .into_iter()
            .enumerate()
            .map(|(index, embedding)| Embedding {
                object: "embedding".to_string(),
                index,
                embedding,
            })
            .collect(),
        model: handle.name().to_string(),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}
