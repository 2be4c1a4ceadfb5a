#include "cpu/half_rows.hpp"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace distgn {

bool half_rows_in_hardware() {
#if defined(__F16C__)
  return true;
#else
  return false;
#endif
}

void widen_row(const half_t* src, float* dst, int64_t n) {
  int64_t j = 0;
#if defined(__F16C__)
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
#endif
  for (; j < n; ++j) dst[j] = to_float(src[j]);
}

void narrow_row(const float* src, half_t* dst, int64_t n) {
  int64_t j = 0;
#if defined(__F16C__)
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; j < n; ++j) dst[j] = to_half(src[j]);
}

}  // namespace distgn
