//! Merge methods, one file each, under FusionBench's names and mergekit's.
//!
//! A method is built from a spec's parameters ([`Params`]) into a validated
//! object ([`MergeMethod`]) that merges one tensor at a time from
//! [`TensorInputs`]. Methods that need model-wide statistics (TIES trimming
//! over the whole model) get a [`ModelScan`] pass before merging.

pub mod catalog;
pub mod data_driven;
pub mod params;
pub mod routed;
pub mod schema;

mod arcee_fusion;
mod breadcrumbs;
mod dare;
mod della;
mod emr_merging;
mod expo;
mod iso;
mod karcher;
mod linear;
mod lines;
mod magmax;
mod magnitude_pruning;
mod matrix_targets;
mod model_stock;
mod multislerp;
mod nearswap;
mod nuslerp;
mod passthrough;
pub mod retrieval;
mod sce;
mod simple_average;
mod slerp;
mod tall_masks;
mod task_arithmetic;
mod task_vectors;
mod ties;
mod tsv_m;
mod weighted_average;
mod wudi;

use candle_core::Tensor;

pub use crate::inputs::TensorInputs;
pub use params::{Num, Params};
pub use schema::Param;

use crate::bounds::Bounds;
use crate::error::{MergeError, Result};
use crate::spec::{canonical, MergeSpec};

/// A model-wide pass over every tensor's inputs, run before merging.
pub trait ModelScan: Sync {
    /// Calls `f` on each tensor's inputs (in parallel, in no fixed order).
    fn for_each(&self, f: &(dyn Fn(&TensorInputs) -> Result<()> + Sync)) -> Result<()>;

    /// Whether every merged tensor is kept in memory until the merge ends
    /// (the in-memory merge): a method may then merge tensors during its
    /// model-wide pass and hand them over from [`MergeMethod::merge`],
    /// holding no more than the merge's result holds anyway. False by
    /// default (a merge streamed to disk holds one tensor at a time).
    fn keeps_outputs(&self) -> bool {
        false
    }
}

/// A validated merge method, ready to merge tensors.
pub trait MergeMethod: Send + Sync {
    /// Model-wide statistics needed before merging (default: none).
    fn prepare(&mut self, _scan: &dyn ModelScan) -> Result<()> {
        Ok(())
    }

    /// Merges one tensor; returns a tensor of the input shape, in f32 or in
    /// `inputs.out_dtype`.
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor>;

    /// The constant coefficients `(c₀, [cᵢ])` of `experts` models when the
    /// merge is, for every tensor, `c₀ θ₀ + Σᵢ cᵢ θᵢ` with `c₀ + Σᵢ cᵢ = 1`:
    /// then it equals `θ_b + c₀ τ₀ + Σᵢ cᵢ τᵢ` for task vectors taken over
    /// any base θ_b, and can be held as those coefficients over shared task
    /// vectors (form `combination`). `None` (the default) for every other
    /// method, and for per-tensor (gradient or filtered) parameters.
    fn affine_coefficients(&self, _experts: usize) -> Option<(f64, Vec<f64>)> {
        None
    }

    /// A per-task retrieval merge's unified vector, masks and scales
    /// (`tall_masks`, `emr_merging`): what holds its views as masks over
    /// one shared vector (form `masked`). `None` (the default) for every
    /// other method.
    fn retrieval(&self) -> Option<&dyn retrieval::Retrieval> {
        None
    }
}

/// How many expert models a method takes.
#[derive(Debug, Clone, Copy)]
pub enum Arity {
    /// Exactly this many.
    Exactly(usize),
    /// At least this many.
    AtLeast(usize),
}

/// What a method does with a base model θ0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseUse {
    /// θ0 is required (the task-vector methods).
    Required,
    /// θ0 is taken when given, and its parameters decide whether it must be
    /// (`magnitude_pruning`: `mode: diff` needs it, `mode: weights` refuses it).
    Optional,
    /// θ0 plays no part (averages and interpolations of the models).
    Unused,
}

/// How a method builds its result.
#[derive(Clone, Copy)]
pub enum MethodKind {
    /// One weight set, merged tensor by tensor by the merge engine
    /// ([`crate::merge`]) with the method this builds from the spec's
    /// parameters.
    Tensorwise(fn(&mut Params) -> Result<Box<dyn MergeMethod>>),
    /// A routed ensemble: the experts' MLP task vectors behind routers, built
    /// by [`crate::moe`] from its own parameters ([`crate::moe::MoeParams`]).
    Routed,
    /// One weight set computed from forward passes on calibration inputs,
    /// built by [`crate::data_driven`] from its own parameters
    /// ([`crate::data_driven::DataParams`]).
    DataDriven,
}

/// A method's entry in the registry.
pub struct MethodInfo {
    /// The canonical name.
    pub name: &'static str,
    /// Which reference it follows ("FusionBench", "mergekit").
    pub convention: &'static str,
    /// Number of expert models.
    pub arity: Arity,
    /// What it does with a base model θ0.
    pub base: BaseUse,
    /// Whether the result depends on the order of the models.
    pub order_matters: bool,
    /// Whether the method is random (then the seed is part of the id).
    pub random: bool,
    /// Tensor by tensor (with its builder) or routed.
    pub kind: MethodKind,
    /// The parameters it takes, as data: validation reads them, and
    /// `fusion methods` and the README's table print them.
    pub params: &'static [&'static Param],
}

impl MethodInfo {
    /// Whether a base model θ0 is required.
    pub fn needs_base(&self) -> bool {
        self.base == BaseUse::Required
    }

    /// The canonical id of a merge of this method (see
    /// [`crate::spec::canonical`]): `spec` and the `(name, fingerprint)` of
    /// every checkpoint it reads; models sorted when their order does not
    /// matter, the seed counted when the method is random.
    pub fn merge_id(&self, spec: &MergeSpec, fingerprints: &[(String, String)]) -> String {
        canonical::merge_id(spec, self.order_matters, self.random, fingerprints)
    }
}

macro_rules! entry {
    ($name:literal, $conv:literal, $arity:expr, base=$base:ident, ordered=$ord:literal, random=$rand:literal, params=$params:expr, data_driven) => {
        MethodInfo {
            name: $name,
            convention: $conv,
            arity: $arity,
            base: BaseUse::$base,
            order_matters: $ord,
            random: $rand,
            kind: MethodKind::DataDriven,
            params: $params,
        }
    };
    ($name:literal, $conv:literal, $arity:expr, base=$base:ident, ordered=$ord:literal, random=$rand:literal, params=$params:expr, routed) => {
        MethodInfo {
            name: $name,
            convention: $conv,
            arity: $arity,
            base: BaseUse::$base,
            order_matters: $ord,
            random: $rand,
            kind: MethodKind::Routed,
            params: $params,
        }
    };
    ($name:literal, $conv:literal, $arity:expr, base=$base:ident, ordered=$ord:literal, random=$rand:literal, params=$params:expr, $build:path) => {
        MethodInfo {
            name: $name,
            convention: $conv,
            arity: $arity,
            base: BaseUse::$base,
            order_matters: $ord,
            random: $rand,
            kind: MethodKind::Tensorwise($build),
            params: $params,
        }
    };
}

/// Every method: the tensor-wise ones (FusionBench names first, then
/// mergekit's), then the routed ensembles.
pub static REGISTRY: &[MethodInfo] = &[
    entry!(
        "simple_average",
        "FusionBench",
        Arity::AtLeast(1),
        base = Unused,
        ordered = false,
        random = false,
        params = simple_average::PARAMS,
        simple_average::build
    ),
    entry!(
        "weighted_average",
        "FusionBench",
        Arity::AtLeast(1),
        base = Unused,
        ordered = false,
        random = false,
        params = weighted_average::PARAMS,
        weighted_average::build
    ),
    entry!(
        "task_arithmetic",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = task_arithmetic::PARAMS,
        task_arithmetic::build
    ),
    entry!(
        "slerp",
        "FusionBench",
        Arity::Exactly(2),
        base = Unused,
        ordered = true,
        random = false,
        params = slerp::PARAMS,
        slerp::build
    ),
    entry!(
        "ties_merging",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = ties::PARAMS,
        ties::build_fusionbench
    ),
    entry!(
        "dare",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = true,
        params = dare::PARAMS_FUSIONBENCH,
        dare::build_fusionbench
    ),
    entry!(
        "magnitude_pruning",
        "FusionBench",
        Arity::Exactly(1),
        base = Optional,
        ordered = false,
        random = false,
        params = magnitude_pruning::PARAMS,
        magnitude_pruning::build
    ),
    entry!(
        "expo",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = expo::PARAMS,
        expo::build
    ),
    entry!(
        "magmax",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        // A tie goes to the later expert.
        ordered = true,
        random = false,
        params = magmax::PARAMS,
        magmax::build
    ),
    entry!(
        "tall_masks",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = tall_masks::PARAMS,
        tall_masks::build
    ),
    entry!(
        "emr_merging",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = emr_merging::PARAMS,
        emr_merging::build
    ),
    entry!(
        "model_stock",
        "FusionBench",
        Arity::AtLeast(2),
        base = Required,
        ordered = false,
        random = false,
        params = model_stock::PARAMS,
        model_stock::build
    ),
    entry!(
        "breadcrumbs",
        "mergekit",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = breadcrumbs::PARAMS,
        breadcrumbs::build
    ),
    entry!(
        "iso_c",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = iso::PARAMS_ISO_C,
        iso::build_iso_c
    ),
    entry!(
        "iso_cts",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = iso::PARAMS_ISO_CTS,
        iso::build_iso_cts
    ),
    entry!(
        "tsv_m",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = tsv_m::PARAMS,
        tsv_m::build
    ),
    entry!(
        "wudi",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = wudi::PARAMS,
        wudi::build
    ),
    entry!(
        "linear",
        "mergekit",
        Arity::AtLeast(1),
        base = Unused,
        ordered = false,
        random = false,
        params = weighted_average::PARAMS,
        linear::build
    ),
    entry!(
        "ties",
        "mergekit",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = ties::PARAMS_MERGEKIT,
        ties::build_mergekit
    ),
    entry!(
        "dare_linear",
        "mergekit",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = true,
        params = dare::PARAMS_MERGEKIT,
        dare::build_mergekit_linear
    ),
    entry!(
        "dare_ties",
        "mergekit",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = true,
        params = dare::PARAMS_MERGEKIT,
        dare::build_mergekit_ties
    ),
    entry!(
        "breadcrumbs_ties",
        "mergekit",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = breadcrumbs::PARAMS,
        breadcrumbs::build_ties
    ),
    entry!(
        "della",
        "mergekit",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = true,
        params = della::PARAMS,
        della::build
    ),
    entry!(
        "della_linear",
        "mergekit",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = true,
        params = della::PARAMS_LINEAR,
        della::build_linear
    ),
    entry!(
        "sce",
        "mergekit",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = sce::PARAMS,
        sce::build
    ),
    entry!(
        "nuslerp",
        "mergekit",
        Arity::Exactly(2),
        base = Optional,
        // t = w1 / (w0 + w1).
        ordered = true,
        random = false,
        params = nuslerp::PARAMS,
        nuslerp::build
    ),
    entry!(
        "multislerp",
        "mergekit",
        Arity::AtLeast(1),
        base = Optional,
        // Summed in f64 per entry, so the order does not change the result.
        ordered = false,
        random = false,
        params = multislerp::PARAMS,
        multislerp::build
    ),
    entry!(
        "karcher",
        "mergekit",
        Arity::AtLeast(1),
        base = Unused,
        ordered = false,
        random = false,
        params = karcher::PARAMS,
        karcher::build
    ),
    entry!(
        "arcee_fusion",
        "mergekit",
        Arity::Exactly(1),
        base = Required,
        ordered = false,
        random = false,
        params = arcee_fusion::PARAMS,
        arcee_fusion::build
    ),
    entry!(
        "nearswap",
        "mergekit",
        Arity::Exactly(1),
        base = Required,
        ordered = false,
        random = false,
        params = nearswap::PARAMS,
        nearswap::build
    ),
    entry!(
        "passthrough",
        "mergekit",
        Arity::Exactly(1),
        base = Unused,
        ordered = false,
        random = false,
        params = passthrough::PARAMS,
        passthrough::build
    ),
    // Routed: expert i is router output i, and the seed draws the routers.
    entry!(
        "we_moe",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = true,
        random = true,
        params = routed::WE_MOE,
        routed
    ),
    entry!(
        "sparse_we_moe",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = true,
        random = true,
        params = routed::SPARSE_WE_MOE,
        routed
    ),
    entry!(
        "rankone_moe",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = true,
        random = true,
        params = routed::RANKONE_MOE,
        routed
    ),
    // Data-driven: statistics or coefficients from forward passes on each
    // expert's calibration inputs (crate::data_driven).
    entry!(
        "fisher_merging",
        "FusionBench",
        Arity::AtLeast(1),
        base = Unused,
        ordered = false,
        random = false,
        params = data_driven::FISHER_MERGING,
        data_driven
    ),
    entry!(
        "regmean",
        "FusionBench",
        Arity::AtLeast(1),
        base = Unused,
        ordered = false,
        random = false,
        params = data_driven::REGMEAN,
        data_driven
    ),
    entry!(
        "regmean_plusplus",
        "FusionBench",
        Arity::AtLeast(1),
        base = Unused,
        ordered = false,
        random = false,
        params = data_driven::REGMEAN,
        data_driven
    ),
    entry!(
        "adamerging",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = true,
        params = data_driven::ADAMERGING,
        data_driven
    ),
    entry!(
        "ada_svd",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        params = data_driven::ADA_SVD,
        data_driven
    ),
];

/// Looks a method up by name (either convention). mergekit's `slerp`,
/// `task_arithmetic`, `model_stock` and `breadcrumbs` share the entry of
/// the same name. The routed ensembles (`we_moe`, ...) are found too; they
/// build with [`crate::moe`] (see [`crate::plan::Plan`]), not tensor by
/// tensor.
pub fn lookup(name: &str) -> Result<&'static MethodInfo> {
    REGISTRY
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| MergeError::UnknownMethod {
            name: name.to_string(),
            known: REGISTRY
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Validates a spec's method, model count and parameters, and builds it,
/// with the default [`Bounds`]: a tensor-wise method only (a routed one is
/// refused; [`crate::plan::Plan`] takes both).
pub fn build(spec: &MergeSpec) -> Result<(&'static MethodInfo, Box<dyn MergeMethod>)> {
    build_bounded(spec, &Bounds::default())
}

/// [`build`], with the parameters that scale the work (and every list of
/// the spec) checked against `bounds`.
pub fn build_bounded(
    spec: &MergeSpec,
    bounds: &Bounds,
) -> Result<(&'static MethodInfo, Box<dyn MergeMethod>)> {
    bounds.check_lists(spec)?;
    let info = lookup(&spec.method)?;
    let n = spec.models.len();
    let ok = match info.arity {
        Arity::Exactly(k) => n == k,
        Arity::AtLeast(k) => n >= k,
    };
    if !ok {
        return Err(MergeError::ModelCount {
            method: info.name.to_string(),
            expected: match info.arity {
                Arity::Exactly(k) => format!("exactly {k}"),
                Arity::AtLeast(k) => format!("at least {k}"),
            },
            found: n,
        });
    }
    if info.needs_base() && spec.base.is_none() {
        return Err(MergeError::MissingBase {
            method: info.name.to_string(),
        });
    }
    if let Some(r) = &spec.residency {
        r.validate(bounds)?;
    }
    let MethodKind::Tensorwise(build) = info.kind else {
        return Err(MergeError::Unsupported {
            feature: format!("`{}` as a tensor-by-tensor merge", info.name),
            hint: "it needs calibration inputs (a routed model, or a data-driven merge): use \
                   merger::plan::Plan (`fusion merge --calibration DIR`)"
                .into(),
        });
    };
    let mut params = Params::with_bounds(info.name, info.params, spec, *bounds);
    let method = build(&mut params)?;
    params.finish()?;
    if spec.residency.as_ref().is_some_and(|r| r.is_combination())
        && method.affine_coefficients(n).is_none()
    {
        return Err(MergeError::Unsupported {
            feature: format!("form `combination` for this `{}` merge", info.name),
            hint: "a combination holds θ₀ + Σᵢ λᵢ τᵢ with constant coefficients: task_arithmetic, \
                   simple_average, and weighted_average or linear with weights that are \
                   normalised or sum to 1, none of them per tensor; hold other merges as \
                   `lowrank` or `sparse`"
                .into(),
        });
    }
    if spec.residency.as_ref().is_some_and(|r| r.is_masked()) && method.retrieval().is_none() {
        return Err(MergeError::Unsupported {
            feature: format!("form `masked` for `{}`", info.name),
            hint: "a masked view is one task of a per-task retrieval merge (tall_masks, \
                   emr_merging); hold other merges as `lowrank`, `sparse` or `combination`"
                .into(),
        });
    }
    Ok((info, method))
}

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod declared {
    //! The declarations and the code agree: every parameter a method
    //! declares is read by its `build` (for some setting of its choices),
    //! every parameter it reads is declared, and every declared default and
    //! sample value builds.

    use super::schema::{DefaultValue, Param, Type};
    use super::*;
    use crate::moe::MoeParams;
    use crate::spec::{Dialect, ParamValue};

    /// A valid value of `p`.
    fn sample(p: &Param) -> ParamValue {
        match (p.ty, p.default) {
            (Type::Bool, DefaultValue::Bool(b)) => ParamValue::Bool(b),
            (Type::Bool, _) => ParamValue::Bool(false),
            (Type::Choice(options), _) => ParamValue::Text(options[0].into()),
            (Type::Names, _) => ParamValue::Names(vec!["model.embed_tokens.weight".into()]),
            (Type::Checkpoint, _) => ParamValue::Text("trained".into()),
            (Type::Expert, _) => ParamValue::Text("m0".into()),
            (_, d) => ParamValue::Number(
                d.number(Dialect::Fusionbench)
                    .unwrap_or_else(|| p.range.sample()),
            ),
        }
    }

    fn spec(m: &MethodInfo, dialect: Dialect) -> MergeSpec {
        let n = match m.arity {
            Arity::Exactly(k) | Arity::AtLeast(k) => k,
        };
        let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let base = (m.base != BaseUse::Unused).then_some("base");
        let mut s = MergeSpec::new(m.name, base, &names);
        s.dialect = dialect;
        s
    }

    /// Builds `spec` as its method does: tensor-wise or routed.
    fn build_any(m: &MethodInfo, spec: &MergeSpec) -> Result<()> {
        match m.kind {
            MethodKind::Tensorwise(_) => build(spec).map(|_| ()),
            MethodKind::Routed => MoeParams::from_spec(spec).map(|_| ()),
            MethodKind::DataDriven => crate::data_driven::DataParams::from_spec(spec).map(|_| ()),
        }
    }

    /// The settings of the method's choice parameters to try: none, and
    /// each option of each choice alone.
    fn choice_settings(m: &MethodInfo) -> Vec<Option<(&'static str, &'static str)>> {
        let mut out = vec![None];
        for p in m.params {
            if let Type::Choice(options) = p.ty {
                out.extend(options.iter().map(|o| Some((p.name, *o))));
            }
        }
        out
    }

    #[test]
    fn every_declared_parameter_is_read_and_every_read_one_declared() {
        for m in REGISTRY {
            for dialect in [Dialect::Fusionbench, Dialect::Mergekit] {
                for setting in choice_settings(m) {
                    let mut s = spec(m, dialect);
                    if let Some((k, v)) = setting {
                        s = s.with_value(k, ParamValue::Text(v.into()));
                    }
                    // The declared defaults build (no undeclared read on the way).
                    match build_any(m, &s) {
                        Ok(()) => {}
                        Err(MergeError::UndeclaredParameter { param, .. }) => {
                            panic!("{} reads undeclared `{param}` ({setting:?})", m.name)
                        }
                        // A choice that only applies with another one
                        // (`merge_func` of `dare` with `combine: ties`) is
                        // refused alone; other errors are the n:m and mode
                        // constraints of magnitude_pruning.
                        Err(MergeError::UnknownParameter { param, .. }) => assert!(
                            setting.is_some_and(|(k, _)| k == param),
                            "{} {setting:?}: `{param}` refused",
                            m.name
                        ),
                        Err(_) => {}
                    }
                }
            }
            for p in m.params {
                for key in p.keys() {
                    let read = choice_settings(m).into_iter().any(|setting| {
                        let mut s = spec(m, Dialect::Fusionbench).with_value(key, sample(p));
                        if let Some((k, v)) = setting {
                            if k == p.name {
                                return false;
                            }
                            s = s.with_value(k, ParamValue::Text(v.into()));
                        }
                        match build_any(m, &s) {
                            Err(MergeError::UnknownParameter { param, .. }) => param != key,
                            Err(MergeError::UndeclaredParameter { param, .. }) => {
                                panic!("{} reads undeclared `{param}`", m.name)
                            }
                            _ => true,
                        }
                    });
                    let choice = matches!(p.ty, Type::Choice(_));
                    let alone = {
                        let s = spec(m, Dialect::Fusionbench).with_value(key, sample(p));
                        !matches!(build_any(m, &s), Err(MergeError::UnknownParameter { .. }))
                    };
                    assert!(
                        read || (choice && alone),
                        "{}: declared `{key}` is never read",
                        m.name
                    );
                }
            }
        }
    }

    #[test]
    fn unknown_parameters_list_the_declared_ones() {
        for m in REGISTRY {
            let s = spec(m, Dialect::Fusionbench).with("no_such_parameter", 1.0);
            match build_any(m, &s) {
                Err(MergeError::UnknownParameter { accepted, .. }) => {
                    let want: Vec<&str> = m.params.iter().map(|p| p.name).collect();
                    let want = if want.is_empty() {
                        "none".to_string()
                    } else {
                        want.join(", ")
                    };
                    assert_eq!(accepted, want, "{}", m.name);
                }
                other => panic!("{}: {:?}", m.name, other.err()),
            }
        }
    }

    #[test]
    fn declared_ranges_are_enforced() {
        for m in REGISTRY {
            for p in m.params {
                if !matches!(p.ty, Type::Number | Type::Scalar | Type::Integer) {
                    continue;
                }
                let outside = match (p.range.min, p.range.max) {
                    (super::schema::Limit::Inclusive(a), _) => a - 1.0,
                    (super::schema::Limit::Exclusive(a), _) => a,
                    (_, super::schema::Limit::Inclusive(b)) => b + 1.0,
                    (_, super::schema::Limit::Exclusive(b)) => b,
                    _ => f64::NAN,
                };
                let refused = choice_settings(m).into_iter().any(|setting| {
                    let mut s = spec(m, Dialect::Fusionbench).with(p.name, outside);
                    if let Some((k, v)) = setting {
                        s = s.with_value(k, ParamValue::Text(v.into()));
                    }
                    matches!(
                        build_any(m, &s),
                        Err(MergeError::OutOfRange { .. } | MergeError::BadParameter { .. })
                    )
                });
                assert!(refused, "{} `{}` = {outside} is accepted", m.name, p.name);
            }
        }
    }
}
