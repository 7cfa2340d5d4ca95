//! The model a data-driven merge runs on calibration inputs, whatever the
//! family: built from tensors by Hugging Face name (an expert's, a partly
//! merged model's, or weights computed from trainable coefficients), it
//! gives the model's **predictions** on a batch of inputs, as log
//! probabilities, and can report every linear layer's input rows.
//!
//! What "prediction" means, with no label read:
//! - decoder, a text: the next-token distribution at its last position (the
//!   answer's first token, as a classifier's one prediction per input);
//! - decoder, a multiple-choice input: the softmax over its choices of their
//!   summed log-likelihoods after the context (lm-eval's scoring);
//! - encoder, a multiple-choice input: the softmax over its choices of
//!   `SCALE · cos(e(context), e(choice))`, CLIP's zero-shot head with
//!   sentences for class names;
//! - encoder, texts: for each text of the batch, the softmax over the
//!   batch's other texts of `SCALE · cos(e(text), e(other))`, the in-batch
//!   distribution of sentence-transformers' MultipleNegativesRankingLoss
//!   (scale 20): which other input it is closest to. A batch of one text
//!   predicts nothing.
//!
//! Sentence embeddings `e` are pooled as the checkpoint's
//! sentence-transformers files say, then L2-normalised.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor, D};

use crate::error::{MergeError, Result};
use crate::moe::calibration::{CalibrationInput, CalibrationItem};
use runtime::architectures::{self, Kind};
use runtime::checkpoint::Checkpoint;
use runtime::encoder::{Encoder, EncoderConfig, SentenceConfig};
use runtime::model::{Hooks, LinearCapture, Model, ModelConfig, ModelOptions};

/// The logit scale of the encoder's cosine predictions.
pub const SCALE: f64 = 20.0;

/// The architecture of a pool, read from its reference checkpoint.
#[derive(Debug, Clone)]
pub enum Family {
    /// A decoder (Llama, Mistral, Qwen2).
    Decoder(ModelConfig),
    /// A BERT encoder and its sentence-transformers pipeline.
    Encoder(EncoderConfig, SentenceConfig),
}

/// A runnable model of a [`Family`].
pub enum Net {
    /// A decoder.
    Decoder(Model),
    /// An encoder and its pooling.
    Encoder(Encoder, SentenceConfig),
}

impl Family {
    /// The family of `reference` (its config.json).
    pub fn of(reference: &Checkpoint) -> Result<Self> {
        let dir = reference.dir();
        Ok(match architectures::of_dir(dir)?.kind {
            Kind::Decoder => Family::Decoder(ModelConfig::from_dir(dir)?),
            Kind::Encoder => {
                let c = EncoderConfig::from_dir(dir)?;
                let s = SentenceConfig::from_dir(dir, c.max_position_embeddings)?;
                Family::Encoder(c, s)
            }
            Kind::Vision => {
                return Err(MergeError::Unsupported {
                    feature: "a data-driven merge of an image model".into(),
                    hint: "its statistics need image calibration inputs; use a tensorwise \
                           method (task_arithmetic, ties_merging, tsv_m, iso_cts, ...)"
                        .into(),
                })
            }
        })
    }

    /// Number of transformer blocks.
    pub fn num_blocks(&self) -> usize {
        match self {
            Family::Decoder(c) => c.num_hidden_layers,
            Family::Encoder(c, _) => c.num_hidden_layers,
        }
    }

    /// The block a tensor belongs to (`model.layers.3.…`,
    /// `encoder.layer.3.…`, `bert.encoder.layer.3.…`), if any.
    pub fn block_of(&self, name: &str) -> Option<usize> {
        let rest = match self {
            Family::Decoder(_) => name.strip_prefix("model.layers.")?,
            Family::Encoder(..) => name
                .strip_prefix("bert.")
                .unwrap_or(name)
                .strip_prefix("encoder.layer.")?,
        };
        rest.split('.').next()?.parse().ok()
    }

    /// The network over `tensors`, in `dtype` on `device`; with
    /// `differentiable`, gradients reach any tensor that is (or is computed
    /// from) a `Var`.
    pub fn build(
        &self,
        tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
        differentiable: bool,
    ) -> Result<Net> {
        let opts = ModelOptions {
            device: device.clone(),
            dtype: Some(dtype),
            differentiable,
        };
        Ok(match self {
            Family::Decoder(c) => Net::Decoder(Model::from_tensors(c.clone(), tensors, &opts)?),
            Family::Encoder(c, s) => {
                Net::Encoder(Encoder::from_tensors(c.clone(), tensors, &opts)?, s.clone())
            }
        })
    }

    /// Longest input the model reads, in tokens.
    pub fn max_len(&self) -> usize {
        match self {
            Family::Decoder(c) => c.max_position_embeddings,
            Family::Encoder(c, s) => s.max_seq_length.min(c.max_position_embeddings),
        }
    }
}

/// `x − logsumexp(x)` over the last dimension, from differentiable ops.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Right-padded rows: ids `(n, width)` and each row's length.
struct Padded {
    ids: Tensor,
    mask: Tensor,
    lens: Vec<usize>,
    width: usize,
}

fn pad(rows: &[&[u32]], pad_id: u32, device: &Device) -> Result<Padded> {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    for r in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat_n(pad_id, width - r.len()));
        mask.extend(std::iter::repeat_n(1u32, r.len()));
        mask.extend(std::iter::repeat_n(0u32, width - r.len()));
    }
    let n = rows.len();
    Ok(Padded {
        ids: Tensor::from_vec(ids, (n, width), device)?,
        mask: Tensor::from_vec(mask, (n, width), device)?,
        lens: rows.iter().map(|r| r.len()).collect(),
        width,
    })
}

/// Passes each linear input to `f` as its real rows only (padding dropped):
/// `(rows, in_features)`.
/// Layers that read one input (a block's query, key and value) get the
/// same rows tensor (one `Tensor::id`), so a capture can tell them apart
/// from layers with inputs of their own.
struct RealRows<'f> {
    index: Tensor,
    last: Option<(candle_core::TensorId, Tensor)>,
    f: &'f mut dyn FnMut(&str, &Tensor) -> candle_core::Result<()>,
}

impl LinearCapture for RealRows<'_> {
    fn capture(&mut self, weight: &str, input: &Tensor) -> candle_core::Result<()> {
        let rows = match &self.last {
            Some((id, rows)) if *id == input.id() => rows.clone(),
            _ => {
                let (b, t, d) = input.dims3()?;
                let rows = input.reshape((b * t, d))?.index_select(&self.index, 0)?;
                self.last = Some((input.id(), rows.clone()));
                rows
            }
        };
        (self.f)(weight, &rows)
    }
}

fn real_index(p: &Padded, device: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = p
        .lens
        .iter()
        .enumerate()
        .flat_map(|(r, &len)| (0..len).map(move |j| (r * p.width + j) as u32))
        .collect();
    Ok(Tensor::new(idx, device)?)
}

/// The token rows an item is read as: a text, or a multiple-choice
/// input's context + choice rows (decoder) or its context and choices as
/// separate sentences (encoder).
fn rows_of<'a>(item: &'a CalibrationItem, encoder: bool) -> Vec<std::borrow::Cow<'a, [u32]>> {
    use std::borrow::Cow;
    match &item.input {
        CalibrationInput::Text(ids) => vec![Cow::Borrowed(ids.as_slice())],
        CalibrationInput::Choices { context, choices } if encoder => {
            std::iter::once(Cow::Borrowed(context.as_slice()))
                .chain(choices.iter().map(|c| Cow::Borrowed(c.as_slice())))
                .collect()
        }
        CalibrationInput::Choices { context, choices } => choices
            .iter()
            .map(|c| {
                let mut r = context.clone();
                r.extend_from_slice(c);
                Cow::Owned(r)
            })
            .collect(),
    }
}

impl Net {
    fn device(&self) -> &Device {
        match self {
            Net::Decoder(m) => m.device(),
            Net::Encoder(e, _) => e.device(),
        }
    }

    fn pad_id(&self) -> u32 {
        match self {
            Net::Decoder(_) => 0,
            Net::Encoder(e, _) => e.config().pad_token_id,
        }
    }

    /// Hidden output of one padded batch: decoder logits `(n, L, V)`,
    /// encoder sentence embeddings `(n, d)` (L2-normalised).
    fn run(&self, p: &Padded, hooks: &mut Hooks) -> Result<Tensor> {
        Ok(match self {
            Net::Decoder(m) => m.forward_with(&p.ids, None, hooks)?,
            Net::Encoder(e, s) => {
                let hidden = e.forward(&p.ids, None, Some(&p.mask), hooks)?;
                let pooled = s.pool(&hidden, &p.mask)?;
                let norm = pooled
                    .sqr()?
                    .sum_keepdim(1)?
                    .sqrt()?
                    .clamp(1e-12, f64::MAX)?;
                pooled.broadcast_div(&norm)?
            }
        })
    }

    /// Runs every input of `items` once, reporting each linear layer's
    /// input rows (padding dropped) to `f`.
    pub fn capture(
        &self,
        items: &[&CalibrationItem],
        f: &mut dyn FnMut(&str, &Tensor) -> candle_core::Result<()>,
    ) -> Result<()> {
        let encoder = matches!(self, Net::Encoder(..));
        let rows: Vec<_> = items.iter().flat_map(|i| rows_of(i, encoder)).collect();
        let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_ref()).collect();
        if refs.is_empty() {
            return Ok(());
        }
        let p = pad(&refs, self.pad_id(), self.device())?;
        let mut sink = RealRows {
            index: real_index(&p, self.device())?,
            last: None,
            f,
        };
        self.run(&p, &mut Hooks::capturing(&mut sink))?;
        Ok(())
    }

    /// The model's predictions on `items` as log-probability matrices, one
    /// row per prediction (see the module docs); empty when the batch
    /// predicts nothing (one encoder text alone).
    pub fn predictions(&self, items: &[&CalibrationItem]) -> Result<Vec<Tensor>> {
        let device = self.device().clone();
        let mut out = Vec::new();
        let texts: Vec<&[u32]> = items
            .iter()
            .filter_map(|i| match &i.input {
                CalibrationInput::Text(ids) => Some(ids.as_slice()),
                _ => None,
            })
            .collect();
        let choices = items
            .iter()
            .filter(|i| !matches!(i.input, CalibrationInput::Text(_)));
        match self {
            Net::Decoder(_) => {
                if !texts.is_empty() {
                    let p = pad(&texts, 0, &device)?;
                    let logits = self.run(&p, &mut Hooks::default())?;
                    let last: Vec<Tensor> = p
                        .lens
                        .iter()
                        .enumerate()
                        .map(|(r, &len)| logits.i((r, len - 1)))
                        .collect::<candle_core::Result<_>>()?;
                    out.push(log_softmax(&Tensor::stack(&last, 0)?)?);
                }
                for item in choices {
                    let CalibrationInput::Choices { context, choices } = &item.input else {
                        continue;
                    };
                    let rows = rows_of(item, false);
                    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_ref()).collect();
                    let p = pad(&refs, 0, &device)?;
                    let lp = log_softmax(&self.run(&p, &mut Hooks::default())?)?;
                    let mut ll = Vec::with_capacity(choices.len());
                    for (c, cont) in choices.iter().enumerate() {
                        let at = lp.i(c)?.narrow(0, context.len() - 1, cont.len())?;
                        let target = Tensor::new(cont.as_slice(), &device)?.unsqueeze(1)?;
                        ll.push(at.gather(&target, 1)?.sum_all()?);
                    }
                    out.push(log_softmax(&Tensor::stack(&ll, 0)?.unsqueeze(0)?)?);
                }
            }
            Net::Encoder(..) => {
                if texts.len() >= 2 {
                    let p = pad(&texts, self.pad_id(), &device)?;
                    let e = self.run(&p, &mut Hooks::default())?;
                    let n = texts.len();
                    let eye = Tensor::eye(n, DType::F32, &device)?.to_dtype(e.dtype())?;
                    let logits = ((e.matmul(&e.t()?)? * SCALE)? - (eye * 1e4)?)?;
                    out.push(log_softmax(&logits)?);
                }
                for item in choices {
                    let rows = rows_of(item, true);
                    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_ref()).collect();
                    let p = pad(&refs, self.pad_id(), &device)?;
                    let e = self.run(&p, &mut Hooks::default())?;
                    let k = refs.len() - 1;
                    let ctx = e.narrow(0, 0, 1)?;
                    let cands = e.narrow(0, 1, k)?;
                    let logits = (ctx.matmul(&cands.t()?)? * SCALE)?;
                    out.push(log_softmax(&logits)?);
                }
            }
        }
        Ok(out)
    }
}

/// Keeps the inputs the model can read: non-empty, cut to `max_len` tokens
/// (a text truncated, a choice that does not fit after its context
/// dropped; an input left with fewer than two choices becomes its
/// context's text).
pub fn fit(items: &[CalibrationItem], family: &Family) -> Vec<CalibrationItem> {
    let max = family.max_len();
    let encoder = matches!(family, Family::Encoder(..));
    items
        .iter()
        .filter(|i| !i.is_empty())
        .map(|i| {
            let input = match &i.input {
                CalibrationInput::Text(ids) => {
                    CalibrationInput::Text(ids[..ids.len().min(max)].to_vec())
                }
                CalibrationInput::Choices { context, choices } => {
                    let context = context[..context.len().min(max)].to_vec();
                    let kept: Vec<Vec<u32>> = choices
                        .iter()
                        .filter(|c| !c.is_empty())
                        .filter(|c| {
                            if encoder {
                                c.len() <= max
                            } else {
                                context.len() + c.len() <= max
                            }
                        })
                        .cloned()
                        .collect();
                    if kept.len() >= 2 {
                        CalibrationInput::Choices {
                            context,
                            choices: kept,
                        }
                    } else {
                        CalibrationInput::Text(context)
                    }
                }
            };
            CalibrationItem {
                source: i.source,
                input,
            }
        })
        .collect()
}

/// The float tensors of `ck` the network reads (what a data-driven merge
/// computes), as f32 on `device`; others (integer buffers) are left out.
pub fn float_tensors(ck: &Checkpoint, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, entry) in ck.tensors() {
        if !entry.dtype.is_float() {
            continue;
        }
        let t = ck
            .tensor(name)?
            .to_f32_tensor(device)
            .map_err(|e| MergeError::in_tensor(name, e))?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}
