// Float outputs written around the caches (non-temporal stores), for kernel
// outputs too large to stay in cache. A normal store first reads each line
// it writes (read for ownership): beside reading x and writing y that is a
// third stream of memory traffic, which a streaming store does not make.
//
// The values go from registers straight to the streaming stores. Computing
// a run into an L1 buffer first and streaming the buffer out afterwards
// (how this was done before) leaves the loads of the next input waiting
// behind each burst of stores: on the Intel Xeon model 167 of
// docs/performance.md, NHWC 16x56x56x64 and NCHW 16x64x56x56 forwards took
// 0.84x and 0.76x the time written from registers (cpu_backend.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/lanes.hpp"

namespace distgn {

// Whether this build has streaming stores (x86-64); elsewhere the stores
// below are plain ones.
constexpr bool stream_rows_in_hardware() {
#if defined(__x86_64__)
  return true;
#else
  return false;
#endif
}

// Elements from p to the next cache line (0 when p starts one), p aligned
// to its type.
template <class T>
inline int64_t elements_to_line(const T* p) {
  return int64_t((kCacheLine - reinterpret_cast<uintptr_t>(p) % kCacheLine) % kCacheLine) / int64_t(sizeof(T));
}

// Writes v to the cache line at p (64-byte aligned) with streaming stores.
inline void stream_lanes(float* p, FloatLanes v) {
#if defined(__x86_64__) && defined(__AVX512F__)
  __m512 r;
  std::memcpy(&r, &v, sizeof r);
  _mm512_stream_ps(p, r);
#elif defined(__x86_64__) && defined(__AVX__)
  __m256 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  _mm256_stream_ps(p, lo);
  _mm256_stream_ps(p + 8, hi);
#elif defined(__x86_64__)
  for (int i = 0; i < 4; ++i) {
    __m128 q;
    std::memcpy(&q, reinterpret_cast<const char*>(&v) + i * sizeof q, sizeof q);
    _mm_stream_ps(p + 4 * i, q);
  }
#else
  std::memcpy(p, &v, sizeof v);
#endif
}

// dst[e] = value(e) for e in [0, n): the cache lines of dst that [0, n)
// covers whole with streaming stores of value(e, kAllLanes) (elements
// [e, e + kFloatLanes) as one FloatLanes), the partial lines at either end
// with plain stores of value(e, kOneLane) (a float). Both forms must give
// the same bits (one generic lambda on lane vectors and scalars does).
template <class F>
inline void stream_elements(float* dst, int64_t n, F&& value) {
  int64_t e = 0;
  for (const int64_t head = std::min(n, elements_to_line(dst)); e < head; ++e) dst[e] = value(e, kOneLane);
  for (; e + kFloatLanes <= n; e += kFloatLanes) stream_lanes(dst + e, value(e, kAllLanes));
  for (; e < n; ++e) dst[e] = value(e, kOneLane);
}

// Orders this thread's streamed stores before its later stores, so that a
// thread that synchronises with it afterwards reads them (SFENCE).
inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

}  // namespace distgn
