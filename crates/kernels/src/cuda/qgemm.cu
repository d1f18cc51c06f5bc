// Prefill on Hopper's warpgroup tensor cores (wgmma, sm_90a only): out = x · Wᵀ for many rows,
// straight from the decode kernel's re-laid weight (`qgemv.cu`), which is never expanded. The host
// appends this file, and a QGEMM line per format, on sm_90 only; elsewhere prefill expands the
// weight to bf16 for cuBLAS.
//
// The weight is wgmma's A operand, from registers: a warp dequantizes its strip's 16-byte word of
// a chunk exactly as the decode kernel does (`dequant_frag`, scaled before the product), and that
// word already is the warp's part of A for the chunk's TPU k-steps (a warpgroup's four warps, four
// strips, are wgmma's 64 rows). The activations are B, from shared memory: BN rows of x a block,
// in swizzled K-major tiles. A's logical k order inside a chunk is the
// decode layout's permutation (logical (tile i, k 2t + 8 jh + h) is column 4 TPU t + 4 i + 2 jh + h),
// so B must follow it; it scatters 4-byte pairs, which a copy into shared memory cannot do in
// 16-byte pieces, so `qgemm_order` writes x in that order first (and, for act-order weights, in
// the stored column order: one gather for both), padded with zeros to whole chunks. That pass
// reads and writes the activations once (m · k · 4 bytes); the product reads them once per 128
// features.
//
// A block: two warpgroups (128 features, 8 strips) by BN rows (128 or 256); x tiles, codes and
// scales stream through a qw_stages-deep cp.async ring, one barrier a chunk. Each warpgroup keeps
// one chunk's wgmmas running while it dequantizes the next chunk's A fragments and issues its
// wgmmas behind them. Blocks of one row tile and successive feature tiles are neighbours in the
// grid, so a wave reads the whole weight (int4 8192 × 8192: 32 MB, which stays in the 50 MB L2)
// and a few row tiles of x, each once from HBM.
//
// Bound aimed at: the tensor cores' bf16 rate (989 TFLOP/s dense on the H100 SXM; cuBLAS bf16
// reaches 680-780 on the sweep's shapes at 4096 rows). Where it gets (H100, int4 g128, fifteenth
// session): 430-615 TFLOP/s from 512 to 4096 rows, 0.58-0.80x cuBLAS bf16 on the bf16 weight;
// at 512 rows 1.2-1.4x the expansion for cuBLAS, at 2048 and more the expansion is faster
// (`qgemm_max_rows` in cuda/mod.rs). Nsight Compute at 128 rows a block: tensor pipe 54% busy,
// issue slots 44%, warps stalled mostly on the math pipe and dispatch; not found yet what holds
// the tensor pipe there (the x tiles' L2 traffic, halved with 256 features a block, changed
// nothing). docs/benchmarks.md has the tables.

// Warps a block: two warpgroups, 8 strips, 128 features. Rows a block: 128 or 256 (BN, the
// wgmma's N; the host takes 256 where the blocks still fill the GPU). 256 rows halve the
// dequantization, weight copies and waits per product: at 128 rows (two blocks an SM) Nsight
// Compute showed the tensor pipe 54% busy, the issue slots 44%, ~209 instructions a warp per chunk.
#define QW_WARPS 8
// Ring depth by chunk width (TPU k-steps) and rows, filling the shared memory (half of it at 128
// rows but for 2- and 3-bit codes: two blocks an SM). The host sizes the dynamic shared memory
// with the same numbers (`qgemm_smem` in cuda/mod.rs).
__host__ __device__ constexpr int qw_stages(int tpu, int bn) { return tpu == 2 ? 8 : tpu == 4 ? 5 : bn == 128 ? 4 : 3; }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
// Makes this thread's writes to shared memory (cp.async lands through the generic proxy)
// visible to the wgmma's reads (the async proxy).
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Shared-memory matrix descriptor of a K-major operand in rows of `row_bytes` (128 or 64), 8-row
// atoms of 16-byte units swizzled (unit u of row r stored at u ^ r % 8 with 128-byte rows,
// u ^ (r / 2) % 4 with 64-byte ones): the tensor cores' reads of 8 rows then spread over all
// banks (without the swizzle the kernel ran at half the speed). Atoms are 8 rows apart (sbo);
// the leading offset is unused with a swizzle.
__device__ __forceinline__ u64 wgmma_desc(u32 addr, u32 row_bytes) {
    const u64 mode = row_bytes == 128 ? 1 : 2;
    return (u64)((addr & 0x3ffffu) >> 4) | (u64)1 << 16 | (u64)(8 * row_bytes >> 4) << 32 | mode << 62;
}
// Where unit u of row r of a swizzled tile of `row_bytes` rows lies, from the tile's start.
__host__ __device__ constexpr u32 swizzled(u32 r, u32 u, u32 row_bytes) {
    return r * row_bytes + 16 * (row_bytes == 128 ? u ^ (r & 7) : u ^ ((r >> 1) & 3));
}

#define QW_F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define QW_F16(i) QW_F4(i), QW_F4(i + 4), QW_F4(i + 8), QW_F4(i + 12)
// d (64 × BN, f32, this thread's BN / 2 values) += a (64 × 16 bf16, this warp's 16 rows in
// registers as mma.m16n8k16's A fragment) · B (16 × BN bf16 at desc).
template <int BN>
__device__ __forceinline__ void wgmma_rows(float* d, const u32* a, u64 desc) {
    if constexpr (BN == 128) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
            "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
            : QW_F16(0), QW_F16(16), QW_F16(32), QW_F16(48)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
    } else {
        static_assert(BN == 256, "128 or 256 rows");
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
            "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
            "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
            "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
            "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
            "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
            : QW_F16(0), QW_F16(16), QW_F16(32), QW_F16(48), QW_F16(64), QW_F16(80), QW_F16(96), QW_F16(112)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
    }
}

template <int BITS, bool ASYM, int KIND, int BN>
__device__ void qgemm(const QgPart& p, int fb, const bf16_t* x, int m, int kp, int CH) {
    constexpr int TPU = tile_span(BITS), CW = 16 * TPU, UNITS = CW / 8, S = qw_stages(TPU, BN);
    constexpr bool PLANE = BITS == 3, FOLD = e2m1_folded(KIND, false, ASYM);
    constexpr int LANES = QW_WARPS * 32, COPIES = BN * UNITS / LANES;
    // A stage's x tile: BN rows of the chunk in panels of 64 columns (128-byte rows; 8-bit
    // codes' 32-column chunks: one panel of 64-byte rows), swizzled (wgmma_desc). k-step i is
    // 32 bytes into its panel's rows.
    constexpr u32 ROWB = CW >= 64 ? 128 : 64, PUNITS = ROWB / 16, PANEL = BN * ROWB;
    constexpr u32 XSTAGE = BN * CW * 2;
    // The swizzle is of the address bits: stages start at 1024-byte boundaries (the host adds
    // 1 KB for the alignment).
    extern __shared__ __align__(1024) unsigned char qw_smem_raw[];
    unsigned char* qw_smem = qw_smem_raw + ((1024 - (smem_u32(qw_smem_raw) & 1023)) & 1023);
    uint4* ring_q = (uint4*)(qw_smem + S * XSTAGE);
    u32* ring_s = (u32*)(ring_q + S * LANES);
    u32* ring_o = ring_s + S * LANES;
    uint2* ring_h = (uint2*)(ring_o + (ASYM ? S * LANES : 0));
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    // fb: the block's 8 strips within its weight.
    const int strips = (p.n + 15) >> 4, mine = fb * QW_WARPS + warp, r0 = blockIdx.y * BN;
    // A strip past the last computes the last again and writes nothing.
    const int s = min(mine, strips - 1);
    const float sfold = FOLD ? __uint_as_float((u32)(253 - p.fold) << 23) : 1.0f;
    const float omul = FOLD ? __uint_as_float((u32)(127 + p.fold) << 23) : 1.0f;
    const uint4* qsrc = p.codes + (size_t)s * CH * 32 + lane;
    const uint2* hsrc = PLANE ? p.planes + (size_t)s * CH * 32 + lane : nullptr;
    const u32 rx = smem_u32(qw_smem);
    // The thread's x copies: unit u of rows rl + 8 (rh + j 32 / UNITS), j < COPIES (8 lanes a
    // swizzled atom's column, 128 contiguous bytes of shared memory; a warp's 32 lanes 4 units of
    // 8 rows). Rows past m repeat the last row (their outputs are not written); the row offsets
    // are 32-bit (the host keeps m · kp below 2^31).
    static_assert(32 % UNITS == 0, "a warp's copies cover whole rows");
    const int rl = tid & 7, u = (tid >> 3) % UNITS, rh = (tid >> 3) / UNITS;
    u32 xoff[COPIES];
#pragma unroll
    for (int j = 0; j < COPIES; j++) xoff[j] = (u32)min(r0 + rl + 8 * (rh + j * (LANES / 8 / UNITS)), m - 1) * kp + u * 8;
    const u32 xdst = (u / PUNITS) * PANEL + swizzled(rl + 8 * rh, u % PUNITS, ROWB);
    auto group_of = [&](int c) { return min(__umulhi((u32)(c * CW + 4 * TPU * t), p.gmul), (u32)p.G - 1); };
    auto issue = [&](int c) {
        if (c < CH) {
            const int slot = c % S;
            cp_async16(&ring_q[slot * LANES + tid], qsrc + (size_t)c * 32);
            if (PLANE) cp_async8_at(smem_u32(&ring_h[slot * LANES + tid]), hsrc + (size_t)c * 32);
            const size_t at = scale_at<KIND>(s, group_of(c), p.G, g);
            cp_async4(&ring_s[slot * LANES + tid], p.scales + at);
            if (ASYM) cp_async4(&ring_o[slot * LANES + tid], p.offsets + at);
            const bf16_t* xc = x + c * CW;
            const u32 dst = rx + slot * XSTAGE + xdst;
#pragma unroll
            for (int j = 0; j < COPIES; j++) cp_async16_at(dst + j * (LANES / UNITS) * ROWB, xc + xoff[j]);
        }
        cp_async_commit();
    };
    float d[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; i++) d[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < S - 2; i++) issue(i);
    // Chunk c's wgmmas are issued while chunk c - 1's still run, so the tensor cores always have
    // this warpgroup's next products queued. Each waits for chunk c - 2's: then c - 2's ring slot
    // is refilled (with chunk c + S - 2) and its A registers, `buf`, rewritten with chunk c's.
    // The tensor cores read A's registers until the wait, which ptxas's register allocation does
    // not see: `buf`'s old values are folded into `sink` after the wait, so they stay live (and
    // chunk c - 1's, in the other buffer, keep registers of their own) until then.
    u32 sink = 0;
    auto step = [&](int c, u32 (&buf)[TPU][4]) {
        const int slot = c % S;
        cp_async_wait<S - 3>();
        wgmma_wait<1>();
#pragma unroll
        for (int i = 0; i < TPU; i++) sink ^= buf[i][0] ^ buf[i][1] ^ buf[i][2] ^ buf[i][3];
        {
            // This lane's own copies: no barrier needed.
            const uint4 qw = ring_q[slot * LANES + tid];
            const uint2 hp = PLANE ? ring_h[slot * LANES + tid] : make_uint2(0, 0);
            const u32 words[4] = {qw.x, qw.y, qw.z, qw.w}, plane[2] = {hp.x, hp.y};
            const QScale scl = qscale<BITS, ASYM, KIND>(ring_s[slot * LANES + tid],
                                                        ASYM ? ring_o[slot * LANES + tid] : 0u, p.ts, group_of(c), sfold);
#pragma unroll
            for (int i = 0; i < TPU; i++) dequant_frag<BITS, ASYM, KIND, false>(words, plane, i, scl, buf[i]);
        }
        // Every thread's copies of this chunk's x tile are in and visible to the tensor cores,
        // and every warpgroup is done with chunk c - 2's slot.
        fence_async_smem();
        __syncthreads();
        issue(c + S - 2);
        wgmma_fence();
#pragma unroll
        for (int i = 0; i < TPU; i++)
            wgmma_rows<BN>(d, buf[i], wgmma_desc(rx + slot * XSTAGE + (32 * i / ROWB) * PANEL + 32 * i % ROWB, ROWB));
        wgmma_commit();
    };
    u32 a0[TPU][4] = {}, a1[TPU][4] = {};
    for (int c = 0; c < CH; c += 2) {
        step(c, a0);
        if (c + 1 < CH) step(c + 1, a1);
    }
    wgmma_wait<0>();
    // Never true (m > 0): keeps `sink`, and with it the A buffers' lifetimes, in the program.
    if (m < 0) p.out[0] = (bf16_t)sink;
    if (mine >= strips) return;
    // d[4 j + r]: feature g + 8 (r >> 1) of the strip, row 8 j + 2 t + (r & 1) of the tile.
#pragma unroll
    for (int j = 0; j < BN / 8; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int row = r0 + 8 * j + 2 * t + (r & 1), feat = s * 16 + g + 8 * (r >> 1);
            if (row < m && feat < p.n) p.out[(size_t)row * p.n + feat] = f2bf(d[4 * j + r] * omul);
        }
}

// x (m rows of k) in the order qgemm's B takes: row r of out (kp = whole chunks of CW columns)
// holds at logical column c CW + 16 i + 8 jh + 2 tt + h the input column (stored column, for
// act-order weights: perm, see `permute_cols`) c CW + 4 TPU tt + 4 i + 2 jh + h, zero past k.
// Grid (pair blocks, rows), one thread a pair.
template <int TPU>
__device__ void qgemm_order(const bf16_t* x, const u32* perm, int k, int kp, bf16_t* out) {
    constexpr int CW = 16 * TPU;
    const int l = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (l >= kp) return;
    const int c = l / CW, li = l % CW, i = li >> 4, jh = (li >> 3) & 1, tt = (li & 7) >> 1;
    const int col = c * CW + 4 * TPU * tt + 4 * i + 2 * jh;
    const bf16_t* row = x + (size_t)blockIdx.y * k;
    u32 v = 0;
#pragma unroll
    for (int h = 0; h < 2; h++)
        if (col + h < k) v |= (u32)row[perm ? perm[col + h] : col + h] << (16 * h);
    *(u32*)(out + (size_t)blockIdx.y * kp + l) = v;
}

#define QGEMM_ROWS(tag, BITS, ASYM, KIND, BN)                                                                  \
    extern "C" __global__ void __launch_bounds__(QW_WARPS * 32, BN == 128 && tile_span(BITS) != 8 ? 2 : 1)      \
        qgemm_##tag##_##BN(const QgArgs a) {                                                                   \
        pdl_enter();                                                                                           \
        /* Up to QG_PARTS weights of one input (q, k, v), each from a whole block (strip0 a multiple of 8). */ \
        const int sg = blockIdx.x * QW_WARPS;                                                                  \
        const int pi = (a.parts > 1 && sg >= a.p[1].strip0) + (a.parts > 2 && sg >= a.p[2].strip0);           \
        const QgPart p = pi == 0 ? a.p[0] : pi == 1 ? a.p[1] : a.p[2];                                         \
        qgemm<BITS, ASYM, KIND, BN>(p, (sg - p.strip0) / QW_WARPS, a.x, a.m, a.k, a.CH);                       \
    }
#define QGEMM(tag, BITS, ASYM, KIND)                                                                           \
    QGEMM_ROWS(tag, BITS, ASYM, KIND, 128)                                                                     \
    QGEMM_ROWS(tag, BITS, ASYM, KIND, 256)                                                                     \
    extern "C" __global__ void qgemm_order_##tag(const bf16_t* x, const u32* perm, int k, int kp, bf16_t* out) { \
        pdl_enter();                                                                                           \
        qgemm_order<tile_span(BITS)>(x, perm, k, kp, out);                                                     \
    }
