//! `fusion bench serve`, part 4: many merges of one base at once, held
//! dense or as deltas over the base.
//!
//! A random pool whose experts are the base plus a rank-8 delta per matrix
//! and a little full-rank noise (fine-tunes' task vectors are nearly low
//! rank), written to `<work>-lowrank-h<hidden>-l<layers>`. `--mixed-merges` merges of its four
//! experts (task_arithmetic at several λ and TIES at several densities),
//! one client each, every client asking its own merge for a greedy
//! completion of `--decode-tokens` tokens, `--mixed-rounds` times back to
//! back. Measured in the same run, on one server per form:
//!
//! - one request at a time: the same requests one after another, merges
//!   held dense (the floor);
//! - concurrent, dense: every merge its own weights and its own scheduler;
//! - concurrent, lowrank (fixed rank) and sparse (fixed density): the
//!   merges held as deltas over the base, batched together in the base's
//!   scheduler;
//! - concurrent, combination: the task_arithmetic merges held as
//!   coefficients over the four experts' task vectors (lowrank at
//!   `--mixed-vector-rank`, resident once), the TIES merges (no linear
//!   combination) as lowrank deltas, all in the base's scheduler;
//! - task views, dense and masked: `emr_merging` and `tall_masks` of the
//!   four experts for one task each, held as their own weights, then as
//!   masks over one unified vector per method (the gateway's default).
//!
//! Per form: tokens/s and its ratio to one at a time, p50/p99 time to
//! first token and inter-token latency (streamed, as the clients see
//! them), the cache's resident bytes (all merges, shared task vectors and
//! the base) against one dense model, each merge's own bytes and measured
//! relative error (max over tensors, mean), and how many texts equal the
//! dense merge's (the task views': the dense views').

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use gateway::Config;
use runtime::model::random::random_weights;
use serde_json::{json, Value};

use super::serve::{random_config, write_pool, Weights, EXPERTS};

/// Rank of each expert's delta per matrix.
const DELTA_RANK: usize = 8;

/// What part 4 runs.
pub struct MixedArgs<'a> {
    /// Folder of the low-rank pool (written when missing).
    pub work: &'a Path,
    /// Hidden size and layers of its models.
    pub hidden: usize,
    /// Layers of its models.
    pub layers: usize,
    /// Merges (and clients).
    pub merges: usize,
    /// Requests per client, back to back.
    pub rounds: usize,
    /// Tokens per completion.
    pub tokens: usize,
    /// Rank of the lowrank form.
    pub rank: u64,
    /// Rank of each task vector of the combination form.
    pub vector_rank: u64,
    /// Density of the sparse form.
    pub density: f64,
    /// The servers' `max_batch_tokens` (the gateway's default when `None`).
    pub max_batch_tokens: Option<usize>,
}

/// Writes `base` and `e1..e4`: base + a rank-8 delta per matrix (entries
/// about 0.02) + N(0, 0.002²) noise, norms + N(0, 0.02²).
fn write_lowrank_pool(dir: &Path, hidden: usize, layers: usize) -> anyhow::Result<()> {
    write_pool(dir, "lowrank", hidden, layers, |i, cfg, base| {
        let noise = random_weights(cfg, 10 + i as u64, 0.002)?;
        let mut w = Weights::new();
        for (t, (k, v)) in base.iter().enumerate() {
            let seed = 1000 * (i as u64 + 1) + t as u64;
            let d = match *v.dims() {
                [out, inp] => {
                    // U V with U, V ~ N(0, σ²): entries of U V have std
                    // σ²·√r; σ = √(0.02/√r) gives 0.02.
                    let s = (0.02 / (DELTA_RANK as f64).sqrt()).sqrt();
                    let u = seeded((out, DELTA_RANK), 2 * seed, s)?;
                    let vv = seeded((DELTA_RANK, inp), 2 * seed + 1, s)?;
                    (u.matmul(&vv)? + &noise[k])?
                }
                _ => (&noise[k] - 1.0)?.affine(10.0, 0.0)?,
            };
            w.insert(k.clone(), (v + d)?);
        }
        Ok(w)
    })
}

/// A `(rows, cols)` matrix of uniform entries of standard deviation `std`
/// from a SplitMix64 stream of `seed` (deterministic across machines).
fn seeded(shape: (usize, usize), seed: u64, std: f64) -> candle_core::Result<Tensor> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let half_width = std * 3f64.sqrt();
    let values: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * unit - 1.0) * half_width) as f32
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// The merges of the run: task_arithmetic (`ta` appended to their
/// parameters, `""` for dense) and TIES (`ties` appended) of the four
/// experts at several coefficients.
fn merge_names(n: usize, ta: &str, ties: &str) -> Vec<String> {
    let all = EXPERTS.join(",");
    (0..n)
        .map(|i| {
            // Distinct λ for every merge of a method.
            let lambda = (3 + i / 2) as f64 / 10.0;
            if i % 2 == 0 {
                format!("lowrank/task_arithmetic({all};scaling_coefficient={lambda}{ta})")
            } else {
                let density = [0.2, 0.4][(i / 2) % 2];
                format!(
                    "lowrank/ties_merging({all};density={density},scaling_coefficient={lambda}{ties})"
                )
            }
        })
        .collect()
}

/// Task views of the per-task retrieval merges: `emr_merging` and
/// `tall_masks` of the four experts, each for one task (`form` appended:
/// `""` for the gateway's default, masked over one unified vector per
/// method).
fn view_names(n: usize, form: &str) -> Vec<String> {
    let all = EXPERTS.join(",");
    (0..n)
        .map(|i| {
            let method = ["emr_merging", "tall_masks"][i % 2];
            let task = EXPERTS[(i / 2) % EXPERTS.len()];
            format!("lowrank/{method}({all};task={task}{form})")
        })
        .collect()
}

/// One form's measurements.
struct FormRun {
    label: String,
    /// The run whose texts this one's should equal (dense of the same merges).
    twin: usize,
    tokens: usize,
    seconds: f64,
    resident: u64,
    delta_bytes: Vec<u64>,
    errors: Vec<(f64, f64)>,
    /// TTFT p50, p99 and ITL p50, p99 (ms).
    latencies: (f64, f64, f64, f64),
    texts: Vec<String>,
}

/// Runs part 4.
pub fn run(args: &MixedArgs) -> anyhow::Result<()> {
    eprintln!(
        "writing a random low-rank pool (hidden {}, {} layers) to {} ...",
        args.hidden,
        args.layers,
        args.work.display()
    );
    write_lowrank_pool(args.work, args.hidden, args.layers)?;
    let cfg = random_config(args.hidden, args.layers)?;
    let model_bytes = (cfg.num_parameters() * 4) as u64;
    let n = args.merges.max(1);
    let prompts: Vec<String> = (0..n).map(|i| format!("{i}+{}=", i + 1)).collect();
    let rt = tokio::runtime::Runtime::new()?;

    let lowrank = format!(",form=lowrank,form_rank={}", args.rank);
    let sparse = format!(",form=sparse,form_density={}", args.density);
    // (label, merges, the run whose texts they should equal).
    let forms = [
        ("dense".to_string(), merge_names(n, "", ""), 0),
        (
            format!("lowrank rank={}", args.rank),
            merge_names(n, &lowrank, &lowrank),
            0,
        ),
        (
            format!("sparse density={}", args.density),
            merge_names(n, &sparse, &sparse),
            0,
        ),
        (
            format!("combination, vectors rank={}", args.vector_rank),
            merge_names(
                n,
                &format!(",form=combination,form_rank={}", args.vector_rank),
                &lowrank,
            ),
            0,
        ),
        (
            "task views, dense".to_string(),
            view_names(n, ",form=dense"),
            4,
        ),
        ("task views, masked".to_string(), view_names(n, ""), 4),
    ];
    let mut alone: Option<(usize, f64)> = None;
    let mut runs = Vec::new();
    for (label, merges, twin) in &forms {
        let cache = model_bytes * (n as u64 + 2);
        let step = super::serve::step_limit(args.max_batch_tokens);
        let yaml = format!(
            "device: cpu\nserver: {{bind: '127.0.0.1:0', limits: {{max_running_sequences: {s}, queue_depth: 1024{step}}}}}\n\
             cache: {{max_bytes: {cache}}}\nmerge: {{max_concurrent: 1, max_wait: 600s}}\n",
            s = 4 * n
        );
        let mut config = Config::from_yaml(&yaml, "bench", args.work, Vec::new())?;
        crate::cli::demo::add_demo_pool(&mut config, args.work)?;
        let server = gateway::spawn(config)?;
        let url = server.url();
        let http = reqwest::blocking::Client::new();
        // Every merge resident first (merging is not what is timed).
        let t = Instant::now();
        let mut delta_bytes = Vec::new();
        let mut errors = Vec::new();
        let mut ids = Vec::new();
        for m in merges {
            let res = http
                .post(format!("{url}/v1/completions"))
                .json(&json!({"model": m, "prompt": "1+1=", "max_tokens": 1, "temperature": 0}))
                .send()?;
            if !res.status().is_success() {
                bail!("{m}: HTTP {}: {}", res.status(), res.text()?);
            }
            let id = res
                .headers()
                .get(gateway::MERGE_ID_HEADER)
                .context("no x-merge-id")?
                .to_str()?
                .to_string();
            let info: Value = http.get(format!("{url}/v1/merges/{id}")).send()?.json()?;
            delta_bytes.push(info["bytes"].as_u64().unwrap_or(0));
            let r = &info["residency"];
            errors.push((
                r["max_error"].as_f64().unwrap_or(0.0),
                r["mean_error"].as_f64().unwrap_or(0.0),
            ));
            ids.push(id);
        }
        eprintln!(
            "  {label}: {n} merges resident in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        if alone.is_none() {
            // The floor: the same requests one at a time, dense.
            let t = Instant::now();
            let mut tokens = 0;
            for _ in 0..args.rounds {
                for (id, p) in ids.iter().zip(&prompts) {
                    let v: Value = http
                        .post(format!("{url}/v1/completions"))
                        .json(&json!({"model": id, "prompt": p, "max_tokens": args.tokens,
                            "temperature": 0}))
                        .send()?
                        .json()?;
                    tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
                }
            }
            alone = Some((tokens, t.elapsed().as_secs_f64()));
        }
        let t = Instant::now();
        let requests: Vec<(String, String)> = ids.iter().cloned().zip(prompts.clone()).collect();
        let replies = rt.block_on(super::stream::clients(
            &url,
            &requests,
            args.tokens,
            args.rounds,
        ))?;
        let seconds = t.elapsed().as_secs_f64();
        rt.block_on(server.state().models.refresh_gauges());
        let resident = server.state().metrics.cache_bytes.get() as u64;
        server.stop();
        runs.push(FormRun {
            label: label.clone(),
            twin: *twin,
            tokens: replies.iter().map(|r| r.tokens).sum(),
            seconds,
            resident,
            delta_bytes,
            errors,
            latencies: super::stream::latencies(&replies),
            texts: replies.into_iter().map(|r| r.text).collect(),
        });
    }
    let (alone_tokens, alone_s) = alone.expect("the dense run measured it");
    let alone_rate = alone_tokens as f64 / alone_s;
    println!(
        "\n{n} merges of one base (4 experts, deltas of rank {DELTA_RANK} + noise), {n} clients each asking its own merge, \
         {} x {} greedy tokens each; one dense model {:.1} MB:",
        args.rounds,
        args.tokens,
        model_bytes as f64 / 1e6
    );
    println!(
        "  one request at a time (dense):  {alone_tokens} tokens in {alone_s:.2} s, {alone_rate:.0} tokens/s"
    );
    for r in &runs {
        let rate = r.tokens as f64 / r.seconds;
        let same = r
            .texts
            .iter()
            .zip(&runs[r.twin].texts)
            .filter(|(a, b)| a == b)
            .count();
        let per_merge = r.delta_bytes.iter().sum::<u64>() as f64 / r.delta_bytes.len() as f64;
        let max_err = r.errors.iter().map(|e| e.0).fold(0.0, f64::max);
        let mean_err = r.errors.iter().map(|e| e.1).sum::<f64>() / r.errors.len() as f64;
        let (t50, t99, g50, g99) = r.latencies;
        println!(
            "  {:<22} {:>6.0} tokens/s ({:.2}x one at a time); TTFT p50 {t50:.0} ms p99 {t99:.0} ms; \
             ITL p50 {g50:.1} ms p99 {g99:.1} ms; resident {:.1} MB = {:.2}x one dense model; \
             {:.2} MB per merge; error max {max_err:.3} mean {mean_err:.3}; texts as dense: {same}/{}",
            format!("concurrent, {}:", r.label),
            rate,
            rate / alone_rate,
            r.resident as f64 / 1e6,
            r.resident as f64 / model_bytes as f64,
            per_merge / 1e6,
            r.texts.len()
        );
    }
    Ok(())
}
