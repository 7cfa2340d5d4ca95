//! Merge methods, one file each, under FusionBench's names and mergekit's.
//!
//! A method is built from a spec's parameters ([`Params`]) into a validated
//! object ([`MergeMethod`]) that merges one tensor at a time from
//! [`TensorInputs`]. Methods that need model-wide statistics (TIES trimming
//! over the whole model) get a [`ModelScan`] pass before merging.

pub mod params;

mod breadcrumbs;
mod dare;
mod expo;
mod iso;
mod linear;
mod magnitude_pruning;
mod matrix_targets;
mod model_stock;
mod simple_average;
mod slerp;
mod task_arithmetic;
mod task_vectors;
mod ties;
mod tsv_m;
mod weighted_average;
mod wudi;

use candle_core::Tensor;

pub use crate::inputs::TensorInputs;
pub use params::{Num, Params};

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
    ($name:literal, $conv:literal, $arity:expr, base=$base:ident, ordered=$ord:literal, random=$rand:literal, routed) => {
        MethodInfo {
            name: $name,
            convention: $conv,
            arity: $arity,
            base: BaseUse::$base,
            order_matters: $ord,
            random: $rand,
            kind: MethodKind::Routed,
        }
    };
    ($name:literal, $conv:literal, $arity:expr, base=$base:ident, ordered=$ord:literal, random=$rand:literal, $build:path) => {
        MethodInfo {
            name: $name,
            convention: $conv,
            arity: $arity,
            base: BaseUse::$base,
            order_matters: $ord,
            random: $rand,
            kind: MethodKind::Tensorwise($build),
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
        simple_average::build
    ),
    entry!(
        "weighted_average",
        "FusionBench",
        Arity::AtLeast(1),
        base = Unused,
        ordered = false,
        random = false,
        weighted_average::build
    ),
    entry!(
        "task_arithmetic",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        task_arithmetic::build
    ),
    entry!(
        "slerp",
        "FusionBench",
        Arity::Exactly(2),
        base = Unused,
        ordered = true,
        random = false,
        slerp::build
    ),
    entry!(
        "ties_merging",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        ties::build_fusionbench
    ),
    entry!(
        "dare",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = true,
        dare::build_fusionbench
    ),
    entry!(
        "magnitude_pruning",
        "FusionBench",
        Arity::AtLeast(1),
        base = Optional,
        ordered = false,
        random = false,
        magnitude_pruning::build
    ),
    entry!(
        "expo",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        expo::build
    ),
    entry!(
        "model_stock",
        "FusionBench",
        Arity::AtLeast(2),
        base = Required,
        ordered = false,
        random = false,
        model_stock::build
    ),
    entry!(
        "breadcrumbs",
        "mergekit",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        breadcrumbs::build
    ),
    entry!(
        "iso_c",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        iso::build_iso_c
    ),
    entry!(
        "iso_cts",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        iso::build_iso_cts
    ),
    entry!(
        "tsv_m",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        tsv_m::build
    ),
    entry!(
        "wudi",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        wudi::build
    ),
    entry!(
        "linear",
        "mergekit",
        Arity::AtLeast(1),
        base = Unused,
        ordered = false,
        random = false,
        linear::build
    ),
    entry!(
        "ties",
        "mergekit",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = false,
        ties::build_mergekit
    ),
    entry!(
        "dare_linear",
        "mergekit",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = true,
        dare::build_mergekit_linear
    ),
    entry!(
        "dare_ties",
        "mergekit",
        Arity::AtLeast(1),
        base = Required,
        ordered = false,
        random = true,
        dare::build_mergekit_ties
    ),
    // Routed: expert i is router output i, and the seed draws the routers.
    entry!(
        "we_moe",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = true,
        random = true,
        routed
    ),
    entry!(
        "sparse_we_moe",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = true,
        random = true,
        routed
    ),
    entry!(
        "rankone_moe",
        "FusionBench",
        Arity::AtLeast(1),
        base = Required,
        ordered = true,
        random = true,
        routed
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
    if spec.method == "passthrough" {
        return Err(MergeError::Unsupported {
            feature: "merge_method `passthrough`".into(),
            hint: "layer stacking is not implemented yet; use a weight-merging method".into(),
        });
    }
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
    let MethodKind::Tensorwise(build) = info.kind else {
        return Err(MergeError::Unsupported {
            feature: format!("`{}` as a tensor-by-tensor merge", info.name),
            hint: "it builds a routed model: use merger::plan::Plan (`fusion merge --calibration DIR`)"
                .into(),
        });
    };
    let mut params = Params::with_bounds(info.name, spec, *bounds);
    let method = build(&mut params)?;
    params.finish()?;
    Ok((info, method))
}

#[cfg(test)]
pub(crate) mod testutil;
