//! End-to-end tests of `fusion merge` for the routed ensembles: a tiny
//! random Llama pool with the byte-level tokenizer and a task pool of
//! unlabeled inputs, through the real binary.

mod util;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use runtime::generate::bytelevel::{write_tokenizer_files, VOCAB_SIZE};
use runtime::model::random::{random_weights, write_checkpoint};
use runtime::model::{ModelConfig, ModelOptions};
use util::{fails_with, fusion, ok};

/// Writes `base`, `e1`, `e2` (experts = base + N(0, 0.05²) on every matrix)
/// and a task pool `tasks/` under `dir`.
fn write_pool(dir: &Path) {
    let c = ModelConfig::from_json(
        &format!(
            r#"{{"model_type":"llama","vocab_size":{VOCAB_SIZE},"hidden_size":16,"intermediate_size":32,
            "num_hidden_layers":2,"num_attention_heads":2,"max_position_embeddings":128,
            "bos_token_id":256,"eos_token_id":257}}"#
        ),
        Path::new("config.json"),
    )
    .unwrap();
    let base = random_weights(&c, 1, 0.3).unwrap();
    write_checkpoint(&dir.join("base"), &c, &base, DType::F32).unwrap();
    write_tokenizer_files(&dir.join("base"), 128).unwrap();
    for (k, name) in ["e1", "e2"].iter().enumerate() {
        let noise = random_weights(&c, 10 + k as u64, 0.05).unwrap();
        let w: HashMap<String, Tensor> = base
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
        write_checkpoint(&dir.join(name), &c, &w, DType::F32).unwrap();
    }
    let tasks = dir.join("tasks").join("add");
    std::fs::create_dir_all(&tasks).unwrap();
    let lines: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "{{\"prompt\":\"add: {i} + {} = ?\",\"answer\":\"{}\"}}",
                2 * i,
                3 * i
            )
        })
        .collect();
    std::fs::write(tasks.join("test.jsonl"), lines.join("\n")).unwrap();
}

#[test]
fn we_moe_trains_on_a_task_pool_and_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    write_pool(dir.path());
    let err = ok(&fusion(
        dir.path(),
        &[
            "merge",
            "--spec",
            "we_moe(e1,e2;base=base,steps=4,batch_size=3,lr=0.01)",
            "--calibration",
            "tasks",
            "--out",
            "moe",
        ],
    ));
    assert!(
        err.contains("calibration: 12 texts and 0 multiple-choice inputs"),
        "{err}"
    );
    assert!(err.contains("routers trained: 4 steps"), "{err}");
    let out = dir.path().join("moe");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let meta = &config["fusion_moe"];
    assert_eq!(meta["method"], "we_moe");
    assert_eq!(meta["num_experts"], 2);
    assert_eq!(meta["training"]["steps"], 4);
    assert_eq!(meta["training"]["sequences"], 12);
    assert!(out.join("tokenizer.json").is_file());
    // The runtime loads the folder as the routed model.
    let model = merger::load_model(&out, &ModelOptions::default()).unwrap();
    let ids = Tensor::new(&[[256u32, 97, 100, 100]], model.device()).unwrap();
    let logits = model.forward(&ids, None).unwrap();
    assert_eq!(logits.dims(), &[1, 4, VOCAB_SIZE]);
}

#[test]
fn routed_methods_need_calibration_unless_untrained() {
    let dir = tempfile::tempdir().unwrap();
    write_pool(dir.path());
    fails_with(
        &fusion(
            dir.path(),
            &["merge", "--spec", "we_moe(e1,e2;base=base)", "--out", "o"],
        ),
        &["--calibration", "steps=0"],
    );
    fails_with(
        &fusion(
            dir.path(),
            &[
                "merge",
                "--spec",
                "task_arithmetic(e1,e2;base=base)",
                "--calibration",
                "tasks",
                "--out",
                "o",
            ],
        ),
        &["--calibration is only used by"],
    );
    // A mergekit YAML with untrained routers needs no calibration.
    std::fs::write(
        dir.path().join("moe.yaml"),
        "merge_method: rankone_moe\nbase_model: base\nmodels:\n  - model: e1\n  - model: e2\nparameters:\n  steps: 0\n  rank_k: 4\n",
    )
    .unwrap();
    ok(&fusion(dir.path(), &["merge", "moe.yaml", "--out", "r1"]));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("r1").join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["fusion_moe"]["rank_k"], 4);
    assert_eq!(config["fusion_moe"]["router"]["outputs"], 8);
    // Unknown parameters are named.
    fails_with(
        &fusion(
            dir.path(),
            &[
                "merge",
                "--spec",
                "we_moe(e1,e2;base=base,steps=0,rank_k=3)",
                "--out",
                "o",
            ],
        ),
        &["`rank_k`", "we_moe"],
    );
}
