//! Holding the task views of a per-task retrieval merge (`tall_masks`,
//! `emr_merging`; [`crate::methods::retrieval`]) over one resident base:
//!
//! ```text
//! θ_t = θ0 + s_t (m_t ⊙ U)
//! ```
//!
//! [`unified`] makes U resident once per merge (every tensor's U, held
//! dense as a delta over the base: what every view of the merge reads);
//! [`view`] holds one task's view as its mask's bits and its scale over
//! that U ([`runtime::model::TensorDelta::Masked`], form `masked`). A view
//! costs ⌈n/64⌉·8 bytes per tensor of n entries and 8 bytes of scale, and
//! serves exactly the weights the merge writes to a folder (U is rounded
//! to the serving dtype, as every delta is).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use runtime::model::{ModelDelta, TensorDelta};

use crate::error::{MergeError, Result};
use crate::merge::MergePlan;
use crate::methods::MergeMethod;
use crate::residency::{Compressed, ResidencyReport};
use crate::spec::Form;

fn retrieval_of(method: &dyn MergeMethod) -> Result<&dyn crate::methods::retrieval::Retrieval> {
    method.retrieval().ok_or_else(|| MergeError::Unsupported {
        feature: "form `masked` for this merge".into(),
        hint: "only tall_masks and emr_merging merges are task views over a unified vector".into(),
    })
}

fn report(
    tensors: usize,
    bytes: u64,
    shared: Option<u64>,
    dense: u64,
    start: Instant,
) -> ResidencyReport {
    ResidencyReport {
        form: Form::Masked,
        energy: None,
        rank: None,
        density: None,
        tensors,
        dense_tensors: 0,
        bytes,
        dense_bytes: dense,
        shared_bytes: shared,
        max_error: 0.0,
        mean_error: 0.0,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// The merge's unified vector U, every tensor's (all-zero ones left out),
/// held dense in `dtype` on `device`: the entry every task view of the
/// merge shares. Its report's `bytes` are U's.
pub fn unified(plan: &mut MergePlan, dtype: DType, device: &Device) -> Result<Compressed> {
    let start = Instant::now();
    let dense_bytes = plan.output_bytes();
    let found = plan.scan_prepared(&Device::Cpu, &|inputs, method| {
        let r = retrieval_of(method)?;
        let (u, _) = r.split(inputs, r.task())?;
        if u.iter().all(|&x| x == 0.0) {
            return Ok(None);
        }
        let t = Tensor::from_vec(u, inputs.shape(), &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(device))
            .map_err(|e| inputs.err(e))?;
        Ok(Some(t))
    })?;
    let tensors: HashMap<String, Arc<TensorDelta>> = found
        .into_iter()
        .filter_map(|(name, t)| t.map(|t| (name, Arc::new(TensorDelta::Dense(t)))))
        .collect();
    let n = tensors.len();
    let delta = ModelDelta::Owned(tensors);
    let bytes = delta.own_bytes();
    Ok(Compressed {
        delta,
        report: report(n, bytes, None, dense_bytes, start),
    })
}

/// The plan's task view as its mask and scale over `unified` (the merge's
/// resident U from [`unified`]): tensors U leaves out stay the base's, and
/// so do those whose mask is empty. Its report's `bytes` are the masks'
/// and the scale's, `shared_bytes` U's.
pub fn view(plan: &mut MergePlan, unified: &ModelDelta) -> Result<Compressed> {
    let start = Instant::now();
    let dense_bytes = plan.output_bytes();
    let ModelDelta::Owned(u) = unified else {
        return Err(MergeError::Unsupported {
            feature: "a task view over a combination".into(),
            hint: "the unified vector is held dense".into(),
        });
    };
    let found = plan.scan_prepared(&Device::Cpu, &|inputs, method| {
        let r = retrieval_of(method)?;
        let Some(held) = u.get(&inputs.ctx.name) else {
            return Ok(None);
        };
        let TensorDelta::Dense(ut) = held.as_ref() else {
            return Err(MergeError::Unsupported {
                feature: format!(
                    "tensor `{}` of the unified vector held compressed",
                    inputs.ctx.name
                ),
                hint: "the unified vector is held dense".into(),
            });
        };
        let (_, mask) = r.split(inputs, r.task())?;
        if mask.count_ones() == 0 {
            return Ok(None);
        }
        let d = TensorDelta::masked(ut, mask, r.scale(r.task())).map_err(|e| inputs.err(e))?;
        Ok(Some(d))
    })?;
    let tensors: HashMap<String, Arc<TensorDelta>> = found
        .into_iter()
        .filter_map(|(name, d)| d.map(|d| (name, Arc::new(d))))
        .collect();
    let n = tensors.len();
    let delta = ModelDelta::Owned(tensors);
    let bytes = delta.own_bytes();
    let shared = unified.own_bytes();
    Ok(Compressed {
        delta,
        report: report(n, bytes, Some(shared), dense_bytes, start),
    })
}
