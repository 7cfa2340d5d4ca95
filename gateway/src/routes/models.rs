//! `GET /v1/models`: checkpoints, presets and resident merges.

use actix_web::{get, web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::clock::unix_time;
use crate::error::{ErrorResponse, Result};
use crate::registry::ModelKind;
use crate::state::AppState;
use runtime::architectures::Kind;

/// The model list.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The models.
    pub data: Vec<ModelEntry>,
}

/// One model.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelEntry {
    /// What to put in a request's `model`.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix time (of the listing).
    pub created: u64,
    /// `fusion`.
    pub owned_by: String,
    /// `checkpoint`, `preset` or `merge` (extension).
    pub kind: String,
    /// What the model serves (extension): `text-generation` (chat,
    /// completions and mean-pooled embeddings) or `embedding` (only
    /// `/v1/embeddings`).
    pub model_kind: String,
}

/// Checkpoints (`pool/name`), presets and resident merges (`merge-<id>`).
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses(
        (status = 200, description = "The models", body = ModelList),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
#[get("/v1/models")]
pub async fn list_models(state: web::Data<AppState>) -> Result<HttpResponse> {
    let created = unix_time();
    let entry = |id: String, kind: &str, serves: Kind| ModelEntry {
        id,
        object: "model".to_string(),
        created,
        owned_by: "fusion".to_string(),
        kind: kind.to_string(),
        model_kind: serves.task().to_string(),
    };
    let mut data: Vec<ModelEntry> = state
        .registry
        .models()
        .into_iter()
        .map(|(id, kind, serves)| {
            entry(
                id,
                match kind {
                    ModelKind::Checkpoint => "checkpoint",
                    ModelKind::Preset => "preset",
                },
                serves,
            )
        })
        .collect();
    data.extend(
        state
            .models
            .resident_merges()
            .into_iter()
            .map(|(id, serves)| entry(id, "merge", serves)),
    );
    Ok(HttpResponse::Ok().json(ModelList {
        object: "list".to_string(),
        data,
    }))
}
