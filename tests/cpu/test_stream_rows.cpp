// Streaming stores (cpu/stream_rows.hpp): stream_elements itself at every
// alignment, and a forward and backward large enough to be streamed (over
// the machine's streamed_output size of float32 output, in both layouts,
// with and without a mask) against the same samples run one at a time,
// which stay under that size: the stores differ, the values must not.
#include <catch2/catch.hpp>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/stream_rows.hpp"
#include "distgn/cpu_tuning.hpp"
#include "distgn/group_norm.hpp"
#include "reference.hpp"

using distgn::DType;
using distgn::GroupNorm;
using distgn::GroupNormConfig;
using distgn::Layout;
using distgn::Shape;
using distgn::TensorView;

// n floats starting `offset` floats past a cache line, between floats of
// -1 that a write past either end would change.
struct LineOffset {
  LineOffset(size_t n, int64_t offset) : size(n), storage(n + 48, -1.0f) {
    const uintptr_t at = reinterpret_cast<uintptr_t>(storage.data());
    start = reinterpret_cast<float*>((at + 63) & ~uintptr_t(63)) + offset;
  }
  float* data() { return start; }
  bool untouched_outside() const {
    const size_t first = size_t(start - storage.data());
    for (size_t i = 0; i < storage.size(); ++i)
      if ((i < first || i >= first + size) && storage[i] != -1.0f) return false;
    return true;
  }
  size_t size;
  std::vector<float> storage;
  float* start;
};

TEST_CASE("stream rows: stream_elements writes value(e) at every alignment and length, nothing beside",
          "[cpu][stream]") {
  INFO("streaming stores: " << distgn::stream_rows_in_hardware());
  std::vector<float> src(200);
  for (size_t i = 0; i < src.size(); ++i) src[i] = float(i) * 0.5f - 7.25f;
  // The lane form on whole cache lines, the element form on the partial
  // lines at the ends: each element from its own form, once.
  const auto value = [&](int64_t e, auto lanes) {
    if constexpr (decltype(lanes)::value) {
      distgn::FloatLanes v;
      std::memcpy(&v, src.data() + e, sizeof v);
      return v + 1.0f;
    } else {
      return src[size_t(e)] + 1.0f;
    }
  };
  for (int offset = 0; offset < 17; ++offset)
    for (int n = 0; n <= 100; ++n) {
      LineOffset dst(size_t(n), offset);
      distgn::stream_elements(dst.data(), n, value);
      distgn::stream_fence();
      INFO("offset " << offset << ", n " << n);
      for (int i = 0; i < n; ++i) REQUIRE(dst.data()[i] == src[size_t(i)] + 1.0f);
      REQUIRE(dst.untouched_outside());
    }
}

TEST_CASE("stream rows: a streamed forward and backward equal the same samples run one at a time",
          "[cpu][stream]") {
  // Sized by this machine's tuning (distgn/cpu_tuning.hpp): a sample just
  // over the cache-resident size is written with plain stores, a batch of
  // them over the streaming size with streaming stores. Neither counts as
  // cache-resident, so they sum the same way. Streaming scales with the
  // threads and cache residency with the processors (results must not
  // depend on the threads), so twice as many threads as processors open a
  // gap between the two sizes on any machine.
  const int threads_before = omp_get_max_threads(), threads = 2 * omp_get_num_procs();
  omp_set_num_threads(threads);
  struct Restore {
    int threads;
    ~Restore() { omp_set_num_threads(threads); }
  } restore{threads_before};
  const distgn::CpuTuning tuning = distgn::cpu_tuning(threads);
  INFO(distgn::describe(tuning));
  const int64_t W = 64, C = 320, row_bytes = W * C * int64_t(sizeof(float));
  const int64_t H = tuning.cache_resident_bytes / row_bytes + 1, per_sample = H * W * C;
  const int64_t N = tuning.streamed_output_bytes / (per_sample * int64_t(sizeof(float))) + 1;
  REQUIRE(per_sample * int64_t(sizeof(float)) <= tuning.streamed_output_bytes);  // one sample: plain stores
  // Both walking orders: rows of channels (channels last) and contiguous
  // cells (channels first).
  const Layout layout = GENERATE(Layout::channels_last, Layout::channels_first);
  INFO((layout == Layout::channels_last ? "channels last" : "channels first"));
  const bool last = layout == Layout::channels_last;
  // Streaming stores write whole cache lines, plain stores the partial
  // lines at the ends of each run: outputs a few floats off a line put
  // those ends inside lines, where a run that overlaps its neighbour or
  // drops a float shows.
  const int64_t offset = GENERATE(0, 5);
  INFO("y and dx " << offset << " floats past a cache line");
  // With a mask, dx drops its statistics term at the masked positions: the
  // streamed lanes select it away as the samples' single elements do.
  const bool masked = GENERATE(false, true);
  INFO((masked ? "masked" : "no mask"));
  const Shape shape = last ? Shape{N, H, W, C} : Shape{N, C, H, W}, one = last ? Shape{1, H, W, C} : Shape{1, C, H, W};
  std::vector<float> x(static_cast<size_t>(N * per_sample)), dy(x.size());
  LineOffset y(x.size(), offset), dx(x.size(), offset);
  std::vector<float> y_sample(static_cast<size_t>(per_sample)), dx_sample(y_sample.size());
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(3.0f, 2.0f);
  for (float& v : x) v = normal(rng);
  for (float& v : dy) v = normal(rng);
  std::vector<uint8_t> mask;
  if (masked) {
    mask.resize(x.size());
    for (uint8_t& m : mask) m = rng() % 7 != 0;
  }
  const distgn::MaskView mask_all{mask.data(), shape};
  const distgn::MaskView* mask_view = masked ? &mask_all : nullptr;

  GroupNorm layer{GroupNormConfig{}};  // G = 32, scale 1, bias 0
  distgn::ForwardState state, state_sample;
  layer.forward(TensorView{x.data(), shape, DType::f32, layout}, TensorView{y.data(), shape, DType::f32, layout},
                mask_view, &state);
  layer.backward(TensorView{x.data(), shape, DType::f32, layout}, TensorView{dy.data(), shape, DType::f32, layout},
                 mask_view, state, TensorView{dx.data(), shape, DType::f32, layout});
  CHECK(y.untouched_outside());
  CHECK(dx.untouched_outside());
  for (int64_t n = 0; n < N; ++n) {
    const TensorView x_n{x.data() + n * per_sample, one, DType::f32, layout};
    const distgn::MaskView mask_n{mask.data() + n * per_sample, one};
    const distgn::MaskView* mask_n_view = masked ? &mask_n : nullptr;
    layer.forward(x_n, TensorView{y_sample.data(), one, DType::f32, layout}, mask_n_view, &state_sample);
    layer.backward(x_n, TensorView{dy.data() + n * per_sample, one, DType::f32, layout}, mask_n_view, state_sample,
                   TensorView{dx_sample.data(), one, DType::f32, layout});
    INFO("sample " << n);
    CHECK(std::memcmp(y.data() + n * per_sample, y_sample.data(), y_sample.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(dx.data() + n * per_sample, dx_sample.data(), dx_sample.size() * sizeof(float)) == 0);
    if (masked) continue;  // the reference below has no mask

    // And both against the float64 reference (SPEC 8: 1e-4 on unit-scale
    // outputs), group by group: one sample's cells are its G groups.
    const std::vector<double> xs(x.begin() + n * per_sample, x.begin() + (n + 1) * per_sample);
    const distgn_test::Reference ref =
        distgn_test::reference_forward(layer.config(), one, layout, DType::f32, xs, {}, {}, {});
    std::vector<double> worst(size_t(ref.cells.num_cells), 0.0);
    for (size_t e = 0; e < xs.size(); ++e) {
      double& w = worst[size_t(ref.cells.cell[e])];
      w = std::max(w, std::abs(double(y_sample[e]) - ref.y[e]));
    }
    for (int64_t g = 0; g < ref.cells.num_cells; ++g) {
      INFO("group " << g);
      CHECK(worst[size_t(g)] <= 1e-4);
    }
  }
}
