//! The searches API (admin key): start a search of a merge's parameters
//! on a pool, follow it, list them ([`crate::searches`]).

use actix_web::{get, post, web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ErrorResponse, GatewayError, Result};
use crate::searches::{SearchInfo, SearchRequest};
use crate::state::AppState;

/// A search to start.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartSearchRequest {
    /// A configured pool.
    pub pool: String,
    /// A key of `taskpools` to score on (default: the pool's name, else the
    /// only one).
    #[serde(default)]
    pub taskpool: Option<String>,
    /// What `search.yaml` holds, as an object or as YAML text: `merge`,
    /// `space`, `objective`, `budget`, `algorithm`, `seed`, `population`,
    /// `sigma`, `jobs`, `limit`, `batch_size` (no `pool` or `taskpool`).
    #[schema(value_type = Object)]
    pub search: serde_json::Value,
    /// The preset the best spec is registered as (default: the search's
    /// id); a configured preset or a checkpoint's name is a 409.
    #[serde(default)]
    pub preset: Option<String>,
}

/// The searches, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchList {
    /// `list`.
    pub object: String,
    /// The searches.
    pub data: Vec<SearchInfo>,
}

/// Starts a search: 202 with its record; follow it at
/// `GET /v1/searches/{id}`. One search runs at a time.
#[utoipa::path(
    post,
    path = "/v1/searches",
    tag = "searches",
    request_body = StartSearchRequest,
    responses(
        (status = 202, description = "Started", body = SearchInfo),
        (status = 400, description = "Malformed request or search config (the message names the field)", body = ErrorResponse),
        (status = 401, description = "Missing or invalid key", body = ErrorResponse),
        (status = 403, description = "Not an admin key, or searches turned off", body = ErrorResponse),
        (status = 404, description = "Unknown pool or task pool", body = ErrorResponse),
        (status = 409, description = "A search is running", body = ErrorResponse),
    ),
    security(("admin_key" = []))
)]
#[post("/v1/searches")]
pub async fn start_search(
    state: web::Data<AppState>,
    body: web::Json<StartSearchRequest>,
) -> Result<HttpResponse> {
    let req = body.into_inner();
    let config = match req.search {
        serde_json::Value::String(text) => text,
        v @ serde_json::Value::Object(_) => {
            serde_json::to_string(&v).map_err(|e| GatewayError::Internal(e.to_string()))?
        }
        _ => {
            return Err(GatewayError::bad_param(
                "search",
                "`search` is the search config: an object, or its YAML text",
            ))
        }
    };
    let started = state.searches.clone();
    let registry = state.registry.clone();
    let config_all = state.config.clone();
    let info = tokio::task::spawn_blocking(move || {
        started.start(
            SearchRequest {
                pool: req.pool,
                taskpool: req.taskpool,
                config,
                preset: req.preset,
            },
            &config_all,
            registry,
        )
    })
    .await
    .map_err(|e| GatewayError::Internal(format!("starting the search: {e}")))??;
    Ok(HttpResponse::Accepted()
        .insert_header(("location", format!("/v1/searches/{}", info.id)))
        .json(info))
}

/// Every search, newest first (at most the newest 100 are kept).
#[utoipa::path(
    get,
    path = "/v1/searches",
    tag = "searches",
    responses(
        (status = 200, description = "The searches", body = SearchList),
        (status = 401, description = "Missing or invalid key", body = ErrorResponse),
        (status = 403, description = "Not an admin key", body = ErrorResponse),
    ),
    security(("admin_key" = []))
)]
#[get("/v1/searches")]
pub async fn list_searches(state: web::Data<AppState>) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(SearchList {
        object: "list".into(),
        data: state.searches.list(),
    }))
}

/// One search: its state, evaluations done, best score and spec so far,
/// and its trace.
#[utoipa::path(
    get,
    path = "/v1/searches/{id}",
    tag = "searches",
    params(("id" = String, Path, description = "`search-<n>`")),
    responses(
        (status = 200, description = "The search", body = SearchInfo),
        (status = 401, description = "Missing or invalid key", body = ErrorResponse),
        (status = 403, description = "Not an admin key", body = ErrorResponse),
        (status = 404, description = "Unknown search", body = ErrorResponse),
    ),
    security(("admin_key" = []))
)]
#[get("/v1/searches/{id}")]
pub async fn get_search(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse> {
    let id = id.into_inner();
    let info = state
        .searches
        .get(&id)
        .ok_or_else(|| GatewayError::NotFound {
            message: format!("unknown search `{id}`"),
            param: Some("id".into()),
        })?;
    Ok(HttpResponse::Ok().json(info))
}
