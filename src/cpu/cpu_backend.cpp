// The CPU backend: OpenMP over fixed-size chunks of a cell range, so results
// do not depend on the thread count. Partial sums run in float over small
// blocks and accumulate in double (see cpu/tuning.hpp); the elementwise
// arithmetic runs in the plan's compute dtype (semantics §6, §9).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "core/backend.hpp"
#include "core/dtype_dispatch.hpp"
#include "core/equal_parts.hpp"
#include "cpu/cpu_backend.hpp"
#include "cpu/half_rows.hpp"
#include "cpu/lanes.hpp"
#include "cpu/stream_rows.hpp"
#include "cpu/tuning.hpp"

namespace distgn {
namespace {

using namespace cpu;  // the tuning constants (cpu/tuning.hpp)

// Per-cell statistics and per-channel parameters the elementwise kernels
// apply, host arrays.
struct Coefficients {
  DType compute_dtype;  // f32 or f64: the arithmetic of semantics §6 and §9
  const double* mean;   // per cell, in the stats dtype
  const double* rstd;   // per cell
  const double* scale;  // per channel, or null (use_scale = false)
  const double* bias;   // per channel, or null (use_bias = false)
};

// The mask expanded to one byte per element of x (numpy broadcasting).
void broadcast_mask(const KernelPlan& plan, const MaskView& mask, std::vector<uint8_t>& out) {
  const Shape& x = plan.shape;
  const size_t rank = x.size(), lead = rank - mask.shape.size();
  std::vector<int64_t> stride(rank, 0);
  int64_t s = 1;
  for (size_t d = rank; d-- > lead;) {
    stride[d] = mask.shape[d - lead] == 1 ? 0 : s;
    s *= mask.shape[d - lead];
  }
  const int64_t total = element_count(x);
  out.resize(size_t(total));
  std::vector<int64_t> index(rank, 0);
  for (int64_t e = 0; e < total; ++e) {
    int64_t offset = 0;
    for (size_t d = 0; d < rank; ++d) offset += index[d] * stride[d];
    out[size_t(e)] = mask.data[offset] ? 1 : 0;
    for (size_t d = rank; d-- > 0;) {
      if (++index[d] < x[d]) break;
      index[d] = 0;
    }
  }
}

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(half_t v) { return to_float(v); }
inline float widen(bfloat16_t v) { return to_float(v); }

template <class T, class C>
inline T narrow(C v) {
  if constexpr (std::is_same_v<T, half_t>) return to_half(float(v));
  else if constexpr (std::is_same_v<T, bfloat16_t>) return to_bfloat16(float(v));
  else return T(v);
}

// float16 rows pass through float scratch converted by the F16C
// instructions where the target has them (cpu/half_rows.hpp): GCC does not
// vectorise the portable conversions well inside the kernels' loops (a
// float16 backward measured 1.6x slower than float32 per element).
template <class T>
struct Staged {
  using type = T;
};
#if defined(__F16C__)
template <>
struct Staged<half_t> {
  using type = float;
};
#endif
template <class T>
using staged_t = typename Staged<T>::type;

// n elements at src as the kernels read them: src itself, or (float16)
// converted into `buffer`.
template <class T>
const staged_t<T>* staged_input(const T* src, [[maybe_unused]] int64_t n, [[maybe_unused]] float* buffer) {
  if constexpr (std::is_same_v<staged_t<T>, T>) return src;
  else {
    widen_row(src, buffer, n);
    return buffer;
  }
}

// Whether the elementwise kernels (y, dx) stream their output of type Y for
// this plan (write_elements): float32 only (the other types are written in
// their own type), and only outputs larger than streamed_output_bytes
// (cpu/tuning.hpp).
template <class Y>
bool streams_output(const KernelPlan& p) {
  return std::is_same_v<Y, float> && stream_rows_in_hardware() &&
         p.num_cells * p.cell_elements * int64_t(sizeof(float)) > thresholds().streamed_output_bytes;
}

// Whole rows of `width` the channels-last elementwise kernels (normalise,
// dx) treat as one stretch (kRowTileElements).
inline int64_t row_tile_rows(int64_t width) { return std::max<int64_t>(1, kRowTileElements / std::max<int64_t>(1, width)); }

// How a cell range is cut into chunks.
//  channel_rows: chunk k covers rows [r0, r1) of slab (k / per_slab); a slab
//    is one `outer` index, cells_per_row cells.
//  contiguous_cells: chunk k covers elements [e0, e1) of cell (k / per_cell).
struct Chunking {
  int64_t count = 0;
  int64_t per_group = 0;  // chunks per slab (rows) or per cell (contiguous)
  int64_t step = 0;       // rows or elements per chunk
};

// n items in parts of at most max_part, their count rounded up to a
// multiple of kChunkMultiple (at most n parts).
EqualParts chunk_parts(int64_t n, int64_t max_part) {
  const EqualParts parts = equal_parts(n, max_part);
  if (parts.count <= 1) return parts;
  const int64_t count = std::min(n, (parts.count + kChunkMultiple - 1) / kChunkMultiple * kChunkMultiple);
  return equal_parts(n, (n + count - 1) / count);
}

Chunking chunking(const KernelPlan& plan, CellRange cells) {
  Chunking c;
  if (plan.form == KernelPlan::Form::channel_rows) {
    const int64_t slabs = cells.size() / plan.cells_per_row;
    const EqualParts parts =
        chunk_parts(plan.rows, std::max<int64_t>(1, kChunkElements / std::max<int64_t>(plan.row_width, 1)));
    c.per_group = parts.count;
    c.step = parts.size;
    c.count = slabs * c.per_group;
  } else {
    // At least one chunk per cell, so that an empty cell still gets its (empty) moments.
    const EqualParts parts = chunk_parts(plan.cell_elements, kChunkElements);
    c.per_group = std::max<int64_t>(1, parts.count);
    c.step = parts.size;
    c.count = cells.size() * c.per_group;
  }
  return c;
}

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

// Rows [0, rows) in blocks of kRowBlock, then one at a time: f(first_row,
// std::integral_constant<int64_t, n>) so that each block's row loop unrolls.
template <int64_t kBlock = kRowBlock, class F>
inline void for_row_blocks(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; r + kBlock <= rows; r += kBlock) f(r, std::integral_constant<int64_t, kBlock>{});
  for (; r < rows; ++r) f(r, std::integral_constant<int64_t, 1>{});
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
// scalar operands, so one generic lambda serves both); the lanes are added
// up by halving shuffles at the end (lane_total). GCC's `omp simd
// reduction` ends instead in a serial chain of scalar adds through the
// stack, which took 40% of the time on 256-element runs.
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

// [0, n) in blocks of `block` elements, the first cut to `lead` when lead
// > 0: f(first, last). With lead = elements_to_line(out) the blocks after
// the first start on a cache line of out, so that a streamed chunk's only
// partial lines are at its two ends (stream_elements writes those with
// plain stores, which read the line first).
template <class F>
inline void for_blocks(int64_t n, int64_t block, int64_t lead, F&& f) {
  int64_t e = 0;
  if (lead > 0) f(0, e = std::min(n, lead));
  for (; e < n; e += block) f(e, std::min(n, e + block));
}

// What a value lambda of write_elements loads: p[0] widened to A
// (kOneLane), or p[0, kLanes) as one lane vector of A (kAllLanes).
template <class A, class Form, class T>
inline auto load_at(Form, const T* p) {
  if constexpr (Form::value) return load_lanes<A>(p);
  else return A(widen(*p));
}

// t where the mask byte at m is set, else 0 (a select: t may be inf or NaN
// at a masked position), for one element or a float lane vector.
template <class Form, class V>
inline V where_valid(Form, const uint8_t* m, V t) {
  if constexpr (Form::value) {
    typedef uint8_t Bytes __attribute__((vector_size(kFloatLanes)));
    typedef int32_t Ints __attribute__((vector_size(64)));
    Bytes bytes;
    std::memcpy(&bytes, m, sizeof bytes);
    return __builtin_convertvector(bytes, Ints) != 0 ? t : V{};
  } else {
    return *m ? t : V(0);
  }
}

// out[e] = value(e, kOneLane) for e in [0, n), value a generic lambda of the
// element (load_at): streamed from lane vectors (stream_elements) where
// `stream` is set and the output and its arithmetic are float32 (the two
// forms give the same bits: the same expression, contracted alike);
// otherwise a simd loop of plain stores, a float16 output through `stage`
// (n floats) converted by narrow_row.
template <class Y, class C, class F>
inline void write_elements(Y* out, int64_t n, [[maybe_unused]] bool stream, [[maybe_unused]] float* stage,
                           F&& value) {
  if constexpr (std::is_same_v<Y, float> && std::is_same_v<C, float>) {
    if (stream) return stream_elements(out, n, value);
  }
  using Out = staged_t<Y>;
  Out* to;
  if constexpr (std::is_same_v<Out, Y>) to = out;
  else to = stage;
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) to[e] = narrow<Out>(value(e, kOneLane));
  if constexpr (!std::is_same_v<Out, Y>) narrow_row(stage, out, n);
}

// dx[e] = dx_value(e, form, stat_term(e, form)) for e in [0, n)
// (write_elements), the statistics term selected away where the mask byte
// is 0 (semantics §9's m_i; mask null: no mask).
template <class T, class C, class S, class G>
inline void write_input_grad(T* dx, int64_t n, bool stream, float* stage, const uint8_t* mask, S&& stat_term,
                             G&& dx_value) {
  if (mask)
    write_elements<T, C>(dx, n, stream, stage, [&](int64_t e, auto lanes) {
      return dx_value(e, lanes, where_valid(lanes, mask + e, stat_term(e, lanes)));
    });
  else
    write_elements<T, C>(dx, n, stream, stage,
                         [&](int64_t e, auto lanes) { return dx_value(e, lanes, stat_term(e, lanes)); });
}

// Whether the call's input is read from cache (cache_resident_bytes,
// cpu/tuning.hpp): then both channels-last reductions work in register
// blocks of kRowBlock rows at every width.
bool cache_resident(const KernelPlan& p) {
  return p.num_cells * p.cell_elements * int64_t(dtype_size(p.input_dtype)) <= thresholds().cache_resident_bytes;
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
// blocks of kRowBlock rows (cache-resident calls), otherwise over tiles of
// tile_rows whole rows (row_tile_rows; mean and rstd repeated over a tile)
// into per-element block sums, folded into the columns' double sums every
// kFlushRows tiles. block: 2 * tile of scratch in C, stage: 2 * max(kRowBlock
// * width, tile) floats.
template <class T, class D, class C>
void accumulate_backward_columns(const T* x, const D* dy, int64_t rows, int64_t width, int64_t tile_rows,
                                 const C* mean, const C* rstd, C* block, float* stage, double* sum_dy,
                                 double* sum_dy_xhat, bool register_blocks) {
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
          p_sum += g * ((C(widen(xb[i * width + j])) - m) * rs);
        }
        sum_dy[j] += double(g_sum);
        sum_dy_xhat[j] += double(p_sum);
      }
    });
    return;
  }
  const int64_t tile = tile_rows * width, end = rows * width;
  C *g_sum = block, *p_sum = block + tile;
  std::fill(block, block + 2 * tile, C(0));
  int64_t tiles = 0;
  for (int64_t at = 0; at < end; at += tile) {
    const int64_t n = std::min(tile, end - at);
    const auto* xt = staged_input(x + at, n, stage);
    const auto* dyt = staged_input(dy + at, n, stage + tile);
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) {
      const C xhat = (C(widen(xt[e])) - mean[e]) * rstd[e];
      const C g = C(widen(dyt[e]));
      g_sum[e] += g;
      p_sum[e] += g * xhat;
    }
    if (++tiles % kFlushRows != 0 && at + tile < end) continue;
    for (int64_t r = 0; r < tile_rows; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        sum_dy[j] += double(g_sum[r * width + j]);
        sum_dy_xhat[j] += double(p_sum[r * width + j]);
      }
    }
    std::fill(block, block + 2 * tile, C(0));
  }
}

// The per-cell statistics of a host forward: the host arrays themselves.
class HostCells final : public CellStatistics {
 public:
  int64_t cells() const override { return cells_; }
  Device device() const override { return Device::cpu; }
  const HostCellStatistics& host() const override { return values_; }
  HostCellStatistics& values() { return values_; }
  void set_cells(int64_t cells) {
    cells_ = cells;
    values_.resize(cells);
  }

 private:
  int64_t cells_ = 0;
  HostCellStatistics values_;
};

class CpuBackend final : public Backend {
 public:
  // ---- a call's arrays ----------------------------------------------------------------

  KernelInputs inputs(const KernelPlan& p, const void* x, const MaskView* mask, const void* dy, DType dy_dtype) override {
    KernelInputs in{&p, walking_order(p, x, dtype_size(p.input_dtype), x_gathered_), nullptr,
                    dy ? walking_order(p, dy, dtype_size(dy_dtype), dy_gathered_) : nullptr, dy_dtype};
    if (mask) {
      const uint8_t* full = mask->data;
      if (mask->shape != p.shape) {
        broadcast_mask(p, *mask, mask_full_);
        full = mask_full_.data();
      }
      in.mask = static_cast<const uint8_t*>(walking_order(p, full, 1, mask_gathered_));
    }
    return in;
  }
  void* output(const KernelPlan& p, void* out, DType dtype) override {
    if (!p.permuted) return out;
    out_gathered_.resize(size_t(byte_size(p.shape, dtype)));
    return out_gathered_.data();
  }
  void finish_output(const KernelPlan& p, void* out, DType dtype) override {
    if (p.permuted) permute_on_host(p, out_gathered_.data(), out, dtype_size(dtype), false);
  }
  void set_parameters(const KernelPlan&, const double* scale, const double* bias) override {
    scale_ = scale;
    bias_ = bias;
  }

  // Blocks of whole cells (whole rows of cells for channel_rows) whose
  // arrays (x, and dy in backward: bytes_per_element) take about
  // fused_block_bytes (cpu/tuning.cpp), so that a block is still in cache
  // when the second pass reads it; one block when the whole call's arrays
  // fit in twice that.
  std::vector<CellRange> blocks(const KernelPlan& p, int bytes_per_element, bool one_rank) const override {
    std::vector<CellRange> out;
    if (p.num_cells == 0) return out;
    const int64_t budget = thresholds().fused_block_bytes;
    const int64_t call_bytes = p.num_cells * p.cell_elements * int64_t(bytes_per_element);
    if (!one_rank || call_bytes <= 2 * budget) return {{0, p.num_cells}};
    const int64_t unit = p.form == KernelPlan::Form::channel_rows ? p.cells_per_row : 1;
    const int64_t unit_bytes = std::max<int64_t>(1, unit * p.cell_elements * int64_t(bytes_per_element));
    const int64_t per_block = equal_parts(p.num_cells / unit, std::max<int64_t>(1, budget / unit_bytes)).size * unit;
    for (int64_t begin = 0; begin < p.num_cells; begin += per_block)
      out.push_back({begin, std::min(p.num_cells, begin + per_block)});
    return out;
  }

  // ---- forward ------------------------------------------------------------------------------

  std::shared_ptr<CellStatistics> cell_statistics(std::shared_ptr<CellStatistics> held, int64_t cells) override {
    std::shared_ptr<HostCells> mine = std::dynamic_pointer_cast<HostCells>(held);
    if (!mine || mine.use_count() > 2) mine = std::make_shared<HostCells>();  // `held` and `mine`
    mine->set_cells(cells);
    return mine;
  }

  void partial_stats(const KernelInputs& in, CellRange cells, CellMoments* moments) override {
    with_storage_type(in.plan->input_dtype, [&](auto tag) {
      using T = decltype(tag);
      // The block sums' type: float unless the data or the statistics are
      // float64 (then a value of x - shift must not round to float).
      with_compute_type(in.plan->input_dtype == DType::f64 || in.plan->stats_dtype == DType::f64 ? DType::f64
                                                                                                : DType::f32,
                        [&](auto a_tag) {
        using A = decltype(a_tag);
        if (in.plan->form == KernelPlan::Form::channel_rows)
          stats_rows<T, A>(in, cells, moments);
        else
          stats_contiguous<T, A>(in, cells, moments);
      });
    });
  }

  void store_statistics(CellRange cells, const HostCellStatistics& values, CellStatistics& stats) override {
    HostCellStatistics& to = static_cast<HostCells&>(stats).values();
    const auto copy = [&](const auto& from, auto& into) {
      std::copy(from.begin() + cells.begin, from.begin() + cells.end, into.begin() + cells.begin);
    };
    copy(values.mean, to.mean);
    copy(values.rstd, to.rstd);
    copy(values.count, to.count);
    copy(values.variance_clamped, to.variance_clamped);
  }

  void normalize(const KernelInputs& in, CellRange cells, const CellStatistics& stats, void* y,
                 DType y_dtype) override {
    const Coefficients coef = coefficients(*in.plan, stats, bias_);
    with_storage_type(in.plan->input_dtype, [&](auto x_tag) {
      with_storage_type(y_dtype, [&](auto y_tag) {
        with_compute_type(coef.compute_dtype, [&](auto c_tag) {
          using T = decltype(x_tag);
          using Y = decltype(y_tag);
          using C = decltype(c_tag);
          if (in.plan->form == KernelPlan::Form::channel_rows)
            normalize_rows<T, Y, C>(in, cells, coef, static_cast<Y*>(y));
          else
            normalize_contiguous<T, Y, C>(in, cells, coef, static_cast<Y*>(y));
        });
      });
    });
  }

  // ---- backward -----------------------------------------------------------------------------

  void backward_sums(const KernelInputs& in, CellRange cells, const CellStatistics& stats, double* cell_sums,
                     double* channel_sums) override {
    const Coefficients coef = coefficients(*in.plan, stats, nullptr);
    with_storage_type(in.plan->input_dtype, [&](auto x_tag) {
      with_storage_type(in.dy_dtype, [&](auto dy_tag) {
        with_compute_type(coef.compute_dtype, [&](auto c_tag) {
          using T = decltype(x_tag);
          using D = decltype(dy_tag);
          using C = decltype(c_tag);
          if (in.plan->form == KernelPlan::Form::channel_rows)
            backward_sums_rows<T, D, C>(in, static_cast<const D*>(in.dy), cells, coef, cell_sums, channel_sums);
          else
            backward_sums_contiguous<T, D, C>(in, static_cast<const D*>(in.dy), cells, coef, cell_sums,
                                              channel_sums);
        });
      });
    });
  }

  void store_terms(CellRange cells, const double* cell_sums, const CellStatistics& stats) override {
    const HostCellStatistics& s = stats.host();
    terms_.resize(2 * s.count.size());
    for (int64_t cell = cells.begin; cell < cells.end; ++cell) {
      const CellTerms t = cell_terms(cell_sums[2 * cell], cell_sums[2 * cell + 1], s.count[size_t(cell)],
                                     s.variance_clamped[size_t(cell)]);
      terms_[size_t(2 * cell)] = t.a;
      terms_[size_t(2 * cell + 1)] = t.b;
    }
  }

  void input_grad(const KernelInputs& in, CellRange cells, const CellStatistics& stats, void* dx) override {
    const Coefficients coef = coefficients(*in.plan, stats, nullptr);
    const double* cell_terms = terms_.data();
    with_storage_type(in.plan->input_dtype, [&](auto x_tag) {
      with_storage_type(in.dy_dtype, [&](auto dy_tag) {
        with_compute_type(coef.compute_dtype, [&](auto c_tag) {
          using T = decltype(x_tag);
          using D = decltype(dy_tag);
          using C = decltype(c_tag);
          if (in.plan->form == KernelPlan::Form::channel_rows)
            input_grad_rows<T, D, C>(in, static_cast<const D*>(in.dy), cells, coef, cell_terms,
                                     static_cast<T*>(dx));
          else
            input_grad_contiguous<T, D, C>(in, static_cast<const D*>(in.dy), cells, coef, cell_terms,
                                           static_cast<T*>(dx));
        });
      });
    });
  }

 private:
  // Scratch each thread reuses across calls, so steady-state calls allocate
  // nothing.
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
  double* thread_scratch(size_t count) { return thread_buffer(scratch_, count); }
  // Block sums of the wide-row reductions, in their type.
  template <class A>
  A* thread_block_sums(size_t count) {
    if constexpr (std::is_same_v<A, float>) return thread_buffer(block_f32_, count);
    else return thread_buffer(block_f64_, count);
  }
  // Float scratch for staged float16 rows (see Staged).
  float* thread_stage(size_t count) { return thread_buffer(stage_, count); }
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
  template <class V>
  V* chunk_buffer(std::vector<V>& buffer, size_t count) {
    if (buffer.size() < count) buffer.resize(count);
    return buffer.data();
  }

  // ---- channel_rows: x is [outer][rows][row_width] -------------------------

  template <class T, class A>
  void stats_rows(const KernelInputs& in, CellRange cells, CellMoments* moments) {
    const KernelPlan& p = *in.plan;
    const int64_t width = p.row_width, per_row = p.cells_per_row, S = p.group_size;
    const Chunking ch = chunking(p, cells);
    const int64_t first_slab = cells.begin / per_row;
    CellMoments* chunk_moments = chunk_buffer(moments_, size_t(ch.count * per_row));
    const T* x = static_cast<const T*>(in.x);
    const bool register_blocks = width <= kNarrowRow || cache_resident(p);
    reserve_threads();
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < ch.count; ++k) {
      const int64_t slab = first_slab + k / ch.per_group;
      const int64_t r0 = (k % ch.per_group) * ch.step, r1 = std::min(p.rows, r0 + ch.step);
      const int64_t base = (slab * p.rows + r0) * width;
      double* scratch = thread_scratch(size_t(4 * width));
      double *shift = scratch, *sum = scratch + width, *sum_sq = sum + width, *count = sum_sq + width;
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
        accumulate_shifted_columns(x + base, r1 - r0, width, shift, thread_block_sums<A>(size_t(3 * width)),
                                   thread_stage(size_t(kRowBlock * width)), sum, sum_sq, register_blocks);
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

  // Per-column coefficients of one slab: mean, rstd*scale, bias (and for
  // backward rstd, scale, a, b), repeated over a tile of tile_rows whole
  // rows (row_tile_rows) so that the elementwise kernels run over a tile as
  // one stretch; element e of a tile is column e % row_width. The arrays
  // run kFloatLanes past the tile in the same pattern: a streamed chunk's
  // tiles start where the output's cache lines do (for_blocks), up to
  // kFloatLanes elements into the pattern. Each thread keeps those of its
  // current slab.
  // With cell_terms, dx = mul * dy + (x - mean) * centered_coef + offset:
  // semantics §9's rstd * (g - a - xhat * b) with the per-cell factors folded,
  // still centring x first (expanding x * r^2 b - mean * r^2 b cancels
  // badly when rstd is large).
  template <class C>
  struct RowCoefficients {
    int64_t slab = -1, tile_rows = 1;
    std::vector<C> mean, rstd, mul, bias, scale, centered_coef, offset;
  };

  template <class C>
  void fill_row_coefficients(const KernelPlan& p, const Coefficients& coef, const double* cell_terms,
                             int64_t slab, RowCoefficients<C>& rc) {
    const int64_t width = p.row_width;
    rc.tile_rows = row_tile_rows(width);
    const int64_t tile = rc.tile_rows * width;
    for (auto* v : {&rc.mean, &rc.rstd, &rc.mul, &rc.bias, &rc.scale, &rc.centered_coef, &rc.offset})
      v->resize(size_t(tile + kFloatLanes));
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
    // A slab's first row, copied over the tile's other rows and past them
    // (a fused block of one slab refills this per block); the dx terms only
    // for backward.
    const auto repeat_rows = [&](std::vector<C>& v) {
      for (int64_t r = 1; r < rc.tile_rows; ++r) std::copy_n(v.begin(), width, v.begin() + r * width);
      std::copy_n(v.begin(), kFloatLanes, v.begin() + tile);  // a tile: over kRowTileElements / 2
    };
    for (auto* v : {&rc.mean, &rc.rstd, &rc.mul, &rc.bias, &rc.scale}) repeat_rows(*v);
    if (cell_terms) {
      repeat_rows(rc.centered_coef);
      repeat_rows(rc.offset);
    }
    rc.slab = slab;
  }

  // Calls f(k, slab, r0, r1, rc) for every chunk k of `cells` (rows [r0, r1)
  // of one slab) over the OpenMP threads; rc holds the slab's per-column
  // coefficients, refilled only when a thread moves to another slab.
  template <class C, class F>
  void for_each_row_chunk(const KernelPlan& p, CellRange cells, const Coefficients& coef,
                          const double* cell_terms, const Chunking& ch, F&& f) {
    reserve_threads();
    const int64_t first_slab = cells.begin / p.cells_per_row;
#pragma omp parallel
    {
      RowCoefficients<C>& rc = row_coefficients<C>();
#pragma omp for schedule(static)
      for (int64_t k = 0; k < ch.count; ++k) {
        const int64_t slab = first_slab + k / ch.per_group;
        const int64_t r0 = (k % ch.per_group) * ch.step, r1 = std::min(p.rows, r0 + ch.step);
        if (rc.slab != slab) fill_row_coefficients(p, coef, cell_terms, slab, rc);
        f(k, slab, r0, r1, rc);
      }
    }
  }

  template <class T, class Y, class C>
  void normalize_rows(const KernelInputs& in, CellRange cells, const Coefficients& coef, Y* y) {
    const KernelPlan& p = *in.plan;
    const int64_t width = p.row_width;
    const T* x = static_cast<const T*>(in.x);
    const bool stream = streams_output<Y>(p);
    for_each_row_chunk<C>(p, cells, coef, nullptr, chunking(p, cells),
                          [&](int64_t, int64_t slab, int64_t r0, int64_t r1, const RowCoefficients<C>& rc) {
      const int64_t tile = rc.tile_rows * width, start = (slab * p.rows + r0) * width;
      float* stage = thread_stage(size_t(2 * tile));
      for_blocks((r1 - r0) * width, tile, stream ? elements_to_line(y + start) : 0, [&](int64_t first, int64_t last) {
        // Column (start + first + e) % width: the tile's coefficients from first % tile on.
        const int64_t o = first % tile;
        const C *mean = rc.mean.data() + o, *mul = rc.mul.data() + o, *bias = rc.bias.data() + o;
        const auto* xt = staged_input(x + start + first, last - first, stage);
        write_elements<Y, C>(y + start + first, last - first, stream, stage + tile, [&](int64_t e, auto lanes) {
          return (load_at<C>(lanes, xt + e) - load_at<C>(lanes, mean + e)) * load_at<C>(lanes, mul + e) +
                 load_at<C>(lanes, bias + e);
        });
      });
      if (stream) stream_fence();
    });
  }

  template <class T, class D, class C>
  void backward_sums_rows(const KernelInputs& in, const D* dy, CellRange cells,
                          const Coefficients& coef, double* cell_sums, double* channel_sums) {
    const KernelPlan& p = *in.plan;
    const int64_t width = p.row_width, per_row = p.cells_per_row, S = p.group_size;
    const int64_t channels = p.channels;
    const Chunking ch = chunking(p, cells);
    // Per chunk: A and B of its cells, then sum dy and sum dy*xhat per channel.
    const int64_t stride = 2 * per_row + 2 * channels;
    double* chunk_sums = chunk_buffer(sums_, size_t(ch.count * stride));
    const T* x = static_cast<const T*>(in.x);
    const bool register_blocks = cache_resident(p);
    for_each_row_chunk<C>(p, cells, coef, nullptr, ch,
                          [&](int64_t k, int64_t slab, int64_t r0, int64_t r1, const RowCoefficients<C>& rc) {
      double* scratch = thread_scratch(size_t(2 * width));
      double *sum_dy = scratch, *sum_dy_xhat = scratch + width;
      std::fill(scratch, scratch + 2 * width, 0.0);
      const int64_t at = (slab * p.rows + r0) * width;
      const int64_t tile = rc.tile_rows * width;
      accumulate_backward_columns(x + at, dy + at, r1 - r0, width, rc.tile_rows, rc.mean.data(), rc.rstd.data(),
                                  thread_block_sums<C>(size_t(2 * tile)),
                                  thread_stage(size_t(2 * std::max(kRowBlock * width, tile))), sum_dy,
                                  sum_dy_xhat, register_blocks);
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
  void input_grad_rows(const KernelInputs& in, const D* dy, CellRange cells,
                       const Coefficients& coef, const double* cell_terms, T* dx) {
    const KernelPlan& p = *in.plan;
    const int64_t width = p.row_width;
    const T* x = static_cast<const T*>(in.x);
    const bool stream = streams_output<T>(p);
    for_each_row_chunk<C>(p, cells, coef, cell_terms, chunking(p, cells),
                          [&](int64_t, int64_t slab, int64_t r0, int64_t r1, const RowCoefficients<C>& rc) {
      const int64_t tile = rc.tile_rows * width, start = (slab * p.rows + r0) * width;
      float* stage = thread_stage(size_t(3 * tile));
      for_blocks((r1 - r0) * width, tile, stream ? elements_to_line(dx + start) : 0, [&](int64_t first, int64_t last) {
        const int64_t o = first % tile, at = start + first, n = last - first;  // coefficients as normalize_rows
        const C *mean = rc.mean.data() + o, *mul = rc.mul.data() + o;
        const C *centered_coef = rc.centered_coef.data() + o, *offset = rc.offset.data() + o;
        const auto* xt = staged_input(x + at, n, stage);
        const auto* dyt = staged_input(dy + at, n, stage + tile);
        const auto stat_term = [&](int64_t e, auto lanes) {
          return (load_at<C>(lanes, xt + e) - load_at<C>(lanes, mean + e)) * load_at<C>(lanes, centered_coef + e) +
                 load_at<C>(lanes, offset + e);
        };
        const auto dx_value = [&](int64_t e, auto lanes, auto stat) {
          return load_at<C>(lanes, dyt + e) * load_at<C>(lanes, mul + e) + stat;
        };
        write_input_grad<T, C>(dx + at, n, stream, stage + 2 * tile, in.mask ? in.mask + at : nullptr, stat_term,
                               dx_value);
      });
      if (stream) stream_fence();
    });
  }

  // ---- contiguous_cells: x is [cells][S][inner] ----------------------------

  template <class T, class A>
  void stats_contiguous(const KernelInputs& in, CellRange cells, CellMoments* moments) {
    const KernelPlan& p = *in.plan;
    const int64_t length = p.cell_elements;
    const Chunking ch = chunking(p, cells);
    CellMoments* chunk_moments = chunk_buffer(moments_, size_t(ch.count));
    const T* x = static_cast<const T*>(in.x);
    reserve_threads();
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
        float* stage = thread_stage(size_t(kRunBlock));
        for_blocks(n, kRunBlock, 0, [&](int64_t first, int64_t last) {
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

  // Calls f(channel, first, last) for each run of one channel within
  // elements [e0, e1) of a cell.
  template <class F>
  static void for_channel_runs(const KernelPlan& p, int64_t cell, int64_t e0, int64_t e1, F&& f) {
    const int64_t inner = p.inner, group = cell % p.num_groups;
    for (int64_t e = e0; e < e1;) {
      const int64_t s = e / inner, run_end = std::min(e1, (s + 1) * inner);
      f(group * p.group_size + s, e, run_end);
      e = run_end;
    }
  }

  template <class T, class Y, class C>
  void normalize_contiguous(const KernelInputs& in, CellRange cells, const Coefficients& coef,
                            Y* y) {
    const KernelPlan& p = *in.plan;
    const int64_t length = p.cell_elements;
    const Chunking ch = chunking(p, cells);
    const T* x = static_cast<const T*>(in.x);
    const bool stream = streams_output<Y>(p);
    reserve_threads();
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < ch.count; ++k) {
      const int64_t cell = cells.begin + k / ch.per_group;
      const int64_t e0 = (k % ch.per_group) * ch.step, e1 = std::min(length, e0 + ch.step);
      const int64_t base = cell * length;
      const C mean = C(coef.mean[cell]), r = C(coef.rstd[cell]);
      float* stage = thread_stage(size_t(2 * kRunBlock));
      for_channel_runs(p, cell, e0, e1, [&](int64_t c, int64_t first, int64_t last) {
        const C mul = coef.scale ? r * C(coef.scale[c]) : r;
        const C bias = coef.bias ? C(coef.bias[c]) : C(0);
        const int64_t start = base + first;
        for_blocks(last - first, kRunBlock, stream ? elements_to_line(y + start) : 0, [&](int64_t b0, int64_t b1) {
          const auto* xs = staged_input(x + start + b0, b1 - b0, stage);
          write_elements<Y, C>(y + start + b0, b1 - b0, stream, stage + kRunBlock, [&](int64_t e, auto lanes) {
            return (load_at<C>(lanes, xs + e) - mean) * mul + bias;
          });
        });
      });
      if (stream) stream_fence();
    }
  }

  template <class T, class D, class C>
  void backward_sums_contiguous(const KernelInputs& in, const D* dy, CellRange cells,
                                const Coefficients& coef, double* cell_sums,
                                double* channel_sums) {
    const KernelPlan& p = *in.plan;
    const int64_t length = p.cell_elements, S = p.group_size;
    const Chunking ch = chunking(p, cells);
    // Per chunk: A, B, then sum dy and sum dy*xhat per channel of its group.
    const int64_t stride = 2 + 2 * S;
    double* chunk_sums = chunk_buffer(sums_, size_t(ch.count * stride));
    const T* x = static_cast<const T*>(in.x);
    reserve_threads();
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < ch.count; ++k) {
      const int64_t cell = cells.begin + k / ch.per_group;
      const int64_t e0 = (k % ch.per_group) * ch.step, e1 = std::min(length, e0 + ch.step);
      const int64_t base = cell * length, group = cell % p.num_groups;
      const C mean = C(coef.mean[cell]), r = C(coef.rstd[cell]);
      double* out = chunk_sums + k * stride;
      std::fill(out, out + stride, 0.0);
      float* stage = thread_stage(size_t(2 * kRunBlock));
      for_channel_runs(p, cell, e0, e1, [&](int64_t c, int64_t first, int64_t last) {
        double sum_dy = 0, sum_dy_xhat = 0;
        for_blocks(last - first, kRunBlock, 0, [&](int64_t b0, int64_t b1) {
          const auto* xs = staged_input(x + base + first + b0, b1 - b0, stage);
          const auto* dys = staged_input(dy + base + first + b0, b1 - b0, stage + kRunBlock);
          const auto [g_sum, p_sum] = sum_pairs<C>(b1 - b0, dys, xs, [&](auto g, auto xe) {
            return std::pair(g, g * ((xe - mean) * r));
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
  void input_grad_contiguous(const KernelInputs& in, const D* dy, CellRange cells,
                             const Coefficients& coef, const double* cell_terms, T* dx) {
    const KernelPlan& p = *in.plan;
    const int64_t length = p.cell_elements;
    const Chunking ch = chunking(p, cells);
    const T* x = static_cast<const T*>(in.x);
    const bool stream = streams_output<T>(p);
    reserve_threads();
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < ch.count; ++k) {
      const int64_t cell = cells.begin + k / ch.per_group;
      const int64_t e0 = (k % ch.per_group) * ch.step, e1 = std::min(length, e0 + ch.step);
      const int64_t base = cell * length;
      const C mean = C(coef.mean[cell]), r = C(coef.rstd[cell]);
      const C a = C(cell_terms[2 * cell]), b = C(cell_terms[2 * cell + 1]);
      float* stage = thread_stage(size_t(3 * kRunBlock));
      for_channel_runs(p, cell, e0, e1, [&](int64_t c, int64_t first, int64_t last) {
        const C scale = coef.scale ? C(coef.scale[c]) : C(1);
        const int64_t start = base + first;
        for_blocks(last - first, kRunBlock, stream ? elements_to_line(dx + start) : 0, [&](int64_t b0, int64_t b1) {
          const int64_t at = start + b0, n = b1 - b0;
          const auto* xs = staged_input(x + at, n, stage);
          const auto* dys = staged_input(dy + at, n, stage + kRunBlock);
          const auto stat_term = [&](int64_t e, auto lanes) {
            const auto xhat = (load_at<C>(lanes, xs + e) - mean) * r;
            return a + xhat * b;
          };
          const auto dx_value = [&](int64_t e, auto lanes, auto stat) {
            return r * (load_at<C>(lanes, dys + e) * scale - stat);
          };
          write_input_grad<T, C>(dx + at, n, stream, stage + 2 * kRunBlock, in.mask ? in.mask + at : nullptr,
                                 stat_term, dx_value);
        });
      });
      if (stream) stream_fence();
    }
  }

  template <class C>
  RowCoefficients<C>& row_coefficients() {
    if constexpr (std::is_same_v<C, float>) return rows_f32_[size_t(omp_get_thread_num())];
    else return rows_f64_[size_t(omp_get_thread_num())];
  }

  // Per-thread buffers (reserve_threads sizes the outer vectors).
  std::vector<std::vector<double>> scratch_, block_f64_;
  std::vector<std::vector<float>> block_f32_, stage_;
  std::vector<RowCoefficients<float>> rows_f32_;
  std::vector<RowCoefficients<double>> rows_f64_;
  std::vector<CellMoments> moments_;
  std::vector<double> sums_;
  // The call's parameters (the layer's host doubles) and dx terms.
  const double* scale_ = nullptr;
  const double* bias_ = nullptr;
  std::vector<double> terms_;
  // Walking-order copies of the call's arrays (plan.permuted) and the mask
  // broadcast to x's shape.
  std::vector<uint8_t> x_gathered_, dy_gathered_, mask_full_, mask_gathered_, out_gathered_;

  Coefficients coefficients(const KernelPlan& p, const CellStatistics& stats, const double* bias) const {
    const HostCellStatistics& s = stats.host();
    return {p.compute_dtype, s.mean.data(), s.rstd.data(), scale_, bias};
  }
  // `data` (the plan's shape) in walking order: itself, or gathered into `buffer`.
  const void* walking_order(const KernelPlan& p, const void* data, int element_bytes, std::vector<uint8_t>& buffer) {
    if (!p.permuted) return data;
    buffer.resize(size_t(element_count(p.shape) * element_bytes));
    permute_on_host(p, data, buffer.data(), element_bytes, true);
    return buffer.data();
  }
};

}  // namespace

void permute_on_host(const KernelPlan& plan, const void* src, void* dst, int element_bytes, bool gather) {
  // Walk the gathered order; for each gathered index find the source offset.
  const int rank = int(plan.permutation.size());
  std::vector<int64_t> source_stride(plan.split_shape.size());
  int64_t stride = 1;
  for (int d = int(plan.split_shape.size()) - 1; d >= 0; --d) {
    source_stride[size_t(d)] = stride;
    stride *= plan.split_shape[size_t(d)];
  }
  const int64_t total = stride;
  if (total == 0) return;
  std::vector<int64_t> gathered_stride(static_cast<size_t>(rank));
  for (int d = 0; d < rank; ++d) gathered_stride[size_t(d)] = source_stride[size_t(plan.permutation[size_t(d)])];
  // The innermost gathered axis is copied as a strided run.
  const int64_t run = plan.permuted_shape[size_t(rank - 1)];
  const int64_t run_stride = gathered_stride[size_t(rank - 1)];
  const int64_t runs = total / run;
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<uint8_t*>(dst);
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < runs; ++k) {
    int64_t rest = k, offset = 0;
    for (int d = rank - 2; d >= 0; --d) {
      const int64_t extent = plan.permuted_shape[size_t(d)];
      offset += (rest % extent) * gathered_stride[size_t(d)];
      rest /= extent;
    }
    for (int64_t e = 0; e < run; ++e) {
      const int64_t s = (offset + e * run_stride) * element_bytes, g = (k * run + e) * element_bytes;
      if (gather) std::copy(in + s, in + s + element_bytes, out + g);
      else std::copy(in + g, in + g + element_bytes, out + s);
    }
  }
}

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace distgn
