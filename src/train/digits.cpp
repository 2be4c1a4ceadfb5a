#include "train/digits.hpp"

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <system_error>

#include "train/rng.hpp"

namespace distgn::train {
namespace {

namespace fs = std::filesystem;

constexpr const char* kRelative = "sklearn/datasets/data/digits.csv.gz";
constexpr const char* kMissing =
    "the scikit-learn digits data set (digits.csv.gz) was not found: install Debian's "
    "python3-sklearn (apt-get install python3-sklearn) or pass --data PATH";

bool is_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}

// python3*/{dist,site}-packages/sklearn/... under `root`, sorted by name.
std::vector<fs::path> candidates_under(const fs::path& root) {
  std::vector<fs::path> found;
  std::error_code ec;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind("python3", 0) != 0) continue;
    for (const char* packages : {"dist-packages", "site-packages"}) {
      const fs::path p = it->path() / packages / kRelative;
      if (is_file(p)) found.push_back(p);
    }
  }
  std::sort(found.begin(), found.end());
  return found;
}

}  // namespace

std::string find_digits(const std::string& given) {
  if (!given.empty()) {
    if (!is_file(given))
      throw TrainError("--data " + given + ": no such file (it should be sklearn's digits.csv.gz)");
    return given;
  }
  for (const char* root : {"/usr/lib", "/usr/local/lib"})
    for (const fs::path& p : candidates_under(root)) return p.string();
  throw TrainError(kMissing);
}

Digits load_digits(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (!file) throw TrainError(path + ": cannot open");
  std::string text;
  char buffer[1 << 16];
  int got;
  while ((got = gzread(file, buffer, sizeof buffer)) > 0) text.append(buffer, size_t(got));
  int errnum = 0;
  const char* message = got < 0 ? gzerror(file, &errnum) : nullptr;
  const std::string error = message ? message : "";
  gzclose(file);
  if (got < 0) throw TrainError(path + ": not a readable gzip file (" + error + ")");

  Digits d;
  size_t line_number = 0, pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    const auto bad = [&](const std::string& why) {
      return TrainError(path + ", line " + std::to_string(line_number) + ": " + why +
                        " (expected 64 pixel values 0..16 and a label 0..9, comma-separated)");
    };
    const char* p = line.c_str();
    for (int field = 0; field <= Digits::kPixels; ++field) {
      char* next = nullptr;
      const double v = std::strtod(p, &next);
      if (next == p) throw bad("field " + std::to_string(field + 1) + " is not a number");
      const int max = field < Digits::kPixels ? Digits::kMaxValue : Digits::kClasses - 1;
      if (!(v >= 0 && v <= max) || v != std::floor(v))
        throw bad("field " + std::to_string(field + 1) + " is out of range");
      (field < Digits::kPixels ? d.pixels : d.labels).push_back(uint8_t(v));
      p = next;
      if (field < Digits::kPixels) {
        if (*p != ',') throw bad("too few fields");
        ++p;
      } else if (*p != '\0') {
        throw bad("too many fields");
      }
    }
    ++d.count;
  }
  if (d.count < 2 * Digits::kClasses) throw TrainError(path + ": too few images (" + std::to_string(d.count) + ")");
  return d;
}

void split_digits(int count, double test_fraction, uint64_t seed, std::vector<int>& train,
                  std::vector<int>& test) {
  std::vector<int> order(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) order[size_t(i)] = i;
  Rng(seed, /*stream=*/1).shuffle(order);
  const int tests = int(std::ceil(test_fraction * count));
  train.assign(order.begin(), order.end() - tests);
  test.assign(order.end() - tests, order.end());
}

}  // namespace distgn::train
