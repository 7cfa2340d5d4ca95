//! The inputs of one tensor of a merge: the base's and every expert's
//! stored bytes, with the tensor's name and position, the merge device and
//! the output dtype. What every merge method, the linear-algebra helpers and
//! the merge engine share.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::bounds::Cancel;
use crate::error::{MergeError, Result};
use crate::spec::TensorCtx;
use runtime::checkpoint::TensorRef;

/// The inputs of one tensor: the base's and every expert's stored bytes.
pub struct TensorInputs<'a> {
    /// Name and position of the tensor.
    pub ctx: TensorCtx,
    /// θ0's tensor, when the merge has a base.
    pub base: Option<TensorRef<'a>>,
    /// Each expert's tensor, in spec order.
    pub experts: Vec<TensorRef<'a>>,
    /// Where tensor arithmetic runs.
    pub device: &'a Device,
    /// The dtype the merged tensor is stored in. A method may return its
    /// result in this dtype (fused kernels cast in the same pass) or in f32.
    pub out_dtype: DType,
    /// Cancels the merge; a method that loops long on one tensor (WUDI's
    /// iterations) checks it between rounds.
    pub cancel: &'a Cancel,
}

impl TensorInputs<'_> {
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        self.base.as_ref().unwrap_or(&self.experts[0]).shape
    }

    /// The base as an f32 tensor on the merge device.
    pub fn base_f32(&self) -> Result<Tensor> {
        let base = self.base.as_ref().ok_or_else(|| {
            MergeError::Spec(format!(
                "tensor `{}`: this method needs a base model",
                self.ctx.name
            ))
        })?;
        base.to_f32_tensor(self.device).map_err(|e| self.err(e))
    }

    /// Expert `i` as an f32 tensor on the merge device.
    pub fn expert_f32(&self, i: usize) -> Result<Tensor> {
        self.experts[i]
            .to_f32_tensor(self.device)
            .map_err(|e| self.err(e))
    }

    /// Every expert as f32 tensors.
    pub fn experts_f32(&self) -> Result<Vec<Tensor>> {
        (0..self.experts.len())
            .map(|i| self.expert_f32(i))
            .collect()
    }

    /// Task vectors τi = θi − θ0 as f32 tensors.
    pub fn task_vectors(&self) -> Result<Vec<Tensor>> {
        let base = self.base_f32()?;
        (0..self.experts.len())
            .map(|i| self.expert_f32(i)?.sub(&base).map_err(|e| self.err(e)))
            .collect()
    }

    /// c0·θ0 + Σi ci·θi in the output dtype (fused on the CPU): the final
    /// step of every method that is a linear combination of its inputs.
    /// `base` is θ0's coefficient (`None`: the base is not part of it).
    pub fn combine(&self, base: Option<f32>, experts: &[f32]) -> Result<Tensor> {
        let mut refs = Vec::with_capacity(experts.len() + 1);
        let mut coeffs = Vec::with_capacity(experts.len() + 1);
        if let Some(c) = base {
            refs.push(*self.base.as_ref().ok_or_else(|| {
                MergeError::Spec(format!(
                    "tensor `{}`: this method needs a base model",
                    self.ctx.name
                ))
            })?);
            coeffs.push(c);
        }
        refs.extend(self.experts.iter().copied());
        coeffs.extend_from_slice(experts);
        crate::kernels::linear_combination_as(&refs, &coeffs, self.device, self.out_dtype)
            .map_err(|e| self.err(e))
    }

    /// Every expert's values on the host in f32, minus `origin` when given
    /// (then the task vectors τi = θi − θ0 for `origin` = θ0).
    pub fn host_vectors(&self, origin: Option<&[f32]>) -> Vec<Vec<f32>> {
        self.experts
            .iter()
            .map(|e| {
                let mut v = e.to_f32_vec();
                if let Some(o) = origin {
                    v.par_iter_mut().zip(o).for_each(|(x, o)| *x -= o);
                }
                v
            })
            .collect()
    }

    /// The merged tensor from values computed on the host, moved to the
    /// merge device (the methods that rank or iterate in host memory).
    pub fn from_host(&self, data: Vec<f32>) -> Result<Tensor> {
        Tensor::from_vec(data, self.shape(), &Device::Cpu)
            .and_then(|t| t.to_device(self.device))
            .map_err(|e| self.err(e))
    }

    /// Wraps a candle error with this tensor's name.
    pub fn err(&self, e: candle_core::Error) -> MergeError {
        MergeError::in_tensor(&self.ctx.name, e)
    }
}
