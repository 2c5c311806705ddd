#include "stylealigned/models/unet.h"

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
#include "stylealigned/log.h"

namespace stylealigned::models {

// ---- Config ------------------------------------------------------------------------------------------------------

namespace {

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(fmt::format("{}: cannot open file", path.string()));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

constexpr const char* kCrossAttnDown = "CrossAttnDownBlock2D";
constexpr const char* kDown = "DownBlock2D";
constexpr const char* kCrossAttnUp = "CrossAttnUpBlock2D";
constexpr const char* kUp = "UpBlock2D";
constexpr const char* kMidCrossAttn = "UNetMidBlock2DCrossAttn";

// One entry per level: a single value is repeated (diffusers' int form), any other length must match.
std::vector<int64_t> per_level(const std::vector<int64_t>& values, size_t levels, const char* field) {
  if (values.size() == 1) return std::vector<int64_t>(levels, values[0]);
  if (values.size() != levels) {
    throw Error(fmt::format("UNetConfig: {} has {} entries ({}) but the model has {} levels (block_out_channels)",
                            field, values.size(), fmt::join(values, ", "), levels));
  }
  return values;
}

}  // namespace

UNetConfig UNetConfig::from_json(std::string_view json_text, std::string_view source) {
  const cfg::JsonConfig j(json_text, source);
  UNetConfig c;

  // Keys whose non-default values select code paths we do not implement.
  j.require("class_embed_type", {});
  j.require("num_class_embeds", {});
  j.require("encoder_hid_dim", {});
  j.require("encoder_hid_dim_type", {});
  j.require("time_cond_proj_dim", {});
  j.require("attention_type", {"default"});
  j.require("dual_cross_attention", {false});
  j.require("resnet_time_scale_shift", {"default"});
  j.require("reverse_transformer_layers_per_block", {});
  j.require("time_embedding_type", {"positional"});
  j.require("time_embedding_act_fn", {});
  j.require("timestep_post_act", {});
  j.require("cross_attention_norm", {});
  j.require("class_embeddings_concat", {false});
  j.require("act_fn", {"silu"});
  j.require("addition_embed_type", {"text_time"});
  if (j.has("only_cross_attention")) {
    const auto& v = j.raw("only_cross_attention");
    bool any_true = v.is_boolean() ? v.get<bool>() : false;
    if (v.is_array()) {
      for (const auto& item : v) any_true = any_true || !item.is_boolean() || item.get<bool>();
    } else if (!v.is_boolean()) {
      any_true = true;
    }
    if (any_true) j.fail("only_cross_attention", "not supported (supported: false)");
  }
  if (j.is_null("mid_block_type")) j.fail("mid_block_type", "null (no mid block) is not supported");
  c.mid_block_type = j.get_string("mid_block_type", c.mid_block_type);
  if (c.mid_block_type != kMidCrossAttn) {
    j.fail("mid_block_type", fmt::format("not supported (supported: \"{}\")", kMidCrossAttn));
  }
  if (j.get_double("dropout", 0.0) != 0.0) {
    warn(fmt::format("{}: dropout {} is ignored (dropout is not implemented; inference is unaffected)", source,
                     j.get_double("dropout", 0.0)));
  }

  c.sample_size = j.get_int("sample_size", 0);
  c.in_channels = j.get_int("in_channels", c.in_channels);
  c.out_channels = j.get_int("out_channels", c.out_channels);
  c.center_input_sample = j.get_bool("center_input_sample", c.center_input_sample);
  c.flip_sin_to_cos = j.get_bool("flip_sin_to_cos", c.flip_sin_to_cos);
  c.freq_shift = j.get_double("freq_shift", c.freq_shift);
  c.down_block_types = j.get_string_list("down_block_types", c.down_block_types);
  c.up_block_types = j.get_string_list("up_block_types", c.up_block_types);
  c.block_out_channels = j.get_int_list("block_out_channels", c.block_out_channels);
  c.layers_per_block = j.get_int_list("layers_per_block", c.layers_per_block);
  c.downsample_padding = j.get_int("downsample_padding", c.downsample_padding);
  c.mid_block_scale_factor = j.get_double("mid_block_scale_factor", c.mid_block_scale_factor);
  if (j.is_null("norm_num_groups")) j.fail("norm_num_groups", "null (no output GroupNorm) is not supported");
  c.norm_num_groups = j.get_int("norm_num_groups", c.norm_num_groups);
  c.norm_eps = j.get_double("norm_eps", c.norm_eps);
  c.cross_attention_dim = j.get_int_list("cross_attention_dim", c.cross_attention_dim);
  if (j.has("transformer_layers_per_block") && j.raw("transformer_layers_per_block").is_array()) {
    for (const auto& item : j.raw("transformer_layers_per_block")) {
      if (item.is_array()) {
        j.fail("transformer_layers_per_block",
               "nested lists (an asymmetric UNet with reverse_transformer_layers_per_block) are not supported");
      }
    }
  }
  c.transformer_layers_per_block = j.get_int_list("transformer_layers_per_block", c.transformer_layers_per_block);
  // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`; attention_head_dim has always
  // meant the number of heads in these configs.
  if (j.has("num_attention_heads")) {
    c.num_attention_heads = j.get_int_list("num_attention_heads", c.num_attention_heads);
  } else {
    c.num_attention_heads = j.get_int_list("attention_head_dim", c.num_attention_heads);
  }
  c.use_linear_projection = j.get_bool("use_linear_projection", c.use_linear_projection);
  c.upcast_attention = j.get_bool("upcast_attention", c.upcast_attention);
  c.addition_embed_type = j.get_string("addition_embed_type", "");
  c.addition_time_embed_dim = j.get_int("addition_time_embed_dim", 0);
  c.projection_class_embeddings_input_dim = j.get_int("projection_class_embeddings_input_dim", 0);
  c.time_embedding_dim = j.get_int("time_embedding_dim", 0);
  c.conv_in_kernel = j.get_int("conv_in_kernel", c.conv_in_kernel);
  c.conv_out_kernel = j.get_int("conv_out_kernel", c.conv_out_kernel);

  try {
    return c.normalized();
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", source, e.what()));
  }
}

UNetConfig UNetConfig::from_file(const std::filesystem::path& path) {
  return from_json(read_text_file(path), path.string());
}

UNetConfig UNetConfig::stable_diffusion_v1_5() {
  UNetConfig c;
  c.sample_size = 64;
  c.cross_attention_dim = {768};
  c.num_attention_heads = {8};
  return c.normalized();
}

UNetConfig UNetConfig::stable_diffusion_xl_base() {
  UNetConfig c;
  c.sample_size = 128;
  c.down_block_types = {kDown, kCrossAttnDown, kCrossAttnDown};
  c.up_block_types = {kCrossAttnUp, kCrossAttnUp, kUp};
  c.block_out_channels = {320, 640, 1280};
  c.cross_attention_dim = {2048};
  c.transformer_layers_per_block = {1, 2, 10};
  c.num_attention_heads = {5, 10, 20};
  c.use_linear_projection = true;
  c.addition_embed_type = "text_time";
  c.addition_time_embed_dim = 256;
  c.projection_class_embeddings_input_dim = 2816;
  return c.normalized();
}

UNetConfig UNetConfig::normalized() const {
  UNetConfig c = *this;
  const size_t levels = c.block_out_channels.size();
  if (levels == 0) throw Error("UNetConfig: block_out_channels is empty");
  if (c.down_block_types.size() != levels || c.up_block_types.size() != levels) {
    throw Error(fmt::format(
        "UNetConfig: down_block_types ({}) and up_block_types ({}) must have one entry per block_out_channels ({})",
        c.down_block_types.size(), c.up_block_types.size(), levels));
  }
  for (const auto& t : c.down_block_types) {
    if (t != kCrossAttnDown && t != kDown) {
      throw Error(fmt::format("UNetConfig: down_block_types entry \"{}\" is not supported (supported: {}, {})", t,
                              kCrossAttnDown, kDown));
    }
  }
  for (const auto& t : c.up_block_types) {
    if (t != kCrossAttnUp && t != kUp) {
      throw Error(fmt::format("UNetConfig: up_block_types entry \"{}\" is not supported (supported: {}, {})", t,
                              kCrossAttnUp, kUp));
    }
  }
  if (c.mid_block_type != kMidCrossAttn) {
    throw Error(fmt::format("UNetConfig: mid_block_type \"{}\" is not supported (supported: {})", c.mid_block_type,
                            kMidCrossAttn));
  }
  c.layers_per_block = per_level(c.layers_per_block, levels, "layers_per_block");
  c.cross_attention_dim = per_level(c.cross_attention_dim, levels, "cross_attention_dim");
  c.transformer_layers_per_block = per_level(c.transformer_layers_per_block, levels, "transformer_layers_per_block");
  c.num_attention_heads = per_level(c.num_attention_heads, levels, "num_attention_heads (attention_head_dim)");

  auto positive = [](int64_t v, const char* field) {
    if (v <= 0) throw Error(fmt::format("UNetConfig: {} must be positive, got {}", field, v));
  };
  positive(c.in_channels, "in_channels");
  positive(c.out_channels, "out_channels");
  positive(c.norm_num_groups, "norm_num_groups");
  for (size_t i = 0; i < levels; ++i) {
    positive(c.block_out_channels[i], "block_out_channels");
    positive(c.layers_per_block[i], "layers_per_block");
    positive(c.cross_attention_dim[i], "cross_attention_dim");
    positive(c.transformer_layers_per_block[i], "transformer_layers_per_block");
    positive(c.num_attention_heads[i], "num_attention_heads (attention_head_dim)");
    if (c.block_out_channels[i] % c.norm_num_groups != 0) {
      throw Error(fmt::format("UNetConfig: block_out_channels {} is not divisible by norm_num_groups {}",
                              c.block_out_channels[i], c.norm_num_groups));
    }
  }
  if (c.conv_in_kernel <= 0 || c.conv_in_kernel % 2 == 0) {
    throw Error(fmt::format("UNetConfig: conv_in_kernel must be odd and positive, got {}", c.conv_in_kernel));
  }
  if (c.conv_out_kernel <= 0 || c.conv_out_kernel % 2 == 0) {
    throw Error(fmt::format("UNetConfig: conv_out_kernel must be odd and positive, got {}", c.conv_out_kernel));
  }
  if (!c.addition_embed_type.empty()) {
    if (c.addition_embed_type != "text_time") {
      throw Error(fmt::format("UNetConfig: addition_embed_type \"{}\" is not supported (supported: null, text_time)",
                              c.addition_embed_type));
    }
    positive(c.addition_time_embed_dim, "addition_time_embed_dim");
    positive(c.projection_class_embeddings_input_dim, "projection_class_embeddings_input_dim");
  }
  return c;
}

int64_t UNetConfig::time_embed_dim() const {
  return time_embedding_dim > 0 ? time_embedding_dim : block_out_channels.at(0) * 4;
}

// ---- Blocks ------------------------------------------------------------------------------------------------------

namespace detail {
using namespace layers;
namespace {  // block types are private to this file

/// What a down, mid or up block needs to build itself (the arguments diffusers' get_down_block/get_up_block pass).
struct BlockSpec {
  std::string prefix;
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t prev_output_channels = 0;  // up blocks
  int64_t temb_channels = 0;
  int64_t num_layers = 1;
  bool cross_attention = false;
  int64_t transformer_layers = 1;
  int64_t heads = 1;
  int64_t cross_attention_dim = 0;
  int64_t groups = 32;
  double eps = 1e-5;
  bool use_linear_projection = false;
  bool upcast_attention = false;
  bool add_resample = false;
  int64_t downsample_padding = 1;
  double output_scale_factor = 1.0;
};

Transformer2DModel make_transformer(const BlockSpec& s, int64_t index, int64_t channels) {
  Transformer2DSpec t;
  t.heads = s.heads;
  t.dim_head = channels / s.heads;
  t.in_channels = channels;
  t.num_layers = s.transformer_layers;
  t.cross_attention_dim = s.cross_attention_dim;
  t.norm_num_groups = s.groups;
  t.use_linear_projection = s.use_linear_projection;
  t.upcast_attention = s.upcast_attention;
  return Transformer2DModel(fmt::format("{}.attentions.{}", s.prefix, index), t);
}

/// CrossAttnDownBlock2D (with attentions) or DownBlock2D (without).
class UNetDownBlockImpl : public torch::nn::Module {
 public:
  explicit UNetDownBlockImpl(const BlockSpec& s)
      : torch::nn::Module(s.cross_attention ? "CrossAttnDownBlock2D" : "DownBlock2D") {
    auto resnet_list = register_module("resnets", torch::nn::ModuleList());
    torch::nn::ModuleList attention_list{nullptr};
    if (s.cross_attention) attention_list = register_module("attentions", torch::nn::ModuleList());
    for (int64_t i = 0; i < s.num_layers; ++i) {
      const int64_t in = i == 0 ? s.in_channels : s.out_channels;
      resnets.push_back(ResnetBlock2D(in, s.out_channels, s.temb_channels, s.groups, s.eps));
      resnet_list->push_back(resnets.back());
      if (s.cross_attention) {
        attentions.push_back(make_transformer(s, i, s.out_channels));
        attention_list->push_back(attentions.back());
      }
    }
    if (s.add_resample) {
      downsampler = Downsample2D(s.out_channels, s.out_channels, s.downsample_padding);
      register_module("downsamplers", torch::nn::ModuleList(downsampler));
    }
  }

  /// Appends every intermediate output to `skips` (diffusers' output_states).
  at::Tensor forward(at::Tensor h, const at::Tensor& temb, const at::Tensor& context, const ForwardContext& ctx,
                     std::vector<at::Tensor>& skips) {
    for (size_t i = 0; i < resnets.size(); ++i) {
      h = resnets[i]->forward(h, temb, ctx);
      if (!attentions.empty()) h = attentions[i]->forward(h, context, ctx);
      skips.push_back(h);
    }
    if (!downsampler.is_empty()) {
      h = downsampler->forward(h);
      skips.push_back(h);
    }
    return h;
  }

  std::vector<ResnetBlock2D> resnets;
  std::vector<Transformer2DModel> attentions;
  Downsample2D downsampler{nullptr};
};
TORCH_MODULE(UNetDownBlock);

/// UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs.
class UNetMidBlockImpl : public torch::nn::Module {
 public:
  explicit UNetMidBlockImpl(const BlockSpec& s) : torch::nn::Module("UNetMidBlock2DCrossAttn") {
    auto resnet_list = register_module("resnets", torch::nn::ModuleList());
    auto attention_list = register_module("attentions", torch::nn::ModuleList());
    auto add_resnet = [&] {
      resnets.push_back(
          ResnetBlock2D(s.in_channels, s.in_channels, s.temb_channels, s.groups, s.eps, s.output_scale_factor));
      resnet_list->push_back(resnets.back());
    };
    add_resnet();
    for (int64_t i = 0; i < s.num_layers; ++i) {
      attentions.push_back(make_transformer(s, i, s.in_channels));
      attention_list->push_back(attentions.back());
      add_resnet();
    }
  }

  at::Tensor forward(at::Tensor h, const at::Tensor& temb, const at::Tensor& context, const ForwardContext& ctx) {
    h = resnets[0]->forward(h, temb, ctx);
    for (size_t i = 0; i < attentions.size(); ++i) {
      h = attentions[i]->forward(h, context, ctx);
      h = resnets[i + 1]->forward(h, temb, ctx);
    }
    return h;
  }

  std::vector<ResnetBlock2D> resnets;
  std::vector<Transformer2DModel> attentions;
};
TORCH_MODULE(UNetMidBlock);

/// CrossAttnUpBlock2D (with attentions) or UpBlock2D (without).
class UNetUpBlockImpl : public torch::nn::Module {
 public:
  explicit UNetUpBlockImpl(const BlockSpec& s)
      : torch::nn::Module(s.cross_attention ? "CrossAttnUpBlock2D" : "UpBlock2D") {
    auto resnet_list = register_module("resnets", torch::nn::ModuleList());
    torch::nn::ModuleList attention_list{nullptr};
    if (s.cross_attention) attention_list = register_module("attentions", torch::nn::ModuleList());
    for (int64_t i = 0; i < s.num_layers; ++i) {
      const int64_t skip = i == s.num_layers - 1 ? s.in_channels : s.out_channels;
      const int64_t in = i == 0 ? s.prev_output_channels : s.out_channels;
      resnets.push_back(ResnetBlock2D(in + skip, s.out_channels, s.temb_channels, s.groups, s.eps));
      resnet_list->push_back(resnets.back());
      if (s.cross_attention) {
        attentions.push_back(make_transformer(s, i, s.out_channels));
        attention_list->push_back(attentions.back());
      }
    }
    if (s.add_resample) {
      upsampler = Upsample2D(s.out_channels, s.out_channels);
      register_module("upsamplers", torch::nn::ModuleList(upsampler));
    }
  }

  /// `skips` holds this block's skip connections in down-path order; they are consumed from the back.
  at::Tensor forward(at::Tensor h, std::vector<at::Tensor> skips, const at::Tensor& temb, const at::Tensor& context,
                     const ForwardContext& ctx, std::optional<std::vector<int64_t>> upsample_size) {
    for (size_t i = 0; i < resnets.size(); ++i) {
      h = at::cat({h, skips.back()}, 1);
      skips.pop_back();
      h = resnets[i]->forward(h, temb, ctx);
      if (!attentions.empty()) h = attentions[i]->forward(h, context, ctx);
    }
    if (!upsampler.is_empty()) h = upsampler->forward(h, std::move(upsample_size));
    return h;
  }

  std::vector<ResnetBlock2D> resnets;
  std::vector<Transformer2DModel> attentions;
  Upsample2D upsampler{nullptr};
};
TORCH_MODULE(UNetUpBlock);

}  // namespace

struct UNetParts {
  Conv2d conv_in{nullptr};
  TimestepEmbedding time_embedding{nullptr};
  TimestepEmbedding add_embedding{nullptr};
  std::vector<UNetDownBlock> down;
  UNetMidBlock mid{nullptr};
  std::vector<UNetUpBlock> up;
  GroupNorm conv_norm_out{nullptr};
  Conv2d conv_out{nullptr};
  int64_t num_upsamplers = 0;
};

}  // namespace detail

// ---- Model -------------------------------------------------------------------------------------------------------

UNet2DConditionModelImpl::UNet2DConditionModelImpl(const UNetConfig& config)
    : torch::nn::Module("UNet2DConditionModel"),
      config_(config.normalized()),
      parts_(std::make_unique<detail::UNetParts>()) {
  using namespace detail;
  const UNetConfig& c = config_;
  UNetParts& p = *parts_;
  const auto levels = static_cast<size_t>(c.levels());
  const int64_t temb = c.time_embed_dim();

  // Registration order follows diffusers' __init__, so named_parameters() lists tensors in the same order.
  p.conv_in = register_module("conv_in", make_conv(c.in_channels, c.block_out_channels[0], c.conv_in_kernel));
  p.time_embedding = register_module("time_embedding", TimestepEmbedding(c.block_out_channels[0], temb));
  if (c.addition_embed_type == "text_time") {
    p.add_embedding =
        register_module("add_embedding", TimestepEmbedding(c.projection_class_embeddings_input_dim, temb));
  }
  auto down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  auto up_blocks = register_module("up_blocks", torch::nn::ModuleList());

  auto base_spec = [&](std::string prefix) {
    BlockSpec s;
    s.prefix = std::move(prefix);
    s.temb_channels = temb;
    s.groups = c.norm_num_groups;
    s.eps = c.norm_eps;
    s.use_linear_projection = c.use_linear_projection;
    s.upcast_attention = c.upcast_attention;
    return s;
  };

  std::vector<std::string> down_names, up_names, mid_names;
  auto collect = [](std::vector<std::string>& names, const std::vector<Transformer2DModel>& transformers) {
    for (const auto& t : transformers) {
      for (auto& n : t->attention_layer_names()) names.push_back(std::move(n));
    }
  };

  int64_t output_channel = c.block_out_channels[0];
  for (size_t i = 0; i < levels; ++i) {
    BlockSpec s = base_spec(fmt::format("down_blocks.{}", i));
    s.in_channels = output_channel;
    output_channel = c.block_out_channels[i];
    s.out_channels = output_channel;
    s.num_layers = c.layers_per_block[i];
    s.cross_attention = c.down_block_types[i] == kCrossAttnDown;
    s.transformer_layers = c.transformer_layers_per_block[i];
    s.heads = c.num_attention_heads[i];
    s.cross_attention_dim = c.cross_attention_dim[i];
    s.add_resample = i + 1 < levels;
    s.downsample_padding = c.downsample_padding;
    p.down.push_back(UNetDownBlock(s));
    down_blocks->push_back(p.down.back());
    collect(down_names, p.down.back()->attentions);
  }

  {
    BlockSpec s = base_spec("mid_block");
    s.in_channels = c.block_out_channels.back();
    s.num_layers = 1;
    s.cross_attention = true;
    s.transformer_layers = c.transformer_layers_per_block.back();
    s.heads = c.num_attention_heads.back();
    s.cross_attention_dim = c.cross_attention_dim.back();
    s.output_scale_factor = c.mid_block_scale_factor;
    p.mid = register_module("mid_block", UNetMidBlock(s));
    collect(mid_names, p.mid->attentions);
  }

  output_channel = c.block_out_channels.back();
  for (size_t i = 0; i < levels; ++i) {
    const size_t r = levels - 1 - i;  // the matching down level
    BlockSpec s = base_spec(fmt::format("up_blocks.{}", i));
    s.prev_output_channels = output_channel;
    output_channel = c.block_out_channels[r];
    s.out_channels = output_channel;
    s.in_channels = c.block_out_channels[r == 0 ? 0 : r - 1];
    s.num_layers = c.layers_per_block[r] + 1;
    s.cross_attention = c.up_block_types[i] == kCrossAttnUp;
    s.transformer_layers = c.transformer_layers_per_block[r];
    s.heads = c.num_attention_heads[r];
    s.cross_attention_dim = c.cross_attention_dim[r];
    s.add_resample = i + 1 < levels;
    if (s.add_resample) ++p.num_upsamplers;
    p.up.push_back(UNetUpBlock(s));
    up_blocks->push_back(p.up.back());
    collect(up_names, p.up.back()->attentions);
  }

  p.conv_norm_out = register_module("conv_norm_out", GroupNorm(c.norm_num_groups, c.block_out_channels[0], c.norm_eps));
  p.conv_out = register_module("conv_out", make_conv(c.block_out_channels[0], c.out_channels, c.conv_out_kernel));

  // diffusers' attn_processors order: down_blocks, up_blocks, then mid_block (registered after up_blocks' list).
  std::vector<std::string> names = std::move(down_names);
  names.insert(names.end(), up_names.begin(), up_names.end());
  names.insert(names.end(), mid_names.begin(), mid_names.end());
  processors_ = ProcessorMap(std::move(names));
}

UNet2DConditionModelImpl::~UNet2DConditionModelImpl() = default;

namespace {

void check_rows(const at::Tensor& t, const char* name, int64_t batch, int64_t dims) {
  if (!t.defined()) throw Error(fmt::format("UNet2DConditionModel::forward: {} is missing", name));
  if (t.dim() != dims || t.size(0) != batch) {
    throw Error(
        fmt::format("UNet2DConditionModel::forward: {} has shape {}, expected {} dimensions with {} rows "
                    "(the batch of sample)",
                    name, fmt::join(t.sizes(), "x"), dims, batch));
  }
}

}  // namespace

at::Tensor UNet2DConditionModelImpl::forward(const at::Tensor& sample_in, const at::Tensor& timestep,
                                             const at::Tensor& encoder_hidden_states,
                                             const UNetForwardOptions& options) {
  using namespace detail;
  const UNetConfig& c = config_;
  UNetParts& p = *parts_;

  if (!sample_in.defined() || sample_in.dim() != 4 || sample_in.size(1) != c.in_channels) {
    throw Error(fmt::format("UNet2DConditionModel::forward: sample must be [batch, {}, height, width], got {}",
                            c.in_channels,
                            sample_in.defined() ? fmt::format("{}", fmt::join(sample_in.sizes(), "x"))
                                                : std::string("an undefined tensor")));
  }
  const int64_t batch = sample_in.size(0);
  check_rows(encoder_hidden_states, "encoder_hidden_states", batch, 3);
  for (size_t i = 0; i < c.down_block_types.size(); ++i) {
    if (c.down_block_types[i] == kCrossAttnDown && encoder_hidden_states.size(2) != c.cross_attention_dim[i]) {
      throw Error(
          fmt::format("UNet2DConditionModel::forward: encoder_hidden_states has {} channels, the model's "
                      "cross_attention_dim is {}",
                      encoder_hidden_states.size(2), c.cross_attention_dim[i]));
    }
  }
  if (!timestep.defined() || timestep.dim() > 1 || (timestep.numel() != 1 && timestep.numel() != batch)) {
    throw Error(fmt::format("UNet2DConditionModel::forward: timestep must be 0-d, [1] or [{}], got {}", batch,
                            timestep.defined() ? fmt::format("[{}]", fmt::join(timestep.sizes(), ", "))
                                               : std::string("an undefined tensor")));
  }

  BatchLayout own_layout;
  const BatchLayout* layout = options.layout;
  if (layout == nullptr) {
    own_layout = BatchLayout::independent(batch);
    layout = &own_layout;
  } else {
    layout->check_batch(batch, "UNet2DConditionModel::forward (UNetForwardOptions::layout)");
  }
  const ForwardContext ctx{*layout, &processors_, norm_hook_.get()};

  // Odd latent sizes: the up path then resizes to each skip connection's size instead of doubling.
  const int64_t up_factor = int64_t{1} << p.num_upsamplers;
  const bool forward_upsample_size = sample_in.size(2) % up_factor != 0 || sample_in.size(3) % up_factor != 0;

  at::Tensor sample = c.center_input_sample ? sample_in * 2.0 - 1.0 : sample_in;

  // Time embedding (+ SDXL's added micro-conditioning).
  const at::Tensor timesteps = timestep.reshape({-1}).to(sample.device()).expand({batch});
  const at::Tensor t_emb =
      timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(sample.scalar_type());
  at::Tensor emb = p.time_embedding->forward(t_emb);
  if (c.addition_embed_type == "text_time") {
    check_rows(options.text_embeds, "text_embeds (SDXL pooled text embeddings)", batch, 2);
    check_rows(options.time_ids, "time_ids (SDXL micro-conditioning)", batch, 2);
    const int64_t total = options.text_embeds.size(1) + options.time_ids.size(1) * c.addition_time_embed_dim;
    if (total != c.projection_class_embeddings_input_dim) {
      throw Error(
          fmt::format("UNet2DConditionModel::forward: text_embeds ({} channels) and time_ids ({} values x {}) "
                      "give {} inputs, add_embedding expects projection_class_embeddings_input_dim = {}",
                      options.text_embeds.size(1), options.time_ids.size(1), c.addition_time_embed_dim, total,
                      c.projection_class_embeddings_input_dim));
    }
    at::Tensor time_embeds = timestep_embedding(options.time_ids.flatten().to(sample.device()),
                                                c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
                                 .reshape({batch, -1});
    at::Tensor add_embeds = at::cat({options.text_embeds.to(emb.scalar_type()), time_embeds.to(emb.scalar_type())}, -1);
    emb = emb + p.add_embedding->forward(add_embeds);
  }

  sample = p.conv_in->forward(sample);
  std::vector<at::Tensor> skips{sample};
  for (auto& block : p.down) sample = block->forward(sample, emb, encoder_hidden_states, ctx, skips);
  sample = p.mid->forward(sample, emb, encoder_hidden_states, ctx);
  for (size_t i = 0; i < p.up.size(); ++i) {
    auto& block = p.up[i];
    const size_t n = block->resnets.size();
    std::vector<at::Tensor> block_skips(skips.end() - static_cast<std::ptrdiff_t>(n), skips.end());
    skips.resize(skips.size() - n);
    std::optional<std::vector<int64_t>> upsample_size;
    if (i + 1 < p.up.size() && forward_upsample_size) {
      upsample_size = std::vector<int64_t>{skips.back().size(2), skips.back().size(3)};
    }
    sample = block->forward(sample, std::move(block_skips), emb, encoder_hidden_states, ctx, std::move(upsample_size));
  }

  sample = at::silu(p.conv_norm_out->forward(sample, ctx));
  // NCHW out whatever layout the blocks ran in (packed convolutions give channels-last): callers and the
  // scheduler index latents as plain tensors.
  return p.conv_out->forward(sample).contiguous();
}

UNet2DConditionModel UNet2DConditionModel::from_config(const UNetConfig& config) {
  return UNet2DConditionModel(std::make_shared<UNet2DConditionModelImpl>(config));
}

UNet2DConditionModel UNet2DConditionModel::from_pretrained(const std::filesystem::path& folder,
                                                           const LoadOptions& options) {
  const UNetConfig config = UNetConfig::from_file(folder / "config.json");
  std::shared_ptr<UNet2DConditionModelImpl> impl;
  {
    // The checkpoint overwrites every parameter: do not spend memory on random ones first.
    layers::PlaceholderParametersGuard placeholders;
    impl = std::make_shared<UNet2DConditionModelImpl>(config);
  }
  const auto weights = find_weights(folder, {"diffusion_pytorch_model"}, options.dtype == at::kHalf);
  load_weights(*impl, io::Checkpoint::open(weights), options);
  return UNet2DConditionModel(std::move(impl));
}

}  // namespace stylealigned::models
