// Causal attention over the paged KV cache, one block of ATT_THREADS per (token, query head).
//
// Keys go by in chunks of ATT_CHUNK: scores into shared memory, then an online-softmax update
// (running max and sum, flash-attention style) and the values accumulated with each thread
// owning one or two output dimensions, so a V row is read coalesced. Prefill and decode are the
// same kernel: a token reads the keys of its sequence up to its own position.
//
// Runs prefill (more than DECODE_MAX_ROWS tokens) and head dims attention_decode does not take.
// Bound: reading K and V once (bandwidth); with one block per query head a GQA group reads its
// K/V from L2 once per head, and a single long sequence gives only `heads` blocks, which is why
// decode steps go to attention_decode below (on an H100 this kernel cost ~13.8 us per context
// token per decoded token in llama3-8b).

#define ATT_THREADS 128
#define ATT_CHUNK 512

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attention(const bf16_t* q, const bf16_t* kc, const bf16_t* vc, const u32* positions, const u32* bt_off,
          const u32* tables, int heads, int kv_heads, int hd, int bs, float scale, bf16_t* out) {
    pdl_enter();
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

// Prefill attention on tensor cores (flash attention with mma.sync m16n8k16, bf16 in, f32 sums):
// a warp takes 16 consecutive tokens of the step and one query head, a block APF_WARPS such
// warps. The warp's rows may belong to several sequences (a step packs them one after another):
// it takes them one sequence at a time, the other rows masked. Per tile of APF_KEYS keys of that
// sequence (up to its rows' last position) the warp copies the keys' K and V rows through its
// block table into its own shared memory (cp.async, 16-byte units swizzled by row so that
// ldmatrix's 8-row reads hit distinct banks), forms S = Q Kᵀ from ldmatrix fragments, masks keys
// past each row's position, updates the running max and sum per row, and adds P V with V's
// fragments from ldmatrix.trans. Q's fragments stay in registers. No barrier: each warp reads only
// what it copied.
//
// Bound aimed at: the mma rate over the causal half of the scores; the K/V rows come from the L2
// (every query head of a GQA group and every 64 tokens re-read them). It replaced the one-block-
// per-(token, head) SIMT kernel above for head dims 64 and 128: a layer of a 512-token llama3-8b
// prefill on the H100 (Nsight Compute, base clocks) 945 -> 110-115 us, which took prefill from
// 12.0k to 25.5k tok/s (fifteenth session). At 115 us it runs ~18 TFLOP/s over the causal scores
// (2.1 GFLOP a layer), far from the mma rate: one warp's copy, wait, and chain of dependent mmas
// per 32-key tile, with nothing overlapping within the warp, is what is left to take.
#define APF_WARPS 4
#define APF_KEYS 32

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// The mma A fragments (m16n8k16, bf16) of a lane's rows g and g + 8 over HD columns, read from
// those rows: slice s holds columns 16 s + 2 t, + 1 and 16 s + 8 + 2 t, + 1.
template <int HD>
__device__ __forceinline__ void a_fragments(u32 (&qf)[HD / 16][4], const bf16_t* row_g, const bf16_t* row_g8, int t) {
    const u32 *qa = (const u32*)row_g, *qb = (const u32*)row_g8;
#pragma unroll
    for (int s = 0; s < HD / 16; s++) {
        qf[s][0] = qa[8 * s + t];
        qf[s][1] = qb[8 * s + t];
        qf[s][2] = qa[8 * s + 4 + t];
        qf[s][3] = qb[8 * s + 4 + t];
    }
}

// The lane's K and V rows (HD values each) into row `lane` of the tiles at ks and vs, 16-byte
// units swizzled by row (unit u at u ^ (lane & 7)) so that ldmatrix's 8-row reads hit distinct
// banks; cp.async, not committed.
template <int HD>
__device__ __forceinline__ void copy_kv_row(u32 ks, u32 vs, int lane, const bf16_t* k, const bf16_t* v) {
#pragma unroll
    for (int u = 0; u < HD / 8; u++) {
        const u32 at = lane * HD * 2 + 16 * (u ^ (lane & 7));
        cp_async16_at(ks + at, k + 8 * u);
        cp_async16_at(vs + at, v + 8 * u);
    }
}

// The tile rows r for which pick(r) holds into ks and vs (swizzled as copy_kv_row places them),
// whole rows an instruction: lane l takes 16-byte unit l % (HD / 8) of rows j (32 / (HD / 8)) +
// l / (HD / 8), each row's slot (`lane_slot`, rows of `sw` values from k and v) shuffled from the
// lane that looked it up. A lane a row, each 16-byte cp.async instruction touches 32 rows' lines,
// and the LSU queue behind them was the batched decode attention's most common stall (see `fill`
// in attention_decode_tc). cp.async, not committed.
template <int HD, typename Pick>
__device__ __forceinline__ void copy_kv_rows(u32 ks, u32 vs, int lane, u32 lane_slot, const bf16_t* k, const bf16_t* v,
                                             int sw, Pick pick) {
    constexpr int UPR = HD / 8, RPI = 32 / UPR;
    const int u = lane % UPR;
#pragma unroll
    for (int j = 0; j < APF_KEYS / RPI; j++) {
        const int r = j * RPI + lane / UPR;
        const size_t off = (size_t)__shfl_sync(0xffffffffu, lane_slot, r) * sw + 8 * u;
        const u32 at = r * HD * 2 + 16 * (u ^ (r & 7));
        if (pick(r)) {
            cp_async16_at(ks + at, k + off);
            cp_async16_at(vs + at, v + off);
        }
    }
}

// One tile of APF_KEYS keys of flash attention for a warp's 16 mma rows (the lane's rows g and
// g + 8), K and V in shared memory at ks and vs (rows of HD, 16-byte units swizzled by row as
// attention_prefill copies them): S = Q Kᵀ, keys for which visible(key, row g + 8?) is false
// masked, the running max and sum updated, O += P V. Shared by prefill and batched decode.
template <int HD, typename Visible>
__device__ __forceinline__ void flash_tile(u32 ks, u32 vs, const u32 (&qf)[HD / 16][4], int lane, int k0,
                                           float scale, Visible visible, float& ma, float& mb, float& la,
                                           float& lb, float (&o_acc)[HD / 8][4]) {
    constexpr int KS = HD / 16, DT = HD / 8, ROWB = HD * 2;
    const int t = lane & 3;
    // S = Q Kᵀ: 4 tiles of 8 keys. ldmatrix x4 at (keys 8 j + (lane & 7), unit 2 s + (lane >> 3)
    // for lanes 0-15 / 2 s + 1 ...): matrices (keys, dims 16 s .. +7), (keys, 16 s + 8 ..),
    // then the next slice's two: b0 b1 of slices s and s + 1.
    float sc[APF_KEYS / 8][4];
#pragma unroll
    for (int j = 0; j < APF_KEYS / 8; j++) {
        sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
        const int kr = 8 * j + (lane & 7);
#pragma unroll
        for (int s = 0; s < KS; s += 2) {
            u32 b[4];
            const int u = 2 * s + (lane >> 3);
            ldmatrix_x4(ks + kr * ROWB + 16 * (u ^ (kr & 7)), b);
            mma_bf16(sc[j], qf[s], b[0], b[1]);
            mma_bf16(sc[j], qf[s + 1], b[2], b[3]);
        }
    }
    // Mask, running max and sum (rows g: elements 0, 1; g + 8: 2, 3; key 8 j + 2 t + e).
    float mxa = NEG_INF, mxb = NEG_INF;
#pragma unroll
    for (int j = 0; j < APF_KEYS / 8; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int key = k0 + 8 * j + 2 * t + e;
            sc[j][e] = visible(key, false) ? sc[j][e] * scale : NEG_INF;
            sc[j][2 + e] = visible(key, true) ? sc[j][2 + e] * scale : NEG_INF;
            mxa = fmaxf(mxa, sc[j][e]);
            mxb = fmaxf(mxb, sc[j][2 + e]);
        }
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, o));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, o));
    }
    const float na = fmaxf(ma, mxa), nb = fmaxf(mb, mxb);
    // A row with no key yet keeps max -inf: shift by 0 so that exp gives 0, not NaN.
    const float sa = na == NEG_INF ? 0.0f : na, sb = nb == NEG_INF ? 0.0f : nb;
    const float ca = __expf(ma - sa), cb = __expf(mb - sb);
    ma = na;
    mb = nb;
    float suma = 0.0f, sumb = 0.0f;
    u32 pf[APF_KEYS / 16][4];
#pragma unroll
    for (int j = 0; j < APF_KEYS / 8; j++) {
        const float p0 = __expf(sc[j][0] - sa), p1 = __expf(sc[j][1] - sa);
        const float p2 = __expf(sc[j][2] - sb), p3 = __expf(sc[j][3] - sb);
        suma += p0 + p1;
        sumb += p2 + p3;
        // P as the A fragment of keys 16 i .. 16 i + 15: tile 2 i in registers 0 and 1,
        // tile 2 i + 1 in 2 and 3.
        pf[j >> 1][(j & 1) * 2] = pack_bf2(p0, p1);
        pf[j >> 1][(j & 1) * 2 + 1] = pack_bf2(p2, p3);
    }
    la = la * ca + suma;
    lb = lb * cb + sumb;
#pragma unroll
    for (int j = 0; j < DT; j++) {
        o_acc[j][0] *= ca;
        o_acc[j][1] *= ca;
        o_acc[j][2] *= cb;
        o_acc[j][3] *= cb;
    }
    // O += P V: ldmatrix.trans at (keys 16 i + (lane & 7) + 8 (lane >> 3 & 1), unit 2 jj +
    // (lane >> 4)): matrices (keys 16 i .., dims 16 jj ..), (keys 16 i + 8 .., same dims),
    // (keys 16 i .., dims 16 jj + 8 ..), (keys 16 i + 8 .., dims 16 jj + 8 ..).
#pragma unroll
    for (int i = 0; i < APF_KEYS / 16; i++) {
        const int kr = 16 * i + (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
        for (int jj = 0; jj < DT / 2; jj++) {
            u32 b[4];
            const int u = 2 * jj + (lane >> 4);
            ldmatrix_x4_trans(vs + kr * ROWB + 16 * (u ^ (kr & 7)), b);
            mma_bf16(o_acc[2 * jj], pf[i], b[0], b[1]);
            mma_bf16(o_acc[2 * jj + 1], pf[i], b[2], b[3]);
        }
    }
}

template <int HD>
__device__ void attention_prefill(const bf16_t* q, const bf16_t* kc, const bf16_t* vc, const u32* positions,
                                  const u32* bt_off, const u32* tables, int n, int heads, int kv_heads, int bs,
                                  float scale, bf16_t* out) {
    constexpr int KS = HD / 16, DT = HD / 8, ROWB = HD * 2;
    // A tile of K (then V) rows: APF_KEYS rows of ROWB bytes, unit u of row r at u ^ (r & 7).
    constexpr int TILE = APF_KEYS * ROWB;
    extern __shared__ __align__(16) unsigned char apf_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int h = blockIdx.y, kvh = h / (heads / kv_heads), sw = kv_heads * HD;
    const int r0 = (blockIdx.x * APF_WARPS + warp) * 16;
    if (r0 >= n) return;
    const u32 ks = smem_u32(apf_smem + warp * 2 * TILE), vs = ks + TILE;
    // The lane's rows g and g + 8 (past n: the last token, never written).
    const int rowa = min(r0 + g, n - 1), rowb = min(r0 + g + 8, n - 1);
    u32 qf[KS][4];
    a_fragments<HD>(qf, q + ((size_t)rowa * heads + h) * HD, q + ((size_t)rowb * heads + h) * HD, t);
    const u32 offa = bt_off[rowa], offb = bt_off[rowb];
    const int posa = (int)positions[rowa], posb = (int)positions[rowb];
    // Rows of the warp not yet done (bit i: row r0 + i), the rows past n done from the start.
    u32 todo = __ballot_sync(0xffffffffu, lane < 16 && r0 + lane < n) & 0xffffu;
    while (todo) {
        // This pass: the sequence of the first row left (its block table offset).
        const int first = __ffs(todo) - 1;
        const u32 seq = __shfl_sync(0xffffffffu, (first & 8) ? offb : offa, (first & 7) * 4);
        const bool ina = offa == seq && r0 + g < n, inb = offb == seq && r0 + g + 8 < n;
        // Bit i of the pass's rows: row i's lane is (i & 7) 4, its row g (i < 8) or g + 8.
        const bool in_lo = __shfl_sync(0xffffffffu, ina, (lane & 7) * 4), in_hi = __shfl_sync(0xffffffffu, inb, (lane & 7) * 4);
        todo &= ~__ballot_sync(0xffffffffu, lane < 16 && (lane < 8 ? in_lo : in_hi));
        // Rows outside this sequence see no key (position -1); the pass writes only its own.
        const int pa = ina ? posa : -1, pb = inb ? posb : -1;
        int last = max(pa, pb);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
        const u32* table = tables + seq;
        float o_acc[DT][4];
#pragma unroll
        for (int j = 0; j < DT; j++) o_acc[j][0] = o_acc[j][1] = o_acc[j][2] = o_acc[j][3] = 0.0f;
        float ma = NEG_INF, mb = NEG_INF, la = 0.0f, lb = 0.0f;
        for (int k0 = 0; k0 <= last; k0 += APF_KEYS) {
            // Copy the tile's K and V rows: lane l looks up key k0 + l (APF_KEYS == 32), and the
            // warp copies whole rows an instruction. H200, llama3-8b int4, 16 prompts of 512
            // tokens (thirty-second session, one call): 25758 -> 29026 tok/s against a lane a row.
            {
                const int key = min(k0 + lane, last);
                const u32 slot = table[key / bs] * (u32)bs + (u32)(key % bs);
                copy_kv_rows<HD>(ks, vs, lane, slot, kc + (size_t)kvh * HD, vc + (size_t)kvh * HD, sw,
                                 [](int) { return true; });
                cp_async_commit();
                cp_async_wait<0>();
                __syncwarp();
            }
            flash_tile<HD>(ks, vs, qf, lane, k0, scale, [&](int key, bool hi) { return key <= (hi ? pb : pa); },
                           ma, mb, la, lb, o_acc);
            __syncwarp();
        }
        // Row sums over the quad, then this pass's rows written.
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            la += __shfl_xor_sync(0xffffffffu, la, o);
            lb += __shfl_xor_sync(0xffffffffu, lb, o);
        }
        const float ia = ina ? 1.0f / la : 0.0f, ib = inb ? 1.0f / lb : 0.0f;
        u32* oa = (u32*)(out + ((size_t)(r0 + g) * heads + h) * HD);
        u32* ob = (u32*)(out + ((size_t)(r0 + g + 8) * heads + h) * HD);
#pragma unroll
        for (int j = 0; j < DT; j++) {
            if (ina) oa[4 * j + t] = pack_bf2(o_acc[j][0] * ia, o_acc[j][1] * ia);
            if (inb) ob[4 * j + t] = pack_bf2(o_acc[j][2] * ib, o_acc[j][3] * ib);
        }
    }
}
#define ATTENTION_PREFILL(HD)                                                                                  \
    extern "C" __global__ void __launch_bounds__(APF_WARPS * 32) attention_prefill_##HD(                       \
        const bf16_t* q, const bf16_t* kc, const bf16_t* vc, const u32* positions, const u32* bt_off,          \
        const u32* tables, int n, int heads, int kv_heads, int bs, float scale, bf16_t* out) {                 \
        pdl_enter();                                                                                           \
        attention_prefill<HD>(q, kc, vc, positions, bt_off, tables, n, heads, kv_heads, bs, scale, out);       \
    }
ATTENTION_PREFILL(64)
ATTENTION_PREFILL(128)

// Decode attention split along the keys (flash-decoding), for steps of few tokens.
//
// Block (token x kv head, split, group slice): one chunk of at most DEC_CHUNK keys of one kv head,
// for MAXG query heads of its GQA group at once. With the whole group (up to 8) in a block each
// K/V row is read from memory once per group rather than once per query head; while the step's
// keys and values fit the L2 the host takes one head per block instead (shorter blocks, more of
// them per SM: see DEC_ONE_HEAD_BYTES in mod.rs). A key row is read by hd/8 lanes with one
// 16-byte load each (the dot products finish with shuffles inside those lanes); probabilities are
// formed per head by one warp; the V rows are read the same way, the key lanes summed with
// shuffles and then across the four warps in shared memory. With one split the block writes the
// normalised output; otherwise it writes its unnormalised output, max and sum (f32), and the last
// block of its (token, kv head, slice) to finish rescales the splits (combine_splits).
//
// Bound: reading each K and V row of the context once (bandwidth). The host sizes the chunks so
// that a single sequence still fills about four blocks per SM; for llama3-8b (8 kv heads, group of
// 4, hd 128) a 2048-key decode step reads 8 MiB per layer, 2.9 us at H100 copy bandwidth.
// Measured end to end on an H100 (docs/benchmarks.md, not per kernel): llama3-8b decode costs
// ~12 us per layer more at 2048 keys than at 16, ~0.7 TB/s over the K/V bytes, a quarter of copy
// bandwidth. DEC_UNROLL loads in flight per lane and 4 rather than 2 blocks per SM (meant to hide
// load latency: a block has few keys per lane) measured the same as one load at a time. Nsight
// Compute (fifth session, H100, 512 keys, four heads a block) showed why: a block is a chain of
// ~2000 dependent instructions per warp at ~8 cycles each (shuffles, shared-memory round trips,
// index arithmetic), one block per SM, not memory; one head a block (the host's choice while the
// step's K/V fit the L2) took it from 11.0 to 7.2 us.
//
// Early loads: the kernel lets its successor launch and reads, before griddep_wait, what no kernel
// of the step writes: the step's positions and block tables (copied from the host before the step's
// first kernel) and the K and V rows of the first pass (DEC_UNROLL keys a lane) that belong to
// earlier steps, into registers. Only q and the step's own keys wait for the kernel before. In the
// replayed decode graph attention cost ~10.4 us a layer (ninth session: 0.33 ms a token of
// llama3-8b at 512 keys, measured by leaving it out), mostly a chain of dependent round trips
// (positions, table, K and V, the split counter, the combine) that began only once rope_write_kv
// had ended. The 32 registers the early rows take are capped by launch bounds: 8 blocks an SM with
// one head (64 registers; 10 fitted before, the host sizes the chunks for 16) and 4 with a group
// (what the host plans). Unbounded, the one-head kernel took 72 registers, 7 blocks an SM, and a
// 2048-key step's ~1050 working blocks no longer fitted one wave: 4.6% slower there. Copying the
// rows into shared memory instead (cp.async, 16 KB a block, no registers) gained nothing at 512
// keys and lost 2.6% at 2048 (H100, same call as the old binary).
//
// With rope (attention_rope_g*, the model's decode path): rope_write_kv runs in the same launch.
// Each block rotates its q heads as it loads them, and rotates its chunk's keys of this step (at
// most the step's tokens) from the k projection into their cache slots, with their values, before
// its loops read the chunk from the cache as always; several blocks may store the same key, the
// same bytes. One launch fewer a layer: llama3-8b int4 decode on the H100 (thirteenth session,
// alternated in one call with the session-start binary) 413.6 -> 425.4 tok/s at batch 1 (+2.9%,
// 66.2-66.8% of the bound; 430.8, 67.2%, once the launch no longer asked for the first build's
// shared memory), 390.9 -> 398.3 at a 2048-token prompt, 3175 -> 3300 at batch 16.
// A first build kept the rotated keys in shared memory and
// read the values from the v projection: its selects between the two sources took the one-head
// build past 64 registers (28 bytes spilled) and it gained ~1% at batch 1 (llama3-8b int4, H100).

// Whether this block is the last of its head's `ns` splits to finish, counted on `counter`
// (every split's partials visible to it then); that block sets the counter back to zero for the
// next launch (and graph replays).
__device__ __forceinline__ bool last_split(u32* counter, int ns) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == (u32)(ns - 1);
    __syncthreads();
    if (!last) return false;
    __threadfence();
    if (threadIdx.x == 0) *counter = 0;
    return true;
}

// The splits of heads row0 .. row0 + G (rows of token x head) rescaled to their common max and
// summed, by the last block of attention_decode to finish them. Bound: the latency of one trip to
// the L2 a head. A split's partials are a record of hd + 4 floats (its hd values, its max and its
// sum, padded to 16 bytes). Warp w takes splits w, w + nw, ... and lane l dimensions 4l .. 4l + 3,
// so each load is 16 bytes and a warp's are one record; every thread issues its ROUNDS records'
// loads, and thread s the max and sum of split s, before the block's reductions need any of them.
// The block reduces the maxes, keeps each split's weight in `wts` and reduces the weighted sums;
// each warp adds its splits' weighted values, and the warps' sums meet in shared memory. The
// partials are read past the L1 (ld.global.cg), which holds nothing of them. Shared memory: the
// splits' weights, then nw x hd floats.
// Before, a trip for the maxes, one for the sums and one or more for the values, in turn: this
// took llama3-8b int4 decode on the H100 from 430.4 to 435.1 tok/s at a 512-token context and
// from 398.6 to 403.3 at 2048 (seventeenth session, same call). Measured and not kept: each
// dimension's splits laid out together for the reader (the writers' stores scattered: 1-3%
// slower), and the max and sum found by each warp's shuffles with one thread's acquire-release
// fence in place of every thread's __threadfence (registers spilled: no gain at 512 keys, 2.4%
// slower at 2048). What the combine still costs: ~2.7 us a layer (the decode step without it,
// wrong results, ~4% faster), the count of finished splits ~1 us more.
template <int ROUNDS>
__device__ void combine_splits(const float* part, int row0, int G, int ns, int hd, int splits, float* wts,
                               bf16_t* out) {
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, w = tid >> 5, nw = nt >> 5, rs = hd + 4;
    const int nf = hd >> 2;  // 16-byte pieces of a record's values
    float* red = wts + ((splits + 3) & ~3);
    for (int g = 0; g < G; g++) {
        const size_t row = (size_t)row0 + g;
        const float* pr = part + row * splits * rs;
        const float2 own = tid < ns ? __ldcg((const float2*)(pr + tid * rs + hd)) : make_float2(NEG_INF, 0.0f);
        // Unconditional loads (clamped to the last split and piece; what they read past the
        // splits that ran is dropped below) are issued together, conditional ones one at a time.
        float4 v[ROUNDS];
#pragma unroll
        for (int r = 0; r < ROUNDS; r++)
            v[r] = __ldcg((const float4*)(pr + min(w + nw * r, ns - 1) * rs) + min(lane, nf - 1));
        float m = own.x;
        for (int s = tid + nt; s < ns; s += nt) m = fmaxf(m, __ldcg(pr + s * rs + hd));
        m = block_reduce(m, true);
        float l = 0.0f;
        for (int s = tid; s < ns; s += nt) {
            const float2 e = s == tid ? own : __ldcg((const float2*)(pr + s * rs + hd));
            wts[s] = __expf(e.x - m);
            l += wts[s] * e.y;
        }
        l = block_reduce(l, false);  // its barriers also publish wts[]
        const float inv = 1.0f / l;
        for (int f = lane; f < nf; f += 32) {
            float4 a = make_float4(0, 0, 0, 0);
            auto add = [&](int s, float4 x) {
                if (s < ns) {
                    const float e = wts[s];
                    a.x += e * x.x; a.y += e * x.y; a.z += e * x.z; a.w += e * x.w;
                }
            };
            int s = w;
            if (f == lane)
#pragma unroll
                for (int r = 0; r < ROUNDS; r++, s += nw) add(s, v[r]);
            for (; s < ns; s += nw * ROUNDS) {
#pragma unroll
                for (int r = 0; r < ROUNDS; r++)
                    v[r] = __ldcg((const float4*)(pr + min(s + nw * r, ns - 1) * rs) + f);
#pragma unroll
                for (int r = 0; r < ROUNDS; r++) add(s + nw * r, v[r]);
            }
            *(float4*)(red + w * hd + 4 * f) = a;
        }
        __syncthreads();
        for (int d = tid; d < hd; d += nt) {
            float a = 0.0f;
            for (int k = 0; k < nw; k++) a += red[k * hd + d];
            out[row * hd + d] = f2bf(a * inv);
        }
        __syncthreads();  // wts and red are rewritten for the next head
    }
}

// The splits of heads row0 .. row0 + G (records as combine_splits reads them) combined by the
// last block to finish them, one warp a head: lane l takes dimensions 4l .. 4l + 3 of every split
// and issues its loads for eight splits at a time together, so that all heads' trips to the L2
// overlap and no block barrier is needed. For the few splits (up to ~6 with 8 kv heads) of the
// batched tensor-core kernel; combine_splits spreads one head's many splits over the block.
template <int HD>
__device__ void combine_heads(const float* part, int row0, int G, int ns, int splits, bf16_t* out) {
    constexpr int RS = HD + 4, LANES = HD / 4;
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int l4 = min(lane, LANES - 1);
    for (int g = threadIdx.x >> 5; g < G; g += nw) {
        const size_t row = (size_t)row0 + g;
        const float* pr = part + row * splits * RS;
        float m = NEG_INF, l = 0.0f;
        float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int s0 = 0; s0 < ns; s0 += 8) {
            float2 ml[8];
            float4 v[8];
#pragma unroll
            for (int r = 0; r < 8; r++) {
                const float* rec = pr + min(s0 + r, ns - 1) * RS;
                ml[r] = __ldcg((const float2*)(rec + HD));
                v[r] = __ldcg((const float4*)rec + l4);
            }
#pragma unroll
            for (int r = 0; r < 8; r++) {
                if (s0 + r < ns) {
                    // Every split that ran has a key, so its max is finite: m is after the first.
                    const float nm = fmaxf(m, ml[r].x), c = __expf(m - nm), e = __expf(ml[r].x - nm);
                    l = l * c + e * ml[r].y;
                    a.x = a.x * c + e * v[r].x;
                    a.y = a.y * c + e * v[r].y;
                    a.z = a.z * c + e * v[r].z;
                    a.w = a.w * c + e * v[r].w;
                    m = nm;
                }
            }
        }
        if (lane < LANES) {
            const float inv = 1.0f / l;
            const u32 lo = pack_bf2(a.x * inv, a.y * inv), hi = pack_bf2(a.z * inv, a.w * inv);
            *(uint2*)(out + row * HD + 4 * lane) = make_uint2(lo, hi);
        }
    }
}

#define DEC_THREADS 128
#define DEC_CHUNK 256
#define DEC_UNROLL 4

__device__ __forceinline__ void unpack8(uint4 w, float* f) {
    f[0] = bf_lo(w.x); f[1] = bf_hi(w.x); f[2] = bf_lo(w.y); f[3] = bf_hi(w.y);
    f[4] = bf_lo(w.z); f[5] = bf_hi(w.z); f[6] = bf_lo(w.w); f[7] = bf_hi(w.w);
}

// hd is one of 8, 16, 32, 64, 128, 256 (hd/8 lanes per key divide a warp), chunk <= DEC_CHUNK.
// MAXG: query heads per block (the host's choice, see `attention_decode` in mod.rs).
// THREADS: the block's threads (DEC_THREADS, or 1024 for a whole head, attention_*_w1). Shared
// memory: max((MAXG * (hd + chunk) + chunk) * 4, THREADS / 32 * MAXG * hd * 4, (splits rounded up
// to 4 + 4 hd) * 4) bytes. part: per (token, head, split) hd partial outputs, then max and sum, in
// records of hd + 4 floats; counters: one per (token x kv head, slice), zero between launches.
template <int MAXG, bool ROPE, int THREADS = DEC_THREADS>
__device__ void attention_decode(const bf16_t* q, bf16_t* kc, bf16_t* vc, const u32* positions,
                                 const u32* first_pos, const u32* bt_off, const u32* tables, int heads,
                                 int kv_heads, int hd, int bs, float scale, int chunk, int splits, float* part,
                                 u32* counters, bf16_t* out, const bf16_t* kb, const bf16_t* vb,
                                 const bf16_t* rope_table) {
    // Before griddep_wait (see "Early loads" above): the step's positions and block tables, then
    // the first pass's K and V rows of keys older than the step.
    griddep_launch();
    extern __shared__ float smem[];
    __shared__ float hm[MAXG], hl[MAXG];
    const int group = heads / kv_heads;
    const int t = blockIdx.x / kv_heads, kvh = blockIdx.x % kv_heads, split = blockIdx.y;
    const int g0 = blockIdx.z * MAXG, G = min(MAXG, group - g0);
    const int h0 = kvh * group + g0;
    const int pos = positions[t], nkeys = pos + 1, c0 = split * chunk;
    if (c0 >= nkeys) return;  // a shorter sequence of the batch: not counted, not combined
    // Keys from `own` on are this step's (its sequence's tokens in the step are consecutive, the
    // one at position p being token t - (pos - p)); the keys before it were written by earlier steps.
    const int own = first_pos[t];
    const int cn = min(chunk, nkeys - c0);
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int lpk = hd >> 3, sub = tid % lpk, kl = tid / lpk, nkl = THREADS / lpk;
    const int sw = kv_heads * hd;
    float* qs = smem;                             // G x hd, pre-scaled
    float* sc = smem + MAXG * hd;             // G x chunk: scores, then probabilities
    u32* sl = (u32*)(sc + MAXG * chunk);      // chunk slot offsets
    float* red = smem;                            // THREADS / 32 warps x G x hd, once sc is consumed
    const u32* table = tables + bt_off[t];
    for (int j = tid; j < cn; j += THREADS) {
        const int kj = c0 + j;
        sl[j] = (table[kj / bs] * (u32)bs + (u32)(kj % bs)) * (u32)sw + (u32)(kvh * hd);
    }
    const int early = min(cn, own - c0);  // the chunk's keys of earlier steps: j < early
    __syncthreads();
    uint4 kw0[DEC_UNROLL], vw0[DEC_UNROLL];
#pragma unroll
    for (int u = 0; u < DEC_UNROLL; u++) {
        const int j = u * nkl + kl;
        kw0[u] = j < early ? *(const uint4*)(kc + sl[j] + sub * 8) : make_uint4(0, 0, 0, 0);
        vw0[u] = j < early ? *(const uint4*)(vc + sl[j] + sub * 8) : make_uint4(0, 0, 0, 0);
    }
    griddep_wait();
    // ROPE: q rotated as it is scaled into qs; the chunk's keys of this step (j >= early) rotated
    // and stored with their values in their cache slots, where the loops below read them as any
    // other key. Every block whose chunk holds such a key stores it (one block for each query-head
    // slice, and for each later token of the sequence in the step): the same bytes to the same
    // slot, so whichever store lands last, a block reads back what it stored itself. Blocks read
    // no slot of this step before their own stores (the early loads stop at `early`).
    const int half = hd >> 1;
    const bf16_t* qr = q + ((size_t)t * heads + h0) * hd;
    if (ROPE) {
        for (int i = tid; i < G * half; i += THREADS) {
            const int g = i / half, d = i % half;
            const float2 r = rope_pair(qr + g * hd, rope_table + (size_t)pos * hd, d, half);
            qs[g * hd + d] = r.x * scale;
            qs[g * hd + d + half] = r.y * scale;
        }
        const int first = max(early, 0);
        for (int i = tid; i < (cn - first) * half; i += THREADS) {
            const int j = first + i / half, d = i % half, kj = c0 + j;
            const size_t row = ((size_t)(t - (pos - kj)) * kv_heads + kvh) * hd;
            const float2 k2 = rope_pair(kb + row, rope_table + (size_t)kj * hd, d, half);
            kc[sl[j] + d] = f2bf(k2.x);
            kc[sl[j] + d + half] = f2bf(k2.y);
            vc[sl[j] + d] = vb[row + d];
            vc[sl[j] + d + half] = vb[row + d + half];
        }
    } else {
        for (int i = tid; i < G * hd; i += THREADS) qs[i] = bf2f(qr[i]) * scale;
    }
    __syncthreads();
    // Scores, DEC_UNROLL keys per lane per pass with their loads issued together: a block has
    // few keys per lane, so one memory round trip per key would dominate. The loop bound is
    // uniform: every lane takes part in the shuffles.
    for (int jb = 0; jb < cn; jb += DEC_UNROLL * nkl) {
        uint4 kw[DEC_UNROLL];
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; u++) {
            const int j = jb + u * nkl + kl;
            kw[u] = j < early && jb == 0 ? kw0[u]
                  : j >= cn              ? make_uint4(0, 0, 0, 0)
                                         : *(const uint4*)(kc + sl[j] + sub * 8);
        }
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; u++) {
            const int j = jb + u * nkl + kl;
            float kf[8];
            unpack8(kw[u], kf);
#pragma unroll
            for (int g = 0; g < MAXG; g++) {
                if (g < G) {
                    const float4* qp = (const float4*)(qs + g * hd + sub * 8);
                    const float4 a = qp[0], b = qp[1];
                    float v = a.x * kf[0] + a.y * kf[1] + a.z * kf[2] + a.w * kf[3]
                            + b.x * kf[4] + b.y * kf[5] + b.z * kf[6] + b.w * kf[7];
                    for (int o = lpk >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                    if (sub == 0 && j < cn) sc[g * chunk + j] = v;
                }
            }
        }
    }
    __syncthreads();
    // Softmax numerators per head, one warp per head.
    for (int g = w; g < G; g += THREADS / 32) {
        float mx = NEG_INF;
        for (int j = lane; j < cn; j += 32) mx = fmaxf(mx, sc[g * chunk + j]);
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int j = lane; j < cn; j += 32) {
            const float p = __expf(sc[g * chunk + j] - mx);
            sc[g * chunk + j] = p;
            sum += p;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            hm[g] = mx;
            hl[g] = sum;
        }
    }
    __syncthreads();
    float acc[MAXG][8];
#pragma unroll
    for (int g = 0; g < MAXG; g++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    for (int jb = kl; jb < cn; jb += DEC_UNROLL * nkl) {
        uint4 vw[DEC_UNROLL];
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; u++) {
            const int j = jb + u * nkl;
            vw[u] = j < early && jb == kl ? vw0[u]
                  : j >= cn                ? make_uint4(0, 0, 0, 0)
                                           : *(const uint4*)(vc + sl[j] + sub * 8);
        }
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; u++) {
            const int j = jb + u * nkl;
            if (j < cn) {
                float vf[8];
                unpack8(vw[u], vf);
#pragma unroll
                for (int g = 0; g < MAXG; g++) {
                    if (g < G) {
                        const float p = sc[g * chunk + j];
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[g][e] += p * vf[e];
                    }
                }
            }
        }
    }
    // Key lanes of a warp are lpk lanes apart; lanes 0..lpk-1 end with the warp's sums.
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        if (g < G) {
            for (int o = lpk; o < 32; o <<= 1)
#pragma unroll
                for (int e = 0; e < 8; e++) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
        }
    }
    __syncthreads();  // sc and sl are read for the last time above; red overlays them
    if (lane < lpk) {
#pragma unroll
        for (int g = 0; g < MAXG; g++) {
            if (g < G) {
                float4* r = (float4*)(red + (w * MAXG + g) * hd + sub * 8);
                r[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
                r[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
            }
        }
    }
    __syncthreads();
    for (int i = tid; i < G * hd; i += THREADS) {
        const int g = i / hd, d = i % hd;
        float a = 0.0f;
#pragma unroll
        for (int ww = 0; ww < THREADS / 32; ww++) a += red[(ww * MAXG + g) * hd + d];
        const size_t row = (size_t)t * heads + h0 + g;
        if (splits == 1) {
            out[row * hd + d] = f2bf(a / hl[g]);
        } else {
            float* p = part + (row * splits + split) * (hd + 4);  // the record combine_splits reads
            p[d] = a;
            if (d == 0) {
                p[hd] = hm[g];
                p[hd + 1] = hl[g];
            }
        }
    }
    if (splits == 1) return;
    // The last block of this (token, kv head, slice) to finish rescales the splits to their
    // common max and sums them (a separate combine kernel cost ~4.7 us a layer in the replayed
    // graph, mostly its launch and the wait for this one).
    const int ns = (nkeys + chunk - 1) / chunk;
    if (!last_split(counters + blockIdx.x * gridDim.z + blockIdx.z, ns)) return;
    // 5 records ahead fit the one-head build's 64 registers (20 splits, a 640-key bucket at
    // 32 keys a split); beside the 8-head build's sums more than 2 spill.
    combine_splits<MAXG == 1 ? 5 : 2>(part, t * heads + h0, G, ns, hd, splits, smem, out);
}

// attention_decode_g<G> reads a cache rope_write_kv has filled (kb, vb and rope_table unused);
// attention_rope_g<G> is rope_write_kv and attention in one launch, q, kb and vb the projections
// before rope.
#define ATT_DEC(G, MINB)                                                                                        \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, MINB) attention_decode_g##G(ATT_DEC_PARAMS) {    \
        attention_decode<G, false>(ATT_DEC_ARGS);                                                               \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, MINB) attention_rope_g##G(ATT_DEC_PARAMS) {      \
        attention_decode<G, true>(ATT_DEC_ARGS);                                                                \
    }
#define ATT_DEC_PARAMS                                                                                          \
    const bf16_t *q, bf16_t *kc, bf16_t *vc, const u32 *positions, const u32 *first_pos, const u32 *bt_off,    \
        const u32 *tables, int heads, int kv_heads, int hd, int bs, float scale, int chunk, int splits,        \
        float *part, u32 *counters, bf16_t *out, const bf16_t *kb, const bf16_t *vb, const bf16_t *rope_table
#define ATT_DEC_ARGS                                                                                            \
    q, kc, vc, positions, first_pos, bt_off, tables, heads, kv_heads, hd, bs, scale, chunk, splits, part,      \
        counters, out, kb, vb, rope_table
ATT_DEC(1, 8)
// One head a block of 1024 threads over all its keys, no splits to combine (contexts of up to
// DEC_WHOLE_MAX_KEYS in mod.rs): 256 keys a pass, the first pass's rows loaded before the wait.
extern "C" __global__ void __launch_bounds__(1024, 1) attention_rope_w1(ATT_DEC_PARAMS) {
    attention_decode<1, true, 1024>(ATT_DEC_ARGS);
}
extern "C" __global__ void __launch_bounds__(1024, 1) attention_decode_w1(ATT_DEC_PARAMS) {
    attention_decode<1, false, 1024>(ATT_DEC_ARGS);
}
ATT_DEC(2, 4)
ATT_DEC(4, 4)
ATT_DEC(8, 4)

// Decode attention of batched steps on tensor cores (attention_tc_*): a block takes one token's
// GQA group (all `group` query heads of one kv head, up to 16) over one chunk of keys, and the 16
// rows of each warp's mma are those heads, so each K and V row it copies serves the whole group
// from one read. The host launches one block an SM (as many splits of each token's keys as that
// allows); each block cuts its sequence's own keys into `splits` chunks of whole 32-key tiles, so
// the splits of a sequence are about equally long whatever the key bucket the launch is shaped
// for. Warp w takes the chunk's tiles w, w + DTC_WARPS, ... through a ring of DTC_STAGES tiles in
// its own shared memory (cp.async, swizzled as in attention_prefill): the copy of tile i + S - 1
// is issued before tile i is waited for, then S = Q Kᵀ and O += P V run on mma.sync with the
// running max and sum per row. The block's warps meet in shared memory and the splits combine
// (records and counter as in attention_decode; the last block combines a warp a head,
// combine_heads). Trips to the memory kept off the chain: the first S - 1 tiles' rows of keys
// older than the step are copied before griddep_wait, the step's own keys and values (rope) go
// straight into those tiles when they fall there, q's loads are issued together, and each tile's
// slot is looked up a tile before its copy.
//
// Why: attention_decode's SIMT loop is a chain of dependent round trips (scores, then values,
// 32 keys a pass) that at batch 16 read llama3-8b's ~38 MB of K and V a layer at ~18% of the
// H200's copy bandwidth (Nsight Compute, the kernel alone: 52 us a layer, more than gate/up's
// 34). Bound aimed at: those bytes at copy bandwidth (~9.4 us); the mma work, 16 rows of which a
// group of 4 uses 4, is small beside it. Where it gets (Nsight Compute, the kernel alone with its
// caches flushed, batch 16 at ~520 keys): 33 us with one tile a warp at two blocks an SM, 28-30
// us with the ring (~30% of copy). End to end (H200, llama3-8b int4, batch 16) the step went 4.03
// -> 3.08 ms over the thirtieth to thirty-second sessions. Where a block waited before the ring
// (warp samples at batch 16): the prologue up to its copies 21%, q's rope 17%, the tile copies'
// wait 18%, the mma work 6%, warps waiting at the barrier for the block's slowest 12%, the
// combine 21%. Two tiles a warp (132 KB a block at head dim 128) rather than three: the next
// GEMV's early blocks find room beside it. With the ring, Nsight Compute at batch 16 (26.3 us,
// caches warm, boost clocks; 30% of the DRAM bandwidth, 7% of issue slots busy) sampled the warps
// mostly in the LSU queue behind the tile copies (a lane a row: each cp.async instruction 32
// rows' pieces), hence the whole-row copies of long chunks (`fill`). Per-lane bulk copies
// (cp.async.bulk, one a row) are not an answer: the compiler serialises them over the lanes.
#define DTC_WARPS 4
#define DTC_STAGES 2

template <int HD, bool ROPE>
__device__ void attention_decode_tc(const bf16_t* q, bf16_t* kc, bf16_t* vc, const u32* positions,
                                    const u32* first_pos, const u32* bt_off, const u32* tables, int heads,
                                    int kv_heads, int bs, float scale, int splits, float* part,
                                    u32* counters, bf16_t* out, const bf16_t* kb, const bf16_t* vb,
                                    const bf16_t* rope_table) {
    constexpr int KS = HD / 16, DT = HD / 8, ROWB = HD * 2, TILE = APF_KEYS * ROWB, S = DTC_STAGES;
    griddep_launch();
    extern __shared__ __align__(16) unsigned char dtc_smem[];
    __shared__ float wm[DTC_WARPS][16], wl[DTC_WARPS][16];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int group = heads / kv_heads;
    const int tok = blockIdx.x / kv_heads, kvh = blockIdx.x % kv_heads, split = blockIdx.y;
    const int h0 = kvh * group, sw = kv_heads * HD;
    // Each sequence's keys in `splits` chunks of whole tiles (its own length, not the bucket's
    // the launch is shaped for: every split of a sequence about as long as its others).
    const int pos = positions[tok], nkeys = pos + 1;
    const int chunk = ((nkeys + splits - 1) / splits + APF_KEYS - 1) / APF_KEYS * APF_KEYS, c0 = split * chunk;
    if (c0 >= nkeys) return;  // past a short sequence's keys: not counted, not combined
    const int end = c0 + min(chunk, nkeys - c0), own = first_pos[tok];
    const u32* table = tables + bt_off[tok];
    // The warp's ring: S slots, each a K tile then a V tile; the warp's i-th tile goes to slot i % S.
    unsigned char* ring = dtc_smem + warp * S * 2 * TILE;
    bf16_t* qsm = (bf16_t*)(dtc_smem + DTC_WARPS * S * 2 * TILE);  // 16 rows x HD, rows >= group zero
    constexpr int STRIDE = APF_KEYS * DTC_WARPS;  // keys between a warp's tiles
    const int first_tile = c0 + APF_KEYS * warp;
    // Each lane looks up the slot of its row of a tile (key k0 + lane) through the block table.
    // Rows with keys in [lo, hi) are copied, rows past the chunk's end zeroed (masked keys' P V
    // terms must stay finite), the others left to the rope stores. Chunks of four passes of the
    // warps or more (`rows_together`) copy whole rows an instruction (copy_kv_rows); shorter
    // chunks (more splits: small batches) keep a lane a row, each copy issued as soon as its
    // lane's slot is known, with no shuffles between the slot and the copy. H200, llama3-8b int4
    // decode (thirty-second session, one call each): always rows together, batch 16 5207 -> 5505
    // tok/s (576-key chunks), batch 8 3381 -> 3372 (288), batch 4 1833 -> 1805 (160), batch 2
    // 958 -> 953 (96); from two passes, batch 16 5213 -> 5485, 8 3373 -> 3345, 4 and 2 even;
    // from four (kept), batch 16 5198 -> 5479, 8 3373 -> 3372.
    const bool rows_together = chunk >= 4 * STRIDE;
    auto slot_of = [&](int key) -> u32 { return key < end ? table[key / bs] * (u32)bs + (u32)(key % bs) : 0u; };
    auto fill = [&](int i, int k0, u32 lane_slot, int lo, int hi) {
        unsigned char* tile = ring + (i % S) * 2 * TILE;
        const u32 ks = smem_u32(tile);
        const int key = k0 + lane;
        if (key >= end) {
#pragma unroll
            for (int u = 0; u < HD / 8; u++) {
                *(uint4*)(tile + lane * ROWB + 16 * u) = make_uint4(0, 0, 0, 0);
                *(uint4*)(tile + TILE + lane * ROWB + 16 * u) = make_uint4(0, 0, 0, 0);
            }
        }
        hi = min(hi, end);
        if (rows_together) {
            copy_kv_rows<HD>(ks, ks + TILE, lane, lane_slot, kc + (size_t)kvh * HD, vc + (size_t)kvh * HD, sw,
                             [&](int r) { return k0 + r >= lo && k0 + r < hi; });
        } else if (key >= lo && key < hi) {
            const size_t off = (size_t)lane_slot * sw + (size_t)kvh * HD;
            copy_kv_row<HD>(ks, ks + TILE, lane, kc + off, vc + off);
        }
    };
    // The first S - 1 tiles' rows of keys older than the step, one commit group a tile (empty
    // past the chunk, so that a tile's group is always the S - 1'th before the newest).
    u32 pro_slot[S - 1];
#pragma unroll
    for (int i = 0; i < S - 1; i++) {
        const int k0 = first_tile + i * STRIDE;
        pro_slot[i] = slot_of(k0 + lane);
        if (k0 < end) fill(i, k0, pro_slot[i], c0, own);
        cp_async_commit();
    }
    griddep_wait();
    const int half = HD / 2;
    const bf16_t* qr = q + ((size_t)tok * heads + h0) * HD;
    {
        // Every load of q (and its rope factors) is issued before the first store, in one trip.
        constexpr int QIT = 16 * (HD / 2) / (DTC_WARPS * 32);
        float2 qv[QIT];
#pragma unroll
        for (int it = 0; it < QIT; it++) {
            const int i = tid + it * DTC_WARPS * 32, r = i / half, d = i % half;
            qv[it] = make_float2(0.0f, 0.0f);
            if (r < group) {
                qv[it] = ROPE ? rope_pair(qr + r * HD, rope_table + (size_t)pos * HD, d, half)
                              : make_float2(bf2f(qr[r * HD + d]), bf2f(qr[r * HD + d + half]));
            }
        }
#pragma unroll
        for (int it = 0; it < QIT; it++) {
            const int i = tid + it * DTC_WARPS * 32, r = i / half, d = i % half;
            qsm[r * HD + d] = f2bf(qv[it].x);
            qsm[r * HD + d + half] = f2bf(qv[it].y);
        }
    }
    if (ROPE) {
        // The chunk's keys of this step, rotated, and their values into their cache slots (as in
        // attention_decode: blocks of later tokens of the sequence store the same bytes), and
        // straight into the ring of a warp whose first S - 1 tiles hold them (no copy back).
        const int first = max(own, c0);
        for (int i = tid; i < (end - first) * half; i += DTC_WARPS * 32) {
            const int kj = first + i / half, d = i % half;
            const size_t row = ((size_t)(tok - (pos - kj)) * kv_heads + kvh) * HD;
            const size_t at = (size_t)(table[kj / bs] * (u32)bs + (u32)(kj % bs)) * sw + (size_t)kvh * HD;
            const float2 k2 = rope_pair(kb + row, rope_table + (size_t)kj * HD, d, half);
            const bf16_t klo = f2bf(k2.x), khi = f2bf(k2.y), vlo = vb[row + d], vhi = vb[row + d + half];
            kc[at + d] = klo;
            kc[at + d + half] = khi;
            vc[at + d] = vlo;
            vc[at + d + half] = vhi;
            const int tile = (kj - c0) / APF_KEYS, wi = tile / DTC_WARPS;
            if (wi < S - 1) {
                const int r = (kj - c0) % APF_KEYS;
                unsigned char* kt = dtc_smem + ((tile % DTC_WARPS) * S + wi) * 2 * TILE + r * ROWB;
                const int lo = 16 * ((d >> 3) ^ (r & 7)) + 2 * (d & 7);
                const int hi = 16 * (((d + half) >> 3) ^ (r & 7)) + 2 * (d & 7);
                *(bf16_t*)(kt + lo) = klo;
                *(bf16_t*)(kt + hi) = khi;
                *(bf16_t*)(kt + TILE + lo) = vlo;
                *(bf16_t*)(kt + TILE + hi) = vhi;
            }
        }
    }
    __syncthreads();
    if (!ROPE) {
        // The first tiles' rows of the step's keys, which rope_write_kv stored: one more group,
        // which the first tile waits for whole.
#pragma unroll
        for (int i = 0; i < S - 1; i++) {
            const int k0 = first_tile + i * STRIDE;
            if (k0 < end) fill(i, k0, pro_slot[i], own, end);
        }
        cp_async_commit();
        cp_async_wait<0>();
    }
    u32 qf[KS][4];
    a_fragments<HD>(qf, qsm + g * HD, qsm + (g + 8) * HD, t);
    float o_acc[DT][4];
#pragma unroll
    for (int j = 0; j < DT; j++) o_acc[j][0] = o_acc[j][1] = o_acc[j][2] = o_acc[j][3] = 0.0f;
    float ma = NEG_INF, mb = NEG_INF, la = 0.0f, lb = 0.0f;
    // Tile i + S - 1 is issued into the slot tile i - 1 left, then tile i waited for: S - 1 tiles
    // in flight while one is multiplied. Slots are looked up a tile before their copy is issued.
    u32 next_slot = slot_of(first_tile + (S - 1) * STRIDE + lane);
    for (int i = 0, k0 = first_tile; k0 < end; i++, k0 += STRIDE) {
        const int kn = k0 + (S - 1) * STRIDE;
        if (kn < end) {
            fill(i + S - 1, kn, next_slot, c0, end);
            next_slot = slot_of(kn + STRIDE + lane);
        }
        cp_async_commit();
        cp_async_wait<S - 1>();
        __syncwarp();
        const u32 ks = smem_u32(ring + (i % S) * 2 * TILE);
        flash_tile<HD>(ks, ks + TILE, qf, lane, k0, scale, [&](int key, bool) { return key < end; }, ma, mb, la, lb, o_acc);
        __syncwarp();
    }
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        la += __shfl_xor_sync(0xffffffffu, la, o);
        lb += __shfl_xor_sync(0xffffffffu, lb, o);
    }
    // The warps' rows meet in shared memory (over the tiles, now read): warp w's unnormalised
    // sums, max and sum per row; a warp with no tile leaves max -inf, sum 0.
    __syncthreads();
    float* red = (float*)dtc_smem;  // DTC_WARPS x 16 x HD
    if (t == 0) {
        wm[warp][g] = ma;
        wm[warp][g + 8] = mb;
        wl[warp][g] = la;
        wl[warp][g + 8] = lb;
    }
#pragma unroll
    for (int j = 0; j < DT; j++) {
        float* ra = red + (warp * 16 + g) * HD + 8 * j + 2 * t;
        float* rb = ra + 8 * HD;
        ra[0] = o_acc[j][0];
        ra[1] = o_acc[j][1];
        rb[0] = o_acc[j][2];
        rb[1] = o_acc[j][3];
    }
    __syncthreads();
    for (int i = tid; i < group * HD; i += DTC_WARPS * 32) {
        const int r = i / HD, d = i % HD;
        float m = NEG_INF;
#pragma unroll
        for (int w = 0; w < DTC_WARPS; w++) m = fmaxf(m, wm[w][r]);
        float l = 0.0f, a = 0.0f;
#pragma unroll
        for (int w = 0; w < DTC_WARPS; w++) {
            const float e = wm[w][r] == NEG_INF ? 0.0f : __expf(wm[w][r] - m);
            l += e * wl[w][r];
            a += e * red[(w * 16 + r) * HD + d];
        }
        const size_t row = (size_t)tok * heads + h0 + r;
        if (splits == 1) {
            out[row * HD + d] = f2bf(a / l);
        } else {
            float* p = part + (row * splits + split) * (HD + 4);  // the record combine_splits reads
            p[d] = a;
            if (d == 0) {
                p[HD] = m;
                p[HD + 1] = l;
            }
        }
    }
    if (splits == 1) return;
    const int ns = (nkeys + chunk - 1) / chunk;
    if (!last_split(counters + blockIdx.x, ns)) return;
    combine_heads<HD>(part, tok * heads + h0, group, ns, splits, out);
}
#define ATT_DEC_TC(HD)                                                                                          \
    extern "C" __global__ void __launch_bounds__(DTC_WARPS * 32, 1) attention_tc_decode_##HD(ATT_DEC_PARAMS) { \
        attention_decode_tc<HD, false>(q, kc, vc, positions, first_pos, bt_off, tables, heads, kv_heads, bs,   \
                                       scale, splits, part, counters, out, kb, vb, rope_table);                \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(DTC_WARPS * 32, 1) attention_tc_rope_##HD(ATT_DEC_PARAMS) {   \
        attention_decode_tc<HD, true>(q, kc, vc, positions, first_pos, bt_off, tables, heads, kv_heads, bs,    \
                                      scale, splits, part, counters, out, kb, vb, rope_table);                 \
    }
ATT_DEC_TC(64)
ATT_DEC_TC(128)
