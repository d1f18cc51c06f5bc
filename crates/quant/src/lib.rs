//! Weight formats: what a weight matrix looks like on the host before a backend lays it out for
//! compute. This crate knows nothing of models or devices.

pub mod convert;
pub mod dense;
pub mod ggml;
pub mod gptq;
pub mod packed;
pub mod rtn;

pub use dense::DenseFormat;
pub use packed::{QuantFormat, QuantTensor, PER_CHANNEL};
pub use rtn::{quantize_rtn, GroupParams, Quantizer};

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{what}: expected {expected} bytes, found {found}")]
    Length {
        what: String,
        expected: usize,
        found: usize,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, QuantError>;

/// A weight matrix's data: dense elements, or a packed quantized tensor.
#[derive(Debug, Clone)]
pub enum WeightData {
    /// Row-major little-endian elements.
    Dense { format: DenseFormat, bytes: Vec<u8> },
    /// Codes, scales and the rest, as `docs/format.md` lays them out.
    Quant(QuantTensor),
}

/// A row-major weight matrix of `rows` output features by `cols` input features, in a host format.
/// Backends convert it once, at load, into their compute layout.
#[derive(Debug, Clone)]
pub struct HostWeight {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

impl HostWeight {
    /// Wraps raw dense bytes after checking that their length fits the shape and format.
    pub fn new(format: DenseFormat, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        let expected = rows * cols * format.bytes_per_element();
        if data.len() != expected {
            return Err(QuantError::Length {
                what: format!("{rows}x{cols} {format} weight"),
                expected,
                found: data.len(),
            });
        }
        Ok(Self {
            rows,
            cols,
            data: WeightData::Dense {
                format,
                bytes: data,
            },
        })
    }

    /// Wraps a packed tensor after checking it.
    pub fn quant(tensor: QuantTensor) -> Result<Self> {
        tensor.validate()?;
        Ok(Self {
            rows: tensor.rows,
            cols: tensor.cols,
            data: WeightData::Quant(tensor),
        })
    }

    /// Converts f32 values into `format`.
    pub fn from_f32(format: DenseFormat, rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        Self::new(format, rows, cols, format.encode(values))
    }

    /// The matrix as f32, row-major over the input columns.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            WeightData::Dense { format, bytes } => format.decode(bytes),
            WeightData::Quant(t) => t.dequantize(),
        }
    }

    /// The dense format, or None when packed.
    pub fn dense_format(&self) -> Option<DenseFormat> {
        match &self.data {
            WeightData::Dense { format, .. } => Some(*format),
            WeightData::Quant(_) => None,
        }
    }

    /// Bytes the weight occupies in its format.
    pub fn storage_bytes(&self) -> usize {
        match &self.data {
            WeightData::Dense { bytes, .. } => bytes.len(),
            WeightData::Quant(t) => t.storage_bytes(),
        }
    }

    /// "f16", "int4-asym g32", "fp8 per channel".
    pub fn describe(&self) -> String {
        match &self.data {
            WeightData::Dense { format, .. } => format.to_string(),
            WeightData::Quant(t) if t.group == t.cols => format!("{} per channel", t.format),
            WeightData::Quant(t) => format!("{} g{}", t.format, t.group),
        }
    }
}
