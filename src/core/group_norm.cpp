// The layer: resolve the plan, partial statistics, one collective, finalize,
// normalise (forward); the mirror of it for backward. Everything
// device-specific is behind Backend; everything about ranks behind
// GroupExchange.
#include "distgn/group_norm.hpp"

#include <algorithm>
#include <sstream>

#include "core/backend.hpp"
#include "core/equal_parts.hpp"
#include "core/group_exchange.hpp"
#include "cpu/cpu_backend.hpp"
#include "distgn/error.hpp"
#include "distgn/tensor.hpp"
#if DISTGN_WITH_CUDA
#include "cuda/cuda_backend.hpp"
#endif

namespace distgn {
namespace {

// What the ranks of a group must agree on: everything but reduced extents.
std::string signature_of(const Plan& plan, const GroupNormConfig& config) {
  std::ostringstream s;
  s << "x (";
  for (size_t d = 0; d < plan.shape.size(); ++d) {
    const bool reduced = std::binary_search(plan.reduction_axes.begin(), plan.reduction_axes.end(),
                                            int64_t(d)) && int(d) != plan.feature_axis;
    s << (d ? ", " : "");
    if (reduced) s << '*';
    else s << plan.shape[d];
  }
  s << ") " << dtype_name(plan.input_dtype) << ' ' << layout_name(plan.layout)
    << ", groups " << plan.num_groups << ", reduction axes [";
  for (size_t i = 0; i < plan.reduction_axes.size(); ++i) s << (i ? "," : "") << plan.reduction_axes[i];
  s << "], epsilon " << config.epsilon << ", fast variance " << config.use_fast_variance
    << ", force f32 " << config.force_float32_reductions << ", output "
    << dtype_name(plan.output_dtype) << ", scale " << config.use_scale << ", bias "
    << config.use_bias << ", params " << dtype_name(config.param_dtype);
  return s.str();
}

// Does the mask broadcast to x (numpy rules), with the feature axis exactly C?
void check_mask(const Plan& plan, const MaskView& mask) {
  const Shape& x = plan.shape;
  const Shape& m = mask.shape;
  bool ok = m.size() <= x.size() &&
            (plan.layout == Layout::channels_last || m.size() == x.size());
  for (size_t i = 0; ok && i < m.size(); ++i) {
    const size_t xi = x.size() - m.size() + i;
    const bool feature = int(xi) == plan.feature_axis;
    ok = feature ? m[i] == x[xi] : (m[i] == x[xi] || m[i] == 1);
  }
  if (m.size() == 0 || (!m.empty() && int(x.size() - m.size()) > plan.feature_axis)) ok = false;
  if (!ok)
    throw Error("mask of shape " + shape_string(m) + " does not broadcast to x of shape " +
                shape_string(x) + ": its feature axis must have the " +
                std::to_string(plan.channels) +
                " channels and every other axis x's extent or 1");
  if (!mask.data && element_count(m) > 0) throw Error("mask has no data");
}

// semantics §4 and §6 for the cells of `block`, from their merged moments.
void finalize_cells(const std::vector<CellMoments>& moments, CellRange block, const FinalizeParams& finalize,
                    HostCellStatistics& out) {
  out.resize(int64_t(moments.size()));
  for (int64_t cell = block.begin; cell < block.end; ++cell) {
    const CellMoments& m = moments[size_t(cell)];
    const CellStats stats = finalize_moments(m, finalize.epsilon, finalize.fast_variance, finalize.stats_dtype);
    out.mean[size_t(cell)] = stats.mean;
    out.rstd[size_t(cell)] = stats.rstd;
    out.count[size_t(cell)] = m.count;
    out.variance_clamped[size_t(cell)] = stats.variance_clamped;
  }
}

// dbias[c] = channel_sums[c], dscale[c] = channel_sums[C + c] (those asked
// for): written by the backend where they are in its device memory (from
// the sums it added up itself when `on_backend`, which then also fill
// `channel_sums`), here where they are in host memory.
void store_param_grads(Backend& backend, bool on_backend, double* channel_sums, int64_t channels,
                       const TensorView* dscale, const TensorView* dbias, DType param_dtype) {
  void* device_dscale = dscale && dscale->device != Device::cpu ? dscale->data : nullptr;
  void* device_dbias = dbias && dbias->device != Device::cpu ? dbias->data : nullptr;
  const bool host_dscale = dscale && !device_dscale, host_dbias = dbias && !device_dbias;
  if (device_dscale || device_dbias || (on_backend && (host_dscale || host_dbias)))
    backend.param_grads(on_backend ? nullptr : channel_sums, channels, device_dscale, device_dbias, param_dtype,
                        on_backend && (host_dscale || host_dbias) ? channel_sums : nullptr);
  for (int64_t c = 0; c < channels; ++c) {
    if (host_dbias) store_element(dbias->dtype, dbias->data, c, channel_sums[c]);
    if (host_dscale) store_element(dscale->dtype, dscale->data, c, channel_sums[channels + c]);
  }
}

const char* memory_of(Device device) { return device == Device::cpu ? "host memory" : "device memory"; }

// Device tensors need the CUDA backend.
void check_device_supported(const char* name, Device device) {
#if DISTGN_WITH_CUDA
  (void)name;
  (void)device;
#else
  if (device != Device::cpu)
    throw Error(std::string(name) + " is on a device this build has no backend for (built without CUDA)");
#endif
}

// A mask in device memory only goes with device tensors.
void check_mask_device(const MaskView* mask, Device x_device) {
  if (mask && mask->device != Device::cpu && mask->device != x_device)
    throw Error(std::string("mask is in ") + memory_of(mask->device) + " but x is in " + memory_of(x_device));
}

void check_view(const char* name, const TensorView& view, const Shape& shape, DType dtype,
                Layout layout, Device device) {
  if (view.shape != shape)
    throw Error(std::string(name) + " has shape " + shape_string(view.shape) + " but x has shape " +
                shape_string(shape));
  if (view.dtype != dtype)
    throw Error(std::string(name) + " has dtype " + dtype_name(view.dtype) + " but must be " +
                dtype_name(dtype));
  if (view.layout != layout) throw Error(std::string(name) + " has a different layout from x");
  if (view.device != device)
    throw Error(std::string(name) + " is in " + memory_of(view.device) + " but x is in " + memory_of(device));
  if (byte_size(shape, dtype) > 0 && !view.data) throw Error(std::string(name) + " has no data");
}

// Group index of each rank, or throws semantics §7's message.
std::vector<int> group_of_rank(const std::vector<std::vector<int>>& groups, int ranks) {
  std::vector<int> group(size_t(ranks), -1);
  bool ok = true;
  for (size_t g = 0; g < groups.size(); ++g)
    for (int r : groups[g]) {
      if (r < 0 || r >= ranks || group[size_t(r)] != -1) ok = false;
      else group[size_t(r)] = int(g);
    }
  if (!ok || std::count(group.begin(), group.end(), -1) > 0)
    throw Error("axis_index_groups must cover all indices exactly once");
  return group;
}

}  // namespace

struct GroupNorm::Workspace {
  std::unique_ptr<Backend> cpu = make_cpu_backend();
#if DISTGN_WITH_CUDA
  std::unique_ptr<Backend> cuda;  // made on the first call with device tensors
#endif
  std::unique_ptr<GroupExchange> exchange;
  // The plan of the last input seen and what the ranks agree on, reused
  // while shape, layout and dtype repeat.
  std::shared_ptr<const KernelPlan> plan;  // null until a call's shape resolves
  std::string signature;
  // Per-call host buffers, kept across calls: the collectives' payloads.
  std::vector<CellMoments> moments;
  HostCellStatistics finalized;
  std::vector<double> scale, bias, sums;
  ForwardState state;  // when the caller keeps none

  // The backend for tensors in `device` memory, launching on `stream`.
  Backend& backend_for(Device device, CUstream_st* stream) {
#if DISTGN_WITH_CUDA
    if (device == Device::cuda) {
      if (!cuda) cuda = make_cuda_backend();
      cuda->set_stream(stream);
      return *cuda;
    }
#endif
    (void)device;
    (void)stream;
    return *cpu;
  }

  // The call's backend given the parameters (host doubles, or null), with
  // x, the mask and dy (or null) in its walking order in `in`.
  Backend& begin(const KernelPlan& p, const TensorView& x, const MaskView* mask, const TensorView* dy,
                 const double* scale_values, const double* bias_values, CUstream_st* stream, KernelInputs& in) {
    Backend& backend = backend_for(x.device, stream);
    backend.set_parameters(p, scale_values, bias_values);
    in = backend.inputs(p, x.data, mask, dy ? dy->data : nullptr, dy ? dy->dtype : p.input_dtype);
    return backend;
  }

  // The statistics of `block`, finalised from the merged `moments`, into `stats`.
  void store_merged(Backend& backend, CellRange block, const FinalizeParams& finalize, CellStatistics& stats) {
    finalize_cells(moments, block, finalize, finalized);
    backend.store_statistics(block, finalized, stats);
  }

  // A new plan object per new shape: a ForwardState that shares the old one
  // keeps it.
  const KernelPlan& plan_for(const GroupNormConfig& config, const TensorView& x) {
    if (!plan || x.shape != plan->shape || x.layout != plan->layout || x.dtype != plan->input_dtype) {
      plan.reset();
      auto resolved = std::make_shared<const KernelPlan>(resolve_kernel_plan(config, x.shape, x.layout, x.dtype));
      signature = signature_of(*resolved, config);
      plan = std::move(resolved);
    }
    return *plan;
  }

};

GroupNorm::GroupNorm(GroupNormConfig config, std::shared_ptr<Communicator> comm)
    : config_(std::move(config)), comm_(std::move(comm)), workspace_(new Workspace) {
  if (!comm_) throw Error("GroupNorm needs a communicator (local_communicator() for one process)");
  if (!config_.axis_index_groups) {
    group_comm_ = comm_;
  } else {
    // Decided by the configuration alone; the agreement below makes a rank
    // with a different configuration fail everywhere instead of hanging.
    std::string error;
    std::vector<int> group;
    try {
      group = group_of_rank(*config_.axis_index_groups, comm_->size());
    } catch (const Error& e) {
      error = e.what();
    }
    std::ostringstream groups;
    for (const auto& g : *config_.axis_index_groups) {
      groups << '[';
      for (int r : g) groups << r << ',';
      groups << ']';
    }
    GroupExchange(*comm_).agree({error, "axis_index_groups " + groups.str(), 0});
    const int color = group[size_t(comm_->rank())];
    const auto& members = (*config_.axis_index_groups)[size_t(color)];
    const int key = int(std::find(members.begin(), members.end(), comm_->rank()) - members.begin());
    group_comm_ = std::shared_ptr<Communicator>(comm_->split(color, key));
  }
  workspace_->exchange = std::make_unique<GroupExchange>(*group_comm_);
}

GroupNorm::~GroupNorm() = default;
GroupNorm::GroupNorm(GroupNorm&&) noexcept = default;
GroupNorm& GroupNorm::operator=(GroupNorm&&) noexcept = default;

void GroupNorm::init_parameters(int64_t channels) {
  if (channels <= 0) throw Error("number of channels must be positive, got " + std::to_string(channels));
  const int64_t bytes = dtype_size(config_.param_dtype);
  const int64_t scale_count = config_.use_scale ? channels : 0;
  const int64_t bias_count = config_.use_bias ? channels : 0;
  parameters_.assign(size_t((scale_count + bias_count) * bytes), 0);
  // Flax creates scale before bias; the order only matters for the buffer.
  if (scale_count) initialize(config_.scale_init, channels, config_.param_dtype, parameters_.data());
  if (bias_count)
    initialize(config_.bias_init, channels, config_.param_dtype,
               parameters_.data() + scale_count * bytes);
  channels_ = channels;
}

TensorView GroupNorm::scale() {
  if (!config_.use_scale) throw Error("this layer has no scale (use_scale is false)");
  if (!channels_) throw Error("parameters are not initialised yet: call init_parameters(C)");
  return {parameters_.data(), {channels_}, config_.param_dtype};
}

TensorView GroupNorm::bias() {
  if (!config_.use_bias) throw Error("this layer has no bias (use_bias is false)");
  if (!channels_) throw Error("parameters are not initialised yet: call init_parameters(C)");
  const size_t offset = config_.use_scale ? size_t(channels_ * dtype_size(config_.param_dtype)) : 0;
  return {parameters_.data() + offset, {channels_}, config_.param_dtype};
}

static void copy_parameter(const char* name, const TensorView& from, TensorView to) {
  if (from.shape.size() != 1 || (to.shape[0] && from.shape[0] != to.shape[0]))
    throw Error(std::string(name) + " has shape " + shape_string(from.shape) + " but must have shape " +
                shape_string(to.shape));
  if (from.device != Device::cpu) throw Error(std::string(name) + " must be in host memory");
  for (int64_t c = 0; c < to.shape[0]; ++c)
    store_element(to.dtype, to.data, c, load_element(from.dtype, from.data, c));
}

void GroupNorm::set_scale(const TensorView& scale) {
  if (!channels_ && scale.shape.size() == 1) init_parameters(scale.shape[0]);
  copy_parameter("scale", scale, this->scale());
}

void GroupNorm::set_bias(const TensorView& bias) {
  if (!channels_ && bias.shape.size() == 1) init_parameters(bias.shape[0]);
  copy_parameter("bias", bias, this->bias());
}

namespace {
const HostCellStatistics& host_statistics(const std::shared_ptr<CellStatistics>& cells) {
  static const HostCellStatistics none;
  return cells ? cells->host() : none;
}

// A state's plan, or an empty one (no cells) before its first forward call.
const KernelPlan& plan_of(const std::shared_ptr<const KernelPlan>& plan) {
  static const KernelPlan none;
  return plan ? *plan : none;
}
}  // namespace

const Plan& ForwardState::plan() const { return plan_of(plan_); }

const std::vector<double>& ForwardState::mean() const { return host_statistics(cells_).mean; }
const std::vector<double>& ForwardState::rstd() const { return host_statistics(cells_).rstd; }
const std::vector<double>& ForwardState::count() const { return host_statistics(cells_).count; }
const std::vector<uint8_t>& ForwardState::variance_clamped() const {
  return host_statistics(cells_).variance_clamped;
}

Plan GroupNorm::plan(const Shape& shape, Layout layout, DType dtype) const {
  return resolve(config_, shape, layout, dtype);
}

void GroupNorm::load_parameters(int64_t channels, std::vector<double>& scale, std::vector<double>& bias) {
  if (!channels_ && (config_.use_scale || config_.use_bias)) init_parameters(channels);
  scale.resize(config_.use_scale ? size_t(channels_) : 0);
  bias.resize(config_.use_bias ? size_t(channels_) : 0);
  // One dtype dispatch per array, not per element: on a cache-sized call
  // (1280 channels) the per-element one was ~4% of the forward.
  const uint8_t* data = parameters_.data();
  load_elements(config_.param_dtype, data, int64_t(scale.size()), scale.data());
  if (config_.use_scale) data += channels_ * dtype_size(config_.param_dtype);
  load_elements(config_.param_dtype, data, int64_t(bias.size()), bias.data());
}

// Resolves the plan of x (semantics §2.1-4, cached per shape), then checks the
// mask (§2.5), the parameters (§2.6) and y. Returns the error message, or "".
std::string GroupNorm::check_forward(const TensorView& x, const TensorView* y, const MaskView* mask) {
  try {
    check_device_supported("x", x.device);
    const Plan& plan = workspace_->plan_for(config_, x);
    if (mask) check_mask(plan, *mask);
    check_mask_device(mask, x.device);
    if (channels_ && channels_ != plan.channels && (config_.use_scale || config_.use_bias))
      throw Error(std::string(config_.use_scale ? "scale" : "bias") + " has shape (" +
                  std::to_string(channels_) + ",) but x has " + std::to_string(plan.channels) +
                  " channels (shape " + shape_string(x.shape) + ")");
    if (byte_size(x.shape, x.dtype) > 0 && !x.data) throw Error("x has no data");
    if (y) check_view("y", *y, x.shape, plan.output_dtype, x.layout, x.device);
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

// The checks of a backward call's arguments, as check_forward's: the forward
// state, x, dy, dx, the mask and dscale/dbias. Returns the error, or "".
std::string GroupNorm::check_backward(const TensorView& x, const TensorView& dy, const MaskView* mask,
                                      const ForwardState& state, const TensorView* dx, const TensorView* dscale,
                                      const TensorView* dbias) const {
  const Plan& plan = state.plan();
  const int64_t cells = plan.num_cells, channels = plan.channels;
  try {
    check_device_supported("x", x.device);
    const bool have_state = state.cells_ && state.cells_->device() == x.device && state.cells_->cells() == cells;
    if (!have_state || (cells == 0 && element_count(plan.shape) > 0))
      throw Error("backward needs the state of a forward call on the same input");
    check_view("x", x, plan.shape, plan.input_dtype, plan.layout, x.device);
    if (dy.shape != plan.shape)
      throw Error("dy has shape " + shape_string(dy.shape) + " but x has shape " + shape_string(plan.shape));
    check_view("dy", dy, plan.shape, dy.dtype, plan.layout, x.device);
    if (dx) check_view("dx", *dx, plan.shape, plan.input_dtype, plan.layout, x.device);
    if (mask) check_mask(plan, *mask);
    check_mask_device(mask, x.device);
    for (const TensorView* grad : {dscale, dbias})
      if (grad && (grad->shape.size() != 1 || grad->shape[0] != channels || grad->dtype != config_.param_dtype ||
                   (grad->device != Device::cpu && grad->device != x.device) || !grad->data))
        throw Error(std::string(grad == dscale ? "dscale" : "dbias") + " has shape " + shape_string(grad->shape) +
                    " and dtype " + dtype_name(grad->dtype) + " but must be (" + std::to_string(channels) + ",) " +
                    dtype_name(config_.param_dtype) + " in host memory" +
                    (x.device == Device::cpu ? "" : " or x's device memory"));
    if (dscale && !config_.use_scale) throw Error("dscale asked for but use_scale is false");
    if (dbias && !config_.use_bias) throw Error("dbias asked for but use_bias is false");
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

// The set-up of a checked forward call (plan_for has resolved ws.plan): the
// parameters, the backend with x and the mask in its walking order, where y
// is written, and the state's per-cell arrays.
Backend& GroupNorm::begin_forward(const TensorView& x, const TensorView& y, const MaskView* mask, ForwardState& state,
                                  KernelInputs& in, void*& out) {
  Workspace& ws = *workspace_;
  const KernelPlan& plan = *ws.plan;
  load_parameters(plan.channels, ws.scale, ws.bias);
  Backend& backend = ws.begin(plan, x, mask, nullptr, config_.use_scale ? ws.scale.data() : nullptr,
                              config_.use_bias ? ws.bias.data() : nullptr, stream_, in);
  out = backend.output(plan, y.data, plan.output_dtype);
  state.plan_ = ws.plan;
  state.cells_ = backend.cell_statistics(std::move(state.cells_), plan.num_cells);
  return backend;
}

void GroupNorm::forward(const TensorView& x, const TensorView& y, const MaskView* mask,
                        ForwardState* state_out) {
  Workspace& ws = *workspace_;
  ForwardState& state = state_out ? *state_out : ws.state;
  const bool distributed = group_comm_->size() > 1;

  RankInput input;
  input.error = check_forward(x, &y, mask);
  if (!input.error.empty()) {
    if (distributed) ws.exchange->merge(input, ws.moments);  // raises on every rank
    throw Error(input.error);
  }
  const KernelPlan& plan = *ws.plan;
  input.signature = ws.signature;  // a view: no copy per call
  input.num_cells = plan.num_cells;
  KernelInputs in;
  void* out = nullptr;
  Backend& backend = begin_forward(x, y, mask, state, in, out);
  CellStatistics& stats = *state.cells_;
  const FinalizeParams finalize{config_.epsilon, config_.use_fast_variance, plan.stats_dtype};

  // The flow: partial stats, one collective, finalize, normalise. A group
  // of one rank needs no collective, so it runs the flow per cache-sized
  // block of cells, and a backend that can finalise the statistics where it
  // reduces them does so.
  const bool finalize_on_backend = !distributed && backend.finalizes_statistics();
  for (const CellRange& block : backend.blocks(plan, dtype_size(plan.input_dtype), !distributed)) {
    if (finalize_on_backend) {
      backend.finalized_statistics(in, block, finalize, stats);
    } else {
      ws.moments.resize(size_t(plan.num_cells));
      backend.partial_stats(in, block, ws.moments.data());
      if (distributed) ws.exchange->merge(input, ws.moments);
      ws.store_merged(backend, block, finalize, stats);
    }
    backend.normalize(in, block, stats, out, plan.output_dtype);
  }
  backend.finish_output(plan, y.data, plan.output_dtype);
}

void GroupNorm::backward(const TensorView& x, const TensorView& dy, const MaskView* mask,
                         const ForwardState& state, const TensorView& dx, const TensorView* dscale,
                         const TensorView* dbias, ParamGradReduction reduction) {
  Workspace& ws = *workspace_;
  const KernelPlan& plan = plan_of(state.plan_);
  const bool distributed = group_comm_->size() > 1;
  const bool whole_group = group_comm_->size() == comm_->size();
  const bool params_with_group = reduction == ParamGradReduction::group ||
                                 (reduction == ParamGradReduction::all && whole_group);
  const bool params_with_world =
      reduction == ParamGradReduction::all && !whole_group && comm_->size() > 1;
  const int64_t cells = plan.num_cells, channels = plan.channels;

  std::string error = check_backward(x, dy, mask, state, &dx, dscale, dbias);

  // sums: [group flag | A, B per cell | sum dy, sum dy*xhat per channel | world flag]
  std::vector<double>& sums = ws.sums;
  sums.assign(size_t(1 + 2 * cells + 2 * channels + 1), 0.0);
  double* cell_sums = sums.data() + 1;
  double* channel_sums = cell_sums + 2 * cells;
  const size_t group_count = size_t(1 + 2 * cells + (params_with_group ? 2 * channels : 0));
  const bool fused = !distributed && !params_with_world;
  // The backward's collectives: cell sums (and channel sums) over the group,
  // channel sums over the world. A rank with an error joins them and raises
  // with the others.
  auto exchange_sums = [&] {
    if (distributed) ws.exchange->sum(error, sums.data(), group_count);
    if (params_with_world) sum_or_raise(*comm_, error, channel_sums, size_t(2 * channels + 1), size_t(2 * channels));
  };
  if (!error.empty()) {
    exchange_sums();
    throw Error(error);
  }

  load_parameters(plan.channels, ws.scale, ws.bias);
  KernelInputs in;
  Backend& backend =
      ws.begin(plan, x, mask, &dy, config_.use_scale ? ws.scale.data() : nullptr, nullptr, stream_, in);
  void* dx_out = backend.output(plan, dx.data, plan.input_dtype);
  const CellStatistics& stats = *state.cells_;

  // The flow: partial sums A, B; one collective; terms; dx. Per cache-sized
  // block for a group of one rank, where a backend that can make the terms
  // with the sums does so (the channel sums then add up on the backend).
  const bool terms_on_backend = fused && backend.finalizes_terms();
  const std::vector<CellRange> blocks =
      backend.blocks(plan, dtype_size(plan.input_dtype) + dtype_size(dy.dtype), fused);
  for (size_t b = 0; b < blocks.size(); ++b) {
    if (terms_on_backend) {
      backend.sums_and_terms(in, blocks[b], stats, b == 0);
    } else {
      backend.backward_sums(in, blocks[b], stats, cell_sums, channel_sums);
      exchange_sums();
      backend.store_terms(blocks[b], cell_sums, stats);
    }
    backend.input_grad(in, blocks[b], stats, dx_out);
  }
  backend.finish_output(plan, dx.data, plan.input_dtype);

  store_param_grads(backend, terms_on_backend && !blocks.empty(), channel_sums, channels, dscale, dbias,
                    config_.param_dtype);
}

// ---- the phases of a call --------------------------------------------------------------

std::vector<double> GroupNorm::forward_partial_stats(const TensorView& x, const MaskView* mask) {
  Workspace& ws = *workspace_;
  if (const std::string error = check_forward(x, nullptr, mask); !error.empty()) throw Error(error);
  const KernelPlan& plan = *ws.plan;
  // The partial statistics read no parameter: none are loaded here.
  KernelInputs in;
  Backend& backend = ws.begin(plan, x, mask, nullptr, nullptr, nullptr, stream_, in);
  ws.moments.resize(size_t(plan.num_cells));
  for (const CellRange& block : backend.blocks(plan, dtype_size(plan.input_dtype), false))
    backend.partial_stats(in, block, ws.moments.data());
  std::vector<double> payload(size_t(3 * plan.num_cells));
  for (size_t i = 0; i < ws.moments.size(); ++i) {
    payload[3 * i] = ws.moments[i].count;
    payload[3 * i + 1] = ws.moments[i].mean;
    payload[3 * i + 2] = ws.moments[i].m2;
  }
  return payload;
}

void GroupNorm::forward_finish(const TensorView& x, const TensorView& y, const MaskView* mask,
                               const double* gathered, int ranks, ForwardState* state_out) {
  Workspace& ws = *workspace_;
  ForwardState& state = state_out ? *state_out : ws.state;
  if (const std::string error = check_forward(x, &y, mask); !error.empty()) throw Error(error);
  const KernelPlan& plan = *ws.plan;
  if (ranks < 1 || (!gathered && plan.num_cells > 0))
    throw Error("forward_finish needs the partial statistics of at least one rank, got " + std::to_string(ranks));
  KernelInputs in;
  void* out = nullptr;
  Backend& backend = begin_forward(x, y, mask, state, in, out);
  const FinalizeParams finalize{config_.epsilon, config_.use_fast_variance, plan.stats_dtype};
  ws.moments.resize(size_t(plan.num_cells));
  merge_in_rank_order(gathered, size_t(3 * plan.num_cells), ranks, plan.num_cells, ws.moments.data());
  for (const CellRange& block : backend.blocks(plan, dtype_size(plan.input_dtype), false)) {
    ws.store_merged(backend, block, finalize, *state.cells_);
    backend.normalize(in, block, *state.cells_, out, plan.output_dtype);
  }
  backend.finish_output(plan, y.data, plan.output_dtype);
}

std::vector<double> GroupNorm::backward_partial_sums(const TensorView& x, const TensorView& dy, const MaskView* mask,
                                                     const ForwardState& state) {
  Workspace& ws = *workspace_;
  if (const std::string error = check_backward(x, dy, mask, state, nullptr, nullptr, nullptr); !error.empty())
    throw Error(error);
  const KernelPlan& plan = plan_of(state.plan_);
  load_parameters(plan.channels, ws.scale, ws.bias);
  KernelInputs in;
  Backend& backend =
      ws.begin(plan, x, mask, &dy, config_.use_scale ? ws.scale.data() : nullptr, nullptr, stream_, in);
  std::vector<double> payload(size_t(2 * plan.num_cells + 2 * plan.channels), 0.0);
  for (const CellRange& block : backend.blocks(plan, dtype_size(plan.input_dtype) + dtype_size(dy.dtype), false))
    backend.backward_sums(in, block, *state.cells_, payload.data(), payload.data() + 2 * plan.num_cells);
  return payload;
}

void GroupNorm::backward_finish(const TensorView& x, const TensorView& dy, const MaskView* mask,
                                const ForwardState& state, const double* summed, const TensorView& dx,
                                const TensorView* dscale, const TensorView* dbias) {
  Workspace& ws = *workspace_;
  if (const std::string error = check_backward(x, dy, mask, state, &dx, dscale, dbias); !error.empty())
    throw Error(error);
  const KernelPlan& plan = plan_of(state.plan_);
  if (!summed && plan.num_cells + plan.channels > 0) throw Error("backward_finish needs the summed partial sums");
  load_parameters(plan.channels, ws.scale, ws.bias);
  KernelInputs in;
  Backend& backend =
      ws.begin(plan, x, mask, &dy, config_.use_scale ? ws.scale.data() : nullptr, nullptr, stream_, in);
  void* dx_out = backend.output(plan, dx.data, plan.input_dtype);
  for (const CellRange& block : backend.blocks(plan, dtype_size(plan.input_dtype) + dtype_size(dy.dtype), false)) {
    backend.store_terms(block, summed, *state.cells_);
    backend.input_grad(in, block, *state.cells_, dx_out);
  }
  backend.finish_output(plan, dx.data, plan.input_dtype);
  ws.sums.assign(summed + 2 * plan.num_cells, summed + 2 * plan.num_cells + 2 * plan.channels);
  store_param_grads(backend, false, ws.sums.data(), plan.channels, dscale, dbias, config_.param_dtype);
}

}  // namespace distgn
