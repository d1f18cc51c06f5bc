//! Where a model's tensors come from: memory-mapped safetensors (one file or shards) or a GGUF
//! file. Architectures ask for tensors by their Hugging Face names; a source returns the raw bytes
//! and their format, and `to_host_weight` converts them to the dtype the user asked for.

use crate::gguf::GgufFile;
use crate::quantized::WeightPolicy;
use crate::{ModelError, Result};
use marlin_quant::ggml::{self, GgmlType};
use marlin_quant::{convert, quantize_rtn, DenseFormat, HostWeight};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensors};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy)]
pub enum Encoding {
    Dense(DenseFormat),
    Ggml(GgmlType),
}

/// A tensor as stored: row-major shape (outermost first) and its bytes.
pub struct RawTensor<'a> {
    pub name: String,
    pub path: &'a Path,
    pub shape: Vec<usize>,
    pub encoding: Encoding,
    pub bytes: &'a [u8],
    /// Packed or quantized on load: set by `quantized::PolicySource`; the default is dense.
    pub policy: WeightPolicy,
}

impl RawTensor<'_> {
    fn error(&self, message: impl std::fmt::Display) -> ModelError {
        ModelError::format(self.path, format!("tensor `{}`: {message}", self.name))
    }

    fn check_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(self.error(format_args!(
                "shape {:?}, expected {:?}",
                self.shape, expected
            )));
        }
        Ok(())
    }

    /// The values as f32 (GGML blocks dequantized).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let n: usize = self.shape.iter().product();
        match self.encoding {
            Encoding::Dense(format) => Ok(format.decode(self.bytes)),
            Encoding::Ggml(ty) => ggml::dequantize(ty, self.bytes, n).map_err(|e| self.error(e)),
        }
    }

    /// A vector of `len` f32 values (norm weights).
    pub fn to_vector(&self, len: usize) -> Result<Vec<f32>> {
        self.check_shape(&[len])?;
        self.to_f32()
    }

    /// A `rows` x `cols` matrix: quantized with RTN when the policy says so, GGML blocks kept
    /// packed when it says so (converted to Marlin's format), otherwise converted to `format`;
    /// 16-bit data already in `format` is copied as is.
    pub fn to_host_weight(
        &self,
        rows: usize,
        cols: usize,
        format: DenseFormat,
    ) -> Result<HostWeight> {
        self.check_shape(&[rows, cols])?;
        if let Some(spec) = self.policy.quantize {
            let group = spec.group_for(cols).map_err(|e| self.error(e))?;
            let values = self.to_f32()?;
            let t =
                quantize_rtn(&values, rows, cols, spec.format, group).map_err(|e| self.error(e))?;
            return HostWeight::quant(t).map_err(|e| self.error(e));
        }
        if let Encoding::Ggml(ty) = self.encoding {
            if self.policy.keep_packed && ty.is_quantized() {
                let c =
                    convert::from_ggml(ty, self.bytes, rows, cols).map_err(|e| self.error(e))?;
                if !c.lossless {
                    eprintln!(
                        "note: {} {ty} runs as {} g{} (relative RMS error {:.2e})",
                        self.name, c.tensor.format, c.tensor.group, c.relative_rms
                    );
                }
                return HostWeight::quant(c.tensor).map_err(|e| self.error(e));
            }
        }
        let weight = match self.encoding {
            Encoding::Dense(stored) if stored == format => {
                HostWeight::new(format, rows, cols, self.bytes.to_vec())
            }
            _ => HostWeight::from_f32(format, rows, cols, &self.to_f32()?),
        };
        weight.map_err(|e| self.error(e))
    }
}

pub trait TensorSource: Send + Sync {
    /// The tensor with this Hugging Face name, or None if the checkpoint lacks it.
    fn get(&self, hf_name: &str) -> Result<Option<RawTensor<'_>>>;

    /// Like `get`, but a missing tensor is an error naming it.
    fn require(&self, hf_name: &str) -> Result<RawTensor<'_>> {
        self.get(hf_name)?.ok_or_else(|| {
            ModelError::format(self.location(), format!("missing tensor `{hf_name}`"))
        })
    }

    /// The tensor in a Marlin quantized format, for sources that store it packed (quantized
    /// checkpoints); None means ask `get`.
    fn packed(
        &self,
        _hf_name: &str,
        _rows: usize,
        _cols: usize,
    ) -> Result<Option<marlin_quant::QuantTensor>> {
        Ok(None)
    }

    /// The file or folder to name in errors.
    fn location(&self) -> &Path;
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// A stored safetensors tensor's dtype, shape and bytes (lengths checked).
pub struct Part<'a> {
    pub path: &'a Path,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

impl<'a> Part<'a> {
    /// As a dense tensor named `name`; F32, F16 and BF16 only.
    pub fn dense(self, name: &str) -> Result<RawTensor<'a>> {
        let format = match self.dtype {
            Dtype::F32 => DenseFormat::F32,
            Dtype::F16 => DenseFormat::F16,
            Dtype::BF16 => DenseFormat::BF16,
            other => {
                return Err(ModelError::format(
                    self.path,
                    format!(
                        "tensor `{name}`: unsupported dtype {other:?} (supported: F32, F16, BF16)"
                    ),
                ))
            }
        };
        Ok(RawTensor {
            name: name.to_string(),
            path: self.path,
            shape: self.shape,
            encoding: Encoding::Dense(format),
            bytes: self.bytes,
            policy: Default::default(),
        })
    }
}

/// model.safetensors, or the shards listed in model.safetensors.index.json.
pub struct SafetensorsSource {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → index in `shards`.
    index: BTreeMap<String, usize>,
    /// Every shard's `__metadata__`, merged.
    metadata: BTreeMap<String, String>,
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::format(&index_path, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    ModelError::format(&index_path, "missing object field `weight_map`")
                })?;
            let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for path in files {
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the map is read-only; a file changed underneath us is the user's problem,
            // as with any memory-mapped loader, and every offset is checked before use.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let (header_len, header) = SafeTensors::read_metadata(&map).map_err(|e| {
                ModelError::format(&path, format!("invalid safetensors header: {e}"))
            })?;
            for name in header.tensors().keys() {
                index.insert(name.clone(), shards.len());
            }
            if let Some(m) = header.metadata() {
                metadata.extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            shards.push(Shard {
                path,
                map,
                header_len,
                metadata: header,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
            metadata,
        })
    }

    /// The shards' `__metadata__` entries.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// A stored tensor by its exact name, any dtype.
    pub fn part(&self, name: &str) -> Result<Option<Part<'_>>> {
        let Some(&shard_index) = self.index.get(name) else {
            return Ok(None);
        };
        let shard = &self.shards[shard_index];
        let info = shard
            .metadata
            .info(name)
            .expect("index built from this metadata");
        let error = |message: String| {
            ModelError::format(&shard.path, format!("tensor `{name}`: {message}"))
        };
        let (begin, end) = info.data_offsets;
        let start = 8 + shard.header_len;
        let bytes = match start.checked_add(begin).zip(start.checked_add(end)) {
            Some((b, e)) if b <= e && e <= shard.map.len() => &shard.map[b..e],
            _ => {
                return Err(error(format!(
                    "data [{begin}, {end}) lies outside the file"
                )))
            }
        };
        let elements: usize = info.shape.iter().product();
        if elements * info.dtype.bitsize() / 8 != bytes.len() {
            return Err(error(format!(
                "shape {:?} of {:?} needs {} bytes, file has {}",
                info.shape,
                info.dtype,
                elements * info.dtype.bitsize() / 8,
                bytes.len()
            )));
        }
        Ok(Some(Part {
            path: &shard.path,
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes,
        }))
    }
}

impl TensorSource for SafetensorsSource {
    fn get(&self, name: &str) -> Result<Option<RawTensor<'_>>> {
        self.part(name)?.map(|p| p.dense(name)).transpose()
    }

    fn location(&self) -> &Path {
        &self.dir
    }
}

/// A GGUF file's tensors under their Hugging Face names.
pub struct GgufSource {
    pub file: GgufFile,
    /// llama.cpp's converter interleaves the halves of each q/k head for its rotary kernel;
    /// `new` puts those rows back in Hugging Face order and keeps them here so `get` can lend them.
    unpermuted: BTreeMap<String, Vec<u8>>,
}

impl GgufSource {
    /// `unpermute_heads`: (query heads, kv heads) when q/k rows need reordering.
    pub fn new(file: GgufFile, unpermute_heads: Option<(usize, usize)>) -> Result<Self> {
        let mut source = Self {
            file,
            unpermuted: BTreeMap::new(),
        };
        if let Some((heads, kv_heads)) = unpermute_heads {
            let names: Vec<(String, usize)> = source
                .file
                .tensors()
                .filter_map(|t| {
                    let h = if t.name.ends_with("attn_q.weight") {
                        heads
                    } else if t.name.ends_with("attn_k.weight") {
                        kv_heads
                    } else {
                        return None;
                    };
                    Some((t.name.clone(), h))
                })
                .collect();
            for (name, h) in names {
                let tensor = source.file.tensor(&name).expect("listed above");
                let bytes = source.file.tensor_bytes(tensor);
                let rows = *tensor.dims.get(1).unwrap_or(&1) as usize;
                let row_bytes = bytes.len() / rows.max(1);
                if !rows.is_multiple_of(2 * h) || row_bytes * rows != bytes.len() {
                    return Err(ModelError::format(
                        source.file.path(),
                        format!("tensor `{name}`: {rows} rows do not split into {h} rotary heads"),
                    ));
                }
                let head_dim = rows / h;
                let half = head_dim / 2;
                let mut out = vec![0u8; bytes.len()];
                for head in 0..h {
                    for i in 0..half {
                        for j in 0..2 {
                            let from = head * head_dim + 2 * i + j;
                            let to = head * head_dim + j * half + i;
                            out[to * row_bytes..(to + 1) * row_bytes]
                                .copy_from_slice(&bytes[from * row_bytes..(from + 1) * row_bytes]);
                        }
                    }
                }
                source.unpermuted.insert(name, out);
            }
        }
        Ok(source)
    }
}

/// Hugging Face tensor name → llama.cpp's.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let short = match suffix {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}"))
}

impl TensorSource for GgufSource {
    fn get(&self, hf_name: &str) -> Result<Option<RawTensor<'_>>> {
        let Some(name) = gguf_name(hf_name) else {
            return Ok(None);
        };
        let Some(tensor) = self.file.tensor(&name) else {
            return Ok(None);
        };
        let bytes = match self.unpermuted.get(&name) {
            Some(bytes) => bytes.as_slice(),
            None => self.file.tensor_bytes(tensor),
        };
        // GGUF lists the contiguous dimension first.
        let shape = tensor.dims.iter().rev().map(|&d| d as usize).collect();
        let encoding = match tensor.ty {
            GgmlType::F32 => Encoding::Dense(DenseFormat::F32),
            GgmlType::F16 => Encoding::Dense(DenseFormat::F16),
            GgmlType::BF16 => Encoding::Dense(DenseFormat::BF16),
            other => Encoding::Ggml(other),
        };
        Ok(Some(RawTensor {
            name,
            path: self.file.path(),
            shape,
            encoding,
            bytes,
            policy: WeightPolicy::default(),
        }))
    }

    fn location(&self) -> &Path {
        self.file.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hf_names_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.12.mlp.down_proj.weight").unwrap(),
            "blk.12.ffn_down.weight"
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").unwrap(),
            "token_embd.weight"
        );
        assert!(gguf_name("model.layers.1.unknown").is_none());
    }
}
