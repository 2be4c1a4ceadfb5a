// Every tuning constant of the CPU backend (cpu_backend.cpp and the kernels
// it includes), each with what it trades. None changes what a call computes
// beyond the grouping of its sums, and results never depend on the thread
// count: the chunks are fixed by these sizes, not by the threads.
//
// "Measured" figures are from the 2-core development machine of
// docs/performance.md (AMD EPYC, AVX-512, 2 threads, float32 unless said),
// which is shared and noisy (10-20% between runs). A constant without a
// figure was chosen by the reasoning given, with no measurement recorded.
#pragma once

#include <cstdint>

#include "cpu/lanes.hpp"

namespace distgn::cpu {

// ---- how a call is cut up ----------------------------------------------------------

// Elements one chunk covers (the unit of the OpenMP loops and of the fixed
// grouping of sums): small enough to spread a few large cells over every
// core and to stay in L2, large enough that per-chunk work (shifts, folds of
// per-column sums) is noise. No figure recorded.
constexpr int64_t kChunkElements = 65536;

// A slab (channels last) or cell cut into more than one chunk is cut into a
// multiple of this many, so that a parallel loop over whole slabs or cells
// gives 1, 2, 4 or 8 threads equal work: NHWC 8x64x64x320 cut its slabs of
// 4096 rows into 21 chunks, and with one slab per fused block 2 threads got
// 11 and 10 (10% idle on one).
constexpr int64_t kChunkMultiple = 8;

// The block size of a group of one rank (statistics, then normalisation;
// backward sums, then dx, per block of cells) is derived from the machine's
// caches with the other size thresholds: Thresholds below.

// Elements (whole rows) the channels-last elementwise kernels (normalise,
// dx) run over as one stretch, their per-column coefficients repeated over
// the tile's rows: a row of 64 floats alone is four vectors, each row a loop
// with its own set-up and tail. Against row by row and the register blocks
// of kRowBlock rows they replace (Intel Xeon model 207 of
// docs/performance.md, single runs of 50 calls, timed inside the flow):
// NHWC 16x56x56x64 dx 50.6 -> 37 ms, normalisation 31 -> 27.5 ms;
// 2x16x16x1280 (register blocks) dx 10.0 -> 7.5 ms. No other size tried.
constexpr int64_t kRowTileElements = 1024;

// ---- reductions: partial sums in the block type -------------------------------------
// Partial sums run in the block type over a few rows (or a few vectors of a
// run) and are added to double accumulators once per block: float for data
// that is not float64 (semantics §5 asks for at least float32; the shift
// makes the block's terms small, so the rounding stays far below semantics
// §8's bars), which halves the vector work of the reductions against double
// throughout. Larger blocks mean fewer adds to double but more rounding in
// the block type.

// Rows summed in registers (narrow rows, cache-resident calls): the block's
// row loop unrolls, and the per-column shifts or coefficients load once per
// block.
// Where the blocks pay and where they cost: cache_resident_bytes, kNarrowRow.
constexpr int64_t kRowBlock = 8;

// Rows summed in per-column block sums before they are added to the double
// sums: adding each register block to double measured 10-15% slower.
constexpr int64_t kFlushRows = 32;

// Contiguous elements (contiguous_cells) summed in the block type before the
// double sums. No figure recorded.
constexpr int64_t kRunBlock = 256;

// The statistics sum rows up to this wide kRowBlock at a time in registers
// (the block is one contiguous stretch of memory); wider rows one after
// another into per-column block sums in memory, which keeps a single stream
// per array: many concurrent row streams measured slower from DRAM (no
// figure recorded).
constexpr int64_t kNarrowRow = 128;

// How many register blocks ahead the wide-row statistics prefetch: the
// hardware prefetchers lag on a few rows read side by side. No figure
// recorded.
constexpr int64_t kPrefetchBlocks = 4;

// ---- by the size of a call and the machine -------------------------------------------
// Derived from the threads' L2 at run time (src/cpu/tuning.cpp gives each
// derivation and the AMD figures it reproduces), or DISTGN_CPU_TUNING:
//  - cache_resident_bytes: a call whose input is at most this large is read
//    from cache, and both channel_rows reductions (statistics, backward
//    sums) work in register blocks of kRowBlock rows at every width. From
//    DRAM the same blocks measured slower (8x64x64x320 statistics 1.55 ->
//    2.0 ms; the backward sums' register blocks, with two input streams,
//    even on narrow rows: 16x56x56x64 backward 1.25 -> 1.42 ms), so larger
//    calls go row by row (the statistics of narrow rows excepted,
//    kNarrowRow).
//  - streamed_output_bytes: the elementwise kernels write float32 outputs
//    (y, dx) larger than this with streaming stores, straight from the
//    registers that compute them (write_elements in cpu_backend.cpp,
//    cpu/stream_rows.hpp).
//  - fused_block_bytes: with a group of one rank, cells are processed in
//    blocks whose arrays (x, and dy in backward) take about this many bytes,
//    so that a block is still in cache when the second pass reads it.
struct Thresholds {
  int64_t cache_resident_bytes;
  int64_t streamed_output_bytes;
  int64_t fused_block_bytes;
};

// For the current OpenMP thread count; reads the caches once per process
// and allocates nothing.
Thresholds thresholds();

// ---- float16 staging ----------------------------------------------------------------

// float16 data is staged through float scratch (Staged in cpu_backend.cpp)
// a tile at a time (kRowTileElements; a run block, kRunBlock, for
// contiguous cells), so that the staged values stay in L1.

// ---- scratch ------------------------------------------------------------------------------

// Alignment of every per-thread scratch buffer (a cache line): vector loads
// from a buffer malloc left 16-byte aligned split cache lines (float16
// normalisation measured 1.7x slower when a resize moved the staging
// buffer).
constexpr uintptr_t kScratchAlignment = kCacheLine;

}  // namespace distgn::cpu
