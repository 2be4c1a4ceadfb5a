// The plan the backends run: a resolved Plan plus the order in which the
// kernels walk x's elements. Internal: a user sees the Plan alone (shapes,
// channels, groups, cells, dtypes); how the elements are walked is the
// backends' business and may change without changing the public API.
#pragma once

#include <cstdint>
#include <vector>

#include "distgn/config.hpp"

namespace distgn {

struct KernelPlan : Plan {
  // The element order the kernels walk, one of:
  //  - channel_rows: x is [outer][rows][row_width] with the channel axis last
  //    and innermost; column j belongs to cell outer * cells_per_row + j / S
  //    and channel j % C. (Channels-last, default reduction axes and kin.)
  //  - contiguous_cells: x is [num_cells][S][inner]; each cell is one
  //    contiguous run whose channel changes every `inner` elements.
  //    (Channels-first default and kin.)
  //  - Any other pattern is gathered into contiguous_cells order first
  //    (`permuted` is true, `permutation` lists the source axis of each
  //    gathered axis), a correct but slower path for rare reduction axes.
  enum class Form { channel_rows, contiguous_cells };
  Form form = Form::contiguous_cells;
  int64_t outer = 0, rows = 0, row_width = 0, cells_per_row = 0;  // channel_rows
  int64_t inner = 0;                                              // contiguous_cells
  bool permuted = false;
  Shape permuted_shape;          // shape after the gather, G split from S
  std::vector<int> permutation;  // axes of the split shape, in gathered order
  Shape split_shape;             // x's shape with the feature axis split (G, S)
};

// resolve() (distgn/config.hpp) with the walking order: the same validation
// and errors, the same Plan fields.
KernelPlan resolve_kernel_plan(const GroupNormConfig& config, const Shape& shape, Layout layout, DType input_dtype);

}  // namespace distgn
