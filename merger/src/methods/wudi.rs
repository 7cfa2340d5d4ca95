//! WUDI: data-free merging that minimises the interference each task vector
//! causes on its own inputs.
//!
//! Cheng et al., "Whoever Started the Interference Should End It: Guiding
//! Data-Free Model Merging via Task Vectors", arXiv:2503.08099, as
//! implemented by FusionBench (`method/wudi/wudi.py`).
//!
//! Per matrix (every 2-D tensor not named in `exclude_keys`, the token
//! embedding and `lm_head` included, as in FusionBench), the rows of τi
//! stand in for the inputs of task i, and the merged task vector τm
//! minimises
//!
//! ```text
//! L(τm) = Σi ‖(τm − τi) τiᵀ‖²_F / ‖τi‖²_F
//! ```
//!
//! starting from τm = Σi τi, with `iterations` steps of Adam (β1 0.9,
//! β2 0.999, ε 1e-8, no weight decay, torch's update rule) at rate `lr`.
//! The gradient is analytic,
//!
//! ```text
//! ∂L/∂τm = 2 Σi (τm − τi) Gi,   Gi = τiᵀ τi / ‖τi‖²
//!        = 2 (τm G − B),        G = Σi Gi,  B = Σi τi Gi
//! ```
//!
//! so each step costs one product τm·G (cols×cols), or, when the columns
//! outnumber 2·T·rows, (τm Sᵀ) S̃ with S the stacked τi and S̃ the stacked
//! τi/‖τi‖² (cheaper and smaller then). The arithmetic is f32 candle
//! tensor operations on the merge device (CUDA included), with a fused CPU
//! loop on faer when the device is the CPU. Task vectors equal to zero carry
//! no information and are left out of L (FusionBench would divide by zero).
//!
//! θ = θ0 + τm, with no scaling (FusionBench adds τm as is). Every other
//! tensor (1-D norms and biases, and the tensors named in `exclude_keys`):
//! θ0 + (1/T) Σ τi.
//!
//! Parameters:
//! - `iterations` (alias FusionBench's `iter_num`): integer ≥ 1, default 400,
//!   at most [`Bounds::iterations`](crate::Bounds) (the work it scales); the
//!   merge's [`Cancel`] token is checked between iterations.
//! - `lr`: > 0, default 1e-5 (FusionBench's fixed rate).
//! - `exclude_keys`: tensor names (or `*` patterns) left to the plain mean,
//!   default none (see `matrix_targets`). The embedding (vocab × hidden) is
//!   the costly matrix: each step multiplies it by a hidden × hidden Gram.

use candle_core::Tensor;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef};
use rayon::prelude::*;

use super::matrix_targets::MatrixTargets;
use super::schema::{common, DefaultValue, Param, Range, Type};
use super::{MergeMethod, ModelScan, Params, TensorInputs};
use crate::bounds::{Cancel, Work};
use crate::error::{MergeError, Result};
use crate::linalg;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
/// Entries per task of the fused CPU update.
const CHUNK: usize = 1 << 14;

/// Adam iterations per matrix.
static ITERATIONS: Param = Param::global(
    "iterations",
    Type::Integer,
    DefaultValue::Number(400.0),
    "Adam iterations per matrix",
)
.aliases(&["iter_num"])
.range(Range::at_least(1.0))
.work(Work::Iterations);

/// Adam's learning rate.
static LR: Param = Param::global(
    "lr",
    Type::Scalar,
    DefaultValue::Number(1e-5),
    "Adam learning rate",
)
.range(Range::POSITIVE);

/// The parameters of `wudi`.
pub static PARAMS: &[&Param] = &[&ITERATIONS, &LR, &common::EXCLUDE_KEYS];

/// Builds `wudi`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let iterations = p.integer(&ITERATIONS)?;
    let lr = p.scalar(&LR)?;
    let targets = MatrixTargets::from_params(p)?;
    Ok(Box::new(Wudi {
        iterations: iterations as usize,
        lr,
        targets,
    }))
}

/// WUDI with its validated optimiser settings.
struct Wudi {
    iterations: usize,
    lr: f64,
    targets: MatrixTargets,
}

impl MergeMethod for Wudi {
    fn prepare(&mut self, scan: &dyn ModelScan) -> Result<()> {
        self.targets.check(scan)
    }

    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        if !self.targets.includes(inputs) {
            return linalg::base_plus_mean(inputs, 1.0);
        }
        let base = inputs.base_f32()?;
        let taus = inputs.task_vectors()?;
        let run = || -> candle_core::Result<Option<Tensor>> {
            let Some(tm) = self.optimise(&taus, None, inputs.cancel)? else {
                return Ok(None);
            };
            base.add(&tm).map(Some)
        };
        match run() {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(MergeError::Cancelled),
            Err(e) => Err(inputs.err(e)),
        }
    }
}

impl Wudi {
    /// τm after `iterations` Adam steps from Σ τi; `None` when `cancel`
    /// stopped the steps.
    fn optimise(
        &self,
        taus: &[Tensor],
        path: Option<Path>,
        cancel: &Cancel,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut tm = taus[0].clone();
        for t in &taus[1..] {
            tm = tm.add(t)?;
        }
        let Some(problem) = Interference::new(taus, path)? else {
            return Ok(Some(tm));
        };
        if tm.device().is_cpu() {
            self.adam_cpu(&problem, &tm, cancel)
        } else {
            self.adam(&problem, tm, cancel)
        }
    }

    /// Adam in candle tensor operations (any device).
    fn adam(
        &self,
        problem: &Interference,
        mut tm: Tensor,
        cancel: &Cancel,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut m = tm.zeros_like()?;
        let mut v = tm.zeros_like()?;
        for step in 1..=self.iterations as i32 {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let g = problem.gradient(&tm)?;
            m = ((m * BETA1)? + (&g * (1.0 - BETA1))?)?;
            v = ((v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let bias1 = 1.0 - BETA1.powi(step);
            let bias2 = 1.0 - BETA2.powi(step);
            let denom = ((v.sqrt()? / bias2.sqrt())? + EPS)?;
            tm = (tm - (m.div(&denom)? * (self.lr / bias1))?)?;
        }
        Ok(Some(tm))
    }

    /// The same Adam on the CPU: the product by faer into a reused buffer and
    /// the update fused into one pass over the entries. Measured at 512×512,
    /// T = 4, Gram order: 2 ms per step against 22 ms for [`Wudi::adam`] on
    /// the CPU, where candle's dozen allocating elementwise operations per
    /// step cost more than the product itself.
    fn adam_cpu(
        &self,
        problem: &Interference,
        tm: &Tensor,
        cancel: &Cancel,
    ) -> candle_core::Result<Option<Tensor>> {
        let (rows, cols) = tm.dims2()?;
        let vec = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let mut x = vec(tm)?;
        let b = vec(&problem.b)?;
        let op = match &problem.op {
            Op::Gram(g) => (vec(g)?, Vec::new(), 0),
            Op::Tasks { stacked_t, scaled } => (vec(stacked_t)?, vec(scaled)?, stacked_t.dim(1)?),
        };
        let par = faer::get_global_parallelism();
        let mut h = vec![0f32; rows * cols];
        let mut p = vec![0f32; rows * op.2];
        let (mut m, mut v) = (vec![0f32; rows * cols], vec![0f32; rows * cols]);
        for step in 1..=self.iterations as i32 {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            {
                let xr = MatRef::from_row_major_slice(&x, rows, cols);
                let hm = MatMut::from_row_major_slice_mut(&mut h, rows, cols);
                if op.2 == 0 {
                    let g = MatRef::from_row_major_slice(&op.0, cols, cols);
                    matmul(hm, Accum::Replace, xr, g, 1.0, par);
                } else {
                    let st = MatRef::from_row_major_slice(&op.0, cols, op.2);
                    let sc = MatRef::from_row_major_slice(&op.1, op.2, cols);
                    let pm = MatMut::from_row_major_slice_mut(&mut p, rows, op.2);
                    matmul(pm, Accum::Replace, xr, st, 1.0, par);
                    let pr = MatRef::from_row_major_slice(&p, rows, op.2);
                    matmul(hm, Accum::Replace, pr, sc, 1.0, par);
                }
            }
            let step_size = (self.lr / (1.0 - BETA1.powi(step))) as f32;
            let root2 = (1.0 - BETA2.powi(step)).sqrt() as f32;
            let (b1, b2, eps) = (BETA1 as f32, BETA2 as f32, EPS as f32);
            x.par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(h.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(((x, m), v), (h, b))| {
                    for i in 0..x.len() {
                        let g = 2.0 * (h[i] - b[i]);
                        m[i] = b1 * m[i] + (1.0 - b1) * g;
                        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                        x[i] -= step_size * m[i] / (v[i].sqrt() / root2 + eps);
                    }
                });
        }
        Tensor::from_vec(x, (rows, cols), tm.device()).map(Some)
    }
}

/// How ∂L/∂τm is evaluated: τm·G, or (τm Sᵀ)·S̃.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    Gram,
    Tasks,
}

/// The precomputed parts of ∂L/∂τm = 2 (τm G − B).
struct Interference {
    op: Op,
    b: Tensor,
}

enum Op {
    /// G = Σi τiᵀ τi / ‖τi‖² (cols×cols).
    Gram(Tensor),
    /// Sᵀ (cols×T·rows) and S̃ (T·rows×cols): τm G = (τm Sᵀ) S̃.
    Tasks { stacked_t: Tensor, scaled: Tensor },
}

impl Interference {
    /// None when every τi is zero (nothing to optimise). `path` forces the
    /// evaluation order (tests); otherwise the cheaper one is taken.
    fn new(taus: &[Tensor], path: Option<Path>) -> candle_core::Result<Option<Self>> {
        let mut kept = Vec::new();
        let mut scaled = Vec::new();
        for t in taus {
            let norm2 = t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            if norm2 > 0.0 && norm2.is_finite() {
                kept.push(t.clone());
                scaled.push((t / norm2)?);
            }
        }
        if kept.is_empty() {
            return Ok(None);
        }
        let (rows, cols) = kept[0].dims2()?;
        // Per step: τm·G costs 2·rows·cols², (τm Sᵀ)·S̃ costs 4·T·rows²·cols.
        let path = path.unwrap_or(if cols <= 2 * kept.len() * rows {
            Path::Gram
        } else {
            Path::Tasks
        });
        let mut b: Option<Tensor> = None;
        for (t, s) in kept.iter().zip(&scaled) {
            // τi τiᵀ (τi/‖τi‖²), associated the cheaper way.
            let term = if rows <= cols {
                t.matmul(&t.t()?)?.matmul(s)?
            } else {
                t.matmul(&t.t()?.matmul(s)?)?
            };
            b = Some(match b {
                None => term,
                Some(acc) => acc.add(&term)?,
            });
        }
        let op = match path {
            Path::Gram => {
                let mut g = kept[0].t()?.matmul(&scaled[0])?;
                for (t, s) in kept.iter().zip(&scaled).skip(1) {
                    g = g.add(&t.t()?.matmul(s)?)?;
                }
                Op::Gram(g)
            }
            Path::Tasks => Op::Tasks {
                stacked_t: Tensor::cat(&kept, 0)?.t()?.contiguous()?,
                scaled: Tensor::cat(&scaled, 0)?,
            },
        };
        Ok(Some(Interference {
            op,
            b: b.expect("at least one task vector"),
        }))
    }

    /// ∂L/∂τm at `tm`.
    fn gradient(&self, tm: &Tensor) -> candle_core::Result<Tensor> {
        let h = match &self.op {
            Op::Gram(g) => tm.matmul(g)?,
            Op::Tasks { stacked_t, scaled } => tm.matmul(stacked_t)?.matmul(scaled)?,
        };
        (h - &self.b)? * 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testutil::{
        assert_close, generic_embedding, merge1, spec_n, Fixture, GENERIC_EMBEDDING_MEAN,
    };
    use crate::spec::{MergeSpec, ParamValue};
    use candle_core::Device;

    const W: &str = "model.layers.2.mlp.down_proj.weight";

    fn spec(n: usize) -> MergeSpec {
        spec_n("wudi", n)
    }

    /// Experts θi = θ0 + τi for a base θ0 and task vectors τi.
    fn fixture(name: &str, shape: &[usize], base: &[f32], taus: &[&[f32]]) -> Fixture {
        Fixture::from_task_vectors(name, shape, base, taus)
    }

    fn tensor(rows: usize, cols: usize, v: &[f32]) -> Tensor {
        Tensor::from_slice(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// L(τm) = Σi ‖(τm − τi) τiᵀ‖² / ‖τi‖², τi = 0 left out; written
    /// directly from the definition, independently of `Interference`.
    fn loss(tm: &Tensor, taus: &[Tensor]) -> f32 {
        let mut total = 0.0;
        for t in taus {
            let n: f32 = t.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            if n > 0.0 {
                let p = (tm - t).unwrap().matmul(&t.t().unwrap()).unwrap();
                total += p
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    / n;
            }
        }
        total
    }

    fn wudi(iterations: usize, lr: f64) -> Wudi {
        Wudi {
            iterations,
            lr,
            targets: MatrixTargets::default(),
        }
    }

    #[test]
    fn gradient_of_a_row_by_hand() {
        // τ1 = [1, 1] (‖‖² = 2), τ2 = [1, 0] (1); τm = [2, 1].
        // (τm−τ1) G1 = [1, 0]·[[1, 1], [1, 1]]/2 = [0.5, 0.5];
        // (τm−τ2) G2 = [1, 1]·[[1, 0], [0, 0]] = [1, 0];
        // g = 2·[1.5, 0.5] = [3, 1], by either evaluation order.
        let taus = [tensor(1, 2, &[1., 1.]), tensor(1, 2, &[1., 0.])];
        let tm = tensor(1, 2, &[2., 1.]);
        for path in [Path::Gram, Path::Tasks] {
            let p = Interference::new(&taus, Some(path)).unwrap().unwrap();
            assert_close(&flat(&p.gradient(&tm).unwrap()), &[3., 1.], 1e-6);
        }
    }

    #[test]
    fn gradient_of_a_square_by_hand() {
        // τ1 = I (‖‖² = 2), τ2 = [[0, 1], [0, 0]] (1); τm = Σ = [[1, 1], [0, 1]].
        // G1 = I/2, G2 = τ2ᵀτ2 = [[0, 0], [0, 1]].
        // (τm−τ1) G1 = [[0, 1], [0, 0]]/2 = [[0, 0.5], [0, 0]];
        // (τm−τ2) G2 = I·G2 = [[0, 0], [0, 1]];  g = 2·[[0, 0.5], [0, 1]].
        let taus = [
            tensor(2, 2, &[1., 0., 0., 1.]),
            tensor(2, 2, &[0., 1., 0., 0.]),
        ];
        let tm = tensor(2, 2, &[1., 1., 0., 1.]);
        for path in [Path::Gram, Path::Tasks] {
            let p = Interference::new(&taus, Some(path)).unwrap().unwrap();
            assert_close(&flat(&p.gradient(&tm).unwrap()), &[0., 1., 0., 2.], 1e-6);
        }
    }

    #[test]
    fn paths_agree_on_a_generic_problem() {
        let t1 = tensor(
            3,
            5,
            &[
                0.3, -1.2, 0.5, 2.0, 1.1, 0.4, -0.7, 0.2, -0.6, 0.9, 1.5, -0.1, 0.8, 0.0, -0.3,
            ],
        );
        let t2 = tensor(
            3,
            5,
            &[
                1.0, 0.2, -0.4, 0.3, -0.8, 1.6, 0.1, 0.5, 0.7, -0.3, 0.2, 1.2, -0.9, 0.4, 0.6,
            ],
        );
        let taus = [t1, t2];
        let tm = tensor(3, 5, &[0.5; 15]);
        let g = Interference::new(&taus, Some(Path::Gram))
            .unwrap()
            .unwrap()
            .gradient(&tm)
            .unwrap();
        let t = Interference::new(&taus, Some(Path::Tasks))
            .unwrap()
            .unwrap()
            .gradient(&tm)
            .unwrap();
        assert_close(&flat(&g), &flat(&t), 1e-5);
    }

    #[test]
    fn adam_first_steps_by_hand() {
        // Same τ1 = [1, 1], τ2 = [1, 0]; start τm = [2, 1], g1 = [3, 1].
        // Step 1: m = 0.1·g, v = 0.001·g², m̂ = g, v̂ = g²: τm −= lr·g/(|g|+ε)
        // → [2 − 0.1, 1 − 0.1] = [1.9, 0.9] (lr = 0.1).
        let fx = fixture(W, &[1, 2], &[0., 0.], &[&[1., 1.], &[1., 0.]]);
        let s = spec(2).with("iterations", 1.0).with("lr", 0.1);
        assert_close(&merge1(&s, &fx), &[1.9, 0.9], 1e-6);
        // Step 2: g2 at [1.9, 0.9]: (τm−τ1)G1 = [0.9, −0.1]·[[1,1],[1,1]]/2 =
        // [0.4, 0.4], (τm−τ2)G2 = [0.9, 0], g2 = 2·[1.3, 0.4] = [2.6, 0.8].
        // m = 0.09·g1 + 0.1·g2 = [0.53, 0.17]; v = 0.000999·g1² + 0.001·g2²
        // = [0.015751, 0.001639]; bias 1 − 0.9² = 0.19, 1 − 0.999² = 0.001999;
        // step = 0.1·(m/0.19)/√(v/0.001999) = [0.0993744, 0.0988126]
        // → [1.8006256, 0.8011874].
        let s = spec(2).with("iterations", 2.0).with("lr", 0.1);
        assert_close(&merge1(&s, &fx), &[1.8006256, 0.8011874], 1e-5);
    }

    #[test]
    fn orthogonal_tasks_stay_at_the_sum() {
        // τ1 = diag(1, 0), τ2 = diag(0, 2): (τm − τ1)τ1ᵀ = diag(0, 2)·diag(1, 0)
        // = 0 and likewise for τ2, so g = 0 and Adam's step 0/(0 + ε) = 0:
        // θ0 + diag(1, 2).
        let fx = fixture(
            W,
            &[2, 2],
            &[1.; 4],
            &[&[1., 0., 0., 0.], &[0., 0., 0., 2.]],
        );
        let s = spec(2).with("iterations", 50.0).with("lr", 0.1);
        assert_close(&merge1(&s, &fx), &[2., 1., 1., 3.], 1e-6);
    }

    #[test]
    fn loss_decreases() {
        let v1 = [
            0.3, -1.2, 0.5, 2.0, 1.1, 0.4, -0.7, 0.2, -0.6, 0.9, 1.5, -0.1,
        ];
        let v2 = [
            1.0, 0.2, -0.4, 0.3, -0.8, 1.6, 0.1, 0.5, 0.7, -0.3, 0.2, 1.2,
        ];
        let v3 = [
            0.5, 0.5, -1.0, 0.0, 0.3, -0.2, 0.9, 1.0, -0.4, 0.6, 0.8, 0.1,
        ];
        let taus = [tensor(3, 4, &v1), tensor(3, 4, &v2), tensor(3, 4, &v3)];
        let start = taus[0].add(&taus[1]).unwrap().add(&taus[2]).unwrap();
        let before = loss(&start, &taus);
        let fx = fixture(W, &[3, 4], &[0.; 12], &[&v1, &v2, &v3]);
        let got = merge1(&spec(3).with("iterations", 200.0).with("lr", 0.01), &fx);
        let after = loss(&tensor(3, 4, &got), &taus);
        assert!(after < 0.5 * before, "loss {before} → {after}");
        // The default lr = 1e-5 moves it little but still downhill.
        let got = merge1(&spec(3), &fx);
        let small = loss(&tensor(3, 4, &got), &taus);
        assert!(small < before && small > after, "loss {before} → {small}");
    }

    #[test]
    fn equal_tasks_move_toward_the_task() {
        // τ1 = τ2 = τ: L = 2‖(τm − τ)τᵀ‖²/‖τ‖² is minimal at τm = τ; from 2τ
        // the iterate moves toward τ: ‖τm − τ‖ shrinks below ‖2τ − τ‖ = ‖τ‖.
        let tau = [1., 2., 0., 1.];
        let fx = fixture(W, &[2, 2], &[0.; 4], &[&tau, &tau]);
        let got = merge1(&spec(2).with("iterations", 300.0).with("lr", 0.01), &fx);
        let dist: f32 = got
            .iter()
            .zip(tau)
            .map(|(g, t)| (g - t) * (g - t))
            .sum::<f32>()
            .sqrt();
        let norm: f32 = tau.iter().map(|t| t * t).sum::<f32>().sqrt();
        assert!(dist < 0.5 * norm, "distance {dist} vs ‖τ‖ {norm}: {got:?}");
        let taus = [tensor(2, 2, &tau), tensor(2, 2, &tau)];
        assert!(loss(&tensor(2, 2, &got), &taus) < loss(&tensor(2, 2, &[2., 4., 0., 2.]), &taus));
    }

    #[test]
    fn zero_task_vector_is_left_out() {
        // τ1 = [1, 1], τ2 = 0: start τm = τ1, g = 2(τ1 − τ1)G1 = 0 → stays;
        // θ0 = [1, 2] → [2, 3], with no NaN from ‖τ2‖ = 0.
        let fx = fixture(W, &[1, 2], &[1., 2.], &[&[1., 1.], &[0., 0.]]);
        assert_close(&merge1(&spec(2).with("lr", 0.1), &fx), &[2., 3.], 1e-6);
        // All zero: θ0.
        let fx = fixture(W, &[1, 2], &[1., 2.], &[&[0., 0.], &[0., 0.]]);
        assert_close(&merge1(&spec(2), &fx), &[1., 2.], 0.0);
    }

    #[test]
    fn cpu_and_tensor_adam_agree() {
        // The fused CPU loop and the candle-op loop run the same Adam, on
        // either evaluation order of the gradient.
        let t1 = tensor(
            3,
            5,
            &[
                0.3, -1.2, 0.5, 2.0, 1.1, 0.4, -0.7, 0.2, -0.6, 0.9, 1.5, -0.1, 0.8, 0.0, -0.3,
            ],
        );
        let t2 = tensor(
            3,
            5,
            &[
                1.0, 0.2, -0.4, 0.3, -0.8, 1.6, 0.1, 0.5, 0.7, -0.3, 0.2, 1.2, -0.9, 0.4, 0.6,
            ],
        );
        let start = t1.add(&t2).unwrap();
        let w = wudi(50, 0.01);
        for path in [Path::Gram, Path::Tasks] {
            let p = Interference::new(&[t1.clone(), t2.clone()], Some(path))
                .unwrap()
                .unwrap();
            let none = Cancel::new();
            let fused = flat(&w.adam_cpu(&p, &start, &none).unwrap().unwrap());
            let ops = flat(&w.adam(&p, start.clone(), &none).unwrap().unwrap());
            assert_close(&fused, &ops, 1e-5);
            assert!(fused
                .iter()
                .zip(flat(&start))
                .any(|(a, b)| (a - b).abs() > 0.1));
        }
    }

    #[test]
    fn optimise_without_interference_returns_the_sum() {
        let taus = [tensor(1, 2, &[0., 0.]), tensor(1, 2, &[0., 0.])];
        let none = Cancel::new();
        assert_eq!(
            flat(&wudi(3, 0.1).optimise(&taus, None, &none).unwrap().unwrap()),
            vec![0., 0.]
        );
    }

    #[test]
    fn a_cancelled_token_stops_the_iterations() {
        let taus = [tensor(1, 2, &[1., 1.]), tensor(1, 2, &[1., 0.])];
        let cancel = Cancel::new();
        cancel.cancel();
        let w = wudi(1_000_000_000, 0.1);
        for path in [Path::Gram, Path::Tasks] {
            let p = Interference::new(&taus, Some(path)).unwrap().unwrap();
            let start = taus[0].add(&taus[1]).unwrap();
            assert!(w.adam_cpu(&p, &start, &cancel).unwrap().is_none());
            assert!(w.adam(&p, start, &cancel).unwrap().is_none());
        }
    }

    #[test]
    fn other_tensors_take_plain_mean() {
        // Bias: τ1 = [2, 0], τ2 = [0, −4] → θ0 + [1, −2] = [2, −1].
        let fx = fixture(
            "model.layers.2.mlp.down_proj.bias",
            &[2],
            &[1., 1.],
            &[&[2., 0.], &[0., -4.]],
        );
        assert_close(&merge1(&spec(2), &fx), &[2., -1.], 1e-6);
    }

    #[test]
    fn the_embedding_is_optimised_unless_excluded() {
        // A 1×2 embedding with τ1 = [1, 1], τ2 = [1, 0]: optimised as a
        // linear weight, one step at lr 0.1 gives [1.9, 0.9] (see
        // `adam_first_steps_by_hand`); excluded: θ0 + mean = [1, 0.5].
        let embed = "model.embed_tokens.weight";
        let fx = fixture(embed, &[1, 2], &[0., 0.], &[&[1., 1.], &[1., 0.]]);
        let s = spec(2).with("iterations", 1.0).with("lr", 0.1);
        assert_close(&merge1(&s, &fx), &[1.9, 0.9], 1e-6);
        let exclude = ParamValue::Names(vec![embed.into()]);
        let excluded = s.with_value("exclude_keys", exclude.clone());
        assert_close(&merge1(&excluded, &fx), &[1., 0.5], 1e-6);

        // A generic 4×3 embedding, 20 steps at lr 0.01:
        // tests/reference/matrix_methods_4x3.py, FusionBench's wudi_merging
        // loss with torch's Adam written out in numpy (float64).
        let fx = generic_embedding();
        let s = spec(2).with("iterations", 20.0).with("lr", 0.01);
        // numpy output, as printed (more digits than f32 holds).
        #[allow(clippy::excessive_precision)]
        let want = [
            1.6055003, -2.1796865, 1.9034802, 2.1029236, 1.9941343, 1.3142051, 0.2241982,
            1.5106781, -1.7069130, 0.6671062, 2.2777068, 4.2863866,
        ];
        assert_close(&merge1(&s, &fx), &want, 1e-4);
        let excluded = s.with_value("exclude_keys", exclude);
        assert_close(&merge1(&excluded, &fx), &GENERIC_EMBEDDING_MEAN, 1e-6);
    }

    #[test]
    fn parameters_are_validated() {
        let bad = |s: MergeSpec, key: &str| {
            let err = crate::methods::build(&s).err().expect("should be rejected");
            assert!(err.to_string().contains(key), "{err}");
        };
        bad(spec(2).with("iterations", 0.0), "iterations");
        bad(spec(2).with("iterations", 2.5), "iterations");
        bad(spec(2).with("lr", 0.0), "lr");
        bad(spec(2).with("lr", -1e-5), "lr");
        bad(spec(2).with("alpha", 1.0), "alpha");
        assert!(crate::methods::build(&spec(2).with("iter_num", 10.0)).is_ok());
        // The bound on the work: named with the parameter as written.
        let bounds = crate::bounds::Bounds {
            iterations: 50,
            ..Default::default()
        };
        assert!(crate::methods::build_bounded(&spec(2).with("iterations", 50.0), &bounds).is_ok());
        let err = crate::methods::build_bounded(&spec(2).with("iter_num", 51.0), &bounds)
            .err()
            .expect("over the bound");
        let m = err.to_string();
        assert!(
            m.contains("`iter_num` = 51") && m.contains("limit of 50"),
            "{m}"
        );
        assert_eq!(err.kind(), crate::error::ErrorKind::TooLarge);
    }
}
