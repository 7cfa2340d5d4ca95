//! The Fusion Gateway HTTP server (`fusion serve`): OpenAI-compatible
//! routes that serve checkpoints and merges named in the request, a
//! byte-bounded LRU of merged weights with single-flight merging, admission
//! control, bearer keys, Prometheus metrics and an OpenAPI document.
//!
//! Layout, dependencies pointing down the list:
//! - [`error`] decides every status; [`metrics`], [`paths`] and [`clock`]
//!   are leaves;
//! - [`config`] is plain data and its validation (YAML + env); [`limits`]
//!   checks requests against `server.limits` and admits generations;
//!   [`auth`] decides who may call a route;
//! - [`registry`] resolves what a request names (pools, presets, merge
//!   plans, routed plans) against the opened checkpoints; [`engine`] is a
//!   servable model;
//! - [`cache`] (the byte-bounded LRU) and [`merges`] (the book of merges and
//!   their loader) are owned by [`store`], the one way to a resident model;
//! - [`serving`] runs a resident model (the one generation path);
//!   [`evaluations`] scores configured merges in the background;
//! - [`state::AppState`] holds them all; [`routes`] are thin adapters onto
//!   the store and serving; [`openapi`] documents them and [`server`] binds
//!   and shuts down.

#![deny(missing_docs)]

pub mod auth;
pub mod batching;
pub mod cache;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod evaluations;
pub mod heads;
pub mod limits;
pub mod merges;
pub mod metrics;
pub mod openapi;
pub mod paths;
pub mod registry;
pub mod routes;
pub mod searches;
pub mod server;
pub mod serving;
pub mod state;
pub mod store;

pub use config::Config;
pub use error::{GatewayError, Result};
pub use server::{run, spawn, RunningServer};

/// Response header: the canonical merge id (`merge-<id>`) of merges.
pub const MERGE_ID_HEADER: &str = "x-merge-id";
/// Response header: `hit`, `miss` or `joined`.
pub const MERGE_CACHE_HEADER: &str = "x-merge-cache";
/// Request/response header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
