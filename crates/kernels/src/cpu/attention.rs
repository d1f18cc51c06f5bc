//! Causal attention over the paged KV cache.
//!
//! One task covers a block of up to `QUERY_TOKENS` consecutive tokens of one sequence and one kv
//! head, so every query head reading that kv head (the GQA group) for those tokens shares each
//! load of a key or value: K and V cross the L2 once per task instead of once per query. Keys go
//! by in chunks small enough to stay in L1 while every query of the task uses them.
//!
//! Each query's arithmetic is the same whatever block or batch it lands in (scores per key, one
//! max, exps, then values accumulated in key order), so a (token, head) result does not depend on
//! the rest of the batch.
//!
//! Bound: FMA throughput once K and V are in L1 (one FMA per key or value element per query),
//! which the 12-query tasks approach at prefill; decode reads the whole K and V once from memory.
//! Measured on SmolLM2's shape (9 heads, 3 kv heads, head_dim 64, `benches/attention.rs`): a
//! 512-token prefill takes 3.4 ms per layer (88 GFLOP/s, 2.5x the per-(token, head) version);
//! one decode token at 2048 keys 230 us, limited by there being only kv_heads = 3 tasks.

use super::simd::{dispatch, dot, F32x16, Isa};
use super::{KvCache, Step, SyncPtr};
use rayon::prelude::*;
use rayon::ThreadPool;
use std::cell::RefCell;

/// Tokens per task: with a GQA group of 3, twelve queries share every key and value load.
pub(crate) const QUERY_TOKENS: usize = 4;
/// Keys per chunk: 64 keys and 64 values of head_dim 64 take 32 KiB of L1.
const KEY_CHUNK: usize = 64;

/// What every task of one attention call shares.
pub(crate) struct Job<'a> {
    pub cache: &'a KvCache,
    pub step: &'a Step,
    pub heads: usize,
    pub scale: f32,
}

/// Tokens `t0..t1` of sequence `seq` (consecutive positions) against kv head `kvh`. `scratch`
/// holds a score row of `keys` (the last token's key count) per query, then one max and one
/// inverse sum per query.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block_body<V: F32x16>(
    job: &Job<'_>,
    seq: usize,
    kvh: usize,
    t0: usize,
    t1: usize,
    q: *const f32,
    scratch: *mut f32,
    out: *mut f32,
) {
    let layout = job.cache.layout;
    let (hd, bs, sw) = (layout.head_dim, layout.block_size, layout.slot_width());
    let group = job.heads / layout.kv_heads;
    let step = &job.step.batch;
    let table = &step.seqs[seq].block_table;
    let first_keys = step.positions[t0] as usize + 1;
    let keys = first_keys + (t1 - t0 - 1);
    let queries = (t1 - t0) * group;
    // Query i is token t0 + i / group, head kvh * group + i % group.
    let row = |i: usize| ((t0 + i / group) * job.heads + kvh * group + i % group) * hd;
    let keys_of = |i: usize| first_keys + i / group;
    let (kp, vp) = (job.cache.k.as_ptr(), job.cache.v.as_ptr());
    let (maxes, invs) = (
        scratch.add(queries * keys),
        scratch.add(queries * keys + queries),
    );
    for i in 0..queries {
        *maxes.add(i) = f32::NEG_INFINITY;
    }

    let mut slots = [0usize; KEY_CHUNK];
    for c0 in (0..keys).step_by(KEY_CHUNK) {
        let c1 = (c0 + KEY_CHUNK).min(keys);
        for j in c0..c1 {
            slots[j - c0] = (table[j / bs] as usize * bs + j % bs) * sw + kvh * hd;
        }
        for i in 0..queries {
            let end = c1.min(keys_of(i));
            let (qi, scores) = (q.add(row(i)), scratch.add(i * keys));
            let mut max = *maxes.add(i);
            let mut j = c0;
            while j + 4 <= end {
                let s = &slots[j - c0..j - c0 + 4];
                let k4 = [kp.add(s[0]), kp.add(s[1]), kp.add(s[2]), kp.add(s[3])];
                for (c, s) in V::hsum4(dot4::<V>(qi, k4, hd)).into_iter().enumerate() {
                    let s = s * job.scale;
                    *scores.add(j + c) = s;
                    max = max.max(s);
                }
                j += 4;
            }
            for j in j..end {
                let s = dot::<V>(qi, kp.add(slots[j - c0]), hd) * job.scale;
                *scores.add(j) = s;
                max = max.max(s);
            }
            *maxes.add(i) = max;
        }
    }

    for i in 0..queries {
        let (scores, n) = (scratch.add(i * keys), keys_of(i));
        let (neg_max, mut sum) = (V::splat(-*maxes.add(i)), V::zero());
        for j in (0..n).step_by(16) {
            let m = (n - j).min(16);
            let e = V::add(V::load_part(scores.add(j), m), neg_max).exp();
            e.store_part(scores.add(j), m);
            // Reload so the lanes past the end add zero, not e^-max.
            sum = V::add(sum, V::load_part(scores.add(j), m));
        }
        *invs.add(i) = 1.0 / sum.hsum();
        std::ptr::write_bytes(out.add(row(i)), 0, hd);
    }

    for c0 in (0..keys).step_by(KEY_CHUNK) {
        let c1 = (c0 + KEY_CHUNK).min(keys);
        for j in c0..c1 {
            slots[j - c0] = (table[j / bs] as usize * bs + j % bs) * sw + kvh * hd;
        }
        for i in 0..queries {
            let end = c1.min(keys_of(i));
            let (p, o) = (scratch.add(i * keys), out.add(row(i)));
            // Four vectors of the output at a time stay in registers across the chunk.
            for d in (0..hd).step_by(64) {
                let lanes = (hd - d).min(64);
                let mut acc = [V::zero(); 4];
                for (a, acc) in acc.iter_mut().enumerate() {
                    if a * 16 < lanes {
                        *acc = V::load_part(o.add(d + a * 16), (lanes - a * 16).min(16));
                    }
                }
                for j in c0..end {
                    let (pj, v) = (V::splat(*p.add(j)), vp.add(slots[j - c0] + d));
                    for (a, acc) in acc.iter_mut().enumerate() {
                        let at = a * 16;
                        if at + 16 <= lanes {
                            *acc = V::fma(pj, V::load(v.add(at)), *acc);
                        } else if at < lanes {
                            *acc = V::fma(pj, V::load_part(v.add(at), lanes - at), *acc);
                        }
                    }
                }
                for (a, acc) in acc.iter().enumerate() {
                    if a * 16 < lanes {
                        acc.store_part(o.add(d + a * 16), (lanes - a * 16).min(16));
                    }
                }
            }
        }
    }

    for i in 0..queries {
        let (o, inv) = (out.add(row(i)), V::splat(*invs.add(i)));
        for d in (0..hd).step_by(16) {
            let m = (hd - d).min(16);
            V::mul(V::load_part(o.add(d), m), inv).store_part(o.add(d), m);
        }
    }
}

/// q against four keys: four sixteen-lane partial sums for one `hsum4`.
#[inline(always)]
unsafe fn dot4<V: F32x16>(q: *const f32, k: [*const f32; 4], n: usize) -> [V; 4] {
    let mut acc = [V::zero(); 4];
    let mut d = 0;
    while d + 16 <= n {
        let qv = V::load(q.add(d));
        for c in 0..4 {
            acc[c] = V::fma(qv, V::load(k[c].add(d)), acc[c]);
        }
        d += 16;
    }
    if d < n {
        let qv = V::load_part(q.add(d), n - d);
        for c in 0..4 {
            acc[c] = V::fma(qv, V::load_part(k[c].add(d), n - d), acc[c]);
        }
    }
    acc
}

dispatch!(fn block_task(
    job: &Job<'_>, seq: usize, kvh: usize, t0: usize, t1: usize, q: *const f32,
    scratch: *mut f32, out: *mut f32,
) => block_body);

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Caller has validated the step against the cache and the q/out lengths.
pub(crate) fn attention(pool: &ThreadPool, isa: Isa, job: &Job<'_>, q: &[f32], out: &mut [f32]) {
    let kv_heads = job.cache.layout.kv_heads;
    let queries = QUERY_TOKENS * (job.heads / kv_heads);
    let blocks = &job.step.query_blocks;
    let q = SyncPtr(q.as_ptr() as *mut f32);
    let out = SyncPtr(out.as_mut_ptr());
    pool.install(|| {
        (0..blocks.len() * kv_heads).into_par_iter().for_each(|i| {
            let (seq, t0, t1) = blocks[i / kv_heads];
            let (seq, t0, t1) = (seq as usize, t0 as usize, t1 as usize);
            let keys = job.step.batch.positions[t1 - 1] as usize + 1;
            SCRATCH.with_borrow_mut(|scratch| {
                let need = queries * (keys + 2);
                if scratch.len() < need {
                    scratch.resize(need, 0.0);
                }
                // SAFETY: each task writes the rows of its own tokens and heads; the caller
                // checked lengths and validated positions and block tables against the cache.
                unsafe {
                    block_task(
                        isa,
                        job,
                        seq,
                        i % kv_heads,
                        t0,
                        t1,
                        q.get(),
                        scratch.as_mut_ptr(),
                        out.get(),
                    )
                }
            })
        })
    });
}
