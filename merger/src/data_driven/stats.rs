//! The statistics cache: per-(checkpoint, calibration inputs) statistics
//! that cost forward passes, kept on disk so that a second merge over any
//! subset of the same experts runs none.
//!
//! What is kept: each expert's diagonal Fisher (`fisher_merging`) and its
//! Gram matrices (`regmean`), one safetensors file per (kind, expert)
//! named by a SHA-256 key of the kind, a format version, the checkpoint's
//! fingerprint (a hash of its tensor bytes, so a changed checkpoint misses),
//! a digest of the expert's calibration inputs (their tokens, so a changed
//! calibration file misses) and the parameters that change the statistic
//! (`num_samples`, Fisher's `batch_size`). RegMean++'s Grams depend on the
//! other experts (they are taken on the merged prefix) and are not kept.
//!
//! The folder is bounded in bytes: after each write the least recently used
//! files (by modification time, refreshed on every hit) are removed until
//! the total fits. Files are written to a temporary name and renamed, so a
//! crash never leaves a half-written entry; an unreadable entry is removed
//! and counts as a miss. Hits, misses, evictions and bytes are counted
//! ([`StatsCounters`]) for the gateway's metrics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{MergeError, Result};

/// Layout version of the entries; bump when a statistic's definition
/// changes.
const FORMAT: u32 = 1;

/// What an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    /// Diagonal Fisher of every float tensor.
    Fisher,
    /// Mean Gram matrix `XᵀX / rows` of every linear layer's inputs.
    Gram,
}

impl StatKind {
    fn name(self) -> &'static str {
        match self {
            StatKind::Fisher => "fisher",
            StatKind::Gram => "gram",
        }
    }
}

/// Running counts of the cache, shared by every merge that uses it.
#[derive(Debug, Default)]
pub struct StatsCounters {
    /// Entries found.
    pub hits: AtomicU64,
    /// Entries computed.
    pub misses: AtomicU64,
    /// Entries removed to fit the bound.
    pub evictions: AtomicU64,
    /// Bytes of the entries on disk (after the last write or scan).
    pub bytes: AtomicU64,
    /// Seconds of forward passes the hits saved (what computing them took
    /// when they were written).
    pub saved_seconds_micros: AtomicU64,
}

/// A byte-bounded folder of statistics.
#[derive(Debug, Clone)]
pub struct StatsCache {
    dir: PathBuf,
    max_bytes: u64,
    counters: Arc<StatsCounters>,
    lock: Arc<Mutex<()>>,
}

/// The key of one entry.
#[derive(Debug, Clone)]
pub struct StatKey {
    kind: StatKind,
    hex: String,
}

impl StatKey {
    /// The key of `kind` for the checkpoint of `fingerprint` on calibration
    /// inputs of digest `calibration`, with the parameters that change it.
    pub fn new(
        kind: StatKind,
        fingerprint: &str,
        calibration: &str,
        params: &[(&str, f64)],
    ) -> Self {
        let mut h = Sha256::new();
        h.update(format!(
            "{}\n{FORMAT}\n{fingerprint}\n{calibration}\n",
            kind.name()
        ));
        for (k, v) in params {
            h.update(format!("{k}={v}\n"));
        }
        let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        StatKey { kind, hex }
    }

    fn file(&self) -> String {
        format!("{}-{}.safetensors", self.kind.name(), &self.hex[..32])
    }
}

impl StatsCache {
    /// A cache in `dir` (created when first written) bounded by
    /// `max_bytes`.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Self {
        let cache = StatsCache {
            dir: dir.into(),
            max_bytes,
            counters: Arc::default(),
            lock: Arc::default(),
        };
        let bytes = cache.entries().iter().map(|e| e.1).sum();
        cache.counters.bytes.store(bytes, Ordering::Relaxed);
        cache
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bound in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The counts.
    pub fn counters(&self) -> &Arc<StatsCounters> {
        &self.counters
    }

    /// `(path, bytes, modified)` of every entry.
    fn entries(&self) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((e.path(), m.len(), m.modified().ok()?))
            })
            .collect()
    }

    /// The entry of `key` on `device`, if kept and readable (a hit
    /// refreshes its age).
    pub fn get(&self, key: &StatKey, device: &Device) -> Option<HashMap<String, Tensor>> {
        let path = self.dir.join(key.file());
        if !path.is_file() {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match candle_core::safetensors::load(&path, device) {
            Ok(mut t) => {
                if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                if let Some(s) = t.remove("__seconds__") {
                    if let Ok(v) = s.to_vec1::<f64>() {
                        let micros = (v.first().copied().unwrap_or(0.0) * 1e6) as u64;
                        self.counters
                            .saved_seconds_micros
                            .fetch_add(micros, Ordering::Relaxed);
                    }
                }
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Some(t)
            }
            Err(_) => {
                // Unreadable (truncated, corrupt, another format): recomputed.
                let _ = std::fs::remove_file(&path);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Keeps `tensors` under `key` (computed in `seconds`), then evicts the
    /// least recently used entries past the bound. An entry larger than the
    /// bound is not kept.
    pub fn put(
        &self,
        key: &StatKey,
        tensors: &HashMap<String, Tensor>,
        seconds: f64,
    ) -> Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::create_dir_all(&self.dir).map_err(|e| MergeError::io(&self.dir, e))?;
        let path = self.dir.join(key.file());
        let tmp = self
            .dir
            .join(format!(".{}.tmp-{}", key.file(), std::process::id()));
        let mut all = tensors.clone();
        all.insert("__seconds__".into(), Tensor::new(&[seconds], &Device::Cpu)?);
        let cpu: HashMap<String, Tensor> = all
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&cpu, &tmp)?;
        let size = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
        if size > self.max_bytes {
            let _ = std::fs::remove_file(&tmp);
            return Ok(());
        }
        std::fs::rename(&tmp, &path).map_err(|e| MergeError::io(&path, e))?;
        let mut entries = self.entries();
        entries.sort_by_key(|e| e.2);
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        for (p, bytes, _) in entries {
            if total <= self.max_bytes {
                break;
            }
            if p == path {
                continue;
            }
            if std::fs::remove_file(&p).is_ok() {
                total -= bytes;
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.counters.bytes.store(total, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize) -> HashMap<String, Tensor> {
        HashMap::from([(
            "g".to_string(),
            Tensor::zeros((n, n), candle_core::DType::F64, &Device::Cpu).unwrap(),
        )])
    }

    #[test]
    fn keys_change_with_every_input_and_the_bound_evicts_the_oldest() {
        let k = |f: &str, c: &str, n: f64| {
            StatKey::new(StatKind::Gram, f, c, &[("num_samples", n)]).hex
        };
        assert_eq!(k("a", "c", 1.0), k("a", "c", 1.0));
        assert_ne!(k("a", "c", 1.0), k("b", "c", 1.0));
        assert_ne!(k("a", "c", 1.0), k("a", "d", 1.0));
        assert_ne!(k("a", "c", 1.0), k("a", "c", 2.0));
        assert_ne!(
            StatKey::new(StatKind::Fisher, "a", "c", &[]).hex,
            StatKey::new(StatKind::Gram, "a", "c", &[]).hex
        );

        let dir = tempfile::tempdir().unwrap();
        // One 32×32 f64 entry is a little over 8 KiB: room for two.
        let cache = StatsCache::new(dir.path().join("stats"), 20_000);
        let keys: Vec<StatKey> = (0..3)
            .map(|i| StatKey::new(StatKind::Gram, &format!("f{i}"), "c", &[]))
            .collect();
        assert!(cache.get(&keys[0], &Device::Cpu).is_none());
        cache.put(&keys[0], &entry(32), 1.5).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.put(&keys[1], &entry(32), 1.0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // A hit refreshes key 0, so key 1 is the oldest when key 2 arrives.
        let got = cache.get(&keys[0], &Device::Cpu).unwrap();
        assert_eq!(got["g"].dims(), &[32, 32]);
        assert!(!got.contains_key("__seconds__"));
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.put(&keys[2], &entry(32), 1.0).unwrap();
        let c = cache.counters();
        assert_eq!(c.evictions.load(Ordering::Relaxed), 1);
        assert!(cache.get(&keys[1], &Device::Cpu).is_none());
        assert!(cache.get(&keys[0], &Device::Cpu).is_some());
        assert!(c.bytes.load(Ordering::Relaxed) <= 20_000);
        assert_eq!(c.saved_seconds_micros.load(Ordering::Relaxed), 3_000_000);
        // A corrupt entry is a miss, and removed.
        let victim = cache.dir().join(keys[2].file());
        std::fs::write(&victim, b"not safetensors").unwrap();
        assert!(cache.get(&keys[2], &Device::Cpu).is_none());
        assert!(!victim.exists());
    }
}
