//! What a bounded parameter of a merge counts: the kinds of work (an
//! optimiser's iterations, router training steps, ...) whose size a spec
//! chooses, each with its own upper bound in [`crate::Bounds`] and named by
//! [`crate::MergeError::OverBound`] when a spec asks for more.

/// What a bounded parameter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Work {
    /// Optimiser iterations per tensor (WUDI's `iterations`).
    Iterations,
    /// Training steps (`steps` of `we_moe`, `adamerging`, ...).
    RouterSteps,
    /// Sequences per router training step (`batch_size`).
    BatchSize,
    /// Calibration inputs read per expert (`num_samples` of the data-driven
    /// merges).
    Samples,
    /// Components kept per task vector (`rank_k` of `rankone_moe`).
    Rank,
    /// Entries of one list in a spec (gradient or filter lists).
    ListLength,
}

impl Work {
    /// Every kind.
    pub const ALL: [Work; 6] = [
        Work::Iterations,
        Work::RouterSteps,
        Work::BatchSize,
        Work::Samples,
        Work::Rank,
        Work::ListLength,
    ];

    /// What the bound counts, for error messages.
    pub fn unit(self) -> &'static str {
        match self {
            Work::Iterations => "optimiser iterations",
            Work::RouterSteps => "training steps",
            Work::BatchSize => "sequences per training step",
            Work::Samples => "calibration inputs per expert",
            Work::Rank => "components per task vector",
            Work::ListLength => "entries in one list",
        }
    }
}
