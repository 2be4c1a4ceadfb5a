// The float16 row conversions the CPU kernels stage data with (F16C where
// the build has it) against core/half.hpp, which the Flax golden tests pin.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/half.hpp"
#include "cpu/half_rows.hpp"

using distgn::half_t;

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

}  // namespace

TEST_CASE("half rows: widen_row equals to_float on all 65536 patterns", "[cpu][half]") {
  INFO("F16C instructions: " << distgn::half_rows_in_hardware());
  std::vector<half_t> in(65536 + 11);  // + 11: an 8-wide step and a scalar tail after the 16-wide loop
  for (size_t i = 0; i < in.size(); ++i) in[i].bits = uint16_t(i);
  std::vector<float> out(in.size());
  distgn::widen_row(in.data(), out.data(), int64_t(in.size()));
  int mismatches = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    const float want = distgn::to_float(in[i]);
    // A NaN stays a NaN of the same sign (the instructions quiet a signalling one).
    const bool same = std::isnan(want) ? std::isnan(out[i]) && (bits_of(out[i]) >> 31) == (bits_of(want) >> 31)
                                       : bits_of(out[i]) == bits_of(want);
    if (!same) ++mismatches;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("half rows: narrow_row rounds like to_half", "[cpu][half]") {
  INFO("F16C instructions: " << distgn::half_rows_in_hardware());
  // Every float16 value, the midpoints between neighbours (ties to even),
  // a float either side of each midpoint, and a sweep of float bit patterns
  // covering subnormals, overflow, infinities and NaNs.
  std::vector<float> in;
  for (uint32_t h = 0; h < 0x7c00u; ++h) {
    const float lo = distgn::to_float(half_t{uint16_t(h)}), hi = distgn::to_float(half_t{uint16_t(h + 1)});
    const float mid = lo + (hi - lo) / 2;
    for (float v : {lo, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f)}) {
      in.push_back(v);
      in.push_back(-v);
    }
  }
  for (uint64_t u = 0; u <= 0xffffffffull; u += 4099) {
    float f;
    const uint32_t b = uint32_t(u);
    std::memcpy(&f, &b, 4);
    in.push_back(f);
  }
  in.push_back(65520.0f);  // rounds to inf
  in.push_back(65519.996f);
  while (in.size() % 16 != 11) in.push_back(1.0f);  // an 8-wide step and a scalar tail after the 16-wide loop
  std::vector<half_t> out(in.size());
  distgn::narrow_row(in.data(), out.data(), int64_t(in.size()));
  int mismatches = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    const half_t want = distgn::to_half(in[i]);
    const bool nan = (want.bits & 0x7fffu) > 0x7c00u;
    const bool same = nan ? (out[i].bits & 0x7fffu) > 0x7c00u && (out[i].bits & 0x8000u) == (want.bits & 0x8000u)
                          : out[i].bits == want.bits;
    if (!same && mismatches++ < 5) WARN("float bits " << std::hex << bits_of(in[i]) << ": got " << out[i].bits
                                                      << ", to_half " << want.bits);
  }
  CHECK(mismatches == 0);
  CHECK(in.size() > 1000000);
}
