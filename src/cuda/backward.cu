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

// f(x's type tag, x reader, dy reader, compute tag) for the backward kernels.
template <class F>
void with_backward_readers(const BackwardInputs& in, int vec, const char* what, F&& f) {
  with_kernel_types<BackwardTypes>(what, vec, in.x_dtype, in.dy_dtype, in.compute, [&](auto t, auto d, auto c) {
    using T = decltype(t);
    using D = decltype(d);
    constexpr int VEC = vec_of<T>();
    f(t, reader<T, VEC>(in.x, in.x_dtype), reader<D, VEC>(in.dy, in.dy_dtype), c);
  });
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

void sums(Stream stream, const SumsArgs& a) {
  with_form(a, [&](const auto& k) {
    using K = decltype(k);
    size_t shared = 0;
    if constexpr (over_rows<K>()) shared = size_t(2 * k.g.tile_cols) * sizeof(double);
    with_backward_readers(a.in, a.g.vec(), "backward sums", [&](auto, auto x, auto dy, auto c) {
      using R = decltype(x);
      using RD = decltype(dy);
      using C = decltype(c);
      launch_family(stream, "backward sums", k, false, shared, [](auto) {
        if constexpr (over_rows<K>()) return &rows_sums_kernel<R, RD, C>;
        else return &cells_sums_kernel<R, RD, C>;
      }, x, dy, k);
    });
  });
}

void channel_sums(Stream stream, const SumsArgs& a, double* channel_sums, bool accumulate) {
  const int64_t channels = a.in.c.channels;
  if (channels == 0) return;
  const int64_t blocks = ceil_div(channels, kChannelWarps);
  if (a.g.channel_rows)
    launch_kernel(stream, "channel sums", blocks, kChannelWarps * kWarp, 0, &rows_channel_kernel, a.g.rows, channels,
                  a.columns, channel_sums, accumulate);
  else
    launch_kernel(stream, "channel sums", blocks, kChannelWarps * kWarp, 0, &cells_channel_kernel, a.g.cells, a.first,
                  a.in.c.groups, channels, a.partials, channel_sums, accumulate);
}

void input_grad(Stream stream, const GradArgs& a) {
  if (!a.g.has_elements()) return;
  with_form(a, [&](const auto& k) {
    using K = decltype(k);
    with_backward_readers(a.in, a.g.vec(), "input gradient", [&](auto t, auto x, auto dy, auto c) {
      using R = decltype(x);
      using RD = decltype(dy);
      using C = decltype(c);
      const auto dx = writer<decltype(t), R::kVec>(a.dx, a.in.x_dtype);
      using Wr = decltype(dx);
      launch_family(stream, "input gradient", k, a.mask != nullptr, 0, [](auto masked) {
        if constexpr (over_rows<K>()) return &rows_grad_kernel<R, RD, Wr, C, decltype(masked)::value>;
        else return &cells_grad_kernel<R, RD, Wr, C, decltype(masked)::value>;
      }, x, dy, dx, k.g, k.first, static_cast<const GradFields&>(k));
    });
  });
}

}  // namespace cuda
}  // namespace distgn
