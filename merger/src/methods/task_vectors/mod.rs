//! The task-vector engine that TIES, DARE, breadcrumbs and mergekit's
//! generalized task arithmetic share: τi = θi − θ0 per tensor, sparsified,
//! sign-elected and mixed back onto θ0.
//!
//! - [`Source`]: every τi chunk by chunk, decoded straight from the stored
//!   bytes (the loader and output writer of every fused CPU loop);
//! - sparsification: magnitude trimming (`trim`: mergekit's `magnitude` and
//!   `magnitude_outliers`) and DARE's Bernoulli dropout (`dropout`, applied
//!   as the chunks load);
//! - sign consensus (`consensus`): the elections of TIES and of mergekit;
//! - [`MkMerge`]: mergekit's generalized task arithmetic (`ties`,
//!   `dare_linear`, `dare_ties`, and FusionBench's `dare` with a linear
//!   combine), and [`Mix`], the same combination on whole host vectors
//!   (`breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear`).
//!
//! The exact TIES of FusionBench (`ties_merging`, and `dare` with
//! `combine: ties`), whose thresholds and majority sign span the whole
//! model, stays with TIES ([`super::ties`]: the sampled range pass and the
//! one-pass merge) and runs on the same [`Source`].

mod consensus;
mod dropout;
mod generalized;
mod mix;
mod source;
mod trim;

pub(crate) use consensus::{agrees, elect, elect_tensor, picked};
pub(crate) use dropout::{streams, Dropout, EntryWords};
pub(crate) use generalized::MkMerge;
pub(crate) use mix::Mix;
pub(crate) use source::{add_trimmed, for_each_flag, mask16, sgn, Chunk, Source};
pub(crate) use trim::{magnitude_outliers, rescale_l1};

/// Entries per chunk of the fused loops.
pub(crate) const CHUNK: usize = 1 << 14;
/// Entries per block of a chunk that the FusionBench loops decode and work
/// on at once (θ0, every τ and the scratch stay in L1).
pub(crate) const BLOCK: usize = 1 << 10;
/// Tensors up to this size find their thresholds by in-memory selection.
pub(crate) const SMALL: usize = 1 << 16;
