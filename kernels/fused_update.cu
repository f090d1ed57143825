// Steps 1-2 of DGC for one tensor, and the block maxima of step 3, in one pass over memory.
//
// Per element i (one warp per block of DGC_BLOCK elements, grid-stride over blocks):
//   g = grad[i] * mask[i]                       (grad in float32/float16/bfloat16, widened exactly)
//   plain:     u = beta*u + g   (one fma, as torch's add(g, u, alpha=beta))     v = v + u
//   Nesterov:  u = (u + g)*beta                                                 v = (v + u) + g
//   no momentum (has_momentum == 0): v = v + g
// and block_max[b] = max |v| over the live entries of block b (-1 when none is live).
// Memory traffic: read grad, u, v (and the mask); write u, v and n/64 block maxima.
#include "dgc_common.cuh"

extern "C" __global__ void dgc_fused_update(
    const void* __restrict__ grad, const int grad_kind,
    float* __restrict__ momentum, const int has_momentum,
    float* __restrict__ residual,
    const unsigned char* __restrict__ mask, const int has_mask,
    float* __restrict__ block_max,
    const long long n, const float beta, const int nesterov)
{
    const int lane = threadIdx.x % DGC_WARP;
    const long long nblocks = (n + DGC_BLOCK - 1) / DGC_BLOCK;
    for (long long b = dgc_warp_id(); b < nblocks; b += dgc_warp_count()) {  // warp-uniform loop
        float m = -1.0f;
#pragma unroll
        for (int h = 0; h < DGC_BLOCK / DGC_WARP; ++h) {
            const long long i = b * DGC_BLOCK + h * DGC_WARP + lane;
            if (i < n) {
                const bool live = !has_mask || mask[i] != 0;
                const float g = dgc_load(grad, i, grad_kind) * (live ? 1.0f : 0.0f);
                float v = residual[i];
                if (has_momentum) {
                    float u = momentum[i];
                    if (nesterov) {
                        u = (u + g) * beta;
                        v = (v + u) + g;
                    } else {
                        u = fmaf(beta, u, g);
                        v = v + u;
                    }
                    momentum[i] = u;
                } else {
                    v = v + g;
                }
                residual[i] = v;
                if (live) {
                    m = dgc_nan_max(fabsf(v), m);
                }
            }
        }
        m = dgc_warp_max(m);  // all 32 lanes reach this: the loop bound depends on the warp only
        if (lane == 0) {
            block_max[b] = m;
        }
    }
}
