// How the CPU kernels read and write their storage types: widen and narrow
// to the arithmetic type, float16 rows staged through float scratch, and
// float32 outputs streamed past the caches. Included only by cpu_backend.cpp
// (through the kernel headers).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "core/half.hpp"
#include "cpu/half_rows.hpp"
#include "cpu/stream_rows.hpp"
#include "cpu/tuning.hpp"
#include "distgn/config.hpp"

// Internal linkage, like the rest of cpu_backend.cpp, the one file that
// includes this: GCC inlines the kernels there as when they were one file.
namespace distgn::cpu {
namespace {

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(half_t v) { return to_float(v); }
inline float widen(bfloat16_t v) { return to_float(v); }

template <class T, class C>
inline T narrow(C v) {
  if constexpr (std::is_same_v<T, half_t>) return to_half(float(v));
  else if constexpr (std::is_same_v<T, bfloat16_t>) return to_bfloat16(float(v));
  else return T(v);
}

// float16 rows pass through float scratch converted by the F16C
// instructions where the target has them (cpu/half_rows.hpp): GCC does not
// vectorise the portable conversions well inside the kernels' loops (a
// float16 backward measured 1.6x slower than float32 per element).
template <class T>
struct Staged {
  using type = T;
};
#if defined(__F16C__)
template <>
struct Staged<half_t> {
  using type = float;
};
#endif
template <class T>
using staged_t = typename Staged<T>::type;

// Rows staged per conversion when T or D is staged: kStageElements' worth
// of rows, at least one. 1 when nothing is staged.
template <class T, class D = T>
inline int64_t stage_rows_of([[maybe_unused]] int64_t width) {
  if constexpr (std::is_same_v<staged_t<T>, T> && std::is_same_v<staged_t<D>, D>) return 1;
  else return std::max<int64_t>(1, kStageElements / std::max<int64_t>(width, 1));
}

// n elements at src as the kernels read them: src itself, or (float16)
// converted into `buffer`.
template <class T>
const staged_t<T>* staged_input(const T* src, [[maybe_unused]] int64_t n, [[maybe_unused]] float* buffer) {
  if constexpr (std::is_same_v<staged_t<T>, T>) return src;
  else {
    widen_row(src, buffer, n);
    return buffer;
  }
}

// Whether the kernels stream their output of type Y for this plan: float32
// only (the other types are written in their own type from registers), and
// only outputs larger than kStreamedOutputBytes.
template <class Y>
bool streams_output(const Plan& p) {
  return std::is_same_v<Y, float> && stream_rows_in_hardware() &&
         p.num_cells * p.cell_elements * int64_t(sizeof(float)) > kStreamedOutputBytes;
}

// Where the kernels write n elements bound for dst: dst itself, or
// `buffer`, which commit_output then converts (float16) or streams (float
// with `stream`) into dst. A chunk that streamed ends with stream_fence().
template <class T>
staged_t<T>* staged_output(T* dst, [[maybe_unused]] float* buffer, [[maybe_unused]] bool stream = false) {
  if constexpr (!std::is_same_v<staged_t<T>, T>) return buffer;
  else if constexpr (std::is_same_v<T, float>) return stream ? buffer : dst;
  else return dst;
}
template <class T>
void commit_output([[maybe_unused]] const staged_t<T>* staged, [[maybe_unused]] T* dst,
                   [[maybe_unused]] int64_t n, [[maybe_unused]] bool stream = false) {
  if constexpr (!std::is_same_v<staged_t<T>, T>) narrow_row(staged, dst, n);
  else if constexpr (std::is_same_v<T, float>) {
    if (stream) stream_row(staged, dst, n);
  }
}

}  // namespace
}  // namespace distgn::cpu
