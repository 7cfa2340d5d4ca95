//! Random pools: [`synth`] writes a Llama-shaped pool (a base and K experts
//! that are the base plus small deltas) of any size, for throughput
//! benchmarks and tests.

use std::path::{Path, PathBuf};

use candle_core::DType;
use rayon::prelude::*;

use crate::error::Result;
use runtime::checkpoint::{dtype_name, CheckpointWriter, WriteOptions};

/// The dimensions of a synthetic Llama model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaShape {
    /// Model width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Decoder blocks.
    pub layers: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Attention heads (head dimension 64).
    pub heads: usize,
}

impl LlamaShape {
    /// The largest width that leaves room for at least eight blocks within
    /// about `params` parameters, and as many blocks as fit.
    pub fn for_params(params: u64) -> Self {
        let widths = [4096usize, 2048, 1024, 768, 512, 256, 128, 64];
        for (k, &h) in widths.iter().enumerate() {
            let i = (8 * h / 3).div_ceil(64) * 64;
            let per_layer = (4 * h * h + 3 * h * i + 2 * h) as u64;
            let vocab = ((params / (16 * h as u64)).clamp(256, 32000) as usize) / 64 * 64;
            let embed = (2 * vocab * h + h) as u64;
            if params >= embed + 8 * per_layer || k == widths.len() - 1 {
                let layers = (params.saturating_sub(embed) / per_layer).max(1) as usize;
                return LlamaShape {
                    hidden: h,
                    intermediate: i,
                    layers,
                    vocab,
                    heads: (h / 64).max(1),
                };
            }
        }
        unreachable!("the last width always matches")
    }

    /// Every tensor of the model: Hugging Face Llama names and shapes.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden, self.intermediate);
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                t.push((format!("{p}.self_attn.{proj}.weight"), vec![h, h]));
            }
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        t.push(("model.norm.weight".to_string(), vec![h]));
        t.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        t
    }

    /// Total parameters.
    pub fn params(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }

    /// A Hugging Face `config.json` for this shape.
    pub fn config_json(&self, dtype: DType) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "hidden_act": "silu",
            "torch_dtype": match dtype { DType::F32 => "float32", DType::F16 => "float16", _ => "bfloat16" },
        })
    }
}

/// What to synthesise.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Approximate parameter count.
    pub params: u64,
    /// Number of experts.
    pub experts: usize,
    /// Stored dtype.
    pub dtype: DType,
    /// Seed of the random values.
    pub seed: u64,
    /// Replace existing folders.
    pub force: bool,
}

/// Writes `out/base` and `out/expert_1..K`; returns their folders (base first).
pub fn synth(out: &Path, opts: &SynthOptions) -> Result<Vec<PathBuf>> {
    let shape = LlamaShape::for_params(opts.params);
    let tensors = shape.tensors();
    let layout: Vec<_> = tensors
        .iter()
        .map(|(n, s)| (n.clone(), opts.dtype, s.clone()))
        .collect();
    let config = serde_json::to_vec_pretty(&shape.config_json(opts.dtype)).expect("json");
    let mut dirs = Vec::new();
    for k in 0..=opts.experts {
        let dir = out.join(if k == 0 {
            "base".to_string()
        } else {
            format!("expert_{k}")
        });
        let writer = CheckpointWriter::create(
            &dir,
            &layout,
            &WriteOptions {
                force: opts.force,
                ..Default::default()
            },
        )?;
        for (ti, (name, s)) in tensors.iter().enumerate() {
            let n: usize = s.iter().product();
            let is_norm = s.len() == 1;
            let mut values = vec![0f32; n];
            fill(&mut values, opts.seed, ti as u64, is_norm);
            if k > 0 {
                // Expert k = base + a delta of its own: dense small noise.
                add_noise(
                    &mut values,
                    opts.seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    ti as u64,
                    0.002,
                );
            }
            writer.write_f32(name, &values)?;
        }
        writer.write_file("config.json", &config)?;
        writer.write_file(
            "fusion_synth.json",
            &serde_json::to_vec_pretty(&serde_json::json!({
                "seed": opts.seed, "expert": k, "dtype": dtype_name(opts.dtype), "params": shape.params()
            }))
            .expect("json"),
        )?;
        dirs.push(writer.finish()?);
    }
    Ok(dirs)
}

/// A spec merging a synthesised pool with `method`: folders from [`synth`]
/// (base first) as checkpoint names.
pub fn pool_spec(method: &str, dirs: &[PathBuf]) -> merger::spec::MergeSpec {
    let names: Vec<String> = dirs[1..]
        .iter()
        .map(|d| d.to_string_lossy().into_owned())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    merger::spec::MergeSpec::new(method, Some(&dirs[0].to_string_lossy()), &names)
}

const CHUNK: usize = 1 << 14;

pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform values with standard deviation 0.02 (or ones for norms),
/// deterministic for (seed, tensor, chunk) whatever the thread schedule.
fn fill(values: &mut [f32], seed: u64, tensor: u64, ones: bool) {
    if ones {
        values.iter_mut().for_each(|v| *v = 1.0);
        return;
    }
    let std = 0.02;
    values
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut state = splitmix(seed ^ splitmix(tensor) ^ splitmix(c as u64 + 1));
            uniform(chunk, &mut state, std, false);
        });
}

fn add_noise(values: &mut [f32], seed: u64, tensor: u64, std: f32) {
    values
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut state =
                splitmix(seed ^ splitmix(tensor.wrapping_add(7)) ^ splitmix(c as u64 + 1));
            uniform(chunk, &mut state, std, true);
        });
}

fn uniform(chunk: &mut [f32], state: &mut u64, std: f32, add: bool) {
    // Uniform on [−a, a] has standard deviation a/√3.
    let a = std * 3f32.sqrt();
    for v in chunk.iter_mut() {
        *state = splitmix(*state);
        let u = (*state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        let x = (2.0 * u - 1.0) * a;
        if add {
            *v += x;
        } else {
            *v = x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_hit_the_requested_size() {
        for target in [2_000_000u64, 100_000_000, 1_000_000_000] {
            let s = LlamaShape::for_params(target);
            let p = s.params() as f64;
            assert!(
                p > 0.75 * target as f64 && p < 1.1 * target as f64,
                "{target}: {s:?} has {p}"
            );
            assert!(s.layers >= 1);
        }
        assert_eq!(LlamaShape::for_params(1_000_000_000).hidden, 2048);
    }
}
