//! Training a model of the runtime with candle's autograd on the CPU: every
//! weight is a `Var`, the model is built once over them with
//! `differentiable: true`, and AdamW updates them in place, minimising the
//! cross-entropy of the next token on the positions a batch selects.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::error::Result;
use runtime::generate::bytelevel::PAD;
use runtime::model::random::tensor_shapes;
use runtime::model::{Hooks, Model, ModelConfig, ModelOptions};

/// Initial weights for `cfg`: matrices ~ N(0, 0.02²), with the projections
/// that write into the residual stream (`o_proj`, `down_proj`) scaled by
/// 1/√(2·layers) as in GPT-2; norm scales 1. Deterministic for `seed`.
pub fn init_weights(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let std = 0.02f32;
    let residual = std / (2.0 * cfg.num_hidden_layers as f32).sqrt();
    let mut out = HashMap::new();
    for (name, shape) in tensor_shapes(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let s = if name.contains("o_proj") || name.contains("down_proj") {
                residual
            } else {
                std
            };
            let normal = Normal::new(0f32, s).expect("finite std");
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        out.insert(
            name,
            Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?,
        );
    }
    Ok(out)
}

/// Token sequences padded into one batch, with the positions whose next
/// token is scored.
pub struct Batch {
    /// Input ids `(batch, seq)`: each sequence without its last token,
    /// right-padded with `<pad>`.
    pub inputs: Tensor,
    /// Flat indices `row · seq + position` of the scored positions, `(n)`.
    pub positions: Tensor,
    /// `(n, vocab)`: `1 / n` on the next token's id of each scored position,
    /// zero elsewhere. The loss is `−Σ targets · log p`.
    pub targets: Tensor,
}

impl Batch {
    /// Builds a batch from `(ids, first)` pairs: the tokens `ids[first..]`
    /// are scored, each predicted from the ones before it (`first >= 1`).
    pub fn new(seqs: &[(Vec<u32>, usize)], vocab: usize) -> Result<Batch> {
        let b = seqs.len();
        let t = seqs
            .iter()
            .map(|(ids, _)| ids.len().saturating_sub(1))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut inputs = vec![PAD; b * t];
        let mut positions = Vec::new();
        let mut next = Vec::new();
        for (i, (ids, first)) in seqs.iter().enumerate() {
            let n = ids.len().saturating_sub(1);
            inputs[i * t..i * t + n].copy_from_slice(&ids[..n]);
            // Token j is predicted at position j - 1.
            for (j, &id) in ids.iter().enumerate().skip((*first).max(1)) {
                positions.push((i * t + j - 1) as u32);
                next.push(id as usize);
            }
        }
        let n = positions.len();
        let mut targets = vec![0f32; n * vocab];
        for (k, id) in next.iter().enumerate() {
            targets[k * vocab + id] = 1.0 / n as f32;
        }
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (b, t), &Device::Cpu)?,
            positions: Tensor::from_vec(positions, n, &Device::Cpu)?,
            targets: Tensor::from_vec(targets, (n, vocab), &Device::Cpu)?,
        })
    }

    /// Number of scored positions.
    pub fn scored(&self) -> usize {
        self.positions.dim(0).unwrap_or(0)
    }
}

/// AdamW hyper-parameters of one training run.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Optimiser steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// The learning rate decays with a cosine to `lr · final_fraction`.
    pub final_fraction: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Which weights the run updates (the others stay as they start).
    pub trainable: Trainable,
}

/// The weights a training run updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// Every weight.
    All,
    /// Only the blocks' MLPs (`model.layers.*.mlp.*`): attention, norms,
    /// embeddings and the output projection stay frozen.
    Mlp,
}

impl Trainable {
    /// Whether the weight `name` (HF naming) is updated.
    pub fn includes(self, name: &str) -> bool {
        match self {
            Trainable::All => true,
            Trainable::Mlp => name.starts_with("model.layers.") && name.contains(".mlp."),
        }
    }
}

impl Schedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.final_fraction + (1.0 - self.final_fraction) * cosine)
    }
}

/// A model whose weights are being trained.
pub struct Trainer {
    config: ModelConfig,
    vars: Vec<(String, Var)>,
    /// The weights that are not trained (see [`Schedule::trainable`]).
    frozen: Vec<(String, Tensor)>,
    model: Model,
    /// The output projection (the embedding when tied).
    lm_head: Tensor,
    opt: AdamW,
}

impl Trainer {
    /// Starts from copies of `weights` (HF tensor names).
    pub fn new(
        config: &ModelConfig,
        weights: &HashMap<String, Tensor>,
        schedule: &Schedule,
    ) -> Result<Trainer> {
        let mut names: Vec<&String> = weights.keys().collect();
        names.sort();
        let (trained, frozen): (Vec<&String>, Vec<&String>) = names
            .into_iter()
            .partition(|n| schedule.trainable.includes(n));
        let vars = trained
            .into_iter()
            .map(|n| {
                let t = weights[n].to_dtype(DType::F32)?.copy()?;
                Ok((n.clone(), Var::from_tensor(&t)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let frozen = frozen
            .into_iter()
            .map(|n| Ok((n.clone(), weights[n].to_dtype(DType::F32)?.copy()?)))
            .collect::<Result<Vec<_>>>()?;
        let tensors = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .chain(frozen.iter().cloned())
            .collect();
        let model = Model::from_tensors(
            config.clone(),
            tensors,
            &ModelOptions {
                differentiable: true,
                ..Default::default()
            },
        )?;
        let head_name = if config.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let lm_head = vars
            .iter()
            .map(|(n, v)| (n, v.as_tensor()))
            .chain(frozen.iter().map(|(n, t)| (n, t)))
            .find(|(n, _)| *n == head_name)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| runtime::RuntimeError::MissingTensor {
                tensor: head_name.to_string(),
                model: "trainer".into(),
                path: Default::default(),
            })?;
        let opt = AdamW::new(
            vars.iter().map(|(_, v)| v.clone()).collect(),
            ParamsAdamW {
                lr: schedule.lr,
                weight_decay: schedule.weight_decay,
                ..Default::default()
            },
        )?;
        Ok(Trainer {
            config: config.clone(),
            vars,
            frozen,
            model,
            lm_head,
            opt,
        })
    }

    /// The model over the live weights.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The mean cross-entropy (nats per scored token) of `batch`. Only the
    /// scored positions are projected onto the vocabulary (the model's own
    /// output projection, applied to the selected final hidden states).
    pub fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let h = self
            .model
            .hidden_states(&batch.inputs, None, &mut Hooks::default())?;
        let (b, t, d) = h.dims3()?;
        let h = h.reshape((b * t, d))?.index_select(&batch.positions, 0)?;
        let logits = h.matmul(&self.lm_head.t()?)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        Ok((logp * &batch.targets)?.sum_all()?.neg()?)
    }

    /// One AdamW step at learning rate `lr`; returns the loss before it.
    pub fn step(&mut self, batch: &Batch, lr: f64) -> Result<f32> {
        self.opt.set_learning_rate(lr);
        let loss = self.loss(batch)?;
        self.opt.backward_step(&loss)?;
        Ok(loss.to_scalar::<f32>()?)
    }

    /// The current weights (copies, detached from the graph).
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?.detach())))
            .chain(self.frozen.iter().map(|(n, t)| Ok((n.clone(), t.clone()))))
            .collect()
    }

    /// The architecture being trained.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::generate::bytelevel::VOCAB_SIZE;

    fn tiny() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"model_type":"llama","vocab_size":262,"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":32}"#,
            std::path::Path::new("config.json"),
        )
        .unwrap()
    }

    #[test]
    fn batch_scores_the_selected_next_tokens() {
        let b = Batch::new(&[(vec![256, 1, 2, 257], 2), (vec![256, 5, 6], 1)], 262).unwrap();
        assert_eq!(b.inputs.dims(), &[2, 3]);
        assert_eq!(
            b.inputs.to_vec2::<u32>().unwrap(),
            vec![vec![256, 1, 2], vec![256, 5, PAD]]
        );
        // Scored: row 0 predicts 2 (at position 1) and 257 (at 2); row 1
        // predicts 5 (at 0) and 6 (at 1): four positions, weight 1/4 each.
        assert_eq!(b.scored(), 4);
        assert_eq!(b.positions.to_vec1::<u32>().unwrap(), vec![1, 2, 3, 4]);
        let t = b.targets.to_vec2::<f32>().unwrap();
        for (k, id) in [2, 257, 5, 6].into_iter().enumerate() {
            assert_eq!(t[k][id], 0.25);
            assert_eq!(t[k].iter().sum::<f32>(), 0.25);
        }
    }

    #[test]
    fn loss_is_the_mean_negative_log_likelihood_and_falls() {
        let cfg = tiny();
        let w = init_weights(&cfg, 1).unwrap();
        let sched = Schedule {
            steps: 30,
            lr: 1e-2,
            warmup: 1,
            final_fraction: 1.0,
            weight_decay: 0.0,
            trainable: Trainable::All,
        };
        let mut tr = Trainer::new(&cfg, &w, &sched).unwrap();
        let seqs = vec![(vec![256, 10, 11, 12, 257], 1), (vec![256, 20, 21, 257], 2)];
        let batch = Batch::new(&seqs, VOCAB_SIZE).unwrap();
        // Independent check: the mean of −log softmax at the scored positions.
        let logits = tr.model().forward(&batch.inputs, None).unwrap();
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let want = -(lp[0][0][10]
            + lp[0][1][11]
            + lp[0][2][12]
            + lp[0][3][257]
            + lp[1][1][21]
            + lp[1][2][257])
            / 6.0;
        let got = tr.loss(&batch).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert!((got - (VOCAB_SIZE as f32).ln()).abs() < 0.1, "{got}");
        let mut last = got;
        for s in 0..sched.steps {
            last = tr.step(&batch, sched.lr_at(s)).unwrap();
        }
        assert!(last < 0.2 * got, "loss {got} -> {last}");
        // The weights returned are the trained ones, detached.
        let after = tr.weights().unwrap();
        let e0 = &w["model.embed_tokens.weight"];
        let e1 = &after["model.embed_tokens.weight"];
        let moved = (e1 - e0).unwrap().abs().unwrap().max_all().unwrap();
        assert!(moved.to_scalar::<f32>().unwrap() > 1e-3);
        assert!(!e1.is_variable());
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = Schedule {
            steps: 110,
            lr: 1.0,
            warmup: 10,
            final_fraction: 0.1,
            weight_decay: 0.0,
            trainable: Trainable::All,
        };
        assert!((s.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        // Halfway through the decay: 0.1 + 0.9 · 0.5.
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
    }
}
