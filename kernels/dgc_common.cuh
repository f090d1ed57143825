// Shared helpers of the DGC kernels (dgc.kernels): dtype codes, element loads and stores with the
// wire casts, warp reductions and the warp-per-block iteration used by every block-maximum kernel.
//
// Compiled by CuPy/NVRTC (cupy_backend.py inlines this header in front of the .cu files) and by nvcc
// (launch/compile_kernels.sh), so it includes nothing: no libc, no cuda_fp16.h.  Conversions use PTX
// cvt instructions (round to nearest even, as torch's casts).
#ifndef DGC_COMMON_CUH
#define DGC_COMMON_CUH

// Elements per block of the block-maximum summary: two warps' worth, one warp per block.
// Must equal dgc.kernels.reference.BLOCK.
#define DGC_BLOCK 64
#define DGC_WARP 32
#define DGC_FULL_MASK 0xffffffffu

// Dtype codes of "kind" arguments (must match cupy_backend._KIND).
#define DGC_F32 0
#define DGC_F16 1
#define DGC_BF16 2

__device__ __forceinline__ float dgc_half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short dgc_float_to_half(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float dgc_bf16_to_float(unsigned short b) {
    return __uint_as_float(static_cast<unsigned int>(b) << 16);
}

// cvt.rn.bf16.f32 needs sm_80; older devices (sm_75: T4, RTX 20xx) get the same rounding in integer
// arithmetic: round to nearest even on the upper 16 bits, NaN kept quiet.  DGC_SOFT_BF16 forces it (the
// CPU emulator tests both).
#if defined(DGC_SOFT_BF16) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800)
__device__ __forceinline__ unsigned short dgc_float_to_bf16(float f) {
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return 0x7fffu;  // NaN: the canonical NaN, as cvt.rn.bf16.f32 gives
    }
    return static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#else
__device__ __forceinline__ unsigned short dgc_float_to_bf16(float f) {
    unsigned short b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
}
#endif

// Largest finite value of each wire dtype.  Values are saturated to it before the cast, so an entry
// beyond the wire's range sends the largest finite value and keeps the excess in the residual (an inf on
// the wire would poison every rank's sum and the sender's residual).  NaN passes through unchanged.
#define DGC_F16_MAX 65504.0f
#define DGC_BF16_MAX 3.38953139e38f

__device__ __forceinline__ float dgc_saturate(float f, float limit) {
    return fabsf(f) > limit ? copysignf(limit, f) : f;
}

// max(a, b) that propagates NaN (fmaxf drops it), as torch's amax does.
__device__ __forceinline__ float dgc_nan_max(float a, float b) {
    return (a != a || a > b) ? a : b;
}

// Element i of an array of dtype `kind`, widened to float (exact for all three dtypes).
__device__ __forceinline__ float dgc_load(const void* __restrict__ p, long long i, int kind) {
    if (kind == DGC_F32) {
        return static_cast<const float*>(p)[i];
    }
    const unsigned short bits = static_cast<const unsigned short*>(p)[i];
    return kind == DGC_F16 ? dgc_half_to_float(bits) : dgc_bf16_to_float(bits);
}

// Store f as element i of an array of dtype `kind` (saturated to its finite range, rounded to nearest
// even); returns the stored value widened back to float.
__device__ __forceinline__ float dgc_store(void* __restrict__ p, long long i, float f, int kind) {
    if (kind == DGC_F32) {
        static_cast<float*>(p)[i] = f;
        return f;
    }
    if (kind == DGC_F16) {
        const unsigned short h = dgc_float_to_half(dgc_saturate(f, DGC_F16_MAX));
        static_cast<unsigned short*>(p)[i] = h;
        return dgc_half_to_float(h);
    }
    const unsigned short b = dgc_float_to_bf16(dgc_saturate(f, DGC_BF16_MAX));
    static_cast<unsigned short*>(p)[i] = b;
    return dgc_bf16_to_float(b);
}

// Maximum over the 32 lanes of a warp (NaN if any lane holds NaN); every lane must call it (all lanes get the result).
__device__ __forceinline__ float dgc_warp_max(float v) {
#pragma unroll
    for (int offset = DGC_WARP / 2; offset > 0; offset >>= 1) {
        v = dgc_nan_max(v, __shfl_xor_sync(DGC_FULL_MASK, v, offset));
    }
    return v;
}

// Warp-per-block iteration: the global warp index and the number of warps of the grid (64-bit, so
// block * DGC_BLOCK never overflows).  Launches use a block size that is a multiple of 32.
__device__ __forceinline__ long long dgc_warp_id() {
    return (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / DGC_WARP;
}

__device__ __forceinline__ long long dgc_warp_count() {
    return static_cast<long long>(gridDim.x) * blockDim.x / DGC_WARP;
}

// Thread-per-element iteration (grid-stride), 64-bit.
__device__ __forceinline__ long long dgc_thread_id() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long dgc_thread_count() {
    return static_cast<long long>(gridDim.x) * blockDim.x;
}

#endif  // DGC_COMMON_CUH
