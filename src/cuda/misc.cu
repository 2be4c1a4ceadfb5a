// The small kernels: walking-order gathers and scatters, mask expansion,
// backward terms from exchanged sums, parameter-gradient stores, and the
// conversion probes the tests compare with core/half.hpp.
#include "cuda/kernels.cuh"

namespace distgn {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Grid-stride loops: enough blocks to fill the machine, never more than the grid holds.
int64_t elementwise_blocks(int64_t total) { return min64(ceil_div(total, kThreads), int64_t(1) << 20); }

__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

template <class E>
__global__ void permute_kernel(StridedIndex map, int64_t total, const E* src, E* dst, bool gather) {
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t o = map.offset(i);
    if (gather) dst[i] = src[o];
    else dst[o] = src[i];
  }
}

__global__ void expand_mask_kernel(StridedIndex map, int64_t total, const uint8_t* src, uint8_t* dst) {
  for (int64_t i = global_thread(); i < total; i += grid_threads()) dst[i] = src[map.offset(i)] != 0 ? 1 : 0;
}

__global__ void terms_kernel(int64_t cells, const SumPair* sums, const double* count, const double* clamped,
                             SumPair* terms) {
  for (int64_t i = global_thread(); i < cells; i += grid_threads()) {
    const CellTerms t = cell_terms(sums[i].first, sums[i].second, count[i], clamped[i] != 0.0);
    terms[i] = SumPair{t.a, t.b};
  }
}

__global__ void store_doubles_kernel(const double* src, int64_t count, void* dst, DType dtype) {
  for (int64_t i = global_thread(); i < count; i += grid_threads()) store_any(dst, i, dtype, src[i]);
}

__global__ void halves_to_float_kernel(const uint16_t* in, int64_t count, DType dtype, float* out) {
  for (int64_t i = global_thread(); i < count; i += grid_threads())
    out[i] = dtype == DType::f16 ? to_wide(half_t{in[i]}) : to_wide(bfloat16_t{in[i]});
}

__global__ void floats_to_half_kernel(const float* in, int64_t count, DType dtype, uint16_t* out) {
  for (int64_t i = global_thread(); i < count; i += grid_threads())
    out[i] = dtype == DType::f16 ? Narrow<half_t>::of(in[i]).bits : Narrow<bfloat16_t>::of(in[i]).bits;
}

}  // namespace

void permute(Stream stream, const StridedIndex& map, int64_t total, int element_bytes, const void* src, void* dst,
             bool gather) {
  if (total <= 0) return;
  auto run = [&](auto element) {
    using E = decltype(element);
    launch_kernel(stream, "permute", elementwise_blocks(total), kThreads, 0, &permute_kernel<E>, map, total,
                  static_cast<const E*>(src), static_cast<E*>(dst), gather);
  };
  switch (element_bytes) {
    case 1: return run(uint8_t{});
    case 2: return run(uint16_t{});
    case 4: return run(uint32_t{});
    case 8: return run(uint64_t{});
    default:
      throw Error("CUDA permute: elements of " + std::to_string(element_bytes) + " bytes are not supported");
  }
}

void expand_mask(Stream stream, const StridedIndex& map, int64_t total, const uint8_t* src, uint8_t* dst) {
  if (total <= 0) return;
  launch_kernel(stream, "expand_mask", elementwise_blocks(total), kThreads, 0, &expand_mask_kernel, map, total, src,
                dst);
}

void terms_from_sums(Stream stream, int64_t cells, const SumPair* cell_sums, const double* count,
                     const double* clamped, SumPair* terms) {
  if (cells <= 0) return;
  launch_kernel(stream, "terms", elementwise_blocks(cells), kThreads, 0, &terms_kernel, cells, cell_sums, count,
                clamped, terms);
}

void store_doubles(Stream stream, const double* src, int64_t count, void* dst, DType dtype) {
  if (count <= 0) return;
  launch_kernel(stream, "store_doubles", elementwise_blocks(count), kThreads, 0, &store_doubles_kernel, src, count,
                dst, dtype);
}

void convert_halves_to_float(Stream stream, const uint16_t* in, int64_t count, DType dtype, float* out) {
  if (count <= 0) return;
  launch_kernel(stream, "convert", elementwise_blocks(count), kThreads, 0, &halves_to_float_kernel, in, count,
                dtype, out);
}

void convert_floats_to_half(Stream stream, const float* in, int64_t count, DType dtype, uint16_t* out) {
  if (count <= 0) return;
  launch_kernel(stream, "convert", elementwise_blocks(count), kThreads, 0, &floats_to_half_kernel, in, count,
                dtype, out);
}

}  // namespace cuda
}  // namespace distgn
