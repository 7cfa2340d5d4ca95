//! Evaluation results on disk: one JSON file per evaluation under
//! `<data dir>/evaluations/`, written atomically (a temporary file in the
//! same folder, flushed, then renamed over the old one), read back at start
//! so results and their metrics survive a restart.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::record::RunRecord;
use crate::error::{GatewayError, Result};

/// Environment variable naming the data folder when `server.data_dir` is not set.
pub const DATA_DIR_ENV: &str = "FUSION_DATA_DIR";
/// The data folder when neither `server.data_dir` nor [`DATA_DIR_ENV`] says.
pub const DEFAULT_DATA_DIR: &str = "fusion-data";
/// Version of the file format.
const FORMAT_VERSION: u32 = 1;

/// The data folder: `server.data_dir`, else `$FUSION_DATA_DIR`, else `./fusion-data`.
pub fn data_dir(configured: Option<&Path>) -> PathBuf {
    configured
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(DATA_DIR_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
}

/// What the file of one evaluation holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// Format version.
    pub version: u32,
    /// The evaluation's name.
    pub name: String,
    /// Its merge string when the result was written.
    pub merge: String,
    /// The last run (success or error).
    pub last: Option<RunRecord>,
    /// The last successful run (its scores feed the metrics).
    pub last_success: Option<RunRecord>,
}

impl Saved {
    /// A file's content for `name`.
    pub fn new(
        name: &str,
        merge: &str,
        last: Option<RunRecord>,
        last_success: Option<RunRecord>,
    ) -> Self {
        Saved {
            version: FORMAT_VERSION,
            name: name.to_string(),
            merge: merge.to_string(),
            last,
            last_success,
        }
    }
}

/// The folder of result files.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// FNV-1a, 64 bits: a file name that stays the same across builds.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Store {
    /// Results under `data_dir/evaluations`.
    pub fn new(data_dir: &Path) -> Self {
        Store {
            dir: data_dir.join("evaluations"),
        }
    }

    /// The results folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of evaluation `name`: its name made file-safe (any
    /// character outside `[A-Za-z0-9_.-]` becomes `_`, at most 64 kept) and
    /// a hash of the full name, so distinct names never share a file.
    pub fn path(&self, name: &str) -> PathBuf {
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        self.dir.join(format!("{safe}-{:016x}.json", fnv1a(name)))
    }

    /// The saved results of `name`; `None` when there is no file. A file
    /// that cannot be read or parsed is an error naming it.
    pub fn load(&self, name: &str) -> Result<Option<Saved>> {
        let path = self.path(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(GatewayError::Internal(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        let saved: Saved = serde_json::from_str(&text).map_err(|e| {
            GatewayError::Internal(format!("{}: not an evaluation result: {e}", path.display()))
        })?;
        if saved.name != name {
            return Err(GatewayError::Internal(format!(
                "{}: holds evaluation `{}`, not `{name}`",
                path.display(),
                saved.name
            )));
        }
        Ok(Some(saved))
    }

    /// Removes the file of `name` (none is fine).
    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(GatewayError::Internal(format!(
                "cannot remove {}: {e}",
                path.display()
            ))),
        }
    }

    /// Writes `saved` atomically: readers see the old file or the new one,
    /// never a part.
    pub fn save(&self, saved: &Saved) -> Result<()> {
        let io = |what: &str, p: &Path, e: std::io::Error| {
            GatewayError::Internal(format!("cannot {what} {}: {e}", p.display()))
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| io("create", &self.dir, e))?;
        let path = self.path(&saved.name);
        let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
        let text = serde_json::to_string_pretty(saved)
            .map_err(|e| GatewayError::Internal(format!("serializing a result: {e}")))?;
        let mut file = std::fs::File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
        file.write_all(text.as_bytes())
            .and_then(|_| file.write_all(b"\n"))
            .and_then(|_| file.sync_all())
            .map_err(|e| io("write", &tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io("replace", &path, e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::{Outcome, Trigger};
    use super::*;

    fn record(id: &str, outcome: Outcome) -> RunRecord {
        RunRecord {
            id: id.to_string(),
            trigger: Trigger::Schedule,
            outcome,
            model: Some("demo/base".into()),
            started: 10.0,
            finished: 12.5,
            duration_seconds: 2.5,
            tasks: Vec::new(),
            average: None,
            degraded: false,
            below_min_score: Vec::new(),
            error: None,
        }
    }

    #[test]
    fn file_names_are_safe_and_distinct() {
        let s = Store::new(Path::new("/data"));
        let a = s.path("ties_merging(math,code;density=0.2)");
        let b = s.path("ties_merging(math,code;density=0.3)");
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("ties_merging_math_code_density_0.2_-"),
            "{name}"
        );
        assert!(a.starts_with("/data/evaluations"));
        // FNV-1a of the empty string is its offset basis; of "a", the known value.
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(dir.path());
        assert_eq!(s.load("x").unwrap(), None);
        let saved = Saved::new(
            "x",
            "base",
            Some(record("r2", Outcome::Error)),
            Some(record("r1", Outcome::Success)),
        );
        s.save(&saved).unwrap();
        assert_eq!(s.load("x").unwrap(), Some(saved.clone()));
        // Saving again replaces the file and leaves no temporary behind.
        s.save(&saved).unwrap();
        let files: Vec<_> = std::fs::read_dir(s.dir()).unwrap().collect();
        assert_eq!(files.len(), 1);
        std::fs::write(s.path("x"), "{not json").unwrap();
        let e = s.load("x").unwrap_err().to_string();
        assert!(e.contains("not an evaluation result"), "{e}");
        s.remove("x").unwrap();
        assert_eq!(s.load("x").unwrap(), None);
        s.remove("x").unwrap();
    }
}
