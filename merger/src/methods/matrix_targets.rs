//! Which tensors the matrix methods (`iso_c`, `iso_cts`, `tsv_m`, `wudi`)
//! treat as matrices, FusionBench's rule: every non-empty 2-D tensor whose
//! name is not in `exclude_keys`, the token embedding and `lm_head`
//! included. Every other tensor (1-D norms and biases, and the excluded
//! ones) takes the plain mean of the task vectors instead (iso and tsv_m
//! scale it by α, as FusionBench scales its whole merged task vector).
//!
//! `exclude_keys` is a list of tensor names. An entry equal to a tensor's
//! name excludes it, as FusionBench's `key not in exclude_keys` does; an
//! entry containing `*` is a pattern in which `*` stands for any run of
//! characters (`*embed_tokens*`, `model.layers.*.mlp.down_proj.weight`).
//! Tensor names never contain `*`, so a FusionBench list means the same
//! here. Unlike FusionBench, which ignores them, an entry that matches no
//! tensor of the model is an error (a misspelt name would otherwise change
//! nothing without a word).

use std::sync::atomic::{AtomicBool, Ordering};

use super::schema::common;
use super::{ModelScan, Params, TensorInputs};
use crate::error::{MergeError, Result};

/// The tensors a matrix method decomposes (or, for WUDI, optimises).
#[derive(Debug, Clone, Default)]
pub struct MatrixTargets {
    exclude: Vec<String>,
}

impl MatrixTargets {
    /// Reads `exclude_keys` (default: nothing excluded).
    pub fn from_params(p: &mut Params) -> Result<Self> {
        Ok(MatrixTargets {
            exclude: p.names(&common::EXCLUDE_KEYS)?,
        })
    }

    /// True when the tensor is merged as a matrix: 2-D, non-empty, not
    /// excluded.
    pub fn includes(&self, inputs: &TensorInputs) -> bool {
        let shape = inputs.shape();
        shape.len() == 2 && shape[0] > 0 && shape[1] > 0 && !self.excludes(&inputs.ctx.name)
    }

    /// True when an `exclude_keys` entry matches `name`.
    fn excludes(&self, name: &str) -> bool {
        self.exclude.iter().any(|p| matches(p, name))
    }

    /// Checks over the whole model that every entry matches some tensor.
    pub fn check(&self, scan: &dyn ModelScan) -> Result<()> {
        if self.exclude.is_empty() {
            return Ok(());
        }
        let seen: Vec<AtomicBool> = self
            .exclude
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect();
        scan.for_each(&|inputs| {
            for (p, hit) in self.exclude.iter().zip(&seen) {
                if matches(p, &inputs.ctx.name) {
                    hit.store(true, Ordering::Relaxed);
                }
            }
            Ok(())
        })?;
        match self
            .exclude
            .iter()
            .zip(&seen)
            .find(|(_, hit)| !hit.load(Ordering::Relaxed))
        {
            Some((p, _)) => Err(MergeError::BadParameter {
                param: common::EXCLUDE_KEYS.name.into(),
                reason: format!(
                    "`{p}` matches no tensor of the model (entries are full tensor names such as \
                     `model.embed_tokens.weight`, or patterns with `*`)"
                ),
            }),
            None => Ok(()),
        }
    }
}

/// Whether `pattern` matches the whole of `name`: exactly, or with each `*`
/// standing for any run of characters (possibly empty).
fn matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: an exact match.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMBED: &str = "model.embed_tokens.weight";

    #[test]
    fn exact_names_match_only_themselves() {
        assert!(matches(EMBED, EMBED));
        assert!(!matches("embed_tokens", EMBED));
        assert!(!matches("model.embed_tokens", EMBED));
        assert!(!matches(EMBED, "model.embed_tokens.weight2"));
        assert!(!matches("", EMBED));
    }

    #[test]
    fn stars_match_any_run() {
        assert!(matches("*embed_tokens*", EMBED));
        assert!(matches("*", EMBED));
        assert!(matches("model.*.weight", EMBED));
        assert!(matches("*.weight", "lm_head.weight"));
        assert!(!matches("*.bias", "lm_head.weight"));
        let down = "model.layers.12.mlp.down_proj.weight";
        assert!(matches("model.layers.*.mlp.down_proj.weight", down));
        assert!(!matches("model.layers.*.mlp.up_proj.weight", down));
        // Pieces are found in order and may not overlap: `ab*ba` needs 4+
        // characters, so `aba` does not match it.
        assert!(!matches("ab*ba", "aba"));
        assert!(matches("ab*ba", "abba"));
        assert!(matches("a**b", "ab"));
    }
}
