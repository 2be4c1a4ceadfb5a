// The CUDA backend against the CPU backend, on a GPU (tests/cuda/cuda_main.cpp
// skips the run without one):
//  [backend] device conversions against core/half.hpp; a matrix of shapes,
//            layouts, dtypes, masks, reduction axes and pointer alignments
//            through the layer (forward statistics and outputs, backward);
//            determinism; the Backend interface itself.
//  [golden]  every Flax golden case, device tensors against host tensors.
//  [large]   tensors beyond 2^31 elements, both layouts.
//  [nccl]    the NCCL communicator with one rank.
#include <cuda_runtime_api.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

#include "core/backend.hpp"
#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"
#include "distgn/device.hpp"
#include "cuda/index_maps.hpp"
#include "cuda/launch.hpp"
#include "distgn/error.hpp"
#include "distgn/group_norm.hpp"
#include "golden.hpp"
#include "test_arrays.hpp"
#if DISTGN_WITH_NCCL
#include <nccl.h>
#endif

using namespace distgn;
using distgn_test::Array;
using distgn_test::Comparison;
using distgn_test::compare;
using distgn_test::max_abs;
using distgn_test::narrower;
using distgn_test::random_mask_one_in;

namespace {

#define CUDA_OK(expr) REQUIRE((expr) == cudaSuccess)

// A device copy of a host array, `offset` bytes into its allocation (to
// test misaligned pointers).
struct DeviceCopy {
  cuda::DeviceArray memory;
  void* data = nullptr;
  size_t bytes = 0;
};

DeviceCopy to_device(const void* host, size_t bytes, size_t offset = 0) {
  DeviceCopy d{cuda::DeviceArray(bytes + offset + 16), nullptr, bytes};
  d.data = static_cast<uint8_t*>(d.memory.data()) + offset;
  if (bytes) CUDA_OK(cudaMemcpy(d.data, host, bytes, cudaMemcpyHostToDevice));
  return d;
}

void from_device(void* host, const DeviceCopy& d) {
  if (d.bytes) CUDA_OK(cudaMemcpy(host, d.data, d.bytes, cudaMemcpyDeviceToHost));
}

// Normal(mean, spread) data (test_arrays.hpp's random values) plus a ramp of
// period 17, rounded to `dtype`.
Array ramped_random_array(const Shape& shape, DType dtype, uint64_t seed, double mean, double spread) {
  const std::vector<double> v = distgn_test::random_values(element_count(shape), seed, mean, spread);
  Array a(shape, dtype);
  for (int64_t i = 0; i < a.size(); ++i) a.set(i, v[size_t(i)] + 0.01 * double(i % 17));
  return a;
}

// How a GPU run differs from the CPU run of the same case.
struct GpuOptions {
  size_t misalign = 0;         // bytes added to the x, dy, y and dx pointers
  bool mask_on_device = true;  // else the mask stays in host memory
  bool grads_on_device = true;  // dscale/dbias in device memory
  cudaStream_t stream = nullptr;
};

struct Inputs {
  GroupNormConfig config;
  Layout layout = Layout::channels_last;
  Array x, dy;
  std::vector<uint8_t> mask;
  Shape mask_shape;
  bool has_mask = false;
  std::vector<double> scale, bias;  // empty: the initializers'
};

struct Outputs {
  std::map<std::string, std::vector<double>> values;
  ForwardState state;
  std::vector<uint8_t> y_bytes, dx_bytes;
};

Outputs run_layer(const Inputs& in, bool gpu, const GpuOptions& options = {}) {
  GroupNorm layer(in.config);
  const Plan plan = layer.plan(in.x.shape, in.layout, in.x.dtype);
  layer.init_parameters(plan.channels);
  const DType pd = in.config.param_dtype;
  if (!in.scale.empty()) {
    Array s({plan.channels}, pd);
    for (int64_t c = 0; c < plan.channels; ++c) s.set(c, in.scale[size_t(c)]);
    layer.set_scale(s.view());
  }
  if (!in.bias.empty()) {
    Array b({plan.channels}, pd);
    for (int64_t c = 0; c < plan.channels; ++c) b.set(c, in.bias[size_t(c)]);
    layer.set_bias(b.view());
  }
  Array y(in.x.shape, plan.output_dtype), dx(in.x.shape, in.x.dtype);
  Array dscale({plan.channels}, pd), dbias({plan.channels}, pd);
  Outputs out;
  MaskView mask{in.mask.data(), in.mask_shape, Device::cpu};
  if (!gpu) {
    layer.forward(in.x.view(in.layout), y.view(in.layout), in.has_mask ? &mask : nullptr, &out.state);
    TensorView ds = dscale.view(Layout::channels_last), db = dbias.view(Layout::channels_last);
    layer.backward(in.x.view(in.layout), in.dy.view(in.layout), in.has_mask ? &mask : nullptr, out.state,
                   dx.view(in.layout), in.config.use_scale ? &ds : nullptr, in.config.use_bias ? &db : nullptr);
  } else {
    layer.set_stream(options.stream);
    const size_t off = options.misalign;
    DeviceCopy xd = to_device(in.x.bytes.data(), in.x.bytes.size(), off);
    DeviceCopy dyd = to_device(in.dy.bytes.data(), in.dy.bytes.size(), off);
    DeviceCopy yd = to_device(y.bytes.data(), y.bytes.size(), off);
    DeviceCopy dxd = to_device(dx.bytes.data(), dx.bytes.size(), off);
    DeviceCopy maskd = to_device(in.mask.data(), in.mask.size());
    DeviceCopy dsd = to_device(dscale.bytes.data(), dscale.bytes.size());
    DeviceCopy dbd = to_device(dbias.bytes.data(), dbias.bytes.size());
    if (options.mask_on_device) mask = {static_cast<const uint8_t*>(maskd.data), in.mask_shape, Device::cuda};
    const TensorView xv{xd.data, in.x.shape, in.x.dtype, in.layout, Device::cuda};
    const TensorView dyv{dyd.data, in.x.shape, in.dy.dtype, in.layout, Device::cuda};
    const TensorView yv{yd.data, in.x.shape, plan.output_dtype, in.layout, Device::cuda};
    const TensorView dxv{dxd.data, in.x.shape, in.x.dtype, in.layout, Device::cuda};
    layer.forward(xv, yv, in.has_mask ? &mask : nullptr, &out.state);
    TensorView ds = dscale.view(Layout::channels_last), db = dbias.view(Layout::channels_last);
    if (options.grads_on_device) {
      ds = {dsd.data, {plan.channels}, pd, Layout::channels_last, Device::cuda};
      db = {dbd.data, {plan.channels}, pd, Layout::channels_last, Device::cuda};
    }
    layer.backward(xv, dyv, in.has_mask ? &mask : nullptr, out.state, dxv, in.config.use_scale ? &ds : nullptr,
                   in.config.use_bias ? &db : nullptr);
    CUDA_OK(cudaStreamSynchronize(options.stream));
    from_device(y.bytes.data(), yd);
    from_device(dx.bytes.data(), dxd);
    if (options.grads_on_device) {
      from_device(dscale.bytes.data(), dsd);
      from_device(dbias.bytes.data(), dbd);
    }
  }
  out.values["y"] = y.values();
  out.values["dx"] = dx.values();
  if (in.config.use_scale) out.values["dscale"] = dscale.values();
  if (in.config.use_bias) out.values["dbias"] = dbias.values();
  out.y_bytes = y.bytes;
  out.dx_bytes = dx.bytes;
  return out;
}

// GPU against CPU: outputs within SPEC §8's tolerances at the operands'
// scale (both sides round to the same dtypes, in different orders), the
// statistics within a few float32 ulps.
void compare_runs(const Inputs& in, const Outputs& gpu, const Outputs& cpu) {
  const Plan plan = resolve(in.config, in.x.shape, in.layout, in.x.dtype);
  const bool half_stats = dtype_size(plan.stats_dtype) == 2;
  for (const auto& [key, want] : cpu.values) {
    const std::vector<double>& got = gpu.values.at(key);
    REQUIRE(got.size() == want.size());
    const DType dtype = key == "y" ? plan.output_dtype : key == "dx" ? plan.input_dtype : in.config.param_dtype;
    const DType narrowest = narrower(dtype, plan.stats_dtype);
    const double floor = key == "y" ? 1.0 : std::max(1.0, max_abs(want));
    const double ulps = dtype_size(narrowest) == 2 || half_stats ? 2.0 : 1.0;
    const Comparison c = compare(got, want, narrowest, floor, ulps);
    INFO(key << ": " << c.mismatches << " mismatches, worst error " << c.worst_error << ", first at " << c.first_bad
              << (c.first_bad >= 0 ? " (gpu " + std::to_string(got[size_t(c.first_bad)]) + ", cpu " +
                                         std::to_string(want[size_t(c.first_bad)]) + ")"
                                   : std::string()));
    CHECK(c.mismatches == 0);
  }
  REQUIRE(gpu.state.mean().size() == cpu.state.mean().size());
  for (size_t i = 0; i < cpu.state.mean().size(); ++i) {
    INFO("cell " << i);
    const double m = cpu.state.mean()[i], r = cpu.state.rstd()[i];
    if (std::isnan(m)) CHECK(std::isnan(gpu.state.mean()[i]));
    else CHECK(gpu.state.mean()[i] == Approx(m).epsilon(1e-5).margin(1e-6 * std::max(1.0, 1.0 / r)));
    if (std::isnan(r)) CHECK(std::isnan(gpu.state.rstd()[i]));
    else CHECK(gpu.state.rstd()[i] == Approx(r).epsilon(half_stats ? 2e-2 : 2e-5));
    CHECK(gpu.state.count()[i] == cpu.state.count()[i]);
  }
}

struct MatrixCase {
  std::string name;
  Shape shape;
  Layout layout = Layout::channels_last;
  DType x = DType::f32;
  DType param = DType::f32;
  int64_t groups = 32;
  std::optional<DType> dtype;  // Flax's dtype field
  std::optional<DType> dy;     // dy's dtype when not x's
  std::optional<std::vector<int64_t>> axes;
  std::string mask;  // "", "full", "broadcast", "nan"
  bool exact = false;
  double mean = 0.5;
  size_t misalign = 0;
  bool affine = true;
};

MatrixCase make_case(std::string name, Shape shape, Layout layout = Layout::channels_last, DType x = DType::f32,
                     DType param = DType::f32, int64_t groups = 32) {
  MatrixCase c;
  c.name = std::move(name);
  c.shape = std::move(shape);
  c.layout = layout;
  c.x = x;
  c.param = param;
  c.groups = groups;
  return c;
}

Inputs make_inputs(const MatrixCase& m, uint64_t seed) {
  Inputs in;
  in.config.num_groups = m.groups;
  in.config.param_dtype = m.param;
  in.config.dtype = m.dtype;
  in.config.reduction_axes = m.axes;
  in.config.use_fast_variance = !m.exact;
  in.config.use_scale = in.config.use_bias = m.affine;
  in.layout = m.layout;
  in.x = ramped_random_array(m.shape, m.x, seed, m.mean, 1.0);
  in.dy = ramped_random_array(m.shape, m.dy.value_or(m.x), seed + 1, 0.0, 1.0);
  const int feature = m.layout == Layout::channels_last ? int(m.shape.size()) - 1 : 1;
  const int64_t channels = m.shape[size_t(feature)];
  if (m.affine) {
    for (int64_t c = 0; c < channels; ++c) {
      in.scale.push_back(0.5 + 0.01 * double(c % 23));
      in.bias.push_back(-0.25 + 0.02 * double(c % 11));
    }
  }
  std::mt19937_64 rng(seed + 2);
  if (m.mask == "full" || m.mask == "nan") {
    in.mask_shape = m.shape;
    in.mask = random_mask_one_in(element_count(m.shape), rng, 5);
    if (m.mask == "nan")  // NaN data at masked positions must not leak into the statistics
      for (size_t i = 0; i < in.mask.size(); ++i)
        if (!in.mask[i]) in.x.set(int64_t(i), std::nan(""));
  } else if (m.mask == "broadcast") {
    in.mask_shape = m.shape;
    in.mask_shape[0] = 1;  // (1, ..., C): the same mask for every sample
    in.mask = random_mask_one_in(element_count(in.mask_shape), rng, 4, 7);  // any nonzero is valid
  }
  in.has_mask = !m.mask.empty();
  return in;
}

const std::vector<MatrixCase>& matrix() {
  static const std::vector<MatrixCase> cases = [] {
    std::vector<MatrixCase> v;
    auto add = [&](MatrixCase c) { v.push_back(std::move(c)); };
    add(make_case("nhwc_bf16", {2, 16, 16, 320}, Layout::channels_last, DType::bf16, DType::bf16));
    add(make_case("nhwc_f16_f32_params", {2, 8, 8, 640}, Layout::channels_last, DType::f16, DType::f32));
    add(make_case("nhwc_f32", {2, 8, 8, 128}));
    add(make_case("nhwc_f64", {2, 4, 4, 64}, Layout::channels_last, DType::f64, DType::f64));
    add(make_case("nchw_f32", {2, 64, 16, 16}, Layout::channels_first));
    add(make_case("nchw_bf16_7x7", {2, 64, 7, 7}, Layout::channels_first, DType::bf16, DType::bf16));
    add(make_case("nchw_long_segments", {1, 8, 256, 256}, Layout::channels_first, DType::f32, DType::f32, 4));
    {
      MatrixCase c = make_case("nhwc_mask_broadcast", {2, 8, 8, 64});
      c.mask = "broadcast";
      add(c);
    }
    {
      MatrixCase c = make_case("nhwc_mask_nan_bf16", {2, 8, 8, 64}, Layout::channels_last, DType::bf16, DType::bf16);
      c.mask = "nan";
      add(c);
    }
    {
      MatrixCase c = make_case("nchw_mask_full", {2, 64, 5, 5}, Layout::channels_first);
      c.mask = "full";
      add(c);
    }
    {
      MatrixCase c = make_case("permuted_5d", {2, 3, 4, 5, 64});
      c.axes = std::vector<int64_t>{1, 3, 4};
      c.groups = 8;
      add(c);
    }
    {
      MatrixCase c = make_case("permuted_masked_nchw", {2, 16, 3, 4}, Layout::channels_first);
      c.axes = std::vector<int64_t>{1, 2};
      c.groups = 4;
      c.mask = "full";
      add(c);
    }
    {
      MatrixCase c = make_case("rows_reduce_h_and_c", {2, 6, 5, 64});
      c.axes = std::vector<int64_t>{1, 3};
      c.groups = 8;
      add(c);
    }
    add(make_case("f32_x_f64_params", {2, 8, 8, 64}, Layout::channels_last, DType::f32, DType::f64));
    {
      MatrixCase c = make_case("bf16_x_f16_dy", {2, 8, 8, 64}, Layout::channels_last, DType::bf16, DType::bf16);
      c.dy = DType::f16;
      add(c);
    }
    {
      MatrixCase c = make_case("f32_x_f16_out", {2, 8, 8, 64});
      c.dtype = DType::f16;
      add(c);
    }
    {
      MatrixCase c = make_case("bf16_misaligned", {2, 8, 8, 64}, Layout::channels_last, DType::bf16, DType::bf16);
      c.misalign = 2;
      add(c);
    }
    {
      MatrixCase c = make_case("nchw_misaligned", {2, 32, 9, 9}, Layout::channels_first, DType::f16, DType::f16);
      c.misalign = 2;
      add(c);
    }
    add(make_case("odd_channels", {2, 5, 5, 6}, Layout::channels_last, DType::f32, DType::f32, 3));
    {
      MatrixCase c = make_case("large_mean_exact", {2, 8, 8, 64});
      c.exact = true;
      c.mean = 1e4;
      add(c);
    }
    {
      MatrixCase c = make_case("large_mean_fast", {2, 8, 8, 64});
      c.mean = 1e3;
      add(c);
    }
    add(make_case("empty_shard", {2, 0, 4, 64}));
    add(make_case("wide_rows_bf16", {2, 4, 4, 4096}, Layout::channels_last, DType::bf16, DType::bf16, 4));
    add(make_case("wide_rows_straddling", {2, 4, 4, 2400}, Layout::channels_last, DType::f32, DType::f32, 16));
    {
      MatrixCase c = make_case("no_affine_bf16", {2, 8, 8, 64}, Layout::channels_last, DType::bf16, DType::bf16);
      c.affine = false;
      add(c);
    }
    add(make_case("one_group", {2, 8, 8, 256}, Layout::channels_last, DType::f32, DType::f32, 1));
    add(make_case("instance_norm_nchw", {2, 32, 8, 8}, Layout::channels_first, DType::f32, DType::f32, 32));
    add(make_case("per_pixel_groups", {2, 4, 4, 64}, Layout::channels_last, DType::f32, DType::f32, 8));
    v.back().axes = std::vector<int64_t>{3};
    // Larger than half of an H100's L2: the one-rank flow runs in waves.
    add(make_case("waves_f32", {8, 64, 64, 320}));
    add(make_case("waves_nchw_bf16", {8, 320, 64, 64}, Layout::channels_first, DType::bf16, DType::bf16));
    return v;
  }();
  return cases;
}

}  // namespace

TEST_CASE("cuda: device dtype conversions agree with core/half.hpp", "[backend]") {
  cuda::StreamHandle stream;
  // Every float16 and bfloat16 bit pattern to float.
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = uint16_t(i);
  DeviceCopy in = to_device(all.data(), all.size() * 2);
  cuda::DeviceArray out(all.size() * 4);
  std::vector<float> got(all.size());
  for (DType t : {DType::f16, DType::bf16}) {
    cuda::convert_halves_to_float(stream.get(), static_cast<const uint16_t*>(in.data), int64_t(all.size()), t,
                                  static_cast<float*>(out.data()));
    stream.synchronize();
    out.download(got.data(), got.size() * 4);
    int64_t bad = 0;
    for (size_t i = 0; i < all.size(); ++i) {
      const float want = t == DType::f16 ? to_float(half_t{all[i]}) : to_float(bfloat16_t{all[i]});
      const bool same = std::isnan(want) ? std::isnan(got[i]) : float_bits(want) == float_bits(got[i]);
      bad += same ? 0 : 1;
    }
    INFO(dtype_name(t) << " to float");
    CHECK(bad == 0);
  }
  // Floats to float16 and bfloat16: edge values and random bit patterns.
  std::vector<float> floats = {0.0f, -0.0f, 1.0f, 65504.0f, 65519.0f, 65520.0f, 1e-8f, 5.96e-8f, 2.98e-8f,
                               6.1e-5f, 1e30f, -1e30f, 3.3895314e38f, 1.0f / 3.0f};
  std::mt19937 rng(5);
  while (floats.size() < (1u << 20)) floats.push_back(bits_float(uint32_t(rng())));
  DeviceCopy fin = to_device(floats.data(), floats.size() * 4);
  cuda::DeviceArray bits(floats.size() * 2);
  std::vector<uint16_t> got_bits(floats.size());
  for (DType t : {DType::f16, DType::bf16}) {
    cuda::convert_floats_to_half(stream.get(), static_cast<const float*>(fin.data), int64_t(floats.size()), t,
                                 static_cast<uint16_t*>(bits.data()));
    stream.synchronize();
    bits.download(got_bits.data(), got_bits.size() * 2);
    int64_t bad = 0;
    for (size_t i = 0; i < floats.size(); ++i) {
      const uint16_t want = t == DType::f16 ? to_half(floats[i]).bits : to_bfloat16(floats[i]).bits;
      const bool nan = std::isnan(floats[i]);
      const bool same = nan ? (t == DType::f16 ? std::isnan(to_float(half_t{got_bits[i]}))
                                               : std::isnan(to_float(bfloat16_t{got_bits[i]})))
                            : want == got_bits[i];
      bad += same ? 0 : 1;
    }
    INFO("float to " << dtype_name(t));
    CHECK(bad == 0);
  }
}

TEST_CASE("cuda: the layer on device tensors matches the CPU backend", "[backend]") {
  cuda::StreamHandle stream;
  uint64_t seed = 100;
  for (const MatrixCase& m : matrix()) {
    DYNAMIC_SECTION(m.name) {
      const Inputs in = make_inputs(m, seed++);
      const Outputs cpu = run_layer(in, false);
      GpuOptions options;
      options.stream = stream.get();
      options.misalign = m.misalign;
      options.grads_on_device = seed % 2 == 0;
      options.mask_on_device = seed % 3 != 0;
      const Outputs gpu = run_layer(in, true, options);
      compare_runs(in, gpu, cpu);
    }
  }
}

TEST_CASE("cuda: results are the same bits every run, and on the default stream", "[backend]") {
  for (const char* name : {"nhwc_bf16", "nchw_f32", "nhwc_mask_nan_bf16", "wide_rows_straddling"}) {
    DYNAMIC_SECTION(name) {
      const MatrixCase* m = nullptr;
      for (const MatrixCase& c : matrix())
        if (c.name == name) m = &c;
      REQUIRE(m);
      const Inputs in = make_inputs(*m, 7);
      cuda::StreamHandle stream;
      GpuOptions options;
      options.stream = stream.get();
      const Outputs a = run_layer(in, true, options);
      const Outputs b = run_layer(in, true, options);
      options.stream = nullptr;  // the legacy default stream
      const Outputs c = run_layer(in, true, options);
      CHECK(a.y_bytes == b.y_bytes);
      CHECK(a.y_bytes == c.y_bytes);
      CHECK(a.dx_bytes == b.dx_bytes);
      CHECK(a.dx_bytes == c.dx_bytes);
      CHECK(a.state.rstd() == b.state.rstd());
      CHECK(a.state.rstd() == c.state.rstd());
    }
  }
}

// Not a check: the output bytes of every matrix case (the layer's outputs
// and statistics, and the Backend's unfused steps: moments, sums, terms and
// dx from them) written to $DISTGN_BITS_OUT, so that a refactoring of the
// kernels can be shown to keep every bit (run it before and after, compare
// the files with cmp). Hidden: run it by name, `[.bits]`.
TEST_CASE("cuda: output bytes of every matrix case, for before/after comparisons", "[.bits]") {
  const char* path = std::getenv("DISTGN_BITS_OUT");
  if (!path) {
    WARN("set DISTGN_BITS_OUT to the file to write");
    return;
  }
  std::FILE* out = std::fopen(path, "wb");
  REQUIRE(out);
  auto record = [&](const std::string& name, const std::string& key, const void* data, size_t bytes) {
    std::fprintf(out, "%s %s %zu\n", name.c_str(), key.c_str(), bytes);
    if (bytes) std::fwrite(data, 1, bytes, out);
    std::fputc('\n', out);
  };
  auto doubles = [&](const std::string& name, const std::string& key, const std::vector<double>& v) {
    record(name, key, v.data(), v.size() * sizeof(double));
  };
  cuda::StreamHandle stream;
  uint64_t seed = 100;
  for (const MatrixCase& m : matrix()) {
    const Inputs in = make_inputs(m, seed++);
    GpuOptions options;
    options.stream = stream.get();
    options.misalign = m.misalign;
    const Outputs gpu = run_layer(in, true, options);
    record(m.name, "y", gpu.y_bytes.data(), gpu.y_bytes.size());
    record(m.name, "dx", gpu.dx_bytes.data(), gpu.dx_bytes.size());
    for (const char* key : {"dscale", "dbias"})
      if (gpu.values.count(key)) doubles(m.name, key, gpu.values.at(key));
    doubles(m.name, "mean", gpu.state.mean());
    doubles(m.name, "rstd", gpu.state.rstd());
    doubles(m.name, "count", gpu.state.count());

    // The steps a group of several ranks runs, on the whole tensor.
    const KernelPlan plan = resolve_kernel_plan(in.config, in.x.shape, in.layout, in.x.dtype);
    const int64_t cells = plan.num_cells, C = plan.channels;
    const MaskView mask{in.mask.data(), in.mask_shape};
    auto backend = make_cuda_backend(stream.get());
    DeviceCopy xd = to_device(in.x.bytes.data(), in.x.bytes.size());
    DeviceCopy dyd = to_device(in.dy.bytes.data(), in.dy.bytes.size());
    backend->set_parameters(plan, in.scale.empty() ? nullptr : in.scale.data(),
                            in.bias.empty() ? nullptr : in.bias.data());
    const KernelInputs dev_in = backend->inputs(plan, xd.data, in.has_mask ? &mask : nullptr, dyd.data, in.dy.dtype);
    const CellRange all{0, cells};
    std::vector<CellMoments> moments(static_cast<size_t>(cells));
    backend->partial_stats(dev_in, all, moments.data());
    record(m.name, "moments", moments.data(), moments.size() * sizeof(CellMoments));
    HostCellStatistics finalized;
    finalized.resize(cells);
    for (int64_t c = 0; c < cells; ++c) {
      const CellStats s = finalize_moments(moments[size_t(c)], 1e-6, true, plan.stats_dtype);
      finalized.mean[size_t(c)] = s.mean;
      finalized.rstd[size_t(c)] = s.rstd;
      finalized.count[size_t(c)] = moments[size_t(c)].count;
      finalized.variance_clamped[size_t(c)] = s.variance_clamped;
    }
    const auto stats = backend->cell_statistics(nullptr, cells);
    backend->store_statistics(all, finalized, *stats);
    std::vector<double> sums(static_cast<size_t>(2 * cells)), channel_sums(size_t(2 * C), 0.0);
    backend->backward_sums(dev_in, all, *stats, sums.data(), channel_sums.data());
    doubles(m.name, "cell_sums", sums);
    doubles(m.name, "channel_sums", channel_sums);
    backend->store_terms(all, sums.data(), *stats);
    Array dx(plan.shape, plan.input_dtype);
    DeviceCopy dxd = to_device(dx.bytes.data(), dx.bytes.size());
    backend->input_grad(dev_in, all, *stats, dxd.data);
    CUDA_OK(cudaStreamSynchronize(stream.get()));
    from_device(dx.bytes.data(), dxd);
    record(m.name, "dx_unfused", dx.bytes.data(), dx.bytes.size());
  }
  REQUIRE(std::fclose(out) == 0);
}

TEST_CASE("cuda: one layer, many calls: shapes change, parameters change, no stale state", "[backend]") {
  cuda::StreamHandle stream;
  GpuOptions options;
  options.stream = stream.get();
  // The same inputs through one GPU layer twice, with a different shape in
  // between and new parameters: each call must equal a fresh CPU run.
  const MatrixCase small = make_case("nhwc_f32", {2, 8, 8, 128});
  const MatrixCase other = make_case("nchw_f32", {2, 128, 4, 4}, Layout::channels_first);
  for (int round = 0; round < 2; ++round) {
    Inputs a = make_inputs(small, 1), b = make_inputs(other, 2);
    for (double& s : a.scale) s += round;
    compare_runs(a, run_layer(a, true, options), run_layer(a, false));
    compare_runs(b, run_layer(b, true, options), run_layer(b, false));
  }
}

// The layer's flow runs the same steps on either backend (core/backend.hpp):
// each step of the CUDA backend against the CPU backend's, from the same
// host payloads, and the two fused steps only the CUDA backend offers.
TEST_CASE("cuda: each step of the CUDA backend agrees with the CPU backend's", "[backend]") {
  for (const char* name : {"nhwc_bf16", "nchw_bf16_7x7", "nhwc_mask_broadcast", "odd_channels"}) {
    DYNAMIC_SECTION(name) {
      const MatrixCase* m = nullptr;
      for (const MatrixCase& c : matrix())
        if (c.name == name) m = &c;
      REQUIRE(m);
      Inputs in = make_inputs(*m, 3);
      const KernelPlan plan = resolve_kernel_plan(in.config, in.x.shape, in.layout, in.x.dtype);
      REQUIRE(!plan.permuted);
      const int64_t cells = plan.num_cells, C = plan.channels;
      const MaskView mask{in.mask.data(), in.mask_shape};  // host memory: both backends take it there
      const MaskView* mask_ptr = in.has_mask ? &mask : nullptr;
      const double* scale = in.scale.empty() ? nullptr : in.scale.data();
      const double* bias = in.bias.empty() ? nullptr : in.bias.data();
      auto cpu = make_cpu_backend();
      auto gpu = make_cuda_backend(nullptr);
      REQUIRE(!cpu->finalizes_statistics());
      REQUIRE(gpu->finalizes_statistics());
      REQUIRE(gpu->finalizes_terms());
      DeviceCopy xd = to_device(in.x.bytes.data(), in.x.bytes.size());
      DeviceCopy dyd = to_device(in.dy.bytes.data(), in.dy.bytes.size());
      cpu->set_parameters(plan, scale, bias);
      gpu->set_parameters(plan, scale, bias);
      const KernelInputs host_in = cpu->inputs(plan, in.x.bytes.data(), mask_ptr, in.dy.bytes.data(), in.dy.dtype);
      const KernelInputs dev_in = gpu->inputs(plan, xd.data, mask_ptr, dyd.data, in.dy.dtype);
      const CellRange all{0, cells};

      std::vector<CellMoments> want(static_cast<size_t>(cells)), got(static_cast<size_t>(cells));
      cpu->partial_stats(host_in, all, want.data());
      gpu->partial_stats(dev_in, all, got.data());
      const FinalizeParams finalize{1e-6, true, plan.stats_dtype};
      HostCellStatistics finalized;
      finalized.resize(cells);
      for (int64_t c = 0; c < cells; ++c) {
        CHECK(got[size_t(c)].count == want[size_t(c)].count);
        // float32 differences, float32 sums of a few elements (then double): float32-accurate.
        CHECK(got[size_t(c)].mean == Approx(want[size_t(c)].mean).epsilon(1e-6).margin(1e-6));
        CHECK(got[size_t(c)].m2 == Approx(want[size_t(c)].m2).epsilon(1e-6).margin(1e-6));
        const CellStats s = finalize_moments(want[size_t(c)], finalize.epsilon, true, plan.stats_dtype);
        finalized.mean[size_t(c)] = s.mean;
        finalized.rstd[size_t(c)] = s.rstd;
        finalized.count[size_t(c)] = want[size_t(c)].count;
        finalized.variance_clamped[size_t(c)] = s.variance_clamped;
      }
      // Stored host statistics come back unchanged.
      const auto cpu_stats = cpu->cell_statistics(nullptr, cells), gpu_stats = gpu->cell_statistics(nullptr, cells);
      cpu->store_statistics(all, finalized, *cpu_stats);
      gpu->store_statistics(all, finalized, *gpu_stats);
      CHECK(gpu_stats->device() == Device::cuda);
      CHECK(gpu_stats->host().mean == finalized.mean);
      CHECK(gpu_stats->host().rstd == finalized.rstd);
      CHECK(gpu_stats->host().count == finalized.count);
      CHECK(gpu_stats->host().variance_clamped == finalized.variance_clamped);
      // The fused step: the same statistics, finalised on the device.
      const auto fused_stats = gpu->cell_statistics(nullptr, cells);
      gpu->finalized_statistics(dev_in, all, finalize, *fused_stats);
      for (int64_t c = 0; c < cells; ++c) {
        CHECK(fused_stats->host().count[size_t(c)] == finalized.count[size_t(c)]);
        CHECK(fused_stats->host().mean[size_t(c)] == Approx(finalized.mean[size_t(c)]).epsilon(1e-6).margin(1e-6));
        CHECK(fused_stats->host().rstd[size_t(c)] == Approx(finalized.rstd[size_t(c)]).epsilon(1e-5));
      }

      Array y_cpu(plan.shape, plan.output_dtype), y_gpu = y_cpu;
      cpu->normalize(host_in, all, *cpu_stats, y_cpu.bytes.data(), plan.output_dtype);
      DeviceCopy yd = to_device(y_gpu.bytes.data(), y_gpu.bytes.size());
      gpu->normalize(dev_in, all, *gpu_stats, yd.data, plan.output_dtype);
      CUDA_OK(cudaStreamSynchronize(nullptr));
      from_device(y_gpu.bytes.data(), yd);
      const auto y_cmp =
          compare(y_gpu.values(), y_cpu.values(), narrower(plan.output_dtype, plan.stats_dtype), 1.0, 2.0);
      CHECK(y_cmp.mismatches == 0);

      cpu->set_parameters(plan, scale, nullptr);
      gpu->set_parameters(plan, scale, nullptr);
      std::vector<double> sums_cpu(static_cast<size_t>(2 * cells)), sums_gpu(static_cast<size_t>(2 * cells));
      std::vector<double> ch_cpu(size_t(2 * C), 0.0), ch_gpu(size_t(2 * C), 0.0);
      cpu->backward_sums(host_in, all, *cpu_stats, sums_cpu.data(), ch_cpu.data());
      gpu->backward_sums(dev_in, all, *gpu_stats, sums_gpu.data(), ch_gpu.data());
      const double scale_sums = std::max(1.0, max_abs(sums_cpu)), scale_ch = std::max(1.0, max_abs(ch_cpu));
      for (size_t i = 0; i < sums_cpu.size(); ++i) CHECK(std::fabs(sums_gpu[i] - sums_cpu[i]) <= 1e-5 * scale_sums);
      for (size_t i = 0; i < ch_cpu.size(); ++i) CHECK(std::fabs(ch_gpu[i] - ch_cpu[i]) <= 1e-5 * scale_ch);

      Array dx_cpu(plan.shape, plan.input_dtype), dx_gpu = dx_cpu, dx_fused = dx_cpu;
      cpu->store_terms(all, sums_cpu.data(), *cpu_stats);
      cpu->input_grad(host_in, all, *cpu_stats, dx_cpu.bytes.data());
      const std::vector<double> dx_want = dx_cpu.values();
      gpu->store_terms(all, sums_cpu.data(), *gpu_stats);
      DeviceCopy dxd = to_device(dx_gpu.bytes.data(), dx_gpu.bytes.size());
      gpu->input_grad(dev_in, all, *gpu_stats, dxd.data);
      CUDA_OK(cudaStreamSynchronize(nullptr));
      from_device(dx_gpu.bytes.data(), dxd);
      const auto dx_cmp = compare(dx_gpu.values(), dx_want, plan.input_dtype, std::max(1.0, max_abs(dx_want)), 2.0);
      CHECK(dx_cmp.mismatches == 0);
      // The fused step: sums and terms on the device, the channel sums read
      // back by param_grads.
      gpu->sums_and_terms(dev_in, all, *gpu_stats, true);
      gpu->input_grad(dev_in, all, *gpu_stats, dxd.data);
      std::vector<double> ch_fused(size_t(2 * C), 0.0);
      gpu->param_grads(nullptr, C, nullptr, nullptr, DType::f32, ch_fused.data());
      from_device(dx_fused.bytes.data(), dxd);
      const auto fused_cmp =
          compare(dx_fused.values(), dx_want, plan.input_dtype, std::max(1.0, max_abs(dx_want)), 2.0);
      CHECK(fused_cmp.mismatches == 0);
      for (size_t i = 0; i < ch_cpu.size(); ++i) CHECK(std::fabs(ch_fused[i] - ch_cpu[i]) <= 1e-5 * scale_ch);
    }
  }
}

TEST_CASE("cuda: every Flax golden case, device tensors against host tensors", "[golden]") {
  const nlohmann::json manifest = golden::manifest("flax");
  REQUIRE(manifest["cases"].size() >= 30);
  cuda::StreamHandle stream;
  for (const auto& c : manifest["cases"]) {
    DYNAMIC_SECTION(c["name"].get<std::string>()) {
      Inputs in;
      in.config = golden::config_of(c);
      in.layout = parse_layout(c["layout"].get<std::string>());
      const DType input = golden::dtype(c["input_dtype"]);
      in.x = golden::load(c, "x", input);
      in.dy = golden::load(c, "dy", input);
      if (golden::has_file(c, "mask")) {
        const io::NpyArray m = golden::file("flax", c, "mask");
        in.mask = io::to_mask(m);
        in.mask_shape = m.shape;
        in.has_mask = true;
      }
      const Plan plan = resolve(in.config, in.x.shape, in.layout, input);
      if (golden::has_file(c, "scale")) {
        const Array s = golden::load(c, "scale", in.config.param_dtype);
        for (int64_t i = 0; i < plan.channels; ++i) in.scale.push_back(s.get(i));
      }
      if (golden::has_file(c, "bias")) {
        const Array b = golden::load(c, "bias", in.config.param_dtype);
        for (int64_t i = 0; i < plan.channels; ++i) in.bias.push_back(b.get(i));
      }
      const Outputs cpu = run_layer(in, false);
      GpuOptions options;
      options.stream = stream.get();
      const Outputs gpu = run_layer(in, true, options);
      compare_runs(in, gpu, cpu);
    }
  }
}

namespace {

// A tensor of `shape` on the device whose value depends only on (n, c):
// table[n * C + c], laid out NHWC or NCHW. Filled on the device with the
// backend's gather kernel (a broadcasting index map).
void fill_by_sample_and_channel(void* dst, const Shape& shape, Layout layout, const std::vector<uint16_t>& table,
                                cudaStream_t stream) {
  const int64_t n = shape[0];
  const int64_t c = layout == Layout::channels_last ? shape.back() : shape[1];
  const int64_t spatial = element_count(shape) / (n * c);
  cuda::StridedIndex map;
  map.rank = 3;
  if (layout == Layout::channels_last) {
    const int64_t extent[3] = {n, spatial, c}, stride[3] = {c, 0, 1};
    for (int d = 0; d < 3; ++d) map.extent[d] = extent[d], map.stride[d] = stride[d];
  } else {
    const int64_t extent[3] = {n, c, spatial}, stride[3] = {c, 1, 0};
    for (int d = 0; d < 3; ++d) map.extent[d] = extent[d], map.stride[d] = stride[d];
  }
  DeviceCopy t = to_device(table.data(), table.size() * 2);
  cuda::permute(stream, map, element_count(shape), 2, t.data, dst, true);
  CUDA_OK(cudaStreamSynchronize(stream));
}

}  // namespace

// H of the [large] tensors; a smaller value (defined when building) only
// dry-runs the test's own logic.
#ifndef DISTGN_TEST_LARGE_H
#define DISTGN_TEST_LARGE_H 32800
#endif

TEST_CASE("cuda: tensors beyond 2^31 elements", "[large]") {
  // 2 x 32800 x 256 x 128 = 2,149,253,120 elements (> 2^31), bfloat16, G = 32
  // (S = 4): x depends on (n, c) only, so every cell holds the four values
  // 16 n + s + g/4 (s = c % 4) equally often: mean 16 n + 1.5 + g/4, var 1.25.
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_OK(cudaMemGetInfo(&free_bytes, &total_bytes));
  const int64_t H = DISTGN_TEST_LARGE_H, spatial = H * 256, C = 128, G = 32;
  const int64_t elements = 2 * spatial * C;
  if (H == 32800) REQUIRE(elements > (int64_t(1) << 31));
  const size_t bytes = size_t(elements) * 2;
  if (free_bytes < 4 * bytes + (size_t(1) << 30)) {
    WARN("skipped: needs " << (4 * bytes >> 30) << " GiB of device memory, " << (free_bytes >> 30) << " free");
    return;
  }
  for (Layout layout : {Layout::channels_last, Layout::channels_first}) {
    DYNAMIC_SECTION(layout_name(layout)) {
      const Shape shape = layout == Layout::channels_last ? Shape{2, H, 256, C} : Shape{2, C, H, 256};
      std::vector<uint16_t> x_table(static_cast<size_t>(2 * C)), dy_table(static_cast<size_t>(2 * C));
      for (int64_t n = 0; n < 2; ++n)
        for (int64_t c = 0; c < C; ++c) {
          x_table[size_t(n * C + c)] = to_bfloat16(float(16 * n + c % 4) + 0.25f * float((c / 4) % 8)).bits;
          dy_table[size_t(n * C + c)] = to_bfloat16(c % 4 == 0 ? 1.0f : 0.0f).bits;
        }
      cuda::StreamHandle stream;
      cuda::DeviceArray x(bytes), dy(bytes), y(bytes), dx(bytes);
      fill_by_sample_and_channel(x.data(), shape, layout, x_table, stream.get());
      fill_by_sample_and_channel(dy.data(), shape, layout, dy_table, stream.get());
      CUDA_OK(cudaMemset(y.data(), 0xff, bytes));  // NaN: anything left unwritten shows
      CUDA_OK(cudaMemset(dx.data(), 0xff, bytes));

      GroupNormConfig config;
      config.num_groups = G;
      config.param_dtype = DType::bf16;
      GroupNorm layer(config);
      layer.set_stream(stream.get());
      ForwardState state;
      const TensorView xv{x.data(), shape, DType::bf16, layout, Device::cuda};
      layer.forward(xv, {y.data(), shape, DType::bf16, layout, Device::cuda}, nullptr, &state);
      layer.backward(xv, {dy.data(), shape, DType::bf16, layout, Device::cuda}, nullptr, state,
                     {dx.data(), shape, DType::bf16, layout, Device::cuda});
      stream.synchronize();

      // Statistics, and the expected y and dx per (n, c).
      const double count = double(spatial) * 4;
      std::vector<float> y_want(static_cast<size_t>(2 * C)), dx_want(static_cast<size_t>(2 * C));
      for (int64_t n = 0; n < 2; ++n)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t cell = n * G + g;
          const double mean = 16.0 * double(n) + 1.5 + 0.25 * double(g % 8);
          const CellStats s = finalize_moments(CellMoments{count, mean, 1.25 * count}, 1e-6, true, DType::f32);
          CHECK(state.count()[size_t(cell)] == count);
          CHECK(state.mean()[size_t(cell)] == Approx(mean).epsilon(1e-7));
          CHECK(state.rstd()[size_t(cell)] == Approx(s.rstd).epsilon(1e-6));
          const float r = float(s.rstd);
          for (int64_t s4 = 0; s4 < 4; ++s4) {
            const int64_t c = g * 4 + s4;
            const float xhat = (float(s4) - 1.5f) * r;
            y_want[size_t(n * C + c)] = xhat;
            // a = A/n = 1/4, b = B/n = xhat(s=0) / 4; dx = r (dy - a - xhat b)
            const float a = 0.25f, b = -1.5f * r * 0.25f;
            dx_want[size_t(n * C + c)] = r * ((s4 == 0 ? 1.0f : 0.0f) - a - xhat * b);
          }
        }
      // Every y element (4 GiB through the host), dx at the start, around
      // 2^31 and at the end.
      std::vector<uint16_t> host(static_cast<size_t>(elements));
      y.download(host.data(), bytes);
      auto channel_of = [&](int64_t i) {
        return layout == Layout::channels_last ? i % C : (i / spatial) % C;
      };
      auto sample_of = [&](int64_t i) { return i / (spatial * C); };
      int64_t bad_y = 0, first_bad = -1;
      for (int64_t i = 0; i < elements; ++i) {
        const float got = to_float(bfloat16_t{host[size_t(i)]});
        const float want = y_want[size_t(sample_of(i) * C + channel_of(i))];
        if (!(std::fabs(got - want) <= 1e-2f * std::max(1.0f, std::fabs(want)))) {
          if (bad_y++ == 0) first_bad = i;
        }
      }
      INFO("y: first wrong element " << first_bad);
      CHECK(bad_y == 0);
      dx.download(host.data(), bytes);
      int64_t bad_dx = 0;
      const int64_t window = std::min<int64_t>(int64_t(1) << 20, elements / 4);
      for (int64_t start : {int64_t(0), std::min((int64_t(1) << 31), elements / 2) - window, elements - window})
        for (int64_t i = start; i < start + window; ++i) {
          const float got = to_float(bfloat16_t{host[size_t(i)]});
          const float want = dx_want[size_t(sample_of(i) * C + channel_of(i))];
          if (!(std::fabs(got - want) <= 1e-2f * std::max(1.0f, std::fabs(want)))) ++bad_dx;
        }
      CHECK(bad_dx == 0);
    }
  }
}

#if DISTGN_WITH_NCCL
TEST_CASE("cuda: the NCCL communicator with one rank", "[nccl]") {
  int device = 0;
  ncclComm_t nccl = nullptr;
  REQUIRE(ncclCommInitAll(&nccl, 1, &device) == ncclSuccess);
  cuda::StreamHandle stream;
  {
    std::shared_ptr<Communicator> comm = nccl_communicator(nccl, stream.get());
    REQUIRE(comm->rank() == 0);
    REQUIRE(comm->size() == 1);
    std::vector<double> d = {1.5, -2.0, 3.25};
    comm->allreduce_sum(d.data(), d.size());
    CHECK(d == std::vector<double>{1.5, -2.0, 3.25});
    std::vector<float> f = {0.5f, 4.0f};
    comm->allreduce_sum(f.data(), f.size());
    CHECK(f == std::vector<float>{0.5f, 4.0f});
    std::vector<double> gathered(3);
    comm->allgather(d.data(), 3, gathered.data());
    CHECK(gathered == d);
    std::vector<uint8_t> bytes = {1, 2, 3, 250}, gathered_bytes(4);
    comm->allgather(bytes.data(), 4, gathered_bytes.data());
    CHECK(gathered_bytes == bytes);
    std::unique_ptr<Communicator> part = comm->split(0, 0);
    CHECK(part->size() == 1);
    // Device collectives.
    DeviceCollectives* device_comm = device_collectives(*comm);
    REQUIRE(device_comm);
    DeviceCopy dd = to_device(d.data(), d.size() * 8);
    device_comm->allreduce_sum_device(static_cast<double*>(dd.data), d.size());
    CUDA_OK(cudaStreamSynchronize(device_comm->stream()));
    std::vector<double> back(3);
    from_device(back.data(), dd);
    CHECK(back == d);

    // The layer over it (also with axis_index_groups: a split) equals the local layer.
    for (bool groups : {false, true}) {
      MatrixCase m = make_case("nhwc_bf16", {2, 8, 8, 64}, Layout::channels_last, DType::bf16, DType::bf16);
      Inputs in = make_inputs(m, 9);
      if (groups) in.config.axis_index_groups = std::vector<std::vector<int>>{{0}};
      GpuOptions options;
      options.stream = stream.get();
      const Outputs local = run_layer(in, true, options);
      // run_layer builds its layer on the local communicator: run the NCCL one by hand.
      GroupNorm layer(in.config, comm);
      const Plan plan = layer.plan(in.x.shape, in.layout, in.x.dtype);
      layer.init_parameters(plan.channels);
      Array s({plan.channels}, in.config.param_dtype), b = s;
      for (int64_t c = 0; c < plan.channels; ++c) {
        s.set(c, in.scale[size_t(c)]);
        b.set(c, in.bias[size_t(c)]);
      }
      layer.set_scale(s.view());
      layer.set_bias(b.view());
      layer.set_stream(stream.get());
      DeviceCopy xd = to_device(in.x.bytes.data(), in.x.bytes.size());
      Array y(in.x.shape, plan.output_dtype);
      DeviceCopy yd = to_device(y.bytes.data(), y.bytes.size());
      ForwardState state;
      layer.forward({xd.data, in.x.shape, in.x.dtype, in.layout, Device::cuda},
                    {yd.data, in.x.shape, plan.output_dtype, in.layout, Device::cuda}, nullptr, &state);
      stream.synchronize();
      from_device(y.bytes.data(), yd);
      CHECK(y.bytes == local.y_bytes);
    }
  }
  ncclCommDestroy(nccl);
}
#else
TEST_CASE("cuda: the NCCL communicator with one rank", "[nccl]") { WARN("built without NCCL"); }
#endif
