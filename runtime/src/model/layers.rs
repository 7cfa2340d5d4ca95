//! The building blocks of a decoder block: named linear layers whose inputs
//! can be captured, RMS norm, rotary embeddings and the replaceable MLP.
//!
//! Layers that candle implements as fused kernels have two code paths: the
//! fused kernel for inference, and a composition of differentiable
//! primitives when the model is built with `differentiable: true` (candle's
//! fused RMS norm, softmax and rotary kernels have no backward pass).

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor, D};

use super::delta::{add_runs, DeltaRun};
use super::host_terms::{linear_terms, HostTerms};
use super::skinny;
use super::weights::Weights;

/// Receives the input of every linear layer during a forward pass (RegMean's
/// Gram matrices are built from these).
///
/// Any `FnMut(&str, &Tensor) -> candle_core::Result<()>` closure is a
/// capture.
pub trait LinearCapture {
    /// Called with the layer's weight name (`model.layers.0.mlp.up_proj.weight`)
    /// and its input, of shape `(batch, seq, in_features)`, before the layer
    /// is applied.
    fn capture(&mut self, weight: &str, input: &Tensor) -> Result<()>;
}

impl<F: FnMut(&str, &Tensor) -> Result<()>> LinearCapture for F {
    fn capture(&mut self, weight: &str, input: &Tensor) -> Result<()> {
        self(weight, input)
    }
}

/// Per-forward-pass hooks threaded through every layer. `Hooks::default()`
/// observes nothing.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Where linear inputs go, when capturing.
    pub capture: Option<&'a mut dyn LinearCapture>,
    /// For each sequence of the batch, how many leading positions a routed
    /// MLP's per-sequence routing averages over (`None`: every position).
    /// Pass the real lengths of right-padded sequences so that padding never
    /// changes the routing, or the prompt (context) lengths to route on the
    /// prompt as cached decoding does. Plain MLPs ignore it.
    pub routing_lens: Option<&'a [usize]>,
    /// The merges' deltas over the model's weights, by runs of rows (see
    /// [`DeltaRun`]): every linear layer adds each run's own term to the
    /// base's product. `None`: the weights as they are.
    pub deltas: Option<&'a [DeltaRun<'a>]>,
}

impl<'a> Hooks<'a> {
    /// Hooks that capture every linear input into `c`.
    pub fn capturing(c: &'a mut dyn LinearCapture) -> Self {
        Hooks {
            capture: Some(c),
            routing_lens: None,
            deltas: None,
        }
    }

    /// Hooks that only set [`Hooks::routing_lens`].
    pub fn routing_on(lens: &'a [usize]) -> Self {
        Hooks {
            capture: None,
            routing_lens: Some(lens),
            deltas: None,
        }
    }
}

/// A linear layer `y = x Wᵀ + b` that knows its weight's name, so a capture
/// hook can tell the layers apart.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use runtime::model::{Hooks, Linear};
/// # fn main() -> candle_core::Result<()> {
/// let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu)?;
/// let b = Tensor::new(&[0f32, 1., 2.], &Device::Cpu)?;
/// let layer = Linear::new("proj.weight", w, Some(b));
/// let x = Tensor::new(&[[[10f32, 100.]]], &Device::Cpu)?;
/// let y = layer.forward(&x, &mut Hooks::default())?;
/// assert_eq!(y.to_vec3::<f32>()?, [[[210.0, 431.0, 652.0]]]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Linear {
    inner: candle_nn::Linear,
    name: String,
    /// `{prefix}.bias` when the layer has a bias.
    bias_name: Option<String>,
    /// The tensor whose delta applies to this layer: its weight, or the
    /// embedding a tied output head shares.
    delta_name: Option<String>,
}

impl Linear {
    /// Wraps a weight `(out, in)` and an optional bias `(out)`.
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        let name = name.into();
        let bias_name = bias.as_ref().map(|_| {
            let prefix = name.strip_suffix(".weight").unwrap_or(&name);
            format!("{prefix}.bias")
        });
        Linear {
            inner: candle_nn::Linear::new(weight, bias),
            name,
            bias_name,
            delta_name: None,
        }
    }

    /// An output head tied to embedding `embedding` (whose weight it
    /// shares): a merge's delta of the embedding applies to it.
    pub fn tied(name: impl Into<String>, weight: Tensor, embedding: &str) -> Self {
        let mut l = Self::new(name, weight, None);
        l.delta_name = Some(embedding.to_string());
        l
    }

    /// The weight's tensor name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weight, `(out_features, in_features)`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias, `(out_features)`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// Applies the layer to `(.., in_features)`, reporting the input to the
    /// capture hook first. With [`Hooks::deltas`], the base's product is
    /// computed once for every row and each run adds its own delta's term
    /// `x ΔWᵀ (+ Δb)`.
    pub fn forward(&self, x: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        if let Some(c) = hooks.capture.as_deref_mut() {
            c.capture(&self.name, x)?;
        }
        let y = match skinny::product(x, self.inner.weight()) {
            Some(y) => match self.inner.bias() {
                Some(b) => y?.broadcast_add(b)?,
                None => y?,
            },
            None => self.inner.forward(x)?,
        };
        match hooks.deltas {
            None => Ok(y),
            Some(runs) => {
                let weight = self.delta_name.as_deref().unwrap_or(&self.name);
                let out = y.dim(D::Minus1)?;
                match linear_terms(x, runs, weight, self.bias_name.as_deref(), out)? {
                    HostTerms::Term(t) => return y + t,
                    HostTerms::Nothing => return Ok(y),
                    HostTerms::Unsupported => {}
                }
                self.tensor_terms(y, x, runs)
            }
        }
    }

    /// `y` plus every run's delta term, as tensor operations (any device
    /// and dtype, every form).
    fn tensor_terms(&self, y: Tensor, x: &Tensor, runs: &[DeltaRun]) -> Result<Tensor> {
        add_runs(y, x, runs, |d, x| {
            let term = d.linear_term(self.delta_name.as_deref().unwrap_or(&self.name), x)?;
            let bias = match &self.bias_name {
                Some(b) => d.vector(b)?,
                None => None,
            };
            Ok(match (term, bias) {
                (t, None) => t,
                (None, Some(b)) => {
                    let mut shape = x.dims().to_vec();
                    if let Some(last) = shape.last_mut() {
                        *last = b.dim(0)?;
                    }
                    Some(b.to_dtype(x.dtype())?.broadcast_as(shape)?.contiguous()?)
                }
                (Some(t), Some(b)) => Some(t.broadcast_add(&b.to_dtype(t.dtype())?)?),
            })
        })
    }
}

/// Root-mean-square layer norm with a learned scale:
/// `x / sqrt(mean(x²) + eps) ⊙ weight` over the last dimension.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
    differentiable: bool,
}

impl RmsNorm {
    /// A norm with scale `weight` (shape `(hidden)`).
    pub fn new(weight: Tensor, eps: f64, differentiable: bool) -> Self {
        RmsNorm {
            weight,
            eps: eps as f32,
            differentiable,
        }
    }

    /// The learned scale.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_scaled(x, &self.weight)
    }

    /// Normalises with scale `weight` instead of the norm's own.
    fn forward_scaled(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        if self.differentiable {
            candle_nn::ops::rms_norm_slow(x, weight, self.eps)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, weight, self.eps)
        }
    }

    /// [`RmsNorm::forward`] where each run of rows with a delta of tensor
    /// `name` scales by the base's weight plus that delta.
    pub fn forward_runs(
        &self,
        x: &Tensor,
        name: &str,
        runs: Option<&[DeltaRun]>,
    ) -> Result<Tensor> {
        let Some(runs) =
            runs.filter(|r| r.iter().any(|r| r.delta.is_some_and(|d| d.touches(name))))
        else {
            return self.forward(x);
        };
        let scaled = |d: Option<&super::delta::ModelDelta>, x: &Tensor| -> Result<Tensor> {
            match d.map(|d| d.vector(name)).transpose()?.flatten() {
                Some(dw) => {
                    self.forward_scaled(x, &(&self.weight + dw.to_dtype(self.weight.dtype())?)?)
                }
                None => self.forward(x),
            }
        };
        if let [only] = runs {
            return scaled(only.delta, x);
        }
        let mut parts = Vec::with_capacity(runs.len());
        let mut at = 0;
        for run in runs {
            parts.push(scaled(run.delta, &x.narrow(1, at, run.rows)?)?);
            at += run.rows;
        }
        Tensor::cat(&parts, 1)
    }
}

/// Rotary position embedding in the half-split layout of Hugging Face's
/// Llama, Mistral and Qwen2: pair `(x_i, x_{i+d/2})` of a head of width `d`
/// is rotated by the angle `p · θ^(−2i/d)` at position `p`.
///
/// The cos/sin tables are computed for the positions of each forward pass
/// (a few thousand multiplications for a decoding step) rather than for
/// `max_position_embeddings` up front, so a config with a huge context
/// costs nothing until it is used.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    differentiable: bool,
}

/// The cos and sin tables of one forward pass, `(seq, head_dim / 2)` each.
#[derive(Clone, Debug)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Rotary embedding for heads of width `head_dim` (even) with base `theta`.
    pub fn new(head_dim: usize, theta: f64, differentiable: bool) -> Self {
        let inv_freq = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f64 / head_dim as f64) as f32)
            .collect();
        Rope {
            inv_freq,
            differentiable,
        }
    }

    /// The tables for positions `start..start + len`, in `dtype` on `device`.
    /// Angles are computed in f32 as `p · inv_freq` (what candle-transformers
    /// and Hugging Face compute), then converted.
    pub fn tables(
        &self,
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<RopeTables> {
        self.tables_of(&[(start, len)], dtype, device)
    }

    /// The tables of several runs of positions `(start, len)`, one after
    /// the other: the positions of a packed batch of sequences.
    pub fn tables_of(
        &self,
        spans: &[(usize, usize)],
        dtype: DType,
        device: &Device,
    ) -> Result<RopeTables> {
        let half = self.inv_freq.len();
        let len: usize = spans.iter().map(|s| s.1).sum();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in spans.iter().flat_map(|&(start, n)| start..start + n) {
            for f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |v: Vec<f32>| Tensor::from_vec(v, (len, half), device)?.to_dtype(dtype);
        Ok(RopeTables {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }

    /// Rotates `x` of shape `(batch, heads, seq, head_dim)` with the tables
    /// of its positions.
    pub fn apply(&self, x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
        if self.differentiable {
            candle_nn::rotary_emb::rope_slow(x, &tables.cos, &tables.sin)
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &tables.cos, &tables.sin)
        }
    }
}

/// Softmax over the last dimension, fused or differentiable.
pub fn softmax_last(x: &Tensor, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// The feed-forward part of a decoder block. Replaceable per layer (see
/// [`crate::model::Model::set_mlp`]), so a routed ensemble of experts can take
/// its place.
pub trait Mlp: Send + Sync {
    /// Maps `(batch, seq, hidden)` to `(batch, seq, hidden)`. Implementations
    /// pass `hooks` on to their linear layers so captures see them.
    fn forward(&self, x: &Tensor, hooks: &mut Hooks) -> Result<Tensor>;

    /// [`Mlp::forward`] with this layer's per-sequence state slot of the KV
    /// cache (`None` when the forward pass has no cache). A routed MLP keeps
    /// its routing weights there: computed and stored when the slot is empty
    /// (the prompt), reused while it is full (the generated tokens). The
    /// default ignores the slot.
    fn forward_cached(
        &self,
        x: &Tensor,
        state: Option<&mut Option<Tensor>>,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let _ = state;
        self.forward(x, hooks)
    }

    /// Whether the layer keeps per-sequence state in the cache (a routed
    /// MLP does); such a layer cannot run rows of several sequences
    /// packed together, so its model is not batched
    /// ([`crate::model::Model::batchable`]).
    fn is_stateful(&self) -> bool {
        false
    }

    /// A copy sharing the layer's tensors, for a model that holds a merge
    /// as a delta over this one ([`crate::model::Model::with_delta`]);
    /// `None` for a layer that cannot take a delta (a routed MLP).
    fn clone_mlp(&self) -> Option<Box<dyn Mlp>> {
        None
    }
}

/// The SwiGLU MLP of Llama, Mistral and Qwen2:
/// `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Clone, Debug)]
pub struct GatedMlp {
    /// `gate_proj`, `(intermediate, hidden)`.
    pub gate: Linear,
    /// `up_proj`, `(intermediate, hidden)`.
    pub up: Linear,
    /// `down_proj`, `(hidden, intermediate)`.
    pub down: Linear,
}

impl GatedMlp {
    /// Takes `{prefix}.{gate,up,down}_proj.weight` (and `.bias` when `bias`)
    /// out of `weights`, as they are (no dtype or device change). The shapes
    /// must agree with each other: gate and up `(m, h)`, down `(h, m)`.
    pub fn from_weights(
        prefix: &str,
        weights: &mut HashMap<String, Tensor>,
        bias: bool,
    ) -> crate::Result<Self> {
        const SOURCE: &str = "MLP weights";
        let gate = format!("{prefix}.gate_proj.weight");
        let (m, h) = match weights.get(&gate).map(|t| t.dims()) {
            Some(&[m, h]) => (m, h),
            Some(other) => {
                return Err(crate::RuntimeError::Model(format!(
                    "tensor `{gate}` has shape {other:?}; an MLP projection is a matrix"
                )))
            }
            None => {
                return Err(crate::RuntimeError::MissingTensor {
                    tensor: gate,
                    model: SOURCE.into(),
                    path: Default::default(),
                })
            }
        };
        Weights::new(weights, SOURCE, Default::default(), None).mlp(prefix, h, m, bias)
    }

    /// Builds the MLP from its three layers.
    pub fn new(gate: Linear, up: Linear, down: Linear) -> Self {
        GatedMlp { gate, up, down }
    }
}

impl Mlp for GatedMlp {
    fn forward(&self, x: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let gate = self.gate.forward(x, hooks)?.silu()?;
        let up = self.up.forward(x, hooks)?;
        self.down.forward(&(gate * up)?, hooks)
    }

    fn clone_mlp(&self) -> Option<Box<dyn Mlp>> {
        Some(Box::new(self.clone()))
    }
}

/// The layers built from a tensor map (here, so that the map reader
/// knows nothing of the layers).
impl Weights<'_> {
    /// The linear layer `{prefix}.weight` of shape `(out, inp)`, with
    /// `{prefix}.bias` of shape `(out)` when `bias`.
    pub(crate) fn linear(
        &mut self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> crate::Result<Linear> {
        let name = format!("{prefix}.weight");
        let w = self.take(&name, &[out, inp])?;
        let b = if bias {
            Some(self.take(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(name, w, b))
    }

    /// The gated MLP `{prefix}.{gate,up,down}_proj` between widths `hidden`
    /// and `intermediate`.
    pub(crate) fn mlp(
        &mut self,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
        bias: bool,
    ) -> crate::Result<GatedMlp> {
        Ok(GatedMlp::new(
            self.linear(&format!("{prefix}.gate_proj"), intermediate, hidden, bias)?,
            self.linear(&format!("{prefix}.up_proj"), intermediate, hidden, bias)?,
            self.linear(&format!("{prefix}.down_proj"), hidden, intermediate, bias)?,
        ))
    }
}
