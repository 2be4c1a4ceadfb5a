// Host arrays for the tests (core, comm, cpu, cuda): an owned dense array of
// any storage dtype, seeded random data and masks, N-d indexing, the
// numpy.array_split shards of the distributed tests, and the comparisons the
// tests assert with, semantics §8's tolerance among them. Elements are read and
// written through core/half.hpp's conversions (which the Flax golden tests
// pin), never through the library's own element or kernel code.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "distgn/array_split.hpp"
#include "core/half.hpp"
#include "distgn/tensor.hpp"

namespace distgn_test {

using distgn::DType;
using distgn::Layout;
using distgn::Shape;
using distgn::TensorView;

// ---- storage ------------------------------------------------------------------

inline double get_element(DType dtype, const void* data, int64_t i) {
  switch (dtype) {
    case DType::f64: return static_cast<const double*>(data)[i];
    case DType::f32: return static_cast<const float*>(data)[i];
    case DType::f16: return distgn::to_float(static_cast<const distgn::half_t*>(data)[i]);
    case DType::bf16: return distgn::to_float(static_cast<const distgn::bfloat16_t*>(data)[i]);
  }
  return std::numeric_limits<double>::quiet_NaN();
}

// Rounds to the dtype (to nearest, ties to even; halves through float).
inline void set_element(DType dtype, void* data, int64_t i, double v) {
  switch (dtype) {
    case DType::f64: static_cast<double*>(data)[i] = v; break;
    case DType::f32: static_cast<float*>(data)[i] = float(v); break;
    case DType::f16: static_cast<distgn::half_t*>(data)[i] = distgn::to_half(float(v)); break;
    case DType::bf16: static_cast<distgn::bfloat16_t*>(data)[i] = distgn::to_bfloat16(float(v)); break;
  }
}

// v as stored in `dtype`, read back.
inline double rounded(DType dtype, double v) {
  double out;
  set_element(dtype, &out, 0, v);  // fits: every dtype is at most 8 bytes
  return get_element(dtype, &out, 0);
}

// An owned dense C-ordered array of any storage dtype, in host memory.
struct Array {
  Shape shape;
  DType dtype = DType::f32;
  Layout layout = Layout::channels_last;
  std::vector<uint8_t> bytes;

  Array() = default;
  // Zeros.
  Array(Shape s, DType t, Layout l = Layout::channels_last)
      : shape(std::move(s)), dtype(t), layout(l),
        bytes(size_t(distgn::element_count(shape) * distgn::dtype_size(t))) {}
  // The values, rounded to the dtype; there must be one per element.
  Array(Shape s, DType t, Layout l, const std::vector<double>& values) : Array(std::move(s), t, l) {
    REQUIRE(int64_t(values.size()) == size());
    for (int64_t i = 0; i < size(); ++i) set(i, values[size_t(i)]);
  }
  // Bytes already in the dtype (from a file, a device, a slice).
  static Array from_bytes(Shape s, DType t, std::vector<uint8_t> b, Layout l = Layout::channels_last) {
    Array a;
    a.shape = std::move(s);
    a.dtype = t;
    a.layout = l;
    a.bytes = std::move(b);
    return a;
  }

  int64_t size() const { return distgn::element_count(shape); }
  double get(int64_t i) const { return get_element(dtype, bytes.data(), i); }
  void set(int64_t i, double v) { set_element(dtype, bytes.data(), i, v); }
  std::vector<double> values() const {
    std::vector<double> v(static_cast<size_t>(size()));
    for (int64_t i = 0; i < size(); ++i) v[size_t(i)] = get(i);
    return v;
  }
  // A host view for the layer, in the array's layout or another one. Const:
  // the layer takes its inputs through the same view type as its outputs.
  TensorView view(Layout l) const { return TensorView{const_cast<uint8_t*>(bytes.data()), shape, dtype, l}; }
  TensorView view() const { return view(layout); }
  void fill_bytes(uint8_t b) { std::fill(bytes.begin(), bytes.end(), b); }
};

inline std::vector<double> view_values(const TensorView& v) {
  std::vector<double> out(size_t(distgn::element_count(v.shape)));
  for (size_t i = 0; i < out.size(); ++i) out[i] = get_element(v.dtype, v.data, int64_t(i));
  return out;
}

// ---- random data ----------------------------------------------------------------

// Normal(mean, stddev) values from mt19937_64(seed), rounded to `dtype`.
inline std::vector<double> random_values(int64_t n, uint64_t seed, double mean = 0.0, double stddev = 1.0,
                                         DType dtype = DType::f64) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(mean, stddev);
  std::vector<double> v(static_cast<size_t>(n));
  for (double& x : v) x = rounded(dtype, normal(rng));
  return v;
}

// An array of random_values.
inline Array random_array(const Shape& shape, DType dtype, uint64_t seed, double mean = 0.5, double stddev = 1.0,
                          Layout layout = Layout::channels_last) {
  Array a(shape, dtype, layout);
  const std::vector<double> v = random_values(a.size(), seed, mean, stddev, dtype);
  for (int64_t i = 0; i < a.size(); ++i) a.set(i, v[size_t(i)]);
  return a;
}

// 0/1 mask bytes, each valid with probability `valid_fraction`.
inline std::vector<uint8_t> random_mask(int64_t n, uint64_t seed, double valid_fraction = 0.7) {
  std::mt19937_64 rng(seed);
  std::bernoulli_distribution valid(valid_fraction);
  std::vector<uint8_t> m(static_cast<size_t>(n));
  for (auto& b : m) b = valid(rng) ? 1 : 0;
  return m;
}

// Mask bytes drawn from `rng`: 0 where rng() % one_in == 0 (about one in
// `one_in`), `valid` (any nonzero is valid) elsewhere.
template <class Rng>
std::vector<uint8_t> random_mask_one_in(int64_t n, Rng& rng, unsigned one_in, uint8_t valid = 1) {
  std::vector<uint8_t> m(static_cast<size_t>(n));
  for (auto& b : m) b = rng() % one_in != 0 ? valid : 0;
  return m;
}

// ---- N-d indexing ---------------------------------------------------------------

inline std::vector<int64_t> unravel(int64_t flat, const Shape& shape) {
  std::vector<int64_t> index(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    index[d] = flat % shape[d];
    flat /= shape[d];
  }
  return index;
}

inline int64_t ravel(const std::vector<int64_t>& index, const Shape& shape) {
  int64_t flat = 0;
  for (size_t d = 0; d < shape.size(); ++d) flat = flat * shape[d] + index[d];
  return flat;
}

// Transposes an array by an axis permutation: out axis d is in axis perm[d].
inline std::vector<double> transpose(const std::vector<double>& v, const Shape& shape, const std::vector<int>& perm,
                                     Shape* out_shape = nullptr) {
  Shape to(shape.size());
  for (size_t d = 0; d < perm.size(); ++d) to[d] = shape[size_t(perm[d])];
  std::vector<double> out(v.size());
  for (int64_t e = 0; e < int64_t(v.size()); ++e) {
    const auto from = unravel(e, to);
    std::vector<int64_t> src(shape.size());
    for (size_t d = 0; d < perm.size(); ++d) src[size_t(perm[d])] = from[d];
    out[size_t(e)] = v[size_t(ravel(src, shape))];
  }
  if (out_shape) *out_shape = to;
  return out;
}

// A numpy-broadcast mask expanded to x's shape (trailing axes aligned).
inline std::vector<uint8_t> expand_mask(const std::vector<uint8_t>& mask, const Shape& mask_shape,
                                        const Shape& x_shape) {
  const size_t lead = x_shape.size() - mask_shape.size();
  std::vector<uint8_t> out(size_t(distgn::element_count(x_shape)));
  for (int64_t e = 0; e < int64_t(out.size()); ++e) {
    const auto index = unravel(e, x_shape);
    std::vector<int64_t> m(mask_shape.size());
    for (size_t d = 0; d < mask_shape.size(); ++d) m[d] = mask_shape[d] == 1 ? 0 : index[lead + d];
    out[size_t(e)] = mask[size_t(ravel(m, mask_shape))] ? 1 : 0;
  }
  return out;
}

// ---- shards (the distributed tests; cut like distgn::array_split_range) ----------------


// [begin, end) along `axis` of C-ordered `bytes` of `shape`, elements of
// `element_size` bytes (1 for a mask).
inline std::vector<uint8_t> slice_bytes(const std::vector<uint8_t>& bytes, const Shape& shape, int axis,
                                        int64_t begin, int64_t end, int element_size) {
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < axis; ++d) outer *= shape[size_t(d)];
  for (size_t d = size_t(axis) + 1; d < shape.size(); ++d) inner *= shape[d];
  const int64_t extent = shape[size_t(axis)];
  std::vector<uint8_t> out;
  for (int64_t o = 0; o < outer; ++o)
    out.insert(out.end(), bytes.begin() + (o * extent + begin) * inner * element_size,
               bytes.begin() + (o * extent + end) * inner * element_size);
  return out;
}

// Part r of `parts` of `a` along `axis` (numpy.array_split).
inline Array shard(const Array& a, int axis, int parts, int r) {
  const auto [begin, end] = distgn::array_split_range(a.shape[size_t(axis)], parts, r);
  Shape shape = a.shape;
  shape[size_t(axis)] = end - begin;
  return Array::from_bytes(shape, a.dtype,
                           slice_bytes(a.bytes, a.shape, axis, begin, end, distgn::dtype_size(a.dtype)), a.layout);
}

// ---- comparisons ---------------------------------------------------------------------

// The largest |a - b| over positions where neither is NaN; infinity where
// only one of them is NaN.
template <class T>
double max_difference(const T* a, const T* b, size_t n) {
  double worst = 0;
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(a[i]) != std::isnan(b[i])) return INFINITY;
    if (!std::isnan(a[i])) worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])));
  }
  return worst;
}

inline double max_difference(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  return max_difference(a.data(), b.data(), a.size());
}

// How many bytes differ (-1 when the sizes differ). Compared this way so a
// failure reports a number, not megabytes of expansion.
inline int64_t differing_bytes(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  if (a.size() != b.size()) return -1;
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += a[i] != b[i];
  return n;
}

// The largest finite |v|.
inline double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v)
    if (std::isfinite(x)) m = std::max(m, std::fabs(x));
  return m;
}

// The dtype of fewer bytes.
inline DType narrower(DType a, DType b) { return distgn::dtype_size(a) <= distgn::dtype_size(b) ? a : b; }

// |got - want| <= atol + rtol * |want| everywhere (NaN only where NaN is wanted).
inline void check_close(const std::vector<double>& got, const std::vector<double>& want, double atol, double rtol,
                        const std::string& what) {
  REQUIRE(got.size() == want.size());
  int64_t bad = 0, worst_at = -1;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool ok =
        std::isnan(want[i]) ? std::isnan(got[i]) : std::abs(got[i] - want[i]) <= atol + rtol * std::abs(want[i]);
    const double err = std::isnan(got[i]) || std::isnan(want[i]) ? INFINITY : std::abs(got[i] - want[i]);
    if (!ok) ++bad;
    if (!ok && (worst_at < 0 || err > worst)) worst = err, worst_at = int64_t(i);
  }
  INFO(what << ": " << bad << " of " << got.size() << " outside " << atol << " + " << rtol
            << " * |want|; worst at " << worst_at << ": got " << (worst_at >= 0 ? got[size_t(worst_at)] : 0)
            << " want " << (worst_at >= 0 ? want[size_t(worst_at)] : 0));
  CHECK(bad == 0);
}

// One unit in the last place of a finite |v| stored as `dtype` (the spacing
// of the subnormals at and below the smallest normal, 0 included).
inline double ulp(DType t, double v) {
  const int mantissa_bits = t == DType::f16 ? 10 : t == DType::bf16 ? 7 : t == DType::f32 ? 23 : 52;
  const int min_exponent = t == DType::f16 ? -14 : t == DType::bf16 || t == DType::f32 ? -126 : -1022;
  if (v == 0) return std::ldexp(1.0, min_exponent - mantissa_bits);
  int exponent = 0;
  std::frexp(std::fabs(v), &exponent);
  return std::ldexp(1.0, std::max(exponent - 1, min_exponent) - mantissa_bits);
}

// semantics §8 for outputs: float32/64 within 1e-4 (absolute, relative beyond
// unit scale); half dtypes within one ulp of the output dtype plus 1e-3
// relative. `narrowest` is the narrowest dtype the computation rounds to.
inline double tolerance(DType narrowest, double reference, double ulps = 1.0) {
  if (narrowest == DType::f16 || narrowest == DType::bf16)
    return ulps * ulp(narrowest, reference) + 1e-3 * std::fabs(reference);
  return 1e-4 * std::max(1.0, std::fabs(reference));
}

struct Comparison {
  int64_t mismatches = 0;
  int64_t first_bad = -1;
  double worst_error = 0;  // over finite pairs
};

// NaN must match NaN; everything else within tolerance(narrowest, m, ulps)
// at the magnitude m = max(|ref|, floor): a floor at the operands' scale for
// values that come out of a cancellation (gradients, half arithmetic).
inline Comparison compare(const std::vector<double>& got, const std::vector<double>& want, DType narrowest,
                          double floor = 0.0, double ulps = 1.0) {
  Comparison c;
  for (size_t i = 0; i < want.size(); ++i) {
    const bool nan_got = std::isnan(got[i]), nan_want = std::isnan(want[i]);
    bool ok;
    if (nan_got || nan_want) {
      ok = nan_got && nan_want;
    } else {
      const double error = std::fabs(got[i] - want[i]);
      c.worst_error = std::max(c.worst_error, error);
      ok = error <= tolerance(narrowest, std::max(std::fabs(want[i]), floor), ulps);
    }
    if (!ok && c.mismatches++ == 0) c.first_bad = int64_t(i);
  }
  return c;
}

// semantics §8 for half outputs (compare's rule at unit ulps, no floor), as a
// Catch check reporting the first mismatch.
inline void check_half_outputs(const std::vector<double>& got, const std::vector<double>& want, DType dtype,
                               const std::string& what) {
  REQUIRE(got.size() == want.size());
  const Comparison c = compare(got, want, dtype);
  const int64_t first = c.first_bad;
  INFO(what << ": " << c.mismatches << " of " << got.size() << " beyond 1 ulp + 1e-3 rel; first at " << first
            << ": got " << (first >= 0 ? got[size_t(first)] : 0) << " want " << (first >= 0 ? want[size_t(first)] : 0));
  CHECK(c.mismatches == 0);
}

}  // namespace distgn_test
