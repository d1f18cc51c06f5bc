//! Packed weights (int8/4/3/2, fp4, mxfp4, nvfp4) times integer activations on AVX-512 VNNI.
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
//! stream over k, unit after unit (a unit is a group, or 32 columns for nvfp4's groups of 16):
//! the unit's 32-column blocks of codes, then its scales for 16 features (f16; bf16 for mxfp4's
//! powers of two; nvfp4's E4M3 bytes as stored, two sets), then (asymmetric formats) 16 f16
//! offsets. A block is 16 features x 32 columns as 64-byte vectors whose 32-bit lane `f` holds
//! 4 consecutive columns of feature `f` (`Layout`):
//! - int8: vector `c` (0..8) holds columns `4c..4c+4`;
//! - int4, E2M1: vector `v` (0..4) holds columns `4v..4v+4` in its low nibbles and
//!   `16+4v..16+4v+4` in its high ones, so one AND and one shift+AND give two operands;
//! - int2: 2 vectors of 2-bit fields, 4 operands each; int3: those for the low 2 bits, and one
//!   vector with a bit per operand for the third.
//!
//! Weights are `s * (c - 2^(b-1))` (symmetric) or `s * c + o` (asymmetric), `c` the unsigned
//! code: the integer sum of `c * q` less `2^(b-1) * sum(q)` is exact, and an offset adds
//! `o * d * sum(q)` per block. E2M1 values times 2 are the integers -12..=12, so a 16-byte
//! `vpshufb` table turns fp4 codes into `2v + 12`, a bias of 12 and a factor 1/2 (and nvfp4's
//! tensor scale) applied with `d`. The scales are the format's own, so the tiles hold the
//! same values as `marlin_quant`'s (tested) in the same bits a weight (mxfp4: +0.25 for bf16
//! scales; nvfp4, int3 and int2 exactly).
//!
//! Bound: decode streams the tiles once (memory); prefill is bound by `vpdpbusd` throughput
//! (one 512-bit op per cycle per core: ~330 G int8 multiply-adds/s on 2 cores at 2.6 GHz).

use super::{Activations, SyncPtr};
use crate::MatmulRows;
use half::f16;
use marlin_quant::packed::get_code;
use marlin_quant::{QuantFormat, QuantTensor};
use rayon::prelude::*;
use rayon::ThreadPool;
use std::cell::RefCell;

/// Calls `$go!(layout, scales, asym, half)` with `$w`'s kind as constants, one instantiation
/// of a kernel per kind. `half`: scales per 16 columns (nvfp4). Its kernels are x86's.
#[cfg(target_arch = "x86_64")]
macro_rules! for_each_kind {
    ($w:expr, $go:ident) => {
        match ($w.layout, $w.scales, $w.asym) {
            (Layout::U8, _, false) => $go!(U8, F16, false, false),
            (Layout::U8, _, true) => $go!(U8, F16, true, false),
            (Layout::U4, _, false) => $go!(U4, F16, false, false),
            (Layout::U4, _, true) => $go!(U4, F16, true, false),
            (Layout::U3, _, false) => $go!(U3, F16, false, false),
            (Layout::U3, _, true) => $go!(U3, F16, true, false),
            (Layout::U2, _, false) => $go!(U2, F16, false, false),
            (Layout::U2, _, true) => $go!(U2, F16, true, false),
            (Layout::E2m1, Scales::F16, _) => $go!(E2m1, F16, false, false),
            (Layout::E2m1, Scales::Bf16, _) => $go!(E2m1, Bf16, false, false),
            (Layout::E2m1, Scales::E4m3, _) => $go!(E2m1, E4m3, false, true),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod amx_bf16;

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

/// Whether this machine can run batched rows on AMX tiles.
pub(crate) fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available() && amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How a tile stores a block's codes: each layout yields the same 8 `vpdpbusd` operands, vector
/// `c` holding columns `4c..4c+4` of every feature as unsigned bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// int8: 8 vectors, the operands themselves.
    U8,
    /// int4: 4 vectors, operand `c` in the low (c < 4) or high nibbles of vector `c % 4`.
    U4,
    /// int3: the low 2 bits as `U2`, then one vector whose byte bit `c` is operand `c`'s bit 2.
    U3,
    /// int2: 2 vectors, operand `c` in bits `2 * (c / 2)` of vector `c % 2`.
    U2,
    /// E2M1 codes as `U4`, mapped by a 16-byte table to `2 * value + 12` (0..=24): the fp4
    /// values times 2 are the integers -12..=12.
    E2m1,
}

impl Layout {
    fn block_bytes(self) -> usize {
        LANES
            * BLOCK
            * match self {
                Layout::U8 => 8,
                Layout::U4 | Layout::E2m1 => 4,
                Layout::U3 => 3,
                Layout::U2 => 2,
            }
            / 8
    }
}

/// How a tile stores a group's 16 scales: f16 (int, fp4), bf16 (mxfp4's powers of two, any
/// E8M0 exponent) or the E4M3 bytes themselves (nvfp4; read as f16 of the value times 2^-8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scales {
    F16,
    Bf16,
    E4m3,
}

/// A packed weight in the tiled layout above.
pub struct IntWeight {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Columns per scale: 16 (nvfp4), or a multiple of 32.
    group: usize,
    layout: Layout,
    scales: Scales,
    asym: bool,
    /// Subtracted from every code (`c - bias` is the integer weight).
    bias: i32,
    /// Multiplies every result: 1/2 for E2M1 (codes are twice the values), and for nvfp4 its
    /// tensor scale times 2^8 (its stored scales are read times 2^-8).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only the VNNI kernel reads it
    factor: f32,
    /// nvfp4's tensor scale, for `row_into`.
    tensor_scale: f32,
    pub(crate) perm: Option<Vec<u32>>,
    /// Activations carry a second, low code (`Activations::Int16`).
    lo: bool,
    /// Batched rows may run on AMX (`amx.rs`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    amx: bool,
    data: Vec<u8>,
}

/// `2 * value + 12` for each E2M1 code (`marlin_quant::packed::E2M1`; tested).
pub(crate) const E2M1_TABLE: [u8; 16] = [12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0];

impl IntWeight {
    /// Whether `t` fits the integer path: every format but fp8 (whose values are not small
    /// integers times a scale), with rows of whole 32-blocks and groups of 16 (nvfp4) or whole
    /// 32-blocks.
    pub(crate) fn supports(t: &QuantTensor) -> bool {
        t.cols.is_multiple_of(BLOCK)
            && match t.format {
                QuantFormat::Int { bits, .. } => {
                    [2, 3, 4, 8].contains(&bits) && t.group.is_multiple_of(BLOCK)
                }
                QuantFormat::Fp4 | QuantFormat::Mxfp4 => t.group.is_multiple_of(BLOCK),
                QuantFormat::Nvfp4 => t.group == 16,
                QuantFormat::Fp8 => false,
            }
    }

    /// Columns one stream unit covers: its blocks of codes, then its scales (two sets for
    /// groups of 16).
    fn unit(&self) -> usize {
        self.group.max(BLOCK)
    }

    fn scale_sets(&self) -> usize {
        BLOCK.div_ceil(self.group)
    }

    fn scale_bytes(&self) -> usize {
        LANES * if self.scales == Scales::E4m3 { 1 } else { 2 }
    }

    fn unit_bytes(&self) -> usize {
        self.unit() / BLOCK * self.layout.block_bytes()
            + self.scale_sets() * self.scale_bytes()
            + if self.asym { 2 * LANES } else { 0 }
    }

    fn tile_bytes(&self) -> usize {
        self.cols / self.unit() * self.unit_bytes()
    }

    /// Re-lays a validated tensor (the caller has checked `supports`), to run against
    /// `activations` (`Int8` or `Int16`), batched rows on AMX when `amx` (and `amx_available`).
    pub(crate) fn new(t: &QuantTensor, activations: Activations, amx: bool) -> Self {
        let (layout, scales, bias, factor) = match t.format {
            QuantFormat::Int { bits, asym } => {
                let layout = match bits {
                    8 => Layout::U8,
                    4 => Layout::U4,
                    3 => Layout::U3,
                    _ => Layout::U2,
                };
                let bias = if asym { 0 } else { 1 << (bits - 1) };
                (layout, Scales::F16, bias, 1.0)
            }
            QuantFormat::Fp4 => (Layout::E2m1, Scales::F16, 12, 0.5),
            QuantFormat::Mxfp4 => (Layout::E2m1, Scales::Bf16, 12, 0.5),
            _ => (
                Layout::E2m1,
                Scales::E4m3,
                12,
                0.5 * 256.0 * t.tensor_scale.unwrap_or(1.0),
            ),
        };
        let mut w = Self {
            rows: t.rows,
            cols: t.cols,
            group: t.group,
            layout,
            scales,
            asym: t.format.is_asym(),
            bias,
            factor,
            tensor_scale: t.tensor_scale.unwrap_or(1.0),
            perm: t.perm.clone(),
            lo: activations == Activations::Int16,
            amx: amx && amx_available(),
            data: Vec::new(),
        };
        let (tile_bytes, unit_bytes, block_bytes) =
            (w.tile_bytes(), w.unit_bytes(), layout.block_bytes());
        let (unit, bits, sets) = (w.unit(), t.format.bits(), w.scale_sets());
        let codes_bytes = unit / BLOCK * block_bytes;
        let mut data = super::huge_page_vec(t.rows.div_ceil(LANES) * tile_bytes, 0u8);
        let row_bytes = t.row_bytes();
        data.par_chunks_mut(tile_bytes)
            .enumerate()
            .for_each(|(tile, out)| {
                for lane in 0..LANES.min(t.rows - tile * LANES) {
                    let r = tile * LANES + lane;
                    let codes = &t.codes[r * row_bytes..(r + 1) * row_bytes];
                    for u in 0..t.cols / unit {
                        let up = &mut out[u * unit_bytes..(u + 1) * unit_bytes];
                        for col in 0..unit {
                            let c = get_code(codes, bits, u * unit + col);
                            let (block, i) = (col / BLOCK, col % BLOCK);
                            let base = block * block_bytes + lane * 4 + i % 4;
                            let op = i / 4;
                            match layout {
                                Layout::U8 => up[base + op * 64] = c,
                                Layout::U4 | Layout::E2m1 => {
                                    up[base + (op % 4) * 64] |= c << (4 * (op / 4))
                                }
                                Layout::U2 | Layout::U3 => {
                                    up[base + (op % 2) * 64] |= (c & 3) << (2 * (op / 2));
                                    if layout == Layout::U3 {
                                        up[base + 128] |= (c >> 2 & 1) << op;
                                    }
                                }
                            }
                        }
                        let params = &mut up[codes_bytes..];
                        for set in 0..sets {
                            let g = (u * unit + set * w.group) / t.group;
                            let at = set * w.scale_bytes();
                            match scales {
                                Scales::F16 => put_f16(params, at, lane, t.group_scale(r, g)),
                                Scales::Bf16 => {
                                    let b = half::bf16::from_f32(t.group_scale(r, g));
                                    params[at + 2 * lane..at + 2 * lane + 2]
                                        .copy_from_slice(&b.to_le_bytes())
                                }
                                Scales::E4m3 => {
                                    params[at + lane] = t.scales[r * t.cols / t.group + g]
                                }
                            }
                        }
                        if w.asym {
                            let at = sets * w.scale_bytes();
                            put_f16(params, at, lane, t.group_offset(r, u));
                        }
                    }
                }
            });
        w.data = data;
        w
    }

    /// Scale `set` of a unit's parameters for `lane`, as the format defines it.
    fn scale(&self, params: &[u8], set: usize, lane: usize) -> f32 {
        let at = set * self.scale_bytes();
        let two = |i: usize| [params[i], params[i + 1]];
        match self.scales {
            Scales::F16 => f16::from_le_bytes(two(at + 2 * lane)).to_f32(),
            Scales::Bf16 => half::bf16::from_le_bytes(two(at + 2 * lane)).to_f32(),
            Scales::E4m3 => {
                marlin_quant::packed::e4m3_to_f32(params[at + lane]) * self.tensor_scale
            }
        }
    }

    /// Row `r` over the input columns, bitwise `QuantTensor::dequantize_row`.
    pub(crate) fn row_into(&self, r: usize, out: &mut [f32]) {
        let (tile, lane) = (r / LANES, r % LANES);
        let t = &self.data[tile * self.tile_bytes()..];
        let (unit, block_bytes) = (self.unit(), self.layout.block_bytes());
        for u in 0..self.cols / unit {
            let up = &t[u * self.unit_bytes()..];
            let params = &up[unit / BLOCK * block_bytes..];
            let offset = if self.asym {
                let at = self.scale_sets() * self.scale_bytes() + 2 * lane;
                f16::from_le_bytes([params[at], params[at + 1]]).to_f32()
            } else {
                0.0
            };
            for col in 0..unit {
                let (block, i) = (col / BLOCK, col % BLOCK);
                let base = block * block_bytes + lane * 4 + i % 4;
                let op = i / 4;
                let c = match self.layout {
                    Layout::U8 => up[base + op * 64],
                    Layout::U4 | Layout::E2m1 => up[base + (op % 4) * 64] >> (4 * (op / 4)) & 15,
                    Layout::U2 | Layout::U3 => {
                        let low = up[base + (op % 2) * 64] >> (2 * (op / 2)) & 3;
                        if self.layout == Layout::U3 {
                            low | (up[base + 128] >> op & 1) << 2
                        } else {
                            low
                        }
                    }
                };
                let s = self.scale(params, col / self.group, lane);
                let q = if self.layout == Layout::E2m1 {
                    // (2v + 12 - 12) / 2 is v exactly.
                    (E2M1_TABLE[c as usize] as i32 - self.bias) as f32 * 0.5
                } else {
                    (c as i32 - self.bias) as f32
                };
                let stored = u * unit + col;
                let dst = self.perm.as_ref().map_or(stored, |p| p[stored] as usize);
                out[dst] = if self.asym { q * s + offset } else { q * s };
            }
        }
    }
}

fn put_f16(params: &mut [u8], at: usize, lane: usize, v: f32) {
    params[at + 2 * lane..at + 2 * lane + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes())
}

/// Rows of activations quantized per 32-block: codes (and low codes for `Int16`), block
/// scales, and two code sums per block, over its first 16 codes and over all 32 (groups of 16
/// need the halves). For `Int16` a block's scale is `d / 128` and a sum `128 * sum(q) +
/// sum(lo)`, so both precisions apply them alike.
#[derive(Default)]
pub(crate) struct QuantizedRows {
    pub(crate) codes: Vec<i8>,
    pub(crate) lo: Vec<i8>,
    pub(crate) scales: Vec<f32>,
    pub(crate) sums: Vec<i32>,
    /// Per block, its scale times its sum over all 32: what an asymmetric weight's offset
    /// multiplies.
    pub(crate) offset_scales: Vec<f32>,
}

thread_local! {
    /// The calling thread's quantized activations and act-order gather, reused across calls.
    static SCRATCH: RefCell<(QuantizedRows, Vec<f32>)> = RefCell::new(Default::default());
}

/// Whether `matmul_many` can run these weights together: integer weights reading the same
/// input columns (same count, same act-order permutation) with the same activation codes.
pub(crate) fn share_input(ws: &[&IntWeight]) -> bool {
    ws.windows(2)
        .all(|p| p[0].cols == p[1].cols && p[0].perm == p[1].perm && p[0].lo == p[1].lo)
}

thread_local! {
    /// The generated rows of a call that has prompt rows too, and their outputs.
    static GENERATED: RefCell<(Vec<f32>, Vec<Vec<f32>>)> = RefCell::new(Default::default());
}

/// `matmul_many` over `rows`: the prompt rows on bf16 tiles where every weight takes them
/// (`amx_bf16`), the other rows through integer activations, gathered so each path sees only
/// its own rows. Caller has checked as for `matmul_many` and that the prompt runs lie within
/// `rows.count`.
pub(crate) fn matmul_rows(
    pool: &ThreadPool,
    ws: &[&IntWeight],
    x: &[f32],
    rows: MatmulRows,
    outs: &mut [&mut [f32]],
) {
    #[cfg(target_arch = "x86_64")]
    if !rows.prompt.is_empty() && ws.iter().all(|w| amx_bf16::takes(w)) {
        let prompt: usize = rows.prompt.iter().map(|r| r.len()).sum();
        if prompt < rows.count {
            let k = ws[0].cols;
            let mut generated = Vec::with_capacity(rows.count - prompt);
            let mut next = 0;
            for run in rows.prompt.iter().chain([&(rows.count..rows.count)]) {
                generated.extend(next..run.start);
                next = run.end;
            }
            GENERATED.with_borrow_mut(|(gx, gouts)| {
                gx.clear();
                for &r in &generated {
                    gx.extend_from_slice(&x[r * k..(r + 1) * k]);
                }
                gouts.resize_with(ws.len(), Vec::new);
                for (o, w) in gouts.iter_mut().zip(ws) {
                    o.resize(generated.len() * w.rows, 0.0);
                }
                let mut views: Vec<&mut [f32]> = gouts.iter_mut().map(|o| &mut o[..]).collect();
                matmul_many(pool, ws, gx, generated.len(), &mut views);
                for ((o, out), w) in gouts.iter().zip(outs.iter_mut()).zip(ws) {
                    let n = w.rows;
                    for (i, &r) in generated.iter().enumerate() {
                        out[r * n..(r + 1) * n].copy_from_slice(&o[i * n..(i + 1) * n]);
                    }
                }
            });
        }
        return amx_bf16::matmul_many(pool, ws, x, rows.prompt, outs);
    }
    matmul_many(pool, ws, x, rows.count, outs)
}

/// `outs[i][r, n] = sum_k x[r, k] * W_i[n, k]` through integer activations, quantized once for
/// every weight, and all weights' tiles as one parallel pass (q/k/v, gate/up). Caller has
/// checked `share_input`, `x.len() >= rows * k`, each `outs[i].len() >= rows * n_i`, and that
/// this machine has VNNI.
pub(crate) fn matmul_many(
    pool: &ThreadPool,
    ws: &[&IntWeight],
    x: &[f32],
    rows: usize,
    outs: &mut [&mut [f32]],
) {
    let Some(w0) = ws.first() else { return };
    let k = w0.cols;
    if rows == 0 {
        return;
    }
    SCRATCH.with_borrow_mut(|(qx, gathered)| {
        let x = match &w0.perm {
            None => &x[..rows * k],
            Some(perm) => {
                gathered.clear();
                gathered.extend(
                    (0..rows).flat_map(|r| perm.iter().map(move |&p| x[r * k + p as usize])),
                );
                &gathered[..]
            }
        };
        quantize_rows(pool, x, rows, k, w0.lo, qx);
        let tiles = |w: &IntWeight| w.rows.div_ceil(LANES);
        let threads = pool.current_num_threads();
        let (row_block, tile_chunk) = if rows <= ROW_BLOCK {
            // Four tasks per thread so work stealing evens out.
            let all: usize = ws.iter().map(|w| tiles(w)).sum();
            (rows, all.div_ceil(threads * 4))
        } else {
            (ROW_BLOCK, 4)
        };
        let blocks = rows.div_ceil(row_block);
        // Weight i's tasks are numbered after those of the weights before it.
        let tasks: Vec<usize> = ws
            .iter()
            .map(|w| blocks * tiles(w).div_ceil(tile_chunk))
            .collect();
        let outs: Vec<SyncPtr<f32>> = outs.iter_mut().map(|o| SyncPtr(o.as_mut_ptr())).collect();
        let qx = &*qx;
        pool.install(|| {
            (0..tasks.iter().sum()).into_par_iter().for_each(|t| {
                let (i, t) = task_of(&tasks, t);
                let (w, out) = (ws[i], outs[i]);
                let (chunk, block) = (t / blocks, t % blocks);
                let (r0, r1) = (block * row_block, ((block + 1) * row_block).min(rows));
                let (t0, t1) = (chunk * tile_chunk, ((chunk + 1) * tile_chunk).min(tiles(w)));
                // SAFETY: tasks write disjoint (rows, features) rectangles of their outputs; the
                // VNNI features (and AMX, for `amx::takes`) were checked when the weight took
                // this path.
                #[cfg(target_arch = "x86_64")]
                if amx::takes(w, rows) {
                    return unsafe { amx::run_tiles(w, qx, r0, r1, t0, t1, out.get()) };
                }
                unsafe { run_tiles(w, qx, r0, r1, t0, t1, out.get()) }
            })
        });
    })
}

/// For a pass that numbers each weight's tasks after those of the weights before it
/// (`tasks[i]` of weight i): which weight task `t` belongs to, and its number within it.
fn task_of(tasks: &[usize], mut t: usize) -> (usize, usize) {
    let mut i = 0;
    while t >= tasks[i] {
        t -= tasks[i];
        i += 1;
    }
    (i, t)
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
    q.sums.resize(2 * blocks, 0);
    q.offset_scales.resize(blocks, 0.0);
    let lo_step = if lo { BLOCK } else { 0 };
    let (codes, lows) = (SyncPtr(q.codes.as_mut_ptr()), SyncPtr(q.lo.as_mut_ptr()));
    let (scales, sums) = (SyncPtr(q.scales.as_mut_ptr()), SyncPtr(q.sums.as_mut_ptr()));
    let offset_scales = SyncPtr(q.offset_scales.as_mut_ptr());
    let block = |i: usize| {
        // SAFETY: block i lies inside x and every output (sized above), and blocks write
        // disjoint elements; VNNI (AVX-512) was checked by the caller.
        unsafe {
            quantize_block(
                x.as_ptr().add(i * BLOCK),
                codes.get().add(i * BLOCK),
                lo.then(|| lows.get().add(i * lo_step)),
                scales.get().add(i),
                sums.get().add(2 * i),
            );
            *offset_scales.get().add(i) = *scales.get().add(i) * *sums.get().add(2 * i + 1) as f32;
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
/// exact in f32); `sums[0..2]` the sums over the first 16 and all 32.
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
    let (first, total) = (
        _mm512_reduce_add_epi32(qa),
        _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)),
    );
    match lo {
        None => {
            *scale = d;
            *sum = first;
            *sum.add(1) = total;
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
            *sum = 128 * first + _mm512_reduce_add_epi32(la);
            *sum.add(1) = 128 * total + _mm512_reduce_add_epi32(_mm512_add_epi32(la, lb));
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
    // One instantiation per weight kind and activation precision; the row count picks the
    // tile height.
    macro_rules! rows {
        ($layout:ident, $scales:ident, $asym:literal, $half:literal) => {
            if w.lo {
                rows!($layout, $scales, $asym, $half, true)
            } else {
                rows!($layout, $scales, $asym, $half, false)
            }
        };
        ($layout:ident, $scales:ident, $asym:literal, $half:literal, $lo:literal) => {{
            const L: u8 = Layout::$layout as u8;
            const S: u8 = Scales::$scales as u8;
            for t in t0..t1 {
                for r in (r0..r1).step_by(TILE_ROWS) {
                    // The first row tile streams the weights; later ones find them in L1.
                    let args = (w, qx, r, t, out, r == r0);
                    match (r1 - r).min(TILE_ROWS) {
                        1 => tile::<1, L, S, $asym, $half, $lo>(args),
                        2 => tile::<2, L, S, $asym, $half, $lo>(args),
                        3 => tile::<3, L, S, $asym, $half, $lo>(args),
                        4 => tile::<4, L, S, $asym, $half, $lo>(args),
                        5 => tile::<5, L, S, $asym, $half, $lo>(args),
                        6 => tile::<6, L, S, $asym, $half, $lo>(args),
                        7 => tile::<7, L, S, $asym, $half, $lo>(args),
                        _ => tile::<8, L, S, $asym, $half, $lo>(args),
                    }
                }
            }
        }};
    }
    for_each_kind!(w, rows)
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

/// One scale set (16 lanes) of a unit's parameters as f32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_scales<const S: u8>(p: *const u8) -> __m512 {
    if S == Scales::F16 as u8 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    } else if S == Scales::Bf16 as u8 {
        let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
    } else {
        // The E4M3 values times 2^-8, exactly.
        <super::simd::Avx512 as super::simd::F32x16>::codes_e4m3(p).0
    }
}

/// Rows `r..r + R` against the 16 features of tile `t`. `HALF`: scales per 16 columns, so each
/// block's operands 0..4 and 4..8 are summed and scaled apart.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile<
    const R: usize,
    const L: u8,
    const S: u8,
    const ASYM: bool,
    const HALF: bool,
    const LO: bool,
>(
    (w, qx, r, t, out, prefetch): (&IntWeight, &QuantizedRows, usize, usize, *mut f32, bool),
) {
    let k = w.cols;
    let nb = k / BLOCK;
    let bias = w.bias;
    let block_bytes = w.layout.block_bytes();
    let (unit, scale_bytes) = (w.unit(), w.scale_bytes());
    let blocks_per_unit = unit / BLOCK;
    let codes = qx.codes.as_ptr().add(r * k);
    let lo = qx.lo.as_ptr().add(if LO { r * k } else { 0 });
    let scales = qx.scales.as_ptr().add(r * nb);
    let sums = qx.sums.as_ptr().add(2 * r * nb);
    let offset_scales = qx.offset_scales.as_ptr().add(r * nb);
    let mut p = w.data.as_ptr().add(t * w.tile_bytes());
    let mut acc = [_mm512_setzero_ps(); R];
    for u in 0..k / unit {
        let params = p.add(blocks_per_unit * block_bytes);
        let scale = load_scales::<S>(params);
        let scale2 = if HALF {
            load_scales::<S>(params.add(scale_bytes))
        } else {
            scale
        };
        let offset = if ASYM {
            _mm512_cvtph_ps(_mm256_loadu_si256(params.add(scale_bytes).cast()))
        } else {
            _mm512_setzero_ps()
        };
        for b in u * blocks_per_unit..(u + 1) * blocks_per_unit {
            if prefetch {
                for line in (0..block_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(PREFETCH_AHEAD + line).cast());
                }
            }
            let wv = unpack::<L>(p);
            p = p.add(block_bytes);
            for (i, acc) in acc.iter_mut().enumerate() {
                let at = i * k + b * BLOCK;
                // Only E2M1 has a factor (integer formats' is 1: the same bits without it).
                let d = if L == Layout::E2m1 as u8 {
                    *scales.add(i * nb + b) * w.factor
                } else {
                    *scales.add(i * nb + b)
                };
                let (first, sum) = (*sums.add(2 * (i * nb + b)), *sums.add(2 * (i * nb + b) + 1));
                // sum_c (code_c - bias) * x_c over operands `ops`, exactly.
                let dot = |ops: std::ops::Range<usize>, sum: i32| {
                    let chain = |mut s, x: *const i8| {
                        for c in ops.clone() {
                            let xs = _mm512_set1_epi32(x.add(4 * c).cast::<i32>().read_unaligned());
                            s = _mm512_dpbusd_epi32(s, wv[c], xs);
                        }
                        s
                    };
                    let bias_sum = _mm512_set1_epi32(-bias * sum);
                    if LO {
                        let high = chain(_mm512_setzero_si512(), codes.add(at));
                        _mm512_add_epi32(_mm512_slli_epi32::<7>(high), chain(bias_sum, lo.add(at)))
                    } else {
                        chain(bias_sum, codes.add(at))
                    }
                };
                if HALF {
                    let (sa, sb) = (dot(0..4, first), dot(4..8, sum - first));
                    let da = _mm512_mul_ps(scale, _mm512_set1_ps(d));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sa), da, *acc);
                    let db = _mm512_mul_ps(scale2, _mm512_set1_ps(d));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sb), db, *acc);
                } else {
                    let ds = _mm512_mul_ps(scale, _mm512_set1_ps(d));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot(0..8, sum)), ds, *acc);
                    if ASYM {
                        let offset_scale = _mm512_set1_ps(*offset_scales.add(i * nb + b));
                        *acc = _mm512_fmadd_ps(offset, offset_scale, *acc);
                    }
                }
            }
        }
        p = p.add(w.unit_bytes() - blocks_per_unit * block_bytes);
    }
    let n = w.rows;
    let lanes = LANES.min(n - t * LANES);
    let mask = ((1u32 << lanes) - 1) as __mmask16;
    for (i, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add((r + i) * n + t * LANES), mask, *acc);
    }
}

/// The 8 `vpdpbusd` weight operands of one block: vector `c` holds columns `4c..4c+4`, as
/// unsigned bytes (see `Layout`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn unpack<const L: u8>(p: *const u8) -> [__m512i; 8] {
    let load = |i: usize| _mm512_loadu_si512(p.add(64 * i).cast());
    let mask = |v, m: i8| _mm512_and_si512(v, _mm512_set1_epi8(m));
    // Shifts move 16-bit lanes; the masks after them drop the bits that cross between bytes.
    let right = |v, n: u32| _mm512_srl_epi16(v, _mm_cvtsi32_si128(n as i32));
    if L == Layout::U8 as u8 {
        std::array::from_fn(load)
    } else if L == Layout::U4 as u8 || L == Layout::E2m1 as u8 {
        let v: [__m512i; 4] = std::array::from_fn(load);
        let ops = std::array::from_fn(|c| mask(right(v[c % 4], 4 * (c / 4) as u32), 15));
        if L == Layout::E2m1 as u8 {
            let table = _mm512_broadcast_i32x4(_mm_loadu_si128(E2M1_TABLE.as_ptr().cast()));
            ops.map(|o| _mm512_shuffle_epi8(table, o))
        } else {
            ops
        }
    } else {
        let v: [__m512i; 2] = std::array::from_fn(load);
        let low: [__m512i; 8] =
            std::array::from_fn(|c| mask(right(v[c % 2], 2 * (c / 2) as u32), 3));
        if L == Layout::U3 as u8 {
            // Bit c of each byte of the third vector, moved to bit 2.
            let bits = load(2);
            std::array::from_fn(|c| {
                let b = if c <= 2 {
                    _mm512_sll_epi16(bits, _mm_cvtsi32_si128(2 - c as i32))
                } else {
                    _mm512_srl_epi16(bits, _mm_cvtsi32_si128(c as i32 - 2))
                };
                _mm512_or_si512(low[c], mask(b, 4))
            })
        } else {
            low
        }
    }
}
