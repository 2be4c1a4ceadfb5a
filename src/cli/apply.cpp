// `distgn apply`: load .npy files, shard them over the ranks, run the layer
// forward (and backward), gather the results on rank 0 and write them.
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "cli/cli.hpp"
#include "core/group_exchange.hpp"
#include "core/half.hpp"
#include "distgn/error.hpp"
#include "distgn/group_norm.hpp"
#include "io/npy.hpp"

namespace distgn::cli {
namespace {

DType dtype_of_file(const io::NpyArray& a) {
  switch (a.type) {
    case io::NpyType::f2: return DType::f16;
    case io::NpyType::f8: return DType::f64;
    default: return DType::f32;  // f4, and integers promote to float32 (SPEC §5)
  }
}

HostArray load(const std::string& path, const std::string& dtype) {
  const io::NpyArray a = io::read_npy(path);
  const DType t = dtype.empty() ? dtype_of_file(a) : parse_dtype(dtype);
  return {a.shape, t, io::convert_to(a, t)};
}

void save(const std::string& path, const HostArray& a) {
  if (a.dtype != DType::bf16) {
    io::write_npy(path, a.shape, io::npy_type_for(a.dtype), a.bytes.data());
    return;
  }
  // numpy has no bfloat16: write float32, an exact widening.
  const int64_t n = element_count(a.shape);
  std::vector<float> wide(static_cast<size_t>(n));
  const auto* h = reinterpret_cast<const bfloat16_t*>(a.bytes.data());
  for (int64_t i = 0; i < n; ++i) wide[size_t(i)] = to_float(h[i]);
  io::write_npy(path, a.shape, io::NpyType::f4, wide.data());
}

// The sharding with a non-negative axis, checked against the plan.
Sharding checked_sharding(const Sharding& s, const Plan& plan) {
  if (s.mode != Sharding::Mode::shard_axis) return s;
  const int rank = int(plan.shape.size());
  if (s.axis < -rank || s.axis >= rank)
    throw Error("--shard-axis " + std::to_string(s.axis) + " is out of range for x of shape " +
                shape_string(plan.shape));
  const int axis = s.axis < 0 ? s.axis + rank : s.axis;
  if (!std::binary_search(plan.reduction_axes.begin(), plan.reduction_axes.end(), int64_t(axis)) ||
      axis == plan.feature_axis)
    throw Error("--shard-axis " + std::to_string(s.axis) +
                " is not a reduced axis other than the feature axis: sharding along it would "
                "split cells' groups or change which cells exist; shard along one of the "
                "reduction axes");
  return {s.mode, axis};
}

// Rank 0 writes the outputs: find an unwritable path before any work, and
// make every rank raise, so that nothing is written and nobody hangs.
void check_outputs_writable(const ApplyOptions& o, Communicator& comm) {
  std::string error;
  if (comm.rank() == 0)
    for (const std::string* path : {&o.y, &o.dx, &o.dscale, &o.dbias}) {
      if (path->empty()) continue;
      const std::filesystem::path target(*path);
      const std::filesystem::path dir = target.has_parent_path() ? target.parent_path() : ".";
      std::error_code ec;
      if (std::filesystem::is_directory(target, ec))
        error = "cannot write " + *path + ": it is a directory";
      else if (!std::filesystem::is_directory(dir, ec) || ::access(dir.c_str(), W_OK) != 0)
        error = "cannot write " + *path + ": " + dir.string() + " is not a writable directory";
      if (!error.empty()) break;
    }
  GroupExchange(comm).agree({error, "outputs", 0});
}

}  // namespace

std::vector<int64_t> parse_int_list(const std::string& text, const char* what) {
  std::vector<int64_t> values;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      size_t used = 0;
      values.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw Error(std::string(what) + ": '" + text + "' is not a comma-separated list of integers");
    }
  }
  return values;
}

std::vector<std::vector<int>> parse_groups(const std::string& text) {
  std::vector<std::vector<int>> groups;
  std::stringstream in(text);
  std::string group;
  while (std::getline(in, group, ';')) {
    std::vector<int> ranks;
    for (int64_t r : parse_int_list(group, "--axis-index-groups")) ranks.push_back(int(r));
    groups.push_back(ranks);
  }
  return groups;
}

void run_apply(const ApplyOptions& options, const std::shared_ptr<Communicator>& comm) {
  const bool on_gpu = cuda_backend_requested(options.backend);
  const bool backward = !options.dy.empty();
  if (backward != !options.dx.empty()) throw Error("--dy and --dx go together");
  if (!backward && (!options.dscale.empty() || !options.dbias.empty()))
    throw Error("--dscale and --dbias need --dy and --dx");
  if (!options.dscale.empty() && !options.config.use_scale)
    throw Error("--dscale asked for but the layer has no scale (--no-scale)");
  if (!options.dbias.empty() && !options.config.use_bias)
    throw Error("--dbias asked for but the layer has no bias (--no-bias)");
  const int rank = comm->rank(), ranks = comm->size();
  check_outputs_writable(options, *comm);

  GroupNormConfig config = options.config;
  if (!options.axis_index_groups.empty()) config.axis_index_groups = parse_groups(options.axis_index_groups);

  // Load everything first: a bad file fails before any work.
  HostArray x_all = load(options.x, options.input_dtype);
  HostArray dy_all, scale, bias;
  if (backward) dy_all = load(options.dy, options.input_dtype);
  io::NpyArray mask_file;
  if (!options.mask.empty()) mask_file = io::read_npy(options.mask);
  if (!options.scale.empty()) scale = load(options.scale, "");
  if (!options.bias.empty()) bias = load(options.bias, "");
  if (!options.scale.empty() && !config.use_scale) throw Error("--scale given with --no-scale");
  if (!options.bias.empty() && !config.use_bias) throw Error("--bias given with --no-bias");

  Shape local_template = x_all.shape;
  if (options.sharding.mode == Sharding::Mode::ranks_axis) {
    if (x_all.shape.empty() || x_all.shape[0] != ranks)
      throw Error("--ranks-axis: x of shape " + shape_string(x_all.shape) +
                  " must have a leading axis of length " + std::to_string(ranks) +
                  " (the number of ranks)");
    local_template.erase(local_template.begin());
  }
  GroupNorm layer(config, comm);
  // Validate the whole configuration on the unsharded shape first, so every
  // rank reports SPEC §2's message the same way whatever its shard.
  const Plan whole_plan = layer.plan(local_template, options.layout, x_all.dtype);
  const Sharding sharding = checked_sharding(options.sharding, whole_plan);

  HostArray x = shard(x_all, sharding, x_all.shape, rank, ranks, "x");
  HostArray dy;
  if (backward) {
    if (dy_all.shape != x_all.shape)
      throw Error("dy has shape " + shape_string(dy_all.shape) + " but x has shape " +
                  shape_string(x_all.shape));
    dy = shard(dy_all, sharding, x_all.shape, rank, ranks, "dy");
  }
  // The mask travels as float 0/1 through the sharding, then becomes bytes.
  std::vector<uint8_t> mask_bytes;
  MaskView mask;
  if (!options.mask.empty()) {
    const std::vector<uint8_t> valid = io::to_mask(mask_file);
    HostArray as_float{mask_file.shape, DType::f32, std::vector<uint8_t>(valid.size() * sizeof(float))};
    for (size_t i = 0; i < valid.size(); ++i) {
      const float v = valid[i];
      std::memcpy(as_float.bytes.data() + i * sizeof(float), &v, sizeof v);
    }
    const HostArray part = shard(as_float, sharding, x_all.shape, rank, ranks, "mask");
    mask_bytes.resize(part.bytes.size() / sizeof(float));
    for (size_t i = 0; i < mask_bytes.size(); ++i) {
      float v;
      std::memcpy(&v, part.bytes.data() + i * sizeof(float), sizeof v);
      mask_bytes[i] = v != 0.0f;
    }
    mask = {mask_bytes.data(), part.shape, Device::cpu};
  }

  const Plan plan = layer.plan(x.shape, options.layout, x.dtype);
  layer.init_parameters(plan.channels);
  if (!options.scale.empty()) layer.set_scale(scale.view(Layout::channels_last));
  if (!options.bias.empty()) layer.set_bias(bias.view(Layout::channels_last));

  HostArray y{x.shape, plan.output_dtype, {}};
  y.bytes.resize(size_t(element_count(x.shape) * dtype_size(y.dtype)));
  ForwardState state;
  const MaskView* mask_ptr = options.mask.empty() ? nullptr : &mask;
  TensorView x_view = x.view(options.layout), y_view = y.view(options.layout);
#if DISTGN_WITH_CUDA
  // --backend cuda: the same calls on device copies, one GPU per rank (round
  // robin); the mask stays in host memory (the layer copies it over).
  cuda::DeviceArray x_dev, y_dev, dy_dev, dx_dev;
  if (on_gpu) {
    cuda::use_device_of_rank(rank);
    x_view = device_view(x, options.layout, x_dev, true);
    y_view = device_view(y, options.layout, y_dev, false);
  }
#endif
  layer.forward(x_view, y_view, mask_ptr, &state);
#if DISTGN_WITH_CUDA
  if (on_gpu) y_dev.download(y.bytes.data(), y.bytes.size());
#endif

  HostArray dx, dscale, dbias;
  if (backward) {
    dx = {x.shape, x.dtype, std::vector<uint8_t>(x.bytes.size())};
    const Shape c{plan.channels};
    const size_t param_bytes = size_t(plan.channels * dtype_size(config.param_dtype));
    dscale = {c, config.param_dtype, std::vector<uint8_t>(param_bytes)};
    dbias = {c, config.param_dtype, std::vector<uint8_t>(param_bytes)};
    TensorView dscale_view = dscale.view(Layout::channels_last);
    TensorView dbias_view = dbias.view(Layout::channels_last);
    TensorView dy_view = dy.view(options.layout), dx_view = dx.view(options.layout);
#if DISTGN_WITH_CUDA
    if (on_gpu) {
      dy_view = device_view(dy, options.layout, dy_dev, true);
      dx_view = device_view(dx, options.layout, dx_dev, false);
    }
#endif
    layer.backward(x_view, dy_view, mask_ptr, state, dx_view, config.use_scale ? &dscale_view : nullptr,
                   config.use_bias ? &dbias_view : nullptr, ParamGradReduction::all);
#if DISTGN_WITH_CUDA
    if (on_gpu) dx_dev.download(dx.bytes.data(), dx.bytes.size());
#endif
  }

  // Join the shards (collective), then rank 0 writes.
  const HostArray y_all = unshard(*comm, y, sharding, x_all.shape);
  HostArray dx_all;
  if (backward) dx_all = unshard(*comm, dx, sharding, x_all.shape);
  if (rank != 0) return;
  save(options.y, y_all);
  if (backward) {
    save(options.dx, dx_all);
    if (!options.dscale.empty()) save(options.dscale, dscale);
    if (!options.dbias.empty()) save(options.dbias, dbias);
  }
}

}  // namespace distgn::cli
