//! A pool of tiny random Llama models on disk (`DIR/models/base` and each
//! expert = base + its own random delta, byte-level tokenizer files), a task
//! pool under `DIR/tasks` and `DIR/pool.yaml`: what the `fusion eval`,
//! `compare` and `search` tests run on.

use std::path::Path;

use candle_core::{DType, Tensor};
use runtime::generate::bytelevel::{self, BOS, EOS};
use runtime::model::{random, ModelConfig};

/// One task of the pool: its name, kind and JSONL lines.
pub struct TinyTask<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub lines: &'a str,
}

/// Three multiple-choice items.
pub const QA: &str = "{\"context\":\"2+2=\",\"choices\":[\"4\",\"5\",\"22\"],\"gold\":0}\n\
    {\"context\":\"sky:\",\"choices\":[\" blue\",\" red\"],\"gold\":0}\n\
    {\"context\":\"abc\",\"choices\":[\"d\",\"e\"],\"gold\":0}\n";
/// A fourth multiple-choice item.
pub const QA_MORE: &str = "{\"context\":\"xyz\",\"choices\":[\"w\",\"a\",\"q\"],\"gold\":1}\n";
/// Two generation items.
pub const SUMS: &str =
    "{\"prompt\":\"1+1=\",\"answer\":\"2\"}\n{\"prompt\":\"2+3=\",\"answer\":\"5\"}\n";
/// Two perplexity items.
pub const PROSE: &str = "{\"text\":\"the cat sat\"}\n{\"text\":\"on the mat\"}\n";
/// Three classification items.
pub const MOOD: &str = "{\"input\":\"great:\",\"label\":\" pos\"}\n\
    {\"input\":\"bad:\",\"label\":\" neg\"}\n{\"input\":\"fine:\",\"label\":\" pos\"}\n";
/// A fourth classification item.
pub const MOOD_MORE: &str = "{\"input\":\"awful:\",\"label\":\" neg\"}\n";

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// The models' config: hidden 32, 2 layers, the byte-level vocabulary.
pub fn tiny_config() -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": bytelevel::VOCAB_SIZE, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256,
        "bos_token_id": BOS, "eos_token_id": EOS,
    });
    ModelConfig::from_json(&json.to_string(), Path::new("config.json")).unwrap()
}

/// The pool: `experts` (expert i's delta drawn with seed i + 2 at scale
/// `delta` over a base of scale 0.3) and `tasks`.
pub fn tiny_pool(experts: &[&str], delta: f32, tasks: &[TinyTask]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let base = random::random_weights(&cfg, 1, 0.3).unwrap();
    let mut models = vec![("base", base.clone())];
    for (i, name) in experts.iter().enumerate() {
        let d = random::random_weights(&cfg, i as u64 + 2, delta).unwrap();
        let w = base
            .iter()
            .map(|(k, v)| (k.clone(), (v + &d[k]).unwrap()))
            .collect::<std::collections::HashMap<String, Tensor>>();
        models.push((name, w));
    }
    for (name, weights) in &models {
        let ckpt = dir.path().join("models").join(name);
        random::write_checkpoint(&ckpt, &cfg, weights, DType::F32).unwrap();
        bytelevel::write_tokenizer_files(&ckpt, 256).unwrap();
    }
    let t = dir.path().join("tasks");
    let mut yaml = "name: tiny\ntasks:\n".to_string();
    for task in tasks {
        yaml.push_str(&format!(
            "  - {{name: {}, kind: {}, file: {}.jsonl}}\n",
            task.name, task.kind, task.name
        ));
        write(&t, &format!("{}.jsonl", task.name), task.lines);
    }
    write(&t, "taskpool.yaml", &yaml);
    let mut pool = "name: tiny\nbase: models/base\nexperts:\n".to_string();
    for name in experts {
        pool.push_str(&format!("  {name}: models/{name}\n"));
    }
    pool.push_str("taskpool: tasks\n");
    write(dir.path(), "pool.yaml", &pool);
    dir
}
