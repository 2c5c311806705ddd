#include "models/layers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "internal/onednn.h"
#include "stylealigned/error.h"

namespace stylealigned::models::layers {

namespace {
thread_local bool placeholder_parameters = false;
}  // namespace

PlaceholderParametersGuard::PlaceholderParametersGuard() : previous_(placeholder_parameters) {
  placeholder_parameters = true;
}
PlaceholderParametersGuard::~PlaceholderParametersGuard() { placeholder_parameters = previous_; }

at::Tensor new_parameter(at::IntArrayRef shape, const std::function<void(at::Tensor&)>& fill) {
  if (placeholder_parameters) return at::zeros({}).expand(shape);
  at::Tensor t = at::empty(shape);
  fill(t);
  return t;
}

namespace {
// PyTorch's default for Linear and Conv2d (kaiming_uniform_ with a = sqrt(5), and the matching bias bound): both
// reduce to U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
std::function<void(at::Tensor&)> default_uniform(int64_t fan_in) {
  const double bound = fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
  return [bound](at::Tensor& t) { t.uniform_(-bound, bound); };
}
void fill_ones(at::Tensor& t) { t.fill_(1.0); }
void fill_zeros(at::Tensor& t) { t.zero_(); }
}  // namespace

LinearImpl::LinearImpl(int64_t in_features, int64_t out_features, bool with_bias) : torch::nn::Module("Linear") {
  weight = register_parameter("weight", new_parameter({out_features, in_features}, default_uniform(in_features)));
  if (with_bias) bias = register_parameter("bias", new_parameter({out_features}, default_uniform(in_features)));
}

at::Tensor LinearImpl::forward(const at::Tensor& x) {
  // fp32 CPU inference: oneDNN's matmul on the weight as stored (internal/onednn.h says why); tiny products (time
  // embeddings, pooled text) stay on at::linear, where a primitive lookup would cost more than the product.
  if (x.numel() * weight.size(0) >= (int64_t{1} << 18)) {
    at::Tensor y = detail::onednn::linear(x, weight, bias);
    if (y.defined()) return y;
  }
  return at::linear(x, weight, bias);
}

Conv2dImpl::Conv2dImpl(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride, int64_t padding)
    : torch::nn::Module("Conv2d"), stride_(stride), padding_(padding) {
  const int64_t fan_in = in_channels * kernel * kernel;
  weight =
      register_parameter("weight", new_parameter({out_channels, in_channels, kernel, kernel}, default_uniform(fan_in)));
  bias = register_parameter("bias", new_parameter({out_channels}, default_uniform(fan_in)));
}

at::Tensor Conv2dImpl::forward(const at::Tensor& x) {
  namespace onednn = ::stylealigned::detail::onednn;
  if (onednn::pack_conv_weights(x.scalar_type())) {
    at::Tensor y = onednn::conv2d_packed(x, weight, bias, stride_, padding_, packed_);
    if (y.defined()) return y;
  }
  // The plain kernels read NCHW; a channels-last input (from a packed neighbour, or a host's tensor) is copied
  // once rather than left to ATen's path, which reorders the weight on every call.
  const at::Tensor input = x.is_cpu() && !x.is_contiguous() ? x.contiguous() : x;
  at::Tensor y = onednn::conv2d(input, weight, bias, stride_, padding_);
  if (y.defined()) return y;
  return at::conv2d(input, weight, bias, {stride_, stride_}, {padding_, padding_});
}

LayerNormImpl::LayerNormImpl(int64_t dim, double eps) : torch::nn::Module("LayerNorm"), dim_(dim), eps_(eps) {
  weight = register_parameter("weight", new_parameter({dim}, fill_ones));
  bias = register_parameter("bias", new_parameter({dim}, fill_zeros));
}

namespace {
// libtorch 1.13's bf16 CPU norm kernels run about 8x slower than fp32 (GroupNorm: 0.9 s vs 0.11 s per SD1.5
// 512x512 batch-2 forward); in fp32 and back costs two conversion passes and gives fp32 statistics.
bool norm_in_float(const at::Tensor& x) { return x.is_cpu() && x.scalar_type() == at::kBFloat16; }
}  // namespace

at::Tensor LayerNormImpl::forward(const at::Tensor& x) {
  if (norm_in_float(x)) {
    return at::layer_norm(x.to(at::kFloat), {dim_}, weight.to(at::kFloat), bias.to(at::kFloat), eps_)
        .to(x.scalar_type());
  }
  return at::layer_norm(x, {dim_}, weight, bias, eps_);
}

Conv2d make_conv(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t padding) {
  return Conv2d(in, out, kernel, stride, padding < 0 ? (kernel - 1) / 2 : padding);
}

Linear make_linear(int64_t in, int64_t out, bool bias) { return Linear(in, out, bias); }

LayerNorm make_layer_norm(int64_t dim, double eps) { return LayerNorm(dim, eps); }

// ---- GroupNorm --------------------------------------------------------------------------------------------------

GroupNormImpl::GroupNormImpl(int64_t groups_, int64_t channels_, double eps_)
    : torch::nn::Module("GroupNorm"), groups(groups_), channels(channels_), eps(eps_) {
  if (groups <= 0 || channels % groups != 0) {
    throw Error(
        fmt::format("GroupNorm: {} channels cannot be split into {} groups (norm_num_groups)", channels, groups));
  }
  weight = register_parameter("weight", new_parameter({channels}, fill_ones));
  bias = register_parameter("bias", new_parameter({channels}, fill_zeros));
}

at::Tensor GroupNormImpl::forward(const at::Tensor& x, const ForwardContext& ctx) {
  if (ctx.norm_hook != nullptr) return ctx.norm_hook->group_norm(x, groups, weight, bias, eps, ctx.layout);
  if (norm_in_float(x)) {
    return at::group_norm(x.to(at::kFloat), groups, weight.to(at::kFloat), bias.to(at::kFloat), eps)
        .to(x.scalar_type());
  }
  return at::group_norm(x, groups, weight, bias, eps);
}

// ---- Attention --------------------------------------------------------------------------------------------------

AttentionImpl::AttentionImpl(std::string layer_name, const AttentionSpec& spec)
    : torch::nn::Module("Attention"),
      layer_name_(std::move(layer_name)),
      kind_(spec.cross_attention_dim > 0 ? AttentionKind::cross_attention : AttentionKind::self_attention),
      spec_(spec),
      scale_(1.0 / std::sqrt(static_cast<double>(spec.dim_head))) {
  const int64_t inner = spec.heads * spec.dim_head;
  const int64_t kv_dim = spec.cross_attention_dim > 0 ? spec.cross_attention_dim : spec.query_dim;
  if (spec.norm_num_groups > 0) {
    group_norm = register_module("group_norm", GroupNorm(spec.norm_num_groups, spec.query_dim, spec.eps));
  }
  const bool legacy = spec.legacy_names;
  to_q = register_module(legacy ? "query" : "to_q", make_linear(spec.query_dim, inner, spec.bias));
  to_k = register_module(legacy ? "key" : "to_k", make_linear(kv_dim, inner, spec.bias));
  to_v = register_module(legacy ? "value" : "to_v", make_linear(kv_dim, inner, spec.bias));
  out_proj = make_linear(inner, spec.query_dim, spec.out_bias);
  if (legacy) {
    register_module("proj_attn", out_proj);
  } else {
    to_out = register_module("to_out", torch::nn::ModuleList(out_proj, Placeholder()));
  }
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, const at::Tensor& context, const ForwardContext& ctx) {
  const bool spatial = x.dim() == 4;
  const int64_t batch = x.size(0);
  at::Tensor h = spatial ? x.flatten(2).transpose(1, 2) : x;  // [B, H*W, C]
  if (!group_norm.is_empty()) h = group_norm->forward(h.transpose(1, 2), ctx).transpose(1, 2);

  const at::Tensor q = to_q->forward(h);
  const at::Tensor& source = context.defined() ? context : h;
  const at::Tensor k = to_k->forward(source);
  const at::Tensor v = to_v->forward(source);
  const int64_t heads = spec_.heads;
  const int64_t head_dim = k.size(-1) / heads;
  auto split = [&](const at::Tensor& t) { return t.view({batch, -1, heads, head_dim}).transpose(1, 2); };

  AttentionProcessor& processor =
      ctx.processors != nullptr ? ctx.processors->at(layer_name_) : *default_attention_processor();
  const AttentionCall call{layer_name_, kind_, ctx.layout, scale_, spec_.upcast_attention};
  at::Tensor out = processor.attend(split(q), split(k), split(v), call);
  out = out.transpose(1, 2).reshape({batch, -1, heads * head_dim}).to(q.scalar_type());
  out = out_proj->forward(out);

  if (spatial) out = out.transpose(-1, -2).reshape(x.sizes());
  if (spec_.residual_connection) out = out + x;
  if (spec_.rescale_output_factor != 1.0) out = out / spec_.rescale_output_factor;
  return out;
}

// ---- Feed-forward and transformer -------------------------------------------------------------------------------

GEGLUImpl::GEGLUImpl(int64_t dim_in, int64_t dim_out) : torch::nn::Module("GEGLU") {
  proj = register_module("proj", make_linear(dim_in, dim_out * 2, true));
}

at::Tensor GEGLUImpl::forward(const at::Tensor& x) {
  at::Tensor fused = detail::onednn::geglu(x, proj->weight, proj->bias);
  if (fused.defined()) return fused;
  const at::Tensor y = proj->forward(x);
  auto parts = y.chunk(2, -1);
  if (at::GradMode::is_enabled() && y.requires_grad()) return parts[0] * at::gelu(parts[1]);
  // Inference: both halves in place. The result is a column slice of y (rows 2x apart), which the next Linear
  // reads as it is; the out-of-place form allocated and wrote two more [tokens, inner] tensors per block.
  at::gelu_(parts[1]);
  return parts[0].mul_(parts[1]);
}

FeedForwardImpl::FeedForwardImpl(int64_t dim, int64_t mult) : torch::nn::Module("FeedForward") {
  const int64_t inner = dim * mult;
  geglu = GEGLU(dim, inner);
  out = make_linear(inner, dim, true);
  net = register_module("net", torch::nn::ModuleList(geglu, Placeholder(), out));
}

at::Tensor FeedForwardImpl::forward(const at::Tensor& x) { return out->forward(geglu->forward(x)); }

BasicTransformerBlockImpl::BasicTransformerBlockImpl(const std::string& prefix, int64_t dim, int64_t heads,
                                                     int64_t dim_head, int64_t cross_attention_dim,
                                                     bool upcast_attention)
    : torch::nn::Module("BasicTransformerBlock") {
  auto layer_norm = [&] { return make_layer_norm(dim, 1e-5); };
  AttentionSpec self_spec;
  self_spec.query_dim = dim;
  self_spec.heads = heads;
  self_spec.dim_head = dim_head;
  self_spec.upcast_attention = upcast_attention;
  AttentionSpec cross_spec = self_spec;
  cross_spec.cross_attention_dim = cross_attention_dim;

  norm1 = register_module("norm1", layer_norm());
  attn1 = register_module("attn1", Attention(prefix + ".attn1", self_spec));
  norm2 = register_module("norm2", layer_norm());
  attn2 = register_module("attn2", Attention(prefix + ".attn2", cross_spec));
  norm3 = register_module("norm3", layer_norm());
  ff = register_module("ff", FeedForward(dim));
}

at::Tensor BasicTransformerBlockImpl::forward(const at::Tensor& x, const at::Tensor& context,
                                              const ForwardContext& ctx) {
  at::Tensor h = attn1->forward(norm1->forward(x), at::Tensor(), ctx) + x;
  h = attn2->forward(norm2->forward(h), context, ctx) + h;
  return ff->forward(norm3->forward(h)) + h;
}

Transformer2DModelImpl::Transformer2DModelImpl(const std::string& prefix, const Transformer2DSpec& spec)
    : torch::nn::Module("Transformer2DModel"), spec_(spec) {
  const int64_t inner = spec.heads * spec.dim_head;
  norm = register_module("norm", GroupNorm(spec.norm_num_groups, spec.in_channels, 1e-6));
  if (spec.use_linear_projection) {
    proj_in_linear = register_module("proj_in", make_linear(spec.in_channels, inner, true));
  } else {
    proj_in_conv = register_module("proj_in", make_conv(spec.in_channels, inner, 1, 1, 0));
  }
  transformer_blocks = register_module("transformer_blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < spec.num_layers; ++i) {
    auto block = BasicTransformerBlock(fmt::format("{}.transformer_blocks.{}", prefix, i), inner, spec.heads,
                                       spec.dim_head, spec.cross_attention_dim, spec.upcast_attention);
    transformer_blocks->push_back(block);
    blocks.push_back(block);
  }
  if (spec.use_linear_projection) {
    proj_out_linear = register_module("proj_out", make_linear(inner, spec.in_channels, true));
  } else {
    proj_out_conv = register_module("proj_out", make_conv(inner, spec.in_channels, 1, 1, 0));
  }
}

std::vector<std::string> Transformer2DModelImpl::attention_layer_names() const {
  std::vector<std::string> names;
  for (const auto& block : blocks) {
    names.push_back(block->attn1->layer_name());
    names.push_back(block->attn2->layer_name());
  }
  return names;
}

at::Tensor Transformer2DModelImpl::forward(const at::Tensor& x, const at::Tensor& context, const ForwardContext& ctx) {
  const int64_t batch = x.size(0), height = x.size(2), width = x.size(3);
  at::Tensor h = norm->forward(x, ctx);
  // [B, C, H, W] -> [B, H*W, C]; the 1x1 conv runs before, the linear projection after the reshape (as diffusers).
  if (!spec_.use_linear_projection) h = proj_in_conv->forward(h);
  int64_t inner = h.size(1);
  h = h.permute({0, 2, 3, 1}).reshape({batch, height * width, inner});
  if (spec_.use_linear_projection) h = proj_in_linear->forward(h);
  inner = h.size(2);

  for (auto& block : blocks) h = block->forward(h, context, ctx);

  // Back to the layout the block came in with: channels-last activations (packed convolutions) get the
  // [B, H, W, C] result as a view, NCHW ones the copy diffusers makes.
  const auto layout = x.suggest_memory_format();
  if (spec_.use_linear_projection) {
    h = proj_out_linear->forward(h);
    h = h.reshape({batch, height, width, h.size(-1)}).permute({0, 3, 1, 2}).contiguous(layout);
  } else {
    h = h.reshape({batch, height, width, inner}).permute({0, 3, 1, 2}).contiguous(layout);
    h = proj_out_conv->forward(h);
  }
  return h + x;
}

// ---- ResNet and resampling --------------------------------------------------------------------------------------

ResnetBlock2DImpl::ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t groups,
                                     double eps, double output_scale_factor)
    : torch::nn::Module("ResnetBlock2D"), output_scale_factor_(output_scale_factor) {
  norm1 = register_module("norm1", GroupNorm(groups, in_channels, eps));
  conv1 = register_module("conv1", make_conv(in_channels, out_channels, 3));
  if (temb_channels > 0)
    time_emb_proj = register_module("time_emb_proj", make_linear(temb_channels, out_channels, true));
  norm2 = register_module("norm2", GroupNorm(groups, out_channels, eps));
  conv2 = register_module("conv2", make_conv(out_channels, out_channels, 3));
  if (in_channels != out_channels) {
    conv_shortcut = register_module("conv_shortcut", make_conv(in_channels, out_channels, 1, 1, 0));
  }
}

at::Tensor ResnetBlock2DImpl::forward(const at::Tensor& x, const at::Tensor& temb, const ForwardContext& ctx) {
  at::Tensor h = conv1->forward(at::silu(norm1->forward(x, ctx)));
  if (!time_emb_proj.is_empty()) {
    h = h + time_emb_proj->forward(at::silu(temb)).unsqueeze(-1).unsqueeze(-1);
  }
  h = conv2->forward(at::silu(norm2->forward(h, ctx)));
  const at::Tensor shortcut = conv_shortcut.is_empty() ? x : conv_shortcut->forward(x);
  at::Tensor out = shortcut + h;
  if (output_scale_factor_ != 1.0) out = out / output_scale_factor_;
  return out;
}

Downsample2DImpl::Downsample2DImpl(int64_t channels, int64_t out_channels, int64_t padding)
    : torch::nn::Module("Downsample2D"), padding_(padding) {
  conv = register_module("conv", make_conv(channels, out_channels, 3, 2, padding));
}

at::Tensor Downsample2DImpl::forward(const at::Tensor& x) {
  if (padding_ == 0) return conv->forward(at::constant_pad_nd(x, {0, 1, 0, 1}, 0));
  return conv->forward(x);
}

Upsample2DImpl::Upsample2DImpl(int64_t channels, int64_t out_channels) : torch::nn::Module("Upsample2D") {
  conv = register_module("conv", make_conv(channels, out_channels, 3));
}

at::Tensor Upsample2DImpl::forward(const at::Tensor& x, std::optional<std::vector<int64_t>> output_size) {
  at::Tensor h;
  if (output_size) {
    h = at::upsample_nearest2d(x, *output_size, c10::nullopt, c10::nullopt);
  } else {
    h = at::upsample_nearest2d(x, {x.size(2) * 2, x.size(3) * 2}, 2.0, 2.0);
  }
  return conv->forward(h);
}

// ---- Time embeddings --------------------------------------------------------------------------------------------

at::Tensor timestep_embedding(const at::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                              double downscale_freq_shift, double scale, double max_period) {
  if (timesteps.dim() != 1) {
    throw Error(fmt::format("timestep embedding: timesteps must be one-dimensional, got {} dims", timesteps.dim()));
  }
  const int64_t half = dim / 2;
  // Same op order and dtypes as diffusers' get_timestep_embedding, so results agree to the bit on the same kernels.
  at::Tensor exponent = at::arange(0, half, timesteps.options().dtype(at::kFloat)) * (-std::log(max_period));
  exponent = exponent / (static_cast<double>(half) - downscale_freq_shift);
  at::Tensor emb = at::exp(exponent);
  emb = timesteps.unsqueeze(1).to(at::kFloat) * emb.unsqueeze(0);
  if (scale != 1.0) emb = emb * scale;
  emb = at::cat({at::sin(emb), at::cos(emb)}, -1);
  if (flip_sin_to_cos) emb = at::cat({emb.slice(1, half), emb.slice(1, 0, half)}, -1);
  if (dim % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1}, 0);
  return emb;
}

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim)
    : torch::nn::Module("TimestepEmbedding") {
  linear_1 = register_module("linear_1", make_linear(in_channels, time_embed_dim, true));
  linear_2 = register_module("linear_2", make_linear(time_embed_dim, time_embed_dim, true));
}

at::Tensor TimestepEmbeddingImpl::forward(const at::Tensor& x) {
  return linear_2->forward(at::silu(linear_1->forward(x)));
}

}  // namespace stylealigned::models::layers
