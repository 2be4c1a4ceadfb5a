#include "core/group_exchange.hpp"

#include <algorithm>
#include <cstring>

#include "distgn/error.hpp"

namespace distgn {
namespace {

// Fixed-size record each rank contributes to an agreement.
constexpr size_t kRecordBytes = 1024;
constexpr size_t kTextBytes = kRecordBytes - 16;

struct Record {
  bool valid;
  int64_t num_cells;
  std::string text;  // error message, or signature
};

void write_record(const Record& r, uint8_t* out) {
  std::memset(out, 0, kRecordBytes);
  out[0] = r.valid ? 1 : 0;
  std::memcpy(out + 8, &r.num_cells, sizeof r.num_cells);
  std::memcpy(out + 16, r.text.data(), std::min(r.text.size(), kTextBytes - 1));
}

Record read_record(const uint8_t* in) {
  Record r;
  r.valid = in[0] != 0;
  std::memcpy(&r.num_cells, in + 8, sizeof r.num_cells);
  const char* text = reinterpret_cast<const char*>(in + 16);
  r.text.assign(text, strnlen(text, kTextBytes));
  return r;
}

}  // namespace

void GroupExchange::agree(const RankInput& input) {
  const CollectiveLabel label("agreement of the ranks' inputs");
  const int ranks = group_.size();
  std::vector<uint8_t> mine(kRecordBytes), all(kRecordBytes * size_t(ranks));
  write_record({input.error.empty(), input.num_cells,
                input.error.empty() ? std::string(input.signature) : input.error},
               mine.data());
  group_.allgather(mine.data(), kRecordBytes, all.data());
  std::vector<Record> records;
  for (int r = 0; r < ranks; ++r) records.push_back(read_record(all.data() + size_t(r) * kRecordBytes));

  if (!input.error.empty()) throw Error(input.error);
  for (int r = 0; r < ranks; ++r)
    if (!records[size_t(r)].valid)
      throw Error("rank " + std::to_string(r) + " of this rank's group rejected its input: " +
                  records[size_t(r)].text);
  for (int r = 1; r < ranks; ++r)
    if (records[size_t(r)].text != records[0].text || records[size_t(r)].num_cells != records[0].num_cells)
      throw Error("the ranks of a group disagree on what must be shared (only reduced axes may differ): rank 0 has " +
                  records[0].text + "; rank " + std::to_string(r) + " has " + records[size_t(r)].text);
  agreed_ = true;
  agreed_signature_ = std::string(input.signature);
  agreed_cells_ = input.num_cells;
}

bool GroupExchange::gather_moments(const std::vector<CellMoments>& moments, bool valid) {
  const size_t per_rank = 1 + 3 * size_t(agreed_cells_);
  send_.assign(per_rank, 0.0);
  send_[0] = valid ? 0.0 : 1.0;
  if (valid)
    for (size_t i = 0; i < size_t(agreed_cells_); ++i) {
      send_[1 + 3 * i] = moments[i].count;
      send_[2 + 3 * i] = moments[i].mean;
      send_[3 + 3 * i] = moments[i].m2;
    }
  receive_.resize(per_rank * size_t(group_.size()));
  group_.allgather(send_.data(), per_rank, receive_.data());
  for (int r = 0; r < group_.size(); ++r)
    if (receive_[size_t(r) * per_rank] != 0.0) return false;
  return true;
}

void GroupExchange::merge(const RankInput& input, std::vector<CellMoments>& moments) {
  if (group_.size() == 1) {
    if (!input.error.empty()) throw Error(input.error);
    return;
  }
  const CollectiveLabel label("forward statistics of GroupNorm");
  const bool unchanged =
      agreed_ && input.error.empty() && input.signature == agreed_signature_;
  // Every rank takes the same path: once agreed, all run the steady-state
  // allgather; any rank flagging a change there sends all to agree().
  bool done = agreed_ && gather_moments(moments, unchanged);
  if (!done) {
    agree(input);
    done = gather_moments(moments, true);
  }
  // Each rank's record is its flag, then its moments.
  merge_in_rank_order(receive_.data() + 1, 1 + 3 * size_t(agreed_cells_), group_.size(), agreed_cells_,
                      moments.data());
}

void merge_in_rank_order(const double* gathered, size_t stride, int ranks, int64_t cells, CellMoments* moments) {
  for (size_t i = 0; i < size_t(cells); ++i) {
    CellMoments merged{0, 0, 0};
    for (int r = 0; r < ranks; ++r) {
      const double* m = gathered + size_t(r) * stride + 3 * i;
      merged = merge_moments(merged, CellMoments{m[0], m[1], m[2]});
    }
    moments[i] = merged;
  }
}

void agree_or_raise(Communicator& comm, const std::string& error, std::string_view step) {
  GroupExchange(comm).agree({error, step, 0});
}

void sum_or_raise(Communicator& comm, const std::string& error, double* values, size_t count,
                  size_t flag) {
  const CollectiveLabel label("backward sums of GroupNorm");
  values[flag] = error.empty() ? 0.0 : 1.0;
  comm.allreduce_sum(values, count);
  if (!error.empty()) throw Error(error);
  if (values[flag] != 0.0)
    throw Error("another rank rejected its input to this call (its own error says why)");
}

void GroupExchange::sum(const std::string& error, double* values, size_t count) {
  if (group_.size() == 1) {
    if (!error.empty()) throw Error(error);
    return;
  }
  sum_or_raise(group_, error, values, count, 0);
}

}  // namespace distgn
