// Tests of the .npy reader and writer. The numpy_* arrays are the exact bytes
// numpy 2.4 writes (generated once with the commands in their comments), so
// the suite checks compatibility with numpy without needing Python.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "distgn/error.hpp"
#include "io/npy.hpp"

namespace fs = std::filesystem;
using distgn::DType;
using distgn::Error;
using distgn::Shape;
using distgn::io::NpyArray;
using distgn::io::NpyType;

namespace {

// np.save(f, np.arange(6, dtype='<f4').reshape(2, 3))
const unsigned char numpy_f4_2x3[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x34, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x32, 0x2c, 0x20,
    0x33, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x40, 0x40,
    0x00, 0x00, 0x80, 0x40, 0x00, 0x00, 0xa0, 0x40,
};

// np.save(f, np.array([True, False]))
const unsigned char numpy_b1_2[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x7c, 0x62, 0x31, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x32, 0x2c, 0x29,
    0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0x01, 0x00,
};

// np.save(f, np.array(1.5))
const unsigned char numpy_f8_scalar[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x38, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x29, 0x2c, 0x20,
    0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf8, 0x3f,
};

// np.save(f, np.array([1.0, -2.5, 65504.0], dtype='<f2'))
const unsigned char numpy_f2_3[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x32, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x33, 0x2c, 0x29,
    0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0x00, 0x3c, 0x00, 0xc1, 0xff, 0x7b,
};

// np.lib.format.write_array(f, np.array([-1, 2**40], dtype='<i8'), version=(2, 0))
const unsigned char numpy_i8_v2[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x02, 0x00, 0x74, 0x00, 0x00, 0x00, 0x7b, 0x27, 0x64, 0x65,
    0x73, 0x63, 0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x69, 0x38, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f,
    0x72, 0x74, 0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61,
    0x6c, 0x73, 0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x32,
    0x2c, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
};

// np.lib.format.write_array(f, np.array([[7], [65535]], dtype='<u2'), version=(3, 0))
const unsigned char numpy_u2_v3[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x03, 0x00, 0x74, 0x00, 0x00, 0x00, 0x7b, 0x27, 0x64, 0x65,
    0x73, 0x63, 0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x75, 0x32, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f,
    0x72, 0x74, 0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61,
    0x6c, 0x73, 0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x32,
    0x2c, 0x20, 0x31, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0x07, 0x00, 0xff, 0xff,
};

// np.save(f, np.asfortranarray(np.arange(6, dtype='<f4').reshape(2, 3)))
const unsigned char numpy_fortran_2x3[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x34, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x54, 0x72, 0x75, 0x65,
    0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x32, 0x2c, 0x20, 0x33,
    0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x40, 0x40, 0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x80, 0x40,
    0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0xa0, 0x40,
};

template <size_t N>
std::string as_string(const unsigned char (&bytes)[N]) {
  return std::string(reinterpret_cast<const char*>(bytes), N);
}

// A fresh directory under the system temp dir, removed with its contents.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string name = (fs::temp_directory_path() / "distgn_npy_XXXXXX").string();
    REQUIRE(mkdtemp(&name[0]) != nullptr);
    path = name;
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  REQUIRE(out.good());
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

ino_t inode_of(const std::string& path) {
  struct stat status;
  REQUIRE(lstat(path.c_str(), &status) == 0);
  return status.st_ino;
}

// How many names the directory holds (a leftover temp file would be one).
std::ptrdiff_t entries(const TempDir& dir) {
  return std::distance(fs::directory_iterator(dir.path), fs::directory_iterator());
}

// A .npy file with the given header dict and data, unpadded (readers must
// not depend on numpy's alignment).
std::string npy_file(const std::string& dict, const std::string& data, int major = 1) {
  std::string header = dict + "\n";
  std::string out = "\x93NUMPY";
  out += char(major);
  out += char(0);
  const size_t length_field_size = major == 1 ? 2 : 4;
  for (size_t i = 0; i < length_field_size; ++i) out += char((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

// The message read_npy throws for the file; fails the test if it reads.
std::string read_error(const std::string& path) {
  try {
    distgn::io::read_npy(path);
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("read_npy(" << path << ") did not throw");
  return "";
}

// Writes bytes as a file and returns read_npy's message, which must name it.
std::string error_for_bytes(const TempDir& dir, const std::string& bytes) {
  static int counter = 0;
  const std::string path = dir.file("case" + std::to_string(counter++) + ".npy");
  write_file(path, bytes);
  const std::string message = read_error(path);
  INFO(message);
  CHECK(message.find(path) != std::string::npos);
  return message;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

template <class T>
std::vector<uint8_t> bytes_of(const std::vector<T>& values) {
  std::vector<uint8_t> bytes(values.size() * sizeof(T));
  if (!bytes.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

NpyArray array_of(const Shape& shape, NpyType type, std::vector<uint8_t> bytes) {
  NpyArray a;
  a.shape = shape;
  a.type = type;
  a.bytes = std::move(bytes);
  return a;
}

template <class T>
NpyArray array_of(const Shape& shape, NpyType type, const std::vector<T>& values) {
  return array_of(shape, type, bytes_of(values));
}

std::vector<uint16_t> as_u16(const std::vector<uint8_t>& bytes) {
  std::vector<uint16_t> values(bytes.size() / 2);
  std::memcpy(values.data(), bytes.data(), values.size() * 2);
  return values;
}

const NpyType kAllTypes[] = {NpyType::f2, NpyType::f4, NpyType::f8, NpyType::b1, NpyType::u1, NpyType::i1,
                             NpyType::u2, NpyType::i2, NpyType::u4, NpyType::i4, NpyType::u8, NpyType::i8};

}  // namespace

TEST_CASE("npy: round trip of every element type") {
  TempDir dir;
  for (NpyType type : kAllTypes) {
    const std::string descr = distgn::io::npy_descr(type);
    INFO(descr);
    const Shape shape = {2, 3};
    std::vector<uint8_t> bytes(static_cast<size_t>(6 * distgn::io::npy_type_size(type)));
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = uint8_t(type == NpyType::b1 ? i % 2 : 7 * i + 1);
    const std::string path = dir.file("t" + descr.substr(1) + ".npy");
    distgn::io::write_npy(path, shape, type, bytes.data());

    const NpyArray a = distgn::io::read_npy(path);
    CHECK(a.shape == shape);
    CHECK(a.type == type);
    CHECK(a.bytes == bytes);
    CHECK(a.size() == 6);
    // numpy's alignment: the data starts at a multiple of 64 bytes.
    CHECK((fs::file_size(path) - bytes.size()) % 64 == 0);
  }
}

TEST_CASE("npy: round trip of 0-d, 1-d, 3-d and zero-size shapes") {
  TempDir dir;
  const Shape shapes[] = {{}, {5}, {2, 3, 4}, {0}, {3, 0, 2}, {0, 0}, {1, 1, 1, 1, 1, 1, 1, 1}};
  for (const Shape& shape : shapes) {
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    INFO("elements: " << count << ", rank " << shape.size());
    std::vector<double> values(static_cast<size_t>(count));
    for (size_t i = 0; i < values.size(); ++i) values[i] = 0.5 * double(i) - 3;
    const std::string path = dir.file("shape.npy");
    distgn::io::write_npy(path, shape, NpyType::f8, values.empty() ? nullptr : values.data());

    const NpyArray a = distgn::io::read_npy(path);
    CHECK(a.shape == shape);
    CHECK(a.size() == count);
    CHECK(a.bytes == bytes_of(values));
  }
}

TEST_CASE("npy: reads the files numpy writes") {
  TempDir dir;
  const auto read_bytes = [&](const std::string& bytes) {
    const std::string path = dir.file("numpy.npy");
    write_file(path, bytes);
    return distgn::io::read_npy(path);
  };

  SECTION("float32 (2, 3)") {
    const NpyArray a = read_bytes(as_string(numpy_f4_2x3));
    CHECK(a.shape == Shape{2, 3});
    CHECK(a.type == NpyType::f4);
    for (int64_t i = 0; i < 6; ++i) CHECK(distgn::io::element_as_double(a, i) == double(i));
  }
  SECTION("bool (2,)") {
    const NpyArray a = read_bytes(as_string(numpy_b1_2));
    CHECK(a.shape == Shape{2});
    CHECK(a.type == NpyType::b1);
    CHECK(a.bytes == std::vector<uint8_t>{1, 0});
  }
  SECTION("float64 scalar") {
    const NpyArray a = read_bytes(as_string(numpy_f8_scalar));
    CHECK(a.shape.empty());
    CHECK(a.size() == 1);
    CHECK(distgn::io::element_as_double(a, 0) == 1.5);
  }
  SECTION("float16 (3,)") {
    const NpyArray a = read_bytes(as_string(numpy_f2_3));
    CHECK(a.type == NpyType::f2);
    CHECK(distgn::io::element_as_double(a, 0) == 1.0);
    CHECK(distgn::io::element_as_double(a, 1) == -2.5);
    CHECK(distgn::io::element_as_double(a, 2) == 65504.0);
  }
  SECTION("int64, format version 2.0") {
    const NpyArray a = read_bytes(as_string(numpy_i8_v2));
    CHECK(a.shape == Shape{2});
    CHECK(distgn::io::element_as_double(a, 0) == -1.0);
    CHECK(distgn::io::element_as_double(a, 1) == std::ldexp(1.0, 40));
  }
  SECTION("uint16 (2, 1), format version 3.0") {
    const NpyArray a = read_bytes(as_string(numpy_u2_v3));
    CHECK(a.shape == Shape{2, 1});
    CHECK(distgn::io::element_as_double(a, 0) == 7.0);
    CHECK(distgn::io::element_as_double(a, 1) == 65535.0);
  }
}

TEST_CASE("npy: writes the bytes np.save writes") {
  TempDir dir;
  const std::string path = dir.file("out.npy");
  SECTION("float32 (2, 3)") {
    const std::vector<float> values = {0, 1, 2, 3, 4, 5};
    distgn::io::write_npy(path, {2, 3}, NpyType::f4, values.data());
    CHECK(read_file(path) == as_string(numpy_f4_2x3));
  }
  SECTION("bool (2,)") {
    const std::vector<uint8_t> values = {1, 0};
    distgn::io::write_npy(path, {2}, NpyType::b1, values.data());
    CHECK(read_file(path) == as_string(numpy_b1_2));
  }
  SECTION("float64 scalar") {
    const double value = 1.5;
    distgn::io::write_npy(path, {}, NpyType::f8, &value);
    CHECK(read_file(path) == as_string(numpy_f8_scalar));
  }
  SECTION("float16 (3,), from an NpyArray") {
    const NpyArray a = array_of<uint16_t>({3}, NpyType::f2, {0x3c00, 0xc100, 0x7bff});
    distgn::io::write_npy(path, a);
    CHECK(read_file(path) == as_string(numpy_f2_3));
  }
}

TEST_CASE("npy: header dict in any key order, quoting and spacing") {
  TempDir dir;
  const std::string path = dir.file("header.npy");
  const auto read_with = [&](const std::string& dict, const std::string& data, int major = 1) {
    write_file(path, npy_file(dict, data, major));
    return distgn::io::read_npy(path);
  };
  const std::string six_bytes = "abcdef";

  CHECK(read_with("{\"shape\":(3,),\"fortran_order\":False,\"descr\":\"<u2\"}", six_bytes).shape == Shape{3});
  CHECK(read_with("{ 'fortran_order' : False ,\n\t'shape' : ( 2 , 3 ) , 'descr':'|u1' , }  ", six_bytes).shape ==
        Shape{2, 3});
  // Python 2 numpy wrote long integers with an L.
  CHECK(read_with("{'descr': '<i2', 'fortran_order': False, 'shape': (3L,), }", six_bytes).shape == Shape{3});
  // (6) is not a tuple in Python, but its meaning is clear.
  CHECK(read_with("{'descr': '|i1', 'fortran_order': False, 'shape': (6), }", six_bytes).shape == Shape{6});
  CHECK(read_with("{'descr': '|i1', 'fortran_order': False, 'shape': (6,), }", six_bytes, 2).size() == 6);
  // One-byte types in any byte order, multi-byte ones as '<'.
  CHECK(read_with("{'descr': '<u1', 'fortran_order': False, 'shape': (6,), }", six_bytes).type == NpyType::u1);
  CHECK(read_with("{'descr': '>b1', 'fortran_order': False, 'shape': (6,), }", six_bytes).type == NpyType::b1);
  // Fortran order of an array with one dimension longer than 1 is C order.
  const NpyArray fortran_1d = read_with("{'descr': '<u2', 'fortran_order': True, 'shape': (1, 3), }", six_bytes);
  CHECK(fortran_1d.bytes == std::vector<uint8_t>(six_bytes.begin(), six_bytes.end()));
}

TEST_CASE("npy: element_as_double of every type") {
  CHECK(distgn::io::element_as_double(array_of<uint16_t>({2}, NpyType::f2, {0x3555, 0xfc00}), 0) ==
        0.333251953125);
  CHECK(distgn::io::element_as_double(array_of<uint16_t>({2}, NpyType::f2, {0x3555, 0xfc00}), 1) ==
        -std::numeric_limits<double>::infinity());
  CHECK(distgn::io::element_as_double(array_of<float>({1}, NpyType::f4, {0.1f}), 0) == double(0.1f));
  CHECK(distgn::io::element_as_double(array_of<double>({1}, NpyType::f8, {0.1}), 0) == 0.1);
  // Any nonzero byte is True, as numpy reads it.
  const NpyArray bools = array_of<uint8_t>({3}, NpyType::b1, {0, 1, 2});
  CHECK(distgn::io::element_as_double(bools, 0) == 0.0);
  CHECK(distgn::io::element_as_double(bools, 1) == 1.0);
  CHECK(distgn::io::element_as_double(bools, 2) == 1.0);
  CHECK(distgn::io::element_as_double(array_of<uint8_t>({1}, NpyType::u1, {255}), 0) == 255.0);
  CHECK(distgn::io::element_as_double(array_of<int8_t>({1}, NpyType::i1, {-128}), 0) == -128.0);
  CHECK(distgn::io::element_as_double(array_of<uint16_t>({1}, NpyType::u2, {65535}), 0) == 65535.0);
  CHECK(distgn::io::element_as_double(array_of<int16_t>({1}, NpyType::i2, {-32768}), 0) == -32768.0);
  CHECK(distgn::io::element_as_double(array_of<uint32_t>({1}, NpyType::u4, {4294967295u}), 0) == 4294967295.0);
  CHECK(distgn::io::element_as_double(array_of<int32_t>({1}, NpyType::i4, {-2147483647 - 1}), 0) == -2147483648.0);
  CHECK(distgn::io::element_as_double(array_of<uint64_t>({1}, NpyType::u8, {~uint64_t(0)}), 0) ==
        std::ldexp(1.0, 64));
  CHECK(distgn::io::element_as_double(array_of<int64_t>({1}, NpyType::i8, {-5}), 0) == -5.0);
  CHECK_THROWS_AS(distgn::io::element_as_double(bools, 3), Error);
  CHECK_THROWS_AS(distgn::io::element_as_double(bools, -1), Error);
}

TEST_CASE("npy: convert_to rounds once, to nearest, ties to even") {
  using distgn::io::convert_to;
  const double tiny = std::ldexp(1.0, -40);

  SECTION("float16 from float64, against numpy's np.float16(x)") {
    const NpyArray a = array_of<double>(
        {10}, NpyType::f8,
        {1 + std::ldexp(1.0, -11),         // tie: down to even 1.0
         1 + 3 * std::ldexp(1.0, -11),     // tie: up to even
         65519.99, 65520.0,                // largest finite / overflow to inf
         std::ldexp(1.0, -25),             // tie with the smallest subnormal: to 0
         std::ldexp(1.0, -25) + tiny,      // just above it: smallest subnormal
         3 * std::ldexp(1.0, -26), 0.1, -2.0,
         // Just above a tie, by less than float resolution: rounding through
         // float would make it a tie and round down to 1.0.
         1 + std::ldexp(1.0, -11) + tiny});
    CHECK(as_u16(convert_to(a, DType::f16)) ==
          std::vector<uint16_t>{0x3c00, 0x3c02, 0x7bff, 0x7c00, 0x0000, 0x0001, 0x0001, 0x2e66, 0xc000, 0x3c01});
  }
  SECTION("float16 from float32 and int32") {
    const NpyArray f = array_of<float>({2}, NpyType::f4, {1 + std::ldexp(1.0f, -11), -65536.0f});
    CHECK(as_u16(convert_to(f, DType::f16)) == std::vector<uint16_t>{0x3c00, 0xfc00});
    // 2049 is a tie between 2048 and 2050.
    const NpyArray i = array_of<int32_t>({2}, NpyType::i4, {2049, 2051});
    CHECK(as_u16(convert_to(i, DType::f16)) == std::vector<uint16_t>{0x6800, 0x6802});
  }
  SECTION("bfloat16") {
    const NpyArray a = array_of<double>(
        {4}, NpyType::f8, {1 + std::ldexp(1.0, -8), 1 + 3 * std::ldexp(1.0, -8), 1 + std::ldexp(1.0, -8) + tiny, 1e39});
    CHECK(as_u16(convert_to(a, DType::bf16)) == std::vector<uint16_t>{0x3f80, 0x3f82, 0x3f81, 0x7f80});
    // 2^60 + 2^52 is a tie; one more is above it, which a double (53 bits)
    // cannot tell apart from the tie.
    const int64_t tie = (int64_t(1) << 60) + (int64_t(1) << 52);
    const NpyArray i = array_of<int64_t>({3}, NpyType::i8, {tie, tie + 1, -(tie + 1)});
    CHECK(as_u16(convert_to(i, DType::bf16)) == std::vector<uint16_t>{0x5d80, 0x5d81, 0xdd81});
  }
  SECTION("NaN stays NaN") {
    const NpyArray a = array_of<double>({1}, NpyType::f8, {std::nan("")});
    const uint16_t half = as_u16(convert_to(a, DType::f16))[0];
    CHECK((half & 0x7c00) == 0x7c00);
    CHECK((half & 0x03ff) != 0);
    const uint16_t bf = as_u16(convert_to(a, DType::bf16))[0];
    CHECK((bf & 0x7f80) == 0x7f80);
    CHECK((bf & 0x007f) != 0);
  }
  SECTION("float32 and float64") {
    const NpyArray a = array_of<double>({2}, NpyType::f8, {0.1, -1e300});
    std::vector<float> floats(2);
    std::memcpy(floats.data(), convert_to(a, DType::f32).data(), 8);
    CHECK(floats == std::vector<float>{0.1f, -std::numeric_limits<float>::infinity()});
    const NpyArray half = array_of<uint16_t>({1}, NpyType::f2, {0x3555});
    std::vector<double> doubles(1);
    std::memcpy(doubles.data(), convert_to(half, DType::f64).data(), 8);
    CHECK(doubles[0] == 0.333251953125);
    // 2^62 + 1 to float: one rounding from the integer, not two.
    const NpyArray big = array_of<int64_t>({1}, NpyType::i8, {(int64_t(1) << 62) + 1});
    float f = 0;
    std::memcpy(&f, convert_to(big, DType::f32).data(), 4);
    CHECK(f == std::ldexp(1.0f, 62));
  }
  SECTION("zero-size arrays") {
    CHECK(convert_to(array_of<float>({0, 4}, NpyType::f4, std::vector<float>{}), DType::f16).empty());
  }
}

TEST_CASE("npy: npy_type_for") {
  CHECK(distgn::io::npy_type_for(DType::f32) == NpyType::f4);
  CHECK(distgn::io::npy_type_for(DType::f64) == NpyType::f8);
  CHECK(distgn::io::npy_type_for(DType::f16) == NpyType::f2);
  CHECK(distgn::io::npy_type_for(DType::bf16) == NpyType::f4);
}

TEST_CASE("npy: to_mask") {
  using distgn::io::to_mask;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(to_mask(array_of<float>({2, 3}, NpyType::f4, {0.0f, -0.0f, 1.0f, nan, -2.0f, 1e-45f})) ==
        std::vector<uint8_t>{0, 0, 1, 1, 1, 1});
  CHECK(to_mask(array_of<uint8_t>({3}, NpyType::b1, {1, 0, 2})) == std::vector<uint8_t>{1, 0, 1});
  CHECK(to_mask(array_of<int64_t>({3}, NpyType::i8, {0, 5, -1})) == std::vector<uint8_t>{0, 1, 1});
  CHECK(to_mask(array_of<uint16_t>({2}, NpyType::f2, {0x8000, 0x7e00})) == std::vector<uint8_t>{0, 1});
  CHECK(to_mask(array_of<double>({}, NpyType::f8, {3.0})) == std::vector<uint8_t>{1});
}

TEST_CASE("npy: arrays whose bytes do not match their shape are rejected") {
  const NpyArray short_array = array_of<float>({2, 3}, NpyType::f4, {1.0f, 2.0f});
  CHECK_THROWS_AS(distgn::io::to_mask(short_array), Error);
  CHECK_THROWS_AS(distgn::io::convert_to(short_array, DType::f32), Error);
  CHECK_THROWS_AS(distgn::io::element_as_double(short_array, 2), Error);
  TempDir dir;
  CHECK_THROWS_AS(distgn::io::write_npy(dir.file("x.npy"), short_array), Error);
  CHECK(fs::is_empty(dir.path));
}

TEST_CASE("npy: unreadable and malformed files are errors naming the file") {
  TempDir dir;
  const std::string f4_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
  const std::string eight_bytes(8, '\0');
  const auto with_shape = [&](const std::string& shape) {
    return npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }", eight_bytes);
  };
  const auto with_descr = [&](const std::string& descr) {
    return npy_file("{'descr': " + descr + ", 'fortran_order': False, 'shape': (2,), }", eight_bytes);
  };
  const auto check_error = [&](const std::string& bytes, const std::string& expected) {
    const std::string message = error_for_bytes(dir, bytes);
    INFO(message);
    CHECK(contains(message, expected));
  };

  SECTION("missing file") {
    const std::string path = dir.file("missing.npy");
    const std::string message = read_error(path);
    CHECK(contains(message, path));
    CHECK(contains(message, "cannot open"));
  }
  SECTION("a directory") {
    const std::string message = read_error(dir.path.string());
    CHECK(contains(message, dir.path.string()));
    CHECK(contains(message, "not a regular file"));
  }
  SECTION("not a .npy file") {
    check_error("", "not a .npy file");
    check_error("\x93NUM", "not a .npy file");
    check_error("PK\x03\x04 this is a zip archive", "not a .npy file");
  }
  SECTION("unsupported versions") {
    std::string v4 = npy_file(f4_dict, eight_bytes, 2);
    v4[6] = 4;
    check_error(v4, "unsupported .npy format version 4.0");
    std::string v1_1 = npy_file(f4_dict, eight_bytes);
    v1_1[7] = 1;
    check_error(v1_1, "unsupported .npy format version 1.1");
  }
  SECTION("truncated header") {
    const std::string whole = as_string(numpy_f4_2x3);
    check_error(whole.substr(0, 7), "truncated header");
    check_error(whole.substr(0, 9), "truncated header");
    check_error(whole.substr(0, 60), "truncated header");
    // A version 2.0 header length of 4 GiB in a tiny file: an error, not an allocation.
    check_error(std::string("\x93NUMPY\x02\x00\xff\xff\xff\xff{}", 14), "truncated header");
  }
  SECTION("implausibly long header") {
    std::string huge = std::string("\x93NUMPY\x02\x00\x00\x00\x20\x00", 12) + std::string(size_t(1) << 21, ' ');
    check_error(huge, "implausibly large");
  }
  SECTION("malformed header dict") {
    const char* dicts[] = {
        "",
        "'descr': '<f4', 'fortran_order': False, 'shape': (2,)",
        "{'descr': '<f4', 'fortran_order': False}",
        "{'descr': '<f4', 'shape': (2,)}",
        "{'fortran_order': False, 'shape': (2,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'extra': 1}",
        "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}",
        "{'descr': '<f4, 'fortran_order': False, 'shape': (2,)}",
        "{'descr': '<f4' 'fortran_order': False, 'shape': (2,)}",
        "{'descr': '<f4', 'fortran_order': 0, 'shape': (2,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': [2]}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2 2)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2.0,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x",
        "{descr: '<f4', 'fortran_order': False, 'shape': (2,)}",
    };
    for (const char* dict : dicts) {
      INFO(dict);
      check_error(npy_file(dict, eight_bytes), "malformed .npy header");
    }
  }
  SECTION("Fortran order") {
    check_error(as_string(numpy_fortran_2x3),
                "Fortran-ordered arrays are not supported; save with np.ascontiguousarray");
  }
  SECTION("big-endian") {
    check_error(with_descr("'>f4'"), "big-endian dtype '>f4'");
  }
  SECTION("unsupported dtypes are named") {
    check_error(with_descr("'<c8'"), "unsupported dtype '<c8'");
    check_error(with_descr("'|O'"), "unsupported dtype '|O'");
    check_error(with_descr("'<U1'"), "unsupported dtype '<U1'");
    check_error(with_descr("'|S4'"), "unsupported dtype '|S4'");
    check_error(with_descr("'<M8[ns]'"), "unsupported dtype '<M8[ns]'");
    check_error(with_descr("'|f4'"), "unsupported dtype '|f4'");
    check_error(with_descr("[('a', '<f4')]"), "structured");
  }
  SECTION("data shorter or longer than the shape says") {
    const std::string whole = as_string(numpy_f4_2x3);
    check_error(whole.substr(0, whole.size() - 1), "truncated data");
    check_error(whole.substr(0, whole.size() - 24), "truncated data");
    check_error(whole + '\0', "1 trailing bytes");
    // A lying shape must not make the reader allocate what it claims.
    check_error(with_shape("(1000000000000, 1000000)"), "truncated data");
  }
  SECTION("negative and overflowing dimensions") {
    check_error(with_shape("(-2,)"), "negative dimension -2");
    check_error(with_shape("(2, -1)"), "negative dimension -1");
    check_error(with_shape("(99999999999999999999,)"), "does not fit a 64-bit integer");
    check_error(with_shape("(4294967296, 4294967296)"), "too large");
    check_error(with_shape("(2305843009213693952,)"), "too large");  // 2^61 floats: 2^63 bytes
  }
}

TEST_CASE("npy: a shape whose extents overflow int64 is an error, even when it has no elements", "[npy]") {
  TempDir dir;
  const auto empty_f4 = [](const std::string& shape) {
    return npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }", "");
  };
  // 0 elements, but 2^64 * 8 of anything sized from the other extents.
  const std::string message = error_for_bytes(dir, empty_f4("(4294967296, 4294967296, 0, 8)"));
  INFO(message);
  CHECK(contains(message, "(4294967296, 4294967296, 0, 8)"));
  CHECK(contains(message, "too large"));
  CHECK(contains(error_for_bytes(dir, empty_f4("(0, 1099511627776, 1099511627776)")), "too large"));
  // Elements alone fit (2^61) but their bytes do not (2^63).
  CHECK(contains(error_for_bytes(dir, empty_f4("(2305843009213693952, 0)")), "too large"));

  // Empty with large extents whose bytes fit (2^62): read, and nothing allocated.
  const std::string path = dir.file("empty.npy");
  write_file(path, empty_f4("(1099511627776, 0, 1048576)"));
  const NpyArray a = distgn::io::read_npy(path);
  CHECK(a.shape == Shape{int64_t(1) << 40, 0, int64_t(1) << 20});
  CHECK(a.size() == 0);
  CHECK(a.bytes.empty());
}

TEST_CASE("npy: NpyArray::size of a shape that overflows int64 is an error", "[npy]") {
  CHECK_THROWS_AS(array_of({int64_t(1) << 40, int64_t(1) << 40}, NpyType::u1, std::vector<uint8_t>{}).size(),
                  Error);
  CHECK_THROWS_AS(array_of({int64_t(1) << 32, int64_t(1) << 32, 0}, NpyType::u1, std::vector<uint8_t>{}).size(),
                  Error);
  CHECK(array_of({2, 0, 3}, NpyType::u1, std::vector<uint8_t>{}).size() == 0);
}

TEST_CASE("npy: write_npy replaces files atomically and leaves nothing on failure") {
  TempDir dir;
  const std::vector<float> values = {1, 2, 3};

  SECTION("target directory does not exist") {
    const std::string path = (dir.path / "missing" / "out.npy").string();
    try {
      distgn::io::write_npy(path, {3}, NpyType::f4, values.data());
      FAIL("write_npy did not throw");
    } catch (const Error& e) {
      INFO(e.what());
      CHECK(contains(e.what(), path));
    }
    CHECK(fs::is_empty(dir.path));
  }
  SECTION("invalid shapes") {
    CHECK_THROWS_AS(distgn::io::write_npy(dir.file("neg.npy"), {3, -1}, NpyType::f4, values.data()), Error);
    CHECK_THROWS_AS(distgn::io::write_npy(dir.file("null.npy"), {3}, NpyType::f4, nullptr), Error);
    CHECK(fs::is_empty(dir.path));
  }
  SECTION("an existing file is replaced, with no temp file left") {
    const std::string path = dir.file("out.npy");
    write_file(path, "old contents");
    const ino_t old_inode = inode_of(path);
    distgn::io::write_npy(path, {3}, NpyType::f4, values.data());
    CHECK(distgn::io::read_npy(path).bytes == bytes_of(values));
    // A new file renamed over the old one: a reader of the old one never sees a mix.
    CHECK(inode_of(path) != old_inode);
    CHECK(entries(dir) == 1);
  }
}

TEST_CASE("npy: write_npy writes through symbolic links and into devices and FIFOs, never replacing them",
          "[npy]") {
  TempDir dir;
  const std::vector<float> values = {1, 2, 3};
  const auto write = [&](const std::string& path) { distgn::io::write_npy(path, {3}, NpyType::f4, values.data()); };
  // The bytes write_npy puts in a plain new file.
  write(dir.file("reference.npy"));
  const std::string expected = read_file(dir.file("reference.npy"));
  fs::remove(dir.file("reference.npy"));

  SECTION("a character device is written to, not replaced") {
    // The null device (1, 3), as `--y /dev/null` would name it.
    const std::string path = dir.file("null");
    if (mknod(path.c_str(), S_IFCHR | 0666, makedev(1, 3)) != 0) {
      WARN("skipped: cannot mknod a character device here (needs root): " << std::strerror(errno));
      return;  // Catch2 v2 has no SKIP
    }
    write(path);
    CHECK(fs::is_character_file(fs::symlink_status(path)));
    CHECK(entries(dir) == 1);

    // The full device (1, 7): its write error is reported, naming the path.
    const std::string full = dir.file("full");
    REQUIRE(mknod(full.c_str(), S_IFCHR | 0666, makedev(1, 7)) == 0);
    try {
      write(full);
      FAIL("write_npy(" << full << ") did not throw");
    } catch (const Error& e) {
      INFO(e.what());
      CHECK(contains(e.what(), full));
      CHECK(contains(e.what(), std::strerror(ENOSPC)));
    }
    CHECK(fs::is_character_file(fs::symlink_status(full)));
    CHECK(entries(dir) == 2);
  }
  SECTION("a symbolic link to a regular file stays a link and its target gets the data") {
    write_file(dir.file("target.npy"), "old contents");
    fs::create_symlink("target.npy", dir.file("link.npy"));
    fs::create_symlink("link.npy", dir.file("link_to_link.npy"));
    write(dir.file("link_to_link.npy"));
    CHECK(fs::read_symlink(dir.file("link_to_link.npy")) == "link.npy");
    CHECK(fs::read_symlink(dir.file("link.npy")) == "target.npy");
    CHECK(fs::is_regular_file(fs::symlink_status(dir.file("target.npy"))));
    CHECK(read_file(dir.file("target.npy")) == expected);
    CHECK(entries(dir) == 3);
  }
  SECTION("a dangling symbolic link creates its target") {
    fs::create_directory(dir.file("sub"));
    fs::create_symlink("sub/new.npy", dir.file("link.npy"));
    write(dir.file("link.npy"));
    CHECK(fs::read_symlink(dir.file("link.npy")) == "sub/new.npy");
    CHECK(read_file(dir.file("sub/new.npy")) == expected);
    CHECK(entries(dir) == 2);
  }
  SECTION("a FIFO is written to while a reader drains it") {
    const std::string path = dir.file("pipe");
    REQUIRE(mkfifo(path.c_str(), 0600) == 0);
    // Open before writing, without blocking, so a wrong write_npy fails the
    // test instead of hanging it. 1 MiB overfills the pipe: the writer must
    // wait for the reader.
    const std::vector<float> big(size_t(1) << 18, 2.5f);
    const int reader = open(path.c_str(), O_RDONLY | O_NONBLOCK);
    REQUIRE(reader >= 0);
    std::atomic<bool> written{false};
    std::string write_error;
    std::thread writer([&] {
      try {
        distgn::io::write_npy(path, {int64_t(big.size())}, NpyType::f4, big.data());
      } catch (const Error& e) {
        write_error = e.what();
      }
      written = true;
    });
    std::string received;
    char buffer[65536];
    while (true) {
      const bool done = written;  // read before draining, so nothing written after is missed
      const ssize_t n = read(reader, buffer, sizeof buffer);
      if (n > 0) received.append(buffer, size_t(n));
      else if (done) break;
      else std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    writer.join();
    close(reader);
    CHECK(write_error == "");
    CHECK(fs::is_fifo(fs::symlink_status(path)));
    CHECK(entries(dir) == 1);
    distgn::io::write_npy(dir.file("big.npy"), {int64_t(big.size())}, NpyType::f4, big.data());
    const std::string expected_big = read_file(dir.file("big.npy"));
    CHECK(received.size() == expected_big.size());
    CHECK((received == expected_big));  // not expanded: 1 MiB
  }
  SECTION("a directory, or a link to one, is an error naming it") {
    fs::create_directory(dir.file("taken"));
    fs::create_symlink("taken", dir.file("link"));
    for (const std::string name : {"taken", "link"}) {
      const std::string path = dir.file(name);
      try {
        write(path);
        FAIL("write_npy(" << path << ") did not throw");
      } catch (const Error& e) {
        INFO(e.what());
        CHECK(contains(e.what(), path));
        CHECK(contains(e.what(), "is a directory"));
      }
    }
    CHECK(fs::is_symlink(dir.file("link")));
    CHECK(fs::is_empty(dir.file("taken")));
    CHECK(entries(dir) == 2);
  }
}
