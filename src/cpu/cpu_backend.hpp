#pragma once

#include <memory>

#include "core/backend.hpp"

namespace distgn {

// The OpenMP CPU backend. Each layer owns one: it holds the scratch buffers
// that calls reuse.
std::unique_ptr<Backend> make_cpu_backend();

// Copies `src` (plan.split_shape, row-major) into the plan's walking order
// (gather: plan.permutation), or back (scatter). Elements of `element_bytes`.
void permute_on_host(const KernelPlan& plan, const void* src, void* dst, int element_bytes, bool gather);

}  // namespace distgn
