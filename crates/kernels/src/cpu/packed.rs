//! Packed weights on the CPU: the codes as `marlin_quant` lays them out (a little-endian bit
//! stream per row, so 16 codes at a column multiple of 16 are 16, 8, 6 or 4 whole bytes), and
//! per (row, group) the f32 scale (and offset) every code of the group is decoded with:
//! `w = q * scale` or `fma(q, scale, offset)`, `q` the code's value before scaling.
//!
//! One decoder per code kind ([`Codec`]) turns 16 codes into 16 lanes of `q`; the scale and
//! offset are chosen at upload so that this one FMA gives exactly the value `marlin_quant`
//! defines for every format, signed zeros included (symmetric integers: `q = c - 2^(b-1)`; FP8:
//! `q` is E4M3 times 2^-8 and the scale is multiplied by 2^8; both exact). The GEMV tile calls the decoder directly
//! on weights streamed from memory; the GEMM regime calls the same decoder to widen a strip, so
//! both regimes see the same bits.

use super::simd::F32x16;
use marlin_quant::{QuantFormat, QuantTensor};
use std::marker::PhantomData;

/// How 16 consecutive codes (starting at a column multiple of 16) become f32 lanes `q`, and
/// whether the group's offset is added: `w = q * s` or `w = fma(q, s, o)`.
pub(crate) trait Codec: Copy + Send + Sync + 'static {
    const BITS: usize;
    const OFFSET: bool;
    /// `p` points at the first of the 16 codes' `2 * BITS` bytes; up to 8 bytes past them may be
    /// read (the code buffer is padded).
    unsafe fn decode16<V: F32x16>(p: *const u8) -> V;
}

/// Integer codes of `B` bits: symmetric ones decode to `c - 2^(B-1)` (exact), asymmetric to `c`.
#[derive(Clone, Copy)]
pub(crate) struct Int<const B: usize, const ASYM: bool>;
#[derive(Clone, Copy)]
pub(crate) struct E4m3;
#[derive(Clone, Copy)]
pub(crate) struct E2m1;

impl<const B: usize, const ASYM: bool> Codec for Int<B, ASYM> {
    const BITS: usize = B;
    const OFFSET: bool = ASYM;
    #[inline(always)]
    unsafe fn decode16<V: F32x16>(p: *const u8) -> V {
        let bias = if ASYM { 0 } else { 1 << (B - 1) };
        match B {
            8 => V::codes_u8(p, bias),
            4 => V::codes_u4(p, bias),
            3 => V::codes_u3(p, bias),
            _ => V::codes_u2(p, bias),
        }
    }
}
impl Codec for E4m3 {
    const BITS: usize = 8;
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn decode16<V: F32x16>(p: *const u8) -> V {
        V::codes_e4m3(p)
    }
}
impl Codec for E2m1 {
    const BITS: usize = 4;
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn decode16<V: F32x16>(p: *const u8) -> V {
        V::codes_lut4(p, marlin_quant::packed::E2M1.as_ptr())
    }
}

/// Which decoder a weight uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Int { bits: u8, asym: bool },
    E4m3,
    E2m1,
}

/// Runs `$body` with `$C` bound to the codec type of `$kind`.
macro_rules! with_codec {
    ($kind:expr, $C:ident => $body:expr) => {{
        use $crate::cpu::packed::{E2m1, E4m3, Int, Kind};
        match $kind {
            Kind::Int {
                bits: 8,
                asym: false,
            } => {
                type $C = Int<8, false>;
                $body
            }
            Kind::Int {
                bits: 8,
                asym: true,
            } => {
                type $C = Int<8, true>;
                $body
            }
            Kind::Int {
                bits: 4,
                asym: false,
            } => {
                type $C = Int<4, false>;
                $body
            }
            Kind::Int {
                bits: 4,
                asym: true,
            } => {
                type $C = Int<4, true>;
                $body
            }
            Kind::Int {
                bits: 3,
                asym: false,
            } => {
                type $C = Int<3, false>;
                $body
            }
            Kind::Int {
                bits: 3,
                asym: true,
            } => {
                type $C = Int<3, true>;
                $body
            }
            Kind::Int {
                bits: 2,
                asym: false,
            } => {
                type $C = Int<2, false>;
                $body
            }
            Kind::Int {
                bits: 2,
                asym: true,
            } => {
                type $C = Int<2, true>;
                $body
            }
            Kind::Int { .. } => unreachable!("checked at upload"),
            Kind::E4m3 => {
                type $C = E4m3;
                $body
            }
            Kind::E2m1 => {
                type $C = E2m1;
                $body
            }
        }
    }};
}
pub(crate) use with_codec;

/// Bytes past the last row the decoders may read.
const PAD: usize = 16;

/// A packed matrix in the CPU's layout.
pub struct QuantWeight {
    pub(crate) format: QuantFormat,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) group: usize,
    pub(crate) kind: Kind,
    /// `off >> shift` is the group of column `off` (63 for one group per row).
    pub(crate) shift: u32,
    pub(crate) row_bytes: usize,
    pub(crate) codes: Vec<u8>,
    /// Per row per group: the scale, then the offset for formats that have one.
    pub(crate) params: Vec<f32>,
    pub(crate) perm: Option<Vec<u32>>,
}

impl QuantWeight {
    pub(crate) fn new(t: &QuantTensor) -> Result<Self, String> {
        t.validate().map_err(|e| e.to_string())?;
        let f = t.format;
        let kind = match f {
            QuantFormat::Int { bits, asym } if matches!(bits, 2 | 3 | 4 | 8) => {
                Kind::Int { bits, asym }
            }
            QuantFormat::Int { bits, .. } => return Err(format!("int{bits} is not supported")),
            QuantFormat::Fp8 => Kind::E4m3,
            QuantFormat::Fp4 | QuantFormat::Mxfp4 | QuantFormat::Nvfp4 => Kind::E2m1,
        };
        let shift = if t.group == t.cols {
            63
        } else if t.group.is_power_of_two() {
            t.group.trailing_zeros()
        } else {
            return Err(format!("group {} is not a power of two", t.group));
        };
        let groups = t.groups_per_row();
        let mut params = Vec::with_capacity(t.rows * groups * 2);
        for r in 0..t.rows {
            for g in 0..groups {
                let s = t.group_scale(r, g);
                match f {
                    QuantFormat::Int { asym: true, .. } => params.extend([s, t.group_offset(r, g)]),
                    QuantFormat::Fp8 => params.push(s * 256.0),
                    _ => params.push(s),
                }
            }
        }
        let mut codes = super::huge_page_vec(t.codes.len() + PAD, 0u8);
        codes[..t.codes.len()].copy_from_slice(&t.codes);
        Ok(Self {
            format: f,
            rows: t.rows,
            cols: t.cols,
            group: t.group,
            kind,
            shift,
            row_bytes: t.row_bytes(),
            codes,
            params,
            perm: t.perm.clone(),
        })
    }

    pub(crate) fn reader<C: Codec>(&self) -> Packed<C> {
        debug_assert_eq!(C::BITS, self.format.bits());
        Packed {
            codes: self.codes.as_ptr(),
            params: self.params.as_ptr(),
            row_bytes: self.row_bytes,
            stride: self.cols / self.group * (1 + C::OFFSET as usize),
            shift: self.shift,
            _c: PhantomData,
        }
    }

    /// Row `r`, dequantized over the input columns, into `out`.
    pub(crate) fn row_into(&self, r: usize, out: &mut [f32]) {
        let mut stored = vec![0.0f32; if self.perm.is_some() { self.cols } else { 0 }];
        let dst: &mut [f32] = if self.perm.is_some() {
            &mut stored
        } else {
            out
        };
        // SAFETY: r < rows (checked by the caller) and dst holds cols elements.
        unsafe { with_codec!(self.kind, C => row_body(self.reader::<C>(), r, self.cols, dst)) }
        if let Some(perm) = &self.perm {
            for (j, &p) in perm.iter().enumerate() {
                out[p as usize] = stored[j];
            }
        }
    }
}

/// One row through the portable lanes: bitwise what every instruction set's kernels decode.
unsafe fn row_body<C: Codec>(w: Packed<C>, r: usize, k: usize, out: &mut [f32]) {
    use super::matmul::Rows;
    w.widen::<super::simd::Scalar>(r, r + 1, k, out.as_mut_ptr());
}

/// Reads rows of a packed weight sixteen weights at a time.
pub(crate) struct Packed<C: Codec> {
    codes: *const u8,
    params: *const f32,
    row_bytes: usize,
    /// Parameters per row.
    stride: usize,
    shift: u32,
    _c: PhantomData<C>,
}

impl<C: Codec> Clone for Packed<C> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<C: Codec> Copy for Packed<C> {}
// SAFETY: read-only views of a weight that outlives the matmul.
unsafe impl<C: Codec> Send for Packed<C> {}
unsafe impl<C: Codec> Sync for Packed<C> {}

/// One packed row: its codes, its groups' (scale, offset), and the column-to-group shift.
#[derive(Clone, Copy)]
pub(crate) struct PackedRow {
    codes: *const u8,
    params: *const f32,
    shift: u32,
}

/// `q * s`, or `fma(q, s, o)`, with the parameters of the group holding column `off`.
#[inline(always)]
unsafe fn scale<V: F32x16, C: Codec>(q: V, row: PackedRow, off: usize) -> V {
    let g = off >> row.shift;
    if C::OFFSET {
        let p = row.params.add(2 * g);
        V::fma(q, V::splat(*p), V::splat(*p.add(1)))
    } else {
        V::mul(q, V::splat(*row.params.add(g)))
    }
}

impl<C: Codec> super::matmul::Rows for Packed<C> {
    type Row = PackedRow;
    #[inline(always)]
    unsafe fn row(self, j: usize) -> PackedRow {
        PackedRow {
            codes: self.codes.add(j * self.row_bytes),
            params: self.params.add(j * self.stride),
            shift: self.shift,
        }
    }
    #[inline(always)]
    unsafe fn load<V: F32x16>(row: PackedRow, off: usize) -> V {
        scale::<V, C>(C::decode16::<V>(row.codes.add(off * C::BITS / 8)), row, off)
    }
    #[inline(always)]
    unsafe fn load_part<V: F32x16>(row: PackedRow, off: usize, n: usize) -> V {
        // Only per-channel rows have tails: copy the tail's bytes so nothing past the row (the
        // next row's codes) is decoded, then zero the missing lanes.
        let mut bytes = [0u8; 24];
        let src = row.codes.add(off * C::BITS / 8);
        std::ptr::copy_nonoverlapping(src, bytes.as_mut_ptr(), (n * C::BITS).div_ceil(8));
        let mut lanes = [0.0f32; 16];
        scale::<V, C>(C::decode16::<V>(bytes.as_ptr()), row, off).store(lanes.as_mut_ptr());
        V::load_part(lanes.as_ptr(), n)
    }
    #[inline(always)]
    fn addr(row: PackedRow, off: usize) -> *const u8 {
        row.codes.wrapping_add(off * C::BITS / 8)
    }
    #[inline(always)]
    fn as_f32(self) -> Option<*const f32> {
        None
    }
}
