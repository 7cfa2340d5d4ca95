//! Taking a model's tensors out of a map keyed by Hugging Face names: each
//! one is checked against the shape the config implies, then moved to the
//! compute dtype and device only when it is not there already (so merged
//! weights and `Var`s are used as they are, without a copy).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::error::{Result, RuntimeError};

/// A tensor map being consumed by a model constructor.
pub(crate) struct Weights<'a> {
    map: &'a mut HashMap<String, Tensor>,
    /// Names the weights' origin in errors (checkpoint name, or a label).
    source: String,
    /// The checkpoint folder, when the weights come from one.
    path: PathBuf,
    /// Compute dtype and device; `None` leaves tensors where they are.
    target: Option<(DType, Device)>,
}

impl<'a> Weights<'a> {
    /// Wraps `map`; `source` and `path` only appear in error messages.
    pub(crate) fn new(
        map: &'a mut HashMap<String, Tensor>,
        source: &str,
        path: PathBuf,
        target: Option<(DType, Device)>,
    ) -> Self {
        Weights {
            map,
            source: source.to_string(),
            path,
            target,
        }
    }

    /// Removes tensor `name`, checks that its shape is `shape` and converts
    /// it to the target dtype and device when it differs.
    pub(crate) fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .map
            .remove(name)
            .ok_or_else(|| RuntimeError::MissingTensor {
                tensor: name.to_string(),
                model: self.source.clone(),
                path: self.path.clone(),
            })?;
        if t.dims() != shape {
            return Err(RuntimeError::ShapeMismatch {
                tensor: name.to_string(),
                model: self.source.clone(),
                found: t.dims().into(),
                reference: "config.json".into(),
                expected: shape.into(),
            });
        }
        let Some((dtype, device)) = &self.target else {
            return Ok(t);
        };
        let in_tensor = |e| RuntimeError::in_tensor(name, e);
        let t = if t.device().same_device(device) {
            t
        } else {
            t.to_device(device).map_err(in_tensor)?
        };
        // `to_dtype` returns the tensor itself (shared storage, autograd
        // intact) when the dtype already matches.
        t.to_dtype(*dtype).map_err(in_tensor)
    }

    /// Drops tensor `name` if present (a tied `lm_head.weight`).
    pub(crate) fn discard(&mut self, name: &str) {
        self.map.remove(name);
    }
}
