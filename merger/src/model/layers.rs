//! The building blocks of a decoder block: named linear layers whose inputs
//! can be captured, RMS norm, rotary embeddings and the replaceable MLP.
//!
//! Every layer has two code paths: candle's fused kernels for inference, and
//! compositions of differentiable primitives when the model is built with
//! `differentiable: true` (candle's fused RMS norm, softmax and rotary kernels
//! have no backward pass).

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor, D};

/// Receives the input of every linear layer during a forward pass (RegMean's
/// Gram matrices are built from these).
pub trait LinearCapture {
    /// Called with the layer's weight name (`model.layers.0.mlp.up_proj.weight`)
    /// and its input, of shape `(batch, seq, in_features)`.
    fn capture(&mut self, weight: &str, input: &Tensor) -> Result<()>;
}

/// Per-forward-pass options threaded through every layer.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Where linear inputs go, when capturing.
    pub capture: Option<&'a mut dyn LinearCapture>,
}

impl<'a> Hooks<'a> {
    /// Hooks that capture every linear input into `c`.
    pub fn capturing(c: &'a mut dyn LinearCapture) -> Self {
        Hooks { capture: Some(c) }
    }
}

/// A linear layer `y = x Wᵀ + b` that knows its weight's name.
#[derive(Clone, Debug)]
pub struct Linear {
    inner: candle_nn::Linear,
    name: String,
}

impl Linear {
    /// Wraps a weight `(out, in)` and an optional bias `(out)`.
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            inner: candle_nn::Linear::new(weight, bias),
            name: name.into(),
        }
    }

    /// The weight's tensor name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weight, `(out_features, in_features)`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// Applies the layer, reporting the input to the capture hook first.
    pub fn forward(&self, x: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        if let Some(c) = hooks.capture.as_deref_mut() {
            c.capture(&self.name, x)?;
        }
        self.inner.forward(x)
    }
}

/// Root-mean-square layer norm with a learned scale.
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

    /// `x / sqrt(mean(x²) + eps) * weight` over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.differentiable {
            candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
        }
    }
}

/// Rotary position embedding tables (the half-split layout Hugging Face's
/// Llama and Qwen2 use).
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    differentiable: bool,
}

impl Rope {
    /// Tables for positions `0..max_positions` of heads of width `head_dim`:
    /// angle `p · θ^(−2i/d)` for `i < d/2`.
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        dtype: DType,
        device: &Device,
        differentiable: bool,
    ) -> Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f64 / head_dim as f64) as f32)
            .collect();
        let half = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let angles = positions.matmul(&inv_freq)?;
        Ok(Rope {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
            differentiable,
        })
    }

    /// Rotates `x` of shape `(batch, heads, seq, head_dim)` whose first
    /// position is `start`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_, _, seq, _) = x.dims4()?;
        let cos = self.cos.narrow(0, start, seq)?;
        let sin = self.sin.narrow(0, start, seq)?;
        if self.differentiable {
            candle_nn::rotary_emb::rope_slow(x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
        }
    }

    /// Longest sequence the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
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
    /// Maps `(batch, seq, hidden)` to `(batch, seq, hidden)`.
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
}

/// The SwiGLU MLP of Llama, Mistral and Qwen2:
/// `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Clone, Debug)]
pub struct GatedMlp {
    /// `gate_proj`.
    pub gate: Linear,
    /// `up_proj`.
    pub up: Linear,
    /// `down_proj`.
    pub down: Linear,
}

impl GatedMlp {
    /// Takes `{prefix}.{gate,up,down}_proj.weight` (and `.bias` when
    /// `bias`) out of `weights`.
    pub fn from_weights(
        prefix: &str,
        weights: &mut HashMap<String, Tensor>,
        bias: bool,
    ) -> crate::Result<Self> {
        let mut lin = |p: &str| linear(&format!("{prefix}.{p}"), weights, bias);
        Ok(GatedMlp {
            gate: lin("gate_proj")?,
            up: lin("up_proj")?,
            down: lin("down_proj")?,
        })
    }
}

impl Mlp for GatedMlp {
    fn forward(&self, x: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let gate = self.gate.forward(x, hooks)?.silu()?;
        let up = self.up.forward(x, hooks)?;
        self.down.forward(&(gate * up)?, hooks)
    }
}

/// Removes and returns a named tensor, or a clear error naming it.
pub(crate) fn take(weights: &mut HashMap<String, Tensor>, name: &str) -> crate::Result<Tensor> {
    weights
        .remove(name)
        .ok_or_else(|| crate::MergeError::MissingTensor {
            tensor: name.to_string(),
            model: "model".into(),
            path: Default::default(),
        })
}

/// Builds the linear layer `{prefix}.weight` (+ `{prefix}.bias`).
pub(crate) fn linear(
    prefix: &str,
    weights: &mut HashMap<String, Tensor>,
    bias: bool,
) -> crate::Result<Linear> {
    let name = format!("{prefix}.weight");
    let w = take(weights, &name)?;
    let b = if bias {
        Some(take(weights, &format!("{prefix}.bias"))?)
    } else {
        None
    };
    Ok(Linear::new(name, w, b))
}
