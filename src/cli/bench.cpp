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
#include <random>
#include <sstream>

#include "cli/cli.hpp"
#include "core/element.hpp"
#include "distgn/error.hpp"
#include "distgn/group_norm.hpp"

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

// Deterministic test data: per-channel offsets and scales, so statistics are
// not trivial, stored in `dtype`.
HostArray generate(const Shape& shape, DType dtype, Layout layout, uint64_t seed) {
  HostArray a{shape, dtype, allocate(byte_size(shape, dtype), "the generated " + shape_string(shape) + " array")};
  const int feature = layout == Layout::channels_last ? int(shape.size()) - 1 : 1;
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

struct CaseResult {
  nlohmann::json json;
  std::string row;
};

}  // namespace

void add_bench_options(CLI::App& app, BenchOptions& o, std::string& comm_name) {
  app.add_option("--shape", o.shapes, "global shape, e.g. 8,64,64,320 (repeatable, or ';'-separated)");
  app.add_option("--num-groups", o.num_groups, "number of groups (default 32)");
  app.add_option("--dtype", o.dtype, "input dtype f32|f64|f16|bf16 (default f32)");
  app.add_option("--param-dtype", o.param_dtype, "scale/bias dtype (default f32; the output dtype follows, SPEC §5)");
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
  const bool on_gpu = cuda_backend_requested(o.backend);
#if DISTGN_WITH_CUDA
  // One GPU per rank (round robin over the visible ones), one stream.
  std::unique_ptr<cuda::StreamHandle> stream;
  std::unique_ptr<cuda::EventTimer> timer;
  if (on_gpu) {
    cuda::use_device_of_rank(comm->rank());
    stream = std::make_unique<cuda::StreamHandle>();
    timer = std::make_unique<cuda::EventTimer>();
  }
#endif
  if (o.iters < 1 || o.warmup < 0) throw Error("--iters must be >= 1 and --warmup >= 0");
  if (o.threads > 0) omp_set_num_threads(o.threads);
  std::vector<Shape> shapes;
  for (const std::string& group : o.shapes) {
    std::stringstream in(group);
    std::string item;
    while (std::getline(in, item, ';'))
      if (!item.empty()) shapes.push_back(parse_shape(item));
  }
  if (shapes.empty()) shapes.push_back({8, 64, 64, 320});
  const DType dtype = parse_dtype(o.dtype);
  const Layout layout = parse_layout(o.layout);
  const int rank = comm->rank(), ranks = comm->size();
  const bool root = rank == 0;
  Sharding sharding;
  if (o.shard_axis) sharding = {Sharding::Mode::shard_axis, *o.shard_axis};

  GroupNormConfig config;
  config.num_groups = o.num_groups;
  config.param_dtype = parse_dtype(o.param_dtype);
  auto counting = std::make_shared<CountingCommunicator>(comm);
  std::vector<double> sync(1);
  auto barrier = [&] { comm->allreduce_sum(sync.data(), 1); };

  std::ofstream json_out;
  if (root && !o.json.empty()) {
    json_out.open(o.json);
    if (!json_out) throw Error("--json " + o.json + ": cannot open for writing");
  }
  if (root) {
    std::printf("distgn bench: %d rank(s), %d thread(s) per rank, %s %s, G=%lld, median of %d\n", ranks,
                omp_get_max_threads(), dtype_name(dtype).c_str(), layout_name(layout).c_str(),
                (long long)o.num_groups, o.iters);
#if DISTGN_WITH_CUDA
    if (on_gpu)
      std::printf("backend cuda: %s; times from CUDA events on the layer's stream, copy = device-to-device "
                  "cudaMemcpyAsync of x; backward computes dscale and dbias on the device\n",
                  cuda::device_description().c_str());
#endif
    std::printf("GB/s: model bytes (2 E s forward, 3 E s backward) per rank; comm us: time inside the\n"
                "forward's collective (waiting for other ranks included); lat us: that collective alone;\n"
                "coll: collectives per forward/backward call; max err: vs a float64 single-rank run\n");
    std::printf("%-22s %9s %9s %8s %8s %9s %8s %8s %8s %8s %5s %9s\n", "shape", "copy GB/s", "fwd ms",
                "fwd GB/s", "fwd/copy", "bwd ms", "bwd GB/s", "bwd/copy", "comm us", "lat us", "coll",
                "max err");
  }

  for (size_t s = 0; s < shapes.size(); ++s) {
    const Shape& global = shapes[s];
    if (root && shapes.size() > 1)
      std::fprintf(stderr, "[%zu/%zu] %s\n", s + 1, shapes.size(), shape_string(global).c_str());
    if (o.shard_axis && (*o.shard_axis < 1 || *o.shard_axis >= int(global.size()) ||
                         *o.shard_axis == (layout == Layout::channels_last ? int(global.size()) - 1 : 1)))
      throw Error("--shard-axis " + std::to_string(*o.shard_axis) + " must be a reduced axis other than the "
                  "batch and feature axes of " + shape_string(global));
    // Each rank generates the whole array (the same data for any rank count)
    // and keeps its part only; --check generates x again for its reference.
    GroupNorm layer(config, counting);
    Plan plan;
    HostArray x, dy, y, dx;
    std::vector<uint8_t> copy_target;
    on_every_rank(*comm, "bench buffers", [&] {
      x = shard(generate(global, dtype, layout, 1 + s), sharding, global, rank, ranks, "x");
      dy = shard(generate(global, dtype, layout, 1000 + s), sharding, global, rank, ranks, "dy");
      plan = layer.plan(x.shape, layout, dtype);
      y = {x.shape, plan.output_dtype,
           allocate(byte_size(x.shape, plan.output_dtype), "y " + shape_string(x.shape))};
      dx = {x.shape, dtype, allocate(int64_t(x.bytes.size()), "dx " + shape_string(x.shape))};
      if (!on_gpu) copy_target = allocate(int64_t(x.bytes.size()), "the copy's target " + shape_string(x.shape));
    });
    ForwardState state;
    TensorView xv{const_cast<uint8_t*>(x.bytes.data()), x.shape, dtype, layout};
    TensorView dyv{const_cast<uint8_t*>(dy.bytes.data()), x.shape, dtype, layout};
    TensorView yv = y.view(layout), dxv = dx.view(layout);

    // Seconds f takes: host wall time, or on the GPU the stream's time
    // between two events around it (the call's own waits included).
    auto timed_call = [&](auto&& f) -> double {
#if DISTGN_WITH_CUDA
      if (on_gpu) {
        stream->synchronize();
        timer->start(stream->get());
        f();
        return timer->stop_ms(stream->get()) * 1e-3;
      }
#endif
      const auto start = Clock::now();
      f();
      return seconds_since(start);
    };
    std::function<void()> copy_once = [&] { copy_all(x, copy_target); };
    TensorView dscale_view, dbias_view;
    const TensorView *dscale_ptr = nullptr, *dbias_ptr = nullptr;
#if DISTGN_WITH_CUDA
    // The layer on device copies of everything; backward also makes dscale
    // and dbias (on the device), as a trainer's would.
    cuda::DeviceArray x_dev, dy_dev, y_dev, dx_dev, copy_dev, dscale_dev, dbias_dev;
    if (on_gpu) {
      xv = device_view(x, layout, x_dev, true);
      dyv = device_view(dy, layout, dy_dev, true);
      yv = device_view(y, layout, y_dev, false);
      dxv = device_view(dx, layout, dx_dev, false);
      copy_dev = cuda::DeviceArray(x.bytes.size());
      // dscale and dbias: shaped like the parameters, written by backward.
      const HostArray param{{plan.channels}, config.param_dtype,
                            std::vector<uint8_t>(size_t(plan.channels * dtype_size(config.param_dtype)))};
      dscale_view = device_view(param, Layout::channels_last, dscale_dev, false);
      dbias_view = device_view(param, Layout::channels_last, dbias_dev, false);
      dscale_ptr = &dscale_view;
      dbias_ptr = &dbias_view;
      layer.set_stream(stream->get());
      copy_once = [&] { cuda::device_copy(copy_dev.data(), x_dev.data(), x.bytes.size(), stream->get()); };
    }
#endif
    std::vector<double> copy_t, fwd_t, bwd_t, comm_t;
    int64_t collectives_fwd = 0, collectives_bwd = 0;
    for (int i = 0; i < o.warmup + o.iters; ++i) {
      const bool timed = i >= o.warmup;
      barrier();
      const double copy = timed_call(copy_once);
      barrier();
      const auto before = counting->counts();
      const double fwd = timed_call([&] { layer.forward(xv, yv, nullptr, &state); });
      const auto middle = counting->counts();
      barrier();
      const double bwd = timed_call([&] { layer.backward(xv, dyv, nullptr, state, dxv, dscale_ptr, dbias_ptr); });
      const auto after = counting->counts();
      if (!timed) continue;
      copy_t.push_back(copy);
      fwd_t.push_back(fwd);
      bwd_t.push_back(bwd);
      comm_t.push_back(middle.seconds - before.seconds);
      collectives_fwd = middle.collectives - before.collectives;
      collectives_bwd = after.collectives - middle.collectives;
    }
    // The collective's own latency: the forward's payload (per cell count,
    // mean, M2, plus a flag) alone, ranks in step.
    std::vector<double> latency_t;
    if (ranks > 1) {
      std::vector<double> payload(size_t(1 + 3 * plan.num_cells)), gathered(payload.size() * size_t(ranks));
      for (int i = 0; i < o.warmup + o.iters; ++i) {
        barrier();
        const auto start = Clock::now();
        comm->allgather(payload.data(), payload.size(), gathered.data());
        if (i >= o.warmup) latency_t.push_back(seconds_since(start));
      }
    }
    // The slowest rank sets the pace: report the largest median.
    std::vector<double> mine{median(copy_t), median(fwd_t), median(bwd_t), median(comm_t), median(latency_t)};
    std::vector<double> all(mine.size() * size_t(ranks));
    comm->allgather(mine.data(), mine.size(), all.data());
    for (size_t k = 0; k < mine.size(); ++k)
      for (int r = 0; r < ranks; ++r) mine[k] = std::max(mine[k], all[size_t(r) * mine.size() + k]);
    const double copy_s = mine[0], fwd_s = mine[1], bwd_s = mine[2], comm_s = mine[3], latency_s = mine[4];

#if DISTGN_WITH_CUDA
    if (on_gpu) y_dev.download(y.bytes.data(), y.bytes.size());
#endif
    double max_err = std::nan("");
    if (o.check) {
      // The same layer on the whole array, in float64, on one rank.
      GroupNorm reference(config);
      const HostArray x64 = widen_to_f64(generate(global, dtype, layout, 1 + s));
      HostArray y64{global, DType::f64, std::vector<uint8_t>(x64.bytes.size())};
      HostArray x64_copy = x64;
      reference.forward(x64_copy.view(layout), y64.view(layout));
      const HostArray mine_y = shard(y64, sharding, global, rank, ranks, "y");
      double err = max_abs_difference(y, mine_y);
      std::vector<double> errs(static_cast<size_t>(ranks));
      comm->allgather(&err, 1, errs.data());
      max_err = 0;
      for (double e : errs) max_err = std::isnan(e) || std::isnan(max_err) ? std::nan("") : std::max(max_err, e);
    }

    const double elements = double(element_count(global)) / ranks;  // per rank
    const double s_in = dtype_size(dtype), s_out = dtype_size(plan.output_dtype);
    const double copy_gbps = 2 * elements * s_in / copy_s * 1e-9;
    const double fwd_gbps = elements * (s_in + s_out) / fwd_s * 1e-9;
    const double bwd_gbps = 3 * elements * s_in / bwd_s * 1e-9;
    if (!root) continue;
    char err_text[32];
    if (o.check) std::snprintf(err_text, sizeof err_text, "%.2e", max_err);
    else std::snprintf(err_text, sizeof err_text, "-");
    std::printf("%-22s %9.1f %9.3f %8.1f %7.0f%% %9.3f %8.1f %7.0f%% %8.1f %8.1f %2lld/%-2lld %9s\n",
                shape_string(global).c_str(), copy_gbps, fwd_s * 1e3, fwd_gbps,
                100 * fwd_gbps / copy_gbps, bwd_s * 1e3, bwd_gbps, 100 * bwd_gbps / copy_gbps,
                comm_s * 1e6, latency_s * 1e6, (long long)collectives_fwd, (long long)collectives_bwd,
                err_text);
    std::fflush(stdout);
    if (json_out.is_open()) {
      nlohmann::json j = {{"ranks", ranks},
                          {"threads", omp_get_max_threads()},
                          {"shape", global},
                          {"dtype", dtype_name(dtype)},
                          {"layout", layout_name(layout)},
                          {"backend", o.backend},
                          {"param_dtype", o.param_dtype},
                          {"num_groups", o.num_groups},
                          {"shard_axis", o.shard_axis ? nlohmann::json(*o.shard_axis) : nlohmann::json()},
                          {"copy_gbps", copy_gbps},
                          {"fwd_ms", fwd_s * 1e3},
                          {"bwd_ms", bwd_s * 1e3},
                          {"fwd_gbps", fwd_gbps},
                          {"bwd_gbps", bwd_gbps},
                          {"comm_us", comm_s * 1e6},
                          {"collective_latency_us", latency_s * 1e6},
                          {"collectives_fwd", collectives_fwd},
                          {"collectives_bwd", collectives_bwd},
                          {"max_abs_err", o.check ? nlohmann::json(max_err) : nlohmann::json()}};
      json_out << j.dump() << '\n';
    }
  }
}

}  // namespace distgn::cli
