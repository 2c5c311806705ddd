// The SD1.x / SDXL pipelines (diffusers 0.25 semantics) with StyleAligned and reference-image transfer.
#include "stylealigned/pipeline.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "stylealigned/log.h"
#include "stylealigned/models/clip_text.h"
#include "stylealigned/models/prompt_encoding.h"
#include "stylealigned/models/tokenizer.h"
#include "stylealigned/models/unet.h"
#include "stylealigned/models/vae.h"
#include "stylealigned/runtime.h"

namespace stylealigned {

namespace fs = std::filesystem;
using models::AutoencoderKL;
using models::CLIPTextModel;
using models::ClipTokenizer;
using models::UNet2DConditionModel;

std::string_view to_string(ModelFamily family) { return family == ModelFamily::sdxl ? "sdxl" : "sd1"; }

at::Tensor initial_latents(uint64_t seed, int64_t n, int64_t channels, int64_t height, int64_t width) {
  auto gen = at::detail::createCPUGenerator(seed);
  return at::randn({n, channels, height, width}, gen, at::TensorOptions().dtype(at::kFloat));
}

// Conditioning of one CFG branch for a batch of rows.
struct TextConditioning {
  at::Tensor embeds;  // [n, 77, cross_dim]
  at::Tensor pooled;  // SDXL: [n, proj]; undefined for SD1.x
};

struct Pipeline::Impl {
  fs::path folder;
  ModelFamily family = ModelFamily::sd1;
  PipelineLoadOptions options;
  bool force_zeros_for_empty_prompt = false;
  SchedulerConfig scheduler_config;
  StyleAlignedOptions style_defaults = StyleAlignedOptions::sdxl_demo();
  std::vector<ClipTokenizer> tokenizers;
  std::vector<CLIPTextModel> text_encoders;
  UNet2DConditionModel unet{nullptr};
  AutoencoderKL vae{nullptr};
  c10::ScalarType vae_dtype = at::kFloat;

  int64_t vae_factor() const { return int64_t{1} << (vae->config().block_out_channels.size() - 1); }

  // diffusers' encode_prompt; with CFG the result is [negative n ; positive n].
  TextConditioning encode(const std::vector<std::string>& prompts, const std::optional<std::string>& negative,
                          bool cfg, bool zero_negative = false) {
    models::PromptEncodeOptions po;
    po.do_classifier_free_guidance = cfg;
    if (negative) po.negative_prompts = std::vector<std::string>{*negative};
    po.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt || zero_negative;
    auto e = family == ModelFamily::sd1
                 ? models::encode_prompt_sd(tokenizers[0], text_encoders[0], prompts, po)
                 : models::encode_prompt_sdxl(tokenizers[0], text_encoders[0], tokenizers[1], text_encoders[1],
                                              prompts, po);
    if (!cfg) return {e.prompt_embeds, e.pooled_prompt_embeds};
    TextConditioning out{at::cat({e.negative_prompt_embeds, e.prompt_embeds}), at::Tensor()};
    if (e.pooled_prompt_embeds.defined()) {
      out.pooled = at::cat({e.negative_pooled_prompt_embeds, e.pooled_prompt_embeds});
    }
    return out;
  }

  at::Tensor time_ids(int64_t rows, int64_t height, int64_t width) const {
    auto one = at::tensor({double(height), double(width), 0.0, 0.0, double(height), double(width)},
                          at::TensorOptions().dtype(options.dtype).device(options.device));
    return one.unsqueeze(0).repeat({rows, 1});
  }

  at::Tensor unet_forward(const at::Tensor& sample, int64_t t, const TextConditioning& cond, const at::Tensor& tids,
                          const BatchLayout& layout) {
    models::UNetForwardOptions fo;
    fo.layout = &layout;
    if (family == ModelFamily::sdxl) {
      fo.text_embeds = cond.pooled;
      fo.time_ids = tids;
    }
    auto timestep = at::scalar_tensor(t, at::TensorOptions().dtype(at::kLong).device(options.device));
    return unet->forward(sample.to(options.dtype), timestep, cond.embeds, fo).to(at::kFloat);
  }

  at::Tensor vae_encode(const at::Tensor& rgb) {
    if (!rgb.defined() || rgb.dim() != 3 || rgb.size(2) != 3 || rgb.scalar_type() != at::kByte) {
      throw Error("reference image: expected uint8 [height, width, 3]");
    }
    auto x = rgb.permute({2, 0, 1}).unsqueeze(0).to(at::kFloat).div(255.0).mul(2.0).sub(1.0).to(options.device);
    return vae->encode(x.to(vae_dtype)).mean.to(at::kFloat) * vae->config().scaling_factor;
  }

  // One image at a time: the decoder's full-resolution activations (128 channels at 512x512 is 134 MB per image
  // and block) dominate a set's peak memory when the whole batch decodes at once (SD1.5, 4 images at 512: 8.5 GB
  // peak RSS against 4.3 GB of weights), while a single 512x512 image already keeps the convolutions efficient. The
  // decoder treats images independently, so the pixels are the same; the decoded RGB images themselves are small.
  at::Tensor vae_decode(const at::Tensor& latents) {
    const at::Tensor scaled = latents / vae->config().scaling_factor;
    std::vector<at::Tensor> images;
    for (int64_t i = 0; i < scaled.size(0); ++i) {
      images.push_back(vae->decode(scaled.narrow(0, i, 1).to(vae_dtype)).to(at::kFloat));
    }
    return images.size() == 1 ? images[0] : at::cat(images, 0);
  }
};

namespace {

nlohmann::json read_json_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw Error(fmt::format("{}: cannot open (is this a diffusers model folder?)", path.string()));
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: invalid JSON ({})", path.string(), e.what()));
  }
}

void require_folder(const fs::path& dir, const fs::path& model) {
  if (!fs::is_directory(dir)) {
    throw Error(fmt::format("{}: missing component folder '{}'", model.string(), dir.filename().string()));
  }
}

}  // namespace

Pipeline::Pipeline(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Pipeline::~Pipeline() = default;
Pipeline::Pipeline(Pipeline&&) noexcept = default;
Pipeline& Pipeline::operator=(Pipeline&&) noexcept = default;

Pipeline Pipeline::load(const fs::path& folder, const PipelineLoadOptions& options) {
  if (!fs::is_directory(folder)) throw Error(fmt::format("{}: model folder not found", folder.string()));
  auto impl = std::make_unique<Impl>();
  impl->folder = folder;
  impl->options = options;
  auto index = read_json_file(folder / "model_index.json");
  const std::string cls = index.value("_class_name", "");
  if (cls.find("XL") != std::string::npos || index.contains("text_encoder_2")) {
    impl->family = ModelFamily::sdxl;
  } else if (cls.rfind("StableDiffusion", 0) == 0 || index.contains("text_encoder")) {
    impl->family = ModelFamily::sd1;
  } else {
    throw Error(fmt::format("{}: _class_name '{}' is not a Stable Diffusion (1.x or XL) pipeline",
                            (folder / "model_index.json").string(), cls));
  }
  if (index.contains("force_zeros_for_empty_prompt") && index["force_zeros_for_empty_prompt"].is_boolean()) {
    impl->force_zeros_for_empty_prompt = index["force_zeros_for_empty_prompt"].get<bool>();
  } else {
    impl->force_zeros_for_empty_prompt = impl->family == ModelFamily::sdxl;  // the SDXL pipeline's default
  }
  if (index.contains("_stylealigned_options")) {
    const auto& overrides = index["_stylealigned_options"];
    const std::string where = (folder / "model_index.json").string() + ": _stylealigned_options";
    if (!overrides.is_object()) throw Error(where + " must be an object of StyleAlignedOptions field: value");
    try {
      for (const auto& [field, value] : overrides.items()) {
        if (!value.is_boolean() && !value.is_number()) {
          throw Error(fmt::format("{} must be a boolean or a number, got {}", field, value.dump()));
        }
        impl->style_defaults.set(field, value.is_boolean() ? (value.get<bool>() ? "true" : "false")
                                                           : fmt::format("{:.17g}", value.get<double>()));
      }
      impl->style_defaults.validate();
    } catch (const Error& e) {
      throw Error(fmt::format("{}: {}", where, e.what()));
    }
  }
  if (options.vae_dtype && *options.vae_dtype != at::kFloat && *options.vae_dtype != at::kBFloat16 &&
      *options.vae_dtype != at::kHalf) {
    throw Error(fmt::format("vae_dtype must be float32, bfloat16 or float16, got {}", c10::toString(*options.vae_dtype)));
  }
  // fp16 pipelines decode in fp32 (SDXL's VAE overflows in fp16: force_upcast); bf16 ones in bf16 (see
  // PipelineLoadOptions::vae_dtype).
  const c10::ScalarType vae_dtype =
      options.vae_dtype.value_or(options.dtype == at::kBFloat16 ? at::kBFloat16 : at::kFloat);
  if (options.device.is_cpu()) {
    for (const auto& [name, dtype] : {std::pair<const char*, c10::ScalarType>{"dtype", options.dtype},
                                      std::pair<const char*, c10::ScalarType>{"vae_dtype", vae_dtype}}) {
      // The probe runs a convolution: only when fp16 is asked for (it would cost an fp32 load memory and time).
      if (dtype == at::kHalf && !cpu_supports_fp16_convolution()) {
        throw Error(fmt::format("{} float16 on the CPU: this libtorch has no fp16 CPU convolution; use bfloat16 or "
                                "float32 (fp16 is a GPU dtype here)",
                                name));
      }
    }
  }
  if (options.dtype != at::kFloat && options.device.is_cpu() && !cpu_has_native_bf16()) {
    warn(fmt::format("{} requested on a CPU without native bf16/fp16 matrix units: expect it to be far slower "
                     "than fp32",
                     c10::toString(options.dtype)));
  }

  require_folder(folder / "scheduler", folder);
  impl->scheduler_config = SchedulerConfig::from_file(folder / "scheduler" / "scheduler_config.json");
  // The SD1 pipeline's constructor forces steps_offset 1 (a diffusers deprecation shim); SDXL keeps the file's.
  if (impl->family == ModelFamily::sd1 && impl->scheduler_config.steps_offset != 1) {
    impl->scheduler_config.steps_offset = 1;
  }

  models::LoadOptions lo;
  lo.dtype = options.dtype;
  lo.device = options.device;
  lo.map_weights = options.map_weights;
  std::vector<std::pair<std::string, std::string>> te = {{"tokenizer", "text_encoder"}};
  if (impl->family == ModelFamily::sdxl) te.emplace_back("tokenizer_2", "text_encoder_2");
  for (const auto& [tok, enc] : te) {
    require_folder(folder / tok, folder);
    require_folder(folder / enc, folder);
    impl->tokenizers.push_back(ClipTokenizer::from_folder(folder / tok));
    impl->text_encoders.push_back(CLIPTextModel::from_pretrained(folder / enc, lo));
    impl->text_encoders.back()->eval();
  }
  require_folder(folder / "unet", folder);
  impl->unet = UNet2DConditionModel::from_pretrained(folder / "unet", lo);
  impl->unet->eval();
  require_folder(folder / "vae", folder);
  impl->vae_dtype = vae_dtype;
  models::LoadOptions vae_lo = lo;
  vae_lo.dtype = impl->vae_dtype;
  impl->vae = AutoencoderKL::from_pretrained(folder / "vae", vae_lo);
  impl->vae->eval();
  return Pipeline(std::move(impl));
}

ModelFamily Pipeline::family() const { return impl_->family; }
const fs::path& Pipeline::folder() const { return impl_->folder; }
int64_t Pipeline::vae_scale_factor() const { return impl_->vae_factor(); }
c10::ScalarType Pipeline::vae_dtype() const { return impl_->vae_dtype; }
int64_t Pipeline::latent_channels() const { return impl_->unet->config().in_channels; }
int64_t Pipeline::default_width() const {
  auto s = impl_->unet->config().sample_size;
  return (s > 0 ? s : 64) * vae_scale_factor();
}
int64_t Pipeline::default_height() const { return default_width(); }
double Pipeline::default_guidance() const { return impl_->family == ModelFamily::sdxl ? 5.0 : 7.5; }
const SchedulerConfig& Pipeline::scheduler_config() const { return impl_->scheduler_config; }
const StyleAlignedOptions& Pipeline::style_aligned_defaults() const { return impl_->style_defaults; }

std::vector<std::string> Pipeline::attention_layers() const { return impl_->unet->attention_layer_names(); }

std::string Pipeline::describe() const {
  const auto& u = impl_->unet->config();
  auto layers = attention_layers();
  return fmt::format(
      "{} ({}): UNet {} levels, channels {}, {} attention layers ({} self); VAE factor {}, {} latent channels; "
      "default {}x{}, guidance {}",
      impl_->folder.string(), to_string(impl_->family), u.levels(), fmt::join(u.block_out_channels, "/"),
      layers.size(), select_self_attention(layers).size(), vae_scale_factor(), latent_channels(), default_width(),
      default_height(), default_guidance());
}

at::Tensor Pipeline::encode_image(const at::Tensor& rgb) {
  torch::NoGradGuard no_grad;
  return impl_->vae_encode(rgb);
}

at::Tensor Pipeline::invert(const at::Tensor& rgb, const std::string& caption, int64_t steps, double guidance,
                            const std::optional<SchedulerConfig>& scheduler) {
  torch::NoGradGuard no_grad;
  auto& d = *impl_;
  if (steps < 1) throw Error(fmt::format("inversion: steps must be positive (got {})", steps));
  if (!std::isfinite(guidance) || guidance < 0) {
    throw Error(fmt::format("inversion: guidance must be a non-negative number (got {})", guidance));
  }
  DDIMScheduler sched(scheduler.value_or(d.scheduler_config));
  sched.set_timesteps(steps);
  auto z0 = d.vae_encode(rgb);
  // The official inversion conditions on [zeros ; caption] and, for SDXL, time ids (1024, 1024, 0, 0, 1024, 1024)
  // whatever the image size (inversion.py); SD1.x has no official inversion, so its unconditional branch is "".
  auto both = d.encode({caption}, std::nullopt, /*cfg=*/true, /*zero_negative=*/true);
  auto tids = d.family == ModelFamily::sdxl ? d.time_ids(2, 1024, 1024) : at::Tensor();
  auto layout = BatchLayout::independent(2);
  std::vector<at::Tensor> all{z0};
  auto latent = z0.clone();
  const auto& ts = sched.timestep_list();
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t t = ts[ts.size() - 1 - i];
    auto eps = d.unet_forward(at::cat({latent, latent}), t, both, tids, layout);
    auto chunks = eps.chunk(2);
    auto guided = chunks[0] + guidance * (chunks[1] - chunks[0]);
    latent = sched.inversion_step(guided, t, latent);
    all.push_back(latent);
  }
  return at::cat(all).flip(0);
}

namespace {

// Installs StyleAligned on the UNet for the lifetime of the guard and restores plain processors afterwards.
class StyleAlignedScope {
 public:
  StyleAlignedScope(models::UNet2DConditionModelImpl& unet, const std::optional<StyleAlignedOptions>& options)
      : unet_(unet) {
    if (options) unet_.set_norm_hook(install_style_aligned(unet_.processors(), *options));
  }
  ~StyleAlignedScope() {
    unet_.processors().reset();
    unet_.set_norm_hook(nullptr);
  }

 private:
  models::UNet2DConditionModelImpl& unet_;
};

at::Tensor rescale_noise_cfg(const at::Tensor& cfg, const at::Tensor& text, double phi) {
  std::vector<int64_t> dims;
  for (int64_t i = 1; i < text.dim(); ++i) dims.push_back(i);
  auto std_text = text.std(dims, /*unbiased=*/true, /*keepdim=*/true);
  auto std_cfg = cfg.std(dims, /*unbiased=*/true, /*keepdim=*/true);
  auto rescaled = cfg * (std_text / std_cfg);
  return phi * rescaled + (1 - phi) * cfg;
}

}  // namespace

namespace {

// One set of a batch while the shared denoising loop runs.
struct SetRun {
  const GenerationRequest* request = nullptr;
  std::vector<std::string> prompts;  // with the reference caption first in transfer mode
  int64_t n = 0;
  double guidance = 0;
  bool cfg = false;
  at::Generator gen;
  at::Tensor latents;
  at::Tensor trajectory;  // transfer mode
  int64_t offset = 0;
  TextConditioning cond;
  DDIMStepOptions step_options;
  int64_t first_row = 0;  // of this set in the batch
  GenerationResult result;

  int64_t rows() const { return cfg ? 2 * n : n; }
};

std::string request_name(size_t i, size_t count) {
  return count == 1 ? std::string("request") : fmt::format("requests[{}]", i);
}

}  // namespace

GenerationResult Pipeline::generate(const GenerationRequest& request) {
  return std::move(generate_sets({&request}).front());
}

std::vector<GenerationResult> Pipeline::generate_batch(const std::vector<GenerationRequest>& requests) {
  std::vector<const GenerationRequest*> pointers;
  for (const auto& r : requests) pointers.push_back(&r);
  return generate_sets(pointers);
}

std::vector<GenerationResult> Pipeline::generate_sets(const std::vector<const GenerationRequest*>& requests) {
  torch::NoGradGuard no_grad;
  auto& d = *impl_;
  const auto t_start = std::chrono::steady_clock::now();
  if (requests.empty()) throw Error("generate_batch: no requests");
  const size_t count = requests.size();

  // ---- what the sets share: size, schedule and attention processors
  const int64_t f = vae_scale_factor();
  const GenerationRequest& first = *requests.front();
  const int64_t width = first.width.value_or(default_width());
  const int64_t height = first.height.value_or(default_height());
  const SchedulerConfig scheduler_config = first.scheduler.value_or(d.scheduler_config);
  for (size_t k = 1; k < count; ++k) {
    const auto& r = *requests[k];
    const auto mismatch = [&](const char* field) {
      return Error(fmt::format("requests[{}]: {} differs from requests[0]'s; the sets of one batch share it (generate "
                               "them in separate batches)",
                               k, field));
    };
    if (r.width.value_or(default_width()) != width || r.height.value_or(default_height()) != height)
      throw mismatch("width x height");
    if (r.steps != first.steps) throw mismatch("steps");
    if (r.scheduler.value_or(d.scheduler_config).to_json() != scheduler_config.to_json()) throw mismatch("scheduler");
    if (r.style_aligned.has_value() != first.style_aligned.has_value() ||
        (r.style_aligned && r.style_aligned->to_string() != first.style_aligned->to_string()))
      throw mismatch("style_aligned");
  }
  if (first.steps < 1) throw Error(fmt::format("request: steps must be positive (got {})", first.steps));
  if (first.style_aligned) first.style_aligned->validate();
  if (width < f || height < f || width % f != 0 || height % f != 0) {
    throw Error(fmt::format("request: width and height must be positive multiples of {} (got {}x{})", f, width,
                            height));
  }
  const int64_t c = latent_channels(), h = height / f, w = width / f;
  DDIMScheduler sched(scheduler_config);
  sched.set_timesteps(first.steps);

  // ---- each set: validate, draw its latents, invert its reference, encode its prompts
  std::vector<SetRun> sets(count);
  int64_t rows = 0;
  for (size_t k = 0; k < count; ++k) {
    const GenerationRequest& request = *requests[k];
    const std::string name = request_name(k, count);
    SetRun& run = sets[k];
    run.request = &request;
    run.prompts = request.prompts;
    if (request.reference) run.prompts.insert(run.prompts.begin(), request.reference->caption);
    if (run.prompts.empty()) throw Error(fmt::format("{}: at least one prompt is needed", name));
    const int64_t n = run.n = static_cast<int64_t>(run.prompts.size());
    run.guidance = request.guidance_scale.value_or(default_guidance());
    if (!std::isfinite(run.guidance) || run.guidance < 0) {
      throw Error(fmt::format("{}: guidance must be a non-negative number (got {})", name, run.guidance));
    }
    if (!std::isfinite(request.guidance_rescale) || request.guidance_rescale < 0 || request.guidance_rescale > 1) {
      throw Error(fmt::format("{}: guidance rescale must be in [0, 1] (got {})", name, request.guidance_rescale));
    }
    if (!std::isfinite(request.eta) || request.eta < 0) {
      throw Error(fmt::format("{}: eta must be a non-negative number (got {})", name, request.eta));
    }

    // initial latents, from the seed exactly as diffusers draws them, or given
    run.gen = at::detail::createCPUGenerator(request.seed);
    // Tensors of a request are named by their field, prefixed by the request in a batch ("requests[1] latents").
    const std::string of = count == 1 ? std::string() : name + " ";
    const std::string latents_name = of + "latents";
    if (request.latents.defined()) {
      const auto& l = request.latents;
      if (l.dim() != 4 || l.size(0) != n || l.size(1) != c || l.size(2) != h || l.size(3) != w) {
        throw Error(fmt::format("{}: expected shape [{}, {}, {}, {}] for {} prompts at {}x{}, got [{}]", latents_name,
                                n, c, h, w, n, width, height, fmt::join(l.sizes(), ", ")));
      }
      if (!at::isFloatingType(l.scalar_type())) {
        throw Error(fmt::format("{}: expected a floating-point tensor, got {}", latents_name,
                                c10::toString(l.scalar_type())));
      }
      run.latents = l.to(at::kFloat).to(d.options.device).clone();
      if (!at::isfinite(run.latents).all().item<bool>()) throw Error(latents_name + ": contain NaN or infinite values");
    } else {
      run.latents = at::randn({n, c, h, w}, run.gen, at::TensorOptions().dtype(at::kFloat)).to(d.options.device);
    }
    run.result.timesteps = sched.timestep_list();

    // reference image: invert it, and start its row from the trajectory
    if (request.reference) {
      const auto& ref = *request.reference;
      if (ref.rgb.size(0) != height || ref.rgb.size(1) != width) {
        throw Error(fmt::format("{}reference image: is {}x{} but the generation size is {}x{} (resize it first)", of,
                                ref.rgb.size(1), ref.rgb.size(0), width, height));
      }
      run.offset = ref.offset;
      if (run.offset < 0 || run.offset >= request.steps) {
        throw Error(fmt::format("{}reference image: inversion offset must be in [0, {}) (got {})", of, request.steps,
                                run.offset));
      }
      run.trajectory = invert(ref.rgb, ref.caption, request.steps, ref.inversion_guidance, request.scheduler);
      run.latents[0].copy_(run.trajectory[run.offset]);
      run.result.inversion_trajectory = run.trajectory;
    }
    run.result.initial_latents = run.latents.clone();

    // conditioning: [uncond n ; cond n] with CFG, [cond n] without
    run.cfg = run.guidance > 1.0;
    run.cond = d.encode(run.prompts, request.negative_prompt, run.cfg);
    run.step_options.eta = request.eta;
    if (request.eta > 0) run.step_options.generator = run.gen;  // diffusers continues the latents' generator
    run.first_row = rows;
    rows += run.rows();
  }

  // ---- the batch: the sets' rows one after another, each set its own style groups
  const auto join = [](const std::vector<at::Tensor>& parts) { return parts.size() == 1 ? parts[0] : at::cat(parts); };
  std::vector<CfgGroup> groups;
  std::vector<at::Tensor> embeds, pooled;
  for (const auto& run : sets) {
    const int64_t r = run.first_row;
    if (run.cfg) {
      groups.push_back({r, r + run.n, r});
      groups.push_back({r + run.n, r + 2 * run.n, r + run.n});
    } else {
      groups.push_back({r, r + run.n, r});
    }
    embeds.push_back(run.cond.embeds);
    if (run.cond.pooled.defined()) pooled.push_back(run.cond.pooled);
  }
  const BatchLayout layout(std::move(groups));
  const TextConditioning cond{join(embeds), pooled.empty() ? at::Tensor() : join(pooled)};
  for (auto& run : sets) run.cond = {};  // the batch's copy is the one kept
  auto tids = d.family == ModelFamily::sdxl ? d.time_ids(rows, height, width) : at::Tensor();

  StyleAlignedScope scope(*d.unet, first.style_aligned);
  const auto& ts = sched.timestep_list();
  std::vector<at::Tensor> inputs;
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t t = ts[i];
    inputs.clear();
    for (const auto& run : sets) {
      inputs.push_back(run.latents);
      if (run.cfg) inputs.push_back(run.latents);
    }
    auto eps_all = d.unet_forward(join(inputs), t, cond, tids, layout);
    bool cancel = false;
    for (auto& run : sets) {
      const GenerationRequest& request = *run.request;
      auto eps = eps_all.narrow(0, run.first_row, run.rows());
      if (run.cfg) {
        auto parts = eps.chunk(2);
        eps = parts[0] + run.guidance * (parts[1] - parts[0]);
        if (request.guidance_rescale > 0) eps = rescale_noise_cfg(eps, parts[1], request.guidance_rescale);
      }
      run.latents = sched.step(eps, t, run.latents, run.step_options).prev_sample;
      if (run.trajectory.defined()) {
        // The official transfer callback: the reference row follows the inverted trajectory.
        const int64_t idx = std::max<int64_t>(run.offset + 1, static_cast<int64_t>(i) + 1);
        run.latents[0].copy_(run.trajectory[std::min<int64_t>(idx, run.trajectory.size(0) - 1)]);
      }
      if (request.record_steps) run.result.step_latents.push_back(run.latents.clone());
      if (request.on_step) {
        StepInfo info{static_cast<int64_t>(i), static_cast<int64_t>(ts.size()), t,
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), &run.latents};
        if (!request.on_step(info)) cancel = true;
      }
    }
    if (cancel) throw Cancelled();
  }
  std::vector<GenerationResult> out;
  out.reserve(count);
  for (auto& run : sets) {
    run.result.latents = run.latents;
    run.result.decoded = d.vae_decode(run.latents);
    run.result.images = (run.result.decoded / 2 + 0.5).clamp(0, 1);
    out.push_back(std::move(run.result));
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  for (auto& r : out) r.seconds = seconds;
  return out;
}

}  // namespace stylealigned
