//! The runnable model of a routed ensemble's parts: the backbone as a
//! [`Model`] whose every block's MLP is a [`RoutedMlp`] over the frozen base
//! projections and the experts, routed by the block's router.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::routed_mlp::{RoutedLinear, RoutedMlp};
use super::{MoeParts, Routers, PROJECTIONS};
use crate::error::{MergeError, Result};
use runtime::model::{Linear, Model, ModelOptions};

/// The compute dtype: the one asked for, else f32 on the CPU and the stored
/// dtype elsewhere (as [`Model::from_tensors`] decides).
pub(crate) fn compute_dtype(device: &Device, asked: Option<DType>, stored: DType) -> DType {
    match asked {
        Some(d) => d,
        None if device.is_cpu() => DType::F32,
        None => stored,
    }
}

/// The runnable model of `parts` with `routers` (Vars when training).
pub(crate) fn assemble(parts: &MoeParts, routers: &Routers, differentiable: bool) -> Result<Model> {
    let embed = parts
        .backbone
        .get("model.embed_tokens.weight")
        .ok_or_else(|| MergeError::MissingTensor {
            tensor: "model.embed_tokens.weight".into(),
            model: "routed ensemble".into(),
            path: Default::default(),
        })?;
    let opts = ModelOptions {
        device: embed.device().clone(),
        dtype: Some(embed.dtype()),
        differentiable,
    };
    let mut model = Model::from_tensors(parts.config.clone(), parts.backbone.clone(), &opts)?;
    let backbone: &HashMap<String, Tensor> = &parts.backbone;
    for (l, experts) in parts.experts.iter().enumerate() {
        let mut projections = Vec::with_capacity(3);
        for (p, e) in PROJECTIONS.iter().zip(experts) {
            let prefix = format!("model.layers.{l}.mlp.{p}");
            let get = |n: &str| {
                backbone
                    .get(n)
                    .cloned()
                    .ok_or_else(|| MergeError::MissingTensor {
                        tensor: n.to_string(),
                        model: "routed ensemble".into(),
                        path: Default::default(),
                    })
            };
            let wname = format!("{prefix}.weight");
            let bias = if parts.config.mlp_bias {
                Some(get(&format!("{prefix}.bias"))?)
            } else {
                None
            };
            let base = Linear::new(wname.clone(), get(&wname)?, bias);
            projections
                .push(RoutedLinear::new(base, e).map_err(|e| MergeError::in_tensor(&wname, e))?);
        }
        let projections: [RoutedLinear; 3] = projections.try_into().expect("three projections");
        let mlp = RoutedMlp::new(
            projections,
            routers.for_layer(l).clone(),
            parts.meta.routing,
        );
        model.set_mlp(l, Box::new(mlp))?;
    }
    Ok(model)
}
