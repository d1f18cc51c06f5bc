//! GGUF's quantized types as Marlin packed tensors, so GGUF files run packed.
//!
//! Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 convert losslessly: every dequantized value is bit for bit
//! what `ggml::dequantize` gives. Q4_K and Q5_K map their sub-blocks of 32 onto groups of 32
//! with the sub-block scale `d * sc` and offset `-dmin * m` rounded to f16 (near lossless); the
//! others (Q6_K, Q8_K) are requantized from their values with RTN to int8 g32. The caller gets
//! the relative RMS error of the conversion.

use crate::ggml::{self, k_scale_min, GgmlType};
use crate::packed::{pack_row, row_bytes, QuantFormat, QuantTensor};
use crate::rtn::{quantize_rtn, relative_rms};
use crate::{QuantError, Result};
use half::f16;

/// A converted tensor and how close it is to the GGML values.
pub struct Converted {
    pub tensor: QuantTensor,
    /// True when every value is bit for bit the GGML one.
    pub lossless: bool,
    /// sqrt(sum err^2 / sum value^2) over the tensor (0 when lossless).
    pub relative_rms: f64,
}

/// The Marlin format a GGML type converts to, or None for unquantized types.
pub fn target_format(ty: GgmlType) -> Option<QuantFormat> {
    Some(match ty {
        GgmlType::Q4_0 => QuantFormat::Int {
            bits: 4,
            asym: false,
        },
        GgmlType::Q4_1 | GgmlType::Q4_K => QuantFormat::Int {
            bits: 4,
            asym: true,
        },
        GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q6_K | GgmlType::Q8_K => QuantFormat::Int {
            bits: 8,
            asym: false,
        },
        GgmlType::Q5_1 | GgmlType::Q5_K => QuantFormat::Int {
            bits: 8,
            asym: true,
        },
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
    })
}

fn f16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Converts a `rows` x `cols` GGML tensor (row-major blocks) to a packed tensor.
pub fn from_ggml(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Result<Converted> {
    let format = target_format(ty)
        .ok_or_else(|| QuantError::Invalid(format!("{ty} is not a quantized type")))?;
    let row_in = ty.bytes_for(cols).ok_or_else(|| {
        QuantError::Invalid(format!(
            "a row of {cols} {ty} elements is not a whole number of {}-element blocks",
            ty.block_size()
        ))
    })?;
    if bytes.len() != rows * row_in {
        return Err(QuantError::Length {
            what: format!("{rows}x{cols} {ty} tensor"),
            expected: rows * row_in,
            found: bytes.len(),
        });
    }
    let (bits, group) = (format.bits(), 32);
    let groups = cols / group;
    let mut t = QuantTensor::zeroed(format, rows, cols, group, None)?;
    let rb = row_bytes(bits, cols);
    let mut codes = vec![0u8; cols];
    // (scale bits, offset bits) per group of the current row.
    let mut params = vec![(0u16, 0u16); groups];
    let direct = !matches!(ty, GgmlType::Q6_K | GgmlType::Q8_K);
    if !direct {
        let values = ggml::dequantize(ty, bytes, rows * cols)?;
        let tensor = quantize_rtn(&values, rows, cols, format, group)?;
        let relative_rms = relative_rms(&values, &tensor.dequantize());
        return Ok(Converted {
            tensor,
            lossless: false,
            relative_rms,
        });
    }
    for r in 0..rows {
        let src = &bytes[r * row_in..(r + 1) * row_in];
        match ty {
            GgmlType::Q8_0 => {
                for (b, blk) in src.chunks_exact(34).enumerate() {
                    params[b] = (f16_at(blk, 0), 0);
                    for j in 0..32 {
                        codes[32 * b + j] = blk[2 + j] ^ 0x80;
                    }
                }
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let bb = ty.block_bytes();
                let qs = bb - 16;
                for (b, blk) in src.chunks_exact(bb).enumerate() {
                    let m = if ty == GgmlType::Q4_1 {
                        f16_at(blk, 2)
                    } else {
                        0
                    };
                    params[b] = (f16_at(blk, 0), m);
                    for j in 0..16 {
                        codes[32 * b + j] = blk[qs + j] & 15;
                        codes[32 * b + j + 16] = blk[qs + j] >> 4;
                    }
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let bb = ty.block_bytes();
                let hq = bb - 20;
                for (b, blk) in src.chunks_exact(bb).enumerate() {
                    let qh = u32::from_le_bytes(blk[hq..hq + 4].try_into().unwrap());
                    let asym = ty == GgmlType::Q5_1;
                    params[b] = (f16_at(blk, 0), if asym { f16_at(blk, 2) } else { 0 });
                    for j in 0..16 {
                        let q = blk[hq + 4 + j];
                        let lo = (q & 15) | (((qh >> j) & 1) << 4) as u8;
                        let hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
                        // Q5_0: (q - 16) d = (c - 128) d with c = q + 112.
                        let bias = if asym { 0 } else { 112 };
                        codes[32 * b + j] = lo + bias;
                        codes[32 * b + j + 16] = hi + bias;
                    }
                }
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                let bb = ty.block_bytes();
                for (b, blk) in src.chunks_exact(bb).enumerate() {
                    let d = f16::from_bits(f16_at(blk, 0)).to_f32();
                    let dmin = f16::from_bits(f16_at(blk, 2)).to_f32();
                    let sc: &[u8; 12] = blk[4..16].try_into().unwrap();
                    for s in 0..8 {
                        let (scale, min) = k_scale_min(sc, s);
                        params[8 * b + s] = (
                            f16::from_f32(d * scale as f32).to_bits(),
                            f16::from_f32(-dmin * min as f32).to_bits(),
                        );
                    }
                    let (qh, qs) = if ty == GgmlType::Q5_K {
                        (Some(&blk[16..48]), &blk[48..])
                    } else {
                        (None, &blk[16..])
                    };
                    for c in 0..4 {
                        for l in 0..32 {
                            let q = qs[32 * c + l];
                            let (mut lo, mut hi) = (q & 15, q >> 4);
                            if let Some(qh) = qh {
                                lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                                hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                            }
                            codes[256 * b + 64 * c + l] = lo;
                            codes[256 * b + 64 * c + 32 + l] = hi;
                        }
                    }
                }
            }
            _ => unreachable!("handled above"),
        }
        pack_row(&codes, bits, &mut t.codes[r * rb..(r + 1) * rb]);
        for (g, &(s, o)) in params.iter().enumerate() {
            let i = r * groups + g;
            t.scales[2 * i..2 * i + 2].copy_from_slice(&s.to_le_bytes());
            if let Some(off) = &mut t.offsets {
                off[2 * i..2 * i + 2].copy_from_slice(&o.to_le_bytes());
            }
        }
    }
    t.validate()?;
    let lossless = !matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K);
    let relative_rms = if lossless {
        0.0
    } else {
        relative_rms(&ggml::dequantize(ty, bytes, rows * cols)?, &t.dequantize())
    };
    Ok(Converted {
        tensor: t,
        lossless,
        relative_rms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random blocks with sane f16 scales.
    fn blocks(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut out = Vec::new();
        for _ in 0..n {
            let mut b: Vec<u8> = (0..ty.block_bytes()).map(|_| next() as u8).collect();
            let h = |v: f32| f16::from_f32(v).to_le_bytes();
            let scale = (next() % 1000) as f32 / 50_000.0 + 1e-4;
            let min = -((next() % 1000) as f32) / 20_000.0;
            match ty {
                GgmlType::Q6_K => b[208..210].copy_from_slice(&h(scale)),
                GgmlType::Q4_K | GgmlType::Q5_K => {
                    b[0..2].copy_from_slice(&h(scale / 20.0));
                    b[2..4].copy_from_slice(&h(-min / 20.0));
                }
                _ => {
                    b[0..2].copy_from_slice(&h(scale));
                    if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                        b[2..4].copy_from_slice(&h(min));
                    }
                }
            }
            out.extend(b);
        }
        out
    }

    #[test]
    fn legacy_types_convert_losslessly() {
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
        ] {
            let (rows, cols) = (3, 96);
            let bytes = blocks(ty, rows * cols / 32, ty.id() as u64 + 7);
            let c = from_ggml(ty, &bytes, rows, cols).unwrap();
            assert!(c.lossless);
            let want = ggml::dequantize(ty, &bytes, rows * cols).unwrap();
            let got = c.tensor.dequantize();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{ty} element {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn k_types_convert_closely() {
        for (ty, bound) in [
            (GgmlType::Q4_K, 1e-3),
            (GgmlType::Q5_K, 1e-3),
            (GgmlType::Q6_K, 1e-2),
        ] {
            let (rows, cols) = (2, 512);
            let bytes = blocks(ty, rows * cols / 256, 3);
            let c = from_ggml(ty, &bytes, rows, cols).unwrap();
            let want = ggml::dequantize(ty, &bytes, rows * cols).unwrap();
            let err = relative_rms(&want, &c.tensor.dequantize());
            assert!((err - c.relative_rms).abs() < 1e-9);
            assert!(err < bound, "{ty}: {err}");
        }
    }
}
