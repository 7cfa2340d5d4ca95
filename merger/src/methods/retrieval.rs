//! Per-task retrieval merges (FusionBench's `tall_masks` and
//! `emr_merging`): one unified task vector U shared by every task, and per
//! task t a binary mask m_t and a scale s_t,
//!
//! ```text
//! θ_t = θ0 + s_t · (m_t ⊙ U)
//! ```
//!
//! A merge of them is one task's view, named by `task` (one of the merge's
//! models): `emr_merging(add,sort,upper;task=sort)`. Merged to a folder or
//! scored, the view is a model like any other; served over a text
//! generation base, U is resident once per merge and each view holds only
//! its mask's bits and its scale (form `masked`, [`crate::retrieval`]).

use candle_core::Tensor;
use runtime::model::BitMask;

use super::schema::{DefaultValue, Param, Type};
use super::{Params, TensorInputs};
use crate::error::{MergeError, Result};

/// The task whose view the merge is.
pub static TASK: Param = Param::global(
    "task",
    Type::Expert,
    DefaultValue::Unset,
    "the task whose view θ0 + s_t·(m_t ⊙ U) the merge is (one model per task)",
);

/// A per-task retrieval merge, built and (for EMR) prepared.
pub trait Retrieval: Send + Sync {
    /// One tensor's unified vector U (host f32, storage order) and task
    /// `t`'s mask m_t.
    fn split(&self, inputs: &TensorInputs, t: usize) -> Result<(Vec<f32>, BitMask)>;

    /// Task `t`'s scale s_t (known once the method is prepared).
    fn scale(&self, t: usize) -> f64;

    /// The task the merge's view serves (spec order).
    fn task(&self) -> usize;
}

/// Whether `method` is a per-task retrieval merge (it declares `task`).
pub fn is_per_task(method: &str) -> bool {
    super::lookup(method).is_ok_and(|info| info.params.iter().any(|p| std::ptr::eq(*p, &TASK)))
}

/// Whether `spec` names its task (as the parameter or as `task:`).
pub fn names_task(spec: &crate::spec::MergeSpec) -> bool {
    spec.task.is_some() || spec.parameters.contains_key(TASK.name)
}

/// Reads `task`: required, one of the models (else a clear error naming
/// them, from [`Params::finish`]).
pub fn task(p: &mut Params) -> Result<usize> {
    p.required_expert(&TASK)
}

/// One tensor's θ0 and task vectors τi = θi − θ0 on the host (f32).
pub fn base_and_taus(inputs: &TensorInputs) -> (Vec<f32>, Vec<Vec<f32>>) {
    let base = inputs
        .base
        .as_ref()
        .map(|b| b.to_f32_vec())
        .unwrap_or_default();
    let taus = inputs.host_vectors(Some(&base));
    (base, taus)
}

/// θ_t = θ0 + s_t·(m_t ⊙ U) of one tensor, in f32.
pub fn view(r: &dyn Retrieval, inputs: &TensorInputs) -> Result<Tensor> {
    let t = r.task();
    let (u, mask) = r.split(inputs, t)?;
    let s = r.scale(t) as f32;
    let mut theta = inputs
        .base
        .as_ref()
        .ok_or_else(|| MergeError::Spec(format!("tensor `{}`: needs a base", inputs.ctx.name)))?
        .to_f32_vec();
    for (j, (th, u)) in theta.iter_mut().zip(&u).enumerate() {
        if mask.get(j) {
            *th += s * u;
        }
    }
    inputs.from_host(theta)
}
