// Rows of float16 to float and back, for the CPU kernels' staging of
// float16 data (cpu_backend.cpp). Where the library is built for a target
// with the F16C instructions these use them (16 values at a time with
// AVX-512, 8 with F16C alone); otherwise core/half.hpp's
// portable conversions. Both round the same way (IEEE round to nearest
// even; a NaN stays a quiet NaN with its leading payload bits).
#pragma once

#include <cstdint>

#include "core/half.hpp"

namespace distgn {

// Whether this build converts with the F16C instructions.
bool half_rows_in_hardware();

// dst[i] = float(src[i]) for i < n.
void widen_row(const half_t* src, float* dst, int64_t n);

// dst[i] = float16(src[i]) for i < n, rounded to nearest even.
void narrow_row(const float* src, half_t* dst, int64_t n);

}  // namespace distgn
