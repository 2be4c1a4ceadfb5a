#pragma once

#include <memory>

#include "core/backend.hpp"

namespace distgn {

// The OpenMP CPU backend. Each layer owns one: it holds the scratch buffers
// that calls reuse.
std::unique_ptr<Backend> make_cpu_backend();

}  // namespace distgn
