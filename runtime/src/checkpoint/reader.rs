//! Validated reading of a checkpoint folder, safe against files that change
//! under the process.
//!
//! Tensors are read with `pread` into buffers the caller owns, never served
//! from a memory map: a file truncated by another process gives a short read
//! (an error naming the file), where a mapped page past the new end would
//! kill the process with SIGBUS. Every read is followed by an `fstat` of the
//! open file: a file rewritten in place or truncated since it was opened
//! fails the read ([`RuntimeError::Changed`]), so a merge never mixes two
//! versions of a file. A file replaced by rename leaves the opened version
//! intact (its inode lives while open), so reads stay consistent with the
//! fingerprint; [`Checkpoint::changed`] tells callers that the path now
//! names another version.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo};

use super::fingerprint;
use super::identity::{FileStamp, Identity, Stamps};
use super::{INDEX_FILE, SIDE_FILES, SINGLE_FILE};
use crate::error::{Result, RuntimeError};
use crate::onnx::{onnx_file, OnnxModel};

/// Where one tensor lives inside a checkpoint.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Index into the checkpoint's shard files.
    pub file: usize,
    /// Element type as stored.
    pub dtype: DType,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Byte range of the data inside its file.
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
    file: File,
    /// The version opened (from `fstat` of `file`).
    identity: Identity,
    header_len: usize,
}

/// An opened checkpoint folder: every shard open, every header validated,
/// every file it depends on stamped with its identity.
pub struct Checkpoint {
    name: String,
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorEntry>,
    /// Integer tensors (buffers such as BERT's `embeddings.position_ids`),
    /// by name, with their dtype: not weights, never read or merged.
    buffers: BTreeMap<String, String>,
    /// Digest of the side files (config, tokenizer), read at open.
    side_digest: [u8; 32],
    stamps: Stamps,
    fingerprint: OnceLock<String>,
    /// The parsed model of an ONNX checkpoint (`model.onnx`, read whole at
    /// open): its mapped float initializers are the tensors.
    onnx: Option<Arc<OnnxModel>>,
}

/// A borrowed view of one stored tensor: its raw little-endian bytes.
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    /// Element type of `bytes`.
    pub dtype: DType,
    /// Shape of the tensor.
    pub shape: &'a [usize],
    /// The raw data.
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

/// The values of a tensor read from its file, in the stored dtype.
enum Values {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
}

/// One stored tensor read into memory the caller owns (aligned for its
/// dtype): immune to what happens to the file afterwards.
pub struct TensorBuf {
    /// Shape of the tensor.
    pub shape: Vec<usize>,
    values: Values,
}

impl TensorBuf {
    /// Element type as stored.
    pub fn dtype(&self) -> DType {
        match self.values {
            Values::F32(_) => DType::F32,
            Values::F16(_) => DType::F16,
            Values::BF16(_) => DType::BF16,
        }
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.values {
            Values::F32(v) => bytemuck::cast_slice(v),
            Values::F16(v) => bytemuck::cast_slice(v),
            Values::BF16(v) => bytemuck::cast_slice(v),
        }
    }

    /// A borrowed view, what merge methods read.
    pub fn view(&self) -> TensorRef<'_> {
        TensorRef {
            dtype: self.dtype(),
            shape: &self.shape,
            bytes: self.bytes(),
        }
    }

    /// Decodes the tensor into an f32 vector.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.view().to_f32_vec()
    }

    /// A buffer of f32 values computed in memory (`values` has the
    /// shape's element count).
    pub fn from_f32(shape: Vec<usize>, values: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        TensorBuf {
            shape,
            values: Values::F32(values),
        }
    }

    /// The values as f32 (no copy when stored as f32).
    pub fn into_f32_vec(self) -> Vec<f32> {
        match self.values {
            Values::F32(v) => v,
            _ => self.to_f32_vec(),
        }
    }

    /// Decodes the tensor into an f32 candle tensor on `device`.
    pub fn to_f32_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        self.view().to_f32_tensor(device)
    }

    /// A CPU tensor in the stored dtype, taking the buffer (no copy).
    pub fn into_tensor(self) -> candle_core::Result<Tensor> {
        let shape = self.shape;
        match self.values {
            Values::F32(v) => Tensor::from_vec(v, shape, &Device::Cpu),
            Values::F16(v) => Tensor::from_vec(v, shape, &Device::Cpu),
            Values::BF16(v) => Tensor::from_vec(v, shape, &Device::Cpu),
        }
    }
}

/// Reads above this size are split into parallel `pread`s of this size.
const READ_CHUNK: usize = 8 << 20;

/// Reads `n` values of `T` at byte `offset` of `file` into a new vector,
/// without zeroing it first. A read that ends early (the file is shorter
/// than expected) is an `UnexpectedEof` error.
fn read_values<T: bytemuck::Pod + Send>(
    file: &File,
    offset: u64,
    n: usize,
) -> std::io::Result<Vec<T>> {
    use std::os::fd::AsRawFd;
    let bytes = n
        .checked_mul(std::mem::size_of::<T>())
        .ok_or_else(|| std::io::Error::other("tensor size overflows"))?;
    let mut v: Vec<T> = Vec::with_capacity(n);
    let fd = file.as_raw_fd();
    let base = v.as_mut_ptr() as usize;
    let read_range = |start: usize, len: usize| -> std::io::Result<()> {
        let mut done = 0;
        while done < len {
            // SAFETY: the destination lies inside the vector's allocation
            // (`bytes` bytes of capacity); the kernel writes at most
            // `len - done` bytes there. No reference to the uninitialised
            // memory is made.
            let r = unsafe {
                libc::pread(
                    fd,
                    (base + start + done) as *mut libc::c_void,
                    len - done,
                    (offset + (start + done) as u64) as libc::off_t,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += r as usize;
        }
        Ok(())
    };
    if bytes <= READ_CHUNK {
        read_range(0, bytes)?;
    } else {
        (0..bytes.div_ceil(READ_CHUNK))
            .into_par_iter()
            .try_for_each(|i| {
                let start = i * READ_CHUNK;
                read_range(start, READ_CHUNK.min(bytes - start))
            })?;
    }
    // SAFETY: every byte of the first `n` elements was written by `pread`,
    // and any bit pattern is a valid `T` (`Pod`).
    unsafe { v.set_len(n) };
    Ok(v)
}

/// The error for a file whose identity is no longer `opened`.
fn changed(path: &Path, opened: &Identity, file: &File, during: &str) -> RuntimeError {
    let what = match file.metadata() {
        Ok(m) => Identity::of(&m).change_from(opened),
        Err(e) => e.to_string(),
    };
    RuntimeError::Changed {
        path: path.to_path_buf(),
        reason: format!("{what} while {during}"),
    }
}

/// Reads a whole small file by path between two `stat`s, stamping it; a
/// file that changes while read is an error.
fn read_stamped(path: &Path) -> Result<(Option<Vec<u8>>, FileStamp)> {
    let before = Identity::at(path);
    let bytes = match before {
        None => None,
        Some(_) => Some(std::fs::read(path).map_err(|e| RuntimeError::io(path, e))?),
    };
    let after = Identity::at(path);
    if after != before {
        return Err(RuntimeError::Changed {
            path: path.to_path_buf(),
            reason: "changed while it was being read".to_string(),
        });
    }
    Ok((
        bytes,
        FileStamp {
            path: path.to_path_buf(),
            identity: before,
        },
    ))
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
pub fn decode_chunk(dtype: DType, b: &[u8], o: &mut [f32]) {
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

/// Integer and boolean dtypes: buffers, not weights.
fn is_integer(dtype: safetensors::Dtype) -> bool {
    use safetensors::Dtype as D;
    matches!(
        dtype,
        D::BOOL | D::U8 | D::I8 | D::I16 | D::U16 | D::I32 | D::U32 | D::I64 | D::U64
    )
}

fn supported(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Corrupt {
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

/// Largest header accepted (the `safetensors` crate's cap).
const MAX_HEADER: usize = 100_000_000;

/// The tensor table of a safetensors header, as the `safetensors` crate
/// parses it (`__metadata__` aside).
#[derive(serde::Deserialize)]
struct RawHeader {
    #[serde(rename = "__metadata__")]
    _metadata: Option<std::collections::HashMap<String, String>>,
    #[serde(flatten)]
    tensors: std::collections::HashMap<String, TensorInfo>,
}

/// Parses and validates a header (contiguous offsets, byte lengths that
/// match shapes) with the `safetensors` crate's own checks.
fn parse_header(bytes: &[u8]) -> std::result::Result<Metadata, safetensors::SafeTensorError> {
    use safetensors::SafeTensorError as E;
    let text = std::str::from_utf8(bytes).map_err(E::InvalidHeader)?;
    let raw: RawHeader = serde_json::from_str(text).map_err(E::InvalidHeaderDeserialization)?;
    let mut tensors: Vec<(String, TensorInfo)> = raw.tensors.into_iter().collect();
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    Metadata::new(None, tensors)
}

impl Shard {
    /// The shard, its float tensors, and its integer buffers (name, dtype).
    #[allow(clippy::type_complexity)]
    fn open(path: &Path) -> Result<(Shard, Vec<(String, TensorEntry)>, Vec<(String, String)>)> {
        use safetensors::SafeTensorError as E;
        let file = File::open(path).map_err(|e| RuntimeError::io(path, e))?;
        let meta = file.metadata().map_err(|e| RuntimeError::io(path, e))?;
        let identity = Identity::of(&meta);
        let file_len = usize::try_from(identity.size())
            .map_err(|_| corrupt(path, "file is larger than this platform can address"))?;
        let read = |offset: usize, n: usize| -> Result<Vec<u8>> {
            read_values::<u8>(&file, offset as u64, n).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    changed(path, &identity, &file, "its header was being read")
                }
                _ => RuntimeError::io(path, e),
            })
        };
        if file_len < 8 {
            return Err(corrupt(path, explain(E::HeaderTooSmall, file_len)));
        }
        let len_bytes: [u8; 8] = read(0, 8)?.try_into().expect("8 bytes");
        let n = usize::try_from(u64::from_le_bytes(len_bytes)).unwrap_or(usize::MAX);
        if n > MAX_HEADER {
            return Err(corrupt(path, explain(E::HeaderTooLarge, file_len)));
        }
        let header_len = 8 + n;
        if header_len > file_len {
            return Err(corrupt(path, explain(E::InvalidHeaderLength, file_len)));
        }
        let header = read(8, n)?;
        let meta = parse_header(&header).map_err(|e| corrupt(path, explain(e, file_len)))?;
        if header_len + meta.data_len() != file_len {
            return Err(corrupt(
                path,
                explain(E::MetadataIncompleteBuffer, file_len),
            ));
        }
        let mut entries = Vec::new();
        let mut buffers = Vec::new();
        for (name, info) in meta.tensors() {
            if is_integer(info.dtype) {
                // Index buffers saved with the weights (BERT's
                // `embeddings.position_ids`): recorded, never read.
                buffers.push((name.clone(), format!("{:?}", info.dtype)));
                continue;
            }
            let dtype = supported(info.dtype).ok_or_else(|| RuntimeError::UnsupportedDtype {
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
                file,
                identity,
                header_len,
            },
            entries,
            buffers,
        ))
    }

    /// Reads one tensor, then checks that the file is still the version
    /// opened (a truncated or rewritten file fails the read).
    fn read(&self, entry: &TensorEntry) -> Result<TensorBuf> {
        let offset = entry.range.start as u64;
        let n = entry.numel();
        let values = match entry.dtype {
            DType::F32 => read_values(&self.file, offset, n).map(Values::F32),
            DType::F16 => read_values(&self.file, offset, n).map(Values::F16),
            DType::BF16 => read_values(&self.file, offset, n).map(Values::BF16),
            other => unreachable!("dtype {other:?} is rejected when the checkpoint is opened"),
        };
        let during = "a tensor was being read";
        let values = values.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                changed(&self.path, &self.identity, &self.file, during)
            }
            _ => RuntimeError::io(&self.path, e),
        })?;
        self.check(during)?;
        Ok(TensorBuf {
            shape: entry.shape.clone(),
            values,
        })
    }

    /// Fails when the open file is no longer the version opened.
    fn check(&self, during: &str) -> Result<()> {
        let now = self
            .file
            .metadata()
            .map_err(|e| RuntimeError::io(&self.path, e))?;
        if !Identity::of(&now).same_open_version(&self.identity) {
            return Err(changed(&self.path, &self.identity, &self.file, during));
        }
        Ok(())
    }
}

impl Checkpoint {
    /// Opens the checkpoint folder `dir`, known to users as `name`: parses
    /// and validates every header, reads the side files (config,
    /// tokenizer) and stamps every file. The weights' content hash is
    /// computed on the first [`Checkpoint::fingerprint`].
    pub fn open(name: &str, dir: &Path) -> Result<Arc<Checkpoint>> {
        if !dir.is_dir() {
            return Err(RuntimeError::MissingCheckpoint(dir.to_path_buf()));
        }
        if let Some(file) = onnx_file(dir) {
            return Self::open_onnx(name, dir, &file);
        }
        let (files, index_stamp) = shard_files(dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        let mut buffers = BTreeMap::new();
        for (i, (path, expected)) in files.iter().enumerate() {
            let (shard, entries, shard_buffers) = Shard::open(path)?;
            buffers.extend(shard_buffers);
            for (tname, mut entry) in entries {
                entry.file = i;
                if let Some(expected) = expected {
                    if !expected.contains(&tname) {
                        return Err(RuntimeError::BadIndex {
                            path: dir.join(INDEX_FILE),
                            reason: format!(
                                "tensor `{tname}` is in {} but the index does not map it there",
                                path.display()
                            ),
                        });
                    }
                }
                if tensors.insert(tname.clone(), entry).is_some() {
                    return Err(RuntimeError::DuplicateTensor {
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
                    if !tensors.contains_key(tname) && !buffers.contains_key(tname) {
                        return Err(RuntimeError::BadIndex {
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
        let mut stamps: Vec<FileStamp> = shards
            .iter()
            .map(|s| FileStamp {
                path: s.path.clone(),
                identity: Some(s.identity),
            })
            .collect();
        stamps.push(index_stamp);
        let side_digest = side_files(dir, &mut stamps)?;
        Ok(Arc::new(Checkpoint {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            shards,
            tensors,
            buffers,
            side_digest,
            stamps: Stamps(stamps),
            fingerprint: OnceLock::new(),
            onnx: None,
        }))
    }

    /// Opens an ONNX checkpoint: `model.onnx` read whole (and checked
    /// unchanged after the read), parsed, its float initializers mapped to
    /// Hugging Face names and layout ([`OnnxModel`]). Integer initializers
    /// (index buffers, quantized weights) are [`Checkpoint::buffers`].
    fn open_onnx(name: &str, dir: &Path, path: &Path) -> Result<Arc<Checkpoint>> {
        let file = File::open(path).map_err(|e| RuntimeError::io(path, e))?;
        let meta = file.metadata().map_err(|e| RuntimeError::io(path, e))?;
        let identity = Identity::of(&meta);
        let len = usize::try_from(identity.size())
            .map_err(|_| corrupt(path, "file is larger than this platform can address"))?;
        let bytes = read_values::<u8>(&file, 0, len).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                changed(path, &identity, &file, "it was being read")
            }
            _ => RuntimeError::io(path, e),
        })?;
        let shard = Shard {
            path: path.to_path_buf(),
            file,
            identity,
            header_len: 0,
        };
        shard.check("it was being read")?;
        let model = OnnxModel::parse(path, bytes)?;
        let tensors = model
            .names()
            .iter()
            .map(|(n, m)| {
                (
                    n.clone(),
                    TensorEntry {
                        file: 0,
                        dtype: DType::F32,
                        shape: m.hf_shape(),
                        range: 0..0,
                    },
                )
            })
            .collect();
        let buffers = model
            .graph()
            .initializers
            .iter()
            .filter(|t| t.data_type != crate::onnx::proto::DataType::Float)
            .map(|t| (t.name.clone(), t.data_type.to_string()))
            .collect();
        let mut stamps = vec![FileStamp {
            path: path.to_path_buf(),
            identity: Some(identity),
        }];
        let side_digest = side_files(dir, &mut stamps)?;
        Ok(Arc::new(Checkpoint {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            shards: vec![shard],
            tensors,
            buffers,
            side_digest,
            stamps: Stamps(stamps),
            fingerprint: OnceLock::new(),
            onnx: Some(Arc::new(model)),
        }))
    }

    /// The parsed model of an ONNX checkpoint.
    pub fn onnx(&self) -> Option<&Arc<OnnxModel>> {
        self.onnx.as_ref()
    }

    /// Fails when the checkpoint cannot enter a merge: an ONNX model with
    /// quantized (integer) weight initializers.
    pub fn check_mergeable(&self) -> Result<()> {
        match &self.onnx {
            Some(m) => m.check_mergeable(),
            None => Ok(()),
        }
    }

    /// [`Checkpoint::open`] with the folder's own name as the model name.
    pub fn open_folder(dir: &Path) -> Result<Arc<Checkpoint>> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Self::open(&name, dir)
    }

    /// Integer tensors stored with the weights (index buffers such as
    /// BERT's `embeddings.position_ids`), by name, with their dtype. They
    /// are not weights: not in [`Checkpoint::tensors`], never merged.
    pub fn buffers(&self) -> &BTreeMap<String, String> {
        &self.buffers
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

    /// Reads one tensor into an owned buffer. Fails (naming the file) when
    /// the file was truncated or rewritten since the checkpoint was opened.
    pub fn tensor(&self, name: &str) -> Result<TensorBuf> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| RuntimeError::MissingTensor {
                tensor: name.to_string(),
                model: self.name.clone(),
                path: self.dir.clone(),
            })?;
        if let Some(model) = &self.onnx {
            let (shape, values) = model.hf_tensor(name)?;
            return Ok(TensorBuf {
                shape,
                values: Values::F32(values),
            });
        }
        self.shards[entry.file].read(entry)
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
            .map(|s| s.identity.size() - s.header_len as u64)
            .sum()
    }

    /// A hex BLAKE3 digest of the checkpoint's content: every weight file
    /// whole (headers and tensor data), the side files (config and
    /// tokenizer). Equal fingerprints mean equal weights. Each weight
    /// file's hash is computed once per file version (kept by identity for
    /// the process), on the first call; it fails when a file changes while
    /// it is hashed.
    pub fn fingerprint(&self) -> Result<&str> {
        if let Some(f) = self.fingerprint.get() {
            return Ok(f);
        }
        let mut h = blake3::Hasher::new();
        h.update(b"fusion checkpoint fingerprint v2\0");
        for s in &self.shards {
            let digest = fingerprint::file_digest(&s.file, &s.path, s.identity)?;
            h.update(s.path.file_name().unwrap_or_default().as_encoded_bytes());
            h.update(&[0]);
            h.update(&s.identity.size().to_le_bytes());
            h.update(&digest);
        }
        h.update(&self.side_digest);
        let _ = self.fingerprint.set(h.finalize().to_hex().to_string());
        Ok(self.fingerprint.get().expect("set above"))
    }

    /// The files this checkpoint was read from, with their identities then.
    pub fn stamps(&self) -> &Stamps {
        &self.stamps
    }

    /// The first file of the checkpoint that changed on disk since it was
    /// opened (replaced, rewritten, truncated, created or removed), with
    /// what changed; `None` when the folder is as it was. One `stat` per
    /// file.
    pub fn changed(&self) -> Option<(PathBuf, String)> {
        self.stamps.changed()
    }

    /// The parsed config.json, if the folder has one.
    pub fn config(&self) -> Result<Option<serde_json::Value>> {
        let path = self.dir.join("config.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| RuntimeError::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| RuntimeError::ModelConfig {
                path,
                reason: e.to_string(),
            })
    }
}

/// Reads and stamps the side files (config, tokenizer) of `dir`: their
/// digest, for the fingerprint.
fn side_files(dir: &Path, stamps: &mut Vec<FileStamp>) -> Result<[u8; 32]> {
    let mut side = blake3::Hasher::new();
    for file in SIDE_FILES {
        let (bytes, stamp) = read_stamped(&dir.join(file))?;
        if let Some(bytes) = bytes {
            side.update(file.as_bytes());
            side.update(&(bytes.len() as u64).to_le_bytes());
            side.update(&bytes);
        }
        stamps.push(stamp);
    }
    Ok(*side.finalize().as_bytes())
}

/// A shard path and, for sharded checkpoints, the names its index maps there.
type ShardFile = (PathBuf, Option<BTreeSet<String>>);

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// The shard files of a folder, each with the tensor names the index maps to
/// it (`None` for an unsharded checkpoint), and the stamp of the index
/// (absent for an unsharded checkpoint).
fn shard_files(dir: &Path) -> Result<(Vec<ShardFile>, FileStamp)> {
    let index = dir.join(INDEX_FILE);
    let (text, stamp) = read_stamped(&index)?;
    if let Some(text) = text {
        let text = String::from_utf8(text).map_err(|e| RuntimeError::BadIndex {
            path: index.clone(),
            reason: e.to_string(),
        })?;
        let parsed: ShardIndex =
            serde_json::from_str(&text).map_err(|e| RuntimeError::BadIndex {
                path: index.clone(),
                reason: e.to_string(),
            })?;
        let mut by_file: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (tensor, file) in parsed.weight_map {
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(RuntimeError::BadIndex {
                    path: index.clone(),
                    reason: format!("shard name `{file}` must be a plain file name"),
                });
            }
            by_file.entry(file).or_default().insert(tensor);
        }
        if by_file.is_empty() {
            return Err(RuntimeError::BadIndex {
                path: index,
                reason: "weight_map is empty".into(),
            });
        }
        let files = by_file
            .into_iter()
            .map(|(f, names)| (dir.join(f), Some(names)))
            .collect();
        return Ok((files, stamp));
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok((vec![(single, None)], stamp));
    }
    Err(RuntimeError::NoWeights {
        path: dir.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint folder with f32 tensors `a` (4 KiB), `m` (8 KiB, filled
    /// with `m`) and `z` (4 KiB): `m` sits away from the file's first and
    /// last pages.
    fn write(dir: &Path, m: f32) {
        use safetensors::tensor::TensorView;
        std::fs::create_dir_all(dir).unwrap();
        let bytes =
            |n: usize, v: f32| -> Vec<u8> { (0..n).flat_map(|_| v.to_le_bytes()).collect() };
        let (a, mm, z) = (bytes(1024, 1.0), bytes(2048, m), bytes(1024, 3.0));
        let views = vec![
            (
                "a",
                TensorView::new(safetensors::Dtype::F32, vec![1024], &a).unwrap(),
            ),
            (
                "m",
                TensorView::new(safetensors::Dtype::F32, vec![2048], &mm).unwrap(),
            ),
            (
                "z",
                TensorView::new(safetensors::Dtype::F32, vec![1024], &z).unwrap(),
            ),
        ];
        safetensors::serialize_to_file(views, None, &dir.join(SINGLE_FILE)).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
    }

    fn truncate(path: &Path, len: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    #[test]
    fn a_file_truncated_after_opening_fails_the_read_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 2.0);
        let ck = Checkpoint::open("c", dir.path()).unwrap();
        assert_eq!(ck.tensor("z").unwrap().to_f32_vec(), vec![3.0; 1024]);
        let file = dir.path().join(SINGLE_FILE);
        let head = std::fs::read(&file).unwrap();
        let header_len = 8 + u64::from_le_bytes(head[..8].try_into().unwrap());
        // `a` (the first 4 KiB of data) stays whole, `z` is cut off.
        truncate(&file, header_len + 4096);
        // With a memory map this read faulted (SIGBUS) and killed the process.
        let e = ck.tensor("z").err().unwrap();
        assert!(matches!(e, RuntimeError::Changed { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("model.safetensors") && msg.contains("size changed"),
            "{msg}"
        );
        // A read within the new size gets its bytes, but the file is not the
        // version opened.
        let e = ck.tensor("a").err().unwrap().to_string();
        assert!(e.contains("changed while in use"), "{e}");
        assert!(ck.changed().is_some());
        let e = Checkpoint::open("c", dir.path()).err().unwrap().to_string();
        assert!(e.contains("truncated or padded"), "{e}");
    }

    #[test]
    fn a_file_replaced_by_rename_reads_the_version_opened_and_reports_the_change() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 2.0);
        let ck = Checkpoint::open("c", dir.path()).unwrap();
        let before = ck.fingerprint().unwrap().to_string();
        let other = tempfile::tempdir().unwrap();
        write(other.path(), 5.0);
        std::fs::rename(other.path().join(SINGLE_FILE), dir.path().join(SINGLE_FILE)).unwrap();
        // The open file is the old version, whole.
        assert_eq!(ck.tensor("m").unwrap().to_f32_vec(), vec![2.0; 2048]);
        let (path, what) = ck.changed().unwrap();
        assert_eq!(
            (path, what.as_str()),
            (dir.path().join(SINGLE_FILE), "replaced by another file")
        );
        // Reopened: the new weights, a new fingerprint.
        let again = Checkpoint::open("c", dir.path()).unwrap();
        assert_eq!(again.tensor("m").unwrap().to_f32_vec(), vec![5.0; 2048]);
        assert_ne!(again.fingerprint().unwrap(), before);
        assert!(again.changed().is_none());
    }

    #[test]
    fn fingerprints_see_tensors_between_the_first_and_last_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        write(&a, 2.0);
        write(&b, 2.5);
        write(&c, 2.0);
        let open = |d: &Path| Checkpoint::open("x", d).unwrap();
        let (fa, fb, fc) = (open(&a), open(&b), open(&c));
        assert_ne!(fa.fingerprint().unwrap(), fb.fingerprint().unwrap());
        assert_eq!(fa.fingerprint().unwrap(), fc.fingerprint().unwrap());
        // The side files count too.
        std::fs::write(c.join("tokenizer.json"), "{}").unwrap();
        assert!(fc.changed().is_some());
        assert_ne!(open(&c).fingerprint().unwrap(), fa.fingerprint().unwrap());
    }
}
