//! The parameters of a data-driven spec, validated apart from execution
//! into [`DataParams`]. The declarations are data in the registry
//! ([`crate::methods::data_driven`]); numbers may be written as strings, a
//! bool as `true`/`false` (or the strings), and any other key is an error
//! listing the accepted ones.

use crate::bounds::{Bounds, Work};
use crate::error::{MergeError, Result};
use crate::methods::data_driven::{
    ADAMERGING, ADA_BATCH_SIZE, ADA_LR, ADA_STEPS, ADA_SVD, CLAMP, EPSILON, FISHER_BATCH_SIZE,
    FISHER_MERGING, GATE_K, GRANULARITY, INIT, MINIMAL_FISHER_WEIGHT, NORMALIZE_FISHER_WEIGHT,
    NUM_SAMPLES, REDUCE_NON_DIAGONAL_RATIO, REGMEAN,
};
use crate::methods::schema::{DefaultValue, Param};
use crate::moe::params::{describe, integer, number};
use crate::spec::{MergeSpec, ParamValue};

use super::DataMethod;

/// One λ per expert, or one per expert per parameter tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// Task-wise AdaMerging: T coefficients.
    Task,
    /// Layer-wise AdaMerging: T coefficients per parameter tensor.
    Layer,
}

/// A validated data-driven spec.
#[derive(Debug, Clone, PartialEq)]
pub struct DataParams {
    /// The method.
    pub method: DataMethod,
    /// The base θ0 (required by `adamerging` and `ada_svd`).
    pub base: Option<String>,
    /// The experts, in spec order.
    pub experts: Vec<String>,
    /// Calibration inputs read per expert.
    pub num_samples: usize,
    /// Inputs per batch (Fisher: per gradient; AdaMerging: per task per
    /// step).
    pub batch_size: usize,
    /// Fisher: weigh experts by the inverse norms of their Fishers.
    pub normalize_fisher_weight: bool,
    /// Fisher: guard of the norm normalisation.
    pub epsilon: f64,
    /// Fisher: added to every Fisher entry.
    pub minimal_fisher_weight: f64,
    /// RegMean: α.
    pub reduce_non_diagonal_ratio: f64,
    /// AdaMerging: task- or layer-wise.
    pub granularity: Granularity,
    /// AdaMerging: initial λ.
    pub init: f64,
    /// AdaMerging: Adam learning rate.
    pub lr: f64,
    /// AdaMerging: Adam steps.
    pub steps: usize,
    /// AdaMerging: clamp λ to [0, 1].
    pub clamp: bool,
    /// AdaSVD: gate rank.
    pub gate_k: usize,
    /// Seed of AdaMerging's batch order.
    pub seed: u64,
    /// Stored dtype of the result (default: the reference's).
    pub dtype: Option<String>,
}

impl DataMethod {
    /// The parameters the method declares.
    pub fn params(self) -> &'static [&'static Param] {
        match self {
            DataMethod::FisherMerging => FISHER_MERGING,
            DataMethod::Regmean | DataMethod::RegmeanPlusPlus => REGMEAN,
            DataMethod::Adamerging => ADAMERGING,
            DataMethod::AdaSvd => ADA_SVD,
        }
    }
}

fn boolean(v: Option<&ParamValue>, p: &Param) -> Result<bool> {
    match v {
        None => match p.default {
            DefaultValue::Bool(b) => Ok(b),
            _ => Err(MergeError::UndeclaredParameter {
                method: "data-driven merge".into(),
                param: format!("{} (declared without a bool default)", p.name),
            }),
        },
        Some(ParamValue::Bool(b)) => Ok(*b),
        Some(ParamValue::Text(s)) if s.trim() == "true" => Ok(true),
        Some(ParamValue::Text(s)) if s.trim() == "false" => Ok(false),
        Some(other) => Err(MergeError::BadParameter {
            param: p.name.into(),
            reason: format!("expected true or false, got {}", describe(other)),
        }),
    }
}

impl DataParams {
    /// Validates `spec` against the default [`Bounds`].
    pub fn from_spec(spec: &MergeSpec) -> Result<Self> {
        Self::from_spec_bounded(spec, &Bounds::default())
    }

    /// Validates `spec`: the method, the base where it is needed, at least
    /// one expert, every parameter's type and range and no unknown one;
    /// `num_samples`, `batch_size`, `steps` and `gate_k` against `bounds`.
    pub fn from_spec_bounded(spec: &MergeSpec, bounds: &Bounds) -> Result<Self> {
        bounds.check_lists(spec)?;
        let method =
            DataMethod::from_name(&spec.method).ok_or_else(|| MergeError::UnknownMethod {
                name: spec.method.clone(),
                known: DataMethod::ALL.map(DataMethod::name).join(", "),
            })?;
        let name = method.name();
        if method.needs_base() && spec.base.is_none() {
            return Err(MergeError::MissingBase {
                method: name.into(),
            });
        }
        if spec.models.is_empty() {
            return Err(MergeError::ModelCount {
                method: name.into(),
                expected: "at least 1".into(),
                found: 0,
            });
        }
        let declared = method.params();
        let accepted: Vec<&str> = declared.iter().map(|p| p.name).collect();
        let unknown = |param: String| MergeError::UnknownParameter {
            method: name.into(),
            param,
            accepted: accepted.join(", "),
        };
        if let Some(k) = spec
            .parameters
            .keys()
            .find(|k| !accepted.contains(&k.as_str()))
        {
            return Err(unknown(k.clone()));
        }
        for m in &spec.models {
            if m.weight.is_some() {
                return Err(unknown(format!("models[{}].weight", m.name)));
            }
            if let Some(k) = m.parameters.keys().next() {
                return Err(unknown(format!("models[{}].{k}", m.name)));
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = spec.models.iter().find(|m| !seen.insert(m.name.as_str())) {
            return Err(MergeError::BadParameter {
                param: "models".into(),
                reason: format!("`{}` is named twice", dup.name),
            });
        }
        if let Some(d) = &spec.dtype {
            if runtime::checkpoint::parse_dtype(d).is_none() {
                return Err(MergeError::BadParameter {
                    param: "dtype".into(),
                    reason: format!("`{d}` is not one of float32, float16, bfloat16"),
                });
            }
        }
        let get = |p: &Param| spec.parameters.get(p.name);
        let batch_param = match method {
            DataMethod::Adamerging => &ADA_BATCH_SIZE,
            _ => &FISHER_BATCH_SIZE,
        };
        let num_samples = integer(get(&NUM_SAMPLES), &NUM_SAMPLES)?;
        let batch_size = integer(get(batch_param), batch_param)?;
        let steps = integer(get(&ADA_STEPS), &ADA_STEPS)?;
        let gate_k = integer(get(&GATE_K), &GATE_K)?;
        let granularity = match get(&GRANULARITY) {
            None => Granularity::Layer,
            Some(ParamValue::Text(s)) if s == "layer" => Granularity::Layer,
            Some(ParamValue::Text(s)) if s == "task" => Granularity::Task,
            Some(v) => {
                return Err(MergeError::BadParameter {
                    param: "granularity".into(),
                    reason: format!("expected layer | task, got {}", describe(v)),
                })
            }
        };
        bounds.check("num_samples", num_samples as u64, Work::Samples)?;
        match method {
            DataMethod::FisherMerging => {
                bounds.check("batch_size", batch_size as u64, Work::BatchSize)?
            }
            DataMethod::Adamerging => {
                bounds.check("batch_size", batch_size as u64, Work::BatchSize)?;
                bounds.check("steps", steps as u64, Work::RouterSteps)?;
            }
            DataMethod::AdaSvd => bounds.check("gate_k", gate_k as u64, Work::Rank)?,
            DataMethod::Regmean | DataMethod::RegmeanPlusPlus => {}
        }
        Ok(DataParams {
            method,
            base: spec.base.clone(),
            experts: spec.models.iter().map(|m| m.name.clone()).collect(),
            num_samples,
            batch_size,
            normalize_fisher_weight: boolean(
                get(&NORMALIZE_FISHER_WEIGHT),
                &NORMALIZE_FISHER_WEIGHT,
            )?,
            epsilon: number(get(&EPSILON), &EPSILON)?,
            minimal_fisher_weight: number(get(&MINIMAL_FISHER_WEIGHT), &MINIMAL_FISHER_WEIGHT)?,
            reduce_non_diagonal_ratio: number(
                get(&REDUCE_NON_DIAGONAL_RATIO),
                &REDUCE_NON_DIAGONAL_RATIO,
            )?,
            granularity,
            init: number(get(&INIT), &INIT)?,
            lr: number(get(&ADA_LR), &ADA_LR)?,
            steps,
            clamp: boolean(get(&CLAMP), &CLAMP)?,
            gate_k,
            seed: spec.seed.unwrap_or(0),
            dtype: spec.dtype.clone(),
        })
    }

    /// Whether building runs forward passes on calibration inputs
    /// (everything but AdaMerging with 0 steps).
    pub fn needs_calibration(&self) -> bool {
        !(self.method == DataMethod::Adamerging && self.steps == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn defaults_are_fusionbench_and_bad_values_name_the_parameter() {
        let p =
            DataParams::from_spec(&MergeSpec::new("fisher_merging", None, &["a", "b"])).unwrap();
        assert_eq!((p.num_samples, p.batch_size), (256, 32));
        assert!(p.normalize_fisher_weight);
        assert_eq!((p.epsilon, p.minimal_fisher_weight), (1e-6, 1e-6));
        let r = DataParams::from_spec(&MergeSpec::new("regmean", None, &["a"])).unwrap();
        assert_eq!(r.reduce_non_diagonal_ratio, 0.95);
        let a = DataParams::from_spec(&MergeSpec::new("adamerging", Some("base"), &["a"])).unwrap();
        assert_eq!((a.init, a.lr, a.steps, a.batch_size), (0.3, 1e-3, 1000, 16));
        assert_eq!(a.granularity, Granularity::Layer);
        assert!(!a.clamp);
        let s = DataParams::from_spec(&MergeSpec::new("ada_svd", Some("base"), &["a"])).unwrap();
        assert_eq!((s.gate_k, s.num_samples), (16, 256));

        let bad = |spec: MergeSpec, param: &str| {
            let e = DataParams::from_spec(&spec).unwrap_err();
            assert!(e.to_string().contains(param), "{param}: {e}");
            e
        };
        bad(
            MergeSpec::new("regmean", None, &["a"]).with("reduce_non_diagonal_ratio", 1.5),
            "reduce_non_diagonal_ratio",
        );
        bad(
            MergeSpec::new("regmean", None, &["a"]).with("reduce_non_diagonal_ratio", f64::NAN),
            "reduce_non_diagonal_ratio",
        );
        bad(
            MergeSpec::new("fisher_merging", None, &["a"]).with("num_samples", 0.0),
            "num_samples",
        );
        bad(
            MergeSpec::new("adamerging", Some("b"), &["a"]).with("steps", 2.5),
            "steps",
        );
        bad(
            MergeSpec::new("adamerging", Some("b"), &["a"])
                .with_value("granularity", ParamValue::Text("block".into())),
            "granularity",
        );
        bad(
            MergeSpec::new("fisher_merging", None, &["a"])
                .with_value("normalize_fisher_weight", ParamValue::Number(2.0)),
            "normalize_fisher_weight",
        );
        bad(
            MergeSpec::new("regmean", None, &["a"]).with("density", 0.2),
            "density",
        );
        let e = bad(MergeSpec::new("adamerging", None, &["a"]), "base");
        assert!(matches!(e, MergeError::MissingBase { .. }));
        bad(
            MergeSpec::new("regmean", None, &["a", "a"]),
            "`a` is named twice",
        );
        // Work parameters are bounded.
        let b = Bounds {
            samples: 10,
            router_steps: 5,
            ..Bounds::default()
        };
        let e = DataParams::from_spec_bounded(
            &MergeSpec::new("regmean", None, &["a"]).with("num_samples", 11.0),
            &b,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TooLarge);
        assert!(e.to_string().contains("num_samples"), "{e}");
        let e = DataParams::from_spec_bounded(
            &MergeSpec::new("adamerging", Some("b"), &["a"])
                .with("steps", 6.0)
                .with("num_samples", 4.0),
            &b,
        )
        .unwrap_err();
        assert!(e.to_string().contains("steps"), "{e}");
        // 0 steps reads no data.
        let a0 = DataParams::from_spec(
            &MergeSpec::new("adamerging", Some("b"), &["a"]).with("steps", 0.0),
        )
        .unwrap();
        assert!(!a0.needs_calibration());
    }
}
