//! Unquantized element formats: f32, f16 and bf16, little-endian.

use half::{bf16, f16};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenseFormat {
    F32,
    F16,
    BF16,
}

impl DenseFormat {
    pub const ALL: [DenseFormat; 3] = [DenseFormat::F32, DenseFormat::F16, DenseFormat::BF16];

    pub fn bytes_per_element(self) -> usize {
        match self {
            DenseFormat::F32 => 4,
            DenseFormat::F16 | DenseFormat::BF16 => 2,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DenseFormat::F32),
            "f16" | "float16" | "half" => Some(DenseFormat::F16),
            "bf16" | "bfloat16" => Some(DenseFormat::BF16),
            _ => None,
        }
    }

    /// Encodes f32 values, rounding to nearest even.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.bytes_per_element());
        match self {
            DenseFormat::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            DenseFormat::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            DenseFormat::BF16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        }
        out
    }

    /// Decodes little-endian bytes; a trailing partial element is ignored (callers check lengths).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            DenseFormat::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DenseFormat::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DenseFormat::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

impl fmt::Display for DenseFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenseFormat::F32 => "f32",
            DenseFormat::F16 => "f16",
            DenseFormat::BF16 => "bf16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact_for_representable_values() {
        let values = [0.0f32, -1.5, 2.0, 0.25, -256.0];
        for format in DenseFormat::ALL {
            assert_eq!(format.decode(&format.encode(&values)), values, "{format}");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest() {
        let v = 1.0f32 + 1.0 / 256.0 + 1.0 / 1024.0;
        let back = DenseFormat::BF16.decode(&DenseFormat::BF16.encode(&[v]))[0];
        assert_eq!(back, 1.0 + 1.0 / 128.0);
    }
}
