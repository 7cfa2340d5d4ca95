//! The gateway's side of continuous batching: each resident text model
//! that can be batched gets one [`Scheduler`] (built on its first
//! generation, ended with the model), bounded by `server.limits`
//! (`max_batch_tokens`, `max_running_sequences`, `kv_block_tokens`,
//! `queue_depth`), and reports its steps to the Prometheus metrics
//! ([`BatchMetrics`]). Every scheduler's key/value blocks count against
//! one server-wide budget of `kv_cache_bytes`.

use std::sync::{Arc, Mutex};

use runtime::generate::{Scheduler, SchedulerLimits, StepObserver};
use runtime::model::KvBudget;

use crate::config::LimitsConfig;
use crate::engine::Engine;
use crate::metrics::Metrics;

/// What every model's scheduler is started with: the bounds, the one
/// key/value budget they share, and the metrics they report to. Shared by
/// the request path and the scheduled evaluations.
#[derive(Clone)]
pub struct Batching {
    limits: SchedulerLimits,
    budget: Arc<KvBudget>,
    metrics: Metrics,
}

impl Batching {
    /// The bounds of `limits` (`kv_cache_bytes` is the shared budget),
    /// reporting to `metrics`.
    pub fn new(limits: &LimitsConfig, metrics: Metrics) -> Self {
        Batching {
            limits: scheduler_limits(limits),
            budget: KvBudget::new(limits.kv_cache_bytes),
            metrics,
        }
    }

    /// The scheduler of `engine`, started on the first call; `None` when
    /// the model is not batched.
    pub fn scheduler_of<'a>(&self, engine: &'a Engine) -> Option<&'a Scheduler> {
        engine.scheduler(
            || (self.limits.clone(), self.budget.clone()),
            || Arc::new(BatchMetrics::new(self.metrics.clone())),
        )
    }
}

/// The scheduler bounds of `limits`.
fn scheduler_limits(limits: &LimitsConfig) -> SchedulerLimits {
    SchedulerLimits {
        max_batch_tokens: limits.max_batch_tokens,
        max_running_sequences: limits.max_running_sequences,
        kv_cache_bytes: limits.kv_cache_bytes,
        block_tokens: limits.kv_block_tokens,
        queue_depth: limits.queue_depth,
    }
}

/// One scheduler's metrics: histograms of its steps and latencies, and its
/// share of the gauges of every scheduler together (running sequences,
/// queued requests, key/value bytes), taken back when it ends.
pub struct BatchMetrics {
    metrics: Metrics,
    /// The state last added to the gauges.
    last: Mutex<(i64, i64, i64)>,
}

impl BatchMetrics {
    /// Reports to `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        BatchMetrics {
            metrics,
            last: Mutex::new((0, 0, 0)),
        }
    }

    fn set(&self, now: (i64, i64, i64)) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let m = &self.metrics;
        m.generations_running.add(now.0 - last.0);
        m.queue_depth.add(now.1 - last.1);
        m.kv_cache_bytes.add(now.2 - last.2);
        *last = now;
    }
}

impl StepObserver for BatchMetrics {
    fn step(&self, sequences: usize, tokens: usize, seconds: f64) {
        self.metrics.batch_sequences.observe(sequences as f64);
        self.metrics.batch_tokens.observe(tokens as f64);
        self.metrics.batch_step.observe(seconds);
    }

    fn admitted(&self, seconds: f64) {
        self.metrics.queue_seconds.observe(seconds);
    }

    fn first_token(&self, seconds: f64) {
        self.metrics.time_to_first_token.observe(seconds);
    }

    fn inter_token(&self, seconds: f64) {
        self.metrics.inter_token.observe(seconds);
    }

    fn state(&self, running: usize, queued: usize, kv_bytes: u64) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.set((g(running as u64), g(queued as u64), g(kv_bytes)));
    }
}

impl Drop for BatchMetrics {
    fn drop(&mut self) {
        self.set((0, 0, 0));
    }
}
