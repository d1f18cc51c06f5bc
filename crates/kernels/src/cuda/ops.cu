// Row and elementwise ops on bf16 activations, f32 arithmetic.

template <class L>
__device__ void embedding_impl(const typename L::T* table, const u32* tokens, int dim, bf16_t* out) {
    pdl_enter();
    int t = blockIdx.y;
    const typename L::T* row = table + (size_t)tokens[t] * dim;
    for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < dim; d += gridDim.x * blockDim.x)
        out[(size_t)t * dim + d] = f2bf(L::ld(row + d));
}
extern "C" __global__ void embedding_f32(const float* table, const u32* tokens, int dim, bf16_t* out) {
    embedding_impl<LdF32>(table, tokens, dim, out);
}
extern "C" __global__ void embedding_f16(const f16_t* table, const u32* tokens, int dim, bf16_t* out) {
    embedding_impl<LdF16>(table, tokens, dim, out);
}
extern "C" __global__ void embedding_bf16(const bf16_t* table, const u32* tokens, int dim, bf16_t* out) {
    embedding_impl<LdBF16>(table, tokens, dim, out);
}

// One block per row (any dim; the host takes rms_norm_v / add_rms_norm_v when dim % 8 == 0).
extern "C" __global__ void rms_norm(const bf16_t* x, const bf16_t* w, float eps, int dim, bf16_t* out) {
    pdl_enter();
    const bf16_t* xr = x + (size_t)blockIdx.x * dim;
    bf16_t* o = out + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = bf2f(xr[i]);
        ss += v * v;
    }
    ss = block_reduce(ss, false);
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = f2bf(bf2f(xr[i]) * inv * bf2f(w[i]));
}

// x += y, then out = rms_norm(x) * w, one block per row: the residual update and the next norm in
// one launch, the same values as `add` then `rms_norm` (each thread re-reads only what it wrote).
extern "C" __global__ void add_rms_norm(bf16_t* x, const bf16_t* y, const bf16_t* w, float eps, int dim, bf16_t* out) {
    pdl_enter();
    bf16_t* xr = x + (size_t)blockIdx.x * dim;
    const bf16_t* yr = y + (size_t)blockIdx.x * dim;
    bf16_t* o = out + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const bf16_t s = f2bf(bf2f(xr[i]) + bf2f(yr[i]));
        xr[i] = s;
        const float v = bf2f(s);
        ss += v * v;
    }
    ss = block_reduce(ss, false);
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = f2bf(bf2f(xr[i]) * inv * bf2f(w[i]));
}

// The same two norms for dim % 8 == 0, one block per row of at least dim / (8 NORM_V) threads:
// each thread loads its (up to NORM_V) 16-byte words of x, y and w at once and keeps them in
// registers, so a row costs one memory round trip. The scalar loops above store x[i] between
// loads that may alias it, which serialises a round trip per element: ~8.4 us per llama3-8b
// decode norm on the H100 (63 of them a token, 15% of the step), where the bound is a few
// hundred bytes at latency, ~2 us.
#define NORM_V 4
template <bool ADD>
__device__ __forceinline__ void norm_vec(bf16_t* x, const bf16_t* y, const bf16_t* w, float eps, int dim,
                                         bf16_t* out) {
    pdl_enter();
    const int words = dim >> 3;
    uint4* xr = (uint4*)(x + (size_t)blockIdx.x * dim);
    const uint4* yr = (const uint4*)(y + (size_t)blockIdx.x * dim);
    uint4* o = (uint4*)(out + (size_t)blockIdx.x * dim);
    uint4 xv[NORM_V], yv[NORM_V], wv[NORM_V];
#pragma unroll
    for (int j = 0; j < NORM_V; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < words) {
            xv[j] = xr[i];
            if (ADD) yv[j] = yr[i];
            wv[j] = ((const uint4*)w)[i];
        }
    }
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_V; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < words) {
            u32* a = (u32*)&xv[j];
            if (ADD) {
                const u32* b = (const u32*)&yv[j];
#pragma unroll
                for (int e = 0; e < 4; e++) a[e] = pack_bf2(bf_lo(a[e]) + bf_lo(b[e]), bf_hi(a[e]) + bf_hi(b[e]));
                xr[i] = xv[j];
            }
#pragma unroll
            for (int e = 0; e < 4; e++) ss += bf_lo(a[e]) * bf_lo(a[e]) + bf_hi(a[e]) * bf_hi(a[e]);
        }
    }
    ss = block_reduce(ss, false);
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma unroll
    for (int j = 0; j < NORM_V; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < words) {
            const u32* a = (const u32*)&xv[j];
            const u32* b = (const u32*)&wv[j];
            u32 r[4];
#pragma unroll
            for (int e = 0; e < 4; e++) r[e] = pack_bf2(bf_lo(a[e]) * inv * bf_lo(b[e]), bf_hi(a[e]) * inv * bf_hi(b[e]));
            o[i] = make_uint4(r[0], r[1], r[2], r[3]);
        }
    }
}
extern "C" __global__ void rms_norm_v(const bf16_t* x, const bf16_t* w, float eps, int dim, bf16_t* out) {
    norm_vec<false>((bf16_t*)x, x, w, eps, dim, out);
}
extern "C" __global__ void add_rms_norm_v(bf16_t* x, const bf16_t* y, const bf16_t* w, float eps, int dim, bf16_t* out) {
    norm_vec<true>(x, y, w, eps, dim, out);
}

// Dims i and i + hd / 2 of a head after rope (cs: the position's hd / 2 cos values, then its
// sin values), rounded to bf16: what rope stores, and what decode attention's fused rope uses.
__device__ __forceinline__ float2 rope_pair(const bf16_t* x, const bf16_t* cs, int i, int half) {
    const float x0 = bf2f(x[i]), x1 = bf2f(x[i + half]), c = bf2f(cs[i]), s = bf2f(cs[half + i]);
    return make_float2(bf2f(f2bf(x0 * c - x1 * s)), bf2f(f2bf(x1 * c + x0 * s)));
}

// Grid (tokens, heads); pairs element i with i + head_dim/2.
extern "C" __global__ void rope(bf16_t* x, const u32* positions, int heads, int hd, const bf16_t* table) {
    pdl_enter();
    int t = blockIdx.x, h = blockIdx.y, half = hd / 2;
    bf16_t* p = x + ((size_t)t * heads + h) * hd;
    const bf16_t* cs = table + (size_t)positions[t] * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float2 r = rope_pair(p, cs, i, half);
        p[i] = f2bf(r.x);
        p[i + half] = f2bf(r.y);
    }
}

// rope of q and k and write_kv of k and v in one launch: grid (tokens, heads + kv_heads), a block
// per head; a kv-head block rotates its key head, stores it back and into the cache slot, and
// copies the value head there. The same values as the three ops.
extern "C" __global__ void rope_write_kv(bf16_t* q, bf16_t* k, const bf16_t* v, bf16_t* kc, bf16_t* vc,
                                         const u32* positions, const u32* slots, int heads, int kv_heads, int hd,
                                         const bf16_t* table) {
    pdl_enter();
    const int t = blockIdx.x, h = blockIdx.y, half = hd / 2;
    const bool is_k = h >= heads;
    const int kh = h - heads;
    bf16_t* p = is_k ? k + ((size_t)t * kv_heads + kh) * hd : q + ((size_t)t * heads + h) * hd;
    const bf16_t* cs = table + (size_t)positions[t] * hd;
    const size_t dst = (size_t)slots[t] * kv_heads * hd + (size_t)kh * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float2 r = rope_pair(p, cs, i, half);
        const bf16_t r0 = f2bf(r.x), r1 = f2bf(r.y);
        p[i] = r0;
        p[i + half] = r1;
        if (is_k) {
            const bf16_t* vp = v + ((size_t)t * kv_heads + kh) * hd;
            kc[dst + i] = r0;
            kc[dst + i + half] = r1;
            vc[dst + i] = vp[i];
            vc[dst + i + half] = vp[i + half];
        }
    }
}

// Grid (tokens); each token's keys and values go to its slot.
extern "C" __global__ void write_kv(bf16_t* kc, bf16_t* vc, const bf16_t* k, const bf16_t* v, const u32* slots, int sw) {
    pdl_enter();
    int t = blockIdx.x;
    size_t dst = (size_t)slots[t] * sw, src = (size_t)t * sw;
    for (int i = threadIdx.x; i < sw; i += blockDim.x) {
        kc[dst + i] = k[src + i];
        vc[dst + i] = v[src + i];
    }
}

extern "C" __global__ void silu_mul(const bf16_t* gate, const bf16_t* up, u32 n, bf16_t* out) {
    pdl_enter();
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        out[i] = f2bf(silu_times(bf2f(gate[i]), bf2f(up[i])));
    }
}

extern "C" __global__ void add(bf16_t* x, const bf16_t* y, u32 n) {
    pdl_enter();
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        x[i] = f2bf(bf2f(x[i]) + bf2f(y[i]));
}

// One block per row, in place.
extern "C" __global__ void softmax(bf16_t* x, int dim) {
    pdl_enter();
    bf16_t* r = x + (size_t)blockIdx.x * dim;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) m = fmaxf(m, bf2f(r[i]));
    m = block_reduce(m, true);
    float s = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += expf(bf2f(r[i]) - m);
    s = block_reduce(s, false);
    float inv = 1.0f / s;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) r[i] = f2bf(expf(bf2f(r[i]) - m) * inv);
}

// Grid (ceil(dim / threads), rows).
extern "C" __global__ void gather_rows(const bf16_t* x, const u32* rows, int dim, bf16_t* out) {
    pdl_enter();
    int i = blockIdx.y;
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d < dim) out[(size_t)i * dim + d] = x[(size_t)rows[i] * dim + d];
}

// Rows of activations in a weight's stored column order (act-order: stored column j multiplies
// input column perm[j]); grid (column blocks, rows).
extern "C" __global__ void permute_cols(const bf16_t* x, const u32* perm, int k, bf16_t* out) {
    pdl_enter();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < k) out[(size_t)blockIdx.y * k + j] = x[(size_t)blockIdx.y * k + perm[j]];
}

// Dense weights to bf16 (rows n0..n1 of a row-major matrix of k columns), for cuBLAS.
extern "C" __global__ void f32_to_bf16(const float* src, u64 n, bf16_t* dst) {
    pdl_enter();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) dst[i] = f2bf(src[i]);
}
extern "C" __global__ void f16_to_bf16(const f16_t* src, u64 n, bf16_t* dst) {
    pdl_enter();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) dst[i] = f2bf(h2f(src[i]));
}

// A device-to-device copy at full width, the 100% line of the memory-bound benchmarks (launched
// plainly, not as a programmatic dependent).
extern "C" __global__ void copy_u4(const uint4* src, u64 n, uint4* dst) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) dst[i] = src[i];
}

// Index of the largest value of each row (the first on ties, NaN never, 0 for a row without a
// number: `marlin_kernels::argmax`), one block of ARGMAX_THREADS per row, written to `out` (where
// the next step's embedding reads them) and to mapped host memory; greedy decoding reads these ids
// instead of the logits (128k bf16 a token for Llama 3, then a host scan:
// ~0.1 ms a token with the GPU idle). Each thread scans its 16-byte words in order (so a strict
// > keeps the first index), then the block reduces (value, index) pairs. Bound: one read of the
// row by one SM (256 KiB for 128k logits, a few us).
#define ARGMAX_THREADS 1024
#define ARGMAX_NONE 0xffffffffu
__device__ __forceinline__ void argmax_take(float& best, u32& bi, float v, u32 i) {
    if (i != ARGMAX_NONE && (bi == ARGMAX_NONE || v > best || (v == best && i < bi))) {
        best = v;
        bi = i;
    }
}
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS) argmax_rows(const bf16_t* x, int dim, u32* out, u32* host_out) {
    pdl_enter();
    __shared__ float sb[32];
    __shared__ u32 si[32];
    const bf16_t* r = x + (size_t)blockIdx.x * dim;
    float best = NEG_INF;
    u32 bi = ARGMAX_NONE;
    auto scan = [&](float v, u32 i) {
        if (v == v && (bi == ARGMAX_NONE || v > best)) {
            best = v;
            bi = i;
        }
    };
    if ((dim & 7) == 0) {
        for (int i = threadIdx.x * 8; i < dim; i += ARGMAX_THREADS * 8) {
            const uint4 w = *(const uint4*)(r + i);
            const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                scan(bf_lo(ws[e]), i + 2 * e);
                scan(bf_hi(ws[e]), i + 2 * e + 1);
            }
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += ARGMAX_THREADS) scan(bf2f(r[i]), i);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, o);
        const u32 i = __shfl_xor_sync(0xffffffffu, bi, o);
        argmax_take(best, bi, v, i);
    }
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) {
        sb[w] = best;
        si[w] = bi;
    }
    __syncthreads();
    if (w == 0) {
        best = sb[lane];
        bi = si[lane];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float v = __shfl_xor_sync(0xffffffffu, best, o);
            const u32 i = __shfl_xor_sync(0xffffffffu, bi, o);
            argmax_take(best, bi, v, i);
        }
        if (lane == 0) {
            const u32 id = bi == ARGMAX_NONE ? 0u : bi;
            out[blockIdx.x] = id;
            host_out[blockIdx.x] = id;  // mapped host memory: no copy queued after the kernel
        }
    }
}
