// Tests of distgn::GroupNorm on the CPU with the local communicator, against
// the float64 reference of semantics §3-§6 and §9 (tests/reference.hpp: plain
// loops over a generic N-d index, no code shared with the library's kernels).
#include <catch2/catch.hpp>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/half.hpp"
#include "core/kernel_plan.hpp"
#include "distgn/communicator.hpp"
#include "distgn/config.hpp"
#include "distgn/error.hpp"
#include "distgn/group_norm.hpp"
#include "distgn/tensor.hpp"
#include "reference.hpp"
#include "test_arrays.hpp"

using namespace distgn_test;  // Array, random data, check_close, the reference
using distgn::CountingCommunicator;
using distgn::DType;
using distgn::Error;
using distgn::ForwardState;
using distgn::GroupNorm;
using distgn::GroupNormConfig;
using distgn::Initializer;
using distgn::Layout;
using distgn::MaskView;
using distgn::ParamGradReduction;
using distgn::Shape;
using distgn::TensorView;

namespace {

constexpr Layout kLast = Layout::channels_last;
constexpr Layout kFirst = Layout::channels_first;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- running the layer ---------------------------------------------------------

GroupNormConfig make_config(int64_t groups, std::optional<std::vector<int64_t>> axes = {},
                            bool fast = true) {
  GroupNormConfig c;
  c.num_groups = groups;
  c.reduction_axes = std::move(axes);
  c.use_fast_variance = fast;
  return c;
}

// Sets random scale and bias (those in use) and returns them as stored.
void set_random_parameters(GroupNorm& layer, int64_t channels, uint64_t seed,
                           std::vector<double>& scale, std::vector<double>& bias) {
  const GroupNormConfig& c = layer.config();
  scale.clear();
  bias.clear();
  if (c.use_scale) {
    Array s({channels}, DType::f64, kLast, random_values(channels, seed, 1.0, 0.5));
    layer.set_scale(s.view());
    scale = view_values(layer.scale());
  }
  if (c.use_bias) {
    Array b({channels}, DType::f64, kLast, random_values(channels, seed + 1, 0.0, 0.5));
    layer.set_bias(b.view());
    bias = view_values(layer.bias());
  }
}

struct Forward {
  Array y;
  ForwardState state;
};

Forward run_forward(GroupNorm& layer, Array& x, const MaskView* mask = nullptr) {
  Forward f;
  const distgn::Plan plan = layer.plan(x.shape, x.layout, x.dtype);
  f.y = Array(x.shape, plan.output_dtype, x.layout);
  layer.forward(x.view(), f.y.view(), mask, &f.state);
  return f;
}

struct Backward {
  Array dx, dscale, dbias;
};

Backward run_backward(GroupNorm& layer, Array& x, Array& dy, const MaskView* mask,
                      const ForwardState& state,
                      ParamGradReduction reduction = ParamGradReduction::local) {
  Backward b;
  const GroupNormConfig& c = layer.config();
  const int64_t C = state.plan().channels;
  b.dx = Array(x.shape, x.dtype, x.layout);
  b.dscale = Array({C}, c.param_dtype);
  b.dbias = Array({C}, c.param_dtype);
  TensorView ds = b.dscale.view(), db = b.dbias.view();
  layer.backward(x.view(), dy.view(), mask, state, b.dx.view(), c.use_scale ? &ds : nullptr,
                 c.use_bias ? &db : nullptr, reduction);
  return b;
}

double tolerance_for(DType dtype) { return dtype == DType::f64 ? 1e-12 : 1e-5; }

// Runs forward on random data and compares with the reference. Returns the
// layer's plan so callers can check which path ran.
distgn::Plan check_forward_case(GroupNormConfig config, const Shape& shape, Layout layout,
                                DType dtype, uint64_t seed,
                                const std::vector<uint8_t>* mask_values = nullptr,
                                const Shape* mask_shape = nullptr) {
  GroupNorm layer(config);
  const distgn::Plan plan = layer.plan(shape, layout, dtype);
  std::vector<double> scale, bias;
  set_random_parameters(layer, plan.channels, seed + 100, scale, bias);
  Array x(shape, dtype, layout, random_values(distgn::element_count(shape), seed, 0.5, 2.0, dtype));
  std::vector<uint8_t> full_mask;
  MaskView mask;
  if (mask_values) {
    full_mask = expand_mask(*mask_values, *mask_shape, shape);
    // Masked positions hold values that would move the statistics a lot.
    for (int64_t e = 0; e < x.size(); ++e)
      if (!full_mask[size_t(e)]) x.set(e, 1000.0 + double(e % 7));
    mask = MaskView{mask_values->data(), *mask_shape};
  }
  const Forward f = run_forward(layer, x, mask_values ? &mask : nullptr);
  const Reference ref =
      reference_forward(config, shape, layout, dtype, x.values(), full_mask, scale, bias);
  const double tol = tolerance_for(plan.output_dtype);
  std::ostringstream what;
  what << "shape " << distgn::shape_string(shape) << " " << distgn::layout_name(layout) << " "
       << distgn::dtype_name(dtype) << (config.use_fast_variance ? " fast" : " exact");
  check_close(f.y.values(), ref.y, tol, tol, what.str() + " y");
  check_close(f.state.mean(), ref.mean, tol, tol, what.str() + " mean");
  check_close(f.state.rstd(), ref.rstd, 0, tol, what.str() + " rstd");
  check_close(f.state.count(), ref.count, 0, 0, what.str() + " count");
  return plan;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// How many bytes differ (-1 when the sizes differ). Compared this way so a
}  // namespace

// ---- forward against the reference ------------------------------------------------

TEST_CASE("group norm: forward matches the reference, channels last", "[group_norm]") {
  struct Case {
    Shape shape;
    int64_t groups;
  };
  const std::vector<Case> cases = {
      {{6, 16}, 4}, {{3, 10, 12}, 3}, {{2, 5, 7, 32}, 8}, {{2, 3, 4, 5, 16}, 4},
      {{1, 4, 4, 8}, 1} /* layer norm */, {{2, 3, 3, 8}, 8} /* instance norm */, {{24}, 6}};
  for (const Case& c : cases)
    for (bool fast : {true, false})
      for (DType dtype : {DType::f32, DType::f64})
        check_forward_case(make_config(c.groups, {}, fast), c.shape, kLast, dtype,
                           uint64_t(c.shape.size() * 10 + c.groups));
}

TEST_CASE("group norm: forward matches the reference, channels first", "[group_norm]") {
  struct Case {
    Shape shape;
    int64_t groups;
  };
  const std::vector<Case> cases = {{{6, 16}, 4},        {{3, 12, 10}, 3},
                                   {{2, 32, 5, 7}, 8},  {{2, 16, 3, 4, 5}, 4},
                                   {{1, 8, 4, 4}, 1},   {{2, 8, 3, 3}, 8}};
  for (const Case& c : cases)
    for (bool fast : {true, false})
      for (DType dtype : {DType::f32, DType::f64}) {
        const distgn::Plan p = check_forward_case(make_config(c.groups, {}, fast), c.shape, kFirst,
                                                  dtype, uint64_t(c.shape.size() * 7 + c.groups));
        CHECK(p.feature_axis == 1);
      }
}

TEST_CASE("group norm: forward with custom reduction axes, including permuted ones",
          "[group_norm]") {
  struct Case {
    Shape shape;
    Layout layout;
    std::vector<int64_t> axes;
    int64_t groups;
    bool permuted;  // the rare path that gathers first
  };
  const std::vector<Case> cases = {
      {{2, 5, 4, 4, 32}, kLast, {0, 1, 3, 4}, 8, true},
      {{2, 5, 6, 16}, kLast, {1, 3}, 4, false},        // keep n and w: channel rows
      {{2, 5, 6, 16}, kLast, {0, 1, 2, 3}, 4, false},  // one slab
      {{2, 5, 6, 16}, kLast, {-1}, 4, false},          // per position
      {{3, 4, 5, 12}, kLast, {0, 2, 3}, 3, true},
      {{2, 16, 5, 6}, kFirst, {1}, 4, true},
      {{2, 16, 5, 6}, kFirst, {1, 3}, 4, true},
      {{2, 16, 5, 6}, kFirst, {0, 1, 2, 3}, 4, true},
      {{2, 16, 5, 6}, kFirst, {-3, -2, -1}, 2, false},
  };
  for (const Case& c : cases)
    for (bool fast : {true, false})
      for (DType dtype : {DType::f32, DType::f64}) {
        const GroupNormConfig config = make_config(c.groups, c.axes, fast);
        check_forward_case(config, c.shape, c.layout, dtype, uint64_t(c.groups * 3 + fast));
        CHECK(distgn::resolve_kernel_plan(config, c.shape, c.layout, dtype).permuted == c.permuted);
      }
}

TEST_CASE("group norm: forward with group_size instead of num_groups", "[group_norm]") {
  GroupNormConfig c;
  c.num_groups.reset();
  c.group_size = 4;
  const distgn::Plan p = check_forward_case(c, {2, 3, 3, 16}, kLast, DType::f32, 91);
  CHECK(p.num_groups == 4);
}

TEST_CASE("group norm: forward with full-shape and broadcast masks", "[group_norm][mask]") {
  const Shape nhwc{2, 5, 6, 16};
  const Shape nchw{2, 16, 5, 6};
  struct Case {
    Shape shape;
    Layout layout;
    Shape mask_shape;
    std::optional<std::vector<int64_t>> axes;
  };
  const std::vector<Case> cases = {
      {nhwc, kLast, nhwc, {}},
      {nhwc, kLast, {2, 1, 1, 16}, {}},
      {nhwc, kLast, {1, 5, 6, 16}, {}},
      {nhwc, kLast, {5, 6, 16}, {}},
      {nhwc, kLast, {6, 16}, {}},
      {nhwc, kLast, {16}, {}},
      {nhwc, kLast, {2, 5, 1, 16}, std::vector<int64_t>{1, 3}},  // channel rows, 4 blocks
      {{2, 5, 4, 4, 32}, kLast, {2, 5, 4, 4, 32}, std::vector<int64_t>{0, 1, 3, 4}},  // permuted
      {nchw, kFirst, nchw, {}},
      {nchw, kFirst, {2, 16, 1, 1}, {}},
      {nchw, kFirst, {1, 16, 5, 6}, {}},
      {nchw, kFirst, {1, 16, 1, 6}, {}},
      {nchw, kFirst, nchw, std::vector<int64_t>{1}},  // permuted
  };
  uint64_t seed = 500;
  for (const Case& c : cases) {
    // Keep at least one valid position per cell with a dense enough mask.
    const std::vector<uint8_t> mask = random_mask(distgn::element_count(c.mask_shape), ++seed, 0.8);
    for (bool fast : {true, false})
      for (DType dtype : {DType::f32, DType::f64}) {
        INFO("mask shape " << distgn::shape_string(c.mask_shape));
        check_forward_case(make_config(4, c.axes, fast), c.shape, c.layout, dtype, seed, &mask,
                           &c.mask_shape);
      }
  }
}

TEST_CASE("group norm: masked NaN and inf inputs do not reach the statistics",
          "[group_norm][mask]") {
  for (Layout layout : {kLast, kFirst}) {
    const Shape shape = layout == kLast ? Shape{2, 4, 4, 8} : Shape{2, 8, 4, 4};
    GroupNormConfig config = make_config(2);
    GroupNorm layer(config);
    Array x(shape, DType::f32, layout, random_values(2 * 4 * 4 * 8, 3, 0, 1, DType::f32));
    std::vector<uint8_t> mask = random_mask(x.size(), 4, 0.6);
    for (int64_t e = 0; e < x.size(); ++e)
      if (!mask[size_t(e)]) x.set(e, e % 2 ? kNaN : std::numeric_limits<double>::infinity());
    const MaskView m{mask.data(), shape};
    const Forward f = run_forward(layer, x, &m);
    const Reference ref = reference_forward(config, shape, layout, DType::f32, x.values(), mask,
                                            view_values(layer.scale()), view_values(layer.bias()));
    for (double v : f.state.mean()) CHECK(std::isfinite(v));
    for (double v : f.state.rstd()) CHECK(std::isfinite(v));
    std::vector<double> got = f.y.values(), want = ref.y;
    for (size_t e = 0; e < got.size(); ++e) {
      if (mask[e]) {
        CHECK(std::isfinite(got[e]));
      } else {
        got[e] = want[e] = 0;  // y of a masked NaN/inf is NaN/inf: not compared
      }
    }
    check_close(got, want, 1e-5, 1e-5, "valid positions");
  }
}

TEST_CASE("group norm: an unmasked NaN poisons its cell only", "[group_norm]") {
  for (bool fast : {true, false}) {
    GroupNormConfig config = make_config(4, {}, fast);
    GroupNorm layer(config);
    const Shape shape{2, 3, 3, 16};
    Array x(shape, DType::f32, kLast, random_values(2 * 9 * 16, 8, 0, 1, DType::f32));
    // Element (n=1, h=2, w=0, c=5): cell (1, group 1) = cell 5.
    x.set(ravel({1, 2, 0, 5}, shape), kNaN);
    const Forward f = run_forward(layer, x);
    for (int64_t cell = 0; cell < 8; ++cell) {
      INFO("cell " << cell << (fast ? " fast" : " exact"));
      CHECK(std::isnan(f.state.rstd()[size_t(cell)]) == (cell == 5));
      CHECK(std::isnan(f.state.mean()[size_t(cell)]) == (cell == 5));
    }
    const std::vector<double> y = f.y.values();
    for (int64_t e = 0; e < x.size(); ++e) {
      const auto i = unravel(e, shape);
      CHECK(std::isnan(y[size_t(e)]) == (i[0] == 1 && i[3] / 4 == 1));
    }
  }
}

TEST_CASE("group norm: an all-masked cell gives NaN statistics and outputs for that cell only",
          "[group_norm][mask]") {
  for (Layout layout : {kLast, kFirst}) {
    for (bool fast : {true, false}) {
      const Shape shape = layout == kLast ? Shape{2, 3, 4, 8} : Shape{2, 8, 3, 4};
      GroupNormConfig config = make_config(2, {}, fast);
      GroupNorm layer(config);
      std::vector<double> scale, bias;
      set_random_parameters(layer, 8, 17, scale, bias);
      Array x(shape, DType::f32, layout, random_values(2 * 3 * 4 * 8, 5, 0, 1, DType::f32));
      // Mask out every position of cell (n=1, group 0), and a few others.
      std::vector<uint8_t> mask = random_mask(x.size(), 6, 0.9);
      const CellMap g = cell_map(config, shape, layout);
      const int64_t dead = 1 * 2 + 0;
      for (int64_t e = 0; e < x.size(); ++e)
        if (g.cell[size_t(e)] == dead) mask[size_t(e)] = 0;
      const MaskView m{mask.data(), shape};
      const Forward f = run_forward(layer, x, &m);
      const Reference ref =
          reference_forward(config, shape, layout, DType::f32, x.values(), mask, scale, bias);
      INFO(distgn::layout_name(layout) << (fast ? " fast" : " exact"));
      for (int64_t cell = 0; cell < 4; ++cell) {
        CHECK(std::isnan(f.state.mean()[size_t(cell)]) == (cell == dead));
        CHECK(std::isnan(f.state.rstd()[size_t(cell)]) == (cell == dead));
      }
      CHECK(f.state.count()[size_t(dead)] == 0);
      const std::vector<double> y = f.y.values();
      for (int64_t e = 0; e < x.size(); ++e)
        CHECK(std::isnan(y[size_t(e)]) == (g.cell[size_t(e)] == dead));
      check_close(y, ref.y, 1e-5, 1e-5, "y");
    }
  }
}

TEST_CASE("group norm: half and bfloat16 inputs meet semantics 8's tolerance", "[group_norm][dtype]") {
  struct Case {
    DType x;
    bool affine;
    DType params;
    bool force;
    DType out;
  };
  const std::vector<Case> cases = {
      {DType::f16, true, DType::f32, true, DType::f32},     // f32 params promote y
      {DType::bf16, true, DType::f32, true, DType::f32},
      {DType::f16, true, DType::f16, true, DType::f16},     // half params keep half y
      {DType::bf16, true, DType::bf16, true, DType::bf16},
      {DType::f16, false, DType::f32, true, DType::f16},    // no affine: x's dtype
      {DType::bf16, false, DType::f32, true, DType::bf16},
      {DType::f16, true, DType::f16, false, DType::f16},    // stats in half
      {DType::bf16, true, DType::bf16, false, DType::bf16},
      {DType::f16, true, DType::bf16, true, DType::f32},    // f16 with bf16: f32
  };
  for (const Case& c : cases)
    for (Layout layout : {kLast, kFirst})
      for (bool fast : {true, false}) {
        GroupNormConfig config = make_config(4, {}, fast);
        config.use_scale = config.use_bias = c.affine;
        config.param_dtype = c.params;
        config.force_float32_reductions = c.force;
        const Shape shape = layout == kLast ? Shape{2, 6, 5, 16} : Shape{2, 16, 6, 5};
        GroupNorm layer(config);
        std::vector<double> scale, bias;
        set_random_parameters(layer, 16, 40, scale, bias);
        Array x(shape, c.x, layout, random_values(2 * 6 * 5 * 16, 41, 0.25, 1.5, c.x));
        const Forward f = run_forward(layer, x);
        INFO("x " << distgn::dtype_name(c.x) << " params " << distgn::dtype_name(c.params)
                  << " affine " << c.affine << " force " << c.force << " "
                  << distgn::layout_name(layout) << (fast ? " fast" : " exact"));
        REQUIRE(f.y.dtype == c.out);
        const Reference ref =
            reference_forward(config, shape, layout, c.x, x.values(), {}, scale, bias);
        if (c.out == DType::f32)
          check_close(f.y.values(), ref.y, 1e-5, 1e-5, "y");
        else
          check_half_outputs(f.y.values(), ref.y, c.out, "y");
        // The statistics are in the stats dtype: representable there.
        const DType stats = c.force ? DType::f32 : c.x;
        for (size_t i = 0; i < f.state.mean().size(); ++i) {
          CHECK(f.state.mean()[i] == rounded(stats, f.state.mean()[i]));
          CHECK(f.state.rstd()[i] == rounded(stats, f.state.rstd()[i]));
        }
        check_close(f.state.mean(), ref.mean, 1e-6, stats == DType::f32 ? 1e-6 : 4e-3, "mean");
        check_close(f.state.rstd(), ref.rstd, 0, stats == DType::f32 ? 1e-6 : 8e-3, "rstd");
      }
}

TEST_CASE("group norm: the dtype field sets the output and stats dtype", "[group_norm][dtype]") {
  GroupNormConfig config = make_config(4);
  config.dtype = DType::bf16;
  GroupNorm layer(config);
  const Shape shape{2, 4, 4, 16};
  Array x(shape, DType::f32, kLast, random_values(2 * 16 * 16, 50, 0, 1, DType::f32));
  const Forward f = run_forward(layer, x);
  REQUIRE(f.y.dtype == DType::bf16);
  const Reference ref = reference_forward(config, shape, kLast, DType::f32, x.values(), {},
                                          view_values(layer.scale()), view_values(layer.bias()));
  check_half_outputs(f.y.values(), ref.y, DType::bf16, "y");
}

// ---- accuracy at a large mean -----------------------------------------------------

TEST_CASE("group norm: exact variance at |mean|/std = 1e4 in float32 data", "[group_norm][accuracy]") {
  for (Layout layout : {kLast, kFirst}) {
    for (double sign : {1.0, -1.0}) {
      // Cells of 64 * 64 * 4 = 16384 and 256 * 128 * 4 = 131072 elements:
      // the second spans several of the backend's chunks, merged across.
      for (const Shape& base : {Shape{2, 64, 64, 8}, Shape{1, 256, 128, 16}}) {
        Shape shape = base;
        if (layout == kFirst) shape = {base[0], base[3], base[1], base[2]};
        GroupNormConfig config = make_config(base[3] / 4, {}, false);
        config.use_scale = config.use_bias = false;
        GroupNorm layer(config);
        const double mean = sign * 1e4, stddev = 1.0;
        Array x(shape, DType::f32, layout,
                random_values(distgn::element_count(shape), 60, mean, stddev, DType::f32));
        const Forward f = run_forward(layer, x);
        const Reference ref = reference_forward(config, shape, layout, DType::f32, x.values(), {}, {}, {});
        INFO(distgn::layout_name(layout) << " " << distgn::shape_string(shape));
        double worst = 0;
        for (size_t c = 0; c < ref.var.size(); ++c) {
          const double r = f.state.rstd()[c];
          const double var = 1.0 / (r * r) - config.epsilon;
          worst = std::max(worst, std::abs(var - ref.var[c]) / ref.var[c]);
        }
        INFO("worst variance relative error " << worst);
        CHECK(worst <= 1e-5);
        check_close(f.y.values(), ref.y, 1e-4, 0, "y");
      }
    }
  }
}

TEST_CASE("group norm: fast variance at |mean|/std = 1e4 is no worse than Flax's float32 formula",
          "[group_norm][accuracy]") {
  const Shape shape{2, 32, 32, 8};
  GroupNormConfig config = make_config(2, {}, true);
  config.use_scale = config.use_bias = false;
  GroupNorm layer(config);
  Array x(shape, DType::f32, kLast,
          random_values(distgn::element_count(shape), 61, 1e4, 1.0, DType::f32));
  const Forward f = run_forward(layer, x);
  const Reference ref = reference_forward(config, shape, kLast, DType::f32, x.values(), {}, {}, {});
  // Flax: mean(x) and mean(x^2) in float32 (pairwise sums, as XLA reduces),
  // var = max(0, mu2 - mu^2).
  const CellMap& g = ref.cells;
  std::vector<std::vector<float>> per_cell(size_t(g.num_cells));
  const std::vector<double> xv = x.values();
  for (size_t e = 0; e < xv.size(); ++e) per_cell[size_t(g.cell[e])].push_back(float(xv[e]));
  std::function<float(const float*, size_t, bool)> pairwise = [&](const float* v, size_t n,
                                                                   bool square) -> float {
    if (n <= 8) {
      float s = 0;
      for (size_t i = 0; i < n; ++i) s += square ? v[i] * v[i] : v[i];
      return s;
    }
    return pairwise(v, n / 2, square) + pairwise(v + n / 2, n - n / 2, square);
  };
  for (size_t c = 0; c < per_cell.size(); ++c) {
    const auto& v = per_cell[c];
    const float n = float(v.size());
    const float mu = pairwise(v.data(), v.size(), false) / n;
    const float mu2 = pairwise(v.data(), v.size(), true) / n;
    const double flax_var = std::max(0.0f, mu2 - mu * mu);
    const double flax_err = std::abs(flax_var - ref.var[c]) / ref.var[c];
    const double r = f.state.rstd()[c];
    const double err = std::abs(1.0 / (r * r) - config.epsilon - ref.var[c]) / ref.var[c];
    INFO("cell " << c << ": distgn error " << err << ", Flax float32 error " << flax_err);
    CHECK(err <= std::max(flax_err, 1e-5));
  }
}

// ---- layouts, threads, blocks ---------------------------------------------------------

TEST_CASE("group norm: NHWC and NCHW layouts agree", "[group_norm][layout]") {
  const Shape nhwc{2, 6, 7, 32};
  const std::vector<int> to_nchw{0, 3, 1, 2};
  for (bool fast : {true, false}) {
    GroupNormConfig config = make_config(8, {}, fast);
    GroupNorm last(config), first(config);
    std::vector<double> scale, bias, s2, b2;
    set_random_parameters(last, 32, 70, scale, bias);
    set_random_parameters(first, 32, 70, s2, b2);
    const std::vector<double> xv = random_values(distgn::element_count(nhwc), 71, 1.0, 3.0, DType::f32);
    Shape nchw;
    const std::vector<double> xt = transpose(xv, nhwc, to_nchw, &nchw);
    Array x_last(nhwc, DType::f32, kLast, xv), x_first(nchw, DType::f32, kFirst, xt);
    const Forward f_last = run_forward(last, x_last);
    const Forward f_first = run_forward(first, x_first);
    // Both layouts sum in float over blocks of at most 256 elements, in
    // different orders: within semantics §8's 1e-5 relative of each other.
    check_close(transpose(f_last.y.values(), nhwc, to_nchw), f_first.y.values(), 1e-5, 1e-5, "y");
    check_close(f_last.state.mean(), f_first.state.mean(), 1e-6, 0, "mean");
    check_close(f_last.state.rstd(), f_first.state.rstd(), 0, 1e-5, "rstd");

    const std::vector<double> dyv = random_values(x_last.size(), 72, 0, 1, DType::f32);
    Array dy_last(nhwc, DType::f32, kLast, dyv);
    Array dy_first(nchw, DType::f32, kFirst, transpose(dyv, nhwc, to_nchw));
    const Backward b_last = run_backward(last, x_last, dy_last, nullptr, f_last.state);
    const Backward b_first = run_backward(first, x_first, dy_first, nullptr, f_first.state);
    check_close(transpose(b_last.dx.values(), nhwc, to_nchw), b_first.dx.values(), 1e-5, 1e-5, "dx");
    check_close(b_last.dscale.values(), b_first.dscale.values(), 1e-4, 1e-5, "dscale");
    check_close(b_last.dbias.values(), b_first.dbias.values(), 1e-4, 1e-5, "dbias");
  }
}

namespace {

// Forward and backward with a given OpenMP thread count.
struct Outputs {
  Array y, dx, dscale, dbias;
  ForwardState state;
};

Outputs run_with_threads(int threads, const GroupNormConfig& config, Array& x, Array& dy,
                         const MaskView* mask) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  GroupNorm layer(config);
  Outputs o;
  Forward f = run_forward(layer, x, mask);
  Backward b = run_backward(layer, x, dy, mask, f.state);
  omp_set_num_threads(saved);
  o.y = std::move(f.y);
  o.state = std::move(f.state);
  o.dx = std::move(b.dx);
  o.dscale = std::move(b.dscale);
  o.dbias = std::move(b.dbias);
  return o;
}

// float64 data makes any change in the order of the partial sums visible in
// the bits (float32 results would round it away); float32 is checked too.
void check_thread_independence(GroupNormConfig config, const Shape& shape, Layout layout,
                               bool with_mask, bool check_reference) {
  for (DType dtype : {DType::f64, DType::f32}) {
    config.param_dtype = dtype;
    Array x(shape, dtype, layout,
            random_values(distgn::element_count(shape), 80, 0.5, 2.0, dtype));
    Array dy(shape, dtype, layout, random_values(distgn::element_count(shape), 81, 0.0, 1.0, dtype));
    std::vector<uint8_t> mask;
    MaskView m;
    if (with_mask) {
      mask = random_mask(x.size(), 82, 0.75);
      m = MaskView{mask.data(), shape};
    }
    const Outputs one = run_with_threads(1, config, x, dy, with_mask ? &m : nullptr);
    const Outputs two = run_with_threads(2, config, x, dy, with_mask ? &m : nullptr);
    INFO(distgn::shape_string(shape) << " " << distgn::layout_name(layout) << " "
                                     << distgn::dtype_name(dtype) << " mask " << with_mask);
    CHECK(differing_bytes(one.y.bytes, two.y.bytes) == 0);
    CHECK(differing_bytes(one.dx.bytes, two.dx.bytes) == 0);
    CHECK(differing_bytes(one.dscale.bytes, two.dscale.bytes) == 0);
    CHECK(differing_bytes(one.dbias.bytes, two.dbias.bytes) == 0);
    CHECK(std::memcmp(one.state.mean().data(), two.state.mean().data(), one.state.mean().size() * 8) == 0);
    CHECK(std::memcmp(one.state.rstd().data(), two.state.rstd().data(), one.state.rstd().size() * 8) == 0);
    if (check_reference && dtype == DType::f32) {
      // Large shapes are right too, not just reproducible (scale 1, bias 0).
      const Reference ref =
          reference_forward(config, shape, layout, dtype, x.values(), mask, {}, {});
      check_close(one.y.values(), ref.y, 1e-5, 1e-5, "y");
      const ReferenceGrad grad = reference_backward(ref, x.values(), dy.values(), mask, {});
      check_close(one.dx.values(), grad.dx, 1e-4, 1e-4, "dx");
      double scale_of_sums = 0;
      for (double v : grad.dscale) scale_of_sums = std::max(scale_of_sums, std::abs(v));
      check_close(one.dscale.values(), grad.dscale, 1e-5 * scale_of_sums, 1e-5, "dscale");
      check_close(one.dbias.values(), grad.dbias, 1e-3, 1e-5, "dbias");
    }
  }
}

}  // namespace

// The CPU backend cuts work into fixed chunks of at most 64K elements
// (kChunkElements) and the layer into fused blocks of 2^20 elements; the
// shapes below are large enough to use several of each.
TEST_CASE("group norm: results do not depend on the OpenMP thread count", "[group_norm][threads]") {
  SECTION("NHWC (5, 64, 64, 64): several blocks and chunks") {
    const GroupNormConfig config = make_config(32);
    const distgn::KernelPlan p = distgn::resolve_kernel_plan(config, {5, 64, 64, 64}, kLast, DType::f32);
    REQUIRE(p.form == distgn::KernelPlan::Form::channel_rows);
    REQUIRE(distgn::element_count(p.shape) > (int64_t(1) << 20));
    REQUIRE(p.rows * p.row_width >= 4 * 65536);  // one slab spans several chunks
    check_thread_independence(config, {5, 64, 64, 64}, kLast, false, true);
  }
  SECTION("NCHW (1, 4, 300, 300): cells of several chunks") {
    const GroupNormConfig config = make_config(2, {}, false);
    const distgn::KernelPlan p = distgn::resolve_kernel_plan(config, {1, 4, 300, 300}, kFirst, DType::f32);
    REQUIRE(p.form == distgn::KernelPlan::Form::contiguous_cells);
    REQUIRE(p.cell_elements > 2 * 65536);
    check_thread_independence(config, {1, 4, 300, 300}, kFirst, false, true);
  }
  SECTION("NCHW (3, 64, 64, 64) with a mask: several blocks") {
    check_thread_independence(make_config(16), {3, 64, 64, 64}, kFirst, true, true);
  }
  SECTION("NHWC (2, 96, 96, 32) with a mask") {
    check_thread_independence(make_config(8, {}, false), {2, 96, 96, 32}, kLast, true, false);
  }
  SECTION("permuted (2, 40, 4, 40, 32) reducing (0, 1, 3, 4)") {
    const GroupNormConfig config = make_config(8, std::vector<int64_t>{0, 1, 3, 4});
    REQUIRE(distgn::resolve_kernel_plan(config, {2, 40, 4, 40, 32}, kLast, DType::f32).permuted);
    check_thread_independence(config, {2, 40, 4, 40, 32}, kLast, true, true);
  }
}

TEST_CASE("group norm: one layer handles several shapes in turn", "[group_norm]") {
  GroupNormConfig config = make_config(4);
  GroupNorm layer(config);
  std::vector<double> scale, bias;
  set_random_parameters(layer, 16, 90, scale, bias);
  const std::vector<Shape> shapes = {{2, 4, 4, 16}, {3, 2, 16}, {2, 4, 4, 16}, {1, 7, 16}};
  uint64_t seed = 91;
  for (const Shape& shape : shapes) {
    Array x(shape, DType::f32, kLast,
            random_values(distgn::element_count(shape), ++seed, 0, 1, DType::f32));
    const Forward f = run_forward(layer, x);
    const Reference ref = reference_forward(config, shape, kLast, DType::f32, x.values(), {}, scale, bias);
    INFO(distgn::shape_string(shape));
    check_close(f.y.values(), ref.y, 1e-5, 1e-5, "y");
    Array dy(shape, DType::f32, kLast, random_values(x.size(), seed + 50, 0, 1, DType::f32));
    const Backward b = run_backward(layer, x, dy, nullptr, f.state);
    const ReferenceGrad g = reference_backward(ref, x.values(), dy.values(), {}, scale);
    check_close(b.dx.values(), g.dx, 1e-5, 1e-4, "dx");
  }
}

// ---- backward ------------------------------------------------------------------------

namespace {

// Sets the OpenMP thread count for a scope. The finite-difference checks run
// thousands of tiny forward calls: one thread keeps them from paying a
// parallel region's wake-up per call (results are thread-count independent,
// see the threads test).
struct ScopedThreads {
  int saved;
  explicit ScopedThreads(int n) : saved(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~ScopedThreads() { omp_set_num_threads(saved); }
};

// sum(y * dy) of the layer's own float64 forward.
double loss(GroupNorm& layer, Array& x, const std::vector<double>& dy, const MaskView* mask) {
  const Forward f = run_forward(layer, x, mask);
  long double s = 0;
  for (int64_t i = 0; i < f.y.size(); ++i) s += f.y.get(i) * dy[size_t(i)];
  return double(s);
}

void check_finite_differences(GroupNormConfig config, const Shape& shape, Layout layout,
                              bool with_mask, uint64_t seed) {
  const ScopedThreads one_thread(1);
  config.param_dtype = DType::f64;
  GroupNorm layer(config);
  const distgn::Plan plan = layer.plan(shape, layout, DType::f64);
  std::vector<double> scale, bias;
  set_random_parameters(layer, plan.channels, seed, scale, bias);
  Array x(shape, DType::f64, layout, random_values(distgn::element_count(shape), seed + 1, 0.3, 1.2));
  const std::vector<double> dyv = random_values(x.size(), seed + 2);
  Array dy(shape, DType::f64, layout, dyv);
  std::vector<uint8_t> mask;
  MaskView m;
  if (with_mask) {
    mask = random_mask(x.size(), seed + 3, 0.6);
    m = MaskView{mask.data(), shape};
  }
  const MaskView* mp = with_mask ? &m : nullptr;
  const Forward f = run_forward(layer, x, mp);
  const Backward b = run_backward(layer, x, dy, mp, f.state);

  const double h = 1e-5;
  std::vector<double> fd_dx(size_t(x.size()));
  for (int64_t i = 0; i < x.size(); ++i) {
    const double v = x.get(i);
    x.set(i, v + h);
    const double up = loss(layer, x, dyv, mp);
    x.set(i, v - h);
    const double down = loss(layer, x, dyv, mp);
    x.set(i, v);
    fd_dx[size_t(i)] = (up - down) / (2 * h);
  }
  std::ostringstream what;
  what << distgn::shape_string(shape) << " " << distgn::layout_name(layout) << " mask "
       << with_mask << (config.use_fast_variance ? " fast" : " exact");
  check_close(b.dx.values(), fd_dx, 1e-6, 1e-6, what.str() + " dx");

  // Parameters: perturb through set_scale / set_bias (float64, exact).
  auto param_fd = [&](bool is_scale) {
    std::vector<double> p = is_scale ? scale : bias, fd(p.size());
    for (size_t c = 0; c < p.size(); ++c) {
      const double v = p[c];
      double sides[2];
      for (int s = 0; s < 2; ++s) {
        p[c] = v + (s ? -h : h);
        Array a({int64_t(p.size())}, DType::f64, kLast, p);
        if (is_scale) layer.set_scale(a.view());
        else layer.set_bias(a.view());
        sides[s] = loss(layer, x, dyv, mp);
      }
      p[c] = v;
      fd[c] = (sides[0] - sides[1]) / (2 * h);
    }
    Array a({int64_t(p.size())}, DType::f64, kLast, p);
    if (is_scale) layer.set_scale(a.view());
    else layer.set_bias(a.view());
    return fd;
  };
  if (config.use_scale) check_close(b.dscale.values(), param_fd(true), 1e-6, 1e-6, what.str() + " dscale");
  if (config.use_bias) check_close(b.dbias.values(), param_fd(false), 1e-6, 1e-6, what.str() + " dbias");
}

}  // namespace

TEST_CASE("group norm: backward matches finite differences of sum(y * dy)", "[group_norm][backward]") {
  for (bool fast : {true, false})
    for (bool mask : {false, true}) {
      check_finite_differences(make_config(2, {}, fast), {2, 3, 4}, kLast, mask, 10);
      check_finite_differences(make_config(2, {}, fast), {2, 4, 3}, kFirst, mask, 20);
      check_finite_differences(make_config(2, {}, fast), {2, 2, 3, 4}, kLast, mask, 30);
      check_finite_differences(make_config(3, std::vector<int64_t>{0, 2, 3}, fast), {2, 3, 2, 6},
                               kLast, mask, 40);  // permuted
      check_finite_differences(make_config(2, std::vector<int64_t>{1}, fast), {2, 4, 3}, kFirst,
                               mask, 50);  // permuted, cells of S positions
    }
}

TEST_CASE("group norm: backward without scale or bias matches finite differences",
          "[group_norm][backward]") {
  GroupNormConfig c = make_config(2);
  c.use_scale = false;
  check_finite_differences(c, {2, 3, 4}, kLast, true, 60);
  c.use_scale = true;
  c.use_bias = false;
  check_finite_differences(c, {2, 4, 3}, kFirst, false, 61);
}

TEST_CASE("group norm: backward matches semantics 9 on larger shapes", "[group_norm][backward]") {
  struct Case {
    Shape shape;
    Layout layout;
    std::optional<std::vector<int64_t>> axes;
    int64_t groups;
  };
  const std::vector<Case> cases = {
      {{2, 6, 7, 32}, kLast, {}, 8},
      {{2, 32, 6, 7}, kFirst, {}, 8},
      {{2, 5, 4, 4, 32}, kLast, std::vector<int64_t>{0, 1, 3, 4}, 8},
      {{2, 5, 6, 16}, kLast, std::vector<int64_t>{1, 3}, 4},
      {{2, 16, 5, 6}, kFirst, std::vector<int64_t>{1, 3}, 4},
      {{4, 24}, kLast, {}, 3},
  };
  uint64_t seed = 700;
  for (const Case& c : cases)
    for (DType dtype : {DType::f32, DType::f64})
      for (bool with_mask : {false, true})
        for (bool fast : {true, false}) {
          ++seed;
          GroupNormConfig config = make_config(c.groups, c.axes, fast);
          GroupNorm layer(config);
          const distgn::Plan plan = layer.plan(c.shape, c.layout, dtype);
          std::vector<double> scale, bias;
          set_random_parameters(layer, plan.channels, seed, scale, bias);
          Array x(c.shape, dtype, c.layout,
                  random_values(distgn::element_count(c.shape), seed, 0.5, 2.0, dtype));
          Array dy(c.shape, dtype, c.layout, random_values(x.size(), seed + 1, 0, 1, dtype));
          std::vector<uint8_t> mask;
          MaskView m;
          if (with_mask) {
            mask = random_mask(x.size(), seed + 2, 0.8);
            m = MaskView{mask.data(), c.shape};
          }
          const Forward f = run_forward(layer, x, with_mask ? &m : nullptr);
          const Backward b = run_backward(layer, x, dy, with_mask ? &m : nullptr, f.state);
          const Reference ref = reference_forward(config, c.shape, c.layout, dtype, x.values(),
                                                  mask, scale, bias);
          const ReferenceGrad g = reference_backward(ref, x.values(), dy.values(), mask, scale);
          INFO(distgn::shape_string(c.shape) << " " << distgn::layout_name(c.layout) << " "
                                             << distgn::dtype_name(dtype) << " mask " << with_mask
                                             << (fast ? " fast" : " exact"));
          const double tol = dtype == DType::f64 ? 1e-11 : 2e-5;
          check_close(b.dx.values(), g.dx, tol, tol, "dx");
          // dscale and dbias are stored in the (float32) parameter dtype.
          const double ptol = std::max(tol, 1e-6);
          double sums = 1;
          for (double v : g.dscale) sums = std::max(sums, std::abs(v));
          for (double v : g.dbias) sums = std::max(sums, std::abs(v));
          check_close(b.dscale.values(), g.dscale, ptol * sums, ptol, "dscale");
          check_close(b.dbias.values(), g.dbias, ptol * sums, ptol, "dbias");
        }
}

TEST_CASE("group norm: dscale and dbias in bf16 parameters", "[group_norm][backward]") {
  GroupNormConfig config = make_config(4);
  config.param_dtype = DType::bf16;
  GroupNorm layer(config);
  std::vector<double> scale, bias;
  set_random_parameters(layer, 16, 33, scale, bias);
  const Shape shape{2, 5, 5, 16};
  Array x(shape, DType::f32, kLast, random_values(2 * 25 * 16, 34, 0, 1, DType::f32));
  Array dy(shape, DType::f32, kLast, random_values(x.size(), 35, 0, 1, DType::f32));
  const Forward f = run_forward(layer, x);
  const Backward b = run_backward(layer, x, dy, nullptr, f.state);
  REQUIRE(b.dscale.dtype == DType::bf16);
  const Reference ref = reference_forward(config, shape, kLast, DType::f32, x.values(), {}, scale, bias);
  const ReferenceGrad g = reference_backward(ref, x.values(), dy.values(), {}, scale);
  check_half_outputs(b.dscale.values(), g.dscale, DType::bf16, "dscale");
  check_half_outputs(b.dbias.values(), g.dbias, DType::bf16, "dbias");
  check_close(b.dx.values(), g.dx, 1e-5, 1e-4, "dx");
}

TEST_CASE("group norm: ParamGradReduction local, group and all agree on one rank",
          "[group_norm][backward]") {
  for (bool groups : {false, true}) {
    GroupNormConfig config = make_config(4);
    if (groups) config.axis_index_groups = std::vector<std::vector<int>>{{0}};
    GroupNorm layer(config);
    std::vector<double> scale, bias;
    set_random_parameters(layer, 16, 36, scale, bias);
    const Shape shape{2, 4, 4, 16};
    Array x(shape, DType::f32, kLast, random_values(2 * 16 * 16, 37, 0, 1, DType::f32));
    Array dy(shape, DType::f32, kLast, random_values(x.size(), 38, 0, 1, DType::f32));
    const Forward f = run_forward(layer, x);
    const Backward local = run_backward(layer, x, dy, nullptr, f.state, ParamGradReduction::local);
    const Backward group = run_backward(layer, x, dy, nullptr, f.state, ParamGradReduction::group);
    const Backward all = run_backward(layer, x, dy, nullptr, f.state, ParamGradReduction::all);
    for (const Backward* other : {&group, &all}) {
      CHECK(differing_bytes(other->dx.bytes, local.dx.bytes) == 0);
      CHECK(differing_bytes(other->dscale.bytes, local.dscale.bytes) == 0);
      CHECK(differing_bytes(other->dbias.bytes, local.dbias.bytes) == 0);
    }
    const Reference ref = reference_forward(config, shape, kLast, DType::f32, x.values(), {}, scale, bias);
    const ReferenceGrad g = reference_backward(ref, x.values(), dy.values(), {}, scale);
    check_close(local.dscale.values(), g.dscale, 1e-4, 1e-5, "dscale");
  }
}

// ---- validation through the layer ---------------------------------------------------------

TEST_CASE("group norm: semantics 2 errors come through forward, y untouched", "[group_norm][errors]") {
  const Shape shape{2, 4, 4, 32};
  Array x(shape, DType::f32, kLast, random_values(2 * 16 * 32, 1, 0, 1, DType::f32));
  Array y(shape, DType::f32);
  y.fill_bytes(0xAB);
  const std::vector<uint8_t> sentinel = y.bytes;
  {
    GroupNorm layer(make_config(7));
    CHECK(error_of([&] { layer.forward(x.view(), y.view()); }) ==
          "Number of groups (7) does not divide the number of channels (32).");
  }
  {
    GroupNormConfig c;
    c.num_groups.reset();
    c.group_size = 3;
    GroupNorm layer(c);
    CHECK(error_of([&] { layer.forward(x.view(), y.view()); }) ==
          "Number of channels (32) is not multiple of the group size (3).");
  }
  {
    GroupNorm layer(make_config(4, std::vector<int64_t>{1, 2}));
    CHECK(error_of([&] { layer.forward(x.view(), y.view()); }) ==
          "The reduction axes must include the final dimension as this is assumed to be the "
          "feature axis.");
  }
  {
    // Rule 4 is reported before a bad mask (rule 5).
    GroupNorm layer(make_config(7));
    const std::vector<uint8_t> mask(5, 1);
    const MaskView m{mask.data(), {5}};
    CHECK(error_of([&] { layer.forward(x.view(), y.view(), &m); }) ==
          "Number of groups (7) does not divide the number of channels (32).");
  }
  CHECK(differing_bytes(y.bytes, sentinel) == 0);
}

TEST_CASE("group norm: y of the wrong dtype or shape is an error naming both",
          "[group_norm][errors]") {
  GroupNorm layer(make_config(4));
  const Shape shape{2, 4, 4, 32};
  Array x(shape, DType::f32, kLast, random_values(2 * 16 * 32, 1, 0, 1, DType::f32));
  SECTION("dtype") {
    Array y(shape, DType::f16);
    y.fill_bytes(0xCD);
    const auto sentinel = y.bytes;
    const std::string e = error_of([&] { layer.forward(x.view(), y.view()); });
    INFO(e);
    CHECK(contains(e, "f16"));
    CHECK(contains(e, "f32"));
    CHECK(differing_bytes(y.bytes, sentinel) == 0);
  }
  SECTION("shape") {
    Array y({2, 4, 4, 16}, DType::f32);
    y.fill_bytes(0xCD);
    const auto sentinel = y.bytes;
    const std::string e = error_of([&] { layer.forward(x.view(), y.view()); });
    INFO(e);
    CHECK(contains(e, "(2, 4, 4, 16)"));
    CHECK(contains(e, "(2, 4, 4, 32)"));
    CHECK(differing_bytes(y.bytes, sentinel) == 0);
  }
  SECTION("layout") {
    Array y(shape, DType::f32, kFirst);
    y.fill_bytes(0xCD);
    const auto sentinel = y.bytes;
    CHECK_THROWS_AS(layer.forward(x.view(), y.view()), Error);
    CHECK(differing_bytes(y.bytes, sentinel) == 0);
  }
}

// Issue 13: a view whose bytes pass int64 is an error at validation, before
// anything is sized or read from it (2^57 x 32 float64 elements: 2^65 bytes).
TEST_CASE("group norm: a view whose byte size overflows int64 is an error", "[group_norm][errors]") {
  GroupNorm layer(make_config(4));
  std::vector<double> small(64);
  const Shape huge{int64_t(1) << 57, 32};
  const TensorView x{small.data(), huge, DType::f64, kLast};
  const TensorView y{small.data(), huge, DType::f64, kLast};
  const std::string e = error_of([&] { layer.forward(x, y); });
  INFO(e);
  CHECK(contains(e, "int64 overflow"));
}

TEST_CASE("group norm: mask shape errors name both shapes", "[group_norm][errors][mask]") {
  GroupNorm layer(make_config(4));
  const Shape shape{2, 4, 4, 32};
  Array x(shape, DType::f32, kLast, random_values(2 * 16 * 32, 1, 0, 1, DType::f32));
  Array y(shape, DType::f32);
  y.fill_bytes(0xEF);
  const auto sentinel = y.bytes;
  const std::vector<uint8_t> mask(2 * 4 * 4 * 32 * 2, 1);
  for (const Shape& bad : {Shape{2, 4, 4, 16}, Shape{2, 4, 4, 1}, Shape{3, 4, 4, 32},
                           Shape{2, 4, 2, 32}, Shape{1, 2, 4, 4, 32}, Shape{4, 32, 1}, Shape{}}) {
    const MaskView m{mask.data(), bad};
    const std::string e = error_of([&] { layer.forward(x.view(), y.view(), &m); });
    INFO("mask " << distgn::shape_string(bad) << ": " << e);
    CHECK(contains(e, distgn::shape_string(bad)));
    CHECK(contains(e, "(2, 4, 4, 32)"));
  }
  CHECK(differing_bytes(y.bytes, sentinel) == 0);

  // Channels first: the mask's feature axis is axis 1.
  const Shape nchw{2, 32, 4, 4};
  Array xf(nchw, DType::f32, kFirst, random_values(2 * 16 * 32, 1, 0, 1, DType::f32));
  Array yf(nchw, DType::f32, kFirst);
  for (const Shape& bad : {Shape{2, 1, 4, 4}, Shape{2, 4, 4, 32}}) {
    const MaskView m{mask.data(), bad};
    const std::string e = error_of([&] { layer.forward(xf.view(), yf.view(), &m); });
    INFO("mask " << distgn::shape_string(bad) << ": " << e);
    CHECK(contains(e, distgn::shape_string(bad)));
    CHECK(contains(e, "(2, 32, 4, 4)"));
  }
  // ...and a broadcast one is fine.
  const MaskView ok{mask.data(), {1, 32, 1, 1}};
  CHECK_NOTHROW(layer.forward(xf.view(), yf.view(), &ok));
}

TEST_CASE("group norm: scale or bias of the wrong shape is an error naming both shapes",
          "[group_norm][errors][params]") {
  GroupNorm layer(make_config(4));
  layer.init_parameters(32);
  const std::vector<uint8_t> before(static_cast<uint8_t*>(layer.parameters()),
                                    static_cast<uint8_t*>(layer.parameters()) + layer.parameter_bytes());
  Array s16({16}, DType::f32, kLast, std::vector<double>(16, 2.0));
  std::string e = error_of([&] { layer.set_scale(s16.view()); });
  INFO(e);
  CHECK(contains(e, "(16,)"));
  CHECK(contains(e, "(32,)"));
  Array s2d({32, 1}, DType::f32, kLast, std::vector<double>(32, 2.0));
  e = error_of([&] { layer.set_bias(s2d.view()); });
  INFO(e);
  CHECK(contains(e, "(32, 1)"));
  CHECK(contains(e, "(32,)"));
  const std::vector<uint8_t> after(static_cast<uint8_t*>(layer.parameters()),
                                   static_cast<uint8_t*>(layer.parameters()) + layer.parameter_bytes());
  CHECK(before == after);

  // Parameters of 16 channels on an input of 32.
  GroupNorm small(make_config(4));
  small.set_scale(s16.view());
  const Shape shape{2, 3, 32};
  Array x(shape, DType::f32, kLast, random_values(2 * 3 * 32, 1, 0, 1, DType::f32));
  Array y(shape, DType::f32);
  y.fill_bytes(0x11);
  const auto sentinel = y.bytes;
  e = error_of([&] { small.forward(x.view(), y.view()); });
  INFO(e);
  CHECK(contains(e, "(16,)"));
  CHECK(contains(e, "32"));
  CHECK(differing_bytes(y.bytes, sentinel) == 0);
}

TEST_CASE("group norm: backward rejects mismatched arrays, dx untouched", "[group_norm][errors]") {
  GroupNorm layer(make_config(4));
  const Shape shape{2, 4, 4, 16};
  Array x(shape, DType::f32, kLast, random_values(2 * 16 * 16, 1, 0, 1, DType::f32));
  const Forward f = run_forward(layer, x);
  Array dx(shape, DType::f32);
  dx.fill_bytes(0x5A);
  const auto sentinel = dx.bytes;
  Array dy_bad({2, 4, 4, 8}, DType::f32);
  std::string e = error_of([&] { layer.backward(x.view(), dy_bad.view(), nullptr, f.state, dx.view()); });
  INFO(e);
  CHECK(contains(e, "(2, 4, 4, 8)"));
  CHECK(contains(e, "(2, 4, 4, 16)"));
  Array dy(shape, DType::f32);
  Array dscale_bad({16}, DType::f16);
  TensorView ds = dscale_bad.view();
  CHECK_THROWS_AS(layer.backward(x.view(), dy.view(), nullptr, f.state, dx.view(), &ds), Error);
  Array dx_bad(shape, DType::f64);
  CHECK_THROWS_AS(layer.backward(x.view(), dy.view(), nullptr, f.state, dx_bad.view()), Error);
  CHECK(differing_bytes(dx.bytes, sentinel) == 0);
}

// ---- parameters ------------------------------------------------------------------------

TEST_CASE("group norm: parameters start from the initializers", "[group_norm][params]") {
  SECTION("ones and zeros by default, created on the first forward") {
    GroupNorm layer(make_config(4));
    CHECK(layer.channels() == 0);
    const Shape shape{2, 3, 16};
    Array x(shape, DType::f32, kLast, random_values(2 * 3 * 16, 1, 0, 1, DType::f32));
    run_forward(layer, x);
    CHECK(layer.channels() == 16);
    CHECK(view_values(layer.scale()) == std::vector<double>(16, 1.0));
    CHECK(view_values(layer.bias()) == std::vector<double>(16, 0.0));
  }
  SECTION("constant") {
    GroupNormConfig c = make_config(4);
    c.scale_init = Initializer::constant(0.375);
    c.bias_init = Initializer::constant(-2.5);
    GroupNorm layer(c);
    layer.init_parameters(8);
    CHECK(view_values(layer.scale()) == std::vector<double>(8, 0.375));
    CHECK(view_values(layer.bias()) == std::vector<double>(8, -2.5));
  }
  SECTION("normal and uniform are deterministic in the seed") {
    GroupNormConfig c = make_config(4);
    c.scale_init = Initializer::normal(0.5, 7);
    c.bias_init = Initializer::uniform(-2.0, 3.0, 11);
    GroupNorm a(c), b(c);
    a.init_parameters(4096);
    b.init_parameters(4096);
    REQUIRE(a.parameter_bytes() == 2 * 4096 * 4);
    CHECK(std::memcmp(a.parameters(), b.parameters(), a.parameter_bytes()) == 0);
    const std::vector<double> scale = view_values(a.scale()), bias = view_values(a.bias());
    // The layer's values are initialize()'s values.
    Array direct({4096}, DType::f32);
    distgn::initialize(c.scale_init, 4096, DType::f32, direct.bytes.data());
    CHECK(direct.values() == scale);
    // Statistics of the draws.
    double mean = 0, sq = 0;
    for (double v : scale) mean += v, sq += v * v;
    mean /= 4096;
    const double stddev = std::sqrt(sq / 4096 - mean * mean);
    CHECK(std::abs(mean) < 0.05);
    CHECK(stddev == Approx(0.5).epsilon(0.1));
    double lo = 1e9, hi = -1e9, bias_mean = 0;
    for (double v : bias) lo = std::min(lo, v), hi = std::max(hi, v), bias_mean += v / 4096;
    CHECK(lo >= -2.0);
    CHECK(hi < 3.0);
    CHECK(lo < -1.9);
    CHECK(hi > 2.9);
    CHECK(bias_mean == Approx(0.5).margin(0.1));
    // Another seed, other values.
    GroupNormConfig other = c;
    other.scale_init.seed = 8;
    other.bias_init.seed = 12;
    GroupNorm d(other);
    d.init_parameters(4096);
    CHECK(view_values(d.scale()) != scale);
    CHECK(view_values(d.bias()) != bias);
  }
}

TEST_CASE("group norm: the parameter buffer holds scale then bias", "[group_norm][params]") {
  for (DType dtype : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
    GroupNormConfig c = make_config(2);
    c.param_dtype = dtype;
    c.scale_init = Initializer::constant(2.0);
    c.bias_init = Initializer::constant(-3.0);
    GroupNorm layer(c);
    layer.init_parameters(8);
    INFO(distgn::dtype_name(dtype));
    REQUIRE(layer.parameter_bytes() == size_t(16 * distgn::dtype_size(dtype)));
    for (int i = 0; i < 16; ++i) CHECK(get_element(dtype, layer.parameters(), i) == (i < 8 ? 2.0 : -3.0));
    CHECK(layer.scale().data == layer.parameters());
    CHECK(static_cast<uint8_t*>(layer.bias().data) ==
          static_cast<uint8_t*>(layer.parameters()) + 8 * distgn::dtype_size(dtype));
    CHECK(layer.scale().dtype == dtype);
    CHECK(layer.scale().shape == Shape{8});

    // Only the parameters in use are in the buffer.
    c.use_scale = false;
    GroupNorm bias_only(c);
    bias_only.init_parameters(8);
    REQUIRE(bias_only.parameter_bytes() == size_t(8 * distgn::dtype_size(dtype)));
    for (int i = 0; i < 8; ++i) CHECK(get_element(dtype, bias_only.parameters(), i) == -3.0);
    CHECK_THROWS_AS(bias_only.scale(), Error);
  }
}

TEST_CASE("group norm: writes into the parameter buffer are what forward uses",
          "[group_norm][params]") {
  GroupNormConfig c = make_config(2);
  GroupNorm layer(c);
  layer.init_parameters(8);
  float* p = static_cast<float*>(layer.parameters());
  for (int i = 0; i < 8; ++i) p[i] = 0.5f + 0.25f * float(i);
  for (int i = 0; i < 8; ++i) p[8 + i] = -1.0f + float(i);
  const Shape shape{3, 5, 8};
  Array x(shape, DType::f32, kLast, random_values(3 * 5 * 8, 2, 0, 1, DType::f32));
  const Forward f = run_forward(layer, x);
  std::vector<double> scale(p, p + 8), bias(p + 8, p + 16);
  const Reference ref = reference_forward(c, shape, kLast, DType::f32, x.values(), {}, scale, bias);
  check_close(f.y.values(), ref.y, 1e-5, 1e-5, "y");
}

TEST_CASE("group norm: set_scale and set_bias round trip in bf16 parameters",
          "[group_norm][params]") {
  GroupNormConfig c = make_config(2);
  c.param_dtype = DType::bf16;
  GroupNorm layer(c);
  // Exactly representable values come back exactly, from any source dtype.
  const std::vector<double> exact = {1.5, -0.25, 3.0, 0.0078125, -96.0, 0.0, 1.0 + 1.0 / 64, 2.75};
  for (DType from : {DType::f32, DType::f64, DType::bf16, DType::f16}) {
    Array s({8}, from, kLast, exact);
    layer.set_scale(s.view());
    CHECK(view_values(layer.scale()) == exact);
    Array b({8}, from, kLast, exact);
    layer.set_bias(b.view());
    CHECK(view_values(layer.bias()) == exact);
  }
  // Others are rounded to nearest bf16, ties to even.
  Array s({8}, DType::f64, kLast,
          {1.0 + 1.0 / 256, 1.0 + 3.0 / 256, 1.0 / 3.0, -0.1, 1.0 + 1.0 / 512, 255.5, 1e-3, 7.0});
  layer.set_scale(s.view());
  const std::vector<double> got = view_values(layer.scale());
  CHECK(got[0] == 1.0);
  CHECK(got[1] == 1.0 + 4.0 / 256);
  CHECK(got[2] == double(distgn::to_float(distgn::to_bfloat16(float(1.0 / 3.0)))));
  CHECK(got[3] == double(distgn::to_float(distgn::to_bfloat16(-0.1f))));
  CHECK(got[4] == 1.0);
  CHECK(got[5] == 256.0);
  CHECK(got[7] == 7.0);
  // The bias is untouched by set_scale.
  CHECK(view_values(layer.bias()) == exact);
}

// ---- axis_index_groups and the communicator ---------------------------------------------

TEST_CASE("group norm: axis_index_groups on the local communicator", "[group_norm][comm]") {
  const std::string message = "axis_index_groups must cover all indices exactly once";
  auto with_groups = [](std::vector<std::vector<int>> groups) {
    GroupNormConfig c = make_config(4);
    c.axis_index_groups = std::move(groups);
    return c;
  };
  SECTION("[[0]] works like no groups") {
    GroupNorm grouped(with_groups({{0}}));
    GroupNorm plain(make_config(4));
    CHECK(grouped.group_communicator().size() == 1);
    const Shape shape{2, 3, 3, 16};
    Array x(shape, DType::f32, kLast, random_values(2 * 9 * 16, 3, 0, 1, DType::f32));
    CHECK(differing_bytes(run_forward(grouped, x).y.bytes, run_forward(plain, x).y.bytes) == 0);
  }
  SECTION("invalid partitions") {
    for (const auto& groups : std::vector<std::vector<std::vector<int>>>{
             {{0}, {0}}, {{1}}, {{0, 0}}, {}, {{-1}}, {{0, 1}}, {{0}, {1}}}) {
      CHECK(error_of([&] { GroupNorm layer(with_groups(groups)); }) == message);
    }
  }
}

TEST_CASE("group norm: a single-rank layer makes no collective per call", "[group_norm][comm]") {
  auto counting = std::make_shared<CountingCommunicator>(distgn::local_communicator());
  SECTION("the counter counts") {
    double values[3] = {1, 2, 3};
    counting->allreduce_sum(values, 3);
    CHECK(counting->counts().collectives == 1);
    CHECK(counting->counts().bytes == 24);
    auto part = counting->split(0, 0);
    part->allreduce_sum(values, 1);
    CHECK(counting->counts().collectives >= 2);  // the split's own collectives count here
    counting->reset();
    CHECK(counting->counts().collectives == 0);
  }
  for (bool groups : {false, true}) {
    GroupNormConfig c = make_config(4);
    if (groups) c.axis_index_groups = std::vector<std::vector<int>>{{0}};
    GroupNorm layer(c, counting);
    CHECK(&layer.communicator() == counting.get());
    counting->reset();
    const Shape shape{2, 4, 4, 16};
    Array x(shape, DType::f32, kLast, random_values(2 * 16 * 16, 4, 0, 1, DType::f32));
    Array dy(shape, DType::f32, kLast, random_values(x.size(), 5, 0, 1, DType::f32));
    for (int call = 0; call < 3; ++call) {
      const Forward f = run_forward(layer, x);
      for (auto reduction :
           {ParamGradReduction::local, ParamGradReduction::group, ParamGradReduction::all})
        run_backward(layer, x, dy, nullptr, f.state, reduction);
    }
    INFO("axis_index_groups " << groups);
    CHECK(counting->counts().collectives == 0);
  }
}

// ---- forward state ---------------------------------------------------------------

TEST_CASE("group norm: backward works from the state alone, on another instance",
          "[group_norm][backward]") {
  // docs/design.md: the saved state of a forward call is what backward needs. A
  // second layer with the same configuration and parameters (e.g. a restored
  // checkpoint) must give the same gradients from that state.
  GroupNormConfig config = make_config(4);
  GroupNorm a(config), b(config);
  std::vector<double> scale, bias, s2, b2;
  set_random_parameters(a, 16, 120, scale, bias);
  set_random_parameters(b, 16, 120, s2, b2);
  const Shape shape{2, 3, 3, 16};
  Array x(shape, DType::f32, kLast, random_values(2 * 9 * 16, 121, 0, 1, DType::f32));
  Array dy(shape, DType::f32, kLast, random_values(x.size(), 122, 0, 1, DType::f32));
  const Forward f = run_forward(a, x);
  const Backward from_a = run_backward(a, x, dy, nullptr, f.state);
  const Backward from_b = run_backward(b, x, dy, nullptr, f.state);
  check_close(from_b.dx.values(), from_a.dx.values(), 1e-6, 1e-6, "dx");
  const Reference ref = reference_forward(config, shape, kLast, DType::f32, x.values(), {}, scale, bias);
  const ReferenceGrad g = reference_backward(ref, x.values(), dy.values(), {}, scale);
  check_close(from_b.dx.values(), g.dx, 1e-5, 1e-4, "dx against semantics 9");
}

TEST_CASE("group norm: a ForwardState reused across layers holds the last layer's plan",
          "[group_norm][backward]") {
  // Two layers on the same input shape, one state object: backward of the
  // second layer must use the second layer's cells.
  const Shape shape{2, 4, 4, 16};
  Array x(shape, DType::f32, kLast, random_values(2 * 16 * 16, 130, 0, 1, DType::f32));
  Array dy(shape, DType::f32, kLast, random_values(x.size(), 131, 0, 1, DType::f32));
  SECTION("different number of cells") {
    GroupNorm first(make_config(4)), second(make_config(2));
    ForwardState shared, own;
    Array y1(shape, DType::f32), y2(shape, DType::f32), y3(shape, DType::f32);
    first.forward(x.view(), y1.view(), nullptr, &shared);
    second.forward(x.view(), y2.view(), nullptr, &shared);
    second.forward(x.view(), y3.view(), nullptr, &own);
    CHECK(shared.plan().num_groups == 2);
    Backward with_shared, with_own;
    CHECK_NOTHROW(with_shared = run_backward(second, x, dy, nullptr, shared));
    with_own = run_backward(second, x, dy, nullptr, own);
    CHECK(differing_bytes(with_shared.dx.bytes, with_own.dx.bytes) == 0);
  }
  SECTION("same number of cells, other cells") {
    // 2 samples x 4 groups = 8 cells; one slab of 8 groups = 8 cells.
    GroupNorm first(make_config(4)), second(make_config(8, std::vector<int64_t>{0, 1, 2, 3}));
    ForwardState shared, own;
    Array y1(shape, DType::f32), y2(shape, DType::f32), y3(shape, DType::f32);
    first.forward(x.view(), y1.view(), nullptr, &shared);
    second.forward(x.view(), y2.view(), nullptr, &shared);
    second.forward(x.view(), y3.view(), nullptr, &own);
    CHECK(shared.plan().num_groups == 8);
    CHECK(shared.plan().reduction_axes == own.plan().reduction_axes);
    const Backward with_shared = run_backward(second, x, dy, nullptr, shared);
    const Backward with_own = run_backward(second, x, dy, nullptr, own);
    CHECK(differing_bytes(with_shared.dx.bytes, with_own.dx.bytes) == 0);
  }
}
