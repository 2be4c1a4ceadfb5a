// distgn/array_split.hpp: how distgn cuts an axis over ranks, numpy.array_split's
// rule. The CLI (--shard-axis), the trainer (image rows) and the tests cut
// with it; a program that shards a tensor the same way gets the same parts.
#pragma once

#include <algorithm>
#include <cstdint>

namespace distgn {

struct SplitRange {
  int64_t begin;
  int64_t end;
  int64_t size() const { return end - begin; }
};

// Part `index` of `parts` of an extent: the first extent % parts parts are
// one longer than the rest; parts past the extent are empty.
inline SplitRange array_split_range(int64_t extent, int parts, int index) {
  const int64_t base = extent / parts, extra = extent % parts;
  const int64_t begin = index * base + std::min<int64_t>(index, extra);
  return {begin, begin + base + (index < extra ? 1 : 0)};
}

}  // namespace distgn
