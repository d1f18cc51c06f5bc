//! Causal attention over the paged KV cache.
//!
//! One task covers a block of up to `QUERY_TOKENS` consecutive tokens of one sequence, one kv
//! head and one partition of `PARTITION` keys, so every query head reading that kv head (the
//! GQA group) for those tokens shares each load of a key or value: K and V cross the L2 once per
//! task instead of once per query. Keys go by in chunks small enough to stay in L1 while every
//! query of the task uses them.
//!
//! Splitting along the keys (flash-decoding) keeps both cores busy when there are fewer
//! (block, kv head) pairs than threads, as in a single decode with 3 kv heads, and cuts long
//! contexts into equal tasks. A partition's result is its score max, its sum of exps and its
//! unnormalised value sum; the partitions of a query are combined in key order, weighted by
//! exp(partition max - overall max).
//!
//! Each query's arithmetic depends only on its own key count: partitions start at fixed key
//! indices (multiples of `PARTITION`) and a query is combined over exactly its own non-empty
//! partitions, whatever block, batch or prompt chunk it lands in, so a (token, head) result does
//! not depend on the rest of the batch. A query with at most `PARTITION` keys takes one pass
//! (scores, one max, exps, values in key order, times the inverse sum).
//!
//! Bound: decode reads the whole K and V once, but at a batch of 32 short sequences the
//! instructions are the cost, not that stream: `benches/attention.rs`'s serving step (32
//! sequences of ~100 keys, f16 cache) takes ~300 us per layer whether the layer's keys are in
//! cache or not (about 8 GB/s of keys and values). The heads of a token share each key's and
//! value's load and widening (`SHARED_HEADS`): a 512-token prefill went 3.3 → 2.4 ms per layer,
//! the serving step ~3% faster. Prefetching each block's keys and values when the task starts
//! made a whole 32-sequence decode step 7-10% faster (in this benchmark the effect is within
//! its noise). Prefill approaches FMA throughput once K and V are in L1 (one FMA per
//! key or value element per query). Measured on SmolLM2's shape (9 heads, 3 kv
//! heads, head_dim 64, `benches/attention.rs`) before the split: a 512-token prefill took 3.4 ms
//! per layer; one decode token at 2048 keys 230 us, limited by there being only kv_heads = 3
//! tasks.

use super::simd::{dispatch, dot, prefetch, Elem, F32x16, Isa};
use super::{KvCache, KvData, Step, SyncPtr};
use rayon::prelude::*;
use rayon::ThreadPool;
use std::cell::RefCell;

/// Tokens per task: with a GQA group of 3, twelve queries share every key and value load.
pub(crate) const QUERY_TOKENS: usize = 4;
/// Keys per chunk: 64 keys and 64 values of head_dim 64 take 32 KiB of L1.
const KEY_CHUNK: usize = 64;
/// Keys per partition (a multiple of `KEY_CHUNK`). Short contexts, the common serving case,
/// stay one pass with no partials to write and combine: at 128 a batch of 32 chat requests
/// (contexts up to ~170) spent more in split bookkeeping than it gained. From 512 keys on a
/// single decode has at least two tasks per kv head.
const PARTITION: usize = 256;
/// Query heads of one token that share each key and value load: four keep the score sums and
/// value accumulators (16 vectors) in AVX-512's registers.
const SHARED_HEADS: usize = 4;

/// What every task of one attention call shares.
pub(crate) struct Job<'a> {
    pub cache: &'a KvCache,
    pub step: &'a Step,
    pub heads: usize,
    pub scale: f32,
}

/// One task: query block `block` of the step, kv head `kvh`, keys from `part * PARTITION`.
/// `partial` is where its per-query results go when the block has several partitions (then
/// `query * (head_dim + 2)` further: max, sum, head_dim values); None writes the output.
#[derive(Clone, Copy)]
struct Task {
    block: u32,
    kvh: u32,
    part: u32,
    partial: Option<usize>,
}

/// Partitions of a query with `keys` keys.
fn partitions(keys: usize) -> usize {
    keys.div_ceil(PARTITION)
}

/// Tokens `t0..t1` of sequence `seq` (consecutive positions) against kv head `kvh`, keys of
/// partition `part`. `scratch` holds a score row of `PARTITION` per query, then one max and
/// one sum per query. `partial`: see [`Task`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block_body<V: F32x16, E: Elem>(
    job: &Job<'_>,
    (kp, vp): (*const E, *const E),
    seq: usize,
    kvh: usize,
    t0: usize,
    t1: usize,
    part: usize,
    q: *const f32,
    scratch: *mut f32,
    out: *mut f32,
    partial: Option<*mut f32>,
) {
    let layout = job.cache.layout;
    let (hd, bs) = (layout.head_dim, layout.block_size);
    let group = job.heads / layout.kv_heads;
    let step = &job.step.batch;
    let table = &step.seqs[seq].block_table;
    let first_keys = step.positions[t0] as usize + 1;
    let queries = (t1 - t0) * group;
    let p0 = part * PARTITION;
    let keys = (first_keys + (t1 - t0 - 1)).min(p0 + PARTITION);
    // Query i is token t0 + i / group, head kvh * group + i % group; its keys in this
    // partition end at `end_of(i)` (at most p0 when it has none here).
    let row = |i: usize| ((t0 + i / group) * job.heads + kvh * group + i % group) * hd;
    let end_of = |i: usize| (first_keys + i / group).min(keys);
    let dst = |i: usize| match partial {
        Some(p) => p.add(i * (hd + 2) + 2),
        None => out.add(row(i)),
    };
    let (maxes, sums) = (
        scratch.add(queries * PARTITION),
        scratch.add(queries * PARTITION + queries),
    );
    for i in 0..queries {
        *maxes.add(i) = f32::NEG_INFINITY;
    }

    // Slots of the partition's keys, relative to p0.
    let mut slots = [0usize; PARTITION];
    // Block by block: a division per key would cost more than the key's arithmetic. Each
    // block's run of keys and of values (contiguous per kv head) is fetched now: a run of a
    // short decode context is too short for the hardware prefetcher, and the loads had waited
    // on it (a 32-sequence decode step 7-10% faster end to end, `marlin bench --batch 32`).
    let mut j = p0;
    while j < keys {
        let block = j / bs;
        let (base, end) = (
            job.cache.block_offset(table[block] as usize, kvh),
            ((block + 1) * bs).min(keys),
        );
        for (i, slot) in slots[j - p0..end - p0].iter_mut().enumerate() {
            *slot = base + (j - block * bs + i) * hd;
        }
        let first = base + (j - block * bs) * hd;
        let bytes = (end - j) * hd * std::mem::size_of::<E>();
        for line in (0..bytes).step_by(64) {
            prefetch(kp.cast::<u8>().add(first * std::mem::size_of::<E>() + line));
            prefetch(vp.cast::<u8>().add(first * std::mem::size_of::<E>() + line));
        }
        j = end;
    }

    // The heads of a token share each key's and value's load and widening, up to
    // `SHARED_HEADS` at once; every head's arithmetic stays that of a lone query. `$body` runs
    // for each chunk of keys, token and run of heads, with `$keys` the chunk's keys that token
    // sees, `$first` the run's first query and `$g` its head count as a constant.
    macro_rules! head_runs {
        ($keys:ident, $first:ident, $g:ident => $body:expr) => {
            for c0 in (p0..keys).step_by(KEY_CHUNK) {
                let c1 = (c0 + KEY_CHUNK).min(keys);
                for token in 0..t1 - t0 {
                    let $keys = (c0, c1.min(first_keys + token));
                    for (h, g) in head_groups(group) {
                        let $first = token * group + h;
                        match g {
                            1 => {
                                const $g: usize = 1;
                                $body
                            }
                            2 => {
                                const $g: usize = 2;
                                $body
                            }
                            3 => {
                                const $g: usize = 3;
                                $body
                            }
                            _ => {
                                const $g: usize = 4;
                                $body
                            }
                        }
                    }
                }
            }
        };
    }

    head_runs!(keys, first, G => score_heads::<V, E, G>(
        job,
        (kp, q),
        &slots,
        p0,
        keys,
        first,
        &row,
        scratch,
        maxes,
    ));

    for i in 0..queries {
        let (scores, n) = (scratch.add(i * PARTITION), end_of(i).saturating_sub(p0));
        let (neg_max, mut sum) = (V::splat(-*maxes.add(i)), V::zero());
        for j in (0..n).step_by(16) {
            let m = (n - j).min(16);
            let e = V::add(V::load_part(scores.add(j), m), neg_max).exp();
            e.store_part(scores.add(j), m);
            // Reload so the lanes past the end add zero, not e^-max.
            sum = V::add(sum, V::load_part(scores.add(j), m));
        }
        *sums.add(i) = sum.hsum();
        std::ptr::write_bytes(dst(i), 0, hd);
    }

    head_runs!(keys, first, G => value_heads::<V, E, G>(
        vp, hd, &slots, p0, keys, first, scratch, &dst,
    ));

    for i in 0..queries {
        match partial {
            Some(p) => {
                *p.add(i * (hd + 2)) = *maxes.add(i);
                *p.add(i * (hd + 2) + 1) = *sums.add(i);
            }
            None => {
                let (o, inv) = (out.add(row(i)), V::splat(1.0 / *sums.add(i)));
                for d in (0..hd).step_by(16) {
                    let m = (hd - d).min(16);
                    V::mul(V::load_part(o.add(d), m), inv).store_part(o.add(d), m);
                }
            }
        }
    }
}

/// The heads of a GQA group in runs of at most `SHARED_HEADS`: (first head, heads).
fn head_groups(group: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..group)
        .step_by(SHARED_HEADS)
        .map(move |h| (h, (group - h).min(SHARED_HEADS)))
}

/// Scores of queries `first..first + G` (heads of one token) against keys `c0..end` of the
/// partition at `p0`, scaled, into their score rows, raising their maxes.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn score_heads<V: F32x16, E: Elem, const G: usize>(
    job: &Job<'_>,
    (kp, q): (*const E, *const f32),
    slots: &[usize; PARTITION],
    p0: usize,
    (c0, end): (usize, usize),
    first: usize,
    row: &dyn Fn(usize) -> usize,
    scratch: *mut f32,
    maxes: *mut f32,
) {
    let hd = job.cache.layout.head_dim;
    let q: [*const f32; G] = std::array::from_fn(|h| q.add(row(first + h)));
    let scores: [*mut f32; G] = std::array::from_fn(|h| scratch.add((first + h) * PARTITION));
    let mut max: [f32; G] = std::array::from_fn(|h| *maxes.add(first + h));
    let mut j = c0;
    while j + 4 <= end {
        let s = &slots[j - p0..j - p0 + 4];
        let k4 = [kp.add(s[0]), kp.add(s[1]), kp.add(s[2]), kp.add(s[3])];
        for (h, sums) in dot4::<V, E, G>(q, k4, hd).into_iter().enumerate() {
            for (c, s) in V::hsum4(sums).into_iter().enumerate() {
                let s = s * job.scale;
                *scores[h].add(j - p0 + c) = s;
                max[h] = max[h].max(s);
            }
        }
        j += 4;
    }
    for j in j..end {
        let k = kp.add(slots[j - p0]);
        for h in 0..G {
            let s = match E::as_f32(k) {
                Some(k) => dot::<V>(q[h], k, hd),
                None => V::hsum4(dot4::<V, E, 1>([q[h]], [k; 4], hd)[0])[0],
            } * job.scale;
            *scores[h].add(j - p0) = s;
            max[h] = max[h].max(s);
        }
    }
    for (h, max) in max.into_iter().enumerate() {
        *maxes.add(first + h) = max;
    }
}

/// Values of keys `c0..end` weighted by the exps in the score rows of queries
/// `first..first + G` (heads of one token), added to their outputs at `dst`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn value_heads<V: F32x16, E: Elem, const G: usize>(
    vp: *const E,
    hd: usize,
    slots: &[usize; PARTITION],
    p0: usize,
    (c0, end): (usize, usize),
    first: usize,
    scratch: *const f32,
    dst: &dyn Fn(usize) -> *mut f32,
) {
    let p: [*const f32; G] = std::array::from_fn(|h| scratch.add((first + h) * PARTITION));
    let o: [*mut f32; G] = std::array::from_fn(|h| dst(first + h));
    // Four vectors of each output at a time stay in registers across the chunk.
    for d in (0..hd).step_by(64) {
        let lanes = (hd - d).min(64);
        let vectors = lanes.div_ceil(16);
        let part = |a: usize| (lanes - a * 16).min(16);
        let mut acc = [[V::zero(); 4]; G];
        for (acc, o) in acc.iter_mut().zip(o) {
            for (a, acc) in acc.iter_mut().enumerate().take(vectors) {
                *acc = V::load_part(o.add(d + a * 16), part(a));
            }
        }
        for j in c0..end {
            let v = vp.add(slots[j - p0] + d);
            let mut values = [V::zero(); 4];
            for (a, value) in values.iter_mut().enumerate().take(vectors) {
                *value = if part(a) == 16 {
                    E::load::<V>(v.add(a * 16))
                } else {
                    E::load_part::<V>(v.add(a * 16), part(a))
                };
            }
            for (acc, p) in acc.iter_mut().zip(p) {
                let pj = V::splat(*p.add(j - p0));
                for (acc, value) in acc.iter_mut().zip(values).take(vectors) {
                    *acc = V::fma(pj, value, *acc);
                }
            }
        }
        for (acc, o) in acc.iter().zip(o) {
            for (a, acc) in acc.iter().enumerate().take(vectors) {
                acc.store_part(o.add(d + a * 16), part(a));
            }
        }
    }
}

/// The output of tokens `t0..t1` against kv head `kvh` from the partials of their partitions
/// at `partials` (partition after partition, `queries * (head_dim + 2)` each): per query, over
/// its own partitions in order, values and sums weighted by exp(max - overall max), then the
/// values times the inverse sum. With one partition the weight is exactly 1, which makes this
/// the single-pass result.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn combine_body<V: F32x16>(
    job: &Job<'_>,
    kvh: usize,
    t0: usize,
    t1: usize,
    partials: *const f32,
    out: *mut f32,
) {
    let hd = job.cache.layout.head_dim;
    let group = job.heads / job.cache.layout.kv_heads;
    let step = &job.step.batch;
    let queries = (t1 - t0) * group;
    let stride = queries * (hd + 2);
    for i in 0..queries {
        let parts = partitions(step.positions[t0] as usize + 1 + i / group);
        let at = |p: usize| partials.add(p * stride + i * (hd + 2));
        let max = (0..parts).map(|p| *at(p)).fold(f32::NEG_INFINITY, f32::max);
        let o = out.add(((t0 + i / group) * job.heads + kvh * group + i % group) * hd);
        let mut sum = 0.0;
        for p in 0..parts {
            let w = (*at(p) - max).exp();
            let (acc, wv) = (at(p).add(2), V::splat(w));
            for d in (0..hd).step_by(16) {
                let m = (hd - d).min(16);
                let x = V::mul(V::load_part(acc.add(d), m), wv);
                let x = if p == 0 {
                    x
                } else {
                    V::add(V::load_part(o.add(d), m), x)
                };
                x.store_part(o.add(d), m);
            }
            sum = if p == 0 {
                w * *at(p).add(1)
            } else {
                sum + w * *at(p).add(1)
            };
        }
        let inv = V::splat(1.0 / sum);
        for d in (0..hd).step_by(16) {
            let m = (hd - d).min(16);
            V::mul(V::load_part(o.add(d), m), inv).store_part(o.add(d), m);
        }
    }
}

/// `G` queries against four keys: for each query four sixteen-lane partial sums for one
/// `hsum4`, each key loaded (and widened) once for all; an f16 key left over after the groups
/// of four goes through here alone (f32 ones through `dot`).
#[inline(always)]
unsafe fn dot4<V: F32x16, E: Elem, const G: usize>(
    q: [*const f32; G],
    k: [*const E; 4],
    n: usize,
) -> [[V; 4]; G] {
    let mut acc = [[V::zero(); 4]; G];
    let mut d = 0;
    while d + 16 <= n {
        let keys: [V; 4] = std::array::from_fn(|c| E::load::<V>(k[c].add(d)));
        for h in 0..G {
            let qv = V::load(q[h].add(d));
            for c in 0..4 {
                acc[h][c] = V::fma(qv, keys[c], acc[h][c]);
            }
        }
        d += 16;
    }
    if d < n {
        let keys: [V; 4] = std::array::from_fn(|c| E::load_part::<V>(k[c].add(d), n - d));
        for h in 0..G {
            let qv = V::load_part(q[h].add(d), n - d);
            for c in 0..4 {
                acc[h][c] = V::fma(qv, keys[c], acc[h][c]);
            }
        }
    }
    acc
}

dispatch!(fn block_task<E: Elem>(
    job: &Job<'_>, kv: (*const E, *const E), seq: usize, kvh: usize, t0: usize, t1: usize, part: usize, q: *const f32,
    scratch: *mut f32, out: *mut f32, partial: Option<*mut f32>,
) => block_body);

dispatch!(fn combine_task(
    job: &Job<'_>, kvh: usize, t0: usize, t1: usize, partials: *const f32, out: *mut f32,
) => combine_body);

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's task list and partition results, reused from call to call.
    static TASKS: RefCell<(Vec<Task>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Caller has validated the step against the cache and the q/out lengths.
pub(crate) fn attention(pool: &ThreadPool, isa: Isa, job: &Job<'_>, q: &[f32], out: &mut [f32]) {
    match &job.cache.data {
        KvData::F32 { k, v } => run(pool, isa, job, (k, v), q, out),
        KvData::F16 { k, v } => run(pool, isa, job, (k, v), q, out),
    }
}

fn run<E: Elem>(
    pool: &ThreadPool,
    isa: Isa,
    job: &Job<'_>,
    (k, v): (&[E], &[E]),
    q: &[f32],
    out: &mut [f32],
) {
    let kv = (SyncPtr(k.as_ptr() as *mut E), SyncPtr(v.as_ptr() as *mut E));
    let (kv_heads, hd) = (job.cache.layout.kv_heads, job.cache.layout.head_dim);
    let group = job.heads / kv_heads;
    let blocks = &job.step.query_blocks;
    let keys_of =
        |(_, _, t1): (u32, u32, u32)| job.step.batch.positions[t1 as usize - 1] as usize + 1;
    let q = SyncPtr(q.as_ptr() as *mut f32);
    let out = SyncPtr(out.as_mut_ptr());
    TASKS.with_borrow_mut(|(tasks, partials)| {
        tasks.clear();
        let mut partial_len = 0;
        for (b, &block) in blocks.iter().enumerate() {
            let parts = partitions(keys_of(block));
            let stride = (block.2 - block.1) as usize * group * (hd + 2);
            for kvh in 0..kv_heads {
                for part in 0..parts {
                    tasks.push(Task {
                        block: b as u32,
                        kvh: kvh as u32,
                        part: part as u32,
                        partial: (parts > 1).then_some(partial_len),
                    });
                    if parts > 1 {
                        partial_len += stride;
                    }
                }
            }
        }
        if partials.len() < partial_len {
            partials.resize(partial_len, 0.0);
        }
        let partials = SyncPtr(partials.as_mut_ptr());
        pool.install(|| {
            tasks.par_iter().for_each(|task| {
                let (seq, t0, t1) = blocks[task.block as usize];
                let (seq, t0, t1) = (seq as usize, t0 as usize, t1 as usize);
                SCRATCH.with_borrow_mut(|scratch| {
                    let need = (t1 - t0) * group * (PARTITION + 2);
                    if scratch.len() < need {
                        scratch.resize(need, 0.0);
                    }
                    // SAFETY: each task writes the rows of its own tokens and heads, or its
                    // own range of the partials; the caller checked lengths and validated
                    // positions and block tables against the cache.
                    unsafe {
                        block_task(
                            isa,
                            job,
                            (kv.0.get().cast_const(), kv.1.get().cast_const()),
                            seq,
                            task.kvh as usize,
                            t0,
                            t1,
                            task.part as usize,
                            q.get(),
                            scratch.as_mut_ptr(),
                            out.get(),
                            task.partial.map(|at| partials.get().add(at)),
                        )
                    }
                })
            });
            // The first partition of each split (block, kv head) names where its partials start.
            tasks
                .par_iter()
                .filter(|task| task.part == 0 && task.partial.is_some())
                .for_each(|task| {
                    let (_, t0, t1) = blocks[task.block as usize];
                    // SAFETY: as above; the partials were all written by the pass before.
                    unsafe {
                        combine_task(
                            isa,
                            job,
                            task.kvh as usize,
                            t0 as usize,
                            t1 as usize,
                            partials.get().add(task.partial.expect("filtered")),
                            out.get(),
                        )
                    }
                });
        });
    });
}

#[cfg(test)]
mod tests {
    //! The split kernel against a plain f64 attention on contexts that cross partition
    //! boundaries, on every ISA and both cache types, outputs poisoned first; and each token's
    //! result bitwise the same as a lone decode whatever batch or prompt chunk it is computed in.

    use super::super::simd::Isa;
    use super::super::{Activations, Buffer, CpuBackend};
    use super::PARTITION;
    use crate::{Backend, KvLayout, SeqSpan, StepBatch};
    use half::f16;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::Rng;

    struct Case {
        layout: KvLayout,
        heads: usize,
        /// Per sequence: its block table (shuffled physical blocks) and cached length.
        tables: Vec<Vec<u32>>,
        lens: Vec<usize>,
        k: Vec<f32>,
        v: Vec<f32>,
    }

    impl Case {
        fn new(rng: &mut StdRng, heads: usize, layout: KvLayout, lens: Vec<usize>) -> Self {
            let mut free: Vec<u32> = (0..layout.num_blocks as u32).collect();
            free.shuffle(rng);
            let tables = lens
                .iter()
                .map(|&n| free.split_off(free.len() - n.div_ceil(layout.block_size)))
                .collect();
            let n = layout.slots() * layout.slot_width();
            // Values an f16 cache holds exactly, so one reference serves both cache types.
            let mut values = || {
                let v = |_| f16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32();
                (0..n).map(v).collect()
            };
            let (k, v) = (values(), values());
            Self {
                layout,
                heads,
                tables,
                lens,
                k,
                v,
            }
        }

        fn slot(&self, seq: usize, pos: usize) -> usize {
            let bs = self.layout.block_size;
            self.tables[seq][pos / bs] as usize * bs + pos % bs
        }

        /// Tokens `from..to` of each listed sequence, in order.
        fn batch(&self, spans: &[(usize, usize, usize)]) -> StepBatch {
            let mut batch = StepBatch::default();
            for &(seq, from, to) in spans {
                batch.seqs.push(SeqSpan {
                    start: batch.tokens.len(),
                    len: to - from,
                    context_len: to,
                    prompt_len: 0,
                    block_table: self.tables[seq].clone(),
                });
                for pos in from..to {
                    batch.tokens.push(0);
                    batch.positions.push(pos as u32);
                    batch.slots.push(self.slot(seq, pos) as u32);
                }
            }
            batch
        }

        /// A cache holding every sequence's keys and values.
        fn cache(&self, b: &CpuBackend) -> super::KvCache {
            let mut cache = b.alloc_kv(self.layout).unwrap();
            let sw = self.layout.slot_width();
            let spans: Vec<_> = (0..self.lens.len()).map(|s| (s, 0, self.lens[s])).collect();
            let batch = self.batch(&spans);
            let rows = |src: &[f32]| -> Vec<f32> {
                let slots = batch.slots.iter().map(|&s| s as usize);
                slots
                    .flat_map(|s| src[s * sw..(s + 1) * sw].to_vec())
                    .collect()
            };
            let step = b.prepare_step(&batch).unwrap();
            let (k, v) = (buffer(b, &rows(&self.k)), buffer(b, &rows(&self.v)));
            b.write_kv(&mut cache, &k, &v, &step).unwrap();
            cache
        }

        /// Runs `spans` with `q` (per token, heads × head_dim) on an output poisoned with NaN.
        fn run(
            &self,
            b: &CpuBackend,
            cache: &super::KvCache,
            spans: &[(usize, usize, usize)],
            q: &[f32],
        ) -> Vec<f32> {
            let batch = self.batch(spans);
            let step = b.prepare_step(&batch).unwrap();
            let len = batch.num_tokens() * self.heads * self.layout.head_dim;
            let mut out = buffer(b, &vec![f32::NAN; len]);
            let scale = 1.0 / (self.layout.head_dim as f32).sqrt();
            b.attention(
                &buffer(b, &q[..len]),
                cache,
                &step,
                self.heads,
                scale,
                &mut out,
            )
            .unwrap();
            b.read(&out, len).unwrap()
        }

        /// Attention of one query (head `h` of sequence `seq` at `pos`) in f64.
        fn reference(&self, seq: usize, pos: usize, h: usize, q: &[f32]) -> Vec<f64> {
            let hd = self.layout.head_dim;
            let at = |s: usize| {
                s * self.layout.slot_width() + h / (self.heads / self.layout.kv_heads) * hd
            };
            let scale = 1.0 / (hd as f64).sqrt();
            let scores: Vec<f64> = (0..=pos)
                .map(|j| {
                    let k = &self.k[at(self.slot(seq, j))..][..hd];
                    scale
                        * q.iter()
                            .zip(k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            let mut out = vec![0.0; hd];
            for (j, e) in exps.iter().enumerate() {
                let v = &self.v[at(self.slot(seq, j))..][..hd];
                for (o, &v) in out.iter_mut().zip(v) {
                    *o += e / total * v as f64;
                }
            }
            out
        }
    }

    fn buffer(b: &CpuBackend, v: &[f32]) -> Buffer {
        let mut buf = b.alloc(v.len()).unwrap();
        b.write(&mut buf, v).unwrap();
        buf
    }

    #[test]
    fn split_attention_matches_reference_and_is_batch_invariant() {
        let mut rng = crate::cpu::tests::rng();
        let p = PARTITION;
        // (heads, kv heads, head_dim, block size): SmolLM2's shape, then odd ones.
        for (heads, kv_heads, hd, bs) in [(9, 3, 64, 16), (4, 1, 17, 5), (6, 2, 40, 7)] {
            let lens = vec![1, p - 1, p, p + 1, 2 * p + 3, 4 * p + 37];
            let blocks = lens.iter().map(|n: &usize| n.div_ceil(bs)).sum::<usize>() + 3;
            let layout = KvLayout {
                num_blocks: blocks,
                block_size: bs,
                kv_heads,
                head_dim: hd,
            };
            let case = Case::new(&mut rng, heads, layout, lens.clone());
            // Decodes at every length, prefill chunks across partition boundaries, a whole
            // prompt: in one batch.
            let spans = [
                (0, 0, 1),
                (1, p - 2, p - 1),
                (2, p - 1, p),
                (3, p, p + 1),
                (4, p - 6, 2 * p + 3),
                (5, 3 * p + 30, 4 * p + 37),
                (5, 0, 37),
            ];
            let width = heads * hd;
            let tokens: usize = spans.iter().map(|s| s.2 - s.1).sum();
            let q: Vec<f32> = (0..tokens * width)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let backends = Isa::available().into_iter().flat_map(|isa| {
                let b = |f16_kv| {
                    let b = CpuBackend::with_isa(2, isa, Activations::F32).unwrap();
                    (isa, f16_kv, b.with_f16_kv(f16_kv))
                };
                [b(false), b(true)]
            });
            for (isa, f16_kv, b) in backends {
                let cache = case.cache(&b);
                let got = case.run(&b, &cache, &spans, &q);
                let mut row = 0;
                for &(seq, from, to) in &spans {
                    for pos in from..to {
                        let at = row * width;
                        for h in 0..heads {
                            let qh = &q[at + h * hd..][..hd];
                            let want = case.reference(seq, pos, h, qh);
                            let g = &got[at + h * hd..][..hd];
                            for (g, w) in g.iter().zip(&want) {
                                assert!(
                                    (*g as f64 - w).abs() <= 1e-5,
                                    "{isa:?} f16 {f16_kv} shape {heads}/{kv_heads}/{hd}/{bs} seq {seq} pos {pos} head {h}: {g} vs {w}"
                                );
                            }
                        }
                        // Alone, as a decode of its own.
                        let alone =
                            case.run(&b, &cache, &[(seq, pos, pos + 1)], &q[at..at + width]);
                        let same = alone.iter().zip(&got[at..at + width]);
                        assert!(
                            same.clone().all(|(a, g)| a.to_bits() == g.to_bits()),
                            "{isa:?} f16 {f16_kv} seq {seq} pos {pos}: alone differs from batched"
                        );
                        row += 1;
                    }
                }
            }
        }
    }
}
