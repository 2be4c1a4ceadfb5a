// Every Flax golden case (tests/data/flax, from scripts/gen_flax_golden.py)
// through the library: forward y and backward dx, dscale, dbias, within
// semantics §8's tolerances.
#include <catch2/catch.hpp>

#include "distgn/group_norm.hpp"
#include "golden.hpp"
#include "test_arrays.hpp"

using namespace distgn;

using distgn_test::compare;
using distgn_test::max_abs;
using distgn_test::narrower;
using golden::run_case;

TEST_CASE("flax golden: every case matches Flax forward and backward", "[golden]") {
  const nlohmann::json manifest = golden::manifest("flax");
  REQUIRE(manifest["cases"].size() >= 30);
  for (const auto& c : manifest["cases"]) {
    DYNAMIC_SECTION(c["name"].get<std::string>()) {
      const GroupNormConfig config = golden::config_of(c);
      const DType input = golden::dtype(c["input_dtype"]), output = golden::dtype(c["output_dtype"]);
      const DType stats = stats_dtype(config, input);
      const bool half_stats = dtype_size(stats) == 2;
      auto got = run_case(c, false);

      // Flax masks NaN data with where(), but its VJP of x^2 multiplies the
      // zero cotangent by NaN: NaN dx at masked NaN positions, where semantics §9
      // gives rstd * dy * scale. Those positions are not compared.
      std::vector<bool> skip_dx(got["dx"].size(), false);
      if (golden::has_file(c, "mask")) {
        const std::vector<double> mask = golden::values(golden::file("flax", c, "mask"));
        const std::vector<double> x = golden::values(golden::file("flax", c, "x"));
        for (size_t i = 0; mask.size() == x.size() && i < x.size(); ++i)
          skip_dx[i] = mask[i] == 0 && !std::isfinite(x[i]);
      }

      std::map<std::string, std::vector<double>> truth;  // float64, on demand
      for (const char* key : {"y", "dx", "dscale", "dbias"}) {
        if (!golden::has_file(c, key)) continue;
        std::vector<double> want = golden::values(golden::file("flax", c, key));
        std::vector<double>& mine = got[key];
        REQUIRE(mine.size() == want.size());
        if (std::string(key) == "dx")
          for (size_t i = 0; i < want.size(); ++i)
            if (skip_dx[i]) mine[i] = want[i] = 0;
        const DType dtype = std::string(key) == "y" ? output
                            : std::string(key) == "dx" ? input : config.param_dtype;
        const DType narrowest = narrower(dtype, stats);
        // Tolerances (semantics §8): values are compared at the scale of their
        // operands: 1 for y, the largest |value| for gradients, which come out
        // of cancellations. With a half stats dtype Flax rounds every step of
        // semantics §6 to it, and with half inputs it rounds dx's two paths
        // separately before adding them; distgn rounds once: allow 4 ulps.
        const double floor = std::string(key) == "y" ? (half_stats ? 1.0 : 0.0) : std::max(1.0, max_abs(want));
        const double ulps = half_stats || (std::string(key) == "dx" && dtype_size(input) == 2) ? 4.0 : 1.0;
        const auto vs_flax = compare(mine, want, narrowest, floor, ulps);
        if (vs_flax.mismatches == 0 || half_stats) {
          INFO(key << " vs Flax: worst error " << vs_flax.worst_error << ", first mismatch at "
                   << vs_flax.first_bad);
          CHECK(vs_flax.mismatches == 0);
          continue;
        }
        // Where Flax's float32 arithmetic is itself off (|mean| >> std, or a
        // zero variance amplified by rsqrt(epsilon)), distgn must be within
        // tolerance of the float64 evaluation and never further from it.
        if (truth.empty()) truth = run_case(c, true);
        std::vector<double>& exact = truth[key];
        for (size_t i = 0; std::string(key) == "dx" && i < exact.size(); ++i)
          if (skip_dx[i]) exact[i] = 0;
        const auto ours = compare(mine, exact, narrowest, floor, ulps);
        const auto flax = compare(want, exact, narrowest, floor, ulps);
        INFO(key << " vs float64: distgn worst error " << ours.worst_error << ", Flax "
                 << flax.worst_error << " (Flax itself off by more than the tolerance)");
        CHECK(ours.mismatches == 0);
        CHECK(ours.worst_error <= flax.worst_error);
      }
    }
  }
}
