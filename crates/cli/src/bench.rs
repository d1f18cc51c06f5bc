//! `marlin bench`: load time, prefill and decode throughput, peak memory.
//!
//! Like llama-bench, prompts are fixed pseudo-random tokens (speed does not depend on the text),
//! prefill is timed over `--prompt-tokens` and decode over `--gen-tokens` greedy tokens that
//! follow the prompt; each figure is the mean ± standard deviation over `--repetitions` runs after
//! one warm-up run.

use crate::session::{ModelArgs, Session};
use anyhow::Result;
use clap::Args;
use marlin_engine::{Engine, Sequence};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Returns (prefill seconds, decode seconds).
fn run_once(engine: &mut Engine, prompt: &[u32], gen_tokens: usize) -> Result<(f64, f64)> {
    let mut seq = Sequence::new(prompt.to_vec());
    let started = Instant::now();
    let mut last = None;
    while last.is_none() {
        last = engine.step(&mut [&mut seq], false)?.pop().flatten();
    }
    let prefill = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 0..gen_tokens {
        let token = argmax(last.as_deref().expect("logits of the last token"));
        seq.tokens.push(token);
        last = engine.step(&mut [&mut seq], false)?.pop().flatten();
    }
    let decode = started.elapsed().as_secs_f64();
    engine.release(&mut seq);
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

pub fn run(args: BenchArgs) -> Result<()> {
    anyhow::ensure!(args.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    anyhow::ensure!(args.repetitions > 0, "--repetitions must be at least 1");
    let mut session = Session::load(&args.model)?;
    let config = session.engine.runner().config().clone();
    anyhow::ensure!(
        args.prompt_tokens + args.gen_tokens <= config.max_context,
        "--prompt-tokens + --gen-tokens exceed the model's context of {}",
        config.max_context
    );
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % config.vocab_size as u64) as u32
        })
        .collect();
    run_once(&mut session.engine, &prompt[..prompt.len().min(32)], 4)?;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..args.repetitions {
        let (p, d) = run_once(&mut session.engine, &prompt, args.gen_tokens)?;
        prefill.push(args.prompt_tokens as f64 / p);
        if args.gen_tokens > 0 {
            decode.push(args.gen_tokens as f64 / d);
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
    if args.json {
        let json = serde_json::json!({
            "model": session.files_path.display().to_string(),
            "dtype": args.model.dtype.to_string(),
            "threads": threads,
            "load_seconds": session.load_time.as_secs_f64(),
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "prefill_tok_s": pp, "prefill_tok_s_sd": pp_sd,
            "decode_tok_s": tg, "decode_tok_s_sd": tg_sd,
            "peak_rss_bytes": peak,
        });
        println!("{json}");
    } else {
        println!("model      {}", session.files_path.display());
        println!("dtype      {}   threads {threads}", args.model.dtype);
        println!("load       {:.2} s", session.load_time.as_secs_f64());
        println!(
            "prefill    {pp:.1} ± {pp_sd:.1} tok/s  ({} tokens)",
            args.prompt_tokens
        );
        println!(
            "decode     {tg:.1} ± {tg_sd:.1} tok/s  ({} tokens)",
            args.gen_tokens
        );
        if let Some(bytes) = peak {
            println!("peak RSS   {:.0} MiB", bytes as f64 / (1 << 20) as f64);
        }
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
