//! The scorer of scheduled evaluations: the served model ([`Runnable`])
//! behind the gateway's generation admission.
//!
//! Every scorer call (one batch of log-likelihoods, one greedy generation)
//! takes one generation slot of [`Admission`] and gives it back when the
//! call returns, so evaluations share `server.limits.max_concurrent_generations`
//! with traffic. They take a slot only when one is free and no request is
//! waiting ([`Admission::try_admit_idle`]): a request that arrives during an
//! evaluation waits for at most one batch.

use std::time::Duration;

use evaluator::runner::{Loglikelihood, Scorer};
use evaluator::EvalError;
use runtime::Runnable;

use crate::limits::admission::{Admission, Slot};

/// How long a batch waits before asking for a slot again.
const RETRY: Duration = Duration::from_millis(10);

/// A served model whose calls each hold a generation slot.
pub struct AdmittedScorer<'a> {
    model: &'a Runnable,
    admission: &'a Admission,
    stopping: &'a (dyn Fn() -> bool + Sync),
}

impl<'a> AdmittedScorer<'a> {
    /// Scores `model`, one slot of `admission` per call; stops (an error)
    /// once `stopping` says so (the server is shutting down).
    pub fn new(
        model: &'a Runnable,
        admission: &'a Admission,
        stopping: &'a (dyn Fn() -> bool + Sync),
    ) -> Self {
        AdmittedScorer {
            model,
            admission,
            stopping,
        }
    }

    /// Blocks (a rayon or blocking-pool thread, never the async runtime)
    /// until a slot is free and no request waits.
    fn slot(&self) -> evaluator::Result<Slot> {
        loop {
            if (self.stopping)() {
                return Err(EvalError::Scoring {
                    task: "(any)".to_string(),
                    reason: "the server is shutting down".to_string(),
                });
            }
            if let Some(slot) = self.admission.try_admit_idle() {
                return Ok(slot);
            }
            std::thread::sleep(RETRY);
        }
    }
}

impl Scorer for AdmittedScorer<'_> {
    fn loglikelihood_batch(
        &self,
        pairs: &[(String, String)],
    ) -> evaluator::Result<Vec<Loglikelihood>> {
        let _slot = self.slot()?;
        Scorer::loglikelihood_batch(self.model, pairs)
    }

    fn generate_greedy(&self, prompt: &str, max_tokens: usize) -> evaluator::Result<String> {
        let _slot = self.slot()?;
        Scorer::generate_greedy(self.model, prompt, max_tokens)
    }

    fn count_tokens(&self, text: &str) -> evaluator::Result<usize> {
        // Tokenizing only: no slot.
        Scorer::count_tokens(self.model, text)
    }

    fn embed(&self, texts: &[String]) -> evaluator::Result<Vec<Vec<f32>>> {
        let _slot = self.slot()?;
        Scorer::embed(self.model, texts)
    }
}
