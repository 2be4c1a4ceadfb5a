// Tests of element_count, which every buffer size and loop bound in the layer
// and the CLI is computed from.
#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <string>

#include "distgn/error.hpp"
#include "distgn/tensor.hpp"

using distgn::byte_size;
using distgn::DType;
using distgn::element_count;
using distgn::Error;
using distgn::Shape;

namespace {

constexpr int64_t k2to32 = int64_t(1) << 32;
constexpr int64_t k2to40 = int64_t(1) << 40;

// element_count's message for a shape it rejects; fails the test if it counts.
std::string count_error(const Shape& shape) {
  try {
    const int64_t count = element_count(shape);
    FAIL("element_count(" << distgn::shape_string(shape) << ") returned " << count);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("tensor: element_count multiplies the extents", "[tensor]") {
  CHECK(element_count({}) == 1);
  CHECK(element_count({7}) == 7);
  CHECK(element_count({2, 3, 4}) == 24);
  CHECK(element_count({0}) == 0);
  CHECK(element_count({3, 0, 2}) == 0);
  CHECK(element_count({std::numeric_limits<int64_t>::max(), 1}) == std::numeric_limits<int64_t>::max());
  CHECK(element_count({k2to32, k2to32 / 2 - 1}) == k2to32 * (k2to32 / 2 - 1));  // 2^63 - 2^32
  // Empty, and the other extents multiply to 2^60: a possible (if odd) array.
  CHECK(element_count({k2to40, 0, int64_t(1) << 20}) == 0);
}

TEST_CASE("tensor: element_count rejects shapes whose extents overflow int64, even empty ones",
          "[tensor]") {
  const std::string message = count_error({k2to40, k2to40});
  INFO(message);
  CHECK(message.find("(1099511627776, 1099511627776)") != std::string::npos);
  CHECK(message.find("overflow") != std::string::npos);
  CHECK_THROWS_AS(element_count({std::numeric_limits<int64_t>::max(), 2}), Error);
  CHECK_THROWS_AS(element_count({int64_t(1) << 62, 2}), Error);  // exactly 2^63
  // A zero extent makes the count 0, but such a header is corrupt or hostile;
  // anything sized from the other extents would overflow too.
  CHECK_THROWS_AS(element_count({k2to32, k2to32, 0}), Error);
  CHECK_THROWS_AS(element_count({0, k2to32, k2to32, 8}), Error);
}

TEST_CASE("tensor: element_count rejects negative extents", "[tensor]") {
  const std::string message = count_error({2, -3});
  INFO(message);
  CHECK(message.find("(2, -3)") != std::string::npos);
  CHECK(message.find("negative") != std::string::npos);
  CHECK_THROWS_AS(element_count({-1, -1}), Error);
}

TEST_CASE("tensor: byte_size is element_count times dtype_size, checked for int64 overflow", "[tensor]") {
  CHECK(byte_size({2, 3, 4}, DType::f16) == 48);
  CHECK(byte_size({k2to32, 0}, DType::f64) == 0);
  CHECK(byte_size({int64_t(1) << 60}, DType::f32) == int64_t(1) << 62);
  // 2^61 float64 elements are a valid count, but 2^64 bytes.
  CHECK_THROWS_WITH(byte_size({int64_t(1) << 61}, DType::f64), Catch::Contains("int64 overflow"));
  CHECK_THROWS_WITH(byte_size({k2to40, k2to40}, DType::f32), Catch::Contains("(1099511627776, 1099511627776)"));
}
