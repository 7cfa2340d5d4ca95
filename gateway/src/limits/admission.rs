//! Admission control of generations: at most
//! `server.limits.max_concurrent_generations` run at once, at most
//! `server.limits.queue_depth` wait for a slot, and the rest get 429 with
//! Retry-After at once instead of piling up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{GatewayError, Result};

/// Retry-After of a 429.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The generation slots and their queue.
#[derive(Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    capacity: usize,
    queue_depth: usize,
    queued: Arc<AtomicUsize>,
    queue_gauge: IntGauge,
    running_gauge: IntGauge,
}

/// A generation slot; freed when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    running_gauge: IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.running_gauge.dec();
    }
}

/// Decrements the queue count when a waiting request leaves the queue,
/// admitted or cancelled (client gone).
struct QueuedGuard<'a> {
    admission: &'a Admission,
}

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        self.admission.queued.fetch_sub(1, Ordering::SeqCst);
        self.admission.queue_gauge.dec();
    }
}

impl Admission {
    /// `capacity` concurrent generations and `queue_depth` waiting requests;
    /// the gauges follow the queue and the running generations.
    pub fn new(
        capacity: usize,
        queue_depth: usize,
        queue_gauge: IntGauge,
        running_gauge: IntGauge,
    ) -> Self {
        Admission {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            queue_depth,
            queued: Arc::new(AtomicUsize::new(0)),
            queue_gauge,
            running_gauge,
        }
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// A slot: at once when one is free, after waiting in the queue when the
    /// queue has room, else 429.
    pub async fn admit(&self) -> Result<Slot> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(self.slot(permit));
        }
        let position = self.queued.fetch_add(1, Ordering::SeqCst);
        self.queue_gauge.inc();
        let guard = QueuedGuard { admission: self };
        if position >= self.queue_depth {
            drop(guard);
            return Err(GatewayError::Overloaded {
                running: self.capacity,
                queued: position,
                queue_depth: self.queue_depth,
                retry_after: RETRY_AFTER,
            });
        }
        let permit =
            self.slots.clone().acquire_owned().await.map_err(|_| {
                GatewayError::Unavailable("the server is shutting down".to_string())
            })?;
        drop(guard);
        Ok(self.slot(permit))
    }

    /// A slot for background work (scheduled evaluations), only when one
    /// is free and no request is waiting: traffic always goes first, and
    /// background work never occupies the queue. `None`: try again later.
    pub fn try_admit_idle(&self) -> Option<Slot> {
        if self.queued() > 0 {
            return None;
        }
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(self.slot(permit))
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.running_gauge.inc();
        Slot {
            _permit: permit,
            running_gauge: self.running_gauge.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> (IntGauge, IntGauge) {
        (
            IntGauge::new("q", "q").unwrap(),
            IntGauge::new("r", "r").unwrap(),
        )
    }

    #[tokio::test]
    async fn queue_then_reject_then_release() {
        let (q, r) = gauges();
        let adm = Admission::new(1, 1, q.clone(), r.clone());
        let first = adm.admit().await.unwrap();
        assert_eq!(r.get(), 1);
        // The second waits in the queue.
        let adm2 = adm.clone();
        let waiter = tokio::spawn(async move { adm2.admit().await.map(|_s| ()) });
        while adm.queued() < 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(q.get(), 1);
        // The third finds the queue full: 429 with Retry-After.
        let err = adm.admit().await.err().expect("queue is full");
        assert_eq!(err.status().as_u16(), 429);
        assert_eq!(err.retry_after(), Some(RETRY_AFTER));
        assert_eq!(q.get(), 1, "the rejected request left the queue");
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(q.get(), 0);
        assert_eq!(r.get(), 0);
        assert_eq!(adm.queued(), 0);
    }

    #[tokio::test]
    async fn background_slots_yield_to_waiting_requests() {
        let (q, r) = gauges();
        let adm = Admission::new(1, 4, q, r.clone());
        let bg = adm.try_admit_idle().expect("idle: a background slot");
        assert_eq!(r.get(), 1);
        assert!(adm.try_admit_idle().is_none(), "the only slot is taken");
        // A request waits for the slot; once it is freed the background
        // work must not take it back while the request waits.
        let adm2 = adm.clone();
        let waiter = tokio::spawn(async move { adm2.admit().await.map(|_s| ()) });
        while adm.queued() < 1 {
            tokio::task::yield_now().await;
        }
        drop(bg);
        assert!(
            adm.try_admit_idle().is_none(),
            "a request is waiting: the freed slot is its"
        );
        waiter.await.unwrap().unwrap();
        assert_eq!(adm.queued(), 0);
        assert!(adm.try_admit_idle().is_some(), "idle again");
    }

    #[tokio::test]
    async fn zero_queue_rejects_when_busy() {
        let (q, r) = gauges();
        let adm = Admission::new(2, 0, q, r);
        let _a = adm.admit().await.unwrap();
        let _b = adm.admit().await.unwrap();
        assert_eq!(adm.admit().await.err().unwrap().status().as_u16(), 429);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let (q, r) = gauges();
        let adm = Admission::new(1, 4, q.clone(), r);
        let _busy = adm.admit().await.unwrap();
        let res = tokio::time::timeout(Duration::from_millis(20), adm.admit()).await;
        assert!(res.is_err(), "still waiting when the timeout fired");
        assert_eq!(adm.queued(), 0);
        assert_eq!(q.get(), 0);
    }
}
