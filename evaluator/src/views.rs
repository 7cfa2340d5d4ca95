//! Per-task retrieval merges scored per task: a `tall_masks` or
//! `emr_merging` row that leaves its task out is one view per task, the
//! view of the merge's model named like the task scored on that task
//! (FusionBench scores each task's retrieved model on its own task).
//! Over a text-generation pool each view is held `masked` (its mask's bits
//! over the merge's unified vector, as the gateway serves it), which gives
//! the row's memory figures; over another pool the views are scored dense
//! and the figures are those of the first view held as its mask.

use std::sync::Arc;

use candle_core::{DType, Device};
use merger::methods::retrieval;
use merger::plan::Plan;
use merger::residency::ResidencyReport;
use merger::spec::{MergeSpec, ParamValue, Residency};
use merger::MergeError;
use runtime::checkpoint::Checkpoint;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::pool::ModelPool;
use crate::runner::{run_task, RunOptions, TaskResult};
use crate::source::{load_reported, ModelSource};
use crate::taskpool::Task;

/// What a per-task merge costs resident: one unified vector, and per task
/// its view's own bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewMemory {
    /// Bytes of the unified vector U, resident once for every task.
    pub unified_bytes: u64,
    /// Bytes of each task's view (mask bits and scales), largest.
    pub view_bytes: u64,
    /// Bytes of one task's model held dense.
    pub dense_bytes: u64,
}

/// The per-task views of `source` when it is a per-task retrieval merge
/// without a task: each task's spec, the task matched by name to one of
/// the merge's models (an error names a task with no such model). `None`
/// for every other source.
pub fn task_views(source: &ModelSource, tasks: &[Task]) -> Result<Option<Vec<MergeSpec>>> {
    let ModelSource::Merge(spec) = source else {
        return Ok(None);
    };
    if !retrieval::is_per_task(&spec.method) || retrieval::names_task(spec) {
        return Ok(None);
    }
    let models: Vec<&str> = spec.models.iter().map(|m| m.name.as_str()).collect();
    tasks
        .iter()
        .map(|t| {
            let name = &t.spec.name;
            if !models.contains(&name.as_str()) {
                return Err(EvalError::Scoring {
                    task: name.clone(),
                    reason: format!(
                        "`{}` scores each task with its own view, and no model of the merge is \
                         named `{name}` ({}); name the view with `task=NAME`",
                        spec.method,
                        models.join(", ")
                    ),
                });
            }
            Ok(spec
                .clone()
                .with_value("task", ParamValue::Text(name.clone())))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Scores every view on its task: the results in task order, the seconds
/// spent merging, and the memory figures when the views are held masked.
pub fn score_views(
    views: &[MergeSpec],
    tasks: &[Task],
    pool: &ModelPool,
    run: &RunOptions,
    device: &Device,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Vec<TaskResult>, f64, Option<ViewMemory>)> {
    let masked = runtime::architectures::of_dir(&pool.base)
        .is_ok_and(|a| a.kind == runtime::architectures::Kind::Decoder);
    let mut results = Vec::with_capacity(tasks.len());
    let mut seconds = 0.0;
    let mut memory: Option<ViewMemory> = None;
    for (spec, task) in views.iter().zip(tasks) {
        let spec = if masked {
            spec.clone().held_as(Residency::masked())
        } else {
            spec.clone()
        };
        let (loaded, report) = load_reported(&spec, pool, device)?;
        seconds += loaded.seconds;
        results.push(run_task(&loaded.model, task, run, progress)?);
        if let Some(r) = report {
            memory = Some(add(memory, &r));
        }
    }
    if memory.is_none() && !masked {
        // Views of an image or embedding pool are scored dense; what one
        // would cost held as its mask is measured on the first.
        if let Some(first) = views.first() {
            memory = Some(figures(first, pool)?);
        }
    }
    Ok((results, seconds, memory))
}

/// What the view `spec` costs held as its mask over the merge's unified
/// vector (f32, on the host), without building a model.
fn figures(spec: &MergeSpec, pool: &ModelPool) -> Result<ViewMemory> {
    let Plan::Tensorwise(t) = Plan::new(spec.clone())? else {
        return Err(EvalError::Scoring {
            task: "(views)".into(),
            reason: format!("`{}` is not a tensor-wise merge", spec.method),
        });
    };
    let open = |name: &str| -> merger::Result<Arc<Checkpoint>> {
        let dir = pool
            .resolve(name)
            .map_err(|e| MergeError::Spec(e.to_string()))?;
        Ok(Checkpoint::open(name, &dir)?)
    };
    let mut plan = t.open(&open)?;
    let unified = merger::retrieval::unified(&mut plan, DType::F32, &Device::Cpu)?;
    let view = merger::retrieval::view(&mut plan, &unified.delta)?;
    Ok(ViewMemory {
        unified_bytes: unified.report.bytes,
        view_bytes: view.report.bytes,
        dense_bytes: view.report.dense_bytes,
    })
}

/// The figures so far with one more view's report.
fn add(memory: Option<ViewMemory>, r: &ResidencyReport) -> ViewMemory {
    let unified = r.shared_bytes.unwrap_or(0);
    match memory {
        None => ViewMemory {
            unified_bytes: unified,
            view_bytes: r.bytes,
            dense_bytes: r.dense_bytes,
        },
        Some(m) => ViewMemory {
            unified_bytes: m.unified_bytes.max(unified),
            view_bytes: m.view_bytes.max(r.bytes),
            dense_bytes: m.dense_bytes.max(r.dense_bytes),
        },
    }
}
