//! ONNX models through ONNX Runtime (the `ort` crate, loaded at run time).
//!
//! - [`proto`]: a dependency-free reader of ONNX files (protobuf);
//! - [`model`]: [`OnnxModel`], an ONNX file with its initializers named as
//!   the Hugging Face checkpoint names them (Linear weights found through
//!   the graph and transposed), for merges and for writing fine-tunes;
//! - [`library`]: finding and loading `libonnxruntime` once per process;
//! - [`encoder`]: [`OnnxEncoder`], an encoder graph run by ONNX Runtime,
//!   with merged weights handed over as initializers.

pub mod encoder;
pub mod library;
pub mod model;
pub mod proto;

pub use encoder::{is_onnx_folder, OnnxEncoder};
pub use model::{onnx_file, Mapped, OnnxModel, Shaped, MODEL_FILE};
