//! `marlin`: run low-bit language models on the machine you have.

mod bench;
mod bench_serve;
mod chat;
mod eval;
mod generate;
mod models;
mod quantize;
mod serve;
mod session;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "marlin",
    version,
    about = "Run quantized language models fast on a CPU or GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download a model: `smollm2` (the default model) or a Hugging Face `org/repo`.
    Pull {
        #[arg(default_value = models::DEFAULT_MODEL)]
        name: String,
    },
    /// Generate text from a prompt, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Chat interactively with the model's chat template.
    Chat(chat::ChatArgs),
    /// Perplexity of a text, and KL divergence against a reference model.
    Eval(eval::EvalArgs),
    /// Quantize a model into a folder of packed weights (RTN or GPTQ).
    Quantize(quantize::QuantizeArgs),
    /// Measure load time, prefill and decode speed, and peak memory.
    Bench(bench::BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API with continuous batching.
    Serve(serve::ServeArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Pull { name } => models::pull(&name).map(|_| ()),
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Serve(args) => serve::run(args),
    }
}
