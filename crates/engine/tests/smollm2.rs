//! SmolLM2-135M-Instruct from its GGUF (the default model) against transformers loading the same
//! file (tests/fixtures/smollm2, made by scripts/fixtures/make_smollm2_refs.py).

use marlin_engine::{Engine, Event, Request, Runner, SamplingParams};
use marlin_kernels::cpu::{Activations, CpuBackend};
use marlin_kernels::DenseFormat;
use marlin_model::ModelFiles;
use serde_json::Value;
use std::path::PathBuf;

mod common;

use common::default_model;

fn fixture(name: &str) -> Value {
    let manifest =
        std::env::var("CARGO_MANIFEST_DIR").expect("run through cargo or the device runner");
    let path = PathBuf::from(manifest)
        .join("../../tests/fixtures/smollm2")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// `amx`: batched rows on AMX where the CPU has it, prompt rows on its bf16 tiles among them
/// (without, every row takes the integer path: the same bits AMX's integer tiles give).
fn engine(dtype: DenseFormat, activations: Activations, amx: bool) -> Engine {
    let files = ModelFiles::open(&default_model()).unwrap();
    let backend = CpuBackend::with_activations(0, activations)
        .unwrap()
        .with_amx(amx);
    let model = files.load(backend, dtype).unwrap();
    let runner = Runner::new(model, 128, 64, 16).unwrap();
    Engine::new(Box::new(runner), files.tokenizer.clone())
}

/// Teacher-forced logits over the 64-token passage compared at each position's top-20 and probe
/// ids: (largest absolute error, positions whose argmax differs).
fn logit_errors(dtype: DenseFormat, activations: Activations, amx: bool) -> (f32, usize) {
    let reference = fixture("logits.json");
    let tokens = ids(&reference["ids"]);
    let probes = ids(&reference["probe_ids"]);
    let mut engine = engine(dtype, activations, amx);
    let vocab = 49152;
    let logits = engine.score(&tokens).unwrap();
    let (mut worst, mut argmax_differs) = (0f32, 0);
    for position in reference["positions"].as_array().unwrap() {
        let pos = position["pos"].as_u64().unwrap() as usize;
        let row = &logits[pos * vocab..(pos + 1) * vocab];
        let checks = ids(&position["top_ids"])
            .into_iter()
            .zip(floats(&position["top_logits"]))
            .chain(
                probes
                    .iter()
                    .copied()
                    .zip(floats(&position["probe_logits"])),
            );
        for (id, theirs) in checks {
            worst = worst.max((row[id as usize] - theirs).abs());
        }
        let ours = row
            .iter()
            .enumerate()
            .fold(0, |best, (i, v)| if *v > row[best] { i } else { best });
        argmax_differs += usize::from(ours as u32 != ids(&position["top_ids"])[0]);
    }
    (worst, argmax_differs)
}

// Logits here span about ±30. In f32 both sides dequantize the same Q4_1/Q8_0 blocks exactly and
// differ only in summation order over 30 layers: observed 7e-5 absolute; the bound is 1e-3.
#[test]
fn f32_logits_match_transformers() {
    let (worst, argmax_differs) = logit_errors(DenseFormat::F32, Activations::F32, true);
    assert!(worst <= 1e-3, "largest logit error {worst}");
    assert_eq!(argmax_differs, 0);
}

// f16 rounds each dequantized weight (relative 2^-11); bf16 keeps 8 bits of mantissa (2^-8).
// Observed largest logit errors: 0.032 (f16) and 0.22 (bf16); the bounds are about 3x those.
#[test]
fn f16_and_bf16_logits_stay_within_their_bounds() {
    for (dtype, bound, max_flips) in [(DenseFormat::F16, 0.1, 1), (DenseFormat::BF16, 0.6, 3)] {
        let (worst, argmax_differs) = logit_errors(dtype, Activations::F32, true);
        assert!(
            worst <= bound,
            "{dtype}: largest logit error {worst} > {bound}"
        );
        assert!(
            argmax_differs <= max_flips,
            "{dtype}: argmax differs at {argmax_differs} of 64 positions"
        );
    }
}

// Integer activations (`--activations int16|int8`, on CPUs with VNNI) round every int4/int8
// matmul's input per 32-block: to two int8 codes (int16, the default) or one (int8). Observed
// largest logit errors (logits span about ±30) and argmax flips at 64 positions: int16 0.017 and 0,
// int8 2.1 and 2; mean KLD over 40 windows of Pride and Prejudice in docs/benchmarks.md. Every
// position here is a prompt token, so the integer path is measured with AMX off (prompt rows
// would take bf16 tiles, below).
#[test]
fn integer_activation_logits_stay_within_their_bounds() {
    if !marlin_kernels::cpu::integer_activations_available() {
        eprintln!("skipped: no AVX-512 VNNI");
        return;
    }
    for (activations, bound, max_flips) in
        [(Activations::Int16, 0.06, 1), (Activations::Int8, 3.0, 4)]
    {
        let (worst, argmax_differs) = logit_errors(DenseFormat::F32, activations, false);
        eprintln!(
            "{activations:?}: largest logit error {worst}, argmax differs at {argmax_differs} of 64"
        );
        assert!(
            worst <= bound,
            "{activations:?}: largest logit error {worst}"
        );
        assert!(
            argmax_differs <= max_flips,
            "{activations:?}: argmax differs at {argmax_differs} of 64 positions"
        );
    }
}

// Prompt rows on AMX-BF16 tiles (the default where the CPU has them): weights and activations
// rounded to bf16 with f32 sums, as on a GPU. Observed: largest logit error 0.47, argmax differs
// at 1 of 64 positions (int8 activations: 2.1 and 2; bf16 weights with f32 activations: 0.22).
#[test]
fn bf16_prompt_tile_logits_stay_within_their_bounds() {
    if !marlin_kernels::cpu::bf16_prompt_tiles_available() {
        eprintln!("skipped: no AMX-BF16 tiles");
        return;
    }
    let (worst, argmax_differs) = logit_errors(DenseFormat::F32, Activations::Int16, true);
    eprintln!(
        "bf16 prompt tiles: largest logit error {worst}, argmax differs at {argmax_differs} of 64"
    );
    assert!(worst <= 1.5, "largest logit error {worst}");
    assert!(
        argmax_differs <= 3,
        "argmax differs at {argmax_differs} of 64 positions"
    );
}

#[test]
fn f32_greedy_tokens_match_transformers() {
    let reference = fixture("greedy.json");
    let mut engine = engine(DenseFormat::F32, Activations::F32, true);
    for prompt in reference["prompts"].as_array().unwrap() {
        let expected = ids(&prompt["new_tokens"]);
        let request = Request {
            prompt: ids(&prompt["prompt_ids"]),
            sampling: SamplingParams::default(),
            max_tokens: expected.len(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
        };
        let mut got = None;
        for events in engine.generate(request).unwrap() {
            for event in events.unwrap() {
                if let Event::Finished(f) = event {
                    got = Some(f.token_ids);
                }
            }
        }
        assert_eq!(got.unwrap(), expected, "{}", prompt["name"]);
    }
}
