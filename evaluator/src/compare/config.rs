//! `compare.yaml`: several models (the base, each expert, merges,
//! hyperparameter sweeps) scored on one task pool, as one table.
//!
//! ```yaml
//! pool: pool.yaml            # the model pool (relative to this file; `--pool` overrides)
//! taskpool: tasks            # optional; default: the pool's `taskpool`
//! limit: 100                 # optional: first N items of each task
//! batch_size: 16             # optional: log-likelihood requests per call
//! entries:
//!   - base                   # the pool's base
//!   - experts                # one row per expert, in pool order
//!   - simple_average(addition,reverse)          # a compact spec
//!   - name: task_arithmetic                     # row label (default: the spec)
//!     merge: task_arithmetic(addition,reverse)  # compact string, or a structured spec:
//!     sweep:                                    # one row per value (cartesian product)
//!       scaling_coefficient: [0.1, 0.3, 0.5, 1.0]
//!     forms: [dense, lowrank, {form: sparse, density: 0.1}]  # optional: one row per
//!                                               # residency form (see merger::spec::residency)
//!   - merge: {method: ties_merging, parameters: {density: 0.2}}  # no `models`: every expert
//!   - checkpoint: addition   # one checkpoint of the pool, by name
//!   - model: ../other/model  # a checkpoint folder (relative to this file)
//! ```
//!
//! Each entry is a string (`base`, `experts`, a checkpoint name of the pool,
//! or a compact merge spec) or a mapping with `name` (optional) and exactly
//! one of `merge`, `checkpoint`, `model`; `sweep` (with `merge` only) maps
//! parameter names, or `seed`, to lists of values; `forms` (with `merge`
//! only) lists the forms the merge is held in, one row each, labelled
//! `[dense]`, `[lowrank energy=0.95]`, `[sparse density=0.1]`. Row labels must be
//! unique. Every spec is validated (method, parameters, checkpoint names)
//! when the config is read, before anything runs.

use std::path::{Path, PathBuf};

use merger::spec::{compact, Form, MergeSpec, ParamValue, Residency};
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

use crate::error::{EvalError, Result};
use crate::pool::ModelPool;
use crate::runner::RunOptions;
use crate::source::{validate, ModelSource};

/// One row of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSpec {
    /// The row label.
    pub name: String,
    /// The model to evaluate.
    pub source: ModelSource,
}

/// A validated `compare.yaml`, its entries expanded into rows.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// The config file.
    pub path: PathBuf,
    /// The model pool.
    pub pool: ModelPool,
    /// The task pool folder.
    pub taskpool: PathBuf,
    /// Limit and batching.
    pub run: RunOptions,
    /// The rows, in order.
    pub rows: Vec<RowSpec>,
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
    entries: Vec<Value>,
}

impl CompareConfig {
    /// Reads, expands and validates `compare.yaml`. `pool` (a pool.yaml
    /// path, relative to the working directory) replaces the config's own
    /// `pool`, so one config serves several pools.
    pub fn load(path: &Path, pool: Option<&Path>) -> Result<CompareConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        Self::parse(&text, path, pool)
    }

    /// Parses the text of a config read from `path` (paths in it are
    /// relative to `path`'s folder); see [`CompareConfig::load`].
    pub fn parse(text: &str, path: &Path, pool: Option<&Path>) -> Result<CompareConfig> {
        let bad = |reason: String| EvalError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| bad(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let pool = match (pool, &raw.pool) {
            (Some(p), _) => ModelPool::load(p)?,
            (None, Some(p)) => ModelPool::load(&dir.join(p))?,
            (None, None) => return Err(bad("no `pool`: give one here or with --pool".into())),
        };
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
            limit: raw.limit,
            ..RunOptions::default()
        };
        if let Some(b) = raw.batch_size {
            if b == 0 {
                return Err(bad("`batch_size` must be at least 1".into()));
            }
            run.batch_size = b;
        }
        if raw.entries.is_empty() {
            return Err(bad("`entries` is empty".into()));
        }
        let mut rows: Vec<RowSpec> = Vec::new();
        for (i, entry) in raw.entries.iter().enumerate() {
            let at = |reason: String| bad(format!("entry {}: {reason}", i + 1));
            for row in expand_entry(entry, &pool, dir).map_err(|e| match e {
                EvalError::Config { reason, .. } => at(reason),
                EvalError::Model(m) => at(m.to_string()),
                EvalError::Pool { reason, .. } => at(reason),
                other => other,
            })? {
                if rows.iter().any(|r| r.name == row.name) {
                    return Err(at(format!(
                        "row `{}` appears twice; give the entry a distinct `name`",
                        row.name
                    )));
                }
                rows.push(row);
            }
        }
        Ok(CompareConfig {
            path: path.to_path_buf(),
            pool,
            taskpool,
            run,
            rows,
        })
    }
}

fn config_err(reason: impl Into<String>) -> EvalError {
    EvalError::Config {
        path: PathBuf::new(),
        reason: reason.into(),
    }
}

/// The rows of one entry.
fn expand_entry(entry: &Value, pool: &ModelPool, dir: &Path) -> Result<Vec<RowSpec>> {
    match entry {
        Value::String(s) => expand_string(s, pool),
        Value::Mapping(m) => expand_mapping(m, pool, dir),
        _ => Err(config_err(
            "expected a string (base, experts, a checkpoint name, a compact spec) or a mapping",
        )),
    }
}

fn expand_string(s: &str, pool: &ModelPool) -> Result<Vec<RowSpec>> {
    let s = s.trim();
    if s == "experts" {
        return Ok(pool
            .expert_names()
            .into_iter()
            .map(|n| RowSpec {
                name: n.to_string(),
                source: ModelSource::Checkpoint(n.to_string()),
            })
            .collect());
    }
    Ok(vec![RowSpec {
        name: s.to_string(),
        source: ModelSource::parse(s, pool)?,
    }])
}

fn expand_mapping(m: &Mapping, pool: &ModelPool, dir: &Path) -> Result<Vec<RowSpec>> {
    const KEYS: [&str; 6] = ["name", "merge", "checkpoint", "model", "sweep", "forms"];
    for k in m.keys() {
        let key = k.as_str().unwrap_or("");
        if !KEYS.contains(&key) {
            return Err(config_err(format!(
                "unknown key `{}` (expected {})",
                serde_yaml_ng::to_string(k).unwrap_or_default().trim(),
                KEYS.join(", ")
            )));
        }
    }
    let string = |key: &str| -> Result<Option<String>> {
        match m.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(config_err(format!("`{key}` must be a string"))),
        }
    };
    let name = string("name")?;
    let sources = ["merge", "checkpoint", "model"]
        .iter()
        .filter(|k| m.contains_key(**k))
        .count();
    if sources != 1 {
        return Err(config_err(
            "give exactly one of `merge`, `checkpoint`, `model`",
        ));
    }
    for key in ["sweep", "forms"] {
        if m.contains_key(key) && !m.contains_key("merge") {
            return Err(config_err(format!("`{key}` goes with `merge`")));
        }
    }
    if let Some(c) = string("checkpoint")? {
        pool.resolve(&c)?;
        return Ok(vec![RowSpec {
            name: name.unwrap_or_else(|| c.clone()),
            source: ModelSource::Checkpoint(c),
        }]);
    }
    if let Some(p) = string("model")? {
        let folder = dir.join(&p);
        if !folder.is_dir() {
            return Err(config_err(format!(
                "model folder `{}` does not exist",
                folder.display()
            )));
        }
        return Ok(vec![RowSpec {
            name: name.unwrap_or(p),
            source: ModelSource::Folder(folder),
        }]);
    }
    let merge = m.get("merge").expect("counted above");
    let (label, spec) = match merge {
        Value::String(s) => match compact::parse(s)? {
            compact::Parsed::Merge(spec) => (s.trim().to_string(), *spec),
            _ => {
                return Err(config_err(format!(
                    "`merge: {s}` is not a merge spec such as `task_arithmetic(a,b)`"
                )))
            }
        },
        Value::Mapping(spec) => {
            let mut spec = spec.clone();
            let models = Value::String("models".into());
            if !spec.contains_key(&models) {
                let names: Vec<Value> = pool
                    .expert_names()
                    .into_iter()
                    .map(|n| Value::String(n.to_string()))
                    .collect();
                spec.insert(models.clone(), Value::Sequence(names));
            }
            // A model may be written as its bare name.
            if let Some(Value::Sequence(list)) = spec.get_mut(&models) {
                for m in list.iter_mut() {
                    if let Value::String(name) = m {
                        let mut entry = Mapping::new();
                        entry.insert(Value::String("name".into()), Value::String(name.clone()));
                        *m = Value::Mapping(entry);
                    }
                }
            }
            let spec: MergeSpec = serde_yaml_ng::from_value(Value::Mapping(spec))
                .map_err(|e| config_err(format!("`merge`: {e}")))?;
            (spec.method.clone(), spec)
        }
        _ => {
            return Err(config_err(
                "`merge` must be a compact spec string or a mapping",
            ))
        }
    };
    let label = name.unwrap_or(label);
    let sweep = match m.get("sweep") {
        None => vec![],
        Some(Value::Mapping(s)) => parse_sweep(s)?,
        Some(_) => {
            return Err(config_err(
                "`sweep` maps parameter names to lists of values",
            ))
        }
    };
    let forms = match m.get("forms") {
        None => vec![spec.residency.clone()],
        Some(v) => parse_forms(v)?,
    };
    let mut rows = Vec::new();
    for point in cartesian(&sweep) {
        for form in &forms {
            let mut spec = spec.clone();
            spec.residency = form.clone();
            let mut row = point_row(&label, spec, &point, pool)?;
            if m.contains_key("forms") {
                row.name = format!("{} [{}]", row.name, describe_form(form.as_ref()));
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// `forms: [dense, lowrank, {form: sparse, density: 0.05}]`: one row per
/// form (a name takes the form's defaults).
fn parse_forms(v: &Value) -> Result<Vec<Option<Residency>>> {
    let Value::Sequence(list) = v else {
        return Err(config_err(
            "`forms` is a list of forms (dense, lowrank, sparse, combination, or {form: lowrank, energy: 0.9})",
        ));
    };
    if list.is_empty() {
        return Err(config_err("`forms`: the list is empty"));
    }
    list.iter()
        .map(|f| {
            let r: Residency = match f {
                Value::String(name) => Residency {
                    form: Form::parse(name).ok_or_else(|| {
                        config_err(format!(
                            "`forms`: unknown form `{name}` (expected dense, lowrank, sparse or combination)"
                        ))
                    })?,
                    ..Residency::dense()
                },
                other => serde_yaml_ng::from_value(other.clone())
                    .map_err(|e| config_err(format!("`forms`: {e}")))?,
            };
            Ok(r.is_delta().then_some(r))
        })
        .collect()
}

/// A form as a row label shows it ([`Residency::describe`]).
fn describe_form(r: Option<&Residency>) -> String {
    r.map_or_else(|| "dense".to_string(), Residency::describe)
}

/// The row of one sweep point.
fn point_row(
    label: &str,
    mut spec: MergeSpec,
    point: &[(String, ParamValue)],
    pool: &ModelPool,
) -> Result<RowSpec> {
    let mut parts = Vec::new();
    for (key, value) in point {
        if key == "seed" {
            let seed = match value {
                ParamValue::Number(x) if *x >= 0.0 && x.fract() == 0.0 => *x as u64,
                other => {
                    return Err(config_err(format!(
                        "sweep `seed`: {} is not a non-negative integer",
                        show(other)
                    )))
                }
            };
            spec.seed = Some(seed);
        } else {
            spec.parameters.insert(key.clone(), value.clone());
        }
        parts.push(format!("{key}={}", show(value)));
    }
    let name = if parts.is_empty() {
        label.to_string()
    } else {
        format!("{label} ({})", parts.join(", "))
    };
    Ok(RowSpec {
        name,
        source: ModelSource::Merge(Box::new(validate(pool, spec)?)),
    })
}

fn parse_sweep(s: &Mapping) -> Result<Vec<(String, Vec<ParamValue>)>> {
    let mut out = Vec::new();
    for (k, v) in s {
        let key = k
            .as_str()
            .ok_or_else(|| config_err("`sweep` keys are parameter names"))?
            .to_string();
        let Value::Sequence(values) = v else {
            return Err(config_err(format!(
                "sweep `{key}`: expected a list of values"
            )));
        };
        if values.is_empty() {
            return Err(config_err(format!("sweep `{key}`: the list is empty")));
        }
        let values = values
            .iter()
            .map(|v| {
                serde_yaml_ng::from_value::<ParamValue>(v.clone())
                    .map_err(|e| config_err(format!("sweep `{key}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        out.push((key, values));
    }
    Ok(out)
}

/// Every combination of the sweep's values, the first key varying slowest.
/// No keys: one empty combination.
pub fn cartesian(sweep: &[(String, Vec<ParamValue>)]) -> Vec<Vec<(String, ParamValue)>> {
    let mut points: Vec<Vec<(String, ParamValue)>> = vec![vec![]];
    for (key, values) in sweep {
        points = points
            .into_iter()
            .flat_map(|p| {
                values.iter().map(move |v| {
                    let mut q = p.clone();
                    q.push((key.clone(), v.clone()));
                    q
                })
            })
            .collect();
    }
    points
}

fn show(v: &ParamValue) -> String {
    match v {
        ParamValue::Number(x) => x.to_string(),
        ParamValue::Bool(b) => b.to_string(),
        ParamValue::Text(t) => t.clone(),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(entries: &str) -> (tempfile::TempDir, Result<CompareConfig>) {
        let d = tempfile::tempdir().unwrap();
        for m in ["models/base", "models/sum", "models/rev", "other"] {
            std::fs::create_dir_all(d.path().join(m)).unwrap();
        }
        std::fs::write(
            d.path().join("pool.yaml"),
            "name: demo\nbase: models/base\nexperts:\n  sum: models/sum\n  rev: models/rev\ntaskpool: tasks\n",
        )
        .unwrap();
        let text = format!("pool: pool.yaml\nlimit: 5\nentries:\n{entries}");
        let path = d.path().join("compare.yaml");
        let cfg = CompareConfig::parse(&text, &path, None);
        (d, cfg)
    }

    fn names(cfg: &CompareConfig) -> Vec<&str> {
        cfg.rows.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn base_experts_and_specs_become_rows() {
        let (d, cfg) = setup(
            "  - base\n  - experts\n  - simple_average(sum,rev)\n  - {checkpoint: sum, name: sum again}\n  - {model: other}\n",
        );
        let cfg = cfg.unwrap();
        assert_eq!(
            names(&cfg),
            [
                "base",
                "sum",
                "rev",
                "simple_average(sum,rev)",
                "sum again",
                "other"
            ]
        );
        assert_eq!(cfg.taskpool, d.path().join("tasks"));
        assert_eq!(cfg.run.limit, Some(5));
        assert_eq!(cfg.rows[0].source, ModelSource::Checkpoint("base".into()));
        assert_eq!(
            cfg.rows[5].source,
            ModelSource::Folder(d.path().join("other"))
        );
        match &cfg.rows[3].source {
            ModelSource::Merge(s) => {
                assert_eq!(s.method, "simple_average");
                assert_eq!(s.base, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forms_expand_to_one_row_per_form_after_each_sweep_point() {
        let (_d, cfg) = setup(
            "  - name: ta\n    merge: task_arithmetic(sum,rev)\n    sweep: {scaling_coefficient: [0.3, 1.0]}\n    forms: [dense, lowrank, {form: lowrank, rank: 4}, {form: sparse, density: 0.05}]\n",
        );
        let cfg = cfg.unwrap();
        assert_eq!(
            names(&cfg),
            [
                "ta (scaling_coefficient=0.3) [dense]",
                "ta (scaling_coefficient=0.3) [lowrank energy=0.95]",
                "ta (scaling_coefficient=0.3) [lowrank rank=4]",
                "ta (scaling_coefficient=0.3) [sparse density=0.05]",
                "ta (scaling_coefficient=1) [dense]",
                "ta (scaling_coefficient=1) [lowrank energy=0.95]",
                "ta (scaling_coefficient=1) [lowrank rank=4]",
                "ta (scaling_coefficient=1) [sparse density=0.05]",
            ]
        );
        let forms: Vec<Option<Residency>> = cfg
            .rows
            .iter()
            .map(|r| match &r.source {
                ModelSource::Merge(s) => s.residency.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(forms[0], None);
        assert_eq!(forms[2], Some(Residency::lowrank_rank(4)));
        assert_eq!(forms[7], Some(Residency::sparse(0.05)));
        for (bad, needle) in [
            ("[svd]", "unknown form `svd`"),
            ("[]", "empty"),
            ("[{form: sparse, density: 3}]", "residency.density"),
            ("lowrank", "is a list"),
        ] {
            let (_d, cfg) = setup(&format!(
                "  - merge: task_arithmetic(sum,rev)\n    forms: {bad}\n"
            ));
            let err = cfg.err().unwrap().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        let (_d, cfg) = setup("  - checkpoint: sum\n    forms: [dense]\n");
        assert!(cfg
            .err()
            .unwrap()
            .to_string()
            .contains("`forms` goes with `merge`"));
    }

    #[test]
    fn sweeps_expand_to_one_row_per_value() {
        let (_d, cfg) = setup(
            "  - name: ta\n    merge: task_arithmetic(sum,rev)\n    sweep:\n      scaling_coefficient: [0.1, 0.3, 0.5, 1.0]\n",
        );
        let cfg = cfg.unwrap();
        assert_eq!(
            names(&cfg),
            [
                "ta (scaling_coefficient=0.1)",
                "ta (scaling_coefficient=0.3)",
                "ta (scaling_coefficient=0.5)",
                "ta (scaling_coefficient=1)"
            ]
        );
        let lambdas: Vec<f64> = cfg
            .rows
            .iter()
            .map(|r| match &r.source {
                ModelSource::Merge(s) => {
                    assert_eq!(
                        s.base.as_deref(),
                        Some("base"),
                        "the pool's base is filled in"
                    );
                    match s.parameters["scaling_coefficient"] {
                        ParamValue::Number(x) => x,
                        ref other => panic!("{other:?}"),
                    }
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lambdas, [0.1, 0.3, 0.5, 1.0]);
    }

    #[test]
    fn structured_merges_default_to_every_expert_and_sweeps_multiply() {
        let (_d, cfg) = setup(
            "  - merge: {method: dare, parameters: {sparsity_ratio: 0.5}}\n    sweep: {scaling_coefficient: [0.3, 1.0], seed: [1, 2, 3]}\n",
        );
        let cfg = cfg.unwrap();
        assert_eq!(cfg.rows.len(), 6);
        assert_eq!(cfg.rows[0].name, "dare (scaling_coefficient=0.3, seed=1)");
        assert_eq!(cfg.rows[5].name, "dare (scaling_coefficient=1, seed=3)");
        match &cfg.rows[4].source {
            ModelSource::Merge(s) => {
                assert_eq!(s.checkpoint_names(), ["base", "sum", "rev"]);
                assert_eq!(s.seed, Some(2));
                assert_eq!(s.parameters["sparsity_ratio"], ParamValue::Number(0.5));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_demo_example_config_is_valid_for_any_pool() {
        let (d, _) = setup("  - base\n");
        let example = include_str!("../../../examples/compare-demo.yaml");
        let pool = d.path().join("pool.yaml");
        let cfg = CompareConfig::parse(
            example,
            Path::new("examples/compare-demo.yaml"),
            Some(&pool),
        )
        .unwrap();
        // base, 2 experts, simple_average, 4 task_arithmetic, ties, dare,
        // 2 we_moe learning rates, we_moe with a larger batch, the five
        // data-driven methods.
        assert_eq!(cfg.rows.len(), 3 + 1 + 4 + 1 + 1 + 2 + 1 + 5);
        assert_eq!(cfg.rows[13].name, "fisher_merging");
        assert_eq!(cfg.rows[17].name, "ada_svd");
        assert_eq!(cfg.rows[11].name, "we_moe (lr=0.001)");
        assert_eq!(cfg.rows[12].name, "we_moe (lr=0.001, batch_size=32)");
        assert_eq!(
            cfg.rows[4].name,
            "task_arithmetic (scaling_coefficient=0.1)"
        );
        assert_eq!(cfg.run.limit, Some(100));
        let e = CompareConfig::parse(example, Path::new("c.yaml"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `pool`"), "{e}");
    }

    #[test]
    fn cartesian_product_order() {
        let sweep = vec![
            (
                "a".to_string(),
                vec![ParamValue::Number(1.0), ParamValue::Number(2.0)],
            ),
            (
                "b".to_string(),
                vec![ParamValue::Bool(true), ParamValue::Bool(false)],
            ),
        ];
        let pts = cartesian(&sweep);
        let shown: Vec<String> = pts
            .iter()
            .map(|p| {
                p.iter()
                    .map(|(k, v)| format!("{k}{}", show(v)))
                    .collect::<String>()
            })
            .collect();
        assert_eq!(shown, ["a1btrue", "a1bfalse", "a2btrue", "a2bfalse"]);
        assert_eq!(cartesian(&[]), vec![vec![]]);
    }

    #[test]
    fn bad_entries_are_named_with_their_position() {
        let cases = [
            (
                "  - base\n  - nosuch\n",
                "entry 2",
                "unknown checkpoint `nosuch`",
            ),
            (
                "  - task_arithmetic(sum,rev;scaling=0.3)\n",
                "entry 1",
                "unknown parameter `scaling`",
            ),
            (
                "  - {merge: 'simple_average(sum,rev)', sweep: {x: 0.1}}\n",
                "entry 1",
                "expected a list",
            ),
            (
                "  - {checkpoint: sum, merge: simple_average(sum)}\n",
                "entry 1",
                "exactly one of",
            ),
            (
                "  - {checkpoint: sum, weight: 2}\n",
                "entry 1",
                "unknown key `weight`",
            ),
            ("  - base\n  - base\n", "entry 2", "appears twice"),
            (
                "  - {merge: {method: ties_merging, modles: [sum]}}\n",
                "entry 1",
                "unknown field `modles`",
            ),
            (
                "  - {merge: ties_merging(sum), sweep: {seed: [0.5]}}\n",
                "entry 1",
                "non-negative integer",
            ),
        ];
        for (entries, at, want) in cases {
            let (_d, cfg) = setup(entries);
            let e = cfg.unwrap_err().to_string();
            assert!(
                e.contains("compare.yaml") && e.contains(at) && e.contains(want),
                "{entries}: {e}"
            );
        }
    }
}
