// Normalisation kernels: y = (x - mean) * (rstd * scale) + bias. Typed and
// vectorised for float32/float16/bfloat16 in and out with float32
// arithmetic, and float64 throughout; every other combination generic.
#include <type_traits>

#include "cuda/cuda_check.hpp"
#include "cuda/kernels.cuh"

namespace distgn {
namespace cuda {
namespace {

template <class T, class Y, class C>
constexpr bool typed_normalize() {
  if constexpr (std::is_same_v<C, float>) return !std::is_same_v<T, double> && !std::is_same_v<Y, double>;
  else return std::is_same_v<T, double> && std::is_same_v<Y, double>;
}

template <class F>
void with_normalize_types(DType x, DType y, DType compute, int vec, F&& f) {
  if (vec == 1) {
    with_compute_type(compute, [&](auto c) { f(AnyDType{}, AnyDType{}, c); });
    return;
  }
  bool launched = false;
  with_storage_type(x, [&](auto t) {
    with_storage_type(y, [&](auto u) {
      with_compute_type(compute, [&](auto c) {
        using T = decltype(t);
        using Y = decltype(u);
        using C = decltype(c);
        if constexpr (typed_normalize<T, Y, C>()) {
          if (vec != full_vec_of<T>())
            throw Error("CUDA normalize: vector width " + std::to_string(vec) + " does not suit " + dtype_name(x));
          f(t, u, c);
          launched = true;
        }
      });
    });
  });
  if (!launched)
    throw Error("CUDA normalize: no vectorised kernel for " + dtype_name(x) + " -> " + dtype_name(y) +
                " (the caller must choose vec 1)");
}

}  // namespace

bool normalize_has_typed(DType x, DType y, DType compute) {
  if (compute == DType::f32) return x != DType::f64 && y != DType::f64;
  return x == DType::f64 && y == DType::f64;
}

void rows_normalize(Stream stream, const RowsNormalizeArgs& a) {
  const unsigned blocks = grid_size(a.g.blocks(), "rows_normalize");
  if (blocks == 0 || a.g.rows == 0) return;
  with_normalize_types(a.x_dtype, a.y_dtype, a.compute, a.g.vec, [&](auto t, auto u, auto c) {
    using T = decltype(t);
    using Y = decltype(u);
    using C = decltype(c);
    constexpr int VEC = vec_of<T>();
    rows_normalize_kernel<Reader<T, VEC>, Writer<Y, VEC>, C><<<blocks, rows_block_threads(a.g), 0, stream>>>(
        reader<T, VEC>(a.x, a.x_dtype), writer<Y, VEC>(a.y, a.y_dtype), a);
    DISTGN_CUDA_CHECK_LAUNCH("rows_normalize_kernel");
  });
}

void cells_normalize(Stream stream, const CellsNormalizeArgs& a) {
  const unsigned blocks = grid_size(a.g.blocks(), "cells_normalize");
  if (blocks == 0 || a.g.inner == 0) return;
  with_normalize_types(a.x_dtype, a.y_dtype, a.compute, a.g.vec, [&](auto t, auto u, auto c) {
    using T = decltype(t);
    using Y = decltype(u);
    using C = decltype(c);
    constexpr int VEC = vec_of<T>();
    cells_normalize_kernel<Reader<T, VEC>, Writer<Y, VEC>, C><<<blocks, a.g.warps * kWarp, 0, stream>>>(
        reader<T, VEC>(a.x, a.x_dtype), writer<Y, VEC>(a.y, a.y_dtype), a);
    DISTGN_CUDA_CHECK_LAUNCH("cells_normalize_kernel");
  });
}

}  // namespace cuda
}  // namespace distgn
