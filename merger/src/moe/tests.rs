//! End-to-end tests of the routed ensembles on tiny random pools.

use std::cell::Cell;

use candle_core::{DType, Device, Tensor};

use super::calibration::{CalibrationInput, CalibrationItem};
use super::testutil::{ids_tensor, logits, max_diff, pool, randn, random_ids, Pool};
use super::*;
use crate::merge::{merge_in_memory, MergePlan, Progress};
use crate::spec::{MergeSpec, ParamValue};
use runtime::checkpoint::WriteOptions;
use runtime::model::{Model, ModelOptions};

fn build_moe(p: &Pool, spec: &MergeSpec, calibration: &[Vec<u32>]) -> MoeModel {
    build_moe_on(p, spec, &texts(calibration))
}

fn build_moe_on(p: &Pool, spec: &MergeSpec, calibration: &[CalibrationItem]) -> MoeModel {
    build(spec, &|n: &str| p.open(n), calibration, &Device::Cpu, false).unwrap()
}

/// Token sequences as text calibration inputs.
fn texts(seqs: &[Vec<u32>]) -> Vec<CalibrationItem> {
    seqs.iter().cloned().map(CalibrationItem::from).collect()
}

/// The entropy (nats) of the softmax of `scores`, computed in f64.
fn entropy_of_scores(scores: &[f64]) -> f64 {
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
    scores
        .iter()
        .map(|s| {
            let lp = s - m - z.ln();
            -lp.exp() * lp
        })
        .sum()
}

/// Log-softmax of one position's logits, in f64.
fn log_probs(row: &[f32]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    row.iter().map(|&x| x as f64 - m - z.ln()).collect()
}

/// The merged tensors of a task_arithmetic merge with λ.
fn task_arithmetic_tensors(p: &Pool, lambda: f64) -> HashMap<String, Tensor> {
    let spec = p
        .spec("task_arithmetic")
        .with("scaling_coefficient", lambda);
    let mut plan = MergePlan::with_checkpoints(spec, &|n: &str| p.open(n)).unwrap();
    merge_in_memory(&mut plan, &Device::Cpu, &Progress::new(0, "ta", false))
        .unwrap()
        .0
}

fn task_arithmetic(p: &Pool, lambda: f64) -> Model {
    let w = task_arithmetic_tensors(p, lambda);
    Model::from_tensors(p.config.clone(), w, &ModelOptions::default()).unwrap()
}

/// The same MoE with routers drawn from N(0, std²) (so routing varies with
/// the input).
fn with_random_routers(m: &MoeModel, std: f32) -> MoeModel {
    let seed = Cell::new(1000u64);
    let mut parts = m.parts().clone();
    parts.routers = parts
        .routers
        .try_map(|r| {
            r.try_map(|t| {
                seed.set(seed.get() + 1);
                Ok(randn(t.dims(), std, seed.get()))
            })
        })
        .unwrap();
    MoeModel::from_parts(parts).unwrap()
}

fn untrained(spec: MergeSpec) -> MergeSpec {
    spec.with("steps", 0.0)
}

/// An untrained spec of `method`; rank-one experts of rank 3.
fn untrained_method(p: &Pool, method: &str) -> MergeSpec {
    let spec = untrained(p.spec(method));
    if method == "rankone_moe" {
        spec.with("rank_k", 3.0)
    } else {
        spec
    }
}

#[test]
fn untrained_we_moe_is_task_arithmetic() {
    for bias in [false, true] {
        let p = pool(3, bias, 0.05, DType::F32);
        let ta = task_arithmetic(&p, 0.3);
        let ids = random_ids(2, 7, 48, 5);
        let want = logits(&ta, &ids);
        for routing in ["per_sequence", "per_token"] {
            let spec =
                untrained(p.spec("we_moe")).with_value("routing", ParamValue::Text(routing.into()));
            let moe = build_moe(&p, &spec, &[]);
            let d = max_diff(&logits(moe.model(), &ids), &want);
            assert!(d < 1e-5, "bias {bias}, {routing}: max |Δlogit| = {d}");
        }
        // A different λ changes both the same way.
        let spec = untrained(p.spec("we_moe")).with("init_lambda", 0.7);
        let d = max_diff(
            &logits(build_moe(&p, &spec, &[]).model(), &ids),
            &logits(&task_arithmetic(&p, 0.7), &ids),
        );
        assert!(d < 1e-5, "λ 0.7: {d}");
    }
}

#[test]
fn untrained_full_rank_rankone_moe_is_task_arithmetic() {
    // rank_k past min(d, m) = 16 keeps every SVD component: τ exactly.
    let p = pool(2, false, 0.05, DType::F32);
    let spec = untrained(p.spec("rankone_moe")).with("rank_k", 100.0);
    let moe = build_moe(&p, &spec, &[]);
    assert_eq!(moe.meta().rank_k, Some(16));
    let ids = random_ids(2, 6, 48, 9);
    let d = max_diff(
        &logits(moe.model(), &ids),
        &logits(&task_arithmetic(&p, 0.3), &ids),
    );
    assert!(d < 1e-5, "{d}");
}

#[test]
fn routed_forward_equals_the_explicit_weight_matrices() {
    // Per-sequence routing r_l of each block, read from the KV cache, defines
    // the dense MLP weights θ0 + Σ r_li τi; a plain model with those weights
    // (and task arithmetic elsewhere) must give the MoE's logits.
    let p = pool(3, true, 0.05, DType::F32);
    let moe = with_random_routers(&build_moe(&p, &untrained(p.spec("we_moe")), &[]), 0.5);
    let ids = random_ids(1, 9, 48, 3);
    let mut cache = moe.model().new_cache();
    let got = moe
        .model()
        .forward(&ids_tensor(&ids), Some(&mut cache))
        .unwrap();
    let base = p.open("base").unwrap();
    let experts: Vec<_> = p.experts.iter().map(|n| p.open(n).unwrap()).collect();
    let mut w = task_arithmetic_tensors(&p, 0.3);
    let mut spread = 0f32;
    for l in 0..p.config.num_hidden_layers {
        let r: Vec<f32> = cache
            .mlp_state(l)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(r.len(), 3);
        spread = spread.max(r.iter().map(|x| (x - 0.3).abs()).fold(0.0, f32::max));
        for proj in PROJECTIONS {
            for kind in ["weight", "bias"] {
                let name = format!("model.layers.{l}.mlp.{proj}.{kind}");
                let b = base
                    .tensor(&name)
                    .unwrap()
                    .to_f32_tensor(&Device::Cpu)
                    .unwrap();
                let mut acc = b.clone();
                for (e, ri) in experts.iter().zip(&r) {
                    let tau = (e
                        .tensor(&name)
                        .unwrap()
                        .to_f32_tensor(&Device::Cpu)
                        .unwrap()
                        - &b)
                        .unwrap();
                    acc = (acc + (tau * *ri as f64).unwrap()).unwrap();
                }
                w.insert(name, acc);
            }
        }
    }
    assert!(
        spread > 0.05,
        "random routers should move r away from λ ({spread})"
    );
    let explicit = Model::from_tensors(p.config.clone(), w, &ModelOptions::default()).unwrap();
    let d = max_diff(&got, &logits(&explicit, &ids));
    assert!(d < 1e-5, "{d}");
}

#[test]
fn sequences_of_a_batch_are_routed_independently() {
    let p = pool(2, false, 0.05, DType::F32);
    for method in ["we_moe", "sparse_we_moe", "rankone_moe"] {
        let moe = with_random_routers(&build_moe(&p, &untrained_method(&p, method), &[]), 0.5);
        let ids = random_ids(3, 8, 48, 11);
        let batch = logits(moe.model(), &ids);
        for (i, seq) in ids.iter().enumerate() {
            let alone = logits(moe.model(), std::slice::from_ref(seq));
            let d = max_diff(&batch.get(i).unwrap(), &alone.get(0).unwrap());
            assert!(d < 1e-5, "{method} sequence {i}: {d}");
        }
    }
}

#[test]
fn cached_decoding_keeps_the_prompt_routing() {
    // "Equal" here: the logits of incremental decoding (prompt in one call,
    // then one token per call) equal, within 1e-4, those of one full forward
    // over prompt + generated tokens whose routing is the prompt's (a cache
    // forked after the prompt supplies it). A plain full forward routes on
    // all tokens and differs.
    let p = pool(3, false, 0.05, DType::F32);
    let moe = with_random_routers(&build_moe(&p, &untrained(p.spec("we_moe")), &[]), 0.5);
    let m = moe.model();
    let seq = &random_ids(1, 9, 48, 21)[0];
    let (prompt, rest) = seq.split_at(5);
    let mut cache = m.new_cache();
    let first = m
        .forward(&ids_tensor(&[prompt.to_vec()]), Some(&mut cache))
        .unwrap();
    let fork = cache.fork_mlp_state();
    let mut rows = vec![first.squeeze(0).unwrap()];
    for &t in rest {
        rows.push(
            m.forward_last(&ids_tensor(&[vec![t]]), Some(&mut cache))
                .unwrap(),
        );
    }
    let incremental = Tensor::cat(&rows, 0).unwrap();
    let mut fork = fork;
    let replay = m
        .forward(&ids_tensor(std::slice::from_ref(seq)), Some(&mut fork))
        .unwrap()
        .squeeze(0)
        .unwrap();
    let d = max_diff(&incremental, &replay);
    assert!(d < 1e-4, "cached vs prompt-routed full forward: {d}");
    let plain = logits(m, std::slice::from_ref(seq)).squeeze(0).unwrap();
    let d = max_diff(&incremental, &plain);
    assert!(
        d > 1e-4,
        "routing on all tokens should differ from the prompt's: {d}"
    );
    // Per-token routing needs no state: cached decoding is a full forward.
    let spec =
        untrained(p.spec("we_moe")).with_value("routing", ParamValue::Text("per_token".into()));
    let tok = with_random_routers(&build_moe(&p, &spec, &[]), 0.5);
    let mut cache = tok.model().new_cache();
    let mut rows = vec![tok
        .model()
        .forward(&ids_tensor(&[prompt.to_vec()]), Some(&mut cache))
        .unwrap()
        .squeeze(0)
        .unwrap()];
    for &t in rest {
        rows.push(
            tok.model()
                .forward_last(&ids_tensor(&[vec![t]]), Some(&mut cache))
                .unwrap(),
        );
    }
    let d = max_diff(
        &Tensor::cat(&rows, 0).unwrap(),
        &logits(tok.model(), std::slice::from_ref(seq))
            .squeeze(0)
            .unwrap(),
    );
    assert!(d < 1e-4, "per-token cached decoding: {d}");
    assert!(cache.mlp_state(0).is_none());
}

#[test]
fn rewinding_past_the_prompt_drops_the_routing() {
    let p = pool(2, false, 0.05, DType::F32);
    let moe = with_random_routers(&build_moe(&p, &untrained(p.spec("we_moe")), &[]), 0.5);
    let m = moe.model();
    let mut cache = m.new_cache();
    m.forward(&ids_tensor(&random_ids(1, 6, 48, 1)), Some(&mut cache))
        .unwrap();
    m.forward(&ids_tensor(&[vec![3]]), Some(&mut cache))
        .unwrap();
    cache.truncate(6).unwrap();
    assert!(cache.mlp_state(1).is_some(), "the prompt is intact");
    cache.truncate(4).unwrap();
    assert!(cache.mlp_state(1).is_none(), "the prompt was cut");
}

#[test]
fn training_lowers_the_entropy() {
    let p = pool(2, false, 0.2, DType::F32);
    let calibration: Vec<Vec<u32>> = (0..24)
        .map(|i| random_ids(1, 6 + i % 7, 48, 50 + i as u64).remove(0))
        .collect();
    let spec = p
        .spec("we_moe")
        .with("steps", 40.0)
        .with("lr", 1e-2)
        .with("batch_size", 4.0)
        .with_value("entropy_positions", ParamValue::Text("last".into()));
    let trained = build_moe(&p, &spec, &calibration);
    let report = trained.meta().training.clone().unwrap();
    assert_eq!(
        (report.steps, report.batch_size, report.sequences),
        (40, 4, 24)
    );
    assert!(
        report.entropy_after < report.entropy_before,
        "{} -> {}",
        report.entropy_before,
        report.entropy_after
    );
    // Independently: the entropy of each calibration sequence's last
    // prediction, each sequence run alone, untrained (= task arithmetic)
    // against trained.
    let untrained_moe = build_moe(&p, &untrained(p.spec("we_moe")), &[]);
    let mean = |m: &Model| -> f64 {
        calibration
            .iter()
            .map(|s| {
                let l = logits(m, std::slice::from_ref(s));
                let last = l.narrow(1, s.len() - 1, 1).unwrap();
                train::mean_entropy(&last)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            })
            .sum::<f64>()
            / calibration.len() as f64
    };
    let (before, after) = (mean(untrained_moe.model()), mean(trained.model()));
    assert!(after < before, "last-position entropy {before} -> {after}");
    // `entropy_positions=all` lowers the entropy over every position.
    let all = build_moe(
        &p,
        &spec
            .clone()
            .with_value("entropy_positions", ParamValue::Text("all".into())),
        &calibration,
    );
    let report = all.meta().training.clone().unwrap();
    assert_eq!(report.entropy_positions, EntropyPositions::All);
    let mean_all = |m: &Model| -> f64 {
        calibration
            .iter()
            .map(|s| {
                let l = logits(m, std::slice::from_ref(s));
                train::mean_entropy(&l).unwrap().to_scalar::<f32>().unwrap() as f64 * s.len() as f64
            })
            .sum::<f64>()
            / calibration.iter().map(Vec::len).sum::<usize>() as f64
    };
    let (before, after) = (mean_all(untrained_moe.model()), mean_all(all.model()));
    assert!(after < before, "all-position entropy {before} -> {after}");
    // The same seed trains the same routers.
    let again = build_moe(&p, &spec, &calibration);
    let ids = random_ids(1, 5, 48, 2);
    assert_eq!(
        max_diff(&logits(trained.model(), &ids), &logits(again.model(), &ids)),
        0.0
    );
}

#[test]
fn multiple_choice_inputs_train_on_the_entropy_of_the_choice() {
    let p = pool(2, false, 0.2, DType::F32);
    let ctx = |i: u64| random_ids(1, 5, 48, 300 + i).remove(0);
    let choice = |i: u64, n: usize| random_ids(1, n, 48, 400 + i).remove(0);
    let items: Vec<CalibrationItem> = (0..8)
        .map(|i| CalibrationItem {
            source: 0,
            input: CalibrationInput::Choices {
                context: ctx(i),
                choices: vec![choice(3 * i, 1), choice(3 * i + 1, 2), choice(3 * i + 2, 3)],
            },
        })
        .collect();
    let spec = p
        .spec("we_moe")
        .with("steps", 30.0)
        .with("lr", 1e-2)
        .with("batch_size", 8.0);
    // Independently, from one forward pass per context + choice: a choice's
    // score is the sum of log p(token | prefix) over its tokens, and the
    // input's entropy is that of the softmax over its choices' scores; the
    // `answer` objective adds −log Σ exp(score), the choices' mass (no two
    // inputs offer the same choices, so no diversity term).
    let choice_loss = |m: &Model, with_mass: bool| -> f64 {
        items
            .iter()
            .map(|item| {
                let CalibrationInput::Choices { context, choices } = &item.input else {
                    unreachable!()
                };
                let scores: Vec<f64> = choices
                    .iter()
                    .map(|c| {
                        let mut ids = context.clone();
                        ids.extend(c);
                        // Route on the context only, as training and scoring do.
                        let t = ids_tensor(std::slice::from_ref(&ids));
                        let l = m
                            .forward_with(
                                &t,
                                None,
                                &mut runtime::model::Hooks::routing_on(&[context.len()]),
                            )
                            .unwrap()
                            .squeeze(0)
                            .unwrap()
                            .to_vec2::<f32>()
                            .unwrap();
                        (context.len()..ids.len())
                            .map(|j| log_probs(&l[j - 1])[ids[j] as usize])
                            .sum()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let log_mass = max + scores.iter().map(|s| (s - max).exp()).sum::<f64>().ln();
                entropy_of_scores(&scores) - if with_mass { log_mass } else { 0.0 }
            })
            .sum::<f64>()
            / items.len() as f64
    };
    let untrained_moe = build_moe_on(&p, &untrained(p.spec("we_moe")), &[]);
    for (objective, with_mass) in [("last", false), ("answer", true)] {
        let spec = spec
            .clone()
            .with_value("entropy_positions", ParamValue::Text(objective.into()));
        let trained = build_moe_on(&p, &spec, &items);
        let report = trained.meta().training.clone().unwrap();
        let before = choice_loss(untrained_moe.model(), with_mass);
        // One batch holds all 8 inputs: the report evaluates exactly them.
        assert!(
            (report.entropy_before - before).abs() < 1e-4,
            "{objective}: report {} vs independent {before}",
            report.entropy_before
        );
        let after = choice_loss(trained.model(), with_mass);
        assert!(after < before, "{objective}: {before} -> {after}");
        assert!((report.entropy_after - after).abs() < 1e-4);
    }
}

/// Greedy decoding of `prompt` by `m`, routed on the prompt, as the
/// `answer` objective reads it: the log-probabilities of each prediction
/// (at most `ANSWER_TOKENS`), until one predicts `eos`; and whether it did.
fn greedy_answer(m: &Model, prompt: &[u32], eos: usize) -> (Vec<Vec<f64>>, bool) {
    let mut ids = prompt.to_vec();
    let mut preds = Vec::new();
    loop {
        let l = m
            .forward_with(
                &ids_tensor(std::slice::from_ref(&ids)),
                None,
                &mut runtime::model::Hooks::routing_on(&[prompt.len()]),
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let lp = log_probs(&l[ids.len() - 1]);
        let next = (0..lp.len())
            .max_by(|&a, &b| lp[a].total_cmp(&lp[b]))
            .unwrap();
        preds.push(lp);
        if next == eos {
            return (preds, true);
        }
        if preds.len() == train::ANSWER_TOKENS {
            return (preds, false);
        }
        ids.push(next as u32);
    }
}

/// Sets every checkpoint's EOS token of pool `p` to `eos`.
fn set_eos(p: &Pool, eos: u32) {
    for name in std::iter::once("base").chain(p.experts.iter().map(String::as_str)) {
        let path = p.path(name).join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["eos_token_id"] = eos.into();
        std::fs::write(&path, v.to_string()).unwrap();
    }
}

#[test]
fn answer_objective_is_the_entropy_of_the_greedy_answer() {
    let p = pool(2, false, 0.2, DType::F32);
    let calibration: Vec<Vec<u32>> = (0..12)
        .map(|i| random_ids(1, 4 + i % 5, 48, 90 + i as u64).remove(0))
        .collect();
    // Make EOS a token the untrained model often decodes, so that answers
    // end at different lengths: the most frequent of its first 4 tokens.
    let untrained_moe = build_moe(&p, &untrained(p.spec("we_moe")), &[]);
    let mut counts = HashMap::new();
    for prompt in &calibration {
        let (preds, _) = greedy_answer(untrained_moe.model(), prompt, usize::MAX);
        for lp in &preds[..4] {
            let next = (0..lp.len()).max_by(|&a, &b| lp[a].total_cmp(&lp[b]));
            *counts.entry(next.unwrap()).or_insert(0usize) += 1;
        }
    }
    let eos = counts.into_iter().max_by_key(|&(t, n)| (n, t)).unwrap().0;
    set_eos(&p, eos as u32);
    let spec = p
        .spec("we_moe")
        .with("steps", 30.0)
        .with("lr", 1e-2)
        .with("batch_size", 12.0);
    let trained = build_moe(&p, &spec, &calibration);
    let report = trained.meta().training.clone().unwrap();
    assert_eq!(report.entropy_positions, EntropyPositions::Answer);
    // Independently, one sequence at a time: the mean entropy of the
    // answer's predictions plus −ln(1 − p(EOS)) of the first.
    let untrained_moe = build_moe(&p, &untrained(p.spec("we_moe")), &[]);
    let objective = |m: &Model| -> (f64, usize) {
        let mut ended = 0;
        let total = calibration
            .iter()
            .map(|prompt| {
                let (preds, at_eos) = greedy_answer(m, prompt, eos);
                ended += usize::from(at_eos);
                let h: f64 = preds
                    .iter()
                    .map(|lp| -lp.iter().map(|x| x.exp() * x).sum::<f64>())
                    .sum();
                h / preds.len() as f64 - (1.0 - preds[0][eos].exp()).ln()
            })
            .sum::<f64>();
        (total / calibration.len() as f64, ended)
    };
    let (before, ended) = objective(untrained_moe.model());
    assert!(ended >= 2, "only {ended} answers end at EOS");
    assert!(
        (report.entropy_before - before).abs() < 1e-4,
        "report {} vs independent {before}",
        report.entropy_before
    );
    let (after, _) = objective(trained.model());
    assert!(after < before, "answer objective {before} -> {after}");
    assert!((report.entropy_after - after).abs() < 1e-4);
}

#[test]
fn sparse_we_moe_holds_the_pruned_counts() {
    let p = pool(2, false, 0.05, DType::F32);
    let spec = untrained(p.spec("sparse_we_moe"));
    let moe = build_moe(&p, &spec, &[]);
    let c = &p.config;
    let (d, m, l, t) = (c.hidden_size, c.intermediate_size, c.num_hidden_layers, 2);
    let counts = moe.param_counts().unwrap();
    // Each task-vector tensor of n distinct magnitudes keeps n − 1 − ⌊0.9(n−1)⌋.
    let n = d * m;
    let kept = n - 1 - (0.9 * (n - 1) as f64).floor() as usize;
    assert_eq!(counts.expert_nonzero, l * 3 * t * kept);
    assert_eq!(counts.expert_values, l * 3 * t * n);
    // One router for every block: Linear(d→d) + Linear(d→T), with biases.
    assert_eq!(counts.router, d * d + d + t * d + t);
    assert_eq!(counts.backbone, c.num_parameters());
    // bytes: every f32 value once.
    assert_eq!(
        moe.bytes(),
        4 * (counts.backbone + counts.expert_values + counts.router) as u64
    );
    // Entries kept are the task vector's own, the rest zero.
    let base = p.open("base").unwrap();
    let e1 = p.open("e1").unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let tau: Vec<f32> = e1
        .tensor(name)
        .unwrap()
        .to_f32_vec()
        .iter()
        .zip(base.tensor(name).unwrap().to_f32_vec())
        .map(|(a, b)| a - b)
        .collect();
    let LinearExperts::Dense { weight, .. } = &moe.parts().experts[1][1] else {
        panic!("dense experts")
    };
    let got = weight
        .get(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let threshold =
        sparse::quantile(&tau.iter().map(|x| x.abs()).collect::<Vec<_>>(), 0.9).unwrap();
    for (g, t) in got.iter().zip(&tau) {
        assert_eq!(*g, if t.abs() > threshold { *t } else { 0.0 });
    }
}

#[test]
fn rankone_moe_holds_t_k_rank_one_experts() {
    let p = pool(3, false, 0.05, DType::F32);
    let k = 4;
    let moe = build_moe(
        &p,
        &untrained(p.spec("rankone_moe")).with("rank_k", k as f64),
        &[],
    );
    let c = &p.config;
    let (d, m, l, t) = (c.hidden_size, c.intermediate_size, c.num_hidden_layers, 3);
    let counts = moe.param_counts().unwrap();
    // Per block and expert: k·(out + in) for each of gate (m×d), up (m×d), down (d×m).
    assert_eq!(counts.expert_values, l * t * 3 * k * (d + m));
    // One Linear(d→T·k) router per block.
    assert_eq!(counts.router, l * (d * t * k + t * k));
    assert_eq!(moe.meta().router.outputs, t * k);
    // The factors of one task vector rebuild its best rank-k approximation:
    // ‖τ − U·SV‖_F² equals the sum of its dropped squared singular values.
    let name = "model.layers.0.mlp.down_proj.weight";
    let base = p.open("base").unwrap().tensor(name).unwrap().to_f32_vec();
    let e2 = p.open("e2").unwrap().tensor(name).unwrap().to_f32_vec();
    let tau: Vec<f64> = e2.iter().zip(&base).map(|(a, b)| (a - b) as f64).collect();
    let LinearExperts::RankOne { u, sv } = &moe.parts().experts[0][2] else {
        panic!("rank-one experts")
    };
    let u1 = u.narrow(1, k, k).unwrap();
    let sv1 = sv.narrow(0, k, k).unwrap();
    let approx = u1
        .matmul(&sv1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let err: f64 = tau
        .iter()
        .zip(&approx)
        .map(|(a, b)| (a - *b as f64).powi(2))
        .sum();
    let mat = faer::Mat::<f64>::from_fn(d, m, |i, j| tau[i * m + j]);
    let s = crate::linalg::thin_svd(mat.as_ref()).unwrap().s;
    let dropped: f64 = s[k..].iter().map(|x| x * x).sum();
    assert!(
        (err - dropped).abs() < 1e-6 * dropped.max(1e-12) + 1e-9,
        "{err} vs {dropped}"
    );
}

#[test]
fn saved_moe_loads_back_with_identical_logits() {
    for dtype in [DType::F32, DType::BF16] {
        let p = pool(2, true, 0.05, dtype);
        for method in ["we_moe", "sparse_we_moe", "rankone_moe"] {
            let spec = untrained_method(&p, method);
            let moe = with_random_routers(&build_moe(&p, &spec, &[]), 0.5);
            let out = p.path(&format!("{method}-out"));
            moe.save(&out, &WriteOptions::default()).unwrap();
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(config["fusion_moe"]["method"], method);
            assert_eq!(
                config["fusion_moe"]["experts"],
                serde_json::json!(["e1", "e2"])
            );
            assert!(out.join("tokenizer.json").is_file());
            assert!(is_moe_folder(&out).unwrap() && !is_moe_folder(&p.path("base")).unwrap());
            let loaded = crate::load_model(&out, &ModelOptions::default()).unwrap();
            let ids = random_ids(2, 7, 48, 4);
            let d = max_diff(&logits(moe.model(), &ids), &logits(&loaded, &ids));
            assert_eq!(d, 0.0, "{method} {dtype:?}");
            let again = MoeModel::load(&out, &ModelOptions::default()).unwrap();
            assert_eq!(again.meta(), moe.meta());
            assert_eq!(again.bytes(), moe.bytes());
        }
    }
}

#[test]
fn router_checkpoint_replaces_training() {
    let p = pool(2, false, 0.1, DType::F32);
    let calibration = random_ids(8, 6, 48, 77);
    let spec = p
        .spec("we_moe")
        .with("steps", 5.0)
        .with("lr", 1e-2)
        .with("batch_size", 2.0);
    let trained = build_moe(&p, &spec, &calibration);
    trained
        .save(&p.path("trained"), &WriteOptions::default())
        .unwrap();
    let spec = p
        .spec("we_moe")
        .with_value("router_checkpoint", ParamValue::Text("trained".into()));
    let loaded = build_moe(&p, &spec, &[]);
    let ids = random_ids(2, 5, 48, 8);
    assert_eq!(
        max_diff(
            &logits(trained.model(), &ids),
            &logits(loaded.model(), &ids)
        ),
        0.0
    );
    assert_eq!(loaded.meta().training, trained.meta().training);
    // A checkpoint of another method is refused, naming the parameter.
    let spec = p
        .spec("sparse_we_moe")
        .with_value("router_checkpoint", ParamValue::Text("trained".into()));
    let e = build(&spec, &|n: &str| p.open(n), &[], &Device::Cpu, false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("router_checkpoint") && e.contains("we_moe"),
        "{e}"
    );
}

#[test]
fn training_needs_calibration_inputs() {
    let p = pool(1, false, 0.1, DType::F32);
    let e = build(
        &p.spec("we_moe"),
        &|n: &str| p.open(n),
        &[],
        &Device::Cpu,
        false,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("`steps`") && e.contains("--calibration"), "{e}");
}

#[test]
fn merge_ids_cover_spec_seed_and_calibration() {
    let p = pool(2, false, 0.1, DType::F32);
    let open = |n: &str| p.open(n);
    let cal = texts(&random_ids(3, 4, 48, 1));
    let spec = p.spec("we_moe");
    let id = merge_id(&spec, &open, &cal).unwrap();
    assert_eq!(id.len(), 32);
    assert_eq!(id, merge_id(&spec, &open, &cal).unwrap());
    assert_ne!(id, merge_id(&spec, &open, &cal[..2]).unwrap());
    let mut seeded = spec.clone();
    seeded.seed = Some(3);
    assert_ne!(id, merge_id(&seeded, &open, &cal).unwrap());
    assert_ne!(
        id,
        merge_id(&spec.clone().with("lr", 1e-3), &open, &cal).unwrap()
    );
    // Untrained routers do not depend on the calibration inputs.
    let fixed = untrained(p.spec("we_moe"));
    assert_eq!(
        merge_id(&fixed, &open, &cal).unwrap(),
        merge_id(&fixed, &open, &[]).unwrap()
    );
}

#[test]
fn scoring_routes_on_the_context_and_ignores_padding() {
    // TextModel scores a routed model with each sequence routed on its
    // context: batched (right-padded) scores equal single ones, and equal
    // prefilling the context into a KV cache and feeding the continuation.
    let p = pool(2, false, 0.05, DType::F32);
    let moe = with_random_routers(&build_moe(&p, &untrained(p.spec("we_moe")), &[]), 0.5);
    let out = p.path("moe-out");
    moe.save(&out, &WriteOptions::default()).unwrap();
    let tm = crate::load_text_model(&out, &ModelOptions::default()).unwrap();
    let pairs: Vec<(String, String)> = [
        ("add: 1 + 2 =", " 3"),
        ("a much longer context than the others:", " yes"),
        ("x", " abcdef"),
    ]
    .iter()
    .map(|(c, x)| (c.to_string(), x.to_string()))
    .collect();
    let batch = tm.loglikelihood_batch(&pairs).unwrap();
    let m = tm.model();
    for ((c, x), b) in pairs.iter().zip(&batch) {
        let single = tm.loglikelihood(c, x).unwrap();
        assert!(
            (single.logprob - b.logprob).abs() < 1e-4,
            "{c:?}: {single:?} vs {b:?}"
        );
        let ctx = tm.encode(c).unwrap();
        let cont = tm.tokenizer().encode(x).unwrap();
        let mut cache = m.new_cache();
        let first = m
            .forward_last(&ids_tensor(&[ctx]), Some(&mut cache))
            .unwrap();
        let mut rows = vec![first];
        if cont.len() > 1 {
            let rest = m
                .forward(
                    &ids_tensor(&[cont[..cont.len() - 1].to_vec()]),
                    Some(&mut cache),
                )
                .unwrap()
                .squeeze(0)
                .unwrap();
            rows.push(rest);
        }
        let lp = candle_nn::ops::log_softmax(&Tensor::cat(&rows, 0).unwrap(), 1).unwrap();
        let want: f64 = cont
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                lp.get(i)
                    .unwrap()
                    .get(t as usize)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            })
            .sum();
        assert!(
            (single.logprob - want).abs() < 1e-4,
            "{c:?}: {} vs cached {want}",
            single.logprob
        );
    }
    // Embeddings of a padded batch equal those of each text alone.
    let texts = vec!["short".to_string(), "a longer text to embed".to_string()];
    let (both, _) = tm.embed(&texts).unwrap();
    for (t, e) in texts.iter().zip(&both) {
        let (alone, _) = tm.embed(std::slice::from_ref(t)).unwrap();
        let d = e
            .iter()
            .zip(&alone[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "{t:?}: {d}");
    }
}
