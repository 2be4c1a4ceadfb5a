// Statistics kernels: dispatch on the input dtype (typed and vectorised for
// every dtype, or generic with vec 1) and on the mask.
#include "cuda/kernels.cuh"

namespace distgn {
namespace cuda {
namespace {

template <class R>
void launch_rows_stats(Stream stream, R x, const RowsStatsArgs& a) {
  const size_t shared = size_t(3 * a.g.tile_cols + (a.mask ? a.g.slots : 0)) * sizeof(double);
  launch_kernel(stream, "rows_stats", a.g.blocks(), a.g.block_threads(), shared,
                a.mask ? &rows_stats_kernel<R, true> : &rows_stats_kernel<R, false>, x, a);
}

template <class R>
void launch_cells_stats(Stream stream, R x, const CellsStatsArgs& a) {
  launch_kernel(stream, "cells_stats", a.g.blocks(), a.g.block_threads(), 0,
                a.mask ? &cells_stats_kernel<R, true> : &cells_stats_kernel<R, false>, x, a);
}

// Statistics read x alone (their sums are in x's wide type): typed for
// every storage type, dispatched with x's dtype twice and float compute.
struct StatsTypes {
  template <class T, class U, class C>
  static constexpr bool typed() {
    return std::is_same_v<T, U> && std::is_same_v<C, float>;
  }
};

}  // namespace

void rows_stats(Stream stream, const RowsStatsArgs& a) {
  with_kernel_types<StatsTypes>("statistics", a.g.vec, a.x_dtype, a.x_dtype, DType::f32, [&](auto t, auto, auto) {
    using T = decltype(t);
    launch_rows_stats(stream, reader<T, vec_of<T>()>(a.x, a.x_dtype), a);
  });
}

void cells_stats(Stream stream, const CellsStatsArgs& a) {
  with_kernel_types<StatsTypes>("statistics", a.g.vec, a.x_dtype, a.x_dtype, DType::f32, [&](auto t, auto, auto) {
    using T = decltype(t);
    launch_cells_stats(stream, reader<T, vec_of<T>()>(a.x, a.x_dtype), a);
  });
}

}  // namespace cuda
}  // namespace distgn
