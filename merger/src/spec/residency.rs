//! How a merge is held in memory: its own full weights (`dense`), or the
//! delta ΔW = W_merged − W_base over a base model resident once, in a
//! compact form (`lowrank`, `sparse`), or, for a merge that is exactly
//! θ₀ + Σᵢ λᵢ τᵢ, as its coefficients λᵢ over the experts' task vectors
//! τᵢ = θᵢ − θ₀, held once per expert in the form `vectors` (lowrank by
//! default) and shared by every merge of them (`combination`). Part of the
//! spec, so part of the merge id: a compressed merge is a different model
//! from its dense one.
//!
//! Written as `"residency": {"form": "lowrank", "energy": 0.9}` in a
//! structured spec, or `form=lowrank,form_energy=0.9` in a compact one
//! (`form_rank=N`, `form_density=0.05`, and for a combination
//! `form=combination,form_vectors=sparse,form_density=0.1`: the parameters
//! then shape the task vectors). Validation is here; [`crate::residency`]
//! compresses.

use serde::{Deserialize, Serialize};

use crate::bounds::{Bounds, Work};
use crate::error::{MergeError, Result};

/// The energy a `lowrank` form keeps by default: the smallest rank whose
/// singular values hold this fraction of ‖ΔW‖²_F.
pub const DEFAULT_ENERGY: f64 = 0.95;

/// The fraction of entries a `sparse` form keeps by default (largest |ΔW|).
pub const DEFAULT_DENSITY: f64 = 0.1;

/// The compact form of a merge's delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Form {
    /// The merge's own full weights (no base shared).
    #[default]
    Dense,
    /// Each 2-D delta as a truncated SVD U_r Σ_r V_rᵀ.
    Lowrank,
    /// Each 2-D delta's largest entries by magnitude.
    Sparse,
    /// Coefficients over the experts' shared task vectors (exact linear
    /// merges only: task_arithmetic, simple_average, weighted_average,
    /// linear).
    Combination,
    /// A task's view of a per-task retrieval merge (`tall_masks`,
    /// `emr_merging`): its mask's bits and its scale over the merge's
    /// unified task vector, held once for every task.
    Masked,
}

impl Form {
    /// The name in specs and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Form::Dense => "dense",
            Form::Lowrank => "lowrank",
            Form::Sparse => "sparse",
            Form::Combination => "combination",
            Form::Masked => "masked",
        }
    }

    /// The form named `s`.
    pub fn parse(s: &str) -> Option<Form> {
        match s {
            "dense" => Some(Form::Dense),
            "lowrank" | "low_rank" => Some(Form::Lowrank),
            "sparse" => Some(Form::Sparse),
            "combination" => Some(Form::Combination),
            "masked" => Some(Form::Masked),
            _ => None,
        }
    }
}

/// How a merge is held: its form and the form's one parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Residency {
    /// `dense`, `lowrank`, `sparse` or `combination`.
    pub form: Form,
    /// `combination`: the form each expert's task vector is held in
    /// (`dense`, `lowrank` or `sparse`; default `lowrank`); `energy`,
    /// `rank` and `density` then belong to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vectors: Option<Form>,
    /// `lowrank`: the fraction of each delta's energy (Σσ²) kept, in (0, 1];
    /// default [`DEFAULT_ENERGY`] unless `rank` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    /// `lowrank`: a fixed rank per tensor instead of an energy (bounded by
    /// `server.limits.max_rank`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u64>,
    /// `sparse`: the fraction of each delta's entries kept, in (0, 1];
    /// default [`DEFAULT_DENSITY`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub density: Option<f64>,
}

/// What a lowrank delta keeps per tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Truncation {
    /// The smallest rank holding this fraction of the energy.
    Energy(f64),
    /// This rank (or the tensor's full rank, if smaller).
    Rank(usize),
}

impl Residency {
    /// Held as the merge's own weights.
    pub fn dense() -> Self {
        Residency {
            form: Form::Dense,
            vectors: None,
            energy: None,
            rank: None,
            density: None,
        }
    }

    /// A lowrank delta keeping `energy`.
    pub fn lowrank_energy(energy: f64) -> Self {
        Residency {
            form: Form::Lowrank,
            energy: Some(energy),
            ..Self::dense()
        }
    }

    /// A lowrank delta at a fixed `rank`.
    pub fn lowrank_rank(rank: u64) -> Self {
        Residency {
            form: Form::Lowrank,
            rank: Some(rank),
            ..Self::dense()
        }
    }

    /// A sparse delta keeping `density` of the entries.
    pub fn sparse(density: f64) -> Self {
        Residency {
            form: Form::Sparse,
            density: Some(density),
            ..Self::dense()
        }
    }

    /// A combination over task vectors held as `vectors` (its parameters
    /// apply to them).
    pub fn combination(vectors: Residency) -> Self {
        Residency {
            form: Form::Combination,
            vectors: Some(vectors.form),
            ..vectors
        }
    }

    /// Whether the merge shares a resident base (any form but dense).
    pub fn is_delta(&self) -> bool {
        self.form != Form::Dense
    }

    /// Whether the merge is held as coefficients over shared task vectors.
    pub fn is_combination(&self) -> bool {
        self.form == Form::Combination
    }

    /// A task's view held as a mask over its merge's shared unified vector.
    pub fn masked() -> Self {
        Residency {
            form: Form::Masked,
            ..Self::dense()
        }
    }

    /// Whether the merge is a task's mask over a shared unified vector.
    pub fn is_masked(&self) -> bool {
        self.form == Form::Masked
    }

    /// The form the parameters shape: the task vectors' for a combination
    /// (lowrank by default), else the form itself.
    pub fn shaped_form(&self) -> Form {
        match self.form {
            Form::Combination => self.vectors.unwrap_or(Form::Lowrank),
            f => f,
        }
    }

    /// The form as a label shows it: `dense`, `lowrank energy=0.95`,
    /// `lowrank rank=8`, `sparse density=0.1`, `combination of lowrank
    /// rank=8 task vectors`.
    pub fn describe(&self) -> String {
        let shaped = match self.shaped_form() {
            Form::Lowrank => match self.truncation() {
                Truncation::Energy(e) => format!("lowrank energy={e}"),
                Truncation::Rank(k) => format!("lowrank rank={k}"),
            },
            Form::Sparse => format!("sparse density={}", self.density()),
            f => f.as_str().to_string(),
        };
        if self.is_combination() {
            format!("combination of {shaped} task vectors")
        } else {
            shaped
        }
    }

    /// How each task vector of a combination is held: its form with the
    /// parameters (for any other form, the residency itself).
    pub fn vectors_residency(&self) -> Residency {
        Residency {
            form: self.shaped_form(),
            vectors: None,
            ..self.clone()
        }
    }

    /// The lowrank truncation (energy by default).
    pub fn truncation(&self) -> Truncation {
        match (self.rank, self.energy) {
            (Some(r), _) => Truncation::Rank(r as usize),
            (None, e) => Truncation::Energy(e.unwrap_or(DEFAULT_ENERGY)),
        }
    }

    /// The sparse density (default [`DEFAULT_DENSITY`]).
    pub fn density(&self) -> f64 {
        self.density.unwrap_or(DEFAULT_DENSITY)
    }

    /// Checks the form's parameters: each belongs to its form (a
    /// combination's to its `vectors`), fractions lie in (0, 1], `energy`
    /// and `rank` exclude each other, and `rank` is at least 1 and within
    /// `bounds.rank`.
    pub fn validate(&self, bounds: &Bounds) -> Result<()> {
        match (self.form, self.vectors) {
            (Form::Combination, Some(Form::Combination)) => {
                return Err(MergeError::BadParameter {
                    param: "residency.vectors".into(),
                    reason: "the task vectors of a combination are held `dense`, `lowrank` or \
                             `sparse`"
                        .into(),
                })
            }
            (Form::Combination, _) | (_, None) => {}
            (form, Some(_)) => {
                return Err(MergeError::BadParameter {
                    param: "residency.vectors".into(),
                    reason: format!(
                        "`vectors` belongs to form `combination`, not `{}`",
                        form.as_str()
                    ),
                })
            }
        }
        let shaped = self.shaped_form();
        let misplaced = |param: &str, form: &str| MergeError::BadParameter {
            param: format!("residency.{param}"),
            reason: if self.is_combination() {
                format!(
                    "`{param}` belongs to task vectors held `{form}`, not `{}` (set `vectors`)",
                    shaped.as_str()
                )
            } else {
                format!(
                    "`{param}` belongs to form `{form}`, not `{}`",
                    self.form.as_str()
                )
            },
        };
        if shaped != Form::Lowrank {
            if self.energy.is_some() {
                return Err(misplaced("energy", "lowrank"));
            }
            if self.rank.is_some() {
                return Err(misplaced("rank", "lowrank"));
            }
        }
        if shaped != Form::Sparse && self.density.is_some() {
            return Err(misplaced("density", "sparse"));
        }
        if self.energy.is_some() && self.rank.is_some() {
            return Err(MergeError::BadParameter {
                param: "residency.rank".into(),
                reason: "give `energy` or `rank`, not both".into(),
            });
        }
        for (param, v) in [("energy", self.energy), ("density", self.density)] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                    return Err(MergeError::OutOfRange {
                        param: format!("residency.{param}"),
                        value: v.to_string(),
                        expected: "a fraction in (0, 1]".into(),
                    });
                }
            }
        }
        if let Some(rank) = self.rank {
            if rank == 0 {
                return Err(MergeError::OutOfRange {
                    param: "residency.rank".into(),
                    value: "0".into(),
                    expected: "at least 1".into(),
                });
            }
            if rank > bounds.limit(Work::Rank) {
                return Err(MergeError::OverBound {
                    param: "residency.rank".into(),
                    value: rank,
                    limit: bounds.limit(Work::Rank),
                    work: Work::Rank,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_parameter_at_fault() {
        let b = Bounds {
            rank: 64,
            ..Bounds::default()
        };
        assert!(Residency::lowrank_energy(0.9).validate(&b).is_ok());
        assert!(Residency::lowrank_rank(64).validate(&b).is_ok());
        assert!(Residency::sparse(1.0).validate(&b).is_ok());
        assert!(Residency::dense().validate(&b).is_ok());
        let err = |r: Residency| r.validate(&b).unwrap_err().to_string();
        assert!(err(Residency::lowrank_rank(65)).contains("residency.rank"));
        assert!(err(Residency::lowrank_rank(0)).contains("at least 1"));
        assert!(err(Residency::lowrank_energy(f64::NAN)).contains("residency.energy"));
        assert!(err(Residency::lowrank_energy(1.5)).contains("(0, 1]"));
        assert!(err(Residency::sparse(0.0)).contains("residency.density"));
        let mixed = Residency {
            density: Some(0.1),
            ..Residency::lowrank_energy(0.9)
        };
        assert!(err(mixed).contains("belongs to form `sparse`"));
        let both = Residency {
            rank: Some(4),
            ..Residency::lowrank_energy(0.9)
        };
        assert!(err(both).contains("not both"));
    }

    fn compact(s: &str) -> crate::spec::MergeSpec {
        match crate::spec::compact::parse(s).unwrap() {
            crate::spec::compact::Parsed::Merge(spec) => *spec,
            _ => panic!("`{s}` is not a merge"),
        }
    }

    fn id(spec: &crate::spec::MergeSpec) -> String {
        crate::spec::canonical::merge_id(spec, false, false, &[])
    }

    #[test]
    fn compact_keys_round_trip_and_set_the_merge_id() {
        let low = compact("task_arithmetic(a,b;base=c,form=lowrank,form_rank=8)");
        assert_eq!(low.residency, Some(Residency::lowrank_rank(8)));
        let again = compact(&crate::spec::compact::to_compact(&low));
        assert_eq!(again, low);
        let sparse = compact("task_arithmetic(a,b;base=c,form=sparse,form_density=0.05)");
        assert_eq!(sparse.residency, Some(Residency::sparse(0.05)));
        let plain = compact("task_arithmetic(a,b;base=c)");
        let dense = compact("task_arithmetic(a,b;base=c,form=dense)");
        // A delta form is its own model; `dense` spelled out is not.
        assert_eq!(id(&plain), id(&dense));
        assert_ne!(id(&plain), id(&low));
        assert_ne!(id(&low), id(&sparse));
        assert_ne!(
            id(&low),
            id(&compact(
                "task_arithmetic(a,b;base=c,form=lowrank,form_rank=9)"
            ))
        );
        // The default energy and the same energy written out are one model.
        assert_eq!(
            id(&compact("task_arithmetic(a,b;base=c,form=lowrank)")),
            id(&compact(
                "task_arithmetic(a,b;base=c,form=lowrank,form_energy=0.95)"
            ))
        );
        let err = crate::spec::compact::parse("task_arithmetic(a,b;form=svd)")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unknown form `svd`"), "{err}");
        let err = crate::spec::compact::parse("task_arithmetic(a,b;form=lowrank,form_rank=-1)")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("form_rank"), "{err}");
    }

    #[test]
    fn plans_check_the_form_and_refuse_it_for_routed_merges() {
        use crate::plan::Plan;
        let bad = compact("task_arithmetic(a,b;base=c,form=sparse,form_density=2)");
        let err = Plan::new(bad).err().unwrap().to_string();
        assert!(err.contains("residency.density"), "{err}");
        let routed = compact("we_moe(a,b;base=c,form=lowrank)");
        let err = Plan::new(routed).err().unwrap().to_string();
        assert!(err.contains("held dense"), "{err}");
        let unknown = compact("no_such_method(a,b;form=lowrank)");
        let err = Plan::new(unknown).err().unwrap().to_string();
        assert!(err.contains("unknown merge method"), "{err}");
        assert!(Plan::new(compact("ties_merging(a,b;base=c,form=lowrank)")).is_ok());
    }

    #[test]
    fn a_combination_shapes_its_task_vectors() {
        let b = Bounds::default();
        let c = compact(
            "task_arithmetic(a,b;base=c,form=combination,form_vectors=sparse,form_density=0.2)",
        );
        let r = c.residency.clone().unwrap();
        assert_eq!(r, Residency::combination(Residency::sparse(0.2)));
        assert!(r.validate(&b).is_ok());
        assert_eq!(r.vectors_residency(), Residency::sparse(0.2));
        assert_eq!(
            r.describe(),
            "combination of sparse density=0.2 task vectors"
        );
        assert_eq!(compact(&crate::spec::compact::to_compact(&c)), c);
        // Lowrank task vectors by default, the energy theirs.
        let plain = compact("task_arithmetic(a,b;base=c,form=combination)");
        let r = plain.residency.clone().unwrap();
        assert_eq!(r.shaped_form(), Form::Lowrank);
        assert_eq!(
            r.vectors_residency(),
            Residency {
                form: Form::Lowrank,
                ..Residency::dense()
            }
        );
        assert_eq!(
            id(&plain),
            id(&compact(
                "task_arithmetic(a,b;base=c,form=combination,form_vectors=lowrank,form_energy=0.95)"
            ))
        );
        assert_ne!(id(&plain), id(&c));
        assert_ne!(
            id(&plain),
            id(&compact("task_arithmetic(a,b;base=c,form=lowrank)"))
        );
        let err = |r: Residency| r.validate(&b).unwrap_err().to_string();
        let density_on_lowrank = Residency {
            density: Some(0.1),
            ..Residency::combination(Residency::lowrank_rank(4))
        };
        assert!(err(density_on_lowrank).contains("task vectors held `sparse`"));
        let nested = Residency {
            vectors: Some(Form::Combination),
            ..Residency::combination(Residency::dense())
        };
        assert!(err(nested).contains("residency.vectors"));
        let stray = Residency {
            vectors: Some(Form::Sparse),
            ..Residency::lowrank_rank(4)
        };
        assert!(err(stray).contains("belongs to form `combination`"));
    }

    #[test]
    fn truncation_defaults_to_the_energy() {
        assert_eq!(
            Residency {
                form: Form::Lowrank,
                ..Residency::dense()
            }
            .truncation(),
            Truncation::Energy(DEFAULT_ENERGY)
        );
        assert_eq!(Residency::lowrank_rank(3).truncation(), Truncation::Rank(3));
        assert_eq!(Residency::sparse(0.2).density(), 0.2);
    }
}
