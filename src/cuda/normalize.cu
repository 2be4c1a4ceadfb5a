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

void normalize(Stream stream, const NormalizeArgs& a) {
  if (!a.g.has_elements()) return;
  with_form(a, [&](const auto& k) {
    using K = decltype(k);
    const int vec = a.g.vec();
    with_kernel_types<NormalizeTypes>("normalize", vec, a.x_dtype, a.y_dtype, a.compute, [&](auto t, auto u, auto c) {
      using T = decltype(t);
      using Y = decltype(u);
      using C = decltype(c);
      constexpr int VEC = vec_of<T>();
      using R = Reader<T, VEC>;
      using Wr = Writer<Y, VEC>;
      launch_family(stream, "normalize", k, false, 0, [](auto) {
        if constexpr (over_rows<K>()) return &rows_normalize_kernel<R, Wr, C>;
        else return &cells_normalize_kernel<R, Wr, C>;
      }, reader<T, VEC>(a.x, a.x_dtype), writer<Y, VEC>(a.y, a.y_dtype), k);
    });
  });
}

}  // namespace cuda
}  // namespace distgn
