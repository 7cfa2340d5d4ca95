//! One plan for every merge. A spec resolves to a [`Plan`] that says which
//! kind of merge it is:
//! - [`Plan::Tensorwise`]: one weight set, merged tensor by tensor by the
//!   merge engine ([`crate::merge`]) with a method of [`crate::methods`];
//! - [`Plan::Routed`]: a routed ensemble, the experts' MLP task vectors
//!   behind routers over a task-arithmetic backbone, built by [`crate::moe`];
//! - [`Plan::DataDriven`]: one weight set computed from forward passes on
//!   calibration inputs (Fisher, RegMean, RegMean++, AdaMerging, AdaSVD),
//!   built by [`crate::data_driven`].
//!
//! Validation is apart from execution: [`Plan::new`] checks the method, the
//! number of models, the base and every parameter (those that scale the
//! work against [`Bounds`]) without opening a checkpoint. Either kind then
//! builds a servable model in memory ([`Plan::build`]) or writes a folder
//! that [`crate::load_model`] loads back ([`Plan::write`]).
//!
//! The registry ([`crate::methods::REGISTRY`]) lists both kinds; the kind of
//! a method is its entry's [`MethodKind`], read here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use runtime::checkpoint::WriteOptions;
use runtime::model::ModelOptions;

use crate::bounds::{Bounds, Cancel};
use crate::data_driven::{self, DataContext, DataParams, DataReport, StatsCache};
use crate::error::{MergeError, Result};
use crate::load::Servable;
use crate::merge::{
    merge_in_memory, write_to_dir, MergeOptions, MergePlan, MergeReport, Opener, Progress,
};
use crate::methods::{self, MergeMethod, MethodInfo, MethodKind};
use crate::moe::calibration::CalibrationItem;
use crate::moe::{self, MoeMeta, MoeParams, ParamCounts};
use crate::residency::ResidencyReport;
use crate::spec::MergeSpec;

/// A validated merge of either kind, ready to build.
pub enum Plan {
    /// One weight set, merged tensor by tensor.
    Tensorwise(Tensorwise),
    /// A routed ensemble.
    Routed(Routed),
    /// A data-driven merge.
    DataDriven(DataDriven),
}

/// A validated data-driven merge: its registry entry and parameters.
pub struct DataDriven {
    spec: MergeSpec,
    info: &'static MethodInfo,
    params: DataParams,
}

/// A validated tensor-wise merge: the method's registry entry and the
/// method built from the spec's parameters.
pub struct Tensorwise {
    spec: MergeSpec,
    info: &'static MethodInfo,
    method: Box<dyn MergeMethod>,
}

/// A validated routed ensemble: its registry entry and parameters.
pub struct Routed {
    spec: MergeSpec,
    info: &'static MethodInfo,
    params: MoeParams,
}

/// How a plan runs: where its checkpoints and calibration inputs come
/// from, where it runs, its progress bars and its cancellation.
pub struct Run<'a> {
    /// Opens a checkpoint of the spec by name.
    pub open: Opener<'a>,
    /// Tokenised calibration inputs: what the routers of a routed merge
    /// train on and what a data-driven merge runs; unused by tensor-wise
    /// merges and by routers loaded or left untrained.
    pub calibration: &'a [CalibrationItem],
    /// The task name of each calibration source
    /// ([`crate::moe::calibration::source_names`]): a data-driven merge
    /// reads each expert's own task.
    pub sources: &'a [String],
    /// Where Fisher diagonals and Gram matrices are kept between merges
    /// (None: computed every time).
    pub stats: Option<&'a StatsCache>,
    /// Where the merge runs and the built model lives.
    pub device: &'a Device,
    /// Show progress bars on stderr (only when it is a terminal).
    pub progress: bool,
    /// Stops the work with [`crate::MergeError::Cancelled`].
    pub cancel: &'a Cancel,
}

/// What [`Plan::write`] wrote.
pub enum Written {
    /// A merged checkpoint folder.
    Tensorwise(MergeReport),
    /// A saved routed ensemble.
    Routed(Box<RoutedReport>),
    /// A data-driven merge's checkpoint folder.
    DataDriven(Box<DataWritten>),
}

/// A data-driven merge written by [`Plan::write`].
#[derive(Debug, Clone)]
pub struct DataWritten {
    /// The canonical merge id (without the `merge-` prefix).
    pub id: String,
    /// The output folder.
    pub out: PathBuf,
    /// Seconds of the merge (statistics, training, solving; writing not
    /// included).
    pub seconds: f64,
    /// What it did.
    pub report: DataReport,
}

/// A routed ensemble saved by [`Plan::write`].
#[derive(Debug, Clone)]
pub struct RoutedReport {
    /// The canonical merge id (without the `merge-` prefix).
    pub id: String,
    /// The output folder.
    pub out: PathBuf,
    /// Seconds spent building it (backbone, experts and routers; saving
    /// not included).
    pub seconds: f64,
    /// Its parameter counts by part.
    pub counts: ParamCounts,
    /// What it is and how its routers were trained.
    pub meta: MoeMeta,
    /// Bytes of its tensors in memory.
    pub resident_bytes: u64,
}

impl Plan {
    /// Validates `spec`, its work parameters against the default [`Bounds`].
    pub fn new(spec: MergeSpec) -> Result<Plan> {
        Self::with_bounds(spec, &Bounds::default())
    }

    /// Validates `spec`: the method, the model count, the base and every
    /// parameter, those that scale the work (and every list of the spec)
    /// against `bounds`. No checkpoint is opened.
    pub fn with_bounds(mut spec: MergeSpec, bounds: &Bounds) -> Result<Plan> {
        spec.fold_task()?;
        let kind = methods::lookup(&spec.method).map(|info| &info.kind);
        if spec.is_delta() && matches!(kind, Ok(k) if !matches!(k, MethodKind::Tensorwise(_))) {
            return Err(MergeError::Unsupported {
                feature: format!("a `residency` form other than dense for `{}`", spec.method),
                hint: "lowrank and sparse deltas hold tensor-by-tensor merges; routed and \
                       data-driven merges are held dense (drop `form`)"
                    .into(),
            });
        }
        let routed = methods::lookup(&spec.method)
            .ok()
            .filter(|info| matches!(info.kind, MethodKind::Routed));
        if let Some(info) = routed {
            let params = MoeParams::from_spec_bounded(&spec, bounds)?;
            return Ok(Plan::Routed(Routed { spec, info, params }));
        }
        let data = methods::lookup(&spec.method)
            .ok()
            .filter(|info| matches!(info.kind, MethodKind::DataDriven));
        if let Some(info) = data {
            let params = DataParams::from_spec_bounded(&spec, bounds)?;
            return Ok(Plan::DataDriven(DataDriven { spec, info, params }));
        }
        let (info, method) = methods::build_bounded(&spec, bounds)?;
        Ok(Plan::Tensorwise(Tensorwise { spec, info, method }))
    }

    /// The validated spec.
    pub fn spec(&self) -> &MergeSpec {
        match self {
            Plan::Tensorwise(t) => &t.spec,
            Plan::Routed(r) => &r.spec,
            Plan::DataDriven(d) => &d.spec,
        }
    }

    /// The method's registry entry.
    pub fn info(&self) -> &'static MethodInfo {
        match self {
            Plan::Tensorwise(t) => t.info,
            Plan::Routed(r) => r.info,
            Plan::DataDriven(d) => d.info,
        }
    }

    /// The validated spec, the plan dropped.
    pub fn into_spec(self) -> MergeSpec {
        match self {
            Plan::Tensorwise(t) => t.spec,
            Plan::Routed(r) => r.spec,
            Plan::DataDriven(d) => d.spec,
        }
    }

    /// Builds the model in memory, ready to serve: the merged weights, or
    /// the routed ensemble (its routers trained on `run.calibration`, loaded
    /// from `router_checkpoint`, or left untrained).
    pub fn build(self, run: &Run) -> Result<Servable> {
        match self {
            Plan::Tensorwise(t) => t.build(run),
            Plan::Routed(r) => r.build(run),
            Plan::DataDriven(d) => Ok(d.build(run)?.0),
        }
    }

    /// Writes the model to the folder `out` (what `fusion merge` does): a
    /// checkpoint with the reference's config and tokenizer files and a
    /// `fusion_merge.json` provenance, or a saved routed ensemble.
    pub fn write(self, run: &Run, out: &Path, write: &WriteOptions) -> Result<Written> {
        Ok(match self {
            Plan::Tensorwise(t) => Written::Tensorwise(t.write(run, out, write)?),
            Plan::Routed(r) => Written::Routed(Box::new(r.write(run, out, write)?)),
            Plan::DataDriven(d) => Written::DataDriven(Box::new(d.write(run, out, write)?)),
        })
    }
}

impl Tensorwise {
    /// The spec, the plan dropped.
    pub fn into_spec(self) -> MergeSpec {
        self.spec
    }

    /// Whether the method is a per-task retrieval merge (`tall_masks`,
    /// `emr_merging`), whose task views can be held `masked`.
    pub fn is_retrieval(&self) -> bool {
        self.method.retrieval().is_some()
    }

    /// The validated spec.
    pub fn spec(&self) -> &MergeSpec {
        &self.spec
    }

    /// The method's registry entry.
    pub fn info(&self) -> &'static MethodInfo {
        self.info
    }

    /// Opens the spec's checkpoints through `open` and checks that every
    /// input holds every tensor with one shape: the merge, ready to run.
    pub fn open(self, open: Opener) -> Result<MergePlan> {
        MergePlan::from_method(self.spec, self.info, self.method, open)
    }

    /// [`Tensorwise::open`] with the output tokenizer of `tokenizer`
    /// (mergekit's `tokenizer_source`, `tokenizer:` and `chat_template`):
    /// the embedding rows are rebuilt over its vocabulary.
    pub fn open_with_tokenizer(
        self,
        open: Opener,
        tokenizer: &crate::tokenizer::TokenizerSpec,
    ) -> Result<MergePlan> {
        MergePlan::selected(
            self.spec,
            self.info,
            self.method,
            open,
            None,
            Some((tokenizer, None)),
        )
    }

    /// [`Plan::build`] of a tensor-wise merge: the merged tensors in their
    /// output dtypes on `run.device`, with the reference's architecture and
    /// tokenizer.
    pub fn build(self, run: &Run) -> Result<Servable> {
        Ok(self.build_reported(run)?.0)
    }

    /// [`Tensorwise::build`] that also returns how a merge held as a delta
    /// was compressed (`None` for a dense one).
    pub fn build_reported(self, run: &Run) -> Result<(Servable, Option<ResidencyReport>)> {
        let mut plan = self.open(run.open)?;
        plan.set_cancel(run.cancel.clone());
        let opts = ModelOptions {
            device: run.device.clone(),
            ..ModelOptions::default()
        };
        let residency = plan.spec().residency.clone().filter(|r| r.is_delta());
        if let Some(r) = residency.as_ref().filter(|r| r.is_combination()) {
            // Nothing to merge: the task vectors and the coefficients.
            let (servable, report) = held_as_combination(&plan, r, &opts, run.cancel)?;
            return Ok((servable, Some(report)));
        }
        if residency.as_ref().is_some_and(|r| r.is_masked()) {
            // The unified vector, then this task's mask over it.
            let (servable, report) = held_as_masked(&mut plan, &opts)?;
            return Ok((servable, Some(report)));
        }
        let progress = Progress::new(plan.tensors().len(), plan.info().name, run.progress);
        let (tensors, _) = merge_in_memory(&mut plan, run.device, &progress)?;
        match residency {
            Some(residency) => {
                let (servable, report) =
                    held_as_delta(tensors, plan.reference(), &residency, &opts, run.cancel)?;
                Ok((servable, Some(report)))
            }
            None => Ok((
                crate::load::from_tensors(tensors, plan.reference(), &opts)?,
                None,
            )),
        }
    }

    /// [`Plan::write`] of a tensor-wise merge.
    pub fn write(self, run: &Run, out: &Path, write: &WriteOptions) -> Result<MergeReport> {
        let mut plan = self.open(run.open)?;
        plan.set_cancel(run.cancel.clone());
        let opts = MergeOptions {
            write: write.clone(),
            progress: run.progress,
        };
        write_to_dir(&mut plan, out, run.device, &opts)
    }
}

impl Routed {
    /// The validated spec.
    pub fn spec(&self) -> &MergeSpec {
        &self.spec
    }

    /// The validated parameters.
    pub fn params(&self) -> &MoeParams {
        &self.params
    }

    /// The spec, the plan dropped.
    pub fn into_spec(self) -> MergeSpec {
        self.spec
    }

    /// [`Plan::build`] of a routed ensemble, weighed by its resident bytes
    /// (backbone, experts and routers); the tokenizer is the base's.
    pub fn build(self, run: &Run) -> Result<Servable> {
        let built = moe::build_cancellable(
            &self.spec,
            run.open,
            run.calibration,
            run.device,
            run.progress,
            run.cancel,
        )?;
        Servable::routed(built)
    }

    /// [`Plan::write`] of a routed ensemble: its id (the spec, the
    /// checkpoints' fingerprints and, when the routers train, a digest of
    /// the calibration inputs), then the build and the saved folder.
    pub fn write(self, run: &Run, out: &Path, write: &WriteOptions) -> Result<RoutedReport> {
        let id = moe::merge_id(&self.spec, run.open, run.calibration)?;
        let start = Instant::now();
        let built = moe::build_cancellable(
            &self.spec,
            run.open,
            run.calibration,
            run.device,
            run.progress,
            run.cancel,
        )?;
        let seconds = start.elapsed().as_secs_f64();
        let out = built.save(out, write)?;
        Ok(RoutedReport {
            id,
            out,
            seconds,
            counts: built.param_counts()?,
            meta: built.meta().clone(),
            resident_bytes: built.bytes(),
        })
    }
}

impl DataDriven {
    /// The validated spec.
    pub fn spec(&self) -> &MergeSpec {
        &self.spec
    }

    /// The validated parameters.
    pub fn params(&self) -> &DataParams {
        &self.params
    }

    /// The spec, the plan dropped.
    pub fn into_spec(self) -> MergeSpec {
        self.spec
    }

    /// The canonical id: the spec, every checkpoint's fingerprint and, when
    /// the merge reads calibration inputs, a digest of them and of their
    /// task names.
    pub fn merge_id(
        &self,
        open: Opener,
        calibration: &[CalibrationItem],
        sources: &[String],
    ) -> Result<String> {
        let mut fingerprints = Vec::new();
        for name in self.params.base.iter().chain(&self.params.experts) {
            fingerprints.push((name.clone(), open(name)?.fingerprint()?.to_string()));
        }
        if self.params.needs_calibration() {
            let digest = crate::moe::build::calibration_digest(calibration);
            fingerprints.push((
                "(calibration)".into(),
                format!("{digest}:{}", sources.join(",")),
            ));
        }
        Ok(self.info.merge_id(&self.spec, &fingerprints))
    }

    fn context<'a>(&'a self, run: &'a Run) -> DataContext<'a> {
        DataContext {
            params: &self.params,
            open: run.open,
            calibration: run.calibration,
            sources: run.sources,
            device: run.device,
            progress: run.progress,
            cancel: run.cancel,
            stats: run.stats,
        }
    }

    /// [`Plan::build`] of a data-driven merge: the merged tensors with the
    /// reference's architecture and side files, and what the merge did.
    pub fn build(self, run: &Run) -> Result<(Servable, DataReport)> {
        let ctx = self.context(run);
        let (tensors, report) = data_driven::merge(&ctx)?;
        let reference = ctx.reference()?;
        let opts = ModelOptions {
            device: run.device.clone(),
            ..ModelOptions::default()
        };
        Ok((
            crate::load::from_tensors(tensors, &reference, &opts)?,
            report,
        ))
    }

    /// [`Plan::write`] of a data-driven merge: a checkpoint folder with the
    /// reference's config and tokenizer files and a `fusion_merge.json`
    /// holding the spec and what the merge did.
    pub fn write(self, run: &Run, out: &Path, write: &WriteOptions) -> Result<DataWritten> {
        let id = self.merge_id(run.open, run.calibration, run.sources)?;
        let start = Instant::now();
        let ctx = self.context(run);
        let (tensors, report) = data_driven::merge(&ctx)?;
        let seconds = start.elapsed().as_secs_f64();
        let reference = ctx.reference()?;
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let layout: Vec<_> = names
            .iter()
            .map(|n| {
                let t = &tensors[*n];
                ((*n).clone(), t.dtype(), t.dims().to_vec())
            })
            .collect();
        let writer = runtime::checkpoint::CheckpointWriter::create(out, &layout, write)?;
        for n in names {
            let t = &tensors[n];
            if t.dtype().is_float() {
                let v = t
                    .to_dtype(candle_core::DType::F32)
                    .and_then(|x| x.flatten_all()?.to_vec1::<f32>())
                    .map_err(|e| crate::MergeError::in_tensor(n, e))?;
                writer.write_f32(n, &v)?;
            } else {
                writer.write_raw(n, reference.tensor(n)?.bytes())?;
            }
        }
        writer.copy_side_files(reference.dir())?;
        let provenance = serde_json::json!({
            "merge_id": format!("merge-{id}"),
            "spec": &self.spec,
            "method_convention": self.info.convention,
            "data_driven": &report,
        });
        writer.write_file(
            "fusion_merge.json",
            &serde_json::to_vec_pretty(&provenance).expect("json"),
        )?;
        let out = writer.finish()?;
        Ok(DataWritten {
            id,
            out,
            seconds,
            report,
        })
    }
}

/// A merge held as its delta over `reference` (the merge's base, or its
/// first model): the reference loaded as the base model, the delta
/// compressed in the form `residency` asks for, the model sharing the
/// base's weights.
fn held_as_delta(
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
    reference: &runtime::checkpoint::Checkpoint,
    residency: &crate::spec::Residency,
    opts: &ModelOptions,
    cancel: &Cancel,
) -> Result<(Servable, ResidencyReport)> {
    let base = crate::load::load_checkpoint(reference, opts)?;
    let (model, base_bytes, side_files) = decoder_of(&base)?;
    let compressed = crate::residency::compress(
        &tensors,
        reference,
        residency,
        model.dtype(),
        &opts.device,
        cancel,
    )?;
    drop(tensors);
    let held = runtime::model::Model::with_delta(model, std::sync::Arc::new(compressed.delta))?;
    Ok((
        Servable::held(held, base_bytes, side_files),
        compressed.report,
    ))
}

/// The text model of a loaded base a delta is held over, its bytes and
/// side files; an embedding model is refused.
fn decoder_of(base: &Servable) -> Result<(&runtime::model::Model, u64, PathBuf)> {
    let model = base.decoder().ok_or_else(|| MergeError::Unsupported {
        feature: "a merge held as a delta over an embedding model".into(),
        hint: "lowrank, sparse and combination forms serve text-generation models; drop `form`"
            .into(),
    })?;
    Ok((model, base.resident_bytes, base.side_files.clone()))
}

/// A task view of a per-task retrieval merge held as its mask over the
/// merge's unified vector, both over the reference
/// ([`crate::retrieval`]); the report's `shared_bytes` are U's.
fn held_as_masked(
    plan: &mut MergePlan,
    opts: &ModelOptions,
) -> Result<(Servable, ResidencyReport)> {
    let base = crate::load::load_checkpoint(plan.reference(), opts)?;
    let (model, base_bytes, side_files) = decoder_of(&base)?;
    let unified = crate::retrieval::unified(plan, model.dtype(), &opts.device)?;
    let view = crate::retrieval::view(plan, &unified.delta)?;
    let held = runtime::model::Model::with_delta(model, std::sync::Arc::new(view.delta))?;
    Ok((Servable::held(held, base_bytes, side_files), view.report))
}

/// A merge that is `Σ_k c_k θ_k` (Σ c_k = 1) held as `Σ_k c_k τ̂_k` over
/// its reference: each checkpoint's task vector τ_k = θ_k − θ_ref
/// compressed as the residency's `vectors` (the reference's own is zero
/// and left out), the coefficients the merge's.
fn held_as_combination(
    plan: &MergePlan,
    residency: &crate::spec::Residency,
    opts: &ModelOptions,
    cancel: &Cancel,
) -> Result<(Servable, ResidencyReport)> {
    let reference = plan.reference();
    let coefficients = plan.combination().ok_or_else(|| MergeError::Unsupported {
        feature: format!("form `combination` for `{}`", plan.info().name),
        hint: "hold the merge as `lowrank` or `sparse`".into(),
    })?;
    let base = crate::load::load_checkpoint(reference, opts)?;
    let (model, base_bytes, side_files) = decoder_of(&base)?;
    let mut vectors = Vec::new();
    for (ck, c) in coefficients {
        if ck.dir() == reference.dir() || c == 0.0 {
            continue;
        }
        let tv = crate::residency::task_vector(
            &ck,
            reference,
            residency,
            model.dtype(),
            &opts.device,
            cancel,
        )?;
        vectors.push((c, std::sync::Arc::new(tv.delta), tv.report));
    }
    let compressed =
        crate::residency::combination(vectors.iter().map(|(c, d, r)| (*c, d.clone(), r)).collect());
    let held = runtime::model::Model::with_delta(model, std::sync::Arc::new(compressed.delta))?;
    Ok((
        Servable::held(held, base_bytes, side_files),
        compressed.report,
    ))
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::error::MergeError;
    use crate::methods::REGISTRY;
    use crate::moe::testutil::{logits, max_diff, pool, random_ids};
    use crate::moe::MoeMethod;

    #[test]
    fn the_routed_registry_entries_are_the_moe_methods() {
        let routed: Vec<&str> = REGISTRY
            .iter()
            .filter(|m| matches!(m.kind, MethodKind::Routed))
            .map(|m| m.name)
            .collect();
        assert_eq!(routed, MoeMethod::ALL.map(MoeMethod::name));
        for m in MoeMethod::ALL {
            let info = methods::lookup(m.name()).unwrap();
            assert!(info.needs_base() && info.order_matters && info.random);
        }
    }

    #[test]
    fn a_spec_resolves_to_its_kind() {
        let ta = MergeSpec::new("task_arithmetic", Some("base"), &["e1", "e2"]);
        let plan = Plan::new(ta).unwrap();
        assert!(matches!(plan, Plan::Tensorwise(_)));
        assert_eq!(plan.info().name, "task_arithmetic");
        let moe = MergeSpec::new("we_moe", Some("base"), &["e1", "e2"]).with("steps", 0.0);
        let plan = Plan::new(moe.clone()).unwrap();
        assert!(matches!(&plan, Plan::Routed(r) if !r.params().needs_calibration()));
        assert_eq!(plan.info().name, "we_moe");
        assert_eq!(plan.into_spec(), moe);
        // Each kind validates its own parameters and names the bad one.
        let bad =
            MergeSpec::new("sparse_we_moe", Some("base"), &["e1"]).with("tv_prune_ratio", 2.0);
        let err = Plan::new(bad).err().expect("out of range");
        assert!(err.to_string().contains("tv_prune_ratio"), "{err}");
        let bad = MergeSpec::new("ties_merging", Some("base"), &["e1"]).with("density", 2.0);
        let err = Plan::new(bad).err().expect("out of range");
        assert!(err.to_string().contains("density"), "{err}");
        let err = Plan::new(MergeSpec::new("nope", None, &["e1"])).err();
        assert!(
            matches!(err, Some(MergeError::UnknownMethod { .. })),
            "{err:?}"
        );
        // A routed method never builds as a tensor-by-tensor merge.
        let err = methods::build(&MergeSpec::new("we_moe", Some("base"), &["e1"])).err();
        assert!(matches!(err, Some(MergeError::Unsupported { .. })));
    }

    /// A run on the CPU opening checkpoints with `open`, no calibration.
    fn cpu_run<'a>(open: Opener<'a>, cancel: &'a Cancel) -> Run<'a> {
        Run {
            open,
            calibration: &[],
            sources: &[],
            stats: None,
            device: &Device::Cpu,
            progress: false,
            cancel,
        }
    }

    #[test]
    fn a_model_built_in_memory_equals_the_one_written_and_loaded() {
        let p = pool(2, false, 0.05, DType::F32);
        let open = |name: &str| p.open(name);
        let cancel = Cancel::new();
        let run = cpu_run(&open, &cancel);
        let ids = random_ids(2, 6, 48, 3);
        for spec in [
            p.spec("ties_merging"),
            p.spec("we_moe").with("steps", 0.0),
            p.spec("adamerging").with("steps", 0.0),
        ] {
            let method = spec.method.clone();
            let built = Plan::new(spec.clone()).unwrap().build(&run).unwrap();
            assert_eq!(built.side_files, p.path("base"));
            let out = p.path(&format!("{method}-out"));
            let written = Plan::new(spec)
                .unwrap()
                .write(&run, &out, &WriteOptions::default())
                .unwrap();
            let dir = match written {
                Written::Tensorwise(report) => {
                    // Every weight in f32: the parameters times 4 bytes.
                    let params = built.decoder().unwrap().config().num_parameters() as u64;
                    assert_eq!(built.resident_bytes, 4 * params);
                    assert_eq!(report.stats.output_bytes, built.resident_bytes);
                    report.out
                }
                Written::Routed(report) => {
                    assert_eq!(report.meta.method.name(), method);
                    assert_eq!(report.resident_bytes, built.resident_bytes);
                    report.out
                }
                Written::DataDriven(report) => {
                    assert_eq!(report.report.forward_batches, 0);
                    report.out
                }
            };
            let loaded = crate::load_model(&dir, &runtime::model::ModelOptions::default()).unwrap();
            let d = max_diff(
                &logits(built.decoder().unwrap(), &ids),
                &logits(&loaded, &ids),
            );
            assert_eq!(d, 0.0, "{method}");
        }
    }

    /// A tensor-wise merge held as its spec's residency, with its report.
    fn reported(spec: MergeSpec, run: &Run) -> (Servable, ResidencyReport) {
        let Plan::Tensorwise(t) = Plan::new(spec).unwrap() else {
            panic!("not a tensor-wise merge")
        };
        let (built, report) = t.build_reported(run).unwrap();
        (built, report.expect("held as a delta"))
    }

    #[test]
    fn a_combination_of_task_vectors_serves_the_merges_logits() {
        use crate::spec::residency::{Form, Residency};
        let p = pool(3, false, 0.05, DType::F32);
        let open = |name: &str| p.open(name);
        let cancel = Cancel::new();
        let run = cpu_run(&open, &cancel);
        let ids = random_ids(2, 6, 48, 3);
        let dense_vectors = Residency::combination(Residency::dense());
        for spec in [
            p.spec("task_arithmetic").with("scaling_coefficient", 0.7),
            p.spec("simple_average"),
            p.spec("weighted_average"),
        ] {
            let method = spec.method.clone();
            let dense = Plan::new(spec.clone()).unwrap().build(&run).unwrap();
            let mut held = spec.clone();
            held.residency = Some(dense_vectors.clone());
            let (built, report) = reported(held, &run);
            assert_eq!(report.form, Form::Combination);
            // Three coefficients of 8 bytes; the task vectors are shared.
            assert_eq!(report.bytes, 24, "{method}");
            assert!(report.shared_bytes.unwrap() > 0);
            assert!(report.max_error < 1e-6, "{method}: f32 rounding only");
            let d = max_diff(
                &logits(dense.decoder().unwrap(), &ids),
                &logits(built.decoder().unwrap(), &ids),
            );
            assert!(d < 1e-5, "{method}: {d}");
        }
        // Task vectors at full energy: the same within rounding.
        let mut spec = p.spec("task_arithmetic");
        spec.residency = Some(Residency::combination(Residency::lowrank_energy(1.0)));
        let (built, report) = reported(spec.clone(), &run);
        assert!(report.max_error < 1e-5);
        spec.residency = None;
        let dense = Plan::new(spec).unwrap().build(&run).unwrap();
        let d = max_diff(
            &logits(dense.decoder().unwrap(), &ids),
            &logits(built.decoder().unwrap(), &ids),
        );
        assert!(d < 1e-4, "{d}");
    }

    #[test]
    fn a_masked_task_view_serves_the_views_logits_for_its_bits() {
        use crate::spec::residency::{Form, Residency};
        use crate::spec::ParamValue;
        let p = pool(3, false, 0.05, DType::F32);
        let open = |name: &str| p.open(name);
        let cancel = Cancel::new();
        let run = cpu_run(&open, &cancel);
        let ids = random_ids(2, 6, 48, 3);
        for method in ["emr_merging", "tall_masks"] {
            for t in 0..2 {
                let mut spec = p.spec(method);
                let task = spec.models[t].name.clone();
                spec = spec.with_value("task", ParamValue::Text(task));
                let dense = Plan::new(spec.clone()).unwrap().build(&run).unwrap();
                let (built, report) = reported(spec.held_as(Residency::masked()), &run);
                assert_eq!(report.form, Form::Masked);
                let shared = report.shared_bytes.expect("U is shared");
                // One bit per entry (in words) and 8 bytes of scale per
                // tensor, against U's 4 bytes per entry.
                assert!(
                    report.bytes * 16 < shared,
                    "{method}: {} vs {shared}",
                    report.bytes
                );
                assert!(shared <= report.dense_bytes);
                let d = max_diff(
                    &logits(dense.decoder().unwrap(), &ids),
                    &logits(built.decoder().unwrap(), &ids),
                );
                assert!(d < 1e-4, "{method} task {t}: {d}");
            }
        }
        // Only a retrieval merge has task views.
        let err = Plan::new(p.spec("task_arithmetic").held_as(Residency::masked()))
            .map(|_| ())
            .expect_err("refused")
            .to_string();
        assert!(err.contains("form `masked`"), "{err}");
    }

    #[test]
    fn a_combination_needs_an_affine_merge_with_constant_coefficients() {
        use crate::spec::residency::Residency;
        use crate::spec::ParamValue;
        let p = pool(2, false, 0.05, DType::F32);
        let with = |spec: MergeSpec| {
            let mut s = spec;
            s.residency = Some(Residency::combination(Residency::lowrank_rank(4)));
            Plan::new(s).map(|_| ())
        };
        for spec in [
            p.spec("ties_merging"),
            p.spec("weighted_average")
                .with_value("normalize", ParamValue::Bool(false)),
            p.spec("task_arithmetic")
                .with_value("scaling_coefficient", ParamValue::Gradient(vec![0.1, 0.9])),
        ] {
            let err = with(spec.clone()).expect_err(&spec.method).to_string();
            assert!(err.contains("form `combination`"), "{err}");
        }
        assert!(with(p.spec("task_arithmetic")).is_ok());
        // Raw weights summing to 1 are an affine combination.
        let mut spec = p
            .spec("weighted_average")
            .with_value("normalize", ParamValue::Bool(false));
        for (m, w) in spec.models.iter_mut().zip([0.25, 0.75]) {
            m.parameters.insert("weight".into(), ParamValue::Number(w));
        }
        assert!(with(spec).is_ok());
    }

    #[test]
    fn affine_coefficients_worked_by_hand() {
        use crate::spec::ParamValue;
        let p = pool(2, false, 0.05, DType::F32);
        let coeffs = |spec: MergeSpec| {
            let (_, m) = methods::build(&spec).unwrap();
            m.affine_coefficients(2)
        };
        // λ = 0.5, weights 1 and 3, normalised: cᵢ = 0.5·wᵢ/4 = 0.125, 0.375;
        // c₀ = 1 − 0.5 = 0.5.
        let mut ta = p
            .spec("task_arithmetic")
            .with("scaling_coefficient", 0.5)
            .with_value("normalize", ParamValue::Bool(true));
        for (m, w) in ta.models.iter_mut().zip([1.0, 3.0]) {
            m.parameters.insert("weight".into(), ParamValue::Number(w));
        }
        assert_eq!(coeffs(ta), Some((0.5, vec![0.125, 0.375])));
        assert_eq!(
            coeffs(p.spec("simple_average")),
            Some((0.0, vec![0.5, 0.5]))
        );
        assert_eq!(coeffs(p.spec("ties_merging")), None);
    }
}
