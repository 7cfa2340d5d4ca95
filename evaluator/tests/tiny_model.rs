//! End to end on a real tiny random model: every metric of the runner,
//! through the `TextModel` scorer, against log-likelihoods and greedy
//! continuations computed independently with `Model::forward`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use evaluator::runner::{run_task, RunOptions};
use evaluator::taskpool::{TaskKind, TaskPool};
use runtime::generate::bytelevel::{self, encode_bytes, BOS, EOS};
use runtime::generate::TextModel;
use runtime::model::{random, Model, ModelConfig, ModelOptions};

fn config() -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": bytelevel::VOCAB_SIZE, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256,
        "bos_token_id": BOS, "eos_token_id": EOS,
    });
    ModelConfig::from_json(&json.to_string(), Path::new("config.json")).unwrap()
}

/// A random model whose output layer can only make printable ASCII (other
/// rows of lm_head are zero, so their logits are 0 and lose to the largest
/// of 94 random logits), so greedy text is plain ASCII with no end token.
fn write_model(dir: &Path, seed: u64) -> Model {
    let cfg = config();
    let mut w = random::random_weights(&cfg, seed, 0.5).unwrap();
    let head = w["lm_head.weight"].to_vec2::<f32>().unwrap();
    let masked: Vec<f32> = head
        .iter()
        .enumerate()
        .flat_map(|(tok, row)| {
            let keep = (0x21..=0x7e).contains(&tok);
            row.iter().map(move |v| if keep { *v } else { 0.0 })
        })
        .collect();
    let shape = (cfg.vocab_size, cfg.hidden_size);
    w.insert(
        "lm_head.weight".into(),
        Tensor::from_vec(masked, shape, &Device::Cpu).unwrap(),
    );
    random::write_checkpoint(dir, &cfg, &w, DType::F32).unwrap();
    bytelevel::write_tokenizer_files(dir, 256).unwrap();
    Model::from_tensors(cfg, w, &ModelOptions::default()).unwrap()
}

/// log P(cont | <s> context), from one forward pass over the whole sequence.
fn loglik(model: &Model, context: &str, cont: &str) -> f64 {
    let mut ids = vec![BOS];
    ids.extend(encode_bytes(context));
    let start = ids.len();
    ids.extend(encode_bytes(cont));
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&t, None).unwrap().squeeze(0).unwrap();
    let rows = logits.to_vec2::<f32>().unwrap();
    (start..ids.len())
        .map(|p| {
            // log softmax in f64: x_k − log Σ exp(x_j).
            let row = &rows[p - 1];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            row[ids[p] as usize] as f64 - lse
        })
        .sum()
}

/// Greedy decoding of `n` tokens after `<s> prompt`, one full forward per token.
fn greedy(model: &Model, prompt: &str, n: usize) -> String {
    let mut ids = vec![BOS];
    ids.extend(encode_bytes(prompt));
    let mut out = Vec::new();
    for _ in 0..n {
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let last = model.forward(&t, None).unwrap().squeeze(0).unwrap();
        let row = last.get(ids.len() - 1).unwrap().to_vec1::<f32>().unwrap();
        let next = row
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0 as u32;
        assert!(next < 128, "greedy token {next} is not ASCII");
        ids.push(next);
        out.push(next as u8);
    }
    String::from_utf8(out).unwrap()
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

fn jsonl(items: &[serde_json::Value]) -> String {
    items.iter().map(|v| v.to_string() + "\n").collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    model: Model,
    text: TextModel,
    pool: TaskPool,
    expected_mc: (f64, f64),
    expected_cls: f64,
    texts: Vec<String>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("model");
    let model = write_model(&ckpt, 7);
    let text = TextModel::load(&ckpt, &ModelOptions::default()).unwrap();

    // Multiple choice: the gold of each item is chosen from the independent
    // log-likelihoods so that acc and acc_norm come out as planned.
    let questions = [
        ("Q: 2+2=", vec![" 4", " five", " 22"]),
        ("The sky is", vec![" blue", " x", " green!"]),
        ("abc", vec!["d", "dd", "xyz"]),
        ("hello", vec![" world", " there"]),
    ];
    let mut mc = Vec::new();
    let (mut acc, mut acc_norm) = (0.0, 0.0);
    for (k, (ctx, choices)) in questions.iter().enumerate() {
        let lps: Vec<f64> = choices.iter().map(|c| loglik(&model, ctx, c)).collect();
        let normed: Vec<f64> = lps
            .iter()
            .zip(choices)
            .map(|(l, c)| l / c.len() as f64)
            .collect();
        let (a, n) = (argmax(&lps), argmax(&normed));
        // Items 0 and 1: gold = the acc prediction; items 2 and 3: gold =
        // a choice that is neither prediction when there is one.
        let gold = if k < 2 {
            a
        } else {
            (0..choices.len()).find(|&i| i != a && i != n).unwrap_or(n)
        };
        acc += f64::from(u8::from(gold == a));
        acc_norm += f64::from(u8::from(gold == n));
        mc.push(serde_json::json!({"context": ctx, "choices": choices, "gold": gold}));
    }
    let expected_mc = (acc / 4.0, acc_norm / 4.0);

    // Classification over the labels seen in the task.
    let inputs = ["great movie:", "awful movie:", "so-so movie:"];
    let labels = [" pos", " neg", " pos"];
    let seen = [" pos", " neg"];
    let mut correct = 0.0;
    for (inp, lab) in inputs.iter().zip(labels) {
        let lps: Vec<f64> = seen.iter().map(|l| loglik(&model, inp, l)).collect();
        correct += f64::from(u8::from(seen[argmax(&lps)] == lab));
    }
    let cls: Vec<_> = inputs
        .iter()
        .zip(labels)
        .map(|(i, l)| serde_json::json!({"input": i, "label": l}))
        .collect();

    // Generation: one answer is the independent greedy continuation, the
    // other is not.
    let g1 = greedy(&model, "add 1+2=", 6);
    let g2 = greedy(&model, "copy: abc", 6);
    let wrong: String = g2.chars().rev().collect::<String>() + "?";
    let wrong = wrong[..6].to_string();
    assert_ne!(wrong.trim(), g2.trim());
    let gen = [
        serde_json::json!({"prompt": "add 1+2=", "answer": g1}),
        serde_json::json!({"prompt": "copy: abc", "answer": wrong}),
    ];

    let texts = vec!["the quick brown fox".to_string(), "jumps over".to_string()];
    let ppl: Vec<_> = texts
        .iter()
        .map(|t| serde_json::json!({"text": t}))
        .collect();

    let tasks = dir.path().join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    std::fs::write(tasks.join("qa.multiple_choice.jsonl"), jsonl(&mc)).unwrap();
    std::fs::write(tasks.join("sentiment.classification.jsonl"), jsonl(&cls)).unwrap();
    std::fs::write(tasks.join("echo.generate.jsonl"), jsonl(&gen)).unwrap();
    std::fs::write(tasks.join("prose.perplexity.jsonl"), jsonl(&ppl)).unwrap();
    let pool = TaskPool::open(&tasks).unwrap();
    Fixture {
        _dir: dir,
        model,
        text,
        pool,
        expected_mc,
        expected_cls: correct / 3.0,
        texts,
    }
}

#[test]
fn every_metric_matches_an_independent_forward_pass() {
    let f = fixture();
    let kinds: Vec<_> = f.pool.tasks.iter().map(|t| t.kind).collect();
    assert_eq!(
        kinds,
        [
            TaskKind::Generate,
            TaskKind::Perplexity,
            TaskKind::MultipleChoice,
            TaskKind::Classification
        ]
    );
    let opts = RunOptions {
        batch_size: 3,
        generation_margin: 0,
        ..RunOptions::default()
    };
    let run = |name: &str| {
        let task = f.pool.task(name).unwrap().load(None).unwrap();
        run_task(&f.text, &task, &opts, &|_| {}).unwrap()
    };

    let qa = run("qa");
    assert_eq!(qa.metrics["acc"], f.expected_mc.0);
    assert_eq!(qa.metrics["acc_norm"], f.expected_mc.1);
    assert_eq!(
        qa.metrics["acc"], 0.5,
        "items 0 and 1 right, 2 and 3 wrong by construction"
    );

    assert_eq!(run("sentiment").score, f.expected_cls);

    assert_eq!(run("echo").score, 0.5);

    let (mut lp, mut tokens) = (0.0, 0usize);
    for t in &f.texts {
        lp += loglik(&f.model, "", t);
        tokens += t.len();
    }
    let want = (-lp / tokens as f64).exp();
    let got = run("prose").score;
    assert!(
        (got - want).abs() < 1e-4 * want,
        "perplexity {got} vs {want}"
    );
}

#[test]
fn batch_size_does_not_change_scores() {
    let f = fixture();
    let task = f.pool.task("qa").unwrap().load(None).unwrap();
    let score = |batch_size| {
        let opts = RunOptions {
            batch_size,
            ..RunOptions::default()
        };
        run_task(&f.text, &task, &opts, &|_| {}).unwrap().metrics
    };
    assert_eq!(score(1), score(16));
}
