// `--comm`: which communicator the tool runs over, and how long its
// collectives wait for the other ranks (DISTGN_COLLECTIVE_TIMEOUT).
#include <cmath>
#include <cstdlib>

#include "cli/cli.hpp"
#include "distgn/error.hpp"
#if DISTGN_WITH_NCCL
#include "distgn/device.hpp"
#endif

namespace distgn::cli {
namespace {

bool mpi_initialised_here = false;

#if DISTGN_WITH_MPI
// MPI_COMM_WORLD, initialising MPI unless the caller already did.
MPI_Comm mpi_world() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    MPI_Init(nullptr, nullptr);
    mpi_initialised_here = true;
  }
  return MPI_COMM_WORLD;
}
#endif

// DISTGN_COLLECTIVE_TIMEOUT: seconds a collective waits for the other ranks
// before the job is ended with a report of who did not arrive; 0 = forever.
double collective_timeout_seconds() {
  const char* text = std::getenv("DISTGN_COLLECTIVE_TIMEOUT");
  if (!text || !*text) return kDefaultCollectiveTimeoutSeconds;
  char* end = nullptr;
  const double seconds = std::strtod(text, &end);
  if (*end != '\0' || !std::isfinite(seconds) || seconds < 0)
    throw Error(std::string("DISTGN_COLLECTIVE_TIMEOUT=") + text +
                ": give the seconds a collective may wait for the other ranks (0 = no timeout)");
  return seconds;
}

bool launched_by_mpirun() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"})
    if (std::getenv(name)) return true;
  return false;
}

}  // namespace

std::shared_ptr<Communicator> make_communicator(const std::string& name) {
  if (name == "local" || (name == "auto" && !launched_by_mpirun())) return local_communicator();
  if (name == "mpi" || name == "auto") {
#if DISTGN_WITH_MPI
    MpiOptions options;
    options.collective_timeout_s = collective_timeout_seconds();
    return mpi_communicator(mpi_world(), options);
#else
    throw Error("--comm " + name + ": this build of distgn has no MPI (install libopenmpi-dev and rebuild)");
#endif
  }
  if (name == "nccl") {
#if DISTGN_WITH_NCCL && DISTGN_WITH_MPI
    // NCCL bootstrapped over MPI_COMM_WORLD (mpirun starts the ranks), one
    // GPU per rank: the rank modulo the visible devices. A rank without one
    // still joins the bootstrap, which then raises on every rank.
    const MPI_Comm world = mpi_world();
    int rank = 0;
    MPI_Comm_rank(world, &rank);
    const int devices = cuda::device_count();
    return nccl_communicator_from_mpi(world, devices > 0 ? rank % devices : 0, collective_timeout_seconds());
#else
    throw Error("--comm nccl: this build of distgn has no NCCL (it needs CUDA, NCCL and MPI)");
#endif
  }
  throw Error("--comm " + name + ": use auto, local, mpi or nccl");
}

void finish_communicator(std::shared_ptr<Communicator>& comm) {
  comm.reset();  // frees split-off MPI communicators before MPI_Finalize
#if DISTGN_WITH_MPI
  if (mpi_initialised_here) MPI_Finalize();
#endif
}

}  // namespace distgn::cli
