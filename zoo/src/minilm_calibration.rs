//! The MiniLM pool's calibration task pool (`calibration/`): each
//! fine-tune's own task inputs, for the data-driven merges.
//!
//! The wheels ship no training data, but each fine-tune's model card
//! (`README.md`) holds the sentence-transformers `widget:` examples of its
//! domain in its YAML front matter: a `source_sentence` and the candidate
//! `sentences` it is compared with (SRE terms and their descriptions for
//! `sre`, job postings and résumés for `jobs`). Each example becomes one
//! multiple-choice input, `{"context": source_sentence, "choices":
//! sentences}` (empty sentences dropped, at least two kept), in
//! `calibration/<expert>.widget.jsonl`: there are no labels to read. These
//! are few (five per card), which the README's comparison notes.

use std::path::Path;

use crate::error::{Result, ZooError};
use crate::minilm::fetch_error;

/// The widget examples of a model card: `(source_sentence, sentences)`.
pub fn widget_examples(readme: &str) -> Vec<(String, Vec<String>)> {
    let Some(rest) = readme.strip_prefix("---") else {
        return Vec::new();
    };
    let Some(end) = rest.find("\n---") else {
        return Vec::new();
    };
    let Ok(front) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&rest[..end]) else {
        return Vec::new();
    };
    let Some(widget) = front.get("widget").and_then(|w| w.as_sequence()) else {
        return Vec::new();
    };
    widget
        .iter()
        .filter_map(|w| {
            let source = w.get("source_sentence")?.as_str()?.trim().to_string();
            let sentences: Vec<String> = w
                .get("sentences")?
                .as_sequence()?
                .iter()
                .filter_map(|s| s.as_str())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            (!source.is_empty() && sentences.len() >= 2).then_some((source, sentences))
        })
        .collect()
}

/// Writes `calibration/<name>.widget.jsonl` for each `(name, card)`;
/// returns the inputs written per expert.
pub fn write(out: &Path, cards: &[(String, std::path::PathBuf)]) -> Result<Vec<(String, usize)>> {
    let dir = out.join("calibration");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| ZooError::io(&dir, e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| ZooError::io(&dir, e))?;
    let mut counts = Vec::new();
    for (name, card) in cards {
        let text = std::fs::read_to_string(card).map_err(|e| ZooError::io(card, e))?;
        let examples = widget_examples(&text);
        if examples.is_empty() {
            return Err(fetch_error(format!(
                "{}: the model card of `{name}` has no widget examples to calibrate on",
                card.display()
            )));
        }
        let lines: Vec<String> = examples
            .iter()
            .map(|(context, choices)| {
                serde_json::json!({"context": context, "choices": choices}).to_string()
            })
            .collect();
        let path = dir.join(format!("{name}.widget.jsonl"));
        std::fs::write(&path, lines.join("\n") + "\n").map_err(|e| ZooError::io(&path, e))?;
        counts.push((name.clone(), examples.len()));
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widget_examples_come_from_the_front_matter() {
        let card = "---\ntags: [a]\nwidget:\n- source_sentence: PV\n  sentences:\n  - actual storage\n  - ''\n  - chaos engineering\n- source_sentence: only one\n  sentences:\n  - x\n---\n# Title\n";
        assert_eq!(
            widget_examples(card),
            vec![(
                "PV".to_string(),
                vec![
                    "actual storage".to_string(),
                    "chaos engineering".to_string()
                ]
            )]
        );
        assert!(widget_examples("# no front matter").is_empty());
    }
}
