// Receiver side: add one worker's (index, value) pairs into the dense float32 accumulator.
//
// The host launches this once per rank, in rank order, on one stream, then divides by N: the sums are
// formed in the same order on every device, so every rank gets the same bits.  Within one worker the
// indices are unique, so the additions of one launch never collide (atomicAdd only guards against a
// malformed message; with unique indices it adds exactly like a plain read-modify-write).  Positions
// outside [0, n) are ignored rather than written out of bounds.
#include "dgc_common.cuh"

extern "C" __global__ void dgc_scatter_add(
    float* __restrict__ out, const long long n,
    const void* __restrict__ index, const int index_is_int64,
    const void* __restrict__ value, const int value_kind, const long long k)
{
    for (long long j = dgc_thread_id(); j < k; j += dgc_thread_count()) {
        const long long i = index_is_int64 ? static_cast<const long long*>(index)[j]
                                           : static_cast<long long>(static_cast<const int*>(index)[j]);
        if (i >= 0 && i < n) {
            atomicAdd(out + i, dgc_load(value, j, value_kind));
        }
    }
}
