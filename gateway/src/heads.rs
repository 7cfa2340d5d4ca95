//! The frozen classification heads of image tasks, for
//! `POST /v1/classifications`: a request names a task (`mnist`, or
//! `vision/mnist` when two configured task pools have one), and the head
//! is the one its task pool names (`taskpool.yaml`'s `head`, see
//! [`evaluator::head`]), read when the request comes.

use evaluator::head::ClassHead;
use evaluator::taskpool::{TaskKind, TaskPool};

use crate::config::Config;
use crate::error::{GatewayError, Result};

/// An image task's classes and head.
#[derive(Debug, Clone)]
pub struct TaskHead {
    /// `<taskpool>/<task>`.
    pub name: String,
    /// Class names; label `i` is `classes[i]`.
    pub classes: Vec<String>,
    /// The head.
    pub head: ClassHead,
}

fn not_found(message: String) -> GatewayError {
    GatewayError::NotFound {
        message,
        param: Some("task".into()),
    }
}

/// The head of the image task `task` among the configured `taskpools`.
pub fn find(config: &Config, task: &str) -> Result<TaskHead> {
    let (pool_filter, name) = match task.split_once('/') {
        Some((p, t)) => (Some(p), t),
        None => (None, task),
    };
    if name.is_empty() {
        return Err(GatewayError::bad_param("task", "`task` is empty"));
    }
    if let Some(p) = pool_filter {
        if !config.taskpools.contains_key(p) {
            return Err(not_found(format!(
                "no task pool `{p}` is configured (taskpools: {})",
                names(config)
            )));
        }
    }
    let mut found = Vec::new();
    let mut other_kind = None;
    for (pool_name, dir) in &config.taskpools {
        if pool_filter.is_some_and(|p| p != pool_name) {
            continue;
        }
        let pool = TaskPool::open(dir).map_err(|e| {
            GatewayError::Internal(format!("task pool `{pool_name}` does not open: {e}"))
        })?;
        if let Some(spec) = pool.task(name) {
            if spec.kind == TaskKind::ImageClassification {
                found.push((pool_name.clone(), spec.clone()));
            } else {
                other_kind = Some(spec.kind);
            }
        }
    }
    let (pool_name, spec) = match (found.len(), other_kind) {
        (1, _) => found.remove(0),
        (0, Some(kind)) => {
            return Err(GatewayError::bad_param(
                "task",
                format!(
                "task `{task}` is a {kind} task; classifications need an image_classification task"
            ),
            ))
        }
        (0, None) => {
            return Err(not_found(format!(
                "no image_classification task `{task}` in the configured task pools ({})",
                names(config)
            )))
        }
        _ => {
            let where_: Vec<String> = found.iter().map(|(p, _)| format!("`{p}/{name}`")).collect();
            return Err(GatewayError::bad_param(
                "task",
                format!(
                    "task `{name}` is in several task pools: name one of {}",
                    where_.join(", ")
                ),
            ));
        }
    };
    let image = spec
        .image
        .as_ref()
        .ok_or_else(|| GatewayError::Internal(format!("task `{name}` names no head")))?;
    let head = ClassHead::load(&image.head)
        .map_err(|e| GatewayError::Internal(format!("task `{pool_name}/{name}`: {e}")))?;
    Ok(TaskHead {
        name: format!("{pool_name}/{name}"),
        classes: image.classes.clone(),
        head,
    })
}

fn names(config: &Config) -> String {
    if config.taskpools.is_empty() {
        return "none".into();
    }
    config
        .taskpools
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}
