//! The architecture of a BERT-style encoder, read from a Hugging Face
//! `config.json` (`model_type: bert`, `BertModel`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, RuntimeError};

/// The activation of the feed-forward block (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact GELU, `x * Φ(x)` (erf form), as `transformers`
    /// computes it.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }
}

/// Everything the encoder needs from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// Vocabulary size (rows of the word embedding).
    pub vocab_size: usize,
    /// Width of the hidden states (the embedding dimension).
    pub hidden_size: usize,
    /// Number of encoder blocks.
    pub num_hidden_layers: usize,
    /// Attention heads (`hidden_size` is a multiple of it).
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    pub hidden_act: Activation,
    /// Rows of the absolute position embedding: the longest input.
    pub max_position_embeddings: usize,
    /// Rows of the token-type (segment) embedding.
    pub type_vocab_size: usize,
    /// Epsilon of the layer norms.
    pub layer_norm_eps: f64,
    /// The padding token id.
    pub pad_token_id: u32,
}

#[derive(Deserialize)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    pad_token_id: Option<u32>,
    position_embedding_type: Option<String>,
}

impl EncoderConfig {
    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let (path, text) = crate::architectures::config_json(dir)?;
        Self::from_json(&text, &path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |reason: String| RuntimeError::ModelConfig {
            path: PathBuf::from(path),
            reason,
        };
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let act_name = raw.hidden_act.as_deref().unwrap_or("gelu");
        let hidden_act = Activation::parse(act_name).ok_or_else(|| {
            bad(format!(
                "hidden_act `{act_name}` is not supported (gelu, gelu_new, relu)"
            ))
        })?;
        if let Some(p) = raw.position_embedding_type.as_deref() {
            if p != "absolute" {
                return Err(bad(format!(
                    "position_embedding_type `{p}` is not supported (absolute)"
                )));
            }
        }
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(512);
        let type_vocab_size = raw.type_vocab_size.unwrap_or(2);
        for (field, value) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
            ("max_position_embeddings", max_position_embeddings),
            ("type_vocab_size", type_vocab_size),
        ] {
            if value == 0 {
                return Err(bad(format!("`{field}` must be positive")));
            }
        }
        if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size ({}) is not a multiple of num_attention_heads ({})",
                raw.hidden_size, raw.num_attention_heads
            )));
        }
        let layer_norm_eps = raw.layer_norm_eps.unwrap_or(1e-12);
        if !(layer_norm_eps.is_finite() && layer_norm_eps > 0.0) {
            return Err(bad(format!(
                "`layer_norm_eps` ({layer_norm_eps}) must be positive"
            )));
        }
        let pad_token_id = raw.pad_token_id.unwrap_or(0);
        if pad_token_id as usize >= raw.vocab_size {
            return Err(bad(format!(
                "`pad_token_id` ({pad_token_id}) is outside the vocabulary ({})",
                raw.vocab_size
            )));
        }
        Ok(EncoderConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            hidden_act,
            max_position_embeddings,
            type_vocab_size,
            layer_norm_eps,
            pad_token_id,
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Every weight the encoder reads, by its Hugging Face name (without a
    /// `bert.` prefix), with its shape. The pooler (`pooler.dense.*`) is not
    /// among them: sentence embeddings pool the hidden states.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let i = self.intermediate_size;
        let mut out = vec![
            (
                "embeddings.word_embeddings.weight".to_string(),
                vec![self.vocab_size, h],
            ),
            (
                "embeddings.position_embeddings.weight".to_string(),
                vec![self.max_position_embeddings, h],
            ),
            (
                "embeddings.token_type_embeddings.weight".to_string(),
                vec![self.type_vocab_size, h],
            ),
            ("embeddings.LayerNorm.weight".to_string(), vec![h]),
            ("embeddings.LayerNorm.bias".to_string(), vec![h]),
        ];
        for l in 0..self.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            for (name, shape) in [
                ("attention.self.query.weight", vec![h, h]),
                ("attention.self.query.bias", vec![h]),
                ("attention.self.key.weight", vec![h, h]),
                ("attention.self.key.bias", vec![h]),
                ("attention.self.value.weight", vec![h, h]),
                ("attention.self.value.bias", vec![h]),
                ("attention.output.dense.weight", vec![h, h]),
                ("attention.output.dense.bias", vec![h]),
                ("attention.output.LayerNorm.weight", vec![h]),
                ("attention.output.LayerNorm.bias", vec![h]),
                ("intermediate.dense.weight", vec![i, h]),
                ("intermediate.dense.bias", vec![i]),
                ("output.dense.weight", vec![h, i]),
                ("output.dense.bias", vec![h]),
                ("output.LayerNorm.weight", vec![h]),
                ("output.LayerNorm.bias", vec![h]),
            ] {
                out.push((format!("{p}.{name}"), shape));
            }
        }
        out
    }

    /// Parameters of the encoder (the tensors of [`Self::tensor_shapes`]).
    pub fn num_parameters(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINILM: &str = r#"{"architectures":["BertModel"],"hidden_act":"gelu","hidden_size":384,
        "intermediate_size":1536,"layer_norm_eps":1e-12,"max_position_embeddings":512,
        "model_type":"bert","num_attention_heads":12,"num_hidden_layers":6,"pad_token_id":0,
        "position_embedding_type":"absolute","type_vocab_size":2,"vocab_size":30522}"#;

    #[test]
    fn all_minilm_l6_v2_has_22_7m_parameters() {
        let c = EncoderConfig::from_json(MINILM, Path::new("config.json")).unwrap();
        assert_eq!(c.head_dim(), 32);
        assert_eq!(c.hidden_act, Activation::Gelu);
        // 22,713,216 weights besides the pooler's 147,840 (22.7M in all).
        assert_eq!(c.num_parameters(), 22_565_376);
    }

    #[test]
    fn unsupported_settings_are_named() {
        let err = |patch: &str| {
            let mut v: serde_json::Value = serde_json::from_str(MINILM).unwrap();
            let p: serde_json::Value = serde_json::from_str(patch).unwrap();
            for (k, x) in p.as_object().unwrap() {
                v[k] = x.clone();
            }
            EncoderConfig::from_json(&v.to_string(), Path::new("c.json"))
                .unwrap_err()
                .to_string()
        };
        assert!(err(r#"{"hidden_act":"swish"}"#).contains("hidden_act `swish`"));
        assert!(err(r#"{"position_embedding_type":"relative_key"}"#).contains("relative_key"));
        assert!(err(r#"{"num_attention_heads":5}"#).contains("not a multiple"));
        assert!(err(r#"{"layer_norm_eps":-1}"#).contains("layer_norm_eps"));
        assert!(err(r#"{"hidden_size":0}"#).contains("hidden_size"));
    }
}
