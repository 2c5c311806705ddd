// stylealigned/models/vae.h: diffusers' AutoencoderKL (the SD/SDXL VAE) in libtorch.
//
// Parameter names are diffusers' own (`encoder.down_blocks.0.resnets.0.conv1.weight`, ...). Images are NCHW in
// [-1, 1]; latents are the raw (unscaled) VAE latents: multiply by config().scaling_factor before the UNet, divide
// after it, as the diffusers pipelines do.
//
//   auto vae = stylealigned::models::AutoencoderKL::from_pretrained(model_dir / "vae");
//   at::Tensor latents = vae->encode(image).mean * vae->config().scaling_factor;
//   at::Tensor decoded = vae->decode(latents / vae->config().scaling_factor);   // [-1, 1], unclamped
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "stylealigned/models/loading.h"

namespace stylealigned::models {

/// The AutoencoderKL config keys we implement, with diffusers' defaults.
struct VAEConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  int64_t latent_channels = 4;
  std::vector<int64_t> block_out_channels = {64};
  int64_t layers_per_block = 1;
  int64_t norm_num_groups = 32;
  int64_t sample_size = 32;  ///< informational
  double scaling_factor = 0.18215;
  /// The SDXL VAE overflows in fp16: pipelines run it in float32 when this is set.
  bool force_upcast = true;
  /// Optional latent shift (diffusers `shift_factor`; absent for SD/SDXL). Pipelines apply it, not the model.
  std::optional<double> shift_factor;
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;
  bool mid_block_add_attention = true;
  /// Not a config.json key: register the mid-block attention projections under the deprecated names
  /// query/key/value/proj_attn, as in VAE checkpoints written before diffusers' 2023 attention refactor (SD1.x's
  /// VAE among them; diffusers renames them on load). from_pretrained sets it from the checkpoint's tensor names.
  bool legacy_attention_names = false;

  /// Parses a diffusers vae/config.json. Missing keys take diffusers' defaults; unknown keys are ignored. Block
  /// types must be DownEncoderBlock2D / UpDecoderBlock2D and act_fn silu; latents_mean / latents_std (not
  /// implemented) must be absent or null; anything else throws stylealigned::Error naming the key and `source`.
  static VAEConfig from_json(std::string_view json_text, std::string_view source = "vae config");
  static VAEConfig from_file(const std::filesystem::path& path);

  /// Spatial factor between images and latents: 2^(levels - 1) (8 for SD/SDXL).
  int64_t scale_factor() const;
  /// Throws stylealigned::Error naming the field for an inconsistent config.
  void validate() const;
};

/// diffusers' DiagonalGaussianDistribution over latents (the encoder's posterior).
struct DiagonalGaussian {
  at::Tensor mean;
  at::Tensor logvar;  ///< clamped to [-30, 20]
  at::Tensor std;     ///< exp(logvar / 2)
  /// mean + std * N(0, 1), drawn with `generator` (libtorch's default generator when absent).
  at::Tensor sample(std::optional<at::Generator> generator = std::nullopt) const;
  at::Tensor mode() const { return mean; }
};

namespace detail {
struct VAEParts;  // typed handles of the registered children (defined in vae.cpp)
}

/// diffusers' AutoencoderKL: encoder + quant_conv, post_quant_conv + decoder. Works under autograd.
class AutoencoderKLImpl : public torch::nn::Module {
 public:
  explicit AutoencoderKLImpl(const VAEConfig& config);
  ~AutoencoderKLImpl() override;

  /// image [B, in_channels, H, W] in [-1, 1] (H, W multiples of scale_factor()) -> posterior over latents
  /// [B, latent_channels, H/f, W/f].
  DiagonalGaussian encode(const at::Tensor& image);
  /// latents [B, latent_channels, h, w] (unscaled) -> image [B, out_channels, h*f, w*f], unclamped.
  at::Tensor decode(const at::Tensor& latents);

  const VAEConfig& config() const { return config_; }

 private:
  VAEConfig config_;
  std::unique_ptr<detail::VAEParts> parts_;
};

class AutoencoderKL : public torch::nn::ModuleHolder<AutoencoderKLImpl> {
 public:
  using torch::nn::ModuleHolder<AutoencoderKLImpl>::ModuleHolder;

  /// A model with random weights built from `config`.
  static AutoencoderKL from_config(const VAEConfig& config);
  /// Reads `<folder>/config.json` and the weights in `<folder>` and loads them with `options`. Throws
  /// stylealigned::Error naming the file and every missing or mis-shaped tensor.
  static AutoencoderKL from_pretrained(const std::filesystem::path& folder, const LoadOptions& options = {});
};

}  // namespace stylealigned::models
