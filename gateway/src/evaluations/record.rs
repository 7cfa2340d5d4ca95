//! What a run of an evaluation produces: how it ended, what started it,
//! and the scores of its tasks, as the API shows them and the result files
//! keep them.

use std::collections::BTreeMap;

use evaluator::runner::TaskResult;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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
