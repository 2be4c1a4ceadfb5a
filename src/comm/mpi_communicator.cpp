// Communicator over MPI. Never frees or changes (error handler included) an
// MPI_Comm it did not create.
#include <climits>
#include <string>

#include "distgn/communicator.hpp"
#include "distgn/error.hpp"

namespace distgn {
namespace {

void check(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw Error(std::string(what) + " failed: " + std::string(text, size_t(length)));
}

int mpi_count(size_t count) {
  if (count > size_t(INT_MAX)) throw Error("collective of " + std::to_string(count) + " values exceeds MPI's int count");
  return int(count);
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owned_ && !finalized) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void allreduce_sum(double* data, size_t count) override {
    check(MPI_Allreduce(MPI_IN_PLACE, data, mpi_count(count), MPI_DOUBLE, MPI_SUM, comm_), "MPI_Allreduce");
  }
  void allreduce_sum(float* data, size_t count) override {
    check(MPI_Allreduce(MPI_IN_PLACE, data, mpi_count(count), MPI_FLOAT, MPI_SUM, comm_), "MPI_Allreduce");
  }
  void allgather(const double* send, size_t count, double* recv) override {
    check(MPI_Allgather(send, mpi_count(count), MPI_DOUBLE, recv, mpi_count(count), MPI_DOUBLE, comm_),
          "MPI_Allgather");
  }
  void allgather(const uint8_t* send, size_t count, uint8_t* recv) override {
    check(MPI_Allgather(send, mpi_count(count), MPI_BYTE, recv, mpi_count(count), MPI_BYTE, comm_),
          "MPI_Allgather");
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm part;
    check(MPI_Comm_split(comm_, color, key, &part), "MPI_Comm_split");
    return std::make_unique<MpiCommunicator>(part, true);
  }

 private:
  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::shared_ptr<Communicator> mpi_communicator(MPI_Comm comm) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw Error("mpi_communicator: MPI is not initialised (call MPI_Init first)");
  return std::make_shared<MpiCommunicator>(comm, false);
}

}  // namespace distgn
