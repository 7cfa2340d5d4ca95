//! End-to-end tests of `fusion eval` and `fusion compare` through the real
//! binary, on a pool of tiny random models written to disk. Expected values
//! come from identities that hold by construction: task_arithmetic with
//! λ = 0 is the base; simple_average of two experts is task_arithmetic with
//! λ = 0.5; a merge made in memory scores like the same merge written by
//! `fusion merge`.

mod util;

use std::path::Path;

use serde_json::Value;
use util::tiny_pool::{TinyTask, MOOD, PROSE, QA, SUMS};
use util::*;

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// `DIR/models/{base,a,b}` (experts = base + their own random delta),
/// `DIR/tasks` (four kinds, with a taskpool.yaml) and `DIR/pool.yaml`.
fn tiny_pool() -> tempfile::TempDir {
    let task = |name, kind, lines| TinyTask { name, kind, lines };
    util::tiny_pool::tiny_pool(
        &["a", "b"],
        0.1,
        &[
            task("qa", "multiple_choice", QA),
            task("sums", "generate", SUMS),
            task("prose", "perplexity", PROSE),
            task("mood", "classification", MOOD),
        ],
    )
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

/// Per-task retrieval merges without a task score each task with the view
/// of the expert named like it, held as its mask over the unified vector
/// (the compare row's memory figures), and score what `fusion eval` of
/// that one view (held dense) scores; a task with no such expert is an
/// error naming it.
#[test]
fn per_task_merges_score_each_task_with_its_own_view() {
    let task = |name, kind, lines| TinyTask { name, kind, lines };
    let d = util::tiny_pool::tiny_pool(
        &["qa", "prose"],
        0.1,
        &[
            task("qa", "multiple_choice", QA),
            task("prose", "perplexity", PROSE),
        ],
    );
    write(
        d.path(),
        "compare.yaml",
        "pool: pool.yaml\nentries:\n  - emr_merging(qa,prose)\n  \
         - name: tall\n    merge: {method: tall_masks, parameters: {tall_mask_lambda: 0.4}}\n",
    );
    let v = json(&fusion(
        d.path(),
        &["compare", "--config", "compare.yaml", "--format", "json"],
    ));
    for (i, method, extra) in [
        (0, "emr_merging", ""),
        (1, "tall_masks", ",tall_mask_lambda=0.4"),
    ] {
        let row = &v["rows"][i];
        let m = &row["memory"];
        let (unified, view, dense) = (
            m["unified_bytes"].as_u64().unwrap(),
            m["view_bytes"].as_u64().unwrap(),
            m["dense_bytes"].as_u64().unwrap(),
        );
        assert!(
            unified > 0 && unified <= dense && view * 16 < dense,
            "{row}"
        );
        let got = scores(&row["results"]);
        for (t, name) in ["qa", "prose"].iter().enumerate() {
            let spec = format!("{method}(qa,prose;task={name}{extra})");
            let one = json(&fusion(
                d.path(),
                &[
                    "eval",
                    "--merge",
                    &spec,
                    "--pool",
                    "pool.yaml",
                    "--format",
                    "json",
                    "--quiet",
                ],
            ));
            let want = scores(&one["tasks"]);
            let w = want.iter().find(|(n, _)| n == name).unwrap().1;
            assert_eq!(got[t].0, *name);
            assert!(
                (got[t].1 - w).abs() <= 1e-4 * w.abs().max(1.0),
                "{method} {name}: {} vs {w}",
                got[t].1
            );
        }
    }
    // The views differ from each other: the qa view's perplexity on prose
    // is not the prose view's.
    let qa_view = json(&fusion(
        d.path(),
        &[
            "eval",
            "--merge",
            "emr_merging(qa,prose;task=qa)",
            "--pool",
            "pool.yaml",
            "--format",
            "json",
            "--quiet",
        ],
    ));
    let on_prose = scores(&qa_view["tasks"])[1].1;
    assert_ne!(on_prose, scores(&v["rows"][0]["results"])[1].1);
    let out = fusion(d.path(), &["compare", "--config", "compare.yaml"]);
    ok(&out);
    let md = String::from_utf8(out.stdout).unwrap();
    assert!(
        md.contains("`tall`: each task scored with its own view"),
        "{md}"
    );
    // `fusion eval` of the task-less merge scores the views too.
    let out = fusion(
        d.path(),
        &[
            "eval",
            "--merge",
            "emr_merging(qa,prose)",
            "--pool",
            "pool.yaml",
            "--quiet",
        ],
    );
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("one unified vector of"));

    // Tasks with no expert of their name.
    let d = tiny_pool();
    write(
        d.path(),
        "c.yaml",
        "pool: pool.yaml\nentries:\n  - emr_merging(a,b)\n",
    );
    fails_with(
        &fusion(d.path(), &["compare", "--config", "c.yaml"]),
        &["no model of the merge is named `qa`", "task=NAME"],
    );
}
