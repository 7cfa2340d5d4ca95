//! `fusion search`: black-box optimisation of a merge's parameters (each
//! expert's weight, global parameters, gradients over depth) against a task
//! pool's average or one task's metric, with a budget in evaluations, as
//! mergekit-evolve does it. [`config`] reads `search.yaml`; [`cmaes`] holds
//! the optimisers (CMA-ES and the random-search baseline); [`run`] asks
//! them for candidates and scores each generation's in parallel, merging in
//! memory exactly as `fusion compare` does; [`report`] writes the trace
//! (CSV) and the plot of the best score against evaluations (SVG).

pub mod cmaes;
pub mod config;
pub mod report;
pub mod run;

pub use config::{Algorithm, Objective, Overrides, SearchConfig};
pub use run::{run_search, Evaluation, SearchOptions, SearchOutcome};
