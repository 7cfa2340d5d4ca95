//! The one error type of the gateway, and the one place where errors become
//! HTTP statuses and OpenAI-shaped JSON bodies.
//!
//! Handlers and startup code both return [`GatewayError`] (the config and
//! startup variants are 500s should one ever reach a client).
//! [`GatewayError::status`] decides the status, [`GatewayError::error_type`]
//! the stable snake_case `type`, and [`GatewayError::body`] the
//! `{"error": {"message", "type", "param", "code"}}` document, which SSE
//! streams reuse for errors after the first byte. The errors of the layers
//! below become gateway errors here too, by their kind and the [`Stage`]
//! they arose at ([`GatewayError::at`]): validation errors are 4xx, a
//! server-side failure once a request was accepted is a 500.

use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use merger::{MergeError, Work};
use runtime::{ErrorKind, RuntimeError};
use serde::Serialize;
use utoipa::ToSchema;

/// Everything a request can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// Malformed request: bad JSON, a field out of range, a bad merge spec.
    #[error("{message}")]
    BadRequest {
        /// What is wrong, naming the field.
        message: String,
        /// The offending request field, when there is one.
        param: Option<String>,
        /// A stable machine-readable code.
        code: &'static str,
    },
    /// No API key, or an unknown one.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid key without the rights the route needs.
    #[error("{0}")]
    Forbidden(String),
    /// An unknown model, checkpoint, preset or merge id.
    #[error("{message}")]
    NotFound {
        /// What was not found.
        message: String,
        /// The request field that named it.
        param: Option<String>,
    },
    /// The request conflicts with the state of a resource (a running merge).
    #[error("{0}")]
    Conflict(String),
    /// The body, the merge spec or its expert count is over a configured limit.
    #[error("{message}")]
    TooLarge {
        /// Which limit, with its value.
        message: String,
        /// The offending request field.
        param: Option<String>,
    },
    /// Valid JSON but an impossible merge (shapes, expert count, missing base).
    #[error("{0}")]
    Unprocessable(String),
    /// The generation queue is full.
    #[error("the server is busy: {running} generations running and {queued} queued (server.limits.queue_depth = {queue_depth}); retry later")]
    Overloaded {
        /// Generations running.
        running: usize,
        /// Requests waiting.
        queued: usize,
        /// The queue bound.
        queue_depth: usize,
        /// When to retry.
        retry_after: Duration,
    },
    /// A merge (or a checkpoint's load) is still running after
    /// `merge.max_wait`; it goes on.
    #[error("{}", pending_message(id, waited))]
    MergePending {
        /// The merge id (`merge-…`), or the checkpoint (`pool/name`).
        id: String,
        /// How long the request waited.
        waited: Duration,
        /// When to retry.
        retry_after: Duration,
    },
    /// The server is shutting down or not ready.
    #[error("{0}")]
    Unavailable(String),
    /// A failure of the server itself (I/O, tensor backend, a task that died).
    #[error("{0}")]
    Internal(String),
    /// An invalid configuration (at startup; never sent to a client as such).
    #[error("configuration {origin}: {reason}")]
    Config {
        /// The file or environment variable at fault.
        origin: String,
        /// What is wrong, naming the key and its allowed values.
        reason: String,
    },
    /// A startup failure outside the configuration (binding, opening checkpoints).
    #[error("{0}")]
    Startup(String),
}

/// The message of [`GatewayError::MergePending`]: where to poll a merge;
/// a checkpoint is no merge (`GET /v1/merges/{id}` does not know it), so
/// its message points to the list of merges that hold the merge slots its
/// load waits for.
fn pending_message(id: &str, waited: &Duration) -> String {
    if id.starts_with("merge-") {
        format!("merge `{id}` is still running after {waited:?}; retry later or poll GET /v1/merges/{id}")
    } else {
        format!(
            "checkpoint `{id}` is still loading after {waited:?} (loads share the merge slots); \
             retry later, GET /v1/merges lists the merges running"
        )
    }
}

/// Result alias of the gateway crate.
pub type Result<T, E = GatewayError> = std::result::Result<T, E>;

/// The OpenAI error document.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
}

/// The fields of an OpenAI error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Human-readable message naming the cause.
    pub message: String,
    /// Stable snake_case class of the error (`invalid_request_error`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// A stable machine-readable code, if any.
    pub code: Option<String>,
}

impl GatewayError {
    /// A 400 naming `param`.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
            code: "invalid_value",
        }
    }

    /// A 400 without a particular field.
    pub fn bad_request(message: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            message: message.into(),
            param: None,
            code: "invalid_request",
        }
    }

    /// The same error naming the request field `param` (400, 404 and 413).
    pub fn with_param(self, field: &str) -> Self {
        match self {
            GatewayError::BadRequest { message, code, .. } => GatewayError::BadRequest {
                message,
                param: Some(field.to_string()),
                code,
            },
            GatewayError::NotFound { message, .. } => GatewayError::NotFound {
                message,
                param: Some(field.to_string()),
            },
            GatewayError::TooLarge { message, .. } => GatewayError::TooLarge {
                message,
                param: Some(field.to_string()),
            },
            other => other,
        }
    }

    /// A 404 for an unknown model name.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        GatewayError::NotFound {
            message: message.into(),
            param: Some("model".to_string()),
        }
    }

    /// The same error naming `param` when it names no parameter yet.
    pub fn or_param(mut self, name: &str) -> Self {
        if let GatewayError::BadRequest { param, .. }
        | GatewayError::NotFound { param, .. }
        | GatewayError::TooLarge { param, .. } = &mut self
        {
            param.get_or_insert_with(|| name.to_string());
        }
        self
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::NotFound { .. } => StatusCode::NOT_FOUND,
            GatewayError::Conflict(_) => StatusCode::CONFLICT,
            GatewayError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            GatewayError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::MergePending { .. } | GatewayError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::Internal(_) | GatewayError::Config { .. } | GatewayError::Startup(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The stable snake_case `type` of the error body.
    pub fn error_type(&self) -> &'static str {
        match self {
            GatewayError::BadRequest { .. } => "invalid_request_error",
            GatewayError::Unauthorized(_) => "authentication_error",
            GatewayError::Forbidden(_) => "permission_error",
            GatewayError::NotFound { .. } => "not_found_error",
            GatewayError::Conflict(_) => "conflict_error",
            GatewayError::TooLarge { .. } => "request_too_large",
            GatewayError::Unprocessable(_) => "unprocessable_merge",
            GatewayError::Overloaded { .. } => "rate_limit_error",
            GatewayError::MergePending { .. } => "merge_pending",
            GatewayError::Unavailable(_) => "service_unavailable",
            GatewayError::Internal(_) | GatewayError::Config { .. } | GatewayError::Startup(_) => {
                "internal_error"
            }
        }
    }

    /// The `code` of the error body.
    fn code(&self) -> Option<&'static str> {
        match self {
            GatewayError::BadRequest { code, .. } => Some(code),
            GatewayError::Unauthorized(_) => Some("invalid_api_key"),
            GatewayError::Forbidden(_) => Some("admin_key_required"),
            GatewayError::NotFound { param, .. } => Some(match param.as_deref() {
                Some("model") => "model_not_found",
                _ => "not_found",
            }),
            GatewayError::Overloaded { .. } => Some("queue_full"),
            GatewayError::MergePending { .. } => Some("merge_running"),
            GatewayError::TooLarge { .. } => Some("limit_exceeded"),
            _ => None,
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            GatewayError::BadRequest { param, .. }
            | GatewayError::NotFound { param, .. }
            | GatewayError::TooLarge { param, .. } => param.clone(),
            _ => None,
        }
    }

    /// Seconds a client should wait before retrying, for 429 and 503.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::Overloaded { retry_after, .. }
            | GatewayError::MergePending { retry_after, .. } => Some(*retry_after),
            GatewayError::Unavailable(_) => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The OpenAI error document of this error.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.to_string(),
                kind: self.error_type().to_string(),
                param: self.param(),
                code: self.code().map(str::to_string),
            },
        }
    }
}

impl ResponseError for GatewayError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status());
        if let Some(after) = self.retry_after() {
            // Whole seconds, at least one (RFC 9110 delay-seconds).
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            res.insert_header((header::RETRY_AFTER, HeaderValue::from(secs)));
        }
        if let GatewayError::Unauthorized(_) = self {
            res.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        if let GatewayError::MergePending { id, .. } = self {
            if !id.starts_with("merge-") {
                return res.json(self.body());
            }
            if let Ok(v) = HeaderValue::from_str(id) {
                res.insert_header((crate::MERGE_ID_HEADER, v));
            }
        }
        res.json(self.body())
    }
}

/// Where an error of the layers below (the merger, the runtime) arose,
/// which decides whose fault it is. Validation refuses what the client
/// asked for (4xx). Once validation has accepted a request, what fails
/// while it runs is the server's: a 500 `internal_error` (a model that
/// fails in its forward pass, a checkpoint that changed or vanished under
/// the server, a merge its plan should have refused), never a 400 naming
/// the spec. Two exceptions say something true about the request itself:
/// checkpoints a merge cannot combine (non-finite results, shapes) are 422,
/// and the runtime's verdicts on a request's own input (its prompt, its
/// texts, its sampling parameters) stay 400 wherever the runtime reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Checking a request: resolving its model, planning its merge,
    /// tokenizing its prompt.
    Validation,
    /// Running a validated merge (with its router training) into a model.
    Merge,
    /// Loading a registered checkpoint, or running a resident model on a
    /// request's input (generation, embeddings).
    Execution,
}

impl GatewayError {
    /// The error of the layers below `e`, raised at `stage`: the one
    /// mapping from their errors to statuses (`From<MergeError>` is this at
    /// [`Stage::Validation`]).
    pub fn at(stage: Stage, e: MergeError) -> Self {
        match e {
            MergeError::OverBound { work, .. } => {
                let (key, hint) = bound_key(work);
                GatewayError::TooLarge {
                    message: format!("{e} ({key}): {hint}"),
                    param: None,
                }
            }
            MergeError::Runtime(e) => Self::at_runtime(stage, *e),
            e => from_kind(stage, e.kind(), e.to_string()),
        }
    }

    /// [`GatewayError::at`] for an error of the runtime.
    pub fn at_runtime(stage: Stage, e: RuntimeError) -> Self {
        let message = e.to_string();
        let input = matches!(stage, Stage::Validation | Stage::Execution);
        match &e {
            RuntimeError::QueueFull {
                running,
                queued,
                depth,
            } => GatewayError::Overloaded {
                running: *running,
                queued: *queued,
                queue_depth: *depth,
                retry_after: crate::limits::admission::RETRY_AFTER,
            },
            RuntimeError::ContextLength { .. } if input => GatewayError::BadRequest {
                message,
                param: None,
                code: "context_length_exceeded",
            },
            // A request's text or messages, not its merge.
            RuntimeError::Template(_)
            | RuntimeError::InvalidInput(_)
            | RuntimeError::BadParameter { .. }
            | RuntimeError::OutOfRange { .. }
                if input =>
            {
                GatewayError::BadRequest {
                    message,
                    param: None,
                    code: "invalid_value",
                }
            }
            _ => from_kind(stage, e.kind(), message),
        }
    }
}

impl From<MergeError> for GatewayError {
    fn from(e: MergeError) -> Self {
        GatewayError::at(Stage::Validation, e)
    }
}

impl From<RuntimeError> for GatewayError {
    fn from(e: RuntimeError) -> Self {
        GatewayError::at_runtime(Stage::Validation, e)
    }
}

/// The status of an error of the layers below, by its broad class and
/// where it arose (see [`Stage`]).
fn from_kind(stage: Stage, kind: ErrorKind, message: String) -> GatewayError {
    match (stage, kind) {
        (_, ErrorKind::Cancelled) => GatewayError::Conflict(message),
        (_, ErrorKind::TooLarge) => GatewayError::TooLarge {
            message,
            param: None,
        },
        (Stage::Validation, ErrorKind::Invalid) => GatewayError::BadRequest {
            message,
            param: None,
            code: "invalid_merge_spec",
        },
        (Stage::Validation, ErrorKind::NotFound) => GatewayError::NotFound {
            message,
            param: None,
        },
        (Stage::Validation | Stage::Merge, ErrorKind::Unprocessable) => {
            GatewayError::Unprocessable(message)
        }
        (Stage::Validation, ErrorKind::Conflict) => GatewayError::Conflict(message),
        // A corrupt registered checkpoint is the server's problem, not the
        // client's; so is anything that fails once validation accepted the
        // request.
        (_, ErrorKind::Corrupt | ErrorKind::Internal) | (Stage::Merge | Stage::Execution, _) => {
            GatewayError::Internal(message)
        }
    }
}

/// The `server.limits` key that bounds `work`, and what to do instead.
fn bound_key(work: Work) -> (&'static str, &'static str) {
    match work {
        Work::Iterations => ("server.limits.max_iterations", "ask for fewer iterations"),
        Work::RouterSteps => (
            "server.limits.max_router_steps",
            "ask for fewer `steps`, or name trained routers with `router_checkpoint`",
        ),
        Work::BatchSize => (
            "server.limits.max_batch_size",
            "ask for a smaller `batch_size`",
        ),
        Work::Samples => (
            "server.limits.max_calibration_samples",
            "ask for a smaller `num_samples`",
        ),
        Work::Rank => ("server.limits.max_rank", "ask for a smaller rank"),
        Work::ListLength => ("server.limits.max_list_len", "give shorter lists"),
    }
}

/// Maps actix's JSON extractor errors: a body over the limit is 413, anything
/// else (syntax, wrong types, missing fields) is 400.
pub fn json_error(err: actix_web::error::JsonPayloadError, limit: usize) -> GatewayError {
    use actix_web::error::JsonPayloadError as J;
    match err {
        J::Overflow { .. } | J::OverflowKnownLength { .. } => GatewayError::TooLarge {
            message: format!(
                "request body is larger than `server.limits.max_body_bytes` ({limit} bytes)"
            ),
            param: None,
        },
        J::ContentType => GatewayError::BadRequest {
            message: "expected `Content-Type: application/json`".to_string(),
            param: None,
            code: "invalid_content_type",
        },
        J::Deserialize(e) => GatewayError::BadRequest {
            message: format!("invalid JSON body: {e}"),
            param: None,
            code: "invalid_json",
        },
        other => GatewayError::BadRequest {
            message: format!("cannot read the request body: {other}"),
            param: None,
            code: "invalid_json",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_types_and_retry_after() {
        let cases: Vec<(GatewayError, u16, &str)> = vec![
            (
                GatewayError::bad_param("max_tokens", "too many"),
                400,
                "invalid_request_error",
            ),
            (
                GatewayError::Unauthorized("no key".into()),
                401,
                "authentication_error",
            ),
            (
                GatewayError::Forbidden("admin".into()),
                403,
                "permission_error",
            ),
            (
                GatewayError::model_not_found("nope"),
                404,
                "not_found_error",
            ),
            (
                GatewayError::Conflict("running".into()),
                409,
                "conflict_error",
            ),
            (
                GatewayError::TooLarge {
                    message: "big".into(),
                    param: None,
                },
                413,
                "request_too_large",
            ),
            (
                GatewayError::Unprocessable("shapes".into()),
                422,
                "unprocessable_merge",
            ),
            (
                GatewayError::Overloaded {
                    running: 1,
                    queued: 2,
                    queue_depth: 2,
                    retry_after: Duration::from_millis(1500),
                },
                429,
                "rate_limit_error",
            ),
            (
                GatewayError::MergePending {
                    id: "merge-00".into(),
                    waited: Duration::from_secs(1),
                    retry_after: Duration::from_secs(3),
                },
                503,
                "merge_pending",
            ),
            (GatewayError::Internal("disk".into()), 500, "internal_error"),
        ];
        for (err, status, kind) in cases {
            assert_eq!(err.status().as_u16(), status, "{err}");
            assert_eq!(err.error_type(), kind);
            let res = err.error_response();
            assert_eq!(res.status().as_u16(), status);
            let retry = res.headers().get(header::RETRY_AFTER);
            match status {
                // 1.5 s rounds up to 2.
                429 => assert_eq!(retry.unwrap(), "2"),
                503 => assert_eq!(retry.unwrap(), "3"),
                _ => assert!(retry.is_none()),
            }
        }
    }

    #[test]
    fn body_has_the_openai_shape() {
        let v = serde_json::to_value(GatewayError::bad_param("n", "`n` must be 1").body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "`n` must be 1",
                "type": "invalid_request_error", "param": "n", "code": "invalid_value"}})
        );
    }

    #[test]
    fn merge_errors_map_by_kind() {
        let e: GatewayError = MergeError::ModelCount {
            method: "slerp".into(),
            expected: "exactly 2".into(),
            found: 3,
        }
        .into();
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let e: GatewayError = MergeError::UnknownMethod {
            name: "x".into(),
            known: "y".into(),
        }
        .into();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e: GatewayError = MergeError::from(RuntimeError::MissingCheckpoint("a".into())).into();
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        // A model that fails while it runs is the server's problem.
        let e: GatewayError = RuntimeError::Generation("empty logits".into()).into();
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let e: GatewayError = RuntimeError::InvalidInput("the prompt has no tokens".into()).into();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn every_kind_has_its_status_at_every_stage() {
        use std::path::PathBuf;
        fn runtime(e: RuntimeError) -> MergeError {
            MergeError::from(e)
        }
        // One error of each kind, and its status when validation finds it,
        // while a merge runs, and while a checkpoint loads or a model runs.
        type Make = fn() -> MergeError;
        let cases: [(&str, Make, [u16; 3]); 12] = [
            (
                "invalid spec",
                || MergeError::UnknownMethod {
                    name: "x".into(),
                    known: "y".into(),
                },
                [400, 500, 500],
            ),
            (
                "invalid input",
                || runtime(RuntimeError::InvalidInput("no tokens".into())),
                [400, 500, 400],
            ),
            (
                "template",
                || runtime(RuntimeError::Template("raise".into())),
                [400, 500, 400],
            ),
            (
                "context",
                || {
                    runtime(RuntimeError::ContextLength {
                        what: "input 0".into(),
                        tokens: 9,
                        max: 8,
                    })
                },
                [400, 500, 400],
            ),
            (
                "not found",
                || runtime(RuntimeError::MissingCheckpoint(PathBuf::from("/m"))),
                [404, 500, 500],
            ),
            (
                "unprocessable",
                || {
                    runtime(RuntimeError::NonFinite {
                        what: "the model's logits".into(),
                        reason: "every logit is NaN".into(),
                    })
                },
                [422, 422, 500],
            ),
            (
                "corrupt",
                || {
                    runtime(RuntimeError::Corrupt {
                        path: PathBuf::from("/m/model.safetensors"),
                        reason: "short".into(),
                    })
                },
                [500, 500, 500],
            ),
            (
                "conflict",
                || runtime(RuntimeError::OutputNotEmpty(PathBuf::from("/out"))),
                [409, 500, 500],
            ),
            (
                "generation",
                || runtime(RuntimeError::Generation("empty logits".into())),
                [500, 500, 500],
            ),
            (
                "model",
                || runtime(RuntimeError::Model("bad ids".into())),
                [500, 500, 500],
            ),
            (
                "too large",
                || MergeError::OverBound {
                    param: "steps".into(),
                    value: 9,
                    limit: 1,
                    work: Work::RouterSteps,
                },
                [413, 413, 413],
            ),
            ("cancelled", || MergeError::Cancelled, [409, 409, 409]),
        ];
        let stages = [Stage::Validation, Stage::Merge, Stage::Execution];
        for (label, make, statuses) in cases {
            let message = make().to_string();
            for (stage, want) in stages.into_iter().zip(statuses) {
                let e = GatewayError::at(stage, make());
                assert_eq!(e.status().as_u16(), want, "{label} at {stage:?}: {e}");
                assert!(e.to_string().contains(&message), "{label}: {e}");
                let code = e.body().error.code;
                match want {
                    500 => {
                        assert_eq!(e.error_type(), "internal_error", "{label} at {stage:?}");
                        assert_eq!(code, None, "{label} at {stage:?}");
                    }
                    // Only validation names the spec.
                    400 => assert_eq!(
                        code.as_deref() == Some("invalid_merge_spec"),
                        label == "invalid spec",
                        "{label} at {stage:?}: {code:?}"
                    ),
                    _ => {}
                }
            }
        }
    }
}
