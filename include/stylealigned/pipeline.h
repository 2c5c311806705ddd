// stylealigned/pipeline.h: style-aligned image sets from a diffusers SD1.x or SDXL folder.
//
// A Pipeline loads a model folder once (model_index.json says which family) and then generates many sets. The
// first prompt of a set is its style reference; with StyleAligned on, every other image shares its style. A real
// image can be the reference instead (DDIM inversion, the official transfer notebook's procedure).
//
//   auto pipe = stylealigned::Pipeline::load("models/sdxl-base");
//   stylealigned::GenerationRequest req;
//   req.prompts = {"a toy train. macro photo", "a toy airplane. macro photo"};
//   req.style_aligned = stylealigned::StyleAlignedOptions::sdxl_demo();
//   req.seed = 1234;
//   stylealigned::GenerationResult out = pipe.generate(req);   // out.images: [n, 3, H, W] in [0, 1]
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "stylealigned/ddim.h"
#include "stylealigned/error.h"
#include "stylealigned/style_aligned.h"

namespace stylealigned {

enum class ModelFamily { sd1, sdxl };
std::string_view to_string(ModelFamily family);

struct PipelineLoadOptions {
  /// dtype of the UNet and text encoders.
  c10::ScalarType dtype = c10::kFloat;
  /// dtype of the VAE. Unset: bf16 when `dtype` is bf16, fp32 otherwise. fp16 pipelines keep an fp32 VAE because
  /// SDXL's overflows in fp16 (diffusers' force_upcast); bf16 has fp32's exponent range, so that overflow cannot
  /// happen, and diffusers runs a bf16 pipeline's VAE in bf16 as well. On CPUs with native bf16 the bf16 decode is
  /// 2.6x as fast at 512x512 (stylealigned_bench_vae reports speed and pixel error against fp32 in one run). Latents
  /// and decoded images are fp32 at the pipeline's boundary either way.
  std::optional<c10::ScalarType> vae_dtype;
  c10::Device device = c10::kCPU;
  /// Weights stored in the load dtype alias the files' mappings instead of being copied (see
  /// models::LoadOptions::map_weights). False copies every tensor.
  bool map_weights = true;
};

/// What the progress callback sees after every denoising step.
struct StepInfo {
  int64_t step = 0;   ///< 0-based
  int64_t steps = 0;  ///< total
  int64_t timestep = 0;
  double seconds = 0;  ///< wall time of this step
  const at::Tensor* latents = nullptr;  ///< latents after the step [n, C, h, w]
};
/// Return false to cancel: generate() then throws stylealigned::Cancelled.
using StepCallback = std::function<bool(const StepInfo&)>;

/// A real image as the style reference (the official transfer notebook).
struct ReferenceImage {
  at::Tensor rgb;              ///< uint8 [H, W, 3]; resized to the generation size by the caller or the tool
  std::string caption;         ///< describes the reference image; used for inversion and as prompts[0]
  double inversion_guidance = 2.0;
  /// The reference row starts from the inverted latent at this index of the reversed trajectory and is replaced
  /// by trajectory[max(offset + 1, i + 1)] after every step i.
  int64_t offset = 5;
};

struct GenerationRequest {
  /// prompts[0] is the style reference (with `reference`, prompts[0] is replaced by the reference caption).
  std::vector<std::string> prompts;
  /// Negative prompt for every image. Unset: SD1.x encodes "", SDXL uses zeros when the folder's
  /// model_index.json sets force_zeros_for_empty_prompt (diffusers' behaviour).
  std::optional<std::string> negative_prompt;
  int64_t steps = 50;
  /// Unset: 5.0 for SDXL, 7.5 for SD1.x. <= 1 runs without classifier-free guidance (one group).
  std::optional<double> guidance_scale;
  double guidance_rescale = 0.0;
  /// Unset: the UNet's sample_size times the VAE factor. Must be multiples of the VAE factor.
  std::optional<int64_t> width, height;
  uint64_t seed = 0;
  /// Explicit initial latents [n, C, h, w] instead of drawing them from `seed`.
  at::Tensor latents;
  double eta = 0.0;
  /// StyleAligned options; unset generates a vanilla set.
  std::optional<StyleAlignedOptions> style_aligned;
  /// Replaces the folder's scheduler config.
  std::optional<SchedulerConfig> scheduler;
  std::optional<ReferenceImage> reference;
  StepCallback on_step;
  /// Keep the latents after every step in the result (for parity checks and debugging).
  bool record_steps = false;
};

struct GenerationResult {
  at::Tensor initial_latents;  ///< [n, C, h, w] as the loop started (reference row replaced in transfer mode)
  at::Tensor latents;          ///< final latents before decoding
  at::Tensor decoded;          ///< raw VAE output [n, 3, H, W] (about [-1, 1], unclamped)
  at::Tensor images;           ///< (decoded / 2 + 0.5).clamp(0, 1), float [n, 3, H, W]
  std::vector<int64_t> timesteps;
  std::vector<at::Tensor> step_latents;  ///< when record_steps
  at::Tensor inversion_trajectory;       ///< transfer mode: reversed DDIM-inversion latents [steps + 1, C, h, w]
  double seconds = 0;                    ///< wall time of the denoising loop
};

/// Thrown when a StepCallback cancels generation.
class Cancelled : public Error {
 public:
  Cancelled() : Error("generation cancelled") {}
};

class Pipeline {
 public:
  /// Loads tokenizers, text encoders, UNet, VAE and scheduler config from a diffusers folder. Throws
  /// stylealigned::Error naming the missing or invalid file.
  static Pipeline load(const std::filesystem::path& folder, const PipelineLoadOptions& options = {});
  ~Pipeline();
  Pipeline(Pipeline&&) noexcept;
  Pipeline& operator=(Pipeline&&) noexcept;

  ModelFamily family() const;
  const std::filesystem::path& folder() const;
  int64_t default_width() const;
  int64_t default_height() const;
  double default_guidance() const;
  int64_t vae_scale_factor() const;
  /// The dtype the VAE runs in (PipelineLoadOptions::vae_dtype, resolved).
  c10::ScalarType vae_dtype() const;
  int64_t latent_channels() const;
  const SchedulerConfig& scheduler_config() const;
  /// The StyleAligned options a text-to-image set of this model starts from: the official SDXL demo's, with the
  /// fields the folder's model_index.json names under "_stylealigned_options" (an object of field: value, as
  /// StyleAlignedOptions::set takes them) replaced. Real SD1.5 and SDXL folders carry no such key and get the demo's
  /// options; a model trained here can ship the options measured best for it (the embedded toy model does, see its
  /// card). Load throws stylealigned::Error naming model_index.json and the field for an unknown field or a bad value.
  const StyleAlignedOptions& style_aligned_defaults() const;

  /// Generates one set. Same request (and seed) -> same bytes. Throws stylealigned::Error for invalid requests
  /// (naming the field) and stylealigned::Cancelled when the callback cancels.
  GenerationResult generate(const GenerationRequest& request);

  /// Generates several sets in one denoising loop: every UNet forward carries the rows of all sets, each set its own
  /// style groups (its own references), so a small model keeps the cores busy (the toy model's UNet, 4 sets at 2
  /// threads: 1.3x the throughput of 4 separate batches; `stylealigned demo` 14.1 -> 11.3 s). Each result equals
  /// generate() of its request up to float rounding (the batch changes how matrix products are blocked); one request
  /// gives generate()'s bytes. The requests may differ in prompts,
  /// seed, latents, negative prompt, guidance, eta, reference image and callbacks; they must agree on width, height,
  /// steps, scheduler and StyleAligned options (all unset or all the same), else stylealigned::Error names the
  /// request and the field. Every request's on_step runs after each step; any returning false cancels the batch.
  /// `seconds` of each result is the batch's wall time.
  std::vector<GenerationResult> generate_batch(const std::vector<GenerationRequest>& requests);

  /// The official DDIM inversion (STYLEALIGNED_SPEC 3.3): encode `rgb` (posterior mean, fp32), invert with the
  /// caption's conditioning and `guidance`, and return the reversed trajectory [steps + 1, C, h, w] (index 0 is the
  /// noisiest, the last is the encoded image).
  at::Tensor invert(const at::Tensor& rgb, const std::string& caption, int64_t steps, double guidance,
                    const std::optional<SchedulerConfig>& scheduler = std::nullopt);

  /// VAE encode (posterior mean * scaling_factor) of a uint8 [H, W, 3] image, in fp32.
  at::Tensor encode_image(const at::Tensor& rgb);

  /// A one-paragraph description: family, sizes, dtypes, attention layers.
  std::string describe() const;
  /// The UNet's attention layer names in processor order, and which of them are self-attention.
  std::vector<std::string> attention_layers() const;

  struct Impl;

 private:
  explicit Pipeline(std::unique_ptr<Impl> impl);
  // generate and generate_batch: the requests by pointer, so a request's callback runs as the caller's object.
  std::vector<GenerationResult> generate_sets(const std::vector<const GenerationRequest*>& requests);
  std::unique_ptr<Impl> impl_;
};

/// Initial latents exactly as diffusers draws them: one torch.randn(shape) from a CPU generator seeded with `seed`,
/// float32.
at::Tensor initial_latents(uint64_t seed, int64_t n, int64_t channels, int64_t height, int64_t width);

}  // namespace stylealigned
