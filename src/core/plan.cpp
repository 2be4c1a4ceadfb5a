// resolve(): semantics §2's validation in its order, §3's cells and §5's dtypes,
// and the element order the kernels walk.
#include <algorithm>
#include <string>

#include "core/kernel_plan.hpp"
#include "distgn/config.hpp"
#include "distgn/error.hpp"

namespace distgn {
namespace {

bool is_half(DType t) { return t == DType::f16 || t == DType::bf16; }

// jnp.promote_types for the floating dtypes distgn stores.
DType promote(DType a, DType b) {
  if (a == b) return a;
  if (a == DType::f64 || b == DType::f64) return DType::f64;
  return DType::f32;  // f32 with anything narrower, or f16 with bf16
}

std::vector<int64_t> canonical_reduction_axes(const GroupNormConfig& config, int rank,
                                              int feature_axis) {
  std::vector<int64_t> axes;
  if (config.reduction_axes) {
    for (int64_t a : *config.reduction_axes) {
      if (a < -rank || a >= rank)
        throw Error("reduction axis " + std::to_string(a) + " is out of range for an input of rank " +
                    std::to_string(rank));
      axes.push_back(a < 0 ? a + rank : a);
    }
  } else {
    for (int a = 1; a < rank; ++a) axes.push_back(a);
    axes.push_back(feature_axis);  // rank 1: the feature axis is axis 0
  }
  std::sort(axes.begin(), axes.end());
  axes.erase(std::unique(axes.begin(), axes.end()), axes.end());
  return axes;
}

int64_t resolve_num_groups(const GroupNormConfig& config, int64_t channels) {
  if (config.num_groups.has_value() == config.group_size.has_value())
    throw Error(
        "Either `num_groups` or `group_size` should be specified. If `group_size` is to be "
        "specified, pass `num_groups=None` as argument to override the default `num_groups` "
        "value of 32.");
  int64_t groups;
  if (config.group_size) {
    const int64_t size = *config.group_size;
    if (size <= 0 || channels % size != 0)
      throw Error("Number of channels (" + std::to_string(channels) +
                  ") is not multiple of the group size (" + std::to_string(size) + ").");
    groups = channels / size;
  } else {
    groups = *config.num_groups;
  }
  if (groups <= 0 || channels % groups != 0)
    throw Error("Number of groups (" + std::to_string(groups) +
                ") does not divide the number of channels (" + std::to_string(channels) + ").");
  return groups;
}

// A run of adjacent split dimensions that are all kept or all reduced.
struct Block {
  bool kept;
  int64_t extent;
};

// Fills the plan's walking order. The split shape is x's shape with the
// feature axis replaced by (G, S); G is kept, S reduced.
void choose_form(KernelPlan& plan, const std::vector<bool>& split_reduced) {
  const Shape& split = plan.split_shape;
  const int split_g = plan.feature_axis;  // index of G in the split shape
  std::vector<Block> blocks;
  for (size_t d = 0; d < split.size(); ++d) {
    // Extent-1 axes do not change the order; G and S keep their places.
    const bool structural = int(d) == split_g || int(d) == split_g + 1;
    if (split[d] == 1 && !structural) continue;
    const bool kept = !split_reduced[d];
    if (!blocks.empty() && blocks.back().kept == kept)
      blocks.back().extent *= split[d];
    else
      blocks.push_back({kept, split[d]});
  }
  const bool last = plan.layout == Layout::channels_last;
  if (blocks.size() == 2 && blocks[0].kept) {
    plan.form = KernelPlan::Form::contiguous_cells;
    plan.inner = plan.group_size ? plan.cell_elements / plan.group_size : 0;
    return;
  }
  if (last && !blocks.back().kept && (blocks.size() == 3 || blocks.size() == 4)) {
    // [K]?[R][K][R=S]: rows of kept columns, the channel axis innermost.
    const size_t first_reduced = blocks.size() - 3;
    plan.form = KernelPlan::Form::channel_rows;
    plan.outer = first_reduced ? blocks[0].extent : 1;
    plan.rows = blocks[first_reduced].extent;
    plan.cells_per_row = blocks[first_reduced + 1].extent;
    plan.row_width = plan.cells_per_row * plan.group_size;
    return;
  }
  // Gather into [kept axes..., G][S][other reduced axes...]: contiguous cells.
  plan.permuted = true;
  plan.form = KernelPlan::Form::contiguous_cells;
  plan.inner = plan.group_size ? plan.cell_elements / plan.group_size : 0;
  for (int d = 0; d < int(split.size()); ++d)
    if (!split_reduced[d] && d != split_g) plan.permutation.push_back(d);
  plan.permutation.push_back(split_g);
  plan.permutation.push_back(split_g + 1);
  for (int d = 0; d < int(split.size()); ++d)
    if (split_reduced[d] && d != split_g + 1) plan.permutation.push_back(d);
  for (int d : plan.permutation) plan.permuted_shape.push_back(split[d]);
}

}  // namespace

DType stats_dtype(const GroupNormConfig& config, DType input_dtype) {
  const DType base = config.dtype.value_or(input_dtype);
  return config.force_float32_reductions && is_half(base) ? DType::f32 : base;
}

DType output_dtype(const GroupNormConfig& config, DType input_dtype) {
  if (config.dtype) return *config.dtype;
  if (config.use_scale || config.use_bias) return promote(input_dtype, config.param_dtype);
  return input_dtype;
}

KernelPlan resolve_kernel_plan(const GroupNormConfig& config, const Shape& shape, Layout layout,
                               DType input_dtype) {
  const int rank = int(shape.size());
  const int min_rank = layout == Layout::channels_last ? 1 : 2;
  if (rank < min_rank)
    throw Error("x of shape " + shape_string(shape) + " has no feature axis: " +
                (layout == Layout::channels_last ? "channels-last input needs rank >= 1"
                                                 : "channels-first input needs rank >= 2"));
  for (int64_t d : shape)
    if (d < 0) throw Error("x has a negative dimension: " + shape_string(shape));
  // Throws when the extents multiply past int64; the cell and element counts
  // below are products of some of them, so they cannot overflow after this.
  element_count(shape);

  KernelPlan plan;
  plan.shape = shape;
  plan.layout = layout;
  plan.feature_axis = layout == Layout::channels_last ? rank - 1 : 1;
  plan.reduction_axes = canonical_reduction_axes(config, rank, plan.feature_axis);
  if (!std::binary_search(plan.reduction_axes.begin(), plan.reduction_axes.end(),
                          int64_t(plan.feature_axis)))
    throw Error(
        "The reduction axes must include the final dimension as this is assumed to be the "
        "feature axis.");

  plan.channels = shape[plan.feature_axis];
  plan.num_groups = resolve_num_groups(config, plan.channels);
  plan.group_size = plan.channels / plan.num_groups;
  plan.input_dtype = input_dtype;
  plan.stats_dtype = stats_dtype(config, input_dtype);
  plan.output_dtype = output_dtype(config, input_dtype);
  const bool params_in_use = config.use_scale || config.use_bias;
  plan.compute_dtype =
      plan.stats_dtype == DType::f64 || plan.output_dtype == DType::f64 ||
              (params_in_use && config.param_dtype == DType::f64)
          ? DType::f64
          : DType::f32;

  std::vector<bool> split_reduced;
  plan.num_cells = 1;
  plan.cell_elements = 1;
  for (int d = 0; d < rank; ++d) {
    if (d == plan.feature_axis) {
      plan.split_shape.push_back(plan.num_groups);
      plan.split_shape.push_back(plan.group_size);
      split_reduced.push_back(false);
      split_reduced.push_back(true);
      plan.num_cells *= plan.num_groups;
      plan.cell_elements *= plan.group_size;
      continue;
    }
    const bool reduced =
        std::binary_search(plan.reduction_axes.begin(), plan.reduction_axes.end(), int64_t(d));
    plan.split_shape.push_back(shape[d]);
    split_reduced.push_back(reduced);
    (reduced ? plan.cell_elements : plan.num_cells) *= shape[d];
  }
  choose_form(plan, split_reduced);
  return plan;
}

Plan resolve(const GroupNormConfig& config, const Shape& shape, Layout layout, DType input_dtype) {
  return resolve_kernel_plan(config, shape, layout, input_dtype);
}

}  // namespace distgn
