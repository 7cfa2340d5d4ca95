//! Accuracy of a model on task items, in one batched forward pass per chunk.
//!
//! - `generate`: teacher-forced exact match. Greedy decoding yields the gold
//!   answer followed by `</s>` exactly when, along the gold path, the argmax
//!   of every position is the next gold token (ties aside), so one forward
//!   pass over `prefix + answer + </s>` decides it.
//! - `multiple_choice`: the choice whose tokens have the highest summed
//!   log-likelihood after the context (lm-eval's `acc`).
//!
//! The decisions (argmax, first on ties; accuracy) are the evaluator's
//! [`evaluator::metrics`], so the pool's recorded scores and `fusion eval`
//! agree by construction.

use candle_core::{Device, Tensor, D};
use evaluator::metrics;

use super::tasks::{Format, Item};
use crate::error::Result;
use runtime::generate::bytelevel::{encode_bytes, PAD};
use runtime::model::Model;

/// Sequences per forward pass.
const CHUNK: usize = 128;

/// Fraction of `items` the model gets right in `format`.
pub fn accuracy(model: &Model, items: &[Item], format: Format) -> Result<f64> {
    let correct = match items.first() {
        None => 0,
        Some(Item::Generate { .. }) => exact_matches(model, items, format)?,
        Some(Item::MultipleChoice { .. }) => choice_matches(model, items, format)?,
    };
    Ok(metrics::accuracy(correct, items.len()))
}

/// Items whose greedy completion is the answer then `</s>`.
fn exact_matches(model: &Model, items: &[Item], format: Format) -> Result<usize> {
    let mut correct = 0;
    for chunk in items.chunks(CHUNK) {
        let seqs: Vec<(Vec<u32>, usize)> = chunk.iter().map(|i| format.sequence(i)).collect();
        let ids = pad(&seqs, model.device())?;
        let logits = model.forward(&ids, None)?;
        let argmax = logits.argmax(D::Minus1)?.to_vec2::<u32>()?;
        for (row, (seq, start)) in argmax.iter().zip(&seqs) {
            if (*start..seq.len()).all(|j| row[j - 1] == seq[j]) {
                correct += 1;
            }
        }
    }
    Ok(correct)
}

/// Items whose gold choice has the highest summed log-likelihood (the first
/// of equal ones).
fn choice_matches(model: &Model, items: &[Item], format: Format) -> Result<usize> {
    // One sequence per (item, choice): the prefix, then the choice's tokens.
    let mut seqs = Vec::new();
    for item in items {
        if let Item::MultipleChoice {
            context, choices, ..
        } = item
        {
            for c in choices {
                let mut ids = format.prefix(context);
                let start = ids.len();
                ids.extend(encode_bytes(c));
                seqs.push((ids, start));
            }
        }
    }
    let mut scores = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(CHUNK) {
        scores.extend(sequence_logprobs(model, chunk)?);
    }
    let mut correct = 0;
    let mut k = 0;
    for item in items {
        if let Item::MultipleChoice { choices, gold, .. } = item {
            let s = &scores[k..k + choices.len()];
            k += choices.len();
            correct += usize::from(metrics::argmax(s) == Some(*gold));
        }
    }
    Ok(correct)
}

/// Summed log-probability of `ids[start..]` given the tokens before, per
/// sequence.
pub fn sequence_logprobs(model: &Model, seqs: &[(Vec<u32>, usize)]) -> Result<Vec<f64>> {
    let ids = pad(seqs, model.device())?;
    let (b, t) = ids.dims2()?;
    let logits = model.forward(&ids, None)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    // The next token of every position (padding where there is none).
    let mut next = vec![PAD; b * t];
    for (i, (seq, _)) in seqs.iter().enumerate() {
        for j in 1..seq.len() {
            next[i * t + j - 1] = seq[j];
        }
    }
    let next = Tensor::from_vec(next, (b, t, 1), &Device::Cpu)?.to_device(model.device())?;
    let picked = logp.gather(&next, 2)?.squeeze(2)?.to_vec2::<f32>()?;
    Ok(seqs
        .iter()
        .zip(&picked)
        .map(|((seq, start), row)| (*start..seq.len()).map(|j| row[j - 1] as f64).sum())
        .collect())
}

/// Right-pads the sequences (without their last token) into `(batch, t)` ids.
fn pad(seqs: &[(Vec<u32>, usize)], device: &Device) -> Result<Tensor> {
    let t = seqs
        .iter()
        .map(|(s, _)| s.len().saturating_sub(1))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = vec![PAD; seqs.len() * t];
    for (i, (s, _)) in seqs.iter().enumerate() {
        let n = s.len().saturating_sub(1);
        ids[i * t..i * t + n].copy_from_slice(&s[..n]);
    }
    Ok(Tensor::from_vec(ids, (seqs.len(), t), &Device::Cpu)?.to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::Task;
    use crate::train::{init_weights, Batch, Schedule, Trainable, Trainer};
    use rand::{Rng, SeedableRng};
    use runtime::generate::bytelevel::{EOS, VOCAB_SIZE};
    use runtime::model::ModelConfig;

    /// A tiny model that has memorised `items` (raw and chat formats).
    fn memorised(items: &[Item]) -> Model {
        let cfg = ModelConfig::from_json(
            r#"{"model_type":"llama","vocab_size":262,"hidden_size":48,"intermediate_size":96,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "max_position_embeddings":48,"bos_token_id":256,"eos_token_id":257}"#,
            std::path::Path::new("config.json"),
        )
        .unwrap();
        assert_eq!(cfg.vocab_size, VOCAB_SIZE);
        let sched = Schedule {
            steps: 150,
            lr: 1e-2,
            warmup: 10,
            final_fraction: 0.1,
            weight_decay: 0.0,
            trainable: Trainable::All,
        };
        let mut tr = Trainer::new(&cfg, &init_weights(&cfg, 5).unwrap(), &sched).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for s in 0..sched.steps {
            let seqs: Vec<_> = (0..16)
                .map(|_| {
                    Format::ALL[rng.random_range(0..2)]
                        .sequence(&items[rng.random_range(0..items.len())])
                })
                .collect();
            tr.step(&Batch::new(&seqs, VOCAB_SIZE).unwrap(), sched.lr_at(s))
                .unwrap();
        }
        Model::from_tensors(cfg, tr.weights().unwrap(), &Default::default()).unwrap()
    }

    /// Greedy decoding, one full forward pass per token (no cache, no batch).
    fn greedy(model: &Model, prefix: &[u32], max: usize) -> Vec<u32> {
        let mut ids = prefix.to_vec();
        let mut out = Vec::new();
        while out.len() < max {
            let t = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let next = model
                .forward_last(&t, None)
                .unwrap()
                .argmax(D::Minus1)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()[0];
            out.push(next);
            if next == EOS {
                break;
            }
            ids.push(next);
        }
        out
    }

    #[test]
    fn teacher_forced_check_agrees_with_greedy_decoding() {
        let s = Task::Upper.splits(2, 6, 6);
        let model = memorised(&s.train);
        let items: Vec<Item> = s.train.iter().chain(&s.test).cloned().collect();
        for format in Format::ALL {
            let mut want = 0;
            for item in &items {
                let mut gold = encode_bytes(item.answer());
                gold.push(EOS);
                let got = greedy(&model, &format.prefix(item.prompt()), gold.len());
                want += usize::from(got == gold);
            }
            let got = exact_matches(&model, &items, format).unwrap();
            assert_eq!(got, want, "{format:?}");
            // The memorised half is mostly right, the unseen half mostly wrong:
            // the comparison above is not between two zeros.
            assert!(want >= 3 && want < items.len(), "{format:?}: {want}");
            let acc = accuracy(&model, &items, format).unwrap();
            assert!((acc - want as f64 / items.len() as f64).abs() < 1e-12);
        }
    }

    #[test]
    fn choices_are_ranked_by_summed_log_likelihood() {
        let items = Task::Category.enumerate().unwrap();
        let model = memorised(&items[..10]);
        let mut want = 0;
        for item in &items {
            let Item::MultipleChoice {
                context,
                choices,
                gold,
            } = item
            else {
                unreachable!()
            };
            // One sequence at a time, log-softmax summed by hand.
            let scores: Vec<f64> = choices
                .iter()
                .map(|c| {
                    let mut ids = Format::Raw.prefix(context);
                    let start = ids.len();
                    ids.extend(encode_bytes(c));
                    let t = Tensor::new(&ids[..ids.len() - 1], &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap();
                    let lp =
                        candle_nn::ops::log_softmax(&model.forward(&t, None).unwrap(), D::Minus1)
                            .unwrap()
                            .squeeze(0)
                            .unwrap()
                            .to_vec2::<f32>()
                            .unwrap();
                    (start..ids.len())
                        .map(|j| lp[j - 1][ids[j] as usize] as f64)
                        .sum()
                })
                .collect();
            let best = (0..scores.len()).fold(0, |b, j| if scores[j] > scores[b] { j } else { b });
            want += usize::from(best == *gold);
        }
        let got = choice_matches(&model, &items, Format::Raw).unwrap();
        assert_eq!(got, want);
        assert!(want >= 8, "the memorised words are mostly right: {want}");
    }
}
