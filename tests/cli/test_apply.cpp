// `distgn apply` run as a user runs it (README "The command-line tool"):
// the real binary in a temporary directory, its exit status, its stderr and
// the .npy files it writes.
//
//  1. every Flax golden case (tests/data/flax) from the shell, with the
//     tolerance rules of tests/core/test_flax_golden.cpp;
//  2. semantics §2's messages and the other invalid inputs: exit status 2, the
//     message on stderr, no output file;
//  3. under mpiexec: the pmap golden cases (tests/data/flax_pmap) with
//     --ranks-axis, --shard-axis against the single-process run, and invalid
//     input on every rank without a hang;
//  4. `distgn bench`: its table, its --json lines and its --shard-axis errors.
//
// Every command runs under `timeout` so that a hang fails instead of blocking.
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <random>
#include <sstream>

#include "distgn/build_config.hpp"
#include "distgn/error.hpp"
#include "distgn/group_norm.hpp"
#include "golden.hpp"

namespace fs = std::filesystem;
using namespace distgn;
using nlohmann::json;

namespace {

// ---- processes and files ----------------------------------------------------

constexpr int kTimeoutSeconds = 60;

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char ch : s) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return q + "'";
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// A fresh directory, removed with everything in it at the end of the scope.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "distgn_cli_XXXXXX").string();
    if (!mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
    path = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

struct Result {
  int status = -1;  // exit status; 124 = killed by timeout
  std::string out, err;
  double seconds = 0;
};

// Runs `command` in `dir` through the shell under `timeout`, stdout and
// stderr to files there.
Result run(const std::string& command, const TempDir& dir, int timeout_s = kTimeoutSeconds) {
  const std::string out = dir / "stdout.txt", err = dir / "stderr.txt";
  const std::string full = "cd " + quote(dir.path.string()) + " && timeout -k 5 " +
                           std::to_string(timeout_s) + " " + command + " >" + quote(out) + " 2>" +
                           quote(err) + " </dev/null";
  const auto start = std::chrono::steady_clock::now();
  const int raw = std::system(full.c_str());
  Result r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.status = raw == -1 ? -1 : WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

std::string cli_path() { return DISTGN_CLI; }

// `distgn apply <options>` as one shell word list.
std::string apply_command(const std::string& options) { return quote(cli_path()) + " apply" + options; }

int occurrences(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size())) ++n;
  return n;
}

// Output files of a run: every name the tests give an output starts with
// "out_" (a leftover "out_y.npy.tmp.<pid>" counts too).
std::vector<std::string> outputs(const TempDir& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir.path)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("out_", 0) == 0) names.push_back(name);
  }
  return names;
}

std::string joined(const std::vector<std::string>& names) {
  std::string text;
  for (const auto& n : names) text += (text.empty() ? "" : " ") + n;
  return text;
}

// ---- mpiexec ------------------------------------------------------------------

// Why the distributed tests cannot run here, or "" when they can.
std::string mpi_unavailable() {
  if (!DISTGN_WITH_MPI) return "this build of distgn has no MPI (DISTGN_WITH_MPI is 0)";
  if (std::string(DISTGN_MPIEXEC).empty()) return "find_package(MPI) found no mpiexec (MPIEXEC_EXECUTABLE)";
  if (!fs::exists(DISTGN_MPIEXEC)) return std::string("mpiexec ") + DISTGN_MPIEXEC + " does not exist";
  return "";
}

bool is_open_mpi() {
  static const bool open_mpi = [] {
    std::string version;
    if (FILE* p = popen((quote(DISTGN_MPIEXEC) + " --version 2>&1").c_str(), "r")) {
      char buffer[256];
      while (fgets(buffer, sizeof buffer, p)) version += buffer;
      pclose(p);
    }
    return version.find("Open MPI") != std::string::npos || version.find("OpenRTE") != std::string::npos;
  }();
  return open_mpi;
}

// mpiexec and the flags this MPI needs: Open MPI refuses to run as root and
// to put more ranks than cores on a machine without them.
std::string mpiexec() {
  return quote(DISTGN_MPIEXEC) + (is_open_mpi() ? " --allow-run-as-root --oversubscribe" : "");
}

// Each rank runs distgn through this wrapper, which records the rank's own
// exit status in rank_status.<rank> (mpiexec reports only one).
void write_rank_wrapper(const TempDir& dir) {
  std::ofstream(dir / "rank_status.sh")
      << "\"$@\"\n"
         "s=$?\n"
         "echo $s > \"rank_status.${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${PMI_RANK:-unknown}}}\"\n"
         "exit $s\n";
}

// How a run treats a rank that exits non-zero.
enum class OnFailure {
  abort,        // mpiexec's default: it kills the other ranks and exits non-zero
  let_finish,   // every rank runs to its own end (Open MPI:
                // orte_abort_on_non_zero_status 0), so that each rank's own
                // status is recorded; mpiexec's status then says nothing
};

Result run_mpi(int ranks, const std::string& options, const TempDir& dir,
               OnFailure on_failure = OnFailure::abort) {
  write_rank_wrapper(dir);
  for (int r = 0; r < ranks; ++r) fs::remove(dir / ("rank_status." + std::to_string(r)));
  const std::string keep = on_failure == OnFailure::let_finish && is_open_mpi()
                               ? " --mca orte_abort_on_non_zero_status 0"
                               : "";
  return run(mpiexec() + keep + " -n " + std::to_string(ranks) + " sh rank_status.sh " + apply_command(options),
             dir);
}

// The exit status each rank recorded (-1: none, the rank did not finish, or
// mpiexec killed it after another rank failed: use OnFailure::let_finish).
std::vector<int> rank_statuses(const TempDir& dir, int ranks) {
  std::vector<int> statuses;
  for (int r = 0; r < ranks; ++r) {
    const std::string text = slurp(dir / ("rank_status." + std::to_string(r)));
    statuses.push_back(text.empty() ? -1 : std::atoi(text.c_str()));
  }
  return statuses;
}

// ---- arrays ---------------------------------------------------------------------

std::string number(double v) {
  std::ostringstream text;
  text << std::setprecision(17) << v;
  return text.str();
}

std::vector<float> random_floats(int64_t n, uint32_t seed, double mean, double stddev) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(mean, stddev);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = float(dist(gen));
  return v;
}

void write_floats(const std::string& path, const Shape& shape, uint32_t seed, double mean = 0.0,
                  double stddev = 1.0) {
  const std::vector<float> v = random_floats(element_count(shape), seed, mean, stddev);
  io::write_npy(path, shape, io::NpyType::f4, v.data());
}

// A random 0/1 mask of numpy dtype `type` (b1 or u1), about 1 in 4 invalid.
void write_mask(const std::string& path, const Shape& shape, uint32_t seed, io::NpyType type) {
  std::mt19937 gen(seed);
  std::vector<uint8_t> v(static_cast<size_t>(element_count(shape)));
  for (uint8_t& m : v) m = gen() % 4 != 0;
  io::write_npy(path, shape, type, v.data());
}

// A .npy file with a header of our own making (for malformed inputs).
void write_raw_npy(const std::string& path, const std::string& dict, const std::vector<uint8_t>& data) {
  std::string header = dict;
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::string file("\x93NUMPY\x01\x00", 8);
  file += char(header.size() & 0xff);
  file += char(header.size() >> 8);
  file += header;
  file.append(reinterpret_cast<const char*>(data.data()), data.size());
  std::ofstream(path, std::ios::binary) << file;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v)
    if (std::isfinite(x)) m = std::max(m, std::fabs(x));
  return m;
}

DType narrower(DType a, DType b) { return dtype_size(a) <= dtype_size(b) ? a : b; }

// ---- golden cases -----------------------------------------------------------------

std::string data_file(const std::string& set, const json& c, const char* key) {
  return golden::data_dir() + "/" + set + "/" + c["files"][key].get<std::string>();
}

// The apply options that reproduce a manifest case: configuration and inputs.
std::string case_options(const json& c, const std::string& set) {
  std::ostringstream a;
  if (!c["group_size"].is_null())
    a << " --group-size " << c["group_size"].get<int64_t>();  // alone: group_size mode
  else
    a << " --num-groups " << c["num_groups"].get<int64_t>();
  a << " --epsilon " << number(c["epsilon"].get<double>());
  if (!c["use_scale"].get<bool>()) a << " --no-scale";
  if (!c["use_bias"].get<bool>()) a << " --no-bias";
  if (golden::has_file(c, "scale")) a << " --scale " << quote(data_file(set, c, "scale"));
  if (golden::has_file(c, "bias")) a << " --bias " << quote(data_file(set, c, "bias"));
  if (!c["dtype"].is_null()) a << " --dtype " << c["dtype"].get<std::string>();
  a << " --param-dtype " << c["param_dtype"].get<std::string>();
  const std::string input = c["input_dtype"].get<std::string>();
  if (input == "f16" || input == "bf16") a << " --input-dtype " << input;
  if (!c["use_fast_variance"].get<bool>()) a << " --exact-variance";
  if (!c["force_float32_reductions"].get<bool>()) a << " --no-force-f32";
  if (!c["reduction_axes"].is_null()) {
    std::string axes;
    for (const auto& v : c["reduction_axes"]) axes += (axes.empty() ? "" : ",") + std::to_string(v.get<int64_t>());
    a << " --reduction-axes " << axes;
  }
  if (golden::has_file(c, "mask")) a << " --mask " << quote(data_file(set, c, "mask"));
  if (c["layout"].get<std::string>() == "nchw") a << " --layout nchw";
  a << " --x " << quote(data_file(set, c, "x"));
  if (golden::has_file(c, "dy")) a << " --dy " << quote(data_file(set, c, "dy"));
  return a.str();
}

// The output options for the outputs the case has golden files of.
std::string output_options(const json& c) {
  std::string a = " --y out_y.npy";
  if (golden::has_file(c, "dx")) a += " --dx out_dx.npy";
  if (golden::has_file(c, "dscale")) a += " --dscale out_dscale.npy";
  if (golden::has_file(c, "dbias")) a += " --dbias out_dbias.npy";
  return a;
}

// ---- invalid input: a small valid problem to break one piece of ------------------

// x (2,3,4,8) float32 and the other inputs that go with it.
struct Inputs {
  TempDir dir;
  const Shape x_shape{2, 3, 4, 8};
  Inputs() {
    write_floats(dir / "x.npy", x_shape, 1, 0.5, 2.0);
    write_floats(dir / "dy.npy", x_shape, 2);
    write_floats(dir / "scale.npy", {8}, 3, 1.0, 0.2);
    write_floats(dir / "bias.npy", {8}, 4);
    write_mask(dir / "mask.npy", x_shape, 5, io::NpyType::b1);
  }
};

// Exit status 2, `message` on stderr `ranks` times, no output written.
void check_rejected(const Result& r, const std::string& message, const TempDir& dir, int ranks = 1) {
  INFO("stderr: " << r.err);
  CHECK(r.status == 2);
  CHECK(occurrences(r.err, message) == ranks);
  INFO("output files left: " << joined(outputs(dir)));
  CHECK(outputs(dir).empty());
}

const std::string kFeatureAxisMessage =
    "The reduction axes must include the final dimension as this is assumed to be the feature axis.";
const std::string kEitherMessage =
    "Either `num_groups` or `group_size` should be specified. If `group_size` is to be specified, "
    "pass `num_groups=None` as argument to override the default `num_groups` value of 32.";

// ---- distributed comparisons ------------------------------------------------------

// got within tol * max(|ref|, floor) of ref, NaN matching NaN.
void check_close(const std::string& what, const std::vector<double>& got, const std::vector<double>& ref,
                 double tol, double floor) {
  REQUIRE(got.size() == ref.size());
  int64_t bad = 0, first = -1;
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    bool ok;
    if (std::isnan(got[i]) || std::isnan(ref[i])) {
      ok = std::isnan(got[i]) && std::isnan(ref[i]);
    } else {
      const double error = std::fabs(got[i] - ref[i]);
      worst = std::max(worst, error);
      ok = error <= tol * std::max(std::fabs(ref[i]), floor);
    }
    if (!ok && bad++ == 0) first = int64_t(i);
  }
  INFO(what << ": " << bad << " of " << ref.size() << " outside the tolerance, worst error " << worst
            << ", first mismatch at flat index " << first);
  CHECK(bad == 0);
}

}  // namespace

// ---- 1. the golden cases from the shell ---------------------------------------------

TEST_CASE("cli apply: every Flax golden case reproduces from the shell", "[cli][golden]") {
  const json manifest = golden::manifest("flax");
  REQUIRE(manifest["cases"].size() >= 30);
  for (const auto& c : manifest["cases"]) {
    DYNAMIC_SECTION(c["name"].get<std::string>()) {
      TempDir dir;
      const std::string command = apply_command(case_options(c, "flax") + output_options(c));
      const Result r = run(command, dir);
      INFO("command: " << command);
      INFO("stderr: " << r.err);
      REQUIRE(r.status == 0);

      const GroupNormConfig config = golden::config_of(c);
      const DType input = golden::dtype(c["input_dtype"]), output = golden::dtype(c["output_dtype"]);
      const DType stats = stats_dtype(config, input);
      const bool half_stats = dtype_size(stats) == 2;

      // As in test_flax_golden.cpp: Flax's dx is NaN at masked NaN inputs,
      // where semantics §9 gives rstd * dy * scale; those positions are skipped.
      std::vector<bool> skip_dx;
      if (golden::has_file(c, "mask")) {
        const std::vector<double> mask = golden::values(golden::file("flax", c, "mask"));
        const std::vector<double> x = golden::values(golden::file("flax", c, "x"));
        skip_dx.assign(x.size(), false);
        for (size_t i = 0; mask.size() == x.size() && i < x.size(); ++i)
          skip_dx[i] = mask[i] == 0 && !std::isfinite(x[i]);
      }

      std::map<std::string, std::vector<double>> truth;  // float64, on demand
      for (const std::string key : {"y", "dx", "dscale", "dbias"}) {
        if (!golden::has_file(c, key.c_str())) continue;
        const std::string path = dir / ("out_" + key + ".npy");
        INFO(key << " (" << path << ")");
        REQUIRE(fs::exists(path));
        const io::NpyArray got_file = io::read_npy(path);
        const io::NpyArray want_file = golden::file("flax", c, key.c_str());
        const DType dtype = key == "y" ? output : key == "dx" ? input : config.param_dtype;
        // bfloat16 is written as float32 (docs/cli.md), the others as themselves.
        CHECK(io::npy_descr(got_file.type) == io::npy_descr(io::npy_type_for(dtype)));
        REQUIRE(got_file.shape == want_file.shape);
        std::vector<double> mine = golden::values(got_file), want = golden::values(want_file);
        if (key == "dx")
          for (size_t i = 0; i < skip_dx.size(); ++i)
            if (skip_dx[i]) mine[i] = want[i] = 0;
        const DType narrowest = narrower(dtype, stats);
        const double floor = key == "y" ? (half_stats ? 1.0 : 0.0) : std::max(1.0, max_abs(want));
        const double ulps = half_stats || (key == "dx" && dtype_size(input) == 2) ? 4.0 : 1.0;
        const auto vs_flax = golden::compare(mine, want, narrowest, floor, ulps);
        if (vs_flax.mismatches == 0 || half_stats) {
          INFO(key << " vs Flax: worst error " << vs_flax.worst_error << ", first mismatch at "
                   << vs_flax.first_bad);
          CHECK(vs_flax.mismatches == 0);
          continue;
        }
        // Flax itself off (large_mean_*, single_valid_cell): within tolerance
        // of the float64 evaluation and never further from it than Flax.
        if (truth.empty()) truth = golden::run_case(c, true);
        std::vector<double> exact = truth[key];
        for (size_t i = 0; key == "dx" && i < skip_dx.size(); ++i)
          if (skip_dx[i]) exact[i] = 0;
        const auto ours = golden::compare(mine, exact, narrowest, floor, ulps);
        const auto flax = golden::compare(want, exact, narrowest, floor, ulps);
        INFO(key << " vs float64: distgn worst error " << ours.worst_error << ", Flax "
                 << flax.worst_error << " (Flax itself off by more than the tolerance)");
        CHECK(ours.mismatches == 0);
        CHECK(ours.worst_error <= flax.worst_error);
      }
    }
  }
}

// ---- 2. invalid input in one process -------------------------------------------------

TEST_CASE("cli apply: every semantics 2 message exits 2 and writes nothing", "[cli][errors]") {
  Inputs in;
  const std::string base = " --x x.npy --y out_y.npy";
  struct Case {
    const char* name;
    std::string options, message;
  };
  const std::vector<Case> cases = {
      {"2.1 reduction axes without the feature axis", " --num-groups 2 --reduction-axes 1,2",
       kFeatureAxisMessage},
      {"2.1 negative reduction axes without the feature axis", " --num-groups 2 --reduction-axes -2,-3",
       kFeatureAxisMessage},
      {"2.2 both --num-groups and --group-size", " --num-groups 2 --group-size 4", kEitherMessage},
      {"2.3 group size not dividing C", " --group-size 3",
       "Number of channels (8) is not multiple of the group size (3)."},
      {"2.3 group size 0", " --group-size 0", "Number of channels (8) is not multiple of the group size (0)."},
      {"2.3 negative group size", " --group-size -2",
       "Number of channels (8) is not multiple of the group size (-2)."},
      {"2.4 num_groups not dividing C", " --num-groups 3",
       "Number of groups (3) does not divide the number of channels (8)."},
      {"2.4 num_groups 0", " --num-groups 0", "Number of groups (0) does not divide the number of channels (8)."},
      {"2.4 the default num_groups 32 with C = 8", "",
       "Number of groups (32) does not divide the number of channels (8)."},
  };
  for (const Case& k : cases) {
    SECTION(k.name) {
      const std::string command = apply_command(base + k.options);
      INFO("command: " << command);
      check_rejected(run(command, in.dir), k.message, in.dir);
    }
  }
  // §2 order: the feature-axis check comes before the groups checks.
  SECTION("2.1 before 2.4") {
    const std::string command = apply_command(base + " --num-groups 3 --reduction-axes 1");
    INFO("command: " << command);
    check_rejected(run(command, in.dir), kFeatureAxisMessage, in.dir);
  }
  // With backward asked for too: still nothing written.
  SECTION("2.4 with --dy and every output") {
    const std::string command =
        apply_command(base + " --num-groups 3 --dy dy.npy --dx out_dx.npy --dscale out_ds.npy --dbias out_db.npy");
    INFO("command: " << command);
    check_rejected(run(command, in.dir), "Number of groups (3) does not divide the number of channels (8).", in.dir);
  }
}

TEST_CASE("cli apply: bad mask and parameter shapes exit 2 naming both shapes", "[cli][errors]") {
  Inputs in;
  const std::string base = " --x x.npy --y out_y.npy --num-groups 2 --dy dy.npy --dx out_dx.npy";
  const std::string x_shape = shape_string(in.x_shape);
  struct Case {
    const char* name;
    Shape shape;
    std::string option;
    io::NpyType type;
  };
  const std::vector<Case> cases = {
      {"2.5 mask with the wrong last dimension", {2, 3, 4, 5}, "--mask", io::NpyType::b1},
      {"2.5 mask whose leading dimensions do not broadcast", {3, 3, 4, 8}, "--mask", io::NpyType::u1},
      {"2.6 scale of the wrong length", {5}, "--scale", io::NpyType::f4},
      {"2.6 two-dimensional scale", {1, 8}, "--scale", io::NpyType::f4},
      {"2.6 bias of the wrong length", {9}, "--bias", io::NpyType::f4},
  };
  for (const Case& k : cases) {
    SECTION(k.name) {
      std::vector<uint8_t> data(size_t(element_count(k.shape) * io::npy_type_size(k.type)), 1);
      if (k.type == io::NpyType::f4) {
        const std::vector<float> ones(size_t(element_count(k.shape)), 1.0f);
        std::memcpy(data.data(), ones.data(), data.size());
      }
      io::write_npy(in.dir / "bad.npy", k.shape, k.type, data.data());
      const std::string command = apply_command(base + " " + k.option + " bad.npy");
      INFO("command: " << command);
      const Result r = run(command, in.dir);
      INFO("stderr: " << r.err);
      CHECK(r.status == 2);
      CHECK(r.err.find(shape_string(k.shape)) != std::string::npos);
      if (k.option == "--mask") {
        CHECK(r.err.find("mask") != std::string::npos);
        CHECK(r.err.find(x_shape) != std::string::npos);
      } else {
        CHECK(r.err.find(k.option.substr(2)) != std::string::npos);  // "scale" / "bias"
        CHECK(r.err.find("(8,)") != std::string::npos);
      }
      CHECK(outputs(in.dir).empty());
    }
  }
}

TEST_CASE("cli apply: malformed npy inputs exit 2 naming the file", "[cli][errors]") {
  Inputs in;
  const TempDir& dir = in.dir;
  const std::string valid = slurp(dir / "x.npy");
  std::ofstream(dir / "truncated.npy", std::ios::binary) << valid.substr(0, valid.size() - 10);
  std::string magic = valid;
  magic[1] = 'X';
  std::ofstream(dir / "bad_magic.npy", std::ios::binary) << magic;
  std::vector<uint8_t> floats(size_t(element_count(in.x_shape) * 4), 0);
  write_raw_npy(dir / "fortran.npy", "{'descr': '<f4', 'fortran_order': True, 'shape': (24, 8), }",
                std::vector<uint8_t>(24 * 8 * 4, 0));
  write_raw_npy(dir / "big_endian.npy", "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3, 4, 8), }",
                floats);
  std::ofstream(dir / "empty.npy", std::ios::binary).flush();

  const std::string outs = " --y out_y.npy --num-groups 2";
  struct Case {
    const char* name;
    std::string options, file;
  };
  const std::vector<Case> cases = {
      {"truncated x", " --x truncated.npy", "truncated.npy"},
      {"bad magic x", " --x bad_magic.npy", "bad_magic.npy"},
      {"Fortran-order 2-D x", " --x fortran.npy", "fortran.npy"},
      {"big-endian x", " --x big_endian.npy", "big_endian.npy"},
      {"empty x", " --x empty.npy", "empty.npy"},
      {"missing x", " --x missing.npy", "missing.npy"},
      {"truncated dy", " --x x.npy --dy truncated.npy --dx out_dx.npy", "truncated.npy"},
      {"big-endian mask", " --x x.npy --mask big_endian.npy", "big_endian.npy"},
      {"bad magic scale", " --x x.npy --scale bad_magic.npy", "bad_magic.npy"},
      {"Fortran-order bias", " --x x.npy --bias fortran.npy", "fortran.npy"},
  };
  for (const Case& k : cases) {
    SECTION(k.name) {
      const std::string command = apply_command(k.options + outs);
      INFO("command: " << command);
      const Result r = run(command, dir);
      INFO("stderr: " << r.err);
      CHECK(r.status == 2);
      CHECK(r.err.find(k.file) != std::string::npos);
      CHECK(outputs(dir).empty());
    }
  }
}

TEST_CASE("cli apply: inconsistent options exit 2 and write nothing", "[cli][errors]") {
  Inputs in;
  write_floats(in.dir / "dy_wrong.npy", {2, 3, 4, 4}, 9);
  const std::string base = " --x x.npy --y out_y.npy --num-groups 2";
  struct Case {
    const char* name;
    std::string options;
  };
  const std::vector<Case> cases = {
      {"--dx without --dy", " --dx out_dx.npy"},
      {"--dy without --dx", " --dy dy.npy"},
      {"--dscale without --dy", " --dscale out_ds.npy"},
      {"--dbias without --dy", " --dbias out_db.npy"},
      {"dy of another shape", " --dy dy_wrong.npy --dx out_dx.npy"},
      {"--scale with --no-scale", " --no-scale --scale scale.npy"},
      {"--bias with --no-bias", " --no-bias --bias bias.npy"},
      {"unknown dtype", " --dtype f8"},
      {"unknown input dtype", " --input-dtype int8"},
      {"unknown layout", " --layout nhcw"},
      {"reduction axis out of range", " --reduction-axes 1,4"},
      {"reduction axes not integers", " --reduction-axes 1,x,3"},
      {"--ranks-axis and --shard-axis together", " --ranks-axis --shard-axis 1"},
      {"--ranks-axis with a leading axis other than the 1 rank", " --ranks-axis"},
      {"--shard-axis along a non-reduced axis", " --shard-axis 0"},
      {"--shard-axis along the feature axis", " --shard-axis 3"},
      {"--shard-axis out of range", " --shard-axis 7"},
      {"unknown option", " --no-such-option"},
      {"missing --y", " --y"},
      {"unknown backend", " --backend tpu"},
  };
  for (const Case& k : cases) {
    SECTION(k.name) {
      const std::string command = apply_command(base + k.options);
      INFO("command: " << command);
      const Result r = run(command, in.dir);
      INFO("stderr: " << r.err);
      CHECK(r.status == 2);
      CHECK(!r.err.empty());
      CHECK(outputs(in.dir).empty());
    }
  }
}

// docs/cli.md: invalid input exits 2 with the semantics §2 message on stderr, no file
// written: --dscale/--dbias against --no-scale/--no-bias is checked before
// any work.
TEST_CASE("cli apply: --dscale with --no-scale exits 2 and writes nothing", "[cli][errors]") {
  Inputs in;
  SECTION("--dscale with --no-scale") {
    const Result r = run(apply_command(" --x x.npy --y out_y.npy --num-groups 2 --no-scale --dy dy.npy "
                                       "--dx out_dx.npy --dscale out_ds.npy"),
                         in.dir);
    INFO("stderr: " << r.err);
    CHECK(r.status == 2);
    INFO("output files left: " << joined(outputs(in.dir)));
    CHECK(outputs(in.dir).empty());
  }
  SECTION("--dbias with --no-bias") {
    const Result r = run(apply_command(" --x x.npy --y out_y.npy --num-groups 2 --no-bias --dy dy.npy "
                                       "--dx out_dx.npy --dbias out_db.npy"),
                         in.dir);
    INFO("stderr: " << r.err);
    CHECK(r.status == 2);
    INFO("output files left: " << joined(outputs(in.dir)));
    CHECK(outputs(in.dir).empty());
  }
}

// Issue 13: values that used to be accepted silently (an empty value taken as
// the default, an empty group, integer parameters, an epsilon that can only
// give NaN) and output paths that would overwrite an input or another output.
TEST_CASE("cli apply: empty values, stray separators, integer parameters and bad epsilon exit 2",
          "[cli][errors]") {
  Inputs in;
  const std::vector<int32_t> ints(8, 1);
  io::write_npy(in.dir / "scale_i4.npy", {8}, io::NpyType::i4, ints.data());
  const std::vector<uint8_t> bools(8, 1);
  io::write_npy(in.dir / "bias_b1.npy", {8}, io::NpyType::b1, bools.data());
  const std::string base = " --x x.npy --y out_y.npy";
  struct Case {
    const char* name;
    std::string options, message;
  };
  const std::string empty = "an empty value is not allowed";
  const std::vector<Case> cases = {
      {"empty --num-groups", " --num-groups ''", "--num-groups: " + empty},
      {"empty --group-size", " --group-size ''", "--group-size: " + empty},
      {"empty --epsilon", " --num-groups 2 --epsilon ''", "--epsilon: " + empty},
      {"empty --reduction-axes", " --num-groups 2 --reduction-axes ''", "--reduction-axes: " + empty},
      {"empty --axis-index-groups", " --num-groups 2 --axis-index-groups ''", "--axis-index-groups: " + empty},
      {"empty --shard-axis", " --num-groups 2 --shard-axis ''", "--shard-axis: " + empty},
      {"an empty group", " --num-groups 2 --axis-index-groups '0;;'", "'0;;' has an empty group"},
      {"a trailing comma in --reduction-axes", " --num-groups 2 --reduction-axes 1,2,3,",
       "--reduction-axes: '1,2,3,' is not a comma-separated list of integers"},
      {"int32 --scale", " --num-groups 2 --scale scale_i4.npy",
       "--scale scale_i4.npy holds <i4 elements; a parameter file must hold floats"},
      {"bool --bias", " --num-groups 2 --bias bias_b1.npy",
       "--bias bias_b1.npy holds |b1 elements; a parameter file must hold floats"},
      {"negative --epsilon", " --num-groups 2 --epsilon -1e-3", "--epsilon -0.001: must be >= 0"},
      {"NaN --epsilon", " --num-groups 2 --epsilon nan", "--epsilon nan: must be >= 0"},
  };
  for (const Case& k : cases) {
    SECTION(k.name) {
      const std::string command = apply_command(base + k.options);
      INFO("command: " << command);
      check_rejected(run(command, in.dir), k.message, in.dir);
    }
  }
  SECTION("--epsilon 0 is valid") {
    const Result r = run(apply_command(base + " --num-groups 2 --epsilon 0"), in.dir);
    INFO("stderr: " << r.err);
    CHECK(r.status == 0);
  }
}

TEST_CASE("cli apply: an output path naming an input or another output exits 2 before any work",
          "[cli][errors]") {
  Inputs in;
  fs::create_symlink("x.npy", in.dir / "link_to_x.npy");
  fs::create_hard_link(in.dir / "dy.npy", in.dir / "hard_link_to_dy.npy");
  const std::string x_before = slurp(in.dir / "x.npy"), dy_before = slurp(in.dir / "dy.npy");
  const std::string base = " --x x.npy --dy dy.npy --num-groups 2";
  struct Case {
    const char* name;
    std::string options, message;
  };
  const std::vector<Case> cases = {
      {"--y equal to --dx", " --y out_y.npy --dx out_y.npy",
       "--dx out_y.npy and --y out_y.npy are the same file"},
      {"--dbias equal to --dscale through ./", " --y out_y.npy --dx out_dx.npy --dscale out_d.npy --dbias ./out_d.npy",
       "--dbias ./out_d.npy and --dscale out_d.npy are the same file"},
      {"--y equal to --x", " --y x.npy --dx out_dx.npy", "--y x.npy is the same file as the input --x x.npy"},
      {"--dx a symbolic link to --x", " --y out_y.npy --dx link_to_x.npy",
       "--dx link_to_x.npy is the same file as the input --x x.npy"},
      {"--dx a hard link to --dy", " --y out_y.npy --dx hard_link_to_dy.npy",
       "--dx hard_link_to_dy.npy is the same file as the input --dy dy.npy"},
      {"--dscale equal to --scale through ..", " --y out_y.npy --dx out_dx.npy --scale scale.npy --dscale ../" +
       in.dir.path.filename().string() + "/scale.npy", "is the same file as the input --scale scale.npy"},
      {"--y equal to --mask", " --y mask.npy --dx out_dx.npy --mask mask.npy",
       "--y mask.npy is the same file as the input --mask mask.npy"},
  };
  for (const Case& k : cases) {
    SECTION(k.name) {
      const std::string command = apply_command(base + k.options);
      INFO("command: " << command);
      check_rejected(run(command, in.dir), k.message, in.dir);
      CHECK(slurp(in.dir / "x.npy") == x_before);
      CHECK(slurp(in.dir / "dy.npy") == dy_before);
    }
  }
}

// ---- 3. under mpiexec ----------------------------------------------------------------

TEST_CASE("cli apply: pmap golden cases under mpiexec --ranks-axis", "[cli][mpi][golden]") {
  if (const std::string why = mpi_unavailable(); !why.empty()) {
    WARN("skipped: " << why);
    return;
  }
  const json manifest = golden::manifest("flax_pmap");
  REQUIRE(manifest["cases"].size() >= 5);
  for (const auto& c : manifest["cases"]) {
    DYNAMIC_SECTION(c["name"].get<std::string>()) {
      const int ranks = c["ranks"].get<int>();
      std::string options = case_options(c, "flax_pmap") + " --ranks-axis" + output_options(c);
      if (!c["axis_index_groups"].is_null()) {
        std::string groups;
        for (const auto& g : c["axis_index_groups"]) {
          std::string members;
          for (const auto& r : g) members += (members.empty() ? "" : ",") + std::to_string(r.get<int>());
          groups += (groups.empty() ? "" : ";") + members;
        }
        options += " --axis-index-groups " + quote(groups);
      }
      TempDir dir;
      const Result r = run_mpi(ranks, options, dir);
      INFO("command: mpiexec -n " << ranks << " distgn apply" << options);
      INFO("stderr: " << r.err);
      INFO("took " << r.seconds << " s");
      REQUIRE(r.status == 0);
      CHECK(rank_statuses(dir, ranks) == std::vector<int>(size_t(ranks), 0));
      CHECK(r.seconds < 30);

      // float32 throughout: semantics §8's 1e-4, at unit scale for y and at the
      // gradients' own scale for dx, dscale, dbias (as the golden test).
      for (const std::string key : {"y", "dx"}) {
        const io::NpyArray got = io::read_npy(dir / ("out_" + key + ".npy"));
        const io::NpyArray want = golden::file("flax_pmap", c, key.c_str());
        REQUIRE(got.shape == want.shape);
        CHECK(got.type == io::NpyType::f4);
        const std::vector<double> w = golden::values(want);
        check_close(key, golden::values(got), w, 1e-4, key == "y" ? 1.0 : std::max(1.0, max_abs(w)));
      }
      // The golden files hold each device's partial sums (P, C); the CLI
      // writes the totals over all ranks.
      for (const std::string key : {"dscale", "dbias"}) {
        const io::NpyArray got = io::read_npy(dir / ("out_" + key + ".npy"));
        const io::NpyArray want = golden::file("flax_pmap", c, key.c_str());
        REQUIRE(want.shape.size() == 2);
        REQUIRE(want.shape[0] == ranks);
        REQUIRE(got.shape == Shape{want.shape[1]});
        const std::vector<double> per_device = golden::values(want);
        std::vector<double> total(size_t(want.shape[1]), 0.0);
        for (size_t i = 0; i < per_device.size(); ++i) total[i % total.size()] += per_device[i];
        check_close(key + " (sum over devices)", golden::values(got), total, 1e-4, std::max(1.0, max_abs(total)));
      }
    }
  }
}

TEST_CASE("cli apply: --shard-axis on 2 and 3 ranks matches the single-process run", "[cli][mpi]") {
  if (const std::string why = mpi_unavailable(); !why.empty()) {
    WARN("skipped: " << why);
    return;
  }
  struct Case {
    const char* name;
    Shape shape;
    std::string options;  // beyond --x/--dy/outputs
    std::string mask;     // "" or how to write mask.npy
    Shape mask_shape;
  };
  const std::vector<Case> cases = {
      {"nhwc axis 1 fast", {2, 7, 5, 8}, " --num-groups 4 --shard-axis 1 --scale scale.npy --bias bias.npy", "", {}},
      {"nhwc axis 2 exact variance", {2, 7, 5, 8}, " --num-groups 4 --shard-axis 2 --exact-variance --scale scale.npy --bias bias.npy", "", {}},
      {"nhwc axis 1 exact variance large mean", {2, 7, 5, 8}, " --num-groups 2 --shard-axis 1 --exact-variance", "", {}},
      {"nchw axis 2", {2, 8, 7, 5}, " --num-groups 4 --layout nchw --shard-axis 2 --scale scale.npy --bias bias.npy", "", {}},
      {"nhwc axis 1 full bool mask", {2, 7, 5, 8}, " --num-groups 4 --shard-axis 1 --scale scale.npy --mask mask.npy", "b1", {2, 7, 5, 8}},
      {"nhwc axis 1 broadcast uint8 mask", {2, 7, 5, 8}, " --num-groups 4 --shard-axis 1 --bias bias.npy --mask mask.npy", "u1", {7, 5, 8}},
      {"nchw axis 3 mask exact variance", {2, 8, 7, 5}, " --num-groups 2 --layout nchw --shard-axis 3 --exact-variance --mask mask.npy", "b1", {2, 8, 7, 5}},
      // Extent 1 along the shard axis: one rank gets the slice, the others
      // none, so dscale/dbias are not counted once per rank.
      {"nhwc axis 1 of extent 1", {2, 1, 4, 8}, " --num-groups 4 --shard-axis 1", "", {}},
  };
  for (const Case& k : cases) {
    DYNAMIC_SECTION(k.name) {
      TempDir dir;
      const bool large_mean = std::string(k.name).find("large mean") != std::string::npos;
      write_floats(dir / "x.npy", k.shape, 11, large_mean ? 300.0 : 1.5, large_mean ? 0.5 : 2.0);
      write_floats(dir / "dy.npy", k.shape, 12);
      const int64_t channels = k.options.find("nchw") != std::string::npos ? k.shape[1] : k.shape.back();
      write_floats(dir / "scale.npy", {channels}, 13, 1.0, 0.3);
      write_floats(dir / "bias.npy", {channels}, 14);
      if (!k.mask.empty())
        write_mask(dir / "mask.npy", k.mask_shape, 15, k.mask == "b1" ? io::NpyType::b1 : io::NpyType::u1);
      auto outs = [&](const std::string& tag) {
        return " --y out_" + tag + "_y.npy --dx out_" + tag + "_dx.npy --dscale out_" + tag +
               "_dscale.npy --dbias out_" + tag + "_dbias.npy";
      };
      const std::string inputs = " --x x.npy --dy dy.npy" + k.options;

      const std::string single = apply_command(inputs + outs("ref"));
      const Result ref = run(single, dir);
      INFO("single-process command: " << single);
      INFO("stderr: " << ref.err);
      REQUIRE(ref.status == 0);

      for (int ranks : {2, 3}) {
        const std::string tag = "p" + std::to_string(ranks);
        const Result r = run_mpi(ranks, inputs + outs(tag), dir);
        INFO("mpiexec -n " << ranks << " distgn apply" << inputs << outs(tag));
        INFO("stderr: " << r.err);
        REQUIRE(r.status == 0);
        CHECK(rank_statuses(dir, ranks) == std::vector<int>(size_t(ranks), 0));
        for (const std::string key : {"y", "dx", "dscale", "dbias"}) {
          const io::NpyArray want = io::read_npy(dir / ("out_ref_" + key + ".npy"));
          const io::NpyArray got = io::read_npy(dir / ("out_" + tag + "_" + key + ".npy"));
          REQUIRE(got.shape == want.shape);
          CHECK(got.type == want.type);
          const std::vector<double> w = golden::values(want);
          check_close(tag + " " + key, golden::values(got), w, 1e-5, key == "y" ? 1.0 : std::max(1.0, max_abs(w)));
        }
      }
    }
  }
}

TEST_CASE("cli apply: invalid input under mpiexec fails on every rank without a hang", "[cli][mpi][errors]") {
  if (const std::string why = mpi_unavailable(); !why.empty()) {
    WARN("skipped: " << why);
    return;
  }
  Inputs in;
  write_mask(in.dir / "mask_c5.npy", {2, 3, 4, 5}, 6, io::NpyType::b1);
  struct Case {
    const char* name;
    std::string options;
    std::string message;  // "" = any message, the same on both ranks
  };
  const std::vector<Case> cases = {
      {"--num-groups 3 with C = 8", " --num-groups 3",
       "Number of groups (3) does not divide the number of channels (8)."},
      {"--num-groups 3 with C = 8 sharded with backward", " --num-groups 3 --shard-axis 1 --dy dy.npy --dx out_dx.npy",
       "Number of groups (3) does not divide the number of channels (8)."},
      {"--group-size 3 under --ranks-axis", " --group-size 3 --ranks-axis",
       "Number of channels (8) is not multiple of the group size (3)."},
      {"--reduction-axes without the feature axis", " --num-groups 2 --shard-axis 1 --reduction-axes 1,2",
       kFeatureAxisMessage},
      {"mask with the wrong last dimension sharded", " --num-groups 2 --shard-axis 1 --mask mask_c5.npy", ""},
      {"--shard-axis 0 (not reduced)", " --num-groups 2 --shard-axis 0", ""},
      {"--axis-index-groups 0,0", " --num-groups 2 --axis-index-groups 0,0",
       "axis_index_groups must cover all indices exactly once"},
      {"--axis-index-groups 0", " --num-groups 2 --axis-index-groups 0",
       "axis_index_groups must cover all indices exactly once"},
      {"--axis-index-groups 0,2", " --num-groups 2 --axis-index-groups '0;2'",
       "axis_index_groups must cover all indices exactly once"},
      {"--ranks-axis with a leading axis other than 2", " --num-groups 2 --ranks-axis", ""},
      {"--axis-index-groups with an empty group", " --num-groups 2 --axis-index-groups '0;;1'",
       "'0;;1' has an empty group"},
      {"empty --num-groups", " --num-groups '' --shard-axis 1", "--num-groups: an empty value is not allowed"},
      {"NaN --epsilon", " --num-groups 2 --shard-axis 1 --epsilon nan", "--epsilon nan: must be >= 0"},
      {"--dx equal to --y", " --num-groups 2 --shard-axis 1 --dy dy.npy --dx out_y.npy",
       "--dx out_y.npy and --y out_y.npy are the same file"},
  };
  write_floats(in.dir / "x_3.npy", {3, 3, 4, 8}, 7);
  // What a script sees: mpiexec's own status (by default it stops the job
  // when a rank exits non-zero, so the other rank's status is not reliable).
  SECTION("mpiexec itself exits 2") {
    const std::string options = " --x x.npy --y out_y.npy --num-groups 3";
    const Result r = run_mpi(2, options, in.dir);
    INFO("command: mpiexec -n 2 distgn apply" << options);
    INFO("stderr: " << r.err);
    CHECK(r.status == 2);
    CHECK(occurrences(r.err, "Number of groups (3) does not divide the number of channels (8).") >= 1);
    CHECK(outputs(in.dir).empty());
  }
  for (const Case& k : cases) {
    SECTION(k.name) {
      const bool leading_3 = k.options.find("--ranks-axis") != std::string::npos &&
                             k.options.find("--group-size") == std::string::npos;
      const std::string options = std::string(leading_3 ? " --x x_3.npy" : " --x x.npy") + " --y out_y.npy" + k.options;
      // Every rank runs to its end, so that each one's status is its own.
      const Result r = run_mpi(2, options, in.dir, OnFailure::let_finish);
      INFO("command: mpiexec -n 2 distgn apply" << options);
      INFO("stderr: " << r.err);
      INFO("took " << r.seconds << " s");
      CHECK(r.status != 124);  // not killed by timeout: no hang
      CHECK(r.seconds < kTimeoutSeconds);
      CHECK(rank_statuses(in.dir, 2) == std::vector<int>{2, 2});
      if (!k.message.empty()) {
        CHECK(occurrences(r.err, k.message) == 2);
      } else {
        CHECK(occurrences(r.err, "distgn: error: ") == 2);
      }
      INFO("output files left: " << joined(outputs(in.dir)));
      CHECK(outputs(in.dir).empty());
    }
  }
}

// Under AddressSanitizer (scripts/test.sh --sanitize) the tool reserves
// terabytes of shadow address space, so it cannot start under `ulimit -v`,
// and its resident memory counts the shadow and the freed-memory quarantine:
// the memory tests measure the release build and are skipped there.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

// Issue 13: running out of memory is an error like any other (it used to end
// in std::terminate, exit 134). `ulimit -v` makes the memory small: 2 GB of
// address space (room for a CUDA build's libraries) for buffers of 4 GiB.
TEST_CASE("cli: running out of memory exits 2 saying what did not fit, on every rank", "[cli][errors][mpi]") {
  if (kSanitized) {
    WARN("skipped under AddressSanitizer: the memory tests measure the release build");
    return;
  }
  TempDir dir;
  auto limited = [](const std::string& kilobytes, const std::string& command) {
    return "sh -c " + quote("ulimit -v " + kilobytes + " && exec " + command);
  };
  const std::string bench = quote(cli_path()) + " bench --shape 1,1024,1024,1024 --iters 1 --warmup 0";
  const std::string bench_message = "out of memory: the generated (1, 1024, 1024, 1024) array needs 4294967296 bytes";
  // A .npy file of 4 GiB of zeros (sparse: only the header is written).
  write_raw_npy(dir / "x_big.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1024, 1024, 1024), }", {});
  fs::resize_file(dir / "x_big.npy", fs::file_size(dir / "x_big.npy") + (size_t(1) << 32));
  const std::string apply = apply_command(" --x x_big.npy --y out_y.npy --num-groups 2");
  const std::string apply_message = "out of memory: reading x_big.npy needs 4294967424 bytes";

  SECTION("bench, one process") {
    const Result r = run(limited("2000000", bench), dir);
    INFO("stderr: " << r.err);
    CHECK(r.status == 2);
    CHECK(occurrences(r.err, bench_message) == 1);
  }
  SECTION("apply, one process") {
    check_rejected(run(limited("2000000", apply), dir), apply_message, dir);
  }
  // No elements but 2^31 x 2 groups = 2^32 cells of statistics (96 GiB).
  SECTION("apply, a zero-size x of 2^32 cells") {
    write_raw_npy(dir / "x_empty.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2147483648, 0, 8), }", {});
    const std::string command = apply_command(" --x x_empty.npy --y out_y.npy --num-groups 2");
    check_rejected(run(limited("2000000", command), dir),
                   "out of memory: the layer's statistics for the 4294967296 cells of x (2147483648, 0, 8) need at least "
                   "103079215104 bytes",
                   dir);
  }
  if (const std::string why = mpi_unavailable(); !why.empty()) {
    WARN("skipped under mpiexec: " << why);
    return;
  }
  write_rank_wrapper(dir);
  const std::string mpi = mpiexec() + " --mca orte_abort_on_non_zero_status 0 -n 2 sh rank_status.sh ";
  SECTION("bench, mpiexec -n 2") {
    const Result r = run(limited("2000000", mpi + bench + " --shard-axis 1"), dir);
    INFO("stderr: " << r.err);
    CHECK(r.status != 124);
    CHECK(rank_statuses(dir, 2) == std::vector<int>{2, 2});
    CHECK(occurrences(r.err, bench_message) == 2);
  }
  SECTION("apply, mpiexec -n 2") {
    const Result r = run(limited("2000000", mpi + apply + " --shard-axis 1"), dir);
    INFO("stderr: " << r.err);
    CHECK(r.status != 124);
    CHECK(rank_statuses(dir, 2) == std::vector<int>{2, 2});
    CHECK(occurrences(r.err, apply_message) == 2);
    CHECK(outputs(dir).empty());
  }
}

// With --backend cuda on tests/cuda/emulator, device memory is host memory:
// every array the tool copies to the device counts twice in the peak.
#ifdef DISTGN_CLI_DEVICE_IS_HOST
constexpr double kHostCopies = 2;
#else
constexpr double kHostCopies = 1;
#endif

// Issue 13: one rank runs on the loaded arrays themselves; the tool used to
// copy them into a shard and the outputs out of one (about 4x x's size
// forward, 8x with backward). Peak resident memory from /usr/bin/time, less
// that of a run on a tiny input (the program itself).
TEST_CASE("cli apply: one rank holds only the inputs and outputs in memory", "[cli]") {
  if (kSanitized) {
    WARN("skipped under AddressSanitizer: the memory tests measure the release build");
    return;
  }
  if (!fs::exists("/usr/bin/time")) {
    WARN("skipped: no /usr/bin/time to measure the peak resident memory");
    return;
  }
  TempDir dir;
  const Shape shape{1, 256, 256, 128};
  const double tensor = double(element_count(shape)) * 4;  // 32 MiB of float32
  write_floats(dir / "x.npy", shape, 1);
  write_floats(dir / "dy.npy", shape, 2);
  write_floats(dir / "x_tiny.npy", {1, 2, 2, 128}, 3);
  write_floats(dir / "dy_tiny.npy", {1, 2, 2, 128}, 4);
  // Peak resident bytes of `distgn apply` on x<suffix>.npy (and dy with backward).
  auto peak = [&](const std::string& suffix, bool backward) {
    const std::string options = " --num-groups 32 --x x" + suffix + ".npy --y out_y.npy" +
                                (backward ? " --dy dy" + suffix + ".npy --dx out_dx.npy" : "");
    const Result r = run("/usr/bin/time -f %M -o rss.txt " + apply_command(options), dir);
    INFO("stderr: " << r.err);
    REQUIRE(r.status == 0);
    return std::stod(slurp(dir / "rss.txt")) * 1024;  // KiB
  };
  SECTION("forward: x and y") {
    const double used = peak("", false) - peak("_tiny", false);
    INFO("peak beyond the program: " << used / tensor << " x the tensor");
    CHECK(used < 2.5 * kHostCopies * tensor);
  }
  SECTION("backward: x, dy, y and dx") {
    const double used = peak("", true) - peak("_tiny", true);
    INFO("peak beyond the program: " << used / tensor << " x the tensor");
    CHECK(used < 4.5 * kHostCopies * tensor);
  }
}

// The CPU backend's streaming-store and block sizes (distgn/cpu_tuning.hpp)
// change how y and dx are written and in which blocks of cells the flow
// runs, never a value: every setting gives the same bits.
TEST_CASE("cli apply: DISTGN_CPU_TUNING's streaming and block sizes change no bit of y, dx, dscale, dbias",
          "[cli]") {
  TempDir dir;
  for (const char* layout : {"nhwc", "nchw"}) {
    const Shape shape = std::string(layout) == "nhwc" ? Shape{3, 40, 40, 64} : Shape{3, 64, 40, 40};
    write_floats(dir / "x.npy", shape, 5);
    write_floats(dir / "dy.npy", shape, 6);
    auto outputs_with = [&](const std::string& tuning) {
      const std::string options = std::string(" --layout ") + layout +
                                  " --num-groups 16 --x x.npy --dy dy.npy --y y.npy --dx dx.npy"
                                  " --dscale dscale.npy --dbias dbias.npy";
      const Result r = run("env DISTGN_CPU_TUNING=" + tuning + " " + apply_command(options), dir);
      INFO(layout << " " << tuning << ": " << r.err);
      REQUIRE(r.status == 0);
      std::string all;
      for (const char* name : {"y.npy", "dx.npy", "dscale.npy", "dbias.npy"}) all += slurp(dir / name);
      return all;
    };
    const std::string derived = outputs_with("");
    for (const char* tuning : {"streamed_output=0", "fused_block=64K", "fused_block=1G,streamed_output=1G",
                               "streamed_output=0,fused_block=1K"}) {
      INFO(layout << " with DISTGN_CPU_TUNING=" << tuning);
      CHECK(outputs_with(tuning) == derived);
    }
  }
}

// Issue 13: only rank 0, which writes the outputs, assembles them (a rooted
// gather); every rank used to receive the whole y and dx.
TEST_CASE("cli apply: under mpiexec the other ranks do not hold the whole outputs", "[cli][mpi]") {
  if (kSanitized) {
    WARN("skipped under AddressSanitizer: the memory tests measure the release build");
    return;
  }
  if (const std::string why = mpi_unavailable(); !why.empty()) {
    WARN("skipped: " << why);
    return;
  }
  if (!fs::exists("/usr/bin/time")) {
    WARN("skipped: no /usr/bin/time to measure the peak resident memory");
    return;
  }
  TempDir dir;
  const Shape shape{1, 256, 256, 128};
  const double tensor = double(element_count(shape)) * 4;  // 32 MiB of float32
  write_floats(dir / "x.npy", shape, 1);
  write_floats(dir / "dy.npy", shape, 2);
  write_floats(dir / "x_tiny.npy", {1, 2, 2, 128}, 3);
  write_floats(dir / "dy_tiny.npy", {1, 2, 2, 128}, 4);
  // Rank 1's peak resident bytes for x<suffix>.npy with backward on 2 ranks.
  auto rank_1_peak = [&](const std::string& suffix) {
    const std::string options = " --num-groups 32 --shard-axis 1 --x x" + suffix + ".npy --dy dy" + suffix +
                                ".npy --y out_y.npy --dx out_dx.npy";
    const std::string rank_command =
        "exec /usr/bin/time -f %M -o rss.${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${PMI_RANK}}} " + apply_command(options);
    const Result r = run(mpiexec() + " -n 2 sh -c " + quote(rank_command), dir);
    INFO("stderr: " << r.err);
    REQUIRE(r.status == 0);
    return std::stod(slurp(dir / "rss.1")) * 1024;  // KiB
  };
  // x and dy whole while they are loaded and split (2x at most), then its
  // halves of x, dy, y and dx; the whole y and dx would make it 3x or more.
  const double used = rank_1_peak("") - rank_1_peak("_tiny");
  INFO("rank 1's peak beyond the program: " << used / tensor << " x the tensor");
  CHECK(used < 2.6 * kHostCopies * tensor);
}

// The same check seen from two ranks: both exit 2, nothing is written.
TEST_CASE("cli apply: --dscale with --no-scale under mpiexec fails on every rank", "[cli][mpi][errors]") {
  if (const std::string why = mpi_unavailable(); !why.empty()) {
    WARN("skipped: " << why);
    return;
  }
  Inputs in;
  const std::string options =
      " --x x.npy --y out_y.npy --num-groups 2 --shard-axis 1 --no-scale --dy dy.npy --dx out_dx.npy "
      "--dscale out_ds.npy";
  const Result r = run_mpi(2, options, in.dir, OnFailure::let_finish);
  INFO("command: mpiexec -n 2 distgn apply" << options);
  INFO("stderr: " << r.err);
  CHECK(r.status != 124);
  CHECK(rank_statuses(in.dir, 2) == std::vector<int>{2, 2});
  INFO("output files left: " << joined(outputs(in.dir)));
  CHECK(outputs(in.dir).empty());
}

// An output that cannot be written is found before any work, on every rank:
// nothing is left behind (not even the outputs that could be written).
TEST_CASE("cli apply: an unwritable output path fails on every rank and leaves no partial output",
          "[cli][errors]") {
  Inputs in;
  const std::string options =
      " --x x.npy --y out_y.npy --num-groups 2 --shard-axis 1 --dy dy.npy --dx no_such_dir/out_dx.npy";
  SECTION("one process") {
    const Result r = run(apply_command(options), in.dir);
    INFO("command: distgn apply" << options);
    INFO("stderr: " << r.err);
    CHECK(r.status == 2);
    CHECK(r.err.find("no_such_dir/out_dx.npy") != std::string::npos);
    INFO("output files left: " << joined(outputs(in.dir)));
    CHECK(outputs(in.dir).empty());
  }
  SECTION("mpiexec -n 2") {
    if (const std::string why = mpi_unavailable(); !why.empty()) {
      WARN("skipped: " << why);
      return;
    }
    const Result r = run_mpi(2, options, in.dir, OnFailure::let_finish);
    INFO("command: mpiexec -n 2 distgn apply" << options);
    INFO("stderr: " << r.err);
    CHECK(r.status != 124);
    CHECK(rank_statuses(in.dir, 2) == std::vector<int>{2, 2});
    INFO("output files left: " << joined(outputs(in.dir)));
    CHECK(outputs(in.dir).empty());
  }
}

// `distgn bench` prints a table scripts read and writes one JSON line per
// case: the header, a row per shape and every key of the line are part of the
// tool's interface (the figures themselves are timings).
TEST_CASE("cli bench: the table and the --json lines", "[cli][bench]") {
  TempDir dir;
  const std::string bench = quote(cli_path()) + " bench --iters 2 --warmup 1 --num-groups 8";
  const std::vector<std::string> keys = {
      "backend", "bwd_gbps", "bwd_ms", "collective_latency_us", "collectives_bwd", "collectives_fwd", "comm_us",
      "copy_gbps", "cpu", "dtype", "fwd_gbps", "fwd_ms", "layout", "max_abs_err", "num_groups", "param_dtype", "ranks",
      "shape", "shard_axis", "threads"};
  auto json_lines = [&] {
    std::vector<json> lines;
    std::istringstream in(slurp(dir / "out.json"));
    for (std::string line; std::getline(in, line);) lines.push_back(json::parse(line));
    return lines;
  };
  auto rows = [](const std::string& out) {
    std::vector<std::string> found;
    std::istringstream in(out);
    for (std::string line; std::getline(in, line);)
      if (line.rfind("(", 0) == 0) found.push_back(line);
    return found;
  };

  SECTION("one shape, checked") {
    const Result r = run(bench + " --shape 2,8,8,64 --check --json out.json", dir);
    INFO("stdout: " << r.out << "\nstderr: " << r.err);
    REQUIRE(r.status == 0);
    CHECK(r.out.find("distgn bench: 1 rank(s), ") == 0);
    CHECK(r.out.find(" thread(s) per rank, f32 nhwc, G=8, median of 2\n") != std::string::npos);
    CHECK(r.out.find("shape                  copy GB/s    fwd ms fwd GB/s fwd/copy    bwd ms bwd GB/s bwd/copy  "
                     "comm us   lat us  coll   max err\n") != std::string::npos);
    const std::vector<std::string> table = rows(r.out);
    REQUIRE(table.size() == 1);
    CHECK(table[0].rfind("(2, 8, 8, 64) ", 0) == 0);
    CHECK(table[0].find("  0/0   ") != std::string::npos);
    CHECK(table[0].find("e-") != std::string::npos);  // max err, %.2e
    const std::vector<json> lines = json_lines();
    REQUIRE(lines.size() == 1);
    const json& j = lines[0];
    std::vector<std::string> got;
    for (const auto& item : j.items()) got.push_back(item.key());
    CHECK(got == keys);
    CHECK(j["ranks"] == 1);
    CHECK(j["shape"] == json({2, 8, 8, 64}));
    CHECK(j["dtype"] == "f32");
    CHECK(j["layout"] == "nhwc");
    CHECK(j["backend"] == "cpu");
    CHECK(j["param_dtype"] == "f32");
    CHECK(j["num_groups"] == 8);
    CHECK(j["shard_axis"].is_null());
    CHECK(j["collectives_fwd"] == 0);
    CHECK(j["collectives_bwd"] == 0);
    for (const char* timing : {"copy_gbps", "fwd_ms", "bwd_ms", "fwd_gbps", "bwd_gbps"}) {
      INFO(timing);
      CHECK(j[timing].get<double>() > 0);
    }
    CHECK(j["max_abs_err"].get<double>() < 1e-5);
    // Where it was measured, and the CPU tuning derived there.
    CHECK(r.out.find("\ncpu: ") != std::string::npos);
    const json& cpu = j["cpu"];
    CHECK(!cpu["model"].get<std::string>().empty());
    CHECK(cpu["l2_bytes"].get<int64_t>() >= 0);
    // Multiples of the L2 per core: of the processors (so that results do
    // not depend on the thread count) and of the threads.
    const int64_t l2 = cpu["l2_bytes"].get<int64_t>() > 0 ? cpu["l2_bytes"].get<int64_t>() : 1 << 20;
    CHECK(cpu["processors"].get<int64_t>() >= 1);
    CHECK(cpu["cache_resident_bytes"] == 2 * cpu["processors"].get<int64_t>() * l2);
    CHECK(cpu["streamed_output_bytes"] == 2 * j["threads"].get<int64_t>() * l2);
    CHECK(cpu["fused_block_bytes"] == j["threads"].get<int64_t>() * l2 / 2);
    CHECK(cpu["tuning"].get<std::string>().rfind("derived from ", 0) == 0);
  }
  SECTION("DISTGN_CPU_TUNING sets the thresholds; a malformed one exits 2 saying the keys") {
    const Result r = run("env DISTGN_CPU_TUNING=cache_resident=1M,fused_block=512K " + bench +
                             " --shape 2,8,8,64 --json out.json", dir);
    INFO("stdout: " << r.out << "\nstderr: " << r.err);
    REQUIRE(r.status == 0);
    const json cpu = json_lines().at(0)["cpu"];
    CHECK(cpu["cache_resident_bytes"] == 1 << 20);
    CHECK(cpu["fused_block_bytes"] == 512 << 10);
    CHECK(cpu["streamed_output_bytes"].get<int64_t>() > 0);  // not given: derived
    CHECK(cpu["tuning"] == "DISTGN_CPU_TUNING=cache_resident=1M,fused_block=512K");
    for (const char* bad : {"cache=1M", "cache_resident=lots", "fused_block=0"}) {
      const Result b = run(std::string("env DISTGN_CPU_TUNING=") + bad + " " + bench + " --shape 2,8,8,64", dir);
      INFO(bad << ": " << b.err);
      CHECK(b.status == 2);
      CHECK(b.err.find("DISTGN_CPU_TUNING: ") != std::string::npos);
      CHECK(b.err.find(bad) != std::string::npos);
    }
  }
  SECTION("several shapes, unchecked, sharded, channels first") {
    const Result r =
        run(bench + " --shape '2,64,8,8;1,32,4,4' --shape 2,16,3 --layout nchw --shard-axis 2 --json out.json", dir);
    INFO("stdout: " << r.out << "\nstderr: " << r.err);
    REQUIRE(r.status == 0);
    CHECK(r.out.find(" f32 nchw, G=8, median of 2\n") != std::string::npos);
    CHECK(r.err == "[1/3] (2, 64, 8, 8)\n[2/3] (1, 32, 4, 4)\n[3/3] (2, 16, 3)\n");
    const std::vector<std::string> table = rows(r.out);
    REQUIRE(table.size() == 3);
    for (const std::string& row : table) CHECK(row.substr(row.size() - 2) == " -");
    const std::vector<json> lines = json_lines();
    REQUIRE(lines.size() == 3);
    CHECK(lines[2]["shape"] == json({2, 16, 3}));
    for (const json& j : lines) {
      CHECK(j["layout"] == "nchw");
      CHECK(j["shard_axis"] == 2);
      CHECK(j["max_abs_err"].is_null());
    }
  }
}

// Each command words its own --shard-axis errors: apply counts a negative axis
// from the end (numpy's way) and says when one is out of range; bench takes
// the axes from 0 and names the case's shape.
TEST_CASE("cli: --shard-axis errors of apply and bench", "[cli][errors]") {
  Inputs in;  // x is (2, 3, 4, 8)
  const std::string not_reduced =
      " is not a reduced axis other than the feature axis: sharding along it would split cells' groups or "
      "change which cells exist; shard along one of the reduction axes\n";
  const std::string out_of_range = " is out of range for x of shape (2, 3, 4, 8)\n";
  const std::string base = " --x x.npy --y out_y.npy";
  const std::vector<std::pair<std::string, std::string>> apply_cases = {
      {" --num-groups 2 --shard-axis 0", "distgn: error: --shard-axis 0" + not_reduced},
      {" --num-groups 2 --shard-axis 3", "distgn: error: --shard-axis 3" + not_reduced},
      {" --num-groups 2 --shard-axis -1", "distgn: error: --shard-axis -1" + not_reduced},
      {" --num-groups 2 --shard-axis -4", "distgn: error: --shard-axis -4" + not_reduced},
      {" --num-groups 2 --shard-axis 4", "distgn: error: --shard-axis 4" + out_of_range},
      {" --num-groups 2 --shard-axis -5", "distgn: error: --shard-axis -5" + out_of_range},
      {" --num-groups 2 --shard-axis 1 --reduction-axes 2,3", "distgn: error: --shard-axis 1" + not_reduced},
      {" --num-groups 3 --shard-axis 1 --layout nchw", "distgn: error: --shard-axis 1" + not_reduced},
      {" --num-groups 2 --shard-axis 1 --ranks-axis",
       "distgn: error: --ranks-axis and --shard-axis exclude each other\n"},
  };
  for (const auto& [options, message] : apply_cases) {
    SECTION("apply" + options) {
      const Result r = run(apply_command(base + options), in.dir);
      check_rejected(r, message, in.dir);
      CHECK(r.err == message);
    }
  }
  SECTION("apply --shard-axis -3 is axis 1") {
    const Result r = run(apply_command(base + " --num-groups 2 --shard-axis -3"), in.dir);
    INFO("stderr: " << r.err);
    CHECK(r.status == 0);
  }
  const std::string bench = quote(cli_path()) + " bench --iters 1 --warmup 0 --num-groups 8";
  const std::vector<std::pair<std::string, std::string>> bench_cases = {
      {" --shape 2,8,8,64 --shard-axis 0", "(2, 8, 8, 64)"},
      {" --shape 2,8,8,64 --shard-axis 3", "(2, 8, 8, 64)"},
      {" --shape 2,8,8,64 --shard-axis 4", "(2, 8, 8, 64)"},
      {" --shape 2,8,8,64 --shard-axis -2", "(2, 8, 8, 64)"},
      {" --shape 2,64,8,8 --layout nchw --shard-axis 1", "(2, 64, 8, 8)"},
  };
  for (const auto& [options, shape] : bench_cases) {
    SECTION("bench" + options) {
      const Result r = run(bench + options, in.dir);
      INFO("stderr: " << r.err);
      CHECK(r.status == 2);
      const std::string axis = options.substr(options.rfind(' ') + 1);
      CHECK(r.err == "distgn: error: --shard-axis " + axis +
                         " must be a reduced axis other than the batch and feature axes of " + shape + "\n");
    }
  }
  SECTION("bench checks each case's shape: the second has no axis 2") {
    const Result r = run(bench + " --shape '2,8,8,64;2,8' --shard-axis 2", in.dir);
    INFO("stdout: " << r.out);
    CHECK(r.status == 2);
    CHECK(r.out.find("\n(2, 8, 8, 64) ") != std::string::npos);  // the first case ran
    CHECK(r.err == "[1/2] (2, 8, 8, 64)\n[2/2] (2, 8)\ndistgn: error: --shard-axis 2 must be a reduced axis other "
                   "than the batch and feature axes of (2, 8)\n");
  }
}
