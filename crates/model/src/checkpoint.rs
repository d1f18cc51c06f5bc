//! Quantized Hugging Face-style checkpoints: Marlin's own (`marlin quantize` output) and
//! pre-quantized GPTQ and AWQ checkpoints, whose packed tensors convert at load into Marlin
//! [`QuantTensor`]s (never inflated to 16 bits).
//!
//! A folder is quantized when its config.json has a `quantization_config` object:
//! - `quant_method: "marlin"`: each quantized tensor `NAME` (a Hugging Face weight name, e.g.
//!   `model.layers.0.mlp.down_proj.weight`) is stored as `NAME.codes`, `NAME.scales`,
//!   `NAME.offsets`, `NAME.tensor_scale`, `NAME.perm` with its header `__metadata__` entry
//!   `NAME` → `FORMAT:G:ROWS:COLS` (docs/format.md);
//! - `quant_method: "gptq"`: `BASE.qweight` (I32 `[in·bits/32, out]`, codes packed along the input
//!   dimension, lowest bits first), `BASE.qzeros` (I32 `[groups, out·bits/32]`), `BASE.scales`
//!   (F16 `[groups, out]`), optional `BASE.g_idx` (I32 `[in]`), where `BASE` is the weight name
//!   without `.weight`. Weight = `scale · (q − z)`; `checkpoint_format` "gptq" (v1, the default)
//!   stores `z − 1`, "gptq_v2" stores `z`. 4- and 8-bit.
//! - `quant_method: "awq"`: `BASE.qweight` (I32 `[in, out/8]`, packed along the output dimension
//!   in the interleaved order 0,2,4,6,1,3,5,7), `BASE.qzeros` (I32 `[groups, out/8]`, same
//!   packing), `BASE.scales` (F16 `[groups, out]`); weight = `scale · (q − z)`. 4-bit, GEMM layout.
//!
//! GPTQ/AWQ groups become Marlin groups: symmetric checkpoints (every zero point 2^(b−1)) map to
//! `int{b}` exactly; others to `int{b}-asym` with the offset `−s·z` rounded to f16 (a rounding
//! of at most 2^−12 of `|s·z|`). A GPTQ `g_idx` that is a permutation of whole contiguous groups
//! becomes the tensor's column permutation; any other `g_idx` is dequantized and requantized
//! with RTN to int8 g32 (a note says so).

use crate::weights::{Part, RawTensor, SafetensorsSource, TensorSource};
use crate::{ModelError, Result};
use marlin_quant::packed::{pack_row, row_bytes};
use marlin_quant::{DenseFormat, QuantFormat, QuantTensor};
use safetensors::Dtype;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// `quantization_config.quant_method` of Marlin's own checkpoints.
pub const QUANT_METHOD: &str = "marlin";

/// The parts a packed tensor is stored as, by suffix.
pub const PART_SUFFIXES: [&str; 5] = ["codes", "scales", "offsets", "tensor_scale", "perm"];

/// What kind of quantized checkpoint a folder holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Scheme {
    Marlin,
    Gptq {
        bits: usize,
        group: Option<usize>,
        /// v1 checkpoints store zero points minus one.
        zero_plus_one: bool,
    },
    Awq {
        bits: usize,
        group: Option<usize>,
    },
}

impl Scheme {
    /// Reads `quantization_config`; None when the folder is not quantized.
    pub fn from_config(path: &Path, config: &Value) -> Result<Option<Self>> {
        let Some(qc) = config.get("quantization_config").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let err = |m: String| ModelError::format(path, format!("quantization_config: {m}"));
        let method = qc
            .get("quant_method")
            .and_then(Value::as_str)
            .ok_or_else(|| err("missing string field `quant_method`".into()))?;
        let bits = || -> Result<usize> {
            qc.get("bits")
                .or_else(|| qc.get("w_bit"))
                .and_then(Value::as_u64)
                .map(|b| b as usize)
                .ok_or_else(|| err("missing integer field `bits`".into()))
        };
        let group = || -> Option<usize> {
            qc.get("group_size")
                .or_else(|| qc.get("q_group_size"))
                .and_then(Value::as_i64)
                .and_then(|g| usize::try_from(g).ok())
        };
        match method {
            QUANT_METHOD => {
                for key in ["format", "group_size", "method"] {
                    if qc.get(key).is_none() {
                        return Err(err(format!("missing field `{key}`")));
                    }
                }
                Ok(Some(Scheme::Marlin))
            }
            "gptq" => {
                let bits = bits()?;
                if bits != 4 && bits != 8 {
                    return Err(err(format!(
                        "GPTQ with {bits} bits: only 4- and 8-bit GPTQ checkpoints load"
                    )));
                }
                let format = qc
                    .get("checkpoint_format")
                    .and_then(Value::as_str)
                    .unwrap_or("gptq");
                let zero_plus_one = match format {
                    "gptq" => true,
                    "gptq_v2" => false,
                    other => {
                        return Err(err(format!(
                            "checkpoint_format `{other}` (supported: gptq, gptq_v2)"
                        )))
                    }
                };
                Ok(Some(Scheme::Gptq {
                    bits,
                    group: group(),
                    zero_plus_one,
                }))
            }
            "awq" => {
                let bits = bits()?;
                if bits != 4 {
                    return Err(err(format!("AWQ with {bits} bits: only 4-bit AWQ loads")));
                }
                if let Some(v) = qc.get("version").and_then(Value::as_str) {
                    if !v.eq_ignore_ascii_case("gemm") {
                        return Err(err(format!(
                            "AWQ version `{v}`: only the GEMM packing loads"
                        )));
                    }
                }
                Ok(Some(Scheme::Awq {
                    bits,
                    group: group(),
                }))
            }
            other => Err(err(format!(
                "quant_method `{other}` (supported: marlin, gptq, awq)"
            ))),
        }
    }
}

/// A quantized folder's tensors: dense ones as stored, packed ones as [`QuantTensor`]s.
pub struct CheckpointSource {
    dir: PathBuf,
    pub scheme: Scheme,
    files: SafetensorsSource,
}

impl CheckpointSource {
    pub fn open(dir: &Path, scheme: Scheme) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            scheme,
            files: SafetensorsSource::open(dir)?,
        })
    }

    /// A stored tensor by its exact name.
    pub fn part(&self, name: &str) -> Result<Option<Part<'_>>> {
        self.files.part(name)
    }

    fn require_part(&self, name: &str) -> Result<Part<'_>> {
        self.part(name)?
            .ok_or_else(|| ModelError::format(&self.dir, format!("missing tensor `{name}`")))
    }

    fn error(&self, name: &str, message: impl std::fmt::Display) -> ModelError {
        ModelError::format(&self.dir, format!("tensor `{name}`: {message}"))
    }

    /// The packed form of weight `hf_name` (`rows` × `cols`), or None when it is stored dense.
    pub fn packed(&self, hf_name: &str, rows: usize, cols: usize) -> Result<Option<QuantTensor>> {
        let Some(t) = self.packed_as_stored(hf_name)? else {
            return Ok(None);
        };
        if (t.rows, t.cols) != (rows, cols) {
            return Err(self.error(
                hf_name,
                format!(
                    "packed {}x{}, the model needs {rows}x{cols}",
                    t.rows, t.cols
                ),
            ));
        }
        Ok(Some(t))
    }

    /// The packed form of weight `hf_name` with the shape it is stored with, checked.
    pub fn packed_as_stored(&self, hf_name: &str) -> Result<Option<QuantTensor>> {
        let t = match &self.scheme {
            Scheme::Marlin => self.marlin_tensor(hf_name)?,
            Scheme::Gptq {
                bits,
                group,
                zero_plus_one,
            } => self.gptq_tensor(hf_name, *bits, *group, *zero_plus_one)?,
            Scheme::Awq { bits, group } => self.awq_tensor(hf_name, *bits, *group)?,
        };
        let Some(t) = t else { return Ok(None) };
        t.validate().map_err(|e| self.error(hf_name, e))?;
        Ok(Some(t))
    }

    fn marlin_tensor(&self, name: &str) -> Result<Option<QuantTensor>> {
        let Some(desc) = self.files.metadata().get(name) else {
            if self.files.contains(&format!("{name}.codes")) {
                return Err(self.error(name, "codes without a `__metadata__` entry"));
            }
            return Ok(None);
        };
        let (format, group, rows, cols) = parse_descriptor(desc).ok_or_else(|| {
            self.error(
                name,
                format!("bad descriptor `{desc}` (FORMAT:G:ROWS:COLS)"),
            )
        })?;
        let bytes_of = |suffix: &str, dtype: Dtype| -> Result<Option<Vec<u8>>> {
            let full = format!("{name}.{suffix}");
            match self.part(&full)? {
                None => Ok(None),
                Some(p) if p.dtype == dtype => Ok(Some(p.bytes.to_vec())),
                Some(p) => {
                    Err(self.error(&full, format!("dtype {:?}, expected {dtype:?}", p.dtype)))
                }
            }
        };
        let codes = bytes_of("codes", Dtype::U8)?
            .ok_or_else(|| self.error(name, format!("missing `{name}.codes`")))?;
        let scales = bytes_of("scales", Dtype::U8)?
            .ok_or_else(|| self.error(name, format!("missing `{name}.scales`")))?;
        let offsets = bytes_of("offsets", Dtype::U8)?;
        let tensor_scale = bytes_of("tensor_scale", Dtype::F32)?
            .map(|b| {
                <[u8; 4]>::try_from(b.as_slice())
                    .map(f32::from_le_bytes)
                    .map_err(|_| self.error(name, "tensor_scale is not one f32"))
            })
            .transpose()?;
        let perm = bytes_of("perm", Dtype::U32)?.map(|b| {
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        });
        Ok(Some(QuantTensor {
            format,
            rows,
            cols,
            group,
            codes,
            scales,
            offsets,
            tensor_scale,
            perm,
        }))
    }

    fn i32_part(&self, name: &str) -> Result<Option<(Vec<usize>, Vec<u32>)>> {
        let Some(p) = self.part(name)? else {
            return Ok(None);
        };
        if !matches!(p.dtype, Dtype::I32 | Dtype::U32) {
            return Err(self.error(name, format!("dtype {:?}, expected I32", p.dtype)));
        }
        let v = p
            .bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Some((p.shape, v)))
    }

    fn f16_part(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>, Vec<u16>)> {
        let p = self.require_part(name)?;
        if p.dtype != Dtype::F16 {
            return Err(self.error(name, format!("dtype {:?}, expected F16", p.dtype)));
        }
        let bits: Vec<u16> = p
            .bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let values = DenseFormat::F16.decode(p.bytes);
        Ok((p.shape, values, bits))
    }

    fn gptq_tensor(
        &self,
        name: &str,
        bits: usize,
        group: Option<usize>,
        zero_plus_one: bool,
    ) -> Result<Option<QuantTensor>> {
        let base = name.strip_suffix(".weight").unwrap_or(name);
        let Some((qshape, qweight)) = self.i32_part(&format!("{base}.qweight"))? else {
            return Ok(None);
        };
        let per = 32 / bits;
        let mask = (1u32 << bits) - 1;
        let [packed_in, out] = qshape[..] else {
            return Err(self.error(name, format!("qweight shape {qshape:?} is not 2-D")));
        };
        let cols = packed_in * per;
        let (sshape, scales, scale_bits) = self.f16_part(&format!("{base}.scales"))?;
        let groups = sshape.first().copied().unwrap_or(0);
        if sshape.len() != 2 || sshape[1] != out || groups == 0 {
            return Err(self.error(
                name,
                format!("scales shape {sshape:?}, expected [groups, {out}]"),
            ));
        }
        let (zshape, qzeros) = self
            .i32_part(&format!("{base}.qzeros"))?
            .ok_or_else(|| self.error(name, format!("missing `{base}.qzeros`")))?;
        if zshape != [groups, out.div_ceil(per)] {
            return Err(self.error(
                name,
                format!(
                    "qzeros shape {zshape:?}, expected [{groups}, {}]",
                    out.div_ceil(per)
                ),
            ));
        }
        let code = |i: usize, o: usize| (qweight[(i / per) * out + o] >> (bits * (i % per))) & mask;
        let zero = |g: usize, o: usize| {
            let z = (qzeros[g * zshape[1] + o / per] >> (bits * (o % per))) & mask;
            if zero_plus_one {
                z + 1
            } else {
                z
            }
        };
        let g_idx: Vec<usize> = match self.i32_part(&format!("{base}.g_idx"))? {
            Some((shape, v)) => {
                if shape != [cols] {
                    return Err(
                        self.error(name, format!("g_idx shape {shape:?}, expected [{cols}]"))
                    );
                }
                v.into_iter().map(|g| g as usize).collect()
            }
            None => {
                let g = group.unwrap_or(cols);
                (0..cols).map(|i| i / g.max(1)).collect()
            }
        };
        if let Some(bad) = g_idx.iter().find(|&&g| g >= groups) {
            return Err(self.error(name, format!("g_idx holds group {bad} of {groups}")));
        }
        let unpacked = Unpacked {
            bits,
            rows: out,
            cols,
            groups,
            code: &code,
            zero: &zero,
            scale_bits: &scale_bits,
            scales: &scales,
        };
        unpacked.to_quant(name, &g_idx).map(Some)
    }

    fn awq_tensor(
        &self,
        name: &str,
        bits: usize,
        group: Option<usize>,
    ) -> Result<Option<QuantTensor>> {
        const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
        let base = name.strip_suffix(".weight").unwrap_or(name);
        let Some((qshape, qweight)) = self.i32_part(&format!("{base}.qweight"))? else {
            return Ok(None);
        };
        let [cols, packed_out] = qshape[..] else {
            return Err(self.error(name, format!("qweight shape {qshape:?} is not 2-D")));
        };
        let out = packed_out * 8;
        let (sshape, scales, scale_bits) = self.f16_part(&format!("{base}.scales"))?;
        let groups = sshape.first().copied().unwrap_or(0);
        if sshape.len() != 2 || sshape[1] != out || groups == 0 || cols % groups != 0 {
            return Err(self.error(
                name,
                format!("scales shape {sshape:?} for a {cols}x{out} weight"),
            ));
        }
        if let Some(g) = group {
            if g * groups != cols {
                return Err(self.error(name, format!("{groups} groups of {g} for {cols} inputs")));
            }
        }
        let (zshape, qzeros) = self
            .i32_part(&format!("{base}.qzeros"))?
            .ok_or_else(|| self.error(name, format!("missing `{base}.qzeros`")))?;
        if zshape != [groups, packed_out] {
            return Err(self.error(
                name,
                format!("qzeros shape {zshape:?}, expected [{groups}, {packed_out}]"),
            ));
        }
        // Output o sits in nibble k of word o / 8 where ORDER[k] = o % 8.
        let mut nibble = [0usize; 8];
        for (k, &o) in ORDER.iter().enumerate() {
            nibble[o] = k;
        }
        let mask = (1u32 << bits) - 1;
        let code =
            |i: usize, o: usize| (qweight[i * packed_out + o / 8] >> (bits * nibble[o % 8])) & mask;
        let zero =
            |g: usize, o: usize| (qzeros[g * packed_out + o / 8] >> (bits * nibble[o % 8])) & mask;
        let gs = cols / groups;
        let g_idx: Vec<usize> = (0..cols).map(|i| i / gs).collect();
        Unpacked {
            bits,
            rows: out,
            cols,
            groups,
            code: &code,
            zero: &zero,
            scale_bits: &scale_bits,
            scales: &scales,
        }
        .to_quant(name, &g_idx)
        .map(Some)
    }
}

/// A GPTQ/AWQ weight read through accessors: code (input i, output o), zero (group, output).
struct Unpacked<'a> {
    bits: usize,
    rows: usize,
    cols: usize,
    groups: usize,
    code: &'a dyn Fn(usize, usize) -> u32,
    zero: &'a dyn Fn(usize, usize) -> u32,
    scale_bits: &'a [u16],
    scales: &'a [f32],
}

impl Unpacked<'_> {
    /// Marlin tensor from the unpacked codes; `g_idx[i]` is input i's group.
    fn to_quant(&self, name: &str, g_idx: &[usize]) -> Result<QuantTensor> {
        let (rows, cols, groups, bits) = (self.rows, self.cols, self.groups, self.bits);
        let mid = 1u32 << (bits - 1);
        // Inputs by group, in order; a permutation of contiguous groups when every group has
        // the same number of members.
        let mut perm: Vec<u32> = (0..cols as u32).collect();
        perm.sort_by_key(|&i| g_idx[i as usize]);
        let gsize = cols / groups;
        let contiguous = cols % groups == 0
            && perm
                .iter()
                .enumerate()
                .all(|(j, &i)| g_idx[i as usize] == j / gsize);
        let identity = perm.iter().enumerate().all(|(j, &i)| j == i as usize);
        if !contiguous || (gsize != cols && gsize % 16 != 0) {
            eprintln!(
                "note: {name}: its g_idx does not form {groups} contiguous groups of a supported size; \
                 dequantized and requantized to int8 with RTN"
            );
            let mut values = vec![0.0f32; rows * cols];
            for o in 0..rows {
                for i in 0..cols {
                    let g = g_idx[i];
                    let q = (self.code)(i, o) as f32 - (self.zero)(g, o) as f32;
                    values[o * cols + i] = q * self.scales[g * rows + o];
                }
            }
            let format = QuantFormat::Int {
                bits: 8,
                asym: false,
            };
            let group = format
                .resolve_group(32, cols)
                .map_err(|e| ModelError::format(name, e.to_string()))?;
            return marlin_quant::quantize_rtn(&values, rows, cols, format, group)
                .map_err(|e| ModelError::format(name, e.to_string()));
        }
        let symmetric = (0..groups).all(|g| (0..rows).all(|o| (self.zero)(g, o) == mid));
        let format = QuantFormat::Int {
            bits: bits as u8,
            asym: !symmetric,
        };
        let rb = row_bytes(bits, cols);
        let mut codes = vec![0u8; rows * rb];
        let mut row = vec![0u8; cols];
        for o in 0..rows {
            for (j, &i) in perm.iter().enumerate() {
                row[j] = (self.code)(i as usize, o) as u8;
            }
            pack_row(&row, bits, &mut codes[o * rb..(o + 1) * rb]);
        }
        let mut scales = vec![0u8; rows * groups * 2];
        let mut offsets = (!symmetric).then(|| vec![0u8; rows * groups * 2]);
        for o in 0..rows {
            for g in 0..groups {
                let k = o * groups + g;
                scales[2 * k..2 * k + 2]
                    .copy_from_slice(&self.scale_bits[g * rows + o].to_le_bytes());
                if let Some(off) = &mut offsets {
                    let z = (self.zero)(g, o) as f32;
                    let v = half::f16::from_f32(-self.scales[g * rows + o] * z);
                    off[2 * k..2 * k + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        Ok(QuantTensor {
            format,
            rows,
            cols,
            group: gsize,
            codes,
            scales,
            offsets,
            tensor_scale: None,
            perm: (!identity).then_some(perm),
        })
    }
}

/// `FORMAT:G:ROWS:COLS` → its parts.
pub fn parse_descriptor(s: &str) -> Option<(QuantFormat, usize, usize, usize)> {
    let mut it = s.split(':');
    let format = QuantFormat::parse(it.next()?)?;
    let g = it.next()?.parse().ok()?;
    let rows = it.next()?.parse().ok()?;
    let cols = it.next()?.parse().ok()?;
    it.next().is_none().then_some((format, g, rows, cols))
}

/// The descriptor of a packed tensor (its `__metadata__` value).
pub fn descriptor(t: &QuantTensor) -> String {
    format!("{}:{}:{}:{}", t.format, t.group, t.rows, t.cols)
}

/// The stored parts of packed tensor `name`: (tensor name, dtype, shape, bytes).
pub fn packed_parts(name: &str, t: &QuantTensor) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let groups = t.groups_per_row();
    let mut parts = vec![
        (
            format!("{name}.codes"),
            Dtype::U8,
            vec![t.rows, t.row_bytes()],
            t.codes.clone(),
        ),
        (
            format!("{name}.scales"),
            Dtype::U8,
            vec![t.rows, groups * t.format.scale_bytes()],
            t.scales.clone(),
        ),
    ];
    if let Some(o) = &t.offsets {
        parts.push((
            format!("{name}.offsets"),
            Dtype::U8,
            vec![t.rows, groups * 2],
            o.clone(),
        ));
    }
    if let Some(s) = t.tensor_scale {
        parts.push((
            format!("{name}.tensor_scale"),
            Dtype::F32,
            vec![1],
            s.to_le_bytes().to_vec(),
        ));
    }
    if let Some(p) = &t.perm {
        let bytes = p.iter().flat_map(|v| v.to_le_bytes()).collect();
        parts.push((format!("{name}.perm"), Dtype::U32, vec![t.cols], bytes));
    }
    parts
}

impl TensorSource for CheckpointSource {
    /// Dense tensors (F32/F16/BF16) as stored; packed ones through [`CheckpointSource::packed`].
    fn get(&self, hf_name: &str) -> Result<Option<RawTensor<'_>>> {
        self.part(hf_name)?.map(|p| p.dense(hf_name)).transpose()
    }

    fn packed(&self, hf_name: &str, rows: usize, cols: usize) -> Result<Option<QuantTensor>> {
        CheckpointSource::packed(self, hf_name, rows, cols)
    }

    fn location(&self) -> &Path {
        &self.dir
    }
}

/// The tensor source of a Hugging Face folder: a [`CheckpointSource`] when config.json has a
/// `quantization_config`, else plain safetensors.
pub fn open_source(dir: &Path) -> Result<Box<dyn TensorSource>> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::format(&path, format!("invalid JSON: {e}")))?;
    match Scheme::from_config(&path, &json)? {
        Some(scheme) => Ok(Box::new(CheckpointSource::open(dir, scheme)?)),
        None => Ok(Box::new(crate::weights::SafetensorsSource::open(dir)?)),
    }
}
