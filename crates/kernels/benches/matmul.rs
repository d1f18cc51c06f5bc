//! Matmul throughput on SmolLM2-135M shapes: GFLOP/s and weight GB/s per shape, format and row
//! count, then a whole-model f16 decode pass (30 layers + lm_head, ~270 MB of weights per token).
//!
//! Weights for the decode rows are replicated past 64 MB and cycled through, so they stream from
//! memory as in a real forward pass rather than from L2. `cargo bench -p marlin-kernels`.

use marlin_kernels::cpu::{amx_available, CpuBackend};
use marlin_kernels::{Backend, DenseFormat, HostWeight, MatmulRows, QuantFormat};
use marlin_quant::quantize_rtn;
use std::time::{Duration, Instant};

const SHAPES: [(usize, usize, &str); 5] = [
    (576, 576, "q/o"),
    (576, 192, "k/v"),
    (576, 1536, "gate/up"),
    (1536, 576, "down"),
    (576, 49152, "lm_head"),
];

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

/// CPU time of all this process's threads, from Linux's schedstat (0 where unavailable).
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Median seconds per call of `f` over `runs` timed runs of `iters` calls, after a warm-up, and
/// the share of `threads` cores the process got meanwhile: the machine is shared, and a number
/// taken while another process held a core (busy well under 100%) understates the kernel.
fn median(runs: usize, iters: usize, threads: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..iters.max(2) {
        f();
    }
    let (wall, cpu) = (Instant::now(), cpu_ns());
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed() / iters as u32
        })
        .collect();
    let busy = (cpu_ns() - cpu) as f64 / 1e9 / wall.elapsed().as_secs_f64() / threads as f64;
    times.sort();
    (times[runs / 2].as_secs_f64(), busy)
}

fn main() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    // BENCH_THREADS (0: all cores) and BENCH_COPIES (1: weights hot in cache) for experiments.
    let b = CpuBackend::new(env("BENCH_THREADS", 0)).unwrap();
    let max_copies = env("BENCH_COPIES", 64);
    // BENCH_ROWS: only this row count (the model decode pass runs when it is 1 or unset).
    let only_rows = env("BENCH_ROWS", 0);
    let threads = b.threads();
    println!("backend: {}", b.name());
    println!(
        "{:<8} {:>5} {:>6} {:>5} {:>5} {:>10} {:>9} {:>8} {:>5}",
        "shape", "K", "N", "fmt", "rows", "time", "GFLOP/s", "W GB/s", "busy"
    );
    for &(k, n, name) in &SHAPES {
        for format in DenseFormat::ALL {
            let wbytes = k * n * format.bytes_per_element();
            let copies = (64usize << 20).div_ceil(wbytes).min(max_copies);
            let weights: Vec<_> = (0..copies)
                .map(|c| {
                    let host =
                        HostWeight::from_f32(format, n, k, &values(n * k, c as u64)).unwrap();
                    b.upload_weight(&host).unwrap()
                })
                .collect();
            for rows in [1, 4, 16, 512] {
                if (only_rows != 0 && rows != only_rows)
                    || (rows == 512 && n == 49152 && format != DenseFormat::F16)
                {
                    continue;
                }
                let mut x = b.alloc(rows * k).unwrap();
                b.write(&mut x, &values(rows * k, 99)).unwrap();
                let mut out = b.alloc(rows * n).unwrap();
                let mut i = 0;
                let flops = 2.0 * (rows * k * n) as f64;
                let iters = ((2e8 / flops) as usize).clamp(1, 200);
                let (secs, busy) = median(7, iters, threads, || {
                    // Prefill reuses one copy: it is compute bound and the copy cycling would
                    // only add cold-start noise.
                    let w = if rows > 16 {
                        &weights[0]
                    } else {
                        &weights[i % copies]
                    };
                    i += 1;
                    b.matmul(&x, w, MatmulRows::plain(rows), &mut out).unwrap();
                });
                println!(
                    "{:<8} {:>5} {:>6} {:>5} {:>5} {:>8.1}us {:>9.1} {:>8.1} {:>4.0}%",
                    name,
                    k,
                    n,
                    format.to_string(),
                    rows,
                    secs * 1e6,
                    flops / secs / 1e9,
                    wbytes as f64 / secs / 1e9,
                    busy * 100.0
                );
            }
        }
    }

    // Packed formats (default groups) on the same shapes: decode (1 row, weights cycled past
    // 64 MB) and prefill (512 rows). BENCH_FORMATS=int4,int8-asym,... picks some.
    // Batched rows run as generated rows (integer activations, on AMX where the CPU has it),
    // then as prompt rows ("prompt": bf16 tiles where the CPU has AMX-BF16); with AMX, a second
    // backend runs them on VNNI alone.
    let vnni = amx_available().then(|| {
        CpuBackend::new(env("BENCH_THREADS", 0))
            .unwrap()
            .with_amx(false)
    });
    let formats: Vec<QuantFormat> = match std::env::var("BENCH_FORMATS") {
        Ok(list) => list.split(',').filter_map(QuantFormat::parse).collect(),
        Err(_) => QuantFormat::ALL.to_vec(),
    };
    for &(k, n, name) in &SHAPES {
        for &format in &formats {
            let group = format.resolve_group(format.default_group(), k).unwrap();
            let first =
                HostWeight::quant(quantize_rtn(&values(n * k, 1), n, k, format, group).unwrap())
                    .unwrap();
            let wbytes = first.storage_bytes();
            let copies = (64usize << 20).div_ceil(wbytes).min(max_copies);
            // Copies share codes (re-uploading one tensor): quantizing 64 MB each time is slow.
            let weights: Vec<_> = (0..copies)
                .map(|_| b.upload_weight(&first).unwrap())
                .collect();
            let on_vnni = vnni.as_ref().map(|v| {
                (0..copies)
                    .map(|_| v.upload_weight(&first).unwrap())
                    .collect::<Vec<_>>()
            });
            let units = [
                (1, ""),
                (32, ""),
                (32, "prompt"),
                (32, "vnni"),
                (512, ""),
                (512, "prompt"),
                (512, "vnni"),
            ];
            for (rows, unit) in units {
                if (only_rows != 0 && rows != only_rows) || (rows == 512 && n == 49152) {
                    continue;
                }
                // Batched rows again on VNNI, where AMX took them above: the same-run baseline.
                let (b, weights) = match (unit, &vnni, &on_vnni) {
                    ("" | "prompt", ..) => (&b, &weights[..]),
                    (_, Some(v), Some(w)) => (v, &w[..]),
                    _ => continue,
                };
                let mut x = b.alloc(rows * k).unwrap();
                b.write(&mut x, &values(rows * k, 99)).unwrap();
                let mut out = b.alloc(rows * n).unwrap();
                let all_rows = 0..rows;
                let prompt = if unit == "prompt" {
                    std::slice::from_ref(&all_rows)
                } else {
                    &[]
                };
                let mut i = 0;
                let flops = 2.0 * (rows * k * n) as f64;
                let iters = ((2e8 / flops) as usize).clamp(1, 200);
                // A serving step's 32 rows stream the weights like decode: cycle the copies.
                let (secs, busy) = median(7, iters, threads, || {
                    let w = if rows > 32 {
                        &weights[0]
                    } else {
                        &weights[i % copies]
                    };
                    i += 1;
                    b.matmul(
                        &x,
                        w,
                        MatmulRows {
                            count: rows,
                            prompt,
                        },
                        &mut out,
                    )
                    .unwrap();
                });
                println!(
                    "{:<8} {:>5} {:>6} {:>15} {:>5} {:>8.1}us {:>9.1} {:>8.1} {:>4.0}%",
                    name,
                    k,
                    n,
                    format!(
                        "{format}/{group}{}",
                        if unit.is_empty() {
                            String::new()
                        } else {
                            format!(" {unit}")
                        }
                    ),
                    rows,
                    secs * 1e6,
                    flops / secs / 1e9,
                    wbytes as f64 / secs / 1e9,
                    busy * 100.0
                );
            }
        }
    }

    // What a call costs beyond its arithmetic: pool wake-up and task split.
    let tiny = b
        .upload_weight(&HostWeight::from_f32(DenseFormat::F16, 8, 16, &values(128, 3)).unwrap())
        .unwrap();
    let (x16, mut o8) = (b.alloc(16).unwrap(), b.alloc(8).unwrap());
    let (secs, busy) = median(9, 1000, threads, || {
        b.matmul(&x16, &tiny, MatmulRows::plain(1), &mut o8)
            .unwrap()
    });
    println!(
        "call overhead (8x16 matmul): {:.1}us, busy {:.0}%",
        secs * 1e6,
        busy * 100.0
    );
    if only_rows > 1 {
        return;
    }

    // One decode token through every matmul of SmolLM2-135M, each layer its own weights: f16,
    // then each packed format (lm_head int8 g32, as `--quantize` does).
    let layer = [
        (576, 576),
        (576, 192),
        (576, 192),
        (576, 576),
        (576, 1536),
        (576, 1536),
        (1536, 576),
    ];
    let mut x = b.alloc(1536).unwrap();
    b.write(&mut x, &values(1536, 5)).unwrap();
    let mut out = b.alloc(49152).unwrap();
    let model_formats: Vec<Option<QuantFormat>> = match std::env::var("BENCH_MODEL_FORMATS") {
        Ok(list) => list.split(',').map(QuantFormat::parse).collect(),
        Err(_) => vec![
            None,
            Some(QuantFormat::Int {
                bits: 8,
                asym: false,
            }),
            Some(QuantFormat::Int {
                bits: 4,
                asym: false,
            }),
        ],
    };
    let host = |format: Option<QuantFormat>, n: usize, k: usize, seed: u64| match format {
        None => HostWeight::from_f32(DenseFormat::F16, n, k, &values(n * k, seed)).unwrap(),
        Some(f) => {
            let g = f.resolve_group(f.default_group(), k).unwrap();
            HostWeight::quant(quantize_rtn(&values(n * k, seed), n, k, f, g).unwrap()).unwrap()
        }
    };
    for format in model_formats {
        let mut all = vec![];
        let mut bytes = 0;
        for l in 0..30 {
            for (i, &(k, n)) in layer.iter().enumerate() {
                let h = host(format, n, k, (l * 7 + i) as u64);
                bytes += h.storage_bytes();
                all.push(b.upload_weight(&h).unwrap());
            }
        }
        let head = host(
            format.map(|_| QuantFormat::Int {
                bits: 8,
                asym: false,
            }),
            49152,
            576,
            7,
        );
        bytes += head.storage_bytes();
        all.push(b.upload_weight(&head).unwrap());
        let mut token = || {
            for w in &all {
                b.matmul(&x, w, MatmulRows::plain(1), &mut out).unwrap();
            }
        };
        let (secs, busy) = b.install(|| median(9, 3, threads, &mut token));
        println!(
            "model decode {} inside install: {:.2} ms/token ({:.1} tokens/s), {:.1} GB/s over {:.0} MB, busy {:.0}%",
            format.map_or("f16".to_string(), |f| f.to_string()),
            secs * 1e3,
            1.0 / secs,
            bytes as f64 / secs / 1e9,
            bytes as f64 / 1e6,
            busy * 100.0
        );
    }
}
