//! Task pools: folders of JSONL tasks.
//!
//! # Format
//!
//! A task pool is a folder. Its tasks are listed in `taskpool.yaml`:
//!
//! ```yaml
//! name: demo                         # optional; default: the folder's name
//! tasks:
//!   - name: addition                 # unique within the pool
//!     kind: generate                 # multiple_choice | generate | perplexity | classification
//!                                    # | similarity | embedding_classification
//!     file: addition.generate.jsonl  # relative to the folder (subfolders allowed)
//!     metric: exact_match            # optional: the headline metric (default: the kind's first)
//!   - name: mnist                    # an image task names its classes and its frozen head
//!     kind: image_classification
//!     file: mnist.jsonl
//!     classes: [zero, one, two]      # label i is classes[i]
//!     head: heads/mnist.safetensors  # relative to the folder ([`crate::head`])
//! ```
//!
//! Unknown keys are errors. Without `taskpool.yaml`, every file directly in
//! the folder named `<task>.<kind>.jsonl` (kind as above) is a task, in
//! name order; other files, including `.jsonl` files whose second extension
//! is not a kind (`addition.train.jsonl`), are ignored.
//!
//! A task file holds one JSON object per line (blank lines are skipped,
//! other fields are ignored), with the fields of its kind:
//!
//! | kind | fields | metrics (headline first) |
//! |---|---|---|
//! | `multiple_choice` | `context` (string), `choices` (≥ 2 strings), `gold` (index into `choices`) | `acc`, `acc_norm` |
//! | `generate` | `prompt` (string), `answer` (string) | `exact_match` |
//! | `perplexity` | `text` (non-empty string) | `perplexity`, `byte_perplexity`, `bits_per_byte` |
//! | `classification` | `input` (string), `label` (non-empty string) | `acc` |
//! | `similarity` | `text_a`, `text_b` (non-empty strings), `score` (finite number) | `spearman`, `pearson` |
//! | `embedding_classification` | `text` (non-empty string), `label` (non-empty string), `split` (optional: `train` or `test`) | `acc` |
//! | `image_classification` | `image` (a PNG/JPEG path relative to the task file, or a `data:image/png;base64,` URL), `label` (index into the task's `classes`) | `acc` |
//!
//! The first four score a text-generation model by log-likelihood or
//! generation; the last two score embeddings (an embedding model, or a text
//! model's mean-pooled hidden states), as MTEB does ([`crate::embedding`]):
//! `similarity` correlates the cosine similarity of each pair with its
//! human score, `embedding_classification` is the accuracy of a k-NN
//! classifier on the frozen embeddings (the `train` items against the
//! `test` items, or 5 folds when no item has a `split`; either every item
//! has a `split` or none does). `image_classification` scores an image
//! model with the task's frozen head (FusionBench's protocol): accuracy of
//! the head's argmax on the image embeddings. Its tasks are listed in
//! `taskpool.yaml`, which names their `classes` and `head`.
//!
//! A multiple-choice continuation is the choice string exactly as written:
//! put the separating space at the end of `context` or at the start of each
//! choice. A classification task's candidate labels are the distinct labels
//! of all its lines, in order of first appearance (at least two).
//!
//! Every error names the file, and the 1-based line for a broken line.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// The file that lists the tasks of a pool folder.
pub const TASKPOOL_FILE: &str = "taskpool.yaml";

/// The kind of a task, which fixes its JSONL fields and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// `{"context", "choices", "gold"}`: accuracy by log-likelihood.
    MultipleChoice,
    /// `{"prompt", "answer"}`: exact match of the greedy continuation.
    Generate,
    /// `{"text"}`: perplexity.
    Perplexity,
    /// `{"input", "label"}`: accuracy among the task's labels.
    Classification,
    /// `{"text_a", "text_b", "score"}`: Spearman correlation of embedding
    /// cosine similarity with the score.
    Similarity,
    /// `{"text", "label", "split"?}`: accuracy of k-NN on the embeddings.
    EmbeddingClassification,
    /// `{"image", "label"}`: accuracy of the task's frozen head on the
    /// image embeddings.
    ImageClassification,
}

impl TaskKind {
    /// Every kind.
    pub const ALL: [TaskKind; 7] = [
        TaskKind::MultipleChoice,
        TaskKind::Generate,
        TaskKind::Perplexity,
        TaskKind::Classification,
        TaskKind::Similarity,
        TaskKind::EmbeddingClassification,
        TaskKind::ImageClassification,
    ];

    /// The name used in files and configs.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::MultipleChoice => "multiple_choice",
            TaskKind::Generate => "generate",
            TaskKind::Perplexity => "perplexity",
            TaskKind::Classification => "classification",
            TaskKind::Similarity => "similarity",
            TaskKind::EmbeddingClassification => "embedding_classification",
            TaskKind::ImageClassification => "image_classification",
        }
    }

    /// Whether the kind scores embeddings (rather than log-likelihoods or
    /// generations).
    pub fn uses_embeddings(self) -> bool {
        matches!(
            self,
            TaskKind::Similarity
                | TaskKind::EmbeddingClassification
                | TaskKind::ImageClassification
        )
    }

    /// Parses a kind name.
    pub fn parse(name: &str) -> Option<TaskKind> {
        TaskKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The metrics a task of this kind reports, headline first.
    pub fn metrics(self) -> &'static [&'static str] {
        match self {
            TaskKind::MultipleChoice => &["acc", "acc_norm"],
            TaskKind::Generate => &["exact_match"],
            TaskKind::Perplexity => &["perplexity", "byte_perplexity", "bits_per_byte"],
            TaskKind::Classification => &["acc"],
            TaskKind::Similarity => &["spearman", "pearson"],
            TaskKind::EmbeddingClassification | TaskKind::ImageClassification => &["acc"],
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One task of a pool, as listed (its data not yet read).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskSpec {
    /// Unique task name.
    pub name: String,
    /// Task kind.
    pub kind: TaskKind,
    /// The JSONL file (absolute, or relative to the working directory).
    pub file: PathBuf,
    /// The headline metric, one of `kind.metrics()`.
    pub metric: String,
    /// An `image_classification` task's classes and head.
    pub image: Option<ImageTaskSpec>,
}

/// What an image task names besides its file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageTaskSpec {
    /// Class names; label `i` is `classes[i]`.
    pub classes: Vec<String>,
    /// The frozen head (absolute, or relative to the working directory).
    pub head: PathBuf,
}

/// A task pool folder: its name and its tasks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskPool {
    /// Pool name (taskpool.yaml's `name`, else the folder's name).
    pub name: String,
    /// The folder.
    pub dir: PathBuf,
    /// The tasks, in listed order.
    pub tasks: Vec<TaskSpec>,
}

/// `taskpool.yaml` as written: the pool's name and its tasks, before the
/// checks of [`TaskPool::open`]. Writers of task pools (the demo-pool
/// trainer) build one and call [`TaskPoolFile::write`].
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskPoolFile {
    /// Pool name (the folder's name when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The tasks, in order.
    pub tasks: Vec<TaskFileEntry>,
}

/// One task of a `taskpool.yaml`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFileEntry {
    /// Unique task name.
    pub name: String,
    /// Task kind (`multiple_choice`, `generate`, `perplexity`,
    /// `classification`).
    pub kind: String,
    /// The JSONL file, relative to the pool folder.
    pub file: PathBuf,
    /// The headline metric (the kind's first when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// An image task's class names (label `i` is `classes[i]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// An image task's frozen head, relative to the pool folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<PathBuf>,
}

impl TaskPoolFile {
    /// Writes `dir/taskpool.yaml`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(TASKPOOL_FILE);
        let yaml = serde_yaml_ng::to_string(self).expect("a task pool serialises");
        std::fs::write(&path, yaml).map_err(|e| EvalError::io(&path, e))
    }
}

impl TaskPool {
    /// Opens a task pool folder: reads `taskpool.yaml` if present, else
    /// lists the `<task>.<kind>.jsonl` files. Task files named by
    /// `taskpool.yaml` must exist.
    pub fn open(dir: &Path) -> Result<TaskPool> {
        if !dir.is_dir() {
            return Err(EvalError::MissingTaskPool(dir.to_path_buf()));
        }
        let yaml = dir.join(TASKPOOL_FILE);
        let pool = if yaml.is_file() {
            Self::from_yaml(dir, &yaml)?
        } else {
            Self::scan(dir)?
        };
        if pool.tasks.is_empty() {
            return Err(EvalError::TaskPool {
                path: dir.to_path_buf(),
                reason: format!(
                    "no tasks: write a `{TASKPOOL_FILE}` or add `<task>.<kind>.jsonl` files \
                     (kinds: multiple_choice, generate, perplexity, classification, similarity, \
                     embedding_classification; image_classification in `{TASKPOOL_FILE}`)"
                ),
            });
        }
        Ok(pool)
    }

    fn from_yaml(dir: &Path, yaml: &Path) -> Result<TaskPool> {
        let text = std::fs::read_to_string(yaml).map_err(|e| EvalError::io(yaml, e))?;
        let bad = |reason: String| EvalError::TaskPool {
            path: yaml.to_path_buf(),
            reason,
        };
        let raw: TaskPoolFile = serde_yaml_ng::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut seen = HashSet::new();
        let mut tasks = Vec::with_capacity(raw.tasks.len());
        for t in raw.tasks {
            if t.name.trim().is_empty() {
                return Err(bad("a task has an empty `name`".into()));
            }
            if !seen.insert(t.name.clone()) {
                return Err(bad(format!("task `{}` is listed twice", t.name)));
            }
            let kind = TaskKind::parse(&t.kind).ok_or_else(|| {
                bad(format!(
                    "task `{}`: unknown kind `{}` (expected multiple_choice, generate, perplexity, \
                     classification, similarity, embedding_classification or image_classification)",
                    t.name, t.kind
                ))
            })?;
            let metric = match t.metric {
                None => kind.metrics()[0].to_string(),
                Some(m) if kind.metrics().contains(&m.as_str()) => m,
                Some(m) => {
                    return Err(bad(format!(
                        "task `{}`: metric `{m}` is not one of {} (the metrics of kind `{kind}`)",
                        t.name,
                        kind.metrics().join(", ")
                    )))
                }
            };
            let file = dir.join(&t.file);
            if !file.is_file() {
                return Err(EvalError::MissingTaskFile {
                    task: t.name,
                    path: file,
                });
            }
            let image = match (kind, t.classes, t.head) {
                (TaskKind::ImageClassification, Some(classes), Some(head)) => {
                    if classes.len() < 2 || classes.iter().any(|c| c.trim().is_empty()) {
                        return Err(bad(format!(
                            "task `{}`: `classes` needs at least two non-empty names",
                            t.name
                        )));
                    }
                    let head = dir.join(head);
                    if !head.is_file() {
                        return Err(bad(format!(
                            "task `{}`: head `{}` does not exist",
                            t.name,
                            head.display()
                        )));
                    }
                    Some(ImageTaskSpec { classes, head })
                }
                (TaskKind::ImageClassification, _, _) => {
                    return Err(bad(format!(
                        "task `{}`: an image_classification task names its `classes` and its \
                         `head` (a safetensors file)",
                        t.name
                    )))
                }
                (_, None, None) => None,
                (_, _, _) => {
                    return Err(bad(format!(
                        "task `{}`: `classes` and `head` belong to image_classification tasks",
                        t.name
                    )))
                }
            };
            tasks.push(TaskSpec {
                name: t.name,
                kind,
                file,
                metric,
                image,
            });
        }
        Ok(TaskPool {
            name: raw.name.unwrap_or_else(|| folder_name(dir)),
            dir: dir.to_path_buf(),
            tasks,
        })
    }

    fn scan(dir: &Path) -> Result<TaskPool> {
        let entries = std::fs::read_dir(dir).map_err(|e| EvalError::io(dir, e))?;
        let mut tasks = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| EvalError::io(dir, e))?;
            let path = entry.path();
            if !path.is_file() {
                continue;
            }
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(stem) = file_name.strip_suffix(".jsonl") else {
                continue;
            };
            let Some((name, kind)) = stem.rsplit_once('.') else {
                continue;
            };
            let Some(kind) = TaskKind::parse(kind) else {
                continue;
            };
            if kind == TaskKind::ImageClassification {
                return Err(EvalError::TaskPool {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "`{file_name}` is an image_classification task: list it in a \
                         `{TASKPOOL_FILE}` with its `classes` and `head`"
                    ),
                });
            }
            if name.is_empty() {
                continue;
            }
            tasks.push(TaskSpec {
                name: name.to_string(),
                kind,
                file: path.clone(),
                metric: kind.metrics()[0].to_string(),
                image: None,
            });
        }
        tasks.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = tasks.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(EvalError::TaskPool {
                path: dir.to_path_buf(),
                reason: format!(
                    "task `{}` has two files (`{}`, `{}`); write a `{TASKPOOL_FILE}` to list tasks explicitly",
                    w[0].name,
                    w[0].file.display(),
                    w[1].file.display()
                ),
            });
        }
        Ok(TaskPool {
            name: folder_name(dir),
            dir: dir.to_path_buf(),
            tasks,
        })
    }

    /// The task named `name`.
    pub fn task(&self, name: &str) -> Option<&TaskSpec> {
        self.tasks.iter().find(|t| t.name == name)
    }
}

fn folder_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .as_deref()
        .unwrap_or(dir)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "taskpool".to_string())
}

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MultipleChoiceItem {
    /// The question, up to where a choice continues it.
    pub context: String,
    /// The candidate continuations.
    pub choices: Vec<String>,
    /// Index of the right choice.
    pub gold: usize,
}

/// One generation prompt with its expected answer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GenerateItem {
    /// The prompt.
    pub prompt: String,
    /// The expected continuation (compared after trimming whitespace).
    pub answer: String,
}

/// One text to measure perplexity on.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PerplexityItem {
    /// The text.
    pub text: String,
}

/// One input with its label.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClassificationItem {
    /// The input, which each candidate label continues.
    pub input: String,
    /// The right label.
    pub label: String,
}

/// A pair of texts with a human similarity score.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SimilarityItem {
    /// The first text.
    pub text_a: String,
    /// The second text.
    pub text_b: String,
    /// The human score (any scale: only its ranks count for `spearman`).
    pub score: f64,
}

/// A text with its label, for a classifier on embeddings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EmbeddingClassificationItem {
    /// The text.
    pub text: String,
    /// Its label.
    pub label: String,
    /// `train` or `test`; absent on every item: folds.
    #[serde(default)]
    pub split: Option<String>,
}

impl EmbeddingClassificationItem {
    /// `Some(true)` for a training item, `Some(false)` for a test item.
    pub fn is_train(&self) -> Option<bool> {
        self.split.as_deref().map(|s| s == "train")
    }
}

/// An image with its label, as the task file gives it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ImageItem {
    /// A path relative to the task file (resolved when the task loads),
    /// or a `data:image/png;base64,` URL.
    pub image: String,
    /// Index into the task's classes.
    pub label: usize,
}

/// The items of a task, by kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Items {
    /// Multiple-choice questions.
    MultipleChoice(Vec<MultipleChoiceItem>),
    /// Generation prompts.
    Generate(Vec<GenerateItem>),
    /// Texts.
    Perplexity(Vec<PerplexityItem>),
    /// Inputs with labels, and the candidate labels of the task (distinct,
    /// in order of first appearance in the whole file).
    Classification {
        /// The items.
        items: Vec<ClassificationItem>,
        /// The candidate labels.
        labels: Vec<String>,
    },
    /// Text pairs with scores.
    Similarity(Vec<SimilarityItem>),
    /// Labelled texts.
    EmbeddingClassification(Vec<EmbeddingClassificationItem>),
    /// Labelled images (paths made absolute) and the task's frozen head
    /// (its class names are the spec's, [`TaskSpec::image`]).
    ImageClassification {
        /// The items.
        items: Vec<ImageItem>,
        /// The head.
        head: crate::head::ClassHead,
    },
}

impl Items {
    /// Number of items.
    pub fn len(&self) -> usize {
        match self {
            Items::MultipleChoice(v) => v.len(),
            Items::Generate(v) => v.len(),
            Items::Perplexity(v) => v.len(),
            Items::Classification { items, .. } => items.len(),
            Items::Similarity(v) => v.len(),
            Items::EmbeddingClassification(v) => v.len(),
            Items::ImageClassification { items, .. } => items.len(),
        }
    }

    /// True when there are no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn truncate(&mut self, n: usize) {
        match self {
            Items::MultipleChoice(v) => v.truncate(n),
            Items::Generate(v) => v.truncate(n),
            Items::Perplexity(v) => v.truncate(n),
            Items::Classification { items, .. } => items.truncate(n),
            Items::Similarity(v) => v.truncate(n),
            Items::EmbeddingClassification(v) => v.truncate(n),
            Items::ImageClassification { items, .. } => items.truncate(n),
        }
    }
}

/// A task with its data read.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// What the pool says about it.
    pub spec: TaskSpec,
    /// The items, in file order (the first `limit` when a limit was given).
    pub items: Items,
    /// Number of items in the file (before the limit).
    pub total: usize,
}

impl TaskSpec {
    /// Reads and validates the task file; keeps the first `limit` items
    /// when a limit is given. Every line is validated, also past the limit.
    pub fn load(&self, limit: Option<usize>) -> Result<Task> {
        if !self.file.is_file() {
            return Err(EvalError::MissingTaskFile {
                task: self.name.clone(),
                path: self.file.clone(),
            });
        }
        let text = std::fs::read_to_string(&self.file).map_err(|e| EvalError::io(&self.file, e))?;
        let path = self.file.as_path();
        let mut items = match self.kind {
            TaskKind::MultipleChoice => Items::MultipleChoice(parse_lines(path, &text, check_mc)?),
            TaskKind::Generate => Items::Generate(parse_lines(path, &text, |_| Ok(()))?),
            TaskKind::Perplexity => {
                Items::Perplexity(parse_lines(path, &text, |p: &PerplexityItem| {
                    if p.text.is_empty() {
                        Err("`text` is empty".into())
                    } else {
                        Ok(())
                    }
                })?)
            }
            TaskKind::Classification => {
                let items: Vec<ClassificationItem> =
                    parse_lines(path, &text, |c: &ClassificationItem| {
                        if c.label.is_empty() {
                            Err("`label` is empty".into())
                        } else {
                            Ok(())
                        }
                    })?;
                let mut labels: Vec<String> = Vec::new();
                for it in &items {
                    if !labels.contains(&it.label) {
                        labels.push(it.label.clone());
                    }
                }
                if labels.len() < 2 && !items.is_empty() {
                    return Err(EvalError::BadTask {
                        path: self.file.clone(),
                        reason: format!(
                            "a classification task needs at least two distinct labels, found only `{}`",
                            labels[0]
                        ),
                    });
                }
                Items::Classification { items, labels }
            }
            TaskKind::Similarity => {
                Items::Similarity(parse_lines(path, &text, |p: &SimilarityItem| {
                    if p.text_a.is_empty() || p.text_b.is_empty() {
                        Err("`text_a` and `text_b` must not be empty".into())
                    } else if !p.score.is_finite() {
                        Err(format!("`score` ({}) is not finite", p.score))
                    } else {
                        Ok(())
                    }
                })?)
            }
            TaskKind::EmbeddingClassification => {
                let items: Vec<EmbeddingClassificationItem> =
                    parse_lines(path, &text, |c: &EmbeddingClassificationItem| {
                        if c.text.is_empty() || c.label.is_empty() {
                            Err("`text` and `label` must not be empty".into())
                        } else if !matches!(c.split.as_deref(), None | Some("train" | "test")) {
                            Err(format!(
                                "`split` is {:?}: expected `train` or `test`",
                                c.split.as_deref().unwrap_or_default()
                            ))
                        } else {
                            Ok(())
                        }
                    })?;
                let with_split = items.iter().filter(|i| i.split.is_some()).count();
                if with_split != 0 && with_split != items.len() {
                    return Err(EvalError::BadTask {
                        path: self.file.clone(),
                        reason: format!(
                            "{with_split} of {} items have a `split`: give every item one (train/test) \
                             or none (folds)",
                            items.len()
                        ),
                    });
                }
                if with_split != 0 {
                    for want in ["train", "test"] {
                        if !items.iter().any(|i| i.split.as_deref() == Some(want)) {
                            return Err(EvalError::BadTask {
                                path: self.file.clone(),
                                reason: format!("no `{want}` item"),
                            });
                        }
                    }
                }
                Items::EmbeddingClassification(items)
            }
            TaskKind::ImageClassification => self.load_images(&text)?,
        };
        let total = items.len();
        if total == 0 {
            return Err(EvalError::BadTask {
                path: self.file.clone(),
                reason: "no items (the file is empty)".into(),
            });
        }
        if let Some(n) = limit {
            items.truncate(n);
        }
        Ok(Task {
            spec: self.clone(),
            items,
            total,
        })
    }
}

impl TaskSpec {
    fn load_images(&self, text: &str) -> Result<Items> {
        let spec = self.image.as_ref().ok_or_else(|| EvalError::BadTask {
            path: self.file.clone(),
            reason: "an image_classification task without `classes` and `head`".into(),
        })?;
        let head = crate::head::ClassHead::load(&spec.head)?;
        if head.classes() != spec.classes.len() {
            return Err(EvalError::Head {
                path: spec.head.display().to_string(),
                reason: format!(
                    "{} rows for the task's {} classes",
                    head.classes(),
                    spec.classes.len()
                ),
            });
        }
        let folder = self.file.parent().unwrap_or(Path::new("."));
        let n = spec.classes.len();
        let mut items: Vec<ImageItem> = parse_lines(&self.file, text, |i: &ImageItem| {
            if i.label >= n {
                Err(format!(
                    "`label` = {} is out of range: the task has {n} classes (0..={})",
                    i.label,
                    n - 1
                ))
            } else if i.image.is_empty() {
                Err("`image` is empty".into())
            } else if !i.image.starts_with("data:") && !folder.join(&i.image).is_file() {
                Err(format!(
                    "image `{}` does not exist",
                    folder.join(&i.image).display()
                ))
            } else {
                Ok(())
            }
        })?;
        for i in &mut items {
            if !i.image.starts_with("data:") {
                i.image = folder.join(&i.image).to_string_lossy().into_owned();
            }
        }
        Ok(Items::ImageClassification { items, head })
    }
}

impl ImageItem {
    /// Decodes the image (a file or a data URL).
    pub fn decode(&self) -> Result<runtime::vision::RgbImage> {
        Ok(if self.image.starts_with("data:") {
            runtime::vision::RgbImage::from_data_url(&self.image, "a data URL image")?
        } else {
            runtime::vision::RgbImage::open(Path::new(&self.image))?
        })
    }
}

fn check_mc(item: &MultipleChoiceItem) -> std::result::Result<(), String> {
    if item.choices.len() < 2 {
        return Err(format!(
            "`choices` has {} entries, at least 2 are needed",
            item.choices.len()
        ));
    }
    if item.gold >= item.choices.len() {
        return Err(format!(
            "`gold` = {} is out of range: there are {} choices (0..={})",
            item.gold,
            item.choices.len(),
            item.choices.len() - 1
        ));
    }
    if let Some(i) = item.choices.iter().position(String::is_empty) {
        return Err(format!("choice {i} is empty"));
    }
    Ok(())
}

/// Parses every non-blank line as a `T`, then checks it; errors carry the
/// file and 1-based line number.
fn parse_lines<T: for<'de> Deserialize<'de>>(
    path: &Path,
    text: &str,
    check: impl Fn(&T) -> std::result::Result<(), String>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item: T = serde_json::from_str(line).map_err(|e| {
            // serde_json reports "... at line 1 column N"; the column is
            // what helps within one line.
            let msg = e.to_string();
            let msg = msg
                .rsplit_once(" at line ")
                .map(|(head, tail)| {
                    let col = tail.split_once(" column ").map(|(_, c)| c).unwrap_or("");
                    format!("{head} (column {col})")
                })
                .unwrap_or(msg);
            EvalError::line(path, i + 1, msg)
        })?;
        check(&item).map_err(|reason| EvalError::line(path, i + 1, reason))?;
        out.push(item);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn scans_task_files_by_name() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "b.generate.jsonl",
            "{\"prompt\":\"1+1=\",\"answer\":\"2\"}\n",
        );
        write(
            d.path(),
            "a.multiple_choice.jsonl",
            "{\"context\":\"x\",\"choices\":[\"a\",\"b\"],\"gold\":1}\n",
        );
        write(d.path(), "a.train.jsonl", "not read");
        write(d.path(), "notes.txt", "ignored");
        let pool = TaskPool::open(d.path()).unwrap();
        let names: Vec<_> = pool
            .tasks
            .iter()
            .map(|t| (t.name.as_str(), t.kind))
            .collect();
        assert_eq!(
            names,
            [("a", TaskKind::MultipleChoice), ("b", TaskKind::Generate)]
        );
        assert_eq!(pool.tasks[0].metric, "acc");
        let task = pool.tasks[0].load(None).unwrap();
        assert_eq!(
            task.items,
            Items::MultipleChoice(vec![MultipleChoiceItem {
                context: "x".into(),
                choices: vec!["a".into(), "b".into()],
                gold: 1
            }])
        );
    }

    #[test]
    fn taskpool_yaml_lists_tasks_with_metrics() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "test/q.jsonl",
            "{\"context\":\"x\",\"choices\":[\"a\",\"b\"],\"gold\":0}\n",
        );
        write(
            d.path(),
            "taskpool.yaml",
            "name: mine\ntasks:\n  - {name: q, kind: multiple_choice, file: test/q.jsonl, metric: acc_norm}\n",
        );
        let pool = TaskPool::open(d.path()).unwrap();
        assert_eq!(pool.name, "mine");
        assert_eq!(pool.tasks[0].metric, "acc_norm");
        assert_eq!(pool.tasks[0].file, d.path().join("test/q.jsonl"));
    }

    #[test]
    fn taskpool_yaml_errors_name_the_problem() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "q.jsonl", "{\"text\":\"abc\"}\n");
        let cases = [
            ("tasks:\n  - {name: q, kind: essay, file: q.jsonl}\n", "unknown kind `essay`"),
            ("tasks:\n  - {name: q, kind: perplexity, file: q.jsonl, metric: acc}\n", "metric `acc` is not one of perplexity"),
            ("tasks:\n  - {name: q, kind: perplexity, file: q.jsonl}\n  - {name: q, kind: perplexity, file: q.jsonl}\n", "listed twice"),
            ("tasks:\n  - {name: q, kind: perplexity, file: q.jsonl, split: test}\n", "unknown field `split`"),
            ("tasks: []\n", "no tasks"),
        ];
        for (yaml, want) in cases {
            write(d.path(), "taskpool.yaml", yaml);
            let e = TaskPool::open(d.path()).unwrap_err().to_string();
            assert!(e.contains(want), "{yaml}: {e}");
            assert!(e.contains("taskpool"), "{e}");
        }
    }

    #[test]
    fn missing_task_file_and_folder_are_named() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "taskpool.yaml",
            "tasks:\n  - {name: sums, kind: generate, file: sums.generate.jsonl}\n",
        );
        let e = TaskPool::open(d.path()).unwrap_err();
        assert!(matches!(e, EvalError::MissingTaskFile { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("sums") && msg.contains("sums.generate.jsonl"),
            "{msg}"
        );
        let e = TaskPool::open(&d.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
        // A file removed after the pool was opened.
        let spec = TaskSpec {
            name: "gone".into(),
            kind: TaskKind::Perplexity,
            file: d.path().join("gone.perplexity.jsonl"),
            metric: "perplexity".into(),
            image: None,
        };
        let e = spec.load(None).unwrap_err().to_string();
        assert!(
            e.contains("gone.perplexity.jsonl") && e.contains("does not exist"),
            "{e}"
        );
    }

    fn load_err(kind: TaskKind, text: &str) -> String {
        let d = tempfile::tempdir().unwrap();
        let file = write(d.path(), "t.jsonl", text);
        let spec = TaskSpec {
            name: "t".into(),
            kind,
            file,
            metric: kind.metrics()[0].into(),
            image: None,
        };
        spec.load(None).unwrap_err().to_string()
    }

    #[test]
    fn broken_lines_are_reported_with_file_and_line() {
        let good = "{\"context\":\"x\",\"choices\":[\"a\",\"b\"],\"gold\":0}";
        let cases = [
            (
                format!("{good}\n\n{{\"context\": \"x\", \"choices\": [\"a\"\n"),
                ":3:",
                "EOF",
            ),
            (
                format!("{good}\n{{\"context\":\"x\",\"choices\":[\"a\",\"b\"]}}\n"),
                ":2:",
                "missing field `gold`",
            ),
            (
                format!(
                    "{good}\n{good}\n{{\"context\":\"x\",\"choices\":[\"a\",\"b\"],\"gold\":2}}\n"
                ),
                ":3:",
                "`gold` = 2 is out of range",
            ),
            (
                "{\"context\":\"x\",\"choices\":[\"a\"],\"gold\":0}\n".to_string(),
                ":1:",
                "at least 2",
            ),
            (
                "{\"context\":\"x\",\"choices\":[\"a\",\"b\"],\"gold\":\"a\"}\n".to_string(),
                ":1:",
                "invalid type",
            ),
        ];
        for (text, line, want) in cases {
            let e = load_err(TaskKind::MultipleChoice, &text);
            assert!(e.contains(&format!("t.jsonl{line}")), "{e}");
            assert!(e.contains(want), "{e}");
        }
        let e = load_err(TaskKind::Generate, "{\"prompt\":\"p\"}\n");
        assert!(
            e.contains("t.jsonl:1:") && e.contains("missing field `answer`"),
            "{e}"
        );
        let e = load_err(TaskKind::Perplexity, "{\"text\":\"\"}\n");
        assert!(e.contains("t.jsonl:1:") && e.contains("empty"), "{e}");
        let e = load_err(
            TaskKind::Classification,
            "{\"input\":\"a\",\"label\":\"x\"}\n{\"input\":\"b\",\"label\":\"x\"}\n",
        );
        assert!(
            e.contains("t.jsonl") && e.contains("two distinct labels"),
            "{e}"
        );
        let e = load_err(TaskKind::Generate, "\n  \n");
        assert!(e.contains("no items"), "{e}");
    }

    #[test]
    fn limit_keeps_the_first_items_and_labels_come_from_the_whole_file() {
        let d = tempfile::tempdir().unwrap();
        let file = write(
            d.path(),
            "c.classification.jsonl",
            "{\"input\":\"a\",\"label\":\"pos\"}\n{\"input\":\"b\",\"label\":\"pos\",\"id\":7}\n{\"input\":\"c\",\"label\":\"neg\"}\n",
        );
        let spec = TaskSpec {
            name: "c".into(),
            kind: TaskKind::Classification,
            file,
            metric: "acc".into(),
            image: None,
        };
        let task = spec.load(Some(2)).unwrap();
        assert_eq!(task.total, 3);
        match task.items {
            Items::Classification { items, labels } => {
                assert_eq!(items.len(), 2);
                assert_eq!(labels, ["pos", "neg"]);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod image_tests {
    use super::*;
    use crate::head::ClassHead;

    /// A pool folder with one image task: two 1×1 PNGs and a 2-class head.
    fn pool(lines: &str, entry: &str) -> (tempfile::TempDir, Result<TaskPool>) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("heads")).unwrap();
        ClassHead::new(vec![vec![1.0, 0.0], vec![0.0, 1.0]], 5.0, "h")
            .unwrap()
            .save(&d.path().join("heads/h.safetensors"))
            .unwrap();
        let png = runtime::vision::RgbImage::from_raw(1, 1, vec![9, 9, 9], "p")
            .unwrap()
            .to_png();
        std::fs::write(d.path().join("a.png"), png).unwrap();
        std::fs::write(d.path().join("t.jsonl"), lines).unwrap();
        std::fs::write(
            d.path().join(TASKPOOL_FILE),
            format!(
                "tasks:\n  - name: t\n    kind: image_classification\n    file: t.jsonl\n{entry}"
            ),
        )
        .unwrap();
        let p = TaskPool::open(d.path());
        (d, p)
    }

    const ENTRY: &str = "    classes: [a, b]\n    head: heads/h.safetensors\n";

    #[test]
    fn image_tasks_load_with_their_classes_head_and_absolute_images() {
        let (d, p) = pool("{\"image\": \"a.png\", \"label\": 1}\n", ENTRY);
        let task = p.unwrap().tasks[0].load(None).unwrap();
        let Items::ImageClassification { items, head } = &task.items else {
            panic!("{:?}", task.items)
        };
        assert_eq!(task.spec.image.as_ref().unwrap().classes, ["a", "b"]);
        assert_eq!(head.classes(), 2);
        assert_eq!(items[0].image, d.path().join("a.png").to_string_lossy());
        assert_eq!(items[0].decode().unwrap().data, vec![9, 9, 9]);
    }

    #[test]
    fn bad_image_tasks_are_named() {
        let load = |lines: &str, entry: &str| match pool(lines, entry).1 {
            Err(e) => e.to_string(),
            Ok(p) => p.tasks[0].load(None).unwrap_err().to_string(),
        };
        let ok_line = "{\"image\": \"a.png\", \"label\": 0}\n";
        let e = load(ok_line, "");
        assert!(e.contains("names its `classes` and its `head`"), "{e}");
        let e = load(ok_line, "    classes: [a]\n    head: heads/h.safetensors\n");
        assert!(e.contains("at least two"), "{e}");
        let e = load(
            ok_line,
            "    classes: [a, b]\n    head: heads/none.safetensors\n",
        );
        assert!(
            e.contains("none.safetensors") && e.contains("does not exist"),
            "{e}"
        );
        let e = load(
            ok_line,
            "    classes: [a, b, c]\n    head: heads/h.safetensors\n",
        );
        assert!(e.contains("2 rows for the task's 3 classes"), "{e}");
        let e = load("{\"image\": \"a.png\", \"label\": 2}\n", ENTRY);
        assert!(e.contains("t.jsonl:1") && e.contains("out of range"), "{e}");
        let e = load("{\"image\": \"b.png\", \"label\": 0}\n", ENTRY);
        assert!(e.contains("b.png") && e.contains("does not exist"), "{e}");
        // A text task may not name a head.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("x.jsonl"), "{\"text\": \"a\"}\n").unwrap();
        std::fs::write(
            d.path().join(TASKPOOL_FILE),
            "tasks:\n  - name: x\n    kind: perplexity\n    file: x.jsonl\n    classes: [a, b]\n",
        )
        .unwrap();
        let e = TaskPool::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("belong to image_classification"), "{e}");
    }
}
