//! Decode matmul benchmark on the device: `cargo test --release -p marlin-kernels --features cuda
//! --test cuda_bench -- --ignored --nocapture`. The int4 (g128, symmetric) tensor-core GEMV at
//! 1..16 rows on Llama-3-8B/70B shapes, against the dense bf16 GEMV, cuBLAS bf16 and a
//! device-to-device copy measured in the same run (the 100% line). Weight copies are rotated so
//! that every call streams from HBM, not the 50 MB L2. Times are the median of 7 runs of 20
//! calls each, with device events.
#![cfg(feature = "cuda")]

use marlin_kernels::cuda::cudarc::driver::sys::CUevent_flags;
use marlin_kernels::cuda::{self, CudaBackend, Weight};
use marlin_kernels::{Backend, DenseFormat, HostWeight, MatmulRows};
use marlin_quant::{QuantFormat, QuantTensor};
use rand::{Rng, SeedableRng};

const SHAPES: [(usize, usize); 4] = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192)];
const ROWS: [usize; 6] = [1, 2, 4, 8, 12, 16];
/// Bytes of weight copies per shape: four times the L2.
const ROTATE_BYTES: usize = 200 << 20;

fn time_us(g: &CudaBackend, mut f: impl FnMut(usize)) -> f64 {
    let ctx = g.context();
    let (a, b) = (
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap(),
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap(),
    );
    for i in 0..5 {
        f(i);
    }
    let mut runs = vec![];
    for _ in 0..7 {
        a.record(g.stream()).unwrap();
        for i in 0..20 {
            f(i);
        }
        b.record(g.stream()).unwrap();
        b.synchronize().unwrap();
        runs.push(a.elapsed_ms(&b).unwrap() as f64 * 1000.0 / 20.0);
    }
    runs.sort_by(|x, y| x.partial_cmp(y).unwrap());
    runs[3]
}

fn copies(g: &CudaBackend, w: Weight) -> Vec<Weight> {
    let n = ROTATE_BYTES.div_ceil(w.device_bytes()).max(2);
    let mut v = vec![];
    for _ in 1..n {
        v.push(g.duplicate_weight(&w).unwrap());
    }
    v.push(w);
    v
}

#[test]
#[ignore = "benchmark: run explicitly on a GPU machine"]
fn bench_decode_matmul() {
    if let Some(why) = cuda::unavailable() {
        eprintln!("skipped: no CUDA device ({why})");
        return;
    }
    let g = CudaBackend::new(0).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // The copy line: 1 GiB read + 1 GiB written, plain 16-byte grid-stride kernel.
    let bytes = 1usize << 30;
    let stream = g.stream();
    let src = stream.alloc_zeros::<u8>(bytes).unwrap();
    let mut dst = stream.alloc_zeros::<u8>(bytes).unwrap();
    let copy_us = time_us(&g, |_| g.copy_kernel(&src, &mut dst, bytes).unwrap());
    let copy_gbs = 2.0 * bytes as f64 / copy_us / 1e3;
    println!(
        "device {}: copy 1 GiB {copy_us:.0} us = {copy_gbs:.0} GB/s (read + write)",
        g.name()
    );
    drop((src, dst));
    println!("| shape (n x k) | rows | int4 us | int4 GB/s | % of copy | bf16 GEMV us | cuBLAS bf16 us | int4 speedup vs cuBLAS |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (n, k) in SHAPES {
        let group = 128;
        let rb = k / 2;
        let t = QuantTensor {
            format: QuantFormat::Int {
                bits: 4,
                asym: false,
            },
            rows: n,
            cols: k,
            group,
            codes: (0..n * rb).map(|_| rng.random()).collect(),
            scales: (0..n * k / group)
                .flat_map(|_| half::f16::from_f32(rng.random_range(0.001..0.02f32)).to_le_bytes())
                .collect(),
            offsets: None,
            tensor_scale: None,
            perm: None,
        };
        let q = copies(&g, g.upload_quant(&t).unwrap());
        let qbytes = q[0].device_bytes();
        drop(t);
        let wd: Vec<f32> = (0..n * k)
            .map(|_| rng.random_range(-0.05..0.05f32))
            .collect();
        let d = copies(
            &g,
            g.upload_weight(&HostWeight::from_f32(DenseFormat::BF16, n, k, &wd).unwrap())
                .unwrap(),
        );
        drop(wd);
        let x = g
            .upload_bf16(
                &(0..16 * k)
                    .map(|_| rng.random_range(-1.0..1.0f32))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let mut out = g.alloc(16 * n).unwrap();
        for rows in ROWS {
            let qi = time_us(&g, |i| {
                g.matmul(&x, &q[i % q.len()], MatmulRows::plain(rows), &mut out)
                    .unwrap()
            });
            let gemv = time_us(&g, |i| {
                g.matmul(&x, &d[i % d.len()], MatmulRows::plain(rows), &mut out)
                    .unwrap()
            });
            let blas = time_us(&g, |i| {
                g.matmul_cublas(&x, &d[i % d.len()], rows, &mut out)
                    .unwrap()
            });
            let gbs = (qbytes + 2 * rows * (k + n)) as f64 / qi / 1e3;
            println!(
                "| {n} x {k} | {rows} | {qi:.1} | {gbs:.0} | {:.0}% | {gemv:.1} | {blas:.1} | {:.2}x |",
                100.0 * gbs / copy_gbs,
                blas / qi
            );
        }
    }
}
