//! mergekit's `ties`: the generalized task arithmetic of the task-vector
//! engine ([`crate::methods::task_vectors`]) with magnitude trimming and the
//! sign consensus; see the header of [`super`].

use super::super::schema::{common, DefaultValue, Param, Range, Type};
use super::super::task_vectors::MkMerge;
use super::super::{MergeMethod, Params};
use crate::error::Result;

/// mergekit's per-model `density` (`ties`, `dare_linear`, `dare_ties`).
pub(crate) static DENSITY: Param =
    Param::per_model("density", 1.0, "fraction of each task vector kept")
        .range(Range::UNIT_OPEN_BELOW);

/// mergekit's λ (1.0) of the generalised task arithmetic.
pub(crate) static LAMBDA: Param = Param::global(
    "scaling_coefficient",
    Type::Number,
    DefaultValue::Number(1.0),
    "scale λ of the merged task vector",
)
.aliases(&["lambda"]);

/// `normalize` (on): divide by Σ wi over the agreeing entries.
static NORMALIZE: Param = Param::global(
    "normalize",
    Type::Bool,
    DefaultValue::Bool(true),
    "divide by Σ wi over the entries that agree with the elected sign",
);

/// The parameters of mergekit's `ties`.
pub static PARAMS: &[&Param] = &[
    &common::WEIGHT,
    &DENSITY,
    &NORMALIZE,
    &LAMBDA,
    &common::INT8_MASK,
];

/// Builds mergekit's `ties`.
pub fn build_mergekit(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let weights = p.per_model(&common::WEIGHT)?;
    let trim = p.per_model(&DENSITY)?;
    let normalize = p.boolean(&NORMALIZE)?;
    let lambda = p.number(&LAMBDA)?;
    p.boolean(&common::INT8_MASK)?;
    Ok(Box::new(MkMerge {
        weights,
        trim: Some(trim),
        dropout: None,
        consensus: true,
        normalize,
        lambda,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::test_data::{mk_spec, random_fixture};
    use super::*;
    use crate::methods::task_vectors::SMALL;
    use crate::methods::testutil::{assert_close, merge1, Fixture};
    use crate::methods::Num;
    use crate::spec::ParamValue;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    // τ1 = [0.5, -0.25, 0.125, -1], w 1, density 0.5: k = 2 → [0.5, 0, 0, -1].
    // τ2 = [-0.25, 0.5, 0.5, 0.5], w 0.5, density 0.75: k = 3 → [0, 0.5, 0.5, 0.5].
    // δ1 = [0.5, 0, 0, -1], δ2 = [0, 0.25, 0.25, 0.25]; Σ = [0.5, 0.25, 0.25, -0.75]
    // → elected [+, +, +, -]; masks m1 = [1, 0, 0, 1], m2 = [0, 1, 1, 0].
    // mixed = [0.5, 0.25, 0.25, -1]; divisor Σ w·m = [1, 0.5, 0.5, 1].
    fn mk_fixture() -> Fixture {
        Fixture::new(
            "w",
            &[4],
            Some(&[1.0; 4]),
            &[&[1.5, 0.75, 1.125, 0.0], &[0.75, 1.5, 1.5, 1.5]],
        )
    }

    #[test]
    fn mergekit_ties_weights_and_normalize() {
        // normalize (default): [0.5, 0.5, 0.5, -1] → θ = [1.5, 1.5, 1.5, 0]
        let spec = mk_spec("ties", &[(1.0, 0.5), (0.5, 0.75)]);
        assert_close(&merge1(&spec, &mk_fixture()), &[1.5, 1.5, 1.5, 0.0], 1e-6);
        // normalize false, lambda 2: θ = 1 + 2·mixed = [2, 1.5, 1.5, -1]
        let spec = spec
            .with_value("normalize", ParamValue::Bool(false))
            .with("lambda", 2.0);
        assert_close(&merge1(&spec, &mk_fixture()), &[2.0, 1.5, 1.5, -1.0], 1e-6);
    }

    #[test]
    fn mergekit_ties_keeps_exactly_k_breaking_ties_by_position() {
        // |τ| = [0.5, 0.5, 0.5, 0.25], density 0.5: k = 2 → the first two 0.5s.
        let fx = Fixture::new("w", &[4], Some(&[0.0; 4]), &[&[0.5, -0.5, 0.5, 0.25]]);
        let spec = mk_spec("ties", &[(1.0, 0.5)]);
        assert_close(&merge1(&spec, &fx), &[0.5, -0.5, 0.0, 0.0], 0.0);
        // k = int(0.2·4) = 0 keeps nothing: θ = θ0.
        let spec = mk_spec("ties", &[(1.0, 0.2)]);
        assert_close(&merge1(&spec, &fx), &[0.0; 4], 0.0);
    }

    #[test]
    fn mergekit_tie_breaking_across_chunks_on_both_paths() {
        // A large coarse tensor (radix path, many chunks): each task keeps
        // exactly int(density·n) entries, and the candle path agrees.
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let n = SMALL + 40_000;
        let fx = random_fixture(&mut rng, "w", n, 2, true);
        let inputs = fx.inputs();
        for (i, d) in [0.3f64, 0.55].iter().enumerate() {
            let single = Fixture {
                name: "w".into(),
                shape: fx.shape.clone(),
                base: fx.base.clone(),
                experts: vec![fx.experts[i].clone()],
                num_layers: 1,
            };
            let got = merge1(&mk_spec("ties", &[(1.0, *d)]), &single);
            let base = inputs.base.unwrap().to_f32_vec();
            let e = inputs.experts[i].to_f32_vec();
            let kept = got.iter().zip(&base).filter(|(g, b)| g != b).count();
            let nonzero = base.iter().zip(&e).filter(|(b, e)| b != e).count();
            assert_eq!(kept, ((d * n as f64) as usize).min(nonzero), "density {d}");
        }
        let mk = MkMerge {
            weights: vec![Num::constant("weight", 0.7), Num::constant("weight", 1.3)],
            trim: Some(vec![
                Num::constant("density", 0.3),
                Num::constant("density", 0.55),
            ]),
            dropout: None,
            consensus: true,
            normalize: true,
            lambda: Num::constant("lambda", 0.9),
        };
        let fused = mk
            .merge_with(&inputs, true)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let generic = mk
            .merge_with(&inputs, false)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_close(&generic, &fused, 1e-6);
    }
}
