//! Scoring the rows of a comparison, one model at a time (each merge is
//! made in memory, scored, and dropped before the next row loads).

use candle_core::Device;

use crate::compare::config::CompareConfig;
use crate::error::{EvalError, Result};
use crate::evaluate::{progress_bar, total_requests};
use crate::report::{Column, CompareTable, Row};
use crate::runner::{load_tasks, run_tasks};
use crate::source::{load, ModelSource};
use crate::taskpool::TaskPool;
use crate::views::{score_views, task_views};

/// Where and how to run a comparison.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Device for merging and scoring.
    pub device: Device,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
}

/// Scores every row of `cfg` on its task pool. Task files are read and
/// validated once, before the first model loads.
pub fn run_compare(cfg: &CompareConfig, opts: &CompareOptions) -> Result<CompareTable> {
    let taskpool = TaskPool::open(&cfg.taskpool)?;
    let tasks = load_tasks(&taskpool, cfg.run.limit)?;
    let per_row = total_requests(&tasks);
    let bar = progress_bar(per_row * cfg.rows.len() as u64, opts.progress);
    bar.set_prefix("compare");
    let mut rows = Vec::with_capacity(cfg.rows.len());
    for row in &cfg.rows {
        bar.set_message(row.name.clone());
        let wrap = |e: EvalError| EvalError::Row {
            row: row.name.clone(),
            source: Box::new(e),
        };
        let spec = match &row.source {
            ModelSource::Merge(_) => Some(row.source.describe()),
            _ => None,
        };
        if let Some(views) = task_views(&row.source, &tasks).map_err(wrap)? {
            // A per-task retrieval merge: each task scored with its view.
            let (results, seconds, memory) =
                score_views(&views, &tasks, &cfg.pool, &cfg.run, &opts.device, &|n| {
                    bar.inc(n)
                })
                .map_err(wrap)?;
            let mut r = Row::new(row.name.clone(), spec, results, seconds);
            r.memory = memory;
            rows.push(r);
            continue;
        }
        let loaded = load(&row.source, Some(&cfg.pool), &opts.device).map_err(wrap)?;
        let results = run_tasks(&loaded.model, &tasks, &cfg.run, &|n| bar.inc(n)).map_err(wrap)?;
        rows.push(Row::new(row.name.clone(), spec, results, loaded.seconds));
    }
    bar.finish_and_clear();
    Ok(CompareTable {
        taskpool: taskpool.name.clone(),
        columns: tasks
            .iter()
            .map(|t| Column {
                task: t.spec.name.clone(),
                kind: t.spec.kind,
                metric: t.spec.metric.clone(),
            })
            .collect(),
        rows,
    })
}
