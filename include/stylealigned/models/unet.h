// stylealigned/models/unet.h: diffusers' UNet2DConditionModel (SD1.x/SD2.x and SDXL layouts) in libtorch.
//
// The module tree and every parameter name are diffusers' own (`down_blocks.1.attentions.0.transformer_blocks.0.
// attn1.to_q.weight`, ...), so a diffusers checkpoint loads 1:1. Each attention layer hands its projected, head-split
// q, k, v to the processor registered for its diffusers name in processors(); each GroupNorm asks the norm hook (if
// one is set) to normalise. That is where StyleAligned plugs in:
//
//   auto unet = stylealigned::models::UNet2DConditionModel::from_pretrained(model_dir / "unet");
//   auto hook = stylealigned::install_style_aligned(unet->processors(), stylealigned::StyleAlignedOptions{});
//   unet->set_norm_hook(hook);
//   auto layout = stylealigned::BatchLayout::cfg(n_images);            // rows [uncond n ; cond n]
//   stylealigned::models::UNetForwardOptions opts;
//   opts.layout = &layout;
//   at::Tensor eps = unet->forward(latents, t, text_embeddings, opts);
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "stylealigned/attention.h"
#include "stylealigned/batch_layout.h"
#include "stylealigned/models/loading.h"

namespace stylealigned::models {

/// The UNet2DConditionModel config keys we implement, with diffusers' defaults (diffusers 0.25 `__init__`).
/// Per-level lists hold one entry per level after parsing (an int in config.json is repeated for every level).
struct UNetConfig {
  int64_t sample_size = 0;  ///< latent size the model was trained at (0: not given); informational
  int64_t in_channels = 4;
  int64_t out_channels = 4;
  bool center_input_sample = false;
  bool flip_sin_to_cos = true;
  double freq_shift = 0.0;
  /// "CrossAttnDownBlock2D" or "DownBlock2D" per level.
  std::vector<std::string> down_block_types = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "DownBlock2D"};
  /// "UNetMidBlock2DCrossAttn" (the only mid block we implement).
  std::string mid_block_type = "UNetMidBlock2DCrossAttn";
  /// "UpBlock2D" or "CrossAttnUpBlock2D" per level (deepest level first, as in diffusers).
  std::vector<std::string> up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                             "CrossAttnUpBlock2D"};
  std::vector<int64_t> block_out_channels = {320, 640, 1280, 1280};
  std::vector<int64_t> layers_per_block = {2};  ///< per level (one entry = every level)
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1.0;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  std::vector<int64_t> cross_attention_dim = {1280};        ///< per level
  std::vector<int64_t> transformer_layers_per_block = {1};  ///< per level
  /// The real number of attention heads per level: config `num_attention_heads`, or else `attention_head_dim`
  /// (diffusers' historical misnaming: SD1.5's `attention_head_dim: 8` means 8 heads).
  std::vector<int64_t> num_attention_heads = {8};
  bool use_linear_projection = false;
  bool upcast_attention = false;
  /// "" (none) or "text_time" (SDXL micro-conditioning: pooled text embeds + time ids).
  std::string addition_embed_type;
  int64_t addition_time_embed_dim = 0;                ///< text_time: sinusoid size per time id
  int64_t projection_class_embeddings_input_dim = 0;  ///< text_time: input size of add_embedding
  int64_t time_embedding_dim = 0;                     ///< 0: 4 * block_out_channels[0]
  int64_t conv_in_kernel = 3;
  int64_t conv_out_kernel = 3;

  /// Parses a diffusers unet/config.json text. Missing keys take diffusers' defaults; unknown keys are ignored, and
  /// so are keys diffusers itself ignores for the supported block types (resnet_out_scale_factor,
  /// resnet_skip_time_act, mid_block_only_cross_attention, addition_embed_type_num_heads); a non-zero dropout is
  /// ignored with a warning (dropout is not implemented).
  /// A key set to something we do not implement (class_embed_type, encoder_hid_dim, time_cond_proj_dim,
  /// attention_type other than "default", dual_cross_attention, only_cross_attention, resnet_time_scale_shift
  /// other than "default", reverse_transformer_layers_per_block, ...) throws stylealigned::Error naming the key,
  /// its value and `source`.
  static UNetConfig from_json(std::string_view json_text, std::string_view source = "unet config");
  static UNetConfig from_file(const std::filesystem::path& path);

  /// Real SD1.5 and SDXL-base architectures (for benchmarks and tests with weights built in memory).
  static UNetConfig stable_diffusion_v1_5();
  static UNetConfig stable_diffusion_xl_base();

  /// The same config with every per-level list expanded to one entry per level. Throws stylealigned::Error naming
  /// the field for inconsistent lengths, unknown block types or non-positive sizes.
  UNetConfig normalized() const;
  int64_t levels() const { return static_cast<int64_t>(block_out_channels.size()); }
  int64_t time_embed_dim() const;
};

/// Inputs of one forward pass beyond sample, timestep and text embeddings.
struct UNetForwardOptions {
  /// How the batch rows split into style groups (passed to every attention processor and norm hook). Null means
  /// BatchLayout::independent(batch): every row alone, i.e. plain diffusion.
  const BatchLayout* layout = nullptr;
  /// SDXL (addition_embed_type "text_time"): pooled text embeddings [batch, projection_dim].
  at::Tensor text_embeds;
  /// SDXL: micro-conditioning [batch, 6] = original (h, w), crop (top, left), target (h, w), in pixels.
  at::Tensor time_ids;
};

namespace detail {
struct UNetParts;  // typed handles of the registered children (defined in unet.cpp)
}

/// diffusers' UNet2DConditionModel. Works under autograd; the attention processors decide what runs in attention.
class UNet2DConditionModelImpl : public torch::nn::Module {
 public:
  /// Builds the module tree with freshly initialised (random) parameters. Throws stylealigned::Error for a config
  /// we do not support.
  explicit UNet2DConditionModelImpl(const UNetConfig& config);
  ~UNet2DConditionModelImpl() override;

  /// sample [B, in_channels, H, W]; timestep 0-d or [B] (or [1]), integer or floating; encoder_hidden_states
  /// [B, tokens, cross_attention_dim]. Returns the prediction [B, out_channels, H, W]. H and W need not be
  /// multiples of the total downsampling factor (upsampling then follows the skip connections' sizes, as diffusers
  /// does). Throws stylealigned::Error naming the input for wrong shapes or missing SDXL conditioning.
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timestep, const at::Tensor& encoder_hidden_states,
                     const UNetForwardOptions& options = {});

  /// The processor of every attention layer, keyed by diffusers names, in diffusers' `attn_processors` order
  /// (down_blocks, up_blocks, mid_block; attn1 before attn2). All default processors initially.
  ProcessorMap& processors() { return processors_; }
  const ProcessorMap& processors() const { return processors_; }
  /// The attention layer names (without diffusers' ".processor" suffix), in processor order.
  const std::vector<std::string>& attention_layer_names() const { return processors_.layers(); }

  /// Every GroupNorm of the UNet (ResNet norm1/norm2, transformer norm, conv_norm_out) calls this hook when set
  /// (StyleAligned's shared GroupNorm); nullptr restores plain GroupNorm.
  void set_norm_hook(std::shared_ptr<NormHook> hook) { norm_hook_ = std::move(hook); }
  const std::shared_ptr<NormHook>& norm_hook() const { return norm_hook_; }

  /// The normalised config the model was built from.
  const UNetConfig& config() const { return config_; }

 private:
  UNetConfig config_;
  std::unique_ptr<detail::UNetParts> parts_;
  ProcessorMap processors_;
  std::shared_ptr<NormHook> norm_hook_;
};

/// Module holder (shared ownership), as TORCH_MODULE would declare it, plus diffusers-style constructors.
class UNet2DConditionModel : public torch::nn::ModuleHolder<UNet2DConditionModelImpl> {
 public:
  using torch::nn::ModuleHolder<UNet2DConditionModelImpl>::ModuleHolder;

  /// A model with random weights built from `config`.
  static UNet2DConditionModel from_config(const UNetConfig& config);
  /// Reads `<folder>/config.json` and the weights in `<folder>` (diffusion_pytorch_model[.fp16].safetensors or a
  /// sharded index) and loads them with `options` (dtype, device). Throws stylealigned::Error naming the file and
  /// every missing or mis-shaped tensor.
  static UNet2DConditionModel from_pretrained(const std::filesystem::path& folder, const LoadOptions& options = {});
};

}  // namespace stylealigned::models
