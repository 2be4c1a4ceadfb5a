// Lane vectors of the CPU kernels: 64 bytes (one AVX-512 register or two
// AVX2 ones) as GCC vector extensions, so that one generic lambda computes
// a value on a vector of elements or on one element alone.
#pragma once

#include <cstdint>
#include <type_traits>

namespace distgn {

constexpr uintptr_t kCacheLine = 64;

typedef float FloatLanes __attribute__((vector_size(64)));
typedef double DoubleLanes __attribute__((vector_size(64)));
template <class A>
using Lanes = std::conditional_t<std::is_same_v<A, float>, FloatLanes, DoubleLanes>;

constexpr int64_t kFloatLanes = int64_t(sizeof(FloatLanes) / sizeof(float));

// What a value lambda computes: one element, or a whole lane vector.
using OneLane = std::integral_constant<bool, false>;
using AllLanes = std::integral_constant<bool, true>;
inline constexpr OneLane kOneLane{};
inline constexpr AllLanes kAllLanes{};

inline float lane_total(FloatLanes v) {
  typedef float Half __attribute__((vector_size(32)));
  typedef float Quarter __attribute__((vector_size(16)));
  const Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}
inline double lane_total(DoubleLanes v) {
  typedef double Half __attribute__((vector_size(32)));
  const Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (h[0] + h[2]) + (h[1] + h[3]);
}

}  // namespace distgn
