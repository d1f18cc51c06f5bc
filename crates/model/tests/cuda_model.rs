//! Whole models on CUDA against the CPU backend: the tiny Llama and Qwen3 fixtures and a
//! synthetic SmolLM2-135M-shaped model (bf16, f16 and int4-packed weights), teacher-forced logits
//! at every position. Both backends get the same weights; the GPU keeps activations in bf16
//! (f32 arithmetic), the CPU in f32, so the difference measures bf16 activations alone.
//!
//! The sequence is stepped in chunks of 20, 1, 1, 1, 5, 9 and 1 tokens, so both the prefill path
//! (cuBLAS, more than 16 rows) and the decode kernels (GEMV / tensor-core int4 at 1-16 rows) and
//! paged attention over earlier steps' KV are covered.
//!
//! Error per position: max |gpu − cpu| over the vocabulary, relative to max |cpu| (the logits'
//! scale). Bounds: under `WORST` (1e-1) at every position and under `MEAN` (3e-2) on average over
//! the positions. One bf16 rounding is 2⁻⁹ ≈ 2e-3 relative; the hidden state is rounded after
//! every op (about 10 per layer), and a logit sums products that largely cancel, so its error is
//! a few times its inputs'; the maximum over the vocabulary and sharp attention at some positions
//! add outliers. A wrong head, norm, rotary or block-table mapping moves logits by O(1).
//! Measured on an NVIDIA H100 80GB HBM3 (worst / mean): tiny-llama 6.7e-2 / 2.3e-2, tiny-qwen3
//! 2.4e-2 / 1.4e-2, synthetic SmolLM2 bf16 2.4e-2 / 1.8e-2, f16 2.4e-2 / 2.0e-2, int4 1.0e-2 /
//! 8.2e-3.
//!
//! Without a CUDA device each test prints `skipped: no CUDA device (...)` and passes.
#![cfg(feature = "cuda")]

use marlin_kernels::cpu::{Activations, CpuBackend};
use marlin_kernels::cuda::{self, CudaBackend};
use marlin_kernels::{Backend, DenseFormat, StepBatch};
use marlin_model::synthetic::{self, SyntheticSource};
use marlin_model::{KvCache, LoadOptions, Model, ModelConfig, ModelFiles, QuantizeSpec, Workspace};
use marlin_quant::QuantFormat;
use std::io::Write;
use std::path::PathBuf;

/// Largest error allowed at any position, and on average (see the module comment).
const WORST: f32 = 1e-1;
const MEAN: f64 = 3e-2;

/// Tokens per step, in order: prefill over 16 rows, then decode-sized steps.
const CHUNKS: [usize; 7] = [20, 1, 1, 1, 5, 9, 1];

fn gpu(test: &str) -> Option<CudaBackend> {
    if let Some(why) = cuda::unavailable() {
        // Straight to stderr: the harness would swallow the output of a passing test.
        let _ = writeln!(std::io::stderr(), "{test}: skipped: no CUDA device ({why})");
        return None;
    }
    // A device is there: a backend that fails to start is a failure, not a skip.
    Some(CudaBackend::new(0).expect("CUDA backend"))
}

fn cpu() -> CpuBackend {
    // f32 activations throughout: the reference.
    CpuBackend::with_activations(0, Activations::F32).unwrap()
}

/// Logits of every position of `tokens`, stepped in `CHUNKS`.
fn teacher_forced<B: Backend>(model: &Model<B>, tokens: &[u32]) -> Vec<f32> {
    stepped(model, tokens, &CHUNKS)
}

/// Logits of every position of `tokens`, stepped in `chunks` (the first the largest).
fn stepped<B: Backend>(model: &Model<B>, tokens: &[u32], chunks: &[usize]) -> Vec<f32> {
    stepped_with(model, tokens, chunks, |ws, kv, batch| {
        model.forward(ws, kv, batch).unwrap()
    })
}

/// Tokens per KV block of the tests' caches.
const BLOCK: usize = 16;

/// `forward` (or another step of the model) over `tokens` in `chunks`, every position a logit row.
fn stepped_with<B: Backend, T>(
    model: &Model<B>,
    tokens: &[u32],
    chunks: &[usize],
    mut run: impl FnMut(&mut Workspace<B>, &mut KvCache<B>, &StepBatch) -> Vec<T>,
) -> Vec<T> {
    let n = tokens.len();
    let blocks = n.div_ceil(BLOCK);
    let mut ws = model.workspace(chunks[0]).unwrap();
    let mut kv = model.kv_cache(blocks + 2, BLOCK).unwrap();
    // Blocks in reverse order, so a wrong block-table lookup cannot pass by accident.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let mut logits = Vec::new();
    let mut done = 0;
    for &take in chunks {
        let end = done + take;
        let batch = StepBatch {
            logit_rows: (0..take as u32).collect(),
            ..StepBatch::one_sequence(tokens[done..end].to_vec(), done, &table, BLOCK, 0)
        };
        logits.extend(run(&mut ws, &mut kv, &batch));
        done = end;
    }
    assert_eq!(done, n);
    logits
}

fn tokens(vocab: usize) -> Vec<u32> {
    let n: usize = CHUNKS.iter().sum();
    let mut state = 0x9e37_79b9u64;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Compares per position; prints the worst and mean error, then asserts the bound.
fn compare(what: &str, gpu: &[f32], cpu: &[f32], vocab: usize) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: logit counts");
    let mut worst = (0.0f32, 0);
    let mut sum = 0.0f64;
    let rows = cpu.len() / vocab;
    for (p, (g, c)) in gpu.chunks(vocab).zip(cpu.chunks(vocab)).enumerate() {
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{what}: position {p} not finite"
        );
        let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = g.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        sum += err as f64;
        if err > worst.0 {
            worst = (err, p);
        }
    }
    let mean = sum / rows as f64;
    let _ = writeln!(
        std::io::stderr(),
        "{what}: {rows} positions, error max {:.2e} (position {}), mean {mean:.2e}; bounds \
         {WORST:.0e} / {MEAN:.0e}",
        worst.0,
        worst.1,
    );
    assert!(
        worst.0 < WORST && mean < MEAN,
        "{what}: position {} off by {:.2e} of the logits' scale, mean {mean:.2e}",
        worst.1,
        worst.0
    );
}

fn fixture(name: &str) -> PathBuf {
    let manifest =
        std::env::var("CARGO_MANIFEST_DIR").expect("run through cargo or the device runner");
    PathBuf::from(manifest)
        .join("../../tests/fixtures")
        .join(name)
}

fn check_fixture(name: &str) {
    let Some(g) = gpu(name) else {
        return;
    };
    let files = ModelFiles::open(&fixture(name)).unwrap();
    let options = LoadOptions::new(DenseFormat::BF16);
    let vocab = files.config.vocab_size;
    let toks = tokens(vocab);
    let want = teacher_forced(&files.load_with(cpu(), &options).unwrap(), &toks);
    let got = teacher_forced(&files.load_with(g, &options).unwrap(), &toks);
    compare(&format!("{name} bf16"), &got, &want, vocab);
}

#[test]
fn tiny_llama() {
    check_fixture("tiny-llama");
}

#[test]
fn tiny_qwen3() {
    check_fixture("tiny-qwen3");
}

fn check_synthetic(test: &str, options: &LoadOptions) {
    let Some(g) = gpu(test) else {
        return;
    };
    let config: ModelConfig = synthetic::config("smollm2").unwrap();
    let source = SyntheticSource::new("smollm2", &config, options, 11).unwrap();
    let toks = tokens(config.vocab_size);
    let want = teacher_forced(
        &Model::load(cpu(), config.clone(), &source, options.dtype).unwrap(),
        &toks,
    );
    let got = teacher_forced(
        &Model::load(g, config.clone(), &source, options.dtype).unwrap(),
        &toks,
    );
    compare(test, &got, &want, config.vocab_size);
}

#[test]
fn synthetic_smollm2_bf16() {
    check_synthetic(
        "synthetic_smollm2_bf16",
        &LoadOptions::new(DenseFormat::BF16),
    );
}

#[test]
fn synthetic_smollm2_f16() {
    check_synthetic("synthetic_smollm2_f16", &LoadOptions::new(DenseFormat::F16));
}

#[test]
fn synthetic_smollm2_int4() {
    // int4 g32 linear layers (the tensor-core decode kernel) and the int8 g32 tied embedding,
    // which the GPU gathers rows from and multiplies as the output projection.
    let mut options = LoadOptions::new(DenseFormat::BF16);
    options.quantize = Some(QuantizeSpec::new(QuantFormat::Int {
        bits: 4,
        asym: false,
    }));
    check_synthetic("synthetic_smollm2_int4", &options);
}

/// The other packed formats' kernels in a whole model: int3 (2-bit plane plus a third-bit plane),
/// fp8, nvfp4 (E4M3 block scales times a tensor scale) and asymmetric int2 linear layers.
#[test]
fn synthetic_smollm2_other_formats() {
    for format in [
        QuantFormat::Int {
            bits: 3,
            asym: false,
        },
        QuantFormat::Fp8,
        QuantFormat::Nvfp4,
        QuantFormat::Int {
            bits: 2,
            asym: true,
        },
    ] {
        let mut options = LoadOptions::new(DenseFormat::BF16);
        options.quantize = Some(QuantizeSpec::new(format));
        check_synthetic(&format!("synthetic_smollm2 {format}"), &options);
    }
}

/// Decode steps recorded as CUDA graphs and replayed give the logits of the same steps run op by
/// op, bit for bit: 1-token steps (recorded at the second, replayed from the third, across
/// context buckets 32 and 64) and 4-token steps (cuBLAS for bf16 weights inside the recording).
#[test]
fn decode_graphs_replay_exactly() {
    if gpu("decode_graphs_replay_exactly").is_none() {
        return;
    }
    let backend = |graphs: bool| {
        let b = CudaBackend::new(0).expect("CUDA backend");
        b.set_graphs(graphs).unwrap();
        b
    };
    let mut int4 = LoadOptions::new(DenseFormat::BF16);
    int4.quantize = Some(QuantizeSpec::new(QuantFormat::Int {
        bits: 4,
        asym: false,
    }));
    let config: ModelConfig = synthetic::config("smollm2").unwrap();
    let mut chunks = vec![20];
    chunks.extend([1; 16]);
    chunks.extend([4; 4]);
    chunks.extend([1; 8]);
    let n: usize = chunks.iter().sum();
    let toks: Vec<u32> = tokens(config.vocab_size)
        .into_iter()
        .cycle()
        .take(n)
        .collect();
    for (what, options) in [
        ("int4", int4),
        ("bf16", LoadOptions::new(DenseFormat::BF16)),
    ] {
        let source = SyntheticSource::new("smollm2", &config, &options, 11).unwrap();
        let run = |graphs: bool| {
            let model = Model::load(backend(graphs), config.clone(), &source, options.dtype);
            let model = model.unwrap();
            let logits = stepped(&model, &toks, &chunks);
            (logits, model.backend().recorded_steps())
        };
        let ((want, none), (got, recorded)) = (run(false), run(true));
        assert_eq!(none, 0);
        // (1, bucket 32), (1, bucket 64), (4, bucket 64): recorded (not fallen back to direct,
        // nor dropped by a scratch buffer's growth).
        assert_eq!(recorded, 3, "{what}: decode steps recorded");
        assert_eq!(got.len(), want.len());
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        let _ = writeln!(
            std::io::stderr(),
            "decode graphs {what}: {} logits over {n} positions, {differ} differ, {recorded} \
             step shapes recorded",
            got.len()
        );
        assert_eq!(differ, 0, "{what}: replayed steps differ from direct ones");
    }
}

/// A synthetic SmolLM2-shaped model with int4 weights (random codes from `seed`).
fn synthetic_int4(g: CudaBackend, seed: u64) -> (Model<CudaBackend>, ModelConfig) {
    let mut options = LoadOptions::new(DenseFormat::BF16);
    options.quantize = Some(QuantizeSpec::new(QuantFormat::Int {
        bits: 4,
        asym: false,
    }));
    let config: ModelConfig = synthetic::config("smollm2").unwrap();
    let source = SyntheticSource::new("smollm2", &config, &options, seed).unwrap();
    let model = Model::load(g, config.clone(), &source, options.dtype).unwrap();
    (model, config)
}

/// Greedy steps (`forward_greedy`: the argmax taken on the device, only ids read back) choose
/// what the host scan of the same steps' logits chooses, over prefill and decode steps (graphs
/// on, so replayed steps too).
#[test]
fn greedy_ids_match_logits() {
    let Some(g) = gpu("greedy_ids_match_logits") else {
        return;
    };
    let (model, config) = synthetic_int4(g, 5);
    let toks = tokens(config.vocab_size);
    let logits = stepped(&model, &toks, &CHUNKS);
    let want: Vec<u32> = logits
        .chunks(config.vocab_size)
        .map(marlin_kernels::argmax)
        .collect();
    let got = stepped_with(&model, &toks, &CHUNKS, |ws, kv, batch| {
        model.forward_greedy(ws, kv, batch).unwrap()
    });
    assert_eq!(got, want);
}

/// Greedy decode steps fed on the device by the step before's argmax (each queued before those
/// ids reach the host, `tokens_from_argmax`) choose what steps fed by the host choose, on the
/// same backend (graphs on, so replayed steps too).
#[test]
fn steps_fed_on_the_device_match_steps_fed_by_the_host() {
    let Some(g) = gpu("steps_fed_on_the_device_match_steps_fed_by_the_host") else {
        return;
    };
    let (model, config) = synthetic_int4(g, 6);
    let prompt = &tokens(config.vocab_size)[..20];
    let by_host = greedy_decode(&model, prompt, 24, false);
    let on_device = greedy_decode(&model, prompt, 24, true);
    assert_eq!(by_host.len(), 25);
    assert_eq!(on_device, by_host);
}

/// The greedy token after `prompt` and `steps` more, one decode step each: fed by the host
/// (`forward_greedy`), or on the device with the ids taken one step behind.
fn greedy_decode<B: Backend>(
    model: &Model<B>,
    prompt: &[u32],
    steps: usize,
    on_device: bool,
) -> Vec<u32> {
    let blocks = (prompt.len() + steps).div_ceil(BLOCK);
    let mut ws = model.workspace(prompt.len()).unwrap();
    let mut kv = model.kv_cache(blocks + 2, BLOCK).unwrap();
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let batch = |from: usize, tokens: Vec<u32>, fed: bool| StepBatch {
        logit_rows: vec![tokens.len() as u32 - 1],
        tokens_from_argmax: fed,
        ..StepBatch::one_sequence(tokens, from, &table, BLOCK, prompt.len())
    };
    let (ws, kv) = (&mut ws, &mut kv);
    let mut got = model
        .forward_greedy(ws, kv, &batch(0, prompt.to_vec(), false))
        .unwrap();
    for step in 0..steps {
        let at = prompt.len() + step;
        let last = vec![*got.last().unwrap()];
        if !on_device {
            got.extend(
                model
                    .forward_greedy(ws, kv, &batch(at, last, false))
                    .unwrap(),
            );
        } else if step == 0 {
            model.queue_greedy(ws, kv, &batch(at, last, false)).unwrap();
        } else {
            model
                .queue_greedy(ws, kv, &batch(at, vec![0], true))
                .unwrap();
            got.extend(model.backend().take_argmax().unwrap());
        }
    }
    if on_device && steps > 0 {
        got.extend(model.backend().take_argmax().unwrap());
    }
    got
}
