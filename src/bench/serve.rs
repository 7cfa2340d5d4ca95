//! `fusion bench serve`: the gateway on a real socket.
//!
//! 1. Cache-hit latency: sequential `/v1/completions` requests of one token
//!    on a resident merge (p50, p99), against the same call on the same
//!    model in-process (tokenize + generate one token), in the same run.
//! 2. Throughput: 8 concurrent clients spread over 4 merges while the cache
//!    holds only 2 (so merges are evicted and redone), with a built-in client
//!    and, when it is installed, `wrk` (Debian package `wrk`) with a Lua
//!    script rotating over the 4 merges.
//! 3. Decoding on one model, continuous batching against its peers: the
//!    pool's base served over HTTP to 1, 4, 8 and 16 clients
//!    (`--decode-sweep`), each streaming `--decode-rounds` greedy
//!    completions of `--decode-tokens` tokens after a prompt of about
//!    `--decode-prompt` tokens back to back: aggregate tokens/s and its
//!    ratio to 1 client, p50/p99 time to first token and inter-token
//!    latency as the clients see them, the mean batch width, and whether
//!    every text equals its text alone; against, in the same run, the
//!    engine's own unbatched loop in-process and candle-transformers'
//!    Llama on the same weights, one sequence at a time.
//! 4. Many merges of one base at once, dense against deltas over the base
//!    ([`super::mixed`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use clap::Args;
use gateway::Config;
use runtime::generate::{bytelevel, SamplingParams};
use runtime::model::random::{random_weights, write_checkpoint};
use runtime::model::ModelConfig;
use serde_json::json;

/// Arguments of `fusion bench serve`.
#[derive(Args)]
pub struct ServeBenchArgs {
    /// A pool folder with a `pool.yaml` (the demo pool's layout); default: a
    /// random pool of `--hidden` x `--layers` written to `--work`.
    #[arg(long)]
    pool: Option<PathBuf>,
    /// Folder of the random pools, suffixed `-h<hidden>-l<layers>` (part
    /// 4's `-lowrank-h<hidden>-l<layers>`); written when missing.
    #[arg(long, default_value = "target/bench-serve-pool")]
    work: PathBuf,
    /// Hidden size of the random pool's models.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Layers of the random pool's models.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Sequential requests of the latency measurement.
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Concurrent clients of the throughput run.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Client counts of the decoding measurement (part 3), comma-separated.
    #[arg(long, default_value = "1,4,8,16", value_delimiter = ',')]
    decode_sweep: Vec<usize>,
    /// Completions each client of part 3 streams back to back.
    #[arg(long, default_value_t = 2)]
    decode_rounds: usize,
    /// Prompt tokens of each completion of part 3 (about: whole characters).
    #[arg(long, default_value_t = 32)]
    decode_prompt: usize,
    /// Tokens each generation of the decoding measurements asks for.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Merges of one base served at once, one client each (part 4: dense
    /// against deltas over the base); 0 skips part 4.
    #[arg(long, default_value_t = 8)]
    mixed_merges: usize,
    /// Requests each client of part 4 sends back to back.
    #[arg(long, default_value_t = 2)]
    mixed_rounds: usize,
    /// Rank of part 4's lowrank form.
    #[arg(long, default_value_t = 32)]
    mixed_rank: u64,
    /// Rank of each expert's task vector in part 4's combination form.
    #[arg(long, default_value_t = 8)]
    mixed_vector_rank: u64,
    /// Density of part 4's sparse form.
    #[arg(long, default_value_t = 0.02)]
    mixed_density: f64,
    /// Runs part 4 only.
    #[arg(long)]
    mixed_only: bool,
    /// Runs part 3 only (decoding to 1..16 clients), skipping the
    /// cache-hit latency and the merge throughput.
    #[arg(long, conflicts_with = "mixed_only")]
    decode_only: bool,
    /// The servers' `server.limits.max_batch_tokens` (tokens of one step);
    /// default: the gateway's.
    #[arg(long)]
    max_batch_tokens: Option<usize>,
}

/// Names of the random pool's experts.
pub(super) const EXPERTS: [&str; 4] = ["e1", "e2", "e3", "e4"];

/// The config of the random pools' models.
pub(super) fn random_config(hidden: usize, layers: usize) -> anyhow::Result<ModelConfig> {
    let json = json!({
        "model_type": "llama", "vocab_size": bytelevel::VOCAB_SIZE, "hidden_size": hidden,
        "intermediate_size": 3 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "bos_token_id": bytelevel::BOS, "eos_token_id": bytelevel::EOS,
    });
    Ok(ModelConfig::from_json(
        &json.to_string(),
        Path::new("bench config"),
    )?)
}

/// Writes a random pool named `name` to `dir` unless `pool.yaml` is there
/// already: `base` and experts `e1..e4`, expert `i`'s weights from
/// `expert(i, config, base)`, each with the byte-level tokenizer.
pub(super) fn write_pool(
    dir: &Path,
    name: &str,
    hidden: usize,
    layers: usize,
    expert: impl Fn(usize, &ModelConfig, &Weights) -> anyhow::Result<Weights>,
) -> anyhow::Result<()> {
    if dir.join("pool.yaml").is_file() {
        return Ok(());
    }
    let cfg = random_config(hidden, layers)?;
    let base = random_weights(&cfg, 1, 0.3)?;
    let write = |name: &str, w: &Weights| -> anyhow::Result<()> {
        let d = dir.join("models").join(name);
        write_checkpoint(&d, &cfg, w, DType::F32)?;
        bytelevel::write_tokenizer_files(&d, 512)?;
        Ok(())
    };
    write("base", &base)?;
    for (i, e) in EXPERTS.iter().enumerate() {
        write(e, &expert(i, &cfg, &base)?)?;
    }
    evaluator::pool::PoolFile {
        name: name.into(),
        base: "models/base".into(),
        experts: EXPERTS
            .iter()
            .map(|e| (e.to_string(), format!("models/{e}").into()))
            .collect(),
        taskpool: None,
        calibration: None,
    }
    .write(&dir.join(evaluator::pool::POOL_FILE))?;
    Ok(())
}

/// Tensors by name.
pub(super) type Weights = std::collections::HashMap<String, Tensor>;

/// Writes `base` and experts `e1..e4` (base + N(0, 0.02²) deltas).
fn write_random_pool(dir: &Path, hidden: usize, layers: usize) -> anyhow::Result<()> {
    write_pool(dir, "bench", hidden, layers, |i, cfg, base| {
        let delta = random_weights(cfg, 10 + i as u64, 0.02)?;
        Ok(base
            .iter()
            .map(|(k, v)| {
                let d = if k.ends_with("norm.weight") {
                    (&delta[k] - 1.0)?
                } else {
                    delta[k].clone()
                };
                Ok((k.clone(), (v + d)?))
            })
            .collect::<candle_core::Result<_>>()?)
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// p50 and p99 of `ms` (0 and 0 for none).
pub(super) fn summary(mut ms: Vec<f64>) -> (f64, f64) {
    if ms.is_empty() {
        return (0.0, 0.0);
    }
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 0.5), percentile(&ms, 0.99))
}

/// The `max_batch_tokens` entry of a bench server's `limits` (with its
/// leading comma), or nothing for the gateway's default.
pub(super) fn step_limit(max_batch_tokens: Option<usize>) -> String {
    max_batch_tokens.map_or(String::new(), |t| format!(", max_batch_tokens: {t}"))
}

fn completion_body(model: &str) -> serde_json::Value {
    json!({"model": model, "prompt": "2+3=", "max_tokens": 1, "temperature": 0})
}

/// Runs `fusion bench serve`.
pub fn run(args: ServeBenchArgs) -> anyhow::Result<()> {
    if !args.mixed_only {
        run_single(&args)?;
    }
    if args.mixed_merges > 0 && !args.decode_only {
        let mut work = args.work.clone().into_os_string();
        work.push(format!("-lowrank-h{}-l{}", args.hidden, args.layers));
        super::mixed::run(&super::mixed::MixedArgs {
            work: Path::new(&work),
            hidden: args.hidden,
            layers: args.layers,
            merges: args.mixed_merges,
            rounds: args.mixed_rounds,
            tokens: args.decode_tokens,
            rank: args.mixed_rank,
            vector_rank: args.mixed_vector_rank,
            density: args.mixed_density,
            max_batch_tokens: args.max_batch_tokens,
        })?;
    }
    Ok(())
}

/// Parts 1 to 3.
fn run_single(args: &ServeBenchArgs) -> anyhow::Result<()> {
    let pool_dir = match &args.pool {
        Some(p) => p.clone(),
        None => {
            // One folder per shape: a pool written at another size is
            // never reused.
            let mut work = args.work.clone().into_os_string();
            work.push(format!("-h{}-l{}", args.hidden, args.layers));
            let work = PathBuf::from(work);
            eprintln!(
                "writing a random pool (hidden {}, {} layers) to {} ...",
                args.hidden,
                args.layers,
                work.display()
            );
            write_random_pool(&work, args.hidden, args.layers)?;
            work
        }
    };
    let mut probe = Config::from_yaml(
        "server: {bind: '127.0.0.1:0'}\n",
        "bench",
        &pool_dir,
        Vec::new(),
    )?;
    crate::cli::demo::add_demo_pool(&mut probe, &pool_dir)?;
    let (pool_name, pool) = probe.pools.iter().next().context("the pool is empty")?;
    let mut experts: Vec<&String> = pool.experts.keys().collect();
    experts.sort();
    if experts.len() < 2 {
        bail!("the pool needs at least two experts");
    }
    let base_cfg = ModelConfig::from_dir(&pool.base)?;
    let model_bytes = (base_cfg.num_parameters() * 4) as u64;
    let merges: Vec<String> = [0.3, 0.4, 0.5, 0.6]
        .iter()
        .map(|s| {
            format!(
                "{pool_name}/task_arithmetic({},{};scaling_coefficient={s})",
                experts[0], experts[1]
            )
        })
        .collect();
    // Room for two models, not three.
    let cache = model_bytes * 5 / 2;
    let step = step_limit(args.max_batch_tokens);
    let yaml = format!(
        "device: cpu\nserver: {{bind: '127.0.0.1:0', limits: {{max_concurrent_generations: {c}, queue_depth: 1024{step}}}}}\n\
         cache: {{max_bytes: {cache}}}\nmerge: {{max_concurrent: 1, max_wait: 120s}}\n",
        c = args.clients
    );
    let mut config = Config::from_yaml(&yaml, "bench", &pool_dir, Vec::new())?;
    crate::cli::demo::add_demo_pool(&mut config, &pool_dir)?;
    let server = gateway::spawn(config)?;
    let url = server.url();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "pool `{pool_name}` at {}: {:.2}M parameters per model ({:.1} MB resident, f32 on cpu); cache {:.1} MB (2 models); {threads} threads",
        pool_dir.display(),
        base_cfg.num_parameters() as f64 / 1e6,
        model_bytes as f64 / 1e6,
        cache as f64 / 1e6,
    );

    let rt = tokio::runtime::Runtime::new()?;
    if args.decode_only {
        decode_sweep(args, &server, &rt, pool_name, &pool.base)?;
        server.stop();
        return Ok(());
    }

    // 1. Cache-hit latency against the in-process call.
    let http = reqwest::blocking::Client::new();
    let post = |model: &str| -> anyhow::Result<reqwest::blocking::Response> {
        let res = http
            .post(format!("{url}/v1/completions"))
            .json(&completion_body(model))
            .send()?;
        if !res.status().is_success() {
            bail!("HTTP {}: {}", res.status(), res.text()?);
        }
        Ok(res)
    };
    let warm = post(&merges[0])?;
    let id = warm
        .headers()
        .get(gateway::MERGE_ID_HEADER)
        .context("no x-merge-id")?
        .to_str()?
        .to_string();
    drop(warm);
    let served = rt
        .block_on(server.state().models.resident(&id))
        .context("the merge is not resident")?;
    let params = SamplingParams::greedy(1);
    let mut in_process = Vec::with_capacity(args.requests);
    let mut over_http = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let t = Instant::now();
        let ids = served.engine.text_prompt("2+3=")?;
        served.engine.generate(&ids, &params, &mut |_| true)?;
        in_process.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let res = post(&id)?;
        let cache_status = res
            .headers()
            .get(gateway::MERGE_CACHE_HEADER)
            .map(|v| v.to_str().unwrap_or("").to_string());
        res.bytes()?;
        over_http.push(t.elapsed().as_secs_f64() * 1e3);
        if cache_status.as_deref() != Some("hit") {
            bail!("expected cache hits, got {cache_status:?}");
        }
    }
    let (ip50, ip99) = summary(in_process);
    let (hp50, hp99) = summary(over_http);
    println!(
        "\ncache-hit latency, {} sequential /v1/completions of 1 token on a resident merge:",
        args.requests
    );
    println!("  in-process (tokenize + generate): p50 {ip50:.3} ms  p99 {ip99:.3} ms");
    println!("  HTTP through the gateway:         p50 {hp50:.3} ms  p99 {hp99:.3} ms");
    println!(
        "  gateway overhead:                 p50 {:.3} ms  p99 {:.3} ms",
        hp50 - ip50,
        hp99 - ip99
    );

    // 2. Throughput over 4 merges with room for 2.
    let merges_before = merges_run(&rt, &server);
    let report = rt.block_on(load(
        &url,
        &merges,
        args.clients,
        Duration::from_secs(args.seconds),
    ));
    let merges_after = merges_run(&rt, &server);
    println!(
        "\nthroughput, {} clients over 4 merges, cache holds 2, {} s (built-in client):",
        args.clients, args.seconds
    );
    println!(
        "  {:.1} req/s; {} requests: {:?}; cache {:?}; {} merges run; latency p50 {:.1} ms p99 {:.1} ms",
        report.requests as f64 / report.seconds,
        report.requests,
        report.statuses,
        report.cache,
        merges_after - merges_before,
        report.p50,
        report.p99,
    );
    if let Some(line) = run_wrk(&url, &merges, args.clients, args.seconds)? {
        let merges_wrk = merges_run(&rt, &server) - merges_after;
        println!("  wrk: {line}; {merges_wrk} merges run");
    } else {
        println!("  wrk: not installed (Debian package `wrk`), skipped");
    }

    drop(served);
    decode_sweep(args, &server, &rt, pool_name, &pool.base)?;
    server.stop();
    Ok(())
}

/// A prompt of client `i` encoding to at least `tokens` tokens.
fn long_prompt(
    engine: &gateway::engine::Engine,
    i: usize,
    tokens: usize,
) -> anyhow::Result<String> {
    const TEXT: &str = "the quick brown fox jumps over the lazy dog and runs far away ";
    let mut p = format!("{i}: ");
    for c in TEXT.chars().cycle() {
        if engine.text_prompt(&p)?.len() >= tokens {
            break;
        }
        p.push(c);
    }
    Ok(p)
}

/// Part 3: the pool's base to 1..16 concurrent streaming clients, against
/// its unbatched loop and candle-transformers' Llama on the same weights.
fn decode_sweep(
    args: &ServeBenchArgs,
    server: &gateway::RunningServer,
    rt: &tokio::runtime::Runtime,
    pool_name: &str,
    base_dir: &Path,
) -> anyhow::Result<()> {
    let url = server.url();
    let base = format!("{pool_name}/{}", gateway::registry::BASE_NAME);
    let http = reqwest::blocking::Client::new();
    let warm = http
        .post(format!("{url}/v1/completions"))
        .json(&completion_body(&base))
        .send()?;
    if !warm.status().is_success() {
        bail!("{base}: HTTP {}: {}", warm.status(), warm.text()?);
    }
    let handle = rt.block_on(server.state().models.model(Some(&base), None))?;
    let engine = handle.served.engine.clone();
    drop(handle);
    let most = args.decode_sweep.iter().copied().max().unwrap_or(1).max(1);
    let prompts: Vec<String> = (0..most)
        .map(|i| long_prompt(&engine, i, args.decode_prompt))
        .collect::<anyhow::Result<_>>()?;
    let prompt_ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| engine.text_prompt(p))
        .collect::<Result<_, _>>()?;
    let mean_prompt =
        prompt_ids.iter().map(Vec::len).sum::<usize>() as f64 / prompt_ids.len() as f64;

    // The peers, one sequence at a time on the same weights.
    let ck = runtime::checkpoint::Checkpoint::open("base", base_dir)?;
    let mut weights = std::collections::HashMap::new();
    for name in ck.tensors().keys() {
        weights.insert(
            name.clone(),
            ck.tensor(name)?.to_f32_tensor(&candle_core::Device::Cpu)?,
        );
    }
    let pair = super::generate::Pair::from_weights(
        ModelConfig::from_dir(base_dir)?,
        weights,
        &candle_core::Device::Cpu,
    )?;
    let peers = super::generate::compare(&pair, &prompt_ids[0], args.decode_tokens, 2)?;
    drop(pair);
    let greedy = SamplingParams::greedy(args.decode_tokens);
    let t = Instant::now();
    let mut alone = Vec::with_capacity(most);
    for ids in &prompt_ids {
        alone.push(engine.generate(ids, &greedy, &mut |_| true)?);
    }
    let alone_s = t.elapsed().as_secs_f64();
    let alone_tokens: usize = alone.iter().map(|c| c.completion_tokens).sum();
    let alone_rate = alone_tokens as f64 / alone_s;
    println!(
        "\ndecoding on `{base}`, greedy completions of up to {} tokens after {mean_prompt:.0}-token prompts:",
        args.decode_tokens
    );
    println!(
        "  candle-transformers' Llama, one sequence:  {:.0} tokens/s",
        peers.reference_tps()
    );
    println!(
        "  our model's plain loop, one sequence:      {:.0} tokens/s ({:.2}x candle; same tokens: {})",
        peers.ours_tps(),
        peers.ratio(),
        peers.same_tokens
    );
    println!("  engine unbatched, {most} one after another: {alone_rate:.0} tokens/s");
    let metrics = &server.state().metrics;
    let mut one_client = None;
    for &n in &args.decode_sweep {
        let n = n.max(1);
        let requests: Vec<(String, String)> = prompts[..n]
            .iter()
            .map(|p| (base.clone(), p.clone()))
            .collect();
        let (steps0, width0) = (
            metrics.batch_sequences.get_sample_count(),
            metrics.batch_sequences.get_sample_sum(),
        );
        let t = Instant::now();
        let replies = rt.block_on(super::stream::clients(
            &url,
            &requests,
            args.decode_tokens,
            args.decode_rounds.max(1),
        ))?;
        let seconds = t.elapsed().as_secs_f64();
        let steps = metrics.batch_sequences.get_sample_count() - steps0;
        let width = (metrics.batch_sequences.get_sample_sum() - width0) / steps.max(1) as f64;
        let tokens: usize = replies.iter().map(|r| r.tokens).sum();
        let rate = tokens as f64 / seconds;
        let base_rate = *one_client.get_or_insert(rate);
        let same = replies
            .iter()
            .enumerate()
            .filter(|(k, r)| r.text == alone[k / args.decode_rounds.max(1)].text)
            .count();
        let (t50, t99, g50, g99) = super::stream::latencies(&replies);
        println!(
            "  {n:>2} clients over HTTP, batched: {rate:>6.0} tokens/s = {:.2}x 1 client, {:.2}x candle; \
             TTFT p50 {t50:.1} ms p99 {t99:.1} ms; ITL p50 {g50:.1} ms p99 {g99:.1} ms; \
             mean batch {width:.2}; texts as alone {same}/{}",
            rate / base_rate,
            rate / peers.reference_tps(),
            replies.len()
        );
    }
    Ok(())
}

fn merges_run(rt: &tokio::runtime::Runtime, server: &gateway::RunningServer) -> u64 {
    rt.block_on(server.state().models.refresh_gauges());
    server
        .state()
        .metrics
        .merges
        .with_label_values(&["task_arithmetic", "success"])
        .get()
}

struct LoadReport {
    requests: usize,
    seconds: f64,
    statuses: BTreeMap<u16, usize>,
    cache: BTreeMap<String, usize>,
    p50: f64,
    p99: f64,
}

/// `clients` tasks, client `i` cycling over the merges from merge `i % 4`.
async fn load(url: &str, merges: &[String], clients: usize, duration: Duration) -> LoadReport {
    let http = reqwest::Client::new();
    let start = Instant::now();
    let deadline = start + duration;
    let merges = Arc::new(merges.to_vec());
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (http, merges, url) = (http.clone(), merges.clone(), url.to_string());
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut k = i;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let res = http
                        .post(format!("{url}/v1/completions"))
                        .json(&completion_body(&merges[k % merges.len()]))
                        .send()
                        .await;
                    k += 1;
                    let Ok(res) = res else { continue };
                    let status = res.status().as_u16();
                    let cache = res
                        .headers()
                        .get(gateway::MERGE_CACHE_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string();
                    let _ = res.bytes().await;
                    out.push((status, cache, t.elapsed().as_secs_f64() * 1e3));
                }
                out
            })
        })
        .collect();
    let mut statuses = BTreeMap::new();
    let mut cache = BTreeMap::new();
    let mut ms = Vec::new();
    for t in tasks {
        for (s, c, l) in t.await.unwrap_or_default() {
            *statuses.entry(s).or_insert(0) += 1;
            *cache.entry(c).or_insert(0) += 1;
            ms.push(l);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let requests = ms.len();
    let (p50, p99) = if ms.is_empty() {
        (0.0, 0.0)
    } else {
        summary(ms)
    };
    LoadReport {
        requests,
        seconds,
        statuses,
        cache,
        p50,
        p99,
    }
}

/// Runs wrk with a script rotating over the merges; its summary line.
fn run_wrk(
    url: &str,
    merges: &[String],
    clients: usize,
    seconds: u64,
) -> anyhow::Result<Option<String>> {
    if Command::new("wrk").arg("--version").output().is_err() {
        return Ok(None);
    }
    let bodies: Vec<String> = merges
        .iter()
        .map(|m| format!("[[{}]]", completion_body(m)))
        .collect();
    let script = format!(
        "local bodies = {{ {} }}\nlocal i = 0\nrequest = function()\n  i = i + 1\n  \
         return wrk.format(\"POST\", \"/v1/completions\", {{[\"Content-Type\"] = \"application/json\"}}, bodies[(i % #bodies) + 1])\nend\n",
        bodies.join(", ")
    );
    let path = std::env::temp_dir().join(format!("fusion-bench-{}.lua", std::process::id()));
    std::fs::write(&path, script)?;
    let threads = clients.clamp(1, 2);
    let out = Command::new("wrk")
        .args(["-t", &threads.to_string(), "-c", &clients.to_string()])
        .args(["-d", &format!("{seconds}s"), "--latency", "-s"])
        .arg(&path)
        .arg(format!("{url}/v1/completions"))
        .output()
        .context("running wrk")?;
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let grab = |key: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .map(|l| l.trim().to_string())
    };
    let mut parts = vec![grab("Requests/sec:").unwrap_or_else(|| "no Requests/sec line".into())];
    parts.extend(grab("50%"));
    parts.extend(grab("99%"));
    parts.extend(grab("Non-2xx"));
    Ok(Some(parts.join("; ")))
}
