// `distgn`: apply the layer to .npy files, or benchmark it (the README's
// "The command-line tool"; the options are a fixed interface that scripts
// call). Invalid input: exit status 2 and the message on stderr, from every
// rank.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <new>
#include <stdexcept>

#include "cli/cli.hpp"
#include "distgn/error.hpp"

using namespace distgn;
using namespace distgn::cli;

namespace {

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

  std::string comm_name = "auto";
  ApplyOptions apply;
  CLI::App* apply_cmd = app.add_subcommand("apply", "run the layer on .npy files (forward, and backward with --dy)");
  add_apply_options(*apply_cmd, apply, comm_name);
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
    if (*apply_cmd) run_apply(apply, comm);
    else run_bench(bench, comm);
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
  finish_communicator(comm);
  return status;
}
