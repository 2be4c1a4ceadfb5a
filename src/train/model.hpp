// The classifier train_digits trains, one rank's part of it. Every layer but
// the pooling works on each pixel alone, so a rank holding some rows of an
// image needs nothing from the ranks holding the others except the GroupNorm
// statistics (merged by distgn) and the pooled features (one sum):
//
//   x[pixel] = [v, row one-hot (8), column one-hot (8), v * row one-hot, v * column one-hot]
//              with v = intensity / 16: 33 features
//   repeat `blocks` times:  conv 1x1 (channel mixing, with bias) -> distgn GroupNorm -> SiLU
//   pooled = mean over the 64 pixels (sum over the spatial group) -> linear -> logits
//   loss = softmax cross-entropy, averaged over the global batch
//
// Per-pixel layers followed by a pooling cannot tell where a pixel is, so its
// position is part of its input: the one-hots say where it is, their copies
// gated by the intensity let the first convolution weight an intensity by its
// row and column directly (without them only the nonlinearity can). Parameters
// and their gradients are laid out in one flat order (the gradient bucket):
// the model's own weights (conv and head), then each GroupNorm layer's scale
// and bias, then two statistics slots.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "distgn/group_norm.hpp"
#include "train/digits.hpp"

namespace distgn::train {

// Where this rank sits in the D x P grid: world rank w is spatial shard
// p = w % P of data-parallel replica d = w / P and holds rows
// [row_begin, row_begin + rows) of every image of its replica's batch (the 8
// rows split over the P ranks the way numpy.array_split does).
struct Placement {
  int dp = 1, sp = 1;
  int rank = 0, replica = 0, shard = 0;
  int row_begin = 0, rows = Digits::kSide;

  static Placement of(int rank, int dp, int sp);
  // The spatial groups {{0..P-1}, {P..2P-1}, ...}: GroupNorm's axis_index_groups.
  std::vector<std::vector<int>> spatial_groups() const;
};

struct ModelShape {
  int width = 32;   // channels of every block
  int groups = 8;   // GroupNorm num_groups
  int blocks = 2;   // conv 1x1 -> GroupNorm -> SiLU, repeated
};

// A contiguous run of parameters and the offset of its gradient in the bucket.
template <class T>
struct Segment {
  T* param;
  size_t offset;
  size_t count;
};

template <class T>
class Model {
 public:
  static constexpr int kFeatures = 1 + 4 * Digits::kSide;  // see the top of this file

  // Collective over `world` (each GroupNorm splits it into the spatial groups
  // once, here). `batch`: images per replica and step (fixed: every buffer is
  // sized for it once). Same seed, same initial parameters on every rank.
  Model(const ModelShape& shape, const Placement& place, std::shared_ptr<Communicator> world,
        int batch, uint64_t seed);
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  int batch() const { return batch_; }
  // Gradient slots of the bucket (= parameters); two statistics slots follow.
  size_t gradient_count() const { return gradient_count_; }
  size_t bucket_size() const { return bucket_.size(); }
  T* bucket() { return bucket_.data(); }
  // Where every parameter lives (own weights, each GroupNorm's buffer).
  const std::vector<Segment<T>>& segments() const { return segments_; }

  // Puts this rank's rows of images[i] (indices into data; -1: padding,
  // ignored by the loss) in slot i of the batch, i < batch().
  void load(const Digits& data, const int* images);
  // Forward pass to the logits; keeps the activations and each GroupNorm's
  // ForwardState for backward. Collectives: one per GroupNorm and one sum of
  // the pooled features, all over the spatial group (none when P = 1).
  void forward();
  // Softmax cross-entropy of the loaded images: adds the sum of their losses
  // and the number classified right to stats[0], stats[1] on spatial shard 0
  // (the logits are the same on every rank of a spatial group, so one rank
  // speaks for them) and keeps grad_scale * dloss/dlogits for backward.
  void loss(T grad_scale, T* stats);
  // Adds this rank's part of the gradient of grad_scale * (sum of losses) to
  // the bucket (zeroed by the caller). One collective per GroupNorm, over
  // the spatial group (none when P = 1).
  void backward();

 private:
  struct Block {
    Block(int in, int width, const GroupNormConfig& config, std::shared_ptr<Communicator> world);
    int in;
    size_t weight = 0, bias = 0;  // offsets in params_ (and the bucket)
    size_t norm_grad = 0;         // offset of [dscale, dbias] in the bucket
    GroupNorm norm;
    ForwardState state;           // forward's, handed to backward; kept across steps
    std::vector<T> z, y, s, a;    // conv output, GroupNorm output, sigmoid(y), SiLU output
    TensorView z_view, y_view, dscale_view, dbias_view;
  };

  ModelShape shape_;
  Placement place_;
  std::shared_ptr<Communicator> world_;
  int batch_;
  int64_t pixels_;  // batch x rows x 8: the rows of pixels this rank holds
  size_t own_count_ = 0, head_weight_ = 0, head_bias_ = 0, gradient_count_ = 0;
  std::vector<T> params_;  // conv and head weights (GroupNorm's live in the layers)
  std::vector<Block> blocks_;
  std::vector<Segment<T>> segments_;
  std::vector<T> bucket_;
  std::vector<int> labels_;  // of the loaded images, -1 for padding
  // Workspace, allocated once: input, pooled features, logits and gradients.
  std::vector<T> x_, pooled_, logits_, dlogits_, dpooled_, da_, dy_, dz_, wt_;
  TensorView dy_view_, dz_view_;
};

}  // namespace distgn::train
