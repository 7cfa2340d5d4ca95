//! NearSwap, take the expert's value where it is close to the base
//! (mergekit `nearswap`).
//!
//! Exactly one model θ1 and a base θ0; per entry:
//!
//! ```text
//! w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1)
//! θ = w θ1 + (1 − w) θ0
//! ```
//!
//! Entries that differ by at most t become θ1's; larger differences keep
//! proportionally more of θ0 (t / |θ0 − θ1| of the change).
//!
//! Parameters: `t` ≥ 0, required (as in mergekit), per-tensor resolvable.

use candle_core::Tensor;

use super::schema::{DefaultValue, Param, Range, Type};
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};

/// Differences below this count as this.
const FLOOR: f64 = 1e-6;

/// The base, moved to the expert where they are near.
#[derive(Debug)]
struct NearSwap {
    t: Num,
}

/// The distance below which the expert's value is taken whole.
static T: Param = Param::global(
    "t",
    Type::Number,
    DefaultValue::Unset,
    "the distance |θ0 − θ1| up to which the expert's value is taken whole (no default, as in \
     mergekit), e.g. t=0.001",
)
.range(Range::NON_NEGATIVE);

/// The parameters of `nearswap`.
pub static PARAMS: &[&Param] = &[&T];

/// Builds `nearswap`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Ok(Box::new(NearSwap {
        t: p.required_number(&T)?,
    }))
}

impl MergeMethod for NearSwap {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let base = inputs.base_f32().map_err(|_| MergeError::MissingBase {
            method: "nearswap".into(),
        })?;
        let t = self.t.at(&inputs.ctx)?;
        let expert = inputs.expert_f32(0)?;
        let merged = (|| {
            let diff = (&base - &expert)?.abs()?.maximum(FLOOR)?;
            let w = diff.recip()?.affine(t, 0.0)?.clamp(0.0, 1.0)?;
            &base + ((&expert - &base)? * w)?
        })();
        merged.map_err(|e| inputs.err(e))
    }
}

#[cfg(test)]
mod tests {
    use crate::methods::testutil::{assert_close, merge1, Fixture};
    use crate::spec::MergeSpec;

    #[test]
    fn near_entries_swap_far_ones_move_partly() {
        // θ0 = [0, 0, 0, 1]; θ1 = [0.05, −0.1, 0.4, 1]; t = 0.1:
        // w = [1 (0.1/0.05 → 1), 1, 0.25, 1 (0.1/1e-6 → 1)]
        // θ = [0.05, −0.1, 0.1, 1].
        let fx = Fixture::new(
            "w",
            &[4],
            Some(&[0., 0., 0., 1.]),
            &[&[0.05, -0.1, 0.4, 1.]],
        );
        let s = MergeSpec::new("nearswap", Some("base"), &["x"]).with("t", 0.1);
        assert_close(&merge1(&s, &fx), &[0.05, -0.1, 0.1, 1.], 1e-6);
        // t = 0 keeps the base.
        let s = MergeSpec::new("nearswap", Some("base"), &["x"]).with("t", 0.0);
        assert_close(&merge1(&s, &fx), &[0., 0., 0., 1.], 0.0);
    }

    #[test]
    fn t_is_required_and_non_negative() {
        let err = crate::methods::build(&MergeSpec::new("nearswap", Some("base"), &["x"]))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`t`") && err.contains("requires"), "{err}");
        let neg = MergeSpec::new("nearswap", Some("base"), &["x"]).with("t", -0.1);
        assert!(crate::methods::build(&neg).is_err());
        assert!(
            crate::methods::build(&MergeSpec::new("nearswap", None, &["x"]).with("t", 0.1))
                .is_err()
        );
    }
}
