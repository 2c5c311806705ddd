// Building blocks shared by the UNet and the VAE, each a libtorch module registered under diffusers' names:
// GroupNorm (asks the forward context for a NormHook), Attention (diffusers' `Attention` + processor call),
// ResnetBlock2D, Downsample2D, Upsample2D, the sinusoidal timestep embedding, TimestepEmbedding, and the
// transformer stack (BasicTransformerBlock, Transformer2DModel) of the UNet.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "internal/onednn.h"
#include "stylealigned/attention.h"
#include "stylealigned/batch_layout.h"

namespace stylealigned::models::layers {

/// What one forward pass carries down the blocks; owned by the caller of the model's forward.
struct ForwardContext {
  const BatchLayout& layout;
  /// Processors by layer name; null: every attention uses the default processor (the VAE).
  const ProcessorMap* processors = nullptr;
  /// Replaces every GroupNorm when set (StyleAligned's shared GroupNorm).
  NormHook* norm_hook = nullptr;
};

/// A module with no parameters that holds a place in a ModuleList (diffusers' Dropout at `to_out.1`, `ff.net.1`),
/// so the indices of the following children match the checkpoint's names.
class PlaceholderImpl : public torch::nn::Module {
 public:
  PlaceholderImpl() : torch::nn::Module("Dropout") {}
};
TORCH_MODULE(Placeholder);

// Linear, Conv2d and LayerNorm are our own minimal modules rather than torch::nn's: they compute the same ATen ops
// (at::linear, at::conv2d, at::layer_norm) with the same parameter names and default initialisation, but can be built
// without initialising (or even allocating) their weights, which from_pretrained relies on (see
// PlaceholderParametersGuard): torch::nn's constructors always allocate and randomise.

/// nn.Linear: `weight` [out, in], optional `bias` [out].
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, bool bias);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  at::Tensor bias;
};
TORCH_MODULE(Linear);

/// nn.Conv2d with square kernel, stride and zero padding: `weight` [out, in, k, k], `bias` [out].
class Conv2dImpl : public torch::nn::Module {
 public:
  Conv2dImpl(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride, int64_t padding);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  at::Tensor bias;

 private:
  int64_t stride_;
  int64_t padding_;
  ::stylealigned::detail::onednn::PackedConvWeights packed_;
};
TORCH_MODULE(Conv2d);

/// nn.LayerNorm over the last dimension with affine `weight` and `bias`.
class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  at::Tensor bias;

 private:
  int64_t dim_;
  double eps_;
};
TORCH_MODULE(LayerNorm);

/// nn.GroupNorm with affine parameters `weight`/`bias`, routed through the context's NormHook when one is set.
class GroupNormImpl : public torch::nn::Module {
 public:
  GroupNormImpl(int64_t groups, int64_t channels, double eps);
  at::Tensor forward(const at::Tensor& x, const ForwardContext& ctx);

  int64_t groups;
  int64_t channels;
  double eps;
  at::Tensor weight;
  at::Tensor bias;
};
TORCH_MODULE(GroupNorm);

/// Construction arguments of diffusers' `Attention` that our models use.
struct AttentionSpec {
  int64_t query_dim = 0;
  int64_t cross_attention_dim = 0;  ///< 0: self-attention (keys from the queries' input)
  int64_t heads = 8;
  int64_t dim_head = 64;
  bool bias = false;     ///< to_q/to_k/to_v bias
  bool out_bias = true;  ///< to_out.0 bias
  bool upcast_attention = false;
  int64_t norm_num_groups = 0;  ///< > 0: a `group_norm` before the projections (VAE mid-block attention)
  double eps = 1e-5;            ///< of group_norm
  bool residual_connection = false;
  double rescale_output_factor = 1.0;
  /// Register the projections as query/key/value/proj_attn: the names of diffusers' deprecated AttentionBlock,
  /// which VAE checkpoints written before 2023 (SD1.x's among them) still use.
  bool legacy_names = false;
};

/// diffusers' `Attention`: holds to_q, to_k, to_v, to_out.0 (and group_norm) and delegates the attention itself to
/// the processor registered under its layer name, with q, k, v split into contiguous head blocks [B, H, N, d].
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(std::string layer_name, const AttentionSpec& spec);

  /// x: [B, N, query_dim] or [B, C, H, W] (flattened to tokens and restored, as AttnProcessor2_0 does);
  /// context: [B, M, cross_attention_dim] for cross-attention, undefined for self-attention.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context, const ForwardContext& ctx);

  const std::string& layer_name() const { return layer_name_; }
  AttentionKind kind() const { return kind_; }

  Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
  torch::nn::ModuleList to_out{nullptr};  ///< [out_proj, Dropout]; unset with legacy names
  Linear out_proj{nullptr};               ///< to_out.0 (proj_attn with legacy names)
  GroupNorm group_norm{nullptr};

 private:
  std::string layer_name_;
  AttentionKind kind_;
  AttentionSpec spec_;
  double scale_;
};
TORCH_MODULE(Attention);

/// diffusers' GEGLU: proj to 2x width, first half times gelu(second half).
class GEGLUImpl : public torch::nn::Module {
 public:
  GEGLUImpl(int64_t dim_in, int64_t dim_out);
  at::Tensor forward(const at::Tensor& x);
  Linear proj{nullptr};
};
TORCH_MODULE(GEGLU);

/// diffusers' FeedForward with the "geglu" activation: net = [GEGLU, Dropout, Linear].
class FeedForwardImpl : public torch::nn::Module {
 public:
  FeedForwardImpl(int64_t dim, int64_t mult = 4);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::ModuleList net{nullptr};
  GEGLU geglu{nullptr};
  Linear out{nullptr};
};
TORCH_MODULE(FeedForward);

/// diffusers' BasicTransformerBlock (norm_type "layer_norm"): self-attention, cross-attention, GEGLU feed-forward,
/// each pre-normalised with a LayerNorm and added to the residual stream.
class BasicTransformerBlockImpl : public torch::nn::Module {
 public:
  BasicTransformerBlockImpl(const std::string& prefix, int64_t dim, int64_t heads, int64_t dim_head,
                            int64_t cross_attention_dim, bool upcast_attention);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context, const ForwardContext& ctx);

  LayerNorm norm1{nullptr}, norm2{nullptr}, norm3{nullptr};
  Attention attn1{nullptr}, attn2{nullptr};
  FeedForward ff{nullptr};
};
TORCH_MODULE(BasicTransformerBlock);

struct Transformer2DSpec {
  int64_t heads = 8;
  int64_t dim_head = 64;
  int64_t in_channels = 0;
  int64_t num_layers = 1;
  int64_t cross_attention_dim = 0;
  int64_t norm_num_groups = 32;
  bool use_linear_projection = false;
  bool upcast_attention = false;
};

/// diffusers' Transformer2DModel for continuous input: GroupNorm, proj_in (1x1 conv or linear), transformer
/// blocks over the H*W tokens, proj_out, residual.
class Transformer2DModelImpl : public torch::nn::Module {
 public:
  /// `prefix` is the module path, e.g. "down_blocks.1.attentions.0"; attention layers are named below it.
  Transformer2DModelImpl(const std::string& prefix, const Transformer2DSpec& spec);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context, const ForwardContext& ctx);
  /// Names of attn1/attn2 of every block, in order.
  std::vector<std::string> attention_layer_names() const;

  GroupNorm norm{nullptr};
  // proj_in / proj_out: 1x1 convs, or Linears with use_linear_projection (only one pair is set and registered).
  Conv2d proj_in_conv{nullptr}, proj_out_conv{nullptr};
  Linear proj_in_linear{nullptr}, proj_out_linear{nullptr};
  torch::nn::ModuleList transformer_blocks{nullptr};
  std::vector<BasicTransformerBlock> blocks;

 private:
  Transformer2DSpec spec_;
};
TORCH_MODULE(Transformer2DModel);

/// diffusers' ResnetBlock2D with time_embedding_norm "default" (temb added after conv1) and SiLU.
class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  /// temb_channels 0: no time embedding (VAE).
  ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t groups, double eps,
                    double output_scale_factor = 1.0);
  /// temb: [B, temb_channels] (undefined when temb_channels is 0).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const ForwardContext& ctx);

  GroupNorm norm1{nullptr}, norm2{nullptr};
  Conv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};
  Linear time_emb_proj{nullptr};

 private:
  double output_scale_factor_;
};
TORCH_MODULE(ResnetBlock2D);

/// diffusers' Downsample2D with a stride-2 3x3 conv. padding 0 means: pad right and bottom by one first (VAE).
class Downsample2DImpl : public torch::nn::Module {
 public:
  Downsample2DImpl(int64_t channels, int64_t out_channels, int64_t padding);
  at::Tensor forward(const at::Tensor& x);
  Conv2d conv{nullptr};

 private:
  int64_t padding_;
};
TORCH_MODULE(Downsample2D);

/// diffusers' Upsample2D: nearest x2 (or to an explicit size, which the UNet passes for odd sizes), then 3x3 conv.
class Upsample2DImpl : public torch::nn::Module {
 public:
  Upsample2DImpl(int64_t channels, int64_t out_channels);
  at::Tensor forward(const at::Tensor& x, std::optional<std::vector<int64_t>> output_size = std::nullopt);
  Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

/// diffusers' get_timestep_embedding: float32 [N, dim] sinusoids of `timesteps` [N] (the same op sequence as
/// diffusers, so the numbers match).
at::Tensor timestep_embedding(const at::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                              double downscale_freq_shift, double scale = 1.0, double max_period = 10000.0);

/// diffusers' TimestepEmbedding: linear_1, SiLU, linear_2.
class TimestepEmbeddingImpl : public torch::nn::Module {
 public:
  TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim);
  at::Tensor forward(const at::Tensor& x);
  Linear linear_1{nullptr}, linear_2{nullptr};
};
TORCH_MODULE(TimestepEmbedding);

/// A 2-D conv with "same" padding for odd kernels, bias on.
Conv2d make_conv(int64_t in, int64_t out, int64_t kernel, int64_t stride = 1, int64_t padding = -1);
Linear make_linear(int64_t in, int64_t out, bool bias);
LayerNorm make_layer_norm(int64_t dim, double eps);

/// While alive, modules built on this thread get placeholder parameters (one stored element broadcast to the
/// right shape) instead of random ones. from_pretrained builds under it because the checkpoint replaces every
/// parameter anyway: a model of several GB then costs neither memory nor initialisation time before its weights
/// arrive.
class PlaceholderParametersGuard {
 public:
  PlaceholderParametersGuard();
  ~PlaceholderParametersGuard();
  PlaceholderParametersGuard(const PlaceholderParametersGuard&) = delete;
  PlaceholderParametersGuard& operator=(const PlaceholderParametersGuard&) = delete;

 private:
  bool previous_;
};
/// A parameter of `shape`: a placeholder under PlaceholderParametersGuard, else `fill` applied to a new tensor.
at::Tensor new_parameter(at::IntArrayRef shape, const std::function<void(at::Tensor&)>& fill);

}  // namespace stylealigned::models::layers
