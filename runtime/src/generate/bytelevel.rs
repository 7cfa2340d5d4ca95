//! The byte-level tokenizer of the demo pool, written as a real Hugging Face
//! `tokenizer.json` (a BPE model with no merges over the 256 byte symbols of
//! GPT-2's byte-level alphabet, plus special tokens), with a
//! `tokenizer_config.json` that carries the chat template.
//!
//! Token ids: byte `b` is id `b`; the special tokens follow. The demo models
//! are trained on `<s>{prompt}` (and on the chat template, which writes its
//! own `<s>`), so the tokenizer declares what it was trained with, as Hugging
//! Face reads it: a `TemplateProcessing` post-processor that puts `<s>` before
//! a text encoded with special tokens (`tokenizer(text)` in `transformers`),
//! and `add_bos_token: true` in `tokenizer_config.json`.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Result, RuntimeError};

/// Beginning of sequence, `<s>`.
pub const BOS: u32 = 256;
/// End of sequence, `</s>`.
pub const EOS: u32 = 257;
/// Padding, `<pad>`.
pub const PAD: u32 = 258;
/// Start of a user turn, `<|user|>`.
pub const USER: u32 = 259;
/// Start of an assistant turn, `<|assistant|>`.
pub const ASSISTANT: u32 = 260;
/// Start of a system turn, `<|system|>`.
pub const SYSTEM: u32 = 261;
/// Vocabulary size (bytes and special tokens).
pub const VOCAB_SIZE: usize = 262;

/// The special tokens with their ids.
pub const SPECIAL_TOKENS: [(&str, u32); 6] = [
    ("<s>", BOS),
    ("</s>", EOS),
    ("<pad>", PAD),
    ("<|user|>", USER),
    ("<|assistant|>", ASSISTANT),
    ("<|system|>", SYSTEM),
];

/// The chat template: `<s><|user|>…<|assistant|>…</s>`; user turns end where
/// the next role marker starts, the other turns end with `</s>`.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] }}{% if message['role'] != 'user' %}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}";

/// GPT-2's reversible map from bytes to printable characters.
pub fn byte_to_char() -> [char; 256] {
    let printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        if let Some(pos) = printable.iter().position(|&p| p == b) {
            out[b as usize] = char::from_u32(printable[pos]).expect("valid");
        } else {
            out[b as usize] = char::from_u32(256 + extra).expect("valid");
            extra += 1;
        }
    }
    out
}

/// Token ids of `text` as raw bytes (no special tokens): what the tokenizer
/// produces for text without special-token markers.
pub fn encode_bytes(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// The tokenizer.json document.
pub fn tokenizer_json() -> Value {
    let chars = byte_to_char();
    let mut vocab = serde_json::Map::new();
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    for (tok, id) in SPECIAL_TOKENS {
        vocab.insert(tok.to_string(), json!(id));
    }
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .map(|(tok, id)| {
            json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    })
}

/// The tokenizer_config.json document (special tokens and chat template).
pub fn tokenizer_config_json(max_length: usize) -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": true,
        "add_eos_token": false,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    })
}

/// Writes `DIR/tokenizer.json` and `DIR/tokenizer_config.json`.
pub fn write_tokenizer_files(dir: &Path, max_length: usize) -> Result<()> {
    let write = |name: &str, v: &Value| {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(v).expect("json"))
            .map_err(|e| RuntimeError::io(&path, e))
    };
    write("tokenizer.json", &tokenizer_json())?;
    write("tokenizer_config.json", &tokenizer_config_json(max_length))
}

/// Rewrites the tokenizer files of a demo-pool model folder written before
/// the tokenizer declared its BOS (a tokenizer.json equal to this one but
/// with no post-processor): returns whether it did. Any other tokenizer is
/// left alone.
pub fn upgrade_tokenizer_files(dir: &Path) -> Result<bool> {
    let path = dir.join("tokenizer.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(false);
    };
    let Ok(found) = serde_json::from_str::<Value>(&text) else {
        return Ok(false);
    };
    let mut old = tokenizer_json();
    old["post_processor"] = Value::Null;
    if found != old {
        return Ok(false);
    }
    let cpath = dir.join("tokenizer_config.json");
    let max_length = std::fs::read_to_string(&cpath)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["model_max_length"].as_u64())
        .unwrap_or(512) as usize;
    write_tokenizer_files(dir, max_length)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_post_processor_declares_the_trained_bos_and_old_pools_are_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer_files(dir.path(), 64).unwrap();
        let t = crate::generate::TextTokenizer::load(dir.path()).unwrap();
        let mut want = vec![BOS];
        want.extend(encode_bytes("2+2="));
        assert_eq!(t.encode_with_special_tokens("2+2=").unwrap(), want);
        assert_eq!(t.encode("2+2=").unwrap(), encode_bytes("2+2="));
        // Already current: nothing to do.
        assert!(!upgrade_tokenizer_files(dir.path()).unwrap());
        // A folder of an earlier build: no post-processor, add_bos_token false.
        let mut old = tokenizer_json();
        old["post_processor"] = Value::Null;
        std::fs::write(dir.path().join("tokenizer.json"), old.to_string()).unwrap();
        let mut cfg = tokenizer_config_json(64);
        cfg["add_bos_token"] = false.into();
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = crate::generate::TextTokenizer::load(dir.path()).unwrap();
        assert_eq!(
            t.encode_with_special_tokens("2+2=").unwrap(),
            encode_bytes("2+2=")
        );
        assert!(upgrade_tokenizer_files(dir.path()).unwrap());
        let t = crate::generate::TextTokenizer::load(dir.path()).unwrap();
        assert_eq!(t.encode_with_special_tokens("2+2=").unwrap(), want);
        // Another tokenizer is left alone.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("tokenizer.json"), "{}").unwrap();
        assert!(!upgrade_tokenizer_files(other.path()).unwrap());
        assert!(!upgrade_tokenizer_files(&other.path().join("missing")).unwrap());
    }

    use super::*;

    #[test]
    fn alphabet_is_a_bijection() {
        let chars = byte_to_char();
        let mut seen = std::collections::HashSet::new();
        assert!(chars.iter().all(|c| seen.insert(*c)));
        assert_eq!(chars[b'a' as usize], 'a');
        assert_eq!(chars[b' ' as usize], 'Ġ');
    }

    #[test]
    fn the_tokenizers_crate_loads_it_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer_files(dir.path(), 256).unwrap();
        let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        let text = "<s><|user|>add: 12 + 34 = ?<|assistant|>46 é</s>";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let mut want = vec![BOS, USER];
        want.extend(encode_bytes("add: 12 + 34 = ?"));
        want.push(ASSISTANT);
        want.extend(encode_bytes("46 é"));
        want.push(EOS);
        assert_eq!(ids, want);
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert_eq!(tok.decode(&ids, true).unwrap(), "add: 12 + 34 = ?46 é");
        assert_eq!(tok.get_vocab_size(true), VOCAB_SIZE);
    }
}
