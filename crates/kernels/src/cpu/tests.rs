//! Every op against a naive f64 reference on fresh random inputs of odd shapes. Outputs are
//! poisoned with NaN first, so an element an op forgets to write fails the comparison.
//!
//! Error bounds. matmul: |out - ref| <= 1e-5 * sum_k |x_k w_k| per element; with sixteen lane
//! sums of at most K/16 terms and a four-level tree, f32 accumulation is off by at most
//! (K/16 + 4) * 2^-24 times that sum, 4e-6 for K = 1000. Other ops: max |err| / max |ref| <= 1e-5
//! (attention: <= 1e-5 of max |v|, its outputs being convex combinations of v rows).

use super::simd::Isa;
use super::*;
use crate::SeqSpan;
use marlin_quant::{QuantFormat, PER_CHANNEL};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Fresh random inputs each run; the seed is printed (shown when a test fails) and
/// `MARLIN_TEST_SEED` replays it.
pub(crate) fn rng() -> StdRng {
    let seed = std::env::var("MARLIN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (MARLIN_TEST_SEED replays it)");
    StdRng::seed_from_u64(seed)
}

fn values(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn backend(isa: Isa) -> CpuBackend {
    CpuBackend::with_isa(2, isa, Activations::F32).unwrap()
}

fn buffer(b: &CpuBackend, v: &[f32]) -> Buffer {
    let mut buf = b.alloc(v.len()).unwrap();
    b.write(&mut buf, v).unwrap();
    buf
}

fn poisoned(b: &CpuBackend, len: usize) -> Buffer {
    buffer(b, &vec![f32::NAN; len])
}

/// max |got - want| / max |want|, failing on any NaN.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    let err = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max);
    err / want
        .iter()
        .map(|w| w.abs())
        .fold(f64::MIN_POSITIVE, f64::max)
}

/// A weight in `format` and the f32 values it actually holds after rounding.
fn weight(rng: &mut StdRng, format: DenseFormat, n: usize, k: usize) -> (HostWeight, Vec<f32>) {
    let host = HostWeight::from_f32(format, n, k, &values(rng, n * k)).unwrap();
    let rounded = host.to_f32();
    (host, rounded)
}

fn run_matmul(b: &CpuBackend, x: &[f32], w: &Weight, rows: usize) -> Vec<f32> {
    let n = b.weight_shape(w).0;
    let mut out = poisoned(b, rows * n);
    b.matmul(
        &buffer(b, &x[..rows * b.weight_shape(w).1]),
        w,
        MatmulRows::plain(rows),
        &mut out,
    )
    .unwrap();
    b.read(&out, rows * n).unwrap()
}

#[test]
fn matmul_matches_reference() {
    let mut rng = rng();
    let b = CpuBackend::new(0).unwrap();
    for format in DenseFormat::ALL {
        for k in [37, 577, 1000] {
            for n in [5, 129] {
                let (host, w) = weight(&mut rng, format, n, k);
                let uploaded = b.upload_weight(&host).unwrap();
                assert_eq!(b.weight_shape(&uploaded), (n, k));
                for rows in [1, 3, 16, 33, 300] {
                    let x = values(&mut rng, rows * k);
                    let got = run_matmul(&b, &x, &uploaded, rows);
                    for r in 0..rows {
                        for j in 0..n {
                            let terms = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64);
                            let want: f64 = terms.clone().sum();
                            let bound: f64 = 1e-5 * terms.map(f64::abs).sum::<f64>();
                            let g = got[r * n + j] as f64;
                            assert!(
                                (g - want).abs() <= bound,
                                "{format} k={k} n={n} rows={rows} [{r},{j}]: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// On aarch64 the kernels run on NEON (and the bitwise tests below compare it with the scalar
/// lanes), never silently on the portable path.
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_is_detected_on_aarch64() {
    assert_eq!(Isa::detect(), Isa::Neon);
    assert!(Isa::available().contains(&Isa::Neon));
}

/// Row r of any matmul is bitwise the same whatever the row count (decode or prefill regime)
/// and whatever the instruction set.
#[test]
fn matmul_is_deterministic_across_rows_and_isas() {
    let mut rng = rng();
    let (k, n) = (577, 129);
    let x = values(&mut rng, 300 * k);
    for format in DenseFormat::ALL {
        let (host, _) = weight(&mut rng, format, n, k);
        let mut first: Option<Vec<f32>> = None;
        for isa in Isa::available() {
            let b = backend(isa);
            let w = b.upload_weight(&host).unwrap();
            let all = run_matmul(&b, &x, &w, 300);
            for rows in [1, 7, 16, 17] {
                let part = run_matmul(&b, &x, &w, rows);
                assert!(
                    part.iter()
                        .zip(&all)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{format} {isa:?}: {rows} rows differ from 300"
                );
            }
            // A late row alone, through the decode path.
            let r = 211;
            let alone = run_matmul(&b, &x[r * k..], &w, 1);
            assert!(
                alone
                    .iter()
                    .zip(&all[r * n..])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{format} {isa:?}: row {r} alone differs"
            );
            match &first {
                None => first = Some(all),
                Some(f) => assert!(
                    f.iter().zip(&all).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{format}: {isa:?} differs from scalar"
                ),
            }
        }
    }
}

#[test]
fn embedding_widens_rows() {
    let mut rng = rng();
    let b = CpuBackend::new(0).unwrap();
    for format in DenseFormat::ALL {
        let (vocab, dim) = (51, 37);
        let (host, table) = weight(&mut rng, format, vocab, dim);
        let w = b.upload_weight(&host).unwrap();
        let tokens: Vec<u32> = (0..9).map(|_| rng.random_range(0..vocab as u32)).collect();
        let step = b.prepare_step(&decode_batch(&tokens)).unwrap();
        let mut out = poisoned(&b, tokens.len() * dim);
        b.embedding(&w, &step, &mut out).unwrap();
        let want: Vec<f64> = tokens
            .iter()
            .flat_map(|&t| table[t as usize * dim..][..dim].iter().map(|&v| v as f64))
            .collect();
        assert_eq!(
            rel_err(&b.read(&out, want.len()).unwrap(), &want),
            0.0,
            "{format}"
        );
        let bad = b.prepare_step(&decode_batch(&[vocab as u32])).unwrap();
        assert!(
            matches!(b.embedding(&w, &bad, &mut out), Err(KernelError::Shape(m)) if m.starts_with("embedding"))
        );
    }
}

/// One single-token sequence per token: enough for the ops that only read tokens or positions.
fn decode_batch(tokens: &[u32]) -> StepBatch {
    StepBatch {
        tokens: tokens.to_vec(),
        positions: (0..tokens.len() as u32).map(|p| p * 7 % 23).collect(),
        slots: vec![0; tokens.len()],
        seqs: vec![],
        logit_rows: vec![],
        tokens_from_argmax: false,
    }
}

#[test]
fn rms_norm_matches_reference() {
    let mut rng = rng();
    let b = CpuBackend::new(0).unwrap();
    // 64 rows of 577 exceed PAR_MIN_ELEMS, so the pooled path runs too.
    for (rows, dim) in [(3, 577), (1, 5), (64, 577)] {
        let (x, w) = (values(&mut rng, rows * dim), values(&mut rng, dim));
        let eps = 1e-5;
        let mut out = poisoned(&b, rows * dim);
        b.rms_norm(&buffer(&b, &x), &buffer(&b, &w), eps, rows, dim, &mut out)
            .unwrap();
        let mut want = vec![0.0f64; rows * dim];
        for r in 0..rows {
            let xr = &x[r * dim..(r + 1) * dim];
            let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for i in 0..dim {
                want[r * dim + i] = xr[i] as f64 * inv * w[i] as f64;
            }
        }
        assert!(rel_err(&b.read(&out, rows * dim).unwrap(), &want) <= 1e-5);
        let err = b.rms_norm(
            &buffer(&b, &x),
            &buffer(&b, &w[..dim - 1]),
            eps,
            rows,
            dim,
            &mut out,
        );
        assert!(matches!(err, Err(KernelError::Shape(m)) if m.starts_with("rms_norm")));
    }
}

#[test]
fn rope_rotates_pairs_half_apart() {
    let mut rng = rng();
    let b = CpuBackend::new(0).unwrap();
    let (heads, hd, positions) = (3, 10, 40);
    let tokens: Vec<u32> = vec![0; 5];
    let batch = decode_batch(&tokens);
    let step = b.prepare_step(&batch).unwrap();
    let table = values(&mut rng, positions * hd);
    let x = values(&mut rng, tokens.len() * heads * hd);
    let mut buf = buffer(&b, &x);
    b.rope(&mut buf, &step, heads, hd, &buffer(&b, &table))
        .unwrap();
    let mut want = vec![0.0f64; x.len()];
    for (t, &p) in batch.positions.iter().enumerate() {
        let (cos, sin) = table[p as usize * hd..][..hd].split_at(hd / 2);
        for h in 0..heads {
            let base = (t * heads + h) * hd;
            for i in 0..hd / 2 {
                let (a, c) = (x[base + i] as f64, x[base + i + hd / 2] as f64);
                want[base + i] = a * cos[i] as f64 - c * sin[i] as f64;
                want[base + i + hd / 2] = c * cos[i] as f64 + a * sin[i] as f64;
            }
        }
    }
    assert!(rel_err(&b.read(&buf, x.len()).unwrap(), &want) <= 1e-6);
    let short = buffer(&b, &table[..(positions - 20) * hd]);
    let err = b.rope(&mut buf, &step, heads, hd, &short);
    assert!(matches!(err, Err(KernelError::Shape(m)) if m.starts_with("rope")));
    let err = b.rope(&mut buf, &step, heads, 9, &buffer(&b, &table));
    assert!(matches!(err, Err(KernelError::Shape(m)) if m.starts_with("rope")));
}

#[test]
fn elementwise_ops_match_reference() {
    let mut rng = rng();
    // The long length runs on the pool in several chunks.
    for (len, isa) in [1, 1000, 100_003]
        .into_iter()
        .flat_map(|len| Isa::available().into_iter().map(move |isa| (len, isa)))
    {
        let b = backend(isa);
        // Gates out to +-100 reach exp's clamps.
        let g: Vec<f32> = values(&mut rng, len).iter().map(|v| v * 100.0).collect();
        let u = values(&mut rng, len);
        let mut out = poisoned(&b, len + 1);
        b.silu_mul(&buffer(&b, &g), &buffer(&b, &u), len, &mut out)
            .unwrap();
        let got = b.read(&out, len + 1).unwrap();
        assert!(got[len].is_nan(), "silu_mul wrote past len");
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64)
            .collect();
        // Relative to |g·u| rather than to the output: for a single strongly negative gate the
        // output is ~e^-100 and any exp approximation's relative error would be unbounded.
        let scale = g
            .iter()
            .zip(&u)
            .fold(0f64, |m, (g, u)| m.max((g * u).abs() as f64));
        let err = got[..len]
            .iter()
            .zip(&want)
            .fold(0f64, |m, (&o, w)| m.max((o as f64 - w).abs()));
        assert!(
            got[..len].iter().all(|v| v.is_finite()),
            "non-finite output"
        );
        assert!(
            err <= 1e-5 * scale,
            "silu_mul error {err} for scale {scale}"
        );

        let mut x = buffer(&b, &g);
        b.add(&mut x, &buffer(&b, &u), len).unwrap();
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&a, &c)| a as f64 + c as f64)
            .collect();
        assert!(rel_err(&b.read(&x, len).unwrap(), &want) <= 1e-6);
        let err = b.add(&mut x, &buffer(&b, &u[..len - 1]), len);
        assert!(matches!(err, Err(KernelError::Shape(m)) if m.starts_with("add")));
    }
}

#[test]
fn softmax_is_stable() {
    let mut rng = rng();
    let b = CpuBackend::new(0).unwrap();
    for (rows, dim) in [(3, 129), (40, 1001)] {
        // Large offsets: a softmax that skips the max subtraction overflows.
        let x: Vec<f32> = values(&mut rng, rows * dim)
            .iter()
            .map(|v| v * 30.0 + 100.0)
            .collect();
        let mut buf = buffer(&b, &x);
        b.softmax(&mut buf, rows, dim).unwrap();
        let mut want = vec![0.0; rows * dim];
        for r in 0..rows {
            let row = &x[r * dim..(r + 1) * dim];
            let max = row.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            for i in 0..dim {
                want[r * dim + i] = (row[i] as f64 - max).exp() / sum;
            }
        }
        assert!(rel_err(&b.read(&buf, rows * dim).unwrap(), &want) <= 1e-5);
    }
}

#[test]
fn gather_logit_rows_picks_in_order() {
    let mut rng = rng();
    let b = CpuBackend::new(0).unwrap();
    let dim = 7;
    let mut batch = decode_batch(&[0; 6]);
    batch.logit_rows = vec![5, 0, 3];
    let x = values(&mut rng, 6 * dim);
    let mut out = poisoned(&b, 3 * dim);
    let step = b.prepare_step(&batch).unwrap();
    b.gather_logit_rows(&buffer(&b, &x), &step, dim, &mut out)
        .unwrap();
    let want: Vec<f64> = [5, 0, 3]
        .iter()
        .flat_map(|&r| x[r * dim..(r + 1) * dim].iter().map(|&v| v as f64))
        .collect();
    assert_eq!(rel_err(&b.read(&out, 3 * dim).unwrap(), &want), 0.0);
    batch.logit_rows = vec![6];
    let step = b.prepare_step(&batch).unwrap();
    let err = b.gather_logit_rows(&buffer(&b, &x), &step, dim, &mut out);
    assert!(matches!(err, Err(KernelError::Shape(m)) if m.starts_with("gather_logit_rows")));
}

#[test]
fn matmul_rejects_short_buffers() {
    let b = CpuBackend::new(0).unwrap();
    let w = b
        .upload_weight(&HostWeight::from_f32(DenseFormat::F16, 4, 8, &[0.0; 32]).unwrap())
        .unwrap();
    let err = b.matmul(
        &b.alloc(15).unwrap(),
        &w,
        MatmulRows::plain(2),
        &mut b.alloc(8).unwrap(),
    );
    assert!(matches!(err, Err(KernelError::Shape(m)) if m.starts_with("matmul")));
    let err = b.matmul(
        &b.alloc(16).unwrap(),
        &w,
        MatmulRows::plain(2),
        &mut b.alloc(7).unwrap(),
    );
    assert!(matches!(err, Err(KernelError::Shape(m)) if m.starts_with("matmul")));
}

#[test]
fn elementwise_ops_name_the_short_buffer() {
    let b = CpuBackend::new(0).unwrap();
    let shape_error = |r: Result<()>| match r {
        Err(KernelError::Shape(m)) => m,
        other => panic!("expected a shape error, got {other:?}"),
    };
    let (x, short) = (b.alloc(12).unwrap(), b.alloc(3).unwrap());
    let m = shape_error(b.rms_norm(&x, &short, 1e-5, 3, 4, &mut b.alloc(12).unwrap()));
    assert_eq!(m, "rms_norm: weight holds 3 elements, needs 4");
    let m = shape_error(b.silu_mul(&x, &short, 12, &mut b.alloc(12).unwrap()));
    assert_eq!(m, "silu_mul: up holds 3 elements, needs 12");
    let m = shape_error(b.add(&mut b.alloc(12).unwrap(), &short, 12));
    assert_eq!(m, "add: y holds 3 elements, needs 12");
    // Two tokens at positions 0 and 7: the rope table needs 8 rows of 4.
    let step = b.prepare_step(&decode_batch(&[0, 0])).unwrap();
    let m = shape_error(b.rope(&mut b.alloc(8).unwrap(), &step, 1, 4, &short));
    assert_eq!(m, "rope: table holds 3 elements, needs 32");
    let m = shape_error(b.rope(&mut b.alloc(8).unwrap(), &step, 1, 3, &x));
    assert_eq!(m, "rope: odd head_dim 3");
}

/// Sequences given as (tokens already cached, new tokens), keys and values per position.
struct AttnCase {
    layout: KvLayout,
    seqs: Vec<(usize, usize)>,
    tables: Vec<Vec<u32>>,
    /// Per sequence: positions x kv_heads x head_dim.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl AttnCase {
    fn new(rng: &mut StdRng, layout: KvLayout, seqs: Vec<(usize, usize)>) -> Self {
        let mut blocks: Vec<u32> = (0..layout.num_blocks as u32).collect();
        // Shuffle so logical and physical block order disagree.
        for i in (1..blocks.len()).rev() {
            blocks.swap(i, rng.random_range(0..=i));
        }
        let mut free = blocks.into_iter();
        let sw = layout.slot_width();
        let mut case = AttnCase {
            layout,
            seqs: seqs.clone(),
            tables: vec![],
            k: vec![],
            v: vec![],
        };
        for &(cached, new) in &seqs {
            let ctx = cached + new;
            case.tables.push(
                free.by_ref()
                    .take(ctx.div_ceil(layout.block_size))
                    .collect(),
            );
            case.k.push(values(rng, ctx * sw));
            case.v.push(values(rng, ctx * sw));
        }
        case
    }

    /// The batch writing positions `from(seq)..to(seq)` of each sequence.
    fn batch(&self, range: impl Fn(usize, usize) -> (usize, usize)) -> StepBatch {
        let mut b = StepBatch::default();
        let bs = self.layout.block_size;
        for (i, &(cached, new)) in self.seqs.iter().enumerate() {
            let (from, to) = range(cached, new);
            b.seqs.push(SeqSpan {
                start: b.tokens.len(),
                len: to - from,
                context_len: to,
                prompt_len: 0,
                block_table: self.tables[i].clone(),
            });
            for p in from..to {
                b.tokens.push(0);
                b.positions.push(p as u32);
                b.slots
                    .push(self.tables[i][p / bs] * bs as u32 + (p % bs) as u32);
            }
        }
        b
    }

    /// Rows of `per_seq` (positions x width) for the tokens of `batch`, concatenated.
    fn rows(&self, batch: &StepBatch, per_seq: &[Vec<f32>], width: usize) -> Vec<f32> {
        let mut out = vec![];
        for (i, s) in batch.seqs.iter().enumerate() {
            let from = s.context_len - s.len;
            out.extend_from_slice(&per_seq[i][from * width..s.context_len * width]);
        }
        out
    }
}

#[test]
fn attention_matches_contiguous_reference() {
    let mut rng = rng();
    let (heads, kv_heads) = (6, 2);
    // head_dim 20 leaves a partial vector; 64 is SmolLM2's.
    for head_dim in [20, 64] {
        let layout = KvLayout {
            num_blocks: 40,
            block_size: 4,
            kv_heads,
            head_dim,
        };
        // Whole prefill, decode after 12 cached, a prefill chunk after 5 cached, decode at 0.
        let case = AttnCase::new(&mut rng, layout, vec![(0, 11), (12, 1), (5, 9), (0, 1)]);
        let sw = layout.slot_width();
        for isa in Isa::available() {
            let b = backend(isa);
            let mut cache = b.alloc_kv(layout).unwrap();
            let cached = case.batch(|cached, _| (0, cached));
            let cached_step = b.prepare_step(&cached).unwrap();
            let (k, v) = (
                case.rows(&cached, &case.k, sw),
                case.rows(&cached, &case.v, sw),
            );
            b.write_kv(&mut cache, &buffer(&b, &k), &buffer(&b, &v), &cached_step)
                .unwrap();

            let batch = case.batch(|cached, new| (cached, cached + new));
            let step = b.prepare_step(&batch).unwrap();
            let (k, v) = (
                case.rows(&batch, &case.k, sw),
                case.rows(&batch, &case.v, sw),
            );
            b.write_kv(&mut cache, &buffer(&b, &k), &buffer(&b, &v), &step)
                .unwrap();
            let n = batch.num_tokens();
            let q = values(&mut rng, n * heads * head_dim);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let mut out = poisoned(&b, n * heads * head_dim);
            b.attention(&buffer(&b, &q), &cache, &step, heads, scale, &mut out)
                .unwrap();
            let got = b.read(&out, n * heads * head_dim).unwrap();

            let mut want = vec![0.0f64; n * heads * head_dim];
            for (i, s) in batch.seqs.iter().enumerate() {
                for t in 0..s.len {
                    let row = s.start + t;
                    let pos = s.context_len - s.len + t;
                    for h in 0..heads {
                        let kvh = h / (heads / kv_heads);
                        let qh = &q[(row * heads + h) * head_dim..][..head_dim];
                        let key = |j: usize| &case.k[i][j * sw + kvh * head_dim..][..head_dim];
                        let val = |j: usize| &case.v[i][j * sw + kvh * head_dim..][..head_dim];
                        let scores: Vec<f64> = (0..=pos)
                            .map(|j| {
                                let d: f64 = qh
                                    .iter()
                                    .zip(key(j))
                                    .map(|(&a, &c)| a as f64 * c as f64)
                                    .sum();
                                d * scale as f64
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                        let sum: f64 = w.iter().sum();
                        for d in 0..head_dim {
                            want[(row * heads + h) * head_dim + d] =
                                (0..=pos).map(|j| w[j] * val(j)[d] as f64).sum::<f64>() / sum;
                        }
                    }
                }
            }
            let err = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (g as f64 - w).abs())
                .fold(0.0, f64::max);
            assert!(
                got.iter().all(|v| v.is_finite()),
                "{isa:?} hd {head_dim}: NaN"
            );
            assert!(err <= 1e-5, "{isa:?} hd {head_dim}: max err {err}");

            // The decode sequence alone gives bitwise the same rows as inside the batch.
            let s = &batch.seqs[1];
            let alone = StepBatch {
                tokens: vec![0],
                positions: vec![batch.positions[s.start]],
                slots: vec![batch.slots[s.start]],
                seqs: vec![SeqSpan {
                    start: 0,
                    ..s.clone()
                }],
                logit_rows: vec![],
                tokens_from_argmax: false,
            };
            let width = heads * head_dim;
            let mut out1 = poisoned(&b, width);
            let q1 = buffer(&b, &q[s.start * width..(s.start + 1) * width]);
            b.attention(
                &q1,
                &cache,
                &b.prepare_step(&alone).unwrap(),
                heads,
                scale,
                &mut out1,
            )
            .unwrap();
            let alone_out = b.read(&out1, width).unwrap();
            let in_batch = &got[s.start * width..(s.start + 1) * width];
            assert!(
                alone_out
                    .iter()
                    .zip(in_batch)
                    .all(|(a, c)| a.to_bits() == c.to_bits()),
                "{isa:?}: decode row depends on its batch"
            );

            // The last six tokens of the chunked prefill alone: tasks group them differently
            // (QUERY_TOKENS at a time from the first new token), the results must not change.
            let s = &batch.seqs[2];
            let tail = StepBatch {
                tokens: vec![0; 6],
                positions: batch.positions[s.start + s.len - 6..s.start + s.len].to_vec(),
                slots: batch.slots[s.start + s.len - 6..s.start + s.len].to_vec(),
                seqs: vec![SeqSpan {
                    start: 0,
                    len: 6,
                    ..s.clone()
                }],
                logit_rows: vec![],
                tokens_from_argmax: false,
            };
            let rows = (s.start + s.len - 6) * width..(s.start + s.len) * width;
            let mut out6 = poisoned(&b, 6 * width);
            let q6 = buffer(&b, &q[rows.clone()]);
            b.attention(
                &q6,
                &cache,
                &b.prepare_step(&tail).unwrap(),
                heads,
                scale,
                &mut out6,
            )
            .unwrap();
            let tail_out = b.read(&out6, 6 * width).unwrap();
            assert!(
                tail_out
                    .iter()
                    .zip(&got[rows])
                    .all(|(a, c)| a.to_bits() == c.to_bits()),
                "{isa:?}: prefill rows depend on how tokens are grouped"
            );

            let mut overlong = batch.clone();
            overlong.seqs[3].len += 1;
            overlong.seqs[3].context_len += 1;
            let bad = b.prepare_step(&overlong).unwrap();
            let err = b.attention(&buffer(&b, &q), &cache, &bad, heads, scale, &mut out);
            assert!(matches!(err, Err(KernelError::Shape(m)) if m.starts_with("step")));

            let err = b.attention(&buffer(&b, &q), &cache, &step, 5, scale, &mut out);
            assert!(matches!(err, Err(KernelError::Shape(m)) if m.starts_with("attention")));
        }
    }
}

// ---- Packed formats ---------------------------------------------------------------------------

/// Every packed format, with the group it is tested at, and the variants that change the kernel's
/// path: per channel with an odd row length (tails), a 128 group, an act-order permutation.
fn packed_cases() -> Vec<(QuantFormat, usize, bool)> {
    let mut cases: Vec<(QuantFormat, usize, bool)> = QuantFormat::ALL
        .into_iter()
        .map(|f| (f, f.default_group(), false))
        .collect();
    cases.push((
        QuantFormat::Int {
            bits: 4,
            asym: false,
        },
        PER_CHANNEL,
        false,
    ));
    cases.push((
        QuantFormat::Int {
            bits: 3,
            asym: true,
        },
        128,
        false,
    ));
    cases.push((
        QuantFormat::Int {
            bits: 4,
            asym: true,
        },
        32,
        true,
    ));
    cases.push((QuantFormat::Fp8, 64, true));
    cases
}

/// A packed weight of random values (rows of odd group count), its dequantized values over the
/// input columns, and its description.
fn packed_weight(
    rng: &mut StdRng,
    format: QuantFormat,
    group: usize,
    perm: bool,
    n: usize,
    k: usize,
) -> (HostWeight, Vec<f32>) {
    let g = format.resolve_group(group, k).unwrap();
    let mut t = marlin_quant::quantize_rtn(&values(rng, n * k), n, k, format, g).unwrap();
    if perm {
        let mut p: Vec<u32> = (0..k as u32).collect();
        for i in (1..k).rev() {
            p.swap(i, rng.random_range(0..=i));
        }
        t.perm = Some(p);
    }
    let w = t.dequantize();
    (HostWeight::quant(t).unwrap(), w)
}

/// Row length for a case: an odd number of groups (or, per channel, an odd length).
fn packed_k(format: QuantFormat, group: usize) -> usize {
    match (format.fixed_group(), group) {
        (Some(g), _) => 576 + 3 * g,
        (None, PER_CHANNEL) => 577,
        (None, g) => 5 * g.max(32) + if g == 32 { 576 } else { 0 },
    }
}

#[test]
fn packed_matmul_matches_dequantized_reference() {
    let mut rng = rng();
    // Without VNNI every kind of activations runs as f32: one backend covers them.
    let kinds: &[Activations] = if super::int8dot::available() {
        &[Activations::F32, Activations::Int16, Activations::Int8]
    } else {
        &[Activations::F32]
    };
    let backends: Vec<CpuBackend> = kinds
        .iter()
        .map(|&a| CpuBackend::with_activations(0, a).unwrap())
        .collect();
    for ((format, group, perm), b) in packed_cases()
        .into_iter()
        .flat_map(|case| backends.iter().map(move |b| (case, b)))
    {
        let k = packed_k(format, group);
        let n = 37;
        let (host, w) = packed_weight(&mut rng, format, group, perm, n, k);
        let uploaded = b.upload_weight(&host).unwrap();
        assert_eq!(b.weight_shape(&uploaded), (n, k));
        // Integer activations move each x by at most half a step: amax / 254 of its block
        // with one int8 code, amax / (254 * 128) with two.
        let activation_step = match (&uploaded, b.activations) {
            (Weight::Int(_), Activations::Int8) => 1.0 / 254.0,
            (Weight::Int(_), _) => 1.0 / (254.0 * 128.0),
            _ => 0.0,
        };
        for rows in [1, 3, 16, 33, 300] {
            let x = values(&mut rng, rows * k);
            let got = run_matmul(b, &x, &uploaded, rows);
            for r in 0..rows {
                let amax = x[r * k..(r + 1) * k]
                    .iter()
                    .fold(0.0f32, |m, v| m.max(v.abs()));
                for j in 0..n {
                    let terms = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64);
                    let want: f64 = terms.clone().sum();
                    let w_abs: f64 = w[j * k..(j + 1) * k].iter().map(|v| v.abs() as f64).sum();
                    let bound: f64 = 1e-5 * terms.map(f64::abs).sum::<f64>()
                        + activation_step * amax as f64 * w_abs;
                    let g = got[r * n + j] as f64;
                    assert!(
                        (g - want).abs() <= bound,
                        "{format} g{group} perm {perm} k={k} rows={rows} [{r},{j}]: {g} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn packed_matmul_is_deterministic_across_rows_and_isas() {
    let mut rng = rng();
    let n = 37;
    for (format, group, perm) in packed_cases() {
        let k = packed_k(format, group);
        let x = values(&mut rng, 300 * k);
        let (host, _) = packed_weight(&mut rng, format, group, perm, n, k);
        let mut first: Option<Vec<f32>> = None;
        for isa in Isa::available() {
            let b = backend(isa);
            let w = b.upload_weight(&host).unwrap();
            let all = run_matmul(&b, &x, &w, 300);
            for rows in [1, 16, 17] {
                let part = run_matmul(&b, &x, &w, rows);
                assert!(
                    part.iter()
                        .zip(&all)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{format} g{group} {isa:?}: {rows} rows differ from 300"
                );
            }
            let r = 211;
            let alone = run_matmul(&b, &x[r * k..], &w, 1);
            assert!(
                alone
                    .iter()
                    .zip(&all[r * n..])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{format} g{group} {isa:?}: row {r} alone differs"
            );
            match &first {
                None => first = Some(all),
                Some(f) => assert!(
                    f.iter().zip(&all).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{format} g{group}: {isa:?} differs from scalar"
                ),
            }
        }
    }
}

#[test]
fn packed_embedding_rows_are_the_dequantized_rows() {
    let mut rng = rng();
    let b = CpuBackend::new(0).unwrap();
    for (format, group, perm) in packed_cases() {
        let (vocab, dim) = (51, packed_k(format, group));
        let (host, table) = packed_weight(&mut rng, format, group, perm, vocab, dim);
        let w = b.upload_weight(&host).unwrap();
        let tokens: Vec<u32> = (0..9).map(|_| rng.random_range(0..vocab as u32)).collect();
        let step = b.prepare_step(&decode_batch(&tokens)).unwrap();
        let mut out = poisoned(&b, tokens.len() * dim);
        b.embedding(&w, &step, &mut out).unwrap();
        let got = b.read(&out, tokens.len() * dim).unwrap();
        for (i, &t) in tokens.iter().enumerate() {
            for c in 0..dim {
                assert_eq!(
                    got[i * dim + c].to_bits(),
                    table[t as usize * dim + c].to_bits(),
                    "{format} g{group} token {t} column {c}"
                );
            }
        }
    }
}

/// GGUF's Q8_0/Q4_0/Q4_1 blocks, converted and uploaded, give GGML's values bit for bit.
#[test]
fn gguf_blocks_run_losslessly() {
    use marlin_quant::ggml::{self, GgmlType};
    let mut rng = rng();
    let b = CpuBackend::new(0).unwrap();
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
        let (rows, cols) = (7, 96);
        let mut bytes = vec![];
        for _ in 0..rows * cols / 32 {
            let mut block: Vec<u8> = (0..ty.block_bytes()).map(|_| rng.random()).collect();
            block[..2]
                .copy_from_slice(&half::f16::from_f32(rng.random_range(1e-3..0.05)).to_le_bytes());
            if ty == GgmlType::Q4_1 {
                block[2..4].copy_from_slice(
                    &half::f16::from_f32(rng.random_range(-0.5..0.0)).to_le_bytes(),
                );
            }
            bytes.extend(block);
        }
        let want = ggml::dequantize(ty, &bytes, rows * cols).unwrap();
        let conv = marlin_quant::convert::from_ggml(ty, &bytes, rows, cols).unwrap();
        assert!(conv.lossless);
        let w = b
            .upload_weight(&HostWeight::quant(conv.tensor).unwrap())
            .unwrap();
        let tokens: Vec<u32> = (0..rows as u32).collect();
        let step = b.prepare_step(&decode_batch(&tokens)).unwrap();
        let mut out = poisoned(&b, rows * cols);
        b.embedding(&w, &step, &mut out).unwrap();
        let got = b.read(&out, rows * cols).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{ty} element {i}");
        }
    }
}

// ---- integer activations (VNNI) ---------------------------------------------------------------

/// What the integer path computes, spelled out in scalar arithmetic from the tensor itself:
/// activations quantized per 32-block (one code, or two for `Int16`), codes as unsigned
/// integers less a bias (E2M1 codes as twice their value plus 12), exact integer sums per block
/// (per 16 columns for nvfp4), then the same f32 operations in the same order. The VNNI kernel
/// must match it bit for bit.
fn integer_reference(
    t: &marlin_quant::QuantTensor,
    x: &[f32],
    rows: usize,
    activations: Activations,
) -> Vec<f32> {
    use super::int8dot::{block_scale, BLOCK, E2M1_TABLE};
    use marlin_quant::packed::{e4m3_to_f32, get_code};
    let (n, k, bits) = (t.rows, t.cols, t.format.bits());
    let fp4 = matches!(
        t.format,
        QuantFormat::Fp4 | QuantFormat::Mxfp4 | QuantFormat::Nvfp4
    );
    let bias = match t.format {
        QuantFormat::Int { asym: true, .. } => 0,
        QuantFormat::Int { bits, .. } => 1i32 << (bits - 1),
        _ => 12,
    };
    let ts = t.tensor_scale.unwrap_or(1.0);
    let (factor, half) = match t.format {
        QuantFormat::Nvfp4 => (0.5 * 256.0 * ts, true),
        _ if fp4 => (0.5, false),
        _ => (1.0, false),
    };
    // The stored scale as the kernel reads it (nvfp4's E4M3 times 2^-8; the others exact).
    let scale = |j: usize, g: usize| match t.format {
        QuantFormat::Nvfp4 => e4m3_to_f32(t.scales[j * k / t.group + g]) / 256.0,
        _ => t.group_scale(j, g),
    };
    let mut out = vec![0.0f32; rows * n];
    for r in 0..rows {
        let row: Vec<f32> = match &t.perm {
            None => x[r * k..(r + 1) * k].to_vec(),
            Some(p) => p.iter().map(|&c| x[r * k + c as usize]).collect(),
        };
        let blocks: Vec<(Vec<i32>, f32)> = row
            .chunks(BLOCK)
            .map(|b| {
                let (d, inv) = block_scale(b.iter().fold(0.0f32, |m, v| m.max(v.abs())));
                let y: Vec<f32> = b.iter().map(|v| v * inv).collect();
                let q: Vec<i32> = y.iter().map(|y| y.round_ties_even() as i32).collect();
                if activations == Activations::Int8 {
                    return (q, d);
                }
                // Two codes: q * 128 + lo, lo the remainder in 128ths.
                let q = y
                    .iter()
                    .zip(&q)
                    .map(|(y, &q)| 128 * q + ((y - q as f32) * 128.0).round_ties_even() as i32)
                    .collect();
                (q, d / 128.0)
            })
            .collect();
        for j in 0..n {
            let codes = &t.codes[j * t.row_bytes()..(j + 1) * t.row_bytes()];
            let weight = |col: usize| {
                let c = get_code(codes, bits, col);
                (if fp4 { E2M1_TABLE[c as usize] } else { c }) as i32 - bias
            };
            let mut acc = 0.0f32;
            for (b, (q, d)) in blocks.iter().enumerate() {
                let d = d * factor;
                let sum = |cols: std::ops::Range<usize>| -> i32 {
                    cols.map(|i| weight(b * BLOCK + i) * q[i]).sum()
                };
                if half {
                    for part in 0..2 {
                        let g = (b * BLOCK + 16 * part) / t.group;
                        let s = sum(16 * part..16 * part + 16);
                        acc = (s as f32).mul_add(scale(j, g) * d, acc);
                    }
                } else {
                    let g = b * BLOCK / t.group;
                    acc = (sum(0..BLOCK) as f32).mul_add(scale(j, g) * d, acc);
                    if bias == 0 && !fp4 {
                        let codes: i32 = q.iter().sum();
                        acc = t.group_offset(j, g).mul_add(d * codes as f32, acc);
                    }
                }
            }
            out[r * n + j] = acc;
        }
    }
    out
}

#[test]
fn e2m1_table_is_twice_the_value_plus_12() {
    for (c, &u) in super::int8dot::E2M1_TABLE.iter().enumerate() {
        assert_eq!(
            u as f32,
            2.0 * marlin_quant::packed::E2M1[c] + 12.0,
            "code {c}"
        );
    }
}

#[test]
fn integer_activation_matmul_is_the_scalar_definition_for_any_rows() {
    if !super::int8dot::available() {
        eprintln!("skipped: no AVX-512 VNNI");
        return;
    }
    // With AMX, calls of 8 rows and more take the tile unit; without, VNNI takes every call.
    let amx = if super::int8dot::amx_available() {
        vec![true, false]
    } else {
        eprintln!("skipped: no AMX tiles (the VNNI kernel takes every row count)");
        vec![false]
    };
    for activations in [Activations::Int16, Activations::Int8] {
        for &amx in &amx {
            integer_activation_case(activations, amx);
        }
    }
}

fn integer_activation_case(activations: Activations, amx: bool) {
    let mut rng = rng();
    let b = CpuBackend::with_isa(2, Isa::detect(), activations).unwrap();
    let b = b.with_amx(amx);
    let int = |bits, asym| QuantFormat::Int { bits, asym };
    let cases = [
        (int(4, false), 32, false),
        (int(4, true), 32, false),
        (int(4, true), 64, true),
        (int(8, false), 32, false),
        (int(8, true), PER_CHANNEL, false),
        (int(4, false), 128, false),
        (int(3, false), 32, false),
        (int(3, true), 64, true),
        (int(2, false), 32, false),
        (int(2, true), 128, false),
        (QuantFormat::Fp4, 32, false),
        (QuantFormat::Fp4, PER_CHANNEL, true),
        (QuantFormat::Mxfp4, 32, false),
        (QuantFormat::Nvfp4, 16, true),
    ];
    for (format, group, perm) in cases {
        // 37 features: two whole tiles and a partial one; k an odd number of 32-blocks.
        let (n, k) = (37, if group <= 32 { 160 + 448 } else { 5 * group });
        let (host, _) = packed_weight(&mut rng, format, group, perm, n, k);
        let marlin_quant::WeightData::Quant(t) = &host.data else {
            unreachable!()
        };
        let w = b.upload_weight(&host).unwrap();
        assert!(
            matches!(w, Weight::Int(_)),
            "{format} g{group} took the f32 path"
        );
        let mut x = values(&mut rng, 300 * k);
        // A zero block and a large outlier exercise the scale's edge cases.
        x[k..k + 32].fill(0.0);
        x[5 * k + 3] = 40.0;
        let want = integer_reference(t, &x, 300, activations);
        for rows in [1, 5, 8, 16, 17, 33, 64, 300] {
            let got = run_matmul(&b, &x, &w, rows);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{activations:?} amx {amx} {format} g{group} perm {perm} rows={rows} element {i}: {g} vs {w}"
                );
            }
        }
    }
}

/// Prompt rows (`MatmulRows::prompt`) of packed weights run on bf16 tiles where the CPU has
/// AMX-BF16: each within bf16's error of the dequantized product, and bitwise the same whatever
/// rows come with it, prompt or generated (those keep the integer path's bits).
#[cfg(target_arch = "x86_64")]
#[test]
fn prompt_rows_are_bf16_products_whatever_rows_come_with_them() {
    if !super::int8dot::amx_bf16::available() {
        eprintln!("skipped: no AMX-BF16 tiles (prompt rows take the integer path)");
        return;
    }
    let mut rng = rng();
    let b = CpuBackend::new(2).unwrap();
    let int = |bits, asym| QuantFormat::Int { bits, asym };
    let cases = [
        (int(4, false), 32, false),
        (int(4, true), 32, true),
        (int(8, false), 32, false),
        (int(8, true), PER_CHANNEL, false),
        (int(3, true), 64, true),
        (int(2, false), 128, false),
        (QuantFormat::Fp4, 32, false),
        (QuantFormat::Mxfp4, 32, false),
        (QuantFormat::Nvfp4, 16, true),
    ];
    let bf16 = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
    let rows = 70;
    for (format, group, perm) in cases {
        // 53 features: three whole tiles (a pair and a single) and a partial one.
        let (n, k) = (53, if group <= 32 { 160 + 448 } else { 5 * group });
        let (host, dequantized) = packed_weight(&mut rng, format, group, perm, n, k);
        let w = b.upload_weight(&host).unwrap();
        let mut x = values(&mut rng, rows * k);
        x[3 * k + 7] = 40.0;
        let run = |prompt: &[std::ops::Range<usize>]| {
            let mut out = poisoned(&b, rows * n);
            let rows = MatmulRows {
                count: rows,
                prompt,
            };
            b.matmul(&buffer(&b, &x), &w, rows, &mut out).unwrap();
            b.read(&out, rows.count * n).unwrap()
        };
        let all = run(std::slice::from_ref(&(0..rows)));
        let (rounded, exact): (Vec<f64>, Vec<f64>) = (0..rows * n)
            .map(|i| {
                let (r, f) = (i / n, i % n);
                let (xr, wr) = (&x[r * k..(r + 1) * k], &dequantized[f * k..(f + 1) * k]);
                let dot = |g: &dyn Fn(f32) -> f64| {
                    xr.iter().zip(wr).map(|(&a, &c)| g(a) * g(c)).sum::<f64>()
                };
                (dot(&bf16), dot(&|v| v as f64))
            })
            .unzip();
        let case = format!("{format} g{group} perm {perm}");
        let err = rel_err(&all, &rounded);
        assert!(err < 1e-4, "{case}: {err:e} from the bf16-rounded product");
        let err = rel_err(&all, &exact);
        assert!(err < 1e-2, "{case}: {err:e} from the exact product");
        let generated = run(&[]);
        let mixed_runs = [2..9, 9..10, 40..rows];
        let mixed = run(&mixed_runs);
        let alone = run(std::slice::from_ref(&(5..6)));
        for r in 0..rows {
            let prompt = mixed_runs.iter().any(|run| run.contains(&r));
            let want = if prompt { &all } else { &generated };
            let row = |v: &[f32]| {
                v[r * n..(r + 1) * n]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                row(&mixed),
                row(want),
                "{case}: row {r} (prompt {prompt}) depends on its batch"
            );
        }
        let row5 = |v: &[f32]| {
            v[5 * n..6 * n]
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row5(&alone),
            row5(&all),
            "{case}: a prompt row alone differs"
        );
    }
}

/// Several weights on one input (q/k/v, gate/up) give bitwise each weight's own matmul, on the
/// shared integer pass (one quantization) and on the fallback (mixed kinds, different
/// act-order permutations).
#[test]
fn matmul_many_is_each_matmul() {
    let mut rng = rng();
    let b = CpuBackend::new(2).unwrap();
    let k = 608;
    let int4 = QuantFormat::Int {
        bits: 4,
        asym: true,
    };
    let sets: [&[(QuantFormat, bool, usize)]; 3] = [
        &[
            (int4, false, 37),
            (int4, false, 5),
            (QuantFormat::Fp4, false, 64),
        ],
        &[(int4, true, 21), (int4, true, 16)],
        &[(int4, false, 19), (QuantFormat::Fp8, false, 33)],
    ];
    for set in sets {
        let hosts: Vec<HostWeight> = set
            .iter()
            .map(|&(format, perm, n)| packed_weight(&mut rng, format, 32, perm, n, k).0)
            .collect();
        let ws: Vec<Weight> = hosts.iter().map(|h| b.upload_weight(h).unwrap()).collect();
        for rows in [1, 17, 70] {
            let x = buffer(&b, &values(&mut rng, rows * k));
            let mut outs: Vec<Buffer> = set.iter().map(|s| poisoned(&b, rows * s.2)).collect();
            let refs: Vec<&Weight> = ws.iter().collect();
            let mut out_refs: Vec<&mut Buffer> = outs.iter_mut().collect();
            b.matmul_many(&x, &refs, MatmulRows::plain(rows), &mut out_refs)
                .unwrap();
            for ((w, out), s) in ws.iter().zip(&outs).zip(set) {
                let mut alone = poisoned(&b, rows * s.2);
                b.matmul(&x, w, MatmulRows::plain(rows), &mut alone)
                    .unwrap();
                let (got, want) = (
                    b.read(out, rows * s.2).unwrap(),
                    b.read(&alone, rows * s.2).unwrap(),
                );
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits()),
                    "{set:?} rows {rows}: {} differs from its own matmul",
                    s.0
                );
            }
        }
        let refs: Vec<&Weight> = ws.iter().collect();
        let mut one = poisoned(&b, 70 * 64);
        assert!(matches!(
            b.matmul_many(&buffer(&b, &[0.0; 608]), &refs, MatmulRows::plain(1), &mut [&mut one]),
            Err(KernelError::Shape(m)) if m.starts_with("matmul_many")
        ));
    }
}

#[test]
fn a_panicking_step_unwinds_and_the_pool_runs_the_next() {
    // Two threads, so the step has a spinning helper that must be let go on unwinding.
    let b = CpuBackend::new(2).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        b.run_step(|| panic!("the step failed"))
    }));
    assert!(caught.is_err());
    let x = buffer(&b, &[1.0, 2.0, 3.0, 4.0]);
    let read = b.run_step(|| b.read(&x, 4).unwrap());
    assert_eq!(read, vec![1.0, 2.0, 3.0, 4.0]);
}
