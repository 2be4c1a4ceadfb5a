// The CPU kernels of the contiguous_cells form: x is [cells][S][inner], each
// cell one contiguous run of elements, one run of `inner` elements per
// channel. Statistics, normalisation, backward sums and dx; chunked by
// chunks.hpp, formulas in formulas.hpp, constants in tuning.hpp. Included
// only by cpu_backend.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "core/backend.hpp"
#include "core/cell_stats.hpp"
#include "cpu/chunks.hpp"
#include "cpu/formulas.hpp"
#include "cpu/staging.hpp"
#include "cpu/tuning.hpp"

// Internal linkage, like the rest of cpu_backend.cpp, the one file that
// includes this: GCC inlines the kernels there as when they were one file.
namespace distgn::cpu {
namespace {

// The first valid, finite value among `count` elements `stride` apart
// starting at `first` (0 if none): the shift of a chunk's sums.
template <class T>
double first_valid(const T* x, const uint8_t* mask, int64_t first, int64_t count, int64_t stride) {
  for (int64_t i = 0, p = first; i < count; ++i, p += stride) {
    if (mask && !mask[p]) continue;
    const double v = widen(x[p]);
    if (std::isfinite(v)) return v;
  }
  return 0.0;
}

// Sums over a run in 64-byte lane vectors (GCC vector extensions: one
// AVX-512 register or two AVX2 ones) added up by halving shuffles at the
// end. GCC's `omp simd reduction` ends instead in a serial chain of scalar
// adds through the stack, which took 40% of the time on 256-element runs.
typedef float FloatLanes __attribute__((vector_size(64)));
typedef double DoubleLanes __attribute__((vector_size(64)));
template <class A>
using Lanes = std::conditional_t<std::is_same_v<A, float>, FloatLanes, DoubleLanes>;

inline float lane_total(FloatLanes v) {
  typedef float Half __attribute__((vector_size(32)));
  typedef float Quarter __attribute__((vector_size(16)));
  const Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}
inline double lane_total(DoubleLanes v) {
  typedef double Half __attribute__((vector_size(32)));
  const Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (h[0] + h[2]) + (h[1] + h[3]);
}

// Elements [0, kLanes) of p widened to A, as one vector. Built from whole
// vectors: filling the lanes one by one let GCC split bfloat16 lanes into
// two halves stored and reloaded through the stack (bfloat16 statistics
// measured 2x slower than float32 on cache-resident data).
template <class A, class T>
inline Lanes<A> load_lanes(const T* p) {
  constexpr int kLanes = int(64 / sizeof(A));
  Lanes<A> v;
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<T, bfloat16_t> && std::is_same_v<A, float>) {
    typedef uint16_t Bits16 __attribute__((vector_size(32)));
    typedef uint32_t Bits32 __attribute__((vector_size(64)));
    Bits16 h;
    std::memcpy(&h, p, sizeof h);
    const Bits32 bits = __builtin_convertvector(h, Bits32) << 16;  // bfloat16 is float's top half
    std::memcpy(&v, &bits, sizeof v);
  } else if constexpr (std::is_same_v<T, float> && std::is_same_v<A, double>) {
    typedef float Floats __attribute__((vector_size(32)));
    Floats f;
    std::memcpy(&f, p, sizeof f);
    v = __builtin_convertvector(f, Lanes<A>);
  } else {
    for (int l = 0; l < kLanes; ++l) v[l] = A(widen(p[l]));
  }
  return v;
}

// (sum of first, sum of second) of f(u[e], v[e]) = {first, second} over
// e in [0, n), u and v widened to A. f takes and returns lane vectors of A
// for the body and scalars for the tail (GCC vector arithmetic broadcasts
// scalar operands, so one generic lambda serves both).
template <class A, class U, class V, class F>
inline std::pair<A, A> sum_pairs(int64_t n, const U* u, const V* v, F&& f) {
  constexpr int kLanes = int(64 / sizeof(A));
  Lanes<A> first = {}, second = {};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    const auto [a, b] = f(load_lanes<A>(u + e), load_lanes<A>(v + e));
    first += a;
    second += b;
  }
  A total_first = lane_total(first), total_second = lane_total(second);
  for (; e < n; ++e) {
    const auto [a, b] = f(A(widen(u[e])), A(widen(v[e])));
    total_first += a;
    total_second += b;
  }
  return {total_first, total_second};
}

// Elements [0, n) of a run in blocks of kRunBlock: f(first, last).
template <class F>
inline void for_run_blocks(int64_t n, F&& f) {
  for (int64_t e = 0; e < n; e += kRunBlock) f(e, std::min(n, e + kRunBlock));
}

// Calls f(channel, first, last) for each run of one channel within
// elements [e0, e1) of a cell.
template <class F>
void for_channel_runs(const Plan& p, int64_t cell, int64_t e0, int64_t e1, F&& f) {
  const int64_t inner = p.inner, group = cell % p.num_groups;
  for (int64_t e = e0; e < e1;) {
    const int64_t s = e / inner, run_end = std::min(e1, (s + 1) * inner);
    f(group * p.group_size + s, e, run_end);
    e = run_end;
  }
}

template <class T, class A>
void stats_contiguous(Scratch& scratch, const KernelInputs& in, CellRange cells, CellMoments* moments) {
  const Plan& p = *in.plan;
  const int64_t length = p.cell_elements;
  const Chunking ch = chunking(p, cells);
  CellMoments* chunk_moments = scratch.chunk_moments(size_t(ch.count));
  const T* x = static_cast<const T*>(in.x);
  scratch.reserve_threads();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < ch.count; ++k) {
    const int64_t cell = cells.begin + k / ch.per_group;
    const int64_t e0 = (k % ch.per_group) * ch.step, e1 = std::min(length, e0 + ch.step);
    const int64_t base = cell * length;
    const double shift = first_valid(x, in.mask, base + e0, e1 - e0, 1);
    double sum = 0, sum_sq = 0, count = double(e1 - e0);
    const T* xs = x + base + e0;
    const int64_t n = e1 - e0;
    if (in.mask) {
      count = 0;
      const uint8_t* m = in.mask + base + e0;
#pragma omp simd reduction(+ : sum, sum_sq, count)
      for (int64_t e = 0; e < n; ++e) {
        const double d = m[e] ? double(widen(xs[e])) - shift : 0.0;
        sum += d;
        sum_sq += d * d;
        count += m[e] ? 1.0 : 0.0;
      }
    } else {
      const A shift_a = A(shift);  // a value of x: exact in A
      float* stage = scratch.thread_stage(size_t(kRunBlock));
      for_run_blocks(n, [&](int64_t first, int64_t last) {
        const auto* xb = staged_input(xs + first, last - first, stage);
        const auto [s, q] = sum_pairs<A>(last - first, xb, xb, [&](auto xe, auto) {
          const auto d = xe - shift_a;
          return std::pair(d, d * d);
        });
        sum += double(s);
        sum_sq += double(q);
      });
    }
    chunk_moments[k] = moments_from_shifted_sums(count, shift, sum, sum_sq);
  }
  for (int64_t i = 0; i < cells.size(); ++i) {
    CellMoments m{0, 0, 0};
    for (int64_t c = 0; c < ch.per_group; ++c)
      m = merge_moments(m, chunk_moments[i * ch.per_group + c]);
    moments[cells.begin + i] = m;
  }
}

template <class T, class Y, class C>
void normalize_contiguous(Scratch& scratch, const KernelInputs& in, CellRange cells, const Coefficients& coef,
                          Y* y) {
  const Plan& p = *in.plan;
  const int64_t length = p.cell_elements;
  const Chunking ch = chunking(p, cells);
  const T* x = static_cast<const T*>(in.x);
  scratch.reserve_threads();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < ch.count; ++k) {
    const int64_t cell = cells.begin + k / ch.per_group;
    const int64_t e0 = (k % ch.per_group) * ch.step, e1 = std::min(length, e0 + ch.step);
    const int64_t base = cell * length;
    const C mean = C(coef.mean[cell]), r = C(coef.rstd[cell]);
    float* stage = scratch.thread_stage(size_t(2 * kRunBlock));
    for_channel_runs(p, cell, e0, e1, [&](int64_t c, int64_t first, int64_t last) {
      const C mul = coef.scale ? r * C(coef.scale[c]) : r;
      const C bias = coef.bias ? C(coef.bias[c]) : C(0);
      for_run_blocks(last - first, [&](int64_t b0, int64_t b1) {
        const auto* xs = staged_input(x + base + first + b0, b1 - b0, stage);
        auto* ys = staged_output(y + base + first + b0, stage + kRunBlock);
#pragma omp simd
        for (int64_t e = 0; e < b1 - b0; ++e) ys[e] = narrow<staged_t<Y>>(normalized(C(widen(xs[e])), mean, mul, bias));
        commit_output(ys, y + base + first + b0, b1 - b0);
      });
    });
  }
}

template <class T, class D, class C>
void backward_sums_contiguous(Scratch& scratch, const KernelInputs& in, const D* dy, CellRange cells,
                              const Coefficients& coef, double* cell_sums, double* channel_sums) {
  const Plan& p = *in.plan;
  const int64_t length = p.cell_elements, S = p.group_size;
  const Chunking ch = chunking(p, cells);
  // Per chunk: A, B, then sum dy and sum dy*xhat per channel of its group.
  const int64_t stride = 2 + 2 * S;
  double* chunk_sums = scratch.chunk_sums(size_t(ch.count * stride));
  const T* x = static_cast<const T*>(in.x);
  scratch.reserve_threads();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < ch.count; ++k) {
    const int64_t cell = cells.begin + k / ch.per_group;
    const int64_t e0 = (k % ch.per_group) * ch.step, e1 = std::min(length, e0 + ch.step);
    const int64_t base = cell * length, group = cell % p.num_groups;
    const C mean = C(coef.mean[cell]), r = C(coef.rstd[cell]);
    double* out = chunk_sums + k * stride;
    std::fill(out, out + stride, 0.0);
    float* stage = scratch.thread_stage(size_t(2 * kRunBlock));
    for_channel_runs(p, cell, e0, e1, [&](int64_t c, int64_t first, int64_t last) {
      double sum_dy = 0, sum_dy_xhat = 0;
      for_run_blocks(last - first, [&](int64_t b0, int64_t b1) {
        const auto* xs = staged_input(x + base + first + b0, b1 - b0, stage);
        const auto* dys = staged_input(dy + base + first + b0, b1 - b0, stage + kRunBlock);
        const auto [g_sum, p_sum] = sum_pairs<C>(b1 - b0, dys, xs, [&](auto g, auto xe) {
          return std::pair(g, g * xhat_of(xe, mean, r));
        });
        sum_dy += double(g_sum);
        sum_dy_xhat += double(p_sum);
      });
      const double scale = coef.scale ? double(C(coef.scale[c])) : 1.0;
      out[0] += scale * sum_dy;
      out[1] += scale * sum_dy_xhat;
      out[2 + (c - group * S)] += sum_dy;
      out[2 + S + (c - group * S)] += sum_dy_xhat;
    });
  }
  std::fill(cell_sums + 2 * cells.begin, cell_sums + 2 * cells.end, 0.0);
  for (int64_t k = 0; k < ch.count; ++k) {
    const double* part = chunk_sums + k * stride;
    const int64_t cell = cells.begin + k / ch.per_group, group = cell % p.num_groups;
    cell_sums[2 * cell] += part[0];
    cell_sums[2 * cell + 1] += part[1];
    for (int64_t s = 0; s < S; ++s) {
      channel_sums[group * S + s] += part[2 + s];
      channel_sums[p.channels + group * S + s] += part[2 + S + s];
    }
  }
}

template <class T, class D, class C>
void input_grad_contiguous(Scratch& scratch, const KernelInputs& in, const D* dy, CellRange cells,
                           const Coefficients& coef, const double* cell_terms, T* dx) {
  const Plan& p = *in.plan;
  const int64_t length = p.cell_elements;
  const Chunking ch = chunking(p, cells);
  const T* x = static_cast<const T*>(in.x);
  scratch.reserve_threads();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < ch.count; ++k) {
    const int64_t cell = cells.begin + k / ch.per_group;
    const int64_t e0 = (k % ch.per_group) * ch.step, e1 = std::min(length, e0 + ch.step);
    const int64_t base = cell * length;
    const C mean = C(coef.mean[cell]), r = C(coef.rstd[cell]);
    const C a = C(cell_terms[2 * cell]), b = C(cell_terms[2 * cell + 1]);
    float* stage = scratch.thread_stage(size_t(3 * kRunBlock));
    using Out = staged_t<T>;
    for_channel_runs(p, cell, e0, e1, [&](int64_t c, int64_t first, int64_t last) {
      const C scale = coef.scale ? C(coef.scale[c]) : C(1);
      for_run_blocks(last - first, [&](int64_t b0, int64_t b1) {
        const int64_t at = base + first + b0, n = b1 - b0;
        const auto* xs = staged_input(x + at, n, stage);
        const auto* dys = staged_input(dy + at, n, stage + kRunBlock);
        auto* dxs = staged_output(dx + at, stage + 2 * kRunBlock);
        if (in.mask) {
          const uint8_t* m = in.mask + at;
#pragma omp simd
          for (int64_t e = 0; e < n; ++e) {
            const C xhat = xhat_of(C(widen(xs[e])), mean, r);
            const C g = C(widen(dys[e])) * scale;
            dxs[e] = narrow<Out>(input_grad_of(r, g, m[e] ? stat_term_of(xhat, a, b) : C(0)));
          }
        } else {
#pragma omp simd
          for (int64_t e = 0; e < n; ++e) {
            const C xhat = xhat_of(C(widen(xs[e])), mean, r);
            const C g = C(widen(dys[e])) * scale;
            dxs[e] = narrow<Out>(input_grad_of(r, g, stat_term_of(xhat, a, b)));
          }
        }
        commit_output(dxs, dx + at, n);
      });
    });
  }
}

}  // namespace
}  // namespace distgn::cpu
