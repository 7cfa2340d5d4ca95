//! What gets evaluated, and loading it into a runnable model: a checkpoint
//! folder, a checkpoint of a pool, or a merge of a pool's checkpoints made
//! in memory (never written to disk), routed ensembles included (their
//! routers train on the pool's calibration inputs) and data-driven merges
//! (their statistics taken on each expert's own calibration task, kept in
//! the statistics cache under the cache folder).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use merger::methods::retrieval;
use merger::moe::calibration::CalibrationItem;
use merger::moe::MoeParams;
use merger::plan::{Plan, Run};
use merger::residency::ResidencyReport;
use merger::spec::{compact, MergeSpec, ParamValue};
use merger::{Cancel, MergeError};
use runtime::checkpoint::Checkpoint;
use runtime::model::ModelOptions;
use runtime::Runnable;

use crate::error::{EvalError, Result};
use crate::pool::ModelPool;

/// A model to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A checkpoint folder (config.json, safetensors, tokenizer files).
    Folder(PathBuf),
    /// A checkpoint of the pool, by name (`base` or an expert).
    Checkpoint(String),
    /// A merge of the pool's checkpoints (already completed against the pool).
    Merge(Box<MergeSpec>),
}

impl ModelSource {
    /// The folder, checkpoint name or merge spec (compact form).
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Folder(p) => p.display().to_string(),
            ModelSource::Checkpoint(n) => n.clone(),
            ModelSource::Merge(spec) => compact::to_compact(spec),
        }
    }

    /// Reads a `--merge` argument: a compact spec, or a checkpoint name of
    /// the pool. The spec is completed against the pool and validated.
    pub fn parse(text: &str, pool: &ModelPool) -> Result<ModelSource> {
        match compact::parse(text.trim())? {
            compact::Parsed::Name(name) => {
                pool.resolve(&name)?;
                Ok(ModelSource::Checkpoint(name))
            }
            compact::Parsed::Merge(spec) => {
                Ok(ModelSource::Merge(Box::new(validate(pool, *spec)?)))
            }
            compact::Parsed::MergeId(id) => Err(EvalError::Pool {
                path: pool.path.clone(),
                reason: format!(
                    "`{id}` names a merge made by a running gateway; give its spec instead"
                ),
            }),
        }
    }
}

/// Completes `spec` against the pool (base, names) and validates its method
/// and parameters, without opening any checkpoint.
///
/// A per-task retrieval merge (`tall_masks`, `emr_merging`) may leave its
/// task out: it is then one view per task, each scored on its own task
/// ([`crate::views`]); the rest of it is validated with its first model as
/// the task.
pub fn validate(pool: &ModelPool, spec: MergeSpec) -> Result<MergeSpec> {
    let spec = pool.complete(spec)?;
    if retrieval::is_per_task(&spec.method) && !retrieval::names_task(&spec) {
        if let Some(first) = spec.models.first() {
            let probe = spec
                .clone()
                .with_value("task", ParamValue::Text(first.name.clone()));
            Plan::new(probe)?;
            return Ok(spec);
        }
    }
    Ok(Plan::new(spec)?.into_spec())
}

/// Merges `spec` in memory from the pool's checkpoints: one weight set, or
/// a routed ensemble (`we_moe`, ...) whose routers train on the inputs of
/// the pool's task pool (every `*.jsonl` under it, labels never read). A
/// routed merge's `router_checkpoint` names a pool checkpoint or a folder.
fn load_merge(spec: &MergeSpec, pool: &ModelPool, device: &Device) -> Result<Runnable> {
    let plan = Plan::new(spec.clone())?;
    let routed = matches!(plan, Plan::Routed(_));
    let resolve = |name: &str| -> merger::Result<PathBuf> {
        match pool.resolve(name) {
            Ok(p) => Ok(p),
            Err(_) if routed && Path::new(name).is_dir() => Ok(PathBuf::from(name)),
            Err(e) => Err(MergeError::Spec(e.to_string())),
        }
    };
    let (calibration, sources) = match &plan {
        Plan::Routed(r) => (calibration(r.params(), pool, &resolve)?, Vec::new()),
        Plan::DataDriven(d) if d.params().needs_calibration() => {
            let p = d.params();
            let reference = resolve(p.base.as_ref().unwrap_or(&p.experts[0]))?;
            data_calibration(p.method.name(), pool, &reference)?
        }
        Plan::DataDriven(_) | Plan::Tensorwise(_) => (Vec::new(), Vec::new()),
    };
    let open = |name: &str| Ok(Checkpoint::open(name, &resolve(name)?)?);
    let cancel = Cancel::new();
    let stats = stats_cache();
    let run = Run {
        open: &open,
        calibration: &calibration,
        sources: &sources,
        stats: Some(&stats),
        device,
        progress: false,
        cancel: &cancel,
    };
    Ok(plan.build(&run)?.into_runnable()?)
}

/// [`load`] of a merge held as its spec's residency, with how it was held
/// (`None` for a dense or non tensor-wise merge).
pub fn load_reported(
    spec: &MergeSpec,
    pool: &ModelPool,
    device: &Device,
) -> Result<(Loaded, Option<ResidencyReport>)> {
    let start = Instant::now();
    let plan = Plan::new(spec.clone())?;
    let Plan::Tensorwise(t) = plan else {
        let loaded = load(
            &ModelSource::Merge(Box::new(spec.clone())),
            Some(pool),
            device,
        )?;
        return Ok((loaded, None));
    };
    let open = |name: &str| {
        Ok(Checkpoint::open(
            name,
            &pool
                .resolve(name)
                .map_err(|e| MergeError::Spec(e.to_string()))?,
        )?)
    };
    let cancel = Cancel::new();
    let run = Run {
        open: &open,
        calibration: &[],
        sources: &[],
        stats: None,
        device,
        progress: false,
        cancel: &cancel,
    };
    let (servable, report) = t.build_reported(&run)?;
    Ok((
        Loaded {
            model: servable.into_runnable()?,
            seconds: start.elapsed().as_secs_f64(),
        },
        report,
    ))
}

/// The statistics cache of the CLI: `<cache folder>/stats`
/// (`$FUSION_CACHE_DIR`, else `~/.cache/fusion`), bounded by
/// `$FUSION_STATS_MAX_BYTES` (default 2 GiB).
pub fn stats_cache() -> merger::data_driven::StatsCache {
    let max = std::env::var("FUSION_STATS_MAX_BYTES")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(2 << 30);
    merger::data_driven::StatsCache::new(runtime::cache::cache_dir().join("stats"), max)
}

/// The calibration folder of a pool: `calibration` in pool.yaml, else its
/// task pool.
pub fn calibration_dir(pool: &ModelPool) -> Option<&Path> {
    pool.calibration.as_deref().or(pool.taskpool.as_deref())
}

/// A data-driven merge's calibration inputs and their task names, tokenised
/// for the checkpoint folder `reference`.
fn data_calibration(
    method: &str,
    pool: &ModelPool,
    reference: &Path,
) -> Result<(Vec<CalibrationItem>, Vec<String>)> {
    let dir = calibration_dir(pool).ok_or_else(|| {
        EvalError::from(MergeError::NoCalibration {
            method: method.into(),
            reason: format!(
                "pool `{}` ({}) names neither `calibration` nor `taskpool`: give it a task pool \
                 with a task named after each expert",
                pool.name,
                pool.path.display()
            ),
        })
    })?;
    let sources = merger::moe::calibration::source_names(dir)?;
    let items = merger::moe::calibration::from_task_pool(dir, reference)?;
    Ok((items, sources))
}

/// The inputs a routed merge's routers train on: the pool's task pool,
/// tokenised with the base's tokenizer (none when the routers are loaded or
/// left untrained).
fn calibration(
    params: &MoeParams,
    pool: &ModelPool,
    resolve: &dyn Fn(&str) -> merger::Result<PathBuf>,
) -> Result<Vec<CalibrationItem>> {
    let base = resolve(&params.base)?;
    if !params.needs_calibration() {
        return Ok(Vec::new());
    }
    let dir = calibration_dir(pool).ok_or_else(|| EvalError::Pool {
        path: pool.path.clone(),
        reason: format!(
            "`{}` trains its routers on the task pool's inputs: the pool names no `taskpool` \
             (or set `steps: 0` or a `router_checkpoint`)",
            params.method.name()
        ),
    })?;
    Ok(merger::moe::calibration::from_task_pool(dir, &base)?)
}

/// A loaded model and what loading it cost.
pub struct Loaded {
    /// The runnable model.
    pub model: Runnable,
    /// Seconds spent reading or merging.
    pub seconds: f64,
}

/// Loads `source` on `device`; checkpoint names resolve through `pool`
/// (required for [`ModelSource::Checkpoint`] and [`ModelSource::Merge`]).
pub fn load(source: &ModelSource, pool: Option<&ModelPool>, device: &Device) -> Result<Loaded> {
    let start = Instant::now();
    let opts = ModelOptions {
        device: device.clone(),
        ..ModelOptions::default()
    };
    let need_pool = || -> Result<&ModelPool> {
        pool.ok_or_else(|| EvalError::Pool {
            path: PathBuf::from("pool.yaml"),
            reason: format!(
                "`{}` needs a pool to resolve checkpoint names (--pool)",
                source.describe()
            ),
        })
    };
    let model = match source {
        ModelSource::Folder(dir) => merger::load_runnable(dir, &opts)?,
        ModelSource::Checkpoint(name) => {
            merger::load_runnable(&need_pool()?.resolve(name)?, &opts)?
        }
        ModelSource::Merge(spec) => load_merge(spec, need_pool()?, device)?,
    };
    Ok(Loaded {
        model,
        seconds: start.elapsed().as_secs_f64(),
    })
}
