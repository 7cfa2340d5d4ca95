//! The registry of architecture families the runtime runs.
//!
//! A family is recognised from a Hugging Face `config.json` (its
//! `model_type`, else its first `architectures` entry) and names the module
//! that implements it. Adding a family is one module (next to
//! [`crate::model`], the decoder-only transformer) plus one entry in
//! [`REGISTRY`]; the config reader, the error listing what is supported and
//! the config writer all read the table.

use serde::{Deserialize, Serialize};

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
}

/// The kind of network a family is, i.e. the runtime module that builds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A decoder-only causal language model ([`crate::model::Model`]).
    Decoder,
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
    REGISTRY
        .iter()
        .map(|a| a.model_type)
        .collect::<Vec<_>>()
        .join(", ")
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
        assert!(recognise("bert").is_none());
        assert_eq!(supported(), "llama, mistral, qwen2");
    }
}
