//! Greedy generation on `runtime::model` against candle-transformers' Llama
//! on the same weights: the loops `fusion bench generate` times and the
//! criterion bench `benches/generate.rs` (which includes this file) runs.
//!
//! Both loops are the plain greedy decoder: the prompt in one pass filling
//! the KV cache, then one token at a time, each the argmax of the last
//! position's logits.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::llama;
use runtime::model::random::random_weights;
use runtime::model::{Model, ModelConfig, ModelOptions};

/// The benchmarked model shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// Demo-base-like: hidden 128, 4 layers of 4 heads, MLP 384, the
    /// byte-level vocabulary of 262 (about 0.9M parameters).
    Tiny,
    /// A 110M-parameter Llama: hidden 768, 12 layers of 12 heads, MLP 2048,
    /// vocabulary 32000, tied embeddings.
    M100,
}

impl Size {
    /// The name used on the command line and in bench ids.
    pub fn name(self) -> &'static str {
        match self {
            Size::Tiny => "tiny",
            Size::M100 => "100M",
        }
    }

    /// The architecture.
    pub fn config(self) -> ModelConfig {
        let (vocab, hidden, inter, layers, heads) = match self {
            Size::Tiny => (262, 128, 384, 4, 4),
            Size::M100 => (32000, 768, 2048, 12, 12),
        };
        let json = format!(
            r#"{{"model_type":"llama","vocab_size":{vocab},"hidden_size":{hidden},
            "intermediate_size":{inter},"num_hidden_layers":{layers},"num_attention_heads":{heads},
            "num_key_value_heads":{heads},"rms_norm_eps":1e-5,"rope_theta":10000.0,
            "max_position_embeddings":2048,"tie_word_embeddings":true}}"#
        );
        ModelConfig::from_json(&json, Path::new("bench config")).expect("a valid bench config")
    }
}

/// Both implementations built on one set of random weights (shared
/// storage: the reference holds the same tensors, not a copy).
pub struct Pair {
    /// Our runtime.
    pub ours: Model,
    /// candle-transformers' Llama.
    pub reference: llama::Llama,
    reference_config: llama::Config,
    device: Device,
}

impl Pair {
    /// Random weights (N(0, 0.02²)) for `size`, seeded, on `device` in f32.
    pub fn new(size: Size, seed: u64, device: &Device) -> anyhow::Result<Pair> {
        let config = size.config();
        let weights = random_weights(&config, seed, 0.02)?;
        Self::from_weights(config, weights, device)
    }

    /// Both implementations on `weights` (by tensor name, as a Llama
    /// checkpoint stores them) of a model of `config`, on `device` in f32.
    pub fn from_weights(
        config: ModelConfig,
        weights: HashMap<String, Tensor>,
        device: &Device,
    ) -> anyhow::Result<Pair> {
        let weights: HashMap<String, Tensor> = weights
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?.to_device(device)?)))
            .collect::<candle_core::Result<_>>()?;
        let reference_config = llama::Config {
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            vocab_size: config.vocab_size,
            num_hidden_layers: config.num_hidden_layers,
            num_attention_heads: config.num_attention_heads,
            num_key_value_heads: config.num_key_value_heads,
            use_flash_attn: false,
            rms_norm_eps: config.rms_norm_eps,
            rope_theta: config.rope_theta as f32,
            bos_token_id: None,
            eos_token_id: None,
            rope_scaling: None,
            max_position_embeddings: config.max_position_embeddings,
            tie_word_embeddings: config.tie_word_embeddings,
        };
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, device);
        let reference = llama::Llama::load(vb, &reference_config)?;
        let opts = ModelOptions {
            device: device.clone(),
            dtype: Some(DType::F32),
            differentiable: false,
        };
        let ours = Model::from_tensors(config, weights, &opts)?;
        Ok(Pair {
            ours,
            reference,
            reference_config,
            device: device.clone(),
        })
    }

    /// A deterministic prompt of `len` token ids.
    pub fn prompt(&self, len: usize) -> Vec<u32> {
        let vocab = self.ours.config().vocab_size as u64;
        (0..len as u64)
            .map(|i| ((i * 7919 + 13) % vocab) as u32)
            .collect()
    }

    /// Greedy decoding of `n` tokens after `prompt` with our runtime.
    pub fn generate_ours(&self, prompt: &[u32], n: usize) -> anyhow::Result<Vec<u32>> {
        let mut cache = self.ours.new_cache();
        let mut input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let logits = self.ours.forward_last(&input, Some(&mut cache))?;
            let next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0];
            out.push(next);
            input = Tensor::new(&[[next]], &self.device)?;
        }
        Ok(out)
    }

    /// The same loop with candle-transformers' Llama and its cache.
    pub fn generate_reference(&self, prompt: &[u32], n: usize) -> anyhow::Result<Vec<u32>> {
        let mut cache = llama::Cache::new(true, DType::F32, &self.reference_config, &self.device)?;
        let mut input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        let mut pos = 0;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let len = input.dim(1)?;
            let logits = self.reference.forward(&input, pos, &mut cache)?;
            pos += len;
            let next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0];
            out.push(next);
            input = Tensor::new(&[[next]], &self.device)?;
        }
        Ok(out)
    }
}

/// Timings of one comparison.
pub struct Comparison {
    /// Best wall-clock seconds of our loop.
    pub ours_seconds: f64,
    /// Best wall-clock seconds of the reference loop.
    pub reference_seconds: f64,
    /// Tokens generated per run.
    pub tokens: usize,
    /// Both loops produced the same tokens.
    pub same_tokens: bool,
}

impl Comparison {
    /// Our tokens per second.
    pub fn ours_tps(&self) -> f64 {
        self.tokens as f64 / self.ours_seconds
    }

    /// The reference's tokens per second.
    pub fn reference_tps(&self) -> f64 {
        self.tokens as f64 / self.reference_seconds
    }

    /// Our throughput over the reference's.
    pub fn ratio(&self) -> f64 {
        self.ours_tps() / self.reference_tps()
    }
}

/// Times both loops `repeat` times, alternating so that load on the machine
/// affects both alike, after one untimed warm-up run of each; keeps the
/// best time of each.
pub fn compare(
    pair: &Pair,
    prompt: &[u32],
    tokens: usize,
    repeat: usize,
) -> anyhow::Result<Comparison> {
    let a = pair.generate_ours(prompt, tokens)?;
    let b = pair.generate_reference(prompt, tokens)?;
    let (mut ours, mut reference) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        pair.generate_ours(prompt, tokens)?;
        ours = ours.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        pair.generate_reference(prompt, tokens)?;
        reference = reference.min(t.elapsed().as_secs_f64());
    }
    Ok(Comparison {
        ours_seconds: ours,
        reference_seconds: reference,
        tokens,
        same_tokens: a == b,
    })
}
