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
//! | `tokenizer_source` | accepted only as `base` (the default), then ignored |
//!
//! `slices` and `merge_method: passthrough` (layer stacking) are refused as
//! unsupported; any other key is an error naming it and the file. The global
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

use std::collections::BTreeMap;
use std::path::Path;

use serde_yaml_ng::{Mapping, Value};

use crate::error::{MergeError, Result};
use crate::methods::{self, BaseUse};
use crate::spec::compact::dtype_name;
use crate::spec::{Dialect, MergeSpec, ModelSpec, ParamValue};

/// The top-level keys we read.
const KEYS: &[&str] = &[
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "seed",
    "tokenizer_source",
];

/// Reads the mergekit config `text` (from the file `path`, for messages).
pub fn from_yaml(text: &str, path: &Path) -> Result<MergeSpec> {
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
                seed = Some(
                    value
                        .as_u64()
                        .ok_or_else(|| file.field("seed", format!("expected a non-negative integer, found {}", describe(&value))))?,
                )
            }
            "tokenizer_source" => {
                if value.as_str() != Some("base") {
                    return Err(MergeError::Unsupported {
                        feature: "`tokenizer_source`".into(),
                        hint: format!(
                            "only `tokenizer_source: base` is supported (the merged model keeps the base's tokenizer); `{}` sets {}",
                            file.path.display(),
                            short(&value)
                        ),
                    });
                }
            }
            "slices" => {
                return Err(MergeError::Unsupported {
                    feature: "`slices`".into(),
                    hint: format!(
                        "layer slices are not implemented; in `{}` list the models under `models` to merge every layer",
                        file.path.display()
                    ),
                })
            }
            other => {
                return Err(file.err(format!(
                    "unknown key `{other}`; accepted keys: {} (`slices` is not supported)",
                    KEYS.join(", ")
                )))
            }
        }
    }

    let method = method.ok_or_else(|| file.err("missing `merge_method`".into()))?;
    if method == "passthrough" {
        return Err(MergeError::Unsupported {
            feature: "merge_method `passthrough`".into(),
            hint: format!(
                "layer stacking is not implemented yet; use a weight-merging method in `{}`",
                file.path.display()
            ),
        });
    }
    let info = methods::lookup(&method).map_err(|e| file.field("merge_method", e.to_string()))?;
    let models = models
        .ok_or_else(|| file.err("missing `models` (the list of `- model: NAME` entries)".into()))?;
    // int8_mask only changes how mergekit stores its masks, not the result.
    if matches!(parameters.get("int8_mask"), Some(ParamValue::Bool(_))) {
        parameters.remove("int8_mask");
    }

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

    Ok(MergeSpec {
        method,
        pool: None,
        base,
        models,
        parameters,
        seed,
        dtype: out_dtype.or(dtype),
        dialect: Dialect::Mergekit,
        residency: None,
    })
}

/// Whether two model references name the same model (`./a/` and `a`).
fn same_model(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> &str {
        let s = s.trim().trim_end_matches('/');
        s.strip_prefix("./").unwrap_or(s)
    }
    norm(a) == norm(b)
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
        let at = format!("models[{i}]");
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
        for (key, value) in map {
            match key.as_str() {
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
                    return Err(self.field(
                        &at,
                        format!(
                            "unknown key `{other}`; a model entry has `model` and `parameters`"
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
        let name = name.ok_or_else(|| self.field(&at, "missing `model`".into()))?;
        let mut parameters = self.parameters(
            Value::Mapping(parameters),
            &format!("models[{i}].parameters"),
        )?;
        let weight = parameters.remove("weight");
        Ok(ModelSpec {
            name,
            weight,
            parameters,
        })
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
    fn slices_and_passthrough_are_unsupported() {
        let slices = "slices:
  - sources:
      - model: a
        layer_range: [0, 32]
      - model: b
        layer_range: [0, 32]
merge_method: slerp
base_model: a
";
        match read(slices) {
            Err(MergeError::Unsupported { feature, .. }) => assert_eq!(feature, "`slices`"),
            other => panic!("expected Unsupported, got {other:?}"),
        }
        match read("merge_method: passthrough\nmodels:\n  - model: a\n") {
            Err(MergeError::Unsupported { feature, .. }) => {
                assert!(feature.contains("passthrough"))
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
        match read("merge_method: linear\nmodels:\n  - model: a\ntokenizer_source: union\n") {
            Err(MergeError::Unsupported { feature, hint }) => {
                assert_eq!(feature, "`tokenizer_source`");
                assert!(hint.contains("`union`"), "{hint}");
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
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
