// distgn/group_norm.hpp: the layer. Flax's flax.linen.GroupNorm, distributed:
// each rank reduces its shard, one collective merges the partial statistics
// of every cell over the ranks of its group, each rank normalises locally.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "distgn/communicator.hpp"
#include "distgn/config.hpp"
#include "distgn/tensor.hpp"

struct CUstream_st;  // CUDA's stream: cudaStream_t is CUstream_st*

namespace distgn {

// Internals of src/core: a backend, its per-cell arrays, a call's arrays in
// its walking order and the plan with that order.
class Backend;
class CellStatistics;
struct KernelInputs;
struct KernelPlan;

// What forward saves for backward: the plan and, per cell, the statistics
// the outputs were made with, kept where x is (host or device memory).
// Copies share the values; a forward call into a state that another copy
// also holds gives it new arrays, so the copy keeps the old ones.
class ForwardState {
 public:
  // The plan of the forward call (a default Plan before any).
  const Plan& plan() const;
  // Per-cell values in host memory (plan().num_cells each; empty before a
  // forward call). For device tensors the first call copies them over,
  // waiting for the forward's stream.
  const std::vector<double>& mean() const;   // in the stats dtype
  const std::vector<double>& rstd() const;   // rsqrt(var + epsilon) in the stats dtype
  const std::vector<double>& count() const;  // valid positions over the whole group
  const std::vector<uint8_t>& variance_clamped() const;  // fast-variance clamp hit: var has no gradient

 private:
  friend class GroupNorm;
  std::shared_ptr<const KernelPlan> plan_;  // shared with the layer's plan cache
  std::shared_ptr<CellStatistics> cells_;
};

// Which ranks' dscale/dbias partial sums backward adds up.
enum class ParamGradReduction {
  local,  // this rank's shard only (the default)
  group,  // the ranks of this rank's axis_index_groups group
  all,    // every rank of the communicator (data-parallel gradient sync)
};

class GroupNorm {
 public:
  // Validates axis_index_groups against comm (semantics §7) and splits comm into
  // the groups once, here. Collective over comm when it has several ranks.
  explicit GroupNorm(GroupNormConfig config,
                     std::shared_ptr<Communicator> comm = local_communicator());
  ~GroupNorm();
  GroupNorm(GroupNorm&&) noexcept;
  GroupNorm& operator=(GroupNorm&&) noexcept;

  const GroupNormConfig& config() const { return config_; }
  Communicator& communicator() { return *comm_; }
  // The ranks this rank shares statistics with (itself alone when size 1).
  Communicator& group_communicator() { return *group_comm_; }

  // Parameters scale[C] then bias[C] (those in use), contiguous, param_dtype.
  // Created from the initializers on the first call, or here.
  void init_parameters(int64_t channels);
  int64_t channels() const { return channels_; }  // 0 before initialisation
  // The parameter buffer (scale then bias) and views into it; writable.
  void* parameters() { return parameters_.data(); }
  size_t parameter_bytes() const { return parameters_.size(); }
  TensorView scale();  // throws if use_scale is false or not initialised
  TensorView bias();
  // Copies caller-provided parameters (any float dtype, shape [C]; semantics §2.6).
  void set_scale(const TensorView& scale);
  void set_bias(const TensorView& bias);

  // Device tensors (TensorView::device == Device::cuda; a CUDA build): every
  // launch and copy of a call goes to this stream (default: the legacy
  // default stream). A call returns once its work is queued; it waits for
  // the stream only where the host needs a result (the collective of a
  // group of several ranks, dscale/dbias in host memory). Results are ready
  // when the stream has caught up.
  void set_stream(CUstream_st* stream) { stream_ = stream; }
  CUstream_st* stream() const { return stream_; }
  // The plan for an input of this shape, layout and dtype (validates, semantics §2).
  Plan plan(const Shape& shape, Layout layout, DType dtype) const;

  // y = GroupNorm(x). y has x's shape and layout and plan().output_dtype,
  // and lives where x does (host or device). mask (optional): nonzero =
  // valid position; on the host, or (device x) on the device. state (optional) receives
  // what backward needs. Exactly one collective over the group per call once
  // a shape has been seen (the first call with a new shape adds one more, in
  // which the ranks agree on the shape or all raise the same error).
  void forward(const TensorView& x, const TensorView& y, const MaskView* mask = nullptr,
               ForwardState* state = nullptr);

  // Gradients of sum(y * dy) summed over all ranks (semantics §9). dx has x's
  // dtype and shape; dscale/dbias (optional, [C], param_dtype) receive the
  // partial sums of the ranks `reduction` names. dy and dx live where x does;
  // dscale/dbias in host memory or, for device x, on the device. One collective over the
  // group for dx (plus one over the communicator for reduction == all).
  void backward(const TensorView& x, const TensorView& dy, const MaskView* mask,
                const ForwardState& state, const TensorView& dx,
                const TensorView* dscale = nullptr, const TensorView* dbias = nullptr,
                ParamGradReduction reduction = ParamGradReduction::local);

  // ---- The phases of a call, for a caller that runs the collective itself ----
  // forward() is: this rank's partial statistics, one allgather of them over
  // the ranks that share statistics, then finalise and normalise; backward()
  // is: this rank's partial sums, one allreduce of them, then dx. A caller
  // that merges with its own collective (a framework's process group, an MPI
  // communicator it manages) runs the phases itself, on a layer whose
  // communicator is local_communicator() (the phases run no collective):
  //
  //   std::vector<double> mine = layer.forward_partial_stats(x, mask);
  //   all = allgather(mine) over the P ranks, in one rank order on every rank
  //   layer.forward_finish(x, y, mask, all.data(), P, &state);
  //   std::vector<double> sums = layer.backward_partial_sums(x, dy, mask, state);
  //   allreduce_sum(sums) over the P ranks
  //   layer.backward_finish(x, dy, mask, state, sums.data(), dx, &dscale, &dbias);
  //
  // The payloads are host doubles. Forward: 3 per cell (plan().num_cells),
  // the count, mean and M2 of this rank's valid positions of the cell;
  // forward_finish merges the P payloads, concatenated in rank order (what an
  // allgather gives), in that order with forward()'s arithmetic, so every
  // rank gets bitwise the statistics forward() gives over a communicator of
  // those ranks. Backward: 2 per cell (sum g, sum g * xhat with g = dy *
  // scale), then 2 per channel (sum dy, sum dy * xhat); backward_finish takes
  // them summed over the ranks (the per-channel part is what dbias and
  // dscale receive: sum it too for gradients of the whole group, or leave it
  // this rank's own). Each phase raises an invalid call's error on its own
  // rank before the caller's collective, as forward() cannot: the caller
  // validates on every rank first (plan()) or uses a collective that fails
  // when a rank leaves. Device tensors: the same, with the payloads staged
  // through host memory.
  std::vector<double> forward_partial_stats(const TensorView& x, const MaskView* mask = nullptr);
  void forward_finish(const TensorView& x, const TensorView& y, const MaskView* mask, const double* gathered,
                      int ranks, ForwardState* state = nullptr);
  std::vector<double> backward_partial_sums(const TensorView& x, const TensorView& dy, const MaskView* mask,
                                            const ForwardState& state);
  void backward_finish(const TensorView& x, const TensorView& dy, const MaskView* mask, const ForwardState& state,
                       const double* summed, const TensorView& dx, const TensorView* dscale = nullptr,
                       const TensorView* dbias = nullptr);

 private:
  struct Workspace;
  // semantics §2's checks of a forward call's arguments: the error, or "".
  // y may be null: the partial-statistics phase has none.
  std::string check_forward(const TensorView& x, const TensorView* y, const MaskView* mask);
  // The same for a backward call's (dx may be null: the partial-sums phase has none).
  std::string check_backward(const TensorView& x, const TensorView& dy, const MaskView* mask,
                             const ForwardState& state, const TensorView* dx, const TensorView* dscale,
                             const TensorView* dbias) const;
  // The set-up shared by forward() and forward_finish() (group_norm.cpp).
  Backend& begin_forward(const TensorView& x, const TensorView& y, const MaskView* mask, ForwardState& state,
                         KernelInputs& in, void*& out);
  // The parameters in double, for the kernels' coefficients; created from
  // the initializers for `channels` on the first call that needs them.
  void load_parameters(int64_t channels, std::vector<double>& scale, std::vector<double>& bias);

  GroupNormConfig config_;
  std::shared_ptr<Communicator> comm_;
  std::shared_ptr<Communicator> group_comm_;
  int64_t channels_ = 0;
  std::vector<uint8_t> parameters_;
  std::unique_ptr<Workspace> workspace_;
  CUstream_st* stream_ = nullptr;
};

}  // namespace distgn
