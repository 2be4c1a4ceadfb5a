// The CUDA backend. Plain C++ (no CUDA header needed to include it): the
// layer (src/core/group_norm.cpp) uses it for tensors whose TensorView::device
// is Device::cuda. Everything it launches goes on one stream; it
// synchronises the stream only where the host must read a result (the
// moments before a collective, channel sums the caller wants in host memory).
//
// Two ways in:
//  - whole calls, forward() and backward(): what GroupNorm runs. For a group
//    of one rank (no merge/exchange function) a forward call is two kernels
//    per L2-sized wave of cells (statistics, finalised by the last block of
//    each slab, then normalisation) and a backward call three (the fused
//    sums of x and dy with the cell terms, dx, the channel sums), with no
//    host round trip. With several ranks the per-cell payload comes to the
//    host once, the caller's function runs the collective, and the merged
//    values go back.
//  - the Backend interface of core/backend.hpp with device x, mask, y, dy
//    and dx but host per-cell and per-channel arrays (staged through pinned
//    buffers; each call that returns host values synchronises).
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "core/backend.hpp"
#include "distgn/group_norm.hpp"

struct CUstream_st;

namespace distgn {

// One forward call, for the backend.
struct CudaForwardCall {
  const Plan* plan = nullptr;
  const void* x = nullptr;         // device, plan->shape, plan->input_dtype
  const MaskView* mask = nullptr;  // null, or bytes on the device or the host broadcasting to x
  void* y = nullptr;               // device, plan->output_dtype
  double epsilon = 1e-6;
  bool fast_variance = true;
  const double* scale = nullptr;  // host, plan->channels values, or null (use_scale false)
  const double* bias = nullptr;   // host, or null
  // A group of several ranks: called with this rank's per-cell moments in
  // host memory; replaces them by the merge over the group (the layer's
  // GroupExchange::merge). Empty for a group of one rank: no host round trip.
  std::function<void(std::vector<CellMoments>&)> merge;
};

// One backward call, for the backend.
struct CudaBackwardCall {
  const Plan* plan = nullptr;
  const void* x = nullptr;  // device
  const void* dy = nullptr;  // device, plan->shape
  DType dy_dtype = DType::f32;
  const MaskView* mask = nullptr;
  void* dx = nullptr;             // device, plan->input_dtype
  const double* scale = nullptr;  // host, or null
  // Host memory in the layer's layout: (A, B) per cell (2 * cells doubles),
  // then sum dy per channel (C) and sum dy * xhat per channel (C). With an
  // exchange function the backend fills it, calls exchange() (the
  // collectives, in place) and uses the result. Without one it fills only
  // the channel part, and only if channel_sums_to_host.
  double* host_sums = nullptr;
  std::function<void()> exchange;
  bool channel_sums_to_host = false;
  // Device outputs in param_dtype ([C] each), or null.
  void* dscale = nullptr;
  void* dbias = nullptr;
  DType param_dtype = DType::f32;
};

class CudaBackend : public Backend {
 public:
  // device_state: the per-cell statistics of the call on the device (what
  // backward needs), allocated or reused here; keep it with the ForwardState.
  // state's host vectors are filled where the call synchronises anyway (a
  // group of several ranks) and emptied otherwise.
  virtual void forward(const CudaForwardCall& call, ForwardState& state, std::shared_ptr<void>& device_state) = 0;
  virtual void backward(const CudaBackwardCall& call, const std::shared_ptr<void>& device_state) = 0;

  // The stream every launch goes to (nullptr: the legacy default stream).
  virtual CUstream_st* stream() const = 0;
  virtual void set_stream(CUstream_st* stream) = 0;
  virtual void synchronize() = 0;
};

// A backend on the current device, launching on `stream`.
std::unique_ptr<CudaBackend> make_cuda_backend(CUstream_st* stream = nullptr);

// Copies the per-cell values a device forward left in device_state into
// state's host vectors (mean, rstd, count, variance_clamped); synchronises.
void copy_device_state_to_host(const std::shared_ptr<void>& device_state, ForwardState& state);

}  // namespace distgn
