// libFuzzer target for the tool's list options (src/cli/apply.cpp):
// --reduction-axes / --shape via parse_int_list and --axis-index-groups via
// parse_groups. The first byte picks the parser, the rest is the option text.
// Input is either rejected with distgn::Error or parsed into values that print
// back to text which parses to the same values; anything else is a finding.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cli/cli.hpp"
#include "distgn/error.hpp"

namespace {

template <typename T>
std::string join(const std::vector<T>& values) {
  std::string text;
  for (size_t i = 0; i < values.size(); ++i) text += (i ? "," : "") + std::to_string(values[i]);
  return text;
}

void check(bool ok, const char* what, const std::string& text) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_cli_parse: %s for '%s'\n", what, text.c_str());
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    if (data[0] & 1) {
      const auto groups = distgn::cli::parse_groups(text);
      for (const auto& group : groups) {
        const auto again = distgn::cli::parse_int_list(join(group), "--axis-index-groups");
        check(again == std::vector<int64_t>(group.begin(), group.end()), "a group does not round-trip", text);
      }
    } else {
      const auto values = distgn::cli::parse_int_list(text, "--reduction-axes");
      check(distgn::cli::parse_int_list(join(values), "--reduction-axes") == values,
            "list does not round-trip", text);
    }
  } catch (const distgn::Error&) {
    // rejected with the tool's error, as malformed option text should be
  }
  return 0;
}
