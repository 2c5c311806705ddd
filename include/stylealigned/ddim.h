// stylealigned/ddim.h: diffusers-exact DDIM sampling and DDIM inversion.
//
// Configured from a diffusers `scheduler_config.json` (any scheduler class: SDXL ships an Euler config and SD1.5 a
// PNDM one; the shared keys configure DDIM and unknown keys are ignored with one warning). The schedule tables are
// computed with libtorch's float32 linspace and cumprod, in diffusers' order, so step outputs match bit for bit.
//
//   auto config = stylealigned::SchedulerConfig::from_file(model_dir / "scheduler/scheduler_config.json");
//   stylealigned::DDIMScheduler scheduler(config);
//   scheduler.set_timesteps(50);
//   for (int64_t t : scheduler.timestep_list()) latents = scheduler.step(eps, t, latents).prev_sample;
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace stylealigned {

enum class BetaSchedule { linear, scaled_linear, squaredcos_cap_v2 };
enum class TimestepSpacing { leading, trailing, linspace };
enum class PredictionType { epsilon, v_prediction, sample };

/// Every DDIM field of diffusers' scheduler config, with diffusers' defaults.
struct SchedulerConfig {
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  BetaSchedule beta_schedule = BetaSchedule::linear;
  std::vector<double> trained_betas;  ///< used instead of beta_schedule when non-empty
  bool clip_sample = true;
  double clip_sample_range = 1.0;
  bool set_alpha_to_one = true;
  int64_t steps_offset = 0;
  PredictionType prediction_type = PredictionType::epsilon;
  bool thresholding = false;
  double dynamic_thresholding_ratio = 0.995;
  double sample_max_value = 1.0;
  TimestepSpacing timestep_spacing = TimestepSpacing::leading;
  bool rescale_betas_zero_snr = false;

  /// Parses a scheduler_config.json text. `source` names the file in error messages. Unknown keys are ignored with
  /// one warning listing them (diffusers does the same); keys starting with '_' are diffusers' metadata and ignored
  /// silently. Invalid values (unknown schedule or spacing, a non-positive step count, wrong JSON types,
  /// trained_betas of the wrong length) throw stylealigned::Error naming the key and `source`. `null` for
  /// trained_betas means "not given". DDIMInverseScheduler's deprecated `set_alpha_to_zero` is read as
  /// set_alpha_to_one (with a warning), for either scheduler.
  static SchedulerConfig from_json(std::string_view json_text, std::string_view source = "scheduler config");
  static SchedulerConfig from_file(const std::filesystem::path& path);
  /// The constructor the official StyleAligned notebooks use: scaled_linear 0.00085..0.012, no clipping,
  /// set_alpha_to_one false, steps_offset 0, leading spacing.
  static SchedulerConfig style_aligned_notebooks();

  /// Throws stylealigned::Error for an invalid combination.
  void validate() const;
  std::string to_json() const;
};

struct SchedulerStepOutput {
  at::Tensor prev_sample;
  at::Tensor pred_original_sample;
};

/// Options of DDIMScheduler::step beyond the three tensors.
struct DDIMStepOptions {
  double eta = 0.0;
  bool use_clipped_model_output = false;
  /// Noise for eta > 0: drawn from `generator` (CPU) when given, else from `variance_noise`; giving both is an
  /// error, as in diffusers. With neither, libtorch's default generator is used.
  std::optional<at::Generator> generator;
  at::Tensor variance_noise;
};

/// The schedule tables shared by the forward and the inverse scheduler.
class NoiseSchedule {
 public:
  explicit NoiseSchedule(const SchedulerConfig& config);
  const SchedulerConfig& config() const { return config_; }
  const at::Tensor& betas() const { return betas_; }                    ///< [T] float32
  const at::Tensor& alphas_cumprod() const { return alphas_cumprod_; }  ///< [T] float32
  double alpha_cumprod(int64_t t) const;                                ///< throws for t outside [0, T)

 private:
  SchedulerConfig config_;
  at::Tensor betas_;
  at::Tensor alphas_cumprod_;
};

class DDIMScheduler {
 public:
  explicit DDIMScheduler(const SchedulerConfig& config);

  const SchedulerConfig& config() const { return schedule_.config(); }
  const NoiseSchedule& schedule() const { return schedule_; }
  /// ᾱ used as "previous" at the last step: 1 if set_alpha_to_one, else ᾱ[0].
  double final_alpha_cumprod() const { return final_alpha_cumprod_; }

  /// Throws stylealigned::Error for n < 1 or n > num_train_timesteps, or when a timestep would fall outside
  /// [0, T) (leading spacing with a large steps_offset). Trailing spacing always yields n timesteps: where numpy's
  /// float arange gives diffusers an extra final timestep -1 (n = 61, 103, ... for T = 1000), we drop it.
  void set_timesteps(int64_t num_inference_steps);
  int64_t num_inference_steps() const { return num_inference_steps_; }
  /// Descending int64 tensor (CPU), as diffusers' `scheduler.timesteps`.
  const at::Tensor& timesteps() const { return timesteps_; }
  const std::vector<int64_t>& timestep_list() const { return timestep_list_; }

  /// One DDIM step from timestep t (prev_t = t - T / n, diffusers' rule). Requires set_timesteps. Throws for t
  /// outside [0, T), mismatched shapes, eta < 0, or both a generator and variance_noise (even with eta = 0).
  SchedulerStepOutput step(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample,
                           const DDIMStepOptions& options = {}) const;

  /// The official StyleAligned inversion step (`inversion.py` `_next_step`): from level t - T/n to level t, with the
  /// model evaluated at t; uses ᾱ[min(t - T/n, T-1)], or final_alpha_cumprod when that is negative. The official
  /// code assumes ε-prediction; for v_prediction and sample the output is first converted to x0 and ε.
  at::Tensor inversion_step(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample) const;

  /// sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise, with one timestep per batch row (or one for all).
  at::Tensor add_noise(const at::Tensor& original, const at::Tensor& noise, const at::Tensor& timesteps) const;
  /// sqrt(ᾱ_t) noise - sqrt(1 - ᾱ_t) sample.
  at::Tensor get_velocity(const at::Tensor& sample, const at::Tensor& noise, const at::Tensor& timesteps) const;

 private:
  NoiseSchedule schedule_;
  double final_alpha_cumprod_ = 1.0;
  int64_t num_inference_steps_ = 0;
  at::Tensor timesteps_;
  std::vector<int64_t> timestep_list_;
};

/// diffusers' DDIMInverseScheduler: ascending timesteps, each step moves a sample to a noisier level.
class DDIMInverseScheduler {
 public:
  /// Only leading and trailing spacing are valid here (stylealigned::Error otherwise).
  explicit DDIMInverseScheduler(const SchedulerConfig& config);

  const SchedulerConfig& config() const { return schedule_.config(); }
  const NoiseSchedule& schedule() const { return schedule_; }
  /// ᾱ of the source level of the first step: 1 if set_alpha_to_one, else ᾱ[0].
  double initial_alpha_cumprod() const { return initial_alpha_cumprod_; }

  /// Ascending timesteps; same errors as DDIMScheduler::set_timesteps.
  void set_timesteps(int64_t num_inference_steps);
  int64_t num_inference_steps() const { return num_inference_steps_; }
  const at::Tensor& timesteps() const { return timesteps_; }
  const std::vector<int64_t>& timestep_list() const { return timestep_list_; }

  /// Moves `sample` from level min(t - T/n, T-1) (initial_alpha_cumprod when negative) to level t. Clips x0 when
  /// clip_sample is set; no thresholding, no eta (as diffusers).
  SchedulerStepOutput step(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample) const;

 private:
  NoiseSchedule schedule_;
  double initial_alpha_cumprod_ = 1.0;
  int64_t num_inference_steps_ = 0;
  at::Tensor timesteps_;
  std::vector<int64_t> timestep_list_;
};

std::string_view to_string(BetaSchedule v);
std::string_view to_string(TimestepSpacing v);
std::string_view to_string(PredictionType v);

}  // namespace stylealigned
