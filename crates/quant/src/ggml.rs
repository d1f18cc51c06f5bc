//! GGML tensor element types as they appear in GGUF files, and their decoding to f32.
//!
//! Quantized types store fixed-size blocks; every block is self-contained (it carries its own
//! scales), so a row, or any run of whole blocks, can be decoded on its own. All multi-byte fields
//! are little-endian.
//!
//! Block layouts, byte by byte (`d`, `m`, `dmin` are f16 unless noted):
//!
//! * `Q4_0`, 32 elements in 18 bytes: `d` (2), then 16 bytes of nibbles. Byte `j` holds element
//!   `j` in its low nibble and element `j + 16` in its high nibble; value `(q - 8) * d`.
//! * `Q4_1`, 32 elements in 20 bytes: `d` (2), `m` (2), then 16 nibble bytes laid out as in
//!   `Q4_0`; value `q * d + m`.
//! * `Q5_0`, 32 elements in 22 bytes: `d` (2), `qh` (4, a u32 whose bit `j` is the fifth bit of
//!   element `j`), then 16 nibble bytes as in `Q4_0`; value `(q - 16) * d`.
//! * `Q5_1`, 32 elements in 24 bytes: `d` (2), `m` (2), `qh` (4), 16 nibble bytes; value
//!   `q * d + m`.
//! * `Q8_0`, 32 elements in 34 bytes: `d` (2), then 32 i8; value `q * d`.
//! * `Q4_K`, 256 elements in 144 bytes: `d` (2), `dmin` (2), 12 bytes of packed 6-bit sub-block
//!   scales and mins (see [`k_scale_min`]), then 128 nibble bytes. The super-block is eight
//!   sub-blocks of 32; bytes `32c..32c + 32` hold sub-block `2c` in their low nibbles and `2c + 1`
//!   in their high nibbles. Value `d * scale[s] * q - dmin * min[s]`.
//! * `Q5_K`, 256 elements in 176 bytes: `d` (2), `dmin` (2), 12 scale/min bytes as in `Q4_K`, 32
//!   `qh` bytes, 128 nibble bytes laid out as in `Q4_K`. Bit `s` of `qh[i]` is the fifth bit of
//!   element `i` of sub-block `s`. Value `d * scale[s] * q - dmin * min[s]`.
//! * `Q6_K`, 256 elements in 210 bytes: 128 `ql` bytes (low 4 bits), 64 `qh` bytes (high 2 bits),
//!   16 i8 scales (one per 16 elements), then `d` (2). Each half of 128 elements uses 64 `ql` and
//!   32 `qh` bytes: for `l` in `0..32`, elements `l`, `l + 32`, `l + 64`, `l + 96` take the low
//!   nibble of `ql[l]`, the low nibble of `ql[l + 32]`, the high nibble of `ql[l]` and the high
//!   nibble of `ql[l + 32]`, and bits 0-1, 2-3, 4-5, 6-7 of `qh[l]` as their top two bits. Value
//!   `d * scale[e / 16] * (q - 32)`.
//! * `Q8_K`, 256 elements in 292 bytes: `d` (4, f32), 256 i8, then 16 i16 block sums that only
//!   dot-product kernels use; value `q * d`.

use crate::{QuantError, Result};
use half::{bf16, f16};
use std::fmt;

/// A tensor element type, numbered as in GGUF's tensor-info table.
// GGML's own spellings (Q4_K, not Q4K), so names match every file, tool and paper.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
}

impl GgmlType {
    pub const ALL: [GgmlType; 12] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
    ];

    /// The type for a GGUF type id, or `None` for ids this crate cannot decode (including valid
    /// GGML types such as Q2_K or the IQ family), so loaders can report them by number.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
        }
    }

    /// Elements per block; 1 for the unquantized types.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::Q8_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
            GgmlType::Q8_K => 292,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes needed for `n_elements`, or `None` if that is not a whole number of blocks or the
    /// size overflows.
    pub fn bytes_for(self, n_elements: usize) -> Option<usize> {
        if !n_elements.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.block_bytes())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Elements in a K-quant super-block.
pub const QK_K: usize = 256;

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Decodes `n_elements` values of type `ty` from `bytes`, which must hold exactly that many.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    let mut out = vec![0.0; n_elements];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// Decodes into `out`, whose length gives the element count; `bytes` must hold exactly that many
/// elements. Lets callers decode one row at a time into a reused buffer.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let n = out.len();
    let expected = ty.bytes_for(n).ok_or_else(|| {
        QuantError::Invalid(format!(
            "{n} {ty} elements are not a whole number of {}-element blocks",
            ty.block_size()
        ))
    })?;
    if bytes.len() != expected {
        return Err(QuantError::Length {
            what: format!("{n} {ty} elements"),
            expected,
            found: bytes.len(),
        });
    }
    match ty {
        GgmlType::F32 => decode_blocks(bytes, out, |b: &[u8; 4], o: &mut [f32; 1]| {
            o[0] = f32::from_le_bytes(*b)
        }),
        GgmlType::F16 => decode_blocks(bytes, out, |b: &[u8; 2], o: &mut [f32; 1]| {
            o[0] = f16::from_le_bytes(*b).to_f32()
        }),
        GgmlType::BF16 => decode_blocks(bytes, out, |b: &[u8; 2], o: &mut [f32; 1]| {
            o[0] = bf16::from_le_bytes(*b).to_f32()
        }),
        GgmlType::Q4_0 => decode_blocks(bytes, out, dequantize_q4_0),
        GgmlType::Q4_1 => decode_blocks(bytes, out, dequantize_q4_1),
        GgmlType::Q5_0 => decode_blocks(bytes, out, dequantize_q5_0),
        GgmlType::Q5_1 => decode_blocks(bytes, out, dequantize_q5_1),
        GgmlType::Q8_0 => decode_blocks(bytes, out, dequantize_q8_0),
        GgmlType::Q4_K => decode_blocks(bytes, out, dequantize_q4_k),
        GgmlType::Q5_K => decode_blocks(bytes, out, dequantize_q5_k),
        GgmlType::Q6_K => decode_blocks(bytes, out, dequantize_q6_k),
        GgmlType::Q8_K => decode_blocks(bytes, out, dequantize_q8_k),
    }
    Ok(())
}

/// Runs a one-block decoder over matching chunks; lengths were checked by the caller, so the
/// array conversions cannot fail.
fn decode_blocks<const B: usize, const N: usize>(
    bytes: &[u8],
    out: &mut [f32],
    block: impl Fn(&[u8; B], &mut [f32; N]),
) {
    for (b, o) in bytes.chunks_exact(B).zip(out.chunks_exact_mut(N)) {
        block(b.try_into().unwrap(), o.try_into().unwrap());
    }
}

pub fn dequantize_q4_0(block: &[u8; 18], out: &mut [f32; 32]) {
    let d = f16_at(block, 0);
    for (j, &q) in block[2..].iter().enumerate() {
        out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

pub fn dequantize_q4_1(block: &[u8; 20], out: &mut [f32; 32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    for (j, &q) in block[4..].iter().enumerate() {
        out[j] = (q & 0x0f) as f32 * d + m;
        out[j + 16] = (q >> 4) as f32 * d + m;
    }
}

pub fn dequantize_q5_0(block: &[u8; 22], out: &mut [f32; 32]) {
    let d = f16_at(block, 0);
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    for (j, &q) in block[6..].iter().enumerate() {
        let lo = (q & 0x0f) as u32 | ((qh >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        out[j] = (lo as i32 - 16) as f32 * d;
        out[j + 16] = (hi as i32 - 16) as f32 * d;
    }
}

pub fn dequantize_q5_1(block: &[u8; 24], out: &mut [f32; 32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
    for (j, &q) in block[8..].iter().enumerate() {
        let lo = (q & 0x0f) as u32 | ((qh >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        out[j] = lo as f32 * d + m;
        out[j + 16] = hi as f32 * d + m;
    }
}

pub fn dequantize_q8_0(block: &[u8; 34], out: &mut [f32; 32]) {
    let d = f16_at(block, 0);
    for (o, &q) in out.iter_mut().zip(&block[2..]) {
        *o = q as i8 as f32 * d;
    }
}

/// Scale and min of sub-block `s` (0..8) from the 12 packed bytes of a `Q4_K`/`Q5_K` block.
/// Sub-blocks 0..4 keep their 6-bit scale and min in the low 6 bits of bytes `s` and `s + 4`.
/// Sub-blocks 4..8 keep their low 4 bits in the nibbles of byte `s + 4` (scale low, min high)
/// and their top 2 bits in the spare top bits of bytes `s - 4` (scale) and `s` (min).
pub fn k_scale_min(scales: &[u8; 12], s: usize) -> (u8, u8) {
    if s < 4 {
        (scales[s] & 63, scales[s + 4] & 63)
    } else {
        (
            (scales[s + 4] & 0x0f) | ((scales[s - 4] >> 6) << 4),
            (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4),
        )
    }
}

pub fn dequantize_q4_k(block: &[u8; 144], out: &mut [f32; QK_K]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let scales: &[u8; 12] = block[4..16].try_into().unwrap();
    let qs = &block[16..];
    for c in 0..4 {
        let (sc0, m0) = k_scale_min(scales, 2 * c);
        let (sc1, m1) = k_scale_min(scales, 2 * c + 1);
        let (d0, min0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        for (l, &q) in qs[32 * c..32 * c + 32].iter().enumerate() {
            out[64 * c + l] = d0 * (q & 0x0f) as f32 - min0;
            out[64 * c + 32 + l] = d1 * (q >> 4) as f32 - min1;
        }
    }
}

pub fn dequantize_q5_k(block: &[u8; 176], out: &mut [f32; QK_K]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let scales: &[u8; 12] = block[4..16].try_into().unwrap();
    let qh = &block[16..48];
    let qs = &block[48..];
    for c in 0..4 {
        let (sc0, m0) = k_scale_min(scales, 2 * c);
        let (sc1, m1) = k_scale_min(scales, 2 * c + 1);
        let (d0, min0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        for l in 0..32 {
            let q = qs[32 * c + l];
            let lo = (q & 0x0f) | ((qh[l] >> (2 * c)) & 1) << 4;
            let hi = (q >> 4) | ((qh[l] >> (2 * c + 1)) & 1) << 4;
            out[64 * c + l] = d0 * lo as f32 - min0;
            out[64 * c + 32 + l] = d1 * hi as f32 - min1;
        }
    }
}

pub fn dequantize_q6_k(block: &[u8; 210], out: &mut [f32; QK_K]) {
    let d = f16_at(block, 208);
    for half in 0..2 {
        let ql = &block[64 * half..64 * half + 64];
        let qh = &block[128 + 32 * half..128 + 32 * half + 32];
        let sc = &block[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0x0f) | (qh[l] & 3) << 4,
                (ql[l + 32] & 0x0f) | ((qh[l] >> 2) & 3) << 4,
                (ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4,
                (ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4,
            ];
            for (k, q) in q.into_iter().enumerate() {
                let scale = sc[is + 2 * k] as i8 as f32;
                y[l + 32 * k] = d * scale * (q as i32 - 32) as f32;
            }
        }
    }
}

pub fn dequantize_q8_k(block: &[u8; 292], out: &mut [f32; QK_K]) {
    let d = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    for (o, &q) in out.iter_mut().zip(&block[4..4 + QK_K]) {
        *o = q as i8 as f32 * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn ids_round_trip_and_unknown_ids_are_rejected() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        }
        assert_eq!(GgmlType::from_id(30), Some(GgmlType::BF16));
        for unsupported in [4, 5, 9, 10, 11, 16, 23, 29, 31, 1000] {
            assert_eq!(GgmlType::from_id(unsupported), None, "{unsupported}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(GgmlType::Q4_0.bytes_for(64), Some(36));
        assert_eq!(GgmlType::Q4_0.bytes_for(48), None);
        assert_eq!(GgmlType::Q6_K.bytes_for(512), Some(420));
        assert_eq!(GgmlType::F16.bytes_for(3), Some(6));
        assert_eq!(GgmlType::Q8_0.bytes_for(usize::MAX - 31), None);
    }

    #[test]
    fn lengths_are_checked() {
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0; 33], 32),
            Err(QuantError::Length {
                expected: 34,
                found: 33,
                ..
            })
        ));
        assert!(matches!(
            dequantize(GgmlType::Q4_K, &[0; 144], 128),
            Err(QuantError::Invalid(_))
        ));
        assert!(dequantize(GgmlType::F32, &[], 0).unwrap().is_empty());
    }

    #[test]
    fn dense_types() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&1.5f32.to_le_bytes());
        bytes.extend_from_slice(&(-2.25f32).to_le_bytes());
        assert_eq!(dequantize(GgmlType::F32, &bytes, 2).unwrap(), [1.5, -2.25]);
        let bytes = [h(0.5), h(-3.0)].concat();
        assert_eq!(dequantize(GgmlType::F16, &bytes, 2).unwrap(), [0.5, -3.0]);
        let bytes = [
            bf16::from_f32(-0.75).to_le_bytes(),
            bf16::from_f32(8.0).to_le_bytes(),
        ]
        .concat();
        assert_eq!(dequantize(GgmlType::BF16, &bytes, 2).unwrap(), [-0.75, 8.0]);
    }

    #[test]
    fn q8_0_hand_made() {
        let mut block = h(0.5).to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let out = dequantize(GgmlType::Q8_0, &block, 32).unwrap();
        let expected: Vec<f32> = (0..32).map(|i| (i - 16) as f32 * 0.5).collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn q4_0_low_nibbles_first_then_high() {
        let mut block = h(2.0).to_vec();
        // Byte j: low nibble j (element j), high nibble 15 - j (element j + 16).
        block.extend((0..16u8).map(|j| j | (15 - j) << 4));
        let out = dequantize(GgmlType::Q4_0, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 2.0, "element {j}");
            assert_eq!(out[j + 16], (7.0 - j as f32) * 2.0, "element {}", j + 16);
        }
    }

    #[test]
    fn q4_1_adds_the_min() {
        let mut block = [h(0.25), h(-1.0)].concat();
        block.extend((0..16u8).map(|j| j | (15 - j) << 4));
        let out = dequantize(GgmlType::Q4_1, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.25 - 1.0);
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q5_0_fifth_bits_come_from_qh() {
        let mut block = h(1.0).to_vec();
        // Fifth bit set for elements 1 and 17 only; all nibbles 3.
        block.extend_from_slice(&(1u32 << 1 | 1 << 17).to_le_bytes());
        block.extend([0x33u8; 16]);
        let out = dequantize(GgmlType::Q5_0, &block, 32).unwrap();
        for (e, v) in out.iter().enumerate() {
            let q = if e == 1 || e == 17 { 19.0 } else { 3.0 };
            assert_eq!(*v, q - 16.0, "element {e}");
        }
    }

    #[test]
    fn q8_k_hand_made() {
        let mut block = 0.125f32.to_le_bytes().to_vec();
        block.extend((0..256).map(|i| (i as u8).wrapping_sub(128)));
        block.extend([0u8; 32]);
        let out = dequantize(GgmlType::Q8_K, &block, 256).unwrap();
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, ((i as u8).wrapping_sub(128) as i8) as f32 * 0.125);
        }
    }

    #[test]
    fn k_scale_min_unpacks_six_bit_fields() {
        // Scales s and mins m for sub-blocks 0..8, packed as the layout describes.
        let sc = [1u8, 62, 33, 7, 45, 2, 63, 17];
        let mn = [60u8, 3, 20, 41, 9, 58, 31, 48];
        let mut packed = [0u8; 12];
        for s in 0..4 {
            packed[s] = sc[s] | (sc[s + 4] >> 4) << 6;
            packed[s + 4] = mn[s] | (mn[s + 4] >> 4) << 6;
            packed[s + 8] = (sc[s + 4] & 15) | (mn[s + 4] & 15) << 4;
        }
        for s in 0..8 {
            assert_eq!(k_scale_min(&packed, s), (sc[s], mn[s]), "sub-block {s}");
        }
    }

    /// Blocks of random bytes (with sane scales) and their values as decoded by the Python `gguf`
    /// package (`gguf.quants.dequantize`), both as little-endian hex.
    const Q4_0_BLOCK: &str = "4c22e5f1a94106a0956a26afbccdafe562f9";
    const Q4_0_EXPECTED: &str = "\
        002017bd0050b0bd0080493c0050b0bd0080c9bc0080c9bd002017bd0080c93c0080c9bc0050b03d0080493d\
        00e07b3d0050b03d002017bd002097bd0080493c0020973d0050b03d0080c93c008049bd0080c9bd0080c93c\
        0080493c0080c9bc002097bd0080c93c0020173d0080493d0080c93c0020973d0080c9bc0050b03d";
    const Q4_1_BLOCK: &str = "f02752b442276ad5ab2da7394551370e99b2d74c";
    const Q4_1_EXPECTED: &str = "\
        000055be000059bd0000243d0080ebbd0080913d0040083e000059bd0000143c0080ebbd00c074be000059bd\
        0000283e0000143c000055be000059bd0000d13d008015be000055be0000acbd0040083e0000243d000055be\
        0000243d004035be008015be0080ebbd004035be00408abe0000143c0080913d0040083e008015be";
    const Q5_0_BLOCK: &str = "e31ffa48d732a1df70aca1e926115901dd06f27f8f06";
    const Q5_0_EXPECTED: &str = "\
        009aecbd009aec3d0060fcbd0048bd3d0060fc3b00f68d3d00483d3d0060fc3b00d45cbd009aecbd0048bdbc\
        00483d3d00d4dcbd0060fcbb009aec3d00bc9dbd00bc9d3d000ecd3d00d45c3d00483dbd00bc9d3d00607cbc\
        00607c3c0060fc3b0082adbd000000000048bdbc0060fcbd009aec3d00d45c3d00607cbd0060fcbd";
    const Q5_1_BLOCK: &str = "dd2400b8f9bd0ccc21397c1ec795ca7748dc03d17a88934d";
    const Q5_1_EXPECTED: &str = "\
        004c35be0076a8be00488bbe00308f3d002881bd00f8cebd0000c7bb002881bd008034bd00488bbe00640ebe\
        004c35be0000c7bb008034bd00d2e2be0090503d008cecbe00d2e2be002881bd004c35be00488bbe0076a8be\
        00488bbe00eabbbe0018d9be008e81be00c048be0090503d00eabbbe0030b2be0060cdbc00e0f5bd";
    const Q8_0_BLOCK: &str = "4d1c7357a2e64647f03e2fb81f223f4192c58efd5185f0711ef7677a1f132a818d88";
    const Q8_0_EXPECTED: &str = "\
        804bf73e8015bb3e0023cabe00a4dfbd0087963e80ad983e00a089bd0053853e00234a3e00d49abe0053053e\
        003a123e8079873e80c68b3e008becbe00bf7dbe0025f5be00704ebc802eae3ec03f04bf00a089bd80fef23e\
        0006013e00d41abd807ddd3e802c033f0053053e006ea33d00a2343ec08c08bf804bf7be000601bf";
    const Q4_K_BLOCK: &str = "\
        4d1804236b236b82481bd9fe630dc3ce3be4ebcab72f45b35223479f6e794d57037e2cfde9e15a7789781e37\
        21a557d8e5a703296dcb81db3f65cf9c1bdc5d1d8fc83f0b0bb4db71be572209851d3d24f4c0cf83fe4363f8\
        2f4759778955f6ced681cbea7179ced2c8f814a13472ff70ce369d8385452a44f318337f08cd1e614f235d3f\
        83bc45fee9ee0403a79be118";
    const Q4_K_EXPECTED: &str = "\
        a038623f00cf803ea038623fc01a4b3f20c1053f10589f3fc00aaf3e8026253e005e913d8026253e20c1053f\
        10589f3f20c9933fe0fc333f303a883f20c1053f8026253e20c9933f8056793f303a883fe0fc333f00449ebc\
        c01a4b3f20c1053fe0fc333f00df1c3f20c9933f20c1053f00449ebcc00aaf3e20c1053f00df1c3f800d19be\
        40b6283f40b6283f8014033f4087e03e005164be00949bbd4087e03e00a021bb005164be00949bbdc043953e\
        007a913d8000143e00949bbd00a021bb006cbdbe8000143e005164be20873b3f40b6283f40b6283f00a021bb\
        8000143e00445f3e8000143e40ca97be800d19be005164be80e5ba3e00a021bb60e5153f001bdf3d403e943e\
        00c392bdc0b5f03e60d2543fa096263f402881bea096263f1087813f001bdf3d1087813f80b43d3fa096263f\
        80b43d3f60d2543f60d2543f1087813f007ac23e1087813fa096263fa096263f00b0983ca096263f402881be\
        40f06b3f403e943e00d925bec0b5f03e001bdf3d60d2543f60d2543f00b0983c806e4abf80bb4ebf007c59bf\
        805557bf800853bf00954cbf00e250bfc0814bbf404256bf800853bf00954cbfc0ce4fbfc06858bfc0814bbf\
        c01b54bfc06858bf00e250bf00954cbf404256bf007c59bf007c59bf40a84dbfc0814bbf40f551bf40a84dbf\
        c01b54bf805557bf007c59bf00e250bfc06858bf404256bf805557bf004211be00589abe4016983e801d3abe\
        80a8833e801d3abe801d3abe0060913c4016983e007cb5bc001e6c3d007cb5bc001e6c3d00cdd0bd002c7ebd\
        80a8833e002c7ebd40ea85be80be0c3e00c6c73d40ea85be001e6c3d80a8833e00f962be0060913c0060913c\
        004211be40ea85be004211be00f962be4016983e00589abec0a9d13e00bba73e00bba73e00a45f3ec0a9d13e\
        00a4df3d00bb273ec0a9d13e00a45f3d00a4df3d80c60b3e80af433e00a45f3e80c60b3ec0a9d13e00bba73e\
        40b5b53e00a45f3e00bba73e80afc33e80af433e80af433e00bba73e40b5b53e00bba73ec0a9d13e00a4df3c\
        80c68b3e00bba73d80af433ec0a9d13e80af433e80ef86bec02e15bf405d9bbe60d333bfa0651fbfa0651fbf\
        80a6d8be809c29bf60d333bf00c100bf60d333bf800365be00c100bf405d9bbe80ef86be204148bf800365be\
        60d333bf405d9bbe800365be60d333bf00cbafbea0651fbf80ef86be4014edbe80ef86be809c29bf60d333bf\
        e0f70abfc038c4be204148bf00c100bf0092ac3ec04708bf008c413d00204abd00204abd001adfbe800221bf\
        001adfbe4079203f40bd39bfc04708bf007315be007852bf0092ac3e40bd39bf005e78be001adfbe800221bf\
        80a4adbec04708bf00204abd0039763e001adfbe4079203f80be073f80be073f007852bf007852bf004e133e\
        008c413d80be073f40bd39bf";
    const Q5_K_BLOCK: &str = "\
        8114c3207c9311f85e0429b19f7ec0e156f65a3322e791b880ee995e3f0d307d2fbaf400693a179e0d027ed4\
        e58be7a9ebc28a271d43a78855638144eb6603f7b2725de11fe6ac2f88a68182869793f0aad6ded8116e3ab5\
        1681c4a374fec70a68b3e4bdc92b387987416c17ec90963ec766888ab4b80eba7c5cfd81121bea9cee1810df\
        d5169faf26cd7b5c30c8aba44d972299e8c7b41b9a1d2b0f180600a974d63b6332202c998e82b2522c49c439";
    const Q5_K_EXPECTED: &str = "\
        80b8e43e009616be00f1c23ea0849e3fc023143f407a793fa0849e3f00c47e3e005c503d000ea6bdc0b2573f\
        008077bc204cc03fc012963f000ea6bda0849e3f8096683f009616bec023143f00255abea013e23f004cef3d\
        00bec83f40eb353f80f6a63f004cef3d00255abe009616bec012963fa0849e3f407a793f00cf463fa0ed163f\
        403b0c3f00aded3ec07ead3e60cca23e80e3c23e80d72f3e000e053e80bf893d4048d83e000e053e80e3c23e\
        a0ed163f0089b43d006018bda0678d3e10e2063fa0fae23e80bf893d40b5823e009a85bca0ed163fe088013f\
        c07ead3e000e053ee088013f00aded3e000e053e000e053e605ff83e605ff83ea0678d3e0071d63d003cf53c\
        00f5f4bd00546dbee0a8b9be80c9373e800b47be606093be40ce89be801b82bd80f29cbe002ad6bc0020f4bb\
        80c9373e203c80be0071d63d00e0893da084a6be0020f4bbc09e0dbec02f5abe40e733be00e0893d8028b03d\
        002f473de0a8b9be0081113e002f473d0081113e003bc3be003cf53c00f5f4bd00e6233e0088b03e003eaa3f\
        0088b03e00ccc9be00a4b0bd00be8abe807a9a3f00ccc9be40d5823f405ca23fc098923f00e7753f8001ba3f\
        0001913e808e073f8023663f807a9a3f000fd03e00f4623e405ca23f8015273f00be8abe00e7753f40d5823f\
        006e56be8023663f00ccc9be000fd03e00b78a3f00b0c93d00d9363f102f0d3f2075043f00e9153fe05c273f\
        00eec4bd00a0243da0444a3fe05c273f00c7343e00c7343eb08a413fe0a6b13ec01ac33e40df113ee05c273f\
        c0d0383f80967a3e00e9153f0033a03e20bf8e3e003d7ebd2075043f90fe523f90fe523f003ce5bcc0ae573e\
        d016303fc0d0383f00166ebe00a0243d40df113e00eec4bd00b80a3f601a863f00d9ad3e400d933f9079a63f\
        9079a63f005485bd9079a63f40f3933ee0417f3fa090313f00d9ad3e60764b3f00e86dbce0e5b93fb086993f\
        e0e5b93f60764b3f60764b3fe0aa173f706cb33f60764b3fc0bec73e80a4e13e00b4133d00b80a3fd0938c3f\
        804f403e205c653f00b80a3f2000a03f2000a03f0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd\
        0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd\
        0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd0090e4bd\
        0090e4bd0090e4bd0090e4bd0090e4bd006359be904f6b3fc0dda3be00e9693dc02ba73e60588a3fd872833f\
        20eef93e904f6b3f20eef93e20c20a3f000adbbee073bfbe000adbbe000adbbe004de33d00794fbde83d913f\
        308d183f0015d6bda04788bec0dda3bec0dda3be904f6b3f0080533b0080533bc0d2283e5023343f20c20a3f\
        4058263f60588a3f308d183f";
    const Q6_K_BLOCK: &str = "\
        4c7d73265b6aaf61b288fbd0aecfa766616223611e764c93aa388ffabd0a6a6412b209971e2d827076f7e49a\
        b8fa197271be53a3442b128cdad72bad0f8aeef42a0b9a26d74fc78f2562b8701097a55b5510543d27ed600d\
        e3200a6749307fd37899c118819af6674394c3f7aa5f93f32c810a37ca7bf1013ccdf8ab8ab4a6039954e84c\
        be3b3f7f1183c3df8375c517b4e786a9aadf7488f892b12191387ad86aca56d8531c927b931fe8f16e795b9b\
        331767e712dbe8f5331dd9917f01e64710dd3c25f4d21690a049453135550ec0ff10";
    const Q6_K_EXPECTED: &str = "\
        00e01fbd00da3dbe00e390be00e681be00d4db3d00e6813e00e19a3e00de293e00e40bbe00d06f3e00e5863e\
        00e01f3e00e2953e00e01fbc00dcb3bd00d45b3e1866293fa0b8c4bec02583bd30efa33e600199bee06ff0be\
        4094da3e48781e3fe06ff03e00dd2ebe00ddae3cc025033ec025833de06ff03e40945abe6001193f00e2953d\
        c02503bf409ea83ee074573fe0838c3f408ff33e409e283f00e2153f408f73bf20316abfc02583bf408f733f\
        00d360bf00d360bec02583bec02503bf504dadbe00db38bdf03196be40a48a3d00dbb83dc8f81b3fa0bfa1be\
        40a48a3ec011673e186b10bf709ff2be1084dbbeb068c4bec011673ea0bfa13e00dbb83d00dcb33d00e5863d\
        00d651bd00d3603e80601dbe00df24be00d942be00df24be00e2153d00dc333e00cdfe3d00dcb33c00df243e\
        00d651be00df243e00e2953d60001ebf805d2cbee074573f805d2cbe00d2e5bc2046813e40a30fbff02e253f\
        a0ba3abfa0baba3e805d2cbfe074d7be40a30f3e00d2e5be60001ebf40a38f3e00d45b3c806489bd00d45b3e\
        8059c0bd00d45b3cc016cebe00dfa4be804ef7bda0bdabbec0164e3ec016ce3ea0bdab3ec021173e00d45bbc\
        4091693ea0bdabbe00cff4bec010ecbf00ddaebe00dd2ebf00e48bbe80609dbfc025833f00e40bbf408dfdbf\
        805263bf00e40bbe8059c03f0000008000d6d13f00e40b3ee08407c000e215bf00df24bf00e215bf00d9c23f\
        805dacbf00cd7e3f00d6d1be8051e8bf80609dbf00e586bf00dcb33f00d06f3f0000008000e5063f80609dbf\
        8057cabf18586f3f805b363f60f2633fec42a53f10909f3eec42a53f805bb6bfa0c408bea88c583f805b36bf\
        a0c488bef026cdbe7c778e3f805b36bfc8f52a3fa88c583f805dac3e30e9c13ea89721bf805dac3e94faa6bf\
        f80b8c3ff80b8cbfd0d1963ebc349cbfe074573f2046013e0ca986bff80b8c3fa897213f2046013e2046013e\
        600119bf1082e5be409b37be70b489be504e28bf504ea83e00cff43c1082e5be600119bf98db5d3f00cf743e\
        d8a720bf30e8463f203556bf600199be30e8c6be8065843d806584bfa0b167bea0b1e7be4098c6bd4098c6be\
        806504be4098463fa0b1e7bee07ea5be900bb63ee8513e3f8065043d98de4e3f409846be900bb6be1c588b3f\
        281047bf70b5843e20401f3ed0ca39bf8055d4bd20409f3e8055543f2810c73fd0ca39bf805554bf70b504bf\
        70b5843f7c6dc0bfd0cab93e88257cbf80609dbd40945a3e00e40bbd40a2143e00e48bbdc01749bec025033e\
        00ddaebd00e40b3dc01749be00cf743ee084873e00d651bd8059c0bd00cf74bdc025033e00e2953f00d06f3f\
        00e01f3f00da3dbf00d8473f00d265bf00e19abf00e01fbf00e3903f00d8473f00e19abf00d8c7be00e09f3e\
        00d6513f00e681bf00e01f3f";

    #[test]
    fn matches_the_gguf_python_package() {
        let cases = [
            (GgmlType::Q4_0, Q4_0_BLOCK, Q4_0_EXPECTED),
            (GgmlType::Q4_1, Q4_1_BLOCK, Q4_1_EXPECTED),
            (GgmlType::Q5_0, Q5_0_BLOCK, Q5_0_EXPECTED),
            (GgmlType::Q5_1, Q5_1_BLOCK, Q5_1_EXPECTED),
            (GgmlType::Q8_0, Q8_0_BLOCK, Q8_0_EXPECTED),
            (GgmlType::Q4_K, Q4_K_BLOCK, Q4_K_EXPECTED),
            (GgmlType::Q5_K, Q5_K_BLOCK, Q5_K_EXPECTED),
            (GgmlType::Q6_K, Q6_K_BLOCK, Q6_K_EXPECTED),
        ];
        for (ty, block, expected) in cases {
            let block = unhex(block);
            assert_eq!(block.len(), ty.block_bytes(), "{ty}");
            let expected: Vec<f32> = unhex(expected)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(expected.len(), ty.block_size(), "{ty}");
            // Two copies check that blocks are decoded independently and in order.
            let two = [block.clone(), block].concat();
            let out = dequantize(ty, &two, 2 * ty.block_size()).unwrap();
            for (i, (got, want)) in out.iter().zip(expected.iter().cycle()).enumerate() {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{ty} element {i}: {got} vs {want}"
                );
            }
        }
    }
}
