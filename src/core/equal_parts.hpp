// Cutting n items into the fewest parts of at most max_part items, all of
// (nearly) one size, so that threads or cache blocks get equal work: 3136
// rows in parts of at most 1024 are 4 of 784, not 3 of 1024 and one of 64.
#pragma once

#include <cstdint>

namespace distgn {

struct EqualParts {
  int64_t count;  // 0 when n is 0
  int64_t size;   // items per part, the last part possibly fewer
};

inline EqualParts equal_parts(int64_t n, int64_t max_part) {
  if (n <= 0) return {0, 0};
  const int64_t count = (n + max_part - 1) / max_part;
  return {count, (n + count - 1) / count};
}

}  // namespace distgn
