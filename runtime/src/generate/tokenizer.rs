//! A checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` crate,
//! with the special tokens and chat template of `tokenizer_config.json`.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Result, RuntimeError};

/// What the runtime reads from `tokenizer_config.json` (every field optional).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    /// Beginning-of-sequence token text (`bos_token`).
    pub bos_token: Option<String>,
    /// End-of-sequence token text (`eos_token`).
    pub eos_token: Option<String>,
    /// Padding token text (`pad_token`).
    pub pad_token: Option<String>,
    /// The Jinja chat template (`chat_template`; of a list of named
    /// templates, the one named `default`).
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Parses tokenizer_config.json text; `path` is only used in errors.
    /// Special tokens may be strings or Hugging Face `AddedToken` objects
    /// (`{"content": "<s>", ...}`).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |reason: String| RuntimeError::Tokenizer {
            path: path.to_path_buf(),
            reason,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if !v.is_object() {
            return Err(bad("expected a JSON object".into()));
        }
        let token = |key: &str| -> Result<Option<String>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(bad(format!("`{key}` object has no string `content`"))),
                },
                Some(other) => Err(bad(format!(
                    "`{key}` must be a string or a token object, got {other}"
                ))),
            }
        };
        let chat_template = match v.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => {
                let named = |n: &str| {
                    list.iter().find_map(|t| {
                        (t.get("name")?.as_str()? == n)
                            .then(|| t.get("template")?.as_str().map(String::from))
                            .flatten()
                    })
                };
                Some(named("default").ok_or_else(|| {
                    bad("`chat_template` is a list without a template named `default`".into())
                })?)
            }
            Some(other) => {
                return Err(bad(format!(
                    "`chat_template` must be a string or a list, got {other}"
                )))
            }
        };
        Ok(TokenizerConfig {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            pad_token: token("pad_token")?,
            chat_template,
        })
    }
}

/// The tokenizer of a checkpoint folder.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special-token markers encoded as plain text
    /// (Hugging Face's `split_special_tokens=True`).
    plain: tokenizers::Tokenizer,
    /// The texts of the special added tokens with their ids, longest first.
    specials: Vec<(String, u32)>,
    path: PathBuf,
    config: TokenizerConfig,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `DIR/tokenizer.json` and, when present, `DIR/tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(RuntimeError::Tokenizer {
                path,
                reason: "file not found (the model folder needs a tokenizer.json)".into(),
            });
        }
        let mut inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| RuntimeError::Tokenizer {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        // As `transformers` loads a tokenizer.json: the padding and
        // truncation saved in it are turned off (they are per-call options
        // there; the all-MiniLM-L6-v2 file pads everything to 128).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| RuntimeError::Tokenizer {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let cpath = dir.join("tokenizer_config.json");
        let config = if cpath.is_file() {
            let text = std::fs::read_to_string(&cpath).map_err(|e| RuntimeError::io(&cpath, e))?;
            TokenizerConfig::from_json(&text, &cpath)?
        } else {
            TokenizerConfig::default()
        };
        let id_of = |tok: &Option<String>, key: &str| -> Result<Option<u32>> {
            match tok {
                None => Ok(None),
                Some(t) => inner
                    .token_to_id(t)
                    .map(Some)
                    .ok_or_else(|| RuntimeError::Tokenizer {
                        path: cpath.clone(),
                        reason: format!(
                            "`{key}` {t:?} is not in the vocabulary of {}",
                            path.display()
                        ),
                    }),
            }
        };
        let bos_id = id_of(&config.bos_token, "bos_token")?;
        let eos_id = id_of(&config.eos_token, "eos_token")?;
        let pad_id = id_of(&config.pad_token, "pad_token")?;
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        let mut specials: Vec<(String, u32)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(TextTokenizer {
            inner,
            plain,
            specials,
            path,
            config,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// The tokenizer.json this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed tokenizer_config.json.
    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// Id of `bos_token`, if the tokenizer config names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Id of `eos_token`, if the tokenizer config names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Id of `pad_token`, if the tokenizer config names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Size of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token's text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of `text`. Special-token markers in the text (`<s>`,
    /// `<|user|>`, …) become their ids; nothing is added (no BOS, no
    /// post-processor: Hugging Face's `add_special_tokens=False`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.error(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` as Hugging Face's `tokenizer(text)` gives them
    /// (`add_special_tokens=True`): the tokenizer.json post-processor adds
    /// what the checkpoint declares (a Llama-style BOS, BERT's `[CLS]` …
    /// `[SEP]`, nothing when there is no post-processor). As in
    /// `transformers` 5, `add_bos_token` / `add_eos_token` of
    /// tokenizer_config.json add nothing of their own when tokenizer.json
    /// is there; the post-processor holds the convention.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| self.error(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// This tokenizer with truncation: what
    /// [`TextTokenizer::encode_with_special_tokens`] returns is cut to
    /// `max_length` tokens, the post-processor's tokens kept (BERT's
    /// `[CLS]` … `[SEP]` around the first `max_length - 2` tokens), as
    /// `tokenizer(text, truncation=True, max_length=max_length)` does.
    pub fn truncating(&self, max_length: usize) -> Result<TextTokenizer> {
        let mut t = self.clone();
        let params = tokenizers::TruncationParams {
            max_length,
            ..Default::default()
        };
        for inner in [&mut t.inner, &mut t.plain] {
            inner
                .with_truncation(Some(params.clone()))
                .map_err(|e| RuntimeError::Tokenizer {
                    path: self.path.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(t)
    }

    /// [`TextTokenizer::encode_with_special_tokens`], and whether the text
    /// was cut (by [`TextTokenizer::truncating`]).
    pub fn encode_truncated(&self, text: &str) -> Result<(Vec<u32>, bool)> {
        let enc = self.inner.encode(text, true).map_err(|e| self.error(e))?;
        Ok((enc.get_ids().to_vec(), !enc.get_overflowing().is_empty()))
    }

    /// Token ids of `text` with special-token markers parsed only outside
    /// the byte ranges `literal` (sorted, disjoint): inside them `<s>` or
    /// `<|assistant|>` are plain text, as Hugging Face tokenizers encode
    /// with `split_special_tokens=True`. The text is cut at the special
    /// tokens found outside `literal` (where the tokenizer cuts it too), and
    /// each piece between them is encoded with special tokens split, so a
    /// text whose literal ranges hold no marker encodes exactly as
    /// [`TextTokenizer::encode`] would.
    pub fn encode_with_literals(&self, text: &str, literal: &[Range<usize>]) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut piece_start = 0;
        let mut i = 0;
        let mut ranges = literal.iter().peekable();
        while i < text.len() {
            while ranges.peek().is_some_and(|r| r.end <= i) {
                ranges.next();
            }
            if let Some(r) = ranges.peek() {
                if r.start <= i {
                    i = r.end;
                    continue;
                }
            }
            let next_literal = ranges.peek().map_or(text.len(), |r| r.start);
            let rest = &text[i..];
            let found = self
                .specials
                .iter()
                .find(|(s, _)| rest.starts_with(s.as_str()) && i + s.len() <= next_literal);
            match found {
                Some((s, id)) => {
                    self.encode_plain_into(&text[piece_start..i], &mut ids)?;
                    ids.push(*id);
                    i += s.len();
                    piece_start = i;
                }
                None => i += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        self.encode_plain_into(&text[piece_start..], &mut ids)?;
        Ok(ids)
    }

    fn encode_plain_into(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        if !text.is_empty() {
            let enc = self.plain.encode(text, false).map_err(|e| self.error(e))?;
            ids.extend_from_slice(enc.get_ids());
        }
        Ok(())
    }

    /// The text of `ids`; special tokens are left out when `skip_special`.
    /// Incomplete UTF-8 at the end becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| self.error(e))
    }

    fn error(&self, e: tokenizers::Error) -> RuntimeError {
        RuntimeError::Tokenizer {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::bytelevel::{self, encode_bytes, BOS, EOS, PAD, USER};

    #[test]
    fn loads_the_byte_level_tokenizer_with_its_special_tokens() {
        let dir = tempfile::tempdir().unwrap();
        bytelevel::write_tokenizer_files(dir.path(), 128).unwrap();
        let t = TextTokenizer::load(dir.path()).unwrap();
        assert_eq!(
            (t.bos_id(), t.eos_id(), t.pad_id()),
            (Some(BOS), Some(EOS), Some(PAD))
        );
        assert_eq!(
            t.config().chat_template.as_deref(),
            Some(bytelevel::CHAT_TEMPLATE)
        );
        let ids = t.encode("<|user|>hé").unwrap();
        let mut want = vec![USER];
        want.extend(encode_bytes("hé"));
        assert_eq!(ids, want);
        assert_eq!(t.decode(&ids, true).unwrap(), "hé");
        assert_eq!(t.decode(&ids, false).unwrap(), "<|user|>hé");
        // The first byte of "é" alone is incomplete UTF-8.
        assert_eq!(t.decode(&ids[..2], true).unwrap(), "h");
        assert_eq!(t.decode(&ids[..3], true).unwrap(), "h\u{FFFD}");
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = TextTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        std::fs::write(dir.path().join("tokenizer.json"), "{\"version\": 1").unwrap();
        let e = TextTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        bytelevel::write_tokenizer_files(dir.path(), 128).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"eos_token": "<|nope|>"}"#,
        )
        .unwrap();
        let e = TextTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("eos_token"),
            "{e}"
        );
    }

    #[test]
    fn token_objects_and_template_lists_are_read() {
        let c = TokenizerConfig::from_json(
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
            Path::new("tokenizer_config.json"),
        )
        .unwrap();
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        assert_eq!(c.pad_token, None);
        assert_eq!(c.chat_template.as_deref(), Some("D"));
        assert!(TokenizerConfig::from_json("[1]", Path::new("x.json")).is_err());
        assert!(TokenizerConfig::from_json(r#"{"bos_token": 3}"#, Path::new("x.json")).is_err());
    }
}
