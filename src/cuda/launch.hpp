// The CUDA kernels' entry points, one per kernel family over a Geometry of
// either form (geometry.hpp: the form's kernel runs), each dispatching on
// dtypes: a typed, vectorised instantiation where the geometry's vec is
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
// generic ones run, with vec 1. (Statistics have them for every dtype.)
bool normalize_has_typed(DType x, DType y, DType compute);
bool backward_has_typed(DType x, DType dy, DType compute);

// The arguments of a kernel family: its fields F over a geometry G and the
// launch's first slab (channel_rows) or first cell (contiguous_cells),
// absolute. The host fills them over a Geometry (either form); the family's
// entry point passes them on over the form's geometry (a RowsGeometry or a
// CellsGeometry: the layout the kernels take).
template <class G>
struct Over {
  G g;
  int64_t first = 0;
};
template <class G, class F>
struct Args : Over<G>, F {};

// The same arguments over the form's geometry h.
template <class H, class G, class F>
Args<H, F> over(const Args<G, F>& a, const H& h) {
  return Args<H, F>{Over<H>{h, a.first}, static_cast<const F&>(a)};
}

// ---- statistics ------------------------------------------------------------------
// Per-block (per-item) partial moments; the last block of each slab (cell)
// merges them in a fixed order into `moments` (if not null) and, with
// `finalize`, into the cell state. `counters` must be zero and are left zero.

struct StatsFields {
  const void* x = nullptr;
  DType x_dtype = DType::f32;
  const uint8_t* mask = nullptr;  // one byte per element, walking order, or null
  CellMoments* partials = nullptr;  // g.partials()
  unsigned* counters = nullptr;     // g.counters()
  CellMoments* moments = nullptr;   // absolute cells, or null
  CellStateView state;
  bool finalize = false;
  FinalizeParams fin;
};
using StatsArgs = Args<Geometry, StatsFields>;
void stats(Stream stream, const StatsArgs& a);

// ---- normalisation -----------------------------------------------------------------

struct NormalizeFields {
  const void* x = nullptr;
  DType x_dtype = DType::f32;
  void* y = nullptr;
  DType y_dtype = DType::f32;
  DType compute = DType::f32;
  CoefficientsView c;
};
using NormalizeArgs = Args<Geometry, NormalizeFields>;
void normalize(Stream stream, const NormalizeArgs& a);

// ---- backward ------------------------------------------------------------------------
// Sums: per block (item) partial sums; the last block of a slab (the last
// warp of a cell) writes each cell's (A, B) into cell_sums and, when `terms`
// is not null, (a, b) = (A / n, B / n or 0 where clamped) into terms.

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

struct SumsFields {
  BackwardInputs in;
  // channel_rows: per block, (sum dy, sum dy * xhat) per column of its tile
  // in `columns` and (A, B) per cell of its tile in `partials`;
  // contiguous_cells: (sum dy, sum dy * xhat) per item in `partials`.
  SumPair* columns = nullptr;    // g.column_partials()
  SumPair* partials = nullptr;   // g.partials()
  unsigned* counters = nullptr;  // g.counters()
  SumPair* cell_sums = nullptr;  // absolute cells
  SumPair* terms = nullptr;      // absolute cells, or null
};
using SumsArgs = Args<Geometry, SumsFields>;
void sums(Stream stream, const SumsArgs& a);

// After sums(stream, a): channel_sums[c] (+)= sum of dy, channel_sums[C + c]
// (+)= sum of dy * xhat over a's partials (fixed order), C = a.in.c.channels:
// added with `accumulate`, else assigned.
void channel_sums(Stream stream, const SumsArgs& a, double* channel_sums, bool accumulate);

struct GradFields {
  BackwardInputs in;
  const uint8_t* mask = nullptr;
  const SumPair* terms = nullptr;  // absolute cells: (a, b)
  void* dx = nullptr;              // x's dtype
};
using GradArgs = Args<Geometry, GradFields>;
void input_grad(Stream stream, const GradArgs& a);

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
