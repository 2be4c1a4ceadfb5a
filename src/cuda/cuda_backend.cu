// The CUDA backend: the steps of core/backend.hpp around the kernels of
// launch.hpp (walking order, workspace, waves, staging to and from the host).
#include "cuda/cuda_backend.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>

#include "cuda/cuda_check.hpp"
#include "cuda/device_memory.hpp"
#include "cuda/index_maps.hpp"
#include "cuda/launch.hpp"

namespace distgn {
namespace {

using cuda::CellStateView;
using cuda::SumPair;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Grow-only device scratch. Growing waits for the stream (the old block may
// still be in use by queued kernels).
class Scratch {
 public:
  // At least `bytes`; with `zeroed`, newly allocated memory is zero (and
  // whatever callers leave zero stays so).
  void* get(size_t bytes, cudaStream_t stream, bool zeroed = false) {
    if (bytes <= array_.bytes() && array_.data()) return array_.data();
    if (array_.data()) {
      DISTGN_CUDA_CHECK(cudaStreamSynchronize(stream));
      array_ = cuda::DeviceArray();
    }
    array_ = cuda::DeviceArray(std::max<size_t>(256, bytes + bytes / 4));
    if (zeroed) DISTGN_CUDA_CHECK(cudaMemsetAsync(array_.data(), 0, array_.bytes(), stream));
    return array_.data();
  }
  template <class T>
  T* get_as(size_t count, cudaStream_t stream, bool zeroed = false) {
    return static_cast<T*>(get(count * sizeof(T), stream, zeroed));
  }

 private:
  cuda::DeviceArray array_;
};

// Grow-only pinned host memory.
class Pinned {
 public:
  // Callers make sure no copy still reads or writes the old block.
  uint8_t* get(size_t bytes) {
    if (bytes <= array_.bytes() && array_.data()) return array_.data();
    array_ = cuda::PinnedArray();
    array_ = cuda::PinnedArray(std::max<size_t>(4096, bytes + bytes / 4));
    return array_.data();
  }

 private:
  cuda::PinnedArray array_;
};

// The per-cell statistics of a device forward: mean, rstd, count and
// clamped (1.0 / 0.0), `cells` doubles each, in one allocation.
class DeviceCells final : public CellStatistics {
 public:
  DeviceCells(int device, int64_t capacity)
      : device_(device), capacity_(std::max<int64_t>(capacity, 1)),
        array_(size_t(4 * capacity_) * sizeof(double)) {}

  int64_t cells() const override { return cells_; }
  Device device() const override { return Device::cuda; }
  const HostCellStatistics& host() const override {
    if (!host_valid_) {
      DISTGN_CUDA_CHECK(cudaStreamSynchronize(stream_));
      std::vector<double> all(size_t(4 * cells_));
      if (!all.empty())
        DISTGN_CUDA_CHECK(cudaMemcpy(all.data(), array_.data(), all.size() * sizeof(double), cudaMemcpyDeviceToHost));
      const auto n = std::ptrdiff_t(cells_);
      host_.mean.assign(all.begin(), all.begin() + n);
      host_.rstd.assign(all.begin() + n, all.begin() + 2 * n);
      host_.count.assign(all.begin() + 2 * n, all.begin() + 3 * n);
      host_.variance_clamped.resize(size_t(n));
      for (std::ptrdiff_t i = 0; i < n; ++i) host_.variance_clamped[size_t(i)] = all[size_t(3 * n + i)] != 0.0;
      host_valid_ = true;
    }
    return host_;
  }

  int device_index() const { return device_; }
  int64_t capacity() const { return capacity_; }
  // Starts a call's use for `cells` cells, written on `stream`.
  void begin(int64_t cells, cudaStream_t stream) {
    cells_ = cells;
    stream_ = stream;
    host_valid_ = false;
  }
  CellStateView view() const {
    double* d = static_cast<double*>(array_.data());
    return {d, d + cells_, d + 2 * cells_, d + 3 * cells_};
  }

 private:
  int device_;
  int64_t capacity_;
  int64_t cells_ = 0;
  cuda::DeviceArray array_;       // 4 * capacity doubles
  cudaStream_t stream_ = nullptr;  // of the last call that wrote it
  mutable HostCellStatistics host_;
  mutable bool host_valid_ = false;
};

// Host copies of the arrays to upload, staged in pinned memory. A staging
// block is reused only after the copies that read it have finished.
class Uploader {
 public:
  explicit Uploader(cudaStream_t& stream) : stream_(stream) { DISTGN_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming)); }
  ~Uploader() {
    if (done_) cudaEventDestroy(done_);
  }
  Uploader(const Uploader&) = delete;
  Uploader& operator=(const Uploader&) = delete;
  void begin(size_t bytes) {
    if (pending_) DISTGN_CUDA_CHECK(cudaEventSynchronize(done_));
    pending_ = false;
    base_ = pinned_.get(bytes + 64 * 8);
    offset_ = 0;
  }
  void copy(void* device, const void* host, size_t bytes) {
    if (!bytes) return;
    std::memcpy(base_ + offset_, host, bytes);
    DISTGN_CUDA_CHECK(cudaMemcpyAsync(device, base_ + offset_, bytes, cudaMemcpyHostToDevice, stream_));
    offset_ += (bytes + 63) / 64 * 64;
  }
  void end() {
    DISTGN_CUDA_CHECK(cudaEventRecord(done_, stream_));
    pending_ = true;
  }

 private:
  cudaStream_t& stream_;
  Pinned pinned_;
  cudaEvent_t done_ = nullptr;
  bool pending_ = false;
  uint8_t* base_ = nullptr;
  size_t offset_ = 0;
};

// Device arrays to copy to host memory: queued, then one synchronisation.
class Downloader {
 public:
  explicit Downloader(cudaStream_t& stream) : stream_(stream) {}
  void begin(size_t bytes) {
    base_ = pinned_.get(bytes + 64 * 8);
    offset_ = 0;
    items_.clear();
  }
  void copy(void* host, const void* device, size_t bytes) {
    if (!bytes) return;
    DISTGN_CUDA_CHECK(cudaMemcpyAsync(base_ + offset_, device, bytes, cudaMemcpyDeviceToHost, stream_));
    items_.push_back({host, offset_, bytes});
    offset_ += (bytes + 63) / 64 * 64;
  }
  void finish() {
    DISTGN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    for (const Item& i : items_) std::memcpy(i.host, base_ + i.offset, i.bytes);
    items_.clear();
  }

 private:
  struct Item {
    void* host;
    size_t offset;
    size_t bytes;
  };
  cudaStream_t& stream_;
  Pinned pinned_;
  uint8_t* base_ = nullptr;
  size_t offset_ = 0;
  std::vector<Item> items_;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(cudaStream_t stream) : stream_(stream), up_(stream_), down_(stream_) {
    DISTGN_CUDA_CHECK(cudaGetDevice(&device_));
    DISTGN_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device_));
    int l2 = 0;
    DISTGN_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device_));
    l2_bytes_ = l2;
  }

  void set_stream(CUstream_st* stream) override {
    if (stream == stream_) return;
    // Work queued on the old stream may still read the workspace.
    DISTGN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    stream_ = stream;
  }

  // ---- a call's arrays ----------------------------------------------------------------

  KernelInputs inputs(const KernelPlan& p, const void* x, const MaskView* mask, const void* dy, DType dy_dtype) override {
    return {&p, walking(p, x, dtype_size(p.input_dtype), x_walk_), walking_mask(p, mask),
            dy ? walking(p, dy, dtype_size(dy_dtype), dy_walk_) : nullptr, dy_dtype};
  }
  void* output(const KernelPlan& p, void* out, DType dtype) override {
    return p.permuted ? out_walk_.get(size_t(byte_size(p.shape, dtype)), stream_) : out;
  }
  void finish_output(const KernelPlan& p, void* out, DType dtype) override {
    const int64_t elements = element_count(p.shape);
    if (p.permuted && elements > 0)
      cuda::permute(stream_, cuda::walking_source_map(p), elements, dtype_size(dtype), out_walk_.get(0, stream_),
                    out, false);
  }
  void set_parameters(const KernelPlan& p, const double* scale, const double* bias) override {
    upload_parameters(p.channels, scale, bias, bias != nullptr);
    has_scale_ = scale != nullptr;
    has_bias_ = bias != nullptr;
  }
  std::vector<CellRange> blocks(const KernelPlan& p, int bytes_per_element, bool one_rank) const override {
    if (p.num_cells == 0) return {};
    if (!one_rank) return {{0, p.num_cells}};
    return waves(p, bytes_per_element);
  }

  // ---- forward ------------------------------------------------------------------------------

  std::shared_ptr<CellStatistics> cell_statistics(std::shared_ptr<CellStatistics> held, int64_t cells) override {
    std::shared_ptr<DeviceCells> mine = std::dynamic_pointer_cast<DeviceCells>(held);
    // `held` and `mine` are two holders; a third is a copy that keeps its values.
    if (!mine || mine.use_count() > 2 || mine->device_index() != device_ || mine->capacity() < cells)
      mine = std::make_shared<DeviceCells>(device_, cells);
    mine->begin(cells, stream_);
    return mine;
  }

  void partial_stats(const KernelInputs& in, CellRange cells, CellMoments* moments) override {
    const KernelPlan& p = *in.plan;
    CellMoments* device = moments_.get_as<CellMoments>(size_t(p.num_cells), stream_);
    stats(p, in.x, in.mask, cells, device, nullptr, FinalizeParams{});
    down_.begin(size_t(cells.size()) * sizeof(CellMoments));
    down_.copy(moments + cells.begin, device + cells.begin, size_t(cells.size()) * sizeof(CellMoments));
    down_.finish();
  }

  void store_statistics(CellRange cells, const HostCellStatistics& values, CellStatistics& stats) override {
    const CellStateView view = static_cast<DeviceCells&>(stats).view();
    const size_t n = size_t(cells.size()), bytes = n * sizeof(double);
    host_clamped_.resize(n);
    for (size_t i = 0; i < n; ++i) host_clamped_[i] = values.variance_clamped[size_t(cells.begin) + i] ? 1.0 : 0.0;
    up_.begin(4 * bytes);
    up_.copy(view.mean + cells.begin, values.mean.data() + cells.begin, bytes);
    up_.copy(view.rstd + cells.begin, values.rstd.data() + cells.begin, bytes);
    up_.copy(view.count + cells.begin, values.count.data() + cells.begin, bytes);
    up_.copy(view.clamped + cells.begin, host_clamped_.data(), bytes);
    up_.end();
  }

  // The statistics kernel's last block of each cell finalises it.
  bool finalizes_statistics() const override { return true; }
  void finalized_statistics(const KernelInputs& in, CellRange cells, const FinalizeParams& finalize,
                            CellStatistics& stats) override {
    const CellStateView view = static_cast<DeviceCells&>(stats).view();
    this->stats(*in.plan, in.x, in.mask, cells, nullptr, &view, finalize);
  }

  void normalize(const KernelInputs& in, CellRange cells, const CellStatistics& stats, void* y,
                 DType y_dtype) override {
    const KernelPlan& p = *in.plan;
    const cuda::CoefficientsView coef =
        coefficients(p, static_cast<const DeviceCells&>(stats).view(), has_scale_, has_bias_);
    normalize(p, in.x, cells, coef, y, y_dtype, p.compute_dtype);
  }

  // ---- backward -----------------------------------------------------------------------------

  void backward_sums(const KernelInputs& in, CellRange cells, const CellStatistics& stats, double* cell_sums,
                     double* channel_sums) override {
    const KernelPlan& p = *in.plan;
    double* channels = channel_sums_.get_as<double>(size_t(2 * std::max<int64_t>(p.channels, 1)), stream_);
    cuda::channel_sums(stream_, sums(p, backward_inputs(in, stats), cells, nullptr), channels, false);
    host_channels_.resize(size_t(2 * p.channels));
    down_.begin(size_t(2 * cells.size() + 2 * p.channels) * sizeof(double));
    down_.copy(cell_sums + 2 * cells.begin, cell_sums_.get_as<SumPair>(0, stream_) + cells.begin,
               size_t(cells.size()) * sizeof(SumPair));
    down_.copy(host_channels_.data(), channels, size_t(2 * p.channels) * sizeof(double));
    down_.finish();
    for (int64_t c = 0; c < 2 * p.channels; ++c) channel_sums[c] += host_channels_[size_t(c)];
  }

  void store_terms(CellRange cells, const double* cell_sums, const CellStatistics& stats) override {
    const CellStateView view = static_cast<const DeviceCells&>(stats).view();
    const int64_t total = stats.cells();
    SumPair* merged = cell_sums_.get_as<SumPair>(size_t(total), stream_);
    SumPair* terms = terms_.get_as<SumPair>(size_t(total), stream_);
    up_.begin(size_t(cells.size()) * sizeof(SumPair));
    up_.copy(merged + cells.begin, cell_sums + 2 * cells.begin, size_t(cells.size()) * sizeof(SumPair));
    up_.end();
    cuda::terms_from_sums(stream_, cells.size(), merged + cells.begin, view.count + cells.begin,
                          view.clamped + cells.begin, terms + cells.begin);
  }

  // The sums kernel's last block of each cell makes its terms; the channel
  // sums add up in channel_sums_.
  bool finalizes_terms() const override { return true; }
  void sums_and_terms(const KernelInputs& in, CellRange cells, const CellStatistics& stats, bool first) override {
    const KernelPlan& p = *in.plan;
    SumPair* terms = terms_.get_as<SumPair>(size_t(std::max<int64_t>(p.num_cells, 1)), stream_);
    double* channels = channel_sums_.get_as<double>(size_t(2 * std::max<int64_t>(p.channels, 1)), stream_);
    cuda::channel_sums(stream_, sums(p, backward_inputs(in, stats), cells, terms), channels, !first);
  }

  void input_grad(const KernelInputs& in, CellRange cells, const CellStatistics& stats, void* dx) override {
    const KernelPlan& p = *in.plan;
    SumPair* terms = terms_.get_as<SumPair>(size_t(std::max<int64_t>(p.num_cells, 1)), stream_);
    input_grad(p, backward_inputs(in, stats), in.mask, terms, dx, cells);
  }

  void param_grads(const double* channel_sums, int64_t channels, void* dscale, void* dbias, DType param_dtype,
                   double* to_host) override {
    double* sums = channel_sums_.get_as<double>(size_t(2 * std::max<int64_t>(channels, 1)), stream_);
    if (channel_sums) {
      up_.begin(size_t(2 * channels) * sizeof(double));
      up_.copy(sums, channel_sums, size_t(2 * channels) * sizeof(double));
      up_.end();
    }
    if (dbias) cuda::store_doubles(stream_, sums, channels, dbias, param_dtype);
    if (dscale) cuda::store_doubles(stream_, sums + channels, channels, dscale, param_dtype);
    if (to_host) {
      down_.begin(size_t(2 * channels) * sizeof(double));
      down_.copy(to_host, sums, size_t(2 * channels) * sizeof(double));
      down_.finish();
    }
  }

 private:
  // ---- state and parameters ------------------------------------------------------------

  // Scale and bias (host doubles) on the device, uploaded when they change.
  void upload_parameters(int64_t channels, const double* scale, const double* bias, bool with_bias) {
    double* device = parameters_.get_as<double>(size_t(2 * std::max<int64_t>(channels, 1)), stream_);
    if (parameters_channels_ != channels) {
      parameters_channels_ = channels;
      host_scale_.clear();
      host_bias_.clear();
    }
    const bool scale_changed =
        scale && (host_scale_.size() != size_t(channels) || !std::equal(scale, scale + channels, host_scale_.begin()));
    const bool bias_changed = with_bias && bias &&
                              (host_bias_.size() != size_t(channels) || !std::equal(bias, bias + channels, host_bias_.begin()));
    if (!scale_changed && !bias_changed) return;
    up_.begin(size_t(2 * channels) * sizeof(double));
    if (scale_changed) {
      host_scale_.assign(scale, scale + channels);
      up_.copy(device, scale, size_t(channels) * sizeof(double));
    }
    if (bias_changed) {
      host_bias_.assign(bias, bias + channels);
      up_.copy(device + channels, bias, size_t(channels) * sizeof(double));
    }
    up_.end();
  }

  cuda::CoefficientsView coefficients(const KernelPlan& p, const CellStateView& cells, bool scale, bool bias) {
    double* params = parameters_.get_as<double>(size_t(2 * std::max<int64_t>(p.channels, 1)), stream_);
    cuda::CoefficientsView c;
    c.mean = cells.mean;
    c.rstd = cells.rstd;
    c.scale = scale ? params : nullptr;
    c.bias = bias ? params + p.channels : nullptr;
    c.channels = p.channels;
    c.groups = p.num_groups;
    return c;
  }

  cuda::BackwardInputs backward_inputs(const KernelInputs& in, const CellStatistics& stats) {
    const CellStateView view = static_cast<const DeviceCells&>(stats).view();
    cuda::BackwardInputs b;
    b.x = in.x;
    b.x_dtype = in.plan->input_dtype;
    b.dy = in.dy;
    b.dy_dtype = in.dy_dtype;
    b.compute = in.plan->compute_dtype;
    b.c = coefficients(*in.plan, view, has_scale_, false);
    b.count = view.count;
    b.clamped = view.clamped;
    return b;
  }

  // ---- walking order ---------------------------------------------------------------------

  const void* walking(const KernelPlan& p, const void* data, int element_bytes, Scratch& buffer) {
    if (!p.permuted) return data;
    const int64_t elements = element_count(p.shape);
    void* gathered = buffer.get(size_t(std::max<int64_t>(elements, 1) * element_bytes), stream_);
    cuda::permute(stream_, cuda::walking_source_map(p), elements, element_bytes, data, gathered, true);
    return gathered;
  }

  const uint8_t* walking_mask(const KernelPlan& p, const MaskView* mask) {
    if (!mask) return nullptr;
    const int64_t elements = element_count(p.shape), mask_elements = element_count(mask->shape);
    const uint8_t* source = mask->data;
    if (mask->device == Device::cpu) {
      // Staged through pinned memory: the caller's buffer is free on return.
      uint8_t* copy = mask_raw_.get_as<uint8_t>(size_t(std::max<int64_t>(mask_elements, 1)), stream_);
      up_.begin(size_t(mask_elements));
      up_.copy(copy, mask->data, size_t(mask_elements));
      up_.end();
      source = copy;
    }
    if (!p.permuted && mask->shape == p.shape) return source;
    uint8_t* full = mask_walk_.get_as<uint8_t>(size_t(std::max<int64_t>(elements, 1)), stream_);
    cuda::expand_mask(stream_, cuda::walking_mask_map(p, mask->shape), elements, source, full);
    return full;
  }

  // ---- waves -------------------------------------------------------------------------------
  // A group of one rank runs statistics and normalisation per wave of whole
  // slabs (cells) whose data fits comfortably in L2, so that the second pass
  // reads from L2 rather than memory. Small inputs are one wave.
  std::vector<CellRange> waves(const KernelPlan& p, int64_t bytes_per_element) const {
    const int64_t cells = p.num_cells;
    const int64_t unit = p.form == KernelPlan::Form::channel_rows ? p.cells_per_row : 1;
    const int64_t unit_bytes = std::max<int64_t>(1, unit * p.cell_elements * bytes_per_element);
    const int64_t total = cells / std::max<int64_t>(unit, 1) * unit_bytes;
    std::vector<CellRange> out;
    if (total <= l2_bytes_ / 2 || cells <= unit) {
      out.push_back({0, cells});
      return out;
    }
    const int64_t per_wave = std::max<int64_t>(1, (l2_bytes_ * 2 / 5) / unit_bytes) * unit;
    for (int64_t begin = 0; begin < cells; begin += per_wave) out.push_back({begin, std::min(cells, begin + per_wave)});
    return out;
  }

  // ---- kernels over a cell range ------------------------------------------------------------

  // The plan's form over `cells`. vec: 16 bytes of the input dtype where
  // the kernels are typed for the call's dtypes, every pointer is 16-byte
  // aligned and (channel_rows) vec divides the row; else 1.
  cuda::Geometry geometry(const KernelPlan& p, CellRange cells, bool typed,
                          std::initializer_list<const void*> pointers) const {
    int vec = typed ? cuda::full_vec(p.input_dtype) : 1;
    for (const void* ptr : pointers)
      if (ptr && !aligned16(ptr)) vec = 1;
    if (p.form == KernelPlan::Form::channel_rows) {
      if (p.row_width % vec != 0) vec = 1;
      return cuda::rows_geometry(cells.size() / p.cells_per_row, p.rows, p.row_width, p.group_size, vec, sms_);
    }
    return cuda::cells_geometry(cells.size(), p.group_size, p.inner, vec, sms_);
  }

  void stats(const KernelPlan& p, const void* x, const uint8_t* mask, CellRange cells, CellMoments* moments,
             const CellStateView* state, const FinalizeParams& fin) {
    cuda::StatsArgs a;
    a.g = geometry(p, cells, true, {x, mask});
    a.first = a.g.first_of(cells.begin);
    a.x = x;
    a.x_dtype = p.input_dtype;
    a.mask = mask;
    a.partials = partials_.get_as<CellMoments>(size_t(a.g.partials()), stream_);
    a.counters = counters_.get_as<unsigned>(size_t(a.g.counters()), stream_, true);
    a.moments = moments;
    if (state) a.state = *state;
    a.finalize = state != nullptr;
    a.fin = fin;
    cuda::stats(stream_, a);
  }

  void normalize(const KernelPlan& p, const void* x, CellRange cells, const cuda::CoefficientsView& coef, void* y,
                 DType y_dtype, DType compute) {
    cuda::NormalizeArgs a;
    a.g = geometry(p, cells, cuda::normalize_has_typed(p.input_dtype, y_dtype, compute), {x, y});
    a.first = a.g.first_of(cells.begin);
    a.x = x;
    a.x_dtype = p.input_dtype;
    a.y = y;
    a.y_dtype = y_dtype;
    a.compute = compute;
    a.c = coef;
    cuda::normalize(stream_, a);
  }

  // The sums launch, returned for the channel sums that follow it.
  cuda::SumsArgs sums(const KernelPlan& p, const cuda::BackwardInputs& in, CellRange cells, SumPair* terms) {
    cuda::SumsArgs a;
    a.g = geometry(p, cells, cuda::backward_has_typed(in.x_dtype, in.dy_dtype, in.compute), {in.x, in.dy});
    a.first = a.g.first_of(cells.begin);
    a.in = in;
    a.partials = partials_.get_as<SumPair>(size_t(a.g.partials()), stream_);
    if (a.g.column_partials()) a.columns = partials2_.get_as<SumPair>(size_t(a.g.column_partials()), stream_);
    a.counters = counters_.get_as<unsigned>(size_t(a.g.counters()), stream_, true);
    a.cell_sums = cell_sums_.get_as<SumPair>(size_t(std::max<int64_t>(p.num_cells, 1)), stream_);
    a.terms = terms;
    cuda::sums(stream_, a);
    return a;
  }

  void input_grad(const KernelPlan& p, const cuda::BackwardInputs& in, const uint8_t* mask, const SumPair* terms, void* dx,
                  CellRange cells) {
    cuda::GradArgs a;
    a.g = geometry(p, cells, cuda::backward_has_typed(in.x_dtype, in.dy_dtype, in.compute), {in.x, in.dy, dx, mask});
    a.first = a.g.first_of(cells.begin);
    a.in = in;
    a.mask = mask;
    a.terms = terms;
    a.dx = dx;
    cuda::input_grad(stream_, a);
  }

  cudaStream_t stream_;
  int device_ = 0, sms_ = 1;
  int64_t l2_bytes_ = 0;
  Uploader up_;
  Downloader down_;
  // Workspace: walking-order copies, partials, counters, per-cell arrays.
  Scratch x_walk_, dy_walk_, out_walk_, mask_raw_, mask_walk_;
  Scratch partials_, partials2_, counters_, moments_, cell_sums_, terms_, channel_sums_, parameters_;
  int64_t parameters_channels_ = -1;
  std::vector<double> host_scale_, host_bias_, host_clamped_, host_channels_;
  bool has_scale_ = false, has_bias_ = false;  // the call's parameters
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(CUstream_st* stream) { return std::make_unique<CudaBackend>(stream); }

}  // namespace distgn
