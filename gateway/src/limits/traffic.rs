//! Client work in flight (generations and embeddings, batched or alone),
//! and the turn background training waits for.
//!
//! Every client request that runs a model holds a [`TrafficGuard`] from
//! submission to its end (waiting in a queue included). A data-driven
//! merge or router training waits before each of its steps
//! ([`merger::Cancel::step`]) until no guard is held, or for at most
//! [`Traffic::max_wait`] so that a server under constant load still
//! makes progress on its merges: traffic first, training at a lower
//! priority, and a request that arrives during a step waits for that step
//! only.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use merger::Turn;

/// The longest a training step waits for traffic to end.
pub const MAX_YIELD: Duration = Duration::from_secs(2);

/// How often a waiting training step looks again.
const POLL: Duration = Duration::from_millis(5);

/// The count of client work in flight.
#[derive(Clone)]
pub struct Traffic {
    in_flight: Arc<AtomicUsize>,
    max_wait: Duration,
}

/// One client request's share of [`Traffic`]; released when dropped.
pub struct TrafficGuard(Arc<AtomicUsize>);

impl Drop for TrafficGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Traffic {
    /// No traffic yet; a training step waits for at most `max_wait`.
    pub fn new(max_wait: Duration) -> Self {
        Traffic {
            in_flight: Arc::default(),
            max_wait,
        }
    }

    /// A request starts.
    pub fn enter(&self) -> TrafficGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        TrafficGuard(self.in_flight.clone())
    }

    /// Client requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The longest a training step waits.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Blocks until no client request is in flight, or `max_wait` passed.
    pub fn wait_idle(&self) {
        let start = Instant::now();
        while self.in_flight() > 0 && start.elapsed() < self.max_wait {
            std::thread::sleep(POLL);
        }
    }

    /// [`Traffic::wait_idle`] as a merge's [`Turn`].
    pub fn turn(&self) -> Turn {
        let me = self.clone();
        Arc::new(move || me.wait_idle())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// A step waits while a request is in flight and goes once it ends;
    /// under traffic that never ends it goes after `max_wait`.
    #[test]
    fn a_turn_waits_for_traffic_to_end_and_no_longer_than_its_bound() {
        let traffic = Traffic::new(Duration::from_secs(600));
        let guard = traffic.enter();
        let _second = traffic.enter();
        drop(_second);
        assert_eq!(traffic.in_flight(), 1);
        let ended = Arc::new(AtomicBool::new(false));
        let (t, e) = (traffic.clone(), ended.clone());
        let step = std::thread::spawn(move || {
            t.turn()();
            // The step runs only once the request has ended.
            e.load(Ordering::SeqCst)
        });
        std::thread::sleep(Duration::from_millis(50));
        ended.store(true, Ordering::SeqCst);
        drop(guard);
        assert!(step.join().unwrap(), "the step ran during traffic");
        assert_eq!(traffic.in_flight(), 0);
        // Constant traffic: the bound lets the step go.
        let bounded = Traffic::new(Duration::from_millis(20));
        let _held = bounded.enter();
        bounded.turn()();
        assert_eq!(bounded.in_flight(), 1);
    }
}
