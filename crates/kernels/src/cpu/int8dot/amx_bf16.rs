//! Prompt rows of packed weights on AMX-BF16 (`MatmulRows::prompt`).
//!
//! The integer path (`amx.rs`) keeps every 32-column block's sums apart, because each block
//! has its own activation scale, and scaling them on the vector unit is what bounds it. Here a
//! 16-feature tile of W is dequantized once into `tdpbf16ps`'s operand layout (bf16 pairs of
//! consecutive columns), and the activations are plain bf16, so the sums stay in a tile
//! register across the whole of k: per 16 rows x 16 features x 32 columns, one tile product
//! and one to two tile loads, nothing on the vector unit. The dequantization (~160 vector operations
//! a block) is paid once per tile and shared by every prompt row of the call.
//!
//! Bound: `tdpbf16ps` does 16 x 16 x 32 multiply-adds in 16 cycles, ~5 TFLOP/s on 2 cores at
//! 2.6 GHz. At 512 rows SmolLM2's gate/up and down reach 1.1-1.2 TFLOP/s, about a fifth of it
//! and 2.0-2.6x the integer tiles (docs/benchmarks.md); the rest goes to the dequantization and
//! to activation tiles read from L2. A row's sums depend on its own activations and the tile
//! alone, so rows give the same bits whatever rows share their tile.
//!
//! Precision: activations and weights rounded to bf16 (8 significant bits) with f32 sums, as a
//! GPU's bf16 kernels compute; about 2e-3 relative error on a matmul's outputs.

use super::SyncPtr;
use super::{load_scales, task_of, unpack, IntWeight, Layout, Scales, BLOCK, LANES};
use rayon::prelude::*;
use rayon::ThreadPool;
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

/// Rows of one activation tile, the most AMX holds.
const TILE_ROWS: usize = 16;

/// Whether this CPU has AMX-BF16 (and AVX512-BF16 to round into it) with the tile registers
/// granted.
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // CPUID.(EAX=7, ECX=0):EDX bit 22 is AMX-BF16; CPUID.(EAX=7, ECX=1):EAX bit 5 is
        // AVX512-BF16.
        #[allow(unused_unsafe)]
        let (amx_bf16, avx512_bf16) = unsafe {
            (
                __cpuid_count(7, 0).edx & (1 << 22) != 0,
                __cpuid_count(7, 1).eax & (1 << 5) != 0,
            )
        };
        amx_bf16 && avx512_bf16 && super::amx::available() && super::available()
    })
}

/// Whether `w`'s prompt rows take this path.
pub(crate) fn takes(w: &IntWeight) -> bool {
    w.amx && available()
}

/// The tile registers' shapes for two groups of `first` and `second` activation rows (second
/// 0: one group): tmm0/tmm1 the first group's sums for the two feature tiles (rows x 16 f32),
/// tmm2/tmm3 the second's, tmm4/tmm5 the groups' activations (rows x 32 bf16), tmm6/tmm7 the
/// feature tiles' weights (16 column pairs x 16 features). Four independent sums keep four
/// products in flight: a product waits for the previous one into the same tile.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(first: usize, second: usize) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        let bytes = |rows: usize| if rows == 0 { 0 } else { 64u16 };
        let shapes = [first, first, second, second, first, second, 16, 16];
        for (tile, rows) in shapes.into_iter().enumerate() {
            c[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&bytes(rows).to_le_bytes());
            c[48 + tile] = rows as u8;
        }
        Self(c)
    }
}

/// Sixteen rows of sixteen sums, as `tilestored` leaves them.
#[repr(C, align(64))]
struct TileSums([[f32; LANES]; TILE_ROWS]);

thread_local! {
    /// The calling thread's prompt rows in bf16, and each worker's dequantized weight tiles.
    static ROWS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    static WEIGHTS: RefCell<Vec<__m512i>> = const { RefCell::new(Vec::new()) };
}

/// `outs[i][r, :] = x[r, :] · W_i` for the rows `r` in `prompt`, every weight's tiles one
/// parallel pass. Caller has checked `takes` for each weight, that they share their input
/// (`share_input`), and the lengths of `x` and `outs`.
pub(crate) fn matmul_many(
    pool: &ThreadPool,
    ws: &[&IntWeight],
    x: &[f32],
    prompt: &[Range<usize>],
    outs: &mut [&mut [f32]],
) {
    let Some(w0) = ws.first() else { return };
    let k = w0.cols;
    let rows: Vec<u32> = prompt
        .iter()
        .flat_map(|r| r.clone())
        .map(|r| r as u32)
        .collect();
    if rows.is_empty() {
        return;
    }
    // Act-order: stored column j holds input column perm[j], so the prompt rows are gathered
    // once to match.
    let gathered: Option<Vec<f32>> = w0.perm.as_ref().map(|perm| {
        rows.iter()
            .flat_map(|&r| perm.iter().map(move |&p| x[r as usize * k + p as usize]))
            .collect()
    });
    ROWS.with_borrow_mut(|a| {
        a.resize(rows.len() * k, 0);
        pool.install(|| {
            a.par_chunks_mut(k).enumerate().for_each(|(i, dst)| {
                let src = match &gathered {
                    Some(g) => &g[i * k..(i + 1) * k],
                    None => &x[rows[i] as usize * k..(rows[i] as usize + 1) * k],
                };
                // SAFETY: `available` checked AVX512-BF16.
                unsafe { to_bf16(src, dst) }
            })
        });
        let a = &a[..];
        // Tiles go in pairs (one activation load feeds two products); a task is a run of
        // pairs of one weight, four tasks per thread so work stealing evens out.
        let pairs = |w: &IntWeight| w.rows.div_ceil(2 * LANES);
        let all: usize = ws.iter().map(|w| pairs(w)).sum();
        let chunk = all.div_ceil(pool.current_num_threads() * 4).max(1);
        let tasks: Vec<usize> = ws.iter().map(|w| pairs(w).div_ceil(chunk)).collect();
        let outs: Vec<SyncPtr<f32>> = outs.iter_mut().map(|o| SyncPtr(o.as_mut_ptr())).collect();
        let rows = &rows[..];
        pool.install(|| {
            (0..tasks.iter().sum()).into_par_iter().for_each(|t| {
                let (i, t) = task_of(&tasks, t);
                let (w, out) = (ws[i], outs[i]);
                let p = t * chunk..((t + 1) * chunk).min(pairs(w));
                // SAFETY: tasks write disjoint features of their output; `takes` checked the
                // instruction sets and the tile registers.
                WEIGHTS.with_borrow_mut(|b| unsafe { run_pairs(w, a, rows, p, b, out.get()) })
            })
        });
    })
}

/// Rounds a row to bf16 (nearest even).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn to_bf16(x: &[f32], out: &mut [u16]) {
    let (mut i, n) = (0, x.len());
    while i + 32 <= n {
        let lo = _mm512_loadu_ps(x.as_ptr().add(i));
        let hi = _mm512_loadu_ps(x.as_ptr().add(i + 16));
        let pair: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), pair);
        i += 32;
    }
    for j in i..n {
        out[j] = half::bf16::from_f32(x[j]).to_bits();
    }
}

/// Feature tile pairs `pairs` of `w` against every prompt row: `a` holds them in bf16 (stride
/// k), `rows[i]` is where compact row i goes in `out`.
///
/// # Safety
/// AVX512-BF16 and AMX-BF16 available with the tile registers granted; `out` holds every row
/// of `rows` by `w.rows`; no other task writes these features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c")]
unsafe fn run_pairs(
    w: &IntWeight,
    a: &[u16],
    rows: &[u32],
    pairs: Range<usize>,
    b: &mut Vec<__m512i>,
    out: *mut f32,
) {
    let nb = w.cols / BLOCK;
    // Two tiles' operands: per block 16 rows of column pairs x 16 features, 1 KiB.
    b.resize(2 * nb * 16, _mm512_setzero_si512());
    let tiles = w.rows.div_ceil(LANES);
    for pair in pairs {
        let t = 2 * pair;
        let second = t + 1 < tiles;
        dequantize(w, t, b.as_mut_ptr());
        if second {
            dequantize(w, t + 1, b.as_mut_ptr().add(nb * 16));
        }
        multiply(w, a, rows, t, second, b.as_ptr(), out);
    }
    // Leave the tile registers unused, so context switches need not save them.
    asm!("tilerelease", options(nostack, nomem));
}

/// Tile `t` of `w` into `dst` (`nb` blocks of 16 vectors): vector `2c + h` of a block holds,
/// in lane f, feature f's columns `4c + 2h` and `4c + 2h + 1` as bf16, lower column low.
#[inline(always)]
unsafe fn dequantize(w: &IntWeight, t: usize, dst: *mut __m512i) {
    macro_rules! go {
        ($layout:ident, $scales:ident, $asym:literal, $half:literal) => {
            tile_values::<{ Layout::$layout as u8 }, { Scales::$scales as u8 }, $asym, $half>(
                w, t, dst,
            )
        };
    }
    for_each_kind!(w, go)
}

/// `dequantize` for one weight kind. `HALF`: scales per 16 columns (operands 0..4, 4..8).
#[inline(always)]
unsafe fn tile_values<const L: u8, const S: u8, const ASYM: bool, const HALF: bool>(
    w: &IntWeight,
    t: usize,
    mut dst: *mut __m512i,
) {
    let (block_bytes, scale_bytes) = (w.layout.block_bytes(), w.scale_bytes());
    let unit = w.unit();
    let blocks_per_unit = unit / BLOCK;
    let bias = _mm512_set1_ps(w.bias as f32);
    let factor = _mm512_set1_ps(w.factor);
    let byte = _mm512_set1_epi32(0xff);
    // Word 2i takes the first vector's value i, word 2i + 1 the second's.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let mut p = w.data.as_ptr().add(t * w.tile_bytes());
    for _ in 0..w.cols / unit {
        let params = p.add(blocks_per_unit * block_bytes);
        let scale = _mm512_mul_ps(load_scales::<S>(params), factor);
        let scale2 = if HALF {
            _mm512_mul_ps(load_scales::<S>(params.add(scale_bytes)), factor)
        } else {
            scale
        };
        // code * s + (offset - bias * s): the bias folded into the offset, one FMA a weight.
        let offset = |s| {
            let o = if ASYM {
                _mm512_cvtph_ps(_mm256_loadu_si256(params.add(scale_bytes).cast()))
            } else {
                _mm512_setzero_ps()
            };
            _mm512_fnmadd_ps(bias, s, o)
        };
        let (offset1, offset2) = (offset(scale), offset(scale2));
        for _ in 0..blocks_per_unit {
            let ops = unpack::<L>(p);
            p = p.add(block_bytes);
            for (c, op) in ops.into_iter().enumerate() {
                let (s, o) = if HALF && c >= 4 {
                    (scale2, offset2)
                } else {
                    (scale, offset1)
                };
                // Byte j of each lane is the code of column 4c + j.
                let value = |codes: __m512i| _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes), s, o);
                let low_byte = |codes| _mm512_and_si512(codes, byte);
                let (v0, v1) = (
                    value(low_byte(op)),
                    value(low_byte(_mm512_srli_epi32::<8>(op))),
                );
                let (v2, v3) = (
                    value(low_byte(_mm512_srli_epi32::<16>(op))),
                    value(_mm512_srli_epi32::<24>(op)),
                );
                let low: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(v1, v0));
                let high: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(v3, v2));
                _mm512_store_si512(dst.add(2 * c), _mm512_permutexvar_epi16(interleave, low));
                _mm512_store_si512(
                    dst.add(2 * c + 1),
                    _mm512_permutexvar_epi16(interleave, high),
                );
            }
            dst = dst.add(16);
        }
        p = p.add(w.unit_bytes() - blocks_per_unit * block_bytes);
    }
}

/// Every prompt row against feature tiles `t` and `t + 1` (when `second`), whose operands `b`
/// holds, into `out`. Row groups go in pairs; a row's products are the same instructions in
/// the same order whichever group it is in, paired or not.
#[inline(always)]
unsafe fn multiply(
    w: &IntWeight,
    a: &[u16],
    rows: &[u32],
    t: usize,
    second: bool,
    b: *const __m512i,
    out: *mut f32,
) {
    let (k, n) = (w.cols, w.rows);
    let nb = k / BLOCK;
    let b2 = b.add(nb * 16);
    let mut sums = TileSums([[0.0; LANES]; TILE_ROWS]);
    let mut configured = (0, 0);
    let groups = rows.len().div_ceil(TILE_ROWS);
    for pair in (0..groups).step_by(2) {
        let g1 = pair * TILE_ROWS;
        let count1 = (rows.len() - g1).min(TILE_ROWS);
        let g2 = g1 + TILE_ROWS;
        let count2 = if pair + 1 < groups {
            (rows.len() - g2).min(TILE_ROWS)
        } else {
            0
        };
        if (count1, count2) != configured {
            let config = TileConfig::new(count1, count2);
            asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
            configured = (count1, count2);
        }
        let x1 = a.as_ptr().add(g1 * k).cast::<u8>();
        let stride = 2 * k;
        if count2 > 0 {
            let x2 = a.as_ptr().add(g2 * k).cast::<u8>();
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for blk in 0..nb {
                asm!(
                    "tileloadd tmm4, [{x1} + {stride}*1]",
                    "tileloadd tmm6, [{b} + {b_stride}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b2} + {b_stride}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{x2} + {stride}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    x1 = in(reg) x1.add(blk * 64),
                    x2 = in(reg) x2.add(blk * 64),
                    stride = in(reg) stride,
                    b = in(reg) b.add(blk * 16),
                    b2 = in(reg) b2.add(blk * 16),
                    b_stride = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
            for blk in 0..nb {
                asm!(
                    "tileloadd tmm4, [{x1} + {stride}*1]",
                    "tileloadd tmm6, [{b} + {b_stride}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b2} + {b_stride}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    x1 = in(reg) x1.add(blk * 64),
                    stride = in(reg) stride,
                    b = in(reg) b.add(blk * 16),
                    b2 = in(reg) b2.add(blk * 16),
                    b_stride = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
        }
        // (sum tile, first row, rows, feature tile)
        let tiles = [
            (0, g1, count1, t),
            (1, g1, count1, t + 1),
            (2, g2, count2, t),
            (3, g2, count2, t + 1),
        ];
        for (tile, g, count, feature_tile) in tiles {
            if count == 0 || (feature_tile > t && !second) {
                continue;
            }
            let at = sums.0.as_mut_ptr();
            match tile {
                0 => {
                    asm!("tilestored [{at} + {s}*1], tmm0", at = in(reg) at, s = in(reg) 64usize, options(nostack))
                }
                1 => {
                    asm!("tilestored [{at} + {s}*1], tmm1", at = in(reg) at, s = in(reg) 64usize, options(nostack))
                }
                2 => {
                    asm!("tilestored [{at} + {s}*1], tmm2", at = in(reg) at, s = in(reg) 64usize, options(nostack))
                }
                _ => {
                    asm!("tilestored [{at} + {s}*1], tmm3", at = in(reg) at, s = in(reg) 64usize, options(nostack))
                }
            }
            let f0 = feature_tile * LANES;
            let mask = ((1u32 << LANES.min(n - f0)) - 1) as __mmask16;
            for (i, &r) in rows[g..g + count].iter().enumerate() {
                let v = _mm512_load_ps(sums.0[i].as_ptr());
                _mm512_mask_storeu_ps(out.add(r as usize * n + f0), mask, v);
            }
        }
    }
}
