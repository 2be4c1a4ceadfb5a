// How the CUDA kernels cut one rank's data into thread blocks, warps and
// per-block partial results, and how they map a walking-order index back to
// an offset. Plain C++ with __host__ __device__ functions: the kernels use it
// on the GPU and tests/cuda/test_cuda_geometry.cpp walks the same mappings on
// the CPU (every element covered exactly once, every partial read exactly
// once), so the index arithmetic is tested where no GPU is.
//
// Two forms, those of KernelPlan (src/core/kernel_plan.hpp):
//
//  channel_rows    [slabs][rows][width], width = P * S, column j of slab o is
//                  cell o * P + j / S and channel j % C. A block covers a tile
//                  of columns (tx threads x vec elements: every thread keeps
//                  the same vec columns, hence the same cells and channels,
//                  in registers) and a chunk of rows (ty threads deep). Each
//                  block writes one partial per cell of its tile ("slot").
//
//  contiguous_cells [cells][S][inner]: a cell is S contiguous runs of `inner`
//                  elements, one per channel ("segments"). A warp processes one
//                  item: a chunk of one segment, so every element of an item has
//                  the same cell and channel. Each item writes one partial.
//
// All element offsets are int64_t: tensors beyond 2^31 elements are fine.
#pragma once

#include <algorithm>
#include <cstdint>

#include "core/half.hpp"  // DISTGN_HD

namespace distgn {
namespace cuda {

constexpr int kWarp = 32;
// Independent vector loads in flight per thread in the reducing kernels.
constexpr int kUnroll = 4;
// channel_rows: columns per column tile. The block reduction keeps three
// doubles per column in shared memory (24 KB at 1024 columns).
constexpr int64_t kMaxTileColumns = 1024;
constexpr int kMaxBlockThreads = 512;
constexpr int kMaxRowThreads = 32;  // ty: rounds of the block reduction
constexpr int64_t kMinRowsPerThread = 8;
// Blocks aimed at per multiprocessor when sizing grids (channel_rows).
constexpr int64_t kBlocksPerSm = 4;
// contiguous_cells: warps (items) per block, and item lengths in vectors per lane.
constexpr int kItemWarps = 8;
constexpr int64_t kMinItemVectorsPerLane = 4;
constexpr int64_t kMaxItemVectorsPerLane = 32;
// Rank of the split shape (x's rank + 1) the index maps support.
constexpr int kMaxRank = 16;

DISTGN_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
DISTGN_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
DISTGN_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
DISTGN_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- channel_rows -----------------------------------------------------------

struct RowsGeometry {
  int64_t slabs = 0;          // slabs (outer indices) in one launch
  int64_t rows = 0;           // rows per slab
  int64_t width = 1;          // elements per row (W = P * S)
  int64_t group_size = 1;     // S
  int64_t cells_per_row = 1;  // P
  int vec = 1;                // elements per vector access; divides width
  int tx = 1, ty = 1;         // threads per block: tx across a tile, ty down the rows
  int64_t tile_cols = 1;      // columns per column tile (tx * vec)
  int64_t col_tiles = 1;
  int64_t chunk_rows = 1;     // rows per block (a multiple of ty)
  int64_t chunks = 1;         // row chunks per slab (at least 1, even with 0 rows)
  int64_t slots = 1;          // partial records per block: cells a tile can touch

  DISTGN_HD int threads() const { return tx * ty; }
  // Threads a block is launched with: whole warps (the extra threads only
  // join the reductions).
  DISTGN_HD int block_threads() const { return int(round_up(threads(), kWarp)); }
  DISTGN_HD int64_t blocks_per_slab() const { return chunks * col_tiles; }
  DISTGN_HD int64_t blocks() const { return slabs * blocks_per_slab(); }

  struct Block {
    int64_t slab, chunk, tile;
  };
  DISTGN_HD Block block(int64_t b) const {
    return Block{b / blocks_per_slab(), (b / col_tiles) % chunks, b % col_tiles};
  }
  DISTGN_HD int64_t block_index(int64_t slab, int64_t chunk, int64_t tile) const {
    return (slab * chunks + chunk) * col_tiles + tile;
  }

  DISTGN_HD int64_t tile_begin(int64_t t) const { return t * tile_cols; }
  DISTGN_HD int64_t tile_end(int64_t t) const { return min64(width, (t + 1) * tile_cols); }
  DISTGN_HD int64_t tile_first_cell(int64_t t) const { return tile_begin(t) / group_size; }
  DISTGN_HD int64_t tile_cells(int64_t t) const {
    return (tile_end(t) - 1) / group_size - tile_first_cell(t) + 1;
  }
  DISTGN_HD int64_t cell_first_tile(int64_t q) const { return q * group_size / tile_cols; }
  DISTGN_HD int64_t cell_last_tile(int64_t q) const { return ((q + 1) * group_size - 1) / tile_cols; }
  // Columns of cell q inside tile t: [begin, end).
  DISTGN_HD int64_t cell_tile_begin(int64_t q, int64_t t) const {
    return max64(q * group_size, tile_begin(t));
  }
  DISTGN_HD int64_t cell_tile_end(int64_t q, int64_t t) const {
    return min64((q + 1) * group_size, tile_end(t));
  }

  DISTGN_HD int64_t chunk_begin(int64_t k) const { return min64(rows, k * chunk_rows); }
  DISTGN_HD int64_t chunk_end(int64_t k) const { return min64(rows, (k + 1) * chunk_rows); }

  // The partials of cell q (0 <= q < P) of launch slab o: partials_per_cell(q)
  // records, the i-th at index partial_of_cell(o, q, i), chunk-major.
  DISTGN_HD int64_t partials_per_cell(int64_t q) const {
    return chunks * (cell_last_tile(q) - cell_first_tile(q) + 1);
  }
  DISTGN_HD int64_t partial_of_cell(int64_t o, int64_t q, int64_t i) const {
    const int64_t tiles = cell_last_tile(q) - cell_first_tile(q) + 1;
    const int64_t k = i / tiles, t = cell_first_tile(q) + i % tiles;
    return block_index(o, k, t) * slots + (q - tile_first_cell(t));
  }

  // Channel sums: channel c gathers, over every slab and chunk, the columns
  // j = c + m * C (m < width / C). The i-th of channel_terms() terms is the
  // per-column record at channel_term(c, i) of the [blocks][tile_cols] array.
  DISTGN_HD int64_t channel_terms(int64_t channels) const { return slabs * chunks * (width / channels); }
  DISTGN_HD int64_t channel_term(int64_t channels, int64_t c, int64_t i) const {
    const int64_t per_row = width / channels;
    const int64_t m = i % per_row, ok = i / per_row;
    const int64_t o = ok / chunks, k = ok % chunks;
    const int64_t j = c + m * channels, t = j / tile_cols;
    return block_index(o, k, t) * tile_cols + (j - tile_begin(t));
  }
};

// Where thread `tid` of block `block` works.
struct RowsThread {
  int64_t t0, t1;  // the tile's columns
  int64_t col;     // the thread's first column (vec columns from here)
  int64_t r0, r1;  // the chunk's rows: the thread takes r0 + ty, r0 + ty + ty_count, ...
  int64_t slab;    // absolute slab
  int64_t base;    // element offset of the slab
  int64_t cell0;   // slab-relative cell of slot 0
  int tx, ty;
  bool active;  // has columns: tid < tx * ty and col < t1
};

DISTGN_HD RowsThread rows_thread(const RowsGeometry& g, int64_t block, int tid, int64_t first_slab) {
  RowsThread t;
  const RowsGeometry::Block b = g.block(block);
  t.tx = tid % g.tx;
  t.ty = tid / g.tx;
  t.t0 = g.tile_begin(b.tile);
  t.t1 = g.tile_end(b.tile);
  t.col = t.t0 + int64_t(t.tx) * g.vec;
  t.r0 = g.chunk_begin(b.chunk);
  t.r1 = g.chunk_end(b.chunk);
  t.slab = first_slab + b.slab;
  t.base = t.slab * g.rows * g.width;
  t.cell0 = g.tile_first_cell(b.tile);
  t.active = tid < g.tx * g.ty && t.col < t.t1;
  return t;
}

// vec must divide width. sm_count sizes the grid.
inline RowsGeometry rows_geometry(int64_t slabs, int64_t rows, int64_t width, int64_t group_size,
                                  int vec, int sm_count) {
  RowsGeometry g;
  g.slabs = slabs;
  g.rows = rows;
  g.width = width;
  g.group_size = group_size;
  g.cells_per_row = width / group_size;
  g.vec = vec;
  const int64_t vector_cols = width / vec;
  const int64_t max_tx = std::min<int64_t>(kMaxBlockThreads, std::max<int64_t>(1, kMaxTileColumns / vec));
  int64_t tx = std::min(vector_cols, max_tx);
  g.col_tiles = ceil_div(vector_cols, tx);
  tx = ceil_div(vector_cols, g.col_tiles);  // even tiles
  g.col_tiles = ceil_div(vector_cols, tx);
  g.tx = int(tx);
  g.tile_cols = tx * vec;
  int64_t ty = std::clamp<int64_t>(kMaxBlockThreads / tx, 1, kMaxRowThreads);
  ty = std::max<int64_t>(1, std::min(ty, rows));
  g.ty = int(ty);
  g.slots = g.col_tiles == 1 ? g.cells_per_row
                             : std::min(g.cells_per_row, ceil_div(g.tile_cols, group_size) + 1);
  // Enough blocks to fill the machine a few times over, but never so thin
  // that the per-block reduction outweighs the streaming.
  const int64_t wanted = ceil_div(kBlocksPerSm * std::max(sm_count, 1), std::max<int64_t>(1, slabs * g.col_tiles));
  const int64_t most = std::max<int64_t>(1, rows / (ty * kMinRowsPerThread));
  const int64_t chunks = std::clamp<int64_t>(wanted, 1, most);
  g.chunk_rows = std::max<int64_t>(ty, round_up(ceil_div(rows, chunks), ty));
  g.chunks = rows > 0 ? ceil_div(rows, g.chunk_rows) : 1;
  return g;
}

// ---- contiguous_cells -------------------------------------------------------

struct CellsGeometry {
  int64_t cells = 0;      // cells in one launch
  int64_t segments = 1;   // per cell: S
  int64_t inner = 0;      // elements per segment
  int64_t chunk_len = 1;  // elements per item (a multiple of 32 * vec when chunks > 1)
  int64_t chunks = 1;     // items per segment
  int vec = 1;
  int warps = kItemWarps;  // items per block

  DISTGN_HD int64_t cell_elements() const { return segments * inner; }
  DISTGN_HD int64_t items_per_cell() const { return segments * chunks; }
  DISTGN_HD int64_t items() const { return cells * items_per_cell(); }
  DISTGN_HD int64_t blocks() const { return ceil_div(items(), warps); }
  DISTGN_HD int block_threads() const { return warps * kWarp; }

  struct Item {
    int64_t cell, segment, chunk;
    int64_t begin, end;  // element range, relative to the launch's first cell
  };
  DISTGN_HD Item item(int64_t i) const {
    const int64_t cell = i / items_per_cell(), rest = i % items_per_cell();
    const int64_t s = rest / chunks, k = rest % chunks;
    const int64_t base = (cell * segments + s) * inner;
    return Item{cell, s, k, base + min64(inner, k * chunk_len), base + min64(inner, (k + 1) * chunk_len)};
  }
  // Items of the cells of group g among the launch's cells, cells absolute
  // from first_cell on: channel c = g * S + s gathers items
  // ((lc0 + m * G) * S + s) * chunks + k.
  DISTGN_HD int64_t group_first_cell(int64_t first_cell, int64_t groups, int64_t g) const {
    return ((g - first_cell % groups) % groups + groups) % groups;
  }
  DISTGN_HD int64_t channel_terms(int64_t first_cell, int64_t groups, int64_t g) const {
    const int64_t lc0 = group_first_cell(first_cell, groups, g);
    return lc0 < cells ? ceil_div(cells - lc0, groups) * chunks : 0;
  }
  DISTGN_HD int64_t channel_term(int64_t first_cell, int64_t groups, int64_t g, int64_t s,
                                 int64_t i) const {
    const int64_t lc = group_first_cell(first_cell, groups, g) + (i / chunks) * groups;
    return (lc * segments + s) * chunks + i % chunks;
  }
};

inline CellsGeometry cells_geometry(int64_t cells, int64_t segments, int64_t inner, int vec,
                                    int sm_count) {
  CellsGeometry g;
  g.cells = cells;
  g.segments = segments;
  g.inner = inner;
  g.vec = vec;
  const int64_t step = int64_t(kWarp) * vec;  // elements per warp-wide vector access
  const int64_t shortest = step * kMinItemVectorsPerLane, longest = step * kMaxItemVectorsPerLane;
  if (inner <= shortest) {
    g.chunks = 1;
    g.chunk_len = std::max<int64_t>(inner, 1);
    return g;
  }
  // About two waves of 64 resident warps per multiprocessor.
  const int64_t wanted_items = 128 * int64_t(std::max(sm_count, 1));
  const int64_t per_segment = std::max<int64_t>(1, ceil_div(wanted_items, std::max<int64_t>(1, cells * segments)));
  int64_t length = std::clamp(ceil_div(inner, per_segment), shortest, longest);
  length = round_up(length, step);
  g.chunks = ceil_div(inner, length);
  g.chunk_len = length;
  return g;
}

// ---- either form -------------------------------------------------------------

// The geometry of a launch in either form, for the host: the kernel families
// pass the form's geometry to the form's kernel, and size their workspace
// with it.
struct Geometry {
  bool channel_rows = true;  // else contiguous_cells
  RowsGeometry rows;         // channel_rows
  CellsGeometry cells;       // contiguous_cells

  Geometry() = default;
  Geometry(const RowsGeometry& g) : channel_rows(true), rows(g) {}
  Geometry(const CellsGeometry& g) : channel_rows(false), cells(g) {}

  int vec() const { return channel_rows ? rows.vec : cells.vec; }
  // Does the launch walk any element? (Without, the reductions still write
  // their cells; the elementwise kernels have nothing to do.)
  bool has_elements() const { return channel_rows ? rows.rows > 0 : cells.inner > 0; }
  // The launch's first slab (channel_rows) or cell (contiguous_cells), for
  // its first cell.
  int64_t first_of(int64_t first_cell) const { return channel_rows ? first_cell / rows.cells_per_row : first_cell; }
  // Partial records of a reduction: one per block and cell of its tile, or
  // one per item.
  int64_t partials() const { return channel_rows ? rows.blocks() * rows.slots : cells.items(); }
  // channel_rows' backward sums also keep one per block and column of its
  // tile, for the channel sums (contiguous_cells' items are per channel).
  int64_t column_partials() const { return channel_rows ? rows.blocks() * rows.tile_cols : 0; }
  // Arrival counters of a reduction: one per slab, or per cell.
  int64_t counters() const { return channel_rows ? rows.slabs : cells.cells; }
};

// An item's elements: a scalar head up to a vector boundary, whole vectors,
// a scalar tail (head and tail are empty when inner is a multiple of vec).
// Lane l takes head element begin + l, tail element body_end + l, and the
// vectors at body_begin + (l + 32 k) * vec.
struct ItemRange {
  int64_t begin, body_begin, body_end, end;
};

DISTGN_HD ItemRange item_range(int64_t begin, int64_t end, int vec) {
  const int64_t body_begin = min64(end, round_up(begin, vec));
  const int64_t body_end = max64(body_begin, end - end % vec);
  return ItemRange{begin, body_begin, body_end, end};
}

// ---- index maps ---------------------------------------------------------------

// offset(i) = sum over d of digit_d(i) * stride[d], digits of i in the mixed
// radix extent[0..rank) (row-major, last fastest).
struct StridedIndex {
  int rank = 0;
  int64_t extent[kMaxRank] = {};
  int64_t stride[kMaxRank] = {};

  DISTGN_HD int64_t offset(int64_t i) const {
    int64_t off = 0;
    for (int d = rank - 1; d >= 0; --d) {
      const int64_t e = extent[d];
      off += (i % e) * stride[d];
      i /= e;
    }
    return off;
  }
};

}  // namespace cuda
}  // namespace distgn
