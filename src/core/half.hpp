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

// Both directions compute every case and select, without branches, so that
// loops over arrays of halves vectorise on the CPU.
DISTGN_HD float to_float(half_t h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t magnitude = uint32_t(h.bits & 0x7fffu) << 13;
  const uint32_t exponent = magnitude & 0x0f800000u;
  const uint32_t normal = magnitude + 0x38000000u;  // rebias 15 -> 127
  const uint32_t special = normal + 0x38000000u;    // inf, NaN: exponent 255
  // Subnormal (or zero): 2^-14 * (1 + m/1024) - 2^-14 = m * 2^-24, exact.
  const uint32_t subnormal = float_bits(bits_float(normal + 0x00800000u) - bits_float(0x38800000u));
  const uint32_t bits = exponent == 0x0f800000u ? special : exponent == 0 ? subnormal : normal;
  return bits_float(bits | sign);
}

// Round to nearest, ties to even, overflow to inf; NaN stays a (quiet) NaN.
DISTGN_HD half_t to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
  // Below the smallest normal: the binary32 addition rounds a * 2^24 to the
  // nearest integer (ties to even), which is the subnormal mantissa.
  const uint32_t subnormal = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  // Normal: rebias the exponent and round the 13 dropped mantissa bits; a
  // carry past 65504 lands on the inf pattern.
  const uint32_t rebiased = a - 0x38000000u;
  const uint32_t normal = (rebiased + 0xfffu + ((rebiased >> 13) & 1u)) >> 13;
  const uint32_t bits = a > 0x7f800000u   ? nan
                        : a >= 0x47800000u ? 0x7c00u  // 65536 and beyond, inf
                        : a < 0x38800000u  ? subnormal
                                           : normal;
  return half_t{uint16_t(sign | bits)};
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
