//! Model pools: `pool.yaml`, which names a base checkpoint, its experts and
//! the task pool they are evaluated on.
//!
//! ```yaml
//! name: demo                 # the pool name (a compact spec may say `demo/...`)
//! base: models/base          # checkpoint folder of the base, relative to pool.yaml
//! experts:                   # expert name -> checkpoint folder, in table order
//!   addition: models/addition
//!   reverse: models/reverse
//! taskpool: tasks            # optional: the task pool folder
//! calibration: calibration   # optional: the unlabeled inputs of data-driven
//!                            # and routed merges (default: the task pool)
//! ```
//!
//! Checkpoint names in merge specs evaluated against a pool are its expert
//! names and `base`. A merge whose method needs a base and whose spec has
//! none gets the pool's base.

use std::path::{Path, PathBuf};

use merger::spec::MergeSpec;
use serde::Deserialize;

use crate::error::{EvalError, Result};

/// The name by which specs refer to a pool's base checkpoint.
pub const BASE_NAME: &str = "base";

/// A pool of checkpoints: a base and its fine-tuned experts.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPool {
    /// Pool name.
    pub name: String,
    /// The pool.yaml it was read from.
    pub path: PathBuf,
    /// Base checkpoint folder.
    pub base: PathBuf,
    /// Expert names and checkpoint folders, in file order.
    pub experts: Vec<(String, PathBuf)>,
    /// Task pool folder, if the pool names one.
    pub taskpool: Option<PathBuf>,
    /// Calibration task pool folder of data-driven and routed merges, if
    /// the pool names one (else the task pool serves).
    pub calibration: Option<PathBuf>,
}

/// The file name of a model pool.
pub const POOL_FILE: &str = "pool.yaml";

/// `pool.yaml` as written, before the checks of [`ModelPool::load`]: paths
/// relative to the file's folder, experts in file order. Writers of pools
/// (the demo-pool trainer, `fusion zoo synth`) build one and call
/// [`PoolFile::write`]; readers that only need the names call
/// [`PoolFile::read`].
#[derive(Debug, Clone, PartialEq)]
pub struct PoolFile {
    /// Pool name.
    pub name: String,
    /// Base checkpoint folder, relative to pool.yaml.
    pub base: PathBuf,
    /// Expert names and folders, relative to pool.yaml, in order.
    pub experts: Vec<(String, PathBuf)>,
    /// Task pool folder, relative to pool.yaml, if any.
    pub taskpool: Option<PathBuf>,
    /// Calibration task pool folder, relative to pool.yaml, if any.
    pub calibration: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: String,
    base: PathBuf,
    experts: serde_yaml_ng::Mapping,
    #[serde(default)]
    taskpool: Option<PathBuf>,
    #[serde(default)]
    calibration: Option<PathBuf>,
}

impl PoolFile {
    /// Reads and parses a `pool.yaml` (no folder is checked).
    pub fn read(path: &Path) -> Result<PoolFile> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        let bad = |reason: String| EvalError::Pool {
            path: path.to_path_buf(),
            reason,
        };
        let raw: RawPool = serde_yaml_ng::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut experts = Vec::with_capacity(raw.experts.len());
        for (k, v) in &raw.experts {
            let (Some(name), Some(p)) = (k.as_str(), v.as_str()) else {
                return Err(bad("`experts` maps names to folder paths (strings)".into()));
            };
            experts.push((name.to_string(), PathBuf::from(p)));
        }
        Ok(PoolFile {
            name: raw.name,
            base: raw.base,
            experts,
            taskpool: raw.taskpool,
            calibration: raw.calibration,
        })
    }

    /// The YAML text of this pool file.
    pub fn to_yaml(&self) -> String {
        let path = |p: &Path| serde_yaml_ng::Value::from(p.to_string_lossy().into_owned());
        let mut experts = serde_yaml_ng::Mapping::new();
        for (name, p) in &self.experts {
            experts.insert(name.as_str().into(), path(p));
        }
        let mut doc = serde_yaml_ng::Mapping::new();
        doc.insert("name".into(), self.name.as_str().into());
        doc.insert("base".into(), path(&self.base));
        doc.insert("experts".into(), experts.into());
        if let Some(t) = &self.taskpool {
            doc.insert("taskpool".into(), path(t));
        }
        if let Some(c) = &self.calibration {
            doc.insert("calibration".into(), path(c));
        }
        serde_yaml_ng::to_string(&doc).expect("a mapping serialises")
    }

    /// Writes the file to `path` (`DIR/pool.yaml`).
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_yaml()).map_err(|e| EvalError::io(path, e))
    }
}

impl ModelPool {
    /// Reads `pool.yaml`; folders are relative to its own folder and must exist.
    pub fn load(path: &Path) -> Result<ModelPool> {
        let bad = |reason: String| EvalError::Pool {
            path: path.to_path_buf(),
            reason,
        };
        let raw = PoolFile::read(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let folder = |what: &str, p: &Path| -> Result<PathBuf> {
            let full = dir.join(p);
            if full.is_dir() {
                Ok(full)
            } else {
                Err(bad(format!(
                    "{what}: checkpoint folder `{}` does not exist",
                    full.display()
                )))
            }
        };
        let base = folder("base", &raw.base)?;
        let mut experts = Vec::with_capacity(raw.experts.len());
        for (name, p) in &raw.experts {
            if name == BASE_NAME {
                return Err(bad(format!(
                    "an expert may not be named `{BASE_NAME}` (the base's name)"
                )));
            }
            experts.push((name.clone(), folder(&format!("expert `{name}`"), p)?));
        }
        if experts.is_empty() {
            return Err(bad("`experts` is empty".into()));
        }
        let taskpool = raw.taskpool.map(|t| dir.join(t));
        let calibration = raw.calibration.map(|c| dir.join(c));
        Ok(ModelPool {
            name: raw.name,
            path: path.to_path_buf(),
            base,
            experts,
            taskpool,
            calibration,
        })
    }

    /// The expert names, in file order.
    pub fn expert_names(&self) -> Vec<&str> {
        self.experts.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The folder of checkpoint `name` (an expert, or `base`).
    pub fn resolve(&self, name: &str) -> Result<PathBuf> {
        if name == BASE_NAME {
            return Ok(self.base.clone());
        }
        self.experts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| EvalError::Pool {
                path: self.path.clone(),
                reason: format!(
                    "unknown checkpoint `{name}`; this pool has `{BASE_NAME}` and the experts {}",
                    self.expert_names().join(", ")
                ),
            })
    }

    /// Checks `spec` against the pool (its `pool` prefix, its checkpoint
    /// names) and gives it the pool's base when its method needs one and it
    /// has none.
    pub fn complete(&self, mut spec: MergeSpec) -> Result<MergeSpec> {
        if let Some(p) = &spec.pool {
            if *p != self.name {
                return Err(EvalError::Pool {
                    path: self.path.clone(),
                    reason: format!("the spec names pool `{p}`, this pool is `{}`", self.name),
                });
            }
        }
        for name in spec.checkpoint_names() {
            self.resolve(name)?;
        }
        if spec.base.is_none() && merger::methods::lookup(&spec.method)?.needs_base() {
            spec.base = Some(BASE_NAME.to_string());
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for m in ["models/base", "models/sum", "models/rev"] {
            std::fs::create_dir_all(d.path().join(m)).unwrap();
        }
        std::fs::write(
            d.path().join("pool.yaml"),
            "name: demo\nbase: models/base\nexperts:\n  sum: models/sum\n  rev: models/rev\ntaskpool: tasks\n",
        )
        .unwrap();
        d
    }

    #[test]
    fn reads_pool_yaml_in_order_and_resolves_names() {
        let d = pool_dir();
        let pool = ModelPool::load(&d.path().join("pool.yaml")).unwrap();
        assert_eq!(pool.name, "demo");
        assert_eq!(pool.expert_names(), ["sum", "rev"]);
        assert_eq!(pool.resolve("base").unwrap(), d.path().join("models/base"));
        assert_eq!(pool.resolve("rev").unwrap(), d.path().join("models/rev"));
        assert_eq!(pool.taskpool, Some(d.path().join("tasks")));
        let e = pool.resolve("code").unwrap_err().to_string();
        assert!(
            e.contains("unknown checkpoint `code`") && e.contains("sum, rev"),
            "{e}"
        );
    }

    #[test]
    fn completes_specs_with_the_base_only_when_needed() {
        let d = pool_dir();
        let pool = ModelPool::load(&d.path().join("pool.yaml")).unwrap();
        let ta = pool
            .complete(MergeSpec::new("task_arithmetic", None, &["sum", "rev"]))
            .unwrap();
        assert_eq!(ta.base.as_deref(), Some("base"));
        let avg = pool
            .complete(MergeSpec::new("simple_average", None, &["sum", "rev"]))
            .unwrap();
        assert_eq!(avg.base, None);
        let mut other = MergeSpec::new("simple_average", None, &["sum"]);
        other.pool = Some("zoo".into());
        assert!(pool
            .complete(other)
            .unwrap_err()
            .to_string()
            .contains("pool `zoo`"));
        assert!(pool
            .complete(MergeSpec::new("simple_average", None, &["sum", "x"]))
            .is_err());
    }

    #[test]
    fn missing_folders_are_named() {
        let d = pool_dir();
        std::fs::write(
            d.path().join("pool.yaml"),
            "name: demo\nbase: models/base\nexperts:\n  sum: models/nope\n",
        )
        .unwrap();
        let e = ModelPool::load(&d.path().join("pool.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pool.yaml") && e.contains("expert `sum`") && e.contains("models/nope"),
            "{e}"
        );
    }
}
