#include "cpu/stream_rows.hpp"

#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace distgn {

bool stream_rows_in_hardware() {
#if defined(__x86_64__)
  return true;
#else
  return false;
#endif
}

void stream_row(const float* src, float* dst, int64_t n) {
#if defined(__x86_64__)
#if defined(__AVX512F__)
  constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
  constexpr int64_t kLanes = 8;
#else
  constexpr int64_t kLanes = 4;
#endif
  // Streaming stores want dst aligned to their width: plain stores up to there.
  int64_t j = 0;
  while (j < n && reinterpret_cast<uintptr_t>(dst + j) % (kLanes * sizeof(float)) != 0) {
    dst[j] = src[j];
    ++j;
  }
  for (; j + kLanes <= n; j += kLanes) {
#if defined(__AVX512F__)
    _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
#elif defined(__AVX__)
    _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
#else
    _mm_stream_ps(dst + j, _mm_loadu_ps(src + j));
#endif
  }
  for (; j < n; ++j) dst[j] = src[j];
#else
  std::memcpy(dst, src, size_t(n) * sizeof(float));
#endif
}

void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

}  // namespace distgn
