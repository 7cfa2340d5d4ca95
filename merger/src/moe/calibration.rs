//! Unlabeled calibration inputs for router training, read from a task pool
//! folder: every `*.jsonl` file under it (recursively, in path order), one
//! JSON object per line, the first of the fields `prompt`, `context`, `text`,
//! `input` that holds a string (labels such as `answer`, `gold` or `label`
//! are never read). Texts are tokenised with the base's tokenizer as
//! [`crate::generate::TextModel::encode`] does (BOS first when the tokenizer
//! config names one).

use std::path::{Path, PathBuf};

use crate::error::{MergeError, Result};
use crate::generate::TextTokenizer;

/// The fields read as unlabeled inputs, first present wins.
pub const INPUT_FIELDS: [&str; 4] = ["prompt", "context", "text", "input"];

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

/// The input texts of every `*.jsonl` file under `dir` (or of `dir` itself
/// when it is a file).
pub fn read_inputs(dir: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    if dir.is_file() {
        files.push(dir.to_path_buf());
    } else {
        jsonl_files(dir, &mut files)?;
    }
    files.sort();
    let mut texts = Vec::new();
    for f in &files {
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
            if let Some(text) = INPUT_FIELDS
                .iter()
                .find_map(|k| v.get(*k).and_then(serde_json::Value::as_str))
            {
                texts.push(text.to_string());
            }
        }
    }
    if texts.is_empty() {
        return Err(MergeError::Config {
            path: dir.to_path_buf(),
            reason: format!(
                "no *.jsonl line with a string field among {} to use as calibration input",
                INPUT_FIELDS.join(", ")
            ),
        });
    }
    Ok(texts)
}

/// Token ids of `texts` with the tokenizer of the checkpoint folder
/// `tokenizer_dir` (its `tokenizer.json` and `tokenizer_config.json`), each
/// starting with the BOS token when the tokenizer config names one: what
/// [`crate::generate::TextModel::encode`] gives.
pub fn tokenize(texts: &[String], tokenizer_dir: &Path) -> Result<Vec<Vec<u32>>> {
    let tok = TextTokenizer::load(tokenizer_dir)?;
    texts
        .iter()
        .map(|t| {
            let mut ids = tok.encode(t)?;
            if let Some(b) = tok.bos_id() {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
            Ok(ids)
        })
        .collect()
}

/// The calibration sequences of a task pool folder, tokenised for the base
/// checkpoint folder `base`.
pub fn from_task_pool(dir: &Path, base: &Path) -> Result<Vec<Vec<u32>>> {
    tokenize(&read_inputs(dir)?, base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::bytelevel::{encode_bytes, write_tokenizer_files, BOS};

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
        let texts = read_inputs(dir.path()).unwrap();
        // a.jsonl sorts before math/test.jsonl.
        assert_eq!(texts, vec!["great film", "1+1=", "sky is"]);

        write_tokenizer_files(dir.path(), 64).unwrap();
        let ids = tokenize(&texts[1..2], dir.path()).unwrap();
        let mut want = vec![BOS];
        want.extend(encode_bytes("1+1="));
        assert_eq!(ids, vec![want]);
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
