//! Measuring merges: the memory-copy floor a merge is compared against, and
//! a sampler of the process's private memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use runtime::checkpoint::Checkpoint;

/// Reads every tensor of every checkpoint into an owned buffer (what a
/// merge does with its inputs), in parallel across tensors: the floor that
/// a merge reading all its inputs cannot beat. Returns (bytes read,
/// seconds).
pub fn copy_floor(checkpoints: &[Arc<Checkpoint>]) -> (u64, f64) {
    let jobs: Vec<(&Checkpoint, &str)> = checkpoints
        .iter()
        .flat_map(|c| c.tensors().keys().map(move |n| (c.as_ref(), n.as_str())))
        .collect();
    let start = Instant::now();
    let bytes: u64 = jobs
        .par_iter()
        .map(|(c, n)| {
            let t = c.tensor(n).expect("tensor listed by the checkpoint");
            std::hint::black_box(t.bytes());
            t.bytes().len() as u64
        })
        .sum();
    (bytes, start.elapsed().as_secs_f64())
}

/// The process's current RssAnon in bytes: private memory, not counting the
/// page cache of the files read (0 where /proc is unavailable).
pub fn rss_anon() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Samples [`rss_anon`] every 5 ms on a thread until [`AnonSampler::finish`].
pub struct AnonSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl AnonSampler {
    /// Starts sampling.
    pub fn start() -> Self {
        let peak = Arc::new(AtomicU64::new(rss_anon()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_anon(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        AnonSampler {
            peak,
            stop,
            handle: Some(handle),
        }
    }

    /// Stops sampling; returns the peak in bytes.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peak.load(Ordering::Relaxed).max(rss_anon())
    }
}
