//! `/health/live`, `/health/ready` and `/metrics`.

use actix_web::{get, web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{GatewayError, Result};
use crate::evaluations::Degraded;
use crate::state::AppState;

/// A health answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` (live) or `ready`.
    pub status: String,
    /// Seconds since start.
    pub uptime_seconds: f64,
}

/// The process is up.
#[utoipa::path(get, path = "/health/live", tag = "health",
    responses((status = 200, description = "Alive", body = Health)))]
#[get("/health/live")]
pub async fn live(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(Health {
        status: "ok".to_string(),
        uptime_seconds: state.uptime_seconds(),
    })
}

/// Readiness, with the evaluations whose merges are degraded.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, or `degraded` when an evaluation with `fail_readiness` is
    /// under its `min_score` (then the status is 503).
    pub status: String,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// Evaluations whose last successful run scored under `min_score`.
    pub degraded: Vec<Degraded>,
}

/// The server takes requests: checkpoints are open; false once shutdown
/// began, and while an evaluation with `fail_readiness: true` is degraded.
/// Degraded evaluations are listed either way.
#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses((status = 200, description = "Ready (degraded merges listed)", body = Readiness),
              (status = 503, description = "Shutting down (error body), or degraded with `fail_readiness` (Readiness body)", body = Readiness)))]
#[get("/health/ready")]
pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse> {
    if !state.is_ready() {
        return Err(GatewayError::Unavailable(
            "the server is shutting down".to_string(),
        ));
    }
    let degraded = state.evaluations.degraded();
    let fail = degraded.iter().any(|d| d.fail_readiness);
    let body = Readiness {
        status: if fail { "degraded" } else { "ready" }.to_string(),
        uptime_seconds: state.uptime_seconds(),
        degraded,
    };
    Ok(if fail {
        HttpResponse::ServiceUnavailable().json(body)
    } else {
        HttpResponse::Ok().json(body)
    })
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Metrics", content_type = "text/plain", body = String)))]
#[get("/metrics")]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state.models.refresh_gauges().await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
