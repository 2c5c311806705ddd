// The trainer's one export call, over the toy-model API (stylealigned/toy/model.h). Kept as a separate seam so that
// experiments with other configs than the toy defaults export through the same code.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <filesystem>
#include <string>

#include "stylealigned/models/clip_text.h"
#include "stylealigned/models/unet.h"
#include "stylealigned/models/vae.h"
#include "stylealigned/toy/model.h"

namespace stylealigned::train {

/// The one call the trainer makes to export (one seam, so that adapting to a change of the toy API touches this
/// file only): writes the diffusers folder with the given component configs (the checkpoints' own, which may differ
/// from the toy defaults in experiments), weights in `file_dtype`, and the VAE's scaling_factor.
void export_toy_folder(const std::filesystem::path& dir, models::CLIPTextModel te, models::UNet2DConditionModel unet,
                       models::AutoencoderKL vae, const std::string& text_encoder_config_json,
                       const std::string& unet_config_json, const std::string& vae_config_json,
                       at::ScalarType file_dtype, double vae_scaling_factor, bool overwrite);

}  // namespace stylealigned::train
