// A rank that comes late to the communicator's first collective, for CTest
// mpi_late_first_collective: under mpirun every rank runs GroupNorm forwards
// over an MPI communicator with a collective timeout, and rank 1 sleeps
// argv[1] seconds first. The others wait in the first collective (the one
// that also makes the communicator's private duplicate) past the delay after
// which a waiting rank sends arrival notices; those must wait for the
// duplicate to exist (sending on it before MPI_Comm_idup completes crashed
// MPI_Isend). Exits 0 when every rank gets the statistics of all ranks' data.
#include <mpi.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "distgn/group_norm.hpp"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const double late_s = argc > 1 ? std::atof(argv[1]) : 1.0;
  distgn::MpiOptions options;
  options.collective_timeout_s = 30;
  auto comm = distgn::mpi_communicator(MPI_COMM_WORLD, options);
  const int rank = comm->rank(), ranks = comm->size();
  if (rank == 1) std::this_thread::sleep_for(std::chrono::duration<double>(late_s));

  distgn::GroupNormConfig config;
  config.num_groups = 2;
  distgn::GroupNorm layer(config, comm);
  const distgn::Shape shape{1, 4, 4};  // 4 positions x 4 channels, 2 groups of 2 channels
  std::vector<float> x(16), y(16);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(rank) + 0.25f * float(i % 4);
  int bad = 0;
  for (int call = 0; call < 3; ++call) {
    distgn::ForwardState state;
    layer.forward({x.data(), shape}, {y.data(), shape}, nullptr, &state);
    // Group g holds channels 2g, 2g+1 of every position on every rank:
    // mean = (ranks - 1) / 2 + 0.25 * (2g + 0.5).
    for (int g = 0; g < 2; ++g) {
      const double want = (ranks - 1) / 2.0 + 0.25 * (2 * g + 0.5);
      if (std::abs(state.mean()[size_t(g)] - want) > 1e-6) {
        std::fprintf(stderr, "late_rank: rank %d call %d group %d mean %.9g, want %.9g\n", rank, call, g,
                     state.mean()[size_t(g)], want);
        bad = 1;
      }
    }
  }
  MPI_Finalize();
  return bad;
}
