//! The continuous-batching scheduler against `Engine::generate` on the tiny fixture checkpoints:
//! batched, chunked and preempted requests must produce exactly the tokens, text and finish of
//! the same request run alone, and cancelled requests must give their blocks back.

use marlin_engine::scheduler::{run_to_completion, Observer, Scheduler, SchedulerConfig, Update};
use marlin_engine::{Engine, Event, Finish, Request, Runner, SamplingParams};
use marlin_kernels::cpu::CpuBackend;
use marlin_kernels::DenseFormat;
use marlin_model::ModelFiles;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn engine(name: &str, blocks: usize, block_size: usize, step_tokens: usize) -> (Engine, Vec<u32>) {
    let files = ModelFiles::open(&fixture(name)).unwrap();
    let model = files
        .load(CpuBackend::new(2).unwrap(), DenseFormat::F32)
        .unwrap();
    let runner = Runner::new(model, step_tokens, blocks, block_size).unwrap();
    (
        Engine::new(Box::new(runner), files.tokenizer.clone()),
        files.stop_token_ids(),
    )
}

fn requests(stop_token_ids: &[u32]) -> Vec<Request> {
    (0..12u32)
        .map(|i| {
            let len = 3 + (i as usize * 7) % 50;
            let prompt = (0..len as u32)
                .map(|t| 3 + (t * 13 + i * 31) % 300)
                .collect();
            let sampling = if i % 2 == 0 {
                SamplingParams::default()
            } else {
                SamplingParams {
                    temperature: 0.9,
                    top_k: 50,
                    top_p: 0.95,
                    repetition_penalty: 1.1,
                    seed: Some(u64::from(i)),
                    ..SamplingParams::default()
                }
            };
            Request {
                prompt,
                sampling,
                max_tokens: 20 + (i as usize % 4) * 5,
                stop: if i % 3 == 0 {
                    vec!["e".into(), " t".into()]
                } else {
                    Vec::new()
                },
                stop_token_ids: stop_token_ids.to_vec(),
            }
        })
        .collect()
}

fn alone(engine: &mut Engine, request: Request) -> (String, Finish) {
    let mut text = String::new();
    for events in engine.generate(request).unwrap() {
        for event in events.unwrap() {
            match event {
                Event::Text(t) => text.push_str(&t),
                Event::Finished(f) => return (text, f),
            }
        }
    }
    unreachable!("a generation ends with Finished")
}

fn collect(updates: &[Update]) -> (String, Finish) {
    let mut text = String::new();
    for update in updates {
        match update {
            Update::Token(t) => text.push_str(t),
            Update::Finished { text: t, finish } => {
                text.push_str(t);
                return (text, finish.clone());
            }
            Update::Failed(e) => panic!("request failed: {e}"),
        }
    }
    panic!("no Finished update in {updates:?}")
}

#[derive(Default)]
struct Counts {
    preemptions: AtomicUsize,
    cancels: AtomicUsize,
    generated: AtomicUsize,
    last_state: Mutex<(usize, usize, f64)>,
}

impl Observer for Counts {
    fn on_preemption(&self) {
        self.preemptions.fetch_add(1, Ordering::Relaxed);
    }
    fn on_cancel(&self) {
        self.cancels.fetch_add(1, Ordering::Relaxed);
    }
    fn on_generation_tokens(&self, n: usize) {
        self.generated.fetch_add(n, Ordering::Relaxed);
    }
    fn on_state(&self, running: usize, waiting: usize, kv: f64) {
        *self.last_state.lock().unwrap() = (running, waiting, kv);
    }
}

fn check_batched_equals_alone(name: &str, blocks: usize, step_tokens: usize, expect_preempt: bool) {
    let (mut reference, stops) = engine(name, 256, 4, 64);
    let expected: Vec<(String, Finish)> = requests(&stops)
        .into_iter()
        .map(|r| alone(&mut reference, r))
        .collect();

    let (batched, _) = engine(name, blocks, 4, step_tokens);
    let counts = Arc::new(Counts::default());
    let observer: Arc<dyn Observer> = counts.clone();
    let config = SchedulerConfig {
        max_num_seqs: 8,
        max_queue: 100,
    };
    let (batched, updates) = run_to_completion(batched, config, Some(observer), requests(&stops));
    for (i, (updates, expected)) in updates.iter().zip(&expected).enumerate() {
        assert_eq!(&collect(updates), expected, "{name} request {i}");
        let tokens = updates
            .iter()
            .filter(|u| matches!(u, Update::Token(_)))
            .count();
        assert_eq!(tokens, expected.1.completion_tokens, "one Token per token");
    }
    let preemptions = counts.preemptions.load(Ordering::Relaxed);
    assert_eq!(
        preemptions > 0,
        expect_preempt,
        "{name}: {preemptions} preemptions"
    );
    assert_eq!(
        batched.blocks().num_free(),
        batched.blocks().num_blocks(),
        "every block is returned"
    );
    assert_eq!(*counts.last_state.lock().unwrap(), (0, 0, 0.0));
}

#[test]
fn batched_and_chunked_requests_match_generate() {
    check_batched_equals_alone("tiny-llama", 256, 16, false);
    check_batched_equals_alone("tiny-qwen3", 256, 64, false);
}

#[test]
fn preempted_requests_match_generate() {
    // 24 blocks of 4 tokens hold 96 tokens: one long request fits, eight at once do not.
    check_batched_equals_alone("tiny-llama", 24, 16, true);
    check_batched_equals_alone("tiny-qwen3", 24, 32, true);
}

#[test]
fn queue_limit_and_validation() {
    let (engine, stops) = engine("tiny-llama", 16, 4, 64);
    let (scheduler, handle) = Scheduler::new(
        engine,
        SchedulerConfig {
            max_num_seqs: 1,
            max_queue: 2,
        },
        None,
    );
    // Not running yet: submissions pile up in the queue.
    let mut request = requests(&stops).remove(0);
    let (tx, _rx) = mpsc::channel();
    handle
        .submit(request.clone(), Box::new(tx.clone()))
        .unwrap();
    handle
        .submit(request.clone(), Box::new(tx.clone()))
        .unwrap();
    let err = handle.submit(request.clone(), Box::new(tx.clone()));
    assert!(
        matches!(
            err,
            Err(marlin_engine::scheduler::SubmitError::QueueFull(_))
        ),
        "{err:?}"
    );
    request.prompt = vec![5; 64];
    let err = handle.submit(request.clone(), Box::new(tx.clone()));
    assert!(err.unwrap_err().to_string().contains("context"));
    request.prompt.clear();
    assert!(handle.submit(request.clone(), Box::new(tx)).is_err());
    drop(scheduler);
}

#[test]
fn a_dropped_receiver_cancels_and_frees_blocks() {
    let (engine, _) = engine("tiny-llama", 64, 4, 64);
    let counts = Arc::new(Counts::default());
    let observer: Arc<dyn Observer> = counts.clone();
    let (scheduler, handle) = Scheduler::new(engine, SchedulerConfig::default(), Some(observer));
    let thread = scheduler.spawn().unwrap();
    let long = Request {
        prompt: (3..40).collect(),
        sampling: SamplingParams::default(),
        max_tokens: 200,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
    };
    let (tx, rx) = mpsc::channel();
    handle.submit(long.clone(), Box::new(tx)).unwrap();
    for _ in 0..3 {
        assert!(matches!(rx.recv().unwrap(), Update::Token(_)));
    }
    drop(rx);
    // A second request runs to its end after the first is gone.
    let (tx, rx) = mpsc::channel();
    let short = Request {
        max_tokens: 5,
        ..long
    };
    handle.submit(short, Box::new(tx)).unwrap();
    let updates: Vec<Update> = rx.iter().collect();
    assert_eq!(collect(&updates).1.completion_tokens, 5);
    drop(handle);
    thread.join().unwrap();
    assert_eq!(counts.cancels.load(Ordering::Relaxed), 1);
    assert!(counts.generated.load(Ordering::Relaxed) < 200);
    assert_eq!(*counts.last_state.lock().unwrap(), (0, 0, 0.0));
}
