// The CPU backend's size thresholds for one call, from the caches read once
// per process (src/cpu/tuning.cpp says how each is derived). A plain struct:
// a call asks for it once, without allocating.
#pragma once

#include <cstdint>

namespace distgn::cpu {

struct Thresholds {
  int64_t cache_resident_bytes;
  int64_t streamed_output_bytes;
  int64_t fused_block_elements;  // fused_block_bytes of float32
};

// For the current OpenMP thread count.
Thresholds thresholds();

}  // namespace distgn::cpu
