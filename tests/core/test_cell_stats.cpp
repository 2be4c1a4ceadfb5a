// Tests of one cell's statistics (src/core/cell_stats.hpp): partial moments
// from shifted sums, Chan's merge, finalisation into mean and rstd (semantics §4,
// §6), and the half / bfloat16 conversions every backend shares
// (src/core/half.hpp).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/cell_stats.hpp"
#include "core/half.hpp"
#include "reference.hpp"

using distgn::CellMoments;
using distgn::CellStats;
using distgn::DType;
using distgn::bfloat16_t;
using distgn::half_t;

namespace {

struct Direct {
  double count, mean, var;
};

// The reference's two-pass mean and population variance (long double).
Direct direct(const std::vector<double>& v) {
  const distgn_test::Moments m = distgn_test::two_pass_moments(v);
  return {double(m.count), double(m.mean), double(m.m2 / m.count)};
}

// Moments of v[begin, end) the way a kernel forms them: shifted by the
// part's first value.
CellMoments part_moments(const std::vector<double>& v, size_t begin, size_t end) {
  const double shift = begin < end ? v[begin] : 0.0;
  double sum = 0, sum_sq = 0;
  for (size_t i = begin; i < end; ++i) {
    const double d = v[i] - shift;
    sum += d;
    sum_sq += d * d;
  }
  return distgn::moments_from_shifted_sums(double(end - begin), shift, sum, sum_sq);
}

// Splits [0, n) at the sorted cut points and merges the parts left to right.
CellMoments merged_over(const std::vector<double>& v, std::vector<size_t> cuts) {
  cuts.insert(cuts.begin(), 0);
  cuts.push_back(v.size());
  CellMoments m{0, 0, 0};
  for (size_t i = 0; i + 1 < cuts.size(); ++i)
    m = distgn::merge_moments(m, part_moments(v, cuts[i], cuts[i + 1]));
  return m;
}

double rel(double got, double want) { return std::abs(got - want) / std::abs(want); }

float half_to_float(uint16_t bits) { return distgn::to_float(half_t{bits}); }
uint16_t float_to_half(float f) { return distgn::to_half(f).bits; }
uint16_t float_to_bf16(float f) { return distgn::to_bfloat16(f).bits; }
float bf16_to_float(uint16_t bits) { return distgn::to_float(bfloat16_t{bits}); }

}  // namespace

// ---- moments and merge -------------------------------------------------------

TEST_CASE("cell stats: shifted sums of one part give the two-pass mean and variance",
          "[cell_stats]") {
  std::mt19937_64 rng(1);
  std::normal_distribution<double> normal(3.0, 2.0);
  std::vector<double> v(1000);
  for (double& x : v) x = normal(rng);
  const Direct want = direct(v);
  const CellMoments m = part_moments(v, 0, v.size());
  CHECK(m.count == 1000);
  CHECK(rel(m.mean, want.mean) < 1e-14);
  CHECK(rel(m.m2 / m.count, want.var) < 1e-13);

  // A shift that is not a data value (e.g. 0) works too.
  double sum = 0, sum_sq = 0;
  for (double x : v) sum += x, sum_sq += x * x;
  const CellMoments zero_shift = distgn::moments_from_shifted_sums(1000, 0.0, sum, sum_sq);
  CHECK(rel(zero_shift.mean, want.mean) < 1e-13);
  CHECK(rel(zero_shift.m2 / 1000, want.var) < 1e-12);
}

TEST_CASE("cell stats: no positions give zero moments", "[cell_stats]") {
  const CellMoments m = distgn::moments_from_shifted_sums(0, 5.0, 0, 0);
  CHECK(m.count == 0);
  CHECK(m.mean == 0);
  CHECK(m.m2 == 0);
}

TEST_CASE("cell stats: merging random splits equals the two-pass statistics of the whole",
          "[cell_stats]") {
  std::mt19937_64 rng(2);
  std::normal_distribution<double> normal(-7.0, 0.5);
  for (int trial = 0; trial < 200; ++trial) {
    const size_t n = 1 + rng() % 300;
    std::vector<double> v(n);
    for (double& x : v) x = normal(rng);
    // 0 to 6 cuts anywhere, repeats allowed: empty parts at the ends and
    // in the middle.
    std::vector<size_t> cuts(rng() % 7);
    for (size_t& c : cuts) c = rng() % (n + 1);
    std::sort(cuts.begin(), cuts.end());
    const CellMoments m = merged_over(v, cuts);
    const Direct want = direct(v);
    INFO("trial " << trial << ", n " << n << ", parts " << cuts.size() + 1);
    CHECK(m.count == n);
    CHECK(rel(m.mean, want.mean) < 1e-13);
    CHECK(rel(m.m2 / m.count, want.var) < 1e-11);
  }
}

TEST_CASE("cell stats: merging with empty parts on either side changes nothing", "[cell_stats]") {
  const CellMoments empty{0, 0, 0};
  const CellMoments a{4, 2.5, 7.0};
  const CellMoments left = distgn::merge_moments(empty, a);
  const CellMoments right = distgn::merge_moments(a, empty);
  for (const CellMoments& m : {left, right}) {
    CHECK(m.count == 4);
    CHECK(m.mean == 2.5);
    CHECK(m.m2 == 7.0);
  }
  const CellMoments none = distgn::merge_moments(empty, empty);
  CHECK(none.count == 0);
}

TEST_CASE("cell stats: merging two known parts", "[cell_stats]") {
  // {1, 2, 3} and {10, 20}: mean 36/5, M2 = sum (x - 7.2)^2.
  const CellMoments a{3, 2.0, 2.0};
  const CellMoments b{2, 15.0, 50.0};
  const CellMoments m = distgn::merge_moments(a, b);
  CHECK(m.count == 5);
  CHECK(m.mean == Approx(7.2).epsilon(1e-15));
  const double m2 = (1 - 7.2) * (1 - 7.2) + (2 - 7.2) * (2 - 7.2) + (3 - 7.2) * (3 - 7.2) +
                    (10 - 7.2) * (10 - 7.2) + (20 - 7.2) * (20 - 7.2);
  CHECK(m.m2 == Approx(m2).epsilon(1e-14));
}

TEST_CASE("cell stats: accuracy when |mean|/std is 1e4 and 1e6", "[cell_stats]") {
  for (double ratio : {1e4, 1e6}) {
    for (double sign : {1.0, -1.0}) {
      std::mt19937_64 rng(uint64_t(ratio) + (sign > 0));
      const double std_dev = 0.25;
      std::normal_distribution<double> normal(sign * ratio * std_dev, std_dev);
      std::vector<double> v(4096);
      for (double& x : v) x = normal(rng);
      const Direct want = direct(v);
      INFO("ratio " << ratio << " sign " << sign);
      // One part, and chunks of 1000 merged the way the kernels merge them.
      for (const CellMoments& m :
           {part_moments(v, 0, v.size()), merged_over(v, {1000, 2000, 3000, 4000})}) {
        CHECK(m.count == 4096);
        CHECK(rel(m.mean, want.mean) < 1e-14);
        CHECK(rel(m.m2 / m.count, want.var) <= 1e-10);
      }
    }
  }
}

// ---- finalisation ------------------------------------------------------------

TEST_CASE("cell stats: finalize gives mean and rsqrt(var + eps)", "[cell_stats]") {
  const CellMoments m{8, 1.5, 8 * 4.0};  // var 4
  for (bool fast : {true, false}) {
    const CellStats s = distgn::finalize_moments(m, 1e-6, fast, DType::f64);
    CHECK(s.mean == 1.5);
    CHECK(s.rstd == Approx(1.0 / std::sqrt(4.0 + 1e-6)).epsilon(1e-15));
    CHECK_FALSE(s.variance_clamped);
  }
  const CellStats eps = distgn::finalize_moments(CellMoments{8, 0, 0}, 0.25, true, DType::f64);
  CHECK(eps.rstd == 2.0);
  CHECK_FALSE(eps.variance_clamped);
}

TEST_CASE("cell stats: an empty cell gives NaN mean and rstd", "[cell_stats]") {
  for (DType dtype : {DType::f64, DType::f32, DType::f16, DType::bf16})
    for (bool fast : {true, false}) {
      const CellStats s = distgn::finalize_moments(CellMoments{0, 0, 0}, 1e-6, fast, dtype);
      INFO("dtype " << int(dtype) << " fast " << fast);
      CHECK(std::isnan(s.mean));
      CHECK(std::isnan(s.rstd));
    }
}

TEST_CASE("cell stats: the fast-variance clamp applies only to negative variance",
          "[cell_stats]") {
  const CellMoments negative{4, 1.0, -1e-3};
  SECTION("fast: clamped to zero and flagged") {
    const CellStats s = distgn::finalize_moments(negative, 1e-2, true, DType::f64);
    CHECK(s.variance_clamped);
    CHECK(s.rstd == Approx(10.0).epsilon(1e-15));  // rsqrt(0 + 1e-2)
    CHECK(s.mean == 1.0);
  }
  SECTION("exact: no clamp") {
    const CellStats s = distgn::finalize_moments(negative, 1e-2, false, DType::f64);
    CHECK_FALSE(s.variance_clamped);
    CHECK(s.rstd == Approx(1.0 / std::sqrt(-1e-3 / 4 + 1e-2)).epsilon(1e-14));
  }
  SECTION("zero variance is not a clamp") {
    const CellStats s = distgn::finalize_moments(CellMoments{4, 1.0, 0.0}, 1e-2, true, DType::f64);
    CHECK_FALSE(s.variance_clamped);
  }
  SECTION("NaN propagates through the clamp, unflagged") {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (DType dtype : {DType::f64, DType::f32}) {
      const CellStats v = distgn::finalize_moments(CellMoments{4, 1.0, nan}, 1e-6, true, dtype);
      CHECK(std::isnan(v.rstd));
      CHECK_FALSE(v.variance_clamped);
      const CellStats m = distgn::finalize_moments(CellMoments{4, nan, nan}, 1e-6, true, dtype);
      CHECK(std::isnan(m.mean));
      CHECK(std::isnan(m.rstd));
    }
  }
}

TEST_CASE("cell stats: mean and rstd are rounded to the stats dtype", "[cell_stats]") {
  const double mean = 1.0 / 3.0;
  const double var = 2.0 / 7.0;
  const CellMoments m{10, mean, 10 * var};
  const double eps = 1e-6;

  const CellStats f64 = distgn::finalize_moments(m, eps, true, DType::f64);
  CHECK(f64.mean == mean);
  CHECK(f64.rstd == Approx(1.0 / std::sqrt(var + eps)).epsilon(1e-15));

  const CellStats f32 = distgn::finalize_moments(m, eps, true, DType::f32);
  CHECK(f32.mean == double(float(mean)));
  CHECK(f32.rstd == double(float(f32.rstd)));  // representable in f32
  CHECK(f32.rstd == Approx(1.0 / std::sqrt(var + eps)).epsilon(2e-7));

  const CellStats f16 = distgn::finalize_moments(m, eps, true, DType::f16);
  CHECK(f16.mean == double(half_to_float(float_to_half(float(mean)))));
  CHECK(f16.mean != double(float(mean)));
  CHECK(f16.rstd == double(half_to_float(float_to_half(float(f16.rstd)))));
  CHECK(f16.rstd == Approx(1.0 / std::sqrt(var + eps)).epsilon(1e-3));

  const CellStats bf16 = distgn::finalize_moments(m, eps, true, DType::bf16);
  CHECK(bf16.mean == double(bf16_to_float(float_to_bf16(float(mean)))));
  CHECK(bf16.mean != f16.mean);
  CHECK(bf16.rstd == double(bf16_to_float(float_to_bf16(float(bf16.rstd)))));
  CHECK(bf16.rstd == Approx(1.0 / std::sqrt(var + eps)).epsilon(8e-3));
}

TEST_CASE("cell stats: round_to keeps f64, rounds the narrower dtypes", "[cell_stats]") {
  const double v = 1.0 + std::ldexp(1.0, -30);
  CHECK(distgn::round_to(DType::f64, v) == v);
  CHECK(distgn::round_to(DType::f32, v) == 1.0);
  CHECK(distgn::round_to(DType::f16, 1.0 + std::ldexp(1.0, -11)) == 1.0);  // tie to even
  CHECK(distgn::round_to(DType::f16, 1.0 + 3 * std::ldexp(1.0, -11)) == 1.0 + std::ldexp(1.0, -9));
  CHECK(distgn::round_to(DType::bf16, 1.0 + std::ldexp(1.0, -8)) == 1.0);  // tie to even
  CHECK(distgn::round_to(DType::bf16, 3.0) == 3.0);
}

// ---- half and bfloat16 ---------------------------------------------------------

TEST_CASE("cell stats: every half bit pattern round-trips through float", "[half]") {
  int nan_count = 0, mismatches = 0;
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const uint16_t h = uint16_t(bits);
    const float f = half_to_float(h);
    const bool is_nan = (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0;
    if (is_nan) {
      ++nan_count;
      if (!std::isnan(f) || !std::isnan(half_to_float(float_to_half(f)))) ++mismatches;
      if ((float_to_half(f) & 0x7c00u) != 0x7c00u || (float_to_half(f) & 0x3ffu) == 0) ++mismatches;
      continue;
    }
    if (float_to_half(f) != h && ++mismatches <= 10)
      UNSCOPED_INFO("half bits " << std::hex << bits << " -> " << f << " -> "
                                 << float_to_half(f));
  }
  CHECK(nan_count == 2 * 1023);
  CHECK(mismatches == 0);
}

TEST_CASE("cell stats: half to float values at known points", "[half]") {
  CHECK(half_to_float(0x3c00) == 1.0f);
  CHECK(half_to_float(0xc000) == -2.0f);
  CHECK(half_to_float(0x7bff) == 65504.0f);
  CHECK(half_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(half_to_float(0x03ff) == 1023 * std::ldexp(1.0f, -24));
  CHECK(half_to_float(0x0400) == std::ldexp(1.0f, -14));
  CHECK(half_to_float(0x7c00) == std::numeric_limits<float>::infinity());
  CHECK(half_to_float(0xfc00) == -std::numeric_limits<float>::infinity());
  const float negative_zero = half_to_float(0x8000);
  CHECK(negative_zero == 0.0f);
  CHECK(std::signbit(negative_zero));
}

TEST_CASE("cell stats: to_half rounds to nearest, ties to even", "[half]") {
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(float_to_half(65504.0f) == 0x7bff);
  CHECK(float_to_half(65519.99f) == 0x7bff);
  CHECK(float_to_half(65520.0f) == 0x7c00);  // halfway past the max: to inf (even)
  CHECK(float_to_half(-65520.0f) == 0xfc00);
  CHECK(float_to_half(1e10f) == 0x7c00);
  CHECK(float_to_half(inf) == 0x7c00);
  CHECK(float_to_half(-inf) == 0xfc00);

  const float tiny = std::ldexp(1.0f, -24);  // smallest subnormal
  CHECK(float_to_half(tiny) == 0x0001);
  CHECK(float_to_half(std::ldexp(1.0f, -25)) == 0x0000);      // halfway: to even (0)
  CHECK(float_to_half(-std::ldexp(1.0f, -25)) == 0x8000);     // keeps the sign
  CHECK(float_to_half(std::ldexp(1.0f, -25) * 1.0001f) == 0x0001);
  CHECK(float_to_half(3 * std::ldexp(1.0f, -25)) == 0x0002);  // 1.5 ulp: to even (2)
  CHECK(float_to_half(5 * std::ldexp(1.0f, -25)) == 0x0002);  // 2.5 ulp: to even (2)
  CHECK(float_to_half(std::ldexp(1.0f, -26)) == 0x0000);
  // Subnormal to normal boundary: 1023.5 * 2^-24 rounds to 1024 * 2^-24 = 2^-14.
  CHECK(float_to_half(1023.5f * tiny) == 0x0400);
  CHECK(float_to_half(1022.5f * tiny) == 0x03fe);

  // Normal range: 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
  CHECK(float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);
  CHECK(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);
  CHECK(float_to_half(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)) == 0x3c01);
  // Carry into the exponent: 2 - 2^-11 is halfway between 2 - 2^-10 and 2.
  CHECK(float_to_half(2.0f - std::ldexp(1.0f, -11)) == 0x4000);
  CHECK(float_to_half(0.1f) == 0x2e66);
  CHECK(float_to_half(-0.0f) == 0x8000);
}

TEST_CASE("cell stats: to_half and to_bfloat16 keep NaN a NaN", "[half]") {
  // Quiet NaNs, and signalling ones whose payload sits only in the low bits
  // that the narrowing drops.
  for (uint32_t bits : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7f800100u,
                        0x7fffffffu, 0x7fa00000u}) {
    const float f = distgn::bits_float(bits);
    REQUIRE(std::isnan(f));
    INFO("float bits " << std::hex << bits);
    const uint16_t h = float_to_half(f);
    CHECK((h & 0x7c00u) == 0x7c00u);
    CHECK((h & 0x3ffu) != 0);
    CHECK((h & 0x8000u) == ((bits >> 16) & 0x8000u));  // sign kept
    CHECK(std::isnan(half_to_float(h)));
    const uint16_t b = float_to_bf16(f);
    CHECK((b & 0x7f80u) == 0x7f80u);
    CHECK((b & 0x7fu) != 0);
    CHECK(std::isnan(bf16_to_float(b)));
  }
}

TEST_CASE("cell stats: to_bfloat16 rounds to nearest, ties to even", "[half]") {
  const float inf = std::numeric_limits<float>::infinity();
  // Exactly representable values are kept.
  CHECK(float_to_bf16(1.0f) == 0x3f80);
  CHECK(float_to_bf16(-2.0f) == 0xc000);
  CHECK(float_to_bf16(inf) == 0x7f80);
  CHECK(float_to_bf16(-inf) == 0xff80);
  CHECK(float_to_bf16(0.0f) == 0x0000);
  CHECK(float_to_bf16(-0.0f) == 0x8000);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even (1).
  CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to even.
  CHECK(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);
  // Just above halfway rounds up, just below rounds down.
  CHECK(float_to_bf16(distgn::bits_float(0x3f808001u)) == 0x3f81);
  CHECK(float_to_bf16(distgn::bits_float(0x3f807fffu)) == 0x3f80);
  // Carry into the exponent and overflow to inf.
  CHECK(float_to_bf16(distgn::bits_float(0x3fff8000u)) == 0x4000);
  CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);
  CHECK(float_to_bf16(distgn::bits_float(0x7f7f7fffu)) == 0x7f7f);  // largest finite stays
  // Subnormals round too.
  CHECK(float_to_bf16(distgn::bits_float(0x00008000u)) == 0x0000);
  CHECK(float_to_bf16(distgn::bits_float(0x00018000u)) == 0x0002);
  // Every bf16 value round-trips.
  int mismatches = 0;
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const uint16_t b = uint16_t(bits);
    const float f = bf16_to_float(b);
    if (std::isnan(f)) continue;
    if (float_to_bf16(f) != b) ++mismatches;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("cell stats: to_half agrees with double rounding on a sweep of floats", "[half]") {
  // An independent rounding: nearest half value by exhaustive neighbour
  // search in double, ties to the even mantissa.
  std::mt19937 rng(5);
  std::uniform_int_distribution<uint32_t> bits_of(0, 0x477fffffu);  // |f| < 65536
  int mismatches = 0;
  for (int i = 0; i < 200000; ++i) {
    const uint32_t bits = bits_of(rng);
    const float f = distgn::bits_float(bits);
    const uint16_t h = float_to_half(f);
    const double got = half_to_float(h);
    // Neighbours of the result.
    const double below = h == 0 ? -std::ldexp(1.0, -24) : double(half_to_float(uint16_t(h - 1)));
    const double above = half_to_float(uint16_t(h + 1));
    const double x = f;
    const double err = std::abs(got - x);
    bool ok = err <= std::abs(below - x) && (std::isinf(above) ? true : err <= std::abs(above - x));
    if ((h & 0x7fffu) == 0x7c00u) ok = std::abs(x) >= 65520.0;
    // On a tie the even mantissa wins.
    if (ok && !std::isinf(got) && h != 0 && (err == std::abs(below - x) || err == std::abs(above - x)) &&
        err != 0)
      ok = (h & 1u) == 0;
    if (!ok && ++mismatches <= 10)
      UNSCOPED_INFO("float " << f << " (bits " << std::hex << bits << ") -> half " << h);
  }
  CHECK(mismatches == 0);
}
