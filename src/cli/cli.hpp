// The `distgn` command-line tool: shared pieces of its subcommands.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "distgn/communicator.hpp"
#include "distgn/tensor.hpp"
#if DISTGN_WITH_CUDA
#include "distgn/device.hpp"
#endif

namespace CLI {
class App;
}

namespace distgn::cli {

// A host array in one of distgn's storage dtypes.
struct HostArray {
  Shape shape;
  DType dtype = DType::f32;
  std::vector<uint8_t> bytes;
  TensorView view(Layout layout) { return {bytes.data(), shape, dtype, layout, Device::cpu}; }
};

// How the ranks of a run share the input (docs/cli.md).
struct Sharding {
  enum class Mode { none, ranks_axis, shard_axis } mode = Mode::none;
  int axis = 0;  // shard_axis
};

struct ApplyOptions {
  std::string x, y, dy, dx, dscale, dbias, mask, scale, bias;  // .npy paths, empty = not given
  std::optional<int64_t> num_groups, group_size;               // neither: 32 groups
  double epsilon = 1e-6;
  bool no_scale = false, no_bias = false, exact_variance = false, no_force_f32 = false;
  std::optional<std::string> dtype;  // unset = inferred
  std::string param_dtype = "f32";
  std::string input_dtype;     // empty = keep the file's
  std::string reduction_axes;  // "1,2"; empty = all but 0
  std::string layout = "nhwc";
  std::string backend = "cpu";
  bool ranks_axis = false;
  std::optional<int> shard_axis;
  std::string axis_index_groups;  // "0,1;2,3"
};

void add_apply_options(CLI::App& app, ApplyOptions& options, std::string& comm_name);
// Runs `distgn apply` on this rank; raises distgn::Error on invalid input.
void run_apply(const ApplyOptions& options, const std::shared_ptr<Communicator>& comm);

// "0,1;2,3" -> {{0,1},{2,3}}; "1,2,3" -> {1,2,3}.
std::vector<std::vector<int>> parse_groups(const std::string& text);
std::vector<int64_t> parse_int_list(const std::string& text, const char* what);


// ---- sharding (sharding.cpp): how arrays are split over ranks and joined ----

// The sharding --ranks-axis and --shard-axis ask for (bench has only
// --shard-axis); they exclude each other. The axis is checked against x
// later, with shardable_axis.
Sharding requested_sharding(bool ranks_axis, const std::optional<int>& shard_axis);
// Whether x may be split over the ranks along `axis` (counted from 0): only
// along a reduced axis other than the feature axis, as splitting any other
// would split cells' groups or change which cells exist.
bool shardable_axis(int axis, const std::vector<int64_t>& reduction_axes, int feature_axis);

// This rank's part of an array sharded like x: under ranks_axis a[rank] for
// arrays of x's rank, under shard_axis the array_split part along the axis
// (an array that broadcasts along the axis, like a mask of extent 1 there
// where x's is larger, stays whole; x and dy are always split).
// Takes `a` by value: the part that is all of it (one rank, a shared array)
// is `a` itself, not a copy.
HostArray shard(HostArray a, const Sharding& sharding, const Shape& x_shape, int rank,
                int ranks, const char* name);
// The inverse of shard() for arrays shaped like x: rank 0 gets the whole
// array, the others an empty one (one rooted gather); with one rank it is
// `part` itself.
HostArray unshard(Communicator& comm, HostArray part, const Sharding& sharding, const Shape& whole_shape);

// ---- memory (sharding.cpp) ----

// "8589934592 bytes (8.00 GiB)".
std::string byte_count(int64_t bytes);
// `bytes` zeroed bytes for `what`; when they do not fit, a distgn::Error that
// says what did not fit and how much it needed.
std::vector<uint8_t> allocate(int64_t bytes, const std::string& what);
// Runs `step` on this rank, then every rank raises if it failed on any rank:
// running out of memory may hit one rank only, and the others must not wait
// for it in the next collective. Collective.
void on_every_rank(Communicator& comm, const char* step_name, const std::function<void()>& step);

struct BenchOptions {
  std::vector<std::string> shapes;  // "8,64,64,320", several or ';'-separated
  int64_t num_groups = 32;
  std::string dtype = "f32";
  std::string param_dtype = "f32";
  std::string layout = "nhwc";
  std::string backend = "cpu";
  int threads = 0;  // 0 = OpenMP's default
  int iters = 20;
  int warmup = 3;
  std::optional<int> shard_axis;
  bool check = false;
  std::string json;
};

void add_bench_options(CLI::App& app, BenchOptions& options, std::string& comm_name);
// Runs `distgn bench`; rank 0 prints the table (and writes the JSON file).
void run_bench(const BenchOptions& options, const std::shared_ptr<Communicator>& comm);

// `--backend` (backend_setup.cpp): true for cuda, false for cpu; raises for
// any other name, and for cuda in a build without the CUDA backend.
bool cuda_backend_requested(const std::string& backend);
#if DISTGN_WITH_CUDA
// `host` in device memory held by `storage` (its bytes copied over when
// `copy`), viewed in `layout`.
TensorView device_view(const HostArray& host, Layout layout, cuda::DeviceArray& storage, bool copy);
#endif

// The communicator `--comm` names: local, mpi (initialises MPI), nccl, or
// auto (mpi when launched by mpirun and built with MPI, else local).
std::shared_ptr<Communicator> make_communicator(const std::string& name);
// Releases it (finalising MPI if make_communicator initialised it).
void finish_communicator(std::shared_ptr<Communicator>& comm);

}  // namespace distgn::cli
