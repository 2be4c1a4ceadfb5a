// Half-precision storage types and their conversions, shared by the CPU and
// CUDA backends (hence __host__ __device__), so CPU tests cover the exact bit
// patterns the GPU kernels produce.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DISTGN_HD __host__ __device__ __forceinline__
#else
#define DISTGN_HD inline
#endif

namespace distgn {

// IEEE binary16, stored as its bits.
struct half_t {
  uint16_t bits;
};
// bfloat16: the top 16 bits of a binary32.
struct bfloat16_t {
  uint16_t bits;
};

DISTGN_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

DISTGN_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

DISTGN_HD float to_float(bfloat16_t h) { return bits_float(uint32_t(h.bits) << 16); }

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
DISTGN_HD bfloat16_t to_bfloat16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{uint16_t((u >> 16) | 0x0040u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bfloat16_t{uint16_t(u >> 16)};
}

DISTGN_HD float to_float(half_t h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // Subnormal (or zero): mantissa * 2^-24 is exact in binary32.
  const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
  return bits_float(sign | float_bits(magnitude));
}

// Round to nearest, ties to even, overflow to inf; NaN stays a (quiet) NaN.
DISTGN_HD half_t to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};
  if (a >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};  // rounds past 65504
  if (a < 0x38800000u) {
    // Below the smallest normal: the binary32 addition rounds a * 2^24 to the
    // nearest integer (ties to even), which is the subnormal mantissa.
    const float scaled = bits_float(a) + 0.5f;  // 0.5 = 2^-1 = 2^-25 * 2^24
    return half_t{uint16_t(sign | (float_bits(scaled) - 0x3f000000u))};
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits.
  uint32_t r = a - 0x38000000u;
  r += 0xfffu + ((r >> 13) & 1u);
  return half_t{uint16_t(sign | (r >> 13))};
}

// Loads and stores of any storage type through float (or double for f64).
DISTGN_HD float load_float(const float* p, int64_t i) { return p[i]; }
DISTGN_HD float load_float(const half_t* p, int64_t i) { return to_float(p[i]); }
DISTGN_HD float load_float(const bfloat16_t* p, int64_t i) { return to_float(p[i]); }

DISTGN_HD void store_from_float(float* p, int64_t i, float v) { p[i] = v; }
DISTGN_HD void store_from_float(half_t* p, int64_t i, float v) { p[i] = to_half(v); }
DISTGN_HD void store_from_float(bfloat16_t* p, int64_t i, float v) { p[i] = to_bfloat16(v); }
DISTGN_HD void store_from_float(double* p, int64_t i, float v) { p[i] = v; }

}  // namespace distgn
