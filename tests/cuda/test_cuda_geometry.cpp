// The CUDA kernels' work decomposition and index maps (src/cuda/geometry.hpp,
// src/cuda/index_maps.hpp), run on the CPU: no GPU needed. The kernels'
// thread and item mappings are walked exactly as the kernels walk them, and
// the reductions are replayed with the kernels' shift rule and merge order:
//  - every element is visited by exactly one thread (lane), vectors aligned;
//  - every partial a block (item) writes is read by exactly one merge, and the
//    merged moments equal a direct two-pass computation;
//  - the channel sums read exactly the partials of their channel;
//  - the gather and mask maps agree with the CPU backend's permute and
//    numpy broadcasting.
#include <catch2/catch.hpp>

#include <cmath>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "core/cell_stats.hpp"
#include "cpu/cpu_backend.hpp"
#include "cuda/geometry.hpp"
#include "cuda/index_maps.hpp"
#include "distgn/config.hpp"
#include "reference.hpp"

using namespace distgn;
using namespace distgn::cuda;

namespace {

// The replayed moments against the reference's two-pass ones.
void check_moments(const CellMoments& got, const std::vector<double>& values) {
  REQUIRE(got.count == double(values.size()));
  if (values.empty()) return;
  const distgn_test::Moments want = distgn_test::two_pass_moments(values);
  CHECK(got.mean == Approx(double(want.mean)).epsilon(1e-12).margin(1e-12));
  CHECK(got.m2 == Approx(double(want.m2)).epsilon(1e-9).margin(1e-9));
}

// Values with |mean| >> std in some cells, an occasional masked element.
struct Data {
  std::vector<double> x;
  std::vector<uint8_t> mask;
};

Data make_data(int64_t n, uint64_t seed, bool masked) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  Data d;
  d.x.resize(size_t(n));
  d.mask.assign(size_t(n), 1);
  for (int64_t i = 0; i < n; ++i) {
    d.x[size_t(i)] = 100.0 * double((i / 7) % 5) + normal(rng);
    if (masked) d.mask[size_t(i)] = (rng() % 4) != 0;
  }
  return d;
}

struct RowsCase {
  int64_t slabs, rows, width, group_size, channels;
  int vec;
  int sms;
};

// Replays rows_stats_kernel's decomposition and arithmetic on the CPU.
void replay_rows(const RowsCase& rc, bool masked) {
  INFO("slabs " << rc.slabs << " rows " << rc.rows << " width " << rc.width << " S " << rc.group_size << " vec "
                << rc.vec << " sms " << rc.sms << " masked " << masked);
  const RowsGeometry g = rows_geometry(rc.slabs, rc.rows, rc.width, rc.group_size, rc.vec, rc.sms);
  const int64_t P = rc.width / rc.group_size;
  const int64_t total = rc.slabs * rc.rows * rc.width;
  const Data d = make_data(total, 7 + uint64_t(rc.width), masked);

  // Shape rules the kernels rely on.
  REQUIRE(g.cells_per_row == P);
  REQUIRE(g.tile_cols % rc.vec == 0);
  REQUIRE(g.block_threads() % kWarp == 0);
  REQUIRE(g.block_threads() <= kMaxBlockThreads);
  REQUIRE(g.ty <= kMaxRowThreads);
  REQUIRE(g.chunk_rows % g.ty == 0);
  REQUIRE(g.chunks >= 1);
  REQUIRE(g.chunk_end(g.chunks - 1) == g.rows);
  REQUIRE((3 * g.tile_cols + g.slots) * 8 <= 48 * 1024);
  for (int64_t t = 0; t < g.col_tiles; ++t) REQUIRE(g.tile_cells(t) <= g.slots);

  std::vector<int> visits(static_cast<size_t>(total), 0);
  std::vector<CellMoments> partials(size_t(g.blocks() * g.slots), CellMoments{-1, 0, 0});
  for (int64_t b = 0; b < g.blocks(); ++b) {
    const RowsGeometry::Block blk = g.block(b);
    REQUIRE(g.block_index(blk.slab, blk.chunk, blk.tile) == b);
    // Shift per slot: the kernel's rule.
    std::map<int64_t, double> shift;
    const RowsThread t0 = rows_thread(g, b, 0, 0);
    for (int64_t s = 0; s < g.tile_cells(blk.tile); ++s) {
      const int64_t q = t0.cell0 + s;
      double value = 0;
      if (!masked) {
        if (t0.r0 < t0.r1) value = d.x[size_t(t0.base + t0.r0 * g.width + g.cell_tile_begin(q, blk.tile))];
      } else {
        bool found = false;
        for (int64_t r = t0.r0; r < t0.r1 && !found; ++r)
          for (int64_t j = g.cell_tile_begin(q, blk.tile); j < g.cell_tile_end(q, blk.tile) && !found; ++j) {
            const int64_t at = t0.base + r * g.width + j;
            if (d.mask[size_t(at)]) {
              value = d.x[size_t(at)];
              found = true;
            }
          }
      }
      shift[s] = value;
    }
    // Threads: each of its vec columns over rows r0 + ty, step ty.
    std::map<int64_t, double> sum, sum_sq, count;
    for (int tid = 0; tid < g.block_threads(); ++tid) {
      const RowsThread t = rows_thread(g, b, tid, 0);
      if (!t.active) continue;
      REQUIRE(t.col % rc.vec == 0);
      REQUIRE(t.col + rc.vec <= t.t1);
      for (int64_t r = t.r0 + t.ty; r < t.r1; r += g.ty)
        for (int l = 0; l < rc.vec; ++l) {
          const int64_t at = t.base + r * g.width + t.col + l;
          visits[size_t(at)] += 1;
          const int64_t s = (t.col + l) / rc.group_size - t.cell0;
          REQUIRE(s >= 0);
          REQUIRE(s < g.tile_cells(blk.tile));
          if (!d.mask[size_t(at)]) continue;
          const double diff = d.x[size_t(at)] - shift[s];
          sum[s] += diff;
          sum_sq[s] += diff * diff;
          count[s] += 1;
        }
    }
    for (int64_t s = 0; s < g.tile_cells(blk.tile); ++s)
      partials[size_t(b * g.slots + s)] = moments_from_shifted_sums(count[s], shift[s], sum[s], sum_sq[s]);
  }
  for (int64_t i = 0; i < total; ++i) REQUIRE(visits[size_t(i)] == 1);

  // The last block's merge, in the kernel's order, against a direct computation.
  std::vector<int> reads(partials.size(), 0);
  for (int64_t o = 0; o < g.slabs; ++o)
    for (int64_t q = 0; q < P; ++q) {
      // Lane-strided merges, then the warp tree (lane 0's order).
      std::vector<CellMoments> lanes(kWarp, CellMoments{0, 0, 0});
      for (int64_t i = 0; i < g.partials_per_cell(q); ++i) {
        const int64_t index = g.partial_of_cell(o, q, i);
        REQUIRE(index >= 0);
        REQUIRE(index < int64_t(partials.size()));
        REQUIRE(partials[size_t(index)].count >= 0);  // written
        reads[size_t(index)] += 1;
        lanes[size_t(i % kWarp)] = merge_moments(lanes[size_t(i % kWarp)], partials[size_t(index)]);
      }
      for (int offset = 16; offset > 0; offset >>= 1)
        for (int lane = 0; lane + offset < kWarp; ++lane)
          lanes[size_t(lane)] = merge_moments(lanes[size_t(lane)], lanes[size_t(lane + offset)]);
      std::vector<double> values;
      for (int64_t r = 0; r < g.rows; ++r)
        for (int64_t j = q * rc.group_size; j < (q + 1) * rc.group_size; ++j) {
          const int64_t at = (o * g.rows + r) * g.width + j;
          if (d.mask[size_t(at)]) values.push_back(d.x[size_t(at)]);
        }
      check_moments(lanes[0], values);
    }
  for (int64_t b = 0; b < g.blocks(); ++b)
    for (int64_t s = 0; s < g.slots; ++s)
      REQUIRE(reads[size_t(b * g.slots + s)] == (s < g.tile_cells(g.block(b).tile) ? 1 : 0));

  // Channel sums: each per-column record of a channel exactly once.
  std::vector<int> channel_reads(size_t(g.blocks() * g.tile_cols), 0);
  for (int64_t c = 0; c < rc.channels; ++c)
    for (int64_t i = 0; i < g.channel_terms(rc.channels); ++i) {
      const int64_t index = g.channel_term(rc.channels, c, i);
      const int64_t b = index / g.tile_cols, j = g.tile_begin(g.block(b).tile) + index % g.tile_cols;
      REQUIRE(j < g.width);
      REQUIRE(j % rc.channels == c);
      channel_reads[size_t(index)] += 1;
    }
  for (int64_t b = 0; b < g.blocks(); ++b) {
    const int64_t tile = g.block(b).tile;
    for (int64_t j = 0; j < g.tile_cols; ++j)
      REQUIRE(channel_reads[size_t(b * g.tile_cols + j)] == (g.tile_begin(tile) + j < g.tile_end(tile) ? 1 : 0));
  }
}

struct CellsCase {
  int64_t cells, segments, inner, groups;
  int vec;
  int sms;
  int64_t first_cell;
};

void replay_cells(const CellsCase& cc, bool masked) {
  INFO("cells " << cc.cells << " S " << cc.segments << " inner " << cc.inner << " vec " << cc.vec << " sms " << cc.sms
                << " first cell " << cc.first_cell << " masked " << masked);
  const CellsGeometry g = cells_geometry(cc.cells, cc.segments, cc.inner, cc.vec, cc.sms);
  const int64_t L = g.cell_elements();
  const int64_t base = cc.first_cell * L;
  const int64_t total = base + cc.cells * L;
  const Data d = make_data(total, 11 + uint64_t(cc.inner), masked);
  if (g.chunks > 1) REQUIRE(g.chunk_len % (int64_t(kWarp) * cc.vec) == 0);
  REQUIRE(g.chunks * g.chunk_len >= g.inner);
  REQUIRE(g.chunk_len < (int64_t(1) << 32));

  std::vector<int> visits(static_cast<size_t>(total), 0);
  std::vector<CellMoments> partials(size_t(g.items()));
  for (int64_t item = 0; item < g.items(); ++item) {
    const CellsGeometry::Item it = g.item(item);
    REQUIRE(it.cell * g.items_per_cell() + it.segment * g.chunks + it.chunk == item);
    const ItemRange rg = item_range(base + it.begin, base + it.end, cc.vec);
    REQUIRE(rg.body_begin - rg.begin < cc.vec);
    REQUIRE(rg.end - rg.body_end < cc.vec);
    if (rg.body_begin < rg.body_end) REQUIRE(rg.body_begin % cc.vec == 0);
    REQUIRE((rg.body_end - rg.body_begin) % cc.vec == 0);
    // The kernel's shift: the first (valid) element of the item.
    double shift = 0;
    for (int64_t i = rg.begin; i < rg.end; ++i)
      if (d.mask[size_t(i)]) {
        shift = d.x[size_t(i)];
        break;
      }
    if (!masked && rg.begin < rg.end) shift = d.x[size_t(rg.begin)];
    double sum = 0, sum_sq = 0, count = 0;
    auto take = [&](int64_t i) {
      visits[size_t(i)] += 1;
      if (!d.mask[size_t(i)]) return;
      sum += d.x[size_t(i)] - shift;
      sum_sq += (d.x[size_t(i)] - shift) * (d.x[size_t(i)] - shift);
      count += 1;
    };
    for (int lane = 0; lane < kWarp; ++lane) {
      if (lane < rg.body_begin - rg.begin) take(rg.begin + lane);
      if (lane < rg.end - rg.body_end) take(rg.body_end + lane);
      for (int64_t i = rg.body_begin + int64_t(lane) * cc.vec; i < rg.body_end; i += int64_t(kWarp) * cc.vec)
        for (int l = 0; l < cc.vec; ++l) take(i + l);
    }
    partials[size_t(item)] = moments_from_shifted_sums(count, shift, sum, sum_sq);
  }
  for (int64_t i = base; i < total; ++i) REQUIRE(visits[size_t(i)] == 1);
  for (int64_t i = 0; i < base; ++i) REQUIRE(visits[size_t(i)] == 0);

  for (int64_t c = 0; c < cc.cells; ++c) {
    CellMoments m{0, 0, 0};
    for (int64_t i = 0; i < g.items_per_cell(); ++i) m = merge_moments(m, partials[size_t(c * g.items_per_cell() + i)]);
    std::vector<double> values;
    for (int64_t e = base + c * L; e < base + (c + 1) * L; ++e)
      if (d.mask[size_t(e)]) values.push_back(d.x[size_t(e)]);
    check_moments(m, values);
  }

  // Channel sums: channel (g, s) reads the items of segment s of the cells of group g.
  std::vector<int> reads(size_t(g.items()), 0);
  for (int64_t group = 0; group < cc.groups; ++group)
    for (int64_t s = 0; s < g.segments; ++s)
      for (int64_t i = 0; i < g.channel_terms(cc.first_cell, cc.groups, group); ++i) {
        const int64_t item = g.channel_term(cc.first_cell, cc.groups, group, s, i);
        REQUIRE(item >= 0);
        REQUIRE(item < g.items());
        const CellsGeometry::Item it = g.item(item);
        REQUIRE((cc.first_cell + it.cell) % cc.groups == group);
        REQUIRE(it.segment == s);
        reads[size_t(item)] += 1;
      }
  for (int64_t i = 0; i < g.items(); ++i) REQUIRE(reads[size_t(i)] == 1);
}

}  // namespace

TEST_CASE("cuda geometry: channel_rows blocks cover every element once and merge every partial once", "[cuda][geometry]") {
  const std::vector<RowsCase> cases = {
      {2, 64, 320, 10, 320, 8, 132},    // NHWC 2x8x8x320, G=32, bfloat16 vectors
      {1, 100, 640, 20, 640, 4, 132},   // float32 vectors
      {3, 37, 96, 3, 96, 8, 4},         // few SMs, ragged chunks
      {2, 5, 12, 4, 12, 4, 132},        // tiny
      {1, 0, 64, 2, 64, 8, 132},        // an empty shard
      {2, 9, 2996, 7, 2996, 1, 132},    // several column tiles, cells straddling them
      {1, 33, 4096, 4096, 4096, 8, 8},  // one cell per row, wider than a tile
      {2, 17, 1536, 6, 512, 8, 16},     // three channel sets per row (reduction over axes 1 and 3)
      {4, 3, 7, 1, 7, 1, 132},          // odd width: scalar path
      {1, 500, 16, 16, 16, 8, 132},     // narrow rows: ty capped
  };
  for (const RowsCase& c : cases) {
    replay_rows(c, false);
    replay_rows(c, true);
  }
}

TEST_CASE("cuda geometry: channel_rows grids for the benchmark shapes", "[cuda][geometry]") {
  // 8x64x64x320 bfloat16 on 132 SMs: one column tile, 40 x 12 threads, enough blocks.
  const RowsGeometry g = rows_geometry(8, 64 * 64, 320, 10, 8, 132);
  CHECK(g.col_tiles == 1);
  CHECK(g.tx == 40);
  CHECK(g.block_threads() == 480);
  CHECK(g.blocks() >= 2 * 132);
  // 1x20x256x256x128 (one slab of 1.3M rows): hundreds of chunks.
  const RowsGeometry big = rows_geometry(1, int64_t(20) * 256 * 256, 128, 4, 8, 132);
  CHECK(big.blocks() >= 3 * 132);
  CHECK(big.chunk_rows * big.chunks >= big.rows);
  // Offsets of a tensor beyond 2^31 elements stay exact in int64.
  const RowsGeometry huge = rows_geometry(4, int64_t(1) << 22, 512, 16, 8, 132);
  const RowsThread last = rows_thread(huge, huge.blocks() - 1, huge.block_threads() - 1, 0);
  CHECK(last.base + (last.r1 - 1) * huge.width + huge.width - 1 == 4 * (int64_t(1) << 22) * 512 - 1);
}

TEST_CASE("cuda geometry: contiguous_cells items cover every element once", "[cuda][geometry]") {
  const std::vector<CellsCase> cases = {
      {4, 10, 4096, 2, 8, 132, 0},   // NCHW 64x64 images
      {2, 4, 16384, 2, 4, 132, 0},   // long segments split into chunks
      {3, 5, 49, 3, 8, 132, 5},      // 7x7: heads and tails, a later first cell
      {6, 2, 1, 3, 8, 132, 0},       // inner 1
      {2, 3, 0, 2, 8, 132, 0},       // an empty shard
      {1, 1, 100003, 1, 2, 4, 0},    // prime length, few SMs
      {5, 7, 33, 5, 1, 132, 2},      // scalar path
  };
  for (const CellsCase& c : cases) {
    replay_cells(c, false);
    replay_cells(c, true);
  }
}

TEST_CASE("cuda index maps: the gather map is the CPU backend's permute", "[cuda][geometry]") {
  struct Case {
    Shape shape;
    Layout layout;
    std::vector<int64_t> axes;
  };
  const std::vector<Case> cases = {
      {{2, 6, 3, 4}, Layout::channels_first, {1, 2}},
      {{2, 3, 4, 5, 6}, Layout::channels_last, {1, 3, 4}},
      {{3, 4, 6}, Layout::channels_last, {0, 2}},
      {{2, 4, 3, 5}, Layout::channels_first, {0, 1, 3}},
  };
  for (const Case& c : cases) {
    GroupNormConfig config;
    config.num_groups = 2;
    config.reduction_axes = c.axes;
    const KernelPlan plan = resolve_kernel_plan(config, c.shape, c.layout, DType::f32);
    INFO(shape_string(c.shape) << " permuted " << plan.permuted);
    const int64_t n = element_count(c.shape);
    std::vector<float> x(static_cast<size_t>(n)), cpu(x.size()), mapped(x.size());
    for (int64_t i = 0; i < n; ++i) x[size_t(i)] = float(i);
    const StridedIndex map = walking_source_map(plan);
    for (int64_t i = 0; i < n; ++i) mapped[size_t(i)] = x[size_t(map.offset(i))];
    if (plan.permuted) {
      permute_on_host(plan, x.data(), cpu.data(), 4, true);
      CHECK(mapped == cpu);
    } else {
      CHECK(mapped == x);  // identity when the plan walks x in place
    }
  }
}

TEST_CASE("cuda index maps: the mask map broadcasts like numpy in walking order", "[cuda][geometry]") {
  struct Case {
    Shape shape;
    Layout layout;
    std::optional<std::vector<int64_t>> axes;
    Shape mask;
  };
  const std::vector<Case> cases = {
      {{2, 3, 4, 6}, Layout::channels_last, std::nullopt, {3, 4, 6}},
      {{2, 3, 4, 6}, Layout::channels_last, std::nullopt, {2, 1, 1, 6}},
      {{2, 3, 4, 6}, Layout::channels_last, std::nullopt, {1, 3, 4, 6}},
      {{2, 6, 3, 4}, Layout::channels_first, std::nullopt, {2, 6, 1, 4}},
      {{2, 6, 3, 4}, Layout::channels_first, std::vector<int64_t>{1, 2}, {1, 6, 3, 4}},
      {{2, 3, 4, 5, 6}, Layout::channels_last, std::vector<int64_t>{1, 3, 4}, {2, 3, 1, 5, 6}},
  };
  for (const Case& c : cases) {
    GroupNormConfig config;
    config.num_groups = 3;
    config.reduction_axes = c.axes;
    const KernelPlan plan = resolve_kernel_plan(config, c.shape, c.layout, DType::f32);
    INFO(shape_string(c.shape) << " mask " << shape_string(c.mask));
    const int64_t n = element_count(c.shape), m = element_count(c.mask);
    std::vector<uint8_t> mask(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) mask[size_t(i)] = uint8_t(1 + i % 251);
    // numpy broadcast to x's shape, row-major
    std::vector<uint8_t> full(static_cast<size_t>(n));
    const size_t rank = c.shape.size(), lead = rank - c.mask.size();
    for (int64_t e = 0; e < n; ++e) {
      int64_t rest = e, offset = 0, stride = 1;
      for (size_t d = rank; d-- > 0;) {
        const int64_t index = rest % c.shape[d];
        rest /= c.shape[d];
        if (d >= lead) {
          const int64_t extent = c.mask[d - lead];
          offset += (extent == 1 ? 0 : index) * stride;
          stride *= extent;
        }
      }
      full[size_t(e)] = mask[size_t(offset)];
    }
    std::vector<uint8_t> want(static_cast<size_t>(n));
    if (plan.permuted) permute_on_host(plan, full.data(), want.data(), 1, true);
    else want = full;
    const StridedIndex map = walking_mask_map(plan, c.mask);
    std::vector<uint8_t> got(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) got[size_t(i)] = mask[size_t(map.offset(i))];
    CHECK(got == want);
  }
}
