//! What every model-running command shares: the model flags, loading, and sampling flags.

use anyhow::{bail, Context, Result};
use clap::Args;
use marlin_engine::{Engine, Runner, SamplingParams};
use marlin_kernels::cpu::CpuBackend;
use marlin_kernels::DenseFormat;
use marlin_model::{GenerationDefaults, ModelFiles};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face folder, a .gguf file, or the name of a pulled model [default: smollm2]
    #[arg(long, short)]
    pub model: Option<String>,
    /// Weight precision for unquantized weights: f32, f16 or bf16
    #[arg(long, default_value = "f16", value_parser = parse_dtype)]
    pub dtype: DenseFormat,
    /// Worker threads (0 = one per core)
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

pub fn parse_dtype(s: &str) -> std::result::Result<DenseFormat, String> {
    DenseFormat::parse(s).ok_or_else(|| format!("unknown dtype `{s}` (use f32, f16 or bf16)"))
}

/// Tokens one forward step may carry: long prompts are prefilled in chunks of this size.
pub const STEP_TOKENS: usize = 512;
pub const BLOCK_SIZE: usize = 16;

pub struct Session {
    pub engine: Engine,
    pub files_path: PathBuf,
    pub generation: GenerationDefaults,
    pub stop_token_ids: Vec<u32>,
    pub chat_template: Option<marlin_model::ChatTemplate>,
    pub load_time: Duration,
}

impl Session {
    pub fn load(args: &ModelArgs) -> Result<Self> {
        let path = crate::models::resolve(args.model.as_deref())?;
        let started = Instant::now();
        let mut files = ModelFiles::open(&path)
            .with_context(|| format!("cannot open model {}", path.display()))?;
        let backend = CpuBackend::new(args.threads)?;
        let model = files
            .load(backend, args.dtype)
            .with_context(|| format!("cannot load the weights of {}", path.display()))?;
        let blocks = model.config.max_context.div_ceil(BLOCK_SIZE);
        let runner = Runner::new(model, STEP_TOKENS, blocks, BLOCK_SIZE)?;
        let stop_token_ids = files.stop_token_ids();
        let chat_template = files.chat_template.take();
        let engine = Engine::new(Box::new(runner), files.tokenizer.clone());
        Ok(Self {
            engine,
            files_path: path,
            generation: files.generation.clone(),
            stop_token_ids,
            chat_template,
            load_time: started.elapsed(),
        })
    }

    pub fn chat_template(&self) -> Result<&marlin_model::ChatTemplate> {
        match &self.chat_template {
            Some(t) => Ok(t),
            None => bail!(
                "{} has no chat template; drop --chat",
                self.files_path.display()
            ),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy [default: the model's, else 0.8]
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the K most likely tokens (0 = all) [default: the model's, else 40]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set with this much probability [default: model's, else 0.95]
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than this fraction of the most likely one [default: model's, else 0.05]
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Penalise tokens already present (1 = off) [default: the model's, else 1]
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Random seed: the same seed gives the same output
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self, defaults: &GenerationDefaults) -> SamplingParams {
        let model_samples = defaults.do_sample != Some(false);
        let temperature = self.temperature.unwrap_or(match defaults.temperature {
            Some(t) if model_samples => t,
            _ if defaults.do_sample == Some(false) => 0.0,
            _ => 0.8,
        });
        SamplingParams {
            temperature,
            top_k: self.top_k.or(defaults.top_k).unwrap_or(40),
            top_p: self.top_p.or(defaults.top_p).unwrap_or(0.95),
            min_p: self.min_p.or(defaults.min_p).unwrap_or(0.05),
            repetition_penalty: self
                .repetition_penalty
                .or(defaults.repetition_penalty)
                .unwrap_or(1.0),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: self.seed,
        }
    }
}
