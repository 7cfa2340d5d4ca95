//! The ONNX part of the pool: the published ONNX exports served through
//! ONNX Runtime equal the candle encoder on the same weights (f32) and the
//! base (int8), agree with ONNX Runtime's Python package, and a merge of
//! the ONNX fine-tunes is served through initializers over the base graph
//! equal to the same merge computed on candle. Skipped with a printed
//! reason where the pool cannot be fetched or ONNX Runtime is missing.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use runtime::checkpoint::Checkpoint;
use runtime::encoder::{Encoder, EncoderConfig, SentenceEncoder};
use runtime::model::ModelOptions;
use runtime::onnx::{library, OnnxModel};

use super::*;

const LONG_WORDS: usize = 400;

fn texts() -> Vec<String> {
    let mut t: Vec<String> = TEXTS.iter().map(|s| s.to_string()).collect();
    t.push("The stock market fell sharply after the announcement.".into());
    // Longer than max_seq_length (128 for onnx-l3, 256 for int8): cut.
    t.push(vec!["kubernetes"; LONG_WORDS].join(" "));
    t
}

/// True when an ONNX Runtime library can be loaded (else prints why not).
pub(crate) fn ort_available() -> bool {
    match library::environment() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

fn min_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| cosine(x, y))
        .fold(f64::INFINITY, f64::min)
}

fn candle_encoder(dir: &Path) -> SentenceEncoder {
    let enc = Encoder::load(dir, &ModelOptions::default()).unwrap();
    SentenceEncoder::from_encoder(enc, dir).unwrap()
}

#[test]
fn onnx_checkpoints_equal_the_candle_encoder_on_the_same_weights() {
    let pool = pool_or_skip!();
    if !ort_available() {
        return;
    }
    let _t = Timer::start("onnx_checkpoints_equal_the_candle_encoder_on_the_same_weights");
    let texts = texts();
    let l3 = pool.join("models/onnx-l3");
    let ort = SentenceEncoder::load(&l3, &ModelOptions::default()).unwrap();
    assert_eq!(ort.encoder().runtime(), "onnxruntime");
    let candle = candle_encoder(&l3);
    assert_eq!(candle.encoder().runtime(), "candle");
    let (a, b) = (ort.embed(&texts).unwrap(), candle.embed(&texts).unwrap());
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(
        a.tokens.last(),
        Some(&128),
        "max_seq_length 128 cuts the long text"
    );
    assert_eq!(a.truncated.iter().filter(|&&c| c).count(), 1);
    let min = min_cosine(&a.vectors, &b.vectors);
    let max_abs = a
        .vectors
        .iter()
        .flatten()
        .zip(b.vectors.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    eprintln!("onnx-l3: ONNX Runtime vs candle, min cosine {min:.7}, max |diff| {max_abs:.2e}");
    assert!(min >= 0.9999, "min cosine {min}");
    // No Normalize module: the vectors are not unit length.
    assert!(a.vectors.iter().all(|v| (norm(v) - 1.0).abs() > 0.05));

    // int8 all-MiniLM-L6-v2 against the f32 safetensors base.
    let int8 =
        SentenceEncoder::load(&pool.join("models/onnx-int8"), &ModelOptions::default()).unwrap();
    let base = SentenceEncoder::load(&pool.join("models/base"), &ModelOptions::default()).unwrap();
    let (q, f) = (int8.embed(&texts).unwrap(), base.embed(&texts).unwrap());
    assert_eq!(q.tokens, f.tokens);
    let min = min_cosine(&q.vectors, &f.vectors);
    eprintln!("onnx-int8 vs the f32 base on candle: min cosine {min:.5}");
    assert!(min >= 0.99, "min cosine {min}");
    assert_unit(&q.vectors, "int8 (Normalize)");
}

#[test]
fn onnx_runtime_in_python_gives_the_same_embeddings() {
    let pool = pool_or_skip!();
    if !ort_available() {
        return;
    }
    let probe = Command::new("python3")
        .args(["-c", "import onnxruntime, tokenizers, numpy"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "skipping: python3 onnxruntime/tokenizers/numpy missing (scripts/install-tools.sh installs them)"
        );
        return;
    }
    let _t = Timer::start("onnx_runtime_in_python_gives_the_same_embeddings");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/onnx_reference.py");
    let texts = texts();
    for model in ["onnx-l3", "onnx-int8", "onnx-polarity"] {
        let dir = pool.join("models").join(model);
        let out = Command::new("python3")
            .arg(&script)
            .arg(&dir)
            .args(&texts)
            .output()
            .unwrap();
        let reference = ok_json(&out, "onnx_reference.py");
        let want = f32_lists(&reference["embeddings"]);
        let ours = SentenceEncoder::load(&dir, &ModelOptions::default())
            .unwrap()
            .embed(&texts)
            .unwrap();
        let tokens: Vec<usize> = reference["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(ours.tokens, tokens, "{model}: token counts");
        let min = min_cosine(&ours.vectors, &want);
        eprintln!(
            "{model}: vs onnxruntime {} in Python, min cosine {min:.7}",
            reference["version"]
        );
        assert!(min >= 0.9999, "{model}: min cosine {min}");
        // The graph's own pooling output (paraphrase-MiniLM-L3-v2 has one):
        // our pooling from the folder's files gives the same vector.
        let pooled = f32_lists(&reference["graph_pooled"]);
        if !pooled.is_empty() {
            let min = min_cosine(&ours.vectors, &pooled);
            assert!(
                min >= 0.9999,
                "{model}: vs the graph's pooled output, {min}"
            );
        }
    }
}

/// base + λ·Σ(expert − base), tensor by tensor, on the ONNX checkpoints'
/// Hugging Face tensors.
fn task_arithmetic(pool: &Path, experts: &[&str], lambda: f64) -> HashMap<String, Tensor> {
    let base = Checkpoint::open("base", &pool.join("models/onnx-l3")).unwrap();
    let experts: Vec<_> = experts
        .iter()
        .map(|e| Checkpoint::open(e, &pool.join(format!("models/onnx-{e}"))).unwrap())
        .collect();
    let mut out = HashMap::new();
    for name in base.tensors().keys() {
        let b = base.tensor(name).unwrap();
        let bt = b.to_f32_tensor(&Device::Cpu).unwrap();
        let mut acc = bt.clone();
        for e in &experts {
            let et = e.tensor(name).unwrap().to_f32_tensor(&Device::Cpu).unwrap();
            acc = (acc + ((et - &bt).unwrap() * lambda).unwrap()).unwrap();
        }
        out.insert(name.clone(), acc);
    }
    out
}

#[test]
fn an_onnx_merge_is_served_through_initializers() {
    let pool = pool_or_skip!();
    if !ort_available() {
        return;
    }
    let _t = Timer::start("an_onnx_merge_is_served_through_initializers");
    let spec = "task_arithmetic(polarity,news;scaling_coefficient=0.5)";
    let texts = texts();
    let text_refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let pool_yaml = pool.join("onnx-pool.yaml");
    let mut args = vec!["embed", "--format", "json", "--merge", spec, "--pool"];
    args.push(pool_yaml.to_str().unwrap());
    args.push("--input");
    args.extend(&text_refs);
    let merged = vectors(&ok_json(
        &fusion(pool, &args),
        "fusion embed --merge (onnx)",
    ));

    // The same merge on candle.
    let l3 = pool.join("models/onnx-l3");
    let tensors = task_arithmetic(pool, &["polarity", "news"], 0.5);
    let config = EncoderConfig::from_dir(&l3).unwrap();
    let enc = Encoder::from_tensors(config, tensors.clone(), &ModelOptions::default()).unwrap();
    let want = SentenceEncoder::from_encoder(enc, &l3)
        .unwrap()
        .embed(&texts)
        .unwrap();
    let min = min_cosine(&merged, &want.vectors);
    eprintln!("ONNX merge through initializers vs candle: min cosine {min:.7}");
    assert!(min >= 0.9999, "min cosine {min}");
    // It is a merge, not the base.
    let base = SentenceEncoder::load(&l3, &ModelOptions::default())
        .unwrap()
        .embed(&texts)
        .unwrap();
    let to_base = min_cosine(&merged, &base.vectors);
    assert!(to_base < 0.9999, "the merge equals the base ({to_base})");

    // What the initializer hand-over refuses, by name.
    let model = OnnxModel::open(&l3.join("model.onnx")).unwrap();
    let q = "encoder.layer.0.attention.self.query.weight";
    assert!(
        model.names()[q].transposed,
        "{q} is an anonymous MatMul weight"
    );
    let mut bad = HashMap::new();
    bad.insert(
        q.to_string(),
        Tensor::zeros((384, 383), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let e = model.initializers_for(&bad).unwrap_err().to_string();
    assert!(e.contains(q) && e.contains("shape"), "{e}");
    let mut stray = HashMap::new();
    stray.insert("pooler.dense.weight".to_string(), tensors[q].clone());
    let e = model.initializers_for(&stray).unwrap_err().to_string();
    assert!(
        e.contains("pooler.dense.weight") && e.contains("no initializer"),
        "{e}"
    );
    let int8 = OnnxModel::open(&pool.join("models/onnx-int8/model.onnx")).unwrap();
    let e = int8.check_mergeable().unwrap_err().to_string();
    assert!(e.contains("quantized") && e.contains("INT8"), "{e}");

    // The gateway: the ONNX checkpoint, the merge, and a merge over the
    // int8 model (422 naming a quantized initializer).
    let dir = tempfile::tempdir().unwrap();
    let m = |n: &str| pool.join("models").join(n).display().to_string();
    let yaml = format!(
        "device: cpu\nserver: {{bind: '127.0.0.1:0'}}\npools:\n  onnx:\n    base: '{}'\n    experts: {{polarity: '{}', news: '{}'}}\n  int8:\n    base: '{}'\n    experts: {{copy: '{}'}}\n",
        m("onnx-l3"),
        m("onnx-polarity"),
        m("onnx-news"),
        m("onnx-int8"),
        m("onnx-int8"),
    );
    let server = serve_config(dir.path(), &yaml, &[]);
    let c = http();
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": spec, "input": texts}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let served = vectors(&r.json());
    let min = min_cosine(&served, &merged);
    assert!(min >= 0.9999, "gateway vs fusion embed: {min}");
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": "int8/base", "input": texts}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let base = SentenceEncoder::load(&pool.join("models/base"), &ModelOptions::default()).unwrap();
    let min = min_cosine(&vectors(&r.json()), &base.embed(&texts).unwrap().vectors);
    assert!(min >= 0.99, "int8 served vs base: {min}");
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": "int8/task_arithmetic(copy;scaling_coefficient=0.5)", "input": "x"}),
    );
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(r.text.contains("quantized"), "{}", r.text);
    // The server keeps serving.
    let r = post(
        &c,
        &server,
        "/v1/embeddings",
        &json!({"model": "onnx/polarity", "input": "still up"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
}

#[test]
fn without_onnx_runtime_an_onnx_checkpoint_is_refused_by_name() {
    let pool = pool_or_skip!();
    let empty = tempfile::tempdir().unwrap();
    let missing = empty.path().join("libonnxruntime.so");
    let out = Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args(["embed", "--model"])
        .arg(pool.join("models/onnx-l3"))
        .args(["--input", "hello"])
        .env("ORT_DYLIB_PATH", &missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ONNX Runtime is not available") && err.contains("ORT_DYLIB_PATH"),
        "{err}"
    );
    // The candle encoder still runs the folder's weights without it.
    let out = Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args([
            "embed",
            "--runtime",
            "candle",
            "--format",
            "json",
            "--model",
        ])
        .arg(pool.join("models/onnx-l3"))
        .args(["--input", "hello"])
        .env("ORT_DYLIB_PATH", &missing)
        .output()
        .unwrap();
    let v = ok_json(&out, "fusion embed --runtime candle");
    assert_eq!(vectors(&v)[0].len(), DIM);
    assert!(String::from_utf8_lossy(&out.stderr).contains("candle"));
}

/// The MiniLM WordPiece tokenizer gives the ids the Python `tokenizers`
/// package gives for the same files and texts (post-processor `[CLS] …
/// [SEP]`, saved padding off, truncated to `max_seq_length`).
#[test]
fn the_wordpiece_token_ids_equal_python_tokenizers() {
    let pool = pool_or_skip!();
    let probe = Command::new("python3")
        .args(["-c", "import tokenizers"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipping: python3 lacks tokenizers (scripts/install-tools.sh installs it)");
        return;
    }
    let mut texts = texts();
    texts.push("Kubernetes pod CrashLoopBackOff: état, naïve, 東京".into());
    texts.push("  spaces\tand\nnewlines  ".into());
    const SCRIPT: &str = r#"
import json, sys
from tokenizers import Tokenizer
folder, max_len = sys.argv[1], int(sys.argv[2])
tok = Tokenizer.from_file(folder + "/tokenizer.json")
tok.no_padding()
tok.enable_truncation(max_len)
print(json.dumps([tok.encode(t).ids for t in sys.argv[3:]]))
"#;
    for model in ["base", "sre", "jobs", "onnx-l3"] {
        let dir = pool.join("models").join(model);
        let enc = SentenceEncoder::load(&dir, &ModelOptions::default()).unwrap();
        let max = enc.sentence_config().max_seq_length;
        let out = Command::new("python3")
            .args(["-c", SCRIPT])
            .arg(&dir)
            .arg(max.to_string())
            .args(&texts)
            .output()
            .unwrap();
        let want: Vec<Vec<u32>> = serde_json::from_value(ok_json(&out, "tokenizers")).unwrap();
        for (t, w) in texts.iter().zip(&want) {
            let (ids, cut) = enc.tokenize(t).unwrap();
            assert_eq!(&ids, w, "{model}: {t:?}");
            assert_eq!(cut, ids.len() == max && t.len() > 1000, "{model}: {t:?}");
        }
    }
}
