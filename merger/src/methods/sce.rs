//! SCE, select, calculate and erase (mergekit `sce`; Wan et al. 2024,
//! "FuseChat: Knowledge Fusion of Chat Models", arXiv:2408.07990).
//!
//! Per tensor, with the task vectors τi = θi − θ0 of n entries:
//!
//! ```text
//! select:    v[j] = Var_i τi[j] (population variance over the experts);
//!            k = ⌊select_topk · #{j : v[j] ≠ 0}⌋; keep the k entries of
//!            largest v in every τi (none when k = 0), zero the rest
//! calculate: wi = mean_j τi[j]² / Σi' mean_j τi'[j]²  (1/N when that sum < 1e-6)
//! erase:     s = + where Σi τi[j] ≥ 0, else −;  mi[j] = [sign τi[j] = s]
//! θ = θ0 + Σi wi mi τi / max(Σi wi mi, 1e-6)
//! ```
//!
//! `select_topk` = 1 (the default) selects everything (no variance pass);
//! ties of the variance rank by position (mergekit's `topk` leaves them to
//! the backend). A zero entry never agrees with the elected sign.
//!
//! Parameters: `select_topk` in [0, 1] (1.0), per-tensor resolvable;
//! `int8_mask` (accepted, no effect). The per-expert weights come from the
//! task vectors, so SCE takes no `weight`.

use candle_core::Tensor;
use rayon::prelude::*;

use super::schema::{common, DefaultValue, Param, Range, Type};
use super::task_vectors::agrees;
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};

/// mergekit's floor of the weights' sums.
const FLOOR: f64 = 1e-6;

/// Variance selection, energy weights, sign erasure.
#[derive(Debug)]
struct Sce {
    topk: Num,
}

/// The fraction of entries kept by variance.
static SELECT_TOPK: Param = Param::global(
    "select_topk",
    Type::Number,
    DefaultValue::Number(1.0),
    "fraction of the entries with non-zero variance across the experts kept (largest variance)",
)
.range(Range::UNIT);

/// The parameters of `sce`.
pub static PARAMS: &[&Param] = &[&SELECT_TOPK, &common::INT8_MASK];

/// Builds `sce`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    p.boolean(&common::INT8_MASK)?;
    Ok(Box::new(Sce {
        topk: p.number(&SELECT_TOPK)?,
    }))
}

/// Zeroes, in every τi, the entries outside the k of largest variance.
fn select(taus: &mut [Vec<f32>], topk: f64) {
    let n = taus[0].len();
    let t = taus.len() as f64;
    let var: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|j| {
            let mean = taus.iter().map(|x| x[j] as f64).sum::<f64>() / t;
            taus.iter()
                .map(|x| (x[j] as f64 - mean).powi(2))
                .sum::<f64>()
                / t
        })
        .collect();
    let nonzero = var.iter().filter(|v| **v != 0.0).count();
    let k = (nonzero as f64 * topk) as usize;
    let mut order: Vec<usize> = (0..n).collect();
    order.par_sort_by(|&a, &b| var[b].total_cmp(&var[a]).then(a.cmp(&b)));
    let mut keep = vec![false; n];
    for &j in &order[..k] {
        keep[j] = true;
    }
    for tau in taus.iter_mut() {
        tau.par_iter_mut()
            .zip(&keep)
            .filter(|(_, k)| !**k)
            .for_each(|(x, _)| *x = 0.0);
    }
}

impl MergeMethod for Sce {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let base = inputs
            .base
            .as_ref()
            .ok_or_else(|| MergeError::MissingBase {
                method: "sce".into(),
            })?;
        let b = base.to_f32_vec();
        let mut taus = inputs.host_vectors(Some(&b));
        let topk = self.topk.at(&inputs.ctx)?;
        if topk < 1.0 {
            select(&mut taus, topk);
        }
        let n = b.len().max(1) as f64;
        let energy: Vec<f64> = taus
            .iter()
            .map(|t| t.par_iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / n)
            .collect();
        let total: f64 = energy.iter().sum();
        let weights: Vec<f32> = if total.abs() < FLOOR {
            vec![1.0 / taus.len() as f32; taus.len()]
        } else {
            energy.iter().map(|e| (e / total) as f32).collect()
        };
        let mut out = vec![0f32; b.len()];
        out.par_iter_mut().enumerate().for_each(|(j, o)| {
            let sum: f32 = taus.iter().map(|t| t[j]).sum();
            let (mut kept, mut divisor) = (0f32, 0f32);
            for (t, &w) in taus.iter().zip(&weights) {
                if agrees(sum, t[j]) {
                    kept += w * t[j];
                    divisor += w;
                }
            }
            *o = b[j] + kept / divisor.max(FLOOR as f32);
        });
        inputs.from_host(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::methods::testutil::{assert_close, merge1, Fixture};
    use crate::spec::MergeSpec;

    #[test]
    fn energy_weights_and_sign_erasure() {
        // θ0 = 0; τ1 = [2, −2, 0, 2], τ2 = [1, 1, −1, 0]:
        // energies 12/4 = 3 and 3/4 → w = [0.8, 0.2].
        // Σ τ = [3, −1, −1, 2] → signs [+, −, −, +]; kept weights per entry:
        // [1, 0.8, 0.2, 0.8] → θ = [(1.6 + 0.2)/1, −1.6/0.8, −0.2/0.2, 1.6/0.8].
        let fx = Fixture::new(
            "w",
            &[4],
            Some(&[0.; 4]),
            &[&[2., -2., 0., 2.], &[1., 1., -1., 0.]],
        );
        let s = MergeSpec::new("sce", Some("base"), &["x", "y"]);
        assert_close(&merge1(&s, &fx), &[1.8, -2., -1., 2.], 1e-6);
    }

    #[test]
    fn select_keeps_the_entries_of_largest_variance() {
        // θ0 = 1; τ1 = [1, 0, 3, 5], τ2 = [1, 2, −3, 1]: variances [0, 1, 9, 4]
        // (3 non-zero); select_topk 0.67 → k = ⌊2.01⌋ = 2: entries 2 and 3.
        // τ1' = [0, 0, 3, 5], τ2' = [0, 0, −3, 1]; energies 34/4, 10/4 → w = [17/22, 5/22].
        // Σ = [0, 0, 0, 6]: entries 0, 1 have no agreeing entry (θ0); entry 2: s ≥ 0 → +
        // keeps τ1' = 3 with weight 17/22 → 3; entry 3: both agree → (5·17 + 1·5)/22.
        let fx = Fixture::new(
            "w",
            &[4],
            Some(&[1.; 4]),
            &[&[2., 1., 4., 6.], &[2., 3., -2., 2.]],
        );
        let s = MergeSpec::new("sce", Some("base"), &["x", "y"]).with("select_topk", 0.67);
        assert_close(&merge1(&s, &fx), &[1., 1., 4., 1. + 90. / 22.], 1e-5);
        // select_topk 0: nothing selected, θ = θ0.
        let s = MergeSpec::new("sce", Some("base"), &["x", "y"]).with("select_topk", 0.0);
        assert_close(&merge1(&s, &fx), &[1.; 4], 0.0);
    }

    #[test]
    fn parameter_ranges() {
        let s = |v: f64| MergeSpec::new("sce", Some("base"), &["x"]).with("select_topk", v);
        assert!(crate::methods::build(&s(1.1)).is_err());
        assert!(crate::methods::build(&s(-0.1)).is_err());
        assert!(crate::methods::build(&s(0.5)).is_ok());
        assert!(crate::methods::build(&MergeSpec::new("sce", None, &["x"])).is_err());
        let weighted = MergeSpec::new("sce", Some("base"), &["x"]).with("weight", 0.5);
        assert!(
            crate::methods::build(&weighted).is_err(),
            "sce takes no weight"
        );
    }
}
