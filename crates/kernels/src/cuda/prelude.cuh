// Shared helpers of every Marlin CUDA kernel. NVRTC compiles this file and the kernel files
// concatenated, without any CUDA header: bf16 and f16 travel as raw 16-bit patterns and are
// converted with single PTX instructions (sm_80 or newer).

typedef unsigned short bf16_t;
typedef unsigned short f16_t;
typedef unsigned int u32;
typedef unsigned long long u64;
#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float bf2f(bf16_t h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ bf16_t f2bf(float f) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
__device__ __forceinline__ float h2f(f16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// The two bf16 halves of a 32-bit word as floats (low half first).
__device__ __forceinline__ float bf_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
// Two floats rounded into one bf16x2 word (lo in the low half).
__device__ __forceinline__ u32 pack_bf2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u32 fma_bf2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// silu(g) * u, as silu_mul and the gated decode kernel compute it.
__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// Programmatic dependent launch (sm_90; nothing on older GPUs): a kernel launched with it may
// start while the previous kernel runs, and must call griddep_wait before it touches anything
// earlier kernels read or write; a kernel that calls griddep_launch lets such a successor start.
// Calling griddep_launch first thing is safe: the wait still waits for the whole grid to finish
// and its writes to be visible. The quantized decode GEMV streams its weights (which no kernel
// writes) before it waits, and decode attention its step's positions, block tables and the K/V
// rows of earlier steps.
__device__ __forceinline__ void griddep_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Every kernel but the device-to-device copy is launched as a programmatic dependent on sm_90
// (`CudaBackend::launch`), and begins here: it lets its own successor start launching (so the
// successor's blocks are resident when it ends: in a replayed decode step ~325 kernels run
// back to back, each a few microseconds) and then waits for its predecessor. Every kernel waits
// before its first memory access, so "predecessor finished" holds transitively down the stream.
__device__ __forceinline__ void pdl_enter() {
    griddep_launch();
    griddep_wait();
}

// Shared-memory addresses, asynchronous copies into shared memory (sm_80) and the bf16 mma.
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}
__device__ __forceinline__ void cp_async16_at(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
// d += a · b on tensor cores (m16n8k16, bf16 in, f32 accumulate).
__device__ __forceinline__ void mma_bf16(float* d, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum (or max) over the block; every thread gets the result. Uses 32 floats of shared memory.
__device__ float block_reduce(float v, bool is_max) {
    __shared__ float s[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) s[w] = v;
    __syncthreads();
    if (w == 0) {
        float u = lane < nw ? s[lane] : (is_max ? NEG_INF : 0.0f);
        u = is_max ? warp_max(u) : warp_sum(u);
        if (lane == 0) s[0] = u;
    }
    __syncthreads();
    return s[0];
}

// Weight element loads widened to float.
struct LdF32 { typedef float T; static constexpr int KIND = 0; static __device__ __forceinline__ float ld(const float* p) { return *p; } };
struct LdF16 { typedef f16_t T; static constexpr int KIND = 1; static __device__ __forceinline__ float ld(const f16_t* p) { return h2f(*p); } };
struct LdBF16 { typedef bf16_t T; static constexpr int KIND = 2; static __device__ __forceinline__ float ld(const bf16_t* p) { return bf2f(*p); } };
