//! Opens a model given as a Hugging Face folder or a GGUF file: its config, tokenizer, chat
//! template, generation defaults and a tensor source; `ModelFiles::load` then puts the weights on a
//! backend.

use crate::chat::ChatTemplate;
use crate::config::{Architecture, ModelConfig};
use crate::gguf::GgufFile;
use crate::llama::Model;
use crate::quantized::{check_recipe, LoadOptions, PolicySource};
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufSource, TensorSource};
use crate::{ModelError, Result};
use marlin_kernels::{Backend, DenseFormat};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Sampling defaults a checkpoint recommends (generation_config.json).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub eos_token_ids: Vec<u32>,
}

pub struct ModelFiles {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationDefaults,
    source: Box<dyn TensorSource>,
}

impl ModelFiles {
    /// `path` is a .gguf file, a folder with config.json, or a folder holding one .gguf file.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        }
        if path.is_dir() {
            if path.join("config.json").exists() {
                return Self::open_hf(path);
            }
            let ggufs = gguf_files_in(path)?;
            return match ggufs.as_slice() {
                [one] => Self::open_gguf(one),
                [] => Err(ModelError::format(
                    path,
                    "neither config.json nor a .gguf file here",
                )),
                _ => Err(ModelError::format(
                    path,
                    "several .gguf files here: name one of them",
                )),
            };
        }
        Self::open_gguf(path)
    }

    fn open_hf(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
        let mut tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let tokenizer_config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let mut chat_source = None;
        let (mut bos, mut eos) = (None, None);
        if let Some(tc) = &tokenizer_config {
            bos = token_string(tc.get("bos_token"));
            eos = token_string(tc.get("eos_token"));
            chat_source = template_string(tc.get("chat_template"));
            tokenizer.configure(
                bos.as_deref(),
                eos.as_deref(),
                tc.get("add_bos_token").and_then(Value::as_bool),
            );
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            chat_source =
                Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?);
        }
        let chat_template = chat_source
            .map(|s| ChatTemplate::new(s, bos, eos))
            .transpose()?;
        let generation = match read_json_if_exists(&dir.join("generation_config.json"))? {
            Some(json) => generation_defaults(&json),
            None => GenerationDefaults::default(),
        };
        Ok(Self {
            path: dir.to_path_buf(),
            config,
            tokenizer,
            chat_template,
            generation,
            source: crate::checkpoint::open_source(dir)?,
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let rope_divisors = match file.tensor("rope_freqs.weight") {
            Some(t) => {
                let values = marlin_quant::ggml::dequantize(
                    t.ty,
                    file.tensor_bytes(t),
                    t.dims.iter().product::<u64>() as usize,
                )
                .map_err(|e| {
                    ModelError::format(path, format!("tensor `rope_freqs.weight`: {e}"))
                })?;
                Some(values.into_iter().map(f64::from).collect())
            }
            None => None,
        };
        let config = ModelConfig::from_gguf(&file, rope_divisors)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let chat_template = match file.opt_str("tokenizer.chat_template") {
            Some(source) => {
                let text = |id: Option<u32>| id.and_then(|id| tokenizer.id_to_token(id));
                Some(ChatTemplate::new(
                    source.to_string(),
                    text(tokenizer.bos_id()),
                    text(tokenizer.eos_ids().first().copied()),
                )?)
            }
            None => None,
        };
        let unpermute = (config.architecture == Architecture::Llama)
            .then_some((config.num_heads, config.num_kv_heads));
        Ok(Self {
            path: path.to_path_buf(),
            config,
            tokenizer,
            chat_template,
            generation: GenerationDefaults::default(),
            source: Box::new(GgufSource::new(file, unpermute)?),
        })
    }

    /// Uploads every weight to `backend`: GGUF's quantized tensors packed, the rest in `dtype`.
    pub fn load<B: Backend>(&self, backend: B, dtype: DenseFormat) -> Result<Model<B>> {
        self.load_with(backend, &LoadOptions::new(dtype))
    }

    /// Uploads every weight as `options` say (packed, quantized on load, or dense).
    pub fn load_with<B: Backend>(&self, backend: B, options: &LoadOptions) -> Result<Model<B>> {
        let c = &self.config;
        check_recipe(
            &self.path,
            options,
            &[c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size],
            c.hidden_size,
        )?;
        let source = PolicySource {
            inner: self.source.as_ref(),
            options: *options,
        };
        Model::load(backend, self.config.clone(), &source, options.dtype)
    }

    /// Where the weights come from, as stored (for tools that rewrite a checkpoint).
    pub fn source(&self) -> &dyn TensorSource {
        self.source.as_ref()
    }

    /// The ids that end generation: the tokenizer's and generation_config.json's.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = self.tokenizer.eos_ids().to_vec();
        ids.extend(&self.generation.eos_token_ids);
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

fn gguf_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    files.sort();
    Ok(files)
}

fn read_json_if_exists(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::format(path, format!("invalid JSON: {e}")))
}

/// A special token given as a string or as an AddedToken object (`{"content": ...}`).
fn token_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of named templates of which "default" is the one.
fn template_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

fn generation_defaults(json: &Value) -> GenerationDefaults {
    let f = |key: &str| json.get(key).and_then(Value::as_f64).map(|v| v as f32);
    let eos_token_ids = match json.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    };
    GenerationDefaults {
        do_sample: json.get("do_sample").and_then(Value::as_bool),
        temperature: f("temperature"),
        top_k: json
            .get("top_k")
            .and_then(Value::as_u64)
            .map(|v| v as usize),
        top_p: f("top_p"),
        min_p: f("min_p"),
        repetition_penalty: f("repetition_penalty"),
        eos_token_ids,
    }
}
