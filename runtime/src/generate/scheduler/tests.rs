//! The scheduler against [`TextModel::generate`]: requests submitted
//! together from several threads, batched, chunked and queued, get the
//! tokens each gets alone; clients that leave free their blocks at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::super::bytelevel::{encode_bytes, BOS};
use super::super::tests::{checkpoint, collect, load};
use super::*;
use crate::generate::FinishReason;

/// Records the widest step and the tokens per step.
#[derive(Default)]
struct Counts {
    widest: AtomicUsize,
    steps: AtomicUsize,
    most_tokens: AtomicUsize,
    first_tokens: AtomicUsize,
}

impl StepObserver for Counts {
    fn step(&self, sequences: usize, tokens: usize, _seconds: f64) {
        self.widest.fetch_max(sequences, Ordering::SeqCst);
        self.most_tokens.fetch_max(tokens, Ordering::SeqCst);
        self.steps.fetch_add(1, Ordering::SeqCst);
    }
    fn first_token(&self, _seconds: f64) {
        self.first_tokens.fetch_add(1, Ordering::SeqCst);
    }
}

/// A sink into a channel, and the receiver.
fn channel() -> (EventSink, mpsc::Receiver<SchedulerEvent>) {
    let (tx, rx) = mpsc::channel();
    (Box::new(move |ev| tx.send(ev).is_ok()), rx)
}

/// The completion at the end of `rx`, checking that the streamed text is
/// the completion's.
fn wait(rx: mpsc::Receiver<SchedulerEvent>) -> Result<Completion> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    for ev in rx.iter() {
        match ev {
            SchedulerEvent::Token(t) => {
                text.push_str(&t.text);
                tokens.push(t.token);
            }
            SchedulerEvent::Done(done) => {
                if let Ok(c) = &done {
                    assert_eq!(c.text, text);
                    assert_eq!(c.tokens, tokens);
                }
                return done;
            }
            SchedulerEvent::Scored(_) => panic!("a generation ended as a scoring"),
        }
    }
    panic!("the scheduler dropped a sequence without a Done event");
}

fn prompt_of(text: &str) -> Vec<u32> {
    let mut p = vec![BOS];
    p.extend(encode_bytes(text));
    p
}

/// Waits (a bounded while) until `f` holds.
fn eventually(f: impl Fn() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("condition never held");
}

#[test]
fn batched_generations_equal_each_generation_alone() {
    let dir = checkpoint(11);
    let model = Arc::new(load(dir.path()));
    let greedy = SamplingParams::greedy(24);
    let requests: Vec<(Vec<u32>, SamplingParams)> = vec![
        (prompt_of("hello"), greedy.clone()),
        (
            prompt_of("a much longer prompt than the others"),
            greedy.clone(),
        ),
        (prompt_of("x"), SamplingParams::greedy(5)),
        (
            prompt_of("seeded"),
            SamplingParams {
                max_tokens: 20,
                temperature: 0.9,
                top_p: 0.95,
                seed: Some(7),
                ..Default::default()
            },
        ),
        (
            prompt_of("penalised"),
            SamplingParams {
                frequency_penalty: 1.5,
                presence_penalty: 0.5,
                ..SamplingParams::greedy(30)
            },
        ),
        (prompt_of("hello"), greedy.clone()),
        (
            prompt_of("near the end of the context window, so the context caps it"),
            SamplingParams::greedy(40),
        ),
    ];
    // The stop sequence of a request: three characters its greedy text has.
    let alone_text = collect(&model, &requests[0].0, &greedy).0.text;
    let chars: Vec<char> = alone_text.chars().collect();
    let from = (1..chars.len() - 2)
        .find(|&i| chars[i..i + 3].iter().all(|c| c.is_ascii_graphic()))
        .expect("fixture text has three printable characters in a row");
    let stop: String = chars[from..from + 3].iter().collect();
    let mut requests = requests;
    requests[5].1.stop = vec![stop];

    let alone: Vec<Completion> = requests
        .iter()
        .map(|(p, params)| collect(&model, p, params).0)
        .collect();
    assert!(alone.iter().any(|c| c.finish_reason == FinishReason::Stop));
    assert!(alone
        .iter()
        .any(|c| c.finish_reason == FinishReason::Length));

    let counts = Arc::new(Counts::default());
    // Narrow steps (prefill in chunks) and fewer slots than requests
    // (some wait in the queue).
    let limits = SchedulerLimits {
        max_batch_tokens: 8,
        max_running_sequences: 4,
        kv_cache_bytes: 1 << 24,
        block_tokens: 4,
        queue_depth: 16,
    };
    let scheduler = Arc::new(Scheduler::new(model.clone(), limits, counts.clone()).unwrap());
    let handles: Vec<_> = requests
        .iter()
        .cloned()
        .map(|(p, params)| {
            let s = scheduler.clone();
            std::thread::spawn(move || {
                let (sink, rx) = channel();
                s.submit(p, &params, Priority::Traffic, sink).unwrap();
                wait(rx).unwrap()
            })
        })
        .collect();
    let batched: Vec<Completion> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}");
        assert_eq!(a.text, b.text, "request {i}");
        assert_eq!(a.finish_reason, b.finish_reason, "request {i}");
        assert_eq!(a.prompt_tokens, b.prompt_tokens, "request {i}");
    }
    assert!(
        counts.widest.load(Ordering::SeqCst) >= 2,
        "steps were never batched"
    );
    assert!(counts.most_tokens.load(Ordering::SeqCst) <= 8);
    assert_eq!(counts.first_tokens.load(Ordering::SeqCst), requests.len());
    eventually(|| scheduler.kv_cache_bytes() == 0 && scheduler.running() == 0);
}

#[test]
fn a_client_that_leaves_frees_its_blocks_and_the_others_finish() {
    let dir = checkpoint(3);
    let model = Arc::new(load(dir.path()));
    let limits = SchedulerLimits {
        block_tokens: 4,
        ..SchedulerLimits::default()
    };
    let scheduler = Scheduler::new(model.clone(), limits, Arc::new(NoObserver)).unwrap();
    // Leaves after its second token.
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    let leaving: EventSink = Box::new(move |ev| match ev {
        SchedulerEvent::Token(_) => s2.fetch_add(1, Ordering::SeqCst) < 1,
        SchedulerEvent::Done(_) | SchedulerEvent::Scored(_) => {
            panic!("a sequence whose client left must not finish")
        }
    });
    let params = SamplingParams::greedy(40);
    scheduler
        .submit(prompt_of("leaving"), &params, Priority::Traffic, leaving)
        .unwrap();
    let (sink, rx) = channel();
    scheduler
        .submit(prompt_of("staying"), &params, Priority::Background, sink)
        .unwrap();
    let done = wait(rx).unwrap();
    assert_eq!(
        done.tokens,
        collect(&model, &prompt_of("staying"), &params).0.tokens
    );
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    eventually(|| scheduler.kv_cache_bytes() == 0 && scheduler.running() == 0);
}

#[test]
fn a_full_queue_and_an_oversized_request_are_refused() {
    let dir = checkpoint(3);
    let model = Arc::new(load(dir.path()));
    let block = KvPool::new(
        model.model().config(),
        model.model().dtype(),
        model.model().device(),
        u64::MAX,
        4,
    )
    .unwrap()
    .block_bytes();
    let limits = SchedulerLimits {
        max_batch_tokens: 4,
        max_running_sequences: 1,
        kv_cache_bytes: 12 * block, // 48 positions
        block_tokens: 4,
        queue_depth: 1,
    };
    let scheduler = Scheduler::new(model.clone(), limits, Arc::new(NoObserver)).unwrap();
    // 7 prompt tokens and 60 more cannot fit 48 positions.
    let err = scheduler
        .submit(
            prompt_of("hello!"),
            &SamplingParams::greedy(60),
            Priority::Traffic,
            channel().0,
        )
        .unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("kv_cache_bytes"), "{err}");
    // One runs (or waits to), one waits: the third is refused.
    let params = SamplingParams::greedy(30);
    let (a, rx_a) = channel();
    let (b, rx_b) = channel();
    scheduler
        .submit(prompt_of("a"), &params, Priority::Traffic, a)
        .unwrap();
    scheduler
        .submit(prompt_of("b"), &params, Priority::Traffic, b)
        .unwrap();
    let err = scheduler
        .submit(prompt_of("c"), &params, Priority::Traffic, channel().0)
        .unwrap_err();
    assert!(
        matches!(err, RuntimeError::QueueFull { depth: 1, .. }),
        "{err}"
    );
    // Bad prompts are the request's errors, before any queueing.
    let err = scheduler
        .submit(Vec::new(), &params, Priority::Traffic, channel().0)
        .unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidInput(_)), "{err}");
    wait(rx_a).unwrap();
    wait(rx_b).unwrap();
    eventually(|| scheduler.kv_cache_bytes() == 0);
}

#[test]
fn limits_are_checked() {
    let bad = [
        SchedulerLimits {
            max_batch_tokens: 0,
            ..SchedulerLimits::default()
        },
        SchedulerLimits {
            max_batch_tokens: 4,
            max_running_sequences: 8,
            ..SchedulerLimits::default()
        },
        SchedulerLimits {
            block_tokens: 0,
            ..SchedulerLimits::default()
        },
    ];
    for limits in bad {
        assert!(limits.validate().is_err(), "{limits:?}");
    }
    SchedulerLimits::default().validate().unwrap();
}

/// Running sequences of several schedulers together.
#[derive(Default)]
struct Together {
    running: [AtomicUsize; 2],
    most: AtomicUsize,
}

struct Share(Arc<Together>, usize);

impl StepObserver for Share {
    fn state(&self, running: usize, _queued: usize, _kv_bytes: u64) {
        let t = &self.0;
        t.running[self.1].store(running, Ordering::SeqCst);
        let sum = t.running[0].load(Ordering::SeqCst) + t.running[1].load(Ordering::SeqCst);
        t.most.fetch_max(sum, Ordering::SeqCst);
    }
}

#[test]
fn schedulers_sharing_a_budget_stay_within_it_together() {
    let dir = checkpoint(5);
    let model = Arc::new(load(dir.path()));
    let params = SamplingParams::greedy(20);
    let prompt = prompt_of("shared");
    let pool = KvPool::new(
        model.model().config(),
        model.model().dtype(),
        model.model().device(),
        u64::MAX,
        4,
    )
    .unwrap();
    // Room for one such sequence at a time, across both schedulers.
    let one = pool.blocks_for(prompt.len() + 20) as u64 * pool.block_bytes();
    let budget = KvBudget::new(one + pool.block_bytes() - 1);
    let limits = SchedulerLimits {
        block_tokens: 4,
        ..SchedulerLimits::default()
    };
    let together = Arc::new(Together::default());
    let schedulers: Vec<Scheduler> = (0..2)
        .map(|i| {
            Scheduler::with_budget(
                model.clone(),
                limits.clone(),
                &budget,
                Arc::new(Share(together.clone(), i)),
            )
            .unwrap()
        })
        .collect();
    let receivers: Vec<_> = schedulers
        .iter()
        .flat_map(|s| {
            (0..2).map(|_| {
                let (sink, rx) = channel();
                s.submit(prompt.clone(), &params, Priority::Traffic, sink)
                    .unwrap();
                rx
            })
        })
        .collect();
    let alone = collect(&model, &prompt, &params).0.tokens;
    for rx in receivers {
        assert_eq!(wait(rx).unwrap().tokens, alone);
    }
    assert_eq!(together.most.load(Ordering::SeqCst), 1, "two ran at once");
    eventually(|| budget.used_bytes() == 0 && budget.reserved_bytes() == 0);
}

#[test]
fn a_panic_in_a_step_fails_its_batch_and_the_loop_goes_on() {
    let dir = checkpoint(3);
    let model = Arc::new(load(dir.path()));
    let scheduler = Scheduler::new(
        model.clone(),
        SchedulerLimits::default(),
        Arc::new(NoObserver),
    )
    .unwrap();
    // Both wait until they are submitted, then join one batch.
    let gate = Arc::new(std::sync::Barrier::new(2));
    let g = gate.clone();
    let mut first_call = true;
    let panicking: EventSink = Box::new(move |_| {
        if std::mem::take(&mut first_call) {
            g.wait();
        }
        panic!("a sink that panics");
    });
    let params = SamplingParams::greedy(8);
    let (sink, rx) = channel();
    scheduler
        .submit(prompt_of("first"), &params, Priority::Traffic, sink)
        .unwrap();
    scheduler
        .submit(prompt_of("second"), &params, Priority::Traffic, panicking)
        .unwrap();
    gate.wait();
    // The panicking sink's step failed the batch, or the first sequence
    // had ended before it.
    let first = rx.iter().find_map(|ev| match ev {
        SchedulerEvent::Done(done) => Some(done),
        SchedulerEvent::Token(_) | SchedulerEvent::Scored(_) => None,
    });
    if let Some(Err(e)) = first {
        assert!(e.to_string().contains("a sink that panics"), "{e}");
    }
    // The loop is alive: the next request completes as it does alone.
    let (sink, rx) = channel();
    scheduler
        .submit(prompt_of("third"), &params, Priority::Traffic, sink)
        .unwrap();
    assert_eq!(
        wait(rx).unwrap().tokens,
        collect(&model, &prompt_of("third"), &params).0.tokens
    );
    eventually(|| scheduler.kv_cache_bytes() == 0 && scheduler.running() == 0);
}

/// Sequences of the base and of two merges held as deltas over it share
/// one batch; each gets the greedy tokens its merge gives alone.
#[test]
fn merges_held_as_deltas_share_the_base_batch() {
    use crate::model::random::random_weights;
    use crate::model::{ModelDelta, TensorDelta};
    use std::collections::HashMap;

    let dir = checkpoint(11);
    let model = Arc::new(load(dir.path()));
    let c = super::super::tests::config();
    let base = random_weights(&c, 11, 0.3).unwrap();
    let delta_of = |seed: u64, alpha: f64| {
        let other = random_weights(&c, seed, 0.3).unwrap();
        let tensors = base
            .iter()
            .map(|(name, w)| {
                let d = ((&other[name] - w).unwrap() * alpha).unwrap();
                (name.clone(), Arc::new(TensorDelta::Dense(d)))
            })
            .collect::<HashMap<_, _>>();
        Arc::new(ModelDelta::Owned(tensors))
    };
    let merges = [None, Some(delta_of(12, 0.5)), Some(delta_of(13, 0.9))];
    let alone: Vec<TextModel> = merges
        .iter()
        .map(|d| match d {
            Some(d) => model.with_delta(d.clone()).unwrap(),
            None => load(dir.path()),
        })
        .collect();
    let limits = SchedulerLimits {
        max_batch_tokens: 16,
        max_running_sequences: 6,
        kv_cache_bytes: 1 << 24,
        block_tokens: 4,
        queue_depth: 16,
    };
    let counts = Arc::new(Counts::default());
    let scheduler = Scheduler::new(model.clone(), limits, counts.clone()).unwrap();
    let greedy = SamplingParams::greedy(12);
    let prompts = [
        "hello",
        "merges",
        "a longer prompt here",
        "x",
        "deltas",
        "one base",
    ];
    let mut waits = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (sink, rx) = channel();
        scheduler
            .submit_with(
                prompt_of(p),
                &greedy,
                Priority::Traffic,
                merges[i % 3].clone(),
                sink,
            )
            .unwrap();
        waits.push(rx);
    }
    for (i, rx) in waits.into_iter().enumerate() {
        let got = wait(rx).unwrap();
        let want = collect(&alone[i % 3], &prompt_of(prompts[i]), &greedy).0;
        assert_eq!(got.tokens, want.tokens, "request {i} (merge {})", i % 3);
    }
    // The merges change the tokens, so the comparison tells them apart.
    let p = prompt_of(prompts[0]);
    let t: Vec<Vec<u32>> = alone
        .iter()
        .map(|m| collect(m, &p, &greedy).0.tokens)
        .collect();
    assert!(
        t[0] != t[1] || t[0] != t[2],
        "the merges decode as the base does"
    );
    assert!(counts.widest.load(Ordering::SeqCst) > 1, "never batched");
}

/// Scorings in the batch (prompts read in chunks across steps, beside
/// generations, some under a merge's delta) give the log-likelihoods the
/// model gives alone, and the greedy flags; an empty continuation scores 0
/// at once; a bad token is the submission's error, not the batch's.
#[test]
fn scorings_in_the_batch_equal_scoring_alone() {
    use crate::model::random::random_weights;
    use crate::model::{ModelDelta, TensorDelta};
    use std::collections::HashMap;

    let dir = checkpoint(11);
    let model = Arc::new(load(dir.path()));
    let c = super::super::tests::config();
    let base = random_weights(&c, 11, 0.3).unwrap();
    let other = random_weights(&c, 12, 0.3).unwrap();
    let delta = Arc::new(ModelDelta::Owned(
        base.iter()
            .map(|(name, w)| {
                let d = ((&other[name] - w).unwrap() * 0.6).unwrap();
                (name.clone(), Arc::new(TensorDelta::Dense(d)))
            })
            .collect::<HashMap<_, _>>(),
    ));
    let merged = model.with_delta(delta.clone()).unwrap();
    let limits = SchedulerLimits {
        max_batch_tokens: 7,
        max_running_sequences: 5,
        kv_cache_bytes: 1 << 24,
        block_tokens: 4,
        queue_depth: 16,
    };
    let counts = Arc::new(Counts::default());
    let scheduler = Scheduler::new(model.clone(), limits, counts.clone()).unwrap();
    let pairs = [
        ("The capital of France is", " Paris"),
        ("a", " much longer continuation than its context"),
        ("", "from the start"),
        ("question: 2 + 2 = ", "4"),
        ("nothing follows", ""),
    ];
    let (gen_sink, gen_rx) = channel();
    scheduler
        .submit(
            prompt_of("beside the scorings"),
            &SamplingParams::greedy(20),
            Priority::Traffic,
            gen_sink,
        )
        .unwrap();
    let mut waits = Vec::new();
    for (i, (ctx, cont)) in pairs.iter().enumerate() {
        let under = (i % 2 == 1).then(|| delta.clone());
        let (tx, rx) = mpsc::channel();
        let sink: EventSink = Box::new(move |ev| match ev {
            SchedulerEvent::Scored(r) => tx.send(r).is_ok(),
            _ => panic!("a scoring sent a generation's event"),
        });
        let req = model.score_request(ctx, cont).unwrap();
        scheduler
            .submit_score(req, Priority::Background, under, sink)
            .unwrap();
        waits.push(rx);
    }
    for (i, rx) in waits.into_iter().enumerate() {
        let got = rx.recv().unwrap().unwrap();
        let alone = if i % 2 == 1 { &merged } else { model.as_ref() };
        let want = alone.loglikelihood(pairs[i].0, pairs[i].1).unwrap();
        assert_eq!(
            (got.tokens, got.is_greedy),
            (want.tokens, want.is_greedy),
            "pair {i}"
        );
        assert!(
            (got.logprob - want.logprob).abs() < 1e-4 * (1.0 + want.logprob.abs()),
            "pair {i}: {} vs {}",
            got.logprob,
            want.logprob
        );
    }
    let greedy = SamplingParams::greedy(20);
    assert_eq!(
        wait(gen_rx).unwrap().tokens,
        collect(&model, &prompt_of("beside the scorings"), &greedy)
            .0
            .tokens
    );
    assert!(counts.widest.load(Ordering::SeqCst) > 1, "never batched");
    let bad = ScoreRequest {
        input: vec![BOS, 100_000],
        cont: vec![100_000],
    };
    let err = scheduler
        .submit_score(bad, Priority::Traffic, None, Box::new(|_| true))
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    eventually(|| scheduler.kv_cache_bytes() == 0 && scheduler.running() == 0);
}
