//! The routed MLP that replaces a block's MLP ([`runtime::model::Mlp`]): the
//! frozen base MLP θ0 plus experts mixed by routing weights r,
//! `down(silu(gate(x)) ⊙ up(x))` with every projection's weight
//! W0 + Σi ri τi.
//!
//! Because each projection is linear in its weights,
//! (W0 + Σi ri τi)·x = W0·x + Σi ri (τi·x): the T task vectors of a
//! projection are stacked into one `(T·out, in)` matrix and applied with one
//! matmul, and the T results are weighted and summed. No per-sample weight
//! matrix is ever formed, so a batch of sequences with different routing
//! costs T + 1 dense MLPs, whatever the batch. Biases mix the same way:
//! b0 + Σi ri τbi. Rank-one experts ([`super::rankone`]) use two thin
//! matmuls instead.

use candle_core::Tensor;

use super::{frozen, rankone, LinearExperts, Router, Routing};
use runtime::model::{Hooks, Linear, Mlp};

/// One projection of a routed MLP.
#[derive(Debug, Clone)]
pub struct RoutedLinear {
    base: Linear,
    experts: Experts,
}

#[derive(Debug, Clone)]
enum Experts {
    Dense {
        /// `(T·out, in)`.
        stack: Tensor,
        /// `(T, out)`.
        bias: Option<Tensor>,
        num: usize,
    },
    RankOne {
        u: Tensor,
        sv: Tensor,
    },
}

impl RoutedLinear {
    /// θ0's layer `base` plus its experts.
    pub fn new(base: Linear, experts: &LinearExperts) -> candle_core::Result<Self> {
        let experts = match experts {
            LinearExperts::Dense { weight, bias } => {
                let (num, out, inp) = weight.dims3()?;
                Experts::Dense {
                    stack: weight.reshape((num * out, inp))?,
                    bias: bias.clone(),
                    num,
                }
            }
            LinearExperts::RankOne { u, sv } => Experts::RankOne {
                u: u.clone(),
                sv: sv.clone(),
            },
        };
        Ok(RoutedLinear { base, experts })
    }

    /// W0·x + Σi ri (τi·x) for `x` `(batch, seq, in)` and routing weights `r`
    /// `(batch, 1 | seq, E)`.
    pub fn forward(
        &self,
        x: &Tensor,
        r: &Tensor,
        hooks: &mut Hooks,
    ) -> candle_core::Result<Tensor> {
        if let Some(c) = hooks.capture.as_deref_mut() {
            c.capture(self.base.name(), x)?;
        }
        let (b, t, i) = x.dims3()?;
        let x2 = x.reshape((b * t, i))?;
        let mut y0 = frozen::matmul_t(&x2, self.base.weight())?;
        if let Some(bias) = self.base.bias() {
            y0 = y0.broadcast_add(bias)?;
        }
        let out = y0.dim(1)?;
        let y0 = y0.reshape((b, t, out))?;
        match &self.experts {
            Experts::Dense {
                stack, bias, num, ..
            } => {
                let num = *num;
                // Every expert's output at once: (b·t, T·out).
                let ye = frozen::matmul_t(&x2, stack)?;
                // Σi ri·yi as matmuls that contract over T (candle reduces
                // over an inner dimension slowly, and so would its backward).
                let mixed = if r.dim(1)? == 1 && t > 1 {
                    // Per sequence: (b, 1, T) @ (b, T, t·out).
                    let ye = ye
                        .reshape((b, t, num, out))?
                        .transpose(1, 2)?
                        .contiguous()?
                        .reshape((b, num, t * out))?;
                    r.contiguous()?.matmul(&ye)?.reshape((b, t, out))?
                } else {
                    // Per token: (b·t, 1, T) @ (b·t, T, out).
                    let r = r.broadcast_as((b, t, num))?.contiguous()?;
                    r.reshape((b * t, 1, num))?
                        .matmul(&ye.reshape((b * t, num, out))?)?
                        .reshape((b, t, out))?
                };
                let y = (y0 + mixed)?;
                match bias {
                    None => Ok(y),
                    Some(bias) => y.broadcast_add(&r.broadcast_matmul(bias)?),
                }
            }
            Experts::RankOne { u, sv } => y0 + rankone::mix(&x2, (b, t), u, sv, r)?,
        }
    }
}

/// A block's MLP as a routed ensemble.
#[derive(Debug, Clone)]
pub struct RoutedMlp {
    gate: RoutedLinear,
    up: RoutedLinear,
    down: RoutedLinear,
    router: Router,
    routing: Routing,
}

impl RoutedMlp {
    /// The MLP from its projections (gate, up, down) and router.
    pub fn new(projections: [RoutedLinear; 3], router: Router, routing: Routing) -> Self {
        let [gate, up, down] = projections;
        RoutedMlp {
            gate,
            up,
            down,
            router,
            routing,
        }
    }
}

impl Mlp for RoutedMlp {
    fn forward(&self, x: &Tensor, hooks: &mut Hooks) -> candle_core::Result<Tensor> {
        self.forward_cached(x, None, hooks)
    }

    fn forward_cached(
        &self,
        x: &Tensor,
        state: Option<&mut Option<Tensor>>,
        hooks: &mut Hooks,
    ) -> candle_core::Result<Tensor> {
        let r = self
            .router
            .route(x, self.routing, state, hooks.routing_lens)?;
        let gate = self.gate.forward(x, &r, hooks)?.silu()?;
        let up = self.up.forward(x, &r, hooks)?;
        self.down.forward(&(gate * up)?, &r, hooks)
    }

    fn is_stateful(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn dense_mix_equals_the_explicit_weight_matrix() {
        // Two experts on a 2→2 projection with bias; per-token routing.
        // W0 = [[1, 0], [0, 1]], b0 = (0, 0); τ1 = [[1, 2], [3, 4]], τb1 = (1, 0);
        // τ2 = [[0, 1], [1, 0]], τb2 = (0, 1). Token x = (1, 1) with r = (0.5, 2):
        // W = [[1.5, 3], [3.5, 3]], b = (0.5, 2) → y = (5, 8.5).
        let dev = Device::Cpu;
        let base = Linear::new(
            "p.weight",
            Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap(),
            Some(Tensor::zeros(2, DType::F32, &dev).unwrap()),
        );
        let experts = LinearExperts::Dense {
            weight: Tensor::new(&[[[1f32, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]], &dev)
                .unwrap(),
            bias: Some(Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap()),
        };
        let lin = RoutedLinear::new(base, &experts).unwrap();
        let x = Tensor::new(&[[[1f32, 1.0]]], &dev).unwrap();
        let r = Tensor::new(&[[[0.5f32, 2.0]]], &dev).unwrap();
        let y = lin.forward(&x, &r, &mut Hooks::default()).unwrap();
        assert_eq!(y.to_vec3::<f32>().unwrap(), vec![vec![vec![5.0, 8.5]]]);
    }
}
