//! Scheduled evaluations: the configured `evaluations` run in the
//! background, their scores become `fusion_eval_*` metrics, their results
//! are kept on disk ([`store`]) and served at `/v1/evaluations`.
//!
//! The concepts, each in its file: what a run produces ([`record`]), the
//! book of evaluations and their metrics ([`book`]), the runner and its
//! schedule ([`scheduler`]), the scorer behind the generation admission
//! ([`scorer`]) and the result files ([`store`]).
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

pub mod book;
pub mod record;
pub mod scheduler;
pub mod scorer;
pub mod store;

pub use book::{Degraded, Evaluation, EvaluationInfo, Evaluations, RunState};
pub use record::{Outcome, RunRecord, TaskScore, Trigger};
pub use scheduler::Scheduler;
