// DDIM sampling and inversion with diffusers' exact arithmetic.
//
// Parity note: every scalar of a step (ᾱ_t, 1 - ᾱ_t, their square roots, the variance) is kept as a 0-dim float32
// tensor and combined with the samples by the same libtorch ops, in the same order and with the same operand order,
// as diffusers' Python code. That makes our step outputs bit-identical to diffusers on the same libtorch build,
// which the 1e-6 acceptance bound needs (one float32 ulp of a value above 16 is already larger than 1e-6).
#include "stylealigned/ddim.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "stylealigned/error.h"
#include "stylealigned/log.h"

namespace stylealigned {
namespace {

using Json = nlohmann::json;

// --- enum names -------------------------------------------------------------------------------------------------

template <typename Enum, size_t N>
std::string joined_names(const std::pair<std::string_view, Enum> (&table)[N]) {
  std::string out;
  for (size_t i = 0; i < N; ++i) {
    if (i) out += ", ";
    out += fmt::format("\"{}\"", table[i].first);
  }
  return out;
}

constexpr std::pair<std::string_view, BetaSchedule> kBetaSchedules[] = {
    {"linear", BetaSchedule::linear},
    {"scaled_linear", BetaSchedule::scaled_linear},
    {"squaredcos_cap_v2", BetaSchedule::squaredcos_cap_v2},
};
constexpr std::pair<std::string_view, TimestepSpacing> kSpacings[] = {
    {"leading", TimestepSpacing::leading},
    {"trailing", TimestepSpacing::trailing},
    {"linspace", TimestepSpacing::linspace},
};
constexpr std::pair<std::string_view, PredictionType> kPredictionTypes[] = {
    {"epsilon", PredictionType::epsilon},
    {"v_prediction", PredictionType::v_prediction},
    {"sample", PredictionType::sample},
};

template <typename Enum, size_t N>
std::string_view name_of(const std::pair<std::string_view, Enum> (&table)[N], Enum value) {
  for (const auto& entry : table) {
    if (entry.second == value) return entry.first;
  }
  return "?";
}

// --- JSON field readers (each error names the source and the key) ------------------------------------------------

[[noreturn]] void bad_type(std::string_view source, const std::string& key, std::string_view expected,
                           const Json& value) {
  throw Error(fmt::format("{}: \"{}\" must be {}, got {} ({})", source, key, expected, value.type_name(),
                          value.dump()));
}

double read_number(std::string_view source, const std::string& key, const Json& value) {
  if (!value.is_number()) bad_type(source, key, "a number", value);
  return value.get<double>();
}

int64_t read_integer(std::string_view source, const std::string& key, const Json& value) {
  if (!value.is_number_integer()) bad_type(source, key, "an integer", value);
  if (value.is_number_unsigned() && value.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
    throw Error(fmt::format("{}: \"{}\" is too large ({})", source, key, value.dump()));
  }
  return value.get<int64_t>();
}

bool read_bool(std::string_view source, const std::string& key, const Json& value) {
  if (!value.is_boolean()) bad_type(source, key, "true or false", value);
  return value.get<bool>();
}

template <typename Enum, size_t N>
Enum read_enum(std::string_view source, const std::string& key, const Json& value,
               const std::pair<std::string_view, Enum> (&table)[N]) {
  if (!value.is_string()) bad_type(source, key, "a string", value);
  const auto text = value.get<std::string>();
  for (const auto& entry : table) {
    if (entry.first == text) return entry.second;
  }
  throw Error(fmt::format("{}: \"{}\" has the unknown value \"{}\" (DDIM supports {})", source, key, text,
                          joined_names(table)));
}

// --- schedule tables ---------------------------------------------------------------------------------------------

// The Glide cosine schedule (diffusers' betas_for_alpha_bar, cosine transform, max_beta 0.999). diffusers computes
// it in Python floats (double) and converts to float32 at the end; so do we.
at::Tensor cosine_betas(int64_t num_train_timesteps) {
  constexpr double kMaxBeta = 0.999;
  const double pi = std::acos(-1.0);
  auto alpha_bar = [pi](double t) {
    const double c = std::cos((t + 0.008) / 1.008 * pi / 2);
    return c * c;
  };
  std::vector<double> betas(static_cast<size_t>(num_train_timesteps));
  const auto n = static_cast<double>(num_train_timesteps);
  for (int64_t i = 0; i < num_train_timesteps; ++i) {
    const double t1 = static_cast<double>(i) / n;
    const double t2 = static_cast<double>(i + 1) / n;
    betas[static_cast<size_t>(i)] = std::min(1.0 - alpha_bar(t2) / alpha_bar(t1), kMaxBeta);
  }
  return at::tensor(betas, at::kDouble).to(at::kFloat);
}

// Zero terminal SNR (arXiv 2305.08891, Algorithm 1), with diffusers' float32 tensor ops.
at::Tensor rescale_zero_terminal_snr(const at::Tensor& betas) {
  auto alphas = 1.0 - betas;
  auto alphas_bar_sqrt = at::cumprod(alphas, 0).sqrt();
  auto first = alphas_bar_sqrt[0].clone();
  auto last = alphas_bar_sqrt[-1].clone();
  alphas_bar_sqrt -= last;
  alphas_bar_sqrt *= first / (first - last);
  auto alphas_bar = alphas_bar_sqrt.pow(2);
  const int64_t n = alphas_bar.size(0);
  auto ratios = alphas_bar.slice(0, 1) / alphas_bar.slice(0, 0, n - 1);
  return 1 - at::cat({alphas_bar.slice(0, 0, 1), ratios});
}

// Python's float ** 0.5 calls libm pow, not sqrt; the linspace ends must be the same doubles.
double python_sqrt(double x) { return std::pow(x, 0.5); }

// numpy's float arange(start, stop, step): length ceil((stop - start) / step), element 1 = start + step, the rest
// start + i * (element 1 - start).
std::vector<double> numpy_arange(double start, double stop, double step) {
  const double span = (stop - start) / step;
  if (!(span > 0)) return {};
  const auto length = static_cast<int64_t>(std::ceil(span));
  std::vector<double> out(static_cast<size_t>(length));
  out[0] = start;
  if (length > 1) out[1] = start + step;
  const double delta = (length > 1) ? out[1] - start : 0.0;
  for (int64_t i = 2; i < length; ++i) out[static_cast<size_t>(i)] = start + static_cast<double>(i) * delta;
  return out;
}

// numpy's round (half to even) then astype(int64).
int64_t round_half_even(double x) { return static_cast<int64_t>(std::nearbyint(x)); }

// diffusers' trailing spacing, descending: round(arange(T, 0, -T/n)) - 1. For some n (61, 103, ... with T = 1000)
// numpy's arange yields n + 1 elements whose last one rounds to -1; diffusers then schedules a step at t = -1 (which
// indexes ᾱ[-1] in Python). We keep the first n, which are exactly diffusers' other timesteps.
std::vector<int64_t> trailing_descending(int64_t num_train_timesteps, int64_t n) {
  const auto T = static_cast<double>(num_train_timesteps);
  const auto values = numpy_arange(T, 0.0, -(T / static_cast<double>(n)));
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(n));
  for (size_t i = 0; i < values.size() && static_cast<int64_t>(out.size()) < n; ++i) {
    out.push_back(round_half_even(values[i]) - 1);
  }
  return out;
}

at::Tensor to_timestep_tensor(const std::vector<int64_t>& list) {
  return at::tensor(at::ArrayRef<int64_t>(list), at::kLong);
}

void check_num_inference_steps(const SchedulerConfig& config, int64_t n) {
  if (n < 1 || n > config.num_train_timesteps) {
    throw Error(fmt::format("set_timesteps: num_inference_steps must be in [1, {}] (num_train_timesteps), got {}",
                            config.num_train_timesteps, n));
  }
}

void check_schedule(const std::vector<int64_t>& list, const SchedulerConfig& config, int64_t n) {
  for (int64_t t : list) {
    if (t < 0 || t >= config.num_train_timesteps) {
      throw Error(fmt::format(
          "set_timesteps({}): timestep {} falls outside [0, {}] with timestep_spacing \"{}\" and steps_offset {}", n,
          t, config.num_train_timesteps - 1, to_string(config.timestep_spacing), config.steps_offset));
    }
  }
}

// --- step helpers ------------------------------------------------------------------------------------------------

at::Tensor scalar_f32(double v) { return at::scalar_tensor(v, at::TensorOptions().dtype(at::kFloat)); }

void check_pair(std::string_view what, const at::Tensor& model_output, const at::Tensor& sample) {
  if (!model_output.defined() || !sample.defined()) {
    throw Error(fmt::format("{}: model_output and sample must be defined tensors", what));
  }
  if (model_output.sizes() != sample.sizes()) {
    throw Error(fmt::format("{}: model_output shape {} differs from sample shape {}", what,
                            fmt::join(model_output.sizes(), "x"), fmt::join(sample.sizes(), "x")));
  }
}

struct Prediction {
  at::Tensor original;  // x0
  at::Tensor epsilon;
};

// x0 and ε from the model output, in diffusers' expression order.
Prediction predict(PredictionType type, const at::Tensor& model_output, const at::Tensor& sample,
                   const at::Tensor& alpha_prod_t, const at::Tensor& beta_prod_t) {
  switch (type) {
    case PredictionType::epsilon:
      return {(sample - beta_prod_t.pow(0.5) * model_output) / alpha_prod_t.pow(0.5), model_output};
    case PredictionType::sample:
      return {model_output, (sample - alpha_prod_t.pow(0.5) * model_output) / beta_prod_t.pow(0.5)};
    case PredictionType::v_prediction:
      return {alpha_prod_t.pow(0.5) * sample - beta_prod_t.pow(0.5) * model_output,
              alpha_prod_t.pow(0.5) * model_output + beta_prod_t.pow(0.5) * sample};
  }
  throw Error("unknown prediction_type");
}

// Dynamic thresholding (Imagen): per sample, s = quantile(|x0|, ratio) clamped to [1, sample_max_value];
// x0 = clamp(x0, -s, s) / s.
at::Tensor dynamic_threshold(const at::Tensor& x0, const SchedulerConfig& config) {
  const auto dtype = x0.scalar_type();
  auto x = (dtype == at::kFloat || dtype == at::kDouble) ? x0 : x0.to(at::kFloat);
  const auto shape = x.sizes().vec();
  auto flat = x.reshape({shape.empty() ? 1 : shape[0], -1});
  auto s = at::quantile(flat.abs(), config.dynamic_thresholding_ratio, 1);
  s = at::clamp(s, 1, config.sample_max_value).unsqueeze(1);
  flat = at::clamp(flat, -s, s) / s;
  return flat.reshape(shape).to(dtype);
}

at::Tensor clip_or_threshold(const at::Tensor& x0, const SchedulerConfig& config, bool allow_thresholding) {
  if (allow_thresholding && config.thresholding) return dynamic_threshold(x0, config);
  if (config.clip_sample) return x0.clamp(-config.clip_sample_range, config.clip_sample_range);
  return x0;
}

// ᾱ[timesteps] broadcast over `like` (one timestep per batch row, or one for all), as diffusers' add_noise does:
// the table is first cast to the sample's dtype and device.
std::pair<at::Tensor, at::Tensor> noise_coefficients(const NoiseSchedule& schedule, const at::Tensor& like,
                                                     const at::Tensor& timesteps, std::string_view what) {
  if (!timesteps.defined()) throw Error(fmt::format("{}: timesteps must be a defined tensor", what));
  if (at::isFloatingType(timesteps.scalar_type()) || timesteps.scalar_type() == at::kBool) {
    throw Error(fmt::format("{}: timesteps must be an integer tensor, got {}", what,
                            c10::toString(timesteps.scalar_type())));
  }
  if (timesteps.numel() != 1 && (like.dim() == 0 || timesteps.numel() != like.size(0))) {
    throw Error(fmt::format("{}: expected one timestep or one per batch row ({}), got {}", what,
                            like.dim() == 0 ? 1 : like.size(0), timesteps.numel()));
  }
  const int64_t T = schedule.config().num_train_timesteps;
  if (timesteps.numel() > 0) {
    auto cpu = timesteps.to(at::kCPU, at::kLong);
    const int64_t lo = cpu.min().item<int64_t>();
    const int64_t hi = cpu.max().item<int64_t>();
    if (lo < 0 || hi >= T) {
      throw Error(fmt::format("{}: timestep {} is outside [0, {}]", what, lo < 0 ? lo : hi, T - 1));
    }
  }
  auto table = schedule.alphas_cumprod().to(like.device(), like.scalar_type());
  auto index = timesteps.to(like.device(), at::kLong);
  auto alpha = table.index({index});
  auto sqrt_alpha = alpha.pow(0.5).flatten();
  auto sqrt_one_minus = (1 - alpha).pow(0.5).flatten();
  while (sqrt_alpha.dim() < like.dim()) sqrt_alpha = sqrt_alpha.unsqueeze(-1);
  while (sqrt_one_minus.dim() < like.dim()) sqrt_one_minus = sqrt_one_minus.unsqueeze(-1);
  return {sqrt_alpha, sqrt_one_minus};
}

}  // namespace

// --- names -------------------------------------------------------------------------------------------------------

std::string_view to_string(BetaSchedule v) { return name_of(kBetaSchedules, v); }
std::string_view to_string(TimestepSpacing v) { return name_of(kSpacings, v); }
std::string_view to_string(PredictionType v) { return name_of(kPredictionTypes, v); }

// --- SchedulerConfig ---------------------------------------------------------------------------------------------

SchedulerConfig SchedulerConfig::from_json(std::string_view json_text, std::string_view source) {
  Json root;
  try {
    root = Json::parse(json_text.begin(), json_text.end());
  } catch (const Json::parse_error& e) {
    throw Error(fmt::format("{}: not valid JSON: {}", source, e.what()));
  }
  if (!root.is_object()) throw Error(fmt::format("{}: a scheduler config must be a JSON object", source));

  SchedulerConfig c;
  std::vector<std::string> unknown;
  std::optional<bool> set_alpha_to_zero;
  for (const auto& [key, value] : root.items()) {
    if (key == "num_train_timesteps") {
      c.num_train_timesteps = read_integer(source, key, value);
    } else if (key == "beta_start") {
      c.beta_start = read_number(source, key, value);
    } else if (key == "beta_end") {
      c.beta_end = read_number(source, key, value);
    } else if (key == "beta_schedule") {
      c.beta_schedule = read_enum(source, key, value, kBetaSchedules);
    } else if (key == "trained_betas") {
      if (value.is_null()) continue;  // diffusers writes null for "not given"
      if (!value.is_array()) bad_type(source, key, "null or an array of numbers", value);
      c.trained_betas.clear();
      for (const auto& beta : value) c.trained_betas.push_back(read_number(source, key + "[]", beta));
      if (c.trained_betas.empty()) throw Error(fmt::format("{}: \"trained_betas\" is an empty array", source));
    } else if (key == "clip_sample") {
      c.clip_sample = read_bool(source, key, value);
    } else if (key == "clip_sample_range") {
      c.clip_sample_range = read_number(source, key, value);
    } else if (key == "set_alpha_to_one") {
      c.set_alpha_to_one = read_bool(source, key, value);
    } else if (key == "set_alpha_to_zero") {
      // DDIMInverseScheduler's deprecated spelling of set_alpha_to_one (same meaning despite the name); null means
      // not given.
      if (!value.is_null()) set_alpha_to_zero = read_bool(source, key, value);
    } else if (key == "steps_offset") {
      c.steps_offset = read_integer(source, key, value);
    } else if (key == "prediction_type") {
      c.prediction_type = read_enum(source, key, value, kPredictionTypes);
    } else if (key == "thresholding") {
      c.thresholding = read_bool(source, key, value);
    } else if (key == "dynamic_thresholding_ratio") {
      c.dynamic_thresholding_ratio = read_number(source, key, value);
    } else if (key == "sample_max_value") {
      c.sample_max_value = read_number(source, key, value);
    } else if (key == "timestep_spacing") {
      c.timestep_spacing = read_enum(source, key, value, kSpacings);
    } else if (key == "rescale_betas_zero_snr") {
      c.rescale_betas_zero_snr = read_bool(source, key, value);
    } else if (!key.empty() && key[0] == '_') {
      // metadata written by diffusers (_class_name, _diffusers_version, _use_default_values): not configuration
    } else {
      unknown.push_back(key);
    }
  }
  if (set_alpha_to_zero) {
    warn(fmt::format("{}: \"set_alpha_to_zero\" is deprecated; read as set_alpha_to_one = {}", source,
                     *set_alpha_to_zero));
    c.set_alpha_to_one = *set_alpha_to_zero;
  }
  if (!unknown.empty()) {
    warn(fmt::format("{}: ignoring keys that DDIM does not use: {}", source, fmt::join(unknown, ", ")));
  }
  try {
    c.validate();
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", source, e.what()));
  }
  return c;
}

SchedulerConfig SchedulerConfig::from_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(fmt::format("{}: cannot open the scheduler config", path.string()));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw Error(fmt::format("{}: cannot read the scheduler config", path.string()));
  return from_json(text.str(), path.string());
}

SchedulerConfig SchedulerConfig::style_aligned_notebooks() {
  SchedulerConfig c;
  c.beta_start = 0.00085;
  c.beta_end = 0.012;
  c.beta_schedule = BetaSchedule::scaled_linear;
  c.clip_sample = false;
  c.set_alpha_to_one = false;
  c.steps_offset = 0;
  c.timestep_spacing = TimestepSpacing::leading;
  return c;
}

void SchedulerConfig::validate() const {
  if (num_train_timesteps < 1) {
    throw Error(fmt::format("\"num_train_timesteps\" must be at least 1, got {}", num_train_timesteps));
  }
  if (!trained_betas.empty()) {
    if (static_cast<int64_t>(trained_betas.size()) != num_train_timesteps) {
      throw Error(fmt::format("\"trained_betas\" has {} values but \"num_train_timesteps\" is {}",
                              trained_betas.size(), num_train_timesteps));
    }
    for (size_t i = 0; i < trained_betas.size(); ++i) {
      if (!(trained_betas[i] >= 0.0 && trained_betas[i] <= 1.0)) {
        throw Error(fmt::format("\"trained_betas\"[{}] = {} is outside [0, 1]", i, trained_betas[i]));
      }
    }
  } else if (beta_schedule != BetaSchedule::squaredcos_cap_v2) {
    for (auto [name, v] : {std::pair<const char*, double>{"beta_start", beta_start}, {"beta_end", beta_end}}) {
      if (!(v >= 0.0 && v <= 1.0)) throw Error(fmt::format("\"{}\" must be in [0, 1], got {}", name, v));
    }
  }
  if (rescale_betas_zero_snr && num_train_timesteps < 2) {
    throw Error("\"rescale_betas_zero_snr\" needs \"num_train_timesteps\" of at least 2");
  }
  if (steps_offset < 0 || steps_offset >= num_train_timesteps) {
    throw Error(fmt::format("\"steps_offset\" must be in [0, {}], got {}", num_train_timesteps - 1, steps_offset));
  }
  if (!(clip_sample_range > 0.0) || !std::isfinite(clip_sample_range)) {
    throw Error(fmt::format("\"clip_sample_range\" must be a positive number, got {}", clip_sample_range));
  }
  if (!(dynamic_thresholding_ratio > 0.0 && dynamic_thresholding_ratio <= 1.0)) {
    throw Error(fmt::format("\"dynamic_thresholding_ratio\" must be in (0, 1], got {}", dynamic_thresholding_ratio));
  }
  if (!(sample_max_value > 0.0) || !std::isfinite(sample_max_value)) {
    throw Error(fmt::format("\"sample_max_value\" must be a positive number, got {}", sample_max_value));
  }
}

std::string SchedulerConfig::to_json() const {
  nlohmann::ordered_json j;
  j["_class_name"] = "DDIMScheduler";
  j["num_train_timesteps"] = num_train_timesteps;
  j["beta_start"] = beta_start;
  j["beta_end"] = beta_end;
  j["beta_schedule"] = std::string(to_string(beta_schedule));
  j["trained_betas"] = trained_betas.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(trained_betas);
  j["clip_sample"] = clip_sample;
  j["clip_sample_range"] = clip_sample_range;
  j["set_alpha_to_one"] = set_alpha_to_one;
  j["steps_offset"] = steps_offset;
  j["prediction_type"] = std::string(to_string(prediction_type));
  j["thresholding"] = thresholding;
  j["dynamic_thresholding_ratio"] = dynamic_thresholding_ratio;
  j["sample_max_value"] = sample_max_value;
  j["timestep_spacing"] = std::string(to_string(timestep_spacing));
  j["rescale_betas_zero_snr"] = rescale_betas_zero_snr;
  return j.dump(2);
}

// --- NoiseSchedule -----------------------------------------------------------------------------------------------

NoiseSchedule::NoiseSchedule(const SchedulerConfig& config) : config_(config) {
  config_.validate();
  const int64_t T = config_.num_train_timesteps;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (!config_.trained_betas.empty()) {
    betas_ = at::tensor(config_.trained_betas, at::kDouble).to(at::kFloat);
  } else {
    switch (config_.beta_schedule) {
      case BetaSchedule::linear:
        betas_ = at::linspace(config_.beta_start, config_.beta_end, T, f32);
        break;
      case BetaSchedule::scaled_linear:
        betas_ = at::linspace(python_sqrt(config_.beta_start), python_sqrt(config_.beta_end), T, f32).pow(2);
        break;
      case BetaSchedule::squaredcos_cap_v2:
        betas_ = cosine_betas(T);
        break;
    }
  }
  if (config_.rescale_betas_zero_snr) betas_ = rescale_zero_terminal_snr(betas_);
  // float32 α, then libtorch's cumprod (its CPU kernel accumulates float32 in double): diffusers' exact table.
  alphas_cumprod_ = at::cumprod(1.0 - betas_, 0);
}

double NoiseSchedule::alpha_cumprod(int64_t t) const {
  if (t < 0 || t >= config_.num_train_timesteps) {
    throw Error(fmt::format("timestep {} is outside [0, {}]", t, config_.num_train_timesteps - 1));
  }
  return alphas_cumprod_[t].item<double>();
}

// --- DDIMScheduler -----------------------------------------------------------------------------------------------

DDIMScheduler::DDIMScheduler(const SchedulerConfig& config) : schedule_(config) {
  final_alpha_cumprod_ = config.set_alpha_to_one ? 1.0 : schedule_.alpha_cumprod(0);
  timesteps_ = at::arange(config.num_train_timesteps - 1, -1, -1, at::kLong);
}

void DDIMScheduler::set_timesteps(int64_t n) {
  const auto& c = config();
  check_num_inference_steps(c, n);
  const int64_t T = c.num_train_timesteps;
  std::vector<int64_t> list;
  list.reserve(static_cast<size_t>(n));
  switch (c.timestep_spacing) {
    case TimestepSpacing::leading:
      for (int64_t i = n - 1; i >= 0; --i) list.push_back(i * (T / n) + c.steps_offset);
      break;
    case TimestepSpacing::trailing:
      list = trailing_descending(T, n);
      break;
    case TimestepSpacing::linspace: {
      // numpy linspace(0, T - 1, n): i * step with the last element exactly T - 1; n = 1 gives [0].
      const double step = n > 1 ? static_cast<double>(T - 1) / static_cast<double>(n - 1) : 0.0;
      for (int64_t i = n - 1; i >= 0; --i) {
        const double v = (n > 1 && i == n - 1) ? static_cast<double>(T - 1) : static_cast<double>(i) * step;
        list.push_back(round_half_even(v));
      }
      break;
    }
  }
  check_schedule(list, c, n);
  num_inference_steps_ = n;
  timestep_list_ = std::move(list);
  timesteps_ = to_timestep_tensor(timestep_list_);
}

SchedulerStepOutput DDIMScheduler::step(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample,
                                        const DDIMStepOptions& options) const {
  if (num_inference_steps_ == 0) throw Error("DDIMScheduler::step: call set_timesteps first");
  check_pair("DDIMScheduler::step", model_output, sample);
  const auto& c = config();
  const int64_t T = c.num_train_timesteps;
  if (timestep < 0 || timestep >= T) {
    throw Error(fmt::format("DDIMScheduler::step: timestep {} is outside [0, {}]", timestep, T - 1));
  }
  if (!std::isfinite(options.eta) || options.eta < 0) {
    throw Error(fmt::format("DDIMScheduler::step: eta must be a finite number >= 0, got {}", options.eta));
  }
  if (options.generator.has_value() && options.variance_noise.defined()) {
    throw Error("DDIMScheduler::step: pass either a generator or variance_noise, not both");
  }
  if (options.variance_noise.defined() && options.variance_noise.sizes() != model_output.sizes()) {
    throw Error(fmt::format("DDIMScheduler::step: variance_noise shape {} differs from model_output shape {}",
                            fmt::join(options.variance_noise.sizes(), "x"), fmt::join(model_output.sizes(), "x")));
  }

  // 1. previous level: always the leading stride T // n (diffusers), whatever the spacing.
  const int64_t prev_timestep = timestep - T / num_inference_steps_;
  // 2. ᾱ as 0-dim float32 tensors, like diffusers' table lookups.
  const auto& table = schedule_.alphas_cumprod();
  const at::Tensor alpha_prod_t = table[timestep];
  const at::Tensor alpha_prod_t_prev = prev_timestep >= 0 ? table[prev_timestep] : scalar_f32(final_alpha_cumprod_);
  const at::Tensor beta_prod_t = 1 - alpha_prod_t;
  // 3. x0 and ε.
  auto [pred_original_sample, pred_epsilon] =
      predict(c.prediction_type, model_output, sample, alpha_prod_t, beta_prod_t);
  // 4. thresholding or clipping of x0.
  pred_original_sample = clip_or_threshold(pred_original_sample, c, /*allow_thresholding=*/true);
  // 5. σ_t = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_prev)).
  const at::Tensor beta_prod_t_prev = 1 - alpha_prod_t_prev;
  const at::Tensor variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev);
  const at::Tensor std_dev_t = variance.pow(0.5) * options.eta;
  // 6. ε consistent with the clipped x0, when asked.
  if (options.use_clipped_model_output) {
    pred_epsilon = (sample - alpha_prod_t.pow(0.5) * pred_original_sample) / beta_prod_t.pow(0.5);
  }
  // 7. x_prev = sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev - σ²) ε (+ σ z).
  const at::Tensor pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t.pow(2)).pow(0.5) * pred_epsilon;
  at::Tensor prev_sample = alpha_prod_t_prev.pow(0.5) * pred_original_sample + pred_sample_direction;
  if (options.eta > 0) {
    at::Tensor noise = options.variance_noise;
    if (!noise.defined()) {
      const auto opts = model_output.options();
      if (options.generator.has_value()) {
        // diffusers' randn_tensor: draw on the generator's device, then move.
        noise = at::randn(model_output.sizes(), *options.generator, opts.device(options.generator->device()))
                    .to(model_output.device());
      } else {
        noise = at::randn(model_output.sizes(), opts);
      }
    }
    prev_sample = prev_sample + std_dev_t * noise;
  }
  return {prev_sample, pred_original_sample};
}

at::Tensor DDIMScheduler::inversion_step(const at::Tensor& model_output, int64_t timestep,
                                         const at::Tensor& sample) const {
  if (num_inference_steps_ == 0) throw Error("DDIMScheduler::inversion_step: call set_timesteps first");
  check_pair("DDIMScheduler::inversion_step", model_output, sample);
  const auto& c = config();
  const int64_t T = c.num_train_timesteps;
  if (timestep < 0 || timestep >= T) {
    throw Error(fmt::format("DDIMScheduler::inversion_step: timestep {} is outside [0, {}]", timestep, T - 1));
  }
  // inversion.py: cur = min(t - T // n, 999) (999 is T - 1 of every model it targets), next = t.
  const int64_t current = std::min(timestep - T / num_inference_steps_, T - 1);
  const auto& table = schedule_.alphas_cumprod();
  const at::Tensor alpha_prod_t = current >= 0 ? table[current] : scalar_f32(final_alpha_cumprod_);
  const at::Tensor alpha_prod_t_next = table[timestep];
  const at::Tensor beta_prod_t = 1 - alpha_prod_t;
  if (c.prediction_type == PredictionType::epsilon) {
    // the official expression, op for op
    const at::Tensor next_original_sample = (sample - beta_prod_t.pow(0.5) * model_output) / alpha_prod_t.pow(0.5);
    const at::Tensor next_sample_direction = (1 - alpha_prod_t_next).pow(0.5) * model_output;
    return alpha_prod_t_next.pow(0.5) * next_original_sample + next_sample_direction;
  }
  // inversion.py assumes ε-prediction; for the other types we convert the output to x0 and ε first.
  const auto pred = predict(c.prediction_type, model_output, sample, alpha_prod_t, beta_prod_t);
  return alpha_prod_t_next.pow(0.5) * pred.original + (1 - alpha_prod_t_next).pow(0.5) * pred.epsilon;
}

at::Tensor DDIMScheduler::add_noise(const at::Tensor& original, const at::Tensor& noise,
                                    const at::Tensor& timesteps) const {
  if (!original.defined() || !noise.defined() || original.sizes() != noise.sizes()) {
    throw Error("DDIMScheduler::add_noise: original and noise must be defined tensors of the same shape");
  }
  auto [sqrt_alpha, sqrt_one_minus] = noise_coefficients(schedule_, original, timesteps, "DDIMScheduler::add_noise");
  return sqrt_alpha * original + sqrt_one_minus * noise;
}

at::Tensor DDIMScheduler::get_velocity(const at::Tensor& sample, const at::Tensor& noise,
                                       const at::Tensor& timesteps) const {
  if (!sample.defined() || !noise.defined() || sample.sizes() != noise.sizes()) {
    throw Error("DDIMScheduler::get_velocity: sample and noise must be defined tensors of the same shape");
  }
  auto [sqrt_alpha, sqrt_one_minus] = noise_coefficients(schedule_, sample, timesteps, "DDIMScheduler::get_velocity");
  return sqrt_alpha * noise - sqrt_one_minus * sample;
}

// --- DDIMInverseScheduler ----------------------------------------------------------------------------------------

DDIMInverseScheduler::DDIMInverseScheduler(const SchedulerConfig& config) : schedule_(config) {
  if (config.timestep_spacing != TimestepSpacing::leading && config.timestep_spacing != TimestepSpacing::trailing) {
    throw Error(fmt::format(
        "DDIMInverseScheduler: \"timestep_spacing\" \"{}\" is not supported (use \"leading\" or \"trailing\")",
        to_string(config.timestep_spacing)));
  }
  initial_alpha_cumprod_ = config.set_alpha_to_one ? 1.0 : schedule_.alpha_cumprod(0);
  timesteps_ = at::arange(config.num_train_timesteps, at::kLong);
}

void DDIMInverseScheduler::set_timesteps(int64_t n) {
  const auto& c = config();
  check_num_inference_steps(c, n);
  const int64_t T = c.num_train_timesteps;
  std::vector<int64_t> list;
  if (c.timestep_spacing == TimestepSpacing::leading) {
    for (int64_t i = 0; i < n; ++i) list.push_back(i * (T / n) + c.steps_offset);
  } else {
    // round(arange(T, 0, -T/n)[::-1]) - 1: the forward trailing list, ascending (the -1 is applied once).
    list = trailing_descending(T, n);
    std::reverse(list.begin(), list.end());
  }
  check_schedule(list, c, n);
  num_inference_steps_ = n;
  timestep_list_ = std::move(list);
  timesteps_ = to_timestep_tensor(timestep_list_);
}

SchedulerStepOutput DDIMInverseScheduler::step(const at::Tensor& model_output, int64_t timestep,
                                               const at::Tensor& sample) const {
  if (num_inference_steps_ == 0) throw Error("DDIMInverseScheduler::step: call set_timesteps first");
  check_pair("DDIMInverseScheduler::step", model_output, sample);
  const auto& c = config();
  const int64_t T = c.num_train_timesteps;
  if (timestep < 0 || timestep >= T) {
    throw Error(fmt::format("DDIMInverseScheduler::step: timestep {} is outside [0, {}]", timestep, T - 1));
  }
  // `timestep` is the target level; the source is one leading stride below it.
  const int64_t source = std::min(timestep - T / num_inference_steps_, T - 1);
  const auto& table = schedule_.alphas_cumprod();
  const at::Tensor alpha_prod_t = source >= 0 ? table[source] : scalar_f32(initial_alpha_cumprod_);
  const at::Tensor alpha_prod_t_prev = table[timestep];
  const at::Tensor beta_prod_t = 1 - alpha_prod_t;
  auto [pred_original_sample, pred_epsilon] =
      predict(c.prediction_type, model_output, sample, alpha_prod_t, beta_prod_t);
  pred_original_sample = clip_or_threshold(pred_original_sample, c, /*allow_thresholding=*/false);
  const at::Tensor pred_sample_direction = (1 - alpha_prod_t_prev).pow(0.5) * pred_epsilon;
  at::Tensor prev_sample = alpha_prod_t_prev.pow(0.5) * pred_original_sample + pred_sample_direction;
  return {prev_sample, pred_original_sample};
}

}  // namespace stylealigned
