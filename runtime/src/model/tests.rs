//! Behaviour of the runtime on tiny random models: caching, hooks, MLP
//! replacement, autograd, weight handling and input validation. Parity with
//! candle-transformers is in `merger/tests/parity.rs`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::random::{random_weights, write_checkpoint};
use super::*;
use crate::RuntimeError;

/// A two-block Llama of hidden size 32 (also the batching and paged-cache
/// tests' model).
pub(super) fn tiny() -> ModelConfig {
    ModelConfig::from_json(
        r#"{"model_type":"llama","vocab_size":40,"hidden_size":32,"intermediate_size":48,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":16}"#,
        Path::new("config.json"),
    )
    .unwrap()
}

pub(super) fn model(c: &ModelConfig, opts: &ModelOptions) -> Model {
    Model::from_tensors(c.clone(), random_weights(c, 1, 0.2).unwrap(), opts).unwrap()
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

pub(super) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn model_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Model>();
}

#[test]
fn cached_decoding_matches_a_full_forward() {
    let m = model(&tiny(), &ModelOptions::default());
    let seq: [u32; 6] = [1, 5, 7, 3, 9, 2];
    let full = m.forward(&ids(&[&seq]), None).unwrap().squeeze(0).unwrap();
    let mut cache = m.new_cache();
    let prefix = m.forward(&ids(&[&seq[..4]]), Some(&mut cache)).unwrap();
    let mut rows = vec![prefix.squeeze(0).unwrap()];
    for &tok in &seq[4..] {
        rows.push(m.forward_last(&ids(&[&[tok]]), Some(&mut cache)).unwrap());
    }
    assert_eq!(cache.len(), seq.len());
    let inc = Tensor::cat(&rows, 0).unwrap();
    let d = max_abs_diff(&full, &inc);
    assert!(d < 1e-5, "max abs diff {d}");

    // Rewinding to a shared prefix and decoding a different continuation
    // equals a fresh forward of that sequence.
    cache.truncate(3).unwrap();
    assert_eq!(cache.len(), 3);
    let other = m.forward(&ids(&[&[11, 12]]), Some(&mut cache)).unwrap();
    let fresh = m.forward(&ids(&[&[1, 5, 7, 11, 12]]), None).unwrap();
    let d = max_abs_diff(&other, &fresh.narrow(1, 3, 2).unwrap());
    assert!(d < 1e-5, "after truncate: max abs diff {d}");
    cache.truncate(0).unwrap();
    assert!(cache.is_empty());
}

#[test]
fn right_padding_does_not_change_earlier_positions() {
    let m = model(&tiny(), &ModelOptions::default());
    let batch = m
        .forward(&ids(&[&[3, 4, 5, 0, 0], &[6, 7, 8, 9, 10]]), None)
        .unwrap();
    let alone = m.forward(&ids(&[&[3, 4, 5]]), None).unwrap();
    let d = max_abs_diff(
        &batch.narrow(0, 0, 1).unwrap().narrow(1, 0, 3).unwrap(),
        &alone,
    );
    assert!(d < 1e-5, "{d}");
    let pooled = m
        .embed_mean_lengths(&ids(&[&[3, 4, 5, 0, 0], &[6, 7, 8, 9, 10]]), &[3, 5])
        .unwrap();
    let first = m.embed_mean(&ids(&[&[3, 4, 5]])).unwrap();
    let second = m.embed_mean(&ids(&[&[6, 7, 8, 9, 10]])).unwrap();
    let d = max_abs_diff(&pooled, &Tensor::cat(&[first, second], 0).unwrap());
    assert!(d < 1e-5, "{d}");
}

#[test]
fn capture_sees_every_linear_input_with_its_shape() {
    let c = tiny();
    let weights = random_weights(&c, 1, 0.2).unwrap();
    let embed = weights["model.embed_tokens.weight"].clone();
    let norm0 = weights["model.layers.0.input_layernorm.weight"].clone();
    let m = Model::from_tensors(c.clone(), weights, &ModelOptions::default()).unwrap();
    let mut seen: Vec<(String, Vec<usize>, Tensor)> = Vec::new();
    let mut capture = |name: &str, x: &Tensor| -> candle_core::Result<()> {
        seen.push((name.to_string(), x.dims().to_vec(), x.clone()));
        Ok(())
    };
    let input = ids(&[&[1, 2, 3], &[4, 5, 6]]);
    m.forward_with(&input, None, &mut Hooks::capturing(&mut capture))
        .unwrap();
    let mut want = Vec::new();
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        for (l, width) in [
            ("self_attn.q_proj", 32),
            ("self_attn.k_proj", 32),
            ("self_attn.v_proj", 32),
            ("self_attn.o_proj", 32), // 4 heads x head_dim 8
            ("mlp.gate_proj", 32),
            ("mlp.up_proj", 32),
            ("mlp.down_proj", 48),
        ] {
            want.push((format!("{p}.{l}.weight"), vec![2, 3, width]));
        }
    }
    want.push(("lm_head.weight".to_string(), vec![2, 3, 32]));
    let got: Vec<(String, Vec<usize>)> = seen
        .iter()
        .map(|(n, d, _)| (n.clone(), d.clone()))
        .collect();
    assert_eq!(got, want);

    // The first q_proj input is the RMS-normed embedding, by the formula.
    let e = embed.to_vec2::<f32>().unwrap();
    let g = norm0.to_vec1::<f32>().unwrap();
    let q_in = seen[0].2.to_vec3::<f32>().unwrap();
    for (b, row) in [[1usize, 2, 3], [4, 5, 6]].iter().enumerate() {
        for (t, &tok) in row.iter().enumerate() {
            let x = &e[tok];
            let rms = (x.iter().map(|v| v * v).sum::<f32>() / 32.0 + 1e-6).sqrt();
            for j in 0..32 {
                let want = x[j] / rms * g[j];
                assert!((q_in[b][t][j] - want).abs() < 1e-5, "{b},{t},{j}");
            }
        }
    }
}

/// An MLP that scales the input: a stand-in for a routed ensemble.
struct Scale(f64);

impl Mlp for Scale {
    fn forward(&self, x: &Tensor, _: &mut Hooks) -> candle_core::Result<Tensor> {
        x * self.0
    }
}

#[test]
fn replaced_mlp_changes_the_output_as_expected() {
    let c = tiny();
    let weights = random_weights(&c, 1, 0.2).unwrap();
    let mut m = Model::from_tensors(c.clone(), weights.clone(), &ModelOptions::default()).unwrap();
    let input = ids(&[&[1, 2, 3, 4]]);
    let before = m.forward(&input, None).unwrap();

    // A zero MLP in layer 1 equals a checkpoint whose layer-1 down_proj is zero.
    m.set_mlp(1, Box::new(Scale(0.0))).unwrap();
    let mut zeroed = weights.clone();
    let down = "model.layers.1.mlp.down_proj.weight";
    zeroed.insert(down.into(), zeroed[down].zeros_like().unwrap());
    let reference = Model::from_tensors(c.clone(), zeroed, &ModelOptions::default()).unwrap();
    let after = m.forward(&input, None).unwrap();
    assert!(max_abs_diff(&after, &reference.forward(&input, None).unwrap()) < 1e-6);
    assert!(max_abs_diff(&after, &before) > 1e-3);

    // Putting back a GatedMlp built from the original tensors restores it.
    let mut map: HashMap<String, Tensor> = weights;
    let mlp = GatedMlp::from_weights("model.layers.1.mlp", &mut map, false).unwrap();
    m.set_mlp(1, Box::new(mlp)).unwrap();
    assert!(max_abs_diff(&m.forward(&input, None).unwrap(), &before) < 1e-6);

    let e = m.set_mlp(2, Box::new(Scale(1.0))).unwrap_err().to_string();
    assert!(e.contains("layer 2") && e.contains("2 layers"), "{e}");
}

#[test]
fn differentiable_path_equals_the_fused_one() {
    let c = tiny();
    let fused = model(&c, &ModelOptions::default());
    let slow = model(
        &c,
        &ModelOptions {
            differentiable: true,
            ..Default::default()
        },
    );
    let input = ids(&[&[1, 2, 3, 4, 5], &[9, 8, 7, 6, 5]]);
    let d = max_abs_diff(
        &fused.forward(&input, None).unwrap(),
        &slow.forward(&input, None).unwrap(),
    );
    assert!(d < 1e-5, "{d}");
}

/// Gradients of a loss over the logits with respect to `Var` weights (an
/// attention projection, an MLP projection and the tied embedding) equal
/// central finite differences, in f64.
#[test]
fn gradients_match_finite_differences() {
    let mut c = tiny();
    c.tie_word_embeddings = true;
    let opts = ModelOptions {
        dtype: Some(DType::F64),
        differentiable: true,
        ..Default::default()
    };
    let names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.embed_tokens.weight",
    ];
    let mut weights = random_weights(&c, 3, 0.3).unwrap();
    let vars: Vec<Var> = names
        .iter()
        .map(|n| Var::from_tensor(&weights[*n].to_dtype(DType::F64).unwrap()).unwrap())
        .collect();
    for (n, v) in names.iter().zip(&vars) {
        weights.insert(n.to_string(), v.as_tensor().clone());
    }
    let m = Model::from_tensors(c.clone(), weights, &opts).unwrap();
    let input = ids(&[&[1, 2, 3, 4], &[5, 6, 7, 8]]);
    let probe = Tensor::randn(0f64, 1.0, (2, 4, c.vocab_size), &Device::Cpu).unwrap();
    let loss = |m: &Model| -> Tensor {
        let logp = Model::log_softmax(&m.forward(&input, None).unwrap()).unwrap();
        (logp * &probe).unwrap().sum_all().unwrap()
    };
    let grads = loss(&m).backward().unwrap();
    let eps = 1e-5;
    for (name, var) in names.iter().zip(&vars) {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"))
            .to_vec2::<f64>()
            .unwrap();
        let w0 = var.as_tensor().to_vec2::<f64>().unwrap();
        for (i, j) in [(0, 0), (3, 5), (7, 2)] {
            let at = |delta: f64| -> f64 {
                let mut w = w0.clone();
                w[i][j] += delta;
                let flat: Vec<f64> = w.concat();
                var.set(&Tensor::from_vec(flat, (w0.len(), w0[0].len()), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&m).to_scalar::<f64>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            at(0.0);
            let tol = 1e-6 * fd.abs().max(1.0);
            assert!(
                (fd - g[i][j]).abs() < tol,
                "{name}[{i}][{j}]: autograd {} vs finite difference {fd}",
                g[i][j]
            );
        }
    }
}

#[test]
fn tensors_in_the_compute_dtype_are_used_without_a_copy() {
    let c = tiny();
    let mut weights = random_weights(&c, 1, 0.2).unwrap();
    let name = "model.layers.0.mlp.down_proj.weight";
    let var = Var::from_tensor(&weights[name]).unwrap();
    weights.insert(name.into(), var.as_tensor().clone());
    let m = Model::from_tensors(c.clone(), weights, &ModelOptions::default()).unwrap();
    let input = ids(&[&[1, 2, 3]]);
    let before = m.forward(&input, None).unwrap();
    // Writing into the Var's storage changes what the model computes.
    var.set(&var.as_tensor().zeros_like().unwrap()).unwrap();
    let after = m.forward(&input, None).unwrap();
    assert!(max_abs_diff(&before, &after) > 1e-3);
}

#[test]
fn checkpoint_round_trip_converts_to_the_compute_dtype() {
    let c = tiny();
    let weights = random_weights(&c, 5, 0.2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &c, &weights, DType::BF16).unwrap();
    let loaded = Model::load(dir.path(), &ModelOptions::default()).unwrap();
    assert_eq!(loaded.dtype(), DType::F32);
    assert_eq!(loaded.config(), &c);
    let rounded: HashMap<String, Tensor> = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).unwrap()))
        .collect();
    let reference = Model::from_tensors(c.clone(), rounded, &ModelOptions::default()).unwrap();
    let input = ids(&[&[1, 2, 3]]);
    let d = max_abs_diff(
        &loaded.forward(&input, None).unwrap(),
        &reference.forward(&input, None).unwrap(),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let c = tiny();
    let mut weights = random_weights(&c, 1, 0.2).unwrap();
    weights.remove("model.layers.1.self_attn.v_proj.weight");
    let e = Model::from_tensors(c.clone(), weights, &ModelOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, RuntimeError::MissingTensor { .. }));
    assert!(
        e.to_string()
            .contains("model.layers.1.self_attn.v_proj.weight"),
        "{e}"
    );

    let mut weights = random_weights(&c, 1, 0.2).unwrap();
    weights.insert(
        "model.layers.0.mlp.up_proj.weight".into(),
        Tensor::zeros((32, 48), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = Model::from_tensors(c.clone(), weights, &ModelOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight")
            && e.contains("[32, 48]")
            && e.contains("[48, 32]"),
        "{e}"
    );

    // From a checkpoint folder, the error names the folder too.
    let dir = tempfile::tempdir().unwrap();
    let mut weights = random_weights(&c, 1, 0.2).unwrap();
    weights.remove("model.norm.weight");
    write_checkpoint(dir.path(), &c, &weights, DType::F32).unwrap();
    let e = Model::load(dir.path(), &ModelOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.norm.weight") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
}

#[test]
fn bad_inputs_are_errors() {
    let m = model(&tiny(), &ModelOptions::default());
    let err = |t: &Tensor| m.forward(t, None).err().unwrap().to_string();
    assert!(err(&ids(&[&[1, 40]])).contains("token id 40"));
    let e = err(&Tensor::zeros((1, 0), DType::U32, &Device::Cpu).unwrap());
    assert!(e.contains("empty"), "{e}");
    let e = err(&Tensor::new(&[1u32, 2], &Device::Cpu).unwrap());
    assert!(e.contains("(batch, seq)"), "{e}");
    let e = err(&Tensor::new(&[[1i64, 2]], &Device::Cpu).unwrap());
    assert!(e.contains("u32"), "{e}");
    let e = err(&ids(&[&[1; 17]]));
    assert!(e.contains("max_position_embeddings (16)"), "{e}");
    // The cache counts towards the limit.
    let mut cache = m.new_cache();
    m.forward(&ids(&[&[1; 10]]), Some(&mut cache)).unwrap();
    let e = m
        .forward(&ids(&[&[1; 7]]), Some(&mut cache))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("17 tokens"), "{e}");
    let mut wrong = KvCache::new(3);
    let e = m
        .forward(&ids(&[&[1]]), Some(&mut wrong))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("3 layers"), "{e}");
}

#[test]
fn half_precision_runs_close_to_f32() {
    let c = tiny();
    let f32_model = model(&c, &ModelOptions::default());
    let bf16_model = model(
        &c,
        &ModelOptions {
            dtype: Some(DType::BF16),
            ..Default::default()
        },
    );
    assert_eq!(bf16_model.dtype(), DType::BF16);
    let input = ids(&[&[1, 2, 3, 4, 5]]);
    let a = f32_model.forward(&input, None).unwrap();
    let mut cache = bf16_model.new_cache();
    let b = bf16_model.forward(&input, Some(&mut cache)).unwrap();
    assert_eq!(b.dtype(), DType::F32);
    let d = max_abs_diff(&a, &b);
    // bf16 keeps 8 significant bits: logits of magnitude ~2 move by ~1e-2.
    assert!(d < 0.1, "{d}");
    let step = bf16_model
        .forward_last(&ids(&[&[6]]), Some(&mut cache))
        .unwrap();
    assert_eq!(step.dims(), &[1, 40]);
}

/// The RegMean use of the capture hook (as in the runtime docs): Gram
/// matrices accumulated over two batches equal `Hᵀ H` of the inputs, here
/// checked for `lm_head`, whose input is the final hidden state.
#[test]
fn captured_inputs_accumulate_into_gram_matrices() {
    let m = model(&tiny(), &ModelOptions::default());
    let batches = [ids(&[&[1, 2, 3], &[4, 5, 6]]), ids(&[&[7, 8, 9, 10]])];
    let mut grams: HashMap<String, Tensor> = HashMap::new();
    let mut capture = |name: &str, x: &Tensor| -> candle_core::Result<()> {
        let x = x.flatten_to(1)?;
        let g = x.t()?.matmul(&x)?;
        let sum = match grams.remove(name) {
            Some(s) => (s + g)?,
            None => g,
        };
        grams.insert(name.to_string(), sum);
        Ok(())
    };
    for b in &batches {
        m.forward_with(b, None, &mut Hooks::capturing(&mut capture))
            .unwrap();
    }
    assert_eq!(grams.len(), 2 * 7 + 1);
    let hs: Vec<Tensor> = batches
        .iter()
        .map(|b| {
            m.hidden_states(b, None, &mut Hooks::default())
                .unwrap()
                .flatten_to(1)
                .unwrap()
        })
        .collect();
    let h = Tensor::cat(&hs, 0).unwrap(); // (10, hidden)
    let want = h.t().unwrap().matmul(&h).unwrap();
    assert!(max_abs_diff(&grams["lm_head.weight"], &want) < 1e-4);
}
