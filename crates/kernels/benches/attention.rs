//! Attention over the paged cache on SmolLM2-135M's shape (9 query heads, 3 kv heads,
//! head_dim 64, blocks of 16): a 512-token prefill and single-token decodes.
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
    let batch = |from: usize, to: usize| StepBatch {
        tokens: vec![0; to - from],
        positions: (from as u32..to as u32).collect(),
        slots: (from..to)
            .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
            .collect(),
        seqs: vec![SeqSpan {
            start: 0,
            len: to - from,
            context_len: to,
            block_table: table.clone(),
        }],
        logit_rows: vec![],
    };
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
}
