// Dense decode matmul: out[r, n] = sum_k x[r, k] * W[n, k] for up to 16 rows of x (bf16) against
// a row-major f32, f16 or bf16 weight, f32 accumulation.
//
// A block of GEMV_WARPS warps covers GEMV_FEATS * GEMV_WARPS output features; x is staged through
// shared memory in chunks of GEMV_KC columns (all M rows), and each lane reads 8 weight elements
// of each of its warp's GEMV_FEATS features per step (16-byte loads for 16-bit weights), reusing
// each x vector across those features. Bound: streaming W once (bandwidth); at 16 rows the FMAs
// (16 per weight) come close to the FP32 rate, which is where tensor cores take over.

#define GEMV_WARPS 4
#define GEMV_FEATS 4
#define GEMV_KC 1024

// Eight consecutive weight elements (16- or 32-byte aligned) widened to float.
template <class L>
__device__ __forceinline__ void load8(const typename L::T* p, float* v) {
    if constexpr (L::KIND == 0) {
        float4 a = *(const float4*)p, b = *(const float4*)(p + 4);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
        uint4 a = *(const uint4*)p;
        u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if constexpr (L::KIND == 2) {
                v[2 * i] = bf_lo(w[i]);
                v[2 * i + 1] = bf_hi(w[i]);
            } else {
                v[2 * i] = h2f((f16_t)(w[i] & 0xffff));
                v[2 * i + 1] = h2f((f16_t)(w[i] >> 16));
            }
        }
    }
}

// Vector path: k % 8 == 0 (16-byte aligned rows). M: rows rounded up to 1, 2, 4, 8 or 16.
template <class L, int M>
__device__ void gemv_vec(const typename L::T* w, const bf16_t* x, int m, int k, int n, bf16_t* out) {
    __shared__ __align__(16) bf16_t xs[M * GEMV_KC];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int f0 = (blockIdx.x * GEMV_WARPS + warp) * GEMV_FEATS;
    float acc[GEMV_FEATS][M];
#pragma unroll
    for (int f = 0; f < GEMV_FEATS; f++)
#pragma unroll
        for (int r = 0; r < M; r++) acc[f][r] = 0.0f;
    for (int kc = 0; kc < k; kc += GEMV_KC) {
        const int kn = min(GEMV_KC, k - kc);
        __syncthreads();
        // Stage x[0..M, kc..kc+kn] 8 elements at a time (kn is a multiple of 8).
        for (int i = threadIdx.x; i < M * (GEMV_KC / 8); i += blockDim.x) {
            int r = i / (GEMV_KC / 8), c = (i % (GEMV_KC / 8)) * 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (r < m && c < kn) v = *(const uint4*)(x + (size_t)r * k + kc + c);
            *(uint4*)(xs + r * GEMV_KC + c) = v;
        }
        __syncthreads();
#pragma unroll 2
        for (int c = lane * 8; c < kn; c += 256) {
            float wv[GEMV_FEATS][8];
#pragma unroll
            for (int f = 0; f < GEMV_FEATS; f++) {
                int fn = min(f0 + f, n - 1);
                load8<L>(w + (size_t)fn * k + kc + c, wv[f]);
            }
#pragma unroll
            for (int r = 0; r < M; r++) {
                float xv[8];
                load8<LdBF16>(xs + r * GEMV_KC + c, xv);
#pragma unroll
                for (int f = 0; f < GEMV_FEATS; f++)
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[f][r] += wv[f][e] * xv[e];
            }
        }
    }
#pragma unroll
    for (int f = 0; f < GEMV_FEATS; f++)
#pragma unroll
        for (int r = 0; r < M; r++) {
            float s = warp_sum(acc[f][r]);
            if (lane == 0 && r < m && f0 + f < n) out[(size_t)r * n + f0 + f] = f2bf(s);
        }
}

// Any k: one warp per feature, scalar loads.
template <class L>
__device__ void gemv_any(const typename L::T* w, const bf16_t* x, int m, int k, int n, bf16_t* out) {
    const int lane = threadIdx.x & 31;
    const int f = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (f >= n) return;
    float acc[16];
#pragma unroll
    for (int r = 0; r < 16; r++) acc[r] = 0.0f;
    for (int c = lane; c < k; c += 32) {
        float wv = L::ld(w + (size_t)f * k + c);
#pragma unroll
        for (int r = 0; r < 16; r++)
            if (r < m) acc[r] += wv * bf2f(x[(size_t)r * k + c]);
    }
#pragma unroll
    for (int r = 0; r < 16; r++) {
        float s = warp_sum(acc[r]);
        if (lane == 0 && r < m) out[(size_t)r * n + f] = f2bf(s);
    }
}

#define GEMV_VEC(name, L, M) \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) name(const L::T* w, const bf16_t* x, int m, int k, int n, bf16_t* out) { \
        pdl_enter(); \
        gemv_vec<L, M>(w, x, m, k, n, out); }
#define GEMV_ALL(suffix, L) \
    GEMV_VEC(gemv_##suffix##_1, L, 1) GEMV_VEC(gemv_##suffix##_2, L, 2) GEMV_VEC(gemv_##suffix##_4, L, 4) \
    GEMV_VEC(gemv_##suffix##_8, L, 8) GEMV_VEC(gemv_##suffix##_16, L, 16) \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_##suffix##_any(const L::T* w, const bf16_t* x, int m, int k, int n, bf16_t* out) { \
        pdl_enter(); \
        gemv_any<L>(w, x, m, k, n, out); }

GEMV_ALL(f32, LdF32)
GEMV_ALL(f16, LdF16)
GEMV_ALL(bf16, LdBF16)
