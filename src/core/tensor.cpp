#include "distgn/tensor.hpp"

#include <sstream>
#include <type_traits>

#include "core/dtype_dispatch.hpp"
#include "core/half.hpp"
#include "distgn/error.hpp"

namespace distgn {

int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f64: return 8;
    case DType::f32: return 4;
    case DType::f16:
    case DType::bf16: return 2;
  }
  return 0;
}

std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
  }
  return "?";
}

DType parse_dtype(const std::string& name) {
  if (name == "f32" || name == "float32") return DType::f32;
  if (name == "f64" || name == "float64") return DType::f64;
  if (name == "f16" || name == "float16") return DType::f16;
  if (name == "bf16" || name == "bfloat16") return DType::bf16;
  throw Error("unknown dtype '" + name + "': use f32, f64, f16 or bf16");
}

std::string layout_name(Layout layout) {
  return layout == Layout::channels_last ? "nhwc" : "nchw";
}

Layout parse_layout(const std::string& name) {
  if (name == "nhwc" || name == "channels_last") return Layout::channels_last;
  if (name == "nchw" || name == "channels_first") return Layout::channels_first;
  throw Error("unknown layout '" + name + "': use nhwc (channels last) or nchw (channels first)");
}

int64_t element_count(const Shape& shape) {
  // The non-zero extents must multiply within int64 even when a zero extent
  // makes the count 0: no real array is (2^32, 2^32, 0), and strides, cell
  // counts and sizes computed from the other extents would overflow.
  int64_t nonzero_product = 1;
  bool empty = false;
  for (int64_t d : shape) {
    if (d < 0) throw Error("shape " + shape_string(shape) + " has a negative dimension");
    if (d == 0) {
      empty = true;
    } else if (__builtin_mul_overflow(nonzero_product, d, &nonzero_product)) {
      throw Error("shape " + shape_string(shape) +
                  " is too large: its extents multiply past 2^63 - 1 (int64 overflow)");
    }
  }
  return empty ? 0 : nonzero_product;
}

int64_t byte_size(const Shape& shape, DType dtype) {
  int64_t bytes = 0;
  if (__builtin_mul_overflow(element_count(shape), int64_t(dtype_size(dtype)), &bytes))
    throw Error("shape " + shape_string(shape) + " of " + dtype_name(dtype) +
                " is too large: its bytes pass 2^63 - 1 (int64 overflow)");
  return bytes;
}

std::string shape_string(const Shape& shape) {
  std::ostringstream out;
  out << '(';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) out << ',';
  out << ')';
  return out.str();
}

double load_element(DType dtype, const void* data, int64_t i) {
  switch (dtype) {
    case DType::f64: return static_cast<const double*>(data)[i];
    case DType::f32: return static_cast<const float*>(data)[i];
    case DType::f16: return to_float(static_cast<const half_t*>(data)[i]);
    case DType::bf16: return to_float(static_cast<const bfloat16_t*>(data)[i]);
  }
  return 0;
}

void load_elements(DType dtype, const void* data, int64_t n, double* out) {
  with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* values = static_cast<const T*>(data);
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (std::is_floating_point_v<T>) out[i] = values[i];
      else out[i] = to_float(values[i]);
    }
  });
}

void store_element(DType dtype, void* data, int64_t i, double v) {
  switch (dtype) {
    case DType::f64: static_cast<double*>(data)[i] = v; break;
    case DType::f32: static_cast<float*>(data)[i] = float(v); break;
    case DType::f16: static_cast<half_t*>(data)[i] = to_half(float(v)); break;
    case DType::bf16: static_cast<bfloat16_t*>(data)[i] = to_bfloat16(float(v)); break;
  }
}

}  // namespace distgn
