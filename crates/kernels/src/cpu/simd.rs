//! 16-lane f32 vectors for each instruction set the CPU backend dispatches to at runtime:
//! AVX-512 and AVX2 on x86-64, NEON on aarch64, portable scalar lanes elsewhere.
//!
//! Every reduction in the backend is written against `F32x16`: sixteen lane-wise partial sums,
//! then the one horizontal tree in `hsum`. The scalar type performs the same fused multiply-adds
//! and the same tree, so a result does not depend on which instruction set computed it.
//!
//! Kernels are generic `#[inline(always)]` bodies over `F32x16`; each instruction set gets one
//! `#[target_feature]` entry point that instantiates them, so the intrinsics inline into code
//! compiled for that set.

use half::{bf16, f16};

/// The instruction set the kernels run on, picked once when the backend is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "aarch64")]
    Neon,
    Scalar,
}

impl Isa {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let f = |name| match name {
                "avx512f" => is_x86_feature_detected!("avx512f"),
                "avx512bw" => is_x86_feature_detected!("avx512bw"),
                "avx512vl" => is_x86_feature_detected!("avx512vl"),
                "avx2" => is_x86_feature_detected!("avx2"),
                "fma" => is_x86_feature_detected!("fma"),
                "f16c" => is_x86_feature_detected!("f16c"),
                _ => false,
            };
            if ["avx512f", "avx512bw", "avx512vl", "fma", "f16c"]
                .iter()
                .all(|n| f(n))
            {
                return Isa::Avx512;
            }
            if ["avx2", "fma", "f16c"].iter().all(|n| f(n)) {
                return Isa::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            return Isa::Neon;
        }
        Isa::Scalar
    }

    /// Every set this machine can run, for tests that compare them bit for bit.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let best = Isa::detect();
        let mut all = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if best != Isa::Scalar {
                all.push(Isa::Avx2);
            }
            if best == Isa::Avx512 {
                all.push(Isa::Avx512);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if best == Isa::Neon {
            all.push(Isa::Neon);
        }
        all
    }
}

/// Sixteen f32 lanes. Partial operations take `n < 16` and treat the missing lanes as zero.
pub(crate) trait F32x16: Copy {
    unsafe fn zero() -> Self;
    unsafe fn splat(v: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn load_part(p: *const f32, n: usize) -> Self;
    unsafe fn load_f16(p: *const u16) -> Self;
    unsafe fn load_f16_part(p: *const u16, n: usize) -> Self;
    unsafe fn load_bf16(p: *const u16) -> Self;
    unsafe fn load_bf16_part(p: *const u16, n: usize) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// Stores lanes `0..n`; sets without a masked store go through a stack block.
    #[inline(always)]
    unsafe fn store_part(self, p: *mut f32, n: usize) {
        let mut b = [0.0f32; 16];
        self.store(b.as_mut_ptr());
        std::ptr::copy_nonoverlapping(b.as_ptr(), p, n);
    }
    /// `a * b + c` with one rounding.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn div(a: Self, b: Self) -> Self;
    /// e^x lane-wise, within 2 ulp for x in [-87, 88]; underflows to (near) zero below.
    unsafe fn exp(self) -> Self;
    /// The fixed tree: t[i] = a[i] + a[i+8], u[i] = t[i] + t[i+4], v[i] = u[i] + u[i+2],
    /// result v[0] + v[1].
    unsafe fn hsum(self) -> f32;
    /// Sixteen 8-bit codes less `bias`, as f32 (`p`: 16 bytes).
    #[inline(always)]
    unsafe fn codes_u8(p: *const u8, bias: i32) -> Self {
        let mut f = [0.0f32; 16];
        for (i, f) in f.iter_mut().enumerate() {
            *f = (*p.add(i) as i32 - bias) as f32;
        }
        Self::load(f.as_ptr())
    }
    /// Sixteen 4-bit codes, low nibble first (`p`: 8 bytes).
    #[inline(always)]
    unsafe fn codes_u4(p: *const u8, bias: i32) -> Self {
        let mut f = [0.0f32; 16];
        for (i, f) in f.iter_mut().enumerate() {
            *f = (((*p.add(i / 2) >> (4 * (i & 1))) & 15) as i32 - bias) as f32;
        }
        Self::load(f.as_ptr())
    }
    /// Sixteen 3-bit codes, a little-endian bit stream (`p`: 6 bytes; 8 may be read).
    #[inline(always)]
    unsafe fn codes_u3(p: *const u8, bias: i32) -> Self {
        let bits = p.cast::<u64>().read_unaligned().to_le();
        let mut f = [0.0f32; 16];
        for (i, f) in f.iter_mut().enumerate() {
            *f = (((bits >> (3 * i)) & 7) as i32 - bias) as f32;
        }
        Self::load(f.as_ptr())
    }
    /// Sixteen 2-bit codes (`p`: 4 bytes).
    #[inline(always)]
    unsafe fn codes_u2(p: *const u8, bias: i32) -> Self {
        let bits = p.cast::<u32>().read_unaligned().to_le();
        let mut f = [0.0f32; 16];
        for (i, f) in f.iter_mut().enumerate() {
            *f = (((bits >> (2 * i)) & 3) as i32 - bias) as f32;
        }
        Self::load(f.as_ptr())
    }
    /// Sixteen E4M3 codes times 2^-8 (`p`: 16 bytes): the code's seven magnitude bits shifted
    /// into an f16 give exactly that, subnormals included.
    #[inline(always)]
    unsafe fn codes_e4m3(p: *const u8) -> Self {
        let mut h = [0u16; 16];
        for (i, h) in h.iter_mut().enumerate() {
            let b = *p.add(i) as u16;
            *h = (b & 0x80) << 8 | (b & 0x7f) << 7;
        }
        Self::load_f16(h.as_ptr())
    }
    /// Sixteen 4-bit codes (as `codes_u4`) looked up in a 16-entry table.
    #[inline(always)]
    unsafe fn codes_lut4(p: *const u8, table: *const f32) -> Self {
        let mut f = [0.0f32; 16];
        for (i, f) in f.iter_mut().enumerate() {
            *f = *table.add(((*p.add(i / 2) >> (4 * (i & 1))) & 15) as usize);
        }
        Self::load(f.as_ptr())
    }
    /// Four `hsum`s, bit for bit; instruction sets override it with a transposed reduction.
    #[inline(always)]
    unsafe fn hsum4(v: [Self; 4]) -> [f32; 4] {
        [v[0].hsum(), v[1].hsum(), v[2].hsum(), v[3].hsum()]
    }
}

/// A weight element type the kernels read sixteen at a time, widening to f32 exactly.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// The same pointer when the elements already are f32, so callers can skip widening.
    fn as_f32(p: *const Self) -> Option<*const f32>;
    unsafe fn load<V: F32x16>(p: *const Self) -> V;
    unsafe fn load_part<V: F32x16>(p: *const Self, n: usize) -> V;
}

impl Elem for f32 {
    fn as_f32(p: *const Self) -> Option<*const f32> {
        Some(p)
    }
    #[inline(always)]
    unsafe fn load<V: F32x16>(p: *const Self) -> V {
        V::load(p)
    }
    #[inline(always)]
    unsafe fn load_part<V: F32x16>(p: *const Self, n: usize) -> V {
        V::load_part(p, n)
    }
}

impl Elem for f16 {
    fn as_f32(_: *const Self) -> Option<*const f32> {
        None
    }
    #[inline(always)]
    unsafe fn load<V: F32x16>(p: *const Self) -> V {
        V::load_f16(p.cast())
    }
    #[inline(always)]
    unsafe fn load_part<V: F32x16>(p: *const Self, n: usize) -> V {
        V::load_f16_part(p.cast(), n)
    }
}

impl Elem for bf16 {
    fn as_f32(_: *const Self) -> Option<*const f32> {
        None
    }
    #[inline(always)]
    unsafe fn load<V: F32x16>(p: *const Self) -> V {
        V::load_bf16(p.cast())
    }
    #[inline(always)]
    unsafe fn load_part<V: F32x16>(p: *const Self, n: usize) -> V {
        V::load_bf16_part(p.cast(), n)
    }
}

/// `sum_k a[k] * b[k]` in the backend's fixed order.
#[inline(always)]
pub(crate) unsafe fn dot<V: F32x16>(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut acc = V::zero();
    let mut i = 0;
    while i + 16 <= n {
        acc = V::fma(V::load(a.add(i)), V::load(b.add(i)), acc);
        i += 16;
    }
    if i < n {
        acc = V::fma(
            V::load_part(a.add(i), n - i),
            V::load_part(b.add(i), n - i),
            acc,
        );
    }
    acc.hsum()
}

/// `out = gate / (1 + e^-gate) * up` over n elements.
#[inline(always)]
unsafe fn silu_mul_body<V: F32x16>(gate: *const f32, up: *const f32, out: *mut f32, n: usize) {
    let one = V::splat(1.0);
    let mut i = 0;
    while i < n {
        let m = (n - i).min(16);
        let g = V::load_part(gate.add(i), m);
        let e = V::mul(g, V::splat(-1.0)).exp();
        let s = V::div(V::mul(g, V::load_part(up.add(i), m)), V::add(one, e));
        s.store_part(out.add(i), m);
        i += 16;
    }
}

dispatch!(pub(crate) fn silu_mul(gate: *const f32, up: *const f32, out: *mut f32, n: usize) => silu_mul_body);

/// Asks for the cache line holding `p` (any address; nothing is read architecturally).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Widens n elements to f32.
#[inline(always)]
pub(crate) unsafe fn widen<V: F32x16, E: Elem>(src: *const E, dst: *mut f32, n: usize) {
    let mut i = 0;
    while i + 16 <= n {
        E::load::<V>(src.add(i)).store(dst.add(i));
        i += 16;
    }
    if i < n {
        E::load_part::<V>(src.add(i), n - i).store_part(dst.add(i), n - i);
    }
}

/// Portable lanes: the reference order, and the whole backend on machines without AVX2 or NEON.
#[derive(Clone, Copy)]
pub(crate) struct Scalar([f32; 16]);

impl Scalar {
    #[inline(always)]
    fn from_fn(f: impl FnMut(usize) -> f32) -> Self {
        Scalar(std::array::from_fn(f))
    }
}

impl F32x16 for Scalar {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Scalar([0.0; 16])
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Scalar([v; 16])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Scalar(p.cast::<[f32; 16]>().read_unaligned())
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize) -> Self {
        Self::from_fn(|i| if i < n { *p.add(i) } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self {
        Self::load_f16_part(p, 16)
    }
    #[inline(always)]
    unsafe fn load_f16_part(p: *const u16, n: usize) -> Self {
        Self::from_fn(|i| {
            if i < n {
                f16::from_bits(*p.add(i)).to_f32()
            } else {
                0.0
            }
        })
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self {
        Self::load_bf16_part(p, 16)
    }
    #[inline(always)]
    unsafe fn load_bf16_part(p: *const u16, n: usize) -> Self {
        Self::from_fn(|i| {
            if i < n {
                f32::from_bits((*p.add(i) as u32) << 16)
            } else {
                0.0
            }
        })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        p.cast::<[f32; 16]>().write_unaligned(self.0)
    }
    #[inline(always)]
    unsafe fn store_part(self, p: *mut f32, n: usize) {
        for i in 0..n {
            *p.add(i) = self.0[i];
        }
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Self::from_fn(|i| a.0[i].mul_add(b.0[i], c.0[i]))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        Self::from_fn(|i| a.0[i] * b.0[i])
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Self::from_fn(|i| a.0[i] + b.0[i])
    }
    #[inline(always)]
    unsafe fn div(a: Self, b: Self) -> Self {
        Self::from_fn(|i| a.0[i] / b.0[i])
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        Self::from_fn(|i| self.0[i].exp())
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        let a = self.0;
        let t: [f32; 8] = std::array::from_fn(|i| a[i] + a[i + 8]);
        let u: [f32; 4] = std::array::from_fn(|i| t[i] + t[i + 4]);
        let v: [f32; 2] = std::array::from_fn(|i| u[i] + u[i + 2]);
        v[0] + v[1]
    }
}

/// Copies n < 16 elements into a zeroed block, for sets without a 16-lane masked load.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
unsafe fn padded<T: Copy + Default>(p: *const T, n: usize) -> [T; 16] {
    let mut b = [T::default(); 16];
    std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), n);
    b
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so n * LN2_HI is exact for the n that occur.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const LN2_HI: f32 = 0.693_359_4;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' expf polynomial: e^r = 1 + r + r^2 * P(r) on |r| <= ln2/2.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{padded, F32x16, EXP_POLY, LN2_HI, LN2_LO, LOG2E};
    use std::arch::x86_64::*;

    #[inline(always)]
    fn mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(pub(crate) __m512);

    impl F32x16 for Avx512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx512(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Avx512(_mm512_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx512(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> Self {
            Avx512(_mm512_maskz_loadu_ps(mask(n), p))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            Avx512(_mm512_cvtph_ps(_mm256_loadu_si256(p.cast())))
        }
        #[inline(always)]
        unsafe fn load_f16_part(p: *const u16, n: usize) -> Self {
            Avx512(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p.cast())))
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> Self {
            let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(w)))
        }
        #[inline(always)]
        unsafe fn load_bf16_part(p: *const u16, n: usize) -> Self {
            let w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask(n), p.cast()));
            Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(w)))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn store_part(self, p: *mut f32, n: usize) {
            _mm512_mask_storeu_ps(p, mask(n), self.0)
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Avx512(_mm512_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            Avx512(_mm512_mul_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            Avx512(_mm512_add_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            Avx512(_mm512_div_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn exp(self) -> Self {
            let x = _mm512_max_ps(self.0, _mm512_set1_ps(-104.0));
            let x = _mm512_min_ps(x, _mm512_set1_ps(88.7));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
            let mut p = _mm512_set1_ps(EXP_POLY[0]);
            for &c in &EXP_POLY[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            let y = _mm512_fmadd_ps(
                p,
                _mm512_mul_ps(r, r),
                _mm512_add_ps(r, _mm512_set1_ps(1.0)),
            );
            // scalef multiplies by 2^n and flushes to zero where n is below the range.
            Avx512(_mm512_scalef_ps(y, n))
        }
        #[inline(always)]
        unsafe fn codes_u8(p: *const u8, bias: i32) -> Self {
            Avx512(unbias(
                _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast())),
                bias,
            ))
        }
        #[inline(always)]
        unsafe fn codes_u4(p: *const u8, bias: i32) -> Self {
            Avx512(unbias(nibbles(p), bias))
        }
        #[inline(always)]
        unsafe fn codes_u3(p: *const u8, bias: i32) -> Self {
            let bits = p.cast::<u64>().read_unaligned();
            let v = _mm512_inserti64x4::<1>(
                _mm512_set1_epi32(bits as i32),
                _mm256_set1_epi32((bits >> 24) as i32),
            );
            let shifts = _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21);
            let q = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi32(7));
            Avx512(unbias(q, bias))
        }
        #[inline(always)]
        unsafe fn codes_u2(p: *const u8, bias: i32) -> Self {
            let v = _mm512_set1_epi32(p.cast::<u32>().read_unaligned() as i32);
            let shifts =
                _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let q = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi32(3));
            Avx512(unbias(q, bias))
        }
        #[inline(always)]
        unsafe fn codes_e4m3(p: *const u8) -> Self {
            let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.cast()));
            let h = _mm256_or_si256(
                _mm256_and_si256(
                    _mm256_slli_epi16::<8>(b),
                    _mm256_set1_epi16(0x8000u16 as i16),
                ),
                _mm256_and_si256(_mm256_slli_epi16::<7>(b), _mm256_set1_epi16(0x3f80)),
            );
            Avx512(_mm512_cvtph_ps(h))
        }
        #[inline(always)]
        unsafe fn codes_lut4(p: *const u8, table: *const f32) -> Self {
            Avx512(_mm512_permutexvar_ps(nibbles(p), _mm512_loadu_ps(table)))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            let lo = _mm512_castps512_ps256(self.0);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
            hsum8(_mm256_add_ps(lo, hi))
        }
        /// The same tree run on four vectors at once: each level pairs the operands `hsum`
        /// pairs, so every sum is bitwise `hsum`'s, in about a third of the shuffles.
        #[inline(always)]
        unsafe fn hsum4(v: [Self; 4]) -> [f32; 4] {
            let [a, b, c, d] = v.map(|x| x.0);
            // t = lanes i + i+8: quarters (0,1) + (2,3) of two vectors.
            let ab = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            );
            let cd = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(c, d),
                _mm512_shuffle_f32x4::<0xEE>(c, d),
            );
            // u = t[i] + t[i+4]: quarters (0,2) + (1,3); now one quarter per input.
            let u = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(ab, cd),
                _mm512_shuffle_f32x4::<0xDD>(ab, cd),
            );
            // v = u[i] + u[i+2], then v[0] + v[1], within each quarter.
            let v = _mm512_add_ps(u, _mm512_permute_ps::<0b01_00_11_10>(u));
            let s = _mm512_add_ps(v, _mm512_permute_ps::<0b10_11_00_01>(v));
            let first = _mm512_permutexvar_ps(
                _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                s,
            );
            let mut out = [0.0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), _mm512_castps512_ps128(first));
            out
        }
    }

    /// Integer lanes less `bias`, as f32 (exact).
    #[inline(always)]
    unsafe fn unbias(q: __m512i, bias: i32) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(bias)))
    }

    /// Sixteen nibbles from 8 bytes, low nibble first, one per 32-bit lane: each byte widened to
    /// a 64-bit lane, its high nibble shifted into the upper half.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m512i {
        let q = _mm512_cvtepu8_epi64(_mm_loadl_epi64(p.cast()));
        let t = _mm512_or_si512(q, _mm512_slli_epi64::<28>(q));
        _mm512_and_si512(t, _mm512_set1_epi32(15))
    }

    /// The last three levels of the tree, shared by both x86 sets.
    #[inline(always)]
    unsafe fn hsum8(t: __m256) -> f32 {
        let u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
        let v = _mm_add_ps(u, _mm_movehl_ps(u, u));
        _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps::<1>(v, v)))
    }

    /// `Avx512::exp` on eight lanes, building 2^n in the exponent bits, so the clamp is tighter.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.3));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(scale))
    }

    /// Lanes 0..8 and 8..16.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(__m256, __m256);

    impl F32x16 for Avx2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx2(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Avx2(_mm256_set1_ps(v), _mm256_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> Self {
            Self::load(padded(p, n).as_ptr())
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            Avx2(
                _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(8).cast())),
            )
        }
        #[inline(always)]
        unsafe fn load_f16_part(p: *const u16, n: usize) -> Self {
            Self::load_f16(padded(p, n).as_ptr())
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> Self {
            let widen =
                |h: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
            Avx2(
                widen(_mm_loadu_si128(p.cast())),
                widen(_mm_loadu_si128(p.add(8).cast())),
            )
        }
        #[inline(always)]
        unsafe fn load_bf16_part(p: *const u16, n: usize) -> Self {
            Self::load_bf16(padded(p, n).as_ptr())
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0);
            _mm256_storeu_ps(p.add(8), self.1);
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Avx2(
                _mm256_fmadd_ps(a.0, b.0, c.0),
                _mm256_fmadd_ps(a.1, b.1, c.1),
            )
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            Avx2(_mm256_mul_ps(a.0, b.0), _mm256_mul_ps(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            Avx2(_mm256_add_ps(a.0, b.0), _mm256_add_ps(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            Avx2(_mm256_div_ps(a.0, b.0), _mm256_div_ps(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn exp(self) -> Self {
            Avx2(exp8(self.0), exp8(self.1))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            hsum8(_mm256_add_ps(self.0, self.1))
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) use arm::Neon;

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{padded, F32x16, EXP_POLY, LN2_HI, LN2_LO, LOG2E};
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// Lanes 0..4, 4..8, 8..12, 12..16 in four q registers.
    #[derive(Clone, Copy)]
    pub(crate) struct Neon([float32x4_t; 4]);

    impl Neon {
        #[inline(always)]
        fn zip(a: Self, b: Self, f: impl Fn(float32x4_t, float32x4_t) -> float32x4_t) -> Self {
            Neon(std::array::from_fn(|i| f(a.0[i], b.0[i])))
        }
    }

    /// Eight f16 to f32. `fcvtl` is used through asm because Rust's f16 NEON types are not
    /// stable; it converts exactly, subnormals included.
    #[inline(always)]
    unsafe fn f16x8(h: uint16x8_t) -> [float32x4_t; 2] {
        let (lo, hi): (float32x4_t, float32x4_t);
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            h = in(vreg) h,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags)
        );
        [lo, hi]
    }

    /// Sixteen 16-bit values at `p` widened eight at a time by `widen`.
    #[inline(always)]
    unsafe fn widen16(p: *const u16, widen: impl Fn(uint16x8_t) -> [float32x4_t; 2]) -> Neon {
        let [a, b] = widen(vld1q_u16(p));
        let [c, d] = widen(vld1q_u16(p.add(8)));
        Neon([a, b, c, d])
    }

    /// Sixteen bytes less `bias`, as f32 (exact).
    #[inline(always)]
    unsafe fn unbias(b: uint8x16_t, bias: i32) -> Neon {
        let (lo, hi) = (vmovl_u8(vget_low_u8(b)), vmovl_high_u8(b));
        let words = [
            vmovl_u16(vget_low_u16(lo)),
            vmovl_high_u16(lo),
            vmovl_u16(vget_low_u16(hi)),
            vmovl_high_u16(hi),
        ];
        let bias = vdupq_n_s32(bias);
        Neon(words.map(|w| vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(w), bias))))
    }

    /// e^x on four lanes, as `Avx2`'s: 2^n built in the exponent bits.
    #[inline(always)]
    unsafe fn exp4(x: float32x4_t) -> float32x4_t {
        let x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.3)), vdupq_n_f32(88.3));
        let n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(LOG2E)));
        let r = vfmsq_f32(x, n, vdupq_n_f32(LN2_HI));
        let r = vfmsq_f32(r, n, vdupq_n_f32(LN2_LO));
        let mut p = vdupq_n_f32(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = vfmaq_f32(vdupq_n_f32(c), p, r);
        }
        let y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0)), p, vmulq_f32(r, r));
        let scale = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
        vmulq_f32(y, vreinterpretq_f32_s32(scale))
    }

    impl F32x16 for Neon {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Neon([vdupq_n_f32(0.0); 4])
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Neon([vdupq_n_f32(v); 4])
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Neon(std::array::from_fn(|i| vld1q_f32(p.add(4 * i))))
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> Self {
            Self::load(padded(p, n).as_ptr())
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            widen16(p, |h| f16x8(h))
        }
        #[inline(always)]
        unsafe fn load_f16_part(p: *const u16, n: usize) -> Self {
            Self::load_f16(padded(p, n).as_ptr())
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> Self {
            widen16(p, |h| unsafe {
                [
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
                    vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
                ]
            })
        }
        #[inline(always)]
        unsafe fn load_bf16_part(p: *const u16, n: usize) -> Self {
            Self::load_bf16(padded(p, n).as_ptr())
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            for (i, v) in self.0.iter().enumerate() {
                vst1q_f32(p.add(4 * i), *v);
            }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Neon(std::array::from_fn(|i| vfmaq_f32(c.0[i], a.0[i], b.0[i])))
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            Self::zip(a, b, |a, b| unsafe { vmulq_f32(a, b) })
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            Self::zip(a, b, |a, b| unsafe { vaddq_f32(a, b) })
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            Self::zip(a, b, |a, b| unsafe { vdivq_f32(a, b) })
        }
        #[inline(always)]
        unsafe fn exp(self) -> Self {
            Neon(self.0.map(|x| unsafe { exp4(x) }))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            let [a, b, c, d] = self.0;
            // t = lanes i + i+8, u = t[i] + t[i+4], then the pairs within u.
            let u = vaddq_f32(vaddq_f32(a, c), vaddq_f32(b, d));
            let v = vaddq_f32(u, vextq_f32::<2>(u, u));
            vgetq_lane_f32::<0>(v) + vgetq_lane_f32::<1>(v)
        }
        #[inline(always)]
        unsafe fn codes_u8(p: *const u8, bias: i32) -> Self {
            unbias(vld1q_u8(p), bias)
        }
        #[inline(always)]
        unsafe fn codes_u4(p: *const u8, bias: i32) -> Self {
            let b = vld1_u8(p);
            let (lo, hi) = (vand_u8(b, vdup_n_u8(15)), vshr_n_u8::<4>(b));
            unbias(vcombine_u8(vzip1_u8(lo, hi), vzip2_u8(lo, hi)), bias)
        }
    }
}

/// Instantiates a generic kernel body once per instruction set, each under its target
/// features, and a dispatcher that picks one by `Isa`. The body is `$body::<V>(args)`.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident $(<$($g:ident: $b:path),*>)?
        ($($arg:ident: $ty:ty),* $(,)?) => $body:ident) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $name $(<$($g: $b),*>)? (isa: $crate::cpu::simd::Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512 $(<$($g: $b),*>)? ($($arg: $ty),*) {
                $body::<$crate::cpu::simd::Avx512 $($(, $g)*)?>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2 $(<$($g: $b),*>)? ($($arg: $ty),*) {
                $body::<$crate::cpu::simd::Avx2 $($(, $g)*)?>($($arg),*)
            }
            #[cfg(target_arch = "aarch64")]
            #[target_feature(enable = "neon")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn neon $(<$($g: $b),*>)? ($($arg: $ty),*) {
                $body::<$crate::cpu::simd::Neon $($(, $g)*)?>($($arg),*)
            }
            match isa {
                #[cfg(target_arch = "aarch64")]
                $crate::cpu::simd::Isa::Neon => neon $(::<$($g),*>)? ($($arg),*),
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::simd::Isa::Avx512 => avx512 $(::<$($g),*>)? ($($arg),*),
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::simd::Isa::Avx2 => avx2 $(::<$($g),*>)? ($($arg),*),
                $crate::cpu::simd::Isa::Scalar => {
                    $body::<$crate::cpu::simd::Scalar $($(, $g)*)?>($($arg),*)
                }
            }
        }
    };
}
pub(crate) use dispatch;
