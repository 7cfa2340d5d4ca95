//! `fusion serve`: the HTTP gateway. With a config file, serves its pools;
//! with none (or one that names no pool), serves the demo pool, building it
//! on first use.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use gateway::Config;

use super::demo;

/// Environment variable naming the demo pool's folder.
pub const DEMO_DIR_ENV: &str = "FUSION_DEMO_DIR";
/// Default demo pool folder (relative to the working directory).
pub const DEFAULT_DEMO_DIR: &str = "fusion-demo";

/// Arguments of `fusion serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// YAML configuration (server, device, cache, merge, pools, presets,
    /// taskpools, evaluations); every key can be overridden by a `FUSION_…`
    /// environment variable such as `FUSION_SERVER__BIND=0.0.0.0:8080`.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen address (overrides `server.bind`).
    #[arg(long)]
    bind: Option<String>,
    /// Folder of the demo pool, served when no pool is configured (default:
    /// $FUSION_DEMO_DIR, else ./fusion-demo); built there on first use.
    #[arg(long)]
    demo_dir: Option<PathBuf>,
}

/// The demo pool folder: the flag, else `$FUSION_DEMO_DIR`, else `./fusion-demo`.
pub fn demo_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os(DEMO_DIR_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DEMO_DIR))
}

/// Builds the demo pool in `dir` unless its `pool.yaml` exists; a pool
/// built by an earlier version gets the tokenizer files of this one (they
/// declare the BOS the models were trained with).
fn ensure_demo_pool(dir: &Path) -> anyhow::Result<()> {
    if dir.join("pool.yaml").is_file() {
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.path().is_dir()
                && runtime::generate::bytelevel::upgrade_tokenizer_files(&entry.path())?
            {
                eprintln!(
                    "updated the tokenizer files of {} (they now declare the BOS the demo models were trained with)",
                    entry.path().display()
                );
            }
        }
        return Ok(());
    }
    eprintln!(
        "no pool configured: building the demo pool in {} (first start only; minutes on two cores)",
        dir.display()
    );
    build_demo(dir).with_context(|| format!("building the demo pool in {}", dir.display()))
}

/// Trains the demo pool into `dir` with `fusion zoo build --out DIR` (its
/// defaults, progress bar and accuracy report) in a child process: the build
/// runs one expert per core with candle and rayon single-threaded, settings
/// that must be made before any thread starts and that the server, which
/// keeps running afterwards, should not inherit.
fn build_demo(dir: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the fusion binary")?;
    let status = std::process::Command::new(exe)
        .args(["zoo", "build", "--out"])
        .arg(dir)
        .status()
        .context("starting `fusion zoo build`")?;
    if !status.success() {
        anyhow::bail!(
            "`fusion zoo build --out {}` failed ({status})",
            dir.display()
        );
    }
    Ok(())
}

/// Runs `fusion serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => {
            let cwd = std::env::current_dir().context("reading the working directory")?;
            Config::from_yaml("", "the default configuration", &cwd, std::env::vars())?
        }
    };
    if let Some(bind) = args.bind {
        config.server.bind = bind;
    }
    if config.pools.is_empty() {
        let dir = demo_dir(args.demo_dir);
        ensure_demo_pool(&dir)?;
        demo::add_demo_pool(&mut config, &dir)?;
        // The demo pool is the only one: schedule its evaluations unless
        // the configuration has some.
        if let Some(pool) = config.pools.keys().next().cloned() {
            demo::add_demo_evaluations(&mut config, &pool)?;
        }
    }
    gateway::run(config)?;
    Ok(())
}

/// Runs `fusion openapi`: prints the OpenAPI document (what
/// `openapi/openapi.json` holds).
pub fn print_openapi() -> anyhow::Result<()> {
    use std::io::Write;
    std::io::stdout()
        .write_all(gateway::openapi::json().as_bytes())
        .context("writing the document")?;
    Ok(())
}
