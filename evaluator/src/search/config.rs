//! `search.yaml`: what `fusion search` optimises, within which bounds, for
//! which score and with how many evaluations.
//!
//! ```yaml
//! pool: pool.yaml          # the model pool (relative to this file; `--pool` overrides)
//! taskpool: tasks          # optional; default: the pool's `taskpool`
//! limit: 100               # optional: first N items of each task
//! batch_size: 16           # optional: log-likelihood requests per call
//! merge:                   # the fixed part: a compact spec or a structured one
//!   method: task_arithmetic          # (no `models`: every expert of the pool)
//!   parameters: {scaling_coefficient: 1.0}
//! space:                   # the searched part, every value in [low, high]
//!   weight: [0.0, 0.5]               # each model's `weight`, one dimension per model;
//!                                    # or per model: {add: [0, 0.5], sort: [0, 1]}
//!   parameters:                      # global parameters
//!     density: [0.1, 0.9]
//!     scaling_coefficient: {low: 0.1, high: 1.0, layers: 3}  # a gradient of 3 values
//!                                    # over depth (λ per layer group), one dimension each
//!   per_model:                       # per-model parameters, one dimension per model
//!     density: [0.1, 0.9]
//! objective: average       # the task pool's average, or {task: add} (its headline
//!                          # metric) or {task: add, metric: acc_norm}
//! budget: 60               # evaluations, at most 1000
//! algorithm: cmaes         # or random
//! seed: 0                  # the optimiser's seed (a random merge's own is `merge.seed`)
//! population: 9            # optional: candidates per generation (CMA-ES λ), default 4 + ⌊3 ln n⌋
//! sigma: 0.25              # optional: CMA-ES's initial step, as a fraction of each range
//! jobs: 2                  # optional: candidates evaluated at once (default: the cores, at most 8)
//! ```
//!
//! The search runs in the unit box: a dimension's value is
//! `low + u (high − low)` for u in [0, 1], rounded to 5 significant digits
//! (integers to the nearest integer) so that the written specs are the
//! evaluated ones. CMA-ES starts at the box's centre. A metric where lower
//! is better (perplexity) is minimised, everything else maximised.
//!
//! Everything is checked when the file is read: unknown keys, parameters the
//! method does not take (the spec is validated at the box's two corners, so
//! a bound outside a parameter's range is caught too), a parameter both
//! fixed and searched, `low > high` or bounds that are not finite numbers,
//! the budget against [`MAX_BUDGET`], the objective's task and metric
//! against the task pool. Every message names the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use merger::methods::schema::Type;
use merger::spec::{compact, MergeSpec, ModelSpec, ParamValue};
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

use crate::error::{EvalError, Result};
use crate::metrics;
use crate::pool::ModelPool;
use crate::runner::RunOptions;
use crate::search::cmaes::default_population;
use crate::source::validate;
use crate::taskpool::TaskPool;

/// The most evaluations one search may spend.
pub const MAX_BUDGET: usize = 1000;
/// The most dimensions of a search space (CMA-ES's covariance is n × n and
/// its eigendecomposition O(n³), each generation).
pub const MAX_DIMENSIONS: usize = 64;
/// The most candidates per generation.
pub const MAX_POPULATION: usize = 256;
/// The most candidates scored at once (each holds a merged model).
pub const MAX_JOBS: usize = 64;
/// The most values in one searched gradient (`layers`).
pub const MAX_LAYERS: usize = 32;

/// The optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// CMA-ES ([`crate::search::cmaes::Cmaes`]).
    Cmaes,
    /// Uniform random sampling of the box.
    Random,
}

impl std::str::FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "cmaes" | "cma-es" => Ok(Algorithm::Cmaes),
            "random" => Ok(Algorithm::Random),
            other => Err(format!(
                "unknown algorithm `{other}` (expected cmaes or random)"
            )),
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Algorithm::Cmaes => "cmaes",
            Algorithm::Random => "random",
        })
    }
}

/// What a candidate is scored by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Objective {
    /// The mean headline score of the fraction-valued tasks
    /// ([`crate::report::average`]), maximised.
    Average,
    /// One task's metric; maximised unless lower is better (perplexity).
    Task {
        /// The task.
        task: String,
        /// The metric (the task's headline metric unless given).
        metric: String,
    },
}

impl Objective {
    /// Whether a larger score is better.
    pub fn maximise(&self) -> bool {
        match self {
            Objective::Average => true,
            Objective::Task { metric, .. } => metrics::higher_is_better(metric),
        }
    }

    /// The objective as the trace and the plot name it.
    pub fn describe(&self) -> String {
        match self {
            Objective::Average => "average".into(),
            Objective::Task { task, metric } => format!("{task} {metric}"),
        }
    }
}

/// Where a dimension's value goes in the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `models[i].weight`.
    Weight(usize),
    /// A global parameter, or one entry of a global gradient
    /// (`(index, length)`).
    Global(String, Option<(usize, usize)>),
    /// `models[i].parameters[key]`.
    PerModel(usize, String),
}

/// One searched number.
#[derive(Debug, Clone, PartialEq)]
pub struct Dimension {
    /// Its name in the trace: `weight[add]`, `density`, `density[add]`,
    /// `scaling_coefficient[0]` (a gradient's first value).
    pub name: String,
    /// Where it goes.
    pub target: Target,
    /// Lower bound.
    pub low: f64,
    /// Upper bound (≥ low).
    pub high: f64,
    /// Whether the parameter takes integers (values are rounded).
    pub integer: bool,
}

impl Dimension {
    /// The value at u ∈ [0, 1], rounded (see the module docs).
    pub fn value(&self, u: f64) -> f64 {
        let x = self.low + u.clamp(0.0, 1.0) * (self.high - self.low);
        let x = if self.integer {
            x.round()
        } else {
            round_significant(x, 5)
        };
        x.clamp(self.low, self.high)
    }
}

/// `x` rounded to `digits` significant digits.
pub fn round_significant(x: f64, digits: usize) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    format!("{:.*e}", digits.saturating_sub(1), x)
        .parse()
        .unwrap_or(x)
}

/// A validated `search.yaml`.
#[derive(Debug, Clone)]
pub struct SearchConfig {
    /// The config file.
    pub path: PathBuf,
    /// The model pool.
    pub pool: ModelPool,
    /// The task pool folder.
    pub taskpool: PathBuf,
    /// Limit and batching.
    pub run: RunOptions,
    /// The fixed part of the spec, completed against the pool.
    pub template: MergeSpec,
    /// The searched numbers, in trace order.
    pub dimensions: Vec<Dimension>,
    /// What is optimised.
    pub objective: Objective,
    /// Evaluations to spend (1..=[`MAX_BUDGET`]).
    pub budget: usize,
    /// The optimiser.
    pub algorithm: Algorithm,
    /// The optimiser's seed.
    pub seed: u64,
    /// Candidates per generation.
    pub population: usize,
    /// CMA-ES's initial step size (fraction of each range).
    pub sigma: f64,
    /// Candidates scored at once.
    pub jobs: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    pool: Option<PathBuf>,
    #[serde(default)]
    taskpool: Option<PathBuf>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    batch_size: Option<usize>,
    merge: Value,
    space: RawSpace,
    #[serde(default)]
    objective: Option<Value>,
    budget: usize,
    #[serde(default)]
    algorithm: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    population: Option<usize>,
    #[serde(default)]
    sigma: Option<f64>,
    #[serde(default)]
    jobs: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSpace {
    #[serde(default)]
    weight: Option<Value>,
    #[serde(default)]
    parameters: Mapping,
    #[serde(default)]
    per_model: Mapping,
}

/// Command-line overrides of a config's values (each bounded as in the file).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--budget`.
    pub budget: Option<usize>,
    /// `--algorithm`.
    pub algorithm: Option<Algorithm>,
    /// `--seed`.
    pub seed: Option<u64>,
    /// `--limit`.
    pub limit: Option<usize>,
    /// `--jobs`.
    pub jobs: Option<usize>,
}

/// Where a config's pool comes from.
enum PoolArg<'a> {
    /// `pool.yaml`: the override, else the config's `pool`.
    File(Option<&'a Path>),
    /// Given by the caller (the config may not name one).
    Given(ModelPool),
}

fn field_err(field: &str, reason: impl std::fmt::Display) -> EvalError {
    EvalError::SearchConfig {
        path: PathBuf::new(),
        reason: format!("`{field}`: {reason}"),
    }
}

impl SearchConfig {
    /// Reads and validates `search.yaml`; `pool` (relative to the working
    /// directory) replaces the config's own `pool`.
    pub fn load(path: &Path, pool: Option<&Path>, overrides: &Overrides) -> Result<SearchConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        Self::parse(&text, path, pool, overrides)
    }

    /// Parses the text of a config read from `path` (paths in it are
    /// relative to `path`'s folder); see [`SearchConfig::load`].
    pub fn parse(
        text: &str,
        path: &Path,
        pool: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<SearchConfig> {
        Self::parse_at(text, path, PoolArg::File(pool), overrides)
    }

    /// Parses a config for a pool given as it is (a server's registered
    /// pool, its task pool its `taskpool`): the text may name no `pool` nor
    /// `taskpool` (no path comes from a request); `origin` names the text
    /// in errors.
    pub fn parse_for_pool(
        text: &str,
        origin: &str,
        pool: ModelPool,
        overrides: &Overrides,
    ) -> Result<SearchConfig> {
        Self::parse_at(text, Path::new(origin), PoolArg::Given(pool), overrides)
    }

    fn parse_at(
        text: &str,
        path: &Path,
        pool: PoolArg,
        overrides: &Overrides,
    ) -> Result<SearchConfig> {
        Self::parse_inner(text, path, pool, overrides).map_err(|e| match e {
            EvalError::SearchConfig { reason, .. } => EvalError::SearchConfig {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    fn parse_inner(
        text: &str,
        path: &Path,
        pool: PoolArg,
        overrides: &Overrides,
    ) -> Result<SearchConfig> {
        let bad = |reason: String| EvalError::SearchConfig {
            path: path.to_path_buf(),
            reason,
        };
        let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| bad(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let given = matches!(pool, PoolArg::Given(_));
        let pool = match (pool, &raw.pool) {
            (PoolArg::Given(_), Some(_)) => {
                return Err(field_err("pool", "the request names the pool (`pool`)"))
            }
            (PoolArg::Given(p), None) => p,
            (PoolArg::File(Some(p)), _) => ModelPool::load(p)?,
            (PoolArg::File(None), Some(p)) => ModelPool::load(&dir.join(p))?,
            (PoolArg::File(None), None) => {
                return Err(bad("no `pool`: give one here or with --pool".into()))
            }
        };
        if given && raw.taskpool.is_some() {
            return Err(field_err(
                "taskpool",
                "the server scores on its configured task pool (the request's `taskpool`)",
            ));
        }
        let taskpool = match (&raw.taskpool, &pool.taskpool) {
            (Some(t), _) => dir.join(t),
            (None, Some(t)) => t.clone(),
            (None, None) => {
                return Err(bad(format!(
                    "no `taskpool`: give one here or in the pool `{}`",
                    pool.path.display()
                )))
            }
        };
        let mut run = RunOptions {
            limit: overrides.limit.or(raw.limit),
            ..RunOptions::default()
        };
        if let Some(b) = raw.batch_size {
            if b == 0 {
                return Err(field_err("batch_size", "must be at least 1"));
            }
            run.batch_size = b;
        }
        if run.limit == Some(0) {
            return Err(field_err("limit", "must be at least 1"));
        }

        let template = template(&raw.merge, &pool)?;
        let dimensions = dimensions(&raw.space, &template)?;
        if dimensions.is_empty() {
            return Err(field_err(
                "space",
                "nothing to search: give `weight`, `parameters` or `per_model`",
            ));
        }
        if dimensions.len() > MAX_DIMENSIONS {
            return Err(field_err(
                "space",
                format!("{} dimensions, at most {MAX_DIMENSIONS}", dimensions.len()),
            ));
        }
        // The spec at both corners of the box: unknown parameters, values
        // out of a parameter's range, wrong kinds of values.
        for (corner, u) in [("low", 0.0), ("high", 1.0)] {
            let values: Vec<f64> = dimensions.iter().map(|d| d.value(u)).collect();
            let spec = apply(&template, &dimensions, &values);
            validate(&pool, spec).map_err(|e| {
                field_err("space", format!("the spec at every `{corner}` bound: {e}"))
            })?;
        }

        let taskpool_open = TaskPool::open(&taskpool)?;
        let objective = objective(raw.objective.as_ref(), &taskpool_open)?;

        let budget = overrides.budget.unwrap_or(raw.budget);
        if budget == 0 || budget > MAX_BUDGET {
            return Err(field_err(
                "budget",
                format!("{budget} evaluations; allowed 1 to {MAX_BUDGET}"),
            ));
        }
        let algorithm = match (overrides.algorithm, &raw.algorithm) {
            (Some(a), _) => a,
            (None, Some(a)) => a.parse().map_err(|e| field_err("algorithm", e))?,
            (None, None) => Algorithm::Cmaes,
        };
        let population = raw
            .population
            .unwrap_or_else(|| default_population(dimensions.len()));
        if !(2..=MAX_POPULATION).contains(&population) {
            return Err(field_err(
                "population",
                format!("{population}; allowed 2 to {MAX_POPULATION}"),
            ));
        }
        let sigma = raw.sigma.unwrap_or(0.25);
        if !(sigma.is_finite() && sigma > 0.0 && sigma <= 1.0) {
            return Err(field_err(
                "sigma",
                format!("{sigma}; allowed (0, 1], a fraction of each range"),
            ));
        }
        let jobs = overrides.jobs.or(raw.jobs).unwrap_or_else(default_jobs);
        if !(1..=MAX_JOBS).contains(&jobs) {
            return Err(field_err(
                "jobs",
                format!("{jobs}; allowed 1 to {MAX_JOBS}"),
            ));
        }
        Ok(SearchConfig {
            path: path.to_path_buf(),
            pool,
            taskpool,
            run,
            template,
            dimensions,
            objective,
            budget,
            algorithm,
            seed: overrides.seed.or(raw.seed).unwrap_or(0),
            population,
            sigma,
            jobs,
        })
    }

    /// The spec of the candidate with dimension values `values` (as
    /// [`Dimension::value`] gives them), completed and validated.
    pub fn spec_at(&self, values: &[f64]) -> Result<MergeSpec> {
        validate(&self.pool, apply(&self.template, &self.dimensions, values))
    }
}

/// The available cores, at most 8 (each job holds a merged model).
pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
}

/// `template` with each dimension's value in place.
pub fn apply(template: &MergeSpec, dims: &[Dimension], values: &[f64]) -> MergeSpec {
    let mut spec = template.clone();
    let mut gradients: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (d, &x) in dims.iter().zip(values) {
        match &d.target {
            Target::Weight(i) => spec.models[*i].weight = Some(ParamValue::Number(x)),
            Target::Global(key, None) => {
                spec.parameters.insert(key.clone(), ParamValue::Number(x));
            }
            Target::Global(key, Some((i, len))) => {
                gradients
                    .entry(key.clone())
                    .or_insert_with(|| vec![0.0; *len])[*i] = x;
            }
            Target::PerModel(i, key) => {
                spec.models[*i]
                    .parameters
                    .insert(key.clone(), ParamValue::Number(x));
            }
        }
    }
    for (key, g) in gradients {
        spec.parameters.insert(key, ParamValue::Gradient(g));
    }
    spec
}

/// The fixed part: a compact spec or a structured one (models default to
/// every expert), completed against the pool.
fn template(merge: &Value, pool: &ModelPool) -> Result<MergeSpec> {
    let spec = match merge {
        Value::String(s) => match compact::parse(s)? {
            compact::Parsed::Merge(spec) => *spec,
            _ => {
                return Err(field_err(
                    "merge",
                    format!("`{s}` is not a merge spec such as `task_arithmetic(a,b)`"),
                ))
            }
        },
        Value::Mapping(m) => {
            let mut m = m.clone();
            let models = Value::String("models".into());
            if !m.contains_key(&models) {
                let names = pool
                    .expert_names()
                    .into_iter()
                    .map(|n| Value::String(n.to_string()))
                    .collect();
                m.insert(models.clone(), Value::Sequence(names));
            }
            if let Some(Value::Sequence(list)) = m.get_mut(&models) {
                for entry in list.iter_mut() {
                    if let Value::String(name) = entry {
                        let mut e = Mapping::new();
                        e.insert(Value::String("name".into()), Value::String(name.clone()));
                        *entry = Value::Mapping(e);
                    }
                }
            }
            serde_yaml_ng::from_value(Value::Mapping(m)).map_err(|e| field_err("merge", e))?
        }
        _ => {
            return Err(field_err(
                "merge",
                "a compact spec string or a mapping (method, models, parameters)",
            ))
        }
    };
    pool.complete(spec).map_err(|e| field_err("merge", e))
}

/// `[low, high]` or `{low, high, layers}` (layers only where `gradient`).
fn bounds(v: &Value, field: &str, gradient: bool) -> Result<(f64, f64, usize)> {
    let number = |v: &Value, what: &str| -> Result<f64> {
        v.as_f64()
            .ok_or_else(|| field_err(field, format!("`{what}` must be a number")))
    };
    let (low, high, layers) = match v {
        Value::Sequence(s) if s.len() == 2 => (number(&s[0], "low")?, number(&s[1], "high")?, 1),
        Value::Mapping(m) if gradient => {
            for k in m.keys() {
                let k = k.as_str().unwrap_or("");
                if !["low", "high", "layers"].contains(&k) {
                    return Err(field_err(
                        field,
                        format!("unknown key `{k}` (expected low, high, layers)"),
                    ));
                }
            }
            let get = |k: &str| {
                m.get(k)
                    .ok_or_else(|| field_err(field, format!("missing `{k}`")))
            };
            let layers = match m.get("layers") {
                None => 1,
                Some(v) => v
                    .as_u64()
                    .filter(|n| (1..=MAX_LAYERS as u64).contains(n))
                    .ok_or_else(|| {
                        field_err(
                            field,
                            format!("`layers`: an integer from 1 to {MAX_LAYERS}"),
                        )
                    })? as usize,
            };
            (
                number(get("low")?, "low")?,
                number(get("high")?, "high")?,
                layers,
            )
        }
        _ => {
            return Err(field_err(
                field,
                if gradient {
                    "expected [low, high] or {low, high, layers}"
                } else {
                    "expected [low, high]"
                },
            ))
        }
    };
    if !(low.is_finite() && high.is_finite()) {
        return Err(field_err(
            field,
            format!("bounds must be finite numbers, got [{low}, {high}]"),
        ));
    }
    if low > high {
        return Err(field_err(field, format!("low {low} is above high {high}")));
    }
    Ok((low, high, layers))
}

fn key_name(k: &Value, field: &str) -> Result<String> {
    k.as_str()
        .map(str::to_string)
        .ok_or_else(|| field_err(field, "keys are parameter names"))
}

/// Whether `method` takes `key` as an integer.
fn is_integer(method: &str, key: &str) -> bool {
    merger::methods::lookup(method).is_ok_and(|info| {
        info.params
            .iter()
            .any(|p| p.keys().any(|k| k == key) && p.ty == Type::Integer)
    })
}

fn dimensions(space: &RawSpace, template: &MergeSpec) -> Result<Vec<Dimension>> {
    let mut dims = Vec::new();
    let model_index = |name: &str, field: &str| -> Result<usize> {
        template
            .models
            .iter()
            .position(|m| m.name == name)
            .ok_or_else(|| {
                field_err(
                    field,
                    format!(
                        "unknown model `{name}`; the merge's models are {}",
                        template
                            .models
                            .iter()
                            .map(|m| m.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    };
    let fixed_weight = |m: &ModelSpec, field: &str| -> Result<()> {
        if m.weight.is_some() {
            return Err(field_err(
                field,
                format!("model `{}` has a fixed weight in `merge`", m.name),
            ));
        }
        Ok(())
    };
    match &space.weight {
        None => {}
        Some(v @ Value::Sequence(_)) => {
            let (low, high, _) = bounds(v, "space.weight", false)?;
            for (i, m) in template.models.iter().enumerate() {
                fixed_weight(m, "space.weight")?;
                dims.push(Dimension {
                    name: format!("weight[{}]", m.name),
                    target: Target::Weight(i),
                    low,
                    high,
                    integer: false,
                });
            }
        }
        Some(Value::Mapping(map)) => {
            for (k, v) in map {
                let name = key_name(k, "space.weight")?;
                let field = format!("space.weight.{name}");
                let i = model_index(&name, &field)?;
                fixed_weight(&template.models[i], &field)?;
                let (low, high, _) = bounds(v, &field, false)?;
                dims.push(Dimension {
                    name: format!("weight[{name}]"),
                    target: Target::Weight(i),
                    low,
                    high,
                    integer: false,
                });
            }
        }
        Some(_) => {
            return Err(field_err(
                "space.weight",
                "expected [low, high] (every model) or a mapping of model names to [low, high]",
            ))
        }
    }
    for (k, v) in &space.parameters {
        let key = key_name(k, "space.parameters")?;
        let field = format!("space.parameters.{key}");
        if template.parameters.contains_key(&key) {
            return Err(field_err(
                &field,
                "also fixed in `merge`; give it in one place",
            ));
        }
        let (low, high, layers) = bounds(v, &field, true)?;
        let integer = is_integer(&template.method, &key);
        for i in 0..layers {
            let (name, at) = if layers == 1 {
                (key.clone(), None)
            } else {
                (format!("{key}[{i}]"), Some((i, layers)))
            };
            dims.push(Dimension {
                name,
                target: Target::Global(key.clone(), at),
                low,
                high,
                integer,
            });
        }
    }
    for (k, v) in &space.per_model {
        let key = key_name(k, "space.per_model")?;
        let field = format!("space.per_model.{key}");
        if key == "weight" {
            return Err(field_err(&field, "search weights under `space.weight`"));
        }
        let (low, high, _) = bounds(v, &field, false)?;
        let integer = is_integer(&template.method, &key);
        for (i, m) in template.models.iter().enumerate() {
            if m.parameters.contains_key(&key) || template.parameters.contains_key(&key) {
                return Err(field_err(
                    &field,
                    format!(
                        "also fixed in `merge` (model `{}`); give it in one place",
                        m.name
                    ),
                ));
            }
            dims.push(Dimension {
                name: format!("{key}[{}]", m.name),
                target: Target::PerModel(i, key.clone()),
                low,
                high,
                integer,
            });
        }
    }
    Ok(dims)
}

fn objective(v: Option<&Value>, taskpool: &TaskPool) -> Result<Objective> {
    let task_names = || {
        taskpool
            .tasks
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match v {
        None => Ok(Objective::Average),
        Some(Value::String(s)) if s == "average" => Ok(Objective::Average),
        Some(Value::String(s)) => Err(field_err(
            "objective",
            format!("`{s}`: expected `average` or {{task: NAME, metric: NAME}}"),
        )),
        Some(Value::Mapping(m)) => {
            for k in m.keys() {
                let k = k.as_str().unwrap_or("");
                if !["task", "metric"].contains(&k) {
                    return Err(field_err(
                        "objective",
                        format!("unknown key `{k}` (expected task, metric)"),
                    ));
                }
            }
            let task = m
                .get("task")
                .and_then(Value::as_str)
                .ok_or_else(|| field_err("objective.task", "give the task's name"))?;
            let spec = taskpool
                .tasks
                .iter()
                .find(|t| t.name == task)
                .ok_or_else(|| {
                    field_err(
                        "objective.task",
                        format!("unknown task `{task}`; the task pool has {}", task_names()),
                    )
                })?;
            let metric = match m.get("metric") {
                None => spec.metric.clone(),
                Some(Value::String(metric)) => {
                    let known = spec.kind.metrics();
                    if !known.contains(&metric.as_str()) {
                        return Err(field_err(
                            "objective.metric",
                            format!(
                                "task `{task}` ({}) has no metric `{metric}`; it has {}",
                                spec.kind,
                                known.join(", ")
                            ),
                        ));
                    }
                    metric.clone()
                }
                Some(_) => return Err(field_err("objective.metric", "must be a string")),
            };
            Ok(Objective::Task {
                task: task.to_string(),
                metric,
            })
        }
        Some(_) => Err(field_err(
            "objective",
            "expected `average` or {task: NAME, metric: NAME}",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for m in ["models/base", "models/sum", "models/rev"] {
            std::fs::create_dir_all(d.path().join(m)).unwrap();
        }
        std::fs::write(
            d.path().join("pool.yaml"),
            "name: demo\nbase: models/base\nexperts:\n  sum: models/sum\n  rev: models/rev\ntaskpool: tasks\n",
        )
        .unwrap();
        let t = d.path().join("tasks");
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(
            t.join("taskpool.yaml"),
            "name: tiny\ntasks:\n- {name: qa, kind: multiple_choice, file: qa.jsonl}\n- {name: prose, kind: perplexity, file: prose.jsonl}\n",
        )
        .unwrap();
        std::fs::write(
            t.join("qa.jsonl"),
            "{\"context\":\"a\",\"choices\":[\"b\",\"c\"],\"gold\":0}\n",
        )
        .unwrap();
        std::fs::write(t.join("prose.jsonl"), "{\"text\":\"the cat\"}\n").unwrap();
        d
    }

    fn parse(d: &tempfile::TempDir, body: &str) -> Result<SearchConfig> {
        let text = format!("pool: pool.yaml\nlimit: 5\n{body}");
        SearchConfig::parse(
            &text,
            &d.path().join("search.yaml"),
            None,
            &Overrides::default(),
        )
    }

    const TA: &str =
        "merge: {method: task_arithmetic, parameters: {scaling_coefficient: 1.0}}\nbudget: 10\n";

    #[test]
    fn weights_parameters_and_gradients_become_dimensions() {
        let d = setup();
        let cfg = parse(
            &d,
            "merge: {method: ties}\nbudget: 20\nalgorithm: random\nseed: 3\njobs: 1\n\
             space:\n  weight: [0.0, 2.0]\n  parameters:\n    scaling_coefficient: {low: 0.1, high: 1.0, layers: 3}\n  per_model:\n    density: [0.1, 0.9]\n",
        )
        .unwrap();
        let names: Vec<&str> = cfg.dimensions.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "weight[sum]",
                "weight[rev]",
                "scaling_coefficient[0]",
                "scaling_coefficient[1]",
                "scaling_coefficient[2]",
                "density[sum]",
                "density[rev]"
            ]
        );
        assert_eq!(cfg.algorithm, Algorithm::Random);
        assert_eq!(cfg.seed, 3);
        assert_eq!(cfg.population, default_population(7));
        assert_eq!(cfg.objective, Objective::Average);
        assert_eq!(cfg.template.base.as_deref(), Some("base"));
        let values: Vec<f64> = cfg.dimensions.iter().map(|d| d.value(0.5)).collect();
        assert_eq!(values, [1.0, 1.0, 0.55, 0.55, 0.55, 0.5, 0.5]);
        let spec = cfg.spec_at(&values).unwrap();
        assert_eq!(spec.models[1].weight, Some(ParamValue::Number(1.0)));
        assert_eq!(
            spec.parameters["scaling_coefficient"],
            ParamValue::Gradient(vec![0.55, 0.55, 0.55])
        );
        assert_eq!(
            spec.models[0].parameters["density"],
            ParamValue::Number(0.5)
        );
        // Overrides win.
        let text = format!("pool: pool.yaml\n{TA}space: {{weight: [0, 1]}}\n");
        let o = Overrides {
            budget: Some(7),
            algorithm: Some(Algorithm::Random),
            seed: Some(11),
            limit: Some(2),
            jobs: Some(3),
        };
        let cfg = SearchConfig::parse(&text, &d.path().join("s.yaml"), None, &o).unwrap();
        assert_eq!(
            (cfg.budget, cfg.algorithm, cfg.seed, cfg.run.limit, cfg.jobs),
            (7, Algorithm::Random, 11, Some(2), 3)
        );
    }

    #[test]
    fn values_are_rounded_and_stay_in_bounds() {
        let d = Dimension {
            name: "x".into(),
            target: Target::Weight(0),
            low: 0.0,
            high: 0.3,
            integer: false,
        };
        assert_eq!(d.value(0.123456789), 0.037037);
        assert_eq!(d.value(1.0), 0.3);
        assert_eq!(d.value(2.0), 0.3);
        let k = Dimension {
            integer: true,
            low: 1.0,
            high: 10.0,
            ..d
        };
        assert_eq!(k.value(0.5), 6.0);
        assert_eq!(round_significant(1.234567e-4, 3), 1.23e-4);
    }

    #[test]
    fn objectives_name_a_task_and_metric_of_the_pool() {
        let d = setup();
        let cfg = parse(
            &d,
            &format!("{TA}space: {{weight: [0, 1]}}\nobjective: {{task: prose}}\n"),
        )
        .unwrap();
        assert_eq!(
            cfg.objective,
            Objective::Task {
                task: "prose".into(),
                metric: "perplexity".into()
            }
        );
        assert!(!cfg.objective.maximise());
        let cfg = parse(
            &d,
            &format!("{TA}space: {{weight: [0, 1]}}\nobjective: {{task: qa, metric: acc_norm}}\n"),
        )
        .unwrap();
        assert!(cfg.objective.maximise());
    }

    #[test]
    fn bad_configs_name_the_field() {
        let d = setup();
        let cases = [
            (format!("{TA}space: {{parameters: {{scaling: [0, 1]}}}}\n"), vec!["`space`", "unknown parameter `scaling`"]),
            (format!("{TA}space: {{weight: [1.0, 0.5]}}\n"), vec!["`space.weight`", "low 1 is above high 0.5"]),
            (format!("{TA}space: {{weight: [.nan, 0.5]}}\n"), vec!["`space.weight`", "finite"]),
            (format!("{TA}space: {{weight: {{nosuch: [0, 1]}}}}\n"), vec!["`space.weight.nosuch`", "unknown model `nosuch`"]),
            (format!("{TA}space: {{parameters: {{scaling_coefficient: [0, 1]}}}}\n"), vec!["`space.parameters.scaling_coefficient`", "also fixed"]),
            (format!("{TA}space: {{weight: [0, 1]}}\nobjective: {{task: nosuch}}\n"), vec!["`objective.task`", "unknown task `nosuch`", "qa, prose"]),
            (format!("{TA}space: {{weight: [0, 1]}}\nobjective: {{task: qa, metric: perplexity}}\n"), vec!["`objective.metric`", "no metric `perplexity`"]),
            (format!("{TA}space: {{weight: [0, 1]}}\nobjective: best\n"), vec!["`objective`"]),
            ("merge: task_arithmetic(sum,rev)\nbudget: 1001\nspace: {weight: [0, 1]}\n".into(), vec!["`budget`", "1 to 1000"]),
            ("merge: task_arithmetic(sum,rev)\nbudget: 0\nspace: {weight: [0, 1]}\n".into(), vec!["`budget`"]),
            (format!("{TA}space: {{weight: [0, 1]}}\nalgorithm: bayes\n"), vec!["`algorithm`", "unknown algorithm `bayes`"]),
            (format!("{TA}space: {{weight: [0, 1]}}\npopulation: 1\n"), vec!["`population`"]),
            (format!("{TA}space: {{weight: [0, 1]}}\nsigma: 0\n"), vec!["`sigma`"]),
            (format!("{TA}space: {{weight: [0, 1]}}\njobs: 0\n"), vec!["`jobs`"]),
            (format!("{TA}space: {{}}\n"), vec!["`space`", "nothing to search"]),
            (format!("{TA}space: {{weight: [0, 1]}}\nbudgte: 3\n"), vec!["unknown field `budgte`"]),
            ("merge: {method: ties_merging, parameters: {density: 0.2}}\nbudget: 5\nspace: {parameters: {density: [0.0, 0.5]}}\n".into(), vec!["`space.parameters.density`", "also fixed"]),
            ("merge: {method: ties_merging}\nbudget: 5\nspace: {parameters: {density: [0.0, 0.5]}}\n".into(), vec!["`space`", "`low`", "density"]),
            ("merge: {method: nosuch}\nbudget: 5\nspace: {weight: [0, 1]}\n".into(), vec!["`merge`", "nosuch"]),
            (format!("{TA}space: {{parameters: {{scaling: {{low: 0, high: 1, layers: 99}}}}}}\n"), vec!["`space.parameters.scaling`", "`layers`"]),
        ];
        for (body, needles) in cases {
            let e = parse(&d, &body).unwrap_err().to_string();
            assert!(e.contains("search.yaml"), "{body}: {e}");
            for n in needles {
                assert!(e.contains(n), "{body}: `{n}` not in: {e}");
            }
        }
    }

    #[test]
    fn the_demo_example_config_is_valid_for_a_pool_with_its_experts() {
        let d = tempfile::tempdir().unwrap();
        let experts = [
            "add", "reverse", "sort", "upper", "filter", "category", "compare",
        ];
        let mut pool = String::from("name: demo\nbase: models/base\ntaskpool: tasks\nexperts:\n");
        for m in std::iter::once("base").chain(experts) {
            std::fs::create_dir_all(d.path().join("models").join(m)).unwrap();
            if m != "base" {
                pool.push_str(&format!("  {m}: models/{m}\n"));
            }
        }
        std::fs::write(d.path().join("pool.yaml"), pool).unwrap();
        let t = d.path().join("tasks");
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(
            t.join("add.generate.jsonl"),
            "{\"prompt\":\"1+1=\",\"answer\":\"2\"}\n",
        )
        .unwrap();
        let example = include_str!("../../../examples/search-demo.yaml");
        let cfg = SearchConfig::parse(
            example,
            Path::new("examples/search-demo.yaml"),
            Some(&d.path().join("pool.yaml")),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.dimensions.len(), experts.len());
        assert_eq!(cfg.budget, 60);
        assert_eq!(cfg.algorithm, Algorithm::Cmaes);
        assert_eq!(cfg.run.limit, Some(100));
    }
}
