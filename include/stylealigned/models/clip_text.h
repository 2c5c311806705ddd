// stylealigned/models/clip_text.h: the CLIP text encoders of SD1.x / SDXL (transformers' CLIPTextModel and
// CLIPTextModelWithProjection).
//
// Children are registered under the transformers names (`text_model.encoder.layers.3.self_attn.q_proj.weight`,
// `text_projection.weight`), so a `text_encoder/model.safetensors` loads 1:1.
//
//   auto te2 = stylealigned::models::CLIPTextModel::from_pretrained(model_dir / "text_encoder_2");
//   auto out = te2->forward(input_ids, {/*output_hidden_states=*/true});
//   at::Tensor tokens = out.hidden_states.end()[-2];   // SDXL: penultimate layer, no final LayerNorm
//   at::Tensor pooled = out.text_embeds;               // SDXL: projected pooled embedding of text_encoder_2
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

/// The fields of transformers' `CLIPTextConfig` that change the computation (defaults are transformers').
struct CLIPTextConfig {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 512;
  int64_t intermediate_size = 2048;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 8;
  int64_t max_position_embeddings = 77;
  /// "quick_gelu" (OpenAI CLIP-L), "gelu" (OpenCLIP bigG), or "gelu_new" / "gelu_pytorch_tanh" (tanh approximation).
  std::string hidden_act = "quick_gelu";
  double layer_norm_eps = 1e-5;
  int64_t projection_dim = 512;
  /// Selects the pooled position. Configs written before transformers PR #24773 (every SD/SDXL text encoder) say 2,
  /// which is not CLIP's end token; transformers then pools at argmax(input_ids), where the end token sits because
  /// it has the largest id. Any other value pools at the first occurrence of that id.
  int64_t eos_token_id = 49407;
  /// True for CLIPTextModelWithProjection (a bias-free `text_projection` Linear, hidden_size -> projection_dim).
  bool with_projection = false;

  /// Reads a transformers `config.json`. `with_projection` comes from `architectures`. Unknown keys are ignored;
  /// missing keys take the defaults above. Throws stylealigned::Error naming the file and key for a bad value.
  static CLIPTextConfig from_file(const std::filesystem::path& config_json);
  /// Throws stylealigned::Error naming the offending field (e.g. hidden_size not divisible by the head count).
  void validate() const;
};

/// What one forward pass returns (transformers' BaseModelOutputWithPooling, plus text_embeds).
struct CLIPTextOutput {
  at::Tensor last_hidden_state;  ///< [B, T, hidden], after final_layer_norm (what SD1.x conditions on)
  at::Tensor pooler_output;      ///< [B, hidden]: last_hidden_state at the pooled (end token) position
  at::Tensor text_embeds;        ///< [B, projection_dim]: text_projection(pooler_output); undefined without projection
  /// num_hidden_layers + 1 entries when requested: [0] is the embeddings' output, [i] the output of layer i (no
  /// final LayerNorm). SDXL conditions on hidden_states[num_hidden_layers - 1 - clip_skip].
  std::vector<at::Tensor> hidden_states;
};

struct CLIPTextForwardOptions {
  bool output_hidden_states = false;
  /// Optional [B, T] mask (1 = attend, 0 = padding) combined with the causal mask; SD pipelines pass none.
  at::Tensor attention_mask;
};

namespace detail {
class CLIPTextTransformerImpl;  // `text_model`: embeddings, encoder, final_layer_norm (defined in the .cpp)
class LinearImpl;
}  // namespace detail

/// transformers' CLIPTextModel, and CLIPTextModelWithProjection when config.with_projection is set: one class
/// because the two differ only by the projection, and a pipeline loading `text_encoder_2` should not need to know
/// which one the folder holds.
class CLIPTextModelImpl : public torch::nn::Module {
 public:
  /// Random weights when `initialize`; otherwise the parameters are allocated but never written (no memory is made
  /// resident), for a caller that loads every tensor next, as from_pretrained does.
  explicit CLIPTextModelImpl(const CLIPTextConfig& config, bool initialize = true);

  /// input_ids: [B, T] integer ids, T <= max_position_embeddings. Runs on the module's device and dtype.
  CLIPTextOutput forward(const at::Tensor& input_ids, const CLIPTextForwardOptions& options = {});

  /// The final LayerNorm alone: SD1.x's clip_skip applies it to an earlier hidden state, as diffusers does.
  at::Tensor final_layer_norm(const at::Tensor& hidden_state);

  /// Builds the model from `<folder>/config.json` and loads `<folder>/model.safetensors` (or its fp16 / sharded
  /// variants, see find_weights). The `text_model.embeddings.position_ids` buffer of older checkpoints is ignored.
  static std::shared_ptr<CLIPTextModelImpl> from_pretrained(const std::filesystem::path& folder,
                                                            const LoadOptions& options = {});

  const CLIPTextConfig& config() const { return config_; }

 private:
  CLIPTextConfig config_;
  std::shared_ptr<detail::CLIPTextTransformerImpl> text_model_;
  std::shared_ptr<detail::LinearImpl> text_projection_;  // bias-free; null without projection
};

/// Shared-ownership holder in the libtorch style (`CLIPTextModel m(config); m->forward(ids)`).
class CLIPTextModel : public torch::nn::ModuleHolder<CLIPTextModelImpl> {
 public:
  using torch::nn::ModuleHolder<CLIPTextModelImpl>::ModuleHolder;
  static CLIPTextModel from_pretrained(const std::filesystem::path& folder, const LoadOptions& options = {}) {
    return CLIPTextModel(CLIPTextModelImpl::from_pretrained(folder, options));
  }
};

}  // namespace stylealigned::models
