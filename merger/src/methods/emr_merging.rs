//! EMR-Merging (Huang et al. 2024, "EMR-Merging: Tuning-Free
//! High-Performance Model Merging", arXiv:2405.17461), as FusionBench's
//! `emr_merging`: elect one unified task vector, then give each task a
//! mask and a rescaler.
//!
//! ```text
//! τi = θi − θ0
//! σ = sign(Σi τi), with 0 taken as −1           (FusionBench: (Στ > 0)·2 − 1)
//! m_i = (τi · σ > 0)                            per task
//! U = σ · maxi |m_i ⊙ τi|                       the unified vector
//! r_i = Σ_W mean|τi[W]| / Σ_W mean|(m_i ⊙ U)[W]|   over every tensor W of the model
//! θ_t = θ0 + r_t · (m_t ⊙ U)
//! ```
//!
//! The rescalers are model-wide: [`MergeMethod::prepare`] sums both means
//! over every tensor first (tensor by tensor, added in name order so the
//! result does not depend on scheduling). A task whose masked unified
//! vector is zero everywhere keeps r = 1 (its view is θ0 either way).
//! EMR has no hyperparameter; `task` (required) names the view.

use std::sync::Mutex;

use candle_core::Tensor;
use runtime::model::BitMask;

use super::retrieval::{self, Retrieval, TASK};
use super::schema::Param;
use super::{MergeMethod, ModelScan, Params, TensorInputs};
use crate::error::Result;

/// The parameters of `emr_merging`.
pub static PARAMS: &[&Param] = &[&TASK];

/// The task's view of the elected unified vector.
struct EmrMerging {
    task: usize,
    tasks: usize,
    /// r_i, once prepared.
    rescalers: Vec<f64>,
}

/// Builds `emr_merging`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let task = retrieval::task(p)?;
    Ok(Box::new(EmrMerging {
        task,
        tasks: p.num_models,
        rescalers: vec![1.0; p.num_models],
    }))
}

/// One tensor's election from its task vectors: U and every task's mask.
fn elect(taus: &[Vec<f32>]) -> (Vec<f32>, Vec<BitMask>) {
    let n = taus.first().map_or(0, Vec::len);
    let sign: Vec<f32> = (0..n)
        .map(|j| {
            if taus.iter().map(|t| t[j]).sum::<f32>() > 0.0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect();
    let masks: Vec<BitMask> = taus
        .iter()
        .map(|t| BitMask::from_fn(n, |j| t[j] * sign[j] > 0.0))
        .collect();
    let unified = (0..n)
        .map(|j| {
            let max = taus
                .iter()
                .zip(&masks)
                .filter(|(_, m)| m.get(j))
                .map(|(t, _)| t[j].abs())
                .fold(0f32, f32::max);
            sign[j] * max
        })
        .collect();
    (unified, masks)
}

impl Retrieval for EmrMerging {
    fn split(&self, inputs: &TensorInputs, t: usize) -> Result<(Vec<f32>, BitMask)> {
        let (_, taus) = retrieval::base_and_taus(inputs);
        let (unified, mut masks) = elect(&taus);
        Ok((unified, masks.swap_remove(t)))
    }

    fn scale(&self, t: usize) -> f64 {
        self.rescalers[t]
    }

    fn task(&self) -> usize {
        self.task
    }
}

impl MergeMethod for EmrMerging {
    fn prepare(&mut self, scan: &dyn ModelScan) -> Result<()> {
        // Per tensor: (name, Σ|τi|/n, Σ|m_i ⊙ U|/n for each task).
        type Means = (String, Vec<f64>, Vec<f64>);
        let found: Mutex<Vec<Means>> = Mutex::default();
        scan.for_each(&|inputs| {
            let (base, taus) = retrieval::base_and_taus(inputs);
            let n = base.len().max(1) as f64;
            let (unified, masks) = elect(&taus);
            let old: Vec<f64> = taus
                .iter()
                .map(|t| t.iter().map(|x| x.abs() as f64).sum::<f64>() / n)
                .collect();
            let new: Vec<f64> = masks
                .iter()
                .map(|m| {
                    unified
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| m.get(*j))
                        .map(|(_, u)| u.abs() as f64)
                        .sum::<f64>()
                        / n
                })
                .collect();
            found
                .lock()
                .expect("poisoned")
                .push((inputs.ctx.name.clone(), old, new));
            Ok(())
        })?;
        let mut found = found.into_inner().expect("poisoned");
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let mut old = vec![0f64; self.tasks];
        let mut new = vec![0f64; self.tasks];
        for (_, o, n) in &found {
            for i in 0..self.tasks {
                old[i] += o[i];
                new[i] += n[i];
            }
        }
        self.rescalers = old
            .iter()
            .zip(&new)
            .map(|(o, n)| if *n > 0.0 { o / n } else { 1.0 })
            .collect();
        Ok(())
    }

    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        retrieval::view(self, inputs)
    }

    fn retrieval(&self) -> Option<&dyn Retrieval> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use crate::methods::testutil::{assert_close, merge_all, Fixture};
    use crate::spec::{MergeSpec, ParamValue};

    fn spec(task: &str) -> MergeSpec {
        MergeSpec::new("emr_merging", Some("b"), &["x", "y"])
            .with_value("task", ParamValue::Text(task.into()))
    }

    /// Two tensors, θ0 = 0:
    /// a: τx = [2, −1, 0, 1], τy = [1, 3, −1, −1]
    /// b: τx = [4, 0], τy = [−2, −2]
    fn fixtures() -> Vec<Fixture> {
        vec![
            Fixture::new(
                "a",
                &[4],
                Some(&[0., 0., 0., 0.]),
                &[&[2., -1., 0., 1.], &[1., 3., -1., -1.]],
            ),
            Fixture::new("b", &[2], Some(&[0., 0.]), &[&[4., 0.], &[-2., -2.]]),
        ]
    }

    #[test]
    fn elects_a_unified_vector_with_a_mask_and_a_rescaler_per_task() {
        // a: Στ = [3, 2, −1, 0] → σ = [+, +, −, −] (0 → −1).
        //   mx = τx·σ > 0 = [1, 0, 0, 0]; my = [1, 1, 1, 1].
        //   U = σ·max|m⊙τ| = [2, 3, −1, −1].
        // b: Στ = [2, −2] → σ = [+, −]; mx = [1, 0]; my = [0, 1]; U = [4, −2].
        // Rescalers, means per tensor summed:
        //   x: old = mean|τx[a]| + mean|τx[b]| = 4/4 + 4/2 = 3;
        //      new = mean|mx⊙U[a]| + mean|mx⊙U[b]| = 2/4 + 4/2 = 2.5 → r = 1.2
        //   y: old = 6/4 + 4/2 = 3.5; new = 7/4 + 2/2 = 2.75 → r = 14/11
        // θx: a = 1.2·[2, 0, 0, 0], b = 1.2·[4, 0]
        // θy: a = 14/11·[2, 3, −1, −1], b = 14/11·[0, −2]
        let x = merge_all(&spec("x"), &fixtures());
        assert_close(&x[0], &[2.4, 0., 0., 0.], 1e-5);
        assert_close(&x[1], &[4.8, 0.], 1e-5);
        let r = 14.0 / 11.0;
        let y = merge_all(&spec("y"), &fixtures());
        assert_close(&y[0], &[2. * r, 3. * r, -r, -r], 1e-5);
        assert_close(&y[1], &[0., -2. * r], 1e-5);
    }

    #[test]
    fn the_task_is_required() {
        let none = MergeSpec::new("emr_merging", Some("b"), &["x", "y"]);
        let e = crate::methods::build(&none)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("task=NAME"), "{e}");
    }
}
