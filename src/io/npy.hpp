// distgn/io/npy: reading and writing numpy .npy files, the format of every
// array the CLI and the tests exchange with Python.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "distgn/tensor.hpp"

namespace distgn::io {

// The element types .npy files may hold that distgn reads.
enum class NpyType { f2, f4, f8, b1, u1, i1, u2, i2, u4, i4, u8, i8 };

// Bytes per element.
int npy_type_size(NpyType type);
// numpy's descr: "<f4", "|b1", ... (also what error messages show).
std::string npy_descr(NpyType type);

struct NpyArray {
  Shape shape;
  NpyType type = NpyType::f4;
  std::vector<uint8_t> bytes;  // little-endian, C order
  // Element count (1 for shape ()); throws distgn::Error for a shape
  // element_count rejects (negative or overflowing extents).
  int64_t size() const;
};

// Reads format versions 1.0, 2.0 and 3.0. Every problem (missing file, bad
// header, unsupported dtype, Fortran order, truncated or trailing data, a
// shape whose extents multiply past int64 even with a zero extent among them)
// is a distgn::Error naming the file; sizes are checked against the file
// before anything is allocated.
NpyArray read_npy(const std::string& path);

// Writes exactly the bytes np.save writes for the same array. A regular file
// or new name is written atomically: to "<name>.tmp.<pid>" in the same
// directory, then renamed, so a failure never leaves a partial file. A
// symbolic link is written through: its final target is replaced that way
// (or created, if the link dangles) and the link stays. A character device,
// FIFO or socket is opened and written to, never replaced (a FIFO waits for
// a reader). A directory is an error.
// data holds element_count(shape) elements of type; it may be null if that is 0.
void write_npy(const std::string& path, const Shape& shape, NpyType type, const void* data);
void write_npy(const std::string& path, const NpyArray& array);

// Element i (flat, C order) as double; bool -> 0/1. 64-bit integers beyond
// 2^53 are rounded to nearest.
double element_as_double(const NpyArray& a, int64_t i);

// The array's elements converted to a storage dtype, as that dtype's bytes.
// Every conversion rounds once, to nearest, ties to even, from the exact
// source value (no double rounding through an intermediate type).
std::vector<uint8_t> convert_to(const NpyArray& a, DType dtype);

// The NpyType that stores a DType: f16 -> f2; bf16 -> f4 because numpy has no
// bfloat16, so bfloat16 outputs are written as float32 .npy files.
NpyType npy_type_for(DType dtype);

// Mask bytes: 1 where the element != 0 (NaN counts as nonzero), 0 elsewhere.
std::vector<uint8_t> to_mask(const NpyArray& a);

}  // namespace distgn::io
