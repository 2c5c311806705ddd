#include "stylealigned/models/clip.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/modules/container/modulelist.h>

#include <cmath>
#include <functional>
#include <nlohmann/json.hpp>

#include "models/config_reading.h"
#include "models/vision_parts.h"
#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"

namespace stylealigned::models {

using LayerNorm = vision_parts::LayerNormImpl;
using Linear = vision_parts::LinearImpl;

// Config ---------------------------------------------------------------------------------------------------------

void CLIPVisionConfig::validate() const {
  auto positive = [](const char* name, int64_t v) {
    if (v <= 0) throw Error(fmt::format("CLIP vision config: '{}' must be positive, got {}", name, v));
  };
  positive("hidden_size", hidden_size);
  positive("intermediate_size", intermediate_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("num_channels", num_channels);
  positive("image_size", image_size);
  positive("patch_size", patch_size);
  if (hidden_size % num_attention_heads != 0) {
    throw Error(fmt::format("CLIP vision config: 'hidden_size' {} is not divisible by 'num_attention_heads' {}",
                            hidden_size, num_attention_heads));
  }
  if (image_size % patch_size != 0) {
    throw Error(fmt::format("CLIP vision config: 'image_size' {} is not a multiple of 'patch_size' {}", image_size,
                            patch_size));
  }
  if (!vision_parts::known_activation(hidden_act)) {
    throw Error(fmt::format("CLIP vision config: unsupported 'hidden_act' \"{}\"", hidden_act));
  }
  if (!(layer_norm_eps > 0.0)) {
    throw Error(fmt::format("CLIP vision config: 'layer_norm_eps' must be positive, got {}", layer_norm_eps));
  }
}

void CLIPConfig::validate() const {
  if (projection_dim <= 0)
    throw Error(fmt::format("CLIP config: 'projection_dim' must be positive, got {}", projection_dim));
  if (!text.with_projection || text.projection_dim != projection_dim) {
    throw Error("CLIP config: the text tower must project to 'projection_dim'");
  }
  text.validate();
  vision.validate();
}

namespace {

// A tower's sub-config: `<name>` overlaid with the legacy `<name>_dict` (which transformers lets win).
void read_tower(const nlohmann::json& j, const std::filesystem::path& file, const char* name,
                const std::function<void(const config_reading::Fields&)>& read) {
  for (const std::string& key : {std::string(name), std::string(name) + "_dict"}) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) continue;
    if (!it->is_object())
      throw Error(fmt::format("{}: '{}' must be an object, got {}", file.string(), key, it->dump()));
    read(config_reading::Fields{file, *it, key + "."});
  }
}

}  // namespace

CLIPConfig CLIPConfig::from_file(const std::filesystem::path& config_json) {
  const nlohmann::json j = config_reading::read_json_object(config_json, "CLIP config");
  config_reading::expect_model_type(j, config_json, "clip", "a CLIP model (CLIPModel)");
  CLIPConfig c;
  const config_reading::Fields top{config_json, j, ""};
  top.read("projection_dim", c.projection_dim);

  CLIPTextConfig& t = c.text;
  t.eos_token_id = 2;  // transformers' CLIPTextConfig default: pool at argmax(input_ids)
  read_tower(j, config_json, "text_config", [&t](const config_reading::Fields& f) {
    f.read("vocab_size", t.vocab_size);
    f.read("hidden_size", t.hidden_size);
    f.read("intermediate_size", t.intermediate_size);
    f.read("num_hidden_layers", t.num_hidden_layers);
    f.read("num_attention_heads", t.num_attention_heads);
    f.read("max_position_embeddings", t.max_position_embeddings);
    f.read("hidden_act", t.hidden_act);
    f.read("layer_norm_eps", t.layer_norm_eps);
    f.read("eos_token_id", t.eos_token_id);
  });
  t.with_projection = true;
  t.projection_dim = c.projection_dim;  // CLIPModel projects both towers to the top-level projection_dim

  CLIPVisionConfig& v = c.vision;
  read_tower(j, config_json, "vision_config", [&v](const config_reading::Fields& f) {
    f.read("hidden_size", v.hidden_size);
    f.read("intermediate_size", v.intermediate_size);
    f.read("num_hidden_layers", v.num_hidden_layers);
    f.read("num_attention_heads", v.num_attention_heads);
    f.read("num_channels", v.num_channels);
    f.read("image_size", v.image_size);
    f.read("patch_size", v.patch_size);
    f.read("hidden_act", v.hidden_act);
    f.read("layer_norm_eps", v.layer_norm_eps);
  });
  try {
    c.validate();
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", config_json.string(), e.what()));
  }
  return c;
}

// Vision tower ---------------------------------------------------------------------------------------------------

namespace detail {
namespace {

class WeightOnlyImpl : public torch::nn::Module {  // nn.Embedding used as a table: one parameter `weight`
 public:
  WeightOnlyImpl(at::IntArrayRef shape, bool init) {
    weight_ = register_parameter("weight", vision_parts::new_weight(shape, init));
  }
  const at::Tensor& weight() const { return weight_; }

 private:
  at::Tensor weight_;
};

class CLIPVisionEmbeddingsImpl : public torch::nn::Module {
 public:
  CLIPVisionEmbeddingsImpl(const CLIPVisionConfig& c, bool init) {
    const int64_t side = c.image_size / c.patch_size;
    class_embedding_ = register_parameter("class_embedding", vision_parts::new_weight({c.hidden_size}, init));
    patch_embedding_ =
        register_module("patch_embedding", std::make_shared<vision_parts::PatchConvImpl>(
                                               c.num_channels, c.hidden_size, c.patch_size, /*bias=*/false, init));
    position_embedding_ = register_module(
        "position_embedding", std::make_shared<WeightOnlyImpl>(at::IntArrayRef{side * side + 1, c.hidden_size}, init));
  }
  at::Tensor forward(const at::Tensor& pixel_values) const {
    at::Tensor patches = patch_embedding_->forward(pixel_values).flatten(2).transpose(1, 2);  // [B, P, C]
    at::Tensor cls = class_embedding_.view({1, 1, -1}).expand({patches.size(0), 1, patches.size(2)});
    return at::cat({cls, patches}, 1) + position_embedding_->weight().unsqueeze(0);
  }

 private:
  at::Tensor class_embedding_;
  std::shared_ptr<vision_parts::PatchConvImpl> patch_embedding_;
  std::shared_ptr<WeightOnlyImpl> position_embedding_;
};

class CLIPVisionAttentionImpl : public torch::nn::Module {
 public:
  CLIPVisionAttentionImpl(int64_t hidden, int64_t heads, bool init) : heads_(heads) {
    k_proj_ = register_module("k_proj", std::make_shared<Linear>(hidden, hidden, true, init));
    v_proj_ = register_module("v_proj", std::make_shared<Linear>(hidden, hidden, true, init));
    q_proj_ = register_module("q_proj", std::make_shared<Linear>(hidden, hidden, true, init));
    out_proj_ = register_module("out_proj", std::make_shared<Linear>(hidden, hidden, true, init));
  }
  at::Tensor forward(const at::Tensor& x) const {  // no mask: every patch sees every patch
    return out_proj_->forward(
        vision_parts::multi_head_attention(q_proj_->forward(x), k_proj_->forward(x), v_proj_->forward(x), heads_));
  }

 private:
  int64_t heads_;
  std::shared_ptr<Linear> k_proj_, v_proj_, q_proj_, out_proj_;
};

class CLIPVisionMLPImpl : public torch::nn::Module {
 public:
  CLIPVisionMLPImpl(const CLIPVisionConfig& c, bool init) : act_(c.hidden_act) {
    fc1_ = register_module("fc1", std::make_shared<Linear>(c.hidden_size, c.intermediate_size, true, init));
    fc2_ = register_module("fc2", std::make_shared<Linear>(c.intermediate_size, c.hidden_size, true, init));
  }
  at::Tensor forward(const at::Tensor& x) const {
    return fc2_->forward(vision_parts::activate(act_, fc1_->forward(x)));
  }

 private:
  std::string act_;
  std::shared_ptr<Linear> fc1_, fc2_;
};

class CLIPVisionLayerImpl : public torch::nn::Module {
 public:
  CLIPVisionLayerImpl(const CLIPVisionConfig& c, bool init) {
    self_attn_ = register_module("self_attn",
                                 std::make_shared<CLIPVisionAttentionImpl>(c.hidden_size, c.num_attention_heads, init));
    layer_norm1_ = register_module("layer_norm1", std::make_shared<LayerNorm>(c.hidden_size, c.layer_norm_eps, init));
    mlp_ = register_module("mlp", std::make_shared<CLIPVisionMLPImpl>(c, init));
    layer_norm2_ = register_module("layer_norm2", std::make_shared<LayerNorm>(c.hidden_size, c.layer_norm_eps, init));
  }
  at::Tensor forward(const at::Tensor& x) const {
    const at::Tensor h = x + self_attn_->forward(layer_norm1_->forward(x));
    return h + mlp_->forward(layer_norm2_->forward(h));
  }

 private:
  std::shared_ptr<CLIPVisionAttentionImpl> self_attn_;
  std::shared_ptr<LayerNorm> layer_norm1_, layer_norm2_;
  std::shared_ptr<CLIPVisionMLPImpl> mlp_;
};

class CLIPVisionEncoderImpl : public vision_parts::LayerStackImpl<CLIPVisionLayerImpl> {
 public:
  CLIPVisionEncoderImpl(const CLIPVisionConfig& c, bool init) : LayerStackImpl("layers", c.num_hidden_layers, c, init) {}
};

}  // namespace

// `vision_model`: embeddings, pre_layrnorm, encoder, post_layernorm.
class CLIPVisionTransformerImpl : public torch::nn::Module {
 public:
  CLIPVisionTransformerImpl(const CLIPVisionConfig& c, bool init) : config_(c) {
    embeddings_ = register_module("embeddings", std::make_shared<CLIPVisionEmbeddingsImpl>(c, init));
    // "pre_layrnorm" is transformers' attribute name (sic); checkpoints use it.
    pre_layrnorm_ = register_module("pre_layrnorm", std::make_shared<LayerNorm>(c.hidden_size, c.layer_norm_eps, init));
    encoder_ = register_module("encoder", std::make_shared<CLIPVisionEncoderImpl>(c, init));
    post_layernorm_ =
        register_module("post_layernorm", std::make_shared<LayerNorm>(c.hidden_size, c.layer_norm_eps, init));
  }

  at::Tensor embed(const at::Tensor& pixel_values) const {
    const CLIPVisionConfig& c = config_;
    const at::Tensor& p = pixel_values;
    if (!p.defined() || p.dim() != 4 || p.size(0) < 1 || p.size(1) != c.num_channels || p.size(2) != c.image_size ||
        p.size(3) != c.image_size || !at::isFloatingType(p.scalar_type())) {
      throw Error(
          fmt::format("CLIP vision: pixel_values must be float [batch, {}, {}, {}] (the model's image_size), got {}",
                      c.num_channels, c.image_size, c.image_size,
                      p.defined() ? fmt::format("{} [{}]", c10::toString(p.scalar_type()), fmt::join(p.sizes(), ", "))
                                  : "undefined"));
    }
    const at::Tensor ref = post_layernorm_->parameters().front();  // a copy: parameters() returns a temporary vector
    return embeddings_->forward(p.to(ref.device(), ref.scalar_type()));
  }

  CLIPVisionOutput forward(const at::Tensor& pixel_values, bool output_hidden_states) const {
    CLIPVisionOutput out;
    at::Tensor h = pre_layrnorm_->forward(embed(pixel_values));
    out.last_hidden_state = encoder_->forward(h, output_hidden_states ? &out.hidden_states : nullptr);
    out.pooler_output = post_layernorm_->forward(out.last_hidden_state.select(1, 0));
    return out;
  }

 private:
  CLIPVisionConfig config_;
  std::shared_ptr<CLIPVisionEmbeddingsImpl> embeddings_;
  std::shared_ptr<LayerNorm> pre_layrnorm_, post_layernorm_;
  std::shared_ptr<CLIPVisionEncoderImpl> encoder_;
};

}  // namespace detail

// CLIPModel --------------------------------------------------------------------------------------------------------

CLIPModelImpl::CLIPModelImpl(const CLIPConfig& config, bool initialize) : config_(config) {
  config_.text.with_projection = true;
  config_.text.projection_dim = config_.projection_dim;
  config_.validate();
  text_ = std::make_shared<CLIPTextModelImpl>(config_.text, initialize);
  for (const auto& child : text_->named_children()) register_module(child.key(), child.value());
  vision_model_ =
      register_module("vision_model", std::make_shared<detail::CLIPVisionTransformerImpl>(config_.vision, initialize));
  visual_projection_ = register_module(
      "visual_projection",
      std::make_shared<Linear>(config_.vision.hidden_size, config_.projection_dim, /*bias=*/false, initialize));
  // transformers' logit_scale_init_value: log(1 / 0.07).
  logit_scale_ = register_parameter("logit_scale", vision_parts::new_weight({}, initialize, 0.0, 2.6592));
}

CLIPVisionOutput CLIPModelImpl::encode_image(const at::Tensor& pixel_values, bool output_hidden_states) {
  CLIPVisionOutput out = vision_model_->forward(pixel_values, output_hidden_states);
  out.image_embeds = std::static_pointer_cast<Linear>(visual_projection_)->forward(out.pooler_output);
  return out;
}

CLIPTextOutput CLIPModelImpl::encode_text(const at::Tensor& input_ids, const CLIPTextForwardOptions& options) {
  return text_->forward(input_ids, options);
}

at::Tensor CLIPModelImpl::get_image_features(const at::Tensor& pixel_values) {
  return encode_image(pixel_values).image_embeds;
}

at::Tensor CLIPModelImpl::get_text_features(const at::Tensor& input_ids, const at::Tensor& attention_mask) {
  CLIPTextForwardOptions options;
  options.attention_mask = attention_mask;
  return text_->forward(input_ids, options).text_embeds;
}

at::Tensor CLIPModelImpl::vision_embeddings(const at::Tensor& pixel_values) {
  return vision_model_->embed(pixel_values);
}

std::shared_ptr<CLIPModelImpl> CLIPModelImpl::from_pretrained(const std::filesystem::path& folder,
                                                              const LoadOptions& options) {
  config_reading::expect_folder(folder, "CLIP");
  const CLIPConfig config = CLIPConfig::from_file(folder / "config.json");
  const bool low_precision = options.dtype == c10::kHalf || options.dtype == c10::kBFloat16;
  const auto weights = find_weights(folder, {"model"}, low_precision);
  auto model = std::make_shared<CLIPModelImpl>(config, /*initialize=*/false);
  LoadOptions load = options;
  // Persistent buffers before transformers 4.31; positions are implicit here.
  for (const char* name : {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}) {
    load.ignore.emplace_back(name);
  }
  load_weights(*model, io::Checkpoint::open(weights), load);
  model->eval();
  return model;
}

}  // namespace stylealigned::models
