//! Passthrough, one model's tensors as they are (mergekit `passthrough`).
//!
//! Exactly one model θ1; per tensor:
//!
//! ```text
//! θ = s · θ1
//! ```
//!
//! with the model's `scale` s (default 1: the tensor unchanged). Its use is
//! layer stacking: a mergekit config whose `slices` take layer ranges of
//! one model each (see [`crate::slices`]) builds a model deeper or
//! shallower than its inputs, every tensor copied from its slice's model.
//!
//! Parameters: per-model `scale` (mergekit's tensor parameter, default
//! none, which is 1 here), any finite number, per-tensor resolvable (a
//! filter list scales only the tensors it names, as mergekit's
//! `scale: [{filter: o_proj, value: 0.5}, {value: 1}]` does).

use candle_core::Tensor;

use super::schema::Param;
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::Result;

/// One model, scaled.
#[derive(Debug)]
struct Passthrough {
    scale: Num,
}

/// The factor each tensor is multiplied by.
static SCALE: Param = Param::per_model(
    "scale",
    1.0,
    "factor s of the model's tensors (θ = s·θ1); 1 leaves them unchanged",
);

/// The parameters of `passthrough`.
pub static PARAMS: &[&Param] = &[&SCALE];

/// Builds `passthrough`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let scale = p.per_model(&SCALE)?.remove(0);
    Ok(Box::new(Passthrough { scale }))
}

impl MergeMethod for Passthrough {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let s = self.scale.at(&inputs.ctx)? as f32;
        inputs.combine(None, &[s])
    }

    /// θ = s·θ1 is an affine combination only at s = 1.
    fn affine_coefficients(&self, experts: usize) -> Option<(f64, Vec<f64>)> {
        (experts == 1 && self.scale.constant_value() == Some(1.0)).then(|| (0.0, vec![1.0]))
    }
}

#[cfg(test)]
mod tests {
    use crate::methods::testutil::{assert_close, merge1, Fixture};
    use crate::spec::{MergeSpec, ParamValue};

    #[test]
    fn copies_the_model_unless_scaled() {
        let x = [1.5f32, -2.0, 0.25];
        let fx = Fixture::new("model.layers.0.self_attn.o_proj.weight", &[3], None, &[&x]);
        let spec = MergeSpec::new("passthrough", None, &["a"]);
        assert_close(&merge1(&spec, &fx), &x, 0.0);
        let mut scaled = MergeSpec::new("passthrough", None, &["a"]);
        scaled.models[0]
            .parameters
            .insert("scale".into(), ParamValue::Number(0.5));
        // 0.5 · [1.5, −2, 0.25] = [0.75, −1, 0.125]
        assert_close(&merge1(&scaled, &fx), &[0.75, -1.0, 0.125], 0.0);
    }

    #[test]
    fn needs_exactly_one_model() {
        let err = crate::methods::build(&MergeSpec::new("passthrough", None, &["a", "b"]))
            .err()
            .expect("two models refused")
            .to_string();
        assert!(err.contains("passthrough"), "{err}");
    }
}
