//! Upper bounds of the work a merge may ask for, and cancellation.
//!
//! A parameter that scales a merge's work or memory (an optimiser's
//! iterations, router training steps and batch sizes, a rank, the length of
//! a list in the spec) is declared with the [`Work`] it counts; validation
//! checks its value against the [`Bounds`] of that kind, so a spec asking
//! for hours of work is refused before it runs. The gateway takes the
//! bounds from its configuration (`server.limits`); the CLI and the library
//! default to [`Bounds::default`], generous values meant for local use.
//!
//! A [`Cancel`] token stops a running merge: the merge loop checks it
//! between tensors, WUDI between iterations and router training between
//! steps, and the merge then fails with [`MergeError::Cancelled`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{MergeError, Result};
use crate::spec::MergeSpec;
pub use crate::work::Work;

/// The upper bound of each [`Work`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Most optimiser iterations per tensor.
    pub iterations: u64,
    /// Most router training steps.
    pub router_steps: u64,
    /// Most sequences per router training step.
    pub batch_size: u64,
    /// Most calibration inputs per expert (`num_samples`).
    pub samples: u64,
    /// Most components per task vector.
    pub rank: u64,
    /// Most entries in one list of a spec.
    pub list_len: u64,
}

impl Default for Bounds {
    /// Generous bounds for local use (the CLI): a typo of a few orders of
    /// magnitude is still caught.
    fn default() -> Self {
        Bounds {
            iterations: 1_000_000,
            router_steps: 1_000_000,
            batch_size: 65_536,
            samples: 1_000_000,
            rank: 65_536,
            list_len: 65_536,
        }
    }
}

impl Bounds {
    /// The bound of `work`.
    pub fn limit(&self, work: Work) -> u64 {
        match work {
            Work::Iterations => self.iterations,
            Work::RouterSteps => self.router_steps,
            Work::BatchSize => self.batch_size,
            Work::Samples => self.samples,
            Work::Rank => self.rank,
            Work::ListLength => self.list_len,
        }
    }

    /// `value` of parameter `param` against the bound of `work`.
    pub fn check(&self, param: &str, value: u64, work: Work) -> Result<()> {
        let limit = self.limit(work);
        if value > limit {
            return Err(MergeError::OverBound {
                param: param.to_string(),
                value,
                limit,
                work,
            });
        }
        Ok(())
    }

    /// Every list of `spec` (gradients and filter lists, at any depth)
    /// against [`Bounds::list_len`]; the error names the list.
    pub fn check_lists(&self, spec: &MergeSpec) -> Result<()> {
        for (path, len) in spec.lists() {
            self.check(&path, len as u64, Work::ListLength)?;
        }
        Ok(())
    }
}

/// What a training loop waits for before each of its steps
/// ([`Cancel::step`]).
pub type Turn = Arc<dyn Fn() + Send + Sync>;

/// A cancellation token shared by whoever may cancel a merge and the merge
/// itself; clones share the flag.
///
/// A token can also carry a [`Turn`]: the data-driven methods and router
/// training wait for it before every step (a batch of calibration data, a
/// gradient step). The gateway's turn waits, for a bounded while, until no
/// client's generation runs or waits, so that training runs at a lower
/// priority than traffic and a request arriving meanwhile waits for at
/// most one step.
#[derive(Clone, Default)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    turn: Option<Turn>,
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel")
            .field("cancelled", &self.is_cancelled())
            .field("turn", &self.turn.is_some())
            .finish()
    }
}

impl Cancel {
    /// A token not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// A token whose [`Cancel::step`] waits for `turn` first.
    pub fn with_turn(turn: Turn) -> Self {
        Cancel {
            flag: Arc::default(),
            turn: Some(turn),
        }
    }

    /// Asks the merge to stop (at its next check).
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// Before a training step: [`Cancel::check`], then the token's turn
    /// (if it has one), then `check` again (a cancellation while waiting
    /// stops the merge without its step).
    pub fn step(&self) -> Result<()> {
        self.check()?;
        if let Some(turn) = &self.turn {
            turn();
        }
        self.check()
    }

    /// [`MergeError::Cancelled`] once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            return Err(MergeError::Cancelled);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_waits_for_the_turn_and_stops_once_cancelled() {
        let turns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = turns.clone();
        let c = Cancel::with_turn(Arc::new(move || {
            seen.fetch_add(1, Ordering::SeqCst);
        }));
        c.step().unwrap();
        c.clone().step().unwrap();
        c.check().unwrap();
        assert_eq!(
            turns.load(Ordering::SeqCst),
            2,
            "a turn per step, none per check"
        );
        c.cancel();
        assert!(matches!(c.step(), Err(MergeError::Cancelled)));
        assert_eq!(turns.load(Ordering::SeqCst), 2, "no turn once cancelled");
        // Cancelled while waiting for its turn: no step.
        let slot: Arc<std::sync::OnceLock<Cancel>> = Arc::default();
        let inner = slot.clone();
        let waiting = Cancel::with_turn(Arc::new(move || {
            if let Some(c) = inner.get() {
                c.cancel();
            }
        }));
        let _ = slot.set(waiting.clone());
        assert!(matches!(waiting.step(), Err(MergeError::Cancelled)));
        assert!(Cancel::new().step().is_ok());
    }
    use crate::spec::{FilterEntry, ModelSpec, ParamValue};

    #[test]
    fn lists_at_any_depth_are_bounded_and_named() {
        let b = Bounds {
            list_len: 3,
            ..Bounds::default()
        };
        let ok = MergeSpec::new("task_arithmetic", Some("base"), &["a"])
            .with_value("scaling_coefficient", ParamValue::Gradient(vec![0.1; 3]));
        assert!(b.check_lists(&ok).is_ok());
        let long = ok
            .clone()
            .with_value("scaling_coefficient", ParamValue::Gradient(vec![0.1; 4]));
        let e = b.check_lists(&long).unwrap_err().to_string();
        assert!(
            e.contains("`parameters.scaling_coefficient` = 4") && e.contains("limit of 3"),
            "{e}"
        );
        let mut nested = ok.clone();
        nested.models[0] = ModelSpec {
            weight: Some(ParamValue::Filtered(vec![FilterEntry {
                filter: Some("mlp".into()),
                value: ParamValue::Gradient(vec![1.0; 5]),
            }])),
            ..ModelSpec::named("a")
        };
        let e = b.check_lists(&nested).unwrap_err().to_string();
        assert!(e.contains("`models[a].weight[0].value` = 5"), "{e}");
    }

    #[test]
    fn bounds_and_cancel() {
        let b = Bounds {
            iterations: 10,
            ..Bounds::default()
        };
        assert!(b.check("iterations", 10, Work::Iterations).is_ok());
        let e = b.check("iterations", 11, Work::Iterations).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::TooLarge);
        assert!(e.to_string().contains("optimiser iterations"), "{e}");
        let c = Cancel::new();
        let other = c.clone();
        assert!(c.check().is_ok());
        other.cancel();
        assert!(c.is_cancelled());
        assert_eq!(
            c.check().unwrap_err().kind(),
            crate::error::ErrorKind::Cancelled
        );
    }
}
