// Statistics kernels: dispatch on the form, the input dtype (typed and
// vectorised for every dtype, or generic with vec 1) and the mask.
#include "cuda/kernels.cuh"

namespace distgn {
namespace cuda {
namespace {

// Statistics read x alone (their sums are in x's wide type): typed for
// every storage type, dispatched with x's dtype twice and float compute.
struct StatsTypes {
  template <class T, class U, class C>
  static constexpr bool typed() {
    return std::is_same_v<T, U> && std::is_same_v<C, float>;
  }
};

}  // namespace

void stats(Stream stream, const StatsArgs& a) {
  with_form(a, [&](const auto& k) {
    using K = decltype(k);
    size_t shared = 0;
    if constexpr (over_rows<K>()) shared = size_t(3 * k.g.tile_cols + (a.mask ? k.g.slots : 0)) * sizeof(double);
    with_kernel_types<StatsTypes>("statistics", a.g.vec(), a.x_dtype, a.x_dtype, DType::f32, [&](auto t, auto, auto) {
      using T = decltype(t);
      using R = Reader<T, vec_of<T>()>;
      launch_family(stream, "statistics", k, a.mask != nullptr, shared, [](auto masked) {
        if constexpr (over_rows<K>()) return &rows_stats_kernel<R, decltype(masked)::value>;
        else return &cells_stats_kernel<R, decltype(masked)::value>;
      }, reader<T, vec_of<T>()>(a.x, a.x_dtype), k);
    });
  });
}

}  // namespace cuda
}  // namespace distgn
