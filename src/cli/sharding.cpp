// How `distgn` splits arrays over ranks and joins the results back, and the
// buffers they live in.
#include <algorithm>
#include <cstring>
#include <new>
#include <sstream>
#include <stdexcept>

#include "cli/cli.hpp"
#include "distgn/array_split.hpp"
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

std::string byte_count(int64_t bytes) {
  std::ostringstream text;
  text.setf(std::ios::fixed);
  text.precision(2);
  text << bytes << " bytes (" << double(bytes) / double(int64_t(1) << 30) << " GiB)";
  return text.str();
}

std::vector<uint8_t> allocate(int64_t bytes, const std::string& what) {
  const std::string message = "out of memory: " + what + " needs " + byte_count(bytes) +
                              " of memory it could not get; free memory or use a smaller input";
  try {
    return std::vector<uint8_t>(size_t(bytes));
  } catch (const std::bad_alloc&) {
    throw Error(message);
  } catch (const std::length_error&) {
    throw Error(message);
  }
}

void on_every_rank(Communicator& comm, const char* step_name, const std::function<void()>& step) {
  std::string error;
  try {
    step();
  } catch (const std::exception& e) {
    error = e.what();
  }
  agree_or_raise(comm, error, step_name);
}

Sharding requested_sharding(bool ranks_axis, const std::optional<int>& shard_axis) {
  if (ranks_axis && shard_axis) throw Error("--ranks-axis and --shard-axis exclude each other");
  if (ranks_axis) return {Sharding::Mode::ranks_axis, 0};
  if (shard_axis) return {Sharding::Mode::shard_axis, *shard_axis};
  return {};
}

bool shardable_axis(int axis, const std::vector<int64_t>& reduction_axes, int feature_axis) {
  return std::find(reduction_axes.begin(), reduction_axes.end(), int64_t(axis)) != reduction_axes.end() &&
         axis != feature_axis;
}

// a[begin:end] along axis (the axis dropped when asked); the whole range
// keeps a's bytes, without a copy.
static HostArray slice(HostArray a, int axis, int64_t begin, int64_t end, bool drop_axis) {
  const AxisSplit s = around(a.shape, axis);
  const int64_t bytes = dtype_size(a.dtype), length = end - begin;
  HostArray out{a.shape, a.dtype, {}};
  out.shape[size_t(axis)] = length;
  if (drop_axis) out.shape.erase(out.shape.begin() + axis);
  if (begin == 0 && end == s.extent) {
    out.bytes = std::move(a.bytes);
    return out;
  }
  out.bytes = allocate(s.outer * length * s.inner * bytes, "this rank's part " + shape_string(out.shape));
  if (out.bytes.empty()) return out;  // an empty part: no rows to copy (and no buffer to copy to)
  for (int64_t o = 0; o < s.outer; ++o)
    std::memcpy(out.bytes.data() + o * length * s.inner * bytes,
                a.bytes.data() + (o * s.extent + begin) * s.inner * bytes,
                size_t(length * s.inner * bytes));
  return out;
}

// This rank's part of an array that is sharded like x (an array that
// broadcasts along the axis, like a mask of extent 1 there, is shared whole).
HostArray shard(HostArray a, const Sharding& sharding, const Shape& x_shape, int rank,
                int ranks, const char* name) {
  switch (sharding.mode) {
    case Sharding::Mode::none: return a;
    case Sharding::Mode::ranks_axis:
      if (a.shape.size() != x_shape.size()) return a;
      if (a.shape[0] == 1) return slice(std::move(a), 0, 0, 1, true);  // the same for every rank
      if (a.shape[0] != ranks)
        throw Error(std::string("--ranks-axis: ") + name + " of shape " + shape_string(a.shape) +
                    " must have a leading axis of length " + std::to_string(ranks) +
                    " (one slice per rank) or 1 (shared by all)");
      return slice(std::move(a), 0, rank, rank + 1, true);
    case Sharding::Mode::shard_axis: {
      const size_t lead = x_shape.size() - a.shape.size();
      const int axis = sharding.axis - int(lead);
      // Shared only when it broadcasts there: x and dy of extent 1 are split
      // like any other extent (one rank gets the slice, the rest get none), or
      // every rank would add the same slice to dscale/dbias.
      if (axis < 0) return a;
      if (a.shape[size_t(axis)] == 1 && x_shape[size_t(sharding.axis)] != 1) return a;
      const auto [begin, end] = array_split_range(a.shape[size_t(axis)], ranks, rank);
      return slice(std::move(a), axis, begin, end, false);
    }
  }
  return a;
}

// The inverse of shard(): the whole array from every rank's part, on rank 0
// only (the rank that writes it; the others get an empty array).
HostArray unshard(Communicator& comm, HostArray part, const Sharding& sharding, const Shape& whole_shape) {
  if (sharding.mode == Sharding::Mode::none || comm.size() == 1) return part;
  std::vector<uint8_t> parts = comm.gather(part.bytes.data(), part.bytes.size(), 0);
  part.bytes = std::vector<uint8_t>();  // frees this rank's part
  if (comm.rank() != 0) return {};
  // Under ranks_axis the parts in rank order are the whole array already.
  if (sharding.mode == Sharding::Mode::ranks_axis) return {whole_shape, part.dtype, std::move(parts)};
  HostArray whole{whole_shape, part.dtype,
                  allocate(byte_size(whole_shape, part.dtype),
                           "the whole output " + shape_string(whole_shape))};
  const AxisSplit s = around(whole_shape, sharding.axis);
  const int64_t row = s.inner * dtype_size(part.dtype);
  std::vector<const uint8_t*> from;  // where each rank's part begins in `parts`
  int64_t offset = 0;
  for (int r = 0; r < comm.size(); ++r) {
    from.push_back(parts.data() + offset);
    const auto [begin, end] = array_split_range(s.extent, comm.size(), r);
    offset += s.outer * (end - begin) * row;
  }
  uint8_t* out = whole.bytes.data();
  for (int64_t o = 0; o < s.outer; ++o)
    for (int r = 0; r < comm.size(); ++r) {
      const auto [begin, end] = array_split_range(s.extent, comm.size(), r);
      const int64_t chunk = (end - begin) * row;
      out = std::copy_n(from[size_t(r)] + o * chunk, chunk, out);
    }
  return whole;
}

}  // namespace distgn::cli
