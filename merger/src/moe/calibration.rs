//! Unlabeled calibration inputs for router training, read from a task pool
//! folder: every `*.jsonl` file under it (recursively, in path order), one
//! JSON object per line.
//!
//! - A line with a string `context` and a `choices` list of two or more
//!   strings is a **multiple-choice input**: the context and its candidate
//!   continuations (what FusionBench's CLIP classifiers get as class names).
//!   Router training minimises the entropy of the model's choice among them.
//! - A line with string fields `text_a` and `text_b` (a similarity pair)
//!   gives **two texts**, one per side (its `score` is a label, never read).
//! - Any other line gives a **text**: the first of the fields `prompt`,
//!   `context`, `text`, `input` that holds a string.
//!
//! Each input keeps its **source**, the index of its file in path order;
//! [`source_names`] gives each source's task name (`add` for
//! `add.generate.jsonl`, `math` for `math/test.jsonl`), which is how the
//! data-driven merges find each expert's own inputs.
//!
//! Tokenisation follows the base's family: a decoder's texts start with the
//! BOS token when its tokenizer config names one; an encoder's texts are
//! tokenised as its sentence encoder reads them (the tokenizer.json
//! post-processor's `[CLS] … [SEP]`, lower-cased when `do_lower_case`, cut
//! to `max_seq_length`), and a multiple-choice input's context and choices
//! are separate sentences.
//!
//! Labels (`answer`, `gold`, `label`, …) are never read. Texts and contexts
//! are tokenised with the base's tokenizer as
//! [`runtime::generate::TextModel::encode`] does (BOS first when the
//! tokenizer config names one); a choice's tokens are those that follow the
//! context's in the encoding of context + choice (lm-eval's convention).

use std::path::{Path, PathBuf};

use crate::error::{MergeError, Result};
use runtime::generate::TextTokenizer;

/// The fields read as unlabeled inputs, first present wins.
pub const INPUT_FIELDS: [&str; 4] = ["prompt", "context", "text", "input"];

/// One unlabeled input, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A prompt or text: the model's prediction at its end is trained on.
    Text(String),
    /// A context and its candidate continuations.
    Choices {
        /// The context.
        context: String,
        /// The candidate continuations (two or more).
        choices: Vec<String>,
    },
}

/// One tokenised calibration input and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CalibrationItem {
    /// The index of its source (the `*.jsonl` file, in path order): the
    /// inputs of one task share it, and router training draws every
    /// source into every step.
    pub source: u32,
    /// Its tokens.
    pub input: CalibrationInput,
}

/// The tokens of one calibration input.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CalibrationInput {
    /// Token ids of a text.
    Text(Vec<u32>),
    /// Token ids of a context and of each candidate continuation (each
    /// non-empty).
    Choices {
        /// The context's ids (BOS first when the tokenizer has one).
        context: Vec<u32>,
        /// Each continuation's ids.
        choices: Vec<Vec<u32>>,
    },
}

impl From<Vec<u32>> for CalibrationItem {
    /// A text of source 0.
    fn from(ids: Vec<u32>) -> Self {
        CalibrationItem {
            source: 0,
            input: CalibrationInput::Text(ids),
        }
    }
}

impl CalibrationItem {
    /// Tokens read by the model for this input (every choice counted).
    pub fn tokens(&self) -> usize {
        match &self.input {
            CalibrationInput::Text(ids) => ids.len(),
            CalibrationInput::Choices { context, choices } => {
                choices.iter().map(|c| context.len() + c.len()).sum()
            }
        }
    }

    /// Whether the input has no token to train on.
    pub fn is_empty(&self) -> bool {
        match &self.input {
            CalibrationInput::Text(ids) => ids.is_empty(),
            CalibrationInput::Choices { context, .. } => context.is_empty(),
        }
    }
}

/// `(texts, multiple-choice inputs, tokens)` of a calibration set, for
/// reports.
pub fn summary(items: &[CalibrationItem]) -> (usize, usize, usize) {
    let choices = items
        .iter()
        .filter(|i| matches!(i.input, CalibrationInput::Choices { .. }))
        .count();
    let tokens = items.iter().map(CalibrationItem::tokens).sum();
    (items.len() - choices, choices, tokens)
}

fn jsonl_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| MergeError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| MergeError::io(dir, e))?.path();
        if path.is_dir() {
            jsonl_files(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "jsonl") {
            out.push(path);
        }
    }
    Ok(())
}

/// The multiple-choice input of a line, when it is one.
fn choices_of(v: &serde_json::Value) -> Option<Input> {
    let context = v.get("context")?.as_str()?;
    let choices = v
        .get("choices")?
        .as_array()?
        .iter()
        .map(|c| c.as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()?;
    (choices.len() >= 2).then(|| Input::Choices {
        context: context.to_string(),
        choices,
    })
}

/// The `*.jsonl` files under `dir` (or `dir` itself when it is a file), in
/// path order: source `i` is `files[i]`.
fn source_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    if dir.is_file() {
        files.push(dir.to_path_buf());
    } else {
        jsonl_files(dir, &mut files)?;
    }
    files.sort();
    Ok(files)
}

/// The task name of each source of `dir`, in source order: a file directly
/// in `dir` is named by its file name up to the first dot
/// (`add.generate.jsonl` → `add`), a file in a sub-folder by the sub-folder
/// (`math/test.jsonl` → `math`).
pub fn source_names(dir: &Path) -> Result<Vec<String>> {
    Ok(source_files(dir)?
        .iter()
        .map(|f| {
            let rel = f.strip_prefix(dir).unwrap_or(f);
            let mut parts = rel.components();
            let first = parts
                .next()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .unwrap_or_default();
            if parts.next().is_some() {
                first
            } else {
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                name.split('.').next().unwrap_or_default().to_string()
            }
        })
        .collect())
}

/// The inputs of every `*.jsonl` file under `dir` (or of `dir` itself when
/// it is a file), each with the index of its file in path order.
pub fn read_inputs(dir: &Path) -> Result<Vec<(u32, Input)>> {
    let files = source_files(dir)?;
    let mut inputs = Vec::new();
    for (source, f) in files.iter().enumerate() {
        let source = source as u32;
        let content = std::fs::read_to_string(f).map_err(|e| MergeError::io(f, e))?;
        for (i, line) in content.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| MergeError::Config {
                    path: f.clone(),
                    reason: format!("line {}: {e}", i + 1),
                })?;
            if let Some(input) = choices_of(&v) {
                inputs.push((source, input));
            } else if let (Some(a), Some(b)) = (
                v.get("text_a").and_then(serde_json::Value::as_str),
                v.get("text_b").and_then(serde_json::Value::as_str),
            ) {
                inputs.push((source, Input::Text(a.to_string())));
                inputs.push((source, Input::Text(b.to_string())));
            } else if let Some(text) = INPUT_FIELDS
                .iter()
                .find_map(|k| v.get(*k).and_then(serde_json::Value::as_str))
            {
                inputs.push((source, Input::Text(text.to_string())));
            }
        }
    }
    if inputs.is_empty() {
        return Err(MergeError::Config {
            path: dir.to_path_buf(),
            reason: format!(
                "no *.jsonl line with a string field among {} to use as calibration input",
                INPUT_FIELDS.join(", ")
            ),
        });
    }
    Ok(inputs)
}

/// Tokenises `inputs` with the tokenizer of the checkpoint folder
/// `tokenizer_dir` (its `tokenizer.json` and `tokenizer_config.json`): texts
/// and contexts start with the BOS token when the tokenizer config names
/// one, as [`runtime::generate::TextModel::encode`] gives. A choice whose
/// tokens would be empty is dropped; a multiple-choice input left with
/// fewer than two choices becomes the text of its context.
pub fn tokenize(inputs: &[(u32, Input)], tokenizer_dir: &Path) -> Result<Vec<CalibrationItem>> {
    let kind = runtime::architectures::of_dir(tokenizer_dir).map(|a| a.kind);
    if let Ok(runtime::architectures::Kind::Encoder) = kind {
        return tokenize_sentences(inputs, tokenizer_dir);
    }
    let tok = TextTokenizer::load(tokenizer_dir)?;
    let encode = |t: &str| -> Result<Vec<u32>> {
        let mut ids = tok.encode(t)?;
        if let Some(b) = tok.bos_id() {
            if ids.first() != Some(&b) {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    };
    inputs
        .iter()
        .map(|(source, input)| {
            Ok(CalibrationItem {
                source: *source,
                input: tokenize_one(input, &tok, &encode)?,
            })
        })
        .collect()
}

/// [`tokenize`] for an encoder: every text, context and choice as the
/// sentence encoder of `dir` reads it.
fn tokenize_sentences(inputs: &[(u32, Input)], dir: &Path) -> Result<Vec<CalibrationItem>> {
    let config = runtime::encoder::EncoderConfig::from_dir(dir)?;
    let sentence = runtime::encoder::SentenceConfig::from_dir(dir, config.max_position_embeddings)?;
    let tok = TextTokenizer::load(dir)?.truncating(sentence.max_seq_length)?;
    let encode = |t: &str| -> Result<Vec<u32>> {
        let text = if sentence.lower_case {
            t.to_lowercase()
        } else {
            t.to_string()
        };
        Ok(tok.encode_truncated(&text)?.0)
    };
    inputs
        .iter()
        .map(|(source, input)| {
            let input = match input {
                Input::Text(t) => CalibrationInput::Text(encode(t)?),
                Input::Choices { context, choices } => CalibrationInput::Choices {
                    context: encode(context)?,
                    choices: choices.iter().map(|c| encode(c)).collect::<Result<_>>()?,
                },
            };
            Ok(CalibrationItem {
                source: *source,
                input,
            })
        })
        .collect()
}

fn tokenize_one(
    input: &Input,
    tok: &TextTokenizer,
    encode: &dyn Fn(&str) -> Result<Vec<u32>>,
) -> Result<CalibrationInput> {
    match input {
        Input::Text(t) => Ok(CalibrationInput::Text(encode(t)?)),
        Input::Choices { context, choices } => {
            let ctx = encode(context)?;
            let mut conts = Vec::new();
            for c in choices {
                let whole = encode(&format!("{context}{c}"))?;
                let cont = if whole.starts_with(&ctx) {
                    whole[ctx.len()..].to_vec()
                } else {
                    tok.encode(c)?
                };
                if !cont.is_empty() {
                    conts.push(cont);
                }
            }
            Ok(if conts.len() >= 2 {
                CalibrationInput::Choices {
                    context: ctx,
                    choices: conts,
                }
            } else {
                CalibrationInput::Text(ctx)
            })
        }
    }
}

/// The calibration inputs of a task pool folder, tokenised for the base
/// checkpoint folder `base`.
pub fn from_task_pool(dir: &Path, base: &Path) -> Result<Vec<CalibrationItem>> {
    tokenize(&read_inputs(dir)?, base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::generate::bytelevel::{encode_bytes, write_tokenizer_files, BOS};

    #[test]
    fn reads_input_fields_but_never_labels() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("math");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(
            sub.join("test.jsonl"),
            "{\"prompt\":\"1+1=\",\"answer\":\"2\"}\n\n{\"context\":\"sky is\",\"choices\":[\"blue\"],\"gold\":0}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("a.jsonl"),
            "{\"input\":\"great film\",\"label\":\"pos\"}\n{\"label\":\"only\"}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "{\"text\":\"ignored\"}\n").unwrap();
        let inputs = read_inputs(dir.path()).unwrap();
        // a.jsonl sorts before math/test.jsonl; a context with one choice
        // is a text.
        let text = |s: u32, t: &str| (s, Input::Text(t.to_string()));
        assert_eq!(
            inputs,
            vec![text(0, "great film"), text(1, "1+1="), text(1, "sky is")]
        );

        write_tokenizer_files(dir.path(), 64).unwrap();
        let ids = tokenize(&inputs[1..2], dir.path()).unwrap();
        let mut want = vec![BOS];
        want.extend(encode_bytes("1+1="));
        assert_eq!(
            ids,
            vec![CalibrationItem {
                source: 1,
                input: CalibrationInput::Text(want)
            }]
        );
    }

    #[test]
    fn multiple_choice_lines_keep_their_choices_but_not_the_gold() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("mc.jsonl"),
            "{\"context\":\"sky is\",\"choices\":[\" blue\",\" red\"],\"gold\":0}\n",
        )
        .unwrap();
        let inputs = read_inputs(dir.path()).unwrap();
        assert_eq!(
            inputs,
            vec![(
                0,
                Input::Choices {
                    context: "sky is".into(),
                    choices: vec![" blue".into(), " red".into()],
                }
            )]
        );
        write_tokenizer_files(dir.path(), 64).unwrap();
        let items = tokenize(&inputs, dir.path()).unwrap();
        let mut context = vec![BOS];
        context.extend(encode_bytes("sky is"));
        let want = CalibrationItem {
            source: 0,
            input: CalibrationInput::Choices {
                context,
                choices: vec![encode_bytes(" blue"), encode_bytes(" red")],
            },
        };
        assert_eq!(items, vec![want]);
        // BOS + 6 context bytes, twice, plus 5 + 4 choice bytes.
        assert_eq!(summary(&items), (0, 1, 2 * 7 + 5 + 4));
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.jsonl"), "{\"text\":\"ok\"}\nnot json\n").unwrap();
        let e = read_inputs(dir.path()).unwrap_err().to_string();
        assert!(e.contains("t.jsonl") && e.contains("line 2"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = read_inputs(empty.path()).unwrap_err().to_string();
        assert!(e.contains("prompt, context, text, input"), "{e}");
    }
}
