// Row and elementwise ops on bf16 activations, f32 arithmetic.

template <class L>
__device__ void embedding_impl(const typename L::T* table, const u32* tokens, int dim, bf16_t* out) {
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

// One block per row.
extern "C" __global__ void rms_norm(const bf16_t* x, const bf16_t* w, float eps, int dim, bf16_t* out) {
    griddep_launch();  // a decode GEMV reads the output next
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
    griddep_launch();  // a decode GEMV reads the output next
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

// Grid (tokens, heads); pairs element i with i + head_dim/2.
extern "C" __global__ void rope(bf16_t* x, const u32* positions, int heads, int hd, const bf16_t* table) {
    int t = blockIdx.x, h = blockIdx.y, half = hd / 2;
    bf16_t* p = x + ((size_t)t * heads + h) * hd;
    const bf16_t* cs = table + (size_t)positions[t] * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float x0 = bf2f(p[i]), x1 = bf2f(p[i + half]);
        float c = bf2f(cs[i]), s = bf2f(cs[half + i]);
        p[i] = f2bf(x0 * c - x1 * s);
        p[i + half] = f2bf(x1 * c + x0 * s);
    }
}

// rope of q and k and write_kv of k and v in one launch: grid (tokens, heads + kv_heads), a block
// per head; a kv-head block rotates its key head, stores it back and into the cache slot, and
// copies the value head there. The same values as the three ops.
extern "C" __global__ void rope_write_kv(bf16_t* q, bf16_t* k, const bf16_t* v, bf16_t* kc, bf16_t* vc,
                                         const u32* positions, const u32* slots, int heads, int kv_heads, int hd,
                                         const bf16_t* table) {
    const int t = blockIdx.x, h = blockIdx.y, half = hd / 2;
    const bool is_k = h >= heads;
    const int kh = h - heads;
    bf16_t* p = is_k ? k + ((size_t)t * kv_heads + kh) * hd : q + ((size_t)t * heads + h) * hd;
    const bf16_t* cs = table + (size_t)positions[t] * hd;
    const size_t dst = (size_t)slots[t] * kv_heads * hd + (size_t)kh * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float x0 = bf2f(p[i]), x1 = bf2f(p[i + half]);
        float c = bf2f(cs[i]), s = bf2f(cs[half + i]);
        const bf16_t r0 = f2bf(x0 * c - x1 * s), r1 = f2bf(x1 * c + x0 * s);
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
    int t = blockIdx.x;
    size_t dst = (size_t)slots[t] * sw, src = (size_t)t * sw;
    for (int i = threadIdx.x; i < sw; i += blockDim.x) {
        kc[dst + i] = k[src + i];
        vc[dst + i] = v[src + i];
    }
}

extern "C" __global__ void silu_mul(const bf16_t* gate, const bf16_t* up, u32 n, bf16_t* out) {
    griddep_launch();  // a decode GEMV reads the output next
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float g = bf2f(gate[i]);
        out[i] = f2bf(g / (1.0f + expf(-g)) * bf2f(up[i]));
    }
}

extern "C" __global__ void add(bf16_t* x, const bf16_t* y, u32 n) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        x[i] = f2bf(bf2f(x[i]) + bf2f(y[i]));
}

// One block per row, in place.
extern "C" __global__ void softmax(bf16_t* x, int dim) {
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
    int i = blockIdx.y;
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d < dim) out[(size_t)i * dim + d] = x[(size_t)rows[i] * dim + d];
}

// Dense weights to bf16 (rows n0..n1 of a row-major matrix of k columns), for cuBLAS.
extern "C" __global__ void f32_to_bf16(const float* src, u64 n, bf16_t* dst) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) dst[i] = f2bf(src[i]);
}
extern "C" __global__ void f16_to_bf16(const f16_t* src, u64 n, bf16_t* dst) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) dst[i] = f2bf(h2f(src[i]));
}

// A device-to-device copy at full width, the 100% line of the memory-bound benchmarks.
extern "C" __global__ void copy_u4(const uint4* src, u64 n, uint4* dst) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) dst[i] = src[i];
}
