// The distributed layer under mpiexec with any number of ranks (CTest runs
// 1, 2, 3 and 4): results equal the single-process layer on the
// concatenated data, one collective per call, bitwise-identical statistics
// within a group, and bad input failing on every rank instead of hanging.
#include <omp.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <random>

#include "distgn/error.hpp"
#include "distgn/group_norm.hpp"
#include "test_arrays.hpp"

using namespace distgn;
using distgn_test::Array;
using distgn_test::max_difference;
using distgn_test::random_array;
using distgn_test::random_mask_one_in;
using distgn_test::shard;
using distgn_test::slice_bytes;

namespace {

int world_rank() { return mpi_communicator()->rank(); }
int world_size() { return mpi_communicator()->size(); }

struct Result {
  Array y, dx;
  std::vector<double> dscale, dbias;
  ForwardState state;
};

struct Case {
  Shape shape;
  Layout layout = Layout::channels_last;
  int shard_axis = 1;
  GroupNormConfig config;
  bool mask = false;
  double mean = 0.5;  // of the generated data
};

// Forward and backward of `layer` on one shard (dscale/dbias reduced as asked).
Result run(GroupNorm& layer, const Case& c, Array x, Array dy, std::vector<uint8_t>* mask,
           ParamGradReduction reduction) {
  Result r;
  r.y = Array(x.shape, DType::f64);
  r.dx = Array(x.shape, DType::f64);
  const Plan plan = layer.plan(x.shape, c.layout, DType::f64);
  layer.init_parameters(plan.channels);
  // Non-trivial float32 parameters, the same on every rank.
  const Array scale = random_array({plan.channels}, DType::f32, 77, 1.0, 0.3);
  const Array bias = random_array({plan.channels}, DType::f32, 78, 0.0, 0.5);
  layer.set_scale(scale.view());
  layer.set_bias(bias.view());
  MaskView mask_view{mask ? mask->data() : nullptr, x.shape};
  const MaskView* m = mask ? &mask_view : nullptr;
  layer.forward(x.view(c.layout), r.y.view(c.layout), m, &r.state);
  std::vector<float> dscale(size_t(plan.channels)), dbias(size_t(plan.channels));
  TensorView dscale_view{dscale.data(), {plan.channels}, DType::f32};
  TensorView dbias_view{dbias.data(), {plan.channels}, DType::f32};
  layer.backward(x.view(c.layout), dy.view(c.layout), m, r.state, r.dx.view(c.layout), &dscale_view,
                 &dbias_view, reduction);
  r.dscale.assign(dscale.begin(), dscale.end());
  r.dbias.assign(dbias.begin(), dbias.end());
  return r;
}

std::vector<int> all_ranks() {
  std::vector<int> r(static_cast<size_t>(world_size()));
  for (int i = 0; i < world_size(); ++i) r[size_t(i)] = i;
  return r;
}

// The distributed result of this rank's shard against the single-process
// result on the whole array of its group: c.config.axis_index_groups (or all
// ranks) decides which ranks share the data, split along c.shard_axis.
void check_against_single_process(const Case& c) {
  const int rank = world_rank();
  std::vector<int> members = all_ranks();
  if (c.config.axis_index_groups)
    for (const auto& g : *c.config.axis_index_groups)
      if (std::find(g.begin(), g.end(), rank) != g.end()) members = g;
  const int position = int(std::find(members.begin(), members.end(), rank) - members.begin());
  const int parts = int(members.size());
  const Array x = random_array(c.shape, DType::f64, 1, c.mean), dy = random_array(c.shape, DType::f64, 2);
  std::vector<uint8_t> mask;
  if (c.mask) {
    std::mt19937 rng(3);
    mask = random_mask_one_in(element_count(c.shape), rng, 4);
  }
  GroupNormConfig single_config = c.config;
  single_config.axis_index_groups.reset();
  GroupNorm single(single_config);
  const Result whole = run(single, c, x, dy, c.mask ? &mask : nullptr, ParamGradReduction::local);

  GroupNorm layer(c.config, mpi_communicator());
  CHECK(layer.group_communicator().size() == parts);
  const Array x_part = shard(x, c.shard_axis, parts, position), dy_part = shard(dy, c.shard_axis, parts, position);
  std::vector<uint8_t> mask_part;
  if (c.mask) {
    const auto [begin, end] = array_split_range(c.shape[size_t(c.shard_axis)], parts, position);
    mask_part = slice_bytes(mask, c.shape, c.shard_axis, begin, end, 1);
  }
  const Result mine = run(layer, c, x_part, dy_part, c.mask ? &mask_part : nullptr, ParamGradReduction::group);

  CHECK(max_difference(mine.y.values(), shard(whole.y, c.shard_axis, parts, position).values()) < 1e-9);
  CHECK(max_difference(mine.dx.values(), shard(whole.dx, c.shard_axis, parts, position).values()) < 1e-9);
  CHECK(max_difference(mine.dscale, whole.dscale) < 1e-4);  // float32 parameters
  CHECK(max_difference(mine.dbias, whole.dbias) < 1e-4);
}

}  // namespace

TEST_CASE("mpi group norm: equals the single-process layer on the concatenated shards", "[mpi]") {
  omp_set_num_threads(1);
  Case c;
  c.config.num_groups = 4;
  SECTION("channels last, unequal shards along H") {
    c.shape = {2, 7, 5, 16};
    check_against_single_process(c);
  }
  SECTION("channels last, shards along W, exact variance") {
    c.shape = {2, 4, 9, 8};
    c.shard_axis = 2;
    c.config.use_fast_variance = false;
    check_against_single_process(c);
  }
  SECTION("channels first, shards along H, with a mask") {
    c.shape = {2, 8, 6, 5};
    c.layout = Layout::channels_first;
    c.shard_axis = 2;
    c.mask = true;
    check_against_single_process(c);
  }
  SECTION("custom reduction axes take the gathered path") {
    c.shape = {3, 5, 4, 8};
    c.config.reduction_axes = std::vector<int64_t>{0, 1, 3};
    c.shard_axis = 1;
    check_against_single_process(c);
  }
  SECTION("fewer positions than ranks: some shards are empty") {
    c.shape = {2, 3, 2, 8};
    c.mask = true;
    check_against_single_process(c);
  }
  SECTION("exact variance at |mean|/std = 1e4") {
    c.shape = {2, 6, 6, 8};
    c.mean = 1e4;
    c.config.use_fast_variance = false;
    check_against_single_process(c);
  }
}

TEST_CASE("mpi group norm: axis_index_groups merge statistics within each group only", "[mpi]") {
  omp_set_num_threads(1);
  if (world_size() != 4) return;  // the groups below are over 4 ranks
  Case c;
  c.shape = {2, 7, 5, 16};
  c.config.num_groups = 4;
  SECTION("[[0, 2], [1, 3]]") {
    c.config.axis_index_groups = std::vector<std::vector<int>>{{0, 2}, {1, 3}};
    check_against_single_process(c);
  }
  SECTION("unequal groups [[0, 1, 2], [3]], exact variance, masked") {
    c.config.axis_index_groups = std::vector<std::vector<int>>{{0, 1, 2}, {3}};
    c.config.use_fast_variance = false;
    c.mask = true;
    check_against_single_process(c);
  }
}

TEST_CASE("mpi group norm: one collective per forward and per backward call", "[mpi]") {
  omp_set_num_threads(1);
  auto counting = std::make_shared<CountingCommunicator>(mpi_communicator());
  GroupNormConfig config;
  config.num_groups = 2;
  GroupNorm layer(config, counting);
  Array x = random_array({2, 3, 4, 8}, DType::f64, 10 + uint64_t(world_rank()));
  Array dy = random_array({2, 3, 4, 8}, DType::f64, 20);
  Array y(x.shape, DType::f64), dx = y;
  ForwardState state;
  layer.forward(x.view(Layout::channels_last), y.view(Layout::channels_last), nullptr, &state);  // agrees on the shape
  for (int call = 0; call < 3; ++call) {
    counting->reset();
    layer.forward(x.view(Layout::channels_last), y.view(Layout::channels_last), nullptr, &state);
    CHECK(counting->counts().collectives == (world_size() > 1 ? 1 : 0));
    counting->reset();
    layer.backward(x.view(Layout::channels_last), dy.view(Layout::channels_last), nullptr, state,
                   dx.view(Layout::channels_last));
    CHECK(counting->counts().collectives == (world_size() > 1 ? 1 : 0));
  }
  // The payload is per cell: small and independent of the shard size.
  counting->reset();
  layer.forward(x.view(Layout::channels_last), y.view(Layout::channels_last), nullptr, &state);
  CHECK(counting->counts().bytes == (world_size() > 1 ? int64_t(8 * (1 + 3 * 2 * 2)) : 0));
}

TEST_CASE("mpi group norm: statistics are bitwise identical on every rank of a group", "[mpi]") {
  omp_set_num_threads(1);
  GroupNormConfig config;
  config.num_groups = 4;
  config.use_fast_variance = false;
  auto comm = mpi_communicator();
  GroupNorm layer(config, comm);
  // Different data and shard sizes on every rank.
  Array x = random_array({2, 3 + world_rank(), 5, 8}, DType::f64, 30 + uint64_t(world_rank()), 3.0);
  Array y(x.shape, DType::f64);
  ForwardState state;
  layer.forward(x.view(Layout::channels_last), y.view(Layout::channels_last), nullptr, &state);
  std::vector<double> mine = state.mean();
  mine.insert(mine.end(), state.rstd().begin(), state.rstd().end());
  std::vector<double> all(mine.size() * size_t(world_size()));
  comm->allgather(mine.data(), mine.size(), all.data());
  for (int r = 0; r < world_size(); ++r)
    CHECK(std::memcmp(all.data() + size_t(r) * mine.size(), mine.data(), mine.size() * sizeof(double)) == 0);
}

TEST_CASE("mpi group norm: invalid or disagreeing input fails on every rank, then the layer works again", "[mpi]") {
  omp_set_num_threads(1);
  auto comm = mpi_communicator();
  const int rank = comm->rank(), ranks = comm->size();
  GroupNormConfig config;
  config.num_groups = 2;

  SECTION("axis_index_groups that do not cover every rank exactly once") {
    GroupNormConfig bad = config;
    bad.axis_index_groups = std::vector<std::vector<int>>{{0}, {0}};
    CHECK_THROWS_WITH(GroupNorm(bad, comm), "axis_index_groups must cover all indices exactly once");
  }
  SECTION("a group of ranks not in the communicator") {
    GroupNormConfig bad = config;
    bad.axis_index_groups = std::vector<std::vector<int>>{all_ranks(), {ranks}};
    CHECK_THROWS_WITH(GroupNorm(bad, comm), "axis_index_groups must cover all indices exactly once");
  }
  if (ranks == 1) return;  // what follows needs a second rank to disagree with

  GroupNorm layer(config, comm);
  Array x = random_array({2, 3, 4, 8}, DType::f64, 40), dy = random_array({2, 3, 4, 8}, DType::f64, 41);
  Array y(x.shape, DType::f64), dx = y;
  ForwardState state;
  auto forward = [&](Array& input, Array& output, const MaskView* mask = nullptr) {
    layer.forward(input.view(Layout::channels_last), output.view(Layout::channels_last), mask, &state);
  };
  forward(x, y);

  SECTION("one rank has a different channel count") {
    Array other = random_array({2, 3, 4, rank == 1 ? 6 : 8}, DType::f64, 42), out(other.shape, DType::f64);
    CHECK_THROWS_AS(forward(other, out), Error);
  }
  SECTION("one rank has a different batch size (a non-reduced axis)") {
    Array other = random_array({rank == 1 ? 3 : 2, 3, 4, 8}, DType::f64, 43), out(other.shape, DType::f64);
    CHECK_THROWS_WITH(forward(other, out), Catch::Contains("disagree"));
  }
  SECTION("one rank alone has an invalid mask") {
    std::vector<uint8_t> bits(8, 1);
    MaskView bad{bits.data(), {rank == 1 ? 7 : 8}};
    const MaskView* mask = rank == 1 ? &bad : nullptr;
    if (rank == 1)
      CHECK_THROWS_WITH(forward(x, y, mask), Catch::Contains("mask of shape (7,)"));
    else
      CHECK_THROWS_WITH(forward(x, y, mask), Catch::Contains("rank 1") && Catch::Contains("mask of shape (7,)"));
  }
  SECTION("one rank alone passes a dy of the wrong shape to backward") {
    Array bad_dy = random_array({2, 3, 4, rank == 1 ? 4 : 8}, DType::f64, 44);
    CHECK_THROWS_AS(layer.backward(x.view(Layout::channels_last), bad_dy.view(Layout::channels_last), nullptr,
                                   state, dx.view(Layout::channels_last)),
                    Error);
  }
  SECTION("every rank has a bad group count: the semantics 2 message everywhere") {
    GroupNormConfig bad = config;
    bad.num_groups = 3;
    GroupNorm bad_layer(bad, comm);
    CHECK_THROWS_WITH(bad_layer.forward(x.view(Layout::channels_last), y.view(Layout::channels_last)),
                      "Number of groups (3) does not divide the number of channels (8).");
  }
  // After any of the failures above, the same layer agrees again and works.
  CHECK_NOTHROW(forward(x, y));
  CHECK_NOTHROW(layer.backward(x.view(Layout::channels_last), dy.view(Layout::channels_last), nullptr, state,
                               dx.view(Layout::channels_last)));
}

// The phases of a call with the caller's own collective (here the MPI
// communicator's allgather and allreduce, called by the test) give bitwise
// what forward() and backward() give over the communicator: y, dx, the
// statistics, and dscale/dbias with the channel sums summed by the caller.
TEST_CASE("mpi group norm: the phases with the caller's collective equal forward and backward, bitwise", "[mpi]") {
  omp_set_num_threads(1);
  auto comm = mpi_communicator();
  const int ranks = comm->size();
  GroupNormConfig config;
  config.num_groups = 4;
  for (const Layout layout : {Layout::channels_last, Layout::channels_first}) {
    const Shape shape = layout == Layout::channels_last ? Shape{2, 3 + comm->rank(), 5, 8} : Shape{2, 8, 3 + comm->rank(), 5};
    const Array x = random_array(shape, DType::f64, 40 + uint64_t(comm->rank()), 2.0);
    const Array dy = random_array(shape, DType::f64, 50 + uint64_t(comm->rank()));
    std::mt19937 rng(60 + unsigned(comm->rank()));
    const std::vector<uint8_t> mask = random_mask_one_in(element_count(shape), rng, 5);
    const MaskView mask_view{mask.data(), shape};
    const Array scale = random_array({8}, DType::f32, 77, 1.0, 0.3), bias = random_array({8}, DType::f32, 78, 0.0, 0.5);

    // forward() and backward() over the communicator.
    GroupNorm over_comm(config, comm);
    over_comm.set_scale(scale.view());
    over_comm.set_bias(bias.view());
    Array y_want(shape, DType::f64), dx_want(shape, DType::f64);
    ForwardState state_want;
    over_comm.forward(x.view(layout), y_want.view(layout), &mask_view, &state_want);
    std::vector<float> dscale_want(8), dbias_want(8);
    TensorView dscale_want_view{dscale_want.data(), {8}, DType::f32}, dbias_want_view{dbias_want.data(), {8}, DType::f32};
    over_comm.backward(x.view(layout), dy.view(layout), &mask_view, state_want, dx_want.view(layout),
                       &dscale_want_view, &dbias_want_view, ParamGradReduction::group);

    // The phases on a local layer, the collectives the caller's.
    GroupNorm phases(config);
    phases.set_scale(scale.view());
    phases.set_bias(bias.view());
    const std::vector<double> mine = phases.forward_partial_stats(x.view(layout), &mask_view);
    REQUIRE(mine.size() == size_t(3 * state_want.plan().num_cells));
    std::vector<double> gathered(mine.size() * size_t(ranks));
    comm->allgather(mine.data(), mine.size(), gathered.data());
    Array y(shape, DType::f64), dx(shape, DType::f64);
    ForwardState state;
    phases.forward_finish(x.view(layout), y.view(layout), &mask_view, gathered.data(), ranks, &state);
    std::vector<double> sums = phases.backward_partial_sums(x.view(layout), dy.view(layout), &mask_view, state);
    REQUIRE(sums.size() == size_t(2 * state.plan().num_cells + 2 * 8));
    comm->allreduce_sum(sums.data(), sums.size());
    std::vector<float> dscale(8), dbias(8);
    TensorView dscale_view{dscale.data(), {8}, DType::f32}, dbias_view{dbias.data(), {8}, DType::f32};
    phases.backward_finish(x.view(layout), dy.view(layout), &mask_view, state, sums.data(), dx.view(layout),
                           &dscale_view, &dbias_view);

    CHECK(state.mean() == state_want.mean());
    CHECK(state.rstd() == state_want.rstd());
    CHECK(state.count() == state_want.count());
    CHECK(y.bytes == y_want.bytes);
    CHECK(dx.bytes == dx_want.bytes);
    CHECK(dscale == dscale_want);
    CHECK(dbias == dbias_want);
  }
}

// A phase raises its own rank's invalid call, before any collective.
TEST_CASE("group norm phases: an invalid call raises in the first phase", "[mpi]") {
  GroupNormConfig config;
  config.num_groups = 3;
  GroupNorm layer(config);
  const Array x = random_array({2, 4, 8}, DType::f64, 1);
  CHECK_THROWS_WITH(layer.forward_partial_stats(x.view(Layout::channels_last)),
                    Catch::Contains("Number of groups (3) does not divide the number of channels (8)."));
}
