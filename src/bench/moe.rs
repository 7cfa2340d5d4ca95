//! `fusion bench moe`: greedy decoding speed of the routed ensembles
//! against the dense task-arithmetic merge and the base, and the time of a
//! router training step, on a synthetic Llama pool.
//!
//! Decoding: one prompt (seeded random ids) prefilled in one call, then
//! `--tokens` greedy steps of one token each through the KV cache; models
//! are measured round-robin `--repeat` times and the best run of each is
//! reported. Training: `--steps` Adam steps of each method's routers on
//! random sequences of `--seq-len` tokens, batch `--batch-size`, with the
//! default `answer` objective (a random model rarely predicts EOS, so
//! every step decodes the full 16 predictions: the objective's worst case)
//! and, for `we_moe`, `last` (no decoding).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Tensor, D};
use clap::Args;
use merger::merge::{merge_in_memory, MergePlan, Progress};
use merger::spec::{MergeSpec, ParamValue};
use runtime::checkpoint::Checkpoint;
use runtime::model::{Model, ModelOptions};
use zoo::{pool_spec, synth, SynthOptions};

/// Options of `fusion bench moe`.
#[derive(Args)]
pub struct MoeBenchArgs {
    /// Parameters of the synthetic pool (e.g. 20M).
    #[arg(long, default_value = "20M", value_parser = crate::cli::parse_count)]
    params: u64,
    /// Experts in the pool.
    #[arg(long, default_value_t = 3)]
    experts: usize,
    /// Prompt tokens.
    #[arg(long, default_value_t = 32)]
    prompt: usize,
    /// Generated tokens per run.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Router training steps to time (0: skip).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Sequences per training step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 32)]
    seq_len: usize,
    /// Rank of rankone_moe.
    #[arg(long, default_value_t = 32)]
    rank_k: usize,
    /// Repetitions of each decoding run (the best is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Folder of the pool (synthesised there when missing).
    #[arg(long, default_value = "target/bench-pool")]
    work: PathBuf,
    /// Where to run: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Seeded token ids in `0..vocab` (splitmix64).
struct Ids(u64);

impl Ids {
    fn next(&mut self, vocab: u32) -> u32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % vocab as u64) as u32
    }
}

/// Greedy decoding timings of one model.
struct Timing {
    prefill_s: f64,
    decode_s: f64,
}

fn argmax(logits: &Tensor) -> anyhow::Result<u32> {
    Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0])
}

/// Prefills `prompt`, then decodes `n` tokens greedily.
fn greedy(model: &Model, prompt: &[u32], n: usize) -> anyhow::Result<(Timing, Vec<u32>)> {
    let dev = model.device();
    let mut cache = model.new_cache();
    let t = Instant::now();
    let ids = Tensor::new(prompt, dev)?.unsqueeze(0)?;
    let mut next = argmax(&model.forward_last(&ids, Some(&mut cache))?)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let mut out = Vec::with_capacity(n);
    let t = Instant::now();
    for _ in 0..n {
        out.push(next);
        let ids = Tensor::new(&[next], dev)?.unsqueeze(0)?;
        next = argmax(&model.forward_last(&ids, Some(&mut cache))?)?;
    }
    Ok((
        Timing {
            prefill_s,
            decode_s: t.elapsed().as_secs_f64(),
        },
        out,
    ))
}

/// Bytes of a tensor map.
fn bytes_of(w: &std::collections::HashMap<String, Tensor>) -> u64 {
    w.values()
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum()
}

/// Runs `fusion bench moe`.
pub fn run(a: MoeBenchArgs) -> anyhow::Result<()> {
    let device = runtime::device::parse_device(&a.device)?;
    let pool = a
        .work
        .join(format!("moe-pool-{}-{}-f32", a.params, a.experts));
    let dirs: Vec<PathBuf> = std::iter::once(pool.join("base"))
        .chain((1..=a.experts).map(|k| pool.join(format!("expert_{k}"))))
        .collect();
    if !dirs.iter().all(|d| d.join("config.json").exists()) {
        eprintln!(
            "synthesising a {}-parameter pool with {} experts in {}",
            a.params,
            a.experts,
            pool.display()
        );
        synth(
            &pool,
            &SynthOptions {
                params: a.params,
                experts: a.experts,
                dtype: DType::F32,
                seed: 0,
                force: true,
            },
        )?;
    }
    let cks: Vec<Arc<Checkpoint>> = dirs
        .iter()
        .map(|d| Checkpoint::open(&d.to_string_lossy(), d))
        .collect::<Result<_, _>>()?;
    let open = |n: &str| -> merger::Result<Arc<Checkpoint>> {
        cks.iter()
            .find(|c| c.name() == n)
            .cloned()
            .ok_or_else(|| runtime::RuntimeError::MissingCheckpoint(PathBuf::from(n)).into())
    };
    let opts = ModelOptions {
        device: device.clone(),
        ..Default::default()
    };
    let base = Model::load(&dirs[0], &opts)?;
    let c = base.config().clone();
    let mut rng = Ids(7);
    let vocab = c.vocab_size as u32;
    let prompt: Vec<u32> = (0..a.prompt).map(|_| rng.next(vocab)).collect();
    println!(
        "pool: {} parameters per checkpoint (hidden {}, MLP {}, {} layers, vocab {}), {} experts; device {}; threads {}",
        c.num_parameters(),
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.vocab_size,
        a.experts,
        runtime::device::device_name(&device),
        candle_core::utils::get_num_threads()
    );
    println!(
        "greedy decoding: prompt {} tokens, {} generated, best of {}\n",
        a.prompt, a.tokens, a.repeat
    );
    // Every model is built first, then measured round-robin, so that load
    // changes on the machine hit them alike; the best run of each counts.
    let mut models: Vec<(String, Model, u64)> = Vec::new();
    let base_bytes = (c.num_parameters() * 4) as u64;
    models.push(("base".into(), base, base_bytes));
    let spec = pool_spec("task_arithmetic", &dirs).with("scaling_coefficient", 0.3);
    let mut plan = MergePlan::with_checkpoints(spec, &open)?;
    let (w, _) = merge_in_memory(&mut plan, &device, &Progress::new(0, "ta", false))?;
    let ta_bytes = bytes_of(&w);
    let ta = Model::from_tensors(c.clone(), w, &opts)?;
    models.push(("task_arithmetic (dense)".into(), ta, ta_bytes));
    let variants: Vec<(String, MergeSpec)> = vec![
        ("we_moe".into(), pool_spec("we_moe", &dirs)),
        (
            "we_moe (per_token)".into(),
            pool_spec("we_moe", &dirs).with_value("routing", ParamValue::Text("per_token".into())),
        ),
        ("sparse_we_moe".into(), pool_spec("sparse_we_moe", &dirs)),
        (
            format!("rankone_moe (k={})", a.rank_k),
            pool_spec("rankone_moe", &dirs).with("rank_k", a.rank_k as f64),
        ),
    ];
    for (label, spec) in variants {
        let spec = spec.with("steps", 0.0);
        let built = merger::moe::build(&spec, &open, &[], &device, false)
            .with_context(|| format!("building {label}"))?;
        let bytes = built.bytes();
        models.push((label, built.into_model(), bytes));
    }
    let mut best: Vec<Option<Timing>> = models.iter().map(|_| None).collect();
    for (_, m, _) in &models {
        greedy(m, &prompt, a.tokens.min(4))?; // untimed warm-up
    }
    for _ in 0..a.repeat.max(1) {
        for ((_, m, _), b) in models.iter().zip(best.iter_mut()) {
            let (t, _) = greedy(m, &prompt, a.tokens)?;
            if b.as_ref().is_none_or(|b| t.decode_s < b.decode_s) {
                *b = Some(t);
            }
        }
    }
    println!("| model | prefill ms | decode tokens/s | x dense merge | resident MB |");
    println!("|---|---|---|---|---|");
    let timings: Vec<Timing> = best.into_iter().map(|t| t.expect("one run")).collect();
    let dense_tps = a.tokens as f64 / timings[1].decode_s;
    for ((label, _, bytes), t) in models.iter().zip(&timings) {
        let tps = a.tokens as f64 / t.decode_s;
        println!(
            "| {label} | {:.1} | {tps:.1} | {:.2} | {:.0} |",
            1e3 * t.prefill_s,
            tps / dense_tps,
            *bytes as f64 / 1e6
        );
    }
    drop(models);

    if a.steps > 0 {
        let calibration: Vec<merger::moe::calibration::CalibrationItem> = (0..4 * a.batch_size)
            .map(|_| {
                (0..a.seq_len)
                    .map(|_| rng.next(vocab))
                    .collect::<Vec<u32>>()
                    .into()
            })
            .collect();
        println!(
            "\nrouter training (we_moe, per_sequence): {} steps, batch {} x {} tokens",
            a.steps, a.batch_size, a.seq_len
        );
        println!("| method | objective | seconds | ms/step | 1000 steps (s, extrapolated) |");
        println!("|---|---|---|---|---|");
        let runs = [
            ("we_moe", "answer"),
            ("we_moe", "last"),
            ("sparse_we_moe", "answer"),
            ("rankone_moe", "answer"),
        ];
        for (method, objective) in runs {
            let mut spec = pool_spec(method, &dirs)
                .with("steps", a.steps as f64)
                .with("batch_size", a.batch_size as f64)
                .with_value(
                    "entropy_positions",
                    merger::spec::ParamValue::Text(objective.into()),
                );
            if method == "rankone_moe" {
                spec = spec.with("rank_k", a.rank_k as f64);
            }
            let built = merger::moe::build(&spec, &open, &calibration, &device, true)
                .with_context(|| format!("training {method}"))?;
            let t = built.meta().training.clone().expect("trained");
            println!(
                "| {method} | {objective} | {:.2} | {:.1} | {:.0} |",
                t.seconds,
                1e3 * t.seconds / t.steps as f64,
                1000.0 * t.seconds / t.steps as f64
            );
        }
    }
    Ok(())
}
