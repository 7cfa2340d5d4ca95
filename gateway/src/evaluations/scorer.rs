//! The scorer of scheduled evaluations: the served model ([`Runnable`])
//! behind the gateway's generation admission.
//!
//! Greedy generations and log-likelihoods of a batched model join its
//! continuous batch at [`Priority::Background`] (a log-likelihood is a
//! sequence whose prompt is read and whose last predictions are scored):
//! they enter the running batch only when no request of a client waits,
//! and a full queue makes them wait, not fail. Every other scorer call (a
//! model that is not batched, embeddings) takes one generation slot of
//! [`Admission`] and gives it back when the call returns, so evaluations
//! share `server.limits.max_concurrent_generations` with traffic. They take
//! a slot only when one is free and no request is waiting
//! ([`Admission::try_admit_idle`]): a request that arrives during an
//! evaluation waits for at most one batch.

use std::sync::Arc;
use std::time::Duration;

use evaluator::runner::{Loglikelihood, Scorer};
use evaluator::EvalError;
use runtime::generate::{Priority, SamplingParams, Scheduler, SchedulerEvent};
use runtime::model::ModelDelta;
use runtime::{Runnable, RuntimeError};

use crate::limits::admission::{Admission, Slot};

/// How long a batch waits before asking for a slot again.
const RETRY: Duration = Duration::from_millis(10);

/// A served model whose calls each hold a generation slot.
pub struct AdmittedScorer<'a> {
    model: &'a Runnable,
    admission: &'a Admission,
    batch: Option<&'a Scheduler>,
    /// The delta of a merge held over the batch's base model.
    delta: Option<Arc<ModelDelta>>,
    stopping: &'a (dyn Fn() -> bool + Sync),
}

impl<'a> AdmittedScorer<'a> {
    /// Scores `model`, one slot of `admission` per call, its greedy
    /// generations in `batch` (the model's scheduler, with the merge's
    /// `delta` when it is held as one over the batch's base) when it has one;
    /// stops (an error) once `stopping` says so (the server is shutting
    /// down).
    pub fn new(
        model: &'a Runnable,
        admission: &'a Admission,
        batch: Option<&'a Scheduler>,
        delta: Option<Arc<ModelDelta>>,
        stopping: &'a (dyn Fn() -> bool + Sync),
    ) -> Self {
        AdmittedScorer {
            model,
            admission,
            batch,
            delta,
            stopping,
        }
    }

    fn shutting_down() -> EvalError {
        EvalError::Scoring {
            task: "(any)".to_string(),
            reason: "the server is shutting down".to_string(),
        }
    }

    /// A greedy generation in the batch at background priority: the same
    /// tokens as [`Scorer::generate_greedy`] of the model alone (the
    /// prompt encoded with BOS, stopping at an end-of-sequence token).
    fn generate_batched(
        &self,
        batch: &Scheduler,
        prompt: &str,
        max_tokens: usize,
    ) -> evaluator::Result<String> {
        let ids = batch.model().encode(prompt)?;
        let params = SamplingParams::greedy(max_tokens.max(1));
        let (tx, rx) = std::sync::mpsc::channel();
        loop {
            if (self.stopping)() {
                return Err(Self::shutting_down());
            }
            let tx = tx.clone();
            let sink = Box::new(move |ev| match ev {
                SchedulerEvent::Token(_) | SchedulerEvent::Scored(_) => true,
                SchedulerEvent::Done(done) => tx.send(done).is_ok(),
            });
            let delta = self.delta.clone();
            match batch.submit_with(ids.clone(), &params, Priority::Background, delta, sink) {
                Ok(()) => break,
                Err(RuntimeError::QueueFull { .. }) => std::thread::sleep(RETRY),
                Err(e) => return Err(e.into()),
            }
        }
        drop(tx);
        let done = rx.recv().map_err(|_| EvalError::Scoring {
            task: "(any)".to_string(),
            reason: "the batch ended the generation without a result".to_string(),
        })?;
        Ok(done?.text)
    }

    /// Log-likelihoods scored in the batch at background priority: every
    /// pair is a sequence of its own whose prompt chunks join the steps
    /// (the numbers of [`Scorer::loglikelihood_batch`] of the model alone,
    /// within rounding).
    fn score_batched(
        &self,
        batch: &Scheduler,
        pairs: &[(String, String)],
    ) -> evaluator::Result<Vec<Loglikelihood>> {
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, (context, continuation)) in pairs.iter().enumerate() {
            let request = batch.model().score_request(context, continuation)?;
            loop {
                if (self.stopping)() {
                    return Err(Self::shutting_down());
                }
                let tx = tx.clone();
                let sink = Box::new(move |ev| match ev {
                    SchedulerEvent::Scored(r) => tx.send((i, r)).is_ok(),
                    _ => true,
                });
                let delta = self.delta.clone();
                match batch.submit_score(request.clone(), Priority::Background, delta, sink) {
                    Ok(()) => break,
                    Err(RuntimeError::QueueFull { .. }) => std::thread::sleep(RETRY),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        drop(tx);
        let mut out = vec![None; pairs.len()];
        for (i, r) in rx.iter() {
            let r = r?;
            out[i] = Some(Loglikelihood {
                logprob: r.logprob,
                tokens: r.tokens,
                is_greedy: r.is_greedy,
            });
        }
        out.into_iter()
            .map(|r| {
                r.ok_or_else(|| EvalError::Scoring {
                    task: "(any)".to_string(),
                    reason: "the batch ended a scoring without a result".to_string(),
                })
            })
            .collect()
    }

    /// Blocks (a rayon or blocking-pool thread, never the async runtime)
    /// until a slot is free and no request waits.
    fn slot(&self) -> evaluator::Result<Slot> {
        loop {
            if (self.stopping)() {
                return Err(Self::shutting_down());
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
        if let Some(batch) = self.batch {
            return self.score_batched(batch, pairs);
        }
        let _slot = self.slot()?;
        Scorer::loglikelihood_batch(self.model, pairs)
    }

    fn generate_greedy(&self, prompt: &str, max_tokens: usize) -> evaluator::Result<String> {
        if let Some(batch) = self.batch {
            return self.generate_batched(batch, prompt, max_tokens);
        }
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

    fn embed_images(
        &self,
        images: &[runtime::vision::RgbImage],
    ) -> evaluator::Result<Vec<Vec<f32>>> {
        let _slot = self.slot()?;
        Scorer::embed_images(self.model, images)
    }
}
