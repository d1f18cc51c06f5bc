//! Marlin's own packed formats: integer (2, 3, 4, 8 bit, symmetric or asymmetric), FP8 (E4M3) and
//! FP4 (E2M1 with f16, E8M0 or E4M3 block scales). `docs/format.md` specifies every byte.
//!
//! A [`QuantTensor`] is `rows` output features by `cols` stored columns. Each row is cut into
//! groups of `group` consecutive columns sharing one scale (and, for asymmetric integers, one
//! offset). Codes are packed row by row, each row starting on a byte boundary. The value of a code
//! is defined in f32 arithmetic, exactly, so every kernel and every reference produces the same
//! bits:
//!
//! * `int{b}` symmetric: `(c - 2^(b-1)) * s`, codes `0..2^b`, `s` an f16 scale (may be negative).
//! * `int{b}` asymmetric: `c * s + o` with f16 `s` and `o` (`c * s` is exact in f32, so this is
//!   one rounding, and equal to `fma(c, s, o)`). A zero point z is the case `o = -s * z`.
//! * `fp8`: `e4m3(c) * s`, f16 `s` (exact).
//! * `fp4`: `e2m1(c) * s`, f16 `s` (exact).
//! * `mxfp4`: `e2m1(c) * 2^(e - 127)` with an E8M0 byte `e` per 32 columns (exact).
//! * `nvfp4`: `e2m1(c) * (e4m3(b) * t)`: the E4M3 byte `b` of each 16 columns times the f32
//!   tensor scale `t`, rounded to f32 once, then the product rounded once.

use crate::{QuantError, Result};
use half::f16;
use std::fmt;

/// A packed weight format. `Int { bits, asym }` covers int8/int4/int3/int2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    Int { bits: u8, asym: bool },
    Fp8,
    Fp4,
    Mxfp4,
    Nvfp4,
}

/// `group` value meaning one group per row (per output channel) when asked for on the CLI/API.
pub const PER_CHANNEL: usize = 0;
/// Group sizes a row may fall back on, largest first.
pub const GROUP_SIZES: [usize; 3] = [128, 64, 32];

impl QuantFormat {
    pub const ALL: [QuantFormat; 12] = [
        QuantFormat::Int {
            bits: 8,
            asym: false,
        },
        QuantFormat::Int {
            bits: 8,
            asym: true,
        },
        QuantFormat::Int {
            bits: 4,
            asym: false,
        },
        QuantFormat::Int {
            bits: 4,
            asym: true,
        },
        QuantFormat::Int {
            bits: 3,
            asym: false,
        },
        QuantFormat::Int {
            bits: 3,
            asym: true,
        },
        QuantFormat::Int {
            bits: 2,
            asym: false,
        },
        QuantFormat::Int {
            bits: 2,
            asym: true,
        },
        QuantFormat::Fp8,
        QuantFormat::Fp4,
        QuantFormat::Mxfp4,
        QuantFormat::Nvfp4,
    ];

    /// `int8`, `int4`, `int3`, `int2` (optionally with `-asym`), `fp8`, `fp4`, `mxfp4`, `nvfp4`.
    pub fn parse(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        let (base, asym) = match name.strip_suffix("-asym") {
            Some(b) => (b, true),
            None => (name.as_str(), false),
        };
        let f = match base {
            "int8" | "i8" => QuantFormat::Int { bits: 8, asym },
            "int4" | "i4" => QuantFormat::Int { bits: 4, asym },
            "int3" | "i3" => QuantFormat::Int { bits: 3, asym },
            "int2" | "i2" => QuantFormat::Int { bits: 2, asym },
            "fp8" | "e4m3" if !asym => QuantFormat::Fp8,
            "fp4" | "e2m1" if !asym => QuantFormat::Fp4,
            "mxfp4" if !asym => QuantFormat::Mxfp4,
            "nvfp4" if !asym => QuantFormat::Nvfp4,
            _ => return None,
        };
        Some(f)
    }

    /// The same format with an offset per group; an error for formats that have none.
    pub fn with_asym(self, asym: bool) -> Result<Self> {
        match self {
            QuantFormat::Int { bits, .. } => Ok(QuantFormat::Int { bits, asym }),
            other if !asym => Ok(other),
            other => Err(QuantError::Invalid(format!(
                "{other} has no asymmetric variant (only int8/int4/int3/int2 do)"
            ))),
        }
    }

    /// Bits per code.
    pub fn bits(self) -> usize {
        match self {
            QuantFormat::Int { bits, .. } => bits as usize,
            QuantFormat::Fp8 => 8,
            QuantFormat::Fp4 | QuantFormat::Mxfp4 | QuantFormat::Nvfp4 => 4,
        }
    }

    pub fn is_asym(self) -> bool {
        matches!(self, QuantFormat::Int { asym: true, .. })
    }

    /// Bytes per group scale: f16, or one byte for the microscaling formats.
    pub fn scale_bytes(self) -> usize {
        match self {
            QuantFormat::Mxfp4 | QuantFormat::Nvfp4 => 1,
            _ => 2,
        }
    }

    /// The block length the format itself fixes (MX: 32, NV: 16).
    pub fn fixed_group(self) -> Option<usize> {
        match self {
            QuantFormat::Mxfp4 => Some(32),
            QuantFormat::Nvfp4 => Some(16),
            _ => None,
        }
    }

    /// The group size asked for when the user names none: 32 (as GGML's 4/8-bit types), but
    /// FP8 per output channel.
    pub fn default_group(self) -> usize {
        match self {
            QuantFormat::Fp8 => PER_CHANNEL,
            f => f.fixed_group().unwrap_or(32),
        }
    }

    /// The group a row of `cols` uses when up to `requested` is asked for ([`PER_CHANNEL`]: the
    /// whole row): `requested` if it divides `cols`, else the largest of 128/64/32 below it that
    /// does. An error when none does.
    pub fn resolve_group(self, requested: usize, cols: usize) -> Result<usize> {
        if cols == 0 {
            return Err(QuantError::Invalid("a weight with no columns".into()));
        }
        if let Some(g) = self.fixed_group() {
            return if cols.is_multiple_of(g) {
                Ok(g)
            } else {
                Err(QuantError::Invalid(format!(
                    "{self} needs rows in whole blocks of {g}; a row of {cols} is not"
                )))
            };
        }
        if requested == PER_CHANNEL {
            return Ok(cols);
        }
        if !GROUP_SIZES.contains(&requested) {
            return Err(QuantError::Invalid(format!(
                "group size {requested}: use 32, 64, 128 or per channel"
            )));
        }
        GROUP_SIZES
            .into_iter()
            .filter(|&g| g <= requested)
            .find(|&g| cols.is_multiple_of(g))
            .ok_or_else(|| {
                QuantError::Invalid(format!(
                    "a row of {cols} columns is not a multiple of 32: group it per channel"
                ))
            })
    }

    /// The f32 value of code `c` before scaling: `c - 2^(b-1)` (symmetric int), `c` (asymmetric
    /// int), E4M3 or E2M1.
    #[inline]
    pub fn code_value(self, c: u8) -> f32 {
        match self {
            QuantFormat::Int { bits, asym } => {
                if asym {
                    c as f32
                } else {
                    c as f32 - (1u32 << (bits - 1)) as f32
                }
            }
            QuantFormat::Fp8 => e4m3_to_f32(c),
            _ => E2M1[(c & 15) as usize],
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantFormat::Int { bits, asym } => {
                write!(f, "int{bits}{}", if *asym { "-asym" } else { "" })
            }
            QuantFormat::Fp8 => f.write_str("fp8"),
            QuantFormat::Fp4 => f.write_str("fp4"),
            QuantFormat::Mxfp4 => f.write_str("mxfp4"),
            QuantFormat::Nvfp4 => f.write_str("nvfp4"),
        }
    }
}

/// E2M1 values of the 16 codes: sign in bit 3, then exponent (2 bits), mantissa (1 bit).
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The nearest E2M1 code (ties to the even mantissa), saturating at ±6.
pub fn f32_to_e2m1(x: f32) -> u8 {
    let a = x.abs();
    let m = if a.is_nan() || a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    if x.is_sign_negative() && m != 0 {
        m | 8
    } else {
        m
    }
}

/// OCP E4M3FN: bias 7, no infinities, S.1111.111 is NaN, largest finite 448.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0xf) as i32;
    let m = (b & 7) as f32;
    if e == 15 && b & 7 == 7 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m * (1.0 / 512.0)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// The nearest E4M3 code (ties to even), saturating at ±448; NaN maps to the NaN code.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a >= 448.0 {
        return sign | 0x7e;
    }
    let code = if a < 1.0 / 64.0 {
        // Subnormal step 2^-9; a result of 8 is the smallest normal, code 8, as wanted.
        (a * 512.0).round_ties_even() as u8
    } else {
        let e = ((a.to_bits() >> 23) as i32) - 127;
        let q = ((a / 2f32.powi(e) - 1.0) * 8.0).round_ties_even() as i32;
        let (e, q) = if q == 8 { (e + 1, 0) } else { (e, q) };
        (((e + 7) << 3) | q).min(0x7e) as u8
    };
    if code == 0 {
        0
    } else {
        sign | code
    }
}

/// E8M0: `2^(e - 127)`; 255 is NaN.
pub fn e8m0_to_f32(e: u8) -> f32 {
    match e {
        255 => f32::NAN,
        0 => f32::from_bits(0x0040_0000),
        e => f32::from_bits((e as u32) << 23),
    }
}

#[inline]
fn f16_le(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32()
}

/// Bytes of one packed row of `cols` codes of `bits` bits.
pub fn row_bytes(bits: usize, cols: usize) -> usize {
    (cols * bits).div_ceil(8)
}

/// Code `j` of a packed row: little-endian bit stream (8 bits: byte j; 4: low nibble first;
/// 2: bits 2j..2j+2 of each byte from the low end; 3: eight codes per three bytes).
#[inline]
pub fn get_code(row: &[u8], bits: usize, j: usize) -> u8 {
    match bits {
        8 => row[j],
        4 => (row[j / 2] >> (4 * (j & 1))) & 15,
        2 => (row[j / 4] >> (2 * (j & 3))) & 3,
        _ => {
            let bit = j * bits;
            let (byte, shift) = (bit / 8, bit % 8);
            let lo = row[byte] as u32;
            let hi = if shift + bits > 8 {
                row[byte + 1] as u32
            } else {
                0
            };
            (((lo | hi << 8) >> shift) & ((1 << bits) - 1)) as u8
        }
    }
}

/// Packs codes (each below `2^bits`) into one row.
pub fn pack_row(codes: &[u8], bits: usize, out: &mut [u8]) {
    out.fill(0);
    for (j, &c) in codes.iter().enumerate() {
        let bit = j * bits;
        let (byte, shift) = (bit / 8, bit % 8);
        let v = (c as u32) << shift;
        out[byte] |= v as u8;
        if shift + bits > 8 {
            out[byte + 1] |= (v >> 8) as u8;
        }
    }
}

/// A packed weight matrix; see the module docs and `docs/format.md`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantTensor {
    pub format: QuantFormat,
    pub rows: usize,
    /// Stored columns (input features).
    pub cols: usize,
    /// Columns per group; `cols` when the tensor is scaled per output channel.
    pub group: usize,
    /// Row-major packed codes, `row_bytes(bits, cols)` bytes per row.
    pub codes: Vec<u8>,
    /// Per row, per group: f16 little-endian, or one E8M0 (mxfp4) / E4M3 (nvfp4) byte.
    pub scales: Vec<u8>,
    /// Asymmetric integers: per row, per group, an f16 offset.
    pub offsets: Option<Vec<u8>>,
    /// nvfp4: the f32 tensor scale.
    pub tensor_scale: Option<f32>,
    /// Act-order: stored column j holds input column `perm[j]`.
    pub perm: Option<Vec<u32>>,
}

impl QuantTensor {
    /// A tensor of the given shape with every code, scale and offset zero, checked by
    /// `validate`: what the quantizers fill in.
    pub fn zeroed(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        group: usize,
        tensor_scale: Option<f32>,
    ) -> crate::Result<Self> {
        let groups = cols / group.max(1);
        let t = QuantTensor {
            format,
            rows,
            cols,
            group,
            codes: vec![0; rows * row_bytes(format.bits(), cols)],
            scales: vec![0; rows * groups * format.scale_bytes()],
            offsets: format.is_asym().then(|| vec![0; rows * groups * 2]),
            tensor_scale,
            perm: None,
        };
        t.validate()?;
        Ok(t)
    }

    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group
    }

    pub fn row_bytes(&self) -> usize {
        row_bytes(self.format.bits(), self.cols)
    }

    /// Checks every length, the group rule and the permutation.
    pub fn validate(&self) -> Result<()> {
        let f = self.format;
        let what = format!("{}x{} {f} g{} tensor", self.rows, self.cols, self.group);
        if self.group == 0 || self.cols == 0 || !self.cols.is_multiple_of(self.group) {
            return Err(QuantError::Invalid(format!(
                "{what}: group does not divide the row"
            )));
        }
        if self.group != self.cols && !self.group.is_multiple_of(16) {
            return Err(QuantError::Invalid(format!(
                "{what}: groups are per channel or a multiple of 16"
            )));
        }
        if let Some(g) = f.fixed_group() {
            if self.group != g {
                return Err(QuantError::Invalid(format!(
                    "{what}: {f} uses blocks of {g}"
                )));
            }
        }
        let check = |name: &str, expected: usize, found: usize| {
            if expected == found {
                Ok(())
            } else {
                Err(QuantError::Length {
                    what: format!("{what} {name}"),
                    expected,
                    found,
                })
            }
        };
        let groups = self.rows * self.groups_per_row();
        check("codes", self.rows * self.row_bytes(), self.codes.len())?;
        check("scales", groups * f.scale_bytes(), self.scales.len())?;
        match (&self.offsets, f.is_asym()) {
            (Some(o), true) => check("offsets", groups * 2, o.len())?,
            (None, false) => {}
            _ => {
                return Err(QuantError::Invalid(format!(
                    "{what}: offsets belong to asymmetric integer formats only"
                )))
            }
        }
        if (f == QuantFormat::Nvfp4) != self.tensor_scale.is_some() {
            return Err(QuantError::Invalid(format!(
                "{what}: a tensor scale belongs to nvfp4 only"
            )));
        }
        if let Some(perm) = &self.perm {
            check("permutation", self.cols, perm.len())?;
            let mut seen = vec![false; self.cols];
            for &p in perm {
                let p = p as usize;
                if p >= self.cols || std::mem::replace(&mut seen[p], true) {
                    return Err(QuantError::Invalid(format!(
                        "{what}: the column permutation is not a permutation"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The f32 scale of group `g` of row `r` (for nvfp4, block scale times tensor scale).
    #[inline]
    pub fn group_scale(&self, r: usize, g: usize) -> f32 {
        let i = r * self.groups_per_row() + g;
        match self.format {
            QuantFormat::Mxfp4 => e8m0_to_f32(self.scales[i]),
            QuantFormat::Nvfp4 => e4m3_to_f32(self.scales[i]) * self.tensor_scale.unwrap_or(1.0),
            _ => f16_le(&self.scales, i),
        }
    }

    /// The f32 offset of group `g` of row `r` (0 for formats without offsets).
    #[inline]
    pub fn group_offset(&self, r: usize, g: usize) -> f32 {
        match &self.offsets {
            Some(o) => f16_le(o, r * self.groups_per_row() + g),
            None => 0.0,
        }
    }

    /// Row `r` in stored column order.
    pub fn dequantize_row_stored(&self, r: usize, out: &mut [f32]) {
        let (bits, rb) = (self.format.bits(), self.row_bytes());
        let row = &self.codes[r * rb..(r + 1) * rb];
        for (g, chunk) in out[..self.cols].chunks_mut(self.group).enumerate() {
            let (s, o) = (self.group_scale(r, g), self.group_offset(r, g));
            for (i, v) in chunk.iter_mut().enumerate() {
                let c = get_code(row, bits, g * self.group + i);
                let q = self.format.code_value(c);
                *v = if self.format.is_asym() {
                    q * s + o
                } else {
                    q * s
                };
            }
        }
    }

    /// Row `r` over the input columns (the act-order permutation undone).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match &self.perm {
            None => self.dequantize_row_stored(r, out),
            Some(perm) => {
                let mut stored = vec![0.0; self.cols];
                self.dequantize_row_stored(r, &mut stored);
                for (j, &p) in perm.iter().enumerate() {
                    out[p as usize] = stored[j];
                }
            }
        }
    }

    /// The whole matrix as f32, rows x input columns.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }

    /// Bytes of codes, scales, offsets, tensor scale and permutation.
    pub fn storage_bytes(&self) -> usize {
        self.codes.len()
            + self.scales.len()
            + self.offsets.as_ref().map_or(0, Vec::len)
            + self.tensor_scale.map_or(0, |_| 4)
            + self.perm.as_ref().map_or(0, |p| 4 * p.len())
    }

    pub fn bits_per_weight(&self) -> f64 {
        self.storage_bytes() as f64 * 8.0 / (self.rows * self.cols).max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in QuantFormat::ALL {
            assert_eq!(QuantFormat::parse(&f.to_string()), Some(f), "{f}");
        }
        assert_eq!(QuantFormat::parse("fp8-asym"), None);
        assert_eq!(QuantFormat::parse("int5"), None);
        assert!(QuantFormat::Fp8.with_asym(true).is_err());
    }

    #[test]
    fn group_rule() {
        let f = QuantFormat::Int {
            bits: 4,
            asym: false,
        };
        assert_eq!(f.resolve_group(128, 1536).unwrap(), 128);
        assert_eq!(f.resolve_group(128, 576).unwrap(), 64);
        assert_eq!(f.resolve_group(64, 96).unwrap(), 32);
        assert_eq!(f.resolve_group(32, 576).unwrap(), 32);
        assert_eq!(f.resolve_group(PER_CHANNEL, 577).unwrap(), 577);
        assert!(f.resolve_group(128, 100).is_err());
        assert!(f.resolve_group(48, 96).is_err());
        assert_eq!(QuantFormat::Nvfp4.resolve_group(128, 48).unwrap(), 16);
        assert!(QuantFormat::Mxfp4.resolve_group(32, 48).is_err());
    }

    #[test]
    fn e4m3_codes() {
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
        assert_eq!(e4m3_to_f32(0x01), 1.0 / 512.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        for c in 0..=255u8 {
            let v = e4m3_to_f32(c);
            if v.is_nan() {
                continue;
            }
            let back = f32_to_e4m3(v);
            assert_eq!(e4m3_to_f32(back), v, "code {c:#x}");
        }
        assert_eq!(f32_to_e4m3(1e6), 0x7e);
        assert_eq!(f32_to_e4m3(-1e6), 0xfe);
        // 1 + 1/16 lies halfway between 1 and 1.125: ties to even (1).
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.0626), 0x39);
        // Halfway between the largest subnormal (7/512) and the smallest normal (8/512).
        assert_eq!(f32_to_e4m3(7.5 / 512.0), 0x08);
    }

    #[test]
    fn e2m1_codes() {
        for c in 0..16u8 {
            let v = E2M1[c as usize];
            let back = f32_to_e2m1(v);
            assert_eq!(E2M1[back as usize], v);
        }
        assert_eq!(f32_to_e2m1(100.0), 7);
        assert_eq!(f32_to_e2m1(-2.6), 13);
        assert_eq!(f32_to_e2m1(0.25), 0);
        assert_eq!(f32_to_e2m1(1.25), 2);
    }

    #[test]
    fn packing_round_trips() {
        for bits in [2usize, 3, 4, 8] {
            for cols in [1usize, 7, 8, 16, 33] {
                let codes: Vec<u8> = (0..cols)
                    .map(|j| ((j * 7 + 3) % (1 << bits)) as u8)
                    .collect();
                let mut row = vec![0u8; row_bytes(bits, cols)];
                pack_row(&codes, bits, &mut row);
                for (j, &c) in codes.iter().enumerate() {
                    assert_eq!(get_code(&row, bits, j), c, "bits {bits} cols {cols} j {j}");
                }
            }
        }
        // The documented byte layouts.
        let mut row = [0u8; 3];
        pack_row(&[1, 2, 3, 4, 5, 6, 7, 0], 3, &mut row);
        let stream = row[0] as u32 | (row[1] as u32) << 8 | (row[2] as u32) << 16;
        for j in 0..8 {
            assert_eq!((stream >> (3 * j)) & 7, [1, 2, 3, 4, 5, 6, 7, 0][j]);
        }
        let mut row = [0u8; 1];
        pack_row(&[0xa, 0x5], 4, &mut row);
        assert_eq!(row[0], 0x5a);
    }
}
