//! Search jobs (`POST /v1/searches`): `fusion search` run by the server on
//! a registered pool and a configured task pool, one at a time in a
//! thread of its own, its progress in `GET /v1/searches/{id}`, its best
//! spec registered as a preset when it ends.
//!
//! The search merges each candidate in memory outside the model cache (as
//! `fusion search` does) and scores it on the task pool; its work is
//! bounded by `server.limits.max_search_evaluations` (the budget) and
//! `max_search_jobs` (candidates at once). Records are kept in memory,
//! the newest [`MAX_SEARCHES`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use evaluator::pool::ModelPool;
use evaluator::search::config::{Overrides, SearchConfig};
use evaluator::search::run::{run_search_observed, show_score, SearchOptions};
use merger::spec::compact;
use serde::Serialize;
use utoipa::ToSchema;

use crate::clock::unix_time;
use crate::config::Config;
use crate::error::{GatewayError, Result};
use crate::registry::Registry;

/// Search records kept; past it the oldest finished one is forgotten.
pub const MAX_SEARCHES: usize = 100;

/// Where a search stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SearchState {
    /// Merging and scoring candidates.
    Running,
    /// Done; its best spec is the preset.
    Succeeded,
    /// A candidate failed to merge or score, or the preset was refused.
    Failed,
    /// Stopped by a shutdown.
    Cancelled,
}

/// One evaluation of a search's trace.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SearchPoint {
    /// 1-based, in the order the optimiser proposed the candidates.
    pub index: usize,
    /// The dimensions' values, in `dimensions` order.
    pub values: Vec<f64>,
    /// The objective's score.
    pub score: f64,
    /// The best score so far.
    pub best: f64,
}

/// A search as `GET /v1/searches/{id}` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SearchInfo {
    /// `search-<n>`.
    pub id: String,
    /// `search`.
    pub object: &'static str,
    /// Where it stands.
    pub status: SearchState,
    /// The pool searched.
    pub pool: String,
    /// The task pool scored on.
    pub taskpool: String,
    /// `cmaes` or `random`.
    pub algorithm: String,
    /// What is optimised (`average`, or a task's metric).
    pub objective: String,
    /// Evaluations it may spend.
    pub budget: usize,
    /// Evaluations done.
    pub evaluations: usize,
    /// The searched dimensions' names (`weight[add]`, `density`, ...).
    pub dimensions: Vec<String>,
    /// The best score so far, as tables show it (percent for fractions).
    pub best_score: Option<String>,
    /// The best score so far, raw.
    pub best_value: Option<f64>,
    /// The best spec so far, compact.
    pub best_spec: Option<String>,
    /// The preset the best spec is registered as when the search succeeds.
    pub preset: String,
    /// Every evaluation so far.
    pub trace: Vec<SearchPoint>,
    /// Why it failed.
    pub error: Option<String>,
    /// Unix time it started.
    pub created: u64,
    /// Unix time it ended.
    pub finished: Option<u64>,
}

/// The search jobs.
pub struct Searches {
    records: Mutex<BTreeMap<u64, SearchInfo>>,
    next: AtomicU64,
    running: Arc<AtomicBool>,
    cancel: Arc<AtomicBool>,
}

impl Default for Searches {
    fn default() -> Self {
        Searches {
            records: Mutex::default(),
            next: AtomicU64::new(1),
            running: Arc::new(AtomicBool::new(false)),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// A search to start: the pool, the task pool, the `search.yaml` body (as
/// JSON or YAML text) and the preset name.
pub struct SearchRequest {
    /// A configured pool.
    pub pool: String,
    /// A key of `taskpools` (default: the pool's name, else the only one).
    pub taskpool: Option<String>,
    /// The search's config: `merge`, `space`, `objective`, `budget`, ...
    /// (no `pool` or `taskpool`).
    pub config: String,
    /// The preset to register (default: the search's id).
    pub preset: Option<String>,
}

impl Searches {
    /// Every search, newest first.
    pub fn list(&self) -> Vec<SearchInfo> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.values().rev().cloned().collect()
    }

    /// Search `id`.
    pub fn get(&self, id: &str) -> Option<SearchInfo> {
        let n: u64 = id.strip_prefix("search-")?.parse().ok()?;
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.get(&n).cloned()
    }

    /// Stops the running search before its next generation (shutdown).
    pub fn cancel_all(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Validates `req` and starts it in a thread of its own; its record.
    /// A 409 while another search runs; 400s name the field.
    pub fn start(
        self: &Arc<Self>,
        req: SearchRequest,
        config: &Config,
        registry: Arc<Registry>,
    ) -> Result<SearchInfo> {
        let limits = &config.server.limits;
        if limits.max_search_evaluations == 0 {
            return Err(GatewayError::Forbidden(
                "searches are turned off (`server.limits.max_search_evaluations` is 0)".into(),
            ));
        }
        if self.cancel.load(Ordering::SeqCst) {
            return Err(GatewayError::Unavailable(
                "the server is shutting down".into(),
            ));
        }
        let (pool, taskpool) = model_pool(config, &req.pool, req.taskpool.as_deref())?;
        let origin = "search";
        let mut cfg =
            SearchConfig::parse_for_pool(&req.config, origin, pool, &Overrides::default())
                .map_err(|e| GatewayError::bad_param("search", e.to_string()))?;
        if cfg.budget > limits.max_search_evaluations {
            return Err(GatewayError::bad_param(
                "search",
                format!(
                    "`budget`: {} evaluations, above `server.limits.max_search_evaluations` ({})",
                    cfg.budget, limits.max_search_evaluations
                ),
            ));
        }
        cfg.jobs = cfg.jobs.min(limits.max_search_jobs);
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let id = format!("search-{n}");
        let preset = req.preset.clone().unwrap_or_else(|| id.clone());
        // The preset name is checked before any work.
        if preset.is_empty() || preset.len() > 64 || preset.starts_with("merge-") {
            return Err(GatewayError::bad_param(
                "preset",
                format!("`{preset}`: 1 to 64 characters, not starting with `merge-`"),
            ));
        }
        if self
            .running
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(GatewayError::Conflict(
                "a search is running; one runs at a time (see GET /v1/searches)".into(),
            ));
        }
        let info = SearchInfo {
            id: id.clone(),
            object: "search",
            status: SearchState::Running,
            pool: req.pool.clone(),
            taskpool,
            algorithm: cfg.algorithm.to_string(),
            objective: cfg.objective.describe(),
            budget: cfg.budget,
            evaluations: 0,
            dimensions: cfg.dimensions.iter().map(|d| d.name.clone()).collect(),
            best_score: None,
            best_value: None,
            best_spec: None,
            preset: preset.clone(),
            trace: Vec::new(),
            error: None,
            created: unix_time(),
            finished: None,
        };
        {
            let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
            records.insert(n, info.clone());
            while records.len() > MAX_SEARCHES {
                let oldest = records
                    .iter()
                    .find(|(_, r)| r.status != SearchState::Running)
                    .map(|(k, _)| *k);
                match oldest {
                    Some(k) => records.remove(&k),
                    None => break,
                };
            }
        }
        let device = runtime::device::parse_device(&config.device)
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name(id.clone())
            .spawn(move || this.run(n, cfg, device, preset, registry));
        if let Err(e) = spawned {
            self.running.store(false, Ordering::SeqCst);
            self.update(n, |r| {
                r.status = SearchState::Failed;
                r.error = Some(format!("starting the search: {e}"));
            });
            return Err(GatewayError::Internal(format!("starting the search: {e}")));
        }
        tracing::info!(search = %id, "search started");
        Ok(info)
    }

    fn update(&self, n: u64, f: impl FnOnce(&mut SearchInfo)) {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = records.get_mut(&n) {
            f(r);
        }
    }

    /// The search thread: runs the search, recording every evaluation,
    /// then registers the best spec as the preset.
    fn run(
        &self,
        n: u64,
        cfg: SearchConfig,
        device: candle_core::Device,
        preset: String,
        registry: Arc<Registry>,
    ) {
        let opts = SearchOptions {
            device,
            progress: false,
        };
        let observe = |e: &evaluator::search::run::Evaluation| {
            self.update(n, |r| {
                r.evaluations = e.index;
                r.trace.push(SearchPoint {
                    index: e.index,
                    values: e.values.clone(),
                    score: e.score,
                    best: e.best,
                });
                if r.best_value != Some(e.best) {
                    r.best_value = Some(e.best);
                    r.best_score = Some(show_score(&cfg.objective, e.best));
                    if e.best == e.score {
                        r.best_spec = cfg.spec_at(&e.values).ok().map(|s| compact::to_compact(&s));
                    }
                }
            });
        };
        let outcome = run_search_observed(&cfg, &opts, &observe, &self.cancel);
        let result = outcome
            .map_err(|e| {
                (
                    e.to_string(),
                    matches!(e, evaluator::EvalError::Cancelled(_)),
                )
            })
            .and_then(|o| {
                let mut spec = o.best_spec.clone();
                spec.pool = Some(cfg.pool.name.clone());
                registry
                    .register_preset(&preset, spec)
                    .map(|()| o)
                    .map_err(|e| (format!("registering preset `{preset}`: {e}"), false))
            });
        match result {
            Ok(o) => {
                let best = o.best_evaluation().score;
                tracing::info!(search = n, preset = %preset, best, seconds = o.seconds,
                    "search done; best spec registered as a preset");
                self.update(n, |r| {
                    r.status = SearchState::Succeeded;
                    r.best_value = Some(best);
                    r.best_score = Some(show_score(&cfg.objective, best));
                    r.best_spec = Some(compact::to_compact(&o.best_spec));
                    r.finished = Some(unix_time());
                });
            }
            Err((e, cancelled)) => {
                tracing::warn!(search = n, error = %e, "search stopped");
                self.update(n, |r| {
                    r.status = if cancelled {
                        SearchState::Cancelled
                    } else {
                        SearchState::Failed
                    };
                    r.error = Some(e);
                    r.finished = Some(unix_time());
                });
            }
        }
        self.running.store(false, Ordering::SeqCst);
    }
}

/// The gateway pool `name` as an evaluator pool with its task pool
/// (`taskpool`, else the task pool of the pool's name, else the only one).
fn model_pool(config: &Config, name: &str, taskpool: Option<&str>) -> Result<(ModelPool, String)> {
    let pool = config
        .pools
        .get(name)
        .ok_or_else(|| GatewayError::NotFound {
            message: format!(
                "unknown pool `{name}`; pools: {}",
                config.pools.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            param: Some("pool".into()),
        })?;
    let known = config
        .taskpools
        .keys()
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    let key = match taskpool {
        Some(t) => t.to_string(),
        None if config.taskpools.contains_key(name) => name.to_string(),
        None if config.taskpools.len() == 1 => config.taskpools.keys().next().cloned().unwrap(),
        None => {
            return Err(GatewayError::bad_param(
                "taskpool",
                format!("name the task pool to score on (`taskpool`: one of {known})"),
            ))
        }
    };
    let dir = config
        .taskpools
        .get(&key)
        .ok_or_else(|| GatewayError::NotFound {
            message: format!("unknown task pool `{key}`; task pools: {known}"),
            param: Some("taskpool".into()),
        })?;
    Ok((
        ModelPool {
            name: name.to_string(),
            path: PathBuf::from(format!("pool `{name}`")),
            base: pool.base.clone(),
            experts: pool
                .experts
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            taskpool: Some(dir.clone()),
            calibration: None,
        },
        key,
    ))
}
