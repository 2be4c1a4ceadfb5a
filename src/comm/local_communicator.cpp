// The communicator of a single process: collectives are copies.
#include <algorithm>
#include <chrono>

#include <string>

#include "distgn/communicator.hpp"
#include "distgn/error.hpp"

namespace distgn {
namespace {

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allreduce_sum(double*, size_t) override {}
  void allreduce_sum(float*, size_t) override {}
  void allgather(const double* send, size_t count, double* recv) override {
    std::copy(send, send + count, recv);
  }
  void allgather(const uint8_t* send, size_t count, uint8_t* recv) override {
    std::copy(send, send + count, recv);
  }
  std::vector<uint8_t> gather(const uint8_t* send, size_t bytes, int root) override {
    if (root != 0) throw Error("gather: root " + std::to_string(root) + " is not a rank of a 1-rank communicator");
    return std::vector<uint8_t>(send, send + bytes);
  }
  std::unique_ptr<Communicator> split(int, int) override {
    return std::make_unique<LocalCommunicator>();
  }
};

}  // namespace

std::shared_ptr<Communicator> local_communicator() { return std::make_shared<LocalCommunicator>(); }

CountingCommunicator::CountingCommunicator(std::shared_ptr<Communicator> inner)
    : CountingCommunicator(std::move(inner), std::make_shared<Counts>()) {}

CountingCommunicator::CountingCommunicator(std::shared_ptr<Communicator> inner,
                                           std::shared_ptr<Counts> counts)
    : inner_(std::move(inner)), counts_(std::move(counts)) {}

int CountingCommunicator::rank() const { return inner_->rank(); }
int CountingCommunicator::size() const { return inner_->size(); }

template <class F>
void CountingCommunicator::timed(size_t bytes, F&& collective) {
  const auto start = std::chrono::steady_clock::now();
  collective();
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  counts_->collectives += 1;
  counts_->bytes += int64_t(bytes);
  counts_->seconds += elapsed.count();
}

void CountingCommunicator::allreduce_sum(double* data, size_t count) {
  timed(count * sizeof(double), [&] { inner_->allreduce_sum(data, count); });
}
void CountingCommunicator::allreduce_sum(float* data, size_t count) {
  timed(count * sizeof(float), [&] { inner_->allreduce_sum(data, count); });
}
void CountingCommunicator::allgather(const double* send, size_t count, double* recv) {
  timed(count * sizeof(double), [&] { inner_->allgather(send, count, recv); });
}
void CountingCommunicator::allgather(const uint8_t* send, size_t count, uint8_t* recv) {
  timed(count, [&] { inner_->allgather(send, count, recv); });
}
std::vector<uint8_t> CountingCommunicator::gather(const uint8_t* send, size_t bytes, int root) {
  std::vector<uint8_t> result;
  timed(bytes, [&] { result = inner_->gather(send, bytes, root); });
  return result;
}
std::unique_ptr<Communicator> CountingCommunicator::split(int color, int key) {
  std::unique_ptr<Communicator> part;
  timed(0, [&] { part = inner_->split(color, key); });
  return std::unique_ptr<Communicator>(
      new CountingCommunicator(std::shared_ptr<Communicator>(std::move(part)), counts_));
}

}  // namespace distgn
