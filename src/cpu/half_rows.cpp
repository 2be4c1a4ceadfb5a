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

// With AVX-512, 16 values per instruction first: the 8-wide conversions
// alone left NCHW 16x64x56x56 float16 statistics at 365 us per call, no
// faster than float32's with twice the bytes; 16-wide, 265 us (Intel Xeon
// model 207, docs/performance.md). The zero-masked forms with every lane
// set are the plain conversions; GCC 12 warns of an uninitialised operand in
// the unmasked ones.
void widen_row(const half_t* src, float* dst, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(dst + j,
                     _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
#endif
#if defined(__F16C__)
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
#endif
  for (; j < n; ++j) dst[j] = to_float(src[j]);
}

void narrow_row(const float* src, half_t* dst, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        _mm512_maskz_cvtps_ph(0xffff, _mm512_loadu_ps(src + j),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
#if defined(__F16C__)
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; j < n; ++j) dst[j] = to_half(src[j]);
}

}  // namespace distgn
