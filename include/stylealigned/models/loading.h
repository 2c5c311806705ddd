// stylealigned/models/loading.h: loading diffusers / transformers checkpoints into our modules.
//
// Every module registers its children under the exact diffusers / transformers names, so a checkpoint tensor's
// name is its module path and loading is a 1:1 walk over named_parameters() and named_buffers(). Every mismatch is
// reported by name, all at once, before anything is copied.
//
//   auto ckpt = stylealigned::io::Checkpoint::open(dir / "unet/diffusion_pytorch_model.safetensors");
//   stylealigned::models::load_weights(*unet, ckpt, {at::kFloat, at::kCPU});
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <filesystem>
#include <string>
#include <vector>

#include "stylealigned/io/safetensors.h"

namespace torch::nn {
class Module;
}

namespace stylealigned::models {

struct LoadOptions {
  /// dtype of the loaded parameters (F32/F16/BF16 files are converted on load).
  c10::ScalarType dtype = c10::kFloat;
  c10::Device device = c10::kCPU;
  /// Checkpoint tensors with no matching parameter are an error when true, a warning otherwise.
  bool allow_unexpected = false;
  /// Names (exact) of checkpoint tensors to ignore silently (e.g. transformers' `position_ids` buffer).
  std::vector<std::string> ignore;
  /// CPU tensors whose stored dtype is already the load dtype alias the file's copy-on-write mapping instead of
  /// being copied: loading is then nearly free (SD1.5's fp32 UNet: 11.5 s of copying and page faults before), the
  /// pages are shared with the page cache, and they become resident as the first forward reads them. Writing to
  /// such a parameter (training) copies the touched pages privately; the file is never modified. Replacing a
  /// file atomically (rename) is safe while it is mapped; truncating it in place is not. False: always copy.
  bool map_weights = true;
};

/// Outcome of comparing a module with a checkpoint.
struct LoadReport {
  std::vector<std::string> missing;     ///< parameters/buffers with no tensor in the checkpoint
  std::vector<std::string> unexpected;  ///< checkpoint tensors with no parameter
  std::vector<std::string> mismatched;  ///< "name: checkpoint [a, b] vs model [c, d]" (shape or dtype kind)
  bool ok() const { return missing.empty() && mismatched.empty() && unexpected.empty(); }
};

/// Compares without loading.
LoadReport check_weights(const torch::nn::Module& module, const io::Checkpoint& checkpoint,
                         const LoadOptions& options = {});

/// Loads every parameter and buffer of `module` from `checkpoint`, converting dtype and device. The module is moved
/// to options.dtype/device first. Throws stylealigned::Error listing every missing, mis-shaped (and, unless
/// allowed, unexpected) tensor with the checkpoint path; on error the module is left untouched. Peak memory stays
/// near one copy of the weights: tensors are converted one at a time from the mapping, or alias it (map_weights).
void load_weights(torch::nn::Module& module, const io::Checkpoint& checkpoint, const LoadOptions& options = {});

/// Finds the weights file of a diffusers/transformers component folder: prefers `<stem>.safetensors`, then the
/// `.fp16.safetensors` variant, then a sharded `<stem>.safetensors.index.json`; stems tried in order
/// (e.g. {"diffusion_pytorch_model"} or {"model"}). Throws stylealigned::Error listing what was looked for.
std::filesystem::path find_weights(const std::filesystem::path& folder, const std::vector<std::string>& stems,
                                   bool prefer_fp16 = false);

}  // namespace stylealigned::models
