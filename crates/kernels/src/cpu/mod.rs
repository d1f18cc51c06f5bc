//! The CPU backend: f32 activations in plain vectors, weights kept in their 16- or 32-bit format,
//! every parallel op run on the backend's own rayon pool, SIMD picked at runtime.

mod attention;
mod int8dot;
mod matmul;
mod packed;
mod simd;
#[cfg(test)]
mod tests;

use crate::{
    check, check_argmax_room,
    contract::{self, len_check},
    Backend, KernelError, KvLayout, MatmulRows, Result, StepBatch,
};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
pub use int8dot::IntWeight;
use marlin_quant::{DenseFormat, HostWeight, WeightData};
pub use packed::QuantWeight;
use rayon::prelude::*;
use rayon::ThreadPool;
use simd::Isa;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Below this many elements an elementwise or row op runs on the calling thread: waking the
/// pool costs more than the work.
const PAR_MIN_ELEMS: usize = 1 << 15;
/// Elements per task of the elementwise ops.
const ELEM_CHUNK: usize = 1 << 14;

/// f32 activations.
pub struct Buffer(Vec<f32>);

/// A row-major matrix of `rows` output features by `cols` inputs in one element type.
pub struct DenseWeight<T> {
    rows: usize,
    cols: usize,
    data: Vec<T>,
}

/// A weight in the format it was uploaded in; the kernels widen 16-bit elements on the fly.
pub enum Weight {
    F32(DenseWeight<f32>),
    F16(DenseWeight<f16>),
    BF16(DenseWeight<bf16>),
    /// Packed codes with per-group scales (`packed.rs`), decoded sixteen at a time in the tile.
    Quant(QuantWeight),
    /// int4/int8 codes re-laid for integer dot products with int8 activations (`int8dot.rs`).
    Int(IntWeight),
}

impl Weight {
    fn shape(&self) -> (usize, usize) {
        match self {
            Weight::F32(w) => (w.rows, w.cols),
            Weight::F16(w) => (w.rows, w.cols),
            Weight::BF16(w) => (w.rows, w.cols),
            Weight::Quant(w) => (w.rows, w.cols),
            Weight::Int(w) => (w.rows, w.cols),
        }
    }

    /// Row `r` widened into `out`.
    fn row_into(&self, r: usize, out: &mut [f32]) {
        match self {
            Weight::F32(w) => out.copy_from_slice(&w.data[r * w.cols..(r + 1) * w.cols]),
            Weight::F16(w) => w.data[r * w.cols..(r + 1) * w.cols].convert_to_f32_slice(out),
            Weight::BF16(w) => w.data[r * w.cols..(r + 1) * w.cols].convert_to_f32_slice(out),
            Weight::Quant(w) => w.row_into(r, out),
            Weight::Int(w) => w.row_into(r, out),
        }
    }
}

/// One layer's paged keys and values, each `blocks x kv_heads x block_size x head_dim`: a
/// kv head's keys of one block are contiguous, so decode attention streams whole blocks
/// instead of a head_dim-wide stripe of every slot.
pub struct KvCache {
    layout: KvLayout,
    data: KvData,
}

impl KvCache {
    /// Where kv head `kvh` of `slot` starts.
    #[inline(always)]
    fn offset(&self, slot: usize, kvh: usize) -> usize {
        let bs = self.layout.block_size;
        self.block_offset(slot / bs, kvh) + slot % bs * self.layout.head_dim
    }

    /// Where kv head `kvh` of `block`'s first slot starts.
    #[inline(always)]
    fn block_offset(&self, block: usize, kvh: usize) -> usize {
        let KvLayout {
            block_size,
            kv_heads,
            head_dim,
            ..
        } = self.layout;
        (block * kv_heads + kvh) * block_size * head_dim
    }
}

/// Keys and values in f32, or in f16 (half the bytes decode attention streams per step).
enum KvData {
    F32 { k: Vec<f32>, v: Vec<f32> },
    F16 { k: Vec<f16>, v: Vec<f16> },
}

pub struct Step {
    batch: StepBatch,
    /// (sequence, first token, end token): each sequence's new tokens cut into attention tasks.
    query_blocks: Vec<(u32, u32, u32)>,
}

/// A raw pointer that tasks writing disjoint parts of one slice may share.
#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);
// SAFETY: only used for slices whose tasks touch disjoint elements (or only read).
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// A method, so closures capture the whole wrapper rather than its raw field.
    fn get(self) -> *mut T {
        self.0
    }
}

/// Whether this CPU runs int4/int8 weights through integer activations (AVX-512 VNNI).
pub fn integer_activations_available() -> bool {
    int8dot::available()
}

/// Whether this CPU runs batched integer matmuls on AMX tiles (Sapphire Rapids and later).
pub fn amx_available() -> bool {
    int8dot::amx_available()
}

/// Whether this CPU runs the prompt rows of packed weights on AMX-BF16 tiles
/// (`MatmulRows::prompt`); elsewhere they take the integer path with the other rows.
pub fn bf16_prompt_tiles_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return int8dot::amx_bf16::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// What int4/int8 weights multiply on the CPU. The integer kinds need AVX-512 VNNI; elsewhere
/// they run as `F32`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Activations {
    /// Each activation as two int8 codes per 32-block, about f16's precision: the integer
    /// kernels' speed at a KL divergence cost near zero (docs/benchmarks.md).
    #[default]
    Int16,
    /// One int8 code per activation, as GGML's Q8 dot products: fastest prefill, at a small but
    /// visible accuracy cost (docs/benchmarks.md).
    Int8,
    /// f32 activations: bitwise the same result on every CPU.
    F32,
}

pub struct CpuBackend {
    pool: ThreadPool,
    isa: Isa,
    /// What int4/int8 weights multiply, `F32` where the integer kernels cannot run.
    activations: Activations,
    /// KV caches store f16 (`with_f16_kv`).
    f16_kv: bool,
    /// Integer weights run batched rows on AMX where the CPU has it (`with_amx`).
    amx: bool,
    greedy: Mutex<GreedyIds>,
}

/// The ids of `queue_argmax_rows` not yet taken, and the latest ids (what a
/// `StepBatch::tokens_from_argmax` step takes).
#[derive(Default)]
struct GreedyIds {
    pending: VecDeque<Vec<u32>>,
    latest: Vec<u32>,
}

impl CpuBackend {
    /// A backend running on `threads` threads (0: one per core), with the default activations.
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_activations(threads, Activations::default())
    }

    /// A backend whose int4/int8 matmuls take `activations`.
    pub fn with_activations(threads: usize, activations: Activations) -> Result<Self> {
        let activations = if int8dot::available() {
            activations
        } else {
            Activations::F32
        };
        Self::with_isa(threads, Isa::detect(), activations)
    }

    /// Runs `f` on one of the backend's threads. Ops called inside it start their parallel work
    /// directly instead of handing it to the pool and sleeping until it is done: on this 2-vCPU
    /// VM that hand-off costs ~35 us per op, and the f16 SmolLM2-135M decode matmuls go from
    /// ~41 to ~60 tokens/s when the loop calling them runs inside `install`.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// Makes the KV caches allocated from now on store keys and values in f16 instead of f32:
    /// attention reads half the bytes, and its inputs are rounded to f16 (docs/benchmarks.md).
    pub fn with_f16_kv(mut self, f16_kv: bool) -> Self {
        self.f16_kv = f16_kv;
        self
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn with_isa(threads: usize, isa: Isa, activations: Activations) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("marlin-cpu-{i}"))
            .build()
            .map_err(|e| KernelError::Device {
                backend: "cpu".into(),
                message: e.to_string(),
            })?;
        Ok(Self {
            pool,
            isa,
            activations,
            f16_kv: false,
            amx: true,
            greedy: Mutex::default(),
        })
    }

    /// Whether integer weights uploaded from now on run batched rows on AMX tiles where the
    /// CPU has them (the default; off runs every row count on VNNI, to compare the two).
    pub fn with_amx(mut self, amx: bool) -> Self {
        self.amx = amx;
        self
    }

    /// Runs `f(chunk index, chunk)` over `data` cut into chunks of `chunk`, on the pool when
    /// there is enough work.
    fn for_chunks<F>(&self, data: &mut [f32], chunk: usize, f: F)
    where
        F: Fn(usize, &mut [f32]) + Send + Sync,
    {
        if data.is_empty() || chunk == 0 {
            return;
        }
        if data.len() < PAR_MIN_ELEMS {
            data.chunks_mut(chunk)
                .enumerate()
                .for_each(|(i, c)| f(i, c));
        } else {
            self.pool.install(|| {
                data.par_chunks_mut(chunk)
                    .enumerate()
                    .for_each(|(i, c)| f(i, c))
            });
        }
    }
}

/// `len` copies of `value` in memory the OS may back with 2 MiB pages (Linux's transparent
/// huge pages, asked for before the first write). Decode attention visits a few KiB of each of
/// many scattered KV blocks: with 4 KiB pages nearly every visit missed the TLB, and a miss
/// walks two levels of page tables in a VM. Packed weights and activation buffers too: a
/// 32-sequence step crosses every page of the weights and of its buffers, and on 2 MiB pages
/// the serving benchmark's 32 streams were 5-7% faster (c=8 10-14%).
pub(crate) fn huge_page_vec<T: Copy>(len: usize, value: T) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let (start, bytes) = (v.as_ptr() as usize, len * std::mem::size_of::<T>());
        let first = start.next_multiple_of(PAGE);
        let end = (start + bytes) / PAGE * PAGE;
        if end > first {
            // SAFETY: advice on whole pages of this allocation; no memory is read or written.
            // It is only advice: where refused, the pages stay 4 KiB.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
    v.resize(len, value);
    v
}

/// Sets its flag when dropped, on return or unwinding alike.
struct ReleaseOnDrop<'a>(&'a AtomicBool);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Backend for CpuBackend {
    type Buffer = Buffer;
    type Weight = Weight;
    type KvCache = KvCache;
    type Step = Step;

    /// Runs the step on one pool thread while every other one waits for the step's parallel
    /// work spinning instead of asleep. Rayon parks a worker a few microseconds after it runs
    /// out of work, and on a VM waking it again takes long against a batched step's ops (~200
    /// parks a step at 32 sequences, and a second thread then added only 1.4x a first).
    fn run_step<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R {
        let done = AtomicBool::new(false);
        self.pool.install(|| {
            let stepper = rayon::current_thread_index();
            rayon::in_place_scope(|scope| {
                for _ in 1..self.threads() {
                    scope.spawn(|_| {
                        // The stepping thread itself may pop this job while it waits inside
                        // the step: then it must not wait for the step's end.
                        if rayon::current_thread_index() == stepper {
                            return;
                        }
                        let mut idle = 0u32;
                        while !done.load(Ordering::Acquire) {
                            if rayon::yield_now() == Some(rayon::Yield::Executed) {
                                idle = 0;
                                continue;
                            }
                            idle += 1;
                            // Leave the core to other threads now and then (the server's
                            // HTTP side), without parking.
                            if idle.is_multiple_of(64) {
                                std::thread::yield_now();
                            } else {
                                std::hint::spin_loop();
                            }
                        }
                    });
                }
                // Also when the step panics: the scope waits for the spinners before unwinding.
                let _release = ReleaseOnDrop(&done);
                step()
            })
        })
    }

    fn name(&self) -> String {
        format!(
            "cpu ({:?}{}, {} threads)",
            self.isa,
            match self.activations {
                Activations::Int16 => ", VNNI int16 activations",
                Activations::Int8 => ", VNNI int8 activations",
                Activations::F32 => "",
            },
            self.pool.current_num_threads()
        )
    }

    fn alloc(&self, len: usize) -> Result<Buffer> {
        Ok(Buffer(huge_page_vec(len, 0.0)))
    }

    fn write(&self, dst: &mut Buffer, src: &[f32]) -> Result<()> {
        len_check("write", "destination", dst.0.len(), src.len())?;
        dst.0[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn read(&self, src: &Buffer, len: usize) -> Result<Vec<f32>> {
        len_check("read", "source", src.0.len(), len)?;
        // A step's logits (32 sequences x 49152 floats is 6 MB) are copied by every thread: one
        // core's copy left the other idle for ~1.5% of a batched serving step.
        let src = &src.0[..len];
        let mut out = vec![0.0; len];
        self.for_chunks(&mut out, ELEM_CHUNK, |i, chunk| {
            chunk.copy_from_slice(&src[i * ELEM_CHUNK..][..chunk.len()])
        });
        Ok(out)
    }

    fn upload_weight(&self, weight: &HostWeight) -> Result<Weight> {
        let (rows, cols) = (weight.rows, weight.cols);
        let (format, bytes) = match &weight.data {
            WeightData::Quant(t) => {
                check(t.rows == rows && t.cols == cols, "upload_weight", || {
                    format!("{rows}x{cols} weight holds a {}x{} tensor", t.rows, t.cols)
                })?;
                if self.activations != Activations::F32 && IntWeight::supports(t) {
                    t.validate()
                        .map_err(|e| KernelError::Shape(format!("upload_weight: {e}")))?;
                    return Ok(Weight::Int(IntWeight::new(t, self.activations, self.amx)));
                }
                return QuantWeight::new(t)
                    .map(Weight::Quant)
                    .map_err(|e| KernelError::Shape(format!("upload_weight: {e}")));
            }
            WeightData::Dense { format, bytes } => (*format, bytes),
        };
        let expected = rows * cols * format.bytes_per_element();
        check(bytes.len() == expected, "upload_weight", || {
            format!(
                "{rows}x{cols} {format} weight needs {expected} bytes, has {}",
                bytes.len()
            )
        })?;
        let halves = || {
            bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        Ok(match format {
            DenseFormat::F32 => Weight::F32(DenseWeight {
                rows,
                cols,
                data: weight.to_f32(),
            }),
            DenseFormat::F16 => Weight::F16(DenseWeight {
                rows,
                cols,
                data: halves().map(f16::from_bits).collect(),
            }),
            DenseFormat::BF16 => Weight::BF16(DenseWeight {
                rows,
                cols,
                data: halves().map(bf16::from_bits).collect(),
            }),
        })
    }

    fn weight_shape(&self, weight: &Weight) -> (usize, usize) {
        weight.shape()
    }

    fn alloc_kv(&self, layout: KvLayout) -> Result<KvCache> {
        let len = layout.slots() * layout.slot_width();
        let data = if self.f16_kv {
            KvData::F16 {
                k: huge_page_vec(len, f16::ZERO),
                v: huge_page_vec(len, f16::ZERO),
            }
        } else {
            KvData::F32 {
                k: huge_page_vec(len, 0.0),
                v: huge_page_vec(len, 0.0),
            }
        };
        Ok(KvCache { layout, data })
    }

    fn prepare_step(&self, batch: &StepBatch) -> Result<Step> {
        // Token ranges are checked against the cache layout by `StepBatch::validate` in the ops
        // that read them; here they only need to be in order.
        let mut query_blocks = vec![];
        for (i, seq) in batch.seqs.iter().enumerate() {
            for t in (0..seq.len).step_by(attention::QUERY_TOKENS) {
                let end = (t + attention::QUERY_TOKENS).min(seq.len);
                query_blocks.push((i as u32, (seq.start + t) as u32, (seq.start + end) as u32));
            }
        }
        let mut batch = batch.clone();
        if batch.tokens_from_argmax {
            let latest = &self.greedy.lock().unwrap().latest;
            check(latest.len() == batch.tokens.len(), "prepare_step", || {
                format!(
                    "{} tokens from the latest argmax of {} rows",
                    batch.tokens.len(),
                    latest.len()
                )
            })?;
            batch.tokens.clone_from(latest);
        }
        Ok(Step {
            batch,
            query_blocks,
        })
    }

    fn embedding(&self, table: &Weight, step: &Step, out: &mut Buffer) -> Result<()> {
        let (vocab, dim) = table.shape();
        let tokens = &step.batch.tokens;
        len_check("embedding", "out", out.0.len(), tokens.len() * dim)?;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(KernelError::Shape(format!(
                "embedding: token {t} of vocab {vocab}"
            )));
        }
        let out = &mut out.0[..tokens.len() * dim];
        self.for_chunks(out, dim, |t, row| table.row_into(tokens[t] as usize, row));
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &Buffer,
        weight: &Buffer,
        eps: f32,
        rows: usize,
        dim: usize,
        out: &mut Buffer,
    ) -> Result<()> {
        contract::rms_norm(x.0.len(), weight.0.len(), out.0.len(), rows, dim)?;
        let (x, w) = (&x.0, &weight.0[..dim]);
        // Memory bound (one read of x, one write of out); the f64 lanes keep the sum of squares
        // exact enough that the only f32 rounding is Hugging Face's own.
        self.for_chunks(&mut out.0[..rows * dim], dim, |r, o| {
            let xr = &x[r * dim..(r + 1) * dim];
            let mut lanes = [0.0f64; 8];
            let mut chunks = xr.chunks_exact(8);
            for c in &mut chunks {
                for (l, &v) in lanes.iter_mut().zip(c) {
                    *l += v as f64 * v as f64;
                }
            }
            let tail: f64 = chunks
                .remainder()
                .iter()
                .map(|&v| v as f64 * v as f64)
                .sum();
            let mean = ((lanes.iter().sum::<f64>() + tail) / dim as f64) as f32;
            let inv = 1.0 / (mean + eps).sqrt();
            for ((o, &v), &g) in o.iter_mut().zip(xr).zip(w) {
                *o = v * inv * g;
            }
        });
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Buffer,
        step: &Step,
        heads: usize,
        head_dim: usize,
        table: &Buffer,
    ) -> Result<()> {
        let tokens = step.batch.num_tokens();
        contract::rope(x.0.len(), table.0.len(), &step.batch, heads, head_dim)?;
        let (half, table, positions) = (head_dim / 2, &table.0, &step.batch.positions);
        self.for_chunks(
            &mut x.0[..tokens * heads * head_dim],
            heads * head_dim,
            |t, row| {
                let p = positions[t] as usize * head_dim;
                let (cos, sin) = table[p..p + head_dim].split_at(half);
                for head in row.chunks_exact_mut(head_dim) {
                    let (a, b) = head.split_at_mut(half);
                    for i in 0..half {
                        let (x0, x1) = (a[i], b[i]);
                        a[i] = x0 * cos[i] - x1 * sin[i];
                        b[i] = x1 * cos[i] + x0 * sin[i];
                    }
                }
            },
        );
        Ok(())
    }

    fn matmul(
        &self,
        x: &Buffer,
        weight: &Weight,
        rows: MatmulRows,
        out: &mut Buffer,
    ) -> Result<()> {
        if let Weight::Int(_) = weight {
            return self.matmul_many(x, &[weight], rows, &mut [out]);
        }
        let (n, k) = weight.shape();
        contract::matmul("matmul", x.0.len(), out.0.len(), rows.count, k, n)?;
        matmul::matmul(&self.pool, self.isa, &x.0, weight, rows.count, &mut out.0);
        Ok(())
    }

    fn matmul_many(
        &self,
        x: &Buffer,
        weights: &[&Weight],
        rows: MatmulRows,
        outs: &mut [&mut Buffer],
    ) -> Result<()> {
        check(weights.len() == outs.len(), "matmul_many", || {
            format!("{} weights, {} outputs", weights.len(), outs.len())
        })?;
        let ints: Vec<&IntWeight> = weights
            .iter()
            .filter_map(|w| match w {
                Weight::Int(w) => Some(w),
                _ => None,
            })
            .collect();
        if ints.len() < weights.len() || !int8dot::share_input(&ints) {
            for (w, out) in weights.iter().zip(outs.iter_mut()) {
                self.matmul(x, w, rows, out)?;
            }
            return Ok(());
        }
        for (w, out) in ints.iter().zip(outs.iter()) {
            contract::matmul(
                "matmul_many",
                x.0.len(),
                out.0.len(),
                rows.count,
                w.cols,
                w.rows,
            )?;
        }
        if let Some(run) = rows
            .prompt
            .iter()
            .find(|r| r.start > r.end || r.end > rows.count)
        {
            return Err(KernelError::Shape(format!(
                "matmul: prompt rows {run:?} of {} rows",
                rows.count
            )));
        }
        let mut outs: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o.0[..]).collect();
        int8dot::matmul_rows(&self.pool, &ints, &x.0, rows, &mut outs);
        Ok(())
    }

    fn write_kv(&self, cache: &mut KvCache, k: &Buffer, v: &Buffer, step: &Step) -> Result<()> {
        let layout = cache.layout;
        step.batch.validate(&layout)?;
        let (n, sw) = (step.batch.num_tokens(), layout.slot_width());
        contract::write_kv(k.0.len(), v.0.len(), n, sw)?;
        let hd = layout.head_dim;
        for (t, &slot) in step.batch.slots.iter().enumerate() {
            for kvh in 0..layout.kv_heads {
                let at = cache.offset(slot as usize, kvh);
                let (dst, src) = (at..at + hd, t * sw + kvh * hd..t * sw + (kvh + 1) * hd);
                match &mut cache.data {
                    KvData::F32 { k: ck, v: cv } => {
                        ck[dst.clone()].copy_from_slice(&k.0[src.clone()]);
                        cv[dst].copy_from_slice(&v.0[src]);
                    }
                    KvData::F16 { k: ck, v: cv } => {
                        ck[dst.clone()].convert_from_f32_slice(&k.0[src.clone()]);
                        cv[dst].convert_from_f32_slice(&v.0[src]);
                    }
                }
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &Buffer,
        cache: &KvCache,
        step: &Step,
        heads: usize,
        scale: f32,
        out: &mut Buffer,
    ) -> Result<()> {
        let layout = cache.layout;
        step.batch.validate_attention(&layout, heads)?;
        let len = step.batch.num_tokens() * heads * layout.head_dim;
        len_check("attention", "q", q.0.len(), len)?;
        len_check("attention", "out", out.0.len(), len)?;
        let job = attention::Job {
            cache,
            step,
            heads,
            scale,
        };
        attention::attention(&self.pool, self.isa, &job, &q.0[..len], &mut out.0[..len]);
        Ok(())
    }

    fn silu_mul(&self, gate: &Buffer, up: &Buffer, len: usize, out: &mut Buffer) -> Result<()> {
        contract::silu_mul(gate.0.len(), up.0.len(), out.0.len(), len)?;
        let (gate, up, isa) = (&gate.0, &up.0, self.isa);
        // Memory bound at prefill sizes once the exp is vectorised (a libm exp per element cost
        // about a tenth of a prefill layer's matmul time).
        self.for_chunks(&mut out.0[..len], ELEM_CHUNK, |i, o| {
            let at = i * ELEM_CHUNK;
            // SAFETY: gate and up hold at least len >= at + o.len() elements (checked above).
            unsafe {
                simd::silu_mul(
                    isa,
                    gate[at..].as_ptr(),
                    up[at..].as_ptr(),
                    o.as_mut_ptr(),
                    o.len(),
                )
            }
        });
        Ok(())
    }

    fn add(&self, x: &mut Buffer, y: &Buffer, len: usize) -> Result<()> {
        contract::add(x.0.len(), y.0.len(), len)?;
        let y = &y.0;
        self.for_chunks(&mut x.0[..len], ELEM_CHUNK, |i, xs| {
            for (a, &b) in xs.iter_mut().zip(&y[i * ELEM_CHUNK..]) {
                *a += b;
            }
        });
        Ok(())
    }

    fn softmax(&self, x: &mut Buffer, rows: usize, dim: usize) -> Result<()> {
        len_check("softmax", "x", x.0.len(), rows * dim)?;
        self.for_chunks(&mut x.0[..rows * dim], dim, |_, row| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0.0f64;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v as f64;
            }
            let inv = (1.0 / sum) as f32;
            row.iter_mut().for_each(|v| *v *= inv);
        });
        Ok(())
    }

    fn gather_logit_rows(
        &self,
        x: &Buffer,
        step: &Step,
        dim: usize,
        out: &mut Buffer,
    ) -> Result<()> {
        contract::gather_logit_rows(x.0.len(), out.0.len(), &step.batch, dim)?;
        for (i, &r) in step.batch.logit_rows.iter().enumerate() {
            let r = r as usize;
            out.0[i * dim..(i + 1) * dim].copy_from_slice(&x.0[r * dim..(r + 1) * dim]);
        }
        Ok(())
    }

    fn queue_argmax_rows(&self, x: &Buffer, rows: usize, dim: usize) -> Result<()> {
        len_check("queue_argmax_rows", "x", x.0.len(), rows * dim)?;
        let mut greedy = self.greedy.lock().unwrap();
        check_argmax_room(greedy.pending.len())?;
        let ids: Vec<u32> = (0..rows)
            .map(|r| crate::argmax(&x.0[r * dim..(r + 1) * dim]))
            .collect();
        greedy.latest.clone_from(&ids);
        greedy.pending.push_back(ids);
        Ok(())
    }

    fn take_argmax(&self) -> Result<Vec<u32>> {
        let pending = self.greedy.lock().unwrap().pending.pop_front();
        pending.ok_or_else(|| KernelError::Shape("take_argmax: no ids queued".into()))
    }
}
