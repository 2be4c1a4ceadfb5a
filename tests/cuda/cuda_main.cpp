// Catch2 for the GPU tests: without a usable CUDA device the run exits with
// 77, which CTest (SKIP_RETURN_CODE 77) reports as skipped, never passed.
// `--probe` answers only that question (0: a device is there).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstring>

#include "distgn/device.hpp"

int main(int argc, char** argv) {
  const int devices = distgn::cuda::device_count();
  if (devices == 0) {
    std::printf("SKIPPED: no CUDA device (cudaGetDeviceCount reports none or no driver)\n");
    return 77;
  }
  if (argc > 1 && std::strcmp(argv[1], "--probe") == 0) return 0;
  std::printf("CUDA device 0 of %d: %s\n", devices, distgn::cuda::device_description().c_str());
  return Catch::Session().run(argc, argv);
}
