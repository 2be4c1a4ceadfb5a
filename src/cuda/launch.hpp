// The CUDA kernels' entry points, one per kernel family, each dispatching
// on dtypes: a typed, vectorised instantiation where the geometry's vec is
// 16 bytes' worth of the input dtype (and the dtype combination has one), the
// generic scalar instantiation (run-time dtypes) where vec is 1. Plain C++:
// the arguments are device pointers and the geometries of geometry.hpp; every
// launch is asynchronous on `stream`.
#pragma once

#include <cstdint>

#include "core/cell_stats.hpp"
#include "cuda/geometry.hpp"
#include "distgn/tensor.hpp"

struct CUstream_st;

namespace distgn {
namespace cuda {

using Stream = CUstream_st*;

// Two doubles a partial result carries: (sum of dy, sum of dy * xhat) or
// (A, B) or (a, b).
struct alignas(16) SumPair {
  double first;
  double second;
};

// What forward leaves for normalisation and backward, per cell (absolute
// index): mean and rstd in the stats dtype, the group's valid count, and 1.0
// where the fast-variance clamp was hit (0.0 elsewhere).
struct CellStateView {
  double* mean = nullptr;
  double* rstd = nullptr;
  double* count = nullptr;
  double* clamped = nullptr;
};

// Per-cell statistics and per-channel parameters the elementwise kernels read
// (device arrays of doubles, like Coefficients on the host).
struct CoefficientsView {
  const double* mean = nullptr;   // per cell, absolute index
  const double* rstd = nullptr;
  const double* scale = nullptr;  // per channel, or null
  const double* bias = nullptr;   // per channel, or null
  int64_t channels = 0;
  int64_t groups = 0;
};

// Elements 16 bytes of `dtype` hold: the vec of the typed kernels.
inline int full_vec(DType dtype) { return 16 / dtype_size(dtype); }

// Do typed (vectorised) kernels exist for these dtypes? Otherwise the
// generic ones run, with vec 1.
bool normalize_has_typed(DType x, DType y, DType compute);
bool backward_has_typed(DType x, DType dy, DType compute);

// ---- statistics ------------------------------------------------------------------
// Per-block (per-item) partial moments; the last block of each slab (cell)
// merges them in a fixed order into `moments` (if not null) and, with
// `finalize`, into the cell state. `counters` (one per slab or cell of the
// launch) must be zero and are left zero.

struct RowsStatsArgs {
  RowsGeometry g;
  int64_t first_slab = 0;
  const void* x = nullptr;
  DType x_dtype = DType::f32;
  const uint8_t* mask = nullptr;  // one byte per element, walking order, or null
  CellMoments* partials = nullptr;  // g.blocks() * g.slots
  unsigned* counters = nullptr;     // g.slabs
  CellMoments* moments = nullptr;
  CellStateView state;
  bool finalize = false;
  FinalizeParams fin;
};
void rows_stats(Stream stream, const RowsStatsArgs& a);

struct CellsStatsArgs {
  CellsGeometry g;
  int64_t first_cell = 0;
  const void* x = nullptr;
  DType x_dtype = DType::f32;
  const uint8_t* mask = nullptr;
  CellMoments* partials = nullptr;  // g.items()
  unsigned* counters = nullptr;     // g.cells
  CellMoments* moments = nullptr;
  CellStateView state;
  bool finalize = false;
  FinalizeParams fin;
};
void cells_stats(Stream stream, const CellsStatsArgs& a);

// ---- normalisation -----------------------------------------------------------------

struct RowsNormalizeArgs {
  RowsGeometry g;
  int64_t first_slab = 0;
  const void* x = nullptr;
  DType x_dtype = DType::f32;
  void* y = nullptr;
  DType y_dtype = DType::f32;
  DType compute = DType::f32;
  CoefficientsView c;
};
void rows_normalize(Stream stream, const RowsNormalizeArgs& a);

struct CellsNormalizeArgs {
  CellsGeometry g;
  int64_t first_cell = 0;
  const void* x = nullptr;
  DType x_dtype = DType::f32;
  void* y = nullptr;
  DType y_dtype = DType::f32;
  DType compute = DType::f32;
  CoefficientsView c;
};
void cells_normalize(Stream stream, const CellsNormalizeArgs& a);

// ---- backward ------------------------------------------------------------------------
// Sums: per block, per column (dy, dy * xhat) into block_cols and per cell of
// the tile (A, B) into block_cells; the last block of a slab (the last warp of
// a cell) writes each cell's (A, B) into cell_sums and, when `terms` is not
// null, (a, b) = (A / n, B / n or 0 where clamped) into terms.

struct BackwardInputs {
  const void* x = nullptr;
  DType x_dtype = DType::f32;
  const void* dy = nullptr;
  DType dy_dtype = DType::f32;
  DType compute = DType::f32;
  CoefficientsView c;              // mean, rstd, scale (bias unused)
  const double* count = nullptr;   // cell state, for terms
  const double* clamped = nullptr;
};

struct RowsSumsArgs {
  RowsGeometry g;
  int64_t first_slab = 0;
  BackwardInputs in;
  SumPair* block_cols = nullptr;   // g.blocks() * g.tile_cols
  SumPair* block_cells = nullptr;  // g.blocks() * g.slots
  unsigned* counters = nullptr;    // g.slabs
  SumPair* cell_sums = nullptr;    // absolute cells
  SumPair* terms = nullptr;        // absolute cells, or null
};
void rows_sums(Stream stream, const RowsSumsArgs& a);

struct CellsSumsArgs {
  CellsGeometry g;
  int64_t first_cell = 0;
  BackwardInputs in;
  SumPair* items = nullptr;      // g.items(): (sum dy, sum dy * xhat)
  unsigned* counters = nullptr;  // g.cells
  SumPair* cell_sums = nullptr;
  SumPair* terms = nullptr;
};
void cells_sums(Stream stream, const CellsSumsArgs& a);

// channel_sums[c] (+)= sum of dy, channel_sums[C + c] (+)= sum of dy * xhat
// over the launch's partials (fixed order): added with `accumulate`, else
// assigned.
void rows_channel_sums(Stream stream, const RowsGeometry& g, int64_t channels, const SumPair* block_cols,
                       double* channel_sums, bool accumulate);
void cells_channel_sums(Stream stream, const CellsGeometry& g, int64_t first_cell, int64_t groups,
                        int64_t channels, const SumPair* items, double* channel_sums, bool accumulate);

struct GradArgs {
  BackwardInputs in;
  const uint8_t* mask = nullptr;
  const SumPair* terms = nullptr;  // absolute cells: (a, b)
  void* dx = nullptr;              // x's dtype
};
void rows_input_grad(Stream stream, const RowsGeometry& g, int64_t first_slab, const GradArgs& a);
void cells_input_grad(Stream stream, const CellsGeometry& g, int64_t first_cell, const GradArgs& a);

// ---- small kernels ---------------------------------------------------------------------

// gather: dst[i] = src[map(i)]; scatter: dst[map(i)] = src[i]; i < total.
void permute(Stream stream, const StridedIndex& map, int64_t total, int element_bytes, const void* src,
             void* dst, bool gather);
// dst[i] = src[map(i)] != 0.
void expand_mask(Stream stream, const StridedIndex& map, int64_t total, const uint8_t* src, uint8_t* dst);
// terms[i] = (cell_sums[i].first / count[i], clamped[i] ? 0 : cell_sums[i].second / count[i]).
void terms_from_sums(Stream stream, int64_t cells, const SumPair* cell_sums, const double* count,
                     const double* clamped, SumPair* terms);
// dst[i] = src[i] rounded to dtype, i < count.
void store_doubles(Stream stream, const double* src, int64_t count, void* dst, DType dtype);
// Device conversions of storage dtypes, for tests: out[i] = float(in[i]) for
// `count` float16 (or bfloat16) bit patterns; bits[i] = the float16 (or
// bfloat16) bits of floats[i].
void convert_halves_to_float(Stream stream, const uint16_t* in, int64_t count, DType dtype, float* out);
void convert_floats_to_half(Stream stream, const float* in, int64_t count, DType dtype, uint16_t* out);

}  // namespace cuda
}  // namespace distgn
