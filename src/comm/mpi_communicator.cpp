// Communicator over MPI. Never frees or changes (error handler included) an
// MPI_Comm it did not create.
//
// Every collective is started non-blocking and completed by complete(): with
// a timeout it polls the requests against a deadline (spinning for a while,
// so the latency-bound forward exchange costs what a blocking call does, then
// sleeping with backoff, so a long wait does not burn a core). To say WHO did
// not arrive, a rank that has waited a while sends its peers an arrival notice
// (the call's sequence number) on a private duplicate of the communicator and
// reads theirs: the fast path sends nothing. At the deadline it keeps reading
// notices for one more notice delay, so every rank that did arrive has been
// heard, then reports the others and aborts the job.
//
// Payloads are split into pieces of at most max_chunk_bytes so that no MPI
// count overflows int.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <thread>

#include "distgn/communicator.hpp"
#include "distgn/error.hpp"

namespace distgn {
namespace {

using Clock = std::chrono::steady_clock;

void check(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw Error(std::string(what) + " failed: " + std::string(text, size_t(length)));
}

// Tags of the private duplicate.
constexpr int kArrivalTag = 1, kGatherSizeTag = 2, kGatherDataTag = 3;
// A collective still waiting after this long sends its arrival notices.
constexpr double kNoticeAfterSeconds = 0.25;
// Polling spins (yielding the core to any other runnable process) this long
// before it starts sleeping, and sleeps at most this long. Open MPI moves a
// non-blocking collective on only inside MPI calls: each step of a
// multi-step algorithm over TCP waits for the next poll, so sleeping early
// made a 2-rank forward over TCP 4.05 ms against 0.71 ms blocking (100 us
// of spinning, naps up to 1 ms). Past the spin, a collective is waiting for a
// late rank, and short naps keep its steps moving without burning a core.
constexpr auto kSpin = std::chrono::milliseconds(20);
constexpr auto kMaxNap = std::chrono::microseconds(200);

// The pieces [offset, offset + count) a payload of `total` elements goes in.
struct Piece {
  size_t offset, count;
};
std::vector<Piece> pieces(size_t total, size_t element, size_t max_chunk_bytes) {
  const size_t per = std::max<size_t>(1, std::min(max_chunk_bytes / element, size_t(INT_MAX)));
  std::vector<Piece> out;
  for (size_t offset = 0; offset < total; offset += per) out.push_back({offset, std::min(per, total - offset)});
  return out;
}

// Requests of one collective, each with the rank whose arrival its
// completion proves (-1: none in particular).
struct Pending {
  std::vector<MPI_Request> requests;
  std::vector<int> proves;
  void add(MPI_Request request, int proves_rank = -1) {
    requests.push_back(request);
    proves.push_back(proves_rank);
  }
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, bool owned, MpiOptions options)
      : comm_(comm), owned_(owned), options_(options) {
    if (!(options_.collective_timeout_s >= 0))
      throw Error("mpi_communicator: collective timeout must be >= 0 seconds (0 = none), got " +
                  std::to_string(options_.collective_timeout_s));
    if (options_.max_chunk_bytes == 0) throw Error("mpi_communicator: max_chunk_bytes must be positive");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    heard_.assign(size_t(size_), -1);
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    // Notices are a few bytes, sent eagerly: done unless a peer vanished.
    for (auto& notice : notices_) MPI_Wait(&notice.request, MPI_STATUS_IGNORE);
    if (private_ != MPI_COMM_NULL) MPI_Comm_free(&private_);
    if (owned_) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void allreduce_sum(double* data, size_t count) override { allreduce(data, count, MPI_DOUBLE, sizeof(double)); }
  void allreduce_sum(float* data, size_t count) override { allreduce(data, count, MPI_FLOAT, sizeof(float)); }
  void allgather(const double* send, size_t count, double* recv) override {
    allgather(send, count, recv, MPI_DOUBLE, sizeof(double));
  }
  void allgather(const uint8_t* send, size_t count, uint8_t* recv) override {
    allgather(send, count, recv, MPI_BYTE, 1);
  }

  // Point to point on the private duplicate, so that the root knows exactly
  // which ranks have arrived (their size message came) and sizes may exceed
  // int: each rank's size, then its bytes in pieces, non-overtaking in order.
  std::vector<uint8_t> gather(const uint8_t* send, size_t bytes, int root) override {
    if (root < 0 || root >= size_)
      throw Error("gather: root " + std::to_string(root) + " is not a rank of this " + std::to_string(size_) +
                  "-rank communicator");
    const Call call = begin("gather");
    uint64_t mine = bytes;
    std::vector<uint8_t> result;
    Pending pending;
    if (rank_ != root) {
      MPI_Request request;
      // A finished send proves nothing: small ones finish without the root.
      check(MPI_Isend(&mine, 1, MPI_UINT64_T, root, kGatherSizeTag, private_, &request), "MPI_Isend");
      pending.add(request);
      for (const Piece& p : pieces(bytes, 1, options_.max_chunk_bytes)) {
        check(MPI_Isend(send + p.offset, int(p.count), MPI_BYTE, root, kGatherDataTag, private_, &request),
              "MPI_Isend");
        pending.add(request);
      }
      complete(call, pending);
      return result;
    }
    std::vector<uint64_t> sizes(size_t(size_), 0);
    sizes[size_t(rank_)] = mine;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      MPI_Request request;
      check(MPI_Irecv(&sizes[size_t(r)], 1, MPI_UINT64_T, r, kGatherSizeTag, private_, &request), "MPI_Irecv");
      pending.add(request, r);
    }
    complete(call, pending);
    pending = Pending{};
    uint64_t total = 0;
    for (uint64_t s : sizes) total += s;
    result.resize(size_t(total));
    size_t offset = 0;
    for (int r = 0; r < size_; ++r) {
      const size_t length = size_t(sizes[size_t(r)]);
      if (r == rank_) {
        if (length) std::memcpy(result.data() + offset, send, length);
      } else {
        for (const Piece& p : pieces(length, 1, options_.max_chunk_bytes)) {
          MPI_Request request;
          check(MPI_Irecv(result.data() + offset + p.offset, int(p.count), MPI_BYTE, r, kGatherDataTag, private_,
                          &request),
                "MPI_Irecv");
          pending.add(request);
        }
      }
      offset += length;
    }
    complete(call, pending);
    return result;
  }

  // MPI_Comm_split has no non-blocking form: the ranks first meet in a
  // polled allgather of (color, key), so a rank that never comes is reported
  // there; the split itself then only runs once everyone is in.
  std::unique_ptr<Communicator> split(int color, int key) override {
    const Call call = begin("split");
    int mine[2] = {color, key};
    std::vector<int> all(2 * size_t(size_));
    Pending pending;
    MPI_Request request;
    check(MPI_Iallgather(mine, 2, MPI_INT, all.data(), 2, MPI_INT, comm_, &request), "MPI_Iallgather");
    pending.add(request);
    complete(call, pending);
    MPI_Comm part;
    check(MPI_Comm_split(comm_, color, key, &part), "MPI_Comm_split");
    return std::make_unique<MpiCommunicator>(part, true, options_);
  }

 private:
  struct Call {
    const char* op;
    const char* label;
    int64_t seq;
    Clock::time_point start;
  };
  struct Notice {
    int64_t seq;
    MPI_Request request;
  };

  // Every collective starts here, on every rank in the same order: the
  // sequence number names the call in arrival notices.
  Call begin(const char* op) {
    if (private_ == MPI_COMM_NULL) {
      // The first collective makes the private duplicate; it is collective
      // too, so it is polled like any other.
      const Call setup{"setup of the communicator", CollectiveLabel::current(), ++seq_, Clock::now()};
      Pending pending;
      MPI_Request request;
      check(MPI_Comm_idup(comm_, &private_, &request), "MPI_Comm_idup");
      pending.add(request);
      complete(setup, pending);
      private_ready_ = true;
    }
    // Notices of calls that ended before this rank waited long pile up
    // unread on a rank that is never slow; read them now and then.
    if ((seq_ & 63) == 0) read_notices();
    return {op, CollectiveLabel::current(), ++seq_, Clock::now()};
  }

  void allreduce(void* data, size_t count, MPI_Datatype type, size_t element) {
    if (count == 0) return;
    const Call call = begin("allreduce");
    Pending pending;
    for (const Piece& p : pieces(count, element, options_.max_chunk_bytes)) {
      MPI_Request request;
      check(MPI_Iallreduce(MPI_IN_PLACE, static_cast<uint8_t*>(data) + p.offset * element, int(p.count), type,
                           MPI_SUM, comm_, &request),
            "MPI_Iallreduce");
      pending.add(request);
    }
    complete(call, pending);
  }

  void allgather(const void* send, size_t count, void* recv, MPI_Datatype type, size_t element) {
    if (count == 0) return;
    const Call call = begin("allgather");
    const auto* in = static_cast<const uint8_t*>(send);
    auto* out = static_cast<uint8_t*>(recv);
    Pending pending;
    const std::vector<Piece> parts = pieces(count, element, options_.max_chunk_bytes);
    for (const Piece& p : parts) {
      MPI_Request request;
      if (parts.size() == 1) {
        check(MPI_Iallgather(in, int(count), type, out, int(count), type, comm_, &request), "MPI_Iallgather");
      } else {
        // Piece p of rank r lands at r * count + offset: a block of p.count
        // elements whose extent is a whole rank's count.
        MPI_Datatype block, strided;
        check(MPI_Type_contiguous(int(p.count), type, &block), "MPI_Type_contiguous");
        check(MPI_Type_create_resized(block, 0, MPI_Aint(count * element), &strided), "MPI_Type_create_resized");
        check(MPI_Type_commit(&strided), "MPI_Type_commit");
        check(MPI_Iallgather(in + p.offset * element, int(p.count), type, out + p.offset * element, 1, strided,
                             comm_, &request),
              "MPI_Iallgather");
        // Freeing a type only marks it: the pending collective keeps it.
        MPI_Type_free(&strided);
        MPI_Type_free(&block);
      }
      pending.add(request);
    }
    complete(call, pending);
  }

  // Waits for every request of `pending`; past the deadline, reports and
  // aborts the job.
  void complete(const Call& call, Pending& pending) {
    if (pending.requests.empty()) return;
    if (options_.collective_timeout_s == 0) {
      check(MPI_Waitall(int(pending.requests.size()), pending.requests.data(), MPI_STATUSES_IGNORE), call.op);
      return;
    }
    // Time this rank spent waiting, not time it was itself stopped: a rank
    // resumed after a SIGSTOP (or as the launcher SIGCONTs it to kill it)
    // must not blame ranks that were waiting for it.
    double waited = 0;
    Clock::time_point last = call.start;
    const double give_up = options_.collective_timeout_s + kNoticeAfterSeconds + 0.25;
    size_t left = pending.requests.size();
    std::vector<int> done(pending.requests.size());
    bool noticed = false;
    auto nap = std::chrono::microseconds(0);
    for (;;) {
      int count = 0;
      check(MPI_Testsome(int(pending.requests.size()), pending.requests.data(), &count, done.data(),
                         MPI_STATUSES_IGNORE),
            call.op);
      if (count == MPI_UNDEFINED) return;
      for (int i = 0; i < count; ++i)
        if (const int r = pending.proves[size_t(done[size_t(i)])]; r >= 0) heard_[size_t(r)] = call.seq;
      left -= size_t(count);
      if (left == 0) return;
      const Clock::time_point now = Clock::now();
      waited += std::min(0.1, std::chrono::duration<double>(now - last).count());
      last = now;
      if (now - call.start < kSpin) {
        std::this_thread::yield();
        continue;
      }
      // The duplicate may carry notices only once MPI_Comm_idup has
      // completed (MPI forbids using it before): not while it is made.
      if (waited >= kNoticeAfterSeconds && private_ready_) {
        if (!noticed) send_notices(call.seq);
        noticed = true;
        read_notices();
      }
      if (waited >= give_up) abort_job(call);
      nap = std::min(kMaxNap, std::max(nap * 2, std::chrono::microseconds(10)));
      std::this_thread::sleep_for(nap);
    }
  }

  void send_notices(int64_t seq) {
    while (!notices_.empty()) {
      int finished = 0;
      check(MPI_Test(&notices_.front().request, &finished, MPI_STATUS_IGNORE), "MPI_Test");
      if (!finished) break;
      notices_.pop_front();
    }
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      notices_.push_back({seq, MPI_REQUEST_NULL});
      check(MPI_Isend(&notices_.back().seq, 1, MPI_INT64_T, r, kArrivalTag, private_, &notices_.back().request),
            "MPI_Isend");
    }
  }

  void read_notices() {
    for (;;) {
      int waiting = 0;
      MPI_Status status;
      check(MPI_Iprobe(MPI_ANY_SOURCE, kArrivalTag, private_, &waiting, &status), "MPI_Iprobe");
      if (!waiting) return;
      int64_t seq = 0;
      check(MPI_Recv(&seq, 1, MPI_INT64_T, status.MPI_SOURCE, kArrivalTag, private_, MPI_STATUS_IGNORE), "MPI_Recv");
      int64_t& heard = heard_[size_t(status.MPI_SOURCE)];
      heard = std::max(heard, seq);
    }
  }

  [[noreturn]] void abort_job(const Call& call) {
    std::string missing;
    for (int r = 0; r < size_; ++r)
      if (r != rank_ && heard_[size_t(r)] < call.seq) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
    char timeout[32];
    std::snprintf(timeout, sizeof timeout, "%g", options_.collective_timeout_s);
    std::string text = std::string("distgn: collective ") + call.op;
    if (call.label) text += std::string(" (") + call.label + ")";
    text += std::string(" timed out after ") + timeout + " s on rank " + std::to_string(rank_) + " of " +
            std::to_string(size_) + "; ";
    text += !private_ready_ ? "which rank(s) did not arrive is unknown: this was the communicator's first collective"
            : missing.empty() ? "every rank arrived, but one stopped inside it"
                              : "rank(s) " + missing + " did not arrive";
    text += " (set DISTGN_COLLECTIVE_TIMEOUT or MpiOptions::collective_timeout_s to wait longer); aborting the job\n";
    std::fputs(text.c_str(), stderr);
    std::fflush(stderr);
    MPI_Abort(comm_, 1);
    std::abort();  // MPI_Abort does not return; if it did, still end
  }

  MPI_Comm comm_;
  bool owned_;
  MpiOptions options_;
  int rank_ = 0, size_ = 1;
  MPI_Comm private_ = MPI_COMM_NULL;
  bool private_ready_ = false;  // MPI_Comm_idup of private_ has completed
  int64_t seq_ = 0;
  std::vector<int64_t> heard_;  // the latest call each rank said it arrived at
  std::deque<Notice> notices_;  // deque: buffers stay put while sends are pending
};

}  // namespace

std::shared_ptr<Communicator> mpi_communicator(MPI_Comm comm, MpiOptions options) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw Error("mpi_communicator: MPI is not initialised (call MPI_Init first)");
  return std::make_shared<MpiCommunicator>(comm, false, options);
}

}  // namespace distgn
