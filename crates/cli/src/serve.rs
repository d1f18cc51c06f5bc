//! `marlin serve`: the OpenAI-compatible HTTP server (crates/server) over one model.

use crate::session::{KvDtype, ModelArgs, BLOCK_SIZE, STEP_TOKENS};
use anyhow::{Context, Result};
use clap::Args;
use marlin_engine::scheduler::SchedulerConfig;
use marlin_engine::{Engine, Runner};
use marlin_model::ModelFiles;
use marlin_server::{LoadError, LoadedModel, ServerConfig};
use std::path::Path;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A Hugging Face folder, a .gguf file, or a pulled model's name [default: smollm2]
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    pub model_path: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind; use 0.0.0.0 to accept connections from other machines
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Model id clients use [default: the model's folder or file name]
    #[arg(long)]
    pub served_name: Option<String>,
    /// Serve /metrics on this port instead of the API port
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// KV cache blocks [default: a third of the available memory, at most what
    /// --max-num-seqs full contexts need]
    #[arg(long)]
    pub num_kv_blocks: Option<usize>,
    /// Tokens per KV cache block
    #[arg(long, default_value_t = BLOCK_SIZE)]
    pub block_size: usize,
    /// Most sequences decoded together in one step
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Most requests waiting to start; more are refused with 503
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1 routes
    #[arg(long)]
    pub api_key: Option<String>,
}

/// MemAvailable from /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Fraction of the available memory the KV cache may take by default.
const KV_MEMORY_FRACTION: f64 = 1.0 / 3.0;

fn default_kv_blocks(
    config: &marlin_model::ModelConfig,
    kv_dtype: KvDtype,
    block_size: usize,
    seqs: usize,
) -> usize {
    // Keys and values for every layer.
    let bytes_per_block = (config.num_layers * 2 * config.num_kv_heads * config.head_dim) as u64
        * kv_dtype.bytes()
        * block_size as u64;
    let wanted = seqs * config.max_context.div_ceil(block_size);
    let affordable = available_memory().map_or(wanted as u64, |m| {
        (m as f64 * KV_MEMORY_FRACTION) as u64 / bytes_per_block.max(1)
    });
    // At least one full context, whatever memory says: the server must fit its longest request.
    (wanted.min(affordable as usize)).max(config.max_context.div_ceil(block_size))
}

fn served_name(args: &ServeArgs, model: Option<&str>) -> String {
    if let Some(name) = &args.served_name {
        return name.clone();
    }
    let name = model.unwrap_or(crate::models::DEFAULT_MODEL);
    let path = Path::new(name);
    if path.exists() {
        if let Some(file) = path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        {
            return file;
        }
    }
    name.to_owned()
}

pub fn run(args: ServeArgs) -> Result<()> {
    anyhow::ensure!(args.block_size > 0, "--block-size must be at least 1");
    anyhow::ensure!(args.max_num_seqs > 0, "--max-num-seqs must be at least 1");
    anyhow::ensure!(
        args.num_kv_blocks != Some(0),
        "--num-kv-blocks must be at least 1"
    );
    let model = args.model_path.clone().or(args.model.model.clone());
    let config = ServerConfig {
        served_name: served_name(&args, model.as_deref()),
        api_key: args.api_key.clone(),
        scheduler: SchedulerConfig {
            max_num_seqs: args.max_num_seqs,
            max_queue: args.max_queue,
        },
    };
    // The same loading flags as every other command (--dtype, --quantize, ...).
    let options = args.model.load_options()?;
    let backend = args.model.cpu_backend()?;
    let (num_kv_blocks, block_size, max_num_seqs, kv_dtype) = (
        args.num_kv_blocks,
        args.block_size,
        args.max_num_seqs,
        args.model.kv_dtype,
    );
    let load = move || -> std::result::Result<LoadedModel, LoadError> {
        let path = crate::models::resolve(model.as_deref())?;
        let files = ModelFiles::open(&path)?;
        let weights = files.load_with(backend, &options)?;
        let blocks = num_kv_blocks.unwrap_or_else(|| {
            default_kv_blocks(&weights.config, kv_dtype, block_size, max_num_seqs)
        });
        eprintln!(
            "KV cache: {blocks} blocks of {block_size} tokens ({} tokens)",
            blocks * block_size
        );
        let runner = Runner::new(weights, STEP_TOKENS, blocks, block_size)?;
        let engine = Engine::new(Box::new(runner), files.tokenizer.clone());
        Ok(LoadedModel {
            engine,
            stop_token_ids: files.stop_token_ids(),
            generation: files.generation.clone(),
            chat_template: files.chat_template,
        })
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let metrics_listener = match args.metrics_port {
            Some(port) => {
                let addr = format!("{}:{port}", args.host);
                Some(
                    tokio::net::TcpListener::bind(&addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr} for metrics"))?,
                )
            }
            None => None,
        };
        eprintln!(
            "serving `{}` on http://{} (loading the model)",
            config.served_name,
            listener.local_addr()?
        );
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        marlin_server::serve(config, listener, metrics_listener, load, shutdown).await?;
        Ok(())
    })
}
