//! Binding, middleware (request ids, logs, metrics, auth), graceful
//! shutdown and logging setup.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpServer};
use futures_util::FutureExt;
use tracing::Instrument;
use utoipa_swagger_ui::SwaggerUi;

use crate::config::{Config, LogFormat};
use crate::error::{json_error, GatewayError, Result};
use crate::state::AppState;
use crate::{openapi, paths, routes, REQUEST_ID_HEADER};

/// Longest accepted incoming request id; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// Installs the tracing subscriber (filter from `FUSION_LOG`, default
/// `info`); a second call is a no-op.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FUSION_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn request_id(req: &ServiceRequest) -> String {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.chars().all(|c| c.is_ascii_graphic())
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// Request id, log line and HTTP metrics of every request.
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> std::result::Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = Instant::now();
    let id = request_id(&req);
    let method = req.method().to_string();
    let path = req.path().to_string();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let span = tracing::info_span!("request", id = %id, method = %method, path = %path);
    // A panic is a bug; it answers 500 (the error becomes the response)
    // instead of taking the connection down.
    let result = match AssertUnwindSafe(next.call(req).instrument(span.clone()))
        .catch_unwind()
        .await
    {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            span.in_scope(|| tracing::error!(panic = %what, "handler panicked"));
            Err(GatewayError::Internal("internal error (the handler panicked)".to_string()).into())
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    let (route, status) = match &result {
        Ok(res) => (
            res.request()
                .match_pattern()
                .unwrap_or_else(|| "unmatched".to_string()),
            res.status(),
        ),
        Err(e) => ("unmatched".to_string(), e.as_response_error().status_code()),
    };
    if let Some(state) = state {
        state
            .metrics
            .http_requests
            .with_label_values(&[&route, status.as_str()])
            .inc();
        state
            .metrics
            .http_duration
            .with_label_values(&[&route])
            .observe(seconds);
    }
    span.in_scope(|| {
        tracing::info!(
            status = status.as_u16(),
            route = %route,
            ms = (seconds * 1000.0 * 100.0).round() / 100.0,
            "request"
        )
    });
    let mut res = result?;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut()
            .insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
    }
    Ok(res)
}

/// The route pattern the router will match for `req`: the router's own
/// resource map applied to the router's own (percent-decoded) path, so
/// `/%76%31/merges` and `/v1/%6derges` are `/v1/merges`.
fn routed_pattern(req: &ServiceRequest) -> Option<String> {
    req.request()
        .resource_map()
        .match_pattern(req.match_info().as_str())
}

/// Bearer keys (see [`crate::auth`]), decided on the route the request is
/// routed to, not on its path string.
async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> std::result::Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let pattern = routed_pattern(&req);
    let access = crate::auth::access_of_route(pattern.as_deref());
    let verdict = match req.app_data::<web::Data<AppState>>() {
        Some(state) => {
            let header = req
                .headers()
                .get(actix_web::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            state
                .keys
                .authorize(access, pattern.as_deref().unwrap_or("?"), header)
        }
        None => Err(GatewayError::Internal("no application state".to_string())),
    };
    match verdict {
        Ok(()) => {
            let res = next.call(req).await?;
            // The route that answered must be of the class that was checked
            // (the same resource map decides both); a disagreement is a bug:
            // it is logged and its answer withheld.
            let answered = res.request().match_pattern();
            let answered_access = crate::auth::access_of_route(answered.as_deref());
            if answered.is_some() && answered_access != access {
                tracing::error!(
                    checked = ?pattern,
                    answered = ?answered,
                    "authorization checked a different route than the one that answered"
                );
                let err = GatewayError::Internal("route resolution disagreed".to_string());
                let (req, _) = res.into_parts();
                return Ok(ServiceResponse::from_err(err, req).map_into_right_body());
            }
            Ok(res.map_into_left_body())
        }
        Err(e) => Ok(req.error_response(e).map_into_right_body()),
    }
}

/// `/docs` → `/docs/` (where Swagger UI lives).
async fn docs_redirect() -> actix_web::HttpResponse {
    actix_web::HttpResponse::PermanentRedirect()
        .insert_header(("location", "/docs/"))
        .finish()
}

async fn unknown_route(req: actix_web::HttpRequest) -> Result<actix_web::HttpResponse> {
    Err(GatewayError::NotFound {
        message: format!("no route `{} {}`", req.method(), req.path()),
        param: None,
    })
}

/// The HTTP server of `state`, bound to `server.bind`, not yet running.
fn build(state: web::Data<AppState>) -> Result<(actix_web::dev::Server, SocketAddr)> {
    let config = &state.config;
    let limit = usize::try_from(config.server.limits.max_body_bytes).unwrap_or(usize::MAX);
    let bind = config.server.bind.clone();
    let workers = config.server.workers;
    let shutdown = config.server.shutdown_timeout;
    let doc = openapi::document();
    let app_state = state.clone();
    let mut server = HttpServer::new(move || {
        let json = web::JsonConfig::default()
            .limit(limit)
            .content_type_required(false)
            .error_handler(move |err, _req| json_error(err, limit).into());
        let path = web::PathConfig::default()
            .error_handler(|err, _req| GatewayError::bad_request(err.to_string()).into());
        let query = web::QueryConfig::default()
            .error_handler(|err, _req| GatewayError::bad_request(err.to_string()).into());
        App::new()
            .app_data(app_state.clone())
            .app_data(json)
            .app_data(path)
            .app_data(query)
            .configure(routes::configure)
            .route(paths::DOCS, web::get().to(docs_redirect))
            .service(SwaggerUi::new(paths::DOCS_FILES).url(paths::OPENAPI, doc.clone()))
            .default_service(web::to(unknown_route))
            .wrap(from_fn(authenticate))
            .wrap(from_fn(observe))
    })
    // A client that closes its side of the connection has gone away: the
    // connection shuts down and the request's handler is dropped, which
    // stops its generation or embedding and frees its slot (actix's
    // default keeps half-closed connections until the handler finishes).
    .h1_allow_half_closed(false)
    .shutdown_timeout(shutdown.as_secs().max(1))
    .shutdown_signal(shutdown_signal(state.clone()));
    if let Some(w) = workers {
        server = server.workers(w);
    }
    let server = server
        .bind(&bind)
        .map_err(|e| GatewayError::Startup(format!("cannot listen on `{bind}`: {e}")))?;
    let addr = *server
        .addrs()
        .first()
        .ok_or_else(|| GatewayError::Startup(format!("`{bind}` resolved to no address")))?;
    tracing::info!("listening on http://{addr} (API docs at http://{addr}/docs/)");
    let server = server.run();
    state.scheduler.start();
    Ok((server, addr))
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C); readiness fails from then on,
/// while in-flight requests finish (up to `server.shutdown_timeout`).
async fn shutdown_signal(state: web::Data<AppState>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                state.begin_shutdown();
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: finishing in-flight requests"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    state.begin_shutdown();
}

/// Builds the state from `config` and serves until SIGTERM/SIGINT
/// (blocking; what `fusion serve` runs).
pub fn run(config: Config) -> Result<()> {
    init_tracing(config.server.log_format);
    let state = web::Data::new(AppState::new(config)?);
    for (name, pool) in state.registry.pools() {
        tracing::info!(
            pool = %name,
            checkpoints = ?pool.checkpoint_names().collect::<Vec<_>>(),
            "pool opened"
        );
    }
    tracing::info!(
        device = %state.config.device,
        cache_bytes = state.config.cache.max_bytes,
        presets = ?state.registry.presets().keys().collect::<Vec<_>>(),
        "serving"
    );
    actix_web::rt::System::new().block_on(async move {
        let (server, _addr) = build(state)?;
        server
            .await
            .map_err(|e| GatewayError::Startup(format!("server error: {e}")))
    })?;
    tracing::info!("stopped");
    Ok(())
}

/// A server running on a thread of its own (tests, benchmarks).
pub struct RunningServer {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    handle: ServerHandle,
    state: web::Data<AppState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningServer {
    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The shared state (metrics, cache) for in-process checks.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Stops gracefully (in-flight requests finish) and waits.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.state.begin_shutdown();
            // The handle's future is not awaited here: the server thread
            // finishes the stop and exits.
            drop(self.handle.stop(true));
            let _ = thread.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a server for `config` on a thread of its own; returns once it
/// listens.
pub fn spawn(config: Config) -> Result<RunningServer> {
    let state = web::Data::new(AppState::new(config)?);
    let (tx, rx) = std::sync::mpsc::channel();
    let thread_state = state.clone();
    let thread = std::thread::Builder::new()
        .name("fusion-gateway".into())
        .spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                match build(thread_state) {
                    Ok((server, addr)) => {
                        let handle = server.handle();
                        let _ = tx.send(Ok((handle, addr)));
                        let _ = server.await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
        })
        .map_err(|e| GatewayError::Startup(format!("cannot start the server thread: {e}")))?;
    let (handle, addr) = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| GatewayError::Startup("the server did not start".to_string()))??;
    Ok(RunningServer {
        addr,
        handle,
        state,
        thread: Some(thread),
    })
}
