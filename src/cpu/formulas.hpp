// The per-element arithmetic of the CPU kernels, each formula written once
// (semantics §6 for the forward, §9 for the backward), and the per-cell and
// per-channel values it takes. The kernels widen x and dy to the compute
// type C before they call these; a formula is generic in its first operand
// so that a kernel may pass lane vectors of C (GCC vector extensions
// broadcast the scalar operands). Included only by cpu_backend.cpp and the
// kernel headers it includes.
#pragma once

#include "distgn/tensor.hpp"

// Internal linkage, like the rest of cpu_backend.cpp, the one file that
// includes this: GCC inlines the kernels there as when they were one file.
namespace distgn::cpu {
namespace {

// Per-cell statistics and per-channel parameters the elementwise kernels
// apply, host arrays.
struct Coefficients {
  DType compute_dtype;  // f32 or f64: the arithmetic of semantics §6 and §9
  const double* mean;   // per cell, in the stats dtype
  const double* rstd;   // per cell
  const double* scale;  // per channel, or null (use_scale = false)
  const double* bias;   // per channel, or null (use_bias = false)
};

// xhat = (x - mean) * rstd.
template <class V, class C>
inline V xhat_of(V x, C mean, C rstd) {
  return (x - mean) * rstd;
}

// y = (x - mean) * mul + bias, mul = rstd * scale (the forward).
template <class V, class C>
inline V normalized(V x, C mean, C mul, C bias) {
  return (x - mean) * mul + bias;
}

// dx = rstd * (g - (a + xhat * b)), g = dy * scale, with a cell's terms a
// and b (semantics §9); `stat_term` is a + xhat * b, or 0 at a masked
// position.
template <class C>
inline C stat_term_of(C xhat, C a, C b) {
  return a + xhat * b;
}
template <class C>
inline C input_grad_of(C rstd, C g, C stat_term) {
  return rstd * (g - stat_term);
}

// The same dx with the per-cell factors folded into per-column coefficients
// (channel_rows, RowCoefficients): dx = dy * mul + ((x - mean) *
// centered_coef + offset), centered_coef = -rstd * (rstd * b), offset =
// -rstd * a, still centring x first (expanding x * r^2 b - mean * r^2 b
// cancels badly when rstd is large); `folded_term` is the second
// summand, or 0 at a masked position.
template <class C>
inline C folded_term_of(C x, C mean, C centered_coef, C offset) {
  return (x - mean) * centered_coef + offset;
}
template <class C>
inline C folded_input_grad_of(C dy, C mul, C folded_term) {
  return dy * mul + folded_term;
}

}  // namespace
}  // namespace distgn::cpu
