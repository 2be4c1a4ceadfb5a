// The CUDA backend: the steps of core/backend.hpp for tensors in device
// memory (TensorView::device == Device::cuda). Plain C++, no CUDA header
// needed to include it. Everything a call launches goes on the backend's
// stream; it waits for the stream only where the host must read a result
// (the payload of a collective, channel sums wanted in host memory). For a
// group of one rank it offers both fusions: the statistics kernel finalises
// each cell in its last block, and the sums kernel makes the dx terms, so a
// forward is two kernels per L2-sized wave of cells and a backward three,
// with no host round trip.
#pragma once

#include <memory>

#include "core/backend.hpp"

struct CUstream_st;

namespace distgn {

// A backend on the current device, launching on `stream` (nullptr: the
// legacy default stream).
std::unique_ptr<Backend> make_cuda_backend(CUstream_st* stream = nullptr);

}  // namespace distgn
