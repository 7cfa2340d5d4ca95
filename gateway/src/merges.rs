//! Merge execution and the book of known merges.
//!
//! A load (a merge, a routed merge with its router training, or reading a
//! plain checkpoint) runs off the async runtime on the blocking pool (the
//! merge itself fans out over rayon), at most `merge.max_concurrent` at once. The book remembers every merge a
//! request or `POST /v1/merges` named (its spec, so that `merge-<id>` can be
//! merged again after an eviction) and the state of its last run, within
//! `server.limits.max_book_bytes` (the bytes of its specs, errors and
//! router reports) and [`MAX_RECORDS`] merges: past either, the oldest
//! finished merges are forgotten, and a merge that finds the book full of
//! pending and running ones is refused (503).
//!
//! A pending or running merge holds a [`Cancel`] token: `DELETE
//! /v1/merges/{id}` ([`Merges::cancel`]) and the server's shutdown
//! ([`Merges::cancel_all`]) cancel it; the merge stops at its next check
//! (between tensors, WUDI iterations, router training steps), fails to its
//! waiters, frees its slot and is not cached.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use merger::data_driven::{DataReport, StatsCounters};
use merger::merge::{merge_in_memory, MergePlan, Progress};
use merger::residency::{Compressed, ResidencyReport};
use merger::spec::MergeSpec;
use merger::{Cancel, MergeError, Turn};
use runtime::checkpoint::{Checkpoint, Stamps};
use runtime::model::ModelOptions;
use serde::Serialize;
use tokio::sync::Semaphore;
use utoipa::ToSchema;

use crate::cache::Resident;
use crate::clock::unix_time;
use crate::engine::Engine;
use crate::error::{GatewayError, Result, Stage};
use crate::metrics::Metrics;
use crate::registry::routed::{RouterSource, RoutersInfo};
use crate::registry::Target;

/// Most merges the book remembers; past it the oldest finished ones are
/// forgotten.
pub const MAX_RECORDS: usize = 10_000;

/// Bytes a record weighs besides its spec, error and router report.
const RECORD_OVERHEAD: u64 = 256;

/// A model in the cache, ready to answer.
pub struct Served {
    /// `merge-<id>` or `pool/name`.
    pub name: String,
    /// The model.
    pub engine: Arc<Engine>,
    /// The merge method, for merges.
    pub method: Option<String>,
    /// Seconds the merge (or load) took.
    pub load_seconds: f64,
    /// The checkpoint files it was made from, as they were then: while any
    /// has changed on disk, the model is stale and not served.
    pub sources: Vec<Stamps>,
    /// The cache keys of the resident entries a merge held as a delta
    /// shares: a combination's task vectors, then its base (kept recent
    /// while the merge is used, the base most of all).
    pub shared: Vec<String>,
    /// How a task vector (a cache entry a combination reads) was
    /// compressed; `None` for every other model (a merge's report is in
    /// the book).
    pub report: Option<ResidencyReport>,
}

/// The resident base a merge held as a delta is built over: its cache
/// key, the served base and the checkpoint it was loaded from, and for a
/// combination the resident task vectors it combines.
pub struct SharedBase {
    /// The base's cache key.
    pub key: String,
    /// The resident base.
    pub served: Arc<Served>,
    /// Its checkpoint (what the delta is taken against).
    pub checkpoint: Arc<Checkpoint>,
    /// A combination's task vectors with their coefficients (empty for
    /// every other form).
    pub vectors: Vec<SharedVector>,
    /// A masked task view's unified vector U (resident once for every
    /// task of its merge; coefficient 1); `None` for every other form.
    pub unified: Option<SharedVector>,
}

/// One resident task vector τ = θ − θ₀ a combination reads, with its
/// coefficient in that combination.
pub struct SharedVector {
    /// Its cache key.
    pub key: String,
    /// λ of this combination.
    pub coefficient: f64,
    /// The resident task vector (a delta over the base).
    pub served: Arc<Served>,
}

impl SharedBase {
    /// The cache keys a merge over this base shares, the base last.
    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.vectors.iter().map(|v| v.key.clone()).collect();
        keys.extend(self.unified.iter().map(|u| u.key.clone()));
        keys.push(self.key.clone());
        keys
    }

    /// The combination `Σᵢ λᵢ τ̂ᵢ` of the resident task vectors.
    fn combination(&self) -> merger::Result<merger::residency::Compressed> {
        let mut parts = Vec::with_capacity(self.vectors.len());
        for v in &self.vectors {
            let (Some(delta), Some(report)) = (v.served.engine.batch_delta(), &v.served.report)
            else {
                return Err(MergeError::Unsupported {
                    feature: format!("`{}` as a task vector", v.key),
                    hint: "it is not held as a delta over the base".into(),
                });
            };
            parts.push((v.coefficient, delta, report));
        }
        Ok(merger::residency::combination(parts))
    }
}

impl Served {
    /// The first source file that changed on disk since the model was
    /// made, with what changed.
    pub fn stale(&self) -> Option<(std::path::PathBuf, String)> {
        self.sources.iter().find_map(Stamps::changed)
    }
}

impl Resident for Served {
    fn resident_bytes(&self) -> u64 {
        self.engine.resident_bytes()
    }
}

/// Where a merge stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MergeState {
    /// Known, waiting for a merge slot.
    Pending,
    /// Merging now.
    Running,
    /// Merged and resident.
    Ready,
    /// Merged once, since evicted (a request merges it again).
    Evicted,
    /// The last run failed (not cached; a request retries it).
    Failed,
    /// The last run was cancelled (`DELETE /v1/merges/{id}`, or the
    /// server's shutdown); not cached, a request merges it again.
    Cancelled,
}

/// What the book keeps per merge.
#[derive(Debug, Clone)]
struct Record {
    spec: MergeSpec,
    method: String,
    state: MergeState,
    output_bytes: u64,
    routers: Option<RoutersInfo>,
    data_driven: Option<DataReport>,
    residency: Option<ResidencyReport>,
    resident_bytes: Option<u64>,
    duration_seconds: Option<f64>,
    error: Option<String>,
    created: u64,
    seq: u64,
    /// Cancels the pending or running load (none once it is over).
    cancel: Option<Cancel>,
    /// What the record weighs in the book's byte bound.
    weight: u64,
}

impl Record {
    /// Bytes of the record: its id, spec (as JSON), error and routers.
    fn weigh(&self, id: &str) -> u64 {
        RECORD_OVERHEAD
            + (id.len() + self.method.len() + self.error.as_ref().map_or(0, String::len)) as u64
            + json_len(&self.spec)
            + self.routers.as_ref().map_or(0, json_len)
            + self.data_driven.as_ref().map_or(0, json_len)
            + self.residency.as_ref().map_or(0, json_len)
    }
}

/// Bytes of `v` as JSON.
fn json_len<T: Serialize>(v: &T) -> u64 {
    serde_json::to_vec(v).map_or(0, |b| b.len() as u64)
}

/// A merge as `GET /v1/merges` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MergeInfo {
    /// `merge-<id>`; usable as a `model`.
    pub id: String,
    /// Always `merge`.
    pub object: &'static str,
    /// The state.
    pub status: MergeState,
    /// The method's canonical name.
    pub method: String,
    /// The pool of its checkpoints.
    pub pool: Option<String>,
    /// The resolved spec.
    #[schema(value_type = Object)]
    pub spec: MergeSpec,
    /// Bytes of the merged tensors (as stored).
    pub output_bytes: u64,
    /// Bytes of the resident model (when merged).
    pub bytes: Option<u64>,
    /// Wall time of the last merge, in seconds.
    pub duration_seconds: Option<f64>,
    /// Why the last run failed.
    pub error: Option<String>,
    /// Unix time the merge was first named.
    pub created: u64,
    /// The routers of a routed merge (`we_moe`, ...): where they come from
    /// and how they were trained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routers: Option<RoutersInfo>,
    /// What a data-driven merge (`fisher_merging`, `regmean`, ...) did:
    /// forward batches run, statistics found in the statistics cache or
    /// computed, seconds on calibration inputs, inputs per expert, and
    /// AdaMerging's objective and coefficients.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub data_driven: Option<DataReport>,
    /// A merge held as a delta over the resident base (`form` lowrank,
    /// sparse or combination): the form, its rank range or density, the
    /// delta's bytes against the dense merge's (a combination's: its
    /// coefficients, and the `shared_bytes` of the task vectors it reads),
    /// and the measured relative error ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F per tensor (max
    /// and mean; a combination's task vectors' ‖τ − τ̂‖/‖τ‖).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub residency: Option<ResidencyReport>,
}

/// A model a merge job built, with what the book records of it.
struct Built {
    engine: Engine,
    output_bytes: Option<u64>,
    routers: Option<RoutersInfo>,
    /// A data-driven merge's report and the statistics cache's counts.
    data: Option<(DataReport, Arc<StatsCounters>)>,
    /// How a merge held as a delta was compressed.
    residency: Option<ResidencyReport>,
}

impl Built {
    /// A merge held as `delta` over the resident `base` (no output file,
    /// routers or statistics), with how it is held.
    fn over(
        base: &SharedBase,
        delta: runtime::model::ModelDelta,
        report: ResidencyReport,
    ) -> merger::Result<Built> {
        Ok(Built {
            engine: Engine::from_delta(base.served.engine.clone(), delta)?,
            output_bytes: None,
            routers: None,
            data: None,
            residency: Some(report),
        })
    }
}

#[derive(Default)]
struct Book {
    records: HashMap<String, Record>,
    next_seq: u64,
    /// Σ of the records' weights.
    bytes: u64,
}

impl Book {
    /// Applies `f` to record `id`, keeping its weight and the total right.
    fn update(&mut self, id: &str, f: impl FnOnce(&mut Record)) {
        if let Some(r) = self.records.get_mut(id) {
            f(r);
            let w = r.weigh(id);
            self.bytes = self.bytes - r.weight + w;
            r.weight = w;
        }
    }
}

/// The merge executor and its book.
#[derive(Clone)]
pub struct Merges {
    slots: Arc<Semaphore>,
    book: Arc<Mutex<Book>>,
    max_book_bytes: u64,
    opts: ModelOptions,
    metrics: Metrics,
    shutting_down: Arc<AtomicBool>,
    /// What a data-driven merge waits for before each training step.
    turn: Turn,
}

impl Merges {
    /// `max_concurrent` loads at once, a book of at most `max_book_bytes`;
    /// models built with `opts` (device, dtype); a data-driven merge
    /// waits for `turn` before each training step (client traffic first).
    pub fn new(
        max_concurrent: usize,
        max_book_bytes: u64,
        opts: ModelOptions,
        metrics: Metrics,
        turn: Turn,
    ) -> Self {
        Merges {
            turn,
            slots: Arc::new(Semaphore::new(max_concurrent)),
            book: Arc::new(Mutex::new(Book::default())),
            max_book_bytes,
            opts,
            metrics,
            shutting_down: Arc::new(AtomicBool::new(false)),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers a merge found resident (checkpoints are not merges), as
    /// ready unless the book knows it already; a 503 when pending and
    /// running merges fill the book.
    pub fn note_resident(&self, target: &Target) -> Result<()> {
        self.remember(target, MergeState::Ready).map(drop)
    }

    /// Marks the merge of `target` pending, unless it is running already:
    /// the one place a merge becomes pending, called before its load starts
    /// (so that the book shows it at once) and again by the load itself
    /// (which may start after another load of it ended). The book remembers
    /// it first when it does not know it: the oldest finished merges make
    /// room, and a 503 when pending and running ones fill the book. Returns
    /// the token that cancels its load (`None` for a checkpoint).
    pub fn pending(&self, target: &Target) -> Result<Option<Cancel>> {
        self.remember(target, MergeState::Pending)
    }

    /// Adds the record of `target` in `state`, or marks a known one pending
    /// when `state` is; returns the token of a pending merge.
    fn remember(&self, target: &Target, state: MergeState) -> Result<Option<Cancel>> {
        let Some(entry) = target.book_entry() else {
            return Ok(None);
        };
        let id = target.model_name();
        let pending = state == MergeState::Pending;
        let mut book = self.book();
        if !book.records.contains_key(&id) {
            let seq = book.next_seq;
            let mut record = Record {
                spec: entry.spec,
                method: entry.method.to_string(),
                state,
                output_bytes: entry.output_bytes.unwrap_or(0),
                routers: entry.routers,
                data_driven: None,
                residency: None,
                resident_bytes: None,
                duration_seconds: None,
                error: None,
                created: unix_time(),
                seq,
                cancel: None,
                weight: 0,
            };
            record.weight = record.weigh(&id);
            while book.records.len() >= MAX_RECORDS
                || book.bytes + record.weight > self.max_book_bytes
            {
                if !forget_oldest(&mut book) {
                    return Err(GatewayError::Unavailable(format!(
                        "the book of merges is full of pending and running merges ({} of {} bytes, \
                         server.limits.max_book_bytes); retry once some are done",
                        book.bytes, self.max_book_bytes
                    )));
                }
            }
            book.next_seq += 1;
            book.bytes += record.weight;
            book.records.insert(id.clone(), record);
        }
        if !pending {
            return Ok(None);
        }
        let mut token = None;
        book.update(&id, |r| {
            if r.state != MergeState::Running {
                r.state = MergeState::Pending;
            }
            let turn = self.turn.clone();
            token = Some(
                r.cancel
                    .get_or_insert_with(|| Cancel::with_turn(turn))
                    .clone(),
            );
        });
        Ok(token)
    }

    /// Cancels the pending or running load of merge `id`; whether there
    /// was one.
    pub fn cancel(&self, id: &str) -> bool {
        let book = self.book();
        match book.records.get(id) {
            Some(r) if matches!(r.state, MergeState::Pending | MergeState::Running) => {
                match &r.cancel {
                    Some(c) => {
                        c.cancel();
                        true
                    }
                    None => false,
                }
            }
            _ => false,
        }
    }

    /// Cancels every pending and running merge and refuses new ones (the
    /// server is shutting down).
    pub fn cancel_all(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        for r in self.book().records.values() {
            if let Some(c) = &r.cancel {
                c.cancel();
            }
        }
    }

    /// Bytes the book's records weigh.
    pub fn book_bytes(&self) -> u64 {
        self.book().bytes
    }

    /// The spec of a known merge.
    pub fn spec_of(&self, id: &str) -> Option<MergeSpec> {
        self.book().records.get(id).map(|r| r.spec.clone())
    }

    /// Whether a merge is pending or running.
    pub fn is_busy(&self, id: &str) -> bool {
        self.book()
            .records
            .get(id)
            .is_some_and(|r| matches!(r.state, MergeState::Pending | MergeState::Running))
    }

    /// One merge as the API shows it; `resident` tells whether the cache holds it.
    pub fn info(&self, id: &str, resident: &dyn Fn(&str) -> bool) -> Option<MergeInfo> {
        let book = self.book();
        book.records.get(id).map(|r| view(id, r, resident(id)))
    }

    /// The ids of every known merge, newest first.
    pub fn ids(&self) -> Vec<String> {
        let book = self.book();
        let mut records: Vec<(&String, &Record)> = book.records.iter().collect();
        records.sort_by_key(|(_, r)| std::cmp::Reverse(r.seq));
        records.into_iter().map(|(id, _)| id.clone()).collect()
    }

    /// The merges `ids` as the API shows them (those still known).
    pub fn infos(&self, ids: &[String], resident: &dyn Fn(&str) -> bool) -> Vec<MergeInfo> {
        let book = self.book();
        ids.iter()
            .filter_map(|id| book.records.get(id).map(|r| view(id, r, resident(id))))
            .collect()
    }

    fn set(&self, id: &str, f: impl FnOnce(&mut Record)) {
        self.book().update(id, f);
    }

    /// The future that makes `target` resident: a merge, or loading a
    /// checkpoint. It holds a merge slot while it runs. A merge held as a
    /// delta is built over `base` (resident already).
    pub fn loader(
        &self,
        target: Target,
        base: Option<SharedBase>,
    ) -> impl Future<Output = Result<Arc<Served>>> + Send + 'static {
        let this = self.clone();
        async move {
            let name = target.model_name();
            let mut sources = target.sources();
            if let Some(b) = &base {
                // A changed base file makes the delta stale too.
                sources.extend(b.served.sources.iter().cloned());
            }
            let cancel = this.pending(&target)?.unwrap_or_default();
            let slot = this.slots.clone().acquire_owned().await;
            let Ok(_slot) = slot else {
                this.set(&name, |r| r.cancel = None);
                return Err(GatewayError::Unavailable(
                    "the server is shutting down".into(),
                ));
            };
            match target {
                Target::Checkpoint { checkpoint, .. } => {
                    let opts = this.opts.clone();
                    let start = Instant::now();
                    let engine = tokio::task::spawn_blocking(move || {
                        Engine::from_checkpoint(&checkpoint, &opts)
                    })
                    .await
                    .map_err(|e| GatewayError::Internal(format!("loading `{name}` failed: {e}")))?
                    .map_err(|e| GatewayError::at(Stage::Execution, e))?;
                    tracing::info!(model = %name, bytes = engine.resident_bytes(), "checkpoint loaded");
                    Ok(Arc::new(Served {
                        name,
                        engine: Arc::new(engine),
                        method: None,
                        load_seconds: start.elapsed().as_secs_f64(),
                        sources,
                        shared: Vec::new(),
                        report: None,
                    }))
                }
                Target::Merge(plan) => {
                    let mut plan = *plan;
                    plan.set_cancel(cancel.clone());
                    let method = plan.info().name;
                    let shared = base.as_ref().map_or_else(Vec::new, SharedBase::keys);
                    this.run(
                        name,
                        method,
                        cancel,
                        sources,
                        shared,
                        move |opts, cancel| {
                            let combination = plan
                                .spec()
                                .residency
                                .as_ref()
                                .is_some_and(|r| r.is_combination());
                            if let Some((base, u)) = base
                                .as_ref()
                                .and_then(|b| b.unified.as_ref().map(|u| (b, u)))
                            {
                                // A task view: its mask over the resident U.
                                let unified = u.served.engine.batch_delta().ok_or_else(|| {
                                    MergeError::Unsupported {
                                        feature: format!("`{}` as a unified vector", u.key),
                                        hint: "it is not held as a delta over the base".into(),
                                    }
                                })?;
                                let compressed = merger::retrieval::view(&mut plan, &unified)?;
                                let report = compressed.report;
                                tracing::info!(
                                    bytes = report.bytes,
                                    shared_bytes = report.shared_bytes,
                                    "task view held as its mask over the merge's unified vector"
                                );
                                return Built::over(base, compressed.delta, report);
                            }
                            if let Some(base) = base.as_ref().filter(|_| combination) {
                                // A combination: nothing to merge.
                                let compressed = base.combination()?;
                                let report = compressed.report;
                                tracing::info!(
                                    vectors = base.vectors.len(),
                                    shared_bytes = report.shared_bytes,
                                    "merge held as a combination of resident task vectors"
                                );
                                return Built::over(base, compressed.delta, report);
                            }
                            let progress = Progress::new(plan.tensors().len(), method, false);
                            let (tensors, _stats) =
                                merge_in_memory(&mut plan, &opts.device, &progress)?;
                            let residency = plan.spec().residency.clone();
                            let (engine, residency) = match (base, residency) {
                                (Some(base), Some(residency)) => {
                                    let engine = base.served.engine.clone();
                                    let dtype = engine.delta_dtype()?;
                                    let compressed = merger::residency::compress(
                                        &tensors,
                                        &base.checkpoint,
                                        &residency,
                                        dtype,
                                        &opts.device,
                                        cancel,
                                    )?;
                                    drop(tensors);
                                    let report = compressed.report;
                                    tracing::info!(
                                        form = report.form.as_str(),
                                        bytes = report.bytes,
                                        dense_bytes = report.dense_bytes,
                                        max_error = report.max_error,
                                        mean_error = report.mean_error,
                                        seconds = report.seconds,
                                        "merge held as a delta over its base"
                                    );
                                    (Engine::from_delta(engine, compressed.delta)?, Some(report))
                                }
                                _ => (Engine::from_merge(tensors, plan.reference(), opts)?, None),
                            };
                            Ok(Built {
                                engine,
                                output_bytes: None,
                                routers: None,
                                data: None,
                                residency,
                            })
                        },
                    )
                    .await
                }
                Target::Routed(plan) => {
                    let method = plan.method();
                    this.run(
                        name,
                        method,
                        cancel,
                        sources,
                        Vec::new(),
                        move |opts, cancel| {
                            let routed = plan.build(opts, cancel)?;
                            Ok(Built {
                                engine: routed.engine,
                                output_bytes: Some(routed.output_bytes),
                                routers: Some(routed.routers),
                                data: None,
                                residency: None,
                            })
                        },
                    )
                    .await
                }
                Target::DataDriven(plan) => {
                    let method = plan.method();
                    this.run(
                        name,
                        method,
                        cancel,
                        sources,
                        Vec::new(),
                        move |opts, cancel| {
                            let built = plan.build(opts, cancel)?;
                            Ok(Built {
                                engine: built.engine,
                                output_bytes: None,
                                routers: None,
                                data: Some((built.report, built.counters)),
                                residency: None,
                            })
                        },
                    )
                    .await
                }
            }
        }
    }

    /// Marks merge `id` failed with `error` before its own load started (its
    /// base or a task vector it shares could not be made resident).
    pub fn failed(&self, id: &str, error: &GatewayError) {
        self.set(id, |r| {
            r.state = MergeState::Failed;
            r.cancel = None;
            r.error = Some(error.to_string());
        });
    }

    /// The future that makes checkpoint `expert`'s task vector τ = θ − θ₀
    /// over `base` resident as entry `key`: τ compressed as `vectors`, held
    /// as a delta over the base's engine (what combinations of it read). It
    /// holds a merge slot while it compresses.
    pub fn vector_loader(
        &self,
        key: String,
        expert: Arc<Checkpoint>,
        base: &SharedBase,
        vectors: merger::spec::Residency,
    ) -> impl Future<Output = Result<Arc<Served>>> + Send + 'static {
        let base_ck = base.checkpoint.clone();
        let sources = vec![expert.stamps().clone()];
        self.shared_loader(key, base, sources, None, move |dtype, device| {
            merger::residency::task_vector(
                &expert,
                &base_ck,
                &vectors,
                dtype,
                device,
                &Cancel::default(),
            )
        })
    }

    /// The future that makes the unified vector U of `plan` (a per-task
    /// retrieval merge) resident as entry `key`: every tensor's U held
    /// dense as a delta over the base's engine (what each task view of the
    /// merge masks). It holds a merge slot while it runs.
    pub fn unified_loader(
        &self,
        key: String,
        mut plan: MergePlan,
        base: &SharedBase,
    ) -> impl Future<Output = Result<Arc<Served>>> + Send + 'static {
        let sources: Vec<Stamps> = plan.checkpoints().map(|c| c.stamps().clone()).collect();
        let method = Some(plan.info().name.to_string());
        self.shared_loader(key, base, sources, method, move |dtype, device| {
            merger::retrieval::unified(&mut plan, dtype, device)
        })
    }

    /// The future that makes entry `key` resident: what `build` compresses
    /// (in the base's delta dtype, on the merge device) held as a delta over
    /// `base`'s engine, for the merges held over it to share (a task vector,
    /// a unified vector). It holds a merge slot while `build` runs; the
    /// entry is stale when `sources` or the base's files change.
    fn shared_loader<F>(
        &self,
        key: String,
        base: &SharedBase,
        mut sources: Vec<Stamps>,
        method: Option<String>,
        build: F,
    ) -> impl Future<Output = Result<Arc<Served>>> + Send + 'static
    where
        F: FnOnce(candle_core::DType, &candle_core::Device) -> merger::Result<Compressed>
            + Send
            + 'static,
    {
        let this = self.clone();
        let (base_key, base_engine) = (base.key.clone(), base.served.engine.clone());
        sources.extend(base.served.sources.iter().cloned());
        async move {
            let Ok(_slot) = this.slots.clone().acquire_owned().await else {
                return Err(GatewayError::Unavailable(
                    "the server is shutting down".into(),
                ));
            };
            let opts = this.opts.clone();
            let start = Instant::now();
            let name = key.clone();
            let built = tokio::task::spawn_blocking(move || {
                let dtype = base_engine.delta_dtype()?;
                let c = build(dtype, &opts.device)?;
                let engine = Engine::from_delta(base_engine, c.delta)?;
                Ok::<_, MergeError>((engine, c.report))
            })
            .await
            .map_err(|e| GatewayError::Internal(format!("building `{name}` failed: {e}")))?
            .map_err(|e| GatewayError::at(Stage::Merge, e))?;
            let (engine, report) = built;
            tracing::info!(entry = %key, form = report.form.as_str(), bytes = report.bytes,
                max_error = report.max_error, mean_error = report.mean_error,
                seconds = report.seconds, "shared delta resident");
            Ok(Arc::new(Served {
                name: key,
                engine: Arc::new(engine),
                method,
                load_seconds: start.elapsed().as_secs_f64(),
                sources,
                shared: vec![base_key],
                report: Some(report),
            }))
        }
    }

    /// Runs a merge job on the blocking pool, with its metrics, logs and
    /// book updates.
    async fn run<F>(
        &self,
        id: String,
        method: &'static str,
        cancel: Cancel,
        sources: Vec<Stamps>,
        shared: Vec<String>,
        job: F,
    ) -> Result<Arc<Served>>
    where
        F: FnOnce(&ModelOptions, &Cancel) -> merger::Result<Built> + Send + 'static,
    {
        if self.shutting_down.load(Ordering::SeqCst) {
            cancel.cancel();
        }
        self.set(&id, |r| {
            r.state = MergeState::Running;
            r.error = None;
        });
        tracing::info!(merge = %id, method = %method, "merge started");
        let opts = self.opts.clone();
        let start = Instant::now();
        let token = cancel.clone();
        let result = tokio::task::spawn_blocking(move || {
            // Cancelled while it waited for its slot: it does not start.
            token.check()?;
            job(&opts, &token)
        })
        .await;
        let seconds = start.elapsed().as_secs_f64();
        let mut cancelled = false;
        let result: Result<Built> = match result {
            Ok(Ok(built)) => Ok(built),
            Ok(Err(MergeError::Cancelled)) => {
                cancelled = true;
                Err(if self.shutting_down.load(Ordering::SeqCst) {
                    GatewayError::Unavailable(format!(
                        "the server is shutting down: merge `{id}` was cancelled"
                    ))
                } else {
                    GatewayError::Conflict(format!(
                        "merge `{id}` was cancelled (DELETE /v1/merges/{id}); name it again to merge it again"
                    ))
                })
            }
            Ok(Err(e)) => Err(GatewayError::at(Stage::Merge, e)),
            Err(e) => Err(GatewayError::Internal(format!(
                "the merge task failed: {e}"
            ))),
        };
        let outcome = match (&result, cancelled) {
            (Ok(_), _) => "success",
            (Err(_), true) => "cancelled",
            (Err(_), false) => "error",
        };
        self.metrics
            .merges
            .with_label_values(&[method, outcome])
            .inc();
        self.metrics
            .merge_duration
            .with_label_values(&[method])
            .observe(seconds);
        match result {
            Ok(built) => {
                let engine = built.engine;
                let bytes = engine.resident_bytes();
                if let Some(RoutersInfo {
                    source: RouterSource::Trained,
                    training: Some(t),
                    ..
                }) = &built.routers
                {
                    self.metrics
                        .router_training
                        .with_label_values(&[method])
                        .observe(t.seconds);
                    tracing::info!(merge = %id, method = %method, steps = t.steps,
                        seconds = t.seconds, entropy_before = t.entropy_before,
                        entropy_after = t.entropy_after, "routers trained");
                }
                if let Some((report, counters)) = &built.data {
                    self.metrics.observe_data_driven(method, report, counters);
                    tracing::info!(merge = %id, method = %method,
                        forward_batches = report.forward_batches,
                        stats_hits = report.stats_hits, stats_misses = report.stats_misses,
                        calibration_seconds = report.calibration_seconds,
                        "data-driven merge: statistics");
                }
                tracing::info!(merge = %id, method = %method, seconds, bytes, "merge finished");
                self.set(&id, |r| {
                    r.state = MergeState::Ready;
                    r.cancel = None;
                    r.resident_bytes = Some(bytes);
                    r.duration_seconds = Some(seconds);
                    if let Some(b) = built.output_bytes {
                        r.output_bytes = b;
                    }
                    if built.routers.is_some() {
                        r.routers = built.routers;
                    }
                    if let Some((report, _)) = built.data {
                        r.data_driven = Some(report);
                    }
                    if built.residency.is_some() {
                        r.residency = built.residency;
                    }
                });
                Ok(Arc::new(Served {
                    name: id,
                    engine: Arc::new(engine),
                    method: Some(method.to_string()),
                    load_seconds: seconds,
                    sources,
                    shared,
                    report: None,
                }))
            }
            Err(e) => {
                tracing::warn!(merge = %id, method = %method, error = %e, "merge failed");
                self.set(&id, |r| {
                    r.state = if cancelled {
                        MergeState::Cancelled
                    } else {
                        MergeState::Failed
                    };
                    r.cancel = None;
                    r.error = Some(e.to_string());
                    r.duration_seconds = Some(seconds);
                });
                Err(e)
            }
        }
    }
}

fn view(id: &str, r: &Record, resident: bool) -> MergeInfo {
    let status = match r.state {
        MergeState::Ready | MergeState::Evicted if resident => MergeState::Ready,
        MergeState::Ready => MergeState::Evicted,
        s => s,
    };
    MergeInfo {
        id: id.to_string(),
        object: "merge",
        status,
        method: r.method.clone(),
        pool: r.spec.pool.clone(),
        spec: r.spec.clone(),
        output_bytes: r.output_bytes,
        bytes: r.resident_bytes,
        duration_seconds: r.duration_seconds,
        error: r.error.clone(),
        created: r.created,
        routers: r.routers.clone(),
        data_driven: r.data_driven.clone(),
        residency: r.residency.clone(),
    }
}

/// Drops the oldest record that is neither pending nor running; whether
/// there was one.
fn forget_oldest(book: &mut Book) -> bool {
    let oldest = book
        .records
        .iter()
        .filter(|(_, r)| !matches!(r.state, MergeState::Pending | MergeState::Running))
        .min_by_key(|(_, r)| r.seq)
        .map(|(k, _)| k.clone());
    match oldest.and_then(|k| book.records.remove(&k)) {
        Some(r) => {
            book.bytes -= r.weight;
            true
        }
        None => false,
    }
}
