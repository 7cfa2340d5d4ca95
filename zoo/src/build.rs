//! `fusion zoo build`: the demo pool. Trains a tiny Llama base briefly on
//! the mix of the [`super::tasks`], fine-tunes one expert per task from it,
//! writes every model as a Hugging Face folder and the tasks as task pools,
//! then measures every model on every task.
//!
//! Layout of `OUT` (`pool.yaml` is written last: its presence means the pool
//! is complete):
//! ```text
//! models/base/, models/<task>/   config.json, model.safetensors (f32),
//!                                tokenizer.json, tokenizer_config.json
//! tasks/taskpool.yaml            test splits: {name, tasks: [{name, kind, file}]}
//! tasks/<task>.<kind>.jsonl
//! train/taskpool.yaml            train splits, same layout
//! train/<task>.<kind>.jsonl
//! REPORT.md, report.json         accuracy matrix (models × tasks), timings
//! pool.yaml                      {name: demo, base, experts: {task: path}, taskpool: tasks}
//! ```

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use evaluator::pool::{ModelPool, PoolFile, BASE_NAME, POOL_FILE};
use evaluator::taskpool::{TaskFileEntry, TaskPoolFile};

use super::score::accuracy;
use super::tasks::{sub_seed, Format, Item, Splits, Task, TaskKind};
use super::train::{init_weights, Batch, Schedule, Trainable, Trainer};
use crate::error::{Result, ZooError};
use runtime::generate::bytelevel::{write_tokenizer_files, BOS, EOS, VOCAB_SIZE};
use runtime::model::random::write_checkpoint;
use runtime::model::{Family, Model, ModelConfig, ModelOptions};

/// What `fusion zoo build` does.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Seed of every random choice (data, initial weights, batches).
    pub seed: u64,
    /// The test recipe (see [`Recipe::new`]): a brief base, experts that
    /// fine-tune every weight.
    pub quick: bool,
    /// Replace the pool files of a non-empty output folder.
    pub force: bool,
    /// Show a progress bar over the training steps (only drawn when stderr
    /// is a terminal).
    pub progress: bool,
    /// Experts trained at once, each on its own thread; `None`: one per
    /// available core. Run candle single-threaded (`CANDLE_NUM_THREADS=1`,
    /// `RAYON_NUM_THREADS=1`, as `fusion zoo build` does) so the threads do
    /// not compete for the cores.
    pub threads: Option<usize>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            seed: 0,
            quick: false,
            force: false,
            progress: true,
            threads: None,
        }
    }
}

/// Sizes and step counts of a build.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The architecture of the base and the experts.
    pub config: ModelConfig,
    /// Sequences per training step.
    pub batch: usize,
    /// Pre-training of the base on the mix.
    pub base: Schedule,
    /// Fine-tuning of an expert on its task; `steps` is for the slowest task
    /// (see [`Recipe::expert_schedule`]).
    pub expert: Schedule,
    /// Train items per task.
    pub train_items: usize,
    /// Test items per task (fewer when the task has fewer).
    pub test_items: usize,
}

impl Recipe {
    /// The recipe of a full build, or of `--quick`.
    ///
    /// The full build pre-trains the base long enough to learn the copying
    /// skills (they live in attention) and fine-tunes only the experts' MLPs.
    /// `--quick` is for tests, whose point is that every expert wins its own
    /// task by a wide margin on any CPU: a brief base (at chance or near zero
    /// on every task) and experts that fine-tune every weight. A quick base
    /// trained halfway does not work: whether it has learnt to copy by then
    /// depends on the run (a 1200-step base scored 0 % on `reverse` on one
    /// machine), and MLP-only experts cannot learn what its attention lacks.
    pub fn new(quick: bool) -> Recipe {
        let config = ModelConfig {
            family: Family::Llama,
            vocab_size: VOCAB_SIZE,
            hidden_size: 128,
            intermediate_size: 256,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: Some(BOS),
            eos_token_ids: vec![EOS],
        };
        let (base_steps, expert_steps) = if quick { (400, 500) } else { (3000, 1000) };
        let schedule = |steps, trainable| Schedule {
            steps,
            lr: 3e-3,
            warmup: 20,
            final_fraction: 0.1,
            weight_decay: 0.0,
            trainable,
        };
        Recipe {
            config,
            batch: 32,
            base: schedule(base_steps, Trainable::All),
            expert: schedule(
                expert_steps,
                if quick {
                    Trainable::All
                } else {
                    Trainable::Mlp
                },
            ),
            train_items: if quick { 1000 } else { 3000 },
            // 200: one item is half a point of accuracy.
            test_items: 200,
        }
    }
}

impl Recipe {
    /// The fine-tuning schedule of `task`'s expert: `expert.steps` scaled by
    /// [`Task::effort`].
    pub fn expert_schedule(&self, task: Task) -> Schedule {
        let steps = (self.expert.steps as f64 * task.effort()).round() as usize;
        Schedule {
            steps,
            ..self.expert
        }
    }
}

/// One row of the accuracy matrix.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelScores {
    /// `base` or the expert's task name.
    pub model: String,
    /// Folder of the checkpoint, relative to the pool folder.
    pub path: String,
    /// Mean training loss over the last steps (nats per scored token).
    pub final_loss: f32,
    /// Accuracy per task (same order as [`BuildReport::tasks`]), raw
    /// completion prompts `<s>{prompt}`.
    pub raw: Vec<f64>,
    /// Accuracy per task with chat prompts `<s><|user|>{prompt}<|assistant|>`.
    pub chat: Vec<f64>,
}

/// A task of the pool, as the report lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskEntry {
    /// Task name (also its expert's name).
    pub name: String,
    /// `generate` or `multiple_choice`.
    pub kind: TaskKind,
    /// Items in the test split.
    pub test_items: usize,
    /// Items in the train split.
    pub train_items: usize,
}

/// What a build produced: the accuracy of every model on every task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BuildReport {
    /// Seed of the build.
    pub seed: u64,
    /// Built with `--quick`.
    pub quick: bool,
    /// Parameters of each model.
    pub parameters: usize,
    /// config.json of every model.
    pub config: serde_json::Value,
    /// The tasks, in column order.
    pub tasks: Vec<TaskEntry>,
    /// One row per model: the base first, then the experts in task order.
    pub models: Vec<ModelScores>,
    /// Wall time of the base's pre-training, seconds.
    pub base_seconds: f64,
    /// Wall time of the experts' fine-tuning, seconds.
    pub experts_seconds: f64,
    /// Wall time of the whole build, seconds.
    pub total_seconds: f64,
}

impl BuildReport {
    /// Accuracy (raw prompts) of `model` on `task`.
    pub fn accuracy(&self, model: &str, task: &str) -> Option<f64> {
        let col = self.tasks.iter().position(|t| t.name == task)?;
        let row = self.models.iter().find(|m| m.model == model)?;
        row.raw.get(col).copied()
    }

    /// The accuracy matrix as a markdown table (rows models, columns tasks).
    pub fn matrix_markdown(&self, chat: bool) -> String {
        let mut s = String::from("| model |");
        for t in &self.tasks {
            s.push_str(&format!(" {} |", t.name));
        }
        s.push_str(" mean |\n|---|");
        s.push_str(&"---:|".repeat(self.tasks.len() + 1));
        s.push('\n');
        for m in &self.models {
            let row = if chat { &m.chat } else { &m.raw };
            s.push_str(&format!("| {} |", m.model));
            for a in row {
                s.push_str(&format!(" {:.1} |", 100.0 * a));
            }
            let mean = row.iter().sum::<f64>() / row.len().max(1) as f64;
            s.push_str(&format!(" {:.1} |\n", 100.0 * mean));
        }
        s
    }

    /// The REPORT.md document.
    pub fn to_markdown(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "# Demo pool\n\nBuilt by `fusion zoo build` with seed {}{}: a Llama base of {} parameters \
             (hidden {}, {} layers, {} heads, {} key/value heads, MLP {}, byte-level vocabulary {}) \
             pre-trained on the mix of tasks, and one expert per task that fine-tuned {}.\n\n",
            self.seed,
            if self.quick { " (`--quick`)" } else { "" },
            self.parameters,
            c["hidden_size"],
            c["num_hidden_layers"],
            c["num_attention_heads"],
            c["num_key_value_heads"],
            c["intermediate_size"],
            c["vocab_size"],
            if self.quick {
                "every weight"
            } else {
                "only the MLPs"
            },
        );
        s.push_str(
            "Accuracy (%) on each task's test split. `generate` tasks: exact match of the greedy \
             completion (answer then `</s>`); `multiple_choice` tasks: the choice of highest summed \
             log-likelihood.\n\n## Raw prompts `<s>{prompt}`\n\n",
        );
        s.push_str(&self.matrix_markdown(false));
        s.push_str("\n## Chat prompts `<s><|user|>{prompt}<|assistant|>`\n\n");
        s.push_str(&self.matrix_markdown(true));
        s.push_str(
            "\n## Tasks\n\n| task | kind | train items | test items |\n|---|---|---:|---:|\n",
        );
        for t in &self.tasks {
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                t.name,
                t.kind.as_str(),
                t.train_items,
                t.test_items
            ));
        }
        s.push_str("\n## Training\n\n| model | final loss (nats/token) |\n|---|---:|\n");
        for m in &self.models {
            s.push_str(&format!("| {} | {:.3} |\n", m.model, m.final_loss));
        }
        s.push_str(&format!(
            "\nWall time: base {:.1} s, experts {:.1} s, total {:.1} s.\n",
            self.base_seconds, self.experts_seconds, self.total_seconds
        ));
        s
    }
}

/// Builds the demo pool into `out` and returns its report (also written to
/// `out/REPORT.md` and `out/report.json`).
pub fn build(out: &Path, opts: &BuildOptions) -> Result<BuildReport> {
    let started = Instant::now();
    prepare_output(out, opts.force)?;
    let recipe = Recipe::new(opts.quick);
    let cfg = &recipe.config;

    let splits: Vec<(Task, Splits)> = Task::ALL
        .iter()
        .map(|&t| {
            (
                t,
                t.splits(opts.seed, recipe.train_items, recipe.test_items),
            )
        })
        .collect();
    write_task_pool(&out.join("tasks"), "demo", &splits, |s| &s.test)?;
    write_task_pool(&out.join("train"), "demo-train", &splits, |s| &s.train)?;

    let total_steps = recipe.base.steps
        + Task::ALL
            .iter()
            .map(|&t| recipe.expert_schedule(t).steps)
            .sum::<usize>();
    let bar = progress_bar(opts.progress, total_steps as u64);

    // The base: the mix of every task, every token after <s> scored.
    let t0 = Instant::now();
    bar.set_message("base");
    let init = init_weights(cfg, sub_seed(opts.seed, &["init"]))?;
    let mixture: Vec<&[Item]> = splits.iter().map(|(_, s)| s.train.as_slice()).collect();
    let (base, base_loss) = train(
        cfg,
        &init,
        &recipe.base,
        recipe.batch,
        &mixture,
        Phase::Pretrain,
        sub_seed(opts.seed, &["batches", "base"]),
        &bar,
    )?;
    let base_seconds = t0.elapsed().as_secs_f64();

    // The experts: one task each, only the answer (and </s>) scored; each
    // is trained on one thread, from its own seed, so the result does not
    // depend on the schedule.
    let t1 = Instant::now();
    bar.set_message("experts");
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Longest first, so the last expert to finish does not run alone.
    let mut order: Vec<usize> = (0..splits.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(recipe.expert_schedule(splits[k].0).steps));
    let experts = in_parallel(&order, threads, |k| {
        let (task, s) = &splits[k];
        train(
            cfg,
            &base,
            &recipe.expert_schedule(*task),
            recipe.batch,
            &[s.train.as_slice()],
            Phase::FineTune,
            sub_seed(opts.seed, &["batches", task.name()]),
            &bar,
        )
    })?;
    let mut trained = vec![("base".to_string(), base, base_loss)];
    for ((task, _), (w, loss)) in splits.iter().zip(experts) {
        trained.push((task.name().to_string(), w, loss));
    }
    let experts_seconds = t1.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let all: Vec<usize> = (0..trained.len()).collect();
    let rows = in_parallel(&all, threads, |k| {
        let (name, weights, loss) = &trained[k];
        let dir = out.join("models").join(name);
        write_checkpoint(&dir, cfg, weights, DType::F32)?;
        write_tokenizer_files(&dir, cfg.max_position_embeddings)?;
        let model = Model::from_tensors(cfg.clone(), weights.clone(), &ModelOptions::default())?;
        let mut raw = Vec::new();
        let mut chat = Vec::new();
        for (_, s) in &splits {
            raw.push(accuracy(&model, &s.test, Format::Raw)?);
            chat.push(accuracy(&model, &s.test, Format::Chat)?);
        }
        Ok(ModelScores {
            model: name.clone(),
            path: format!("models/{name}"),
            final_loss: *loss,
            raw,
            chat,
        })
    })?;

    let report = BuildReport {
        seed: opts.seed,
        quick: opts.quick,
        parameters: cfg.num_parameters(),
        config: cfg.to_hf_json(),
        tasks: splits
            .iter()
            .map(|(t, s)| TaskEntry {
                name: t.name().to_string(),
                kind: t.kind(),
                test_items: s.test.len(),
                train_items: s.train.len(),
            })
            .collect(),
        models: rows,
        base_seconds,
        experts_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    write_file(&out.join("REPORT.md"), report.to_markdown().as_bytes())?;
    write_file(
        &out.join("report.json"),
        &serde_json::to_vec_pretty(&report).expect("json"),
    )?;
    write_pool_yaml(out)?;
    Ok(report)
}

/// How items become training sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Every token after `<s>` is scored. A multiple-choice item continues
    /// with a choice drawn uniformly, not the gold one: the base learns what
    /// the choices look like, not which one is right. (Generate items keep
    /// their answers: the base is trained too briefly to learn those skills,
    /// and seeing their answers' formats lets the experts start sooner.)
    Pretrain,
    /// Only the answer and `</s>` are scored.
    FineTune,
}

/// Trains from `init` on batches drawn from `sources` (a task uniformly, then
/// an item and a format uniformly); returns the weights and the mean loss of
/// the last tenth of the steps.
#[allow(clippy::too_many_arguments)]
fn train(
    cfg: &ModelConfig,
    init: &HashMap<String, Tensor>,
    schedule: &Schedule,
    batch: usize,
    sources: &[&[Item]],
    phase: Phase,
    seed: u64,
    bar: &ProgressBar,
) -> Result<(HashMap<String, Tensor>, f32)> {
    let mut trainer = Trainer::new(cfg, init, schedule)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tail = (schedule.steps / 10).max(1);
    let mut tail_loss = 0f32;
    for step in 0..schedule.steps {
        let seqs: Vec<(Vec<u32>, usize)> = (0..batch)
            .map(|_| {
                let src = sources[rng.random_range(0..sources.len())];
                let item = &src[rng.random_range(0..src.len())];
                let format = Format::ALL[rng.random_range(0..Format::ALL.len())];
                match (phase, item) {
                    (Phase::FineTune, _) => format.sequence(item),
                    (
                        Phase::Pretrain,
                        Item::MultipleChoice {
                            context, choices, ..
                        },
                    ) => {
                        let shown = Item::Generate {
                            prompt: context.clone(),
                            answer: choices[rng.random_range(0..choices.len())].clone(),
                        };
                        (format.sequence(&shown).0, 1)
                    }
                    (Phase::Pretrain, Item::Generate { .. }) => (format.sequence(item).0, 1),
                }
            })
            .collect();
        let b = Batch::new(&seqs, cfg.vocab_size)?;
        let loss = trainer.step(&b, schedule.lr_at(step))?;
        if !loss.is_finite() {
            return Err(ZooError::Training(format!(
                "training diverged at step {step} (loss {loss})"
            )));
        }
        if step + tail >= schedule.steps {
            tail_loss += loss / tail as f32;
        }
        bar.inc(1);
    }
    Ok((trainer.weights()?, tail_loss))
}

/// Makes the allocator keep freed memory for reuse instead of handing it
/// back to the OS (glibc only; a no-op elsewhere). Training allocates and
/// frees tensors of the same sizes every step; returning them costs a page
/// fault per page on the next step, measured at about a quarter of a step's
/// time. Process-wide and permanent: for processes that only train, such as
/// `fusion zoo build`.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is safe to call at
    // any time (glibc takes its arena lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Runs `job(k)` for every `k` of `order` (a permutation of `0..n`, handed
/// out in that order) on up to `threads` threads; returns the results
/// indexed by `k`. A failed job stops the handing out of new ones.
pub(crate) fn in_parallel<T: Send>(
    order: &[usize],
    threads: usize,
    job: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let n = order.len();
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<T>>>> = (0..n).map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, n.max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let k = order[i];
                let result = job(k);
                if result.is_err() {
                    next.store(n, Ordering::Relaxed);
                }
                *slots[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            });
        }
    });
    let mut out = Vec::with_capacity(n);
    let mut skipped = None;
    for (k, slot) in slots.into_iter().enumerate() {
        match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(v)) => out.push(v),
            Some(Err(e)) => return Err(e),
            None => skipped = skipped.or(Some(k)),
        }
    }
    match skipped {
        None => Ok(out),
        Some(k) => Err(ZooError::Training(format!("job {k} did not run"))),
    }
}

fn progress_bar(enabled: bool, steps: u64) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps {elapsed}<{eta} {msg}")
            .expect("valid template"),
    );
    bar
}

/// The entries a build writes into its output folder.
const POOL_ENTRIES: [&str; 6] = [
    "pool.yaml",
    "models",
    "tasks",
    "train",
    "REPORT.md",
    "report.json",
];

/// Creates `out`; a non-empty `out` is an error unless `force`, which removes
/// the entries of a previous build (and nothing else).
fn prepare_output(out: &Path, force: bool) -> Result<()> {
    prepare_output_with(out, force, &POOL_ENTRIES)
}

/// [`prepare_output`] for a build that writes `names` (pool.yaml first).
pub(crate) fn prepare_output_with(out: &Path, force: bool, names: &[&str]) -> Result<()> {
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| ZooError::io(out, e))?;
        if entries.next().is_some() {
            if !force {
                return Err(ZooError::OutputNotEmpty(out.to_path_buf()));
            }
            // pool.yaml first: an interrupted rebuild must not look complete.
            for name in names {
                let p = out.join(name);
                let removed = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else if p.exists() {
                    std::fs::remove_file(&p)
                } else {
                    Ok(())
                };
                removed.map_err(|e| ZooError::io(&p, e))?;
            }
        }
    }
    std::fs::create_dir_all(out).map_err(|e| ZooError::io(out, e))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| ZooError::io(path, e))
}

/// The file of a task's items in a task-pool folder: `<task>.<kind>.jsonl`.
pub fn task_file_name(task: Task) -> String {
    format!("{}.{}.jsonl", task.name(), task.kind().as_str())
}

/// Writes `dir/taskpool.yaml` and one JSONL file per task.
fn write_task_pool(
    dir: &Path,
    name: &str,
    splits: &[(Task, Splits)],
    items: impl Fn(&Splits) -> &Vec<Item>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ZooError::io(dir, e))?;
    let mut tasks = Vec::new();
    for (task, s) in splits {
        let file = task_file_name(*task);
        let mut text = String::new();
        for item in items(s) {
            text.push_str(&serde_json::to_string(item).expect("json"));
            text.push('\n');
        }
        write_file(&dir.join(&file), text.as_bytes())?;
        tasks.push(TaskFileEntry {
            name: task.name().to_string(),
            kind: task.kind().as_str().to_string(),
            file: file.into(),
            metric: None,
            classes: None,
            head: None,
        });
    }
    let doc = TaskPoolFile {
        name: Some(name.to_string()),
        tasks,
    };
    Ok(doc.write(dir)?)
}

/// The demo pool's `pool.yaml`: the pool's name, base, experts and task pool.
fn pool_file() -> PoolFile {
    PoolFile {
        name: "demo".into(),
        base: "models/base".into(),
        experts: Task::ALL
            .iter()
            .map(|t| (t.name().to_string(), format!("models/{}", t.name()).into()))
            .collect(),
        taskpool: Some("tasks".into()),
        calibration: None,
    }
}

/// Writes `out/pool.yaml` (last: its presence means the pool is complete).
fn write_pool_yaml(out: &Path) -> Result<()> {
    Ok(pool_file().write(&out.join(POOL_FILE))?)
}

/// The folders of a built pool's models, base first (read from pool.yaml).
pub fn pool_models(out: &Path) -> Result<Vec<(String, PathBuf)>> {
    let pool = ModelPool::load(&out.join(POOL_FILE))?;
    let mut models = vec![(BASE_NAME.to_string(), pool.base)];
    models.extend(pool.experts);
    Ok(models)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_jobs_return_in_index_order_and_stop_on_errors() {
        let order = [3, 1, 0, 2];
        let out = in_parallel(&order, 2, |k| Ok(k * 10)).unwrap();
        assert_eq!(out, vec![0, 10, 20, 30]);
        let err = in_parallel(&order, 1, |k| {
            if k == 1 {
                Err(ZooError::Training(format!("job {k} broke")))
            } else {
                Ok(k)
            }
        })
        .unwrap_err();
        // One thread hands out 3, then 1 (fails); 0 and 2 never run, and the
        // real error is reported rather than theirs.
        assert_eq!(err.to_string(), "training: job 1 broke");
    }

    #[test]
    fn expert_steps_scale_with_effort_and_quick_experts_train_every_weight() {
        for quick in [false, true] {
            let r = Recipe::new(quick);
            assert_eq!(r.expert_schedule(Task::Add).steps, r.expert.steps);
            assert_eq!(
                r.expert_schedule(Task::Category).steps,
                (r.expert.steps as f64 * 0.4).round() as usize
            );
        }
        let (full, quick) = (Recipe::new(false), Recipe::new(true));
        assert!(quick.expert.steps < full.expert.steps && quick.base.steps < full.base.steps);
        assert_eq!(full.expert.trainable, Trainable::Mlp);
        assert_eq!(quick.expert_schedule(Task::Add).trainable, Trainable::All);
        // A few hundred thousand parameters.
        let p = full.config.num_parameters();
        assert!((200_000..1_000_000).contains(&p), "{p}");
    }

    #[test]
    fn output_folder_rules() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pool");
        prepare_output(&out, false).unwrap();
        assert!(out.is_dir());
        std::fs::create_dir_all(out.join("models/base")).unwrap();
        std::fs::write(out.join("pool.yaml"), "name: demo\n").unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let e = prepare_output(&out, false).unwrap_err();
        assert!(matches!(e, ZooError::OutputNotEmpty(_)), "{e}");
        // --force removes the pool's own entries and nothing else.
        prepare_output(&out, true).unwrap();
        assert!(!out.join("models").exists() && !out.join("pool.yaml").exists());
        assert_eq!(
            std::fs::read_to_string(out.join("notes.txt")).unwrap(),
            "mine"
        );
    }

    #[test]
    fn pool_and_task_pool_files() {
        let dir = tempfile::tempdir().unwrap();
        for (_, p) in pool_file()
            .experts
            .iter()
            .chain([(String::new(), pool_file().base)].iter())
        {
            std::fs::create_dir_all(dir.path().join(p)).unwrap();
        }
        write_pool_yaml(dir.path()).unwrap();
        let models = pool_models(dir.path()).unwrap();
        assert_eq!(
            models[0],
            ("base".to_string(), dir.path().join("models/base"))
        );
        let names: Vec<&str> = models[1..].iter().map(|(n, _)| n.as_str()).collect();
        let tasks: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names, tasks);
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(
            &std::fs::read_to_string(dir.path().join("pool.yaml")).unwrap(),
        )
        .unwrap();
        assert_eq!(doc["name"].as_str(), Some("demo"));
        assert_eq!(doc["taskpool"].as_str(), Some("tasks"));

        let splits: Vec<(Task, Splits)> = [Task::Add, Task::Compare]
            .iter()
            .map(|&t| (t, t.splits(1, 5, 3)))
            .collect();
        let tp = dir.path().join("tasks");
        write_task_pool(&tp, "demo", &splits, |s| &s.test).unwrap();
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(tp.join("taskpool.yaml")).unwrap())
                .unwrap();
        assert_eq!(doc["name"].as_str(), Some("demo"));
        assert_eq!(doc["tasks"][1]["name"].as_str(), Some("compare"));
        assert_eq!(doc["tasks"][1]["kind"].as_str(), Some("multiple_choice"));
        assert_eq!(
            doc["tasks"][1]["file"].as_str(),
            Some("compare.multiple_choice.jsonl")
        );
        let lines = std::fs::read_to_string(tp.join("add.generate.jsonl")).unwrap();
        let items: Vec<Item> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(items, splits[0].1.test);
    }

    #[test]
    fn report_markdown_lists_every_model_and_task() {
        let report = BuildReport {
            seed: 4,
            quick: true,
            parameters: 10,
            config: serde_json::json!({"hidden_size": 8}),
            tasks: vec![
                TaskEntry {
                    name: "add".into(),
                    kind: TaskKind::Generate,
                    test_items: 2,
                    train_items: 3,
                },
                TaskEntry {
                    name: "compare".into(),
                    kind: TaskKind::MultipleChoice,
                    test_items: 2,
                    train_items: 3,
                },
            ],
            models: vec![ModelScores {
                model: "base".into(),
                path: "models/base".into(),
                final_loss: 1.5,
                raw: vec![0.25, 0.5],
                chat: vec![0.0, 1.0],
            }],
            base_seconds: 1.0,
            experts_seconds: 2.0,
            total_seconds: 3.5,
        };
        let table = report.matrix_markdown(false);
        assert!(
            table.contains("| model | add | compare | mean |"),
            "{table}"
        );
        assert!(table.contains("| base | 25.0 | 50.0 | 37.5 |"), "{table}");
        assert!(report
            .matrix_markdown(true)
            .contains("| base | 0.0 | 100.0 | 50.0 |"));
        assert_eq!(report.accuracy("base", "compare"), Some(0.5));
        assert_eq!(report.accuracy("add", "compare"), None);
        let md = report.to_markdown();
        assert!(
            md.contains("seed 4 (`--quick`)") && md.contains("total 3.5 s"),
            "{md}"
        );
        let back: BuildReport =
            serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert_eq!(back, report);
    }
}
