//! Causal attention over the paged KV cache, one task per (token, query head).
//!
//! A task depends only on its own query, position and block table, so its result is the same
//! whatever else is in the batch.

use super::simd::{dispatch, dot, F32x16, Isa};
use super::{KvCache, Step, SyncPtr};
use rayon::prelude::*;
use rayon::ThreadPool;
use std::cell::RefCell;

/// What every task of one attention call shares.
pub(crate) struct Job<'a> {
    pub cache: &'a KvCache,
    pub step: &'a Step,
    pub heads: usize,
    pub scale: f32,
}

/// One (token, head): scores for keys 0..=pos, a stable softmax, then the weighted sum of values.
/// Bound: loading pos+1 keys and values (head_dim f32 each, from L2) with one FMA per element
/// loaded; scores come four at a time out of one transposed reduction, exps sixteen at a time,
/// and the output stays in registers while every value row streams past it.
#[inline(always)]
unsafe fn head_body<V: F32x16>(
    job: &Job<'_>,
    token: usize,
    head: usize,
    q: *const f32,
    scores: *mut f32,
    out: *mut f32,
) {
    let layout = job.cache.layout;
    let (hd, bs, sw) = (layout.head_dim, layout.block_size, layout.slot_width());
    let kv_off = head / (job.heads / layout.kv_heads) * hd;
    let step = &job.step.batch;
    let table = &step.seqs[job.step.seq_of[token] as usize].block_table;
    let keys = step.positions[token] as usize + 1;
    let (kp, vp) = (
        job.cache.k.as_ptr().add(kv_off),
        job.cache.v.as_ptr().add(kv_off),
    );

    let mut max = f32::NEG_INFINITY;
    let mut j = 0;
    while j < keys {
        // Key j's block ends at the next multiple of bs; within it slots are consecutive.
        let slot = table[j / bs] as usize * bs + j % bs;
        let run = (bs - j % bs).min(keys - j);
        let mut i = 0;
        while i + 4 <= run {
            let k4 = kp.add((slot + i) * sw);
            let s = V::hsum4(dot4::<V>(
                q,
                [k4, k4.add(sw), k4.add(2 * sw), k4.add(3 * sw)],
                hd,
            ));
            for (c, s) in s.into_iter().enumerate() {
                let s = s * job.scale;
                *scores.add(j + i + c) = s;
                max = max.max(s);
            }
            i += 4;
        }
        for i in i..run {
            let s = dot::<V>(q, kp.add((slot + i) * sw), hd) * job.scale;
            *scores.add(j + i) = s;
            max = max.max(s);
        }
        j += run;
    }

    let (neg_max, mut sum) = (V::splat(-max), V::zero());
    let mut j = 0;
    while j < keys {
        let n = (keys - j).min(16);
        let e = V::add(V::load_part(scores.add(j), n), neg_max).exp();
        e.store_part(scores.add(j), n);
        // Reload so the lanes past the end add zero, not e^-max.
        sum = V::add(sum, V::load_part(scores.add(j), n));
        j += 16;
    }
    let inv = 1.0 / sum.hsum();

    let mut d = 0;
    while d < hd {
        let lanes = (hd - d).min(64);
        let mut acc = [V::zero(); 4];
        let mut j = 0;
        while j < keys {
            let slot = table[j / bs] as usize * bs + j % bs;
            let run = (bs - j % bs).min(keys - j);
            for i in 0..run {
                let p = V::splat(*scores.add(j + i));
                let v = vp.add((slot + i) * sw + d);
                for (a, acc) in acc.iter_mut().enumerate() {
                    let at = a * 16;
                    if at + 16 <= lanes {
                        *acc = V::fma(p, V::load(v.add(at)), *acc);
                    } else if at < lanes {
                        *acc = V::fma(p, V::load_part(v.add(at), lanes - at), *acc);
                    }
                }
            }
            j += run;
        }
        let inv = V::splat(inv);
        for (a, acc) in acc.iter().enumerate() {
            let at = a * 16;
            if at + 16 <= lanes {
                V::mul(*acc, inv).store(out.add(d + at));
            } else if at < lanes {
                V::mul(*acc, inv).store_part(out.add(d + at), lanes - at);
            }
        }
        d += lanes;
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

dispatch!(fn head_task(
    job: &Job<'_>, token: usize, head: usize, q: *const f32, scores: *mut f32, out: *mut f32,
) => head_body);

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Caller has validated the step against the cache and the q/out lengths.
pub(crate) fn attention(pool: &ThreadPool, isa: Isa, job: &Job<'_>, q: &[f32], out: &mut [f32]) {
    let hd = job.cache.layout.head_dim;
    let tokens = job.step.batch.num_tokens();
    let max_keys = job
        .step
        .batch
        .positions
        .iter()
        .max()
        .map_or(0, |&p| p as usize + 1);
    let q = SyncPtr(q.as_ptr() as *mut f32);
    let out = SyncPtr(out.as_mut_ptr());
    pool.install(|| {
        (0..tokens * job.heads).into_par_iter().for_each(|i| {
            let (token, head) = (i / job.heads, i % job.heads);
            SCORES.with_borrow_mut(|scores| {
                if scores.len() < max_keys {
                    scores.resize(max_keys, 0.0);
                }
                // SAFETY: each task writes its own head_dim slice of out; the caller checked
                // lengths and validated positions and block tables against the cache.
                unsafe {
                    head_task(
                        isa,
                        job,
                        token,
                        head,
                        q.get().add(i * hd),
                        scores.as_mut_ptr(),
                        out.get().add(i * hd),
                    )
                }
            })
        })
    });
}
