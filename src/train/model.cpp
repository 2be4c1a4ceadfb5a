#include "train/model.hpp"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "distgn/array_split.hpp"
#include "train/rng.hpp"

namespace distgn::train {
namespace {

template <class T>
constexpr DType dtype_of() {
  return std::is_same_v<T, double> ? DType::f64 : DType::f32;
}

// z[m, :] = b + x[m, :] w for m < rows; x is [rows, in], w is [in, out].
// Zero inputs (most of the one-hot) are skipped: exact, and fast.
template <class T>
void conv1x1(const T* x, int64_t rows, int in, const T* w, const T* b, int out, T* z) {
  for (int64_t m = 0; m < rows; ++m) {
    T* zm = z + m * out;
    std::copy(b, b + out, zm);
    const T* xm = x + m * in;
    for (int f = 0; f < in; ++f) {
      const T v = xm[f];
      if (v == T(0)) continue;
      const T* wf = w + size_t(f) * size_t(out);
      for (int c = 0; c < out; ++c) zm[c] += v * wf[c];
    }
  }
}

// dw += x^T dz, db += sum over rows of dz.
template <class T>
void conv1x1_param_grad(const T* x, const T* dz, int64_t rows, int in, int out, T* dw, T* db) {
  for (int64_t m = 0; m < rows; ++m) {
    const T* dzm = dz + m * out;
    for (int c = 0; c < out; ++c) db[c] += dzm[c];
    const T* xm = x + m * in;
    for (int f = 0; f < in; ++f) {
      const T v = xm[f];
      if (v == T(0)) continue;
      T* dwf = dw + size_t(f) * size_t(out);
      for (int c = 0; c < out; ++c) dwf[c] += v * dzm[c];
    }
  }
}

// dx = dz w^T, with wt = w^T ([out, in]) so that the inner loop runs over
// contiguous memory (an ordered dot product would not vectorise).
template <class T>
void conv1x1_input_grad(const T* dz, int64_t rows, int in, int out, const T* wt, T* dx) {
  for (int64_t m = 0; m < rows; ++m) {
    const T* dzm = dz + m * out;
    T* dxm = dx + m * in;
    std::fill(dxm, dxm + in, T(0));
    for (int c = 0; c < out; ++c) {
      const T v = dzm[c];
      const T* wc = wt + size_t(c) * size_t(in);
      for (int f = 0; f < in; ++f) dxm[f] += v * wc[f];
    }
  }
}

template <class T>
T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

}  // namespace

Placement Placement::of(int rank, int dp, int sp) {
  Placement p;
  p.dp = dp;
  p.sp = sp;
  p.rank = rank;
  p.replica = rank / sp;
  p.shard = rank % sp;
  const SplitRange rows = array_split_range(Digits::kSide, sp, p.shard);
  p.rows = int(rows.size());
  p.row_begin = int(rows.begin);
  return p;
}

std::vector<std::vector<int>> Placement::spatial_groups() const {
  std::vector<std::vector<int>> groups(static_cast<size_t>(dp));
  for (int d = 0; d < dp; ++d)
    for (int s = 0; s < sp; ++s) groups[size_t(d)].push_back(d * sp + s);
  return groups;
}

template <class T>
Model<T>::Block::Block(int in_, int width, const GroupNormConfig& config,
                       std::shared_ptr<Communicator> world)
    : in(in_), norm(config, std::move(world)) {
  norm.init_parameters(width);  // scale = 1, bias = 0 (Flax's initialisers)
}

template <class T>
Model<T>::Model(const ModelShape& shape, const Placement& place, std::shared_ptr<Communicator> world,
                int batch, uint64_t seed)
    : shape_(shape),
      place_(place),
      world_(std::move(world)),
      batch_(batch),
      pixels_(int64_t(batch) * place.rows * Digits::kSide) {
  const int width = shape.width;
  const DType dtype = dtype_of<T>();

  // GroupNorm over each image's (rows, columns, channels of a group), its
  // statistics merged over the spatial group: the images' other rows live on
  // the other ranks of this rank's spatial group.
  GroupNormConfig config;
  config.num_groups = shape.groups;
  config.param_dtype = dtype;
  config.axis_index_groups = place.spatial_groups();

  blocks_.reserve(size_t(shape.blocks));
  size_t offset = 0;
  for (int b = 0; b < shape.blocks; ++b) {
    blocks_.emplace_back(b == 0 ? kFeatures : width, width, config, world_);
    Block& block = blocks_.back();
    block.weight = offset;
    block.bias = offset + size_t(block.in) * size_t(width);
    offset = block.bias + size_t(width);
  }
  head_weight_ = offset;
  head_bias_ = offset + size_t(width) * Digits::kClasses;
  own_count_ = head_bias_ + Digits::kClasses;
  for (Block& block : blocks_) {
    if (block.norm.parameter_bytes() != 2 * size_t(width) * sizeof(T))
      throw TrainError("GroupNorm's parameter buffer is not scale then bias");
    block.norm_grad = own_count_ + (&block - blocks_.data()) * 2 * size_t(width);
  }
  gradient_count_ = own_count_ + blocks_.size() * 2 * size_t(width);
  bucket_.assign(gradient_count_ + 2, T(0));

  // LeCun-uniform weights (variance 1 / fan_in), zero biases: the same on
  // every rank, from the seed alone.
  params_.assign(own_count_, T(0));
  Rng rng(seed, /*stream=*/2);
  const auto fill = [&](size_t at, size_t count, int fan_in) {
    const double bound = std::sqrt(3.0 / fan_in);
    for (size_t i = 0; i < count; ++i) params_[at + i] = T((2 * rng.uniform() - 1) * bound);
  };
  for (const Block& block : blocks_) fill(block.weight, size_t(block.in) * size_t(width), block.in);
  fill(head_weight_, size_t(width) * Digits::kClasses, width);

  segments_.push_back({params_.data(), 0, own_count_});
  for (Block& block : blocks_)
    segments_.push_back({static_cast<T*>(block.norm.parameters()), block.norm_grad, 2 * size_t(width)});

  // Every buffer once, for the fixed batch; the views over them once too.
  const Shape act{batch, place.rows, Digits::kSide, width};
  for (Block& block : blocks_) {
    block.z.assign(size_t(pixels_) * width, T(0));
    block.y.assign(size_t(pixels_) * width, T(0));
    block.s.assign(size_t(pixels_) * width, T(0));
    block.a.assign(size_t(pixels_) * width, T(0));
    block.z_view = {block.z.data(), act, dtype};
    block.y_view = {block.y.data(), act, dtype};
    block.dscale_view = {bucket_.data() + block.norm_grad, {width}, dtype};
    block.dbias_view = {bucket_.data() + block.norm_grad + width, {width}, dtype};
  }
  da_.assign(size_t(pixels_) * width, T(0));
  dy_.assign(size_t(pixels_) * width, T(0));
  dz_.assign(size_t(pixels_) * width, T(0));
  wt_.assign(size_t(width) * size_t(std::max(width, int(kFeatures))), T(0));
  dy_view_ = {dy_.data(), act, dtype};
  dz_view_ = {dz_.data(), act, dtype};
  pooled_.assign(size_t(batch) * width, T(0));
  dpooled_.assign(size_t(batch) * width, T(0));
  logits_.assign(size_t(batch) * Digits::kClasses, T(0));
  dlogits_.assign(size_t(batch) * Digits::kClasses, T(0));
  labels_.assign(size_t(batch), -1);

  // The input: the position one-hots never change, load() writes the rest.
  x_.assign(size_t(pixels_) * kFeatures, T(0));
  for (int i = 0; i < batch; ++i)
    for (int r = 0; r < place.rows; ++r)
      for (int c = 0; c < Digits::kSide; ++c) {
        T* x = &x_[size_t(((int64_t(i) * place.rows + r) * Digits::kSide + c) * kFeatures)];
        x[1 + place.row_begin + r] = T(1);
        x[1 + Digits::kSide + c] = T(1);
      }
}

template <class T>
void Model<T>::load(const Digits& data, const int* images) {
  for (int i = 0; i < batch_; ++i) {
    const int image = images[i];
    labels_[size_t(i)] = image < 0 ? -1 : data.labels[size_t(image)];
    for (int r = 0; r < place_.rows; ++r)
      for (int c = 0; c < Digits::kSide; ++c) {
        const int row = place_.row_begin + r;
        T* x = &x_[size_t(((int64_t(i) * place_.rows + r) * Digits::kSide + c) * kFeatures)];
        const T v = image < 0 ? T(0)
                              : T(data.pixels[size_t(image) * Digits::kPixels + size_t(row * Digits::kSide + c)]) /
                                    T(Digits::kMaxValue);
        x[0] = v;
        x[1 + 2 * Digits::kSide + row] = v;
        x[1 + 3 * Digits::kSide + c] = v;
      }
  }
}

template <class T>
void Model<T>::forward() {
  const int width = shape_.width;
  const size_t activations = size_t(pixels_) * size_t(width);
  const T* in = x_.data();
  for (Block& block : blocks_) {
    conv1x1(in, pixels_, block.in, &params_[block.weight], &params_[block.bias], width, block.z.data());
    block.norm.forward(block.z_view, block.y_view, nullptr, &block.state);
    for (size_t i = 0; i < activations; ++i) {
      block.s[i] = sigmoid(block.y[i]);
      block.a[i] = block.y[i] * block.s[i];
    }
    in = block.a.data();
  }

  // Global average pool: this rank's pixels summed, then the sum over the
  // spatial group. The layer's group communicator is exactly that group.
  const int64_t per_image = int64_t(place_.rows) * Digits::kSide;
  std::fill(pooled_.begin(), pooled_.end(), T(0));
  for (int i = 0; i < batch_; ++i)
    for (int64_t q = 0; q < per_image; ++q) {
      const T* a = in + (i * per_image + q) * width;
      T* p = &pooled_[size_t(i) * width];
      for (int c = 0; c < width; ++c) p[c] += a[c];
    }
  Communicator& group = blocks_.front().norm.group_communicator();
  if (group.size() > 1) group.allreduce_sum(pooled_.data(), pooled_.size());
  for (T& p : pooled_) p /= T(Digits::kPixels);

  const T* w = &params_[head_weight_];
  const T* b = &params_[head_bias_];
  for (int i = 0; i < batch_; ++i)
    for (int k = 0; k < Digits::kClasses; ++k) {
      T s = b[k];
      for (int c = 0; c < width; ++c) s += pooled_[size_t(i) * width + c] * w[size_t(c) * Digits::kClasses + k];
      logits_[size_t(i) * Digits::kClasses + k] = s;
    }
}

template <class T>
void Model<T>::loss(T grad_scale, T* stats) {
  const int K = Digits::kClasses;
  for (int i = 0; i < batch_; ++i) {
    const T* l = &logits_[size_t(i) * K];
    T* dl = &dlogits_[size_t(i) * K];
    const int label = labels_[size_t(i)];
    if (label < 0) {
      std::fill(dl, dl + K, T(0));
      continue;
    }
    int best = 0;
    for (int k = 1; k < K; ++k)
      if (l[k] > l[best]) best = k;
    T sum = 0;
    for (int k = 0; k < K; ++k) sum += std::exp(l[k] - l[best]);
    const T log_sum = l[best] + std::log(sum);
    for (int k = 0; k < K; ++k) dl[k] = grad_scale * (std::exp(l[k] - log_sum) - (k == label ? T(1) : T(0)));
    if (place_.shard == 0) {
      stats[0] += log_sum - l[label];
      stats[1] += best == label ? T(1) : T(0);
    }
  }
}

template <class T>
void Model<T>::backward() {
  const int width = shape_.width, K = Digits::kClasses;
  T* grad = bucket_.data();
  const T* w = &params_[head_weight_];

  // Head. Every rank of a spatial group holds the same pooled features and
  // logits, so the head's gradient is counted on shard 0 alone (the bucket is
  // summed over all ranks); the pooled features' gradient is needed by all.
  for (int i = 0; i < batch_; ++i) {
    const T* dl = &dlogits_[size_t(i) * K];
    const T* p = &pooled_[size_t(i) * width];
    if (place_.shard == 0) {
      for (int c = 0; c < width; ++c)
        for (int k = 0; k < K; ++k) grad[head_weight_ + size_t(c) * K + k] += p[c] * dl[k];
      for (int k = 0; k < K; ++k) grad[head_bias_ + k] += dl[k];
    }
    for (int c = 0; c < width; ++c) {
      T s = 0;
      for (int k = 0; k < K; ++k) s += dl[k] * w[size_t(c) * K + k];
      dpooled_[size_t(i) * width + c] = s / T(Digits::kPixels);
    }
  }
  // Pooling: every pixel of image i gets dpooled[i] (no collective: each rank
  // already has the gradient for its own pixels).
  const int64_t per_image = int64_t(place_.rows) * Digits::kSide;
  for (int i = 0; i < batch_; ++i)
    for (int64_t q = 0; q < per_image; ++q)
      std::copy_n(&dpooled_[size_t(i) * width], width, &da_[size_t((i * per_image + q) * width)]);

  const size_t activations = size_t(pixels_) * size_t(width);
  for (size_t b = blocks_.size(); b-- > 0;) {
    Block& block = blocks_[b];
    for (size_t i = 0; i < activations; ++i) {
      const T y = block.y[i], s = block.s[i];
      dy_[i] = da_[i] * s * (T(1) + y * (T(1) - s));
    }
    // dscale/dbias: this rank's partial sums (ParamGradReduction::local),
    // written straight into their slots of the bucket. The bucket's one
    // allreduce over the world then sums them with every other gradient.
    // (::all would add a collective per layer, ::group would be summed
    // again by the bucket and so counted P times.)
    block.norm.backward(block.z_view, dy_view_, nullptr, block.state, dz_view_, &block.dscale_view,
                        &block.dbias_view, ParamGradReduction::local);
    const T* in = b == 0 ? x_.data() : blocks_[b - 1].a.data();
    conv1x1_param_grad(in, dz_.data(), pixels_, block.in, width, grad + block.weight, grad + block.bias);
    if (b > 0) {
      const T* w = &params_[block.weight];
      for (int f = 0; f < block.in; ++f)
        for (int c = 0; c < width; ++c) wt_[size_t(c) * block.in + f] = w[size_t(f) * width + c];
      conv1x1_input_grad(dz_.data(), pixels_, block.in, width, wt_.data(), da_.data());
    }
  }
}

template class Model<float>;
template class Model<double>;

}  // namespace distgn::train
