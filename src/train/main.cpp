// train_digits: trains a small per-pixel classifier with distgn GroupNorm on
// the scikit-learn digits data set, on D data-parallel replicas times P
// spatial shards (mpirun -np D*P). See model.hpp for the model and
// trainer.cpp for the step. Exit status 2 and a message on bad options or a
// missing data set.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>

#include "distgn/communicator.hpp"
#include "distgn/error.hpp"
#include "train/digits.hpp"
#include "train/trainer.hpp"

using namespace distgn;
using namespace distgn::train;

namespace {

// Every rank brings `error` (empty when fine); all learn whether some rank
// failed, and the lowest failing rank reports it. One collective.
bool all_ok(Communicator& world, const std::string& error) {
  const uint8_t mine = error.empty() ? 0 : 1;
  std::vector<uint8_t> all(size_t(world.size()));
  world.allgather(&mine, 1, all.data());
  for (int r = 0; r < world.size(); ++r)
    if (all[size_t(r)]) {
      if (r == world.rank())
        std::cerr << "train_digits: error: " << error
                  << (world.size() > 1 ? " (rank " + std::to_string(r) + ")" : std::string()) << std::endl;
      return false;
    }
  return true;
}

int run(int argc, char** argv, const std::shared_ptr<Communicator>& mpi_world) {
  const int rank = mpi_world->rank();
  CLI::App app{
      "train_digits: trains a classifier on the scikit-learn digits with distgn GroupNorm, "
      "D data-parallel replicas x P spatial shards (run as mpirun -np D*P)"};
  Options o;
  app.add_option("--dp", o.dp, "data-parallel replicas D (default: ranks / P)");
  app.add_option("--sp", o.sp, "spatial shards P per replica, splitting the 8 image rows (default 1)");
  app.add_option("--epochs", o.epochs, "epochs (default 30)");
  app.add_option("--batch", o.batch, "global batch B, a multiple of D (default 16)");
  app.add_option("--lr", o.lr, "peak SGD learning rate, decayed to 0 over the run by a cosine (default 0.1)");
  app.add_option("--momentum", o.momentum, "SGD momentum (default 0.9)");
  app.add_option("--seed", o.seed, "seed of the split, the shuffles and the initial weights (default 0)");
  app.add_option("--json", o.json, "also write the per-epoch JSON lines to this file");
  app.add_option("--data", o.data,
                 "sklearn's digits.csv.gz (default: found in Debian's python3-sklearn)");
  app.add_option("--dtype", o.dtype, "f32 (default) or f64 for every activation and parameter");
  app.add_option("--width", o.shape.width, "channels of each block (default 32)");
  app.add_option("--groups", o.shape.groups, "GroupNorm groups (default 8)");
  app.add_option("--blocks", o.shape.blocks, "conv1x1 -> GroupNorm -> SiLU blocks (default 2)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    if (rank == 0) app.exit(e);
    return 0;
  } catch (const CLI::ParseError& e) {
    if (rank == 0) app.exit(e);
    return 2;
  }

  // Every rank reads the data (on every node); the ranks agree before any
  // of them starts a collective of the layer.
  Digits data;
  std::vector<int> train_set, test_set;
  std::unique_ptr<std::ofstream> json_file;
  std::string error;
  try {
    data = load_digits(find_digits(o.data));
    split_digits(data.count, o.test_fraction, o.seed, train_set, test_set);
    validate(o, mpi_world->size(), int(train_set.size()));
    if (rank == 0 && !o.json.empty()) {
      json_file = std::make_unique<std::ofstream>(o.json, std::ios::trunc);
      if (!*json_file) throw TrainError("--json " + o.json + ": cannot write this file");
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  if (!all_ok(*mpi_world, error)) return 2;

  // The layers and the trainer share one communicator; counting what passes
  // through it gives the collectives per step in the JSON lines.
  auto world = std::make_shared<CountingCommunicator>(mpi_world);
  if (o.dtype == "f64")
    run_training<double>(o, data, train_set, test_set, world, std::cout, json_file.get());
  else
    run_training<float>(o, data, train_set, test_set, world, std::cout, json_file.get());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
#if DISTGN_WITH_MPI
  MPI_Init(&argc, &argv);
  int status = 0;
  {
    std::shared_ptr<Communicator> world;
    try {
      world = mpi_communicator(MPI_COMM_WORLD);
      status = run(argc, argv, world);
    } catch (const std::exception& e) {
      // Not an input error (those are agreed on above): a rank may be alone
      // in failing, so take the others down rather than leave them waiting.
      std::cerr << "train_digits: " << e.what() << std::endl;
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
  }
  MPI_Finalize();
  return status;
#else
  try {
    return run(argc, argv, local_communicator());
  } catch (const std::exception& e) {
    std::cerr << "train_digits: " << e.what() << std::endl;
    return 1;
  }
#endif
}
