//! Round-to-nearest quantization with a per-group scale (and offset) search.
//!
//! The pieces are public so data-aware quantizers (GPTQ, which fixes a group's parameters when it
//! reaches the group's first column, then quantizes column by column with error feedback) can
//! reuse them: [`Quantizer::fit`] finds a group's parameters, [`Quantizer::quantize`] the code of
//! one value given them, [`Quantizer::dequantize`] the value of a code.

use crate::packed::{
    e4m3_to_f32, e8m0_to_f32, f32_to_e2m1, f32_to_e4m3, pack_row, row_bytes, QuantFormat,
    QuantTensor, E2M1,
};
use crate::Result;
use half::f16;
use rayon::prelude::*;

/// Scale candidates tried per group (each refined once by least squares).
const CANDIDATES: usize = 24;

/// One group's parameters: the stored scale bits (f16, E8M0 or E4M3) and offset bits (f16), and
/// their f32 values as the kernels see them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GroupParams {
    pub scale_bits: u16,
    pub offset_bits: u16,
    pub scale: f32,
    pub offset: f32,
}

/// Fits and applies one format's per-group parameters.
#[derive(Debug, Clone, Copy)]
pub struct Quantizer {
    pub format: QuantFormat,
    /// nvfp4's f32 tensor scale (1 for the other formats).
    pub tensor_scale: f32,
}

fn h(v: f32) -> u16 {
    f16::from_f32(v).to_bits()
}

fn hf(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

impl Quantizer {
    pub fn new(format: QuantFormat, tensor_scale: Option<f32>) -> Self {
        Self {
            format,
            tensor_scale: tensor_scale.unwrap_or(1.0),
        }
    }

    /// nvfp4's tensor scale for a whole matrix: its absolute maximum over 448 * 6, so the
    /// largest block scale lands at the top of E4M3's range.
    pub fn nvfp4_tensor_scale(values: &[f32]) -> f32 {
        let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if amax > 0.0 && amax.is_finite() {
            amax / (448.0 * 6.0)
        } else {
            1.0
        }
    }

    /// Parameters from their stored bits.
    pub fn params(&self, scale_bits: u16, offset_bits: u16) -> GroupParams {
        let scale = match self.format {
            QuantFormat::Mxfp4 => e8m0_to_f32(scale_bits as u8),
            QuantFormat::Nvfp4 => e4m3_to_f32(scale_bits as u8) * self.tensor_scale,
            _ => hf(scale_bits),
        };
        let offset = if self.format.is_asym() {
            hf(offset_bits)
        } else {
            0.0
        };
        GroupParams {
            scale_bits,
            offset_bits,
            scale,
            offset,
        }
    }

    fn max_code(&self) -> u32 {
        (1u32 << self.format.bits()) - 1
    }

    /// The code nearest `v` given a group's parameters.
    #[inline]
    pub fn quantize(&self, p: &GroupParams, v: f32) -> u8 {
        match self.format {
            QuantFormat::Int { bits, asym } => {
                if p.scale == 0.0 || !p.scale.is_finite() {
                    return if asym { 0 } else { 1 << (bits - 1) };
                }
                let q = if asym {
                    ((v - p.offset) / p.scale).round()
                } else {
                    (v / p.scale).round() + (1u32 << (bits - 1)) as f32
                };
                q.clamp(0.0, self.max_code() as f32) as u8
            }
            QuantFormat::Fp8 => {
                if p.scale == 0.0 {
                    0
                } else {
                    f32_to_e4m3(v / p.scale)
                }
            }
            _ => {
                if p.scale == 0.0 {
                    0
                } else {
                    f32_to_e2m1(v / p.scale)
                }
            }
        }
    }

    /// The value of code `c`, exactly as every kernel computes it.
    #[inline]
    pub fn dequantize(&self, p: &GroupParams, c: u8) -> f32 {
        let q = self.format.code_value(c);
        if self.format.is_asym() {
            q * p.scale + p.offset
        } else {
            q * p.scale
        }
    }

    /// The parameters of one group found by search: candidate scales around the plain
    /// max/qmax choice (and for asymmetric formats, ranges shrunk about the centre or the
    /// minimum), each followed by one least-squares refit; the lowest squared error wins.
    pub fn fit(&self, values: &[f32]) -> GroupParams {
        self.fit_weighted(values, None)
    }

    /// `fit` minimising a weighted squared error (e.g. by the diagonal of XᵀX).
    pub fn fit_weighted(&self, values: &[f32], weights: Option<&[f32]>) -> GroupParams {
        // The search's arithmetic is vector-friendly (see `Candidates`); compiled for the CPU's
        // vector width it runs several times faster, with the same IEEE operations and results.
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
            unsafe fn avx512(
                q: &Quantizer,
                values: &[f32],
                weights: Option<&[f32]>,
            ) -> GroupParams {
                q.search(values, weights)
            }
            #[target_feature(enable = "avx2")]
            unsafe fn avx2(q: &Quantizer, values: &[f32], weights: Option<&[f32]>) -> GroupParams {
                q.search(values, weights)
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
            {
                // SAFETY: the features were detected at run time.
                return unsafe { avx512(self, values, weights) };
            }
            if is_x86_feature_detected!("avx2") {
                // SAFETY: as above.
                return unsafe { avx2(self, values, weights) };
            }
        }
        self.search(values, weights)
    }

    /// The search behind [`Self::fit_weighted`]. Its candidates are listed first (each base
    /// candidate followed by its least-squares refit, which depends only on the base), then every
    /// candidate's error is summed in one pass over the values, and the first candidate with the
    /// lowest error wins. Each sum runs over the values in order, so the errors, and the winner,
    /// are those of trying the candidates one after another.
    #[inline(always)]
    fn search(&self, values: &[f32], weights: Option<&[f32]>) -> GroupParams {
        let (mut lo, mut hi, mut amax, mut extreme) = (f32::MAX, f32::MIN, 0.0f32, 0.0f32);
        for &v in values {
            lo = lo.min(v);
            hi = hi.max(v);
            if v.abs() > amax {
                amax = v.abs();
                extreme = v;
            }
        }
        // Base candidates, each marked whether the search refits it.
        let mut bases = Candidates::default();
        let mut refit = [false; MAX_CANDIDATES];
        let mut base = |p: GroupParams, wants_refit: bool| {
            refit[bases.len] = wants_refit;
            bases.push(p);
        };
        let fraction = |i: usize| 1.0 - 0.5 * i as f32 / CANDIDATES as f32;
        match self.format {
            QuantFormat::Int { bits, asym } => {
                let maxc = self.max_code() as f32;
                if asym {
                    if hi <= lo {
                        base(self.params(0, h(lo)), false);
                    }
                    for i in 0..CANDIDATES / 2 {
                        let f = fraction(2 * i);
                        let range = (hi - lo) * f;
                        for b in [lo + (hi - lo) * (1.0 - f) * 0.5, lo] {
                            base(self.params(h(range / maxc), h(b)), true);
                        }
                    }
                } else {
                    let bias = (1u32 << (bits - 1)) as f32;
                    base(self.params(0, 0), false);
                    for i in 0..CANDIDATES / 2 {
                        let f = fraction(2 * i);
                        for s in [extreme / -bias * f, amax / (bias - 1.0).max(1.0) * f] {
                            base(self.params(h(s), 0), true);
                        }
                    }
                }
            }
            QuantFormat::Fp8 | QuantFormat::Fp4 => {
                let top = if self.format == QuantFormat::Fp8 {
                    448.0
                } else {
                    6.0
                };
                base(self.params(0, 0), false);
                for i in 0..CANDIDATES {
                    base(self.params(h(amax / top * fraction(i)), 0), true);
                }
            }
            QuantFormat::Mxfp4 => {
                // OCP's choice is floor(log2(amax)) - 2 (E2M1's largest exponent); its
                // neighbours are tried too.
                let e0 = if amax > 0.0 {
                    amax.log2().floor() as i32 - 2
                } else {
                    -127
                };
                for e in [e0 - 1, e0, e0 + 1] {
                    base(self.params((e + 127).clamp(0, 254) as u16, 0), false);
                }
            }
            QuantFormat::Nvfp4 => {
                base(self.params(0, 0), false);
                let target = amax / 6.0 / self.tensor_scale;
                let mut last = u16::MAX;
                for i in 0..CANDIDATES {
                    let code = f32_to_e4m3(target * fraction(i)) as u16;
                    if code != last {
                        last = code;
                        base(self.params(code, 0), true);
                    }
                }
            }
        }
        let refits = self.refits(&bases, values, weights);
        let mut all = Candidates::default();
        for k in 0..bases.len {
            all.push(bases.params[k]);
            if let (true, Some(r)) = (refit[k], refits[k]) {
                all.push(r);
            }
        }
        let errors = self.errors(&all, values, weights);
        let mut best: Option<(f64, GroupParams)> = None;
        for (p, &e) in all.params[..all.len].iter().zip(&errors) {
            if !p.scale.is_finite() || !p.offset.is_finite() {
                continue;
            }
            if best.is_none_or(|(b, _)| e < b) {
                best = Some((e, *p));
            }
        }
        best.map(|(_, p)| p).unwrap_or_else(|| self.params(0, 0))
    }

    /// `out[k]` = the code value (before scaling) that `v` quantizes to under candidate k, for
    /// every candidate at once: `code_value(quantize(p_k, v))`, written without branches so it
    /// runs across candidates in vector registers.
    #[inline(always)]
    fn code_values(&self, v: f32, c: &Candidates, out: &mut [f32; MAX_CANDIDATES]) {
        let lanes = c.lanes();
        match self.format {
            QuantFormat::Int { bits, asym } => {
                let bias = (1u32 << (bits - 1)) as f32;
                let maxc = self.max_code() as f32;
                let params = c.scale[..lanes].iter().zip(&c.offset[..lanes]);
                for (out, (&s, &o)) in out[..lanes].iter_mut().zip(params) {
                    let q = if asym {
                        ((v - o) / s).round()
                    } else {
                        (v / s).round() + bias
                    };
                    // `quantize` casts the clamped value to u8, which maps NaN to 0.
                    let q = q.clamp(0.0, maxc);
                    let q = if q.is_nan() { 0.0 } else { q };
                    // A zero or non-finite scale gives the format's zero code.
                    let q = if s == 0.0 || !s.is_finite() {
                        if asym {
                            0.0
                        } else {
                            bias
                        }
                    } else {
                        q
                    };
                    *out = if asym { q } else { q - bias };
                }
            }
            QuantFormat::Fp8 => {
                for (out, p) in out[..lanes].iter_mut().zip(&c.params[..lanes]) {
                    *out = self.format.code_value(self.quantize(p, v));
                }
            }
            QuantFormat::Fp4 | QuantFormat::Mxfp4 | QuantFormat::Nvfp4 => {
                for (out, &s) in out[..lanes].iter_mut().zip(&c.scale[..lanes]) {
                    let x = v / s;
                    let a = x.abs();
                    // `f32_to_e2m1`'s thresholds, counted: each one passed adds the step to
                    // the next E2M1 magnitude (all sums exact). NaN passes none: code 0.
                    let step = |passed: bool, by: f32| if passed { by } else { 0.0 };
                    let m = step(a > 0.25, 0.5)
                        + step(a >= 0.75, 0.5)
                        + step(a > 1.25, 0.5)
                        + step(a >= 1.75, 0.5)
                        + step(a > 2.5, 1.0)
                        + step(a >= 3.5, 1.0)
                        + step(a > 5.0, 2.0);
                    // The sign bit is set only on a non-zero magnitude; a zero scale gives code 0.
                    let q = if x.is_sign_negative() && m != 0.0 {
                        -m
                    } else {
                        m
                    };
                    *out = if s == 0.0 { 0.0 } else { q };
                }
            }
        }
    }

    /// Every candidate's (weighted) squared error over the group, each summed in value order.
    #[inline(always)]
    fn errors(
        &self,
        c: &Candidates,
        values: &[f32],
        weights: Option<&[f32]>,
    ) -> [f64; MAX_CANDIDATES] {
        let asym = self.format.is_asym();
        let mut err = [0.0f64; MAX_CANDIDATES];
        let mut q = [0.0f32; MAX_CANDIDATES];
        for (i, &v) in values.iter().enumerate() {
            self.code_values(v, c, &mut q);
            let w = weights.map_or(1.0, |w| w[i] as f64);
            for k in 0..c.lanes() {
                let deq = if asym {
                    q[k] * c.scale[k] + c.offset[k]
                } else {
                    q[k] * c.scale[k]
                };
                let d = (v - deq) as f64;
                err[k] += d * d * w;
            }
        }
        err
    }

    /// Every candidate's least-squares refit of (scale, offset) to the codes it gives:
    /// asymmetric fits both, the others the scale alone.
    #[inline(always)]
    fn refits(
        &self,
        c: &Candidates,
        values: &[f32],
        weights: Option<&[f32]>,
    ) -> [Option<GroupParams>; MAX_CANDIDATES] {
        let mut out = [None; MAX_CANDIDATES];
        if self.format == QuantFormat::Mxfp4 {
            return out;
        }
        let (mut sw, mut sq, mut sv, mut sqq, mut sqv) = (
            [0.0f64; MAX_CANDIDATES],
            [0.0; MAX_CANDIDATES],
            [0.0; MAX_CANDIDATES],
            [0.0; MAX_CANDIDATES],
            [0.0; MAX_CANDIDATES],
        );
        let mut codes = [0.0f32; MAX_CANDIDATES];
        for (i, &v) in values.iter().enumerate() {
            self.code_values(v, c, &mut codes);
            let w = weights.map_or(1.0, |w| w[i] as f64);
            for k in 0..c.lanes() {
                let q = codes[k] as f64;
                sw[k] += w;
                sq[k] += w * q;
                sv[k] += w * v as f64;
                sqq[k] += w * q * q;
                sqv[k] += w * q * v as f64;
            }
        }
        for (k, out) in out[..c.len].iter_mut().enumerate() {
            let (sw, sq, sv, sqq, sqv) = (sw[k], sq[k], sv[k], sqq[k], sqv[k]);
            *out = match self.format {
                QuantFormat::Int { asym: true, .. } => {
                    let den = sw * sqq - sq * sq;
                    if den.abs() < 1e-12 || sw == 0.0 {
                        None
                    } else {
                        let s = (sw * sqv - sq * sv) / den;
                        let o = (sv - s * sq) / sw;
                        Some(self.params(h(s as f32), h(o as f32)))
                    }
                }
                QuantFormat::Int { .. } | QuantFormat::Fp8 | QuantFormat::Fp4 => {
                    (sqq > 0.0).then(|| self.params(h((sqv / sqq) as f32), 0))
                }
                QuantFormat::Nvfp4 => (sqq > 0.0).then(|| {
                    let p = &c.params[k];
                    let s = (sqv / sqq) as f32 / p.scale * p.scale / self.tensor_scale;
                    self.params(f32_to_e4m3(s) as u16, 0)
                }),
                QuantFormat::Mxfp4 => None,
            };
        }
        out
    }
}

/// Candidates of the largest search: a fixed start, then CANDIDATES bases each with its refit.
/// A multiple of 16, so the candidate loops run in whole AVX-512 registers.
const MAX_CANDIDATES: usize = (1 + 2 * CANDIDATES).next_multiple_of(16);

/// A search's candidates in the order it considers them, with their scales and offsets in
/// arrays of their own so one value can be tried against all of them in a vector loop. Slots
/// past `len` hold zero parameters and are never read back.
#[derive(Clone, Copy)]
struct Candidates {
    params: [GroupParams; MAX_CANDIDATES],
    scale: [f32; MAX_CANDIDATES],
    offset: [f32; MAX_CANDIDATES],
    len: usize,
}

impl Default for Candidates {
    fn default() -> Self {
        Self {
            params: [GroupParams::default(); MAX_CANDIDATES],
            scale: [0.0; MAX_CANDIDATES],
            offset: [0.0; MAX_CANDIDATES],
            len: 0,
        }
    }
}

impl Candidates {
    fn push(&mut self, p: GroupParams) {
        self.params[self.len] = p;
        self.scale[self.len] = p.scale;
        self.offset[self.len] = p.offset;
        self.len += 1;
    }

    /// Slots the vector loops cover: `len` rounded up to whole registers of 16.
    fn lanes(&self) -> usize {
        self.len.next_multiple_of(16).min(MAX_CANDIDATES)
    }
}

/// Quantizes a row-major `rows` x `cols` matrix with round-to-nearest, `group` columns per
/// group (already resolved: [`QuantFormat::resolve_group`]).
pub fn quantize_rtn(
    values: &[f32],
    rows: usize,
    cols: usize,
    format: QuantFormat,
    group: usize,
) -> Result<QuantTensor> {
    if values.len() != rows * cols {
        return Err(crate::QuantError::Length {
            what: format!("{rows}x{cols} matrix to quantize"),
            expected: rows * cols,
            found: values.len(),
        });
    }
    let tensor_scale =
        (format == QuantFormat::Nvfp4).then(|| Quantizer::nvfp4_tensor_scale(values));
    let q = Quantizer::new(format, tensor_scale);
    let mut t = QuantTensor::zeroed(format, rows, cols, group, tensor_scale)?;
    let (bits, rb, groups, sb) = (
        format.bits(),
        row_bytes(format.bits(), cols),
        t.groups_per_row(),
        format.scale_bytes(),
    );
    let ob = if format.is_asym() { groups * 2 } else { 0 };
    let per_row: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let row = &values[r * cols..(r + 1) * cols];
            let mut codes = vec![0u8; cols];
            let (mut packed, mut sc, mut off) =
                (vec![0u8; rb], vec![0u8; groups * sb], vec![0u8; ob]);
            for g in 0..groups {
                let vals = &row[g * group..(g + 1) * group];
                let p = q.fit(vals);
                for (c, &v) in codes[g * group..(g + 1) * group].iter_mut().zip(vals) {
                    *c = q.quantize(&p, v);
                }
                if sb == 2 {
                    sc[2 * g..2 * g + 2].copy_from_slice(&p.scale_bits.to_le_bytes());
                } else {
                    sc[g] = p.scale_bits as u8;
                }
                if ob > 0 {
                    off[2 * g..2 * g + 2].copy_from_slice(&p.offset_bits.to_le_bytes());
                }
            }
            pack_row(&codes, bits, &mut packed);
            (packed, sc, off)
        })
        .collect();
    for (r, (c, s, o)) in per_row.into_iter().enumerate() {
        t.codes[r * rb..(r + 1) * rb].copy_from_slice(&c);
        t.scales[r * groups * sb..(r + 1) * groups * sb].copy_from_slice(&s);
        if let Some(offsets) = &mut t.offsets {
            offsets[r * ob..(r + 1) * ob].copy_from_slice(&o);
        }
    }
    Ok(t)
}

/// Relative RMS error of `approx` against `exact`: sqrt(sum (a - e)^2 / sum e^2).
pub fn relative_rms(exact: &[f32], approx: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&e, &a) in exact.iter().zip(approx) {
        num += (a as f64 - e as f64).powi(2);
        den += (e as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// E2M1's largest magnitude, for callers sizing scales.
pub const E2M1_MAX: f32 = E2M1[7];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::QuantFormat as F;

    /// The search as it was written before its candidates were batched: one candidate at a
    /// time, each error and refit a loop of its own. The batched search must pick the same
    /// parameters, bit for bit.
    mod reference {
        use super::super::*;

        /// Sum of (weighted) squared errors of the group under `p`.
        pub fn error(
            qz: &Quantizer,
            p: &GroupParams,
            values: &[f32],
            weights: Option<&[f32]>,
        ) -> f64 {
            let mut err = 0.0f64;
            for (i, &v) in values.iter().enumerate() {
                let d = (v - qz.dequantize(p, qz.quantize(p, v))) as f64;
                err += d * d * weights.map_or(1.0, |w| w[i] as f64);
            }
            err
        }

        /// Least-squares refit of (scale, offset) to the codes `p` gives: asymmetric fits both,
        /// the others the scale alone.
        fn refit(
            qz: &Quantizer,
            p: &GroupParams,
            values: &[f32],
            weights: Option<&[f32]>,
        ) -> Option<GroupParams> {
            let (mut sw, mut sq, mut sv, mut sqq, mut sqv) = (0.0f64, 0.0, 0.0, 0.0, 0.0);
            for (i, &v) in values.iter().enumerate() {
                let w = weights.map_or(1.0, |w| w[i] as f64);
                let q = qz.format.code_value(qz.quantize(p, v)) as f64;
                sw += w;
                sq += w * q;
                sv += w * v as f64;
                sqq += w * q * q;
                sqv += w * q * v as f64;
            }
            match qz.format {
                QuantFormat::Int { asym: true, .. } => {
                    let den = sw * sqq - sq * sq;
                    if den.abs() < 1e-12 || sw == 0.0 {
                        return None;
                    }
                    let s = (sw * sqv - sq * sv) / den;
                    let o = (sv - s * sq) / sw;
                    Some(qz.params(h(s as f32), h(o as f32)))
                }
                QuantFormat::Int { .. } | QuantFormat::Fp8 | QuantFormat::Fp4 => {
                    if sqq <= 0.0 {
                        return None;
                    }
                    Some(qz.params(h((sqv / sqq) as f32), 0))
                }
                QuantFormat::Nvfp4 => {
                    if sqq <= 0.0 {
                        return None;
                    }
                    let s = (sqv / sqq) as f32 / p.scale * p.scale / qz.tensor_scale;
                    Some(qz.params(f32_to_e4m3(s) as u16, 0))
                }
                QuantFormat::Mxfp4 => None,
            }
        }

        /// `Quantizer::fit_weighted`.
        pub fn fit(qz: &Quantizer, values: &[f32], weights: Option<&[f32]>) -> GroupParams {
            let (mut lo, mut hi, mut amax, mut extreme) = (f32::MAX, f32::MIN, 0.0f32, 0.0f32);
            for &v in values {
                lo = lo.min(v);
                hi = hi.max(v);
                if v.abs() > amax {
                    amax = v.abs();
                    extreme = v;
                }
            }
            let mut best: Option<(f64, GroupParams)> = None;
            let mut consider = |p: GroupParams| {
                if !p.scale.is_finite() || !p.offset.is_finite() {
                    return;
                }
                let e = error(qz, &p, values, weights);
                if best.is_none_or(|(b, _)| e < b) {
                    best = Some((e, p));
                }
            };
            let fraction = |i: usize| 1.0 - 0.5 * i as f32 / CANDIDATES as f32;
            match qz.format {
                QuantFormat::Int { bits, asym } => {
                    let maxc = qz.max_code() as f32;
                    if asym {
                        if hi <= lo {
                            consider(qz.params(0, h(lo)));
                        }
                        for i in 0..CANDIDATES / 2 {
                            let f = fraction(2 * i);
                            let range = (hi - lo) * f;
                            for base in [lo + (hi - lo) * (1.0 - f) * 0.5, lo] {
                                let p = qz.params(h(range / maxc), h(base));
                                consider(p);
                                if let Some(r) = refit(qz, &p, values, weights) {
                                    consider(r);
                                }
                            }
                        }
                    } else {
                        let bias = (1u32 << (bits - 1)) as f32;
                        consider(qz.params(0, 0));
                        for i in 0..CANDIDATES / 2 {
                            let f = fraction(2 * i);
                            for s in [extreme / -bias * f, amax / (bias - 1.0).max(1.0) * f] {
                                let p = qz.params(h(s), 0);
                                consider(p);
                                if let Some(r) = refit(qz, &p, values, weights) {
                                    consider(r);
                                }
                            }
                        }
                    }
                }
                QuantFormat::Fp8 | QuantFormat::Fp4 => {
                    let top = if qz.format == QuantFormat::Fp8 {
                        448.0
                    } else {
                        6.0
                    };
                    consider(qz.params(0, 0));
                    for i in 0..CANDIDATES {
                        let p = qz.params(h(amax / top * fraction(i)), 0);
                        consider(p);
                        if let Some(r) = refit(qz, &p, values, weights) {
                            consider(r);
                        }
                    }
                }
                QuantFormat::Mxfp4 => {
                    // OCP's choice is floor(log2(amax)) - 2 (E2M1's largest exponent); its
                    // neighbours are tried too.
                    let e0 = if amax > 0.0 {
                        amax.log2().floor() as i32 - 2
                    } else {
                        -127
                    };
                    for e in [e0 - 1, e0, e0 + 1] {
                        consider(qz.params((e + 127).clamp(0, 254) as u16, 0));
                    }
                }
                QuantFormat::Nvfp4 => {
                    consider(qz.params(0, 0));
                    let target = amax / 6.0 / qz.tensor_scale;
                    let mut last = u16::MAX;
                    for i in 0..CANDIDATES {
                        let code = f32_to_e4m3(target * fraction(i)) as u16;
                        if code != last {
                            last = code;
                            let p = qz.params(code, 0);
                            consider(p);
                            if let Some(r) = refit(qz, &p, values, weights) {
                                consider(r);
                            }
                        }
                    }
                }
            }
            best.map(|(_, p)| p).unwrap_or_else(|| qz.params(0, 0))
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // Roughly Gaussian: sum of uniforms, with an occasional outlier.
                let u = (0..4)
                    .map(|k| ((s >> (16 * k)) & 0xffff) as f32 / 65536.0)
                    .sum::<f32>()
                    - 2.0;
                if s.is_multiple_of(97) {
                    u * 6.0
                } else {
                    u * 0.05
                }
            })
            .collect()
    }

    #[test]
    fn every_format_quantizes_and_dequantizes_consistently() {
        let (rows, cols) = (5, 256);
        let v = values(rows * cols, 1);
        for f in F::ALL {
            let g = f.resolve_group(f.default_group(), cols).unwrap();
            let t = quantize_rtn(&v, rows, cols, f, g).unwrap();
            t.validate().unwrap();
            let d = t.dequantize();
            let err = relative_rms(&v, &d);
            let bound = match f.bits() {
                8 => 0.02,
                4 => 0.2,
                3 => 0.35,
                _ => 0.7,
            };
            assert!(err < bound, "{f}: relative RMS {err}");
            // The per-value API gives the tensor's values.
            let q = Quantizer::new(f, t.tensor_scale);
            for r in 0..rows {
                for gi in 0..cols / g {
                    let sb = f.scale_bytes();
                    let i = r * (cols / g) + gi;
                    let sbits = if sb == 2 {
                        u16::from_le_bytes([t.scales[2 * i], t.scales[2 * i + 1]])
                    } else {
                        t.scales[i] as u16
                    };
                    let obits = t
                        .offsets
                        .as_ref()
                        .map_or(0, |o| u16::from_le_bytes([o[2 * i], o[2 * i + 1]]));
                    let p = q.params(sbits, obits);
                    for j in gi * g..(gi + 1) * g {
                        let c = q.quantize(&p, v[r * cols + j]);
                        assert_eq!(
                            q.dequantize(&p, c).to_bits(),
                            d[r * cols + j].to_bits(),
                            "{f}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn batched_search_picks_what_the_one_by_one_search_picked() {
        let groups: Vec<Vec<f32>> = {
            let mut g: Vec<Vec<f32>> = values(32 * 400, 7)
                .chunks(32)
                .map(<[f32]>::to_vec)
                .collect();
            // Edge cases: all zero, constant, one outlier, tiny, negative-only, huge, 16 wide.
            g.push(vec![0.0; 32]);
            g.push(vec![0.37; 32]);
            g.push(
                (0..32)
                    .map(|i| if i == 5 { 40.0 } else { 0.01 * i as f32 })
                    .collect(),
            );
            g.push((0..32).map(|i| 1e-7 * i as f32).collect());
            g.push((0..32).map(|i| -0.5 - 0.01 * i as f32).collect());
            g.push((0..32).map(|i| 3e4 * (i as f32 - 16.0)).collect());
            g.push(values(16, 9));
            g
        };
        let weights: Vec<f32> = (0..32).map(|i| 0.1 + (i % 7) as f32).collect();
        for f in F::ALL {
            let q = Quantizer::new(f, (f == F::Nvfp4).then_some(2.5e-4));
            for g in &groups {
                for w in [None, Some(&weights[..g.len()])] {
                    let (ours, theirs) = (q.fit_weighted(g, w), reference::fit(&q, g, w));
                    assert_eq!(
                        (ours.scale_bits, ours.offset_bits),
                        (theirs.scale_bits, theirs.offset_bits),
                        "{f}: {g:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn search_beats_plain_max_scaling() {
        // Gaussian-like values without outliers: clipping the group maximum pays.
        let v: Vec<f32> = values(4096, 2)
            .into_iter()
            .map(|x| x.clamp(-0.1, 0.1))
            .collect();
        let f = F::Int {
            bits: 4,
            asym: false,
        };
        let q = Quantizer::new(f, None);
        let (mut searched, mut plain) = (0.0, 0.0);
        for g in v.chunks(32) {
            let p = q.fit(g);
            searched += reference::error(&q, &p, g, None);
            let amax = g.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            plain += reference::error(&q, &q.params(h(amax / 7.0), 0), g, None);
        }
        assert!(searched < 0.95 * plain, "{searched} vs {plain}");
    }

    #[test]
    fn exact_grid_values_are_reproduced() {
        // Values on an int4-asym grid come back exactly.
        let (s, o) = (0.01f32, -0.07f32);
        let (s, o) = (hf(h(s)), hf(h(o)));
        let v: Vec<f32> = (0..64).map(|i| ((i * 5) % 16) as f32 * s + o).collect();
        let t = quantize_rtn(
            &v,
            2,
            32,
            F::Int {
                bits: 4,
                asym: true,
            },
            32,
        )
        .unwrap();
        assert_eq!(t.dequantize(), v);
    }
}
