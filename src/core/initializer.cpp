// Parameter initializers (Flax's scale_init / bias_init). The random ones are
// deterministic in their seed and independent of the machine: a splitmix64
// stream, Box-Muller for the normal.
#include <cmath>
#include <vector>

#include "distgn/config.hpp"
#include "distgn/tensor.hpp"

namespace distgn {
namespace {

struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }
};

}  // namespace

void initialize(const Initializer& init, int64_t count, DType dtype, void* out) {
  SplitMix64 rng{init.seed};
  for (int64_t i = 0; i < count; ++i) {
    double v = 0.0;
    switch (init.kind) {
      case Initializer::Kind::zeros: v = 0.0; break;
      case Initializer::Kind::ones: v = 1.0; break;
      case Initializer::Kind::constant: v = init.value; break;
      case Initializer::Kind::uniform: v = init.low + (init.high - init.low) * rng.uniform(); break;
      case Initializer::Kind::normal: {
        const double u1 = 1.0 - rng.uniform();  // (0, 1]: log is finite
        const double u2 = rng.uniform();
        v = init.stddev * std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
        break;
      }
    }
    store_element(dtype, out, i, v);
  }
}

}  // namespace distgn
