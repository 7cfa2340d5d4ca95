//! Continuous batching: one step loop per model runs every live sequence
//! through one forward pass per step ([`Model::forward_batch`]), as vLLM
//! and TGI do.
//!
//! A step takes one decode token of every sequence that has sampled one,
//! then prefill chunks of sequences still reading their prompt, within
//! `max_batch_tokens` tokens in all. New requests join at the next step;
//! a sequence that finishes (end of sequence, a stop, `max_tokens`) or
//! whose client is gone (its event sink refuses an event) leaves at once
//! and its key/value blocks go back to the pool. Sampling stays per
//! sequence ([`Sequence`]: the request's temperature, top_p, penalties,
//! seed and stops), so a request's tokens are the ones it gets alone.
//!
//! Admission is by reservation: a request joins the running batch when
//! fewer than `max_running_sequences` run and the blocks of its longest
//! possible sequence (prompt and `max_tokens`, capped at the context) fit
//! beside the reservations of those running, within `kv_cache_bytes`.
//! Blocks are still allocated only as a sequence grows, so the bytes held
//! are those written; the reservation guarantees that a running sequence is
//! never refused a block (no preemption, no recomputation). Requests wait
//! in first-come order, traffic before background work ([`Priority`]);
//! past `queue_depth` waiting, a submission is refused with
//! [`RuntimeError::QueueFull`].
//!
//! Sequences of several merges held as deltas over the model
//! ([`crate::model::ModelDelta`], [`Scheduler::submit_with`]) share its
//! batch: each step the base's products are computed once for all rows,
//! and each merge's delta term for its own rows (its sequences grouped).
//!
//! ```text
//! step: rows = [next token of each decoding s] ‖ [prompt chunk of each prefilling s]
//!       logits = forward_batch(rows)          (weights read once per step)
//!       each s whose prompt is read: token = sample_s(logits_s) → sink_s
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::DType;

use super::sampling::SamplingParams;
use super::scoring::{LogLikelihood, ScoreRequest};
use super::sequence::Sequence;
use super::text_model::{Completion, TextModel, TokenEvent};
use crate::error::{Result, RuntimeError};
use crate::model::paged::{KvBudget, KvPool, PagedCache, DEFAULT_BLOCK_TOKENS};
use crate::model::{BatchInput, ModelDelta};

/// How often an idle scheduler whose next request waits for another
/// model's reservations to end looks again.
const STARVED_POLL: Duration = Duration::from_millis(5);

/// The bounds of one scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerLimits {
    /// Tokens of one step, decodes and prefill chunks together (at least
    /// `max_running_sequences`, so every decoding sequence fits a step).
    pub max_batch_tokens: usize,
    /// Sequences in the running batch.
    pub max_running_sequences: usize,
    /// Bytes of key/value blocks of all running sequences (of this
    /// scheduler's own budget; [`Scheduler::with_budget`] shares one).
    pub kv_cache_bytes: u64,
    /// Positions per key/value block.
    pub block_tokens: usize,
    /// Requests waiting to join the batch; more are refused.
    pub queue_depth: usize,
}

impl Default for SchedulerLimits {
    fn default() -> Self {
        SchedulerLimits {
            max_batch_tokens: 512,
            max_running_sequences: 16,
            kv_cache_bytes: 1 << 30,
            block_tokens: DEFAULT_BLOCK_TOKENS,
            queue_depth: 64,
        }
    }
}

impl SchedulerLimits {
    /// Checks the bounds: every one at least 1, and a step wide enough for
    /// one decode token of every running sequence.
    pub fn validate(&self) -> Result<()> {
        let at_least_one = [
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_running_sequences", self.max_running_sequences),
            ("block_tokens", self.block_tokens),
        ];
        for (name, v) in at_least_one {
            if v == 0 {
                return Err(RuntimeError::range(name, v, "at least 1"));
            }
        }
        if self.max_batch_tokens < self.max_running_sequences {
            return Err(RuntimeError::range(
                "max_batch_tokens",
                self.max_batch_tokens,
                &format!(
                    "at least max_running_sequences ({}): a step holds one token of every \
                     running sequence",
                    self.max_running_sequences
                ),
            ));
        }
        Ok(())
    }
}

/// Who waits first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Requests of clients.
    Traffic,
    /// Scheduled work (evaluations): joins only when no traffic waits.
    Background,
}

/// What a submitted generation receives.
#[derive(Debug)]
pub enum SchedulerEvent {
    /// A sampled token and the text it releases.
    Token(TokenEvent),
    /// The end: the completion, or why generation failed.
    Done(Result<Completion>),
    /// The end of a scoring ([`Scheduler::submit_score`]): the
    /// continuation's log-likelihood, or why it failed.
    Scored(Result<LogLikelihood>),
}

/// Where a generation's events go; returns false when the receiver is
/// gone, which ends the sequence.
pub type EventSink = Box<dyn FnMut(SchedulerEvent) -> bool + Send>;

/// Measurements of the step loop (metrics); every method defaults to
/// nothing.
pub trait StepObserver: Send + Sync {
    /// A step ran `sequences` sequences and `tokens` tokens in `seconds`.
    fn step(&self, _sequences: usize, _tokens: usize, _seconds: f64) {}
    /// A request waited `seconds` before joining the batch.
    fn admitted(&self, _seconds: f64) {}
    /// A request's first token came `seconds` after its submission.
    fn first_token(&self, _seconds: f64) {}
    /// A token came `seconds` after the sequence's previous one.
    fn inter_token(&self, _seconds: f64) {}
    /// The scheduler's state after it changed: sequences running,
    /// requests waiting, key/value bytes held.
    fn state(&self, _running: usize, _queued: usize, _kv_bytes: u64) {}
}

/// A [`StepObserver`] that records nothing.
pub struct NoObserver;

impl StepObserver for NoObserver {}

/// What a sequence of the batch is for.
enum Work {
    /// A generation, with its sampling state.
    Generate(Box<Sequence>),
    /// A log-likelihood: the prompt is read, and the predictions of its
    /// last positions are scored against the continuation.
    Score(Scoring),
}

/// A scoring under way: `cont[j]` is the target of the prediction after
/// prompt position `at + j`.
struct Scoring {
    cont: Vec<u32>,
    at: usize,
    logprob: f64,
    greedy: bool,
}

impl Scoring {
    /// Adds the prediction after prompt position `pos`.
    fn add(&mut self, pos: usize, logits: &[f32]) {
        let Some(&target) = pos.checked_sub(self.at).and_then(|j| self.cont.get(j)) else {
            return;
        };
        let (mut best, mut max) = (0usize, f32::NEG_INFINITY);
        for (i, &l) in logits.iter().enumerate() {
            if l > max {
                (best, max) = (i, l);
            }
        }
        let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
        let lp = logits
            .get(target as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - max - sum.ln());
        self.logprob += lp as f64;
        self.greedy &= best == target as usize;
    }

    fn result(&self) -> LogLikelihood {
        LogLikelihood {
            logprob: self.logprob,
            is_greedy: self.greedy,
            tokens: self.cont.len(),
        }
    }
}

/// A submitted request, waiting.
struct Job {
    work: Work,
    delta: Option<Arc<ModelDelta>>,
    prompt: Vec<u32>,
    sink: EventSink,
    arrived: Instant,
    blocks: usize,
}

#[derive(Default)]
struct Queues {
    traffic: VecDeque<Job>,
    background: VecDeque<Job>,
    running: usize,
    closed: bool,
}

impl Queues {
    fn waiting(&self) -> usize {
        self.traffic.len() + self.background.len()
    }
}

struct Shared {
    queues: Mutex<Queues>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        // A panic in a sink never leaves the queues half-changed.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The step loop of one model; dropping it lets the loop finish what was
/// submitted and end.
pub struct Scheduler {
    shared: Arc<Shared>,
    observer: Arc<dyn StepObserver>,
    model: Arc<TextModel>,
    pool: Arc<KvPool>,
    limits: SchedulerLimits,
}

impl Scheduler {
    /// Starts the step loop of `model` on its own thread, within
    /// `limits`, reporting to `observer`. A model whose blocks keep
    /// per-sequence state (a routed merge) cannot be batched: an error.
    pub fn new(
        model: Arc<TextModel>,
        limits: SchedulerLimits,
        observer: Arc<dyn StepObserver>,
    ) -> Result<Self> {
        let budget = KvBudget::new(limits.kv_cache_bytes);
        Self::with_budget(model, limits, &budget, observer)
    }

    /// [`Scheduler::new`] whose key/value blocks and reservations count
    /// against `budget`, shared with the schedulers of other models (its
    /// bound, not `limits.kv_cache_bytes`, applies).
    pub fn with_budget(
        model: Arc<TextModel>,
        limits: SchedulerLimits,
        budget: &Arc<KvBudget>,
        observer: Arc<dyn StepObserver>,
    ) -> Result<Self> {
        limits.validate()?;
        let m = model.model();
        if !m.batchable() {
            return Err(RuntimeError::WrongKind(
                "this model keeps per-sequence state (a routed merge) and is not batched".into(),
            ));
        }
        let pool = KvPool::with_budget(
            m.config(),
            m.dtype(),
            m.device(),
            budget,
            limits.block_tokens,
        )?;
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            wake: Condvar::new(),
        });
        let step_loop = StepLoop {
            shared: shared.clone(),
            model: model.clone(),
            pool: pool.clone(),
            limits: limits.clone(),
            observer: observer.clone(),
            running: Vec::new(),
        };
        std::thread::Builder::new()
            .name("fusion-scheduler".into())
            .spawn(move || step_loop.run())
            .map_err(|e| RuntimeError::Generation(format!("cannot start the scheduler: {e}")))?;
        Ok(Scheduler {
            shared,
            observer,
            model,
            pool,
            limits,
        })
    }

    /// The model it batches.
    pub fn model(&self) -> &Arc<TextModel> {
        &self.model
    }

    /// Its bounds.
    pub fn limits(&self) -> &SchedulerLimits {
        &self.limits
    }

    /// Key/value bytes held now.
    pub fn kv_cache_bytes(&self) -> u64 {
        self.pool.used_bytes()
    }

    /// Requests waiting to join the batch.
    pub fn queued(&self) -> usize {
        self.shared.lock().waiting()
    }

    /// Sequences in the running batch.
    pub fn running(&self) -> usize {
        self.shared.lock().running
    }

    /// Queues a generation of `prompt` with `params`; its events go to
    /// `sink`. The prompt and parameters are checked here (an error is the
    /// request's); a request whose longest sequence could never fit the
    /// key/value bound is refused, and so is one past a full queue
    /// ([`RuntimeError::QueueFull`]).
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: &SamplingParams,
        priority: Priority,
        sink: EventSink,
    ) -> Result<()> {
        self.submit_with(prompt, params, priority, None, sink)
    }

    /// [`Scheduler::submit`] of a merge held as `delta` over the
    /// scheduler's model (built for it: its tensors and shapes; see
    /// [`crate::model::Model::with_delta`]): the sequence joins the same
    /// batch as the model's own and every other merge's.
    pub fn submit_with(
        &self,
        prompt: Vec<u32>,
        params: &SamplingParams,
        priority: Priority,
        delta: Option<Arc<ModelDelta>>,
        sink: EventSink,
    ) -> Result<()> {
        let seq = Sequence::new(&self.model, &prompt, params)?;
        let positions = seq.max_positions();
        if !self.pool.could_hold(positions) {
            return Err(RuntimeError::InvalidInput(format!(
                "the prompt ({} tokens) and max_tokens ({}) need {} bytes of key/value cache; \
                 the bound (kv_cache_bytes) is {}: ask for fewer tokens",
                prompt.len(),
                positions - prompt.len(),
                self.pool.blocks_for(positions) as u64 * self.pool.block_bytes(),
                self.pool.limit_bytes()
            )));
        }
        let job = Job {
            blocks: self.pool.blocks_for(positions),
            work: Work::Generate(Box::new(seq)),
            delta,
            prompt,
            sink,
            arrived: Instant::now(),
        };
        self.enqueue(job, priority)
    }

    /// Queues the scoring of `request` (made by
    /// [`TextModel::score_request`] of this scheduler's model): its
    /// continuation's log-likelihood after its context, from the same
    /// batched steps as generation (prompt chunks within
    /// `max_batch_tokens`), under the merge held as `delta` when there is
    /// one. `sink` receives one [`SchedulerEvent::Scored`]. Refused like a
    /// generation when it could never fit or the queue is full.
    pub fn submit_score(
        &self,
        request: ScoreRequest,
        priority: Priority,
        delta: Option<Arc<ModelDelta>>,
        mut sink: EventSink,
    ) -> Result<()> {
        let ScoreRequest { input, cont } = request;
        if cont.is_empty() {
            sink(SchedulerEvent::Scored(Ok(LogLikelihood {
                logprob: 0.0,
                is_greedy: true,
                tokens: 0,
            })));
            return Ok(());
        }
        let config = self.model.model().config();
        let vocab = config.vocab_size;
        if let Some(&bad) = input.iter().chain(&cont).find(|&&t| t as usize >= vocab) {
            return Err(RuntimeError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary ({vocab} tokens)"
            )));
        }
        if input.len() < cont.len() || input.len() > config.max_position_embeddings {
            return Err(RuntimeError::InvalidInput(format!(
                "a scoring of {} continuation tokens over {} input tokens (the model's \
                 context is {})",
                cont.len(),
                input.len(),
                config.max_position_embeddings
            )));
        }
        if !self.pool.could_hold(input.len()) {
            return Err(RuntimeError::InvalidInput(format!(
                "scoring {} tokens needs {} bytes of key/value cache; the bound \
                 (kv_cache_bytes) is {}",
                input.len(),
                self.pool.blocks_for(input.len()) as u64 * self.pool.block_bytes(),
                self.pool.limit_bytes()
            )));
        }
        let job = Job {
            blocks: self.pool.blocks_for(input.len()),
            work: Work::Score(Scoring {
                at: input.len() - cont.len(),
                cont,
                logprob: 0.0,
                greedy: true,
            }),
            delta,
            prompt: input,
            sink,
            arrived: Instant::now(),
        };
        self.enqueue(job, priority)
    }

    fn enqueue(&self, job: Job, priority: Priority) -> Result<()> {
        let mut q = self.shared.lock();
        let free = self.limits.max_running_sequences.saturating_sub(q.running);
        if q.waiting() >= self.limits.queue_depth + free {
            return Err(RuntimeError::QueueFull {
                running: q.running,
                queued: q.waiting(),
                depth: self.limits.queue_depth,
            });
        }
        match priority {
            Priority::Traffic => q.traffic.push_back(job),
            Priority::Background => q.background.push_back(job),
        }
        self.observer
            .state(q.running, q.waiting(), self.pool.used_bytes());
        drop(q);
        self.shared.wake.notify_one();
        Ok(())
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

/// A sequence of the running batch.
struct Active {
    seq: Option<Sequence>,
    score: Option<Scoring>,
    delta: Option<Arc<ModelDelta>>,
    prompt: Vec<u32>,
    /// Prompt tokens read so far.
    read: usize,
    /// The token sampled last, to feed at the next step.
    next: Option<u32>,
    cache: PagedCache,
    sink: EventSink,
    arrived: Instant,
    last_token: Option<Instant>,
    blocks: usize,
    done: bool,
    /// The `Done` event, sent once the sequence's blocks are back in the
    /// pool (so a client that sees its end never finds them held).
    end: Option<SchedulerEvent>,
}

impl Active {
    fn fail(&mut self, e: RuntimeError) {
        self.end = Some(if self.score.is_some() {
            SchedulerEvent::Scored(Err(e))
        } else {
            SchedulerEvent::Done(Err(e))
        });
        self.done = true;
    }

    /// The logits this step's `fed` tokens need: the last row of a
    /// generation's (its prompt's last chunk, or a decoded token), every
    /// scored position of a scoring's chunk.
    fn picks(&self, fed: usize) -> usize {
        let to = self.read + fed;
        match &self.score {
            Some(s) => to.saturating_sub(s.at.max(self.read)),
            None if self.next.is_some() || to >= self.prompt.len() => 1,
            None => 0,
        }
    }
}

struct StepLoop {
    shared: Arc<Shared>,
    model: Arc<TextModel>,
    pool: Arc<KvPool>,
    limits: SchedulerLimits,
    observer: Arc<dyn StepObserver>,
    running: Vec<Active>,
}

impl StepLoop {
    fn run(mut self) {
        let budget = self.pool.budget().clone();
        let block_bytes = self.pool.block_bytes();
        loop {
            {
                let mut q = self.shared.lock();
                loop {
                    // A job that waits for reservations of other models'
                    // schedulers to end: nothing here will wake this one.
                    let mut starved = false;
                    while self.running.len() < self.limits.max_running_sequences {
                        let queue = if q.traffic.is_empty() {
                            &mut q.background
                        } else {
                            &mut q.traffic
                        };
                        let Some(job) = queue.front() else { break };
                        if !budget.try_reserve(job.blocks as u64 * block_bytes) {
                            starved = true;
                            break;
                        }
                        let Some(job) = queue.pop_front() else { break };
                        self.observer.admitted(job.arrived.elapsed().as_secs_f64());
                        let (seq, score) = match job.work {
                            Work::Generate(seq) => (Some(*seq), None),
                            Work::Score(s) => (None, Some(s)),
                        };
                        self.running.push(Active {
                            seq,
                            score,
                            delta: job.delta,
                            prompt: job.prompt,
                            read: 0,
                            next: None,
                            cache: PagedCache::new(&self.pool),
                            sink: job.sink,
                            arrived: job.arrived,
                            last_token: None,
                            blocks: job.blocks,
                            done: false,
                            end: None,
                        });
                    }
                    q.running = self.running.len();
                    self.observer
                        .state(q.running, q.waiting(), self.pool.used_bytes());
                    if !self.running.is_empty() {
                        break;
                    }
                    if q.closed && q.waiting() == 0 {
                        return;
                    }
                    q = if starved {
                        self.shared
                            .wake
                            .wait_timeout(q, STARVED_POLL)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    } else {
                        self.shared.wake.wait(q).unwrap_or_else(|e| e.into_inner())
                    };
                }
            }
            // A panic inside a step (a backend bug) fails the sequences of
            // the batch instead of leaving their clients waiting forever on
            // a dead loop; the loop goes on with the next requests.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if let Err(panic) = stepped {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_string());
                for a in &mut self.running {
                    a.fail(RuntimeError::Generation(format!(
                        "the batched step failed: {what}"
                    )));
                }
            }
            let (done, running): (Vec<Active>, Vec<Active>) = std::mem::take(&mut self.running)
                .into_iter()
                .partition(|a| a.done);
            self.running = running;
            let mut outbox = Vec::new();
            let mut freed = 0;
            for a in done {
                freed += a.blocks as u64 * block_bytes;
                let Active { sink, end, .. } = a; // the cache's blocks go back here
                outbox.extend(end.map(|ev| (sink, ev)));
            }
            {
                let mut q = self.shared.lock();
                q.running = self.running.len();
                self.observer
                    .state(q.running, q.waiting(), self.pool.used_bytes());
            }
            // Reported as gone before another scheduler can take its place.
            budget.unreserve(freed);
            for (mut sink, ev) in outbox {
                // A sink that panics loses its own event, nothing else.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink(ev)));
            }
        }
    }

    /// One batched forward pass and the sampling after it.
    fn step(&mut self) {
        let started = Instant::now();
        let mut budget = self.limits.max_batch_tokens;
        let mut feeds: Vec<Option<Vec<u32>>> = vec![None; self.running.len()];
        for (feed, a) in feeds.iter_mut().zip(&self.running) {
            if let Some(t) = a.next {
                *feed = Some(vec![t]);
                budget -= 1;
            }
        }
        for (feed, a) in feeds.iter_mut().zip(&self.running) {
            if a.next.is_none() && a.read < a.prompt.len() && budget > 0 {
                let n = (a.prompt.len() - a.read).min(budget);
                *feed = Some(a.prompt[a.read..a.read + n].to_vec());
                budget -= n;
            }
        }
        let tokens = self.limits.max_batch_tokens - budget;
        // The rows of one merge side by side, so its delta's products run
        // once for all of them (the order of first arrival otherwise).
        let key = |a: &Active| a.delta.as_ref().map_or(0, |d| Arc::as_ptr(d) as usize);
        let mut order: Vec<usize> = (0..self.running.len())
            .filter(|&i| feeds[i].is_some())
            .collect();
        order.sort_by_key(|&i| key(&self.running[i]));
        let picks: Vec<usize> = order
            .iter()
            .map(|&i| self.running[i].picks(feeds[i].as_ref().map_or(0, Vec::len)))
            .collect();
        let mut slots: Vec<Option<&mut Active>> = self.running.iter_mut().map(Some).collect();
        let mut inputs: Vec<BatchInput> = order
            .iter()
            .filter_map(|&i| {
                let a = slots[i].take()?;
                let tokens = feeds[i].as_deref()?;
                Some(BatchInput {
                    tokens,
                    cache: &mut a.cache,
                    delta: a.delta.as_deref(),
                })
            })
            .collect();
        let sequences = inputs.len();
        let rows = self
            .model
            .model()
            .forward_batch_rows(&mut inputs, &picks)
            .and_then(|l| Ok(l.to_dtype(DType::F32)?.to_vec2::<f32>()?));
        drop(inputs);
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                let message = e.to_string();
                for (a, f) in self.running.iter_mut().zip(&feeds) {
                    if f.is_some() {
                        a.fail(RuntimeError::Generation(format!(
                            "the batched forward pass failed: {message}"
                        )));
                    }
                }
                return;
            }
        };
        let mut rows = rows.into_iter();
        for (&i, &k) in order.iter().zip(&picks) {
            let mine: Vec<Vec<f32>> = rows.by_ref().take(k).collect();
            let (a, Some(fed)) = (&mut self.running[i], &feeds[i]) else {
                continue;
            };
            if let Some(s) = a.score.as_mut() {
                let to = a.read + fed.len();
                for (j, row) in mine.iter().enumerate() {
                    s.add(to - k + j, row);
                }
                a.read = to;
                if a.read >= a.prompt.len() {
                    a.end = Some(SchedulerEvent::Scored(Ok(s.result())));
                    a.done = true;
                }
                continue;
            }
            if a.next.take().is_none() {
                a.read += fed.len();
                if a.read < a.prompt.len() {
                    continue; // the prompt's next chunk comes next step
                }
            }
            if let Some(mut row) = mine.into_iter().next() {
                accept(&self.model, self.observer.as_ref(), a, &mut row);
            }
        }
        self.observer
            .step(sequences, tokens, started.elapsed().as_secs_f64());
    }
}

/// Samples `a`'s next token from `logits` and sends it on.
fn accept(model: &TextModel, observer: &dyn StepObserver, a: &mut Active, logits: &mut [f32]) {
    let Some(seq) = a.seq.as_mut() else { return };
    let (event, end) = match seq.accept(model, logits) {
        Ok(out) => out,
        Err(e) => return a.fail(e),
    };
    let now = Instant::now();
    match a.last_token {
        None => observer.first_token(now.duration_since(a.arrived).as_secs_f64()),
        Some(t) => observer.inter_token(now.duration_since(t).as_secs_f64()),
    }
    a.last_token = Some(now);
    let token = event.token;
    if !(a.sink)(SchedulerEvent::Token(event)) {
        a.done = true; // the client is gone
        return;
    }
    match end {
        Some(reason) => {
            a.end = a
                .seq
                .take()
                .map(|seq| SchedulerEvent::Done(Ok(seq.finish(reason))));
            a.done = true;
        }
        None => a.next = Some(token),
    }
}

#[cfg(test)]
mod tests;
