//! Building a routed ensemble from a spec: validate ([`MoeParams`]), merge
//! the backbone by task arithmetic with the merge engine, extract the MLP
//! experts from the checkpoints, initialise the routers, then load trained
//! routers or train them ([`super::train`]).

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::assemble::compute_dtype;
use super::calibration::{CalibrationInput, CalibrationItem};
use super::params::MoeParams;
use super::progress::bar_for;
use super::train::{self, TrainOptions};
use super::{
    checkpoint, rankone, sparse, LinearExperts, MoeMeta, MoeMethod, MoeModel, MoeParts, Router,
    RouterMeta, Routers, PROJECTIONS,
};
use crate::bounds::Cancel;
use crate::error::{MergeError, Result};
use crate::merge::{merge_in_memory, MergePlan, Opener, Progress};
use crate::spec::MergeSpec;
use runtime::checkpoint::Checkpoint;
use runtime::model::ModelConfig;

/// The canonical id of a routed merge (32 hex digits, no `merge-` prefix):
/// the spec's canonical form, every checkpoint's fingerprint (the router
/// checkpoint's too) and, when the routers are trained, a digest of the
/// calibration inputs.
pub fn merge_id(spec: &MergeSpec, open: Opener, calibration: &[CalibrationItem]) -> Result<String> {
    let params = MoeParams::from_spec(spec)?;
    let info = crate::methods::lookup(params.method.name())?;
    let mut fingerprints = Vec::new();
    let names = std::iter::once(&params.base)
        .chain(&params.experts)
        .chain(params.router_checkpoint.iter());
    for name in names {
        let ck = open(name)?;
        fingerprints.push((name.clone(), ck.fingerprint()?.to_string()));
    }
    if params.needs_calibration() {
        fingerprints.push(("(calibration)".into(), calibration_digest(calibration)));
    }
    Ok(info.merge_id(spec, &fingerprints))
}

/// SHA-256 of the calibration inputs: each its source, a kind tag, then its
/// token sequences (lengths and ids, little-endian).
pub(crate) fn calibration_digest(calibration: &[CalibrationItem]) -> String {
    let mut h = Sha256::new();
    let seq = |h: &mut Sha256, ids: &[u32]| {
        h.update((ids.len() as u64).to_le_bytes());
        for t in ids {
            h.update(t.to_le_bytes());
        }
    };
    for item in calibration {
        h.update(item.source.to_le_bytes());
        match &item.input {
            CalibrationInput::Text(ids) => {
                h.update([0u8]);
                seq(&mut h, ids);
            }
            CalibrationInput::Choices { context, choices } => {
                h.update([1u8]);
                h.update((choices.len() as u64).to_le_bytes());
                seq(&mut h, context);
                for c in choices {
                    seq(&mut h, c);
                }
            }
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds the routed ensemble `spec` describes on `device`: checkpoints come
/// from `open`, the routers train on `calibration` (tokenised inputs; unused
/// with `router_checkpoint` or `steps=0`). `progress` shows bars on stderr
/// when it is a terminal.
pub fn build(
    spec: &MergeSpec,
    open: Opener,
    calibration: &[CalibrationItem],
    device: &Device,
    progress: bool,
) -> Result<MoeModel> {
    build_cancellable(spec, open, calibration, device, progress, &Cancel::new())
}

/// [`build`], stopped by `cancel` (between the backbone's tensors and
/// between router training steps) with [`MergeError::Cancelled`].
pub fn build_cancellable(
    spec: &MergeSpec,
    open: Opener,
    calibration: &[CalibrationItem],
    device: &Device,
    progress: bool,
    cancel: &Cancel,
) -> Result<MoeModel> {
    let params = MoeParams::from_spec(spec)?;
    if params.needs_calibration() && calibration.iter().all(CalibrationItem::is_empty) {
        return Err(MergeError::BadParameter {
            param: "steps".into(),
            reason: format!(
                "`{}` trains its routers ({} steps) on unlabeled inputs: give calibration \
                 inputs (`fusion merge --calibration DIR`), a `router_checkpoint`, or \
                 `steps=0` to keep the untrained routers (task arithmetic)",
                params.method.name(),
                params.steps
            ),
        });
    }
    let mut parts = extract(&params, spec, open, device, progress, cancel)?;
    if let Some(name) = &params.router_checkpoint {
        let ck = open(name)?;
        let (routers, training) = checkpoint::load_routers(&ck, &parts)?;
        parts.routers = routers;
        parts.meta.training = training;
    } else if params.steps > 0 {
        let opts = TrainOptions {
            positions: params.entropy_positions,
            lr: params.lr,
            steps: params.steps,
            batch_size: params.batch_size,
            seed: params.seed,
            progress,
            cancel: cancel.clone(),
        };
        let (routers, report) = train::adapt(&parts, calibration, &opts)?;
        parts.routers = routers;
        parts.meta.training = Some(report);
    }
    MoeModel::from_parts(parts)
}

/// A per-layer seed derived from the spec's seed (splitmix64).
fn layer_seed(seed: u64, layer: usize) -> u64 {
    let mut z = seed ^ (layer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The MoE's parts with freshly initialised routers.
fn extract(
    params: &MoeParams,
    spec: &MergeSpec,
    open: Opener,
    device: &Device,
    progress: bool,
    cancel: &Cancel,
) -> Result<MoeParts> {
    let name = params.method.name();
    // The backbone: task arithmetic over every tensor (the MLPs' entries are
    // replaced by θ0's below), validated and merged by the merge engine.
    let experts: Vec<&str> = params.experts.iter().map(String::as_str).collect();
    let mut ta = MergeSpec::new("task_arithmetic", Some(&params.base), &experts)
        .with("scaling_coefficient", params.init_lambda);
    ta.dtype = params.dtype.clone();
    let mut plan = MergePlan::with_checkpoints(ta, open)?;
    plan.set_cancel(cancel.clone());
    let bar = Progress::new(plan.tensors().len(), &format!("{name} backbone"), progress);
    let (mut backbone, _) = merge_in_memory(&mut plan, device, &bar)?;

    let base = open(&params.base)?;
    let cks: Vec<_> = params
        .experts
        .iter()
        .map(|n| open(n))
        .collect::<Result<_>>()?;
    let config_path = base.dir().join("config.json");
    let hf_config = base.config()?.ok_or_else(|| MergeError::ModelConfig {
        path: config_path.clone(),
        reason: "missing: a routed ensemble needs the base's architecture".into(),
    })?;
    let config = ModelConfig::from_json(&hf_config.to_string(), &config_path)?;
    let store_dtype = backbone
        .get("model.embed_tokens.weight")
        .map(Tensor::dtype)
        .ok_or_else(|| MergeError::MissingTensor {
            tensor: "model.embed_tokens.weight".into(),
            model: params.base.clone(),
            path: base.dir().to_path_buf(),
        })?;
    let compute = compute_dtype(device, None, store_dtype);
    for (n, t) in backbone.iter_mut() {
        *t = t
            .to_dtype(compute)
            .map_err(|e| MergeError::in_tensor(n, e))?;
    }

    let (d, m, layers, t_num) = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        params.experts.len(),
    );
    let rank = params.rank_k.min(d).min(m);
    let extractor = Extractor {
        base: &base,
        experts: &cks,
        method: params.method,
        prune_ratio: params.tv_prune_ratio,
        rank,
        bias: config.mlp_bias,
        store_dtype,
        compute,
        device,
    };
    let jobs: Vec<(usize, usize)> = (0..layers)
        .flat_map(|l| (0..3).map(move |p| (l, p)))
        .collect();
    let bar = bar_for(jobs.len(), &format!("{name} experts"), progress);
    let extracted: Vec<Extracted> = jobs
        .par_iter()
        .map(|&(l, p)| {
            let r = extractor.projection(l, p);
            bar.inc(1);
            r
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    let mut experts_by_layer: Vec<Vec<LinearExperts>> = vec![Vec::with_capacity(3); layers];
    for ((l, _), e) in jobs.iter().zip(extracted) {
        for (n, t) in e.base {
            backbone.insert(n, t);
        }
        experts_by_layer[*l].push(e.experts);
    }
    let experts = experts_by_layer
        .into_iter()
        .map(|v| <[LinearExperts; 3]>::try_from(v).expect("three projections per layer"))
        .collect();

    let (routers, router_meta) = init_routers(params, d, rank, layers, device)?;
    let meta = MoeMeta {
        format_version: 1,
        method: params.method,
        num_experts: t_num,
        experts: params.experts.clone(),
        base: params.base.clone(),
        routing: params.routing,
        init_lambda: params.init_lambda,
        rank_k: (params.method == MoeMethod::RankoneMoe).then_some(rank),
        tv_prune_ratio: (params.method == MoeMethod::SparseWeMoe).then_some(params.tv_prune_ratio),
        router: router_meta,
        training: None,
        spec: serde_json::to_value(spec).ok(),
    };
    Ok(MoeParts {
        config,
        hf_config,
        meta,
        backbone,
        experts,
        routers,
        store_dtype,
        side_files: Some(base.dir().to_path_buf()),
    })
}

/// Freshly initialised routers for `params`'s method.
pub(crate) fn init_routers(
    params: &MoeParams,
    d: usize,
    rank: usize,
    layers: usize,
    device: &Device,
) -> Result<(Routers, RouterMeta)> {
    let t = params.experts.len();
    let lambda = params.init_lambda;
    Ok(match params.method {
        MoeMethod::WeMoe => (
            Routers::PerLayer(
                (0..layers)
                    .map(|l| {
                        Router::init(d, Some(d), t, lambda, layer_seed(params.seed, l), device)
                    })
                    .collect::<Result<_>>()?,
            ),
            RouterMeta {
                hidden: Some(d),
                outputs: t,
                shared: false,
            },
        ),
        MoeMethod::SparseWeMoe => (
            Routers::Shared(Router::init(
                d,
                Some(d),
                t,
                lambda,
                layer_seed(params.seed, 0),
                device,
            )?),
            RouterMeta {
                hidden: Some(d),
                outputs: t,
                shared: true,
            },
        ),
        MoeMethod::RankoneMoe => (
            Routers::PerLayer(
                (0..layers)
                    .map(|l| {
                        Router::init(
                            d,
                            None,
                            t * rank,
                            lambda,
                            layer_seed(params.seed, l),
                            device,
                        )
                    })
                    .collect::<Result<_>>()?,
            ),
            RouterMeta {
                hidden: None,
                outputs: t * rank,
                shared: false,
            },
        ),
    })
}

struct Extractor<'a> {
    base: &'a Checkpoint,
    experts: &'a [std::sync::Arc<Checkpoint>],
    method: MoeMethod,
    prune_ratio: f64,
    rank: usize,
    bias: bool,
    store_dtype: DType,
    compute: DType,
    device: &'a Device,
}

/// θ0's values, the task vectors τi and the tensor's shape.
type TaskVectors = (Vec<f32>, Vec<Vec<f32>>, Vec<usize>);

struct Extracted {
    /// θ0's tensors of the projection, for the backbone.
    base: Vec<(String, Tensor)>,
    experts: LinearExperts,
}

impl Extractor<'_> {
    /// Values rounded to the stored dtype (so a saved and reloaded MoE is
    /// bit-identical), as a compute-dtype tensor on the device.
    fn tensor(&self, name: &str, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        let err = |e| MergeError::in_tensor(name, e);
        Tensor::from_vec(data, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(self.store_dtype))
            .and_then(|t| t.to_device(self.device))
            .and_then(|t| t.to_dtype(self.compute))
            .map_err(err)
    }

    /// θ0's values and the task vectors τi of one tensor.
    fn task_vectors(&self, name: &str) -> Result<TaskVectors> {
        let b = self.base.tensor(name)?;
        let shape = b.shape.clone();
        let base = b.into_f32_vec();
        let taus = self
            .experts
            .iter()
            .map(|e| {
                let v = e.tensor(name)?.into_f32_vec();
                Ok(v.iter().zip(&base).map(|(x, y)| x - y).collect())
            })
            .collect::<Result<Vec<Vec<f32>>>>()?;
        Ok((base, taus, shape))
    }

    /// θ0's tensors and the experts of projection `p` of block `layer`.
    fn projection(&self, layer: usize, p: usize) -> Result<Extracted> {
        let prefix = format!("model.layers.{layer}.mlp.{}", PROJECTIONS[p]);
        let wname = format!("{prefix}.weight");
        let (w0, mut taus, shape) = self.task_vectors(&wname)?;
        let [rows, cols] = shape[..] else {
            return Err(MergeError::ShapeMismatch {
                tensor: wname,
                model: self.base.name().to_string(),
                found: shape.into(),
                reference: "a linear layer".into(),
                expected: vec![0, 0].into(),
            });
        };
        let t = taus.len();
        let mut base = vec![(wname.clone(), self.tensor(&wname, w0, &shape)?)];
        if self.method == MoeMethod::RankoneMoe {
            let k = self.rank;
            let mut u = vec![0f32; rows * t * k];
            let mut sv = Vec::with_capacity(t * k * cols);
            for (i, tau) in taus.iter().enumerate() {
                let (ui, svi) = rankone::factors(tau, rows, cols, k).map_err(|e| match e {
                    MergeError::Candle(c) => MergeError::in_tensor(&wname, c),
                    e => e,
                })?;
                for r in 0..rows {
                    u[r * t * k + i * k..r * t * k + (i + 1) * k]
                        .copy_from_slice(&ui[r * k..(r + 1) * k]);
                }
                sv.extend_from_slice(&svi);
            }
            // MLP biases stay task arithmetic (the backbone's merged values).
            return Ok(Extracted {
                base,
                experts: LinearExperts::RankOne {
                    u: self.tensor(&format!("{prefix}.u"), u, &[rows, t * k])?,
                    sv: self.tensor(&format!("{prefix}.sv"), sv, &[t * k, cols])?,
                },
            });
        }
        if self.method == MoeMethod::SparseWeMoe {
            for tau in taus.iter_mut() {
                sparse::prune(tau, self.prune_ratio);
            }
        }
        let weight = self.tensor(&wname, taus.concat(), &[t, rows, cols])?;
        let bias = if self.bias {
            let bname = format!("{prefix}.bias");
            let (b0, mut btaus, bshape) = self.task_vectors(&bname)?;
            if self.method == MoeMethod::SparseWeMoe {
                for tau in btaus.iter_mut() {
                    sparse::prune(tau, self.prune_ratio);
                }
            }
            base.push((bname.clone(), self.tensor(&bname, b0, &bshape)?));
            Some(self.tensor(&bname, btaus.concat(), &[t, bshape[0]])?)
        } else {
            None
        };
        Ok(Extracted {
            base,
            experts: LinearExperts::Dense { weight, bias },
        })
    }
}
