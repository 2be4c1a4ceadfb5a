// The CPU kernels of the channel_rows form: x is [outer][rows][row_width],
// a row holding cells_per_row cells of group_size channels side by side, so
// the kernels run down columns. Statistics, normalisation, backward sums and
// dx; chunked by chunks.hpp, formulas in formulas.hpp, constants in
// tuning.hpp. Included only by cpu_backend.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

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

// Rows [0, rows) in blocks of kRowBlock, then one at a time: f(first_row,
// std::integral_constant<int64_t, n>) so that each block's row loop unrolls.
template <int64_t kBlock = kRowBlock, class F>
inline void for_row_blocks(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; r + kBlock <= rows; r += kBlock) f(r, std::integral_constant<int64_t, kBlock>{});
  for (; r < rows; ++r) f(r, std::integral_constant<int64_t, 1>{});
}

// Whether the call's input is read from cache (kCacheResidentBytes): then
// all four kernels work in register blocks of kRowBlock rows at every width.
inline bool cache_resident(const Plan& p) {
  return p.num_cells * p.cell_elements * int64_t(dtype_size(p.input_dtype)) <= kCacheResidentBytes;
}

// sum[j] += sum over rows of (x - shift[j]), sum_sq[j] += the squares, for
// `rows` rows of `width` columns starting at x (no mask), in register blocks
// of rows or row by row, both into per-column block sums in A added to the
// double sums every kFlushRows rows. block: 3 * width of scratch in A;
// stage: kRowBlock * width floats.
template <class A, class T>
void accumulate_shifted_columns(const T* x, int64_t rows, int64_t width, const double* shift, A* block,
                                float* stage, double* sum, double* sum_sq, bool register_blocks) {
  A *shift_a = block, *s = block + width, *q = block + 2 * width;
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    shift_a[j] = A(shift[j]);  // a value of x: exact in A
    s[j] = q[j] = 0;
  }
  if (register_blocks) {
    for (int64_t r0 = 0; r0 < rows; r0 += kFlushRows) {
      const int64_t r_end = std::min(rows, r0 + kFlushRows);
      for_row_blocks(r_end - r0, [&](int64_t rb, auto block_rows) {
        const int64_t r = r0 + rb;
        // The hardware prefetchers lag on this pattern (a few rows read side
        // by side); ask for the block kPrefetchBlocks ahead, within the rows.
        const int64_t ahead_row = r + kPrefetchBlocks * kRowBlock;
        const int64_t ahead_bytes = std::min<int64_t>(block_rows, rows - ahead_row) * width * int64_t(sizeof(T));
        const char* ahead = reinterpret_cast<const char*>(x + std::min(ahead_row, rows) * width);
        for (int64_t b = 0; b < ahead_bytes; b += 64) __builtin_prefetch(ahead + b);
        const auto* xb = staged_input(x + r * width, block_rows * width, stage);
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          A bs = 0, bq = 0;
          for (int64_t i = 0; i < block_rows; ++i) {
            const A d = A(widen(xb[i * width + j])) - shift_a[j];
            bs += d;
            bq += d * d;
          }
          s[j] += bs;
          q[j] += bq;
        }
      });
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        sum[j] += double(s[j]);
        sum_sq[j] += double(q[j]);
        s[j] = q[j] = 0;
      }
    }
    return;
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kFlushRows) {
    for (int64_t r = r0; r < std::min(rows, r0 + kFlushRows); ++r) {
      const auto* xr = staged_input(x + r * width, width, stage);
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const A d = A(widen(xr[j])) - shift_a[j];
        s[j] += d;
        q[j] += d * d;
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      sum[j] += double(s[j]);
      sum_sq[j] += double(q[j]);
      s[j] = q[j] = 0;
    }
  }
}

// sum_dy[j] += sum over rows of dy, sum_dy_xhat[j] += sum of dy * xhat with
// xhat = (x - mean[j]) * rstd[j], all in the compute type C: in register
// blocks of kRowBlock rows (cache-resident calls), otherwise row by row into
// per-column block sums whatever the width (kCacheResidentBytes). block: 2 *
// width of scratch in C, stage: 2 * max(kRowBlock, stage_rows_of(width)) *
// width floats.
template <class T, class D, class C>
void accumulate_backward_columns(const T* x, const D* dy, int64_t rows, int64_t width, const C* mean,
                                 const C* rstd, C* block, float* stage, double* sum_dy, double* sum_dy_xhat,
                                 bool register_blocks) {
  if (register_blocks) {
    float* dy_stage = stage + kRowBlock * width;
    for_row_blocks(rows, [&](int64_t r, auto block_rows) {
      const int64_t n = block_rows * width;
      const auto* xb = staged_input(x + r * width, n, stage);
      const auto* dyb = staged_input(dy + r * width, n, dy_stage);
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const C m = mean[j], rs = rstd[j];
        C g_sum = 0, p_sum = 0;
        for (int64_t i = 0; i < block_rows; ++i) {
          const C g = C(widen(dyb[i * width + j]));
          g_sum += g;
          p_sum += g * xhat_of(C(widen(xb[i * width + j])), m, rs);
        }
        sum_dy[j] += double(g_sum);
        sum_dy_xhat[j] += double(p_sum);
      }
    });
    return;
  }
  const int64_t stage_rows = stage_rows_of<T, D>(width);
  float* dy_stage = stage + stage_rows * width;
  C *g_sum = block, *p_sum = block + width;
  std::fill(block, block + 2 * width, C(0));
  const staged_t<T>* xr = nullptr;
  const staged_t<D>* dyr = nullptr;
  for (int64_t r0 = 0; r0 < rows; r0 += kFlushRows) {
    for (int64_t r = r0; r < std::min(rows, r0 + kFlushRows); ++r, xr += width, dyr += width) {
      if ((r - r0) % stage_rows == 0) {
        const int64_t n = std::min({stage_rows, rows - r, r0 + kFlushRows - r}) * width;
        xr = staged_input(x + r * width, n, stage);
        dyr = staged_input(dy + r * width, n, dy_stage);
      }
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const C xhat = xhat_of(C(widen(xr[j])), mean[j], rstd[j]);
        const C g = C(widen(dyr[j]));
        g_sum[j] += g;
        p_sum[j] += g * xhat;
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      sum_dy[j] += double(g_sum[j]);
      sum_dy_xhat[j] += double(p_sum[j]);
      g_sum[j] = p_sum[j] = 0;
    }
  }
}

// The per-column coefficients of `slab` into rc (RowCoefficients); with
// cell_terms, also the folded dx coefficients of formulas.hpp's
// folded_input_grad_of.
template <class C>
void fill_row_coefficients(const Plan& p, const Coefficients& coef, const double* cell_terms, int64_t slab,
                           RowCoefficients<C>& rc) {
  const int64_t width = p.row_width;
  for (auto* v : {&rc.mean, &rc.rstd, &rc.mul, &rc.bias, &rc.scale, &rc.centered_coef, &rc.offset})
    v->resize(size_t(width));
  for (int64_t j = 0; j < width; ++j) {
    const int64_t cell = slab * p.cells_per_row + j / p.group_size, c = j % p.channels;
    const C r = C(coef.rstd[cell]);
    const C scale = coef.scale ? C(coef.scale[c]) : C(1);
    rc.mean[j] = C(coef.mean[cell]);
    rc.rstd[j] = r;
    rc.scale[j] = scale;
    rc.mul[j] = coef.scale ? r * scale : r;
    rc.bias[j] = coef.bias ? C(coef.bias[c]) : C(0);
    if (cell_terms) {
      const C a = C(cell_terms[2 * cell]), b = C(cell_terms[2 * cell + 1]);
      rc.centered_coef[j] = -r * (r * b);
      rc.offset[j] = -r * a;
    }
  }
  rc.slab = slab;
}

// Calls f(k, slab, r0, r1, rc) for every chunk k of `cells` (rows [r0, r1)
// of one slab) over the OpenMP threads; rc holds the slab's per-column
// coefficients, refilled only when a thread moves to another slab.
template <class C, class F>
void for_each_row_chunk(Scratch& scratch, const Plan& p, CellRange cells, const Coefficients& coef,
                        const double* cell_terms, const Chunking& ch, F&& f) {
  scratch.reserve_threads();
  const int64_t first_slab = cells.begin / p.cells_per_row;
#pragma omp parallel
  {
    RowCoefficients<C>& rc = scratch.row_coefficients<C>();
#pragma omp for schedule(static)
    for (int64_t k = 0; k < ch.count; ++k) {
      const int64_t slab = first_slab + k / ch.per_group;
      const int64_t r0 = (k % ch.per_group) * ch.step, r1 = std::min(p.rows, r0 + ch.step);
      if (rc.slab != slab) fill_row_coefficients(p, coef, cell_terms, slab, rc);
      f(k, slab, r0, r1, rc);
    }
  }
}

template <class T, class A>
void stats_rows(Scratch& scratch, const KernelInputs& in, CellRange cells, CellMoments* moments) {
  const Plan& p = *in.plan;
  const int64_t width = p.row_width, per_row = p.cells_per_row, S = p.group_size;
  const Chunking ch = chunking(p, cells);
  const int64_t first_slab = cells.begin / per_row;
  CellMoments* chunk_moments = scratch.chunk_moments(size_t(ch.count * per_row));
  const T* x = static_cast<const T*>(in.x);
  const bool register_blocks = width <= kNarrowRow || cache_resident(p);
  scratch.reserve_threads();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < ch.count; ++k) {
    const int64_t slab = first_slab + k / ch.per_group;
    const int64_t r0 = (k % ch.per_group) * ch.step, r1 = std::min(p.rows, r0 + ch.step);
    const int64_t base = (slab * p.rows + r0) * width;
    double* thread_scratch = scratch.thread_scratch(size_t(4 * width));
    double *shift = thread_scratch, *sum = thread_scratch + width, *sum_sq = sum + width, *count = sum_sq + width;
    for (int64_t q = 0; q < per_row; ++q) {
      // Column-major scan of the group's block: usually the first element.
      double s = 0.0;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t at = (slab * p.rows + r) * width + q * S;
        bool found = false;
        for (int64_t j = 0; j < S && !found; ++j) {
          if (in.mask && !in.mask[at + j]) continue;
          const double v = widen(x[at + j]);
          if (std::isfinite(v)) { s = v; found = true; }
        }
        if (found) break;
      }
      std::fill(shift + q * S, shift + (q + 1) * S, s);
    }
    std::fill(sum, sum + (in.mask ? 3 : 2) * width, 0.0);  // count: masked calls only
    for (int64_t r = r0; in.mask && r < r1; ++r) {
      const T* row = x + base + (r - r0) * width;
      {
        const uint8_t* m = in.mask + base + (r - r0) * width;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const double d = m[j] ? double(widen(row[j])) - shift[j] : 0.0;
          sum[j] += d;
          sum_sq[j] += d * d;
          count[j] += m[j] ? 1.0 : 0.0;
        }
      }
    }
    if (!in.mask)
      accumulate_shifted_columns(x + base, r1 - r0, width, shift, scratch.thread_block_sums<A>(size_t(3 * width)),
                                 scratch.thread_stage(size_t(kRowBlock * width)), sum, sum_sq, register_blocks);
    for (int64_t q = 0; q < per_row; ++q) {
      double n = in.mask ? 0.0 : double((r1 - r0) * S), s1 = 0, s2 = 0;
      for (int64_t j = q * S; j < (q + 1) * S; ++j) {
        s1 += sum[j];
        s2 += sum_sq[j];
        if (in.mask) n += count[j];
      }
      chunk_moments[k * per_row + q] = moments_from_shifted_sums(n, shift[q * S], s1, s2);
    }
  }
  for (int64_t i = 0; i < cells.size(); ++i) {
    const int64_t slab = i / per_row, q = i % per_row;
    CellMoments m{0, 0, 0};
    for (int64_t c = 0; c < ch.per_group; ++c)
      m = merge_moments(m, chunk_moments[(slab * ch.per_group + c) * per_row + q]);
    moments[cells.begin + i] = m;
  }
}

template <class T, class Y, class C>
void normalize_rows(Scratch& scratch, const KernelInputs& in, CellRange cells, const Coefficients& coef, Y* y) {
  const Plan& p = *in.plan;
  const int64_t width = p.row_width;
  const T* x = static_cast<const T*>(in.x);
  const bool stream = streams_output<Y>(p), resident = cache_resident(p);
  for_each_row_chunk<C>(scratch, p, cells, coef, nullptr, chunking(p, cells),
                        [&](int64_t, int64_t slab, int64_t r0, int64_t r1, const RowCoefficients<C>& rc) {
    const C *mean = rc.mean.data(), *mul = rc.mul.data(), *bias = rc.bias.data();
    if (resident) {
      float* stage = scratch.thread_stage(size_t(2 * kRowBlock * width));
      for_row_blocks(r1 - r0, [&](int64_t r, auto block_rows) {
        const int64_t at = (slab * p.rows + r0 + r) * width, n = block_rows * width;
        const auto* xb = staged_input(x + at, n, stage);
        auto* yb = staged_output(y + at, stage + kRowBlock * width);
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const C m = mean[j], u = mul[j], b = bias[j];
          for (int64_t i = 0; i < block_rows; ++i)
            yb[i * width + j] = narrow<staged_t<Y>>(normalized(C(widen(xb[i * width + j])), m, u, b));
        }
        commit_output(yb, y + at, n);
      });
      return;
    }
    float* stage = scratch.thread_stage(size_t(2 * width));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t at = (slab * p.rows + r) * width;
      const auto* xr = staged_input(x + at, width, stage);
      auto* yr = staged_output(y + at, stage + width, stream);
#pragma omp simd
      for (int64_t j = 0; j < width; ++j)
        yr[j] = narrow<staged_t<Y>>(normalized(C(widen(xr[j])), mean[j], mul[j], bias[j]));
      commit_output(yr, y + at, width, stream);
    }
    if (stream) stream_fence();
  });
}

template <class T, class D, class C>
void backward_sums_rows(Scratch& scratch, const KernelInputs& in, const D* dy, CellRange cells,
                        const Coefficients& coef, double* cell_sums, double* channel_sums) {
  const Plan& p = *in.plan;
  const int64_t width = p.row_width, per_row = p.cells_per_row, S = p.group_size;
  const int64_t channels = p.channels;
  const Chunking ch = chunking(p, cells);
  // Per chunk: A and B of its cells, then sum dy and sum dy*xhat per channel.
  const int64_t stride = 2 * per_row + 2 * channels;
  double* chunk_sums = scratch.chunk_sums(size_t(ch.count * stride));
  const T* x = static_cast<const T*>(in.x);
  const bool register_blocks = cache_resident(p);
  for_each_row_chunk<C>(scratch, p, cells, coef, nullptr, ch,
                        [&](int64_t k, int64_t slab, int64_t r0, int64_t r1, const RowCoefficients<C>& rc) {
    double* thread_scratch = scratch.thread_scratch(size_t(2 * width));
    double *sum_dy = thread_scratch, *sum_dy_xhat = thread_scratch + width;
    std::fill(thread_scratch, thread_scratch + 2 * width, 0.0);
    const int64_t at = (slab * p.rows + r0) * width;
    const int64_t stage_rows = std::max(kRowBlock, stage_rows_of<T, D>(width));
    accumulate_backward_columns(x + at, dy + at, r1 - r0, width, rc.mean.data(), rc.rstd.data(),
                                scratch.thread_block_sums<C>(size_t(2 * width)),
                                scratch.thread_stage(size_t(2 * stage_rows * width)), sum_dy, sum_dy_xhat,
                                register_blocks);
    double* out = chunk_sums + k * stride;
    std::fill(out, out + stride, 0.0);
    double* channel_dy = out + 2 * per_row;
    double* channel_dy_xhat = channel_dy + channels;
    for (int64_t q = 0; q < per_row; ++q) {
      // Columns of cell q: channels (q % G) * S + s.
      const int64_t j0 = q * S, c0 = (q % p.num_groups) * S;
      double a = 0, b = 0;
      for (int64_t s = 0; s < S; ++s) {
        const double scale = double(rc.scale[j0 + s]);
        a += scale * sum_dy[j0 + s];
        b += scale * sum_dy_xhat[j0 + s];
        channel_dy[c0 + s] += sum_dy[j0 + s];
        channel_dy_xhat[c0 + s] += sum_dy_xhat[j0 + s];
      }
      out[2 * q] = a;
      out[2 * q + 1] = b;
    }
  });
  std::fill(cell_sums + 2 * cells.begin, cell_sums + 2 * cells.end, 0.0);
  for (int64_t k = 0; k < ch.count; ++k) {
    const double* part = chunk_sums + k * stride;
    double* cell_out = cell_sums + 2 * (cells.begin + (k / ch.per_group) * per_row);
    for (int64_t i = 0; i < 2 * per_row; ++i) cell_out[i] += part[i];
    for (int64_t i = 0; i < 2 * channels; ++i) channel_sums[i] += part[2 * per_row + i];
  }
}

template <class T, class D, class C>
void input_grad_rows(Scratch& scratch, const KernelInputs& in, const D* dy, CellRange cells,
                     const Coefficients& coef, const double* cell_terms, T* dx) {
  const Plan& p = *in.plan;
  const int64_t width = p.row_width;
  const T* x = static_cast<const T*>(in.x);
  const bool resident = cache_resident(p);
  for_each_row_chunk<C>(scratch, p, cells, coef, cell_terms, chunking(p, cells),
                        [&](int64_t, int64_t slab, int64_t r0, int64_t r1, const RowCoefficients<C>& rc) {
    const C *mean = rc.mean.data(), *mul = rc.mul.data();
    const C *centered_coef = rc.centered_coef.data(), *offset = rc.offset.data();
    if (resident && !in.mask) {
      using Out = staged_t<T>;
      const int64_t block = kRowBlock * width;
      float* stage = scratch.thread_stage(size_t(3 * block));
      for_row_blocks(r1 - r0, [&](int64_t r, auto block_rows) {
        const int64_t at = (slab * p.rows + r0 + r) * width, n = block_rows * width;
        const auto* xb = staged_input(x + at, n, stage);
        const auto* dyb = staged_input(dy + at, n, stage + block);
        auto* dxb = staged_output(dx + at, stage + 2 * block);
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const C m = mean[j], u = mul[j], cc = centered_coef[j], off = offset[j];
          for (int64_t i = 0; i < block_rows; ++i)
            dxb[i * width + j] = narrow<Out>(folded_input_grad_of(
                C(widen(dyb[i * width + j])), u, folded_term_of(C(widen(xb[i * width + j])), m, cc, off)));
        }
        commit_output(dxb, dx + at, n);
      });
      return;
    }
    const int64_t stage_rows = stage_rows_of<T, D>(width), block = stage_rows * width;
    float* stage = scratch.thread_stage(size_t(3 * block));
    for (int64_t rb = r0; rb < r1; rb += stage_rows) {
      const int64_t block_at = (slab * p.rows + rb) * width, n = std::min(stage_rows, r1 - rb) * width;
      const auto* xb = staged_input(x + block_at, n, stage);
      const auto* dyb = staged_input(dy + block_at, n, stage + block);
      auto* dxb = staged_output(dx + block_at, stage + 2 * block);
      using Out = staged_t<T>;
      for (int64_t row = 0; row < n; row += width) {
        const auto* xr = xb + row;
        const auto* dyr = dyb + row;
        auto* dxr = dxb + row;
        if (in.mask) {
          const uint8_t* m = in.mask + block_at + row;
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) {
            const C term = m[j] ? folded_term_of(C(widen(xr[j])), mean[j], centered_coef[j], offset[j]) : C(0);
            dxr[j] = narrow<Out>(folded_input_grad_of(C(widen(dyr[j])), mul[j], term));
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < width; ++j)
            dxr[j] = narrow<Out>(folded_input_grad_of(
                C(widen(dyr[j])), mul[j], folded_term_of(C(widen(xr[j])), mean[j], centered_coef[j], offset[j])));
        }
      }
      commit_output(dxb, dx + block_at, n);
    }
  });
}

}  // namespace
}  // namespace distgn::cpu
