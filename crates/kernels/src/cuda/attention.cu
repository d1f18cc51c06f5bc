// Causal attention over the paged KV cache, one block of ATT_THREADS per (token, query head).
//
// Keys go by in chunks of ATT_CHUNK: scores into shared memory, then an online-softmax update
// (running max and sum, flash-attention style) and the values accumulated with each thread
// owning one or two output dimensions, so a V row is read coalesced. Prefill and decode are the
// same kernel: a token reads the keys of its sequence up to its own position.
//
// Bound: for decode, reading K and V once (bandwidth); this version has one block per query
// head, so a GQA group reads its K/V from L2 once per head, and a single long sequence gives
// only `heads` blocks: splitting the keys across blocks (flash-decoding) is the next step.

#define ATT_THREADS 128
#define ATT_CHUNK 512

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attention(const bf16_t* q, const bf16_t* kc, const bf16_t* vc, const u32* positions, const u32* bt_off,
          const u32* tables, int heads, int kv_heads, int hd, int bs, float scale, bf16_t* out) {
    extern __shared__ float smem[];
    float* qs = smem;                          // hd
    float* sc = smem + 256;                    // ATT_CHUNK scores, later the partial outputs
    u32* sl = (u32*)(smem + 256 + ATT_CHUNK);  // ATT_CHUNK slot offsets
    const int tid = threadIdx.x, t = blockIdx.x, h = blockIdx.y;
    const int kvh = h / (heads / kv_heads), sw = kv_heads * hd;
    const bf16_t* qp = q + ((size_t)t * heads + h) * hd;
    for (int d = tid; d < hd; d += ATT_THREADS) qs[d] = bf2f(qp[d]);
    const int nkeys = positions[t] + 1;
    const u32* table = tables + bt_off[t];
    // Value phase: P key lanes of hd threads (hd <= 128), or one lane of two dims per thread.
    const int P = hd <= ATT_THREADS ? ATT_THREADS / hd : 1;
    const int kp = hd <= ATT_THREADS ? tid / hd : 0;
    const int d0 = hd <= ATT_THREADS ? tid % hd : tid;
    const bool active = kp < P;
    float acc0 = 0.0f, acc1 = 0.0f, m = NEG_INF, l = 0.0f;
    const bool vec = (hd & 7) == 0;
    __syncthreads();
    for (int c0 = 0; c0 < nkeys; c0 += ATT_CHUNK) {
        const int cn = min(ATT_CHUNK, nkeys - c0);
        float cmax = NEG_INF;
        for (int j = tid; j < cn; j += ATT_THREADS) {
            int kj = c0 + j;
            u32 off = (table[kj / bs] * (u32)bs + (u32)(kj % bs)) * (u32)sw + (u32)(kvh * hd);
            sl[j] = off;
            const bf16_t* kp_ = kc + off;
            float s = 0.0f;
            if (vec) {
                for (int d = 0; d < hd; d += 8) {
                    uint4 w = *(const uint4*)(kp_ + d);
                    s += qs[d] * bf_lo(w.x) + qs[d + 1] * bf_hi(w.x) + qs[d + 2] * bf_lo(w.y) + qs[d + 3] * bf_hi(w.y)
                       + qs[d + 4] * bf_lo(w.z) + qs[d + 5] * bf_hi(w.z) + qs[d + 6] * bf_lo(w.w) + qs[d + 7] * bf_hi(w.w);
                }
            } else {
                for (int d = 0; d < hd; d++) s += qs[d] * bf2f(kp_[d]);
            }
            s *= scale;
            sc[j] = s;
            cmax = fmaxf(cmax, s);
        }
        cmax = block_reduce(cmax, true);
        const float mn = fmaxf(m, cmax);
        const float corr = __expf(m - mn);
        float psum = 0.0f;
        for (int j = tid; j < cn; j += ATT_THREADS) {
            float p = __expf(sc[j] - mn);
            sc[j] = p;
            psum += p;
        }
        psum = block_reduce(psum, false);  // its barriers also publish sc[] and sl[]
        l = l * corr + psum;
        acc0 *= corr;
        acc1 *= corr;
        m = mn;
        if (active) {
            for (int j = kp; j < cn; j += P) {
                const bf16_t* vp = vc + sl[j];
                float p = sc[j];
                acc0 += p * bf2f(vp[d0 < hd ? d0 : 0]);
                if (d0 + ATT_THREADS < hd) acc1 += p * bf2f(vp[d0 + ATT_THREADS]);
            }
        }
        __syncthreads();
    }
    // Combine the key lanes.
    if (active && d0 < hd) sc[kp * hd + d0] = acc0;
    __syncthreads();
    if (kp == 0 && d0 < hd) {
        float a = acc0;
        for (int p = 1; p < P; p++) a += sc[p * hd + d0];
        const float inv = 1.0f / l;
        bf16_t* o = out + ((size_t)t * heads + h) * hd;
        o[d0] = f2bf(a * inv);
        if (d0 + ATT_THREADS < hd) o[d0 + ATT_THREADS] = f2bf(acc1 * inv);
    }
}
