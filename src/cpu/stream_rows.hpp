// Float rows written around the caches (non-temporal stores), for kernel
// outputs too large to stay in cache. A normal store first reads each line
// it writes (read for ownership): beside reading x and writing y that is a
// third stream of memory traffic, which a streaming store does not make.
#pragma once

#include <cstdint>

namespace distgn {

// Whether this build has streaming stores (x86-64); elsewhere stream_row is
// a plain copy.
bool stream_rows_in_hardware();

// dst[i] = src[i] for i < n, the aligned body of dst with streaming stores.
void stream_row(const float* src, float* dst, int64_t n);

// Orders this thread's streamed rows before its later stores, so that a
// thread that synchronises with it afterwards reads them (SFENCE).
void stream_fence();

}  // namespace distgn
