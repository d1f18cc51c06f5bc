//! GPTQ (Frantar et al., 2022): quantizes a weight matrix column by column, spreading each
//! column's rounding error over the columns not yet quantized so that the layer's output on the
//! calibration activations changes as little as possible.
//!
//! This module sees only matrices: `W` (rows = output features, cols = input features) and the
//! Hessian `H = 2 XᵀX / n` of the layer's inputs `X` (n × cols), accumulated by [`Hessian`]. The
//! grid a weight is rounded onto is the format's, reached through [`GroupGrid`].
//!
//! The algorithm, as in the reference implementation (`gptq.py`):
//! - dead inputs (`H_ii = 0`) get `H_ii = 1` and their weight column set to zero;
//! - with act-order, columns are visited in order of descending `H_ii`, and groups are
//!   contiguous in that order (the permutation is stored with the tensor);
//! - dampening: `λ = damp · mean(diag H)` is added to the diagonal;
//! - `U` = the upper Cholesky factor of `H⁻¹` (so `H⁻¹ = UᵀU`), computed in f64;
//! - for each column i: at a group start, the group's parameters are fitted to the *current*
//!   (error-updated) weights of that group; `q = Q(w_i)`; `e = (w_i − q) / U_ii`; the columns
//!   after i receive `w_j −= e · U_ij`;
//! - lazily: within a block of 128 columns the update is applied column by column, to the rest of
//!   the matrix once per block (a rank-128 update). Blocks are a multiple of the group size, so a
//!   group never straddles a block and its fit always sees fully updated weights.
//!
//! Rows are independent given `U`, so the work is split by rows over threads.

use crate::packed::{pack_row, row_bytes, QuantFormat, QuantTensor};
use crate::rtn::{GroupParams, Quantizer};
use crate::{QuantError, Result};
use rayon::prelude::*;

/// A format's grid for one group of weights of one row: what GPTQ needs from a format.
pub trait GroupGrid: Sync {
    /// Per-group parameters (scale, offset, …).
    type Params: Copy + Send + Sync;
    /// Fits the group's parameters to these weights (the format's own search, e.g. RTN's).
    fn fit(&self, group: &[f32]) -> Self::Params;
    /// The code `value` rounds to, and the value that code decodes to.
    fn quantize(&self, params: &Self::Params, value: f32) -> (u8, f32);
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    /// Weights per group along the input dimension (`cols` for one group per row).
    pub group_size: usize,
    /// Columns per lazy update (rounded up to a multiple of the group size).
    pub block_size: usize,
    /// Dampening as a fraction of the mean Hessian diagonal.
    pub damp: f64,
    /// Visit columns in order of descending Hessian diagonal.
    pub act_order: bool,
}

impl GptqConfig {
    pub fn new(group_size: usize) -> Self {
        Self {
            group_size,
            block_size: 128,
            damp: 0.01,
            act_order: false,
        }
    }
}

/// A quantized matrix in GPTQ's visiting order.
#[derive(Debug, Clone)]
pub struct GptqResult<P> {
    pub rows: usize,
    pub cols: usize,
    pub group_size: usize,
    /// rows × cols codes, row-major; column j holds original input column `perm[j]`.
    pub codes: Vec<u8>,
    /// rows × (cols / group_size) parameters, row-major; group k covers columns
    /// `k·group_size ..` of the permuted order.
    pub params: Vec<P>,
    /// Permuted position → original input column; None without act-order.
    pub perm: Option<Vec<u32>>,
    /// The dequantized matrix in the original column order, rows × cols.
    pub dequantized: Vec<f32>,
    /// GPTQ's proxy loss Σ (w − q)² / (2 U_ii²).
    pub loss: f64,
    /// The dampening actually used (raised when H + λI was not positive definite).
    pub damp: f64,
}

/// Accumulates `XᵀX` over batches of activations (each row one token), in f64 across batches.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub cols: usize,
    /// Upper triangle used; cols × cols.
    sum: Vec<f64>,
    pub samples: usize,
    scratch: Vec<f32>,
}

impl Hessian {
    pub fn new(cols: usize) -> Self {
        Self {
            cols,
            sum: vec![0.0; cols * cols],
            samples: 0,
            scratch: Vec::new(),
        }
    }

    /// Adds `x` (rows × cols, row-major).
    pub fn add(&mut self, x: &[f32], rows: usize) {
        let c = self.cols;
        assert_eq!(x.len(), rows * c, "activation batch shape");
        if rows == 0 {
            return;
        }
        self.scratch.clear();
        self.scratch.resize(c * c, 0.0);
        // Strips of output rows as tasks: the triangle makes early strips the longest, and
        // rayon's work stealing evens that out.
        self.scratch
            .par_chunks_mut(STRIP * c)
            .enumerate()
            .for_each(|(k, out)| xtx_strip(x, rows, c, k * STRIP, out));
        for i in 0..c {
            for j in i..c {
                self.sum[i * c + j] += self.scratch[i * c + j] as f64;
            }
        }
        self.samples += rows;
    }

    /// `H = 2 XᵀX / n`, full and symmetric, cols × cols.
    pub fn matrix(&self) -> Vec<f64> {
        let c = self.cols;
        let scale = 2.0 / self.samples.max(1) as f64;
        let mut h = vec![0.0; c * c];
        for i in 0..c {
            for j in i..c {
                let v = self.sum[i * c + j] * scale;
                h[i * c + j] = v;
                h[j * c + i] = v;
            }
        }
        h
    }
}

/// Rows of XᵀX per task in [`Hessian::add`].
const STRIP: usize = 8;
/// Columns of XᵀX per AVX-512 register tile: STRIP × TILE f32 sums fill 16 registers.
#[cfg(target_arch = "x86_64")]
const TILE: usize = 32;

/// Rows `i0 .. i0 + out.len() / c` of XᵀX into `out` (zeroed; row-major, c wide):
/// `out[(i − i0)·c + j] = Σ_t x[t, i] x[t, j]` for `j ≥ i`; with AVX-512 a few entries left of
/// the diagonal are written too, and never read. Every entry is summed over t in order, a
/// product then an add (never fused), so the values do not depend on the tiling.
fn xtx_strip(x: &[f32], rows: usize, c: usize, i0: usize, out: &mut [f32]) {
    assert!(x.len() >= rows * c && out.len().is_multiple_of(c) && i0 + out.len() / c <= c);
    // Columns from `done` on (and right of the diagonal) are left to the row-update loop.
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if out.len() == STRIP * c && is_x86_feature_detected!("avx512f") {
        done = i0 / TILE * TILE;
        while done + TILE <= c {
            // SAFETY: AVX-512F was detected; rows i0..i0+STRIP and columns done..done+TILE lie
            // inside x's rows and inside out (checked above and by the loop bound).
            unsafe { xtx_tile_avx512(x, rows, c, i0, done, out) };
            done += TILE;
        }
    }
    xtx_rows(x, rows, c, i0, done, out)
}

/// `out` rows i0.. (STRIP of them), columns j0..j0+TILE, summed over all tokens in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn xtx_tile_avx512(x: &[f32], rows: usize, c: usize, i0: usize, j0: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; STRIP];
    for t in 0..rows {
        let xr = x.as_ptr().add(t * c);
        let b = [
            _mm512_loadu_ps(xr.add(j0)),
            _mm512_loadu_ps(xr.add(j0 + 16)),
        ];
        for (k, acc) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(*xr.add(i0 + k));
            acc[0] = _mm512_add_ps(acc[0], _mm512_mul_ps(a, b[0]));
            acc[1] = _mm512_add_ps(acc[1], _mm512_mul_ps(a, b[1]));
        }
    }
    for (k, acc) in acc.iter().enumerate() {
        let o = out.as_mut_ptr().add(k * c + j0);
        _mm512_storeu_ps(o, acc[0]);
        _mm512_storeu_ps(o.add(16), acc[1]);
    }
}

/// The rest of `xtx_strip`: each row i's columns from `max(from, i)`, token after token.
fn xtx_rows(x: &[f32], rows: usize, c: usize, i0: usize, from: usize, out: &mut [f32]) {
    #[inline(always)]
    fn body(x: &[f32], rows: usize, c: usize, i0: usize, from: usize, out: &mut [f32]) {
        let n = out.len() / c;
        for t in 0..rows {
            let xr = &x[t * c..(t + 1) * c];
            for di in 0..n {
                let (i, j) = (i0 + di, from.max(i0 + di));
                let a = xr[i];
                let o = &mut out[di * c + j..(di + 1) * c];
                for (o, v) in o.iter_mut().zip(&xr[j..]) {
                    *o += a * v;
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(
            x: &[f32],
            rows: usize,
            c: usize,
            i0: usize,
            from: usize,
            out: &mut [f32],
        ) {
            body(x, rows, c, i0, from, out)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(x: &[f32], rows: usize, c: usize, i0: usize, from: usize, out: &mut [f32]) {
            body(x, rows, c, i0, from, out)
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return unsafe { avx512(x, rows, c, i0, from, out) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { avx2(x, rows, c, i0, from, out) };
        }
    }
    body(x, rows, c, i0, from, out)
}

/// `y -= a · x`, vectorised where the CPU allows.
#[inline(always)]
fn axpy_neg(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y -= a * x;
    }
}

/// Lower Cholesky factor of a symmetric positive-definite n × n matrix (row-major, f64);
/// None when it is not positive definite.
///
/// Column by column: once the columns left of j are done, `L[j][j]` and then every `L[i][j]`
/// below it depend only on them, so the rows below are shared among threads. Each entry is
/// the same expression, summed in the same order, as in the row-by-row textbook loop.
pub fn cholesky_lower(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0f64; n * n];
    for j in 0..n {
        let (head, below) = l.split_at_mut((j + 1) * n);
        let row = &mut head[j * n..];
        let v = a[j * n + j] - dot_f64(&row[..j], &row[..j]);
        if v <= 0.0 || !v.is_finite() {
            return None;
        }
        let d = v.sqrt();
        row[j] = d;
        let lj = &row[..j];
        below
            .par_chunks_mut(n)
            .enumerate()
            .for_each(|(k, li)| li[j] = (a[(j + 1 + k) * n + j] - dot_f64(&li[..j], lj)) / d);
    }
    Some(l)
}

/// Σ a[k] b[k] in eight running sums (k mod 8), combined in a fixed order: the same whatever the
/// vector width, so one AVX-512 register holds the eight sums.
fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    #[inline(always)]
    fn body(a: &[f64], b: &[f64]) -> f64 {
        let mut acc = [0.0f64; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for k in 0..8 {
                acc[k] += x[k] * y[k];
            }
        }
        let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (x, y) in ra.iter().zip(rb) {
            s += x * y;
        }
        s
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(a: &[f64], b: &[f64]) -> f64 {
            body(a, b)
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return unsafe { avx512(a, b) };
        }
    }
    body(a, b)
}

/// Columns of the inverse per task in [`invert_lower`].
const INVERSE_COLUMNS: usize = 64;

/// Inverse of a lower-triangular n × n matrix (itself lower triangular).
///
/// Row i of X = L⁻¹ is `(e_i − Σ_{k<i} L[i,k] X[k, :]) / L[i,i]`; each column of X depends only on
/// the same column of earlier rows, so bands of columns are solved independently (in parallel),
/// every entry by the same operations in the same order as the whole-row loop.
fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
    let bands: Vec<(usize, Vec<f64>)> = (0..n)
        .step_by(INVERSE_COLUMNS)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|c0| (c0, invert_band(l, n, c0)))
        .collect();
    let mut x = vec![0.0f64; n * n];
    for (c0, band) in bands {
        let w = INVERSE_COLUMNS.min(n - c0);
        for (i, row) in (c0..n).zip(band.chunks_exact(w)) {
            x[i * n + c0..i * n + c0 + w].copy_from_slice(row);
        }
    }
    x
}

/// Columns c0.. (INVERSE_COLUMNS of them, fewer at the end) of L⁻¹, rows c0.. (the rows above
/// are zero there), as a (n − c0) × width matrix.
fn invert_band(l: &[f64], n: usize, c0: usize) -> Vec<f64> {
    #[inline(always)]
    fn body(l: &[f64], n: usize, c0: usize) -> Vec<f64> {
        let w = INVERSE_COLUMNS.min(n - c0);
        let mut band = vec![0.0f64; (n - c0) * w];
        for i in c0..n {
            let (done, rest) = band.split_at_mut((i - c0) * w);
            let row = &mut rest[..w];
            if i < c0 + w {
                row[i - c0] = 1.0;
            }
            for k in c0..i {
                let a = l[i * n + k];
                if a != 0.0 {
                    // X[k, c] is zero for c > k.
                    let upto = (k - c0 + 1).min(w);
                    let xk = &done[(k - c0) * w..(k - c0) * w + upto];
                    for (r, v) in row[..upto].iter_mut().zip(xk) {
                        *r -= a * v;
                    }
                }
            }
            let d = l[i * n + i];
            let upto = (i - c0 + 1).min(w);
            for r in row[..upto].iter_mut() {
                *r /= d;
            }
        }
        band
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(l: &[f64], n: usize, c0: usize) -> Vec<f64> {
            body(l, n, c0)
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return unsafe { avx512(l, n, c0) };
        }
    }
    body(l, n, c0)
}

/// The upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = UᵀU`), as f64.
///
/// With `J` the reversal permutation and `JHJ = MMᵀ` (M lower), `H⁻¹ = (J M⁻ᵀ J)(J M⁻¹ J)`, so
/// `U = J M⁻¹ J`: one Cholesky and one triangular inverse, no explicit `H⁻¹`.
pub fn inverse_cholesky_upper(h: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut reversed = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            reversed[i * n + j] = h[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    let m = cholesky_lower(&reversed, n)?;
    let minv = invert_lower(&m, n);
    let mut u = vec![0.0f64; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = minv[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    Some(u)
}

/// What GPTQ derives from a Hessian alone: the dead inputs, the act-order permutation and the
/// factor `U`. Projections that read the same input (q/k/v, gate/up) share one, so the O(cols³)
/// factorisation runs once per input site rather than once per projection.
#[derive(Debug, Clone)]
pub struct HessianFactor {
    pub cols: usize,
    /// Inputs never active in calibration (`H_ii = 0`); their weight columns are zeroed.
    dead: Vec<usize>,
    /// Permuted position → original input column; None without act-order.
    pub perm: Option<Vec<u32>>,
    /// The upper Cholesky factor of `(H + λI)⁻¹` in visiting order, cols × cols.
    u: Vec<f32>,
    /// The dampening actually used (raised when H + λI was not positive definite).
    pub damp: f64,
}

impl HessianFactor {
    /// Factors `h` (cols × cols, row-major, as from [`Hessian::matrix`]) with dampening `damp`
    /// (a fraction of the mean diagonal), visiting columns by descending `H_ii` with act-order.
    pub fn new(h: &[f64], cols: usize, damp: f64, act_order: bool) -> Result<Self> {
        if h.len() != cols * cols {
            return Err(QuantError::Invalid(format!(
                "GPTQ: Hessian has {} values for {cols}x{cols}",
                h.len()
            )));
        }
        let mut h = h.to_vec();
        // Dead inputs: never active in calibration, so their weights cannot matter there.
        let dead: Vec<usize> = (0..cols).filter(|&i| h[i * cols + i] == 0.0).collect();
        for &i in &dead {
            h[i * cols + i] = 1.0;
        }
        let perm: Option<Vec<u32>> = act_order.then(|| {
            let mut p: Vec<u32> = (0..cols as u32).collect();
            // Stable: equal diagonals keep their original order.
            p.sort_by(|&a, &b| {
                let (ha, hb) = (
                    h[a as usize * cols + a as usize],
                    h[b as usize * cols + b as usize],
                );
                hb.partial_cmp(&ha).unwrap_or(std::cmp::Ordering::Equal)
            });
            p
        });
        if let Some(p) = &perm {
            let mut hp = vec![0.0f64; cols * cols];
            for (i, &pi) in p.iter().enumerate() {
                for (j, &pj) in p.iter().enumerate() {
                    hp[i * cols + j] = h[pi as usize * cols + pj as usize];
                }
            }
            h = hp;
        }
        let mean_diag = (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
        let mut damp = damp;
        let u = loop {
            let mut hd = h.clone();
            for i in 0..cols {
                hd[i * cols + i] += damp * mean_diag;
            }
            if let Some(u) = inverse_cholesky_upper(&hd, cols) {
                break u;
            }
            if damp >= 10.0 {
                return Err(QuantError::Invalid(
                    "GPTQ: the Hessian is not positive definite even with strong dampening".into(),
                ));
            }
            damp = if damp <= 0.0 { 0.01 } else { damp * 10.0 };
        };
        Ok(Self {
            cols,
            dead,
            perm,
            u: u.iter().map(|&v| v as f32).collect(),
            damp,
        })
    }
}

/// Runs GPTQ on `w` (rows × cols, row-major) given the Hessian `h` (cols × cols, row-major, as
/// from [`Hessian::matrix`]).
pub fn gptq<G: GroupGrid>(
    grid: &G,
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    config: &GptqConfig,
) -> Result<GptqResult<G::Params>> {
    let factor = HessianFactor::new(h, cols, config.damp, config.act_order)?;
    gptq_factored(grid, w, rows, &factor, config)
}

/// [`gptq`] with the Hessian already factored (`config`'s group and block sizes apply; its
/// dampening and act-order were applied by the factor).
pub fn gptq_factored<G: GroupGrid>(
    grid: &G,
    w: &[f32],
    rows: usize,
    factor: &HessianFactor,
    config: &GptqConfig,
) -> Result<GptqResult<G::Params>> {
    let cols = factor.cols;
    let g = config.group_size;
    if g == 0 || !cols.is_multiple_of(g) {
        return Err(QuantError::Invalid(format!(
            "group size {g} does not divide the row length {cols}"
        )));
    }
    if w.len() != rows * cols {
        return Err(QuantError::Invalid(format!(
            "GPTQ: weight has {} values for {rows}x{cols}",
            w.len()
        )));
    }
    let mut w = w.to_vec();
    for &i in &factor.dead {
        for r in 0..rows {
            w[r * cols + i] = 0.0;
        }
    }
    let perm = factor.perm.clone();
    if let Some(p) = &perm {
        let mut wp = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for (j, &pj) in p.iter().enumerate() {
                wp[r * cols + j] = w[r * cols + pj as usize];
            }
        }
        w = wp;
    }
    let u = &factor.u;
    let block = if g >= config.block_size.max(1) {
        g
    } else {
        config.block_size.div_ceil(g) * g
    };

    let groups = cols / g;
    let mut codes = vec![0u8; rows * cols];
    let mut params: Vec<Option<G::Params>> = vec![None; rows * groups];
    let mut deq = vec![0.0f32; rows * cols];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tile = 16usize;
    let tiles = rows.div_ceil(tile);
    let per_thread = tiles.div_ceil(threads).max(1) * tile;
    let mut losses = Vec::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = w
            .chunks_mut(per_thread * cols)
            .zip(codes.chunks_mut(per_thread * cols))
            .zip(params.chunks_mut(per_thread * groups))
            .zip(deq.chunks_mut(per_thread * cols))
            .map(|(((w, codes), params), deq)| {
                scope.spawn(move || {
                    let mut loss = 0.0f64;
                    let n = w.len() / cols;
                    for t0 in (0..n).step_by(tile) {
                        let t1 = (t0 + tile).min(n);
                        loss += gptq_tile(
                            grid,
                            &mut w[t0 * cols..t1 * cols],
                            &mut codes[t0 * cols..t1 * cols],
                            &mut params[t0 * groups..t1 * groups],
                            &mut deq[t0 * cols..t1 * cols],
                            u,
                            cols,
                            g,
                            block,
                        );
                    }
                    loss
                })
            })
            .collect();
        losses = handles
            .into_iter()
            .map(|h| h.join().expect("GPTQ worker"))
            .collect();
    });
    let loss = losses.iter().sum();
    let dequantized = match &perm {
        Some(p) => {
            let mut out = vec![0.0f32; rows * cols];
            for r in 0..rows {
                for (j, &pj) in p.iter().enumerate() {
                    out[r * cols + pj as usize] = deq[r * cols + j];
                }
            }
            out
        }
        None => deq,
    };
    Ok(GptqResult {
        rows,
        cols,
        group_size: g,
        codes,
        params: params
            .into_iter()
            .map(|p| p.expect("every group fitted"))
            .collect(),
        perm,
        dequantized,
        loss,
        damp: factor.damp,
    })
}

/// GPTQ over a tile of rows (`w` is tile-rows × cols, already permuted); returns the proxy loss.
/// `deq` receives the dequantized values in visiting order.
#[allow(clippy::too_many_arguments)]
fn gptq_tile<G: GroupGrid>(
    grid: &G,
    w: &mut [f32],
    codes: &mut [u8],
    params: &mut [Option<G::Params>],
    deq: &mut [f32],
    u: &[f32],
    cols: usize,
    g: usize,
    block: usize,
) -> f64 {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn body<G: GroupGrid>(
        grid: &G,
        w: &mut [f32],
        codes: &mut [u8],
        params: &mut [Option<G::Params>],
        deq: &mut [f32],
        u: &[f32],
        cols: usize,
        g: usize,
        block: usize,
    ) -> f64 {
        let rows = w.len() / cols;
        let groups = cols / g;
        let mut loss = 0.0f64;
        let mut err = vec![0.0f32; rows * block];
        for b0 in (0..cols).step_by(block) {
            let b1 = (b0 + block).min(cols);
            let bs = b1 - b0;
            for i in b0..b1 {
                let d = u[i * cols + i];
                let urow = &u[i * cols + i + 1..i * cols + b1];
                for r in 0..rows {
                    let row = &mut w[r * cols..(r + 1) * cols];
                    if i % g == 0 {
                        params[r * groups + i / g] = Some(grid.fit(&row[i..i + g]));
                    }
                    let p = params[r * groups + i / g]
                        .as_ref()
                        .expect("fitted at the group start");
                    let (code, q) = grid.quantize(p, row[i]);
                    codes[r * cols + i] = code;
                    deq[r * cols + i] = q;
                    let e = (row[i] - q) / d;
                    loss += 0.5 * (e as f64) * (e as f64);
                    err[r * block + (i - b0)] = e;
                    axpy_neg(&mut row[i + 1..b1], e, urow);
                }
            }
            if b1 < cols {
                for r in 0..rows {
                    let row = &mut w[r * cols + b1..(r + 1) * cols];
                    for k in 0..bs {
                        let e = err[r * block + k];
                        if e != 0.0 {
                            let i = b0 + k;
                            axpy_neg(row, e, &u[i * cols + b1..(i + 1) * cols]);
                        }
                    }
                }
            }
        }
        loss
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx512<G: GroupGrid>(
            grid: &G,
            w: &mut [f32],
            codes: &mut [u8],
            params: &mut [Option<G::Params>],
            deq: &mut [f32],
            u: &[f32],
            cols: usize,
            g: usize,
            block: usize,
        ) -> f64 {
            body(grid, w, codes, params, deq, u, cols, g, block)
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return unsafe { avx512(grid, w, codes, params, deq, u, cols, g, block) };
        }
    }
    body(grid, w, codes, params, deq, u, cols, g, block)
}

/// Marlin's formats through the formats' own fit (RTN's per-group scale search) and rounding.
impl GroupGrid for Quantizer {
    type Params = GroupParams;
    fn fit(&self, group: &[f32]) -> GroupParams {
        Quantizer::fit(self, group)
    }
    fn quantize(&self, p: &GroupParams, value: f32) -> (u8, f32) {
        let c = Quantizer::quantize(self, p, value);
        (c, self.dequantize(p, c))
    }
}

/// GPTQ into a packed [`QuantTensor`] of `format` with `group` columns per group (already
/// resolved by [`QuantFormat::resolve_group`]), blocks of 128 columns, given the factored
/// Hessian of the layer's inputs. With act-order (in the factor) the tensor carries the column
/// permutation and its groups are contiguous in the permuted order. Returns the tensor and
/// GPTQ's proxy loss.
pub fn quantize_gptq(
    values: &[f32],
    rows: usize,
    format: QuantFormat,
    group: usize,
    factor: &HessianFactor,
) -> Result<(QuantTensor, f64)> {
    let cols = factor.cols;
    let tensor_scale =
        (format == QuantFormat::Nvfp4).then(|| Quantizer::nvfp4_tensor_scale(values));
    let quantizer = Quantizer::new(format, tensor_scale);
    let config = GptqConfig::new(group);
    let mut t = QuantTensor::zeroed(format, rows, cols, group, tensor_scale)?;
    let (bits, rb, sb) = (
        format.bits(),
        row_bytes(format.bits(), cols),
        format.scale_bytes(),
    );
    let r = gptq_factored(&quantizer, values, rows, factor, &config)?;
    for row in 0..rows {
        pack_row(
            &r.codes[row * cols..(row + 1) * cols],
            bits,
            &mut t.codes[row * rb..(row + 1) * rb],
        );
    }
    for (i, p) in r.params.iter().enumerate() {
        if sb == 2 {
            t.scales[2 * i..2 * i + 2].copy_from_slice(&p.scale_bits.to_le_bytes());
        } else {
            t.scales[i] = p.scale_bits as u8;
        }
        if let Some(o) = &mut t.offsets {
            o[2 * i..2 * i + 2].copy_from_slice(&p.offset_bits.to_le_bytes());
        }
    }
    t.perm = r.perm;
    t.validate()?;
    Ok((t, r.loss))
}

/// `‖X Wᵀ − X Ŵᵀ‖² / n` expressed through the Hessian: `½ Σ_r (w−ŵ)_r H (w−ŵ)_rᵀ`
/// with `H = 2XᵀX/n`. The quantity GPTQ minimises; used by tests and reports.
pub fn output_error(w: &[f32], w_hat: &[f32], rows: usize, cols: usize, h: &[f64]) -> f64 {
    let mut total = 0.0;
    let mut d = vec![0.0f64; cols];
    for r in 0..rows {
        for j in 0..cols {
            d[j] = (w[r * cols + j] - w_hat[r * cols + j]) as f64;
        }
        for i in 0..cols {
            if d[i] != 0.0 {
                total += d[i] * dot_f64(&h[i * cols..(i + 1) * cols], &d);
            }
        }
    }
    0.5 * total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference implementation's min-max grid (`Quantizer.find_params`, per row), as in
    /// scripts/gptq_reference.py: asymmetric, zero point rounded, round half to even.
    struct MinMax {
        maxq: f32,
    }

    impl MinMax {
        fn bits(bits: u32) -> Self {
            Self {
                maxq: ((1u32 << bits) - 1) as f32,
            }
        }
    }

    impl GroupGrid for MinMax {
        type Params = (f32, f32);
        fn fit(&self, group: &[f32]) -> (f32, f32) {
            let mut xmin = group.iter().fold(0.0f32, |m, &v| m.min(v));
            let mut xmax = group.iter().fold(0.0f32, |m, &v| m.max(v));
            if xmin == 0.0 && xmax == 0.0 {
                (xmin, xmax) = (-1.0, 1.0);
            }
            let scale = ((xmax as f64 - xmin as f64) / self.maxq as f64) as f32;
            let zero = (-(xmin as f64) / scale as f64).round_ties_even() as f32;
            (scale, zero)
        }
        fn quantize(&self, &(scale, zero): &(f32, f32), v: f32) -> (u8, f32) {
            let q = ((v / scale).round_ties_even() + zero).clamp(0.0, self.maxq);
            (q as u8, scale * (q - zero))
        }
    }

    /// A small deterministic generator (xorshift + Box-Muller), so tests need no crates.
    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (a, b) = (self.uniform().max(1e-12), self.uniform());
            (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
        }
    }

    /// Random W (rows × cols) and the Hessian of correlated, unevenly scaled activations.
    fn problem(rows: usize, cols: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<f64>) {
        let mut rng = Rng(seed);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32).collect();
        let mix: Vec<f64> = (0..cols * cols)
            .map(|k| rng.normal() * 0.3 + if k / cols == k % cols { 1.0 } else { 0.0 })
            .collect();
        let col_scale: Vec<f64> = (0..cols).map(|_| 0.2 + 2.8 * rng.uniform()).collect();
        let mut hess = Hessian::new(cols);
        let mut x = vec![0.0f32; 64 * cols];
        for _ in 0..n / 64 {
            for t in 0..64 {
                let z: Vec<f64> = (0..cols).map(|_| rng.normal()).collect();
                for j in 0..cols {
                    let v: f64 = (0..cols).map(|k| z[k] * mix[k * cols + j]).sum();
                    x[t * cols + j] = (v * col_scale[j]) as f32;
                }
            }
            hess.add(&x, 64);
        }
        (w, hess.matrix())
    }

    fn rtn<G: GroupGrid>(grid: &G, w: &[f32], cols: usize, g: usize) -> Vec<f32> {
        let mut out = vec![0.0; w.len()];
        for (r, row) in w.chunks(cols).enumerate() {
            for (k, group) in row.chunks(g).enumerate() {
                let p = grid.fit(group);
                for (j, &v) in group.iter().enumerate() {
                    out[r * cols + k * g + j] = grid.quantize(&p, v).1;
                }
            }
        }
        out
    }

    #[test]
    fn hessian_matches_direct_sum() {
        let (rows, cols) = (37, 45);
        let mut rng = Rng(3);
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32).collect();
        let mut h = Hessian::new(cols);
        h.add(&x[..20 * cols], 20);
        h.add(&x[20 * cols..], rows - 20);
        let m = h.matrix();
        for i in 0..cols {
            for j in 0..cols {
                let direct: f64 = (0..rows)
                    .map(|t| x[t * cols + i] as f64 * x[t * cols + j] as f64)
                    .sum::<f64>()
                    * 2.0
                    / rows as f64;
                assert!((m[i * cols + j] - direct).abs() < 1e-4, "{i},{j}");
            }
        }
    }

    #[test]
    fn hessian_sums_every_entry_in_token_order() {
        // The tiled XᵀX against the plain loop it replaced: per window, each entry summed in f32
        // over the tokens in order, then added to the f64 total. Shapes exercise whole tiles,
        // the columns past the last one and a short last strip.
        for (rows, cols) in [(70, 77), (33, 64), (5, 160)] {
            let mut rng = Rng(cols as u64);
            let x: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32).collect();
            let mut h = Hessian::new(cols);
            h.add(&x, rows);
            h.add(&x[..3 * cols], 3);
            let mut expected = vec![0.0f64; cols * cols];
            for window in [&x[..], &x[..3 * cols]] {
                for i in 0..cols {
                    for j in i..cols {
                        let mut s = 0.0f32;
                        for t in window.chunks(cols) {
                            s += t[i] * t[j];
                        }
                        expected[i * cols + j] += s as f64;
                    }
                }
            }
            for i in 0..cols {
                for j in i..cols {
                    assert_eq!(
                        h.sum[i * cols + j],
                        expected[i * cols + j],
                        "{cols}: {i},{j}"
                    );
                }
            }
        }
    }

    /// The row-by-row Cholesky and triangular inverse that the column-parallel ones replaced.
    fn cholesky_rows(a: &[f64], n: usize) -> Vec<f64> {
        let mut l = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let s = dot_f64(&l[i * n..i * n + j], &l[j * n..j * n + j]);
                let v = a[i * n + j] - s;
                l[i * n + j] = if i == j { v.sqrt() } else { v / l[j * n + j] };
            }
        }
        l
    }

    fn invert_rows(l: &[f64], n: usize) -> Vec<f64> {
        let mut x = vec![0.0f64; n * n];
        for i in 0..n {
            let (done, rest) = x.split_at_mut(i * n);
            let row = &mut rest[..n];
            row[i] = 1.0;
            for k in 0..i {
                let a = l[i * n + k];
                if a != 0.0 {
                    for (r, v) in row[..=k].iter_mut().zip(&done[k * n..k * n + k + 1]) {
                        *r -= a * v;
                    }
                }
            }
            for r in row[..=i].iter_mut() {
                *r /= l[i * n + i];
            }
        }
        x
    }

    #[test]
    fn parallel_factorisation_equals_the_row_by_row_loops() {
        // 200 columns: three whole bands of the inverse and a partial one.
        let n = 200;
        let (_, mut h) = problem(1, n, 512, 31);
        for i in 0..n {
            h[i * n + i] += 0.01;
        }
        let l = cholesky_lower(&h, n).unwrap();
        assert_eq!(l, cholesky_rows(&h, n));
        assert_eq!(invert_lower(&l, n), invert_rows(&l, n));
        let mut not_pd = h.clone();
        not_pd[7 * n + 7] = -1.0;
        assert!(cholesky_lower(&not_pd, n).is_none());
    }

    #[test]
    fn inverse_cholesky_is_the_upper_factor_of_the_inverse() {
        let n = 40;
        let (_, h) = problem(1, n, 128, 11);
        let mut hd = h.clone();
        for i in 0..n {
            hd[i * n + i] += 0.01;
        }
        let u = inverse_cholesky_upper(&hd, n).unwrap();
        // (UᵀU) H = I
        for i in 0..n {
            for j in 0..n {
                let mut v = 0.0;
                for k in 0..n {
                    let uu: f64 = (0..n).map(|m| u[m * n + i] * u[m * n + k]).sum();
                    v += uu * hd[k * n + j];
                }
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((v - expected).abs() < 1e-8, "{i},{j}: {v}");
                if j < i {
                    assert_eq!(u[i * n + j], 0.0);
                }
            }
        }
    }

    #[test]
    fn lazy_blocks_equal_the_column_by_column_update() {
        let (rows, cols) = (24, 384);
        let (w, h) = problem(rows, cols, 512, 5);
        for (bits, g, act) in [(4, 32, false), (3, 64, true), (2, 128, false)] {
            let grid = MinMax::bits(bits);
            let mut config = GptqConfig::new(g);
            config.act_order = act;
            let lazy = gptq(&grid, &w, rows, cols, &h, &config).unwrap();
            config.block_size = cols; // one block: every update applied at once, column by column
            let naive = gptq(&grid, &w, rows, cols, &h, &config).unwrap();
            assert_eq!(lazy.codes, naive.codes, "{bits} bits g{g}");
            for (a, b) in lazy.dequantized.iter().zip(&naive.dequantized) {
                assert!((a - b).abs() <= 1e-5);
            }
        }
    }

    #[test]
    fn beats_round_to_nearest_on_the_output_at_4_3_2_bits() {
        let (rows, cols) = (32, 256);
        let (w, h) = problem(rows, cols, 1024, 9);
        for bits in [4, 3, 2] {
            for act in [false, true] {
                let grid = MinMax::bits(bits);
                let mut config = GptqConfig::new(32);
                config.act_order = act;
                let q = gptq(&grid, &w, rows, cols, &h, &config).unwrap();
                let e_gptq = output_error(&w, &q.dequantized, rows, cols, &h);
                let e_rtn = output_error(&w, &rtn(&grid, &w, cols, 32), rows, cols, &h);
                eprintln!("{bits} bits act-order {act}: GPTQ {e_gptq:.4}, RTN {e_rtn:.4}");
                assert!(
                    e_gptq < 0.9 * e_rtn,
                    "{bits} bits: GPTQ {e_gptq} vs RTN {e_rtn}"
                );
            }
        }
    }

    #[test]
    fn identity_hessian_reproduces_round_to_nearest() {
        // H = I: U = I / sqrt(1 + λ) is diagonal, so no error reaches another column and every
        // group is fitted to the original weights, exactly as RTN fits it.
        let (rows, cols) = (16, 128);
        let (w, _) = problem(rows, cols, 64, 13);
        let mut h = vec![0.0f64; cols * cols];
        for i in 0..cols {
            h[i * cols + i] = 1.0;
        }
        for bits in [4, 3, 2] {
            let grid = MinMax::bits(bits);
            let q = gptq(&grid, &w, rows, cols, &h, &GptqConfig::new(32)).unwrap();
            assert_eq!(q.dequantized, rtn(&grid, &w, cols, 32), "{bits} bits");
        }
    }

    #[test]
    fn act_order_permutation_round_trips() {
        let (rows, cols, g) = (8, 96, 32);
        let (w, h) = problem(rows, cols, 256, 21);
        let grid = MinMax::bits(3);
        let mut config = GptqConfig::new(g);
        config.act_order = true;
        let q = gptq(&grid, &w, rows, cols, &h, &config).unwrap();
        let perm = q.perm.as_ref().unwrap();
        let mut seen = vec![false; cols];
        for &p in perm {
            assert!(!std::mem::replace(&mut seen[p as usize], true));
        }
        for pair in perm.windows(2) {
            let (a, b) = (pair[0] as usize, pair[1] as usize);
            assert!(h[a * cols + a] >= h[b * cols + b]);
        }
        // Decoding codes (visiting order) with their group's params, scattered through perm,
        // gives back the dequantized matrix in the original order.
        for r in 0..rows {
            for (j, &p) in perm.iter().enumerate() {
                let (s, z) = q.params[r * (cols / g) + j / g];
                let v = s * (q.codes[r * cols + j] as f32 - z);
                assert_eq!(v, q.dequantized[r * cols + p as usize]);
            }
        }
        // With a diagonal H there is no propagation: act-order GPTQ is RTN on permuted groups.
        let mut diag = vec![0.0f64; cols * cols];
        for i in 0..cols {
            diag[i * cols + i] = h[i * cols + i];
        }
        let q = gptq(&grid, &w, rows, cols, &diag, &config).unwrap();
        let perm = q.perm.unwrap();
        let permuted: Vec<f32> = (0..rows * cols)
            .map(|k| w[(k / cols) * cols + perm[k % cols] as usize])
            .collect();
        let expected = rtn(&grid, &permuted, cols, g);
        for r in 0..rows {
            for j in 0..cols {
                assert_eq!(
                    q.dequantized[r * cols + perm[j] as usize],
                    expected[r * cols + j]
                );
            }
        }
    }

    #[test]
    fn matches_the_numpy_reference() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/gptq/small.txt"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines = text.lines().filter(|l| !l.starts_with('#'));
        let mut field = |name: &str| -> Vec<String> {
            let line = lines.next().unwrap();
            let mut parts = line.split_whitespace();
            assert_eq!(parts.next(), Some(name));
            parts.map(str::to_string).collect()
        };
        let shape: Vec<usize> = field("shape").iter().map(|v| v.parse().unwrap()).collect();
        let (rows, cols) = (shape[0], shape[1]);
        let w: Vec<f32> = field("W").iter().map(|v| v.parse().unwrap()).collect();
        let h: Vec<f64> = field("H").iter().map(|v| v.parse().unwrap()).collect();
        for _ in 0..3 {
            let case: Vec<usize> = field("case").iter().map(|v| v.parse().unwrap()).collect();
            let codes: Vec<u8> = field("codes").iter().map(|v| v.parse().unwrap()).collect();
            let deq: Vec<f32> = field("deq").iter().map(|v| v.parse().unwrap()).collect();
            let perm = field("perm");
            let grid = MinMax::bits(case[0] as u32);
            let mut config = GptqConfig::new(case[1]);
            config.act_order = case[2] == 1;
            let q = gptq(&grid, &w, rows, cols, &h, &config).unwrap();
            assert_eq!(q.codes, codes, "case {case:?}");
            for (a, b) in q.dequantized.iter().zip(&deq) {
                assert!((a - b).abs() <= 1e-5, "case {case:?}: {a} vs {b}");
            }
            if let Some(p) = &q.perm {
                let expected: Vec<u32> = perm.iter().map(|v| v.parse().unwrap()).collect();
                assert_eq!(p, &expected);
            }
        }
    }

    #[test]
    fn marlin_formats_beat_their_rtn_and_equal_it_under_an_identity_hessian() {
        let (rows, cols) = (32, 256);
        let (w, h) = problem(rows, cols, 1024, 17);
        let mut eye = vec![0.0f64; cols * cols];
        for i in 0..cols {
            eye[i * cols + i] = 1.0;
        }
        for bits in [4u8, 3, 2] {
            for asym in [false, true] {
                let f = QuantFormat::Int { bits, asym };
                for g in [32, 64] {
                    let rtn = crate::rtn::quantize_rtn(&w, rows, cols, f, g).unwrap();
                    let e_rtn = output_error(&w, &rtn.dequantize(), rows, cols, &h);
                    for act in [false, true] {
                        let factor = HessianFactor::new(&h, cols, 0.01, act).unwrap();
                        let (t, _) = quantize_gptq(&w, rows, f, g, &factor).unwrap();
                        t.validate().unwrap();
                        let e = output_error(&w, &t.dequantize(), rows, cols, &h);
                        eprintln!("{f} g{g} act {act}: GPTQ {e:.3} RTN {e_rtn:.3}");
                        assert!(e < 0.95 * e_rtn, "{f} g{g} act {act}: {e} vs {e_rtn}");
                    }
                    // H = I: no error reaches another column, and each group is fitted by the
                    // same search on the same weights, so the tensors are identical.
                    let factor = HessianFactor::new(&eye, cols, 0.01, false).unwrap();
                    let (t, _) = quantize_gptq(&w, rows, f, g, &factor).unwrap();
                    assert_eq!(t, rtn, "{f} g{g}");
                }
            }
        }
    }

    #[test]
    fn act_order_tensor_dequantizes_to_the_gptq_result() {
        let (rows, cols) = (16, 128);
        let (w, h) = problem(rows, cols, 256, 23);
        let f = QuantFormat::Int {
            bits: 4,
            asym: true,
        };
        let q = Quantizer::new(f, None);
        let mut config = GptqConfig::new(32);
        config.act_order = true;
        let r = gptq(&q, &w, rows, cols, &h, &config).unwrap();
        let factor = HessianFactor::new(&h, cols, 0.01, true).unwrap();
        let (t, _) = quantize_gptq(&w, rows, f, 32, &factor).unwrap();
        assert_eq!(t.perm, r.perm);
        assert_eq!(t.dequantize(), r.dequantized);
    }

    #[test]
    fn rejects_a_group_size_that_does_not_divide_the_row() {
        let h: Vec<f64> = (0..48 * 48)
            .map(|k| if k % 49 == 0 { 1.0 } else { 0.0 })
            .collect();
        let err = gptq(
            &MinMax::bits(4),
            &[0.0; 48],
            1,
            48,
            &h,
            &GptqConfig::new(32),
        );
        assert!(err.unwrap_err().to_string().contains("does not divide"));
    }
}
