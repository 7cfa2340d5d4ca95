//! Data-driven merging: methods that run the experts (or the merge being
//! built) on calibration inputs and use what they see.
//!
//! | method | what it computes (one file each) |
//! |---|---|
//! | `fisher_merging` | each expert's diagonal empirical Fisher, then a Fisher-weighted mean ([`fisher`]) |
//! | `regmean` | each expert's Gram matrices of every linear layer's inputs, then the least-squares merge of each linear layer ([`regmean`]) |
//! | `regmean_plusplus` | the same, block by block, with the Grams taken on the output of the blocks merged so far ([`regmean_plusplus`]) |
//! | `adamerging` | task-wise or layer-wise coefficients of task arithmetic learned by entropy minimisation ([`adamerging`]) |
//! | `ada_svd` | each linear layer's task vectors gated by their top right singular vectors, the gates averaged over the calibration tokens and collapsed ([`ada_svd`]) |
//!
//! The result is one weight set, served and cached like any merge.
//!
//! **Calibration inputs.** Each expert's data are the inputs of its own task:
//! the calibration items whose source file is named like the expert
//! ([`crate::moe::calibration::source_names`]: `add.generate.jsonl` holds
//! task `add`), the first `num_samples` of them in file order. An expert
//! without a task of its name is a 422 ([`MergeError::NoCalibration`])
//! naming the tasks there are. Labels are never read: Fisher uses the
//! model's own predictions, AdaMerging the entropy of its predictions, and
//! RegMean and AdaSVD only the linear layers' inputs ([`network`] says what
//! a prediction is for each family).
//!
//! **Statistics.** Fisher diagonals and RegMean's Gram matrices depend only
//! on (checkpoint, calibration inputs); they go to the on-disk
//! [`stats::StatsCache`] when one is given, so a second merge over any
//! subset of the same experts runs no forward pass
//! ([`DataReport::forward_batches`] counts them).
//!
//! Every method computes in f32 on the merge's device; RegMean's Grams are
//! accumulated and solved in f64 (see [`regmean`]).

pub mod ada_svd;
pub mod adamerging;
pub mod fisher;
pub mod network;
pub mod params;
pub mod regmean;
pub mod regmean_plusplus;
pub mod stats;

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::bounds::Cancel;
use crate::error::{MergeError, Result};
use crate::merge::Opener;
use crate::moe::calibration::CalibrationItem;
use network::Family;
pub use params::{DataParams, Granularity};
use runtime::checkpoint::Checkpoint;
pub use stats::{StatKey, StatKind, StatsCache, StatsCounters};

/// The data-driven methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataMethod {
    /// Fisher-weighted averaging.
    FisherMerging,
    /// Regression mean.
    Regmean,
    /// RegMean on the merged prefix.
    RegmeanPlusPlus,
    /// Learned task-arithmetic coefficients.
    Adamerging,
    /// SVD-gated task vectors, collapsed.
    AdaSvd,
}

impl DataMethod {
    /// Every method, in documentation order.
    pub const ALL: [DataMethod; 5] = [
        DataMethod::FisherMerging,
        DataMethod::Regmean,
        DataMethod::RegmeanPlusPlus,
        DataMethod::Adamerging,
        DataMethod::AdaSvd,
    ];

    /// The method's name in specs.
    pub fn name(self) -> &'static str {
        match self {
            DataMethod::FisherMerging => "fisher_merging",
            DataMethod::Regmean => "regmean",
            DataMethod::RegmeanPlusPlus => "regmean_plusplus",
            DataMethod::Adamerging => "adamerging",
            DataMethod::AdaSvd => "ada_svd",
        }
    }

    /// The method called `name`, if it is data-driven.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether the method needs the base θ0 (the task-vector methods).
    pub fn needs_base(self) -> bool {
        matches!(self, DataMethod::Adamerging | DataMethod::AdaSvd)
    }
}

/// What a data-driven merge did, for the CLI, `GET /v1/merges` and the
/// metrics.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DataReport {
    /// Forward (and backward) passes run on calibration batches; 0 when
    /// every statistic came from the statistics cache.
    pub forward_batches: u64,
    /// Statistics found in the cache.
    pub stats_hits: u64,
    /// Statistics computed (and written to the cache, when there is one).
    pub stats_misses: u64,
    /// Seconds of forward/backward passes on calibration inputs.
    pub calibration_seconds: f64,
    /// Calibration inputs used, per expert.
    pub samples: Vec<(String, usize)>,
    /// AdaMerging: the objective before and after training, and the
    /// learned coefficients' mean per expert.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<adamerging::AdaReport>,
}

/// Everything a data-driven merge reads.
pub struct DataContext<'a> {
    /// The validated parameters.
    pub params: &'a DataParams,
    /// Opens the spec's checkpoints.
    pub open: Opener<'a>,
    /// The calibration inputs (every task's).
    pub calibration: &'a [CalibrationItem],
    /// The task name of each calibration source.
    pub sources: &'a [String],
    /// Where tensors live and the work runs.
    pub device: &'a Device,
    /// Progress bars on stderr (when it is a terminal).
    pub progress: bool,
    /// Stops the work between batches.
    pub cancel: &'a Cancel,
    /// Where Fisher diagonals and Gram matrices are kept.
    pub stats: Option<&'a StatsCache>,
}

/// One expert: its checkpoint and its calibration inputs.
pub struct Expert {
    /// The name in the spec.
    pub name: String,
    /// The checkpoint.
    pub checkpoint: std::sync::Arc<Checkpoint>,
    /// Its own task's inputs, fitted to the model.
    pub items: Vec<CalibrationItem>,
}

impl DataContext<'_> {
    /// The inputs of `expert`'s task (at most `num_samples`, in file order),
    /// or a 422 naming the tasks there are.
    pub fn items_of(&self, expert: &str, family: &Family) -> Result<Vec<CalibrationItem>> {
        let method = self.params.method.name();
        if self.calibration.is_empty() {
            return Err(MergeError::NoCalibration {
                method: method.into(),
                reason: "no calibration inputs were given: configure a calibration task pool \
                         for the pool (`pools.<name>.calibration`, or `fusion merge \
                         --calibration DIR`) holding a task named after each expert"
                    .into(),
            });
        }
        // A checkpoint named by a folder (the CLI) reads the task named
        // like the folder.
        let short = std::path::Path::new(expert)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(expert);
        let ids: Vec<u32> = self
            .sources
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_str() == expert || s.as_str() == short)
            .map(|(i, _)| i as u32)
            .collect();
        let mine: Vec<CalibrationItem> = self
            .calibration
            .iter()
            .filter(|i| ids.contains(&i.source))
            .cloned()
            .collect();
        let fitted = network::fit(&mine, family);
        if fitted.is_empty() {
            let mut tasks: Vec<&str> = self.sources.iter().map(String::as_str).collect();
            tasks.dedup();
            return Err(MergeError::NoCalibration {
                method: method.into(),
                reason: format!(
                    "expert `{expert}` has no task of its name among the calibration tasks ({}); \
                     each expert's statistics are taken on its own task's inputs",
                    if tasks.is_empty() {
                        "none".to_string()
                    } else {
                        tasks.join(", ")
                    }
                ),
            });
        }
        Ok(fitted.into_iter().take(self.params.num_samples).collect())
    }

    /// Every expert with its data.
    pub fn experts(&self, family: &Family) -> Result<Vec<Expert>> {
        self.params
            .experts
            .iter()
            .map(|name| {
                Ok(Expert {
                    name: name.clone(),
                    checkpoint: (self.open)(name)?,
                    items: if self.params.needs_calibration() {
                        self.items_of(name, family)?
                    } else {
                        Vec::new()
                    },
                })
            })
            .collect()
    }

    /// The reference checkpoint: the base when given, else the first
    /// expert (its architecture, side files and non-float buffers).
    pub fn reference(&self) -> Result<std::sync::Arc<Checkpoint>> {
        match &self.params.base {
            Some(b) => (self.open)(b),
            None => (self.open)(&self.params.experts[0]),
        }
    }
}

/// A progress bar over `len` steps (hidden unless `show` and stderr is a
/// terminal).
pub(crate) fn bar(len: u64, what: &str, show: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !show || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}/{eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Runs the data-driven merge `ctx.params` describes: the merged tensors by
/// Hugging Face name, in f32 (or `dtype`), on `ctx.device`, and what it
/// did. The reference checkpoint ([`DataContext::reference`]) gives the
/// architecture.
pub fn merge(ctx: &DataContext) -> Result<(HashMap<String, Tensor>, DataReport)> {
    let reference = ctx.reference()?;
    reference.check_mergeable()?;
    let family = Family::of(&reference)?;
    let experts = ctx.experts(&family)?;
    for e in &experts {
        e.checkpoint.check_mergeable()?;
    }
    let mut report = DataReport {
        samples: experts
            .iter()
            .map(|e| (e.name.clone(), e.items.len()))
            .collect(),
        ..DataReport::default()
    };
    let start = Instant::now();
    let mut merged = match ctx.params.method {
        DataMethod::FisherMerging => fisher::merge(ctx, &family, &experts, &mut report)?,
        DataMethod::Regmean => regmean::merge(ctx, &family, &experts, &mut report)?,
        DataMethod::RegmeanPlusPlus => {
            regmean_plusplus::merge(ctx, &family, &experts, &mut report)?
        }
        DataMethod::Adamerging => {
            adamerging::merge(ctx, &family, &reference, &experts, &mut report)?
        }
        DataMethod::AdaSvd => ada_svd::merge(ctx, &family, &reference, &experts, &mut report)?,
    };
    if report.calibration_seconds == 0.0 && report.forward_batches > 0 {
        report.calibration_seconds = start.elapsed().as_secs_f64();
    }
    // The reference's tensors the methods leave out (integer buffers) come
    // through unchanged; every tensor ends in the output dtype.
    let out_dtype = match &ctx.params.dtype {
        Some(d) => runtime::checkpoint::parse_dtype(d).unwrap_or(DType::F32),
        None => reference
            .tensors()
            .values()
            .find(|e| e.dtype.is_float())
            .map(|e| e.dtype)
            .unwrap_or(DType::F32),
    };
    for (name, entry) in reference.tensors() {
        if !merged.contains_key(name) {
            let t = reference
                .tensor(name)?
                .into_tensor()
                .and_then(|t| t.to_device(ctx.device))
                .map_err(|e| MergeError::in_tensor(name, e))?;
            let _ = entry;
            merged.insert(name.clone(), t);
        }
    }
    for (name, t) in merged.iter_mut() {
        if t.dtype().is_float() && t.dtype() != out_dtype {
            *t = t
                .to_dtype(out_dtype)
                .map_err(|e| MergeError::in_tensor(name, e))?;
        }
        let bad = t.dtype().is_float()
            && !t
                .to_dtype(DType::F32)
                .and_then(|x| x.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| MergeError::in_tensor(name, e))?
                .iter()
                .all(|x| x.is_finite());
        if bad {
            return Err(MergeError::NonFinite {
                what: format!("merged tensor `{name}`"),
                reason: format!(
                    "`{}` produced NaN or infinity (check the calibration inputs and the \
                     parameters)",
                    ctx.params.method.name()
                ),
            });
        }
    }
    Ok((merged, report))
}

/// `Σ_i w_i t_i` elementwise.
pub(crate) fn weighted_sum(ts: &[&Tensor], w: &[f64]) -> Result<Tensor> {
    let mut acc = (ts[0] * w[0])?;
    for (t, &wi) in ts.iter().zip(w).skip(1) {
        acc = (acc + (*t * wi)?)?;
    }
    Ok(acc)
}

/// The mean of the experts' value of every float tensor they all hold
/// (what the methods do with the tensors they do not compute otherwise).
pub(crate) fn mean_of(ts: &[&Tensor]) -> Result<Tensor> {
    let w = vec![1.0 / ts.len() as f64; ts.len()];
    weighted_sum(ts, &w)
}

/// Each expert's float tensors, f32 on `device`, checked to share names
/// and shapes with the first.
pub(crate) fn expert_tensors(
    experts: &[Expert],
    device: &Device,
) -> Result<Vec<HashMap<String, Tensor>>> {
    let all: Vec<HashMap<String, Tensor>> = experts
        .iter()
        .map(|e| network::float_tensors(&e.checkpoint, device))
        .collect::<Result<_>>()?;
    let labels: Vec<(&str, &std::path::Path)> = experts
        .iter()
        .map(|e| (e.name.as_str(), e.checkpoint.dir()))
        .collect();
    check_same(&all, &labels)?;
    Ok(all)
}

/// Every map holds the first's names with the first's shapes; `labels`
/// name each map's checkpoint and folder.
pub(crate) fn check_same(
    all: &[HashMap<String, Tensor>],
    labels: &[(&str, &std::path::Path)],
) -> Result<()> {
    let names: Vec<&str> = labels.iter().map(|l| l.0).collect();
    let first = &all[0];
    for (i, m) in all.iter().enumerate().skip(1) {
        for (name, t) in first {
            let Some(o) = m.get(name) else {
                return Err(MergeError::MissingTensor {
                    tensor: name.clone(),
                    model: names[i].into(),
                    path: labels[i].1.to_path_buf(),
                });
            };
            if o.dims() != t.dims() {
                return Err(MergeError::ShapeMismatch {
                    tensor: name.clone(),
                    model: names[i].into(),
                    found: o.dims().into(),
                    reference: names[0].into(),
                    expected: t.dims().into(),
                });
            }
        }
    }
    Ok(())
}

/// Batches of `items` of at most `size`, in order.
pub(crate) fn batches(items: &[CalibrationItem], size: usize) -> Vec<Vec<&CalibrationItem>> {
    items
        .chunks(size.max(1))
        .map(|c| c.iter().collect())
        .collect()
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
