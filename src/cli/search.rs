//! `fusion search`: CMA-ES or random search over a merge's parameters
//! against a task pool's score ([`evaluator::search`]); writes the trace,
//! the best spec (compact and mergekit YAML) and a plot into `--out`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use evaluator::search::config::Algorithm;
use evaluator::search::report::{plot_svg, trace_csv, Reference};
use evaluator::search::run::show_score;
use evaluator::search::{run_search, Overrides, SearchConfig, SearchOptions};
use merger::spec::compact;

/// Arguments of `fusion search`.
#[derive(Args)]
pub struct SearchArgs {
    /// The search config (pool, taskpool, merge, space, objective, budget).
    #[arg(long)]
    config: PathBuf,
    /// pool.yaml to use instead of the config's `pool` (relative to the
    /// working directory).
    #[arg(long)]
    pool: Option<PathBuf>,
    /// Folder for trace.csv, best.txt, best.yaml and best.svg (created).
    #[arg(long, default_value = "search-out")]
    out: PathBuf,
    /// Evaluations to spend, 1 to 1000 (overrides the config's `budget`).
    #[arg(long)]
    budget: Option<usize>,
    /// cmaes or random (overrides the config's `algorithm`).
    #[arg(long)]
    algorithm: Option<Algorithm>,
    /// The optimiser's seed (overrides the config's `seed`).
    #[arg(long)]
    seed: Option<u64>,
    /// Score only the first N items of each task (overrides the config's `limit`).
    #[arg(long)]
    limit: Option<usize>,
    /// Candidates merged and scored at once, 1 to 64 (overrides the config's `jobs`).
    #[arg(long)]
    jobs: Option<usize>,
    /// A dashed reference line on the plot, `LABEL=SCORE` (a score as the
    /// trace has it: a fraction for the average), repeatable.
    #[arg(long = "reference", value_name = "LABEL=SCORE")]
    references: Vec<String>,
    /// Where to merge and run: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Never show a progress bar.
    #[arg(long)]
    quiet: bool,
}

/// `LABEL=SCORE` of `--reference`.
fn parse_reference(text: &str) -> anyhow::Result<Reference> {
    let (label, score) = text
        .rsplit_once('=')
        .with_context(|| format!("--reference `{text}`: expected LABEL=SCORE"))?;
    let score: f64 = score
        .trim()
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite())
        .with_context(|| format!("--reference `{text}`: `{score}` is not a finite number"))?;
    anyhow::ensure!(
        !label.trim().is_empty(),
        "--reference `{text}`: the label is empty"
    );
    Ok(Reference {
        label: label.trim().to_string(),
        score,
    })
}

/// Runs `fusion search`.
pub fn run(args: SearchArgs) -> anyhow::Result<()> {
    let references = args
        .references
        .iter()
        .map(|r| parse_reference(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let overrides = Overrides {
        budget: args.budget,
        algorithm: args.algorithm,
        seed: args.seed,
        limit: args.limit,
        jobs: args.jobs,
    };
    let cfg = SearchConfig::load(&args.config, args.pool.as_deref(), &overrides)?;
    let device = runtime::device::parse_device(&args.device)?;
    // The folder before the first merge: a search's hours are not lost to
    // an unwritable --out.
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create --out {}", args.out.display()))?;
    eprintln!(
        "search: {} over {} dimension(s), {} evaluations in generations of {}, {} at once, objective {}",
        cfg.algorithm,
        cfg.dimensions.len(),
        cfg.budget,
        cfg.population,
        cfg.jobs,
        cfg.objective.describe()
    );
    let outcome = run_search(
        &cfg,
        &SearchOptions {
            device: device.clone(),
            progress: !args.quiet,
        },
    )?;
    let best_spec = compact::to_compact(&outcome.best_spec);
    let yaml = merger::mergekit::to_yaml(&outcome.best_spec)?;
    let write = |name: &str, text: &str| -> anyhow::Result<()> {
        let path = args.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    write("trace.csv", &trace_csv(&cfg, &outcome))?;
    write("best.txt", &format!("{best_spec}\n"))?;
    write("best.yaml", &yaml)?;
    write("best.svg", &plot_svg(&cfg, &outcome, &references))?;
    println!("{best_spec}");
    let best = outcome.best_evaluation();
    eprintln!(
        "best {} {} at evaluation {} of {} (generation {}), {:.1}s on {}; wrote {}",
        cfg.objective.describe(),
        show_score(&cfg.objective, best.score),
        best.index,
        outcome.evaluations.len(),
        best.generation,
        outcome.seconds,
        runtime::device::device_name(&device),
        args.out.display()
    );
    Ok(())
}
