// The arithmetic of one cell's statistics, shared by every backend and by the
// merge across ranks: partial moments, Chan's merge, and semantics §4/§6's
// finalisation into mean and rstd.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/half.hpp"
#include "distgn/tensor.hpp"

namespace distgn {

// Count, mean and sum of squared deviations (M2) of some valid positions of
// a cell. count == 0 means no position (mean and m2 are then 0).
struct CellMoments {
  double count;
  double mean;
  double m2;
};

// Moments from sums of (x - shift) and (x - shift)^2. The shift is a value of
// the data, so the sums cancel only at the scale of the spread, not of the
// mean: this is what keeps |mean|/std = 1e4 accurate in one pass.
DISTGN_HD CellMoments moments_from_shifted_sums(double count, double shift, double sum,
                                               double sum_squares) {
  if (count == 0) return CellMoments{0, 0, 0};
  const double offset = sum / count;
  return CellMoments{count, shift + offset, sum_squares - sum * offset};
}

// Chan et al.'s pairwise merge; exact for any sizes, order-dependent only in
// rounding (callers merge in a fixed order so every rank gets the same bits).
DISTGN_HD CellMoments merge_moments(CellMoments a, CellMoments b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  const double count = a.count + b.count;
  const double delta = b.mean - a.mean;
  const double weight_b = b.count / count;
  return CellMoments{count, a.mean + delta * weight_b,
                     a.m2 + b.m2 + delta * delta * (a.count * weight_b)};
}

// Rounds a value to a stats dtype, keeping it in a double.
DISTGN_HD double round_to(DType dtype, double v) {
  switch (dtype) {
    case DType::f64: return v;
    case DType::f32: return double(float(v));
    case DType::f16: return double(to_float(to_half(float(v))));
    case DType::bf16: return double(to_float(to_bfloat16(float(v))));
  }
  return v;
}

// semantics §4 and §6's parameters of the finalisation.
struct FinalizeParams {
  double epsilon = 0;
  bool fast_variance = true;
  DType stats_dtype = DType::f32;
};

// What normalisation and backward use for one cell.
struct CellStats {
  double mean;            // in the stats dtype
  double rstd;            // rsqrt(var + epsilon) in the stats dtype
  bool variance_clamped;  // fast variance hit max(0, .): var gets no gradient
};

// semantics §4 and §6. An empty cell (all masked) gives NaN, as 0/0 does in Flax.
// With a half stats dtype (force_float32_reductions off) the fast variance is
// Flax's formula evaluated in that dtype, mu2 - mu^2 with each term rounded,
// so its cancellation is reproduced rather than silently improved.
DISTGN_HD CellStats finalize_moments(CellMoments m, double epsilon, bool fast_variance,
                                     DType stats_dtype) {
  const double nan = std::nan("");
  const double mean = m.count == 0 ? nan : round_to(stats_dtype, m.mean);
  double var = m.count == 0 ? nan : m.m2 / m.count;
  const bool half = stats_dtype == DType::f16 || stats_dtype == DType::bf16;
  if (fast_variance && half) {
    const double mu2 = round_to(stats_dtype, var + m.mean * m.mean);
    var = mu2 - round_to(stats_dtype, mean * mean);
  }
  bool clamped = false;
  if (fast_variance && var < 0) {  // max(0, var); NaN passes through
    var = 0;
    clamped = true;
  }
  var = round_to(stats_dtype, var);
  double rstd;
  if (stats_dtype == DType::f64) {
    rstd = 1.0 / std::sqrt(var + epsilon);
  } else {
    const float eps = float(round_to(stats_dtype, epsilon));
    const double shifted = round_to(stats_dtype, double(float(var) + eps));
    rstd = round_to(stats_dtype, 1.0f / std::sqrt(float(shifted)));
  }
  return CellStats{mean, rstd, clamped};
}

// semantics §9's per-cell terms of dx, from the cell's sums over its whole group,
// A = sum(g) and B = sum(g * xhat) with g = dy * scale: a = A / n, and
// b = B / n except where the fast variance was clamped (max(0, .) hit: the
// variance then has no gradient, so b = 0).
struct CellTerms {
  double a;
  double b;
};
DISTGN_HD CellTerms cell_terms(double sum_g, double sum_g_xhat, double count, bool variance_clamped) {
  return CellTerms{sum_g / count, variance_clamped ? 0.0 : sum_g_xhat / count};
}

}  // namespace distgn
