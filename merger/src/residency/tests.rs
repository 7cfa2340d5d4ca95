//! Compression checked against values worked out by hand: a delta of known
//! singular values, a sparse delta of known entries, and a whole model
//! whose deltas have rank 2 (so the truncated SVD at full energy must serve
//! the merge's own logits).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use runtime::checkpoint::Checkpoint;
use runtime::model::random::{random_weights, write_checkpoint};
use runtime::model::{Model, ModelConfig, ModelOptions, TensorDelta, EMBED};

use super::{compress, truncated_rank, Compressed};
use crate::bounds::Cancel;
use crate::moe::testutil::max_diff;
use crate::spec::residency::{Form, Residency, Truncation};

const Q: &str = "model.layers.0.self_attn.q_proj.weight";
const NORM: &str = "model.layers.0.input_layernorm.weight";

struct Fixture {
    _dir: tempfile::TempDir,
    config: ModelConfig,
    base: Arc<Checkpoint>,
    weights: HashMap<String, Tensor>,
}

fn fixture(tie: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = ModelConfig::from_json(
        &format!(
            r#"{{"model_type": "llama", "vocab_size": 40, "hidden_size": 32,
                "intermediate_size": 48, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2,
                "tie_word_embeddings": {tie}}}"#
        ),
        dir.path(),
    )
    .unwrap();
    let weights = random_weights(&config, 7, 0.05).unwrap();
    let path = dir.path().join("base");
    write_checkpoint(&path, &config, &weights, DType::F32).unwrap();
    let base = Checkpoint::open("base", &path).unwrap();
    Fixture {
        _dir: dir,
        config,
        base,
        weights,
    }
}

/// `w + delta` for the tensors `deltas` names (given as row-major values).
fn merged_with(
    weights: &HashMap<String, Tensor>,
    deltas: &[(&str, Vec<f32>)],
) -> HashMap<String, Tensor> {
    let mut out = weights.clone();
    for (name, d) in deltas {
        let w = &weights[*name];
        let d = Tensor::from_vec(d.clone(), w.dims(), &Device::Cpu).unwrap();
        out.insert(name.to_string(), (w + d).unwrap());
    }
    out
}

fn run(merged: &HashMap<String, Tensor>, f: &Fixture, r: &Residency) -> Compressed {
    compress(merged, &f.base, r, DType::F32, &Device::Cpu, &Cancel::new()).unwrap()
}

fn dense_of(c: &Compressed, name: &str) -> Vec<f32> {
    c.delta
        .dense(name)
        .unwrap()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn truncated_rank_keeps_the_asked_energy() {
    // σ = 3, 2, 1: energies 9, 4, 1 of 14.
    let s = [3.0, 2.0, 1.0];
    assert_eq!(truncated_rank(&s, Truncation::Energy(0.6)), 1); // 9/14 = 0.64
    assert_eq!(truncated_rank(&s, Truncation::Energy(0.65)), 2); // 13/14 = 0.93
    assert_eq!(truncated_rank(&s, Truncation::Energy(0.95)), 3);
    assert_eq!(truncated_rank(&s, Truncation::Energy(1.0)), 3);
    assert_eq!(truncated_rank(&s, Truncation::Rank(2)), 2);
    assert_eq!(truncated_rank(&s, Truncation::Rank(9)), 3);
    // Values under 1e-5·σ₁ are rounding noise, never kept.
    let noisy = [3.0, 2.0, 1.0, 1e-6, 1e-7];
    assert_eq!(truncated_rank(&noisy, Truncation::Energy(1.0)), 3);
    assert_eq!(truncated_rank(&noisy, Truncation::Rank(5)), 3);
}

/// ΔW = 3·e₀f₁ᵀ + 1·e₂f₃ᵀ on the 32×32 q_proj: singular values 3 and 1.
fn two_components() -> Vec<f32> {
    let mut d = vec![0f32; 32 * 32];
    d[1] = 3.0;
    d[2 * 32 + 3] = 1.0;
    d
}

#[test]
fn lowrank_truncates_to_the_energy_with_the_error_of_the_dropped_values() {
    let f = fixture(false);
    let merged = merged_with(&f.weights, &[(Q, two_components())]);
    // Energy 0.85 keeps σ₁ = 3 only (9/10 of the energy): the error is
    // σ₂ / √(σ₁² + σ₂²) = 1/√10.
    let c = run(&merged, &f, &Residency::lowrank_energy(0.85));
    assert_eq!(c.report.tensors, 1, "only the changed tensor is held");
    let rank = c.report.rank.unwrap();
    assert_eq!((rank.min, rank.max), (1, 1));
    assert!((c.report.max_error - 1.0 / 10f64.sqrt()).abs() < 1e-6);
    let d = dense_of(&c, Q);
    assert!((d[1] - 3.0).abs() < 1e-6 && d[2 * 32 + 3].abs() < 1e-6);
    // Rank 1 (32 + 32) floats instead of 1024.
    assert_eq!(c.report.bytes, 64 * 4);
    let all: usize = f.weights.values().map(Tensor::elem_count).sum();
    assert_eq!(c.report.dense_bytes, 4 * all as u64);

    // Full energy keeps both, exactly.
    let c = run(&merged, &f, &Residency::lowrank_energy(1.0));
    assert_eq!(c.report.rank.unwrap().max, 2);
    assert!(c.report.max_error < 1e-6, "{}", c.report.max_error);
    let d = dense_of(&c, Q);
    assert!(d
        .iter()
        .zip(two_components())
        .all(|(a, b)| (a - b).abs() < 1e-6));
}

#[test]
fn a_rank_that_saves_nothing_falls_back_to_the_dense_delta() {
    let f = fixture(false);
    // A full-rank diagonal: 16 · (32 + 32) = 1024 = 32 · 32 floats, no
    // smaller than dense.
    let mut d = vec![0f32; 32 * 32];
    for i in 0..32 {
        d[i * 32 + i] = 1.0 + 0.1 * i as f32;
    }
    let merged = merged_with(&f.weights, &[(Q, d)]);
    let c = run(&merged, &f, &Residency::lowrank_rank(16));
    assert_eq!((c.report.tensors, c.report.dense_tensors), (1, 1));
    assert!(c.report.rank.is_none());
    assert!(matches!(c.delta.tensors()[0].1, TensorDelta::Dense(_)));
    assert!(c.report.max_error < 1e-7);
}

#[test]
fn sparse_keeps_the_largest_entries_and_one_dimensional_deltas_stay_dense() {
    let f = fixture(false);
    // Eleven entries of 1 on the diagonal, five of 0.01 off it; density
    // 0.01 of 1024 entries keeps ⌈10.24⌉ = 11.
    let mut d = vec![0f32; 32 * 32];
    for i in 0..11 {
        d[i * 32 + i] = 1.0;
    }
    for i in 0..5 {
        d[i * 32 + 20 + i] = if i % 2 == 0 { 0.01 } else { -0.01 };
    }
    let norm: Vec<f32> = (0..32).map(|i| i as f32 * 0.1).collect();
    let merged = merged_with(&f.weights, &[(Q, d.clone()), (NORM, norm.clone())]);
    let c = run(&merged, &f, &Residency::sparse(0.01));
    assert_eq!((c.report.tensors, c.report.dense_tensors), (2, 1));
    let kept = dense_of(&c, Q);
    for (i, (&k, &want)) in kept.iter().zip(&d).enumerate() {
        let want = if want.abs() == 1.0 { want } else { 0.0 };
        assert!((k - want).abs() < 1e-6, "entry {i}: {k} vs {want}");
    }
    let expected = (5.0 * 1e-4f64).sqrt() / (11.0 + 5.0 * 1e-4f64).sqrt();
    assert!((c.report.max_error - expected).abs() < 1e-6);
    // The norm's delta is held as it is.
    let held = dense_of(&c, NORM);
    assert!(held.iter().zip(&norm).all(|(a, b)| (a - b).abs() < 1e-6));
    // 11 entries × (4 + 4 + 4) bytes, 33 row offsets, 32 floats of the norm.
    assert_eq!(c.report.bytes, 11 * 12 + 33 * 4 + 32 * 4);
    assert_eq!(c.report.density, Some(0.01));
    assert_eq!(c.report.form, Form::Sparse);
}

/// A rank-2 delta on every 2-D tensor (and a shift on every norm), from
/// seeded vectors.
fn rank_two_merge(f: &Fixture) -> HashMap<String, Tensor> {
    let mut deltas = Vec::new();
    let mut names: Vec<&String> = f.weights.keys().collect();
    names.sort();
    for (t, name) in names.into_iter().enumerate() {
        let dims = f.weights[name].dims().to_vec();
        let wave = |i: usize, k: usize| ((i * 7 + k * 13 + t * 3) % 11) as f32 / 11.0 - 0.5;
        let d: Vec<f32> = match *dims.as_slice() {
            [out, inp] => (0..out * inp)
                .map(|x| {
                    let (i, j) = (x / inp, x % inp);
                    0.02 * (wave(i, 0) * wave(j, 1) + wave(i, 2) * wave(j, 3))
                })
                .collect(),
            [n] => (0..n).map(|i| 0.01 * wave(i, 4)).collect(),
            _ => unreachable!(),
        };
        deltas.push((name.as_str(), d));
    }
    merged_with(&f.weights, &deltas)
}

fn logits_match(tie: bool, residency: Residency) {
    let f = fixture(tie);
    let merged = rank_two_merge(&f);
    let c = run(&merged, &f, &residency);
    assert_eq!(c.report.rank.unwrap().max, 2);
    assert!(c.report.max_error < 1e-5, "{}", c.report.max_error);
    assert!(c.report.bytes * 4 < c.report.dense_bytes, "{:?}", c.report);
    let opts = ModelOptions::default();
    let base = Model::from_tensors(f.config.clone(), f.weights.clone(), &opts).unwrap();
    let want = Model::from_tensors(f.config.clone(), merged, &opts).unwrap();
    let held = Model::with_delta(&base, Arc::new(c.delta)).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 33, 2]], &Device::Cpu).unwrap();
    let a = want.forward(&ids, None).unwrap();
    let b = held.forward(&ids, None).unwrap();
    let diff = max_diff(&a, &b);
    assert!(diff < 1e-5, "tie={tie}: logits differ by {diff}");
}

#[test]
fn a_lowrank_delta_at_full_energy_serves_the_merges_logits() {
    logits_match(false, Residency::lowrank_energy(1.0));
}

#[test]
fn a_fixed_rank_finds_the_leading_triplets_without_the_full_svd() {
    // Rank 2 + 10 oversampling columns of 32-48 wide matrices: the
    // randomized range finder, exact on a rank-2 delta.
    logits_match(false, Residency::lowrank_rank(2));
}

#[test]
fn a_lowrank_delta_of_a_tied_embedding_serves_the_merges_logits() {
    logits_match(true, Residency::lowrank_energy(1.0));
}

#[test]
fn an_unchanged_merge_holds_nothing_and_a_cancelled_one_stops() {
    let f = fixture(false);
    let c = run(&f.weights, &f, &Residency::sparse(0.1));
    assert_eq!((c.report.tensors, c.report.bytes), (0, 0));
    let cancel = Cancel::new();
    cancel.cancel();
    let merged = rank_two_merge(&f);
    let err = compress(
        &merged,
        &f.base,
        &Residency::lowrank_energy(0.9),
        DType::F32,
        &Device::Cpu,
        &cancel,
    )
    .err()
    .unwrap();
    assert!(matches!(err, crate::error::MergeError::Cancelled));
    assert!(merged.contains_key(EMBED));
}
