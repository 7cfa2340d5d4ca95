//! Writing a checkpoint folder: safetensors shards laid out up front, tensor
//! data written in place as each merged tensor arrives (from any thread), side
//! files copied from the base, and the folder renamed into place only when
//! everything is written, so nothing half-written ever looks complete.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::DType;
use rayon::prelude::*;

use super::{dtype_name, INDEX_FILE, SINGLE_FILE};
use crate::error::{Result, RuntimeError};

/// Files copied from the base checkpoint next to the merged weights.
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "preprocessor_config.json",
];

/// How to write the output folder.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Largest amount of tensor data per shard, in bytes; past it the output
    /// is sharded with an index.
    pub shard_size: u64,
    /// Replace a non-empty output folder.
    pub force: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            shard_size: 5 * 1024 * 1024 * 1024,
            force: false,
        }
    }
}

struct Slot {
    file: usize,
    offset: u64,
    dtype: DType,
    numel: usize,
}

/// A checkpoint folder being written.
pub struct CheckpointWriter {
    out: PathBuf,
    tmp: Option<tempfile::TempDir>,
    files: Vec<(PathBuf, File)>,
    slots: HashMap<String, Slot>,
    force: bool,
}

impl CheckpointWriter {
    /// Lays out the output for `tensors` (name, dtype, shape, in writing
    /// order) and creates the shard files in a temporary folder next to `out`.
    pub fn create(
        out: &Path,
        tensors: &[(String, DType, Vec<usize>)],
        opts: &WriteOptions,
    ) -> Result<Self> {
        check_output(out, opts.force)?;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| RuntimeError::io(&parent, e))?;
        let stem = out
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{stem}.partial-"))
            .tempdir_in(&parent)
            .map_err(|e| RuntimeError::io(&parent, e))?;

        // Greedy sharding in the given order.
        let mut groups: Vec<Vec<usize>> = vec![vec![]];
        let mut used = 0u64;
        for (i, (_, dtype, shape)) in tensors.iter().enumerate() {
            let bytes = (shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64;
            if used > 0 && used + bytes > opts.shard_size {
                groups.push(vec![]);
                used = 0;
            }
            groups.last_mut().expect("non-empty").push(i);
            used += bytes;
        }
        let n = groups.len();
        let mut files = Vec::with_capacity(n);
        let mut slots = HashMap::with_capacity(tensors.len());
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        for (k, group) in groups.iter().enumerate() {
            let fname = if n == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
            };
            let mut header = serde_json::Map::new();
            header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
            let mut offset = 0usize;
            let mut placed = Vec::with_capacity(group.len());
            for &i in group {
                let (name, dtype, shape) = &tensors[i];
                let numel: usize = shape.iter().product();
                let len = numel * dtype.size_in_bytes();
                header.insert(
                    name.clone(),
                    serde_json::json!({"dtype": dtype_name(*dtype), "shape": shape, "data_offsets": [offset, offset + len]}),
                );
                placed.push((name.clone(), *dtype, numel, offset));
                weight_map.insert(name.clone(), fname.clone());
                offset += len;
            }
            let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
            while !hbytes.len().is_multiple_of(8) {
                hbytes.push(b' ');
            }
            let data_start = 8 + hbytes.len() as u64;
            let path = tmp.path().join(&fname);
            let file = File::create(&path).map_err(|e| RuntimeError::io(&path, e))?;
            file.set_len(data_start + offset as u64)
                .map_err(|e| RuntimeError::io(&path, e))?;
            file.write_all_at(&(hbytes.len() as u64).to_le_bytes(), 0)
                .and_then(|_| file.write_all_at(&hbytes, 8))
                .map_err(|e| RuntimeError::io(&path, e))?;
            for (name, dtype, numel, off) in placed {
                slots.insert(
                    name,
                    Slot {
                        file: k,
                        offset: data_start + off as u64,
                        dtype,
                        numel,
                    },
                );
            }
            total += offset as u64;
            files.push((path, file));
        }
        if n > 1 {
            let index =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let path = tmp.path().join(INDEX_FILE);
            std::fs::write(&path, serde_json::to_vec_pretty(&index).expect("json"))
                .map_err(|e| RuntimeError::io(&path, e))?;
        }
        Ok(CheckpointWriter {
            out: out.to_path_buf(),
            tmp: Some(tmp),
            files,
            slots,
            force: opts.force,
        })
    }

    /// Writes one tensor's values, converting f32 to the slot's dtype.
    /// Safe to call from several threads for different tensors.
    pub fn write_f32(&self, name: &str, data: &[f32]) -> Result<()> {
        let slot = self.slot(name, data.len())?;
        let (path, file) = &self.files[slot.file];
        let width = slot.dtype.size_in_bytes();
        const CHUNK: usize = 1 << 16;
        data.par_chunks(CHUNK)
            .enumerate()
            .try_for_each(|(c, values)| {
                let mut buf = vec![0u8; values.len() * width];
                encode_chunk(slot.dtype, values, &mut buf);
                file.write_all_at(&buf, slot.offset + (c * CHUNK * width) as u64)
                    .map_err(|e| RuntimeError::io(path, e))
            })
    }

    /// Writes one tensor's bytes, already in the slot's dtype.
    pub fn write_raw(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let width = self.slots.get(name).map_or(1, |s| s.dtype.size_in_bytes());
        let slot = self.slot(name, bytes.len() / width)?;
        let (path, file) = &self.files[slot.file];
        file.write_all_at(bytes, slot.offset)
            .map_err(|e| RuntimeError::io(path, e))
    }

    /// The planned slot of `name`, checked to hold `numel` elements.
    fn slot(&self, name: &str, numel: usize) -> Result<&Slot> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| RuntimeError::Writer(format!("tensor `{name}` was not planned")))?;
        if numel != slot.numel {
            return Err(RuntimeError::Writer(format!(
                "tensor `{name}`: merged {numel} values, expected {}",
                slot.numel
            )));
        }
        Ok(slot)
    }

    /// Copies config and tokenizer files from `from` (those that exist).
    pub fn copy_side_files(&self, from: &Path) -> Result<()> {
        let tmp = self.tmp.as_ref().expect("not finished").path();
        for name in SIDE_FILES {
            let src = from.join(name);
            if src.is_file() {
                let dst = tmp.join(name);
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| RuntimeError::io(parent, e))?;
                }
                std::fs::copy(&src, &dst).map_err(|e| RuntimeError::io(&src, e))?;
            }
        }
        Ok(())
    }

    /// Writes an extra file into the output folder.
    pub fn write_file(&self, name: &str, contents: &[u8]) -> Result<()> {
        let path = self.tmp.as_ref().expect("not finished").path().join(name);
        std::fs::write(&path, contents).map_err(|e| RuntimeError::io(&path, e))
    }

    /// Flushes everything and moves the folder into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        // Not fsynced: the rename protects readers from a half-written
        // folder when the merge fails; durability across power loss is left
        // to the filesystem's writeback, as other merge tools do.
        self.files.clear();
        let tmp = self.tmp.take().expect("finish once").keep();
        // Re-check: the folder may have appeared while we merged.
        check_output(&self.out, self.force)?;
        if self.out.exists() {
            std::fs::remove_dir_all(&self.out).map_err(|e| RuntimeError::io(&self.out, e))?;
        }
        if let Err(e) = std::fs::rename(&tmp, &self.out) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(RuntimeError::io(&self.out, e));
        }
        Ok(self.out.clone())
    }
}

fn check_output(out: &Path, force: bool) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            return Err(RuntimeError::OutputNotEmpty(out.to_path_buf()));
        }
        let mut entries = std::fs::read_dir(out).map_err(|e| RuntimeError::io(out, e))?;
        if entries.next().is_some() && !force {
            return Err(RuntimeError::OutputNotEmpty(out.to_path_buf()));
        }
    }
    Ok(())
}

/// f32 → bf16 bits with round-to-nearest-even (NaN stays a quiet NaN),
/// written branch-free so the compiler vectorises it.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1));
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        (rounded >> 16) as u16
    }
}

/// Encodes f32 values as little-endian `dtype` bytes.
pub fn encode_chunk(dtype: DType, values: &[f32], out: &mut [u8]) {
    use half::slice::HalfFloatSliceExt;
    match dtype {
        DType::F32 => out.copy_from_slice(bytemuck::cast_slice(values)),
        DType::BF16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&bf16_bits(x).to_le_bytes());
            }
        }
        DType::F16 => {
            let mut tmp = vec![half::f16::ZERO; values.len()];
            tmp.convert_from_f32_slice(values);
            out.copy_from_slice(bytemuck::cast_slice(&tmp));
        }
        other => unreachable!("output dtype {other:?} is rejected at validation"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half() {
        // Round-to-nearest-even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7
        // and rounds to the even 1.0; 1 + 3·2^-8 rounds up to 1 + 2^-6.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        for x in [
            0.0f32,
            -0.0,
            1.5,
            -2.75,
            3.1e-3,
            6.5e4,
            1e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
        ] {
            assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
        assert!(half::bf16::from_bits(bf16_bits(f32::NAN)).is_nan());
    }
}
