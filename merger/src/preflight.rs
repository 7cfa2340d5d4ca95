//! The checks `fusion merge --check` runs before a merge: every problem that
//! mergekit users trip over, found at once, from the spec, the checkpoints'
//! headers and their config files, without reading a tensor.
//!
//! | topic | finding | severity |
//! |---|---|---|
//! | `spec` | the method, its parameters or the model count are invalid | error |
//! | `checkpoint` | a folder cannot be opened (missing, corrupt header, not mergeable) | error |
//! | `architecture` | `model_type` or `architectures` differ from the reference's | error |
//! | `layers` | `num_hidden_layers` differs | error |
//! | `vocabulary` | `vocab_size` or the embedding's row count differs | error |
//! | `shapes` | a tensor present in both has another shape | error |
//! | `missing tensors` | the reference has tensors a model lacks (the merge would fail) | error |
//! | `dropped tensors` | a model has tensors the reference lacks: the merge leaves them out | warning |
//! | `tied embeddings` | `tie_word_embeddings` or the presence of `lm_head.weight` differ | warning |
//! | `tokenizer` | tokenizer files differ (the merge keeps the reference's) or are missing | warning |
//! | `dtype` | the models store different dtypes (merged in f32, written in the spec's or the reference's) | warning |
//!
//! The reference is the base when the spec has one, else the first model:
//! the merge takes its tensor list, config and tokenizer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use runtime::checkpoint::{dtype_name, Checkpoint};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::merge::Opener;
use crate::plan::Plan;
use crate::spec::MergeSpec;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The merge would fail or produce a broken model.
    Error,
    /// The merge runs, but not as a mergekit user may expect.
    Warning,
}

/// One problem found.
#[derive(Debug, Clone)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// What it is about (`architecture`, `vocabulary`, ...; see the module).
    pub topic: &'static str,
    /// What was found, naming the models and tensors.
    pub message: String,
}

/// One checkpoint as the check saw it.
#[derive(Debug, Clone)]
pub struct ModelSummary {
    /// The spec's name for it.
    pub name: String,
    /// Its role: `base` or `model`.
    pub role: &'static str,
    /// Tensors in its headers.
    pub tensors: usize,
    /// Parameters (entries of every tensor).
    pub parameters: u64,
    /// Stored dtypes, comma-separated.
    pub dtypes: String,
    /// `model_type` from its config, if any.
    pub model_type: Option<String>,
}

/// Everything the check found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The checkpoints, base first.
    pub models: Vec<ModelSummary>,
    /// The findings, errors first.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Number of errors.
    pub fn errors(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count()
    }

    /// Number of warnings.
    pub fn warnings(&self) -> usize {
        self.findings.len() - self.errors()
    }

    fn add(&mut self, severity: Severity, topic: &'static str, message: String) {
        self.findings.push(Finding {
            severity,
            topic,
            message,
        });
    }
}

/// Names of a list, the first few and a count of the rest.
fn some(names: &[&String]) -> String {
    const SHOWN: usize = 3;
    let head: Vec<String> = names.iter().take(SHOWN).map(|n| format!("`{n}`")).collect();
    if names.len() > SHOWN {
        format!("{} and {} more", head.join(", "), names.len() - SHOWN)
    } else {
        head.join(", ")
    }
}

/// A config field as text, for comparisons and messages.
fn field(config: &Option<Value>, key: &str) -> Option<String> {
    config.as_ref()?.get(key).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// SHA-256 of the tokenizer files a folder has, or `None` without any.
fn tokenizer_digest(dir: &Path) -> Option<String> {
    const FILES: &[&str] = &[
        "tokenizer.json",
        "tokenizer.model",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
    ];
    let mut h = Sha256::new();
    let mut any = false;
    for f in FILES {
        if let Ok(bytes) = std::fs::read(dir.join(f)) {
            h.update(f.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
            any = true;
        }
    }
    any.then(|| format!("{:x}", h.finalize()))
}

/// The dtypes a checkpoint stores, comma-separated.
fn stored_dtypes(ck: &Checkpoint) -> String {
    let d: BTreeSet<&str> = ck.tensors().values().map(|e| dtype_name(e.dtype)).collect();
    d.into_iter().collect::<Vec<_>>().join(", ")
}

/// Whether a tensor is the token embedding.
fn is_embedding(name: &str) -> bool {
    name.ends_with("embed_tokens.weight")
        || name.ends_with("word_embeddings.weight")
        || name.ends_with("wte.weight")
}

/// Checks `spec` and its checkpoints (opened through `open`) without
/// merging; every finding is collected, none stops the others.
pub fn check(spec: &MergeSpec, open: Opener) -> Result<Report> {
    let mut report = Report::default();
    if let Err(e) = Plan::new(spec.clone()) {
        report.add(Severity::Error, "spec", e.to_string());
    }
    let roles = spec
        .base
        .iter()
        .map(|b| (b.as_str(), "base"))
        .chain(spec.models.iter().map(|m| (m.name.as_str(), "model")));
    let mut opened: Vec<(Arc<Checkpoint>, Option<Value>)> = Vec::new();
    for (name, role) in roles {
        let ck = match open(name).and_then(|ck| {
            ck.check_mergeable()?;
            Ok(ck)
        }) {
            Ok(ck) => ck,
            Err(e) => {
                report.add(Severity::Error, "checkpoint", format!("`{name}`: {e}"));
                continue;
            }
        };
        let config = match ck.config() {
            Ok(c) => c,
            Err(e) => {
                report.add(Severity::Error, "checkpoint", format!("`{name}`: {e}"));
                None
            }
        };
        report.models.push(ModelSummary {
            name: name.to_string(),
            role,
            tensors: ck.tensors().len(),
            parameters: ck.tensors().values().map(|e| e.numel() as u64).sum(),
            dtypes: stored_dtypes(&ck),
            model_type: field(&config, "model_type"),
        });
        opened.push((ck, config));
    }
    if let Some(((reference, ref_config), others)) = opened.split_first() {
        compare(&mut report, reference, ref_config, others);
    }
    report.findings.sort_by_key(|f| f.severity);
    Ok(report)
}

/// Every other checkpoint against the reference.
fn compare(
    report: &mut Report,
    reference: &Checkpoint,
    ref_config: &Option<Value>,
    others: &[(Arc<Checkpoint>, Option<Value>)],
) {
    let r = reference.name();
    for (key, topic) in [
        ("model_type", "architecture"),
        ("architectures", "architecture"),
        ("num_hidden_layers", "layers"),
        ("vocab_size", "vocabulary"),
    ] {
        let want = field(ref_config, key);
        for (ck, config) in others {
            let got = field(config, key);
            if got != want {
                let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "absent".into());
                report.add(
                    Severity::Error,
                    topic,
                    format!(
                        "`{key}` of `{}` is {}, of `{r}` {}",
                        ck.name(),
                        show(&got),
                        show(&want)
                    ),
                );
            }
        }
    }
    let tied = |c: &Option<Value>| {
        c.as_ref()
            .and_then(|c| c.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
    };
    let ref_head = reference.entry("lm_head.weight").is_some();
    for (ck, config) in others {
        if tied(config) != tied(ref_config) {
            report.add(
                Severity::Warning,
                "tied embeddings",
                format!(
                    "`tie_word_embeddings` of `{}` is {:?}, of `{r}` {:?}: the merged model \
                     keeps `{r}`'s setting",
                    ck.name(),
                    tied(config),
                    tied(ref_config)
                ),
            );
        }
        let head = ck.entry("lm_head.weight").is_some();
        if head != ref_head {
            let (has, lacks) = if head { (ck.name(), r) } else { (r, ck.name()) };
            report.add(
                Severity::Warning,
                "tied embeddings",
                format!(
                    "`{has}` has its own `lm_head.weight` and `{lacks}` does not (tied to the \
                     embedding there)"
                ),
            );
        }
    }
    let ref_names: BTreeSet<&String> = reference.tensors().keys().collect();
    let mut dtypes = BTreeMap::new();
    dtypes.insert(r.to_string(), stored_dtypes(reference));
    for (ck, _) in others {
        dtypes.insert(ck.name().to_string(), stored_dtypes(ck));
        let names: BTreeSet<&String> = ck.tensors().keys().collect();
        let missing: Vec<&String> = ref_names.difference(&names).copied().collect();
        if !missing.is_empty() {
            report.add(
                Severity::Error,
                "missing tensors",
                format!(
                    "`{}` lacks {} tensor(s) that `{r}` has: {}",
                    ck.name(),
                    missing.len(),
                    some(&missing)
                ),
            );
        }
        let extra: Vec<&String> = names.difference(&ref_names).copied().collect();
        if !extra.is_empty() {
            report.add(
                Severity::Warning,
                "dropped tensors",
                format!(
                    "`{}` has {} tensor(s) that `{r}` lacks, left out of the merge: {}",
                    ck.name(),
                    extra.len(),
                    some(&extra)
                ),
            );
        }
        let mut shapes = Vec::new();
        for name in ref_names.intersection(&names) {
            let (a, b) = (&reference.tensors()[*name], &ck.tensors()[*name]);
            if a.shape != b.shape {
                if is_embedding(name) {
                    report.add(
                        Severity::Error,
                        "vocabulary",
                        format!(
                            "`{name}` has {} rows in `{}` and {} in `{r}`: the vocabularies \
                             differ (merging them needs a tokenizer union, not supported yet)",
                            b.shape.first().copied().unwrap_or(0),
                            ck.name(),
                            a.shape.first().copied().unwrap_or(0)
                        ),
                    );
                } else {
                    shapes.push(*name);
                }
            }
        }
        if !shapes.is_empty() {
            let first = shapes[0];
            report.add(
                Severity::Error,
                "shapes",
                format!(
                    "{} tensor(s) of `{}` have other shapes than in `{r}`: {} (`{first}` is \
                     {:?} against {:?})",
                    shapes.len(),
                    ck.name(),
                    some(&shapes),
                    ck.tensors()[first].shape,
                    reference.tensors()[first].shape
                ),
            );
        }
    }
    let kinds: BTreeSet<&String> = dtypes.values().collect();
    if kinds.len() > 1 {
        let list: Vec<String> = dtypes.iter().map(|(m, d)| format!("{m}: {d}")).collect();
        report.add(
            Severity::Warning,
            "dtype",
            format!(
                "the models store different dtypes ({}); they are merged in f32 and written \
                 in the spec's `dtype`, else `{r}`'s",
                list.join("; ")
            ),
        );
    }
    let ref_tok = tokenizer_digest(reference.dir());
    if ref_tok.is_none() {
        report.add(
            Severity::Warning,
            "tokenizer",
            format!("`{r}` has no tokenizer files: the merged folder will have none"),
        );
    }
    let differ: Vec<&str> = others
        .iter()
        .filter(|(ck, _)| {
            let t = tokenizer_digest(ck.dir());
            t.is_some() && ref_tok.is_some() && t != ref_tok
        })
        .map(|(ck, _)| ck.name())
        .collect();
    if !differ.is_empty() {
        report.add(
            Severity::Warning,
            "tokenizer",
            format!(
                "the tokenizer files of {} differ from `{r}`'s: the merged model keeps `{r}`'s \
                 (mergekit's `tokenizer_source: base`)",
                differ
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use candle_core::DType;
    use runtime::checkpoint::{CheckpointWriter, WriteOptions};
    use serde_json::json;

    use super::*;

    const EMBED: &str = "model.embed_tokens.weight";
    const UP: &str = "model.layers.0.mlp.up_proj.weight";
    const NORM: &str = "model.norm.weight";

    /// A checkpoint folder `dir/name` with f32 (or `dtype`) zeros.
    fn folder(
        dir: &Path,
        name: &str,
        tensors: &[(&str, &[usize])],
        dtype: DType,
        config: Value,
        tokenizer: Option<&str>,
    ) -> PathBuf {
        let out = dir.join(name);
        let layout: Vec<(String, DType, Vec<usize>)> = tensors
            .iter()
            .map(|(n, s)| (n.to_string(), dtype, s.to_vec()))
            .collect();
        let w = CheckpointWriter::create(&out, &layout, &WriteOptions::default()).unwrap();
        for (n, s) in tensors {
            w.write_f32(n, &vec![0.0; s.iter().product()]).unwrap();
        }
        w.finish().unwrap();
        std::fs::write(out.join("config.json"), config.to_string()).unwrap();
        if let Some(t) = tokenizer {
            std::fs::write(out.join("tokenizer.json"), t).unwrap();
        }
        out
    }

    fn llama(layers: u64, vocab: u64) -> Value {
        json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
               "num_hidden_layers": layers, "vocab_size": vocab, "tie_word_embeddings": false})
    }

    fn run(dir: &Path, spec: &MergeSpec) -> Report {
        check(spec, &|name: &str| {
            Ok(Checkpoint::open(name, &dir.join(name))?)
        })
        .unwrap()
    }

    fn topics(r: &Report, severity: Severity) -> Vec<&'static str> {
        r.findings
            .iter()
            .filter(|f| f.severity == severity)
            .map(|f| f.topic)
            .collect()
    }

    #[test]
    fn a_clean_pool_has_no_findings() {
        let dir = tempfile::tempdir().unwrap();
        let t: &[(&str, &[usize])] = &[(EMBED, &[16, 4]), (UP, &[8, 4]), (NORM, &[4])];
        for n in ["base", "a", "b"] {
            folder(dir.path(), n, t, DType::F32, llama(1, 16), Some("{}"));
        }
        let r = run(
            dir.path(),
            &MergeSpec::new("ties", Some("base"), &["a", "b"]),
        );
        assert!(r.findings.is_empty(), "{:?}", r.findings);
        assert_eq!(r.models.len(), 3);
        assert_eq!((r.models[0].role, r.models[0].tensors), ("base", 3));
        assert_eq!(r.models[0].parameters, 64 + 32 + 4);
        assert_eq!(r.models[1].model_type.as_deref(), Some("llama"));
    }

    #[test]
    fn every_problem_is_found_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let t: &[(&str, &[usize])] = &[(EMBED, &[16, 4]), (UP, &[8, 4]), (NORM, &[4])];
        folder(dir.path(), "base", t, DType::F32, llama(1, 16), Some("{}"));
        // Another architecture and vocabulary, a dropped and a missing tensor,
        // another shape, its own lm_head, bf16, another tokenizer.
        let mut other = llama(1, 20);
        other["model_type"] = json!("mistral");
        other["tie_word_embeddings"] = json!(true);
        let a: &[(&str, &[usize])] = &[
            (EMBED, &[20, 4]),
            (UP, &[6, 4]),
            ("lm_head.weight", &[20, 4]),
            ("model.extra.weight", &[2]),
        ];
        folder(dir.path(), "a", a, DType::BF16, other, Some("{\"v\": 2}"));
        let mut spec = MergeSpec::new("ties", Some("base"), &["a", "missing"]);
        spec = spec.with("no_such_parameter", 1.0);
        let r = run(dir.path(), &spec);
        let errors = topics(&r, Severity::Error);
        for t in [
            "spec",
            "checkpoint",
            "architecture",
            "vocabulary",
            "missing tensors",
            "shapes",
        ] {
            assert!(errors.contains(&t), "{t}: {:?}", r.findings);
        }
        let warnings = topics(&r, Severity::Warning);
        for t in ["dropped tensors", "tied embeddings", "dtype", "tokenizer"] {
            assert!(warnings.contains(&t), "{t}: {:?}", r.findings);
        }
        // Errors come first; messages name the models and tensors.
        assert_eq!(r.findings[0].severity, Severity::Error);
        let text: Vec<&str> = r.findings.iter().map(|f| f.message.as_str()).collect();
        let all = text.join("\n");
        assert!(all.contains("`missing`"), "{all}");
        assert!(all.contains("`model.norm.weight`"), "{all}");
        assert!(all.contains("`model.extra.weight`"), "{all}");
        assert!(all.contains("20 rows in `a` and 16 in `base`"), "{all}");
        assert!(all.contains("[6, 4] against [8, 4]"), "{all}");
        assert!(all.contains("no_such_parameter"), "{all}");
        assert_eq!(r.errors() + r.warnings(), r.findings.len());
    }
}
