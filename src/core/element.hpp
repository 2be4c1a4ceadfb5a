// One element of an array of any storage dtype, read or written as a double:
// for the small per-channel and per-cell arrays handled on the host
// (parameters, initializers, test data), not for kernels.
#pragma once

#include <cstdint>

#include "core/half.hpp"
#include "distgn/tensor.hpp"

namespace distgn {

inline double load_element(DType dtype, const void* data, int64_t i) {
  switch (dtype) {
    case DType::f64: return static_cast<const double*>(data)[i];
    case DType::f32: return static_cast<const float*>(data)[i];
    case DType::f16: return to_float(static_cast<const half_t*>(data)[i]);
    case DType::bf16: return to_float(static_cast<const bfloat16_t*>(data)[i]);
  }
  return 0;
}

// Rounds to the dtype (to nearest, ties to even).
inline void store_element(DType dtype, void* data, int64_t i, double v) {
  switch (dtype) {
    case DType::f64: static_cast<double*>(data)[i] = v; break;
    case DType::f32: static_cast<float*>(data)[i] = float(v); break;
    case DType::f16: static_cast<half_t*>(data)[i] = to_half(float(v)); break;
    case DType::bf16: static_cast<bfloat16_t*>(data)[i] = to_bfloat16(float(v)); break;
  }
}

}  // namespace distgn
