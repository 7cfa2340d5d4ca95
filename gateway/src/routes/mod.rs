//! HTTP routes: thin adapters from OpenAI-shaped requests onto the
//! [model store](crate::store) and [`crate::serving`], plus the gateway's
//! own APIs; [`sse`] streams completions.

pub mod chat;
pub mod classifications;
pub mod completions;
pub mod embeddings;
pub mod evaluations;
pub mod health;
pub mod merges;
pub mod models;
pub mod searches;
pub mod sse;

use actix_web::{web, HttpResponseBuilder};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::engine::SamplingParams;
use crate::error::{GatewayError, Result};
use crate::limits::Limits;
use crate::store::ModelHandle;
use crate::{MERGE_CACHE_HEADER, MERGE_ID_HEADER};

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(chat::chat_completions)
        .service(classifications::classifications)
        .service(completions::completions)
        .service(embeddings::embeddings)
        .service(models::list_models)
        .service(merges::create_merge)
        .service(merges::list_merges)
        .service(merges::get_merge)
        .service(merges::delete_merge)
        .service(evaluations::list_evaluations)
        .service(evaluations::run_evaluation)
        .service(searches::start_search)
        .service(searches::list_searches)
        .service(searches::get_search)
        .service(health::live)
        .service(health::ready)
        .service(health::metrics);
}

/// Items of a listing page when the query does not say.
pub const DEFAULT_PAGE: usize = 20;
/// Most items of a listing page.
pub const MAX_PAGE: usize = 100;

/// Pagination of the listing routes (OpenAI style): `limit` items after
/// the item `after`.
#[derive(Debug, Default, Deserialize, IntoParams)]
pub struct PageQuery {
    /// Items of the page, 1 to 100 (default 20).
    #[serde(default)]
    pub limit: Option<usize>,
    /// The id of the last item of the previous page (its `last_id`).
    #[serde(default)]
    pub after: Option<String>,
}

/// A page of a listing: the range of `ids` (in list order) to show, and
/// whether more follow.
pub struct Page {
    /// Positions in the full list.
    pub range: std::ops::Range<usize>,
    /// Whether items follow the page.
    pub has_more: bool,
}

impl PageQuery {
    /// The page of `ids` this query asks for: a 400 when `limit` is out of
    /// 1..=100 or `after` is not an id of the list.
    pub fn page(&self, ids: &[String]) -> Result<Page> {
        let limit = self.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(GatewayError::bad_param(
                "limit",
                format!("`limit` = {limit} is out of range: expected 1..={MAX_PAGE}"),
            ));
        }
        let start = match &self.after {
            None => 0,
            Some(after) => {
                ids.iter().position(|id| id == after).ok_or_else(|| {
                    GatewayError::bad_param(
                        "after",
                        format!("`after` = `{after}` is not in the list (forgotten since?); list again from the start"),
                    )
                })? + 1
            }
        };
        let end = (start + limit).min(ids.len());
        Ok(Page {
            range: start..end,
            has_more: end < ids.len(),
        })
    }
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage from prompt and completion counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    /// One stop sequence.
    One(String),
    /// Up to four stop sequences.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Accepted for compatibility: the final chunk always carries `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Sampling fields shared by chat and text completions (OpenAI names).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    /// Most tokens to generate (1..=`server.limits.max_tokens`; default 256, capped by the limit).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Same as `max_tokens` (newer OpenAI name); wins when both are given.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// 0 (greedy) to 2; default 1.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1]; default 1.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (extension); default off.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Seed of the sampler, for reproducible sampling.
    #[serde(default)]
    pub seed: Option<u64>,
    /// -2 to 2; default 0.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// -2 to 2; default 0.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Up to four sequences that end the completion (not included in it).
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Number of choices; only 1 is supported.
    #[serde(default)]
    pub n: Option<u32>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Stream options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// End-user id (logged, not used).
    #[serde(default)]
    pub user: Option<String>,
}

fn check_range(param: &str, v: Option<f32>, lo: f32, hi: f32, lo_open: bool) -> Result<()> {
    if let Some(x) = v {
        let ok = x.is_finite() && (if lo_open { x > lo } else { x >= lo }) && x <= hi;
        if !ok {
            let range = if lo_open {
                format!("({lo}, {hi}]")
            } else {
                format!("[{lo}, {hi}]")
            };
            return Err(GatewayError::bad_param(
                param,
                format!("`{param}` = {x} is out of range: expected {range}"),
            ));
        }
    }
    Ok(())
}

impl SamplingFields {
    /// Validates into sampling parameters, and whether to stream.
    pub fn validate(&self, limits: &Limits) -> Result<(SamplingParams, bool)> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(GatewayError::bad_param(
                    "n",
                    format!("`n` = {n}: only one choice per request is supported"),
                ));
            }
        }
        let (param, requested) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let max_tokens = limits.max_tokens(param, requested)?;
        check_range("temperature", self.temperature, 0.0, 2.0, false)?;
        check_range("top_p", self.top_p, 0.0, 1.0, true)?;
        check_range(
            "frequency_penalty",
            self.frequency_penalty,
            -2.0,
            2.0,
            false,
        )?;
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0, false)?;
        if self.top_k == Some(0) {
            return Err(GatewayError::bad_param(
                "top_k",
                "`top_k` must be at least 1",
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(GatewayError::bad_param(
                "stop",
                "`stop` takes up to 4 non-empty sequences",
            ));
        }
        let defaults = SamplingParams::default();
        let params = SamplingParams {
            max_tokens,
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            top_k: self.top_k,
            seed: self.seed,
            frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            stop,
        };
        params.validate().map_err(|e| GatewayError::BadRequest {
            message: e.to_string(),
            param: None,
            code: "invalid_value",
        })?;
        Ok((params, self.stream.unwrap_or(false)))
    }
}

/// Adds `x-merge-id` (merges) and `x-merge-cache` to a response.
pub fn model_headers(res: &mut HttpResponseBuilder, handle: &ModelHandle) {
    if let Some(id) = handle.merge_id() {
        res.insert_header((MERGE_ID_HEADER, id.to_string()));
    }
    res.insert_header((MERGE_CACHE_HEADER, handle.status.as_str()));
}

/// A fresh response id with the given prefix (`chatcmpl`, `cmpl`).
pub fn response_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
