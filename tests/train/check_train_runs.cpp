// Checks the JSON lines of train_digits runs on several D x P layouts (the
// first file is the reference, normally 1x1):
//  - every file has one line per epoch 1..E with finite values;
//  - the training loss falls every epoch;
//  - every layout's per-epoch train and test losses agree with the
//    reference's within a relative tolerance (the layouts only reorder
//    floating-point sums), and test accuracies within --accuracy-tolerance.
// Usage: check_train_runs --epochs E --tolerance R [--accuracy-tolerance A] FILE...
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace {

struct Epoch {
  int epoch = 0;
  double train_loss = 0, test_loss = 0, test_accuracy = 0, step_ms = 0;
};

std::vector<Epoch> read_run(const std::string& path, std::string& error) {
  std::vector<Epoch> run;
  std::ifstream in(path);
  if (!in) {
    error = path + ": cannot read (did its train_digits run fail?)";
    return run;
  }
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    try {
      const auto j = nlohmann::json::parse(line);
      Epoch e;
      e.epoch = j.at("epoch").get<int>();
      e.train_loss = j.at("train_loss").get<double>();
      e.test_loss = j.at("test_loss").get<double>();
      e.test_accuracy = j.at("test_accuracy").get<double>();
      e.step_ms = j.at("step_ms").get<double>();
      run.push_back(e);
    } catch (const std::exception& ex) {
      error = path + ": line " + std::to_string(run.size() + 1) + " is not a train_digits JSON line: " + ex.what();
      return run;
    }
  }
  return run;
}

double relative(double a, double reference) {
  return std::fabs(a - reference) / std::max(std::fabs(reference), 1e-300);
}

}  // namespace

int main(int argc, char** argv) {
  int epochs = 0;
  double tolerance = -1, accuracy_tolerance = 0.01;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--epochs" && i + 1 < argc) epochs = std::atoi(argv[++i]);
    else if (a == "--tolerance" && i + 1 < argc) tolerance = std::atof(argv[++i]);
    else if (a == "--accuracy-tolerance" && i + 1 < argc) accuracy_tolerance = std::atof(argv[++i]);
    else files.push_back(a);
  }
  if (epochs < 2 || tolerance < 0 || files.size() < 2) {
    std::cerr << "usage: check_train_runs --epochs E (>= 2) --tolerance R [--accuracy-tolerance A] FILE FILE...\n";
    return 2;
  }

  int failures = 0;
  const auto fail = [&](const std::string& message) {
    std::cerr << "FAIL: " << message << "\n";
    ++failures;
  };
  std::vector<std::vector<Epoch>> runs;
  for (const std::string& f : files) {
    std::string error;
    runs.push_back(read_run(f, error));
    if (!error.empty()) {
      fail(error);
      continue;
    }
    const auto& run = runs.back();
    if (int(run.size()) != epochs) {
      fail(f + ": " + std::to_string(run.size()) + " epochs, expected " + std::to_string(epochs));
      continue;
    }
    for (int e = 0; e < epochs; ++e) {
      const Epoch& x = run[size_t(e)];
      if (x.epoch != e + 1) fail(f + ": line " + std::to_string(e + 1) + " has epoch " + std::to_string(x.epoch));
      if (!std::isfinite(x.train_loss) || !std::isfinite(x.test_loss) || !std::isfinite(x.test_accuracy))
        fail(f + ": epoch " + std::to_string(e + 1) + " has a non-finite value");
      if (e > 0 && !(x.train_loss < run[size_t(e - 1)].train_loss))
        fail(f + ": the training loss does not fall from epoch " + std::to_string(e) + " (" +
             std::to_string(run[size_t(e - 1)].train_loss) + ") to " + std::to_string(e + 1) + " (" +
             std::to_string(x.train_loss) + ")");
    }
  }
  if (failures) return 1;

  std::printf("%-40s %5s %22s %22s %9s %12s %9s\n", "run", "epoch", "train loss", "test loss", "test acc",
              "max rel diff", "step ms");
  const auto& ref = runs[0];
  double worst = 0;
  for (size_t r = 0; r < runs.size(); ++r)
    for (int e = 0; e < epochs; ++e) {
      const Epoch& x = runs[r][size_t(e)];
      const Epoch& y = ref[size_t(e)];
      const double diff = std::max(relative(x.train_loss, y.train_loss), relative(x.test_loss, y.test_loss));
      worst = std::max(worst, diff);
      std::printf("%-40s %5d %22.15g %22.15g %9.4f %12.3g %9.3f\n", files[r].c_str(), x.epoch, x.train_loss,
                  x.test_loss, x.test_accuracy, diff, x.step_ms);
      if (diff > tolerance)
        fail(files[r] + " epoch " + std::to_string(x.epoch) + ": losses differ from " + files[0] +
             "'s by " + std::to_string(diff) + " (relative), more than the tolerance " + std::to_string(tolerance));
      if (std::fabs(x.test_accuracy - y.test_accuracy) > accuracy_tolerance)
        fail(files[r] + " epoch " + std::to_string(x.epoch) + ": test accuracy " + std::to_string(x.test_accuracy) +
             " differs from " + files[0] + "'s " + std::to_string(y.test_accuracy) + " by more than " +
             std::to_string(accuracy_tolerance));
    }
  std::printf("largest relative loss difference from %s: %.3g (tolerance %.3g)\n", files[0].c_str(), worst,
              tolerance);
  if (failures) return 1;
  std::printf("PASS: the loss falls on every layout and the layouts agree\n");
  return 0;
}
