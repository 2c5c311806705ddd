// The embedded toy model: its configs (the one definition of its architecture) and the diffusers-folder export
// (which also takes a trainer's own configs, see ExportOptions).
//
// Size budget: all weights at most 12 MB in fp16 (issue 8), i.e. about 6M parameters in all. The text encoder
// (~0.9M) is the issue's; the VAE and UNet are as wide as the rest of the budget allows with ~20% headroom:
//   text encoder  hidden 128, 4 layers, 4 heads, MLP 512                        ~0.89M
//   VAE           32/64/64 channels, 1 ResNet per level, mid attention          ~0.95M
//   UNet          64/80/80 channels, 1 ResNet per level, attention at 16x16,    ~2.92M
//                 8x8 and in the 4x4 mid block; heads of 32/40/40 channels
// (tests/test_toy_model.cpp prints the exact counts). A 128-channel VAE level alone would cost 1.7M parameters
// more, and 96+ channels at the UNet's inner levels push the total past 11 MB.
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <stdlib.h>

#include <cerrno>
#include <cmath>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <system_error>
#include <utility>
#include <vector>

#include "internal/atomic_file.h"
#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/models/clip_text.h"
#include "stylealigned/models/loading.h"
#include "stylealigned/models/unet.h"
#include "stylealigned/models/vae.h"
#include "stylealigned/toy/model.h"

namespace stylealigned::toy {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// The versions whose file formats these configs follow (the golden SD1.5 folders were written by them).
constexpr const char* kDiffusersVersion = "0.25.1";
constexpr const char* kTransformersVersion = "4.36.0";

// Text encoder.
constexpr int64_t kTextHidden = 128;
constexpr int64_t kTextLayers = 4;
constexpr int64_t kTextHeads = 4;
constexpr int64_t kTextIntermediate = 512;
constexpr int64_t kTextPositions = 77;

// UNet: 16x16x4 latents; per level (16x16, 8x8, 4x4).
const std::vector<int64_t> kUNetChannels = {64, 80, 80};
const std::vector<int64_t> kUNetHeads = {2, 2, 2};  // diffusers' "attention_head_dim" means the head count
const std::vector<std::string> kUNetDown = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"};
const std::vector<std::string> kUNetUp = {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"};
constexpr int64_t kUNetLayersPerBlock = 1;
constexpr int64_t kUNetGroups = 16;  // divides every level's channels
constexpr int64_t kLatentChannels = 4;
constexpr int64_t kLatentSize = 16;

// VAE: 64x64 images, three levels (factor 4).
const std::vector<int64_t> kVAEChannels = {32, 64, 64};
constexpr int64_t kVAELayersPerBlock = 1;
constexpr int64_t kVAEGroups = 16;
constexpr int64_t kImageSize = 64;

json text_encoder_json(const char* torch_dtype) {
  return {{"architectures", {"CLIPTextModel"}},
          {"attention_dropout", 0.0},
          {"bos_token_id", tokenizer_bos_id()},
          {"dropout", 0.0},
          {"eos_token_id", tokenizer_eos_id()},
          {"hidden_act", "quick_gelu"},
          {"hidden_size", kTextHidden},
          {"initializer_factor", 1.0},
          {"initializer_range", 0.02},
          {"intermediate_size", kTextIntermediate},
          {"layer_norm_eps", 1e-5},
          {"max_position_embeddings", kTextPositions},
          {"model_type", "clip_text_model"},
          {"num_attention_heads", kTextHeads},
          {"num_hidden_layers", kTextLayers},
          {"pad_token_id", tokenizer_eos_id()},
          {"projection_dim", kTextHidden},
          {"torch_dtype", torch_dtype},
          {"transformers_version", kTransformersVersion},
          {"vocab_size", tokenizer_vocab_size()}};
}

std::string dump(const json& j) { return j.dump(2) + "\n"; }

const char* torch_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    default:
      throw Error(fmt::format("toy export: file_dtype must be Half, BFloat16 or Float (got {})", c10::toString(t)));
  }
}

// --- export ----------------------------------------------------------------------------------------------------------

// The tensors the loaders read (load_weights walks named_parameters() then named_buffers()), converted for the file.
std::vector<std::pair<std::string, at::Tensor>> file_tensors(const torch::nn::Module& module, at::ScalarType dtype,
                                                             std::string_view component) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  auto add = [&](const std::string& name, const at::Tensor& value) {
    at::Tensor t = value.detach();
    if (t.is_floating_point()) {
      if (!at::isfinite(t).all().item<bool>()) {
        throw Error(fmt::format("toy export: {} tensor '{}' holds non-finite values", component, name));
      }
      t = t.to(at::kCPU, dtype);
      if (!at::isfinite(t).all().item<bool>()) {
        throw Error(fmt::format("toy export: {} tensor '{}' overflows {} (largest magnitude {})", component, name,
                                c10::toString(dtype), value.detach().abs().max().item<double>()));
      }
    } else {
      t = t.to(at::kCPU);
    }
    out.emplace_back(name, t.contiguous());
  };
  for (const auto& p : module.named_parameters(/*recurse=*/true)) add(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) add(b.key(), b.value());
  return out;
}

// Writes one component's weights, then checks them against a module built from the component's written config, as
// the loader will: a model of another architecture than the toy config is refused, naming every tensor at fault.
void write_weights(const fs::path& file, const torch::nn::Module& model, const torch::nn::Module& from_config,
                   at::ScalarType dtype, std::string_view component) {
  io::save_safetensors(file, file_tensors(model, dtype, component), {{"format", "pt"}});
  const models::LoadReport report = models::check_weights(from_config, io::Checkpoint::open(file));
  if (!report.ok()) {
    std::string message = fmt::format(
        "toy export: the {} does not have the architecture of its config.json; {} tensors missing, {} unexpected, {} "
        "mis-shaped:",
        component, report.missing.size(), report.unexpected.size(), report.mismatched.size());
    size_t listed = 0;
    for (const auto* list : {&report.missing, &report.unexpected, &report.mismatched}) {
      for (const auto& item : *list) {
        if (listed++ < 16) message += "\n  " + item;
      }
    }
    throw Error(message);
  }
}

json parse_object(const std::string& text, std::string_view what) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(fmt::format("toy export: {} is not valid JSON ({})", what, e.what()));
  }
  if (!j.is_object()) throw Error(fmt::format("toy export: {} is not a JSON object", what));
  return j;
}

// What the pipeline needs across components, which no single weights check sees.
void check_consistent(const models::CLIPTextConfig& te, const models::UNetConfig& unet, const models::VAEConfig& vae) {
  if (te.vocab_size < tokenizer_vocab_size()) {
    throw Error(fmt::format("toy export: text encoder vocab_size {} is smaller than the toy tokenizer's {}",
                            te.vocab_size, tokenizer_vocab_size()));
  }
  const models::UNetConfig u = unet.normalized();
  for (int64_t d : u.cross_attention_dim) {
    if (d != te.hidden_size) {
      throw Error(fmt::format("toy export: unet cross_attention_dim {} != the text encoder's hidden_size {}", d,
                              te.hidden_size));
    }
  }
  if (u.in_channels != vae.latent_channels || u.out_channels != vae.latent_channels) {
    throw Error(fmt::format("toy export: unet in/out_channels {}/{} != the VAE's latent_channels {}", u.in_channels,
                            u.out_channels, vae.latent_channels));
  }
}

fs::path make_temp_dir(const fs::path& parent, const std::string& stem) {
  std::string pattern = (parent / (stem + "XXXXXX")).string();
  if (::mkdtemp(pattern.data()) == nullptr) {
    throw Error(fmt::format("{}: cannot create a folder there ({})", parent.string(),
                            std::generic_category().message(errno)));
  }
  return fs::path(pattern);
}

void write_text(const fs::path& file, const std::string& text) { internal::write_file_atomic(file, text); }

void make_dir(const fs::path& dir) {
  std::error_code ec;
  if (!fs::create_directory(dir, ec) || ec) {
    throw Error(fmt::format("{}: cannot create the folder ({})", dir.string(), ec ? ec.message() : "exists"));
  }
}

}  // namespace

// --- configs ---------------------------------------------------------------------------------------------------------

std::string text_encoder_config_json() { return dump(text_encoder_json("float32")); }

std::string unet_config_json() {
  const json j = {{"_class_name", "UNet2DConditionModel"},
                  {"_diffusers_version", kDiffusersVersion},
                  {"act_fn", "silu"},
                  {"addition_embed_type", nullptr},
                  {"addition_embed_type_num_heads", 64},
                  {"addition_time_embed_dim", nullptr},
                  {"attention_head_dim", kUNetHeads},
                  {"attention_type", "default"},
                  {"block_out_channels", kUNetChannels},
                  {"center_input_sample", false},
                  {"class_embed_type", nullptr},
                  {"class_embeddings_concat", false},
                  {"conv_in_kernel", 3},
                  {"conv_out_kernel", 3},
                  {"cross_attention_dim", kTextHidden},
                  {"cross_attention_norm", nullptr},
                  {"down_block_types", kUNetDown},
                  {"downsample_padding", 1},
                  {"dropout", 0.0},
                  {"dual_cross_attention", false},
                  {"encoder_hid_dim", nullptr},
                  {"encoder_hid_dim_type", nullptr},
                  {"flip_sin_to_cos", true},
                  {"freq_shift", 0},
                  {"in_channels", kLatentChannels},
                  {"layers_per_block", kUNetLayersPerBlock},
                  {"mid_block_only_cross_attention", nullptr},
                  {"mid_block_scale_factor", 1},
                  {"mid_block_type", "UNetMidBlock2DCrossAttn"},
                  {"norm_eps", 1e-5},
                  {"norm_num_groups", kUNetGroups},
                  {"num_attention_heads", nullptr},
                  {"num_class_embeds", nullptr},
                  {"only_cross_attention", false},
                  {"out_channels", kLatentChannels},
                  {"projection_class_embeddings_input_dim", nullptr},
                  {"resnet_out_scale_factor", 1.0},
                  {"resnet_skip_time_act", false},
                  {"resnet_time_scale_shift", "default"},
                  {"reverse_transformer_layers_per_block", nullptr},
                  {"sample_size", kLatentSize},
                  {"time_cond_proj_dim", nullptr},
                  {"time_embedding_act_fn", nullptr},
                  {"time_embedding_dim", nullptr},
                  {"time_embedding_type", "positional"},
                  {"timestep_post_act", nullptr},
                  {"transformer_layers_per_block", 1},
                  {"up_block_types", kUNetUp},
                  {"upcast_attention", false},
                  {"use_linear_projection", false}};
  return dump(j);
}

std::string vae_config_json(double scaling_factor) {
  if (!std::isfinite(scaling_factor) || scaling_factor <= 0.0) {
    throw Error(fmt::format("toy vae config: scaling_factor must be a positive number (got {})", scaling_factor));
  }
  const json j = {{"_class_name", "AutoencoderKL"},
                  {"_diffusers_version", kDiffusersVersion},
                  {"act_fn", "silu"},
                  {"block_out_channels", kVAEChannels},
                  {"down_block_types", std::vector<std::string>(kVAEChannels.size(), "DownEncoderBlock2D")},
                  {"force_upcast", true},
                  {"in_channels", 3},
                  {"latent_channels", kLatentChannels},
                  {"layers_per_block", kVAELayersPerBlock},
                  {"norm_num_groups", kVAEGroups},
                  {"out_channels", 3},
                  {"sample_size", kImageSize},
                  {"scaling_factor", scaling_factor},
                  {"up_block_types", std::vector<std::string>(kVAEChannels.size(), "UpDecoderBlock2D")}};
  return dump(j);
}

std::string vae_config_json() { return vae_config_json(1.0); }

std::string scheduler_config_json() {
  const json j = {{"_class_name", "DDIMScheduler"},
                  {"_diffusers_version", kDiffusersVersion},
                  {"beta_end", 0.012},
                  {"beta_schedule", "scaled_linear"},
                  {"beta_start", 0.00085},
                  {"clip_sample", false},
                  {"clip_sample_range", 1.0},
                  {"dynamic_thresholding_ratio", 0.995},
                  {"num_train_timesteps", 1000},
                  {"prediction_type", "epsilon"},
                  {"rescale_betas_zero_snr", false},
                  {"sample_max_value", 1.0},
                  {"set_alpha_to_one", false},
                  {"steps_offset", 1},
                  {"thresholding", false},
                  {"timestep_spacing", "leading"},
                  {"trained_betas", nullptr}};
  return dump(j);
}

// Version of the toy world the model was made for (bump when world.h changes what an image shows).
constexpr int kToyWorldVersion = 1;

constexpr const char* kToyWorldKey = "_stylealigned_toy_world";

std::string model_index_json() {
  const json none = {nullptr, nullptr};
  const json j = {{"_class_name", "StableDiffusionPipeline"},
                  {"_diffusers_version", kDiffusersVersion},
                  // Marks the embedded toy model, so `stylealigned eval` scores its sets with the world's evaluators.
                  // A leading underscore: diffusers ignores such keys when it loads the folder.
                  {kToyWorldKey, kToyWorldVersion},
                  // The StyleAligned options `generate`, `demo` and `study` start from for this model
                  // (Pipeline::style_aligned_defaults): the SDXL demo's plus AdaIN on values, which the model card's
                  // option sweep measured best for it (consistency gain +0.34 against +0.20, same object loss).
                  {"_stylealigned_options", {{"adain_values", true}}},
                  {"feature_extractor", none},
                  {"image_encoder", none},
                  {"requires_safety_checker", false},
                  {"safety_checker", none},
                  {"scheduler", {"diffusers", "DDIMScheduler"}},
                  {"text_encoder", {"transformers", "CLIPTextModel"}},
                  {"tokenizer", {"transformers", "CLIPTokenizer"}},
                  {"unet", {"diffusers", "UNet2DConditionModel"}},
                  {"vae", {"diffusers", "AutoencoderKL"}}};
  return dump(j);
}

models::CLIPTextConfig text_encoder_config() {
  // CLIPTextConfig reads files only; these are the fields it reads, from the same constants as the JSON (the test
  // checks that parsing text_encoder_config_json() gives the same values).
  models::CLIPTextConfig c;
  c.vocab_size = tokenizer_vocab_size();
  c.hidden_size = kTextHidden;
  c.intermediate_size = kTextIntermediate;
  c.num_hidden_layers = kTextLayers;
  c.num_attention_heads = kTextHeads;
  c.max_position_embeddings = kTextPositions;
  c.hidden_act = "quick_gelu";
  c.layer_norm_eps = 1e-5;
  c.projection_dim = kTextHidden;
  c.eos_token_id = tokenizer_eos_id();
  c.with_projection = false;
  c.validate();
  return c;
}

models::UNetConfig unet_config() { return models::UNetConfig::from_json(unet_config_json(), "toy unet config"); }

models::VAEConfig vae_config(double scaling_factor) {
  return models::VAEConfig::from_json(vae_config_json(scaling_factor), "toy vae config");
}

// --- export ----------------------------------------------------------------------------------------------------------

void export_model_folder(const fs::path& dir, models::CLIPTextModel text_encoder, models::UNet2DConditionModel unet,
                         models::AutoencoderKL vae, at::ScalarType file_dtype, double vae_scaling_factor,
                         bool overwrite) {
  ExportOptions options;
  options.file_dtype = file_dtype;
  options.vae_scaling_factor = vae_scaling_factor;
  options.overwrite = overwrite;
  export_model_folder(dir, std::move(text_encoder), std::move(unet), std::move(vae), options);
}

void export_model_folder(const fs::path& dir, models::CLIPTextModel text_encoder, models::UNet2DConditionModel unet,
                         models::AutoencoderKL vae, const ExportOptions& options) {
  // Everything that can be checked before writing is checked first.
  const char* torch_dtype = torch_dtype_name(options.file_dtype);
  const at::ScalarType file_dtype = options.file_dtype;
  if (text_encoder.is_empty() || unet.is_empty() || vae.is_empty()) {
    throw Error(fmt::format("{}: toy export needs all three models (a holder is empty)", dir.string()));
  }
  json te_json = options.text_encoder_config_json.empty()
                     ? text_encoder_json(torch_dtype)
                     : parse_object(options.text_encoder_config_json, "ExportOptions::text_encoder_config_json");
  te_json["torch_dtype"] = torch_dtype;
  const std::string unet_json = options.unet_config_json.empty() ? unet_config_json() : options.unet_config_json;
  const std::string toy_vae_json = vae_config_json(options.vae_scaling_factor);  // validates the factor
  json vae_j = options.vae_config_json.empty()
                   ? parse_object(toy_vae_json, "vae_config_json()")
                   : parse_object(options.vae_config_json, "ExportOptions::vae_config_json");
  vae_j["scaling_factor"] = options.vae_scaling_factor;
  const models::UNetConfig unet_cfg = models::UNetConfig::from_json(unet_json, "toy export: unet config");
  const models::VAEConfig vae_cfg = models::VAEConfig::from_json(vae_j.dump(), "toy export: vae config");

  fs::path target = fs::absolute(dir).lexically_normal();
  if (target.filename().empty()) target = target.parent_path();  // "models/toy/"
  const fs::path parent = target.parent_path();
  const std::string name = target.filename().string();
  std::error_code ec;
  const bool existed = fs::exists(target, ec);
  if (existed) {
    if (!fs::is_directory(target, ec)) throw Error(fmt::format("{}: exists and is not a folder", target.string()));
    if (!fs::is_empty(target, ec) && !options.overwrite) {
      throw Error(fmt::format("{}: exists and is not empty; refusing to overwrite it (pass overwrite = true to "
                              "replace it)",
                              target.string()));
    }
  }

  // Missing parents are created, and removed again if the export fails.
  fs::path created_root;
  for (fs::path p = parent; !p.empty() && !fs::exists(p, ec); p = p.parent_path()) {
    created_root = p;
    if (p == p.parent_path()) break;
  }
  auto remove_created = [&] {
    if (!created_root.empty()) fs::remove_all(created_root, ec);
  };
  if (!created_root.empty()) {
    fs::create_directories(parent, ec);
    if (ec) {
      remove_created();
      throw Error(fmt::format("{}: cannot create the parent folder ({})", parent.string(), ec.message()));
    }
  }

  fs::path temp;
  try {
    temp = make_temp_dir(parent, "." + name + ".partial-");
    write_text(temp / "model_index.json", model_index_json());
    make_dir(temp / "scheduler");
    write_text(temp / "scheduler" / "scheduler_config.json", scheduler_config_json());
    write_tokenizer_folder(temp / "tokenizer");

    // Each config is written first and read back by the loader's own parser; the weights are checked against a
    // module built from it.
    make_dir(temp / "text_encoder");
    write_text(temp / "text_encoder" / "config.json", dump(te_json));
    const models::CLIPTextConfig te_cfg = models::CLIPTextConfig::from_file(temp / "text_encoder" / "config.json");
    check_consistent(te_cfg, unet_cfg, vae_cfg);
    {
      const auto reference = std::make_shared<models::CLIPTextModelImpl>(te_cfg, /*initialize=*/false);
      write_weights(temp / "text_encoder" / "model.safetensors", *text_encoder, *reference, file_dtype,
                    "text_encoder");
    }
    make_dir(temp / "unet");
    write_text(temp / "unet" / "config.json", unet_json.back() == '\n' ? unet_json : unet_json + "\n");
    write_weights(temp / "unet" / "diffusion_pytorch_model.safetensors", *unet,
                  *models::UNet2DConditionModel::from_config(unet_cfg), file_dtype, "unet");
    make_dir(temp / "vae");
    write_text(temp / "vae" / "config.json", dump(vae_j));
    write_weights(temp / "vae" / "diffusion_pytorch_model.safetensors", *vae,
                  *models::AutoencoderKL::from_config(vae_cfg), file_dtype, "vae");

    // Into place. POSIX rename replaces an empty folder; a non-empty one (overwrite) is first moved aside, and
    // moved back if the new folder cannot take its place.
    if (existed && !fs::is_empty(target, ec)) {
      const fs::path old = make_temp_dir(parent, "." + name + ".old-");
      fs::rename(target, old, ec);
      if (ec) {
        const std::string why = ec.message();
        fs::remove(old, ec);
        throw Error(fmt::format("{}: cannot move the existing folder aside ({})", target.string(), why));
      }
      fs::rename(temp, target, ec);
      if (ec) {
        const std::string why = ec.message();
        fs::rename(old, target, ec);
        throw Error(fmt::format("{}: cannot move the new folder into place ({})", target.string(), why));
      }
      fs::remove_all(old, ec);
    } else {
      fs::rename(temp, target, ec);
      if (ec) throw Error(fmt::format("{}: cannot move the new folder into place ({})", target.string(), ec.message()));
    }
  } catch (...) {
    if (!temp.empty()) fs::remove_all(temp, ec);
    remove_created();
    throw;
  }
}

bool is_toy_model_folder(const fs::path& dir) {
  std::ifstream in(dir / "model_index.json");
  if (!in) return false;
  const json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  return j.is_object() && j.contains(kToyWorldKey);
}

}  // namespace stylealigned::toy
