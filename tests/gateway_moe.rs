//! Routed merges (`we_moe`, `sparse_we_moe`, `rankone_moe`) on a real
//! server: the first request builds the MoE and trains its routers on the
//! pool's calibration task pool, the next ones hit the cache (same
//! `x-merge-id`), the cache weighs the MoE's bytes, streaming works, a
//! `router_checkpoint` naming a saved MoE loads its routers instead of
//! training, and every refusal is a 4xx naming its cause.

mod gateway_util;

use std::path::Path;

use gateway::Config;
use gateway_util::*;
use serde_json::{json, Value};

const PROMPT: &str = "Say hi";
/// Few, small steps: the tests train in well under a second.
const MOE: &str = "we_moe(math,code;steps=3,batch_size=2,lr=0.01)";

/// A task pool folder: one `generate` task whose prompts are the
/// calibration inputs (its answers are never read for calibration).
fn write_tasks(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let lines: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "{{\"prompt\":\"sort {}{}{}=\",\"answer\":\"x\"}}",
                i,
                7 - i % 7,
                i * 3
            )
        })
        .collect();
    std::fs::write(dir.join("sort.generate.jsonl"), lines.join("\n")).unwrap();
}

/// A config serving the pool as `demo`, with extra experts (`name: folder`),
/// `taskpools` when `tasks` is given, `extra` YAML and environment
/// overrides.
fn config(
    pool: &Pool,
    extra_experts: &[(&str, &Path)],
    tasks: Option<&Path>,
    limits: &str,
    env: &[(&str, &str)],
) -> Config {
    let mut experts: Vec<String> = EXPERTS
        .iter()
        .map(|e| format!("{e}: {}", pool.path(e).display()))
        .collect();
    experts.extend(
        extra_experts
            .iter()
            .map(|(n, p)| format!("{n}: {}", p.display())),
    );
    // Evaluation results go to the pool's temporary folder, never to the
    // working directory.
    let mut yaml = format!(
        "device: cpu\nserver: {{bind: '127.0.0.1:0', data_dir: '{}', limits: {{{limits}}}}}\n\
         pools:\n  demo:\n    base: {}\n    experts: {{{}}}\n",
        pool.dir.path().join("data").display(),
        pool.path("base").display(),
        experts.join(", ")
    );
    if let Some(t) = tasks {
        yaml.push_str(&format!("taskpools: {{calib: {}}}\n", t.display()));
    }
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<Vec<_>>();
    Config::from_yaml(&yaml, "test.yaml", pool.dir.path(), env).unwrap()
}

/// Resident bytes of a `we_moe` of `t` experts over the hidden-32 test pool
/// in f32: the backbone, the T MLP task vectors of each block and a
/// Linear(d→d) → Linear(d→T) router per block.
fn we_moe_bytes(t: usize) -> u64 {
    let cfg = model_config(32, 64, 2);
    let (d, m, l) = (32, 64, 2);
    let values = cfg.num_parameters() + l * t * 3 * d * m + l * (d * d + d + t * d + t);
    (values * 4) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn we_moe_trains_once_then_hits_streams_and_is_weighed() {
    let pool = Pool::with(32, 2, false);
    let tasks = pool.dir.path().join("tasks");
    write_tasks(&tasks);
    // The calibration task pool named through an environment override.
    let server = start(config(
        &pool,
        &[],
        Some(&tasks),
        "max_router_steps: 10",
        &[("FUSION_POOLS__DEMO__CALIBRATION", "calib")],
    ));
    let c = Client::new(&server);
    c.get("/metrics").await;
    assert_eq!(c.metric("fusion_merge_cache_bytes").await, 0.0);

    // Four requests at once: one build (and one training), the rest join or hit.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.chat(MOE, PROMPT, 12).await })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    let first = replies[0].json();
    let id = first["model"].as_str().unwrap().to_string();
    assert!(id.starts_with("merge-"), "{first}");
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.header("x-merge-id").as_deref(), Some(id.as_str()));
        assert_eq!(content(&r.json()), content(&first));
    }
    let misses = replies
        .iter()
        .filter(|r| r.header("x-merge-cache").as_deref() == Some("miss"))
        .count();
    assert_eq!(misses, 1);
    let merges = r#"fusion_merges_total{method="we_moe",outcome="success"}"#;
    assert_eq!(c.metric(merges).await, 1.0);
    let trainings = r#"fusion_router_training_seconds_count{method="we_moe"}"#;
    assert_eq!(c.metric(trainings).await, 1.0);

    // A later request hits, with the same id and the same greedy answer.
    let again = c.chat(MOE, PROMPT, 12).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.header("x-merge-cache").as_deref(), Some("hit"));
    assert_eq!(again.header("x-merge-id").as_deref(), Some(id.as_str()));
    assert_eq!(content(&again.json()), content(&first));
    let by_id = c.chat(&id, PROMPT, 12).await;
    assert_eq!(by_id.header("x-merge-cache").as_deref(), Some("hit"));
    assert_eq!(c.metric(merges).await, 1.0);

    // The cache weighs the MoE's bytes (experts and routers included), not a
    // dense model's.
    let want = we_moe_bytes(2);
    assert!(want > (model_config(32, 64, 2).num_parameters() * 4) as u64);
    assert_eq!(c.metric("fusion_merge_cache_bytes").await, want as f64);
    let info = c.get(&format!("/v1/merges/{id}")).await.json();
    assert_eq!(info["status"], "ready", "{info}");
    assert_eq!(info["method"], "we_moe");
    assert_eq!(info["bytes"], want);
    assert_eq!(info["output_bytes"], want);
    let routers = &info["routers"];
    assert_eq!(routers["source"], "trained", "{info}");
    assert_eq!(routers["calibration"], "calib");
    assert_eq!(routers["training"]["steps"], 3);
    assert_eq!(routers["training"]["sequences"], 12);

    // The structured spec of the same merge is the same entry (the merges API).
    let r = c
        .post(
            "/v1/merges",
            &json!({"merge": {"method": "we_moe", "models": [{"name": "math"}, {"name": "code"}],
                "parameters": {"steps": 3, "batch_size": 2, "lr": 0.01}}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["id"], id);

    // Streaming: role chunk, content chunks, the same text, then [DONE].
    let r = c
        .post(
            "/v1/chat/completions",
            &json!({"model": MOE, "max_tokens": 12, "temperature": 0, "stream": true,
                "messages": [{"role": "user", "content": PROMPT}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-merge-cache").as_deref(), Some("hit"));
    assert_eq!(r.header("x-merge-id").as_deref(), Some(id.as_str()));
    let chunks = chat_stream_chunks(&r.text);
    let text: String = chunks
        .iter()
        .filter_map(|ch| ch["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, content(&first));
    assert!(chunks.last().unwrap()["usage"]["completion_tokens"].as_u64() > Some(0));

    // A one-off evaluation of the same merge scores the resident MoE.
    let r = c
        .post(
            "/v1/evaluations?wait=true",
            &json!({"merge": MOE, "taskpool": "calib", "limit": 2}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let last = &r.json()["last"];
    assert_eq!(last["outcome"], "success", "{}", r.text);
    assert_eq!(last["model"], id.as_str());
    assert_eq!(c.metric(merges).await, 1.0);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_merges_are_refused_with_the_cause() {
    let pool = Pool::with(32, 2, false);
    let tasks = pool.dir.path().join("tasks");
    write_tasks(&tasks);
    // The only task pool is the calibration by default.
    let server = start(config(
        &pool,
        &[],
        Some(&tasks),
        "max_router_steps: 10",
        &[],
    ));
    let c = Client::new(&server);
    let good = "we_moe(math,code;steps=0)";
    let cases: &[(&str, u16, &str, &[&str])] = &[
        (
            "we_moe(math,code;steps=11)",
            413,
            "request_too_large",
            &["`steps` = 11", "server.limits.max_router_steps"],
        ),
        (
            "sparse_we_moe(math,code;tv_prune_ratio=2)",
            400,
            "invalid_request_error",
            &["tv_prune_ratio"],
        ),
        (
            "we_moe(math,code;router_checkpoint=nope)",
            404,
            "not_found_error",
            &["router_checkpoint", "`nope`"],
        ),
        (
            "we_moe(math,code;router_checkpoint=chat)",
            400,
            "invalid_request_error",
            &["router_checkpoint", "fusion_moe"],
        ),
        (
            "we_moe(math,code;rank_k=4)",
            400,
            "invalid_request_error",
            &["rank_k"],
        ),
    ];
    for (model, status, kind, words) in cases {
        let r = c.chat(model, PROMPT, 4).await;
        let e = r.assert_error(*status, kind);
        let message = e["message"].as_str().unwrap();
        for w in *words {
            assert!(message.contains(w), "{model}: {message}");
        }
        // The server still answers.
        let ok = c.chat(good, PROMPT, 4).await;
        assert_eq!(ok.status, 200, "{}", ok.text);
    }
    // A `pool/name` router checkpoint (structured spec) of another pool.
    let r = c
        .post(
            "/v1/chat/completions",
            &json!({"merge": {"method": "we_moe", "models": [{"name": "math"}, {"name": "code"}],
                "parameters": {"router_checkpoint": "other/x"}},
                "max_tokens": 4, "messages": [{"role": "user", "content": PROMPT}]}),
        )
        .await;
    let e = r.assert_error(400, "invalid_request_error");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("router_checkpoint") && message.contains("one pool"),
        "{message}"
    );
    assert_eq!(
        c.metric(r#"fusion_merges_total{method="we_moe",outcome="success"}"#)
            .await,
        1.0
    );
    // Untrained routers: nothing trained.
    assert_eq!(
        c.metric(r#"fusion_router_training_seconds_count{method="we_moe"}"#)
            .await,
        0.0
    );
    drop(server);

    // No task pool: a merge that trains is refused naming the fix; untrained
    // routers still work.
    let server = start(config(&pool, &[], None, "", &[]));
    let c = Client::new(&server);
    let r = c.chat("we_moe(math,code;steps=2)", PROMPT, 4).await;
    let e = r.assert_error(422, "unprocessable_merge");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("pools.demo.calibration") && message.contains("steps=0"),
        "{message}"
    );
    let r = c.chat(good, PROMPT, 4).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.header("x-merge-id").unwrap();
    let info = c.get(&format!("/v1/merges/{id}")).await.json();
    assert_eq!(info["routers"]["source"], "untrained", "{info}");
    assert!(info["routers"]["training"].is_null(), "{info}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_checkpoint_loads_saved_routers_without_training() {
    let pool = Pool::with(32, 2, false);
    let tasks = pool.dir.path().join("tasks");
    write_tasks(&tasks);
    // A trained MoE written by `fusion merge`.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fusion"))
        .current_dir(pool.dir.path())
        .args([
            "merge",
            "--quiet",
            "--device",
            "cpu",
            "--spec",
            "we_moe(math,code;base=base,steps=4,batch_size=2,lr=0.05)",
            "--calibration",
            "tasks",
            "--out",
            "trained",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trained = pool.path("trained");
    let want = fusion_generate_chat(&trained, PROMPT, 12);
    // No task pool: a merge that trained would be refused.
    let server = start(config(&pool, &[("trained", &trained)], None, "", &[]));
    let c = Client::new(&server);
    let r = c
        .chat("we_moe(math,code;router_checkpoint=trained)", PROMPT, 12)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-merge-cache").as_deref(), Some("miss"));
    assert_eq!(content(&r.json()), want);
    let id = r.header("x-merge-id").unwrap();
    // `pool/name` (structured spec) is the same merge.
    let r = c
        .post(
            "/v1/chat/completions",
            &json!({"merge": {"method": "we_moe", "models": [{"name": "math"}, {"name": "code"}],
                "parameters": {"router_checkpoint": "demo/trained"}}, "temperature": 0,
                "max_tokens": 12, "messages": [{"role": "user", "content": PROMPT}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-merge-cache").as_deref(), Some("hit"));
    assert_eq!(r.header("x-merge-id").as_deref(), Some(id.as_str()));
    let info = c.get(&format!("/v1/merges/{id}")).await.json();
    assert_eq!(info["routers"]["source"], "checkpoint", "{info}");
    assert_eq!(info["routers"]["checkpoint"], "trained");
    // The checkpoint's own training report, not a new one.
    assert_eq!(info["routers"]["training"]["steps"], 4);
    assert_eq!(
        c.metric(r#"fusion_router_training_seconds_count{method="we_moe"}"#)
            .await,
        0.0
    );
    // Untrained routers give another merge.
    let r = c.chat("we_moe(math,code;steps=0)", PROMPT, 12).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_ne!(r.header("x-merge-id").as_deref(), Some(id.as_str()));

    // The saved folder is served by name as the routed model it holds,
    // weighed by the MoE's bytes.
    let r = c.chat("trained", PROMPT, 12).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(content(&r.json()), want);
    let models: Value = c.get("/v1/models").await.json();
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "demo/trained"),
        "{models}"
    );
    // Resident: the two routed merges and the served folder.
    let bytes = c.metric("fusion_merge_cache_bytes").await;
    assert_eq!(bytes, (3 * we_moe_bytes(2)) as f64);
    drop(server);
}
