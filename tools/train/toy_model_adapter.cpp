// The trainer's export seam (see toy_model_adapter.h): the checkpoints' own configs through toy::ExportOptions.
#include "toy_model_adapter.h"

namespace stylealigned::train {

void export_toy_folder(const std::filesystem::path& dir, models::CLIPTextModel te, models::UNet2DConditionModel unet,
                       models::AutoencoderKL vae, const std::string& text_encoder_config_json,
                       const std::string& unet_config_json, const std::string& vae_config_json,
                       at::ScalarType file_dtype, double vae_scaling_factor, bool overwrite) {
  toy::ExportOptions options;
  options.file_dtype = file_dtype;
  options.vae_scaling_factor = vae_scaling_factor;
  options.overwrite = overwrite;
  options.text_encoder_config_json = text_encoder_config_json;
  options.unet_config_json = unet_config_json;
  options.vae_config_json = vae_config_json;
  toy::export_model_folder(dir, std::move(te), std::move(unet), std::move(vae), options);
}

}  // namespace stylealigned::train
