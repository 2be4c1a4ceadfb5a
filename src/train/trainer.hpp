// The data-parallel x spatial-parallel training loop of train_digits.
#pragma once

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "distgn/communicator.hpp"
#include "train/digits.hpp"
#include "train/model.hpp"

namespace distgn::train {

struct Options {
  int dp = 0;          // data-parallel replicas D (0: ranks / sp)
  int sp = 1;          // spatial shards P per replica (1..8: the image rows)
  int epochs = 30;
  int batch = 16;      // global batch B, split over the D replicas
  double lr = 0.1;     // peak SGD learning rate (cosine decay to 0 over the run)
  double momentum = 0.9;
  uint64_t seed = 0;   // split, shuffles and initial weights
  std::string json;    // JSON lines file (rank 0 writes it), optional
  std::string data;    // digits.csv.gz; empty: search python3-sklearn
  std::string dtype = "f32";  // f32 | f64: every activation, parameter and gradient
  ModelShape shape;
  double test_fraction = 0.2;
};

// Checks the options against the number of ranks (throws TrainError with the
// fix) and fills in dp when it was left 0.
void validate(Options& options, int ranks, int train_images);

// Trains and evaluates; rank 0 writes one JSON object a line per epoch to
// `out` (stdout) and `json_file` (may be null). Collective over `world`.
template <class T>
void run_training(const Options& options, const Digits& data, const std::vector<int>& train_set,
           const std::vector<int>& test_set, const std::shared_ptr<CountingCommunicator>& world,
           std::ostream& out, std::ostream* json_file);

}  // namespace distgn::train
