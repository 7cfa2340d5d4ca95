//! Causal self-attention with grouped-query heads, rotary positions and an
//! optional key/value cache.

use candle_core::{DType, Device, Result, Tensor};

use super::layers::{softmax_last, Hooks, Linear, Rope, RopeTables};

/// What every block's attention shares during one forward pass.
pub(crate) struct AttentionContext<'a> {
    /// The rotary embedding.
    pub rope: &'a Rope,
    /// Its tables for the positions of this pass.
    pub tables: RopeTables,
    /// Additive causal mask `(seq, cached + seq)`; `None` for a single
    /// query position, which may attend everything before it.
    pub mask: Option<Tensor>,
    /// The dtype scores and softmax are computed in.
    pub dtype: DType,
    /// Use the differentiable softmax.
    pub differentiable: bool,
}

/// The attention of one block: `o(softmax(q kᵀ / √d + mask) v)` per head,
/// with `heads / kv_heads` query heads sharing each key/value head.
#[derive(Clone, Debug)]
pub(crate) struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// Attends `x` `(batch, seq, hidden)` to the cached positions and itself;
    /// appends this pass's keys and values to `slot` when there is one.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        slot: Option<&mut Option<(Tensor, Tensor)>>,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim))?.transpose(1, 2);
        let q = heads(self.q.forward(x, hooks)?, self.heads)?;
        let k = heads(self.k.forward(x, hooks)?, self.kv_heads)?;
        let v = heads(self.v.forward(x, hooks)?, self.kv_heads)?.contiguous()?;
        let q = ctx.rope.apply(&q, &ctx.tables)?;
        let k = ctx.rope.apply(&k, &ctx.tables)?;
        let (k, v) = match slot {
            None => (k, v),
            Some(slot) => {
                let kv = match slot.take() {
                    None => (k, v),
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                };
                *slot = Some(kv.clone());
                kv
            }
        };
        let y = self.mix(&q, k, v, ctx.mask.as_ref(), ctx.dtype, ctx.differentiable)?;
        let y = y
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        self.o.forward(&y, hooks)
    }
}

impl Attention {
    /// `softmax(q kᵀ / √d + mask) v` for rotated `q` `(b, heads, t, d)`
    /// and all of a sequence's keys and values `(b, kv_heads, len, d)`,
    /// scores in `dtype`; the result is `(b, heads, t, d)` in q's dtype.
    pub(crate) fn mix(
        &self,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        mask: Option<&Tensor>,
        dtype: DType,
        differentiable: bool,
    ) -> Result<Tensor> {
        let group = self.heads / self.kv_heads;
        let k = repeat_kv(k, group)?;
        let v = repeat_kv(v, group)?;
        let in_dtype = q.dtype();
        let q = q.to_dtype(dtype)?;
        let k = k.to_dtype(dtype)?;
        let v = v.to_dtype(dtype)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            att = att.broadcast_add(mask)?;
        }
        let att = softmax_last(&att, differentiable)?;
        att.matmul(&v)?.to_dtype(in_dtype)
    }
}

/// `(t, start + t)` additive mask in `dtype`: 0 where query `i` (at position
/// `start + i`) may attend key `j` (`j ≤ start + i`), −∞ after it.
pub(crate) fn causal_mask(t: usize, start: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = start + t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (t, total), device)?.to_dtype(dtype)
}

/// Repeats each key/value head `n` times, so query head `h` meets key/value
/// head `h / n` (grouped-query attention). Concatenating along the sequence
/// and reshaping is one contiguous copy, cheaper than a strided broadcast.
fn repeat_kv(x: Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, kv, t, d) = x.dims4()?;
    Tensor::cat(&vec![&x; n], 2)?.reshape((b, kv * n, t, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_allows_the_past_and_the_present_only() {
        let m = causal_mask(2, 3, DType::F32, &Device::Cpu).unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            m.to_vec2::<f32>().unwrap(),
            [[0.0, 0.0, 0.0, 0.0, inf], [0.0, 0.0, 0.0, 0.0, 0.0]]
        );
    }

    #[test]
    fn repeated_heads_follow_their_group() {
        // Two kv heads of one position, width 1: values 10 and 20.
        let x = Tensor::new(&[10f32, 20.], &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 1))
            .unwrap();
        let r = repeat_kv(x, 3).unwrap().flatten_all().unwrap();
        assert_eq!(r.to_vec1::<f32>().unwrap(), [10., 10., 10., 20., 20., 20.]);
    }
}
