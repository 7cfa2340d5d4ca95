//! `POST /v1/embeddings`: sentence embeddings of an embedding model (BERT
//! family: pooled as its sentence-transformers files say, inputs truncated
//! to its `max_seq_length`), mean-pooled final hidden states of a
//! text-generation model, or image embeddings of an image model (CLIP's
//! projected class token; each input a `data:image/png;base64,...` URL), in
//! OpenAI's shape (`encoding_format` `float` or `base64`: little-endian f32
//! bytes).

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
    /// One text or a list of texts; for an image model, images as data
    /// URLs (`data:image/png;base64,...` or `image/jpeg`).
    pub input: EmbeddingInput,
    /// `float` (the default) or `base64` (the little-endian f32 bytes of
    /// each vector, base64-encoded, as OpenAI sends them).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Width of the vectors: only the model's own width is accepted (no
    /// model here is trained to be truncated).
    #[serde(default)]
    pub dimensions: Option<u64>,
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

impl EmbeddingInput {
    /// The inputs as a list of 1..=[`MAX_INPUTS`] items (`what`: `texts`,
    /// `images`), else a 400 naming `input`.
    pub fn into_list(self, what: &str) -> Result<Vec<String>> {
        let items = match self {
            EmbeddingInput::One(t) => vec![t],
            EmbeddingInput::Many(v) => v,
        };
        if items.is_empty() || items.len() > MAX_INPUTS {
            return Err(GatewayError::bad_param(
                "input",
                format!(
                    "`input` must hold 1..={MAX_INPUTS} {what}, got {}",
                    items.len()
                ),
            ));
        }
        Ok(items)
    }
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
    /// The vector: a list of floats, or a base64 string with
    /// `encoding_format: base64`.
    #[schema(value_type = Object)]
    pub embedding: EmbeddingVector,
}

/// One vector, as `encoding_format` asks.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `float`.
    Float(Vec<f32>),
    /// `base64`.
    Base64(String),
}

/// Token counts of an embeddings request.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingUsage {
    /// Tokens read (special tokens included, after truncation).
    pub prompt_tokens: usize,
    /// Same as `prompt_tokens`.
    pub total_tokens: usize,
    /// Inputs cut to the model's `max_seq_length` (extension).
    pub truncated_inputs: usize,
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
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(GatewayError::bad_param(
                "encoding_format",
                format!("encoding_format `{f}` is not supported (`float` or `base64`)"),
            ))
        }
    };
    let texts = req.input.into_list("texts")?;
    if texts.iter().any(String::is_empty) {
        return Err(GatewayError::bad_param(
            "input",
            "`input` holds an empty text",
        ));
    }
    let handle = state.models.model(req.model.as_deref(), req.merge).await?;
    if let Some(d) = req.dimensions {
        let native = handle.served.engine.dimension();
        if d != native as u64 {
            return Err(GatewayError::bad_param(
                "dimensions",
                format!(
                    "model `{}` gives {native}-dimensional embeddings and cannot shorten them \
                     (`dimensions` must be {native} or left out)",
                    handle.name()
                ),
            ));
        }
    }
    let done = if handle.served.engine.runnable().kind() == runtime::architectures::Kind::Vision {
        let vectors = serving::embed_images(&state, &handle, texts).await?;
        crate::engine::Embedded {
            vectors,
            tokens: 0,
            truncated: 0,
        }
    } else {
        serving::embed(&state, &handle, texts).await?
    };
    let tokens = done.tokens;
    let mut res = HttpResponse::Ok();
    model_headers(&mut res, &handle);
    Ok(res.json(EmbeddingResponse {
        object: "list".to_string(),
        data: done
            .vectors
            .into_iter()
            .enumerate()
            .map(|(index, v)| Embedding {
                object: "embedding".to_string(),
                index,
                embedding: if base64 {
                    EmbeddingVector::Base64(encode_f32_base64(&v))
                } else {
                    EmbeddingVector::Float(v)
                },
            })
            .collect(),
        model: handle.name().to_string(),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
            truncated_inputs: done.truncated,
        },
    }))
}

/// The little-endian bytes of `v`, base64-encoded (standard alphabet,
/// padded): what the `openai` client decodes with
/// `np.frombuffer(base64.b64decode(s), dtype="float32")`.
fn encode_f32_base64(v: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        // 1.0 = 00 00 80 3f, -2.0 = 00 00 00 c0.
        assert_eq!(encode_f32_base64(&[1.0, -2.0]), "AACAPwAAAMA=");
    }
}
