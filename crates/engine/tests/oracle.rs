//! The tiny random Llama and Qwen3 checkpoints against transformers' logits, greedy tokens and
//! chat template (tests/fixtures, made by scripts/fixtures/make_tiny.py), and the batch invariance
//! the server relies on.

use marlin_engine::{Engine, Event, Request, Runner, SamplingParams, Sequence, StepRunner};
use marlin_kernels::cpu::CpuBackend;
use marlin_kernels::{DenseFormat, StepBatch};
use marlin_model::{ChatMessage, ModelFiles};
use serde_json::Value;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    let manifest =
        std::env::var("CARGO_MANIFEST_DIR").expect("run through cargo or the device runner");
    PathBuf::from(manifest)
        .join("../../tests/fixtures")
        .join(name)
}

fn reference(name: &str) -> Value {
    let path = fixture(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn engine(name: &str, dtype: DenseFormat, step_tokens: usize) -> (Engine, ModelFiles) {
    let files = ModelFiles::open(&fixture(name)).unwrap();
    let model = files.load(CpuBackend::new(2).unwrap(), dtype).unwrap();
    let runner = Runner::new(model, step_tokens, 64, 4).unwrap();
    (
        Engine::new(Box::new(runner), files.tokenizer.clone()),
        files,
    )
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Largest |ours - theirs| over a row, relative to the row's largest |theirs|.
fn row_error(ours: &[f32], theirs: &[f32]) -> f32 {
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = ours
        .iter()
        .zip(theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    err / scale
}

// Both sides compute in f32 with different summation orders (and we use FMA); over a 64-wide
// hidden state and two layers that leaves differences of a few 1e-7 relative. 1e-4 leaves room
// without hiding a wrong rotary frequency, norm or head mapping, which move logits by > 1e-2.
const F32_BOUND: f32 = 1e-4;

fn check_logits(name: &str, step_tokens: usize) {
    let reference = reference(name);
    let (mut engine, files) = engine(name, DenseFormat::F32, step_tokens);
    let vocab = files.config.vocab_size;
    for (seq, logits) in reference["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["logits"].as_array().unwrap())
    {
        let tokens = ids(seq);
        let ours = engine.score(&tokens).unwrap();
        assert_eq!(ours.len(), tokens.len() * vocab);
        for (pos, row) in logits.as_array().unwrap().iter().enumerate() {
            let theirs: Vec<f32> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let err = row_error(&ours[pos * vocab..(pos + 1) * vocab], &theirs);
            assert!(
                err <= F32_BOUND,
                "{name}: sequence of {} tokens, position {pos}: relative error {err}",
                tokens.len()
            );
        }
        assert_eq!(
            engine.blocks().num_free(),
            engine.blocks().num_blocks(),
            "score frees its blocks"
        );
    }
}

#[test]
fn tiny_llama_logits_match_transformers() {
    check_logits("tiny-llama", 64);
}

#[test]
fn tiny_qwen3_logits_match_transformers() {
    check_logits("tiny-qwen3", 64);
}

#[test]
fn chunked_prefill_gives_the_same_logits() {
    // A 40-token sequence through 16-token steps crosses chunk and block boundaries.
    check_logits("tiny-llama", 16);
}

fn greedy(engine: &mut Engine, prompt: Vec<u32>, max_tokens: usize) -> Vec<u32> {
    let request = Request {
        prompt,
        sampling: SamplingParams::default(),
        max_tokens,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
    };
    let mut out = None;
    for events in engine.generate(request).unwrap() {
        for event in events.unwrap() {
            if let Event::Finished(f) = event {
                out = Some(f.token_ids);
            }
        }
    }
    out.unwrap()
}

#[test]
fn greedy_tokens_match_transformers() {
    for name in ["tiny-llama", "tiny-qwen3"] {
        let reference = reference(name);
        let (mut engine, _) = engine(name, DenseFormat::F32, 64);
        let expected = ids(&reference["greedy"]["tokens"]);
        let got = greedy(
            &mut engine,
            ids(&reference["greedy"]["prompt"]),
            expected.len(),
        );
        assert_eq!(got, expected, "{name}");
    }
}

/// Greedy decoding with each step queued before the ids of the step before reach the host (the
/// step takes them where the backend keeps them, `tokens_from_argmax`) chooses transformers'
/// tokens, and the ids come back one step behind, in order.
#[test]
fn steps_fed_by_the_previous_argmax_match_transformers() {
    const BLOCK: usize = 4;
    for name in ["tiny-llama", "tiny-qwen3"] {
        let reference = reference(name);
        let files = ModelFiles::open(&fixture(name)).unwrap();
        let model = files
            .load(CpuBackend::new(2).unwrap(), DenseFormat::F32)
            .unwrap();
        let mut runner = Runner::new(model, 64, 64, BLOCK).unwrap();
        let prompt = ids(&reference["greedy"]["prompt"]);
        let expected = ids(&reference["greedy"]["tokens"]);
        let total = prompt.len() + expected.len();
        let table: Vec<u32> = (0..total.div_ceil(BLOCK) as u32).rev().collect();
        let batch = |from: usize, tokens: Vec<u32>, fed: bool| StepBatch {
            logit_rows: vec![tokens.len() as u32 - 1],
            tokens_from_argmax: fed,
            ..StepBatch::one_sequence(tokens, from, &table, BLOCK, prompt.len())
        };
        runner
            .queue_greedy(&batch(0, prompt.clone(), false))
            .unwrap();
        let mut got = runner.take_greedy().unwrap();
        for step in 0..expected.len() - 1 {
            let fed = step > 0;
            let token = if fed { vec![0] } else { got.clone() };
            runner
                .queue_greedy(&batch(prompt.len() + step, token, fed))
                .unwrap();
            if fed {
                got.extend(runner.take_greedy().unwrap());
            }
        }
        if expected.len() > 1 {
            got.extend(runner.take_greedy().unwrap());
        }
        assert_eq!(got, expected, "{name}");
        let none = runner.take_greedy().unwrap_err().to_string();
        assert!(none.contains("no ids queued"), "{name}: {none}");
    }
}

#[test]
fn chat_template_and_tokenizer_match_transformers() {
    for name in ["tiny-llama", "tiny-qwen3"] {
        let reference = reference(name);
        let files = ModelFiles::open(&fixture(name)).unwrap();
        let chat = &reference["chat"];
        let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let rendered = files
            .chat_template
            .as_ref()
            .unwrap()
            .render(&messages, true)
            .unwrap();
        assert_eq!(rendered, chat["rendered"].as_str().unwrap(), "{name}");
        assert_eq!(
            files.tokenizer.encode(&rendered, false).unwrap(),
            ids(&chat["ids"]),
            "{name}"
        );
    }
}

#[test]
fn batched_step_is_bitwise_equal_to_separate_steps() {
    let (mut engine, files) = engine("tiny-qwen3", DenseFormat::F16, 64);
    let vocab = files.config.vocab_size;
    let prompts: Vec<Vec<u32>> = vec![(1..20).collect(), vec![7, 8, 9], (100..133).collect()];
    // Alone: prefill, then one decoded token each.
    let mut alone = Vec::new();
    for p in &prompts {
        let mut seq = Sequence::new(p.clone());
        let first = engine
            .step(&mut [&mut seq], false)
            .unwrap()
            .pop()
            .flatten()
            .unwrap();
        seq.tokens.push(5);
        let second = engine
            .step(&mut [&mut seq], false)
            .unwrap()
            .pop()
            .flatten()
            .unwrap();
        engine.release(&mut seq);
        alone.push((first, second));
    }
    // Together: sequence 0 decodes while 1 and 2 prefill in the same step, then all decode.
    let mut seqs: Vec<Sequence> = prompts.iter().map(|p| Sequence::new(p.clone())).collect();
    let first0 = engine
        .step(&mut [&mut seqs[0]], false)
        .unwrap()
        .pop()
        .flatten()
        .unwrap();
    seqs[0].tokens.push(5);
    let [s0, s1, s2] = &mut seqs[..] else {
        unreachable!()
    };
    let mixed = engine.step(&mut [s0, s1, s2], false).unwrap();
    for s in seqs.iter_mut() {
        s.tokens.push(5);
    }
    let [s0, s1, s2] = &mut seqs[..] else {
        unreachable!()
    };
    let decoded = engine.step(&mut [s1, s2, s0], false).unwrap();
    assert_eq!(first0, alone[0].0);
    assert_eq!(
        mixed[0].as_ref().unwrap(),
        &alone[0].1,
        "decode next to prefills"
    );
    assert_eq!(
        mixed[1].as_ref().unwrap(),
        &alone[1].0,
        "prefill next to a decode"
    );
    assert_eq!(mixed[2].as_ref().unwrap(), &alone[2].0);
    assert_eq!(decoded[0].as_ref().unwrap(), &alone[1].1, "batched decode");
    assert_eq!(decoded[1].as_ref().unwrap(), &alone[2].1);
    assert_eq!(decoded.len(), 3);
    assert!(mixed.iter().all(|r| r.as_ref().unwrap().len() == vocab));
}

#[test]
fn prompt_longer_than_context_is_a_clear_error() {
    let (mut engine, files) = engine("tiny-llama", DenseFormat::F32, 64);
    let prompt = vec![3u32; files.config.max_context + 1];
    let request = Request {
        prompt,
        sampling: SamplingParams::default(),
        max_tokens: 4,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
    };
    let err = engine.generate(request).err().unwrap().to_string();
    assert!(err.contains("context"), "{err}");
}

#[test]
fn observer_sees_every_linear_input_and_set_weight_takes_effect() {
    struct Seen(Vec<(usize, Vec<String>, usize, usize)>);
    impl marlin_model::llama::MatmulObserver for Seen {
        fn last_layer(&self) -> usize {
            0
        }
        fn observe(
            &mut self,
            layer: usize,
            weights: &[String],
            input: &[f32],
            rows: usize,
            cols: usize,
        ) {
            assert_eq!(input.len(), rows * cols);
            assert!(input.iter().all(|v| v.is_finite()));
            self.0.push((layer, weights.to_vec(), rows, cols));
        }
    }
    let (mut engine, files) = engine("tiny-llama", DenseFormat::F32, 64);
    let mut seen = Seen(Vec::new());
    engine.observe(&[5, 6, 7, 8, 9], &mut seen).unwrap();
    let c = &files.config;
    let sites: Vec<(usize, usize)> = seen
        .0
        .iter()
        .map(|(_, w, r, cols)| (w.len() * 1000 + r, *cols))
        .collect();
    assert_eq!(
        sites,
        vec![
            (3005, c.hidden_size),
            (1005, c.num_heads * c.head_dim),
            (2005, c.hidden_size),
            (1005, c.intermediate_size)
        ]
    );
    assert!(seen.0.iter().all(|(layer, ..)| *layer == 0));
    assert_eq!(
        seen.0[3].1,
        vec!["model.layers.0.mlp.down_proj.weight".to_string()]
    );
    assert_eq!(engine.blocks().num_free(), engine.blocks().num_blocks());

    let before = engine.score(&[5, 6, 7]).unwrap();
    let zeros = marlin_kernels::HostWeight::from_f32(
        DenseFormat::F32,
        c.hidden_size,
        c.intermediate_size,
        &vec![0.0; c.hidden_size * c.intermediate_size],
    )
    .unwrap();
    engine
        .set_weight("model.layers.1.mlp.down_proj.weight", &zeros)
        .unwrap();
    assert_ne!(engine.score(&[5, 6, 7]).unwrap(), before);
    assert!(engine
        .set_weight("model.layers.1.mlp.nope.weight", &zeros)
        .is_err());
}
