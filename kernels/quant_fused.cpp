// Fused CPU passes of the quantized compressors (dgc.quant: int8, TernGrad, QSGD), driven by
// kernels/quant_fused.py through ctypes.
//
// One pass per block of `width` elements: read x (+ the error-feedback residual), the block's scale
// (max |v|; QSGD's L2 norm comes from torch, passed in), rounding to the grid (to nearest, or
// stochastic with the counter-based uniform draws of dgc/quant/blocks.py), the packed codes, and on
// request the decoded value (`sent`) and the new residual `v - sent`.  The same arithmetic as the
// torch reference of dgc/quant (operation for operation, compiled with -ffp-contract=off), so the
// results are bit-identical; the tests check it.
//
// Each call works on a range [lo, hi) of elements whose bounds are multiples of both the block width
// and 8 (except hi == n): whole blocks and whole bytes of codes.  The Python side splits a tensor
// into one range per thread and calls these without the GIL.

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

enum Method { INT8 = 0, TERNGRAD = 1, QSGD = 2 };

constexpr int64_t STAGE = 4096;  // codes staged between rounding and packing (a multiple of 8)

// ------------------------------------------------------------------------------ counter-based RNG
// hash32: two multiply-xorshift rounds; constants below 2^31 so that the torch twin computes the
// same products in int64 without overflow (dgc/quant/blocks.py: _hash32).
inline uint32_t hash32(uint32_t x) {  // uint32 products wrap: the low 32 bits of the int64 ones
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x31848babu;
  x ^= x >> 16;
  return x;
}

// u in [0, 1), a multiple of 2^-24, for element i of a call keyed by (k0, k1).
inline float uniform(int64_t i, uint32_t k0, uint32_t k1) {
  uint64_t u = static_cast<uint64_t>(i);
  uint32_t h = hash32(hash32(static_cast<uint32_t>(u) ^ k0) ^ k1 ^ static_cast<uint32_t>(u >> 32));
  return static_cast<float>(h >> 8) * 5.9604644775390625e-8f;  // exact
}

inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ------------------------------------------------------------------------------------ the grid
// The code of r = v / scale in [-1, 1] (torch: BlockQuantizer.to_codes of each method); q = levels,
// u the element's uniform draw (stochastic), nearbyint rounds half to even as torch.round.
template <int METHOD, bool STOCHASTIC>
inline uint8_t code_of(float r, float q, float u) {
  if (METHOD == INT8) {
    float k = clampf(STOCHASTIC ? std::floor(r * q + u) : std::nearbyint(r * q), -q, q);
    return static_cast<uint8_t>(static_cast<int>(k + q));
  }
  if (METHOD == TERNGRAD) {
    float a = std::fabs(r);
    float b = STOCHASTIC ? std::floor(a + u) : std::nearbyint(a);
    int nonzero = b > 0.0f, negative = r < 0.0f;
    return static_cast<uint8_t>(nonzero * (1 + negative));  // 0, 1 (+s) or 2 (-s)
  }
  float t = std::fabs(r) * q;
  float level = clampf(STOCHASTIC ? std::floor(t + u) : std::nearbyint(t), 0.0f, q);
  return static_cast<uint8_t>((static_cast<int>(level) << 1) | (r < 0.0f ? 1 : 0));
}

// The value of every code in units of the scale (torch: from_codes of each method).
void unit_table(int method, int levels, int bits, float* table) {
  const float q = static_cast<float>(levels);
  for (int c = 0; c < (1 << bits); ++c) {
    if (method == INT8) {
      table[c] = (static_cast<float>(c) - q) / q;
    } else if (method == TERNGRAD) {
      table[c] = c == 1 ? 1.0f : (c == 2 ? -1.0f : 0.0f);
    } else {
      float l = static_cast<float>(c >> 1) / q;
      table[c] = (c & 1) ? -l : l;
    }
  }
}

// ------------------------------------------------------------------------------- bit packing
// Code j of a group of 8 sits at bit j * BITS of the group's BITS bytes (a little-endian bit
// stream; for 1, 2, 4, 8 bits the same as "code i of a byte at bit i * bits").
template <int BITS>
void pack_groups(const uint8_t* codes, int64_t groups, uint8_t* out) {
  if (8 % BITS == 0) {  // whole codes per byte: a simple loop the compiler vectorizes
    constexpr int per = 8 / BITS;
    for (int64_t j = 0; j < groups * BITS; ++j) {
      unsigned byte = 0;
      for (int k = 0; k < per; ++k) byte |= static_cast<unsigned>(codes[per * j + k]) << (k * BITS);
      out[j] = static_cast<uint8_t>(byte);
    }
    return;
  }
  for (int64_t g = 0; g < groups; ++g) {
    uint64_t w = 0;
    for (int j = 0; j < 8; ++j) w |= static_cast<uint64_t>(codes[8 * g + j]) << (j * BITS);
    std::memcpy(out + g * BITS, &w, BITS);  // little-endian machines only (checked in Python)
  }
}

template <int BITS>
void unpack_groups(const uint8_t* in, int64_t groups, uint8_t* codes) {
  constexpr uint64_t mask = (1u << BITS) - 1;
  if (8 % BITS == 0) {
    constexpr int per = 8 / BITS;
    for (int64_t j = 0; j < groups * BITS; ++j) {
      for (int k = 0; k < per; ++k) codes[per * j + k] = static_cast<uint8_t>((in[j] >> (k * BITS)) & mask);
    }
    return;
  }
  for (int64_t g = 0; g < groups; ++g) {
    uint64_t w = 0;
    std::memcpy(&w, in + g * BITS, BITS);
    for (int j = 0; j < 8; ++j) codes[8 * g + j] = static_cast<uint8_t>((w >> (j * BITS)) & mask);
  }
}

void pack(int bits, const uint8_t* codes, int64_t groups, uint8_t* out) {
  switch (bits) {
    case 1: pack_groups<1>(codes, groups, out); break;
    case 2: pack_groups<2>(codes, groups, out); break;
    case 3: pack_groups<3>(codes, groups, out); break;
    case 4: pack_groups<4>(codes, groups, out); break;
    case 5: pack_groups<5>(codes, groups, out); break;
    case 6: pack_groups<6>(codes, groups, out); break;
    case 7: pack_groups<7>(codes, groups, out); break;
    default: std::memcpy(out, codes, groups * 8); break;
  }
}

void unpack(int bits, const uint8_t* in, int64_t groups, uint8_t* codes) {
  switch (bits) {
    case 1: unpack_groups<1>(in, groups, codes); break;
    case 2: unpack_groups<2>(in, groups, codes); break;
    case 3: unpack_groups<3>(in, groups, codes); break;
    case 4: unpack_groups<4>(in, groups, codes); break;
    case 5: unpack_groups<5>(in, groups, codes); break;
    case 6: unpack_groups<6>(in, groups, codes); break;
    case 7: unpack_groups<7>(in, groups, codes); break;
    default: std::memcpy(codes, in, groups * 8); break;
  }
}

// Codes appended one tile at a time, packed in whole groups of 8 as soon as they are complete.
struct Packer {
  int bits;
  uint8_t* out;  // the byte of element `lo` (lo a multiple of 8)
  int64_t fill = 0;
  uint8_t stage[STAGE + 8];

  uint8_t* tail() { return stage + fill; }
  void commit(int64_t m, bool last) {
    fill += m;
    int64_t groups = fill / 8;
    pack(bits, stage, groups, out);
    out += groups * bits;
    int64_t rest = fill - groups * 8;
    std::memmove(stage, stage + groups * 8, rest);
    fill = rest;
    if (last && rest) {  // the final partial group: only its ceil(rest * bits / 8) bytes
      std::memset(stage + rest, 0, 8 - rest);
      uint8_t group[8];
      pack(bits, stage, 1, group);
      std::memcpy(out, group, (rest * bits + 7) / 8);
      fill = 0;
    }
  }
};

// Codes read one tile at a time from packed bytes.
struct Unpacker {
  int bits;
  const uint8_t* in;  // the byte of element `lo`
  int64_t left;       // codes not yet unpacked
  int64_t start = 0, end = 0;
  uint8_t stage[STAGE + 16];

  // Pointer to the next m (<= STAGE) codes.
  const uint8_t* next(int64_t m) {
    if (end - start < m) {
      int64_t have = end - start;
      std::memmove(stage, stage + start, have);
      int64_t groups = (m - have + 7) / 8;
      int64_t whole = left / 8 < groups ? left / 8 : groups;
      unpack(bits, in, whole, stage + have);
      in += whole * bits;
      int64_t got = whole * 8;
      if (got < m - have && left - got > 0) {  // the final partial group
        int64_t rest = left - got;
        uint8_t bytes[8] = {0};
        std::memcpy(bytes, in, (rest * bits + 7) / 8);
        unpack(bits, bytes, 1, stage + have + got);
        got += rest;
      }
      left -= got;
      start = 0;
      end = have + got;
    }
    const uint8_t* p = stage + start;
    start += m;
    return p;
  }
};

inline float load(const float* x, const float* res, int64_t i) { return res ? x[i] + res[i] : x[i]; }

// max |v| over [bs, be): NaN if any element is NaN, else inf if any is inf (torch's abs().amax()).
float block_absmax(const float* x, const float* res, int64_t bs, int64_t be) {
  uint32_t m = 0;
  for (int64_t i = bs; i < be; ++i) {
    float v = load(x, res, i);
    uint32_t b;
    std::memcpy(&b, &v, 4);
    b &= 0x7fffffffu;  // for non-negative floats the integer order is the float order, NaN on top
    m = b > m ? b : m;
  }
  float s;
  if (m > 0x7f800000u) m = 0x7fc00000u;  // one NaN, whatever the payload
  std::memcpy(&s, &m, 4);
  return s;
}


struct EncodeArgs {
  const float* x;
  const float* res;
  float* res_out;
  float* sent;
  float* scales;
  bool scales_given;
  uint8_t* codes;
  int64_t n, width, lo, hi;
  int levels, bits;
  uint32_t k0, k1;
};

// One tile [t0, t1) of a block with scale s: codes into c, and sent / res_out when asked for.
// Simple loops over the tile (it stays in L1), each one vectorizable.
template <int METHOD, bool STOCHASTIC, bool RES, bool OUT>
void encode_tile(const EncodeArgs& a, const float* table, float s, int64_t t0, int64_t t1,
                 uint8_t* c) {
  const bool usable = std::isfinite(s) && s > 0.0f;
  const float value_scale = std::isfinite(s) ? s : NAN;  // decode: a non-finite scale is NaN
  const float q = static_cast<float>(a.levels);
  const int64_t m = t1 - t0;
  const float* x = a.x + t0;
  const float* res = RES ? a.res + t0 : nullptr;
  alignas(64) float r[STAGE];
  alignas(64) float u[STOCHASTIC ? STAGE : 1];
  if (usable) {
    for (int64_t i = 0; i < m; ++i) r[i] = clampf((RES ? x[i] + res[i] : x[i]) / s, -1.0f, 1.0f);
  } else {
    for (int64_t i = 0; i < m; ++i) r[i] = 0.0f;
  }
  if (STOCHASTIC) {
    for (int64_t i = 0; i < m; ++i) u[i] = uniform(t0 + i, a.k0, a.k1);
  }
  for (int64_t i = 0; i < m; ++i) c[i] = code_of<METHOD, STOCHASTIC>(r[i], q, STOCHASTIC ? u[i] : 0.0f);
  if (OUT) {
    float* d = a.sent ? a.sent + t0 : r;  // r is free again
    for (int64_t i = 0; i < m; ++i) d[i] = table[c[i]] * value_scale;
    if (a.res_out) {
      float* ro = a.res_out + t0;
      for (int64_t i = 0; i < m; ++i) ro[i] = (RES ? x[i] + res[i] : x[i]) - d[i];
    }
  }
}

template <int METHOD, bool STOCHASTIC, bool RES, bool OUT>
void encode_range(const EncodeArgs& a) {
  float table[256];
  unit_table(METHOD, a.levels, a.bits, table);
  Packer packer{a.bits, a.codes + a.lo / 8 * a.bits};
  for (int64_t bs = a.lo; bs < a.hi; bs += a.width) {
    const int64_t be = bs + a.width < a.n ? bs + a.width : a.n;
    float s = a.scales_given ? a.scales[bs / a.width] : block_absmax(a.x, RES ? a.res : nullptr, bs, be);
    if (!a.scales_given) a.scales[bs / a.width] = s;
    for (int64_t t0 = bs; t0 < be; t0 += STAGE) {
      const int64_t t1 = t0 + STAGE < be ? t0 + STAGE : be;
      encode_tile<METHOD, STOCHASTIC, RES, OUT>(a, table, s, t0, t1, packer.tail());
      packer.commit(t1 - t0, t1 == a.hi);
    }
  }
}

template <int METHOD, bool STOCHASTIC>
void encode_dispatch(const EncodeArgs& a) {
  const bool out = a.sent || a.res_out;
  if (a.res) {
    out ? encode_range<METHOD, STOCHASTIC, true, true>(a) : encode_range<METHOD, STOCHASTIC, true, false>(a);
  } else {
    out ? encode_range<METHOD, STOCHASTIC, false, true>(a) : encode_range<METHOD, STOCHASTIC, false, false>(a);
  }
}

}  // namespace

extern "C" {

// Encode elements [lo, hi) of x (+ res when not null): scales of its blocks (computed as max |v|, or
// read when scales_given), packed codes into `codes` (the whole message's codes: element i's code
// at bit i * bits), and when not null sent[i] (the decoded value) and res_out[i] = v - sent[i].
// res_out may alias res or x (each element is read before it is written, in one thread).
void dgc_quant_encode(const float* x, const float* res, float* res_out, float* sent, float* scales,
                      int scales_given, uint8_t* codes, int64_t n, int64_t width, int64_t lo,
                      int64_t hi, int method, int levels, int bits, int stochastic, uint32_t k0,
                      uint32_t k1) {
  EncodeArgs a{x, res, res_out, sent, scales, scales_given != 0, codes, n, width, lo, hi, levels, bits,
               k0, k1};
  if (method == INT8) {
    stochastic ? encode_dispatch<INT8, true>(a) : encode_dispatch<INT8, false>(a);
  } else if (method == TERNGRAD) {
    stochastic ? encode_dispatch<TERNGRAD, true>(a) : encode_dispatch<TERNGRAD, false>(a);
  } else {
    stochastic ? encode_dispatch<QSGD, true>(a) : encode_dispatch<QSGD, false>(a);
  }
}

// Decode elements [lo, hi): out[i] = value of code i * its block's scale (NaN where the scale is
// not finite); accumulate != 0 adds into out instead.
void dgc_quant_decode(const uint8_t* codes, const float* scales, float* out, int64_t n,
                      int64_t width, int64_t lo, int64_t hi, int method, int levels, int bits,
                      int accumulate) {
  float table[256];
  unit_table(method, levels, bits, table);
  Unpacker unpacker{bits, codes + lo / 8 * bits, hi - lo};
  for (int64_t bs = lo; bs < hi; bs += width) {
    const int64_t be = bs + width < n ? bs + width : n;
    const float s = scales[bs / width];
    const float sc = std::isfinite(s) ? s : NAN;
    for (int64_t t0 = bs; t0 < be; t0 += STAGE) {
      const int64_t t1 = t0 + STAGE < be ? t0 + STAGE : be;
      const uint8_t* c = unpacker.next(t1 - t0);
      if (accumulate) {
        for (int64_t i = t0; i < t1; ++i) out[i] += table[c[i - t0]] * sc;
      } else {
        for (int64_t i = t0; i < t1; ++i) out[i] = table[c[i - t0]] * sc;
      }
    }
  }
}

}  // extern "C"
