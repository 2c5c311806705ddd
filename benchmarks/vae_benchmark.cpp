// stylealigned_bench_vae: times the VAE decode a pipeline runs for every generated image (latents -> pixels, one
// image at a time as Pipeline::generate does), in fp32 and, when asked, in a reduced dtype in the same process, so
// the speed-up and the pixel error of the reduced dtype come from one run on one machine.
//
//   stylealigned_bench_vae --config sd --width 512 --height 512            # the SD1.5/SDXL VAE, random weights, fp32
//   stylealigned_bench_vae --config sd --dtype bf16                         # + bf16: speed-up and error vs fp32
//   stylealigned_bench_vae --model models/toy                               # a diffusers folder (or its vae/)
//
// Prints one JSON object per timed decode, then a summary line: `seconds` (median per image, the requested dtype),
// `seconds_fp32`, `speedup_vs_fp32`, `gflops` (analytic count below over `seconds`), `gemm_gflops` (fp32 2048^3
// at::mm in this process), `efficiency`, `max_abs_vs_fp32` / `rel_l2_vs_fp32` (decoded pixels in [-1, 1]) and
// `peak_rss_mb`.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <string>
#include <vector>

#include "bench_common.h"
#include "stylealigned/log.h"
#include "stylealigned/models/vae.h"
#include "stylealigned/runtime.h"

namespace {

using namespace sa_bench;  // NOLINT
using sa::models::VAEConfig;

// Multiply-accumulates of one decode of a [1, latent, h, w] input, walking the decoder as diffusers' Decoder (and
// models::AutoencoderKL) builds it: post_quant_conv, conv_in, the mid block (two resnets and single-head attention
// over h*w tokens), the up blocks (layers_per_block + 1 resnets, a nearest 2x upsample and its 3x3 conv on all but
// the last) and conv_out. Convolutions, linears and both attention matmuls; norms and activations are left out.
// The walk also counts the parameters it passes, which checks it against the built model.
struct DecodeCount {
  double macs = 0.0;
  double params = 0.0;
};

DecodeCount count_decode(const VAEConfig& c, int64_t h, int64_t w) {
  DecodeCount n;
  auto conv = [&](int64_t in, int64_t out, int64_t k, int64_t hh, int64_t ww) {
    n.macs += static_cast<double>(in) * out * k * k * hh * ww;
    n.params += static_cast<double>(in) * out * k * k + out;
  };
  auto norm = [&](int64_t ch) { n.params += 2.0 * ch; };
  auto resnet = [&](int64_t in, int64_t out, int64_t hh, int64_t ww) {
    norm(in);
    conv(in, out, 3, hh, ww);
    norm(out);
    conv(out, out, 3, hh, ww);
    if (in != out) conv(in, out, 1, hh, ww);
  };
  const std::vector<int64_t> ch(c.block_out_channels.rbegin(), c.block_out_channels.rend());
  if (c.use_post_quant_conv) conv(c.latent_channels, c.latent_channels, 1, h, w);
  conv(c.latent_channels, ch[0], 3, h, w);
  resnet(ch[0], ch[0], h, w);
  if (c.mid_block_add_attention) {
    const double tokens = static_cast<double>(h) * w, dim = static_cast<double>(ch[0]);
    n.macs += 4.0 * tokens * dim * dim + 2.0 * tokens * tokens * dim;  // q, k, v, out; q.k^T and p.v
    n.params += 4.0 * (dim * dim + dim);
    norm(ch[0]);
  }
  resnet(ch[0], ch[0], h, w);
  int64_t prev = ch[0];
  for (size_t i = 0; i < ch.size(); ++i) {
    for (int64_t j = 0; j <= c.layers_per_block; ++j) resnet(j == 0 ? prev : ch[i], ch[i], h, w);
    prev = ch[i];
    if (i + 1 < ch.size()) {
      h *= 2;
      w *= 2;
      conv(ch[i], ch[i], 3, h, w);
    }
  }
  norm(ch.back());
  conv(ch.back(), c.out_channels, 3, h, w);
  return n;
}

// The SD1.5 / SDXL VAE (same architecture; only scaling_factor and force_upcast differ).
VAEConfig stable_diffusion_vae() {
  VAEConfig c;
  c.block_out_channels = {128, 256, 512, 512};
  c.layers_per_block = 2;
  c.sample_size = 512;
  return c;
}

struct Options {
  std::string model, config;
  int64_t width = 0, height = 0;
  int threads = 0, reps = 3, warmup = 1;
  std::string dtype = "fp32";
  uint64_t seed = 0;
  bool count_only = false;
};

// Median seconds of `reps` decodes of `latents` after `warmup` untimed ones; prints one line per timed decode.
double time_decodes(sa::models::AutoencoderKL& vae, const at::Tensor& latents, const Options& o, const char* dtype,
                    at::Tensor* out) {
  c10::InferenceMode inference;
  std::vector<double> times;
  for (int i = 0; i < o.warmup + o.reps; ++i) {
    const auto t0 = Clock::now();
    at::Tensor image = vae->decode(latents).to(at::kFloat);
    const double s = seconds_since(t0);
    if (i < o.warmup) continue;
    times.push_back(s);
    *out = image;
    print(Json{{"dtype", dtype}, {"rep", i - o.warmup}, {"seconds", s}});
  }
  return median(times);
}

int run(const Options& o) {
  const at::ScalarType dtype = parse_dtype(o.dtype);
  if (dtype != at::kFloat && !sa::cpu_has_native_bf16()) {
    sa::warn(fmt::format("--dtype {}: this CPU has no native bf16/fp16 matrix units; expect it far slower than fp32",
                         o.dtype));
  }
  if (dtype == at::kHalf && !sa::cpu_supports_fp16_convolution()) {
    throw sa::Error("--dtype fp16: this libtorch has no fp16 CPU convolution; use bf16");
  }
  const int threads = sa::configure_threads(o.threads);
  sa::configure_large_tensor_pages();
  // Weights are built and converted outside InferenceMode, as Pipeline::load does: only the decodes run in it.

  VAEConfig config;
  sa::models::AutoencoderKL vae{nullptr};
  at::manual_seed(static_cast<int64_t>(o.seed));
  if (!o.model.empty()) {
    vae = sa::models::AutoencoderKL::from_pretrained(component_folder(o.model, "vae"));
    config = vae->config();
  } else {
    config = o.config == "sd" ? stable_diffusion_vae() : VAEConfig::from_file(o.config);
    vae = sa::models::AutoencoderKL::from_config(config);
  }
  vae->eval();
  const int64_t factor = config.scale_factor();
  const int64_t width = o.width > 0 ? o.width : config.sample_size;
  const int64_t height = o.height > 0 ? o.height : width;
  if (width % factor != 0 || height % factor != 0) {
    throw sa::Error(fmt::format("--width/--height {}x{} must be multiples of the VAE factor {}", width, height, factor));
  }
  const at::Tensor latents = at::randn({1, config.latent_channels, height / factor, width / factor});
  const DecodeCount count = count_decode(config, height / factor, width / factor);
  const double gflop = 2.0 * count.macs / 1e9;
  double decoder_params = 0.0;
  for (const auto& p : vae->named_parameters()) {
    if (p.key().rfind("decoder.", 0) == 0 || p.key().rfind("post_quant_conv.", 0) == 0) {
      decoder_params += static_cast<double>(p.value().numel());
    }
  }
  const double gemm = gemm_gflops(at::kFloat, at::kCPU);

  Json head{{"model", o.model.empty() ? o.config : o.model},
            {"width", width},
            {"height", height},
            {"latent", {height / factor, width / factor}},
            {"gflop_per_decode", gflop},
            {"flop_method", "analytic walk of the decoder: MACs of every conv, linear and both attention matmuls; "
                            "norms and activations not counted; 1 MAC = 2 FLOP"},
            {"decoder_params", decoder_params},
            {"decoder_params_analytic", count.params},
            {"threads", threads},
            {"cpu", sa::cpu_model_name()},
            {"native_bf16", sa::cpu_has_native_bf16()}};
  if (o.count_only) {
    head["summary"] = true;
    print(head);
    return 0;
  }
  print(head);

  at::Tensor ref;
  const double fp32_seconds = time_decodes(vae, latents, o, "fp32", &ref);
  Json summary = head;
  summary["summary"] = true;
  summary["dtype"] = o.dtype;
  summary["seconds_fp32"] = fp32_seconds;
  double seconds = fp32_seconds;
  if (dtype != at::kFloat) {
    vae->to(dtype);
    at::Tensor low;
    seconds = time_decodes(vae, latents.to(dtype), o, dtype_name(dtype), &low);
    summary["speedup_vs_fp32"] = fp32_seconds / seconds;
    summary["max_abs_vs_fp32"] = (low - ref).abs().max().item<double>();
    summary["rel_l2_vs_fp32"] = ((low - ref).norm() / ref.norm()).item<double>();
  }
  summary["seconds"] = seconds;
  summary["gflops"] = gflop / seconds;
  summary["gemm_gflops"] = gemm;
  summary["efficiency"] = gflop / seconds / gemm;
  summary["output_finite"] = ref.isfinite().all().item<bool>();
  summary["peak_rss_mb"] = peak_rss_mb();
  print(summary);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"Times the VAE decode (one image, as a pipeline runs it), fp32 and optionally a reduced dtype"};
  auto* source = app.add_option_group("model", "What to run: exactly one of --model, --config");
  source->add_option("--model", o.model, "A diffusers folder or its vae/ subfolder");
  source->add_option("--config", o.config, "'sd' (the SD1.5/SDXL VAE) or a vae config.json: random weights");
  source->require_option(1);
  app.add_option("--width", o.width, "Image width in pixels (default: the config's sample_size)");
  app.add_option("--height", o.height, "Image height in pixels (default: the width)");
  app.add_option("--threads", o.threads, "Intra-op threads (0: all cores available)")->capture_default_str();
  app.add_option("--reps", o.reps, "Timed decodes per dtype")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--warmup", o.warmup, "Untimed decodes first")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--dtype", o.dtype, "fp32, or bf16/fp16 timed after fp32 and compared with it")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}));
  app.add_option("--seed", o.seed, "Seed of the random weights and latents")->capture_default_str();
  app.add_flag("--count-only", o.count_only, "Print the analytic FLOP and parameter counts and exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return run(o);
  } catch (const std::exception& e) {
    fmt::print(stderr, "stylealigned_bench_vae: error: {}\n", e.what());
    return 1;
  }
}
