// STAND-IN for stylealigned/toy/model.h (the "toymodel" branch), used until that header lands on main.
//
// The trainer includes this file only. It declares the agreed toy-model API in namespace stylealigned::toy; the
// definitions in toy_model_adapter.cpp write equivalent tokenizer, config and model folders. After merging main with
// the real API: replace the body of this header by `#include "stylealigned/toy/model.h"` and delete the .cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <filesystem>
#include <string>

#include "stylealigned/models/clip_text.h"
#include "stylealigned/models/unet.h"
#include "stylealigned/models/vae.h"

namespace stylealigned::toy {

/// Writes a CLIP BPE tokenizer folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) in
/// which every word of toy::vocabulary() is one token.
void write_tokenizer_folder(const std::filesystem::path& dir);
/// One past the largest id of that tokenizer (the text encoder's vocab_size).
int64_t tokenizer_vocab_size();

std::string text_encoder_config_json();
std::string unet_config_json();
std::string vae_config_json(double scaling_factor);
std::string scheduler_config_json();
std::string model_index_json();

/// Writes the whole diffusers folder (model_index.json, scheduler, tokenizer, text_encoder, unet, vae) with the
/// weights converted to `file_dtype`. Throws stylealigned::Error if `dir` exists and is not empty unless `overwrite`.
void export_model_folder(const std::filesystem::path& dir, models::CLIPTextModel te, models::UNet2DConditionModel unet,
                         models::AutoencoderKL vae, at::ScalarType file_dtype = at::kHalf,
                         double vae_scaling_factor = 1.0, bool overwrite = false);

}  // namespace stylealigned::toy

namespace stylealigned::train {

/// The one call the trainer makes to export (kept beside the stand-in so that adapting to the real API touches this
/// file only): writes the diffusers folder with the given component configs (the checkpoints' own, which may differ
/// from the toy defaults in experiments), weights in `file_dtype`, and the VAE's scaling_factor.
void export_toy_folder(const std::filesystem::path& dir, models::CLIPTextModel te, models::UNet2DConditionModel unet,
                       models::AutoencoderKL vae, const std::string& text_encoder_config_json,
                       const std::string& unet_config_json, const std::string& vae_config_json,
                       at::ScalarType file_dtype, double vae_scaling_factor, bool overwrite);

}  // namespace stylealigned::train
