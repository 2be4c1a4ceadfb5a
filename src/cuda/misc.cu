// The small kernels: walking-order gathers and scatters, mask expansion,
// backward terms from exchanged sums, parameter-gradient stores, and the
// conversion probes the tests compare with core/half.hpp.
#include "cuda/cuda_check.hpp"
#include "cuda/kernels.cuh"

namespace distgn {
namespace cuda {
namespace {

constexpr int kThreads = 256;

unsigned elementwise_blocks(int64_t total, const char* what) {
  // Grid-stride loops: enough blocks to fill the machine, never more than the grid holds.
  return grid_size(min64(ceil_div(total, kThreads), int64_t(1) << 20), what);
}

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
  const unsigned blocks = elementwise_blocks(total, "permute");
  switch (element_bytes) {
    case 1:
      permute_kernel<uint8_t><<<blocks, kThreads, 0, stream>>>(map, total, static_cast<const uint8_t*>(src),
                                                               static_cast<uint8_t*>(dst), gather);
      break;
    case 2:
      permute_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(map, total, static_cast<const uint16_t*>(src),
                                                                static_cast<uint16_t*>(dst), gather);
      break;
    case 4:
      permute_kernel<uint32_t><<<blocks, kThreads, 0, stream>>>(map, total, static_cast<const uint32_t*>(src),
                                                                static_cast<uint32_t*>(dst), gather);
      break;
    case 8:
      permute_kernel<uint64_t><<<blocks, kThreads, 0, stream>>>(map, total, static_cast<const uint64_t*>(src),
                                                                static_cast<uint64_t*>(dst), gather);
      break;
    default:
      throw Error("CUDA permute: elements of " + std::to_string(element_bytes) + " bytes are not supported");
  }
  DISTGN_CUDA_CHECK_LAUNCH("permute_kernel");
}

void expand_mask(Stream stream, const StridedIndex& map, int64_t total, const uint8_t* src, uint8_t* dst) {
  if (total <= 0) return;
  expand_mask_kernel<<<elementwise_blocks(total, "expand_mask"), kThreads, 0, stream>>>(map, total, src, dst);
  DISTGN_CUDA_CHECK_LAUNCH("expand_mask_kernel");
}

void terms_from_sums(Stream stream, int64_t cells, const SumPair* cell_sums, const double* count,
                     const double* clamped, SumPair* terms) {
  if (cells <= 0) return;
  terms_kernel<<<elementwise_blocks(cells, "terms"), kThreads, 0, stream>>>(cells, cell_sums, count, clamped, terms);
  DISTGN_CUDA_CHECK_LAUNCH("terms_kernel");
}

void store_doubles(Stream stream, const double* src, int64_t count, void* dst, DType dtype) {
  if (count <= 0) return;
  store_doubles_kernel<<<elementwise_blocks(count, "store_doubles"), kThreads, 0, stream>>>(src, count, dst, dtype);
  DISTGN_CUDA_CHECK_LAUNCH("store_doubles_kernel");
}

void convert_halves_to_float(Stream stream, const uint16_t* in, int64_t count, DType dtype, float* out) {
  if (count <= 0) return;
  halves_to_float_kernel<<<elementwise_blocks(count, "convert"), kThreads, 0, stream>>>(in, count, dtype, out);
  DISTGN_CUDA_CHECK_LAUNCH("halves_to_float_kernel");
}

void convert_floats_to_half(Stream stream, const float* in, int64_t count, DType dtype, uint16_t* out) {
  if (count <= 0) return;
  floats_to_half_kernel<<<elementwise_blocks(count, "convert"), kThreads, 0, stream>>>(in, count, dtype, out);
  DISTGN_CUDA_CHECK_LAUNCH("floats_to_half_kernel");
}

}  // namespace cuda
}  // namespace distgn
