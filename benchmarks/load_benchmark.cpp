// stylealigned_bench_load: peak memory of loading a model folder, as (peak RSS - RSS before loading) / weights.
//
//   stylealigned_bench_load --model models/sdxl_tiny              # Pipeline::load of the whole folder
//   stylealigned_bench_load --model models/sdxl_tiny --breakdown  # each component on its own (see below)
//   stylealigned_bench_load --unet path/to/unet                   # one UNet folder
//   stylealigned_bench_load --write-random-unet sd15 --out /tmp/sd15_unet   # make a full-size random UNet folder
//   stylealigned_bench_load --write-random-pipeline sd15 --out /tmp/sd15     # a whole random SD1.5 pipeline folder
//
// Each run measures one thing in a fresh process: the pipeline's increase is never measured after other loads (their
// freed memory would be reused and hide part of the cost). --breakdown loads the components one after the other,
// resetting the peak before each, and prints each one's peak and retained increase; it gives no pipeline total.
#include <ATen/ATen.h>
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <chrono>
#include <fstream>
#include <optional>
#include <string>

#include "internal/process_memory.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/models/clip_text.h"
#include "stylealigned/models/tokenizer.h"
#include "stylealigned/models/unet.h"
#include "stylealigned/models/vae.h"
#include "stylealigned/pipeline.h"
#include "stylealigned/runtime.h"

namespace fs = std::filesystem;
using stylealigned::internal::MemoryDelta;
using stylealigned::internal::measure_memory;
using stylealigned::internal::safetensors_bytes;

namespace {

// The published SD1.5 / SDXL-base unet/config.json keys our loader reads.
std::string published_config(const std::string& which) {
  if (which == "sd15") {
    return R"({"_class_name":"UNet2DConditionModel","act_fn":"silu","attention_head_dim":8,
      "block_out_channels":[320,640,1280,1280],"center_input_sample":false,"cross_attention_dim":768,
      "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
      "downsample_padding":1,"flip_sin_to_cos":true,"freq_shift":0,"in_channels":4,"layers_per_block":2,
      "mid_block_scale_factor":1,"norm_eps":1e-05,"norm_num_groups":32,"out_channels":4,"sample_size":64,
      "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"]})";
  }
  throw std::runtime_error("--write-random-unet: only 'sd15' is built in");
}

// SD1.5's text encoder (OpenAI CLIP ViT-L/14) and VAE, as published. eos_token_id 2 is what SD1.5's file says
// (transformers then pools at argmax(ids)).
const char* kSd15TextEncoderConfig = R"({"architectures":["CLIPTextModel"],"hidden_act":"quick_gelu","hidden_size":768,
  "intermediate_size":3072,"layer_norm_eps":1e-05,"max_position_embeddings":77,"model_type":"clip_text_model",
  "num_attention_heads":12,"num_hidden_layers":12,"projection_dim":768,"bos_token_id":0,"eos_token_id":2,
  "vocab_size":49408})";
const char* kSd15VaeConfig = R"({"_class_name":"AutoencoderKL","act_fn":"silu","block_out_channels":[128,256,512,512],
  "down_block_types":["DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D"],
  "in_channels":3,"latent_channels":4,"layers_per_block":2,"norm_num_groups":32,"out_channels":3,"sample_size":512,
  "scaling_factor":0.18215,
  "up_block_types":["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"]})";

void write_module(const torch::nn::Module& module, const fs::path& file) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& p : module.named_parameters()) tensors.emplace_back(p.key(), p.value());
  stylealigned::io::save_safetensors(file, tensors);
}

void write_text(const fs::path& file, const std::string& text) {
  fs::create_directories(file.parent_path());
  std::ofstream out(file);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + file.string());
}

// A UNet folder (config.json + weights) of the published config `which`, with random weights.
void write_random_unet(const std::string& which, const fs::path& dir) {
  namespace m = stylealigned::models;
  const auto text = published_config(which);
  write_text(dir / "config.json", text);
  write_module(*m::UNet2DConditionModel::from_config(m::UNetConfig::from_json(text, which)),
               dir / "diffusion_pytorch_model.safetensors");
}

// A full-size SD1.5 folder with random weights, for whole-process timings of `stylealigned generate` without
// downloading 4 GB. The tokenizer and scheduler are the embedded toy model's (a small BPE vocabulary whose ids all
// fall inside SD1.5's 49408-row embedding table): tokenizing costs the same microseconds either way.
void write_random_pipeline(const std::string& which, const fs::path& out, const fs::path& toy) {
  if (which != "sd15") throw std::runtime_error("--write-random-pipeline: only 'sd15' is built in");
  namespace m = stylealigned::models;
  if (!fs::is_directory(toy / "tokenizer")) {
    throw std::runtime_error("--toy-model " + toy.string() + ": no tokenizer/ folder to copy");
  }
  fs::create_directories(out);
  fs::copy(toy / "tokenizer", out / "tokenizer", fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  fs::create_directories(out / "scheduler");
  fs::copy_file(toy / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json",
                fs::copy_options::overwrite_existing);
  write_text(out / "model_index.json", R"({"_class_name":"StableDiffusionPipeline","_diffusers_version":"0.25.1",
  "requires_safety_checker":false,"scheduler":["diffusers","DDIMScheduler"],
  "text_encoder":["transformers","CLIPTextModel"],"tokenizer":["transformers","CLIPTokenizer"],
  "unet":["diffusers","UNet2DConditionModel"],"vae":["diffusers","AutoencoderKL"]})");

  write_random_unet(which, out / "unet");

  write_text(out / "text_encoder" / "config.json", kSd15TextEncoderConfig);
  m::CLIPTextModelImpl text(m::CLIPTextConfig::from_file(out / "text_encoder" / "config.json"));
  write_module(text, out / "text_encoder" / "model.safetensors");

  write_text(out / "vae" / "config.json", kSd15VaeConfig);
  write_module(*m::AutoencoderKL::from_config(m::VAEConfig::from_json(kSd15VaeConfig, "sd15 vae")),
               out / "vae" / "diffusion_pytorch_model.safetensors");
}

void print_total(const MemoryDelta& m, uint64_t bytes) {
  const double weights_mib = bytes / (1024.0 * 1024.0);
  fmt::print(
      "{{\"weights_mb\": {:.2f}, \"rss_before_mb\": {:.1f}, \"peak_rss_mb\": {:.1f}, \"increase_mb\": {:.1f}, "
      "\"retained_mb\": {:.1f}, \"retained_anon_mb\": {:.1f}, \"retained_file_mb\": {:.1f}, "
      "\"increase_over_weights\": {:.3f}{}}}\n",
      weights_mib, m.before_mib, m.peak_mib, m.increase_mib(), m.after_mib - m.before_mib, m.anon_change_mib,
      m.file_change_mib,
      m.increase_mib() / weights_mib, m.peak_reset ? "" : ", \"warning\": \"peak RSS could not be reset\"");
}

// Each component of a pipeline folder in turn, kept alive (as the pipeline keeps them) while the next one loads.
void breakdown(const fs::path& dir) {
  namespace m = stylealigned::models;
  std::vector<std::shared_ptr<void>> keep;
  auto step = [&](const std::string& component, const std::function<std::shared_ptr<void>()>& load) {
    if (!fs::is_directory(dir / component)) return;
    const auto start = std::chrono::steady_clock::now();
    const MemoryDelta d = measure_memory([&] { keep.push_back(load()); });
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    const uint64_t bytes = safetensors_bytes(dir / component);
    fmt::print(
        "{{\"component\": \"{}\", \"weights_mb\": {:.2f}, \"peak_increase_mb\": {:.1f}, \"retained_mb\": {:.1f}, "
        "\"anon_mb\": {:.1f}, \"file_mb\": {:.1f}, \"load_ms\": {:.1f}}}\n",
        component, bytes / (1024.0 * 1024.0), d.increase_mib(), d.after_mib - d.before_mib, d.anon_change_mib,
        d.file_change_mib, ms);
  };
  auto tokenizer = [&](const std::string& name) {
    step(name, [&] { return std::make_shared<m::ClipTokenizer>(m::ClipTokenizer::from_folder(dir / name)); });
  };
  auto text_encoder = [&](const std::string& name) {
    step(name, [&] { return std::shared_ptr<void>(m::CLIPTextModel::from_pretrained(dir / name).ptr()); });
  };
  tokenizer("tokenizer");
  text_encoder("text_encoder");
  tokenizer("tokenizer_2");
  text_encoder("text_encoder_2");
  step("unet", [&] { return std::shared_ptr<void>(m::UNet2DConditionModel::from_pretrained(dir / "unet").ptr()); });
  step("vae", [&] { return std::shared_ptr<void>(m::AutoencoderKL::from_pretrained(dir / "vae").ptr()); });
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"stylealigned_bench_load: peak RSS of loading weights relative to their size"};
  std::string model, unet, write_random, write_pipeline, out, toy = "models/toy";
  bool per_component = false;
  app.add_option("--model", model, "a diffusers pipeline folder (measures Pipeline::load)");
  app.add_flag("--breakdown", per_component, "with --model: each component's peak and retained increase instead");
  app.add_option("--unet", unet, "a diffusers unet folder");
  app.add_option("--write-random-unet", write_random, "write a random full-size UNet folder (sd15)");
  app.add_option("--write-random-pipeline", write_pipeline, "write a random full-size pipeline folder (sd15)");
  app.add_option("--out", out, "output folder for --write-random-unet / --write-random-pipeline");
  app.add_option("--toy-model", toy, "where --write-random-pipeline copies tokenizer/ and scheduler/ from");
  CLI11_PARSE(app, argc, argv);
  stylealigned::configure_threads();
  try {
    if (!write_random.empty()) {
      if (out.empty()) throw std::runtime_error("--out is required");
      write_random_unet(write_random, out);
      fmt::print("{{\"written\": \"{}\", \"bytes\": {}}}\n", out, safetensors_bytes(out));
      return 0;
    }
    if (!write_pipeline.empty()) {
      if (out.empty()) throw std::runtime_error("--out is required");
      write_random_pipeline(write_pipeline, out, toy);
      fmt::print("{{\"written\": \"{}\", \"bytes\": {}}}\n", out, safetensors_bytes(out));
      return 0;
    }
    stylealigned::internal::warm_up_torch();
    if (!model.empty() && per_component) {
      breakdown(model);
    } else if (!model.empty()) {
      std::optional<stylealigned::Pipeline> pipe;
      const MemoryDelta m = measure_memory([&] { pipe.emplace(stylealigned::Pipeline::load(model)); });
      print_total(m, safetensors_bytes(model));
    } else if (!unet.empty()) {
      stylealigned::models::UNet2DConditionModel loaded{nullptr};
      const MemoryDelta m =
          measure_memory([&] { loaded = stylealigned::models::UNet2DConditionModel::from_pretrained(unet); });
      print_total(m, safetensors_bytes(unet));
    } else {
      throw std::runtime_error("give --model, --unet or --write-random-unet");
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "stylealigned_bench_load: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
