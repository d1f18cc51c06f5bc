//! The integer path's batched rows on AMX, the tile unit of Sapphire Rapids and later Xeons.
//!
//! `tdpbssd` multiplies a tile of up to 16 rows x 32 int8 activation codes by one block's
//! 32 x 16 weight operands (the 8 vectors the VNNI kernel feeds to `vpdpbusd`, less the bias
//! for symmetric codes, are exactly the 8 rows of AMX's weight tile) and adds 16 x 16 exact
//! int32 sums: 8192 multiply-adds in one instruction, where VNNI issues 8 `vpdpbusd` per row,
//! 16 with two-code activations. Each block's sums then take the VNNI kernel's f32 steps in
//! the same order (`tile` in int8dot.rs), so every output is bitwise the same on either unit,
//! whatever rows share its tile (tested against the scalar definition).
//!
//! Bound: per 16 rows x 16 features x 32 columns, one tile product per activation code (16
//! cycles each on the TMUL) against ~300 cycles of two-code VNNI; but with groups of 32 every
//! block's sums must leave the tile unit to be scaled, ~6 vector operations per row and block
//! (`(hi << 7) + lo`, conversion, scale product, two FMAs). That scaling is the limit: in a
//! 32-sequence decode step, switching it off made the step ~30% faster, switching off the tile
//! products as well added nothing (docs/benchmarks.md). So 1.3-1.55x VNNI end to end, far from
//! the TMUL's peak. nvfp4's groups of 16 (two sums per block) stay on VNNI.

use super::super::simd::prefetch;
use super::SyncPtr;
use super::{load_scales, unpack, IntWeight, Layout, QuantizedRows, Scales, BLOCK, LANES};
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Rows of one activation tile, the most AMX holds.
const TILE_ROWS: usize = 16;
/// Blocks between a block's tile products and the scaling of its sums.
const LAG: usize = 2;

/// Whether this CPU has AMX-INT8 and the OS lets this process use the tile registers (Linux
/// grants them per process on request).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // CPUID.(EAX=7, ECX=0):EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
        #[allow(unused_unsafe)]
        let edx = unsafe { __cpuid_count(7, 0) }.edx;
        edx & (3 << 24) == 3 << 24 && request_tile_registers()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_registers() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with integer arguments only changes this process's permissions.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_registers() -> bool {
    false
}

/// Whether `w` runs on AMX for a call of `rows` rows: from 8 rows (below, a call streams its
/// weights at memory speed on VNNI already; the threshold is not tuned); not nvfp4, which
/// needs per-half sums.
pub(super) fn takes(w: &IntWeight, rows: usize) -> bool {
    w.amx && rows >= 8 && w.scales != Scales::E4m3
}

/// The tile registers' shapes for `rows` activation rows: tmm0/tmm1 and tmm5/tmm6 two pairs of
/// block sums of the high and low codes (rows x 16 int32), tmm2/tmm3 those codes (rows x 32
/// bytes), tmm4 the block's weight operands (8 x 64 bytes).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(rows: usize) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        let shapes = [
            (rows, 64u16),
            (rows, 64),
            (rows, 32),
            (rows, 32),
            (8, 64),
            (rows, 64),
            (rows, 64),
        ];
        for (tile, (tile_rows, bytes)) in shapes.into_iter().enumerate() {
            c[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&bytes.to_le_bytes());
            c[48 + tile] = tile_rows as u8;
        }
        Self(c)
    }
}

/// A block's sums as `tilestored` leaves them: high codes' rows, then low codes'.
#[repr(C, align(64))]
struct BlockSums([[i32; LANES]; 2 * TILE_ROWS]);

thread_local! {
    /// The unpacked operands of the tile being multiplied, one block after another: the first
    /// row group unpacks them, later groups load them from here.
    static OPERANDS: RefCell<Vec<__m512i>> = const { RefCell::new(Vec::new()) };
}

/// Rows `r0..r1` against tiles `t0..t1` (as `run_tiles`), in groups of 16 rows.
///
/// # Safety
/// AVX-512 VNNI and AMX-INT8 available with the tile registers granted (`takes`), `out` holds
/// `r1` rows of `w.rows`, and no other task writes these rows of these tiles.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn run_tiles(
    w: &IntWeight,
    qx: &QuantizedRows,
    r0: usize,
    r1: usize,
    t0: usize,
    t1: usize,
    out: *mut f32,
) {
    let out = SyncPtr(out);
    macro_rules! go {
        ($layout:ident, $scales:ident, $asym:literal) => {
            OPERANDS.with_borrow_mut(|ops| {
                let args = (w, qx, r0, r1, t0, t1, out, ops);
                if w.lo {
                    groups::<{ Layout::$layout as u8 }, { Scales::$scales as u8 }, $asym, true>(
                        args,
                    )
                } else {
                    groups::<{ Layout::$layout as u8 }, { Scales::$scales as u8 }, $asym, false>(
                        args,
                    )
                }
            })
        };
    }
    match (w.layout, w.scales, w.asym) {
        (Layout::U8, _, false) => go!(U8, F16, false),
        (Layout::U8, _, true) => go!(U8, F16, true),
        (Layout::U4, _, false) => go!(U4, F16, false),
        (Layout::U4, _, true) => go!(U4, F16, true),
        (Layout::U3, _, false) => go!(U3, F16, false),
        (Layout::U3, _, true) => go!(U3, F16, true),
        (Layout::U2, _, false) => go!(U2, F16, false),
        (Layout::U2, _, true) => go!(U2, F16, true),
        (Layout::E2m1, Scales::F16, _) => go!(E2m1, F16, false),
        (Layout::E2m1, _, _) => go!(E2m1, Bf16, false),
    }
    // Leave the tile registers unused, so context switches need not save them.
    asm!("tilerelease", options(nostack, nomem));
}

/// A block's products (`$dp`: `tdpbssd` for signed weight operands, `tdpbsud` for unsigned)
/// into sum tiles `$hi` (and `$lo` for two-code activations).
macro_rules! products {
    ($dp:literal, $lo_codes:expr, $hi:literal, $lo:literal, $ops:expr, $codes:expr, $lo_ptr:expr, $k:expr) => {
        if $lo_codes {
            asm!(
                "tileloadd tmm4, [{ops} + {stride64}*1]",
                concat!("tilezero ", $hi),
                concat!("tilezero ", $lo),
                "tileloadd tmm2, [{codes} + {k}*1]",
                "tileloadd tmm3, [{lo} + {k}*1]",
                concat!($dp, " ", $hi, ", tmm2, tmm4"),
                concat!($dp, " ", $lo, ", tmm3, tmm4"),
                ops = in(reg) $ops,
                stride64 = in(reg) 64usize,
                codes = in(reg) $codes,
                lo = in(reg) $lo_ptr,
                k = in(reg) $k,
                options(nostack, readonly),
            )
        } else {
            asm!(
                "tileloadd tmm4, [{ops} + {stride64}*1]",
                concat!("tilezero ", $hi),
                "tileloadd tmm2, [{codes} + {k}*1]",
                concat!($dp, " ", $hi, ", tmm2, tmm4"),
                ops = in(reg) $ops,
                stride64 = in(reg) 64usize,
                codes = in(reg) $codes,
                k = in(reg) $k,
                options(nostack, readonly),
            )
        }
    };
}

/// Sum tiles `$hi` (and `$lo`) to `$sums`: high codes' rows, then low codes'.
macro_rules! store_sums {
    ($lo_codes:expr, $hi:literal, $lo:literal, $sums:expr) => {
        if $lo_codes {
            asm!(
                concat!("tilestored [{sums} + {stride64}*1], ", $hi),
                concat!("tilestored [{sums_lo} + {stride64}*1], ", $lo),
                stride64 = in(reg) 64usize,
                sums = in(reg) $sums,
                sums_lo = in(reg) $sums.add(TILE_ROWS * LANES),
                options(nostack),
            )
        } else {
            asm!(
                concat!("tilestored [{sums} + {stride64}*1], ", $hi),
                stride64 = in(reg) 64usize,
                sums = in(reg) $sums,
                options(nostack),
            )
        }
    };
}

/// Prefetches the 64-byte lines `lines` from `start`.
#[inline(always)]
unsafe fn prefetch_lines(start: *const u8, lines: std::ops::Range<usize>) {
    for line in lines {
        prefetch(start.add(64 * line));
    }
}

/// `run_tiles` for one weight kind; `operands` is the thread's `OPERANDS`.
///
/// Pipelined: block `b`'s tile products (into one of two pairs of sum tiles) are issued, then
/// block `b - LAG`'s sums scaled, then block `b`'s sums stored (to one of `LAG + 1` buffers), so
/// the scaling reads stores issued a whole block earlier and a pair of sum tiles is reused only
/// after its store (reusing one pair serialised the products: 45 ns a block against 23).
#[allow(clippy::type_complexity)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn groups<const L: u8, const S: u8, const ASYM: bool, const LO: bool>(
    (w, qx, r0, r1, t0, t1, out, operands): (
        &IntWeight,
        &QuantizedRows,
        usize,
        usize,
        usize,
        usize,
        SyncPtr<f32>,
        &mut Vec<__m512i>,
    ),
) {
    let (k, n) = (w.cols, w.rows);
    let nb = k / BLOCK;
    let block_bytes = w.layout.block_bytes();
    let blocks_per_unit = w.unit() / BLOCK;
    // Symmetric codes become signed operands `c - bias` once, in the unpacking, so the sums
    // need no bias term (2 of the ~8 vector operations per row and block of the scaling, which
    // bounds this kernel); they are the same integers. Asymmetric int8 codes do not fit a
    // signed byte and have no bias: they are read as they are stored.
    let direct = L == Layout::U8 as u8 && ASYM;
    let bias = _mm512_set1_epi8(w.bias as i8);
    let mut sums: [BlockSums; LAG + 1] =
        std::array::from_fn(|_| BlockSums([[0; LANES]; 2 * TILE_ROWS]));
    let sums_ptr: [*mut i32; LAG + 1] =
        std::array::from_fn(|i| sums[i].0.as_mut_ptr().cast::<i32>());
    if !direct {
        operands.resize(nb * 8, _mm512_setzero_si512());
    }
    let mut configured = 0;
    // The weights stream from memory one tile ahead: the first row group's products fetch
    // the next tile, spread over its blocks (fetching each block a fixed distance ahead left
    // the unpacking waiting on memory: a fifth of the time at 32 rows).
    let tile_bytes = w.tile_bytes();
    let tile_lines = tile_bytes.div_ceil(64);
    prefetch_lines(w.data.as_ptr().add(t0 * tile_bytes), 0..tile_lines);
    for t in t0..t1 {
        let tile = w.data.as_ptr().add(t * tile_bytes);
        let block_at = |b: usize| {
            tile.add(b / blocks_per_unit * w.unit_bytes() + b % blocks_per_unit * block_bytes)
        };
        let params_at = |b: usize| {
            tile.add(b / blocks_per_unit * w.unit_bytes() + blocks_per_unit * block_bytes)
        };
        // Every row group reads the tile's operands: unpack them once, ahead of the first
        // tile loads.
        if !direct {
            for b in 0..nb {
                for (i, v) in unpack::<L>(block_at(b)).into_iter().enumerate() {
                    let v = if ASYM { v } else { _mm512_sub_epi8(v, bias) };
                    _mm512_store_si512(operands.as_mut_ptr().add(8 * b + i), v);
                }
            }
        }
        let ops_at = |b: usize| {
            if direct {
                block_at(b)
            } else {
                operands.as_ptr().add(8 * b).cast::<u8>()
            }
        };
        for g in (r0..r1).step_by(TILE_ROWS) {
            let rows = (r1 - g).min(TILE_ROWS);
            if rows != configured {
                let config = TileConfig::new(rows);
                asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
                configured = rows;
            }
            let codes = qx.codes.as_ptr().add(g * k);
            let lo = qx.lo.as_ptr().add(if LO { g * k } else { 0 });
            let scales = qx.scales.as_ptr().add(g * nb);
            let offset_scales = qx.offset_scales.as_ptr().add(g * nb);
            let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
            // The VNNI kernel's steps for each row of block `b`, in its order.
            let scale_sums = |b: usize, acc: &mut [__m512; TILE_ROWS]| {
                let block_sums = sums_ptr[b % (LAG + 1)];
                let params = params_at(b);
                let scale = load_scales::<S>(params);
                let offset = if ASYM {
                    _mm512_cvtph_ps(_mm256_loadu_si256(params.add(w.scale_bytes()).cast()))
                } else {
                    _mm512_setzero_ps()
                };
                for (i, acc) in acc.iter_mut().enumerate().take(rows) {
                    let d = if L == Layout::E2m1 as u8 {
                        *scales.add(i * nb + b) * w.factor
                    } else {
                        *scales.add(i * nb + b)
                    };
                    let high = _mm512_load_si512(block_sums.add(i * LANES).cast());
                    let dot = if LO {
                        let low = _mm512_load_si512(block_sums.add((TILE_ROWS + i) * LANES).cast());
                        _mm512_add_epi32(_mm512_slli_epi32::<7>(high), low)
                    } else {
                        high
                    };
                    let ds = _mm512_mul_ps(scale, _mm512_set1_ps(d));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), ds, *acc);
                    if ASYM {
                        let offset_scale = _mm512_set1_ps(*offset_scales.add(i * nb + b));
                        *acc = _mm512_fmadd_ps(offset, offset_scale, *acc);
                    }
                }
            };
            for b in 0..nb + LAG {
                if b < nb {
                    if g == r0 && t + 1 < t1 {
                        prefetch_lines(
                            tile.add(tile_bytes),
                            tile_lines * b / nb..tile_lines * (b + 1) / nb,
                        );
                    }
                    let (ops, at) = (ops_at(b), b * BLOCK);
                    let (c, l) = (codes.add(at), lo.add(at));
                    match (b % 2 == 0, direct) {
                        (true, false) => products!("tdpbssd", LO, "tmm0", "tmm1", ops, c, l, k),
                        (false, false) => products!("tdpbssd", LO, "tmm5", "tmm6", ops, c, l, k),
                        (true, true) => products!("tdpbsud", LO, "tmm0", "tmm1", ops, c, l, k),
                        (false, true) => products!("tdpbsud", LO, "tmm5", "tmm6", ops, c, l, k),
                    }
                }
                if b >= LAG {
                    scale_sums(b - LAG, &mut acc);
                }
                if b < nb {
                    if b % 2 == 0 {
                        store_sums!(LO, "tmm0", "tmm1", sums_ptr[b % (LAG + 1)]);
                    } else {
                        store_sums!(LO, "tmm5", "tmm6", sums_ptr[b % (LAG + 1)]);
                    }
                }
            }
            let lanes = LANES.min(n - t * LANES);
            let mask = ((1u32 << lanes) - 1) as __mmask16;
            for (i, acc) in acc.iter().enumerate().take(rows) {
                _mm512_mask_storeu_ps(out.get().add((g + i) * n + t * LANES), mask, *acc);
            }
        }
    }
}
