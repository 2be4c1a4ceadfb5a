// The CPU backend picks its channels-last reductions by the size of a call:
// register blocks of rows when the input is cache-resident (at most
// cache_resident_bytes, derived from the machine's L2: cpu/tuning.cpp), rows
// or tiles of rows above that. A batch too
// large to be resident must give what its samples give one at a time, each
// small enough to be resident, up to the rounding of differently grouped
// sums: forward, dx and the parameter gradients.
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "distgn/cpu_tuning.hpp"
#include "distgn/group_norm.hpp"
#include "test_arrays.hpp"

using distgn::DType;
using distgn::ForwardState;
using distgn::GroupNorm;
using distgn::GroupNormConfig;
using distgn::Layout;
using distgn::Shape;
using distgn::TensorView;
using distgn_test::max_difference;

TEST_CASE("cpu backend: a batch too large for the cache kernels equals its samples run alone",
          "[cpu][backend]") {
  // Samples of 2.9 MB (resident); a batch of them just over the resident size.
  const distgn::CpuTuning tuning = distgn::cpu_tuning();
  INFO(distgn::describe(tuning));
  const int64_t H = 48, W = 48, C = 320, per_sample = H * W * C;
  const int64_t sample_bytes = per_sample * int64_t(sizeof(float));
  REQUIRE(sample_bytes <= tuning.cache_resident_bytes);
  const int64_t N = tuning.cache_resident_bytes / sample_bytes + 1;
  for (int64_t width_groups : {32, 8}) {  // S = 10 and S = 40 channels per group
    const Shape batch = {N, H, W, C}, one = {1, H, W, C};
    const size_t total = static_cast<size_t>(N * per_sample), sample = static_cast<size_t>(per_sample),
                 channels = static_cast<size_t>(C);
    std::vector<float> x(total), dy(total), y(total), dx(total), y_one(sample), dx_one(sample);
    std::mt19937 rng{static_cast<uint32_t>(width_groups)};
    std::normal_distribution<float> normal(-2.0f, 3.0f);
    for (float& v : x) v = normal(rng);
    for (float& v : dy) v = normal(rng) * 0.1f;

    GroupNormConfig config;
    config.num_groups = width_groups;
    GroupNorm layer(config);
    layer.init_parameters(C);
    float* params = static_cast<float*>(layer.parameters());  // scale then bias
    for (int64_t c = 0; c < 2 * C; ++c) params[c] = 0.5f + 0.01f * float(c % 97);

    auto view = [&](float* data, const Shape& shape) {
      return TensorView{data, shape, DType::f32, Layout::channels_last};
    };
    std::vector<float> dscale(channels), dbias(channels), dscale_one(channels), dbias_one(channels);
    std::vector<double> dscale_sum(channels, 0.0), dbias_sum(channels, 0.0);
    ForwardState state;
    layer.forward(view(x.data(), batch), view(y.data(), batch), nullptr, &state);
    TensorView ds = view(dscale.data(), {C}), db = view(dbias.data(), {C});
    layer.backward(view(x.data(), batch), view(dy.data(), batch), nullptr, state, view(dx.data(), batch),
                   &ds, &db);

    for (int64_t n = 0; n < N; ++n) {
      float* xs = x.data() + n * per_sample;
      float* dys = dy.data() + n * per_sample;
      ForwardState one_state;
      layer.forward(view(xs, one), view(y_one.data(), one), nullptr, &one_state);
      TensorView ds1 = view(dscale_one.data(), {C}), db1 = view(dbias_one.data(), {C});
      layer.backward(view(xs, one), view(dys, one), nullptr, one_state, view(dx_one.data(), one), &ds1, &db1);
      INFO("groups " << width_groups << ", sample " << n);
      CHECK(max_difference(y.data() + n * per_sample, y_one.data(), y_one.size()) <= 2e-6);
      CHECK(max_difference(dx.data() + n * per_sample, dx_one.data(), dx_one.size()) <= 2e-6);
      for (int64_t c = 0; c < C; ++c) {
        dscale_sum[size_t(c)] += dscale_one[size_t(c)];
        dbias_sum[size_t(c)] += dbias_one[size_t(c)];
      }
    }
    // The sums run in float over small blocks: their rounding scales with
    // the sum of magnitudes, which cancellation can leave far above the sum.
    std::vector<double> magnitude(channels, 0.0);
    for (size_t i = 0; i < total; ++i) magnitude[i % channels] += std::abs(dy[i]);
    for (int64_t c = 0; c < C; ++c) {
      const size_t k = size_t(c);
      INFO("groups " << width_groups << ", channel " << c);
      CHECK(std::abs(dscale[k] - dscale_sum[k]) <= 2e-7 * magnitude[k]);
      CHECK(std::abs(dbias[k] - dbias_sum[k]) <= 2e-7 * magnitude[k]);
    }
  }
}
