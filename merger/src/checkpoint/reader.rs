//! Memory-mapped, validated reading of a checkpoint folder.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use super::{INDEX_FILE, SINGLE_FILE};
use crate::error::{MergeError, Result};

/// Where one tensor lives inside a checkpoint.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Index into the checkpoint's shard files.
    pub file: usize,
    /// Element type as stored.
    pub dtype: DType,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Byte range of the data inside the mapped file.
    pub range: std::ops::Range<usize>,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
}

/// An opened checkpoint folder: every shard mapped, every header validated.
pub struct Checkpoint {
    name: String,
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorEntry>,
    fingerprint: String,
}

/// A borrowed view of one stored tensor: its raw little-endian bytes.
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    /// Element type of `bytes`.
    pub dtype: DType,
    /// Shape of the tensor.
    pub shape: &'a [usize],
    /// The raw data, straight from the memory map.
    pub bytes: &'a [u8],
}

impl TensorRef<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Decodes the tensor into an f32 vector (in parallel for large tensors).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let n = self.numel();
        let mut out = vec![0f32; n];
        decode_into(self.dtype, self.bytes, &mut out);
        out
    }

    /// Decodes the tensor into an f32 candle tensor on `device`.
    pub fn to_f32_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        let t = Tensor::from_vec(self.to_f32_vec(), self.shape, &Device::Cpu)?;
        if device.is_cpu() {
            Ok(t)
        } else {
            t.to_device(device)
        }
    }
}

const CHUNK: usize = 1 << 16;

/// Decodes little-endian `dtype` bytes into `out` (which has one slot per element).
pub(crate) fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    let width = dtype.size_in_bytes();
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .for_each(|(o, b)| decode_chunk(dtype, b, o));
}

/// Decodes one chunk sequentially. bf16 → f32 is exact (the bf16 bits are
/// the high half of the f32), written as a shift the compiler vectorises.
pub(crate) fn decode_chunk(dtype: DType, b: &[u8], o: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(b) {
            Ok(s) => o.copy_from_slice(s),
            Err(_) => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        },
        DType::BF16 => match bytemuck::try_cast_slice::<u8, u16>(b) {
            Ok(s) => {
                for (x, &h) in o.iter_mut().zip(s) {
                    *x = f32::from_bits((h as u32) << 16);
                }
            }
            Err(_) => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *x = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
        },
        DType::F16 => match bytemuck::try_cast_slice::<u8, half::f16>(b) {
            Ok(s) => s.convert_to_f32_slice(o),
            Err(_) => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *x = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        },
        other => unreachable!("dtype {other:?} is rejected when the checkpoint is opened"),
    }
}

fn supported(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> MergeError {
    MergeError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn explain(e: safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("file is {file_len} bytes, too short for the 8-byte header length"),
        E::HeaderTooLarge => "header length is larger than the 100 MB cap".to_string(),
        E::InvalidHeaderLength => {
            format!("header length points past the end of the file ({file_len} bytes)")
        }
        E::MetadataIncompleteBuffer => format!(
            "tensor data offsets do not cover the file exactly (file is {file_len} bytes; truncated or padded)"
        ),
        E::InvalidOffset(name) => format!("tensor `{name}` has data offsets that are not contiguous"),
        E::TensorInvalidInfo => "a tensor's shape and dtype do not match its byte length".to_string(),
        other => other.to_string(),
    }
}

impl Shard {
    fn open(path: &Path) -> Result<(Shard, Vec<(String, TensorEntry)>)> {
        let file = File::open(path).map_err(|e| MergeError::io(path, e))?;
        // SAFETY: the map is read-only; checkpoint files are not expected to
        // change while a merge runs (a changed file changes its fingerprint).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| MergeError::io(path, e))?;
        let (n, meta) =
            SafeTensors::read_metadata(&map).map_err(|e| corrupt(path, explain(e, map.len())))?;
        let header_len = 8 + n;
        let mut entries = Vec::new();
        for (name, info) in meta.tensors() {
            let dtype = supported(info.dtype).ok_or_else(|| MergeError::UnsupportedDtype {
                tensor: name.clone(),
                dtype: format!("{:?}", info.dtype),
                path: path.to_path_buf(),
            })?;
            let (s, e) = info.data_offsets;
            let numel = info
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| corrupt(path, format!("tensor `{name}` shape overflows")))?;
            if numel.checked_mul(dtype.size_in_bytes()) != Some(e - s) {
                return Err(corrupt(
                    path,
                    format!(
                        "tensor `{name}` has {} bytes for shape {:?}",
                        e - s,
                        info.shape
                    ),
                ));
            }
            entries.push((
                name,
                TensorEntry {
                    file: 0,
                    dtype,
                    shape: info.shape.clone(),
                    range: header_len + s..header_len + e,
                },
            ));
        }
        Ok((
            Shard {
                path: path.to_path_buf(),
                map,
                header_len,
            },
            entries,
        ))
    }
}

impl Checkpoint {
    /// Opens the checkpoint folder `dir`, known to users as `name`.
    pub fn open(name: &str, dir: &Path) -> Result<Arc<Checkpoint>> {
        if !dir.is_dir() {
            return Err(MergeError::MissingCheckpoint(dir.to_path_buf()));
        }
        let files = shard_files(dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (i, (path, expected)) in files.iter().enumerate() {
            let (shard, entries) = Shard::open(path)?;
            for (tname, mut entry) in entries {
                entry.file = i;
                if let Some(expected) = expected {
                    if !expected.contains(&tname) {
                        return Err(MergeError::BadIndex {
                            path: dir.join(INDEX_FILE),
                            reason: format!(
                                "tensor `{tname}` is in {} but the index does not map it there",
                                path.display()
                            ),
                        });
                    }
                }
                if tensors.insert(tname.clone(), entry).is_some() {
                    return Err(MergeError::DuplicateTensor {
                        path: dir.to_path_buf(),
                        tensor: tname,
                    });
                }
            }
            shards.push(shard);
        }
        // Every tensor the index names must exist in its shard.
        for (path, expected) in &files {
            if let Some(expected) = expected {
                for tname in expected {
                    if !tensors.contains_key(tname) {
                        return Err(MergeError::BadIndex {
                            path: dir.join(INDEX_FILE),
                            reason: format!(
                                "maps `{tname}` to {} which does not hold it",
                                path.display()
                            ),
                        });
                    }
                }
            }
        }
        let fingerprint = fingerprint(dir, &shards);
        Ok(Arc::new(Checkpoint {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            shards,
            tensors,
            fingerprint,
        }))
    }

    /// The name the spec used for this checkpoint.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Tensor names with their entries, sorted by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    /// The entry of one tensor.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// Borrows the raw bytes of a tensor.
    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| MergeError::MissingTensor {
                tensor: name.to_string(),
                model: self.name.clone(),
                path: self.dir.clone(),
            })?;
        Ok(TensorRef {
            dtype: entry.dtype,
            shape: &entry.shape,
            bytes: &self.shards[entry.file].map[entry.range.clone()],
        })
    }

    /// The file a tensor is stored in.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|e| self.shards[e.file].path.as_path())
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| (s.map.len() - s.header_len) as u64)
            .sum()
    }

    /// A hex digest of every shard's header and size and of config.json:
    /// changes whenever a weight file is replaced.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The parsed config.json, if the folder has one.
    pub fn config(&self) -> Result<Option<serde_json::Value>> {
        let path = self.dir.join("config.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| MergeError::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| MergeError::Config {
                path,
                reason: e.to_string(),
            })
    }
}

fn fingerprint(dir: &Path, shards: &[Shard]) -> String {
    let mut h = Sha256::new();
    for s in shards {
        h.update(s.path.file_name().unwrap_or_default().as_encoded_bytes());
        h.update((s.map.len() as u64).to_le_bytes());
        h.update(&s.map[..s.header_len]);
        // Headers and sizes catch most replacements; a sample of the data
        // (first and last 4 KiB of each shard) catches in-place rewrites
        // that keep the layout.
        let data = &s.map[s.header_len..];
        let k = data.len().min(4096);
        h.update(&data[..k]);
        h.update(&data[data.len() - k..]);
    }
    if let Ok(cfg) = std::fs::read(dir.join("config.json")) {
        h.update(&cfg);
    }
    let digest = h.finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A shard path and, for sharded checkpoints, the names its index maps there.
type ShardFile = (PathBuf, Option<BTreeSet<String>>);

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// The shard files of a folder, each with the tensor names the index maps to
/// it (`None` for an unsharded checkpoint).
fn shard_files(dir: &Path) -> Result<Vec<ShardFile>> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| MergeError::io(&index, e))?;
        let parsed: ShardIndex = serde_json::from_str(&text).map_err(|e| MergeError::BadIndex {
            path: index.clone(),
            reason: e.to_string(),
        })?;
        let mut by_file: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (tensor, file) in parsed.weight_map {
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(MergeError::BadIndex {
                    path: index.clone(),
                    reason: format!("shard name `{file}` must be a plain file name"),
                });
            }
            by_file.entry(file).or_default().insert(tensor);
        }
        if by_file.is_empty() {
            return Err(MergeError::BadIndex {
                path: index,
                reason: "weight_map is empty".into(),
            });
        }
        return Ok(by_file
            .into_iter()
            .map(|(f, names)| (dir.join(f), Some(names)))
            .collect());
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(vec![(single, None)]);
    }
    Err(MergeError::NoWeights {
        path: dir.to_path_buf(),
    })
}
