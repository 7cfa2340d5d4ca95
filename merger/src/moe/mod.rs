//! Weight-ensembling mixtures of experts: FusionBench's `we_moe`,
//! `sparse_we_moe` and `rankone_moe` (Tang et al. 2024, "Merging Multi-Task
//! Models via Weight-Ensembling Mixture of Experts", arXiv:2402.00433; Yi et
//! al. 2024, RankOne-MoE).
//!
//! The result is not one weight set but a routed model:
//! - every tensor outside the MLPs is task arithmetic, θ0 + λ Σ τi
//!   (λ = `init_lambda`, 0.3);
//! - every block's MLP keeps the frozen base MLP θ0 and the T MLP task
//!   vectors τi; a router reading the MLP input gives routing weights r and
//!   the MLP used is θ0 + Σ ri τi. Since each linear map is linear in its
//!   weights, the forward computes W0·x + Σ ri (τi·x) with the T task vectors
//!   stacked into one matrix, never a per-sample weight matrix
//!   ([`routed_mlp`]);
//! - routing per sequence (the mean over tokens of the router's outputs,
//!   FusionBench's default) or per token (`routing: per_token`). With a KV
//!   cache, per-sequence routing is computed on the prompt (the first forward
//!   call through the cache) and kept for the generated tokens;
//! - `sparse_we_moe` keeps only the entries of each MLP task vector whose
//!   magnitude is above its `tv_prune_ratio` quantile and shares one router
//!   between all layers ([`sparse`]); `rankone_moe` replaces each MLP task
//!   vector by its top `rank_k` SVD components, T·k rank-one experts
//!   weighted by a Linear(d→T·k) router ([`rankone`]).
//!
//! Routers are trained by test-time adaptation ([`train`]): entropy
//! minimisation of the next-token distribution on unlabeled inputs, with
//! Adam; only the routers are trainable. [`build`] does it all from a spec;
//! [`MoeModel::save`] writes a Hugging Face style folder that
//! [`runtime::model::Model::load`] loads back ([`checkpoint`]).

mod assemble;
pub mod build;
pub mod calibration;
pub mod checkpoint;
pub mod frozen;
pub mod params;
mod progress;
pub mod rankone;
pub mod routed_mlp;
pub mod router;
pub mod sparse;
pub mod train;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use build::{build, build_cancellable, merge_id};
pub(crate) use checkpoint::is_moe_folder;
pub use params::MoeParams;
pub use router::Router;
pub use train::{EntropyPositions, TrainReport};

use runtime::model::{Model, ModelConfig};

/// The routed-ensemble methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoeMethod {
    /// Dense MLP task vectors, one two-layer router per block.
    WeMoe,
    /// Magnitude-pruned MLP task vectors, one router shared by all blocks.
    SparseWeMoe,
    /// Top-k SVD components of the MLP task vectors as rank-one experts.
    RankoneMoe,
}

impl MoeMethod {
    /// Every method, in documentation order.
    pub const ALL: [MoeMethod; 3] = [
        MoeMethod::WeMoe,
        MoeMethod::SparseWeMoe,
        MoeMethod::RankoneMoe,
    ];

    /// The method's name in specs.
    pub fn name(self) -> &'static str {
        match self {
            MoeMethod::WeMoe => "we_moe",
            MoeMethod::SparseWeMoe => "sparse_we_moe",
            MoeMethod::RankoneMoe => "rankone_moe",
        }
    }

    /// The method called `name`, if it is a routed ensemble.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// How routing weights are computed from the router's per-token outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// One weight vector per sequence: the mean over its tokens (FusionBench).
    #[default]
    PerSequence,
    /// One weight vector per token.
    PerToken,
}

impl Routing {
    /// The spelling in specs and config.json.
    pub fn name(self) -> &'static str {
        match self {
            Routing::PerSequence => "per_sequence",
            Routing::PerToken => "per_token",
        }
    }
}

/// The `fusion_moe` object of a saved MoE's config.json: what the folder
/// holds and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeMeta {
    /// Layout version of the folder (1).
    pub format_version: u32,
    /// The method.
    pub method: MoeMethod,
    /// Number of expert checkpoints T.
    pub num_experts: usize,
    /// The experts' checkpoint names, in router output order.
    pub experts: Vec<String>,
    /// The base checkpoint's name.
    pub base: String,
    /// Per-sequence or per-token routing.
    pub routing: Routing,
    /// λ of the task-arithmetic backbone and the routers' initial output.
    pub init_lambda: f64,
    /// Rank-one components kept per task vector (`rankone_moe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_k: Option<usize>,
    /// Quantile of |τ| below which task-vector entries were dropped
    /// (`sparse_we_moe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tv_prune_ratio: Option<f64>,
    /// Router shape.
    pub router: RouterMeta,
    /// How the routers were trained (absent: untrained or loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainReport>,
    /// The spec the MoE was built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<serde_json::Value>,
}

/// The routers' shape, as recorded in config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterMeta {
    /// Width of the hidden layer (absent: a single linear layer).
    pub hidden: Option<usize>,
    /// Router outputs: T, or T·k for `rankone_moe`.
    pub outputs: usize,
    /// One router for all blocks (`sparse_we_moe`) or one per block.
    pub shared: bool,
}

/// The experts of one linear map of a block's MLP.
#[derive(Debug, Clone)]
pub enum LinearExperts {
    /// T task vectors stacked: weight `(T, out, in)`, bias `(T, out)`.
    Dense {
        /// Stacked weight task vectors.
        weight: Tensor,
        /// Stacked bias task vectors, when the MLP has biases.
        bias: Option<Tensor>,
    },
    /// T·k rank-one components `u s vᵀ`: `u` is `(out, T·k)` (column i·k+j is
    /// uij), `sv` is `(T·k, in)` (row i·k+j is sij·vijᵀ).
    RankOne {
        /// Left factors, expert-major columns.
        u: Tensor,
        /// Scaled right factors, expert-major rows.
        sv: Tensor,
    },
}

impl LinearExperts {
    /// Every tensor, for byte and parameter counts.
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            LinearExperts::Dense { weight, bias } => {
                std::iter::once(weight).chain(bias.iter()).collect()
            }
            LinearExperts::RankOne { u, sv } => vec![u, sv],
        }
    }
}

/// The three projections of an MLP, in `gate, up, down` order.
pub const PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// One router per block, or one shared by every block.
#[derive(Debug, Clone)]
pub enum Routers {
    /// `routers[i]` routes block i.
    PerLayer(Vec<Router>),
    /// One router for every block.
    Shared(Router),
}

impl Routers {
    /// The router of block `layer`.
    pub fn for_layer(&self, layer: usize) -> &Router {
        match self {
            Routers::PerLayer(r) => &r[layer],
            Routers::Shared(r) => r,
        }
    }

    /// Every distinct router.
    pub fn all(&self) -> Vec<&Router> {
        match self {
            Routers::PerLayer(r) => r.iter().collect(),
            Routers::Shared(r) => vec![r],
        }
    }

    /// Applies `f` to every router.
    pub fn try_map(&self, f: impl Fn(&Router) -> crate::Result<Router>) -> crate::Result<Routers> {
        Ok(match self {
            Routers::PerLayer(r) => {
                Routers::PerLayer(r.iter().map(f).collect::<crate::Result<_>>()?)
            }
            Routers::Shared(r) => Routers::Shared(f(r)?),
        })
    }
}

/// Everything a routed model is made of, in the compute dtype on the
/// compute device: what [`MoeModel`] assembles, saves and counts.
#[derive(Debug, Clone)]
pub struct MoeParts {
    /// The architecture.
    pub config: ModelConfig,
    /// The base's config.json (other keys are kept when saving).
    pub hf_config: serde_json::Value,
    /// What the MoE is.
    pub meta: MoeMeta,
    /// Hugging Face named tensors: task arithmetic outside the MLPs, the
    /// base's MLP weights (and, for `rankone_moe`, task-arithmetic MLP
    /// biases).
    pub backbone: HashMap<String, Tensor>,
    /// `experts[layer][p]`: the experts of projection `PROJECTIONS[p]`.
    pub experts: Vec<[LinearExperts; 3]>,
    /// The routers.
    pub routers: Routers,
    /// The dtype tensors are written in by [`MoeModel::save`] (routers are
    /// always f32).
    pub store_dtype: candle_core::DType,
    /// Where config side files (tokenizer, generation config) come from.
    pub side_files: Option<PathBuf>,
}

/// Parameter counts of a routed model, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// Backbone parameters (task-arithmetic tensors plus the base MLPs).
    pub backbone: usize,
    /// Stored expert values (dense: T per task-vector entry; rank-one: the
    /// factors).
    pub expert_values: usize,
    /// Non-zero expert values (what a sparse format would store).
    pub expert_nonzero: usize,
    /// Router parameters (trainable), each shared router counted once.
    pub router: usize,
}

/// A built (and possibly trained) routed ensemble with the runnable
/// [`Model`] made from it.
pub struct MoeModel {
    parts: MoeParts,
    model: Model,
}

impl MoeModel {
    /// Assembles the runnable (inference) model from its parts.
    pub fn from_parts(parts: MoeParts) -> crate::Result<Self> {
        let model = assemble::assemble(&parts, &parts.routers, false)?;
        Ok(MoeModel { parts, model })
    }

    /// The runnable model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The runnable model, for serving (the parts are dropped; their tensors
    /// live on inside the model).
    pub fn into_model(self) -> Model {
        self.model
    }

    /// The parts the model is made of.
    pub fn parts(&self) -> &MoeParts {
        &self.parts
    }

    /// What the MoE is and how it was trained.
    pub fn meta(&self) -> &MoeMeta {
        &self.parts.meta
    }

    /// Bytes of the resident tensors (backbone, experts, routers), for cache
    /// weighing. The model shares these tensors; nothing is counted twice.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let p = &self.parts;
        let backbone: u64 = p.backbone.values().map(size).sum();
        let experts: u64 = p
            .experts
            .iter()
            .flat_map(|l| l.iter().flat_map(LinearExperts::tensors))
            .map(size)
            .sum();
        let routers: u64 = p
            .routers
            .all()
            .iter()
            .flat_map(|r| r.tensors())
            .map(|(_, t)| size(t))
            .sum();
        backbone + experts + routers
    }

    /// Parameter counts by part.
    pub fn param_counts(&self) -> crate::Result<ParamCounts> {
        let p = &self.parts;
        let backbone = p.backbone.values().map(Tensor::elem_count).sum();
        let mut expert_values = 0;
        let mut expert_nonzero = 0;
        for t in p
            .experts
            .iter()
            .flat_map(|l| l.iter().flat_map(LinearExperts::tensors))
        {
            expert_values += t.elem_count();
            expert_nonzero += sparse::count_nonzero(t)?;
        }
        let router = p.routers.all().iter().map(|r| r.num_parameters()).sum();
        Ok(ParamCounts {
            backbone,
            expert_values,
            expert_nonzero,
            router,
        })
    }

    /// Writes the MoE as a Hugging Face style folder (see [`checkpoint`]).
    pub fn save(
        &self,
        dir: &Path,
        opts: &runtime::checkpoint::WriteOptions,
    ) -> crate::Result<PathBuf> {
        checkpoint::save(&self.parts, dir, opts)
    }

    /// Loads a folder written by [`MoeModel::save`].
    pub fn load(dir: &Path, opts: &runtime::model::ModelOptions) -> crate::Result<Self> {
        let parts = checkpoint::load(dir, opts)?;
        Self::from_parts(parts)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
