// `distgn apply`: load .npy files, shard them over the ranks, run the layer
// forward (and backward), gather the results on rank 0 and write them.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstring>
#include <filesystem>
#include <new>
#include <sstream>

#include "cli/cli.hpp"
#include "distgn/error.hpp"
#include "distgn/group_norm.hpp"
#include "io/npy.hpp"

namespace distgn::cli {
namespace {

DType dtype_of_file(const io::NpyArray& a) {
  switch (a.type) {
    case io::NpyType::f2: return DType::f16;
    case io::NpyType::f8: return DType::f64;
    default: return DType::f32;  // f4, and integers promote to float32 (semantics §5)
  }
}

HostArray load(const std::string& path, const std::string& dtype) {
  io::NpyArray a;
  try {
    a = io::read_npy(path);
  } catch (const std::bad_alloc&) {
    std::error_code ec;
    throw Error("out of memory: reading " + path + " needs " + byte_count(int64_t(std::filesystem::file_size(path, ec))) +
                " for its data; free memory or use a smaller input");
  }
  const DType t = dtype.empty() ? dtype_of_file(a) : parse_dtype(dtype);
  // Already in the storage dtype: keep the file's bytes rather than a copy.
  if (t != DType::bf16 && io::npy_type_for(t) == a.type) return {a.shape, t, std::move(a.bytes)};
  return {a.shape, t, io::convert_to(a, t)};
}

// --scale and --bias are learned float parameters: an integer or bool file is
// almost surely the wrong file, so it is refused rather than converted.
HostArray load_parameter(const std::string& path, const char* option) {
  const io::NpyArray a = io::read_npy(path);
  if (a.type != io::NpyType::f2 && a.type != io::NpyType::f4 && a.type != io::NpyType::f8)
    throw Error(std::string(option) + " " + path + " holds " + io::npy_descr(a.type) +
                " elements; a parameter file must hold floats (<f2, <f4 or <f8)");
  return {a.shape, dtype_of_file(a), io::convert_to(a, dtype_of_file(a))};
}

void save(const std::string& path, const HostArray& a) {
  if (a.dtype != DType::bf16) {
    io::write_npy(path, a.shape, io::npy_type_for(a.dtype), a.bytes.data());
    return;
  }
  // numpy has no bfloat16: write float32, an exact widening.
  const int64_t n = element_count(a.shape);
  std::vector<float> wide(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) wide[size_t(i)] = float(load_element(DType::bf16, a.bytes.data(), i));
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
  if (!shardable_axis(axis, plan.reduction_axes, plan.feature_axis))
    throw Error("--shard-axis " + std::to_string(s.axis) +
                " is not a reduced axis other than the feature axis: sharding along it would "
                "split cells' groups or change which cells exist; shard along one of the "
                "reduction axes");
  return {s.mode, axis};
}

// The file a path names, for comparing paths: symbolic links, "." and ".."
// resolved (the file itself need not exist yet).
std::filesystem::path resolved(const std::string& path) {
  std::error_code ec;
  const std::filesystem::path absolute = std::filesystem::absolute(path);
  const std::filesystem::path p = std::filesystem::weakly_canonical(absolute, ec);
  return ec ? absolute.lexically_normal() : p;
}

bool same_file(const std::string& a, const std::string& b) {
  std::error_code ec;
  // Both exist: the same device and inode (a hard link too).
  return std::filesystem::equivalent(a, b, ec) || resolved(a) == resolved(b);
}

// Why rank 0 cannot write the outputs, or "": an output path that is a
// directory, is in no writable directory, or names the same file as an input
// (it would be overwritten) or as another output (one would be lost).
std::string output_problem(const ApplyOptions& o) {
  const std::vector<std::pair<const char*, const std::string*>> inputs = {
      {"--x", &o.x}, {"--dy", &o.dy}, {"--mask", &o.mask}, {"--scale", &o.scale}, {"--bias", &o.bias}};
  const std::vector<std::pair<const char*, const std::string*>> outputs = {
      {"--y", &o.y}, {"--dx", &o.dx}, {"--dscale", &o.dscale}, {"--dbias", &o.dbias}};
  for (size_t i = 0; i < outputs.size(); ++i) {
    const auto& [option, path] = outputs[i];
    if (path->empty()) continue;
    const std::filesystem::path target(*path);
    const std::filesystem::path dir = target.has_parent_path() ? target.parent_path() : ".";
    std::error_code ec;
    if (std::filesystem::is_directory(target, ec)) return "cannot write " + *path + ": it is a directory";
    if (!std::filesystem::is_directory(dir, ec) || ::access(dir.c_str(), W_OK) != 0)
      return "cannot write " + *path + ": " + dir.string() + " is not a writable directory";
    for (const auto& [input_option, input] : inputs)
      if (!input->empty() && same_file(*path, *input))
        return std::string(option) + " " + *path + " is the same file as the input " + input_option + " " +
               *input + ": writing it would destroy the input; choose another output path";
    for (size_t j = 0; j < i; ++j)
      if (!outputs[j].second->empty() && same_file(*path, *outputs[j].second))
        return std::string(option) + " " + *path + " and " + outputs[j].first + " " + *outputs[j].second +
               " are the same file: one output would overwrite the other; give each its own path";
  }
  return "";
}

// Rank 0 writes the outputs: find a bad output path before any work, and
// make every rank raise, so that nothing is written and nobody hangs.
void check_output_paths(const ApplyOptions& o, Communicator& comm) {
  agree_or_raise(comm, comm.rank() == 0 ? output_problem(o) : std::string(), "outputs");
}

// The layer's fields the options set, checked in the order their errors are
// reported (--axis-index-groups aside: run_apply parses it after checking the
// output paths).
GroupNormConfig layer_config(const ApplyOptions& o) {
  GroupNormConfig c;
  // Either option alone selects its mode; both is semantics §2's error.
  c.num_groups = o.group_size && !o.num_groups ? std::nullopt : std::optional<int64_t>(o.num_groups.value_or(32));
  c.group_size = o.group_size;
  // The library takes any epsilon, as Flax does; the tool refuses the
  // ones that can only give NaN (a negative one can cancel the variance).
  if (!(o.epsilon >= 0)) {
    std::ostringstream text;
    text << "--epsilon " << o.epsilon << ": must be >= 0 (and not NaN)";
    throw Error(text.str());
  }
  c.epsilon = o.epsilon;
  if (o.dtype) c.dtype = parse_dtype(*o.dtype);
  c.param_dtype = parse_dtype(o.param_dtype);
  c.use_scale = !o.no_scale;
  c.use_bias = !o.no_bias;
  c.use_fast_variance = !o.exact_variance;
  c.force_float32_reductions = !o.no_force_f32;
  if (!o.reduction_axes.empty()) c.reduction_axes = parse_int_list(o.reduction_axes, "--reduction-axes");
  return c;
}

}  // namespace

// Every piece of `text` between separators, empty ones included ("1,,2" and
// "1,2," have an empty piece), so that a stray separator is seen.
static std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> pieces{""};
  for (char ch : text) {
    if (ch == separator) pieces.emplace_back();
    else pieces.back() += ch;
  }
  return pieces;
}

std::vector<int64_t> parse_int_list(const std::string& text, const char* what) {
  std::vector<int64_t> values;
  for (const std::string& item : split(text, ',')) {
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
  for (const std::string& group : split(text, ';')) {
    if (group.empty())
      throw Error("--axis-index-groups: '" + text + "' has an empty group; write the groups of ranks " +
                  "as comma-separated lists joined by ';', e.g. \"0,1;2,3\"");
    std::vector<int> ranks;
    for (int64_t r : parse_int_list(group, "--axis-index-groups")) ranks.push_back(int(r));
    groups.push_back(ranks);
  }
  return groups;
}

void add_apply_options(CLI::App& app, ApplyOptions& o, std::string& comm_name) {
  app.add_option("--x", o.x, "input x (.npy)")->required();
  app.add_option("--y", o.y, "output y (.npy), written by rank 0; no output may name an input or another output")->required();
  app.add_option("--dy", o.dy, "upstream gradient (.npy), runs backward too");
  app.add_option("--dx", o.dx, "input gradient output (.npy)");
  app.add_option("--dscale", o.dscale, "scale gradient output (.npy), total over all ranks");
  app.add_option("--dbias", o.dbias, "bias gradient output (.npy), total over all ranks");
  app.add_option("--mask", o.mask, "validity mask (.npy, any numeric or bool dtype; nonzero = valid)");
  app.add_option("--scale", o.scale, "scale parameter (.npy of floats, shape [C]; default: ones)");
  app.add_option("--bias", o.bias, "bias parameter (.npy of floats, shape [C]; default: zeros)");
  app.add_option("--num-groups", o.num_groups, "number of groups G (default 32)");
  app.add_option("--group-size", o.group_size, "channels per group S (instead of --num-groups)");
  app.add_option("--epsilon", o.epsilon, "added to the variance, >= 0 (default 1e-6)");
  app.add_flag("--no-scale", o.no_scale, "use_scale = false");
  app.add_flag("--no-bias", o.no_bias, "use_bias = false");
  app.add_option("--dtype", o.dtype, "Flax's dtype field: f32|f64|f16|bf16 (default: inferred)");
  app.add_option("--param-dtype", o.param_dtype, "parameter dtype (default f32)");
  app.add_option("--input-dtype", o.input_dtype, "convert x (and dy) to f32|f64|f16|bf16 after loading");
  app.add_flag("--exact-variance", o.exact_variance, "use_fast_variance = false");
  app.add_flag("--no-force-f32", o.no_force_f32, "force_float32_reductions = false");
  app.add_option("--reduction-axes", o.reduction_axes, "comma-separated axes (default: all but 0)");
  app.add_option("--layout", o.layout, "nhwc (channels last, default) or nchw");
  app.add_option("--backend", o.backend, "cpu (default) or cuda");
  app.add_option("--comm", comm_name, "auto|local|mpi|nccl (default auto: mpi under mpirun)");
  app.add_flag("--ranks-axis", o.ranks_axis, "x has a leading axis of length P; rank r processes x[r]");
  app.add_option("--shard-axis", o.shard_axis, "split x along this (reduced) axis over the ranks, like numpy.array_split");
  app.add_option("--axis-index-groups", o.axis_index_groups, "rank groups sharing statistics, e.g. \"0,1;2,3\"");
}

void run_apply(const ApplyOptions& options, const std::shared_ptr<Communicator>& comm) {
  GroupNormConfig config = layer_config(options);
  const Layout layout = parse_layout(options.layout);
  const Sharding requested = requested_sharding(options.ranks_axis, options.shard_axis);
  [[maybe_unused]] const bool on_gpu = cuda_backend_requested(options.backend);  // used by the CUDA build
  const bool backward = !options.dy.empty();
  if (backward != !options.dx.empty()) throw Error("--dy and --dx go together");
  if (!backward && (!options.dscale.empty() || !options.dbias.empty()))
    throw Error("--dscale and --dbias need --dy and --dx");
  if (!options.dscale.empty() && !config.use_scale)
    throw Error("--dscale asked for but the layer has no scale (--no-scale)");
  if (!options.dbias.empty() && !config.use_bias)
    throw Error("--dbias asked for but the layer has no bias (--no-bias)");
  const int rank = comm->rank(), ranks = comm->size();
  check_output_paths(options, *comm);

  if (!options.axis_index_groups.empty()) config.axis_index_groups = parse_groups(options.axis_index_groups);

  // Load the inputs first (dy once x is sharded, so that the whole x and dy
  // are never in memory together): a bad file fails before any work, on
  // every rank, also when only one rank runs out of memory.
  HostArray x_all, scale, bias;
  io::NpyArray mask_file;
  on_every_rank(*comm, "inputs", [&] {
    x_all = load(options.x, options.input_dtype);
    if (!options.mask.empty()) mask_file = io::read_npy(options.mask);
    if (!options.scale.empty()) scale = load_parameter(options.scale, "--scale");
    if (!options.bias.empty()) bias = load_parameter(options.bias, "--bias");
  });
  if (!options.scale.empty() && !config.use_scale) throw Error("--scale given with --no-scale");
  if (!options.bias.empty() && !config.use_bias) throw Error("--bias given with --no-bias");

  Shape local_template = x_all.shape;
  if (requested.mode == Sharding::Mode::ranks_axis) {
    if (x_all.shape.empty() || x_all.shape[0] != ranks)
      throw Error("--ranks-axis: x of shape " + shape_string(x_all.shape) +
                  " must have a leading axis of length " + std::to_string(ranks) +
                  " (the number of ranks)");
    local_template.erase(local_template.begin());
  }
  GroupNorm layer(config, comm);
  // Validate the whole configuration on the unsharded shape first, so every
  // rank reports semantics §2's message the same way whatever its shard.
  const Plan whole_plan = layer.plan(local_template, layout, x_all.dtype);
  const Sharding sharding = checked_sharding(requested, whole_plan);

  // The whole arrays move into this rank's parts: one rank runs on the
  // loaded bytes themselves.
  const Shape whole_shape = x_all.shape;
  HostArray x, dy;
  on_every_rank(*comm, "shards", [&] {
    x = shard(std::move(x_all), sharding, whole_shape, rank, ranks, "x");
    if (!backward) return;
    HostArray dy_all = load(options.dy, options.input_dtype);
    if (dy_all.shape != whole_shape)
      throw Error("dy has shape " + shape_string(dy_all.shape) + " but x has shape " + shape_string(whole_shape));
    dy = shard(std::move(dy_all), sharding, whole_shape, rank, ranks, "dy");
  });
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
    const HostArray part = shard(std::move(as_float), sharding, whole_shape, rank, ranks, "mask");
    mask_bytes.resize(part.bytes.size() / sizeof(float));
    for (size_t i = 0; i < mask_bytes.size(); ++i) {
      float v;
      std::memcpy(&v, part.bytes.data() + i * sizeof(float), sizeof v);
      mask_bytes[i] = v != 0.0f;
    }
    mask = {mask_bytes.data(), part.shape, Device::cpu};
  }

  const Plan plan = layer.plan(x.shape, layout, x.dtype);
  layer.init_parameters(plan.channels);
  if (!options.scale.empty()) layer.set_scale(scale.view(Layout::channels_last));
  if (!options.bias.empty()) layer.set_bias(bias.view(Layout::channels_last));

  HostArray y{x.shape, plan.output_dtype, {}}, dx{x.shape, x.dtype, {}};
  on_every_rank(*comm, "outputs", [&] {
    y.bytes = allocate(byte_size(x.shape, y.dtype), "y " + shape_string(x.shape));
    if (backward) dx.bytes = allocate(int64_t(x.bytes.size()), "dx " + shape_string(x.shape));
  });
  ForwardState state;
  const MaskView* mask_ptr = options.mask.empty() ? nullptr : &mask;
  TensorView x_view = x.view(layout), y_view = y.view(layout);
#if DISTGN_WITH_CUDA
  // --backend cuda: the same calls on device copies, one GPU per rank (round
  // robin); the mask stays in host memory (the layer copies it over).
  cuda::DeviceArray x_dev, y_dev, dy_dev, dx_dev;
  if (on_gpu) {
    cuda::use_device_of_rank(rank);
    x_view = device_view(x, layout, x_dev, true);
    y_view = device_view(y, layout, y_dev, false);
  }
#endif
  const auto layer_call = [&](const std::function<void()>& call) {
    try {
      call();
    } catch (const std::bad_alloc&) {
      // The layer's own memory: per-cell statistics, whatever x's size, at
      // least the count, mean and M2 of each cell.
      throw Error("out of memory: the layer's statistics for the " + std::to_string(plan.num_cells) +
                  " cells of x " + shape_string(x.shape) + " need at least " +
                  byte_count(plan.num_cells * 3 * int64_t(sizeof(double))) +
                  "; free memory, or use fewer groups or fewer non-reduced axes");
    }
  };
  layer_call([&] { layer.forward(x_view, y_view, mask_ptr, &state); });
#if DISTGN_WITH_CUDA
  if (on_gpu) y_dev.download(y.bytes.data(), y.bytes.size());
#endif

  HostArray dscale, dbias;
  if (backward) {
    const Shape c{plan.channels};
    const size_t param_bytes = size_t(plan.channels * dtype_size(config.param_dtype));
    dscale = {c, config.param_dtype, std::vector<uint8_t>(param_bytes)};
    dbias = {c, config.param_dtype, std::vector<uint8_t>(param_bytes)};
    TensorView dscale_view = dscale.view(Layout::channels_last);
    TensorView dbias_view = dbias.view(Layout::channels_last);
    TensorView dy_view = dy.view(layout), dx_view = dx.view(layout);
#if DISTGN_WITH_CUDA
    if (on_gpu) {
      dy_view = device_view(dy, layout, dy_dev, true);
      dx_view = device_view(dx, layout, dx_dev, false);
    }
#endif
    layer_call([&] {
      layer.backward(x_view, dy_view, mask_ptr, state, dx_view, config.use_scale ? &dscale_view : nullptr,
                     config.use_bias ? &dbias_view : nullptr, ParamGradReduction::all);
    });
#if DISTGN_WITH_CUDA
    if (on_gpu) dx_dev.download(dx.bytes.data(), dx.bytes.size());
#endif
  }

  // Join the shards (collective), then rank 0 writes. The inputs go first, to
  // make room for the whole outputs.
  x = HostArray{};
  dy = HostArray{};
  HostArray y_all, dx_all;
  on_every_rank(*comm, "gather", [&] {
    y_all = unshard(*comm, std::move(y), sharding, whole_shape);
    if (backward) dx_all = unshard(*comm, std::move(dx), sharding, whole_shape);
  });
  if (rank != 0) return;
  save(options.y, y_all);
  if (backward) {
    save(options.dx, dx_all);
    if (!options.dscale.empty()) save(options.dscale, dscale);
    if (!options.dbias.empty()) save(options.dbias, dbias);
  }
}

}  // namespace distgn::cli
