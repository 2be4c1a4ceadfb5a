// Statistics kernels: dispatch on the input dtype (typed and vectorised, or
// generic with vec 1) and on the mask.
#include "cuda/cuda_check.hpp"
#include "cuda/kernels.cuh"

namespace distgn {
namespace cuda {
namespace {

template <class R>
void launch_rows_stats(Stream stream, R x, const RowsStatsArgs& a) {
  const unsigned blocks = grid_size(a.g.blocks(), "rows_stats");
  if (blocks == 0) return;
  const size_t shared = size_t(3 * a.g.tile_cols + (a.mask ? a.g.slots : 0)) * sizeof(double);
  if (a.mask)
    rows_stats_kernel<R, true><<<blocks, rows_block_threads(a.g), shared, stream>>>(x, a);
  else
    rows_stats_kernel<R, false><<<blocks, rows_block_threads(a.g), shared, stream>>>(x, a);
  DISTGN_CUDA_CHECK_LAUNCH("rows_stats_kernel");
}

template <class R>
void launch_cells_stats(Stream stream, R x, const CellsStatsArgs& a) {
  const unsigned blocks = grid_size(a.g.blocks(), "cells_stats");
  if (blocks == 0) return;
  const int threads = a.g.warps * kWarp;
  if (a.mask)
    cells_stats_kernel<R, true><<<blocks, threads, 0, stream>>>(x, a);
  else
    cells_stats_kernel<R, false><<<blocks, threads, 0, stream>>>(x, a);
  DISTGN_CUDA_CHECK_LAUNCH("cells_stats_kernel");
}

void bad_vec(int vec, DType dtype) {
  throw Error("CUDA statistics: vector width " + std::to_string(vec) + " does not suit dtype " +
              dtype_name(dtype) + " (1 or " + std::to_string(full_vec(dtype)) + ")");
}

}  // namespace

void rows_stats(Stream stream, const RowsStatsArgs& a) {
  if (a.g.vec == 1) return launch_rows_stats(stream, Reader<AnyDType, 1>{a.x, a.x_dtype}, a);
  with_storage_type(a.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.g.vec != full_vec_of<T>()) bad_vec(a.g.vec, a.x_dtype);
    launch_rows_stats(stream, Reader<T, full_vec_of<T>()>{static_cast<const T*>(a.x)}, a);
  });
}

void cells_stats(Stream stream, const CellsStatsArgs& a) {
  if (a.g.vec == 1) return launch_cells_stats(stream, Reader<AnyDType, 1>{a.x, a.x_dtype}, a);
  with_storage_type(a.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.g.vec != full_vec_of<T>()) bad_vec(a.g.vec, a.x_dtype);
    launch_cells_stats(stream, Reader<T, full_vec_of<T>()>{static_cast<const T*>(a.x)}, a);
  });
}

}  // namespace cuda
}  // namespace distgn
