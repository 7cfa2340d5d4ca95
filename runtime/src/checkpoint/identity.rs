//! File identities: what says that a file on disk is still the version a
//! checkpoint read. An identity is (device, inode, size, mtime, ctime); a
//! rename over the file changes the inode, a rewrite in place changes the
//! mtime and ctime (and usually the size), a truncation changes the size.
//! Re-checking a checkpoint costs one `stat` per file.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The identity of one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Identity {
    /// The identity `meta` (from `stat` or `fstat`) describes.
    pub fn of(meta: &Metadata) -> Identity {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The identity of the file at `path` now (`None` when there is none).
    pub fn at(path: &Path) -> Option<Identity> {
        std::fs::metadata(path).ok().map(|m| Identity::of(&m))
    }

    /// The file size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether an open file is still the version `opened`: same inode,
    /// size and modification time. The change time is left out: it also
    /// moves when the file is unlinked (replaced by rename) while open,
    /// which leaves its bytes as they were.
    pub fn same_open_version(&self, opened: &Identity) -> bool {
        (self.dev, self.ino, self.size, self.mtime_ns)
            == (opened.dev, opened.ino, opened.size, opened.mtime_ns)
    }

    /// Whether the file was modified less than `d` ago (or in the future).
    pub fn modified_within(&self, d: std::time::Duration) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_nanos() as i128);
        now - self.mtime_ns < d.as_nanos() as i128
    }

    /// What differs from `earlier`, in words (for error messages).
    pub fn change_from(&self, earlier: &Identity) -> String {
        if (self.dev, self.ino) != (earlier.dev, earlier.ino) {
            "replaced by another file".to_string()
        } else if self.size != earlier.size {
            format!("size changed from {} to {} bytes", earlier.size, self.size)
        } else if self.mtime_ns != earlier.mtime_ns {
            "rewritten in place (modification time changed)".to_string()
        } else {
            "its status changed (change time)".to_string()
        }
    }
}

/// One file a checkpoint depends on, with its identity when it was read
/// (`None`: the file did not exist, which is also a state to keep).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    /// The file.
    pub path: PathBuf,
    /// Its identity then.
    pub identity: Option<Identity>,
}

/// The files one opened checkpoint depends on (weights, shard index,
/// config and tokenizer files), as they were when it was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamps(pub(crate) Vec<FileStamp>);

impl Stamps {
    /// The stamped files.
    pub fn files(&self) -> &[FileStamp] {
        &self.0
    }

    /// The first file whose identity on disk is no longer the stamped one,
    /// with what changed; `None` when every file is as it was.
    pub fn changed(&self) -> Option<(PathBuf, String)> {
        self.0.iter().find_map(|s| {
            let now = Identity::at(&s.path);
            if now == s.identity {
                return None;
            }
            let what = match (&s.identity, &now) {
                (Some(_), None) => "removed".to_string(),
                (None, Some(_)) => "created".to_string(),
                (Some(old), Some(new)) => new.change_from(old),
                (None, None) => unreachable!("equal"),
            };
            Some((s.path.clone(), what))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_rewrites_truncations_and_removals_are_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.bin");
        let absent = dir.path().join("tokenizer.json");
        std::fs::write(&f, b"0123456789").unwrap();
        let stamp = |p: &Path| FileStamp {
            path: p.to_path_buf(),
            identity: Identity::at(p),
        };
        let stamps = Stamps(vec![stamp(&f), stamp(&absent)]);
        assert_eq!(stamps.changed(), None);

        // Replaced by rename, same bytes: a new inode.
        let tmp = dir.path().join("w.tmp");
        std::fs::write(&tmp, b"0123456789").unwrap();
        std::fs::rename(&tmp, &f).unwrap();
        let (path, what) = stamps.changed().unwrap();
        assert_eq!(path, f);
        assert_eq!(what, "replaced by another file");

        // Truncated in place.
        let stamps = Stamps(vec![stamp(&f)]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(4)
            .unwrap();
        assert_eq!(
            stamps.changed().unwrap().1,
            "size changed from 10 to 4 bytes"
        );

        // Rewritten in place with the same size (past the timestamp tick).
        let stamps = Stamps(vec![stamp(&f)]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"abcd").unwrap();
        assert_eq!(
            stamps.changed().unwrap().1,
            "rewritten in place (modification time changed)"
        );

        // A file that appears, one that goes.
        let stamps = Stamps(vec![stamp(&f), stamp(&absent)]);
        std::fs::write(&absent, b"{}").unwrap();
        assert_eq!(
            stamps.changed().unwrap(),
            (absent.clone(), "created".into())
        );
        std::fs::remove_file(&f).unwrap();
        assert_eq!(stamps.changed().unwrap(), (f, "removed".into()));
    }
}
