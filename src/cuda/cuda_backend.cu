// The CUDA backend: walking order, workspace, waves, and the flows of a
// forward and a backward call around the kernels of launch.hpp.
#include "cuda/cuda_backend.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "core/element.hpp"
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

// The per-cell state of a forward call on the device: mean, rstd, count and
// clamped (1.0 / 0.0), `cells` doubles each, in one allocation.
struct DeviceCells {
  int device = 0;
  int64_t cells = 0;
  int64_t capacity = 0;
  cuda::DeviceArray array;  // 4 * capacity doubles
  cudaStream_t stream = nullptr;  // of the last call that wrote it

  double* data() const { return static_cast<double*>(array.data()); }
  CellStateView view() const {
    double* d = data();
    return {d, d + cells, d + 2 * cells, d + 3 * cells};
  }
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

class CudaBackendImpl final : public CudaBackend {
 public:
  explicit CudaBackendImpl(cudaStream_t stream) : stream_(stream), up_(stream_), down_(stream_) {
    DISTGN_CUDA_CHECK(cudaGetDevice(&device_));
    DISTGN_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device_));
    int l2 = 0;
    DISTGN_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device_));
    l2_bytes_ = l2;
  }

  CUstream_st* stream() const override { return stream_; }
  void set_stream(CUstream_st* stream) override {
    if (stream == stream_) return;
    // Work queued on the old stream may still read the workspace.
    DISTGN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    stream_ = stream;
  }
  void synchronize() override { DISTGN_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  // ---- whole calls ------------------------------------------------------------------

  void forward(const CudaForwardCall& call, ForwardState& state, std::shared_ptr<void>& device_state) override {
    const Plan& p = *call.plan;
    const int64_t cells = p.num_cells, elements = element_count(p.shape);
    const int in_bytes = dtype_size(p.input_dtype), out_bytes = dtype_size(p.output_dtype);
    DeviceCells& dc = cell_state(device_state, cells);
    upload_parameters(p.channels, call.scale, call.bias, true);
    const void* x = walking(p, call.x, in_bytes, x_walk_);
    const uint8_t* mask = walking_mask(p, call.mask);
    void* y = p.permuted ? out_walk_.get(size_t(elements * out_bytes), stream_) : call.y;
    const cuda::FinalizeParams fin{call.epsilon, call.fast_variance, p.stats_dtype};
    const cuda::CoefficientsView coef = coefficients(p, dc.view(), call.scale != nullptr, call.bias != nullptr);

    if (cells > 0 && !call.merge) {
      const CellStateView view = dc.view();
      for (const CellRange& wave : waves(p, in_bytes)) {
        stats(p, x, mask, wave, nullptr, &view, fin);
        normalize(p, x, wave, coef, y, p.output_dtype, p.compute_dtype);
      }
      state.mean.clear();
      state.rstd.clear();
      state.count.clear();
      state.variance_clamped.clear();
    } else if (cells > 0) {
      CellMoments* moments = moments_.get_as<CellMoments>(size_t(cells), stream_);
      stats(p, x, mask, {0, cells}, moments, nullptr, fin);
      host_moments_.resize(size_t(cells));
      down_.begin(size_t(cells) * sizeof(CellMoments));
      down_.copy(host_moments_.data(), moments, size_t(cells) * sizeof(CellMoments));
      down_.finish();
      call.merge(host_moments_);  // the collective; may throw on every rank
      state.mean.resize(size_t(cells));
      state.rstd.resize(size_t(cells));
      state.count.resize(size_t(cells));
      state.variance_clamped.resize(size_t(cells));
      host_cells_.resize(size_t(4 * cells));
      for (int64_t c = 0; c < cells; ++c) {
        const CellMoments& m = host_moments_[size_t(c)];
        const CellStats s = finalize_moments(m, call.epsilon, call.fast_variance, p.stats_dtype);
        state.mean[size_t(c)] = s.mean;
        state.rstd[size_t(c)] = s.rstd;
        state.count[size_t(c)] = m.count;
        state.variance_clamped[size_t(c)] = s.variance_clamped;
        host_cells_[size_t(c)] = s.mean;
        host_cells_[size_t(cells + c)] = s.rstd;
        host_cells_[size_t(2 * cells + c)] = m.count;
        host_cells_[size_t(3 * cells + c)] = s.variance_clamped ? 1.0 : 0.0;
      }
      up_.begin(host_cells_.size() * sizeof(double));
      up_.copy(dc.data(), host_cells_.data(), host_cells_.size() * sizeof(double));
      up_.end();
      normalize(p, x, {0, cells}, coef, y, p.output_dtype, p.compute_dtype);
    }
    if (p.permuted && elements > 0)
      cuda::permute(stream_, cuda::walking_source_map(p), elements, out_bytes, y, call.y, false);
    dc.stream = stream_;
  }

  void backward(const CudaBackwardCall& call, const std::shared_ptr<void>& device_state) override {
    const Plan& p = *call.plan;
    const int64_t cells = p.num_cells, elements = element_count(p.shape), channels = p.channels;
    auto* dc = static_cast<DeviceCells*>(device_state.get());
    if (!dc || dc->cells != cells || dc->device != device_)
      throw Error("backward on the device needs the state of a forward call on the same device and input");
    const int in_bytes = dtype_size(p.input_dtype), dy_bytes = dtype_size(call.dy_dtype);
    upload_parameters(channels, call.scale, nullptr, false);
    const void* x = walking(p, call.x, in_bytes, x_walk_);
    const void* dy = walking(p, call.dy, dy_bytes, dy_walk_);
    const uint8_t* mask = walking_mask(p, call.mask);
    void* dx = p.permuted ? out_walk_.get(size_t(elements * in_bytes), stream_) : call.dx;
    double* channel_sums = channel_sums_.get_as<double>(size_t(2 * std::max<int64_t>(channels, 1)), stream_);
    SumPair* terms = terms_.get_as<SumPair>(size_t(std::max<int64_t>(cells, 1)), stream_);

    cuda::BackwardInputs in;
    in.x = x;
    in.x_dtype = p.input_dtype;
    in.dy = dy;
    in.dy_dtype = call.dy_dtype;
    in.compute = p.compute_dtype;
    in.c = coefficients(p, dc->view(), call.scale != nullptr, false);
    in.count = dc->view().count;
    in.clamped = dc->view().clamped;

    if (cells > 0 && !call.exchange) {
      // Per wave: the fused sums (and the cells' terms), dx, then the channel
      // sums, which the last wave also stores as dscale/dbias.
      const std::vector<CellRange> all = waves(p, in_bytes + dy_bytes);
      for (size_t w = 0; w < all.size(); ++w) {
        const SumsLaunch launch = sums(p, in, all[w], terms);
        input_grad(p, in, mask, terms, dx, all[w]);
        cuda::ChannelOutputs out;
        out.accumulate = w > 0;
        if (w + 1 == all.size()) {
          out.dscale = call.dscale;
          out.dbias = call.dbias;
          out.param_dtype = call.param_dtype;
        }
        channel_sums_of(p, launch, channel_sums, out);
      }
      if (call.channel_sums_to_host) {
        if (!call.host_sums) throw Error("CUDA backward: channel sums asked for in host memory without a buffer");
        down_.begin(size_t(2 * channels) * sizeof(double));
        down_.copy(call.host_sums + 2 * cells, channel_sums, size_t(2 * channels) * sizeof(double));
        down_.finish();
      }
    } else if (cells > 0) {
      if (!call.host_sums) throw Error("CUDA backward: an exchange needs host_sums");
      const SumsLaunch launch = sums(p, in, {0, cells}, nullptr);
      channel_sums_of(p, launch, channel_sums, cuda::ChannelOutputs{});
      down_.begin(size_t(2 * cells + 2 * channels) * sizeof(double));
      down_.copy(call.host_sums, cell_sums_.get(0, stream_), size_t(2 * cells) * sizeof(double));
      down_.copy(call.host_sums + 2 * cells, channel_sums, size_t(2 * channels) * sizeof(double));
      down_.finish();
      call.exchange();  // the collectives, in place; may throw on every rank
      SumPair* merged = cell_sums_.get_as<SumPair>(size_t(cells), stream_);
      up_.begin(size_t(2 * cells + 2 * channels) * sizeof(double));
      up_.copy(merged, call.host_sums, size_t(2 * cells) * sizeof(double));
      up_.copy(channel_sums, call.host_sums + 2 * cells, size_t(2 * channels) * sizeof(double));
      up_.end();
      cuda::terms_from_sums(stream_, cells, merged, in.count, in.clamped, terms);
      input_grad(p, in, mask, terms, dx, {0, cells});
    } else {  // no cells (a batch of 0): the sums are 0
      DISTGN_CUDA_CHECK(cudaMemsetAsync(channel_sums, 0, size_t(2 * channels) * sizeof(double), stream_));
      if (call.channel_sums_to_host && call.host_sums)
        std::fill(call.host_sums, call.host_sums + 2 * channels, 0.0);
    }
    if (cells == 0 || call.exchange) {
      if (call.dbias) cuda::store_doubles(stream_, channel_sums, channels, call.dbias, call.param_dtype);
      if (call.dscale) cuda::store_doubles(stream_, channel_sums + channels, channels, call.dscale, call.param_dtype);
    }
    if (p.permuted && elements > 0)
      cuda::permute(stream_, cuda::walking_source_map(p), elements, in_bytes, dx, call.dx, false);
  }

  // ---- the Backend interface: device data, host per-cell arrays ------------------------

  void partial_stats(const KernelInputs& in, CellRange cells, CellMoments* moments) override {
    const Plan& p = *in.plan;
    if (cells.size() <= 0) return;
    CellMoments* device = moments_.get_as<CellMoments>(size_t(p.num_cells), stream_);
    stats(p, in.x, in.mask, cells, device, nullptr, cuda::FinalizeParams{});
    down_.begin(size_t(cells.size()) * sizeof(CellMoments));
    down_.copy(moments + cells.begin, device + cells.begin, size_t(cells.size()) * sizeof(CellMoments));
    down_.finish();
  }

  void normalize(const KernelInputs& in, CellRange cells, const Coefficients& coef, void* y,
                 DType y_dtype) override {
    const Plan& p = *in.plan;
    if (cells.size() <= 0) return;
    const CellStateView view = upload_coefficients(p, cells, coef, nullptr);
    normalize(p, in.x, cells, coefficients(p, view, coef.scale != nullptr, coef.bias != nullptr), y, y_dtype,
              coef.compute_dtype);
  }

  void backward_sums(const KernelInputs& in, const void* dy, DType dy_dtype, CellRange cells,
                     const Coefficients& coef, double* cell_sums, double* channel_sums) override {
    const Plan& p = *in.plan;
    if (cells.size() <= 0) return;
    const CellStateView view = upload_coefficients(p, cells, coef, nullptr);
    cuda::BackwardInputs bin;
    bin.x = in.x;
    bin.x_dtype = p.input_dtype;
    bin.dy = dy;
    bin.dy_dtype = dy_dtype;
    bin.compute = coef.compute_dtype;
    bin.c = coefficients(p, view, coef.scale != nullptr, false);
    double* channels = channel_sums_.get_as<double>(size_t(2 * p.channels), stream_);
    const SumsLaunch launch = sums(p, bin, cells, nullptr);
    channel_sums_of(p, launch, channels, cuda::ChannelOutputs{});
    std::vector<double>& host_channels = host_scratch_;
    host_channels.resize(size_t(2 * p.channels));
    down_.begin(size_t(2 * cells.size() + 2 * p.channels) * sizeof(double));
    down_.copy(cell_sums + 2 * cells.begin, cell_sums_.get_as<SumPair>(0, stream_) + cells.begin,
               size_t(cells.size()) * sizeof(SumPair));
    down_.copy(host_channels.data(), channels, size_t(2 * p.channels) * sizeof(double));
    down_.finish();
    for (int64_t c = 0; c < 2 * p.channels; ++c) channel_sums[c] += host_channels[size_t(c)];
  }

  void input_grad(const KernelInputs& in, const void* dy, DType dy_dtype, CellRange cells,
                  const Coefficients& coef, const double* cell_terms, void* dx) override {
    const Plan& p = *in.plan;
    if (cells.size() <= 0) return;
    SumPair* terms = terms_.get_as<SumPair>(size_t(p.num_cells), stream_);
    const CellStateView view = upload_coefficients(p, cells, coef, [&](Uploader& up) {
      up.copy(terms + cells.begin, cell_terms + 2 * cells.begin, size_t(cells.size()) * sizeof(SumPair));
    });
    cuda::BackwardInputs bin;
    bin.x = in.x;
    bin.x_dtype = p.input_dtype;
    bin.dy = dy;
    bin.dy_dtype = dy_dtype;
    bin.compute = coef.compute_dtype;
    bin.c = coefficients(p, view, coef.scale != nullptr, false);
    input_grad(p, bin, in.mask, terms, dx, cells);
  }

  void permute(const Plan& plan, const void* src, void* dst, int element_bytes, bool gather) override {
    cuda::permute(stream_, cuda::walking_source_map(plan), element_count(plan.shape), element_bytes, src, dst, gather);
  }

 private:
  // ---- state and parameters ------------------------------------------------------------

  DeviceCells& cell_state(std::shared_ptr<void>& holder, int64_t cells) {
    auto* dc = static_cast<DeviceCells*>(holder.get());
    // Reuse the arrays when nobody else holds them (a copied ForwardState
    // must keep its values) and they are large enough.
    if (!dc || holder.use_count() != 1 || dc->device != device_ || dc->capacity < cells) {
      auto fresh = std::make_shared<DeviceCells>();
      fresh->device = device_;
      fresh->capacity = std::max<int64_t>(cells, 1);
      fresh->array = cuda::DeviceArray(size_t(4 * fresh->capacity) * sizeof(double));
      holder = fresh;
      dc = fresh.get();
    }
    dc->cells = cells;
    return *dc;
  }

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

  cuda::CoefficientsView coefficients(const Plan& p, const CellStateView& cells, bool scale, bool bias) {
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

  // The Backend interface's coefficients (host arrays) on the device: mean and
  // rstd of `cells` into the coefficient state, scale and bias into the
  // parameters; `more` queues further uploads in the same staging.
  template <class More = std::nullptr_t>
  CellStateView upload_coefficients(const Plan& p, CellRange cells, const Coefficients& coef, More more) {
    upload_parameters(p.channels, coef.scale, coef.bias, true);
    double* data = coef_state_.get_as<double>(size_t(2 * std::max<int64_t>(p.num_cells, 1)), stream_);
    const CellStateView view{data, data + p.num_cells, nullptr, nullptr};
    up_.begin(size_t(4 * cells.size()) * sizeof(double));
    up_.copy(view.mean + cells.begin, coef.mean + cells.begin, size_t(cells.size()) * sizeof(double));
    up_.copy(view.rstd + cells.begin, coef.rstd + cells.begin, size_t(cells.size()) * sizeof(double));
    if constexpr (!std::is_same_v<More, std::nullptr_t>) more(up_);
    up_.end();
    return view;
  }

  // ---- walking order ---------------------------------------------------------------------

  const void* walking(const Plan& p, const void* data, int element_bytes, Scratch& buffer) {
    if (!p.permuted) return data;
    const int64_t elements = element_count(p.shape);
    void* gathered = buffer.get(size_t(std::max<int64_t>(elements, 1) * element_bytes), stream_);
    cuda::permute(stream_, cuda::walking_source_map(p), elements, element_bytes, data, gathered, true);
    return gathered;
  }

  const uint8_t* walking_mask(const Plan& p, const MaskView* mask) {
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
  std::vector<CellRange> waves(const Plan& p, int64_t bytes_per_element) const {
    const int64_t cells = p.num_cells;
    const int64_t unit = p.form == Plan::Form::channel_rows ? p.cells_per_row : 1;
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

  int rows_vec(const Plan& p, bool typed, std::initializer_list<const void*> pointers) const {
    const int vec = cuda::full_vec(p.input_dtype);
    if (!typed || p.row_width % vec != 0) return 1;
    for (const void* ptr : pointers)
      if (ptr && !aligned16(ptr)) return 1;
    return vec;
  }
  int cells_vec(const Plan& p, bool typed, std::initializer_list<const void*> pointers) const {
    if (!typed) return 1;
    for (const void* ptr : pointers)
      if (ptr && !aligned16(ptr)) return 1;
    return cuda::full_vec(p.input_dtype);
  }

  cuda::RowsGeometry rows_geometry(const Plan& p, CellRange cells, int vec) const {
    return cuda::rows_geometry(cells.size() / p.cells_per_row, p.rows, p.row_width, p.group_size, vec, sms_);
  }
  cuda::CellsGeometry cells_geometry(const Plan& p, CellRange cells, int vec) const {
    return cuda::cells_geometry(cells.size(), p.group_size, p.inner, vec, sms_);
  }

  void stats(const Plan& p, const void* x, const uint8_t* mask, CellRange cells, CellMoments* moments,
             const CellStateView* state, const cuda::FinalizeParams& fin) {
    if (p.form == Plan::Form::channel_rows) {
      cuda::RowsStatsArgs a;
      a.g = rows_geometry(p, cells, rows_vec(p, true, {x, mask}));
      a.first_slab = cells.begin / p.cells_per_row;
      a.x = x;
      a.x_dtype = p.input_dtype;
      a.mask = mask;
      a.partials = partials_.get_as<CellMoments>(size_t(a.g.blocks() * a.g.slots), stream_);
      a.counters = counters_.get_as<unsigned>(size_t(a.g.slabs), stream_, true);
      a.moments = moments;
      if (state) a.state = *state;
      a.finalize = state != nullptr;
      a.fin = fin;
      cuda::rows_stats(stream_, a);
    } else {
      cuda::CellsStatsArgs a;
      a.g = cells_geometry(p, cells, cells_vec(p, true, {x, mask}));
      a.first_cell = cells.begin;
      a.x = x;
      a.x_dtype = p.input_dtype;
      a.mask = mask;
      a.partials = partials_.get_as<CellMoments>(size_t(a.g.items()), stream_);
      a.counters = counters_.get_as<unsigned>(size_t(a.g.cells), stream_, true);
      a.moments = moments;
      if (state) a.state = *state;
      a.finalize = state != nullptr;
      a.fin = fin;
      cuda::cells_stats(stream_, a);
    }
  }

  void normalize(const Plan& p, const void* x, CellRange cells, const cuda::CoefficientsView& coef, void* y,
                 DType y_dtype, DType compute) {
    const bool typed = cuda::normalize_has_typed(p.input_dtype, y_dtype, compute);
    if (p.form == Plan::Form::channel_rows) {
      cuda::RowsNormalizeArgs a;
      a.g = rows_geometry(p, cells, rows_vec(p, typed, {x, y}));
      a.first_slab = cells.begin / p.cells_per_row;
      a.x = x;
      a.x_dtype = p.input_dtype;
      a.y = y;
      a.y_dtype = y_dtype;
      a.compute = compute;
      a.c = coef;
      cuda::rows_normalize(stream_, a);
    } else {
      cuda::CellsNormalizeArgs a;
      a.g = cells_geometry(p, cells, cells_vec(p, typed, {x, y}));
      a.first_cell = cells.begin;
      a.x = x;
      a.x_dtype = p.input_dtype;
      a.y = y;
      a.y_dtype = y_dtype;
      a.compute = compute;
      a.c = coef;
      cuda::cells_normalize(stream_, a);
    }
  }

  // What a sums launch leaves for the channel sums.
  struct SumsLaunch {
    bool rows;
    cuda::RowsGeometry rg;
    cuda::CellsGeometry cg;
    int64_t first_cell;
    const SumPair* partials;
  };

  SumsLaunch sums(const Plan& p, const cuda::BackwardInputs& in, CellRange cells, SumPair* terms) {
    const bool typed = cuda::backward_has_typed(in.x_dtype, in.dy_dtype, in.compute);
    SumPair* cell_sums = cell_sums_.get_as<SumPair>(size_t(std::max<int64_t>(p.num_cells, 1)), stream_);
    SumsLaunch launch{};
    launch.first_cell = cells.begin;
    if (p.form == Plan::Form::channel_rows) {
      cuda::RowsSumsArgs a;
      a.g = rows_geometry(p, cells, rows_vec(p, typed, {in.x, in.dy}));
      a.first_slab = cells.begin / p.cells_per_row;
      a.in = in;
      a.block_cols = partials2_.get_as<SumPair>(size_t(a.g.blocks() * a.g.tile_cols), stream_);
      a.block_cells = partials_.get_as<SumPair>(size_t(a.g.blocks() * a.g.slots), stream_);
      a.counters = counters_.get_as<unsigned>(size_t(a.g.slabs), stream_, true);
      a.cell_sums = cell_sums;
      a.terms = terms;
      cuda::rows_sums(stream_, a);
      launch.rows = true;
      launch.rg = a.g;
      launch.partials = a.block_cols;
    } else {
      cuda::CellsSumsArgs a;
      a.g = cells_geometry(p, cells, cells_vec(p, typed, {in.x, in.dy}));
      a.first_cell = cells.begin;
      a.in = in;
      a.items = partials2_.get_as<SumPair>(size_t(a.g.items()), stream_);
      a.counters = counters_.get_as<unsigned>(size_t(a.g.cells), stream_, true);
      a.cell_sums = cell_sums;
      a.terms = terms;
      cuda::cells_sums(stream_, a);
      launch.rows = false;
      launch.cg = a.g;
      launch.partials = a.items;
    }
    return launch;
  }

  void channel_sums_of(const Plan& p, const SumsLaunch& launch, double* channel_sums,
                       const cuda::ChannelOutputs& out) {
    if (launch.rows)
      cuda::rows_channel_sums(stream_, launch.rg, p.channels, launch.partials, channel_sums, out);
    else
      cuda::cells_channel_sums(stream_, launch.cg, launch.first_cell, p.num_groups, p.channels, launch.partials,
                               channel_sums, out);
  }

  void input_grad(const Plan& p, const cuda::BackwardInputs& in, const uint8_t* mask, const SumPair* terms, void* dx,
                  CellRange cells) {
    const bool typed = cuda::backward_has_typed(in.x_dtype, in.dy_dtype, in.compute);
    cuda::GradArgs a;
    a.in = in;
    a.mask = mask;
    a.terms = terms;
    a.dx = dx;
    if (p.form == Plan::Form::channel_rows)
      cuda::rows_input_grad(stream_, rows_geometry(p, cells, rows_vec(p, typed, {in.x, in.dy, dx, mask})),
                            cells.begin / p.cells_per_row, a);
    else
      cuda::cells_input_grad(stream_, cells_geometry(p, cells, cells_vec(p, typed, {in.x, in.dy, dx, mask})),
                             cells.begin, a);
  }

  cudaStream_t stream_;
  int device_ = 0, sms_ = 1;
  int64_t l2_bytes_ = 0;
  Uploader up_;
  Downloader down_;
  // Workspace: walking-order copies, partials, counters, per-cell arrays.
  Scratch x_walk_, dy_walk_, out_walk_, mask_raw_, mask_walk_;
  Scratch partials_, partials2_, counters_, moments_, cell_sums_, terms_, channel_sums_, parameters_, coef_state_;
  int64_t parameters_channels_ = -1;
  std::vector<double> host_scale_, host_bias_, host_cells_, host_scratch_;
  std::vector<CellMoments> host_moments_;
};

}  // namespace

std::unique_ptr<CudaBackend> make_cuda_backend(CUstream_st* stream) {
  return std::make_unique<CudaBackendImpl>(stream);
}

void copy_device_state_to_host(const std::shared_ptr<void>& device_state, ForwardState& state) {
  const auto* dc = static_cast<const DeviceCells*>(device_state.get());
  if (!dc) throw Error("copy_device_state_to_host: the state holds no device statistics");
  DISTGN_CUDA_CHECK(cudaStreamSynchronize(dc->stream));
  std::vector<double> all(size_t(4 * dc->cells));
  if (!all.empty())
    DISTGN_CUDA_CHECK(cudaMemcpy(all.data(), dc->data(), all.size() * sizeof(double), cudaMemcpyDeviceToHost));
  const size_t n = size_t(dc->cells);
  state.mean.assign(all.begin(), all.begin() + n);
  state.rstd.assign(all.begin() + n, all.begin() + 2 * n);
  state.count.assign(all.begin() + 2 * n, all.begin() + 3 * n);
  state.variance_clamped.resize(n);
  for (size_t i = 0; i < n; ++i) state.variance_clamped[i] = all[3 * n + i] != 0.0;
}

}  // namespace distgn
