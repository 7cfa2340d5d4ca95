//! The decoder-only transformer for the Llama, Mistral and Qwen2 families
//! ([`crate::architectures`] registers them) on candle, configured from a Hugging Face config.json and
//! fed weights by their Hugging Face names, from a checkpoint folder or from
//! an in-memory tensor map (used without a copy when already in the compute
//! dtype and on the device).
//!
//! Hook points for the data-driven merge methods:
//! - every block's MLP is a `Box<dyn Mlp>`, replaceable with
//!   [`Model::set_mlp`] (routed ensembles of experts go there);
//! - the input of every linear layer can be captured through
//!   [`Hooks::capturing`] (RegMean's Gram matrices);
//! - built with `differentiable: true`, the forward pass is made of
//!   differentiable candle ops, so gradients reach any weight that is a `Var`
//!   or computed from one (AdaMerging's coefficients, router training).
//!
//! Logits match candle-transformers' `llama` and `qwen2` within 1e-4 in f32
//! (`runtime/tests/parity.rs`). Mistral's sliding-window attention is not
//! applied: attention is full causal, which is exact for sequences no longer
//! than `sliding_window`.

mod attention;
mod batch;
mod cache;
pub mod config;
pub mod delta;
mod host_attention;
mod host_terms;
pub mod layers;
pub mod mask;
pub mod paged;
pub mod random;
mod skinny;
pub mod transformer;
pub(crate) mod weights;

pub use batch::BatchInput;
pub use cache::KvCache;
pub use config::{Family, ModelConfig};
pub use delta::{DeltaRun, ModelDelta, TensorDelta};
pub use layers::{GatedMlp, Hooks, Linear, LinearCapture, Mlp, RmsNorm, Rope, RopeTables};
pub use mask::BitMask;
pub use paged::{KvBudget, KvPool, PagedCache};
pub use transformer::{Model, ModelOptions, EMBED};

#[cfg(test)]
mod tests;
