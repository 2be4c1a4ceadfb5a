// Loading the Flax golden cases (tests/data/flax*/manifest.json, written by
// scripts/gen_flax_golden.py) and SPEC §8's comparison rule.
#pragma once

#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <map>

#include "core/half.hpp"
#include "distgn/config.hpp"
#include "distgn/group_norm.hpp"
#include "io/npy.hpp"

namespace golden {

using namespace distgn;  // the library under test, within these helpers only

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

// ---- running a case through the library -----------------------------------

struct Array {
  distgn::Shape shape;
  distgn::DType dtype;
  std::vector<uint8_t> bytes;
  TensorView view(Layout layout) { return {bytes.data(), shape, dtype, layout}; }
};

inline Array load(const nlohmann::json& c, const char* key, DType dtype) {
  const io::NpyArray a = file("flax", c, key);
  return {a.shape, dtype, io::convert_to(a, dtype)};
}

inline Array zeros(const Shape& shape, DType dtype) {
  return {shape, dtype, std::vector<uint8_t>(size_t(element_count(shape) * dtype_size(dtype)))};
}

inline std::vector<double> values_of(const Array& a) {
  std::vector<double> out(static_cast<size_t>(element_count(a.shape)));
  for (size_t i = 0; i < out.size(); ++i) {
    switch (a.dtype) {
      case DType::f32: out[i] = reinterpret_cast<const float*>(a.bytes.data())[i]; break;
      case DType::f64: out[i] = reinterpret_cast<const double*>(a.bytes.data())[i]; break;
      case DType::f16: out[i] = to_float(reinterpret_cast<const half_t*>(a.bytes.data())[i]); break;
      case DType::bf16: out[i] = to_float(reinterpret_cast<const bfloat16_t*>(a.bytes.data())[i]); break;
    }
  }
  return out;
}

inline DType narrower(DType a, DType b) { return dtype_size(a) <= dtype_size(b) ? a : b; }

inline double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v)
    if (std::isfinite(x)) m = std::max(m, std::fabs(x));
  return m;
}

// y, dx, dscale, dbias of one case through the layer. With `in_float64` the
// input and the arithmetic are float64: the exact result of the same formulas.
inline std::map<std::string, std::vector<double>> run_case(const nlohmann::json& c, bool in_float64) {
  GroupNormConfig config = config_of(c);
  const Layout layout = parse_layout(c["layout"].get<std::string>());
  const DType input = in_float64 ? DType::f64 : dtype(c["input_dtype"]);
  if (in_float64) config.dtype = DType::f64;
  GroupNorm layer(config);
  Array x = load(c, "x", input), dy = load(c, "dy", input);
  const Plan plan = layer.plan(x.shape, layout, input);
  if (!in_float64) REQUIRE(plan.output_dtype == dtype(c["output_dtype"]));
  layer.init_parameters(plan.channels);
  if (has_file(c, "scale")) layer.set_scale(load(c, "scale", config.param_dtype).view(Layout::channels_last));
  if (has_file(c, "bias")) layer.set_bias(load(c, "bias", config.param_dtype).view(Layout::channels_last));
  std::vector<uint8_t> mask_bytes;
  MaskView mask;
  if (has_file(c, "mask")) {
    const io::NpyArray m = file("flax", c, "mask");
    mask_bytes = io::to_mask(m);
    mask = {mask_bytes.data(), m.shape};
  }
  const MaskView* mask_ptr = mask_bytes.empty() ? nullptr : &mask;

  Array y = zeros(x.shape, plan.output_dtype), dx = zeros(x.shape, input);
  Array dscale = zeros({plan.channels}, config.param_dtype), dbias = zeros({plan.channels}, config.param_dtype);
  ForwardState state;
  layer.forward(x.view(layout), y.view(layout), mask_ptr, &state);
  TensorView dscale_view = dscale.view(Layout::channels_last), dbias_view = dbias.view(Layout::channels_last);
  layer.backward(x.view(layout), dy.view(layout), mask_ptr, state, dx.view(layout),
                 config.use_scale ? &dscale_view : nullptr, config.use_bias ? &dbias_view : nullptr);
  std::map<std::string, std::vector<double>> out{{"y", values_of(y)}, {"dx", values_of(dx)}};
  if (config.use_scale) out["dscale"] = values_of(dscale);
  if (config.use_bias) out["dbias"] = values_of(dbias);
  return out;
}

}  // namespace golden
