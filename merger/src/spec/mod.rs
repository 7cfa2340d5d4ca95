//! The merge spec: one canonical structure with three ways to write it.
//!
//! 1. Structured ([`MergeSpec`], JSON in a request's `merge` field or YAML).
//! 2. The compact string of the OpenAI `model` field ([`compact::parse`]):
//!    `ties_merging(math,code;density=0.2,scaling_coefficient=0.3)`.
//! 3. A mergekit YAML file ([`crate::mergekit::from_yaml`], which places
//!    the base by the method registry's rules).
//!
//! [`canonical`] computes the id that equal specs share.

pub mod canonical;
pub mod compact;
pub mod param;
pub mod residency;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use param::{FilterEntry, ParamValue, TensorCtx};
pub use residency::{Form, Residency};

/// Which convention a spec was written in; decides defaults where
/// FusionBench and mergekit differ (e.g. task_arithmetic's λ: 0.3 vs 1.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    /// FusionBench names and defaults (structured and compact specs).
    #[default]
    Fusionbench,
    /// mergekit names and defaults (mergekit YAML).
    Mergekit,
}

/// One input model of a merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A registered checkpoint name (or, for `fusion merge`, a folder path).
    pub name: String,
    /// Per-model weight (mergekit `parameters.weight`), when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<ParamValue>,
    /// Other per-model parameters (`density`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, ParamValue>,
}

impl ModelSpec {
    /// A model with no per-model parameters.
    pub fn named(name: impl Into<String>) -> Self {
        ModelSpec {
            name: name.into(),
            weight: None,
            parameters: BTreeMap::new(),
        }
    }
}

/// A merge as requested: method, inputs and parameters, not yet validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeSpec {
    /// Method name (FusionBench or mergekit spelling).
    pub method: String,
    /// Pool the checkpoint names belong to (gateway), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The base (pretrained) checkpoint θ0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// The fine-tuned experts, in order.
    pub models: Vec<ModelSpec>,
    /// Global parameters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, ParamValue>,
    /// Seed of random methods (dare); part of the cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Output dtype (`float32`, `float16`, `bfloat16`); default: the base's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Naming convention, which decides defaults.
    #[serde(default)]
    pub dialect: Dialect,
    /// How the merge is held in memory (default: its own dense weights);
    /// part of the merge id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residency: Option<Residency>,
    /// The task whose view a per-task retrieval merge is (`tall_masks`,
    /// `emr_merging`): the structured spelling of the parameter `task`,
    /// which validation moves there ([`MergeSpec::fold_task`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

impl MergeSpec {
    /// A spec for `method` over `models` with no parameters.
    pub fn new(method: &str, base: Option<&str>, models: &[&str]) -> Self {
        MergeSpec {
            method: method.to_string(),
            pool: None,
            base: base.map(str::to_string),
            models: models.iter().map(|m| ModelSpec::named(*m)).collect(),
            parameters: BTreeMap::new(),
            seed: None,
            dtype: None,
            dialect: Dialect::Fusionbench,
            residency: None,
            task: None,
        }
    }

    /// Moves `task` into the parameters (where the methods read it); a
    /// different `task` in both places is refused.
    pub fn fold_task(&mut self) -> crate::error::Result<()> {
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match self.parameters.get("task") {
            Some(ParamValue::Text(t)) if *t == task => Ok(()),
            Some(other) => Err(crate::error::MergeError::BadParameter {
                param: "task".into(),
                reason: format!(
                    "given twice, as `task: {task}` and as the parameter `task={}`",
                    crate::spec::compact::value_to_compact(other)
                ),
            }),
            None => {
                self.parameters
                    .insert("task".into(), ParamValue::Text(task));
                Ok(())
            }
        }
    }

    /// Sets how the merge is held (builder style).
    pub fn held_as(mut self, residency: Residency) -> Self {
        self.residency = Some(residency);
        self
    }

    /// Whether the merge is held as a delta over a resident base.
    pub fn is_delta(&self) -> bool {
        self.residency.as_ref().is_some_and(Residency::is_delta)
    }

    /// Sets a global numeric parameter (builder style).
    pub fn with(mut self, key: &str, value: f64) -> Self {
        self.parameters
            .insert(key.to_string(), ParamValue::Number(value));
        self
    }

    /// Sets a global parameter of any kind (builder style).
    pub fn with_value(mut self, key: &str, value: ParamValue) -> Self {
        self.parameters.insert(key.to_string(), value);
        self
    }

    /// Every list in the spec's parameters (gradients and filter lists, at
    /// any depth) with its length, named by its path:
    /// `parameters.t`, `models[math].weight`, `parameters.t[0].value`.
    pub fn lists(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for (k, v) in &self.parameters {
            param::lists_of(&format!("parameters.{k}"), v, &mut out);
        }
        for m in &self.models {
            if let Some(w) = &m.weight {
                param::lists_of(&format!("models[{}].weight", m.name), w, &mut out);
            }
            for (k, v) in &m.parameters {
                param::lists_of(&format!("models[{}].{k}", m.name), v, &mut out);
            }
        }
        out
    }

    /// Every checkpoint name the spec refers to: base first, then models.
    pub fn checkpoint_names(&self) -> Vec<&str> {
        self.base
            .iter()
            .map(String::as_str)
            .chain(self.models.iter().map(|m| m.name.as_str()))
            .collect()
    }
}
