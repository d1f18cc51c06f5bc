//! Continuous batching: many requests share one engine, one forward step at a time.
//!
//! Requests arrive through a [`SchedulerHandle`] (any thread) and join the running batch at the
//! next step boundary. Each step gives its token budget (the runner's `max_step_tokens`) first to
//! the running sequences that decode one token, then to prompts still being prefilled (in
//! chunks), then to newly admitted requests, and runs all of them in one `Engine::step`. Blocks
//! are reserved before the step, so the step itself never runs out: when the cache is full the
//! newest running sequence is preempted (its blocks freed, its tokens kept) and recomputed from
//! prompt + generated tokens once there is room again. A request whose [`Sink`] is closed (the
//! client went away) is cancelled and its blocks freed.
//!
//! The per-request logic (sampler, incremental detokenizer, stop strings, `max_tokens`, stop
//! token ids) is the same `Decoding` that `Engine::generate` uses, so a request produces the
//! same tokens and text here as there. The scheduler knows nothing of HTTP: it runs on a
//! dedicated thread ([`Scheduler::spawn`]) and reports through sinks and an [`Observer`].

use crate::generate::{check_prompt_len, Decoding};
use crate::{Engine, EngineError, Finish, FinishReason, Request, Sequence};
use marlin_model::Tokenizer;
use rayon::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// What a request hears from the scheduler.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// One more token was generated; the text it made safe to show (often empty while a
    /// character or a possible stop string is incomplete).
    Token(String),
    /// Generation ended: the last text released, then the reason, usage and token ids.
    Finished { text: String, finish: Finish },
    /// The engine failed; the request is over.
    Failed(String),
}

/// Where a request's updates go, e.g. a channel to the HTTP handler.
pub trait Sink: Send {
    /// Delivers an update; false if the receiver is gone, which cancels the request.
    fn send(&mut self, update: Update) -> bool;
    /// True once the receiver is gone; checked every step so an idle reader is noticed too.
    fn is_closed(&self) -> bool {
        false
    }
}

impl Sink for mpsc::Sender<Update> {
    fn send(&mut self, update: Update) -> bool {
        mpsc::Sender::send(self, update).is_ok()
    }
}

/// Hooks for metrics; every method defaults to doing nothing.
pub trait Observer: Send + Sync {
    /// A running sequence was preempted to free KV blocks.
    fn on_preemption(&self) {}
    /// A request was scheduled for the first time with a prompt of `tokens` tokens.
    fn on_prompt_tokens(&self, _tokens: usize) {}
    /// `tokens` tokens were generated.
    fn on_generation_tokens(&self, _tokens: usize) {}
    /// A sequence started (or restarted after preemption) with `queried` tokens, the first
    /// `hit` of them already in cached blocks.
    fn on_prefix_cache(&self, _queried: usize, _hit: usize) {}
    /// A request was cancelled because its sink closed.
    fn on_cancel(&self) {}
    /// The state after a step (and whenever the scheduler goes idle).
    fn on_state(&self, _running: usize, _waiting: usize, _kv_usage: f64) {}
}

struct NoObserver;
impl Observer for NoObserver {}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch.
    pub max_num_seqs: usize,
    /// Most requests waiting for their first step; further submissions are refused.
    pub max_queue: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_queue: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting); retry later")]
    QueueFull(usize),
    #[error(transparent)]
    Invalid(#[from] EngineError),
    #[error("the scheduler has stopped")]
    Stopped,
}

struct Entry {
    seq: Sequence,
    decoding: Decoding,
    sink: Box<dyn Sink>,
    /// Scheduled at least once (counted out of the queue and into the prompt tokens).
    started: bool,
    /// Finished, failed or cancelled: removed (and its blocks freed) at the end of the step.
    done: bool,
}

/// Submits requests to a running scheduler; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Entry>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    context: usize,
    capacity: usize,
}

impl SchedulerHandle {
    /// Tokens a sequence may reach: the model's context, or the whole KV cache if smaller.
    pub fn max_context(&self) -> usize {
        self.context
    }

    /// Token slots in the KV cache.
    pub fn kv_capacity(&self) -> usize {
        self.capacity
    }

    /// Requests submitted and not yet scheduled.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Checks a request as `Engine::generate` does and queues it; its updates go to `sink`.
    pub fn submit(&self, request: Request, sink: Box<dyn Sink>) -> Result<(), SubmitError> {
        check_prompt_len(
            request.prompt.len(),
            request.max_tokens,
            self.context,
            self.capacity,
        )?;
        let decoding = Decoding::new(&request)?;
        let queued = self.queued.fetch_add(1, Ordering::AcqRel);
        if queued >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::QueueFull(queued));
        }
        let entry = Entry {
            seq: Sequence::new(request.prompt),
            decoding,
            sink,
            started: false,
            done: false,
        };
        self.tx.send(entry).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            SubmitError::Stopped
        })
    }
}

pub struct Scheduler {
    engine: Engine,
    config: SchedulerConfig,
    observer: Arc<dyn Observer>,
    rx: mpsc::Receiver<Entry>,
    queued: Arc<AtomicUsize>,
    /// Oldest first; preempted sequences go back to the front.
    waiting: VecDeque<Entry>,
    /// In admission order: the last one is the newest, preempted first.
    running: Vec<Entry>,
    context: usize,
}

impl Scheduler {
    pub fn new(
        engine: Engine,
        config: SchedulerConfig,
        observer: Option<Arc<dyn Observer>>,
    ) -> (Self, SchedulerHandle) {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let capacity = engine.blocks().num_blocks() * engine.blocks().block_size();
        let context = engine.max_context().min(capacity);
        let handle = SchedulerHandle {
            tx,
            queued: queued.clone(),
            max_queue: config.max_queue,
            context,
            capacity,
        };
        let scheduler = Self {
            engine,
            config: SchedulerConfig {
                max_num_seqs: config.max_num_seqs.max(1),
                ..config
            },
            observer: observer.unwrap_or_else(|| Arc::new(NoObserver)),
            rx,
            queued,
            waiting: VecDeque::new(),
            running: Vec::new(),
            context,
        };
        (scheduler, handle)
    }

    /// Runs the loop on a dedicated thread until every handle is dropped and the work is done.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("marlin-scheduler".into())
            .spawn(move || self.run())
    }

    /// Steps until every handle is dropped and no request is left.
    pub fn run(mut self) {
        while self.intake() {
            self.step();
        }
    }

    /// Takes new requests and drops cancelled ones; blocks while idle. False once every handle
    /// is dropped and nothing is left to do.
    fn intake(&mut self) -> bool {
        loop {
            while let Ok(entry) = self.rx.try_recv() {
                self.add(entry);
            }
            self.drop_cancelled();
            if !self.running.is_empty() || !self.waiting.is_empty() {
                return true;
            }
            self.report();
            match self.rx.recv() {
                Ok(entry) => self.add(entry),
                Err(_) => return false,
            }
        }
    }

    fn add(&mut self, mut entry: Entry) {
        // A request with nothing to generate (max_tokens 0) ends before its first step.
        match entry
            .decoding
            .check_limits(&entry.seq, self.context, self.engine.tokenizer())
        {
            Ok(None) => self.waiting.push_back(entry),
            Ok(Some((reason, text))) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                let finish = Finish::of(&entry.seq, reason);
                entry.sink.send(Update::Finished { text, finish });
            }
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                entry.sink.send(Update::Failed(e.to_string()));
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let engine = &mut self.engine;
        let observer = &self.observer;
        let queued = &self.queued;
        let mut cancel = |entry: &mut Entry| {
            let cancelled = entry.done || entry.sink.is_closed();
            if cancelled {
                if !entry.done {
                    observer.on_cancel();
                }
                if !entry.started {
                    queued.fetch_sub(1, Ordering::AcqRel);
                }
                engine.release(&mut entry.seq);
            }
            !cancelled
        };
        self.running.retain_mut(&mut cancel);
        self.waiting.retain_mut(&mut cancel);
    }

    fn report(&self) {
        self.observer.on_state(
            self.running.len(),
            self.waiting.len(),
            self.engine.blocks().usage(),
        );
    }

    /// Frees the newest running sequence's blocks and puts it at the front of the queue.
    fn preempt_newest(&mut self) {
        if let Some(mut entry) = self.running.pop() {
            self.engine.release(&mut entry.seq);
            self.observer.on_preemption();
            self.waiting.push_front(entry);
        }
    }

    /// Plans and runs one step, then hands each sequence's logits to its request.
    fn step(&mut self) {
        let max_budget = self.engine.runner().max_step_tokens();
        let block_size = self.engine.blocks().block_size();
        let mut plan: Vec<usize> = Vec::new();
        let mut budget;
        // Running sequences: decodes first, then prompt chunks, each oldest first. A reservation
        // that fails preempts the newest sequence and plans again (blocks already reserved
        // stay with their sequences, which need them anyway).
        'plan: loop {
            plan.clear();
            budget = max_budget;
            let mut order: Vec<usize> = (0..self.running.len()).collect();
            order.sort_by_key(|&i| self.running[i].seq.pending() > 1);
            for i in order {
                let seq = &mut self.running[i].seq;
                let take = seq.pending().min(budget);
                if take == 0 {
                    continue;
                }
                let tokens = seq.computed + take;
                if !self.engine.reserve(seq, tokens) {
                    self.preempt_newest();
                    continue 'plan;
                }
                plan.push(i);
                budget -= take;
            }
            break;
        }
        // New and preempted requests, while the batch and the budget have room and the whole
        // sequence (plus its next token) fits in the free blocks.
        while self.running.len() < self.config.max_num_seqs && budget > 0 {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let needed = (front.seq.tokens.len() + 1)
                .min(self.context)
                .div_ceil(block_size);
            if needed > self.engine.blocks().num_free() {
                if self.running.is_empty() {
                    // Alone with every block free and still too big: it can never run.
                    let mut entry = self.waiting.pop_front().expect("front exists");
                    self.finish_unfittable(&mut entry);
                    continue;
                }
                break;
            }
            let mut entry = self.waiting.pop_front().expect("front exists");
            let shared = self.engine.share_prefix(&mut entry.seq);
            self.observer
                .on_prefix_cache(entry.seq.tokens.len(), shared);
            let take = entry.seq.pending().min(budget);
            let tokens = entry.seq.computed + take;
            let reserved = self.engine.reserve(&mut entry.seq, tokens);
            debug_assert!(reserved, "the free blocks were counted");
            if !reserved {
                self.waiting.push_front(entry);
                break;
            }
            if !entry.started {
                entry.started = true;
                self.queued.fetch_sub(1, Ordering::AcqRel);
                self.observer.on_prompt_tokens(entry.seq.prompt_len);
            }
            self.running.push(entry);
            plan.push(self.running.len() - 1);
            budget -= take;
        }
        if plan.is_empty() {
            self.report();
            return;
        }

        let mut slots: Vec<Option<&mut Entry>> = self.running.iter_mut().map(Some).collect();
        let mut planned: Vec<&mut Entry> = plan
            .iter()
            .map(|&i| slots[i].take().expect("planned once"))
            .collect();
        let mut seqs: Vec<&mut Sequence> = planned.iter_mut().map(|e| &mut e.seq).collect();
        let result = self.engine.step_logits(&mut seqs, false);
        drop(seqs);
        match result {
            Ok(mut logits) => {
                let mut accepts: Vec<(&mut Entry, &mut [f32])> = planned
                    .into_iter()
                    .zip(logits.rows_mut())
                    .filter_map(|(entry, row)| Some((entry, row?)))
                    .collect();
                self.observer.on_generation_tokens(accepts.len());
                // Sampling, detokenizing and handing text to the clients is per request and
                // takes a core for a while at a large batch: spread it over the step's threads
                // instead of leaving them idle. Each request's outcome depends only on itself.
                let (tokenizer, context, observer) =
                    (self.engine.tokenizer(), self.context, &*self.observer);
                self.engine.runner().install(&mut || {
                    accepts.par_iter_mut().for_each(|(entry, logits)| {
                        accept(entry, logits, tokenizer, context, observer)
                    })
                });
            }
            Err(e) => {
                let message = e.to_string();
                for entry in planned {
                    entry.sink.send(Update::Failed(message.clone()));
                    entry.done = true;
                }
            }
        }
        let engine = &mut self.engine;
        self.running.retain_mut(|entry| {
            if entry.done {
                engine.release(&mut entry.seq);
            }
            !entry.done
        });
        self.report();
    }

    fn finish_unfittable(&mut self, entry: &mut Entry) {
        let tokenizer = self.engine.tokenizer();
        if !entry.started {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        let update = match entry
            .decoding
            .check_limits(&entry.seq, 0, tokenizer)
            .map_err(|e| e.to_string())
        {
            Ok(Some((_, text))) => Update::Finished {
                text,
                finish: Finish::of(&entry.seq, FinishReason::Length),
            },
            Ok(None) => unreachable!("a context of 0 is always full"),
            Err(e) => Update::Failed(e),
        };
        entry.sink.send(update);
    }
}

/// Samples a running request's next token from its `logits` and tells the request.
fn accept(
    entry: &mut Entry,
    logits: &mut [f32],
    tokenizer: &Tokenizer,
    context: usize,
    observer: &dyn Observer,
) {
    let outcome = entry
        .decoding
        .accept(&mut entry.seq, logits, tokenizer)
        .and_then(|accepted| {
            let end = match accepted.finish {
                Some(reason) => Some((reason, String::new())),
                None => entry
                    .decoding
                    .check_limits(&entry.seq, context, tokenizer)?,
            };
            Ok((accepted.text, end))
        });
    match outcome {
        Ok((text, end)) => {
            let alive = entry.sink.send(Update::Token(text));
            if let Some((reason, text)) = end {
                let finish = Finish::of(&entry.seq, reason);
                entry.sink.send(Update::Finished { text, finish });
                entry.done = true;
            } else if !alive {
                observer.on_cancel();
                entry.done = true;
            }
        }
        Err(e) => {
            entry.sink.send(Update::Failed(e.to_string()));
            entry.done = true;
        }
    }
}

/// Runs `requests` through a scheduler on this thread and returns each one's updates in order;
/// for tests and benchmarks that want batching without threads.
pub fn run_to_completion(
    engine: Engine,
    config: SchedulerConfig,
    observer: Option<Arc<dyn Observer>>,
    requests: Vec<Request>,
) -> (Engine, Vec<Vec<Update>>) {
    let (mut scheduler, handle) = Scheduler::new(engine, config, observer);
    let mut receivers = Vec::new();
    let mut errors = Vec::new();
    for request in requests {
        let (tx, rx) = mpsc::channel();
        match handle.submit(request, Box::new(tx)) {
            Ok(()) => errors.push(None),
            Err(e) => errors.push(Some(Update::Failed(e.to_string()))),
        }
        receivers.push(rx);
    }
    drop(handle);
    while scheduler.intake() {
        scheduler.step();
    }
    let updates = receivers
        .into_iter()
        .zip(errors)
        .map(|(rx, error)| error.into_iter().chain(rx.try_iter()).collect())
        .collect();
    (scheduler.engine, updates)
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("running", &self.running.len())
            .field("waiting", &self.waiting.len())
            .finish()
    }
}
