// Trainer checkpoints: one safetensors file holding weights, optimizer state and EMA, with the run's settings as JSON
// in the metadata (key "trainer"). Written atomically (temporary file + rename), so an interrupted write never
// leaves a broken checkpoint behind.
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "optim.h"

namespace torch::nn {
class Module;
}

namespace stylealigned::train {

struct CheckpointData {
  std::filesystem::path path;
  std::map<std::string, at::Tensor> tensors;  ///< owned CPU copies
  nlohmann::json meta;
};

void write_checkpoint(const std::filesystem::path& path, const NamedTensors& tensors, const nlohmann::json& meta);
/// Throws stylealigned::Error naming the file if it is missing, unreadable or not a trainer checkpoint.
CheckpointData read_checkpoint(const std::filesystem::path& path);

/// The parameters of `module` (detached handles that alias them) with `prefix` prepended to their names.
NamedTensors named_parameters(const torch::nn::Module& module, const std::string& prefix);
/// Parameters and buffers, for saving.
NamedTensors named_state(const torch::nn::Module& module, const std::string& prefix);
/// Copies the tensors `prefix + name` into every parameter and buffer of `module`. Throws stylealigned::Error
/// listing every missing or mis-shaped tensor (with the checkpoint path) before copying anything.
void load_module(torch::nn::Module& module, const CheckpointData& checkpoint, const std::string& prefix);
/// For a module built from a grown config (more layers than the checkpoint's): every checkpoint tensor under
/// `prefix` must find a same-named, same-shaped parameter or buffer, which it is copied into; the module's tensors
/// the checkpoint lacks keep their values and are returned (names without prefix; handles that alias them). Throws
/// stylealigned::Error listing every checkpoint tensor without a home or with another shape, before copying.
NamedTensors load_module_grown(torch::nn::Module& module, const CheckpointData& checkpoint, const std::string& prefix);

}  // namespace stylealigned::train
