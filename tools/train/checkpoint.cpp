#include "checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/module.h>

#include <vector>

#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"

namespace stylealigned::train {

void write_checkpoint(const std::filesystem::path& path, const NamedTensors& tensors, const nlohmann::json& meta) {
  io::save_safetensors(path, tensors, {{"trainer", meta.dump()}});
}

CheckpointData read_checkpoint(const std::filesystem::path& path) {
  if (!std::filesystem::is_regular_file(path)) throw Error(fmt::format("checkpoint {} does not exist", path.string()));
  CheckpointData data;
  data.path = path;
  {
    const auto file = io::SafetensorsFile::open(path);
    auto it = file.metadata().find("trainer");
    if (it == file.metadata().end()) {
      throw Error(fmt::format("{}: not a trainer checkpoint (no 'trainer' metadata)", path.string()));
    }
    try {
      data.meta = nlohmann::json::parse(it->second);
    } catch (const std::exception& e) {
      throw Error(fmt::format("{}: the 'trainer' metadata is not valid JSON: {}", path.string(), e.what()));
    }
  }
  for (auto& [name, t] : io::load_safetensors(path)) data.tensors.emplace(name, std::move(t));
  return data;
}

NamedTensors named_parameters(const torch::nn::Module& module, const std::string& prefix) {
  NamedTensors out;
  for (const auto& p : module.named_parameters()) out.emplace_back(prefix + p.key(), p.value());
  return out;
}

NamedTensors named_state(const torch::nn::Module& module, const std::string& prefix) {
  NamedTensors out;
  for (const auto& p : module.named_parameters()) out.emplace_back(prefix + p.key(), p.value().detach());
  for (const auto& p : module.named_buffers()) out.emplace_back(prefix + p.key(), p.value().detach());
  return out;
}

void load_module(torch::nn::Module& module, const CheckpointData& checkpoint, const std::string& prefix) {
  std::vector<std::string> problems;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  auto visit = [&](const std::string& name, const at::Tensor& target) {
    auto it = checkpoint.tensors.find(prefix + name);
    if (it == checkpoint.tensors.end()) {
      problems.push_back(fmt::format("missing '{}{}'", prefix, name));
    } else if (it->second.sizes() != target.sizes()) {
      problems.push_back(fmt::format("'{}{}' is [{}], the model wants [{}]", prefix, name,
                                     fmt::join(it->second.sizes(), ", "), fmt::join(target.sizes(), ", ")));
    } else {
      copies.emplace_back(target, it->second);
    }
  };
  for (const auto& p : module.named_parameters()) visit(p.key(), p.value());
  for (const auto& p : module.named_buffers()) visit(p.key(), p.value());
  if (!problems.empty()) {
    throw Error(fmt::format("{}: cannot load the model: {}", checkpoint.path.string(), fmt::join(problems, "; ")));
  }
  at::NoGradGuard no_grad;
  for (auto& [target, source] : copies) target.detach().copy_(source);
}

std::vector<std::string> load_module_grown(torch::nn::Module& module, const CheckpointData& checkpoint,
                                           const std::string& prefix) {
  std::map<std::string, at::Tensor> targets;
  for (const auto& p : module.named_parameters()) targets.emplace(p.key(), p.value());
  for (const auto& p : module.named_buffers()) targets.emplace(p.key(), p.value());
  std::vector<std::string> problems;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  for (const auto& [name, source] : checkpoint.tensors) {
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    auto it = targets.find(name.substr(prefix.size()));
    if (it == targets.end()) {
      problems.push_back(fmt::format("'{}' has no place in the grown model", name));
    } else if (it->second.sizes() != source.sizes()) {
      problems.push_back(fmt::format("'{}' is [{}], the grown model wants [{}]", name, fmt::join(source.sizes(), ", "),
                                     fmt::join(it->second.sizes(), ", ")));
    } else {
      copies.emplace_back(it->second, source);
      targets.erase(it);
    }
  }
  if (!problems.empty()) {
    throw Error(fmt::format("{}: the config does not grow this model: {}", checkpoint.path.string(),
                            fmt::join(problems, "; ")));
  }
  at::NoGradGuard no_grad;
  for (auto& [target, source] : copies) target.detach().copy_(source);
  std::vector<std::string> added;
  for (const auto& [name, t] : targets) added.push_back(name);
  return added;
}

}  // namespace stylealigned::train
