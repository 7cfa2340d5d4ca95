//! Random weights for a config: deterministic for a seed, used by tests,
//! parity checks and benchmarks that need a real model of a given shape.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::config::ModelConfig;
use crate::error::{Result, RuntimeError};

/// Every tensor name and shape of a Hugging Face checkpoint for `c`.
pub fn tensor_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = c.hidden_size;
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, h],
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if c.qkv_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        if c.o_bias {
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        let m = c.intermediate_size;
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![m, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![m, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, m]));
        if c.mlp_bias {
            out.push((format!("{p}.mlp.gate_proj.bias"), vec![m]));
            out.push((format!("{p}.mlp.up_proj.bias"), vec![m]));
            out.push((format!("{p}.mlp.down_proj.bias"), vec![h]));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    out
}

/// Random f32 weights for `c`: matrices and biases ~ N(0, std²), norm scales
/// 1 + N(0, 0.1²) (so a norm is not a no-op in parity tests).
pub fn random_weights(c: &ModelConfig, seed: u64, std: f32) -> Result<HashMap<String, Tensor>> {
    random_tensors(tensor_shapes(c), seed, std)
}

/// Random f32 tensors of `shapes` by name: ~ N(0, std²), except norm scales
/// (names ending in `norm.weight`, any case: RMSNorm's and BERT's
/// `LayerNorm.weight`) at 1 + N(0, 0.1²).
pub fn random_tensors(
    shapes: Vec<(String, Vec<usize>)>,
    seed: u64,
    std: f32,
) -> Result<HashMap<String, Tensor>> {
    let normal = Normal::new(0f32, std)
        .ok()
        .filter(|_| std.is_finite())
        .ok_or_else(|| RuntimeError::range("std", std, "a finite value >= 0"))?;
    let norm_noise = Normal::new(0f32, 0.1).expect("0.1 is a valid standard deviation");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.to_ascii_lowercase().ends_with("norm.weight") {
            (0..n).map(|_| 1.0 + norm_noise.sample(&mut rng)).collect()
        } else {
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        let t = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes `weights` as `DIR/model.safetensors` (in `dtype`) with `DIR/config.json`.
pub fn write_checkpoint(
    dir: &Path,
    c: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io(dir, e))?;
    let converted: HashMap<String, Tensor> = weights
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()?;
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let path = dir.join("model.safetensors");
    let views: Vec<(String, SafeView)> = converted
        .iter()
        .map(|(k, t)| Ok((k.clone(), SafeView::new(t)?)))
        .collect::<candle_core::Result<_>>()?;
    safetensors::serialize_to_file(
        views.iter().map(|(k, v)| (k.as_str(), v)),
        Some(metadata),
        &path,
    )
    .map_err(|e| RuntimeError::io(&path, std::io::Error::other(e.to_string())))?;
    let mut config = c.to_hf_json();
    config["torch_dtype"] = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
    .into();
    let cpath = dir.join("config.json");
    std::fs::write(&cpath, serde_json::to_vec_pretty(&config).expect("json"))
        .map_err(|e| RuntimeError::io(&cpath, e))?;
    Ok(())
}

/// A tensor's bytes as a safetensors view.
struct SafeView {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl SafeView {
    fn new(t: &Tensor) -> candle_core::Result<Self> {
        let shape = t.dims().to_vec();
        let t = t.flatten_all()?;
        let (dtype, bytes) = match t.dtype() {
            DType::F32 => (
                safetensors::Dtype::F32,
                bytemuck::cast_slice(&t.to_vec1::<f32>()?).to_vec(),
            ),
            DType::F16 => (
                safetensors::Dtype::F16,
                bytemuck::cast_slice(&t.to_vec1::<half::f16>()?).to_vec(),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                bytemuck::cast_slice(&t.to_vec1::<half::bf16>()?).to_vec(),
            ),
            d => candle_core::bail!("cannot store dtype {d:?}"),
        };
        Ok(SafeView {
            dtype,
            shape,
            bytes,
        })
    }
}

impl safetensors::View for &SafeView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}
