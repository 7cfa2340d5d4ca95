//! The router: reads a block's MLP input and gives the routing weights of
//! its experts.
//!
//! `we_moe` and `sparse_we_moe` use Linear(d→d) → ReLU → Linear(d→T)
//! (FusionBench's depth-2 gate); `rankone_moe` uses Linear(d→T·k). Routing
//! weights are the router's raw outputs (no softmax, no top-k, may be
//! negative), averaged over the tokens of each sequence or taken per token.
//!
//! Initialisation: the first layer's weights ~ N(0, 0.01²) (seeded), its bias
//! 0; the last layer's weights 0 and its bias λ. An untrained router thus
//! outputs exactly λ for every expert, and the MoE computes exactly task
//! arithmetic θ0 + λ Σ τi. FusionBench also draws the last layer's weights
//! from N(0, 0.01²), which makes the untrained MoE only approximately task
//! arithmetic (routing weights λ ± ~1e-3); zero weights there still train:
//! their gradient is ∂L/∂r ⊗ ReLU(first layer), non-zero from the first step.
//!
//! Routers compute in f32 whatever the model's dtype; the routing weights
//! are cast to the dtype of the MLP input.

use candle_core::{DType, Device, Tensor, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::Routing;
use crate::error::{MergeError, Result};

/// Standard deviation of the first layer's initial weights.
pub const INIT_STD: f32 = 0.01;

/// A router's weights (f32).
#[derive(Debug, Clone)]
pub struct Router {
    /// `(weight (h, d), bias (h))` of the hidden layer, if any.
    hidden: Option<(Tensor, Tensor)>,
    /// `(weight (E, h or d), bias (E))` of the output layer.
    out: (Tensor, Tensor),
}

impl Router {
    /// A freshly initialised router from `input` features to `outputs`
    /// routing weights, with a hidden layer of width `hidden` when given.
    pub fn init(
        input: usize,
        hidden: Option<usize>,
        outputs: usize,
        lambda: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0f32, INIT_STD).expect("finite std");
        let hidden = match hidden {
            None => None,
            Some(h) => {
                let w: Vec<f32> = (0..h * input).map(|_| normal.sample(&mut rng)).collect();
                Some((
                    Tensor::from_vec(w, (h, input), device)?,
                    Tensor::zeros(h, DType::F32, device)?,
                ))
            }
        };
        let width = hidden
            .as_ref()
            .map_or(input, |(w, _)| w.dim(0).unwrap_or(0));
        let out = (
            Tensor::zeros((outputs, width), DType::F32, device)?,
            Tensor::full(lambda as f32, outputs, device)?,
        );
        Ok(Router { hidden, out })
    }

    /// A router from its tensors, checking that their shapes fit together;
    /// `name` prefixes the tensor names in errors.
    pub fn from_tensors(
        name: &str,
        hidden: Option<(Tensor, Tensor)>,
        out: (Tensor, Tensor),
    ) -> Result<Self> {
        let bad = |suffix: &str, t: &Tensor, want: Vec<usize>| MergeError::ShapeMismatch {
            tensor: format!("{name}.{suffix}"),
            model: name.to_string(),
            found: t.dims().into(),
            reference: "the router's other tensors".into(),
            expected: want.into(),
        };
        let two = hidden.is_some();
        let (ow, ob) = &out;
        let (e, width) = ow
            .dims2()
            .map_err(|_| bad(Self::suffix(two, 2), ow, vec![0, 0]))?;
        if ob.dims() != [e] {
            return Err(bad(Self::suffix(two, 3), ob, vec![e]));
        }
        if let Some((hw, hb)) = &hidden {
            let (h, _) = hw
                .dims2()
                .map_err(|_| bad("0.weight", hw, vec![width, 0]))?;
            if h != width {
                return Err(bad("0.weight", hw, vec![width, hw.dim(1).unwrap_or(0)]));
            }
            if hb.dims() != [h] {
                return Err(bad("0.bias", hb, vec![h]));
            }
        }
        let f32 = |t: Tensor| t.to_dtype(DType::F32);
        Ok(Router {
            hidden: hidden
                .map(|(w, b)| Ok::<_, candle_core::Error>((f32(w)?, f32(b)?)))
                .transpose()?,
            out: (f32(out.0)?, f32(out.1)?),
        })
    }

    fn suffix(two_layer: bool, i: usize) -> &'static str {
        match (two_layer, i) {
            (true, 0) => "0.weight",
            (true, 1) => "0.bias",
            (true, 2) => "2.weight",
            (true, _) => "2.bias",
            (false, 2) => "weight",
            (false, _) => "bias",
        }
    }

    /// Number of routing weights it outputs.
    pub fn outputs(&self) -> usize {
        self.out.1.dim(0).unwrap_or(0)
    }

    /// Input features.
    pub fn input(&self) -> usize {
        match &self.hidden {
            Some((w, _)) => w.dim(1).unwrap_or(0),
            None => self.out.0.dim(1).unwrap_or(0),
        }
    }

    /// Width of the hidden layer, if any.
    pub fn hidden(&self) -> Option<usize> {
        self.hidden.as_ref().map(|(w, _)| w.dim(0).unwrap_or(0))
    }

    /// The tensors with their names relative to the router
    /// (`0.weight`, `0.bias`, `2.weight`, `2.bias` as in a PyTorch
    /// `Sequential(Linear, ReLU, Linear)`, or `weight`, `bias`).
    pub fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let two = self.hidden.is_some();
        let mut v = Vec::with_capacity(4);
        if let Some((w, b)) = &self.hidden {
            v.push((Self::suffix(two, 0), w));
            v.push((Self::suffix(two, 1), b));
        }
        v.push((Self::suffix(two, 2), &self.out.0));
        v.push((Self::suffix(two, 3), &self.out.1));
        v
    }

    /// Number of parameters.
    pub fn num_parameters(&self) -> usize {
        self.tensors().iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// A router whose every tensor is `f(tensor)` (to make them `Var`s, or
    /// copy them out of training).
    pub fn try_map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Router> {
        Ok(Router {
            hidden: match &self.hidden {
                Some((w, b)) => Some((f(w)?, f(b)?)),
                None => None,
            },
            out: (f(&self.out.0)?, f(&self.out.1)?),
        })
    }

    /// Per-token router outputs `(batch, seq, E)` in f32 for an MLP input
    /// `(batch, seq, d)`.
    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let mut h = x.to_dtype(DType::F32)?.reshape((b * t, d))?;
        if let Some((w, bias)) = &self.hidden {
            h = h.matmul(&w.t()?)?.broadcast_add(bias)?.relu()?;
        }
        let (w, bias) = &self.out;
        let r = h.matmul(&w.t()?)?.broadcast_add(bias)?;
        r.reshape((b, t, self.outputs()))
    }

    /// Routing weights for an MLP input `(batch, seq, d)`, in its dtype:
    /// `(batch, 1, E)` per sequence (the mean of the per-token outputs) or
    /// `(batch, seq, E)` per token.
    ///
    /// Per sequence, the mean runs over the first `lens[i]` positions of
    /// sequence i when `lens` is given (right padding, or routing on the
    /// prompt only), over every position otherwise; `state` is the layer's
    /// slot of the KV cache: when empty the weights are computed from `x` and
    /// stored there, when full they are reused (so generated tokens keep the
    /// prompt's routing).
    pub fn route(
        &self,
        x: &Tensor,
        routing: Routing,
        state: Option<&mut Option<Tensor>>,
        lens: Option<&[usize]>,
    ) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        match (routing, state) {
            (Routing::PerToken, _) => self.logits(x)?.to_dtype(dtype),
            (Routing::PerSequence, Some(Some(r))) => {
                let (b, _, _) = x.dims3()?;
                if r.dim(0)? != b {
                    candle_core::bail!(
                        "the cached routing weights are for a batch of {} sequences, the input has {b}",
                        r.dim(0)?
                    );
                }
                Ok(r.clone())
            }
            (Routing::PerSequence, slot) => {
                let logits = self.logits(x)?;
                let r = match lens {
                    None => logits.mean_keepdim(D::Minus2)?,
                    Some(lens) => masked_mean(&logits, lens)?,
                }
                .to_dtype(dtype)?;
                if let Some(slot) = slot {
                    *slot = Some(r.clone());
                }
                Ok(r)
            }
        }
    }
}

/// Mean over the first `lens[i]` positions of each sequence of `(b, t, E)`
/// outputs, as `(b, 1, E)`: a `(b, 1, t)` weight matrix times the outputs.
fn masked_mean(logits: &Tensor, lens: &[usize]) -> candle_core::Result<Tensor> {
    let (b, t, _) = logits.dims3()?;
    if lens.len() != b || lens.iter().any(|&n| n == 0 || n > t) {
        candle_core::bail!(
            "routing lengths {lens:?} do not fit a batch of {b} sequences of {t} positions"
        );
    }
    let w: Vec<f32> = lens
        .iter()
        .flat_map(|&n| (0..t).map(move |j| if j < n { 1.0 / n as f32 } else { 0.0 }))
        .collect();
    Tensor::from_vec(w, (b, 1, t), logits.device())?.matmul(logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrained_router_outputs_lambda() {
        let r = Router::init(8, Some(8), 3, 0.3, 7, &Device::Cpu).unwrap();
        assert_eq!(r.num_parameters(), 8 * 8 + 8 + 3 * 8 + 3);
        let x = Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap();
        for routing in [Routing::PerSequence, Routing::PerToken] {
            let w = r.route(&x, routing, None, None).unwrap();
            let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|&y| y == 0.3f32), "{v:?}");
        }
        // The first layer is random N(0, 0.01²): its sample std is near 0.01.
        let w0 = r.tensors()[0]
            .1
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let std = (w0.iter().map(|x| x * x).sum::<f32>() / w0.len() as f32).sqrt();
        assert!((0.007..0.013).contains(&std), "{std}");
    }

    #[test]
    fn per_sequence_is_the_mean_of_per_token_outputs() {
        // One linear router with weight [[1, 0], [0, 2]] and bias [0.5, 0]:
        // tokens (1, 2) and (3, 4) give (1.5, 4) and (3.5, 8); mean (2.5, 6).
        let dev = Device::Cpu;
        let r = Router::from_tensors(
            "router",
            None,
            (
                Tensor::new(&[[1f32, 0.0], [0.0, 2.0]], &dev).unwrap(),
                Tensor::new(&[0.5f32, 0.0], &dev).unwrap(),
            ),
        )
        .unwrap();
        let x = Tensor::new(&[[[1f32, 2.0], [3.0, 4.0]]], &dev).unwrap();
        let tok = r.route(&x, Routing::PerToken, None, None).unwrap();
        assert_eq!(
            tok.to_vec3::<f32>().unwrap(),
            vec![vec![vec![1.5, 4.0], vec![3.5, 8.0]]]
        );
        let mut slot = None;
        let seq = r
            .route(&x, Routing::PerSequence, Some(&mut slot), None)
            .unwrap();
        assert_eq!(seq.to_vec3::<f32>().unwrap(), vec![vec![vec![2.5, 6.0]]]);
        // The slot is full now: another input reuses the stored weights.
        let y = Tensor::new(&[[[0f32, 0.0]]], &dev).unwrap();
        let again = r
            .route(&y, Routing::PerSequence, Some(&mut slot), None)
            .unwrap();
        assert_eq!(again.to_vec3::<f32>().unwrap(), vec![vec![vec![2.5, 6.0]]]);
        // Routing lengths: the mean of the first position only is (1.5, 4).
        let first = r.route(&x, Routing::PerSequence, None, Some(&[1])).unwrap();
        assert_eq!(first.to_vec3::<f32>().unwrap(), vec![vec![vec![1.5, 4.0]]]);
        assert!(r.route(&x, Routing::PerSequence, None, Some(&[3])).is_err());
        assert!(r
            .route(&x, Routing::PerSequence, None, Some(&[1, 1]))
            .is_err());
        // A different batch size cannot reuse them.
        let z = Tensor::zeros((2, 1, 2), DType::F32, &dev).unwrap();
        assert!(r
            .route(&z, Routing::PerSequence, Some(&mut slot), None)
            .is_err());
    }

    #[test]
    fn hidden_layer_applies_relu() {
        // Hidden weight [[1], [-1]], bias 0: x = 2 gives ReLU(2, -2) = (2, 0);
        // output weight [[1, 1]], bias 0.1: 2.1.
        let dev = Device::Cpu;
        let r = Router::from_tensors(
            "router",
            Some((
                Tensor::new(&[[1f32], [-1.0]], &dev).unwrap(),
                Tensor::new(&[0f32, 0.0], &dev).unwrap(),
            )),
            (
                Tensor::new(&[[1f32, 1.0]], &dev).unwrap(),
                Tensor::new(&[0.1f32], &dev).unwrap(),
            ),
        )
        .unwrap();
        let x = Tensor::new(&[[[2f32]]], &dev).unwrap();
        let y = r
            .logits(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((y[0] - 2.1).abs() < 1e-6, "{y:?}");
        let bad = Router::from_tensors(
            "model.layers.0.mlp.router",
            Some((
                Tensor::new(&[[1f32], [-1.0]], &dev).unwrap(),
                Tensor::new(&[0f32], &dev).unwrap(),
            )),
            (
                Tensor::new(&[[1f32, 1.0]], &dev).unwrap(),
                Tensor::new(&[0.1f32], &dev).unwrap(),
            ),
        );
        let e = bad.unwrap_err().to_string();
        assert!(e.contains("model.layers.0.mlp.router.0.bias"), "{e}");
    }
}
