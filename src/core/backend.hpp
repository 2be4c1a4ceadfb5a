// The kernels a backend provides. They see one rank's data in the plan's
// walking order and know nothing of communicators: the layer (group_norm.cpp)
// runs the collective between them.
#pragma once

#include <cstdint>

#include "core/cell_stats.hpp"
#include "distgn/config.hpp"

namespace distgn {

// A range of cells [begin, end). For the channel_rows form both ends are
// multiples of plan.cells_per_row (whole rows of cells).
struct CellRange {
  int64_t begin;
  int64_t end;
  int64_t size() const { return end - begin; }
};

// One rank's data for one call, in the plan's walking order (gathered first
// when plan.permuted). Pointers are on the backend's device.
struct KernelInputs {
  const Plan* plan;
  const void* x;        // plan->input_dtype
  const uint8_t* mask;  // one byte per element of x, or null (all valid)
};

// Per-cell statistics and per-channel parameters the elementwise kernels
// apply. Arrays are on the backend's device.
struct Coefficients {
  DType compute_dtype;  // f32 or f64: the arithmetic of semantics §6 and §9
  const double* mean;   // per cell, in the stats dtype
  const double* rstd;   // per cell
  const double* scale;  // per channel, or null (use_scale = false)
  const double* bias;   // per channel, or null (use_bias = false)
};

class Backend {
 public:
  virtual ~Backend() = default;

  // moments[cell] = count, mean and M2 of the valid positions of each cell
  // of `cells` on this rank. Arrays indexed by cell cover all plan cells.
  virtual void partial_stats(const KernelInputs& in, CellRange cells, CellMoments* moments) = 0;

  // y = (x - mean) * (rstd * scale) + bias for the positions of `cells`,
  // stored as y_dtype.
  virtual void normalize(const KernelInputs& in, CellRange cells, const Coefficients& coef,
                         void* y, DType y_dtype) = 0;

  // semantics §9's sums for the positions of `cells`, over all positions, masked
  // or not: cell_sums[2*cell] = A and [2*cell+1] = B;
  // channel_sums[c] += sum of dy and channel_sums[C + c] += sum of dy*xhat.
  virtual void backward_sums(const KernelInputs& in, const void* dy, DType dy_dtype,
                             CellRange cells, const Coefficients& coef, double* cell_sums,
                             double* channel_sums) = 0;

  // dx = rstd * (g - m * (a + xhat * b)) with g = dy * scale, where
  // cell_terms[2*cell] = a = A/n and [2*cell+1] = b = B/n (0 without a variance
  // gradient), indexed like cell_sums. dx has the input dtype.
  virtual void input_grad(const KernelInputs& in, const void* dy, DType dy_dtype, CellRange cells,
                          const Coefficients& coef, const double* cell_terms, void* dx) = 0;

  // Copies `src` (plan.split_shape, row-major) into plan.permutation order
  // (gather), or back (scatter). Elements of `element_bytes` bytes.
  virtual void permute(const Plan& plan, const void* src, void* dst, int element_bytes,
                       bool gather) = 0;
};

}  // namespace distgn
