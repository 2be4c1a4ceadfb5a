// Loading the Flax golden cases (tests/data/flax*/manifest.json, written by
// scripts/gen_flax_golden.py) and SPEC §8's comparison rule.
#pragma once

#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/half.hpp"
#include "distgn/config.hpp"
#include "io/npy.hpp"

namespace golden {

inline std::string data_dir() { return DISTGN_TEST_DATA; }

inline nlohmann::json manifest(const std::string& set) {
  std::ifstream in(data_dir() + "/" + set + "/manifest.json");
  return nlohmann::json::parse(in);
}

inline distgn::DType dtype(const nlohmann::json& v) { return distgn::parse_dtype(v.get<std::string>()); }

// The configuration a manifest case ran Flax with.
inline distgn::GroupNormConfig config_of(const nlohmann::json& c) {
  distgn::GroupNormConfig config;
  config.num_groups = c["num_groups"].is_null() ? std::nullopt : std::optional<int64_t>(c["num_groups"].get<int64_t>());
  config.group_size = c["group_size"].is_null() ? std::nullopt : std::optional<int64_t>(c["group_size"].get<int64_t>());
  config.epsilon = c["epsilon"].get<double>();
  if (!c["dtype"].is_null()) config.dtype = dtype(c["dtype"]);
  config.param_dtype = dtype(c["param_dtype"]);
  config.use_bias = c["use_bias"].get<bool>();
  config.use_scale = c["use_scale"].get<bool>();
  if (!c["reduction_axes"].is_null()) config.reduction_axes = c["reduction_axes"].get<std::vector<int64_t>>();
  config.use_fast_variance = c["use_fast_variance"].get<bool>();
  config.force_float32_reductions = c["force_float32_reductions"].get<bool>();
  if (c.contains("axis_index_groups") && !c["axis_index_groups"].is_null())
    config.axis_index_groups = c["axis_index_groups"].get<std::vector<std::vector<int>>>();
  return config;
}

inline bool has_file(const nlohmann::json& c, const char* key) { return c["files"].contains(key); }

inline distgn::io::NpyArray file(const std::string& set, const nlohmann::json& c, const char* key) {
  return distgn::io::read_npy(data_dir() + "/" + set + "/" + c["files"][key].get<std::string>());
}

// Values of any array as double.
inline std::vector<double> values(const distgn::io::NpyArray& a) {
  std::vector<double> v(static_cast<size_t>(a.size()));
  for (int64_t i = 0; i < a.size(); ++i) v[size_t(i)] = distgn::io::element_as_double(a, i);
  return v;
}

// One unit in the last place of |v| in a storage dtype.
inline double ulp(distgn::DType t, double v) {
  const int mantissa_bits = t == distgn::DType::f16 ? 10 : t == distgn::DType::bf16 ? 7 : t == distgn::DType::f32 ? 23 : 52;
  const int min_exponent = t == distgn::DType::f16 ? -14 : t == distgn::DType::bf16 || t == distgn::DType::f32 ? -126 : -1022;
  int exponent = 0;
  std::frexp(std::fabs(v), &exponent);
  return std::ldexp(1.0, std::max(exponent - 1, min_exponent) - mantissa_bits);
}

// SPEC §8 for outputs: float32/64 within 1e-4 (absolute, relative beyond
// unit scale); half dtypes within one ulp of the output dtype plus 1e-3
// relative. `narrowest` is the narrowest dtype the computation rounds to.
inline double tolerance(distgn::DType narrowest, double reference, double ulps = 1.0) {
  if (narrowest == distgn::DType::f16 || narrowest == distgn::DType::bf16)
    return ulps * ulp(narrowest, reference) + 1e-3 * std::fabs(reference);
  return 1e-4 * std::max(1.0, std::fabs(reference));
}

struct Comparison {
  int64_t mismatches = 0;
  int64_t first_bad = -1;
  double worst_error = 0;  // over finite pairs
};

// NaN must match NaN; everything else within tolerance(narrowest, m, ulps)
// at the magnitude m = max(|ref|, floor): a floor at the operands' scale for
// values that come out of a cancellation (gradients, half arithmetic).
inline Comparison compare(const std::vector<double>& got, const std::vector<double>& want,
                          distgn::DType narrowest, double floor = 0.0, double ulps = 1.0) {
  Comparison c;
  for (size_t i = 0; i < want.size(); ++i) {
    const bool nan_got = std::isnan(got[i]), nan_want = std::isnan(want[i]);
    bool ok;
    if (nan_got || nan_want) {
      ok = nan_got && nan_want;
    } else {
      const double error = std::fabs(got[i] - want[i]);
      c.worst_error = std::max(c.worst_error, error);
      ok = error <= tolerance(narrowest, std::max(std::fabs(want[i]), floor), ulps);
    }
    if (!ok && c.mismatches++ == 0) c.first_bad = int64_t(i);
  }
  return c;
}

}  // namespace golden
