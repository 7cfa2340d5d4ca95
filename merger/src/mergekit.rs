//! Importing a mergekit YAML config into a [`MergeSpec`].
//!
//! Accepted top-level keys, as mergekit writes them:
//!
//! | key | becomes |
//! |---|---|
//! | `merge_method` | [`MergeSpec::method`], as written (mergekit or FusionBench names) |
//! | `base_model` | [`MergeSpec::base`] (see below for methods without a base) |
//! | `models: [{model, parameters}]` | [`MergeSpec::models`]; `parameters.weight` → [`ModelSpec::weight`] |
//! | `parameters` | [`MergeSpec::parameters`] (scalars, gradients, `{filter, value}` lists) |
//! | `dtype`, `out_dtype` | [`MergeSpec::dtype`]: `out_dtype` when given, else `dtype` |
//! | `seed` | [`MergeSpec::seed`] (ours: the seed of random methods such as dare) |
//! | `tokenizer_source`, `tokenizer`, `chat_template` | a [`TokenizerSpec`] (see [`crate::tokenizer`]); the source defaults to `base`, in the `tokenizer:` block to `union` |
//!
//! | `slices: [{sources: [{model, layer_range, parameters}], base_model, parameters}]` | a [`SlicedSpec`] ([`read`] gives [`Config::Sliced`]; see [`crate::slices`]) |
//!
//! `models` and `slices` exclude each other. A slice's `residual_weight`
//! is accepted and has no effect, as in mergekit (whose planner never reads
//! it). Any other key is an error naming it and the file. The global
//! `int8_mask` parameter is dropped: in mergekit it only stores masks in
//! int8 to save memory and does not change the result.
//!
//! The spec is always in the [`Dialect::Mergekit`], also when `merge_method`
//! is a FusionBench name: a file gets mergekit's defaults (task_arithmetic's
//! λ is 1.0, not FusionBench's 0.3), because that is what its author expects.
//!
//! mergekit's conventions about the base model are applied here:
//! - methods that take a base (`ties`, `dare_ties`, `dare_linear`,
//!   `task_arithmetic`, `breadcrumbs`, `model_stock`, ...) list the base among
//!   `models` and skip it; the entry equal to `base_model` is dropped;
//! - `slerp` takes `base_model` and one other model (the base may or may not
//!   be listed among `models`): the spec's models are `[base_model, other]`
//!   with no base, so that `t = 0` gives the base and `t = 1` the other;
//! - methods whose base is optional (`magnitude_pruning`: its default
//!   `mode: diff` prunes θ1 − θ0) keep `base_model` as the base, and drop
//!   the entry equal to it from `models` as above; without `base_model` the
//!   spec has no base;
//! - methods without a base (`linear`, `simple_average`, ...) ignore
//!   `base_model`: every listed model is merged and the spec has no base.
//!
//! A parameter set to nothing (`exclude_keys: null`, as FusionBench's
//! configs write their defaults) is left out, so it takes its default.
//!
//! Model names are kept as written (paths or hub names); the CLI resolves
//! them relative to the YAML's folder.
//!
//! The third way to write a spec (after the structured and compact forms of
//! [`crate::spec`]); it lives above the method registry, whose base use
//! decides where `base_model` goes.
//!
//! [`to_yaml`] writes a spec back as mergekit YAML, so that [`from_yaml`]
//! reads the same merge: the base as `base_model`, listed first among
//! `models` as mergekit writes it (slerp: its first model), per-model
//! `weight` and parameters under each model's `parameters`, and every
//! parameter whose default differs between the dialects written out with
//! the spec's own default (a FusionBench `task_arithmetic` without λ gets
//! `scaling_coefficient: 0.3`, not mergekit's 1.0).

use std::collections::BTreeMap;
use std::path::Path;

use serde_yaml_ng::{Mapping, Value};

use crate::error::{MergeError, Result};
use crate::methods::schema::DefaultValue;
use crate::methods::{self, BaseUse};
use crate::slices::{same_model, Slice, SliceSource, SlicedSpec};
use crate::spec::compact::dtype_name;
use crate::spec::{Dialect, MergeSpec, ModelSpec, ParamValue};
use crate::tokenizer::{RowSource, Source as TokenizerSource, TokenRow, TokenizerSpec};

/// The top-level keys we read.
const KEYS: &[&str] = &[
    "merge_method",
    "slices",
    "tokenizer",
    "chat_template",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "seed",
    "tokenizer_source",
];

/// A mergekit config: a merge of whole models, or one laid out in layer
/// slices.
#[derive(Debug, Clone, PartialEq)]
pub enum Config {
    /// `models:` (every layer of every model), and the output tokenizer's
    /// settings.
    Merge(MergeSpec, TokenizerSpec),
    /// `slices:` (layer ranges, see [`crate::slices`]).
    Sliced(SlicedSpec),
}

/// Reads the mergekit config `text` (from the file `path`, for messages)
/// with `models`; a config with `slices` is an error pointing to [`read`].
pub fn from_yaml(text: &str, path: &Path) -> Result<MergeSpec> {
    match read(text, path)? {
        Config::Merge(spec, tokenizer) if tokenizer.is_plain() => Ok(spec),
        Config::Merge(..) => Err(MergeError::Unsupported {
            feature: "tokenizer settings here".into(),
            hint: format!(
                "`{}` sets `tokenizer_source`, `tokenizer` or `chat_template`, which `fusion merge` \
                 writes into the output folder",
                path.display()
            ),
        }),
        Config::Sliced(_) => Err(MergeError::Unsupported {
            feature: "`slices` here".into(),
            hint: format!(
                "`{}` lays its merge out in layer slices, which `fusion merge` writes to a folder;                  a gateway merge takes whole models (`models`)",
                path.display()
            ),
        }),
    }
}

/// Reads the mergekit config `text` (from the file `path`, for messages).
pub fn read(text: &str, path: &Path) -> Result<Config> {
    let file = File { path };
    let doc: Value =
        serde_yaml_ng::from_str(text).map_err(|e| file.err(format!("not valid YAML: {e}")))?;
    let map = match doc {
        Value::Mapping(map) => map,
        Value::Null => return Err(file.err("the file is empty".into())),
        other => {
            return Err(file.err(format!(
                "expected a mapping of mergekit keys at the top level, found {}",
                describe(&other)
            )))
        }
    };

    let mut method = None;
    let mut base_model = None;
    let mut models = None;
    let mut parameters = BTreeMap::new();
    let mut dtype = None;
    let mut out_dtype = None;
    let mut seed = None;
    let mut slices = None;
    let mut tokenizer = TokenizerSpec::default();
    let mut tokenizer_source = None;
    let mut tokenizer_block = None;
    for (key, value) in map {
        let Value::String(key) = key else {
            return Err(file.err(format!(
                "top-level keys must be strings, found {}",
                describe(&key)
            )));
        };
        if value.is_null() && KEYS.contains(&key.as_str()) {
            // `parameters:` with nothing under it, `base_model: null`, ...
            continue;
        }
        match key.as_str() {
            "merge_method" => method = Some(file.string(value, "merge_method")?),
            "base_model" => base_model = Some(file.string(value, "base_model")?),
            "models" => models = Some(file.models(value)?),
            "parameters" => parameters = file.parameters(value, "parameters")?,
            "dtype" => dtype = Some(file.dtype(value, "dtype")?),
            "out_dtype" => out_dtype = Some(file.dtype(value, "out_dtype")?),
            "seed" => {
                seed = Some(value.as_u64().ok_or_else(|| {
                    file.field(
                        "seed",
                        format!(
                            "expected a non-negative integer, found {}",
                            describe(&value)
                        ),
                    )
                })?)
            }
            "tokenizer_source" => {
                tokenizer_source = Some(file.tokenizer_source(value, "tokenizer_source")?)
            }
            "tokenizer" => tokenizer_block = Some(value),
            "chat_template" => tokenizer.chat_template = Some(file.string(value, "chat_template")?),
            "slices" => slices = Some(file.slices(value)?),
            other => {
                return Err(file.err(format!(
                    "unknown key `{other}`; accepted keys: {}",
                    KEYS.join(", ")
                )))
            }
        }
    }

    let method = method.ok_or_else(|| file.err("missing `merge_method`".into()))?;
    if let Some(block) = tokenizer_block {
        if tokenizer_source.is_some() {
            return Err(file.err(
                "give either `tokenizer_source` or the `tokenizer:` block (its `source`), not both"
                    .into(),
            ));
        }
        file.tokenizer_block(block, &mut tokenizer)?;
    } else if let Some(source) = tokenizer_source {
        tokenizer.source = source;
    }
    tokenizer.base_model = base_model.clone();
    if matches!(parameters.get("int8_mask"), Some(ParamValue::Bool(_))) {
        parameters.remove("int8_mask");
    }
    if let Some(slices) = slices {
        if models.is_some() {
            return Err(file.err(
                "give either `models` (every layer of each model) or `slices` (layer ranges), not both"
                    .into(),
            ));
        }
        methods::lookup(&method).map_err(|e| file.field("merge_method", e.to_string()))?;
        return Ok(Config::Sliced(SlicedSpec {
            method,
            base_model,
            slices,
            parameters,
            seed,
            dtype: out_dtype.or(dtype),
            tokenizer,
        }));
    }
    let info = methods::lookup(&method).map_err(|e| file.field("merge_method", e.to_string()))?;
    let models = models.ok_or_else(|| {
        file.err("missing `models` (the list of `- model: NAME` entries) or `slices`".into())
    })?;

    let (base, models) = if info.name == "slerp" {
        let base_model = base_model.ok_or_else(|| {
            file.field(
                "base_model",
                "slerp needs `base_model`, the model at t = 0".into(),
            )
        })?;
        let (bases, others): (Vec<ModelSpec>, Vec<ModelSpec>) = models
            .into_iter()
            .partition(|m| same_model(&m.name, &base_model));
        if others.len() != 1 {
            return Err(file.field(
                "models",
                format!(
                    "slerp takes `base_model` and exactly one other model, found {} other model(s)",
                    others.len()
                ),
            ));
        }
        let base_entry = bases
            .into_iter()
            .next()
            .unwrap_or_else(|| ModelSpec::named(base_model));
        (
            None,
            vec![
                base_entry,
                others.into_iter().next().expect("one other model"),
            ],
        )
    } else if info.base == BaseUse::Unused {
        (None, models)
    } else {
        match base_model {
            Some(base_model) => {
                let models = models
                    .into_iter()
                    .filter(|m| !same_model(&m.name, &base_model))
                    .collect();
                (Some(base_model), models)
            }
            None if info.base == BaseUse::Required => {
                return Err(file.field(
                    "base_model",
                    format!("merge_method `{method}` needs a base model"),
                ))
            }
            None => (None, models),
        }
    };

    Ok(Config::Merge(
        MergeSpec {
            method,
            pool: None,
            base,
            models,
            parameters,
            seed,
            dtype: out_dtype.or(dtype),
            dialect: Dialect::Mergekit,
            residency: None,
            task: None,
        },
        tokenizer,
    ))
}

/// Writes `spec` as a mergekit YAML config that [`from_yaml`] reads back
/// as the same merge (see the module docs). A spec held in a residency
/// form other than dense, or with a pool prefix, has no mergekit
/// spelling: [`MergeError::Unsupported`].
pub fn to_yaml(spec: &MergeSpec) -> Result<String> {
    if spec.is_delta() {
        return Err(MergeError::Unsupported {
            feature: "a `residency` form in mergekit YAML".into(),
            hint: "mergekit YAML describes dense merges only; write the spec in compact or \
                   structured form to keep its form"
                .into(),
        });
    }
    let info = methods::lookup(&spec.method)?;
    let key = |k: &str| Value::String(k.to_string());
    let model_entry = |m: &ModelSpec| -> Result<Value> {
        let mut entry = Mapping::new();
        entry.insert(key("model"), key(&m.name));
        let mut params = Mapping::new();
        if let Some(w) = &m.weight {
            params.insert(key("weight"), to_value(w)?);
        }
        for (k, v) in &m.parameters {
            params.insert(key(k), to_value(v)?);
        }
        if !params.is_empty() {
            entry.insert(key("parameters"), Value::Mapping(params));
        }
        Ok(Value::Mapping(entry))
    };
    let mut doc = Mapping::new();
    doc.insert(key("merge_method"), key(&spec.method));
    let mut models = Vec::new();
    if info.name == "slerp" {
        // The importer's order: `[base_model, other]`, no base.
        let first = spec.models.first().ok_or_else(|| {
            MergeError::Spec("slerp needs two models to write as mergekit YAML".into())
        })?;
        doc.insert(key("base_model"), key(&first.name));
        for m in &spec.models {
            models.push(model_entry(m)?);
        }
    } else {
        if let Some(base) = spec.base.as_ref().filter(|_| info.base != BaseUse::Unused) {
            doc.insert(key("base_model"), key(base));
            let mut entry = Mapping::new();
            entry.insert(key("model"), key(base));
            models.push(Value::Mapping(entry));
        }
        for m in &spec.models {
            models.push(model_entry(m)?);
        }
    }
    doc.insert(key("models"), Value::Sequence(models));
    let mut params = Mapping::new();
    for (k, v) in &spec.parameters {
        params.insert(key(k), to_value(v)?);
    }
    for p in info.params {
        let given = p.keys().any(|k| spec.parameters.contains_key(k));
        // Per-model ones too: a global value is every model's default.
        if let (false, DefaultValue::ByDialect { .. }) = (given, p.default) {
            let x = p.default.number(spec.dialect).expect("a numeric default");
            params.insert(key(p.name), to_value(&ParamValue::Number(x))?);
        }
    }
    if !params.is_empty() {
        doc.insert(key("parameters"), Value::Mapping(params));
    }
    if let Some(dtype) = &spec.dtype {
        doc.insert(key("dtype"), key(dtype));
    }
    if let Some(seed) = spec.seed {
        doc.insert(key("seed"), Value::Number(seed.into()));
    }
    serde_yaml_ng::to_string(&Value::Mapping(doc))
        .map_err(|e| MergeError::Spec(format!("cannot write mergekit YAML: {e}")))
}

fn to_value(v: &ParamValue) -> Result<Value> {
    serde_yaml_ng::to_value(v)
        .map_err(|e| MergeError::Spec(format!("cannot write a parameter as YAML: {e}")))
}

/// A short description of a YAML value's kind, for messages.
fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A value as a short string for messages.
fn short(v: &Value) -> String {
    match v {
        Value::String(s) => format!("`{s}`"),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("`{n}`"),
        other => describe(other).to_string(),
    }
}

/// The config file being read, for errors that name it.
struct File<'a> {
    path: &'a Path,
}

impl File<'_> {
    fn err(&self, reason: String) -> MergeError {
        MergeError::Config {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    /// An error about one field, named in backticks.
    fn field(&self, field: &str, reason: String) -> MergeError {
        self.err(format!("`{field}`: {reason}"))
    }

    fn string(&self, v: Value, field: &str) -> Result<String> {
        match v {
            Value::String(s) if !s.trim().is_empty() => Ok(s),
            Value::String(_) => Err(self.field(field, "must not be empty".into())),
            other => Err(self.field(
                field,
                format!("expected a string, found {}", describe(&other)),
            )),
        }
    }

    fn dtype(&self, v: Value, field: &str) -> Result<String> {
        let s = self.string(v, field)?;
        dtype_name(&s).map(str::to_string).ok_or_else(|| {
            self.field(
                field,
                format!("unsupported dtype `{s}` (expected float32, float16 or bfloat16)"),
            )
        })
    }

    /// A mapping of parameter names to values.
    fn parameters(&self, v: Value, field: &str) -> Result<BTreeMap<String, ParamValue>> {
        let Value::Mapping(map) = v else {
            return Err(self.field(
                field,
                format!("expected a mapping of parameters, found {}", describe(&v)),
            ));
        };
        let mut out = BTreeMap::new();
        for (key, value) in map {
            let Value::String(key) = key else {
                return Err(self.field(
                    field,
                    format!("parameter names must be strings, found {}", describe(&key)),
                ));
            };
            if value.is_null() {
                continue;
            }
            let name = format!("{field}.{key}");
            let value = self.param_value(value, &name)?;
            out.insert(key, value);
        }
        Ok(out)
    }

    fn param_value(&self, v: Value, field: &str) -> Result<ParamValue> {
        let kind = describe(&v);
        serde_yaml_ng::from_value::<ParamValue>(v).map_err(|e| {
            let detail = if kind == "a list" {
                // A list that is neither numbers nor `{filter, value}` entries;
                // serde's message for an untagged enum says nothing useful.
                "a list must hold only numbers (a gradient), only names, or only `{filter, value}` entries".to_string()
            } else {
                format!("found {kind} ({e})")
            };
            self.field(
                field,
                format!("expected a number, a boolean, a word, a gradient list, a list of names or a list of `{{filter, value}}`; {detail}"),
            )
        })
    }

    /// The `models` list.
    fn models(&self, v: Value) -> Result<Vec<ModelSpec>> {
        let Value::Sequence(entries) = v else {
            return Err(self.field(
                "models",
                format!(
                    "expected a list of `- model: NAME` entries, found {}",
                    describe(&v)
                ),
            ));
        };
        entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| self.model(i, entry))
            .collect()
    }

    fn model(&self, i: usize, entry: Value) -> Result<ModelSpec> {
        Ok(self.source(&format!("models[{i}]"), entry, false)?.0)
    }

    /// A `models` entry, or with `sliced` a slice's source (which also
    /// has a `layer_range`, required).
    fn source(
        &self,
        at: &str,
        entry: Value,
        sliced: bool,
    ) -> Result<(ModelSpec, Option<[usize; 2]>)> {
        let at = at.to_string();
        let Value::Mapping(map) = entry else {
            return Err(self.field(
                &at,
                format!(
                    "expected a mapping with `model`, found {}",
                    describe(&entry)
                ),
            ));
        };
        let mut name = None;
        let mut parameters = Mapping::new();
        let mut range = None;
        for (key, value) in map {
            match key.as_str() {
                Some("layer_range") if sliced => range = Some(self.layer_range(&at, value)?),
                Some("model") => {
                    name = Some(match value {
                        Value::String(s) if !s.trim().is_empty() => s,
                        other => {
                            return Err(self.field(
                                &format!("{at}.model"),
                                format!("expected a model name or path, found {}", short(&other)),
                            ))
                        }
                    })
                }
                Some("parameters") => match value {
                    Value::Null => {}
                    Value::Mapping(m) => parameters = m,
                    other => {
                        return Err(self.field(
                            &format!("{at}.parameters"),
                            format!(
                                "expected a mapping of parameters, found {}",
                                describe(&other)
                            ),
                        ))
                    }
                },
                Some(other) => {
                    let keys = if sliced {
                        "`model`, `layer_range` and `parameters`"
                    } else {
                        "`model` and `parameters`"
                    };
                    return Err(self.field(
                        &at,
                        format!("unknown key `{other}`; a model entry has {keys}"),
                    ));
                }
                None => {
                    return Err(self.field(
                        &at,
                        format!("keys must be strings, found {}", describe(&key)),
                    ))
                }
            }
        }
        let name = name.ok_or_else(|| self.field(&at, "missing `model`".into()))?;
        if sliced && range.is_none() {
            return Err(self.field(&at, "missing `layer_range` ([start, end])".into()));
        }
        let mut parameters =
            self.parameters(Value::Mapping(parameters), &format!("{at}.parameters"))?;
        let weight = parameters.remove("weight");
        let model = ModelSpec {
            name,
            weight,
            parameters,
        };
        Ok((model, range))
    }

    /// `base`, `union` or a model name.
    fn tokenizer_source(&self, v: Value, field: &str) -> Result<TokenizerSource> {
        Ok(match self.string(v, field)?.as_str() {
            "base" => TokenizerSource::Base,
            "union" => TokenizerSource::Union,
            model => TokenizerSource::Model(model.to_string()),
        })
    }

    /// The `tokenizer:` block: `source` (default `union`, as in mergekit),
    /// `tokens`, `pad_to_multiple_of`.
    fn tokenizer_block(&self, v: Value, out: &mut TokenizerSpec) -> Result<()> {
        let Value::Mapping(map) = v else {
            return Err(self.field(
                "tokenizer",
                format!(
                    "expected a mapping (`source`, `tokens`, `pad_to_multiple_of`), found {}",
                    describe(&v)
                ),
            ));
        };
        out.source = TokenizerSource::Union;
        for (key, value) in map {
            match key.as_str() {
                Some("source") => out.source = self.tokenizer_source(value, "tokenizer.source")?,
                Some("pad_to_multiple_of") if value.is_null() => {}
                Some("pad_to_multiple_of") => {
                    out.pad_to_multiple_of = Some(
                        value
                            .as_u64()
                            .filter(|&n| (1..=1 << 20).contains(&n))
                            .ok_or_else(|| {
                                self.field(
                                    "tokenizer.pad_to_multiple_of",
                                    format!("expected an integer in [1, 1048576], found {}", short(&value)),
                                )
                            })? as usize,
                    )
                }
                Some("tokens") if value.is_null() => {}
                Some("tokens") => {
                    let Value::Mapping(tokens) = value else {
                        return Err(self.field(
                            "tokenizer.tokens",
                            format!("expected a mapping of tokens to settings, found {}", describe(&value)),
                        ));
                    };
                    for (tok, cfg) in tokens {
                        let Value::String(tok) = tok else {
                            return Err(self.field("tokenizer.tokens", "tokens must be strings".into()));
                        };
                        let row = self.token_row(&format!("tokenizer.tokens.{tok}"), cfg)?;
                        out.tokens.insert(tok, row);
                    }
                }
                Some(other) => {
                    return Err(self.field(
                        "tokenizer",
                        format!("unknown key `{other}`; the block has `source`, `tokens` and `pad_to_multiple_of`"),
                    ))
                }
                None => return Err(self.field("tokenizer", "keys must be strings".into())),
            }
        }
        Ok(())
    }

    /// One token's settings: `{source, force}`.
    fn token_row(&self, at: &str, v: Value) -> Result<TokenRow> {
        let mut row = TokenRow {
            source: None,
            force: false,
        };
        let map = match v {
            Value::Null => return Ok(row),
            Value::Mapping(m) => m,
            other => {
                return Err(self.field(
                    at,
                    format!(
                        "expected a mapping (`source`, `force`), found {}",
                        describe(&other)
                    ),
                ))
            }
        };
        for (key, value) in map {
            match key.as_str() {
                Some("force") => {
                    row.force = value.as_bool().ok_or_else(|| {
                        self.field(
                            &format!("{at}.force"),
                            format!("expected true or false, found {}", short(&value)),
                        )
                    })?
                }
                Some("source") => {
                    row.source = match value {
                        Value::Null => None,
                        Value::String(m) => Some(RowSource::Model(m)),
                        Value::Mapping(m) => {
                            let get = |k: &str| m.get(Value::String(k.into()));
                            match get("kind").and_then(Value::as_str) {
                                Some("zero") => Some(RowSource::Zero),
                                Some("model_token") => {
                                    let model = get("model").and_then(Value::as_str).ok_or_else(|| {
                                        self.field(&format!("{at}.source"), "a model_token source needs `model`".into())
                                    })?;
                                    let token_id = get("token_id").and_then(Value::as_u64).map(|n| n as usize);
                                    let token = get("token").and_then(Value::as_str).map(str::to_string);
                                    if token_id.is_some() == token.is_some() {
                                        return Err(self.field(
                                            &format!("{at}.source"),
                                            "give exactly one of `token_id` and `token`".into(),
                                        ));
                                    }
                                    Some(RowSource::ModelToken { model: model.to_string(), token_id, token })
                                }
                                _ => {
                                    return Err(self.field(
                                        &format!("{at}.source"),
                                        "expected a model name, `{kind: zero}` or `{kind: model_token, model, token | token_id}`".into(),
                                    ))
                                }
                            }
                        }
                        other => {
                            return Err(self.field(
                                &format!("{at}.source"),
                                format!(
                                    "expected a model name or a mapping, found {}",
                                    describe(&other)
                                ),
                            ))
                        }
                    }
                }
                _ => {
                    return Err(
                        self.field(at, "unknown key; a token has `source` and `force`".into())
                    )
                }
            }
        }
        Ok(row)
    }

    /// A `layer_range: [start, end]` (half-open, as mergekit reads it).
    fn layer_range(&self, at: &str, v: Value) -> Result<[usize; 2]> {
        let field = format!("{at}.layer_range");
        let bad = |found: &Value| {
            self.field(
                &field,
                format!(
                    "expected two non-negative integers [start, end], found {}",
                    describe(found)
                ),
            )
        };
        let Value::Sequence(items) = &v else {
            return Err(bad(&v));
        };
        let numbers: Option<Vec<usize>> = items
            .iter()
            .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
            .collect();
        match numbers.as_deref() {
            Some(&[a, b]) if a < b => Ok([a, b]),
            Some(&[a, b]) => Err(self.field(
                &field,
                format!("[{a}, {b}] is empty: the range is [start, end) with start < end"),
            )),
            _ => Err(bad(&v)),
        }
    }

    /// The `slices` list.
    fn slices(&self, v: Value) -> Result<Vec<Slice>> {
        let Value::Sequence(entries) = v else {
            return Err(self.field(
                "slices",
                format!(
                    "expected a list of `- sources: [...]` entries, found {}",
                    describe(&v)
                ),
            ));
        };
        let mut out = Vec::with_capacity(entries.len());
        for (i, entry) in entries.into_iter().enumerate() {
            let at = format!("slices[{i}]");
            let Value::Mapping(map) = entry else {
                return Err(self.field(
                    &at,
                    format!(
                        "expected a mapping with `sources`, found {}",
                        describe(&entry)
                    ),
                ));
            };
            let mut slice = Slice {
                sources: Vec::new(),
                base_model: None,
                parameters: BTreeMap::new(),
            };
            let mut has_sources = false;
            for (key, value) in map {
                match key.as_str() {
                    Some("sources") => {
                        has_sources = true;
                        let Value::Sequence(sources) = value else {
                            return Err(self.field(
                                &format!("{at}.sources"),
                                format!(
                                    "expected a list of `- model: NAME` entries with `layer_range`, found {}",
                                    describe(&value)
                                ),
                            ));
                        };
                        for (j, src) in sources.into_iter().enumerate() {
                            let (model, range) =
                                self.source(&format!("{at}.sources[{j}]"), src, true)?;
                            slice.sources.push(SliceSource {
                                model,
                                layer_range: range.expect("required when sliced"),
                            });
                        }
                    }
                    Some("base_model") if !value.is_null() => {
                        slice.base_model = Some(self.string(value, &format!("{at}.base_model"))?)
                    }
                    Some("parameters") if !value.is_null() => {
                        slice.parameters = self.parameters(value, &format!("{at}.parameters"))?
                    }
                    Some("base_model" | "parameters") => {}
                    // Declared by mergekit's config model but read by nothing
                    // in its planner: accepted and, as there, without effect.
                    Some("residual_weight") => {}
                    Some(other) => {
                        return Err(self.field(
                            &at,
                            format!(
                                "unknown key `{other}`; a slice has `sources`, `base_model` and `parameters`"
                            ),
                        ))
                    }
                    None => {
                        return Err(self.field(
                            &at,
                            format!("keys must be strings, found {}", describe(&key)),
                        ))
                    }
                }
            }
            if !has_sources || slice.sources.is_empty() {
                return Err(self.field(
                    &at,
                    "needs `sources`, a list of models with `layer_range`".into(),
                ));
            }
            out.push(slice);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FilterEntry, TensorCtx};

    fn read(yaml: &str) -> Result<MergeSpec> {
        from_yaml(yaml, Path::new("configs/merge.yml"))
    }

    fn config_error(yaml: &str) -> String {
        match read(yaml) {
            Err(e @ MergeError::Config { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("configs/merge.yml"),
                    "message names the file: {text}"
                );
                text
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    fn num(x: f64) -> ParamValue {
        ParamValue::Number(x)
    }

    #[test]
    fn ties_drops_the_base_from_the_models() {
        let spec = read(
            "models:
  - model: mistralai/Mistral-7B-v0.1
    # no parameters necessary for base model
  - model: OpenPipe/mistral-ft-optimized-1218
    parameters:
      density: 0.5
      weight: 0.5
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: true
dtype: float16
",
        )
        .unwrap();
        assert_eq!(spec.method, "ties");
        assert_eq!(spec.dialect, Dialect::Mergekit);
        assert_eq!(spec.base.as_deref(), Some("mistralai/Mistral-7B-v0.1"));
        let names: Vec<&str> = spec.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "OpenPipe/mistral-ft-optimized-1218",
                "mlabonne/NeuralHermes-2.5-Mistral-7B"
            ]
        );
        assert_eq!(spec.models[0].weight, Some(num(0.5)));
        assert_eq!(spec.models[1].weight, Some(num(0.3)));
        assert_eq!(spec.models[1].parameters["density"], num(0.5));
        assert!(!spec.models[1].parameters.contains_key("weight"));
        assert_eq!(spec.parameters["normalize"], ParamValue::Bool(true));
        assert_eq!(spec.dtype.as_deref(), Some("float16"));
        assert_eq!(spec.seed, None);
    }

    #[test]
    fn slerp_puts_the_base_first_and_has_no_base() {
        let spec = read(
            "models:
  - model: OpenPipe/mistral-ft-optimized-1218
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
merge_method: slerp
base_model: mlabonne/NeuralHermes-2.5-Mistral-7B
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
",
        )
        .unwrap();
        assert_eq!(spec.base, None);
        // The base is listed second but comes first: t = 0 is the base.
        let names: Vec<&str> = spec.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "mlabonne/NeuralHermes-2.5-Mistral-7B",
                "OpenPipe/mistral-ft-optimized-1218"
            ]
        );
        let t = &spec.parameters["t"];
        assert_eq!(
            *t,
            ParamValue::Filtered(vec![
                FilterEntry {
                    filter: Some("self_attn".into()),
                    value: ParamValue::Gradient(vec![0.0, 0.5, 0.3, 0.7, 1.0]),
                },
                FilterEntry {
                    filter: Some("mlp".into()),
                    value: ParamValue::Gradient(vec![1.0, 0.5, 0.7, 0.3, 0.0]),
                },
                FilterEntry {
                    filter: None,
                    value: num(0.5),
                },
            ])
        );
        // Layer 2 of 5 sits at depth 2/4 = 0.5, point 0.5·4 = 2 of the lists:
        // self_attn → 0.3, mlp → 0.7, anything else the default 0.5.
        let at = |name: &str| t.resolve(&TensorCtx::new(name, 5)).unwrap();
        assert_eq!(at("model.layers.2.self_attn.q_proj.weight"), 0.3);
        assert_eq!(at("model.layers.2.mlp.up_proj.weight"), 0.7);
        assert_eq!(at("model.layers.2.input_layernorm.weight"), 0.5);
        assert_eq!(spec.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn slerp_with_only_the_other_model_listed() {
        let spec = read("merge_method: slerp\nbase_model: ./a/\nmodels:\n  - model: b\nparameters:\n  t: 0.25\n").unwrap();
        let names: Vec<&str> = spec.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["./a/", "b"]);
        let text = config_error(
            "merge_method: slerp\nbase_model: a\nmodels:\n  - model: b\n  - model: c\n",
        );
        assert!(
            text.contains("`models`") && text.contains("found 2 other"),
            "{text}"
        );
        let text = config_error("merge_method: slerp\nmodels:\n  - model: b\n  - model: c\n");
        assert!(text.contains("`base_model`"), "{text}");
    }

    #[test]
    fn linear_ignores_the_base() {
        let spec = read(
            "merge_method: linear
base_model: a
models:
  - model: a
    parameters:
      weight: 1.0
  - model: b
    parameters:
      weight: 0.5
dtype: float32
",
        )
        .unwrap();
        assert_eq!(spec.base, None);
        let names: Vec<&str> = spec.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(spec.models[0].weight, Some(num(1.0)));
        assert_eq!(spec.models[1].weight, Some(num(0.5)));
        assert!(spec.parameters.is_empty());
    }

    #[test]
    fn dare_ties_with_per_model_density_and_weight() {
        let spec = read(
            "models:
  - model: ./base
  - model: ./math
    parameters:
      density: 0.53
      weight: 0.4
  - model: ./code
    parameters:
      density: [1, 0.7, 0.1]
      weight: 0.6
merge_method: dare_ties
base_model: base
parameters:
  int8_mask: true
  normalize: false
seed: 42
tokenizer_source: base
out_dtype: bf16
dtype: float32
",
        )
        .unwrap();
        assert_eq!(spec.method, "dare_ties");
        // `./base` and `base` are the same model: dropped from the models.
        assert_eq!(spec.base.as_deref(), Some("base"));
        assert_eq!(spec.models.len(), 2);
        assert_eq!(spec.models[0].name, "./math");
        assert_eq!(spec.models[0].weight, Some(num(0.4)));
        assert_eq!(spec.models[0].parameters["density"], num(0.53));
        assert_eq!(spec.models[1].weight, Some(num(0.6)));
        assert_eq!(
            spec.models[1].parameters["density"],
            ParamValue::Gradient(vec![1.0, 0.7, 0.1])
        );
        // int8_mask is dropped, normalize kept.
        assert_eq!(spec.parameters.keys().collect::<Vec<_>>(), ["normalize"]);
        assert_eq!(spec.seed, Some(42));
        // out_dtype wins over dtype (our dtype is the output dtype).
        assert_eq!(spec.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn fusionbench_names_keep_the_mergekit_dialect() {
        let spec = read(
            "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: base\n  - model: math\nparameters:\n  lambda: 0.5\n",
        )
        .unwrap();
        assert_eq!(spec.dialect, Dialect::Mergekit);
        assert_eq!(spec.base.as_deref(), Some("base"));
        assert_eq!(spec.models, vec![ModelSpec::named("math")]);
        assert_eq!(spec.parameters["lambda"], num(0.5));
    }

    #[test]
    fn slices_read_with_their_ranges_and_parameters() {
        let yaml = "slices:
  - sources:
      - model: a
        layer_range: [0, 2]
        parameters: {weight: 0.3}
      - model: ./b/
        layer_range: [2, 4]
    parameters:
      t: [0, 1]
  - sources:
      - model: b
        layer_range: [1, 4]
    base_model: b
    residual_weight: 0.5
merge_method: slerp
base_model: a
dtype: bfloat16
";
        let Config::Sliced(s) = super::read(yaml, Path::new("s.yml")).unwrap() else {
            panic!("a sliced config");
        };
        assert_eq!(s.method, "slerp");
        assert_eq!(s.base_model.as_deref(), Some("a"));
        assert_eq!(s.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(s.slices.len(), 2);
        assert_eq!(s.slices[0].sources[0].layer_range, [0, 2]);
        assert_eq!(s.slices[0].sources[0].model.weight, Some(num(0.3)));
        assert_eq!(s.slices[0].sources[1].layer_range, [2, 4]);
        assert_eq!(
            s.slices[0].parameters["t"],
            ParamValue::Gradient(vec![0.0, 1.0])
        );
        assert_eq!(s.slices[1].base_model.as_deref(), Some("b"));
        assert_eq!(s.num_layers(), 5);
        // `./b/` and `b` are one model; the base comes first.
        assert_eq!(s.models(), ["a", "./b/"]);
        // The gateway's importer takes whole models only.
        let e = read(yaml).unwrap_err().to_string();
        assert!(e.contains("slices"), "{e}");
    }

    #[test]
    fn bad_slices_name_the_field() {
        let cases = [
            (
                "slices:\n  - sources:\n      - model: a\nmerge_method: passthrough\n",
                "`slices[0].sources[0]`: missing `layer_range`",
            ),
            (
                "slices:\n  - sources:\n      - model: a\n        layer_range: [3, 3]\nmerge_method: passthrough\n",
                "`slices[0].sources[0].layer_range`: [3, 3] is empty",
            ),
            (
                "slices:\n  - sources:\n      - model: a\n        layer_range: [0, -1]\nmerge_method: passthrough\n",
                "`slices[0].sources[0].layer_range`: expected two non-negative integers",
            ),
            (
                "slices:\n  - sources: []\n    extra: 1\nmerge_method: passthrough\n",
                "`slices[0]`: unknown key `extra`",
            ),
            (
                "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 1]\nmodels:\n  - model: a\nmerge_method: passthrough\n",
                "not both",
            ),
            (
                "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 1]\nmerge_method: frobnicate\n",
                "`merge_method`",
            ),
        ];
        for (yaml, want) in cases {
            let e = super::read(yaml, Path::new("s.yml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }

    #[test]
    fn tokenizer_settings_are_read() {
        let parse = |yaml: &str| super::read(yaml, Path::new("t.yml"));
        let models = "merge_method: linear\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n";
        let Config::Merge(_, t) = parse(&format!("{models}tokenizer_source: union\n")).unwrap()
        else {
            panic!()
        };
        assert_eq!(t.source, TokenizerSource::Union);
        assert_eq!(t.base_model.as_deref(), Some("a"));
        let Config::Merge(_, t) = parse(&format!(
            "{models}tokenizer_source: ./b\nchat_template: chatml\n"
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(t.source, TokenizerSource::Model("./b".into()));
        assert_eq!(t.chat_template.as_deref(), Some("chatml"));
        let block = format!(
            "{models}tokenizer:\n  pad_to_multiple_of: 32\n  tokens:\n    <tool>:\n      source: b\n    \
             <pad>:\n      source: {{kind: zero}}\n      force: true\n    \
             <eot>:\n      source: {{kind: model_token, model: a, token: </s>}}\n"
        );
        let Config::Merge(_, t) = parse(&block).unwrap() else {
            panic!()
        };
        // The block's source defaults to union, as in mergekit.
        assert_eq!(t.source, TokenizerSource::Union);
        assert_eq!(t.pad_to_multiple_of, Some(32));
        assert_eq!(
            t.tokens["<tool>"].source,
            Some(RowSource::Model("b".into()))
        );
        assert_eq!(
            t.tokens["<pad>"],
            TokenRow {
                source: Some(RowSource::Zero),
                force: true
            }
        );
        assert_eq!(
            t.tokens["<eot>"].source,
            Some(RowSource::ModelToken {
                model: "a".into(),
                token_id: None,
                token: Some("</s>".into())
            })
        );
        for (extra, want) in [
            (
                "tokenizer_source: union\ntokenizer:\n  source: base\n",
                "not both",
            ),
            (
                "tokenizer:\n  pad_to_multiple_of: 0\n",
                "tokenizer.pad_to_multiple_of",
            ),
            ("tokenizer:\n  sauce: union\n", "unknown key `sauce`"),
            (
                "tokenizer:\n  tokens:\n    x:\n      source: {kind: model_token, model: a}\n",
                "exactly one of `token_id` and `token`",
            ),
        ] {
            let e = parse(&format!("{models}{extra}")).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        // The gateway's importer takes no tokenizer settings.
        let e = read(&format!("{models}tokenizer_source: union\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer"), "{e}");
    }

    #[test]
    fn magnitude_pruning_keeps_its_optional_base() {
        // Diff mode prunes θ1 − θ0: `base_model` is the base, whether or not
        // it is listed among the models too.
        let listed = "merge_method: magnitude_pruning\nbase_model: ./base\nmodels:\n  - model: base\n  - model: math\nparameters:\n  prune_ratio: 0.25\n  prune_type: major\n";
        let unlisted = "merge_method: magnitude_pruning\nbase_model: base\nmodels:\n  - model: math\nparameters:\n  prune_ratio: 0.25\n  prune_type: major\n";
        for yaml in [listed, unlisted] {
            let spec = read(yaml).unwrap();
            assert!(
                spec.base.as_deref().is_some_and(|b| same_model(b, "base")),
                "{spec:?}"
            );
            assert_eq!(spec.models, vec![ModelSpec::named("math")]);
            // It validates as a one-model diff-mode merge.
            crate::methods::build(&spec).expect("a valid magnitude_pruning spec");
        }
        // Without `base_model` there is no base (mode: weights).
        let spec = read(
            "merge_method: magnitude_pruning\nmodels:\n  - model: math\nparameters:\n  mode: weights\n",
        )
        .unwrap();
        assert_eq!(spec.base, None);
        assert_eq!(spec.models.len(), 1);
        crate::methods::build(&spec).expect("a valid weights-mode spec");
    }

    #[test]
    fn lists_of_names_and_null_parameters() {
        let spec = read(
            "merge_method: iso_c\nbase_model: base\nmodels:\n  - model: a\n  - model: b\nparameters:\n  exclude_keys: [model.embed_tokens.weight]\n  scaling_factor: null\n",
        )
        .unwrap();
        assert_eq!(
            spec.parameters["exclude_keys"],
            ParamValue::Names(vec!["model.embed_tokens.weight".into()])
        );
        // `null` (FusionBench's way of writing a default) leaves it out.
        assert!(!spec.parameters.contains_key("scaling_factor"));
        let spec = read(
            "merge_method: tsv_m\nbase_model: base\nmodels:\n  - model: a\nparameters:\n  exclude_keys: null\n",
        )
        .unwrap();
        assert!(spec.parameters.is_empty());
    }

    /// `to_yaml` then `from_yaml`: the same merge, in the mergekit dialect.
    fn round_trip(spec: &MergeSpec) -> MergeSpec {
        let text = to_yaml(spec).unwrap();
        let back = read(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back.dialect, Dialect::Mergekit);
        back
    }

    #[test]
    fn written_yaml_reads_back_as_the_same_merge() {
        // FusionBench task_arithmetic without λ: the YAML spells out 0.3,
        // which mergekit would otherwise read as 1.0.
        let mut spec = MergeSpec::new("task_arithmetic", Some("base"), &["a", "b"]);
        spec.models[0].weight = Some(num(0.25));
        spec.models[1].weight = Some(ParamValue::Gradient(vec![0.5, 1.0]));
        let back = round_trip(&spec);
        assert_eq!(back.base.as_deref(), Some("base"));
        assert_eq!(back.models, spec.models);
        assert_eq!(back.parameters["scaling_coefficient"], num(0.3));
        assert_eq!(back.parameters.len(), 1);
        // A given λ (under an alias too) is written as given, not doubled.
        let back = round_trip(&spec.clone().with("lambda", 0.7));
        assert_eq!(back.parameters.len(), 1);
        assert_eq!(back.parameters["lambda"], num(0.7));

        let mut ties =
            MergeSpec::new("ties_merging", Some("base"), &["a", "b"]).with("density", 0.2);
        ties.models[1].parameters.insert("density".into(), num(0.5));
        ties.seed = Some(7);
        ties.dtype = Some("bfloat16".into());
        let back = round_trip(&ties);
        assert_eq!(back.models, ties.models);
        assert_eq!(back.seed, Some(7));
        assert_eq!(back.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(back.parameters["density"], num(0.2));

        // A per-model parameter whose default differs (breadcrumbs' density:
        // 0.9, 1 in mergekit) is written once for every model.
        let crumbs = MergeSpec::new("breadcrumbs", Some("base"), &["a", "b"]);
        let back = round_trip(&crumbs);
        assert_eq!(back.parameters["density"], num(0.9));
        assert_eq!(back.parameters["scaling_coefficient"], num(0.3));

        let slerp = MergeSpec::new("slerp", None, &["a", "b"]).with("t", 0.3);
        let back = round_trip(&slerp);
        assert_eq!(back.base, None);
        assert_eq!(back.models, slerp.models);
        let avg = MergeSpec::new("simple_average", None, &["a", "b", "c"]);
        let text = to_yaml(&avg).unwrap();
        assert!(!text.contains("base_model"), "{text}");
        assert_eq!(round_trip(&avg).models, avg.models);
        // Filter lists survive too.
        let filtered = MergeSpec::new("task_arithmetic", Some("base"), &["a"]).with_value(
            "scaling_coefficient",
            ParamValue::Filtered(vec![
                FilterEntry {
                    filter: Some("mlp".into()),
                    value: num(0.5),
                },
                FilterEntry {
                    filter: None,
                    value: num(1.0),
                },
            ]),
        );
        assert_eq!(round_trip(&filtered).parameters, filtered.parameters);
        let held = MergeSpec::new("task_arithmetic", Some("base"), &["a"])
            .held_as(crate::spec::Residency::sparse(0.1));
        assert!(to_yaml(&held)
            .unwrap_err()
            .to_string()
            .contains("residency"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = config_error("merge_method: linear\nmodels:\n  - model: a\ngate_mode: hidden\n");
        assert!(text.contains("unknown key `gate_mode`"), "{text}");
        let text = config_error("merge_method: linear\nmodels:\n  - model: a\n    lora: x\n");
        assert!(
            text.contains("`models[0]`") && text.contains("`lora`"),
            "{text}"
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: &[(&str, &str)] = &[
            ("models:\n  - model: a\n", "missing `merge_method`"),
            ("merge_method: linear\n", "missing `models`"),
            ("merge_method: nonsense\nmodels:\n  - model: a\n", "`merge_method`: unknown merge method `nonsense`"),
            ("merge_method: ties\nmodels:\n  - model: a\n", "`base_model`"),
            ("merge_method: linear\nmodels:\n  - model: a\ndtype: int8\n", "`dtype`: unsupported dtype `int8`"),
            ("merge_method: linear\nmodels:\n  - model: a\nseed: -3\n", "`seed`"),
            ("merge_method: linear\nmodels:\n  - a\n", "`models[0]`: expected a mapping"),
            ("merge_method: linear\nmodels:\n  - parameters: {weight: 1}\n", "`models[0]`: missing `model`"),
            (
                "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n    parameters:\n      weight: {x: 1}\n",
                "`models[1].parameters.weight`",
            ),
            ("merge_method: linear\nmodels:\n  - model: a\nparameters:\n  t: [0, x]\n", "`parameters.t`"),
            ("merge_method: [linear\n", "not valid YAML"),
            ("- linear\n", "expected a mapping"),
        ];
        for (yaml, needle) in cases {
            let text = config_error(yaml);
            assert!(text.contains(needle), "`{needle}` not in: {text}");
        }
    }
}
