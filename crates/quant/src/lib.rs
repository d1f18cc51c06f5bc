//! Weight formats: what a weight matrix looks like on the host before a backend lays it out for
//! compute. This crate knows nothing of models or devices.

pub mod dense;
pub mod ggml;

pub use dense::DenseFormat;

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

/// A row-major weight matrix of `rows` output features by `cols` input features, in a host format.
/// Backends convert it once, at load, into their compute layout.
#[derive(Debug, Clone)]
pub struct HostWeight {
    pub format: DenseFormat,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
}

impl HostWeight {
    /// Wraps raw bytes after checking that their length fits the shape and format.
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
            format,
            rows,
            cols,
            data,
        })
    }

    /// Converts f32 values into `format`.
    pub fn from_f32(format: DenseFormat, rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        Self::new(format, rows, cols, format.encode(values))
    }

    /// The matrix as f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        self.format.decode(&self.data)
    }
}
