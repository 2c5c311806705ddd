// stylealigned/models/clip.h: transformers' CLIPModel (vision tower, text tower, both projections, logit scale), the
// text-alignment evaluator (openai/clip-vit-*).
//
// Children carry the transformers names (`vision_model.pre_layrnorm.weight` — sic —, `visual_projection.weight`,
// `text_model.encoder.layers.0.self_attn.q_proj.weight`, `text_projection.weight`, `logit_scale`), so a CLIPModel
// `model.safetensors` loads 1:1. The text tower is our CLIPTextModel (models/clip_text.h).
//
//   auto clip = stylealigned::models::CLIPModel::from_pretrained(clip_dir);
//   at::Tensor image = clip->get_image_features(pixel_values);   // [B, projection_dim], not normalised
//   at::Tensor text = clip->get_text_features(input_ids);        // [B, projection_dim], not normalised
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "stylealigned/models/clip_text.h"
#include "stylealigned/models/loading.h"

namespace stylealigned::models {

/// The fields of transformers' `CLIPVisionConfig` that change the computation (defaults are transformers').
struct CLIPVisionConfig {
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t num_channels = 3;
  int64_t image_size = 224;
  int64_t patch_size = 32;
  std::string hidden_act = "quick_gelu";
  double layer_norm_eps = 1e-5;

  /// Throws stylealigned::Error naming the offending field.
  void validate() const;
};

/// transformers' `CLIPConfig`: both towers and the shared projection size.
struct CLIPConfig {
  /// The text tower; `with_projection` is always true and `projection_dim` is the model's. Where config.json omits
  /// `text_config.eos_token_id`, transformers' CLIPTextConfig default 2 applies (pooling at argmax(input_ids)).
  CLIPTextConfig text;
  CLIPVisionConfig vision;
  int64_t projection_dim = 512;

  /// Reads a transformers `config.json` (`text_config`, `vision_config`, and the legacy `text_config_dict` /
  /// `vision_config_dict`, which win where both are present, as in transformers). `model_type` must be "clip".
  /// Throws stylealigned::Error naming the file and key for a wrong model type or a bad value.
  static CLIPConfig from_file(const std::filesystem::path& config_json);
  void validate() const;
};

/// transformers' BaseModelOutputWithPooling of the vision tower, plus the projection.
struct CLIPVisionOutput {
  at::Tensor last_hidden_state;  ///< [B, 1 + patches, hidden]: encoder output (no post_layernorm)
  at::Tensor pooler_output;      ///< [B, hidden]: post_layernorm(last_hidden_state[:, 0])
  at::Tensor image_embeds;       ///< [B, projection_dim]: visual_projection(pooler_output), not normalised
  /// num_hidden_layers + 1 entries when requested: [0] after pre_layrnorm, [i] after encoder layer i.
  std::vector<at::Tensor> hidden_states;
};

namespace detail {
class CLIPVisionTransformerImpl;
}  // namespace detail

/// transformers' CLIPModel. Inference only is intended (dropout is not modelled).
class CLIPModelImpl : public torch::nn::Module {
 public:
  /// Random weights when `initialize`; otherwise parameters are allocated but not written (for from_pretrained).
  explicit CLIPModelImpl(const CLIPConfig& config, bool initialize = true);

  /// pixel_values: float [B, num_channels, image_size, image_size]. Throws stylealigned::Error for another shape.
  CLIPVisionOutput encode_image(const at::Tensor& pixel_values, bool output_hidden_states = false);
  /// The text tower (CLIPTextModel with text_projection): `text_embeds` is the projected pooled output.
  CLIPTextOutput encode_text(const at::Tensor& input_ids, const CLIPTextForwardOptions& options = {});

  /// transformers' get_image_features / get_text_features: projected, not normalised.
  at::Tensor get_image_features(const at::Tensor& pixel_values);
  at::Tensor get_text_features(const at::Tensor& input_ids, const at::Tensor& attention_mask = {});

  /// The CLIPVisionEmbeddings output (class embedding, patches, position embeddings), before pre_layrnorm.
  at::Tensor vision_embeddings(const at::Tensor& pixel_values);

  /// The learned temperature (a scalar; logits are exp(logit_scale) * cosine).
  at::Tensor logit_scale() const { return logit_scale_; }

  /// Builds from `<folder>/config.json` and loads `<folder>/model.safetensors` (or its fp16 / sharded variants). The
  /// `*.embeddings.position_ids` buffers of older checkpoints are ignored. Throws stylealigned::Error for a missing
  /// folder, a config whose model_type is not "clip", and any missing or mis-shaped tensor.
  static std::shared_ptr<CLIPModelImpl> from_pretrained(const std::filesystem::path& folder,
                                                        const LoadOptions& options = {});

  const CLIPConfig& config() const { return config_; }

 private:
  CLIPConfig config_;
  // The text tower's own modules (`text_model`, `text_projection`) are registered here under their names; the
  // CLIPTextModel object itself is not a child, so checkpoint names stay flat.
  std::shared_ptr<CLIPTextModelImpl> text_;
  std::shared_ptr<detail::CLIPVisionTransformerImpl> vision_model_;
  std::shared_ptr<torch::nn::Module> visual_projection_;
  at::Tensor logit_scale_;
};

class CLIPModel : public torch::nn::ModuleHolder<CLIPModelImpl> {
 public:
  using torch::nn::ModuleHolder<CLIPModelImpl>::ModuleHolder;
  static CLIPModel from_pretrained(const std::filesystem::path& folder, const LoadOptions& options = {}) {
    return CLIPModel(CLIPModelImpl::from_pretrained(folder, options));
  }
};

}  // namespace stylealigned::models
