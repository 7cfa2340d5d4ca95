//! `fusion bench merge`: merge throughput on a synthetic pool, as input GB/s
//! and as a ratio to a plain memory-copy floor measured in the same run, with
//! the peak private memory (RssAnon) sampled from /proc while each merge runs.
//!
//! `fusion bench serve`: the gateway's cache-hit latency against the
//! in-process call, and requests/s of concurrent clients over more merges
//! than the cache holds (see [`serve`]).
//!
//! `fusion bench generate`: tokens/s of greedy generation on the model
//! runtime against candle-transformers' Llama on the same weights, in the
//! same run.
//!
//! `fusion bench moe`: tokens/s of the routed ensembles against the dense
//! task-arithmetic merge and the base, and router training time.

pub mod generate;
mod mixed;
mod moe;
pub mod serve;
mod stream;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Subcommand;
use merger::merge::{merge_in_memory, merge_to_dir, MergeOptions, MergePlan, Progress};
use merger::throughput::{copy_floor, AnonSampler};
use runtime::checkpoint::{parse_dtype, Checkpoint, WriteOptions};
use zoo::{pool_spec, synth, SynthOptions};

/// Subcommands of `fusion bench`.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Tokens/s of the routed ensembles (we_moe, ...) against the dense task-arithmetic merge and the base, and router training time.
    Moe(moe::MoeBenchArgs),
    /// Gateway: cache-hit latency (p50/p99) vs the in-process call; req/s of 8 clients over 4 merges, cache of 2.
    Serve(serve::ServeBenchArgs),
    /// Merge throughput of task_arithmetic, ties_merging and dare against a memory-copy floor.
    Merge {
        /// Parameters of the synthetic pool (e.g. 1B).
        #[arg(long, default_value = "1B", value_parser = crate::cli::parse_count)]
        params: u64,
        /// Experts in the pool.
        #[arg(long, default_value_t = 3)]
        experts: usize,
        /// Stored dtype of the pool.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Folder of the pool (synthesised there when missing) and of the outputs.
        #[arg(long, default_value = "target/bench-pool")]
        work: PathBuf,
        /// Methods to run, comma-separated.
        #[arg(
            long,
            default_value = "task_arithmetic,ties_merging,dare",
            value_delimiter = ','
        )]
        methods: Vec<String>,
        /// Repetitions of each measurement (the best is reported).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// Tokens/s of greedy generation against candle-transformers' Llama on the same random weights.
    Generate {
        /// Model: `tiny` (hidden 128, 4 layers, vocab 262) or `100M` (hidden 768, 12 layers, vocab 32000).
        #[arg(long, default_value = "100M", value_parser = parse_model_size)]
        params: generate::Size,
        /// Tokens to generate per run.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 16)]
        prompt: usize,
        /// Timed runs of each implementation, alternating (the best is reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Device: auto, cpu or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

fn parse_model_size(s: &str) -> Result<generate::Size, String> {
    match s.to_ascii_lowercase().as_str() {
        "tiny" => Ok(generate::Size::Tiny),
        "100m" => Ok(generate::Size::M100),
        _ => Err(format!("`{s}`: expected tiny or 100M")),
    }
}

fn pool_dirs(work: &Path, experts: usize) -> Vec<PathBuf> {
    std::iter::once(work.join("base"))
        .chain((1..=experts).map(|k| work.join(format!("expert_{k}"))))
        .collect()
}

/// Runs `fusion bench`.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Moe(args) => moe::run(args),
        BenchCommand::Serve(args) => serve::run(args),
        BenchCommand::Merge {
            params,
            experts,
            dtype,
            work,
            methods,
            repeat,
        } => merge(params, experts, &dtype, &work, &methods, repeat),
        BenchCommand::Generate {
            params,
            tokens,
            prompt,
            repeat,
            device,
        } => generate_tps(params, tokens, prompt, repeat, &device),
    }
}

/// `fusion bench generate`.
fn generate_tps(
    size: generate::Size,
    tokens: usize,
    prompt: usize,
    repeat: usize,
    device: &str,
) -> anyhow::Result<()> {
    let config = size.config();
    if tokens == 0 || prompt == 0 || prompt + tokens > config.max_position_embeddings {
        anyhow::bail!(
            "`--prompt {prompt}` and `--tokens {tokens}` must be positive and sum to at most {}",
            config.max_position_embeddings
        );
    }
    let dev = runtime::device::parse_device(device)?;
    eprintln!("building both models on random weights ...");
    let pair = generate::Pair::new(size, 0, &dev)?;
    println!(
        "model: random Llama `{}`, {:.1}M parameters (hidden {}, {} layers, {} heads, MLP {}, vocab {}), f32 on {}; threads: {}",
        size.name(),
        config.num_parameters() as f64 / 1e6,
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
        config.vocab_size,
        runtime::device::device_name(&dev),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "greedy generation of {tokens} tokens after a {prompt}-token prompt (KV cache), best of {repeat}\n"
    );
    let ids = pair.prompt(prompt);
    let c = generate::compare(&pair, &ids, tokens, repeat)?;
    println!("| implementation | seconds | tokens/s |");
    println!("|---|---|---|");
    println!(
        "| runtime::model | {:.3} | {:.1} |",
        c.ours_seconds,
        c.ours_tps()
    );
    println!(
        "| candle-transformers llama | {:.3} | {:.1} |",
        c.reference_seconds,
        c.reference_tps()
    );
    println!(
        "\nratio (runtime::model / candle-transformers): {:.2}x; same tokens: {}",
        c.ratio(),
        if c.same_tokens { "yes" } else { "NO" }
    );
    Ok(())
}

/// `fusion bench merge`.
fn merge(
    params: u64,
    experts: usize,
    dtype: &str,
    work: &Path,
    methods: &[String],
    repeat: usize,
) -> anyhow::Result<()> {
    let dt = parse_dtype(dtype)
        .ok_or_else(|| anyhow::anyhow!("`--dtype {dtype}`: expected f32, f16 or bf16"))?;
    let pool = work.join(format!("pool-{params}-{experts}-{dtype}"));
    let dirs = pool_dirs(&pool, experts);
    if !dirs.iter().all(|d| d.join("config.json").exists()) {
        eprintln!(
            "synthesising a {params}-parameter pool with {experts} experts in {}",
            pool.display()
        );
        let t = Instant::now();
        synth(
            &pool,
            &SynthOptions {
                params,
                experts,
                dtype: dt,
                seed: 0,
                force: true,
            },
        )?;
        eprintln!("  done in {:.1}s", t.elapsed().as_secs_f64());
    }
    let checkpoints: Vec<Arc<Checkpoint>> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| Checkpoint::open(&format!("m{i}"), d))
        .collect::<Result<_, _>>()?;
    // Warm the page cache, then measure the floor.
    let _ = copy_floor(&checkpoints);
    let mut floor = 0f64;
    for _ in 0..repeat.max(1) {
        let (bytes, secs) = copy_floor(&checkpoints);
        floor = floor.max(bytes as f64 / secs / 1e9);
    }
    let input_gb = checkpoints.iter().map(|c| c.data_bytes()).sum::<u64>() as f64 / 1e9;
    let output_bytes = checkpoints[0].data_bytes();
    println!(
        "pool: {} parameters x {} checkpoints ({dtype}), {:.2} GB of input; threads: {}",
        params,
        experts + 1,
        input_gb,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("memory-copy floor: {floor:.2} GB/s\n");
    println!(
        "merges run in memory (the gateway's path) on checkpoints opened once, like the floor;"
    );
    println!("`to disk` is the same merge written as a checkpoint folder (fusion merge).\n");
    println!("| method | seconds | input GB/s | x copy floor | peak RssAnon MiB | output MiB | within output + 512 MiB | to disk s |");
    println!("|---|---|---|---|---|---|---|---|");
    let by_name: HashMap<String, Arc<Checkpoint>> = dirs
        .iter()
        .zip(&checkpoints)
        .map(|(d, c)| (d.to_string_lossy().into_owned(), c.clone()))
        .collect();
    let open = |n: &str| -> merger::Result<Arc<Checkpoint>> {
        by_name
            .get(n)
            .cloned()
            .ok_or_else(|| runtime::RuntimeError::MissingCheckpoint(PathBuf::from(n)).into())
    };
    let out = work.join("bench-out");
    let cpu = runtime::device::parse_device("cpu")?;
    for method in methods {
        let mut spec = pool_spec(method, &dirs);
        if method == "dare" {
            spec.seed = Some(42);
        }
        let mut best: Option<(f64, u64)> = None;
        for _ in 0..repeat.max(1) {
            let mut plan = MergePlan::with_checkpoints(spec.clone(), &open)
                .with_context(|| format!("planning {method}"))?;
            let sampler = AnonSampler::start();
            let (merged, stats) =
                merge_in_memory(&mut plan, &cpu, &Progress::new(0, method, false))
                    .with_context(|| format!("merging with {method}"))?;
            let peak = sampler.finish();
            drop(merged);
            if best.is_none_or(|(s, _)| stats.seconds < s) {
                best = Some((stats.seconds, peak));
            }
        }
        let resolve = |n: &str| -> merger::Result<PathBuf> { Ok(PathBuf::from(n)) };
        let disk = merge_to_dir(
            spec.clone(),
            &resolve,
            &out,
            &cpu,
            &MergeOptions {
                write: WriteOptions {
                    force: true,
                    ..Default::default()
                },
                progress: false,
            },
        )
        .with_context(|| format!("merging {method} to disk"))?;
        std::fs::remove_dir_all(&out).ok();
        let (secs, peak) = best.expect("at least one run");
        let gbs = input_gb / secs;
        let budget = output_bytes + 512 * 1024 * 1024;
        println!(
            "| {method} | {secs:.2} | {gbs:.2} | {:.2} | {:.0} | {:.0} | {} | {:.2} |",
            gbs / floor,
            peak as f64 / 1048576.0,
            output_bytes as f64 / 1048576.0,
            if peak <= budget { "yes" } else { "NO" },
            disk.stats.seconds
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::generate::{compare, Pair, Size};
    use super::parse_model_size;
    use candle_core::Device;

    #[test]
    fn both_generation_loops_give_the_same_tokens() {
        let pair = Pair::new(Size::Tiny, 1, &Device::Cpu).unwrap();
        assert_eq!(pair.ours.config().num_parameters(), 886_656);
        let prompt = pair.prompt(5);
        assert!(prompt.iter().all(|&t| t < 262));
        let c = compare(&pair, &prompt, 12, 1).unwrap();
        assert!(c.same_tokens);
        assert_eq!(c.tokens, 12);
        assert!(c.ours_tps() > 0.0 && c.ratio().is_finite());
        let tokens = pair.generate_ours(&prompt, 12).unwrap();
        assert_eq!(tokens.len(), 12);
        assert_eq!(tokens, pair.generate_reference(&prompt, 12).unwrap());
    }

    #[test]
    fn model_sizes_parse() {
        assert_eq!(parse_model_size("100m"), Ok(Size::M100));
        assert_eq!(parse_model_size("tiny"), Ok(Size::Tiny));
        assert!(parse_model_size("7B").unwrap_err().contains("tiny or 100M"));
    }
}
