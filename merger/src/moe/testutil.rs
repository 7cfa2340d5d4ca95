//! Test fixtures: a tiny random pool on disk (a base and experts that are
//! the base plus small random deltas), and helpers to compare logits.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::spec::MergeSpec;
use crate::Result;
use runtime::checkpoint::Checkpoint;
use runtime::generate::bytelevel::write_tokenizer_files;
use runtime::model::random::{random_weights, write_checkpoint};
use runtime::model::{Model, ModelConfig};

/// A pool in a temporary folder: `base`, `e1`, …, `eT`.
pub struct Pool {
    pub dir: tempfile::TempDir,
    pub config: ModelConfig,
    pub experts: Vec<String>,
}

impl Pool {
    /// Opens checkpoints of the pool by name (names are folders under it).
    pub fn open(&self, name: &str) -> Result<Arc<Checkpoint>> {
        Ok(Checkpoint::open(name, &self.dir.path().join(name))?)
    }

    /// A spec over every expert of the pool.
    pub fn spec(&self, method: &str) -> MergeSpec {
        let names: Vec<&str> = self.experts.iter().map(String::as_str).collect();
        MergeSpec::new(method, Some("base"), &names)
    }

    /// Folder of a checkpoint of the pool.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// The tiny architecture of the tests: d = 16, m = 24, 2 blocks, the
/// byte-level vocabulary.
pub fn tiny_config(mlp_bias: bool) -> ModelConfig {
    ModelConfig::from_json(
        &format!(
            r#"{{"model_type":"llama","vocab_size":262,"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "max_position_embeddings":64,"mlp_bias":{mlp_bias},"bos_token_id":256,"eos_token_id":257}}"#
        ),
        Path::new("config.json"),
    )
    .unwrap()
}

/// Writes a base and `experts` experts θi = θ0 + N(0, delta²) per entry.
pub fn pool(experts: usize, mlp_bias: bool, delta: f32, dtype: DType) -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(mlp_bias);
    let base = random_weights(&config, 1, 0.3).unwrap();
    write_checkpoint(&dir.path().join("base"), &config, &base, dtype).unwrap();
    write_tokenizer_files(&dir.path().join("base"), 64).unwrap();
    let mut names = Vec::new();
    for k in 1..=experts {
        let mut rng = ChaCha8Rng::seed_from_u64(100 + k as u64);
        let normal = Normal::new(0f32, delta).unwrap();
        let mut keys: Vec<&String> = base.keys().collect();
        keys.sort();
        let mut w = HashMap::new();
        for name in keys {
            let t = &base[name];
            let noise: Vec<f32> = (0..t.elem_count())
                .map(|_| normal.sample(&mut rng))
                .collect();
            let noise = Tensor::from_vec(noise, t.dims(), &Device::Cpu).unwrap();
            w.insert(name.clone(), (t + noise).unwrap());
        }
        let name = format!("e{k}");
        write_checkpoint(&dir.path().join(&name), &config, &w, dtype).unwrap();
        names.push(name);
    }
    Pool {
        dir,
        config,
        experts: names,
    }
}

/// Token ids `(batch, len)` drawn from `0..vocab` with a seed.
pub fn random_ids(batch: usize, len: usize, vocab: u32, seed: u64) -> Vec<Vec<u32>> {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..batch)
        .map(|_| (0..len).map(|_| rng.random_range(0..vocab)).collect())
        .collect()
}

/// `ids` as a `(batch, len)` tensor.
pub fn ids_tensor(ids: &[Vec<u32>]) -> Tensor {
    let len = ids[0].len();
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (ids.len(), len), &Device::Cpu).unwrap()
}

/// Logits `(batch, len, vocab)` of `model` on `ids`.
pub fn logits(model: &Model, ids: &[Vec<u32>]) -> Tensor {
    model.forward(&ids_tensor(ids), None).unwrap()
}

/// max |a − b| over every entry.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A tensor of `shape` with entries ~ N(0, std²).
pub fn randn(shape: &[usize], std: f32, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0f32, std).unwrap();
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}
