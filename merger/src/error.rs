//! The one error type of the `merger` crate.
//!
//! Every variant names what went wrong in terms a user can act on: the file,
//! the tensor, the parameter and its allowed range. The gateway maps these to
//! HTTP statuses in one place (see [`MergeError::kind`]); errors of the model
//! runtime below arrive wrapped as [`MergeError::Runtime`].

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = MergeError> = std::result::Result<T, E>;

pub use runtime::ErrorKind;

/// Everything that can go wrong while reading specs, checkpoints or merging.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor the merge needs is missing from one of its models.
    #[error("tensor `{tensor}` is missing from model `{model}` ({path})")]
    MissingTensor {
        /// The tensor's name.
        tensor: String,
        /// The model's name in the spec.
        model: String,
        /// The model's folder.
        path: PathBuf,
    },
    /// Two models hold a tensor in different shapes.
    #[error("tensor `{tensor}` has shape {found:?} in model `{model}` but {expected:?} in `{reference}`")]
    ShapeMismatch {
        /// The tensor's name.
        tensor: String,
        /// The model whose shape differs.
        model: String,
        /// Its shape there.
        found: Box<[usize]>,
        /// The model the shape is compared with.
        reference: String,
        /// The shape there.
        expected: Box<[usize]>,
    },
    /// The spec names a method that does not exist.
    #[error("unknown merge method `{name}`; known methods: {known}")]
    UnknownMethod {
        /// The name given.
        name: String,
        /// Every known method, comma-separated.
        known: String,
    },
    /// The spec gives a parameter the method does not take.
    #[error("unknown parameter `{param}` for method `{method}`; accepted: {accepted}")]
    UnknownParameter {
        /// The method.
        method: String,
        /// The parameter given.
        param: String,
        /// The parameters the method takes, comma-separated.
        accepted: String,
    },
    /// A method asked for a parameter it does not declare (a bug of the
    /// method: its declaration and its code disagree).
    #[error("method `{method}` reads parameter `{param}`, which it does not declare")]
    UndeclaredParameter {
        /// The method.
        method: String,
        /// The parameter read.
        param: String,
    },
    /// A parameter is outside its allowed range.
    #[error("parameter `{param}` = {value} is out of range: {expected}")]
    OutOfRange {
        /// The parameter.
        param: String,
        /// The value given.
        value: String,
        /// The allowed range.
        expected: String,
    },
    /// A parameter is malformed (wrong type, inconsistent with another).
    #[error("parameter `{param}`: {reason}")]
    BadParameter {
        /// The parameter.
        param: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A parameter asks for more work or memory than the configured bound.
    #[error("parameter `{param}` = {value} is over the limit of {limit} {}", work.unit())]
    OverBound {
        /// The parameter.
        param: String,
        /// The value given.
        value: u64,
        /// The configured bound.
        limit: u64,
        /// What the parameter scales.
        work: crate::work::Work,
    },
    /// The merge was cancelled while it ran ([`crate::Cancel`]).
    #[error("the work was cancelled (a merge deleted or shut down, or a client that went away)")]
    Cancelled,
    /// The spec has a number of models the method does not take.
    #[error("method `{method}` takes {expected} models, got {found}")]
    ModelCount {
        /// The method.
        method: String,
        /// What it takes (`exactly 2`, `at least 1`).
        expected: String,
        /// How many the spec has.
        found: usize,
    },
    /// The method needs a base model and the spec has none.
    #[error("method `{method}` needs a base model (`base_model` in YAML, `base` in a spec)")]
    MissingBase {
        /// The method.
        method: String,
    },
    /// A feature of a spec format that is not implemented.
    #[error("{feature} is not supported yet: {hint}")]
    Unsupported {
        /// The feature.
        feature: String,
        /// What to do instead.
        hint: String,
    },
    /// A compact spec does not parse.
    #[error("invalid merge spec at position {position}: {reason}\n  {input}\n  {caret:>width$}", caret = "^", width = position + 1)]
    Parse {
        /// The spec text.
        input: String,
        /// Byte position of the problem.
        position: usize,
        /// What was expected there.
        reason: String,
    },
    /// A YAML merge config is malformed.
    #[error("invalid merge config `{path}`: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A spec is well-formed but inconsistent.
    #[error("invalid merge spec: {0}")]
    Spec(String),
    /// The output folder exists and is not empty.
    #[error("output folder `{0}` exists and is not empty (pass --force to replace it)")]
    OutputNotEmpty(PathBuf),
    /// A tensor operation failed while merging one tensor.
    #[error("while merging tensor `{tensor}`: {source}")]
    Tensor {
        /// The tensor's name.
        tensor: String,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
    /// A model's config.json lacks what a routed ensemble needs.
    #[error("model config `{path}`: {reason}")]
    ModelConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A data-driven merge without the calibration inputs it needs.
    #[error("`{method}` needs calibration inputs: {reason}")]
    NoCalibration {
        /// The method.
        method: String,
        /// What is missing and how to give it.
        reason: String,
    },
    /// A merge produced (or was given) non-finite values.
    #[error("{what} has non-finite values: {reason}")]
    NonFinite {
        /// What holds them.
        what: String,
        /// Where and which.
        reason: String,
    },
    /// A tensor backend error.
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    /// An error of the model runtime (reading a checkpoint, running a model).
    /// (Boxed: the runtime's errors are large and merge errors are returned
    /// everywhere.)
    #[error(transparent)]
    Runtime(Box<runtime::RuntimeError>),
}

impl From<runtime::RuntimeError> for MergeError {
    fn from(e: runtime::RuntimeError) -> Self {
        MergeError::Runtime(Box::new(e))
    }
}

impl MergeError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        use MergeError::*;
        match self {
            Io { .. } | Tensor { .. } | Candle(_) | UndeclaredParameter { .. } => {
                ErrorKind::Internal
            }
            ModelConfig { .. } => ErrorKind::Corrupt,
            NonFinite { .. } | NoCalibration { .. } => ErrorKind::Unprocessable,
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
