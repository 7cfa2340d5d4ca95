//! The gateway's configuration: one YAML file, every key overridable from the
//! environment.
//!
//! ```yaml
//! server:
//!   bind: 127.0.0.1:8080
//!   api_keys: [sk-user-1]        # empty: no auth on the OpenAI routes
//!   admin_keys: [sk-admin]       # for /v1/merges and /v1/evaluations
//!   log_format: text             # text | json
//!   shutdown_timeout: 30s
//!   limits: {max_body_bytes: 1MiB, max_tokens: 1024, max_experts: 8,
//!            max_spec_len: 2048, max_concurrent_generations: 2, queue_depth: 64,
//!            max_batch_tokens: 512, max_running_sequences: 16,
//!            kv_cache_bytes: 1GiB, kv_block_tokens: 16,
//!            max_router_steps: 1000, max_iterations: 1000, max_batch_size: 64,
//!            max_rank: 256, max_list_len: 256, max_book_bytes: 16MiB,
//!            max_evaluations: 64, max_calibration_samples: 1024}
//! device: auto                   # auto | cpu | cuda:N
//! cache: {max_bytes: 4GB, max_stats_bytes: 2GiB}
//! merge: {max_concurrent: 1, max_wait: 30s}
//! pools:
//!   demo: {base: models/base, experts: {math: models/math, code: models/code}}
//! presets:
//!   math-code: ties_merging(math,code;density=0.2)
//! taskpools: {demo: tasks}
//! evaluations:                  # see crate::evaluations
//!   - {merge: math-code, taskpool: demo, every: 1h, limit: 100, min_score: 0.5}
//! ```
//!
//! Relative paths are relative to the config file's folder. Sizes take `B`,
//! `KB`, `MB`, `GB`, `KiB`, `MiB`, `GiB` or a plain byte count; durations are
//! humantime strings (`500ms`, `30s`, `1h`) or seconds.
//!
//! Environment overrides ([`apply_env`]): `FUSION_<SECTION>__<KEY>[__<KEY>…]`,
//! segments separated by a double underscore and lower-cased, the value read
//! as a YAML scalar or flow collection: `FUSION_SERVER__BIND=0.0.0.0:9000`,
//! `FUSION_SERVER__LIMITS__MAX_TOKENS=512`, `FUSION_CACHE__MAX_BYTES=2GB`,
//! `FUSION_SERVER__API_KEYS=[k1,k2]`, `FUSION_DEVICE=cpu`,
//! `FUSION_POOLS__DEMO__BASE=/models/base`, `FUSION_EVALUATIONS__0__EVERY=2h`
//! (a number indexes a list). Only variables whose first segment is a section
//! name are overrides; `FUSION_DEMO_DIR` and the like are left alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use evaluator::pool::BASE_NAME;
use merger::spec::{compact, MergeSpec};
use serde::{Deserialize, Deserializer};
use serde_yaml_ng::Value;

use crate::error::{GatewayError, Result};

pub mod env;

pub use env::{apply_env, ENV_PREFIX, ENV_SEPARATOR, SECTIONS};

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP server, keys and limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where merges and generations run: `auto`, `cpu` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// The merged-model cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Merge execution.
    #[serde(default)]
    pub merge: MergeConfig,
    /// Checkpoint pools by name.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
    /// Named merges.
    #[serde(default)]
    pub presets: BTreeMap<String, PresetSpec>,
    /// Task pools (folders of JSONL tasks) by name.
    #[serde(default)]
    pub taskpools: BTreeMap<String, PathBuf>,
    /// Scheduled evaluations (run by the evaluator; parsed and checked here).
    #[serde(default)]
    pub evaluations: Vec<EvaluationConfig>,
}

/// `server:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on (`host:port`; port 0 picks a free one).
    #[serde(default = "default_bind")]
    pub bind: String,
    /// Bearer keys of the OpenAI routes (a list, or one comma-separated
    /// string); empty means no authentication.
    #[serde(default, deserialize_with = "string_list")]
    pub api_keys: Vec<String>,
    /// Bearer keys of the merges and evaluations APIs (also valid on the
    /// OpenAI routes). Empty: those APIs follow `api_keys`.
    #[serde(default, deserialize_with = "string_list")]
    pub admin_keys: Vec<String>,
    /// Log format on stderr.
    #[serde(default)]
    pub log_format: LogFormat,
    /// How long in-flight requests may run after SIGTERM.
    #[serde(default = "default_shutdown", deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// HTTP worker threads (default: the number of CPUs).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Request limits and admission.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Folder of the server's own files (evaluation results). Default:
    /// `$FUSION_DATA_DIR`, else `./fusion-data`.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Chat message content is encoded as plain text (true, the default:
    /// `<|assistant|>` or `</s>` written by a client are characters, so only
    /// the chat template inserts special tokens), or with special-token
    /// markers parsed (false: the Hugging Face tokenizers default).
    #[serde(default = "default_true")]
    pub split_special_tokens: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `server.limits:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body.
    #[serde(default = "default_body", deserialize_with = "bytes")]
    pub max_body_bytes: u64,
    /// Largest `max_tokens` a request may ask for (also the default).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// Most experts in one merge.
    #[serde(default = "default_max_experts")]
    pub max_experts: usize,
    /// Longest compact merge string (characters).
    #[serde(default = "default_max_spec_len")]
    pub max_spec_len: usize,
    /// Unbatched work running at once: embeddings, and generations of
    /// models that keep per-sequence state (routed merges). Generations of
    /// every other text model share the batching scheduler's bounds below.
    #[serde(default = "default_generations")]
    pub max_concurrent_generations: usize,
    /// Tokens of one batched forward pass (decode tokens of the running
    /// sequences and prefill chunks of new ones); at least
    /// `max_running_sequences`.
    #[serde(default = "default_max_batch_tokens")]
    pub max_batch_tokens: usize,
    /// Sequences in one model's running batch; more wait in the queue.
    #[serde(default = "default_max_running_sequences")]
    pub max_running_sequences: usize,
    /// Bytes of key/value cache blocks of every resident model's batch
    /// together: a request joins only when its prompt and `max_tokens` fit
    /// beside the running sequences' reservations; one that could never
    /// fit is a 400.
    #[serde(default = "default_kv_cache_bytes", deserialize_with = "bytes")]
    pub kv_cache_bytes: u64,
    /// Positions per key/value block.
    #[serde(default = "default_kv_block_tokens")]
    pub kv_block_tokens: usize,
    /// Requests that may wait for a generation slot or a place in a batch;
    /// past it, 429.
    #[serde(default = "default_queue")]
    pub queue_depth: usize,
    /// Most router training steps (`steps`) one routed merge (`we_moe`, ...)
    /// may ask for; 0 allows only untrained or checkpointed routers.
    #[serde(default = "default_max_router_steps")]
    pub max_router_steps: usize,
    /// Most optimiser iterations per tensor a merge may ask for (WUDI's
    /// `iterations`).
    #[serde(default = "default_max_iterations")]
    pub max_iterations: u64,
    /// Largest router training batch (`batch_size` of a routed merge).
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: u64,
    /// Most calibration inputs per expert (`num_samples`) a data-driven
    /// merge (`fisher_merging`, `regmean`, ...) may ask for.
    #[serde(default = "default_max_calibration_samples")]
    pub max_calibration_samples: u64,
    /// Largest rank a merge may ask for (`rank_k` of `rankone_moe`).
    #[serde(default = "default_max_rank")]
    pub max_rank: u64,
    /// Most entries in one list of a merge spec (gradient and filter lists)
    /// and in a request's `tasks`.
    #[serde(default = "default_max_list_len")]
    pub max_list_len: usize,
    /// Bytes of specs and states the book of merges keeps; past it the
    /// oldest finished merges are forgotten.
    #[serde(default = "default_max_book_bytes", deserialize_with = "bytes")]
    pub max_book_bytes: u64,
    /// One-off evaluations (`POST /v1/evaluations` with a `merge`) kept,
    /// with their results and metric series; past it the oldest idle one
    /// is forgotten.
    #[serde(default = "default_max_evaluations")]
    pub max_evaluations: usize,
    /// Most evaluations (merge and score) one search (`POST /v1/searches`)
    /// may spend; 0 turns searches off. One search runs at a time.
    #[serde(default = "default_max_search_evaluations")]
    pub max_search_evaluations: usize,
    /// Candidates a search merges and scores at once (each holds a merged
    /// model in memory).
    #[serde(default = "default_max_search_jobs")]
    pub max_search_jobs: usize,
}

/// `cache:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of resident models (merged or loaded checkpoints) kept.
    #[serde(default = "default_cache_bytes", deserialize_with = "bytes")]
    pub max_bytes: u64,
    /// Bytes of calibration statistics (Fisher diagonals, Gram matrices)
    /// kept on disk under `<server.data_dir>/stats` (default: the cache
    /// folder's `stats`); past it the least recently used are evicted.
    #[serde(default = "default_max_stats_bytes", deserialize_with = "bytes")]
    pub max_stats_bytes: u64,
}

/// `merge:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    /// Merges running at once.
    #[serde(default = "default_merges")]
    pub max_concurrent: usize,
    /// How long a request waits for its merge before a 503 (the merge goes on).
    #[serde(default = "default_max_wait", deserialize_with = "duration")]
    pub max_wait: Duration,
}

/// One pool: a base checkpoint and its fine-tuned experts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The base checkpoint folder (registered as `base`).
    pub base: PathBuf,
    /// Expert checkpoint folders by name.
    #[serde(default)]
    pub experts: BTreeMap<String, PathBuf>,
    /// The `taskpools` entry whose inputs train the routers of this pool's
    /// routed merges (`we_moe`, ...). Default: the task pool of the same
    /// name, else the only configured one.
    #[serde(default)]
    pub calibration: Option<String>,
}

/// A preset: a compact merge string or a structured spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PresetSpec {
    /// `ties_merging(math,code;density=0.2)`.
    Compact(String),
    /// `{method, models, parameters, ...}`.
    Structured(Box<MergeSpec>),
}

impl PresetSpec {
    /// The merge spec of the preset.
    pub fn to_spec(&self, name: &str) -> Result<MergeSpec> {
        match self {
            PresetSpec::Structured(spec) => Ok((**spec).clone()),
            PresetSpec::Compact(text) => match compact::parse(text) {
                Ok(compact::Parsed::Merge(spec)) => Ok(*spec),
                Ok(_) => Err(config_error(
                    format!("presets.{name}"),
                    format!("`{text}` is not a merge such as `ties_merging(a,b;density=0.2)`"),
                )),
                Err(e) => Err(config_error(format!("presets.{name}"), e.to_string())),
            },
        }
    }
}

/// One scheduled evaluation (run by [`crate::evaluations`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationConfig {
    /// Its name: the `merge` label of its metrics and its key in
    /// `/v1/evaluations` (default: the `merge` string).
    #[serde(default)]
    pub name: Option<String>,
    /// What to evaluate: a preset, a checkpoint, a compact merge or `merge-<id>`.
    pub merge: String,
    /// The task pool: a key of `taskpools`, or a task pool folder.
    pub taskpool: String,
    /// Only these tasks of the pool (default: all).
    #[serde(default)]
    pub tasks: Vec<String>,
    /// Period of the schedule.
    #[serde(deserialize_with = "duration")]
    pub every: Duration,
    /// Wait after the server starts before the first run (when no result on
    /// disk is younger than `every`).
    #[serde(default = "default_eval_delay", deserialize_with = "duration")]
    pub delay: Duration,
    /// Examples per task (default: all).
    #[serde(default)]
    pub limit: Option<usize>,
    /// A task whose headline score (a fraction: accuracy, exact match) is
    /// under this value marks the merge degraded.
    #[serde(default)]
    pub min_score: Option<f64>,
    /// Whether `/health/ready` fails (503) while this evaluation is degraded.
    #[serde(default)]
    pub fail_readiness: bool,
}

impl EvaluationConfig {
    /// The name: `name`, else the `merge` string.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.merge)
    }
}

fn default_eval_delay() -> Duration {
    Duration::from_secs(30)
}
fn default_device() -> String {
    "auto".to_string()
}
fn default_bind() -> String {
    "127.0.0.1:8080".to_string()
}
fn default_true() -> bool {
    true
}
fn default_shutdown() -> Duration {
    Duration::from_secs(30)
}
fn default_body() -> u64 {
    1 << 20
}
fn default_max_tokens() -> usize {
    1024
}
fn default_max_experts() -> usize {
    8
}
fn default_max_spec_len() -> usize {
    2048
}
fn default_generations() -> usize {
    2
}
fn default_max_batch_tokens() -> usize {
    512
}
fn default_max_running_sequences() -> usize {
    16
}
fn default_kv_cache_bytes() -> u64 {
    1 << 30
}
fn default_kv_block_tokens() -> usize {
    16
}
fn default_queue() -> usize {
    64
}
fn default_max_router_steps() -> usize {
    1000
}
fn default_max_iterations() -> u64 {
    1000
}
fn default_max_batch_size() -> u64 {
    64
}
fn default_max_calibration_samples() -> u64 {
    1024
}
fn default_max_stats_bytes() -> u64 {
    2 << 30
}
fn default_max_rank() -> u64 {
    256
}
fn default_max_list_len() -> usize {
    256
}
fn default_max_book_bytes() -> u64 {
    16 << 20
}
fn default_max_evaluations() -> usize {
    64
}
fn default_max_search_evaluations() -> usize {
    200
}
fn default_max_search_jobs() -> usize {
    2
}
fn default_cache_bytes() -> u64 {
    4_000_000_000
}
fn default_merges() -> usize {
    1
}
fn default_max_wait() -> Duration {
    Duration::from_secs(30)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: default_bind(),
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            log_format: LogFormat::default(),
            shutdown_timeout: default_shutdown(),
            workers: None,
            limits: LimitsConfig::default(),
            data_dir: None,
            split_special_tokens: true,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: default_body(),
            max_tokens: default_max_tokens(),
            max_experts: default_max_experts(),
            max_spec_len: default_max_spec_len(),
            max_concurrent_generations: default_generations(),
            max_batch_tokens: default_max_batch_tokens(),
            max_running_sequences: default_max_running_sequences(),
            kv_cache_bytes: default_kv_cache_bytes(),
            kv_block_tokens: default_kv_block_tokens(),
            queue_depth: default_queue(),
            max_router_steps: default_max_router_steps(),
            max_iterations: default_max_iterations(),
            max_batch_size: default_max_batch_size(),
            max_calibration_samples: default_max_calibration_samples(),
            max_rank: default_max_rank(),
            max_list_len: default_max_list_len(),
            max_book_bytes: default_max_book_bytes(),
            max_evaluations: default_max_evaluations(),
            max_search_evaluations: default_max_search_evaluations(),
            max_search_jobs: default_max_search_jobs(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: default_cache_bytes(),
            max_stats_bytes: default_max_stats_bytes(),
        }
    }
}

impl Default for MergeConfig {
    fn default() -> Self {
        MergeConfig {
            max_concurrent: default_merges(),
            max_wait: default_max_wait(),
        }
    }
}

pub(crate) fn config_error(origin: impl Into<String>, reason: impl Into<String>) -> GatewayError {
    GatewayError::Config {
        origin: origin.into(),
        reason: reason.into(),
    }
}

/// A size or a duration, as written in YAML: a number or a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(f64),
    Text(String),
}

/// A list of strings, or one comma-separated string (what a Kubernetes
/// Secret in an environment variable gives).
fn string_list<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrText {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Option::<ListOrText>::deserialize(d)? {
        None => Vec::new(),
        Some(ListOrText::List(v)) => v,
        Some(ListOrText::Text(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

fn bytes<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(x) if x.is_finite() && x >= 1.0 => Ok(x as u64),
        NumberOrText::Number(x) => Err(serde::de::Error::custom(format!(
            "size {x} must be at least 1 byte"
        ))),
        NumberOrText::Text(s) => parse_bytes(&s).map_err(serde::de::Error::custom),
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(x) if x.is_finite() && x >= 0.0 => Ok(Duration::from_secs_f64(x)),
        NumberOrText::Number(x) => Err(serde::de::Error::custom(format!(
            "duration {x} must be a non-negative number of seconds"
        ))),
        NumberOrText::Text(s) => humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration such as 30s, 500ms, 1h: {e}"
            ))
        }),
    }
}

/// Parses a size: `4GB`, `512MiB`, `1000` (bytes).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 4GB, 512MiB, 1000000)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (use B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = x * mult;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("size `{s}` must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl Config {
    /// Reads `path`, applies the process's `FUSION_…` overrides, resolves
    /// relative paths against the file's folder and validates.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| config_error(path.display().to_string(), format!("cannot read: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::from_yaml(&text, &path.display().to_string(), dir, std::env::vars())
    }

    /// Parses YAML `text` (named `origin` in errors), applies overrides from
    /// `env`, resolves relative paths against `dir` and validates.
    pub fn from_yaml(
        text: &str,
        origin: &str,
        dir: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let mut doc: Value = if text.trim().is_empty() {
            Value::Mapping(Default::default())
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| config_error(origin, e.to_string()))?
        };
        if doc.is_null() {
            doc = Value::Mapping(Default::default());
        }
        apply_env(&mut doc, env)?;
        let mut config: Config =
            serde_yaml_ng::from_value(doc).map_err(|e| config_error(origin, e.to_string()))?;
        config.resolve_paths(dir);
        config.validate(origin)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        for pool in self.pools.values_mut() {
            fix(&mut pool.base);
            pool.experts.values_mut().for_each(fix);
        }
        self.taskpools.values_mut().for_each(fix);
        if let Some(d) = self.server.data_dir.as_mut() {
            fix(d);
        }
        // A task pool that is not a key of `taskpools` is a folder.
        for e in &mut self.evaluations {
            if !self.taskpools.contains_key(&e.taskpool) && Path::new(&e.taskpool).is_relative() {
                e.taskpool = dir.join(&e.taskpool).display().to_string();
            }
        }
    }

    /// The task pool folder of an evaluation: its `taskpools` entry, else
    /// the folder it names.
    pub fn taskpool_dir(&self, evaluation: &EvaluationConfig) -> PathBuf {
        self.taskpools
            .get(&evaluation.taskpool)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&evaluation.taskpool))
    }

    /// The task pool that supplies the calibration inputs of pool `pool`'s
    /// routed merges: its name and folder, and whether `calibration` names
    /// it (else it is the default: the task pool named like the pool, else
    /// the only one configured). None when there is none.
    pub fn calibration_of(&self, pool: &str) -> Option<(String, PathBuf, bool)> {
        let explicit = self.pools.get(pool)?.calibration.clone();
        let name = match &explicit {
            Some(name) => name.clone(),
            None if self.taskpools.contains_key(pool) => pool.to_string(),
            None if self.taskpools.len() == 1 => self.taskpools.keys().next()?.clone(),
            None => return None,
        };
        let dir = self.taskpools.get(&name)?.clone();
        Some((name, dir, explicit.is_some()))
    }

    /// Checks ranges and cross-references; errors name the key.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let err = |key: &str, reason: String| config_error(format!("{origin}: `{key}`"), reason);
        let l = &self.server.limits;
        for (key, v) in [
            ("server.limits.max_tokens", l.max_tokens),
            ("server.limits.max_experts", l.max_experts),
            ("server.limits.max_spec_len", l.max_spec_len),
            (
                "server.limits.max_concurrent_generations",
                l.max_concurrent_generations,
            ),
            ("server.limits.max_list_len", l.max_list_len),
            ("server.limits.max_batch_tokens", l.max_batch_tokens),
            (
                "server.limits.max_running_sequences",
                l.max_running_sequences,
            ),
            ("server.limits.kv_block_tokens", l.kv_block_tokens),
            ("server.limits.max_evaluations", l.max_evaluations),
            ("server.limits.max_search_jobs", l.max_search_jobs),
            ("merge.max_concurrent", self.merge.max_concurrent),
        ] {
            if v == 0 {
                return Err(err(key, "must be at least 1".into()));
            }
        }
        for (key, v) in [
            ("server.limits.max_iterations", l.max_iterations),
            ("server.limits.max_batch_size", l.max_batch_size),
            ("server.limits.max_rank", l.max_rank),
        ] {
            if v == 0 {
                return Err(err(key, "must be at least 1".into()));
            }
        }
        if l.max_book_bytes < 1024 {
            return Err(err(
                "server.limits.max_book_bytes",
                format!("{} is below the 1 KiB minimum", l.max_book_bytes),
            ));
        }
        if l.max_batch_tokens < l.max_running_sequences {
            return Err(err(
                "server.limits.max_batch_tokens",
                format!(
                    "{} is below max_running_sequences ({}): a step holds one token of every \
                     running sequence",
                    l.max_batch_tokens, l.max_running_sequences
                ),
            ));
        }
        if l.kv_cache_bytes < 1 << 20 {
            return Err(err(
                "server.limits.kv_cache_bytes",
                format!("{} is below the 1 MiB minimum", l.kv_cache_bytes),
            ));
        }
        if l.max_body_bytes < 1024 {
            return Err(err(
                "server.limits.max_body_bytes",
                format!("{} is below the 1 KiB minimum", l.max_body_bytes),
            ));
        }
        if self.server.workers == Some(0) {
            return Err(err("server.workers", "must be at least 1".into()));
        }
        for (key, keys) in [
            ("server.api_keys", &self.server.api_keys),
            ("server.admin_keys", &self.server.admin_keys),
        ] {
            if let Some(k) = keys
                .iter()
                .find(|k| k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return Err(err(
                    key,
                    format!("key `{k}` is empty or contains whitespace"),
                ));
            }
        }
        let mut checkpoint_names = std::collections::BTreeSet::new();
        for (name, pool) in &self.pools {
            if !is_name(name) {
                return Err(err(
                    &format!("pools.{name}"),
                    "pool names are [A-Za-z0-9_.-]+".into(),
                ));
            }
            checkpoint_names.insert(BASE_NAME.to_string());
            for expert in pool.experts.keys() {
                if !is_name(expert) || expert == BASE_NAME {
                    return Err(err(
                        &format!("pools.{name}.experts.{expert}"),
                        format!("expert names are [A-Za-z0-9_.-]+ and not `{}`", BASE_NAME),
                    ));
                }
                checkpoint_names.insert(expert.clone());
            }
            if let Some(c) = &pool.calibration {
                if !self.taskpools.contains_key(c) {
                    return Err(err(
                        &format!("pools.{name}.calibration"),
                        format!(
                            "`{c}` is not a key of `taskpools` ({})",
                            self.taskpools
                                .keys()
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        }
        for (name, preset) in &self.presets {
            if !is_name(name) || name.starts_with("merge-") {
                return Err(err(
                    &format!("presets.{name}"),
                    "preset names are [A-Za-z0-9_.-]+ and do not start with `merge-`".into(),
                ));
            }
            if checkpoint_names.contains(name) {
                return Err(err(
                    &format!("presets.{name}"),
                    "a checkpoint has the same name".into(),
                ));
            }
            preset.to_spec(name)?;
        }
        for name in self.taskpools.keys() {
            if !is_name(name) {
                return Err(err(
                    &format!("taskpools.{name}"),
                    "task pool names are [A-Za-z0-9_.-]+".into(),
                ));
            }
        }
        let mut eval_names = std::collections::BTreeSet::new();
        for (i, e) in self.evaluations.iter().enumerate() {
            if !self.taskpools.contains_key(&e.taskpool) && !Path::new(&e.taskpool).is_dir() {
                return Err(err(
                    &format!("evaluations.{i}.taskpool"),
                    format!(
                        "`{}` is neither a key of `taskpools` ({}) nor a folder",
                        e.taskpool,
                        self.taskpools
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            if e.merge.trim().is_empty() {
                return Err(err(&format!("evaluations.{i}.merge"), "is empty".into()));
            }
            if e.every < Duration::from_secs(1) {
                return Err(err(
                    &format!("evaluations.{i}.every"),
                    "must be at least 1s".into(),
                ));
            }
            if e.limit == Some(0) {
                return Err(err(
                    &format!("evaluations.{i}.limit"),
                    "must be at least 1 (leave it out for every example)".into(),
                ));
            }
            if e.min_score.is_some_and(|m| !m.is_finite()) {
                return Err(err(
                    &format!("evaluations.{i}.min_score"),
                    "must be a finite number".into(),
                ));
            }
            let name = e.display_name();
            if name.trim().is_empty() || name.len() > 256 {
                return Err(err(
                    &format!("evaluations.{i}.name"),
                    "must have 1 to 256 characters".into(),
                ));
            }
            if !eval_names.insert(name.to_string()) {
                return Err(err(
                    &format!("evaluations.{i}.name"),
                    format!("`{name}` names two evaluations; give each a distinct `name`"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const MINIMAL: &str =
        "pools:\n  demo:\n    base: models/base\n    experts: {math: models/math}\n";

    #[test]
    fn defaults_and_relative_paths() {
        let c = Config::from_yaml(MINIMAL, "t.yaml", Path::new("/srv"), env(&[])).unwrap();
        assert_eq!(c.server.bind, "127.0.0.1:8080");
        assert_eq!(c.device, "auto");
        assert_eq!(c.merge.max_wait, Duration::from_secs(30));
        assert_eq!(c.server.limits.max_body_bytes, 1 << 20);
        assert_eq!(c.pools["demo"].base, PathBuf::from("/srv/models/base"));
        assert_eq!(
            c.pools["demo"].experts["math"],
            PathBuf::from("/srv/models/math")
        );
    }

    #[test]
    fn sizes_durations_and_sections() {
        let text = format!(
            "{MINIMAL}cache: {{max_bytes: 512MiB}}\nmerge: {{max_concurrent: 2, max_wait: 1500ms}}\n\
             server: {{limits: {{max_body_bytes: 2KB}}, shutdown_timeout: 5}}\n\
             presets: {{mc: 'ties_merging(math,code;density=0.2)'}}\n\
             taskpools: {{demo: tasks}}\n\
             evaluations: [{{merge: mc, taskpool: demo, every: 1h, limit: 10}}]\n"
        );
        let c = Config::from_yaml(&text, "t.yaml", Path::new("/x"), env(&[])).unwrap();
        assert_eq!(c.cache.max_bytes, 512 * 1024 * 1024);
        assert_eq!(c.merge.max_concurrent, 2);
        assert_eq!(c.merge.max_wait, Duration::from_millis(1500));
        assert_eq!(c.server.limits.max_body_bytes, 2000);
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.evaluations[0].every, Duration::from_secs(3600));
        assert_eq!(c.taskpools["demo"], PathBuf::from("/x/tasks"));
        let spec = c.presets["mc"].to_spec("mc").unwrap();
        assert_eq!(spec.method, "ties_merging");
        assert_eq!(spec.models.len(), 2);
    }

    #[test]
    fn environment_overrides() {
        let vars = env(&[
            ("FUSION_SERVER__BIND", "0.0.0.0:9000"),
            ("FUSION_SERVER__LIMITS__MAX_TOKENS", "17"),
            ("FUSION_SERVER__API_KEYS", "[k1, k2]"),
            ("FUSION_CACHE__MAX_BYTES", "2GB"),
            ("FUSION_DEVICE", "cpu"),
            ("FUSION_POOLS__DEMO__EXPERTS__CODE", "models/code"),
            ("FUSION_DEMO_DIR", "/ignored"),
            ("HOME", "/root"),
        ]);
        let c = Config::from_yaml(MINIMAL, "t.yaml", Path::new("/m"), vars).unwrap();
        assert_eq!(c.server.bind, "0.0.0.0:9000");
        assert_eq!(c.server.limits.max_tokens, 17);
        assert_eq!(c.server.api_keys, vec!["k1", "k2"]);
        assert_eq!(c.cache.max_bytes, 2_000_000_000);
        assert_eq!(c.device, "cpu");
        assert_eq!(
            c.pools["demo"].experts["code"],
            PathBuf::from("/m/models/code")
        );
    }

    #[test]
    fn key_lists_take_commas() {
        let vars = env(&[
            ("FUSION_SERVER__API_KEYS", "k1, k2,,"),
            ("FUSION_SERVER__ADMIN_KEYS", "a1"),
        ]);
        let c = Config::from_yaml(MINIMAL, "t.yaml", Path::new("/"), vars).unwrap();
        assert_eq!(c.server.api_keys, vec!["k1", "k2"]);
        assert_eq!(c.server.admin_keys, vec!["a1"]);
    }

    #[test]
    fn calibration_task_pool_and_router_steps() {
        let load = |text: &str, vars: &[(&str, &str)]| {
            Config::from_yaml(text, "t.yaml", Path::new("/c"), env(vars))
        };
        // None without task pools.
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.calibration_of("demo"), None);
        assert_eq!(c.calibration_of("nope"), None);
        assert_eq!(c.server.limits.max_router_steps, 1000);
        // The only task pool, by default.
        let one = format!(
            "{MINIMAL}taskpools: {{mix: t}}
"
        );
        let c = load(&one, &[]).unwrap();
        assert_eq!(
            c.calibration_of("demo"),
            Some(("mix".to_string(), PathBuf::from("/c/t"), false))
        );
        // Several: the one named like the pool, else none.
        let two = format!(
            "{MINIMAL}taskpools: {{demo: a, other: b}}
"
        );
        let c = load(&two, &[]).unwrap();
        assert_eq!(c.calibration_of("demo").unwrap().0, "demo");
        let two = format!(
            "{MINIMAL}taskpools: {{x: a, y: b}}
"
        );
        assert_eq!(load(&two, &[]).unwrap().calibration_of("demo"), None);
        // Named by the key (here through the environment), and the limit.
        let c = load(
            &two,
            &[
                ("FUSION_POOLS__DEMO__CALIBRATION", "y"),
                ("FUSION_SERVER__LIMITS__MAX_ROUTER_STEPS", "0"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.calibration_of("demo"),
            Some(("y".to_string(), PathBuf::from("/c/b"), true))
        );
        assert_eq!(c.server.limits.max_router_steps, 0);
        // A name that is not a task pool is an error naming the key.
        let e = load(&two, &[("FUSION_POOLS__DEMO__CALIBRATION", "z")]).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("pools.demo.calibration") && m.contains("`z`"),
            "{m}"
        );
    }

    #[test]
    fn list_index_overrides() {
        let text = format!(
            "{MINIMAL}taskpools: {{demo: t}}\nevaluations: [{{merge: base, taskpool: demo, every: 1h}}]\n"
        );
        let vars = env(&[
            ("FUSION_EVALUATIONS__0__EVERY", "2h"),
            ("FUSION_EVALUATIONS__1__MERGE", "math"),
            ("FUSION_EVALUATIONS__1__TASKPOOL", "demo"),
            ("FUSION_EVALUATIONS__1__EVERY", "10m"),
        ]);
        let c = Config::from_yaml(&text, "t.yaml", Path::new("/"), vars).unwrap();
        assert_eq!(c.evaluations.len(), 2);
        assert_eq!(c.evaluations[0].every, Duration::from_secs(7200));
        assert_eq!(c.evaluations[1].merge, "math");
        let bad = env(&[("FUSION_EVALUATIONS__5__EVERY", "1h")]);
        let e = Config::from_yaml(&text, "t.yaml", Path::new("/"), bad).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                &format!("{MINIMAL}server: {{limits: {{max_tokens: 0}}}}\n") as &str,
                "server.limits.max_tokens",
            ),
            (
                &format!("{MINIMAL}cache: {{max_bytes: 5XB}}\n"),
                "unknown unit",
            ),
            (
                &format!("{MINIMAL}merge: {{max_wait: soon}}\n"),
                "not a duration",
            ),
            (
                &format!("{MINIMAL}serverr: {{}}\n"),
                "unknown field `serverr`",
            ),
            (
                &format!("{MINIMAL}presets: {{math: 'simple_average(math)'}}\n"),
                "presets.math",
            ),
            (
                &format!("{MINIMAL}presets: {{p: 'simple_average(math'}}\n"),
                "presets.p",
            ),
            (
                &format!("{MINIMAL}evaluations: [{{merge: x, taskpool: nope, every: 1h}}]\n"),
                "evaluations.0.taskpool",
            ),
            (
                &format!("{MINIMAL}server: {{api_keys: ['a b']}}\n"),
                "server.api_keys",
            ),
        ];
        for (text, needle) in cases {
            let e = Config::from_yaml(text, "t.yaml", Path::new("/"), env(&[])).unwrap_err();
            assert!(e.to_string().contains(needle), "`{text}` gave `{e}`");
        }
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("4GB").unwrap(), 4_000_000_000);
        assert_eq!(parse_bytes("1KiB").unwrap(), 1024);
        assert_eq!(parse_bytes(" 12 ").unwrap(), 12);
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("GB").is_err());
    }
}
