// `stylealigned generate` and `stylealigned transfer`: a style-aligned set as PNG files, a grid and settings.json.
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <variant>
#include <nlohmann/json.hpp>

#include "stylealigned/image.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/pipeline.h"
#include "stylealigned/log.h"
#include "stylealigned/runtime.h"
#include "stylealigned/toy/model.h"
#include "stylealigned/toy/world.h"
#include "tool/commands.h"
#include "tool/output.h"

namespace sa_tool {

namespace fs = std::filesystem;
using stylealigned::Error;

void add_generate_options(CLI::App& cmd, GenerateOptions& o, bool transfer) {
  cmd.add_option("--model", o.model, "diffusers model folder (model_index.json, unet/, vae/, ...)")->required();
  auto* prompt = cmd.add_option("--prompt", o.prompts,
                                transfer ? "target prompt (repeat for more images)"
                                         : "prompt; repeat it: the first is the style reference");
  auto* file = cmd.add_option("--prompts-file", o.prompts_file, "file with one prompt per line (# comments)");
  prompt->excludes(file);
  cmd.add_option("--style", o.style, "style text appended to every prompt as \"{prompt}, {style}\"");
  cmd.add_option("--negative-prompt", o.negative_prompt, "negative prompt for every image");
  cmd.add_option("--steps", o.steps, "denoising steps")->capture_default_str();
  cmd.add_option("--guidance", o.guidance, "classifier-free guidance (default 5.0 SDXL, 7.5 SD1.x; <= 1 disables)");
  cmd.add_option("--guidance-rescale", o.guidance_rescale, "guidance rescale phi in [0, 1]")->capture_default_str();
  cmd.add_option("--width", o.width, "image width (default: the model's)");
  cmd.add_option("--height", o.height, "image height (default: the model's)");
  cmd.add_option("--seed", o.seed, "seed of the initial latents (same as diffusers' CPU generator)")
      ->capture_default_str();
  cmd.add_option("--latents", o.latents_file, "safetensors file with one tensor [n, C, h/f, w/f]: initial latents");
  cmd.add_option("--save-latents", o.save_latents, "write the final latents (tensor 'latents') to this file");
  cmd.add_option("--scheduler-config", o.scheduler_config, "scheduler_config.json replacing the model's");
  cmd.add_option("--eta", o.eta, "DDIM eta")->capture_default_str();
  cmd.add_option("--out", o.out, "output folder")->capture_default_str();
  cmd.add_option("--device", o.device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  cmd.add_option("--dtype", o.dtype, "fp32, bf16 or fp16")->check(CLI::IsMember({"fp32", "bf16", "fp16"}))
      ->capture_default_str();
  cmd.add_option("--vae-dtype", o.vae_dtype, "auto (bf16 with --dtype bf16, else fp32), fp32, bf16 or fp16")
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16"}))
      ->capture_default_str();
  cmd.add_flag("--force", o.force, "overwrite existing output files");
  cmd.add_flag("--quiet", o.quiet, "no progress output");

  auto& sa = o.sa;
  if (transfer) sa = stylealigned::StyleAlignedOptions::transfer_notebook();
  const std::string group =
      transfer ? "StyleAligned (defaults: the official transfer notebook)"
               : "StyleAligned (defaults: the official SDXL demo, with the model folder's _stylealigned_options)";
  cmd.add_flag("--no-style-align", o.no_style_align, "vanilla generation (no StyleAligned)")->group(group);
  std::vector<std::pair<CLI::Option*, std::string>> fields = {
      {cmd.add_flag("--share-group-norm,!--no-share-group-norm", sa.share_group_norm,
                    "GroupNorm statistics joint with the reference"),
       "share_group_norm"},
      {cmd.add_flag("--share-layer-norm,!--no-share-layer-norm", sa.share_layer_norm,
                    "accepted for parity with the official code (no numerical effect)"),
       "share_layer_norm"},
      {cmd.add_flag("!--no-share-attention", sa.share_attention, "targets do not attend to the reference"),
       "share_attention"},
      {cmd.add_flag("--adain-queries,!--no-adain-queries", sa.adain_queries, "AdaIN on queries"), "adain_queries"},
      {cmd.add_flag("--adain-keys,!--no-adain-keys", sa.adain_keys, "AdaIN on keys"), "adain_keys"},
      {cmd.add_flag("--adain-values,!--no-adain-values", sa.adain_values, "AdaIN on values"), "adain_values"},
      {cmd.add_flag("--full-attention-share,!--no-full-attention-share", sa.full_attention_share,
                    "ablation: every image attends to all images of its group"),
       "full_attention_share"},
      {cmd.add_option("--shared-score-scale", sa.shared_score_scale, "lambda: multiplies reference logits")
           ->capture_default_str(),
       "shared_score_scale"},
      {cmd.add_option("--shared-score-shift", sa.shared_score_shift, "added to reference logits (ln 2: counts double)")
           ->capture_default_str(),
       "shared_score_shift"},
      {cmd.add_option("--only-self-level", sa.only_self_level, "fraction of self-attention layers left unshared")
           ->capture_default_str(),
       "only_self_level"},
  };
  for (auto& [opt, field] : fields) opt->group(group);
  cmd.final_callback([&o, fields] {
    o.sa_given.clear();
    for (const auto& [opt, field] : fields) {
      if (opt->count() > 0) o.sa_given.push_back(field);
    }
  });

  if (transfer) {
    cmd.add_option("--reference", o.reference, "the style reference image (PNG, JPEG, ...)")->required();
    cmd.add_option("--reference-caption", o.reference_caption, "a caption of the reference image")->required();
    cmd.add_option("--inversion-guidance", o.inversion_guidance, "guidance of the DDIM inversion")
        ->capture_default_str();
    cmd.add_option("--inversion-offset", o.inversion_offset,
                   "trajectory index the reference row starts from")->capture_default_str();
  }
}

namespace {

std::vector<std::string> read_prompts_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(fmt::format("{}: cannot read the prompts file", path));
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
    size_t start = line.find_first_not_of(" \t");
    if (start == std::string::npos || line[start] == '#') continue;
    out.push_back(line.substr(start));
  }
  if (out.empty()) throw Error(fmt::format("{}: no prompts in the file", path));
  return out;
}

c10::ScalarType parse_dtype(const std::string& s) {
  if (s == "bf16") return at::kBFloat16;
  if (s == "fp16") return at::kHalf;
  return at::kFloat;
}

// parse_dtype's inverse, for settings.json.
const char* dtype_flag(c10::ScalarType t) { return t == at::kBFloat16 ? "bf16" : t == at::kHalf ? "fp16" : "fp32"; }

at::Tensor load_latents_file(const std::string& path) {
  auto file = stylealigned::io::SafetensorsFile::open(path);
  if (file.tensors().size() != 1) {
    throw Error(fmt::format("{}: expected exactly one tensor (initial latents [n, C, h, w]), found {}", path,
                            file.tensors().size()));
  }
  const auto& info = file.tensors()[0];
  auto t = file.tensor(info.name);
  if (!at::isFloatingType(t.scalar_type())) {
    throw Error(fmt::format("{}: tensor '{}' has dtype {}, expected a floating-point type", path, info.name,
                            stylealigned::io::dtype_name(info.dtype)));
  }
  return t.to(at::kFloat).clone();
}

}  // namespace

int run_generate(GenerateOptions o, bool transfer) {
  using clock = std::chrono::steady_clock;
  const auto t_process = clock::now();
  std::vector<std::string> prompts = o.prompts_file.empty() ? o.prompts : read_prompts_file(o.prompts_file);
  if (!transfer && prompts.empty()) throw UsageError("generate: give at least one --prompt or --prompts-file");
  if (transfer && prompts.empty()) throw UsageError("transfer: give at least one target --prompt");
  if (o.steps < 1) throw UsageError(fmt::format("--steps must be positive (got {})", o.steps));
  if (o.guidance && (!std::isfinite(*o.guidance) || *o.guidance < 0)) {
    throw UsageError(fmt::format("--guidance must be a non-negative number (got {})", *o.guidance));
  }
  for (auto* v : {&o.width, &o.height}) {
    // Positive here; the multiple of the model's VAE factor (8 for SD1.5 and SDXL, 4 for the toy model) is checked
    // once the model is loaded.
    if (*v && **v <= 0) {
      throw UsageError(fmt::format("--{} must be positive (got {})", v == &o.width ? "width" : "height", **v));
    }
  }
  if (o.device == "cuda" && !at::hasCUDA()) throw Error("--device cuda: this libtorch build has no CUDA support");

  // The output folder is checked before any expensive work.
  OutputSet output(o.out, o.force);

  stylealigned::GenerationRequest req;
  std::vector<std::string> full_prompts;
  for (const auto& p : prompts) full_prompts.push_back(o.style.empty() ? p : fmt::format("{}, {}", p, o.style));
  req.prompts = full_prompts;
  req.negative_prompt = o.negative_prompt;
  req.steps = o.steps;
  req.guidance_scale = o.guidance;
  req.guidance_rescale = o.guidance_rescale;
  req.width = o.width;
  req.height = o.height;
  req.seed = o.seed;
  req.eta = o.eta;
  if (!o.no_style_align) req.style_aligned = o.sa;
  if (!o.scheduler_config.empty()) req.scheduler = stylealigned::SchedulerConfig::from_file(o.scheduler_config);
  if (!o.latents_file.empty()) req.latents = load_latents_file(o.latents_file);

  stylealigned::PipelineLoadOptions lo;
  lo.device = o.device == "cuda" ? c10::Device(c10::kCUDA) : c10::Device(c10::kCPU);
  lo.dtype = parse_dtype(o.dtype);
  if (o.vae_dtype != "auto") lo.vae_dtype = parse_dtype(o.vae_dtype);
  if (lo.device.is_cpu() && (lo.dtype != at::kFloat || lo.vae_dtype.value_or(at::kFloat) != at::kFloat) &&
      !stylealigned::cpu_has_native_bf16()) {
    fmt::print(stderr, "stylealigned: note: this CPU has no native bf16/fp16 matrix units; running in fp32\n");
    lo.dtype = at::kFloat;
    lo.vae_dtype = at::kFloat;
  }
  if (stylealigned::toy::is_toy_model_folder(o.model)) {
    std::vector<std::string> words;
    for (auto& w : stylealigned::toy::vocabulary()) {
      if (w != ",") words.push_back(w);
    }
    for (size_t i = 0; i < full_prompts.size(); ++i) {
      const auto unknown = stylealigned::toy::parse_caption(full_prompts[i]).unknown_words;
      if (unknown.empty()) continue;
      stylealigned::warn(fmt::format(
          "prompt {} ('{}'): the toy model was trained only on its world's captions and has never seen '{}': it "
          "will draw something arbitrary for {}. The words it knows: {}",
          i, full_prompts[i], fmt::join(unknown, "', '"), unknown.size() == 1 ? "it" : "them", fmt::join(words, " ")));
    }
  }
  if (!o.quiet) fmt::print(stderr, "loading {} ...\n", o.model);
  auto pipe = stylealigned::Pipeline::load(o.model, lo);
  for (auto* v : {&o.width, &o.height}) {
    if (*v && **v % pipe.vae_scale_factor() != 0) {
      throw UsageError(fmt::format("--{} must be a multiple of {} (the VAE factor of {}; got {})",
                                   v == &o.width ? "width" : "height", pipe.vae_scale_factor(), o.model, **v));
    }
  }
  if (!transfer && req.style_aligned) {
    // The model's defaults, then every field the command line gave (from the options CLI11 filled).
    stylealigned::StyleAlignedOptions sa = pipe.style_aligned_defaults();
    sa.assign(o.sa, o.sa_given);
    o.sa = sa;
    req.style_aligned = sa;
  }
  const int64_t width = o.width.value_or(pipe.default_width()), height = o.height.value_or(pipe.default_height());

  if (transfer) {
    auto rgb = stylealigned::image::read_rgb(o.reference);
    stylealigned::ReferenceImage ref;
    ref.rgb = stylealigned::image::resize_rgb(rgb, width, height);
    ref.caption = o.reference_caption;
    ref.inversion_guidance = o.inversion_guidance;
    ref.offset = o.inversion_offset;
    req.reference = ref;
    if (!o.guidance) req.guidance_scale = 10.0;  // the transfer notebook's guidance
  }

  ProgressBar bar(o.steps, o.quiet);
  req.on_step = [&](const stylealigned::StepInfo& info) {
    bar.update(info.step + 1, info.seconds);
    return true;
  };
  auto result = pipe.generate(req);
  bar.finish();

  // ---- settings, written with every image
  nlohmann::ordered_json settings;
  settings["tool"] = "stylealigned";
  settings["command"] = transfer ? "transfer" : "generate";
  settings["model"] = fs::absolute(o.model).string();
  settings["family"] = std::string(stylealigned::to_string(pipe.family()));
  settings["prompts"] = transfer ? std::vector<std::string>{} : prompts;
  if (transfer) settings["target_prompts"] = prompts;
  settings["style"] = o.style;
  settings["full_prompts"] = transfer ? [&] {
    auto all = full_prompts;
    all.insert(all.begin(), o.reference_caption);
    return all;
  }() : full_prompts;
  settings["negative_prompt"] = o.negative_prompt ? nlohmann::ordered_json(*o.negative_prompt) : nullptr;
  settings["steps"] = o.steps;
  settings["guidance"] = req.guidance_scale.value_or(pipe.default_guidance());
  settings["guidance_rescale"] = o.guidance_rescale;
  settings["width"] = width;
  settings["height"] = height;
  settings["seed"] = o.seed;
  settings["latents_file"] = o.latents_file;
  settings["eta"] = o.eta;
  // The dtypes that ran (a CPU without native bf16 falls back to fp32), not only the ones asked for.
  settings["dtype"] = dtype_flag(lo.dtype);
  if (o.dtype != settings["dtype"].get<std::string>()) settings["dtype_requested"] = o.dtype;
  settings["vae_dtype"] = dtype_flag(pipe.vae_dtype());
  settings["device"] = o.device;
  settings["style_aligned"] = !o.no_style_align;
  auto& options = settings["style_aligned_options"] = nlohmann::ordered_json::object();
  for (const auto& f : o.sa.fields()) {
    std::visit([&](auto value) { options[f.name] = value; }, f.value);
  }
  settings["scheduler"] = nlohmann::ordered_json::parse(
      req.scheduler ? req.scheduler->to_json() : pipe.scheduler_config().to_json());
  if (transfer) {
    settings["reference"] = fs::absolute(o.reference).string();
    settings["reference_caption"] = o.reference_caption;
    settings["inversion_guidance"] = o.inversion_guidance;
    settings["inversion_offset"] = o.inversion_offset;
  }
  settings["seconds_denoising"] = result.seconds;

  std::vector<at::Tensor> images;
  for (int64_t i = 0; i < result.images.size(0); ++i) images.push_back(stylealigned::image::to_uint8(result.images[i]));
  const std::string settings_text = settings.dump(2);
  for (size_t i = 0; i < images.size(); ++i) {
    const std::string name = i == 0 ? "00-reference.png" : fmt::format("{:02d}.png", i);
    const std::string prompt = transfer ? (i == 0 ? o.reference_caption : full_prompts[i - 1]) : full_prompts[i];
    output.add_png(name, images[i], {{"prompt", prompt}, {"index", std::to_string(i)}, {"settings", settings_text}});
  }
  output.add_png("grid.png", stylealigned::image::make_grid(images, std::min<int64_t>(images.size(), 4)),
                 {{"settings", settings_text}});
  if (!o.save_latents.empty()) output.add_external_safetensors(o.save_latents, {{"latents", result.latents}});
  settings["seconds_total"] =
      std::chrono::duration<double>(clock::now() - t_process).count();
  output.add_text("settings.json", settings.dump(2) + "\n");
  output.commit();
  if (!o.quiet) {
    fmt::print("wrote {} images, grid.png and settings.json to {} ({:.1f} s)\n", images.size(), o.out,
               settings["seconds_total"].get<double>());
  }
  return 0;
}

}  // namespace sa_tool
