//! Content hashes of weight files: BLAKE3 of every byte (header and
//! tensor data), computed once per file version and kept for the process
//! by the file's [`Identity`], so reopening an unchanged checkpoint costs a
//! `stat` per file, not a read of its weights.
//!
//! A version whose modification time is within [`RACY`] of the hash is not
//! kept: timestamps are coarse (a few milliseconds), so a rewrite in place
//! of the same size right after a write could keep the identity; such a
//! file is hashed again on its next opening.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::identity::Identity;
use crate::error::{Result, RuntimeError};

/// Hashes of file versions kept at most (a few dozen bytes each).
const MAX_KEPT: usize = 4096;
/// How recent a modification must be for its version not to be kept.
const RACY: Duration = Duration::from_secs(2);
/// Bytes read per `pread` while hashing.
const CHUNK: usize = 16 << 20;

fn kept() -> std::sync::MutexGuard<'static, HashMap<Identity, [u8; 32]>> {
    static KEPT: OnceLock<Mutex<HashMap<Identity, [u8; 32]>>> = OnceLock::new();
    KEPT.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The BLAKE3 digest of the open `file` (at `path`), whose version when
/// opened is `identity`. Fails when the file changes while it is hashed.
pub(crate) fn file_digest(file: &File, path: &Path, identity: Identity) -> Result<[u8; 32]> {
    if let Some(d) = kept().get(&identity) {
        return Ok(*d);
    }
    let digest = hash(file, path, identity.size())?;
    let now = Identity::of(&file.metadata().map_err(|e| RuntimeError::io(path, e))?);
    if !now.same_open_version(&identity) {
        return Err(RuntimeError::Changed {
            path: path.to_path_buf(),
            reason: format!("{} while it was being hashed", now.change_from(&identity)),
        });
    }
    if !identity.modified_within(RACY) {
        let mut kept = kept();
        if kept.len() >= MAX_KEPT {
            kept.clear();
        }
        kept.insert(identity, digest);
    }
    Ok(digest)
}

fn hash(file: &File, path: &Path, size: u64) -> Result<[u8; 32]> {
    use std::os::unix::fs::FileExt;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK.min(size as usize)];
    let mut offset = 0u64;
    while offset < size {
        let n = CHUNK.min((size - offset) as usize);
        file.read_exact_at(&mut buf[..n], offset)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => RuntimeError::Changed {
                    path: path.to_path_buf(),
                    reason: format!(
                        "shorter than its {size} bytes (truncated) while it was being hashed"
                    ),
                },
                _ => RuntimeError::io(path, e),
            })?;
        h.update_rayon(&buf[..n]);
        offset += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_cover_every_byte_and_are_kept_by_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let mut bytes = vec![7u8; 3 * 4096 + 10];
        std::fs::write(&p, &bytes).unwrap();
        let open = |p: &Path| {
            let f = File::open(p).unwrap();
            let id = Identity::of(&f.metadata().unwrap());
            (f, id)
        };
        let (f, id) = open(&p);
        let a = file_digest(&f, &p, id).unwrap();
        assert_eq!(a, *blake3::hash(&bytes).as_bytes());
        // One byte in the middle (not in the first or last page) changes it.
        bytes[4096 + 100] ^= 1;
        let q = dir.path().join("other.safetensors");
        std::fs::write(&q, &bytes).unwrap();
        let (g, gid) = open(&q);
        assert_ne!(file_digest(&g, &q, gid).unwrap(), a);
        // A file truncated after it was opened fails, naming it.
        let (f, id) = open(&p);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(100)
            .unwrap();
        let e = file_digest(&f, &p, id).unwrap_err().to_string();
        assert!(
            e.contains("w.safetensors") && e.contains("truncated"),
            "{e}"
        );
    }
}
