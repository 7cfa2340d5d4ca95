//! The byte-bounded LRU of resident models (merged or loaded checkpoints).
//!
//! A moka future cache keyed by model name (`merge-<id>` or `pool/name`),
//! weighed by the bytes of each model's tensors (in KiB, since moka weights
//! are `u32`), bounded by `cache.max_bytes`, least recently used out first.
//! [`ModelCache::load`] runs one load per key however many requests arrive
//! together (moka's `try_get_with`); the others join it. Failed loads are not
//! cached. Removals are counted by cause.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;

use crate::error::{GatewayError, Result};
use crate::metrics::Metrics;

/// Anything the cache holds: it knows its resident size.
pub trait Resident: Send + Sync + 'static {
    /// Bytes of memory the value keeps alive.
    fn resident_bytes(&self) -> u64;
}

/// How a request got its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Resident already.
    Hit,
    /// This request loaded (merged) it.
    Miss,
    /// Another request was loading it; this one waited for that load.
    Joined,
}

impl CacheStatus {
    /// The `x-merge-cache` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Joined => "joined",
        }
    }
}

/// Weight unit: moka weights are u32, so sizes are counted in KiB (rounded
/// up), which allows single entries up to 4 TiB.
const WEIGHT_UNIT: u64 = 1024;

fn weight(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(WEIGHT_UNIT)).unwrap_or(u32::MAX)
}

/// The cache of resident models.
pub struct ModelCache<V: Resident> {
    inner: Cache<String, Arc<V>>,
    metrics: Metrics,
    max_bytes: u64,
}

impl<V: Resident> Clone for ModelCache<V> {
    fn clone(&self) -> Self {
        ModelCache {
            inner: self.inner.clone(),
            metrics: self.metrics.clone(),
            max_bytes: self.max_bytes,
        }
    }
}

impl<V: Resident> ModelCache<V> {
    /// A cache holding at most `max_bytes` of models.
    pub fn new(max_bytes: u64, metrics: Metrics) -> Self {
        let evictions = metrics.cache_evictions.clone();
        let inner = Cache::builder()
            .max_capacity(max_bytes.div_ceil(WEIGHT_UNIT).max(1))
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|_k: &String, v: &Arc<V>| weight(v.resident_bytes()))
            .eviction_listener(move |key: Arc<String>, _v, cause| {
                let cause = match cause {
                    RemovalCause::Size => "size",
                    RemovalCause::Explicit => "explicit",
                    RemovalCause::Expired => "expired",
                    RemovalCause::Replaced => return,
                };
                evictions.with_label_values(&[cause]).inc();
                tracing::info!(model = %key, cause, "model left the cache");
            })
            .build();
        ModelCache {
            inner,
            metrics,
            max_bytes,
        }
    }

    /// The configured bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The resident model `key`, counting a hit.
    pub async fn lookup(&self, key: &str) -> Option<Arc<V>> {
        let v = self.inner.get(key).await;
        if v.is_some() {
            self.metrics.cache_hits.inc();
        }
        v
    }

    /// The resident model `key` if `fresh` accepts it, counting a hit; one
    /// it rejects is evicted (cause `explicit`) and not returned.
    pub async fn lookup_fresh(&self, key: &str, fresh: impl FnOnce(&V) -> bool) -> Option<Arc<V>> {
        let v = self.inner.get(key).await?;
        if !fresh(&v) {
            self.inner.invalidate(key).await;
            self.inner.run_pending_tasks().await;
            return None;
        }
        self.metrics.cache_hits.inc();
        Some(v)
    }

    /// Evicts every resident model `stale` says is; returns their keys.
    pub async fn evict_where(&self, stale: impl Fn(&V) -> bool) -> Vec<String> {
        let keys: Vec<String> = self
            .inner
            .iter()
            .filter(|(_, v)| stale(v))
            .map(|(k, _)| k.as_ref().clone())
            .collect();
        for k in &keys {
            self.inner.invalidate(k).await;
        }
        self.inner.run_pending_tasks().await;
        keys
    }

    /// Marks `key` as just used (no hit counted), if it is resident.
    pub async fn touch(&self, key: &str) {
        let _ = self.inner.get(key).await;
    }

    /// Whether `key` is resident (no hit counted, no recency update).
    pub fn contains(&self, key: &str) -> bool {
        self.inner.contains_key(key)
    }

    /// The model `key`, loading it with `load` unless a load of the same key
    /// is already running, in which case this waits for that one. A failed
    /// load is returned to every waiter and not cached.
    pub async fn load<F>(&self, key: String, load: F) -> Result<(Arc<V>, CacheStatus)>
    where
        F: Future<Output = Result<Arc<V>>> + Send,
    {
        let ran = AtomicBool::new(false);
        let init = async {
            ran.store(true, Ordering::SeqCst);
            load.await
        };
        let result = self.inner.try_get_with(key, init).await;
        let status = if ran.load(Ordering::SeqCst) {
            self.metrics.cache_misses.inc();
            CacheStatus::Miss
        } else {
            self.metrics.cache_joins.inc();
            CacheStatus::Joined
        };
        match result {
            Ok(v) => Ok((v, status)),
            Err(e) => Err(GatewayError::clone(&e)),
        }
    }

    /// Removes `key`; whether it was resident.
    pub async fn evict(&self, key: &str) -> bool {
        let was = self.inner.contains_key(key);
        self.inner.invalidate(key).await;
        self.inner.run_pending_tasks().await;
        was
    }

    /// Every resident model (a snapshot).
    pub fn entries(&self) -> Vec<(String, Arc<V>)> {
        self.inner
            .iter()
            .map(|(k, v)| (k.as_ref().clone(), v))
            .collect()
    }

    /// Applies pending evictions and sets the size gauges.
    pub async fn refresh_gauges(&self) {
        self.inner.run_pending_tasks().await;
        let entries = self.entries();
        let bytes: u64 = entries.iter().map(|(_, v)| v.resident_bytes()).sum();
        self.metrics.cache_entries.set(entries.len() as i64);
        self.metrics.cache_bytes.set(bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    struct Blob(u64);

    impl Resident for Blob {
        fn resident_bytes(&self) -> u64 {
            self.0
        }
    }

    #[tokio::test]
    async fn one_load_for_concurrent_requests() {
        let cache: ModelCache<Blob> = ModelCache::new(1 << 20, Metrics::new());
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (cache, loads) = (cache.clone(), loads.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .load("k".into(), async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(Arc::new(Blob(10)))
                    })
                    .await
                    .map(|(_, s)| s)
            }));
        }
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap().unwrap());
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(
            statuses.iter().filter(|s| **s == CacheStatus::Miss).count(),
            1
        );
        assert_eq!(
            statuses
                .iter()
                .filter(|s| **s == CacheStatus::Joined)
                .count(),
            15
        );
        assert_eq!(cache.metrics.cache_misses.get(), 1);
        assert_eq!(cache.metrics.cache_joins.get(), 15);
        assert!(cache.lookup("k").await.is_some());
        assert_eq!(cache.metrics.cache_hits.get(), 1);
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let cache: ModelCache<Blob> = ModelCache::new(1 << 20, Metrics::new());
        let err = cache
            .load("k".into(), async {
                Err(GatewayError::Unprocessable("shapes".into()))
            })
            .await
            .err()
            .unwrap();
        assert_eq!(err.status().as_u16(), 422);
        assert!(!cache.contains("k"));
        let (v, status) = cache
            .load("k".into(), async { Ok(Arc::new(Blob(1))) })
            .await
            .unwrap();
        assert_eq!((v.0, status), (1, CacheStatus::Miss));
    }

    #[tokio::test]
    async fn least_recently_used_goes_first_when_over_budget() {
        // 3 KiB budget, 1 KiB-and-a-bit entries (2 KiB of weight each after rounding up).
        let metrics = Metrics::new();
        let cache: ModelCache<Blob> = ModelCache::new(4 * 1024, metrics.clone());
        for k in ["a", "b"] {
            cache
                .load(k.into(), async { Ok(Arc::new(Blob(1025))) })
                .await
                .unwrap();
        }
        cache.refresh_gauges().await;
        assert_eq!(metrics.cache_entries.get(), 2);
        assert_eq!(metrics.cache_bytes.get(), 2050);
        // Touch `a`, then add `c`: `b` is the least recently used.
        assert!(cache.lookup("a").await.is_some());
        cache
            .load("c".into(), async { Ok(Arc::new(Blob(1025))) })
            .await
            .unwrap();
        cache.refresh_gauges().await;
        assert!(cache.contains("a"));
        assert!(!cache.contains("b"));
        assert!(cache.contains("c"));
        assert_eq!(
            metrics.cache_evictions.with_label_values(&["size"]).get(),
            1
        );
        assert!(cache.evict("a").await);
        assert!(!cache.evict("a").await);
        assert_eq!(
            metrics
                .cache_evictions
                .with_label_values(&["explicit"])
                .get(),
            1
        );
        cache.refresh_gauges().await;
        assert_eq!(metrics.cache_entries.get(), 1);
    }

    #[tokio::test]
    async fn rejected_entries_are_evicted_not_served() {
        let metrics = Metrics::new();
        let cache: ModelCache<Blob> = ModelCache::new(1 << 20, metrics.clone());
        for (k, size) in [("a", 1), ("b", 2), ("c", 3)] {
            cache
                .load(k.into(), async move { Ok(Arc::new(Blob(size))) })
                .await
                .unwrap();
        }
        assert!(cache.lookup_fresh("a", |b| b.0 != 1).await.is_none());
        assert!(!cache.contains("a"));
        assert_eq!(metrics.cache_hits.get(), 0);
        assert_eq!(cache.lookup_fresh("b", |b| b.0 != 1).await.unwrap().0, 2);
        assert_eq!(metrics.cache_hits.get(), 1);
        assert_eq!(cache.evict_where(|b| b.0 == 3).await, vec!["c".to_string()]);
        assert!(cache.contains("b") && !cache.contains("c"));
    }

    #[test]
    fn weights_round_up() {
        assert_eq!(weight(0), 0);
        assert_eq!(weight(1), 1);
        assert_eq!(weight(1024), 1);
        assert_eq!(weight(1025), 2);
        assert_eq!(weight(u64::MAX), u32::MAX);
    }
}
