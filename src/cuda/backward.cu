// Backward kernels: the fused pass of sums over x and dy, the channel sums,
// and the input gradient. Typed and vectorised where dy has x's dtype (or
// float32) with float32 arithmetic, or everything is float64; every other
// combination generic.
#include "cuda/kernels.cuh"

namespace distgn {
namespace cuda {
namespace {

struct BackwardTypes {
  template <class T, class D, class C>
  static constexpr bool typed() {
    if constexpr (std::is_same_v<C, float>)
      return !std::is_same_v<T, double> && (std::is_same_v<D, T> || std::is_same_v<D, float>);
    else
      return std::is_same_v<T, double> && std::is_same_v<D, double>;
  }
};

// f(x tag, dy tag, compute tag); AnyDType tags for the generic kernels.
template <class F>
void with_backward_types(const BackwardInputs& in, int vec, const char* what, F&& f) {
  with_kernel_types<BackwardTypes>(what, vec, in.x_dtype, in.dy_dtype, in.compute, f);
}

constexpr int kChannelWarps = 8;

__device__ __forceinline__ void finish_channel(int64_t c, int64_t channels, double dy, double dyx,
                                               double* channel_sums, bool accumulate) {
  if (accumulate) {
    dy += channel_sums[c];
    dyx += channel_sums[channels + c];
  }
  channel_sums[c] = dy;
  channel_sums[channels + c] = dyx;
}

// Warp per channel: channel_sums[c] (+)= sum dy, [C + c] (+)= sum dy * xhat.
__global__ void rows_channel_kernel(RowsGeometry g, int64_t channels, const SumPair* block_cols,
                                    double* channel_sums, bool accumulate) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (c >= channels) return;
  const int64_t n = g.channel_terms(channels);
  double dy = 0, dyx = 0;
  for (int64_t i = lane; i < n; i += kWarp) {
    const SumPair p = block_cols[g.channel_term(channels, c, i)];
    dy += p.first;
    dyx += p.second;
  }
  dy = warp_sum(dy);
  dyx = warp_sum(dyx);
  if (lane == 0) finish_channel(c, channels, dy, dyx, channel_sums, accumulate);
}

// Warp per channel c = g * S + s: the items of segment s of every cell of group g.
__global__ void cells_channel_kernel(CellsGeometry g, int64_t first_cell, int64_t groups, int64_t channels,
                                     const SumPair* items, double* channel_sums, bool accumulate) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (c >= channels) return;
  const int64_t group = c / g.segments, s = c % g.segments;
  const int64_t n = g.channel_terms(first_cell, groups, group);
  double dy = 0, dyx = 0;
  for (int64_t i = lane; i < n; i += kWarp) {
    const SumPair p = items[g.channel_term(first_cell, groups, group, s, i)];
    dy += p.first;
    dyx += p.second;
  }
  dy = warp_sum(dy);
  dyx = warp_sum(dyx);
  if (lane == 0) finish_channel(c, channels, dy, dyx, channel_sums, accumulate);
}

}  // namespace

bool backward_has_typed(DType x, DType dy, DType compute) { return has_typed<BackwardTypes>(x, dy, compute); }

void rows_sums(Stream stream, const RowsSumsArgs& a) {
  const size_t shared = size_t(2 * a.g.tile_cols) * sizeof(double);
  with_backward_types(a.in, a.g.vec, "backward sums", [&](auto t, auto d, auto c) {
    using T = decltype(t);
    using D = decltype(d);
    using C = decltype(c);
    constexpr int VEC = vec_of<T>();
    launch_kernel(stream, "rows_sums", a.g.blocks(), a.g.block_threads(), shared,
                  &rows_sums_kernel<Reader<T, VEC>, Reader<D, VEC>, C>, reader<T, VEC>(a.in.x, a.in.x_dtype),
                  reader<D, VEC>(a.in.dy, a.in.dy_dtype), a);
  });
}

void cells_sums(Stream stream, const CellsSumsArgs& a) {
  with_backward_types(a.in, a.g.vec, "backward sums", [&](auto t, auto d, auto c) {
    using T = decltype(t);
    using D = decltype(d);
    using C = decltype(c);
    constexpr int VEC = vec_of<T>();
    launch_kernel(stream, "cells_sums", a.g.blocks(), a.g.block_threads(), 0,
                  &cells_sums_kernel<Reader<T, VEC>, Reader<D, VEC>, C>, reader<T, VEC>(a.in.x, a.in.x_dtype),
                  reader<D, VEC>(a.in.dy, a.in.dy_dtype), a);
  });
}

void rows_channel_sums(Stream stream, const RowsGeometry& g, int64_t channels, const SumPair* block_cols,
                       double* channel_sums, bool accumulate) {
  if (channels == 0) return;
  launch_kernel(stream, "rows_channel_sums", ceil_div(channels, kChannelWarps), kChannelWarps * kWarp, 0,
                &rows_channel_kernel, g, channels, block_cols, channel_sums, accumulate);
}

void cells_channel_sums(Stream stream, const CellsGeometry& g, int64_t first_cell, int64_t groups,
                        int64_t channels, const SumPair* items, double* channel_sums, bool accumulate) {
  if (channels == 0) return;
  launch_kernel(stream, "cells_channel_sums", ceil_div(channels, kChannelWarps), kChannelWarps * kWarp, 0,
                &cells_channel_kernel, g, first_cell, groups, channels, items, channel_sums, accumulate);
}

void rows_input_grad(Stream stream, const RowsGeometry& g, int64_t first_slab, const GradArgs& a) {
  if (g.rows == 0) return;
  with_backward_types(a.in, g.vec, "input gradient", [&](auto t, auto d, auto c) {
    using T = decltype(t);
    using D = decltype(d);
    using C = decltype(c);
    constexpr int VEC = vec_of<T>();
    const auto x = reader<T, VEC>(a.in.x, a.in.x_dtype);
    const auto dy = reader<D, VEC>(a.in.dy, a.in.dy_dtype);
    const auto dx = writer<T, VEC>(a.dx, a.in.x_dtype);
    using R = decltype(x);
    using RD = decltype(dy);
    using Wr = decltype(dx);
    launch_kernel(stream, "rows_input_grad", g.blocks(), g.block_threads(), 0,
                  a.mask ? &rows_grad_kernel<R, RD, Wr, C, true> : &rows_grad_kernel<R, RD, Wr, C, false>, x, dy, dx,
                  g, first_slab, a);
  });
}

void cells_input_grad(Stream stream, const CellsGeometry& g, int64_t first_cell, const GradArgs& a) {
  if (g.inner == 0) return;
  with_backward_types(a.in, g.vec, "input gradient", [&](auto t, auto d, auto c) {
    using T = decltype(t);
    using D = decltype(d);
    using C = decltype(c);
    constexpr int VEC = vec_of<T>();
    const auto x = reader<T, VEC>(a.in.x, a.in.x_dtype);
    const auto dy = reader<D, VEC>(a.in.dy, a.in.dy_dtype);
    const auto dx = writer<T, VEC>(a.dx, a.in.x_dtype);
    using R = decltype(x);
    using RD = decltype(dy);
    using Wr = decltype(dx);
    launch_kernel(stream, "cells_input_grad", g.blocks(), g.block_threads(), 0,
                  a.mask ? &cells_grad_kernel<R, RD, Wr, C, true> : &cells_grad_kernel<R, RD, Wr, C, false>, x, dy,
                  dx, g, first_cell, a);
  });
}

}  // namespace cuda
}  // namespace distgn
