//! mergekit's generalized task arithmetic: magnitude trim (`ties`) or
//! Bernoulli dropout (`dare_linear`, `dare_ties`), per-model weights, the
//! sum sign consensus and normalisation; see the header of [`super`].

use candle_core::{DType, Tensor};

use super::super::dare::Dropout;
use super::super::params::LAMBDA_KEYS;
use super::super::{MergeMethod, Num, Params, TensorInputs};
use super::source::{Chunk, Source};
use super::SMALL;
use crate::error::Result;
use crate::kernels::multiversion;
use crate::select::{
    abs_key, add_into, count_high_ways, count_low, fold_ways, key_value, locate_high, order_small,
    Order, Pending, Pool, BUCKETS, WAYS,
};

/// mergekit leaves a divisor below this undivided.
const ZERO_DIVISOR: f32 = 1e-8;

/// Which entries of one task vector mergekit's magnitude trim keeps.
#[derive(Debug, Clone)]
enum Keep {
    All,
    Nothing,
    /// Keys ≥ this.
    AtLeast(u32),
    /// Keys > `key`, and the first `need` keys equal to it in position order;
    /// `before[c]` = equal keys in the chunks before chunk c.
    Ties {
        key: u32,
        need: u64,
        before: Vec<u64>,
    },
}

/// mergekit's `magnitude`: exactly int(density·n) largest |τ| per task.
fn magnitude_keeps(src: &Source, densities: &[f64]) -> Vec<Keep> {
    let n = src.numel() as u64;
    let mut keeps = vec![Keep::All; densities.len()];
    // Rank (1-indexed from the smallest) of the smallest kept key, per task.
    let mut ranks = vec![None; densities.len()];
    for (i, &d) in densities.iter().enumerate() {
        if d >= 1.0 || n == 0 {
            continue;
        }
        let k = ((d * n as f64) as u64).min(n);
        if k == 0 {
            keeps[i] = Keep::Nothing;
        } else if k < n {
            ranks[i] = Some((n - k + 1, k));
        }
    }
    let orders = orders(
        src,
        &ranks
            .iter()
            .map(|r| r.map(|(rank, _)| rank))
            .collect::<Vec<_>>(),
    );
    let mut tie_tasks = Vec::new();
    for (i, (o, r)) in orders.iter().zip(&ranks).enumerate() {
        let (Some(o), Some((_, k))) = (o, r) else {
            continue;
        };
        let greater = n - o.below - o.equal;
        let need = k - greater;
        if need == o.equal {
            keeps[i] = Keep::AtLeast(o.key);
        } else {
            tie_tasks.push((i, o.key, need));
        }
    }
    if !tie_tasks.is_empty() {
        let counts = src.map_chunks(|_, c| {
            tie_tasks
                .iter()
                .map(|&(i, key, _)| {
                    c.tau[i][..c.len]
                        .iter()
                        .filter(|&&v| abs_key(v) == key)
                        .count() as u64
                })
                .collect::<Vec<_>>()
        });
        for (t, &(i, key, need)) in tie_tasks.iter().enumerate() {
            let mut before = Vec::with_capacity(counts.len());
            let mut acc = 0;
            for c in &counts {
                before.push(acc);
                acc += c[t];
            }
            keeps[i] = Keep::Ties { key, need, before };
        }
    }
    keeps
}

/// Order statistics of |τi| at the given ranks, by in-memory selection for
/// small tensors and by the two radix passes otherwise.
fn orders(src: &Source, ranks: &[Option<u64>]) -> Vec<Option<Order>> {
    if ranks.iter().all(Option::is_none) {
        return vec![None; ranks.len()];
    }
    if src.numel() <= SMALL {
        let c = src.load_all();
        return ranks
            .iter()
            .zip(&c.tau)
            .map(|(r, t)| {
                r.map(|r| {
                    let mut ks: Vec<u32> = t[..c.len].iter().map(|&v| abs_key(v)).collect();
                    order_small(&mut ks, r)
                })
            })
            .collect();
    }
    let tasks = ranks.len();
    let pool: Pool<Vec<u64>> = Pool::default();
    src.map_chunks(|_, c| {
        pool.with(
            || vec![0u64; tasks * WAYS * BUCKETS],
            |h| {
                for ((t, h), r) in c.tau.iter().zip(h.chunks_mut(WAYS * BUCKETS)).zip(ranks) {
                    if r.is_some() {
                        count_high_ways(h, &t[..c.len]);
                    }
                }
            },
        )
    });
    let mut high = vec![0u64; tasks * BUCKETS];
    for h in pool.into_inner() {
        for (dst, h) in high.chunks_mut(BUCKETS).zip(h.chunks(WAYS * BUCKETS)) {
            fold_ways(dst, h);
        }
    }
    let pending: Vec<Option<Pending>> = ranks
        .iter()
        .zip(high.chunks(BUCKETS))
        .map(|(r, h)| r.map(|r| locate_high(h, r)))
        .collect();
    let pool: Pool<Vec<u64>> = Pool::default();
    src.map_chunks(|_, c| {
        pool.with(
            || vec![0u64; tasks * BUCKETS],
            |h| {
                for ((t, h), p) in c.tau.iter().zip(h.chunks_mut(BUCKETS)).zip(&pending) {
                    if let Some(p) = p {
                        t[..c.len].iter().for_each(|&v| count_low(h, p, abs_key(v)));
                    }
                }
            },
        )
    });
    let mut low = vec![0u64; tasks * BUCKETS];
    pool.into_inner().iter().for_each(|h| add_into(&mut low, h));
    pending
        .iter()
        .zip(low.chunks(BUCKETS))
        .map(|(p, l)| p.map(|p| p.resolve(l)))
        .collect()
}

/// Per-chunk state of the keep decisions (tie counters).
fn keep_flags(keeps: &[Keep], chunk: usize) -> Vec<u64> {
    keeps
        .iter()
        .map(|k| match k {
            Keep::Ties { before, .. } => before[chunk],
            _ => 0,
        })
        .collect()
}

/// Whether entry `v` is kept; advances the tie counter `seen`.
#[inline(always)]
fn kept(keep: &Keep, v: f32, seen: &mut u64) -> bool {
    match keep {
        Keep::All => true,
        Keep::Nothing => false,
        Keep::AtLeast(k) => abs_key(v) >= *k,
        Keep::Ties { key, need, .. } => {
            let a = abs_key(v);
            if a == *key {
                *seen += 1;
                *seen <= *need
            } else {
                a > *key
            }
        }
    }
}

/// One tensor's resolved mergekit mixing parameters.
struct Mixing {
    weights: Vec<f32>,
    keeps: Vec<Keep>,
    consensus: bool,
    normalize: bool,
    lambda: f32,
}

multiversion!(
    /// The fused CPU loop of mergekit's generalized task arithmetic, task
    /// by task over contiguous slices.
    fn mk_kernel => mk_kernel_body(m: &Mixing, chunk: usize, c: &mut Chunk, out: &mut [f32])
);

#[inline(always)]
fn mk_kernel_body(m: &Mixing, chunk: usize, c: &mut Chunk, out: &mut [f32]) {
    let n = c.len;
    let Chunk {
        base,
        tau,
        sum,
        acc,
        aux,
        ..
    } = c;
    let (sum, mixed, divisor, out) = (&mut sum[..n], &mut acc[..n], &mut aux[..n], &mut out[..n]);
    sum.fill(0.0);
    // δi = wi·(kept τi), in place.
    for (t, (keep, &w)) in tau.iter_mut().zip(m.keeps.iter().zip(&m.weights)) {
        let t = &mut t[..n];
        match keep {
            Keep::All => t.iter_mut().for_each(|v| *v *= w),
            Keep::Nothing => t.fill(0.0),
            Keep::AtLeast(k) => {
                let k = (*k).min(i32::MAX as u32) as i32;
                t.iter_mut()
                    .for_each(|v| *v = if abs_key(*v) as i32 >= k { w * *v } else { 0.0 });
            }
            Keep::Ties { before, .. } => {
                let mut seen = before[chunk];
                for v in t.iter_mut() {
                    *v = if kept(keep, *v, &mut seen) {
                        w * *v
                    } else {
                        0.0
                    };
                }
            }
        }
        sum.iter_mut().zip(t.iter()).for_each(|(s, v)| *s += v);
    }
    let b = &base[..n];
    if m.consensus {
        // Elected sign: + where Σ δ ≥ 0; keep the δi of that sign.
        mixed.fill(0.0);
        divisor.fill(0.0);
        for (t, &w) in tau.iter().zip(&m.weights) {
            let lanes = mixed
                .iter_mut()
                .zip(divisor.iter_mut())
                .zip(t[..n].iter().zip(sum.iter()));
            lanes.for_each(|((mx, dv), (&d, &s))| {
                let up = s >= 0.0;
                let agree = (up & (d > 0.0)) | (!up & (d < 0.0));
                *mx += if agree { d } else { 0.0 };
                *dv += if agree { w } else { 0.0 };
            });
        }
        let lanes = out.iter_mut().zip(b).zip(mixed.iter().zip(divisor.iter()));
        if m.normalize {
            lanes.for_each(|((o, &b), (&mx, &dv))| {
                *o = b + m.lambda * (mx / if dv.abs() < ZERO_DIVISOR { 1.0 } else { dv });
            });
        } else {
            lanes.for_each(|((o, &b), (&mx, _))| *o = b + m.lambda * mx);
        }
    } else {
        let plain: f32 = m.weights.iter().sum();
        let divisor = if !m.normalize || plain.abs() < ZERO_DIVISOR {
            1.0
        } else {
            plain
        };
        for ((o, &b), &s) in out.iter_mut().zip(b).zip(sum.iter()) {
            *o = b + m.lambda * (s / divisor);
        }
    }
}

/// The keep mask of task `i` as a 0/1 f32 tensor, computed on the CPU
/// (position-ordered tie breaking has no cheap tensor form).
fn keep_mask(src: &Source, keep: &Keep, i: usize) -> candle_core::Result<Tensor> {
    let parts = src.map_chunks(|k, c| {
        let mut seen = keep_flags(std::slice::from_ref(keep), k)[0];
        c.tau[i][..c.len]
            .iter()
            .map(|&v| u8::from(kept(keep, v, &mut seen)))
            .collect::<Vec<u8>>()
    });
    let mask: Vec<u8> = parts.concat();
    Tensor::from_vec(mask, src.inputs.shape(), src.inputs.device)?.to_dtype(DType::F32)
}

/// The same in candle ops.
fn mk_candle(
    src: &Source,
    base: Tensor,
    taus: &[Tensor],
    m: &Mixing,
) -> candle_core::Result<Tensor> {
    let mut deltas = Vec::with_capacity(taus.len());
    for (i, (t, keep)) in taus.iter().zip(&m.keeps).enumerate() {
        let kept = match keep {
            Keep::All => t.clone(),
            Keep::Nothing => t.zeros_like()?,
            Keep::AtLeast(k) => t.mul(&t.abs()?.ge(key_value(*k))?.to_dtype(DType::F32)?)?,
            Keep::Ties { .. } => t.mul(&keep_mask(src, keep, i)?)?,
        };
        deltas.push((kept * m.weights[i] as f64)?);
    }
    let mut sum = deltas[0].clone();
    for d in &deltas[1..] {
        sum = (sum + d)?;
    }
    let mixed = if m.consensus {
        let elected = sum.ge(0f32)?.to_dtype(DType::F32)?.affine(2.0, -1.0)?;
        let mut mixed = base.zeros_like()?;
        let mut divisor = base.zeros_like()?;
        for (d, &w) in deltas.iter().zip(&m.weights) {
            let mask = d.sign()?.eq(&elected)?.to_dtype(DType::F32)?;
            mixed = (mixed + d.mul(&mask)?)?;
            divisor = (divisor + (mask * w as f64)?)?;
        }
        if m.normalize {
            let small = divisor.abs()?.lt(ZERO_DIVISOR)?;
            let divisor = small.where_cond(&divisor.ones_like()?, &divisor)?;
            (mixed / divisor)?
        } else {
            mixed
        }
    } else if m.normalize {
        let s: f32 = m.weights.iter().sum();
        (sum / if s.abs() < ZERO_DIVISOR {
            1.0
        } else {
            s as f64
        })?
    } else {
        sum
    };
    base + (mixed * m.lambda as f64)?
}

/// mergekit's generalized task arithmetic: `ties` (magnitude trim +
/// consensus), `dare_linear` and `dare_ties` (Bernoulli dropout, with and
/// without consensus); FusionBench's `dare` with a linear combine uses it too.
#[derive(Debug)]
pub(crate) struct MkMerge {
    pub weights: Vec<Num>,
    /// Per-model magnitude-trim densities (`ties`), or none.
    pub trim: Option<Vec<Num>>,
    pub dropout: Option<Dropout>,
    pub consensus: bool,
    pub normalize: bool,
    pub lambda: Num,
}

impl MkMerge {
    /// Merges one tensor, with the fused CPU loop or candle ops.
    pub(crate) fn merge_with(&self, inputs: &TensorInputs, fused: bool) -> Result<Tensor> {
        let ctx = &inputs.ctx;
        let dropout = self
            .dropout
            .as_ref()
            .map(|d| d.for_tensor(inputs))
            .transpose()?
            .flatten();
        let src = Source::new(inputs, dropout)?;
        let weights = self
            .weights
            .iter()
            .map(|w| Ok(w.at(ctx)? as f32))
            .collect::<Result<Vec<_>>>()?;
        let keeps = match &self.trim {
            None => vec![Keep::All; weights.len()],
            Some(ds) => {
                let ds = ds.iter().map(|d| d.at(ctx)).collect::<Result<Vec<_>>>()?;
                magnitude_keeps(&src, &ds)
            }
        };
        let m = Mixing {
            weights,
            keeps,
            consensus: self.consensus,
            normalize: self.normalize,
            lambda: self.lambda.at(ctx)? as f32,
        };
        if fused {
            src.fill(|k, c, o| mk_kernel(&m, k, c, o))
        } else {
            let (base, taus) = (src.base_tensor()?, src.task_vectors()?);
            mk_candle(&src, base, &taus, &m).map_err(|e| inputs.err(e))
        }
    }
}

impl MergeMethod for MkMerge {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        self.merge_with(inputs, inputs.device.is_cpu())
    }
}

/// Checks per-model densities against (0, 1].
pub(crate) fn densities(p: &mut Params) -> Result<Vec<Num>> {
    p.per_model("density", 1.0)?
        .into_iter()
        .map(|d| d.check(|x| x > 0.0 && x <= 1.0, "in (0, 1]"))
        .collect()
}

/// Builds mergekit's `ties`.
pub fn build_mergekit(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let weights = p.per_model("weight", 1.0)?;
    let trim = densities(p)?;
    let normalize = p.boolean(&["normalize"], true)?;
    let lambda = p.number(LAMBDA_KEYS, 1.0)?;
    p.boolean(&["int8_mask"], false)?;
    Ok(Box::new(MkMerge {
        weights,
        trim: Some(trim),
        dropout: None,
        consensus: true,
        normalize,
        lambda,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::test_data::{mk_spec, random_fixture};
    use super::*;
    use crate::methods::testutil::{assert_close, merge1, Fixture};
    use crate::spec::ParamValue;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    // τ1 = [0.5, -0.25, 0.125, -1], w 1, density 0.5: k = 2 → [0.5, 0, 0, -1].
    // τ2 = [-0.25, 0.5, 0.5, 0.5], w 0.5, density 0.75: k = 3 → [0, 0.5, 0.5, 0.5].
    // δ1 = [0.5, 0, 0, -1], δ2 = [0, 0.25, 0.25, 0.25]; Σ = [0.5, 0.25, 0.25, -0.75]
    // → elected [+, +, +, -]; masks m1 = [1, 0, 0, 1], m2 = [0, 1, 1, 0].
    // mixed = [0.5, 0.25, 0.25, -1]; divisor Σ w·m = [1, 0.5, 0.5, 1].
    fn mk_fixture() -> Fixture {
        Fixture::new(
            "w",
            &[4],
            Some(&[1.0; 4]),
            &[&[1.5, 0.75, 1.125, 0.0], &[0.75, 1.5, 1.5, 1.5]],
        )
    }

    #[test]
    fn mergekit_ties_weights_and_normalize() {
        // normalize (default): [0.5, 0.5, 0.5, -1] → θ = [1.5, 1.5, 1.5, 0]
        let spec = mk_spec("ties", &[(1.0, 0.5), (0.5, 0.75)]);
        assert_close(&merge1(&spec, &mk_fixture()), &[1.5, 1.5, 1.5, 0.0], 1e-6);
        // normalize false, lambda 2: θ = 1 + 2·mixed = [2, 1.5, 1.5, -1]
        let spec = spec
            .with_value("normalize", ParamValue::Bool(false))
            .with("lambda", 2.0);
        assert_close(&merge1(&spec, &mk_fixture()), &[2.0, 1.5, 1.5, -1.0], 1e-6);
    }

    #[test]
    fn mergekit_ties_keeps_exactly_k_breaking_ties_by_position() {
        // |τ| = [0.5, 0.5, 0.5, 0.25], density 0.5: k = 2 → the first two 0.5s.
        let fx = Fixture::new("w", &[4], Some(&[0.0; 4]), &[&[0.5, -0.5, 0.5, 0.25]]);
        let spec = mk_spec("ties", &[(1.0, 0.5)]);
        assert_close(&merge1(&spec, &fx), &[0.5, -0.5, 0.0, 0.0], 0.0);
        // k = int(0.2·4) = 0 keeps nothing: θ = θ0.
        let spec = mk_spec("ties", &[(1.0, 0.2)]);
        assert_close(&merge1(&spec, &fx), &[0.0; 4], 0.0);
    }

    #[test]
    fn mergekit_tie_breaking_across_chunks_on_both_paths() {
        // A large coarse tensor (radix path, many chunks): each task keeps
        // exactly int(density·n) entries, and the candle path agrees.
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let n = SMALL + 40_000;
        let fx = random_fixture(&mut rng, "w", n, 2, true);
        let inputs = fx.inputs();
        for (i, d) in [0.3f64, 0.55].iter().enumerate() {
            let single = Fixture {
                name: "w".into(),
                shape: fx.shape.clone(),
                base: fx.base.clone(),
                experts: vec![fx.experts[i].clone()],
                num_layers: 1,
            };
            let got = merge1(&mk_spec("ties", &[(1.0, *d)]), &single);
            let base = inputs.base.unwrap().to_f32_vec();
            let e = inputs.experts[i].to_f32_vec();
            let kept = got.iter().zip(&base).filter(|(g, b)| g != b).count();
            let nonzero = base.iter().zip(&e).filter(|(b, e)| b != e).count();
            assert_eq!(kept, ((d * n as f64) as usize).min(nonzero), "density {d}");
        }
        let mk = MkMerge {
            weights: vec![Num::constant("weight", 0.7), Num::constant("weight", 1.3)],
            trim: Some(vec![
                Num::constant("density", 0.3),
                Num::constant("density", 0.55),
            ]),
            dropout: None,
            consensus: true,
            normalize: true,
            lambda: Num::constant("lambda", 0.9),
        };
        let fused = mk
            .merge_with(&inputs, true)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let generic = mk
            .merge_with(&inputs, false)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_close(&generic, &fused, 1e-6);
    }
}
