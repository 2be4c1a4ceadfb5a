// distgn/communicator.hpp: the collectives a layer needs, over whatever
// transport the caller runs (none, MPI, NCCL).
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "distgn/build_config.hpp"
#if DISTGN_WITH_MPI
#include <mpi.h>
#endif

#if DISTGN_WITH_NCCL
struct ncclComm;     // ncclComm_t is ncclComm*
struct CUstream_st;  // cudaStream_t is CUstream_st*
#endif

namespace distgn {

// A set of ranks that run collectives together. Every collective is blocking
// and must be called by every rank of the communicator in the same order.
// Buffers are host memory unless an implementation says otherwise.
class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // In-place elementwise sum over all ranks; every rank gets the result.
  virtual void allreduce_sum(double* data, size_t count) = 0;
  virtual void allreduce_sum(float* data, size_t count) = 0;

  // recv[r * count + i] = rank r's send[i]; recv holds count * size() values.
  virtual void allgather(const double* send, size_t count, double* recv) = 0;
  virtual void allgather(const uint8_t* send, size_t count, uint8_t* recv) = 0;

  // Rank `root` receives every rank's `bytes` bytes of `send` concatenated
  // in rank order (sizes may differ per rank); the result is empty on the
  // other ranks. Collective.
  virtual std::vector<uint8_t> gather(const uint8_t* send, size_t bytes, int root) = 0;

  // Partitions the ranks: those passing the same color form one new
  // communicator, ordered by key (ties by rank). Collective over all ranks.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;
};

// Names what the collectives this thread starts while it lives are for
// ("forward statistics of GroupNorm"), so that a collective timeout can say
// which call of the caller's hung. Scopes nest; the innermost names the call.
// `what` must outlive the scope (a string literal).
class CollectiveLabel {
 public:
  explicit CollectiveLabel(const char* what) : previous_(current_) { current_ = what; }
  ~CollectiveLabel() { current_ = previous_; }
  CollectiveLabel(const CollectiveLabel&) = delete;
  CollectiveLabel& operator=(const CollectiveLabel&) = delete;

  // The innermost label of this thread, or null outside every scope.
  static const char* current() { return current_; }

 private:
  static inline thread_local const char* current_ = nullptr;
  const char* previous_;
};

// The communicator of one process alone (size 1): every collective is a copy.
std::shared_ptr<Communicator> local_communicator();

// For a program's own steps that must fail together rather than leave the
// other ranks waiting in their next collective: each rank passes its error
// ("" when its step succeeded) and the step's name, and when any rank
// failed, or a rank is in another step, every rank raises distgn::Error (a
// failed rank its own message; the others which rank failed, and why).
// Collective over comm: one allgather of 1 KiB per rank.
void agree_or_raise(Communicator& comm, const std::string& error, std::string_view step);

// How long a collective waits for the other ranks before it ends the job,
// instead of hanging forever on a rank that stopped or died (0 = forever).
// The layer's collectives run on the communicator the caller gave the layer,
// so this is also the layer's timeout.
constexpr double kDefaultCollectiveTimeoutSeconds = 600;

#if DISTGN_WITH_MPI
struct MpiOptions {
  // Seconds each collective may wait; 0 waits forever. When one times out,
  // every rank still waiting writes to stderr which call it was in and which
  // ranks did not arrive, e.g. "distgn: collective allgather (forward
  // statistics of GroupNorm) timed out after 5 s on rank 0; rank(s) 1 did not
  // arrive", and MPI_Abort ends the job.
  double collective_timeout_s = kDefaultCollectiveTimeoutSeconds;
  // The largest piece, in bytes (but at least one element), a collective
  // hands MPI at once: payloads beyond MPI's int counts go in pieces. Tests
  // make it small to exercise the pieces.
  size_t max_chunk_bytes = size_t(INT_MAX) / 8 * 8;
};

// Wraps an MPI communicator the caller owns (default: MPI_COMM_WORLD); MPI
// must be initialised and outlive it. Not collective itself; the first
// collective duplicates `comm` once for the communicator's own point-to-point
// traffic (gather, arrival notices), which the caller's messages can never
// match. Communicators it splits off are its own, freed with them, and keep
// `options`. Buffers are host memory: Debian's Open MPI is not CUDA-aware.
std::shared_ptr<Communicator> mpi_communicator(MPI_Comm comm = MPI_COMM_WORLD, MpiOptions options = {});
#endif

#if DISTGN_WITH_NCCL
// What an NCCL communicator offers beyond the Communicator interface:
// collectives on device memory, asynchronous on its stream (the caller
// orders its own work against stream()). The Communicator interface's
// collectives of an NCCL communicator take host buffers like every other
// (staged through device memory and synchronised), which is what the layer's
// exchange uses.
class DeviceCollectives {
 public:
  virtual ~DeviceCollectives() = default;
  virtual void allreduce_sum_device(double* data, size_t count) = 0;
  virtual void allreduce_sum_device(float* data, size_t count) = 0;
  // recv[r * bytes + i] = rank r's send[i].
  virtual void allgather_device(const void* send, size_t bytes, void* recv) = 0;
  virtual CUstream_st* stream() const = 0;
};

// Wraps an NCCL communicator and the stream its collectives run on; the
// caller owns both and keeps them alive. split() makes communicators (and
// streams) of its own with ncclCommSplit, with the same timeout. A host
// collective still unfinished after `collective_timeout_s` seconds (0 =
// forever) writes which call timed out to stderr, ncclCommAbort()s and exits
// the process (the launcher then ends the job); NCCL cannot tell which rank
// is missing. The device collectives are asynchronous: the caller's own
// synchronisation decides how long they are waited for.
std::shared_ptr<Communicator> nccl_communicator(ncclComm* comm, CUstream_st* stream,
                                                double collective_timeout_s = kDefaultCollectiveTimeoutSeconds);
#if DISTGN_WITH_MPI
// Bootstraps NCCL over the ranks of `comm` on CUDA device `device` (rank 0
// makes the unique id, MPI_Bcast shares it), with a stream of its own; both
// are released with the result. Collective over comm; raises on every rank
// if one rank fails. The timeout is nccl_communicator's.
std::shared_ptr<Communicator> nccl_communicator_from_mpi(MPI_Comm comm, int device,
                                                         double collective_timeout_s = kDefaultCollectiveTimeoutSeconds);
#endif
// The device collectives of `comm` if it is an NCCL communicator (not a
// wrapper around one), else null.
DeviceCollectives* device_collectives(Communicator& comm);
#endif

// Counts what passes through another communicator: for tests and benchmarks.
// Collectives of communicators it splits off are counted here too.
class CountingCommunicator : public Communicator {
 public:
  struct Counts {
    int64_t collectives = 0;
    int64_t bytes = 0;          // payload this rank contributed
    double seconds = 0.0;       // wall time inside collectives
  };

  explicit CountingCommunicator(std::shared_ptr<Communicator> inner);

  Counts counts() const { return *counts_; }
  void reset() { *counts_ = Counts{}; }

  int rank() const override;
  int size() const override;
  void allreduce_sum(double* data, size_t count) override;
  void allreduce_sum(float* data, size_t count) override;
  void allgather(const double* send, size_t count, double* recv) override;
  void allgather(const uint8_t* send, size_t count, uint8_t* recv) override;
  std::vector<uint8_t> gather(const uint8_t* send, size_t bytes, int root) override;
  std::unique_ptr<Communicator> split(int color, int key) override;

 private:
  CountingCommunicator(std::shared_ptr<Communicator> inner, std::shared_ptr<Counts> counts);
  template <class F>
  void timed(size_t bytes, F&& collective);

  std::shared_ptr<Communicator> inner_;
  std::shared_ptr<Counts> counts_;
};

}  // namespace distgn
