// How the CPU kernels of both forms cut a cell range into fixed-size chunks,
// so that results do not depend on the thread count, and the scratch the
// chunks reuse. Included only by
// cpu_backend.cpp (through the kernel headers).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "core/backend.hpp"
#include "core/cell_stats.hpp"
#include "core/equal_parts.hpp"
#include "cpu/tuning.hpp"

// Internal linkage, like the rest of cpu_backend.cpp, the one file that
// includes this: GCC inlines the kernels there as when they were one file.
namespace distgn::cpu {
namespace {

// Per-column coefficients of one slab (channel_rows): mean, rstd, scale,
// mul = rstd * scale and bias for the forward; for dx also the folded
// centered_coef and offset (formulas.hpp, folded_input_grad_of). Each
// thread keeps those of its current slab (rows_kernels.hpp fills them).
template <class C>
struct RowCoefficients {
  int64_t slab = -1;
  std::vector<C> mean, rstd, mul, bias, scale, centered_coef, offset;
};

// Scratch each thread reuses across calls, so steady-state calls allocate
// nothing, and the per-chunk partial results of a call.
class Scratch {
 public:
  // Sizes the per-thread scratch for the coming parallel region and marks
  // every thread's row coefficients stale (the coefficients change per call).
  void reserve_threads() {
    const size_t threads = size_t(omp_get_max_threads());
    for (auto* buffers : {&scratch_, &block_f64_}) buffers->resize(std::max(buffers->size(), threads));
    for (auto* buffers : {&block_f32_, &stage_}) buffers->resize(std::max(buffers->size(), threads));
    if (rows_f32_.size() < threads) rows_f32_.resize(threads);
    if (rows_f64_.size() < threads) rows_f64_.resize(threads);
    for (auto& rc : rows_f32_) rc.slab = -1;
    for (auto& rc : rows_f64_) rc.slab = -1;
  }

  // The calling thread's buffers, at least `count` long.
  double* thread_scratch(size_t count) { return thread_buffer(scratch_, count); }
  // Block sums of the wide-row reductions, in their type.
  template <class A>
  A* thread_block_sums(size_t count) {
    if constexpr (std::is_same_v<A, float>) return thread_buffer(block_f32_, count);
    else return thread_buffer(block_f64_, count);
  }
  // Float scratch for staged float16 rows (staging.hpp).
  float* thread_stage(size_t count) { return thread_buffer(stage_, count); }
  // The calling thread's row coefficients.
  template <class C>
  RowCoefficients<C>& row_coefficients() {
    if constexpr (std::is_same_v<C, float>) return rows_f32_[size_t(omp_get_thread_num())];
    else return rows_f64_[size_t(omp_get_thread_num())];
  }

  // One array for the whole call, at least `count` long: the chunks'
  // moments (statistics) or sums (backward), which the calling thread folds
  // after the parallel loop.
  CellMoments* chunk_moments(size_t count) { return chunk_buffer(moments_, count); }
  double* chunk_sums(size_t count) { return chunk_buffer(sums_, count); }

 private:
  // The calling thread's buffer of `per_thread`, at least count long and
  // aligned to kScratchAlignment.
  template <class V>
  static V* thread_buffer(std::vector<std::vector<V>>& per_thread, size_t count) {
    auto& buffer = per_thread[size_t(omp_get_thread_num())];
    constexpr size_t kPad = kScratchAlignment / sizeof(V);
    if (buffer.size() < count + kPad) buffer.resize(count + kPad);
    const uintptr_t at = reinterpret_cast<uintptr_t>(buffer.data());
    return reinterpret_cast<V*>((at + (kScratchAlignment - 1)) & ~uintptr_t(kScratchAlignment - 1));
  }
  template <class V>
  static V* chunk_buffer(std::vector<V>& buffer, size_t count) {
    if (buffer.size() < count) buffer.resize(count);
    return buffer.data();
  }

  // Per-thread buffers (reserve_threads sizes the outer vectors).
  std::vector<std::vector<double>> scratch_, block_f64_;
  std::vector<std::vector<float>> block_f32_, stage_;
  std::vector<RowCoefficients<float>> rows_f32_;
  std::vector<RowCoefficients<double>> rows_f64_;
  std::vector<CellMoments> moments_;
  std::vector<double> sums_;
};

// How a cell range is cut into chunks of about kChunkElements.
//  channel_rows: chunk k covers rows [r0, r1) of slab (k / per_slab); a slab
//    is one `outer` index, cells_per_row cells.
//  contiguous_cells: chunk k covers elements [e0, e1) of cell (k / per_cell).
struct Chunking {
  int64_t count = 0;
  int64_t per_group = 0;  // chunks per slab (rows) or per cell (contiguous)
  int64_t step = 0;       // rows or elements per chunk
};

inline Chunking chunking(const Plan& plan, CellRange cells) {
  Chunking c;
  if (plan.form == Plan::Form::channel_rows) {
    const int64_t slabs = cells.size() / plan.cells_per_row;
    const EqualParts parts =
        equal_parts(plan.rows, std::max<int64_t>(1, kChunkElements / std::max<int64_t>(plan.row_width, 1)));
    c.per_group = parts.count;
    c.step = parts.size;
    c.count = slabs * c.per_group;
  } else {
    // At least one chunk per cell, so that an empty cell still gets its (empty) moments.
    const EqualParts parts = equal_parts(plan.cell_elements, kChunkElements);
    c.per_group = std::max<int64_t>(1, parts.count);
    c.step = parts.size;
    c.count = cells.size() * c.per_group;
  }
  return c;
}

}  // namespace
}  // namespace distgn::cpu
