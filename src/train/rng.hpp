// A small, fully specified random number generator for the trainer. The
// standard library's distributions are implementation-defined; these are
// not, so a seed gives the same split, order and initial weights on every
// rank, platform and compiler.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace distgn::train {

// SplitMix64 (Steele, Lea, Flood 2014): one 64-bit state, a new stream per
// (seed, stream) pair.
class Rng {
 public:
  explicit Rng(uint64_t seed, uint64_t stream = 0) : state_(seed) {
    state_ ^= mix(stream + 0x632BE59BD9B4E019ull);
    state_ = mix(state_);
  }

  uint64_t next() {
    state_ += 0x9E3779B97F4A7C15ull;
    return mix(state_);
  }

  // Uniform in [0, 1), 53 random bits.
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }

  // Uniform integer in [0, n), n > 0 (rejection sampling, no modulo bias).
  uint64_t below(uint64_t n) {
    const uint64_t limit = ~uint64_t(0) - (~uint64_t(0) % n);
    uint64_t v;
    do v = next();
    while (v >= limit);
    return v % n;
  }

  // Fisher-Yates.
  template <class I>
  void shuffle(std::vector<I>& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[size_t(below(i))]);
  }

 private:
  static uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t state_;
};

}  // namespace distgn::train
