// Selection kernels: block maxima of |x|, then count-and-compact of the entries with |x| >= thr.
//
// The threshold lives in device memory (`thr` points to one float) so that the host can lower it
// (x0.8, docs/algorithm.md#selection) without a round trip.  A block whose maximum is below thr is never read: with a
// density of 0.1% only ~7% of the blocks of a Gaussian-like tensor are.  Counting and compaction run
// the same predicate, so the compaction's write positions (from an inclusive prefix sum of the
// per-block counts) are exact and the output is in ascending index order.
#include "dgc_common.cuh"

// block_max[b] = max |x[i]| over the live entries of block b (-1 when none is live).
extern "C" __global__ void dgc_block_absmax(
    const void* __restrict__ x, const int kind,
    const unsigned char* __restrict__ mask, const int has_mask,
    float* __restrict__ block_max, const long long n)
{
    const int lane = threadIdx.x % DGC_WARP;
    const long long nblocks = (n + DGC_BLOCK - 1) / DGC_BLOCK;
    for (long long b = dgc_warp_id(); b < nblocks; b += dgc_warp_count()) {
        float m = -1.0f;
#pragma unroll
        for (int h = 0; h < DGC_BLOCK / DGC_WARP; ++h) {
            const long long i = b * DGC_BLOCK + h * DGC_WARP + lane;
            if (i < n && (!has_mask || mask[i] != 0)) {
                m = dgc_nan_max(fabsf(dgc_load(x, i, kind)), m);
            }
        }
        m = dgc_warp_max(m);
        if (lane == 0) {
            block_max[b] = m;
        }
    }
}

// counts[b] = number of live entries of block b with |x| >= *thr (0 without reading the block when
// block_max[b] < *thr).
extern "C" __global__ void dgc_count_above(
    const void* __restrict__ x, const int kind,
    const unsigned char* __restrict__ mask, const int has_mask,
    const float* __restrict__ block_max, const float* __restrict__ thr,
    int* __restrict__ counts, const long long n)
{
    const float t = *thr;
    const int lane = threadIdx.x % DGC_WARP;
    const long long nblocks = (n + DGC_BLOCK - 1) / DGC_BLOCK;
    for (long long b = dgc_warp_id(); b < nblocks; b += dgc_warp_count()) {
        int c = 0;
        if (block_max[b] >= t) {  // same address for all lanes: warp-uniform branch
#pragma unroll
            for (int h = 0; h < DGC_BLOCK / DGC_WARP; ++h) {
                const long long i = b * DGC_BLOCK + h * DGC_WARP + lane;
                const bool hit = i < n && (!has_mask || mask[i] != 0) && fabsf(dgc_load(x, i, kind)) >= t;
                c += __popc(__ballot_sync(DGC_FULL_MASK, hit));
            }
        }
        if (lane == 0) {
            counts[b] = c;
        }
    }
}

// Writes the entries counted by dgc_count_above (same x, mask, block_max, thr) in ascending order:
// block b's entries go to [ends[b-1], ends[b]) where ends is the inclusive prefix sum of the counts.
// out_index gets the positions, out_abs the magnitudes (float32).
extern "C" __global__ void dgc_compact_above(
    const void* __restrict__ x, const int kind,
    const unsigned char* __restrict__ mask, const int has_mask,
    const float* __restrict__ block_max, const float* __restrict__ thr,
    const long long* __restrict__ ends,
    long long* __restrict__ out_index, float* __restrict__ out_abs, const long long n)
{
    const float t = *thr;
    const int lane = threadIdx.x % DGC_WARP;
    const unsigned int below = (1u << lane) - 1u;  // lanes before this one
    const long long nblocks = (n + DGC_BLOCK - 1) / DGC_BLOCK;
    for (long long b = dgc_warp_id(); b < nblocks; b += dgc_warp_count()) {
        if (!(block_max[b] >= t)) {  // exactly the blocks dgc_count_above counted (NaN maxima: none)
            continue;
        }
        long long pos = b == 0 ? 0 : ends[b - 1];
#pragma unroll
        for (int h = 0; h < DGC_BLOCK / DGC_WARP; ++h) {
            const long long i = b * DGC_BLOCK + h * DGC_WARP + lane;
            float a = 0.0f;
            bool hit = false;
            if (i < n && (!has_mask || mask[i] != 0)) {
                a = fabsf(dgc_load(x, i, kind));
                hit = a >= t;
            }
            const unsigned int ballot = __ballot_sync(DGC_FULL_MASK, hit);
            if (hit) {
                const long long at = pos + __popc(ballot & below);
                out_index[at] = i;
                out_abs[at] = a;
            }
            pos += __popc(ballot);
        }
    }
}
