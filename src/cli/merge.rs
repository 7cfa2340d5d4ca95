//! `fusion merge`: a mergekit YAML (or a structured spec YAML, or a compact
//! spec string) in, a merged checkpoint folder out.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use clap::Args;
use merger::merge::MergeReport;
use merger::mergekit::{self, Config};
use merger::plan::{Plan, Run, Written};
use merger::slices::{SlicedPlan, SlicedSpec};
use merger::spec::{compact, MergeSpec};
use merger::tokenizer::TokenizerSpec;
use merger::{Bounds, Cancel, MergeError};
use runtime::checkpoint::{Checkpoint, WriteOptions};

/// Arguments of `fusion merge`.
#[derive(Args)]
pub struct MergeArgs {
    /// mergekit-style YAML config (`merge_method`, `base_model`, `models`, ...)
    /// or a structured spec YAML (`method`, `base`, `models`, ...).
    config: Option<PathBuf>,
    /// A compact spec instead of a config file, with checkpoint folders as
    /// names: `task_arithmetic(a,b;base=c,scaling_coefficient=0.3)`.
    #[arg(long, conflicts_with = "config")]
    spec: Option<String>,
    /// Output checkpoint folder (not needed with --check).
    #[arg(long, short, required_unless_present = "check")]
    out: Option<PathBuf>,
    /// Check the spec and the checkpoints and report every problem
    /// (architecture, vocabulary, layer count, missing or dropped tensors,
    /// shapes, tied embeddings, tokenizers, dtypes) without merging; exit
    /// status 1 when there is an error.
    #[arg(long)]
    check: bool,
    /// Largest shard (e.g. 5GB, 500MB); larger outputs are sharded with an index.
    #[arg(long, default_value = "5GB", value_parser = super::parse_size)]
    shard_size: u64,
    /// Replace the output folder if it exists and is not empty.
    #[arg(long)]
    force: bool,
    /// Where to merge: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Never show a progress bar.
    #[arg(long)]
    quiet: bool,
    /// Routed ensembles (we_moe, sparse_we_moe, rankone_moe) and
    /// data-driven merges (fisher_merging, regmean, regmean_plusplus,
    /// adamerging, ada_svd): a task pool folder whose `*.jsonl` inputs
    /// (prompt/context/text/input/text_a/text_b fields, never labels) train
    /// the routers or give each expert's statistics (the task named like the
    /// expert's folder), tokenised with the base's tokenizer.
    #[arg(long)]
    calibration: Option<PathBuf>,
}

/// Reads a config file as a mergekit YAML or a structured spec, whose
/// merge takes whole models (no `slices`).
pub fn load_config(path: &Path) -> anyhow::Result<MergeSpec> {
    match load_file(path)? {
        Config::Merge(spec, tokenizer) if tokenizer.is_plain() => Ok(spec),
        Config::Merge(..) => bail!(
            "`{}` sets the output tokenizer (`tokenizer_source`, `tokenizer`, `chat_template`): \
             write it with `fusion merge {} --out DIR`, then use the folder",
            path.display(),
            path.display()
        ),
        Config::Sliced(_) => bail!(
            "`{}` lays its merge out in layer `slices`: write it with `fusion merge {} --out DIR`, \
             then use the folder",
            path.display(),
            path.display()
        ),
    }
}

/// Reads a config file as a mergekit YAML (whole models or slices) or a
/// structured spec.
fn load_file(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config `{}`", path.display()))?;
    let value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| MergeError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if value.get("method").is_some() && value.get("merge_method").is_none() {
        let spec: MergeSpec = serde_yaml_ng::from_value(value).map_err(|e| MergeError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        return Ok(Config::Merge(spec, TokenizerSpec::default()));
    }
    Ok(mergekit::read(&text, path)?)
}

/// Resolves a model name to a folder: as given (absolute, or relative to the
/// working directory), else relative to the config file's folder.
fn resolver(config_dir: Option<PathBuf>) -> impl Fn(&str) -> merger::Result<PathBuf> {
    move |name: &str| {
        let direct = PathBuf::from(name);
        if direct.is_dir() || direct.is_absolute() {
            return Ok(direct);
        }
        if let Some(dir) = &config_dir {
            let rel = dir.join(name);
            if rel.is_dir() {
                return Ok(rel);
            }
        }
        Err(runtime::RuntimeError::MissingCheckpoint(direct).into())
    }
}

/// Runs `fusion merge`.
pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let (spec, config_dir, tokenizer) = match (&args.config, &args.spec) {
        (Some(path), None) => {
            let dir = path.parent().map(Path::to_path_buf);
            match load_file(path)? {
                Config::Merge(spec, tokenizer) => (spec, dir, tokenizer),
                Config::Sliced(sliced) => return run_sliced(sliced, &resolver(dir), &args),
            }
        }
        (None, Some(s)) => match compact::parse(s)? {
            compact::Parsed::Merge(spec) => (*spec, None, TokenizerSpec::default()),
            _ => bail!("`--spec` must be a merge such as `task_arithmetic(a,b;base=c)`, got `{s}`"),
        },
        _ => bail!("give a config file or --spec"),
    };
    let resolve = resolver(config_dir);
    if !tokenizer.is_plain() {
        return run_with_tokenizer(Plan::new(spec)?, &tokenizer, &resolve, &args);
    }
    if args.check {
        return check(&spec, &resolve);
    }
    let out = args.out.clone().context("give --out (or --check)")?;
    let device = runtime::device::parse_device(&args.device)?;
    let write = WriteOptions {
        shard_size: args.shard_size,
        force: args.force,
    };
    let plan = Plan::new(spec)?;
    let (calibration, sources) = match &plan {
        Plan::Routed(routed) => (
            super::moe::calibration(routed.params(), args.calibration.as_deref(), &resolve)?,
            Vec::new(),
        ),
        Plan::DataDriven(data) => {
            super::data_driven::calibration(data.params(), args.calibration.as_deref(), &resolve)?
        }
        Plan::Tensorwise(_) if args.calibration.is_some() => bail!(
            "--calibration is only used by the routed methods (we_moe, sparse_we_moe, rankone_moe) \
             and the data-driven ones (fisher_merging, regmean, regmean_plusplus, adamerging, \
             ada_svd), not `{}`",
            plan.spec().method
        ),
        Plan::Tensorwise(_) => (Vec::new(), Vec::new()),
    };
    let open = |name: &str| Ok(Checkpoint::open(name, &resolve(name)?)?);
    let cancel = Cancel::new();
    let stats = evaluator::source::stats_cache();
    let run = Run {
        open: &open,
        calibration: &calibration,
        sources: &sources,
        stats: Some(&stats),
        device: &device,
        progress: !args.quiet,
        cancel: &cancel,
    };
    let report = match plan.write(&run, &out, &write)? {
        Written::Tensorwise(report) => report,
        Written::Routed(report) => {
            super::moe::print_report(&report, &device);
            return Ok(());
        }
        Written::DataDriven(report) => {
            super::data_driven::print_report(&report, &stats, &device);
            return Ok(());
        }
    };
    print_merged(&report, &device, "");
    Ok(())
}

/// The line `fusion merge` ends with: tensors, bytes, time, throughput,
/// device, folder and merge id.
fn print_merged(report: &MergeReport, device: &Device, what: &str) {
    let s = &report.stats;
    eprintln!(
        "merged {} tensors{what} ({:.3} GB in, {:.3} GB out) in {:.2}s ({:.2} GB/s) on {} -> {} (merge-{})",
        s.tensors,
        s.input_bytes as f64 / 1e9,
        s.output_bytes as f64 / 1e9,
        s.seconds,
        s.input_bytes as f64 / 1e9 / s.seconds.max(1e-9),
        runtime::device::device_name(device),
        report.out.display(),
        report.id
    );
}

/// `fusion merge` of a tensor-wise merge with its own output tokenizer
/// (`tokenizer_source`, `tokenizer:`, `chat_template`); with `--check`,
/// validated (the vocabularies and every tensor) without writing.
fn run_with_tokenizer(
    plan: Plan,
    tokenizer: &TokenizerSpec,
    resolve: &dyn Fn(&str) -> merger::Result<PathBuf>,
    args: &MergeArgs,
) -> anyhow::Result<()> {
    let Plan::Tensorwise(tw) = plan else {
        bail!(
            "`tokenizer_source`, `tokenizer` and `chat_template` apply to tensor-wise merges; \
             `{}` builds its own model",
            plan.spec().method
        );
    };
    if args.calibration.is_some() {
        bail!("--calibration is not used by `{}`", tw.spec().method);
    }
    let open = |name: &str| Ok(Checkpoint::open(name, &resolve(name)?)?);
    let mut merge = tw.open_with_tokenizer(&open, tokenizer)?;
    let vocab = merge
        .tokenizer()
        .filter(|t| t.permutes())
        .map(|t| format!(", vocabulary of {} rows", t.rows()))
        .unwrap_or_default();
    if args.check {
        println!(
            "no errors: {} tensors{vocab}; every model's tokenizer reads and every tensor is present \
             with one shape (embedding rows aside)",
            merge.tensors().len()
        );
        return Ok(());
    }
    let out = args.out.clone().context("give --out (or --check)")?;
    let device = runtime::device::parse_device(&args.device)?;
    let opts = merger::merge::MergeOptions {
        write: WriteOptions {
            shard_size: args.shard_size,
            force: args.force,
        },
        progress: !args.quiet,
    };
    let report = merger::merge::write_to_dir(&mut merge, &out, &device, &opts)?;
    print_merged(&report, &device, &vocab);
    Ok(())
}

/// `fusion merge` of a config with `slices`: validated as a whole (with
/// `--check`, only that), then every slice merged into one folder.
fn run_sliced(
    spec: SlicedSpec,
    resolve: &dyn Fn(&str) -> merger::Result<PathBuf>,
    args: &MergeArgs,
) -> anyhow::Result<()> {
    if args.calibration.is_some() {
        bail!("--calibration is not used by sliced merges (tensor-wise methods only)");
    }
    let open = |name: &str| Ok(Checkpoint::open(name, &resolve(name)?)?);
    let slices = spec.slices.len();
    let mut plan = SlicedPlan::new(spec, &open, &Bounds::default())?;
    let summary = format!(" in {slices} slice(s), {} output layers", plan.num_layers());
    if args.check {
        println!(
            "no errors: {} tensors{summary}; every layer range lies within its model and every \
             source holds its tensors with one shape",
            plan.tensors().count()
        );
        return Ok(());
    }
    let out = args.out.clone().context("give --out (or --check)")?;
    let device = runtime::device::parse_device(&args.device)?;
    let write = WriteOptions {
        shard_size: args.shard_size,
        force: args.force,
    };
    let report = plan.write(&out, &device, &write, !args.quiet)?;
    print_merged(&report, &device, &summary);
    Ok(())
}

/// `fusion merge --check`: the preflight report of `spec`.
fn check(
    spec: &MergeSpec,
    resolve: &dyn Fn(&str) -> merger::Result<PathBuf>,
) -> anyhow::Result<()> {
    use merger::preflight::{self, Severity};
    let open = |name: &str| Ok(Checkpoint::open(name, &resolve(name)?)?);
    let report = preflight::check(spec, &open)?;
    println!(
        "checking `{}` of {} model(s){}",
        spec.method,
        spec.models.len(),
        spec.base
            .as_deref()
            .map(|b| format!(" over the base `{b}`"))
            .unwrap_or_default()
    );
    for m in &report.models {
        println!(
            "  {:<5} {:<24} {:>6} tensors {:>14} parameters  {:<10} {}",
            m.role,
            m.name,
            m.tensors,
            m.parameters,
            m.dtypes,
            m.model_type.as_deref().unwrap_or("(no model_type)")
        );
    }
    for f in &report.findings {
        let level = match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        println!("{level:<7} [{}] {}", f.topic, f.message);
    }
    let (errors, warnings) = (report.errors(), report.warnings());
    if errors > 0 {
        bail!("{errors} error(s) and {warnings} warning(s): the merge would fail or give a broken model");
    }
    println!("no errors, {warnings} warning(s): the merge can run");
    Ok(())
}
