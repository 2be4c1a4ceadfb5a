// A job with a rank that hangs, for tests/comm/stalled_rank.sh: under
// mpirun, every rank runs GroupNorm forwards on a communicator whose
// collective timeout is argv[1] seconds, and rank 1 stops itself (SIGSTOP,
// as a rank stuck in a debugger, a swapped-out node or a deadlock does) before
// its 4th forward. The other ranks must report it and end the job; reaching
// the end of main means they hung and then somehow went on, so it fails.
#include <mpi.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "distgn/group_norm.hpp"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  distgn::MpiOptions options;
  options.collective_timeout_s = argc > 1 ? std::atof(argv[1]) : 3;
  auto comm = distgn::mpi_communicator(MPI_COMM_WORLD, options);
  distgn::GroupNormConfig config;
  config.num_groups = 2;
  distgn::GroupNorm layer(config, comm);
  const distgn::Shape shape{2, 4, 4};
  std::vector<float> x(32), y(32);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(i % 7) + float(comm->rank());
  layer.init_parameters(4);
  for (int call = 0; call < 6; ++call) {
    if (comm->rank() == 1 && call == 3) std::raise(SIGSTOP);
    layer.forward({x.data(), shape}, {y.data(), shape});
  }
  std::fprintf(stderr, "stalled_rank: rank %d finished every forward although rank 1 stopped\n", comm->rank());
  MPI_Finalize();
  return 1;
}
