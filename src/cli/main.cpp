// `distgn`: apply the layer to .npy files, or benchmark it (the README's
// "The command-line tool"; the options are a fixed interface that scripts
// call). Invalid input: exit status 2 and the
// message on stderr, from every rank.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <new>
#include <sstream>
#include <stdexcept>

#include "cli/cli.hpp"
#include "distgn/error.hpp"

using namespace distgn;
using namespace distgn::cli;

namespace {

void add_apply(CLI::App& app, ApplyOptions& o) {
  app.add_option("--x", o.x, "input x (.npy)")->required();
  app.add_option("--y", o.y, "output y (.npy), written by rank 0; no output may name an input or another output")->required();
  app.add_option("--dy", o.dy, "upstream gradient (.npy), runs backward too");
  app.add_option("--dx", o.dx, "input gradient output (.npy)");
  app.add_option("--dscale", o.dscale, "scale gradient output (.npy), total over all ranks");
  app.add_option("--dbias", o.dbias, "bias gradient output (.npy), total over all ranks");
  app.add_option("--mask", o.mask, "validity mask (.npy, any numeric or bool dtype; nonzero = valid)");
  app.add_option("--scale", o.scale, "scale parameter (.npy of floats, shape [C]; default: ones)");
  app.add_option("--bias", o.bias, "bias parameter (.npy of floats, shape [C]; default: zeros)");
}

// CLI11 reads an empty value ("--num-groups ''") as "not given" and uses the
// default; whoever typed the option meant a value, so an empty one is refused.
void refuse_empty_values(CLI::App& app) {
  for (CLI::Option* option : app.get_options())
    if (option->get_type_size() > 0)
      option->check([](const std::string& value) {
        return value.empty() ? std::string("an empty value is not allowed") : std::string();
      });
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"distgn: Flax's GroupNorm, distributed over MPI ranks"};
  app.require_subcommand(1);

  ApplyOptions apply;
  std::string comm_name = "auto";
  std::optional<int64_t> num_groups, group_size;
  std::optional<std::string> dtype;
  std::string param_dtype = "f32", layout = "nhwc", reduction_axes;
  bool no_scale = false, no_bias = false, exact = false, no_force = false, ranks_axis = false;
  std::optional<int> shard_axis;
  double epsilon = 1e-6;

  CLI::App* apply_cmd = app.add_subcommand("apply", "run the layer on .npy files (forward, and backward with --dy)");
  add_apply(*apply_cmd, apply);
  apply_cmd->add_option("--num-groups", num_groups, "number of groups G (default 32)");
  apply_cmd->add_option("--group-size", group_size, "channels per group S (instead of --num-groups)");
  apply_cmd->add_option("--epsilon", epsilon, "added to the variance, >= 0 (default 1e-6)");
  apply_cmd->add_flag("--no-scale", no_scale, "use_scale = false");
  apply_cmd->add_flag("--no-bias", no_bias, "use_bias = false");
  apply_cmd->add_option("--dtype", dtype, "Flax's dtype field: f32|f64|f16|bf16 (default: inferred)");
  apply_cmd->add_option("--param-dtype", param_dtype, "parameter dtype (default f32)");
  apply_cmd->add_option("--input-dtype", apply.input_dtype, "convert x (and dy) to f32|f64|f16|bf16 after loading");
  apply_cmd->add_flag("--exact-variance", exact, "use_fast_variance = false");
  apply_cmd->add_flag("--no-force-f32", no_force, "force_float32_reductions = false");
  apply_cmd->add_option("--reduction-axes", reduction_axes, "comma-separated axes (default: all but 0)");
  apply_cmd->add_option("--layout", layout, "nhwc (channels last, default) or nchw");
  apply_cmd->add_option("--backend", apply.backend, "cpu (default) or cuda");
  apply_cmd->add_option("--comm", comm_name, "auto|local|mpi|nccl (default auto: mpi under mpirun)");
  apply_cmd->add_flag("--ranks-axis", ranks_axis, "x has a leading axis of length P; rank r processes x[r]");
  apply_cmd->add_option("--shard-axis", shard_axis, "split x along this (reduced) axis over the ranks, like numpy.array_split");
  apply_cmd->add_option("--axis-index-groups", apply.axis_index_groups, "rank groups sharing statistics, e.g. \"0,1;2,3\"");

  BenchOptions bench;
  CLI::App* bench_cmd = app.add_subcommand("bench", "time forward and backward on generated data");
  add_bench_options(*bench_cmd, bench, comm_name);
  refuse_empty_values(*apply_cmd);
  refuse_empty_values(*bench_cmd);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }

  std::shared_ptr<Communicator> comm;
  int status = 0;
  try {
    comm = make_communicator(comm_name);
    if (*apply_cmd) {
      GroupNormConfig& c = apply.config;
      // Either option alone selects its mode; both is SPEC §2's error.
      c.num_groups = group_size && !num_groups ? std::nullopt : std::optional<int64_t>(num_groups.value_or(32));
      c.group_size = group_size;
      // The library takes any epsilon, as Flax does; the tool refuses the
      // ones that can only give NaN (a negative one can cancel the variance).
      if (!(epsilon >= 0)) {
        std::ostringstream text;
        text << "--epsilon " << epsilon << ": must be >= 0 (and not NaN)";
        throw Error(text.str());
      }
      c.epsilon = epsilon;
      if (dtype) c.dtype = parse_dtype(*dtype);
      c.param_dtype = parse_dtype(param_dtype);
      c.use_scale = !no_scale;
      c.use_bias = !no_bias;
      c.use_fast_variance = !exact;
      c.force_float32_reductions = !no_force;
      if (!reduction_axes.empty()) c.reduction_axes = parse_int_list(reduction_axes, "--reduction-axes");
      apply.layout = parse_layout(layout);
      if (ranks_axis && shard_axis) throw Error("--ranks-axis and --shard-axis exclude each other");
      if (ranks_axis) apply.sharding.mode = Sharding::Mode::ranks_axis;
      if (shard_axis) apply.sharding = {Sharding::Mode::shard_axis, *shard_axis};
      run_apply(apply, comm);
    } else {
      run_bench(bench, comm);
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "distgn: error: %s\n", e.what());
    status = 2;
  } catch (const std::bad_alloc& e) {
    // The tool's own big buffers say what did not fit (allocate()); this is
    // the rest, such as the layer's per-cell statistics.
    std::fprintf(stderr, "distgn: error: out of memory (%s): free memory or use a smaller input\n", e.what());
    status = 2;
  } catch (const std::length_error& e) {
    std::fprintf(stderr, "distgn: error: a buffer larger than this machine can address (%s): use a smaller input\n",
                 e.what());
    status = 2;
  }
  finish_communicator(comm, status);
  return status;
}
