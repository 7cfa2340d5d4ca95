//! Running a search: the optimiser proposes a generation of points of the
//! unit box, each becomes a spec ([`SearchConfig::spec_at`]), the specs are
//! merged in memory and scored on the task pool by up to `jobs` threads at
//! once (the loading and scoring of `fusion compare`: [`crate::source::load`]
//! and [`crate::runner::run_tasks`]), and the scores go back to the
//! optimiser. The trace is in evaluation order, so it does not depend on
//! how many jobs ran.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use merger::spec::{compact, MergeSpec};

use crate::error::{EvalError, Result};
use crate::report;
use crate::runner::{load_tasks, run_tasks, TaskResult};
use crate::search::cmaes::{Cmaes, CmaesOptions, Optimizer, RandomSearch};
use crate::search::config::{Algorithm, Objective, SearchConfig};
use crate::source::{load, ModelSource};
use crate::taskpool::{Task, TaskPool};

/// Where and how to run a search.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// Device for merging and scoring.
    pub device: Device,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
}

/// One scored candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// 1-based, in the order the optimiser proposed the candidates.
    pub index: usize,
    /// 1-based generation.
    pub generation: usize,
    /// The dimensions' values, in the config's order.
    pub values: Vec<f64>,
    /// The objective's score.
    pub score: f64,
    /// The best score of evaluations 1..=index.
    pub best: f64,
    /// Seconds to merge and score it.
    pub seconds: f64,
}

/// What a search found.
#[derive(Debug, Clone)]
pub struct SearchOutcome {
    /// Every evaluation, in order.
    pub evaluations: Vec<Evaluation>,
    /// The position in `evaluations` of the best (the first of equals).
    pub best: usize,
    /// The best candidate's spec (completed against the pool).
    pub best_spec: MergeSpec,
    /// The best candidate's per-task results.
    pub best_results: Vec<TaskResult>,
    /// Wall time of the whole search.
    pub seconds: f64,
}

impl SearchOutcome {
    /// The best evaluation.
    pub fn best_evaluation(&self) -> &Evaluation {
        &self.evaluations[self.best]
    }
}

/// The objective's score of one candidate's results.
pub fn objective_score(objective: &Objective, results: &[TaskResult]) -> Result<f64> {
    match objective {
        Objective::Average => report::average(results).ok_or_else(|| EvalError::Scoring {
            task: "(average)".into(),
            reason: "`objective: average`: no task of the pool has a fraction-valued metric \
                     (accuracy, exact match, correlation); name a task's metric instead"
                .into(),
        }),
        Objective::Task { task, metric } => results
            .iter()
            .find(|r| r.task == *task)
            .and_then(|r| r.metrics.get(metric).copied())
            .ok_or_else(|| EvalError::Scoring {
                task: task.clone(),
                reason: format!("the results have no `{metric}`"),
            }),
    }
}

/// A progress bar over `budget` evaluations, drawn only when `show` and
/// stderr is a terminal.
fn progress_bar(budget: u64, show: bool) -> ProgressBar {
    let target = if show && std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(budget), target);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} evaluations, best {msg} ({elapsed}, eta {eta})",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_prefix("search");
    bar.set_message("-");
    bar
}

/// A candidate's per-task results and the seconds they took, or why it failed.
type Scored = Result<(Vec<TaskResult>, f64)>;

/// What every candidate's scoring shares.
struct Scoring<'a> {
    cfg: &'a SearchConfig,
    tasks: &'a [Task],
    device: &'a Device,
}

impl Scoring<'_> {
    fn one(&self, spec: &MergeSpec) -> Scored {
        let start = Instant::now();
        let wrap = |e: EvalError| EvalError::Row {
            row: compact::to_compact(spec),
            source: Box::new(e),
        };
        let source = ModelSource::Merge(Box::new(spec.clone()));
        let loaded = load(&source, Some(&self.cfg.pool), self.device).map_err(wrap)?;
        let results = run_tasks(&loaded.model, self.tasks, &self.cfg.run, &|_| {}).map_err(wrap)?;
        Ok((results, start.elapsed().as_secs_f64()))
    }

    /// Scores `specs` with up to `jobs` threads; results in order.
    fn all(&self, specs: &[MergeSpec], done: &(dyn Fn(&Scored) + Sync)) -> Vec<Scored> {
        let slots: Vec<Mutex<Option<Scored>>> = specs.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let workers = self.cfg.jobs.min(specs.len()).max(1);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= specs.len() {
                        break;
                    }
                    let r = self.one(&specs[i]);
                    done(&r);
                    *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                });
            }
        });
        slots
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .expect("every slot filled")
            })
            .collect()
    }
}

/// Whether `a` is a better score than `b`.
fn better(a: f64, b: f64, maximise: bool) -> bool {
    if maximise {
        a > b
    } else {
        a < b
    }
}

/// Runs the search of `cfg`: at most `cfg.budget` evaluations, in
/// generations of `cfg.population`. Task files are read once, before the
/// first merge. A candidate that fails to merge or score ends the search
/// with its error (its spec is named).
pub fn run_search(cfg: &SearchConfig, opts: &SearchOptions) -> Result<SearchOutcome> {
    run_search_observed(cfg, opts, &|_| {}, &AtomicBool::new(false))
}

/// [`run_search`] that calls `observe` with every evaluation as it is
/// recorded (in order), and stops with [`EvalError::Cancelled`] before the
/// next generation once `cancel` is set (a server's search job).
pub fn run_search_observed(
    cfg: &SearchConfig,
    opts: &SearchOptions,
    observe: &(dyn Fn(&Evaluation) + Sync),
    cancel: &AtomicBool,
) -> Result<SearchOutcome> {
    let start = Instant::now();
    let taskpool = TaskPool::open(&cfg.taskpool)?;
    let tasks = load_tasks(&taskpool, cfg.run.limit)?;
    let n = cfg.dimensions.len();
    let mut optimizer: Box<dyn Optimizer> = match cfg.algorithm {
        Algorithm::Cmaes => Box::new(Cmaes::new(&CmaesOptions {
            mean: vec![0.5; n],
            sigma: cfg.sigma,
            population: cfg.population,
            seed: cfg.seed,
        })),
        Algorithm::Random => Box::new(RandomSearch::new(n, cfg.population, cfg.seed)),
    };
    let maximise = cfg.objective.maximise();
    let scoring = Scoring {
        cfg,
        tasks: &tasks,
        device: &opts.device,
    };
    let bar = progress_bar(cfg.budget as u64, opts.progress);
    let shown_best: Mutex<Option<f64>> = Mutex::new(None);
    let done = |r: &Scored| {
        if let Ok((results, _)) = r {
            if let Ok(score) = objective_score(&cfg.objective, results) {
                let mut best = shown_best.lock().unwrap_or_else(|p| p.into_inner());
                if best.is_none_or(|b| better(score, b, maximise)) {
                    *best = Some(score);
                    bar.set_message(show_score(&cfg.objective, score));
                }
            }
        }
        bar.inc(1);
    };

    let mut evaluations: Vec<Evaluation> = Vec::with_capacity(cfg.budget);
    let mut best: Option<(usize, MergeSpec, Vec<TaskResult>)> = None;
    let mut generation = 0;
    while evaluations.len() < cfg.budget {
        if cancel.load(Ordering::SeqCst) {
            return Err(EvalError::Cancelled(format!(
                "the search stopped after {} of {} evaluations",
                evaluations.len(),
                cfg.budget
            )));
        }
        generation += 1;
        let points = optimizer.ask();
        let take = (cfg.budget - evaluations.len()).min(points.len());
        let values: Vec<Vec<f64>> = points[..take]
            .iter()
            .map(|u| {
                cfg.dimensions
                    .iter()
                    .zip(u)
                    .map(|(d, x)| d.value(*x))
                    .collect()
            })
            .collect();
        let specs = values
            .iter()
            .map(|v| cfg.spec_at(v))
            .collect::<Result<Vec<_>>>()?;
        let scored = scoring.all(&specs, &done);
        let mut fitness = Vec::with_capacity(take);
        for ((spec, v), r) in specs.into_iter().zip(values).zip(scored) {
            let (results, seconds) = r?;
            let score = objective_score(&cfg.objective, &results)?;
            let index = evaluations.len();
            let is_best = best
                .as_ref()
                .is_none_or(|(b, _, _)| better(score, evaluations[*b].score, maximise));
            let best_score = match &best {
                Some((b, _, _)) if !is_best => evaluations[*b].score,
                _ => score,
            };
            if is_best {
                best = Some((index, spec, results));
            }
            evaluations.push(Evaluation {
                index: index + 1,
                generation,
                values: v,
                score,
                best: best_score,
                seconds,
            });
            observe(evaluations.last().expect("just pushed"));
            fitness.push(if maximise { -score } else { score });
        }
        if take == points.len() {
            // Tell the points as evaluated (rounded), back in the unit box.
            let told: Vec<Vec<f64>> = evaluations[evaluations.len() - take..]
                .iter()
                .zip(&points)
                .map(|(e, u)| {
                    cfg.dimensions
                        .iter()
                        .zip(&e.values)
                        .zip(u)
                        .map(|((d, x), u)| {
                            if d.high > d.low {
                                (x - d.low) / (d.high - d.low)
                            } else {
                                *u
                            }
                        })
                        .collect()
                })
                .collect();
            optimizer.tell(&told, &fitness);
        }
    }
    bar.finish_and_clear();
    let (best, best_spec, best_results) = best.expect("budget >= 1");
    Ok(SearchOutcome {
        evaluations,
        best,
        best_spec,
        best_results,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// A score as tables show it: percent for fractions, two decimals else.
pub fn show_score(objective: &Objective, score: f64) -> String {
    match objective {
        Objective::Average => format!("{:.1}", 100.0 * score),
        Objective::Task { metric, .. } => report::display_value(metric, score),
    }
}
