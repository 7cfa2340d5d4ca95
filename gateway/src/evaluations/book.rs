//! The book of evaluations: the configured ones (restored with their
//! results from disk at start) and the one-offs `POST /v1/evaluations`
//! defines, whether each is running, their last runs, and the
//! `fusion_eval_*` metrics of those. What runs them is the
//! [`scheduler`](super::scheduler).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use utoipa::ToSchema;

use super::record::{Outcome, RunRecord, TaskScore};
use super::store::{self, Saved, Store};
use crate::config::{Config, EvaluationConfig};
use crate::error::{GatewayError, Result};
use crate::metrics::Metrics;

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
    pub(super) fn below(&self, results: &[TaskScore]) -> Vec<String> {
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

/// The book of evaluations: their definitions, whether each runs, their
/// last results and the metrics of those.
pub struct Evaluations {
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Next [`Entry::seq`].
    next_seq: std::sync::atomic::AtomicU64,
    /// Most one-off evaluations kept.
    max_one_off: usize,
    store: Store,
    metrics: Metrics,
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

    pub(super) fn definition(&self, name: &str) -> Option<Evaluation> {
        self.entries().get(name).map(|e| e.def.clone())
    }

    pub(super) fn set_next_run(&self, name: &str, at: Option<f64>) {
        if let Some(e) = self.entries().get_mut(name) {
            e.next_run = at;
        }
    }

    /// Unix time of the last run of `name` (from disk after a restart).
    pub(super) fn last_finished(&self, name: &str) -> Option<f64> {
        self.entries()
            .get(name)
            .and_then(|e| e.last.as_ref().map(|r| r.finished))
    }

    /// Marks `name` idle (its run is recorded and saved).
    pub(super) fn done(&self, name: &str) {
        if let Some(e) = self.entries().get_mut(name) {
            e.running = false;
        }
    }

    /// Records a finished run: the entry, the metrics; returns what to save
    /// (the entry stays running until [`Evaluations::done`]).
    pub(super) fn finish(&self, name: &str, mut record: RunRecord) -> Option<Saved> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluations::record::Trigger;

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
