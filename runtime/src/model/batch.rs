//! One forward pass over several sequences at once: the step of continuous
//! batching.
//!
//! Every sequence brings the tokens it adds this step (a chunk of its
//! prompt, or the one token it decoded last) and its [`PagedCache`]. The
//! rows of all sequences are packed into one `(1, N, hidden)` stream, so
//! each linear layer (the projections, the MLP, the output head) reads its
//! weights once for the whole batch; that is where batching pays, since
//! decoding one sequence is bound by reading the weights. Rotary positions
//! are each row's own; attention alone is per sequence, over that
//! sequence's cached keys and values and its new rows (causal within
//! them).
//!
//! ```text
//! x = embed[ids_1 ‖ … ‖ ids_S]
//! per block: q, k, v = proj(norm(x));  k_s, v_s → cache_s
//!            y_s = softmax(q_s K_sᵀ/√d + mask_s) V_s;  x += o(y_1 ‖ … ‖ y_S)
//!            x += mlp(norm(x))
//! logits_s = lm_head(norm(x[last row of s]))
//! ```

use candle_core::{DType, IndexOp, Tensor};

use super::attention::causal_mask;
use super::delta::{DeltaRun, ModelDelta};
use super::host_attention;
use super::layers::Hooks;
use super::paged::PagedCache;
use super::transformer::{norm_names, Model, FINAL_NORM};
use crate::error::{Result, RuntimeError};

/// One sequence's part of a batched step.
pub struct BatchInput<'a> {
    /// The tokens this step adds (at positions `cache.len()..`).
    pub tokens: &'a [u32],
    /// The sequence's keys and values so far.
    pub cache: &'a mut PagedCache,
    /// The merge this sequence runs, held as a delta over the model's
    /// weights (`None`: the model's own, with its own delta if it has one).
    /// Consecutive items of one delta share its products.
    pub delta: Option<&'a ModelDelta>,
}

/// The runs of consecutive items that share a delta: `rows(i)` rows each.
fn runs_of<'a>(
    items: &[BatchInput<'a>],
    own: Option<&'a ModelDelta>,
    rows: impl Fn(usize) -> usize,
) -> Vec<DeltaRun<'a>> {
    let mut runs: Vec<DeltaRun<'a>> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        if rows(i) == 0 {
            continue;
        }
        let delta = it.delta.or(own);
        match runs.last_mut() {
            Some(last) if same(last.delta, delta) => last.rows += rows(i),
            _ => runs.push(DeltaRun {
                rows: rows(i),
                delta,
            }),
        }
    }
    runs
}

/// Whether two deltas are the same one.
fn same(a: Option<&ModelDelta>, b: Option<&ModelDelta>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

impl Model {
    /// Whether rows of several sequences can share one forward pass: no
    /// block keeps per-sequence state (a routed MLP's routing does).
    pub fn batchable(&self) -> bool {
        !self.blocks.iter().any(|b| b.mlp.is_stateful())
    }

    /// One step over `items`: appends each item's tokens to its cache and
    /// returns the next-token logits after each item's last token,
    /// `(items, vocab)` in f32 (f64 for an f64 model).
    ///
    /// Blocks for the new positions are reserved here; a pool that refuses
    /// them is an error that names the bound, and no cache changes.
    pub fn forward_batch(&self, items: &mut [BatchInput]) -> Result<Tensor> {
        let last = vec![1; items.len()];
        self.forward_batch_rows(items, &last)
    }

    /// [`Model::forward_batch`] returning the logits after each of the last
    /// `picks[i]` tokens of item `i` (none for 0: a chunk of a prompt whose
    /// predictions nobody reads), item after item: `(Σ picks, vocab)`.
    /// Scoring reads the predictions of every continuation token this way.
    pub fn forward_batch_rows(&self, items: &mut [BatchInput], picks: &[usize]) -> Result<Tensor> {
        if picks.len() != items.len() {
            return Err(RuntimeError::Model(format!(
                "{} logit counts for a batch of {} sequences",
                picks.len(),
                items.len()
            )));
        }
        if !self.batchable() {
            return Err(RuntimeError::Model(
                "this model keeps per-sequence MLP state (a routed merge) and cannot be batched"
                    .into(),
            ));
        }
        if items.is_empty() {
            return Err(RuntimeError::Model("an empty batch".into()));
        }
        let vocab = self.config.vocab_size;
        let max_pos = self.config.max_position_embeddings;
        for (i, it) in items.iter().enumerate() {
            if it.tokens.is_empty() {
                return Err(RuntimeError::Model(format!(
                    "sequence {i} of the batch adds no token"
                )));
            }
            if let Some(&bad) = it.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(RuntimeError::Model(format!(
                    "token id {bad} is outside the vocabulary (vocab_size {vocab})"
                )));
            }
            let end = it.cache.len() + it.tokens.len();
            if end > max_pos {
                return Err(RuntimeError::Model(format!(
                    "sequence of {end} tokens exceeds max_position_embeddings ({max_pos})"
                )));
            }
        }
        if let Some(i) = (0..items.len()).find(|&i| picks[i] > items[i].tokens.len()) {
            return Err(RuntimeError::Model(format!(
                "sequence {i} of the batch asks for the logits of {} rows and adds {} tokens",
                picks[i],
                items[i].tokens.len()
            )));
        }
        // Reserve every block first, so a refusal leaves the caches alone.
        let need: usize = items
            .iter()
            .map(|it| it.cache.blocks_needed(it.tokens.len()))
            .sum();
        let full = |i: usize| {
            RuntimeError::Model(format!(
                "the KV cache is full: sequence {i} of the batch needs more blocks \
                 ({need} in all this step) than `kv_cache_bytes` leaves"
            ))
        };
        if !items[0].cache.pool().can_take(need) {
            return Err(full(0));
        }
        for (i, it) in items.iter_mut().enumerate() {
            if !it.cache.reserve(it.tokens.len())? {
                // Another sequence of the pool took blocks meanwhile; what
                // this step reserved stays with its caches for their next
                // step.
                return Err(full(i));
            }
        }
        let spans: Vec<(usize, usize)> = items
            .iter()
            .map(|it| (it.cache.len(), it.tokens.len()))
            .collect();
        let n: usize = spans.iter().map(|s| s.1).sum();
        let ids: Vec<u32> = items
            .iter()
            .flat_map(|it| it.tokens.iter().copied())
            .collect();
        let ids = Tensor::from_vec(ids, (1, n), &self.device)?;
        let dtype = self.attention_dtype();
        let tables = self.rope.tables_of(&spans, self.dtype, &self.device)?;
        // The tensor path's masks, made the first time a layer needs them.
        let masks = std::cell::OnceCell::new();
        let masks = || -> candle_core::Result<&Vec<Option<Tensor>>> {
            if masks.get().is_none() {
                let made = spans
                    .iter()
                    .map(|&(start, t)| {
                        if t > 1 {
                            causal_mask(t, start, dtype, &self.device).map(Some)
                        } else {
                            Ok(None)
                        }
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let _ = masks.set(made);
            }
            Ok(masks.get().unwrap_or_else(|| unreachable!()))
        };
        let own = self.delta.as_deref();
        let row_runs = runs_of(items, own, |i| spans[i].1);
        let last_runs = runs_of(items, own, |i| picks[i]);
        let any_delta = row_runs.iter().any(|r| r.delta.is_some());
        let row_runs = any_delta.then_some(row_runs.as_slice());
        let last_runs = any_delta.then_some(last_runs.as_slice());
        let hooks = &mut Hooks {
            deltas: row_runs,
            ..Hooks::default()
        };
        let mut x = self.embed_runs(&ids, row_runs)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let a = &block.attn;
            let (n1, n2) = norm_names(layer);
            let h = block.attn_norm.forward_runs(&x, &n1, row_runs)?;
            let heads = |y: Tensor, k: usize| y.reshape((1, n, k, a.head_dim))?.transpose(1, 2);
            let q = heads(a.q.forward(&h, hooks)?, a.heads)?;
            let k = heads(a.k.forward(&h, hooks)?, a.kv_heads)?;
            let v = heads(a.v.forward(&h, hooks)?, a.kv_heads)?.contiguous()?;
            let q = self.rope.apply(&q, &tables)?;
            let k = self.rope.apply(&k, &tables)?;
            let mut row = 0;
            for (it, &(_, t)) in items.iter().zip(&spans) {
                let k_new = k.narrow(2, row, t)?.i(0)?;
                let v_new = v.narrow(2, row, t)?.i(0)?;
                it.cache.write(layer, &k_new, &v_new)?;
                row += t;
            }
            let caches: Vec<&PagedCache> = items.iter().map(|it| &*it.cache).collect();
            let shape = host_attention::Shape {
                heads: a.heads,
                kv_heads: a.kv_heads,
                head_dim: a.head_dim,
            };
            let y = match host_attention::attend(&q, &caches, &spans, layer, &shape) {
                Some(y) => y?,
                None => {
                    let mut ys = Vec::with_capacity(items.len());
                    let mut row = 0;
                    for (it, (&(start, t), mask)) in items.iter().zip(spans.iter().zip(masks()?)) {
                        let (ks, vs) = it.cache.read(layer, start + t)?;
                        let qs = q.narrow(2, row, t)?;
                        ys.push(a.mix(&qs, ks, vs, mask.as_ref(), dtype, false)?);
                        row += t;
                    }
                    let y = if ys.len() == 1 {
                        ys.pop().unwrap_or_else(|| unreachable!())
                    } else {
                        Tensor::cat(&ys, 2)?
                    };
                    y.transpose(1, 2)?.reshape((1, n, a.heads * a.head_dim))?
                }
            };
            x = (x + a.o.forward(&y, hooks)?)?;
            let h = block.mlp_norm.forward_runs(&x, &n2, row_runs)?;
            x = (x + block.mlp.forward(&h, hooks)?)?;
        }
        let mut last = Vec::with_capacity(picks.iter().sum());
        let mut end = 0u32;
        for (&(_, t), &k) in spans.iter().zip(picks) {
            end += t as u32;
            last.extend(end - k as u32..end);
        }
        for (it, &(_, t)) in items.iter_mut().zip(&spans) {
            it.cache.advance(t);
        }
        if last.is_empty() {
            let dtype = match self.dtype {
                DType::F64 => DType::F64,
                _ => DType::F32,
            };
            return Ok(Tensor::zeros((0, vocab), dtype, &self.device)?);
        }
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let rows = x.i(0)?.index_select(&last, 0)?;
        let h = self
            .norm
            .forward_runs(&rows.unsqueeze(0)?, FINAL_NORM, last_runs)?;
        let hooks = &mut Hooks {
            deltas: last_runs,
            ..Hooks::default()
        };
        let logits = self.logits(&h, hooks)?.i(0)?;
        Ok(match logits.dtype() {
            DType::F64 | DType::F32 => logits,
            _ => logits.to_dtype(DType::F32)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::paged::KvPool;
    use crate::model::tests::{max_abs_diff, model, tiny};
    use crate::model::ModelOptions;

    /// Three sequences of different lengths, joining at different steps
    /// (one prefilled in two chunks), give the logits each gets alone with
    /// the contiguous cache, step for step.
    #[test]
    fn a_packed_step_equals_each_sequence_alone() {
        let c = tiny();
        let model = model(&c, &ModelOptions::default());
        assert!(model.batchable());
        let pool = KvPool::new(&c, DType::F32, &Device::Cpu, 1 << 20, 4).unwrap();
        let prompts: [&[u32]; 3] = [&[1, 2, 3, 4, 5, 6, 7], &[9], &[11, 12, 13, 14, 15]];
        // Tokens fed per step, per sequence (None: not in this step).
        let plan: [[Option<std::ops::Range<usize>>; 3]; 4] = [
            [Some(0..4), Some(0..1), None],
            [Some(4..7), None, Some(0..5)],
            [None, Some(1..2), Some(5..6)],
            [Some(7..8), Some(2..3), Some(6..7)],
        ];
        // A fixed continuation per sequence after its prompt.
        let seqs: Vec<Vec<u32>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut s = p.to_vec();
                s.extend((0..4).map(|j| (i as u32 * 7 + j * 3 + 2) % 40));
                s
            })
            .collect();
        let mut paged: Vec<PagedCache> = (0..3).map(|_| PagedCache::new(&pool)).collect();
        let mut alone: Vec<_> = (0..3).map(|_| model.new_cache()).collect();
        for step in &plan {
            let mut inputs = Vec::new();
            let mut which = Vec::new();
            for (i, (cache, r)) in paged.iter_mut().zip(step).enumerate() {
                if let Some(r) = r {
                    inputs.push(BatchInput {
                        tokens: &seqs[i][r.clone()],
                        cache,
                        delta: None,
                    });
                    which.push((i, r.clone()));
                }
            }
            let batched = model.forward_batch(&mut inputs).unwrap();
            assert_eq!(batched.dims(), &[which.len(), 40]);
            for (row, (i, r)) in which.into_iter().enumerate() {
                let ids = Tensor::new(&seqs[i][r], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let want = model.forward_last(&ids, Some(&mut alone[i])).unwrap();
                let got = batched.i(row).unwrap().unsqueeze(0).unwrap();
                let d = max_abs_diff(&got, &want);
                assert!(d < 1e-5, "sequence {i}: max |Δlogit| {d}");
            }
        }
        assert_eq!(paged[0].len(), 8);
        assert_eq!(paged[0].num_blocks(), 2);
        drop(paged);
        assert_eq!(pool.used_bytes(), 0);
    }

    #[test]
    fn a_full_pool_or_bad_tokens_leave_the_caches_alone() {
        let c = tiny();
        let model = model(&c, &ModelOptions::default());
        let block = KvPool::new(&c, DType::F32, &Device::Cpu, u64::MAX, 4)
            .unwrap()
            .block_bytes();
        let pool = KvPool::new(&c, DType::F32, &Device::Cpu, 2 * block, 4).unwrap();
        let (mut a, mut b) = (PagedCache::new(&pool), PagedCache::new(&pool));
        let err = model
            .forward_batch(&mut [
                BatchInput {
                    tokens: &[1, 2, 3, 4, 5],
                    cache: &mut a,
                    delta: None,
                },
                BatchInput {
                    tokens: &[6],
                    cache: &mut b,
                    delta: None,
                },
            ])
            .unwrap_err()
            .to_string();
        assert!(err.contains("KV cache is full"), "{err}");
        assert_eq!((a.len(), b.len()), (0, 0));
        let err = model
            .forward_batch(&mut [BatchInput {
                tokens: &[40],
                cache: &mut a,
                delta: None,
            }])
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
        let err = model
            .forward_batch(&mut [BatchInput {
                tokens: &[],
                cache: &mut a,
                delta: None,
            }])
            .unwrap_err()
            .to_string();
        assert!(err.contains("adds no token"), "{err}");
        model
            .forward_batch(&mut [BatchInput {
                tokens: &[1, 2, 3, 4, 5],
                cache: &mut a,
                delta: None,
            }])
            .unwrap();
        assert_eq!(a.len(), 5);
    }

    use std::collections::HashMap;
    use std::sync::Arc;

    use crate::model::delta::{ModelDelta, TensorDelta};
    use crate::model::random::random_weights;
    use crate::model::ModelConfig;

    /// `tiny()` with its output head tied to the embedding.
    fn tiny_tied() -> ModelConfig {
        let mut c = tiny();
        c.tie_word_embeddings = true;
        c
    }

    /// The merged weights `θ₀ + α (θ₁ − θ₀)` and their delta in `form`:
    /// `dense`, `lowrank` at full rank (`ΔW = ΔW · I`), or `sparse` with
    /// every entry kept; all exact.
    fn merged_and_delta(
        c: &ModelConfig,
        seed: u64,
        alpha: f64,
        form: &str,
    ) -> (HashMap<String, Tensor>, ModelDelta) {
        let base = random_weights(c, 1, 0.2).unwrap();
        let other = random_weights(c, seed, 0.2).unwrap();
        let mut merged = HashMap::new();
        let mut delta = HashMap::new();
        for (name, w0) in &base {
            if c.tie_word_embeddings && name == "lm_head.weight" {
                continue;
            }
            let d = ((&other[name] - w0).unwrap() * alpha).unwrap();
            merged.insert(name.clone(), (w0 + &d).unwrap());
            let td = match (form, d.dims()) {
                ("lowrank", &[_, i]) => TensorDelta::low_rank(
                    &d,
                    &Tensor::eye(i, DType::F32, &Device::Cpu).unwrap(),
                    true,
                )
                .unwrap(),
                ("sparse", &[o, i]) => {
                    let v = d.to_vec2::<f32>().unwrap();
                    let entries = (0..o)
                        .flat_map(|r| (0..i).map(move |k| (r, k)))
                        .map(|(r, k)| (r as u32, k as u32, v[r][k]))
                        .collect();
                    TensorDelta::sparse((o, i), entries, DType::F32, &Device::Cpu).unwrap()
                }
                _ => TensorDelta::Dense(d),
            };
            delta.insert(name.clone(), Arc::new(td));
        }
        (merged, ModelDelta::Owned(delta))
    }

    /// The base with an exact delta (dense, full-rank low-rank, sparse
    /// with every entry) gives the merged model's logits within 1e-5, with
    /// separate and tied output heads.
    #[test]
    fn a_model_with_an_exact_delta_equals_the_merged_model() {
        for c in [tiny(), tiny_tied()] {
            let opts = ModelOptions::default();
            let base = model(&c, &opts);
            for form in ["dense", "lowrank", "sparse"] {
                let (merged, delta) = merged_and_delta(&c, 2, 0.7, form);
                let merged = Model::from_tensors(c.clone(), merged, &opts).unwrap();
                let with = Model::with_delta(&base, Arc::new(delta)).unwrap();
                let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu).unwrap();
                let want = merged.forward(&ids, None).unwrap();
                let got = with.forward(&ids, None).unwrap();
                let d = max_abs_diff(&got, &want);
                assert!(
                    d < 1e-5,
                    "{form}, tied {}: max |Δlogit| {d}",
                    c.tie_word_embeddings
                );
                let plain = base.forward(&ids, None).unwrap();
                assert!(
                    max_abs_diff(&plain, &want) > 1e-2,
                    "the delta changes the logits"
                );
            }
        }
    }

    /// A batch that mixes the base and two merges (interleaved, so runs
    /// split and rejoin) gives each sequence the logits its merge gives
    /// alone, step for step.
    #[test]
    fn a_mixed_batch_gives_each_sequence_its_merges_logits() {
        let c = tiny();
        let opts = ModelOptions::default();
        let base = model(&c, &opts);
        let a = Arc::new(merged_and_delta(&c, 2, 0.5, "lowrank").1);
        let b = Arc::new(merged_and_delta(&c, 3, 0.8, "sparse").1);
        let alone_a = Model::with_delta(&base, a.clone()).unwrap();
        let alone_b = Model::with_delta(&base, b.clone()).unwrap();
        let pool = KvPool::new(&c, DType::F32, &Device::Cpu, 1 << 20, 4).unwrap();
        let which: [Option<&Arc<ModelDelta>>; 4] = [Some(&a), None, Some(&b), Some(&a)];
        let models = [&alone_a, &base, &alone_b, &alone_a];
        let prompts: [&[u32]; 4] = [&[1, 2, 3], &[4, 5], &[6, 7, 8, 9, 10], &[11]];
        let mut paged: Vec<PagedCache> = (0..4).map(|_| PagedCache::new(&pool)).collect();
        let mut alone: Vec<_> = (0..4).map(|_| base.new_cache()).collect();
        for step in 0..3u32 {
            let feeds: Vec<Vec<u32>> = if step == 0 {
                prompts.iter().map(|p| p.to_vec()).collect()
            } else {
                (0..4).map(|i| vec![(i * 5 + step) % 40]).collect()
            };
            let mut inputs: Vec<BatchInput> = paged
                .iter_mut()
                .zip(&feeds)
                .zip(which)
                .map(|((cache, tokens), d)| BatchInput {
                    tokens,
                    cache,
                    delta: d.map(|d| d.as_ref()),
                })
                .collect();
            let batched = base.forward_batch(&mut inputs).unwrap();
            for i in 0..4 {
                let ids = Tensor::new(feeds[i].as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let want = models[i].forward_last(&ids, Some(&mut alone[i])).unwrap();
                let got = batched.i(i).unwrap().unsqueeze(0).unwrap();
                let d = max_abs_diff(&got, &want);
                assert!(d < 1e-5, "step {step}, sequence {i}: max |Δlogit| {d}");
            }
        }
    }

    #[test]
    fn a_delta_must_fit_the_base() {
        let c = tiny();
        let base = model(&c, &ModelOptions::default());
        let bad = ModelDelta::Owned(HashMap::from([(
            "model.norm.weight".to_string(),
            Arc::new(TensorDelta::Dense(
                Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
            )),
        )]));
        let err = Model::with_delta(&base, Arc::new(bad))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.norm.weight") && err.contains("[7]"),
            "{err}"
        );
        let unknown = ModelDelta::Owned(HashMap::from([(
            "model.layers.9.mlp.up_proj.weight".to_string(),
            Arc::new(TensorDelta::Dense(
                Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
            )),
        )]));
        let err = Model::with_delta(&base, Arc::new(unknown))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not"), "{err}");
    }
}
