// Communicator over NCCL: wraps a caller's ncclComm_t and stream, or
// bootstraps one from MPI (rank 0 makes the unique id, MPI_Bcast shares it).
//
// The Communicator interface's collectives take host buffers (the layer's
// GroupExchange merges per-cell moments in host memory, in rank order, so
// every rank gets the same bits): they are staged through pinned host and
// device buffers on the communicator's stream, which is synchronised before
// they return. The payload is a few values per cell, so the staging costs two
// small copies beside the collective's own latency. DeviceCollectives adds
// the asynchronous device-pointer collectives a trainer with gradients on the
// GPU uses. split() is ncclCommSplit (NCCL >= 2.18).
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "cuda/device_memory.hpp"
#include "distgn/communicator.hpp"
#include "distgn/error.hpp"

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 18, 0)
#error "distgn's NCCL communicator needs NCCL 2.18 or newer (ncclCommSplit)"
#endif

namespace distgn {
namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Error(std::string("CUDA: ") + what + " failed: " + cudaGetErrorName(status) + ": " +
                cudaGetErrorString(status));
}

void check_nccl(ncclResult_t status, const char* what, ncclComm_t comm = nullptr) {
  if (status == ncclSuccess) return;
  std::string detail = ncclGetErrorString(status);
  if (comm) {
    const char* last = ncclGetLastError(comm);
    if (last && *last) detail += std::string(" (") + last + ")";
  }
  throw Error(std::string("NCCL: ") + what + " failed: " + detail);
}

// Switches to a device for the lifetime of the object.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
};

class NcclCommunicator final : public Communicator, public DeviceCollectives {
 public:
  NcclCommunicator(ncclComm_t comm, cudaStream_t stream, bool owns_comm, bool owns_stream, double timeout_s)
      : comm_(comm), stream_(stream), owns_comm_(owns_comm), owns_stream_(owns_stream), timeout_s_(timeout_s) {
    if (!(timeout_s_ >= 0))
      throw Error("nccl_communicator: collective timeout must be >= 0 seconds (0 = none), got " +
                  std::to_string(timeout_s_));
    check_nccl(ncclCommCuDevice(comm_, &device_), "ncclCommCuDevice", comm_);
    check_nccl(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank", comm_);
    check_nccl(ncclCommCount(comm_, &size_), "ncclCommCount", comm_);
  }

  ~NcclCommunicator() override {
    if (owns_comm_) ncclCommDestroy(comm_);
    if (owns_stream_) cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void allreduce_sum(double* data, size_t count) override { host_allreduce(data, count, ncclFloat64, sizeof(double)); }
  void allreduce_sum(float* data, size_t count) override { host_allreduce(data, count, ncclFloat32, sizeof(float)); }
  void allgather(const double* send, size_t count, double* recv) override {
    host_allgather(send, count, recv, ncclFloat64, sizeof(double));
  }
  void allgather(const uint8_t* send, size_t count, uint8_t* recv) override {
    host_allgather(send, count, recv, ncclUint8, 1);
  }

  // Sizes by an allgather, then the root receives each rank's bytes with
  // ncclRecv (one group), staged like the other host collectives.
  std::vector<uint8_t> gather(const uint8_t* send, size_t bytes, int root) override {
    if (root < 0 || root >= size_)
      throw Error("gather: root " + std::to_string(root) + " is not a rank of this " + std::to_string(size_) +
                  "-rank communicator");
    std::vector<uint8_t> result;
    const uint64_t mine = bytes;
    std::vector<uint64_t> sizes(static_cast<size_t>(size_));
    host_allgather(&mine, 1, sizes.data(), ncclUint64, sizeof(uint64_t));
    uint64_t total = 0;
    for (uint64_t s : sizes) total += s;
    if (total == 0) return result;
    DeviceScope scope(device_);
    const size_t staged = rank_ == root ? size_t(total) : bytes;
    reserve(staged);
    auto* host = static_cast<uint8_t*>(host_buffer_.data());
    auto* device = static_cast<uint8_t*>(device_buffer_.data());
    if (rank_ != root) {
      if (bytes == 0) return result;
      std::memcpy(host, send, bytes);
      check_cuda(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
      check_nccl(ncclSend(device, bytes, ncclUint8, root, comm_, stream_), "ncclSend", comm_);
      finish("gather");
      return result;
    }
    check_nccl(ncclGroupStart(), "ncclGroupStart");
    size_t offset = 0;
    for (int r = 0; r < size_; ++r) {
      if (r != rank_ && sizes[size_t(r)])
        check_nccl(ncclRecv(device + offset, size_t(sizes[size_t(r)]), ncclUint8, r, comm_, stream_), "ncclRecv",
                   comm_);
      offset += size_t(sizes[size_t(r)]);
    }
    check_nccl(ncclGroupEnd(), "ncclGroupEnd", comm_);
    check_cuda(cudaMemcpyAsync(host, device, staged, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
    finish("gather");
    result.assign(host, host + staged);
    size_t own = 0;
    for (int r = 0; r < rank_; ++r) own += size_t(sizes[size_t(r)]);
    if (bytes) std::memcpy(result.data() + own, send, bytes);
    return result;
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    DeviceScope scope(device_);
    ncclComm_t part = nullptr;
    // A null config: the new communicator inherits the parent's.
    check_nccl(ncclCommSplit(comm_, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &part, nullptr), "ncclCommSplit",
               comm_);
    if (!part) throw Error("NCCL: ncclCommSplit gave this rank no communicator (negative color)");
    cudaStream_t stream = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    return std::make_unique<NcclCommunicator>(part, stream, true, true, timeout_s_);
  }

  // ---- DeviceCollectives: device pointers, asynchronous on stream() ----
  void allreduce_sum_device(double* data, size_t count) override { device_allreduce(data, count, ncclFloat64); }
  void allreduce_sum_device(float* data, size_t count) override { device_allreduce(data, count, ncclFloat32); }
  void allgather_device(const void* send, size_t bytes, void* recv) override {
    if (bytes == 0) return;
    DeviceScope scope(device_);
    check_nccl(ncclAllGather(send, recv, bytes, ncclUint8, comm_, stream_), "ncclAllGather", comm_);
  }
  CUstream_st* stream() const override { return stream_; }

 private:
  void device_allreduce(void* data, size_t count, ncclDataType_t type) {
    if (count == 0) return;
    DeviceScope scope(device_);
    check_nccl(ncclAllReduce(data, data, count, type, ncclSum, comm_, stream_), "ncclAllReduce", comm_);
  }

  // Pinned host and device staging of at least `bytes` each.
  void reserve(size_t bytes) {
    if (bytes <= device_buffer_.bytes()) return;
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    device_buffer_ = cuda::DeviceArray();
    host_buffer_ = cuda::PinnedArray();
    const size_t size = std::max<size_t>(4096, bytes + bytes / 4);
    device_buffer_ = cuda::DeviceArray(size);
    host_buffer_ = cuda::PinnedArray(size);
  }

  void host_allreduce(void* data, size_t count, ncclDataType_t type, size_t element) {
    if (count == 0) return;
    DeviceScope scope(device_);
    const size_t bytes = count * element;
    reserve(bytes);
    std::memcpy(host_buffer_.data(), data, bytes);
    check_cuda(cudaMemcpyAsync(device_buffer_.data(), host_buffer_.data(), bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    check_nccl(ncclAllReduce(device_buffer_.data(), device_buffer_.data(), count, type, ncclSum, comm_, stream_), "ncclAllReduce",
               comm_);
    check_cuda(cudaMemcpyAsync(host_buffer_.data(), device_buffer_.data(), bytes, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
    finish("allreduce");
    std::memcpy(data, host_buffer_.data(), bytes);
  }

  void host_allgather(const void* send, size_t count, void* recv, ncclDataType_t type, size_t element) {
    if (count == 0) return;
    DeviceScope scope(device_);
    const size_t bytes = count * element, total = bytes * size_t(size_);
    // Device: [send | recv]; host: the same layout.
    reserve(bytes + total);
    auto* host = static_cast<uint8_t*>(host_buffer_.data());
    auto* device = static_cast<uint8_t*>(device_buffer_.data());
    std::memcpy(host, send, bytes);
    check_cuda(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    check_nccl(ncclAllGather(device, device + bytes, count, type, comm_, stream_), "ncclAllGather", comm_);
    check_cuda(cudaMemcpyAsync(host + bytes, device + bytes, total, cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync");
    finish("allgather");
    std::memcpy(recv, host + bytes, total);
  }

  // Waits for the stream like cudaStreamSynchronize, but polls it (and
  // NCCL's asynchronous error) against the collective timeout: past it, the
  // report goes to stderr, ncclCommAbort frees the GPU of the collective
  // that will never finish, and the process exits so the launcher ends the
  // job. NCCL does not say which peer is missing, so neither can the report.
  void finish(const char* op) {
    // Time spent waiting, not time this process was itself stopped.
    double waited = 0;
    auto last = std::chrono::steady_clock::now();
    auto nap = std::chrono::microseconds(0);
    for (;;) {
      const cudaError_t state = cudaStreamQuery(stream_);
      if (state == cudaSuccess) return;
      if (state != cudaErrorNotReady) check_cuda(state, "cudaStreamQuery");
      ncclResult_t async = ncclSuccess;
      check_nccl(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError", comm_);
      check_nccl(async, op, comm_);
      const auto now = std::chrono::steady_clock::now();
      waited += std::min(0.1, std::chrono::duration<double>(now - last).count());
      last = now;
      if (timeout_s_ > 0 && waited >= timeout_s_) abort_job(op);
      if (waited > 100e-6) {
        nap = std::min(std::chrono::microseconds(1000), std::max(nap * 2, std::chrono::microseconds(10)));
        std::this_thread::sleep_for(nap);
      }
    }
  }

  [[noreturn]] void abort_job(const char* op) {
    const char* label = CollectiveLabel::current();
    std::fprintf(stderr,
                 "distgn: collective %s%s%s%s over NCCL timed out after %g s on rank %d of %d; NCCL does not say "
                 "which rank(s) did not arrive (set DISTGN_COLLECTIVE_TIMEOUT to wait longer); aborting the job\n",
                 op, label ? " (" : "", label ? label : "", label ? ")" : "", timeout_s_, rank_, size_);
    std::fflush(stderr);
    ncclCommAbort(comm_);
    std::_Exit(EXIT_FAILURE);
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  bool owns_comm_, owns_stream_;
  double timeout_s_;
  int device_ = 0, rank_ = 0, size_ = 1;
  cuda::DeviceArray device_buffer_;  // staging of the host collectives
  cuda::PinnedArray host_buffer_;
};

}  // namespace

std::shared_ptr<Communicator> nccl_communicator(ncclComm* comm, CUstream_st* stream, double collective_timeout_s) {
  if (!comm) throw Error("nccl_communicator: no NCCL communicator given");
  return std::make_shared<NcclCommunicator>(comm, stream, false, false, collective_timeout_s);
}

#if DISTGN_WITH_MPI
std::shared_ptr<Communicator> nccl_communicator_from_mpi(MPI_Comm comm, int device, double collective_timeout_s) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw Error("nccl_communicator_from_mpi: MPI is not initialised (call MPI_Init first)");
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  // Every rank takes part in the broadcast, so a failure on rank 0 (or a bad
  // device anywhere, found by the allreduce) raises everywhere, never hangs.
  struct {
    int ok;
    ncclUniqueId id;
  } root{};
  std::string error;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || device < 0 || device >= devices)
    error = "nccl_communicator_from_mpi: CUDA device " + std::to_string(device) + " does not exist (" +
            std::to_string(devices) + " visible)";
  else if (cudaSetDevice(device) != cudaSuccess)
    error = "nccl_communicator_from_mpi: cannot use CUDA device " + std::to_string(device);
  if (rank == 0) root.ok = error.empty() && ncclGetUniqueId(&root.id) == ncclSuccess;
  MPI_Bcast(&root, int(sizeof root), MPI_BYTE, 0, comm);
  int bad = error.empty() && root.ok ? 0 : 1, any_bad = 0;
  MPI_Allreduce(&bad, &any_bad, 1, MPI_INT, MPI_MAX, comm);
  if (!error.empty()) throw Error(error);
  if (any_bad) throw Error("nccl_communicator_from_mpi: another rank could not set up NCCL (its own error says why)");
  ncclComm_t nccl = nullptr;
  check_nccl(ncclCommInitRank(&nccl, size, root.id, rank), "ncclCommInitRank");
  cudaStream_t stream = nullptr;
  const cudaError_t status = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (status != cudaSuccess) {
    ncclCommDestroy(nccl);
    check_cuda(status, "cudaStreamCreateWithFlags");
  }
  return std::make_shared<NcclCommunicator>(nccl, stream, true, true, collective_timeout_s);
}
#endif

DeviceCollectives* device_collectives(Communicator& comm) { return dynamic_cast<DeviceCollectives*>(&comm); }

}  // namespace distgn
