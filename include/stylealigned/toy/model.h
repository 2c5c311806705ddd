// stylealigned/toy/model.h: the architecture of the embedded toy model and its export as a diffusers folder.
//
// The embedded model is a small SD1.x-family latent diffusion model trained on the procedural world of
// toy/world.h: 64x64 images, 16x16x4 latents (a three-level VAE, factor 4), a CLIP text encoder over a vocabulary
// built here from the world's own caption words. It is written in the diffusers layout, so the same loader and
// pipeline that read SD1.5 read it (Pipeline::load), with no special cases.
//
//   namespace toy = stylealigned::toy;
//   auto te = stylealigned::models::CLIPTextModel(toy::text_encoder_config());
//   auto unet = stylealigned::models::UNet2DConditionModel::from_config(toy::unet_config());
//   auto vae = stylealigned::models::AutoencoderKL::from_config(toy::vae_config());
//   ... train ...
//   toy::export_model_folder("models/toy", te, unet, vae, at::kHalf, /*vae_scaling_factor=*/0.9);
//   auto pipe = stylealigned::Pipeline::load("models/toy");
//
// src/toy/model.cpp is the single definition of the architecture: the typed configs below are what the loaders parse
// from the JSON strings, so what the trainer builds is exactly what Pipeline::load builds from the exported folder.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <filesystem>
#include <string>

namespace stylealigned::models {
// Declared only: callers that build or pass models include the model headers themselves, and this header stays
// cheap to include.
class CLIPTextModel;
class UNet2DConditionModel;
class AutoencoderKL;
struct CLIPTextConfig;
struct UNetConfig;
struct VAEConfig;
}  // namespace stylealigned::models

namespace stylealigned::toy {

// Tokenizer -----------------------------------------------------------------------------------------------------------

/// Writes a transformers CLIPTokenizer folder (vocab.json, merges.txt, special_tokens_map.json,
/// tokenizer_config.json) whose vocabulary is built from the world's words: the 256 byte-level symbols and their
/// "</w>" forms (so any text still tokenizes, byte by byte), merges that assemble every word a toy caption can
/// contain (toy::vocabulary() and every attribute value name) into one token, then <|startoftext|> and
/// <|endoftext|> (also the pad token, as in SD1.5). Creates `dir` if needed; each file is written atomically.
/// Throws stylealigned::Error naming the file that could not be written.
void write_tokenizer_folder(const std::filesystem::path& dir);

/// Number of ids of that vocabulary (the text encoder's vocab_size). The last two ids are BOS and EOS.
int64_t tokenizer_vocab_size();
/// <|startoftext|> and <|endoftext|> (= pad) ids.
int64_t tokenizer_bos_id();
int64_t tokenizer_eos_id();

// Configs (diffusers / transformers config.json formats) -------------------------------------------------------------

/// transformers CLIPTextModel config: hidden 128, 4 layers, 4 heads, MLP 512, 77 positions, quick_gelu, the
/// tokenizer's vocabulary size and BOS / EOS / pad ids.
std::string text_encoder_config_json();
/// diffusers UNet2DConditionModel config: 16x16x4 latents, three levels with self- and cross-attention at 16x16
/// and 8x8 and in the mid block, cross_attention_dim = the text encoder's hidden size, 32-channel heads.
std::string unet_config_json();
/// diffusers AutoencoderKL config: 3 levels (32, 64, 64 channels; factor 4), 4 latent channels, sample_size 64.
/// `scaling_factor` is measured on training data (1 / std of the latents) once the VAE is trained.
std::string vae_config_json(double scaling_factor);
std::string vae_config_json();  ///< scaling_factor 1.0
/// DDIMScheduler config as SD1.5 ships it (scaled_linear 0.00085..0.012, 1000 steps, leading, steps_offset 1).
std::string scheduler_config_json();
/// model_index.json of a StableDiffusionPipeline (no safety checker, feature extractor or image encoder).
std::string model_index_json();

/// The configs above as the loaders' structs: what Pipeline::load will build from an exported folder. The UNet and
/// VAE configs are parsed from the JSON by UNetConfig::from_json / VAEConfig::from_json; the text encoder's is filled
/// from the same constants (CLIPTextConfig parses files only; a test checks the two agree).
models::CLIPTextConfig text_encoder_config();
models::UNetConfig unet_config();
models::VAEConfig vae_config(double scaling_factor = 1.0);

// Export --------------------------------------------------------------------------------------------------------------

/// How export_model_folder writes a folder.
struct ExportOptions {
  /// dtype of the weight files: kHalf (the shipped model), kBFloat16 or kFloat. Loaders convert to fp32.
  at::ScalarType file_dtype = at::kHalf;
  /// The VAE config's scaling_factor (1 / std of the training latents, measured by the trainer).
  double vae_scaling_factor = 1.0;
  /// Replace an existing non-empty folder (as a whole; the old one is removed only once the new one is in place).
  bool overwrite = false;
  /// config.json texts of models built from other configs than the toy's (a trainer's experiments); empty: the
  /// toy configs above. The text encoder's torch_dtype and the VAE's scaling_factor are set from the fields above.
  std::string text_encoder_config_json;
  std::string unet_config_json;
  std::string vae_config_json;
};

/// Writes a complete diffusers StableDiffusionPipeline folder at `dir`: model_index.json, scheduler/, tokenizer/,
/// text_encoder/ (config.json, model.safetensors), unet/ and vae/ (config.json,
/// diffusion_pytorch_model.safetensors). Weights are the modules' parameters and persistent buffers under their
/// module paths (the names the loaders read), converted to the file dtype; a value that does not fit it (fp16
/// overflow) is an error naming the tensor. Each weights file is checked against a module built from the config
/// written beside it, as the loader will build it, so a model of another architecture than its config is refused,
/// naming the tensors at fault; so are a text encoder whose vocabulary is smaller than the tokenizer's and a UNet
/// whose channels or cross-attention size do not match the VAE and text encoder.
///
/// Atomic: the folder is built next to `dir` under a temporary name and renamed into place, so `dir` is either
/// untouched or complete; on failure the temporary folder (and any parent folder the export created) is removed.
/// An existing `dir` that is not empty is refused unless `overwrite`. Throws stylealigned::Error naming the path,
/// key or tensor at fault.
void export_model_folder(const std::filesystem::path& dir, models::CLIPTextModel text_encoder,
                         models::UNet2DConditionModel unet, models::AutoencoderKL vae, const ExportOptions& options);
/// export_model_folder with the toy configs and the given dtype, scaling factor and overwrite flag.
void export_model_folder(const std::filesystem::path& dir, models::CLIPTextModel text_encoder,
                         models::UNet2DConditionModel unet, models::AutoencoderKL vae,
                         at::ScalarType file_dtype = at::kHalf, double vae_scaling_factor = 1.0,
                         bool overwrite = false);

/// True when `dir`/model_index.json carries the toy world's marker (export_model_folder writes it): a model of this
/// world, whose sets `stylealigned eval` scores with the world's evaluators and whose prompts the tool checks for
/// words outside the world (ParsedCaption::unknown_words). False for a missing or unreadable file and for real
/// SD1.5 / SDXL folders.
bool is_toy_model_folder(const std::filesystem::path& dir);

}  // namespace stylealigned::toy
