//! The evaluations API: list with last results, run one now (admin key).

use actix_web::{get, post, web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::PageQuery;
use crate::error::{ErrorResponse, GatewayError, Result};
use crate::evaluations::{Evaluation, EvaluationInfo, Trigger};
use crate::state::AppState;

/// A page of the evaluations.
#[derive(Debug, Serialize, ToSchema)]
pub struct EvaluationList {
    /// `list`.
    pub object: String,
    /// By name (scheduled and requested ones together).
    pub data: Vec<EvaluationInfo>,
    /// Whether more follow (ask with `after` = `last_id`).
    pub has_more: bool,
    /// The name of the first evaluation of the page.
    pub first_id: Option<String>,
    /// The name of the last evaluation of the page.
    pub last_id: Option<String>,
}

/// A run to start: `{name}` of a configured evaluation, or a one-off
/// evaluation (`merge` and `taskpool`, optionally `name`, `tasks`, `limit`,
/// `min_score`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunEvaluationRequest {
    /// A configured evaluation; with `merge`, the one-off evaluation's name
    /// (default: the merge string).
    #[serde(default)]
    pub name: Option<String>,
    /// The model to evaluate (preset, checkpoint, compact merge, `merge-<id>`).
    #[serde(default)]
    pub merge: Option<String>,
    /// A key of `taskpools` (required with `merge`).
    #[serde(default)]
    pub taskpool: Option<String>,
    /// Only these tasks (default: all).
    #[serde(default)]
    pub tasks: Vec<String>,
    /// Examples per task (default: all).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Degraded under this headline score.
    #[serde(default)]
    pub min_score: Option<f64>,
}

/// Query of `POST /v1/evaluations`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct RunQuery {
    /// Answer when the run is over (200 with the evaluation) instead of at
    /// once (202).
    #[serde(default)]
    pub wait: Option<bool>,
}

/// A run that has started.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunStarted {
    /// The run id (the `id` of the evaluation's `last` once it is over).
    pub id: String,
    /// `evaluation.run`.
    pub object: String,
    /// The evaluation.
    pub name: String,
    /// `running`.
    pub status: String,
}

/// The evaluations with their last results, by name, a page at a time
/// (`limit`, default 20, at most 100; `after`: the previous page's
/// `last_id`).
#[utoipa::path(
    get,
    path = "/v1/evaluations",
    tag = "evaluations",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of the evaluations", body = EvaluationList),
        (status = 400, description = "Bad `limit` or `after`", body = ErrorResponse),
        (status = 401, description = "Missing or invalid key", body = ErrorResponse),
        (status = 403, description = "Not an admin key", body = ErrorResponse),
    ),
    security(("admin_key" = []))
)]
#[get("/v1/evaluations")]
pub async fn list_evaluations(
    state: web::Data<AppState>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse> {
    let names = state.evaluations.names();
    let page = query.page(&names)?;
    let data = state.evaluations.infos(&names[page.range.clone()]);
    Ok(HttpResponse::Ok().json(EvaluationList {
        object: "list".to_string(),
        first_id: data.first().map(|e| e.name.clone()),
        last_id: data.last().map(|e| e.name.clone()),
        has_more: page.has_more,
        data,
    }))
}

/// The one-off evaluation a request describes, checked (its merge resolves,
/// its task pool is configured).
fn one_off(state: &AppState, req: RunEvaluationRequest, merge: String) -> Result<Evaluation> {
    state.models.resolve(Some(merge.trim()), None)?;
    let taskpool = req.taskpool.ok_or_else(|| {
        GatewayError::bad_param(
            "taskpool",
            "`taskpool` (a key of `taskpools`) is required with `merge`",
        )
    })?;
    let dir = state
        .config
        .taskpools
        .get(&taskpool)
        .cloned()
        .ok_or_else(|| GatewayError::NotFound {
            message: format!(
                "unknown task pool `{taskpool}`; task pools: {}",
                state
                    .config
                    .taskpools
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            param: Some("taskpool".to_string()),
        })?;
    state
        .registry
        .limits()
        .check_list("tasks", req.tasks.len())?;
    if req.limit == Some(0) {
        return Err(GatewayError::bad_param(
            "limit",
            "`limit` must be at least 1",
        ));
    }
    if req.min_score.is_some_and(|m| !m.is_finite()) {
        return Err(GatewayError::bad_param(
            "min_score",
            "`min_score` must be a finite number",
        ));
    }
    let name = req.name.unwrap_or_else(|| merge.trim().to_string());
    if name.trim().is_empty() || name.len() > 256 {
        return Err(GatewayError::bad_param(
            "name",
            "`name` must have 1 to 256 characters",
        ));
    }
    Ok(Evaluation {
        name,
        merge: merge.trim().to_string(),
        taskpool,
        taskpool_dir: dir,
        tasks: req.tasks,
        every: None,
        delay: std::time::Duration::ZERO,
        limit: req.limit,
        min_score: req.min_score,
        fail_readiness: false,
    })
}

/// Runs an evaluation now: 202 with the run id (poll `GET /v1/evaluations`),
/// or with `?wait=true` 200 with the evaluation once the run is over. Runs
/// wait for the one before them; a failed run is recorded, not an HTTP error.
#[utoipa::path(
    post,
    path = "/v1/evaluations",
    tag = "evaluations",
    params(RunQuery),
    request_body = RunEvaluationRequest,
    responses(
        (status = 200, description = "Run over (`wait=true`)", body = EvaluationInfo),
        (status = 202, description = "Started", body = RunStarted),
        (status = 400, description = "Malformed request", body = ErrorResponse),
        (status = 401, description = "Missing or invalid key", body = ErrorResponse),
        (status = 403, description = "Not an admin key", body = ErrorResponse),
        (status = 404, description = "Unknown evaluation, model or task pool", body = ErrorResponse),
        (status = 409, description = "Running already, or the name of a scheduled evaluation", body = ErrorResponse),
    ),
    security(("admin_key" = []))
)]
#[post("/v1/evaluations")]
pub async fn run_evaluation(
    state: web::Data<AppState>,
    query: web::Query<RunQuery>,
    body: web::Json<RunEvaluationRequest>,
) -> Result<HttpResponse> {
    let req = body.into_inner();
    let name = match req.merge.clone() {
        Some(merge) => {
            let def = one_off(&state, req, merge)?;
            let name = def.name.clone();
            state.evaluations.define(def)?;
            name
        }
        None => {
            let name = req.name.ok_or_else(|| {
                GatewayError::bad_request(
                    "give the `name` of an evaluation, or a `merge` and a `taskpool` to evaluate",
                )
            })?;
            if req.taskpool.is_some()
                || !req.tasks.is_empty()
                || req.limit.is_some()
                || req.min_score.is_some()
            {
                return Err(GatewayError::bad_param(
                    "merge",
                    "`taskpool`, `tasks`, `limit` and `min_score` describe a one-off evaluation and need `merge`",
                ));
            }
            name
        }
    };
    state.evaluations.begin(&name)?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let run = tokio::spawn(state.scheduler.clone().run_begun(
        name.clone(),
        Trigger::Request,
        id.clone(),
    ));
    if query.wait.unwrap_or(false) {
        run.await
            .map_err(|e| GatewayError::Internal(format!("the evaluation task failed: {e}")))?;
        let info = state
            .evaluations
            .info(&name)
            .ok_or_else(|| GatewayError::Internal(format!("`{name}` is missing")))?;
        return Ok(HttpResponse::Ok().json(info));
    }
    Ok(HttpResponse::Accepted()
        .insert_header(("location", "/v1/evaluations"))
        .json(RunStarted {
            id,
            object: "evaluation.run".to_string(),
            name,
            status: "running".to_string(),
        }))
}
