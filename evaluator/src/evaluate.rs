//! Evaluating one model on a task pool, with a progress bar.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::Result;
use crate::report::EvalReport;
use crate::runner::{load_tasks, run_tasks, RunOptions, Scorer};
use crate::taskpool::{Task, TaskPool};

/// A progress bar over `total` scorer requests on stderr, drawn only when
/// `show` and stderr is a terminal.
pub fn progress_bar(total: u64, show: bool) -> ProgressBar {
    let target = if show && std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} requests {msg} ({elapsed}, eta {eta})",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar
}

/// Total scorer requests of `tasks`.
pub fn total_requests(tasks: &[Task]) -> u64 {
    tasks.iter().map(|t| t.requests() as u64).sum()
}

/// Scores `scorer` on every task of `pool` and reports it under `label`.
pub fn evaluate(
    scorer: &dyn Scorer,
    label: &str,
    pool: &TaskPool,
    opts: &RunOptions,
    show_progress: bool,
) -> Result<EvalReport> {
    let tasks = load_tasks(pool, opts.limit)?;
    let bar = progress_bar(total_requests(&tasks), show_progress);
    bar.set_prefix("eval");
    let results = run_tasks(scorer, &tasks, opts, &|n| bar.inc(n));
    bar.finish_and_clear();
    Ok(EvalReport::new(label, pool.name.clone(), results?))
}
