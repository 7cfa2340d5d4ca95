//! End-to-end tests of `fusion search` through the real binary, on a pool
//! of tiny random models written to disk: the outputs exist and agree with
//! each other (the trace's best-so-far column is the running best of its
//! scores; best.yaml and best.txt re-imported by `fusion eval` score what
//! the trace says), the trace does not depend on the number of jobs, and
//! bad configs fail naming the field.

mod util;

use std::path::Path;

use util::tiny_pool::{TinyTask, MOOD, MOOD_MORE, PROSE, QA, QA_MORE};
use util::*;

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// `DIR/models/{base,a,b}`, `DIR/tasks` (multiple choice, classification,
/// perplexity) and `DIR/pool.yaml`.
fn tiny_pool() -> tempfile::TempDir {
    let task = |name, kind, lines| TinyTask { name, kind, lines };
    let (qa, mood) = ([QA, QA_MORE].concat(), [MOOD, MOOD_MORE].concat());
    util::tiny_pool::tiny_pool(
        &["a", "b"],
        0.2,
        &[
            task("qa", "multiple_choice", &qa),
            task("prose", "perplexity", PROSE),
            task("mood", "classification", &mood),
        ],
    )
}

const CONFIG: &str = "pool: pool.yaml\n\
    merge: {method: task_arithmetic, parameters: {scaling_coefficient: 1.0}}\n\
    space:\n  weight: [0.0, 1.0]\n\
    budget: 7\npopulation: 3\nseed: 5\njobs: 2\n";

/// The trace: header and rows of numbers.
fn trace(dir: &Path) -> (Vec<String>, Vec<Vec<f64>>) {
    let text = std::fs::read_to_string(dir.join("trace.csv")).unwrap();
    let mut lines = text.lines();
    let header = lines
        .next()
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect();
    let rows = lines
        .map(|l| l.split(',').map(|c| c.parse().unwrap()).collect())
        .collect();
    (header, rows)
}

/// The average that `fusion eval --merge WHAT` reports.
fn eval_average(dir: &Path, what: &str) -> f64 {
    let out = fusion(
        dir,
        &[
            "eval",
            "--merge",
            what,
            "--pool",
            "pool.yaml",
            "--format",
            "json",
            "--quiet",
        ],
    );
    ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["average"].as_f64().unwrap()
}

#[test]
fn search_writes_a_trace_and_a_best_spec_that_agree() {
    let d = tiny_pool();
    write(d.path(), "search.yaml", CONFIG);
    let out = fusion(
        d.path(),
        &[
            "search",
            "--config",
            "search.yaml",
            "--out",
            "out",
            "--quiet",
        ],
    );
    let err = ok(&out);
    assert!(err.contains("best average"), "{err}");
    let (header, rows) = trace(&d.path().join("out"));
    assert_eq!(
        header,
        [
            "evaluation",
            "generation",
            "weight[a]",
            "weight[b]",
            "score",
            "best_so_far"
        ]
    );
    assert_eq!(rows.len(), 7);
    let mut running = f64::NEG_INFINITY;
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r[0], (i + 1) as f64);
        // Generations of 3: 1, 1, 1, 2, 2, 2, 3.
        assert_eq!(r[1], (i / 3 + 1) as f64);
        assert!(
            (0.0..=1.0).contains(&r[2]) && (0.0..=1.0).contains(&r[3]),
            "{r:?}"
        );
        running = running.max(r[4]);
        assert_eq!(r[5], running, "best so far at {}", i + 1);
    }
    // The candidates differ (the optimiser moves).
    assert!(rows.windows(2).any(|w| w[0][2] != w[1][2]));

    // best.txt is what stdout printed, and both it and best.yaml score the
    // trace's best when `fusion eval` re-imports them.
    let best_txt = std::fs::read_to_string(d.path().join("out/best.txt")).unwrap();
    assert_eq!(best_txt, String::from_utf8(out.stdout.clone()).unwrap());
    assert!(best_txt.starts_with("task_arithmetic(a:"), "{best_txt}");
    let yaml = std::fs::read_to_string(d.path().join("out/best.yaml")).unwrap();
    assert!(yaml.contains("merge_method: task_arithmetic"), "{yaml}");
    assert!(yaml.contains("base_model: base"), "{yaml}");
    for what in ["out/best.yaml", best_txt.trim()] {
        let avg = eval_average(d.path(), what);
        assert!((avg - running).abs() < 1e-12, "{what}: {avg} vs {running}");
    }
    let svg = std::fs::read_to_string(d.path().join("out/best.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<circle").count(), 7);
    assert!(svg.contains("<polyline"));

    // One job gives the same trace as two.
    ok(&fusion(
        d.path(),
        &[
            "search",
            "--config",
            "search.yaml",
            "--out",
            "one",
            "--jobs",
            "1",
            "--quiet",
        ],
    ));
    assert_eq!(
        std::fs::read_to_string(d.path().join("one/trace.csv")).unwrap(),
        std::fs::read_to_string(d.path().join("out/trace.csv")).unwrap()
    );
}

#[test]
fn a_lower_is_better_objective_is_minimised_and_random_search_runs() {
    let d = tiny_pool();
    write(
        d.path(),
        "search.yaml",
        &format!("{CONFIG}objective: {{task: prose}}\n"),
    );
    for algorithm in ["cmaes", "random"] {
        let out = fusion(
            d.path(),
            &[
                "search",
                "--config",
                "search.yaml",
                "--out",
                algorithm,
                "--quiet",
                "--algorithm",
                algorithm,
                "--budget",
                "6",
                "--seed",
                "1",
            ],
        );
        let err = ok(&out);
        assert!(err.contains("best prose perplexity"), "{err}");
        let (_, rows) = trace(&d.path().join(algorithm));
        assert_eq!(rows.len(), 6);
        let mut running = f64::INFINITY;
        for r in &rows {
            running = running.min(r[4]);
            assert_eq!(r[5], running);
        }
        // Perplexity moves with every weight: the scores are distinct.
        let mut scores: Vec<f64> = rows.iter().map(|r| r[4]).collect();
        scores.sort_by(f64::total_cmp);
        scores.dedup();
        assert_eq!(scores.len(), 6, "{algorithm}: {scores:?}");
    }
}

#[test]
fn bad_configs_fail_naming_the_field() {
    let d = tiny_pool();
    let head = "pool: pool.yaml\nmerge: task_arithmetic(a,b)\nbudget: 7\n";
    let cases: [(String, &[&str], &[&str]); 4] = [
        (
            format!("{head}space: {{weight: [0, 1]}}\n"),
            &["--budget", "5000"],
            &["`budget`", "5000", "1 to 1000"],
        ),
        (
            format!("{head}space: {{weight: [0, 1]}}\nobjective: {{task: nosuch}}\n"),
            &[],
            &["`objective.task`", "unknown task `nosuch`"],
        ),
        (
            format!("{head}space: {{weight: [1.0, 0.0]}}\n"),
            &[],
            &["`space.weight`", "above high"],
        ),
        (
            format!("{head}space: {{parameters: {{scaling: [0, 1]}}}}\n"),
            &[],
            &["`space`", "unknown parameter `scaling`"],
        ),
    ];
    for (body, args, want) in &cases {
        write(d.path(), "bad.yaml", body);
        let mut argv = vec!["search", "--config", "bad.yaml", "--out", "bad", "--quiet"];
        argv.extend(args.iter());
        fails_with(&fusion(d.path(), &argv), want);
        // Nothing is written before the config is valid.
        assert!(!d.path().join("bad").exists(), "{body}: --out was created");
    }
    for bad in ["grid=nan", "grid", "=0.5"] {
        let argv = ["search", "--config", "bad.yaml", "--reference", bad];
        fails_with(&fusion(d.path(), &argv), &["--reference", bad]);
    }
}
