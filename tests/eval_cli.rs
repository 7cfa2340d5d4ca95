//! End-to-end tests of `fusion eval` and `fusion compare` through the real
//! binary, on a pool of tiny random models written to disk. Expected values
//! come from identities that hold by construction: task_arithmetic with
//! λ = 0 is the base; simple_average of two experts is task_arithmetic with
//! λ = 0.5; a merge made in memory scores like the same merge written by
//! `fusion merge`.

mod util;

use std::path::Path;

use candle_core::{DType, Tensor};
use runtime::generate::bytelevel::{self, BOS, EOS};
use runtime::model::{random, ModelConfig};
use serde_json::Value;
use util::*;

fn config() -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": bytelevel::VOCAB_SIZE, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256,
        "bos_token_id": BOS, "eos_token_id": EOS,
    });
    ModelConfig::from_json(&json.to_string(), Path::new("config.json")).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// `DIR/models/{base,a,b}` (experts = base + their own random delta),
/// `DIR/tasks` (four kinds, with a taskpool.yaml) and `DIR/pool.yaml`.
fn tiny_pool() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let base = random::random_weights(&cfg, 1, 0.3).unwrap();
    for (name, seed) in [("base", 0u64), ("a", 2), ("b", 3)] {
        let weights = if seed == 0 {
            base.clone()
        } else {
            let delta = random::random_weights(&cfg, seed, 0.1).unwrap();
            base.iter()
                .map(|(k, v)| (k.clone(), (v + &delta[k]).unwrap()))
                .collect::<std::collections::HashMap<String, Tensor>>()
        };
        let ckpt = dir.path().join("models").join(name);
        random::write_checkpoint(&ckpt, &cfg, &weights, DType::F32).unwrap();
        bytelevel::write_tokenizer_files(&ckpt, 256).unwrap();
    }
    let t = dir.path().join("tasks");
    write(
        &t,
        "taskpool.yaml",
        "name: tiny\ntasks:\n\
         - {name: qa, kind: multiple_choice, file: qa.jsonl}\n\
         - {name: sums, kind: generate, file: sums.jsonl}\n\
         - {name: prose, kind: perplexity, file: prose.jsonl}\n\
         - {name: mood, kind: classification, file: mood.jsonl}\n",
    );
    write(
        &t,
        "qa.jsonl",
        "{\"context\":\"2+2=\",\"choices\":[\"4\",\"5\",\"22\"],\"gold\":0}\n\
         {\"context\":\"sky:\",\"choices\":[\" blue\",\" red\"],\"gold\":0}\n\
         {\"context\":\"abc\",\"choices\":[\"d\",\"e\"],\"gold\":0}\n",
    );
    write(
        &t,
        "sums.jsonl",
        "{\"prompt\":\"1+1=\",\"answer\":\"2\"}\n{\"prompt\":\"2+3=\",\"answer\":\"5\"}\n",
    );
    write(
        &t,
        "prose.jsonl",
        "{\"text\":\"the cat sat\"}\n{\"text\":\"on the mat\"}\n",
    );
    write(
        &t,
        "mood.jsonl",
        "{\"input\":\"great:\",\"label\":\" pos\"}\n{\"input\":\"bad:\",\"label\":\" neg\"}\n\
         {\"input\":\"fine:\",\"label\":\" pos\"}\n",
    );
    write(
        dir.path(),
        "pool.yaml",
        "name: tiny\nbase: models/base\nexperts:\n  a: models/a\n  b: models/b\ntaskpool: tasks\n",
    );
    dir
}

fn json(out: &std::process::Output) -> Value {
    ok(out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Headline scores of a row or report by task.
fn scores(results: &Value) -> Vec<(String, f64)> {
    results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["task"].as_str().unwrap().to_string(),
                r["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[track_caller]
fn same_scores(a: &[(String, f64)], b: &[(String, f64)]) {
    assert_eq!(a.len(), b.len());
    for ((ta, x), (tb, y)) in a.iter().zip(b) {
        assert_eq!(ta, tb);
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{ta}: {x} vs {y}");
    }
}

#[test]
fn compare_builds_one_table_with_sweeps() {
    let d = tiny_pool();
    write(
        d.path(),
        "compare.yaml",
        concat!(
            "pool: pool.yaml\n",
            "entries:\n",
            "  - base\n",
            "  - experts\n",
            "  - simple_average(a,b)\n",
            "  - name: ta\n",
            "    merge: task_arithmetic(a,b)\n",
            "    sweep:\n",
            "      scaling_coefficient: [0.0, 0.5]\n",
        ),
    );
    let v = json(&fusion(
        d.path(),
        &["compare", "--config", "compare.yaml", "--format", "json"],
    ));
    let names: Vec<&str> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "base",
            "a",
            "b",
            "simple_average(a,b)",
            "ta (scaling_coefficient=0)",
            "ta (scaling_coefficient=0.5)"
        ]
    );
    let cols: Vec<&str> = v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["metric"].as_str().unwrap())
        .collect();
    assert_eq!(cols, ["acc", "exact_match", "perplexity", "acc"]);
    let row = |i: usize| scores(&v["rows"][i]["results"]);
    // λ = 0 is the base; the average of two experts is λ = 0.5.
    same_scores(&row(4), &row(0));
    same_scores(&row(3), &row(5));
    // The average covers the three fraction columns only.
    let r0 = row(0);
    let want = (r0[0].1 + r0[1].1 + r0[3].1) / 3.0;
    assert!((v["rows"][0]["average"].as_f64().unwrap() - want).abs() < 1e-12);
    assert!(v["rows"][0]["spec"].is_null());
    assert_eq!(
        v["rows"][4]["spec"],
        "task_arithmetic(a,b;base=base,scaling_coefficient=0)"
    );
    // The experts differ from the base: some score differs (perplexity at least).
    assert_ne!(row(1)[2].1, row(0)[2].1);

    let out = fusion(
        d.path(),
        &["compare", "--config", "compare.yaml", "--limit", "1"],
    );
    ok(&out);
    let md = String::from_utf8(out.stdout).unwrap();
    assert!(md.starts_with("| method "), "{md}");
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| ")).count(),
        2 + 6,
        "{md}"
    );
    let out = fusion(
        d.path(),
        &[
            "compare",
            "--config",
            "compare.yaml",
            "--format",
            "csv",
            "--limit",
            "1",
        ],
    );
    ok(&out);
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        csv.lines().next().unwrap(),
        "method,qa (acc),sums (exact_match),prose (perplexity),mood (acc),average"
    );
    assert_eq!(csv.lines().count(), 7);
}

#[test]
fn eval_merge_in_memory_matches_the_merged_checkpoint() {
    let d = tiny_pool();
    let spec = "ties_merging(a,b;base=base,density=0.5,scaling_coefficient=0.7)";
    ok(&fusion(
        &d.path().join("models"),
        &["merge", "--spec", spec, "--out", "../merged", "--quiet"],
    ));
    let on_disk = json(&fusion(
        d.path(),
        &[
            "eval",
            "--model",
            "merged",
            "--taskpool",
            "tasks",
            "--format",
            "json",
            "--quiet",
        ],
    ));
    let in_memory = json(&fusion(
        d.path(),
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
    ));
    same_scores(&scores(&on_disk["tasks"]), &scores(&in_memory["tasks"]));
    assert_eq!(in_memory["taskpool"], "tiny");
    assert_eq!(on_disk["tasks"][0]["samples"], 3);

    // A pool checkpoint by name, with a limit, as CSV.
    let out = fusion(
        d.path(),
        &[
            "eval",
            "--pool",
            "pool.yaml",
            "--merge",
            "a",
            "--limit",
            "2",
            "--format",
            "csv",
        ],
    );
    ok(&out);
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(
        csv.starts_with("task,kind,metric,value,samples,total\nqa,multiple_choice,acc,"),
        "{csv}"
    );
    assert!(csv.lines().nth(1).unwrap().ends_with(",2,3"), "{csv}");
}

#[test]
fn broken_tasks_fail_with_file_and_line() {
    let d = tiny_pool();
    write(
        &d.path().join("tasks"),
        "sums.jsonl",
        "{\"prompt\":\"1+1=\",\"answer\":\"2\"}\n{\"prompt\":\"2+3=\"}\n",
    );
    let out = fusion(
        d.path(),
        &["eval", "--model", "models/base", "--taskpool", "tasks"],
    );
    fails_with(&out, &["sums.jsonl:2:", "missing field `answer`"]);
    std::fs::remove_file(d.path().join("tasks/sums.jsonl")).unwrap();
    let out = fusion(
        d.path(),
        &["eval", "--pool", "pool.yaml", "--merge", "base"],
    );
    fails_with(&out, &["task `sums`", "sums.jsonl", "does not exist"]);
    let out = fusion(
        d.path(),
        &[
            "eval",
            "--pool",
            "pool.yaml",
            "--merge",
            "simple_average(a,c)",
        ],
    );
    fails_with(&out, &["unknown checkpoint `c`"]);
    let out = fusion(d.path(), &["eval", "--merge", "base"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap requires --pool with --merge"
    );
}
