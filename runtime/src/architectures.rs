//! The registry of architecture families the runtime runs.
//!
//! A family is recognised from a Hugging Face `config.json` (its
//! `model_type`, else its first `architectures` entry) and names the module
//! that implements it. Adding a family is one module (next to
//! [`crate::model`], the decoder-only transformer) plus one entry in
//! [`REGISTRY`]; the config reader, the error listing what is supported and
//! the config writer all read the table.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

/// Model family, from `model_type` (or `architectures`) of config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `LlamaForCausalLM`.
    Llama,
    /// `MistralForCausalLM` (sliding-window attention is not applied: the
    /// window only matters past `sliding_window` tokens).
    Mistral,
    /// `Qwen2ForCausalLM` (biases on the q, k and v projections).
    Qwen2,
    /// `BertModel`: a sentence-embedding encoder ([`crate::encoder`]).
    Bert,
    /// `CLIPVisionModelWithProjection` (`clip_vision_model`, or a full
    /// `clip` checkpoint's vision tower): image embeddings
    /// ([`crate::vision`]).
    Clip,
}

/// The kind of network a family is, i.e. the runtime module that builds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A decoder-only causal language model ([`crate::model::Model`]):
    /// generates text, and embeds by mean-pooling its hidden states.
    Decoder,
    /// A bidirectional encoder ([`crate::encoder::Encoder`]): sentence
    /// embeddings only.
    Encoder,
    /// A vision tower ([`crate::vision::ImageEncoder`]): image embeddings
    /// (and, with a task's head, image classification).
    Vision,
}

impl Kind {
    /// What the model serves, as Hugging Face names the pipeline:
    /// `text-generation`, `embedding` or `image-feature-extraction`
    /// (`GET /v1/models`).
    pub fn task(&self) -> &'static str {
        match self {
            Kind::Decoder => "text-generation",
            Kind::Encoder => "embedding",
            Kind::Vision => "image-feature-extraction",
        }
    }
}

/// One registered family.
#[derive(Debug)]
pub struct Architecture {
    /// The family.
    pub family: Family,
    /// Its `model_type` (also the prefix matched, lower case).
    pub model_type: &'static str,
    /// The `architectures` entry Hugging Face loaders expect.
    pub hf_architecture: &'static str,
    /// The module that builds it.
    pub kind: Kind,
}

/// Every family the runtime runs.
pub static REGISTRY: &[Architecture] = &[
    Architecture {
        family: Family::Llama,
        model_type: "llama",
        hf_architecture: "LlamaForCausalLM",
        kind: Kind::Decoder,
    },
    Architecture {
        family: Family::Mistral,
        model_type: "mistral",
        hf_architecture: "MistralForCausalLM",
        kind: Kind::Decoder,
    },
    Architecture {
        family: Family::Qwen2,
        model_type: "qwen2",
        hf_architecture: "Qwen2ForCausalLM",
        kind: Kind::Decoder,
    },
    Architecture {
        family: Family::Bert,
        model_type: "bert",
        hf_architecture: "BertModel",
        kind: Kind::Encoder,
    },
    Architecture {
        family: Family::Clip,
        model_type: "clip",
        hf_architecture: "CLIPVisionModelWithProjection",
        kind: Kind::Vision,
    },
];

/// The family whose `model_type` starts `kind` (lower case): `llama`,
/// `LlamaForCausalLM` and `llama3` are all Llama.
pub fn recognise(kind: &str) -> Option<&'static Architecture> {
    let kind = kind.to_ascii_lowercase();
    REGISTRY.iter().find(|a| kind.starts_with(a.model_type))
}

/// The registry entry of `family`.
pub fn of(family: Family) -> &'static Architecture {
    REGISTRY
        .iter()
        .find(|a| a.family == family)
        .expect("every family is registered")
}

/// The supported `model_type`s, comma-separated (for error messages).
pub fn supported() -> String {
    supported_of(None)
}

/// The supported `model_type`s of one kind (all with `None`),
/// comma-separated.
pub fn supported_of(kind: Option<Kind>) -> String {
    REGISTRY
        .iter()
        .filter(|a| kind.is_none_or(|k| a.kind == k))
        .map(|a| a.model_type)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The architecture `DIR/config.json` declares (its `model_type`, else its
/// first `architectures` entry).
pub fn of_dir(dir: &Path) -> Result<&'static Architecture> {
    let (path, text) = config_json(dir)?;
    of_json(&text, &path)
}

/// The path and text of `dir/config.json`.
pub(crate) fn config_json(dir: &Path) -> Result<(std::path::PathBuf, String)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| RuntimeError::io(&path, e))?;
    Ok((path, text))
}

/// [`of_dir`] on config.json text; `path` only appears in errors.
pub fn of_json(text: &str, path: &Path) -> Result<&'static Architecture> {
    let bad = |reason: String| RuntimeError::ModelConfig {
        path: path.to_path_buf(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let kind = v
        .get("model_type")
        .and_then(|t| t.as_str())
        .or_else(|| {
            v.get("architectures")
                .and_then(|a| a.get(0))
                .and_then(|a| a.as_str())
        })
        .unwrap_or_default();
    recognise(kind).ok_or_else(|| {
        bad(format!(
            "model_type `{kind}` is not supported ({})",
            supported()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_registered_once_and_recognised_by_both_names() {
        for a in REGISTRY {
            assert_eq!(of(a.family).model_type, a.model_type);
            assert_eq!(recognise(a.model_type).unwrap().family, a.family);
            assert_eq!(recognise(a.hf_architecture).unwrap().family, a.family);
        }
        assert!(recognise("t5").is_none());
        assert_eq!(supported(), "llama, mistral, qwen2, bert, clip");
        assert_eq!(recognise("clip_vision_model").unwrap().kind, Kind::Vision);
        assert_eq!(recognise("CLIPVisionModel").unwrap().family, Family::Clip);
        assert_eq!(supported_of(Some(Kind::Decoder)), "llama, mistral, qwen2");
        assert_eq!(recognise("BertModel").unwrap().kind, Kind::Encoder);
        let p = Path::new("config.json");
        assert_eq!(
            of_json(r#"{"architectures": ["BertModel"]}"#, p)
                .unwrap()
                .family,
            Family::Bert
        );
        let e = of_json(r#"{"model_type": "t5"}"#, p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`t5` is not supported (llama, mistral, qwen2, bert, clip)"),
            "{e}"
        );
    }
}
