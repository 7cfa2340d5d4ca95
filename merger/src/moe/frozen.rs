//! `x·Wᵀ` with a frozen `W`: a candle custom op whose backward pass returns
//! the gradient of `x` only.
//!
//! candle's own matmul backward computes the gradients of both operands,
//! also for weights that are not trainable, so during router training every
//! matmul with a base or expert weight would cost a third more than needed
//! (forward, ∂x and the discarded ∂W). The routed MLPs use this op when their
//! input is part of an autograd graph and a plain matmul otherwise.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

struct FrozenMatmul {
    /// `(out, in)`.
    w: Tensor,
}

impl FrozenMatmul {
    fn dims(&self, layout: &Layout) -> Result<(usize, usize, usize)> {
        let (n, k) = layout.shape().dims2()?;
        let (out, k2) = self.w.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: input has {k} features, the weight takes {k2}");
        }
        Ok((n, k, out))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k, out) = self.dims(l)?;
        let wt = self.w.t()?;
        let (ws, wl) = wt.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen matmul: the weight is not on the CPU");
        };
        Ok((s.matmul(ws, (1, n, out, k), l, wl)?, Shape::from((n, out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, k, out) = self.dims(l)?;
        let wt = self.w.t()?;
        let (ws, wl) = wt.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("frozen matmul: the weight is not on the GPU");
        };
        Ok((s.matmul(ws, (1, n, out, k), l, wl)?, Shape::from((n, out))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `x·Wᵀ` for `x` `(n, in)` and a frozen `w` `(out, in)`: `(n, out)`.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.track_op() && !w.track_op() {
        x.contiguous()?
            .apply_op1(FrozenMatmul { w: w.contiguous()? })
    } else {
        x.matmul(&w.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_input_gradient_match_a_plain_matmul() {
        // x = [[1, 2]], W = [[1, 0], [2, 3], [−1, 1]]: x·Wᵀ = [[1, 8, 1]].
        // With loss Σ (x·Wᵀ) ⊙ c, c = [[1, 2, 3]]: ∂x = c·W = [[2, 9]].
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 0.0], [2.0, 3.0], [-1.0, 1.0]], &dev).unwrap();
        let x = Var::new(&[[1f32, 2.0]], &dev).unwrap();
        let y = matmul_t(x.as_tensor(), &w).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![1.0, 8.0, 1.0]]);
        let c = Tensor::new(&[[1f32, 2.0, 3.0]], &dev).unwrap();
        let grads = (y * c).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(gx, vec![vec![2.0, 9.0]]);
        // No gradient is computed for the frozen weight.
        assert!(grads.get(&w).is_none());
        // Without a graph it is a plain matmul.
        let plain = matmul_t(&Tensor::new(&[[1f32, 2.0]], &dev).unwrap(), &w).unwrap();
        assert_eq!(plain.to_vec2::<f32>().unwrap(), vec![vec![1.0, 8.0, 1.0]]);
    }
}
