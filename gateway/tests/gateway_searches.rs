//! Search jobs on a real server: `POST /v1/searches` runs a random search
//! of task arithmetic's per-expert weights on the pool, `GET
//! /v1/searches/{id}` follows it to the end (every evaluation in the trace,
//! the best the running best), the best spec is registered as a preset that
//! answers what the spec itself answers; bad searches are clear errors
//! naming the field, and the budget is bounded by the config.

mod gateway_util;

use std::path::Path;
use std::time::{Duration, Instant};

use gateway_util::*;
use serde_json::{json, Value};

/// Two multiple-choice tasks (a smooth enough score for a search).
fn write_tasks(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("qa.multiple_choice.jsonl"),
        "{\"context\":\"2+2=\",\"choices\":[\"4\",\"5\",\"22\"],\"gold\":0}\n\
         {\"context\":\"sky:\",\"choices\":[\" blue\",\" red\"],\"gold\":0}\n\
         {\"context\":\"abc\",\"choices\":[\"d\",\"e\"],\"gold\":0}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("mood.multiple_choice.jsonl"),
        "{\"context\":\"great:\",\"choices\":[\" pos\",\" neg\"],\"gold\":0}\n\
         {\"context\":\"awful:\",\"choices\":[\" pos\",\" neg\"],\"gold\":1}\n",
    )
    .unwrap();
}

async fn wait_done(c: &Client, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let r = c.get(&format!("/v1/searches/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let v = r.json();
        if v["status"] != "running" {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_search_runs_to_its_budget_and_registers_its_best_as_a_preset() {
    let pool = Pool::with(32, 2, false);
    let tasks = pool.path("tasks");
    write_tasks(&tasks);
    let server = start(pool.config_with_server(
        "limits: {max_search_evaluations: 12}",
        &format!("taskpools: {{demo: '{}'}}\n", tasks.display()),
    ));
    let c = Client::new(&server);
    let search = json!({
        "merge": {"method": "task_arithmetic", "parameters": {"scaling_coefficient": 1.0}},
        "space": {"weight": [0.0, 1.0]},
        "objective": "average", "budget": 6, "algorithm": "random", "population": 3, "seed": 1
    });
    let r = c
        .post(
            "/v1/searches",
            &json!({"pool": "demo", "search": search, "preset": "best-ta"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        r.json()["dimensions"],
        json!(["weight[chat]", "weight[code]", "weight[math]"])
    );
    let v = wait_done(&c, &id).await;
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["evaluations"], 6);
    let trace = v["trace"].as_array().unwrap();
    assert_eq!(trace.len(), 6);
    // The best column is the running best of the scores; the record's
    // best is the last of it.
    let mut best = f64::MIN;
    for p in trace {
        best = best.max(p["score"].as_f64().unwrap());
        assert_eq!(p["best"].as_f64().unwrap(), best, "{p}");
    }
    assert_eq!(v["best_value"].as_f64().unwrap(), best);
    // The preset answers what its spec answers, and is listed.
    let spec = v["best_spec"].as_str().unwrap().to_string();
    let prompt = "2+2=";
    let by_preset = c.chat("best-ta", prompt, 6).await;
    let by_spec = c.chat(&spec, prompt, 6).await;
    assert_eq!(by_preset.status, 200, "{}", by_preset.text);
    assert_eq!(content(&by_preset.json()), content(&by_spec.json()));
    assert_eq!(
        by_preset.header("x-merge-id"),
        by_spec.header("x-merge-id"),
        "one merge"
    );
    let models = c.get("/v1/models").await.json();
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "best-ta"),
        "{models}"
    );
    let list = c.get("/v1/searches").await.json();
    assert_eq!(list["data"][0]["id"], json!(id));

    // Bad searches: each a clear error naming the field; nothing starts.
    for (body, status, want) in [
        (
            json!({"pool": "demo", "search": {"merge": {"method": "task_arithmetic"}, "space": {"weight": [0, 1]}, "budget": 13}}),
            400,
            "max_search_evaluations",
        ),
        (
            json!({"pool": "demo", "search": {"pool": "/etc", "merge": {"method": "task_arithmetic"}, "space": {"weight": [0, 1]}, "budget": 2}}),
            400,
            "`pool`",
        ),
        (
            json!({"pool": "demo", "search": {"taskpool": "/etc", "merge": {"method": "task_arithmetic"}, "space": {"weight": [0, 1]}, "budget": 2}}),
            400,
            "`taskpool`",
        ),
        (
            json!({"pool": "demo", "search": {"merge": {"method": "task_arithmetic"}, "space": {"weight": [0, 1]}, "budget": 2, "bogus": 1}}),
            400,
            "bogus",
        ),
        (
            json!({"pool": "nope", "search": {"merge": {"method": "task_arithmetic"}, "space": {"weight": [0, 1]}, "budget": 2}}),
            404,
            "unknown pool `nope`",
        ),
        (
            json!({"pool": "demo", "taskpool": "nope", "search": {"merge": {"method": "task_arithmetic"}, "space": {"weight": [0, 1]}, "budget": 2}}),
            404,
            "unknown task pool `nope`",
        ),
        (
            json!({"pool": "demo", "search": "merge: [unclosed", "budget": 2}),
            400,
            "",
        ),
    ] {
        let r = c.post("/v1/searches", &body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text);
        assert!(r.text.contains(want), "{body}: {}", r.text);
    }
    // A preset name the config owns is refused when the search ends.
    let r = c
        .post(
            "/v1/searches",
            &json!({"pool": "demo", "search": search, "preset": "math"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let v = wait_done(&c, r.json()["id"].as_str().unwrap()).await;
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["error"].as_str().unwrap().contains("`math`"), "{v}");
    assert_eq!(c.chat("best-ta", prompt, 2).await.status, 200);
}
