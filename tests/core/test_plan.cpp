// Tests of distgn::resolve (semantics §2's validation and §3's cells), stats_dtype
// and output_dtype (semantics §5): the messages a user sees, in semantics §2's order of
// precedence, and the plan the kernels walk.
#include <catch2/catch.hpp>

#include <optional>
#include <string>
#include <vector>

#include "core/kernel_plan.hpp"
#include "distgn/config.hpp"
#include "distgn/error.hpp"

using distgn::DType;
using distgn::Error;
using distgn::GroupNormConfig;
using distgn::Layout;
using distgn::KernelPlan;
using distgn::Plan;
using distgn::resolve_kernel_plan;
using distgn::Shape;
using distgn::resolve;

namespace {

const std::string kFeatureAxisMessage =
    "The reduction axes must include the final dimension as this is assumed to be the feature "
    "axis.";
const std::string kEitherMessage =
    "Either `num_groups` or `group_size` should be specified. If `group_size` is to be "
    "specified, pass `num_groups=None` as argument to override the default `num_groups` value "
    "of 32.";

std::string group_size_message(int64_t channels, int64_t size) {
  return "Number of channels (" + std::to_string(channels) + ") is not multiple of the group size (" +
         std::to_string(size) + ").";
}

std::string num_groups_message(int64_t groups, int64_t channels) {
  return "Number of groups (" + std::to_string(groups) +
         ") does not divide the number of channels (" + std::to_string(channels) + ").";
}

// The message resolve() raises, or "" when it accepts the configuration.
std::string resolve_error(const GroupNormConfig& config, const Shape& shape,
                          Layout layout = Layout::channels_last, DType dtype = DType::f32) {
  try {
    resolve(config, shape, layout, dtype);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

GroupNormConfig with_groups(std::optional<int64_t> groups, std::optional<int64_t> size = {}) {
  GroupNormConfig c;
  c.num_groups = groups;
  c.group_size = size;
  return c;
}

GroupNormConfig with_axes(std::vector<int64_t> axes, int64_t groups = 4) {
  GroupNormConfig c;
  c.num_groups = groups;
  c.reduction_axes = std::move(axes);
  return c;
}

}  // namespace

// ---- semantics §2 rule 1: the reduction axes must contain the feature axis -------

TEST_CASE("plan: reduction axes without the feature axis are rejected (channels last)", "[plan]") {
  const Shape shape{2, 4, 4, 32};
  CHECK(resolve_error(with_axes({1, 2}), shape) == kFeatureAxisMessage);
  CHECK(resolve_error(with_axes({0, 1, 2}), shape) == kFeatureAxisMessage);
  CHECK(resolve_error(with_axes({1}), shape) == kFeatureAxisMessage);
  // -2 is axis 2, not the feature axis.
  CHECK(resolve_error(with_axes({-2, -3}), shape) == kFeatureAxisMessage);
  // The empty list reduces nothing, not even the feature axis.
  CHECK(resolve_error(with_axes({}), shape) == kFeatureAxisMessage);
  // -1 is the feature axis.
  CHECK(resolve_error(with_axes({1, 2, -1}), shape) == "");
  CHECK(resolve_error(with_axes({3}), shape) == "");
}

TEST_CASE("plan: reduction axes without the feature axis are rejected (channels first)",
          "[plan]") {
  const Shape shape{2, 32, 4, 4};
  const Layout first = Layout::channels_first;
  // The last axis is not the feature axis in N, C, H, W.
  CHECK(resolve_error(with_axes({2, 3}), shape, first) == kFeatureAxisMessage);
  CHECK(resolve_error(with_axes({-1}), shape, first) == kFeatureAxisMessage);
  CHECK(resolve_error(with_axes({0, 2, 3}), shape, first) == kFeatureAxisMessage);
  CHECK(resolve_error(with_axes({1, 2, 3}), shape, first) == "");
  CHECK(resolve_error(with_axes({-3, -2, -1}), shape, first) == "");
  CHECK(resolve_error(with_axes({1}), shape, first) == "");
  // The default (all axes but 0) includes axis 1.
  CHECK(resolve_error(with_groups(4), shape, first) == "");
}

TEST_CASE("plan: an out-of-range reduction axis is an error", "[plan]") {
  const Shape shape{2, 4, 4, 32};
  CHECK_THROWS_AS(resolve(with_axes({1, 2, 3, 4}), shape, Layout::channels_last, DType::f32),
                  Error);
  CHECK_THROWS_AS(resolve(with_axes({-5, 3}), shape, Layout::channels_last, DType::f32), Error);
  CHECK_THROWS_AS(resolve(with_axes({1, 100}), shape, Layout::channels_first, DType::f32), Error);
  // The bounds themselves are fine.
  CHECK(resolve_error(with_axes({-4, 3}), shape) == "");
  // The message is not one of semantics §2's rule messages.
  const std::string message = resolve_error(with_axes({1, 2, 3, 4}), shape);
  CHECK(message != "");
  CHECK(message != kFeatureAxisMessage);
}

TEST_CASE("plan: reduction axes are canonicalised (negatives, duplicates, order)", "[plan]") {
  const Shape shape{2, 3, 5, 8};
  const Plan plan =
      resolve(with_axes({-1, 1, -3, 3, 2, -2}), shape, Layout::channels_last, DType::f32);
  CHECK(plan.reduction_axes == std::vector<int64_t>{1, 2, 3});

  const Plan defaults = resolve(with_groups(4), shape, Layout::channels_last, DType::f32);
  CHECK(defaults.reduction_axes == std::vector<int64_t>{1, 2, 3});
  // The same axes spelt differently give the same cells.
  CHECK(plan.num_cells == defaults.num_cells);
  CHECK(plan.cell_elements == defaults.cell_elements);

  const Plan first =
      resolve(with_axes({3, -3, 2, 1}), {2, 8, 3, 5}, Layout::channels_first, DType::f32);
  CHECK(first.reduction_axes == std::vector<int64_t>{1, 2, 3});
}

// ---- semantics §2 rule 2: exactly one of num_groups / group_size ------------------

TEST_CASE("plan: both or neither of num_groups and group_size is an error", "[plan]") {
  const Shape shape{2, 4, 4, 32};
  CHECK(resolve_error(with_groups(4, 8), shape) == kEitherMessage);
  CHECK(resolve_error(with_groups(std::nullopt, std::nullopt), shape) == kEitherMessage);
  // Only one set is fine either way.
  CHECK(resolve_error(with_groups(4), shape) == "");
  CHECK(resolve_error(with_groups(std::nullopt, 8), shape) == "");
  // The default config (num_groups = 32) plus a group_size is "both".
  GroupNormConfig defaults;
  defaults.group_size = 8;
  CHECK(resolve_error(defaults, shape) == kEitherMessage);
}

// ---- semantics §2 rule 3: the group_size path -------------------------------------

TEST_CASE("plan: group_size must divide the number of channels", "[plan]") {
  CHECK(resolve_error(with_groups(std::nullopt, 3), {2, 4, 4, 32}) == group_size_message(32, 3));
  CHECK(resolve_error(with_groups(std::nullopt, 3), {2, 4, 4, 32}) ==
        "Number of channels (32) is not multiple of the group size (3).");
  CHECK(resolve_error(with_groups(std::nullopt, 64), {2, 32}) == group_size_message(32, 64));
  CHECK(resolve_error(with_groups(std::nullopt, 5), {2, 12, 3}, Layout::channels_first) ==
        group_size_message(12, 5));
  CHECK(resolve_error(with_groups(std::nullopt, 4), {2, 12, 3}, Layout::channels_first) == "");
}

TEST_CASE("plan: group_size <= 0 is the group size error", "[plan]") {
  CHECK(resolve_error(with_groups(std::nullopt, 0), {2, 4, 32}) == group_size_message(32, 0));
  CHECK(resolve_error(with_groups(std::nullopt, -4), {2, 4, 32}) == group_size_message(32, -4));
  CHECK(resolve_error(with_groups(std::nullopt, -32), {2, 4, 32}) == group_size_message(32, -32));
}

// ---- semantics §2 rule 4: the num_groups path -------------------------------------

TEST_CASE("plan: num_groups must divide the number of channels", "[plan]") {
  CHECK(resolve_error(with_groups(7), {2, 4, 4, 32}) == num_groups_message(7, 32));
  CHECK(resolve_error(with_groups(7), {2, 4, 4, 32}) ==
        "Number of groups (7) does not divide the number of channels (32).");
  CHECK(resolve_error(with_groups(64), {2, 32}) == num_groups_message(64, 32));
  // The Flax default of 32 groups on 48 channels.
  CHECK(resolve_error(GroupNormConfig{}, {1, 48}) == num_groups_message(32, 48));
  CHECK(resolve_error(with_groups(5), {2, 12, 3}, Layout::channels_first) ==
        num_groups_message(5, 12));
}

TEST_CASE("plan: num_groups <= 0 is the number of groups error", "[plan]") {
  CHECK(resolve_error(with_groups(0), {2, 4, 32}) == num_groups_message(0, 32));
  CHECK(resolve_error(with_groups(-4), {2, 4, 32}) == num_groups_message(-4, 32));
}

// ---- semantics §2: the order of precedence ----------------------------------------

TEST_CASE("plan: errors are reported in the semantics 2 order of precedence", "[plan]") {
  const Shape shape{2, 4, 4, 32};
  SECTION("rule 1 before rule 2") {
    GroupNormConfig c = with_axes({1, 2});
    c.group_size = 8;  // both set
    CHECK(resolve_error(c, shape) == kFeatureAxisMessage);
    c.num_groups.reset();
    c.group_size.reset();  // neither set
    CHECK(resolve_error(c, shape) == kFeatureAxisMessage);
  }
  SECTION("rule 1 before rules 3 and 4") {
    GroupNormConfig c = with_axes({1, 2}, 7);
    CHECK(resolve_error(c, shape) == kFeatureAxisMessage);
    c.num_groups.reset();
    c.group_size = 3;
    CHECK(resolve_error(c, shape) == kFeatureAxisMessage);
    c.group_size = 0;
    CHECK(resolve_error(c, shape) == kFeatureAxisMessage);
  }
  SECTION("rule 1 before rule 4, channels first") {
    GroupNormConfig c = with_axes({2, 3}, 7);
    CHECK(resolve_error(c, {2, 32, 4, 4}, Layout::channels_first) == kFeatureAxisMessage);
  }
  SECTION("rule 2 before rules 3 and 4") {
    // Both set, and each alone would be invalid.
    CHECK(resolve_error(with_groups(7, 3), shape) == kEitherMessage);
    CHECK(resolve_error(with_groups(0, 0), shape) == kEitherMessage);
    CHECK(resolve_error(with_groups(-1, 5), shape) == kEitherMessage);
  }
}

// ---- semantics §5: dtypes ---------------------------------------------------------

TEST_CASE("plan: stats dtype promotes half inputs to float32 with force_float32_reductions",
          "[plan][dtype]") {
  GroupNormConfig c;
  REQUIRE(c.force_float32_reductions);
  CHECK(distgn::stats_dtype(c, DType::f16) == DType::f32);
  CHECK(distgn::stats_dtype(c, DType::bf16) == DType::f32);
  CHECK(distgn::stats_dtype(c, DType::f32) == DType::f32);
  CHECK(distgn::stats_dtype(c, DType::f64) == DType::f64);

  c.force_float32_reductions = false;
  CHECK(distgn::stats_dtype(c, DType::f16) == DType::f16);
  CHECK(distgn::stats_dtype(c, DType::bf16) == DType::bf16);
  CHECK(distgn::stats_dtype(c, DType::f32) == DType::f32);
  CHECK(distgn::stats_dtype(c, DType::f64) == DType::f64);
}

TEST_CASE("plan: the dtype field overrides the input dtype for the stats dtype",
          "[plan][dtype]") {
  GroupNormConfig c;
  c.dtype = DType::f16;
  CHECK(distgn::stats_dtype(c, DType::f32) == DType::f32);  // forced up to f32
  CHECK(distgn::stats_dtype(c, DType::f64) == DType::f32);  // dtype, not x, decides
  c.force_float32_reductions = false;
  CHECK(distgn::stats_dtype(c, DType::f32) == DType::f16);
  CHECK(distgn::stats_dtype(c, DType::f64) == DType::f16);
  c.dtype = DType::bf16;
  CHECK(distgn::stats_dtype(c, DType::f32) == DType::bf16);
  c.dtype = DType::f64;
  CHECK(distgn::stats_dtype(c, DType::f16) == DType::f64);
  c.force_float32_reductions = true;
  CHECK(distgn::stats_dtype(c, DType::bf16) == DType::f64);
  c.dtype = DType::f32;
  CHECK(distgn::stats_dtype(c, DType::f64) == DType::f32);
}

TEST_CASE("plan: output dtype promotes x with the parameters in use", "[plan][dtype]") {
  GroupNormConfig c;  // param_dtype f32, scale and bias in use
  CHECK(distgn::output_dtype(c, DType::bf16) == DType::f32);
  CHECK(distgn::output_dtype(c, DType::f16) == DType::f32);
  CHECK(distgn::output_dtype(c, DType::f32) == DType::f32);
  CHECK(distgn::output_dtype(c, DType::f64) == DType::f64);

  c.param_dtype = DType::bf16;
  CHECK(distgn::output_dtype(c, DType::bf16) == DType::bf16);
  CHECK(distgn::output_dtype(c, DType::f16) == DType::f32);  // f16 with bf16 -> f32
  CHECK(distgn::output_dtype(c, DType::f32) == DType::f32);
  c.param_dtype = DType::f16;
  CHECK(distgn::output_dtype(c, DType::bf16) == DType::f32);  // bf16 with f16 -> f32
  CHECK(distgn::output_dtype(c, DType::f16) == DType::f16);
  c.param_dtype = DType::f64;
  CHECK(distgn::output_dtype(c, DType::f16) == DType::f64);

  // Only one parameter in use still promotes.
  c.param_dtype = DType::f32;
  c.use_scale = false;
  CHECK(distgn::output_dtype(c, DType::bf16) == DType::f32);
  c.use_scale = true;
  c.use_bias = false;
  CHECK(distgn::output_dtype(c, DType::bf16) == DType::f32);

  // Without scale and bias the parameters play no part.
  c.use_scale = false;
  CHECK(distgn::output_dtype(c, DType::bf16) == DType::bf16);
  CHECK(distgn::output_dtype(c, DType::f16) == DType::f16);
  c.param_dtype = DType::f64;
  CHECK(distgn::output_dtype(c, DType::f32) == DType::f32);
}

TEST_CASE("plan: a set dtype field wins for the output dtype", "[plan][dtype]") {
  GroupNormConfig c;
  c.dtype = DType::bf16;
  CHECK(distgn::output_dtype(c, DType::f32) == DType::bf16);
  CHECK(distgn::output_dtype(c, DType::f64) == DType::bf16);
  c.dtype = DType::f16;
  c.param_dtype = DType::f64;
  CHECK(distgn::output_dtype(c, DType::f32) == DType::f16);
  c.dtype = DType::f32;
  c.use_scale = c.use_bias = false;
  CHECK(distgn::output_dtype(c, DType::bf16) == DType::f32);
}

TEST_CASE("plan: resolve fills the dtypes of semantics 5", "[plan][dtype]") {
  GroupNormConfig c = with_groups(4);
  Plan p = resolve(c, {2, 4, 8}, Layout::channels_last, DType::bf16);
  CHECK(p.input_dtype == DType::bf16);
  CHECK(p.stats_dtype == DType::f32);
  CHECK(p.output_dtype == DType::f32);
  c.use_scale = c.use_bias = false;
  c.force_float32_reductions = false;
  p = resolve(c, {2, 4, 8}, Layout::channels_last, DType::bf16);
  CHECK(p.stats_dtype == DType::bf16);
  CHECK(p.output_dtype == DType::bf16);
  p = resolve(c, {2, 4, 8}, Layout::channels_last, DType::f64);
  CHECK(p.stats_dtype == DType::f64);
  CHECK(p.output_dtype == DType::f64);
  CHECK(p.compute_dtype == DType::f64);
}

// ---- semantics §3: cells ----------------------------------------------------------

TEST_CASE("plan: default reduction axes give N*G cells (channels last)", "[plan][cells]") {
  const KernelPlan p = resolve_kernel_plan(with_groups(8), {3, 5, 7, 32}, Layout::channels_last, DType::f32);
  CHECK(p.feature_axis == 3);
  CHECK(p.channels == 32);
  CHECK(p.num_groups == 8);
  CHECK(p.group_size == 4);
  CHECK(p.num_cells == 3 * 8);
  CHECK(p.cell_elements == 5 * 7 * 4);
  CHECK(p.split_shape == Shape{3, 5, 7, 8, 4});
}

TEST_CASE("plan: group_size resolves the number of groups", "[plan][cells]") {
  const KernelPlan p =
      resolve_kernel_plan(with_groups(std::nullopt, 8), {3, 5, 32}, Layout::channels_last, DType::f32);
  CHECK(p.num_groups == 4);
  CHECK(p.group_size == 8);
  CHECK(p.num_cells == 3 * 4);
  CHECK(p.cell_elements == 5 * 8);
}

TEST_CASE("plan: default reduction axes give N*G cells (channels first)", "[plan][cells]") {
  const KernelPlan p = resolve_kernel_plan(with_groups(8), {3, 32, 5, 7}, Layout::channels_first, DType::f32);
  CHECK(p.feature_axis == 1);
  CHECK(p.channels == 32);
  CHECK(p.group_size == 4);
  CHECK(p.reduction_axes == std::vector<int64_t>{1, 2, 3});
  CHECK(p.num_cells == 3 * 8);
  CHECK(p.cell_elements == 4 * 5 * 7);
  CHECK(p.split_shape == Shape{3, 8, 4, 5, 7});
}

TEST_CASE("plan: custom reduction axes set the cells", "[plan][cells]") {
  SECTION("keep a spatial axis") {
    // (N, H, W, C) reducing H and C: cells are (n, w, g).
    const KernelPlan p = resolve_kernel_plan(with_axes({1, 3}), {2, 5, 6, 16}, Layout::channels_last, DType::f32);
    CHECK(p.num_cells == 2 * 6 * 4);
    CHECK(p.cell_elements == 5 * 4);
  }
  SECTION("reduce the batch too") {
    const KernelPlan p =
        resolve_kernel_plan(with_axes({0, 1, 2, 3}), {2, 5, 6, 16}, Layout::channels_last, DType::f32);
    CHECK(p.num_cells == 4);
    CHECK(p.cell_elements == 2 * 5 * 6 * 4);
  }
  SECTION("only the feature axis") {
    const KernelPlan p = resolve_kernel_plan(with_axes({-1}), {2, 5, 6, 16}, Layout::channels_last, DType::f32);
    CHECK(p.num_cells == 2 * 5 * 6 * 4);
    CHECK(p.cell_elements == 4);
  }
  SECTION("channels first, keep the batch and one spatial axis") {
    const KernelPlan p =
        resolve_kernel_plan(with_axes({1, 3}), {2, 16, 5, 6}, Layout::channels_first, DType::f32);
    CHECK(p.num_cells == 2 * 5 * 4);
    CHECK(p.cell_elements == 4 * 6);
  }
  SECTION("rank 2 and rank 1") {
    const KernelPlan p2 = resolve_kernel_plan(with_groups(4), {3, 16}, Layout::channels_last, DType::f32);
    CHECK(p2.num_cells == 3 * 4);
    CHECK(p2.cell_elements == 4);
    const KernelPlan p1 = resolve_kernel_plan(with_groups(4), {16}, Layout::channels_last, DType::f32);
    CHECK(p1.num_cells == 4);
    CHECK(p1.cell_elements == 4);
  }
}

TEST_CASE("plan: the walking form follows the layout and the reduction axes", "[plan][cells]") {
  SECTION("NHWC default: channel rows") {
    const KernelPlan p = resolve_kernel_plan(with_groups(8), {3, 5, 7, 32}, Layout::channels_last, DType::f32);
    CHECK(p.form == KernelPlan::Form::channel_rows);
    CHECK_FALSE(p.permuted);
    CHECK(p.outer == 3);
    CHECK(p.rows == 5 * 7);
    CHECK(p.cells_per_row == 8);
    CHECK(p.row_width == 32);
  }
  SECTION("NCHW default: contiguous cells") {
    const KernelPlan p = resolve_kernel_plan(with_groups(8), {3, 32, 5, 7}, Layout::channels_first, DType::f32);
    CHECK(p.form == KernelPlan::Form::contiguous_cells);
    CHECK_FALSE(p.permuted);
    CHECK(p.inner == 5 * 7);
  }
  SECTION("(2,5,4,4,32) reducing (0,1,3,4): permuted") {
    const KernelPlan p =
        resolve_kernel_plan(with_axes({0, 1, 3, 4}, 8), {2, 5, 4, 4, 32}, Layout::channels_last, DType::f32);
    CHECK(p.permuted);
    CHECK(p.form == KernelPlan::Form::contiguous_cells);
    CHECK(p.num_cells == 4 * 8);
    CHECK(p.cell_elements == 2 * 5 * 4 * 4);
    // Gathered as [kept axes..., G][S][other reduced axes...].
    CHECK(p.permuted_shape == Shape{4, 8, 4, 2, 5, 4});
    CHECK(p.inner == p.cell_elements / p.group_size);
  }
  SECTION("NHWC reducing everything: one row slab") {
    const KernelPlan p =
        resolve_kernel_plan(with_axes({0, 1, 2, 3}), {2, 5, 6, 16}, Layout::channels_last, DType::f32);
    CHECK(p.form == KernelPlan::Form::channel_rows);
    CHECK_FALSE(p.permuted);
    CHECK(p.outer == 1);
    CHECK(p.rows == 2 * 5 * 6);
    CHECK(p.cells_per_row == 4);
  }
  SECTION("rank 2 channels last: contiguous cells") {
    const KernelPlan p = resolve_kernel_plan(with_groups(4), {3, 16}, Layout::channels_last, DType::f32);
    CHECK(p.form == KernelPlan::Form::contiguous_cells);
    CHECK_FALSE(p.permuted);
  }
  SECTION("NCHW reducing only C: permuted") {
    const KernelPlan p = resolve_kernel_plan(with_axes({1}), {2, 16, 5, 6}, Layout::channels_first, DType::f32);
    CHECK(p.permuted);
    CHECK(p.num_cells == 2 * 5 * 6 * 4);
    CHECK(p.cell_elements == 4);
  }
}

TEST_CASE("plan: shape errors are distgn errors", "[plan]") {
  CHECK_THROWS_AS(resolve(with_groups(1), {}, Layout::channels_last, DType::f32), Error);
  CHECK_THROWS_AS(resolve(with_groups(1), {4}, Layout::channels_first, DType::f32), Error);
  CHECK_THROWS_AS(resolve(with_groups(1), {2, -4}, Layout::channels_last, DType::f32), Error);
}

// Issue 13: the cell and element counts multiplied the extents unchecked
// (signed overflow, undefined behaviour) for (2^32, 2^32, 8).
TEST_CASE("plan: a shape whose extents multiply past int64 is an error, not an overflow", "[plan][cells]") {
  const int64_t big = int64_t(1) << 32;
  CHECK_THROWS_WITH(resolve(with_groups(2), {big, big, 8}, Layout::channels_last, DType::f32),
                    Catch::Contains("int64 overflow"));
  CHECK_THROWS_WITH(resolve(with_groups(2), {big, 8, big, 0}, Layout::channels_first, DType::f32),
                    Catch::Contains("int64 overflow"));
}
