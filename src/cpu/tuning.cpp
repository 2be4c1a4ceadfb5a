// How the CPU backend sizes its choices by the machine it runs on.
//
// Every threshold is a multiple of the L2 cache per core. The L3 is not
// used: a virtual machine reports the whole socket's L3 as its own (480 MiB
// and 260 MiB on the two 2-core Intel Xeon machines of docs/performance.md),
// and other tenants use most of it. The factors were set on the 2-core AMD
// EPYC machine (1 MiB L2 per core, 2 threads), where they give the constants
// measured there:
//
//  - cache_resident = 2 * P * L2, P the processors this process may run on
//    (omp_get_num_procs: the affinity mask), not the thread count: this is
//    the one choice that changes the order of the float block sums (the
//    chunks, and so the double sums, stay fixed), and results must not
//    depend on the thread count. A call whose input fits is read from cache
//    by the next pass (a benchmark's copy, forward and backward on the same
//    buffers; a trainer's forward then backward) when the input and one
//    array as large fit in the L2s; there the two channels-last reductions
//    (statistics, backward sums) run in register blocks of rows at every
//    width, which from DRAM measured slower. AMD: 4 MiB (NHWC 2x16x16x1280,
//    2.6 MB: register blocks faster; 16x56x56x64, 12.8 MB, and 8x64x64x320,
//    42 MB: slower; measured when the elementwise kernels used them too).
//  - streamed_output = 2 * T * L2, T the OpenMP threads of the call. A
//    float32 output (y, dx) larger than the threads' L2s hold beside the
//    input is written with streaming stores: it leaves the cache before
//    anyone reads it, and plain stores first read each line they write
//    (read for ownership), a third stream beside x and the output. Intel
//    Xeon (2 MiB L2 per core, 2 threads: 8 MiB), medians of 7 alternating
//    rounds against 32 MiB: NCHW 16x64x56x56 (12.8 MB) forward 0.79x and
//    backward 0.85x the time. The AMD figure of the old rule, 8 * T * L2,
//    (2.6 MB 1.7x slower streamed) was taken while every row was streamed
//    alone, which left both partial cache lines of each misaligned row to
//    plain stores (the kernels now stream whole runs of a chunk, whose
//    blocks meet on cache lines: for_blocks in cpu_backend.cpp).
//  - fused_block = T * L2 / 2. A group of one rank runs statistics then
//    normalisation (backward sums then dx) per block of cells whose arrays
//    read by both passes (x; x and dy) take this many bytes, so that the
//    second pass reads them from the threads' L2, with room for what it
//    writes; a call whose arrays fit in T * L2 runs as one block. Set on the
//    2-core Intel Xeon (2 MiB L2 per core), fused_block 1 to 8 MiB of
//    float32 x, medians of 7 alternating rounds: the 2 MiB this gives for
//    forward (1 MiB of x for backward) ran NHWC 16x56x56x64 and NCHW
//    16x64x56x56 forward 6-11% faster than 8 MiB, backward 3-10%, the
//    42 MB shapes 3-9% (backward) faster, and backward on the 2.6 MB shapes
//    13-18% faster; their forward, one block under this rule, as before.
//    AMD: 1 MiB, where it was 4 MiB of float32 x (never compared with other
//    sizes there, and not measured there since).
// Streaming and block sizes change how outputs are written and in which
// blocks of whole cells the flow runs, never a value.
#include "cpu/tuning.hpp"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "distgn/cpu_tuning.hpp"
#include "distgn/error.hpp"

namespace distgn {
namespace {

constexpr int64_t kFallbackL2Bytes = int64_t(1) << 20;  // when nothing is reported

struct Caches {
  std::string model = "unknown";
  int64_t l1d = 0, l2 = 0, l3 = 0;  // l1d and l2 per core
};

std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// "48K", "2048K", "480M" (sysfs) or plain bytes.
int64_t parse_bytes(const std::string& text) {
  if (text.empty()) return 0;
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || value < 0) return -1;
  switch (*end) {
    case '\0': return value;
    case 'K': case 'k': return end[1] == '\0' ? value << 10 : -1;
    case 'M': case 'm': return end[1] == '\0' ? value << 20 : -1;
    case 'G': case 'g': return end[1] == '\0' ? value << 30 : -1;
    default: return -1;
  }
}

// Logical CPUs in a sysfs list such as "0-1" or "0,2,4-7".
int cpus_in_list(const std::string& list) {
  int count = 0;
  std::stringstream parts(list);
  std::string part;
  while (std::getline(parts, part, ',')) {
    const size_t dash = part.find('-');
    if (dash == std::string::npos) {
      if (!part.empty()) ++count;
    } else {
      count += std::atoi(part.c_str() + dash + 1) - std::atoi(part.c_str()) + 1;
    }
  }
  return count > 0 ? count : 1;
}

Caches read_caches() {
  Caches c;
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);)
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) c.model = line.substr(line.find_first_not_of(' ', colon + 1));
      break;
    }
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    const std::string level = read_line(dir + "level"), type = read_line(dir + "type");
    if (level.empty()) break;
    const int64_t size = parse_bytes(read_line(dir + "size"));
    if (size <= 0 || type == "Instruction") continue;
    const int sharing = cpus_in_list(read_line(dir + "shared_cpu_list"));
    if (level == "1") c.l1d = size / sharing;
    if (level == "2") c.l2 = size / sharing;
    if (level == "3") c.l3 = size;
  }
#ifdef _SC_LEVEL2_CACHE_SIZE
  if (c.l2 <= 0) c.l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (c.l1d <= 0) c.l1d = sysconf(_SC_LEVEL1_DCACHE_SIZE);
  if (c.l3 <= 0) c.l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  if (c.l1d < 0) c.l1d = 0;
  if (c.l3 < 0) c.l3 = 0;
  return c;
}

// DISTGN_CPU_TUNING: comma-separated key=bytes pairs; a key not given keeps
// its derived value (-1 here).
struct Override {
  std::string text;
  int64_t cache_resident = -1, streamed_output = -1, fused_block = -1;
};

Override read_override() {
  Override o;
  const char* env = std::getenv("DISTGN_CPU_TUNING");
  if (!env || !*env) return o;
  o.text = env;
  std::stringstream items(o.text);
  for (std::string item; std::getline(items, item, ',');) {
    const size_t eq = item.find('=');
    const std::string key = item.substr(0, eq);
    const int64_t bytes = eq == std::string::npos ? -1 : parse_bytes(item.substr(eq + 1));
    int64_t* slot = key == "cache_resident"    ? &o.cache_resident
                    : key == "streamed_output" ? &o.streamed_output
                    : key == "fused_block"     ? &o.fused_block
                                               : nullptr;
    if (!slot)
      throw Error("DISTGN_CPU_TUNING: '" + item +
                  "' has an unknown key; the keys are cache_resident, streamed_output and fused_block, e.g. "
                  "DISTGN_CPU_TUNING=\"cache_resident=8M,streamed_output=32M,fused_block=4M\"");
    if (bytes < 0 || (slot == &o.fused_block && bytes == 0))
      throw Error("DISTGN_CPU_TUNING: '" + item + "' needs a size in bytes with an optional K, M or G suffix" +
                  std::string(slot == &o.fused_block ? " (fused_block > 0)" : ""));
    *slot = bytes;
  }
  return o;
}

const Caches& caches() {
  static const Caches c = read_caches();
  return c;
}

// Read on the first call; a malformed variable raises on every call.
const Override& override_settings() {
  struct Read {
    Override settings;
    std::string error;
  };
  static const Read read = [] {
    try {
      return Read{read_override(), {}};
    } catch (const Error& e) {
      return Read{{}, e.what()};
    }
  }();
  if (!read.error.empty()) throw Error(read.error);
  return read.settings;
}

cpu::Thresholds derive(int threads, int processors) {
  const int64_t l2 = caches().l2 > 0 ? caches().l2 : kFallbackL2Bytes;
  const int64_t per_thread = int64_t(std::max(threads, 1)) * l2, per_processor = int64_t(std::max(processors, 1)) * l2;
  const Override& o = override_settings();
  return {o.cache_resident >= 0 ? o.cache_resident : 2 * per_processor,
          o.streamed_output >= 0 ? o.streamed_output : 2 * per_thread,
          o.fused_block >= 0 ? o.fused_block : std::max<int64_t>(1, per_thread / 2)};
}

std::string size_text(int64_t bytes) {
  if (bytes >= (int64_t(1) << 20) && bytes % (int64_t(1) << 20) == 0) return std::to_string(bytes >> 20) + " MiB";
  if (bytes >= 1024 && bytes % 1024 == 0) return std::to_string(bytes >> 10) + " KiB";
  return std::to_string(bytes) + " B";
}

}  // namespace

cpu::Thresholds cpu::thresholds() { return derive(omp_get_max_threads(), omp_get_num_procs()); }

CpuTuning cpu_tuning(int threads) {
  if (threads <= 0) threads = omp_get_max_threads();
  const cpu::Thresholds t = derive(threads, omp_get_num_procs());
  CpuTuning out;
  out.cpu_model = caches().model;
  out.l1d_bytes = caches().l1d;
  out.l2_bytes = caches().l2;
  out.l3_bytes = caches().l3;
  out.processors = omp_get_num_procs();
  out.threads = threads;
  out.cache_resident_bytes = t.cache_resident_bytes;
  out.streamed_output_bytes = t.streamed_output_bytes;
  out.fused_block_bytes = t.fused_block_bytes;
  const Override& o = override_settings();
  out.source = o.text.empty() ? (caches().l2 > 0 ? "derived from the caches" : "derived from a 1 MiB L2 (none reported)")
                              : "DISTGN_CPU_TUNING=" + o.text;
  return out;
}

std::string describe(const CpuTuning& t) {
  return t.cpu_model + ", L1d " + size_text(t.l1d_bytes) + ", L2 " + size_text(t.l2_bytes) + " per core, L3 " +
         size_text(t.l3_bytes) + "; " + std::to_string(t.processors) + " processor(s), " +
         std::to_string(t.threads) + " thread(s): cache-resident <= " +
         size_text(t.cache_resident_bytes) + ", streamed > " + size_text(t.streamed_output_bytes) +
         ", fused blocks " + size_text(t.fused_block_bytes) + " (" + t.source + ")";
}

}  // namespace distgn
