//! `marlin bench`: load time, prefill and decode throughput, peak memory.
//!
//! Like llama-bench, prompts are fixed pseudo-random tokens (speed does not depend on the text),
//! prefill is timed over `--prompt-tokens` and decode over `--gen-tokens` greedy tokens that
//! follow the prompt; each figure is the mean ± standard deviation over `--repetitions` runs after
//! one warm-up run. The model is stepped directly (its own KV blocks), so no tokenizer is needed
//! and `--synthetic ARCH` can run random weights of a named shape. With `--batch N`, N sequences
//! with different prompts are prefilled one after another and then decode together, one batched
//! forward per step (a serving step's shape without the server), and decode tok/s counts every
//! sequence's tokens.

use crate::session::{
    open_model, runner, BackendStart, LoadFiles, ModelArgs, WithBackend, BLOCK_SIZE, STEP_TOKENS,
};
use anyhow::{Context, Result};
use clap::Args;
use marlin_engine::blocks::{BlockManager, BlockTable};
use marlin_engine::StepRunner;
use marlin_kernels::{Backend, SeqSpan, StepBatch};
use marlin_model::synthetic::{self, SyntheticSource};
use marlin_model::{Model, ModelConfig};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// `kernels`: instead of a model, sweep the CUDA matmul kernels over Llama-3 shapes, rows and
    /// formats (one format with --quantize FMT), against cuBLAS bf16 and the copy bandwidth.
    /// `serve`: start `marlin serve` (--model, --threads and the flags after `--`) or use --url,
    /// and measure streamed chat requests of --gen-tokens tokens at each --concurrency
    #[arg(value_name = "WHAT", value_parser = ["kernels", "serve"])]
    pub what: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Random weights of a named shape instead of a model file: smollm2, llama3-8b, qwen3-4b or
    /// llama3-70b-layer; dense in --dtype, or with --quantize FMT packed from random codes
    #[arg(long, value_name = "ARCH", conflicts_with = "model")]
    pub synthetic: Option<String>,
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Sequences decoding together, one batched forward per step
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Print one JSON object (with `serve`: one per level)
    #[arg(long)]
    pub json: bool,
    /// With `kernels`: only these row counts [default: 1 2 4 8 16 32 64 128 512 4096]
    #[arg(long, num_args = 1.., value_name = "M")]
    pub rows: Vec<usize>,
    /// With `kernels`: only these weight shapes, N×K (output × input features, e.g. 128256x4096
    /// for Llama-3's lm_head) [default: the six of 4096 to 28672]
    #[arg(long, num_args = 1.., value_name = "NxK", value_parser = parse_shape)]
    pub shapes: Vec<(usize, usize)>,
    /// With `serve`: requests kept in flight, one level after another
    #[arg(long, num_args = 1.., default_values_t = [1, 8, 32])]
    pub concurrency: Vec<usize>,
    /// With `serve`: requests per level [default: 2 x concurrency, at least 8]
    #[arg(long)]
    pub requests: Option<usize>,
    /// With `serve`: a running server (http://HOST:PORT) instead of starting one
    #[arg(long)]
    pub url: Option<String>,
    /// With `serve`: flags for the `marlin serve` it starts
    #[arg(last = true, value_name = "SERVE_FLAGS")]
    pub serve_args: Vec<String>,
}

fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("`{s}` is not a shape N×K, such as 4096x14336");
    let (n, k) = s.split_once(['x', '×', 'X']).ok_or_else(bad)?;
    match (n.trim().parse(), k.trim().parse()) {
        (Ok(n), Ok(k)) if n > 0 && k > 0 => Ok((n, k)),
        _ => Err(bad()),
    }
}

/// A sequence being benchmarked: its tokens (the first `prompt_len` given), how many are in the
/// KV cache, and its blocks.
#[derive(Default)]
struct Seq {
    table: BlockTable,
    tokens: Vec<u32>,
    prompt_len: usize,
    computed: usize,
}

/// Queues one step over up to `take` pending tokens of every sequence, and the greedy choice
/// after each sequence's last token (argmax on the device; `StepRunner::take_greedy` returns
/// them). With `fed`, each sequence's one pending token is a placeholder: the step takes it from
/// the ids queued before it, on the device.
fn queue_step(
    runner: &mut dyn StepRunner,
    blocks: &mut BlockManager,
    seqs: &mut [Seq],
    take: usize,
    fed: bool,
) -> Result<()> {
    let block_size = blocks.block_size();
    let mut batch = StepBatch {
        tokens_from_argmax: fed,
        ..StepBatch::default()
    };
    for seq in seqs.iter_mut() {
        let len = (seq.tokens.len() - seq.computed).min(take);
        let context = seq.computed + len;
        blocks
            .grow(&mut seq.table, context)
            .map_err(|_| anyhow::anyhow!("out of KV blocks for {context} tokens"))?;
        let start = batch.tokens.len();
        for p in seq.computed..context {
            batch.tokens.push(seq.tokens[p]);
            batch.positions.push(p as u32);
            batch.slots.push(seq.table.slot(block_size, p));
        }
        batch.seqs.push(SeqSpan {
            start,
            len,
            context_len: context,
            prompt_len: seq.prompt_len,
            block_table: seq.table.blocks().to_vec(),
        });
        batch.logit_rows.push((start + len - 1) as u32);
        seq.computed = context;
    }
    Ok(runner.queue_greedy(&batch)?)
}

/// Returns (prefill seconds of all prompts, decode seconds): each prompt prefilled alone (in
/// chunks of the step budget), then `gen_tokens` greedy tokens for all of them together.
///
/// Decode queues each step before the ids of the step before reach the host (the step takes
/// them on the device), as a greedy serving loop would: the device does not wait for the host's
/// round trip, and the ids still come back, one step behind.
fn run_once(
    runner: &mut dyn StepRunner,
    blocks: &mut BlockManager,
    prompts: &[Vec<u32>],
    gen_tokens: usize,
) -> Result<(f64, f64)> {
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .map(|p| Seq {
            tokens: p.clone(),
            prompt_len: p.len(),
            ..Seq::default()
        })
        .collect();
    let chunk = runner.max_step_tokens();
    let started = Instant::now();
    // The greedy token after each prompt, one per sequence.
    let mut next = Vec::new();
    for seq in &mut seqs {
        let mut last = Vec::new();
        while seq.computed < seq.tokens.len() {
            queue_step(runner, blocks, std::slice::from_mut(seq), chunk, false)?;
            last = runner.take_greedy()?;
        }
        next.extend(last);
    }
    let prefill = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for step in 0..gen_tokens {
        let fed = step > 0;
        for (seq, &id) in seqs.iter_mut().zip(&next) {
            seq.tokens.push(if fed { 0 } else { id });
        }
        queue_step(runner, blocks, &mut seqs, 1, fed)?;
        if fed {
            // The ids of the step before: the tokens this step took on the device.
            next = runner.take_greedy()?;
            for (seq, &id) in seqs.iter_mut().zip(&next) {
                let fed_at = seq.tokens.len() - 1;
                seq.tokens[fed_at] = id;
            }
        }
    }
    if gen_tokens > 0 {
        runner.take_greedy()?;
    }
    let decode = started.elapsed().as_secs_f64();
    for seq in &mut seqs {
        blocks.free(&mut seq.table);
    }
    Ok((prefill, decode))
}

fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// Peak resident memory of this process in bytes (Linux), if known.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Puts a synthetic model's weights on the backend.
struct LoadSynthetic<'a> {
    config: &'a ModelConfig,
    source: &'a SyntheticSource,
    dtype: marlin_kernels::DenseFormat,
    kv_tokens: usize,
}

impl WithBackend for LoadSynthetic<'_> {
    type Output = Box<dyn StepRunner>;
    fn run<B: Backend>(self, backend: B) -> Result<Self::Output> {
        let model = Model::load(backend, self.config.clone(), self.source, self.dtype)
            .context("cannot make the synthetic weights")?;
        runner(model, self.kv_tokens)
    }
}

/// What was loaded: the runner, a label, what the weights are, and (synthetic models) the bytes
/// of weights a decode step streams.
struct Loaded {
    runner: Box<dyn StepRunner>,
    start: BackendStart,
    label: String,
    weights: String,
    decode_bytes: Option<usize>,
}

fn load(args: &BenchArgs) -> Result<Loaded> {
    let m = &args.model;
    // Every sequence's prompt and generated tokens, in whole blocks.
    let kv_tokens =
        args.batch * (args.prompt_tokens + args.gen_tokens).next_multiple_of(BLOCK_SIZE);
    let options = m.load_options()?;
    let weights = match options.quantize {
        Some(q) => format!("{q} (embedding {})", options.embedding),
        None if m.unpack || args.synthetic.is_some() => m.dtype.to_string(),
        None => format!("as stored, unquantized tensors in {}", m.dtype),
    };
    if let Some(name) = &args.synthetic {
        let config = synthetic::config(name).with_context(|| format!("--synthetic {name}"))?;
        let source = SyntheticSource::new(name, &config, &options, 0x5eed)?;
        let decode_bytes = source.decode_bytes();
        let (runner, start) = m.with_backend(
            true,
            LoadSynthetic {
                config: &config,
                source: &source,
                dtype: options.dtype,
                kv_tokens,
            },
        )?;
        return Ok(Loaded {
            runner,
            start,
            label: format!("synthetic {name} (random weights)"),
            weights,
            decode_bytes: Some(decode_bytes),
        });
    }
    let (path, files) = open_model(m)?;
    let (runner, start) = m.with_backend(
        false,
        LoadFiles {
            files: &files,
            path: &path,
            options: &options,
            kv_tokens,
        },
    )?;
    Ok(Loaded {
        runner,
        start,
        label: path.display().to_string(),
        weights,
        decode_bytes: None,
    })
}

/// `bench serve`'s plan: the model and thread count go to the server it starts.
fn serve_plan(args: BenchArgs) -> Result<crate::bench_serve::Plan> {
    let address = args
        .url
        .as_deref()
        .map(crate::bench_serve::address_of)
        .transpose()?;
    let mut serve_args = Vec::new();
    if let Some(model) = &args.model.model {
        serve_args.extend(["--model".to_owned(), model.clone()]);
    }
    if args.model.threads != 0 {
        serve_args.extend(["--threads".to_owned(), args.model.threads.to_string()]);
    }
    serve_args.extend(args.serve_args);
    Ok(crate::bench_serve::Plan {
        address,
        serve_args,
        concurrency: args.concurrency,
        requests: args.requests,
        max_tokens: args.gen_tokens,
        json: args.json,
    })
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what.as_deref() {
        Some("serve") => return crate::bench_serve::run(serve_plan(args)?),
        Some(_) => return kernels::run(&args),
        None => {}
    }
    anyhow::ensure!(args.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    anyhow::ensure!(args.repetitions > 0, "--repetitions must be at least 1");
    anyhow::ensure!(
        (1..=STEP_TOKENS).contains(&args.batch),
        "--batch must be 1 to {STEP_TOKENS} (the tokens one step holds)"
    );
    let started = Instant::now();
    let Loaded {
        mut runner,
        start,
        label,
        weights,
        decode_bytes,
    } = load(&args)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let config = runner.config().clone();
    anyhow::ensure!(
        args.prompt_tokens + args.gen_tokens <= config.max_context,
        "--prompt-tokens + --gen-tokens exceed the model's context of {}",
        config.max_context
    );
    let layout = runner.kv_layout();
    let mut blocks = BlockManager::new(layout.num_blocks, layout.block_size);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|_| {
            (0..args.prompt_tokens)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((state >> 33) % config.vocab_size as u64) as u32
                })
                .collect()
        })
        .collect();
    // The warm-up prefills the whole prompts: the first use of a kernel (cuBLAS picks and
    // loads its own per shape) must not land in the first timed repetition.
    run_once(runner.as_mut(), &mut blocks, &prompts, 4)?;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..args.repetitions {
        let (p, d) = run_once(runner.as_mut(), &mut blocks, &prompts, args.gen_tokens)?;
        prefill.push((args.batch * args.prompt_tokens) as f64 / p);
        if args.gen_tokens > 0 {
            decode.push((args.batch * args.gen_tokens) as f64 / d);
        }
    }
    let (pp, pp_sd) = mean_sd(&prefill);
    let (tg, tg_sd) = if decode.is_empty() {
        (0.0, 0.0)
    } else {
        mean_sd(&decode)
    };
    let peak = peak_rss();
    let threads = rayon_threads(args.model.threads);
    // The decode bound: every weight byte a step needs, streamed once at the copy bandwidth
    // (a step decodes one token of each of the batch's sequences).
    let steps = tg / args.batch as f64;
    let bound = decode_bytes
        .zip(start.copy_gbs)
        .map(|(bytes, gbs)| gbs * 1e9 / bytes as f64);
    let (kernels_cached, kernel_seconds) = match start.kernels {
        Some((cached, s)) => (Some(cached), Some(s)),
        None => (None, None),
    };
    if args.json {
        let json = serde_json::json!({
            "model": label,
            "weights": weights,
            "backend": start.name,
            "threads": threads,
            "backend_start_seconds": start.seconds,
            "kernels_from_cache": kernels_cached,
            "kernel_load_seconds": kernel_seconds,
            "load_seconds": load_seconds,
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "batch": args.batch,
            "prefill_tok_s": pp, "prefill_tok_s_sd": pp_sd,
            "decode_tok_s": tg, "decode_tok_s_sd": tg_sd,
            "decode_weight_bytes": decode_bytes,
            "copy_gb_s": start.copy_gbs,
            "decode_bound_tok_s": bound,
            "decode_share_of_bound": bound.map(|b| steps / b),
            "peak_rss_bytes": peak,
        });
        println!("{json}");
        return Ok(());
    }
    println!("model      {label}");
    println!("weights    {weights}");
    println!("backend    {}   threads {threads}", start.name);
    match start.kernels {
        Some((cached, s)) => println!(
            "start      {:.2} s (kernels {}: {s:.2} s)",
            start.seconds,
            if cached {
                "from the cache, warm"
            } else {
                "compiled by NVRTC, cold"
            }
        ),
        None => println!("start      {:.2} s", start.seconds),
    }
    let made = if args.synthetic.is_some() {
        "weights generated and uploaded"
    } else {
        "weights read and uploaded"
    };
    println!("load       {load_seconds:.2} s ({made})");
    let per_sequence = |tokens| match args.batch {
        1 => format!("{tokens} tokens"),
        b => format!("{tokens} tokens × {b} sequences"),
    };
    println!(
        "prefill    {pp:.1} ± {pp_sd:.1} tok/s  ({})",
        per_sequence(args.prompt_tokens)
    );
    println!(
        "decode     {tg:.1} ± {tg_sd:.1} tok/s  ({}{})",
        per_sequence(args.gen_tokens),
        if args.batch > 1 {
            ", one step for all"
        } else {
            ""
        }
    );
    if let Some(bytes) = decode_bytes {
        println!(
            "weights    {:.3} GB streamed per decoded token",
            bytes as f64 / 1e9
        );
    }
    if let (Some(gbs), Some(b)) = (start.copy_gbs, bound) {
        println!(
            "bound      {b:.1} steps/s at the copy bandwidth {gbs:.0} GB/s: decode at {:.1}%",
            100.0 * steps / b
        );
    }
    if let Some(bytes) = peak {
        println!("peak RSS   {:.0} MiB", bytes as f64 / (1 << 20) as f64);
    }
    Ok(())
}

fn rayon_threads(requested: usize) -> usize {
    if requested == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        requested
    }
}

/// `marlin bench kernels`: every matmul path of the CUDA backend on the shapes of issue 4.
#[cfg(not(feature = "cuda"))]
mod kernels {
    pub fn run(_: &super::BenchArgs) -> anyhow::Result<()> {
        anyhow::bail!("marlin bench kernels needs a build with --features cuda")
    }
}

/// `marlin bench kernels`: every matmul path of the CUDA backend on the shapes of issue 4 (n × k:
/// output × input features), at 1 to 4096 rows, timed with device events (median of 5 runs, each
/// one call per weight copy, at least 10 calls), the weight copies rotated so that every call
/// streams its weight from HBM and not from the 50 MB L2. Beside each point: cuBLAS bf16 on the
/// same shape and rows and the copy bandwidth, both measured in the same run.
#[cfg(feature = "cuda")]
mod kernels {
    use super::BenchArgs;
    use anyhow::{Context, Result};
    use marlin_kernels::cuda::cudarc::driver::sys::CUevent_flags;
    use marlin_kernels::cuda::{Buffer, CudaBackend, Weight};
    use marlin_kernels::{Backend, DenseFormat, HostWeight, MatmulRows};
    use marlin_model::synthetic::SplitMix;
    use marlin_quant::{QuantFormat, QuantTensor};

    const SHAPES: [(usize, usize); 6] = [
        (4096, 4096),
        (4096, 14336),
        (14336, 4096),
        (8192, 8192),
        (8192, 28672),
        (28672, 8192),
    ];
    const ROWS: [usize; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 512, 4096];
    /// Weight bytes per rotation: eight times the H100's L2.
    const ROTATE_BYTES: usize = 400 << 20;
    /// Group size of the quantized weights; int4 also runs at 32 (the `--quantize` default).
    const GROUP: usize = 128;

    fn bf16_bits(v: f32) -> u16 {
        (v.to_bits() >> 16) as u16
    }

    /// f16 bits of a normal value in f16's range (round toward zero is fine for benchmark data).
    fn f16_bits(v: f32) -> [u8; 2] {
        let b = v.to_bits();
        let sign = (b >> 16) & 0x8000;
        let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
        let h = if exp <= 0 {
            sign
        } else {
            sign | ((exp as u32) << 10) | ((b >> 13) & 0x3ff)
        };
        (h as u16).to_le_bytes()
    }

    /// A random `n × k` weight of `format` (None: bf16), values of standard deviation near
    /// 1/√k, as the synthetic models make them.
    fn weight(
        format: Option<QuantFormat>,
        group: usize,
        n: usize,
        k: usize,
        seed: u64,
    ) -> Result<HostWeight> {
        let mut rng = SplitMix::new(seed, 0);
        let scale = 1.0 / (k as f32).sqrt();
        let Some(format) = format else {
            let bytes: Vec<u8> = (0..n * k)
                .flat_map(|_| bf16_bits(rng.symmetric() * scale * 1.7).to_le_bytes())
                .collect();
            return Ok(HostWeight::new(DenseFormat::BF16, n, k, bytes)?);
        };
        let group = format.resolve_group(group, k)?;
        // The largest code value: 2^(b-1) for integers, 448 for E4M3, 6 for E2M1.
        let top = match format {
            QuantFormat::Int { bits, .. } => (1u32 << (bits - 1)) as f32,
            QuantFormat::Fp8 => 448.0,
            _ => 6.0,
        };
        let step = scale * 1.7 / top;
        let tensor_scale = (format == QuantFormat::Nvfp4).then_some(step);
        let mut t = QuantTensor::zeroed(format, n, k, group, tensor_scale)?;
        for chunk in t.codes.chunks_mut(8) {
            let r = rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        let bits = format.bits() as i32;
        let mut scales = Vec::with_capacity(t.scales.len() / 2);
        match format {
            // A power of two near the step (E8M0), or E4M3 1.0 to 1.875 times the tensor scale.
            QuantFormat::Mxfp4 => {
                let e = (127.0 + step.log2()).round() as u8;
                t.scales
                    .iter_mut()
                    .for_each(|b| *b = e + (rng.next_u64() & 1) as u8);
            }
            QuantFormat::Nvfp4 => {
                t.scales
                    .iter_mut()
                    .for_each(|b| *b = 0x38 + (rng.next_u64() & 7) as u8);
            }
            _ => {
                for s in t.scales.chunks_mut(2) {
                    let v = step * (1.0 + 0.25 * rng.symmetric());
                    s.copy_from_slice(&f16_bits(v));
                    scales.push(v);
                }
            }
        }
        if let Some(offsets) = &mut t.offsets {
            let mid = ((1 << bits) - 1) as f32 / 2.0;
            for (o, s) in offsets.chunks_mut(2).zip(&scales) {
                o.copy_from_slice(&f16_bits(-s * mid));
            }
        }
        Ok(HostWeight::quant(t)?)
    }

    /// Median µs per call of `f(i)` over 5 runs of `calls` calls, after 3 warm-up calls.
    fn time_us(
        g: &CudaBackend,
        calls: usize,
        mut f: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        let ctx = g.context();
        let event = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        let (a, b) = (event()?, event()?);
        for i in 0..3 {
            f(i)?;
        }
        let mut runs = vec![];
        for _ in 0..5 {
            a.record(g.stream())?;
            for i in 0..calls {
                f(i)?;
            }
            b.record(g.stream())?;
            b.synchronize()?;
            runs.push(a.elapsed_ms(&b)? as f64 * 1e3 / calls as f64);
        }
        runs.sort_by(f64::total_cmp);
        Ok(runs[2])
    }

    /// The weight and enough device copies of it to rotate over ROTATE_BYTES.
    fn copies(g: &CudaBackend, w: Weight) -> Result<Vec<Weight>> {
        let n = ROTATE_BYTES.div_ceil(w.device_bytes()).max(2);
        let mut v = Vec::with_capacity(n);
        for _ in 1..n {
            v.push(g.duplicate_weight(&w)?);
        }
        v.push(w);
        Ok(v)
    }

    fn random_buffer(g: &CudaBackend, len: usize, seed: u64) -> Result<Buffer> {
        let mut rng = SplitMix::new(seed, 0);
        let v: Vec<f32> = (0..len).map(|_| rng.symmetric()).collect();
        Ok(g.upload_bf16(&v)?)
    }

    pub fn run(args: &BenchArgs) -> Result<()> {
        let rows = if args.rows.is_empty() {
            ROWS.to_vec()
        } else {
            args.rows.clone()
        };
        anyhow::ensure!(!rows.contains(&0), "--rows: row counts start at 1");
        let shapes = if args.shapes.is_empty() {
            SHAPES.to_vec()
        } else {
            args.shapes.clone()
        };
        let g = CudaBackend::new(0).context("marlin bench kernels runs on CUDA device 0")?;
        let copy = g.copy_bandwidth(1 << 30)?;
        let int = |bits, asym| Some(QuantFormat::Int { bits, asym });
        let formats: Vec<(Option<QuantFormat>, usize)> = match args.model.quantize {
            Some(f) => vec![(
                Some(f),
                f.fixed_group()
                    .unwrap_or(args.model.group_size.unwrap_or(GROUP)),
            )],
            None => {
                let mut all = vec![(None, 0), (int(4, false), 32)];
                all.extend(QuantFormat::ALL.map(|f| (Some(f), f.fixed_group().unwrap_or(GROUP))));
                all
            }
        };
        println!("device     {}", g.name());
        println!("copy       {copy:.0} GB/s (1 GiB, 16-byte copy kernel, read + written)");
        println!(
            "weights    random; copies rotated over {} MB; median of 5 runs",
            ROTATE_BYTES >> 20
        );
        println!();
        println!("| shape n × k | format | rows | µs | GB/s | % of copy | TFLOP/s | cuBLAS bf16 µs | vs cuBLAS |");
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let max_rows = rows.iter().copied().max().unwrap_or(1);
        for (si, &(n, k)) in shapes.iter().enumerate() {
            let x = random_buffer(&g, max_rows * k, 11 + si as u64)?;
            let mut out = g.alloc(max_rows * n)?;
            let dense = copies(&g, g.upload_weight(&weight(None, 0, n, k, 1)?)?)?;
            let mut cublas = vec![];
            for &m in &rows {
                let calls = dense.len().max(10);
                cublas.push(time_us(&g, calls, |i| {
                    Ok(g.matmul_cublas(&x, &dense[i % dense.len()], m, &mut out)?)
                })?);
            }
            drop(dense);
            for &(format, group) in &formats {
                let name = format.map_or("bf16".to_string(), |f| format!("{f} g{group}"));
                let ws = copies(&g, g.upload_weight(&weight(format, group, n, k, 2)?)?)?;
                let bytes = ws[0].device_bytes();
                for (ri, &m) in rows.iter().enumerate() {
                    let calls = ws.len().max(10);
                    let us = time_us(&g, calls, |i| {
                        Ok(g.matmul(&x, &ws[i % ws.len()], MatmulRows::plain(m), &mut out)?)
                    })?;
                    let moved = bytes + 2 * m * (n + k);
                    let gbs = moved as f64 / us / 1e3;
                    let tflops = 2.0 * (m * n * k) as f64 / us / 1e6;
                    println!(
                        "| {n} × {k} | {name} | {m} | {us:.1} | {gbs:.0} | {:.1}% | {tflops:.1} | {:.1} | {:.2}× |",
                        100.0 * gbs / copy,
                        cublas[ri],
                        cublas[ri] / us
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shapes_parse_with_either_cross() {
        assert_eq!(super::parse_shape("128256x4096"), Ok((128256, 4096)));
        assert_eq!(super::parse_shape("14336×4096"), Ok((14336, 4096)));
        assert!(super::parse_shape("4096").is_err());
    }
}
