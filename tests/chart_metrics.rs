//! Every metric the Helm chart's dashboard and alert rules query exists in
//! a real gateway's `/metrics` once it has served a little traffic (chat, a
//! merge, an eviction) and run a scheduled evaluation; `promtool check
//! metrics` accepts that exposition (skipped, with a note, without promtool).

mod gateway_util;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use gateway_util::*;
use serde_json::Value;

fn chart_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("helm/fusion-gateway")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `fusion_[a-z0-9_]+` name in `text`.
fn metric_names(text: &str, into: &mut BTreeSet<String>) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("fusion_") {
        let start = i + at;
        // Not the tail of a longer identifier.
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start + "fusion_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if boundary && end > start + "fusion_".len() {
            into.insert(text[start..end].to_string());
        }
        i = end;
    }
}

/// The `expr` of every target of every panel (rows' nested panels too).
fn dashboard_exprs(panels: &Value, out: &mut Vec<String>) {
    for panel in panels.as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = target["expr"].as_str() {
                out.push(e.to_string());
            }
        }
        dashboard_exprs(&panel["panels"], out);
    }
}

/// The `expr:` values of a rules file: inline, or a `|`/`>` block (the
/// lines indented deeper than the key).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("expr:") {
            let rest = rest.trim();
            if rest.starts_with('|') || rest.starts_with('>') {
                let indent = line.len() - trimmed.len();
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                out.push(block.join("\n"));
            } else {
                out.push(rest.to_string());
            }
        }
        i += 1;
    }
    out
}

/// The metric family of a sample name (a histogram's series count as it).
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

#[test]
fn the_rule_parser_reads_inline_and_block_exprs() {
    let yaml = "rules:\n  - alert: A\n    expr: rate(fusion_a_total[5m]) > 1\n    for: 5m\n  - alert: B\n    expr: |\n      sum(fusion_b_bucket)\n        / fusion_c\n    labels: {}\n";
    let exprs = rule_exprs(yaml);
    assert_eq!(
        exprs,
        vec![
            "rate(fusion_a_total[5m]) > 1".to_string(),
            "sum(fusion_b_bucket)\n/ fusion_c".to_string()
        ]
    );
    let mut names = BTreeSet::new();
    for e in &exprs {
        metric_names(e, &mut names);
    }
    metric_names("xfusion_not + fusion_", &mut names);
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["fusion_a_total", "fusion_b_bucket", "fusion_c"]
    );
    assert_eq!(family("fusion_b_bucket"), "fusion_b");
    assert_eq!(family("fusion_x_count"), "fusion_x");
    assert_eq!(family("fusion_y_total"), "fusion_y_total");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_the_alerts_is_exported() {
    let dashboard: Value = serde_json::from_str(&chart_file("files/dashboard.json")).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard["panels"], &mut exprs);
    let rules = rule_exprs(&chart_file("templates/prometheusrule.yaml"));
    assert!(!exprs.is_empty() && !rules.is_empty());
    let mut names = BTreeSet::new();
    for e in exprs.iter().chain(&rules) {
        metric_names(e, &mut names);
    }
    assert!(names.len() >= 10, "{names:?}");

    // A gateway with an evaluation that runs at once.
    let pool = Pool::with(32, 2, false);
    let tasks = pool.path("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    std::fs::write(
        tasks.join("qa.multiple_choice.jsonl"),
        "{\"context\":\"2+2=\",\"choices\":[\"4\",\"5\"],\"gold\":0}\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = start(pool.config_with_server(
        &format!("data_dir: '{}'", data.path().display()),
        &format!(
            "taskpools: {{t: '{}'}}\nevaluations:\n  - {{name: base, merge: demo/base, taskpool: t, every: 1h, delay: 0s, min_score: 0.5}}\n",
            tasks.display()
        ),
    ));
    let c = Client::new(&server);
    // Traffic: a checkpoint, a merge (twice: a hit), an explicit eviction.
    assert_eq!(c.chat("demo/base", "hi", 3).await.status, 200);
    let merged = c.chat("simple_average(math,code)", "hi", 3).await;
    assert_eq!(merged.status, 200);
    assert_eq!(
        c.chat("simple_average(math,code)", "yo", 3).await.status,
        200
    );
    let id = merged.header("x-merge-id").unwrap();
    assert_eq!(c.delete(&format!("/v1/merges/{id}")).await.status, 200);
    let start_wait = Instant::now();
    while c
        .metric("fusion_eval_runs_total{merge=\"base\",outcome=\"success\"}")
        .await
        < 1.0
    {
        assert!(
            start_wait.elapsed() < Duration::from_secs(120),
            "no evaluation run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = c.get("/metrics").await.text;
    let families: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let samples: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !families.contains(family(n)) || !samples.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried by the chart but not exported: {missing:?}\nexported families: {families:?}"
    );

    match which("promtool") {
        None => eprintln!("promtool not found on PATH: skipping `promtool check metrics`"),
        Some(promtool) => {
            use std::io::Write;
            let mut child = std::process::Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}
