// Counts the program's calls to the global operator new, to show that a
// training step allocates nothing once the workspaces exist.
#pragma once

#include <cstdint>

namespace distgn::train {

uint64_t allocation_count();

}  // namespace distgn::train
