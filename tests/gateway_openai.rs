//! The OpenAI routes on a real server: greedy chat and completions give the
//! text `fusion generate` gives on the same checkpoint; a merge named in a
//! request answers like `fusion merge` + `fusion generate` on its output;
//! streaming sends the same text as chunks with usage and `[DONE]`.

mod gateway_util;

use gateway_util::*;
use runtime::generate::TextModel;
use runtime::model::ModelOptions;
use serde_json::{json, Value};

const PROMPT: &str = "What is 2+3?";

/// Tokens of the chat template `<s><|user|>PROMPT<|assistant|>`: BOS, the
/// user marker, one token per byte, the assistant marker.
fn chat_prompt_tokens(prompt: &str) -> u64 {
    3 + prompt.len() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_on_a_checkpoint_matches_fusion_generate() {
    let pool = Pool::small();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let r = c.chat("demo/math", PROMPT, 24).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let want = fusion_generate_chat(&pool.path("math"), PROMPT, 24);
    assert_eq!(content(&v), want);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "demo/math");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let usage = &v["usage"];
    assert_eq!(usage["prompt_tokens"], chat_prompt_tokens(PROMPT));
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&completion));
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        completion + chat_prompt_tokens(PROMPT)
    );
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(finish, if completion == 24 { "length" } else { "stop" });
    assert_eq!(r.header("x-merge-cache").as_deref(), Some("miss"));
    assert_eq!(r.header("x-merge-id"), None, "a checkpoint is not a merge");
    assert!(r.header("x-request-id").is_some_and(|id| id.len() >= 16));

    // A bare checkpoint name finds the pool; the second request is a hit.
    let again = c.chat("math", PROMPT, 24).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(content(&again.json()), want);
    assert_eq!(again.header("x-merge-cache").as_deref(), Some("hit"));

    // Streaming: the same text as chunks, usage in the final chunk, then [DONE].
    let r = c
        .post(
            "/v1/chat/completions",
            &json!({"model": "demo/math", "max_tokens": 24, "temperature": 0, "stream": true,
                "messages": [{"role": "user", "content": PROMPT}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(r.header("x-merge-cache").as_deref(), Some("hit"));
    let chunks = chat_stream_chunks(&r.text);
    let id = chunks[0]["id"].as_str().unwrap();
    let mut text = String::new();
    for ch in &chunks {
        assert_eq!(ch["object"], "chat.completion.chunk");
        assert_eq!(ch["id"], id);
        assert_eq!(ch["model"], "demo/math");
        if let Some(t) = ch["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert_eq!(text, want);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], finish);
    assert_eq!(last["usage"], *usage);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null() && c.get("usage").is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_match_fusion_generate() {
    let pool = Pool::small();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let prompt = "2+3=";
    let want = fusion_generate_prompt(&pool.path("code"), prompt, 16);
    let r = c
        .post(
            "/v1/completions",
            &json!({"model": "demo/code", "prompt": prompt, "max_tokens": 16, "temperature": 0}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    // BOS + one token per byte.
    assert_eq!(v["usage"]["prompt_tokens"], 1 + prompt.len() as u64);

    let r = c
        .post(
            "/v1/completions",
            &json!({"model": "demo/code", "prompt": [prompt], "max_tokens": 16, "temperature": 0,
                "stream": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let events = sse_events(&r.text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let ch: Value = serde_json::from_str(e).unwrap();
        assert_eq!(ch["object"], "text_completion");
        text.push_str(ch["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(text, want);
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["usage"], v["usage"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_in_the_request_answers_like_fusion_merge_then_generate() {
    let pool = Pool::small();
    let server = start(
        pool.config("presets:\n  mc: 'task_arithmetic(math,code;scaling_coefficient=0.5)'\n"),
    );
    let c = Client::new(&server);
    for (model, cli_spec) in [
        (
            "task_arithmetic(math,code;scaling_coefficient=0.5)",
            "task_arithmetic(math,code;base=base,scaling_coefficient=0.5)",
        ),
        (
            "demo/ties_merging(math,code,chat;density=0.5)",
            "ties_merging(math,code,chat;base=base,density=0.5)",
        ),
    ] {
        let out = pool.path(&format!("merged-{}", model.len()));
        fusion_merge(pool.dir.path(), cli_spec, &out);
        let want = fusion_generate_chat(&out, PROMPT, 20);
        let r = c.chat(model, PROMPT, 20).await;
        assert_eq!(r.status, 200, "{model}: {}", r.text);
        let v = r.json();
        assert_eq!(content(&v), want, "{model}");
        let id = v["model"].as_str().unwrap().to_string();
        assert!(id.starts_with("merge-") && id.len() == 6 + 32, "{id}");
        assert_eq!(r.header("x-merge-id"), Some(id.clone()));
        assert_eq!(r.header("x-merge-cache").as_deref(), Some("miss"));
    }

    // One merge, four spellings: the compact string with the base written
    // out, the preset, the structured `merge` field and `merge-<id>`; all
    // hit the cache entry made above.
    let first = c
        .chat(
            "task_arithmetic(math,code;scaling_coefficient=0.5)",
            PROMPT,
            20,
        )
        .await;
    let id = first.json()["model"].as_str().unwrap().to_string();
    let text = content(&first.json());
    let structured = json!({"model": "ignored", "max_tokens": 20, "temperature": 0,
        "merge": {"method": "task_arithmetic", "models": [{"name": "code"}, {"name": "math"}],
                  "parameters": {"scaling_coefficient": 0.5}},
        "messages": [{"role": "user", "content": PROMPT}]});
    let replies = [
        c.chat(
            "task_arithmetic(demo/math,demo/code;base=base,scaling_coefficient=0.5)",
            PROMPT,
            20,
        )
        .await,
        c.chat("mc", PROMPT, 20).await,
        c.post("/v1/chat/completions", &structured).await,
        c.chat(&id, PROMPT, 20).await,
    ];
    for r in replies {
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["model"], id.as_str());
        assert_eq!(content(&r.json()), text);
        assert_eq!(r.header("x-merge-cache").as_deref(), Some("hit"));
    }

    // The resident merges are listed with the checkpoints and the preset.
    let models = c.get("/v1/models").await.json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for want in [
        "demo/base",
        "demo/math",
        "demo/code",
        "demo/chat",
        "mc",
        id.as_str(),
    ] {
        assert!(ids.contains(&want), "{want} missing from {ids:?}");
    }
    assert_eq!(ids.iter().filter(|i| i.starts_with("merge-")).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_the_models_mean_pooled_states() {
    let pool = Pool::small();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let texts = ["hello", "a longer text"];
    let r = c
        .post(
            "/v1/embeddings",
            &json!({"model": "demo/chat", "input": texts}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let model = TextModel::load(&pool.path("chat"), &ModelOptions::default()).unwrap();
    let owned: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
    let (want, tokens) = model.embed(&owned).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["usage"]["prompt_tokens"], tokens as u64);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i as u64);
        let got: Vec<f32> = d["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), 32, "hidden size");
        assert_eq!(got, want[i]);
    }
    // One string is a list of one (alone in its batch, so equal up to the
    // rounding of a different matmul shape).
    let one = c
        .post(
            "/v1/embeddings",
            &json!({"model": "demo/chat", "input": "hello"}),
        )
        .await
        .json();
    let alone = one["data"][0]["embedding"].as_array().unwrap();
    assert_eq!(alone.len(), 32);
    for (a, b) in alone.iter().zip(&want[0]) {
        assert!((a.as_f64().unwrap() as f32 - b).abs() < 1e-5, "{a} vs {b}");
    }
}
