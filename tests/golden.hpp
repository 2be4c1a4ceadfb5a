// Loading the Flax golden cases (tests/data/flax*/manifest.json, written by
// scripts/gen_flax_golden.py) and running one through the layer.
#pragma once

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "distgn/config.hpp"
#include "distgn/group_norm.hpp"
#include "io/npy.hpp"
#include "test_arrays.hpp"

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

// semantics §8's comparison rule lives with the other comparisons in
// test_arrays.hpp; tests/cli calls it by this name.
using distgn_test::compare;

// ---- running a case through the library -----------------------------------

// An input of a case (the .npy file `key`) converted to `dtype`.
inline distgn_test::Array load(const nlohmann::json& c, const char* key, DType dtype) {
  const io::NpyArray a = file("flax", c, key);
  return distgn_test::Array::from_bytes(a.shape, dtype, io::convert_to(a, dtype));
}

// y, dx, dscale, dbias of one case through the layer. With `in_float64` the
// input and the arithmetic are float64: the exact result of the same formulas.
inline std::map<std::string, std::vector<double>> run_case(const nlohmann::json& c, bool in_float64) {
  GroupNormConfig config = config_of(c);
  const Layout layout = parse_layout(c["layout"].get<std::string>());
  const DType input = in_float64 ? DType::f64 : dtype(c["input_dtype"]);
  if (in_float64) config.dtype = DType::f64;
  GroupNorm layer(config);
  distgn_test::Array x = load(c, "x", input), dy = load(c, "dy", input);
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

  distgn_test::Array y(x.shape, plan.output_dtype), dx(x.shape, input);
  distgn_test::Array dscale({plan.channels}, config.param_dtype), dbias({plan.channels}, config.param_dtype);
  ForwardState state;
  layer.forward(x.view(layout), y.view(layout), mask_ptr, &state);
  TensorView dscale_view = dscale.view(Layout::channels_last), dbias_view = dbias.view(Layout::channels_last);
  layer.backward(x.view(layout), dy.view(layout), mask_ptr, state, dx.view(layout),
                 config.use_scale ? &dscale_view : nullptr, config.use_bias ? &dbias_view : nullptr);
  std::map<std::string, std::vector<double>> out{{"y", y.values()}, {"dx", dx.values()}};
  if (config.use_scale) out["dscale"] = dscale.values();
  if (config.use_bias) out["dbias"] = dbias.values();
  return out;
}

}  // namespace golden
