// Normalisation kernels: y = (x - mean) * (rstd * scale) + bias. Typed and
// vectorised for float32/float16/bfloat16 in and out with float32
// arithmetic, and float64 throughout; every other combination generic.
#include "cuda/kernels.cuh"

namespace distgn {
namespace cuda {
namespace {

struct NormalizeTypes {
  template <class T, class Y, class C>
  static constexpr bool typed() {
    if constexpr (std::is_same_v<C, float>) return !std::is_same_v<T, double> && !std::is_same_v<Y, double>;
    else return std::is_same_v<T, double> && std::is_same_v<Y, double>;
  }
};

}  // namespace

bool normalize_has_typed(DType x, DType y, DType compute) { return has_typed<NormalizeTypes>(x, y, compute); }

void rows_normalize(Stream stream, const RowsNormalizeArgs& a) {
  if (a.g.rows == 0) return;
  with_kernel_types<NormalizeTypes>("normalize", a.g.vec, a.x_dtype, a.y_dtype, a.compute, [&](auto t, auto u, auto c) {
    using T = decltype(t);
    using Y = decltype(u);
    using C = decltype(c);
    constexpr int VEC = vec_of<T>();
    launch_kernel(stream, "rows_normalize", a.g.blocks(), a.g.block_threads(), 0,
                  &rows_normalize_kernel<Reader<T, VEC>, Writer<Y, VEC>, C>, reader<T, VEC>(a.x, a.x_dtype),
                  writer<Y, VEC>(a.y, a.y_dtype), a);
  });
}

void cells_normalize(Stream stream, const CellsNormalizeArgs& a) {
  if (a.g.inner == 0) return;
  with_kernel_types<NormalizeTypes>("normalize", a.g.vec, a.x_dtype, a.y_dtype, a.compute, [&](auto t, auto u, auto c) {
    using T = decltype(t);
    using Y = decltype(u);
    using C = decltype(c);
    constexpr int VEC = vec_of<T>();
    launch_kernel(stream, "cells_normalize", a.g.blocks(), a.g.block_threads(), 0,
                  &cells_normalize_kernel<Reader<T, VEC>, Writer<Y, VEC>, C>, reader<T, VEC>(a.x, a.x_dtype),
                  writer<Y, VEC>(a.y, a.y_dtype), a);
  });
}

}  // namespace cuda
}  // namespace distgn
