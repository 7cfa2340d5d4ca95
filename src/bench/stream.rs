//! The serving benches' client: streamed greedy completions over HTTP, each
//! with its text, completion tokens, time to first token and the gaps
//! between the text deltas that followed, as the client sees them, and
//! clients that send such requests back to back.

use std::time::Instant;

use anyhow::bail;
use serde_json::{json, Value};

/// One streamed completion.
pub struct Streamed {
    /// The completion text.
    pub text: String,
    /// Completion tokens (the stream's usage chunk).
    pub tokens: usize,
    /// Seconds from sending the request to the first text delta.
    pub ttft: f64,
    /// Seconds between consecutive text deltas.
    pub gaps: Vec<f64>,
}

/// A greedy completion of `max_tokens` of `prompt` on `model`, streamed.
pub async fn complete(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    prompt: &str,
    max_tokens: usize,
) -> anyhow::Result<Streamed> {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let start = Instant::now();
    let mut res = http
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await?;
    if !res.status().is_success() {
        bail!("{model}: HTTP {}: {}", res.status(), res.text().await?);
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Streamed {
        text: String::new(),
        tokens: 0,
        ttft: 0.0,
        gaps: Vec::new(),
    };
    let mut last: Option<Instant> = None;
    while let Some(chunk) = res.chunk().await? {
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let event = String::from_utf8_lossy(&event[..end]).into_owned();
            let Some(data) = event.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data)?;
            if let Some(e) = v.get("error") {
                bail!("{model}: the stream failed: {e}");
            }
            if let Some(k) = v["usage"]["completion_tokens"].as_u64() {
                out.tokens = k as usize;
            }
            let Some(t) = v["choices"][0]["text"].as_str().filter(|t| !t.is_empty()) else {
                continue;
            };
            let now = Instant::now();
            match last {
                None => out.ttft = now.duration_since(start).as_secs_f64(),
                Some(l) => out.gaps.push(now.duration_since(l).as_secs_f64()),
            }
            last = Some(now);
            out.text.push_str(t);
        }
    }
    Ok(out)
}

/// One client per `(model, prompt)`, each streaming `rounds` completions
/// back to back: every reply, client by client.
pub async fn clients(
    url: &str,
    requests: &[(String, String)],
    max_tokens: usize,
    rounds: usize,
) -> anyhow::Result<Vec<Streamed>> {
    let http = reqwest::Client::new();
    let tasks: Vec<_> = requests
        .iter()
        .map(|(model, prompt)| {
            let (http, url) = (http.clone(), url.to_string());
            let (model, prompt) = (model.clone(), prompt.clone());
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    out.push(complete(&http, &url, &model, &prompt, max_tokens).await?);
                }
                anyhow::Ok(out)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await??);
    }
    Ok(out)
}

/// p50 and p99 of the replies' times to first token and of their
/// inter-token gaps, in milliseconds: `(ttft p50, ttft p99, itl p50, itl
/// p99)`.
pub fn latencies(replies: &[Streamed]) -> (f64, f64, f64, f64) {
    let ttft: Vec<f64> = replies.iter().map(|r| r.ttft * 1e3).collect();
    let gaps: Vec<f64> = replies
        .iter()
        .flat_map(|r| r.gaps.iter().map(|g| g * 1e3))
        .collect();
    let (t50, t99) = super::serve::summary(ttft);
    let (g50, g99) = super::serve::summary(gaps);
    (t50, t99, g50, g99)
}
