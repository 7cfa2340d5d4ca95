//! The parameters of a routed-ensemble spec, validated apart from execution
//! into [`MoeParams`] (no optional fields left but the router checkpoint).
//!
//! The parameters are declared as data in the method registry
//! ([`crate::methods::routed`]: name, type, default, range, the work they
//! scale), which this validation reads and `fusion methods` prints. `steps` is bounded by
//! [`Bounds::router_steps`] only when the routers train here (not with a
//! `router_checkpoint`).
//!
//! Numbers may also be written as strings (`lr: "1e-4"`: YAML 1.1 reads a
//! float without a dot as a string). Any other key is an error that lists
//! the accepted ones; the spec's `seed` (default 0) seeds the router
//! initialisation and the order of the training batches.

use crate::bounds::{Bounds, Work};
use crate::error::{MergeError, Result};
use crate::methods::routed::{
    BATCH_SIZE, ENTROPY_POSITIONS, INIT_LAMBDA, LR, RANKONE_MOE, RANK_K, ROUTER_CHECKPOINT,
    ROUTING, SPARSE_WE_MOE, STEPS, TV_PRUNE_RATIO, WE_MOE,
};
use crate::methods::schema::{Param, Type};
use crate::spec::{Dialect, MergeSpec, ParamValue};

use super::train::EntropyPositions;
use super::{MoeMethod, Routing};

impl MoeMethod {
    /// The parameters the method declares.
    pub fn params(self) -> &'static [&'static Param] {
        match self {
            MoeMethod::WeMoe => WE_MOE,
            MoeMethod::SparseWeMoe => SPARSE_WE_MOE,
            MoeMethod::RankoneMoe => RANKONE_MOE,
        }
    }
}

/// A validated routed-ensemble spec.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeParams {
    /// The method.
    pub method: MoeMethod,
    /// The base checkpoint's name.
    pub base: String,
    /// The experts' names, in spec order.
    pub experts: Vec<String>,
    /// λ of the backbone and of the routers' initial output.
    pub init_lambda: f64,
    /// Per-sequence or per-token routing.
    pub routing: Routing,
    /// Adam learning rate.
    pub lr: f64,
    /// Adam steps (0: no training).
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// The predictions whose entropy the routers minimise.
    pub entropy_positions: EntropyPositions,
    /// Quantile of |τ| to drop below (`sparse_we_moe`).
    pub tv_prune_ratio: f64,
    /// SVD components kept per task vector (`rankone_moe`).
    pub rank_k: usize,
    /// A trained router folder to load instead of training.
    pub router_checkpoint: Option<String>,
    /// Seed of the router initialisation and the batch order.
    pub seed: u64,
    /// Stored dtype (`float32`, `float16`, `bfloat16`); default the base's.
    pub dtype: Option<String>,
}

impl MoeParams {
    /// Validates `spec`: the method, the base, at least one expert, every
    /// parameter's type and range, and no unknown parameter; the work
    /// parameters against the default [`Bounds`].
    pub fn from_spec(spec: &MergeSpec) -> Result<Self> {
        Self::from_spec_bounded(spec, &Bounds::default())
    }

    /// [`MoeParams::from_spec`] with the parameters that scale the work
    /// (`steps` when the routers train, `batch_size`, `rank_k`) and the
    /// spec's lists checked against `bounds`.
    pub fn from_spec_bounded(spec: &MergeSpec, bounds: &Bounds) -> Result<Self> {
        bounds.check_lists(spec)?;
        let method =
            MoeMethod::from_name(&spec.method).ok_or_else(|| MergeError::UnknownMethod {
                name: spec.method.clone(),
                known: MoeMethod::ALL.map(MoeMethod::name).join(", "),
            })?;
        let base = spec.base.clone().ok_or_else(|| MergeError::MissingBase {
            method: method.name().into(),
        })?;
        if spec.models.is_empty() {
            return Err(MergeError::ModelCount {
                method: method.name().into(),
                expected: "at least 1".into(),
                found: 0,
            });
        }
        let declared = method.params();
        let accepted: Vec<&str> = declared.iter().map(|p| p.name).collect();
        let unknown = |param: String| MergeError::UnknownParameter {
            method: method.name().into(),
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
        if let Some(d) = &spec.dtype {
            if runtime::checkpoint::parse_dtype(d).is_none() {
                return Err(MergeError::BadParameter {
                    param: "dtype".into(),
                    reason: format!("`{d}` is not one of float32, float16, bfloat16"),
                });
            }
        }
        // A parameter the method does not declare is refused above; those
        // it declares are read through their declarations.
        let get = |p: &Param| spec.parameters.get(p.name);
        let init_lambda = number(get(&INIT_LAMBDA), &INIT_LAMBDA)?;
        let lr = number(get(&LR), &LR)?;
        let steps = integer(get(&STEPS), &STEPS)?;
        let batch_size = integer(get(&BATCH_SIZE), &BATCH_SIZE)?;
        let tv_prune_ratio = number(get(&TV_PRUNE_RATIO), &TV_PRUNE_RATIO)?;
        let rank_k = integer(get(&RANK_K), &RANK_K)?;
        let routing = match get(&ROUTING) {
            None => Routing::PerSequence,
            Some(ParamValue::Text(s)) if s == "per_sequence" => Routing::PerSequence,
            Some(ParamValue::Text(s)) if s == "per_token" => Routing::PerToken,
            Some(v) => {
                return Err(MergeError::BadParameter {
                    param: "routing".into(),
                    reason: format!("expected per_sequence | per_token, got {}", describe(v)),
                })
            }
        };
        let entropy_positions = match get(&ENTROPY_POSITIONS) {
            None => EntropyPositions::default(),
            Some(v) => match v {
                ParamValue::Text(s) => EntropyPositions::from_name(s),
                _ => None,
            }
            .ok_or_else(|| MergeError::BadParameter {
                param: "entropy_positions".into(),
                reason: format!("expected answer | last | all, got {}", describe(v)),
            })?,
        };
        let router_checkpoint = match get(&ROUTER_CHECKPOINT) {
            None => None,
            Some(ParamValue::Text(s)) if !s.trim().is_empty() => Some(s.clone()),
            Some(v) => {
                return Err(MergeError::BadParameter {
                    param: "router_checkpoint".into(),
                    reason: format!("expected a checkpoint name, got {}", describe(v)),
                })
            }
        };
        bounds.check("batch_size", batch_size as u64, Work::BatchSize)?;
        if method == MoeMethod::RankoneMoe {
            bounds.check("rank_k", rank_k as u64, Work::Rank)?;
        }
        if steps > 0 && router_checkpoint.is_none() {
            bounds.check("steps", steps as u64, Work::RouterSteps)?;
        }
        Ok(MoeParams {
            method,
            base,
            experts: spec.models.iter().map(|m| m.name.clone()).collect(),
            init_lambda,
            routing,
            lr,
            steps,
            batch_size,
            entropy_positions,
            tv_prune_ratio,
            rank_k,
            router_checkpoint,
            seed: spec.seed.unwrap_or(0),
            dtype: spec.dtype.clone(),
        })
    }

    /// Whether building needs calibration inputs: the routers are trained
    /// (steps > 0) and not loaded from a checkpoint.
    pub fn needs_calibration(&self) -> bool {
        self.steps > 0 && self.router_checkpoint.is_none()
    }
}

pub(crate) fn describe(v: &ParamValue) -> String {
    match v {
        ParamValue::Text(s) => format!("`{s}`"),
        ParamValue::Number(x) => format!("the number {x}"),
        other => other.kind().to_string(),
    }
}

/// A finite scalar within the declared range of `p`, written as a number
/// or as a string holding one; the declared default when absent.
pub(crate) fn number(v: Option<&ParamValue>, p: &Param) -> Result<f64> {
    let name = p.name;
    let x = match v {
        None => {
            return p.default.number(Dialect::Fusionbench).ok_or_else(|| {
                MergeError::UndeclaredParameter {
                    method: "routed ensemble".into(),
                    param: format!("{name} (declared without a numeric default)"),
                }
            })
        }
        Some(ParamValue::Number(x)) => *x,
        Some(ParamValue::Text(s)) => {
            s.trim()
                .parse::<f64>()
                .map_err(|_| MergeError::BadParameter {
                    param: name.into(),
                    reason: format!("expected a number, got `{s}`"),
                })?
        }
        Some(other) => {
            return Err(MergeError::BadParameter {
                param: name.into(),
                reason: format!("expected a single number, got {}", other.kind()),
            })
        }
    };
    if !x.is_finite() {
        return Err(MergeError::range(name, x, "a finite number"));
    }
    if p.ty != Type::Integer && !p.range.contains(x) {
        return Err(MergeError::range(name, x, &p.range.describe()));
    }
    Ok(x)
}

/// An integer within the declared range of `p`, written as a number or a
/// string.
pub(crate) fn integer(v: Option<&ParamValue>, p: &Param) -> Result<usize> {
    let x = number(v, p)?;
    if x.fract() != 0.0 || !p.range.contains(x) || x > u32::MAX as f64 {
        return Err(MergeError::range(
            p.name,
            x,
            &format!("an integer {}", p.range.describe()),
        ));
    }
    Ok(x as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ModelSpec;

    fn spec(method: &str) -> MergeSpec {
        MergeSpec::new(method, Some("base"), &["a", "b"])
    }

    #[test]
    fn defaults_follow_the_reference() {
        let p = MoeParams::from_spec(&spec("we_moe")).unwrap();
        assert_eq!(p.method, MoeMethod::WeMoe);
        assert_eq!(p.init_lambda, 0.3);
        assert_eq!(p.routing, Routing::PerSequence);
        assert_eq!((p.lr, p.steps, p.batch_size), (1e-4, 1000, 16));
        assert_eq!((p.tv_prune_ratio, p.rank_k), (0.9, 32));
        assert_eq!(p.experts, vec!["a", "b"]);
        assert!(p.needs_calibration());
    }

    #[test]
    fn strings_are_accepted_for_numbers_and_words() {
        let s = spec("rankone_moe")
            .with_value("lr", ParamValue::Text("1e-3".into()))
            .with_value("rank_k", ParamValue::Text("8".into()))
            .with_value("routing", ParamValue::Text("per_token".into()))
            .with_value("router_checkpoint", ParamValue::Text("trained".into()))
            .with("steps", 5.0);
        let p = MoeParams::from_spec(&s).unwrap();
        assert_eq!((p.lr, p.rank_k, p.steps), (1e-3, 8, 5));
        assert_eq!(p.routing, Routing::PerToken);
        assert_eq!(p.router_checkpoint.as_deref(), Some("trained"));
        assert!(!p.needs_calibration());
    }

    #[test]
    fn errors_name_the_parameter() {
        let err = |s: MergeSpec| MoeParams::from_spec(&s).unwrap_err().to_string();
        let e = err(spec("we_moe").with("rank_k", 4.0));
        assert!(
            e.contains("`rank_k`") && !e.contains("tv_prune_ratio"),
            "{e}"
        );
        let e = err(spec("sparse_we_moe").with("tv_prune_ratio", 1.0));
        assert!(e.contains("tv_prune_ratio") && e.contains("[0, 1)"), "{e}");
        let e = err(spec("we_moe").with("steps", 2.5));
        assert!(e.contains("`steps`") && e.contains("integer"), "{e}");
        let e = err(spec("we_moe").with("batch_size", 0.0));
        assert!(e.contains("`batch_size`"), "{e}");
        let e = err(spec("we_moe").with("lr", -1.0));
        assert!(e.contains("`lr`") && e.contains("> 0"), "{e}");
        let e = err(spec("we_moe").with_value("lr", ParamValue::Text("fast".into())));
        assert!(e.contains("`lr`") && e.contains("fast"), "{e}");
        let e = err(spec("we_moe").with_value("routing", ParamValue::Text("top1".into())));
        assert!(e.contains("`routing`") && e.contains("per_token"), "{e}");
        let mut s = spec("we_moe");
        s.models[0] = ModelSpec {
            weight: Some(ParamValue::Number(0.5)),
            ..ModelSpec::named("a")
        };
        assert!(err(s).contains("models[a].weight"));
        let mut s = spec("we_moe");
        s.base = None;
        assert!(err(s).contains("base"));
        let s = MergeSpec::new("we_moe", Some("base"), &[]);
        assert!(err(s).contains("at least 1"));
        let mut s = spec("we_moe");
        s.dtype = Some("int8".into());
        assert!(err(s).contains("`dtype`"));
    }

    #[test]
    fn work_parameters_are_bounded() {
        let b = Bounds {
            router_steps: 10,
            batch_size: 16,
            rank: 8,
            ..Bounds::default()
        };
        let err = |s: MergeSpec| MoeParams::from_spec_bounded(&s, &b).unwrap_err();
        let e = err(spec("we_moe").with("steps", 11.0));
        assert_eq!(e.kind(), crate::error::ErrorKind::TooLarge);
        assert!(e.to_string().contains("`steps` = 11"), "{e}");
        assert!(
            err(spec("we_moe").with("steps", 10.0).with("batch_size", 17.0))
                .to_string()
                .contains("`batch_size` = 17")
        );
        assert!(
            err(spec("rankone_moe").with("steps", 0.0).with("rank_k", 9.0))
                .to_string()
                .contains("`rank_k` = 9")
        );
        // Steps are work only when the routers train here.
        let loaded = spec("we_moe")
            .with("steps", 5000.0)
            .with_value("router_checkpoint", ParamValue::Text("r".into()));
        assert!(MoeParams::from_spec_bounded(&loaded, &b).is_ok());
        assert!(MoeParams::from_spec_bounded(&spec("we_moe").with("steps", 10.0), &b).is_ok());
    }
}
