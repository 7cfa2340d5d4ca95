//! Parity of `runtime::encoder::Encoder` with candle-transformers' `bert`
//! on the same random weights (f32): the last hidden states of a padded
//! batch under an attention mask, with token types, within 1e-4 max abs at
//! every real token; exact GELU (`gelu`) and the tanh form (`gelu_new`);
//! weights by Hugging Face names with and without the `bert.` prefix, read
//! from a safetensors file with the int64 `embeddings.position_ids` buffer
//! and the pooler that sentence-transformers checkpoints carry.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert;
use common::max_abs_diff;
use runtime::checkpoint::Checkpoint;
use runtime::encoder::{Encoder, EncoderConfig};
use runtime::model::random::random_tensors;
use runtime::model::{Hooks, ModelOptions};

const TOL: f32 = 1e-4;

fn config_json(act: &str) -> String {
    format!(
        r#"{{"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 50,
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 48, "hidden_act": "{act}", "hidden_dropout_prob": 0.1,
            "max_position_embeddings": 16, "type_vocab_size": 2, "initializer_range": 0.02,
            "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute"}}"#
    )
}

/// Random weights by HF name (layer norms near 1, biases nonzero).
fn random_weights(c: &EncoderConfig, seed: u64) -> HashMap<String, Tensor> {
    random_tensors(c.tensor_shapes(), seed, 0.2).unwrap()
}

/// Our hidden states and candle-transformers' on a padded batch, compared
/// at the real tokens (padding positions are never read).
fn parity(act: &str, prefix: &str) {
    let json = config_json(act);
    let cfg = EncoderConfig::from_json(&json, std::path::Path::new("config.json")).unwrap();
    let weights = random_weights(&cfg, 7);
    let prefixed: HashMap<String, Tensor> = weights
        .iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
        .collect();
    let ours =
        Encoder::from_tensors(cfg.clone(), prefixed.clone(), &ModelOptions::default()).unwrap();
    // candle-transformers names the tanh form `geluapproximate`.
    let theirs_cfg: bert::Config =
        serde_json::from_str(&json.replace("gelu_new", "geluapproximate")).unwrap();
    let vb = VarBuilder::from_tensors(prefixed, DType::F32, &Device::Cpu);
    let theirs = bert::BertModel::load(vb, &theirs_cfg).unwrap();

    let dev = Device::Cpu;
    let ids = Tensor::new(
        &[[2u32, 17, 33, 9, 40, 3, 0], [5, 8, 13, 21, 0, 0, 0]],
        &dev,
    )
    .unwrap();
    let types = Tensor::new(&[[0u32, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]], &dev).unwrap();
    let a = ours
        .forward(&ids, Some(&types), Some(&mask), &mut Hooks::default())
        .unwrap();
    let b = theirs.forward(&ids, &types, Some(&mask)).unwrap();
    assert_eq!(a.dims(), [2, 7, 32]);
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    assert!(
        scale.to_scalar::<f32>().unwrap() > 0.5,
        "trivial hidden states"
    );
    for (row, len) in [(0usize, 6usize), (1, 4)] {
        let x = a.get(row).unwrap().narrow(0, 0, len).unwrap();
        let y = b.get(row).unwrap().narrow(0, 0, len).unwrap();
        let d = max_abs_diff(&x, &y);
        assert!(d < TOL, "{act}{prefix}: row {row} differs by {d}");
    }
    // Without a mask and token types: every position.
    let a = ours
        .forward(&ids, None, None, &mut Hooks::default())
        .unwrap();
    let b = theirs
        .forward(&ids, &ids.zeros_like().unwrap(), None)
        .unwrap();
    let d = max_abs_diff(&a, &b);
    assert!(d < TOL, "{act}{prefix}: unmasked differs by {d}");
    // The differentiable forward computes the same.
    let diff = Encoder::from_tensors(
        cfg,
        weights,
        &ModelOptions {
            differentiable: true,
            ..ModelOptions::default()
        },
    )
    .unwrap();
    let c = diff
        .forward(&ids, None, None, &mut Hooks::default())
        .unwrap();
    let d = max_abs_diff(&c, &b);
    assert!(d < TOL, "{act}{prefix}: differentiable differs by {d}");
}

#[test]
fn bert_exact_gelu_matches_candle_transformers() {
    parity("gelu", "");
}

#[test]
fn bert_tanh_gelu_with_bert_prefix_matches_candle_transformers() {
    parity("gelu_new", "bert.");
}

#[test]
fn a_checkpoint_with_buffers_and_a_pooler_loads_and_every_linear_input_is_captured() {
    let dir = tempfile::tempdir().unwrap();
    let json = config_json("gelu");
    std::fs::write(dir.path().join("config.json"), &json).unwrap();
    let cfg = EncoderConfig::from_json(&json, std::path::Path::new("config.json")).unwrap();
    let mut weights = random_weights(&cfg, 3);
    let dev = Device::Cpu;
    weights.insert(
        "pooler.dense.weight".into(),
        Tensor::zeros((32, 32), DType::F32, &dev).unwrap(),
    );
    weights.insert(
        "pooler.dense.bias".into(),
        Tensor::zeros(32, DType::F32, &dev).unwrap(),
    );
    weights.insert(
        "embeddings.position_ids".into(),
        Tensor::arange(0i64, 16, &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
    );
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    let ck = Checkpoint::open("tiny-bert", dir.path()).unwrap();
    // The buffer is recorded, not a weight.
    assert!(ck.entry("embeddings.position_ids").is_none());
    assert_eq!(ck.buffers()["embeddings.position_ids"], "I64");
    let enc = Encoder::load(dir.path(), &ModelOptions::default()).unwrap();
    let mut seen = Vec::new();
    let mut capture = |name: &str, x: &Tensor| -> candle_core::Result<()> {
        seen.push((name.to_string(), x.dims().to_vec()));
        Ok(())
    };
    let ids = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
    enc.forward(&ids, None, None, &mut Hooks::capturing(&mut capture))
        .unwrap();
    assert_eq!(seen.len(), 2 * 6);
    assert_eq!(
        seen[0],
        (
            "encoder.layer.0.attention.self.query.weight".to_string(),
            vec![1, 3, 32]
        )
    );
    assert_eq!(
        seen[5],
        (
            "encoder.layer.0.output.dense.weight".to_string(),
            vec![1, 3, 48]
        )
    );
    // Inputs it cannot take are named.
    let long = Tensor::zeros((1, 17), DType::U32, &dev).unwrap();
    let e = enc
        .forward(&long, None, None, &mut Hooks::default())
        .unwrap_err();
    assert!(e.to_string().contains("17 tokens"), "{e}");
    let oov = Tensor::new(&[[1u32, 50]], &dev).unwrap();
    let e = enc
        .forward(&oov, None, None, &mut Hooks::default())
        .unwrap_err();
    assert!(e.to_string().contains("token id 50"), "{e}");
}
