// distgn/error.hpp: the one exception type distgn throws.
#pragma once

#include <stdexcept>
#include <string>

namespace distgn {

// Every invalid input (semantics §2), malformed file and failed collective is
// reported as a distgn::Error whose what() is the message a user needs to fix
// the problem. In a distributed call it is raised on every rank of the group.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace distgn
