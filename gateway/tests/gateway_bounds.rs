//! The bounds of a real server (issue 13, points 4 and 5): parameters that
//! scale a merge's work are refused over their configured bound, a running
//! merge is cancelled by `DELETE /v1/merges/{id}` (and by the shutdown) and
//! frees its slot, structured specs and their lists are bounded, the book
//! of merges is bounded in bytes, the listing routes are paginated, one-off
//! evaluations are bounded with their metric series; `DELETE
//! /v1/merges/{id}` evicts merges only, and the 503 of a checkpoint still
//! loading points to a route that answers.

mod gateway_util;

use std::path::Path;
use std::time::{Duration, Instant};

use gateway_util::*;
use serde_json::{json, Value};

/// Iterations that keep a WUDI merge of the small pool busy for minutes.
const LONG: &str = "wudi(math,code;iterations=100000000)";

/// A config letting WUDI run [`LONG`] (`extra` YAML besides).
fn long_config(pool: &Pool, server: &str, extra: &str) -> gateway::Config {
    let limits = "limits: {max_iterations: 100000000}";
    let server = if server.is_empty() {
        limits.to_string()
    } else {
        format!("{limits}, {server}")
    };
    pool.config_with_server(&server, extra)
}

/// Polls `GET /v1/merges/{id}` until its status is `status`.
async fn wait_for(c: &Client, id: &str, status: &str, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        let r = c.get(&format!("/v1/merges/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let v = r.json();
        if v["status"] == status {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "merge {id} is not {status} after {within:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `model` with `POST /v1/merges`; its id.
async fn create(c: &Client, model: &str) -> String {
    let r = c.post("/v1/merges", &json!({ "model": model })).await;
    assert!([200, 202].contains(&r.status), "{}", r.text);
    r.json()["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_parameters_over_their_bound_are_413_naming_parameter_and_bound() {
    let pool = Pool::small();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let cases = [
        (
            LONG,
            "`iterations` = 100000000",
            "server.limits.max_iterations",
        ),
        (
            "wudi(math,code;iter_num=1001)",
            "`iter_num` = 1001",
            "server.limits.max_iterations",
        ),
        (
            "we_moe(math,code;batch_size=100000)",
            "`batch_size` = 100000",
            "server.limits.max_batch_size",
        ),
        (
            "rankone_moe(math,code;steps=0,rank_k=100000)",
            "`rank_k` = 100000",
            "server.limits.max_rank",
        ),
    ];
    for (model, param, key) in cases {
        for r in [
            c.post("/v1/merges", &json!({ "model": model })).await,
            c.chat(model, "hi", 2).await,
        ] {
            let e = r.assert_error(413, "request_too_large");
            let m = e["message"].as_str().unwrap();
            assert!(m.contains(param) && m.contains(key), "{model}: {m}");
            assert_eq!(e["param"], "model", "{e}");
        }
    }
    // The default bound (1000 iterations) itself is accepted, and nothing
    // was merged or remembered for the refused ones.
    assert!(c.get("/v1/merges").await.json()["data"]
        .as_array()
        .unwrap()
        .is_empty());
    let id = create(&c, "wudi(math,code;iterations=1000)").await;
    wait_for(&c, &id, "ready", Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_cancels_a_running_merge_and_frees_its_slot() {
    let pool = Pool::small();
    let server = start(long_config(&pool, "", "merge: {max_wait: 120s}\n"));
    let c = Client::new(&server);
    let id = create(&c, LONG).await;
    wait_for(&c, &id, "running", Duration::from_secs(30)).await;
    // A request waiting for the merge.
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move { c.chat(LONG, "hi", 2).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let d = c.delete(&format!("/v1/merges/{id}")).await;
    assert_eq!(d.status, 200, "{}", d.text);
    let v = d.json();
    assert_eq!(v["object"], "merge.deleted");
    assert_eq!(v["status"], "cancelled");
    assert_eq!(v["deleted"], false);
    let info = wait_for(&c, &id, "cancelled", Duration::from_secs(10)).await;
    assert!(
        info["error"].as_str().unwrap().contains("cancelled"),
        "{info}"
    );
    // The waiter gets a clear error, at once.
    let r = waiter.await.unwrap();
    let e = r.assert_error(409, "conflict_error");
    assert!(e["message"].as_str().unwrap().contains("cancelled"), "{e}");
    // The only merge slot is free: another merge runs and is served.
    let other = create(&c, "simple_average(math,code)").await;
    wait_for(&c, &other, "ready", Duration::from_secs(30)).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let chat = c.chat(&other, "hi", 2).await;
    assert_eq!(chat.status, 200, "{}", chat.text);
    // The cancelled merge is not cached, and is counted.
    assert_eq!(
        c.get(&format!("/v1/merges/{id}")).await.json()["status"],
        "cancelled"
    );
    assert_eq!(
        c.metric(r#"fusion_merges_total{method="wudi",outcome="cancelled"}"#)
            .await,
        1.0
    );
    // Deleting it again: nothing runs, nothing is resident.
    let d = c.delete(&format!("/v1/merges/{id}")).await;
    assert_eq!(d.json()["status"], "not_resident", "{}", d.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_cancels_a_running_merge() {
    let pool = Pool::small();
    let server = start(long_config(&pool, "shutdown_timeout: 2s", ""));
    let c = Client::new(&server);
    let id = create(&c, LONG).await;
    wait_for(&c, &id, "running", Duration::from_secs(30)).await;
    let (tx, rx) = std::sync::mpsc::channel();
    let stopping = Instant::now();
    std::thread::spawn(move || {
        server.stop();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the server did not stop: the merge was not cancelled");
    assert!(stopping.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_specs_and_their_lists_are_bounded() {
    let pool = Pool::small();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let long: Vec<f64> = (0..100_000).map(|i| (i % 7) as f64 / 10.0).collect();
    let body = json!({"merge": {"method": "task_arithmetic",
        "models": [{"name": "math"}, {"name": "code"}],
        "parameters": {"scaling_coefficient": long}}});
    let r = c.post("/v1/merges", &body).await;
    let e = r.assert_error(413, "request_too_large");
    let m = e["message"].as_str().unwrap();
    assert!(
        m.contains("parameters.scaling_coefficient")
            && m.contains("100000")
            && m.contains("server.limits.max_list_len"),
        "{m}"
    );
    assert_eq!(e["param"], "merge");
    // A per-model list, inside a filter entry, in a chat request.
    let w = vec![0.5; 300];
    let body = json!({"model": "x", "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}],
        "merge": {"method": "task_arithmetic",
            "models": [{"name": "math", "weight": [{"filter": "mlp", "value": w}, {"value": 1.0}]},
                       {"name": "code"}]}});
    let e = c
        .post("/v1/chat/completions", &body)
        .await
        .assert_error(413, "request_too_large");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("models[math].weight[0].value"),
        "{e}"
    );
    // Short lists, but a spec longer than a merge string may be.
    let filters: Vec<Value> = (0..200)
        .map(|i| json!({"filter": format!("model.layers.{i}.mlp.some_long_tensor_name"), "value": 0.5}))
        .collect();
    let body = json!({"merge": {"method": "task_arithmetic",
        "models": [{"name": "math"}, {"name": "code"}],
        "parameters": {"scaling_coefficient": filters}}});
    let e = c
        .post("/v1/merges", &body)
        .await
        .assert_error(413, "request_too_large");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("server.limits.max_spec_len"),
        "{e}"
    );
    // Nothing was remembered; a spec within the bounds merges.
    assert!(c.get("/v1/merges").await.json()["data"]
        .as_array()
        .unwrap()
        .is_empty());
    let body = json!({"merge": {"method": "task_arithmetic",
        "models": [{"name": "math"}, {"name": "code"}],
        "parameters": {"scaling_coefficient": [0.2, 0.4]}}});
    let r = c.post("/v1/merges", &body).await;
    assert_eq!(r.status, 202, "{}", r.text);
}

/// Every merge of `GET /v1/merges`, following the pages; the bytes of the
/// pages' `data`.
async fn all_merges(c: &Client, limit: usize) -> (Vec<Value>, usize) {
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            None => format!("/v1/merges?limit={limit}"),
            Some(a) => format!("/v1/merges?limit={limit}&after={a}"),
        };
        let r = c.get(&path).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let v = r.json();
        assert_eq!(v["object"], "list");
        let data = v["data"].as_array().unwrap().clone();
        assert!(data.len() <= limit);
        bytes += serde_json::to_string(&v["data"]).unwrap().len();
        if let (Some(first), Some(last)) = (data.first(), data.last()) {
            assert_eq!(v["first_id"], first["id"]);
            assert_eq!(v["last_id"], last["id"]);
        }
        out.extend(data);
        if v["has_more"] != true {
            return (out, bytes);
        }
        after = Some(v["last_id"].as_str().unwrap().to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_book_of_merges_is_bounded_in_bytes() {
    let pool = Pool::small();
    let book = 16 * 1024;
    let server = start(pool.config_with_server(&format!("limits: {{max_book_bytes: {book}}}"), ""));
    let c = Client::new(&server);
    let mut ids = Vec::new();
    for i in 0..40 {
        // A gradient of 60 entries makes each spec a few hundred bytes.
        let g: Vec<String> = (0..60)
            .map(|j| format!("0.{:03}", (i * 61 + j) % 1000))
            .collect();
        let model = format!(
            "task_arithmetic(math,code;scaling_coefficient=[{}])",
            g.join(",")
        );
        let id = create(&c, &model).await;
        wait_for(&c, &id, "ready", Duration::from_secs(60)).await;
        ids.push(id);
    }
    let (listed, bytes) = all_merges(&c, 7).await;
    assert!(
        listed.len() < ids.len() && listed.len() >= 5,
        "{} of {} merges listed",
        listed.len(),
        ids.len()
    );
    assert!(bytes <= 2 * book, "the listing is {bytes} bytes");
    // The newest are kept, newest first; the oldest are forgotten.
    let listed_ids: Vec<&str> = listed.iter().map(|m| m["id"].as_str().unwrap()).collect();
    let newest: Vec<&str> = ids
        .iter()
        .rev()
        .take(listed.len())
        .map(String::as_str)
        .collect();
    assert_eq!(listed_ids, newest);
    c.get(&format!("/v1/merges/{}", ids[0]))
        .await
        .assert_error(404, "not_found_error");
    // Still resident merges serve by their id.
    let chat = c.chat(&ids[39], "hi", 2).await;
    assert_eq!(chat.status, 200, "{}", chat.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_are_listed_a_page_at_a_time() {
    let pool = Pool::small();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let mut ids = Vec::new();
    for m in [
        "simple_average(math,code)",
        "simple_average(math,chat)",
        "simple_average(code,chat)",
        "simple_average(math,code,chat)",
        "task_arithmetic(math,code)",
    ] {
        let id = create(&c, m).await;
        wait_for(&c, &id, "ready", Duration::from_secs(60)).await;
        ids.push(id);
    }
    ids.reverse(); // newest first
    let first = c.get("/v1/merges?limit=2").await.json();
    assert_eq!(first["has_more"], true, "{first}");
    assert_eq!(first["first_id"], ids[0].as_str());
    assert_eq!(first["last_id"], ids[1].as_str());
    let second = c
        .get(&format!("/v1/merges?limit=2&after={}", ids[1]))
        .await
        .json();
    assert_eq!(second["data"][0]["id"], ids[2].as_str());
    assert_eq!(second["has_more"], true);
    let last = c
        .get(&format!("/v1/merges?limit=2&after={}", ids[3]))
        .await
        .json();
    assert_eq!(last["data"].as_array().unwrap().len(), 1);
    assert_eq!(last["data"][0]["id"], ids[4].as_str());
    assert_eq!(last["has_more"], false);
    let (all, _) = all_merges(&c, 2).await;
    let all: Vec<&str> = all.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(all, ids.iter().map(String::as_str).collect::<Vec<_>>());
    // Without a limit: 20 at most; over 100 or 0, or an unknown cursor: 400.
    let page = c.get("/v1/merges").await.json();
    assert_eq!(page["data"].as_array().unwrap().len(), 5);
    assert_eq!(page["has_more"], false);
    for q in ["limit=0", "limit=101", "after=merge-0000000000000000"] {
        let e = c
            .get(&format!("/v1/merges?{q}"))
            .await
            .assert_error(400, "invalid_request_error");
        let param = q.split('=').next().unwrap();
        assert_eq!(e["param"], param, "{e}");
    }
}

/// One multiple-choice task.
fn write_tasks(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("qa.multiple_choice.jsonl"),
        "{\"context\":\"2+2=\",\"choices\":[\"4\",\"5\"],\"gold\":0}\n",
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluations_are_paginated_and_one_offs_bounded_with_their_metrics() {
    let pool = Pool::small();
    let tasks = pool.path("tasks");
    write_tasks(&tasks);
    let data = tempfile::tempdir().unwrap();
    let scheduled: Vec<String> = ["e1", "e2", "e3"]
        .iter()
        .map(|n| format!("  - {{name: {n}, merge: base, taskpool: demo, every: 1h, delay: 1h}}\n"))
        .collect();
    let server = start(pool.config_with_server(
        &format!(
            "data_dir: '{}', limits: {{max_evaluations: 2}}",
            data.path().display()
        ),
        &format!(
            "taskpools: {{demo: '{}'}}\nevaluations:\n{}",
            tasks.display(),
            scheduled.concat()
        ),
    ));
    let c = Client::new(&server);
    let page = c.get("/v1/evaluations?limit=2").await.json();
    let names = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&page), ["e1", "e2"]);
    assert_eq!(page["has_more"], true);
    assert_eq!(page["last_id"], "e2");
    let rest = c.get("/v1/evaluations?limit=2&after=e2").await.json();
    assert_eq!(names(&rest), ["e3"]);
    assert_eq!(rest["has_more"], false);
    c.get("/v1/evaluations?limit=500")
        .await
        .assert_error(400, "invalid_request_error");
    // Three one-offs with a bound of two: the first is forgotten with its
    // metric series and its result file.
    for name in ["x1", "x2", "x3"] {
        let r = c
            .post(
                "/v1/evaluations?wait=true",
                &json!({"name": name, "merge": "demo/base", "taskpool": "demo"}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["last"]["outcome"], "success", "{}", r.text);
    }
    let all = c.get("/v1/evaluations").await.json();
    assert_eq!(names(&all), ["e1", "e2", "e3", "x2", "x3"]);
    let metrics = c.get("/metrics").await.text;
    assert!(!metrics.contains("merge=\"x1\""), "{metrics}");
    assert!(metrics.contains("merge=\"x3\""), "{metrics}");
    let files = std::fs::read_dir(data.path().join("evaluations"))
        .unwrap()
        .filter_map(|f| f.ok())
        .filter(|f| f.file_name().to_string_lossy().starts_with("x"))
        .count();
    assert_eq!(files, 2);
    // A `tasks` list over `max_list_len`.
    let many: Vec<String> = (0..300).map(|i| format!("t{i}")).collect();
    let e = c
        .post(
            "/v1/evaluations",
            &json!({"name": "x4", "merge": "demo/base", "taskpool": "demo", "tasks": many}),
        )
        .await
        .assert_error(413, "request_too_large");
    assert_eq!(e["param"], "tasks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_evicts_merges_only() {
    let pool = Pool::small();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    assert_eq!(c.chat("demo/math", "hi", 2).await.status, 200);
    for path in ["/v1/merges/demo%2Fmath", "/v1/merges/math"] {
        let e = c.delete(path).await.assert_error(404, "not_found_error");
        assert!(
            e["message"].as_str().unwrap().contains("not a merge"),
            "{e}"
        );
    }
    // The checkpoint stayed resident.
    let r = c.chat("demo/math", "hi", 2).await;
    assert_eq!(r.header("x-merge-cache").as_deref(), Some("hit"));
    assert_eq!(
        c.metric(r#"fusion_merge_cache_evictions_total{cause="explicit"}"#)
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_still_loading_503_points_to_a_route_that_answers() {
    let pool = Pool::small();
    let server = start(long_config(&pool, "", "merge: {max_wait: 300ms}\n"));
    let c = Client::new(&server);
    // The long merge holds the only merge slot: loads wait behind it.
    let long = create(&c, LONG).await;
    wait_for(&c, &long, "running", Duration::from_secs(30)).await;
    for model in ["demo/chat", "simple_average(code,chat)"] {
        let r = c.chat(model, "hi", 2).await;
        let e = r.assert_error(503, "merge_pending");
        let message = e["message"].as_str().unwrap();
        let route = message
            .split("GET ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no route in `{message}`"));
        let answer = c.get(route).await;
        assert_eq!(answer.status, 200, "{model}: GET {route}: {}", answer.text);
        if model.starts_with("demo/") {
            assert!(message.contains("checkpoint `demo/chat`"), "{message}");
            assert!(r.header("x-merge-id").is_none());
        } else {
            assert_eq!(answer.json()["status"], "pending", "{}", answer.text);
        }
    }
    let d = c.delete(&format!("/v1/merges/{long}")).await;
    assert_eq!(d.json()["status"], "cancelled", "{}", d.text);
}
