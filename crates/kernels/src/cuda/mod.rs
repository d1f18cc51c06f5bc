//! The CUDA backend: bf16 activations with f32 arithmetic, kernels written in CUDA C beside this
//! file and compiled by NVRTC at first use for the device's architecture (cached on disk, see
//! `compile.rs`), cuBLAS for matmuls of more rows than the decode kernels take (packed weights:
//! 64 or 128 rows, `max_decode_rows`, then on sm_90 the wgmma prefill kernel up to 512 or 1024 rows;
//! dense ones: 16, bf16 2).
//!
//! Every op is queued on one stream and returns without waiting; only `read` waits. A step's batch
//! description crosses to the device once, at its first op. Decode-sized steps (up to
//! DECODE_MAX_ROWS tokens) are recorded as CUDA graphs the second time a step of their shape
//! comes (tokens, logit rows, context bucket, over the same buffers and weights: see
//! `Backend::queue_step`) and replayed afterwards: one launch per step instead of ~17 per layer,
//! the description copied into a buffer the recording owns. `MARLIN_CUDA_GRAPHS=0` turns this off. The driver, NVRTC and cuBLAS are
//! loaded at run time, so the backend builds without a CUDA toolkit, and [`CudaBackend::new`]
//! answers with an error (not a crash) on a machine without a driver or a device.
//!
//! Weights: dense f32/f16/bf16 stay in their format (a GEMV per format reads them at decode, up to
//! 2 rows for bf16);
//! packed `QuantTensor`s of every format are re-laid for the tensor-core decode kernel
//! (`qgemv.cu`, compiled once per format), and a packed embedding table is gathered from that
//! same layout (no second, dense copy of the table). An act-order weight's activations are
//! reordered into its stored column order first. Only 2-/3-bit weights with groups of 16 (which
//! the CLI never makes) are dequantized to bf16 at upload.
//! Above those rows, on Hopper, packed weights multiply on the tensor cores straight from that
//! layout (`qgemm.cu`, wgmma, up to `qgemm_max_rows`). Otherwise a weight that is not bf16 is
//! expanded to bf16 a slab of features at a time into a scratch buffer, and cuBLAS multiplies. The quantized decode kernel's split-K workspace is
//! allocated when weights are uploaded, so a decode matmul allocates nothing.

mod compile;
mod quant;

pub use cudarc;

use crate::{
    check, check_argmax_room,
    contract::{self, len_check},
    swiglu_in_two_ops, Backend, KernelError, KvLayout, MatmulRows, Result, StepBatch,
    ARGMAX_PENDING,
};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PinnedHostSlice,
};
use half::bf16;
use marlin_quant::{DenseFormat, HostWeight, QuantFormat, QuantTensor, WeightData};
use rayon::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

const PRELUDE: &str = include_str!("prelude.cuh");
/// The kernels every model uses, one module.
const COMMON: [&str; 3] = [
    include_str!("ops.cu"),
    include_str!("attention.cu"),
    include_str!("gemv.cu"),
];
/// The packed-weight kernels, one module per format (`modules`).
const QGEMV: &str = include_str!("qgemv.cu");
/// The wgmma prefill kernel on packed weights, added to each format's module on sm_90.
const QGEMM: &str = include_str!("qgemm.cu");

/// Page-locked stages for replayed steps' descriptions (`WordsStage`): the step being uploaded and
/// the one before, whose copy may still be queued.
const WORD_STAGES: usize = 2;

/// Rows up to which matmul runs the GEMV kernels (and steps are recorded as CUDA graphs).
pub const DECODE_MAX_ROWS: usize = 16;
/// Warps (strips) of a block of the wgmma prefill kernel (QW_WARPS in qgemm.cu).
const QW_WARPS: usize = 8;
/// Most warps per block of the quantized decode kernel (QG_MAXW in qgemv.cu).
const QG_WARPS: usize = 8;
/// Most weights one quantized decode launch multiplies (QG_PARTS in qgemv.cu).
const QG_PARTS: usize = 3;
/// Ring stages of the one-row decode kernel's deep build (`_1d`, QDEEP1 in qgemv.cu), for
/// launches of at most two blocks an SM. H100, int4 g128 at m = 1 (twentieth session):
/// 4096 x 14336 14.6 -> 12.5 us (72 -> 85% of copy), 4096^2 5.6 -> 5.6; llama3-8b int4 decode at
/// a 512-token prompt 438.9-440.1 -> 444.3-445.6 tok/s (three alternations in one call). 6 stages:
/// 4096 x 14336 21.0 us, decode 418-420.
const QG_DEEP_STAGES: usize = 8;
/// The format whose decode of 1-4 rows multiplies integer codes of the activations (`QIACT` in
/// qgemv.cu), at groups of whole chunks (and of 1-2 rows at groups of half a chunk).
const INT_ACTIVATIONS: QuantFormat = QuantFormat::Int {
    bits: 4,
    asym: false,
};
/// Rows up to which its decode takes the integer-activation builds (and `int_codes` holds).
const INT_ACTIVATION_ROWS: usize = 4;
/// Ring stages of the four-strip decode builds (QQUAD in qgemv.cu).
const QG_QUAD_STAGES: usize = 4;
/// Warps of the quantized decode kernel wanted per SM: what fits (3 blocks of 8 warps at its ~80
/// registers a thread; 4 for the one-row `w` build of launches with many strips), so a launch is
/// about one full wave. Measured on an H200 (int4 g32, m=1):
/// 24 against 32 (1.3 waves) takes 4096×4096 from 10.2 to 6.9 µs and 4096×14336 from 21.8 to
/// 17.1 µs, and llama3-8b decode from 274 to 292 tok/s; 16, 48 and 64 were no better.
const QG_WARPS_PER_SM: usize = 24;
/// Bytes of cuBLAS's workspace (what NVIDIA advises for Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;
/// Elements of the bf16 scratch a non-bf16 weight is expanded into for cuBLAS (64 MiB).
const SCRATCH_ELEMS: usize = 1 << 25;
const ATT_THREADS: u32 = 128;
const ATT_CHUNK: u32 = 512;
/// Warps (16 tokens each) of a block and keys a tile of the tensor-core prefill attention
/// (APF_WARPS, APF_KEYS in attention.cu).
const APF_WARPS: usize = 4;
const APF_KEYS: usize = 32;
/// attention_decode: threads, most query heads per block (attention_decode_g1 .. g8) and most
/// keys per block (attention.cu).
const DEC_THREADS: u32 = 128;
const DEC_MAXG: usize = 8;
const DEC_CHUNK: usize = 256;
/// Fewest keys per attention_decode block: below, the per-block fixed work (q load, reductions)
/// outweighs the K/V reads.
const DEC_MIN_CHUNK: usize = 32;
/// attention_decode blocks wanted per SM: a block has only 4 warps, and its loads are latency-
/// bound, so several blocks per SM keep memory busy.
const DEC_BLOCKS_PER_SM: usize = 4;
/// Steps whose keys and values (at most the key bucket's per token) take at most this many bytes
/// run attention_decode with one query head per block, DEC_BLOCKS_PER_SM_ONE_HEAD blocks per SM.
/// A block is a chain of dependent steps (~2000 instructions a warp at ~8 cycles each with
/// four heads, H100 Nsight Compute); one head a block cuts the chain and gives each SM more
/// warps to interleave, at the cost of reading K/V once per head, from the L2 while it fits.
/// End to end on the H100 (llama3-8b int4, 512-token prompt, one call): 326-328 tok/s with
/// four heads a block, 346-359 with one head and 8 blocks per SM (344-345 with two and 4).
/// Since the splits combine in attention_decode's last block (sixth session), 16 blocks per SM:
/// the same chunks at a 512-token context (the chunk floor, DEC_MIN_CHUNK), half as long ones
/// at 2048 (64 keys, not 128): H100, one call, 340.1 / 339.6 -> 363.1 / 365.3 tok/s at a
/// 2048-token prompt (H200: 16-key chunks at 512 measured the same as 32); a floor of 64, 128
/// or 256 keys at 512 cost 4%, 11% and 18% (H100).
const DEC_ONE_HEAD_BYTES: usize = 32 << 20;
const DEC_BLOCKS_PER_SM_ONE_HEAD: usize = 16;
/// Keys up to which one block of DEC_WHOLE_THREADS takes a head whole (attention_*_w1), with no
/// splits to combine. Llama3-8b int4 decode on the H100 at a 128-token prompt (a 256-key
/// bucket): 442.5 / 442.4 against 433.3 / 429.5 tok/s (445.0 against 433.6 in another call); at
/// 512 tokens 401-405 against 430-433 and at 900 386 against 415: past a few hundred keys one
/// SM's share of the L2's bandwidth (each block reads all of its head's keys and values) costs
/// more than the splits' combine (seventeenth session).
/// At most DEC_CHUNK: the kernel's chunk is then the whole bucket.
const DEC_WHOLE_MAX_KEYS: usize = 256;
const DEC_WHOLE_THREADS: u32 = 1024;
/// attention_tc_*: warps of a block (DTC_WARPS in attention.cu), tiles of each warp's ring
/// (DTC_STAGES) and the fewest tokens of a step that take it. H200, llama3-8b int4 decode at a
/// 512-token prompt, tok/s against attention_decode in the same call (thirtieth session): batch 16
/// 3965-3969 -> 4830-4832, batch 8 2966-2967 -> 3085. Since the step's keys go straight into the
/// tiles, the next tile's slot is looked up ahead and the splits combine a warp a head
/// (thirty-first session): batch 2 892 -> 929, 4 1669 -> 1782, 8 3082 -> 3268, 16 4832 -> 5081;
/// at batch 1 500 against 512 (one tile a block: three of its four warps idle), so one token
/// stays on attention_decode. A ring of two tiles a warp at one block an SM, each sequence's keys
/// split evenly (thirty-second session, same call): batch 2 931 -> 956, 4 1782 -> 1822, 8 3264
/// -> 3372, 16 5064 -> 5192; three tiles a warp 5134 at 16 (the next GEMV's early blocks find
/// less room), twice the splits (two waves) 3158 at 8. Long chunks copying whole rows an
/// instruction: batch 16 5198 -> 5479, 8 even. Before the ring: one tile a warp at two
/// blocks an SM, chunks cut from the key bucket; one block an SM then lost (4628 against 4832 at
/// batch 16), as did three blocks at 168 registers (4843 against 5078), more splits than fit
/// (4805-4863 against 5079), Q's fragments read from shared memory each tile (4711), the values
/// waited for only after the scores (4798), and an acquire-release fence in place of
/// `__threadfence` around the split counter (even).
const DTC_WARPS: usize = 4;
/// Tiles of each warp's ring (DTC_STAGES in attention.cu).
const DTC_STAGES: usize = 2;
const DTC_MIN_TOKENS: usize = 2;
/// Threads of an argmax_rows block (ARGMAX_THREADS in ops.cu).
const ARGMAX_THREADS: u32 = 1024;
/// 16-byte words of a row each thread of the vector norms holds (NORM_V in ops.cu).
const NORM_V: usize = 4;

/// Queues kernel `$name` on the backend's stream with the given arguments (device pointers as
/// u64, sizes as i32/u32, floats as f32, or one `DeviceRepr` struct), as a programmatic dependent
/// launch on sm_90 (`CudaBackend::launch`).
macro_rules! launch {
    ($self:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let mut params: Vec<*mut std::ffi::c_void> = Vec::new();
        // Each argument lives in its own binding (shadowed, not dropped) until the launch.
        $( let a = $arg; params.push(param(&a)); )+
        $self.launch($name, $cfg, &mut params, true)?;
    }};
}

/// A kernel parameter's address, as cuLaunchKernelEx takes it.
fn param<T: DeviceRepr>(a: &T) -> *mut std::ffi::c_void {
    a as *const T as *mut std::ffi::c_void
}

fn dev(e: impl std::fmt::Debug) -> KernelError {
    KernelError::Device {
        backend: "cuda".into(),
        message: format!("{e:?}"),
    }
}

/// bf16 activations (or small vectors: norm weights, the rotary table) on the device.
pub struct Buffer {
    data: CudaSlice<u16>,
    ptr: u64,
    len: usize,
}

impl Buffer {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A dense weight in its upload format, row-major.
pub struct DenseWeight {
    format: DenseFormat,
    rows: usize,
    cols: usize,
    data: CudaSlice<u8>,
    ptr: u64,
}

/// A packed weight in the decode kernel's layout.
pub struct QuantWeight {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    group: usize,
    groups: usize,
    strips: usize,
    chunks: usize,
    codes: CudaSlice<u32>,
    scales: CudaSlice<u32>,
    offsets: Option<CudaSlice<u32>>,
    /// int3's third bits (see `quant.rs`).
    planes: Option<CudaSlice<u32>>,
    /// nvfp4's tensor scale (1 otherwise).
    tensor_scale: f32,
    /// E2M1 formats: the shift of the scales the decode kernel multiplies per weight (`e2m1_fold`).
    fold: i32,
    /// Act-order: the stored columns' input columns, and a hash of them (weights with the same
    /// permutation share one reordering of their input).
    perm: Option<(CudaSlice<u32>, u64)>,
}

impl QuantWeight {
    /// k-tiles of 16 columns per 16-byte word (a chunk).
    fn tile_span(&self) -> usize {
        quant::tile_span(self.format)
    }

    /// Rows up to which this weight runs the decode kernel, in blocks of 16 rows (batched
    /// decode); above, it is expanded to bf16 for cuBLAS. Each block of rows costs about what 16
    /// rows do (the kernel is bound by its instructions and the activations' reads, not by the
    /// weights, which the blocks of a strip share through the L2). H100, 8192 × 8192, the decode
    /// kernel at 64 rows against the expansion (twelfth session, two strips a block above 8
    /// rows): int4 g128 55.5 against 142.4 µs at 128 rows (nvfp4 69.5 / 140.2, int4-asym 67.8 /
    /// 142.1), so 4-bit weights to 128 rows; int8 and fp8 at 32 rows 42.6-51.4 µs against 132 at
    /// 64, asymmetric int3 / int2 64-70 against 171-173, so 64 rows for the rest (symmetric int3
    /// at 64 rows 105.5, about 210 at 128 against 172.5).
    fn max_decode_rows(&self) -> usize {
        max_decode_rows(self.format)
    }

    fn perm_key(&self) -> Option<u64> {
        self.perm.as_ref().map(|p| p.1)
    }

    /// ceil(2^32 / group): the decode kernel divides a column by the group with a multiply-high,
    /// exact while column × group < 2^32 (checked at upload). 0 with one group per row.
    fn group_mul(&self) -> u32 {
        if self.groups == 1 {
            0
        } else {
            (1u64 << 32).div_ceil(self.group as u64) as u32
        }
    }

    /// Whether the decode kernel scales after the mma: groups that span whole chunks (fewer
    /// operations per weight); 16- and 32-column int4 groups scale each weight.
    fn post(&self) -> bool {
        self.groups == 1 || self.group.is_multiple_of(16 * self.tile_span())
    }

    /// Groups of half a chunk (int4 g32): two scales a chunk.
    fn half_chunk_groups(&self) -> bool {
        self.groups > 1 && 2 * self.group == 16 * self.tile_span()
    }

    /// Whether rows of activations at `x` are whole chunks, 16-byte aligned (the decode builds
    /// that take the activations through the copy ring, `DecodeShape::whole`).
    fn whole_rows(&self, x: u64) -> bool {
        self.cols.is_multiple_of(16 * self.tile_span()) && x.is_multiple_of(16)
    }

    /// (warps per block, splits of each block's chunks, chunks per block) of the decode kernel:
    /// enough warps in flight to cover the memory latency (about 32 per SM), splitting the chunks
    /// over several blocks (split-K) only when the strips alone fall short, and never below 4
    /// chunks a warp. Of a launch of `blocks` blocks (of one, two or four strips, see
    /// `qgemv_stored`) of `warps` warps and `chunks` chunks.
    ///
    /// At most two splits: the splits add their sums into the workspace with atomics, in the
    /// order they finish, and two sums added to zero give the same bits in either order, three
    /// need not (a replayed decode step must repeat its direct run bit for bit). More splits come
    /// only from a few strips with long rows (a k or v projection of 4096 columns on its own);
    /// the kernel sweep's shapes and the synthetic llama3-8b, qwen3-4b and smollm2 split at most
    /// in two.
    fn plan(blocks: usize, warps: usize, chunks: usize, sms: usize) -> (usize, usize, usize) {
        let want = sms * QG_WARPS_PER_SM / (blocks * warps);
        let ksplit = want.min(chunks / (4 * warps)).clamp(1, 2);
        let cpb = chunks.div_ceil(ksplit);
        (warps, chunks.div_ceil(cpb), cpb)
    }
}

pub enum Weight {
    Dense(DenseWeight),
    Quant(Box<QuantWeight>),
}

impl Weight {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Weight::Dense(w) => (w.rows, w.cols),
            Weight::Quant(w) => (w.rows, w.cols),
        }
    }

    /// Bytes the weight occupies on the device (what a decode matmul streams).
    pub fn device_bytes(&self) -> usize {
        match self {
            Weight::Dense(w) => w.data.len(),
            Weight::Quant(w) => {
                let extra = |o: &Option<CudaSlice<u32>>| o.as_ref().map_or(0, |o| o.len());
                4 * (w.codes.len() + w.scales.len() + extra(&w.offsets) + extra(&w.planes))
            }
        }
    }
}

/// One layer's paged keys and values, each `slots x kv_heads x head_dim` bf16.
pub struct KvCache {
    layout: KvLayout,
    _k: CudaSlice<u16>,
    _v: CudaSlice<u16>,
    kp: u64,
    vp: u64,
}

/// The step for the device: one u32 array holding tokens, positions, slots, each token's block
/// table offset and the logit rows (n each, the last `logit_rows.len()`), then the block tables.
/// It is uploaded at the first op that reads it; a replayed step copies it into its recording's
/// buffer instead.
pub struct Step {
    batch: StepBatch,
    words: Vec<u32>,
    /// The keys decode attention is sized for: the longest context rounded up to a power of two,
    /// so that the steps of one bucket share launch shapes (and a recording).
    key_bucket: usize,
    /// Device address of `words`, with the buffer when the step owns it.
    dev: OnceLock<(Option<CudaSlice<u32>>, u64)>,
}

impl Step {
    fn base(&self, b: &CudaBackend) -> Result<u64> {
        if let Some((_, p)) = self.dev.get() {
            return Ok(*p);
        }
        let data = b.stream.clone_htod(&self.words).map_err(dev)?;
        let p = b.ptr(&data);
        let _ = self.dev.set((Some(data), p));
        Ok(p)
    }
    fn at(&self, b: &CudaBackend, field: usize) -> Result<u64> {
        Ok(self.base(b)? + 4 * (field * self.batch.num_tokens()) as u64)
    }
    fn positions(&self, b: &CudaBackend) -> Result<u64> {
        self.at(b, 1)
    }
    fn slots(&self, b: &CudaBackend) -> Result<u64> {
        self.at(b, 2)
    }
    fn table_offsets(&self, b: &CudaBackend) -> Result<u64> {
        self.at(b, 3)
    }
    /// Each token's sequence's first position in the step (its keys from there on are the step's).
    fn first_positions(&self, b: &CudaBackend) -> Result<u64> {
        self.at(b, 4)
    }
    fn logit_rows(&self, b: &CudaBackend) -> Result<u64> {
        self.at(b, 5)
    }
    fn tables(&self, b: &CudaBackend) -> Result<u64> {
        Ok(self.at(b, 5)? + 4 * self.batch.logit_rows.len() as u64)
    }
}

/// For E2M1 codes (fp4, mxfp4, nvfp4) scaled per weight, the decode kernel multiplies the codes'
/// bits (the value times 2^-126) by the scale times 2^(126 - fold) and its sums by 2^fold: the
/// smallest fold >= 0 that keeps the largest scale times 2^(126 - fold) below 2^127 (bf16 would
/// overflow), 0 for weights whose scales are below 2 (every real checkpoint's). 0 for others.
fn e2m1_fold(t: &QuantTensor) -> i32 {
    if !matches!(
        t.format,
        QuantFormat::Fp4 | QuantFormat::Mxfp4 | QuantFormat::Nvfp4
    ) {
        return 0;
    }
    let groups = t.groups_per_row();
    let largest = (0..t.rows)
        .into_par_iter()
        .map(|r| {
            (0..groups)
                .map(|g| t.group_scale(r, g).abs())
                .filter(|s| s.is_finite())
                .fold(0.0f32, f32::max)
        })
        .reduce(|| 0.0, f32::max);
    if largest < 2.0 {
        0
    } else {
        (largest.log2().floor() as i32).clamp(0, 252)
    }
}

/// Whether attention over `tokens` new tokens with heads of `head_dim` takes attention_decode
/// (split along the keys) rather than the one-block-per-head kernel.
fn decodes(tokens: usize, head_dim: usize) -> bool {
    tokens <= DECODE_MAX_ROWS && head_dim.is_power_of_two() && (8..=256).contains(&head_dim)
}

/// rope_write_kv's inputs, for attention_decode to run it in the same launch.
struct RopeInputs<'a> {
    k: &'a Buffer,
    v: &'a Buffer,
    table: &'a Buffer,
}

/// What is known of the decode steps of one shape (tokens, logit rows, key bucket).
enum Recording {
    /// Ran once, not recorded: a shape that comes once is not worth a recording.
    Seen,
    /// Recording failed (an op that cannot be captured): always run directly.
    Failed,
    /// The step as a CUDA graph, and the step description its kernels read.
    Ready {
        graph: CudaGraph,
        inputs: CudaSlice<u32>,
    },
}

/// Greedy ids on their way to the host (`Backend::queue_argmax_rows`).
#[derive(Default)]
struct GreedyIds {
    /// Where the argmax kernel writes the latest ids, which a `tokens_from_argmax` step's
    /// embedding reads as its tokens. Grown on demand, dropping the recordings (they point at it).
    device: Option<CudaSlice<u32>>,
    /// Rows and row length of the latest argmax.
    latest_rows: usize,
    latest_dim: usize,
    /// Page-locked copies of the ids, one per result that may wait, used in turn; mapped into the
    /// device's address space, where the argmax kernel writes them (no copy queued after it).
    stage: Vec<(PinnedHostSlice<u32>, u64)>,
    next_stage: usize,
    /// Results not yet taken: stage, rows, and the event that follows the kernel writing them.
    pending: VecDeque<(usize, usize, CudaEvent)>,
}

/// Page-locked copies of replayed steps' descriptions, used in turn, each with the event that
/// follows its upload. A copy from pageable memory may wait for the stream (the driver stages
/// it), which would hold the host until the step before finished instead of queueing behind it.
#[derive(Default)]
struct WordsStage {
    buffers: Vec<(PinnedHostSlice<u32>, CudaEvent)>,
    next: usize,
}

/// The recorded steps of one caller's buffers and weights (`Backend::queue_step`'s key).
#[derive(Default)]
struct Graphs {
    owner: Vec<u64>,
    steps: HashMap<(usize, usize, usize, bool), Recording>,
}

// SAFETY: the graphs are used only under the backend's mutex, so from one thread at a time.
unsafe impl Send for Graphs {}

/// One weight of a quantized decode launch (QgPart in qgemv.cu).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct QgPart {
    codes: u64,
    scales: u64,
    offsets: u64,
    planes: u64,
    out: u64,
    gmul: u32,
    tensor_scale: f32,
    n: i32,
    groups: i32,
    strip0: i32,
    fold: i32,
}

/// The arguments of a quantized decode launch (QgArgs in qgemv.cu).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct QgArgs {
    p: [QgPart; QG_PARTS],
    x: u64,
    xd: u64,
    ws: u64,
    counters: u64,
    parts: i32,
    m: i32,
    k: i32,
    chunks: i32,
    cpb: i32,
    wstride: i32,
    row_blocks: i32,
}

// SAFETY: plain old data laid out as the kernel's struct (repr(C), the same field order and types).
unsafe impl DeviceRepr for QgArgs {}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _blas_workspace: CudaSlice<u8>,
    funcs: HashMap<String, CudaFunction>,
    scratch: Mutex<Option<CudaSlice<u16>>>,
    /// attention_decode's per-split partial outputs and its counters of finished splits, one per
    /// (token x kv head, slice), zero between launches (the block that combines a head's splits
    /// restores its counter); grown on demand.
    att_part: Mutex<Option<(CudaSlice<f32>, CudaSlice<u32>)>>,
    /// The split-K workspace of the quantized decode kernel: f32 sums (16 rows x the widest
    /// quantized weight) and one counter per strip, zero between calls (the kernel's last block
    /// restores them). Grown when a weight is uploaded, so matmuls never allocate.
    splitk: Mutex<Option<(CudaSlice<f32>, CudaSlice<u32>)>>,
    /// Activations reordered for act-order weights (`with_stored_order`); sized for decode when
    /// such a weight is uploaded, grown by prefill.
    permuted: Mutex<Option<CudaSlice<u16>>>,
    /// Up to INT_ACTIVATION_ROWS rows of activations as integer codes, then their chunks' scales
    /// (`quantize_x_codes`); sized for that many rows of the widest int4 weight uploaded.
    int_codes: Mutex<Option<CudaSlice<u16>>>,
    graphs: Mutex<Graphs>,
    /// Page-locked host memory that `read` copies into (grown on demand): a copy into pageable
    /// memory goes through the driver's staging buffers, and a decode step reads its logits
    /// (256 KiB for a 128k vocabulary) with the GPU idle until the next step is queued.
    read_stage: Mutex<Option<PinnedHostSlice<u16>>>,
    greedy: Mutex<GreedyIds>,
    words_stage: Mutex<WordsStage>,
    graphs_on: AtomicBool,
    /// Prefill on packed weights through the wgmma kernel (sm_90 unless `MARLIN_CUDA_WGMMA=0`)
    /// rather than the expansion for cuBLAS.
    wgmma_on: AtomicBool,
    /// Set while a step is being recorded: the scratch buffers must not be reallocated then.
    capturing: AtomicBool,
    /// Bumped whenever a buffer that recordings point at is reallocated.
    generation: AtomicU64,
    sms: usize,
    /// Shared memory of an SM, bytes: whether two blocks of the deep decode build fit.
    smem_per_sm: usize,
    name: String,
    arch: (i32, i32),
    kernels: KernelLoad,
}

/// How the kernel module was obtained when the backend started.
#[derive(Debug, Clone, Copy)]
pub struct KernelLoad {
    /// Read from `$MARLIN_HOME/kernels` (warm) rather than compiled by NVRTC (cold).
    pub from_cache: bool,
    /// Compiling or reading the CUBIN and loading its functions.
    pub seconds: f64,
}

/// Why no CUDA device can be used here, or `None` if one can.
pub fn unavailable() -> Option<String> {
    // SAFETY: these only try to open the shared libraries.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("no CUDA driver library (libcuda)".into());
    }
    match CudaContext::device_count() {
        Ok(0) => Some("no CUDA device".into()),
        Ok(_) => None,
        Err(e) => Some(format!("CUDA driver: {e:?}")),
    }
}

/// Compiles the kernel module for `sm_{major}{minor}` with NVRTC (through the disk cache); needs
/// the NVRTC library but no device. Returns the CUBIN's size.
pub fn compile_kernels(arch: (i32, i32)) -> Result<usize> {
    // SAFETY: only asks whether the library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(dev("no NVRTC library (libnvrtc)"));
    }
    Ok(compile_modules(arch)?.iter().map(|m| m.0.len()).sum())
}

impl CudaBackend {
    /// A backend on device `ordinal`; compiles (or loads from the cache) the kernels.
    pub fn new(ordinal: usize) -> Result<Self> {
        if let Some(why) = unavailable() {
            return Err(dev(why));
        }
        // SAFETY: only asks whether the libraries can be opened.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(dev("no NVRTC library (libnvrtc) to compile kernels"));
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(dev("no cuBLAS library (libcublas)"));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev)?;
        // One stream: ordering is the stream's, so the per-slice event tracking is not needed.
        // SAFETY: done before any allocation; all work goes to `stream`.
        unsafe { ctx.disable_event_tracking() };
        let arch = ctx.compute_capability().map_err(dev)?;
        if arch.0 < 8 {
            return Err(dev(format!(
                "compute capability {}.{}: the kernels need 8.0 or newer (bf16 tensor cores)",
                arch.0, arch.1
            )));
        }
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(dev)? as usize;
        let smem_per_sm = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            )
            .map_err(dev)? as usize;
        let stream = ctx.new_stream().map_err(dev)?;
        let blas = CudaBlas::new(stream.clone()).map_err(dev)?;
        // A workspace of cuBLAS's own, set once: without it cuBLAS allocates on first use of a
        // shape, which a step being recorded as a CUDA graph cannot do (bf16 decode of 3-16 rows).
        let blas_workspace = stream.alloc_zeros::<u8>(BLAS_WORKSPACE).map_err(dev)?;
        // SAFETY: the handle is live and the workspace is a device allocation of that many bytes
        // that the backend keeps as long as the handle.
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                blas_workspace.device_ptr(&stream).0 as *mut _,
                BLAS_WORKSPACE,
            )
        }
        .result()
        .map_err(dev)?;
        // 4 MiB from the start (one token of 32 heads of 128 over 250 splits), so that growing it
        // rarely drops the recorded steps.
        let att_part = (
            stream.alloc_zeros::<f32>(1 << 20).map_err(dev)?,
            stream.alloc_zeros::<u32>(1 << 12).map_err(dev)?,
        );
        let started = std::time::Instant::now();
        let mut funcs = HashMap::new();
        let mut from_cache = true;
        for ((cubin, cached), (_, names)) in compile_modules(arch)?.into_iter().zip(modules(arch)) {
            from_cache &= cached;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                .map_err(dev)?;
            for name in names {
                let f = module.load_function(&name).map_err(dev)?;
                let big_smem = qgemm_shape(&name)
                    .map(|(format, bn)| qgemm_smem(format, bn))
                    .or_else(|| {
                        granted_ring(&name, smem_per_sm).map(|(f, b)| qgemv_ring_smem(f, b))
                    })
                    .or_else(|| {
                        name.strip_prefix("attention_prefill_")
                            .and_then(|hd| prefill_attention_smem(hd.parse().ok()?))
                    })
                    .or_else(|| {
                        name.strip_prefix("attention_tc_")
                            .and_then(|kind| decode_tc_smem(kind.rsplit('_').next()?.parse().ok()?))
                    });
                if let Some(bytes) = big_smem {
                    f.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        bytes as i32,
                    )
                    .map_err(dev)?;
                }
                funcs.insert(name, f);
            }
        }
        let kernels = KernelLoad {
            from_cache,
            seconds: started.elapsed().as_secs_f64(),
        };
        let name = format!(
            "cuda:{ordinal} ({}, sm_{}{})",
            ctx.name().map_err(dev)?,
            arch.0,
            arch.1
        );
        Ok(Self {
            ctx,
            stream,
            blas,
            _blas_workspace: blas_workspace,
            funcs,
            scratch: Mutex::new(None),
            att_part: Mutex::new(Some(att_part)),
            splitk: Mutex::new(None),
            permuted: Mutex::new(None),
            int_codes: Mutex::new(None),
            graphs: Mutex::new(Graphs::default()),
            read_stage: Mutex::new(None),
            greedy: Mutex::default(),
            words_stage: Mutex::default(),
            graphs_on: AtomicBool::new(
                std::env::var("MARLIN_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            ),
            wgmma_on: AtomicBool::new(
                has_wgmma(arch) && std::env::var("MARLIN_CUDA_WGMMA").map_or(true, |v| v != "0"),
            ),
            capturing: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            sms,
            smem_per_sm,
            name,
            arch,
            kernels,
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// (major, minor) compute capability.
    pub fn arch(&self) -> (i32, i32) {
        self.arch
    }

    /// Whether prefill on packed weights runs the wgmma kernel (rather than the expansion).
    pub fn wgmma(&self) -> bool {
        self.wgmma_on.load(Ordering::SeqCst)
    }

    /// Prefill on packed weights through the wgmma kernel (where the GPU has it: sm_90) or
    /// through the expansion to bf16 for cuBLAS.
    pub fn set_wgmma(&self, on: bool) {
        self.wgmma_on
            .store(on && has_wgmma(self.arch), Ordering::SeqCst);
    }

    /// How the kernels were obtained at start-up (NVRTC compile or the disk cache).
    pub fn kernel_load(&self) -> KernelLoad {
        self.kernels
    }

    /// Device-to-device copy bandwidth in GB/s (bytes read plus bytes written) of the plain
    /// 16-byte copy kernel over `bytes`: the 100% line of memory-bound figures. Median of 5 timed
    /// runs of 4 copies each, after one untimed copy, with device events.
    pub fn copy_bandwidth(&self, bytes: usize) -> Result<f64> {
        use cudarc::driver::sys::CUevent_flags;
        let bytes = bytes / 16 * 16;
        let src = self.stream.alloc_zeros::<u8>(bytes).map_err(dev)?;
        let mut dst = self.stream.alloc_zeros::<u8>(bytes).map_err(dev)?;
        let event = || {
            self.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(dev)
        };
        let (start, stop) = (event()?, event()?);
        self.copy_kernel(&src, &mut dst, bytes)?;
        let mut runs = Vec::new();
        for _ in 0..5 {
            start.record(&self.stream).map_err(dev)?;
            for _ in 0..4 {
                self.copy_kernel(&src, &mut dst, bytes)?;
            }
            stop.record(&self.stream).map_err(dev)?;
            stop.synchronize().map_err(dev)?;
            let ms = start.elapsed_ms(&stop).map_err(dev)? as f64;
            runs.push(2.0 * 4.0 * bytes as f64 / (ms * 1e-3) / 1e9);
        }
        runs.sort_by(f64::total_cmp);
        Ok(runs[2])
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev)
    }

    /// Copies a replayed step's description to `dst` through the page-locked stages.
    fn upload_words(&self, words: &[u32], dst: u64) -> Result<()> {
        let mut stage = self.words_stage.lock().unwrap();
        let i = stage.next;
        stage.next = (i + 1) % WORD_STAGES;
        if stage.buffers.len() < WORD_STAGES {
            let fresh = (0..WORD_STAGES).map(|_| {
                // SAFETY: a stage is written by the host before it is copied from.
                let host = unsafe { self.ctx.alloc_pinned_with_flags::<u32>(words.len(), 0) }?;
                Ok::<_, cudarc::driver::DriverError>((host, self.ctx.new_event(None)?))
            });
            stage.buffers = fresh.collect::<std::result::Result<_, _>>().map_err(dev)?;
        }
        let (host, uploaded) = &mut stage.buffers[i];
        // The stage's last upload must be done before the host writes it again.
        uploaded.synchronize().map_err(dev)?;
        if host.len() < words.len() {
            // SAFETY: as above.
            *host = unsafe { self.ctx.alloc_pinned_with_flags::<u32>(2 * words.len(), 0) }
                .map_err(dev)?;
        }
        let host = &mut host.as_mut_slice().map_err(dev)?[..words.len()];
        host.copy_from_slice(words);
        self.ctx.bind_to_thread().map_err(dev)?;
        // SAFETY: `dst` holds at least `words.len()` words (the recording's buffer), and the
        // stage is not written again before the event recorded after the copy.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, host, self.stream.cu_stream()) }
            .map_err(dev)?;
        uploaded.record(&self.stream).map_err(dev)
    }

    /// The device address of the latest greedy ids, for a `tokens_from_argmax` step of `n` tokens,
    /// and the row length they index (the vocabulary they were chosen from).
    fn argmax_ids(&self, n: usize) -> Result<(u64, usize)> {
        let greedy = self.greedy.lock().unwrap();
        match &greedy.device {
            Some(ids) if greedy.latest_rows == n => Ok((self.ptr(ids), greedy.latest_dim)),
            _ => Err(KernelError::Shape(format!(
                "step: {n} tokens from the latest argmax of {} rows",
                greedy.latest_rows
            ))),
        }
    }

    /// Turns the recording and replay of decode steps as CUDA graphs on or off (on unless
    /// `MARLIN_CUDA_GRAPHS=0`); off drops the recordings.
    pub fn set_graphs(&self, on: bool) -> Result<()> {
        self.graphs_on.store(on, Ordering::SeqCst);
        if !on {
            self.drop_recordings()?;
        }
        Ok(())
    }

    /// How many step shapes are recorded (and replayed when they come again).
    pub fn recorded_steps(&self) -> usize {
        let graphs = self.graphs.lock().unwrap();
        graphs
            .steps
            .values()
            .filter(|r| matches!(r, Recording::Ready { .. }))
            .count()
    }

    /// Forgets every recorded step, after the device has finished with them.
    fn drop_recordings(&self) -> Result<()> {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut graphs = self.graphs.lock().unwrap();
        if !graphs.steps.is_empty() {
            self.stream.synchronize().map_err(dev)?;
            graphs.steps.clear();
        }
        Ok(())
    }

    /// Before a scratch buffer is reallocated: recordings point at the old one.
    fn before_realloc(&self) -> Result<()> {
        if self.capturing.load(Ordering::SeqCst) {
            return Err(dev(
                "a scratch buffer would be reallocated while recording a step",
            ));
        }
        self.drop_recordings()
    }

    /// Page-locked host memory of `len` ids that kernels can write (mapped into the device's
    /// address space), and its device address. Not write-combined: the host reads it.
    fn alloc_mapped_ids(&self, len: usize) -> Result<(PinnedHostSlice<u32>, u64)> {
        use cudarc::driver::sys;
        // SAFETY: the memory is written by a kernel before the host reads it.
        let mut host = unsafe {
            self.ctx
                .alloc_pinned_with_flags::<u32>(len, sys::CU_MEMHOSTALLOC_DEVICEMAP)
        }
        .map_err(dev)?;
        let mut at: sys::CUdeviceptr = 0;
        // SAFETY: `host` is a live allocation made with CU_MEMHOSTALLOC_DEVICEMAP.
        unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut at, host.as_mut_ptr().map_err(dev)?.cast(), 0)
        }
        .result()
        .map_err(dev)?;
        Ok((host, at))
    }

    fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| dev(format!("kernel {name} missing from the module")))
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        // Event tracking is off, so the guard does nothing.
        s.device_ptr(&self.stream).0
    }

    /// A buffer of bf16 values (rounded to nearest even).
    pub fn upload_bf16(&self, values: &[f32]) -> Result<Buffer> {
        let mut b = self.alloc(values.len().max(1))?;
        self.write(&mut b, values)?;
        Ok(b)
    }

    /// Uploads a packed tensor in the tensor-core decode layout (see `quant::supported` for the
    /// one exception, dequantized to bf16).
    pub fn upload_quant(&self, t: &QuantTensor) -> Result<Weight> {
        t.validate()
            .map_err(|e| KernelError::Shape(format!("upload_weight: {e}")))?;
        // The decode kernel's group division (see `QuantWeight::group_mul`) is exact below 2^32.
        let divisible = t.groups_per_row() == 1 || (t.cols as u64) * (t.group as u64) < 1 << 32;
        if !quant::supported(t) || !divisible {
            let values = t.dequantize();
            let w = HostWeight::from_f32(DenseFormat::BF16, t.rows, t.cols, &values)
                .map_err(|e| KernelError::Shape(format!("upload_weight: {e}")))?;
            return self.upload_dense(&w);
        }
        let r = quant::relay(t);
        let s = &self.stream;
        if t.format == INT_ACTIVATIONS {
            self.grow_scratch(
                &mut self.int_codes.lock().unwrap(),
                INT_ACTIVATION_ROWS * int_codes_len(t.cols),
            )?;
        }
        {
            let mut guard = self.splitk.lock().unwrap();
            let (sums, counters) = (DECODE_MAX_ROWS * r.strips * 16, r.strips);
            if guard
                .as_ref()
                .is_none_or(|(w, c)| w.len() < sums || c.len() < counters)
            {
                let (w0, c0) = guard.as_ref().map_or((0, 0), |(w, c)| (w.len(), c.len()));
                self.before_realloc()?;
                *guard = None;
                *guard = Some((
                    s.alloc_zeros::<f32>(sums.max(w0)).map_err(dev)?,
                    s.alloc_zeros::<u32>(counters.max(c0)).map_err(dev)?,
                ));
            }
        }
        let perm = match &t.perm {
            Some(p) => {
                self.grow_scratch(&mut self.permuted.lock().unwrap(), DECODE_MAX_ROWS * t.cols)?;
                let key = p.iter().fold(0xcbf29ce484222325u64, |h, &v| {
                    (h ^ u64::from(v)).wrapping_mul(0x100000001b3)
                });
                Some((s.clone_htod(p).map_err(dev)?, key))
            }
            None => None,
        };
        let upload = |v: &Option<Vec<u32>>| -> Result<Option<CudaSlice<u32>>> {
            v.as_ref().map(|v| s.clone_htod(v).map_err(dev)).transpose()
        };
        Ok(Weight::Quant(Box::new(QuantWeight {
            format: t.format,
            rows: t.rows,
            cols: t.cols,
            group: t.group,
            groups: r.groups,
            strips: r.strips,
            chunks: r.chunks,
            codes: s.clone_htod(&r.words).map_err(dev)?,
            scales: s.clone_htod(&r.scales).map_err(dev)?,
            offsets: upload(&r.offsets)?,
            planes: upload(&r.planes)?,
            tensor_scale: t.tensor_scale.unwrap_or(1.0),
            fold: e2m1_fold(t),
            perm,
        })))
    }

    fn upload_dense(&self, weight: &HostWeight) -> Result<Weight> {
        let (rows, cols) = (weight.rows, weight.cols);
        let (format, bytes) = match &weight.data {
            WeightData::Dense { format, bytes } => (*format, bytes),
            WeightData::Quant(t) => {
                check(t.rows == rows && t.cols == cols, "upload_weight", || {
                    format!("{rows}x{cols} weight holds a {}x{} tensor", t.rows, t.cols)
                })?;
                return self.upload_quant(t);
            }
        };
        let expected = rows * cols * format.bytes_per_element();
        check(bytes.len() == expected, "upload_weight", || {
            format!(
                "{rows}x{cols} {format} weight needs {expected} bytes, has {}",
                bytes.len()
            )
        })?;
        let data = self.stream.clone_htod(bytes).map_err(dev)?;
        let ptr = self.ptr(&data);
        Ok(Weight::Dense(DenseWeight {
            format,
            rows,
            cols,
            data,
            ptr,
        }))
    }

    /// A second device copy of a weight (benchmarks rotate copies to defeat the L2).
    pub fn duplicate_weight(&self, w: &Weight) -> Result<Weight> {
        let s = &self.stream;
        let copy = |v: &Option<CudaSlice<u32>>| -> Result<Option<CudaSlice<u32>>> {
            v.as_ref().map(|v| s.clone_dtod(v).map_err(dev)).transpose()
        };
        Ok(match w {
            Weight::Dense(d) => {
                let data = s.clone_dtod(&d.data).map_err(dev)?;
                let ptr = self.ptr(&data);
                Weight::Dense(DenseWeight {
                    format: d.format,
                    rows: d.rows,
                    cols: d.cols,
                    data,
                    ptr,
                })
            }
            Weight::Quant(q) => Weight::Quant(Box::new(QuantWeight {
                format: q.format,
                rows: q.rows,
                cols: q.cols,
                group: q.group,
                groups: q.groups,
                strips: q.strips,
                chunks: q.chunks,
                codes: s.clone_dtod(&q.codes).map_err(dev)?,
                scales: s.clone_dtod(&q.scales).map_err(dev)?,
                offsets: copy(&q.offsets)?,
                planes: copy(&q.planes)?,
                tensor_scale: q.tensor_scale,
                fold: q.fold,
                perm: match &q.perm {
                    Some((p, key)) => Some((s.clone_dtod(p).map_err(dev)?, *key)),
                    None => None,
                },
            })),
        })
    }

    /// Device-to-device copy of `bytes` (a multiple of 16) with the plain vector copy kernel.
    pub fn copy_kernel(
        &self,
        src: &CudaSlice<u8>,
        dst: &mut CudaSlice<u8>,
        bytes: usize,
    ) -> Result<()> {
        let n = (bytes / 16) as u64;
        let (s, d) = (self.ptr(src), self.ptr(dst));
        let cfg = grid1((n as usize).min(132 * 64 * 256), 256);
        // A plain launch: the copies of `copy_bandwidth` do not overlap their launch latency.
        self.launch(
            "copy_u4",
            cfg,
            &mut [param(&s), param(&n), param(&d)],
            false,
        )
    }

    /// `out = x · wᵀ` through cuBLAS whatever the row count (bf16 weights only): the baseline of
    /// the matmul benchmarks.
    pub fn matmul_cublas(
        &self,
        x: &Buffer,
        w: &Weight,
        rows: usize,
        out: &mut Buffer,
    ) -> Result<()> {
        match w {
            Weight::Dense(d) if d.format == DenseFormat::BF16 => {
                self.gemm(x.ptr, d.ptr, rows, d.rows, d.cols, d.rows, out.ptr)
            }
            _ => Err(dev("matmul_cublas takes bf16 weights")),
        }
    }

    /// out[rows x ldc] columns 0..n = x[rows x k] · w[n x k]ᵀ, bf16, f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        x: u64,
        w: u64,
        rows: usize,
        n: usize,
        k: usize,
        ldc: usize,
        out: u64,
    ) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.ctx.bind_to_thread().map_err(dev)?;
        // Column-major view: out^T (n x rows) = W (k x n)^T · x^T (k x rows).
        // SAFETY: pointers are device allocations of at least these sizes (checked by callers).
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                x as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const _,
                out as *mut _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                ldc as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(dev)
    }

    #[allow(clippy::too_many_arguments)]
    fn check_rope_write_kv(
        &self,
        q: &Buffer,
        k: &Buffer,
        v: &Buffer,
        cache: &KvCache,
        step: &Step,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        table: &Buffer,
    ) -> Result<()> {
        let layout = cache.layout;
        step.batch.validate(&layout)?;
        let n = step.batch.num_tokens();
        check(
            head_dim.is_multiple_of(2)
                && layout.kv_heads == kv_heads
                && layout.head_dim == head_dim,
            "rope_write_kv",
            || {
                format!(
                    "{kv_heads} kv heads of {head_dim} for a cache of {} of {}",
                    layout.kv_heads, layout.head_dim
                )
            },
        )?;
        len_check("rope_write_kv", "q", q.len, n * heads * head_dim)?;
        len_check("rope_write_kv", "k", k.len, n * kv_heads * head_dim)?;
        len_check("rope_write_kv", "v", v.len, n * kv_heads * head_dim)?;
        let max_pos = step.batch.positions.iter().max().map_or(0, |&p| p as usize);
        len_check(
            "rope_write_kv",
            "table",
            table.len,
            (max_pos + 1) * head_dim,
        )?;
        Ok(())
    }

    fn check_attention(
        &self,
        q: &Buffer,
        cache: &KvCache,
        step: &Step,
        heads: usize,
        out: &Buffer,
    ) -> Result<()> {
        let layout = cache.layout;
        step.batch.validate_attention(&layout, heads)?;
        check(layout.head_dim <= 256, "attention", || {
            format!(
                "head_dim {} (the CUDA kernel takes up to 256)",
                layout.head_dim
            )
        })?;
        let len = step.batch.num_tokens() * heads * layout.head_dim;
        len_check("attention", "q", q.len, len)?;
        len_check("attention", "out", out.len, len)
    }

    /// Attention of a few tokens (decode) split along the keys: enough chunks that the grid
    /// holds about DEC_BLOCKS_PER_SM blocks per SM even for one sequence, then the splits
    /// combined. Sized for the step's key bucket, not its exact context, so that one launch
    /// shape serves (and one recording replays for) every step of the bucket; the blocks past a
    /// sequence's keys return at once. Steps of DTC_MIN_TOKENS or more (head dims 64 and 128)
    /// run on tensor cores (attention_tc_*): a block per (token, kv head, split) takes the whole
    /// GQA group, one block an SM, and the kernel cuts each sequence's own keys into `splits`
    /// chunks of whole 32-key tiles (so `chunk` is not passed).
    ///
    /// With `rope`, the step's keys and values are not in the cache yet: the kernel
    /// (attention_rope_g*, attention_tc_rope_*) ropes q and the step's keys from the
    /// projections itself and stores the keys and values in the cache before reading it
    /// (rope_write_kv in the same launch).
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        q: &Buffer,
        cache: &KvCache,
        step: &Step,
        heads: usize,
        scale: f32,
        rope: Option<RopeInputs>,
        out: &mut Buffer,
    ) -> Result<()> {
        let layout = cache.layout;
        let (n, hd) = (step.batch.num_tokens(), layout.head_dim);
        let group = heads / layout.kv_heads;
        let max_keys = step.key_bucket;
        let (kb, vb, table) = rope
            .as_ref()
            .map_or((0, 0, 0), |r| (r.k.ptr, r.v.ptr, r.table.ptr));
        let what = if rope.is_some() { "rope" } else { "decode" };
        let tensor_cores =
            self.arch.0 >= 8 && matches!(hd, 64 | 128) && group <= 16 && n >= DTC_MIN_TOKENS;
        let (name, chunk, splits, slices, threads, smem) = if tensor_cores {
            // One wave of one block an SM: as many splits of each (token, kv head) as fit.
            let splits = (self.sms / (n * layout.kv_heads)).clamp(1, max_keys.div_ceil(APF_KEYS));
            let smem = decode_tc_smem(hd).expect("head dims 64 and 128");
            let threads = (DTC_WARPS * 32) as u32;
            (
                format!("attention_tc_{what}_{hd}"),
                0,
                splits,
                1,
                threads,
                smem,
            )
        } else {
            // Query heads per block and blocks wanted per SM: while the step's keys and values
            // (at most the bucket's for each token) fit the L2 a few times over, one head per
            // block and 16 blocks per SM (each K/V row read `group` times, the repeats from the
            // L2), else the whole group (up to DEC_MAXG) and 4, each row read from memory once.
            // A function of the step's shape only, as a recording must be.
            let kv_bytes = n * max_keys * layout.kv_heads * hd * 4;
            let (hpb, per_sm) = if kv_bytes <= DEC_ONE_HEAD_BYTES {
                (1, DEC_BLOCKS_PER_SM_ONE_HEAD)
            } else {
                (group.next_power_of_two().min(DEC_MAXG), DEC_BLOCKS_PER_SM)
            };
            let slices = group.div_ceil(hpb);
            let want = (per_sm * self.sms).div_ceil(n * layout.kv_heads * slices);
            // Short contexts, one head a block: a block of DEC_WHOLE_THREADS takes all of a
            // head's keys, with no splits to combine.
            let whole = hpb == 1 && max_keys <= DEC_WHOLE_MAX_KEYS;
            let chunk = if whole {
                max_keys
            } else {
                max_keys
                    .div_ceil(want)
                    .next_multiple_of(32)
                    .clamp(DEC_MIN_CHUNK, DEC_CHUNK)
            };
            let threads = if whole {
                DEC_WHOLE_THREADS
            } else {
                DEC_THREADS
            };
            let splits = max_keys.div_ceil(chunk);
            let smem = ((hpb * (hd + chunk) + chunk) * 4)
                .max(threads as usize / 32 * hpb * hd * 4)
                .max((splits.next_multiple_of(4) + threads as usize / 32 * hd) * 4);
            let name = if whole {
                format!("attention_{what}_w1")
            } else {
                format!("attention_{what}_g{hpb}")
            };
            (name, chunk, splits, slices, threads, smem as u32)
        };
        let (part, counters) = if splits > 1 {
            self.split_scratch(n * heads * splits * (hd + 4), n * layout.kv_heads * slices)?
        } else {
            (0, 0)
        };
        let cfg = LaunchConfig {
            grid_dim: ((n * layout.kv_heads) as u32, splits as u32, slices as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        launch!(
            self,
            &name,
            cfg,
            q.ptr,
            cache.kp,
            cache.vp,
            step.positions(self)?,
            step.first_positions(self)?,
            step.table_offsets(self)?,
            step.tables(self)?,
            heads as i32,
            layout.kv_heads as i32,
            hd as i32,
            layout.block_size as i32,
            scale,
            chunk as i32,
            splits as i32,
            part,
            counters,
            out.ptr,
            kb,
            vb,
            table
        );
        Ok(())
    }

    /// The split-key attention's scratch: `records` floats of partial results and `blocks`
    /// counters of finished splits (zero between launches), grown as needed.
    fn split_scratch(&self, records: usize, blocks: usize) -> Result<(u64, u64)> {
        let mut guard = self.att_part.lock().unwrap();
        if guard
            .as_ref()
            .is_none_or(|(p, c)| p.len() < records || c.len() < blocks)
        {
            let (p0, c0) = guard.as_ref().map_or((0, 0), |(p, c)| (p.len(), c.len()));
            self.before_realloc()?;
            *guard = None;
            *guard = Some((
                self.stream
                    .alloc_zeros::<f32>(records.next_power_of_two().max(p0))
                    .map_err(dev)?,
                self.stream
                    .alloc_zeros::<u32>(blocks.next_power_of_two().max(c0))
                    .map_err(dev)?,
            ));
        }
        let (p, c) = guard.as_ref().unwrap();
        Ok((self.ptr(p), self.ptr(c)))
    }

    /// Grows a scratch buffer (act-order reordering, prefill's expansion or ordering) to `len`
    /// elements, dropping the recorded steps, which point at the old one.
    fn grow_scratch(&self, buffer: &mut Option<CudaSlice<u16>>, len: usize) -> Result<()> {
        if buffer.as_ref().is_none_or(|b| b.len() < len) {
            self.before_realloc()?;
            *buffer = None;
            *buffer = Some(self.stream.alloc_zeros::<u16>(len).map_err(dev)?);
        }
        Ok(())
    }

    /// Runs `f` on `x`, or, for an act-order weight, on x's rows reordered into the weight's
    /// stored column order (in the `permuted` buffer, held while `f` queues its kernels).
    fn with_stored_order(
        &self,
        x: u64,
        q: &QuantWeight,
        rows: usize,
        f: impl FnOnce(u64) -> Result<()>,
    ) -> Result<()> {
        let Some((perm, _)) = &q.perm else {
            return f(x);
        };
        let k = q.cols;
        let mut guard = self.permuted.lock().unwrap();
        self.grow_scratch(&mut guard, rows * k)?;
        let xp = self.ptr(guard.as_ref().unwrap());
        let cfg = cfg2((k.div_ceil(256), rows), 256, 0);
        launch!(self, "permute_cols", cfg, x, self.ptr(perm), k as i32, xp);
        f(xp)
    }

    /// The arguments of a launch of the packed-weight kernels (decode or prefill) of `ws` into
    /// `outs` on x (`rows` rows of `k` columns): each weight's strips begin a block of
    /// `per_block` strips. Also the launch's strips, whole blocks.
    fn quant_args(
        &self,
        x: u64,
        ws: &[&QuantWeight],
        outs: &[u64],
        rows: usize,
        k: usize,
        per_block: usize,
    ) -> (QgArgs, usize) {
        let mut args = QgArgs {
            x,
            parts: ws.len() as i32,
            m: rows as i32,
            k: k as i32,
            chunks: ws[0].chunks as i32,
            ..QgArgs::default()
        };
        let mut strips = 0;
        for (i, (q, &out)) in ws.iter().zip(outs).enumerate() {
            args.p[i] = self.part(q, out, strips);
            strips += q.strips.next_multiple_of(per_block);
        }
        (args, strips)
    }

    /// Weight `q` as a part of a quantized launch whose strips before it number `strip0`.
    fn part(&self, q: &QuantWeight, out: u64, strip0: usize) -> QgPart {
        QgPart {
            codes: self.ptr(&q.codes),
            scales: self.ptr(&q.scales),
            offsets: q.offsets.as_ref().map_or(0, |o| self.ptr(o)),
            planes: q.planes.as_ref().map_or(0, |p| self.ptr(p)),
            out,
            gmul: q.group_mul(),
            tensor_scale: q.tensor_scale,
            n: q.rows as i32,
            groups: q.groups as i32,
            strip0: strip0 as i32,
            fold: q.fold,
        }
    }

    /// Whether `outs[i] = x · ws[i]ᵀ` at `rows` rows runs the wgmma prefill kernel (`qgemm`): on
    /// sm_90, above the decode kernel's rows and up to `qgemm_max_rows`, weights of one format,
    /// width and column order (at most QG_PARTS), x small enough for the kernel's 32-bit offsets.
    fn qgemm_takes(&self, ws: &[&QuantWeight], rows: usize) -> bool {
        let q0 = ws[0];
        let ordered = rows * q0.chunks * 16 * q0.tile_span();
        self.wgmma()
            && ws.len() <= QG_PARTS
            && ws
                .iter()
                .all(|q| (q.format, q.cols, q.perm_key()) == (q0.format, q0.cols, q0.perm_key()))
            && rows > q0.max_decode_rows()
            && rows <= qgemm_max_rows(q0.format)
            && ordered < 1 << 31
    }

    /// Prefill on packed weights with wgmma (`qgemm.cu`, sm_90; see `qgemm_takes`): x put once in
    /// the kernel's chunk order (and an act-order weight's stored column order) in the scratch
    /// buffer, then one launch for all the weights, blocks of 128 features by 128 or 256 rows.
    fn qgemm(&self, x: u64, ws: &[&QuantWeight], rows: usize, outs: &[u64]) -> Result<()> {
        let q0 = ws[0];
        let tag = quant::tag(q0.format);
        let kp = q0.chunks * 16 * q0.tile_span();
        let mut guard = self.scratch.lock().unwrap();
        self.grow_scratch(&mut guard, rows * kp)?;
        let ordered = self.ptr(guard.as_ref().unwrap());
        let perm = q0.perm.as_ref().map_or(0, |(p, _)| self.ptr(p));
        launch!(
            self,
            &format!("qgemm_order_{tag}"),
            cfg2(((kp / 2).div_ceil(256), rows), 256, 0),
            x,
            perm,
            q0.cols as i32,
            kp as i32,
            ordered
        );
        let (args, strips) = self.quant_args(ordered, ws, outs, rows, kp, QW_WARPS);
        // 256 rows a block where those blocks still fill the GPU, else 128.
        let feature_blocks = strips / QW_WARPS;
        let bn = if feature_blocks * rows.div_ceil(256) >= self.sms {
            256
        } else {
            128
        };
        launch!(
            self,
            &format!("qgemm_{tag}_{bn}"),
            cfg2(
                (feature_blocks, rows.div_ceil(bn)),
                32 * QW_WARPS as u32,
                qgemm_smem(q0.format, bn)
            ),
            args
        );
        Ok(())
    }

    /// `outs[i] = x · ws[i]ᵀ` (rows ≤ `max_decode_rows`) in one launch of the quantized decode
    /// kernel: the weights share format, width, scaling (`post`) and column order, and their
    /// strips are planned as one weight's. Above 16 rows every strip runs once per 16 rows,
    /// without split-K.
    fn qgemv(&self, x: u64, ws: &[&QuantWeight], rows: usize, outs: &[u64]) -> Result<()> {
        let q0 = ws[0];
        self.with_stored_order(x, q0, rows, |x| self.qgemv_stored(x, ws, rows, outs, false))
    }

    /// `qgemv`, or with `glu` (ws: gate and up of one shape; see `matmul_swiglu`) the gated
    /// kernel (`qglu`): silu(gate) * up into `outs[0]`, a block taking strip s of each weight.
    fn qgemv_stored(
        &self,
        x: u64,
        ws: &[&QuantWeight],
        rows: usize,
        outs: &[u64],
        glu: bool,
    ) -> Result<()> {
        let q0 = ws[0];
        let mut weights = [0; QG_PARTS];
        for (w, q) in weights.iter_mut().zip(ws) {
            *w = q.strips;
        }
        let shape = DecodeShape {
            format: q0.format,
            post: q0.post(),
            halves: q0.half_chunk_groups(),
            cols: q0.cols,
            strips: &weights[..ws.len()],
            rows,
            glu,
            whole: q0.whole_rows(x),
        };
        let DecodePlan {
            name,
            per_block,
            strips,
            blocks,
            full_warps,
            ring,
            int_codes,
        } = decode_plan(&shape, self.sms, self.smem_per_sm);
        let row_blocks = rows.div_ceil(16);
        let (mut args, _) = self.quant_args(x, ws, outs, rows, q0.cols, per_block);
        let (warps, ksplit, cpb) = if row_blocks > 1 {
            (QG_WARPS, 1, q0.chunks)
        } else {
            let warps = if full_warps || blocks >= self.sms {
                QG_WARPS
            } else {
                QG_WARPS / 2
            };
            QuantWeight::plan(blocks, warps, q0.chunks, self.sms)
        };
        args.cpb = cpb as i32;
        args.wstride = (16 * strips) as i32;
        args.row_blocks = row_blocks as i32;
        {
            let mut guard = self.splitk.lock().unwrap();
            let (sums, counters) = (DECODE_MAX_ROWS * strips * 16, strips);
            if guard
                .as_ref()
                .is_none_or(|(w, c)| w.len() < sums || c.len() < counters)
            {
                let (w0, c0) = guard.as_ref().map_or((0, 0), |(w, c)| (w.len(), c.len()));
                self.before_realloc()?;
                *guard = None;
                *guard = Some((
                    self.stream.alloc_zeros::<f32>(sums.max(w0)).map_err(dev)?,
                    self.stream
                        .alloc_zeros::<u32>(counters.max(c0))
                        .map_err(dev)?,
                ));
            }
            let (w, c) = guard.as_ref().unwrap();
            args.ws = self.ptr(w);
            args.counters = self.ptr(c);
        }
        let smem = ring.map_or(0, |build| qgemv_ring_smem(q0.format, build));
        let cfg = cfg2((blocks * row_blocks, ksplit), 32 * warps as u32, smem);
        if int_codes {
            let k = q0.cols;
            let mut guard = self.int_codes.lock().unwrap();
            self.grow_scratch(&mut guard, rows * int_codes_len(k))?;
            let codes = self.ptr(guard.as_ref().unwrap());
            let (chunks, scales) = (k / 64, codes + 2 * (rows * k) as u64);
            let codes_cfg = cfg2((chunks.div_ceil(8), rows), 256, 0);
            launch!(
                self,
                "quantize_x_codes",
                codes_cfg,
                x,
                chunks as i32,
                codes,
                scales
            );
            args.x = codes;
            args.xd = scales;
        }
        launch!(self, &name, cfg, args);
        Ok(())
    }

    /// Launches `name` with `params` (pointers to each argument, laid out as the kernel's
    /// parameters). With `dependent` on sm_90 it is a programmatic dependent launch: its blocks
    /// may start while the previous kernel of the stream still runs (once that kernel's blocks
    /// all called `griddep_launch`), and every kernel waits (`griddep_wait`, `pdl_enter`) before
    /// it touches memory that earlier kernels use. In a replayed decode step this hides the
    /// launch latency between its ~325 short kernels.
    fn launch(
        &self,
        name: &str,
        cfg: LaunchConfig,
        params: &mut [*mut std::ffi::c_void],
        dependent: bool,
    ) -> Result<()> {
        use cudarc::driver::sys;
        let f = self.func(name)?;
        // SAFETY: all zeros is a valid value of this plain C union.
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(dependent && self.arch.0 >= 9),
        };
        self.ctx.bind_to_thread().map_err(dev)?;
        // SAFETY: each kernel's arguments match its CUDA signature (callers checked that every
        // buffer holds what the kernel reads or writes), `params` points at them, the
        // configuration names this backend's stream, and `attr`, `config` and `params` outlive
        // the call.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(dev)
    }

    /// Prefill with a weight that is not bf16: slabs of features expanded to bf16, then cuBLAS.
    /// (An act-order weight's `x` in its stored column order, see `with_stored_order`.)
    fn matmul_expanded(&self, x: u64, w: &Weight, rows: usize, out: u64) -> Result<()> {
        let (n, k) = w.shape();
        let slab = ((SCRATCH_ELEMS / k.max(1)) / 16 * 16).clamp(16, n.div_ceil(16) * 16);
        let mut guard = self.scratch.lock().unwrap();
        self.grow_scratch(&mut guard, slab * k)?;
        let scratch = self.ptr(guard.as_ref().unwrap());
        for n0 in (0..n).step_by(slab) {
            let nc = slab.min(n - n0);
            match w {
                Weight::Dense(d) => {
                    let count = (nc * k) as u64;
                    let src = d.ptr + (n0 * k * d.format.bytes_per_element()) as u64;
                    let f = match d.format {
                        DenseFormat::F32 => "f32_to_bf16",
                        DenseFormat::F16 => "f16_to_bf16",
                        DenseFormat::BF16 => unreachable!("bf16 weights go to cuBLAS directly"),
                    };
                    launch!(
                        self,
                        f,
                        grid1((count as usize).div_ceil(256).min(65536) * 256, 256),
                        src,
                        count,
                        scratch
                    );
                }
                Weight::Quant(q) => {
                    let f = format!("dequant_{}", quant::tag(q.format));
                    let (codes, scales) = (self.ptr(&q.codes), self.ptr(&q.scales));
                    let offsets = q.offsets.as_ref().map_or(0, |o| self.ptr(o));
                    let planes = q.planes.as_ref().map_or(0, |p| self.ptr(p));
                    let strips = nc.div_ceil(16);
                    launch!(
                        self,
                        &f,
                        grid1(strips * q.chunks * 32, 256),
                        codes,
                        scales,
                        offsets,
                        planes,
                        q.tensor_scale,
                        (n0 / 16) as i32,
                        strips as i32,
                        n as i32,
                        k as i32,
                        q.group_mul(),
                        q.groups as i32,
                        q.chunks as i32,
                        scratch
                    );
                }
            }
            self.gemm(x, scratch, rows, nc, k, n, out + 2 * n0 as u64)?;
        }
        Ok(())
    }
}

/// u16 elements of `int_codes` for a row of k columns: 128 bytes of codes and an f32 scale a
/// chunk of 64.
fn int_codes_len(k: usize) -> usize {
    k + k / 32
}

/// Launch config of `threads`-wide blocks covering `items` items with a grid-stride loop.
fn grid1(items: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            (items.div_ceil(threads as usize)).clamp(1, 1 << 20) as u32,
            1,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The kernel (`name`, or its vector form `name_v`) and threads per row of the norms over `dim`:
/// the vector form when rows are whole 16-byte words, each thread holding up to NORM_V of them.
fn norm_launch(name: &str, dim: usize) -> (String, u32) {
    let words = dim / 8;
    if dim.is_multiple_of(8) && words.div_ceil(NORM_V) <= 1024 {
        let threads = words.div_ceil(NORM_V).next_multiple_of(32);
        (format!("{name}_v"), threads as u32)
    } else {
        (name.to_string(), if dim >= 2048 { 512 } else { 256 })
    }
}

fn cfg2(grid: (usize, usize), threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0.max(1) as u32, grid.1.max(1) as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// The kernel modules, each its source and its kernels' names: the common kernels, then one
/// module per packed format (the decode kernel's instances are large: compiled apart, they
/// compile in parallel, and a change to one format's code leaves the others' cache entries valid).
fn modules(arch: (i32, i32)) -> Vec<(String, Vec<String>)> {
    let mut all = vec![(
        [PRELUDE].iter().chain(&COMMON).copied().collect(),
        common_names(),
    )];
    for format in QuantFormat::ALL {
        let tag = quant::tag(format);
        let (bits, asym, kind) = match format {
            QuantFormat::Int { bits, asym } => (bits, asym, "K_INT"),
            QuantFormat::Fp8 => (8, false, "K_FP8"),
            QuantFormat::Fp4 => (4, false, "K_FP4"),
            QuantFormat::Mxfp4 => (4, false, "K_MX"),
            QuantFormat::Nvfp4 => (4, false, "K_NV"),
        };
        let mut source = format!(
            "{PRELUDE}{QGEMV}\nQFORMAT({tag}, {bits}, {asym}, {kind})\n\
             QDEEP1({tag}, {bits}, {asym}, {kind}, {QG_DEEP_STAGES})\n"
        );
        let mut variants = vec!["1", "8", "16", "1p", "8p", "16p", "1d", "1pd"];
        let wide = wide_builds(format);
        let mut gated = vec!["1", "1p"];
        if wide == Some(WideBuilds::UpTo8Rows) {
            source += &format!("QGLUW({tag}, {bits}, {asym}, {kind})\n");
            gated.extend(["1w", "1pw", "8w"]);
        }
        if two_strip_builds(format) {
            gated.extend(["8", "8p", "16", "16p"]);
        }
        for (line, names, wanted) in [
            ("QWIDE1", &["1w", "1pw"][..], wide.is_some()),
            (
                "QWIDE8",
                &["8w", "8pw", "16w", "16pw"],
                wide == Some(WideBuilds::UpTo8Rows),
            ),
            ("QPAIR16", &["16s", "16ps"], two_strip_builds(format)),
        ] {
            if wanted {
                source += &format!("{line}({tag}, {bits}, {asym}, {kind})\n");
                variants.extend(names);
            }
        }
        for (rows, names) in [(2, ["2", "2p", "2w", "2pw"]), (4, ["4", "4p", "4w", "4pw"])] {
            if rows <= ring_rows_max(format) {
                source += &format!("QROWS({tag}, {bits}, {asym}, {kind}, {rows})\n");
                variants.extend(names);
            }
        }
        for (rows, names) in [
            (1, ["1r", "1pr"]),
            (2, ["2r", "2pr"]),
            (4, ["4r", "4pr"]),
            (8, ["8r", "8pr"]),
        ] {
            if ring_rows_max(format) > 0 && (rows == 8 || rows <= ring_rows_max(format)) {
                source +=
                    &format!("QRINGS({tag}, {bits}, {asym}, {kind}, {rows}, {QG_QUAD_STAGES})\n");
                variants.extend(names);
            }
        }
        if four_strip_builds(format) {
            source += &format!("QQUAD({tag}, {bits}, {asym}, {kind}, {QG_QUAD_STAGES})\n");
            variants.extend(["8q", "8pq", "16q", "16pq"]);
        }
        let int_activations = format == INT_ACTIVATIONS;
        if int_activations {
            source += &format!("QIACT({QG_QUAD_STAGES})\n");
            variants.extend(["1i", "1iw", "2i", "2iw", "4i", "4iw", "1ir", "2ir", "4ir"]);
            variants.extend(["1h", "1hw", "2h", "2hw", "1hr", "2hr"]);
        }
        let mut names: Vec<String> = variants
            .iter()
            .map(|v| format!("qgemv_{tag}_{v}"))
            .chain(gated.iter().map(|v| format!("qglu_{tag}_{v}")))
            .collect();
        if int_activations {
            names.extend(
                [
                    "qglu_int4_1i",
                    "qglu_int4_1iw",
                    "qglu_int4_1h",
                    "qglu_int4_1hw",
                    "quantize_x_codes",
                ]
                .map(String::from),
            );
        }
        names.push(format!("dequant_{tag}"));
        names.push(format!("embedding_{tag}"));
        if has_wgmma(arch) {
            source += &format!("{QGEMM}\nQGEMM({tag}, {bits}, {asym}, {kind})\n");
            names.push(format!("qgemm_{tag}_128"));
            names.push(format!("qgemm_{tag}_256"));
            names.push(format!("qgemm_order_{tag}"));
        }
        all.push((source, names));
    }
    all
}

/// Whether the wgmma prefill kernel runs on this architecture: Hopper (sm_90a) only.
fn has_wgmma(arch: (i32, i32)) -> bool {
    arch == (9, 0)
}

/// Rows up to which a packed weight runs the wgmma prefill kernel; above, the expansion for
/// cuBLAS, whose cost is spread over more rows, is faster. H100, the six sweep shapes, TFLOP/s
/// kernel against expansion (fifteenth session): int4 g128 at 512 rows 433-543 against 335-393,
/// 1024 rows 453-614 against 470-552, 2048 rows 508-581 against 559-662; 8-bit codes (two k-steps
/// a chunk: twice the per-chunk work a product) at 512 rows 328-476 against 356-427, at 1024
/// 358-548 against 484-604; the E2M1 formats at 1024 459-611 against 465-571, int2/int3 420-601
/// against 415-491.
fn qgemm_max_rows(format: QuantFormat) -> usize {
    if format.bits() == 8 {
        512
    } else {
        1024
    }
}

/// Dynamic shared memory of the tensor-core prefill attention for head dim `hd` (each warp a tile of
/// APF_KEYS K and V rows), or None where it has no build (the one-block-per-head kernel runs).
fn prefill_attention_smem(hd: usize) -> Option<u32> {
    matches!(hd, 64 | 128).then_some((APF_WARPS * 2 * APF_KEYS * hd * 2) as u32)
}

/// Dynamic shared memory of attention_tc_* at head dim `hd`: each warp's ring of K and V tiles,
/// then the group's 16 query rows in bf16.
fn decode_tc_smem(hd: usize) -> Option<u32> {
    matches!(hd, 64 | 128)
        .then_some((DTC_WARPS * DTC_STAGES * 2 * APF_KEYS * hd * 2 + 16 * hd * 2) as u32)
}

/// What the choice of a decode kernel depends on (`decode_plan`).
#[derive(Clone, Copy)]
struct DecodeShape<'a> {
    format: QuantFormat,
    /// Groups covering whole chunks: the scale applied after the mma (the `p` builds).
    post: bool,
    /// Groups of half a chunk (int4 g32; the integer-activation builds `h`).
    halves: bool,
    cols: usize,
    /// Each weight's strips (gate and up for `glu`).
    strips: &'a [usize],
    rows: usize,
    /// Gate and up into silu(gate) * up (the `qglu` kernels).
    glu: bool,
    /// Rows of whole chunks, 16-byte aligned.
    whole: bool,
}

/// A decode launch's kernel and geometry.
#[derive(Debug)]
struct DecodePlan {
    name: String,
    /// Neighbouring strips of one weight a block takes.
    per_block: usize,
    /// Strips in the launch's numbering (each weight's padded to a multiple of `per_block`),
    /// and blocks a row block.
    strips: usize,
    blocks: usize,
    /// Whether the build runs QG_WARPS warps a block however few its blocks.
    full_warps: bool,
    /// The ring in dynamic shared memory, if the build has one.
    ring: Option<RingBuild>,
    /// Whether the build takes integer codes of the activations (`quantize_x_codes` first).
    int_codes: bool,
}

/// The decode kernel (`qgemv.cu`) for a launch of this shape on a GPU of `sms` SMs with
/// `smem_per_sm` bytes of shared memory each: which build, and how many strips a block.
fn decode_plan(d: &DecodeShape, sms: usize, smem_per_sm: usize) -> DecodePlan {
    // One row of whole chunks, 16-byte aligned: the kernel that streams the activations
    // through its copy ring (`_1`). The `w` builds (one row at 4 blocks an SM, 8 rows at 3)
    // where the strips exceed a wave of 3-block slots (one row) or of 2-block slots (2-8 rows,
    // where the unbounded build's ~100 registers hold it to two an SM). H200, int4 at 2 / 4 / 8
    // rows, unbounded against bounded, same call: g32 6144 × 4096 (384 blocks, llama3-8b's
    // q/k/v) 10.1 / 10.2 / 10.2 → 7.6 µs, 5120 × 4096 9.4 / 9.6 / 9.5 → 6.8 / 6.8 / 6.9, g128
    // 6144 × 4096 9.5 / 9.6 → 6.9 / 7.1 at 4 / 8; 8192 × 4096 (512) even; llama3-8b int4
    // decode at batch 4 44.8-45.0 → 45.8% of the bound, at batch 8 40.0-40.1 → 41.0-41.2%
    // (twenty-ninth session; before, from 4 blocks an SM: H100, int4 g128, 14336×4096 17.9 →
    // 17.2 µs and 28672×8192 57.7 → 55.3, but the 512-strip 8192×28672 49.6 → 62.9, which now
    // takes the ring and four-strip builds).
    let DecodeShape {
        format,
        post,
        halves,
        cols,
        strips: weights,
        rows,
        glu,
        whole,
    } = *d;
    let one = rows == 1 && whole;
    let singles: usize = weights.iter().sum();
    // 1-4 rows of int4 on integer codes of the activations (`_1i`, `_2i`, `_4i`, their bounded
    // builds, and as ring pairs `_1ir`.. where the rule below picks pairs; gate and up at one
    // row) where rows are long and strips many. H200, g128, % of copy against the
    // kernels the other rules pick (same call, quantize_x_codes' launch included), at 1 / 2 / 3
    // / 4 rows: 8192² 67.2 / 63.0 / 63.8 / 64.0 → 71.1-72.4 / 69.7-70.5 / 63.0-63.8 /
    // 62.8-63.3, 8192 × 28672 81.6 / 75.1 / 74.4 / 74.2 → 88.3 / 87.8-88.1 / 83.8-84.1 /
    // 83.4-83.7, 28672 × 8192 85.4 / 85.0 / 85.1 / 85.1 → 90.4-90.7 / 89.6-91.1 / 90.8-91.3 /
    // 90.4-90.8, 57344 × 8192 87.4-88.2 → 94-95 / ~100 / ~100 / ~100, 10240 × 8192 67.2 / 63.7
    // / 63.7 / 64.0 → 66.7-67.3 / 65.4 / 65.2-65.6 / 65.4-65.9; llama3-70b-layer int4 g128
    // decode 4278 → 4570 tok/s at batch 1, 7981 → 8268 at 2, 15165 → 15445 at 4. Rows of 4096
    // columns lost at one row (the extra launch weighs most there): 4096 × 14336 (256 strips)
    // 64 → 61, 4096² 40 → 30-36, llama3-8b int4 g128 decode 545 → 535.
    // At g32 (two scales a chunk: `_1h`, `_2h`, their bounded and ring-pair builds, gated
    // `qglu_int4_1h`) 1-2 rows, H200, same calls: 8192 × 28672 79-82 → 90-92%, 28672 × 8192
    // 84-85 → 93-94%, 8192² 66-69 → 74-75%, 10240 × 8192 66-69 → 69-71%; llama3-70b-layer
    // int4 (g32) decode 4116 → 4429-4439 tok/s (78 → 84% of the bound).
    let int_activations = (1..=INT_ACTIVATION_ROWS).contains(&rows)
        && (rows == 1 || !glu)
        && whole
        && (post || halves && rows <= 2)
        && format == INT_ACTIVATIONS
        && cols >= 8192
        && singles >= 2 * sms;
    // 2-4 rows likewise (`_2`, `_4`: a ring of 2 or 4 rows), for symmetric 4-bit codes
    // (`ring_rows_max`) on rows of 8192 columns or more where the strips are three blocks an
    // SM or more. H100, g128, against the kernels the rules below pick (same calls), µs at
    // 2 / 3 / 4 rows: int4 8192² 16.7 / 16.7 / 16.9 → 14.3 / 13.9 / 13.5 (72 → 84-89% of
    // copy), 28672 × 8192 46.6 / 46.7 / 46.9 → 44.5 / 44.1 / 44.1 (90 → 95%), 10240 × 8192
    // 21.3 → 18.4-20.0, 8192 × 28672 1-3% faster; fp4 8192² 67 → 78-80%, 10240 × 8192 68 →
    // 76-77%, the long shapes 1-3% faster; nvfp4 and mxfp4 at 2 rows 8192² 70 → 76-79%,
    // 10240 × 8192 70-72 → 74-77%, the long shapes 0-3% faster (at 3-4 rows 2-5% slower
    // there, so they keep two rows). Shorter rows or fewer strips lost at 2 rows: 4096 ×
    // 14336 (256 strips) int4 13.6 → 16.0, 4096² nvfp4 6.4 → 7.2, 14336 × 4096 even to 3%
    // slower. 8-bit codes gained at 8192² only (85 → 89-91% at 2 rows) and lost up to 5% at
    // 3-4 rows; 2-bit ones (four strips a block) 12-47%.
    let ring_rows = (2..=ring_rows_max(format)).contains(&rows)
        && !int_activations
        && whole
        && !glu
        && cols >= 8192
        && singles >= 3 * sms;
    let pairs: usize = weights.iter().map(|s| s.div_ceil(2)).sum();
    // Two strips a block with the rows in the ring (`_1r`, `_2r`, `_4r`, `_8r`), where the
    // pair blocks are many: the strips share a step's activations, so the SMs read them from
    // the L2 once per 32 features. H200, g128, % of copy against the kernels the other rules
    // pick (same calls), where the pairs are four blocks an SM or more: at one row int4
    // 28672 × 8192 78 → 86%, 57344 × 8192 80 → 88%, 128256 × 4096 72 → 81%, nvfp4 66 → 71%,
    // 67 → 73%, 62 → 68% (llama3-8b decode even: 516.9 against 516.8 tok/s); at 2-4 rows
    // int4 28672 × 8192 70-74 → 83-84%, 57344 × 8192 72-77 → 86%, 128256 × 8192 74-80 →
    // 88%; fp4 28672 × 8192 60-64 → 70%, 86016 × 8192 64-68 → 73%; nvfp4 and mxfp4 (2
    // rows) 28672 × 8192 62-64 → 67-70%. Fewer pairs, 10240 × 8192 (320): int4 +2-3 points,
    // fp4 ±1%, nvfp4 and mxfp4 -3. At 5-8 rows (all four formats, against four strips a
    // block) where the pairs are two to eight blocks an SM: int4 8464 × 8192 42 → 53%, 10240
    // × 8192 48 → 59-63%, 28672 × 8192 77 → 80%; fp4, nvfp4, mxfp4 10240 × 8192 45-48 →
    // 53-55%, 28672 × 8192 63-65 → 65-69%. 8192² (256 pairs) lost (57 → 52%), and above
    // eight an SM four strips keep the lead for three of the four formats' measures (int4
    // 128256 × 8192 88 → 84%, fp4 57344 × 8192 and up 73-75 → 71-73%; int4 57344 and 86016
    // × 8192 gained 4%).
    let ring_pairs = ring_rows_max(format) > 0
        && whole
        && !glu
        && ring_fits(
            format,
            RingBuild::RingPairs(rows.next_power_of_two()),
            smem_per_sm,
        )
        && cols >= if rows == 1 { 4096 } else { 8192 }
        && match rows {
            1..=4 => rows <= ring_rows_max(format) && pairs >= 4 * sms,
            5..=8 => (2 * sms..8 * sms).contains(&pairs),
            _ => false,
        };
    let ring_rows = ring_rows && !ring_pairs;
    let row_blocks = rows.div_ceil(16);
    // A block takes `per_block` neighbouring strips of one weight: each weight's strips are
    // padded to a multiple of it in the launch's strip numbering. At 2-8 rows, four strips
    // (`q`) where those blocks, split in two along k, fill nearly all of two blocks an SM: a
    // step reads its activations once for 64 features, and a block's warps stream four times
    // the chunks. H100, µs at 2 / 8 rows, one strip a block against four: int4 g128
    // 14336 × 4096 15.9 / 16.8 → 13.6 / 13.7, 28672 × 8192 46.6 / 54.2 → 47.4 / 47.9, 8192²
    // 17.4 / 17.8 → 16.8 / 17.0, 8192 × 28672 even; int8 8192 × 28672 102.5 / 105.3 → 85.0 /
    // 85.9. Fewer blocks lose: n = 4096 (64) 5.9 → 9.5 at 2 rows, and llama3-8b's q/k/v
    // launch (96) took batch-8 decode from 2664-2677 to 2525 tok/s. At 9-16 rows, for formats
    // with two-strip builds (4 and 8 bits), four strips (a build holding one set of
    // activations) only where their blocks number 1.5 an SM or more. H100, 16 rows, two
    // strips a block against four: int4 g128 14336 × 4096 18.1 → 16.4 µs, 28672 × 8192
    // 59.7 → 55.3; int8 g32 128256 × 4096 (Llama-3's lm_head) 224 → 209; but 128 blocks lost:
    // 8192² 16.5 → 20.3, 8192 × 28672 49.6 → 54.2. 2- and 3-bit codes, one strip a block
    // against four, int2 / int3 g128: 8 rows 8192 × 28672 73.8 / 52.1 → 30.3 / 45.3 µs,
    // 16 rows 82.2 / 87.9 → 45.7 / 54.8 and 28672 × 8192 92.0 / 98.0 → 50.8 / 62.9.
    // At 2-4 rows the activations are cheap, and where one-strip blocks take the bounded
    // build (more than 4 an SM) on rows of 8192 columns or more they stay: 28672 × 8192 lost
    // 2% (int4, int8) to 8% (fp4) with four strips there, while 14336 × 4096 gained 11-17%;
    // 2- and 3-bit codes, whose chunks carry twice the columns of activations per weight
    // byte, stay only where the four-strip blocks are fewer than two an SM (3-bit ones on
    // any such rows: 8192² 15.7 → 18.5 µs at 2 rows with four strips). H100, g128 at 2 / 4
    // rows, one strip a block against four, same calls: int2 28672 × 8192 (448 blocks)
    // 38.2 / 42.2 → 32.8 / 33.4 µs, 128256 × 8192 150.7 / 171.8 → 114.0 / 122.6 (g32
    // 28672 × 8192 40.0 / 42.3 → 37.8 / 37.8), but 10240 × 8192 (160) 17.2 / 19.0 →
    // 18.5 / 19.0; int3 28672 × 8192 47.5 / 51.6 → 48.1 / 48.8, 128256 × 8192 194 / 206 →
    // 173 / 176.
    // Otherwise above 8 rows, two strips (`s`) where those blocks still fill the SMs.
    let quads: usize = weights.iter().map(|s| s.div_ceil(4)).sum();
    let singles_stay = rows <= 4
        && cols >= 8192
        && match format.bits() {
            2 => singles > 4 * sms && quads < 2 * sms,
            3 => quads < 2 * sms,
            _ => singles > 4 * sms,
        };
    let quad = !glu
        && !int_activations
        && !ring_pairs
        && !ring_rows
        && (2..=16).contains(&rows)
        && !singles_stay
        && four_strip_builds(format)
        && if rows <= 8 || !two_strip_builds(format) {
            10 * quads >= 9 * sms
        } else {
            2 * quads >= 3 * sms
        }
        && ring_fits(format, RingBuild::Quad, smem_per_sm);
    // 9-16 rows, one strip a block at three an SM (`_16w`) where the strips fill between two
    // and three blocks an SM: there the two-strip blocks leave some SMs one and others two,
    // and the unbounded one-strip build (~100 registers) takes two waves. H200, int4 g32 at
    // 12 / 16 rows, same call: 5120 × 4096 13.4 / 13.7 → 7.5 / 8.2 µs, 6144 × 4096 (llama3-8b's
    // q/k/v) 13.9 / 14.2 → 8.4 / 9.0; with fewer strips the two-strip blocks keep the lead
    // (4096² 6.9 / 7.0 against 7.6 / 7.5, 4096 × 14336 16.8 / 17.2 against 21.7 / 23.0).
    let wide16 = !glu
        && !quad
        && (9..=16).contains(&rows)
        && wide_builds(format) == Some(WideBuilds::UpTo8Rows)
        && (2 * sms + 1..=3 * sms).contains(&singles);
    let per_block = if ring_pairs {
        2
    } else if quad {
        4
    } else if wide16 {
        1
    } else if rows > 8 && two_strip_builds(format) && pairs * row_blocks >= sms {
        2
    } else {
        1
    };
    let (strips, blocks) = if glu {
        (2 * weights[0], weights[0])
    } else {
        let strips: usize = weights.iter().map(|s| s.next_multiple_of(per_block)).sum();
        (strips, strips / per_block)
    };
    let wide = match wide_builds(format) {
        _ if per_block > 1 => false,
        // The gated kernel's bounded builds (QGLUW): one row, and 2-8 rows scaled per
        // weight (the `p` build spilled), 4 blocks an SM against 3. H200, llama3-8b int4 (g32)
        // decode, gate/up 896 blocks: batch 4 45.6 → 46.5% of the bound, batch 8 40.9 →
        // 41.4-41.5% (twenty-ninth session, same call).
        Some(WideBuilds::UpTo8Rows) if glu => (one || rows <= 8 && !post) && blocks > 3 * sms,
        _ if wide16 => true,
        _ if glu => false,
        Some(_) if one || ring_rows || int_activations => blocks > 3 * sms,
        Some(WideBuilds::UpTo8Rows) if rows <= 8 => blocks > 2 * sms,
        _ => false,
    };
    // The deep ring where the blocks are at most two an SM (one row). Llama3-8b's o and down
    // both take it. Measured apart (H100, same call): o's is what gains after the split decode
    // attention (512-token prompt: +1.3% with both, +0.1% with down's alone), but after the
    // whole-head attention of short contexts it costs (128 tokens: -0.8% with both, +1.1%
    // with down's alone); the default prompt decides.
    let deep = one
        && !int_activations
        && !ring_pairs
        && !glu
        && !wide
        && blocks <= 2 * sms
        && ring_fits(format, RingBuild::Deep, smem_per_sm);
    let ring = if ring_pairs {
        Some(RingBuild::RingPairs(rows.next_power_of_two()))
    } else if deep {
        Some(RingBuild::Deep)
    } else if quad {
        Some(RingBuild::Quad)
    } else {
        None
    };
    let build = if ring_pairs {
        "r"
    } else if wide {
        "w"
    } else if deep {
        "d"
    } else if per_block == 4 {
        "q"
    } else if per_block == 2 && !glu {
        "s"
    } else {
        ""
    };
    let kernel = if glu { "qglu" } else { "qgemv" };
    let name = if int_activations {
        let groups = if post { "i" } else { "h" };
        format!("{kernel}_int4_{}{groups}{build}", rows.next_power_of_two())
    } else {
        format!(
            "{kernel}_{}_{}{}{build}",
            quant::tag(format),
            if one {
                1
            } else if ring_rows || ring_pairs {
                rows.next_power_of_two()
            } else if rows <= 8 {
                8
            } else {
                16
            },
            if post { "p" } else { "" },
        )
    };
    DecodePlan {
        name,
        per_block,
        strips,
        blocks,
        // The four-strip and ring-pair builds at 8 warps a block always: their rings are
        // sized for them, and the four-strip build's 128 registers fit two such blocks an SM
        // (4-warp blocks, 8 warps an SM where the blocks are few, ran slower).
        full_warps: quad || ring_pairs,
        ring,
        int_codes: int_activations,
    }
}

/// The decode kernel's builds whose rings lie in dynamic shared memory (qgemv.cu): the one-row
/// deep ring (`_1d`, `_1pd`, QDEEP1), four strips a block (`_8q`, `_8pq`, QQUAD), and two
/// strips a block with 1, 2, 4 or 8 rows of activations in the ring (`_1r`, `_4pr`..., QRINGS).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RingBuild {
    Deep,
    Quad,
    RingPairs(usize),
}

/// The format and build of a decode kernel with a dynamic ring, from its name.
fn qgemv_ring_build(name: &str) -> Option<(QuantFormat, RingBuild)> {
    let (tag, variant) = name.strip_prefix("qgemv_")?.rsplit_once('_')?;
    let build = match variant {
        "1d" | "1pd" => RingBuild::Deep,
        "8q" | "8pq" | "16q" | "16pq" => RingBuild::Quad,
        "1r" | "1pr" | "1ir" | "1hr" => RingBuild::RingPairs(1),
        "2r" | "2pr" | "2ir" | "2hr" => RingBuild::RingPairs(2),
        "4r" | "4pr" | "4ir" => RingBuild::RingPairs(4),
        "8r" | "8pr" => RingBuild::RingPairs(8),
        _ => return None,
    };
    let format = QuantFormat::ALL
        .into_iter()
        .find(|&f| quant::tag(f) == tag)?;
    Some((format, build))
}

/// The dynamic ring a decode kernel is granted shared memory for at load: its build's, where
/// two blocks of it fit an SM of `smem_per_sm` bytes.
fn granted_ring(name: &str, smem_per_sm: usize) -> Option<(QuantFormat, RingBuild)> {
    qgemv_ring_build(name).filter(|&(f, b)| ring_fits(f, b, smem_per_sm))
}

/// Whether two blocks of a dynamic-ring build fit an SM of `smem_per_sm` bytes of shared memory
/// (with the 1 KB the system reserves a block and the build's few static bytes); the H100's
/// 228 KB fit every format, GPUs with less take the static rings.
fn ring_fits(format: QuantFormat, build: RingBuild, smem_per_sm: usize) -> bool {
    2 * (qgemv_ring_smem(format, build) as usize + 2048) <= smem_per_sm
}

/// Dynamic shared memory of a decode build's rings (qgemv.cu): each stage holds a step's chunks
/// (codes, activations for the one-row and ring-pair builds, int3 planes, scales, asymmetric
/// offsets) for every lane of QG_WARPS warps.
fn qgemv_ring_smem(format: QuantFormat, build: RingBuild) -> u32 {
    let tpu = quant::tile_span(format);
    let (stages, per_step, x_bytes) = match build {
        // Activations: 2 tpu words of 16 bytes a chunk (for 32 lanes), tpu bytes a lane.
        RingBuild::Deep => (QG_DEEP_STAGES, if tpu <= 4 { 2 } else { 1 }, tpu),
        RingBuild::Quad => (QG_QUAD_STAGES, 4, 0),
        // A step's activations: 2 tpu words of 16 bytes a chunk and row, for 64 lanes.
        RingBuild::RingPairs(rows) => (QG_QUAD_STAGES, 2, tpu * rows / 2),
    };
    let lanes = stages * per_step * 32 * QG_WARPS;
    let lane_bytes =
        16 + x_bytes + 8 * usize::from(format.bits() == 3) + 4 + 4 * usize::from(format.is_asym());
    (lanes * lane_bytes) as u32
}

/// The format and rows a block of a `qgemm_{tag}_{rows}` kernel.
fn qgemm_shape(name: &str) -> Option<(QuantFormat, usize)> {
    let (tag, bn) = name.strip_prefix("qgemm_")?.rsplit_once('_')?;
    let format = QuantFormat::ALL
        .into_iter()
        .find(|&f| quant::tag(f) == tag)?;
    Some((format, bn.parse().ok()?))
}

/// Dynamic shared memory of a qgemm block of `bn` rows: qw_stages stages of the x tile (`bn` rows
/// of a chunk) and each lane's code word, scale word, offset word (asymmetric) and plane words
/// (int3).
fn qgemm_smem(format: QuantFormat, bn: usize) -> u32 {
    let tpu = quant::tile_span(format);
    let stages = match (tpu, bn) {
        (2, _) => 8,
        (4, _) => 5,
        (_, 128) => 4,
        _ => 3,
    };
    let lane_bytes =
        16 + 4 + 4 * usize::from(format.is_asym()) + 8 * usize::from(format.bits() == 3);
    // And 1 KB, to start the stages at a 1024-byte boundary (their swizzle is of address bits).
    (stages * (bn * 16 * tpu * 2 + 32 * QW_WARPS * lane_bytes) + 1024) as u32
}

/// Whether a format has the 16-row decode kernels that take two strips a block, and the gated
/// kernel above one row (QPAIR16 in qgemv.cu): 4- and 8-bit codes.
fn two_strip_builds(format: QuantFormat) -> bool {
    format.bits() >= 4
}

/// Rows up to which a format's weights run the decode kernel (see `QuantWeight`'s method).
fn max_decode_rows(format: QuantFormat) -> usize {
    if format.bits() == 4 {
        128
    } else {
        64
    }
}

/// Whether gate and up of a format take the gated decode kernel at `rows` rows (`whole`: of
/// whole chunks, 16-byte aligned): one row of any format, or up to the decode kernel's rows for
/// the formats with two-strip builds.
fn gated_decode(format: QuantFormat, rows: usize, whole: bool) -> bool {
    (rows == 1 && whole)
        || ((2..=max_decode_rows(format)).contains(&rows) && two_strip_builds(format))
}

/// Whether a format has the decode kernels for 2-16 rows that take four strips a block (QQUAD in
/// qgemv.cu): symmetric codes (the asymmetric builds spill at their 128 registers).
fn four_strip_builds(format: QuantFormat) -> bool {
    !format.is_asym()
}

/// The most rows up to 4 of a format's decode kernels that take the activations through the
/// copy ring (QROWS and QRINGS in qgemv.cu, 2 and 4 rows; every format's one-row kernel does): 4
/// for symmetric 4-bit codes with f16 scales, 2 with byte scales (mxfp4, nvfp4: at 3-4 rows the
/// four-row ring lost 2-5% on the long shapes), 0 for the other formats. The formats with any
/// also have the one-row and 8-row rings of two strips a block (`_1r`, `_8r`).
fn ring_rows_max(format: QuantFormat) -> usize {
    match format {
        _ if format.is_asym() || format.bits() != 4 => 0,
        QuantFormat::Mxfp4 | QuantFormat::Nvfp4 => 2,
        _ => 4,
    }
}

/// Which bounded (`w`) builds of the decode kernel a format has (QWIDE1, QWIDE8 in qgemv.cu).
#[derive(PartialEq, Eq)]
enum WideBuilds {
    OneRow,
    UpTo8Rows,
}

fn wide_builds(format: QuantFormat) -> Option<WideBuilds> {
    match (format.is_asym(), format.bits()) {
        (true, _) => None,
        (false, 4..) => Some(WideBuilds::UpTo8Rows),
        (false, _) => Some(WideBuilds::OneRow),
    }
}

/// Every module's CUBIN for `sm_{major}{minor}` (and whether it came from the disk cache), in
/// `modules()` order, compiled on parallel threads.
fn compile_modules(arch: (i32, i32)) -> Result<Vec<(Vec<u8>, bool)>> {
    let sources = modules(arch);
    std::thread::scope(|scope| {
        let jobs: Vec<_> = sources
            .iter()
            .map(|(source, _)| scope.spawn(move || compile::cubin(source, arch)))
            .collect();
        jobs.into_iter()
            .map(|j| j.join().map_err(|_| dev("NVRTC panicked"))?.map_err(dev))
            .collect()
    })
}

/// The common module's kernels.
fn common_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "embedding_f32",
        "embedding_f16",
        "embedding_bf16",
        "rms_norm",
        "add_rms_norm",
        "rms_norm_v",
        "add_rms_norm_v",
        "rope",
        "write_kv",
        "rope_write_kv",
        "silu_mul",
        "add",
        "softmax",
        "gather_rows",
        "argmax_rows",
        "f32_to_bf16",
        "f16_to_bf16",
        "copy_u4",
        "permute_cols",
        "attention",
        "attention_decode_g1",
        "attention_decode_g2",
        "attention_decode_g4",
        "attention_decode_g8",
        "attention_rope_g1",
        "attention_rope_g2",
        "attention_rope_g4",
        "attention_rope_g8",
        "attention_decode_w1",
        "attention_rope_w1",
        "attention_tc_decode_64",
        "attention_tc_decode_128",
        "attention_tc_rope_64",
        "attention_tc_rope_128",
        "attention_prefill_64",
        "attention_prefill_128",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for f in ["f32", "f16", "bf16"] {
        for m in ["1", "2", "4", "8", "16", "any"] {
            names.push(format!("gemv_{f}_{m}"));
        }
    }
    names
}

impl Backend for CudaBackend {
    type Buffer = Buffer;
    type Weight = Weight;
    type KvCache = KvCache;
    type Step = Step;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn queue_step<E: From<KernelError>>(
        &self,
        step: &Step,
        key: &[u64],
        mut ops: impl FnMut(&Step) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let n = step.batch.num_tokens();
        if !self.graphs_on.load(Ordering::SeqCst) || n == 0 || n > DECODE_MAX_ROWS {
            return ops(step);
        }
        let from_argmax = step.batch.tokens_from_argmax;
        if from_argmax {
            // Validated here: a replay runs no op that would.
            self.argmax_ids(n)?;
        }
        let shape = (n, step.batch.logit_rows.len(), step.key_bucket, from_argmax);
        let words = &step.words;
        {
            let mut graphs = self.graphs.lock().unwrap();
            if graphs.owner != key {
                if !graphs.steps.is_empty() {
                    self.stream.synchronize().map_err(dev)?;
                    graphs.steps.clear();
                }
                graphs.owner = key.to_vec();
            }
            match graphs.steps.get_mut(&shape) {
                Some(Recording::Ready { graph, inputs }) if inputs.len() >= words.len() => {
                    let at = self.ptr(inputs);
                    self.upload_words(words, at)?;
                    graph.launch().map_err(dev)?;
                    return Ok(());
                }
                Some(Recording::Failed) => {
                    drop(graphs);
                    return ops(step);
                }
                Some(Recording::Ready { .. }) => {
                    // Block tables outgrew the recording's copy of the step: record anew.
                    self.stream.synchronize().map_err(dev)?;
                    graphs.steps.remove(&shape);
                }
                Some(Recording::Seen) => {}
                None => {
                    graphs.steps.insert(shape, Recording::Seen);
                    drop(graphs);
                    return ops(step);
                }
            }
        }
        // Record, the kernels reading the step from a buffer the recording keeps (room for the
        // block tables to grow within the bucket).
        let generation = self.generation.load(Ordering::SeqCst);
        let mut inputs = self
            .stream
            .alloc_zeros::<u32>(2 * words.len() + 64)
            .map_err(dev)?;
        self.stream
            .memcpy_htod(words, &mut inputs.slice_mut(..words.len()))
            .map_err(dev)?;
        let homed = Step {
            batch: step.batch.clone(),
            words: Vec::new(),
            key_bucket: step.key_bucket,
            dev: OnceLock::from((None, self.ptr(&inputs))),
        };
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(dev)?;
        self.capturing.store(true, Ordering::SeqCst);
        let queued = ops(&homed);
        self.capturing.store(false, Ordering::SeqCst);
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        let fresh = self.generation.load(Ordering::SeqCst) == generation;
        match (queued, graph) {
            (Ok(()), Ok(Some(graph))) if fresh => {
                graph.launch().map_err(dev)?;
                let ready = Recording::Ready { graph, inputs };
                self.graphs.lock().unwrap().steps.insert(shape, ready);
                Ok(())
            }
            (queued, _) => {
                // Nothing ran: run the step directly. A step whose buffers moved meanwhile may
                // record next time; one whose ops cannot be captured never will.
                let why = if fresh && queued.is_err() {
                    Recording::Failed
                } else {
                    Recording::Seen
                };
                self.graphs.lock().unwrap().steps.insert(shape, why);
                ops(step)
            }
        }
    }

    fn alloc(&self, len: usize) -> Result<Buffer> {
        // Zeroed: a buffer nobody wrote reads as zeros, as on the CPU.
        let data = self.stream.alloc_zeros::<u16>(len.max(1)).map_err(dev)?;
        let ptr = self.ptr(&data);
        Ok(Buffer { data, ptr, len })
    }

    fn write(&self, dst: &mut Buffer, src: &[f32]) -> Result<()> {
        len_check("write", "destination", dst.len, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let host: Vec<u16> = src.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let mut view = dst.data.slice_mut(..src.len());
        self.stream.memcpy_htod(&host, &mut view).map_err(dev)
    }

    fn read(&self, src: &Buffer, len: usize) -> Result<Vec<f32>> {
        len_check("read", "source", src.len, len)?;
        if len == 0 {
            return Ok(vec![]);
        }
        let mut stage = self.read_stage.lock().unwrap();
        if stage.as_ref().is_none_or(|p| p.len() < len) {
            *stage = None;
            // Not write-combined (cudarc's default for pinned memory): the host reads it.
            // SAFETY: the memory is written by the copy below before anything reads it.
            let p = unsafe { self.ctx.alloc_pinned_with_flags::<u16>(len, 0) };
            *stage = Some(p.map_err(dev)?);
        }
        let host = &mut stage.as_mut().unwrap().as_mut_slice().map_err(dev)?[..len];
        self.ctx.bind_to_thread().map_err(dev)?;
        // SAFETY: `host` is page-locked memory of `len` elements, `src` holds at least `len`
        // (checked above), and the copy is finished (synchronize) before `host` is read.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(host, src.ptr, self.stream.cu_stream())
        }
        .map_err(dev)?;
        self.stream.synchronize().map_err(dev)?;
        // bf16 to f32 is a shift (exact; a NaN stays a NaN), cheaper than `half`'s conversion,
        // which tests each element for NaN: the H100 machine's host spent ~47 us a decode step
        // in that loop over 128k logits, with the GPU idle (20 -> 13 us on a build machine).
        Ok(host
            .iter()
            .map(|&b| f32::from_bits(u32::from(b) << 16))
            .collect())
    }

    fn upload_weight(&self, weight: &HostWeight) -> Result<Weight> {
        self.upload_dense(weight)
    }

    fn weight_shape(&self, weight: &Weight) -> (usize, usize) {
        weight.shape()
    }

    fn alloc_kv(&self, layout: KvLayout) -> Result<KvCache> {
        let len = (layout.slots() * layout.slot_width()).max(1);
        let k = self.stream.alloc_zeros::<u16>(len).map_err(dev)?;
        let v = self.stream.alloc_zeros::<u16>(len).map_err(dev)?;
        let (kp, vp) = (self.ptr(&k), self.ptr(&v));
        Ok(KvCache {
            layout,
            _k: k,
            _v: v,
            kp,
            vp,
        })
    }

    fn prepare_step(&self, batch: &StepBatch) -> Result<Step> {
        let n = batch.num_tokens();
        check(
            batch.positions.len() == n && batch.slots.len() == n,
            "prepare_step",
            || {
                format!(
                    "{n} tokens, {} positions, {} slots",
                    batch.positions.len(),
                    batch.slots.len()
                )
            },
        )?;
        let mut table_off = vec![0u32; n];
        let mut first_pos = vec![0u32; n];
        let mut tables = vec![];
        for seq in &batch.seqs {
            let off = tables.len() as u32;
            tables.extend_from_slice(&seq.block_table);
            let end = (seq.start + seq.len).min(n);
            table_off[seq.start.min(end)..end].fill(off);
            first_pos[seq.start.min(end)..end].fill(seq.context_len.saturating_sub(seq.len) as u32);
        }
        let mut host = Vec::with_capacity(5 * n + batch.logit_rows.len() + tables.len() + 1);
        host.extend_from_slice(&batch.tokens);
        host.extend_from_slice(&batch.positions);
        host.extend_from_slice(&batch.slots);
        host.extend_from_slice(&table_off);
        host.extend_from_slice(&first_pos);
        host.extend_from_slice(&batch.logit_rows);
        host.extend_from_slice(&tables);
        host.push(0);
        let max_keys = batch.positions.iter().max().map_or(1, |&p| p as usize + 1);
        Ok(Step {
            batch: batch.clone(),
            words: host,
            key_bucket: max_keys.next_power_of_two().max(DEC_MIN_CHUNK),
            dev: OnceLock::new(),
        })
    }

    fn embedding(&self, table: &Weight, step: &Step, out: &mut Buffer) -> Result<()> {
        let (vocab, dim) = table.shape();
        let tokens = &step.batch.tokens;
        len_check("embedding", "out", out.len, tokens.len() * dim)?;
        // The token ids: the step's words, or for a `tokens_from_argmax` step the latest greedy
        // ids where the argmax left them on the device.
        let from_argmax = if step.batch.tokens_from_argmax {
            let (ids, chosen_from) = self.argmax_ids(tokens.len())?;
            check(chosen_from <= vocab, "embedding", || {
                format!("tokens chosen from {chosen_from} logits, vocab {vocab}")
            })?;
            Some(ids)
        } else if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(KernelError::Shape(format!(
                "embedding: token {t} of vocab {vocab}"
            )));
        } else {
            None
        };
        if tokens.is_empty() {
            return Ok(());
        }
        let ids = match from_argmax {
            Some(ids) => ids,
            None => step.at(self, 0)?,
        };
        let d = match table {
            Weight::Dense(d) => d,
            Weight::Quant(q) => {
                let f = format!("embedding_{}", quant::tag(q.format));
                let (codes, scales) = (self.ptr(&q.codes), self.ptr(&q.scales));
                let offsets = q.offsets.as_ref().map_or(0, |o| self.ptr(o));
                let planes = q.planes.as_ref().map_or(0, |p| self.ptr(p));
                let cfg = cfg2((dim.div_ceil(256), tokens.len()), 256, 0);
                launch!(
                    self,
                    &f,
                    cfg,
                    codes,
                    scales,
                    offsets,
                    planes,
                    q.tensor_scale,
                    ids,
                    dim as i32,
                    q.group as i32,
                    q.groups as i32,
                    q.chunks as i32,
                    out.ptr
                );
                return Ok(());
            }
        };
        let f = match d.format {
            DenseFormat::F32 => "embedding_f32",
            DenseFormat::F16 => "embedding_f16",
            DenseFormat::BF16 => "embedding_bf16",
        };
        let cfg = cfg2((dim.div_ceil(256), tokens.len()), 256, 0);
        launch!(self, f, cfg, d.ptr, ids, dim as i32, out.ptr);
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
        contract::rms_norm(x.len, weight.len, out.len, rows, dim)?;
        if rows == 0 {
            return Ok(());
        }
        let (name, threads) = norm_launch("rms_norm", dim);
        launch!(
            self,
            &name,
            cfg2((rows, 1), threads, 0),
            x.ptr,
            weight.ptr,
            eps,
            dim as i32,
            out.ptr
        );
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
        contract::rope(x.len, table.len, &step.batch, heads, head_dim)?;
        if tokens == 0 || heads == 0 {
            return Ok(());
        }
        let threads = (head_dim / 2).clamp(32, 256).next_multiple_of(32) as u32;
        launch!(
            self,
            "rope",
            cfg2((tokens, heads), threads, 0),
            x.ptr,
            step.positions(self)?,
            heads as i32,
            head_dim as i32,
            table.ptr
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
        // Prompt and generated rows run alike here.
        let rows = rows.count;
        let (n, k) = weight.shape();
        contract::matmul("matmul", x.len, out.len, rows, k, n)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        if let Weight::Dense(d) = weight {
            // From 3 rows on cuBLAS beats the SIMT bf16 GEMV (`marlin bench kernels`).
            if d.format == DenseFormat::BF16 && rows > 2 {
                return self.gemm(x.ptr, d.ptr, rows, n, k, n, out.ptr);
            }
        }
        match weight {
            Weight::Quant(q) if rows > q.max_decode_rows() => {
                if self.qgemm_takes(&[q], rows) {
                    return self.qgemm(x.ptr, &[q], rows, &[out.ptr]);
                }
                return self.with_stored_order(x.ptr, q, rows, |x| {
                    self.matmul_expanded(x, weight, rows, out.ptr)
                });
            }
            Weight::Dense(_) if rows > DECODE_MAX_ROWS => {
                return self.matmul_expanded(x.ptr, weight, rows, out.ptr)
            }
            _ => {}
        }
        match weight {
            Weight::Dense(d) => {
                let f = match d.format {
                    DenseFormat::F32 => "f32",
                    DenseFormat::F16 => "f16",
                    DenseFormat::BF16 => "bf16",
                };
                let (name, blocks) = if k.is_multiple_of(8) {
                    (
                        format!("gemv_{f}_{}", rows.next_power_of_two()),
                        n.div_ceil(16),
                    )
                } else {
                    (format!("gemv_{f}_any"), n.div_ceil(4))
                };
                launch!(
                    self,
                    &name,
                    cfg2((blocks, 1), 128, 0),
                    d.ptr,
                    x.ptr,
                    rows as i32,
                    k as i32,
                    n as i32,
                    out.ptr
                );
            }
            Weight::Quant(q) => self.qgemv(x.ptr, &[&**q], rows, &[out.ptr])?,
        }
        Ok(())
    }

    fn matmul_many(
        &self,
        x: &Buffer,
        weights: &[&Weight],
        rows: MatmulRows,
        outs: &mut [&mut Buffer],
    ) -> Result<()> {
        let rows = rows.count;
        check(weights.len() == outs.len(), "matmul_many", || {
            format!("{} weights, {} outputs", weights.len(), outs.len())
        })?;
        // Quantized weights of one kind and width at decode: one launch.
        let quant: Vec<&QuantWeight> = weights
            .iter()
            .filter_map(|w| match w {
                Weight::Quant(q) => Some(&**q),
                Weight::Dense(_) => None,
            })
            .collect();
        let fusable = (1..=quant.first().map_or(0, |q| q.max_decode_rows())).contains(&rows)
            && (2..=QG_PARTS).contains(&quant.len())
            && quant.len() == weights.len()
            && quant.iter().all(|q| {
                let q0 = quant[0];
                (q.format, q.cols, q.post(), q.perm_key())
                    == (q0.format, q0.cols, q0.post(), q0.perm_key())
            });
        // Prefill through the wgmma kernel: one ordering of x, one launch.
        let prefill =
            quant.len() == weights.len() && !quant.is_empty() && self.qgemm_takes(&quant, rows);
        if !fusable && !prefill {
            for (w, out) in weights.iter().zip(outs.iter_mut()) {
                self.matmul(x, w, MatmulRows::plain(rows), out)?;
            }
            return Ok(());
        }
        let k = quant[0].cols;
        for (q, out) in quant.iter().zip(outs.iter()) {
            contract::matmul("matmul_many", x.len, out.len, rows, k, q.rows)?;
        }
        let ptrs: Vec<u64> = outs.iter().map(|o| o.ptr).collect();
        if prefill {
            return self.qgemm(x.ptr, &quant, rows, &ptrs);
        }
        self.qgemv(x.ptr, &quant, rows, &ptrs)
    }

    fn rope_write_kv(
        &self,
        q: &mut Buffer,
        k: &mut Buffer,
        v: &Buffer,
        cache: &mut KvCache,
        step: &Step,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        table: &Buffer,
    ) -> Result<()> {
        self.check_rope_write_kv(q, k, v, cache, step, heads, kv_heads, head_dim, table)?;
        let n = step.batch.num_tokens();
        if n == 0 || heads + kv_heads == 0 {
            return Ok(());
        }
        let threads = (head_dim / 2).clamp(32, 256).next_multiple_of(32) as u32;
        launch!(
            self,
            "rope_write_kv",
            cfg2((n, heads + kv_heads), threads, 0),
            q.ptr,
            k.ptr,
            v.ptr,
            cache.kp,
            cache.vp,
            step.positions(self)?,
            step.slots(self)?,
            heads as i32,
            kv_heads as i32,
            head_dim as i32,
            table.ptr
        );
        Ok(())
    }

    /// Decode steps (what `attention` sends to attention_decode) in one launch,
    /// attention_rope_g*; others as rope_write_kv then attention. q and k keep the projections
    /// in the one-launch case.
    fn rope_attention(
        &self,
        q: &mut Buffer,
        k: &mut Buffer,
        v: &Buffer,
        cache: &mut KvCache,
        step: &Step,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        table: &Buffer,
        scale: f32,
        out: &mut Buffer,
    ) -> Result<()> {
        let n = step.batch.num_tokens();
        if !decodes(n, head_dim) {
            self.rope_write_kv(q, k, v, cache, step, heads, kv_heads, head_dim, table)?;
            return self.attention(q, cache, step, heads, scale, out);
        }
        self.check_rope_write_kv(q, k, v, cache, step, heads, kv_heads, head_dim, table)?;
        self.check_attention(q, cache, step, heads, out)?;
        if n == 0 || heads == 0 {
            return Ok(());
        }
        let rope = RopeInputs { k, v, table };
        self.attention_decode(q, cache, step, heads, scale, Some(rope), out)
    }

    fn write_kv(&self, cache: &mut KvCache, k: &Buffer, v: &Buffer, step: &Step) -> Result<()> {
        let layout = cache.layout;
        step.batch.validate(&layout)?;
        let (n, sw) = (step.batch.num_tokens(), layout.slot_width());
        contract::write_kv(k.len, v.len, n, sw)?;
        if n == 0 {
            return Ok(());
        }
        let threads = sw.clamp(32, 256).next_multiple_of(32) as u32;
        launch!(
            self,
            "write_kv",
            cfg2((n, 1), threads, 0),
            cache.kp,
            cache.vp,
            k.ptr,
            v.ptr,
            step.slots(self)?,
            sw as i32
        );
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
        self.check_attention(q, cache, step, heads, out)?;
        let layout = cache.layout;
        let n = step.batch.num_tokens();
        if n == 0 || heads == 0 {
            return Ok(());
        }
        if decodes(n, layout.head_dim) {
            return self.attention_decode(q, cache, step, heads, scale, None, out);
        }
        if let Some(smem) = prefill_attention_smem(layout.head_dim) {
            let hd = layout.head_dim;
            launch!(
                self,
                &format!("attention_prefill_{hd}"),
                cfg2(
                    (n.div_ceil(16 * APF_WARPS), heads),
                    32 * APF_WARPS as u32,
                    smem
                ),
                q.ptr,
                cache.kp,
                cache.vp,
                step.positions(self)?,
                step.table_offsets(self)?,
                step.tables(self)?,
                n as i32,
                heads as i32,
                layout.kv_heads as i32,
                layout.block_size as i32,
                scale,
                out.ptr
            );
            return Ok(());
        }
        let smem = (256 + 2 * ATT_CHUNK) * 4;
        launch!(
            self,
            "attention",
            cfg2((n, heads), ATT_THREADS, smem),
            q.ptr,
            cache.kp,
            cache.vp,
            step.positions(self)?,
            step.table_offsets(self)?,
            step.tables(self)?,
            heads as i32,
            layout.kv_heads as i32,
            layout.head_dim as i32,
            layout.block_size as i32,
            scale,
            out.ptr
        );
        Ok(())
    }

    fn matmul_swiglu(
        &self,
        x: &Buffer,
        gate: &Weight,
        up: &Weight,
        rows: MatmulRows,
        gate_out: &mut Buffer,
        up_out: &mut Buffer,
        out: &mut Buffer,
    ) -> Result<()> {
        // Packed weights of one shape, format, group and column order at decode: the gated
        // kernel where the format has it for these rows (`gated_decode`).
        let (Weight::Quant(g), Weight::Quant(u)) = (gate, up) else {
            return swiglu_in_two_ops(self, x, gate, up, rows, gate_out, up_out, out);
        };
        let n = rows.count;
        let same = (g.format, g.rows, g.cols, g.group, g.post(), g.perm_key())
            == (u.format, u.rows, u.cols, u.group, u.post(), u.perm_key());
        let whole = g.whole_rows(x.ptr);
        if !same || !gated_decode(g.format, n, whole) {
            return swiglu_in_two_ops(self, x, gate, up, rows, gate_out, up_out, out);
        }
        len_check("matmul_swiglu", "x", x.len, n * g.cols)?;
        len_check("matmul_swiglu", "out", out.len, n * g.rows)?;
        self.with_stored_order(x.ptr, g, n, |x| {
            self.qgemv_stored(x, &[&**g, &**u], n, &[out.ptr, out.ptr], true)
        })
    }

    fn silu_mul(&self, gate: &Buffer, up: &Buffer, len: usize, out: &mut Buffer) -> Result<()> {
        contract::silu_mul(gate.len, up.len, out.len, len)?;
        if len == 0 {
            return Ok(());
        }
        launch!(
            self,
            "silu_mul",
            grid1(len, 256),
            gate.ptr,
            up.ptr,
            len as u32,
            out.ptr
        );
        Ok(())
    }

    fn add(&self, x: &mut Buffer, y: &Buffer, len: usize) -> Result<()> {
        contract::add(x.len, y.len, len)?;
        if len == 0 {
            return Ok(());
        }
        launch!(self, "add", grid1(len, 256), x.ptr, y.ptr, len as u32);
        Ok(())
    }

    /// A launch of its own, one block a row. Folding it into the decode GEMVs on either side
    /// (the producer adding into the residual and leaving per-strip sums of squares, the
    /// consumers scaling by 1/rms: branch `cuda-normfold`) took 63 launches a token out of
    /// llama3-8b's decode and measured 5% slower on the H100 (fourteenth session,
    /// docs/benchmarks.md): behind programmatic launches this kernel costs little, while work
    /// added to every block of a GEMV of several waves does.
    fn add_rms_norm(
        &self,
        x: &mut Buffer,
        y: &Buffer,
        weight: &Buffer,
        eps: f32,
        rows: usize,
        dim: usize,
        out: &mut Buffer,
    ) -> Result<()> {
        len_check("add_rms_norm", "x", x.len, rows * dim)?;
        len_check("add_rms_norm", "y", y.len, rows * dim)?;
        len_check("add_rms_norm", "weight", weight.len, dim)?;
        len_check("add_rms_norm", "out", out.len, rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        // The kernel and thread count of rms_norm: the same sums in the same order.
        let (name, threads) = norm_launch("add_rms_norm", dim);
        launch!(
            self,
            &name,
            cfg2((rows, 1), threads, 0),
            x.ptr,
            y.ptr,
            weight.ptr,
            eps,
            dim as i32,
            out.ptr
        );
        Ok(())
    }

    fn softmax(&self, x: &mut Buffer, rows: usize, dim: usize) -> Result<()> {
        len_check("softmax", "x", x.len, rows * dim)?;
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        launch!(self, "softmax", cfg2((rows, 1), 256, 0), x.ptr, dim as i32);
        Ok(())
    }

    fn gather_logit_rows(
        &self,
        x: &Buffer,
        step: &Step,
        dim: usize,
        out: &mut Buffer,
    ) -> Result<()> {
        contract::gather_logit_rows(x.len, out.len, &step.batch, dim)?;
        let rows = &step.batch.logit_rows;
        if rows.is_empty() || dim == 0 {
            return Ok(());
        }
        launch!(
            self,
            "gather_rows",
            cfg2((dim.div_ceil(256), rows.len()), 256, 0),
            x.ptr,
            step.logit_rows(self)?,
            dim as i32,
            out.ptr
        );
        Ok(())
    }

    fn queue_argmax_rows(&self, x: &Buffer, rows: usize, dim: usize) -> Result<()> {
        len_check("queue_argmax_rows", "x", x.len, rows * dim)?;
        let mut greedy = self.greedy.lock().unwrap();
        check_argmax_room(greedy.pending.len())?;
        if greedy.device.as_ref().map_or(0, |d| d.len()) < rows {
            // Nothing may still be copying into or out of the buffers being replaced, and the
            // recordings whose embedding reads the ids go.
            self.before_realloc()?;
            let len = rows.next_power_of_two().max(DECODE_MAX_ROWS);
            greedy.device = Some(self.stream.alloc_zeros::<u32>(len).map_err(dev)?);
            greedy.stage = (0..ARGMAX_PENDING)
                .map(|_| self.alloc_mapped_ids(len))
                .collect::<Result<_>>()?;
        }
        let stage = greedy.next_stage;
        if rows > 0 {
            let ids = self.ptr(greedy.device.as_ref().unwrap());
            launch!(
                self,
                "argmax_rows",
                cfg2((rows, 1), ARGMAX_THREADS, 0),
                x.ptr,
                dim as i32,
                ids,
                greedy.stage[stage].1
            );
        }
        let written = self.stream.record_event(None).map_err(dev)?;
        greedy.pending.push_back((stage, rows, written));
        greedy.next_stage = (stage + 1) % ARGMAX_PENDING;
        greedy.latest_rows = rows;
        greedy.latest_dim = dim;
        Ok(())
    }

    fn take_argmax(&self) -> Result<Vec<u32>> {
        let mut greedy = self.greedy.lock().unwrap();
        let Some((stage, rows, written)) = greedy.pending.pop_front() else {
            return Err(KernelError::Shape("take_argmax: no ids queued".into()));
        };
        if rows == 0 {
            return Ok(Vec::new());
        }
        written.synchronize().map_err(dev)?;
        Ok(greedy.stage[stage].0.as_slice().map_err(dev)?[..rows].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every decode kernel the host may ask for is in the modules it compiles, and a build with a
    /// ring in dynamic shared memory had that memory granted at load (`ring_fits`, by name) for
    /// the ring its launch sizes. Checked over the formats, row counts, launch shapes and two
    /// GPUs' shared memory: an H100's or H200's 228 KB an SM, and the 100 KB of sm_86/sm_89.
    #[test]
    fn every_decode_plan_names_a_compiled_kernel() {
        let compiled: std::collections::HashSet<String> = modules((9, 0))
            .into_iter()
            .flat_map(|(_, names)| names)
            .collect();
        let mut checked = 0;
        for (sms, smem_per_sm) in [(132, 228 << 10), (128, 100 << 10)] {
            for format in QuantFormat::ALL {
                for strips in [1, 64, 132, 256, 264, 396, 529, 640, 1057, 1792, 8016] {
                    let side = (strips / 8).max(1);
                    let launches: [&[usize]; 3] =
                        [&[strips], &[strips, side, side], &[strips, strips]];
                    for (weights, glu) in launches.into_iter().zip([false, false, true]) {
                        let rows = 1..=max_decode_rows(format);
                        let sides = launch_sides().into_iter();
                        for ((cols, whole, post, halves), rows) in
                            sides.flat_map(|side| rows.clone().map(move |r| (side, r)))
                        {
                            if glu && !gated_decode(format, rows, whole) {
                                continue;
                            }
                            let shape = DecodeShape {
                                format,
                                post,
                                halves,
                                cols,
                                strips: weights,
                                rows,
                                glu,
                                whole,
                            };
                            let plan = decode_plan(&shape, sms, smem_per_sm);
                            assert!(
                                compiled.contains(&plan.name),
                                "{plan:?} for {format} {strips} strips × {cols}, {rows} rows, \
                                 glu {glu}: no such kernel"
                            );
                            let granted = granted_ring(&plan.name, smem_per_sm).map(|(_, b)| b);
                            assert_eq!(granted, plan.ring, "{plan:?}: its ring at load");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 100_000, "{checked} launches");
    }

    /// The columns, alignment and scale placement (after the mma; groups of half a chunk) a
    /// launch may have.
    fn launch_sides() -> Vec<(usize, bool, bool, bool)> {
        let mut sides = Vec::new();
        for cols in [4096, 8192, 14336, 28672] {
            for whole in [true, false] {
                for (post, halves) in [(true, false), (false, false), (false, true)] {
                    sides.push((cols, whole, post, halves));
                }
            }
        }
        sides
    }
}
