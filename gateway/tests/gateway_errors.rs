//! Every error of the design's list gets its status and the OpenAI error
//! JSON, and the server answers the next good request; bearer keys with and
//! without configured keys.

mod gateway_util;

use gateway_util::*;
use serde_json::json;

fn chat_body(model: &str) -> serde_json::Value {
    json!({"model": model, "max_tokens": 4, "temperature": 0,
           "messages": [{"role": "user", "content": "hi"}]})
}

/// A bad request and the error it must get.
struct Case {
    label: &'static str,
    body: serde_json::Value,
    status: u16,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_its_status_and_the_openai_shape() {
    let pool = Pool::small();
    let server = start(pool.config_with_server(
        "limits: {max_body_bytes: 4096, max_tokens: 64, max_experts: 3, max_spec_len: 120}",
        "",
    ));
    let c = Client::new(&server);
    let chat = "/v1/chat/completions";
    let good = chat_body("demo/base");

    let mut cases: Vec<Case> = Vec::new();
    let mut with = |label: &'static str, body: serde_json::Value, status, kind, param, code| {
        cases.push(Case {
            label,
            body,
            status,
            kind,
            param,
            code,
        })
    };
    let mut b = good.clone();
    b["temperature"] = json!(3.0);
    with(
        "temperature",
        b,
        400,
        "invalid_request_error",
        Some("temperature"),
        Some("invalid_value"),
    );
    let mut b = good.clone();
    b["n"] = json!(2);
    with(
        "n",
        b,
        400,
        "invalid_request_error",
        Some("n"),
        Some("invalid_value"),
    );
    let mut b = good.clone();
    b["max_tokens"] = json!(65);
    with(
        "max_tokens",
        b,
        400,
        "invalid_request_error",
        Some("max_tokens"),
        Some("invalid_value"),
    );
    let mut b = good.clone();
    b["messages"] = json!([]);
    with(
        "no messages",
        b,
        400,
        "invalid_request_error",
        Some("messages"),
        Some("invalid_value"),
    );
    let mut b = good.clone();
    b["messages"] = json!([{"role": "robot", "content": "x"}]);
    with(
        "role",
        b,
        400,
        "invalid_request_error",
        Some("messages[0].role"),
        Some("invalid_value"),
    );
    let mut b = good.clone();
    b["messages"] = json!([{"role": "user", "content": "x".repeat(300)}]);
    with(
        "context",
        b,
        400,
        "invalid_request_error",
        Some("messages"),
        Some("context_length_exceeded"),
    );
    with(
        "spec syntax",
        chat_body("ties_merging(math,code"),
        400,
        "invalid_request_error",
        Some("model"),
        Some("invalid_merge_spec"),
    );
    with(
        "method",
        chat_body("no_such_method(math,code)"),
        400,
        "invalid_request_error",
        None,
        Some("invalid_merge_spec"),
    );
    with(
        "parameter",
        chat_body("ties_merging(math,code;bogus=1)"),
        400,
        "invalid_request_error",
        None,
        Some("invalid_merge_spec"),
    );
    with(
        "model",
        chat_body("nope"),
        404,
        "not_found_error",
        Some("model"),
        Some("model_not_found"),
    );
    with(
        "checkpoint",
        chat_body("simple_average(math,nope)"),
        404,
        "not_found_error",
        Some("model"),
        Some("model_not_found"),
    );
    with(
        "pool",
        chat_body("other/simple_average(math,code)"),
        404,
        "not_found_error",
        Some("model"),
        Some("model_not_found"),
    );
    // Paths are never checkpoint names: `..` and `` are unknown pools.
    for (label, model) in [
        ("relative path", "simple_average(../math,code)"),
        ("absolute path", "simple_average(/etc/passwd,code)"),
    ] {
        with(
            label,
            chat_body(model),
            404,
            "not_found_error",
            Some("model"),
            Some("model_not_found"),
        );
    }
    with(
        "merge id",
        chat_body("merge-0123456789abcdef0123456789abcdef"),
        404,
        "not_found_error",
        Some("model"),
        Some("model_not_found"),
    );
    with(
        "spec length",
        chat_body(&format!("simple_average(math,code;x={})", "1".repeat(120))),
        413,
        "request_too_large",
        Some("model"),
        Some("limit_exceeded"),
    );
    with(
        "experts",
        chat_body("simple_average(math,code,chat,base)"),
        413,
        "request_too_large",
        Some("model"),
        Some("limit_exceeded"),
    );
    with(
        "shapes",
        chat_body("simple_average(math,wide)"),
        422,
        "unprocessable_merge",
        None,
        None,
    );
    with(
        "expert count",
        chat_body("slerp(math,code,chat)"),
        422,
        "unprocessable_merge",
        None,
        None,
    );
    let mut b = good.clone();
    b["messages"] = json!([{"role": "user", "content": "x".repeat(5000)}]);
    with(
        "body size",
        b,
        413,
        "request_too_large",
        None,
        Some("limit_exceeded"),
    );

    for Case {
        label,
        body,
        status,
        kind,
        param,
        code,
    } in cases
    {
        let r = c.post(chat, &body).await;
        let e = r.assert_error(status, kind);
        assert_eq!(e["param"].as_str(), param, "{label}: {}", r.text);
        assert_eq!(e["code"].as_str(), code, "{label}: {}", r.text);
        // The server answers the next good request.
        let ok = c.post(chat, &good).await;
        assert_eq!(ok.status, 200, "after {label}: {}", ok.text);
    }

    // Malformed JSON, a missing field, a wrong type: 400 invalid_json.
    for raw in [
        r#"{"model": "#,
        r#"{"model": "demo/base"}"#,
        r#"{"model": 5, "messages": []}"#,
    ] {
        let r = c.post_raw(chat, raw).await;
        let e = r.assert_error(400, "invalid_request_error");
        assert_eq!(e["code"], "invalid_json", "{raw}: {}", r.text);
    }
    // A spec error names the offending position.
    let r = c
        .post(
            chat,
            &chat_body("ties_merging(math,code;density=0.2,density=0.3)"),
        )
        .await;
    let e = r.assert_error(400, "invalid_request_error");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("duplicate parameter `density`"),
        "{e}"
    );
    // Unknown routes are 404 in the same shape.
    c.get("/v1/nothing")
        .await
        .assert_error(404, "not_found_error");
    // Failed merges were not cached: the good merge still works after them.
    let r = c.post(chat, &chat_body("simple_average(math,code)")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(c.metric("fusion_merge_cache_entries").await, 2.0);
    let requests_400 = c
        .metric(r#"fusion_http_requests_total{route="/v1/chat/completions",status="400"}"#)
        .await;
    // Nine 400s in the table, three malformed bodies, one duplicate parameter.
    assert_eq!(requests_400, 13.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_is_429_with_retry_after() {
    let pool = Pool::small();
    let server = start(pool.config_with_server(
        "limits: {max_running_sequences: 1, max_batch_tokens: 8, queue_depth: 1, max_tokens: 240}",
        "",
    ));
    let c = Client::new(&server);
    // Warm the model so every request goes straight to generation.
    assert_eq!(c.chat("demo/base", "hi", 1).await.status, 200);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.chat("demo/base", "hi", 240).await })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 429 {
            let e = r.assert_error(429, "rate_limit_error");
            assert_eq!(e["code"], "queue_full");
            assert!(e["message"].as_str().unwrap().contains("queue_depth"));
            assert_eq!(r.header("retry-after").as_deref(), Some("1"));
            busy += 1;
        } else {
            assert_eq!(r.status, 200, "{}", r.text);
            ok += 1;
        }
    }
    assert!(
        busy >= 1,
        "eight concurrent generations on one running slot and a queue of one, none refused"
    );
    assert!(ok >= 2, "the running one and the queued one both finish");
    assert_eq!(c.chat("demo/base", "hi", 4).await.status, 200);
    assert_eq!(c.metric("fusion_generation_queue_depth").await, 0.0);
    assert_eq!(c.metric("fusion_generations_running").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_keys() {
    let pool = Pool::small();
    let server =
        start(pool.config_with_server("api_keys: [user-key], admin_keys: [admin-key]", ""));
    let anon = Client::new(&server);
    let user = anon.with_key("user-key");
    let admin = anon.with_key("admin-key");
    let wrong = anon.with_key("nope");

    let r = anon.get("/v1/models").await;
    r.assert_error(401, "authentication_error");
    assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
    wrong
        .get("/v1/models")
        .await
        .assert_error(401, "authentication_error");
    assert_eq!(user.get("/v1/models").await.status, 200);
    assert_eq!(admin.get("/v1/models").await.status, 200);
    anon.post("/v1/chat/completions", &chat_body("demo/base"))
        .await
        .assert_error(401, "authentication_error");
    assert_eq!(user.chat("demo/base", "hi", 2).await.status, 200);

    anon.get("/v1/merges")
        .await
        .assert_error(401, "authentication_error");
    let r = user.get("/v1/merges").await;
    let e = r.assert_error(403, "permission_error");
    assert_eq!(e["code"], "admin_key_required");
    user.post("/v1/merges", &json!({"model": "simple_average(math,code)"}))
        .await
        .assert_error(403, "permission_error");
    assert_eq!(admin.get("/v1/merges").await.status, 200);
    let r = admin
        .post("/v1/merges", &json!({"model": "simple_average(math,code)"}))
        .await;
    assert!([200, 202].contains(&r.status), "{}", r.text);

    // Health, metrics and the API docs are public.
    for path in ["/health/live", "/health/ready", "/metrics", "/openapi.json"] {
        assert_eq!(anon.get(path).await.status, 200, "{path}");
    }
    let unauthorized = anon
        .metric(r#"fusion_http_requests_total{route="/v1/models",status="401"}"#)
        .await;
    assert_eq!(unauthorized, 2.0);

    // Without keys, everything is open.
    let open = start(pool.config(""));
    let c = Client::new(&open);
    assert_eq!(c.get("/v1/models").await.status, 200);
    assert_eq!(c.get("/v1/merges").await.status, 200);
    assert_eq!(c.with_key("anything").get("/v1/merges").await.status, 200);
}
