//! Scheduled evaluations in a real server: a schedule fires and its scores
//! (the same as `fusion eval` prints) become metrics; results survive a
//! restart; a failing evaluation names its file and line while chat goes
//! on; `POST /v1/evaluations` runs one now; degraded merges in
//! `/health/ready` and `fail_readiness`.

mod gateway_util;

use std::path::Path;
use std::time::{Duration, Instant};

use gateway_util::*;
use serde_json::{json, Value};

/// Writes a task pool of four kinds (no taskpool.yaml: named files).
fn write_tasks(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let files = [
        (
            "qa.multiple_choice.jsonl",
            "{\"context\":\"2+2=\",\"choices\":[\"4\",\"5\",\"22\"],\"gold\":0}\n\
             {\"context\":\"sky:\",\"choices\":[\" blue\",\" red\"],\"gold\":0}\n\
             {\"context\":\"abc\",\"choices\":[\"d\",\"e\"],\"gold\":0}\n",
        ),
        (
            "sums.generate.jsonl",
            "{\"prompt\":\"1+1=\",\"answer\":\"2\"}\n{\"prompt\":\"2+3=\",\"answer\":\"5\"}\n",
        ),
        (
            "prose.perplexity.jsonl",
            "{\"text\":\"the cat sat\"}\n{\"text\":\"on the mat\"}\n",
        ),
        (
            "mood.classification.jsonl",
            "{\"input\":\"great:\",\"label\":\" pos\"}\n{\"input\":\"bad:\",\"label\":\" neg\"}\n\
             {\"input\":\"fine:\",\"label\":\" pos\"}\n",
        ),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

/// The fraction tasks of [`write_tasks`] (compared with `min_score`).
const FRACTION_TASKS: [&str; 3] = ["mood", "qa", "sums"];

/// A pool with the task pool in `tasks/`.
fn pool_with_tasks() -> Pool {
    let pool = Pool::with(32, 2, false);
    write_tasks(&pool.path("tasks"));
    pool
}

/// The config of `pool` with data in `data` and these evaluations (YAML list items).
fn config(pool: &Pool, data: &Path, server: &str, evaluations: &[String]) -> gateway::Config {
    let server = if server.is_empty() {
        format!("data_dir: '{}'", data.display())
    } else {
        format!("data_dir: '{}', {server}", data.display())
    };
    let extra = format!(
        "taskpools: {{t: '{}'}}\nevaluations:\n{}",
        pool.path("tasks").display(),
        evaluations
            .iter()
            .map(|e| format!("  - {e}\n"))
            .collect::<String>()
    );
    pool.config_with_server(&server, &extra)
}

/// The evaluation `name` of `GET /v1/evaluations`.
async fn evaluation(c: &Client, name: &str) -> Value {
    let list = c.get("/v1/evaluations").await;
    assert_eq!(list.status, 200, "{}", list.text);
    let v = list.json();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no evaluation `{name}` in {v}"))
        .clone()
}

/// Waits until evaluation `name` has a last run (other than `not_id`).
async fn wait_for_run(c: &Client, name: &str, not_id: Option<&str>) -> Value {
    let start = Instant::now();
    loop {
        let e = evaluation(c, name).await;
        let id = e["last"]["id"].as_str();
        if id.is_some() && id != not_id && e["status"] == "idle" {
            return e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "evaluation `{name}` did not run: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `fusion eval --model DIR --taskpool TASKS --format json`: tasks by name.
fn fusion_eval(model: &Path, tasks: &Path) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args(["eval", "--device", "cpu", "--format", "json", "--model"])
        .arg(model)
        .arg("--taskpool")
        .arg(tasks)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fusion eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample(name: &str, labels: &str) -> String {
    format!("{name}{{{labels}}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_its_scores_are_fusion_evals_and_survive_a_restart() {
    let pool = pool_with_tasks();
    let data = tempfile::tempdir().unwrap();
    let evals = [
        "{name: base, merge: demo/base, taskpool: t, every: 1h, delay: 0s}".to_string(),
        "{merge: 'simple_average(math,code)', taskpool: t, every: 1h, delay: 0s}".to_string(),
    ];
    let server = start(config(&pool, data.path(), "", &evals));
    let c = Client::new(&server);
    let base = wait_for_run(&c, "base", None).await;
    let merged = wait_for_run(&c, "simple_average(math,code)", None).await;
    for e in [&base, &merged] {
        assert_eq!(e["last"]["outcome"], "success", "{e}");
        assert_eq!(e["last"]["trigger"], "schedule");
        assert_eq!(e["last"]["tasks"].as_array().unwrap().len(), 4, "{e}");
    }
    for e in [&base, &merged] {
        eprintln!(
            "evaluation `{}`: {:.3} s for 4 tasks, 10 examples",
            e["name"].as_str().unwrap(),
            e["last"]["duration_seconds"].as_f64().unwrap()
        );
    }
    assert_eq!(base["last"]["model"], "demo/base");
    assert!(merged["last"]["model"]
        .as_str()
        .unwrap()
        .starts_with("merge-"));

    // The scores are those of `fusion eval` on the same checkpoint.
    let expected = fusion_eval(&pool.path("base"), &pool.path("tasks"));
    let text = c.get("/metrics").await.text;
    // The generation task and the log-likelihoods ran in the models'
    // continuous batches (no client request has generated yet), and their
    // scores are still fusion eval's. Two merges: 2 generations each, and
    // 7 (qa) + 6 (mood) scored choices each besides perplexity.
    assert!(
        metric_value(&text, "fusion_batch_sequences_count") > 0.0,
        "the evaluations' generations did not go through the batch"
    );
    let admitted = metric_value(&text, "fusion_generation_queue_seconds_count");
    assert!(
        admitted >= 30.0,
        "{admitted} sequences joined the batches: the log-likelihoods did not"
    );
    for want in expected["tasks"].as_array().unwrap() {
        let task = want["task"].as_str().unwrap();
        let got = base["last"]["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["task"] == task)
            .unwrap();
        for (metric, value) in want["metrics"].as_object().unwrap() {
            let value = value.as_f64().unwrap();
            let served = got["metrics"][metric].as_f64().unwrap();
            assert!(
                (served - value).abs() <= 1e-6 * value.abs().max(1.0),
                "{task}/{metric}: served {served}, fusion eval {value}"
            );
            let exported = metric_value(
                &text,
                &sample(
                    "fusion_eval_score",
                    &format!("merge=\"base\",metric=\"{metric}\",task=\"{task}\""),
                ),
            );
            assert!((exported - served).abs() <= 1e-9 * served.abs().max(1.0));
        }
    }
    let avg = expected["average"].as_f64().unwrap();
    assert!((base["last"]["average"].as_f64().unwrap() - avg).abs() < 1e-6);
    for name in ["base", "simple_average(math,code)"] {
        assert_eq!(
            metric_value(
                &text,
                &sample(
                    "fusion_eval_runs_total",
                    &format!("merge=\"{name}\",outcome=\"success\"")
                )
            ),
            1.0
        );
        assert_eq!(
            metric_value(
                &text,
                &sample(
                    "fusion_eval_duration_seconds_count",
                    &format!("merge=\"{name}\"")
                )
            ),
            1.0
        );
    }
    let finished = base["last"]["finished"].as_f64().unwrap();
    let stamp = metric_value(
        &text,
        "fusion_eval_last_success_timestamp_seconds{merge=\"base\"}",
    );
    assert_eq!(stamp, finished.trunc());
    // The evaluation left its merge in the cache: traffic gets a hit.
    let chat = c.chat("simple_average(math,code)", "hi", 2).await;
    assert_eq!(chat.status, 200);
    assert_eq!(chat.header("x-merge-cache").as_deref(), Some("hit"));
    server.stop();

    // A new server on the same data folder shows the results before any run.
    let again = start(config(&pool, data.path(), "", &evals));
    let c2 = Client::new(&again);
    let restored = evaluation(&c2, "base").await;
    assert_eq!(restored["last"], base["last"]);
    assert_eq!(restored["last_success"], base["last"]);
    assert_eq!(restored["status"], "idle");
    let next = restored["next_run"].as_f64().unwrap();
    assert!(
        (next - (finished + 3600.0)).abs() < 1.0,
        "next run an hour after the last one: {next} vs {finished}"
    );
    let text2 = c2.get("/metrics").await.text;
    for t in base["last"]["tasks"].as_array().unwrap() {
        let task = t["task"].as_str().unwrap();
        for (metric, value) in t["metrics"].as_object().unwrap() {
            let exported = metric_value(
                &text2,
                &sample(
                    "fusion_eval_score",
                    &format!("merge=\"base\",metric=\"{metric}\",task=\"{task}\""),
                ),
            );
            assert_eq!(exported, value.as_f64().unwrap(), "{task}/{metric}");
        }
    }
    assert_eq!(
        metric_value(
            &text2,
            "fusion_eval_last_success_timestamp_seconds{merge=\"base\"}"
        ),
        stamp
    );
    // No run happened on the new server (its counters start at zero).
    assert!(text2.contains("fusion_eval_runs_total{merge=\"base\",outcome=\"success\"} 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_evaluation_names_its_file_and_line_and_chat_goes_on() {
    let pool = Pool::with(32, 2, false);
    let broken = pool.path("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("bad.multiple_choice.jsonl"),
        "{\"context\":\"a\",\"choices\":[\"b\",\"c\"],\"gold\":0}\n{\"context\": oops}\n",
    )
    .unwrap();
    let missing = pool.path("missing");
    std::fs::create_dir_all(&missing).unwrap();
    std::fs::write(
        missing.join("taskpool.yaml"),
        "tasks:\n  - {name: gone, kind: generate, file: gone.jsonl}\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = start(pool.config_with_server(
        &format!("data_dir: '{}'", data.path().display()),
        &format!(
            "evaluations:\n  - {{name: broken, merge: demo/base, taskpool: '{}', every: 1h, delay: 0s}}\n  \
             - {{name: missing, merge: demo/base, taskpool: '{}', every: 1h, delay: 0s}}\n",
            broken.display(),
            missing.display()
        ),
    ));
    let c = Client::new(&server);
    let b = wait_for_run(&c, "broken", None).await;
    let m = wait_for_run(&c, "missing", None).await;
    assert_eq!(b["last"]["outcome"], "error");
    let err = b["last"]["error"].as_str().unwrap();
    let file = broken.join("bad.multiple_choice.jsonl");
    assert!(
        err.contains(&format!("{}:2:", file.display())),
        "file and line: {err}"
    );
    assert_eq!(m["last"]["outcome"], "error");
    let err = m["last"]["error"].as_str().unwrap();
    assert!(
        err.contains(&missing.join("gone.jsonl").display().to_string()),
        "{err}"
    );
    assert!(b["last_success"].is_null());
    let text = c.get("/metrics").await.text;
    for name in ["broken", "missing"] {
        assert_eq!(
            metric_value(
                &text,
                &sample(
                    "fusion_eval_runs_total",
                    &format!("merge=\"{name}\",outcome=\"error\"")
                )
            ),
            1.0
        );
    }
    assert!(
        !text.contains("fusion_eval_score{"),
        "no scores from failed runs"
    );
    // The server keeps serving.
    assert_eq!(c.chat("demo/base", "hello", 3).await.status, 200);
    assert_eq!(c.get("/health/ready").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_runs_an_evaluation_now() {
    let pool = pool_with_tasks();
    let data = tempfile::tempdir().unwrap();
    let server = start(config(
        &pool,
        data.path(),
        "api_keys: [usr], admin_keys: [adm]",
        &[
            "{name: base, merge: demo/base, taskpool: t, every: 1h, delay: 1h, limit: 2}"
                .to_string(),
        ],
    ));
    let user = Client::new(&server).with_key("usr");
    let c = Client::new(&server).with_key("adm");
    assert_eq!(
        user.post("/v1/evaluations", &json!({"name": "base"}))
            .await
            .status,
        403
    );
    let before = evaluation(&c, "base").await;
    assert!(
        before["last"].is_null(),
        "the schedule has not fired: {before}"
    );
    // Waiting: the answer is the evaluation after the run.
    let done = c
        .post("/v1/evaluations?wait=true", &json!({"name": "base"}))
        .await;
    assert_eq!(done.status, 200, "{}", done.text);
    let v = done.json();
    assert_eq!(v["last"]["outcome"], "success", "{v}");
    assert_eq!(v["last"]["trigger"], "request");
    for t in v["last"]["tasks"].as_array().unwrap() {
        assert_eq!(t["samples"], 2, "limit 2: {t}");
    }
    // Not waiting: 202 and the run id, which becomes the last run's id.
    let started = c.post("/v1/evaluations", &json!({"name": "base"})).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let id = started.json()["id"].as_str().unwrap().to_string();
    let first_id = v["last"]["id"].as_str().unwrap().to_string();
    let after = wait_for_run(&c, "base", Some(&first_id)).await;
    assert_eq!(after["last"]["id"], id);
    assert_eq!(
        c.metric("fusion_eval_runs_total{merge=\"base\",outcome=\"success\"}")
            .await,
        2.0
    );
    // A one-off evaluation of a merge.
    let adhoc = c
        .post(
            "/v1/evaluations?wait=true",
            &json!({"name": "ta", "merge": "task_arithmetic(math,code;scaling_coefficient=0.3)",
                    "taskpool": "t", "tasks": ["qa"], "limit": 1}),
        )
        .await;
    assert_eq!(adhoc.status, 200, "{}", adhoc.text);
    let a = adhoc.json();
    assert_eq!(a["scheduled"], false);
    assert_eq!(a["last"]["tasks"].as_array().unwrap().len(), 1);
    assert!(c.get("/v1/evaluations").await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "ta"));
    // Errors.
    c.post("/v1/evaluations?wait=maybe", &json!({"name": "base"}))
        .await
        .assert_error(400, "invalid_request_error");
    c.post("/v1/evaluations", &json!({}))
        .await
        .assert_error(400, "invalid_request_error");
    c.post("/v1/evaluations", &json!({"name": "nope"}))
        .await
        .assert_error(404, "not_found_error");
    c.post(
        "/v1/evaluations",
        &json!({"name": "base", "merge": "demo/math", "taskpool": "t"}),
    )
    .await
    .assert_error(409, "conflict_error");
    c.post(
        "/v1/evaluations",
        &json!({"merge": "demo/math", "taskpool": "elsewhere"}),
    )
    .await
    .assert_error(404, "not_found_error");
    c.post(
        "/v1/evaluations",
        &json!({"merge": "no_such_method(math)", "taskpool": "t"}),
    )
    .await
    .assert_error(400, "invalid_request_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_merges_in_readiness_and_fail_readiness() {
    let pool = pool_with_tasks();
    let data = tempfile::tempdir().unwrap();
    // Fractions never exceed 1: `strict` is degraded on every fraction
    // task; `lenient` (min 0) never is.
    let evals = |fail: bool, delay: &str| {
        vec![
            format!(
                "{{name: strict, merge: demo/base, taskpool: t, every: 1h, delay: {delay}, min_score: 1.01, fail_readiness: {fail}}}"
            ),
            format!("{{name: lenient, merge: demo/math, taskpool: t, every: 1h, delay: {delay}, min_score: 0}}"),
        ]
    };
    let server = start(config(&pool, data.path(), "", &evals(false, "0s")));
    let c = Client::new(&server);
    let strict = wait_for_run(&c, "strict", None).await;
    wait_for_run(&c, "lenient", None).await;
    let mut below: Vec<String> = strict["last"]["below_min_score"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    below.sort();
    assert_eq!(below, FRACTION_TASKS, "perplexity is never compared");
    assert_eq!(strict["degraded"], true);
    let ready = c.get("/health/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    let body = ready.json();
    assert_eq!(body["status"], "ready");
    let degraded = body["degraded"].as_array().unwrap();
    assert_eq!(degraded.len(), 1, "{body}");
    assert_eq!(degraded[0]["name"], "strict");
    assert_eq!(degraded[0]["merge"], "demo/base");
    let text = c.get("/metrics").await.text;
    assert_eq!(
        metric_value(&text, "fusion_eval_degraded{merge=\"strict\"}"),
        1.0
    );
    assert!(text.contains("fusion_eval_degraded{merge=\"lenient\"} 0"));
    server.stop();

    // With fail_readiness, the degraded result restored from disk fails
    // readiness at once (no run needed); liveness and chat are unaffected.
    let strict_server = start(config(&pool, data.path(), "", &evals(true, "1h")));
    let c2 = Client::new(&strict_server);
    let ready = c2.get("/health/ready").await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert_eq!(ready.json()["status"], "degraded");
    assert_eq!(c2.get("/health/live").await.status, 200);
    assert_eq!(c2.chat("demo/base", "hi", 2).await.status, 200);
}
