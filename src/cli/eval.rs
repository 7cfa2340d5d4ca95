//! `fusion eval`: one model (a merge spec, a pool checkpoint or a folder)
//! scored on a task pool; per-task scores and their average.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{ArgGroup, Args};
use evaluator::evaluate::evaluate;
use evaluator::pool::ModelPool;
use evaluator::report::Format;
use evaluator::runner::RunOptions;
use evaluator::source::{load, validate, ModelSource};
use evaluator::taskpool::TaskPool;

/// Arguments of `fusion eval`.
#[derive(Args)]
#[command(group(ArgGroup::new("what").required(true).args(["merge", "model"])))]
pub struct EvalArgs {
    /// What to evaluate: a compact merge spec over the pool's checkpoints
    /// (`task_arithmetic(addition,reverse;scaling_coefficient=0.3)`), a
    /// checkpoint name of the pool (`base`, an expert), or a merge config
    /// YAML file (mergekit or structured). Needs --pool.
    #[arg(long, requires = "pool")]
    merge: Option<String>,
    /// pool.yaml: resolves checkpoint names and gives the default task pool.
    #[arg(long)]
    pool: Option<PathBuf>,
    /// A checkpoint folder to evaluate (config.json, safetensors, tokenizer).
    #[arg(long, conflicts_with = "merge")]
    model: Option<PathBuf>,
    /// Task pool folder (default: the pool's `taskpool`).
    #[arg(long)]
    taskpool: Option<PathBuf>,
    /// Score only the first N items of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Log-likelihood requests per forward batch.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Output format: table (markdown), csv or json.
    #[arg(long, default_value = "table")]
    format: Format,
    /// Where to merge and run: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Never show a progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Reads `--merge`: a config file when it names one, else a compact spec
/// or checkpoint name.
fn merge_source(text: &str, pool: &ModelPool) -> anyhow::Result<ModelSource> {
    let path = Path::new(text);
    if path.is_file() {
        let spec = super::merge::load_config(path)?;
        return Ok(ModelSource::Merge(Box::new(validate(pool, spec)?)));
    }
    Ok(ModelSource::parse(text, pool)?)
}

/// Runs `fusion eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let pool = args.pool.as_deref().map(ModelPool::load).transpose()?;
    let source = match (&args.merge, &args.model) {
        (Some(m), None) => merge_source(m, pool.as_ref().expect("clap requires --pool"))?,
        (None, Some(dir)) => ModelSource::Folder(dir.clone()),
        _ => bail!("give --merge SPEC --pool POOL.yaml or --model DIR"),
    };
    let taskpool_dir = match (
        &args.taskpool,
        pool.as_ref().and_then(|p| p.taskpool.clone()),
    ) {
        (Some(t), _) => t.clone(),
        (None, Some(t)) => t,
        (None, None) => bail!("give --taskpool DIR (the pool names none)"),
    };
    let taskpool = TaskPool::open(&taskpool_dir)?;
    let device = runtime::device::parse_device(&args.device)?;
    let start = Instant::now();
    let opts = RunOptions {
        limit: args.limit,
        batch_size: args.batch_size as usize,
        ..RunOptions::default()
    };
    let tasks = evaluator::runner::load_tasks(&taskpool, opts.limit)?;
    if let (Some(views), Some(pool)) = (evaluator::views::task_views(&source, &tasks)?, &pool) {
        // A per-task retrieval merge: each task scored with its own view.
        let (results, seconds, memory) =
            evaluator::views::score_views(&views, &tasks, pool, &opts, &device, &|_| {})?;
        let report =
            evaluator::report::EvalReport::new(source.describe(), taskpool.name.clone(), results);
        print!("{}", report.render(args.format));
        if let Some(m) = memory {
            eprintln!(
                "each task scored with its own view; resident: one unified vector of {} and {} \
                 per task (dense: {} per task)",
                evaluator::report::human_bytes(m.unified_bytes),
                evaluator::report::human_bytes(m.view_bytes),
                evaluator::report::human_bytes(m.dense_bytes)
            );
        }
        eprintln!(
            "scored {} tasks of `{}` in {:.2}s (views merged in {seconds:.2}s) on {}",
            report.tasks.len(),
            taskpool.name,
            start.elapsed().as_secs_f64(),
            runtime::device::device_name(&device)
        );
        return Ok(());
    }
    let loaded = load(&source, pool.as_ref(), &device)
        .with_context(|| format!("loading `{}`", source.describe()))?;
    let report = evaluate(
        &loaded.model,
        &source.describe(),
        &taskpool,
        &opts,
        !args.quiet,
    )?;
    print!("{}", report.render(args.format));
    eprintln!(
        "scored {} tasks of `{}` in {:.2}s (model ready in {:.2}s) on {}",
        report.tasks.len(),
        taskpool.name,
        start.elapsed().as_secs_f64(),
        loaded.seconds,
        runtime::device::device_name(&device)
    );
    Ok(())
}
