// libFuzzer target for the .npy reader (src/io/npy.cpp): any byte string is
// either read or rejected with distgn::Error (semantics §2: every problem is an Error
// naming the file); anything else -- a crash, a sanitizer report, another
// exception, an array whose bytes disagree with its shape -- is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "distgn/error.hpp"
#include "io/npy.hpp"

namespace {

// read_npy takes a path: one memfd per process, rewritten per input, read
// through /proc/self/fd so no file system is touched.
int input_fd() {
  static int fd = memfd_create("fuzz_npy", 0);
  if (fd < 0) {
    std::perror("memfd_create");
    std::abort();
  }
  return fd;
}

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_npy: invariant broken: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = input_fd();
  if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != ssize_t(size)) std::abort();
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  distgn::io::NpyArray a;
  try {
    a = distgn::io::read_npy(path);
  } catch (const distgn::Error&) {
    return 0;  // rejected, as it should be for malformed input
  }
  // Accepted: the element bytes must match the header's shape and dtype, and
  // every element must be readable.
  const int64_t n = a.size();
  check(n >= 0, "negative element count");
  check(int64_t(a.bytes.size()) == n * distgn::io::npy_type_size(a.type), "bytes != size * itemsize");
  check(int64_t(a.bytes.size()) <= int64_t(size), "more element bytes than the file holds");
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += distgn::io::element_as_double(a, i);
  const auto mask = distgn::io::to_mask(a);
  check(int64_t(mask.size()) == n, "mask size != element count");
  (void)sum;
  return 0;
}
