//! Scheduled evaluations: the configured `evaluations` run in the
//! background, their scores become `fusion_eval_*` metrics, their results
//! are kept on disk ([`store`]) and served at `/v1/evaluations`.
//!
//! - One runner: runs never overlap (a run waits for the one before it).
//!   Each run opens its task pool and reads its tasks first (a missing file
//!   or a broken JSONL line fails the run at once, naming the file and the
//!   line), then resolves its merge through the same cache as requests (a
//!   hit when traffic uses the same merge; a miss merges it and leaves it
//!   cached for traffic), then scores it on a blocking thread with the
//!   evaluator's runner. Every scorer call holds one generation slot
//!   ([`scorer::AdmittedScorer`]), taken only when no request waits.
//! - A run that fails is recorded (`outcome: error`, the error text) and the
//!   previous scores stay; the server keeps serving.
//! - A task whose headline metric is a fraction (accuracy, exact match)
//!   scoring under `min_score` marks the evaluation degraded:
//!   `fusion_eval_degraded{merge} 1` and an entry in `/health/ready`'s body;
//!   readiness fails only with `fail_readiness: true`. Perplexities are
//!   never compared with `min_score`.
//! - The first run comes `delay` after the start, or `every` after the last
//!   run on disk when that is later; then every `every`.
//! - One-off evaluations (`POST /v1/evaluations` with a `merge`) are kept up
//!   to `server.limits.max_evaluations`: a new one past it forgets the
//!   oldest idle one (its entry, metric series and result file); when every
//!   one is running or waiting, the new one is refused (409).

pub mod demo;
pub mod scorer;
pub mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::web;
use evaluator::runner::{load_tasks, run_tasks, RunOptions, TaskResult};
use evaluator::taskpool::{Task, TaskPool};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::{Config, EvaluationConfig};
use crate::error::{GatewayError, Result};
use crate::merges::Served;
use crate::metrics::Metrics;
use crate::serving;
use crate::state::AppState;
use scorer::AdmittedScorer;
use store::{Saved, Store};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every task was scored.
    Success,
    /// The run failed (task pool, merge or scoring); see `error`.
    Error,
}

impl Outcome {
    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Error => "error",
        }
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The schedule.
    Schedule,
    /// `POST /v1/evaluations`.
    Request,
}

/// The scores of one task in a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskScore {
    /// The task.
    pub task: String,
    /// Its kind (`multiple_choice`, `generate`, `perplexity`, `classification`).
    pub kind: String,
    /// The headline metric.
    pub metric: String,
    /// The headline metric's value.
    pub score: f64,
    /// Every metric of the task.
    pub metrics: BTreeMap<String, f64>,
    /// Examples scored.
    pub samples: usize,
    /// Examples in the task file.
    pub total: usize,
    /// Seconds spent scoring.
    pub seconds: f64,
}

impl From<TaskResult> for TaskScore {
    fn from(r: TaskResult) -> Self {
        TaskScore {
            task: r.task,
            kind: r.kind.as_str().to_string(),
            metric: r.metric,
            score: r.score,
            metrics: r.metrics,
            samples: r.samples,
            total: r.total,
            seconds: r.seconds,
        }
    }
}

/// One run of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunRecord {
    /// Run id (what `POST /v1/evaluations` answers).
    pub id: String,
    /// What started it.
    pub trigger: Trigger,
    /// How it ended.
    pub outcome: Outcome,
    /// The model scored (`merge-<id>` or `pool/name`), once resolved.
    pub model: Option<String>,
    /// Unix time the run started (seconds).
    pub started: f64,
    /// Unix time it ended.
    pub finished: f64,
    /// Its wall time in seconds.
    pub duration_seconds: f64,
    /// Per-task scores (empty when the run failed).
    pub tasks: Vec<TaskScore>,
    /// Mean headline score of the tasks whose metric is a fraction.
    pub average: Option<f64>,
    /// Whether a task scored under `min_score`.
    pub degraded: bool,
    /// The tasks under `min_score`.
    pub below_min_score: Vec<String>,
    /// Why the run failed (names the file and line for task data).
    pub error: Option<String>,
}

/// An evaluation, resolved from the configuration or a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Name (the `merge` label of the metrics).
    pub name: String,
    /// The model string, as a request's `model` field.
    pub merge: String,
    /// The task pool as configured (a `taskpools` key or a folder).
    pub taskpool: String,
    /// The task pool folder.
    pub taskpool_dir: PathBuf,
    /// Only these tasks (empty: all).
    pub tasks: Vec<String>,
    /// Period; `None` for a run requested through the API only.
    pub every: Option<Duration>,
    /// Wait before the first scheduled run.
    pub delay: Duration,
    /// Examples per task.
    pub limit: Option<usize>,
    /// Degraded under this headline score.
    pub min_score: Option<f64>,
    /// Whether degradation fails readiness.
    pub fail_readiness: bool,
}

impl Evaluation {
    /// A scheduled evaluation of the configuration.
    pub fn from_config(config: &Config, e: &EvaluationConfig) -> Self {
        Evaluation {
            name: e.display_name().to_string(),
            merge: e.merge.trim().to_string(),
            taskpool: e.taskpool.clone(),
            taskpool_dir: config.taskpool_dir(e),
            tasks: e.tasks.clone(),
            every: Some(e.every),
            delay: e.delay,
            limit: e.limit,
            min_score: e.min_score,
            fail_readiness: e.fail_readiness,
        }
    }

    /// The tasks of `results` under `min_score` (fractions only).
    fn below(&self, results: &[TaskScore]) -> Vec<String> {
        let Some(min) = self.min_score else {
            return Vec::new();
        };
        results
            .iter()
            .filter(|t| evaluator::metrics::is_fraction(&t.metric) && t.score < min)
            .map(|t| t.task.clone())
            .collect()
    }
}

/// Whether an evaluation is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Waiting for its next run.
    Idle,
    /// Running, or waiting for the run before it.
    Running,
}

/// An evaluation as `GET /v1/evaluations` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EvaluationInfo {
    /// Its name (the `merge` label of its metrics).
    pub name: String,
    /// The model evaluated (preset, checkpoint, compact merge or `merge-<id>`).
    pub merge: String,
    /// The task pool (a `taskpools` key or a folder).
    pub taskpool: String,
    /// Only these tasks (empty: all).
    pub tasks: Vec<String>,
    /// Whether it is scheduled (false: created by `POST /v1/evaluations`).
    pub scheduled: bool,
    /// Period in seconds, when scheduled.
    pub every_seconds: Option<f64>,
    /// Examples per task.
    pub limit: Option<usize>,
    /// Degraded under this score.
    pub min_score: Option<f64>,
    /// Whether degradation fails readiness.
    pub fail_readiness: bool,
    /// Idle or running.
    pub status: RunState,
    /// Whether the last successful run scored under `min_score`.
    pub degraded: bool,
    /// Unix time of the next scheduled run.
    pub next_run: Option<f64>,
    /// The last run, successful or not.
    pub last: Option<RunRecord>,
    /// The last successful run.
    pub last_success: Option<RunRecord>,
}

/// A degraded evaluation, as `/health/ready` lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Degraded {
    /// The evaluation.
    pub name: String,
    /// Its model.
    pub merge: String,
    /// Tasks under `min_score`.
    pub tasks: Vec<String>,
    /// The threshold.
    pub min_score: Option<f64>,
    /// Whether this fails readiness.
    pub fail_readiness: bool,
}

struct Entry {
    def: Evaluation,
    scheduled: bool,
    /// Order of definition (one-offs: the oldest idle one is forgotten first).
    seq: u64,
    running: bool,
    next_run: Option<f64>,
    last: Option<RunRecord>,
    last_success: Option<RunRecord>,
    /// Tasks of `last_success` under the current `min_score`.
    below: Vec<String>,
}

impl Entry {
    fn new(def: Evaluation, scheduled: bool, seq: u64) -> Self {
        Entry {
            def,
            scheduled,
            seq,
            running: false,
            next_run: None,
            last: None,
            last_success: None,
            below: Vec::new(),
        }
    }

    fn info(&self) -> EvaluationInfo {
        let d = &self.def;
        EvaluationInfo {
            name: d.name.clone(),
            merge: d.merge.clone(),
            taskpool: d.taskpool.clone(),
            tasks: d.tasks.clone(),
            scheduled: self.scheduled,
            every_seconds: d.every.map(|e| e.as_secs_f64()),
            limit: d.limit,
            min_score: d.min_score,
            fail_readiness: d.fail_readiness,
            status: if self.running {
                RunState::Running
            } else {
                RunState::Idle
            },
            degraded: !self.below.is_empty(),
            next_run: self.next_run,
            last: self.last.clone(),
            last_success: self.last_success.clone(),
        }
    }
}

/// The evaluations, their last results and the runner's lock.
pub struct Evaluations {
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Next [`Entry::seq`].
    next_seq: std::sync::atomic::AtomicU64,
    /// Most one-off evaluations kept.
    max_one_off: usize,
    store: Store,
    metrics: Metrics,
    runner: tokio::sync::Mutex<()>,
    threads: OnceLock<Option<Arc<rayon::ThreadPool>>>,
    thread_count: usize,
}

/// Seconds since the Unix epoch.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Evaluations {
    /// The configured evaluations with their results on disk restored (and
    /// their metrics set from them). A result file that cannot be read is
    /// logged and ignored.
    pub fn new(config: &Config, metrics: Metrics) -> Self {
        let store = Store::new(&store::data_dir(config.server.data_dir.as_deref()));
        let mut entries = BTreeMap::new();
        for e in &config.evaluations {
            let def = Evaluation::from_config(config, e);
            let name = def.name.clone();
            // Series that exist from the start, at zero (their HELP/TYPE too).
            for outcome in [Outcome::Success, Outcome::Error] {
                metrics
                    .eval_runs
                    .with_label_values(&[&name, outcome.as_str()]);
            }
            metrics.eval_duration.with_label_values(&[&name]);
            metrics.eval_degraded.with_label_values(&[&name]).set(0);
            let mut entry = Entry::new(def, true, 0);
            match store.load(&name) {
                Ok(Some(saved)) => {
                    entry.last = saved.last;
                    if let Some(ok) = saved.last_success {
                        entry.below = entry.def.below(&ok.tasks);
                        set_scores(&metrics, &name, &ok, None, !entry.below.is_empty());
                        entry.last_success = Some(ok);
                    }
                    tracing::info!(evaluation = %name, "evaluation results restored");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(evaluation = %name, error = %e, "ignoring saved results"),
            }
            entries.insert(name, entry);
        }
        Evaluations {
            entries: Mutex::new(entries),
            next_seq: std::sync::atomic::AtomicU64::new(1),
            max_one_off: config.server.limits.max_evaluations,
            store,
            metrics,
            runner: tokio::sync::Mutex::new(()),
            threads: OnceLock::new(),
            thread_count: config.server.limits.max_concurrent_generations.clamp(1, 8),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The results folder.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The names of every evaluation (scheduled and requested), sorted.
    pub fn names(&self) -> Vec<String> {
        self.entries().keys().cloned().collect()
    }

    /// The evaluations `names` (those still known).
    pub fn infos(&self, names: &[String]) -> Vec<EvaluationInfo> {
        let entries = self.entries();
        names
            .iter()
            .filter_map(|n| entries.get(n).map(Entry::info))
            .collect()
    }

    /// One evaluation.
    pub fn info(&self, name: &str) -> Option<EvaluationInfo> {
        self.entries().get(name).map(Entry::info)
    }

    /// The evaluations whose last successful run is under `min_score`.
    pub fn degraded(&self) -> Vec<Degraded> {
        self.entries()
            .values()
            .filter(|e| !e.below.is_empty())
            .map(|e| Degraded {
                name: e.def.name.clone(),
                merge: e.def.merge.clone(),
                tasks: e.below.clone(),
                min_score: e.def.min_score,
                fail_readiness: e.def.fail_readiness,
            })
            .collect()
    }

    /// Names of the scheduled evaluations.
    pub fn scheduled(&self) -> Vec<String> {
        self.entries()
            .values()
            .filter(|e| e.scheduled)
            .map(|e| e.def.name.clone())
            .collect()
    }

    /// Adds (or replaces) an evaluation requested through the API; 409 when
    /// a scheduled one has its name. A new one past
    /// `server.limits.max_evaluations` forgets the oldest idle one-off
    /// (entry, metric series, result file); 409 when all are busy.
    pub fn define(&self, def: Evaluation) -> Result<()> {
        let mut entries = self.entries();
        if !entries.contains_key(&def.name) {
            while entries.values().filter(|e| !e.scheduled).count() >= self.max_one_off {
                let oldest = entries
                    .iter()
                    .filter(|(_, e)| !e.scheduled && !e.running)
                    .min_by_key(|(_, e)| e.seq)
                    .map(|(k, _)| k.clone());
                let Some(name) = oldest else {
                    return Err(GatewayError::Conflict(format!(
                        "{} one-off evaluations are running or waiting \
                         (server.limits.max_evaluations); retry once one is over",
                        self.max_one_off
                    )));
                };
                if let Some(gone) = entries.remove(&name) {
                    self.forget(&name, &gone);
                }
            }
        }
        let seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match entries.get_mut(&def.name) {
            Some(e) if e.scheduled => Err(GatewayError::Conflict(format!(
                "`{}` is a scheduled evaluation; run it with {{\"name\": \"{}\"}} or pick another `name`",
                def.name, def.name
            ))),
            Some(e) if e.running => Err(GatewayError::Conflict(format!(
                "evaluation `{}` is running",
                def.name
            ))),
            Some(e) => {
                e.def = def;
                Ok(())
            }
            None => {
                entries.insert(def.name.clone(), Entry::new(def, false, seq));
                Ok(())
            }
        }
    }

    /// Drops the metric series and the result file of a forgotten one-off
    /// evaluation.
    fn forget(&self, name: &str, entry: &Entry) {
        let m = &self.metrics;
        for outcome in [Outcome::Success, Outcome::Error] {
            let _ = m.eval_runs.remove_label_values(&[name, outcome.as_str()]);
        }
        let _ = m.eval_duration.remove_label_values(&[name]);
        let _ = m.eval_degraded.remove_label_values(&[name]);
        let _ = m.eval_last_success.remove_label_values(&[name]);
        if let Some(run) = &entry.last_success {
            for t in &run.tasks {
                for metric in t.metrics.keys() {
                    let _ = m.eval_score.remove_label_values(&[name, &t.task, metric]);
                }
            }
        }
        if let Err(e) = self.store.remove(name) {
            tracing::warn!(evaluation = %name, error = %e, "cannot remove the result file");
        }
        tracing::info!(evaluation = %name, "one-off evaluation forgotten");
    }

    /// Marks `name` as running: 404 when unknown, 409 when it runs already.
    pub fn begin(&self, name: &str) -> Result<()> {
        let mut entries = self.entries();
        let e = entries
            .get_mut(name)
            .ok_or_else(|| GatewayError::NotFound {
                message: format!("unknown evaluation `{name}`"),
                param: Some("name".to_string()),
            })?;
        if e.running {
            return Err(GatewayError::Conflict(format!(
                "evaluation `{name}` is running already"
            )));
        }
        e.running = true;
        Ok(())
    }

    fn definition(&self, name: &str) -> Option<Evaluation> {
        self.entries().get(name).map(|e| e.def.clone())
    }

    fn set_next_run(&self, name: &str, at: Option<f64>) {
        if let Some(e) = self.entries().get_mut(name) {
            e.next_run = at;
        }
    }

    /// Unix time of the last run of `name` (from disk after a restart).
    fn last_finished(&self, name: &str) -> Option<f64> {
        self.entries()
            .get(name)
            .and_then(|e| e.last.as_ref().map(|r| r.finished))
    }

    /// Marks `name` idle (its run is recorded and saved).
    fn done(&self, name: &str) {
        if let Some(e) = self.entries().get_mut(name) {
            e.running = false;
        }
    }

    /// Records a finished run: the entry, the metrics; returns what to save
    /// (the entry stays running until [`Evaluations::done`]).
    fn finish(&self, name: &str, mut record: RunRecord) -> Option<Saved> {
        let mut entries = self.entries();
        let e = entries.get_mut(name)?;
        let m = &self.metrics;
        m.eval_runs
            .with_label_values(&[name, record.outcome.as_str()])
            .inc();
        m.eval_duration
            .with_label_values(&[name])
            .observe(record.duration_seconds);
        if record.outcome == Outcome::Success {
            record.below_min_score = e.def.below(&record.tasks);
            record.degraded = !record.below_min_score.is_empty();
            e.below = record.below_min_score.clone();
            set_scores(m, name, &record, e.last_success.as_ref(), record.degraded);
            e.last_success = Some(record.clone());
        }
        e.last = Some(record);
        Some(Saved::new(
            name,
            &e.def.merge,
            e.last.clone(),
            e.last_success.clone(),
        ))
    }

    /// The evaluation thread pool (scorer batches run in parallel on it, not
    /// on the global pool that merges use).
    fn threads(&self) -> Option<Arc<rayon::ThreadPool>> {
        self.threads
            .get_or_init(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(self.thread_count)
                    .thread_name(|i| format!("fusion-eval-{i}"))
                    .build()
                    .map(Arc::new)
                    .map_err(|e| tracing::warn!(error = %e, "no evaluation threads; using the global pool"))
                    .ok()
            })
            .clone()
    }
}

/// Sets the score, last-success and degraded metrics of `name` from a
/// successful run, removing the series of the previous one first (tasks may
/// have changed).
fn set_scores(
    m: &Metrics,
    name: &str,
    run: &RunRecord,
    previous: Option<&RunRecord>,
    degraded: bool,
) {
    if let Some(prev) = previous {
        for t in &prev.tasks {
            for metric in t.metrics.keys() {
                let _ = m.eval_score.remove_label_values(&[name, &t.task, metric]);
            }
        }
    }
    for t in &run.tasks {
        for (metric, value) in &t.metrics {
            m.eval_score
                .with_label_values(&[name, &t.task, metric])
                .set(*value);
        }
    }
    m.eval_last_success
        .with_label_values(&[name])
        .set(run.finished as i64);
    m.eval_degraded
        .with_label_values(&[name])
        .set(i64::from(degraded));
}

/// Starts the schedule of every configured evaluation (on the current
/// async runtime; the tasks end with it).
pub fn start(state: web::Data<AppState>) {
    for name in state.evaluations.scheduled() {
        tokio::spawn(schedule(state.clone(), name));
    }
}

/// The schedule of one evaluation: the first run after `delay` (or `every`
/// after the last run on disk, when later), then every `every`. A tick
/// that finds the evaluation running (started by a request) is skipped.
async fn schedule(state: web::Data<AppState>, name: String) {
    let Some(def) = state.evaluations.definition(&name) else {
        return;
    };
    let Some(every) = def.every else {
        return;
    };
    let now = unix_now();
    let mut next = now + def.delay.as_secs_f64();
    if let Some(last) = state.evaluations.last_finished(&name) {
        next = next.max(last + every.as_secs_f64());
    }
    loop {
        state.evaluations.set_next_run(&name, Some(next));
        let wait = (next - unix_now()).max(0.0);
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        if !state.is_ready() {
            return;
        }
        if state.evaluations.begin(&name).is_ok() {
            let id = uuid::Uuid::new_v4().simple().to_string();
            run_begun(state.clone(), name.clone(), Trigger::Schedule, id).await;
        }
        next = unix_now() + every.as_secs_f64();
    }
}

/// Runs evaluation `name`, already marked running by
/// [`Evaluations::begin`]: waits for the runner, scores, records the
/// result (entry, metrics, file) and returns it.
pub async fn run_begun(
    state: web::Data<AppState>,
    name: String,
    trigger: Trigger,
    id: String,
) -> Option<RunRecord> {
    let evals = &state.evaluations;
    let _turn = evals.runner.lock().await;
    let def = evals.definition(&name)?;
    let started = unix_now();
    let clock = Instant::now();
    tracing::info!(evaluation = %name, merge = %def.merge, run = %id, "evaluation started");
    let (model, result) = match score(&state, &def).await {
        Ok((model, tasks)) => (Some(model), Ok(tasks)),
        Err((model, e)) => (model, Err(e)),
    };
    let duration = clock.elapsed().as_secs_f64();
    let (outcome, tasks, error) = match result {
        Ok(tasks) => (Outcome::Success, tasks, None),
        Err(e) => (Outcome::Error, Vec::new(), Some(e)),
    };
    let average = evaluator::report::average(&tasks);
    let record = RunRecord {
        id,
        trigger,
        outcome,
        model,
        started,
        finished: started + duration,
        duration_seconds: duration,
        tasks: tasks.into_iter().map(TaskScore::from).collect(),
        average,
        degraded: false,
        below_min_score: Vec::new(),
        error,
    };
    match &record.error {
        None => {
            tracing::info!(evaluation = %name, seconds = duration, average = ?record.average, "evaluation finished")
        }
        Some(e) => {
            tracing::warn!(evaluation = %name, seconds = duration, error = %e, "evaluation failed")
        }
    }
    let Some(saved) = evals.finish(&name, record) else {
        evals.done(&name);
        return None;
    };
    let store = evals.store.clone();
    let write = tokio::task::spawn_blocking(move || store.save(&saved)).await;
    match write {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(evaluation = %name, error = %e, "cannot save the result"),
        Err(e) => tracing::warn!(evaluation = %name, error = %e, "cannot save the result"),
    }
    evals.done(&name);
    evals.info(&name).and_then(|i| i.last)
}

/// A failed run: the model when it was resolved, and the error text.
type Failure = (Option<String>, String);

/// Reads the tasks, resolves the model and scores it.
async fn score(
    state: &web::Data<AppState>,
    def: &Evaluation,
) -> std::result::Result<(String, Vec<TaskResult>), Failure> {
    let dir = def.taskpool_dir.clone();
    let only = def.tasks.clone();
    let limit = def.limit;
    let tasks = tokio::task::spawn_blocking(move || read_tasks(&dir, &only, limit))
        .await
        .map_err(|e| (None, format!("reading the tasks failed: {e}")))?
        .map_err(|e| (None, e))?;
    let served = resident(state, &def.merge)
        .await
        .map_err(|e| (None, e.to_string()))?;
    let model = served.name.clone();
    let st = state.clone();
    let threads = state.evaluations.threads();
    let opts = RunOptions {
        limit: def.limit,
        ..RunOptions::default()
    };
    let scored = tokio::task::spawn_blocking(move || {
        let stopping = || !st.is_ready();
        let scorer = AdmittedScorer::new(served.engine.text_model(), &st.admission, &stopping);
        let run = || run_tasks(&scorer, &tasks, &opts, &|_| {});
        match threads {
            Some(pool) => pool.install(run),
            None => run(),
        }
    })
    .await;
    match scored {
        Ok(Ok(results)) => Ok((model, results)),
        Ok(Err(e)) => Err((Some(model), e.to_string())),
        Err(e) => Err((Some(model), format!("the scoring task failed: {e}"))),
    }
}

/// Opens a task pool and reads its tasks (only `only` when not empty).
fn read_tasks(
    dir: &std::path::Path,
    only: &[String],
    limit: Option<usize>,
) -> std::result::Result<Vec<Task>, String> {
    let mut pool = TaskPool::open(dir).map_err(|e| e.to_string())?;
    if !only.is_empty() {
        if let Some(missing) = only.iter().find(|t| pool.task(t).is_none()) {
            return Err(format!(
                "task pool `{}` has no task `{missing}` ({})",
                dir.display(),
                pool.tasks
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        pool.tasks.retain(|t| only.contains(&t.name));
    }
    load_tasks(&pool, limit).map_err(|e| e.to_string())
}

/// The resident model of `merge`, from the same cache as requests (no
/// `merge.max_wait`: an evaluation waits for its merge).
async fn resident(state: &AppState, merge: &str) -> Result<Arc<Served>> {
    let target = serving::target(state, Some(merge), None)?;
    let key = target.cache_key();
    if let Some(served) = serving::resident(state, &key).await {
        state.merges.note(&target, true)?;
        return Ok(served);
    }
    let (served, _) = serving::start_load(state, target)?
        .await
        .map_err(|e| GatewayError::Internal(format!("loading `{merge}` failed: {e}")))??;
    Ok(served)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(min_score: Option<f64>) -> Evaluation {
        Evaluation {
            name: "e".into(),
            merge: "base".into(),
            taskpool: "t".into(),
            taskpool_dir: PathBuf::from("/t"),
            tasks: Vec::new(),
            every: Some(Duration::from_secs(60)),
            delay: Duration::ZERO,
            limit: None,
            min_score,
            fail_readiness: false,
        }
    }

    fn task(name: &str, metric: &str, score: f64) -> TaskScore {
        TaskScore {
            task: name.into(),
            kind: "multiple_choice".into(),
            metric: metric.into(),
            score,
            metrics: BTreeMap::from([(metric.to_string(), score)]),
            samples: 1,
            total: 1,
            seconds: 0.0,
        }
    }

    #[test]
    fn below_compares_fractions_only() {
        let tasks = [
            task("a", "acc", 0.4),
            task("b", "exact_match", 0.5),
            task("c", "acc", 0.7),
            task("p", "perplexity", 0.1),
        ];
        assert_eq!(def(Some(0.5)).below(&tasks), vec!["a".to_string()]);
        assert_eq!(def(Some(0.6)).below(&tasks), vec!["a", "b"]);
        assert!(def(None).below(&tasks).is_empty());
        assert!(def(Some(0.0)).below(&tasks).is_empty());
    }

    #[test]
    fn scores_replace_the_previous_series() {
        let m = Metrics::new();
        let run = |tasks: Vec<TaskScore>, finished: f64| RunRecord {
            id: "r".into(),
            trigger: Trigger::Schedule,
            outcome: Outcome::Success,
            model: None,
            started: 0.0,
            finished,
            duration_seconds: 1.0,
            tasks,
            average: None,
            degraded: false,
            below_min_score: Vec::new(),
            error: None,
        };
        let first = run(vec![task("old", "acc", 0.25)], 100.0);
        set_scores(&m, "e", &first, None, true);
        let second = run(vec![task("new", "acc", 0.75)], 200.0);
        set_scores(&m, "e", &second, Some(&first), false);
        let text = m.render();
        assert!(!text.contains("task=\"old\""), "{text}");
        assert!(
            text.contains("fusion_eval_score{merge=\"e\",metric=\"acc\",task=\"new\"} 0.75"),
            "{text}"
        );
        assert!(text.contains("fusion_eval_last_success_timestamp_seconds{merge=\"e\"} 200"));
        assert!(text.contains("fusion_eval_degraded{merge=\"e\"} 0"));
    }
}
