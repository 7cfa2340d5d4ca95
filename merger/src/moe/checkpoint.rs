//! A routed ensemble on disk: a Hugging Face style folder.
//!
//! - `model.safetensors` (sharded with an index past the shard size):
//!   - the backbone under the usual names (task arithmetic outside the MLPs,
//!     θ0's MLP weights; for `rankone_moe` the MLP biases are task
//!     arithmetic), in the stored dtype;
//!   - the experts: `model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`
//!     (and `.bias`) = τj of that projection (`sparse_we_moe`: pruned, stored
//!     dense); for `rankone_moe`, `….{proj}.u` `(out, k)` and `….{proj}.sv`
//!     `(k, in)` with τj ≈ u·sv;
//!   - the routers, in f32, named as a PyTorch `Sequential(Linear, ReLU,
//!     Linear)`: `model.layers.{i}.mlp.router.{0,2}.{weight,bias}`
//!     (`rankone_moe`: `model.layers.{i}.mlp.router.{weight,bias}`;
//!     `sparse_we_moe`'s shared router: `model.mlp_router.{0,2}.{weight,bias}`);
//! - `config.json`: the base's, plus a `fusion_moe` object ([`MoeMeta`]:
//!   method, experts, routing, λ, router shape, training report, spec);
//! - the base's tokenizer and generation files, copied.
//!
//! [`runtime::model::Model::load`] recognises the `fusion_moe` key and loads
//! the folder as the routed model, with logits identical to the saved one:
//! every tensor is rounded to the stored dtype when the MoE is built, so
//! writing it loses nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::assemble::compute_dtype;
use super::{
    LinearExperts, MoeMeta, MoeMethod, MoeParts, Router, Routers, TrainReport, PROJECTIONS,
};
use crate::error::{MergeError, Result};
use crate::merge::with_f32_data;
use runtime::checkpoint::{dtype_name, Checkpoint, CheckpointWriter, WriteOptions};
use runtime::model::{ModelConfig, ModelOptions};
use runtime::RuntimeError;

/// The config.json key that marks a routed ensemble.
pub const META_KEY: &str = "fusion_moe";

/// Router name prefix of block `layer`, or of the shared router.
fn router_prefix(shared: bool, layer: usize) -> String {
    if shared {
        "model.mlp_router".into()
    } else {
        format!("model.layers.{layer}.mlp.router")
    }
}

fn expert_prefix(layer: usize, expert: usize, proj: &str) -> String {
    format!("model.layers.{layer}.mlp.experts.{expert}.{proj}")
}

/// True when `name` belongs to the experts or routers, not the backbone.
fn is_moe_tensor(name: &str) -> bool {
    name.contains(".mlp.experts.")
        || name.contains(".mlp.router.")
        || name.starts_with("model.mlp_router.")
}

/// True when `DIR/config.json` has a `fusion_moe` object. A folder without
/// a readable config.json is not one (loading it reports the real problem).
pub(crate) fn is_moe_folder(dir: &Path) -> Result<bool> {
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(false);
    };
    Ok(serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .is_some_and(|v| v.get(META_KEY).is_some()))
}

/// Every tensor of `parts` to write, with its stored dtype.
fn tensors_to_write(parts: &MoeParts) -> Result<Vec<(String, DType, Tensor)>> {
    let mut out = Vec::new();
    let mut names: Vec<&String> = parts.backbone.keys().collect();
    names.sort();
    for n in names {
        out.push((n.clone(), parts.store_dtype, parts.backbone[n].clone()));
    }
    let t_num = parts.meta.num_experts;
    for (l, experts) in parts.experts.iter().enumerate() {
        for (proj, e) in PROJECTIONS.iter().zip(experts) {
            for j in 0..t_num {
                let p = expert_prefix(l, j, proj);
                let err = |e| MergeError::in_tensor(&p, e);
                match e {
                    LinearExperts::Dense { weight, bias } => {
                        out.push((
                            format!("{p}.weight"),
                            parts.store_dtype,
                            weight.get(j).map_err(err)?,
                        ));
                        if let Some(b) = bias {
                            out.push((
                                format!("{p}.bias"),
                                parts.store_dtype,
                                b.get(j).map_err(err)?,
                            ));
                        }
                    }
                    LinearExperts::RankOne { u, sv } => {
                        let k = sv.dim(0).map_err(err)? / t_num;
                        out.push((
                            format!("{p}.u"),
                            parts.store_dtype,
                            u.narrow(1, j * k, k).map_err(err)?,
                        ));
                        out.push((
                            format!("{p}.sv"),
                            parts.store_dtype,
                            sv.narrow(0, j * k, k).map_err(err)?,
                        ));
                    }
                }
            }
        }
    }
    let shared = matches!(parts.routers, Routers::Shared(_));
    for (l, r) in parts.routers.all().into_iter().enumerate() {
        let prefix = router_prefix(shared, l);
        for (suffix, t) in r.tensors() {
            out.push((format!("{prefix}.{suffix}"), DType::F32, t.clone()));
        }
    }
    Ok(out)
}

/// Writes `parts` as a folder at `dir` (see the module docs).
pub fn save(parts: &MoeParts, dir: &Path, opts: &WriteOptions) -> Result<PathBuf> {
    let tensors = tensors_to_write(parts)?;
    let layout: Vec<(String, DType, Vec<usize>)> = tensors
        .iter()
        .map(|(n, d, t)| (n.clone(), *d, t.dims().to_vec()))
        .collect();
    let writer = CheckpointWriter::create(dir, &layout, opts)?;
    for (name, _, t) in &tensors {
        with_f32_data(t, |data| writer.write_f32(name, data))
            .map_err(|e| MergeError::in_tensor(name, e))??;
    }
    if let Some(from) = &parts.side_files {
        writer.copy_side_files(from)?;
    }
    let mut config = parts.hf_config.clone();
    config["torch_dtype"] = dtype_name(parts.store_dtype).into();
    config[META_KEY] = serde_json::to_value(&parts.meta).expect("meta serialises");
    writer.write_file(
        "config.json",
        &serde_json::to_vec_pretty(&config).expect("json"),
    )?;
    Ok(writer.finish()?)
}

/// Reads tensors of an opened checkpoint onto a device in a dtype.
struct Reader<'a> {
    ck: &'a Checkpoint,
    device: &'a Device,
}

impl Reader<'_> {
    fn get(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let t = self.ck.tensor(name).map_err(|e| match e {
            RuntimeError::MissingTensor { tensor, .. } => MergeError::MissingTensor {
                tensor,
                model: self.ck.name().to_string(),
                path: self.ck.dir().to_path_buf(),
            },
            e => e.into(),
        })?;
        let err = |e| MergeError::in_tensor(name, e);
        t.into_tensor()
            .and_then(|t| t.to_device(self.device))
            .and_then(|t| t.to_dtype(dtype))
            .map_err(err)
    }

    /// A tensor that must have shape `want`.
    fn shaped(&self, name: &str, dtype: DType, want: &[usize]) -> Result<Tensor> {
        let t = self.get(name, dtype)?;
        if t.dims() != want {
            return Err(MergeError::ShapeMismatch {
                tensor: name.to_string(),
                model: self.ck.name().to_string(),
                found: t.dims().into(),
                reference: "config.json".into(),
                expected: want.into(),
            });
        }
        Ok(t)
    }

    /// The routers `meta` describes.
    fn routers(&self, meta: &MoeMeta, layers: usize, d: usize) -> Result<Routers> {
        let r = &meta.router;
        let one = |prefix: String| -> Result<Router> {
            let w = |s: &str| format!("{prefix}.{s}");
            let f = DType::F32;
            match r.hidden {
                Some(h) => Router::from_tensors(
                    &prefix,
                    Some((
                        self.shaped(&w("0.weight"), f, &[h, d])?,
                        self.shaped(&w("0.bias"), f, &[h])?,
                    )),
                    (
                        self.shaped(&w("2.weight"), f, &[r.outputs, h])?,
                        self.shaped(&w("2.bias"), f, &[r.outputs])?,
                    ),
                ),
                None => Router::from_tensors(
                    &prefix,
                    None,
                    (
                        self.shaped(&w("weight"), f, &[r.outputs, d])?,
                        self.shaped(&w("bias"), f, &[r.outputs])?,
                    ),
                ),
            }
        };
        Ok(if r.shared {
            Routers::Shared(one(router_prefix(true, 0))?)
        } else {
            Routers::PerLayer(
                (0..layers)
                    .map(|l| one(router_prefix(false, l)))
                    .collect::<Result<_>>()?,
            )
        })
    }
}

/// Parses and checks the `fusion_moe` object of a config.json value.
fn read_meta(config: &serde_json::Value, path: &Path, c: &ModelConfig) -> Result<MoeMeta> {
    let bad = |reason: String| MergeError::ModelConfig {
        path: path.to_path_buf(),
        reason,
    };
    let value = config
        .get(META_KEY)
        .ok_or_else(|| bad(format!("no `{META_KEY}` object: not a routed ensemble")))?;
    let meta: MoeMeta =
        serde_json::from_value(value.clone()).map_err(|e| bad(format!("`{META_KEY}`: {e}")))?;
    if meta.format_version != 1 {
        return Err(bad(format!(
            "`{META_KEY}.format_version` {} is not supported (1)",
            meta.format_version
        )));
    }
    if meta.num_experts == 0 || meta.experts.len() != meta.num_experts {
        return Err(bad(format!(
            "`{META_KEY}`: num_experts is {} but {} expert names are listed",
            meta.num_experts,
            meta.experts.len()
        )));
    }
    let (t, d) = (meta.num_experts, c.hidden_size);
    let want = match meta.method {
        MoeMethod::WeMoe => (Some(d), t, false),
        MoeMethod::SparseWeMoe => (Some(d), t, true),
        MoeMethod::RankoneMoe => {
            let k = meta
                .rank_k
                .filter(|&k| k >= 1 && k <= d.min(c.intermediate_size))
                .ok_or_else(|| {
                    bad(format!(
                        "`{META_KEY}.rank_k` must be in 1..={}",
                        d.min(c.intermediate_size)
                    ))
                })?;
            (None, t * k, false)
        }
    };
    let r = &meta.router;
    if (r.hidden, r.outputs, r.shared) != want {
        return Err(bad(format!(
            "`{META_KEY}.router` is {:?} but `{}` with {t} experts needs hidden {:?}, outputs {}, shared {}",
            r,
            meta.method.name(),
            want.0,
            want.1,
            want.2
        )));
    }
    Ok(meta)
}

/// Loads a folder written by [`save`] onto `opts.device`.
pub fn load(dir: &Path, opts: &ModelOptions) -> Result<MoeParts> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| MergeError::io(&path, e))?;
    let mut hf_config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| MergeError::ModelConfig {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let config = ModelConfig::from_json(&text, &path)?;
    let meta = read_meta(&hf_config, &path, &config)?;
    if let Some(obj) = hf_config.as_object_mut() {
        obj.remove(META_KEY);
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    let ck = Checkpoint::open(&name, dir)?;
    let store_dtype = ck
        .entry("model.embed_tokens.weight")
        .map(|e| e.dtype)
        .ok_or_else(|| MergeError::MissingTensor {
            tensor: "model.embed_tokens.weight".into(),
            model: name.clone(),
            path: dir.to_path_buf(),
        })?;
    let compute = compute_dtype(&opts.device, opts.dtype, store_dtype);
    let rd = Reader {
        ck: &ck,
        device: &opts.device,
    };
    let mut backbone = HashMap::new();
    for n in ck.tensors().keys().filter(|n| !is_moe_tensor(n)) {
        backbone.insert(n.clone(), rd.get(n, compute)?);
    }
    let (t, d, m) = (
        meta.num_experts,
        config.hidden_size,
        config.intermediate_size,
    );
    let mut experts = Vec::with_capacity(config.num_hidden_layers);
    for l in 0..config.num_hidden_layers {
        let mut layer = Vec::with_capacity(3);
        for proj in PROJECTIONS {
            let (out, inp) = if proj == "down_proj" { (d, m) } else { (m, d) };
            let e = match meta.method {
                MoeMethod::WeMoe | MoeMethod::SparseWeMoe => {
                    let mut ws = Vec::with_capacity(t);
                    let mut bs = Vec::with_capacity(t);
                    for j in 0..t {
                        let p = expert_prefix(l, j, proj);
                        ws.push(rd.shaped(&format!("{p}.weight"), compute, &[out, inp])?);
                        if config.mlp_bias {
                            bs.push(rd.shaped(&format!("{p}.bias"), compute, &[out])?);
                        }
                    }
                    let err = |e| MergeError::in_tensor(&expert_prefix(l, 0, proj), e);
                    LinearExperts::Dense {
                        weight: Tensor::stack(&ws, 0).map_err(err)?,
                        bias: if config.mlp_bias {
                            Some(Tensor::stack(&bs, 0).map_err(err)?)
                        } else {
                            None
                        },
                    }
                }
                MoeMethod::RankoneMoe => {
                    let k = meta.rank_k.expect("checked by read_meta");
                    let mut us = Vec::with_capacity(t);
                    let mut svs = Vec::with_capacity(t);
                    for j in 0..t {
                        let p = expert_prefix(l, j, proj);
                        us.push(rd.shaped(&format!("{p}.u"), compute, &[out, k])?);
                        svs.push(rd.shaped(&format!("{p}.sv"), compute, &[k, inp])?);
                    }
                    let err = |e| MergeError::in_tensor(&expert_prefix(l, 0, proj), e);
                    LinearExperts::RankOne {
                        u: Tensor::cat(&us, 1).map_err(err)?,
                        sv: Tensor::cat(&svs, 0).map_err(err)?,
                    }
                }
            };
            layer.push(e);
        }
        experts.push(<[LinearExperts; 3]>::try_from(layer).expect("three projections"));
    }
    let routers = rd.routers(&meta, config.num_hidden_layers, d)?;
    Ok(MoeParts {
        config,
        hf_config,
        meta,
        backbone,
        experts,
        routers,
        store_dtype,
        side_files: Some(dir.to_path_buf()),
    })
}

/// The routers of a saved MoE (`router_checkpoint`), checked against the
/// MoE being built: same method, expert count and router shape. Returns them
/// with the report of their training, if recorded.
pub fn load_routers(
    ck: &Arc<Checkpoint>,
    parts: &MoeParts,
) -> Result<(Routers, Option<TrainReport>)> {
    let path = ck.dir().join("config.json");
    let value = ck.config()?.ok_or_else(|| MergeError::ModelConfig {
        path: path.clone(),
        reason:
            "missing: a router checkpoint is a folder written by `fusion merge` for a routed method"
                .into(),
    })?;
    let config = ModelConfig::from_json(&value.to_string(), &path)?;
    let meta = read_meta(&value, &path, &config)?;
    let want = &parts.meta;
    let mismatch = |what: String| MergeError::BadParameter {
        param: "router_checkpoint".into(),
        reason: format!("`{}` {what}", ck.name()),
    };
    if meta.method != want.method {
        return Err(mismatch(format!(
            "holds a `{}` ensemble, not `{}`",
            meta.method.name(),
            want.method.name()
        )));
    }
    if meta.num_experts != want.num_experts || meta.router != want.router {
        return Err(mismatch(format!(
            "has {} experts and router {:?}; this merge needs {} experts and router {:?}",
            meta.num_experts, meta.router, want.num_experts, want.router
        )));
    }
    if config.hidden_size != parts.config.hidden_size
        || config.num_hidden_layers != parts.config.num_hidden_layers
    {
        return Err(mismatch(format!(
            "is for hidden size {} and {} layers, the base has {} and {}",
            config.hidden_size,
            config.num_hidden_layers,
            parts.config.hidden_size,
            parts.config.num_hidden_layers
        )));
    }
    let device = parts
        .backbone
        .values()
        .next()
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    let rd = Reader {
        ck,
        device: &device,
    };
    let routers = rd.routers(&meta, config.num_hidden_layers, config.hidden_size)?;
    Ok((routers, meta.training))
}
