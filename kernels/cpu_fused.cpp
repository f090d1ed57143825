// Fused CPU passes of DGC (the CPU fast path, driven by kernels/cpu_fused.py through ctypes).
//
// Same arithmetic as the torch twins of kernels/reference.py, operation for operation, so that the
// results are bit-identical (the tests check it): compiled with -ffp-contract=off, and the momentum
// step u <- beta*u + g rounds once (fma) or twice exactly as torch.add(g, u, alpha=beta) does on this
// machine (cpu_fused.py asks torch which, per gradient dtype, and passes the answer as the mode).
//
// Each function works on a range [lo, hi) of elements whose bounds are multiples of DGC_BLOCK (except
// hi == n); the Python side splits a tensor into one range per thread and calls these without the GIL.
// Blocks of DGC_BLOCK consecutive elements are the unit of the block maxima (docs/kernels.md).
// dgc_cpu_dense_momentum is the dense path's pass (dgc/compressor.py compress_dense_direct): the two
// torch operations of reference.dense_momentum in one read of g, u and one write of u, g;
// dgc_cpu_dense_momentum_many runs it over a list of tensors (a whole bucket) in one call.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define DGC_BLOCK 64

namespace {

enum GradKind { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };
enum Mode { ACCUMULATE = 0, MOMENTUM_FMA = 1, MOMENTUM_MUL_ADD = 2, NESTEROV = 3 };

inline float widen(float x) { return x; }
inline float widen(double x) { return static_cast<float>(x); }  // round to nearest, as torch's cast
inline float widen(uint16_t bits, std::integral_constant<int, BF16>) {
  uint32_t w = static_cast<uint32_t>(bits) << 16;  // exact
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
inline float widen(uint16_t h, std::integral_constant<int, F16>) {  // IEEE half -> float, exact
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  float f;
  if (exp == 0x1fu) {  // inf / NaN
    uint32_t w = sign | 0x7f800000u | (man << 13);
    std::memcpy(&f, &w, 4);
  } else if (exp == 0) {  // zero / subnormal: man * 2^-24, exact in float
    f = static_cast<float>(man) * 5.9604644775390625e-8f;
    if (sign) f = -f;
  } else {
    uint32_t w = sign | ((exp + 112u) << 23) | (man << 13);
    std::memcpy(&f, &w, 4);
  }
  return f;
}

template <int K>
struct Load;
template <>
struct Load<F32> {
  static float at(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
};
template <>
struct Load<F64> {
  static float at(const void* p, int64_t i) { return widen(static_cast<const double*>(p)[i]); }
};
template <>
struct Load<BF16> {
  static float at(const void* p, int64_t i) {
    return widen(static_cast<const uint16_t*>(p)[i], std::integral_constant<int, BF16>());
  }
};
template <>
struct Load<F16> {
  static float at(const void* p, int64_t i) {
    return widen(static_cast<const uint16_t*>(p)[i], std::integral_constant<int, F16>());
  }
};

// Largest entry of a[0..len): NaN when any entry is NaN (as torch.amax); entries are |x| or -1.
inline float block_max(const float* a, int len) {
  if (len == DGC_BLOCK) {
    float m[16];
    int nan = 0;
    for (int j = 0; j < 16; ++j) m[j] = a[j];
    for (int r = 1; r < DGC_BLOCK / 16; ++r)
      for (int j = 0; j < 16; ++j) m[j] = a[r * 16 + j] > m[j] ? a[r * 16 + j] : m[j];
    for (int j = 0; j < DGC_BLOCK; ++j) nan |= a[j] != a[j];
    float best = m[0];
    for (int j = 1; j < 16; ++j) best = m[j] > best ? m[j] : best;
    return nan ? NAN : best;
  }
  float best = a[0];
  int nan = 0;
  for (int j = 0; j < len; ++j) {
    best = a[j] > best ? a[j] : best;
    nan |= a[j] != a[j];
  }
  return nan ? NAN : best;
}

// Steps 1-2 on one block, leaving |v| (masked: -1) in a[].
template <int K, int MODE, bool MASK>
inline void update_block(const void* g, const uint8_t* mask, float* u, float* v, int64_t b0, int len,
                         float beta, float* a) {
  for (int j = 0; j < len; ++j) {
    const int64_t i = b0 + j;
    float gi = Load<K>::at(g, i);
    if (MASK) gi = gi * static_cast<float>(mask[i]);  // g * mask, as torch.mul (inf * 0 = NaN)
    float vi = v[i];
    if (MODE == ACCUMULATE) {
      vi = vi + gi;
    } else if (MODE == MOMENTUM_FMA) {
      const float ui = std::fma(beta, u[i], gi);
      u[i] = ui;
      vi = vi + ui;
    } else if (MODE == MOMENTUM_MUL_ADD) {
      const float bu = beta * u[i];
      const float ui = gi + bu;
      u[i] = ui;
      vi = vi + ui;
    } else {  // NESTEROV: u <- (u + g) * beta; v <- (v + u) + g
      const float ui = (u[i] + gi) * beta;
      u[i] = ui;
      vi = (vi + ui) + gi;
    }
    v[i] = vi;
    const float mag = std::fabs(vi);
    a[j] = MASK ? (mask[i] ? mag : -1.0f) : mag;
  }
}

// One pass over [lo, hi): steps 1-2 (MODE >= 0) or nothing (MODE < 0: x is read only), the block
// maxima of |v| and the strided sample of |v| (positions first, first + stride, ...; stride 0: none).
template <int K, int MODE, bool MASK>
void pass(const void* g, const uint8_t* mask, float* u, float* v, float* bm, int64_t lo, int64_t hi,
          float beta, float* sample, int64_t stride, int64_t first) {
  float a[DGC_BLOCK];
  int64_t next = -1;
  if (stride > 0) {
    next = first >= lo ? first : first + (lo - first + stride - 1) / stride * stride;
  }
  for (int64_t b0 = lo; b0 < hi; b0 += DGC_BLOCK) {
    const int len = static_cast<int>(hi - b0 < DGC_BLOCK ? hi - b0 : DGC_BLOCK);
    if (MODE >= 0) {
      if (len == DGC_BLOCK)
        update_block<K, MODE, MASK>(g, mask, u, v, b0, DGC_BLOCK, beta, a);
      else
        update_block<K, MODE, MASK>(g, mask, u, v, b0, len, beta, a);
    } else {
      for (int j = 0; j < len; ++j) {
        const float mag = std::fabs(Load<K>::at(g, b0 + j));
        a[j] = MASK ? (mask[b0 + j] ? mag : -1.0f) : mag;
      }
    }
    bm[b0 / DGC_BLOCK] = block_max(a, len);
    while (next >= 0 && next < b0 + len) {  // the sample reads |v| unmasked
      const float val = MODE >= 0 ? v[next] : Load<K>::at(g, next);
      sample[(next - first) / stride] = std::fabs(val);
      next += stride;
    }
  }
}

using PassFn = void (*)(const void*, const uint8_t*, float*, float*, float*, int64_t, int64_t, float,
                        float*, int64_t, int64_t);

template <int K, int MODE>
PassFn pick_mask(bool mask) {
  return mask ? pass<K, MODE, true> : pass<K, MODE, false>;
}

template <int K>
PassFn pick_mode(int mode, bool mask) {
  switch (mode) {
    case ACCUMULATE: return pick_mask<K, ACCUMULATE>(mask);
    case MOMENTUM_FMA: return pick_mask<K, MOMENTUM_FMA>(mask);
    case MOMENTUM_MUL_ADD: return pick_mask<K, MOMENTUM_MUL_ADD>(mask);
    case NESTEROV: return pick_mask<K, NESTEROV>(mask);
    default: return pick_mask<K, -1>(mask);
  }
}

PassFn pick(int kind, int mode, bool mask) {
  switch (kind) {
    case F32: return pick_mode<F32>(mode, mask);
    case F16: return pick_mode<F16>(mode, mask);
    case BF16: return pick_mode<BF16>(mode, mask);
    case F64: return pick_mode<F64>(mode, mask);
    default: return nullptr;
  }
}

// Appends the positions in [b0, end) with |x| >= thr (and mask set) to out[count..] while they fit
// below cap (the count goes on).  A full block is tested in one vectorized loop into 64 hit bytes,
// packed eight at a time into a bit mask, whose set bits are then written in ascending order.
template <int K, bool MASK>
int64_t hits(const void* x, const uint8_t* mask, int64_t b0, int64_t end, float thr, int64_t* out,
             int64_t count, int64_t cap) {
  if (end - b0 != DGC_BLOCK) {
    for (int64_t i = b0; i < end; ++i) {
      if (std::fabs(Load<K>::at(x, i)) >= thr && (!MASK || mask[i])) {
        if (count < cap) out[count] = i;
        ++count;
      }
    }
    return count;
  }
  uint8_t hit[DGC_BLOCK];
  for (int j = 0; j < DGC_BLOCK; ++j) {
    const bool h = std::fabs(Load<K>::at(x, b0 + j)) >= thr;
    hit[j] = MASK ? static_cast<uint8_t>(h & (mask[b0 + j] != 0)) : static_cast<uint8_t>(h);
  }
  uint64_t bits = 0;
  for (int q = 0; q < DGC_BLOCK / 8; ++q) {  // byte i of w (0 or 1) becomes bit i
    uint64_t w;
    std::memcpy(&w, hit + 8 * q, 8);
    bits |= ((w * 0x0102040810204080ull) >> 56) << (8 * q);
  }
  while (bits) {
    if (count < cap) out[count] = b0 + __builtin_ctzll(bits);
    ++count;
    bits &= bits - 1;
  }
  return count;
}

template <int K>
inline void prefetch_block(const void* x, int64_t b) {
  constexpr int size = K == F64 ? 8 : (K == F32 ? 4 : 2);
  const char* p = static_cast<const char*>(x) + b * DGC_BLOCK * size;
  for (int line = 0; line < DGC_BLOCK * size; line += 64) __builtin_prefetch(p + line);
}

// The candidate blocks of [lo, hi) are gathered in batches and prefetched before they are read: they
// lie far apart, so without it each one costs a memory latency.
template <int K, bool MASK>
int64_t candidates(const void* x, const uint8_t* mask, const float* bm, int64_t n, int64_t lo,
                   int64_t hi, float thr, int scan_all, int64_t* out, int64_t cap) {
  constexpr int BATCH = 16;
  int64_t batch[BATCH];
  int fill = 0;
  int64_t count = 0;
  const int64_t first = lo / DGC_BLOCK, last = (hi + DGC_BLOCK - 1) / DGC_BLOCK;
  for (int64_t b = first; b < last; ++b) {
    if (!(scan_all || bm[b] >= thr)) continue;
    prefetch_block<K>(x, b);
    batch[fill++] = b;
    if (fill == BATCH || b + 1 == last) {
      for (int j = 0; j < fill; ++j) {
        const int64_t b0 = batch[j] * DGC_BLOCK;
        count = hits<K, MASK>(x, mask, b0, b0 + DGC_BLOCK < n ? b0 + DGC_BLOCK : n, thr, out, count, cap);
      }
      fill = 0;
    }
  }
  for (int j = 0; j < fill; ++j) {
    const int64_t b0 = batch[j] * DGC_BLOCK;
    count = hits<K, MASK>(x, mask, b0, b0 + DGC_BLOCK < n ? b0 + DGC_BLOCK : n, thr, out, count, cap);
  }
  return count;
}

// The dense path's one pass over [lo, hi): x = g + m*u (rounded as MODE says), u = x, g = x / divide
// (a true division, as torch.div; DIVIDE false: g = x).
template <int MODE, bool DIVIDE>
void dense_momentum(float* __restrict__ g, float* __restrict__ u, int64_t lo, int64_t hi, float m,
                    float divide) {
  for (int64_t i = lo; i < hi; ++i) {
    const float x = MODE == MOMENTUM_FMA ? std::fma(m, u[i], g[i]) : g[i] + m * u[i];
    u[i] = x;
    g[i] = DIVIDE ? x / divide : x;
  }
}

}  // namespace

extern "C" {

// Steps 1-2, block maxima and sample over [lo, hi) of n elements; mode < 0: block maxima and sample of
// |g| only (u, v unused).  Returns 0, or -1 for an unknown kind.
int dgc_cpu_pass(const void* g, int kind, const uint8_t* mask, float* u, float* v, float* bm, int64_t lo,
                 int64_t hi, float beta, int mode, float* sample, int64_t stride, int64_t first) {
  PassFn fn = pick(kind, mode, mask != nullptr);
  if (fn == nullptr) return -1;
  fn(g, mask, u, v, bm, lo, hi, beta, sample, stride, first);
  return 0;
}

// Ascending positions in [lo, hi) with |x| >= thr (and mask set), reading only the blocks whose maximum
// reaches thr (every block with scan_all).  Writes at most cap positions; returns how many there are
// (more than cap: call again with a larger buffer), or -1 for an unknown kind.
int64_t dgc_cpu_candidates(const void* x, int kind, const uint8_t* mask, const float* bm, int64_t n,
                           int64_t lo, int64_t hi, float thr, int scan_all, int64_t* out, int64_t cap) {
  const bool m = mask != nullptr;
  switch (kind) {
    case F32:
      return m ? candidates<F32, true>(x, mask, bm, n, lo, hi, thr, scan_all, out, cap)
               : candidates<F32, false>(x, mask, bm, n, lo, hi, thr, scan_all, out, cap);
    case F16:
      return m ? candidates<F16, true>(x, mask, bm, n, lo, hi, thr, scan_all, out, cap)
               : candidates<F16, false>(x, mask, bm, n, lo, hi, thr, scan_all, out, cap);
    case BF16:
      return m ? candidates<BF16, true>(x, mask, bm, n, lo, hi, thr, scan_all, out, cap)
               : candidates<BF16, false>(x, mask, bm, n, lo, hi, thr, scan_all, out, cap);
    default: return -1;
  }
}

// How many of the nb block maxima reach thr (NaN never does).
int64_t dgc_cpu_blocks_above(const float* bm, int64_t nb, float thr) {
  int64_t count = 0;
  for (int64_t b = 0; b < nb; ++b) count += bm[b] >= thr;
  return count;
}

// The dense path over [lo, hi): u <- g + m*u, g <- u / divide (divide == 1: g <- u), in one pass.
// mode: MOMENTUM_FMA or MOMENTUM_MUL_ADD (how torch.add(g, u, alpha=m) rounds).  Returns 0, or -1 for
// another mode.
int dgc_cpu_dense_momentum(float* g, float* u, int64_t lo, int64_t hi, float m, int mode, float divide) {
  const bool div = divide != 1.0f;
  if (mode == MOMENTUM_FMA) {
    (div ? dense_momentum<MOMENTUM_FMA, true> : dense_momentum<MOMENTUM_FMA, false>)(g, u, lo, hi, m, divide);
  } else if (mode == MOMENTUM_MUL_ADD) {
    (div ? dense_momentum<MOMENTUM_MUL_ADD, true> : dense_momentum<MOMENTUM_MUL_ADD, false>)(g, u, lo, hi, m,
                                                                                             divide);
  } else {
    return -1;
  }
  return 0;
}

// The dense path of a whole group in one call: dgc_cpu_dense_momentum over [lo[j], hi[j]) of the
// tensors g[j], u[j] for j < count (the same bits as one call per tensor; no Python between tensors).
int dgc_cpu_dense_momentum_many(float* const* g, float* const* u, const int64_t* lo, const int64_t* hi,
                                int64_t count, float m, int mode, float divide) {
  for (int64_t j = 0; j < count; ++j) {
    const int rc = dgc_cpu_dense_momentum(g[j], u[j], lo[j], hi[j], m, mode, divide);
    if (rc) return rc;
  }
  return 0;
}

// Counters in memory shared between processes (dgc/node_shm.py): a store that publishes every earlier
// write of this thread (release) and a load after which the writes published with the value are visible
// (acquire), on every architecture.
void dgc_cpu_counter_store(int64_t* p, int64_t value) { __atomic_store_n(p, value, __ATOMIC_RELEASE); }

int64_t dgc_cpu_counter_load(const int64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

}  // extern "C"
