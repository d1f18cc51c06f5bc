//! int4/int8 weights times integer activations on AVX-512 VNNI.
//!
//! The activations of a matmul are quantized per row in blocks of 32 (`d = amax / 127`,
//! `q = round(x / d)`, as GGML quantizes activations for its Q4_0/Q8_0 dot products); one
//! `vpdpbusd` then multiplies 4 unsigned weight codes by 4 signed activations for 16 output
//! features at once, 64 multiply-adds per instruction, where the f32 path needs about 7 vector
//! ops to decode 16 weights before its FMAs. Integer sums are exact; each 32-block's sum is
//! scaled by `d` times its group's scales (and its offsets added), always in the same order, so a
//! row's result does not depend on the rows computed with it.
//!
//! Two precisions ([`Activations`]): `Int8` keeps that one code per activation (a block's values
//! are off by up to `amax / 254`, which on SmolLM2 flips greedy answers); `Int16` adds a second
//! code for the remainder, `lo = round((x / d - q) * 128)` in -64..=64, so
//! `x = d * (q + lo / 128)` within `amax / 32512` — about f16's precision — for a second
//! `vpdpbusd` chain per row: `(sum c*q) * 128 + sum c*lo` is still one exact integer per block.
//!
//! Layout (built once at upload): output features in tiles of 16, each tile one contiguous
//! stream over k, group after group: the group's 32-column blocks of codes, then its 16 f16
//! scales, then (asymmetric formats) its 16 f16 offsets. A block is 16 features x 32 columns as
//! 64-byte vectors whose 32-bit lane `f` holds 4 consecutive columns of feature `f`:
//! - int8: vector `c` (0..8) holds columns `4c..4c+4`;
//! - int4: vector `v` (0..4) holds columns `4v..4v+4` in its low nibbles and `16+4v..16+4v+4` in
//!   its high ones, so one AND and one shift+AND give two `vpdpbusd` operands.
//!
//! Weights are `s * (c - 2^(b-1))` (symmetric) or `s * c + o` (asymmetric), `c` the unsigned
//! code: the integer sum of `c * q` less `2^(b-1) * sum(q)` is exact, and an offset adds
//! `o * d * sum(q)` per block. The f16 scales are the format's own, so this layout
//! holds the same values as `marlin_quant`'s (tested), in 4.5 (int4, group 32) or 8.5 bits a
//! weight.
//!
//! Bound: decode streams the tiles once (memory); prefill is bound by `vpdpbusd` throughput
//! (one 512-bit op per cycle per core: ~330 G int8 multiply-adds/s on 2 cores at 2.6 GHz).

use super::{Activations, SyncPtr};
use half::f16;
use marlin_quant::packed::get_code;
use marlin_quant::{QuantFormat, QuantTensor};
use rayon::prelude::*;
use rayon::ThreadPool;
use std::cell::RefCell;

/// Activation block: one int8 scale per 32 activations.
pub(crate) const BLOCK: usize = 32;
/// Output features per tile: the 16 lanes of a 512-bit vector.
const LANES: usize = 16;
/// Rows one tile call covers: 8 weight vectors + 2 accumulators a row fill the 32 registers.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 8;
/// Rows per task: 64 x k int8 activations stay in L2 while a chunk of tiles passes. Up to this
/// many rows (decode, batched decode) every task covers all rows, so each tile is read from
/// memory once.
const ROW_BLOCK: usize = 64;
/// How far ahead of the block being read the weight stream is prefetched.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 2048;

/// Whether this machine can run the integer path.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An int4 or int8 weight in the tiled layout above.
pub struct IntWeight {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    group: usize,
    bits: usize,
    asym: bool,
    pub(crate) perm: Option<Vec<u32>>,
    /// Activations carry a second, low code (`Activations::Int16`).
    lo: bool,
    data: Vec<u8>,
}

impl IntWeight {
    /// Whether `t` fits the integer path: int4/int8 with groups and rows of whole 32-blocks.
    pub(crate) fn supports(t: &QuantTensor) -> bool {
        matches!(t.format, QuantFormat::Int { bits: 4 | 8, .. })
            && t.cols % BLOCK == 0
            && t.group % BLOCK == 0
    }

    fn block_bytes(&self) -> usize {
        LANES * BLOCK * self.bits / 8
    }

    fn group_bytes(&self) -> usize {
        self.group / BLOCK * self.block_bytes() + LANES * 2 * (1 + self.asym as usize)
    }

    fn tile_bytes(&self) -> usize {
        self.cols / self.group * self.group_bytes()
    }

    /// Re-lays a validated tensor (the caller has checked `supports`), to run against
    /// `activations` (`Int8` or `Int16`).
    pub(crate) fn new(t: &QuantTensor, activations: Activations) -> Self {
        let QuantFormat::Int { bits, asym } = t.format else {
            unreachable!("checked by supports")
        };
        let mut w = Self {
            rows: t.rows,
            cols: t.cols,
            group: t.group,
            bits: bits as usize,
            asym,
            perm: t.perm.clone(),
            lo: activations == Activations::Int16,
            data: Vec::new(),
        };
        let (tile_bytes, group_bytes, block_bytes) =
            (w.tile_bytes(), w.group_bytes(), w.block_bytes());
        let mut data = vec![0u8; t.rows.div_ceil(LANES) * tile_bytes];
        let row_bytes = t.row_bytes();
        data.par_chunks_mut(tile_bytes)
            .enumerate()
            .for_each(|(tile, out)| {
                for lane in 0..LANES.min(t.rows - tile * LANES) {
                    let r = tile * LANES + lane;
                    let codes = &t.codes[r * row_bytes..(r + 1) * row_bytes];
                    for g in 0..t.cols / t.group {
                        let gp = &mut out[g * group_bytes..(g + 1) * group_bytes];
                        for col in 0..t.group {
                            let c = get_code(codes, w.bits, g * t.group + col);
                            let (block, i) = (col / BLOCK, col % BLOCK);
                            let base = block * block_bytes + lane * 4 + i % 4;
                            if w.bits == 8 {
                                gp[base + i / 4 * 64] = c;
                            } else {
                                let v = (i % 16) / 4;
                                gp[base + v * 64] |= c << (4 * (i / 16));
                            }
                        }
                        let params = &mut gp[t.group / BLOCK * block_bytes..];
                        let put = |p: &mut [u8], at: usize, v: f32| {
                            p[2 * at..2 * at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes())
                        };
                        put(params, lane, t.group_scale(r, g));
                        if asym {
                            put(params, LANES + lane, t.group_offset(r, g));
                        }
                    }
                }
            });
        w.data = data;
        w
    }

    /// Row `r` over the input columns, bitwise `QuantTensor::dequantize_row`.
    pub(crate) fn row_into(&self, r: usize, out: &mut [f32]) {
        let (tile, lane) = (r / LANES, r % LANES);
        let t = &self.data[tile * self.tile_bytes()..];
        let bias = if self.asym {
            0.0
        } else {
            (1 << (self.bits - 1)) as f32
        };
        for g in 0..self.cols / self.group {
            let gp = &t[g * self.group_bytes()..];
            let params = &gp[self.group / BLOCK * self.block_bytes()..];
            let param = |at: usize| f16::from_le_bytes([params[2 * at], params[2 * at + 1]]);
            let s = param(lane).to_f32();
            let o = if self.asym {
                param(LANES + lane).to_f32()
            } else {
                0.0
            };
            for col in 0..self.group {
                let (block, i) = (col / BLOCK, col % BLOCK);
                let base = block * self.block_bytes() + lane * 4 + i % 4;
                let c = if self.bits == 8 {
                    gp[base + i / 4 * 64]
                } else {
                    gp[base + (i % 16) / 4 * 64] >> (4 * (i / 16)) & 15
                };
                let q = c as f32 - bias;
                let stored = g * self.group + col;
                let dst = self.perm.as_ref().map_or(stored, |p| p[stored] as usize);
                out[dst] = if self.asym { q * s + o } else { q * s };
            }
        }
    }
}

/// Rows of activations quantized per 32-block: codes (and low codes for `Int16`), block
/// scales, and block code sums. For `Int16` a block's scale is `d / 128` and its sum
/// `128 * sum(q) + sum(lo)`, so both precisions apply them alike.
#[derive(Default)]
pub(crate) struct QuantizedRows {
    pub(crate) codes: Vec<i8>,
    pub(crate) lo: Vec<i8>,
    pub(crate) scales: Vec<f32>,
    pub(crate) sums: Vec<i32>,
}

thread_local! {
    /// The calling thread's quantized activations and act-order gather, reused across calls.
    static SCRATCH: RefCell<(QuantizedRows, Vec<f32>)> = RefCell::new(Default::default());
}

/// `out[r, n] = sum_k x[r, k] * W[n, k]` through int8 activations. Caller has checked
/// `x.len() >= rows * k` and `out.len() >= rows * n`, and that this machine has VNNI.
pub(crate) fn matmul(pool: &ThreadPool, w: &IntWeight, x: &[f32], rows: usize, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    if rows == 0 || n == 0 {
        return;
    }
    SCRATCH.with_borrow_mut(|(qx, gathered)| {
        let x = match &w.perm {
            None => &x[..rows * k],
            Some(perm) => {
                gathered.clear();
                gathered.extend(
                    (0..rows).flat_map(|r| perm.iter().map(move |&p| x[r * k + p as usize])),
                );
                &gathered[..]
            }
        };
        quantize_rows(pool, x, rows, k, w.lo, qx);
        let tiles = n.div_ceil(LANES);
        let threads = pool.current_num_threads();
        let (row_block, tile_chunk) = if rows <= ROW_BLOCK {
            // Four tasks per thread so work stealing evens out.
            (rows, tiles.div_ceil(threads * 4))
        } else {
            (ROW_BLOCK, 4)
        };
        let (blocks, chunks) = (rows.div_ceil(row_block), tiles.div_ceil(tile_chunk));
        let out = SyncPtr(out.as_mut_ptr());
        let qx = &*qx;
        pool.install(|| {
            (0..blocks * chunks).into_par_iter().for_each(|t| {
                let (chunk, block) = (t / blocks, t % blocks);
                let (r0, r1) = (block * row_block, ((block + 1) * row_block).min(rows));
                let (t0, t1) = (chunk * tile_chunk, ((chunk + 1) * tile_chunk).min(tiles));
                // SAFETY: tasks write disjoint (rows, features) rectangles of out; the VNNI
                // features were checked when the weight took this path.
                unsafe { run_tiles(w, qx, r0, r1, t0, t1, out.get()) }
            })
        });
    })
}

/// Quantizes `rows` rows of `k` activations (k a multiple of 32) into `q`, with low codes
/// when `lo`.
pub(crate) fn quantize_rows(
    pool: &ThreadPool,
    x: &[f32],
    rows: usize,
    k: usize,
    lo: bool,
    q: &mut QuantizedRows,
) {
    let blocks = rows * k / BLOCK;
    q.codes.resize(rows * k, 0);
    // Without low codes the kernel never reads them; the slices below still need a block each.
    q.lo.resize(if lo { rows * k } else { BLOCK }, 0);
    q.scales.resize(blocks, 0.0);
    q.sums.resize(blocks, 0);
    let lo_step = if lo { BLOCK } else { 0 };
    let (codes, lows) = (SyncPtr(q.codes.as_mut_ptr()), SyncPtr(q.lo.as_mut_ptr()));
    let (scales, sums) = (SyncPtr(q.scales.as_mut_ptr()), SyncPtr(q.sums.as_mut_ptr()));
    let block = |i: usize| {
        // SAFETY: block i lies inside x and every output (sized above), and blocks write
        // disjoint elements; VNNI (AVX-512) was checked by the caller.
        unsafe {
            quantize_block(
                x.as_ptr().add(i * BLOCK),
                codes.get().add(i * BLOCK),
                lo.then(|| lows.get().add(i * lo_step)),
                scales.get().add(i),
                sums.get().add(i),
            )
        }
    };
    if blocks < 1024 {
        (0..blocks).for_each(block);
    } else {
        pool.install(|| (0..blocks).into_par_iter().for_each(block));
    }
}

/// The scale `amax / 127` and the multiplier `127 / amax` of a block (both 0 for a zero block).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the tests' reference uses it
#[inline(always)]
pub(crate) fn block_scale(amax: f32) -> (f32, f32) {
    if amax == 0.0 {
        (0.0, 0.0)
    } else {
        (amax / 127.0, 127.0 / amax)
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// One block: `codes[i] = round_ties_even(y[i])` for `y = x * 127 / amax`, and with `lo`,
/// `lo[i] = round_ties_even((y[i] - codes[i]) * 128)` (the difference and the product are
/// exact in f32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_block(
    x: *const f32,
    codes: *mut i8,
    lo: Option<*mut i8>,
    scale: *mut f32,
    sum: *mut i32,
) {
    let (a, b) = (_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let (d, inv) = block_scale(amax);
    let m = _mm512_set1_ps(inv);
    let (ya, yb) = (_mm512_mul_ps(a, m), _mm512_mul_ps(b, m));
    // cvtps rounds to nearest even under the default MXCSR.
    let (qa, qb) = (_mm512_cvtps_epi32(ya), _mm512_cvtps_epi32(yb));
    _mm_storeu_si128(codes.cast(), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(codes.add(16).cast(), _mm512_cvtepi32_epi8(qb));
    let total = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    match lo {
        None => {
            *scale = d;
            *sum = total;
        }
        Some(lo) => {
            let low = |y, q| {
                let r = _mm512_sub_ps(y, _mm512_cvtepi32_ps(q));
                _mm512_cvtps_epi32(_mm512_mul_ps(r, _mm512_set1_ps(128.0)))
            };
            let (la, lb) = (low(ya, qa), low(yb, qb));
            _mm_storeu_si128(lo.cast(), _mm512_cvtepi32_epi8(la));
            _mm_storeu_si128(lo.add(16).cast(), _mm512_cvtepi32_epi8(lb));
            *scale = d / 128.0;
            *sum = 128 * total + _mm512_reduce_add_epi32(_mm512_add_epi32(la, lb));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_block(_: *const f32, _: *mut i8, _: Option<*mut i8>, _: *mut f32, _: *mut i32) {
    unreachable!("the integer path needs AVX-512 VNNI")
}

/// Rows `r0..r1` against tiles `t0..t1`, in tiles of up to 8 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn run_tiles(
    w: &IntWeight,
    qx: &QuantizedRows,
    r0: usize,
    r1: usize,
    t0: usize,
    t1: usize,
    out: *mut f32,
) {
    macro_rules! rows {
        ($bits:literal, $asym:literal) => {
            if w.lo {
                rows!($bits, $asym, true)
            } else {
                rows!($bits, $asym, false)
            }
        };
        ($bits:literal, $asym:literal, $lo:literal) => {
            for t in t0..t1 {
                for r in (r0..r1).step_by(TILE_ROWS) {
                    // The first row tile streams the weights; later ones find them in L1.
                    let args = (w, qx, r, t, out, r == r0);
                    match (r1 - r).min(TILE_ROWS) {
                        1 => tile::<1, $bits, $asym, $lo>(args),
                        2 => tile::<2, $bits, $asym, $lo>(args),
                        3 => tile::<3, $bits, $asym, $lo>(args),
                        4 => tile::<4, $bits, $asym, $lo>(args),
                        5 => tile::<5, $bits, $asym, $lo>(args),
                        6 => tile::<6, $bits, $asym, $lo>(args),
                        7 => tile::<7, $bits, $asym, $lo>(args),
                        _ => tile::<8, $bits, $asym, $lo>(args),
                    }
                }
            }
        };
    }
    match (w.bits, w.asym) {
        (4, false) => rows!(4, false),
        (4, true) => rows!(4, true),
        (8, false) => rows!(8, false),
        _ => rows!(8, true),
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn run_tiles(
    _: &IntWeight,
    _: &QuantizedRows,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: *mut f32,
) {
    unreachable!("the integer path needs AVX-512 VNNI")
}

/// Rows `r..r + R` against the 16 features of tile `t`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile<const R: usize, const BITS: usize, const ASYM: bool, const LO: bool>(
    (w, qx, r, t, out, prefetch): (&IntWeight, &QuantizedRows, usize, usize, *mut f32, bool),
) {
    let k = w.cols;
    let nb = k / BLOCK;
    let bias = if ASYM { 0 } else { 1i32 << (BITS - 1) };
    let block_bytes = LANES * BLOCK * BITS / 8;
    let blocks_per_group = w.group / BLOCK;
    let codes = qx.codes.as_ptr().add(r * k);
    let lo = qx.lo.as_ptr().add(if LO { r * k } else { 0 });
    let scales = qx.scales.as_ptr().add(r * nb);
    let sums = qx.sums.as_ptr().add(r * nb);
    let mut p = w.data.as_ptr().add(t * w.tile_bytes());
    let mut acc = [_mm512_setzero_ps(); R];
    for g in 0..k / w.group {
        let params = p.add(blocks_per_group * block_bytes);
        let scale = _mm512_cvtph_ps(_mm256_loadu_si256(params.cast()));
        let offset = if ASYM {
            _mm512_cvtph_ps(_mm256_loadu_si256(params.add(2 * LANES).cast()))
        } else {
            _mm512_setzero_ps()
        };
        for b in g * blocks_per_group..(g + 1) * blocks_per_group {
            if prefetch {
                for line in (0..block_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(PREFETCH_AHEAD + line).cast());
                }
            }
            let wv = unpack::<BITS>(p);
            p = p.add(block_bytes);
            for (i, acc) in acc.iter_mut().enumerate() {
                let at = i * k + b * BLOCK;
                let (d, sum) = (*scales.add(i * nb + b), *sums.add(i * nb + b));
                let dot = |mut s, x: *const i8| {
                    for (c, wv) in wv.iter().enumerate() {
                        let xs = _mm512_set1_epi32(x.add(4 * c).cast::<i32>().read_unaligned());
                        s = _mm512_dpbusd_epi32(s, *wv, xs);
                    }
                    s
                };
                let bias_sum = _mm512_set1_epi32(-bias * sum);
                let s = if LO {
                    let high = dot(_mm512_setzero_si512(), codes.add(at));
                    _mm512_add_epi32(_mm512_slli_epi32::<7>(high), dot(bias_sum, lo.add(at)))
                } else {
                    dot(bias_sum, codes.add(at))
                };
                let ds = _mm512_mul_ps(scale, _mm512_set1_ps(d));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), ds, *acc);
                if ASYM {
                    *acc = _mm512_fmadd_ps(offset, _mm512_set1_ps(d * sum as f32), *acc);
                }
            }
        }
        p = params.add(2 * LANES * (1 + ASYM as usize));
    }
    let n = w.rows;
    let lanes = LANES.min(n - t * LANES);
    let mask = ((1u32 << lanes) - 1) as __mmask16;
    for (i, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add((r + i) * n + t * LANES), mask, *acc);
    }
}

/// The 8 `vpdpbusd` weight operands of one block: vector `c` holds columns `4c..4c+4`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn unpack<const BITS: usize>(p: *const u8) -> [__m512i; 8] {
    if BITS == 8 {
        std::array::from_fn(|c| _mm512_loadu_si512(p.add(64 * c).cast()))
    } else {
        let low = _mm512_set1_epi8(15);
        let v: [__m512i; 4] = std::array::from_fn(|i| _mm512_loadu_si512(p.add(64 * i).cast()));
        std::array::from_fn(|c| {
            if c < 4 {
                _mm512_and_si512(v[c], low)
            } else {
                _mm512_and_si512(_mm512_srli_epi16::<4>(v[c - 4]), low)
            }
        })
    }
}
