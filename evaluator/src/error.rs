//! The one error type of the `evaluator` crate.
//!
//! Every variant names the file (and, for task data, the line) it concerns,
//! so a failing evaluation says where to look.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// Everything that can go wrong while loading task pools, scoring models and
/// building comparison tables.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file or folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A task pool folder does not exist.
    #[error("task pool folder `{0}` does not exist")]
    MissingTaskPool(PathBuf),
    /// A task file named by a task pool does not exist.
    #[error("task `{task}`: task file `{path}` does not exist")]
    MissingTaskFile {
        /// The task.
        task: String,
        /// The missing file.
        path: PathBuf,
    },
    /// A task pool folder is malformed (taskpool.yaml, duplicate names, no tasks).
    #[error("task pool `{path}`: {reason}")]
    TaskPool {
        /// taskpool.yaml or the folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// One line of a JSONL task file is malformed: not JSON, a missing or
    /// mistyped field, a gold index out of range, an empty choice list.
    #[error("{}:{line}: {reason}", path.display())]
    BadLine {
        /// The task file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A task file as a whole cannot be scored (no items, one label only).
    #[error("task file `{}`: {reason}", path.display())]
    BadTask {
        /// The task file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A model pool file (pool.yaml) is malformed or names a missing folder.
    #[error("pool `{}`: {reason}", path.display())]
    Pool {
        /// pool.yaml.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An image task's classification head is missing or malformed.
    #[error("head `{path}`: {reason}")]
    Head {
        /// The head file (or what held the head).
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A comparison config (compare.yaml) is malformed.
    #[error("compare config `{}`: {reason}", path.display())]
    Config {
        /// compare.yaml.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A search config (search.yaml) is malformed; the reason names the
    /// field.
    #[error("search config `{}`: {reason}", path.display())]
    SearchConfig {
        /// search.yaml.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model being scored failed (tokenizer, forward pass) or answered
    /// with the wrong number of results.
    #[error("scoring task `{task}`: {reason}")]
    Scoring {
        /// The task.
        task: String,
        /// What went wrong.
        reason: String,
    },
    /// A long run (a search) was stopped before it finished.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A row of a comparison failed (loading, merging or scoring its model).
    #[error("row `{row}`: {source}")]
    Row {
        /// The row label.
        row: String,
        /// What failed.
        #[source]
        source: Box<EvalError>,
    },
    /// Merging a model failed (or loading one, through the merger); boxed,
    /// as merge errors are large.
    #[error(transparent)]
    Model(Box<merger::MergeError>),
    /// Loading or running a model failed (boxed: the runtime's errors are
    /// large and this one is returned everywhere).
    #[error(transparent)]
    Runtime(Box<runtime::RuntimeError>),
}

impl From<merger::MergeError> for EvalError {
    fn from(e: merger::MergeError) -> Self {
        EvalError::Model(Box::new(e))
    }
}

impl From<runtime::RuntimeError> for EvalError {
    fn from(e: runtime::RuntimeError) -> Self {
        EvalError::Runtime(Box::new(e))
    }
}

impl EvalError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.into(),
            source,
        }
    }

    /// An error on one line of a task file.
    pub fn line(path: impl Into<PathBuf>, line: usize, reason: impl Into<String>) -> Self {
        EvalError::BadLine {
            path: path.into(),
            line,
            reason: reason.into(),
        }
    }
}
