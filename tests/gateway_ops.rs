//! Operations: the checked-in OpenAPI document matches the code, Swagger UI
//! is served, `promtool check metrics` accepts /metrics, request ids, and
//! `fusion serve` finishes in-flight requests on SIGTERM.

mod gateway_util;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gateway_util::*;
use serde_json::{json, Value};

#[test]
fn the_checked_in_openapi_document_is_what_the_code_generates() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    let checked_in = std::fs::read_to_string(&path).unwrap();
    assert!(
        checked_in == gateway::openapi::json(),
        "openapi/openapi.json is stale: regenerate it with `cargo run --release -- openapi > openapi/openapi.json`"
    );
    // `fusion openapi` prints the same document.
    let out = Command::new(env!("CARGO_BIN_EXE_fusion"))
        .arg("openapi")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), checked_in);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_docs_and_every_documented_route() {
    let pool = Pool::small();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let served: Value = c.get("/openapi.json").await.json();
    let generated: Value = serde_json::from_str(&gateway::openapi::json()).unwrap();
    assert_eq!(served, generated);
    // reqwest follows the redirect of `/docs` to `/docs/`.
    let docs = c.get("/docs").await;
    assert_eq!(docs.status, 200);
    assert!(
        docs.text.contains("swagger"),
        "{}",
        &docs.text[..200.min(docs.text.len())]
    );
    // Every documented operation is routed (no `no route` 404).
    for (path, ops) in generated["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let url = format!(
                "{}{}",
                c.base,
                path.replace("{id}", "merge-0123456789abcdef0123456789abcdef")
            );
            let req = match method.as_str() {
                "get" => c.http.get(&url),
                "post" => c.http.post(&url).json(&json!({})),
                "delete" => c.http.delete(&url),
                other => panic!("unexpected method {other}"),
            };
            let res = req.send().await.unwrap();
            let text = res.text().await.unwrap();
            assert!(!text.contains("no route"), "{method} {path}: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_and_every_design_metric_is_there() {
    let pool = Pool::small();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    assert_eq!(
        c.chat("simple_average(math,code)", "hi", 4).await.status,
        200
    );
    assert_eq!(c.chat("demo/math", "hi", 4).await.status, 200);
    let stream = c
        .post(
            "/v1/chat/completions",
            &json!({"model": "demo/math", "stream": true, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(stream.status, 200);
    assert_eq!(c.chat("nope", "hi", 4).await.status, 404);
    assert_eq!(
        c.delete(&format!(
            "/v1/merges/{}",
            c.get("/v1/merges").await.json()["data"][0]["id"]
                .as_str()
                .unwrap()
        ))
        .await
        .status,
        200
    );
    let text = c.get("/metrics").await.text;
    for name in [
        "fusion_http_requests_total",
        "fusion_http_request_duration_seconds",
        "fusion_time_to_first_token_seconds",
        "fusion_generated_tokens_total",
        "fusion_merge_duration_seconds",
        "fusion_merges_total",
        "fusion_merge_cache_hits_total",
        "fusion_merge_cache_misses_total",
        "fusion_merge_cache_joins_total",
        "fusion_merge_cache_evictions_total",
        "fusion_merge_cache_bytes",
        "fusion_merge_cache_entries",
        "fusion_generation_queue_depth",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
    assert_eq!(
        metric_value(&text, "fusion_time_to_first_token_seconds_count"),
        3.0
    );
    assert!(metric_value(&text, "fusion_generated_tokens_total") >= 3.0);
    assert_eq!(
        metric_value(
            &text,
            r#"fusion_http_requests_total{route="/v1/chat/completions",status="404"}"#
        ),
        1.0
    );
    let Ok(out) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!(
            "SKIPPED promtool check: promtool is not installed (Debian package `prometheus`)"
        );
        return;
    };
    let mut child = out;
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let res = child.wait_with_output().unwrap();
    assert!(
        res.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_made() {
    let pool = Pool::small();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let res = c
        .http
        .get(format!("{}/health/live", c.base))
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-42");
    let a = c.get("/health/live").await.header("x-request-id").unwrap();
    let b = c.get("/health/live").await.header("x-request-id").unwrap();
    assert_ne!(a, b);
    assert_eq!(a.len(), 32, "a simple uuid: {a}");
}

/// Collects the server's stderr lines; returns the address it listens on
/// once it says so, and the lines read so far and later.
fn watch_stderr(
    stderr: impl std::io::Read + Send + 'static,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap().to_string();
                let _ = tx.send(addr);
            }
            sink.lock().unwrap().push(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server never said where it listens");
    (addr, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    // Larger models, so a long completion is still streaming when SIGTERM comes.
    let pool = Pool::with(256, 4, false);
    let config = pool.path("fusion.yaml");
    std::fs::write(
        &config,
        pool.config_yaml(
            "server: {bind: '127.0.0.1:0', shutdown_timeout: 30s, limits: {max_tokens: 250}}\n",
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("FUSION_LOG", "info")
        .env("FUSION_SERVER__LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (addr, logs) = watch_stderr(child.stderr.take().unwrap());
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let body = json!({"model": "demo/base", "stream": true, "max_tokens": 250, "temperature": 0,
                      "messages": [{"role": "user", "content": "hi"}]});
    // Warm the model, then start a long stream.
    let warm = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let full = warm.text().await.unwrap();
    let mut res = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut got = String::from_utf8(res.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    assert!(sse_events(&full).len() > 50, "a long completion: {full}");
    assert!(
        !got.contains("[DONE]"),
        "still streaming when the signal comes"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    while let Some(chunk) = res.chunk().await.unwrap() {
        got.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(
        got.ends_with("data: [DONE]\n\n"),
        "the stream was cut: {got}"
    );
    // The same completion as before the signal (ids and times aside).
    let text = |body: &str| -> String {
        sse_events(body)
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| {
                let v: Value = serde_json::from_str(e).unwrap();
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    };
    assert_eq!(text(&got), text(&full));
    let start = Instant::now();
    let code = loop {
        if let Some(code) = child.try_wait().unwrap() {
            break code;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "exit status {code}");
    assert!(http
        .get(format!("{base}/health/live"))
        .send()
        .await
        .is_err());

    // JSON logs (FUSION_SERVER__LOG_FORMAT=json): one object per line, a
    // line per request with its status, route and request id.
    let logs = logs.lock().unwrap().clone();
    let records: Vec<Value> = logs
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let requests: Vec<&Value> = records
        .iter()
        .filter(|r| r["fields"]["message"] == "request")
        .collect();
    assert_eq!(requests.len(), 2, "{logs:#?}");
    for r in requests {
        assert_eq!(r["fields"]["status"], 200);
        assert_eq!(r["fields"]["route"], "/v1/chat/completions");
        assert_eq!(r["span"]["id"].as_str().map(str::len), Some(32), "{r}");
    }
}
