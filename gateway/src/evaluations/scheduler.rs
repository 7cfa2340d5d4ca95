//! The runner of evaluations: the schedule of the configured ones and the
//! runs `POST /v1/evaluations` asks for.
//!
//! Runs never overlap (a run waits for the one before it). A run reads its
//! tasks first, then gets its model from the [`ModelStore`] (the same cache
//! as requests, waiting for its merge however long it takes), then scores
//! it on the evaluation threads with the evaluator's runner, every scorer
//! call holding one generation slot ([`AdmittedScorer`]). The run and its
//! scores go to the [book](super::book) and its file.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use evaluator::runner::{load_tasks, run_tasks, RunOptions, TaskResult};
use evaluator::taskpool::{Task, TaskPool};

use super::book::{Evaluation, Evaluations};
use super::record::{Outcome, RunRecord, TaskScore, Trigger};
use super::scorer::AdmittedScorer;
use crate::batching::Batching;
use crate::clock::unix_seconds;
use crate::limits::admission::Admission;
use crate::store::{ModelStore, Wait};

/// Runs the evaluations of a [book](Evaluations), one at a time.
pub struct Scheduler {
    book: Arc<Evaluations>,
    models: ModelStore,
    admission: Admission,
    /// False once the server shuts down: no run starts, a running one stops.
    ready: Arc<AtomicBool>,
    /// Held by the run under way.
    runner: tokio::sync::Mutex<()>,
    /// Where scorer batches run (in parallel, apart from the global pool
    /// that merges use); made on the first run.
    threads: OnceLock<Option<Arc<rayon::ThreadPool>>>,
    thread_count: usize,
    /// The bounds and metrics of a model's batching scheduler, when an
    /// evaluation is the first to generate on it.
    batching: Batching,
}

impl Scheduler {
    /// Runs the evaluations of `book` on the models of `models`, scoring
    /// on `threads` threads and in slots of `admission`, while `ready`
    /// holds.
    pub fn new(
        book: Arc<Evaluations>,
        models: ModelStore,
        admission: Admission,
        ready: Arc<AtomicBool>,
        threads: usize,
        batching: Batching,
    ) -> Self {
        Scheduler {
            book,
            models,
            admission,
            ready,
            runner: tokio::sync::Mutex::new(()),
            threads: OnceLock::new(),
            thread_count: threads.max(1),
            batching,
        }
    }

    /// The book it runs.
    pub fn book(&self) -> &Evaluations {
        &self.book
    }

    fn stopping(&self) -> bool {
        !self.ready.load(Ordering::SeqCst)
    }

    /// Starts the schedule of every configured evaluation (on the current
    /// async runtime; the tasks end with it).
    pub fn start(self: &Arc<Self>) {
        for name in self.book.scheduled() {
            tokio::spawn(self.clone().schedule(name));
        }
    }

    /// The schedule of one evaluation: the first run after `delay` (or
    /// `every` after the last run on disk, when later), then every `every`.
    /// A tick that finds the evaluation running (started by a request) is
    /// skipped.
    async fn schedule(self: Arc<Self>, name: String) {
        let Some(def) = self.book.definition(&name) else {
            return;
        };
        let Some(every) = def.every else {
            return;
        };
        let now = unix_seconds();
        let mut next = now + def.delay.as_secs_f64();
        if let Some(last) = self.book.last_finished(&name) {
            next = next.max(last + every.as_secs_f64());
        }
        loop {
            self.book.set_next_run(&name, Some(next));
            let wait = (next - unix_seconds()).max(0.0);
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            if self.stopping() {
                return;
            }
            if self.book.begin(&name).is_ok() {
                let id = uuid::Uuid::new_v4().simple().to_string();
                self.clone()
                    .run_begun(name.clone(), Trigger::Schedule, id)
                    .await;
            }
            next = unix_seconds() + every.as_secs_f64();
        }
    }

    /// Runs evaluation `name`, already marked running by
    /// [`Evaluations::begin`]: waits for the run before it, scores, records
    /// the result (entry, metrics, file) and returns it.
    pub async fn run_begun(
        self: Arc<Self>,
        name: String,
        trigger: Trigger,
        id: String,
    ) -> Option<RunRecord> {
        let evals = &self.book;
        let _turn = self.runner.lock().await;
        let def = evals.definition(&name)?;
        let started = unix_seconds();
        let clock = Instant::now();
        tracing::info!(evaluation = %name, merge = %def.merge, run = %id, "evaluation started");
        let (model, result) = match self.score(&def).await {
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
        let store = evals.store().clone();
        let write = tokio::task::spawn_blocking(move || store.save(&saved)).await;
        match write {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(evaluation = %name, error = %e, "cannot save the result"),
            Err(e) => tracing::warn!(evaluation = %name, error = %e, "cannot save the result"),
        }
        evals.done(&name);
        evals.info(&name).and_then(|i| i.last)
    }

    /// Reads the tasks, gets the model and scores it.
    async fn score(
        self: &Arc<Self>,
        def: &Evaluation,
    ) -> std::result::Result<(String, Vec<TaskResult>), Failure> {
        let dir = def.taskpool_dir.clone();
        let only = def.tasks.clone();
        let limit = def.limit;
        let tasks = tokio::task::spawn_blocking(move || read_tasks(&dir, &only, limit))
            .await
            .map_err(|e| (None, format!("reading the tasks failed: {e}")))?
            .map_err(|e| (None, e))?;
        // The same cache as requests (a hit when traffic uses the merge; a
        // miss merges it and leaves it cached), and no `merge.max_wait`: an
        // evaluation waits for its merge.
        let models = &self.models;
        let served = async {
            let target = models.resolve(Some(&def.merge), None)?;
            models.acquire(target, Wait::Unbounded).await
        }
        .await
        .map_err(|e| (None, e.to_string()))?
        .served;
        let model = served.name.clone();
        let this = self.clone();
        let threads = self.threads();
        let opts = RunOptions {
            limit: def.limit,
            ..RunOptions::default()
        };
        let scored = tokio::task::spawn_blocking(move || {
            let stopping = || this.stopping();
            let batch = this.batching.scheduler_of(&served.engine);
            let scorer = AdmittedScorer::new(
                served.engine.runnable(),
                &this.admission,
                batch,
                served.engine.batch_delta(),
                &stopping,
            );
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

    /// The evaluation thread pool.
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

/// A failed run: the model when it was resolved, and the error text.
type Failure = (Option<String>, String);

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
