//! `fusion compare`: several models (the base, each expert, merges,
//! hyperparameter sweeps) scored on one task pool, as one FusionBench-style
//! table. [`config`] reads `compare.yaml` into rows; [`run`] scores them.

pub mod config;
pub mod run;

pub use config::{cartesian, CompareConfig, RowSpec};
pub use run::{run_compare, CompareOptions};
