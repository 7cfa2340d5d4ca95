//! Fixtures of the data-driven tests: tiny random pools of both families on
//! disk (a base and experts = base + small random deltas) and calibration
//! items per expert.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::moe::calibration::{CalibrationInput, CalibrationItem};
use crate::moe::testutil::randn;
use crate::Result;
use runtime::checkpoint::Checkpoint;
use runtime::generate::bytelevel::write_tokenizer_files;
use runtime::model::random::{random_tensors, random_weights, write_checkpoint};
use runtime::model::ModelConfig;

/// A pool in a temporary folder.
pub struct Pool {
    pub dir: tempfile::TempDir,
    pub experts: Vec<String>,
    pub vocab: u32,
}

impl Pool {
    pub fn open(&self, name: &str) -> Result<Arc<Checkpoint>> {
        Ok(Checkpoint::open(name, &self.dir.path().join(name))?)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Calibration items: `per` texts of random lengths for each expert
    /// (source i = expert i), and the source names.
    pub fn calibration(&self, per: usize, seed: u64) -> (Vec<CalibrationItem>, Vec<String>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut items = Vec::new();
        for s in 0..self.experts.len() {
            for _ in 0..per {
                let len = rng.random_range(3..9);
                let ids = (0..len).map(|_| rng.random_range(1..self.vocab)).collect();
                items.push(CalibrationItem {
                    source: s as u32,
                    input: CalibrationInput::Text(ids),
                });
            }
        }
        (items, self.experts.clone())
    }
}

/// A tiny Llama: d = 16, `layers` blocks, the byte-level vocabulary.
pub fn decoder_config(layers: usize, tied: bool) -> String {
    format!(
        r#"{{"model_type":"llama","vocab_size":262,"hidden_size":16,"intermediate_size":24,
        "num_hidden_layers":{layers},"num_attention_heads":4,"num_key_value_heads":2,
        "max_position_embeddings":64,"tie_word_embeddings":{tied},"bos_token_id":256,"eos_token_id":257}}"#
    )
}

fn perturbed(base: &HashMap<String, Tensor>, delta: f32, seed: u64) -> HashMap<String, Tensor> {
    let mut keys: Vec<&String> = base.keys().collect();
    keys.sort();
    keys.into_iter()
        .enumerate()
        .map(|(i, k)| {
            let t = &base[k];
            let noise = randn(t.dims(), delta, seed * 1000 + i as u64);
            (k.clone(), (t + noise).unwrap())
        })
        .collect()
}

/// A decoder pool: `base`, `e1` … `eT`.
pub fn decoder_pool(experts: usize, layers: usize, tied: bool) -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let config =
        ModelConfig::from_json(&decoder_config(layers, tied), Path::new("config.json")).unwrap();
    let base = random_weights(&config, 1, 0.3).unwrap();
    write_checkpoint(&dir.path().join("base"), &config, &base, DType::F32).unwrap();
    write_tokenizer_files(&dir.path().join("base"), 64).unwrap();
    let mut names = Vec::new();
    for k in 1..=experts {
        let w = perturbed(&base, 0.1, 100 + k as u64);
        let name = format!("e{k}");
        write_checkpoint(&dir.path().join(&name), &config, &w, DType::F32).unwrap();
        names.push(name);
    }
    Pool {
        dir,
        experts: names,
        vocab: 256,
    }
}

/// A tiny BERT config (mean pooling: no sentence-transformers files).
pub fn encoder_config(layers: usize) -> String {
    format!(
        r#"{{"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 50,
            "hidden_size": 16, "num_hidden_layers": {layers}, "num_attention_heads": 4,
            "intermediate_size": 24, "hidden_act": "gelu", "max_position_embeddings": 32,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0}}"#
    )
}

fn write_encoder(dir: &Path, json: &str, w: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), json).unwrap();
    candle_core::safetensors::save(w, dir.join("model.safetensors")).unwrap();
}

/// An encoder pool: `base`, `e1` … `eT`.
pub fn encoder_pool(experts: usize, layers: usize) -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let json = encoder_config(layers);
    let cfg = runtime::encoder::EncoderConfig::from_json(&json, Path::new("config.json")).unwrap();
    let base = random_tensors(cfg.tensor_shapes(), 3, 0.2).unwrap();
    write_encoder(&dir.path().join("base"), &json, &base);
    let mut names = Vec::new();
    for k in 1..=experts {
        let w = perturbed(&base, 0.05, 200 + k as u64);
        let name = format!("e{k}");
        write_encoder(&dir.path().join(&name), &json, &w);
        names.push(name);
    }
    Pool {
        dir,
        experts: names,
        vocab: 50,
    }
}

/// Float tensors of a checkpoint as f32 on the CPU.
pub fn tensors_of(ck: &Checkpoint) -> HashMap<String, Tensor> {
    crate::data_driven::network::float_tensors(ck, &Device::Cpu).unwrap()
}

/// max |a − b|.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    crate::moe::testutil::max_diff(
        &a.to_dtype(DType::F32).unwrap(),
        &b.to_dtype(DType::F32).unwrap(),
    )
}
