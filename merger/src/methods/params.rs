//! Typed access to a spec's parameters, with defaults and range checks.
//!
//! A method's `build` function asks for each parameter it accepts by name,
//! with its default; [`Params::finish`] then rejects any key nobody asked
//! for, so a misspelt parameter is an error rather than silently ignored.
//! A parameter that scales the merge's work is declared with the [`Work`]
//! it counts ([`Params::work`]) and checked against the [`Bounds`].

use std::collections::BTreeSet;

use crate::bounds::{Bounds, Work};
use crate::error::{MergeError, Result};
use crate::spec::{Dialect, MergeSpec, ParamValue, TensorCtx};

/// A numeric parameter that may vary per tensor (scalar, gradient or filters).
#[derive(Debug, Clone)]
pub struct Num {
    name: String,
    value: ParamValue,
}

impl Num {
    /// A constant.
    pub fn constant(name: &str, x: f64) -> Self {
        Num {
            name: name.to_string(),
            value: ParamValue::Number(x),
        }
    }

    /// The value for one tensor.
    pub fn at(&self, ctx: &TensorCtx) -> Result<f64> {
        self.value
            .resolve(ctx)
            .ok_or_else(|| MergeError::BadParameter {
                param: self.name.clone(),
                reason: format!(
                    "no filter entry matches tensor `{}` and there is no default entry",
                    ctx.name
                ),
            })
    }

    /// Checks every value the parameter can take against `ok`.
    pub fn check(self, ok: impl Fn(f64) -> bool, expected: &str) -> Result<Self> {
        for x in self.value.numbers() {
            if !ok(x) {
                return Err(MergeError::range(&self.name, x, expected));
            }
        }
        Ok(self)
    }

    /// The parameter's name as written.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The parameters of one spec, consumed by a method's `build`.
pub struct Params<'a> {
    method: String,
    spec: &'a MergeSpec,
    used: BTreeSet<String>,
    used_model: BTreeSet<String>,
    bounds: Bounds,
    /// Number of expert models (excluding the base).
    pub num_models: usize,
}

impl<'a> Params<'a> {
    /// Wraps a spec's parameters for the method `method`, with the default
    /// [`Bounds`].
    pub fn new(method: &str, spec: &'a MergeSpec) -> Self {
        Self::with_bounds(method, spec, Bounds::default())
    }

    /// Wraps a spec's parameters, checking work parameters against `bounds`.
    pub fn with_bounds(method: &str, spec: &'a MergeSpec, bounds: Bounds) -> Self {
        Params {
            method: method.to_string(),
            spec,
            used: BTreeSet::new(),
            used_model: BTreeSet::new(),
            bounds,
            num_models: spec.models.len(),
        }
    }

    /// The naming convention of the spec (decides some defaults).
    pub fn dialect(&self) -> Dialect {
        self.spec.dialect
    }

    /// The method name being built.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The spec's seed.
    pub fn seed(&self) -> Option<u64> {
        self.spec.seed
    }

    /// The expert models' names, in spec order (random methods seed their
    /// draws by name, so that reordering the models changes nothing).
    pub fn model_names(&self) -> Vec<&'a str> {
        self.spec.models.iter().map(|m| m.name.as_str()).collect()
    }

    fn global(&mut self, keys: &[&str]) -> Option<(String, ParamValue)> {
        for k in keys {
            self.used.insert((*k).to_string());
        }
        keys.iter().find_map(|k| {
            self.spec
                .parameters
                .get(*k)
                .map(|v| ((*k).to_string(), v.clone()))
        })
    }

    fn numeric(name: &str, value: ParamValue) -> Result<Num> {
        if !value.is_numeric() {
            return Err(MergeError::BadParameter {
                param: name.to_string(),
                reason: format!(
                    "expected a number, a gradient list or a filter list, got {}",
                    value.kind()
                ),
            });
        }
        for x in value.numbers() {
            if !x.is_finite() {
                return Err(MergeError::range(name, x, "a finite number"));
            }
        }
        Ok(Num {
            name: name.to_string(),
            value,
        })
    }

    /// A global numeric parameter (first of `keys` present), per-tensor resolvable.
    pub fn number(&mut self, keys: &[&str], default: f64) -> Result<Num> {
        match self.global(keys) {
            Some((k, v)) => Self::numeric(&k, v),
            None => Ok(Num::constant(keys[0], default)),
        }
    }

    /// A global parameter that must be one scalar.
    pub fn scalar(&mut self, keys: &[&str], default: f64) -> Result<f64> {
        match self.global(keys) {
            Some((_, ParamValue::Number(x))) if x.is_finite() => Ok(x),
            Some((k, ParamValue::Number(x))) => Err(MergeError::range(&k, x, "a finite number")),
            Some((k, v)) => Err(MergeError::BadParameter {
                param: k,
                reason: format!("expected a single number, got {}", v.kind()),
            }),
            None => Ok(default),
        }
    }

    /// A global non-negative integer.
    pub fn integer(&mut self, keys: &[&str], default: u64) -> Result<u64> {
        let x = self.scalar(keys, default as f64)?;
        if x < 0.0 || x.fract() != 0.0 {
            return Err(MergeError::range(keys[0], x, "a non-negative integer"));
        }
        Ok(x as u64)
    }

    /// A global integer ≥ `min` that scales the merge's work: at most the
    /// bound of `work` (an error naming the parameter and the bound).
    pub fn work(&mut self, keys: &[&str], default: u64, min: u64, work: Work) -> Result<u64> {
        let x = self.integer(keys, default)?;
        let name = self
            .global(keys)
            .map_or_else(|| keys[0].to_string(), |(k, _)| k);
        if x < min {
            return Err(MergeError::range(&name, x, &format!("an integer ≥ {min}")));
        }
        self.bounds.check(&name, x, work)?;
        Ok(x)
    }

    /// A global boolean.
    pub fn boolean(&mut self, keys: &[&str], default: bool) -> Result<bool> {
        match self.global(keys) {
            Some((_, ParamValue::Bool(b))) => Ok(b),
            Some((_, ParamValue::Number(x))) if x == 0.0 || x == 1.0 => Ok(x == 1.0),
            Some((k, v)) => Err(MergeError::BadParameter {
                param: k,
                reason: format!("expected true or false, got {}", v.kind()),
            }),
            None => Ok(default),
        }
    }

    /// A global word option from `options`.
    pub fn choice(&mut self, keys: &[&str], options: &[&str], default: &str) -> Result<String> {
        match self.global(keys) {
            Some((_, ParamValue::Text(s))) if options.contains(&s.as_str()) => Ok(s),
            Some((k, v)) => Err(MergeError::BadParameter {
                param: k,
                reason: format!(
                    "expected one of {}, got {}",
                    options.join(" | "),
                    match v {
                        ParamValue::Text(s) => format!("`{s}`"),
                        other => other.kind().to_string(),
                    }
                ),
            }),
            None => Ok(default.to_string()),
        }
    }

    /// A global list of names (empty by default), each non-empty. A lone
    /// word is refused rather than taken as a one-name list, so that
    /// `exclude_keys: model.embed_tokens.weight` is not silently read in
    /// some other way (Python's `key in "text"` would test substrings).
    pub fn names(&mut self, keys: &[&str]) -> Result<Vec<String>> {
        match self.global(keys) {
            None => Ok(Vec::new()),
            Some((_, ParamValue::Gradient(g))) if g.is_empty() => Ok(Vec::new()),
            Some((k, ParamValue::Names(names))) => {
                if names.iter().any(|n| n.trim().is_empty()) {
                    return Err(MergeError::BadParameter {
                        param: k,
                        reason: "a name in the list is empty".into(),
                    });
                }
                Ok(names)
            }
            Some((k, ParamValue::Text(s))) => Err(MergeError::BadParameter {
                param: k,
                reason: format!("expected a list of names, got the single word `{s}`; write it as a list: [{s}]"),
            }),
            Some((k, v)) => Err(MergeError::BadParameter {
                param: k,
                reason: format!("expected a list of names, got {}", v.kind()),
            }),
        }
    }

    /// A per-model numeric parameter: the model's own value (`weight` also
    /// from `ModelSpec::weight`), else the global one, else `default`.
    pub fn per_model(&mut self, key: &str, default: f64) -> Result<Vec<Num>> {
        self.used_model.insert(key.to_string());
        let global = self.global(&[key]);
        let mut out = Vec::with_capacity(self.spec.models.len());
        for m in &self.spec.models {
            let own = if key == "weight" {
                m.weight.clone().or_else(|| m.parameters.get(key).cloned())
            } else {
                m.parameters.get(key).cloned()
            };
            let num = match (own, &global) {
                (Some(v), _) => Self::numeric(&format!("models[{}].{key}", m.name), v)?,
                (None, Some((k, v))) => Self::numeric(k, v.clone())?,
                (None, None) => Num::constant(key, default),
            };
            out.push(num);
        }
        Ok(out)
    }

    /// True when some model sets `key` itself or the global parameters do.
    pub fn is_set(&self, key: &str) -> bool {
        self.spec.parameters.contains_key(key)
            || self
                .spec
                .models
                .iter()
                .any(|m| m.parameters.contains_key(key) || (key == "weight" && m.weight.is_some()))
    }

    /// Rejects every parameter that was not asked for.
    pub fn finish(self) -> Result<()> {
        let accepted = || {
            let mut all: Vec<&str> = self
                .used
                .iter()
                .chain(self.used_model.iter())
                .map(String::as_str)
                .collect();
            all.sort_unstable();
            all.dedup();
            if all.is_empty() {
                "none".to_string()
            } else {
                all.join(", ")
            }
        };
        let unknown = |param: &str| MergeError::UnknownParameter {
            method: self.method.clone(),
            param: param.to_string(),
            accepted: accepted(),
        };
        if let Some(k) = self
            .spec
            .parameters
            .keys()
            .find(|k| !self.used.contains(*k))
        {
            return Err(unknown(k));
        }
        for m in &self.spec.models {
            if m.weight.is_some() && !self.used_model.contains("weight") {
                return Err(unknown(&format!("models[{}].weight", m.name)));
            }
            if let Some(k) = m.parameters.keys().find(|k| !self.used_model.contains(*k)) {
                return Err(unknown(&format!("models[{}].{k}", m.name)));
            }
        }
        Ok(())
    }
}

/// Keys that name the same parameter in FusionBench and mergekit spellings.
pub const LAMBDA_KEYS: &[&str] = &["scaling_coefficient", "lambda"];
