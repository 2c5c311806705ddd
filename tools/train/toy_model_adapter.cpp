// STAND-IN definitions of the toy-model API (see toy_model_adapter.h); delete once stylealigned/toy/model.h lands.
// The architectures mirror the toymodel branch's work in progress (VAE 32/64/64, UNet 64/80/80 with 2 heads,
// text encoder 128 x 4 layers), so runs started with the stand-in train the shipped shapes.
#include "toy_model_adapter.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>
#include <vector>

#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/toy/world.h"

namespace stylealigned::toy {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// GPT-2 / CLIP byte-level symbols: printable Latin-1 bytes stand for themselves, the rest map to U+0100 and up.
std::vector<std::string> byte_symbols() {
  std::vector<int> keep;
  for (int b = '!'; b <= '~'; ++b) keep.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) keep.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) keep.push_back(b);
  std::vector<int> code(256, -1);
  for (int b : keep) code[b] = b;
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    if (code[b] < 0) code[b] = next++;
  }
  auto utf8 = [](int cp) {
    std::string s;
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    return s;
  };
  // CLIP orders the base vocabulary as bytes_to_unicode's value list: the kept bytes first, then the others.
  std::vector<std::string> out;
  for (int b : keep) out.push_back(utf8(code[b]));
  for (int b = 0; b < 256; ++b) {
    if (std::find(keep.begin(), keep.end(), b) == keep.end()) out.push_back(utf8(code[b]));
  }
  return out;
}

struct Bpe {
  std::vector<std::string> vocab;                         // id -> token
  std::vector<std::pair<std::string, std::string>> merges;  // in rank order
};

// Plain BPE of one ASCII word with the merges so far (lowest rank first), `</w>` on the last symbol.
std::vector<std::string> apply_bpe(const std::string& word, const std::map<std::pair<std::string, std::string>, size_t>& rank) {
  std::vector<std::string> sym;
  for (char c : word) sym.emplace_back(1, c);
  sym.back() += "</w>";
  while (sym.size() > 1) {
    size_t best = SIZE_MAX, at = 0;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      auto it = rank.find({sym[i], sym[i + 1]});
      if (it != rank.end() && it->second < best) best = it->second, at = i;
    }
    if (best == SIZE_MAX) break;
    sym[at] += sym[at + 1];
    sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  return sym;
}

// Merges that turn every caption word into one token: for each word, merge the first two symbols that remain after
// the merges so far, until one is left. A merge appended later has a lower priority, so it never changes how an
// earlier word reduces.
const Bpe& toy_bpe() {
  static const Bpe bpe = [] {
    Bpe b;
    for (const auto& s : byte_symbols()) b.vocab.push_back(s);
    for (const auto& s : byte_symbols()) b.vocab.push_back(s + "</w>");
    std::set<std::string> known(b.vocab.begin(), b.vocab.end());
    std::map<std::pair<std::string, std::string>, size_t> rank;
    for (const std::string& word : vocabulary()) {
      for (;;) {
        auto sym = apply_bpe(word, rank);
        if (sym.size() == 1) break;
        std::pair<std::string, std::string> m{sym[0], sym[1]};
        rank.emplace(m, b.merges.size());
        b.merges.push_back(m);
        if (known.insert(m.first + m.second).second) b.vocab.push_back(m.first + m.second);
      }
    }
    b.vocab.push_back("<|startoftext|>");
    b.vocab.push_back("<|endoftext|>");
    return b;
  }();
  return bpe;
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  if (!out) throw Error(fmt::format("cannot write {}", path.string()));
}

std::vector<std::pair<std::string, at::Tensor>> weights_of(const torch::nn::Module& module, at::ScalarType dtype) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : module.named_parameters()) out.emplace_back(p.key(), p.value().detach().to(at::kCPU, dtype));
  for (const auto& p : module.named_buffers()) out.emplace_back(p.key(), p.value().detach().to(at::kCPU));
  return out;
}

}  // namespace

void write_tokenizer_folder(const fs::path& dir) {
  const Bpe& bpe = toy_bpe();
  fs::create_directories(dir);
  json vocab = json::object();
  for (size_t i = 0; i < bpe.vocab.size(); ++i) vocab[bpe.vocab[i]] = i;
  write_text(dir / "vocab.json", vocab.dump());
  std::string merges = "#version: 0.2\n";
  for (const auto& [a, b] : bpe.merges) merges += a + " " + b + "\n";
  write_text(dir / "merges.txt", merges);
  const json special = {{"bos_token", "<|startoftext|>"},
                        {"eos_token", "<|endoftext|>"},
                        {"unk_token", "<|endoftext|>"},
                        {"pad_token", "<|endoftext|>"}};
  write_text(dir / "special_tokens_map.json", special.dump(2));
  json config = special;
  config["model_max_length"] = 77;
  config["tokenizer_class"] = "CLIPTokenizer";
  config["do_lower_case"] = true;
  write_text(dir / "tokenizer_config.json", config.dump(2));
}

int64_t tokenizer_vocab_size() { return static_cast<int64_t>(toy_bpe().vocab.size()); }

std::string text_encoder_config_json() {
  const int64_t v = tokenizer_vocab_size();
  return json{{"architectures", {"CLIPTextModel"}},
              {"model_type", "clip_text_model"},
              {"vocab_size", v},
              {"hidden_size", 128},
              {"intermediate_size", 512},
              {"num_hidden_layers", 4},
              {"num_attention_heads", 4},
              {"max_position_embeddings", 77},
              {"hidden_act", "quick_gelu"},
              {"layer_norm_eps", 1e-5},
              {"projection_dim", 128},
              {"bos_token_id", v - 2},
              {"eos_token_id", v - 1},
              {"pad_token_id", v - 1},
              {"torch_dtype", "float32"}}
      .dump(2);
}

std::string unet_config_json() {
  return json{{"_class_name", "UNet2DConditionModel"},
              {"sample_size", 16},
              {"in_channels", 4},
              {"out_channels", 4},
              {"down_block_types", {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"}},
              {"mid_block_type", "UNetMidBlock2DCrossAttn"},
              {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"}},
              {"block_out_channels", {64, 80, 80}},
              {"layers_per_block", 1},
              {"cross_attention_dim", 128},
              {"attention_head_dim", {2, 2, 2}},
              {"norm_num_groups", 16},
              {"act_fn", "silu"},
              {"flip_sin_to_cos", true},
              {"freq_shift", 0}}
      .dump(2);
}

std::string vae_config_json(double scaling_factor) {
  return json{{"_class_name", "AutoencoderKL"},
              {"in_channels", 3},
              {"out_channels", 3},
              {"latent_channels", 4},
              {"down_block_types", {"DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"}},
              {"up_block_types", {"UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"}},
              {"block_out_channels", {32, 64, 64}},
              {"layers_per_block", 1},
              {"norm_num_groups", 16},
              {"act_fn", "silu"},
              {"sample_size", 64},
              {"scaling_factor", scaling_factor},
              {"force_upcast", true}}
      .dump(2);
}

std::string scheduler_config_json() {
  return json{{"_class_name", "DDIMScheduler"},
              {"num_train_timesteps", 1000},
              {"beta_start", 0.00085},
              {"beta_end", 0.012},
              {"beta_schedule", "scaled_linear"},
              {"clip_sample", false},
              {"set_alpha_to_one", false},
              {"steps_offset", 1},
              {"prediction_type", "epsilon"},
              {"timestep_spacing", "leading"}}
      .dump(2);
}

std::string model_index_json() {
  return json{{"_class_name", "StableDiffusionPipeline"},
              {"scheduler", {"diffusers", "DDIMScheduler"}},
              {"text_encoder", {"transformers", "CLIPTextModel"}},
              {"tokenizer", {"transformers", "CLIPTokenizer"}},
              {"unet", {"diffusers", "UNet2DConditionModel"}},
              {"vae", {"diffusers", "AutoencoderKL"}},
              {"safety_checker", {nullptr, nullptr}},
              {"feature_extractor", {nullptr, nullptr}},
              {"requires_safety_checker", false}}
      .dump(2);
}

namespace {
void write_folder(const fs::path& dir, models::CLIPTextModel te, models::UNet2DConditionModel unet,
                  models::AutoencoderKL vae, const std::string& te_json, const std::string& unet_json,
                  const std::string& vae_json, at::ScalarType file_dtype, bool overwrite) {
  if (fs::exists(dir) && !fs::is_empty(dir)) {
    if (!overwrite) throw Error(fmt::format("export: {} exists and is not empty (pass overwrite)", dir.string()));
    fs::remove_all(dir);
  }
  fs::create_directories(dir);
  write_text(dir / "model_index.json", model_index_json());
  fs::create_directories(dir / "scheduler");
  write_text(dir / "scheduler" / "scheduler_config.json", scheduler_config_json());
  write_tokenizer_folder(dir / "tokenizer");
  fs::create_directories(dir / "text_encoder");
  write_text(dir / "text_encoder" / "config.json", te_json);
  io::save_safetensors(dir / "text_encoder" / "model.safetensors", weights_of(*te, file_dtype));
  fs::create_directories(dir / "unet");
  write_text(dir / "unet" / "config.json", unet_json);
  io::save_safetensors(dir / "unet" / "diffusion_pytorch_model.safetensors", weights_of(*unet, file_dtype));
  fs::create_directories(dir / "vae");
  write_text(dir / "vae" / "config.json", vae_json);
  io::save_safetensors(dir / "vae" / "diffusion_pytorch_model.safetensors", weights_of(*vae, file_dtype));
}
}  // namespace

void export_model_folder(const fs::path& dir, models::CLIPTextModel te, models::UNet2DConditionModel unet,
                         models::AutoencoderKL vae, at::ScalarType file_dtype, double vae_scaling_factor,
                         bool overwrite) {
  write_folder(dir, te, unet, vae, text_encoder_config_json(), unet_config_json(), vae_config_json(vae_scaling_factor),
               file_dtype, overwrite);
}

}  // namespace stylealigned::toy

namespace stylealigned::train {

void export_toy_folder(const std::filesystem::path& dir, models::CLIPTextModel te, models::UNet2DConditionModel unet,
                       models::AutoencoderKL vae, const std::string& text_encoder_config_json,
                       const std::string& unet_config_json, const std::string& vae_config_json,
                       at::ScalarType file_dtype, double vae_scaling_factor, bool overwrite) {
  nlohmann::json vae_config = nlohmann::json::parse(vae_config_json);
  vae_config["scaling_factor"] = vae_scaling_factor;
  toy::write_folder(dir, te, unet, vae, text_encoder_config_json, unet_config_json, vae_config.dump(2), file_dtype,
                    overwrite);
}

}  // namespace stylealigned::train
