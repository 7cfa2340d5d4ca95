//! Data-driven merges (`fisher_merging`, `regmean`, `regmean_plusplus`,
//! `adamerging`, `ada_svd`): one weight set computed by `merger::data_driven`
//! from forward passes on each expert's calibration task, served and cached
//! like any merge.
//!
//! - Validation ([`DataPlan::new`], on the request path, no tensor work):
//!   the parameters and the bounds of those that scale the work
//!   (`server.limits`: `max_calibration_samples`, `max_router_steps` for
//!   AdaMerging's `steps`, `max_batch_size`, `max_rank` for `gate_k`), the
//!   registered checkpoints, and the pool's calibration inputs (a 422 when
//!   the pool has none); then the canonical id (the spec, the checkpoints'
//!   fingerprints, a digest of the calibration inputs and their task names).
//! - Execution ([`DataPlan::build`], on a blocking thread, in a merge slot):
//!   the statistics (from the statistics cache when kept), the solve or the
//!   training, then an [`Engine`] over the merged tensors.

use std::collections::HashMap;
use std::sync::Arc;

use merger::data_driven::{DataReport, StatsCache, StatsCounters};
use merger::moe::calibration::CalibrationItem;
use merger::plan::{DataDriven, Run};
use merger::spec::MergeSpec;
use runtime::checkpoint::Checkpoint;
use runtime::model::ModelOptions;

use super::routed::{opener, Calibrations};
use super::Pool;
use crate::engine::Engine;
use crate::error::{GatewayError, Result};

/// A validated data-driven merge, ready to build.
pub struct DataPlan {
    id: String,
    plan: DataDriven,
    checkpoints: HashMap<String, Arc<Checkpoint>>,
    calibration: Arc<Vec<CalibrationItem>>,
    sources: Arc<Vec<String>>,
    stats: StatsCache,
    reference: String,
}

/// What building a data-driven merge gives.
pub struct DataBuilt {
    /// The served model.
    pub engine: Engine,
    /// What the merge did.
    pub report: DataReport,
    /// The statistics cache's counts after it.
    pub counters: Arc<StatsCounters>,
}

impl DataPlan {
    /// Validates `plan` (in `pool`, bare names, base filled) against the
    /// registered checkpoints and the pool's calibration inputs, and
    /// computes its id. No tensor is read.
    pub fn new(
        plan: DataDriven,
        pool: &Pool,
        calibrations: &Calibrations,
        stats: &StatsCache,
    ) -> Result<Self> {
        let params = plan.params().clone();
        let method = params.method.name();
        let mut checkpoints = HashMap::new();
        for name in params.base.iter().chain(&params.experts) {
            let ck = pool.checkpoint(name).ok_or_else(|| {
                GatewayError::model_not_found(format!(
                    "unknown checkpoint `{name}` in pool `{}`",
                    pool.name()
                ))
            })??;
            checkpoints.insert(name.clone(), ck);
        }
        let (calibration, sources) = if params.needs_calibration() {
            calibrations.data_inputs(pool.name(), method)?
        } else {
            (Arc::new(Vec::new()), Arc::new(Vec::new()))
        };
        if params.needs_calibration() {
            if let Some(missing) = params.experts.iter().find(|e| !sources.contains(e)) {
                return Err(GatewayError::Unprocessable(format!(
                    "`{method}` takes each expert's statistics on its own task's inputs, and the \
                     calibration task pool of pool `{}` has no task named `{missing}` (tasks: {}); \
                     add `{missing}.<kind>.jsonl` to it",
                    pool.name(),
                    sources.join(", ")
                )));
            }
        }
        let mut key = serde_json::to_string(plan.spec())
            .map_err(|e| GatewayError::Internal(format!("cannot serialise a merge spec: {e}")))?;
        let mut names: Vec<&String> = checkpoints.keys().collect();
        names.sort();
        for name in names {
            key.push_str(&format!("\n{name}={}", checkpoints[name].fingerprint()?));
        }
        let id = calibrations.id_of(key, || {
            Ok(plan.merge_id(&opener(&checkpoints), &calibration, &sources)?)
        })?;
        let reference = params
            .base
            .clone()
            .unwrap_or_else(|| params.experts[0].clone());
        Ok(DataPlan {
            id,
            plan,
            checkpoints,
            calibration,
            sources,
            stats: stats.clone(),
            reference,
        })
    }

    /// The canonical id (32 hex digits, without `merge-`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The resolved spec.
    pub fn spec(&self) -> &MergeSpec {
        self.plan.spec()
    }

    /// The method's name.
    pub fn method(&self) -> &'static str {
        self.plan.params().method.name()
    }

    /// The checkpoint whose architecture and side files the merge takes.
    pub fn reference(&self) -> &Checkpoint {
        &self.checkpoints[&self.reference]
    }

    /// The files of the checkpoints the merge reads, as resolved.
    pub fn sources(&self) -> Vec<runtime::checkpoint::Stamps> {
        self.checkpoints
            .values()
            .map(|c| c.stamps().clone())
            .collect()
    }

    /// Runs the merge on `opts.device` (statistics from the statistics
    /// cache when kept); `cancel` stops it between batches. Blocking: call
    /// it off the async runtime.
    pub fn build(self, opts: &ModelOptions, cancel: &merger::Cancel) -> merger::Result<DataBuilt> {
        let open = opener(&self.checkpoints);
        let run = Run {
            open: &open,
            calibration: &self.calibration,
            sources: &self.sources,
            stats: Some(&self.stats),
            device: &opts.device,
            progress: false,
            cancel,
        };
        let (servable, report) = self.plan.build(&run)?;
        Ok(DataBuilt {
            engine: Engine::from_servable(servable)?,
            report,
            counters: self.stats.counters().clone(),
        })
    }
}
