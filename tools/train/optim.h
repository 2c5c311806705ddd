// AdamW, gradient clipping and an exponential moving average of weights, over named parameters.
//
// Written here rather than taken from torch::optim so that the optimizer state is a plain list of named tensors: it
// goes into the same safetensors checkpoint as the weights (one atomic file per stage), on any device.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace stylealigned::train {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  /// Decoupled weight decay, applied to matrices and convolution kernels only (not to biases, norms, embeddings'
  /// 1-D tensors), as most diffusion trainers do.
  double weight_decay = 1e-2;
};

/// torch.optim.AdamW's update (bias-corrected moments, decoupled decay) with the learning rate given per step.
class AdamW {
 public:
  AdamW(NamedTensors params, AdamWOptions options);
  /// One update from the parameters' .grad() (parameters without a gradient are skipped).
  void step(double lr);
  void zero_grad();
  int64_t steps() const { return steps_; }
  /// "adam.m.<name>", "adam.v.<name>" and "adam.steps" (int64 scalar).
  NamedTensors state() const;
  /// Restores what state() wrote; throws stylealigned::Error naming a missing or mis-shaped tensor.
  void load_state(const std::map<std::string, at::Tensor>& tensors);
  const NamedTensors& params() const { return params_; }

 private:
  NamedTensors params_;
  AdamWOptions options_;
  std::vector<at::Tensor> m_, v_;
  std::vector<bool> decay_;
  int64_t steps_ = 0;
};

/// Scales every gradient so their joint L2 norm is at most `max_norm` (no-op when max_norm <= 0); returns the norm
/// before clipping.
double clip_grad_norm(const NamedTensors& params, double max_norm);

/// Shadow weights w_ema <- d w_ema + (1 - d) w with d = min(decay, (1 + n) / (10 + n)) at update n (the usual
/// warm-up, so early weights do not linger).
class Ema {
 public:
  Ema(const NamedTensors& params, double decay);
  void update(const NamedTensors& params);
  /// "ema.<name>" and "ema.updates".
  NamedTensors state() const;
  void load_state(const std::map<std::string, at::Tensor>& tensors);
  /// The shadow weight of parameter `name` (throws if unknown).
  const at::Tensor& weight(const std::string& name) const;
  /// Swaps the shadow weights into `params` and back (used to validate the EMA weights in place).
  void swap_into(const NamedTensors& params);

 private:
  double decay_;
  int64_t updates_ = 0;
  NamedTensors shadow_;
};

}  // namespace stylealigned::train
