// How `distgn` splits arrays over ranks and joins the results back.
#include <algorithm>
#include <cstring>

#include "cli/cli.hpp"
#include "distgn/error.hpp"

namespace distgn::cli {
namespace {

// Row-major view of a shape around one axis: [outer][extent][inner].
struct AxisSplit {
  int64_t outer = 1, extent = 1, inner = 1;
};
AxisSplit around(const Shape& shape, int axis) {
  AxisSplit s;
  for (int d = 0; d < int(shape.size()); ++d) {
    if (d < axis) s.outer *= shape[size_t(d)];
    else if (d == axis) s.extent = shape[size_t(d)];
    else s.inner *= shape[size_t(d)];
  }
  return s;
}

}  // namespace

std::pair<int64_t, int64_t> split_range(int64_t n, int parts, int r) {
  const int64_t base = n / parts, extra = n % parts;
  const int64_t begin = r * base + std::min<int64_t>(r, extra);
  return {begin, begin + base + (r < extra ? 1 : 0)};
}

static HostArray slice(const HostArray& a, int axis, int64_t begin, int64_t end, bool drop_axis) {
  const AxisSplit s = around(a.shape, axis);
  const int64_t bytes = dtype_size(a.dtype), length = end - begin;
  HostArray out{a.shape, a.dtype, {}};
  out.shape[size_t(axis)] = length;
  if (drop_axis) out.shape.erase(out.shape.begin() + axis);
  out.bytes.resize(size_t(s.outer * length * s.inner * bytes));
  for (int64_t o = 0; o < s.outer; ++o)
    std::memcpy(out.bytes.data() + o * length * s.inner * bytes,
                a.bytes.data() + (o * s.extent + begin) * s.inner * bytes,
                size_t(length * s.inner * bytes));
  return out;
}

// This rank's part of an array that is sharded like x (an array that
// broadcasts along the axis, like a mask of extent 1 there, is shared whole).
HostArray shard(const HostArray& a, const Sharding& sharding, const Shape& x_shape, int rank,
                int ranks, const char* name) {
  switch (sharding.mode) {
    case Sharding::Mode::none: return a;
    case Sharding::Mode::ranks_axis:
      if (a.shape.size() != x_shape.size()) return a;
      if (a.shape[0] == 1) return slice(a, 0, 0, 1, true);  // the same for every rank
      if (a.shape[0] != ranks)
        throw Error(std::string("--ranks-axis: ") + name + " of shape " + shape_string(a.shape) +
                    " must have a leading axis of length " + std::to_string(ranks) +
                    " (one slice per rank) or 1 (shared by all)");
      return slice(a, 0, rank, rank + 1, true);
    case Sharding::Mode::shard_axis: {
      const size_t lead = x_shape.size() - a.shape.size();
      const int axis = sharding.axis - int(lead);
      // Shared only when it broadcasts there: x and dy of extent 1 are split
      // like any other extent (one rank gets the slice, the rest get none), or
      // every rank would add the same slice to dscale/dbias.
      if (axis < 0) return a;
      if (a.shape[size_t(axis)] == 1 && x_shape[size_t(sharding.axis)] != 1) return a;
      const auto [begin, end] = split_range(a.shape[size_t(axis)], ranks, rank);
      return slice(a, axis, begin, end, false);
    }
  }
  return a;
}

// Every rank's bytes, on every rank (sizes may differ).
static std::vector<std::vector<uint8_t>> gather_all(Communicator& comm, const std::vector<uint8_t>& mine) {
  const int ranks = comm.size();
  const double size = double(mine.size());
  std::vector<double> sizes(static_cast<size_t>(ranks));
  comm.allgather(&size, 1, sizes.data());
  size_t largest = 0;
  for (double s : sizes) largest = std::max(largest, size_t(s));
  std::vector<uint8_t> padded(mine), all(largest * size_t(ranks));
  padded.resize(largest);
  comm.allgather(padded.data(), largest, all.data());
  std::vector<std::vector<uint8_t>> parts;
  for (int r = 0; r < ranks; ++r)
    parts.emplace_back(all.begin() + std::ptrdiff_t(largest * size_t(r)),
                       all.begin() + std::ptrdiff_t(largest * size_t(r) + size_t(sizes[size_t(r)])));
  return parts;
}

// The inverse of shard(): the whole array from every rank's part.
HostArray unshard(Communicator& comm, const HostArray& part, const Sharding& sharding,
                  const Shape& whole_shape) {
  if (sharding.mode == Sharding::Mode::none || comm.size() == 1) return part;
  const auto parts = gather_all(comm, part.bytes);
  HostArray whole{whole_shape, part.dtype, {}};
  whole.bytes.reserve(size_t(element_count(whole_shape) * dtype_size(part.dtype)));
  if (sharding.mode == Sharding::Mode::ranks_axis) {
    for (const auto& p : parts) whole.bytes.insert(whole.bytes.end(), p.begin(), p.end());
    return whole;
  }
  const AxisSplit s = around(whole_shape, sharding.axis);
  const int64_t row = s.inner * dtype_size(part.dtype);
  for (int64_t o = 0; o < s.outer; ++o)
    for (int r = 0; r < comm.size(); ++r) {
      const auto [begin, end] = split_range(s.extent, comm.size(), r);
      const auto& p = parts[size_t(r)];
      const int64_t chunk = (end - begin) * row;
      whole.bytes.insert(whole.bytes.end(), p.begin() + o * chunk, p.begin() + (o + 1) * chunk);
    }
  return whole;
}


}  // namespace distgn::cli
