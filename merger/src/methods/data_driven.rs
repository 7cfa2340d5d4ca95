//! The parameters of the data-driven methods (`fisher_merging`, `regmean`,
//! `regmean_plusplus`, `adamerging`, `ada_svd`), declared here with the
//! other methods' so that the registry needs nothing of
//! [`crate::data_driven`], which builds them and validates a spec with
//! these declarations ([`crate::data_driven::DataParams`]). Defaults are
//! FusionBench's.

use super::schema::{DefaultValue, Param, Range, Type};
use crate::bounds::Work;

/// Calibration inputs read per expert.
pub(crate) static NUM_SAMPLES: Param = Param::global(
    "num_samples",
    Type::Integer,
    DefaultValue::Number(256.0),
    "calibration inputs read per expert (its own task's, in file order)",
)
.range(Range::at_least(1.0))
.work(Work::Samples);

/// Inputs per Fisher batch.
pub(crate) static FISHER_BATCH_SIZE: Param = Param::global(
    "batch_size",
    Type::Integer,
    DefaultValue::Number(32.0),
    "calibration inputs per gradient (the Fisher is a mean of squared batch gradients)",
)
.range(Range::at_least(1.0))
.work(Work::BatchSize);

/// Rescale each expert's Fisher by the inverse of its global norm.
pub(crate) static NORMALIZE_FISHER_WEIGHT: Param = Param::global(
    "normalize_fisher_weight",
    Type::Bool,
    DefaultValue::Bool(true),
    "weigh expert i by 1/‖Fi‖ (normalised over the experts) on top of 1/T",
);

/// Guard of the norm normalisation.
pub(crate) static EPSILON: Param = Param::global(
    "epsilon",
    Type::Scalar,
    DefaultValue::Number(1e-6),
    "added to ‖Fi‖ before it is inverted",
)
.range(Range::NON_NEGATIVE);

/// Added to every Fisher entry.
pub(crate) static MINIMAL_FISHER_WEIGHT: Param = Param::global(
    "minimal_fisher_weight",
    Type::Scalar,
    DefaultValue::Number(1e-6),
    "added to every Fisher entry, so that no weight is zero for every expert",
)
.range(Range::NON_NEGATIVE);

/// α of RegMean's off-diagonal reduction.
pub(crate) static REDUCE_NON_DIAGONAL_RATIO: Param = Param::global(
    "reduce_non_diagonal_ratio",
    Type::Scalar,
    DefaultValue::Number(0.95),
    "α: Gram off-diagonals scaled by α (1: plain least squares, 0: a diagonal, i.e. a weighted mean)",
)
.range(Range::UNIT);

/// AdaMerging's initial coefficient.
pub(crate) static INIT: Param = Param::global(
    "init",
    Type::Scalar,
    DefaultValue::Number(0.3),
    "initial λ of every task vector (0 steps: task arithmetic at this λ)",
);

/// AdaMerging's Adam learning rate.
pub(crate) static ADA_LR: Param = Param::global(
    "lr",
    Type::Scalar,
    DefaultValue::Number(1e-3),
    "Adam learning rate of the coefficients",
)
.range(Range::POSITIVE);

/// AdaMerging's Adam steps.
pub(crate) static ADA_STEPS: Param = Param::global(
    "steps",
    Type::Integer,
    DefaultValue::Number(1000.0),
    "Adam steps of entropy minimisation (0: task arithmetic at `init`)",
)
.range(Range::NON_NEGATIVE)
.work(Work::RouterSteps);

/// AdaMerging's inputs per task per step.
pub(crate) static ADA_BATCH_SIZE: Param = Param::global(
    "batch_size",
    Type::Integer,
    DefaultValue::Number(16.0),
    "calibration inputs of each task per step",
)
.range(Range::at_least(1.0))
.work(Work::BatchSize);

/// Task-wise or layer-wise coefficients.
pub(crate) static GRANULARITY: Param = Param::global(
    "granularity",
    Type::Choice(&["layer", "task"]),
    DefaultValue::Word("layer"),
    "one λ per expert (task) or one per expert per parameter tensor (layer)",
);

/// Clamp the coefficients to [0, 1] after each step.
pub(crate) static CLAMP: Param = Param::global(
    "clamp",
    Type::Bool,
    DefaultValue::Bool(false),
    "clamp every λ to [0, 1] after each step",
);

/// AdaSVD's gate rank.
pub(crate) static GATE_K: Param = Param::global(
    "gate_k",
    Type::Integer,
    DefaultValue::Number(16.0),
    "right singular vectors of each task vector that gate it",
)
.range(Range::at_least(1.0))
.work(Work::Rank);

/// The parameters of `fisher_merging`.
pub static FISHER_MERGING: &[&Param] = &[
    &NUM_SAMPLES,
    &FISHER_BATCH_SIZE,
    &NORMALIZE_FISHER_WEIGHT,
    &EPSILON,
    &MINIMAL_FISHER_WEIGHT,
];

/// The parameters of `regmean` and `regmean_plusplus`.
pub static REGMEAN: &[&Param] = &[&NUM_SAMPLES, &REDUCE_NON_DIAGONAL_RATIO];

/// The parameters of `adamerging`.
pub static ADAMERGING: &[&Param] = &[
    &GRANULARITY,
    &INIT,
    &ADA_LR,
    &ADA_STEPS,
    &ADA_BATCH_SIZE,
    &CLAMP,
    &NUM_SAMPLES,
];

/// The parameters of `ada_svd`.
pub static ADA_SVD: &[&Param] = &[&GATE_K, &NUM_SAMPLES];
