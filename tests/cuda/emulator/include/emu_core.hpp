// A CPU emulator of the CUDA execution model, for testing distgn's kernels
// without a GPU: blocks run one after another; the threads of a block are
// fibers on one OS thread, switched at __syncthreads and warp shuffles, so
// barrier and shuffle semantics (including misuse: deadlock on divergent
// barriers or shuffles with exited lanes) are reproduced.
#pragma once
#include <csetjmp>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace emu {

struct Config {
  dim3 grid, block;
  size_t shared;
  cudaStream_t stream;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), shared(s), stream(st) {}
};

dim3 thread_idx();
dim3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void block_barrier();
void* dynamic_shared();
// Warp shuffles: every lane of the warp must take part.
uint64_t shuffle_bits(uint64_t bits, int mode, int arg);  // mode 0 down, 1 xor, 2 index
void run_grid(const Config& c, const std::function<void()>& body);
extern long long launches;

template <class K, class... A>
void launch(K kernel, const Config& c, A... args) {
  ++launches;
  run_grid(c, [&] { kernel(args...); });
}

template <class T>
T shuffle(T v, int mode, int arg) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shuffle_bits(bits, mode, arg);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

template <class T>
T __shfl_down_sync(unsigned, T v, unsigned offset) { return emu::shuffle(v, 0, int(offset)); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) { return emu::shuffle(v, 1, mask); }
template <class T>
T __shfl_sync(unsigned, T v, int src) { return emu::shuffle(v, 2, src); }
inline void __syncthreads() { emu::block_barrier(); }
inline void __threadfence() {}
template <class T>
T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    std::fprintf(stderr, "emu: misaligned %zu-byte load at %p\n", sizeof(T), (const void*)p);
    std::abort();
  }
  return *p;
}
template <class T>
T __ldcg(const T* p) { return __ldg(p); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned old = *p; *p = old + v; return old; }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  if (v < old) *p = v;
  return old;
}
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
