//! Checkpoint folders in Hugging Face layout: `config.json`, `model.safetensors`
//! or sharded `model-0000k-of-0000N.safetensors` with
//! `model.safetensors.index.json`, and tokenizer files.
//!
//! Every file is treated as hostile input: headers are parsed by the
//! `safetensors` crate (capped header size, offsets checked to be contiguous
//! and to cover the file exactly) and each failure names the file. Files may
//! also change while they are used: tensors are read into owned buffers and
//! checked against the file's identity (see [`reader`]), and a checkpoint
//! knows the files it was read from ([`Stamps`]) to tell when the folder has
//! changed since.

pub(crate) mod fingerprint;
pub(crate) mod identity;
pub(crate) mod reader;
pub(crate) mod writer;

pub use identity::{FileStamp, Identity, Stamps};

/// Element codecs between stored bytes (F32, F16, BF16) and f32, shared by
/// the reader, the writer and the merge kernels.
pub mod codec {
    pub use super::reader::decode_chunk;
    pub use super::writer::{bf16_bits, encode_chunk};
}
pub use reader::{Checkpoint, TensorBuf, TensorEntry, TensorRef};
pub use writer::{CheckpointWriter, WriteOptions, SIDE_FILES};

use candle_core::DType;

/// Name of the single-file weights of a checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The safetensors dtype string of a supported candle dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        _ => "unsupported",
    }
}

/// Parses a user-facing dtype name (`float32`, `f32`, `bfloat16`, `bf16`, ...).
pub fn parse_dtype(name: &str) -> Option<DType> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "float" | "fp32" => Some(DType::F32),
        "f16" | "float16" | "half" | "fp16" => Some(DType::F16),
        "bf16" | "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}
