// Steps 4-5 of DGC for one tensor: write the k selected pairs straight into the wire buffer and apply
// momentum factor masking.
//
// Per selected position i = index[j] (unique, so no two threads touch the same entry):
//   out_index[j] = i (int32), out_value[j] = v[i] cast to the wire dtype (round to nearest even);
//   v[i] = 0 for a float32 wire, else v[i] - (float)out_value[j]: the rounding error stays in v;
//   u[i] = 0 when zero_momentum (momentum may be null otherwise).
#include "dgc_common.cuh"

extern "C" __global__ void dgc_pack(
    const long long* __restrict__ index, const long long k,
    float* __restrict__ residual,
    float* __restrict__ momentum, const int zero_momentum,
    int* __restrict__ out_index,
    void* __restrict__ out_value, const int wire_kind)
{
    for (long long j = dgc_thread_id(); j < k; j += dgc_thread_count()) {
        const long long i = index[j];
        const float v = residual[i];
        out_index[j] = static_cast<int>(i);
        const float sent = dgc_store(out_value, j, v, wire_kind);
        residual[i] = wire_kind == DGC_F32 ? 0.0f : v - sent;
        if (zero_momentum) {
            momentum[i] = 0.0f;
        }
    }
}
