//! Harness of the gateway tests: a pool of small random Llama checkpoints
//! (a base and experts = base + small random deltas, with the demo pool's
//! byte-level tokenizer), a real server on an ephemeral port, and a real
//! HTTP client. The end-to-end suites of the `fusion` binary (at the
//! workspace root, `tests/gateway_util`) use it too and add the helpers that
//! run the binary.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use gateway::{Config, RunningServer};
use reqwest::header::HeaderMap;
use runtime::generate::bytelevel;
use runtime::model::random::{random_weights, write_checkpoint};
use runtime::model::ModelConfig;
use serde_json::Value;

/// Context length of the test models.
pub const CONTEXT: usize = 256;
/// The experts of the test pool.
pub const EXPERTS: [&str; 3] = ["math", "code", "chat"];

/// The config.json of a small Llama model.
pub fn model_config(hidden: usize, intermediate: usize, layers: usize) -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama",
        "vocab_size": bytelevel::VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "bos_token_id": bytelevel::BOS,
        "eos_token_id": bytelevel::EOS,
    });
    ModelConfig::from_json(&json.to_string(), Path::new("config.json")).unwrap()
}

/// Writes one checkpoint folder with the byte-level tokenizer files.
pub fn write_model(dir: &Path, cfg: &ModelConfig, weights: &HashMap<String, Tensor>) {
    write_checkpoint(dir, cfg, weights, DType::F32).unwrap();
    bytelevel::write_tokenizer_files(dir, CONTEXT).unwrap();
}

/// `base + N(0, std²)` for every tensor.
pub fn perturbed(
    base: &HashMap<String, Tensor>,
    cfg: &ModelConfig,
    seed: u64,
    std: f32,
) -> HashMap<String, Tensor> {
    let delta = random_weights(cfg, seed, std).unwrap();
    base.iter()
        .map(|(k, v)| {
            // Norm scales of `random_weights` are 1 + noise: use the noise only.
            let d = if k.ends_with("norm.weight") {
                (&delta[k] - 1.0).unwrap()
            } else {
                delta[k].clone()
            };
            (k.clone(), (v + d).unwrap())
        })
        .collect()
}

/// A pool folder: `base/` and one folder per expert; with `wide`, also an
/// expert of another MLP width (for shape mismatches).
pub fn write_pool(dir: &Path, hidden: usize, layers: usize, wide: bool) {
    let cfg = model_config(hidden, 2 * hidden, layers);
    let base = random_weights(&cfg, 1, 0.4).unwrap();
    write_model(&dir.join("base"), &cfg, &base);
    for (i, name) in EXPERTS.iter().enumerate() {
        let w = perturbed(&base, &cfg, 100 + i as u64, 0.05);
        write_model(&dir.join(name), &cfg, &w);
    }
    if wide {
        let wcfg = model_config(hidden, 3 * hidden, layers);
        let w = random_weights(&wcfg, 7, 0.4).unwrap();
        write_model(&dir.join("wide"), &wcfg, &w);
    }
}

/// A test pool in a temporary folder.
pub struct Pool {
    pub dir: tempfile::TempDir,
}

impl Pool {
    /// The default small pool (hidden 32, 2 layers, with `wide`).
    pub fn small() -> Pool {
        Self::with(32, 2, true)
    }

    pub fn with(hidden: usize, layers: usize, wide: bool) -> Pool {
        let dir = tempfile::tempdir().unwrap();
        write_pool(dir.path(), hidden, layers, wide);
        Pool { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The YAML of a config serving this pool as `demo`, plus `extra` YAML
    /// (which may repeat no top-level key of it: `pools`, `device`).
    pub fn config_yaml(&self, extra: &str) -> String {
        let mut experts: Vec<String> = EXPERTS
            .iter()
            .map(|e| format!("{e}: {}", self.path(e).display()))
            .collect();
        if self.path("wide").exists() {
            experts.push(format!("wide: {}", self.path("wide").display()));
        }
        format!(
            "device: cpu\npools:\n  demo:\n    base: {}\n    experts: {{{}}}\n{extra}",
            self.path("base").display(),
            experts.join(", ")
        )
    }

    /// A validated config (no environment overrides).
    pub fn config(&self, extra: &str) -> Config {
        let yaml = self.config_yaml(&format!("server: {{bind: '127.0.0.1:0'}}\n{extra}"));
        Config::from_yaml(&yaml, "test.yaml", self.dir.path(), Vec::new()).unwrap()
    }

    /// A config whose `server:` section is `server` (bind is set here).
    pub fn config_with_server(&self, server: &str, extra: &str) -> Config {
        let yaml = self.config_yaml(&format!(
            "server: {{bind: '127.0.0.1:0', {server}}}\n{extra}"
        ));
        Config::from_yaml(&yaml, "test.yaml", self.dir.path(), Vec::new()).unwrap()
    }
}

/// Starts a server.
pub fn start(config: Config) -> RunningServer {
    gateway::spawn(config).unwrap()
}

/// A response: status, headers, body parsed as JSON (Null if it is not).
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }

    /// Asserts the OpenAI error shape and the status; returns the error object.
    #[track_caller]
    pub fn assert_error(&self, status: u16, kind: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text);
        let v = self.json();
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            self.text
        );
        assert_eq!(e["type"], kind, "{}", self.text);
        assert!(
            e.get("param").is_some() && e.get("code").is_some(),
            "{}",
            self.text
        );
        e.clone()
    }
}

/// A client of one server.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
    pub key: Option<String>,
}

impl Client {
    pub fn new(server: &RunningServer) -> Client {
        Client {
            base: server.url(),
            http: reqwest::Client::new(),
            key: None,
        }
    }

    pub fn with_key(&self, key: &str) -> Client {
        Client {
            key: Some(key.to_string()),
            ..self.clone()
        }
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let res = self.auth(req).send().await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        Reply {
            status,
            headers,
            text,
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> Reply {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    /// A greedy chat completion of `prompt` on `model`.
    pub async fn chat(&self, model: &str, prompt: &str, max_tokens: usize) -> Reply {
        self.post(
            "/v1/chat/completions",
            &serde_json::json!({"model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]}),
        )
        .await
    }

    /// The value of a metric sample (`name` with its labels as written in
    /// the exposition, e.g. `fusion_merges_total{method="ties_merging",outcome="success"}`);
    /// 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.get("/metrics").await.text;
        metric_value(&text, sample)
    }
}

/// The assistant's text of a chat completion response.
pub fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The value of `sample` in a Prometheus exposition; 0 when absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The JSON chunks of a streamed chat answer whose last event is `[DONE]`
/// (checked); the first chunk carries the assistant role (checked).
pub fn chat_stream_chunks(body: &str) -> Vec<Value> {
    let events = sse_events(body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    chunks
}
