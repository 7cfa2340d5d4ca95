//! The merges API: create or warm, list, status, evict (admin key).

use actix_web::{delete, get, post, web, HttpResponse};
use merger::spec::MergeSpec;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ErrorResponse, GatewayError, Result};
use crate::merges::{MergeInfo, MergeState};
use crate::registry::Target;
use crate::serving;
use crate::state::AppState;

/// A merge to create: a compact string or preset in `model`, or a structured `merge`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateMergeRequest {
    /// A compact merge (`ties_merging(math,code;density=0.2)`), a preset or `merge-<id>`.
    #[serde(default)]
    pub model: Option<String>,
    /// A structured merge spec; wins over `model`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub merge: Option<MergeSpec>,
}

/// The merges.
#[derive(Debug, Serialize, ToSchema)]
pub struct MergeList {
    /// `list`.
    pub object: String,
    /// Newest first.
    pub data: Vec<MergeInfo>,
}

/// The answer of a delete.
#[derive(Debug, Serialize, ToSchema)]
pub struct MergeDeleted {
    /// The merge id.
    pub id: String,
    /// `merge.deleted`.
    pub object: String,
    /// Whether resident weights were evicted (false: it was not resident).
    pub deleted: bool,
}

fn resident(state: &AppState) -> impl Fn(&str) -> bool + '_ {
    move |id| state.cache.contains(id)
}

/// Merges (or warms) a merge in the background: 202 with its id while it
/// runs, 200 when it is resident already.
#[utoipa::path(
    post,
    path = "/v1/merges",
    tag = "merges",
    request_body = CreateMergeRequest,
    responses(
        (status = 200, description = "Resident already", body = MergeInfo),
        (status = 202, description = "Merging; poll GET /v1/merges/{id}", body = MergeInfo),
        (status = 400, description = "Malformed spec", body = ErrorResponse),
        (status = 401, description = "Missing or invalid key", body = ErrorResponse),
        (status = 403, description = "Not an admin key", body = ErrorResponse),
        (status = 404, description = "Unknown checkpoint", body = ErrorResponse),
        (status = 413, description = "Over a limit", body = ErrorResponse),
        (status = 422, description = "Impossible merge", body = ErrorResponse),
    ),
    security(("admin_key" = []))
)]
#[post("/v1/merges")]
pub async fn create_merge(
    state: web::Data<AppState>,
    body: web::Json<CreateMergeRequest>,
) -> Result<HttpResponse> {
    let req = body.into_inner();
    let target = serving::target(&state, req.model.as_deref(), req.merge)?;
    let Target::Merge(plan) = &target else {
        return Err(GatewayError::bad_param(
            "model",
            format!("`{}` is a checkpoint, not a merge", target.model_name()),
        ));
    };
    let id = target.model_name();
    let already = state.cache.contains(&id);
    if already {
        state.merges.note(plan, true);
    } else if !state.merges.is_busy(&id) {
        // Runs on; the handle is not awaited.
        drop(serving::start_load(&state, target));
    }
    let info = state
        .merges
        .info(&id, &resident(&state))
        .ok_or_else(|| GatewayError::Internal(format!("`{id}` is missing from the book")))?;
    let mut res = if info.status == MergeState::Ready {
        HttpResponse::Ok()
    } else {
        HttpResponse::Accepted()
    };
    res.insert_header(("location", format!("/v1/merges/{id}")));
    res.insert_header((crate::MERGE_ID_HEADER, id));
    Ok(res.json(info))
}

/// Every merge the server knows, newest first.
#[utoipa::path(
    get,
    path = "/v1/merges",
    tag = "merges",
    responses(
        (status = 200, description = "The merges", body = MergeList),
        (status = 401, description = "Missing or invalid key", body = ErrorResponse),
        (status = 403, description = "Not an admin key", body = ErrorResponse),
    ),
    security(("admin_key" = []))
)]
#[get("/v1/merges")]
pub async fn list_merges(state: web::Data<AppState>) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(MergeList {
        object: "list".to_string(),
        data: state.merges.list(&resident(&state)),
    }))
}

fn unknown(id: &str) -> GatewayError {
    GatewayError::NotFound {
        message: format!("unknown merge `{id}`"),
        param: Some("id".to_string()),
    }
}

/// Status of one merge: state, bytes, duration, method.
#[utoipa::path(
    get,
    path = "/v1/merges/{id}",
    tag = "merges",
    params(("id" = String, Path, description = "`merge-<id>`")),
    responses(
        (status = 200, description = "The merge", body = MergeInfo),
        (status = 401, description = "Missing or invalid key", body = ErrorResponse),
        (status = 403, description = "Not an admin key", body = ErrorResponse),
        (status = 404, description = "Unknown merge", body = ErrorResponse),
    ),
    security(("admin_key" = []))
)]
#[get("/v1/merges/{id}")]
pub async fn get_merge(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse> {
    let id = id.into_inner().to_ascii_lowercase();
    let info = state
        .merges
        .info(&id, &resident(&state))
        .ok_or_else(|| unknown(&id))?;
    Ok(HttpResponse::Ok().json(info))
}

/// Evicts a merge's weights (the spec stays known; a request merges it again).
#[utoipa::path(
    delete,
    path = "/v1/merges/{id}",
    tag = "merges",
    params(("id" = String, Path, description = "`merge-<id>`")),
    responses(
        (status = 200, description = "Evicted (or was not resident)", body = MergeDeleted),
        (status = 401, description = "Missing or invalid key", body = ErrorResponse),
        (status = 403, description = "Not an admin key", body = ErrorResponse),
        (status = 404, description = "Unknown merge", body = ErrorResponse),
        (status = 409, description = "The merge is running", body = ErrorResponse),
    ),
    security(("admin_key" = []))
)]
#[delete("/v1/merges/{id}")]
pub async fn delete_merge(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let id = id.into_inner().to_ascii_lowercase();
    if state.merges.spec_of(&id).is_none() && !state.cache.contains(&id) {
        return Err(unknown(&id));
    }
    if state.merges.is_busy(&id) {
        return Err(GatewayError::Conflict(format!(
            "merge `{id}` is running; delete it once it is done"
        )));
    }
    let deleted = state.cache.evict(&id).await;
    Ok(HttpResponse::Ok().json(MergeDeleted {
        id,
        object: "merge.deleted".to_string(),
        deleted,
    }))
}
