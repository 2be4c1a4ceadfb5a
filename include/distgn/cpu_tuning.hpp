// distgn/cpu_tuning.hpp: what the CPU backend found on this machine and the
// size thresholds it derived from that, so that a benchmark can print them
// beside its figures. DISTGN_CPU_TUNING overrides the thresholds for
// experiments, e.g. DISTGN_CPU_TUNING="cache_resident=8M,streamed_output=32M".
// Results do not depend on streamed_output or fused_block (bitwise);
// cache_resident picks between two orders of the same float sums, so results
// may differ between settings in the last bits (within semantics §8). It
// depends on the machine (L2, processors), never on the thread count, so
// neither do results.
#pragma once

#include <cstdint>
#include <string>

namespace distgn {

struct CpuTuning {
  // Read once per process: /proc/cpuinfo and /sys/devices/system/cpu/cpu0/cache.
  std::string cpu_model;  // "model name" of /proc/cpuinfo, or "unknown"
  int64_t l1d_bytes = 0;  // per core
  int64_t l2_bytes = 0;   // per core: the cache over the logical CPUs sharing it
  int64_t l3_bytes = 0;   // as reported (a virtual machine may report a whole socket's)
  // Derived from the L2 (docs/performance.md, "CPU tuning"): cache_resident
  // for the processors, the others for `threads` OpenMP threads.
  int processors = 1;  // the processors this process may run on (its affinity mask)
  int threads = 1;
  int64_t cache_resident_bytes = 0;   // inputs up to this size: register-block kernels
  int64_t streamed_output_bytes = 0;  // float32 outputs (y, dx) larger: streaming stores
  int64_t fused_block_bytes = 0;      // one-rank calls run in blocks of cells whose x (and
                                      // dy in backward) take about this many bytes
  std::string source;  // "derived from the caches" or "DISTGN_CPU_TUNING=..."
};

// The tuning for `threads` OpenMP threads (0: omp_get_max_threads()).
// Throws distgn::Error if DISTGN_CPU_TUNING is malformed.
CpuTuning cpu_tuning(int threads = 0);

// "Intel(R) Xeon(R) Processor, L1d 48 KiB, L2 2 MiB per core, L3 260 MiB; 2 processor(s),
// 2 thread(s): cache-resident <= 8 MiB, streamed > 8 MiB, fused blocks 2 MiB (derived from
// the caches)"
std::string describe(const CpuTuning& tuning);

}  // namespace distgn
