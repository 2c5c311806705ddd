#include "models/vision_parts.h"
#include <ATen/core/grad_mode.h>

#include <cmath>

#include "stylealigned/attention.h"

namespace stylealigned::models::vision_parts {

at::Tensor new_weight(at::IntArrayRef shape, bool initialize, double std, double fill) {
  at::Tensor t = at::empty(shape, at::kFloat);  // untouched pages stay non-resident until the loader writes them
  if (initialize) {
    at::NoGradGuard no_grad;
    if (std > 0.0) {
      t.normal_(fill, std);
    } else {
      t.fill_(fill);
    }
  }
  return t;
}

LinearImpl::LinearImpl(int64_t in, int64_t out, bool bias, bool initialize) {
  weight_ = register_parameter("weight", new_weight({out, in}, initialize));
  if (bias) bias_ = register_parameter("bias", new_weight({out}, initialize, 0.0));
}

LayerNormImpl::LayerNormImpl(int64_t n, double eps, bool initialize) : eps_(eps) {
  weight_ = register_parameter("weight", new_weight({n}, initialize, 0.0, 1.0));
  bias_ = register_parameter("bias", new_weight({n}, initialize, 0.0));
}

PatchConvImpl::PatchConvImpl(int64_t channels, int64_t hidden, int64_t patch, bool bias, bool initialize)
    : patch_(patch) {
  weight_ = register_parameter("weight", new_weight({hidden, channels, patch, patch}, initialize));
  if (bias) bias_ = register_parameter("bias", new_weight({hidden}, initialize, 0.0));
}

at::Tensor PatchConvImpl::forward(const at::Tensor& x) const { return at::conv2d(x, weight_, bias_, {patch_, patch_}); }

bool known_activation(const std::string& name) {
  return name == "quick_gelu" || name == "gelu" || name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "relu";
}

at::Tensor activate(const std::string& name, const at::Tensor& x) {
  if (name == "quick_gelu") return x * at::sigmoid(x * 1.702);
  if (name == "gelu") return at::gelu(x);
  if (name == "gelu_pytorch_tanh") return at::gelu(x, "tanh");
  if (name == "relu") return at::relu(x);
  // gelu_new: transformers' explicit tanh formula.
  constexpr double kSqrt2OverPi = 0.7978845608028654;
  return 0.5 * x * (1.0 + at::tanh(kSqrt2OverPi * (x + 0.044715 * at::pow(x, 3.0))));
}

at::Tensor multi_head_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads) {
  const int64_t b = q.size(0), t = q.size(1), c = q.size(2), d = c / heads;
  auto split = [&](const at::Tensor& y) { return y.view({b, t, heads, d}).transpose(1, 2); };
  const at::Tensor out = scaled_dot_product_attention(split(q), split(k), split(v), 1.0 / std::sqrt(double(d)));
  return out.transpose(1, 2).reshape({b, t, c});
}

}  // namespace stylealigned::models::vision_parts
