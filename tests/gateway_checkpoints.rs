//! Checkpoint files that change under a running server (and between two
//! runs of `fusion merge`): a truncated file fails the requests that use it
//! and nothing else; a replaced or rewritten file gets a new fingerprint,
//! hence new merge ids, and is never served stale from the cache. Every
//! pool here is a temporary copy that the test may change.

mod gateway_util;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use gateway_util::*;
use runtime::model::random::random_weights;
use serde_json::{json, Value};

/// A pool whose experts differ from the base (and from each other) only in
/// their MLP weights, as the demo experts do: every weight file has the
/// same header, the same size and the same first and last pages.
fn mlp_only_pool() -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let cfg = model_config(32, 64, 2);
    let base = random_weights(&cfg, 1, 0.4).unwrap();
    write_model(&dir.path().join("base"), &cfg, &base);
    for (i, name) in EXPERTS.iter().enumerate() {
        let tuned = perturbed(&base, &cfg, 100 + i as u64, 0.3);
        let w = base
            .iter()
            .map(|(k, v)| {
                let t = if k.contains(".mlp.") { &tuned[k] } else { v };
                (k.clone(), t.clone())
            })
            .collect();
        write_model(&dir.path().join(name), &cfg, &w);
    }
    Pool { dir }
}

fn weights(pool: &Pool, name: &str) -> PathBuf {
    pool.path(name).join("model.safetensors")
}

/// Replaces `to`'s weights with a copy of `from`'s the way tools that
/// write atomically do: a new file renamed over the old one.
fn replace_by_rename(pool: &Pool, from: &str, to: &str) {
    let tmp = pool.path(to).join(".model.safetensors.tmp");
    std::fs::copy(weights(pool, from), &tmp).unwrap();
    std::fs::rename(&tmp, weights(pool, to)).unwrap();
}

/// Rewrites `to`'s weights in place (same inode, same size) with `bytes`,
/// past the file system's timestamp granularity.
fn rewrite_in_place(pool: &Pool, to: &str, bytes: &[u8]) {
    std::thread::sleep(Duration::from_millis(50));
    let path = weights(pool, to);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes.len() as u64);
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
}

/// The data section of a safetensors file: (header bytes, data bytes).
fn sections(bytes: &[u8]) -> (&[u8], &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes.split_at(8 + n)
}

/// The embedding of a fixed text by `model`, with the reply.
async fn embed(c: &Client, model: &str) -> (Vec<f64>, Reply) {
    let r = c
        .post(
            "/v1/embeddings",
            &json!({"model": model, "input": "the quick brown fox"}),
        )
        .await;
    assert_eq!(r.status, 200, "{model}: {}", r.text);
    let v: Vec<f64> = r.json()["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    (v, r)
}

fn cache_status(r: &Reply) -> String {
    r.header("x-merge-cache").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_replaced_by_rename_gets_a_new_merge_id_and_is_merged_again() {
    let pool = mlp_only_pool();
    // The layout the old fingerprint (headers, sizes, first and last 4 KiB)
    // could not tell apart.
    let math = std::fs::read(weights(&pool, "math")).unwrap();
    let code = std::fs::read(weights(&pool, "code")).unwrap();
    let ((hm, dm), (hc, dc)) = (sections(&math), sections(&code));
    assert_eq!((hm, dm.len()), (hc, dc.len()));
    assert_eq!(dm[..4096], dc[..4096]);
    assert_eq!(dm[dm.len() - 4096..], dc[dc.len() - 4096..]);
    assert_ne!(dm, dc);

    let server = start(pool.config(""));
    let c = Client::new(&server);
    let spec = "task_arithmetic(math,chat)";
    let (before, r) = embed(&c, spec).await;
    assert_eq!(cache_status(&r), "miss");
    let id1 = r.header("x-merge-id").unwrap();
    let (again, r) = embed(&c, spec).await;
    assert_eq!(
        (cache_status(&r), again),
        ("hit".to_string(), before.clone())
    );

    // math now holds code's weights.
    replace_by_rename(&pool, "code", "math");
    let (after, r) = embed(&c, spec).await;
    let id2 = r.header("x-merge-id").unwrap();
    assert_ne!(id1, id2, "the merge id must change with the weights");
    assert_eq!(cache_status(&r), "miss", "merged again, not served stale");
    assert_ne!(after, before);
    // The answers are those of the new weights.
    let (same_weights, _) = embed(&c, "task_arithmetic(code,chat)").await;
    assert_eq!(after, same_weights);
    let (again, r) = embed(&c, spec).await;
    assert_eq!((cache_status(&r), again), ("hit".to_string(), after));

    // The old id is not served from the cache: it names weights that are
    // gone, and says what the merge is now.
    let r = c.chat(&id1, "hi", 2).await;
    let e = r.assert_error(409, "conflict_error");
    assert!(e["message"].as_str().unwrap().contains(&id2), "{e}");
    let r = c.get(&format!("/v1/merges/{id1}")).await;
    assert_eq!(r.json()["status"], "evicted", "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resident_checkpoint_replaced_or_rewritten_is_loaded_again() {
    let pool = mlp_only_pool();
    let original = std::fs::read(weights(&pool, "math")).unwrap();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let (math, r) = embed(&c, "demo/math").await;
    assert_eq!(cache_status(&r), "miss");
    let (_, r) = embed(&c, "demo/math").await;
    assert_eq!(cache_status(&r), "hit");
    let (code, _) = embed(&c, "demo/code").await;
    assert_ne!(math, code);

    // Replaced by rename: a new inode.
    replace_by_rename(&pool, "code", "math");
    let (now, r) = embed(&c, "demo/math").await;
    assert_eq!(cache_status(&r), "miss", "not served stale");
    assert_eq!(now, code);

    // Rewritten in place with the same size: a new modification time.
    rewrite_in_place(&pool, "math", &original);
    let (now, r) = embed(&c, "demo/math").await;
    assert_eq!(cache_status(&r), "miss", "not served stale");
    assert_eq!(now, math);
    let (_, r) = embed(&c, "demo/math").await;
    assert_eq!(cache_status(&r), "hit");
}

/// Collects the server's stderr lines; returns the address it listens on.
fn listening_address(stderr: impl std::io::Read + Send + 'static) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap().to_string();
                let _ = tx.send(addr);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the server never said where it listens")
}

/// Kills the server when the test ends, however it ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> (u16, String) {
    match http.post(url).json(body).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap()),
        Err(e) => (0, format!("no response: {e}")),
    }
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "max_tokens": 2, "temperature": 0,
           "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_truncated_under_the_server_fails_its_requests_not_the_server() {
    let pool = Pool::small();
    let config = pool.path("fusion.yaml");
    std::fs::write(&config, pool.config_yaml("server: {bind: '127.0.0.1:0'}\n")).unwrap();
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_fusion"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("FUSION_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!(
        "http://{}",
        listening_address(server.0.stderr.take().unwrap())
    );
    let http = reqwest::Client::new();
    let chat = format!("{base}/v1/chat/completions");
    let (status, text) = post(&http, &chat, &chat_body("demo/math")).await;
    assert_eq!(status, 200, "{text}");

    // Another process truncates code's weights to half their size.
    let file = weights(&pool, "code");
    let original = std::fs::read(&file).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(original.len() as u64 / 2)
        .unwrap();

    for model in ["task_arithmetic(code,chat)", "demo/code"] {
        let (status, text) = post(&http, &chat, &chat_body(model)).await;
        if status == 0 {
            std::thread::sleep(Duration::from_millis(500));
            panic!(
                "{model}: {text}; the server: {:?}",
                server.0.try_wait().unwrap()
            );
        }
        assert_eq!(status, 500, "{model}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("code/model.safetensors")
                && message.contains("changed on disk")
                && message.contains("size changed"),
            "{message}"
        );
    }
    // Everything else is served.
    let live = http
        .get(format!("{base}/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    for model in ["demo/math", "task_arithmetic(math,chat)"] {
        let (status, text) = post(&http, &chat, &chat_body(model)).await;
        assert_eq!(status, 200, "{model}: {text}");
    }
    // Restored, it serves again.
    std::fs::write(&file, &original).unwrap();
    let (status, text) = post(&http, &chat, &chat_body("task_arithmetic(code,chat)")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(server.0.try_wait().unwrap(), None);
}

/// The merge id `fusion merge` gives `spec` (from the output's
/// fusion_merge.json).
fn cli_merge_id(cwd: &Path, spec: &str, out: &Path) -> String {
    fusion_merge(cwd, spec, out);
    let prov: Value =
        serde_json::from_slice(&std::fs::read(out.join("fusion_merge.json")).unwrap()).unwrap();
    prov["merge_id"].as_str().unwrap().to_string()
}

#[test]
fn the_merge_id_of_fusion_merge_sees_every_weight() {
    let pool = mlp_only_pool();
    let spec = "linear(math,chat)";
    let id1 = cli_merge_id(pool.dir.path(), spec, &pool.path("out1"));
    // Same header, size, first and last pages: only MLP weights differ.
    std::fs::copy(weights(&pool, "code"), weights(&pool, "math")).unwrap();
    let id2 = cli_merge_id(pool.dir.path(), spec, &pool.path("out2"));
    assert_ne!(id1, id2);
    // The id follows the content, not the file: the same weights written
    // again give the same id.
    std::fs::copy(weights(&pool, "code"), weights(&pool, "math")).unwrap();
    let id3 = cli_merge_id(pool.dir.path(), spec, &pool.path("out3"));
    assert_eq!(id2, id3);
}
