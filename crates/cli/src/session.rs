//! What every model-running command shares: the model flags, loading, and sampling flags.

use anyhow::{bail, Context, Result};
use clap::Args;
use marlin_engine::{Engine, Runner, SamplingParams, StepRunner};
use marlin_kernels::cpu::{Activations, CpuBackend};
use marlin_kernels::{Backend, DenseFormat};
use marlin_model::{GenerationDefaults, LoadOptions, Model, ModelFiles, QuantizeSpec};
use marlin_quant::QuantFormat;
use std::path::PathBuf;
use std::time::Instant;

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
    /// Quantize every linear layer on load (RTN): int8, int4, int3, int2, fp8, fp4, mxfp4, nvfp4
    /// (the embedding and lm_head get int8 g32)
    #[arg(long, value_parser = parse_format)]
    pub quantize: Option<QuantFormat>,
    /// Largest group for --quantize: 32, 64, 128 or `channel`; rows it does not divide use the
    /// largest of 128/64/32 that does [default: 32; fp8: channel]
    #[arg(long, value_parser = parse_group)]
    pub group_size: Option<usize>,
    /// Asymmetric integers for --quantize: an f16 offset beside each group's scale
    #[arg(long)]
    pub asym: bool,
    /// Dequantize GGUF's quantized tensors to --dtype instead of running them packed
    #[arg(long)]
    pub unpack: bool,
    /// Where to run: cpu, or cuda[:N] (a build with `--features cuda`)
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// What int4/int8 weights multiply on CPUs with AVX-512 VNNI: int16 (two int8 codes per
    /// activation, about f16's precision), int8 (faster prefill, a visible accuracy cost) or
    /// f32 (bitwise the same on every CPU); other CPUs always use f32. With int16 or int8, CPUs
    /// with AMX-BF16 run prompt tokens in bf16, as GPUs do (docs/benchmarks.md)
    #[arg(long, default_value = "int16", value_parser = parse_activations)]
    pub activations: Activations,
    /// What the CPU's KV cache stores: f16 (half the bytes decode attention reads per step,
    /// keys and values rounded to f16; its cost is measured in docs/benchmarks.md) or f32
    #[arg(long, value_enum, default_value_t = KvDtype::F16)]
    pub kv_dtype: KvDtype,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F16,
    F32,
}

impl KvDtype {
    pub fn bytes(self) -> u64 {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

/// The backend a model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

pub fn parse_activations(s: &str) -> std::result::Result<Activations, String> {
    match s {
        "int16" => Ok(Activations::Int16),
        "int8" => Ok(Activations::Int8),
        "f32" => Ok(Activations::F32),
        _ => Err(format!("activations `{s}`: use int16, int8 or f32")),
    }
}

pub fn parse_device(s: &str) -> std::result::Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("device `{s}`: use cpu, cuda or cuda:N")),
    }
}

impl ModelArgs {
    /// Just a model and a precision, nothing quantized on load, f32 activations and an f32 KV
    /// cache: a reference model.
    pub fn plain(model: Option<String>, dtype: DenseFormat, threads: usize) -> Self {
        Self {
            model,
            dtype,
            threads,
            quantize: None,
            group_size: None,
            asym: false,
            unpack: false,
            device: Device::Cpu,
            activations: Activations::F32,
            kv_dtype: KvDtype::F32,
        }
    }

    /// What int4/int8 weights multiply on the CPU.
    pub fn activations(&self) -> Activations {
        self.activations
    }

    /// The CPU backend these flags ask for.
    pub fn cpu_backend(&self) -> Result<CpuBackend> {
        Ok(
            CpuBackend::with_activations(self.threads, self.activations())?
                .with_f16_kv(self.kv_dtype == KvDtype::F16),
        )
    }

    /// The loader options these flags ask for.
    pub fn load_options(&self) -> Result<LoadOptions> {
        let mut options = LoadOptions::new(self.dtype);
        options.keep_packed = !self.unpack;
        if let Some(format) = self.quantize {
            let format = format.with_asym(self.asym || format.is_asym())?;
            let mut spec = QuantizeSpec::new(format);
            if let Some(g) = self.group_size {
                spec.group = g;
            }
            options.quantize = Some(spec);
        } else if self.asym || self.group_size.is_some() {
            bail!("--asym and --group-size go with --quantize");
        }
        Ok(options)
    }
}

pub fn parse_format(s: &str) -> std::result::Result<QuantFormat, String> {
    QuantFormat::parse(s).ok_or_else(|| {
        format!("unknown format `{s}` (use int8, int4, int3, int2, fp8, fp4, mxfp4 or nvfp4)")
    })
}

pub fn parse_group(s: &str) -> std::result::Result<usize, String> {
    match s {
        "channel" | "0" => Ok(marlin_quant::PER_CHANNEL),
        "32" => Ok(32),
        "64" => Ok(64),
        "128" => Ok(128),
        _ => Err(format!("group size `{s}`: use 32, 64, 128 or channel")),
    }
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
}

/// What starting the backend took.
pub struct BackendStart {
    /// The backend's own description (device name, compute capability or SIMD level).
    pub name: String,
    pub seconds: f64,
    /// CUDA: whether the kernels came from the disk cache (warm) or NVRTC (cold), and the
    /// seconds that took.
    pub kernels: Option<(bool, f64)>,
    /// CUDA, when asked for: the device-to-device copy bandwidth in GB/s (read + written).
    pub copy_gbs: Option<f64>,
}

/// Work to do on a freshly started backend, whichever type `--device` picks.
pub trait WithBackend {
    type Output;
    fn run<B: Backend>(self, backend: B) -> Result<Self::Output>;
}

impl ModelArgs {
    /// Starts the backend `--device` names and hands it to `work`; with `measure_copy`, CUDA
    /// first measures its copy bandwidth (1 GiB, before the weights take the memory).
    pub fn with_backend<W: WithBackend>(
        &self,
        measure_copy: bool,
        work: W,
    ) -> Result<(W::Output, BackendStart)> {
        let started = Instant::now();
        match self.device {
            Device::Cpu => {
                let backend = self.cpu_backend()?;
                let start = BackendStart {
                    name: backend.name(),
                    seconds: started.elapsed().as_secs_f64(),
                    kernels: None,
                    copy_gbs: None,
                };
                Ok((work.run(backend)?, start))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let backend = marlin_kernels::cuda::CudaBackend::new(n)?;
                let seconds = started.elapsed().as_secs_f64();
                let kernels = backend.kernel_load();
                let copy_gbs = if measure_copy {
                    Some(backend.copy_bandwidth(1 << 30)?)
                } else {
                    None
                };
                let start = BackendStart {
                    name: backend.name(),
                    seconds,
                    kernels: Some((kernels.from_cache, kernels.seconds)),
                    copy_gbs,
                };
                Ok((work.run(backend)?, start))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(n) => {
                let _ = measure_copy;
                bail!("--device cuda:{n}: this marlin was built without CUDA (build it with --features cuda)")
            }
        }
    }
}

/// Loads a model's weights onto the backend, behind the engine's one trait object.
pub struct LoadFiles<'a> {
    pub files: &'a ModelFiles,
    pub path: &'a std::path::Path,
    pub options: &'a LoadOptions,
    /// Tokens of KV cache to hold if more than the model's context (`runner`).
    pub kv_tokens: usize,
}

impl WithBackend for LoadFiles<'_> {
    type Output = Box<dyn StepRunner>;
    fn run<B: Backend>(self, backend: B) -> Result<Self::Output> {
        let model = self
            .files
            .load_with(backend, self.options)
            .with_context(|| format!("cannot load the weights of {}", self.path.display()))?;
        runner(model, self.kv_tokens)
    }
}

/// A model with a workspace of `STEP_TOKENS` and KV blocks for its whole context or
/// `kv_tokens`, whichever is more.
pub fn runner<B: Backend>(model: Model<B>, kv_tokens: usize) -> Result<Box<dyn StepRunner>> {
    let blocks = model.config.max_context.max(kv_tokens).div_ceil(BLOCK_SIZE);
    Ok(Box::new(Runner::new(
        model,
        STEP_TOKENS,
        blocks,
        BLOCK_SIZE,
    )?))
}

/// The model `--model` names (pulled first if it is the default and missing), opened.
pub fn open_model(args: &ModelArgs) -> Result<(PathBuf, ModelFiles)> {
    let path = crate::models::resolve(args.model.as_deref())?;
    let files =
        ModelFiles::open(&path).with_context(|| format!("cannot open model {}", path.display()))?;
    Ok((path, files))
}

impl Session {
    pub fn load(args: &ModelArgs) -> Result<Self> {
        let (path, mut files) = open_model(args)?;
        let options = args.load_options()?;
        let (runner, _) = args.with_backend(
            false,
            LoadFiles {
                files: &files,
                path: &path,
                options: &options,
                kv_tokens: 0,
            },
        )?;
        let stop_token_ids = files.stop_token_ids();
        let chat_template = files.chat_template.take();
        let engine = Engine::new(runner, files.tokenizer.clone());
        Ok(Self {
            engine,
            files_path: path,
            generation: files.generation.clone(),
            stop_token_ids,
            chat_template,
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
