// The float64 reference of the layer (semantics §1-§6, §9) that the tests hold the
// library to, written with plain loops over a generic N-d index and no code
// shared with the library's plan or kernels:
//  - cell_map: the cell and channel of every element (semantics §1-§3);
//  - two_pass_moments / reference_partial_stats: each cell's count, mean and
//    M2 over its valid elements, two passes in long double (the exact
//    counterpart of the partial stats a backend computes and merges);
//  - reference_forward: mean and rstd rounded to the stats dtype as semantics §5/§6
//    say (what the library's ForwardState holds), and y;
//  - reference_backward: semantics §9's dx, dscale and dbias from those statistics.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "distgn/config.hpp"
#include "distgn/tensor.hpp"
#include "test_arrays.hpp"

namespace distgn_test {

using distgn::GroupNormConfig;

// Which cell and channel every element of an input belongs to.
struct CellMap {
  Shape shape;
  int feature_axis = 0;
  int64_t channels = 0, num_groups = 0, group_size = 0, num_cells = 0;
  std::vector<int64_t> cell, channel;  // per element
};

// semantics §1-§3 directly: the reduced axes (Flax's default when none are
// given), cells row-major over the kept axes, then the group.
inline CellMap cell_map(const GroupNormConfig& config, const Shape& shape, Layout layout) {
  CellMap g;
  g.shape = shape;
  const int rank = int(shape.size());
  g.feature_axis = layout == Layout::channels_last ? rank - 1 : 1;
  g.channels = shape[size_t(g.feature_axis)];
  g.num_groups = config.num_groups ? *config.num_groups : g.channels / *config.group_size;
  g.group_size = g.channels / g.num_groups;
  std::vector<bool> reduced(size_t(rank), false);
  if (config.reduction_axes) {
    for (int64_t a : *config.reduction_axes) reduced[size_t(a < 0 ? a + rank : a)] = true;
  } else {
    // Flax: range(1, ndim - 1) + [feature axis] (so rank 1 reduces axis 0).
    for (int d = 1; d < rank; ++d) reduced[size_t(d)] = true;
    reduced[size_t(g.feature_axis)] = true;
  }
  REQUIRE(reduced[size_t(g.feature_axis)]);
  Shape kept_shape;
  for (int d = 0; d < rank; ++d)
    if (!reduced[size_t(d)]) kept_shape.push_back(shape[size_t(d)]);
  g.num_cells = distgn::element_count(kept_shape) * g.num_groups;
  const int64_t n = distgn::element_count(shape);
  g.cell.resize(size_t(n));
  g.channel.resize(size_t(n));
  for (int64_t e = 0; e < n; ++e) {
    const auto index = unravel(e, shape);
    std::vector<int64_t> kept;
    for (int d = 0; d < rank; ++d)
      if (!reduced[size_t(d)]) kept.push_back(index[size_t(d)]);
    const int64_t c = index[size_t(g.feature_axis)];
    g.channel[size_t(e)] = c;
    g.cell[size_t(e)] = ravel(kept, kept_shape) * g.num_groups + c / g.group_size;
  }
  return g;
}

// semantics §5's stats dtype.
inline DType reference_stats_dtype(const GroupNormConfig& c, DType x_dtype) {
  DType t = c.dtype.value_or(x_dtype);
  if (c.force_float32_reductions && (t == DType::f16 || t == DType::bf16)) t = DType::f32;
  return t;
}

// Count, mean and M2 (sum of squared deviations) of some values.
struct Moments {
  long double count = 0, mean = 0, m2 = 0;
};

// Two passes in long double, in the values' order: no values give count 0
// and a NaN mean (0/0, as in Flax).
inline Moments two_pass_moments(const std::vector<double>& values) {
  Moments m;
  long double sum = 0;
  for (double v : values) sum += v;
  m.count = static_cast<long double>(values.size());
  m.mean = sum / m.count;
  for (double v : values) {
    const long double d = v - m.mean;
    m.m2 += d * d;
  }
  return m;
}

// The moments of every cell over its valid elements (`mask` full-shape, or
// empty for all valid), elements taken in x's order.
inline std::vector<Moments> reference_partial_stats(const CellMap& g, const std::vector<double>& x,
                                                    const std::vector<uint8_t>& mask) {
  std::vector<std::vector<double>> per_cell(size_t(g.num_cells));
  for (size_t e = 0; e < x.size(); ++e)
    if (mask.empty() || mask[e]) per_cell[size_t(g.cell[e])].push_back(x[e]);
  std::vector<Moments> out(per_cell.size());
  for (size_t c = 0; c < per_cell.size(); ++c) out[c] = two_pass_moments(per_cell[c]);
  return out;
}

struct Reference {
  CellMap cells;
  std::vector<double> y, mean, rstd, count;  // mean and rstd in the stats dtype
  std::vector<double> var;                   // unrounded, float64
};

// semantics §4-§6: mean, var and rstd rounded to the stats dtype the way semantics
// §5/§6 say (the library's ForwardState holds the same), then y.
inline Reference reference_forward(const GroupNormConfig& config, const Shape& shape, Layout layout, DType x_dtype,
                                   const std::vector<double>& x,
                                   const std::vector<uint8_t>& mask,  // full shape, or empty
                                   const std::vector<double>& scale, const std::vector<double>& bias) {
  Reference r;
  r.cells = cell_map(config, shape, layout);
  const CellMap& g = r.cells;
  const DType stats = reference_stats_dtype(config, x_dtype);
  const std::vector<Moments> moments = reference_partial_stats(g, x, mask);
  const size_t n = x.size(), cells = size_t(g.num_cells);
  r.count.resize(cells);
  r.mean.resize(cells);
  r.rstd.resize(cells);
  r.var.resize(cells);
  for (size_t c = 0; c < cells; ++c) {
    const Moments& m = moments[c];
    r.count[c] = double(m.count);
    double var = double(m.m2 / m.count);
    r.var[c] = var;
    r.mean[c] = rounded(stats, double(m.mean));
    if (stats == DType::f64) {
      r.rstd[c] = double(1.0L / std::sqrt((long double)var + config.epsilon));
      continue;
    }
    if (config.use_fast_variance && (stats == DType::f16 || stats == DType::bf16)) {
      // semantics §4's fast formula evaluated in the (half) stats dtype:
      // max(0, mean(x^2) - mean(x)^2), every term rounded.
      const double mu2 = rounded(stats, double(m.m2 / m.count + m.mean * m.mean));
      var = std::max(0.0, mu2 - rounded(stats, r.mean[c] * r.mean[c]));
    }
    // r = rsqrt(var + epsilon) in the stats dtype.
    const double sum = rounded(stats, rounded(stats, var) + rounded(stats, config.epsilon));
    r.rstd[c] = rounded(stats, double(1.0L / std::sqrt((long double)sum)));
  }
  r.y.resize(n);
  for (size_t e = 0; e < n; ++e) {
    const size_t c = size_t(g.cell[e]), ch = size_t(g.channel[e]);
    const long double k = (long double)r.rstd[c] * (scale.empty() ? 1.0 : scale[ch]);
    r.y[e] = double((x[e] - (long double)r.mean[c]) * k + (bias.empty() ? 0.0 : bias[ch]));
  }
  return r;
}

struct ReferenceGrad {
  std::vector<double> dx, dscale, dbias;
};

// semantics §9 with the reference's statistics.
inline ReferenceGrad reference_backward(const Reference& ref, const std::vector<double>& x,
                                        const std::vector<double>& dy, const std::vector<uint8_t>& mask,
                                        const std::vector<double>& scale) {
  const CellMap& g = ref.cells;
  const size_t n = x.size(), cells = size_t(g.num_cells);
  std::vector<long double> A(cells, 0), B(cells, 0), dscale(size_t(g.channels), 0), dbias(size_t(g.channels), 0);
  std::vector<long double> xhat(n), gy(n);
  for (size_t e = 0; e < n; ++e) {
    const size_t c = size_t(g.cell[e]), ch = size_t(g.channel[e]);
    xhat[e] = (x[e] - (long double)ref.mean[c]) * ref.rstd[c];
    gy[e] = dy[e] * (long double)(scale.empty() ? 1.0 : scale[ch]);
    A[c] += gy[e];
    B[c] += gy[e] * xhat[e];
    dbias[ch] += dy[e];
    dscale[ch] += dy[e] * xhat[e];
  }
  ReferenceGrad out;
  out.dx.resize(n);
  for (size_t e = 0; e < n; ++e) {
    const size_t c = size_t(g.cell[e]);
    const long double m = mask.empty() || mask[e] ? 1 : 0, cnt = ref.count[c];
    out.dx[e] = double(ref.rstd[c] * (gy[e] - m * A[c] / cnt - m * xhat[e] * B[c] / cnt));
  }
  out.dscale.assign(dscale.begin(), dscale.end());
  out.dbias.assign(dbias.begin(), dbias.end());
  return out;
}

}  // namespace distgn_test
