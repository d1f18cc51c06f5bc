//! The CUDA backend against the CPU backend (or an f64 host reference), op by op and format by
//! format, on fresh random inputs of odd shapes. Inputs are rounded to bf16 first so both backends
//! see the same values; outputs are poisoned with NaN before each run, so an element the kernel
//! never wrote fails. Bound: relative L2 error under 1e-2 (bf16 outputs, f32 arithmetic).
//!
//! Without a CUDA device each test prints `skipped: no CUDA device (...)` and passes.
#![cfg(feature = "cuda")]

use marlin_kernels::cpu::CpuBackend;
use marlin_kernels::cuda::{self, CudaBackend};
use marlin_kernels::{Backend, DenseFormat, HostWeight, KvLayout, MatmulRows, SeqSpan, StepBatch};
use marlin_quant::{quantize_rtn, QuantFormat, QuantTensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::sync::OnceLock;

const BOUND: f64 = 1e-2;
/// silu(gate) · up from two projections each within BOUND: their relative errors add (silu's
/// slope scales the gate's by up to ~1.3 where the products are large). Measured on an H200,
/// int2 50 × 224 g32 at one row, 3000 draws: each projection 1.9-2.9e-3 (the matmul op's own
/// error, rerun bit for bit alike), the product above 5e-3 in 596 of them, at most 1.10e-2.
const SWIGLU_BOUND: f64 = 2.0 * BOUND;

fn gpu(test: &str) -> Option<&'static CudaBackend> {
    static GPU: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    let g = GPU.get_or_init(|| match cuda::unavailable() {
        Some(why) => Err(why),
        None => CudaBackend::new(0).map_err(|e| e.to_string()),
    });
    match g {
        Ok(b) => Some(b),
        Err(why) if cuda::unavailable().is_some() => {
            // Straight to stderr: the harness would swallow a println! of a passing test.
            let _ = writeln!(std::io::stderr(), "{test}: skipped: no CUDA device ({why})");
            None
        }
        // A device is there but the backend failed: that is a failure, not a skip.
        Err(why) => panic!("{test}: CUDA backend failed to start: {why}"),
    }
}

fn cpu() -> CpuBackend {
    CpuBackend::new(2).unwrap()
}

/// Fresh random inputs each run; the seed is printed (shown when a test fails) and
/// `MARLIN_TEST_SEED` replays it.
fn rng() -> StdRng {
    let seed = std::env::var("MARLIN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (MARLIN_TEST_SEED replays it)");
    StdRng::seed_from_u64(seed)
}

fn bf(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

fn randv(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf(rng.random_range(-1.0..1.0f32) * scale))
        .collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        assert!(
            g.is_finite(),
            "non-finite output {g} (unwritten or overflow)"
        );
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let e = rel_err(got, want);
    assert!(e < BOUND, "{what}: relative error {e:.2e}");
}

/// A second run's output equals the first's bit for bit (a decode graph's replays must equal its
/// direct run, so a kernel may leave no state behind and may not sum in arrival order).
fn assert_same_bits(what: &str, first: &[f32], second: &[f32]) {
    let differ = first
        .iter()
        .zip(second)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    assert!(
        differ.is_none(),
        "{what}: a second run differs at {differ:?}"
    );
}

/// A GPU buffer of `len` NaNs.
fn poisoned(g: &CudaBackend, len: usize) -> cuda::Buffer {
    let mut b = g.alloc(len).unwrap();
    g.write(&mut b, &vec![f32::NAN; len]).unwrap();
    b
}

fn pair(g: &CudaBackend, c: &CpuBackend, v: &[f32]) -> (cuda::Buffer, marlin_kernels::cpu::Buffer) {
    let mut gb = g.alloc(v.len()).unwrap();
    g.write(&mut gb, v).unwrap();
    let mut cb = c.alloc(v.len()).unwrap();
    c.write(&mut cb, v).unwrap();
    (gb, cb)
}

/// Runs wherever the NVRTC library is found, device or not.
#[test]
fn kernels_compile_for_sm90() {
    let t = std::time::Instant::now();
    match cuda::compile_kernels((9, 0)) {
        Ok(size) => println!("sm_90 CUBIN: {size} bytes in {:?}", t.elapsed()),
        Err(e) if e.to_string().contains("no NVRTC library") => {
            let _ = writeln!(std::io::stderr(), "kernels_compile_for_sm90: skipped: {e}");
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn write_read_round_trip() {
    let Some(g) = gpu("write_read_round_trip") else {
        return;
    };
    let v = randv(&mut rng(), 1001, 3.0);
    let mut b = poisoned(g, 1001);
    g.write(&mut b, &v).unwrap();
    assert_eq!(g.read(&b, 1001).unwrap(), v);
}

#[test]
fn elementwise_ops() {
    let Some(g) = gpu("elementwise_ops") else {
        return;
    };
    let c = cpu();
    let mut r = rng();
    for &(rows, dim) in &[(1usize, 7usize), (3, 1000), (5, 4103)] {
        let len = rows * dim;
        let (x, y) = (randv(&mut r, len, 4.0), randv(&mut r, len, 4.0));
        let (gx, cx) = pair(g, &c, &x);
        let (gy, cy) = pair(g, &c, &y);

        let mut go = poisoned(g, len);
        let mut co = c.alloc(len).unwrap();
        g.silu_mul(&gx, &gy, len, &mut go).unwrap();
        c.silu_mul(&cx, &cy, len, &mut co).unwrap();
        assert_close(
            "silu_mul",
            &g.read(&go, len).unwrap(),
            &c.read(&co, len).unwrap(),
        );

        let (mut gx2, mut cx2) = pair(g, &c, &x);
        g.add(&mut gx2, &gy, len).unwrap();
        c.add(&mut cx2, &cy, len).unwrap();
        assert_close(
            "add",
            &g.read(&gx2, len).unwrap(),
            &c.read(&cx2, len).unwrap(),
        );

        let (mut gs, mut cs) = pair(g, &c, &x);
        g.softmax(&mut gs, rows, dim).unwrap();
        c.softmax(&mut cs, rows, dim).unwrap();
        assert_close(
            "softmax",
            &g.read(&gs, len).unwrap(),
            &c.read(&cs, len).unwrap(),
        );

        let w = randv(&mut r, dim, 2.0);
        let (gw, cw) = pair(g, &c, &w);
        let mut go = poisoned(g, len);
        g.rms_norm(&gx, &gw, 1e-5, rows, dim, &mut go).unwrap();
        c.rms_norm(&cx, &cw, 1e-5, rows, dim, &mut co).unwrap();
        assert_close(
            "rms_norm",
            &g.read(&go, len).unwrap(),
            &c.read(&co, len).unwrap(),
        );
    }
}

/// Sequences of (new tokens, context after the step), blocks handed out shuffled.
fn make_step(r: &mut StdRng, seqs: &[(usize, usize)], block_size: usize) -> (StepBatch, usize) {
    let total_blocks: usize = seqs.iter().map(|s| s.1.div_ceil(block_size)).sum::<usize>() + 3;
    let mut free: Vec<u32> = (0..total_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, r.random_range(0..=i));
    }
    let mut b = StepBatch::default();
    for &(len, ctx) in seqs {
        let table: Vec<u32> = (0..ctx.div_ceil(block_size))
            .map(|_| free.pop().unwrap())
            .collect();
        let start = b.tokens.len();
        for t in 0..len {
            let pos = ctx - len + t;
            b.tokens.push(r.random_range(0..50));
            b.positions.push(pos as u32);
            b.slots
                .push(table[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
        }
        b.seqs.push(SeqSpan {
            start,
            len,
            context_len: ctx,
            prompt_len: 0,
            block_table: table,
        });
        b.logit_rows.push((b.tokens.len() - 1) as u32);
    }
    (b, total_blocks)
}

/// The rows of `table` the step's tokens pick, gathered on the GPU (into a poisoned buffer) and
/// on the CPU: `len` values each.
fn embed_both(
    g: &CudaBackend,
    c: &CpuBackend,
    table: &HostWeight,
    (gs, cs): (&cuda::Step, &<CpuBackend as Backend>::Step),
    len: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (gt, ct) = (
        g.upload_weight(table).unwrap(),
        c.upload_weight(table).unwrap(),
    );
    let mut go = poisoned(g, len);
    let mut co = c.alloc(len).unwrap();
    g.embedding(&gt, gs, &mut go).unwrap();
    c.embedding(&ct, cs, &mut co).unwrap();
    (g.read(&go, len).unwrap(), c.read(&co, len).unwrap())
}

#[test]
fn embedding_rope_gather() {
    let Some(g) = gpu("embedding_rope_gather") else {
        return;
    };
    let c = cpu();
    let mut r = rng();
    let (step, _) = make_step(&mut r, &[(5, 9), (1, 40), (3, 3)], 16);
    let n = step.num_tokens();
    let (gs, cs) = (
        g.prepare_step(&step).unwrap(),
        c.prepare_step(&step).unwrap(),
    );
    for format in DenseFormat::ALL {
        let dim = 131;
        let table = HostWeight::from_f32(format, 50, dim, &randv(&mut r, 50 * dim, 1.0)).unwrap();
        let (got, want) = embed_both(g, &c, &table, (&gs, &cs), n * dim);
        assert_close(&format!("embedding {format}"), &got, &want);
    }
    for &(heads, hd) in &[(3usize, 64usize), (2, 80), (1, 256), (4, 6)] {
        let len = n * heads * hd;
        let x = randv(&mut r, len, 2.0);
        let mut table = vec![0.0f32; 64 * hd];
        for p in 0..64 {
            for i in 0..hd / 2 {
                let a = p as f32 / 10000f32.powf(2.0 * i as f32 / hd as f32);
                table[p * hd + i] = bf(a.cos());
                table[p * hd + hd / 2 + i] = bf(a.sin());
            }
        }
        let (mut gx, mut cx) = pair(g, &c, &x);
        let (gt, ct) = pair(g, &c, &table);
        g.rope(&mut gx, &gs, heads, hd, &gt).unwrap();
        c.rope(&mut cx, &cs, heads, hd, &ct).unwrap();
        assert_close(
            &format!("rope h{heads} d{hd}"),
            &g.read(&gx, len).unwrap(),
            &c.read(&cx, len).unwrap(),
        );
    }
    let dim = 77;
    let x = randv(&mut r, n * dim, 1.0);
    let (gx, cx) = pair(g, &c, &x);
    let rows = step.logit_rows.len();
    let mut go = poisoned(g, rows * dim);
    let mut co = c.alloc(rows * dim).unwrap();
    g.gather_logit_rows(&gx, &gs, dim, &mut go).unwrap();
    c.gather_logit_rows(&cx, &cs, dim, &mut co).unwrap();
    assert_eq!(
        g.read(&go, rows * dim).unwrap(),
        c.read(&co, rows * dim).unwrap()
    );
}

/// A packed embedding table (every format, in the decode kernel's layout on the GPU) gathers rows
/// equal, bit for bit, to the CPU's dequantized rows rounded to bf16: both compute each value in
/// f32 exactly as docs/format.md defines it.
#[test]
fn quantized_embedding() {
    let Some(g) = gpu("quantized_embedding") else {
        return;
    };
    let c = cpu();
    let mut r = rng();
    let (step, _) = make_step(&mut r, &[(5, 9), (1, 40), (3, 3)], 16);
    let n = step.num_tokens();
    let (gs, cs) = (
        g.prepare_step(&step).unwrap(),
        c.prepare_step(&step).unwrap(),
    );
    for format in QuantFormat::ALL {
        // 50 rows: a partial strip of 16; widths not a multiple of the 64-column chunks.
        for &(dim, group) in &[(160usize, 32usize), (203, 203), (384, 128)] {
            let Some(group) = test_group(format, dim, group) else {
                continue;
            };
            let t = quantize_rtn(&randv(&mut r, 50 * dim, 1.0), 50, dim, format, group).unwrap();
            let table = HostWeight::quant(t).unwrap();
            let (got, want) = embed_both(g, &c, &table, (&gs, &cs), n * dim);
            let want: Vec<f32> = want.into_iter().map(bf).collect();
            assert_eq!(got, want, "embedding {format} {dim} g{group}");
        }
    }
}

#[test]
fn paged_attention() {
    let Some(g) = gpu("paged_attention") else {
        return;
    };
    let c = cpu();
    let mut r = rng();
    // (seqs, heads, kv_heads, head_dim, block size): prefill chunks after earlier context (over
    // 16 tokens: the tensor-core kernel for head dims 64 and 128, else the one-block-per-head
    // kernel, also past its 512-key chunk), steps of at most 16 tokens (the split-key decode
    // kernel where the head dim is a power of two), odd head dims.
    type Case = (&'static [(usize, usize)], usize, usize, usize, usize);
    let cases: &[Case] = &[
        (&[(7, 7), (1, 30), (13, 20)], 4, 2, 64, 16),
        (&[(1, 1300), (1, 517), (2, 600)], 8, 2, 128, 16),
        (&[(16, 1300), (1, 517)], 8, 2, 128, 16),
        // A 300-token prompt (many warps and key tiles) packed with a short chunk and a single
        // token after context: warps that straddle sequences.
        (&[(300, 300), (37, 80), (1, 9)], 32, 8, 128, 16),
        (&[(70, 200), (9, 9)], 4, 1, 64, 32),
        (&[(40, 45)], 3, 3, 80, 8),
        (&[(5, 9), (1, 700)], 2, 1, 256, 32),
        (&[(6, 6), (1, 33)], 6, 3, 36, 16),
    ];
    for &(seqs, heads, kv_heads, hd, bs) in cases {
        check_attention(g, &c, &mut r, seqs, heads, kv_heads, hd, bs);
    }
}

/// Decode steps (one new token per sequence) go to the split-key kernel (`attention_decode`,
/// whose last block of a head combines its splits): contexts of 1 key (one split), 17 (one
/// partial split), 700 and 3000 (many splits, the last partial), GQA groups 1, 4 and 12 (two
/// group slices of at most 8 heads), head dims 64 and 128, sequences of different lengths in one
/// step (blocks past a short sequence's keys write nothing); steps of 2 tokens or more with head
/// dims 64 and 128 go to the tensor-core kernel (`attention_tc_*`: a group of 12 in one block's
/// rows, sequences of unlike lengths, one of two tokens, the step's keys in a warp's first tile
/// and in a later one), the others to the SIMT kernel's whole-group builds. The queries (up to 6 in size) make the softmax peaked, so a
/// wrong max rescaling between splits shows. Every case runs twice: the second run finds the
/// counters of finished splits as the first left them (back at zero).
#[test]
fn decode_attention_split() {
    let Some(g) = gpu("decode_attention_split") else {
        return;
    };
    let c = cpu();
    let mut r = rng();
    type Case = (&'static [(usize, usize)], usize, usize, usize, usize);
    let cases: &[Case] = &[
        (&[(1, 1)], 4, 4, 64, 16),
        (&[(1, 17)], 8, 2, 128, 16),
        (&[(1, 700)], 4, 1, 128, 16),
        (&[(1, 3000)], 32, 8, 128, 16),
        (&[(1, 3000)], 2, 2, 64, 32),
        (&[(1, 1), (1, 17), (1, 700), (1, 3000)], 8, 2, 64, 16),
        (&[(1, 700), (1, 40)], 24, 2, 128, 16),
        // Keys and values past 32 MiB (counted at the key bucket) on the SIMT kernel (head dim
        // 256, a group over 16): whole GQA groups per block, a group of 4, and one of 24 in three
        // slices of 8.
        (&[(1, 3000), (1, 2500), (1, 40), (1, 900)], 32, 8, 256, 16),
        (&[(1, 3000); 9], 48, 2, 128, 16),
        // The same steps at head dim 128 and a group of 12 on tensor cores.
        (&[(1, 3000), (1, 2500), (1, 40), (1, 900)], 32, 8, 128, 16),
        (&[(1, 3000); 9], 24, 2, 128, 16),
        // The tensor-core kernel at head dim 64 over sequences of different lengths (splits past
        // the short ones' keys), one of them two tokens; and llama3-8b's heads at batch 8.
        (
            &[
                (1, 700),
                (1, 40),
                (2, 300),
                (1, 1),
                (1, 90),
                (1, 129),
                (1, 256),
                (1, 17),
            ],
            8,
            2,
            64,
            16,
        ),
        (&[(1, 600); 8], 32, 8, 128, 16),
        // Batch 16 of llama3-8b's heads: a block per (token, kv head) on an H100/H200 (no splits
        // to combine), each warp's tiles through its whole ring.
        (&[(1, 600); 16], 32, 8, 128, 16),
    ];
    for &(seqs, heads, kv_heads, hd, bs) in cases {
        for _ in 0..2 {
            check_attention(g, &c, &mut r, seqs, heads, kv_heads, hd, bs);
        }
    }
}

/// rope's cos and sin rows for positions 0 .. len (bf16 values).
fn rope_table(len: usize, hd: usize) -> Vec<f32> {
    let mut table = vec![0.0f32; len * hd];
    for p in 0..len {
        for i in 0..hd / 2 {
            let a = p as f32 / 10000f32.powf(2.0 * i as f32 / hd as f32);
            table[p * hd + i] = bf(a.cos());
            table[p * hd + hd / 2 + i] = bf(a.sin());
        }
    }
    table
}

/// One attention step of `seqs` (new tokens, context) on both backends, the cache filled with
/// random keys and values first; the GPU output poisoned. Then the same step from projections
/// through `rope_attention` (one launch on the GPU for decode steps), and attention once more
/// over the cache that left, which reads the keys and values it stored.
#[allow(clippy::too_many_arguments)]
fn check_attention(
    g: &CudaBackend,
    c: &CpuBackend,
    r: &mut StdRng,
    seqs: &[(usize, usize)],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    bs: usize,
) {
    let (step, blocks) = make_step(r, seqs, bs);
    let layout = KvLayout {
        num_blocks: blocks,
        block_size: bs,
        kv_heads,
        head_dim: hd,
    };
    let (gs, cs) = (
        g.prepare_step(&step).unwrap(),
        c.prepare_step(&step).unwrap(),
    );
    let (mut gk, mut ck) = (g.alloc_kv(layout).unwrap(), c.alloc_kv(layout).unwrap());
    // Fill every slot of the cache: a step with every context token as new.
    let full: Vec<(usize, usize)> = seqs.iter().map(|&(_, ctx)| (ctx, ctx)).collect();
    let mut fill = step.clone();
    fill.tokens.clear();
    fill.positions.clear();
    fill.slots.clear();
    fill.logit_rows.clear();
    let mut start = 0;
    for (i, &(len, _)) in full.iter().enumerate() {
        let s = &mut fill.seqs[i];
        s.start = start;
        s.len = len;
        for pos in 0..len {
            fill.tokens.push(0);
            fill.positions.push(pos as u32);
            fill.slots
                .push(s.block_table[pos / bs] * bs as u32 + (pos % bs) as u32);
        }
        start += len;
    }
    let nf = fill.num_tokens();
    let sw = kv_heads * hd;
    let (kvals, vvals) = (randv(r, nf * sw, 1.0), randv(r, nf * sw, 1.0));
    let (gkb, ckb) = pair(g, c, &kvals);
    let (gvb, cvb) = pair(g, c, &vvals);
    let (gf, cf) = (
        g.prepare_step(&fill).unwrap(),
        c.prepare_step(&fill).unwrap(),
    );
    g.write_kv(&mut gk, &gkb, &gvb, &gf).unwrap();
    c.write_kv(&mut ck, &ckb, &cvb, &cf).unwrap();

    let n = step.num_tokens();
    let len = n * heads * hd;
    let q = randv(r, len, 6.0);
    let (gq, cq) = pair(g, c, &q);
    let mut go = poisoned(g, len);
    let mut co = c.alloc(len).unwrap();
    let scale = 1.0 / (hd as f32).sqrt();
    g.attention(&gq, &gk, &gs, heads, scale, &mut go).unwrap();
    c.attention(&cq, &ck, &cs, heads, scale, &mut co).unwrap();
    let what = format!("attention {seqs:?} h{heads}/{kv_heads} d{hd} bs{bs}");
    assert_close(
        &what,
        &g.read(&go, len).unwrap(),
        &c.read(&co, len).unwrap(),
    );

    let contexts = seqs.iter().map(|s| s.1).max().unwrap();
    let (gt, ct) = pair(g, c, &rope_table(contexts, hd));
    let (mut gq, mut cq) = pair(g, c, &randv(r, len, 6.0));
    let (mut gkn, mut ckn) = pair(g, c, &randv(r, n * sw, 1.0));
    let (gvn, cvn) = pair(g, c, &randv(r, n * sw, 1.0));
    let mut go = poisoned(g, len);
    g.rope_attention(
        &mut gq, &mut gkn, &gvn, &mut gk, &gs, heads, kv_heads, hd, &gt, scale, &mut go,
    )
    .unwrap();
    c.rope_attention(
        &mut cq, &mut ckn, &cvn, &mut ck, &cs, heads, kv_heads, hd, &ct, scale, &mut co,
    )
    .unwrap();
    let what = format!("rope_{what}");
    assert_close(
        &what,
        &g.read(&go, len).unwrap(),
        &c.read(&co, len).unwrap(),
    );
    let (gq, cq) = pair(g, c, &randv(r, len, 6.0));
    let mut go = poisoned(g, len);
    g.attention(&gq, &gk, &gs, heads, scale, &mut go).unwrap();
    c.attention(&cq, &ck, &cs, heads, scale, &mut co).unwrap();
    assert_close(
        &format!("{what}, then attention over its cache"),
        &g.read(&go, len).unwrap(),
        &c.read(&co, len).unwrap(),
    );
}

/// rope of q and k and write_kv in one launch, against the CPU's three ops: the rotated q and k,
/// and attention over the cache the step wrote into (its earlier slots filled first).
#[test]
fn rope_write_kv_fused() {
    let Some(g) = gpu("rope_write_kv_fused") else {
        return;
    };
    let c = cpu();
    let mut r = rng();
    for &(heads, kv_heads, hd) in &[(8usize, 2usize, 64usize), (3, 3, 128), (4, 1, 80)] {
        let bs = 16;
        let seqs = [(1usize, 40usize), (5, 9), (3, 3)];
        let (step, blocks) = make_step(&mut r, &seqs, bs);
        let layout = KvLayout {
            num_blocks: blocks,
            block_size: bs,
            kv_heads,
            head_dim: hd,
        };
        let (mut gk, mut ck) = (g.alloc_kv(layout).unwrap(), c.alloc_kv(layout).unwrap());
        // Every context slot first, then the step's own slots through the fused op.
        let mut fill = step.clone();
        fill.tokens.clear();
        fill.positions.clear();
        fill.slots.clear();
        fill.logit_rows.clear();
        let mut start = 0;
        for s in fill.seqs.iter_mut() {
            s.start = start;
            s.len = s.context_len;
            for pos in 0..s.len {
                fill.tokens.push(0);
                fill.positions.push(pos as u32);
                fill.slots
                    .push(s.block_table[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
            start += s.len;
        }
        let sw = kv_heads * hd;
        let nf = fill.num_tokens();
        let (kf, vf) = (randv(&mut r, nf * sw, 1.0), randv(&mut r, nf * sw, 1.0));
        let (gkf, ckf) = pair(g, &c, &kf);
        let (gvf, cvf) = pair(g, &c, &vf);
        let (gf, cf) = (
            g.prepare_step(&fill).unwrap(),
            c.prepare_step(&fill).unwrap(),
        );
        g.write_kv(&mut gk, &gkf, &gvf, &gf).unwrap();
        c.write_kv(&mut ck, &ckf, &cvf, &cf).unwrap();

        let n = step.num_tokens();
        let (gt, ct) = pair(g, &c, &rope_table(64, hd));
        let (q, k, v) = (
            randv(&mut r, n * heads * hd, 2.0),
            randv(&mut r, n * sw, 2.0),
            randv(&mut r, n * sw, 1.0),
        );
        let (mut gq, mut cq) = pair(g, &c, &q);
        let (mut gkb, mut ckb) = pair(g, &c, &k);
        let (gv, cv) = pair(g, &c, &v);
        let (gs, cs) = (
            g.prepare_step(&step).unwrap(),
            c.prepare_step(&step).unwrap(),
        );
        g.rope_write_kv(
            &mut gq, &mut gkb, &gv, &mut gk, &gs, heads, kv_heads, hd, &gt,
        )
        .unwrap();
        c.rope_write_kv(
            &mut cq, &mut ckb, &cv, &mut ck, &cs, heads, kv_heads, hd, &ct,
        )
        .unwrap();
        let what = format!("rope_write_kv h{heads}/{kv_heads} d{hd}");
        let len = n * heads * hd;
        assert_close(
            &what,
            &g.read(&gq, len).unwrap(),
            &c.read(&cq, len).unwrap(),
        );
        assert_close(
            &what,
            &g.read(&gkb, n * sw).unwrap(),
            &c.read(&ckb, n * sw).unwrap(),
        );
        let mut go = poisoned(g, len);
        let mut co = c.alloc(len).unwrap();
        let scale = 1.0 / (hd as f32).sqrt();
        g.attention(&gq, &gk, &gs, heads, scale, &mut go).unwrap();
        c.attention(&cq, &ck, &cs, heads, scale, &mut co).unwrap();
        assert_close(
            &format!("{what} attention"),
            &g.read(&go, len).unwrap(),
            &c.read(&co, len).unwrap(),
        );
    }
}

/// Row counts of the matmul tests: the GEMV / decode kernels (1-16), the packed decode kernel in
/// 16-row blocks (17, 40: batched decode; 100: 4-bit weights, the others expanded) and the
/// expansion to bf16 for cuBLAS (130).
const ROWS: [usize; 10] = [1, 2, 5, 8, 9, 16, 17, 40, 100, 130];

#[test]
fn dense_matmul() {
    let Some(g) = gpu("dense_matmul") else { return };
    let c = cpu();
    let mut r = rng();
    for format in DenseFormat::ALL {
        for &(n, k) in &[(67usize, 520usize), (45, 131), (300, 1024)] {
            let w = HostWeight::from_f32(format, n, k, &randv(&mut r, n * k, 0.1)).unwrap();
            let (gw, cw) = (g.upload_weight(&w).unwrap(), c.upload_weight(&w).unwrap());
            assert_eq!(g.weight_shape(&gw), (n, k));
            for rows in ROWS {
                let x = randv(&mut r, rows * k, 1.0);
                let (gx, cx) = pair(g, &c, &x);
                let mut go = poisoned(g, rows * n);
                let mut co = c.alloc(rows * n).unwrap();
                g.matmul(&gx, &gw, MatmulRows::plain(rows), &mut go)
                    .unwrap();
                c.matmul(&cx, &cw, MatmulRows::plain(rows), &mut co)
                    .unwrap();
                assert_close(
                    &format!("matmul {format} {n}x{k} rows {rows}"),
                    &g.read(&go, rows * n).unwrap(),
                    &c.read(&co, rows * n).unwrap(),
                );
            }
        }
    }
}

/// x · Wᵀ in f64 from the tensor's exact dequantized values.
fn reference(t: &QuantTensor, x: &[f32], rows: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let w = t.dequantize();
    let (n, k) = (t.rows, t.cols);
    (0..rows * n)
        .into_par_iter()
        .map(|e| {
            let (r, j) = (e / n, e % n);
            let s: f64 = (0..k)
                .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                .sum();
            s as f32
        })
        .collect()
}

/// The group a test asks of `format`: its own block length for the MX/NV formats, which fix it
/// (None when `k` is not whole blocks).
fn test_group(format: QuantFormat, k: usize, group: usize) -> Option<usize> {
    match format.fixed_group() {
        Some(g) => k.is_multiple_of(g).then_some(g),
        None => Some(group),
    }
}

fn check_quant(g: &CudaBackend, r: &mut StdRng, t: &QuantTensor, what: &str, row_counts: &[usize]) {
    let (n, k) = (t.rows, t.cols);
    let gw = g
        .upload_weight(&HostWeight::quant(t.clone()).unwrap())
        .unwrap();
    assert_eq!(g.weight_shape(&gw), (n, k));
    for &rows in row_counts {
        let x = randv(r, rows * k, 1.0);
        let got = matmul_poisoned(g, &x, &gw, rows, n);
        assert_close(
            &format!("{what} rows {rows}"),
            &got,
            &reference(t, &x, rows),
        );
        // Again into a fresh poisoned buffer: no split-K sums or counters left behind.
        let again = matmul_poisoned(g, &x, &gw, rows, n);
        assert_same_bits(&format!("{what} rows {rows}"), &got, &again);
    }
}

/// `rows` rows of x times the weight's n features, into a poisoned buffer, read back.
fn matmul_poisoned(
    g: &CudaBackend,
    x: &[f32],
    w: &cuda::Weight,
    rows: usize,
    n: usize,
) -> Vec<f32> {
    let mut gx = g.alloc(x.len()).unwrap();
    g.write(&mut gx, x).unwrap();
    let mut out = poisoned(g, rows * n);
    g.matmul(&gx, w, MatmulRows::plain(rows), &mut out).unwrap();
    g.read(&out, rows * n).unwrap()
}

/// Every packed format through the decode kernels (1-16 rows) and the prefill expansion (17, 40).
#[test]
fn quant_matmul_every_format() {
    let Some(g) = gpu("quant_matmul_every_format") else {
        return;
    };
    let mut r = rng();
    for format in QuantFormat::ALL {
        // (n, k, group): groups of 128, 32 and 16 (whole chunks, scaled after the mma, or
        // parts of one, scaled per weight), per channel with k not a multiple of 16.
        for &(n, k, group) in &[
            (77usize, 384usize, 128usize),
            (50, 224, 32),
            (40, 176, 16),
            (33, 203, 203),
            (272, 1024, 64),
            // Large enough for the GEMV's unchecked steps (whole chunks past the ring's
            // fill) at every row count, and a per-channel one ending in a partial chunk.
            (4224, 3072, 128),
            (4224, 3072, 32),
            (4224, 3080, 3080),
            // Between two and three blocks an SM on an H100 (132 SMs): the one-row kernel's
            // static ring (the shapes above take its deep build there).
            (5600, 1024, 128),
            // More strips than 4 blocks an SM on any GPU up to 132 SMs: the bounded builds, and
            // at 2-8 rows the four-strip blocks on an H100 (its last block one strip); those
            // again per channel with a partial last chunk and two strips in the last block.
            (8464, 512, 128),
            (7700, 1000, 1000),
            // Enough four-strip blocks for 9-16 rows on an H100 (199, its last two strips, one of
            // them partial).
            (12700, 256, 128),
        ] {
            let Some(group) = test_group(format, k, group) else {
                continue;
            };
            let t = quantize_rtn(&randv(&mut r, n * k, 0.1), n, k, format, group).unwrap();
            check_quant(g, &mut r, &t, &format!("{format} {n}x{k} g{group}"), &ROWS);
        }
    }
}

/// One to eight rows of 4-bit codes on rows of 8192 columns, the decode kernels whose activations
/// ride in the copy ring. At 2-4 rows (`_2`, and `_4` for int4 and fp4) 396 strips is three blocks
/// an SM on an H100 or H200 (the plain builds), 400 more (the bounded ones). 1057 strips take two
/// a block (`_1r`, `_2r`, `_4r`, and `_8r` at 5 and 8 rows; the last block's second strip is past
/// n). `quant_matmul_every_format`'s weights are too short for them, and its row counts skip 3
/// and 4.
#[test]
fn quant_matmul_ring_rows() {
    let Some(g) = gpu("quant_matmul_ring_rows") else {
        return;
    };
    let mut r = rng();
    for format in [
        QuantFormat::Int {
            bits: 4,
            asym: false,
        },
        QuantFormat::Fp4,
        QuantFormat::Mxfp4,
        QuantFormat::Nvfp4,
    ] {
        for n in [6336, 6400, 16912] {
            let (k, group) = (8192, test_group(format, 8192, 128).unwrap());
            let t = quantize_rtn(&randv(&mut r, n * k, 0.1), n, k, format, group).unwrap();
            check_quant(
                g,
                &mut r,
                &t,
                &format!("{format} {n}x{k} g{group}"),
                &[1, 2, 3, 4, 5, 8],
            );
        }
    }
}

/// The int4 decode kernels on integer codes of the activations (1-4 rows of 8192 columns and
/// more, many strips): each chunk of 64 activations is two int8 codes a value scaled by the
/// chunk's largest, so a chunk with one value 120 times the others must keep those others
/// (with one code each, the error here is ~2e-2), and an all-zero chunk must give zeros, not
/// NaN. Bounded by 4e-3: the weights' values are exact there, so what errs is the codes (~1e-4)
/// and the outputs' rounding to bf16 (2^-9 at most, ~1.1e-3 here). (`quant_matmul_ring_rows`
/// takes them as two strips a block.)
#[test]
fn int4_integer_activations() {
    let Some(g) = gpu("int4_integer_activations") else {
        return;
    };
    let mut r = rng();
    let format = QuantFormat::Int {
        bits: 4,
        asym: false,
    };
    // 1-8 rows: on integer codes 1-4 of g128 and g64 (a scale a chunk: `_1i`..`_4i`) and 1-2 of
    // g32 (two: `_1h`, `_2h`), the others on the bf16 kernels; in the bounded builds (500 and
    // 529 strips), the unbounded ones (265) and ring pairs (529 and 1057 strips).
    for &(n, k, group) in &[
        (8464usize, 8192usize, 128usize),
        (4240, 12288, 64),
        (8000, 8192, 64),
        (8464, 8192, 32),
        (4240, 8192, 32),
        (16900, 8192, 32),
    ] {
        let t = quantize_rtn(&randv(&mut r, n * k, 0.1), n, k, format, group).unwrap();
        let gw = g
            .upload_weight(&HostWeight::quant(t.clone()).unwrap())
            .unwrap();
        for rows in 1..=8 {
            let mut x = randv(&mut r, rows * k, 0.5);
            for (c, chunk) in x.chunks_mut(64).enumerate() {
                match c % 5 {
                    0 => chunk[c % 64] = if c % 2 == 0 { 60.0 } else { -60.0 },
                    1 => chunk.fill(0.0),
                    _ => {}
                }
            }
            let got = matmul_poisoned(g, &x, &gw, rows, n);
            let e = rel_err(&got, &reference(&t, &x, rows));
            assert!(
                e < 4e-3,
                "int4 {n}x{k} g{group} rows {rows}: relative error {e:.2e}"
            );
        }
    }
}

/// Prefill on packed weights, every format: the wgmma kernel (sm_90) over several row tiles, the
/// last one partial, in blocks of 128 rows and (a weight of many strips at 500 rows, enough
/// blocks to fill an H100) of 256, and the expansion for cuBLAS that other GPUs take.
#[test]
fn quant_prefill_every_format() {
    let Some(g) = gpu("quant_prefill_every_format") else {
        return;
    };
    let mut r = rng();
    let kernel = g.wgmma();
    if !kernel {
        println!(
            "quant_prefill_every_format: no wgmma on {}: the expansion only",
            g.name()
        );
    }
    for format in QuantFormat::ALL {
        // Partial strips and 128-feature blocks, k not whole chunks, per-weight and per-chunk
        // scales, per channel.
        for &(n, k, group, rows) in &[
            (77usize, 384usize, 128usize, &[129usize, 300][..]),
            (50, 224, 32, &[129, 300]),
            (40, 176, 16, &[129, 300]),
            (33, 203, 203, &[129, 300]),
            (300, 1024, 64, &[129, 300]),
            (136, 3080, 3080, &[129, 300]),
            (8464, 256, 128, &[500]),
        ] {
            let Some(group) = test_group(format, k, group) else {
                continue;
            };
            let t = quantize_rtn(&randv(&mut r, n * k, 0.1), n, k, format, group).unwrap();
            let gw = g
                .upload_weight(&HostWeight::quant(t.clone()).unwrap())
                .unwrap();
            for &rows in rows {
                let x = randv(&mut r, rows * k, 1.0);
                let want = reference(&t, &x, rows);
                let mut gx = g.alloc(rows * k).unwrap();
                g.write(&mut gx, &x).unwrap();
                // Without the kernel, the expansion once.
                let paths: &[bool] = if kernel { &[true, false] } else { &[false] };
                for &on in paths {
                    g.set_wgmma(on);
                    let mut go = poisoned(g, rows * n);
                    g.matmul(&gx, &gw, MatmulRows::plain(rows), &mut go)
                        .unwrap();
                    let what = if on { "wgmma" } else { "expanded" };
                    assert_close(
                        &format!("{format} {n}x{k} g{group} rows {rows} {what}"),
                        &g.read(&go, rows * n).unwrap(),
                        &want,
                    );
                }
                g.set_wgmma(kernel);
            }
        }
    }
}

/// E2M1 weights whose scales pass 2 (bf16 would overflow on the scale times 2^126 the per-weight
/// kernels multiply the codes by): the scales shifted down, the sums back up (`e2m1_fold`).
#[test]
fn e2m1_large_scales() {
    let Some(g) = gpu("e2m1_large_scales") else {
        return;
    };
    let mut r = rng();
    for format in [QuantFormat::Fp4, QuantFormat::Mxfp4, QuantFormat::Nvfp4] {
        for &(n, k, group, size) in &[(50usize, 224usize, 32usize, 40.0f32), (272, 1024, 16, 3e4)] {
            let Some(group) = test_group(format, k, group) else {
                continue;
            };
            let t = quantize_rtn(&randv(&mut r, n * k, size), n, k, format, group).unwrap();
            check_quant(
                g,
                &mut r,
                &t,
                &format!("{format} {n}x{k} g{group} weights to {size}"),
                &ROWS,
            );
        }
    }
}

/// `matmul_many` of weights `ts` on one input, at each of `row_counts`, against the f64
/// reference of each weight.
fn check_many(
    g: &CudaBackend,
    r: &mut StdRng,
    ts: &[QuantTensor],
    row_counts: &[usize],
    what: &str,
) {
    let k = ts[0].cols;
    let ws: Vec<cuda::Weight> = ts
        .iter()
        .map(|t| {
            g.upload_weight(&HostWeight::quant(t.clone()).unwrap())
                .unwrap()
        })
        .collect();
    let refs: Vec<&cuda::Weight> = ws.iter().collect();
    for &rows in row_counts {
        let x = randv(r, rows * k, 1.0);
        let mut gx = g.alloc(rows * k).unwrap();
        g.write(&mut gx, &x).unwrap();
        let mut outs: Vec<cuda::Buffer> = ts.iter().map(|t| poisoned(g, rows * t.rows)).collect();
        let mut out_refs: Vec<&mut cuda::Buffer> = outs.iter_mut().collect();
        g.matmul_many(&gx, &refs, MatmulRows::plain(rows), &mut out_refs)
            .unwrap();
        let mut again: Vec<cuda::Buffer> = ts.iter().map(|t| poisoned(g, rows * t.rows)).collect();
        let mut again_refs: Vec<&mut cuda::Buffer> = again.iter_mut().collect();
        g.matmul_many(&gx, &refs, MatmulRows::plain(rows), &mut again_refs)
            .unwrap();
        for (i, (t, (o, a))) in ts.iter().zip(outs.iter().zip(&again)).enumerate() {
            let got = g.read(o, rows * t.rows).unwrap();
            assert_close(
                &format!("{what}: weight {i} rows {rows}"),
                &got,
                &reference(t, &x, rows),
            );
            // Split-K sums included: at most two splits, which add alike in either order.
            let a = g.read(a, rows * t.rows).unwrap();
            assert_same_bits(&format!("{what}: weight {i} rows {rows}"), &got, &a);
        }
    }
}

/// Several weights of one input (`matmul_many`: q/k/v, gate/up), in one launch when they share
/// a format, width and scaling, against the f64 reference of each, and run twice bitwise alike:
/// partial strips, split-K plans (k = 4096, up to dozens of splits), a set that cannot share a
/// launch (int4 groups of 32 beside per-channel scales), two of odd strip counts large enough
/// for the two-strip blocks at 16 rows and the four-strip blocks at 3 and 8 rows on an H100; at
/// 200 rows the wgmma prefill kernel's launches of several weights (on sm_90).
#[test]
fn matmul_many_quant() {
    let Some(g) = gpu("matmul_many_quant") else {
        return;
    };
    let mut r = rng();
    let sets: [(usize, &[(usize, usize)]); 6] = [
        (384, &[(200, 128), (40, 128), (40, 128)]),
        (4096, &[(40, 128), (24, 128)]),
        (1024, &[(77, 64), (300, 64)]),
        (224, &[(50, 32), (33, 224)]),
        (128, &[(4104, 128), (1000, 128)]),
        (256, &[(7000, 128), (1000, 128)]),
    ];
    for format in QuantFormat::ALL {
        for &(k, shapes) in &sets {
            let ts: Vec<QuantTensor> = shapes
                .iter()
                .map(|&(n, group)| {
                    let group = test_group(format, k, group).unwrap();
                    quantize_rtn(&randv(&mut r, n * k, 0.1), n, k, format, group).unwrap()
                })
                .collect();
            let what = format!("{format} k {k} {shapes:?}");
            check_many(g, &mut r, &ts, &[1, 3, 8, 9, 16, 33, 200], &what);
        }
    }
}

/// silu(x · gateᵀ) * (x · upᵀ) from the f64 references of gate and up, each rounded to bf16 as
/// the projections are.
fn swiglu_reference(gate: &QuantTensor, up: &QuantTensor, x: &[f32], rows: usize) -> Vec<f32> {
    let (g, u) = (reference(gate, x, rows), reference(up, x, rows));
    g.iter()
        .zip(&u)
        .map(|(&g, &u)| {
            let g = bf(g);
            g / (1.0 + (-g).exp()) * bf(u)
        })
        .collect()
}

/// `matmul_swiglu`: gate and up of one shape run the gated kernel (a block takes a strip of
/// each) at one row, split along k where the strips are few, at 4 blocks an SM where they are
/// many, through a shared act-order permutation, and at 3, 16 and 33 rows (4- and 8-bit codes);
/// the other formats' batches and unlike pairs run as matmul_many and silu_mul. Against the f64
/// reference, and run twice bitwise alike.
#[test]
fn matmul_swiglu_quant() {
    let Some(g) = gpu("matmul_swiglu_quant") else {
        return;
    };
    let mut r = rng();
    let int4 = QuantFormat::Int {
        bits: 4,
        asym: false,
    };
    for format in QuantFormat::ALL {
        // (n, k, gate's group, up's group): partial strips, split-K (few strips, long rows),
        // more strips than 3 blocks an SM, partial chunks, unlike groups; and (int4) rows of
        // 8192 columns in many strips, which one row takes on integer codes of the activations
        // (400 strips: the bounded build; g32, two scales a chunk, 400 and 275 strips).
        for &(n, k, gg, ug) in &[
            (77usize, 384usize, 128usize, 128usize),
            (40, 4096, 128, 128),
            (6500, 256, 64, 64),
            (50, 224, 32, 32),
            (96, 512, 32, 128),
            (2200, 8192, 128, 64),
            (6400, 8192, 128, 128),
            (6400, 8192, 32, 32),
            (4400, 8192, 32, 32),
        ] {
            let (Some(gg), Some(ug)) = (test_group(format, k, gg), test_group(format, k, ug))
            else {
                continue;
            };
            if k == 8192 && format != int4 {
                continue;
            }
            let mut pair: Vec<QuantTensor> = [gg, ug]
                .iter()
                .map(|&group| {
                    quantize_rtn(&randv(&mut r, n * k, 0.1), n, k, format, group).unwrap()
                })
                .collect();
            if format == int4 && n == 77 {
                let perm = permutation(&mut r, k);
                for t in &mut pair {
                    t.perm = Some(perm.clone());
                }
            }
            let ws: Vec<cuda::Weight> = pair
                .iter()
                .map(|t| {
                    g.upload_weight(&HostWeight::quant(t.clone()).unwrap())
                        .unwrap()
                })
                .collect();
            for rows in [1usize, 3, 16, 33] {
                let what = format!("{format} {n}x{k} g{gg}/g{ug} rows {rows}");
                let x = randv(&mut r, rows * k, 1.0);
                let mut gx = g.alloc(rows * k).unwrap();
                g.write(&mut gx, &x).unwrap();
                let run = || {
                    let (mut go, mut uo) = (poisoned(g, rows * n), poisoned(g, rows * n));
                    let mut out = poisoned(g, rows * n);
                    g.matmul_swiglu(
                        &gx,
                        &ws[0],
                        &ws[1],
                        MatmulRows::plain(rows),
                        &mut go,
                        &mut uo,
                        &mut out,
                    )
                    .unwrap();
                    g.read(&out, rows * n).unwrap()
                };
                let got = run();
                let e = rel_err(&got, &swiglu_reference(&pair[0], &pair[1], &x, rows));
                assert!(e < SWIGLU_BOUND, "{what}: relative error {e:.2e}");
                assert_same_bits(&what, &got, &run());
            }
        }
    }
}

/// The residual add fused with the next norm, against the CPU's add then rms_norm: both the
/// updated residual and the normed output.
#[test]
fn add_rms_norm_fused() {
    let Some(g) = gpu("add_rms_norm_fused") else {
        return;
    };
    let c = cpu();
    let mut r = rng();
    for &(rows, dim) in &[(1usize, 4096usize), (3, 77), (5, 2500), (16, 576)] {
        let len = rows * dim;
        let (x, y, w) = (
            randv(&mut r, len, 2.0),
            randv(&mut r, len, 2.0),
            randv(&mut r, dim, 1.0),
        );
        let (mut gx, mut cx) = pair(g, &c, &x);
        let (gy, cy) = pair(g, &c, &y);
        let (gw, cw) = pair(g, &c, &w);
        let mut go = poisoned(g, len);
        let mut co = c.alloc(len).unwrap();
        g.add_rms_norm(&mut gx, &gy, &gw, 1e-5, rows, dim, &mut go)
            .unwrap();
        c.add_rms_norm(&mut cx, &cy, &cw, 1e-5, rows, dim, &mut co)
            .unwrap();
        assert_close(
            &format!("add_rms_norm residual {rows}x{dim}"),
            &g.read(&gx, len).unwrap(),
            &c.read(&cx, len).unwrap(),
        );
        assert_close(
            &format!("add_rms_norm out {rows}x{dim}"),
            &g.read(&go, len).unwrap(),
            &c.read(&co, len).unwrap(),
        );
    }
}

/// A random permutation of `k` columns.
fn permutation(r: &mut StdRng, k: usize) -> Vec<u32> {
    let mut perm: Vec<u32> = (0..k as u32).collect();
    for i in (1..k).rev() {
        perm.swap(i, r.random_range(0..=i));
    }
    perm
}

/// Act-order weights (stored columns permuted): the activations are reordered on the GPU before
/// the decode kernel or the prefill expansion; weights of one permutation share a launch and a
/// reordering, a weight with another permutation runs apart.
#[test]
fn act_order_matmul() {
    let Some(g) = gpu("act_order_matmul") else {
        return;
    };
    let mut r = rng();
    for format in [
        QuantFormat::Int {
            bits: 4,
            asym: false,
        },
        QuantFormat::Int {
            bits: 3,
            asym: true,
        },
        QuantFormat::Fp4,
    ] {
        for &(n, k, group) in &[(37usize, 256usize, 32usize), (300, 1024, 128)] {
            let mut t = quantize_rtn(&randv(&mut r, n * k, 0.1), n, k, format, group).unwrap();
            t.perm = Some(permutation(&mut r, k));
            check_quant(
                g,
                &mut r,
                &t,
                &format!("{format} act-order {n}x{k} g{group}"),
                &ROWS,
            );
        }
        let k = 512;
        let shared = permutation(&mut r, k);
        let ts: Vec<QuantTensor> = [(96usize, Some(&shared)), (40, Some(&shared)), (40, None)]
            .iter()
            .map(|&(n, perm)| {
                let mut t = quantize_rtn(&randv(&mut r, n * k, 0.1), n, k, format, 64).unwrap();
                t.perm = Some(perm.cloned().unwrap_or_else(|| permutation(&mut r, k)));
                t
            })
            .collect();
        let what = format!("{format} act-order");
        check_many(g, &mut r, &ts, &[1, 5, 16, 33, 130], &what);
    }
}

#[test]
fn kernel_cache_is_reused() {
    let Some(_) = gpu("kernel_cache_is_reused") else {
        return;
    };
    // The first backend compiled (or found) the module; a second one must start from the cache.
    let t = std::time::Instant::now();
    let b = CudaBackend::new(0).unwrap();
    let load = b.kernel_load();
    println!(
        "second backend ({}) started in {:?}, kernels {:?}",
        b.name(),
        t.elapsed(),
        load
    );
    assert!(
        load.from_cache,
        "the second backend compiled again: is $MARLIN_HOME/kernels writable?"
    );
}

/// `queue_argmax_rows` (the `argmax_rows` kernel) against the host scan (`marlin_kernels::argmax`, the CPU backend's) on the same
/// bf16 values: odd and 16-byte-multiple widths (the kernel's scalar and vector paths), a
/// 128256-wide vocabulary, rows whose maximum repeats (the first index wins), rows with NaNs
/// (never chosen) and rows of only NaN (0).
#[test]
fn argmax_rows() {
    let Some(g) = gpu("argmax_rows") else {
        return;
    };
    let c = cpu();
    let mut r = rng();
    for &(rows, dim) in &[(1, 1), (3, 7), (5, 1000), (2, 4104), (16, 333), (2, 128256)] {
        let mut x = randv(&mut r, rows * dim, 4.0);
        for row in x.chunks_mut(dim) {
            match r.random_range(0..4) {
                // Ties: the largest value again at a random later place.
                0 if dim > 1 => {
                    let m = row.iter().cloned().fold(f32::MIN, f32::max);
                    let at = r.random_range(0..dim);
                    row[at] = m;
                }
                1 => {
                    for _ in 0..dim.div_ceil(3) {
                        row[r.random_range(0..dim)] = f32::NAN;
                    }
                }
                2 if dim < 10 => row.fill(f32::NAN),
                _ => {}
            }
        }
        let mut gx = g.alloc(rows * dim).unwrap();
        g.write(&mut gx, &x).unwrap();
        let mut cx = c.alloc(rows * dim).unwrap();
        c.write(&mut cx, &x).unwrap();
        g.queue_argmax_rows(&gx, rows, dim).unwrap();
        c.queue_argmax_rows(&cx, rows, dim).unwrap();
        let (got, want) = (g.take_argmax().unwrap(), c.take_argmax().unwrap());
        let host: Vec<u32> = x.chunks(dim).map(marlin_kernels::argmax).collect();
        assert_eq!(want, host, "CPU backend, {rows} x {dim}");
        assert_eq!(got, want, "{rows} x {dim}");
    }
}

/// Queued argmax results come back oldest first, each its own (the page-locked copies are used
/// in turn), a third waiting result is refused, and taking with none queued is an error.
#[test]
fn argmax_results_wait_in_order() {
    let Some(g) = gpu("argmax_results_wait_in_order") else {
        return;
    };
    let mut r = rng();
    let (rows, dim) = (3, 4099);
    let inputs: Vec<Vec<f32>> = (0..5).map(|_| randv(&mut r, rows * dim, 4.0)).collect();
    let want: Vec<Vec<u32>> = inputs
        .iter()
        .map(|x| x.chunks(dim).map(marlin_kernels::argmax).collect())
        .collect();
    let buffers: Vec<_> = inputs
        .iter()
        .map(|x| {
            let mut b = g.alloc(rows * dim).unwrap();
            g.write(&mut b, x).unwrap();
            b
        })
        .collect();
    g.queue_argmax_rows(&buffers[0], rows, dim).unwrap();
    let mut taken = Vec::new();
    for b in &buffers[1..] {
        g.queue_argmax_rows(b, rows, dim).unwrap();
        let refused = g.queue_argmax_rows(b, rows, dim).unwrap_err().to_string();
        assert!(refused.contains("wait to be taken"), "{refused}");
        taken.push(g.take_argmax().unwrap());
    }
    taken.push(g.take_argmax().unwrap());
    assert_eq!(taken, want);
    let none = g.take_argmax().unwrap_err().to_string();
    assert!(none.contains("no ids queued"), "{none}");
}
