//! Continuous batching on a real server: concurrent greedy requests get,
//! token for token, what each gets alone; steps really hold several
//! sequences (the batch histograms say so); a streaming client that leaves
//! frees its key/value blocks at once. Past the running batch and the
//! queue, 429: `gateway_errors.rs`.

mod gateway_util;

use std::time::{Duration, Instant};

use gateway_util::*;
use serde_json::json;

const PROMPTS: [&str; 6] = [
    "hi",
    "What is 2+3?",
    "a somewhat longer prompt that needs several prefill chunks",
    "x",
    "Say something",
    "hi",
];

/// Polls `sample` until it reads `want`.
async fn settles(c: &Client, sample: &str, want: f64) {
    let start = Instant::now();
    loop {
        let v = c.metric(sample).await;
        if v == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{sample} is {v}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_are_batched_and_answer_as_alone() {
    let pool = Pool::small();
    let server = start(pool.config_with_server(
        "limits: {max_running_sequences: 4, max_batch_tokens: 16, kv_block_tokens: 4}",
        "",
    ));
    let c = Client::new(&server);
    let mut alone = Vec::new();
    for p in PROMPTS {
        let r = c.chat("demo/math", p, 24).await;
        assert_eq!(r.status, 200, "{}", r.text);
        alone.push(content(&r.json()));
    }
    // Every prompt twice, all at once: more than the batch holds.
    let tasks: Vec<_> = PROMPTS
        .iter()
        .chain(PROMPTS.iter())
        .map(|p| {
            let (c, p) = (c.clone(), p.to_string());
            tokio::spawn(async move { c.chat("demo/math", &p, 24).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            content(&r.json()),
            alone[i % PROMPTS.len()],
            "request {i} batched"
        );
    }
    let steps = c.metric("fusion_batch_sequences_count").await;
    let single = c.metric(r#"fusion_batch_sequences_bucket{le="1"}"#).await;
    assert!(steps > 0.0);
    assert!(single < steps, "no step held two sequences ({steps} steps)");
    let widest = c.metric(r#"fusion_batch_sequences_bucket{le="4"}"#).await;
    assert_eq!(widest, steps, "a step held more than max_running_sequences");
    let tokens_over = steps - c.metric(r#"fusion_batch_tokens_bucket{le="16"}"#).await;
    assert_eq!(tokens_over, 0.0, "a step passed max_batch_tokens");
    assert!(c.metric("fusion_inter_token_seconds_count").await > 0.0);
    assert!(c.metric("fusion_generation_queue_seconds_count").await >= 18.0);
    settles(&c, "fusion_kv_cache_bytes", 0.0).await;
    settles(&c, "fusion_generations_running", 0.0).await;
    settles(&c, "fusion_generation_queue_depth", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streaming_client_that_leaves_frees_its_blocks() {
    let pool = Pool::with(256, 4, false);
    let server = start(pool.config(""));
    let c = Client::new(&server);
    // A prompt whose greedy answer runs to max_tokens (no end of sequence).
    let mut long = None;
    for p in ["hi", "hello", "tell me more", "go on", "a", "b", "c", "d"] {
        let r = c.chat("demo/base", p, 240).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if r.json()["choices"][0]["finish_reason"] == "length" {
            long = Some(p);
            break;
        }
    }
    let prompt = long.expect("one of eight prompts runs to max_tokens");
    let generated = c.metric("fusion_generated_tokens_total").await;
    let mut res = c
        .http
        .post(format!("{}/v1/chat/completions", c.base))
        .json(
            &json!({"model": "demo/base", "max_tokens": 240, "temperature": 0,
            "stream": true, "messages": [{"role": "user", "content": prompt}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.chunk().await.unwrap().is_some());
    drop(res);
    settles(&c, "fusion_kv_cache_bytes", 0.0).await;
    settles(&c, "fusion_generations_running", 0.0).await;
    // It left before its end: its tokens were never counted as generated.
    assert_eq!(c.metric("fusion_generated_tokens_total").await, generated);
    // And the server goes on serving.
    assert_eq!(c.chat("demo/base", "hi", 4).await.status, 200);
}
