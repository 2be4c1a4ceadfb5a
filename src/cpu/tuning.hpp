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

namespace distgn::cpu {

// ---- how a call is cut up ----------------------------------------------------------

// Elements one chunk covers (the unit of the OpenMP loops and of the fixed
// grouping of sums): small enough to spread a few large cells over every
// core and to stay in L2, large enough that per-chunk work (shifts, folds of
// per-column sums) is noise. No figure recorded.
constexpr int64_t kChunkElements = 65536;

// With a group of one rank, cells are processed in blocks of about this many
// elements (statistics, then normalisation; backward sums, then dx) so that
// a block is still in cache when the second pass reads it. Smaller blocks
// mean more passes' worth of per-block overhead; larger ones fall out of
// cache. No figure recorded for the size itself.
constexpr int64_t kFusedBlockElements = int64_t(1) << 20;

// ---- reductions: partial sums in the block type -------------------------------------
// Partial sums run in the block type over a few rows (or a few vectors of a
// run) and are added to double accumulators once per block: float for data
// that is not float64 (semantics §5 asks for at least float32; the shift
// makes the block's terms small, so the rounding stays far below semantics
// §8's bars), which halves the vector work of the reductions against double
// throughout. Larger blocks mean fewer adds to double but more rounding in
// the block type.

// Rows summed in registers (narrow rows, cache-resident calls): the block's
// row loop unrolls, and the per-column coefficients load once per block.
// Where the blocks pay and where they cost: kCacheResidentBytes, kNarrowRow.
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

// ---- by the size of a call -------------------------------------------------------------

// A call whose input is at most this large is read from cache (the bench
// runs copy, forward and backward in turn on the same buffers). There all
// four channel_rows kernels work in register blocks of kRowBlock rows at
// every width, coefficients loaded once per block: NHWC 2x16x16x1280
// (2.6 MB) statistics 0.060 -> 0.043 ms, normalisation 0.058 -> 0.049 ms,
// backward 0.178 -> 0.144 ms. From DRAM the same blocks measured slower
// (8x64x64x320 statistics 1.55 -> 2.0 ms, 16x56x56x64 normalisation 0.53
// -> 0.73 ms, its backward 1.25 -> 1.8 ms; the backward sums' register
// blocks, with two input streams, even on narrow rows: 16x56x56x64 backward
// 1.25 -> 1.42 ms), so larger calls go row by row (the statistics of narrow
// rows excepted, kNarrowRow).
constexpr int64_t kCacheResidentBytes = int64_t(4) << 20;

// The channel_rows forward writes float32 outputs of a call larger than this
// with streaming stores (cpu/stream_rows.hpp): they leave the cache before
// anyone reads them, and the normal stores' reads for ownership made NHWC
// 8x64x64x320 (42 MB) forward 15% slower (docs/performance.md: 3.4 -> 2.9
// ms streamed). Smaller outputs stay in cache for their consumer (streaming
// made a 2.6 MB forward 1.7x slower). Measured and not streamed: the
// contiguous forward (NCHW 8x320x64x64 8% slower streamed) and dx in both
// forms (up to 1.8x slower).
constexpr int64_t kStreamedOutputBytes = int64_t(16) << 20;

// ---- float16 staging -----------------------------------------------------------------

// Elements staged per conversion when a kernel stages float16 rows through
// float scratch (see Staged): a few narrow rows together (one call per
// 64-wide row measured its own overhead), wide rows one at a time (so the
// staged rows stay in L1).
constexpr int64_t kStageElements = 512;

// ---- scratch ------------------------------------------------------------------------------

// Alignment of every per-thread scratch buffer (a cache line): vector loads
// from a buffer malloc left 16-byte aligned split cache lines (float16
// normalisation measured 1.7x slower when a resize moved the staging
// buffer).
constexpr uintptr_t kScratchAlignment = 64;

}  // namespace distgn::cpu
