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

namespace {

// How a module's parameters and buffers pair with the checkpoint's tensors under `prefix`: the one matching both
// loaders share; they differ only in which leftovers are errors.
struct Match {
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  ///< (module tensor, checkpoint tensor)
  std::vector<std::string> mis_shaped;                    ///< formatted problems
  NamedTensors missing;                                   ///< module tensors the checkpoint lacks, names without prefix
  std::vector<std::string> homeless;                      ///< checkpoint names under prefix the module lacks
};

Match match_tensors(const torch::nn::Module& module, const CheckpointData& checkpoint, const std::string& prefix,
                    const char* model_noun) {
  Match m;
  std::map<std::string, at::Tensor> targets;
  for (const auto& p : module.named_parameters()) targets.emplace(p.key(), p.value());
  for (const auto& p : module.named_buffers()) targets.emplace(p.key(), p.value());
  for (const auto& [name, target] : targets) {
    auto it = checkpoint.tensors.find(prefix + name);
    if (it == checkpoint.tensors.end()) {
      m.missing.emplace_back(name, target);
    } else if (it->second.sizes() != target.sizes()) {
      m.mis_shaped.push_back(fmt::format("'{}{}' is [{}], the {} wants [{}]", prefix, name,
                                         fmt::join(it->second.sizes(), ", "), model_noun,
                                         fmt::join(target.sizes(), ", ")));
    } else {
      m.copies.emplace_back(target, it->second);
    }
  }
  for (const auto& [name, source] : checkpoint.tensors) {
    if (name.compare(0, prefix.size(), prefix) == 0 && !targets.count(name.substr(prefix.size()))) {
      m.homeless.push_back(name);
    }
  }
  return m;
}

void copy_all(const Match& m) {
  at::NoGradGuard no_grad;
  for (const auto& [target, source] : m.copies) target.detach().copy_(source);
}

}  // namespace

void load_module(torch::nn::Module& module, const CheckpointData& checkpoint, const std::string& prefix) {
  const Match m = match_tensors(module, checkpoint, prefix, "model");
  std::vector<std::string> problems;
  for (const auto& [name, t] : m.missing) problems.push_back(fmt::format("missing '{}{}'", prefix, name));
  problems.insert(problems.end(), m.mis_shaped.begin(), m.mis_shaped.end());
  if (!problems.empty()) {
    throw Error(fmt::format("{}: cannot load the model: {}", checkpoint.path.string(), fmt::join(problems, "; ")));
  }
  copy_all(m);
}

NamedTensors load_module_grown(torch::nn::Module& module, const CheckpointData& checkpoint,
                               const std::string& prefix) {
  const Match m = match_tensors(module, checkpoint, prefix, "grown model");
  std::vector<std::string> problems;
  for (const auto& name : m.homeless) problems.push_back(fmt::format("'{}' has no place in the grown model", name));
  problems.insert(problems.end(), m.mis_shaped.begin(), m.mis_shaped.end());
  if (!problems.empty()) {
    throw Error(fmt::format("{}: the config does not grow this model: {}", checkpoint.path.string(),
                            fmt::join(problems, "; ")));
  }
  copy_all(m);
  return m.missing;
}

}  // namespace stylealigned::train
