// The collectives of a call, over the ranks of one group: the shape agreement
// that makes a bad input fail on every rank instead of hanging, the merge of
// per-cell moments (forward) and the sum of backward partials.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/cell_stats.hpp"
#include "distgn/communicator.hpp"

namespace distgn {

// What one rank brings to a call: its error message (empty when its input is
// valid) and, when valid, the description of everything the ranks of a group
// must share (non-reduced extents, C, G, dtypes, layout, configuration).
struct RankInput {
  std::string error;
  std::string_view signature;
  int64_t num_cells = 0;
};

class GroupExchange {
 public:
  explicit GroupExchange(Communicator& group) : group_(group) {}

  // Replaces `moments` (num_cells entries) by the merge over the group's
  // ranks in rank order (Chan's formula), bitwise the same on every rank.
  // One allgather once the group has agreed on the signature; a new or
  // failing input on any rank makes every rank renegotiate, and every rank
  // raises the error if one rank's input is invalid or the ranks disagree.
  void merge(const RankInput& input, std::vector<CellMoments>& moments);

  // Sums values[1..count) over the group in one allreduce; values[0] is the
  // slot of the error flag. Raises on every rank if any rank passed an error.
  void sum(const std::string& error, double* values, size_t count);

  // Agreement alone: every rank raises if any rank's input is invalid or
  // the signatures differ.
  void agree(const RankInput& input);

 private:
  bool gather_moments(const std::vector<CellMoments>& moments, bool valid);

  Communicator& group_;
  bool agreed_ = false;
  std::string agreed_signature_;
  int64_t agreed_cells_ = 0;
  std::vector<double> send_, receive_;
};

// moments[cell] = the merge of the ranks' moments of each cell, in rank
// order (Chan's formula): rank r's count, mean and M2 of cell i are
// gathered[r * stride + 3 * i + 0..2]. The one arithmetic of the forward
// merge, for GroupExchange and for a caller's own collective.
void merge_in_rank_order(const double* gathered, size_t stride, int ranks, int64_t cells, CellMoments* moments);

// Sums values[0..count) over `comm` in one allreduce, values[flag] being the
// slot of the error flag: raises on every rank if any rank passed an error.
void sum_or_raise(Communicator& comm, const std::string& error, double* values, size_t count,
                  size_t flag);

}  // namespace distgn
