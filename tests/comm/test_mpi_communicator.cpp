// The MPI communicator's collectives under mpiexec (CTest runs 1 to 4
// ranks): exact results with the default pieces and with payloads forced
// into 7-byte pieces, the path payloads beyond MPI's int counts take, and a
// gather whose ranks bring different sizes.
#include <catch2/catch.hpp>
#include <numeric>

#include "distgn/communicator.hpp"

using namespace distgn;

namespace {

MpiOptions tiny_pieces() {
  MpiOptions options;
  options.max_chunk_bytes = 7;
  return options;
}

// Rank r's i-th value: distinct per rank and index, exact in float and double.
double value(int r, size_t i) { return double(r * 1000 + int(i % 997)); }

void check_collectives(Communicator& comm) {
  const int ranks = comm.size(), me = comm.rank();
  const size_t count = 29;  // not a multiple of any piece
  std::vector<double> sums(count);
  std::vector<float> float_sums(count);
  for (size_t i = 0; i < count; ++i) {
    sums[i] = value(me, i);
    float_sums[i] = float(value(me, i));
  }
  comm.allreduce_sum(sums.data(), count);
  comm.allreduce_sum(float_sums.data(), count);
  for (size_t i = 0; i < count; ++i) {
    double expected = 0;
    for (int r = 0; r < ranks; ++r) expected += value(r, i);
    REQUIRE(sums[i] == expected);
    REQUIRE(float_sums[i] == float(expected));
  }

  std::vector<double> mine(count), all(count * size_t(ranks));
  for (size_t i = 0; i < count; ++i) mine[i] = value(me, i);
  comm.allgather(mine.data(), count, all.data());
  for (int r = 0; r < ranks; ++r)
    for (size_t i = 0; i < count; ++i) REQUIRE(all[size_t(r) * count + i] == value(r, i));

  std::vector<uint8_t> bytes(count), gathered(count * size_t(ranks));
  for (size_t i = 0; i < count; ++i) bytes[i] = uint8_t(me * 31 + int(i));
  comm.allgather(bytes.data(), count, gathered.data());
  for (int r = 0; r < ranks; ++r)
    for (size_t i = 0; i < count; ++i) REQUIRE(gathered[size_t(r) * count + i] == uint8_t(r * 31 + int(i)));

  // Rank r brings 5 * r + 3 bytes (rank 0 three, so sizes differ and one
  // rank's bytes span several pieces); every root gets them in rank order.
  for (int root = 0; root < ranks; ++root) {
    std::vector<uint8_t> send(size_t(5 * me + 3));
    std::iota(send.begin(), send.end(), uint8_t(me * 50));
    const std::vector<uint8_t> result = comm.gather(send.data(), send.size(), root);
    if (me != root) {
      REQUIRE(result.empty());
      continue;
    }
    std::vector<uint8_t> expected;
    for (int r = 0; r < ranks; ++r)
      for (int i = 0; i < 5 * r + 3; ++i) expected.push_back(uint8_t(r * 50 + i));
    REQUIRE(result == expected);
  }
  // A rank may bring nothing.
  const std::vector<uint8_t> none = comm.gather(nullptr, 0, 0);
  REQUIRE(none.empty());
}

}  // namespace

TEST_CASE("MPI collectives are exact with the default pieces") {
  auto comm = mpi_communicator(MPI_COMM_WORLD);
  check_collectives(*comm);
}

TEST_CASE("MPI collectives are exact when every payload goes in 7-byte pieces") {
  auto comm = mpi_communicator(MPI_COMM_WORLD, tiny_pieces());
  check_collectives(*comm);
}

TEST_CASE("communicators split off keep the pieces and stay exact") {
  auto comm = mpi_communicator(MPI_COMM_WORLD, tiny_pieces());
  // Two parts, the odd ranks in reverse order.
  auto part = comm->split(comm->rank() % 2, -comm->rank());
  REQUIRE(part->size() == (comm->size() + 1 - comm->rank() % 2) / 2);
  check_collectives(*part);
}

TEST_CASE("a gather to a rank that does not exist is refused on every rank") {
  auto comm = mpi_communicator(MPI_COMM_WORLD);
  const uint8_t byte = 1;
  REQUIRE_THROWS_WITH(comm->gather(&byte, 1, comm->size()), Catch::Contains("is not a rank"));
}
