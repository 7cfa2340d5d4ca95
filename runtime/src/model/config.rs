//! The architecture of a decoder-only model, read from a Hugging Face
//! `config.json` (Llama, Mistral and Qwen2 families).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

pub use crate::architectures::Family;
use crate::architectures::Kind;

/// Everything the runtime needs from config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Model family.
    pub family: Family,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (fewer than query heads for grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding.
    pub rope_theta: f64,
    /// Longest sequence the model accepts.
    pub max_position_embeddings: usize,
    /// The output projection reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q, k and v projections carry biases (Qwen2, or Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection of attention carries a bias (Llama's `attention_bias`).
    pub o_bias: bool,
    /// MLP projections carry biases (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Beginning-of-sequence token id, if any.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids (generation stops on any of them).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    rope_scaling: Option<serde_json::Value>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

impl ModelConfig {
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
        let kind = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.as_ref().and_then(|a| a.first().cloned()))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let decoders = crate::architectures::supported_of(Some(Kind::Decoder));
        let family = match crate::architectures::recognise(&kind) {
            Some(a) if a.kind == Kind::Decoder => a.family,
            Some(a) => {
                return Err(RuntimeError::WrongKind(format!(
                    "{}: `{kind}` is an {} model; this needs a text-generation model \
                     ({decoders})",
                    path.display(),
                    a.kind.task()
                )))
            }
            None => {
                return Err(bad(format!(
                    "model_type `{kind}` is not supported ({decoders}; encoders: {})",
                    crate::architectures::supported_of(Some(Kind::Encoder))
                )))
            }
        };
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(bad(format!("hidden_act `{act}` is not supported (silu)")));
            }
        }
        if let Some(scaling) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(|t| t.as_str());
            if kind != Some("default") {
                return Err(bad(format!(
                    "rope_scaling {scaling} is not supported (only plain rotary embeddings)"
                )));
            }
        }
        for (field, value) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            (
                "max_position_embeddings",
                raw.max_position_embeddings.unwrap_or(1),
            ),
        ] {
            if value == 0 {
                return Err(bad(format!("`{field}` must be positive")));
            }
        }
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(bad(format!(
                "`rms_norm_eps` ({rms_norm_eps}) must be positive"
            )));
        }
        let rope_theta = raw.rope_theta.unwrap_or(10_000.0);
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return Err(bad(format!(
                "`rope_theta` ({rope_theta}) must be greater than 1"
            )));
        }
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(bad(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return Err(bad(format!(
                    "hidden_size ({}) is not a multiple of num_attention_heads ({heads})",
                    raw.hidden_size
                )))
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim ({head_dim}) must be positive and even for rotary embeddings"
            )));
        }
        let attention_bias = raw.attention_bias.unwrap_or(false);
        Ok(ModelConfig {
            family,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family != Family::Qwen2 && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids: match raw.eos_token_id {
                None => Vec::new(),
                Some(OneOrMany::One(t)) => vec![t],
                Some(OneOrMany::Many(v)) => v,
            },
        })
    }

    /// The config.json a Hugging Face loader reads for this architecture.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let entry = crate::architectures::of(self.family);
        let (model_type, arch) = (entry.model_type, entry.hf_architecture);
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
        });
        if self.family == Family::Llama {
            v["attention_bias"] = self.o_bias.into();
            v["mlp_bias"] = self.mlp_bias.into();
        }
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => v["eos_token_id"] = (*one).into(),
            many => v["eos_token_id"] = many.to_vec().into(),
        }
        v
    }

    /// Parameters of the model (embedding counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let m = self.intermediate_size;
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * m + if self.mlp_bias { 2 * m + h } else { 0 };
        let block = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + self.num_hidden_layers * block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(text, Path::new("config.json"))
    }

    #[test]
    fn llama_defaults_and_gqa() {
        let c = parse(
            r#"{"model_type":"llama","vocab_size":32,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":2,"eos_token_id":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(c.family, Family::Llama);
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.num_key_value_heads, 2);
        assert!(!c.qkv_bias && !c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.rope_theta, 10_000.0);
        let back = ModelConfig::from_json(&c.to_hf_json().to_string(), Path::new("x")).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn qwen2_has_qkv_bias() {
        let c = parse(
            r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":32,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"tie_word_embeddings":true}"#,
        )
        .unwrap();
        assert_eq!(c.family, Family::Qwen2);
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
    }

    #[test]
    fn mistral_is_accepted_with_its_sliding_window() {
        let c = parse(
            r#"{"architectures":["MistralForCausalLM"],"model_type":"mistral","vocab_size":32000,
            "hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,
            "num_key_value_heads":8,"sliding_window":4096,"rope_theta":1000000.0,"rms_norm_eps":1e-05,
            "max_position_embeddings":32768,"hidden_act":"silu","bos_token_id":1,"eos_token_id":2}"#,
        )
        .unwrap();
        assert_eq!(c.family, Family::Mistral);
        assert_eq!((c.head_dim, c.num_key_value_heads), (128, 8));
        assert_eq!(c.rope_theta, 1e6);
        assert!(!c.qkv_bias && !c.o_bias);
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(1), vec![2])
        );
        // Mistral-7B has 7,241,732,096 parameters.
        assert_eq!(c.num_parameters(), 7_241_732_096);
    }

    #[test]
    fn parameter_count_includes_biases() {
        // Llama with attention_bias and mlp_bias: h=4, m=6, 2 heads of 2, 1 kv head, vocab 10.
        let c = parse(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":4,"intermediate_size":6,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
            "attention_bias":true,"mlp_bias":true}"#,
        )
        .unwrap();
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias);
        // embed 40 + lm_head 40 + final norm 4 + block: q 16+4, k 8+2, v 8+2,
        // o 16+4, gate 24+6, up 24+6, down 24+4, two norms 8.
        assert_eq!(
            c.num_parameters(),
            40 + 40 + 4 + 20 + 10 + 10 + 20 + 30 + 30 + 28 + 8
        );
        let from_shapes: usize = crate::model::random::tensor_shapes(&c)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(from_shapes, c.num_parameters());
    }

    #[test]
    fn rope_scaling_only_when_default() {
        let base = r#""model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2"#;
        assert!(parse(&format!(
            r#"{{{base},"rope_scaling":{{"rope_type":"default"}}}}"#
        ))
        .is_ok());
        let e = parse(&format!(
            r#"{{{base},"rope_scaling":{{"rope_type":"llama3","factor":8.0}}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("rope_scaling") && e.contains("llama3"), "{e}");
        let e = parse(&format!(r#"{{{base},"rms_norm_eps":0}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rms_norm_eps"), "{e}");
    }

    #[test]
    fn errors_name_the_problem() {
        let e = parse(r#"{"model_type":"gpt2","vocab_size":1,"hidden_size":4,"intermediate_size":4,"num_hidden_layers":1,"num_attention_heads":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpt2") && e.contains("config.json"), "{e}");
        let e = parse(r#"{"model_type":"llama","vocab_size":1,"hidden_size":64,"intermediate_size":4,"num_hidden_layers":1,"num_attention_heads":8,"num_key_value_heads":3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = parse("{").unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
    }
}
