// From a runtime dtype to a C++ type, for the backends' kernel dispatch:
// f(T{}) with T the storage type (float, double, half_t, bfloat16_t), or the
// compute type (double for f64, float otherwise; semantics §6).
#pragma once

#include "core/half.hpp"
#include "distgn/tensor.hpp"

namespace distgn {

template <class F>
void with_storage_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(float{}); break;
    case DType::f64: f(double{}); break;
    case DType::f16: f(half_t{}); break;
    case DType::bf16: f(bfloat16_t{}); break;
  }
}

template <class F>
void with_compute_type(DType dtype, F&& f) {
  if (dtype == DType::f64) f(double{});
  else f(float{});
}

}  // namespace distgn
