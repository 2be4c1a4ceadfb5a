// distgn/tensor.hpp: non-owning views of the arrays a layer reads and writes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace distgn {

// Storage dtypes of x, y and the parameters (semantics §5).
enum class DType { f32, f64, f16, bf16 };

// Where the feature (channel) axis is: last (Flax's N...C, the default) or
// axis 1 (PyTorch's N,C,...).
enum class Layout { channels_last, channels_first };

enum class Device { cpu, cuda };

using Shape = std::vector<int64_t>;

// A dense, C-ordered array someone else owns.
struct TensorView {
  void* data = nullptr;
  Shape shape;
  DType dtype = DType::f32;
  Layout layout = Layout::channels_last;
  Device device = Device::cpu;
};

// A validity mask (nonzero = valid), one byte per element. Its shape
// broadcasts to x's the numpy way; the feature axis must be exactly C.
struct MaskView {
  const uint8_t* data = nullptr;
  Shape shape;
  Device device = Device::cpu;
};

// Bytes per element of a dtype.
int dtype_size(DType dtype);
// "f32", "f64", "f16", "bf16".
std::string dtype_name(DType dtype);
// Parses the names above (also "float32", "float64", "float16", "bfloat16");
// throws distgn::Error naming the accepted spellings otherwise.
DType parse_dtype(const std::string& name);
// "nhwc" (channels_last) or "nchw" (channels_first).
std::string layout_name(Layout layout);
Layout parse_layout(const std::string& name);
// Number of elements of a shape (1 for rank 0). Throws distgn::Error naming
// the shape if an extent is negative or the non-zero extents multiply past
// int64 (even if another extent is 0: such a shape is corrupt, not empty).
int64_t element_count(const Shape& shape);
// Bytes of a dense array of this shape and dtype: element_count times
// dtype_size, with the same errors, and one when the bytes pass int64.
int64_t byte_size(const Shape& shape, DType dtype);
// "(2, 5, 4)": numpy's spelling, used in error messages.
std::string shape_string(const Shape& shape);

// Element i of an array of `dtype` at `data`, read as a double, or written
// from one (rounded to the dtype, to nearest, ties to even). For small
// arrays and tools (parameters, initializers, test data), not for kernels.
double load_element(DType dtype, const void* data, int64_t i);
void store_element(DType dtype, void* data, int64_t i, double v);
// Elements [0, n) of such an array into out[0, n) as doubles, with one
// dtype dispatch for the whole array (the layer's scale and bias, per call).
void load_elements(DType dtype, const void* data, int64_t n, double* out);

}  // namespace distgn
