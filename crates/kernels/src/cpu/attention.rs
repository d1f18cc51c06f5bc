//! Causal attention over the paged KV cache, one task per (token, query head).
//!
//! A task depends only on its own query, position and block table, so its result is the same
//! whatever else is in the batch.

use super::simd::{axpy, dispatch, dot, scale, F32x16, Isa};
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

/// One (token, head): scores for keys 0..=pos, a stable softmax, then the weighted sum of values
/// accumulated straight into `out`. Bound: reading pos+1 keys and values (head_dim f32 each) from
/// L2, one FMA per element loaded, plus one exp per key.
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
    let (kp, vp) = (job.cache.k.as_ptr(), job.cache.v.as_ptr());
    // Slots of keys j..j+len, block by block, so the inner loops are division free.
    let blocks = || {
        table
            .iter()
            .enumerate()
            .take(keys.div_ceil(bs))
            .map(move |(b, &blk)| {
                let len = (keys - b * bs).min(bs);
                (b * bs, blk as usize * bs, len)
            })
    };
    let mut max = f32::NEG_INFINITY;
    for (j, first_slot, len) in blocks() {
        for i in 0..len {
            let s = job.scale * dot::<V>(q, kp.add((first_slot + i) * sw + kv_off), hd);
            *scores.add(j + i) = s;
            max = max.max(s);
        }
    }
    let mut sum = 0.0f64;
    for j in 0..keys {
        let e = (*scores.add(j) - max).exp();
        *scores.add(j) = e;
        sum += e as f64;
    }
    std::ptr::write_bytes(out, 0, hd);
    for (j, first_slot, len) in blocks() {
        for i in 0..len {
            axpy::<V>(
                *scores.add(j + i),
                vp.add((first_slot + i) * sw + kv_off),
                out,
                hd,
            );
        }
    }
    scale::<V>((1.0 / sum) as f32, out, hd);
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
