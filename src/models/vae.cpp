#include "stylealigned/models/vae.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <fstream>
#include <sstream>
#include <utility>

#include "models/config_json.h"
#include "models/layers.h"
#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"

namespace stylealigned::models {

// ---- Config ------------------------------------------------------------------------------------------------------

VAEConfig VAEConfig::from_json(std::string_view json_text, std::string_view source) {
  const cfg::JsonConfig j(json_text, source);
  VAEConfig c;
  j.require("act_fn", {"silu"});
  j.require("norm_type", {"group"});
  j.require("latents_mean", {});
  j.require("latents_std", {});
  c.in_channels = j.get_int("in_channels", c.in_channels);
  c.out_channels = j.get_int("out_channels", c.out_channels);
  c.latent_channels = j.get_int("latent_channels", c.latent_channels);
  c.block_out_channels = j.get_int_list("block_out_channels", c.block_out_channels);
  c.layers_per_block = j.get_int("layers_per_block", c.layers_per_block);
  c.norm_num_groups = j.get_int("norm_num_groups", c.norm_num_groups);
  c.sample_size = j.get_int("sample_size", c.sample_size);
  c.scaling_factor = j.get_double("scaling_factor", c.scaling_factor);
  c.force_upcast = j.get_bool("force_upcast", c.force_upcast);
  if (j.has("shift_factor")) c.shift_factor = j.get_double("shift_factor", 0.0);
  c.use_quant_conv = j.get_bool("use_quant_conv", c.use_quant_conv);
  c.use_post_quant_conv = j.get_bool("use_post_quant_conv", c.use_post_quant_conv);
  c.mid_block_add_attention = j.get_bool("mid_block_add_attention", c.mid_block_add_attention);

  const size_t levels = c.block_out_channels.size();
  const auto down = j.get_string_list("down_block_types", std::vector<std::string>(levels, "DownEncoderBlock2D"));
  const auto up = j.get_string_list("up_block_types", std::vector<std::string>(levels, "UpDecoderBlock2D"));
  if (down.size() != levels) j.fail("down_block_types", "needs one entry per block_out_channels");
  if (up.size() != levels) j.fail("up_block_types", "needs one entry per block_out_channels");
  for (const auto& t : down) {
    if (t != "DownEncoderBlock2D") j.fail("down_block_types", "only DownEncoderBlock2D is supported");
  }
  for (const auto& t : up) {
    if (t != "UpDecoderBlock2D") j.fail("up_block_types", "only UpDecoderBlock2D is supported");
  }
  try {
    c.validate();
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", source, e.what()));
  }
  return c;
}

VAEConfig VAEConfig::from_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(fmt::format("{}: cannot open file", path.string()));
  std::ostringstream text;
  text << in.rdbuf();
  return from_json(text.str(), path.string());
}

int64_t VAEConfig::scale_factor() const { return int64_t{1} << (block_out_channels.size() - 1); }

void VAEConfig::validate() const {
  auto positive = [](int64_t v, const char* field) {
    if (v <= 0) throw Error(fmt::format("VAEConfig: {} must be positive, got {}", field, v));
  };
  if (block_out_channels.empty()) throw Error("VAEConfig: block_out_channels is empty");
  positive(in_channels, "in_channels");
  positive(out_channels, "out_channels");
  positive(latent_channels, "latent_channels");
  positive(layers_per_block, "layers_per_block");
  positive(norm_num_groups, "norm_num_groups");
  for (int64_t ch : block_out_channels) {
    positive(ch, "block_out_channels");
    if (ch % norm_num_groups != 0) {
      throw Error(
          fmt::format("VAEConfig: block_out_channels {} is not divisible by norm_num_groups {}", ch, norm_num_groups));
    }
  }
  if (!(scaling_factor > 0.0))
    throw Error(fmt::format("VAEConfig: scaling_factor must be positive, got {}", scaling_factor));
}

at::Tensor DiagonalGaussian::sample(std::optional<at::Generator> generator) const {
  at::Tensor noise =
      generator ? at::randn(mean.sizes(), *generator, mean.options()) : at::randn(mean.sizes(), mean.options());
  return mean + std * noise;
}

// ---- Blocks ------------------------------------------------------------------------------------------------------

namespace detail {
using namespace layers;
namespace {  // block types are private to this file

constexpr double kVaeEps = 1e-6;  // every VAE norm (diffusers hard-codes it in Encoder/Decoder)

/// UNetMidBlock2D as the VAE uses it: resnet, single-head self-attention with group norm and residual, resnet.
class VAEMidBlockImpl : public torch::nn::Module {
 public:
  VAEMidBlockImpl(const std::string& prefix, int64_t channels, int64_t groups, bool add_attention, bool legacy_names)
      : torch::nn::Module("UNetMidBlock2D") {
    auto attention_list = register_module("attentions", torch::nn::ModuleList());
    auto resnet_list = register_module("resnets", torch::nn::ModuleList());
    resnets.push_back(ResnetBlock2D(channels, channels, 0, groups, kVaeEps));
    resnet_list->push_back(resnets.back());
    if (add_attention) {
      AttentionSpec spec;
      spec.query_dim = channels;
      spec.heads = 1;
      spec.dim_head = channels;
      spec.bias = true;
      spec.upcast_attention = true;  // diffusers sets upcast_softmax here
      spec.norm_num_groups = groups;
      spec.eps = kVaeEps;
      spec.residual_connection = true;
      spec.legacy_names = legacy_names;
      attention = Attention(prefix + ".attentions.0", spec);
      attention_list->push_back(attention);
    }
    resnets.push_back(ResnetBlock2D(channels, channels, 0, groups, kVaeEps));
    resnet_list->push_back(resnets.back());
  }

  at::Tensor forward(at::Tensor h, const ForwardContext& ctx) {
    h = resnets[0]->forward(h, at::Tensor(), ctx);
    if (!attention.is_empty()) h = attention->forward(h, at::Tensor(), ctx);
    return resnets[1]->forward(h, at::Tensor(), ctx);
  }

  std::vector<ResnetBlock2D> resnets;
  Attention attention{nullptr};
};
TORCH_MODULE(VAEMidBlock);

/// DownEncoderBlock2D (down = true) or UpDecoderBlock2D (down = false).
class VAEBlockImpl : public torch::nn::Module {
 public:
  VAEBlockImpl(bool down, int64_t in_channels, int64_t out_channels, int64_t num_layers, int64_t groups, bool resample)
      : torch::nn::Module(down ? "DownEncoderBlock2D" : "UpDecoderBlock2D") {
    auto resnet_list = register_module("resnets", torch::nn::ModuleList());
    for (int64_t i = 0; i < num_layers; ++i) {
      resnets.push_back(ResnetBlock2D(i == 0 ? in_channels : out_channels, out_channels, 0, groups, kVaeEps));
      resnet_list->push_back(resnets.back());
    }
    if (resample && down) {
      downsampler = Downsample2D(out_channels, out_channels, /*padding=*/0);
      register_module("downsamplers", torch::nn::ModuleList(downsampler));
    } else if (resample) {
      upsampler = Upsample2D(out_channels, out_channels);
      register_module("upsamplers", torch::nn::ModuleList(upsampler));
    }
  }

  at::Tensor forward(at::Tensor h, const ForwardContext& ctx) {
    for (auto& resnet : resnets) h = resnet->forward(h, at::Tensor(), ctx);
    if (!downsampler.is_empty()) h = downsampler->forward(h);
    if (!upsampler.is_empty()) h = upsampler->forward(h);
    return h;
  }

  std::vector<ResnetBlock2D> resnets;
  Downsample2D downsampler{nullptr};
  Upsample2D upsampler{nullptr};
};
TORCH_MODULE(VAEBlock);

class EncoderImpl : public torch::nn::Module {
 public:
  explicit EncoderImpl(const VAEConfig& c) : torch::nn::Module("Encoder") {
    const auto& ch = c.block_out_channels;
    conv_in = register_module("conv_in", make_conv(c.in_channels, ch[0], 3));
    auto list = register_module("down_blocks", torch::nn::ModuleList());
    int64_t output = ch[0];
    for (size_t i = 0; i < ch.size(); ++i) {
      const int64_t input = output;
      output = ch[i];
      blocks.push_back(VAEBlock(true, input, output, c.layers_per_block, c.norm_num_groups, i + 1 < ch.size()));
      list->push_back(blocks.back());
    }
    mid_block = register_module("mid_block", VAEMidBlock("encoder.mid_block", ch.back(), c.norm_num_groups,
                                                         c.mid_block_add_attention, c.legacy_attention_names));
    conv_norm_out = register_module("conv_norm_out", GroupNorm(c.norm_num_groups, ch.back(), kVaeEps));
    conv_out = register_module("conv_out", make_conv(ch.back(), 2 * c.latent_channels, 3));
  }

  at::Tensor forward(const at::Tensor& x, const ForwardContext& ctx) {
    at::Tensor h = conv_in->forward(x);
    for (auto& block : blocks) h = block->forward(h, ctx);
    h = mid_block->forward(h, ctx);
    return conv_out->forward(at::silu(conv_norm_out->forward(h, ctx)));
  }

  Conv2d conv_in{nullptr}, conv_out{nullptr};
  std::vector<VAEBlock> blocks;
  VAEMidBlock mid_block{nullptr};
  GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(Encoder);

class DecoderImpl : public torch::nn::Module {
 public:
  explicit DecoderImpl(const VAEConfig& c) : torch::nn::Module("Decoder") {
    const std::vector<int64_t> ch(c.block_out_channels.rbegin(), c.block_out_channels.rend());
    conv_in = register_module("conv_in", make_conv(c.latent_channels, ch[0], 3));
    auto list = register_module("up_blocks", torch::nn::ModuleList());
    mid_block = register_module("mid_block", VAEMidBlock("decoder.mid_block", ch[0], c.norm_num_groups,
                                                         c.mid_block_add_attention, c.legacy_attention_names));
    int64_t output = ch[0];
    for (size_t i = 0; i < ch.size(); ++i) {
      const int64_t prev = output;
      output = ch[i];
      blocks.push_back(VAEBlock(false, prev, output, c.layers_per_block + 1, c.norm_num_groups, i + 1 < ch.size()));
      list->push_back(blocks.back());
    }
    conv_norm_out = register_module("conv_norm_out", GroupNorm(c.norm_num_groups, ch.back(), kVaeEps));
    conv_out = register_module("conv_out", make_conv(ch.back(), c.out_channels, 3));
  }

  at::Tensor forward(const at::Tensor& z, const ForwardContext& ctx) {
    at::Tensor h = conv_in->forward(z);
    h = mid_block->forward(h, ctx);
    for (auto& block : blocks) h = block->forward(h, ctx);
    return conv_out->forward(at::silu(conv_norm_out->forward(h, ctx)));
  }

  Conv2d conv_in{nullptr}, conv_out{nullptr};
  VAEMidBlock mid_block{nullptr};
  std::vector<VAEBlock> blocks;
  GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(Decoder);

}  // namespace

struct VAEParts {
  Encoder encoder{nullptr};
  Decoder decoder{nullptr};
  Conv2d quant_conv{nullptr}, post_quant_conv{nullptr};
};

}  // namespace detail

// ---- Model -------------------------------------------------------------------------------------------------------

AutoencoderKLImpl::AutoencoderKLImpl(const VAEConfig& config)
    : torch::nn::Module("AutoencoderKL"), config_(config), parts_(std::make_unique<detail::VAEParts>()) {
  config_.validate();
  auto& p = *parts_;
  const int64_t latent = config_.latent_channels;
  p.encoder = register_module("encoder", detail::Encoder(config_));
  p.decoder = register_module("decoder", detail::Decoder(config_));
  if (config_.use_quant_conv)
    p.quant_conv = register_module("quant_conv", layers::make_conv(2 * latent, 2 * latent, 1));
  if (config_.use_post_quant_conv) {
    p.post_quant_conv = register_module("post_quant_conv", layers::make_conv(latent, latent, 1));
  }
}

AutoencoderKLImpl::~AutoencoderKLImpl() = default;

namespace {
void check_input(const at::Tensor& x, int64_t channels, const char* what) {
  if (!x.defined() || x.dim() != 4 || x.size(1) != channels) {
    throw Error(fmt::format("AutoencoderKL::{}: input must be [batch, {}, height, width], got {}", what, channels,
                            x.defined() ? fmt::format("{}", fmt::join(x.sizes(), "x")) : std::string("undefined")));
  }
}
}  // namespace

DiagonalGaussian AutoencoderKLImpl::encode(const at::Tensor& image) {
  check_input(image, config_.in_channels, "encode");
  const BatchLayout layout = BatchLayout::independent(image.size(0));
  const layers::ForwardContext ctx{layout};
  at::Tensor moments = parts_->encoder->forward(image, ctx);
  if (!parts_->quant_conv.is_empty()) moments = parts_->quant_conv->forward(moments);
  moments = moments.contiguous();  // NCHW out even where packed convolutions ran channels-last
  auto halves = moments.chunk(2, 1);
  DiagonalGaussian posterior;
  posterior.mean = halves[0];
  posterior.logvar = at::clamp(halves[1], -30.0, 20.0);
  posterior.std = at::exp(0.5 * posterior.logvar);
  return posterior;
}

at::Tensor AutoencoderKLImpl::decode(const at::Tensor& latents) {
  check_input(latents, config_.latent_channels, "decode");
  const BatchLayout layout = BatchLayout::independent(latents.size(0));
  const layers::ForwardContext ctx{layout};
  at::Tensor z = parts_->post_quant_conv.is_empty() ? latents : parts_->post_quant_conv->forward(latents);
  return parts_->decoder->forward(z, ctx).contiguous();  // NCHW out even where convolutions ran channels-last
}

AutoencoderKL AutoencoderKL::from_config(const VAEConfig& config) {
  return AutoencoderKL(std::make_shared<AutoencoderKLImpl>(config));
}

AutoencoderKL AutoencoderKL::from_pretrained(const std::filesystem::path& folder, const LoadOptions& options) {
  VAEConfig config = VAEConfig::from_file(folder / "config.json");
  const auto weights = find_weights(folder, {"diffusion_pytorch_model"}, options.dtype == at::kHalf);
  const auto checkpoint = io::Checkpoint::open(weights);
  config.legacy_attention_names = checkpoint.contains("encoder.mid_block.attentions.0.query.weight") ||
                                  checkpoint.contains("decoder.mid_block.attentions.0.query.weight");
  std::shared_ptr<AutoencoderKLImpl> impl;
  {
    layers::PlaceholderParametersGuard placeholders;  // the checkpoint overwrites every parameter
    impl = std::make_shared<AutoencoderKLImpl>(config);
  }
  load_weights(*impl, checkpoint, options);
  return AutoencoderKL(std::move(impl));
}

}  // namespace stylealigned::models
