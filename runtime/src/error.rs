//! The one error type of the `runtime` crate.
//!
//! Every variant names what went wrong in terms a user can act on: the file,
//! the tensor, the parameter. [`RuntimeError::kind`] gives its broad class;
//! the layers above map that class to exit codes and HTTP statuses in one
//! place each.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Broad class of an error, used by callers that map errors to exit codes or
/// HTTP statuses without matching every variant. Shared by the layers above
/// (the merger re-exports it), so one mapping covers every crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request or spec is malformed (syntax, unknown names, bad values).
    Invalid,
    /// Something named does not exist (checkpoint folder, tensor, file).
    NotFound,
    /// Well-formed, but the inputs cannot be merged or run (shapes, counts).
    Unprocessable,
    /// A checkpoint file is corrupt, truncated, or changed while read.
    Corrupt,
    /// The output location is in a state we refuse to touch.
    Conflict,
    /// I/O, tensor backend or model failure on the server side.
    Internal,
    /// A parameter asks for more work or memory than the configured bound.
    TooLarge,
    /// The work was cancelled while it ran.
    Cancelled,
}

/// Everything that can go wrong while reading checkpoints, building and
/// running models, tokenizing and generating.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint folder does not exist.
    #[error("checkpoint folder `{0}` does not exist")]
    MissingCheckpoint(PathBuf),
    /// A checkpoint folder has no weights file.
    #[error(
        "checkpoint folder `{path}` has no model.safetensors nor model.safetensors.index.json"
    )]
    NoWeights {
        /// The folder.
        path: PathBuf,
    },
    /// A safetensors file is corrupt or truncated.
    #[error("corrupt safetensors file `{path}`: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint file changed between opening and reading.
    #[error("checkpoint file `{path}` changed while in use: {reason}")]
    Changed {
        /// The file.
        path: PathBuf,
        /// What changed.
        reason: String,
    },
    /// A shard index is corrupt.
    #[error("corrupt shard index `{path}`: {reason}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor appears in two shards.
    #[error("tensor `{tensor}` appears in more than one shard of `{path}`")]
    DuplicateTensor {
        /// The checkpoint folder.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
    },
    /// A tensor the caller needs is not in the checkpoint.
    #[error("tensor `{tensor}` is missing from model `{model}` ({path})")]
    MissingTensor {
        /// The tensor's name.
        tensor: String,
        /// The model's name.
        model: String,
        /// The model's folder.
        path: PathBuf,
    },
    /// A tensor's shape differs from what the architecture expects.
    #[error("tensor `{tensor}` has shape {found:?} in model `{model}` but {expected:?} in `{reference}`")]
    ShapeMismatch {
        /// The tensor's name.
        tensor: String,
        /// The model holding it.
        model: String,
        /// Its shape there.
        found: Box<[usize]>,
        /// What the expected shape comes from.
        reference: String,
        /// The expected shape.
        expected: Box<[usize]>,
    },
    /// A tensor's dtype is not one the runtime reads.
    #[error(
        "unsupported dtype {dtype} for tensor `{tensor}` in `{path}` (supported: F32, F16, BF16)"
    )]
    UnsupportedDtype {
        /// The tensor's name.
        tensor: String,
        /// Its dtype as stored.
        dtype: String,
        /// The file.
        path: PathBuf,
    },
    /// A parameter is outside its allowed range.
    #[error("parameter `{param}` = {value} is out of range: {expected}")]
    OutOfRange {
        /// The parameter's name.
        param: String,
        /// The value given.
        value: String,
        /// The allowed range.
        expected: String,
    },
    /// A parameter is malformed.
    #[error("parameter `{param}`: {reason}")]
    BadParameter {
        /// The parameter's name.
        param: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The batching scheduler's queue is full (the gateway's 429).
    #[error(
        "the server is busy: {running} sequences running and {queued} requests queued \
         (server.limits.queue_depth = {depth}); retry later"
    )]
    QueueFull {
        /// Sequences in the running batch.
        running: usize,
        /// Requests waiting to join it.
        queued: usize,
        /// The queue bound.
        depth: usize,
    },
    /// The work was cancelled while it ran (a client that went away).
    #[error("the work was cancelled (a merge deleted or shut down, or a client that went away)")]
    Cancelled,
    /// An output folder exists and is not empty.
    #[error("output folder `{0}` exists and is not empty (pass --force to replace it)")]
    OutputNotEmpty(PathBuf),
    /// A checkpoint writer was used out of order (a bug in the caller).
    #[error("checkpoint writer: {0}")]
    Writer(String),
    /// A device cannot be used.
    #[error("device `{0}` is not available: {1}")]
    Device(String, String),
    /// A tensor operation failed on one named tensor.
    #[error("tensor `{tensor}`: {source}")]
    Tensor {
        /// The tensor's name.
        tensor: String,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
    /// A model's config.json is missing, malformed or unsupported.
    #[error("model config `{path}`: {reason}")]
    ModelConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tokenizer file is missing or malformed.
    #[error("tokenizer `{path}`: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A chat template failed to render the conversation (the template's
    /// own `raise_exception`, a role it does not accept, ...).
    #[error("chat template: {0}")]
    Template(String),
    /// The input given to generate or score cannot be run (no tokens, a
    /// token id outside the vocabulary, no room left in the context).
    #[error("{0}")]
    InvalidInput(String),
    /// Generation failed on the server side.
    #[error("generation: {0}")]
    Generation(String),
    /// An input is longer than the model's context.
    #[error("{what} has {tokens} tokens, more than the model's context ({max} tokens, max_position_embeddings)")]
    ContextLength {
        /// What is too long.
        what: String,
        /// Its length in tokens.
        tokens: usize,
        /// The model's context.
        max: usize,
    },
    /// Values that should be finite are not.
    #[error("{what} has non-finite values: {reason}")]
    NonFinite {
        /// What holds them.
        what: String,
        /// Where and which.
        reason: String,
    },
    /// The model is of a kind that cannot do what was asked (a chat
    /// completion from an embedding model, say).
    #[error("{0}")]
    WrongKind(String),
    /// The model was run with inputs it cannot take (a bug in the caller).
    #[error("model: {0}")]
    Model(String),

    /// The ONNX Runtime library is not installed or not loadable.
    #[error("ONNX Runtime is not available: {0}")]
    OnnxUnavailable(String),

    /// An ONNX model file is not valid ONNX.
    #[error("corrupt ONNX model `{path}`: {reason}")]
    CorruptOnnx {
        /// The model file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A valid ONNX model that cannot be served or merged as asked (an
    /// ambiguous initializer mapping, a quantized initializer in a merge, a
    /// merged tensor with no initializer or of another shape).
    #[error("ONNX model `{path}`: {reason}")]
    Onnx {
        /// The model file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor backend error.
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

impl RuntimeError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        use RuntimeError::*;
        match self {
            Io { .. } | Device(..) | Tensor { .. } | Candle(_) | Writer(_) => ErrorKind::Internal,
            Generation(_) | Model(_) | QueueFull { .. } => ErrorKind::Internal,
            ModelConfig { .. } | Tokenizer { .. } => ErrorKind::Corrupt,
            Template(_)
            | InvalidInput(_)
            | WrongKind(_)
            | ContextLength { .. }
            | OutOfRange { .. }
            | BadParameter { .. } => ErrorKind::Invalid,
            NonFinite { .. }
            | ShapeMismatch { .. }
            | UnsupportedDtype { .. }
            | OnnxUnavailable(_)
            | Onnx { .. } => ErrorKind::Unprocessable,
            MissingCheckpoint(_) | NoWeights { .. } | MissingTensor { .. } => ErrorKind::NotFound,
            Corrupt { .. }
            | CorruptOnnx { .. }
            | Changed { .. }
            | BadIndex { .. }
            | DuplicateTensor { .. } => ErrorKind::Corrupt,
            OutputNotEmpty(_) => ErrorKind::Conflict,
            Cancelled => ErrorKind::Cancelled,
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.into(),
            source,
        }
    }

    /// An out-of-range parameter error.
    pub fn range(param: &str, value: impl std::fmt::Display, expected: &str) -> Self {
        RuntimeError::OutOfRange {
            param: param.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }

    /// Attaches the tensor name to a candle error.
    pub fn in_tensor(tensor: &str, source: candle_core::Error) -> Self {
        RuntimeError::Tensor {
            tensor: tensor.to_string(),
            source,
        }
    }
}
