//! The model runtime: a decoder-only transformer for the Llama, Mistral and
//! Qwen2 families on candle, configured from a Hugging Face config.json and
//! fed weights by their Hugging Face names.
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
//! Mistral's sliding-window attention is not applied: attention is full
//! causal, which is exact for sequences shorter than `sliding_window`.

pub mod config;
pub mod layers;
pub mod random;
pub mod transformer;

pub use config::{Family, ModelConfig};
pub use layers::{GatedMlp, Hooks, Linear, LinearCapture, Mlp, RmsNorm, Rope};
pub use transformer::{KvCache, Model, ModelOptions};
