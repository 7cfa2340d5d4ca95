//! The merged-weight cache on a real server: one merge for sixteen
//! concurrent requests, LRU eviction under a byte budget and re-merging,
//! the merges API, and the 503 of a merge still running past max_wait.

mod gateway_util;

use std::time::{Duration, Instant};

use gateway_util::*;
use serde_json::{json, Value};

const PROMPT: &str = "Say hi";

/// Bytes of a resident test model: f32 parameters of the hidden-32 pool.
fn model_bytes() -> u64 {
    (model_config(32, 64, 2).num_parameters() * 4) as u64
}

/// Polls `GET /v1/merges/{id}` until its status is `status`.
async fn wait_for(c: &Client, id: &str, status: &str) -> Value {
    let start = Instant::now();
    loop {
        let r = c.get(&format!("/v1/merges/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let v = r.json();
        if v["status"] == status {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "merge {id} never became {status}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_requests_run_one_merge() {
    // Larger models, so the merge outlasts the dispatch of the requests.
    let pool = Pool::with(256, 4, false);
    let server = start(pool.config_with_server("limits: {max_concurrent_generations: 4}", ""));
    let c = Client::new(&server);
    let model = "ties_merging(math,code,chat;density=0.4)";
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.chat(model, PROMPT, 8).await })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    let first = replies[0].json();
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["choices"], first["choices"]);
        assert_eq!(r.json()["model"], first["model"]);
    }
    let status = |s: &str| {
        replies
            .iter()
            .filter(|r| r.header("x-merge-cache").as_deref() == Some(s))
            .count()
    };
    assert_eq!(status("miss"), 1);
    assert_eq!(status("joined") + status("hit"), 15);
    // The merge takes long enough that requests arrive while it runs.
    assert!(status("joined") >= 1, "no request joined the running merge");
    let merges = c
        .metric(r#"fusion_merges_total{method="ties_merging",outcome="success"}"#)
        .await;
    assert_eq!(merges, 1.0);
    assert_eq!(c.metric("fusion_merge_cache_misses_total").await, 1.0);
    let joins = c.metric("fusion_merge_cache_joins_total").await;
    let hits = c.metric("fusion_merge_cache_hits_total").await;
    assert_eq!(joins + hits, 15.0);
    assert_eq!(joins as usize, status("joined"));
    assert_eq!(
        c.metric(r#"fusion_merge_duration_seconds_count{method="ties_merging"}"#)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_a_small_byte_budget_and_re_merge() {
    let pool = Pool::small();
    let bytes = model_bytes();
    // Room for one model and a half.
    let server = start(pool.config(&format!("cache: {{max_bytes: {}}}\n", bytes * 3 / 2)));
    let c = Client::new(&server);
    let a = "task_arithmetic(math,chat;scaling_coefficient=0.7)";
    let b = "simple_average(code,chat)";
    let first = c.chat(a, PROMPT, 12).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let id_a = first.json()["model"].as_str().unwrap().to_string();
    assert_eq!(c.metric("fusion_merge_cache_bytes").await, bytes as f64);
    assert_eq!(c.metric("fusion_merge_cache_entries").await, 1.0);

    let second = c.chat(b, PROMPT, 12).await;
    assert_eq!(second.status, 200, "{}", second.text);
    // /metrics applies pending evictions before it reads the gauges.
    assert_eq!(
        c.metric(r#"fusion_merge_cache_evictions_total{cause="size"}"#)
            .await,
        1.0
    );
    assert_eq!(c.metric("fusion_merge_cache_entries").await, 1.0);
    assert_eq!(c.metric("fusion_merge_cache_bytes").await, bytes as f64);
    let info = c.get(&format!("/v1/merges/{id_a}")).await.json();
    assert_eq!(info["status"], "evicted", "{info}");

    // Asking again merges again and answers the same.
    let again = c.chat(a, PROMPT, 12).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.header("x-merge-cache").as_deref(), Some("miss"));
    assert_eq!(again.json()["choices"], first.json()["choices"]);
    assert_eq!(again.json()["model"], id_a.as_str());
    assert_eq!(
        c.metric(r#"fusion_merges_total{method="task_arithmetic",outcome="success"}"#)
            .await,
        2.0
    );
    assert_eq!(
        c.metric(r#"fusion_merge_cache_evictions_total{cause="size"}"#)
            .await,
        2.0
    );
    let info = c.get(&format!("/v1/merges/{id_a}")).await.json();
    assert_eq!(info["status"], "ready", "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merges_api_creates_lists_reports_and_evicts() {
    let pool = Pool::small();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let r = c
        .post("/v1/merges", &json!({"model": "simple_average(math,chat)"}))
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let v = r.json();
    let id = v["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("merge-"));
    assert_eq!(r.header("location"), Some(format!("/v1/merges/{id}")));
    assert_eq!(r.header("x-merge-id"), Some(id.clone()));
    assert!(
        ["pending", "running"].contains(&v["status"].as_str().unwrap()),
        "{v}"
    );
    assert_eq!(v["method"], "simple_average");
    assert_eq!(v["pool"], "demo");

    let ready = wait_for(&c, &id, "ready").await;
    assert_eq!(ready["bytes"], model_bytes());
    // f32 outputs: the stored size equals the resident size here.
    assert_eq!(ready["output_bytes"], model_bytes());
    assert!(ready["duration_seconds"].as_f64().unwrap() > 0.0);
    assert!(ready["error"].is_null());

    // Creating it again: resident, 200. A structured spec with the models in
    // another order is the same merge (the method does not depend on order).
    let r = c
        .post(
            "/v1/merges",
            &json!({"merge": {"method": "simple_average", "models": [{"name": "chat"}, {"name": "math"}]}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["id"], id.as_str());

    let list = c.get("/v1/merges").await.json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], id.as_str());

    // The merge serves requests by its id.
    let chat = c.chat(&id, PROMPT, 8).await;
    assert_eq!(chat.status, 200, "{}", chat.text);
    assert_eq!(chat.header("x-merge-cache").as_deref(), Some("hit"));

    // Delete evicts; the spec stays known, so the id still serves (re-merged).
    let d = c.delete(&format!("/v1/merges/{id}")).await;
    assert_eq!(d.status, 200, "{}", d.text);
    assert_eq!(d.json()["deleted"], true);
    assert_eq!(
        c.get(&format!("/v1/merges/{id}")).await.json()["status"],
        "evicted"
    );
    assert_eq!(
        c.metric(r#"fusion_merge_cache_evictions_total{cause="explicit"}"#)
            .await,
        1.0
    );
    let d = c.delete(&format!("/v1/merges/{id}")).await;
    assert_eq!(d.json()["deleted"], false);
    let chat2 = c.chat(&id, PROMPT, 8).await;
    assert_eq!(chat2.status, 200, "{}", chat2.text);
    assert_eq!(chat2.header("x-merge-cache").as_deref(), Some("miss"));
    assert_eq!(chat2.json()["choices"], chat.json()["choices"]);

    // A checkpoint is not a merge; an unknown id is 404.
    c.post("/v1/merges", &json!({"model": "demo/math"}))
        .await
        .assert_error(400, "invalid_request_error");
    c.get("/v1/merges/merge-00000000000000000000000000000000")
        .await
        .assert_error(404, "not_found_error");
    c.delete("/v1/merges/merge-00000000000000000000000000000000")
        .await
        .assert_error(404, "not_found_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_past_max_wait_is_503_with_retry_after_and_goes_on() {
    let pool = Pool::small();
    let server = start(pool.config("merge: {max_wait: 0s}\n"));
    let c = Client::new(&server);
    let model = "task_arithmetic(code,chat;scaling_coefficient=0.4)";
    let r = c.chat(model, PROMPT, 8).await;
    let err = r.assert_error(503, "merge_pending");
    assert_eq!(err["code"], "merge_running");
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    let id = r.header("x-merge-id").unwrap();
    assert!(id.starts_with("merge-"));
    // The merge went on without the request.
    wait_for(&c, &id, "ready").await;
    let ok = c.chat(model, PROMPT, 8).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.header("x-merge-cache").as_deref(), Some("hit"));
    assert_eq!(ok.json()["model"], id.as_str());
}
