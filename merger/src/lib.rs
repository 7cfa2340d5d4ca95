//! Checkpoints → merge spec → merged model.
//!
//! The merge engine of Fusion Gateway: reads Hugging Face checkpoint folders
//! lazily ([`runtime::checkpoint`]), validates merge specs written in any of
//! three forms ([`spec`]) into one [`plan::Plan`], and either merges tensor
//! by tensor with the methods of FusionBench and mergekit ([`methods`]),
//! streaming the result into memory or a new checkpoint folder ([`merge`]),
//! or builds a routed ensemble of the experts ([`moe`]).
//!
//! Plan and run a merge in memory (here of a tiny random base and two
//! experts written first):
//!
//! ```
//! use std::sync::Arc;
//! use candle_core::{DType, Device, Tensor};
//! use merger::plan::{Plan, Run};
//! use merger::spec::MergeSpec;
//! use merger::Cancel;
//! use runtime::checkpoint::Checkpoint;
//! use runtime::model::random::{random_weights, write_checkpoint};
//! use runtime::model::ModelConfig;
//!
//! # fn main() -> merger::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let config = ModelConfig::from_json(
//!     r#"{"model_type": "llama", "vocab_size": 40, "hidden_size": 32,
//!         "intermediate_size": 48, "num_hidden_layers": 2,
//!         "num_attention_heads": 4, "num_key_value_heads": 2}"#,
//!     dir.path(),
//! )?;
//! for (seed, name) in ["base", "math", "code"].iter().enumerate() {
//!     let weights = random_weights(&config, seed as u64, 0.02)?;
//!     write_checkpoint(&dir.path().join(name), &config, &weights, DType::F32)?;
//! }
//!
//! // Validation, apart from execution: the method, its models and parameters.
//! let spec = MergeSpec::new("task_arithmetic", Some("base"), &["math", "code"]);
//! let plan = Plan::new(spec)?;
//! assert!(matches!(plan, Plan::Tensorwise(_)));
//!
//! // Execution: checkpoints opened by name, merged into a runnable model.
//! let open = |name: &str| -> merger::Result<Arc<Checkpoint>> {
//!     Ok(Checkpoint::open(name, &dir.path().join(name))?)
//! };
//! let run = Run {
//!     open: &open,
//!     calibration: &[],
//!     sources: &[],
//!     stats: None,
//!     device: &Device::Cpu,
//!     progress: false,
//!     cancel: &Cancel::new(),
//! };
//! let merged = plan.build(&run)?;
//! assert!(merged.resident_bytes > 0);
//! let model = merged.decoder().expect("a Llama merges into a decoder");
//! let ids = Tensor::new(&[[1u32, 2, 3]], model.device())?;
//! assert_eq!(model.forward(&ids, None)?.dims(), [1, 3, 40]);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod bounds;
pub mod data_driven;
pub mod error;
pub mod inputs;
pub mod kernels;
pub mod linalg;
pub mod load;
pub mod merge;
pub mod mergekit;
pub mod methods;
pub mod moe;
pub mod plan;
pub mod preflight;
pub mod residency;
pub mod retrieval;
pub mod select;
pub mod slices;
pub mod spec;
pub mod throughput;
pub mod tokenizer;
pub mod work;

pub use bounds::{Bounds, Cancel, Turn, Work};
pub use error::{MergeError, Result};
pub use load::{load_model, load_runnable, load_text_model};
