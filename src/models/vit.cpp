#include "stylealigned/models/vit.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/modules/container/modulelist.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "models/config_reading.h"
#include "models/vision_parts.h"
#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"

namespace stylealigned::models {

using LayerNorm = vision_parts::LayerNormImpl;
using Linear = vision_parts::LinearImpl;

ViTConfig ViTConfig::from_file(const std::filesystem::path& config_json) {
  const nlohmann::json j = config_reading::read_json_object(config_json, "ViT config");
  config_reading::expect_model_type(j, config_json, "vit", "a ViT (DINO) model");
  const config_reading::Fields f{config_json, j, ""};
  ViTConfig c;
  f.read("hidden_size", c.hidden_size);
  f.read("num_hidden_layers", c.num_hidden_layers);
  f.read("num_attention_heads", c.num_attention_heads);
  f.read("intermediate_size", c.intermediate_size);
  f.read("hidden_act", c.hidden_act);
  f.read("layer_norm_eps", c.layer_norm_eps);
  f.read("image_size", c.image_size);
  f.read("patch_size", c.patch_size);
  f.read("num_channels", c.num_channels);
  f.read("qkv_bias", c.qkv_bias);
  try {
    c.validate();
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", config_json.string(), e.what()));
  }
  return c;
}

void ViTConfig::validate() const {
  auto positive = [](const char* name, int64_t v) {
    if (v <= 0) throw Error(fmt::format("ViT config: '{}' must be positive, got {}", name, v));
  };
  positive("hidden_size", hidden_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("intermediate_size", intermediate_size);
  positive("image_size", image_size);
  positive("patch_size", patch_size);
  positive("num_channels", num_channels);
  if (hidden_size % num_attention_heads != 0) {
    throw Error(fmt::format("ViT config: 'hidden_size' {} is not divisible by 'num_attention_heads' {}", hidden_size,
                            num_attention_heads));
  }
  if (image_size % patch_size != 0) {
    throw Error(
        fmt::format("ViT config: 'image_size' {} is not a multiple of 'patch_size' {}", image_size, patch_size));
  }
  if (!vision_parts::known_activation(hidden_act)) {
    throw Error(
        fmt::format("ViT config: unsupported 'hidden_act' \"{}\" (expected gelu, gelu_new, "
                    "gelu_pytorch_tanh, quick_gelu or relu)",
                    hidden_act));
  }
  if (!(layer_norm_eps > 0.0)) {
    throw Error(fmt::format("ViT config: 'layer_norm_eps' must be positive, got {}", layer_norm_eps));
  }
}

namespace detail {

class ViTPatchEmbeddingsImpl : public torch::nn::Module {
 public:
  ViTPatchEmbeddingsImpl(const ViTConfig& c, bool init) {
    projection_ = register_module(
        "projection", std::make_shared<vision_parts::PatchConvImpl>(c.num_channels, c.hidden_size, c.patch_size,
                                                                    /*bias=*/true, init));
  }
  // [B, C, H, W] -> [B, patches, hidden], patches in row-major order.
  at::Tensor forward(const at::Tensor& pixel_values) const {
    return projection_->forward(pixel_values).flatten(2).transpose(1, 2);
  }

 private:
  std::shared_ptr<vision_parts::PatchConvImpl> projection_;
};

class ViTEmbeddingsImpl : public torch::nn::Module {
 public:
  ViTEmbeddingsImpl(const ViTConfig& c, bool init) {
    const int64_t patches = (c.image_size / c.patch_size) * (c.image_size / c.patch_size);
    cls_token_ = register_parameter("cls_token", vision_parts::new_weight({1, 1, c.hidden_size}, init));
    position_embeddings_ =
        register_parameter("position_embeddings", vision_parts::new_weight({1, patches + 1, c.hidden_size}, init));
    patch_embeddings_ = register_module("patch_embeddings", std::make_shared<ViTPatchEmbeddingsImpl>(c, init));
  }
  at::Tensor forward(const at::Tensor& pixel_values) const {
    at::Tensor patches = patch_embeddings_->forward(pixel_values);
    at::Tensor cls = cls_token_.expand({patches.size(0), 1, patches.size(2)});
    return at::cat({cls, patches}, 1) + position_embeddings_;
  }

 private:
  at::Tensor cls_token_, position_embeddings_;
  std::shared_ptr<ViTPatchEmbeddingsImpl> patch_embeddings_;
};

namespace {

// `attention.attention`: the query / key / value projections.
class ViTSelfAttentionImpl : public torch::nn::Module {
 public:
  ViTSelfAttentionImpl(const ViTConfig& c, bool init) : heads_(c.num_attention_heads) {
    query_ = register_module("query", std::make_shared<Linear>(c.hidden_size, c.hidden_size, c.qkv_bias, init));
    key_ = register_module("key", std::make_shared<Linear>(c.hidden_size, c.hidden_size, c.qkv_bias, init));
    value_ = register_module("value", std::make_shared<Linear>(c.hidden_size, c.hidden_size, c.qkv_bias, init));
  }
  at::Tensor forward(const at::Tensor& x) const {
    return vision_parts::multi_head_attention(query_->forward(x), key_->forward(x), value_->forward(x), heads_);
  }

 private:
  int64_t heads_;
  std::shared_ptr<Linear> query_, key_, value_;
};

// A module holding one Linear named `dense` (transformers' ViTSelfOutput, ViTIntermediate and ViTOutput).
class DenseImpl : public torch::nn::Module {
 public:
  DenseImpl(int64_t in, int64_t out, bool init) {
    dense_ = register_module("dense", std::make_shared<Linear>(in, out, true, init));
  }
  at::Tensor forward(const at::Tensor& x) const { return dense_->forward(x); }

 private:
  std::shared_ptr<Linear> dense_;
};

class ViTAttentionImpl : public torch::nn::Module {
 public:
  ViTAttentionImpl(const ViTConfig& c, bool init) {
    attention_ = register_module("attention", std::make_shared<ViTSelfAttentionImpl>(c, init));
    output_ = register_module("output", std::make_shared<DenseImpl>(c.hidden_size, c.hidden_size, init));
  }
  at::Tensor forward(const at::Tensor& x) const { return output_->forward(attention_->forward(x)); }

 private:
  std::shared_ptr<ViTSelfAttentionImpl> attention_;
  std::shared_ptr<DenseImpl> output_;
};

// Pre-norm block: x + attention(layernorm_before(x)), then h + output(act(intermediate(layernorm_after(h)))).
class ViTLayerImpl : public torch::nn::Module {
 public:
  ViTLayerImpl(const ViTConfig& c, bool init) : act_(c.hidden_act) {
    attention_ = register_module("attention", std::make_shared<ViTAttentionImpl>(c, init));
    intermediate_ =
        register_module("intermediate", std::make_shared<DenseImpl>(c.hidden_size, c.intermediate_size, init));
    output_ = register_module("output", std::make_shared<DenseImpl>(c.intermediate_size, c.hidden_size, init));
    layernorm_before_ =
        register_module("layernorm_before", std::make_shared<LayerNorm>(c.hidden_size, c.layer_norm_eps, init));
    layernorm_after_ =
        register_module("layernorm_after", std::make_shared<LayerNorm>(c.hidden_size, c.layer_norm_eps, init));
  }
  at::Tensor forward(const at::Tensor& x) const {
    const at::Tensor h = x + attention_->forward(layernorm_before_->forward(x));
    return h + output_->forward(vision_parts::activate(act_, intermediate_->forward(layernorm_after_->forward(h))));
  }

 private:
  std::string act_;
  std::shared_ptr<ViTAttentionImpl> attention_;
  std::shared_ptr<DenseImpl> intermediate_, output_;
  std::shared_ptr<LayerNorm> layernorm_before_, layernorm_after_;
};

}  // namespace

class ViTEncoderImpl : public vision_parts::LayerStackImpl<ViTLayerImpl> {
 public:
  ViTEncoderImpl(const ViTConfig& c, bool init) : LayerStackImpl("layer", c.num_hidden_layers, c, init) {}
};

}  // namespace detail

ViTModelImpl::ViTModelImpl(const ViTConfig& config, bool initialize) : config_(config) {
  config_.validate();
  embeddings_ = register_module("embeddings", std::make_shared<detail::ViTEmbeddingsImpl>(config_, initialize));
  encoder_ = register_module("encoder", std::make_shared<detail::ViTEncoderImpl>(config_, initialize));
  layernorm_ = register_module("layernorm",
                               std::make_shared<LayerNorm>(config_.hidden_size, config_.layer_norm_eps, initialize));
}

ViTOutput ViTModelImpl::forward(const at::Tensor& pixel_values, bool output_hidden_states) {
  const int64_t s = config_.image_size;
  if (!pixel_values.defined() || pixel_values.dim() != 4 || pixel_values.size(0) < 1 ||
      pixel_values.size(1) != config_.num_channels || pixel_values.size(2) != s || pixel_values.size(3) != s ||
      !at::isFloatingType(pixel_values.scalar_type())) {
    throw Error(fmt::format(
        "ViT: pixel_values must be float [batch, {}, {}, {}] (the model's image_size; position embeddings are not "
        "interpolated), got {}",
        config_.num_channels, s, s,
        pixel_values.defined()
            ? fmt::format("{} [{}]", c10::toString(pixel_values.scalar_type()), fmt::join(pixel_values.sizes(), ", "))
            : "undefined"));
  }
  const at::Tensor ref = layernorm_->parameters().front();  // a copy: parameters() returns a temporary vector
  ViTOutput out;
  at::Tensor h = embeddings_->forward(pixel_values.to(ref.device(), ref.scalar_type()));
  h = encoder_->forward(h, output_hidden_states ? &out.hidden_states : nullptr);
  out.last_hidden_state = std::static_pointer_cast<LayerNorm>(layernorm_)->forward(h);
  return out;
}

std::shared_ptr<ViTModelImpl> ViTModelImpl::from_pretrained(const std::filesystem::path& folder,
                                                            const LoadOptions& options) {
  config_reading::expect_folder(folder, "ViT (DINO)");
  const ViTConfig config = ViTConfig::from_file(folder / "config.json");
  const bool low_precision = options.dtype == c10::kHalf || options.dtype == c10::kBFloat16;
  const auto weights = find_weights(folder, {"model"}, low_precision);
  auto model = std::make_shared<ViTModelImpl>(config, /*initialize=*/false);
  LoadOptions load = options;
  // ViTModel's default add_pooling_layer=True saves a pooler the DINO embedding does not use.
  for (const char* name : {"pooler.dense.weight", "pooler.dense.bias"}) load.ignore.emplace_back(name);
  load_weights(*model, io::Checkpoint::open(weights), load);
  model->eval();
  return model;
}

}  // namespace stylealigned::models
