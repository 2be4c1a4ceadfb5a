// The scikit-learn digits data set (1,797 8x8 images of handwritten digits,
// pixel values 0..16, 10 classes) as Debian's python3-sklearn ships it:
// sklearn/datasets/data/digits.csv.gz, one image a line, 64 pixels then the
// label.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace distgn::train {

// What the trainer reports as a clear, fixable error (bad option, missing or
// malformed data file): message on stderr, exit status 2.
class TrainError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Digits {
  static constexpr int kSide = 8;
  static constexpr int kPixels = kSide * kSide;
  static constexpr int kClasses = 10;
  static constexpr int kMaxValue = 16;

  int count = 0;
  std::vector<uint8_t> pixels;  // count x 64, row-major 8x8, values 0..16
  std::vector<uint8_t> labels;  // count, 0..9
};

// The path of digits.csv.gz: `given` when not empty (it must exist), else the
// first python3-sklearn installation found under /usr/lib and /usr/local/lib.
// Throws TrainError naming the package to install when there is none.
std::string find_digits(const std::string& given);

// Reads and validates the gzip-compressed CSV. Throws TrainError.
Digits load_digits(const std::string& path);

// A deterministic split: the indices 0..count-1 shuffled by `seed`, the
// last ceil(test_fraction * count) held out for testing (scikit-learn's
// train_test_split sizes: 1,437 train and 360 test images for 0.2).
void split_digits(int count, double test_fraction, uint64_t seed, std::vector<int>& train,
                  std::vector<int>& test);

}  // namespace distgn::train
