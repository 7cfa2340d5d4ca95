//! Scoring a runnable model on tasks.
//!
//! A model is anything that implements [`Scorer`]: log-likelihoods of
//! continuations and greedy generation. The runner turns a task's items
//! into scorer requests, sends them in batches (batches in parallel across
//! threads; the scorer is shared read-only), and folds the answers into the
//! metrics of [`crate::metrics`].

use std::collections::BTreeMap;
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::embedding;
use crate::error::{EvalError, Result};
use crate::metrics::{self, PerplexityTotals};
use crate::taskpool::{Items, Task, TaskKind, TaskPool};

/// The log-likelihood of a continuation given a context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loglikelihood {
    /// `log P(continuation | context)`, natural log, summed over the
    /// continuation's tokens.
    pub logprob: f64,
    /// Number of continuation tokens scored.
    pub tokens: usize,
    /// Whether greedy decoding from the context would produce exactly the
    /// continuation.
    pub is_greedy: bool,
}

/// A model the runner can score.
///
/// Implementations must be deterministic: the same request gives the same
/// answer whatever the batch it comes in.
pub trait Scorer: Sync {
    /// `log P(continuation | context)` for each `(context, continuation)`
    /// pair, in order. The context may be empty: the continuation is then
    /// scored from the start of the sequence (after the beginning-of-sequence
    /// token for models that have one).
    fn loglikelihood_batch(&self, pairs: &[(String, String)]) -> Result<Vec<Loglikelihood>>;

    /// The greedy continuation of `prompt`: at most `max_tokens` tokens,
    /// stopping at an end-of-sequence token (not included in the text).
    fn generate_greedy(&self, prompt: &str, max_tokens: usize) -> Result<String>;

    /// Number of tokens `text` encodes to.
    fn count_tokens(&self, text: &str) -> Result<usize>;

    /// One embedding per text, in order (the embedding tasks). A scorer
    /// that cannot embed says so.
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let _ = texts;
        Err(EvalError::Scoring {
            task: "(any)".to_string(),
            reason: "this model does not embed texts".to_string(),
        })
    }

    /// One embedding per image, in order (the image tasks). A scorer that
    /// cannot embed images says so.
    fn embed_images(&self, images: &[runtime::vision::RgbImage]) -> Result<Vec<Vec<f32>>> {
        let _ = images;
        Err(EvalError::Scoring {
            task: "(any)".to_string(),
            reason: "this model does not embed images (image tasks need an image model)"
                .to_string(),
        })
    }
}

/// How to run tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOptions {
    /// Score only the first `limit` items of each task.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Log-likelihood requests per scorer call.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Tokens a generation may run past the longest answer of its task.
    #[serde(default = "default_margin")]
    pub generation_margin: usize,
}

fn default_batch_size() -> usize {
    16
}

fn default_margin() -> usize {
    8
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            limit: None,
            batch_size: default_batch_size(),
            generation_margin: default_margin(),
        }
    }
}

/// The scores of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// Task name.
    pub task: String,
    /// Task kind.
    pub kind: TaskKind,
    /// The headline metric.
    pub metric: String,
    /// The headline metric's value.
    pub score: f64,
    /// Every metric of the kind.
    pub metrics: BTreeMap<String, f64>,
    /// Items scored.
    pub samples: usize,
    /// Items in the task file.
    pub total: usize,
    /// Wall time of scoring, in seconds.
    pub seconds: f64,
}

impl Task {
    /// Number of scorer requests the task makes (log-likelihood pairs or
    /// generations): the unit of progress.
    pub fn requests(&self) -> usize {
        match &self.items {
            Items::MultipleChoice(v) => v.iter().map(|i| i.choices.len()).sum(),
            Items::Generate(v) => v.len(),
            Items::Perplexity(v) => v.len(),
            Items::Classification { items, labels } => items.len() * labels.len(),
            // Each distinct text is embedded once.
            Items::Similarity(v) => distinct(v.iter().flat_map(|i| [&i.text_a, &i.text_b])),
            Items::EmbeddingClassification(v) => distinct(v.iter().map(|i| &i.text)),
            Items::ImageClassification { items, .. } => items.len(),
        }
    }
}

/// Number of distinct texts.
fn distinct<'a>(texts: impl Iterator<Item = &'a String>) -> usize {
    texts.collect::<std::collections::HashSet<_>>().len()
}

/// Loads every task of `pool` (the first `limit` items of each).
pub fn load_tasks(pool: &TaskPool, limit: Option<usize>) -> Result<Vec<Task>> {
    pool.tasks.iter().map(|t| t.load(limit)).collect()
}

/// Scores `scorer` on every task, in order. `progress` is called with the
/// number of requests completed as they complete.
pub fn run_tasks(
    scorer: &dyn Scorer,
    tasks: &[Task],
    opts: &RunOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<TaskResult>> {
    tasks
        .iter()
        .map(|t| run_task(scorer, t, opts, progress))
        .collect()
}

/// Scores `scorer` on one task (already limited when it was loaded).
pub fn run_task(
    scorer: &dyn Scorer,
    task: &Task,
    opts: &RunOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<TaskResult> {
    let start = Instant::now();
    let name = &task.spec.name;
    let wrap = |e: EvalError| match e {
        // A scorer's own error names no task ("(any)", "(images)"): this one.
        EvalError::Scoring { task, reason } if task.starts_with('(') => EvalError::Scoring {
            task: name.clone(),
            reason,
        },
        e @ EvalError::Scoring { .. } => e,
        e => EvalError::Scoring {
            task: name.clone(),
            reason: e.to_string(),
        },
    };
    let mut values: BTreeMap<String, f64> = BTreeMap::new();
    match &task.items {
        Items::MultipleChoice(items) => {
            let pairs: Vec<(String, String)> = items
                .iter()
                .flat_map(|i| i.choices.iter().map(|c| (i.context.clone(), c.clone())))
                .collect();
            let lls = loglikelihoods(scorer, name, &pairs, opts, progress).map_err(wrap)?;
            let (mut acc, mut acc_norm, mut at) = (0, 0, 0);
            for item in items {
                let lps: Vec<f64> = lls[at..at + item.choices.len()]
                    .iter()
                    .map(|l| l.logprob)
                    .collect();
                at += item.choices.len();
                let (p, pn) = metrics::multiple_choice_predictions(&lps, &item.choices)
                    .expect("one log-likelihood per choice");
                acc += usize::from(p == item.gold);
                acc_norm += usize::from(pn == item.gold);
            }
            values.insert("acc".into(), metrics::accuracy(acc, items.len()));
            values.insert("acc_norm".into(), metrics::accuracy(acc_norm, items.len()));
        }
        Items::Classification { items, labels } => {
            let pairs: Vec<(String, String)> = items
                .iter()
                .flat_map(|i| labels.iter().map(|l| (i.input.clone(), l.clone())))
                .collect();
            let lls = loglikelihoods(scorer, name, &pairs, opts, progress).map_err(wrap)?;
            let correct = items
                .iter()
                .zip(lls.chunks(labels.len()))
                .filter(|(item, ll)| {
                    let lps: Vec<f64> = ll.iter().map(|l| l.logprob).collect();
                    metrics::argmax(&lps).map(|k| &labels[k]) == Some(&item.label)
                })
                .count();
            values.insert("acc".into(), metrics::accuracy(correct, items.len()));
        }
        Items::Perplexity(items) => {
            let pairs: Vec<(String, String)> = items
                .iter()
                .map(|i| (String::new(), i.text.clone()))
                .collect();
            let lls = loglikelihoods(scorer, name, &pairs, opts, progress).map_err(wrap)?;
            let mut totals = PerplexityTotals::default();
            for (item, ll) in items.iter().zip(&lls) {
                totals.add(ll.logprob, ll.tokens, &item.text);
            }
            values.insert("perplexity".into(), totals.perplexity());
            values.insert("byte_perplexity".into(), totals.byte_perplexity());
            values.insert("bits_per_byte".into(), totals.bits_per_byte());
        }
        Items::Similarity(items) => {
            let texts: Vec<&str> = items
                .iter()
                .flat_map(|i| [i.text_a.as_str(), i.text_b.as_str()])
                .collect();
            let vectors = embeddings(scorer, &texts, opts, progress).map_err(wrap)?;
            let cos: Vec<f64> = vectors
                .chunks(2)
                .map(|p| embedding::cosine(&p[0], &p[1]))
                .collect();
            let human: Vec<f64> = items.iter().map(|i| i.score).collect();
            values.insert("spearman".into(), embedding::spearman(&cos, &human));
            values.insert("pearson".into(), embedding::pearson(&cos, &human));
        }
        Items::EmbeddingClassification(items) => {
            let texts: Vec<&str> = items.iter().map(|i| i.text.as_str()).collect();
            let vectors = embeddings(scorer, &texts, opts, progress).map_err(wrap)?;
            let rows: Vec<(&[f32], &str, Option<bool>)> = items
                .iter()
                .zip(&vectors)
                .map(|(i, v)| (v.as_slice(), i.label.as_str(), i.is_train()))
                .collect();
            let (acc, _) = embedding::knn_accuracy(&rows);
            values.insert("acc".into(), acc);
        }
        Items::ImageClassification { items, head } => {
            let vectors = image_embeddings(scorer, items, progress).map_err(wrap)?;
            let correct = items
                .iter()
                .zip(&vectors)
                .filter(|(item, v)| metrics::argmax(&head.logits(v)) == Some(item.label))
                .count();
            values.insert("acc".into(), metrics::accuracy(correct, items.len()));
        }
        Items::Generate(items) => {
            let longest = items
                .iter()
                .map(|i| scorer.count_tokens(&i.answer))
                .collect::<Result<Vec<_>>>()
                .map_err(wrap)?
                .into_iter()
                .max()
                .unwrap_or(0);
            let max_tokens = longest + opts.generation_margin;
            let correct = items
                .par_iter()
                .map(|item| {
                    let out = scorer.generate_greedy(&item.prompt, max_tokens)?;
                    progress(1);
                    Ok(metrics::exact_match(&out, &item.answer))
                })
                .collect::<Result<Vec<bool>>>()
                .map_err(wrap)?
                .into_iter()
                .filter(|&ok| ok)
                .count();
            values.insert(
                "exact_match".into(),
                metrics::accuracy(correct, items.len()),
            );
        }
    }
    let metric = task.spec.metric.clone();
    let score = *values.get(&metric).ok_or_else(|| EvalError::Scoring {
        task: name.clone(),
        reason: format!(
            "metric `{metric}` is not computed for kind `{}`",
            task.spec.kind
        ),
    })?;
    Ok(TaskResult {
        task: name.clone(),
        kind: task.spec.kind,
        metric,
        score,
        metrics: values,
        samples: task.items.len(),
        total: task.total,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The embeddings of the items' images, decoded and embedded in chunks
/// (in parallel); every embedding must have the head's width.
fn image_embeddings(
    scorer: &dyn Scorer,
    items: &[crate::taskpool::ImageItem],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Vec<f32>>> {
    let chunks = items
        .par_chunks(EMBED_CHUNK)
        .map(|chunk| {
            let images = chunk
                .iter()
                .map(|i| i.decode())
                .collect::<Result<Vec<_>>>()?;
            let out = scorer.embed_images(&images)?;
            if out.len() != chunk.len() {
                return Err(EvalError::Scoring {
                    task: "(images)".to_string(),
                    reason: format!(
                        "the model answered {} embeddings for {} images",
                        out.len(),
                        chunk.len()
                    ),
                });
            }
            progress(chunk.len() as u64);
            Ok(out)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(chunks.into_iter().flatten().collect())
}

/// Texts embedded per scorer call.
const EMBED_CHUNK: usize = 64;

/// The embeddings of `texts`, each distinct text embedded once, in chunks
/// (in parallel); checks that every chunk is answered in full.
fn embeddings(
    scorer: &dyn Scorer,
    texts: &[&str],
    _opts: &RunOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Vec<f32>>> {
    let mut unique: Vec<String> = Vec::new();
    let mut slot: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let index: Vec<usize> = texts
        .iter()
        .map(|&t| {
            *slot.entry(t).or_insert_with(|| {
                unique.push(t.to_string());
                unique.len() - 1
            })
        })
        .collect();
    let vectors = unique
        .par_chunks(EMBED_CHUNK)
        .map(|chunk| {
            let out = scorer.embed(chunk)?;
            if out.len() != chunk.len() {
                return Err(EvalError::Scoring {
                    task: "(embeddings)".to_string(),
                    reason: format!(
                        "the model answered {} embeddings for {} texts",
                        out.len(),
                        chunk.len()
                    ),
                });
            }
            progress(chunk.len() as u64);
            Ok(out)
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    Ok(index.into_iter().map(|i| vectors[i].clone()).collect())
}

/// Sends `pairs` in batches of `opts.batch_size` (batches in parallel) and
/// checks that every batch is answered in full.
fn loglikelihoods(
    scorer: &dyn Scorer,
    task: &str,
    pairs: &[(String, String)],
    opts: &RunOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Loglikelihood>> {
    let batch = opts.batch_size.max(1);
    let answers = pairs
        .par_chunks(batch)
        .map(|chunk| {
            let out = scorer.loglikelihood_batch(chunk)?;
            if out.len() != chunk.len() {
                return Err(EvalError::Scoring {
                    task: task.to_string(),
                    reason: format!(
                        "the model answered {} log-likelihoods for {} requests",
                        out.len(),
                        chunk.len()
                    ),
                });
            }
            progress(chunk.len() as u64);
            Ok(out)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(answers.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::taskpool::{
        ClassificationItem, GenerateItem, MultipleChoiceItem, PerplexityItem, TaskSpec,
    };

    /// A byte-unigram language model: every byte is drawn independently
    /// with a fixed probability, whatever the context. Its log-likelihoods
    /// are sums of table entries, so every metric can be worked out by hand.
    struct Unigram {
        logp: [f64; 256],
        batches: Mutex<Vec<usize>>,
    }

    impl Unigram {
        /// P(a) = 0.1, P(b) = 0.2, P(c) = 0.05, the other 253 bytes share 0.65.
        fn new() -> Self {
            let mut logp = [(0.65f64 / 253.0).ln(); 256];
            logp[b'a' as usize] = 0.1f64.ln();
            logp[b'b' as usize] = 0.2f64.ln();
            logp[b'c' as usize] = 0.05f64.ln();
            Unigram {
                logp,
                batches: Mutex::new(Vec::new()),
            }
        }
    }

    impl Scorer for Unigram {
        fn loglikelihood_batch(&self, pairs: &[(String, String)]) -> Result<Vec<Loglikelihood>> {
            self.batches.lock().unwrap().push(pairs.len());
            Ok(pairs
                .iter()
                .map(|(_, cont)| Loglikelihood {
                    logprob: cont.bytes().map(|b| self.logp[b as usize]).sum(),
                    tokens: cont.len(),
                    is_greedy: cont.bytes().all(|b| b == b'b'),
                })
                .collect())
        }

        fn generate_greedy(&self, _prompt: &str, max_tokens: usize) -> Result<String> {
            Ok("b".repeat(max_tokens))
        }

        fn count_tokens(&self, text: &str) -> Result<usize> {
            Ok(text.len())
        }
    }

    /// A model of addition: greedy generation answers `x+y=` with the sum,
    /// one byte per token, cut at `max_tokens`.
    struct Adder {
        max_tokens_seen: Mutex<Vec<usize>>,
    }

    impl Scorer for Adder {
        fn loglikelihood_batch(&self, pairs: &[(String, String)]) -> Result<Vec<Loglikelihood>> {
            // One request short: the runner must notice.
            Ok(vec![
                Loglikelihood {
                    logprob: 0.0,
                    tokens: 1,
                    is_greedy: true
                };
                pairs.len().saturating_sub(1)
            ])
        }

        fn generate_greedy(&self, prompt: &str, max_tokens: usize) -> Result<String> {
            self.max_tokens_seen.lock().unwrap().push(max_tokens);
            let (x, y) = prompt
                .trim_end_matches('=')
                .split_once('+')
                .ok_or_else(|| EvalError::Scoring {
                    task: "adder".into(),
                    reason: format!("cannot add `{prompt}`"),
                })?;
            let sum = x.trim().parse::<i64>().unwrap() + y.trim().parse::<i64>().unwrap();
            Ok(sum.to_string().chars().take(max_tokens).collect())
        }

        fn count_tokens(&self, text: &str) -> Result<usize> {
            Ok(text.len())
        }
    }

    fn task(kind: TaskKind, items: Items) -> Task {
        let total = items.len();
        Task {
            spec: TaskSpec {
                name: "t".into(),
                kind,
                file: "t.jsonl".into(),
                metric: kind.metrics()[0].into(),
                image: None,
            },
            items,
            total,
        }
    }

    fn mc(choices: &[&str], gold: usize) -> MultipleChoiceItem {
        MultipleChoiceItem {
            context: "q: ".into(),
            choices: choices.iter().map(|c| c.to_string()).collect(),
            gold,
        }
    }

    fn no_progress(_: u64) {}

    /// An image model whose embedding is an image's first pixel's (red,
    /// green): with the head rows (1,0) and (0,1) it predicts class 0 when
    /// red is the larger.
    struct FirstPixel;

    impl Scorer for FirstPixel {
        fn loglikelihood_batch(&self, _: &[(String, String)]) -> Result<Vec<Loglikelihood>> {
            unreachable!("an image task scores no text")
        }
        fn generate_greedy(&self, _: &str, _: usize) -> Result<String> {
            unreachable!("an image task generates nothing")
        }
        fn count_tokens(&self, _: &str) -> Result<usize> {
            unreachable!("an image task counts no tokens")
        }
        fn embed_images(&self, images: &[runtime::vision::RgbImage]) -> Result<Vec<Vec<f32>>> {
            Ok(images
                .iter()
                .map(|i| vec![i.data[0] as f32, i.data[1] as f32])
                .collect())
        }
    }

    #[test]
    fn image_classification_is_the_heads_argmax_accuracy() {
        use crate::taskpool::{ImageItem, ImageTaskSpec};
        use runtime::vision::RgbImage;
        let d = tempfile::tempdir().unwrap();
        let mut items = Vec::new();
        // (red, green, label): right, right, wrong, and a data URL (right).
        for (k, (r, g, label)) in [(200u8, 10u8, 0usize), (10, 200, 1), (200, 10, 1)]
            .into_iter()
            .enumerate()
        {
            let p = d.path().join(format!("{k}.png"));
            let png = RgbImage::from_raw(1, 1, vec![r, g, 0], "p")
                .unwrap()
                .to_png();
            std::fs::write(&p, png).unwrap();
            items.push(ImageItem {
                image: p.to_string_lossy().into_owned(),
                label,
            });
        }
        let url = RgbImage::from_raw(2, 1, vec![1, 90, 0, 5, 5, 5], "u")
            .unwrap()
            .to_data_url();
        items.push(ImageItem {
            image: url,
            label: 1,
        });
        let head =
            crate::head::ClassHead::new(vec![vec![1.0, 0.0], vec![0.0, 1.0]], 10.0, "h").unwrap();
        let task = Task {
            spec: TaskSpec {
                name: "img".into(),
                kind: TaskKind::ImageClassification,
                file: d.path().join("img.jsonl"),
                metric: "acc".into(),
                image: Some(ImageTaskSpec {
                    classes: vec!["r".into(), "g".into()],
                    head: d.path().join("h.safetensors"),
                }),
            },
            items: Items::ImageClassification { items, head },
            total: 4,
        };
        let done = std::sync::atomic::AtomicU64::new(0);
        let r = run_task(&FirstPixel, &task, &RunOptions::default(), &|n| {
            done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        })
        .unwrap();
        assert!((r.score - 0.75).abs() < 1e-12, "{r:?}");
        assert_eq!(done.into_inner(), 4);
        // A text model on an image task says what it needs.
        let e = run_task(&Unigram::new(), &task, &RunOptions::default(), &|_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("img") && e.contains("image model"), "{e}");
    }

    #[test]
    fn multiple_choice_acc_and_acc_norm() {
        // "a" (ln 0.1 = −2.30) vs "bb" (2 ln 0.2 = −3.22, −1.61 per byte):
        //   acc picks "a" (right), acc_norm picks "bb" (wrong).
        // "b" vs "a": both pick "b" (right).
        // "a" vs "b", gold "a": both pick "b" (wrong).
        // acc = 2/3, acc_norm = 1/3.
        let t = task(
            TaskKind::MultipleChoice,
            Items::MultipleChoice(vec![
                mc(&["a", "bb"], 0),
                mc(&["b", "a"], 0),
                mc(&["a", "b"], 0),
            ]),
        );
        let scorer = Unigram::new();
        let done = std::sync::atomic::AtomicU64::new(0);
        let opts = RunOptions {
            batch_size: 4,
            ..RunOptions::default()
        };
        let r = run_task(&scorer, &t, &opts, &|n| {
            done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        })
        .unwrap();
        assert!((r.metrics["acc"] - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.metrics["acc_norm"] - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!((r.metric.as_str(), r.score), ("acc", r.metrics["acc"]));
        assert_eq!(r.samples, 3);
        // 6 requests in batches of at most 4, all reported as progress.
        let mut batches = scorer.batches.lock().unwrap().clone();
        batches.sort();
        assert_eq!(batches, [2, 4]);
        assert_eq!(done.into_inner(), t.requests() as u64);
        // Batching does not change the answer; the headline can be acc_norm.
        let mut t1 = t.clone();
        t1.spec.metric = "acc_norm".into();
        let one = RunOptions {
            batch_size: 1,
            ..RunOptions::default()
        };
        let r1 = run_task(&Unigram::new(), &t1, &one, &no_progress).unwrap();
        assert_eq!(r1.metrics, r.metrics);
        assert_eq!(r1.score, r.metrics["acc_norm"]);
    }

    #[test]
    fn classification_picks_the_likeliest_label_of_the_task() {
        // P(b) = 0.2 > P(a) = 0.1 > P(c) = 0.05: every prediction is "b".
        let items: Vec<ClassificationItem> = ["b", "a", "b", "c"]
            .iter()
            .map(|l| ClassificationItem {
                input: "x".into(),
                label: l.to_string(),
            })
            .collect();
        let labels = vec!["b".to_string(), "a".into(), "c".into()];
        let t = task(
            TaskKind::Classification,
            Items::Classification { items, labels },
        );
        let r = run_task(&Unigram::new(), &t, &RunOptions::default(), &no_progress).unwrap();
        assert_eq!(r.score, 0.5);
        assert_eq!(t.requests(), 12);
    }

    #[test]
    fn perplexity_over_all_texts() {
        // log P = ln 0.1 + ln 0.2 + ln 0.2 = ln 0.004 over 3 tokens and bytes.
        let items = vec![
            PerplexityItem { text: "ab".into() },
            PerplexityItem { text: "b".into() },
        ];
        let t = task(TaskKind::Perplexity, Items::Perplexity(items));
        let r = run_task(&Unigram::new(), &t, &RunOptions::default(), &no_progress).unwrap();
        let want = 0.004f64.powf(-1.0 / 3.0);
        assert!((r.score - want).abs() < 1e-9, "{} vs {want}", r.score);
        assert!((r.metrics["byte_perplexity"] - want).abs() < 1e-9);
        assert!((r.metrics["bits_per_byte"] - want.log2()).abs() < 1e-9);
    }

    #[test]
    fn generate_exact_match_with_a_token_budget() {
        let items = vec![
            GenerateItem {
                prompt: "2+3=".into(),
                answer: "5".into(),
            },
            GenerateItem {
                prompt: "10+20=".into(),
                answer: " 30 ".into(),
            },
            GenerateItem {
                prompt: "7+8=".into(),
                answer: "16".into(),
            }, // wrong on purpose
            GenerateItem {
                prompt: "40+2=".into(),
                answer: "42".into(),
            },
        ];
        let t = task(TaskKind::Generate, Items::Generate(items));
        let adder = Adder {
            max_tokens_seen: Mutex::new(Vec::new()),
        };
        let r = run_task(&adder, &t, &RunOptions::default(), &no_progress).unwrap();
        assert_eq!(r.score, 0.75);
        // Longest answer " 30 " is 4 tokens, plus the default margin of 8.
        assert!(adder
            .max_tokens_seen
            .lock()
            .unwrap()
            .iter()
            .all(|&m| m == 12));
        // With no margin and a short answer, the budget cuts the generation.
        let t = task(
            TaskKind::Generate,
            Items::Generate(vec![GenerateItem {
                prompt: "50+50=".into(),
                answer: "1".into(),
            }]),
        );
        let tight = RunOptions {
            generation_margin: 0,
            ..RunOptions::default()
        };
        // "100" cut to 1 token is "1": a match only because of the cut.
        assert_eq!(
            run_task(&adder, &t, &tight, &no_progress).unwrap().score,
            1.0
        );
    }

    #[test]
    fn scorer_failures_name_the_task() {
        let adder = Adder {
            max_tokens_seen: Mutex::new(Vec::new()),
        };
        let t = task(
            TaskKind::MultipleChoice,
            Items::MultipleChoice(vec![mc(&["a", "b"], 0)]),
        );
        let e = run_task(&adder, &t, &RunOptions::default(), &no_progress)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("task `t`") && e.contains("1 log-likelihoods for 2 requests"),
            "{e}"
        );
        let t = task(
            TaskKind::Generate,
            Items::Generate(vec![GenerateItem {
                prompt: "hello".into(),
                answer: "1".into(),
            }]),
        );
        let e = run_task(&adder, &t, &RunOptions::default(), &no_progress)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot add `hello`"), "{e}");
    }
}
