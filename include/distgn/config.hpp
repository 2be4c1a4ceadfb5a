// distgn/config.hpp: the layer's configuration (Flax's GroupNorm fields) and
// the plan it resolves to for one input shape.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "distgn/tensor.hpp"

namespace distgn {

// How scale and bias are initialised (Flax's scale_init / bias_init).
struct Initializer {
  enum class Kind { zeros, ones, constant, normal, uniform };
  Kind kind = Kind::zeros;
  double value = 0.0;         // constant
  double stddev = 1.0;        // normal(0, stddev)
  double low = 0.0, high = 1.0;  // uniform[low, high)
  uint64_t seed = 0;          // normal, uniform: same seed, same values

  static Initializer zeros() { return {Kind::zeros}; }
  static Initializer ones() { return {Kind::ones}; }
  static Initializer constant(double v) { return {Kind::constant, v}; }
  static Initializer normal(double stddev, uint64_t seed) {
    Initializer i{Kind::normal};
    i.stddev = stddev;
    i.seed = seed;
    return i;
  }
  static Initializer uniform(double low, double high, uint64_t seed) {
    Initializer i{Kind::uniform};
    i.low = low;
    i.high = high;
    i.seed = seed;
    return i;
  }
};

// Fills `count` values of `dtype` at `out` (values rounded to the dtype).
void initialize(const Initializer& init, int64_t count, DType dtype, void* out);

// Flax's flax.linen.GroupNorm fields, same names and defaults (semantics §1).
// axis_name is the communicator the layer is constructed with.
struct GroupNormConfig {
  std::optional<int64_t> num_groups = 32;
  std::optional<int64_t> group_size;  // set num_groups to nullopt to use this
  double epsilon = 1e-6;
  std::optional<DType> dtype;          // output (and stats) dtype; unset = infer
  DType param_dtype = DType::f32;
  bool use_bias = true;
  bool use_scale = true;
  Initializer bias_init = Initializer::zeros();
  Initializer scale_init = Initializer::ones();
  std::optional<std::vector<int64_t>> reduction_axes;  // unset = all but axis 0
  // Partition of the communicator's ranks into groups that share statistics
  // (JAX's axis_index_groups); unset = one group of all ranks.
  std::optional<std::vector<std::vector<int>>> axis_index_groups;
  bool use_fast_variance = true;
  bool force_float32_reductions = true;
};

// How a shape's elements map to statistics cells (semantics §3), resolved once per
// distinct input shape. A cell is one index of every non-reduced axis plus one
// group; cells are numbered row-major over (non-reduced axes..., group). The
// order in which the kernels walk the elements is internal to the backends.
struct Plan {
  Shape shape;
  Layout layout = Layout::channels_last;
  int feature_axis = 0;
  int64_t channels = 0;    // C
  int64_t num_groups = 0;  // G
  int64_t group_size = 0;  // S = C / G
  std::vector<int64_t> reduction_axes;  // canonical: sorted, non-negative
  int64_t num_cells = 0;
  int64_t cell_elements = 0;  // positions per cell on this rank (mask ignored)
  DType input_dtype = DType::f32;
  DType stats_dtype = DType::f32;   // semantics §5
  DType output_dtype = DType::f32;  // semantics §5
  DType compute_dtype = DType::f32;  // f64 when any dtype in play is f64, else f32
};

// Validates `config` against an input shape in semantics §2's order (raising
// semantics §2's messages) and resolves the plan.
Plan resolve(const GroupNormConfig& config, const Shape& shape, Layout layout, DType input_dtype);

// semantics §5: the stats and output dtypes for an input dtype.
DType stats_dtype(const GroupNormConfig& config, DType input_dtype);
DType output_dtype(const GroupNormConfig& config, DType input_dtype);

}  // namespace distgn
