//! Parity of `merger::model` with candle-transformers' Llama and Qwen2
//! implementations on the same random checkpoints (f32): logits of every
//! position, the last position after a prompt, and incremental decoding with
//! each implementation's KV cache, within 1e-4 max abs. Grouped-query and
//! plain multi-head attention, tied and untied embeddings, Qwen2's q/k/v
//! biases.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2};
use common::max_abs_diff;
use runtime::model::random::random_weights;
use runtime::model::{Hooks, Model, ModelConfig, ModelOptions};

const TOL: f32 = 1e-4;

/// A prompt of two rows and the tokens decoded after it.
const PROMPT: [[u32; 7]; 2] = [[1, 17, 33, 2, 60, 5, 9], [40, 3, 3, 12, 51, 0, 27]];
const CONTINUATION: [[u32; 4]; 2] = [[8, 44, 19, 63], [30, 1, 58, 7]];

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

fn prompt() -> Tensor {
    ids(&[&PROMPT[0], &PROMPT[1]])
}

fn step(i: usize) -> Tensor {
    ids(&[&[CONTINUATION[0][i]], &[CONTINUATION[1][i]]])
}

/// Asserts parity, and that the logits are not trivially small (so the
/// tolerance means something).
fn assert_close(what: &str, ours: &Tensor, theirs: &Tensor) {
    let d = max_abs_diff(ours, theirs);
    let scale = theirs
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("{what}: max abs diff {d:.2e} (max |logit| {scale:.2})");
    assert!(scale > 0.5, "{what}: logits too small to compare ({scale})");
    assert!(d < TOL, "{what}: max abs diff {d} exceeds {TOL}");
}

/// Our model and the weights it was built from, shared with the reference.
fn ours(config_json: &str, seed: u64) -> (Model, HashMap<String, Tensor>) {
    let c = ModelConfig::from_json(config_json, Path::new("config.json")).unwrap();
    let weights = random_weights(&c, seed, 0.1).unwrap();
    let m = Model::from_tensors(c, weights.clone(), &ModelOptions::default()).unwrap();
    (m, weights)
}

fn llama_json(heads: usize, kv_heads: usize, tie: bool) -> String {
    format!(
        r#"{{"model_type":"llama","vocab_size":64,"hidden_size":64,"intermediate_size":96,
        "num_hidden_layers":3,"num_attention_heads":{heads},"num_key_value_heads":{kv_heads},
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":128,
        "tie_word_embeddings":{tie}}}"#
    )
}

fn llama_reference(m: &Model, weights: HashMap<String, Tensor>) -> (llama::Llama, llama::Config) {
    let c = m.config();
    let cfg = llama::Config {
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        vocab_size: c.vocab_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads,
        use_flash_attn: false,
        rms_norm_eps: c.rms_norm_eps,
        rope_theta: c.rope_theta as f32,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: c.max_position_embeddings,
        tie_word_embeddings: c.tie_word_embeddings,
    };
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    (llama::Llama::load(vb, &cfg).unwrap(), cfg)
}

fn llama_parity(heads: usize, kv_heads: usize, tie: bool) {
    let label = format!("llama heads={heads} kv={kv_heads} tie={tie}");
    let (m, weights) = ours(&llama_json(heads, kv_heads, tie), 7);
    let (reference, cfg) = llama_reference(&m, weights);

    // Every position of a full forward, against the reference decoding one
    // token at a time with its cache (its forward returns the last position).
    let full = m.forward(&prompt(), None).unwrap();
    let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    for (t, (&a, &b)) in PROMPT[0].iter().zip(&PROMPT[1]).enumerate() {
        let tok = ids(&[&[a], &[b]]);
        let theirs = reference.forward(&tok, t, &mut cache).unwrap();
        assert_close(
            &format!("{label}: position {t}"),
            &full.i((.., t, ..)).unwrap(),
            &theirs,
        );
    }

    // The prompt in one pass, then incremental decoding, each with its cache.
    let mut ours_cache = m.new_cache();
    let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    let a = m.forward_last(&prompt(), Some(&mut ours_cache)).unwrap();
    let b = reference.forward(&prompt(), 0, &mut cache).unwrap();
    assert_close(&format!("{label}: prompt"), &a, &b);
    for i in 0..CONTINUATION[0].len() {
        let pos = PROMPT[0].len() + i;
        let a = m.forward_last(&step(i), Some(&mut ours_cache)).unwrap();
        let b = reference.forward(&step(i), pos, &mut cache).unwrap();
        assert_close(&format!("{label}: decode step {i}"), &a, &b);
    }
}

#[test]
fn llama_gqa_untied() {
    llama_parity(8, 2, false);
}

#[test]
fn llama_gqa_tied() {
    llama_parity(4, 2, true);
}

#[test]
fn llama_multi_head_tied() {
    llama_parity(4, 4, true);
}

fn qwen2_json(tie: bool) -> String {
    format!(
        r#"{{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","vocab_size":64,
        "hidden_size":64,"intermediate_size":96,"num_hidden_layers":3,"num_attention_heads":8,
        "num_key_value_heads":2,"rms_norm_eps":1e-6,"rope_theta":1000000.0,
        "max_position_embeddings":128,"sliding_window":128,"max_window_layers":3,
        "use_sliding_window":false,"hidden_act":"silu","tie_word_embeddings":{tie}}}"#
    )
}

fn qwen2_parity(tie: bool) {
    let label = format!("qwen2 heads=8 kv=2 tie={tie}");
    let (m, weights) = ours(&qwen2_json(tie), 11);
    assert!(m.config().qkv_bias);
    assert!(weights.contains_key("model.layers.0.self_attn.q_proj.bias"));
    let c = m.config();
    let cfg = qwen2::Config {
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads,
        max_position_embeddings: c.max_position_embeddings,
        sliding_window: c.max_position_embeddings,
        max_window_layers: c.num_hidden_layers,
        tie_word_embeddings: c.tie_word_embeddings,
        rope_theta: c.rope_theta,
        rms_norm_eps: c.rms_norm_eps,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);

    // Hidden states and logits of every position, from the reference's base
    // model and the (tied or untied) output projection.
    let mut base = qwen2::Model::new(&cfg, vb.clone()).unwrap();
    let theirs_hidden = base.forward(&prompt(), 0, None).unwrap();
    let ours_hidden = m
        .hidden_states(&prompt(), None, &mut Hooks::default())
        .unwrap();
    let d = max_abs_diff(&ours_hidden, &theirs_hidden);
    assert!(d < TOL, "{label}: hidden states differ by {d}");
    let head = if tie {
        &weights["model.embed_tokens.weight"]
    } else {
        &weights["lm_head.weight"]
    };
    let theirs_logits = candle_nn::Linear::new(head.clone(), None)
        .forward(&theirs_hidden)
        .unwrap();
    assert_close(
        &format!("{label}: all positions"),
        &m.forward(&prompt(), None).unwrap(),
        &theirs_logits,
    );

    // Prompt then incremental decoding through the reference's causal LM.
    let mut lm = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
    let mut cache = m.new_cache();
    let a = m.forward_last(&prompt(), Some(&mut cache)).unwrap();
    let b = lm.forward(&prompt(), 0).unwrap().squeeze(1).unwrap();
    assert_close(&format!("{label}: prompt"), &a, &b);
    for i in 0..CONTINUATION[0].len() {
        let pos = PROMPT[0].len() + i;
        let a = m.forward_last(&step(i), Some(&mut cache)).unwrap();
        let b = lm.forward(&step(i), pos).unwrap().squeeze(1).unwrap();
        assert_close(&format!("{label}: decode step {i}"), &a, &b);
    }
}

#[test]
fn qwen2_gqa_tied_with_biases() {
    qwen2_parity(true);
}

#[test]
fn qwen2_gqa_untied_with_biases() {
    qwen2_parity(false);
}

/// Our cache: a prompt in two chunks, then single tokens, equals one full
/// forward over the whole sequence at every position.
#[test]
fn chunked_and_incremental_decoding_equal_a_full_forward() {
    let (m, _) = ours(&qwen2_json(false), 3);
    let whole: Vec<Vec<u32>> = (0..2)
        .map(|r| PROMPT[r].iter().chain(&CONTINUATION[r]).copied().collect())
        .collect();
    let full = m.forward(&ids(&[&whole[0], &whole[1]]), None).unwrap();
    let mut cache = m.new_cache();
    let mut parts = Vec::new();
    for (from, to) in [(0, 3), (3, 7), (7, 8), (8, 9), (9, 10), (10, 11)] {
        let chunk = ids(&[&whole[0][from..to], &whole[1][from..to]]);
        parts.push(m.forward(&chunk, Some(&mut cache)).unwrap());
    }
    assert_eq!(cache.len(), 11);
    let inc = Tensor::cat(&parts, 1).unwrap();
    assert_close("chunked vs full", &inc, &full);
}
