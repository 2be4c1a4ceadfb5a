#include "train/trainer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>

#include "distgn/build_config.hpp"
#include "train/alloc_count.hpp"
#include "train/rng.hpp"

namespace distgn::train {
namespace {

constexpr double kPi = 3.14159265358979323846;

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// SGD with (heavy-ball) momentum over the model's parameter segments, the
// gradient read from the bucket: v = momentum * v + g; p -= lr * v.
template <class T>
class Sgd {
 public:
  Sgd(size_t count, double momentum) : velocity_(count, T(0)), momentum_(T(momentum)) {}
  void step(const std::vector<Segment<T>>& segments, const T* grad, double lr) {
    const T rate = T(lr);
    for (const Segment<T>& s : segments)
      for (size_t j = 0; j < s.count; ++j) {
        T& v = velocity_[s.offset + j];
        v = momentum_ * v + grad[s.offset + j];
        s.param[j] -= rate * v;
      }
  }

 private:
  std::vector<T> velocity_;
  T momentum_;
};

}  // namespace

void validate(Options& o, int ranks, int train_images) {
  const auto fail = [](const std::string& message) { throw TrainError(message); };
  if (o.sp < 1 || o.sp > Digits::kSide)
    fail("--sp " + std::to_string(o.sp) + ": the spatial shards split the 8 image rows, so 1 <= P <= 8");
  if (o.dp == 0) {
    if (ranks % o.sp != 0)
      fail("--sp " + std::to_string(o.sp) + " does not divide the " + std::to_string(ranks) +
           " ranks: run D*P ranks (mpirun -np D*P) or give --dp");
    o.dp = ranks / o.sp;
  }
  if (o.dp < 1) fail("--dp must be at least 1");
  if (o.dp * o.sp != ranks)
    fail("--dp " + std::to_string(o.dp) + " x --sp " + std::to_string(o.sp) + " = " +
         std::to_string(o.dp * o.sp) + " ranks, but this run has " + std::to_string(ranks) +
#if DISTGN_WITH_MPI
         ": run it as mpirun -np " + std::to_string(o.dp * o.sp) + " ...");
#else
         " (this build has no MPI: only --dp 1 --sp 1)");
#endif
  if (o.batch < 1 || o.batch % o.dp != 0)
    fail("--batch " + std::to_string(o.batch) + " must be a positive multiple of --dp " + std::to_string(o.dp) +
         " (each replica takes batch / dp images a step)");
  if (o.batch > train_images)
    fail("--batch " + std::to_string(o.batch) + " is larger than the " + std::to_string(train_images) +
         " training images");
  if (o.epochs < 1) fail("--epochs must be at least 1");
  if (!(o.lr > 0) || !std::isfinite(o.lr)) fail("--lr must be a positive number");
  if (!(o.momentum >= 0 && o.momentum < 1)) fail("--momentum must be in [0, 1)");
  if (o.dtype != "f32" && o.dtype != "f64") fail("--dtype must be f32 or f64, got " + o.dtype);
  if (o.shape.width < 1 || o.shape.groups < 1 || o.shape.width % o.shape.groups != 0)
    fail("--width " + std::to_string(o.shape.width) + " must be a positive multiple of --groups " +
         std::to_string(o.shape.groups));
  if (o.shape.blocks < 1) fail("--blocks must be at least 1");
}

template <class T>
void run_training(const Options& o, const Digits& data, const std::vector<int>& train_set,
                  const std::vector<int>& test_set, const std::shared_ptr<CountingCommunicator>& world,
                  std::ostream& out, std::ostream* json_file) {
  const Placement place = Placement::of(world->rank(), o.dp, o.sp);
  const int per_replica = o.batch / o.dp;
  Model<T> model(o.shape, place, world, per_replica, o.seed);
  Sgd<T> optimizer(model.gradient_count(), o.momentum);

  const int steps = int(train_set.size()) / o.batch;  // the last partial batch is dropped
  const int test_batches = int((test_set.size() + size_t(o.batch) - 1) / size_t(o.batch));
  const size_t gradients = model.gradient_count();
  std::vector<int> order, images(static_cast<size_t>(per_replica));
  T test_stats[2];

  for (int epoch = 1; epoch <= o.epochs; ++epoch) {
    // The epoch's order depends on the seed and the epoch only; global batch
    // s is order[s*B, (s+1)*B), replica d takes its d-th slice.
    order = train_set;
    Rng(o.seed, 1000 + uint64_t(epoch)).shuffle(order);

    const CountingCommunicator::Counts comm_before = world->counts();
    const uint64_t allocs_before = allocation_count();
    const double start = now_seconds();
    double loss_sum = 0, correct = 0;
    // One step. Collectives: with P > 1, 2 per GroupNorm layer and 1 for the
    // pooling over the spatial group (5 with 2 blocks); with D * P > 1, the
    // bucket's one over the world. Nothing is allocated here.
    for (int s = 0; s < steps; ++s) {
      const size_t first = size_t(s) * size_t(o.batch) + size_t(place.replica) * size_t(per_replica);
      std::copy_n(order.begin() + ptrdiff_t(first), per_replica, images.begin());
      model.load(data, images.data());
      model.forward();
      T* bucket = model.bucket();
      std::fill(bucket, bucket + model.bucket_size(), T(0));
      // Gradients of the mean loss over the global batch: each rank adds
      // d(sum of its losses)/dparams / B, the allreduce adds the ranks up.
      model.loss(T(1) / T(o.batch), bucket + gradients);
      model.backward();
      // The data-parallel sync: one collective a step, all gradients and the
      // loss statistics in one contiguous bucket.
      if (world->size() > 1) world->allreduce_sum(bucket, model.bucket_size());
      loss_sum += double(bucket[gradients]);
      correct += double(bucket[gradients + 1]);
      // Cosine decay of the learning rate from --lr to 0 over the run.
      const double progress = double((epoch - 1) * steps + s) / double(o.epochs * steps);
      optimizer.step(model.segments(), bucket, 0.5 * o.lr * (1 + std::cos(kPi * progress)));
    }
    const double train_seconds = now_seconds() - start;
    const CountingCommunicator::Counts comm_after = world->counts();
    const uint64_t allocs_after = allocation_count();

    // Held-out accuracy, in batches of the training shape (padded at the end).
    test_stats[0] = test_stats[1] = T(0);
    for (int j = 0; j < test_batches; ++j) {
      for (int i = 0; i < per_replica; ++i) {
        const size_t at = size_t(j) * size_t(o.batch) + size_t(place.replica) * size_t(per_replica) + size_t(i);
        images[size_t(i)] = at < test_set.size() ? test_set[at] : -1;
      }
      model.load(data, images.data());
      model.forward();
      model.loss(T(0), test_stats);
    }
    if (world->size() > 1) world->allreduce_sum(test_stats, 2);
    const double eval_seconds = now_seconds() - start - train_seconds;

    if (world->rank() == 0) {
      const double images_seen = double(steps) * o.batch;
      nlohmann::ordered_json line;
      line["epoch"] = epoch;
      line["train_loss"] = loss_sum / images_seen;
      line["train_accuracy"] = correct / images_seen;
      line["test_loss"] = double(test_stats[0]) / double(test_set.size());
      line["test_accuracy"] = double(test_stats[1]) / double(test_set.size());
      line["time_s"] = train_seconds;
      line["eval_s"] = eval_seconds;
      line["steps"] = steps;
      line["step_ms"] = 1e3 * train_seconds / steps;
      line["collectives_per_step"] = double(comm_after.collectives - comm_before.collectives) / steps;
      line["comm_ms_per_step"] = 1e3 * (comm_after.seconds - comm_before.seconds) / steps;
      line["allocations_per_step"] = double(allocs_after - allocs_before) / steps;
      line["dp"] = o.dp;
      line["sp"] = o.sp;
      line["batch"] = o.batch;
      line["dtype"] = o.dtype;
      const std::string text = line.dump();
      out << text << std::endl;
      if (json_file) *json_file << text << std::endl;
    }
  }
}

template void run_training<float>(const Options&, const Digits&, const std::vector<int>&, const std::vector<int>&,
                           const std::shared_ptr<CountingCommunicator>&, std::ostream&, std::ostream*);
template void run_training<double>(const Options&, const Digits&, const std::vector<int>&, const std::vector<int>&,
                            const std::shared_ptr<CountingCommunicator>&, std::ostream&, std::ostream*);

}  // namespace distgn::train
