//! The merges API: create or warm, list, status, evict (admin key), each
//! an operation of the [model store](crate::store).

use actix_web::{delete, get, post, web, HttpResponse};
use merger::spec::MergeSpec;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::PageQuery;
use crate::error::{ErrorResponse, Result};
use crate::merges::{MergeInfo, MergeState};
use crate::state::AppState;
use crate::store::DeleteStatus;

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

/// A page of the merges.
#[derive(Debug, Serialize, ToSchema)]
pub struct MergeList {
    /// `list`.
    pub object: String,
    /// Newest first.
    pub data: Vec<MergeInfo>,
    /// Whether older merges follow (ask with `after` = `last_id`).
    pub has_more: bool,
    /// The id of the first merge of the page.
    pub first_id: Option<String>,
    /// The id of the last merge of the page.
    pub last_id: Option<String>,
}

/// The answer of a delete.
#[derive(Debug, Serialize, ToSchema)]
pub struct MergeDeleted {
    /// The merge id.
    pub id: String,
    /// `merge.deleted`.
    pub object: String,
    /// Whether resident weights were evicted (false: it was not resident,
    /// or it was cancelled).
    pub deleted: bool,
    /// What the delete did.
    pub status: DeleteStatus,
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
    let target = state.models.resolve(req.model.as_deref(), req.merge)?;
    let info = state.models.warm(target)?;
    let id = info.id.clone();
    let mut res = if info.status == MergeState::Ready {
        HttpResponse::Ok()
    } else {
        HttpResponse::Accepted()
    };
    res.insert_header(("location", format!("/v1/merges/{id}")));
    res.insert_header((crate::MERGE_ID_HEADER, id));
    Ok(res.json(info))
}

/// The merges the server knows, newest first, a page at a time (`limit`,
/// default 20, at most 100; `after`: the previous page's `last_id`).
#[utoipa::path(
    get,
    path = "/v1/merges",
    tag = "merges",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of the merges", body = MergeList),
        (status = 400, description = "Bad `limit` or `after`", body = ErrorResponse),
        (status = 401, description = "Missing or invalid key", body = ErrorResponse),
        (status = 403, description = "Not an admin key", body = ErrorResponse),
    ),
    security(("admin_key" = []))
)]
#[get("/v1/merges")]
pub async fn list_merges(
    state: web::Data<AppState>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse> {
    let ids = state.models.merge_ids();
    let page = query.page(&ids)?;
    let data = state.models.list(&ids[page.range.clone()]);
    Ok(HttpResponse::Ok().json(MergeList {
        object: "list".to_string(),
        first_id: data.first().map(|m| m.id.clone()),
        last_id: data.last().map(|m| m.id.clone()),
        has_more: page.has_more,
        data,
    }))
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
    Ok(HttpResponse::Ok().json(state.models.info(&id)?))
}

/// Evicts a merge's weights (the spec stays known; a request merges it
/// again), or cancels it while it is pending or running (`status:
/// cancelled`: it fails to its waiters, frees its merge slot and is not
/// cached). Only merges: a checkpoint id is 404.
#[utoipa::path(
    delete,
    path = "/v1/merges/{id}",
    tag = "merges",
    params(("id" = String, Path, description = "`merge-<id>`")),
    responses(
        (status = 200, description = "Evicted, not resident, or cancelled", body = MergeDeleted),
        (status = 401, description = "Missing or invalid key", body = ErrorResponse),
        (status = 403, description = "Not an admin key", body = ErrorResponse),
        (status = 404, description = "Unknown merge, or not a merge", body = ErrorResponse),
    ),
    security(("admin_key" = []))
)]
#[delete("/v1/merges/{id}")]
pub async fn delete_merge(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let id = id.into_inner().to_ascii_lowercase();
    let status = state.models.evict(&id).await?;
    let deleted = status == DeleteStatus::Evicted;
    Ok(HttpResponse::Ok().json(MergeDeleted {
        id,
        object: "merge.deleted".to_string(),
        deleted,
        status,
    }))
}
