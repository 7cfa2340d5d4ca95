//! How sentence-transformers turns hidden states into one sentence
//! embedding, read from the checkpoint folder:
//!
//! - `modules.json`: the module pipeline (`Transformer`, `Pooling`,
//!   `Normalize`); a folder without it is a plain Hugging Face model, which
//!   sentence-transformers pools by mean without normalizing;
//! - `<pooling path>/config.json` (`1_Pooling/config.json`): the pooling
//!   modes, concatenated in sentence-transformers' order (CLS, max, mean,
//!   mean·√len, weighted mean, last token); a Pooling module without one
//!   pools by mean;
//! - a `Normalize` module: L2-normalized embeddings;
//! - `sentence_bert_config.json`: `max_seq_length` (inputs are truncated to
//!   it, the `[SEP]` kept) and `do_lower_case`.
//!
//! Every pooling is over the attention mask: padding never counts.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, D};
use serde::Deserialize;

use crate::error::{Result, RuntimeError};

/// One pooling mode of sentence-transformers' `Pooling` module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first token's (`[CLS]`) hidden state.
    Cls,
    /// The element-wise maximum over the tokens.
    Max,
    /// The mean over the tokens.
    Mean,
    /// The sum over the tokens divided by √(token count).
    MeanSqrtLen,
    /// The mean weighted by position (1, 2, …).
    WeightedMean,
    /// The last token's hidden state.
    LastToken,
}

impl PoolingMode {
    /// The `pooling_mode_*` key of the config (without the prefix).
    pub fn key(&self) -> &'static str {
        match self {
            PoolingMode::Cls => "cls_token",
            PoolingMode::Max => "max_tokens",
            PoolingMode::Mean => "mean_tokens",
            PoolingMode::MeanSqrtLen => "mean_sqrt_len_tokens",
            PoolingMode::WeightedMean => "weightedmean_tokens",
            PoolingMode::LastToken => "lasttoken",
        }
    }

    /// Every mode, in the order sentence-transformers concatenates them.
    pub const ORDER: [PoolingMode; 6] = [
        PoolingMode::Cls,
        PoolingMode::Max,
        PoolingMode::Mean,
        PoolingMode::MeanSqrtLen,
        PoolingMode::WeightedMean,
        PoolingMode::LastToken,
    ];
}

/// A checkpoint's sentence-embedding pipeline after the transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceConfig {
    /// The pooling modes, concatenated in this order.
    pub pooling: Vec<PoolingMode>,
    /// L2-normalize the pooled vector.
    pub normalize: bool,
    /// Longest input in tokens (special tokens included); longer inputs are
    /// truncated.
    pub max_seq_length: usize,
    /// Lower-case inputs first (`do_lower_case`).
    pub lower_case: bool,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct SbertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| RuntimeError::ModelConfig {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

impl SentenceConfig {
    /// Reads the sentence-transformers files of `dir`; `max_positions` (the
    /// encoder's `max_position_embeddings`) bounds `max_seq_length`.
    pub fn from_dir(dir: &Path, max_positions: usize) -> Result<Self> {
        let bad = |path: PathBuf, reason: String| RuntimeError::ModelConfig { path, reason };
        let modules_path = dir.join("modules.json");
        let modules: Vec<ModuleEntry> = read_json(&modules_path)?.unwrap_or_default();
        let mut pooling = vec![PoolingMode::Mean];
        let mut normalize = false;
        for m in &modules {
            let short = m.kind.rsplit('.').next().unwrap_or(&m.kind);
            match short {
                "Transformer" => {}
                "Pooling" => pooling = Self::pooling(&dir.join(&m.path).join("config.json"))?,
                "Normalize" => normalize = true,
                other => {
                    return Err(bad(
                        modules_path.clone(),
                        format!(
                        "module `{other}` ({}) is not supported (Transformer, Pooling, Normalize)",
                        m.kind
                    ),
                    ))
                }
            }
        }
        let sbert_path = dir.join("sentence_bert_config.json");
        let sbert: Option<SbertConfig> = read_json(&sbert_path)?;
        let max_seq_length = sbert
            .as_ref()
            .and_then(|s| s.max_seq_length)
            .unwrap_or(max_positions);
        if max_seq_length < 2 {
            return Err(bad(
                sbert_path,
                format!("`max_seq_length` ({max_seq_length}) leaves no room for a token"),
            ));
        }
        Ok(SentenceConfig {
            pooling,
            normalize,
            max_seq_length: max_seq_length.min(max_positions),
            lower_case: sbert.is_some_and(|s| s.do_lower_case),
        })
    }

    /// The modes of a Pooling module's config.json (mean when it has none).
    fn pooling(path: &Path) -> Result<Vec<PoolingMode>> {
        let Some(v) = read_json::<serde_json::Value>(path)? else {
            return Ok(vec![PoolingMode::Mean]);
        };
        let bad = |reason: String| RuntimeError::ModelConfig {
            path: path.to_path_buf(),
            reason,
        };
        let obj = v
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        if let Some(mode) = obj.get("pooling_mode").and_then(|m| m.as_str()) {
            // The single-string form of newer sentence-transformers.
            let key = match mode {
                "cls" => "cls_token",
                "max" => "max_tokens",
                "mean" => "mean_tokens",
                "mean_sqrt_len_tokens" => "mean_sqrt_len_tokens",
                "weightedmean" => "weightedmean_tokens",
                "lasttoken" => "lasttoken",
                other => return Err(bad(format!("pooling_mode `{other}` is not supported"))),
            };
            return Ok(PoolingMode::ORDER
                .into_iter()
                .filter(|m| m.key() == key)
                .collect());
        }
        if obj.get("include_prompt").and_then(|p| p.as_bool()) == Some(false) {
            return Err(bad("`include_prompt: false` is not supported".into()));
        }
        let modes: Vec<PoolingMode> = PoolingMode::ORDER
            .into_iter()
            .filter(|m| {
                obj.get(&format!("pooling_mode_{}", m.key()))
                    .and_then(|x| x.as_bool())
                    .unwrap_or(false)
            })
            .collect();
        if modes.is_empty() {
            return Err(bad("no pooling mode is turned on".into()));
        }
        Ok(modes)
    }

    /// Width of the sentence embedding for hidden states of width `hidden`.
    pub fn dimension(&self, hidden: usize) -> usize {
        hidden * self.pooling.len()
    }

    /// Sentence embeddings `(batch, dimension)` in f32 (f64 for f64 hidden
    /// states) of hidden states `(batch, seq, hidden)` under `mask`
    /// `(batch, seq)` (1 for a token).
    pub fn pool(&self, hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = if hidden.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let h = hidden.to_dtype(dtype)?;
        let m = mask.to_dtype(dtype)?;
        let (_, t, _) = h.dims3()?;
        let m3 = m.unsqueeze(D::Minus1)?; // (b, t, 1)
        let count = m.sum_keepdim(1)?; // (b, 1)
        let mut parts = Vec::with_capacity(self.pooling.len());
        for mode in &self.pooling {
            let part = match mode {
                PoolingMode::Cls => h.narrow(1, 0, 1)?.squeeze(1)?,
                PoolingMode::Max => {
                    // Padding set to a very negative value, as
                    // sentence-transformers does (-1e9).
                    let off = ((m3.ones_like()? - &m3)? * -1e9)?;
                    h.broadcast_add(&off)?.max(1)?
                }
                PoolingMode::Mean => h
                    .broadcast_mul(&m3)?
                    .sum(1)?
                    .broadcast_div(&count.clamp(1e-9, f64::MAX)?)?,
                PoolingMode::MeanSqrtLen => h
                    .broadcast_mul(&m3)?
                    .sum(1)?
                    .broadcast_div(&count.clamp(1e-9, f64::MAX)?.sqrt()?)?,
                PoolingMode::WeightedMean => {
                    let pos = Tensor::arange(1f32, (t + 1) as f32, h.device())?
                        .to_dtype(dtype)?
                        .reshape((1, t, 1))?
                        .broadcast_mul(&m3)?;
                    let total = pos.sum(1)?.clamp(1e-9, f64::MAX)?;
                    h.broadcast_mul(&pos)?.sum(1)?.broadcast_div(&total)?
                }
                PoolingMode::LastToken => {
                    let lens = m.sum(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    let rows = lens
                        .iter()
                        .enumerate()
                        .map(|(i, &n)| h.get(i)?.get((n as usize).max(1) - 1))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Tensor::stack(&rows, 0)?
                }
            };
            parts.push(part);
        }
        let pooled = Tensor::cat(&parts, 1)?;
        if !self.normalize {
            return Ok(pooled);
        }
        // torch.nn.functional.normalize: x / max(‖x‖, 1e-12).
        let norm = pooled
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        pooled.broadcast_div(&norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn write(dir: &Path, name: &str, text: &str) {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    const MODULES: &str = r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
        {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
        {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#;

    #[test]
    fn reads_the_all_minilm_layout_and_defaults() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "modules.json", MODULES);
        write(
            d.path(),
            "1_Pooling/config.json",
            r#"{"word_embedding_dimension":384,"pooling_mode_cls_token":false,
                "pooling_mode_mean_tokens":true,"pooling_mode_max_tokens":false}"#,
        );
        write(
            d.path(),
            "sentence_bert_config.json",
            r#"{"max_seq_length":256,"do_lower_case":false}"#,
        );
        let c = SentenceConfig::from_dir(d.path(), 512).unwrap();
        assert_eq!(c.pooling, [PoolingMode::Mean]);
        assert!(c.normalize && !c.lower_case);
        assert_eq!(c.max_seq_length, 256);
        // Bounded by the position table.
        assert_eq!(
            SentenceConfig::from_dir(d.path(), 128)
                .unwrap()
                .max_seq_length,
            128
        );
        // A plain HF folder: mean, not normalized, the whole position table.
        let plain = tempfile::tempdir().unwrap();
        let c = SentenceConfig::from_dir(plain.path(), 512).unwrap();
        assert_eq!(
            (c.pooling.as_slice(), c.normalize),
            (&[PoolingMode::Mean][..], false)
        );
        assert_eq!(c.max_seq_length, 512);
        // A Dense module is named.
        write(
            plain.path(),
            "modules.json",
            r#"[{"path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#,
        );
        let e = SentenceConfig::from_dir(plain.path(), 512)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`Dense`"), "{e}");
    }

    #[test]
    fn pools_over_the_mask_as_computed_by_hand() {
        // Two rows of three tokens, hidden 2; the second row has one pad.
        let h = Tensor::new(
            &[
                [[1f32, 2.], [3., 4.], [5., 0.]],
                [[2f32, -2.], [4., 6.], [100., 100.]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &Device::Cpu).unwrap();
        let run = |modes: Vec<PoolingMode>, normalize| {
            SentenceConfig {
                pooling: modes,
                normalize,
                max_seq_length: 8,
                lower_case: false,
            }
            .pool(&h, &mask)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
        };
        assert_eq!(run(vec![PoolingMode::Mean], false), [[3., 2.], [3., 2.]]);
        assert_eq!(run(vec![PoolingMode::Cls], false), [[1., 2.], [2., -2.]]);
        assert_eq!(run(vec![PoolingMode::Max], false), [[5., 4.], [4., 6.]]);
        assert_eq!(
            run(vec![PoolingMode::LastToken], false),
            [[5., 0.], [4., 6.]]
        );
        let s3 = 3f32.sqrt();
        let s2 = 2f32.sqrt();
        let got = run(vec![PoolingMode::MeanSqrtLen], false);
        for (g, w) in got
            .concat()
            .iter()
            .zip([9. / s3, 6. / s3, 6. / s2, 4. / s2])
        {
            assert!((g - w).abs() < 1e-6);
        }
        // Weights 1, 2, 3 (row 2: 1, 2): (1+6+15)/6, (2+8+0)/6; (2+8)/3, (-2+12)/3.
        let got = run(vec![PoolingMode::WeightedMean], false).concat();
        for (g, w) in got.iter().zip([22. / 6., 10. / 6., 10. / 3., 10. / 3.]) {
            assert!((g - w).abs() < 1e-6);
        }
        // Concatenated in sentence-transformers' order, then normalized.
        let got = run(vec![PoolingMode::Cls, PoolingMode::Mean], true);
        let n = (1f32 + 4. + 9. + 4.).sqrt();
        for (g, w) in got[0].iter().zip([1. / n, 2. / n, 3. / n, 2. / n]) {
            assert!((g - w).abs() < 1e-6);
        }
    }
}
