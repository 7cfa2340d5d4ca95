//! The parameters of the routed-ensemble methods (`we_moe`,
//! `sparse_we_moe`, `rankone_moe`), declared here with the other methods'
//! so that the registry needs nothing of [`crate::moe`], which builds them
//! and validates a spec with these declarations
//! ([`crate::moe::MoeParams`]).

use super::schema::{DefaultValue, Param, Range, Type};
use crate::bounds::Work;

/// λ of the backbone and of the routers' initial output.
pub(crate) static INIT_LAMBDA: Param = Param::global(
    "init_lambda",
    Type::Scalar,
    DefaultValue::Number(0.3),
    "λ of the backbone's task vectors and of the routers' initial output",
);

/// Per-sequence or per-token routing.
pub(crate) static ROUTING: Param = Param::global(
    "routing",
    Type::Choice(&["per_sequence", "per_token"]),
    DefaultValue::Word("per_sequence"),
    "one routing weight per sequence or per token",
);

/// Adam's learning rate.
pub(crate) static LR: Param = Param::global(
    "lr",
    Type::Scalar,
    DefaultValue::Number(1e-4),
    "Adam learning rate of the routers",
)
.range(Range::POSITIVE);

/// Router training steps.
pub(crate) static STEPS: Param = Param::global(
    "steps",
    Type::Integer,
    DefaultValue::Number(1000.0),
    "Adam steps on the calibration prompts (0: keep the untrained routers)",
)
.range(Range::NON_NEGATIVE)
.work(Work::RouterSteps);

/// Sequences per training step.
pub(crate) static BATCH_SIZE: Param = Param::global(
    "batch_size",
    Type::Integer,
    DefaultValue::Number(16.0),
    "calibration sequences per training step",
)
.range(Range::at_least(1.0))
.work(Work::BatchSize);

/// Which predictions' entropy the routers minimise.
pub(crate) static ENTROPY_POSITIONS: Param = Param::global(
    "entropy_positions",
    Type::Choice(&["answer", "last", "all"]),
    DefaultValue::Word("answer"),
    "the predictions whose entropy the routers minimise",
);

/// A trained router folder to load instead of training.
pub(crate) static ROUTER_CHECKPOINT: Param = Param::global(
    "router_checkpoint",
    Type::Checkpoint,
    DefaultValue::Unset,
    "a saved routed ensemble of the same method and shape whose routers are loaded instead of trained",
);

/// The pruning quantile of `sparse_we_moe`.
pub(crate) static TV_PRUNE_RATIO: Param = Param::global(
    "tv_prune_ratio",
    Type::Scalar,
    DefaultValue::Number(0.9),
    "quantile of |τ| below which the experts' task vectors are dropped",
)
.range(Range::UNIT_OPEN_ABOVE);

/// The rank of `rankone_moe`.
pub(crate) static RANK_K: Param = Param::global(
    "rank_k",
    Type::Integer,
    DefaultValue::Number(32.0),
    "SVD components kept per task vector",
)
.range(Range::at_least(1.0))
.work(Work::Rank);

/// The parameters of `we_moe`.
pub static WE_MOE: &[&Param] = &[
    &INIT_LAMBDA,
    &ROUTING,
    &LR,
    &STEPS,
    &BATCH_SIZE,
    &ENTROPY_POSITIONS,
    &ROUTER_CHECKPOINT,
];

/// The parameters of `sparse_we_moe`.
pub static SPARSE_WE_MOE: &[&Param] = &[
    &INIT_LAMBDA,
    &ROUTING,
    &LR,
    &STEPS,
    &BATCH_SIZE,
    &ENTROPY_POSITIONS,
    &ROUTER_CHECKPOINT,
    &TV_PRUNE_RATIO,
];

/// The parameters of `rankone_moe`.
pub static RANKONE_MOE: &[&Param] = &[
    &INIT_LAMBDA,
    &ROUTING,
    &LR,
    &STEPS,
    &BATCH_SIZE,
    &ENTROPY_POSITIONS,
    &ROUTER_CHECKPOINT,
    &RANK_K,
];
