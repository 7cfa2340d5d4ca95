//! Routed merges (`we_moe`, `sparse_we_moe`, `rankone_moe`): a merge whose
//! result is a routed model, built by `merger::moe::build` instead of the
//! tensor-by-tensor merge engine.
//!
//! - Validation ([`RoutedPlan::new`], on the request path, no tensor work):
//!   the method's parameters and the bounds of those that scale the work
//!   (`server.limits`: `max_router_steps`, `max_batch_size`, `max_rank`),
//!   the `router_checkpoint` (a registered checkpoint of the pool holding a
//!   saved routed ensemble, never a path) and, when the routers train, the pool's calibration
//!   inputs; then the canonical id (`merger::moe::merge_id`: the spec, the
//!   checkpoints' fingerprints and a digest of the calibration inputs).
//! - Execution ([`RoutedPlan::build`], on a blocking thread): build, train
//!   or load the routers, and wrap the model in an [`Engine`] weighed by the
//!   MoE's resident bytes.
//!
//! Calibration inputs ([`Calibrations`]) are read and tokenised once per
//! pool when the server starts: the inputs of the task pool that
//! `pools.<name>.calibration` names (default: the task pool of the same
//! name, else the only configured one). The calibration inputs do not change
//! while the server runs, so the id of a resolved spec with given checkpoint
//! fingerprints is computed once (hashing the calibration inputs) and
//! remembered.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use merger::load::FolderKind;
use merger::moe::calibration::CalibrationItem;
use merger::moe::{self, MoeParams, TrainReport};
use merger::spec::{MergeSpec, ParamValue};
use runtime::checkpoint::Checkpoint;
use runtime::model::ModelOptions;
use serde::Serialize;
use utoipa::ToSchema;

use super::{Pool, BASE_NAME};
use crate::config::Config;
use crate::engine::Engine;
use crate::error::{GatewayError, Result};
use crate::limits::Limits;

/// The parameter naming trained routers.
const ROUTER_CHECKPOINT: &str = "router_checkpoint";

/// The calibration inputs of one pool.
struct Calibration {
    /// The `taskpools` entry they come from.
    taskpool: String,
    /// Token sequences, or why they could not be read.
    inputs: std::result::Result<Arc<Vec<CalibrationItem>>, String>,
    /// The task name of each source (file) of the inputs.
    sources: Arc<Vec<String>>,
}

/// A pool's calibration inputs and the task name of each source.
pub(crate) type DataInputs = (Arc<Vec<CalibrationItem>>, Arc<Vec<String>>);

/// Most remembered merge ids; past it the memo starts over.
const MAX_IDS: usize = 10_000;

/// Calibration inputs by pool, read once at startup, and the ids of the
/// routed specs resolved so far.
#[derive(Default)]
pub struct Calibrations {
    by_pool: BTreeMap<String, Calibration>,
    /// Resolved spec (JSON) → merge id.
    ids: Mutex<HashMap<String, String>>,
}

impl Calibrations {
    /// Reads the calibration task pool of every pool, tokenised with the
    /// pool's base tokenizer. A task pool that `calibration` names and that
    /// cannot be read fails the start; a defaulted one is skipped with a
    /// warning (routed merges that train then report why).
    pub fn load(config: &Config, pools: &BTreeMap<String, Pool>) -> Result<Self> {
        let mut by_pool = BTreeMap::new();
        for (name, pool) in pools {
            let Some((taskpool, dir, explicit)) = config.calibration_of(name) else {
                continue;
            };
            let base = pool
                .dir(BASE_NAME)
                .expect("every pool has a base")
                .to_path_buf();
            let inputs = moe::calibration::from_task_pool(&dir, &base)
                .map(Arc::new)
                .map_err(|e| e.to_string());
            let sources = Arc::new(moe::calibration::source_names(&dir).unwrap_or_default());
            match &inputs {
                Ok(items) => {
                    let (texts, choices, tokens) = moe::calibration::summary(items);
                    tracing::info!(
                        pool = %name,
                        taskpool = %taskpool,
                        texts,
                        choices,
                        tokens,
                        "calibration inputs for routed merges read"
                    )
                }
                Err(e) if explicit => {
                    return Err(GatewayError::Config {
                        origin: format!("`pools.{name}.calibration`"),
                        reason: format!("task pool `{taskpool}` ({}): {e}", dir.display()),
                    })
                }
                Err(e) => tracing::warn!(
                    pool = %name,
                    taskpool = %taskpool,
                    error = %e,
                    "no calibration inputs for routed merges"
                ),
            }
            by_pool.insert(
                name.clone(),
                Calibration {
                    taskpool,
                    inputs,
                    sources,
                },
            );
        }
        Ok(Calibrations {
            by_pool,
            ids: Mutex::default(),
        })
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of a resolved spec (its JSON), computed by `compute` the first
    /// time only.
    pub(crate) fn id_of(
        &self,
        key: String,
        compute: impl FnOnce() -> Result<String>,
    ) -> Result<String> {
        if let Some(id) = self.ids().get(&key) {
            return Ok(id.clone());
        }
        let id = compute()?;
        let mut ids = self.ids();
        if ids.len() >= MAX_IDS {
            ids.clear();
        }
        ids.insert(key, id.clone());
        Ok(id)
    }

    /// The calibration inputs of `pool` (and their task pool's name) for a
    /// merge of `method` that trains `steps` steps; a 422 naming the fix
    /// when there are none.
    fn inputs(
        &self,
        pool: &str,
        method: &str,
        steps: usize,
    ) -> Result<(String, Arc<Vec<CalibrationItem>>)> {
        let alternatives = "or ask for `steps=0` (untrained routers: task arithmetic) or \
                            trained routers with `router_checkpoint=<checkpoint>`";
        match self.by_pool.get(pool) {
            None => Err(GatewayError::Unprocessable(format!(
                "`{method}` trains its routers ({steps} steps) on the inputs of a task pool, and \
                 pool `{pool}` has none: configure `taskpools` and set \
                 `pools.{pool}.calibration` to one of them, {alternatives}"
            ))),
            Some(Calibration {
                taskpool,
                inputs: Err(e),
                ..
            }) => Err(GatewayError::Unprocessable(format!(
                "`{method}` trains its routers ({steps} steps) on the inputs of task pool \
                 `{taskpool}` (pool `{pool}`), which could not be read: {e}; fix it or set \
                 `pools.{pool}.calibration`, {alternatives}"
            ))),
            Some(Calibration {
                taskpool,
                inputs: Ok(seqs),
                ..
            }) => Ok((taskpool.clone(), seqs.clone())),
        }
    }

    /// The calibration inputs of `pool` and their task names, for a
    /// data-driven merge of `method`; a 422 naming the fix when there are
    /// none.
    pub(crate) fn data_inputs(&self, pool: &str, method: &str) -> Result<DataInputs> {
        match self.by_pool.get(pool) {
            None => Err(GatewayError::Unprocessable(format!(
                "`{method}` runs the experts on calibration inputs, and pool `{pool}` has none: \
                 configure `taskpools` with a task named after each expert and set \
                 `pools.{pool}.calibration` to it"
            ))),
            Some(Calibration {
                taskpool,
                inputs: Err(e),
                ..
            }) => Err(GatewayError::Unprocessable(format!(
                "`{method}` runs the experts on the inputs of task pool `{taskpool}` (pool \
                 `{pool}`), which could not be read: {e}"
            ))),
            Some(Calibration {
                inputs: Ok(items),
                sources,
                ..
            }) => Ok((items.clone(), sources.clone())),
        }
    }
}

/// Where a routed merge's routers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RouterSource {
    /// Trained by the gateway on the pool's calibration inputs.
    Trained,
    /// Loaded from the saved ensemble `router_checkpoint` names.
    Checkpoint,
    /// Not trained (`steps=0`): the merge computes task arithmetic.
    Untrained,
}

/// The routers of a routed merge, as `GET /v1/merges` shows them.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RoutersInfo {
    /// Trained, loaded from a checkpoint, or untrained.
    pub source: RouterSource,
    /// The checkpoint the routers were loaded from.
    pub checkpoint: Option<String>,
    /// The task pool whose inputs trained them (when trained here).
    pub calibration: Option<String>,
    /// How they were trained (objective, steps, seconds, the objective's
    /// mean before and after); for a checkpoint, as recorded in it. Absent
    /// until built.
    #[schema(value_type = Option<Object>)]
    pub training: Option<TrainReport>,
}

/// A validated routed merge, ready to build.
pub struct RoutedPlan {
    id: String,
    spec: MergeSpec,
    params: MoeParams,
    checkpoints: HashMap<String, Arc<Checkpoint>>,
    calibration: Arc<Vec<CalibrationItem>>,
    routers: RoutersInfo,
    tokenizer_dir: PathBuf,
}

/// What building a routed merge gives.
pub struct Routed {
    /// The served model.
    pub engine: Engine,
    /// Bytes of its tensors as stored (backbone and experts in the stored
    /// dtype, routers in f32).
    pub output_bytes: u64,
    /// Its routers, with the training report.
    pub routers: RoutersInfo,
}

impl RoutedPlan {
    /// Validates `spec` (in `pool`, bare checkpoint names, base filled)
    /// against the limits, the registered checkpoints and the calibration
    /// inputs, and computes its id. No tensor is read.
    pub fn new(
        mut spec: MergeSpec,
        pool: &Pool,
        limits: &Limits,
        calibrations: &Calibrations,
    ) -> Result<Self> {
        let router_ck = bare_router_checkpoint(&mut spec, pool)?;
        let params = MoeParams::from_spec_bounded(&spec, &limits.bounds())?;
        let method = params.method.name();
        let mut checkpoints = HashMap::new();
        for name in std::iter::once(&params.base).chain(&params.experts) {
            let ck = pool.checkpoint(name).ok_or_else(|| {
                GatewayError::model_not_found(format!(
                    "unknown checkpoint `{name}` in pool `{}`",
                    pool.name()
                ))
            })??;
            checkpoints.insert(name.clone(), ck);
        }
        if let Some(name) = &router_ck {
            let ck = pool.checkpoint(name).ok_or_else(|| {
                GatewayError::model_not_found(format!(
                    "`{ROUTER_CHECKPOINT}` names `{name}`, which is not a checkpoint of pool `{}` \
                     ({}); register the folder `fusion merge --spec '{method}(...)' --out DIR` \
                     wrote as an expert of the pool",
                    pool.name(),
                    pool.checkpoint_names().collect::<Vec<_>>().join(", ")
                ))
            })??;
            if merger::load::folder_kind(ck.dir())? != FolderKind::Routed {
                return Err(GatewayError::bad_param(
                    "model",
                    format!(
                        "`{ROUTER_CHECKPOINT}` names `{name}`, which is not a saved routed \
                         ensemble (its config.json has no `fusion_moe`); name a folder written by \
                         `fusion merge --spec '{method}(...)'`"
                    ),
                ));
            }
            checkpoints.insert(name.clone(), ck);
        }
        let (calibration, taskpool) = if params.needs_calibration() {
            let (taskpool, inputs) = calibrations.inputs(pool.name(), method, params.steps)?;
            (inputs, Some(taskpool))
        } else {
            (Arc::new(Vec::new()), None)
        };
        let source = match (&router_ck, params.steps) {
            (Some(_), _) => RouterSource::Checkpoint,
            (None, 0) => RouterSource::Untrained,
            (None, _) => RouterSource::Trained,
        };
        // The memo key holds the checkpoints' fingerprints: a changed
        // checkpoint is another merge.
        let mut key = serde_json::to_string(&spec)
            .map_err(|e| GatewayError::Internal(format!("cannot serialise a merge spec: {e}")))?;
        let mut names: Vec<&String> = checkpoints.keys().collect();
        names.sort();
        for name in names {
            key.push_str(&format!("\n{name}={}", checkpoints[name].fingerprint()?));
        }
        let id = calibrations.id_of(key, || {
            Ok(moe::merge_id(&spec, &opener(&checkpoints), &calibration)?)
        })?;
        let tokenizer_dir = checkpoints[&params.base].dir().to_path_buf();
        Ok(RoutedPlan {
            id,
            spec,
            params,
            checkpoints,
            calibration,
            routers: RoutersInfo {
                source,
                checkpoint: router_ck,
                calibration: taskpool,
                training: None,
            },
            tokenizer_dir,
        })
    }

    /// The canonical id (32 hex digits, without `merge-`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The resolved spec.
    pub fn spec(&self) -> &MergeSpec {
        &self.spec
    }

    /// The method's name.
    pub fn method(&self) -> &'static str {
        self.params.method.name()
    }

    /// The files of the checkpoints the merge reads, as resolved.
    pub fn sources(&self) -> Vec<runtime::checkpoint::Stamps> {
        self.checkpoints
            .values()
            .map(|c| c.stamps().clone())
            .collect()
    }

    /// The routers as known before the build (no training report yet).
    pub fn routers(&self) -> &RoutersInfo {
        &self.routers
    }

    /// Builds the routed model on `opts.device`: the backbone and experts,
    /// then the routers (trained on the calibration inputs, loaded from
    /// `router_checkpoint`, or left untrained); `cancel` stops it.
    /// Blocking: call it off the async runtime.
    pub fn build(self, opts: &ModelOptions, cancel: &merger::Cancel) -> merger::Result<Routed> {
        let open = opener(&self.checkpoints);
        let built = moe::build_cancellable(
            &self.spec,
            &open,
            &self.calibration,
            &opts.device,
            false,
            cancel,
        )?;
        let counts = built.param_counts()?;
        let stored = built.parts().store_dtype.size_in_bytes() as u64;
        let output_bytes =
            (counts.backbone + counts.expert_values) as u64 * stored + counts.router as u64 * 4;
        let routers = RoutersInfo {
            training: built.meta().training.clone(),
            ..self.routers
        };
        let engine = Engine::from_moe(built, &self.tokenizer_dir)?;
        Ok(Routed {
            engine,
            output_bytes,
            routers,
        })
    }
}

/// Name → checkpoint over the checkpoints a plan holds.
pub(crate) fn opener(
    checkpoints: &HashMap<String, Arc<Checkpoint>>,
) -> impl Fn(&str) -> merger::Result<Arc<Checkpoint>> + '_ {
    move |name: &str| {
        checkpoints
            .get(name)
            .cloned()
            .ok_or_else(|| runtime::RuntimeError::MissingCheckpoint(name.into()).into())
    }
}

/// Rewrites a `router_checkpoint` written `pool/name` to the bare name (the
/// pool must be the merge's); returns the bare name.
fn bare_router_checkpoint(spec: &mut MergeSpec, pool: &Pool) -> Result<Option<String>> {
    let Some(ParamValue::Text(text)) = spec.parameters.get(ROUTER_CHECKPOINT) else {
        return Ok(None); // absent, or a wrong type that MoeParams reports
    };
    let text = text.trim().to_string();
    let bare = match text.split_once('/') {
        Some((p, n)) if p == pool.name() => n.to_string(),
        Some((p, _)) => {
            return Err(GatewayError::bad_param(
                "model",
                format!(
                    "`{ROUTER_CHECKPOINT}` names `{text}`, not a checkpoint of pool `{}`: a merge \
                     uses one pool (pool `{p}` is another)",
                    pool.name()
                ),
            ))
        }
        None => text,
    };
    if bare.is_empty() {
        return Ok(None);
    }
    spec.parameters.insert(
        ROUTER_CHECKPOINT.to_string(),
        ParamValue::Text(bare.clone()),
    );
    Ok(Some(bare))
}
