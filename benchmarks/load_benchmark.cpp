// stylealigned_bench_load: peak memory of loading a model folder, as (peak RSS - RSS before loading) / weights.
//
//   stylealigned_bench_load --model models/sdxl_tiny          # the whole pipeline folder
//   stylealigned_bench_load --unet path/to/unet               # one UNet folder
//   stylealigned_bench_load --write-random-unet sd15 --out /tmp/sd15_unet   # make a full-size random UNet folder
#include <ATen/ATen.h>
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <fstream>
#include <string>

#include "stylealigned/io/safetensors.h"
#include "stylealigned/models/clip_text.h"
#include "stylealigned/models/tokenizer.h"
#include "stylealigned/models/unet.h"
#include "stylealigned/models/vae.h"
#include "stylealigned/pipeline.h"
#include "stylealigned/runtime.h"

namespace fs = std::filesystem;

namespace {

// VmRSS / VmHWM of this process in MiB.
double proc_status_mb(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::stod(line.substr(key.size() + 1)) / 1024.0;
  }
  return -1;
}

uint64_t safetensors_bytes(const fs::path& folder) {
  uint64_t total = 0;
  for (const auto& e : fs::recursive_directory_iterator(folder)) {
    if (e.is_regular_file() && e.path().extension() == ".safetensors") total += fs::file_size(e.path());
  }
  return total;
}

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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"stylealigned_bench_load: peak RSS of loading weights relative to their size"};
  std::string model, unet, write_random, out;
  app.add_option("--model", model, "a diffusers pipeline folder");
  app.add_option("--unet", unet, "a diffusers unet folder");
  app.add_option("--write-random-unet", write_random, "write a random full-size UNet folder (sd15)");
  app.add_option("--out", out, "output folder for --write-random-unet");
  CLI11_PARSE(app, argc, argv);
  stylealigned::configure_threads();
  try {
    if (!write_random.empty()) {
      if (out.empty()) throw std::runtime_error("--out is required");
      const auto text = published_config(write_random);
      auto model_ = stylealigned::models::UNet2DConditionModel::from_config(
          stylealigned::models::UNetConfig::from_json(text, write_random));
      fs::create_directories(out);
      std::ofstream(fs::path(out) / "config.json") << text;
      std::vector<std::pair<std::string, at::Tensor>> tensors;
      for (const auto& p : model_->named_parameters()) tensors.emplace_back(p.key(), p.value());
      stylealigned::io::save_safetensors(fs::path(out) / "diffusion_pytorch_model.safetensors", tensors);
      fmt::print("{{\"written\": \"{}\", \"bytes\": {}}}\n", out, safetensors_bytes(out));
      return 0;
    }
    // libtorch initialises lazily (thread pools, BLAS and oneDNN buffers): do that first so it is not counted.
    {
      auto x = at::randn({1, 8, 16, 16});
      auto y = at::conv2d(x, at::randn({8, 8, 3, 3}), {}, 1, 1);
      auto z = at::matmul(y.flatten(1), at::randn({y.flatten(1).size(1), 16}));
      (void)z.sum().item<float>();
    }
    const double before = proc_status_mb("VmRSS");
    uint64_t bytes = 0;
    if (!model.empty()) {
      {
        // Component by component, to see where memory goes (released again before the whole-pipeline load).
        namespace m = stylealigned::models;
        const fs::path dir(model);
        double last = proc_status_mb("VmRSS");
        auto step = [&](const char* what) {
          const double now = proc_status_mb("VmRSS");
          fmt::print("{{\"component\": \"{}\", \"rss_delta_mb\": {:.1f}}}\n", what, now - last);
          last = now;
        };
        auto tok = m::ClipTokenizer::from_folder(dir / "tokenizer");
        step("tokenizer");
        auto te = m::CLIPTextModel::from_pretrained(dir / "text_encoder");
        step("text_encoder");
        auto unet_ = m::UNet2DConditionModel::from_pretrained(dir / "unet");
        step("unet");
        auto vae = m::AutoencoderKL::from_pretrained(dir / "vae");
        step("vae");
      }
      auto pipe = stylealigned::Pipeline::load(model);
      bytes = safetensors_bytes(model);
    } else if (!unet.empty()) {
      auto m = stylealigned::models::UNet2DConditionModel::from_pretrained(unet);
      bytes = safetensors_bytes(unet);
    } else {
      throw std::runtime_error("give --model, --unet or --write-random-unet");
    }
    const double peak = proc_status_mb("VmHWM");
    const double weights_mb = bytes / (1024.0 * 1024.0);
    fmt::print(
        "{{\"weights_mb\": {:.2f}, \"rss_before_mb\": {:.1f}, \"peak_rss_mb\": {:.1f}, \"increase_mb\": {:.1f}, "
        "\"increase_over_weights\": {:.3f}}}\n",
        weights_mb, before, peak, peak - before, (peak - before) / weights_mb);
  } catch (const std::exception& e) {
    fmt::print(stderr, "stylealigned_bench_load: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
