// Turning CUDA runtime errors into distgn::Error (host side).
#pragma once

#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>
#include <string>

#include "distgn/error.hpp"

namespace distgn {
namespace cuda {

inline void check(cudaError_t status, const char* what, const char* file, int line) {
  if (status == cudaSuccess) return;
  throw Error(std::string("CUDA: ") + what + " failed: " + cudaGetErrorName(status) + ": " +
              cudaGetErrorString(status) + " (" + file + ":" + std::to_string(line) + ")");
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
