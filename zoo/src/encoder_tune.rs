//! A short supervised fine-tune of a sentence encoder (candle, the
//! runtime's differentiable BERT): the encoder layers and a linear head
//! over the pooled embedding trained with AdamW on a labelled text task,
//! cross-entropy; the embeddings stay frozen and the head is dropped. The
//! zoo uses it to make fine-tunes of an ONNX base for the ONNX merge tests
//! (written back into the base's graph as initializers).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use runtime::encoder::{Encoder, EncoderConfig, SentenceConfig};
use runtime::generate::TextTokenizer;
use runtime::model::{Hooks, ModelOptions};

use crate::error::Result;

/// How long and how hard to train.
#[derive(Debug, Clone)]
pub struct TuneOptions {
    /// AdamW steps.
    pub steps: usize,
    /// Texts per step.
    pub batch: usize,
    /// Learning rate.
    pub lr: f64,
    /// Tokens read per text (the rest is cut).
    pub max_tokens: usize,
    /// Seed of the head's initialization and the batch order.
    pub seed: u64,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            steps: 24,
            batch: 16,
            lr: 1e-4,
            max_tokens: 64,
            seed: 0,
        }
    }
}

/// Fine-tunes `weights` (Hugging Face names; `side_files` gives the
/// tokenizer and pooling) on `(text, class)` items; returns the new
/// encoder weights (every name of `weights`) and the loss of each step.
pub fn finetune_classifier(
    config: &EncoderConfig,
    weights: &HashMap<String, Tensor>,
    side_files: &Path,
    items: &[(String, usize)],
    opts: &TuneOptions,
) -> Result<(HashMap<String, Tensor>, Vec<f32>)> {
    let classes = items.iter().map(|(_, c)| c + 1).max().unwrap_or(0);
    if classes < 2 || items.len() < opts.batch {
        return Err(crate::ZooError::Fetch(format!(
            "a fine-tune needs two classes and at least {} items (got {classes} classes, {} items)",
            opts.batch,
            items.len()
        )));
    }
    let device = Device::Cpu;
    let sentence = SentenceConfig::from_dir(side_files, config.max_position_embeddings)?;
    let tokenizer = TextTokenizer::load(side_files)?.truncating(opts.max_tokens)?;
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut vars = Vec::new();
    let mut tensors = HashMap::new();
    for n in names {
        let t = weights[n].to_dtype(DType::F32)?.copy()?;
        if n.starts_with("encoder.") {
            let v = Var::from_tensor(&t)?;
            tensors.insert(n.clone(), v.as_tensor().clone());
            vars.push((n.clone(), v));
        } else {
            tensors.insert(n.clone(), t);
        }
    }
    let encoder = Encoder::from_tensors(
        config.clone(),
        tensors.clone(),
        &ModelOptions {
            differentiable: true,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let hidden = config.hidden_size;
    let head = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (classes, hidden), &device)? * 0.02)?)?;
    let bias = Var::zeros(classes, DType::F32, &device)?;
    let mut params: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    params.push(head.clone());
    params.push(bias.clone());
    let mut opt = AdamW::new(
        params,
        ParamsAdamW {
            lr: opts.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let encoded: Vec<(Vec<u32>, usize)> = items
        .iter()
        .map(|(t, c)| {
            let text = if sentence.lower_case {
                t.to_lowercase()
            } else {
                t.clone()
            };
            Ok((tokenizer.encode_truncated(&text)?.0, *c))
        })
        .collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    let mut losses = Vec::with_capacity(opts.steps);
    let mut cursor = encoded.len();
    for _ in 0..opts.steps {
        if cursor + opts.batch > order.len() {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        let batch = &order[cursor..cursor + opts.batch];
        cursor += opts.batch;
        let width = batch.iter().map(|&i| encoded[i].0.len()).max().unwrap_or(1);
        let (mut ids, mut mask, mut target) = (Vec::new(), Vec::new(), Vec::new());
        for &i in batch {
            let (s, c) = &encoded[i];
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(config.pad_token_id, width - s.len()));
            mask.extend(std::iter::repeat_n(1u32, s.len()));
            mask.extend(std::iter::repeat_n(0u32, width - s.len()));
            let mut onehot = vec![0f32; classes];
            onehot[*c] = 1.0;
            target.extend(onehot);
        }
        let b = batch.len();
        let ids = Tensor::from_vec(ids, (b, width), &device)?;
        let mask = Tensor::from_vec(mask, (b, width), &device)?;
        let target = Tensor::from_vec(target, (b, classes), &device)?;
        let h = encoder.forward(&ids, None, Some(&mask), &mut Hooks::default())?;
        let pooled = sentence.pool(&h, &mask)?;
        let logits = pooled
            .matmul(&head.as_tensor().t()?)?
            .broadcast_add(bias.as_tensor())?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let loss = ((logp * target)?.sum_all()?.neg()? / b as f64)?;
        opt.backward_step(&loss)?;
        losses.push(loss.to_scalar::<f32>()?);
    }
    let mut out = tensors;
    for (n, v) in vars {
        out.insert(n, v.as_tensor().copy()?.detach());
    }
    Ok((out, losses))
}
