// Turning CUDA runtime errors into distgn::Error, or DeviceOutOfMemory (host side).
#pragma once

#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>
#include <new>
#include <string>
#include <utility>

#include "distgn/error.hpp"

namespace distgn {
namespace cuda {

// Out of device memory is a std::bad_alloc, as out of host memory is, so that
// a caller who knows what the memory was for (the CLI: "the layer's statistics
// for N cells need B bytes") says so on either backend.
class DeviceOutOfMemory : public std::bad_alloc {
 public:
  explicit DeviceOutOfMemory(std::string message) : message_(std::move(message)) {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

inline void check(cudaError_t status, const char* what, const char* file, int line) {
  if (status == cudaSuccess) return;
  const std::string message = std::string("CUDA: ") + what + " failed: " + cudaGetErrorName(status) + ": " +
                              cudaGetErrorString(status) + " (" + file + ":" + std::to_string(line) + ")";
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // not sticky: clear it, so the next call does not report it again
    throw DeviceOutOfMemory(message);
  }
  throw Error(message);
}

// Grid sizes are unsigned ints of at most 2^31 - 1 blocks.
inline unsigned grid_size(int64_t blocks, const char* kernel) {
  if (blocks > int64_t(INT_MAX))
    throw Error(std::string("CUDA: ") + kernel + " would need " + std::to_string(blocks) +
                " thread blocks, more than a grid holds");
  return unsigned(blocks);
}

}  // namespace cuda
}  // namespace distgn

#define DISTGN_CUDA_CHECK(expr) ::distgn::cuda::check((expr), #expr, __FILE__, __LINE__)
#define DISTGN_CUDA_CHECK_LAUNCH(kernel) ::distgn::cuda::check(cudaGetLastError(), kernel, __FILE__, __LINE__)
