//! Attention over the paged cache on SmolLM2-135M's shape (9 query heads, 3 kv heads,
//! head_dim 64, blocks of 16): a 512-token prefill, single-token decodes, and a serving step's
//! batched decode (32 sequences of ~100 keys, every one of 30 layers' caches in turn).
//! `cargo bench -p marlin-kernels --bench attention`.

use marlin_kernels::cpu::CpuBackend;
use marlin_kernels::{Backend, KvLayout, SeqSpan, StepBatch};
use std::time::Instant;

fn main() {
    let b = CpuBackend::new(0).unwrap();
    let (heads, kv_heads, hd, bs) = (9, 3, 64, 16);
    let layout = KvLayout {
        num_blocks: 160,
        block_size: bs,
        kv_heads,
        head_dim: hd,
    };
    let mut cache = b.alloc_kv(layout).unwrap();
    // Blocks in reverse so logical order is not physical order.
    let table: Vec<u32> = (0..layout.num_blocks as u32).rev().collect();
    let batch =
        |from: usize, to: usize| StepBatch::one_sequence(vec![0; to - from], from, &table, bs, 0);
    let fill = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    };
    let width = kv_heads * hd;
    let max = layout.slots();
    let (mut k, mut v) = (b.alloc(max * width).unwrap(), b.alloc(max * width).unwrap());
    b.write(&mut k, &fill(max * width)).unwrap();
    b.write(&mut v, &fill(max * width)).unwrap();
    let all = b.prepare_step(&batch(0, max)).unwrap();
    b.write_kv(&mut cache, &k, &v, &all).unwrap();

    let mut q = b.alloc(512 * heads * hd).unwrap();
    b.write(&mut q, &fill(512 * heads * hd)).unwrap();
    let mut out = b.alloc(512 * heads * hd).unwrap();
    for (from, to) in [(0, 512), (511, 512), (2047, 2048)] {
        let step = b.prepare_step(&batch(from, to)).unwrap();
        let keys: usize = (from..to).map(|p| p + 1).sum();
        let flops = 4.0 * (keys * heads * hd) as f64;
        let iters = ((2e8 / flops) as usize).clamp(3, 1000);
        let mut times = vec![];
        for _ in 0..7 {
            let t = Instant::now();
            for _ in 0..iters {
                b.attention(&q, &cache, &step, heads, 0.125, &mut out)
                    .unwrap();
            }
            times.push(t.elapsed().as_secs_f64() / iters as f64);
        }
        times.sort_by(f64::total_cmp);
        let secs = times[3];
        println!(
            "attention {} tokens at positions {from}..{to}: {:.1}us, {:.1} GFLOP/s",
            to - from,
            secs * 1e6,
            flops / secs / 1e9
        );
    }

    batched_decode(
        &CpuBackend::new(0).unwrap().with_f16_kv(true),
        heads,
        layout,
    );
}

/// One decode step of 32 sequences of 84-115 keys through 30 layers, each layer its own cache
/// with the sequences' blocks scattered over it, as in `marlin serve` at 32 streams: the keys
/// and values (f16, the server's default) come from memory, not cache.
fn batched_decode(b: &CpuBackend, heads: usize, layout: KvLayout) {
    let (seqs, layers, bs, hd) = (
        32,
        std::env::var("LAYERS").map_or(30, |v| v.parse().unwrap()),
        layout.block_size,
        layout.head_dim,
    );
    let layout = KvLayout {
        num_blocks: 2048,
        ..layout
    };
    let lens: Vec<usize> = (0..seqs).map(|s| 84 + s).collect();
    // Block i of sequence s: spread over the cache by a stride coprime to its size.
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|s| {
            (0..lens[s].div_ceil(bs))
                .map(|i| ((s * 8 + i) * 617 % layout.num_blocks) as u32)
                .collect()
        })
        .collect();
    let mut step = StepBatch::default();
    for s in 0..seqs {
        let p = lens[s] - 1;
        step.seqs.push(SeqSpan {
            start: s,
            len: 1,
            context_len: lens[s],
            prompt_len: 0,
            block_table: tables[s].clone(),
        });
        step.tokens.push(0);
        step.positions.push(p as u32);
        step.slots
            .push(tables[s][p / bs] * bs as u32 + (p % bs) as u32);
    }
    let width = layout.kv_heads * hd;
    let slots = layout.slots();
    let mut kv = b.alloc(slots * width).unwrap();
    b.write(&mut kv, &vec![0.01; slots * width]).unwrap();
    let all = StepBatch {
        tokens: vec![0; slots],
        positions: (0..slots as u32).collect(),
        slots: (0..slots as u32).collect(),
        seqs: vec![SeqSpan {
            start: 0,
            len: slots,
            context_len: slots,
            prompt_len: 0,
            block_table: (0..layout.num_blocks as u32).collect(),
        }],
        logit_rows: vec![],
        tokens_from_argmax: false,
    };
    let all = b.prepare_step(&all).unwrap();
    let caches: Vec<_> = (0..layers)
        .map(|_| {
            let mut c = b.alloc_kv(layout).unwrap();
            b.write_kv(&mut c, &kv, &kv, &all).unwrap();
            c
        })
        .collect();
    let step = b.prepare_step(&step).unwrap();
    let mut q = b.alloc(seqs * heads * hd).unwrap();
    b.write(&mut q, &vec![0.02; seqs * heads * hd]).unwrap();
    let mut out = b.alloc(seqs * heads * hd).unwrap();
    let mut times = vec![];
    for _ in 0..9 {
        let t = Instant::now();
        for cache in &caches {
            b.attention(&q, cache, &step, heads, 0.125, &mut out)
                .unwrap();
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let bytes = (lens.iter().sum::<usize>() * width * 2 * layers) as f64 * 2.0;
    println!(
        "batched decode, {seqs} sequences x {layers} layers: {:.0}us per step, {:.1} GB/s of f16 keys and values",
        times[4] * 1e6,
        bytes / times[4] / 1e9
    );
}
