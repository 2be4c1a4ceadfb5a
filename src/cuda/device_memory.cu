#include "cuda/device_memory.hpp"

#include <cuda_runtime.h>

#include <utility>

#include "cuda/cuda_check.hpp"

namespace distgn {
namespace cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error state: "no device" is an answer here
    return 0;
  }
  return count;
}

std::string device_description() {
  int device = 0;
  DISTGN_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  DISTGN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
         std::to_string(prop.multiProcessorCount) + " SMs, " + std::to_string(prop.l2CacheSize >> 20) + " MB L2)";
}

void set_device(int device) { DISTGN_CUDA_CHECK(cudaSetDevice(device)); }

void use_device_of_rank(int rank) {
  const int devices = device_count();
  if (devices == 0) throw Error("--backend cuda: no CUDA device is visible");
  set_device(rank % devices);
}

DeviceArray::DeviceArray(size_t bytes) : bytes_(bytes) {
  if (bytes) DISTGN_CUDA_CHECK(cudaMalloc(&data_, bytes));
}

DeviceArray::~DeviceArray() {
  if (data_) cudaFree(data_);
}

DeviceArray::DeviceArray(DeviceArray&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceArray& DeviceArray::operator=(DeviceArray&& other) noexcept {
  if (this != &other) {
    if (data_) cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void DeviceArray::upload(const void* host, size_t bytes) {
  if (bytes > bytes_) throw Error("DeviceArray::upload: " + std::to_string(bytes) + " bytes into " + std::to_string(bytes_));
  if (bytes) DISTGN_CUDA_CHECK(cudaMemcpy(data_, host, bytes, cudaMemcpyHostToDevice));
}

void DeviceArray::download(void* host, size_t bytes) const {
  if (bytes > bytes_) throw Error("DeviceArray::download: " + std::to_string(bytes) + " bytes from " + std::to_string(bytes_));
  if (bytes) DISTGN_CUDA_CHECK(cudaMemcpy(host, data_, bytes, cudaMemcpyDeviceToHost));
}

PinnedArray::PinnedArray(size_t bytes) : bytes_(bytes) {
  if (bytes) DISTGN_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&data_), bytes));
}

PinnedArray::~PinnedArray() {
  if (data_) cudaFreeHost(data_);
}

PinnedArray::PinnedArray(PinnedArray&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

PinnedArray& PinnedArray::operator=(PinnedArray&& other) noexcept {
  if (this != &other) {
    if (data_) cudaFreeHost(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

StreamHandle::StreamHandle() { DISTGN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
StreamHandle::~StreamHandle() {
  if (stream_) cudaStreamDestroy(stream_);
}
void StreamHandle::synchronize() const { DISTGN_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

EventTimer::EventTimer() {
  DISTGN_CUDA_CHECK(cudaEventCreate(&start_));
  DISTGN_CUDA_CHECK(cudaEventCreate(&stop_));
}
EventTimer::~EventTimer() {
  if (start_) cudaEventDestroy(start_);
  if (stop_) cudaEventDestroy(stop_);
}
void EventTimer::start(CUstream_st* stream) { DISTGN_CUDA_CHECK(cudaEventRecord(start_, stream)); }
double EventTimer::stop_ms(CUstream_st* stream) {
  DISTGN_CUDA_CHECK(cudaEventRecord(stop_, stream));
  DISTGN_CUDA_CHECK(cudaEventSynchronize(stop_));
  float ms = 0;
  DISTGN_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
  return ms;
}

void device_copy(void* dst, const void* src, size_t bytes, CUstream_st* stream) {
  if (bytes) DISTGN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
}

}  // namespace cuda
}  // namespace distgn
