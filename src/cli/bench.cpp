// `distgn bench`: forward and backward on generated data, timed beside the
// copy bandwidth of the same buffers, optionally checked against a float64
// single-rank reference.
#include <omp.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>

#include "cli/cli.hpp"
#include "distgn/cpu_tuning.hpp"
#include "distgn/error.hpp"
#include "distgn/group_norm.hpp"
#include "distgn/tensor.hpp"

namespace distgn::cli {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int feature_axis(const Shape& shape, Layout layout) {
  return layout == Layout::channels_last ? int(shape.size()) - 1 : 1;
}

// Deterministic test data: per-channel offsets and scales, so statistics are
// not trivial, stored in `dtype`.
HostArray generate(const Shape& shape, DType dtype, Layout layout, uint64_t seed) {
  HostArray a{shape, dtype, allocate(byte_size(shape, dtype), "the generated " + shape_string(shape) + " array")};
  const int feature = feature_axis(shape, layout);
  int64_t inner = 1;
  for (size_t d = size_t(feature) + 1; d < shape.size(); ++d) inner *= shape[d];
  const int64_t channels = shape[size_t(feature)];
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n = element_count(shape);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = (i / inner) % channels;
    const float v = 0.5f + 0.01f * float(c) + (1.0f + 0.002f * float(c)) * normal(rng);
    store_element(dtype, a.bytes.data(), i, v);
  }
  return a;
}

double element(const HostArray& a, int64_t i) { return load_element(a.dtype, a.bytes.data(), i); }

HostArray widen_to_f64(const HostArray& a) {
  HostArray out{a.shape, DType::f64, allocate(byte_size(a.shape, DType::f64), "the float64 reference input")};
  for (int64_t i = 0; i < element_count(a.shape); ++i)
    reinterpret_cast<double*>(out.bytes.data())[i] = element(a, i);
  return out;
}

double max_abs_difference(const HostArray& a, const HostArray& b) {
  double worst = 0;
  for (int64_t i = 0; i < element_count(a.shape); ++i) {
    const double d = std::fabs(element(a, i) - element(b, i));
    if (std::isnan(d)) return d;
    worst = std::max(worst, d);
  }
  return worst;
}

// One pass over `from` that reads and writes its bytes, all threads: the
// copy every GB/s figure stands beside (timed by the caller).
void copy_all(const HostArray& from, std::vector<uint8_t>& to) {
  const size_t n = from.bytes.size();
#pragma omp parallel
  {
    const size_t threads = size_t(omp_get_num_threads()), t = size_t(omp_get_thread_num());
    const size_t begin = n * t / threads, end = n * (t + 1) / threads;
    std::memcpy(to.data() + begin, from.bytes.data() + begin, end - begin);
  }
}

Shape parse_shape(const std::string& text) {
  Shape shape;
  for (int64_t d : parse_int_list(text, "--shape")) {
    if (d <= 0) throw Error("--shape " + text + ": extents must be positive");
    shape.push_back(d);
  }
  if (shape.size() < 2) throw Error("--shape " + text + ": needs at least 2 axes (N, ..., C)");
  return shape;
}

// Every --shape, each of them possibly ';'-separated; the default when none.
std::vector<Shape> parse_shapes(const std::vector<std::string>& options) {
  std::vector<Shape> shapes;
  for (const std::string& group : options) {
    std::stringstream in(group);
    std::string item;
    while (std::getline(in, item, ';'))
      if (!item.empty()) shapes.push_back(parse_shape(item));
  }
  if (shapes.empty()) shapes.push_back({8, 64, 64, 320});
  return shapes;
}

// What every case of a run shares: the options parsed, the communicator and
// the layer's counting wrapper of it, and on the GPU the stream and timer.
struct BenchRun {
  BenchRun(const BenchOptions& o, const std::shared_ptr<Communicator>& c)
      : options(o), comm(c), counting(std::make_shared<CountingCommunicator>(c)) {}
  const BenchOptions& options;
  std::shared_ptr<Communicator> comm;
  std::shared_ptr<CountingCommunicator> counting;
  std::vector<Shape> shapes;
  DType dtype = DType::f32;
  Layout layout = Layout::channels_last;
  Sharding sharding;
  GroupNormConfig config;
  bool on_gpu = false;
  CpuTuning cpu;  // where the figures are measured, and what the CPU backend chose there
#if DISTGN_WITH_CUDA
  std::unique_ptr<cuda::StreamHandle> stream;
  std::unique_ptr<cuda::EventTimer> timer;
#endif
};

// The options checked and parsed, in the order their errors are reported.
BenchRun set_up(const BenchOptions& o, const std::shared_ptr<Communicator>& comm) {
  BenchRun run(o, comm);
  run.on_gpu = cuda_backend_requested(o.backend);
#if DISTGN_WITH_CUDA
  // One GPU per rank (round robin over the visible ones), one stream.
  if (run.on_gpu) {
    cuda::use_device_of_rank(comm->rank());
    run.stream = std::make_unique<cuda::StreamHandle>();
    run.timer = std::make_unique<cuda::EventTimer>();
  }
#endif
  if (o.iters < 1 || o.warmup < 0) throw Error("--iters must be >= 1 and --warmup >= 0");
  if (o.threads > 0) omp_set_num_threads(o.threads);
  run.cpu = cpu_tuning();
  run.shapes = parse_shapes(o.shapes);
  run.dtype = parse_dtype(o.dtype);
  run.layout = parse_layout(o.layout);
  run.sharding = requested_sharding(false, o.shard_axis);
  run.config.num_groups = o.num_groups;
  run.config.param_dtype = parse_dtype(o.param_dtype);
  return run;
}

// --shard-axis against one case's shape. Bench's layer reduces over Flax's
// default axes, all but the batch axis; a negative axis is refused (apply
// counts one from the end).
void check_shard_axis(const BenchRun& run, const Shape& global) {
  if (run.sharding.mode != Sharding::Mode::shard_axis) return;
  std::vector<int64_t> reduced(global.size() - 1);
  std::iota(reduced.begin(), reduced.end(), int64_t(1));
  if (!shardable_axis(run.sharding.axis, reduced, feature_axis(global, run.layout)))
    throw Error("--shard-axis " + std::to_string(run.sharding.axis) +
                " must be a reduced axis other than the batch and feature axes of " + shape_string(global));
}

void barrier(Communicator& comm) {
  double nothing = 0;
  comm.allreduce_sum(&nothing, 1);
}

// Seconds `f` takes: host wall time, or on the GPU the stream's time between
// two events around it (the call's own waits included).
double timed([[maybe_unused]] const BenchRun& run, const std::function<void()>& f) {
#if DISTGN_WITH_CUDA
  if (run.on_gpu) {
    run.stream->synchronize();
    run.timer->start(run.stream->get());
    f();
    return run.timer->stop_ms(run.stream->get()) * 1e-3;
  }
#endif
  const auto start = Clock::now();
  f();
  return seconds_since(start);
}

// This rank's seconds for each timed iteration (after the warmup ones), and
// the collectives per forward and backward call.
struct IterationTimes {
  std::vector<double> copy, fwd, bwd, comm;  // comm: inside the forward's collectives
  int64_t collectives_fwd = 0, collectives_bwd = 0;
};

IterationTimes time_iterations(const BenchRun& run, const std::function<void()>& copy,
                               const std::function<void()>& forward, const std::function<void()>& backward) {
  IterationTimes t;
  for (int i = 0; i < run.options.warmup + run.options.iters; ++i) {
    const bool counted = i >= run.options.warmup;
    barrier(*run.comm);
    const double copy_s = timed(run, copy);
    barrier(*run.comm);
    const auto before = run.counting->counts();
    const double fwd_s = timed(run, forward);
    const auto middle = run.counting->counts();
    barrier(*run.comm);
    const double bwd_s = timed(run, backward);
    const auto after = run.counting->counts();
    if (!counted) continue;
    t.copy.push_back(copy_s);
    t.fwd.push_back(fwd_s);
    t.bwd.push_back(bwd_s);
    t.comm.push_back(middle.seconds - before.seconds);
    t.collectives_fwd = middle.collectives - before.collectives;
    t.collectives_bwd = after.collectives - middle.collectives;
  }
  return t;
}

// The collective's own latency: the forward's payload (per cell count, mean,
// M2, plus a flag) alone, ranks in step; none on one rank.
std::vector<double> collective_latencies(const BenchRun& run, const Plan& plan) {
  std::vector<double> latency_t;
  Communicator& comm = *run.comm;
  if (comm.size() == 1) return latency_t;
  std::vector<double> payload(size_t(1 + 3 * plan.num_cells)), gathered(payload.size() * size_t(comm.size()));
  for (int i = 0; i < run.options.warmup + run.options.iters; ++i) {
    barrier(comm);
    const auto start = Clock::now();
    comm.allgather(payload.data(), payload.size(), gathered.data());
    if (i >= run.options.warmup) latency_t.push_back(seconds_since(start));
  }
  return latency_t;
}

// Each of `mine` replaced by its largest value on any rank. Collective.
std::vector<double> largest_over_ranks(Communicator& comm, std::vector<double> mine) {
  std::vector<double> all(mine.size() * size_t(comm.size()));
  comm.allgather(mine.data(), mine.size(), all.data());
  for (size_t k = 0; k < mine.size(); ++k)
    for (int r = 0; r < comm.size(); ++r) mine[k] = std::max(mine[k], all[size_t(r) * mine.size() + k]);
  return mine;
}

// --check: the largest difference on any rank between this rank's part of y
// and the same layer on the whole array, in float64, on one rank (NaN when
// any rank's is). Collective.
double reference_error(const BenchRun& run, const Shape& global, uint64_t seed, const HostArray& y) {
  Communicator& comm = *run.comm;
  GroupNorm reference(run.config);
  HostArray x64 = widen_to_f64(generate(global, run.dtype, run.layout, seed));
  HostArray y64{global, DType::f64, std::vector<uint8_t>(x64.bytes.size())};
  reference.forward(x64.view(run.layout), y64.view(run.layout));
  const HostArray mine_y = shard(y64, run.sharding, global, comm.rank(), comm.size(), "y");
  double err = max_abs_difference(y, mine_y);
  std::vector<double> errs(static_cast<size_t>(comm.size()));
  comm.allgather(&err, 1, errs.data());
  double max_err = 0;
  for (double e : errs) max_err = std::isnan(e) || std::isnan(max_err) ? std::nan("") : std::max(max_err, e);
  return max_err;
}

// One case's figures: the slowest rank's medians (the slowest rank sets the
// pace), the collectives per call, the rates they make and --check's error.
struct CaseResult {
  Shape shape;
  double copy_s = 0, fwd_s = 0, bwd_s = 0, comm_s = 0, latency_s = 0;
  int64_t collectives_fwd = 0, collectives_bwd = 0;
  double copy_gbps = 0, fwd_gbps = 0, bwd_gbps = 0;  // model bytes per rank
  std::optional<double> max_err;                      // with --check
};

// Runs and times one case on every rank. Collective.
CaseResult measure(const BenchRun& run, const Shape& global, size_t case_index) {
  const DType dtype = run.dtype;
  const Layout layout = run.layout;
  const int rank = run.comm->rank(), ranks = run.comm->size();
  // Each rank generates the whole array (the same data for any rank count)
  // and keeps its part only; --check generates x again for its reference.
  const uint64_t x_seed = 1 + case_index, dy_seed = 1000 + case_index;
  GroupNorm layer(run.config, run.counting);
  Plan plan;
  HostArray x, dy, y, dx;
  std::vector<uint8_t> copy_target;
  on_every_rank(*run.comm, "bench buffers", [&] {
    x = shard(generate(global, dtype, layout, x_seed), run.sharding, global, rank, ranks, "x");
    dy = shard(generate(global, dtype, layout, dy_seed), run.sharding, global, rank, ranks, "dy");
    plan = layer.plan(x.shape, layout, dtype);
    y = {x.shape, plan.output_dtype, allocate(byte_size(x.shape, plan.output_dtype), "y " + shape_string(x.shape))};
    dx = {x.shape, dtype, allocate(int64_t(x.bytes.size()), "dx " + shape_string(x.shape))};
    if (!run.on_gpu) copy_target = allocate(int64_t(x.bytes.size()), "the copy's target " + shape_string(x.shape));
  });
  ForwardState state;
  TensorView xv = x.view(layout), dyv = dy.view(layout), yv = y.view(layout), dxv = dx.view(layout);
  std::function<void()> copy_once = [&] { copy_all(x, copy_target); };
  TensorView dscale_view, dbias_view;
  const TensorView *dscale_ptr = nullptr, *dbias_ptr = nullptr;
#if DISTGN_WITH_CUDA
  // The layer on device copies of everything; backward also makes dscale
  // and dbias (on the device), as a trainer's would.
  cuda::DeviceArray x_dev, dy_dev, y_dev, dx_dev, copy_dev, dscale_dev, dbias_dev;
  if (run.on_gpu) {
    xv = device_view(x, layout, x_dev, true);
    dyv = device_view(dy, layout, dy_dev, true);
    yv = device_view(y, layout, y_dev, false);
    dxv = device_view(dx, layout, dx_dev, false);
    copy_dev = cuda::DeviceArray(x.bytes.size());
    // dscale and dbias: shaped like the parameters, written by backward.
    const HostArray param{{plan.channels}, run.config.param_dtype,
                          std::vector<uint8_t>(size_t(plan.channels * dtype_size(run.config.param_dtype)))};
    dscale_view = device_view(param, Layout::channels_last, dscale_dev, false);
    dbias_view = device_view(param, Layout::channels_last, dbias_dev, false);
    dscale_ptr = &dscale_view;
    dbias_ptr = &dbias_view;
    layer.set_stream(run.stream->get());
    copy_once = [&] { cuda::device_copy(copy_dev.data(), x_dev.data(), x.bytes.size(), run.stream->get()); };
  }
#endif
  const IterationTimes times =
      time_iterations(run, copy_once, [&] { layer.forward(xv, yv, nullptr, &state); },
                      [&] { layer.backward(xv, dyv, nullptr, state, dxv, dscale_ptr, dbias_ptr); });
  const std::vector<double> latency_t = collective_latencies(run, plan);
  const std::vector<double> slowest = largest_over_ranks(
      *run.comm, {median(times.copy), median(times.fwd), median(times.bwd), median(times.comm), median(latency_t)});
  CaseResult r;
  r.shape = global;
  r.copy_s = slowest[0];
  r.fwd_s = slowest[1];
  r.bwd_s = slowest[2];
  r.comm_s = slowest[3];
  r.latency_s = slowest[4];
  r.collectives_fwd = times.collectives_fwd;
  r.collectives_bwd = times.collectives_bwd;
  const double elements = double(element_count(global)) / ranks;  // per rank
  const double s_in = dtype_size(dtype), s_out = dtype_size(plan.output_dtype);
  r.copy_gbps = 2 * elements * s_in / r.copy_s * 1e-9;
  r.fwd_gbps = elements * (s_in + s_out) / r.fwd_s * 1e-9;
  r.bwd_gbps = 3 * elements * s_in / r.bwd_s * 1e-9;

#if DISTGN_WITH_CUDA
  if (run.on_gpu) y_dev.download(y.bytes.data(), y.bytes.size());
#endif
  if (run.options.check) r.max_err = reference_error(run, global, x_seed, y);
  return r;
}

void print_header(const BenchRun& run) {
  const BenchOptions& o = run.options;
  std::printf("distgn bench: %d rank(s), %d thread(s) per rank, %s %s, G=%lld, median of %d\n", run.comm->size(),
              omp_get_max_threads(), dtype_name(run.dtype).c_str(), layout_name(run.layout).c_str(),
              (long long)o.num_groups, o.iters);
  std::printf("cpu: %s\n", describe(run.cpu).c_str());
#if DISTGN_WITH_CUDA
  if (run.on_gpu)
    std::printf("backend cuda: %s; times from CUDA events on the layer's stream, copy = device-to-device "
                "cudaMemcpyAsync of x; backward computes dscale and dbias on the device\n",
                cuda::device_description().c_str());
#endif
  std::printf("GB/s: model bytes (2 E s forward, 3 E s backward) per rank; comm us: time inside the\n"
              "forward's collective (waiting for other ranks included); lat us: that collective alone;\n"
              "coll: collectives per forward/backward call; max err: vs a float64 single-rank run\n");
  std::printf("%-22s %9s %9s %8s %8s %9s %8s %8s %8s %8s %5s %9s\n", "shape", "copy GB/s", "fwd ms", "fwd GB/s",
              "fwd/copy", "bwd ms", "bwd GB/s", "bwd/copy", "comm us", "lat us", "coll", "max err");
}

void print_row(const CaseResult& r) {
  char err_text[32];
  if (r.max_err) std::snprintf(err_text, sizeof err_text, "%.2e", *r.max_err);
  else std::snprintf(err_text, sizeof err_text, "-");
  std::printf("%-22s %9.1f %9.3f %8.1f %7.0f%% %9.3f %8.1f %7.0f%% %8.1f %8.1f %2lld/%-2lld %9s\n",
              shape_string(r.shape).c_str(), r.copy_gbps, r.fwd_s * 1e3, r.fwd_gbps, 100 * r.fwd_gbps / r.copy_gbps,
              r.bwd_s * 1e3, r.bwd_gbps, 100 * r.bwd_gbps / r.copy_gbps, r.comm_s * 1e6, r.latency_s * 1e6,
              (long long)r.collectives_fwd, (long long)r.collectives_bwd, err_text);
  std::fflush(stdout);
}

// The case as one line of the --json file.
nlohmann::json json_line(const BenchRun& run, const CaseResult& r) {
  const BenchOptions& o = run.options;
  return {{"ranks", run.comm->size()},
          {"threads", omp_get_max_threads()},
          {"shape", r.shape},
          {"dtype", dtype_name(run.dtype)},
          {"layout", layout_name(run.layout)},
          {"backend", o.backend},
          {"param_dtype", o.param_dtype},
          {"num_groups", o.num_groups},
          {"shard_axis", o.shard_axis ? nlohmann::json(*o.shard_axis) : nlohmann::json()},
          {"copy_gbps", r.copy_gbps},
          {"cpu",
           {{"model", run.cpu.cpu_model},
            {"l1d_bytes", run.cpu.l1d_bytes},
            {"l2_bytes", run.cpu.l2_bytes},
            {"l3_bytes", run.cpu.l3_bytes},
            {"processors", run.cpu.processors},
            {"cache_resident_bytes", run.cpu.cache_resident_bytes},
            {"streamed_output_bytes", run.cpu.streamed_output_bytes},
            {"fused_block_bytes", run.cpu.fused_block_bytes},
            {"tuning", run.cpu.source}}},
          {"fwd_ms", r.fwd_s * 1e3},
          {"bwd_ms", r.bwd_s * 1e3},
          {"fwd_gbps", r.fwd_gbps},
          {"bwd_gbps", r.bwd_gbps},
          {"comm_us", r.comm_s * 1e6},
          {"collective_latency_us", r.latency_s * 1e6},
          {"collectives_fwd", r.collectives_fwd},
          {"collectives_bwd", r.collectives_bwd},
          {"max_abs_err", r.max_err ? nlohmann::json(*r.max_err) : nlohmann::json()}};
}

}  // namespace

void add_bench_options(CLI::App& app, BenchOptions& o, std::string& comm_name) {
  app.add_option("--shape", o.shapes, "global shape, e.g. 8,64,64,320 (repeatable, or ';'-separated)");
  app.add_option("--num-groups", o.num_groups, "number of groups (default 32)");
  app.add_option("--dtype", o.dtype, "input dtype f32|f64|f16|bf16 (default f32)");
  app.add_option("--param-dtype", o.param_dtype, "scale/bias dtype (default f32; the output dtype follows, semantics §5)");
  app.add_option("--layout", o.layout, "nhwc (default) or nchw");
  app.add_option("--backend", o.backend, "cpu (default) or cuda");
  app.add_option("--threads", o.threads, "OpenMP threads per rank (default: OpenMP's)");
  app.add_option("--iters", o.iters, "timed iterations (median reported, default 20)");
  app.add_option("--warmup", o.warmup, "untimed iterations first (default 3)");
  app.add_option("--shard-axis", o.shard_axis, "split the shape over the ranks along this axis");
  app.add_flag("--check", o.check, "compare with a float64 single-rank reference");
  app.add_option("--json", o.json, "write one JSON object per case (JSON lines) to this file");
  app.add_option("--comm", comm_name, "auto|local|mpi|nccl (default auto)");
}

void run_bench(const BenchOptions& o, const std::shared_ptr<Communicator>& comm) {
  const BenchRun run = set_up(o, comm);
  const bool root = comm->rank() == 0;
  std::ofstream json_out;
  if (root && !o.json.empty()) {
    json_out.open(o.json);
    if (!json_out) throw Error("--json " + o.json + ": cannot open for writing");
  }
  if (root) print_header(run);

  for (size_t s = 0; s < run.shapes.size(); ++s) {
    const Shape& global = run.shapes[s];
    if (root && run.shapes.size() > 1)
      std::fprintf(stderr, "[%zu/%zu] %s\n", s + 1, run.shapes.size(), shape_string(global).c_str());
    check_shard_axis(run, global);
    const CaseResult result = measure(run, global, s);
    if (!root) continue;
    print_row(result);
    if (json_out.is_open()) json_out << json_line(run, result).dump() << '\n';
  }
}

}  // namespace distgn::cli
