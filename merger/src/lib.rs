//! Checkpoints → merge spec → merged model.
//!
//! The merge engine of Fusion Gateway: reads Hugging Face checkpoint folders
//! lazily ([`runtime::checkpoint`]), validates merge specs written in any of
//! three forms ([`spec`]) into one [`plan::Plan`], and either merges tensor
//! by tensor with the methods of FusionBench and mergekit ([`methods`]),
//! streaming the result into memory or a new checkpoint folder ([`merge`]),
//! or builds a routed ensemble of the experts ([`moe`]).

#![deny(missing_docs)]

pub mod bounds;
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
pub mod select;
pub mod spec;
pub mod throughput;
pub mod work;

pub use bounds::{Bounds, Cancel, Work};
pub use error::{MergeError, Result};
pub use load::{load_model, load_text_model};
