//! What every request handler shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use runtime::model::ModelOptions;

use crate::auth::Keys;
use crate::batching::Batching;
use crate::config::Config;
use crate::error::{GatewayError, Result};
use crate::evaluations::{Evaluations, Scheduler};
use crate::limits::admission::Admission;
use crate::limits::traffic::{Traffic, MAX_YIELD};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::ModelStore;

/// The gateway's shared state.
pub struct AppState {
    /// The validated configuration.
    pub config: Config,
    /// Pools and presets.
    pub registry: Arc<Registry>,
    /// Resident models, the book of merges and their loader.
    pub models: ModelStore,
    /// Generation slots and queue.
    pub admission: Admission,
    /// Client requests in flight, which background training yields to.
    pub traffic: Traffic,
    /// What every model's batching scheduler starts with (its bounds, the
    /// shared `kv_cache_bytes` budget, the metrics).
    pub batching: Batching,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// API keys.
    pub keys: Keys,
    /// Scheduled and requested evaluations and their results.
    pub evaluations: Arc<Evaluations>,
    /// What runs the evaluations.
    pub scheduler: Arc<Scheduler>,
    /// Search jobs (`POST /v1/searches`).
    pub searches: Arc<crate::searches::Searches>,
    ready: Arc<AtomicBool>,
    started: Instant,
}

impl AppState {
    /// Opens the registry's checkpoints and builds the shared state.
    pub fn new(config: Config) -> Result<Self> {
        let device =
            runtime::device::parse_device(&config.device).map_err(|e| GatewayError::Config {
                origin: "`device`".to_string(),
                reason: e.to_string(),
            })?;
        let metrics = Metrics::new();
        let registry = Arc::new(Registry::open(&config)?);
        let opts = ModelOptions {
            device,
            ..ModelOptions::default()
        };
        let traffic = Traffic::new(MAX_YIELD);
        let models = ModelStore::new(
            registry.clone(),
            &config,
            opts,
            metrics.clone(),
            traffic.turn(),
        );
        let limits = &config.server.limits;
        let admission = Admission::new(
            limits.max_concurrent_generations,
            limits.queue_depth,
            metrics.queue_depth.clone(),
            metrics.generations_running.clone(),
        );
        let batching = Batching::new(limits, metrics.clone());
        let keys = Keys::new(
            config.server.api_keys.clone(),
            config.server.admin_keys.clone(),
        );
        let ready = Arc::new(AtomicBool::new(true));
        let evaluations = Arc::new(Evaluations::new(&config, metrics.clone()));
        let scheduler = Arc::new(Scheduler::new(
            evaluations.clone(),
            models.clone(),
            admission.clone(),
            ready.clone(),
            limits.max_concurrent_generations.clamp(1, 8),
            batching.clone(),
        ));
        Ok(AppState {
            config,
            registry,
            models,
            admission,
            traffic,
            batching,
            metrics,
            keys,
            evaluations,
            scheduler,
            searches: Arc::default(),
            ready,
            started: Instant::now(),
        })
    }

    /// Whether the server takes requests (false once shutdown has begun);
    /// `/health/ready` also fails while a `fail_readiness` evaluation is
    /// degraded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Marks the server as going away: readiness fails from now on, and
    /// every pending or running merge is cancelled (its waiters get a 503).
    pub fn begin_shutdown(&self) {
        self.ready.store(false, Ordering::SeqCst);
        self.models.cancel_all();
        self.searches.cancel_all();
    }

    /// Seconds since the state was built.
    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}
