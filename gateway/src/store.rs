//! The model store: the one way to a resident model. It owns the
//! byte-bounded cache of resident models ([`ModelCache`]) and the book of
//! merges with their loader ([`Merges`]), and resolves what a request names
//! through the [`Registry`]. The OpenAI routes, the merges API and the
//! evaluations all go through it:
//!
//! - [`ModelStore::resolve`]: a request's `model` or `merge` to a target (no
//!   loading);
//! - [`ModelStore::acquire`]: a cache hit, or a load (one per key however
//!   many requests ask) awaited for at most `merge.max_wait`
//!   ([`Wait::Bounded`]: past it, 503 with Retry-After while the load goes
//!   on in the background) or to its end ([`Wait::Unbounded`]: the
//!   evaluations); [`ModelStore::model`] resolves and acquires;
//! - [`ModelStore::warm`]: starts a merge in the background (`POST
//!   /v1/merges`);
//! - [`ModelStore::evict`]: cancels a pending or running merge, or evicts a
//!   resident one;
//! - [`ModelStore::info`] and [`ModelStore::list`]: the merges as the API
//!   shows them.
//!
//! A resident model is served only while the checkpoint files it was made
//! from are unchanged on disk ([`ModelStore::resident`]); a stale one is
//! evicted, and the request resolves the model again from the files as they
//! are now.

use std::sync::Arc;
use std::time::{Duration, Instant};

use merger::spec::{MergeSpec, Residency};
use merger::Turn;
use runtime::architectures::Kind;
use runtime::checkpoint::Checkpoint;
use runtime::model::ModelOptions;
use serde::Serialize;
use utoipa::ToSchema;

use crate::cache::{CacheStatus, ModelCache};
use crate::config::Config;
use crate::error::{GatewayError, Result};
use crate::merges::{MergeInfo, Merges, Served, SharedBase, SharedVector};
use crate::metrics::Metrics;
use crate::registry::{Registry, Target};

/// A resident model as a request got it.
pub struct ModelHandle {
    /// The model.
    pub served: Arc<Served>,
    /// Hit, miss or joined.
    pub status: CacheStatus,
}

impl ModelHandle {
    /// The public model name (`merge-<id>` or `pool/name`).
    pub fn name(&self) -> &str {
        &self.served.name
    }

    /// The merge id, for merges.
    pub fn merge_id(&self) -> Option<&str> {
        self.served
            .method
            .as_ref()
            .map(|_| self.served.name.as_str())
    }
}

/// How long [`ModelStore::acquire`] waits for a load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// At most `merge.max_wait`; past it, 503 with Retry-After (the load
    /// goes on).
    Bounded,
    /// Until the load ends, however long it takes.
    Unbounded,
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeleteStatus {
    /// The resident weights were evicted.
    Evicted,
    /// It was not resident: nothing to evict.
    NotResident,
    /// It was pending or running: it is cancelled (it fails to its
    /// waiters, frees its slot and is not cached).
    Cancelled,
}

/// A load running in a task of its own: the resident model and how the
/// cache answered.
type LoadTask = tokio::task::JoinHandle<Result<(Arc<Served>, CacheStatus)>>;

/// The resident models, the book of merges and their loader.
#[derive(Clone)]
pub struct ModelStore {
    registry: Arc<Registry>,
    cache: ModelCache<Served>,
    merges: Merges,
    max_wait: Duration,
}

impl ModelStore {
    /// A store of the models of `registry`, bounded by `cache.max_bytes`,
    /// loading `merge.max_concurrent` at once with a book of
    /// `server.limits.max_book_bytes`; models are built with `opts`
    /// (device, dtype); data-driven merges wait for `turn` before each
    /// training step.
    pub fn new(
        registry: Arc<Registry>,
        config: &Config,
        opts: ModelOptions,
        metrics: Metrics,
        turn: Turn,
    ) -> Self {
        let cache = ModelCache::new(config.cache.max_bytes, metrics.clone());
        let merges = Merges::new(
            config.merge.max_concurrent,
            config.server.limits.max_book_bytes,
            opts,
            metrics,
            turn,
        );
        ModelStore {
            registry,
            cache,
            merges,
            max_wait: config.merge.max_wait,
        }
    }

    /// The registry the store resolves names in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Resolves a request's `model` or `merge` field (a structured `merge`
    /// wins) to a target; nothing is loaded.
    pub fn resolve(&self, model: Option<&str>, merge: Option<MergeSpec>) -> Result<Target> {
        if let Some(spec) = merge {
            return self.registry.resolve_spec(spec);
        }
        let model = model.ok_or_else(|| {
            GatewayError::bad_param("model", "`model` is required (or a structured `merge`)")
        })?;
        self.registry
            .resolve_model(model.trim(), &|id| self.merges.spec_of(id))
    }

    /// The resident model a request names, loading (merging) it if needed,
    /// waiting at most `merge.max_wait`.
    pub async fn model(
        &self,
        model: Option<&str>,
        merge: Option<MergeSpec>,
    ) -> Result<ModelHandle> {
        // A resident `merge-<id>` needs no planning at all.
        if merge.is_none() {
            if let Some(name) = model.map(str::trim).filter(|m| m.starts_with("merge-")) {
                let key = name.to_ascii_lowercase();
                if let Some(served) = self.resident(&key).await {
                    return Ok(ModelHandle {
                        served,
                        status: CacheStatus::Hit,
                    });
                }
            }
        }
        let target = self.resolve(model, merge)?;
        self.acquire(target, Wait::Bounded).await
    }

    /// [`ModelStore::model`] for a route that needs a text-generation
    /// model (`route`: `/v1/chat/completions`): an embedding or image model
    /// is a 400 naming its kind, found before anything is merged or loaded.
    pub async fn text_model(
        &self,
        model: Option<&str>,
        merge: Option<MergeSpec>,
        route: &str,
    ) -> Result<ModelHandle> {
        let need = Need {
            kind: Kind::Decoder,
            route,
            hint: "embedding and image models serve /v1/embeddings; GET /v1/models lists each \
                   model's kind",
            code: "model_not_text_generation",
        };
        self.model_of(model, merge, &need).await
    }

    /// [`ModelStore::model`] for a route that needs an image model
    /// (`route`: `/v1/classifications`): any other kind is a 400 naming it,
    /// found before anything is merged or loaded.
    pub async fn image_model(
        &self,
        model: Option<&str>,
        merge: Option<MergeSpec>,
        route: &str,
    ) -> Result<ModelHandle> {
        let need = Need {
            kind: Kind::Vision,
            route,
            hint: "GET /v1/models lists each model's kind",
            code: "model_not_image",
        };
        self.model_of(model, merge, &need).await
    }

    /// [`ModelStore::model`] when the route serves only models of the
    /// kind `need` names; another kind is `need`'s 400.
    async fn model_of(
        &self,
        model: Option<&str>,
        merge: Option<MergeSpec>,
        need: &Need<'_>,
    ) -> Result<ModelHandle> {
        if merge.is_none() {
            if let Some(name) = model.map(str::trim).filter(|m| m.starts_with("merge-")) {
                let key = name.to_ascii_lowercase();
                if let Some(served) = self.resident(&key).await {
                    if served.engine.kind() != need.kind {
                        return Err(need.refuse(name, served.engine.kind()));
                    }
                    return Ok(ModelHandle {
                        served,
                        status: CacheStatus::Hit,
                    });
                }
            }
        }
        let shown = model.map(str::trim).unwrap_or("merge").to_string();
        let target = self.resolve(model, merge)?;
        let kind = target.kind()?;
        if kind != need.kind {
            return Err(need.refuse(&shown, kind));
        }
        self.acquire(target, Wait::Bounded).await
    }

    /// Makes `target` resident: a cache hit, or a load (one per key however
    /// many ask) awaited as `wait` says.
    pub async fn acquire(&self, target: Target, wait: Wait) -> Result<ModelHandle> {
        let key = target.cache_key();
        if let Some(served) = self.resident(&key).await {
            self.merges.note_resident(&target)?;
            return Ok(ModelHandle {
                served,
                status: CacheStatus::Hit,
            });
        }
        let started = Instant::now();
        let name = target.model_name();
        let task = self.start_load(target)?;
        let joined = match wait {
            Wait::Unbounded => task.await,
            Wait::Bounded => match tokio::time::timeout(self.max_wait, task).await {
                Ok(joined) => joined,
                Err(_) => {
                    return Err(GatewayError::MergePending {
                        id: name,
                        waited: started.elapsed(),
                        retry_after: retry_after(self.max_wait),
                    })
                }
            },
        };
        let (served, status) = joined
            .map_err(|e| GatewayError::Internal(format!("loading `{name}` failed: {e}")))??;
        Ok(ModelHandle { served, status })
    }

    /// Starts merging `target` in the background unless it is resident or
    /// merging already (what `POST /v1/merges` does); the merge as the book
    /// shows it then. A checkpoint is no merge: 400.
    pub fn warm(&self, target: Target) -> Result<MergeInfo> {
        if !target.is_merge() {
            return Err(GatewayError::bad_param(
                "model",
                format!("`{}` is a checkpoint, not a merge", target.model_name()),
            ));
        }
        let id = target.model_name();
        if self.cache.contains(&id) {
            self.merges.note_resident(&target)?;
        } else if !self.merges.is_busy(&id) {
            // Runs on; the handle is not awaited.
            drop(self.start_load(target)?);
        }
        self.merges
            .info(&id, &|id| self.cache.contains(id))
            .ok_or_else(|| GatewayError::Internal(format!("`{id}` is missing from the book")))
    }

    /// Cancels merge `id` while it is pending or running, else evicts its
    /// weights (the spec stays known: a request merges it again). Only
    /// merges: a checkpoint id, or a merge the store does not know, is 404.
    pub async fn evict(&self, id: &str) -> Result<DeleteStatus> {
        if !id.starts_with("merge-") {
            return Err(GatewayError::NotFound {
                message: format!(
                    "`{id}` is not a merge: DELETE /v1/merges/{{id}} takes a merge id (`merge-…`), \
                     checkpoints are not evicted through it"
                ),
                param: Some("id".to_string()),
            });
        }
        if self.merges.spec_of(id).is_none() && !self.cache.contains(id) {
            return Err(unknown_merge(id));
        }
        Ok(if self.merges.cancel(id) {
            tracing::info!(merge = %id, "merge cancelled");
            DeleteStatus::Cancelled
        } else if self.cache.evict(id).await {
            DeleteStatus::Evicted
        } else {
            DeleteStatus::NotResident
        })
    }

    /// One merge as the API shows it; 404 when the book does not know it.
    pub fn info(&self, id: &str) -> Result<MergeInfo> {
        self.merges
            .info(id, &|id| self.cache.contains(id))
            .ok_or_else(|| unknown_merge(id))
    }

    /// The ids of every known merge, newest first.
    pub fn merge_ids(&self) -> Vec<String> {
        self.merges.ids()
    }

    /// The merges `ids` as the API shows them (those still known).
    pub fn list(&self, ids: &[String]) -> Vec<MergeInfo> {
        self.merges.infos(ids, &|id| self.cache.contains(id))
    }

    /// The ids of the resident merges with what they serve, sorted.
    pub fn resident_merges(&self) -> Vec<(String, Kind)> {
        let mut merges: Vec<(String, Kind)> = self
            .cache
            .entries()
            .into_iter()
            .filter(|(k, _)| k.starts_with("merge-"))
            .map(|(k, served)| (k, served.engine.kind()))
            .collect();
        merges.sort_by(|a, b| a.0.cmp(&b.0));
        merges
    }

    /// The resident model `key`, counting a hit, unless a checkpoint file it
    /// was made from changed since: then it is evicted and `None` returned.
    /// Once a checkpoint has been reopened (its files changed), every
    /// resident model made from the old files is evicted first.
    pub async fn resident(&self, key: &str) -> Option<Arc<Served>> {
        if self.registry.take_reopened() {
            self.evict_stale().await;
        }
        let mut stale = None;
        let served = self
            .cache
            .lookup_fresh(key, |s| {
                stale = s.stale();
                stale.is_none()
            })
            .await;
        if let Some((file, change)) = stale {
            tracing::info!(model = %key, file = %file.display(), change = %change,
                "resident model is stale (a checkpoint file changed); evicted");
            self.evict_stale().await;
        }
        // A merge held as a delta keeps what it shares (a combination's
        // task vectors, then its base) more recent than itself, so the
        // cache evicts the merges of a base before the base.
        if let Some(s) = &served {
            for key in &s.shared {
                self.cache.touch(key).await;
            }
        }
        served
    }

    /// Applies pending evictions and sets the cache's size gauges.
    pub async fn refresh_gauges(&self) {
        self.cache.refresh_gauges().await;
    }

    /// Cancels every pending and running merge and refuses new ones (the
    /// server is shutting down).
    pub fn cancel_all(&self) {
        self.merges.cancel_all();
    }

    /// Evicts every resident model made from checkpoint files that changed.
    async fn evict_stale(&self) {
        for key in self.cache.evict_where(|s| s.stale().is_some()).await {
            tracing::info!(model = %key, "resident model is stale (a checkpoint file changed); evicted");
        }
    }

    /// Starts loading `target` in a task of its own, so that the load goes
    /// on when the request that started it stops waiting; a 503 when the
    /// book of merges has no room for it.
    ///
    /// A merge held as a delta (`form` lowrank or sparse) first makes its
    /// pool's base resident (a cache entry of its own, weighed once however
    /// many merges share it), then builds its delta over it. A combination
    /// makes the base and the task vector of each checkpoint it combines
    /// resident (entries of their own, shared by every combination of
    /// them), then holds only its coefficients. A task view of a per-task
    /// retrieval merge (form masked) makes the base and the merge's unified
    /// vector resident (an entry shared by every task of the merge), then
    /// holds its mask's bits and its scale.
    fn start_load(&self, target: Target) -> Result<LoadTask> {
        let base = self.shared_base_of(&target)?;
        let vectors = match &base {
            Some(b) => task_vectors_of(&target, b),
            None => Vec::new(),
        };
        let unified = match (&base, &target) {
            (Some(b), Target::Merge(plan))
                if plan
                    .spec()
                    .residency
                    .as_ref()
                    .is_some_and(|r| r.is_masked()) =>
            {
                // Every task view of the merge shares one U, keyed without
                // the task.
                let key = format!(
                    "unified vector of merge-{} over {}",
                    plan.unified_id()?,
                    b.cache_key()
                );
                Some((key, self.registry.unified_plan(plan.spec().clone())?))
            }
            _ => None,
        };
        self.merges.pending(&target)?;
        let key = target.cache_key();
        let name = target.model_name();
        let merges = self.merges.clone();
        let cache = self.cache.clone();
        Ok(tokio::spawn(async move {
            let shared = async {
                Ok::<_, GatewayError>(match base {
                    None => None,
                    Some(base) => {
                        let Target::Checkpoint { checkpoint, .. } = &base else {
                            unreachable!("a pool's base is a checkpoint")
                        };
                        let checkpoint = checkpoint.clone();
                        let base_key = base.cache_key();
                        let (served, _) = cache
                            .load(base_key.clone(), merges.loader(base, None))
                            .await?;
                        let mut shared = SharedBase {
                            key: base_key,
                            served,
                            checkpoint,
                            vectors: Vec::with_capacity(vectors.len()),
                            unified: None,
                        };
                        if let Some((key, plan)) = unified {
                            let loader = merges.unified_loader(key.clone(), plan, &shared);
                            let (served, _) = cache.load(key.clone(), loader).await?;
                            shared.unified = Some(SharedVector {
                                key,
                                coefficient: 1.0,
                                served,
                            });
                        }
                        for v in vectors {
                            let loader =
                                merges.vector_loader(v.key.clone(), v.expert, &shared, v.residency);
                            let (served, _) = cache.load(v.key.clone(), loader).await?;
                            shared.vectors.push(SharedVector {
                                key: v.key,
                                coefficient: v.coefficient,
                                served,
                            });
                        }
                        Some(shared)
                    }
                })
            }
            .await;
            let shared = match shared {
                Ok(s) => s,
                Err(e) => {
                    merges.failed(&name, &e);
                    return Err(e);
                }
            };
            cache.load(key, merges.loader(target, shared)).await
        }))
    }

    /// The base a merge held as a delta is built over (its pool's base);
    /// `None` for every other target. A 400 when the base is not a text
    /// model, found before anything is merged.
    fn shared_base_of(&self, target: &Target) -> Result<Option<Target>> {
        let Target::Merge(plan) = target else {
            return Ok(None);
        };
        if !plan.spec().is_delta() {
            return Ok(None);
        }
        let pool =
            plan.spec().pool.as_deref().ok_or_else(|| {
                GatewayError::Internal("a resolved merge has no pool".to_string())
            })?;
        let base = self.registry.base_of(pool)?;
        if base.kind()? != Kind::Decoder {
            return Err(GatewayError::BadRequest {
                message: format!(
                    "form `{}` holds a merge as a delta over a text-generation base; pool `{pool}` \
                     serves embedding models, whose merges are held dense (drop `form`)",
                    plan.spec().residency.as_ref().map_or("dense", |r| r.form.as_str())
                ),
                param: Some("model".to_string()),
                code: "invalid_merge_spec",
            });
        }
        Ok(Some(base))
    }
}

/// A task vector a combination needs resident.
struct VectorTarget {
    key: String,
    coefficient: f64,
    expert: Arc<Checkpoint>,
    residency: Residency,
}

/// The task vectors of a merge held as a combination over the pool's base
/// `base` (empty for any other target): each checkpoint of the merge but
/// the base itself with a non-zero coefficient, keyed by the checkpoint,
/// the base and the form they are held in, so that every combination of
/// them shares one entry.
fn task_vectors_of(target: &Target, base: &Target) -> Vec<VectorTarget> {
    let (Target::Merge(plan), Target::Checkpoint { checkpoint: b, .. }) = (target, base) else {
        return Vec::new();
    };
    let Some(residency) = plan
        .spec()
        .residency
        .as_ref()
        .filter(|r| r.is_combination())
    else {
        return Vec::new();
    };
    let vectors = residency.vectors_residency();
    let base_key = base.cache_key();
    plan.combination()
        .unwrap_or_default()
        .into_iter()
        .filter(|(ck, c)| ck.dir() != b.dir() && *c != 0.0)
        .map(|(expert, coefficient)| {
            let fp = expert.fingerprint().unwrap_or("unfingerprinted");
            VectorTarget {
                key: format!(
                    "task vector of {}@{fp} over {base_key}, {}",
                    expert.dir().display(),
                    vectors.describe()
                ),
                coefficient,
                expert,
                residency: vectors.clone(),
            }
        })
        .collect()
}

/// The 404 of a merge the store does not know.
fn unknown_merge(id: &str) -> GatewayError {
    GatewayError::NotFound {
        message: format!("unknown merge `{id}`"),
        param: Some("id".to_string()),
    }
}

/// How long a client should wait before asking again for a merge still
/// running: the configured wait, between 1 and 30 seconds.
fn retry_after(max_wait: Duration) -> Duration {
    max_wait.clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// The kind of model a route serves, and its error for another kind.
struct Need<'a> {
    kind: Kind,
    route: &'a str,
    /// Where the model can be used instead.
    hint: &'static str,
    code: &'static str,
}

impl Need<'_> {
    /// The 400 for model `name`, which is of `kind`.
    fn refuse(&self, name: &str, kind: Kind) -> GatewayError {
        GatewayError::BadRequest {
            message: format!(
                "model `{name}` is {}: {} needs {} ({})",
                kind_phrase(kind),
                self.route,
                kind_phrase(self.kind),
                self.hint
            ),
            param: Some("model".to_string()),
            code: self.code,
        }
    }
}

/// "an embedding model", "an image model", "a text-generation model".
fn kind_phrase(kind: Kind) -> &'static str {
    match kind {
        Kind::Decoder => "a text-generation model",
        Kind::Encoder => "an embedding model",
        Kind::Vision => "an image model",
    }
}
