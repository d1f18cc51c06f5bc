//! `out[r, n] = sum_k x[r, k] * W[n, k]`, in two regimes that share one register tile.
//!
//! Every output element is accumulated by `tile` alone: sixteen lane sums over k in steps of 16
//! (the tail zero-filled), then `F32x16::hsum`. Decode and prefill differ only in where the tile
//! reads W from and how the work is cut, so a row's result does not depend on how many rows came
//! with it, nor on the instruction set.

use super::packed::with_codec;
use super::simd::{dispatch, prefetch, widen, Elem, F32x16, Isa};
use super::{DenseWeight, SyncPtr, Weight};
use rayon::prelude::*;
use rayon::ThreadPool;
use std::cell::RefCell;

/// Up to this many rows the matmul is a GEMV bound by streaming W; beyond, by FLOPs.
const DECODE_MAX_ROWS: usize = 16;
/// Output features one prefill task widens to f32 (64 x 1536 x 4 B = 384 KiB, L2-resident).
const STRIP: usize = 64;
/// Rows one prefill task covers; a multiple of every tile height.
const ROW_BLOCK: usize = 96;

/// Tile heights per instruction set: what fits the register file with four output columns.
trait Tiles: F32x16 {
    const PREFILL_ROWS: usize;
    const DECODE_ROWS: usize;
}

#[cfg(target_arch = "x86_64")]
impl Tiles for super::simd::Avx512 {
    // 6 x 4 accumulators + 4 W vectors + 1 x vector of the 32 zmm registers.
    const PREFILL_ROWS: usize = 6;
    const DECODE_ROWS: usize = 4;
}

#[cfg(target_arch = "x86_64")]
impl Tiles for super::simd::Avx2 {
    const PREFILL_ROWS: usize = 2;
    const DECODE_ROWS: usize = 2;
}

#[cfg(target_arch = "aarch64")]
impl Tiles for super::simd::Neon {
    // One row's 4 x 4 q-register accumulators and 4 x 4 for W fill the 32 q registers.
    const PREFILL_ROWS: usize = 1;
    const DECODE_ROWS: usize = 1;
}

impl Tiles for super::simd::Scalar {
    const PREFILL_ROWS: usize = 1;
    const DECODE_ROWS: usize = 1;
}

/// Where a tile reads W from: rows of k weights, sixteen at a time, widened to f32. Dense
/// formats widen each element exactly; packed ones decode codes with their group's scale and
/// offset (`packed.rs`). Both regimes read W only through this, so they see the same bits.
pub(crate) trait Rows: Copy + Send + Sync {
    /// A handle on one row (a pointer, for dense weights).
    type Row: Copy;
    unsafe fn row(self, j: usize) -> Self::Row;
    /// Weights `off..off + 16` of the row (`off` a multiple of 16).
    unsafe fn load<V: F32x16>(row: Self::Row, off: usize) -> V;
    /// Weights `off..off + n`, n < 16, the other lanes zero.
    unsafe fn load_part<V: F32x16>(row: Self::Row, off: usize, n: usize) -> V;
    /// Where weight `off` of the row lives, for prefetching (may lie past the weight).
    fn addr(row: Self::Row, off: usize) -> *const u8;
    /// The rows as plain f32 (stride k) when they already are, so prefill need not widen.
    fn as_f32(self) -> Option<*const f32>;
    /// Rows `j0..j1` widened into `strip` (stride k).
    #[inline(always)]
    unsafe fn widen<V: F32x16>(self, j0: usize, j1: usize, k: usize, strip: *mut f32) {
        for j in j0..j1 {
            let (row, dst) = (self.row(j), strip.add((j - j0) * k));
            let mut off = 0;
            while off + 16 <= k {
                Self::load::<V>(row, off).store(dst.add(off));
                off += 16;
            }
            if off < k {
                Self::load_part::<V>(row, off, k - off).store_part(dst.add(off), k - off);
            }
        }
    }
}

/// Dense rows of `k` elements.
pub(crate) struct Dense<E> {
    w: *const E,
    k: usize,
}

impl<E> Clone for Dense<E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for Dense<E> {}
// SAFETY: a read-only view of a weight (or strip) that outlives the matmul.
unsafe impl<E> Send for Dense<E> {}
unsafe impl<E> Sync for Dense<E> {}

impl<E: Elem> Rows for Dense<E> {
    type Row = *const E;
    #[inline(always)]
    unsafe fn row(self, j: usize) -> *const E {
        self.w.add(j * self.k)
    }
    #[inline(always)]
    unsafe fn load<V: F32x16>(row: *const E, off: usize) -> V {
        E::load::<V>(row.add(off))
    }
    #[inline(always)]
    unsafe fn load_part<V: F32x16>(row: *const E, off: usize, n: usize) -> V {
        E::load_part::<V>(row.add(off), n)
    }
    #[inline(always)]
    fn addr(row: *const E, off: usize) -> *const u8 {
        row.wrapping_add(off).cast()
    }
    #[inline(always)]
    fn as_f32(self) -> Option<*const f32> {
        E::as_f32(self.w)
    }
    #[inline(always)]
    unsafe fn widen<V: F32x16>(self, j0: usize, j1: usize, k: usize, strip: *mut f32) {
        widen::<V, E>(self.w.add(j0 * k), strip, (j1 - j0) * k)
    }
}

/// `R` rows of x (stride k) against rows `j..j + C` of W into `out` (row stride `ldo`).
/// A nonzero `ahead` prefetches the W elements that far past the ones being read.
#[inline(always)]
unsafe fn tile<V: F32x16, W: Rows, const R: usize, const C: usize>(
    x: *const f32,
    w: W,
    j: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
    ahead: usize,
) {
    let wr: [W::Row; C] = std::array::from_fn(|c| w.row(j + c));
    let mut acc = [[V::zero(); C]; R];
    let mut off = 0;
    while off + 16 <= k {
        if ahead != 0 {
            for row in wr {
                prefetch(W::addr(row, off + ahead));
            }
        }
        let mut wv = [V::zero(); C];
        for (c, wv) in wv.iter_mut().enumerate() {
            *wv = W::load::<V>(wr[c], off);
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv = V::load(x.add(r * k + off));
            for c in 0..C {
                acc[c] = V::fma(xv, wv[c], acc[c]);
            }
        }
        off += 16;
    }
    if off < k {
        let n = k - off;
        let mut wv = [V::zero(); C];
        for (c, wv) in wv.iter_mut().enumerate() {
            *wv = W::load_part::<V>(wr[c], off, n);
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv = V::load_part(x.add(r * k + off), n);
            for c in 0..C {
                acc[c] = V::fma(xv, wv[c], acc[c]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let o = out.add(r * ldo);
        if C == 4 {
            let s = V::hsum4([acc[0], acc[1], acc[2], acc[3]]);
            std::ptr::copy_nonoverlapping(s.as_ptr(), o, 4);
        } else {
            for (c, a) in acc.iter().enumerate() {
                *o.add(c) = a.hsum();
            }
        }
    }
}

/// Runs `tile` with a runtime row count of 1..=6 and a constant column count.
macro_rules! tile_rows {
    ($rows:expr, $V:ty, $W:ty, $C:literal, ($($arg:expr),*)) => {
        match $rows {
            1 => tile::<$V, $W, 1, $C>($($arg),*),
            2 => tile::<$V, $W, 2, $C>($($arg),*),
            3 => tile::<$V, $W, 3, $C>($($arg),*),
            4 => tile::<$V, $W, 4, $C>($($arg),*),
            5 => tile::<$V, $W, 5, $C>($($arg),*),
            6 => tile::<$V, $W, 6, $C>($($arg),*),
            _ => unreachable!("tile heights are at most 6"),
        }
    };
}

/// Rows `0..rows` of x against features `j0..j1` of `w`, whose rows sit at `w + j * k`.
/// `rows_outer` keeps a tile of x in L1 while W streams past it (prefill); otherwise a group of
/// W rows stays in L1 while x streams (decode, so W is read from memory once).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tiles<V: Tiles, W: Rows>(
    tile_rows: usize,
    rows_outer: bool,
    x: *const f32,
    rows: usize,
    k: usize,
    w: W,
    j0: usize,
    j1: usize,
    n: usize,
    out: *mut f32,
) {
    // Plain loops and a force-inlined helper rather than closures: a closure LLVM declines to
    // inline would be compiled without the caller's target features, intrinsics and all.
    if rows_outer {
        for r in (0..rows).step_by(tile_rows) {
            for j in (j0..j1).step_by(4) {
                run_tile::<V, W>(
                    x,
                    r,
                    (rows - r).min(tile_rows),
                    k,
                    w,
                    j,
                    (j1 - j).min(4),
                    n,
                    out,
                    0,
                );
            }
        }
    } else {
        for j in (j0..j1).step_by(4) {
            for r in (0..rows).step_by(tile_rows) {
                run_tile::<V, W>(
                    x,
                    r,
                    (rows - r).min(tile_rows),
                    k,
                    w,
                    j,
                    (j1 - j).min(4),
                    n,
                    out,
                    // The next group's rows, a few KiB ahead, while this group's stream in.
                    if r == 0 { 4 * k } else { 0 },
                );
            }
        }
    }
}

/// Rows `r..r + rr` against features `j..j + cols` (`cols` <= 4).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn run_tile<V: F32x16, W: Rows>(
    x: *const f32,
    r: usize,
    rr: usize,
    k: usize,
    w: W,
    j: usize,
    cols: usize,
    n: usize,
    out: *mut f32,
    ahead: usize,
) {
    let xp = x.add(r * k);
    let op = out.add(r * n + j);
    if cols == 4 {
        tile_rows!(rr, V, W, 4, (xp, w, j, k, op, n, ahead));
    } else {
        for c in 0..cols {
            tile_rows!(rr, V, W, 1, (xp, w, j + c, k, op.add(c), n, ahead));
        }
    }
}

/// GEMV regime: W is read once, in its own format, straight from memory, each 4-feature group
/// against every row of x (x stays in L1/L2), the next group prefetched while this one streams.
/// Bound: W bytes / memory bandwidth, which on this 2-core VM is ~10-14 GB/s per core from DRAM
/// and shared with other tenants. Measured (f16, 2 threads): the whole SmolLM2-135M decode pass,
/// 269 MB, at ~16 GB/s (60 tokens/s) when called from inside the pool, ~11 GB/s (41 tokens/s)
/// when every call pays the pool hand-off; single shapes 13-26 GB/s.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn decode_body<V: Tiles, W: Rows>(
    x: *const f32,
    rows: usize,
    k: usize,
    w: W,
    n: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    tiles::<V, W>(V::DECODE_ROWS, false, x, rows, k, w, j0, j1, n, out)
}

dispatch!(fn decode_task<W: Rows>(
    x: *const f32, rows: usize, k: usize, w: W, n: usize, j0: usize, j1: usize,
    out: *mut f32,
) => decode_body);

/// GEMM regime: features `j0..j1` of W are widened once into `strip` (unless already f32), then
/// every 6-row tile of x (which stays in L1 across the strip) runs against the L2-resident
/// strip: 24 FMAs per 10 loads, only the 4 W loads coming from L2. Bound: FMA throughput, two
/// 16-lane FMAs per cycle per core, ~330 GFLOP/s for 2 cores at 2.6 GHz. Measured at 512 rows:
/// 180-270 GFLOP/s (f16: q/o 243, k/v 228, gate/up 231, down 183, lm_head 257), 55-80% of peak;
/// K = 1536 is the slowest, its 6-row x tile (36 KiB) nearly filling L1.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn prefill_body<V: Tiles, W: Rows>(
    x: *const f32,
    rows: usize,
    k: usize,
    w: W,
    n: usize,
    j0: usize,
    j1: usize,
    strip: *mut f32,
    out: *mut f32,
) {
    let wide = match w.as_f32() {
        Some(p) => p.add(j0 * k),
        None => {
            w.widen::<V>(j0, j1, k, strip);
            strip as *const f32
        }
    };
    tiles::<V, Dense<f32>>(
        V::PREFILL_ROWS,
        true,
        x,
        rows,
        k,
        Dense { w: wide, k },
        0,
        j1 - j0,
        n,
        out.add(j0),
    )
}

dispatch!(fn prefill_task<W: Rows>(
    x: *const f32, rows: usize, k: usize, w: W, n: usize, j0: usize, j1: usize,
    strip: *mut f32, out: *mut f32,
) => prefill_body);

thread_local! {
    /// Each pool thread's widened strip, grown to the largest strip it has seen.
    static STRIP_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Caller has checked `x.len() >= rows * k` and `out.len() >= rows * n`.
pub(crate) fn matmul(
    pool: &ThreadPool,
    isa: Isa,
    x: &[f32],
    weight: &Weight,
    rows: usize,
    out: &mut [f32],
) {
    match weight {
        Weight::F32(w) => run_dense(pool, isa, x, w, rows, out),
        Weight::F16(w) => run_dense(pool, isa, x, w, rows, out),
        Weight::BF16(w) => run_dense(pool, isa, x, w, rows, out),
        Weight::Quant(q) => {
            let (n, k) = (q.rows, q.cols);
            // Act-order: stored column j holds input column perm[j], so gather x to match.
            let gathered;
            let x = match &q.perm {
                None => x,
                Some(perm) => {
                    gathered = (0..rows)
                        .flat_map(|r| perm.iter().map(move |&p| x[r * k + p as usize]))
                        .collect::<Vec<f32>>();
                    &gathered[..]
                }
            };
            with_codec!(q.kind, C => run(pool, isa, x, n, k, q.reader::<C>(), rows, out))
        }
        Weight::Int(w) => super::int8dot::matmul_many(pool, &[w], x, rows, &mut [out]),
    }
}

fn run_dense<E: Elem>(
    pool: &ThreadPool,
    isa: Isa,
    x: &[f32],
    w: &DenseWeight<E>,
    rows: usize,
    out: &mut [f32],
) {
    let reader = Dense {
        w: w.data.as_ptr(),
        k: w.cols,
    };
    run(pool, isa, x, w.rows, w.cols, reader, rows, out)
}

#[allow(clippy::too_many_arguments)]
fn run<W: Rows>(
    pool: &ThreadPool,
    isa: Isa,
    x: &[f32],
    n: usize,
    k: usize,
    w: W,
    rows: usize,
    out: &mut [f32],
) {
    if rows == 0 || n == 0 {
        return;
    }
    let x = SyncPtr(x.as_ptr() as *mut f32);
    let out = SyncPtr(out.as_mut_ptr());
    let threads = pool.current_num_threads();
    if rows <= DECODE_MAX_ROWS {
        // Four chunks per thread lets work stealing even out; at least 4 features (one tile),
        // at most 512 (k = 576 f16: 590 KB, long enough to amortise a task).
        let chunk = (n.div_ceil(threads * 4).div_ceil(4) * 4).min(512);
        let tasks = n.div_ceil(chunk);
        pool.install(|| {
            (0..tasks).into_par_iter().for_each(|t| {
                let (j0, j1) = (t * chunk, ((t + 1) * chunk).min(n));
                // SAFETY: tasks write disjoint feature ranges of out; shapes checked by caller.
                unsafe { decode_task(isa, x.get(), rows, k, w, n, j0, j1, out.get()) }
            })
        });
    } else {
        let strips = n.div_ceil(STRIP);
        let blocks = rows.div_ceil(ROW_BLOCK);
        pool.install(|| {
            (0..strips * blocks).into_par_iter().for_each(|t| {
                let (s, b) = (t / blocks, t % blocks);
                let (j0, j1) = (s * STRIP, ((s + 1) * STRIP).min(n));
                let (r0, r1) = (b * ROW_BLOCK, ((b + 1) * ROW_BLOCK).min(rows));
                STRIP_BUF.with_borrow_mut(|strip| {
                    if w.as_f32().is_none() && strip.len() < STRIP * k {
                        strip.resize(STRIP * k, 0.0);
                    }
                    // SAFETY: tasks write disjoint (row block, feature strip) rectangles.
                    unsafe {
                        prefill_task(
                            isa,
                            x.get().add(r0 * k),
                            r1 - r0,
                            k,
                            w,
                            n,
                            j0,
                            j1,
                            strip.as_mut_ptr(),
                            out.get().add(r0 * n),
                        )
                    }
                })
            })
        });
    }
}
