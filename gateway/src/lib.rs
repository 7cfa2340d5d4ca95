//! The Fusion Gateway HTTP server (`fusion serve`): OpenAI-compatible
//! routes that serve checkpoints and merges named in the request, a
//! byte-bounded LRU of merged weights with single-flight merging, admission
//! control, bearer keys, Prometheus metrics and an OpenAPI document.
//!
//! Layout: [`config`] (YAML + env) → [`state::AppState`] ([`registry`],
//! [`cache`], [`merges`], [`limits`], [`auth`], [`metrics`]) → [`routes`]
//! (thin adapters) → [`serving`] (the one execution path) → [`engine`] (the
//! model). [`evaluations`] scores configured merges in the background. [`error`] decides every status; [`server`] binds and shuts down.

#![deny(missing_docs)]

pub mod auth;
pub mod cache;
pub mod config;
pub mod engine;
pub mod error;
pub mod evaluations;
pub mod limits;
pub mod merges;
pub mod metrics;
pub mod openapi;
pub mod registry;
pub mod routes;
pub mod server;
pub mod serving;
pub mod state;

pub use config::Config;
pub use error::{GatewayError, Result};
pub use server::{run, spawn, RunningServer};

/// Response header: the canonical merge id (`merge-<id>`) of merges.
pub const MERGE_ID_HEADER: &str = "x-merge-id";
/// Response header: `hit`, `miss` or `joined`.
pub const MERGE_CACHE_HEADER: &str = "x-merge-cache";
/// Request/response header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
