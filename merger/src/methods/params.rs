//! Typed access to a spec's parameters, read through the method's
//! declarations ([`super::schema::Param`]): each accessor takes a declared
//! parameter and applies its spellings, default, type and range;
//! [`Params::finish`] then rejects any key nobody asked for, so a misspelt
//! parameter is an error rather than silently ignored. A parameter declared
//! with a [`Work`] is checked against the [`Bounds`]. Asking for a parameter
//! the method did not declare is an error too (a bug of the method, caught
//! by the tests that build every method).

use std::collections::BTreeSet;

use super::schema::{DefaultValue, Param, Type};
use crate::bounds::Bounds;
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

    /// The value when it is one number for every tensor (not a gradient
    /// or a filter list).
    pub fn constant_value(&self) -> Option<f64> {
        match self.value {
            ParamValue::Number(x) => Some(x),
            _ => None,
        }
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
    declared: &'static [&'static Param],
    used: BTreeSet<String>,
    used_model: BTreeSet<String>,
    /// Required parameters that the spec leaves out (reported by
    /// [`Params::finish`], after any unknown one).
    missing: Vec<&'static Param>,
    bounds: Bounds,
    /// Number of expert models (excluding the base).
    pub num_models: usize,
}

impl<'a> Params<'a> {
    /// Wraps a spec's parameters for the method `method`, which declares
    /// `declared`, with the default [`Bounds`].
    pub fn new(method: &str, declared: &'static [&'static Param], spec: &'a MergeSpec) -> Self {
        Self::with_bounds(method, declared, spec, Bounds::default())
    }

    /// Wraps a spec's parameters, checking work parameters against `bounds`.
    pub fn with_bounds(
        method: &str,
        declared: &'static [&'static Param],
        spec: &'a MergeSpec,
        bounds: Bounds,
    ) -> Self {
        Params {
            method: method.to_string(),
            spec,
            declared,
            used: BTreeSet::new(),
            used_model: BTreeSet::new(),
            missing: Vec::new(),
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

    /// Refuses a parameter the method did not declare, or one read as
    /// another type than declared.
    fn declared(&self, p: &Param, ty: fn(Type) -> bool) -> Result<()> {
        if self.declared.contains(&p) && ty(p.ty) {
            Ok(())
        } else {
            Err(MergeError::UndeclaredParameter {
                method: self.method.clone(),
                param: p.name.to_string(),
            })
        }
    }

    /// The numeric default of `p` for this spec's dialect.
    fn default_number(&self, p: &Param) -> Result<f64> {
        p.default
            .number(self.dialect())
            .ok_or_else(|| MergeError::UndeclaredParameter {
                method: self.method.clone(),
                param: format!("{} (declared without a numeric default)", p.name),
            })
    }

    fn global(&mut self, p: &Param) -> Option<(String, ParamValue)> {
        for k in p.keys() {
            self.used.insert(k.to_string());
        }
        p.keys().find_map(|k| {
            self.spec
                .parameters
                .get(k)
                .map(|v| (k.to_string(), v.clone()))
        })
    }

    fn numeric(name: &str, value: ParamValue, p: &Param) -> Result<Num> {
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
        Num {
            name: name.to_string(),
            value,
        }
        .check(|x| p.range.contains(x), &p.range.describe())
    }

    /// A global numeric parameter (per-tensor resolvable), its declared
    /// default when absent, every value checked against its range.
    pub fn number(&mut self, p: &Param) -> Result<Num> {
        let default = self.default_number(p)?;
        self.number_or(p, default)
    }

    /// [`Params::number`] for a parameter whose default depends on other
    /// parameters (declared as [`DefaultValue::Depends`]): `default` when absent.
    pub fn number_or(&mut self, p: &Param, default: f64) -> Result<Num> {
        self.declared(p, |t| t == Type::Number)?;
        match self.global(p) {
            Some((k, v)) => Self::numeric(&k, v, p),
            None => Ok(Num::constant(p.name, default)),
        }
    }

    /// A required global numeric parameter (declared with
    /// [`DefaultValue::Unset`]): its value, or, when the spec leaves it out,
    /// a placeholder and an error from [`Params::finish`] naming it.
    pub fn required_number(&mut self, p: &'static Param) -> Result<Num> {
        if !self.is_set(p) {
            self.declared(p, |t| t == Type::Number)?;
            self.missing.push(p);
        }
        self.number_or(p, 0.0)
    }

    /// A global parameter that must be one scalar; `None` when absent.
    pub fn scalar_opt(&mut self, p: &Param) -> Result<Option<f64>> {
        self.declared(p, |t| matches!(t, Type::Scalar | Type::Integer))?;
        match self.global(p) {
            Some((k, ParamValue::Number(x))) if !x.is_finite() => {
                Err(MergeError::range(&k, x, "a finite number"))
            }
            Some((k, ParamValue::Number(x))) if p.ty == Type::Scalar && !p.range.contains(x) => {
                Err(MergeError::range(&k, x, &p.range.describe()))
            }
            Some((_, ParamValue::Number(x))) => Ok(Some(x)),
            Some((k, v)) => Err(MergeError::BadParameter {
                param: k,
                reason: format!("expected a single number, got {}", v.kind()),
            }),
            None => Ok(None),
        }
    }

    /// A global parameter that must be one scalar, its declared default
    /// when absent.
    pub fn scalar(&mut self, p: &Param) -> Result<f64> {
        let default = self.default_number(p)?;
        Ok(self.scalar_opt(p)?.unwrap_or(default))
    }

    /// A global non-negative integer within its declared range; `None` when
    /// absent. One declared with a [`crate::Work`] is at most its configured
    /// bound (an error naming the parameter and the bound).
    pub fn integer_opt(&mut self, p: &Param) -> Result<Option<u64>> {
        self.declared(p, |t| t == Type::Integer)?;
        let name = self
            .global(p)
            .map_or_else(|| p.name.to_string(), |(k, _)| k);
        let Some(x) = self.scalar_opt(p)? else {
            return Ok(None);
        };
        if x < 0.0 || x.fract() != 0.0 {
            return Err(MergeError::range(&name, x, "a non-negative integer"));
        }
        if !p.range.contains(x) {
            return Err(MergeError::range(
                &name,
                x,
                &format!("an integer {}", p.range.describe()),
            ));
        }
        let x = x as u64;
        if let Some(work) = p.work {
            self.bounds.check(&name, x, work)?;
        }
        Ok(Some(x))
    }

    /// [`Params::integer_opt`], with the declared default when absent.
    pub fn integer(&mut self, p: &Param) -> Result<u64> {
        let default = self.default_number(p)?;
        match self.integer_opt(p)? {
            Some(x) => Ok(x),
            None => {
                if let Some(work) = p.work {
                    self.bounds.check(p.name, default as u64, work)?;
                }
                Ok(default as u64)
            }
        }
    }

    /// A global boolean.
    pub fn boolean(&mut self, p: &Param) -> Result<bool> {
        self.declared(p, |t| t == Type::Bool)?;
        let default = match p.default {
            DefaultValue::Bool(b) => b,
            _ => false,
        };
        match self.global(p) {
            Some((_, ParamValue::Bool(b))) => Ok(b),
            Some((_, ParamValue::Number(x))) if x == 0.0 || x == 1.0 => Ok(x == 1.0),
            Some((k, v)) => Err(MergeError::BadParameter {
                param: k,
                reason: format!("expected true or false, got {}", v.kind()),
            }),
            None => Ok(default),
        }
    }

    /// A global word option, one of the declared choices.
    pub fn choice(&mut self, p: &Param) -> Result<&'static str> {
        self.declared(p, |t| matches!(t, Type::Choice(_)))?;
        let (Type::Choice(options), DefaultValue::Word(default)) = (p.ty, p.default) else {
            return Err(MergeError::UndeclaredParameter {
                method: self.method.clone(),
                param: format!("{} (a choice declared without a default word)", p.name),
            });
        };
        match self.global(p) {
            None => Ok(default),
            Some((k, v)) => match &v {
                ParamValue::Text(s) => options.iter().find(|o| **o == s.as_str()).copied(),
                _ => None,
            }
            .ok_or_else(|| MergeError::BadParameter {
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
        }
    }

    /// A global list of names (empty by default), each non-empty. A lone
    /// word is refused rather than taken as a one-name list, so that
    /// `exclude_keys: model.embed_tokens.weight` is not silently read in
    /// some other way (Python's `key in "text"` would test substrings).
    pub fn names(&mut self, p: &Param) -> Result<Vec<String>> {
        self.declared(p, |t| t == Type::Names)?;
        match self.global(p) {
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

    /// A global parameter naming one of the spec's models: its position in
    /// spec order (`None` when left out). A name that is no model of the
    /// merge is refused, listing the models.
    pub fn expert(&mut self, p: &Param) -> Result<Option<usize>> {
        self.declared(p, |t| t == Type::Expert)?;
        let names = self.model_names();
        match self.global(p) {
            None => Ok(None),
            Some((k, ParamValue::Text(s))) => match names.iter().position(|n| *n == s) {
                Some(i) => Ok(Some(i)),
                None => Err(MergeError::BadParameter {
                    param: k,
                    reason: format!(
                        "`{s}` is not one of the merge's models ({})",
                        names.join(", ")
                    ),
                }),
            },
            Some((k, v)) => Err(MergeError::BadParameter {
                param: k,
                reason: format!(
                    "expected the name of one of the merge's models ({}), got {}",
                    names.join(", "),
                    v.kind()
                ),
            }),
        }
    }

    /// A required [`Params::expert`] (declared with [`DefaultValue::Unset`]):
    /// the model's position, or, when the spec leaves it out, 0 and an
    /// error from [`Params::finish`] naming it and the models.
    pub fn required_expert(&mut self, p: &'static Param) -> Result<usize> {
        let found = self.expert(p)?;
        if found.is_none() {
            self.missing.push(p);
        }
        Ok(found.unwrap_or(0))
    }

    /// A per-model numeric parameter: the model's own value (`weight` also
    /// from `ModelSpec::weight`), else the global one, else the declared
    /// default; every value checked against the declared range.
    pub fn per_model(&mut self, p: &Param) -> Result<Vec<Num>> {
        self.declared(p, |t| t == Type::Number)?;
        let default = self.default_number(p)?;
        let key = p.name;
        self.used_model.insert(key.to_string());
        let global = self.global(p);
        let mut out = Vec::with_capacity(self.spec.models.len());
        for m in &self.spec.models {
            let own = if key == "weight" {
                m.weight.clone().or_else(|| m.parameters.get(key).cloned())
            } else {
                m.parameters.get(key).cloned()
            };
            let num = match (own, &global) {
                (Some(v), _) => Self::numeric(&format!("models[{}].{key}", m.name), v, p)?,
                (None, Some((k, v))) => Self::numeric(k, v.clone(), p)?,
                (None, None) => Num::constant(key, default),
            };
            out.push(num);
        }
        Ok(out)
    }

    /// True when some model sets `p` itself or the global parameters do
    /// (under any of its spellings).
    pub fn is_set(&self, p: &Param) -> bool {
        p.keys().any(|key| {
            self.spec.parameters.contains_key(key)
                || self.spec.models.iter().any(|m| {
                    m.parameters.contains_key(key) || (key == "weight" && m.weight.is_some())
                })
        })
    }

    /// Rejects every parameter that was not asked for; the error lists the
    /// parameters the method declares.
    pub fn finish(self) -> Result<()> {
        let accepted = || {
            let names: Vec<&str> = self.declared.iter().map(|p| p.name).collect();
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
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
        match self.missing.first() {
            Some(p) => Err(MergeError::BadParameter {
                param: p.name.to_string(),
                reason: match p.ty {
                    Type::Expert => format!(
                        "`{}` requires it: {}; write `{}=NAME` with NAME one of {}",
                        self.method,
                        p.doc,
                        p.name,
                        self.model_names().join(", ")
                    ),
                    _ => format!("`{}` requires it: {}", self.method, p.doc),
                },
            }),
            None => Ok(()),
        }
    }
}
