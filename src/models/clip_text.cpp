#include "stylealigned/models/clip_text.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/modules/container/modulelist.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>

#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"

namespace stylealigned::models {

// Config ---------------------------------------------------------------------------------------------------------

namespace {

using nlohmann::json;

bool known_activation(const std::string& name) {
  return name == "quick_gelu" || name == "gelu" || name == "gelu_new" || name == "gelu_pytorch_tanh";
}

int64_t read_int(const json& j, const char* key, int64_t fallback, const std::filesystem::path& file) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number_integer()) {
    throw Error(fmt::format("{}: '{}' must be an integer, got {}", file.string(), key, it->dump()));
  }
  return it->get<int64_t>();
}

}  // namespace

CLIPTextConfig CLIPTextConfig::from_file(const std::filesystem::path& config_json) {
  std::ifstream in(config_json);
  if (!in) throw Error(fmt::format("{}: cannot open the text encoder config", config_json.string()));
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: invalid JSON: {}", config_json.string(), e.what()));
  }
  if (!j.is_object()) throw Error(fmt::format("{}: expected a JSON object", config_json.string()));
  if (auto it = j.find("model_type"); it != j.end() && *it != "clip_text_model") {
    throw Error(fmt::format("{}: model_type {} is not a CLIP text model (expected \"clip_text_model\")",
                            config_json.string(), it->dump()));
  }

  CLIPTextConfig c;
  c.vocab_size = read_int(j, "vocab_size", c.vocab_size, config_json);
  c.hidden_size = read_int(j, "hidden_size", c.hidden_size, config_json);
  c.intermediate_size = read_int(j, "intermediate_size", c.intermediate_size, config_json);
  c.num_hidden_layers = read_int(j, "num_hidden_layers", c.num_hidden_layers, config_json);
  c.num_attention_heads = read_int(j, "num_attention_heads", c.num_attention_heads, config_json);
  c.max_position_embeddings = read_int(j, "max_position_embeddings", c.max_position_embeddings, config_json);
  c.projection_dim = read_int(j, "projection_dim", c.projection_dim, config_json);
  c.eos_token_id = read_int(j, "eos_token_id", c.eos_token_id, config_json);
  if (auto it = j.find("hidden_act"); it != j.end()) {
    if (!it->is_string()) throw Error(fmt::format("{}: 'hidden_act' must be a string", config_json.string()));
    c.hidden_act = it->get<std::string>();
  }
  if (auto it = j.find("layer_norm_eps"); it != j.end()) {
    if (!it->is_number()) throw Error(fmt::format("{}: 'layer_norm_eps' must be a number", config_json.string()));
    c.layer_norm_eps = it->get<double>();
  }
  if (auto it = j.find("architectures"); it != j.end() && it->is_array()) {
    for (const auto& a : *it) {
      if (a == "CLIPTextModelWithProjection") c.with_projection = true;
    }
  }
  try {
    c.validate();
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", config_json.string(), e.what()));
  }
  return c;
}

void CLIPTextConfig::validate() const {
  auto positive = [](const char* name, int64_t v) {
    if (v <= 0) throw Error(fmt::format("CLIP text config: '{}' must be positive, got {}", name, v));
  };
  positive("vocab_size", vocab_size);
  positive("hidden_size", hidden_size);
  positive("intermediate_size", intermediate_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("max_position_embeddings", max_position_embeddings);
  if (with_projection) positive("projection_dim", projection_dim);
  if (hidden_size % num_attention_heads != 0) {
    throw Error(fmt::format("CLIP text config: 'hidden_size' {} is not divisible by 'num_attention_heads' {}",
                            hidden_size, num_attention_heads));
  }
  if (!known_activation(hidden_act)) {
    throw Error(
        fmt::format("CLIP text config: unsupported 'hidden_act' \"{}\" (expected quick_gelu, gelu, gelu_new "
                    "or gelu_pytorch_tanh)",
                    hidden_act));
  }
  if (!(layer_norm_eps > 0.0)) {
    throw Error(fmt::format("CLIP text config: 'layer_norm_eps' must be positive, got {}", layer_norm_eps));
  }
}

// Modules --------------------------------------------------------------------------------------------------------

namespace detail {

// Minimal Linear / LayerNorm / Embedding with libtorch's parameter names. Unlike torch::nn's, they can be built
// without initialising their weights: from_pretrained overwrites every tensor anyway, and random init of a large
// encoder would cost seconds and touch (make resident) a full extra copy of the weights before loading starts.
static at::Tensor new_parameter(at::IntArrayRef shape, bool initialize, const std::function<void(at::Tensor&)>& init) {
  at::Tensor t = at::empty(shape, at::kFloat);  // untouched pages: no resident memory until written
  if (initialize) {
    at::NoGradGuard no_grad;
    init(t);
  }
  return t;
}

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias, bool initialize) {
    const double bound = 1.0 / std::sqrt(double(in));  // torch.nn.Linear's default range
    auto uniform = [bound](at::Tensor& t) { t.uniform_(-bound, bound); };
    weight_ = register_parameter("weight", new_parameter({out, in}, initialize, uniform));
    if (bias) bias_ = register_parameter("bias", new_parameter({out}, initialize, uniform));
  }
  at::Tensor forward(const at::Tensor& x) { return at::linear(x, weight_, bias_); }

 private:
  at::Tensor weight_, bias_;
};

namespace {

at::Tensor activate(const std::string& kind, const at::Tensor& x) {
  if (kind == "quick_gelu") return x * at::sigmoid(x * 1.702);
  if (kind == "gelu") return at::gelu(x);
  if (kind == "gelu_pytorch_tanh") return at::gelu(x, "tanh");
  // gelu_new: transformers' explicit tanh formula (same function as the tanh approximation, written out).
  constexpr double kSqrt2OverPi = 0.7978845608028654;
  return 0.5 * x * (1.0 + at::tanh(kSqrt2OverPi * (x + 0.044715 * at::pow(x, 3.0))));
}

class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t n, double eps, bool initialize) : eps_(eps) {
    weight_ = register_parameter("weight", new_parameter({n}, initialize, [](at::Tensor& t) { t.fill_(1.0); }));
    bias_ = register_parameter("bias", new_parameter({n}, initialize, [](at::Tensor& t) { t.zero_(); }));
  }
  at::Tensor forward(const at::Tensor& x) { return at::layer_norm(x, {weight_.size(0)}, weight_, bias_, eps_); }

 private:
  double eps_;
  at::Tensor weight_, bias_;
};

class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t count, int64_t dim, bool initialize) {
    auto normal = [](at::Tensor& t) { t.normal_(0.0, 0.02); };  // transformers' CLIP initializer_range
    weight_ = register_parameter("weight", new_parameter({count, dim}, initialize, normal));
  }
  at::Tensor forward(const at::Tensor& ids) { return at::embedding(weight_, ids); }
  const at::Tensor& weight() const { return weight_; }

 private:
  at::Tensor weight_;
};

class CLIPAttentionImpl : public torch::nn::Module {
 public:
  CLIPAttentionImpl(int64_t hidden, int64_t heads, bool init)
      : heads_(heads), scale_(std::pow(double(hidden / heads), -0.5)) {
    q_proj_ = register_module("q_proj", std::make_shared<LinearImpl>(hidden, hidden, true, init));
    k_proj_ = register_module("k_proj", std::make_shared<LinearImpl>(hidden, hidden, true, init));
    v_proj_ = register_module("v_proj", std::make_shared<LinearImpl>(hidden, hidden, true, init));
    out_proj_ = register_module("out_proj", std::make_shared<LinearImpl>(hidden, hidden, true, init));
  }

  // x: [B, T, C]; allowed: bool, broadcastable to [B, heads, T, T], true where a query may attend to a key.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& allowed) {
    const int64_t b = x.size(0), t = x.size(1), c = x.size(2), d = c / heads_;
    auto split = [&](const at::Tensor& y) { return y.view({b, t, heads_, d}).transpose(1, 2); };
    // transformers scales the queries before the product; same order here for parity.
    at::Tensor q = split(q_proj_->forward(x) * scale_);
    at::Tensor k = split(k_proj_->forward(x));
    at::Tensor v = split(v_proj_->forward(x));
    at::Tensor scores = at::matmul(q, k.transpose(-1, -2));
    // The lowest finite value, not -inf, as transformers does: a fully masked row (left padding) then becomes a
    // uniform average instead of NaN.
    scores = scores.masked_fill(allowed.logical_not(), at::Scalar(lowest(scores.scalar_type())));
    at::Tensor out = at::matmul(at::softmax(scores, -1), v);
    return out_proj_->forward(out.transpose(1, 2).reshape({b, t, c}));
  }

 private:
  static double lowest(c10::ScalarType dtype) {
    switch (dtype) {
      case c10::kHalf:
        return -65504.0;
      case c10::kBFloat16:
        return -3.3895313892515355e38;
      case c10::kDouble:
        return std::numeric_limits<double>::lowest();
      default:
        return std::numeric_limits<float>::lowest();
    }
  }

  int64_t heads_;
  double scale_;
  std::shared_ptr<LinearImpl> q_proj_, k_proj_, v_proj_, out_proj_;
};

class CLIPMLPImpl : public torch::nn::Module {
 public:
  CLIPMLPImpl(int64_t hidden, int64_t intermediate, std::string act, bool init) : act_(std::move(act)) {
    fc1_ = register_module("fc1", std::make_shared<LinearImpl>(hidden, intermediate, true, init));
    fc2_ = register_module("fc2", std::make_shared<LinearImpl>(intermediate, hidden, true, init));
  }
  at::Tensor forward(const at::Tensor& x) { return fc2_->forward(activate(act_, fc1_->forward(x))); }

 private:
  std::string act_;
  std::shared_ptr<LinearImpl> fc1_, fc2_;
};

std::shared_ptr<LayerNormImpl> layer_norm(const CLIPTextConfig& c, bool init) {
  return std::make_shared<LayerNormImpl>(c.hidden_size, c.layer_norm_eps, init);
}

class CLIPEncoderLayerImpl : public torch::nn::Module {
 public:
  CLIPEncoderLayerImpl(const CLIPTextConfig& c, bool init) {
    self_attn_ =
        register_module("self_attn", std::make_shared<CLIPAttentionImpl>(c.hidden_size, c.num_attention_heads, init));
    layer_norm1_ = register_module("layer_norm1", layer_norm(c, init));
    mlp_ =
        register_module("mlp", std::make_shared<CLIPMLPImpl>(c.hidden_size, c.intermediate_size, c.hidden_act, init));
    layer_norm2_ = register_module("layer_norm2", layer_norm(c, init));
  }
  at::Tensor forward(const at::Tensor& x, const at::Tensor& allowed) {
    at::Tensor h = x + self_attn_->forward(layer_norm1_->forward(x), allowed);
    return h + mlp_->forward(layer_norm2_->forward(h));
  }

 private:
  std::shared_ptr<CLIPAttentionImpl> self_attn_;
  std::shared_ptr<LayerNormImpl> layer_norm1_, layer_norm2_;
  std::shared_ptr<CLIPMLPImpl> mlp_;
};

class CLIPEmbeddingsImpl : public torch::nn::Module {
 public:
  CLIPEmbeddingsImpl(const CLIPTextConfig& c, bool init) {
    token_embedding_ =
        register_module("token_embedding", std::make_shared<EmbeddingImpl>(c.vocab_size, c.hidden_size, init));
    position_embedding_ = register_module(
        "position_embedding", std::make_shared<EmbeddingImpl>(c.max_position_embeddings, c.hidden_size, init));
  }
  at::Tensor forward(const at::Tensor& input_ids) {
    // Positions are always 0..T-1 in the SD pipelines: take the leading rows instead of an index lookup.
    const int64_t t = input_ids.size(1);
    return token_embedding_->forward(input_ids) + position_embedding_->weight().narrow(0, 0, t).unsqueeze(0);
  }
  const at::Tensor& token_weight() const { return token_embedding_->weight(); }

 private:
  std::shared_ptr<EmbeddingImpl> token_embedding_, position_embedding_;
};

class CLIPEncoderImpl : public torch::nn::Module {
 public:
  CLIPEncoderImpl(const CLIPTextConfig& c, bool init) {
    auto list = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      layers_.push_back(std::make_shared<CLIPEncoderLayerImpl>(c, init));
      list->push_back(layers_.back());
    }
  }
  const std::vector<std::shared_ptr<CLIPEncoderLayerImpl>>& layers() const { return layers_; }

 private:
  std::vector<std::shared_ptr<CLIPEncoderLayerImpl>> layers_;
};

}  // namespace

class CLIPTextTransformerImpl : public torch::nn::Module {
 public:
  CLIPTextTransformerImpl(const CLIPTextConfig& c, bool init) : config_(c) {
    embeddings_ = register_module("embeddings", std::make_shared<CLIPEmbeddingsImpl>(c, init));
    encoder_ = register_module("encoder", std::make_shared<CLIPEncoderImpl>(c, init));
    final_layer_norm_ = register_module("final_layer_norm", layer_norm(c, init));
  }

  CLIPTextOutput forward(const at::Tensor& input_ids, const CLIPTextForwardOptions& options) {
    const int64_t b = input_ids.size(0), t = input_ids.size(1);
    at::Tensor h = embeddings_->forward(input_ids);

    // CLIP's text transformer is causal: token i sees tokens 0..i only.
    at::Tensor allowed = at::ones({t, t}, input_ids.options().dtype(at::kBool)).tril().view({1, 1, t, t});
    if (options.attention_mask.defined()) {
      const at::Tensor& m = options.attention_mask;
      if (m.dim() != 2 || m.size(0) != b || m.size(1) != t) {
        throw Error(fmt::format("CLIP text encoder: attention_mask must be [{}, {}] like input_ids, got {}", b, t,
                                fmt::join(m.sizes(), "x")));
      }
      allowed = allowed.logical_and(m.to(input_ids.device()).ne(0).view({b, 1, 1, t}));
    }

    CLIPTextOutput out;
    for (const auto& layer : encoder_->layers()) {
      if (options.output_hidden_states) out.hidden_states.push_back(h);
      h = layer->forward(h, allowed);
    }
    if (options.output_hidden_states) out.hidden_states.push_back(h);
    out.last_hidden_state = final_layer_norm_->forward(h);

    at::Tensor index;
    if (config_.eos_token_id == 2) {
      index = input_ids.argmax(-1);  // legacy configs: the end token has the largest id (first one wins on ties)
    } else {
      index = input_ids.eq(config_.eos_token_id).to(at::kInt).argmax(-1);  // first end token
    }
    const int64_t c = out.last_hidden_state.size(2);
    out.pooler_output = out.last_hidden_state.gather(1, index.view({b, 1, 1}).expand({b, 1, c})).squeeze(1);
    return out;
  }

  const at::Tensor& token_weight() const { return embeddings_->token_weight(); }
  at::Tensor final_layer_norm(const at::Tensor& x) { return final_layer_norm_->forward(x); }

 private:
  CLIPTextConfig config_;
  std::shared_ptr<CLIPEmbeddingsImpl> embeddings_;
  std::shared_ptr<CLIPEncoderImpl> encoder_;
  std::shared_ptr<LayerNormImpl> final_layer_norm_;
};

}  // namespace detail

CLIPTextModelImpl::CLIPTextModelImpl(const CLIPTextConfig& config, bool initialize) : config_(config) {
  config_.validate();
  text_model_ = register_module("text_model", std::make_shared<detail::CLIPTextTransformerImpl>(config_, initialize));
  if (config_.with_projection) {
    text_projection_ = register_module(
        "text_projection",
        std::make_shared<detail::LinearImpl>(config_.hidden_size, config_.projection_dim, false, initialize));
  }
}

CLIPTextOutput CLIPTextModelImpl::forward(const at::Tensor& input_ids, const CLIPTextForwardOptions& options) {
  if (!input_ids.defined() || input_ids.dim() != 2 || input_ids.size(0) == 0 || input_ids.size(1) == 0 ||
      at::isFloatingType(input_ids.scalar_type()) || input_ids.scalar_type() == at::kBool) {
    throw Error(
        fmt::format("CLIP text encoder: input_ids must be a non-empty [batch, tokens] integer tensor, got {} {}",
                    input_ids.defined() ? c10::toString(input_ids.scalar_type()) : "undefined",
                    input_ids.defined() ? fmt::format("[{}]", fmt::join(input_ids.sizes(), ", ")) : ""));
  }
  if (input_ids.size(1) > config_.max_position_embeddings) {
    throw Error(fmt::format("CLIP text encoder: {} tokens exceed max_position_embeddings {}", input_ids.size(1),
                            config_.max_position_embeddings));
  }
  const at::Tensor& weight = text_model_->token_weight();
  at::Tensor ids = input_ids.to(weight.device(), at::kLong);
  const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
  if (lo < 0 || hi >= config_.vocab_size) {
    throw Error(fmt::format("CLIP text encoder: token id {} is outside the vocabulary [0, {})", lo < 0 ? lo : hi,
                            config_.vocab_size));
  }
  CLIPTextOutput out = text_model_->forward(ids, options);
  if (text_projection_) {
    out.text_embeds = text_projection_->forward(out.pooler_output);
  }
  return out;
}

at::Tensor CLIPTextModelImpl::final_layer_norm(const at::Tensor& hidden_state) {
  return text_model_->final_layer_norm(hidden_state);
}

std::shared_ptr<CLIPTextModelImpl> CLIPTextModelImpl::from_pretrained(const std::filesystem::path& folder,
                                                                      const LoadOptions& options) {
  const CLIPTextConfig config = CLIPTextConfig::from_file(folder / "config.json");
  const bool low_precision = options.dtype == c10::kHalf || options.dtype == c10::kBFloat16;
  const auto weights = find_weights(folder, {"model"}, /*prefer_fp16=*/low_precision);
  auto model = std::make_shared<CLIPTextModelImpl>(config, /*initialize=*/false);
  LoadOptions load = options;
  // transformers saved position_ids as a persistent buffer before 4.31; we compute positions instead.
  load.ignore.push_back("text_model.embeddings.position_ids");
  load_weights(*model, io::Checkpoint::open(weights), load);
  model->eval();
  return model;
}

}  // namespace stylealigned::models
