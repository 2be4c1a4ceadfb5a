// Device tensors over the MPI communicator, under mpiexec with 2 ranks that
// share GPU 0 (NCCL refuses two ranks on one GPU; Debian's Open MPI is not
// CUDA-aware, so the per-cell payload travels through host memory): each
// rank's shard through the CUDA backend must equal the matching part of one
// process running the CPU backend on the whole input, dscale/dbias the
// totals, with one collective per call.
#include <catch2/catch.hpp>
#include <cmath>
#include <random>

#include "distgn/device.hpp"
#include "distgn/error.hpp"
#include "distgn/group_norm.hpp"
#include "test_arrays.hpp"

using namespace distgn;
using distgn_test::Array;
using distgn_test::max_abs;
using distgn_test::random_array;
using distgn_test::random_mask_one_in;
using distgn_test::shard;
using distgn_test::slice_bytes;

namespace {

struct Case {
  std::string name;
  Shape shape;
  Layout layout;
  DType dtype;
  int axis;  // shard axis
  int64_t groups;
  bool mask = false;
  bool split_groups = false;  // axis_index_groups {{0}, {1}}: every rank alone
};

}  // namespace

TEST_CASE("cuda + mpi: sharded device tensors equal the whole input on one process", "[cuda][mpi]") {
  auto world = mpi_communicator();
  const int rank = world->rank(), ranks = world->size();
  cuda::set_device(0);  // every rank on GPU 0
  const std::vector<Case> cases = {
      {"nhwc_bf16_unequal_shards", {2, 9, 8, 64}, Layout::channels_last, DType::bf16, 1, 8},
      {"nchw_f32", {2, 64, 7, 8}, Layout::channels_first, DType::f32, 2, 16},
      {"nhwc_f32_masked", {2, 6, 4, 32}, Layout::channels_last, DType::f32, 2, 4, true},
      {"nhwc_f16_alone", {2, 4, 4, 32}, Layout::channels_last, DType::f16, 1, 4, false, true},
  };
  for (const Case& c : cases) {
    DYNAMIC_SECTION(c.name) {
      GroupNormConfig config;
      config.num_groups = c.groups;
      config.param_dtype = DType::f32;
      const Array x = random_array(c.shape, c.dtype, 1, 2.0), dy = random_array(c.shape, c.dtype, 2, 0.0);
      std::vector<uint8_t> mask;
      if (c.mask) {
        std::mt19937_64 rng(3);
        mask = random_mask_one_in(element_count(c.shape), rng, 3);
      }
      const auto [begin, end] = array_split_range(c.shape[size_t(c.axis)], ranks, rank);
      Shape local_shape = c.shape;
      local_shape[size_t(c.axis)] = end - begin;

      // Reference: the CPU backend on the whole input (or, with every rank
      // alone, on this rank's shard).
      Array ref_x = x, ref_dy = dy;
      std::vector<uint8_t> ref_mask = mask;
      if (c.split_groups) {
        ref_x = shard(x, c.axis, ranks, rank);
        ref_dy = shard(dy, c.axis, ranks, rank);
        if (c.mask) ref_mask = slice_bytes(mask, c.shape, c.axis, begin, end, 1);
      }
      GroupNorm reference(config);
      const Plan ref_plan = reference.plan(ref_x.shape, c.layout, c.dtype);
      Array y_ref(ref_x.shape, ref_plan.output_dtype), dx_ref(ref_x.shape, c.dtype);
      std::vector<float> dscale_ref(size_t(ref_plan.channels)), dbias_ref(size_t(ref_plan.channels));
      MaskView ref_mask_view{ref_mask.data(), ref_x.shape, Device::cpu};
      ForwardState ref_state;
      reference.forward(ref_x.view(c.layout), y_ref.view(c.layout), c.mask ? &ref_mask_view : nullptr, &ref_state);
      TensorView ds_ref{dscale_ref.data(), {ref_plan.channels}, DType::f32};
      TensorView db_ref{dbias_ref.data(), {ref_plan.channels}, DType::f32};
      reference.backward(ref_x.view(c.layout), ref_dy.view(c.layout), c.mask ? &ref_mask_view : nullptr, ref_state,
                         dx_ref.view(c.layout), &ds_ref, &db_ref);

      // This rank's shard on the GPU, over MPI.
      if (c.split_groups) config.axis_index_groups = std::vector<std::vector<int>>{{0}, {1}};
      auto counting = std::make_shared<CountingCommunicator>(world);
      GroupNorm layer(config, counting);
      const Plan plan = layer.plan(local_shape, c.layout, c.dtype);
      const std::vector<uint8_t> x_part = shard(x, c.axis, ranks, rank).bytes;
      const std::vector<uint8_t> dy_part = shard(dy, c.axis, ranks, rank).bytes;
      const std::vector<uint8_t> mask_part = c.mask ? slice_bytes(mask, c.shape, c.axis, begin, end, 1) : mask;
      cuda::DeviceArray xd(x_part.size() + 16), dyd(dy_part.size() + 16), md(mask_part.size() + 16);
      cuda::DeviceArray yd(size_t(element_count(local_shape) * dtype_size(plan.output_dtype)) + 16), dxd(x_part.size() + 16);
      xd.upload(x_part.data(), x_part.size());
      dyd.upload(dy_part.data(), dy_part.size());
      md.upload(mask_part.data(), mask_part.size());
      cuda::StreamHandle stream;
      layer.set_stream(stream.get());
      const TensorView xv{xd.data(), local_shape, c.dtype, c.layout, Device::cuda};
      const TensorView yv{yd.data(), local_shape, plan.output_dtype, c.layout, Device::cuda};
      const TensorView dyv{dyd.data(), local_shape, c.dtype, c.layout, Device::cuda};
      const TensorView dxv{dxd.data(), local_shape, c.dtype, c.layout, Device::cuda};
      const MaskView mv{static_cast<const uint8_t*>(md.data()), local_shape, Device::cuda};
      std::vector<float> dscale(size_t(plan.channels)), dbias(size_t(plan.channels));
      TensorView dsv{dscale.data(), {plan.channels}, DType::f32}, dbv{dbias.data(), {plan.channels}, DType::f32};
      ForwardState state;
      CountingCommunicator::Counts before{}, middle{}, after{};
      for (int call = 0; call < 2; ++call) {  // the second call: steady state, one collective each
        before = counting->counts();
        layer.forward(xv, yv, c.mask ? &mv : nullptr, &state);
        middle = counting->counts();
        layer.backward(xv, dyv, c.mask ? &mv : nullptr, state, dxv, &dsv, &dbv,
                       c.split_groups ? ParamGradReduction::local : ParamGradReduction::group);
        after = counting->counts();
      }
      stream.synchronize();
      if (!c.split_groups) {
        CHECK(middle.collectives - before.collectives == 1);
        CHECK(after.collectives - middle.collectives == 1);
      } else {
        CHECK(after.collectives - before.collectives == 0);
      }
      Array y(local_shape, plan.output_dtype), dx(local_shape, c.dtype);
      yd.download(y.bytes.data(), y.bytes.size());
      dxd.download(dx.bytes.data(), dx.bytes.size());

      // Compare with the reference's part.
      const Array y_want = c.split_groups ? y_ref : shard(y_ref, c.axis, ranks, rank);
      const Array dx_want = c.split_groups ? dx_ref : shard(dx_ref, c.axis, ranks, rank);
      const double half_ulp = dtype_size(c.dtype) == 2 ? (c.dtype == DType::bf16 ? 1.0 / 64 : 1.0 / 512) : 1e-4;
      const double dx_scale = std::max(1.0, max_abs(dx_want.values()));
      int64_t bad_y = 0, bad_dx = 0;
      for (int64_t i = 0; i < element_count(local_shape); ++i) {
        const double tol_y = 2 * half_ulp * std::max(1.0, std::fabs(y_want.get(i))) + 1e-4;
        if (!(std::fabs(y.get(i) - y_want.get(i)) <= tol_y)) ++bad_y;
        if (!(std::fabs(dx.get(i) - dx_want.get(i)) <= 2 * half_ulp * dx_scale + 1e-4 * dx_scale)) ++bad_dx;
      }
      INFO("rank " << rank);
      CHECK(bad_y == 0);
      CHECK(bad_dx == 0);
      for (int64_t ch = 0; ch < plan.channels; ++ch) {
        const double scale = std::max(1.0, std::fabs(double(dscale_ref[size_t(ch)])));
        CHECK(std::fabs(dscale[size_t(ch)] - dscale_ref[size_t(ch)]) <= 1e-3 * scale);
        CHECK(std::fabs(dbias[size_t(ch)] - dbias_ref[size_t(ch)]) <= 1e-3 * std::max(1.0, std::fabs(double(dbias_ref[size_t(ch)]))));
      }
    }
  }
}
