// The CUDA kernels, templated on readers/writers (device_common.cuh). Design
// (see also geometry.hpp and docs/cuda.md):
//  - 16-byte vector accesses, consecutive threads on consecutive vectors, so
//    a warp moves 512 contiguous bytes per access; kUnroll independent loads
//    in flight per thread before the first use.
//  - A cell is reduced by many blocks (channel_rows: row chunks x column tiles;
//    contiguous_cells: one warp per segment chunk), each writing a partial.
//    The last block (warp) to finish a slab (cell), found with an atomic
//    counter, merges its partials in a fixed order: statistics and backward
//    sums need no extra launch, and the result is the same bits every run.
//  - Partial moments use a shift that is a value of the cell (the first one,
//    or the first valid finite one under a mask), common to the block, so the
//    block's sums just add; across blocks Chan's merge combines them. Sums
//    of up to kUnroll * vec elements are taken in the input's float type,
//    everything beyond in double.
//  - The elementwise kernels walk their blocks in reverse, so that the data
//    the reduction read last (still in L2) is read first.
#pragma once

#include <string>
#include <type_traits>

#include "core/dtype_dispatch.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/device_common.cuh"

namespace distgn {
namespace cuda {

// ============================================================================
// channel_rows
// ============================================================================

template <class R, bool MASKED>
__global__ void __launch_bounds__(kMaxBlockThreads) rows_stats_kernel(R x, Args<RowsGeometry, StatsFields> a) {
  constexpr int VEC = R::kVec;
  using W = typename R::Wide;
  const RowsGeometry& g = a.g;
  extern __shared__ double smem[];
  double* col_sum = smem;
  double* col_sq = smem + g.tile_cols;
  double* col_count = smem + 2 * g.tile_cols;
  unsigned long long* first_valid = reinterpret_cast<unsigned long long*>(smem + 3 * g.tile_cols);

  const RowsThread t = rows_thread(g, blockIdx.x, threadIdx.x, a.first);
  const RowsGeometry::Block blk = g.block(blockIdx.x);
  const int64_t S = g.group_size;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, warps = blockDim.x / kWarp;

  if constexpr (MASKED) {
    // Each cell's shift is its first valid finite element in this block
    // (row-major over the tile): the smallest such index any thread finds.
    for (int64_t s = tid; s < g.slots; s += blockDim.x) first_valid[s] = ~0ull;
    __syncthreads();
    if (t.active) {
      bool found[VEC];
#pragma unroll
      for (int l = 0; l < VEC; ++l) found[l] = false;
      int remaining = VEC;
      for (int64_t r = t.r0 + t.ty; r < t.r1 && remaining > 0; r += g.ty) {
        W v[VEC];
        uint8_t m[VEC];
        x.load(t.base + r * g.width + t.col, v);
        load_mask<VEC>(a.mask, t.base + r * g.width + t.col, m);
#pragma unroll
        for (int l = 0; l < VEC; ++l)
          if (!found[l] && m[l] && is_finite(v[l])) {
            found[l] = true;
            --remaining;
            const unsigned long long index =
                (unsigned long long)((r - t.r0) * g.tile_cols + (t.col - t.t0 + l));
            atomicMin(&first_valid[(t.col + l) / S - t.cell0], index);
          }
      }
    }
    __syncthreads();
  }
  // The shift of slot s (cell t.cell0 + s): a value of the cell, finite, or 0.
  auto cell_shift = [&](int64_t s) -> W {
    if constexpr (MASKED) {
      const unsigned long long index = first_valid[s];
      if (index == ~0ull) return W(0);
      return x.get(t.base + (t.r0 + int64_t(index / g.tile_cols)) * g.width + t.t0 +
                   int64_t(index % g.tile_cols));
    } else {
      if (t.r0 >= t.r1) return W(0);
      const W v = x.get(t.base + t.r0 * g.width + g.cell_tile_begin(t.cell0 + s, blk.tile));
      return is_finite(v) ? v : W(0);
    }
  };

  // Without a mask every column of a thread sees the same rows: one count.
  constexpr int kCounts = MASKED ? VEC : 1;
  W shift[VEC];
  double sum[VEC], sum_sq[VEC], count[kCounts];
#pragma unroll
  for (int l = 0; l < VEC; ++l) {
    shift[l] = t.active ? cell_shift((t.col + l) / S - t.cell0) : W(0);
    sum[l] = sum_sq[l] = 0;
  }
#pragma unroll
  for (int l = 0; l < kCounts; ++l) count[l] = 0;
  if (t.active) {
    for (int64_t r = t.r0 + t.ty; r < t.r1; r += int64_t(kUnroll) * g.ty) {
      typename R::Raw v[kUnroll];
      MaskPack<VEC> m[kUnroll];
      bool ok[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t row = r + int64_t(u) * g.ty;
        ok[u] = row < t.r1;
        v[u] = typename R::Raw{};
        m[u] = MaskPack<VEC>{};
        if (ok[u]) {
          x.load_raw(t.base + row * g.width + t.col, v[u]);
          if constexpr (MASKED) load_mask<VEC>(a.mask, t.base + row * g.width + t.col, m[u]);
        }
      }
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        W s = 0, q = 0, n = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const bool valid = ok[u] && (!MASKED || m[u].e[l] != 0);
          const W d = valid ? R::lane(v[u], l) - shift[l] : W(0);
          s += d;
          q += d * d;
          n += valid ? W(1) : W(0);
        }
        sum[l] += double(s);
        sum_sq[l] += double(q);
        if constexpr (MASKED) count[l] += double(n);
      }
      if constexpr (!MASKED) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) count[0] += ok[u] ? 1.0 : 0.0;
      }
    }
  }

  // Per column over the block's rows, in ty order.
  for (int k = 0; k < g.ty; ++k) {
    if (t.active && t.ty == k) {
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        const int64_t j = t.col - t.t0 + l;
        col_sum[j] = k == 0 ? sum[l] : col_sum[j] + sum[l];
        col_sq[j] = k == 0 ? sum_sq[l] : col_sq[j] + sum_sq[l];
        const double n = count[MASKED ? l : 0];
        col_count[j] = k == 0 ? n : col_count[j] + n;
      }
    }
    __syncthreads();
  }
  // Per cell of the tile: one partial.
  const int64_t cells = g.tile_cells(blk.tile);
  for (int64_t s = warp; s < cells; s += warps) {
    const int64_t q = t.cell0 + s;
    const int64_t c0 = g.cell_tile_begin(q, blk.tile) - t.t0, c1 = g.cell_tile_end(q, blk.tile) - t.t0;
    double su = 0, sq = 0, n = 0;
    for (int64_t j = c0 + lane; j < c1; j += kWarp) {
      su += col_sum[j];
      sq += col_sq[j];
      n += col_count[j];
    }
    su = warp_sum(su);
    sq = warp_sum(sq);
    n = warp_sum(n);
    if (lane == 0)
      a.partials[int64_t(blockIdx.x) * g.slots + s] = moments_from_shifted_sums(n, double(cell_shift(s)), su, sq);
  }

  if (!last_arrival<Arrival::block>(a.counters + blk.slab, unsigned(g.blocks_per_slab()))) return;
  for (int64_t q = warp; q < g.cells_per_row; q += warps) {
    CellMoments m{0, 0, 0};
    const int64_t n = g.partials_per_cell(q);
    for (int64_t i = lane; i < n; i += kWarp)
      m = merge_moments(m, load_partial(a.partials + g.partial_of_cell(blk.slab, q, i)));
    m = warp_merge(m);
    if (lane == 0) {
      const int64_t cell = t.slab * g.cells_per_row + q;
      if (a.moments) a.moments[cell] = m;
      if (a.finalize) write_cell_state(a.state, cell, m, a.fin);
    }
  }
}

template <class R, class Wr, class C>
__global__ void __launch_bounds__(kMaxBlockThreads)
    rows_normalize_kernel(R x, Wr y, Args<RowsGeometry, NormalizeFields> a) {
  constexpr int VEC = R::kVec;
  constexpr int UNROLL = 2 * kUnroll;
  static_assert(Wr::kVec == VEC, "reader and writer widths differ");
  const RowsGeometry& g = a.g;
  const RowsThread t = rows_thread(g, g.blocks() - 1 - int64_t(blockIdx.x), threadIdx.x, a.first);
  if (!t.active) return;
  C mean[VEC], mul[VEC], add[VEC];
#pragma unroll
  for (int l = 0; l < VEC; ++l) {
    const int64_t j = t.col + l;
    const int64_t cell = t.slab * g.cells_per_row + j / g.group_size, c = j % a.c.channels;
    const C r = C(a.c.rstd[cell]);
    mean[l] = C(a.c.mean[cell]);
    mul[l] = a.c.scale ? r * C(a.c.scale[c]) : r;
    add[l] = a.c.bias ? C(a.c.bias[c]) : C(0);
  }
  for (int64_t r = t.r0 + t.ty; r < t.r1; r += int64_t(UNROLL) * g.ty) {
    typename R::Raw v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t row = r + int64_t(u) * g.ty;
      if (row < t.r1) x.load_raw(t.base + row * g.width + t.col, v[u]);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t row = r + int64_t(u) * g.ty;
      if (row < t.r1) {
        C out[VEC];
#pragma unroll
        for (int l = 0; l < VEC; ++l) out[l] = (C(R::lane(v[u], l)) - mean[l]) * mul[l] + add[l];
        y.store(t.base + row * g.width + t.col, out);
      }
    }
  }
}

template <class RD, class C>
using AccumulatorOf = decltype(typename RD::Wide() * C());

template <class R, class RD, class C>
__global__ void __launch_bounds__(kMaxBlockThreads) rows_sums_kernel(R x, RD dy, Args<RowsGeometry, SumsFields> a) {
  constexpr int VEC = R::kVec;
  static_assert(RD::kVec == VEC, "x and dy readers differ in width");
  using Acc = AccumulatorOf<RD, C>;
  const RowsGeometry& g = a.g;
  const BackwardInputs& in = a.in;
  extern __shared__ double smem[];
  double* col_dy = smem;
  double* col_dx = smem + g.tile_cols;

  const RowsThread t = rows_thread(g, blockIdx.x, threadIdx.x, a.first);
  const RowsGeometry::Block blk = g.block(blockIdx.x);
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, warps = blockDim.x / kWarp;

  C mean[VEC], rstd[VEC];
  double sum_dy[VEC], sum_dyx[VEC];
#pragma unroll
  for (int l = 0; l < VEC; ++l) {
    const int64_t cell = t.active ? t.slab * g.cells_per_row + (t.col + l) / g.group_size : 0;
    mean[l] = t.active ? C(in.c.mean[cell]) : C(0);
    rstd[l] = t.active ? C(in.c.rstd[cell]) : C(0);
    sum_dy[l] = sum_dyx[l] = 0;
  }
  if (t.active) {
    for (int64_t r = t.r0 + t.ty; r < t.r1; r += int64_t(kUnroll) * g.ty) {
      typename R::Raw v[kUnroll];
      typename RD::Raw d[kUnroll];
      bool ok[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t row = r + int64_t(u) * g.ty;
        ok[u] = row < t.r1;
        v[u] = typename R::Raw{};
        d[u] = typename RD::Raw{};
        if (ok[u]) {
          x.load_raw(t.base + row * g.width + t.col, v[u]);
          dy.load_raw(t.base + row * g.width + t.col, d[u]);
        }
      }
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        Acc s = 0, p = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const C xhat = (C(R::lane(v[u], l)) - mean[l]) * rstd[l];
          const Acc gv = Acc(RD::lane(d[u], l));
          s += ok[u] ? gv : Acc(0);
          p += ok[u] ? gv * Acc(xhat) : Acc(0);
        }
        sum_dy[l] += double(s);
        sum_dyx[l] += double(p);
      }
    }
  }
  for (int k = 0; k < g.ty; ++k) {
    if (t.active && t.ty == k) {
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        const int64_t j = t.col - t.t0 + l;
        col_dy[j] = k == 0 ? sum_dy[l] : col_dy[j] + sum_dy[l];
        col_dx[j] = k == 0 ? sum_dyx[l] : col_dx[j] + sum_dyx[l];
      }
    }
    __syncthreads();
  }
  // Per column (for the channel sums) and per cell of the tile (A, B).
  const int64_t width = t.t1 - t.t0;
  for (int64_t j = tid; j < width; j += blockDim.x)
    a.columns[int64_t(blockIdx.x) * g.tile_cols + j] = SumPair{col_dy[j], col_dx[j]};
  const int64_t cells = g.tile_cells(blk.tile);
  for (int64_t s = warp; s < cells; s += warps) {
    const int64_t q = t.cell0 + s;
    const int64_t c0 = g.cell_tile_begin(q, blk.tile) - t.t0, c1 = g.cell_tile_end(q, blk.tile) - t.t0;
    double A = 0, B = 0;
    for (int64_t j = c0 + lane; j < c1; j += kWarp) {
      const double scale = in.c.scale ? double(C(in.c.scale[(t.t0 + j) % in.c.channels])) : 1.0;
      A += scale * col_dy[j];
      B += scale * col_dx[j];
    }
    A = warp_sum(A);
    B = warp_sum(B);
    if (lane == 0) a.partials[int64_t(blockIdx.x) * g.slots + s] = SumPair{A, B};
  }

  if (!last_arrival<Arrival::block>(a.counters + blk.slab, unsigned(g.blocks_per_slab()))) return;
  for (int64_t q = warp; q < g.cells_per_row; q += warps) {
    double A = 0, B = 0;
    const int64_t n = g.partials_per_cell(q);
    for (int64_t i = lane; i < n; i += kWarp) {
      const SumPair p = load_partial(a.partials + g.partial_of_cell(blk.slab, q, i));
      A += p.first;
      B += p.second;
    }
    A = warp_sum(A);
    B = warp_sum(B);
    if (lane == 0) {
      const int64_t cell = t.slab * g.cells_per_row + q;
      a.cell_sums[cell] = SumPair{A, B};
      if (a.terms) {
        const CellTerms t = cell_terms(A, B, in.count[cell], in.clamped[cell] != 0.0);
        a.terms[cell] = SumPair{t.a, t.b};
      }
    }
  }
}

template <class R, class RD, class Wr, class C, bool MASKED>
__global__ void __launch_bounds__(kMaxBlockThreads)
    rows_grad_kernel(R x, RD dy, Wr dx, RowsGeometry g, int64_t first_slab, GradFields a) {
  constexpr int VEC = R::kVec;
  constexpr int UNROLL = kUnroll;
  static_assert(RD::kVec == VEC && Wr::kVec == VEC, "reader and writer widths differ");
  const BackwardInputs& in = a.in;
  const RowsThread t = rows_thread(g, g.blocks() - 1 - int64_t(blockIdx.x), threadIdx.x, first_slab);
  if (!t.active) return;
  // dx = dy * (rstd * scale) + ((x - mean) * (-rstd * rstd * b) - rstd * a), the
  // statistics term dropped at masked positions (the CPU backend's form).
  C mean[VEC], mul[VEC], centered[VEC], offset[VEC];
#pragma unroll
  for (int l = 0; l < VEC; ++l) {
    const int64_t j = t.col + l;
    const int64_t cell = t.slab * g.cells_per_row + j / g.group_size, c = j % in.c.channels;
    const C r = C(in.c.rstd[cell]);
    const SumPair terms = a.terms[cell];
    mean[l] = C(in.c.mean[cell]);
    mul[l] = in.c.scale ? r * C(in.c.scale[c]) : r;
    centered[l] = -r * (r * C(terms.second));
    offset[l] = -r * C(terms.first);
  }
  for (int64_t r = t.r0 + t.ty; r < t.r1; r += int64_t(UNROLL) * g.ty) {
    typename R::Raw v[UNROLL];
    typename RD::Raw d[UNROLL];
    MaskPack<VEC> m[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t row = r + int64_t(u) * g.ty;
      if (row < t.r1) {
        x.load_raw(t.base + row * g.width + t.col, v[u]);
        dy.load_raw(t.base + row * g.width + t.col, d[u]);
        if constexpr (MASKED) load_mask<VEC>(a.mask, t.base + row * g.width + t.col, m[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t row = r + int64_t(u) * g.ty;
      if (row < t.r1) {
        C out[VEC];
#pragma unroll
        for (int l = 0; l < VEC; ++l) {
          const C stat = (C(R::lane(v[u], l)) - mean[l]) * centered[l] + offset[l];
          out[l] = C(RD::lane(d[u], l)) * mul[l] + (!MASKED || m[u].e[l] != 0 ? stat : C(0));
        }
        dx.store(t.base + row * g.width + t.col, out);
      }
    }
  }
}

// ============================================================================
// contiguous_cells: one warp per item (a chunk of one channel's run)
// ============================================================================

// The warp's item: < 0 when the warp has none. `reverse` walks items from the last.
__device__ __forceinline__ int64_t warp_item(const CellsGeometry& g, bool reverse) {
  const int64_t i = int64_t(blockIdx.x) * g.warps + threadIdx.x / kWarp;
  if (i >= g.items()) return -1;
  return reverse ? g.items() - 1 - i : i;
}

template <class R, bool MASKED>
__global__ void __launch_bounds__(kItemWarps * kWarp) cells_stats_kernel(R x, Args<CellsGeometry, StatsFields> a) {
  constexpr int VEC = R::kVec;
  using W = typename R::Wide;
  const CellsGeometry& g = a.g;
  const int64_t item = warp_item(g, false);
  if (item < 0) return;
  const int lane = threadIdx.x % kWarp;
  const CellsGeometry::Item it = g.item(item);
  const int64_t base = a.first * g.cell_elements();
  const ItemRange rg = item_range(base + it.begin, base + it.end, VEC);
  const int64_t head = rg.body_begin - rg.begin, tail = rg.end - rg.body_end;

  W shift = 0;
  if constexpr (MASKED) {
    // The item's first valid finite element (offsets fit 32 bits: items are short).
    uint32_t best = ~0u;
    auto consider = [&](int64_t i, W v, uint8_t m) {
      if (best == ~0u && m != 0 && is_finite(v)) best = uint32_t(i - rg.begin);
    };
    if (lane < head) consider(rg.begin + lane, x.get(rg.begin + lane), a.mask[rg.begin + lane]);
    for (int64_t i = rg.body_begin + int64_t(lane) * VEC; i < rg.body_end && best == ~0u; i += int64_t(kWarp) * VEC) {
      W v[VEC];
      uint8_t m[VEC];
      x.load(i, v);
      load_mask<VEC>(a.mask, i, m);
#pragma unroll
      for (int l = 0; l < VEC; ++l) consider(i + l, v[l], m[l]);
    }
    if (lane < tail) consider(rg.body_end + lane, x.get(rg.body_end + lane), a.mask[rg.body_end + lane]);
    best = warp_min(best);
    shift = best == ~0u ? W(0) : x.get(rg.begin + best);
  } else {
    if (rg.begin < rg.end) shift = x.get(rg.begin);
    if (!is_finite(shift)) shift = W(0);
  }

  double sum = 0, sum_sq = 0, count = 0;
  auto scalar = [&](int64_t i) {
    const bool valid = !MASKED || a.mask[i] != 0;
    const W d = valid ? x.get(i) - shift : W(0);
    sum += double(d);
    sum_sq += double(d * d);
    count += valid ? 1.0 : 0.0;
  };
  if (lane < head) scalar(rg.begin + lane);
  if (lane < tail) scalar(rg.body_end + lane);
  constexpr int64_t kStep = int64_t(kWarp) * VEC;
  for (int64_t i = rg.body_begin + int64_t(lane) * VEC; i < rg.body_end; i += kStep * kUnroll) {
    typename R::Raw v[kUnroll];
    MaskPack<VEC> m[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t at = i + u * kStep;
      ok[u] = at < rg.body_end;
      v[u] = typename R::Raw{};
      m[u] = MaskPack<VEC>{};
      if (ok[u]) {
        x.load_raw(at, v[u]);
        if constexpr (MASKED) load_mask<VEC>(a.mask, at, m[u]);
      }
    }
    W s = 0, q = 0, n = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        const bool valid = ok[u] && (!MASKED || m[u].e[l] != 0);
        const W d = valid ? R::lane(v[u], l) - shift : W(0);
        s += d;
        q += d * d;
        n += valid ? W(1) : W(0);
      }
    sum += double(s);
    sum_sq += double(q);
    count += double(n);
  }
  sum = warp_sum(sum);
  sum_sq = warp_sum(sum_sq);
  count = warp_sum(count);
  const auto write_partial = [&] { a.partials[item] = moments_from_shifted_sums(count, double(shift), sum, sum_sq); };
  if (!last_arrival<Arrival::warp>(a.counters + it.cell, unsigned(g.items_per_cell()), write_partial)) return;
  const int64_t n = g.items_per_cell(), first = it.cell * n;
  CellMoments m{0, 0, 0};
  for (int64_t i = lane; i < n; i += kWarp) m = merge_moments(m, load_partial(a.partials + first + i));
  m = warp_merge(m);
  if (lane == 0) {
    const int64_t cell = a.first + it.cell;
    if (a.moments) a.moments[cell] = m;
    if (a.finalize) write_cell_state(a.state, cell, m, a.fin);
  }
}

template <class R, class Wr, class C>
__global__ void __launch_bounds__(kItemWarps * kWarp)
    cells_normalize_kernel(R x, Wr y, Args<CellsGeometry, NormalizeFields> a) {
  constexpr int VEC = R::kVec;
  constexpr int UNROLL = 2 * kUnroll;
  static_assert(Wr::kVec == VEC, "reader and writer widths differ");
  const CellsGeometry& g = a.g;
  const int64_t item = warp_item(g, true);
  if (item < 0) return;
  const int lane = threadIdx.x % kWarp;
  const CellsGeometry::Item it = g.item(item);
  const int64_t base = a.first * g.cell_elements();
  const ItemRange rg = item_range(base + it.begin, base + it.end, VEC);
  const int64_t cell = a.first + it.cell, c = (cell % a.c.groups) * g.segments + it.segment;
  const C r = C(a.c.rstd[cell]), mean = C(a.c.mean[cell]);
  const C mul = a.c.scale ? r * C(a.c.scale[c]) : r;
  const C add = a.c.bias ? C(a.c.bias[c]) : C(0);

  auto scalar = [&](int64_t i) { y.put(i, (C(x.get(i)) - mean) * mul + add); };
  if (lane < rg.body_begin - rg.begin) scalar(rg.begin + lane);
  if (lane < rg.end - rg.body_end) scalar(rg.body_end + lane);
  constexpr int64_t kStep = int64_t(kWarp) * VEC;
  for (int64_t i = rg.body_begin + int64_t(lane) * VEC; i < rg.body_end; i += kStep * UNROLL) {
    typename R::Raw v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (i + u * kStep < rg.body_end) x.load_raw(i + u * kStep, v[u]);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (i + u * kStep < rg.body_end) {
        C out[VEC];
#pragma unroll
        for (int l = 0; l < VEC; ++l) out[l] = (C(R::lane(v[u], l)) - mean) * mul + add;
        y.store(i + u * kStep, out);
      }
  }
}

template <class R, class RD, class C>
__global__ void __launch_bounds__(kItemWarps * kWarp) cells_sums_kernel(R x, RD dy, Args<CellsGeometry, SumsFields> a) {
  constexpr int VEC = R::kVec;
  static_assert(RD::kVec == VEC, "x and dy readers differ in width");
  using Acc = AccumulatorOf<RD, C>;
  const CellsGeometry& g = a.g;
  const BackwardInputs& in = a.in;
  const int64_t item = warp_item(g, false);
  if (item < 0) return;
  const int lane = threadIdx.x % kWarp;
  const CellsGeometry::Item it = g.item(item);
  const int64_t base = a.first * g.cell_elements();
  const ItemRange rg = item_range(base + it.begin, base + it.end, VEC);
  const int64_t cell = a.first + it.cell;
  const C mean = C(in.c.mean[cell]), rstd = C(in.c.rstd[cell]);

  double sum_dy = 0, sum_dyx = 0;
  auto scalar = [&](int64_t i) {
    const C xhat = (C(x.get(i)) - mean) * rstd;
    const Acc gv = Acc(dy.get(i));
    sum_dy += double(gv);
    sum_dyx += double(gv * Acc(xhat));
  };
  if (lane < rg.body_begin - rg.begin) scalar(rg.begin + lane);
  if (lane < rg.end - rg.body_end) scalar(rg.body_end + lane);
  constexpr int64_t kStep = int64_t(kWarp) * VEC;
  for (int64_t i = rg.body_begin + int64_t(lane) * VEC; i < rg.body_end; i += kStep * kUnroll) {
    typename R::Raw v[kUnroll];
    typename RD::Raw d[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t at = i + u * kStep;
      ok[u] = at < rg.body_end;
      v[u] = typename R::Raw{};
      d[u] = typename RD::Raw{};
      if (ok[u]) {
        x.load_raw(at, v[u]);
        dy.load_raw(at, d[u]);
      }
    }
    Acc s = 0, p = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        const C xhat = (C(R::lane(v[u], l)) - mean) * rstd;
        const Acc gv = Acc(RD::lane(d[u], l));
        s += ok[u] ? gv : Acc(0);
        p += ok[u] ? gv * Acc(xhat) : Acc(0);
      }
    sum_dy += double(s);
    sum_dyx += double(p);
  }
  sum_dy = warp_sum(sum_dy);
  sum_dyx = warp_sum(sum_dyx);
  const auto write_partial = [&] { a.partials[item] = SumPair{sum_dy, sum_dyx}; };
  if (!last_arrival<Arrival::warp>(a.counters + it.cell, unsigned(g.items_per_cell()), write_partial)) return;
  const int64_t n = g.items_per_cell(), first = it.cell * n;
  const int64_t channel0 = (cell % in.c.groups) * g.segments;
  double A = 0, B = 0;
  for (int64_t i = lane; i < n; i += kWarp) {
    const SumPair p = load_partial(a.partials + first + i);
    const double scale = in.c.scale ? double(C(in.c.scale[channel0 + i / g.chunks])) : 1.0;
    A += scale * p.first;
    B += scale * p.second;
  }
  A = warp_sum(A);
  B = warp_sum(B);
  if (lane == 0) {
    a.cell_sums[cell] = SumPair{A, B};
    if (a.terms) {
      const CellTerms t = cell_terms(A, B, in.count[cell], in.clamped[cell] != 0.0);
      a.terms[cell] = SumPair{t.a, t.b};
    }
  }
}

template <class R, class RD, class Wr, class C, bool MASKED>
__global__ void __launch_bounds__(kItemWarps * kWarp)
    cells_grad_kernel(R x, RD dy, Wr dx, CellsGeometry g, int64_t first_cell, GradFields a) {
  constexpr int VEC = R::kVec;
  constexpr int UNROLL = kUnroll;
  static_assert(RD::kVec == VEC && Wr::kVec == VEC, "reader and writer widths differ");
  const BackwardInputs& in = a.in;
  const int64_t item = warp_item(g, true);
  if (item < 0) return;
  const int lane = threadIdx.x % kWarp;
  const CellsGeometry::Item it = g.item(item);
  const int64_t base = first_cell * g.cell_elements();
  const ItemRange rg = item_range(base + it.begin, base + it.end, VEC);
  const int64_t cell = first_cell + it.cell, c = (cell % in.c.groups) * g.segments + it.segment;
  // dx = rstd * (dy * scale - m * (a + xhat * b)): the CPU backend's form.
  const C r = C(in.c.rstd[cell]), mean = C(in.c.mean[cell]);
  const C scale = in.c.scale ? C(in.c.scale[c]) : C(1);
  const SumPair terms = a.terms[cell];
  const C ta = C(terms.first), tb = C(terms.second);

  auto value = [&](auto xv, auto dv, bool valid) {
    const C xhat = (C(xv) - mean) * r;
    const C gv = C(dv) * scale;
    return r * (gv - (valid ? ta + xhat * tb : C(0)));
  };
  auto scalar = [&](int64_t i) { dx.put(i, value(x.get(i), dy.get(i), !MASKED || a.mask[i] != 0)); };
  if (lane < rg.body_begin - rg.begin) scalar(rg.begin + lane);
  if (lane < rg.end - rg.body_end) scalar(rg.body_end + lane);
  constexpr int64_t kStep = int64_t(kWarp) * VEC;
  for (int64_t i = rg.body_begin + int64_t(lane) * VEC; i < rg.body_end; i += kStep * UNROLL) {
    typename R::Raw v[UNROLL];
    typename RD::Raw d[UNROLL];
    MaskPack<VEC> m[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (i + u * kStep < rg.body_end) {
        x.load_raw(i + u * kStep, v[u]);
        dy.load_raw(i + u * kStep, d[u]);
        if constexpr (MASKED) load_mask<VEC>(a.mask, i + u * kStep, m[u]);
      }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (i + u * kStep < rg.body_end) {
        C out[VEC];
#pragma unroll
        for (int l = 0; l < VEC; ++l)
          out[l] = value(R::lane(v[u], l), RD::lane(d[u], l), !MASKED || m[u].e[l] != 0);
        dx.store(i + u * kStep, out);
      }
  }
}

// ---- dispatch helpers ------------------------------------------------------------------

template <class T>
constexpr int full_vec_of() {
  return int(16 / sizeof(T));
}

// Lanes per access for element type T: a 16-byte vector, or 1 for the
// generic kernels (AnyDType, the dtype known only at run time).
template <class T>
constexpr int vec_of() {
  if constexpr (std::is_same_v<T, AnyDType>) return 1;
  else return full_vec_of<T>();
}

// The kernels' view of an input or output array of element type T.
template <class T, int VEC>
auto reader(const void* p, DType dtype) {
  if constexpr (std::is_same_v<T, AnyDType>) return Reader<AnyDType, 1>{p, dtype};
  else return Reader<T, VEC>{static_cast<const T*>(p)};
}

template <class T, int VEC>
auto writer(void* p, DType dtype) {
  if constexpr (std::is_same_v<T, AnyDType>) return Writer<AnyDType, 1>{p, dtype};
  else return Writer<T, VEC>{static_cast<T*>(p)};
}

// The one dtype dispatch of the kernel families: f(t, u, c), the tags of
// x's storage type T, of a second array's U (y, dy) and of the compute type
// C. With vec 1, AnyDType tags: the generic kernels, any dtypes. Otherwise
// the typed, vectorised kernels, which exist where Rule::typed<T, U, C>()
// holds and take vec = 16 bytes of T.
template <class F>
void with_dtypes(DType x, DType other, DType compute, F&& f) {
  with_storage_type(x, [&](auto t) {
    with_storage_type(other, [&](auto u) { with_compute_type(compute, [&](auto c) { f(t, u, c); }); });
  });
}

template <class Rule>
bool has_typed(DType x, DType other, DType compute) {
  bool typed = false;
  with_dtypes(x, other, compute, [&](auto t, auto u, auto c) {
    typed = Rule::template typed<decltype(t), decltype(u), decltype(c)>();
  });
  return typed;
}

template <class Rule, class F>
void with_kernel_types(const char* what, int vec, DType x, DType other, DType compute, F&& f) {
  if (vec == 1) {
    with_compute_type(compute, [&](auto c) { f(AnyDType{}, AnyDType{}, c); });
    return;
  }
  bool launched = false;
  with_dtypes(x, other, compute, [&](auto t, auto u, auto c) {
    using T = decltype(t);
    if constexpr (Rule::template typed<T, decltype(u), decltype(c)>()) {
      if (vec != full_vec_of<T>())
        throw Error(std::string("CUDA ") + what + ": vector width " + std::to_string(vec) + " does not suit " +
                    dtype_name(x) + " (1 or " + std::to_string(full_vec_of<T>()) + ")");
      f(t, u, c);
      launched = true;
    }
  });
  if (!launched)
    throw Error(std::string("CUDA ") + what + ": no vectorised kernel for " + dtype_name(x) + " with " +
                dtype_name(other) + " and " + dtype_name(compute) + " arithmetic (the caller must choose vec 1)");
}

// ---- launches ----------------------------------------------------------------------------

// Every kernel launch of src/cuda: `blocks` blocks of `threads` threads with
// `shared` bytes of dynamic shared memory on `stream`, after the grid's size
// check (none for an empty grid), then the launch's error check. The one
// launch statement of src/cuda, which the emulator's convert.py rewrites.
template <class... P, class... A>
void launch_kernel(Stream stream, const char* name, int64_t blocks, int threads, size_t shared,
                   void (*kernel)(P...), const A&... args) {
  const unsigned grid = grid_size(blocks, name);
  if (blocks <= 0) return;
  kernel<<<grid, threads, shared, stream>>>(args...);
  DISTGN_CUDA_CHECK_LAUNCH(name);
}

// f(k): a over the geometry of its form (a RowsGeometry or a CellsGeometry),
// the arguments of that form's kernels. (The form is dispatched first, then
// the dtypes and the mask: the kernels are instantiated in that order.)
template <class F, class Fn>
void with_form(const Args<Geometry, F>& a, Fn&& f) {
  if (a.g.channel_rows) f(over(a, a.g.rows));
  else f(over(a, a.g.cells));
}

// Is K (or the type it refers to) a family's arguments over a RowsGeometry?
template <class K>
constexpr bool over_rows() {
  return std::is_same_v<decltype(std::decay_t<K>::g), RowsGeometry>;
}

// A kernel family's launch over k's geometry: pick(masked) names the
// instantiation for the mask flag (a std::bool_constant), launched with
// `shared` bytes of dynamic shared memory and the arguments args.
template <class K, class Pick, class... A>
void launch_family(Stream stream, const char* name, const K& k, bool masked, size_t shared, Pick pick,
                   const A&... args) {
  launch_kernel(stream, name, k.g.blocks(), k.g.block_threads(), shared,
                masked ? pick(std::true_type{}) : pick(std::false_type{}), args...);
}

}  // namespace cuda
}  // namespace distgn
