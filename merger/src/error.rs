//! The one error type of the `merger` crate.
//!
//! Every variant names what went wrong in terms a user can act on: the file,
//! the tensor, the parameter and its allowed range. The gateway maps these to
//! HTTP statuses in one place (see [`MergeError::kind`]).

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = MergeError> = std::result::Result<T, E>;

pub use runtime::ErrorKind;

/// Everything that can go wrong while reading specs, checkpoints or merging.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tensor `{tensor}` is missing from model `{model}` ({path})")]
    MissingTensor {
        tensor: String,
        model: String,
        path: PathBuf,
    },
    #[error("tensor `{tensor}` has shape {found:?} in model `{model}` but {expected:?} in `{reference}`")]
    ShapeMismatch {
        tensor: String,
        model: String,
        found: Box<[usize]>,
        reference: String,
        expected: Box<[usize]>,
    },
    #[error("unknown merge method `{name}`; known methods: {known}")]
    UnknownMethod { name: String, known: String },
    #[error("unknown parameter `{param}` for method `{method}`; accepted: {accepted}")]
    UnknownParameter {
        method: String,
        param: String,
        accepted: String,
    },
    #[error("parameter `{param}` = {value} is out of range: {expected}")]
    OutOfRange {
        param: String,
        value: String,
        expected: String,
    },
    #[error("parameter `{param}`: {reason}")]
    BadParameter { param: String, reason: String },
    #[error("parameter `{param}` = {value} is over the limit of {limit} {}", work.unit())]
    OverBound {
        param: String,
        value: u64,
        limit: u64,
        work: crate::work::Work,
    },
    #[error("the work was cancelled (a merge deleted or shut down, or a client that went away)")]
    Cancelled,
    #[error("method `{method}` takes {expected} models, got {found}")]
    ModelCount {
        method: String,
        expected: String,
        found: usize,
    },
    #[error("method `{method}` needs a base model (`base_model` in YAML, `base` in a spec)")]
    MissingBase { method: String },
    #[error("{feature} is not supported yet: {hint}")]
    Unsupported { feature: String, hint: String },
    #[error("invalid merge spec at position {position}: {reason}\n  {input}\n  {caret:>width$}", caret = "^", width = position + 1)]
    Parse {
        input: String,
        position: usize,
        reason: String,
    },
    #[error("invalid merge config `{path}`: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("invalid merge spec: {0}")]
    Spec(String),
    #[error("output folder `{0}` exists and is not empty (pass --force to replace it)")]
    OutputNotEmpty(PathBuf),
    #[error("while merging tensor `{tensor}`: {source}")]
    Tensor {
        tensor: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("model config `{path}`: {reason}")]
    ModelConfig { path: PathBuf, reason: String },
    #[error("{what} has non-finite values: {reason}")]
    NonFinite { what: String, reason: String },
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    /// An error of the model runtime (reading a checkpoint, running a model).
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
}

impl MergeError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        use MergeError::*;
        match self {
            Io { .. } | Tensor { .. } | Candle(_) => ErrorKind::Internal,
            ModelConfig { .. } => ErrorKind::Corrupt,
            NonFinite { .. } => ErrorKind::Unprocessable,
            MissingTensor { .. } => ErrorKind::NotFound,
            ShapeMismatch { .. } | ModelCount { .. } | MissingBase { .. } => {
                ErrorKind::Unprocessable
            }
            UnknownMethod { .. }
            | UnknownParameter { .. }
            | OutOfRange { .. }
            | BadParameter { .. }
            | Unsupported { .. }
            | Parse { .. }
            | Config { .. }
            | Spec(_) => ErrorKind::Invalid,
            OutputNotEmpty(_) => ErrorKind::Conflict,
            OverBound { .. } => ErrorKind::TooLarge,
            Cancelled => ErrorKind::Cancelled,
            Runtime(e) => e.kind(),
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MergeError::Io {
            path: path.into(),
            source,
        }
    }

    /// An out-of-range parameter error.
    pub fn range(param: &str, value: impl std::fmt::Display, expected: &str) -> Self {
        MergeError::OutOfRange {
            param: param.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }

    /// Attaches the tensor name to a candle error.
    pub fn in_tensor(tensor: &str, source: candle_core::Error) -> Self {
        MergeError::Tensor {
            tensor: tensor.to_string(),
            source,
        }
    }
}
