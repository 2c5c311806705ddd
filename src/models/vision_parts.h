// Building blocks of the evaluation vision transformers (CLIP's vision tower, ViT/DINO): Linear, LayerNorm and the
// patch-embedding convolution with libtorch's parameter names, constructible without initialising their weights
// (from_pretrained overwrites every tensor, and random init of a ViT-B would cost time and touch a second copy of
// the weights), plus the transformers activations.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/modules/container/modulelist.h>

namespace stylealigned::models::vision_parts {

/// Allocates (and, when `initialize`, fills from N(0, std)) a float32 tensor.
at::Tensor new_weight(at::IntArrayRef shape, bool initialize, double std = 0.02, double fill = 0.0);

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias, bool initialize);
  at::Tensor forward(const at::Tensor& x) const { return at::linear(x, weight_, bias_); }

 private:
  at::Tensor weight_, bias_;
};

class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t n, double eps, bool initialize);
  at::Tensor forward(const at::Tensor& x) const { return at::layer_norm(x, {weight_.size(0)}, weight_, bias_, eps_); }

 private:
  double eps_;
  at::Tensor weight_, bias_;
};

/// Conv2d with kernel = stride = patch: [B, C, H, W] -> [B, hidden, H / patch, W / patch].
class PatchConvImpl : public torch::nn::Module {
 public:
  PatchConvImpl(int64_t channels, int64_t hidden, int64_t patch, bool bias, bool initialize);
  at::Tensor forward(const at::Tensor& x) const;

 private:
  int64_t patch_;
  at::Tensor weight_, bias_;
};

/// A transformer's stack of `count` layers, registered as `list_name.0`, `list_name.1`, ... (transformers'
/// nn.ModuleList: CLIP calls it "layers", ViT "layer"). forward() runs them in order and, when asked, records the
/// hidden state before each layer and after the last (transformers' output_hidden_states).
template <class Layer>
class LayerStackImpl : public torch::nn::Module {
 public:
  template <class... LayerArgs>
  LayerStackImpl(const std::string& list_name, int64_t count, const LayerArgs&... layer_args) {
    auto list = register_module(list_name, torch::nn::ModuleList());
    for (int64_t i = 0; i < count; ++i) {
      layers_.push_back(std::make_shared<Layer>(layer_args...));
      list->push_back(layers_.back());
    }
  }
  at::Tensor forward(at::Tensor h, std::vector<at::Tensor>* hidden_states) const {
    for (const auto& layer : layers_) {
      if (hidden_states) hidden_states->push_back(h);
      h = layer->forward(h);
    }
    if (hidden_states) hidden_states->push_back(h);
    return h;
  }

 private:
  std::vector<std::shared_ptr<Layer>> layers_;
};

/// True for the activations transformers' ACT2FN maps and activate() computes.
bool known_activation(const std::string& name);
/// quick_gelu, gelu (exact erf), gelu_new / gelu_pytorch_tanh (tanh approximation), relu.
at::Tensor activate(const std::string& name, const at::Tensor& x);

/// softmax(q kᵀ · scale) v over [B, T, C] inputs split into `heads`; returns [B, T, C]. Uses the library's exact,
/// memory-bounded attention kernel.
at::Tensor multi_head_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads);

}  // namespace stylealigned::models::vision_parts
