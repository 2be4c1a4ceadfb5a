// Walking-order index maps of a plan (host side): where the element at
// walking-order index i of x lives in x itself, and where its mask byte lives
// in a mask that broadcasts to x. The CUDA gather/scatter and mask kernels
// evaluate these maps per element; tests/cuda/test_cuda_geometry.cpp checks
// them against the CPU backend's permute and the layer's mask broadcast.
#pragma once

#include <string>

#include "cuda/geometry.hpp"
#include "core/kernel_plan.hpp"
#include "distgn/config.hpp"
#include "distgn/error.hpp"

namespace distgn {
namespace cuda {

// The split shape's axes in walking order: plan.permutation, or all of them.
inline std::vector<int> walking_axes(const KernelPlan& plan) {
  if (plan.permuted) return plan.permutation;
  std::vector<int> axes(plan.split_shape.size());
  for (size_t d = 0; d < axes.size(); ++d) axes[d] = int(d);
  return axes;
}

inline StridedIndex map_over_split(const KernelPlan& plan, const std::vector<int64_t>& split_strides) {
  const std::vector<int> axes = walking_axes(plan);
  if (axes.size() > size_t(kMaxRank))
    throw Error("the CUDA backend supports inputs of rank up to " + std::to_string(kMaxRank - 1) +
                ", got rank " + std::to_string(plan.shape.size()));
  StridedIndex map;
  map.rank = int(axes.size());
  for (size_t d = 0; d < axes.size(); ++d) {
    map.extent[d] = plan.split_shape[size_t(axes[d])];
    map.stride[d] = split_strides[size_t(axes[d])];
  }
  return map;
}

// Walking index -> element offset in x (row-major over plan.shape).
inline StridedIndex walking_source_map(const KernelPlan& plan) {
  std::vector<int64_t> strides(plan.split_shape.size());
  int64_t s = 1;
  for (size_t d = strides.size(); d-- > 0;) {
    strides[d] = s;
    s *= plan.split_shape[d];
  }
  return map_over_split(plan, strides);
}

// Walking index -> byte offset in a mask of `mask_shape` (numpy broadcasting
// to plan.shape, already validated by the layer).
inline StridedIndex walking_mask_map(const KernelPlan& plan, const Shape& mask_shape) {
  const size_t rank = plan.shape.size(), lead = rank - mask_shape.size();
  std::vector<int64_t> x_strides(rank, 0);
  int64_t s = 1;
  for (size_t d = rank; d-- > lead;) {
    const int64_t extent = mask_shape[d - lead];
    x_strides[d] = extent == 1 ? 0 : s;
    s *= extent;
  }
  std::vector<int64_t> split;  // x's axes with the feature axis as (G, S)
  for (size_t d = 0; d < rank; ++d) {
    if (int(d) == plan.feature_axis) {
      split.push_back(x_strides[d] * plan.group_size);
      split.push_back(x_strides[d]);
    } else {
      split.push_back(x_strides[d]);
    }
  }
  return map_over_split(plan, split);
}

}  // namespace cuda
}  // namespace distgn
