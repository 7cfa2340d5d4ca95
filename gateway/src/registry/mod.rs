//! The registry: pools of opened checkpoints and named presets, and the
//! resolution of a request's `model` (or `merge`) field to what serves it.
//!
//! Requests name registered checkpoints only, never paths. The `model` field
//! is, in this order:
//! 1. `merge-<id>`: a merge made earlier (by `POST /v1/merges` or by a request);
//! 2. a compact merge, `[pool/]method(a,b;key=value)`;
//! 3. a preset name;
//! 4. a checkpoint, `pool/name` or a bare `name` found in exactly one pool.
//!
//! Merge specs name checkpoints of one pool (bare, or `pool/name`); the
//! resolved spec carries the pool and bare names, so the same merge written
//! either way has one id. A method that needs a base and names none gets the
//! pool's base. Routed methods (`we_moe`, ...) resolve to a
//! [`RoutedPlan`] (see [`routed`]).
//!
//! Checkpoint files may change while the server runs. Every resolution
//! re-checks the checkpoints it uses (a `stat` per file) and reopens one
//! whose files changed (rehashing the changed weights), so a changed
//! checkpoint gets a new fingerprint and every merge of it a new id; one
//! that can no longer be read fails the requests that use it, naming the
//! file. The targets carry the [`Stamps`] of the files they were resolved
//! from, which the cache re-checks before it serves a resident model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use merger::merge::MergePlan;
use merger::plan::Plan;
use merger::spec::{compact, MergeSpec, Residency};
use runtime::architectures::{self, Kind};
use runtime::checkpoint::{Checkpoint, Stamps};

use crate::config::Config;
use crate::error::{GatewayError, Result};
use crate::limits::Limits;
use data_driven::DataPlan;
use routed::{Calibrations, RoutedPlan, RoutersInfo};

pub mod data_driven;
pub mod routed;

/// The name of a pool's base checkpoint (as in `pool.yaml`).
pub use evaluator::pool::BASE_NAME;

/// One registered checkpoint: its folder and the version opened last.
struct Slot {
    dir: PathBuf,
    current: Mutex<Arc<Checkpoint>>,
}

/// A base checkpoint with its experts, each opened once and reopened when
/// its files change.
pub struct Pool {
    name: String,
    /// What the pool's models serve (its base's architecture).
    kind: Kind,
    checkpoints: BTreeMap<String, Slot>,
    /// Set when a checkpoint of any pool was reopened (shared by the pools
    /// of a registry).
    reopened: Arc<AtomicBool>,
}

impl Pool {
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the pool's checkpoints and merges serve.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Names of the checkpoints (`base` and the experts), sorted.
    pub fn checkpoint_names(&self) -> impl Iterator<Item = &str> {
        self.checkpoints.keys().map(String::as_str)
    }

    /// Whether `name` is a checkpoint of the pool.
    pub fn contains(&self, name: &str) -> bool {
        self.checkpoints.contains_key(name)
    }

    /// The folder of checkpoint `name`.
    pub fn dir(&self, name: &str) -> Option<&Path> {
        self.checkpoints.get(name).map(|s| s.dir.as_path())
    }

    /// Checkpoint `name` as its files are now (`None`: not in the pool).
    /// Costs a `stat` per file; a checkpoint whose files changed since it
    /// was opened is opened again (and its weights rehashed), and one that
    /// cannot be is an error naming the file, until it can.
    pub fn checkpoint(&self, name: &str) -> Option<Result<Arc<Checkpoint>>> {
        let slot = self.checkpoints.get(name)?;
        let mut current = slot.current.lock().unwrap_or_else(|p| p.into_inner());
        let Some((file, change)) = current.changed() else {
            return Some(Ok(current.clone()));
        };
        self.reopened.store(true, Ordering::SeqCst);
        tracing::info!(pool = %self.name, checkpoint = %name, file = %file.display(),
            change = %change, "checkpoint changed on disk; reopening it");
        let reopened = Checkpoint::open(name, &slot.dir).and_then(|ck| {
            ck.fingerprint()?;
            Ok(ck)
        });
        Some(match reopened {
            Ok(ck) => {
                *current = ck.clone();
                Ok(ck)
            }
            Err(e) => {
                tracing::warn!(pool = %self.name, checkpoint = %name, error = %e,
                    "changed checkpoint cannot be read");
                let status = GatewayError::from(e);
                let message = format!(
                    "checkpoint `{}/{name}` changed on disk ({}: {change}) and cannot be read: {status}",
                    self.name,
                    file.display()
                );
                Err(match status {
                    GatewayError::NotFound { param, .. } => {
                        GatewayError::NotFound { message, param }
                    }
                    _ => GatewayError::Internal(message),
                })
            }
        })
    }

    fn names(&self) -> String {
        self.checkpoints
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What a request's model resolves to.
pub enum Target {
    /// A registered checkpoint, served as it is.
    Checkpoint {
        /// Its pool.
        pool: String,
        /// Its name in the pool.
        name: String,
        /// The opened checkpoint.
        checkpoint: Arc<Checkpoint>,
    },
    /// A validated merge.
    Merge(Box<MergePlan>),
    /// A validated data-driven merge (`fisher_merging`, `regmean`, ...).
    DataDriven(Box<DataPlan>),
    /// A validated routed merge (`we_moe`, `sparse_we_moe`, `rankone_moe`).
    Routed(Box<RoutedPlan>),
}

impl Target {
    /// What the target serves: a routed ensemble is a decoder; a
    /// checkpoint or a merge is what its (reference) config.json declares.
    pub fn kind(&self) -> Result<Kind> {
        let dir = match self {
            Target::Checkpoint { checkpoint, .. } => checkpoint.dir(),
            Target::Merge(plan) => plan.reference().dir(),
            Target::DataDriven(plan) => plan.reference().dir(),
            Target::Routed(_) => return Ok(Kind::Decoder),
        };
        Ok(architectures::of_dir(dir)?.kind)
    }

    /// The cache key and public model name: `merge-<id>` or `pool/name`.
    pub fn model_name(&self) -> String {
        match self {
            Target::Checkpoint { pool, name, .. } => format!("{pool}/{name}"),
            Target::Merge(plan) => format!("merge-{}", plan.id()),
            Target::DataDriven(plan) => format!("merge-{}", plan.id()),
            Target::Routed(plan) => format!("merge-{}", plan.id()),
        }
    }

    /// The key of its resident model: the model name, and for a checkpoint
    /// its fingerprint too (merge ids already hash them), so that a request
    /// for changed weights never joins a load of the old ones.
    pub fn cache_key(&self) -> String {
        match self {
            Target::Checkpoint {
                pool,
                name,
                checkpoint,
            } => match checkpoint.fingerprint() {
                Ok(fp) => format!("{pool}/{name}@{fp}"),
                Err(_) => format!("{pool}/{name}"),
            },
            _ => self.model_name(),
        }
    }

    /// The files the target was resolved from, one [`Stamps`] per checkpoint:
    /// what a resident model of it must still match to be served.
    pub fn sources(&self) -> Vec<Stamps> {
        match self {
            Target::Checkpoint { checkpoint, .. } => vec![checkpoint.stamps().clone()],
            Target::Merge(plan) => plan.checkpoints().map(|c| c.stamps().clone()).collect(),
            Target::DataDriven(plan) => plan.sources(),
            Target::Routed(plan) => plan.sources(),
        }
    }

    /// What the book of merges records of a merge (None for a checkpoint).
    pub fn book_entry(&self) -> Option<BookEntry> {
        match self {
            Target::Checkpoint { .. } => None,
            Target::Merge(plan) => Some(BookEntry {
                spec: plan.spec().clone(),
                method: plan.info().name,
                output_bytes: Some(plan.output_bytes()),
                routers: None,
            }),
            Target::DataDriven(plan) => Some(BookEntry {
                spec: plan.spec().clone(),
                method: plan.method(),
                output_bytes: None,
                routers: None,
            }),
            Target::Routed(plan) => Some(BookEntry {
                spec: plan.spec().clone(),
                method: plan.method(),
                output_bytes: None,
                routers: Some(plan.routers().clone()),
            }),
        }
    }

    /// Whether this is a merge (plain or routed), not a checkpoint.
    pub fn is_merge(&self) -> bool {
        !matches!(self, Target::Checkpoint { .. })
    }
}

/// What a resolved merge tells the book before it runs.
pub struct BookEntry {
    /// The resolved spec.
    pub spec: MergeSpec,
    /// The method's canonical name.
    pub method: &'static str,
    /// Bytes of the merged tensors as stored, when known before the merge.
    pub output_bytes: Option<u64>,
    /// The routers of a routed merge.
    pub routers: Option<RoutersInfo>,
}

/// Kinds of entries of `GET /v1/models`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A registered checkpoint.
    Checkpoint,
    /// A configured preset.
    Preset,
}

/// Pools and presets.
pub struct Registry {
    pools: BTreeMap<String, Pool>,
    /// The configured presets, then those registered at run time (a
    /// search's best spec).
    presets: std::sync::RwLock<BTreeMap<String, MergeSpec>>,
    /// The names the configuration gives (never replaced at run time).
    configured: std::collections::BTreeSet<String>,
    limits: Limits,
    calibrations: Calibrations,
    stats: merger::data_driven::StatsCache,
    reopened: Arc<AtomicBool>,
}

impl Registry {
    /// Opens every checkpoint of the configuration (failing naming the
    /// first folder that cannot be opened) and reads the calibration inputs
    /// of routed merges.
    pub fn open(config: &Config) -> Result<Self> {
        if config.pools.is_empty() {
            return Err(GatewayError::Startup(
                "no pool configured: add `pools` to the configuration, or give none to serve the demo pool"
                    .to_string(),
            ));
        }
        let mut pools = BTreeMap::new();
        let reopened = Arc::new(AtomicBool::new(false));
        for (pool_name, pool) in &config.pools {
            let mut checkpoints = BTreeMap::new();
            let entries = std::iter::once((BASE_NAME, &pool.base))
                .chain(pool.experts.iter().map(|(k, v)| (k.as_str(), v)));
            for (name, dir) in entries {
                // The weights are hashed now, so that requests find the
                // fingerprints ready.
                let ck = Checkpoint::open(name, dir)
                    .and_then(|ck| {
                        ck.fingerprint()?;
                        Ok(ck)
                    })
                    .map_err(|e| {
                        GatewayError::Startup(format!(
                            "pool `{pool_name}`, checkpoint `{name}`: {e}"
                        ))
                    })?;
                checkpoints.insert(
                    name.to_string(),
                    Slot {
                        dir: dir.clone(),
                        current: Mutex::new(ck),
                    },
                );
            }
            let kind = architectures::of_dir(&pool.base)
                .map_err(|e| GatewayError::Startup(format!("pool `{pool_name}`, base: {e}")))?
                .kind;
            pools.insert(
                pool_name.clone(),
                Pool {
                    name: pool_name.clone(),
                    kind,
                    checkpoints,
                    reopened: reopened.clone(),
                },
            );
        }
        let presets: BTreeMap<String, MergeSpec> = config
            .presets
            .iter()
            .map(|(name, p)| Ok((name.clone(), p.to_spec(name)?)))
            .collect::<Result<_>>()?;
        let configured = presets.keys().cloned().collect();
        let calibrations = Calibrations::load(config, &pools)?;
        let stats_dir = match &config.server.data_dir {
            Some(d) => d.join("stats"),
            None => runtime::cache::cache_dir().join("stats"),
        };
        Ok(Registry {
            pools,
            presets: std::sync::RwLock::new(presets),
            configured,
            limits: Limits::new(config.server.limits.clone()),
            calibrations,
            stats: merger::data_driven::StatsCache::new(stats_dir, config.cache.max_stats_bytes),
            reopened,
        })
    }

    /// Whether a checkpoint was reopened (its files changed) since the last
    /// call: resident models made from the old version are then stale.
    pub fn take_reopened(&self) -> bool {
        self.reopened.swap(false, Ordering::SeqCst)
    }

    /// The statistics cache of data-driven merges.
    pub fn stats(&self) -> &merger::data_driven::StatsCache {
        &self.stats
    }

    /// The pools by name.
    pub fn pools(&self) -> &BTreeMap<String, Pool> {
        &self.pools
    }

    /// The presets by name (configured and registered).
    pub fn presets(&self) -> BTreeMap<String, MergeSpec> {
        self.presets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Registers (or replaces) preset `name` as `spec`, validated as a
    /// request's merge would be. A configured preset or a checkpoint's name
    /// is never replaced (409), and a name must be a plain word (400).
    pub fn register_preset(&self, name: &str, spec: MergeSpec) -> Result<()> {
        let word = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !word || name.starts_with("merge-") {
            return Err(GatewayError::bad_param(
                "preset",
                format!(
                    "`{name}`: a preset name is 1 to 64 letters, digits, `-`, `_` or `.`, \
                     not starting with `merge-`"
                ),
            ));
        }
        if self.configured.contains(name) || self.pools.values().any(|p| p.contains(name)) {
            return Err(GatewayError::Conflict(format!(
                "`{name}` is a configured preset or a checkpoint; choose another preset name"
            )));
        }
        self.plan(spec.clone())?;
        self.presets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), spec);
        Ok(())
    }

    /// The request limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Every checkpoint (`pool/name`) and preset, for `GET /v1/models`.
    pub fn models(&self) -> Vec<(String, ModelKind, Kind)> {
        let mut out: Vec<(String, ModelKind, Kind)> = self
            .pools
            .values()
            .flat_map(|p| {
                p.checkpoints
                    .keys()
                    .map(move |n| (format!("{}/{n}", p.name), ModelKind::Checkpoint, p.kind))
            })
            .collect();
        out.extend(self.presets().iter().map(|(n, spec)| {
            let kind = if merger::moe::MoeMethod::from_name(&spec.method).is_some() {
                Kind::Decoder
            } else {
                self.pool_of(spec)
                    .ok()
                    .and_then(|p| self.pools.get(&p))
                    .map_or(Kind::Decoder, |p| p.kind)
            };
            (n.clone(), ModelKind::Preset, kind)
        }));
        out
    }

    /// Resolves a `model` field. `merge_spec` returns the spec of a known
    /// `merge-<id>`.
    pub fn resolve_model(
        &self,
        model: &str,
        merge_spec: &dyn Fn(&str) -> Option<MergeSpec>,
    ) -> Result<Target> {
        self.limits.check_spec_len(model)?;
        let parsed = compact::parse(model).map_err(|e| GatewayError::BadRequest {
            message: e.to_string(),
            param: Some("model".to_string()),
            code: "invalid_merge_spec",
        })?;
        match parsed {
            compact::Parsed::Merge(spec) => self.plan(*spec).map_err(|e| match e {
                GatewayError::TooLarge { .. } => e.with_param("model"),
                e => e,
            }),
            compact::Parsed::MergeId(id) => {
                let spec = merge_spec(&id).ok_or_else(|| {
                    GatewayError::model_not_found(format!(
                        "unknown merge `{id}`; create it with POST /v1/merges or name the merge itself"
                    ))
                })?;
                let target = self.plan(spec)?;
                let now = target.model_name();
                if now != id {
                    return Err(GatewayError::Conflict(format!(
                        "`{id}` was made from checkpoints (or calibration inputs) that have changed since; it is now {now}"
                    )));
                }
                Ok(target)
            }
            compact::Parsed::Name(name) => {
                let preset = self
                    .presets
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&name)
                    .cloned();
                if let Some(spec) = preset {
                    return self.plan(spec);
                }
                let (pool, ck_name, ck) = self.checkpoint(&name, None)?;
                Ok(Target::Checkpoint {
                    pool: pool.to_string(),
                    name: ck_name,
                    checkpoint: ck,
                })
            }
        }
    }

    /// Validates a structured merge spec (a request's `merge` field, or
    /// `POST /v1/merges`) into a merge target.
    pub fn resolve_spec(&self, spec: MergeSpec) -> Result<Target> {
        self.limits.check_structured(&spec, "merge")?;
        self.plan(spec).map_err(|e| match e {
            GatewayError::TooLarge { .. } => e.with_param("merge"),
            e => e,
        })
    }

    /// The base checkpoint of pool `pool` as a target: what every merge of
    /// the pool held as a delta shares.
    pub fn base_of(&self, pool: &str) -> Result<Target> {
        let (pool, name, checkpoint) = self.checkpoint(BASE_NAME, Some(pool))?;
        Ok(Target::Checkpoint {
            pool: pool.to_string(),
            name,
            checkpoint,
        })
    }

    /// Finds a checkpoint by `pool/name` or bare name; `pool` restricts the
    /// search to one pool.
    fn checkpoint(
        &self,
        name: &str,
        pool: Option<&str>,
    ) -> Result<(&str, String, Arc<Checkpoint>)> {
        let (pool, bare) = match name.split_once('/') {
            Some((p, n)) => {
                if let Some(want) = pool {
                    if want != p {
                        return Err(GatewayError::bad_param(
                            "model",
                            format!("checkpoint `{name}` is not in pool `{want}`: a merge uses one pool"),
                        ));
                    }
                }
                (Some(p), n)
            }
            None => (pool, name),
        };
        if let Some(p) = pool {
            let found = self.pool(p)?;
            let ck = found.checkpoint(bare).ok_or_else(|| {
                GatewayError::model_not_found(format!(
                    "unknown checkpoint `{bare}` in pool `{p}` ({})",
                    found.names()
                ))
            })??;
            return Ok((found.name.as_str(), bare.to_string(), ck));
        }
        let hits: Vec<&Pool> = self
            .pools
            .values()
            .filter(|p| p.checkpoints.contains_key(bare))
            .collect();
        match hits.as_slice() {
            [one] => Ok((
                one.name.as_str(),
                bare.to_string(),
                one.checkpoint(bare).expect("the pool holds it")?,
            )),
            [] => Err(GatewayError::model_not_found(format!(
                "unknown model `{name}`: not a preset ({}) nor a checkpoint ({}); \
                 a merge looks like `ties_merging(a,b;density=0.2)`",
                self.presets()
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                self.models()
                    .into_iter()
                    .filter(|(_, k, _)| *k == ModelKind::Checkpoint)
                    .map(|(n, _, _)| n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            many => Err(GatewayError::bad_param(
                "model",
                format!(
                    "`{bare}` is in several pools ({}); write `pool/{bare}`",
                    many.iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// The plan a task view's unified vector is computed with: the view's
    /// own spec, planned again (the unified vector does not depend on the
    /// task).
    pub fn unified_plan(&self, spec: MergeSpec) -> Result<MergePlan> {
        match self.plan(spec)? {
            Target::Merge(plan) => Ok(*plan),
            _ => Err(GatewayError::Internal(
                "a task view's spec planned as another kind of merge".into(),
            )),
        }
    }

    /// Puts a spec in one pool with bare names, fills the base, validates it
    /// against the opened checkpoints. A per-task retrieval merge over a
    /// text-generation base with no form given is held `masked` (its task
    /// view as bits over the merge's unified vector).
    fn plan(&self, mut spec: MergeSpec) -> Result<Target> {
        self.limits.check_experts(&spec)?;
        let pool_name = self.pool_of(&spec)?;
        let pool = self.pool(&pool_name)?;
        let bare = |n: &str| n.split_once('/').map_or(n, |(_, b)| b).to_string();
        let mut opened: BTreeMap<String, Arc<Checkpoint>> = BTreeMap::new();
        for name in spec.checkpoint_names() {
            let (_, bare_name, ck) = self.checkpoint(name, Some(&pool_name))?;
            opened.insert(bare_name, ck);
        }
        spec.base = spec.base.as_deref().map(bare);
        for m in &mut spec.models {
            m.name = bare(&m.name);
        }
        spec.pool = Some(pool_name.clone());
        if spec.base.is_none() {
            if let Ok(info) = merger::methods::lookup(&spec.method) {
                if info.needs_base() {
                    spec.base = Some(BASE_NAME.to_string());
                }
            }
        }
        let plan = match Plan::with_bounds(spec, &self.limits.bounds())? {
            Plan::Routed(routed) => {
                let spec = routed.into_spec();
                let plan = RoutedPlan::new(spec, pool, &self.limits, &self.calibrations)?;
                return Ok(Target::Routed(Box::new(plan)));
            }
            Plan::DataDriven(data) => {
                let plan = DataPlan::new(data, pool, &self.calibrations, &self.stats)?;
                return Ok(Target::DataDriven(Box::new(plan)));
            }
            Plan::Tensorwise(plan) => plan,
        };
        let plan = if plan.spec().residency.is_none()
            && plan.is_retrieval()
            && self.base_of(&pool_name)?.kind()? == Kind::Decoder
        {
            let spec = plan.into_spec().held_as(Residency::masked());
            match Plan::with_bounds(spec, &self.limits.bounds())? {
                Plan::Tensorwise(plan) => plan,
                _ => unreachable!("a tensor-wise spec stays tensor-wise"),
            }
        } else {
            plan
        };
        // The checkpoints checked above (the base filled in is checked here).
        if let Some(base) = &plan.spec().base {
            if !opened.contains_key(base) {
                let (_, bare_name, ck) = self.checkpoint(base, Some(&pool_name))?;
                opened.insert(bare_name, ck);
            }
        }
        let open = |name: &str| -> merger::Result<Arc<Checkpoint>> {
            opened
                .get(name)
                .cloned()
                .ok_or_else(|| runtime::RuntimeError::MissingCheckpoint(name.into()).into())
        };
        Ok(Target::Merge(Box::new(plan.open(&open)?)))
    }

    /// The pool named `name`, or a 404 listing the pools.
    fn pool(&self, name: &str) -> Result<&Pool> {
        self.pools.get(name).ok_or_else(|| {
            GatewayError::model_not_found(format!(
                "unknown pool `{name}`; pools: {}",
                self.pools.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// The pool a spec's checkpoints belong to (an existing one).
    fn pool_of(&self, spec: &MergeSpec) -> Result<String> {
        if let Some(p) = &spec.pool {
            return Ok(self.pool(p)?.name.clone());
        }
        let names = spec.checkpoint_names();
        if let Some(q) = names.iter().find_map(|n| n.split_once('/').map(|(p, _)| p)) {
            return Ok(self.pool(q)?.name.clone());
        }
        if self.pools.len() == 1 {
            return Ok(self.pools.keys().next().expect("one pool").clone());
        }
        let fits: Vec<&String> = self
            .pools
            .iter()
            .filter(|(_, p)| names.iter().all(|n| p.checkpoints.contains_key(*n)))
            .map(|(k, _)| k)
            .collect();
        match fits.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(GatewayError::model_not_found(format!(
                "no pool holds every checkpoint of the merge ({})",
                names.join(", ")
            ))),
            many => Err(GatewayError::bad_param(
                "model",
                format!(
                    "the merge fits several pools ({}); prefix it with `pool/`",
                    many.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
}
