// distgn/device.hpp: the CUDA device, owning device arrays, streams and event
// timers, for a program that hands distgn device tensors (the command-line
// tool, the tests, an application without a framework of its own). Plain
// C++: no CUDA header needed to use it; errors are distgn::Error. Defined in
// a CUDA build only (DISTGN_WITH_CUDA in distgn/build_config.hpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

struct CUstream_st;
struct CUevent_st;

namespace distgn {
namespace cuda {

// Number of CUDA devices this process can use; 0 when there is none or no
// driver (never throws).
int device_count();
// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)" for the current device.
std::string device_description();
// Makes `device` the calling thread's current device.
void set_device(int device);
// One GPU per rank, round robin: makes device rank % device_count() current.
// Raises "--backend cuda: no CUDA device is visible" when there is none.
void use_device_of_rank(int rank);

// cudaMalloc'ed bytes, freed with the object. Out of device memory is a
// std::bad_alloc whose what() says how many bytes did not fit.
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t bytes);
  ~DeviceArray();
  DeviceArray(DeviceArray&& other) noexcept;
  DeviceArray& operator=(DeviceArray&& other) noexcept;
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  // Synchronous copies of `bytes` (at most bytes()) from or to host memory.
  void upload(const void* host, size_t bytes);
  void download(void* host, size_t bytes) const;

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// A non-blocking stream of the current device, destroyed with the object.
class StreamHandle {
 public:
  StreamHandle();
  ~StreamHandle();
  StreamHandle(const StreamHandle&) = delete;
  StreamHandle& operator=(const StreamHandle&) = delete;
  CUstream_st* get() const { return stream_; }
  void synchronize() const;

 private:
  CUstream_st* stream_ = nullptr;
};

// Elapsed GPU time between two points of a stream.
class EventTimer {
 public:
  EventTimer();
  ~EventTimer();
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  void start(CUstream_st* stream);
  // Records the end, waits for it and returns the milliseconds since start().
  double stop_ms(CUstream_st* stream);

 private:
  CUevent_st* start_ = nullptr;
  CUevent_st* stop_ = nullptr;
};

// Asynchronous device-to-device copy on `stream`.
void device_copy(void* dst, const void* src, size_t bytes, CUstream_st* stream);

}  // namespace cuda
}  // namespace distgn
