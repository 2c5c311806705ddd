// stylealigned/models/vit.h: transformers' ViTModel without pooler, the DINO evaluator (facebook/dino-vitb8).
//
// Children carry the transformers names (`embeddings.patch_embeddings.projection.weight`,
// `encoder.layer.3.attention.attention.query.weight`, `layernorm.weight`), so a ViTModel `model.safetensors` loads
// 1:1. The DINO embedding of a picture is the class token of last_hidden_state (after the final LayerNorm).
//
//   auto dino = stylealigned::models::ViTModel::from_pretrained(dino_dir);
//   at::Tensor cls = dino->forward(pixel_values).cls_embeds();   // [B, hidden]
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "stylealigned/models/loading.h"

namespace stylealigned::models {

/// The fields of transformers' `ViTConfig` that change the computation (defaults are transformers').
struct ViTConfig {
  int64_t hidden_size = 768;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t intermediate_size = 3072;
  /// "gelu" (exact, DINO), "gelu_new" / "gelu_pytorch_tanh", "quick_gelu" or "relu".
  std::string hidden_act = "gelu";
  /// The facebook/dino-vit* configs say 1e-12 (ViTConfig's default); read it from the file, do not assume DINO's 1e-6.
  double layer_norm_eps = 1e-12;
  int64_t image_size = 224;
  int64_t patch_size = 16;
  int64_t num_channels = 3;
  bool qkv_bias = true;

  /// Reads a transformers `config.json`; `model_type` must be "vit". Missing keys take the defaults above.
  /// Throws stylealigned::Error naming the file and key for a wrong model type or a bad value.
  static ViTConfig from_file(const std::filesystem::path& config_json);
  /// Throws stylealigned::Error naming the offending field.
  void validate() const;
};

struct ViTOutput {
  at::Tensor last_hidden_state;  ///< [B, 1 + patches, hidden], after the final `layernorm`
  /// num_hidden_layers + 1 entries when requested: [0] the embeddings' output, [i] the output of layer i.
  std::vector<at::Tensor> hidden_states;
  /// The class token of last_hidden_state: [B, hidden] (the DINO image embedding).
  at::Tensor cls_embeds() const { return last_hidden_state.select(1, 0); }
};

namespace detail {
class ViTEmbeddingsImpl;
class ViTEncoderImpl;
}  // namespace detail

/// transformers' ViTModel(add_pooling_layer=False). Inference only is intended (dropout is not modelled).
class ViTModelImpl : public torch::nn::Module {
 public:
  /// Random weights when `initialize`; otherwise parameters are allocated but not written (for from_pretrained).
  explicit ViTModelImpl(const ViTConfig& config, bool initialize = true);

  /// pixel_values: float [B, num_channels, image_size, image_size] (what ImageProcessor gives). Throws
  /// stylealigned::Error for another shape: like transformers without interpolate_pos_encoding, the position
  /// embeddings are not resized.
  ViTOutput forward(const at::Tensor& pixel_values, bool output_hidden_states = false);

  /// Builds from `<folder>/config.json` and loads `<folder>/model.safetensors` (or its fp16 / sharded variants). A
  /// checkpoint's `pooler.*` tensors are ignored. Throws stylealigned::Error for a missing folder, a config whose
  /// model_type is not "vit", and any missing or mis-shaped tensor.
  static std::shared_ptr<ViTModelImpl> from_pretrained(const std::filesystem::path& folder,
                                                       const LoadOptions& options = {});

  const ViTConfig& config() const { return config_; }

 private:
  ViTConfig config_;
  std::shared_ptr<detail::ViTEmbeddingsImpl> embeddings_;
  std::shared_ptr<detail::ViTEncoderImpl> encoder_;
  std::shared_ptr<torch::nn::Module> layernorm_;
};

class ViTModel : public torch::nn::ModuleHolder<ViTModelImpl> {
 public:
  using torch::nn::ModuleHolder<ViTModelImpl>::ModuleHolder;
  static ViTModel from_pretrained(const std::filesystem::path& folder, const LoadOptions& options = {}) {
    return ViTModel(ViTModelImpl::from_pretrained(folder, options));
  }
};

}  // namespace stylealigned::models
