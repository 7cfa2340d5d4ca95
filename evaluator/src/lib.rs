//! Task pools, metrics, the runner and comparison tables of Fusion Gateway.
//!
//! - [`taskpool`]: folders of JSONL tasks (`multiple_choice`, `generate`,
//!   `perplexity`, `classification`, `similarity`,
//!   `embedding_classification`) and their validation;
//! - [`embedding`]: the scores of the embedding tasks (Spearman, Pearson,
//!   k-NN accuracy), as MTEB computes them;
//! - [`metrics`]: acc / acc_norm (as lm-eval-harness), exact match,
//!   perplexity, classification accuracy;
//! - [`runner`]: the [`runner::Scorer`] trait and the scoring of tasks with
//!   a sample limit and batching; [`textmodel`] implements it for the
//!   runtime's `TextModel` and `Runnable` (an embedding model scores the
//!   embedding tasks only);
//! - [`report`]: per-task reports and FusionBench-style comparison tables as
//!   markdown, CSV or JSON;
//! - [`pool`]: `pool.yaml`, the base and experts that specs refer to;
//! - [`source`]: what to evaluate (folder, pool checkpoint, merge) and
//!   loading it, merges made in memory;
//! - [`evaluate`]: one model on a task pool (`fusion eval`);
//! - [`compare`]: `compare.yaml`, its entries and sweeps expanded into rows,
//!   and their scoring (`fusion compare`);
//! - [`search`]: `search.yaml`, CMA-ES and random search over a merge's
//!   parameters, scored as `fusion compare` scores a row (`fusion search`).

#![deny(missing_docs)]

pub mod compare;
pub mod embedding;
pub mod error;
pub mod evaluate;
pub mod head;
pub mod metrics;
pub mod pool;
pub mod report;
pub mod runner;
pub mod search;
pub mod source;
pub mod taskpool;
pub mod textmodel;
pub mod views;

pub use error::{EvalError, Result};
