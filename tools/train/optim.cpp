#include "optim.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>

#include "stylealigned/error.h"
#include "stylealigned/log.h"

namespace stylealigned::train {
namespace {
const at::Tensor& find(const std::map<std::string, at::Tensor>& tensors, const std::string& name,
                       const at::Tensor& like) {
  auto it = tensors.find(name);
  if (it == tensors.end()) throw Error(fmt::format("checkpoint: optimizer tensor '{}' is missing", name));
  if (it->second.sizes() != like.sizes()) {
    throw Error(fmt::format("checkpoint: '{}' has shape [{}], expected [{}]", name, fmt::join(it->second.sizes(), ", "),
                            fmt::join(like.sizes(), ", ")));
  }
  return it->second;
}
}  // namespace

AdamW::AdamW(NamedTensors params, AdamWOptions options) : params_(std::move(params)), options_(options) {
  for (const auto& [name, p] : params_) {
    m_.push_back(at::zeros_like(p, at::MemoryFormat::Contiguous));
    v_.push_back(at::zeros_like(p, at::MemoryFormat::Contiguous));
    decay_.push_back(p.dim() >= 2 && name.find("embedding") == std::string::npos);
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++steps_;
  const double bc1 = 1.0 - std::pow(options_.beta1, static_cast<double>(steps_));
  const double bc2 = 1.0 - std::pow(options_.beta2, static_cast<double>(steps_));
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor p = params_[i].second;
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    if (decay_[i] && options_.weight_decay > 0) p.mul_(1.0 - lr * options_.weight_decay);
    m_[i].mul_(options_.beta1).add_(g, 1.0 - options_.beta1);
    v_[i].mul_(options_.beta2).addcmul_(g, g, 1.0 - options_.beta2);
    const at::Tensor denom = v_[i].sqrt().div_(std::sqrt(bc2)).add_(options_.eps);
    p.addcdiv_(m_[i], denom, -lr / bc1);
  }
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_) {
    if (p.grad().defined()) p.mutable_grad() = at::Tensor();
  }
}

NamedTensors AdamW::state() const {
  NamedTensors out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out.emplace_back("adam.m." + params_[i].first, m_[i]);
    out.emplace_back("adam.v." + params_[i].first, v_[i]);
  }
  out.emplace_back("adam.steps", at::scalar_tensor(steps_, at::kLong));
  return out;
}

void AdamW::load_state(const std::map<std::string, at::Tensor>& tensors) {
  at::NoGradGuard no_grad;
  if (tensors.count("adam.steps") == 0 && std::none_of(tensors.begin(), tensors.end(), [](const auto& kv) {
        return kv.first.rfind("adam.", 0) == 0;
      })) {
    // A slim checkpoint (weights only, e.g. carried to another machine): moments restart from zero, which the
    // bias correction of a fresh step count handles like a warm restart.
    warn("checkpoint has no optimizer state: AdamW moments start from zero");
    steps_ = 0;
    return;
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    m_[i].copy_(find(tensors, "adam.m." + params_[i].first, m_[i]));
    v_[i].copy_(find(tensors, "adam.v." + params_[i].first, v_[i]));
  }
  auto it = tensors.find("adam.steps");
  if (it == tensors.end()) throw Error("checkpoint: optimizer tensor 'adam.steps' is missing");
  steps_ = it->second.item<int64_t>();
}

double clip_grad_norm(const NamedTensors& params, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> norms;
  for (const auto& [name, p] : params) {
    if (p.grad().defined()) norms.push_back(p.grad().norm().to(at::kDouble));
  }
  if (norms.empty()) return 0.0;
  const double total = at::stack(norms).norm().item<double>();
  if (max_norm > 0 && total > max_norm) {
    const double scale = max_norm / (total + 1e-6);
    for (const auto& [name, p] : params) {
      if (p.grad().defined()) p.grad().mul_(scale);
    }
  }
  return total;
}

Ema::Ema(const NamedTensors& params, double decay) : decay_(decay) {
  at::NoGradGuard no_grad;
  for (const auto& [name, p] : params) shadow_.emplace_back(name, p.detach().clone());
}

void Ema::update(const NamedTensors& params) {
  at::NoGradGuard no_grad;
  const double n = static_cast<double>(updates_++);
  const double d = std::min(decay_, (1.0 + n) / (10.0 + n));
  for (size_t i = 0; i < shadow_.size(); ++i) shadow_[i].second.mul_(d).add_(params[i].second.detach(), 1.0 - d);
}

NamedTensors Ema::state() const {
  NamedTensors out;
  for (const auto& [name, t] : shadow_) out.emplace_back("ema." + name, t);
  out.emplace_back("ema.updates", at::scalar_tensor(updates_, at::kLong));
  return out;
}

void Ema::load_state(const std::map<std::string, at::Tensor>& tensors) {
  at::NoGradGuard no_grad;
  if (tensors.count("ema.updates") == 0 && std::none_of(tensors.begin(), tensors.end(), [](const auto& kv) {
        return kv.first.rfind("ema.", 0) == 0;
      })) {
    warn("checkpoint has no EMA state: the EMA starts from the loaded weights");
    return;
  }
  for (auto& [name, t] : shadow_) t.copy_(find(tensors, "ema." + name, t));
  auto it = tensors.find("ema.updates");
  if (it == tensors.end()) throw Error("checkpoint: 'ema.updates' is missing");
  updates_ = it->second.item<int64_t>();
}

const at::Tensor& Ema::weight(const std::string& name) const {
  for (const auto& [n, t] : shadow_) {
    if (n == name) return t;
  }
  throw Error(fmt::format("EMA: no shadow weight for '{}'", name));
}

void Ema::swap_into(const NamedTensors& params) {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < shadow_.size(); ++i) {
    at::Tensor live = params[i].second.detach().clone();
    params[i].second.detach().copy_(shadow_[i].second);
    shadow_[i].second.copy_(live);
  }
}

}  // namespace stylealigned::train
