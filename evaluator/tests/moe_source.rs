//! Routed ensembles (`we_moe`, ...) as evaluation sources: built from a
//! pool's checkpoints, routers trained on the pool's task pool inputs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use evaluator::pool::ModelPool;
use evaluator::source::{load, ModelSource};
use runtime::generate::bytelevel::{self, BOS, EOS};
use runtime::model::{random, ModelConfig};

/// A pool of a base and two experts (base + N(0, 0.05²) on every matrix)
/// with a task pool of one generate task; `taskpool` decides whether
/// pool.yaml names it.
fn write_pool(dir: &Path, taskpool: bool) -> ModelPool {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": bytelevel::VOCAB_SIZE, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 128, "bos_token_id": BOS, "eos_token_id": EOS,
    });
    let cfg = ModelConfig::from_json(&json.to_string(), Path::new("config.json")).unwrap();
    let base = random::random_weights(&cfg, 1, 0.3).unwrap();
    let write = |name: &str, w: &HashMap<String, Tensor>| {
        let d = dir.join("models").join(name);
        random::write_checkpoint(&d, &cfg, w, DType::F32).unwrap();
        bytelevel::write_tokenizer_files(&d, 128).unwrap();
    };
    write("base", &base);
    for (k, name) in ["sum", "rev"].iter().enumerate() {
        let noise = random::random_weights(&cfg, 10 + k as u64, 0.05).unwrap();
        let w = base
            .iter()
            .map(|(n, t)| {
                let t = if n.ends_with("norm.weight") {
                    t.clone()
                } else {
                    (t + &noise[n]).unwrap()
                };
                (n.clone(), t)
            })
            .collect();
        write(name, &w);
    }
    std::fs::create_dir_all(dir.join("tasks")).unwrap();
    let lines: Vec<String> = (0..8)
        .map(|i| {
            format!(
                "{{\"prompt\":\"add: {i} + 1 = \",\"answer\":\"{}\"}}",
                i + 1
            )
        })
        .collect();
    std::fs::write(
        dir.join("tasks").join("sum.generate.jsonl"),
        lines.join("\n"),
    )
    .unwrap();
    let mut yaml =
        "name: demo\nbase: models/base\nexperts:\n  sum: models/sum\n  rev: models/rev\n"
            .to_string();
    if taskpool {
        yaml.push_str("taskpool: tasks\n");
    }
    std::fs::write(dir.join("pool.yaml"), yaml).unwrap();
    ModelPool::load(&dir.join("pool.yaml")).unwrap()
}

#[test]
fn untrained_we_moe_scores_as_task_arithmetic() {
    let d = tempfile::tempdir().unwrap();
    let pool = write_pool(d.path(), true);
    let dev = Device::Cpu;
    let moe = ModelSource::parse("we_moe(sum,rev;steps=0)", &pool).unwrap();
    let ta = ModelSource::parse("task_arithmetic(sum,rev;scaling_coefficient=0.3)", &pool).unwrap();
    let moe = load(&moe, Some(&pool), &dev).unwrap().model;
    let moe = moe.text("scoring").unwrap();
    let ta = load(&ta, Some(&pool), &dev).unwrap().model;
    let ta = ta.text("scoring").unwrap();
    for (c, x) in [("add: 2 + 1 = ", "3"), ("hello", " world")] {
        let a = moe.loglikelihood(c, x).unwrap().logprob;
        let b = ta.loglikelihood(c, x).unwrap().logprob;
        assert!((a - b).abs() < 1e-4, "{c:?}: {a} vs {b}");
    }
}

#[test]
fn we_moe_trains_on_the_task_pool() {
    let d = tempfile::tempdir().unwrap();
    let pool = write_pool(d.path(), true);
    let src = ModelSource::parse("we_moe(sum,rev;steps=3,batch_size=2,lr=0.01)", &pool).unwrap();
    let model = load(&src, Some(&pool), &Device::Cpu).unwrap().model;
    let model = model.text("scoring").unwrap();
    assert!(model.loglikelihood("add: 2 + 1 = ", "3").unwrap().logprob < 0.0);
    // Without a task pool there is nothing to train on: the error says so.
    let d = tempfile::tempdir().unwrap();
    let pool = write_pool(d.path(), false);
    let src = ModelSource::parse("we_moe(sum,rev)", &pool).unwrap();
    let e = load(&src, Some(&pool), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("taskpool") && e.contains("steps: 0"), "{e}");
    // Parameters are validated when the spec is read.
    let e = ModelSource::parse("we_moe(sum,rev;rank_k=2)", &pool)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank_k"), "{e}");
}
