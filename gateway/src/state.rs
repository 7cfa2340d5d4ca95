//! What every request handler shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use runtime::model::ModelOptions;

use crate::auth::Keys;
use crate::cache::ModelCache;
use crate::config::Config;
use crate::error::{GatewayError, Result};
use crate::evaluations::Evaluations;
use crate::limits::admission::Admission;
use crate::merges::{Merges, Served};
use crate::metrics::Metrics;
use crate::registry::Registry;

/// The gateway's shared state.
pub struct AppState {
    /// The validated configuration.
    pub config: Config,
    /// Pools and presets.
    pub registry: Registry,
    /// Resident models.
    pub cache: ModelCache<Served>,
    /// Merge execution and the book of merges.
    pub merges: Merges,
    /// Generation slots and queue.
    pub admission: Admission,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// API keys.
    pub keys: Keys,
    /// Scheduled evaluations and their results.
    pub evaluations: Evaluations,
    ready: AtomicBool,
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
        let registry = Registry::open(&config)?;
        let cache = ModelCache::new(config.cache.max_bytes, metrics.clone());
        let opts = ModelOptions {
            device,
            ..ModelOptions::default()
        };
        let merges = Merges::new(
            config.merge.max_concurrent,
            config.server.limits.max_book_bytes,
            opts,
            metrics.clone(),
        );
        let limits = &config.server.limits;
        let admission = Admission::new(
            limits.max_concurrent_generations,
            limits.queue_depth,
            metrics.queue_depth.clone(),
            metrics.generations_running.clone(),
        );
        let keys = Keys::new(
            config.server.api_keys.clone(),
            config.server.admin_keys.clone(),
        );
        let evaluations = Evaluations::new(&config, metrics.clone());
        Ok(AppState {
            config,
            registry,
            cache,
            merges,
            admission,
            metrics,
            keys,
            evaluations,
            ready: AtomicBool::new(true),
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
        self.merges.cancel_all();
    }

    /// Seconds since the state was built.
    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}
