//! `regmean_plusplus` (Nguyen et al. 2025, "RegMean++: Enhancing
//! Effectiveness and Generalization of Regression Mean for Model Merging"):
//! RegMean's closed form ([`super::regmean`]), block by block, with each
//! block's Grams taken where the merged model will feed it:
//!
//! ```text
//! for l = 0 … L−1:
//!   for each expert i: X_i^(l) = the inputs of block l's linear layers when expert i's
//!                      model runs on its own data with blocks 0 … l−1 replaced by the merge
//!   merge block l by  Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ  on those Grams; its other tensors by the mean
//! then the layers after the blocks (an untied LM head) the same way on the merged blocks
//! ```
//!
//! Everything before block 0 (the embeddings) is the expert's own on its
//! path and the experts' mean in the result, as in RegMean, so on a model
//! of one block and no head RegMean++ is RegMean. Only one block's Grams
//! are held at a time; they depend on the other experts (through the merged
//! prefix) and are not kept in the statistics cache.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::network::Family;
use super::regmean::{assemble, collect_grams, GRAM_BATCH};
use super::{bar, expert_tensors, DataContext, DataReport, Expert};
use crate::error::Result;

pub(crate) fn merge(
    ctx: &DataContext,
    family: &Family,
    experts: &[Expert],
    report: &mut DataReport,
) -> Result<HashMap<String, Tensor>> {
    let thetas = expert_tensors(experts, ctx.device)?;
    let blocks = family.num_blocks();
    let per_pass: usize = experts
        .iter()
        .map(|e| e.items.len().div_ceil(GRAM_BATCH))
        .sum();
    let progress = bar(
        (per_pass * (blocks + 1)) as u64,
        "regmean_plusplus: block Grams",
        ctx.progress,
    );
    let start = std::time::Instant::now();
    let mut merged: HashMap<String, Tensor> = HashMap::new();
    // Stage l < blocks is block l; stage `blocks` is what follows them.
    for stage in 0..=blocks {
        let in_stage = |name: &str| match family.block_of(name) {
            Some(b) => b == stage,
            None => stage == blocks,
        };
        let mut grams = Vec::with_capacity(experts.len());
        for (e, theta) in experts.iter().zip(&thetas) {
            let tensors: HashMap<String, Tensor> = theta
                .iter()
                .map(|(n, t)| {
                    let done = family.block_of(n).is_some_and(|b| b < stage);
                    let t = if done { merged[n].clone() } else { t.clone() };
                    (n.clone(), t)
                })
                .collect();
            let net = family.build(tensors, ctx.device, DType::F32, false)?;
            grams.push(collect_grams(
                &net,
                &e.items,
                &in_stage,
                ctx,
                &progress,
                &mut report.forward_batches,
            )?);
        }
        let part = assemble(
            &thetas,
            &grams,
            ctx.params.reduce_non_diagonal_ratio,
            ctx.device,
            &in_stage,
        )?;
        merged.extend(part);
    }
    progress.finish_and_clear();
    report.calibration_seconds += start.elapsed().as_secs_f64();
    report.stats_misses += (experts.len() * (blocks + 1)) as u64;
    Ok(merged)
}
