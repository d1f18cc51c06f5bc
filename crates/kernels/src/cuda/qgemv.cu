// Quantized decode matmul on tensor cores: out[r, n] = sum_k x[r, k] * W[n, k] for up to 16 rows
// of x (bf16; more in blocks of 16, `row_blocks`), W packed in any Marlin format: int8/4/3/2 codes
// with f16 group scales (and offsets, asymmetric), E4M3 or E2M1 codes with f16 scales, E2M1 with
// E8M0 (mxfp4) or E4M3-times-tensor-scale (nvfp4) block scales. The host compiles this file once
// per format (the QFORMAT line it appends).
//
// Layout (made once at upload, `cuda/quant.rs`): the weight is cut into strips of 16 output
// features and chunks of CW columns (128 for 2-/3-bit, 64 for 4-bit, 32 for 8-bit codes: TPU = 8,
// 4 or 2 k-tiles of 16). For
// each (strip, chunk) each lane of a warp holds one 16-byte word: its A fragments of
// `mma.m16n8k16` for the chunk's TPU tiles (register j of tile i: feature g + 8 (j & 1), logical
// k 2t + 8 (j >> 1) + h, with g = lane / 4, t = lane % 4). The logical k of the mma is a
// permutation of the chunk's columns chosen so that lane t's activations are one contiguous run:
// logical (tile i, k 2t + 8 jh + h) is physical column 4 TPU t + 4 i + 2 jh + h. The mma sums
// over k in any order, so the same permutation on both operands changes nothing, and each lane
// reads x with one to four 16-byte loads per chunk instead of 4-byte pieces per tile. Int4 words
// hold nibble j + 4h of register j in word i; int8 byte 2 (j & 1) + h of word 2i + (j >> 1); the
// other formats are placed as `code_pair` says. A lane's run lies in one group (groups are
// multiples of the run or whole rows), so each lane needs one scale pair per chunk: scales are
// laid out per (strip, group) as 8 words, word g holding the 16-bit scales of features g and
// g + 8 (offsets likewise). The byte scales of mxfp4 and nvfp4 go two groups a word instead, per
// (strip, pair of groups): bytes 0 and 1 of word g the scales of features g and g + 8 in the
// even group, bytes 2 and 3 in the odd one, so they stream at 8 bits a group and feature (at
// 16 bits nvfp4 read 5 bits a weight rather than 4.5).
//
// Dequantization without lookups, scale applied before the mma (which then accumulates straight
// into the f32 result): int4 symmetric `(w >> 4j) & 0x000f000f | 0x43004300` is the bf16x2 pair
// (128 + c); one bf16x2 FMA makes it c - 8 exactly and a second multiplies by the scale (rounded
// to bf16: the weight the mma sees is the bf16 rounding of the dequantized value, error 2^-9,
// as cuBLAS sees the expanded weight at prefill). Int8 and asymmetric int4 go through the f32
// magic 2^23 + c (`prmt` / `lop3`), one FMA with the f32 scale (and offset), and
// `cvt.rn.bf16x2.f32`. The other formats: `code_pair`'s exact values, then the same scaling;
// E2M1 (fp4, mxfp4, nvfp4) skips code_pair's multiply by 2^126, which goes into the scale
// instead (`e2m1_bits`, fold in `qgemv`): one bf16x2 operation a pair less, which took the m=1
// kernels 2-9% faster on the H100 (thirteenth session: mxfp4 8192×28672 50.4 -> 47.2 µs, 3.29x ->
// 3.50x cuBLAS bf16; nvfp4 28672×8192 53.5 -> 50.0 µs; 8 and 16 rows 2-11%).
//
// Integer activations (symmetric int4, 1-4 rows of long rows in many strips, QIACT below): a
// launch of `quantize_x_codes` first writes each chunk of 64 activations as two int8 codes a
// value and a scale; the kernel then takes each nibble to the int8 16 (c - 8) in one lop3 and
// multiplies on integer mmas (m16n8k32), one scale multiply a chunk (g32, two groups a chunk, 1-2
// rows: a row's high and low codes take two mma columns each, one a group, the other group's
// activations masked to zero). H200, int4 g128: 72.5
// instructions a chunk against 102.5; 1-2 rows at 88-91% of copy on 8192 × 28672 and 28672 ×
// 8192 where the bf16 kernels reach 75-86%, 3-4 rows at 84% and 90-91% (twenty-seventh session);
// g32 at 1-2 rows 90-94% there against 79-85%, 79 instructions a chunk against 117 (twenty-eighth).
//
// Loads: each lane streams its own words through a QG_STAGES-deep ring in shared memory filled
// by `cp.async` (16-byte codes, 4-byte scale pair), so QG_STAGES - 1 chunks per lane are in flight
// without holding registers, and no barrier is needed (a lane reads only what it copied). The
// activations of the next chunk are loaded into registers while the current one is multiplied;
// with 1-4 rows of whole chunks (the `_1`, `_2` and `_4` kernels) they ride in the ring instead,
// copied by a few lanes of the warp and read by all from shared memory: one step ahead, their L2
// latency was the loop's most common stall (Nsight Compute, gate/up at m=1: 44% of the warps'
// cycles waiting on a global load), and in the ring it hides behind S - 1 steps like the weights'.
// A block of W warps takes one strip and a range of its chunks (the warps interleave chunk by
// chunk, so a block reads one contiguous stream); the warps reduce through shared memory. When
// the strips alone do not fill the GPU the chunks are split over gridDim.y blocks (split-K): they
// add into an f32 workspace, and the last block of a strip (counted with an atomic) writes the
// bf16 output and zeroes the workspace and its counter, ready for the next call (and for CUDA
// graph replays) without another launch.
//
// The loop's steps come in two kinds: unchecked steps, taken while this step's and the next
// step's chunks all lie inside k (`nfull`, all but a partial last chunk of the row) and the chunks
// the step issues are all the warp's, with no bounds checks on the activations (plain 16-byte
// loads; rows past m read row 0, which only feeds output columns never written) and no check per
// issued chunk; then checked steps for the rest. The scale's address is one 64-bit multiply-add
// (`at8`). In the SASS of the int4 g128 m=1 loop that is ~84 instructions per chunk on the
// unchecked path (~54 of them dequantization, mma and scaling), from ~107.
//
// Bound aimed at: the codes and scales streamed once from HBM at the device-to-device copy
// bandwidth (`marlin bench kernels` measures both in one run). Where it gets (H100 80GB HBM3, copy
// 2880 GB/s, 2026-11-27, eleventh session): int4 g128 at m=1 96.5% of copy on 28672×8192
// (3.88x cuBLAS bf16), 95% on 8192×28672 (3.82x), 87% at 8192² (3.75x), 81% on 14336×4096, 73.5%
// on 4096×14336, 54% at 4096² (the last two with 3 blocks an SM, the others 4: the `w` builds
// below); 8 rows 51-85% (71-91% on the shapes of 8192 and more with four strips a block,
// twenty-first session: 8-bit codes 84-98%), 16 rows (two mmas per tile, two strips a block)
// 59-86% (42-68% with one strip a block); fp8 and int8 at one row 91-101% (tenth session). At 2-16 rows the activations cost too:
// each strip reads its rows from the L2, and with those loads pointed at one cached chunk (a
// timing experiment, wrong results) int4 g128 at 8 rows ran at 93-97% of copy on the long shapes
// instead of 76-86% (twelfth session). Sharing them instead (blocks of 8 strips stepping through
// the same chunks, each chunk's activations copied once into shared memory; sixteenth session,
// branch `cuda-tile-exp`) lost everywhere: that kernel's load stream alone reached ~79% of copy
// where this one's reaches 94-96%, so a block keeps one strip and a contiguous stream. At one
// row it is not bandwidth-bound: the time barely changes from the H100 to the H200 (40% more
// bandwidth; second session, before the `w` builds, which show that loads in flight per SM
// still matter on the large shapes), and Nsight Compute (second session) showed the
// integer/logic pipe as the busiest with 2.6 instructions issued per cycle per SM, about 180 per
// chunk (64 of them dequantization and 4 mma). A version of the same loop with the dequantization
// and mma removed streamed the same words at 94-96% of copy on the large shapes, so what is left
// to take is instructions per weight (before the unchecked steps the SASS of the int4 g128 loop
// spent ~25 of ~107 instructions per chunk on the ring's addressing and the activation bounds;
// 16 still go to the second bf16x2 operation per register), not the loads. Trading that second operation for a
// second mma (c s from one FMA, the -8 s as a constant fragment) measured 4-7% slower at m=1
// (H100, int4 g32): the mma costs more issue time than the FMAs it saves. On an H200 (40% more
// bandwidth, the same SMs) the one-row loop is issue-bound: at its copy bandwidth an SM
// sub-partition has ~134 cycles for a chunk's 512 bytes against ~123 instructions a chunk (int4
// g128), and timing-only builds without the 16 offset FMAs a chunk ran ~5 points of copy faster
// on the long shapes, without any dequantization 5-13 (twenty-fifth session). Fewer
// instructions alone do not buy it back: builds whose copies one producer thread issued as bulk
// copies (cp.async.bulk, mbarriers; 72-106 instructions a chunk) ran 2-18 points of copy slower
// on most shapes, their warps waiting on whole steps to land, and with each warp's own smaller
// bulk copies 14-17 points slower on the long shapes (twenty-sixth session, branches
// `cuda-bulk`, `cuda-bulk2`, `cuda-bulk3`). Full tables: docs/benchmarks.md.

#define QG_STAGES 6
#define QG_MAXW 8

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
// The decode kernel's weight copies carry an L2 policy (`streaming_policy`): a decode step reads
// its weights once, gigabytes through the 50 MB L2, which as plain loads push out what the step
// reads again (activations, the KV cache, attention's partials, the kernels' code). Llama3-8b int4
// decode on the H100 (twentieth session, one call, alternated): 443.6-444.8 -> 458.5-459.6 tok/s at
// a 512-token prompt (69.1-69.5 -> 71.5-71.7% of the bound), 446.0 -> 460.9 at 128; a lone GEMV,
// with nothing else to keep in the L2, runs ~1-2% slower (4096 x 14336 int4 12.6 -> 12.9 us).
__device__ __forceinline__ u64 streaming_policy() {
    u64 p;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}
__device__ __forceinline__ void cp_async16_stream(u32 dst, const void* src, u64 policy) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "l"(policy)
                 : "memory");
}
__device__ __forceinline__ void cp_async8_stream(u32 dst, const void* src, u64 policy) {
    asm volatile("cp.async.ca.shared.global.L2::cache_hint [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "l"(policy)
                 : "memory");
}
__device__ __forceinline__ void cp_async4_stream(u32 dst, const void* src, u64 policy) {
    asm volatile("cp.async.ca.shared.global.L2::cache_hint [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "l"(policy)
                 : "memory");
}

// base + 4 · 8 i (word 8 i of a u32 array) in one 64-bit multiply-add: written as C the compiler
// folds the base's own offset into the sum and spends 4-6 instructions per address.
__device__ __forceinline__ const u32* at8(const u32* base, u32 i) {
    const u32* r;
    asm("mad.wide.u32 %0, %1, 32, %2;" : "=l"(r) : "r"(i), "l"(base));
    return r;
}

// d = a b (+ d with ACC) on tensor cores in int8 (m16n8k32): a0 / a2 rows g, a1 / a3 rows g + 8.
template <bool ACC>
__device__ __forceinline__ void mma_s8(int* d, const u32 (&a)[4], u32 b0, u32 b1) {
    if (ACC)
        asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%10, %10, %10, %10};"
            : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
}

// An int4 word's codes c as the int8 16 (c - 8): the nibbles at bit 4 of each byte (`low`:
// those at bit 0 moved there first) with their sign flipped, as one lop3 ((a ^ b) & c).
template <bool LOW>
__device__ __forceinline__ u32 int4_times16(u32 w) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0x28;" : "=r"(r) : "r"(LOW ? w << 4 : w), "r"(0x88888888u), "r"(0xf0f0f0f0u));
    return r;
}

// (a & b) | c in one instruction (the compiler otherwise emits an AND and an OR).
__device__ __forceinline__ u32 and_or(u32 a, u32 b, u32 c) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// k-tiles of 16 columns per chunk (one 16-byte word a lane): 8 codes a tile and lane.
__host__ __device__ constexpr int tile_span(int bits) { return bits == 8 ? 2 : bits == 4 ? 4 : 8; }

// x << n for n of either sign (a right shift when negative; n is a compile-time constant).
__device__ __forceinline__ u32 shl(u32 x, int n) { return n >= 0 ? x << n : x >> -n; }
__device__ __forceinline__ void cp_async4_at(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async8_at(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src) : "memory");
}

// What a code means (BITS and ASYM say the rest): an integer, an E4M3 value times an f16 scale,
// or an E2M1 value times an f16 scale, an E8M0 power of two (MX) or an E4M3 scale times the
// tensor's f32 scale (NV).
#define K_INT 0
#define K_FP8 1
#define K_FP4 2
#define K_MX 3
#define K_NV 4

// Byte scales (mxfp4, nvfp4): two groups a scale word (see the layout above).
__host__ __device__ constexpr bool byte_scales(int kind) { return kind == K_MX || kind == K_NV; }

// Word g of group grp's scales in strip s of a weight of G groups a row.
template <int KIND>
__device__ __forceinline__ size_t scale_at(int s, int grp, int G, int g) {
    return byte_scales(KIND) ? ((size_t)s * ((G + 1) >> 1) + (grp >> 1)) * 8 + g : ((size_t)s * G + grp) * 8 + g;
}

// The scale of feature g (hi = 0) or g + 8 (hi = 1) of group grp from its word.
template <int KIND>
__device__ __forceinline__ u32 scale_bits(u32 word, int grp, int hi) {
    return byte_scales(KIND) ? (word >> (16 * (grp & 1) + 8 * hi)) & 0xffu : (word >> (16 * hi)) & 0xffffu;
}

// One scale of a group (its scale_bits) as f32, exactly as docs/format.md defines it.
template <int KIND>
__device__ __forceinline__ float scale_value(u32 v, float ts) {
    if (KIND == K_MX) return v == 0 ? __uint_as_float(0x00400000u) : __uint_as_float(v << 23);
    if (KIND == K_NV) {
        // E4M3 in f32's bits is the value times 2^-120 (subnormals included), then exact.
        const float e = __uint_as_float((v & 0x7fu) << 20) * __uint_as_float(0x7b800000u);  // 2^120
        return ((v & 0x80u) ? -e : e) * ts;
    }
    return h2f((f16_t)v);
}

// Register j of tile i of a lane's chunk as the bf16x2 pair of its codes' exact values before
// scaling (c - 2^(b-1) symmetric, c asymmetric, the E4M3 / E2M1 value), for the formats that
// are not int4/int8 and for the element-wise decoders. Where each code sits (`cuda/quant.rs`
// writes it): int2 and int3's low two bits at bit 2 (j + 4 (i & 1)) + 16 h of word i / 2, int3's
// third bit at bit j + 4 (i & 3) + 16 h of plane word i / 4; E4M3 at byte 2 h + 1 - (j & 1) of
// word 2 i + j / 2 (so one mask or shift puts both bytes at the top of their halves); E2M1 as
// int4 (nibble j + 4 h of word i).
// E2M1 codes (nibble j + 4 h of word i, s ee m) placed in a bf16x2 pair: ee m to bf16's bits 8..6
// and s to 15, which is the code's value times 2^-126 (E2M1's subnormal, 0.5, lands on bf16's).
__device__ __forceinline__ u32 e2m1_bits(const u32* w, int i, int j) {
    const u32 v = w[i];
    return and_or(shl(v, 12 - 4 * j), 0x80008000u, shl(v, 6 - 4 * j) & 0x01c001c0u);
}

// Whether a kernel multiplies e2m1_bits by the scale times 2^126 (one bf16x2 operation a pair
// rather than two; see `qgemv`'s fold): E2M1 codes scaled per weight.
__host__ __device__ constexpr bool e2m1_folded(int kind, bool post, bool asym) {
    return (kind == K_FP4 || kind == K_MX || kind == K_NV) && !post && !asym;
}

template <int BITS, bool ASYM, int KIND>
__device__ __forceinline__ u32 code_pair(const u32* w, const u32* plane, int i, int j) {
    if (KIND == K_FP8) {
        const u32 v = w[2 * i + (j >> 1)];
        const u32 t = (j & 1) ? (v << 8) & 0xff00ff00u : v & 0xff00ff00u;
        // s eeee mmm at bits 15..8: eeee mmm to bf16's 10..4, the sign stays: the bf16 is the
        // value times 2^-120 (E4M3 subnormals land on bf16 subnormals), then exact.
        return fma_bf2(and_or(t, 0x80008000u, (t >> 4) & 0x07f007f0u), 0x7b807b80u, 0x80008000u);
    } else if (KIND != K_INT) {
        return fma_bf2(e2m1_bits(w, i, j), 0x7e807e80u, 0x80008000u);  // times 2^126: exact
    } else if (BITS == 4) {
        return fma_bf2(and_or(w[i] >> (4 * j), 0x000f000fu, 0x43004300u), 0x3f803f80u, ASYM ? 0xc300c300u : 0xc308c308u);
    } else {
        // Code p of its 16-bit half (p = j + 4 (i & 1)), taken in place: one shift of the word
        // serves three codes, code q = p % 3 of the shifted word lying at bits 2q, 2q + 1 (its
        // third bit put at 2q + 2), inside bf16's mantissa: 128 + c 4^q exactly. One FMA by 4^-q
        // less 128 4^-q (and 2^(b-1)) leaves c (less 2^(b-1)), exactly.
        const int p = j + 4 * (i & 1), q = p % 3;
        u32 c = and_or(w[i >> 1] >> (6 * (p / 3)), 0x00030003u << (2 * q), 0x43004300u);
        if (BITS == 3) c = and_or(shl(plane[i >> 2], 2 * q + 2 - (j + 4 * (i & 3))), 0x00040004u << (2 * q), c);
        const u32 scale = q == 0 ? 0x3f80u : q == 1 ? 0x3e80u : 0x3d80u;  // 1, 1/4, 1/16
        // -(128 4^-q + 2^(b-1)): -128, -32, -8 (asymmetric); -130, -34, -10 (int2); -132, -36, -12.
        const u32 bias = ASYM ? (q == 0 ? 0xc300u : q == 1 ? 0xc200u : 0xc100u)
                         : BITS == 2 ? (q == 0 ? 0xc302u : q == 1 ? 0xc208u : 0xc120u)
                                     : (q == 0 ? 0xc304u : q == 1 ? 0xc210u : 0xc140u);
        return fma_bf2(c, scale | scale << 16, bias | bias << 16);
    }
}

// The exact value of code h of register j of tile i, before scaling (every format).
template <int BITS, bool ASYM, int KIND>
__device__ __forceinline__ float code_at(const u32* w, const u32* plane, int i, int j, int h) {
    if (KIND == K_INT && BITS == 8) {
        const int c = (w[2 * i + (j >> 1)] >> (8 * ((j & 1) * 2 + h))) & 255;
        return (float)(ASYM ? c : c - 128);
    }
    const u32 p = code_pair<BITS, ASYM, KIND>(w, plane, i, j);
    return h ? bf_hi(p) : bf_lo(p);
}


// Per-lane scale of one chunk: the bf16x2 broadcasts (int4 symmetric) or the f32 values of the
// features g and g + 8.
struct QScale {
    u32 lo2, hi2;
    float slo, shi, olo, ohi;
};

// grp: the group's parity is what matters (byte scales). The bf16x2 broadcasts are the scales
// times `fold` (a power of two; 1 but for E2M1 codes scaled per weight).
template <int BITS, bool ASYM, int KIND>
__device__ __forceinline__ QScale qscale(u32 sp, u32 op, float ts, int grp, float fold) {
    QScale r;
    r.slo = scale_value<KIND>(scale_bits<KIND>(sp, grp, 0), ts);
    r.shi = scale_value<KIND>(scale_bits<KIND>(sp, grp, 1), ts);
    r.olo = ASYM ? h2f((f16_t)(op & 0xffff)) : 0.0f;
    r.ohi = ASYM ? h2f((f16_t)(op >> 16)) : 0.0f;
    if (!ASYM && !(KIND == K_INT && BITS == 8)) {
        r.lo2 = pack_bf2(r.slo * fold, r.slo * fold);
        r.hi2 = pack_bf2(r.shi * fold, r.shi * fold);
    }
    return r;
}

// The A fragment (bf16) of tile i of a lane's 16-byte word: with POST the exact integers
// (c - 2^(b-1), or c when asymmetric), the scale (and offset) applied after the mma; else scaled.
template <int BITS, bool ASYM, int KIND, bool POST>
__device__ __forceinline__ void dequant_frag(const u32* words, const u32* plane, int i, const QScale& s, u32* a) {
    if (!(KIND == K_INT && (BITS == 8 || (BITS == 4 && ASYM && !POST)))) {
        // Exact values (code_pair), then scaled in bf16 (one rounding: the scale is rounded to
        // bf16 first), or in f32 with the offset; with POST the scale comes after the mma.
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 c = e2m1_folded(KIND, POST, ASYM) ? e2m1_bits(words, i, j) : code_pair<BITS, ASYM, KIND>(words, plane, i, j);
            if (POST) {
                a[j] = c;
            } else if (!ASYM) {
                a[j] = fma_bf2(c, (j & 1) ? s.hi2 : s.lo2, 0x80008000u);
            } else {
                const float sc = (j & 1) ? s.shi : s.slo, of = (j & 1) ? s.ohi : s.olo;
                a[j] = pack_bf2(fmaf(bf_lo(c), sc, of), fmaf(bf_hi(c), sc, of));
            }
        }
    } else if (POST) {
        const float bias = ASYM ? 8388608.0f : 8388736.0f;  // 2^23, 2^23 + 128
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 w = words[2 * i + (j >> 1)];
            const int b = (j & 1) * 2;
            a[j] = pack_bf2(__uint_as_float(__byte_perm(w, 0x4b000000u, 0x7440 + b)) - bias,
                            __uint_as_float(__byte_perm(w, 0x4b000000u, 0x7440 + b + 1)) - bias);
        }
    } else if (BITS == 4) {
        // Asymmetric int4 scaled per weight: through the f32 magic 2^23 + c.
        const u32 w = words[i];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 u = (w >> (4 * j)) & 0x000f000fu;
            const float lo = __uint_as_float((u & 0xffffu) | 0x4b000000u) - 8388608.0f;
            const float hi = __uint_as_float((u >> 16) | 0x4b000000u) - 8388608.0f;
            const float sc = (j & 1) ? s.shi : s.slo, of = (j & 1) ? s.ohi : s.olo;
            a[j] = pack_bf2(fmaf(lo, sc, of), fmaf(hi, sc, of));
        }
    } else {
        const float bias = ASYM ? 8388608.0f : 8388736.0f;  // 2^23, 2^23 + 128
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 w = words[2 * i + (j >> 1)];
            const int b = (j & 1) * 2;
            const float lo = __uint_as_float(__byte_perm(w, 0x4b000000u, 0x7440 + b)) - bias;
            const float hi = __uint_as_float(__byte_perm(w, 0x4b000000u, 0x7440 + b + 1)) - bias;
            const float sc = (j & 1) ? s.shi : s.slo, of = (j & 1) ? s.ohi : s.olo;
            a[j] = ASYM ? pack_bf2(fmaf(lo, sc, of), fmaf(hi, sc, of)) : pack_bf2(lo * sc, hi * sc);
        }
    }
}

// A lane's activations for one chunk: the 4 TPU values at p, of which `left` lie inside the row
// (zero past it, and when !ok: past m or the warp's chunks), as XW 16-byte words.
template <int XW>
__device__ __forceinline__ void load_x(const bf16_t* p, bool ok, int left, bool xvec, uint4* v) {
#pragma unroll
    for (int u = 0; u < XW; u++) v[u] = make_uint4(0, 0, 0, 0);
    if (!ok) return;
    if (xvec && 8 * XW <= left) {
#pragma unroll
        for (int u = 0; u < XW; u++) v[u] = *(const uint4*)(p + 8 * u);
    } else {
        u32* w = (u32*)v;
#pragma unroll
        for (int e = 0; e < 8 * XW; e++)
            if (e < left) w[e >> 1] |= (u32)p[e] << (16 * (e & 1));
    }
}

// N entries of T at byte OFF of the dynamic shared memory. Declared here, not in qgemv's body:
// there NVRTC 13.0 placed the array inside the module's 1 KB-aligned static window (16 bytes in
// instead of 1 KB), and the deep builds ran ~20% slower (H100, twentieth session).
template <typename T, int N, unsigned OFF>
__device__ __forceinline__ T (&qg_dynamic_ring())[N] {
    extern __shared__ uint4 qg_dyn[];
    return *reinterpret_cast<T(*)[N]>(reinterpret_cast<char*>(qg_dyn) + OFF);
}

// A block's second strip (SP = 2) as offsets from its first: codes and planes in their words,
// scales and offsets in theirs; and its weight's tensor scale and fold.
struct QgSecond {
    long long q, h, s, o;
    float ts;
    int fold;
};
// Strip s + 1 of the same weight (n features), or strip s again past its last strip: its
// features lie past n and are never written.
template <int KIND>
__device__ __forceinline__ QgSecond next_strip(int s, int n, int CH, int G, float ts, int fold) {
    const bool has = s + 1 < (n + 15) / 16;
    const long long q = has ? (long long)CH * 32 : 0, sc = has ? (long long)scale_at<KIND>(1, 0, G, 0) : 0;
    return QgSecond{q, q, sc, sc, ts, fold};
}
// Strip p's offset from the block's first, given the second's (`one`). With four strips a block
// they are strips s .. s + 3 of one weight; those past its last strip (p > extra) read its last
// again, and their features, past n, are never written.
// (The scales' offsets spell out the SP <= 2 case at the call: through this helper NVRTC 13.0
// scheduled the one- and two-strip kernels' prologues differently.)
template <int SP>
__device__ __forceinline__ long long strip_off(int p, long long one, int s, int n) {
    if (SP <= 2) return p ? one : 0;
    return (long long)min(p, (n + 15) / 16 - s - 1) * one;
}

// Strip s of a weight of n features whose strips are strips sg - s .. of the launch (several
// weights of one input run as one launch, see QgArgs); the split-K sums of feature f of the
// launch (row r) are ws[r * wstride + f], its strips' counters counters[sg]. With SP = 2 the
// block also takes the strip `two` says (its sums 16 features after the first's; with SP = 4 the
// strips s + 1 .. s + 3 of the same weight, `strip_off`), and with GLU
// (gate and up of a feed-forward, strip s of each) writes silu(gate) * up.
template <int BITS, bool ASYM, int KIND, int NB, bool POST, int XS, int SP, bool GLU, int DS = 0, int IA = 0>
__device__ void qgemv(const uint4* codes, const u32* scales, const u32* offsets, const uint2* planes, float ts, int fold,
                      const QgSecond two, const bf16_t* x, const float* xd, int m, int k, int n, u32 gmul, int G, int CH, int cpb,
                      float* ws, u32* counters, int wstride, int s, int sg, bf16_t* out) {
    // U chunks per ring slot (per loop step) amortize the step's fixed work (wait, commit, scale
    // and activation addressing); with 16 rows, or 32 columns a lane (2- and 3-bit chunks), the
    // activations alone fill the registers, so 1 (and with four rows in the ring, whose slots
    // would not fit 48 KB at two chunks). With SP = 2 a block takes two neighbouring
    // strips instead, and a step one chunk of each: the strips share its activations, read from
    // the L2 once per two strips (at 16 rows the activations outweigh the weights: 8192² reads
    // 134 MB of them into the SMs against 35 MB of int4 weights); with SP = 4, four strips.
    constexpr int TPU = tile_span(BITS), CW = 16 * TPU, XW = TPU / 2;
    constexpr int U = SP == 1 && NB == 1 && TPU <= 4 && XS <= 2 ? 2 : 1, E = U * SP;  // E: ring entries a lane per step
    constexpr bool PLANE = BITS == 3;
    // Four strips at 9-16 rows, or of 32 columns a lane: the activations in one register set,
    // fetched at the step's start (two sets, one step ahead, spilled at 128 registers and lost on
    // every shape; with one set, at 16 rows int8 and fp8 do not spill, int4 spills 32 bytes and
    // int2 104-120, at 8 rows int2 / int3 0-16). 3-bit codes at 16 rows, which spilled 136-160
    // bytes with one set, keep two in blocks of one an SM (247-254 registers).
    constexpr bool LATE = SP == 4 && (BITS == 3 ? NB == 1 : NB == 2 || TPU == 8);
    // E2M1 codes scaled per weight: e2m1_bits (the value times 2^-126) times the scale times
    // 2^(126 - fold) in one bf16x2 multiply, and the sums times 2^fold at the end (both exact).
    // The host picks fold >= 0 so that the largest scale times 2^(126 - fold) stays below bf16's
    // 2^127; a product keeps bf16's full precision while the scale is above 2^(fold - 125).
    constexpr bool FOLD = e2m1_folded(KIND, POST, ASYM);
    static_assert(!GLU || SP == 2, "gate and up: one strip of each");
    // IA: 1 with a scale a chunk, 2 with two groups a chunk (g32; 1-2 rows, see the mma below).
    static_assert(!IA || (BITS == 4 && !ASYM && KIND == K_INT && NB == 1 && POST && (XS == 1 || XS == 2 || XS == 4) && SP <= 2 &&
                          (IA == 1 || XS <= 2)),
                  "integer activations: 1-4 rows of symmetric int4 with a scale a chunk, 1-2 with two");
    float tsp[SP], sfold[SP], omul[SP];
#pragma unroll
    for (int p = 0; p < SP; p++) {
        const int f = p ? two.fold : fold;
        tsp[p] = p ? two.ts : ts;
        sfold[p] = FOLD ? __uint_as_float((u32)(253 - f) << 23) : 1.0f;
        omul[p] = FOLD ? __uint_as_float((u32)(127 + f) << 23) : 1.0f;
    }
    // XS keeps 3 stages: 4 fill the 48 KB of static shared memory exactly (rings merged) and
    // measured slower end to end (H100, same call: 398-400 against 385-386 tok/s). 2- and 3-bit
    // chunks are twice as wide: 4 stages hold as many columns in flight as 8 of int4's. Four
    // rows in the ring (one chunk a step): 5 stages, 47 KB for int4.
    constexpr int S = DS ? DS : E == 2 ? (ASYM || XS ? 3 : 4) : TPU == 8 ? 4 : XS > 2 ? 5 : QG_STAGES;
    // XS (that many rows, 1, 2, 4 or 8, of whole chunks): the activations ride in the ring too,
    // XC 16-byte words a chunk and row copied by the warp's lanes (XS XC of them, twice over for
    // 8 rows of 4-bit chunks), so their latency hides behind S - 1 steps like the weights' (with
    // registers, one step ahead, it was the loop's most common stall); lane (g, t) reads row
    // g % XS. Rows past m only feed the mma's output columns of those rows, which are never
    // written: up to 4 rows they repeat row m - 1, and of 8 they are not copied (their words,
    // stale, are harmless there; repeating row m - 1, 5 rows of 8192 × 28672 took 65 µs against
    // 42 at 8 rows in a one-strip build of the 8-row ring, H200; likely many lanes on one address).
    constexpr int XC = CW / 8;
    // The rings, in static shared memory; with DS (the deep builds) in dynamic shared memory,
    // which may exceed static memory's 48 KB, in the order q, x, h, s, o (`qgemv_deep_smem` on the
    // host; a ring a build does not use takes no room), the static ones then one entry each.
    // QG_RING picks one at each use: a constant choice, so the static builds compile as before.
    __shared__ uint4 ring_q[DS ? 1 : S][DS ? 1 : E][DS ? 1 : QG_MAXW * 32];
    __shared__ u32 ring_s[DS ? 1 : S][DS ? 1 : E][DS ? 1 : QG_MAXW * 32];
    __shared__ u32 ring_o[ASYM && !DS ? S : 1][DS ? 1 : E][ASYM && !DS ? QG_MAXW * 32 : 1];
    __shared__ uint4 ring_x[XS && !DS ? S : 1][DS ? 1 : U][XS && !DS ? QG_MAXW * XC * XS : 1];
    __shared__ uint2 ring_h[PLANE && !DS ? S : 1][DS ? 1 : E][PLANE && !DS ? QG_MAXW * 32 : 1];
    // IA: each chunk's activation scales (one a row, warp and chunk, copied by lanes 0 .. XS - 1),
    // static in every build.
    __shared__ float ring_d[IA ? S : 1][IA ? U : 1][IA ? QG_MAXW : 1][IA ? XS : 1];
    using RingQ = uint4[E][QG_MAXW * 32];
    using RingS = u32[E][QG_MAXW * 32];
    using RingO = u32[E][ASYM ? QG_MAXW * 32 : 1];
    using RingX = uint4[U][XS ? QG_MAXW * XC * XS : 1];
    using RingH = uint2[E][PLANE ? QG_MAXW * 32 : 1];
    constexpr unsigned OX = sizeof(RingQ) * S, OH = OX + (XS ? sizeof(RingX) * S : 0),
                       OS = OH + (PLANE ? sizeof(RingH) * S : 0), OO = OS + sizeof(RingS) * S,
                       DYN_BYTES = OO + (ASYM ? sizeof(RingO) * S : 0);
    auto& dyn_q = qg_dynamic_ring<RingQ, S, 0>();
    auto& dyn_x = qg_dynamic_ring<RingX, S, OX>();
    auto& dyn_h = qg_dynamic_ring<RingH, S, OH>();
    auto& dyn_s = qg_dynamic_ring<RingS, S, OS>();
    auto& dyn_o = qg_dynamic_ring<RingO, S, OO>();
#define QG_RING(r, at) (DS ? dyn_##r at : ring_##r at)
    if (DS) {
        u32 have;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
        if (DYN_BYTES > have) __trap();  // the host's size is short
    }
    __shared__ int last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, W = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int c_lo = blockIdx.y * cpb, c_hi = min(CH, c_lo + cpb);
    const int mine = max(0, (c_hi - c_lo - warp + W - 1) / W), steps = (mine + U - 1) / U;
    const bool xvec = (k & 7) == 0;
    const uint4* qbase = codes + (size_t)s * CH * 32 + lane;
    const uint2* hq = PLANE ? planes + (size_t)s * CH * 32 + lane + (size_t)(c_lo + warp) * 32 : nullptr;
    const size_t sbase = scale_at<KIND>(s, 0, G, g);
    // The warp's j-th chunk is c_lo + warp + j W: its codes are j W 32 words after the first, its
    // lane run starts j W CW columns after the first. Everything per step is an offset from these
    // (keeping the loop's address arithmetic to a few 32-bit operations).
    const uint4* q0 = qbase + (size_t)(c_lo + warp) * 32;
    const u32 qstride = (u32)W * 32, col_first = (u32)(c_lo + warp) * CW + 4 * TPU * t, col_stride = (u32)W * CW;
    const u32* s0 = scales + sbase;
    // Byte scales: which half of its word the lane's group takes. The same for all its chunks:
    // their codes are 4-bit (64-column chunks), so a lane's runs lie 64 W columns apart, an even
    // number of 16- or 32-column groups.
    const int gpar = byte_scales(KIND) ? (int)min(__umulhi(col_first, gmul), (u32)G - 1) & 1 : 0;
    static_assert(SP == 1 || SP == 2 || SP == 4, "one, two or four strips a block");
    const u32* o0 = ASYM ? offsets + sbase : scales;
    const u32 rq = smem_u32(&QG_RING(q, [0][0][tid])), rs = smem_u32(&QG_RING(s, [0][0][tid])),
              ro = smem_u32(&QG_RING(o, [0][0][ASYM ? tid : 0])),
              rx = smem_u32(&QG_RING(x, [0][0][XS ? warp * XC * XS + lane % (XC * XS) : 0])),
              rh = smem_u32(&QG_RING(h, [0][0][PLANE ? tid : 0]));
    constexpr u32 HSLOT = E * QG_MAXW * 32 * 8, HU = QG_MAXW * 32 * 8;
    constexpr u32 XSLOT = U * QG_MAXW * XC * XS * 16, XU = QG_MAXW * XC * XS * 16;
    constexpr u32 QSLOT = E * QG_MAXW * 32 * 16, QU = QG_MAXW * 32 * 16, SSLOT = E * QG_MAXW * 32 * 4,
                  SU = QG_MAXW * 32 * 4;
    const bf16_t* xrow[NB];
    bool rowok[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) {
        rowok[b] = b * 8 + g < m;
        xrow[b] = x + (size_t)(rowok[b] ? b * 8 + g : 0) * k;
    }

    // Chunks are issued to the ring, and their activations fetched, in order: each keeps a
    // running address (a 64-bit add per chunk instead of recomputing it from the chunk index).
    const uint4* qi = q0;
    const u64 wpol = streaming_policy();
    // IA == 2: lane (g, t)'s scales are those of the chunk's group t % 2 (its sums' group, see
    // the mma below), not its own run's.
    u32 ci = IA == 2 ? (u32)(c_lo + warp) * CW + CW / 2 * (t & 1) : col_first;
    int ji = 0;
    // A chunk's XL words of activations, XR a lane.
    constexpr int XL = XS ? XC * XS : 1, XR = (XL + 31) / 32;
    const bf16_t* xi[XR];
    bool xcopy[XR];
#pragma unroll
    for (int r = 0; r < XR; r++) {
        const int c = lane + 32 * r, row = XS > 1 ? c / XC % XS : 0;
        xcopy[r] = c < XL && (XS <= 4 || row < m);
        xi[r] = x + (size_t)(XS > 1 ? min(row, m - 1) : 0) * k + (size_t)(c_lo + warp) * CW + 8 * (c % XC);
    }
    // A chunk's activations (XS; not before griddep_wait, see the prologue).
    const bool dcopy = IA && lane < XS;
    const float* xdi = IA ? xd + (size_t)min(lane, m - 1) * CH + c_lo + warp : nullptr;
    // IA == 2: B column g sums group (g / 2) % 2 of the chunk, which is runs 2 ((g / 2) % 2) and
    // the next: the other runs' activations are masked to zero (IA == 1: every run).
    const u32 xkeep = IA != 2 || (t >> 1) == ((g >> 1) & 1) ? ~0u : 0u;
    const u32 rd = smem_u32(&ring_d[0][0][IA ? warp : 0][IA ? lane % (XS ? XS : 1) : 0]);
    auto issue_x = [&](int slot, int u) {
#pragma unroll
        for (int r = 0; r < XR; r++) {
            if (xcopy[r]) cp_async16_at(rx + 512 * r + slot * XSLOT + u * XU, xi[r]);
            xi[r] += col_stride;
        }
        if (IA) {
            if (dcopy) cp_async4_at(rd + 4 * (slot * U + u) * QG_MAXW * XS, xdi);
            xdi += W;
        }
    };
    // Chunk u of a step: its codes (and planes), activations (XS, with_x), scales and offsets
    // in each of the SP strips.
    auto issue_chunk = [&](int slot, int u, bool with_x) {
#pragma unroll
        for (int p = 0; p < SP; p++) {
            const u32 e = u * SP + p;
            cp_async16_stream(rq + slot * QSLOT + e * QU, qi + strip_off<SP>(p, two.q, s, n), wpol);
            if (PLANE) cp_async8_stream(rh + slot * HSLOT + e * HU, hq + strip_off<SP>(p, two.h, s, n), wpol);
        }
        if (XS && with_x) issue_x(slot, u);
        // The run's group: col / group by a multiply-high (gmul = ceil(2^32 / group)).
        const u32 grp = min(__umulhi(ci, gmul), (u32)G - 1), sw = byte_scales(KIND) ? grp >> 1 : grp;
#pragma unroll
        for (int p = 0; p < SP; p++) {
            const u32 e = u * SP + p;
            cp_async4_stream(rs + slot * SSLOT + e * SU, at8(s0 + (SP <= 2 ? (p ? two.s : 0) : strip_off<SP>(p, two.s, s, n)), sw), wpol);
            if (ASYM) cp_async4_stream(ro + slot * SSLOT + e * SU, at8(o0 + (SP <= 2 ? (p ? two.o : 0) : strip_off<SP>(p, two.o, s, n)), sw), wpol);
        }
        if (PLANE) hq += qstride;
        qi += qstride;
        ci += col_stride;
    };
    auto issue = [&](int slot, bool with_x) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (ji < mine) {
                issue_chunk(slot, u, with_x);
                ji++;
            }
        }
        cp_async_commit();
    };
    // The same for a step whose chunks are all the warp's (ji + U <= mine): no check per chunk.
    auto issue_fast = [&](int slot) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            issue_chunk(slot, u, true);
        }
        ji += U;
        cp_async_commit();
    };
    const bf16_t* xp[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) xp[b] = xrow[b] + col_first;
    int cx = col_first, jx = 0;
    // Checked: rows past m, chunks past the warp's share and columns past k read as zeros.
    auto fetch_x = [&](uint4 (&v)[U][NB][XW]) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const bool ok = jx < mine;
#pragma unroll
            for (int b = 0; b < NB; b++) {
                load_x<XW>(xp[b], rowok[b] && ok, k - cx, xvec, v[u][b]);
                xp[b] += col_stride;
            }
            cx += col_stride;
            jx++;
        }
    };
    // Unchecked, for chunks known to lie inside k (16-byte loads only; rows past m read row 0,
    // which only feeds the mma's output columns of those rows, never written). Leaves cx and jx
    // behind: the loop moves them on once, after the unchecked steps.
    auto fetch_x_fast = [&](uint4 (&v)[U][NB][XW]) {
#pragma unroll
        for (int u = 0; u < U; u++) {
#pragma unroll
            for (int b = 0; b < NB; b++) {
#pragma unroll
                for (int w = 0; w < XW; w++) v[u][b][w] = *(const uint4*)(xp[b] + 8 * w);
                xp[b] += col_stride;
            }
        }
    };
    // The warp's chunks whose columns all lie inside k (all of them but a partial last chunk of
    // the row; none when rows are not 16-byte aligned): c_lo + warp + j W < k / CW.
    int nfull = 0;
    if (xvec) {
        const int e = min(c_hi, k / CW) - c_lo - warp;
        nfull = e > 0 ? min(mine, (e + W - 1) / W) : 0;
    }

    float acc[SP][NB][4];
#pragma unroll
    for (int p = 0; p < SP; p++)
#pragma unroll
        for (int b = 0; b < NB; b++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[p][b][j] = 0.0f;

#pragma unroll
    for (int i = 0; i < S - 1; i++) issue(i, false);
    int slot = 0, next = S - 1;
    // Step i: its chunks from the ring, the next step's issued and its activations fetched into
    // the other of two register sets (the loop runs two steps per pass, so no copies).
    // FAST (steps whose chunks and whose next step's chunks are all whole, see nfull): no bounds
    // checks on the activations and no check for chunks past the warp's share.
    auto step = [&](const bool FAST, int i, const uint4 (&xc)[U][NB][XW], uint4 (&xn)[U][NB][XW]) {
        cp_async_wait<S - 2>();
        uint4 q[E];
        uint2 hp[E];
        u32 sp[E], op[E];
#pragma unroll
        for (int e = 0; e < E; e++) {
            q[e] = QG_RING(q, [slot][e][tid]);
            hp[e] = PLANE ? QG_RING(h, [PLANE ? slot : 0][e][PLANE ? tid : 0]) : make_uint2(0, 0);
            sp[e] = QG_RING(s, [slot][e][tid]);
            op[e] = ASYM ? QG_RING(o, [ASYM ? slot : 0][e][ASYM ? tid : 0]) : 0u;
        }
        // LATE: this step's activations fetched now, into the one register set (xc is xn).
        if (LATE && FAST) {
            fetch_x_fast(xn);
        } else if (LATE) {
            fetch_x(xn);
        }
        uint4 xl[U][NB][XW];
        float dl[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            // IA: lane (g, t) holds column g of the mma's B, row g / 2's high codes of run t (even
            // g) or its low ones (odd g), so lane (g, t)'s columns 2t and 2t + 1 of the result
            // are row t's two sums (rows past XS repeat, and are never written). IA == 2: row
            // g / 4's, and column g takes only group (g / 2) % 2's runs (xkeep), so lane t's
            // columns are row t / 2's sums over group t % 2.
            if (IA) {
                const int xr = (IA == 2 ? g >> 2 : g >> 1) % (XS ? XS : 1), dr = (IA == 2 ? t >> 1 : t) % (XS ? XS : 1);
                xl[u][0][0] = QG_RING(x, [XS ? slot : 0][u][warp * XC * XS + xr * XC + 2 * t + (g & 1)]);
                dl[u] = ring_d[IA ? slot : 0][IA ? u : 0][IA ? warp : 0][IA ? dr : 0];
            } else {
#pragma unroll
                for (int b = 0; b < NB; b++)
#pragma unroll
                    for (int w = 0; w < XW; w++)
                        xl[u][b][w] = XS ? QG_RING(x, [XS ? slot : 0][u][warp * XC * XS + g % (XS ? XS : 1) * XC + t * XW + w]) : xc[u][b][w];
            }
        }
        // Step i issues step i + S - 1's chunks.
        if (FAST && i + S <= mine / U)
            issue_fast(next);
        else
            issue(next, true);
        slot = slot == S - 1 ? 0 : slot + 1;
        next = next == S - 1 ? 0 : next + 1;
        if (XS || LATE) {
        } else if (FAST) {
            fetch_x_fast(xn);
        } else if (i + 1 < steps) {
            fetch_x(xn);
        }
#pragma unroll
        for (int e = 0; e < E; e++) {
            const int u = e / SP, p = e % SP;
            if (!FAST && i * U + u >= mine) break;  // past the warp's share: the slot was not filled
            const QScale sc = qscale<BITS, ASYM && !POST, KIND>(sp[e], op[e], tsp[p], gpar, sfold[p]);
            const u32 words[4] = {q[e].x, q[e].y, q[e].z, q[e].w}, plane[2] = {hp[e].x, hp[e].y};
            if (IA) {
                // Codes times 16 as int8 (16 (c - 8): the code's nibble, sign flipped, in the
                // byte's top half; feature g's from the low nibbles, g + 8's from the high), two
                // integer mmas of 32 columns, then the chunk's scales (see quantize_x_codes).
                int c[4];
                const u32* xl32 = (const u32*)xl[u][0];
                const u32 xw[4] = {xl32[0] & xkeep, xl32[1] & xkeep, xl32[2] & xkeep, xl32[3] & xkeep};
                const u32 a0[4] = {int4_times16<true>(words[0]), int4_times16<false>(words[0]),
                                   int4_times16<true>(words[1]), int4_times16<false>(words[1])};
                const u32 a1[4] = {int4_times16<true>(words[2]), int4_times16<false>(words[2]),
                                   int4_times16<true>(words[3]), int4_times16<false>(words[3])};
                mma_s8<false>(c, a0, xw[0], xw[1]);
                mma_s8<true>(c, a1, xw[2], xw[3]);
                const float dx = dl[u];
                acc[p][0][0] = fmaf((float)(c[0] * 128 + c[1]), sc.slo * dx, acc[p][0][0]);
                acc[p][0][2] = fmaf((float)(c[2] * 128 + c[3]), sc.shi * dx, acc[p][0][2]);
                continue;
            }
            if (POST) {
                // One group over the whole chunk: integer products summed over its tiles, then
                // scaled once (and the offset times the activations' sum, from an all-ones mma).
                float d[NB][4], o[NB][4];
#pragma unroll
                for (int b = 0; b < NB; b++)
#pragma unroll
                    for (int j = 0; j < 4; j++) d[b][j] = o[b][j] = 0.0f;
                const u32 ones[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};
#pragma unroll
                for (int ti = 0; ti < TPU; ti++) {
                    u32 a[4];
                    dequant_frag<BITS, ASYM, KIND, true>(words, plane, ti, sc, a);
#pragma unroll
                    for (int b = 0; b < NB; b++) {
                        const u32* xw = (const u32*)xl[u][b];
                        mma_bf16(d[b], a, xw[2 * ti], xw[2 * ti + 1]);
                        if (ASYM) mma_bf16(o[b], ones, xw[2 * ti], xw[2 * ti + 1]);
                    }
                }
                float olo = 0.0f, ohi = 0.0f;
                if (ASYM) {
                    olo = h2f((f16_t)(op[e] & 0xffff));
                    ohi = h2f((f16_t)(op[e] >> 16));
                }
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    acc[p][b][0] += ASYM ? fmaf(sc.slo, d[b][0], olo * o[b][0]) : sc.slo * d[b][0];
                    acc[p][b][1] += ASYM ? fmaf(sc.slo, d[b][1], olo * o[b][1]) : sc.slo * d[b][1];
                    acc[p][b][2] += ASYM ? fmaf(sc.shi, d[b][2], ohi * o[b][2]) : sc.shi * d[b][2];
                    acc[p][b][3] += ASYM ? fmaf(sc.shi, d[b][3], ohi * o[b][3]) : sc.shi * d[b][3];
                }
                continue;
            }
#pragma unroll
            for (int ti = 0; ti < TPU; ti++) {
                u32 a[4];
                dequant_frag<BITS, ASYM, KIND, false>(words, plane, ti, sc, a);
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    const u32* xw = (const u32*)xl[u][b];
                    mma_bf16(acc[p][b], a, xw[2 * ti], xw[2 * ti + 1]);
                }
            }
        }
    };
    uint4 xa[U][NB][XW], xb[U][NB][XW];
    // LATE: one register set for the activations, each step fetching its own (xb unused).
    auto& xsecond = LATE ? xa : xb;
    // Launched as a programmatic dependent: the weights above are in flight while the kernel
    // that writes x may still run; x (and the split-K workspace) only after it finished.
    griddep_wait();
    if (XS) {
        // The prologue's activations, one commit group per step after the weights' groups:
        // step i still waits for all but the S - 2 newest groups.
        for (int i = 0, j = 0; i < S - 1; i++) {
#pragma unroll
            for (int u = 0; u < U; u++, j++)
                if (j < mine) issue_x(i, u);
            cp_async_commit();
        }
    } else if (steps > 0 && !LATE) {
        fetch_x(xa);
    }
    // Step i is unchecked when steps i and i + 1 are whole: (i + 2) U <= nfull; an even count of
    // them (the two register sets alternate), then the checked steps.
    const int fast = max(0, nfull / U - 1) & ~1;
    int i = 0;
    for (; i < fast; i += 2) {
        step(true, i, xa, xsecond);
        step(true, i + 1, xsecond, xa);
    }
    jx += fast * U;
    cx += fast * U * (int)col_stride;
    for (; i < steps; i += 2) {
        step(false, i, xa, xsecond);
        if (i + 1 < steps) step(false, i + 1, xsecond, xa);
    }
    cp_async_wait<0>();
    __syncthreads();
    // The rings are free now: reuse them for the cross-warp reduction.
    float* red = DS ? (float*)&dyn_q : (float*)ring_q;
#undef QG_RING
    constexpr int OUTS = SP * NB * 128;
#pragma unroll
    for (int p = 0; p < SP; p++)
#pragma unroll
        for (int b = 0; b < NB; b++)
#pragma unroll
            for (int j = 0; j < 4; j++) red[warp * OUTS + ((p * NB + b) * 4 + j) * 32 + lane] = acc[p][b][j];
    __syncthreads();
    // Element e < OUTS is (p, b, j, lane) of the mma's D fragment of strip s + p summed over the
    // warps: feature (s + p) 16 + g + 8 (j >> 1), row b * 8 + 2 t + (j & 1). GLU: both strips'
    // elements are feature s 16 + g + 8 (j >> 1) of the output (gate's and up's).
    // place: the output element (at) and its split-K sum (wat), and whether it is written.
    auto place = [&](int e, size_t& at, size_t& wat) {
        const int p = SP == 1 ? 0 : e / (NB * 128), b = (e >> 7) % NB, j = (e >> 5) & 3, ln = e & 31;
        const int f = 16 * p + (ln >> 2) + 8 * (j >> 1), feat = s * 16 + (GLU ? f - 16 * p : f);
        // IA: a lane's sums are row t's (j = 0, 2); j = 1, 3 are never written. IA == 2: row
        // t / 2's, from even t, to which total() adds lane t + 1's (the chunk's other group).
        const int row = IA == 2 ? (((j & 1) || (ln & 1)) ? 16 : (ln & 3) >> 1)
                        : IA   ? ((j & 1) ? 16 : ln & 3)
                               : b * 8 + 2 * (ln & 3) + (j & 1);
        at = (size_t)row * n + feat;
        wat = (size_t)row * wstride + sg * 16 + f;
        return feat < n && row < m;
    };
    auto total = [&](int e) {
        float v = 0.0f;
        for (int w = 0; w < W; w++) v += red[w * OUTS + e] + (IA == 2 && !(e & 1) ? red[w * OUTS + e + 1] : 0.0f);
        return v * (SP == 2 && e >= NB * 128 ? omul[SP - 1] : omul[0]);
    };
    // GLU: the elements of the first strip, each with its second strip's (GLU_AT later), both
    // rounded to bf16 as the separate projections would be, then silu_mul's arithmetic.
    constexpr int GLU_AT = NB * 128;
    auto glu = [](float g, float u) { return silu_times(bf2f(f2bf(g)), bf2f(f2bf(u))); };
    // Element e's sum v written out; with GLU into red[e] (column e of red is read by e's thread
    // alone), then the pairs written by glu_out.
    auto finish = [&](int e, float v) {
        size_t at, wat;
        if (GLU)
            red[e] = v;
        else if (place(e, at, wat))
            out[at] = f2bf(v);
    };
    auto glu_out = [&]() {
        __syncthreads();
        for (int e = tid; e < GLU_AT; e += blockDim.x) {
            size_t at, wat;
            if (place(e, at, wat)) out[at] = f2bf(glu(red[e], red[e + GLU_AT]));
        }
    };
    if (gridDim.y == 1) {
        for (int e = tid; e < OUTS; e += blockDim.x) finish(e, total(e));
        if (GLU) glu_out();
        return;
    }
    for (int e = tid; e < OUTS; e += blockDim.x) {
        size_t at, wat;
        if (place(e, at, wat)) atomicAdd(&ws[wat], total(e));
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(&counters[sg], 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int e = tid; e < OUTS; e += blockDim.x) {
        size_t at, wat;
        place(e, at, wat);
        finish(e, atomicExch(&ws[wat], 0.0f));
    }
    if (GLU) glu_out();
    if (tid == 0) counters[sg] = 0;
}

// One launch multiplies x by up to QG_PARTS weights of the same format and k (q, k and v; gate
// and up): weight i's strips are the launch's strips p[i].strip0 .. p[i + 1].strip0. Fewer
// launches, and the small k and v projections no longer run as grids too small for the GPU.
#define QG_PARTS 3
struct QgPart {
    const uint4* codes;
    const u32* scales;
    const u32* offsets;
    const uint2* planes;
    bf16_t* out;
    u32 gmul;
    float ts;
    int n, G, strip0;
    int fold;  // E2M1 codes scaled per weight: the scales' shift (see qgemv)
};
struct QgArgs {
    QgPart p[QG_PARTS];
    const bf16_t* x;
    const float* xd;  // integer activations (IA): x holds their codes, xd their chunks' scales
    float* ws;
    u32* counters;
    // 16-row blocks: above 16 rows (batched decode) each strip runs once per block of rows.
    int parts, m, k, CH, cpb, wstride, row_blocks;
};

// Suffix p: the scale applied after the mma, for groups that cover whole chunks.
#define QG_SEL(f) (pi == 0 ? a.p[0].f : pi == 1 ? a.p[1].f : a.p[2].f)
#define QGEMV1(name, BITS, ASYM, KIND, NB, POST, XS, SP, BOUNDS, DS) QGEMV1X(name, BITS, ASYM, KIND, NB, POST, XS, SP, BOUNDS, DS, 0)
#define QGEMV1X(name, BITS, ASYM, KIND, NB, POST, XS, SP, BOUNDS, DS, IA)                                         \
    extern "C" __global__ void __launch_bounds__ BOUNDS name(const QgArgs a) {                                  \
        griddep_launch(); /* the kernel after may start now: it waits for this one (pdl_enter) */               \
        /* A block's row blocks are neighbours: they run together and share its weights in the L2. */          \
        const int bs = blockIdx.x / a.row_blocks, rb = blockIdx.x - bs * a.row_blocks, sg = bs * SP;            \
        const int pi = (a.parts > 1 && sg >= a.p[1].strip0) + (a.parts > 2 && sg >= a.p[2].strip0);            \
        const QgSecond two = next_strip<KIND>(sg - QG_SEL(strip0), QG_SEL(n), a.CH, QG_SEL(G), QG_SEL(ts), QG_SEL(fold)); \
        qgemv<BITS, ASYM, KIND, NB, POST, XS, SP, false, DS, IA>(QG_SEL(codes), QG_SEL(scales), QG_SEL(offsets), QG_SEL(planes), \
                                              QG_SEL(ts), QG_SEL(fold), two, a.x + (size_t)rb * 16 * a.k, a.xd, min(16, a.m - rb * 16), a.k, \
                                              QG_SEL(n), QG_SEL(gmul), QG_SEL(G), a.CH, a.cpb, a.ws, a.counters,   \
                                              a.wstride, sg - QG_SEL(strip0), sg,                               \
                                              QG_SEL(out) + (size_t)rb * 16 * QG_SEL(n));                       \
    }
// Gate and up of a feed-forward (parts 0 and 1, of one shape) into silu(gate) * up (part 0's out):
// block s takes strip s of each, so no silu_mul launch and no gate and up outputs.
#define QGLU1(name, BITS, ASYM, KIND, NB, POST, XS, BOUNDS) QGLU1X(name, BITS, ASYM, KIND, NB, POST, XS, BOUNDS, 0)
#define QGLU1X(name, BITS, ASYM, KIND, NB, POST, XS, BOUNDS, IA)                                                  \
    extern "C" __global__ void __launch_bounds__ BOUNDS name(const QgArgs a) {                                  \
        griddep_launch();                                                                                      \
        const int s = blockIdx.x / a.row_blocks, rb = blockIdx.x - s * a.row_blocks;                           \
        const QgPart &g = a.p[0], &u = a.p[1];                                                                  \
        const QgSecond two{u.codes - g.codes, u.planes - g.planes, u.scales - g.scales, u.offsets - g.offsets,   \
                           u.ts, u.fold};                                                                       \
        qgemv<BITS, ASYM, KIND, NB, POST, XS, 2, true, 0, IA>(g.codes, g.scales, g.offsets, g.planes, g.ts, g.fold, two, \
                                                  a.x + (size_t)rb * 16 * a.k, a.xd, min(16, a.m - rb * 16), a.k, g.n, \
                                                  g.gmul, g.G, a.CH, a.cpb, a.ws, a.counters, a.wstride, s, 2 * s, \
                                                  g.out + (size_t)rb * 16 * g.n);                                \
    }
// One format: its kernels for 1 row of whole chunks, up to 8 and up to 16 rows, scaled per
// weight and (suffix p) after the mma; its prefill expansion and its embedding gather. The
// one-row kernel also comes bounded to 64 registers (suffix w), so that 4 blocks of 8 warps fit an
// SM rather than 3: the host takes it for launches of more strips than a wave of 3-block slots
// (symmetric formats; the asymmetric ones spill there). H100, int4 g32 at m=1, a 64-register
// build held to 3 blocks by padding its shared memory against 4: 8192² 18.8 against 14.7 µs,
// 28672×8192 50.5 / 47.7, 14336×4096 16.0 / 14.2, but 4096² 6.1 / 6.9 and 4096×14336
// 17.1 / 17.7 (256 strips: 4 blocks an SM leave more SMs idle); llama3-8b decode, 4 blocks for
// every launch, lost 2% against the 3-block build.
#define QFORMAT(tag, BITS, ASYM, KIND)                                         \
    QGEMV1(qgemv_##tag##_1, BITS, ASYM, KIND, 1, false, true, 1, (QG_MAXW * 32), 0)   \
    QGEMV1(qgemv_##tag##_8, BITS, ASYM, KIND, 1, false, false, 1, (QG_MAXW * 32), 0)  \
    QGEMV1(qgemv_##tag##_16, BITS, ASYM, KIND, 2, false, false, 1, (QG_MAXW * 32), 0) \
    QGEMV1(qgemv_##tag##_1p, BITS, ASYM, KIND, 1, true, true, 1, (QG_MAXW * 32), 0)   \
    QGEMV1(qgemv_##tag##_8p, BITS, ASYM, KIND, 1, true, false, 1, (QG_MAXW * 32), 0)  \
    QGEMV1(qgemv_##tag##_16p, BITS, ASYM, KIND, 2, true, false, 1, (QG_MAXW * 32), 0) \
    QGLU1(qglu_##tag##_1, BITS, ASYM, KIND, 1, false, true, (QG_MAXW * 32))        \
    QGLU1(qglu_##tag##_1p, BITS, ASYM, KIND, 1, true, true, (QG_MAXW * 32))        \
    DEQUANT(dequant_##tag, BITS, ASYM, KIND)                                \
    QEMBED(embedding_##tag, BITS, ASYM, KIND)
// 2-4 rows of whole chunks (suffix 2, or 4 for 3-4 rows), their activations in the ring as the
// one-row kernel's (XS = R): where the strips are many, the one-step-ahead register loads of the
// 8-row kernel left the L2's latency in every step (H100, int4 g128 8192² at 2-4 rows: 84-89% of
// copy against 72% for the four-strip blocks). With four rows a step takes one chunk (U) and the
// ring 5 stages, to fit 48 KB. Symmetric 4-bit codes (4 rows: those with f16 scales, int4 and
// fp4); the bounded builds (w) at 4 blocks an SM, as the one-row kernel's.
#define QROWS(tag, BITS, ASYM, KIND, R)                                                   \
    QGEMV1(qgemv_##tag##_##R, BITS, ASYM, KIND, 1, false, R, 1, (QG_MAXW * 32), 0)       \
    QGEMV1(qgemv_##tag##_##R##p, BITS, ASYM, KIND, 1, true, R, 1, (QG_MAXW * 32), 0)     \
    QGEMV1(qgemv_##tag##_##R##w, BITS, ASYM, KIND, 1, false, R, 1, (QG_MAXW * 32, 4), 0) \
    QGEMV1(qgemv_##tag##_##R##pw, BITS, ASYM, KIND, 1, true, R, 1, (QG_MAXW * 32, 4), 0)
// Two strips a block with their R rows (1, 2, 4 or 8) in the ring (suffix r), in dynamic shared
// memory, STAGES deep: the strips share a step's activations, which the SMs then read from the
// L2 once per 32 features, and at 5-8 rows the L2's latency leaves the loop as it did at 2-4 rows
// (8 rows of int4: 64 KB a ring, 3 blocks an SM). The host takes them where the pair blocks are
// many (H200, int4 g128 at one row: 57344 × 8192 80 → 88% of copy; at 2-4 rows 128256 × 8192
// 74-80 → 88%; at 5-8 rows 10240 × 8192 48 → 59-63%).
#define QRINGS(tag, BITS, ASYM, KIND, R, STAGES)                                                      \
    QGEMV1(qgemv_##tag##_##R##r, BITS, ASYM, KIND, 1, false, R, 2, (QG_MAXW * 32, 3), STAGES)      \
    QGEMV1(qgemv_##tag##_##R##pr, BITS, ASYM, KIND, 1, true, R, 2, (QG_MAXW * 32, 3), STAGES)
// The host appends these lines where a format uses them. The bounded builds (suffix w), for the
// formats whose kernels fit them without spilling: one row at 4 blocks an SM (symmetric
// formats), 8 rows at 3 and 16 rows of one strip a block at 3 (symmetric formats of 4 bits and
// more; `_16pw` spills 8 bytes for mxfp4 and nvfp4, whose groups never cover a chunk, so the
// host never takes it there).
#define QWIDE1(tag, BITS, ASYM, KIND)                                                 \
    QGEMV1(qgemv_##tag##_1w, BITS, ASYM, KIND, 1, false, true, 1, (QG_MAXW * 32, 4), 0)  \
    QGEMV1(qgemv_##tag##_1pw, BITS, ASYM, KIND, 1, true, true, 1, (QG_MAXW * 32, 4), 0)
// The gated kernel at 4 blocks an SM, one row and (`_8w`, scaled per weight) 2-8 rows, for the
// formats whose build fits it without spilling (symmetric, 4 bits and more, but fp4's `_8w`,
// which spills 8 bytes; 2- and 3-bit chunks of two strips spilled 32-52 bytes, the `_8pw` of
// int4 16).
#define QGLUW(tag, BITS, ASYM, KIND)                                              \
    QGLU1(qglu_##tag##_1w, BITS, ASYM, KIND, 1, false, true, (QG_MAXW * 32, 4))  \
    QGLU1(qglu_##tag##_1pw, BITS, ASYM, KIND, 1, true, true, (QG_MAXW * 32, 4))  \
    QGLU1(qglu_##tag##_8w, BITS, ASYM, KIND, 1, false, false, (QG_MAXW * 32, 4))
#define QWIDE8(tag, BITS, ASYM, KIND)                                                 \
    QGEMV1(qgemv_##tag##_8w, BITS, ASYM, KIND, 1, false, false, 1, (QG_MAXW * 32, 3), 0) \
    QGEMV1(qgemv_##tag##_8pw, BITS, ASYM, KIND, 1, true, false, 1, (QG_MAXW * 32, 3), 0) \
    QGEMV1(qgemv_##tag##_16w, BITS, ASYM, KIND, 2, false, false, 1, (QG_MAXW * 32, 3), 0) \
    QGEMV1(qgemv_##tag##_16pw, BITS, ASYM, KIND, 2, true, false, 1, (QG_MAXW * 32, 3), 0)
// The one-row kernel with a deeper ring (STAGES, the host's choice) in dynamic shared memory
// (suffix d), for launches of at most two blocks an SM: there the static ring's 3 stages leave
// about 32 KB of loads in flight an SM, short of what covers HBM's latency, and shared memory is
// to spare. The prologue issues all but one stage before the programmatic wait.
#define QDEEP1(tag, BITS, ASYM, KIND, STAGES)                                                  \
    QGEMV1(qgemv_##tag##_1d, BITS, ASYM, KIND, 1, false, true, 1, (QG_MAXW * 32), STAGES)    \
    QGEMV1(qgemv_##tag##_1pd, BITS, ASYM, KIND, 1, true, true, 1, (QG_MAXW * 32), STAGES)
// Two strips a block (suffix s) for 16 rows, and for blocks of 16 rows above, of 4- and 8-bit
// codes (the 2- and 3-bit ones took 166-194 registers); the host takes them where the blocks
// still fill the SMs (at 128 blocks, n = 4096, split-K made them 1.4x slower at 16 rows).
// The gated kernel (two strips a block) for 2-16 rows and blocks of 16 rows above, likewise.
#define QPAIR16(tag, BITS, ASYM, KIND)                                                \
    QGEMV1(qgemv_##tag##_16s, BITS, ASYM, KIND, 2, false, false, 2, (QG_MAXW * 32), 0)   \
    QGEMV1(qgemv_##tag##_16ps, BITS, ASYM, KIND, 2, true, false, 2, (QG_MAXW * 32), 0)   \
    QGLU1(qglu_##tag##_8, BITS, ASYM, KIND, 1, false, false, (QG_MAXW * 32))          \
    QGLU1(qglu_##tag##_8p, BITS, ASYM, KIND, 1, true, false, (QG_MAXW * 32))          \
    QGLU1(qglu_##tag##_16, BITS, ASYM, KIND, 2, false, false, (QG_MAXW * 32))         \
    QGLU1(qglu_##tag##_16p, BITS, ASYM, KIND, 2, true, false, (QG_MAXW * 32))

// Four strips a block (suffix q) for 2-16 rows of symmetric codes: a warp's step
// multiplies one chunk of each strip by the same activations, which are then read from the L2
// once per 64 features instead of once per 16 (at 8 rows that traffic is twice the weights'), and
// a block's warps stream four times the chunks (fewer, longer blocks where k is short). The ring
// (STAGES deep, four entries a step, 80 KB for int4) is in dynamic shared memory; bounded to 128
// registers, two blocks an SM (3-bit codes at 16 rows: one, unbounded). At 9-16 rows (`_16q`),
// and for 2- and 3-bit codes (32 columns a lane) at 2-8 rows too, the activations take one
// register set, fetched at each step's start (LATE above): two sets spilled.
#define QQUAD(tag, BITS, ASYM, KIND, STAGES)                                                                   \
    QGEMV1(qgemv_##tag##_8q, BITS, ASYM, KIND, 1, false, false, 4, (QG_MAXW * 32, 2), STAGES)                  \
    QGEMV1(qgemv_##tag##_8pq, BITS, ASYM, KIND, 1, true, false, 4, (QG_MAXW * 32, 2), STAGES)                  \
    QGEMV1(qgemv_##tag##_16q, BITS, ASYM, KIND, 2, false, false, 4, (QG_MAXW * 32, BITS == 3 ? 1 : 2), STAGES) \
    QGEMV1(qgemv_##tag##_16pq, BITS, ASYM, KIND, 2, true, false, 4, (QG_MAXW * 32, BITS == 3 ? 1 : 2), STAGES)

// 1, 2 or 4 rows (suffix 1i, 2i, 4i) of symmetric int4 in groups of whole chunks, and 1 or 2
// rows (1h, 2h) in groups of half a chunk (g32), on integer codes of the activations (the
// host's `quantize_x_codes` launch first): the weights' codes as int8 against two int8 codes of
// each activation on integer mmas, where the bf16 kernels spend ~44 of a chunk's ~100
// instructions turning codes into bf16 (SASS of the unchecked loop, int4 g128, NVRTC 13.0: 72.5
// instructions a chunk against 102.5 for `_1pw`). One mma column a row's high codes, the next
// its low ones, so four rows cost what one does (two with two groups a chunk). Static ring (3
// blocks an SM), bounded (w, 4 an SM), two strips a block with the rows in a dynamic ring (r,
// as QRINGS), and gate and up (qglu) at one row.
#define QIACT(PSTAGES)                                                                                     \
    QIACT_GROUPS(i, 1, PSTAGES)                                                                            \
    QGEMV1X(qgemv_int4_4i, 4, false, K_INT, 1, true, 4, 1, (QG_MAXW * 32), 0, 1)                          \
    QGEMV1X(qgemv_int4_4iw, 4, false, K_INT, 1, true, 4, 1, (QG_MAXW * 32, 4), 0, 1)                      \
    QGEMV1X(qgemv_int4_4ir, 4, false, K_INT, 1, true, 4, 2, (QG_MAXW * 32, 3), PSTAGES, 1)                \
    QIACT_GROUPS(h, 2, PSTAGES)                                                                            \
    QUANTIZE_X_CODES

// The 1- and 2-row builds of QIACT, with a scale a chunk (IA 1, suffix i) or two (IA 2, h).
#define QIACT_GROUPS(G, IA, PSTAGES)                                                                       \
    QGEMV1X(qgemv_int4_1##G, 4, false, K_INT, 1, true, 1, 1, (QG_MAXW * 32), 0, IA)                        \
    QGEMV1X(qgemv_int4_1##G##w, 4, false, K_INT, 1, true, 1, 1, (QG_MAXW * 32, 4), 0, IA)                  \
    QGEMV1X(qgemv_int4_2##G, 4, false, K_INT, 1, true, 2, 1, (QG_MAXW * 32), 0, IA)                        \
    QGEMV1X(qgemv_int4_2##G##w, 4, false, K_INT, 1, true, 2, 1, (QG_MAXW * 32, 4), 0, IA)                  \
    QGEMV1X(qgemv_int4_1##G##r, 4, false, K_INT, 1, true, 1, 2, (QG_MAXW * 32, 3), PSTAGES, IA)            \
    QGEMV1X(qgemv_int4_2##G##r, 4, false, K_INT, 1, true, 2, 2, (QG_MAXW * 32, 3), PSTAGES, IA)            \
    QGLU1X(qglu_int4_1##G, 4, false, K_INT, 1, true, 1, (QG_MAXW * 32), IA)                                \
    QGLU1X(qglu_int4_1##G##w, 4, false, K_INT, 1, true, 1, (QG_MAXW * 32, 4), IA)

// Rows of activations as integer codes for the `i` and `h` kernels: each chunk of 64 columns as
// x ≈ d (h + l / 128), d = max |x| / 127, h = round(x / d) and l = round(128 (x / d - h)) (so
// |x - d (h + l / 128)| <= d / 256: about 15 bits below the chunk's largest value, finer than
// bf16's 8 for all but values 128 times smaller). The codes go where the mma's B fragments want
// them: a chunk's 128 bytes are, for each lane run t of 16 columns, its 16 high codes then its 16
// low ones, byte 4 i + b of each the column 4 i + (0, 2, 1, 3)[b] of the run (the order of the
// weight's nibbles, see the layout). d / 2048 per chunk in `d` (the codes come times 16 and the
// high sums times 128). One warp a chunk, grid (chunks / 8, rows); k a multiple of 64.
#define QUANTIZE_X_CODES                                                                            \
    extern "C" __global__ void quantize_x_codes(const bf16_t* x, int chunks, unsigned char* codes, float* d) { \
        pdl_enter();                                                                                \
        const int lane = threadIdx.x & 31, cr = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); \
        if (cr >= chunks) return;                                                                   \
        const int c = blockIdx.y * chunks + cr;                                                     \
        const u32 pair = ((const u32*)x)[c * 32 + lane];                                            \
        const float v0 = __uint_as_float(pair << 16), v1 = __uint_as_float(pair & 0xffff0000u);     \
        float amax = fmaxf(fabsf(v0), fabsf(v1));                                                   \
        for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));     \
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;                                       \
        unsigned char* out = codes + (size_t)c * 128;                                               \
        _Pragma("unroll") for (int e = 0; e < 2; e++) {                                             \
            const float y = (e ? v1 : v0) * inv, h = rintf(y), l = rintf((y - h) * 128.0f);         \
            const int col = 2 * lane + e, t = col >> 4, r = col & 15, o = r & 3;                     \
            const int at = 32 * t + 4 * (r >> 2) + (o == 1 ? 2 : o == 2 ? 1 : o);                    \
            out[at] = (unsigned char)(signed char)h;                                                \
            out[at + 16] = (unsigned char)(signed char)l;                                           \
        }                                                                                           \
        if (lane == 0) d[c] = amax / (127.0f * 2048.0f);                                            \
    }

// Element (row, col) of a re-laid weight, dequantized in f32 exactly as the CPU does (the code's
// value times the scale, plus the offset when asymmetric): the inverse of the layout above.
template <int BITS, bool ASYM, int KIND>
__device__ __forceinline__ float q_elem(const u32* codes, const u32* scales, const u32* offsets, const u32* planes,
                                        float ts, int row, int col, int group, int G, int CH) {
    constexpr int TPU = tile_span(BITS), CW = 16 * TPU;
    const int s = row >> 4, rr = row & 15, c = col / CW, cc = col % CW;
    const int t = cc / (4 * TPU), r4 = cc % (4 * TPU), i = r4 >> 2, jh = (r4 >> 1) & 1, h = r4 & 1;
    const int g = rr & 7, j = (rr >> 3) + 2 * jh, lane = g * 4 + t;
    const size_t word = ((size_t)s * CH + c) * 32 + lane;
    const float v = code_at<BITS, ASYM, KIND>(codes + word * 4, BITS == 3 ? planes + word * 2 : nullptr, i, j, h);
    const int grp = min(col / group, G - 1), hi = rr >> 3;
    const size_t at = scale_at<KIND>(s, grp, G, g);
    const float sc = scale_value<KIND>(scale_bits<KIND>(scales[at], grp, hi), ts);
    return ASYM ? fmaf(v, sc, h2f((f16_t)(offsets[at] >> (16 * hi)))) : v * sc;
}

// The re-laid weight back to row-major bf16 for the strips s0 .. s0 + strips, for cuBLAS at
// prefill: one thread per 16-byte word (a lane of a chunk of a strip), which holds a run of 4 TPU
// columns of features g and g + 8 (see the layout above), written as bf16 rows of dst (row r of
// dst is feature 16 s0 + r). Values as in q_elem, so the CPU's rounded to bf16.
template <int BITS, bool ASYM, int KIND>
__device__ void dequant(const uint4* codes, const u32* scales, const u32* offsets, const uint2* planes, float ts,
                        int s0, int strips, int n, int k, u32 gmul, int G, int CH, bf16_t* dst) {
    constexpr int TPU = tile_span(BITS), CW = 16 * TPU, RUN = 4 * TPU;
    const size_t words = (size_t)strips * CH * 32;
    for (size_t id = (size_t)blockIdx.x * blockDim.x + threadIdx.x; id < words; id += (size_t)gridDim.x * blockDim.x) {
        const int lane = id & 31, c = (id >> 5) % CH, sl = (id >> 5) / CH, s = s0 + sl;
        const int g = lane >> 2, t = lane & 3, col0 = c * CW + RUN * t;
        const size_t wi = ((size_t)s * CH + c) * 32 + lane;
        const uint4 q = codes[wi];
        const uint2 hp = BITS == 3 ? planes[wi] : make_uint2(0, 0);
        const u32 w[4] = {q.x, q.y, q.z, q.w}, plane[2] = {hp.x, hp.y};
        const int grp = min((int)__umulhi((u32)col0, gmul), G - 1);
        const size_t at = scale_at<KIND>(s, grp, G, g);
        const u32 sp = scales[at], op = ASYM ? offsets[at] : 0u;
#pragma unroll
        for (int hi = 0; hi < 2; hi++) {
            const int row = s * 16 + g + 8 * hi;
            if (row >= n) continue;
            const float sc = scale_value<KIND>(scale_bits<KIND>(sp, grp, hi), ts);
            const float of = ASYM ? h2f((f16_t)(op >> (16 * hi))) : 0.0f;
            u32 out[RUN / 2];
#pragma unroll
            for (int e = 0; e < RUN; e += 2) {
                // Column e of the run: tile i = e / 4, register j = hi + 2 jh, half h.
                float v[2];
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const float cv = code_at<BITS, ASYM, KIND>(w, plane, e >> 2, hi + 2 * ((e >> 1) & 1), h);
                    v[h] = ASYM ? fmaf(cv, sc, of) : cv * sc;
                }
                out[e >> 1] = pack_bf2(v[0], v[1]);
            }
            bf16_t* d = dst + (size_t)(row - s0 * 16) * k + col0;
            if ((k & 7) == 0 && col0 + RUN <= k) {
#pragma unroll
                for (int u = 0; u < RUN / 8; u++)
                    ((uint4*)d)[u] = make_uint4(out[4 * u], out[4 * u + 1], out[4 * u + 2], out[4 * u + 3]);
            } else {
#pragma unroll
                for (int e = 0; e < RUN; e++)
                    if (col0 + e < k) d[e] = (bf16_t)(out[e >> 1] >> (16 * (e & 1)));
            }
        }
    }
}
#define DEQUANT(name, BITS, ASYM, KIND)                                                                        \
    extern "C" __global__ void name(const uint4* codes, const u32* scales, const u32* offsets, const uint2* planes, \
                                    float ts, int s0, int strips, int n, int k, u32 gmul, int G, int CH,         \
                                    bf16_t* dst) {                                                             \
        pdl_enter();                                                                                           \
        dequant<BITS, ASYM, KIND>(codes, scales, offsets, planes, ts, s0, strips, n, k, gmul, G, CH, dst);      \
    }

// Embedding rows gathered from a re-laid table (a quantized, possibly tied, embedding): grid
// (column blocks, tokens), one thread per column; each value equals the CPU's rounded to bf16.
#define QEMBED(name, BITS, ASYM, KIND)                                                                         \
    extern "C" __global__ void name(const u32* codes, const u32* scales, const u32* offsets, const u32* planes, \
                                    float ts, const u32* tokens, int k, int group, int G, int CH, bf16_t* out) { \
        pdl_enter();                                                                                           \
        const int col = blockIdx.x * blockDim.x + threadIdx.x;                                                 \
        if (col >= k) return;                                                                                  \
        out[(size_t)blockIdx.y * k + col] = f2bf(                                                              \
            q_elem<BITS, ASYM, KIND>(codes, scales, offsets, planes, ts, (int)tokens[blockIdx.y], col, group, G, CH)); \
    }

// The host compiles this file once per packed format, appending that format's QFORMAT line
// (`modules` in `cuda/mod.rs`).
