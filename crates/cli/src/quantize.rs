//! `marlin quantize`: writes a quantized Hugging Face-style folder (safetensors with packed
//! tensors, config.json with a `quantization_config`, tokenizer files) that every command loads
//! as `--model OUT`. Methods: `rtn` (round to nearest with the formats' per-group scale search)
//! and `gptq` (calibrated on a text, layer by layer).

use crate::session::{parse_format, parse_group};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use marlin_engine::calibrate::{calibrate_layers, windows, Site};
use marlin_engine::{Engine, Runner};
use marlin_kernels::cpu::CpuBackend;
use marlin_kernels::{DenseFormat, HostWeight};
use marlin_model::checkpoint::{descriptor, packed_parts, QUANT_METHOD};
use marlin_model::config::RopeScaling;
use marlin_model::quantized::is_embedding;
use marlin_model::{Architecture, LoadOptions, ModelConfig, ModelFiles, QuantizeSpec};
use marlin_quant::gptq::{quantize_gptq, HessianFactor};
use marlin_quant::{quantize_rtn, QuantFormat, QuantTensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// GPTQ's dampening, a fraction of the mean Hessian diagonal (the reference implementation's).
const GPTQ_DAMP: f64 = 0.01;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Round to nearest, with the format's per-group scale search
    Rtn,
    /// GPTQ: error-compensating rounding calibrated on a text (needs --calib)
    Gptq,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// A Hugging Face folder, a .gguf file, or the name of a pulled model [default: smollm2]
    pub model: Option<String>,
    /// The folder to write (must not exist)
    #[arg(long, short)]
    pub output: PathBuf,
    /// int8, int4, int3, int2 (add -asym or --asym for offsets), fp8, fp4, mxfp4, nvfp4
    #[arg(long, value_parser = parse_format)]
    pub format: QuantFormat,
    /// Largest group: 32, 64, 128 or `channel`; rows it does not divide use the largest of
    /// 128/64/32 that does [default: 32; fp8: channel]
    #[arg(long, value_parser = parse_group)]
    pub group_size: Option<usize>,
    /// Asymmetric integers: an f16 offset beside each group's scale
    #[arg(long)]
    pub asym: bool,
    #[arg(long, value_enum, default_value = "rtn")]
    pub method: Method,
    /// Calibration text for GPTQ (plain UTF-8), e.g. ../shared/data/emma.txt
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration tokens for GPTQ, cut into windows of 512
    #[arg(long, default_value_t = 16384)]
    pub calib_tokens: usize,
    /// GPTQ: quantize columns in order of decreasing activation energy (stores a permutation)
    #[arg(long)]
    pub act_order: bool,
    /// Per-tensor format, PATTERN=FMT[:G] on Hugging Face tensor names (`*` any text, `?` one
    /// character; `.weight` may be left off), FMT a quantized format or f32/f16/bf16 to keep it
    /// dense; the first matching rule wins. E.g. --keep 'model.layers.0.*=int8' --keep lm_head=f16
    #[arg(long = "keep", value_parser = parse_keep)]
    pub keep: Vec<KeepRule>,
    /// Worker threads (0 = one per core)
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// What one tensor becomes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    Dense(DenseFormat),
    Quant(QuantizeSpec),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Dense(d) => write!(f, "{d}"),
            Target::Quant(q) => write!(f, "{q}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct KeepRule {
    pub pattern: String,
    pub target: Target,
}

pub fn parse_keep(s: &str) -> std::result::Result<KeepRule, String> {
    let (pattern, fmt) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("--keep `{s}`: expected PATTERN=FORMAT"))?;
    if pattern.is_empty() {
        return Err(format!("--keep `{s}`: empty pattern"));
    }
    let (name, group) = match fmt.split_once(':') {
        Some((n, g)) => (n, Some(parse_group(g)?)),
        None => (fmt, None),
    };
    let target = if let Some(d) = DenseFormat::parse(name) {
        if group.is_some() {
            return Err(format!("--keep `{s}`: a dense format has no group"));
        }
        Target::Dense(d)
    } else {
        let format = parse_format(name)?;
        let mut spec = QuantizeSpec::new(format);
        if let Some(g) = group {
            spec.group = g;
        }
        Target::Quant(spec)
    };
    Ok(KeepRule {
        pattern: pattern.to_string(),
        target,
    })
}

/// Glob match: `*` any run of characters, `?` one character.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn rule_matches(pattern: &str, name: &str) -> bool {
    glob(pattern, name)
        || name
            .strip_suffix(".weight")
            .is_some_and(|n| glob(pattern, n))
}

/// A weight matrix of the model, by Hugging Face name.
struct Matrix {
    name: String,
    rows: usize,
    cols: usize,
    target: Target,
    /// The group the target resolves to for this row length (quantized targets).
    group: usize,
}

/// The model's matrices and vectors by Hugging Face name, in file order.
fn tensor_names(c: &ModelConfig, has_lm_head: bool) -> (Vec<(String, usize, usize)>, Vec<String>) {
    let (h, q, kv, ff) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let mut matrices = vec![("model.embed_tokens.weight".to_string(), c.vocab_size, h)];
    let mut vectors = Vec::new();
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", ff, h),
            ("mlp.up_proj", ff, h),
            ("mlp.down_proj", h, ff),
        ] {
            matrices.push((format!("{p}.{name}.weight"), rows, cols));
        }
        vectors.push(format!("{p}.input_layernorm.weight"));
        vectors.push(format!("{p}.post_attention_layernorm.weight"));
        if c.qk_norm {
            vectors.push(format!("{p}.self_attn.q_norm.weight"));
            vectors.push(format!("{p}.self_attn.k_norm.weight"));
        }
    }
    vectors.push("model.norm.weight".to_string());
    if has_lm_head {
        matrices.push(("lm_head.weight".to_string(), c.vocab_size, h));
    }
    (matrices, vectors)
}

/// One output tensor.
struct OutTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn dense_dtype(d: DenseFormat) -> Dtype {
    match d {
        DenseFormat::F32 => Dtype::F32,
        DenseFormat::F16 => Dtype::F16,
        DenseFormat::BF16 => Dtype::BF16,
    }
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let started = Instant::now();
    let path = crate::models::resolve(args.model.as_deref())?;
    let files =
        ModelFiles::open(&path).with_context(|| format!("cannot open model {}", path.display()))?;
    let format = args.format.with_asym(args.asym || args.format.is_asym())?;
    let mut spec = QuantizeSpec::new(format);
    if let Some(g) = args.group_size {
        spec.group = g;
    }
    let config = files.config.clone();
    let has_lm_head = !config.tie_embeddings && files.source().get("lm_head.weight")?.is_some();
    let (names, vectors) = tensor_names(&config, has_lm_head);

    // The plan, checked whole before any work.
    let mut plan = Vec::with_capacity(names.len());
    let mut used_rules = vec![false; args.keep.len()];
    for (name, rows, cols) in names {
        let rule = args
            .keep
            .iter()
            .position(|r| rule_matches(&r.pattern, &name));
        let target = match rule {
            Some(i) => {
                used_rules[i] = true;
                args.keep[i].target
            }
            None if is_embedding(&name) => Target::Quant(QuantizeSpec::embedding()),
            None => Target::Quant(spec),
        };
        let group = match target {
            Target::Quant(q) => q
                .group_for(cols)
                .with_context(|| format!("cannot quantize `{name}` ({rows}x{cols}) to {q}"))?,
            Target::Dense(_) => 0,
        };
        plan.push(Matrix {
            name,
            rows,
            cols,
            target,
            group,
        });
    }
    for (rule, used) in args.keep.iter().zip(&used_rules) {
        if !used {
            bail!(
                "--keep {}: the pattern matches no weight matrix (names look like \
                 model.layers.0.mlp.down_proj.weight, model.embed_tokens.weight, lm_head.weight)",
                rule.pattern
            );
        }
    }
    if args.method == Method::Rtn && args.act_order {
        bail!("--act-order goes with --method gptq");
    }
    let calib_tokens = match args.method {
        Method::Rtn => None,
        Method::Gptq => {
            let Some(calib) = &args.calib else {
                bail!(
                    "--method gptq needs calibration text: --calib FILE (plain UTF-8 prose in the \
                     model's language, e.g. ../shared/data/emma.txt in this repository's workspace; \
                     16384 tokens are used by default)"
                );
            };
            let text = std::fs::read_to_string(calib)
                .with_context(|| format!("cannot read {}", calib.display()))?;
            let tokens = files.tokenizer.encode(&text, true)?;
            let w = windows(&tokens, crate::session::STEP_TOKENS, args.calib_tokens);
            if w.is_empty() {
                bail!(
                    "{} holds {} tokens: too few to calibrate on (at least {})",
                    calib.display(),
                    tokens.len(),
                    crate::session::STEP_TOKENS / 4
                );
            }
            Some(w)
        }
    };
    if args.output.exists() {
        bail!(
            "{} already exists; remove it or choose another --output",
            args.output.display()
        );
    }
    let partial = partial_path(&args.output);
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    std::fs::create_dir_all(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let result = (|| -> Result<Summary> {
        let mut out: BTreeMap<String, OutTensor> = BTreeMap::new();
        let mut meta: HashMap<String, String> = HashMap::new();
        let mut losses = 0.0;
        // Vectors (norms) as stored.
        for name in &vectors {
            let t = files.source().require(name)?;
            let (dtype, bytes) = match t.encoding {
                marlin_model::weights::Encoding::Dense(d) => (dense_dtype(d), t.bytes.to_vec()),
                _ => (Dtype::F32, DenseFormat::F32.encode(&t.to_f32()?)),
            };
            out.insert(
                name.clone(),
                OutTensor {
                    name: name.clone(),
                    dtype,
                    shape: t.shape.clone(),
                    bytes,
                },
            );
        }
        let mut put = |m: &Matrix,
                       packed: Option<QuantTensor>,
                       out: &mut BTreeMap<String, OutTensor>|
         -> Result<()> {
            match (m.target, packed) {
                (Target::Dense(d), _) => {
                    let values = files.source().require(&m.name)?.to_f32()?;
                    out.insert(
                        m.name.clone(),
                        OutTensor {
                            name: m.name.clone(),
                            dtype: dense_dtype(d),
                            shape: vec![m.rows, m.cols],
                            bytes: d.encode(&values),
                        },
                    );
                }
                (Target::Quant(_), Some(t)) => {
                    meta.insert(m.name.clone(), descriptor(&t));
                    for (name, dtype, shape, bytes) in packed_parts(&m.name, &t) {
                        out.insert(
                            name.clone(),
                            OutTensor {
                                name,
                                dtype,
                                shape,
                                bytes,
                            },
                        );
                    }
                }
                (Target::Quant(_), None) => unreachable!("quantized before writing"),
            }
            Ok(())
        };
        let rtn = |m: &Matrix| -> Result<QuantTensor> {
            let Target::Quant(q) = m.target else {
                unreachable!()
            };
            let values = files.source().require(&m.name)?.to_f32()?;
            quantize_rtn(&values, m.rows, m.cols, q.format, m.group)
                .with_context(|| format!("quantizing `{}`", m.name))
        };
        let bar =
            ProgressBar::new(config.num_layers as u64).with_style(ProgressStyle::with_template(
                "{msg} {bar:40} {pos}/{len} layers [{elapsed_precise}, eta {eta}]",
            )?);
        bar.set_message(match args.method {
            Method::Rtn => "quantizing (rtn)",
            Method::Gptq => "quantizing (gptq)",
        });
        let by_name: HashMap<&str, &Matrix> = plan.iter().map(|m| (m.name.as_str(), m)).collect();
        // Matrices outside the decoder layers (embedding, lm_head): RTN or dense.
        for m in plan.iter().filter(|m| !m.name.starts_with("model.layers.")) {
            let packed = match m.target {
                Target::Quant(_) => Some(rtn(m)?),
                Target::Dense(_) => None,
            };
            put(m, packed, &mut out)?;
        }
        match &calib_tokens {
            None => {
                for layer in 0..config.num_layers {
                    let prefix = format!("model.layers.{layer}.");
                    for m in plan.iter().filter(|m| m.name.starts_with(&prefix)) {
                        let packed = match m.target {
                            Target::Quant(_) => Some(rtn(m)?),
                            Target::Dense(_) => None,
                        };
                        put(m, packed, &mut out)?;
                    }
                    bar.inc(1);
                }
            }
            Some(windows) => {
                let backend = CpuBackend::new(args.threads)?;
                let mut options = LoadOptions::new(DenseFormat::F32);
                options.keep_packed = false;
                let model = files.load_with(backend, &options)?;
                let budget = crate::session::STEP_TOKENS;
                let blocks = budget.div_ceil(crate::session::BLOCK_SIZE) + 1;
                let runner = Runner::new(model, budget, blocks, crate::session::BLOCK_SIZE)?;
                let mut engine = Engine::new(Box::new(runner), files.tokenizer.clone());
                calibrate_layers(
                    &mut engine,
                    windows,
                    |_layer, sites: Vec<Site>| -> Result<Vec<(String, HostWeight)>> {
                        let mut replacements = Vec::new();
                        for site in sites {
                            let matrices: Vec<&Matrix> =
                                site.weights.iter().map(|n| by_name[n.as_str()]).collect();
                            // One factorisation serves every projection of the site.
                            let factor = matrices
                                .iter()
                                .any(|m| matches!(m.target, Target::Quant(_)))
                                .then(|| {
                                    HessianFactor::new(
                                        &site.hessian.matrix(),
                                        site.hessian.cols,
                                        GPTQ_DAMP,
                                        args.act_order,
                                    )
                                    .with_context(|| {
                                        format!("GPTQ on the inputs of {}", site.weights.join(", "))
                                    })
                                })
                                .transpose()?;
                            for m in matrices {
                                let (Target::Quant(q), Some(factor)) = (m.target, &factor) else {
                                    put(m, None, &mut out)?;
                                    continue;
                                };
                                let values = files.source().require(&m.name)?.to_f32()?;
                                let (t, loss) =
                                    quantize_gptq(&values, m.rows, q.format, m.group, factor)
                                        .with_context(|| format!("GPTQ on `{}`", m.name))?;
                                losses += loss;
                                let w = HostWeight::from_f32(
                                    DenseFormat::F32,
                                    m.rows,
                                    m.cols,
                                    &t.dequantize(),
                                )
                                .expect("shape");
                                replacements.push((m.name.clone(), w));
                                put(m, Some(t), &mut out)?;
                            }
                        }
                        Ok(replacements)
                    },
                    |_| bar.inc(1),
                )?;
            }
        }
        bar.finish_and_clear();
        let params: usize = plan.iter().map(|m| m.rows * m.cols).sum::<usize>()
            + vectors
                .iter()
                .map(|v| {
                    files
                        .source()
                        .require(v)
                        .map(|t| t.shape.iter().product::<usize>())
                })
                .sum::<marlin_model::Result<usize>>()?;
        let tensor_bytes: usize = out.values().map(|t| t.bytes.len()).sum();
        write_shards(&partial, out.into_values().collect(), meta)?;
        write_config(&partial, &files, &config, &args, spec, &plan)?;
        write_tokenizer(&partial, &files, &path)?;
        Ok(Summary {
            params,
            tensor_bytes,
            loss: losses,
        })
    })();
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, &args.output).with_context(|| {
        format!(
            "cannot rename {} to {}",
            partial.display(),
            args.output.display()
        )
    })?;
    let file_bytes: u64 = std::fs::read_dir(&args.output)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let mut mix: BTreeMap<String, usize> = BTreeMap::new();
    for m in &plan {
        let key = match m.target {
            Target::Quant(q) => format!("{} g{}", q.format, m.group),
            Target::Dense(d) => d.to_string(),
        };
        *mix.entry(key).or_default() += m.rows * m.cols;
    }
    let total: usize = plan.iter().map(|m| m.rows * m.cols).sum();
    println!("wrote          {}", args.output.display());
    println!(
        "method         {}{}",
        match args.method {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
        },
        if args.act_order { " (act-order)" } else { "" }
    );
    println!(
        "size           {:.1} MB on disk, {:.1} MB of tensors",
        file_bytes as f64 / 1e6,
        summary.tensor_bytes as f64 / 1e6
    );
    println!(
        "bits/weight    {:.3} (tensor bytes x 8 / {:.2}M parameters)",
        summary.tensor_bytes as f64 * 8.0 / summary.params as f64,
        summary.params as f64 / 1e6
    );
    let mix: Vec<String> = mix
        .iter()
        .map(|(k, v)| format!("{k} {:.0}%", 100.0 * *v as f64 / total as f64))
        .collect();
    println!("tensor mix     {}", mix.join(", "));
    if args.method == Method::Gptq {
        println!("GPTQ loss      {:.4e} (sum of proxy losses)", summary.loss);
    }
    println!("time           {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

struct Summary {
    params: usize,
    tensor_bytes: usize,
    loss: f64,
}

/// `OUT.partial-<pid>` beside `OUT`: renamed to `OUT` only when complete.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "model".into());
    name.push(format!(".partial-{}", std::process::id()));
    out.with_file_name(name)
}

/// Safetensors shards of at most ~2 GB (one file, model.safetensors, when it fits), with an
/// index when there are several. Every shard carries the packed tensors' descriptors.
fn write_shards(dir: &Path, tensors: Vec<OutTensor>, meta: HashMap<String, String>) -> Result<()> {
    const SHARD_BYTES: usize = 2_000_000_000;
    let mut shards: Vec<Vec<OutTensor>> = vec![Vec::new()];
    let mut size = 0;
    for t in tensors {
        if size + t.bytes.len() > SHARD_BYTES && !shards.last().expect("one").is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        size += t.bytes.len();
        shards.last_mut().expect("one").push(t);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let mut shard_meta: HashMap<String, String> = meta
            .iter()
            .filter(|(k, _)| shard.iter().any(|t| t.name.starts_with(k.as_str())))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        shard_meta.insert("format".into(), "pt".into());
        let views = shard
            .iter()
            .map(|t| {
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                    .map(|v| (t.name.clone(), v))
                    .with_context(|| format!("tensor `{}`", t.name))
            })
            .collect::<Result<Vec<_>>>()?;
        for t in shard {
            weight_map.insert(t.name.clone(), Value::String(file.clone()));
            total += t.bytes.len();
        }
        let path = dir.join(&file);
        safetensors::tensor::serialize_to_file(views, Some(shard_meta), &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?,
        )?;
    }
    Ok(())
}

/// config.json: the source's (or, for GGUF, one made from its metadata) plus
/// `quantization_config`.
fn write_config(
    dir: &Path,
    files: &ModelFiles,
    config: &ModelConfig,
    args: &QuantizeArgs,
    spec: QuantizeSpec,
    plan: &[Matrix],
) -> Result<()> {
    let source_config = files.path.join("config.json");
    let mut json: Value = if files.path.is_dir() && source_config.exists() {
        serde_json::from_str(&std::fs::read_to_string(&source_config)?)?
    } else {
        hf_config(config, files)?
    };
    let mut overrides = serde_json::Map::new();
    for m in plan {
        let default = Target::Quant(spec);
        if m.target != default
            || m.group != spec.format.resolve_group(spec.group, m.cols).unwrap_or(0)
        {
            let v = match m.target {
                Target::Quant(q) => format!("{}:{}", q.format, m.group),
                Target::Dense(d) => d.to_string(),
            };
            overrides.insert(m.name.clone(), Value::String(v));
        }
    }
    let obj = json
        .as_object_mut()
        .context("config.json is not an object")?;
    obj.insert(
        "quantization_config".into(),
        json!({
            "quant_method": QUANT_METHOD,
            "format": spec.format.to_string(),
            "bits": spec.format.bits(),
            "group_size": spec.group,
            "sym": !spec.format.is_asym(),
            "method": match args.method { Method::Rtn => "rtn", Method::Gptq => "gptq" },
            "act_order": args.act_order,
            "damp_percent": if args.method == Method::Gptq { json!(GPTQ_DAMP) } else { Value::Null },
            "calib_tokens": if args.method == Method::Gptq { json!(args.calib_tokens) } else { Value::Null },
            "overrides": overrides,
        }),
    );
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}

/// A Hugging Face config.json for a model read from GGUF.
fn hf_config(c: &ModelConfig, files: &ModelFiles) -> Result<Value> {
    let (model_type, arch) = match c.architecture {
        Architecture::Llama => ("llama", "LlamaForCausalLM"),
        Architecture::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
    };
    let rope_scaling = match &c.rope_scaling {
        RopeScaling::None => Value::Null,
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_context,
        }),
        RopeScaling::Divisors(_) => bail!(
            "this GGUF file scales rotary frequencies with a rope_freqs tensor, which a Hugging \
             Face config.json cannot express; quantize from the Hugging Face checkpoint instead"
        ),
    };
    let tok = &files.tokenizer;
    Ok(json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_context,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": tok.bos_id(),
        "eos_token_id": tok.eos_ids().first(),
    }))
}

/// Tokenizer files: copied from a Hugging Face folder; made from a GGUF file's tokenizer.
fn write_tokenizer(dir: &Path, files: &ModelFiles, source: &Path) -> Result<()> {
    if files.path.is_dir() && files.path.join("config.json").exists() {
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
            "chat_template.jinja",
        ] {
            let from = files.path.join(name);
            if from.exists() {
                std::fs::copy(&from, dir.join(name))
                    .with_context(|| format!("cannot copy {}", from.display()))?;
            }
        }
        return Ok(());
    }
    let tok = &files.tokenizer;
    tok.inner()
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
    let text = |id: Option<u32>| id.and_then(|id| tok.id_to_token(id));
    let gguf_path = if source.is_dir() {
        files.path.clone()
    } else {
        source.to_path_buf()
    };
    let gguf = marlin_model::gguf::GgufFile::open(&gguf_path)?;
    let template = gguf.opt_str("tokenizer.chat_template").map(str::to_string);
    let tc = json!({
        "bos_token": text(tok.bos_id()),
        "eos_token": text(tok.eos_ids().first().copied()),
        "add_bos_token": tok.add_bos(),
        "chat_template": template,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?,
    )?;
    let g = &files.generation;
    let mut gc = json!({
        "bos_token_id": tok.bos_id(),
        "eos_token_id": tok.eos_ids(),
    });
    let obj = gc.as_object_mut().expect("object");
    for (k, v) in [
        ("temperature", g.temperature.map(|v| json!(v))),
        ("top_p", g.top_p.map(|v| json!(v))),
        ("top_k", g.top_k.map(|v| json!(v))),
    ] {
        if let Some(v) = v {
            obj.insert(k.into(), v);
        }
    }
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_string_pretty(&gc)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(
            "model.layers.0.*",
            "model.layers.0.mlp.up_proj.weight"
        ));
        assert!(!glob(
            "model.layers.0.*",
            "model.layers.10.mlp.up_proj.weight"
        ));
        assert!(glob("*down_proj*", "model.layers.3.mlp.down_proj.weight"));
        assert!(glob(
            "model.layers.?.mlp.*",
            "model.layers.3.mlp.down_proj.weight"
        ));
        assert!(rule_matches("lm_head", "lm_head.weight"));
        assert!(!rule_matches("lm_head", "model.embed_tokens.weight"));
    }

    #[test]
    fn keep_rules_parse() {
        let r = parse_keep("lm_head=f16").unwrap();
        assert_eq!(r.target, Target::Dense(DenseFormat::F16));
        let r = parse_keep("model.layers.0.*=int8:64").unwrap();
        assert!(matches!(r.target, Target::Quant(q) if q.group == 64 && q.format.bits() == 8));
        assert!(parse_keep("x=int5").is_err());
        assert!(parse_keep("noequals").is_err());
    }
}
