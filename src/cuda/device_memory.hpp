// Pinned host memory for the CUDA backend and the NCCL communicator: what
// their asynchronous copies to and from the device stage through. The
// public device types are in distgn/device.hpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "distgn/device.hpp"

namespace distgn {
namespace cuda {

// cudaMallocHost'ed (pinned) host bytes, freed with the object: what
// asynchronous copies to and from the device stage through.
class PinnedArray {
 public:
  PinnedArray() = default;
  explicit PinnedArray(size_t bytes);
  ~PinnedArray();
  PinnedArray(PinnedArray&& other) noexcept;
  PinnedArray& operator=(PinnedArray&& other) noexcept;
  PinnedArray(const PinnedArray&) = delete;
  PinnedArray& operator=(const PinnedArray&) = delete;

  uint8_t* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  uint8_t* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace cuda
}  // namespace distgn
