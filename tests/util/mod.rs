//! Test harness: temporary folders of real safetensors checkpoints (written
//! with the `safetensors` crate, independently of the code under test) and a
//! runner for the real `fusion` binary.

#![allow(dead_code)]

pub mod tiny_pool;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::{tensor::TensorView, Dtype, SafeTensors};

/// A tensor to write: name, shape, values (f32, encoded to `dtype`).
pub struct T<'a>(pub &'a str, pub &'a [usize], pub &'a [f32]);

/// Encodes f32 values as `dtype` bytes.
pub fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        other => panic!("unsupported {other:?}"),
    }
}

/// Decodes `dtype` bytes to f32.
pub fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => panic!("unsupported {other:?}"),
    }
}

/// Writes a single-file checkpoint folder with config and tokenizer files.
pub fn write_checkpoint(dir: &Path, dtype: Dtype, tensors: &[T]) {
    std::fs::create_dir_all(dir).unwrap();
    write_shard(&dir.join("model.safetensors"), dtype, tensors);
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 2}"#,
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), r#"{"version": "1.0"}"#).unwrap();
}

/// Writes one safetensors file.
pub fn write_shard(path: &Path, dtype: Dtype, tensors: &[T]) {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|T(n, s, v)| (n.to_string(), s.to_vec(), encode(dtype, v)))
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    let meta = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

/// Writes a sharded checkpoint: each group of tensors in its own shard.
pub fn write_sharded(dir: &Path, dtype: Dtype, groups: &[&[T]]) {
    std::fs::create_dir_all(dir).unwrap();
    let n = groups.len();
    let mut map = BTreeMap::new();
    for (k, g) in groups.iter().enumerate() {
        let f = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        write_shard(&dir.join(&f), dtype, g);
        for T(name, _, _) in g.iter() {
            map.insert(name.to_string(), f.clone());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
}

/// Reads every tensor of a checkpoint folder (single file or sharded) as f32,
/// with its stored dtype and shape.
pub fn read_checkpoint(dir: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<f32>)> {
    let mut files = vec![];
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
        let mut set: Vec<String> = v["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        set.sort();
        set.dedup();
        files.extend(set.into_iter().map(|f| dir.join(f)));
    } else {
        files.push(dir.join("model.safetensors"));
    }
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            out.insert(
                name,
                (
                    view.dtype(),
                    view.shape().to_vec(),
                    decode(view.dtype(), view.data()),
                ),
            );
        }
    }
    out
}

/// The `__metadata__` of a safetensors file.
pub fn file_metadata(path: &Path) -> Option<std::collections::HashMap<String, String>> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone()
}

/// Runs the `fusion` binary in `cwd`.
pub fn fusion(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run fusion")
}

/// Asserts success and returns stderr.
#[track_caller]
pub fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "fusion failed: {err}\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

/// Asserts a clean failure (exit 1, no panic) whose stderr contains every needle.
#[track_caller]
pub fn fails_with(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, got {:?}: {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
    err
}

/// Asserts elementwise closeness.
#[track_caller]
pub fn close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= tol, "got {got:?}, want {want:?}");
    }
}

/// A temp dir with a three-model toy pool: base, a, b (f32) and tensors
/// embed [2,2], layers.0/1 up_proj [2,3], norm [2].
pub struct Pool {
    pub dir: tempfile::TempDir,
}

pub const NAMES: [&str; 4] = [
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.norm.weight",
];

/// Values of the toy pool's models: base = 1, 2, 3...; a = base + 1; b = base − 2 (per element).
pub fn toy_values(model: &str) -> Vec<Vec<f32>> {
    let shift = match model {
        "base" => 0.0,
        "a" => 1.0,
        "b" => -2.0,
        _ => panic!(),
    };
    let sizes = [4usize, 6, 6, 2];
    sizes
        .iter()
        .enumerate()
        .map(|(t, &n)| (0..n).map(|i| (t * 10 + i) as f32 + shift).collect())
        .collect()
}

impl Pool {
    pub fn new(dtype: Dtype) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for m in ["base", "a", "b"] {
            let v = toy_values(m);
            write_checkpoint(
                &dir.path().join(m),
                dtype,
                &[
                    T(NAMES[0], &[2, 2], &v[0]),
                    T(NAMES[1], &[2, 3], &v[1]),
                    T(NAMES[2], &[2, 3], &v[2]),
                    T(NAMES[3], &[2], &v[3]),
                ],
            );
        }
        Pool { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}
