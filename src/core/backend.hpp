// The steps a backend offers the layer's flow (src/core/group_norm.cpp, which
// runs them in the same order for host and device tensors). A backend owns
// the per-cell arrays of a call in its memory, host or device, and knows
// nothing of communicators: where the flow runs a collective between two
// steps, the payload is in host memory (CellMoments, per-cell and
// per-channel sums). Where a backend can fuse steps, for a group of one rank
// (no collective between them), it says so and the flow asks for the fused
// step instead: a capability, not a second flow.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/cell_stats.hpp"
#include "core/kernel_plan.hpp"
#include "distgn/config.hpp"
#include "distgn/error.hpp"
#include "distgn/tensor.hpp"

struct CUstream_st;

namespace distgn {

// A range of cells [begin, end). For the channel_rows form both ends are
// multiples of plan.cells_per_row (whole rows of cells).
struct CellRange {
  int64_t begin;
  int64_t end;
  int64_t size() const { return end - begin; }
};

// One rank's data for one call, in the plan's walking order (gathered when
// plan.permuted), on the backend's device. From Backend::inputs.
struct KernelInputs {
  const KernelPlan* plan;
  const void* x;        // plan->input_dtype
  const uint8_t* mask;  // one byte per element of x, or null (all valid)
  const void* dy;       // backward: dy in walking order, or null
  DType dy_dtype;
};

// The per-cell statistics of every cell, in host memory.
struct HostCellStatistics {
  std::vector<double> mean;   // in the stats dtype
  std::vector<double> rstd;   // rsqrt(var + epsilon) in the stats dtype
  std::vector<double> count;  // valid positions over the whole group
  std::vector<uint8_t> variance_clamped;  // the fast-variance clamp was hit: var has no gradient

  void resize(int64_t cells) {
    mean.resize(size_t(cells));
    rstd.resize(size_t(cells));
    count.resize(size_t(cells));
    variance_clamped.resize(size_t(cells));
  }
};

// What a forward call leaves for normalisation and for backward, per cell,
// in the memory of the backend that made it.
class CellStatistics {
 public:
  virtual ~CellStatistics() = default;
  virtual int64_t cells() const = 0;
  virtual Device device() const = 0;
  // The values in host memory: the arrays themselves on the host, a copy
  // (waiting for the device's work) otherwise.
  virtual const HostCellStatistics& host() const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // Device work of the following calls goes to this stream; host backends
  // have none and ignore it.
  virtual void set_stream(CUstream_st* stream) { (void)stream; }

  // ---- a call's arrays ------------------------------------------------------------------
  // x, the mask (broadcast to a byte per element) and dy in walking order.
  // The mask may be in host memory for a device backend.
  virtual KernelInputs inputs(const KernelPlan& plan, const void* x, const MaskView* mask, const void* dy,
                              DType dy_dtype) = 0;
  // Where the kernels write an output of `dtype`: `out`, or a walking-order
  // buffer that finish_output scatters into `out`.
  virtual void* output(const KernelPlan& plan, void* out, DType dtype) = 0;
  virtual void finish_output(const KernelPlan& plan, void* out, DType dtype) = 0;
  // The parameters as doubles in host memory (scale, bias: C values or null),
  // for the following steps.
  virtual void set_parameters(const KernelPlan& plan, const double* scale, const double* bias) = 0;

  // The blocks of cells the flow runs over: with `one_rank` (no collective
  // between the steps), blocks whose data stays in cache (host) or L2
  // (device) from one pass to the next; otherwise one block of every cell.
  // None when there is no cell.
  virtual std::vector<CellRange> blocks(const KernelPlan& plan, int bytes_per_element, bool one_rank) const = 0;

  // ---- forward ------------------------------------------------------------------------------
  // Per-cell arrays for `cells` cells: `held` itself when nobody else holds
  // it (a copied ForwardState keeps its values) and it fits, else new ones.
  virtual std::shared_ptr<CellStatistics> cell_statistics(std::shared_ptr<CellStatistics> held,
                                                          int64_t cells) = 0;
  // moments[cell] for the cells of `cells`: count, mean and M2 of this
  // rank's valid positions, in host memory (arrays over every plan cell).
  virtual void partial_stats(const KernelInputs& in, CellRange cells, CellMoments* moments) = 0;
  // The finalised statistics of `cells` (host values, arrays over every
  // plan cell) into `stats`.
  virtual void store_statistics(CellRange cells, const HostCellStatistics& values, CellStatistics& stats) = 0;
  // Capability: partial statistics finalised where they are made (the last
  // block of each cell on a GPU), for a group of one rank.
  virtual bool finalizes_statistics() const { return false; }
  virtual void finalized_statistics(const KernelInputs& in, CellRange cells, const FinalizeParams& finalize,
                                    CellStatistics& stats);
  // y = (x - mean) * (rstd * scale) + bias for the positions of `cells`.
  virtual void normalize(const KernelInputs& in, CellRange cells, const CellStatistics& stats, void* y,
                         DType y_dtype) = 0;

  // ---- backward -----------------------------------------------------------------------------
  // semantics §9's sums over the positions of `cells`, masked or not, in host
  // memory: cell_sums[2*cell] = A and [2*cell+1] = B (arrays over every plan
  // cell); channel_sums[c] += sum of dy and channel_sums[C + c] += sum of
  // dy * xhat.
  virtual void backward_sums(const KernelInputs& in, CellRange cells, const CellStatistics& stats,
                             double* cell_sums, double* channel_sums) = 0;
  // The cells' dx terms (cell_terms) from their sums over the group.
  virtual void store_terms(CellRange cells, const double* cell_sums, const CellStatistics& stats) = 0;
  // Capability: the sums and the terms in one step, for a group of one rank;
  // the channel sums add up in the backend's memory over the calls of one
  // backward (`first` starts them) until param_grads reads them.
  virtual bool finalizes_terms() const { return false; }
  virtual void sums_and_terms(const KernelInputs& in, CellRange cells, const CellStatistics& stats, bool first);
  // dx = rstd * (g - m * (a + xhat * b)) for the positions of `cells`, from
  // the stored terms; dx has the input dtype.
  virtual void input_grad(const KernelInputs& in, CellRange cells, const CellStatistics& stats, void* dx) = 0;
  // dbias = channel sums [0, C), dscale = [C, 2C), into device outputs (null:
  // not asked for, or in host memory, which the flow writes), from
  // `channel_sums` in host memory or, when null, from the sums that
  // sums_and_terms added up; `to_host` (2C doubles, or null) receives those.
  virtual void param_grads(const double* channel_sums, int64_t channels, void* dscale, void* dbias,
                           DType param_dtype, double* to_host);
};

// The capabilities a backend does not have: the flow asks only where
// finalizes_statistics() / finalizes_terms() say yes, and param_grads only
// for device outputs.
inline void Backend::finalized_statistics(const KernelInputs&, CellRange, const FinalizeParams&, CellStatistics&) {
  throw Error("internal: this backend does not finalise statistics itself");
}
inline void Backend::sums_and_terms(const KernelInputs&, CellRange, const CellStatistics&, bool) {
  throw Error("internal: this backend does not make the terms with the sums");
}
inline void Backend::param_grads(const double*, int64_t, void*, void*, DType, double*) {
  throw Error("internal: this backend has no device memory for dscale and dbias");
}

}  // namespace distgn
