// Device-side building blocks of the CUDA kernels: storage types and their
// conversions, 16-byte vector loads and stores, warp reductions, the per-cell
// state views. Included by the .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/cell_stats.hpp"
#include "core/half.hpp"
#include "cuda/geometry.hpp"
#include "cuda/launch.hpp"

namespace distgn {
namespace cuda {

// A storage dtype chosen at run time: the generic kernels (scalar accesses,
// any dtype combination) are instantiated with it.
struct AnyDType {};

// ---- conversions --------------------------------------------------------------
// bfloat16 -> float is the shared header's (a shift). float16 <-> float and
// float -> bfloat16 use the hardware's conversions, which round the same way as
// core/half.hpp (to nearest, ties to even, subnormals and overflow included;
// only NaN payloads may differ): the shared versions are integer sequences
// that would make float16 kernels compute-bound. tests/cuda checks the two
// agree on every float16 and many float values.

__device__ __forceinline__ float to_wide(float v) { return v; }
__device__ __forceinline__ double to_wide(double v) { return v; }
__device__ __forceinline__ float to_wide(half_t v) { return __half2float(__ushort_as_half(v.bits)); }
__device__ __forceinline__ float to_wide(bfloat16_t v) { return to_float(v); }

template <class T>
struct Narrow;
template <>
struct Narrow<float> {
  template <class V>
  __device__ static float of(V v) { return float(v); }
};
template <>
struct Narrow<double> {
  template <class V>
  __device__ static double of(V v) { return double(v); }
};
template <>
struct Narrow<half_t> {
  template <class V>
  __device__ static half_t of(V v) { return half_t{__half_as_ushort(__float2half_rn(float(v)))}; }
};
template <>
struct Narrow<bfloat16_t> {
  template <class V>
  __device__ static bfloat16_t of(V v) {
    return bfloat16_t{__bfloat16_as_ushort(__float2bfloat16_rn(float(v)))};
  }
};

__device__ __forceinline__ double load_any(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::f64: return static_cast<const double*>(p)[i];
    case DType::f16: return to_wide(static_cast<const half_t*>(p)[i]);
    case DType::bf16: return to_wide(static_cast<const bfloat16_t*>(p)[i]);
  }
  return 0;
}

template <class V>
__device__ __forceinline__ void store_any(void* p, int64_t i, DType t, V v) {
  switch (t) {
    case DType::f32: static_cast<float*>(p)[i] = Narrow<float>::of(v); break;
    case DType::f64: static_cast<double*>(p)[i] = Narrow<double>::of(v); break;
    case DType::f16: static_cast<half_t*>(p)[i] = Narrow<half_t>::of(v); break;
    case DType::bf16: static_cast<bfloat16_t*>(p)[i] = Narrow<bfloat16_t>::of(v); break;
  }
}

// ---- raw vector accesses --------------------------------------------------------

// N bytes moved as one (or, for 32, two) aligned accesses.
template <int N>
struct Words;
template <>
struct Words<1> {
  unsigned char v;
  __device__ void load(const void* p) { v = __ldg(static_cast<const unsigned char*>(p)); }
  __device__ void store(void* p) const { *static_cast<unsigned char*>(p) = v; }
};
template <>
struct Words<2> {
  unsigned short v;
  __device__ void load(const void* p) { v = __ldg(static_cast<const unsigned short*>(p)); }
  __device__ void store(void* p) const { *static_cast<unsigned short*>(p) = v; }
};
template <>
struct Words<4> {
  unsigned int v;
  __device__ void load(const void* p) { v = __ldg(static_cast<const unsigned int*>(p)); }
  __device__ void store(void* p) const { *static_cast<unsigned int*>(p) = v; }
};
template <>
struct Words<8> {
  uint2 v;
  __device__ void load(const void* p) { v = __ldg(static_cast<const uint2*>(p)); }
  __device__ void store(void* p) const { *static_cast<uint2*>(p) = v; }
};
template <>
struct Words<16> {
  uint4 v;
  __device__ void load(const void* p) { v = __ldg(static_cast<const uint4*>(p)); }
  __device__ void store(void* p) const { *static_cast<uint4*>(p) = v; }
};
template <>
struct Words<32> {
  uint4 v[2];
  __device__ void load(const void* p) {
    v[0] = __ldg(static_cast<const uint4*>(p));
    v[1] = __ldg(static_cast<const uint4*>(p) + 1);
  }
  __device__ void store(void* p) const {
    static_cast<uint4*>(p)[0] = v[0];
    static_cast<uint4*>(p)[1] = v[1];
  }
};

template <class T, int VEC>
union Pack {
  T e[VEC];
  Words<int(VEC * sizeof(T))> w;
};

// ---- typed readers and writers ----------------------------------------------------
// Reader<T, VEC>::load(i, v) reads elements [i, i + VEC) (i a multiple of VEC,
// the array 16-byte aligned) widened to float (double for float64 and the
// run-time dtype). Writer<T, VEC>::store(i, v) rounds and writes them.

template <class T>
struct WideOf {
  using type = float;
};
template <>
struct WideOf<double> {
  using type = double;
};
template <>
struct WideOf<AnyDType> {
  using type = double;
};

template <class T, int VEC>
struct Reader {
  using Wide = typename WideOf<T>::type;
  static constexpr int kVec = VEC;
  // Loaded but not yet widened: half the registers for 2-byte types.
  using Raw = Pack<T, VEC>;
  const T* p;
  __device__ void load_raw(int64_t i, Raw& r) const { r.w.load(p + i); }
  __device__ static Wide lane(const Raw& r, int l) { return to_wide(r.e[l]); }
  __device__ Wide get(int64_t i) const {
    Pack<T, 1> one;
    one.w.load(p + i);
    return to_wide(one.e[0]);
  }
  __device__ void load(int64_t i, Wide (&v)[VEC]) const {
    Pack<T, VEC> pack;
    pack.w.load(p + i);
#pragma unroll
    for (int l = 0; l < VEC; ++l) v[l] = to_wide(pack.e[l]);
  }
};

template <int VEC>
struct Reader<AnyDType, VEC> {
  static_assert(VEC == 1, "run-time dtypes are read one element at a time");
  using Wide = double;
  static constexpr int kVec = 1;
  struct Raw {
    double e[1];
  };
  const void* p;
  DType dtype;
  __device__ void load_raw(int64_t i, Raw& r) const { r.e[0] = load_any(p, i, dtype); }
  __device__ static double lane(const Raw& r, int l) { return r.e[l]; }
  __device__ double get(int64_t i) const { return load_any(p, i, dtype); }
  __device__ void load(int64_t i, double (&v)[1]) const { v[0] = load_any(p, i, dtype); }
};

template <class T, int VEC>
struct Writer {
  static constexpr int kVec = VEC;
  T* p;
  template <class V>
  __device__ void put(int64_t i, V v) const {
    p[i] = Narrow<T>::template of<V>(v);
  }
  template <class V>
  __device__ void store(int64_t i, const V (&v)[VEC]) const {
    Pack<T, VEC> pack;
#pragma unroll
    for (int l = 0; l < VEC; ++l) pack.e[l] = Narrow<T>::template of<V>(v[l]);
    pack.w.store(p + i);
  }
};

template <int VEC>
struct Writer<AnyDType, VEC> {
  static_assert(VEC == 1, "run-time dtypes are written one element at a time");
  static constexpr int kVec = 1;
  void* p;
  DType dtype;
  template <class V>
  __device__ void put(int64_t i, V v) const {
    store_any(p, i, dtype, v);
  }
  template <class V>
  __device__ void store(int64_t i, const V (&v)[1]) const {
    store_any(p, i, dtype, v[0]);
  }
};

// Mask bytes [i, i + VEC), kept packed.
template <int VEC>
using MaskPack = Pack<uint8_t, VEC>;
template <int VEC>
__device__ __forceinline__ void load_mask(const uint8_t* mask, int64_t i, MaskPack<VEC>& m) {
  m.w.load(mask + i);
}

// Mask bytes [i, i + VEC).
template <int VEC>
__device__ __forceinline__ void load_mask(const uint8_t* mask, int64_t i, uint8_t (&m)[VEC]) {
  Pack<uint8_t, VEC> pack;
  pack.w.load(mask + i);
#pragma unroll
  for (int l = 0; l < VEC; ++l) m[l] = pack.e[l];
}

// ---- reductions ---------------------------------------------------------------------
// Fixed shapes of combination: results do not depend on timing, so every run
// (and every rank) gets the same bits.

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  return v;  // lane 0 holds the total
}

__device__ __forceinline__ uint32_t warp_min(uint32_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = min(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;  // every lane
}

// Chan's merge down the warp; lane 0 holds the merge of all lanes.
__device__ __forceinline__ CellMoments warp_merge(CellMoments m) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const CellMoments other{__shfl_down_sync(kFullMask, m.count, offset),
                            __shfl_down_sync(kFullMask, m.mean, offset),
                            __shfl_down_sync(kFullMask, m.m2, offset)};
    if (lane + offset < kWarp) m = merge_moments(m, other);
  }
  return m;
}

// Partials written by other blocks of the same kernel: read through L2.
__device__ __forceinline__ CellMoments load_partial(const CellMoments* p) {
  const double* d = reinterpret_cast<const double*>(p);
  return CellMoments{__ldcg(d), __ldcg(d + 1), __ldcg(d + 2)};
}
__device__ __forceinline__ SumPair load_partial(const SumPair* p) {
  const double2 v = __ldcg(reinterpret_cast<const double2*>(p));
  return SumPair{v.x, v.y};
}

// ---- per-cell state ---------------------------------------------------------------

__device__ __forceinline__ void write_cell_state(const CellStateView& s, int64_t cell, const CellMoments& m,
                                                 const FinalizeParams& f) {
  const CellStats stats = finalize_moments(m, f.epsilon, f.fast_variance, f.stats_dtype);
  s.mean[cell] = stats.mean;
  s.rstd[cell] = stats.rstd;
  s.count[cell] = m.count;
  s.clamped[cell] = stats.variance_clamped ? 1.0 : 0.0;
}

// Arrival counting for "the last block (or warp) of a group finishes the
// group", with its fences: the unit's partials are visible before it
// arrives, and the last unit reads everyone's after it saw them all arrive.
// Every thread of the unit calls last_arrival once the unit's partials are
// written, all but what write() stores: the arriving thread (the block's
// thread 0, or the warp's lane 0) calls it just before it arrives.
// Arrival::block synchronises the block. True in every thread of the unit
// that arrives last, which also resets the counter (`expected` units per
// launch) for the next launch.
enum class Arrival { block, warp };

// The arrival itself, by the arriving thread.
__device__ __forceinline__ bool arrive_last(unsigned* counter, unsigned expected) {
  __threadfence();
  const unsigned before = atomicAdd(counter, 1u);
  const bool last = before + 1 == expected;
  if (last) {
    *counter = 0;
    __threadfence();
  }
  return last;
}

template <Arrival UNIT, class Write>
__device__ __forceinline__ bool last_arrival(unsigned* counter, unsigned expected, Write write) {
  int last = 0;
  if constexpr (UNIT == Arrival::block) {
    __shared__ int last_block;
    __threadfence();  // every writer's partials, before the block's arrival
    __syncthreads();
    if (threadIdx.x == 0) {
      write();
      last_block = arrive_last(counter, expected);
    }
    __syncthreads();
    last = last_block;
  } else {
    if (threadIdx.x % kWarp == 0) {
      write();
      last = arrive_last(counter, expected) ? 1 : 0;
    }
    last = __shfl_sync(kFullMask, last, 0);
  }
  if (!last) return false;
  __threadfence();  // every reader, after the arrival that saw all others
  return true;
}

template <Arrival UNIT>
__device__ __forceinline__ bool last_arrival(unsigned* counter, unsigned expected) {
  return last_arrival<UNIT>(counter, expected, [] {});
}

__device__ __forceinline__ bool is_finite(float v) { return isfinite(v); }
__device__ __forceinline__ bool is_finite(double v) { return isfinite(v); }

}  // namespace cuda
}  // namespace distgn
