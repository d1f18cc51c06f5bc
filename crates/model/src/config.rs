//! The architecture-level facts a forward pass needs, read from a Hugging Face config.json or
//! from GGUF metadata.

use crate::gguf::GgufFile;
use crate::{ModelError, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen3,
}

impl Architecture {
    pub const SUPPORTED: &'static str = "llama (Llama 2/3.x, SmolLM2), qwen3";

    fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "LlamaForCausalLM" => Ok(Architecture::Llama),
            "qwen3" | "Qwen3ForCausalLM" => Ok(Architecture::Qwen3),
            other => Err(ModelError::Architecture {
                name: other.to_string(),
                supported: Self::SUPPORTED.to_string(),
            }),
        }
    }
}

/// How positions map to rotary frequencies beyond the plain `theta^(-2i/d)`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: f64,
    },
    /// Per-frequency divisors stored in the file (GGUF `rope_freqs.weight`).
    Divisors(Vec<f64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_context: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_embeddings: bool,
    /// Qwen3 normalises each query and key head before rotary embedding.
    pub qk_norm: bool,
}

impl ModelConfig {
    /// Reads a Hugging Face config.json.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(path, format!("invalid JSON: {e}")))?;
        Self::from_hf_json(&json).map_err(|message| ModelError::format(path, message))
    }

    fn from_hf_json(json: &Value) -> std::result::Result<Self, String> {
        let field = |key: &str| json.get(key).filter(|v| !v.is_null());
        let usize_field = |key: &str| -> std::result::Result<usize, String> {
            field(key)
                .ok_or_else(|| format!("missing field `{key}`"))?
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| format!("field `{key}` is not a non-negative integer"))
        };
        let model_type = field("model_type")
            .and_then(Value::as_str)
            .ok_or("missing field `model_type`")?;
        let architecture = Architecture::parse(model_type).map_err(|e| e.to_string())?;
        let hidden_size = usize_field("hidden_size")?;
        let num_heads = usize_field("num_attention_heads")?;
        let num_kv_heads = match field("num_key_value_heads") {
            Some(_) => usize_field("num_key_value_heads")?,
            None => num_heads,
        };
        let head_dim = match field("head_dim") {
            Some(_) => usize_field("head_dim")?,
            None => hidden_size / num_heads.max(1),
        };
        // transformers 5 moved theta and scaling into `rope_parameters`; older files use
        // `rope_theta` and `rope_scaling`.
        let rope = field("rope_parameters").or_else(|| field("rope_scaling"));
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| field("rope_theta"))
            .map(|v| v.as_f64().ok_or("field `rope_theta` is not a number"))
            .transpose()?
            .unwrap_or(10000.0);
        let rope_scaling = match rope {
            Some(r) => hf_rope_scaling(r)?,
            None => RopeScaling::None,
        };
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_layers: usize_field("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: usize_field("vocab_size")?,
            max_context: usize_field("max_position_embeddings")?,
            rms_norm_eps: field("rms_norm_eps")
                .ok_or("missing field `rms_norm_eps`")?
                .as_f64()
                .ok_or("field `rms_norm_eps` is not a number")? as f32,
            rope_theta,
            rope_scaling,
            tie_embeddings: field("tie_word_embeddings")
                .map(|v| {
                    v.as_bool()
                        .ok_or("field `tie_word_embeddings` is not a bool")
                })
                .transpose()?
                .unwrap_or(false),
            qk_norm: architecture == Architecture::Qwen3,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads GGUF metadata (`{arch}.block_count`, ...). `rope_divisors` comes from the optional
    /// `rope_freqs.weight` tensor, which the caller reads.
    pub fn from_gguf(gguf: &GgufFile, rope_divisors: Option<Vec<f64>>) -> Result<Self> {
        let arch_name = gguf.get_str("general.architecture")?.to_string();
        let architecture = Architecture::parse(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden_size = gguf.get_u64(&key("embedding_length"))? as usize;
        let num_heads = gguf.get_u64(&key("attention.head_count"))? as usize;
        let num_kv_heads = gguf
            .opt_u64(&key("attention.head_count_kv"))
            .map_or(num_heads, |v| v as usize);
        let head_dim = gguf
            .opt_u64(&key("attention.key_length"))
            .map_or(hidden_size / num_heads.max(1), |v| v as usize);
        let vocab_size = match gguf.opt_u64(&key("vocab_size")) {
            Some(v) => v as usize,
            None => gguf.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_scaling = match (rope_divisors, gguf.opt_str(&key("rope.scaling.type"))) {
            (Some(divisors), _) => RopeScaling::Divisors(divisors),
            (None, Some("linear")) => RopeScaling::Linear {
                factor: gguf.get_f32(&key("rope.scaling.factor"))? as f64,
            },
            (None, None | Some("none")) => RopeScaling::None,
            (None, Some(other)) => {
                return Err(ModelError::format(
                    gguf.path(),
                    format!(
                        "field `{}`: unsupported rope scaling `{other}`",
                        key("rope.scaling.type")
                    ),
                ))
            }
        };
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: gguf.get_u64(&key("feed_forward_length"))? as usize,
            num_layers: gguf.get_u64(&key("block_count"))? as usize,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_context: gguf.get_u64(&key("context_length"))? as usize,
            rms_norm_eps: gguf.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: gguf.opt_f32(&key("rope.freq_base")).unwrap_or(10000.0) as f64,
            rope_scaling,
            tie_embeddings: gguf.tensor("output.weight").is_none(),
            qk_norm: architecture == Architecture::Qwen3,
        };
        config
            .validate()
            .map_err(|message| ModelError::format(gguf.path(), message))?;
        Ok(config)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_context),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("field `{name}` must be positive"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for rotary embedding",
                self.head_dim
            ));
        }
        Ok(())
    }

    /// Rotary cos/sin for positions 0..positions, laid out as the `rope` op expects: for each
    /// position, head_dim/2 cosines then head_dim/2 sines.
    pub fn rope_table(&self, positions: usize) -> Vec<f32> {
        let half = self.head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let base = 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64);
                self.scale_frequency(i, base)
            })
            .collect();
        let mut table = Vec::with_capacity(positions * self.head_dim);
        for p in 0..positions {
            let angles = inv_freq.iter().map(|f| (p as f64 * f) as f32);
            let angles: Vec<f32> = angles.collect();
            table.extend(angles.iter().map(|a| a.cos()));
            table.extend(angles.iter().map(|a| a.sin()));
        }
        table
    }

    fn scale_frequency(&self, i: usize, inv_freq: f64) -> f64 {
        match &self.rope_scaling {
            RopeScaling::None => inv_freq,
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Divisors(d) => inv_freq / d.get(i).copied().unwrap_or(1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                let low_freq_wavelen = original_context / low_freq_factor;
                let high_freq_wavelen = original_context / high_freq_factor;
                if wavelen < high_freq_wavelen {
                    inv_freq
                } else if wavelen > low_freq_wavelen {
                    inv_freq / factor
                } else {
                    let smooth = (original_context / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }
}

fn hf_rope_scaling(rope: &Value) -> std::result::Result<RopeScaling, String> {
    let kind = rope
        .get("rope_type")
        .or_else(|| rope.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |key: &str| {
        rope.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope scaling `{kind}` needs number field `{key}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: number("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_context: number("original_max_position_embeddings")?,
        }),
        other => Err(format!(
            "unsupported rope scaling `{other}` (supported: default, linear, llama3)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 320, "max_position_embeddings": 256, "rms_norm_eps": 1e-5
        })
    }

    #[test]
    fn missing_field_is_named() {
        let mut json = base();
        json.as_object_mut().unwrap().remove("intermediate_size");
        let err = ModelConfig::from_hf_json(&json).unwrap_err();
        assert!(err.contains("intermediate_size"), "{err}");
    }

    #[test]
    fn unknown_architecture_lists_supported() {
        let mut json = base();
        json["model_type"] = "gpt_neox".into();
        let err = ModelConfig::from_hf_json(&json).unwrap_err();
        assert!(err.contains("gpt_neox") && err.contains("qwen3"), "{err}");
    }

    #[test]
    fn llama3_scaling_keeps_high_and_slows_low_frequencies() {
        let mut json = base();
        json["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 10000.0,
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32});
        let config = ModelConfig::from_hf_json(&json).unwrap();
        let plain = ModelConfig {
            rope_scaling: RopeScaling::None,
            ..config.clone()
        };
        assert_eq!(config.scale_frequency(0, 1.0), 1.0);
        let lowest = plain.rope_theta.powf(-14.0 / 16.0);
        assert!((config.scale_frequency(7, lowest) - lowest / 8.0).abs() < 1e-12);
    }

    #[test]
    fn rope_table_starts_at_identity() {
        let config = ModelConfig::from_hf_json(&base()).unwrap();
        let table = config.rope_table(2);
        assert_eq!(&table[..8], &[1.0; 8]);
        assert_eq!(&table[8..16], &[0.0; 8]);
        assert!((table[16 + 8] - 1f32.sin()).abs() < 1e-7);
    }
}
