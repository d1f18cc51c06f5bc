//! Random weights of a named model shape, for benchmarks and tests that need no model file (the
//! GPU machines cannot fetch one, and a Llama-3-8B checkpoint is far over what may travel there).
//!
//! Values are uniform random with a standard deviation of 1/√cols per matrix (so activations keep
//! their scale through the layers) and norm weights near 1. With a quantized recipe the packed
//! tensors are made directly from random codes and random group scales of the same spread:
//! quantizing billions of random floats with RTN would take minutes for nothing. Every tensor is
//! a pure function of (seed, name), generated in parallel chunks with a counter-based generator,
//! so the result does not depend on the thread count.

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::quantized::{is_embedding, LoadOptions, QuantizeSpec};
use crate::weights::{Encoding, RawTensor, TensorSource};
use crate::{ModelError, Result};
use half::{bf16, f16};
use marlin_quant::packed::{e4m3_to_f32, f32_to_e4m3, E2M1};
use marlin_quant::{DenseFormat, QuantFormat, QuantTensor};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The shapes `--synthetic` knows, in the order error messages list them.
pub const SHAPES: [&str; 4] = ["smollm2", "llama3-8b", "qwen3-4b", "llama3-70b-layer"];

/// Context of every synthetic model: what benchmarks use, and it keeps the KV pool and rotary
/// table small (a 128k-token pool for Llama-3-8B would be 16 GiB).
const MAX_CONTEXT: usize = 4096;

/// The configuration of a named shape: SmolLM2-135M, Llama-3-8B, Qwen3-4B (their Hugging Face
/// config.json values), or one decoder layer of Llama-3-70B with a 32000-token vocabulary.
pub fn config(shape: &str) -> Result<ModelConfig> {
    let llama3_rope = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_context: 8192.0,
    };
    // (layers, hidden, ffn, heads, kv heads, head dim, vocab, tied, theta, eps)
    let (arch, layers, hidden, ffn, heads, kv_heads, head_dim, vocab, tied, theta, eps, rope) =
        match shape {
            "smollm2" => (
                Architecture::Llama,
                30,
                576,
                1536,
                9,
                3,
                64,
                49152,
                true,
                1e5,
                1e-5,
                RopeScaling::None,
            ),
            "llama3-8b" => (
                Architecture::Llama,
                32,
                4096,
                14336,
                32,
                8,
                128,
                128256,
                false,
                5e5,
                1e-5,
                llama3_rope,
            ),
            "qwen3-4b" => (
                Architecture::Qwen3,
                36,
                2560,
                9728,
                32,
                8,
                128,
                151936,
                true,
                1e6,
                1e-6,
                RopeScaling::None,
            ),
            "llama3-70b-layer" => (
                Architecture::Llama,
                1,
                8192,
                28672,
                64,
                8,
                128,
                32000,
                false,
                5e5,
                1e-5,
                llama3_rope,
            ),
            other => {
                return Err(ModelError::Architecture {
                    name: other.to_string(),
                    supported: format!("{} (synthetic shapes)", SHAPES.join(", ")),
                })
            }
        };
    Ok(ModelConfig {
        architecture: arch,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        max_context: MAX_CONTEXT,
        rms_norm_eps: eps,
        rope_theta: theta,
        rope_scaling: rope,
        tie_embeddings: tied,
        qk_norm: arch == Architecture::Qwen3,
    })
}

/// Every tensor of a synthetic model, made on first request.
pub struct SyntheticSource {
    location: PathBuf,
    seed: u64,
    dtype: DenseFormat,
    /// Packed recipes of the linear layers and of the embedding / lm_head; None: dense.
    quantize: Option<(QuantizeSpec, QuantizeSpec)>,
    /// Name → shape (one dimension for norm weights) and its bytes once made; `get` lends them.
    tensors: BTreeMap<String, (Vec<usize>, OnceLock<Vec<u8>>)>,
}

impl SyntheticSource {
    /// The tensors of `config` as `options` ask: dense in `options.dtype`, or with
    /// `options.quantize` packed (linear layers in its format, the embedding and lm_head in
    /// `options.embedding`'s).
    pub fn new(name: &str, config: &ModelConfig, options: &LoadOptions, seed: u64) -> Result<Self> {
        let c = config;
        let (hidden, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "model.embed_tokens.weight".into(),
                vec![c.vocab_size, hidden],
            ),
            ("model.norm.weight".into(), vec![hidden]),
        ];
        if !c.tie_embeddings {
            shapes.push(("lm_head.weight".into(), vec![c.vocab_size, hidden]));
        }
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let mut layer = vec![
                ("input_layernorm.weight", vec![hidden]),
                ("post_attention_layernorm.weight", vec![hidden]),
                ("self_attn.q_proj.weight", vec![q_dim, hidden]),
                ("self_attn.k_proj.weight", vec![kv_dim, hidden]),
                ("self_attn.v_proj.weight", vec![kv_dim, hidden]),
                ("self_attn.o_proj.weight", vec![hidden, q_dim]),
                ("mlp.gate_proj.weight", vec![c.intermediate_size, hidden]),
                ("mlp.up_proj.weight", vec![c.intermediate_size, hidden]),
                ("mlp.down_proj.weight", vec![hidden, c.intermediate_size]),
            ];
            if c.qk_norm {
                layer.push(("self_attn.q_norm.weight", vec![c.head_dim]));
                layer.push(("self_attn.k_norm.weight", vec![c.head_dim]));
            }
            shapes.extend(layer.into_iter().map(|(n, s)| (format!("{p}.{n}"), s)));
        }
        let location = PathBuf::from(format!("synthetic:{name}"));
        let quantize = options.quantize.map(|q| (q, options.embedding));
        if let Some((linear, embedding)) = quantize {
            // Every group must fit its rows before hours of generation start, as for checkpoints.
            for (tensor, shape) in shapes.iter().filter(|(_, s)| s.len() == 2) {
                let spec = if is_embedding(tensor) {
                    embedding
                } else {
                    linear
                };
                spec.group_for(shape[1]).map_err(|e| {
                    ModelError::format(&location, format!("cannot pack `{tensor}` as {spec}: {e}"))
                })?;
            }
        }
        Ok(Self {
            location,
            seed,
            dtype: options.dtype,
            quantize,
            tensors: shapes
                .into_iter()
                .map(|(n, s)| (n, (s, OnceLock::new())))
                .collect(),
        })
    }

    /// Bytes of weights one decode step streams: every linear layer and the output projection
    /// (the embedding itself is read one row per token).
    pub fn decode_bytes(&self) -> usize {
        let tied = !self.tensors.contains_key("lm_head.weight");
        self.tensors
            .iter()
            .filter(|(name, (shape, _))| {
                shape.len() == 2 && (name.as_str() != "model.embed_tokens.weight" || tied)
            })
            .map(|(name, (shape, _))| self.stored_bytes(name, shape[0], shape[1]))
            .sum()
    }

    /// Bytes a matrix occupies in its format (packed codes, scales and offsets, or dense).
    fn stored_bytes(&self, name: &str, rows: usize, cols: usize) -> usize {
        let Some(spec) = self.spec(name) else {
            return rows * cols * self.dtype.bytes_per_element();
        };
        let f = spec.format;
        let groups = cols / spec.group_for(cols).expect("checked in new");
        let per_group = f.scale_bytes() + if f.is_asym() { 2 } else { 0 };
        rows * (marlin_quant::packed::row_bytes(f.bits(), cols) + groups * per_group)
            + if f == QuantFormat::Nvfp4 { 4 } else { 0 }
    }

    fn spec(&self, name: &str) -> Option<QuantizeSpec> {
        let (linear, embedding) = self.quantize?;
        Some(if is_embedding(name) {
            embedding
        } else {
            linear
        })
    }

    /// A per-tensor seed: FNV-1a of the name, mixed with the source's seed.
    fn tensor_seed(&self, name: &str) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ self.seed;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h
    }
}

impl TensorSource for SyntheticSource {
    fn get(&self, name: &str) -> Result<Option<RawTensor<'_>>> {
        let Some((shape, cell)) = self.tensors.get(name) else {
            return Ok(None);
        };
        let seed = self.tensor_seed(name);
        let (encoding, bytes) = match shape.as_slice() {
            [len] => {
                let bytes = cell.get_or_init(|| {
                    let mut out = vec![0u8; 4 * len];
                    fill_dense(&mut out, DenseFormat::F32, seed, 0.1, 1.0);
                    out
                });
                (DenseFormat::F32, bytes)
            }
            [rows, cols] => {
                let bytes = cell.get_or_init(|| {
                    let mut out = vec![0u8; rows * cols * self.dtype.bytes_per_element()];
                    // Uniform on ±a has standard deviation a/√3.
                    let a = (3.0 / *cols as f32).sqrt();
                    fill_dense(&mut out, self.dtype, seed, a, 0.0);
                    out
                });
                (self.dtype, bytes)
            }
            _ => unreachable!("shapes are made in `new` with one or two dimensions"),
        };
        Ok(Some(RawTensor {
            name: name.to_string(),
            path: &self.location,
            shape: shape.clone(),
            encoding: Encoding::Dense(encoding),
            bytes,
            policy: Default::default(),
        }))
    }

    fn packed(&self, name: &str, rows: usize, cols: usize) -> Result<Option<QuantTensor>> {
        let Some(spec) = self.spec(name) else {
            return Ok(None);
        };
        let group = spec.group_for(cols).expect("checked in new");
        let t = random_packed(spec.format, rows, cols, group, self.tensor_seed(name));
        t.validate()
            .map_err(|e| ModelError::format(&self.location, format!("tensor `{name}`: {e}")))?;
        Ok(Some(t))
    }

    fn location(&self) -> &Path {
        &self.location
    }
}

/// SplitMix64: a counter-based generator, so chunk `i` of a tensor starts from `seed + i` alone
/// (also the benchmarks' source of random data).
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut s = Self(seed ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03));
        s.next_u64();
        s
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform on [-1, 1).
    pub fn symmetric(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (2.0 / (1u64 << 24) as f32) - 1.0
    }
}

/// Bytes per parallel chunk: large enough that a chunk's start-up is noise.
const CHUNK: usize = 1 << 20;

/// Fills `out` with `center + a·u`, u uniform on [-1, 1), encoded in `format`.
fn fill_dense(out: &mut [u8], format: DenseFormat, seed: u64, a: f32, center: f32) {
    let width = format.bytes_per_element();
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = SplitMix::new(seed, i as u64);
            for e in chunk.chunks_exact_mut(width) {
                let v = center + a * rng.symmetric();
                match format {
                    DenseFormat::F32 => e.copy_from_slice(&v.to_le_bytes()),
                    DenseFormat::F16 => e.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
                    DenseFormat::BF16 => e.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
                }
            }
        });
}

/// Fills `out` with random bytes.
fn fill_bytes(out: &mut [u8], seed: u64) {
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = SplitMix::new(seed, i as u64);
            for word in chunk.chunks_mut(8) {
                let r = rng.next_u64().to_le_bytes();
                word.copy_from_slice(&r[..word.len()]);
            }
        });
}

/// Root mean square of a format's code values over its valid codes, taken about their middle
/// for asymmetric integers (whose offsets then centre the values on zero).
fn code_rms(format: QuantFormat) -> f64 {
    let values: Vec<f64> = match format {
        QuantFormat::Int { bits, asym } => {
            let mid = if asym {
                ((1u32 << bits) - 1) as f64 / 2.0
            } else {
                0.0
            };
            (0..1u32 << bits)
                .map(|c| format.code_value(c as u8) as f64 - mid)
                .collect()
        }
        QuantFormat::Fp8 => (0..=255u8)
            .map(e4m3_to_f32)
            .filter(|v| v.is_finite())
            .map(f64::from)
            .collect(),
        _ => E2M1.iter().map(|&v| v as f64).collect(),
    };
    (values.iter().map(|v| v * v).sum::<f64>() / values.len() as f64).sqrt()
}

/// A packed `rows` × `cols` tensor of uniformly random codes whose values have a standard
/// deviation near 1/√cols: group scales are that over the codes' RMS, times a random factor in
/// [0.75, 1.25) so groups differ as real ones do.
fn random_packed(
    format: QuantFormat,
    rows: usize,
    cols: usize,
    group: usize,
    seed: u64,
) -> QuantTensor {
    let target = 1.0 / (cols as f64).sqrt() / code_rms(format);
    let tensor_scale = (format == QuantFormat::Nvfp4).then_some(target as f32);
    let mut t = QuantTensor::zeroed(format, rows, cols, group, tensor_scale)
        .expect("the group was resolved for this row length");
    fill_bytes(&mut t.codes, seed);
    if format == QuantFormat::Fp8 {
        // 0x7f and 0xff are E4M3's NaNs: make them the largest finite value of their sign.
        t.codes.par_iter_mut().for_each(|c| {
            if *c & 0x7f == 0x7f {
                *c ^= 1;
            }
        });
    }
    // One scale per group, each row from its own stream so rows are made in parallel.
    let per_row = cols / group;
    let scales: Vec<f64> = (0..rows)
        .into_par_iter()
        .flat_map_iter(|r| {
            let mut rng = SplitMix::new(seed ^ 0x5ca1e, r as u64);
            (0..per_row).map(move |_| target * (1.0 + 0.25 * rng.symmetric() as f64))
        })
        .collect();
    let width = format.scale_bytes();
    t.scales
        .par_chunks_mut(width)
        .zip(scales.par_iter())
        .for_each(|(out, &s)| match format {
            // E8M0: the nearest power of two (log2 of the scale, biased by 127).
            QuantFormat::Mxfp4 => out[0] = (s.log2().round() as i32 + 127) as u8,
            // E4M3 block scale around 1; the tensor scale carries the magnitude.
            QuantFormat::Nvfp4 => out[0] = f32_to_e4m3((s / target) as f32),
            _ => out.copy_from_slice(&f16::from_f64(s).to_le_bytes()),
        });
    if let (Some(offsets), QuantFormat::Int { bits, .. }) = (&mut t.offsets, format) {
        // Centre the codes: value = c·s + o is zero at the middle code.
        let mid = ((1u32 << bits) - 1) as f64 / 2.0;
        offsets
            .par_chunks_mut(2)
            .zip(scales.par_iter())
            .for_each(|(out, &s)| out.copy_from_slice(&f16::from_f64(-s * mid).to_le_bytes()));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(quantize: Option<&str>) -> LoadOptions {
        let mut o = LoadOptions::new(DenseFormat::BF16);
        o.quantize = quantize.map(|f| QuantizeSpec::new(QuantFormat::parse(f).unwrap()));
        o
    }

    #[test]
    fn shapes_match_the_published_configs() {
        let c = config("llama3-8b").unwrap();
        assert_eq!(
            (c.num_layers, c.hidden_size, c.intermediate_size),
            (32, 4096, 14336)
        );
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (32, 8, 128));
        assert!(!c.tie_embeddings && !c.qk_norm);
        let q = config("qwen3-4b").unwrap();
        assert_eq!(
            (q.num_layers, q.hidden_size, q.head_dim, q.vocab_size),
            (36, 2560, 128, 151936)
        );
        assert!(q.qk_norm && q.tie_embeddings);
        let s = config("smollm2").unwrap();
        assert_eq!(
            (s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size),
            (9, 3, 64, 49152)
        );
        assert_eq!(config("llama3-70b-layer").unwrap().num_layers, 1);
    }

    #[test]
    fn unknown_shape_lists_the_known_ones() {
        let e = config("llama4").unwrap_err().to_string();
        assert!(e.contains("`llama4`"), "{e}");
        for s in SHAPES {
            assert!(e.contains(s), "{e}");
        }
    }

    #[test]
    fn dense_tensors_are_deterministic_and_scaled() {
        let c = config("smollm2").unwrap();
        let a = SyntheticSource::new("smollm2", &c, &options(None), 1).unwrap();
        let b = SyntheticSource::new("smollm2", &c, &options(None), 1).unwrap();
        let name = "model.layers.3.mlp.down_proj.weight";
        let wa = a.require(name).unwrap().to_f32().unwrap();
        let wb = b.require(name).unwrap().to_f32().unwrap();
        assert_eq!(wa, wb);
        assert_eq!(wa.len(), 576 * 1536);
        let rms = (wa.iter().map(|v| (v * v) as f64).sum::<f64>() / wa.len() as f64).sqrt();
        let want = 1.0 / (1536f64).sqrt();
        assert!((rms / want - 1.0).abs() < 0.02, "rms {rms}, want {want}");
        let other = a
            .require("model.layers.4.mlp.down_proj.weight")
            .unwrap()
            .to_f32()
            .unwrap();
        assert_ne!(wa, other, "layers must differ");
        let norm = a.require("model.norm.weight").unwrap().to_f32().unwrap();
        assert!(norm.iter().all(|v| (0.9..=1.1).contains(v)));
        assert!(a
            .get("model.layers.30.mlp.up_proj.weight")
            .unwrap()
            .is_none());
    }

    #[test]
    fn packed_tensors_have_the_dense_spread_in_every_format() {
        let c = config("smollm2").unwrap();
        for f in QuantFormat::ALL {
            let mut o = options(None);
            o.quantize = Some(QuantizeSpec::new(f));
            let s = SyntheticSource::new("smollm2", &c, &o, 2).unwrap();
            let t = s
                .packed("model.layers.0.mlp.up_proj.weight", 1536, 576)
                .unwrap()
                .unwrap();
            assert_eq!(t.format, f);
            let v = t.dequantize();
            assert!(v.iter().all(|x| x.is_finite()), "{f}");
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            let rms = (v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            let want = 1.0 / 576f64.sqrt();
            // Power-of-two (mxfp4) scales land within a factor √2 of the target.
            assert!(
                rms > 0.6 * want && rms < 1.6 * want,
                "{f}: rms {rms}, want {want}"
            );
            // Formats whose codes are symmetric about zero (and asymmetric ones, centred by their
            // offsets) average to zero; symmetric integers lean by half a step, as their grid does.
            if f.is_asym() || !matches!(f, QuantFormat::Int { .. }) {
                assert!(mean.abs() < 0.1 * want, "{f}: mean {mean}");
            }
            // The embedding follows the embedding recipe (int8 g32).
            let e = s
                .packed("model.embed_tokens.weight", 49152, 576)
                .unwrap()
                .unwrap();
            assert_eq!((e.format.bits(), e.group), (8, 32));
        }
    }

    #[test]
    fn decode_bytes_count_linear_layers_and_the_output_projection() {
        let c = config("smollm2").unwrap();
        let dense = SyntheticSource::new("smollm2", &c, &options(None), 0).unwrap();
        let per_layer = 576 * 576 * 2 + 2 * 192 * 576 + 3 * 1536 * 576;
        assert_eq!(dense.decode_bytes(), 2 * (30 * per_layer + 49152 * 576));
        let int4 = SyntheticSource::new("smollm2", &c, &options(Some("int4")), 0).unwrap();
        let t = int4
            .packed("model.layers.0.self_attn.q_proj.weight", 576, 576)
            .unwrap()
            .unwrap();
        assert_eq!(
            int4.stored_bytes("model.layers.0.self_attn.q_proj.weight", 576, 576),
            t.storage_bytes()
        );
        let e = int4
            .packed("model.embed_tokens.weight", 49152, 576)
            .unwrap()
            .unwrap();
        assert_eq!(
            int4.stored_bytes("model.embed_tokens.weight", 49152, 576),
            e.storage_bytes()
        );
    }

    #[test]
    fn a_recipe_that_does_not_fit_fails_before_generation() {
        let c = config("smollm2").unwrap();
        let mut o = options(None);
        o.quantize = Some(QuantizeSpec {
            format: QuantFormat::Int {
                bits: 4,
                asym: false,
            },
            group: 48,
        });
        let e = SyntheticSource::new("smollm2", &c, &o, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("synthetic:smollm2") && e.contains("group size 48"),
            "{e}"
        );
    }
}
