// Quantized decode matmul on tensor cores: out[r, n] = sum_k x[r, k] * W[n, k] for up to 16 rows
// of x (bf16), W in int4 or int8 codes with f16 group scales (and offsets, asymmetric).
//
// Layout (made once at upload, `cuda/quant.rs`): the weight is cut into strips of 16 output
// features and k-tiles of 16 columns; for each (strip, tile) each lane of a warp holds exactly
// its A fragment of `mma.m16n8k16` (8 codes: rows g and g+8, columns 2t, 2t+1, 2t+8, 2t+9, with
// g = lane / 4, t = lane % 4). Int4 fragments are one 32-bit word whose nibble j is the low and
// nibble j+4 the high element of register j; int8 fragments are two words. A lane's fragments for
// 4 (int4) or 2 (int8) consecutive tiles are one 16-byte word, and the 32 lanes' words of a chunk
// are contiguous: each warp load is 512 coalesced bytes.
//
// Dequantization without lookups: int4 `(w >> 4j) & 0x000f000f | 0x43004300` is the bf16x2 pair
// (128 + c), and one bf16x2 FMA subtracts 136 (or 128, asymmetric) exactly; int8 goes through the
// f32 magic 2^23 + c (`prmt`) and one `cvt.rn.bf16x2.f32`. The mma multiplies the integer codes
// with x exactly into f32, and the per-(row, group) scale is applied to each tile's f32 result;
// for asymmetric formats a second mma with an all-ones A gives sum(x) for the offset term.
//
// Work: one block of QG_WARPS warps per strip; the warps take the strip's chunks round-robin (a
// block's loads are one contiguous stream) with QG_UNROLL 16-byte loads in flight per lane, and
// reduce through shared memory at the end, so no second pass and no atomics. x (at most 16 rows)
// is read through L1.
//
// Bound: streaming the codes and scales once from HBM. Dequantization costs about 1.5 integer or
// bf16x2 operations per weight and the tensor cores do the multiply, so unlike an FFMA GEMV the
// time should not grow with the rows up to 16. Measured numbers are in docs/benchmarks.md.

#define QG_WARPS 8
#define QG_UNROLL 4

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ void mma_bf16(float* d, const u32* a, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1),
          "f"(0.0f), "f"(0.0f), "f"(0.0f), "f"(0.0f));
}

// The A fragment of tile i of a 16-byte word, as bf16 integers (c - bias).
template <int BITS, bool ASYM>
__device__ __forceinline__ void dequant_frag(const u32* words, int i, u32* a) {
    if (BITS == 4) {
        const u32 w = words[i];
        const u32 one = 0x3f803f80u, bias = ASYM ? 0xc300c300u : 0xc308c308u;  // 1.0, -128 / -136
#pragma unroll
        for (int j = 0; j < 4; j++) a[j] = fma_bf2(((w >> (4 * j)) & 0x000f000fu) | 0x43004300u, one, bias);
    } else {
        const float bias = ASYM ? 8388608.0f : 8388736.0f;  // 2^23, 2^23 + 128
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 w = words[2 * i + (j >> 1)];
            const int b = (j & 1) * 2;
            float lo = __uint_as_float(__byte_perm(w, 0x4b000000u, 0x7440 + b)) - bias;
            float hi = __uint_as_float(__byte_perm(w, 0x4b000000u, 0x7440 + b + 1)) - bias;
            a[j] = pack_bf2(lo, hi);
        }
    }
}

template <int BITS, bool ASYM, int NB>
__device__ void qgemv(const uint4* codes, const f16_t* scales, const f16_t* offsets, const bf16_t* x, int m,
                      int k, int n, int group, int G, int NP, int CH, bf16_t* out) {
    constexpr int TPU = BITS == 4 ? 4 : 2;
    __shared__ float red[QG_WARPS][NB * 4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int s = blockIdx.x;
    const int row_lo = s * 16 + g, row_hi = row_lo + 8;
    const uint4* base = codes + (size_t)s * CH * 32 + lane;
    const bool xvec = (k & 1) == 0;
    float acc[NB][4];
#pragma unroll
    for (int b = 0; b < NB; b++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[b][j] = 0.0f;
    const u32 ones[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};

    // (A double-buffered version, next chunks loaded before these are multiplied, and scales
    // loaded once per group, ran 8192x8192 m=1 in 43.8 us instead of 31.5: reverted.)
    for (int c0 = warp; c0 < CH; c0 += QG_WARPS * QG_UNROLL) {
        uint4 q[QG_UNROLL];
#pragma unroll
        for (int u = 0; u < QG_UNROLL; u++) {
            const int c = c0 + u * QG_WARPS;
            q[u] = c < CH ? ld_stream(base + (size_t)c * 32) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < QG_UNROLL; u++) {
            const int c = c0 + u * QG_WARPS;
            if (c >= CH) break;
            const u32 words[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
            for (int i = 0; i < TPU; i++) {
                const int k0 = (c * TPU + i) * 16;
                u32 a[4];
                dequant_frag<BITS, ASYM>(words, i, a);
                const int grp = min(k0 / group, G - 1);
                const float s_lo = h2f(scales[(size_t)grp * NP + row_lo]);
                const float s_hi = h2f(scales[(size_t)grp * NP + row_hi]);
                float o_lo = 0.0f, o_hi = 0.0f;
                if (ASYM) {
                    o_lo = h2f(offsets[(size_t)grp * NP + row_lo]);
                    o_hi = h2f(offsets[(size_t)grp * NP + row_hi]);
                }
#pragma unroll
                for (int nb = 0; nb < NB; nb++) {
                    const int br = nb * 8 + g;
                    u32 b0 = 0, b1 = 0;
                    if (br < m) {
                        const bf16_t* xr = x + (size_t)br * k + k0 + 2 * t;
                        if (xvec && k0 + 16 <= k) {
                            b0 = *(const u32*)xr;
                            b1 = *(const u32*)(xr + 8);
                        } else {
                            const int kk = k0 + 2 * t;
                            u32 e0 = kk < k ? xr[0] : 0, e1 = kk + 1 < k ? xr[1] : 0;
                            u32 e8 = kk + 8 < k ? xr[8] : 0, e9 = kk + 9 < k ? xr[9] : 0;
                            b0 = e0 | (e1 << 16);
                            b1 = e8 | (e9 << 16);
                        }
                    }
                    float d[4];
                    mma_bf16(d, a, b0, b1);
                    acc[nb][0] += s_lo * d[0];
                    acc[nb][1] += s_lo * d[1];
                    acc[nb][2] += s_hi * d[2];
                    acc[nb][3] += s_hi * d[3];
                    if (ASYM) {
                        float e[4];
                        mma_bf16(e, ones, b0, b1);
                        acc[nb][0] += o_lo * e[0];
                        acc[nb][1] += o_lo * e[1];
                        acc[nb][2] += o_hi * e[2];
                        acc[nb][3] += o_hi * e[3];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int b = 0; b < NB; b++)
#pragma unroll
        for (int j = 0; j < 4; j++) red[warp][b * 4 + j][lane] = acc[b][j];
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int b = 0; b < NB; b++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float v = 0.0f;
#pragma unroll
                for (int w = 0; w < QG_WARPS; w++) v += red[w][b * 4 + j][lane];
                const int feat = j < 2 ? row_lo : row_hi;
                const int br = b * 8 + 2 * t + (j & 1);
                if (feat < n && br < m) out[(size_t)br * n + feat] = f2bf(v);
            }
    }
}

#define QGEMV(name, BITS, ASYM, NB)                                                                          \
    extern "C" __global__ void __launch_bounds__(QG_WARPS * 32)                                              \
        name(const uint4* codes, const f16_t* scales, const f16_t* offsets, const bf16_t* x, int m, int k, \
             int n, int group, int G, int NP, int CH, bf16_t* out) {                                         \
        qgemv<BITS, ASYM, NB>(codes, scales, offsets, x, m, k, n, group, G, NP, CH, out);                   \
    }
QGEMV(qgemv_int4_8, 4, false, 1)
QGEMV(qgemv_int4_16, 4, false, 2)
QGEMV(qgemv_int4a_8, 4, true, 1)
QGEMV(qgemv_int4a_16, 4, true, 2)
QGEMV(qgemv_int8_8, 8, false, 1)
QGEMV(qgemv_int8_16, 8, false, 2)
QGEMV(qgemv_int8a_8, 8, true, 1)
QGEMV(qgemv_int8a_16, 8, true, 2)

// The re-laid weight back to row-major bf16, strips s0.. (grid.x = strips, block = 32 lanes x
// chunks), for cuBLAS at prefill: row (s - s0) * 16 + r of `dst` is feature s * 16 + r.
template <int BITS, bool ASYM>
__device__ void dequant(const uint4* codes, const f16_t* scales, const f16_t* offsets, int s0, int k, int n,
                        int group, int G, int NP, int CH, bf16_t* dst) {
    constexpr int TPU = BITS == 4 ? 4 : 2;
    const int s = s0 + blockIdx.x, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int c = threadIdx.x >> 5; c < CH; c += blockDim.x >> 5) {
        const uint4 q = codes[((size_t)s * CH + c) * 32 + lane];
        const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < TPU; i++) {
            const int k0 = (c * TPU + i) * 16;
            u32 a[4];
            dequant_frag<BITS, ASYM>(words, i, a);
            const int grp = min(k0 / group, G - 1);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int row = s * 16 + g + (j & 1) * 8;
                const int col = k0 + 2 * t + (j >> 1) * 8;
                if (row >= n) continue;
                const float sc = h2f(scales[(size_t)grp * NP + row]);
                const float of = ASYM ? h2f(offsets[(size_t)grp * NP + row]) : 0.0f;
                bf16_t* d = dst + (size_t)(row - s0 * 16) * k + col;
                if (col < k) d[0] = f2bf(ASYM ? fmaf(bf_lo(a[j]), sc, of) : bf_lo(a[j]) * sc);
                if (col + 1 < k) d[1] = f2bf(ASYM ? fmaf(bf_hi(a[j]), sc, of) : bf_hi(a[j]) * sc);
            }
        }
    }
}
#define DEQUANT(name, BITS, ASYM)                                                                       \
    extern "C" __global__ void name(const uint4* codes, const f16_t* scales, const f16_t* offsets, int s0, \
                                    int k, int n, int group, int G, int NP, int CH, bf16_t* dst) {      \
        dequant<BITS, ASYM>(codes, scales, offsets, s0, k, n, group, G, NP, CH, dst);                     \
    }
DEQUANT(dequant_int4, 4, false)
DEQUANT(dequant_int4a, 4, true)
DEQUANT(dequant_int8, 8, false)
DEQUANT(dequant_int8a, 8, true)

// Embedding rows gathered from a re-laid table (a quantized, possibly tied, embedding): grid
// (column blocks, tokens), one thread per column. Element (row, col) sits in tile (row / 16,
// col / 16) at the lane and register that `mma.m16n8k16`'s A fragment gives it (see the layout
// note at the top); its value is computed as in `dequant`, so the row equals the CPU's rounded to
// bf16.
template <int BITS, bool ASYM>
__device__ void qembed(const u32* codes, const f16_t* scales, const f16_t* offsets, const u32* tokens, int k,
                       int group, int NP, int CH, bf16_t* out) {
    constexpr int TPU = BITS == 4 ? 4 : 2;
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= k) return;
    const int row = (int)tokens[blockIdx.y];
    const int s = row >> 4, rr = row & 15, kt = col >> 4, cc = col & 15;
    const int lane = (rr & 7) * 4 + ((cc & 7) >> 1), j = (rr >> 3) + 2 * (cc >> 3), h = cc & 1;
    const u32* word = codes + (((size_t)s * CH + kt / TPU) * 32 + lane) * 4;
    int c;
    if (BITS == 4) {
        c = (word[kt % TPU] >> (4 * (j + 4 * h))) & 15;
    } else {
        c = (word[(kt % TPU) * 2 + (j >> 1)] >> (8 * ((j & 1) * 2 + h))) & 255;
    }
    const int grp = col / group;
    const float sc = h2f(scales[(size_t)grp * NP + row]);
    const float v = ASYM ? fmaf((float)c, sc, h2f(offsets[(size_t)grp * NP + row]))
                         : (float)(c - (1 << (BITS - 1))) * sc;
    out[(size_t)blockIdx.y * k + col] = f2bf(v);
}
#define QEMBED(name, BITS, ASYM)                                                                       \
    extern "C" __global__ void name(const u32* codes, const f16_t* scales, const f16_t* offsets,       \
                                    const u32* tokens, int k, int group, int NP, int CH, bf16_t* out) { \
        qembed<BITS, ASYM>(codes, scales, offsets, tokens, k, group, NP, CH, out);                       \
    }
QEMBED(embedding_int4, 4, false)
QEMBED(embedding_int4a, 4, true)
QEMBED(embedding_int8, 8, false)
QEMBED(embedding_int8a, 8, true)
