// The CPU backend: the Backend steps of core/backend.hpp for host tensors.
// This file holds the class (the steps, the walking order of a call's
// arrays, the dispatch on dtype and form, the scratch it owns); the kernels
// are in cpu/rows_kernels.hpp (Plan::Form::channel_rows) and
// cpu/cells_kernels.hpp (contiguous_cells), over chunks of a cell range
// (cpu/chunks.hpp) so that results do not depend on the thread count.
// Partial sums run in float over small blocks and accumulate in double (see
// cpu/tuning.hpp); the elementwise arithmetic (cpu/formulas.hpp) runs in the
// plan's compute dtype (semantics §6, §9).
#include <omp.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "core/backend.hpp"
#include "core/dtype_dispatch.hpp"
#include "core/equal_parts.hpp"
#include "cpu/cells_kernels.hpp"
#include "cpu/chunks.hpp"
#include "cpu/cpu_backend.hpp"
#include "cpu/formulas.hpp"
#include "cpu/rows_kernels.hpp"
#include "cpu/tuning.hpp"

namespace distgn {
namespace {

using cpu::Coefficients;
using cpu::kFusedBlockElements;

// The mask expanded to one byte per element of x (numpy broadcasting).
void broadcast_mask(const Plan& plan, const MaskView& mask, std::vector<uint8_t>& out) {
  const Shape& x = plan.shape;
  const size_t rank = x.size(), lead = rank - mask.shape.size();
  std::vector<int64_t> stride(rank, 0);
  int64_t s = 1;
  for (size_t d = rank; d-- > lead;) {
    stride[d] = mask.shape[d - lead] == 1 ? 0 : s;
    s *= mask.shape[d - lead];
  }
  const int64_t total = element_count(x);
  out.resize(size_t(total));
  std::vector<int64_t> index(rank, 0);
  for (int64_t e = 0; e < total; ++e) {
    int64_t offset = 0;
    for (size_t d = 0; d < rank; ++d) offset += index[d] * stride[d];
    out[size_t(e)] = mask.data[offset] ? 1 : 0;
    for (size_t d = rank; d-- > 0;) {
      if (++index[d] < x[d]) break;
      index[d] = 0;
    }
  }
}

// The per-cell statistics of a host forward: the host arrays themselves.
class HostCells final : public CellStatistics {
 public:
  int64_t cells() const override { return cells_; }
  Device device() const override { return Device::cpu; }
  const HostCellStatistics& host() const override { return values_; }
  HostCellStatistics& values() { return values_; }
  void set_cells(int64_t cells) {
    cells_ = cells;
    values_.resize(cells);
  }

 private:
  int64_t cells_ = 0;
  HostCellStatistics values_;
};

class CpuBackend final : public Backend {
 public:
  // ---- a call's arrays ----------------------------------------------------------------

  KernelInputs inputs(const Plan& p, const void* x, const MaskView* mask, const void* dy, DType dy_dtype) override {
    KernelInputs in{&p, walking_order(p, x, dtype_size(p.input_dtype), x_gathered_), nullptr,
                    dy ? walking_order(p, dy, dtype_size(dy_dtype), dy_gathered_) : nullptr, dy_dtype};
    if (mask) {
      const uint8_t* full = mask->data;
      if (mask->shape != p.shape) {
        broadcast_mask(p, *mask, mask_full_);
        full = mask_full_.data();
      }
      in.mask = static_cast<const uint8_t*>(walking_order(p, full, 1, mask_gathered_));
    }
    return in;
  }
  void* output(const Plan& p, void* out, DType dtype) override {
    if (!p.permuted) return out;
    out_gathered_.resize(size_t(byte_size(p.shape, dtype)));
    return out_gathered_.data();
  }
  void finish_output(const Plan& p, void* out, DType dtype) override {
    if (p.permuted) permute_on_host(p, out_gathered_.data(), out, dtype_size(dtype), false);
  }
  void set_parameters(const Plan&, const double* scale, const double* bias) override {
    scale_ = scale;
    bias_ = bias;
  }

  // Blocks of about kFusedBlockElements elements (whole cells, whole rows of
  // cells for channel_rows), so that a block is still in cache when the
  // second pass reads it.
  std::vector<CellRange> blocks(const Plan& p, int, bool one_rank) const override {
    std::vector<CellRange> out;
    if (p.num_cells == 0) return out;
    if (!one_rank) return {{0, p.num_cells}};
    const int64_t unit = p.form == Plan::Form::channel_rows ? p.cells_per_row : 1;
    const int64_t unit_elements = std::max<int64_t>(1, unit * p.cell_elements);
    const int64_t per_block =
        equal_parts(p.num_cells / unit, std::max<int64_t>(1, kFusedBlockElements / unit_elements)).size * unit;
    for (int64_t begin = 0; begin < p.num_cells; begin += per_block)
      out.push_back({begin, std::min(p.num_cells, begin + per_block)});
    return out;
  }

  // ---- forward ------------------------------------------------------------------------------

  std::shared_ptr<CellStatistics> cell_statistics(std::shared_ptr<CellStatistics> held, int64_t cells) override {
    std::shared_ptr<HostCells> mine = std::dynamic_pointer_cast<HostCells>(held);
    if (!mine || mine.use_count() > 2) mine = std::make_shared<HostCells>();  // `held` and `mine`
    mine->set_cells(cells);
    return mine;
  }

  void partial_stats(const KernelInputs& in, CellRange cells, CellMoments* moments) override {
    with_storage_type(in.plan->input_dtype, [&](auto tag) {
      using T = decltype(tag);
      // The block sums' type: float unless the data or the statistics are
      // float64 (then a value of x - shift must not round to float).
      with_compute_type(in.plan->input_dtype == DType::f64 || in.plan->stats_dtype == DType::f64 ? DType::f64
                                                                                                : DType::f32,
                        [&](auto a_tag) {
        using A = decltype(a_tag);
        if (in.plan->form == Plan::Form::channel_rows)
          cpu::stats_rows<T, A>(scratch_, in, cells, moments);
        else
          cpu::stats_contiguous<T, A>(scratch_, in, cells, moments);
      });
    });
  }

  void store_statistics(CellRange cells, const HostCellStatistics& values, CellStatistics& stats) override {
    HostCellStatistics& to = static_cast<HostCells&>(stats).values();
    const auto copy = [&](const auto& from, auto& into) {
      std::copy(from.begin() + cells.begin, from.begin() + cells.end, into.begin() + cells.begin);
    };
    copy(values.mean, to.mean);
    copy(values.rstd, to.rstd);
    copy(values.count, to.count);
    copy(values.variance_clamped, to.variance_clamped);
  }

  void normalize(const KernelInputs& in, CellRange cells, const CellStatistics& stats, void* y,
                 DType y_dtype) override {
    const Coefficients coef = coefficients(*in.plan, stats, bias_);
    with_storage_type(in.plan->input_dtype, [&](auto x_tag) {
      with_storage_type(y_dtype, [&](auto y_tag) {
        with_compute_type(coef.compute_dtype, [&](auto c_tag) {
          using T = decltype(x_tag);
          using Y = decltype(y_tag);
          using C = decltype(c_tag);
          if (in.plan->form == Plan::Form::channel_rows)
            cpu::normalize_rows<T, Y, C>(scratch_, in, cells, coef, static_cast<Y*>(y));
          else
            cpu::normalize_contiguous<T, Y, C>(scratch_, in, cells, coef, static_cast<Y*>(y));
        });
      });
    });
  }

  // ---- backward -----------------------------------------------------------------------------

  void backward_sums(const KernelInputs& in, CellRange cells, const CellStatistics& stats, double* cell_sums,
                     double* channel_sums) override {
    const Coefficients coef = coefficients(*in.plan, stats, nullptr);
    with_storage_type(in.plan->input_dtype, [&](auto x_tag) {
      with_storage_type(in.dy_dtype, [&](auto dy_tag) {
        with_compute_type(coef.compute_dtype, [&](auto c_tag) {
          using T = decltype(x_tag);
          using D = decltype(dy_tag);
          using C = decltype(c_tag);
          if (in.plan->form == Plan::Form::channel_rows)
            cpu::backward_sums_rows<T, D, C>(scratch_, in, static_cast<const D*>(in.dy), cells, coef, cell_sums,
                                             channel_sums);
          else
            cpu::backward_sums_contiguous<T, D, C>(scratch_, in, static_cast<const D*>(in.dy), cells, coef,
                                                   cell_sums, channel_sums);
        });
      });
    });
  }

  void store_terms(CellRange cells, const double* cell_sums, const CellStatistics& stats) override {
    const HostCellStatistics& s = stats.host();
    terms_.resize(2 * s.count.size());
    for (int64_t cell = cells.begin; cell < cells.end; ++cell) {
      const CellTerms t = cell_terms(cell_sums[2 * cell], cell_sums[2 * cell + 1], s.count[size_t(cell)],
                                     s.variance_clamped[size_t(cell)]);
      terms_[size_t(2 * cell)] = t.a;
      terms_[size_t(2 * cell + 1)] = t.b;
    }
  }

  void input_grad(const KernelInputs& in, CellRange cells, const CellStatistics& stats, void* dx) override {
    const Coefficients coef = coefficients(*in.plan, stats, nullptr);
    const double* cell_terms = terms_.data();
    with_storage_type(in.plan->input_dtype, [&](auto x_tag) {
      with_storage_type(in.dy_dtype, [&](auto dy_tag) {
        with_compute_type(coef.compute_dtype, [&](auto c_tag) {
          using T = decltype(x_tag);
          using D = decltype(dy_tag);
          using C = decltype(c_tag);
          if (in.plan->form == Plan::Form::channel_rows)
            cpu::input_grad_rows<T, D, C>(scratch_, in, static_cast<const D*>(in.dy), cells, coef, cell_terms,
                                          static_cast<T*>(dx));
          else
            cpu::input_grad_contiguous<T, D, C>(scratch_, in, static_cast<const D*>(in.dy), cells, coef,
                                                cell_terms, static_cast<T*>(dx));
        });
      });
    });
  }

 private:
  // Per-thread and per-call scratch of the kernels.
  cpu::Scratch scratch_;
  // The call's parameters (the layer's host doubles) and dx terms.
  const double* scale_ = nullptr;
  const double* bias_ = nullptr;
  std::vector<double> terms_;
  // Walking-order copies of the call's arrays (plan.permuted) and the mask
  // broadcast to x's shape.
  std::vector<uint8_t> x_gathered_, dy_gathered_, mask_full_, mask_gathered_, out_gathered_;

  Coefficients coefficients(const Plan& p, const CellStatistics& stats, const double* bias) const {
    const HostCellStatistics& s = stats.host();
    return {p.compute_dtype, s.mean.data(), s.rstd.data(), scale_, bias};
  }
  // `data` (the plan's shape) in walking order: itself, or gathered into `buffer`.
  const void* walking_order(const Plan& p, const void* data, int element_bytes, std::vector<uint8_t>& buffer) {
    if (!p.permuted) return data;
    buffer.resize(size_t(element_count(p.shape) * element_bytes));
    permute_on_host(p, data, buffer.data(), element_bytes, true);
    return buffer.data();
  }
};

}  // namespace

void permute_on_host(const Plan& plan, const void* src, void* dst, int element_bytes, bool gather) {
  // Walk the gathered order; for each gathered index find the source offset.
  const int rank = int(plan.permutation.size());
  std::vector<int64_t> source_stride(plan.split_shape.size());
  int64_t stride = 1;
  for (int d = int(plan.split_shape.size()) - 1; d >= 0; --d) {
    source_stride[size_t(d)] = stride;
    stride *= plan.split_shape[size_t(d)];
  }
  const int64_t total = stride;
  if (total == 0) return;
  std::vector<int64_t> gathered_stride(static_cast<size_t>(rank));
  for (int d = 0; d < rank; ++d) gathered_stride[size_t(d)] = source_stride[size_t(plan.permutation[size_t(d)])];
  // The innermost gathered axis is copied as a strided run.
  const int64_t run = plan.permuted_shape[size_t(rank - 1)];
  const int64_t run_stride = gathered_stride[size_t(rank - 1)];
  const int64_t runs = total / run;
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<uint8_t*>(dst);
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < runs; ++k) {
    int64_t rest = k, offset = 0;
    for (int d = rank - 2; d >= 0; --d) {
      const int64_t extent = plan.permuted_shape[size_t(d)];
      offset += (rest % extent) * gathered_stride[size_t(d)];
      rest /= extent;
    }
    for (int64_t e = 0; e < run; ++e) {
      const int64_t s = (offset + e * run_stride) * element_bytes, g = (k * run + e) * element_bytes;
      if (gather) std::copy(in + s, in + s + element_bytes, out + g);
      else std::copy(in + g, in + g + element_bytes, out + s);
    }
  }
}

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace distgn
