//! Data-driven merges (`regmean`, `fisher_merging`, `adamerging`, ...) on a
//! real server: the first of 8 concurrent requests runs the merge (its
//! forward passes on the pool's calibration task pool, one per expert task)
//! and the others join it; a second merge over the same experts takes its
//! statistics from the statistics cache (no forward pass); bad parameters
//! are a 400 naming the parameter, work over the limits a 413, and a pool
//! without calibration inputs a 422.

mod gateway_util;

use std::path::Path;

use gateway_util::*;

/// A calibration task pool: one task per expert (`math`, `code`), named
/// like the experts, whose prompts are the inputs (answers never read).
fn write_tasks(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (task, op) in [("math", "+"), ("code", "fn")] {
        let lines: Vec<String> = (0..10)
            .map(|i| format!("{{\"prompt\":\"{i} {op} {}=\",\"answer\":\"x\"}}", 9 - i))
            .collect();
        std::fs::write(dir.join(format!("{task}.generate.jsonl")), lines.join("\n")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_driven_merge_runs_once_for_concurrent_requests_and_reuses_its_statistics() {
    let pool = Pool::with(32, 2, false);
    let tasks = pool.dir.path().join("tasks");
    write_tasks(&tasks);
    let data = pool.dir.path().join("data");
    let server = start(pool.config_with_server(
        &format!(
            "data_dir: '{}', limits: {{max_calibration_samples: 256, max_router_steps: 20}}",
            data.display()
        ),
        &format!("taskpools: {{calib: {}}}\n", tasks.display()),
    ));
    let c = Client::new(&server);
    let spec = "regmean(math,code)";
    let replies: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.chat(spec, "1 + 2=", 6).await })
        })
        .collect();
    let mut out = Vec::new();
    for r in replies {
        out.push(r.await.unwrap());
    }
    let id = out[0]
        .header("x-merge-id")
        .unwrap_or_else(|| panic!("{} {}", out[0].status, out[0].text));
    for r in &out {
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.header("x-merge-id").as_deref(), Some(id.as_str()));
        assert_eq!(content(&r.json()), content(&out[0].json()));
    }
    let misses = out
        .iter()
        .filter(|r| r.header("x-merge-cache").as_deref() == Some("miss"))
        .count();
    assert_eq!(misses, 1);
    let merges = r#"fusion_merges_total{method="regmean",outcome="success"}"#;
    assert_eq!(c.metric(merges).await, 1.0);
    let calib = r#"fusion_merge_calibration_seconds_count{method="regmean"}"#;
    assert_eq!(c.metric(calib).await, 1.0);
    assert_eq!(c.metric("fusion_stats_cache_misses_total").await, 2.0);
    assert_eq!(c.metric("fusion_stats_cache_hits_total").await, 0.0);
    assert!(c.metric("fusion_stats_cache_bytes").await > 0.0);
    let info = c.get(&format!("/v1/merges/{id}")).await.json();
    assert_eq!(info["status"], "ready", "{info}");
    let report = &info["data_driven"];
    assert_eq!(report["stats_misses"], 2, "{info}");
    assert!(report["forward_batches"].as_u64() > Some(0), "{info}");
    assert!(data.join("stats").is_dir());

    // Another RegMean of the same experts (another α, another order): a new
    // merge, with every Gram from the statistics cache.
    let other = "regmean(code,math;reduce_non_diagonal_ratio=0.5)";
    let r = c.chat(other, "1 + 2=", 6).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_ne!(r.header("x-merge-id").as_deref(), Some(id.as_str()));
    assert_eq!(c.metric("fusion_stats_cache_hits_total").await, 2.0);
    assert!(c.metric("fusion_stats_cache_saved_seconds_total").await > 0.0);
    let other_id = r.header("x-merge-id").unwrap();
    let info = c.get(&format!("/v1/merges/{other_id}")).await.json();
    assert_eq!(info["data_driven"]["forward_batches"], 0, "{info}");

    // AdaMerging trains its coefficients (a few steps) and is served dense.
    let r = c
        .chat(
            "adamerging(math,code;steps=3,batch_size=2,lr=0.01)",
            "1 + 2=",
            6,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let ada = r.header("x-merge-id").unwrap();
    let info = c.get(&format!("/v1/merges/{ada}")).await.json();
    let training = &info["data_driven"]["training"];
    assert_eq!(training["steps"], 3, "{info}");
    assert_eq!(training["coefficients"].as_array().unwrap().len(), 2);

    // Bad parameters: 400 naming the parameter; too much work: 413.
    for (spec, param) in [
        (
            "regmean(math,code;reduce_non_diagonal_ratio=2)",
            "reduce_non_diagonal_ratio",
        ),
        ("adamerging(math,code;granularity=block)", "granularity"),
        (
            "fisher_merging(math,code;normalize_fisher_weight=maybe)",
            "normalize_fisher_weight",
        ),
        ("fisher_merging(math,code;epsilon=nan)", "epsilon"),
        ("ada_svd(math,code;gate_k=0)", "gate_k"),
        ("regmean(math,code;density=0.2)", "density"),
    ] {
        let r = c.chat(spec, "hi", 4).await;
        let e = r.assert_error(400, "invalid_request_error");
        assert!(
            e["message"].as_str().unwrap().contains(param),
            "{spec}: {e}"
        );
    }
    let r = c.chat("regmean(math,code;num_samples=257)", "hi", 4).await;
    let e = r.assert_error(413, "request_too_large");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("max_calibration_samples"),
        "{e}"
    );
    // An expert without a task of its name: 422 naming the tasks there are.
    let r = c.chat("regmean(math,chat)", "hi", 4).await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(
        r.text.contains("`chat`") && r.text.contains("code, math"),
        "{}",
        r.text
    );
    // The server still serves the good merge.
    let r = c.chat(spec, "1 + 2=", 6).await;
    assert_eq!(r.header("x-merge-cache").as_deref(), Some("hit"));
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_without_calibration_inputs_is_a_422() {
    let pool = Pool::with(32, 2, false);
    let data = pool.dir.path().join("data");
    let server = start(pool.config_with_server(&format!("data_dir: '{}'", data.display()), ""));
    let c = Client::new(&server);
    for spec in [
        "regmean(math,code)",
        "fisher_merging(math,code)",
        "ada_svd(math,code)",
    ] {
        let r = c.chat(spec, "hi", 4).await;
        assert_eq!(r.status, 422, "{spec}: {}", r.text);
        assert!(r.text.contains("calibration"), "{}", r.text);
    }
    // AdaMerging with 0 steps reads no data: task arithmetic at `init`.
    let r = c.chat("adamerging(math,code;steps=0)", "hi", 4).await;
    assert_eq!(r.status, 200, "{}", r.text);
    drop(server);
}
