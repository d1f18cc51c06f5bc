//! The op set every backend implements whole, and the batch description a forward step runs on.
//!
//! Model code is generic over `B: Backend` and never asks which backend it runs on. Each op states
//! its shapes; buffers hold f32 activations and are allocated once per workspace, then reused, so
//! the decode path allocates nothing. Ops read and write the leading `rows * dim` elements of a
//! buffer, which lets one workspace serve every batch size up to its capacity.

mod contract;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod step;

pub use marlin_quant::{DenseFormat, HostWeight, QuantFormat, QuantTensor, WeightData};
pub use step::{KvLayout, MatmulRows, SeqSpan, StepBatch};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Shape(String),
    #[error("{backend} backend: {message}")]
    Device { backend: String, message: String },
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// Checks a shape condition, naming the op in the error.
pub(crate) fn check(ok: bool, op: &str, detail: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(KernelError::Shape(format!("{op}: {}", detail())))
    }
}

pub trait Backend: Send + Sync + 'static {
    /// f32 activations (or small f32 vectors such as norm weights and rope tables) on the device.
    type Buffer: Send + Sync;
    /// A weight matrix in this backend's compute layout, made once by `upload_weight`.
    type Weight: Send + Sync;
    /// One layer's keys and values: a pool of fixed-size blocks shared by all sequences.
    type KvCache: Send + Sync;
    /// A `StepBatch` in the form this backend's kernels read.
    type Step: Send + Sync;

    fn name(&self) -> String;

    /// Runs a whole step's ops. A backend with a worker pool enters it once here instead of
    /// once per op (on the CPU that hand-off costs more than a small decode matmul).
    fn run_step<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R {
        step()
    }

    /// Queues a step's device work: `ops` issues it through this backend's ops, on the step it is
    /// handed. A backend may record what `ops` queues for a step of this shape over the buffers
    /// and weights that `key` names, and replay the recording for later such steps instead of
    /// calling `ops` (the CUDA backend does, with CUDA graphs, for decode-sized steps), so `key`
    /// must change whenever any buffer or weight the ops touch does, and `ops` must only queue
    /// work (no reads to the host). The default calls `ops` once.
    fn queue_step<E: From<KernelError>>(
        &self,
        step: &Self::Step,
        key: &[u64],
        mut ops: impl FnMut(&Self::Step) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let _ = key;
        ops(step)
    }

    fn alloc(&self, len: usize) -> Result<Self::Buffer>;
    /// Copies `src` into the first `src.len()` elements of `dst`.
    fn write(&self, dst: &mut Self::Buffer, src: &[f32]) -> Result<()>;
    /// Copies the first `len` elements of `src` to the host.
    fn read(&self, src: &Self::Buffer, len: usize) -> Result<Vec<f32>>;

    /// Converts a host weight (`rows` output features x `cols` inputs) into the compute layout.
    fn upload_weight(&self, weight: &HostWeight) -> Result<Self::Weight>;
    /// (rows, cols) of an uploaded weight.
    fn weight_shape(&self, weight: &Self::Weight) -> (usize, usize);
    fn alloc_kv(&self, layout: KvLayout) -> Result<Self::KvCache>;
    fn prepare_step(&self, batch: &StepBatch) -> Result<Self::Step>;

    /// `out[t, :] = table[token[t], :]` for every token of the step.
    fn embedding(
        &self,
        table: &Self::Weight,
        step: &Self::Step,
        out: &mut Self::Buffer,
    ) -> Result<()>;
    /// `out[r, :] = x[r, :] / rms(x[r, :]) * weight` over `rows` rows of `dim`.
    fn rms_norm(
        &self,
        x: &Self::Buffer,
        weight: &Self::Buffer,
        eps: f32,
        rows: usize,
        dim: usize,
        out: &mut Self::Buffer,
    ) -> Result<()>;
    /// Rotates `x` (tokens x heads x head_dim) in place, pairing element i with i + head_dim/2
    /// (the Hugging Face convention). `table` holds, for each position p, head_dim/2 cosines
    /// then head_dim/2 sines at offset p * head_dim.
    fn rope(
        &self,
        x: &mut Self::Buffer,
        step: &Self::Step,
        heads: usize,
        head_dim: usize,
        table: &Self::Buffer,
    ) -> Result<()>;
    /// `out[r, :] = x[r, :] · weightᵀ` for `rows.count` rows: x is rows x cols, out is rows x
    /// weight rows.
    fn matmul(
        &self,
        x: &Self::Buffer,
        weight: &Self::Weight,
        rows: MatmulRows,
        out: &mut Self::Buffer,
    ) -> Result<()>;
    /// `outs[i][r, :] = x[r, :] · weights[i]ᵀ` for each i: projections of one input (q, k and v;
    /// gate and up), which a backend may run as one launch. The default runs one `matmul` each.
    fn matmul_many(
        &self,
        x: &Self::Buffer,
        weights: &[&Self::Weight],
        rows: MatmulRows,
        outs: &mut [&mut Self::Buffer],
    ) -> Result<()> {
        check(weights.len() == outs.len(), "matmul_many", || {
            format!("{} weights, {} outputs", weights.len(), outs.len())
        })?;
        for (w, out) in weights.iter().zip(outs.iter_mut()) {
            self.matmul(x, w, rows, out)?;
        }
        Ok(())
    }
    /// Stores each new token's key and value (tokens x kv_heads x head_dim) at its slot.
    fn write_kv(
        &self,
        cache: &mut Self::KvCache,
        k: &Self::Buffer,
        v: &Self::Buffer,
        step: &Self::Step,
    ) -> Result<()>;
    /// `rope` of q (`heads` heads) and of k (`kv_heads` heads), then `write_kv` of k and v: the
    /// per-token work between the projections and attention, which a backend may run as one
    /// launch. The default runs the three ops.
    #[allow(clippy::too_many_arguments)]
    fn rope_write_kv(
        &self,
        q: &mut Self::Buffer,
        k: &mut Self::Buffer,
        v: &Self::Buffer,
        cache: &mut Self::KvCache,
        step: &Self::Step,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        table: &Self::Buffer,
    ) -> Result<()> {
        self.rope(q, step, heads, head_dim, table)?;
        self.rope(k, step, kv_heads, head_dim, table)?;
        self.write_kv(cache, k, v, step)
    }
    /// Causal attention of each new token's query heads over its sequence's cached keys and
    /// values up to and including its own position; query head h reads kv head
    /// h / (heads / kv_heads). q and out are tokens x heads x head_dim.
    fn attention(
        &self,
        q: &Self::Buffer,
        cache: &Self::KvCache,
        step: &Self::Step,
        heads: usize,
        scale: f32,
        out: &mut Self::Buffer,
    ) -> Result<()>;
    /// `rope_write_kv`, then `attention` of the rotated q: the whole of attention from the
    /// projections, which a backend may run as one launch. Afterwards q and k hold either the
    /// rotated heads or the projections as given (the backend's choice); the cache and `out` are
    /// as the two ops leave them. The default runs the two ops.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention(
        &self,
        q: &mut Self::Buffer,
        k: &mut Self::Buffer,
        v: &Self::Buffer,
        cache: &mut Self::KvCache,
        step: &Self::Step,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        table: &Self::Buffer,
        scale: f32,
        out: &mut Self::Buffer,
    ) -> Result<()> {
        self.rope_write_kv(q, k, v, cache, step, heads, kv_heads, head_dim, table)?;
        self.attention(q, cache, step, heads, scale, out)
    }
    /// `matmul_many` of x by gate and up into `gate_out` and `up_out`, then `silu_mul` of the two
    /// into `out`: a gated feed-forward's first half, which a backend may run as one launch.
    /// Afterwards `gate_out` and `up_out` hold the projections or what they held before (the
    /// backend's choice). The default runs the two ops.
    #[allow(clippy::too_many_arguments)]
    fn matmul_swiglu(
        &self,
        x: &Self::Buffer,
        gate: &Self::Weight,
        up: &Self::Weight,
        rows: MatmulRows,
        gate_out: &mut Self::Buffer,
        up_out: &mut Self::Buffer,
        out: &mut Self::Buffer,
    ) -> Result<()> {
        swiglu_in_two_ops(self, x, gate, up, rows, gate_out, up_out, out)
    }
    /// `out = silu(gate) * up`, elementwise over `len` elements.
    fn silu_mul(
        &self,
        gate: &Self::Buffer,
        up: &Self::Buffer,
        len: usize,
        out: &mut Self::Buffer,
    ) -> Result<()>;
    /// `x += y` over `len` elements.
    fn add(&self, x: &mut Self::Buffer, y: &Self::Buffer, len: usize) -> Result<()>;
    /// `add` then `rms_norm` of the sum (`rows` rows of `dim`): the residual update and the next
    /// norm, which a backend may fuse. The default runs the two ops.
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm(
        &self,
        x: &mut Self::Buffer,
        y: &Self::Buffer,
        weight: &Self::Buffer,
        eps: f32,
        rows: usize,
        dim: usize,
        out: &mut Self::Buffer,
    ) -> Result<()> {
        self.add(x, y, rows * dim)?;
        self.rms_norm(x, weight, eps, rows, dim, out)
    }
    /// Softmax of each of `rows` rows of `dim`, in place.
    fn softmax(&self, x: &mut Self::Buffer, rows: usize, dim: usize) -> Result<()>;
    /// Copies the rows named by the step's `logit_rows` (rows of `dim`) to the front of `out`.
    fn gather_logit_rows(
        &self,
        x: &Self::Buffer,
        step: &Self::Step,
        dim: usize,
        out: &mut Self::Buffer,
    ) -> Result<()>;
    /// Queues `argmax` of each of the first `rows` rows of `dim` in `x` (greedy decoding reads
    /// one id a row instead of the logits); `take_argmax` returns the ids. The latest ids also
    /// stay with the backend, where a step whose batch is `tokens_from_argmax` takes them as its
    /// tokens, so a decode loop queues step t + 1 before it waits for step t's ids. At most
    /// `ARGMAX_PENDING` results wait to be taken.
    fn queue_argmax_rows(&self, x: &Self::Buffer, rows: usize, dim: usize) -> Result<()>;
    /// The ids of the oldest `queue_argmax_rows` not yet taken (waits for the device).
    fn take_argmax(&self) -> Result<Vec<u32>>;
}

/// How many `Backend::queue_argmax_rows` results may wait to be taken: the ids of the step the
/// host reads and of the one queued behind it.
pub const ARGMAX_PENDING: usize = 2;

/// The error of a `queue_argmax_rows` with `ARGMAX_PENDING` results already waiting.
pub(crate) fn check_argmax_room(pending: usize) -> Result<()> {
    check(pending < ARGMAX_PENDING, "queue_argmax_rows", || {
        format!("{ARGMAX_PENDING} results wait to be taken (take_argmax)")
    })
}

/// `Backend::matmul_swiglu` as its two ops, for backends that fuse it only for some shapes.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_in_two_ops<B: Backend + ?Sized>(
    b: &B,
    x: &B::Buffer,
    gate: &B::Weight,
    up: &B::Weight,
    rows: MatmulRows,
    gate_out: &mut B::Buffer,
    up_out: &mut B::Buffer,
    out: &mut B::Buffer,
) -> Result<()> {
    b.matmul_many(x, &[gate, up], rows, &mut [&mut *gate_out, &mut *up_out])?;
    let (n, _) = b.weight_shape(gate);
    b.silu_mul(gate_out, up_out, rows.count * n, out)
}

/// The index of the largest value of `row`: the first on ties, NaN never (0 for a row without a
/// number). What `Backend::queue_argmax_rows` computes for each row, and greedy sampling on the
/// host.
///
/// The max over sixteen lanes (`f32::max` skips NaN) vectorises, then the first position
/// holding it is the lowest index among ties: greedy decoding runs this over the whole
/// vocabulary for every sequence of every step (a scalar compare-and-branch scan took 3% of a
/// 32-sequence `marlin bench` step).
pub fn argmax(row: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v);
        }
    }
    let max = tail
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    row.iter().position(|&v| v == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    #[test]
    fn argmax_takes_the_first_largest_number() {
        let nan = f32::NAN;
        assert_eq!(super::argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
        assert_eq!(super::argmax(&[nan, -1.0, nan, 0.5, 0.5]), 3);
        assert_eq!(super::argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(super::argmax(&[nan, f32::NEG_INFINITY]), 1);
        assert_eq!(super::argmax(&[nan, nan]), 0);
        assert_eq!(super::argmax(&[]), 0);
    }

    #[test]
    fn argmax_matches_a_plain_scan_on_long_rows() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        // Few distinct values so ties land in different lanes and chunks; NaN and infinities.
        let mut rng = StdRng::seed_from_u64(7);
        let pick = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, -2.0, 0.5, 3.0];
        for len in [1, 15, 16, 17, 33, 1000, 49152, 49153] {
            for _ in 0..20 {
                let kinds = rng.random_range(2..=pick.len());
                let row: Vec<f32> = (0..len).map(|_| pick[rng.random_range(0..kinds)]).collect();
                let mut want = 0;
                let mut best: Option<f32> = None;
                for (i, &v) in row.iter().enumerate() {
                    if !v.is_nan() && best.is_none_or(|b| v > b) {
                        (want, best) = (i, Some(v));
                    }
                }
                assert_eq!(super::argmax(&row), want as u32, "{row:?}");
            }
        }
    }
}
