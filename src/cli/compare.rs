//! `fusion compare`: the rows of a `compare.yaml` (base, experts, merges,
//! sweeps) scored on one task pool, printed as one FusionBench-style table.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use evaluator::compare::{run_compare, CompareConfig, CompareOptions};
use evaluator::report::Format;

/// Arguments of `fusion compare`.
#[derive(Args)]
pub struct CompareArgs {
    /// The comparison config (pool, taskpool, limit, entries with sweeps).
    #[arg(long)]
    config: PathBuf,
    /// pool.yaml to use instead of the config's `pool` (relative to the
    /// working directory).
    #[arg(long)]
    pool: Option<PathBuf>,
    /// Output format: table (markdown), csv or json.
    #[arg(long, default_value = "table")]
    format: Format,
    /// Score only the first N items of each task (overrides the config's `limit`).
    #[arg(long)]
    limit: Option<usize>,
    /// Where to merge and run: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Never show a progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Runs `fusion compare`.
pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    let mut cfg = CompareConfig::load(&args.config, args.pool.as_deref())?;
    if args.limit.is_some() {
        cfg.run.limit = args.limit;
    }
    let device = runtime::device::parse_device(&args.device)?;
    let start = Instant::now();
    let table = run_compare(
        &cfg,
        &CompareOptions {
            device: device.clone(),
            progress: !args.quiet,
        },
    )?;
    print!("{}", table.render(args.format));
    eprintln!(
        "{} rows x {} tasks in {:.1}s on {}",
        table.rows.len(),
        table.columns.len(),
        start.elapsed().as_secs_f64(),
        runtime::device::device_name(&device)
    );
    Ok(())
}
