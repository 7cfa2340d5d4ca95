//! Classification heads of image tasks, FusionBench's protocol: each task
//! has a head that stays frozen (FusionBench builds it from CLIP's text
//! tower, one embedding per class name; the vision demo pool from the base
//! model's class-mean image embeddings), every expert is fine-tuned under
//! its task's head, and a merged encoder is scored on each task with that
//! task's head.
//!
//! ```text
//! logits_c = s · ⟨e/‖e‖, w_c/‖w_c‖⟩        (CLIP's zero-shot classifier)
//! p        = softmax(logits)
//! ```
//!
//! A head file is a safetensors with `weight`, `(classes, dim)`, and
//! `logit_scale`, one value `s` (CLIP's `logit_scale.exp()`, 100 for
//! OpenAI's checkpoints).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{EvalError, Result};

/// Largest head a task may name (classes × dim values).
pub const MAX_HEAD_VALUES: usize = 16 << 20;

/// A frozen linear head over normalised embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassHead {
    /// One unit-norm row per class.
    rows: Vec<Vec<f32>>,
    /// The logit scale `s`.
    scale: f32,
}

impl ClassHead {
    /// A head of class vectors (normalised here) and a logit scale.
    pub fn new(rows: Vec<Vec<f32>>, scale: f32, what: &str) -> Result<Self> {
        let bad = |reason: String| EvalError::Head {
            path: what.into(),
            reason,
        };
        let dim = rows.first().map_or(0, Vec::len);
        if rows.len() < 2 || dim == 0 {
            return Err(bad(format!(
                "a head needs at least 2 classes of width ≥ 1 (got {} of width {dim})",
                rows.len()
            )));
        }
        if !(scale.is_finite() && scale > 0.0) {
            return Err(bad(format!("logit_scale ({scale}) must be positive")));
        }
        let mut unit = Vec::with_capacity(rows.len());
        for (c, r) in rows.into_iter().enumerate() {
            let n = r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            if r.len() != dim || !(n.is_finite() && n > 0.0) {
                return Err(bad(format!(
                    "class {c}: the row has width {} (others {dim}) or a zero or non-finite norm",
                    r.len()
                )));
            }
            unit.push(r.iter().map(|x| (*x as f64 / n) as f32).collect());
        }
        Ok(ClassHead { rows: unit, scale })
    }

    /// Reads a head file (`weight`, `logit_scale`).
    pub fn load(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let bad = |reason: String| EvalError::Head {
            path: what.clone(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| EvalError::io(path, e))?;
        if meta.len() > (MAX_HEAD_VALUES * 4 + (1 << 20)) as u64 {
            return Err(bad(format!(
                "{} bytes: more than a head may hold ({MAX_HEAD_VALUES} values)",
                meta.len()
            )));
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
        let weight = tensors
            .get("weight")
            .ok_or_else(|| bad("no `weight` tensor (classes × dim)".into()))?;
        let rows = weight
            .to_dtype(DType::F32)
            .and_then(|w| w.to_vec2::<f32>())
            .map_err(|e| bad(format!("`weight` is not a matrix: {e}")))?;
        let scale = match tensors.get("logit_scale") {
            None => 1.0,
            Some(t) => t
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .ok()
                .filter(|v| v.len() == 1)
                .map(|v| v[0])
                .ok_or_else(|| bad("`logit_scale` must hold one value".into()))?,
        };
        Self::new(rows, scale, &what)
    }

    /// Writes the head (`weight` rows as given, normalised; `logit_scale`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let (c, d) = (self.rows.len(), self.dim());
        let flat: Vec<f32> = self.rows.iter().flatten().copied().collect();
        let bad = |e: candle_core::Error| EvalError::Head {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let mut map = HashMap::new();
        map.insert(
            "weight".to_string(),
            Tensor::from_vec(flat, (c, d), &Device::Cpu).map_err(bad)?,
        );
        map.insert(
            "logit_scale".to_string(),
            Tensor::new(&[self.scale], &Device::Cpu).map_err(bad)?,
        );
        candle_core::safetensors::save(&map, path).map_err(bad)
    }

    /// The unit-norm class rows.
    pub fn rows(&self) -> &[Vec<f32>] {
        &self.rows
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.rows.len()
    }

    /// Width of the embeddings it reads.
    pub fn dim(&self) -> usize {
        self.rows[0].len()
    }

    /// The logit scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The logits of one embedding (of width [`ClassHead::dim`]).
    pub fn logits(&self, embedding: &[f32]) -> Vec<f64> {
        let n = embedding
            .iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        self.rows
            .iter()
            .map(|w| {
                let dot: f64 = w
                    .iter()
                    .zip(embedding)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                self.scale as f64 * dot / n
            })
            .collect()
    }

    /// Class probabilities of one embedding (softmax of the logits).
    pub fn probabilities(&self, embedding: &[f32]) -> Vec<f64> {
        let l = self.logits(embedding);
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logits_are_scaled_cosines_and_probabilities_sum_to_one() {
        // rows (3,4) and (0,2) normalise to (0.6,0.8) and (0,1).
        let h = ClassHead::new(vec![vec![3.0, 4.0], vec![0.0, 2.0]], 10.0, "t").unwrap();
        let l = h.logits(&[2.0, 0.0]);
        assert!((l[0] - 6.0).abs() < 1e-6 && l[1].abs() < 1e-6, "{l:?}");
        let p = h.probabilities(&[2.0, 0.0]);
        let want = 1.0 / (1.0 + (-6f64).exp());
        assert!((p[0] - want).abs() < 1e-6 && (p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("h.safetensors");
        h.save(&f).unwrap();
        assert_eq!(ClassHead::load(&f).unwrap(), h);
    }

    #[test]
    fn bad_heads_are_named() {
        let e = ClassHead::new(vec![vec![1.0]], 1.0, "h")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 2 classes"), "{e}");
        let e = ClassHead::new(vec![vec![1.0], vec![0.0]], 1.0, "h")
            .unwrap_err()
            .to_string();
        assert!(e.contains("class 1"), "{e}");
        let e = ClassHead::new(vec![vec![1.0], vec![1.0]], f32::NAN, "h")
            .unwrap_err()
            .to_string();
        assert!(e.contains("logit_scale"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("h.safetensors");
        std::fs::write(&f, b"garbage").unwrap();
        let e = ClassHead::load(&f).unwrap_err().to_string();
        assert!(
            e.contains("h.safetensors") && e.contains("safetensors"),
            "{e}"
        );
    }
}
