// DDIM scheduler, inverse scheduler and the StyleAligned inversion step: parity with diffusers 0.25.1 and
// google/style-aligned (golden data, driven by the manifest), config parsing, and hand-computed checks of the
// features the golden cases do not exercise (other beta schedules, thresholding, v-prediction, eta > 0).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "stylealigned/ddim.h"
#include "stylealigned/error.h"
#include "stylealigned/log.h"
#include "support/test_support.h"

namespace sa = stylealigned;
using nlohmann::json;

namespace {

// Collects warnings for the lifetime of the object, then restores the previous sink.
class WarningCapture {
 public:
  WarningCapture() {
    previous_ = sa::set_warning_handler([this](std::string_view m) { messages.emplace_back(m); });
  }
  ~WarningCapture() { sa::set_warning_handler(previous_); }
  std::vector<std::string> messages;

 private:
  sa::WarningHandler previous_;
};

// Runs `fn`, expects a stylealigned::Error whose message contains every string of `needles`.
template <typename Fn>
::testing::AssertionResult ThrowsNaming(Fn&& fn, std::initializer_list<std::string> needles) {
  try {
    fn();
  } catch (const sa::Error& e) {
    const std::string message = e.what();
    for (const auto& needle : needles) {
      if (message.find(needle) == std::string::npos) {
        return ::testing::AssertionFailure() << "error message \"" << message << "\" does not name \"" << needle
                                             << "\"";
      }
    }
    return ::testing::AssertionSuccess() << message;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-stylealigned exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// The scheduler acceptance bar, per element: |actual - golden| <= max(atol, 1e-6 * |golden|).
::testing::AssertionResult WithinBar(const at::Tensor& actual, const at::Tensor& golden, double atol,
                                     double* max_err_out) {
  if (actual.sizes() != golden.sizes()) {
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << " != golden " << golden.sizes();
  }
  auto a = actual.to(at::kDouble);
  auto g = golden.to(at::kDouble);
  auto diff = (a - g).abs();
  auto bar = at::clamp_min(g.abs() * 1e-6, atol);
  const double max_err = diff.max().item<double>();
  *max_err_out = max_err;
  const int64_t bad = diff.gt(bar).logical_or(diff.isnan()).sum().item<int64_t>();
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << a.numel() << " elements exceed max(" << atol
                                       << ", 1e-6*|golden|); max abs error " << max_err;
}

// --- golden parity, driven by the manifest -------------------------------------------------------------------

struct ParityTally {
  int cases = 0;
  int comparisons = 0;
  double max_err = 0.0;
};

class GoldenScheduler : public ::testing::Test {
 protected:
  at::Tensor input(const json& c, const std::string& name) { return sa_test::golden_tensor(c, c.at("inputs").at(name)); }
  at::Tensor output(const json& c, const std::string& name) { return sa_test::golden_tensor(c, c.at("outputs").at(name)); }

  // The case's config through our parser; the golden configs hold only DDIM keys and `_` metadata, so no warning.
  static sa::SchedulerConfig config_of(const json& c) {
    WarningCapture warnings;
    auto config = sa::SchedulerConfig::from_json(c.at("options").at("config").dump(), c.at("id").get<std::string>());
    EXPECT_TRUE(warnings.messages.empty()) << c.at("id") << ": " << warnings.messages.front();
    return config;
  }

  // Compares one output and records it as checked.
  void compare(const json& c, const std::string& name, const at::Tensor& actual, ParityTally& tally,
               std::set<std::string>& checked, double& case_max) {
    const auto& ref = c.at("outputs").at(name);
    const double atol = ref.at("suggested_atol").get<double>();
    ASSERT_LE(atol, 1e-6) << "the issue allows at most 1e-6";
    double err = 0.0;
    EXPECT_TRUE(WithinBar(actual, output(c, name), atol, &err)) << c.at("id") << " / " << name;
    case_max = std::max(case_max, err);
    tally.max_err = std::max(tally.max_err, err);
    ++tally.comparisons;
    checked.insert(name);
  }

  void expect_timesteps(const json& c, const at::Tensor& timesteps, const std::vector<int64_t>& list) {
    const auto expected_list = c.at("options").at("timesteps_list").get<std::vector<int64_t>>();
    EXPECT_EQ(list, expected_list) << c.at("id");
    if (c.at("outputs").contains("timesteps")) {
      auto golden = output(c, "timesteps");
      EXPECT_TRUE(timesteps.equal(golden)) << c.at("id") << ": timesteps " << timesteps << " vs " << golden;
    }
  }

  static void expect_all_outputs_checked(const json& c, const std::set<std::string>& checked) {
    for (const auto& [name, ref] : c.at("outputs").items()) {
      EXPECT_TRUE(checked.count(name)) << c.at("id") << ": output " << name << " was not compared";
    }
  }

  std::set<std::string> checked_outputs_;
};

TEST_F(GoldenScheduler, tables_are_bit_exact) {
  ParityTally tally;
  double max_rel = 0.0;
  for (const auto& c : sa_test::golden_cases("scheduler_tables")) {
    sa::NoiseSchedule schedule(config_of(c));
    std::set<std::string> checked;
    for (const auto& [name, table] : {std::pair<std::string, at::Tensor>{"betas", schedule.betas()},
                                      {"alphas_cumprod", schedule.alphas_cumprod()}}) {
      auto golden = output(c, name);
      EXPECT_EQ(table.scalar_type(), at::kFloat);
      EXPECT_TRUE(sa_test::AllClose(table, golden, 0.0, 1e-7)) << c.at("id") << " / " << name;
      const double rel = ((table.to(at::kDouble) - golden.to(at::kDouble)).abs() / golden.to(at::kDouble).abs())
                             .max()
                             .item<double>();
      max_rel = std::max(max_rel, rel);
      fmt::print("  {} / {}: max relative error {:.3g}\n", c.at("id").get<std::string>(), name, rel);
      checked.insert(name);
      ++tally.comparisons;
    }
    expect_all_outputs_checked(c, checked);
    ++tally.cases;
  }
  fmt::print("scheduler_tables: {} cases, {} tables, max relative error {:.3g}\n", tally.cases, tally.comparisons,
             max_rel);
  EXPECT_EQ(tally.cases, 3);
  EXPECT_EQ(tally.comparisons, 6);
}

TEST_F(GoldenScheduler, ddim_steps_match_diffusers) {
  ParityTally tally;
  const std::regex eta_output(R"(step(\d+)_eta(\d+)p(\d+)_prev_sample)");
  for (const auto& c : sa_test::golden_cases("scheduler_ddim")) {
    const auto& options = c.at("options");
    ASSERT_EQ(options.at("class_name"), "DDIMScheduler");
    sa::DDIMScheduler scheduler(config_of(c));
    EXPECT_EQ(scheduler.final_alpha_cumprod(), options.at("final_alpha_cumprod").get<double>()) << c.at("id");
    scheduler.set_timesteps(options.at("num_inference_steps").get<int64_t>());
    expect_timesteps(c, scheduler.timesteps(), scheduler.timestep_list());
    checked_outputs_.clear();
    checked_outputs_.insert("timesteps");
    double case_max = 0.0;
    sa::DDIMStepOptions step_options;
    step_options.eta = options.at("eta").get<double>();
    for (const auto& k : options.at("step_indices")) {
      const std::string p = fmt::format("step{}_", k.get<int64_t>());
      const int64_t t = scheduler.timestep_list().at(k.get<size_t>());
      auto out = scheduler.step(input(c, p + "model_output"), t, input(c, p + "sample"), step_options);
      compare(c, p + "prev_sample", out.prev_sample, tally, checked_outputs_, case_max);
      compare(c, p + "pred_original_sample", out.pred_original_sample, tally, checked_outputs_, case_max);
    }
    // The eta > 0 outputs: step(..., eta, variance_noise = in/eta_variance_noise), eta spelled in the name.
    for (const auto& [name, ref] : c.at("outputs").items()) {
      std::smatch m;
      if (!std::regex_match(name, m, eta_output)) continue;
      const int64_t k = std::stoll(m[1]);
      sa::DDIMStepOptions eta_options;
      eta_options.eta = std::stod(m[2].str() + "." + m[3].str());
      eta_options.variance_noise = input(c, "eta_variance_noise");
      const std::string p = fmt::format("step{}_", k);
      auto out = scheduler.step(input(c, p + "model_output"), scheduler.timestep_list().at(static_cast<size_t>(k)),
                                input(c, p + "sample"), eta_options);
      compare(c, name, out.prev_sample, tally, checked_outputs_, case_max);
    }
    expect_all_outputs_checked(c, checked_outputs_);
    fmt::print("  {}: max abs error {:.3g}\n", c.at("id").get<std::string>(), case_max);
    ++tally.cases;
  }
  fmt::print("scheduler_ddim: {} cases, {} outputs compared, max abs error {:.3g}\n", tally.cases, tally.comparisons,
             tally.max_err);
  EXPECT_EQ(tally.cases, 9);
  // 3 configs x (n=1: 2, n=10: 6 + 1 eta output, n=50: 6)
  EXPECT_EQ(tally.comparisons, 3 * (2 + 7 + 6));
}

TEST_F(GoldenScheduler, ddim_inverse_steps_match_diffusers) {
  ParityTally tally;
  for (const auto& c : sa_test::golden_cases("scheduler_ddim_inverse")) {
    const auto& options = c.at("options");
    ASSERT_EQ(options.at("class_name"), "DDIMInverseScheduler");
    sa::DDIMInverseScheduler scheduler(config_of(c));
    EXPECT_EQ(scheduler.initial_alpha_cumprod(), options.at("initial_alpha_cumprod").get<double>()) << c.at("id");
    ASSERT_EQ(options.at("eta").get<double>(), 0.0);
    scheduler.set_timesteps(options.at("num_inference_steps").get<int64_t>());
    expect_timesteps(c, scheduler.timesteps(), scheduler.timestep_list());
    checked_outputs_.clear();
    checked_outputs_.insert("timesteps");
    double case_max = 0.0;
    for (const auto& k : options.at("step_indices")) {
      const std::string p = fmt::format("step{}_", k.get<int64_t>());
      const int64_t t = scheduler.timestep_list().at(k.get<size_t>());
      auto out = scheduler.step(input(c, p + "model_output"), t, input(c, p + "sample"));
      compare(c, p + "prev_sample", out.prev_sample, tally, checked_outputs_, case_max);
      compare(c, p + "pred_original_sample", out.pred_original_sample, tally, checked_outputs_, case_max);
    }
    expect_all_outputs_checked(c, checked_outputs_);
    fmt::print("  {}: max abs error {:.3g}\n", c.at("id").get<std::string>(), case_max);
    ++tally.cases;
  }
  fmt::print("scheduler_ddim_inverse: {} cases, {} outputs compared, max abs error {:.3g}\n", tally.cases,
             tally.comparisons, tally.max_err);
  EXPECT_EQ(tally.cases, 9);
  EXPECT_EQ(tally.comparisons, 3 * (2 + 6 + 6));
}

TEST_F(GoldenScheduler, style_aligned_next_step_matches_inversion_py) {
  ParityTally tally;
  for (const auto& c : sa_test::golden_cases("style_aligned_next_step")) {
    const auto& options = c.at("options");
    sa::DDIMScheduler scheduler(config_of(c));
    scheduler.set_timesteps(options.at("num_inference_steps").get<int64_t>());
    expect_timesteps(c, scheduler.timesteps(), scheduler.timestep_list());
    checked_outputs_.clear();
    double case_max = 0.0;
    for (const auto& k : options.at("picks")) {
      const std::string p = fmt::format("t_index{}_", k.get<int64_t>());
      const int64_t t = scheduler.timestep_list().at(k.get<size_t>());
      auto next = scheduler.inversion_step(input(c, p + "model_output"), t, input(c, p + "sample"));
      compare(c, p + "next_sample", next, tally, checked_outputs_, case_max);
    }
    expect_all_outputs_checked(c, checked_outputs_);
    fmt::print("  {}: max abs error {:.3g}\n", c.at("id").get<std::string>(), case_max);
    ++tally.cases;
  }
  fmt::print("style_aligned_next_step: {} cases, {} outputs compared, max abs error {:.3g}\n", tally.cases,
             tally.comparisons, tally.max_err);
  EXPECT_EQ(tally.cases, 2);
  EXPECT_EQ(tally.comparisons, 6);
}

// --- config parsing ------------------------------------------------------------------------------------------

// stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (an Euler config).
constexpr const char* kSdxlEulerConfig = R"({
  "_class_name": "EulerDiscreteScheduler",
  "_diffusers_version": "0.19.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "use_karras_sigmas": false
})";

// runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (a PNDM config, no timestep_spacing).
constexpr const char* kSd15PndmConfig = R"({
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
})";

// The golden loops of every parity test run over sa_test::golden_cases: a kind the manifest lacks must fail them.
TEST_F(GoldenScheduler, a_missing_case_kind_fails_instead_of_passing_empty) {
  try {
    sa_test::golden_cases("scheduler_no_such_kind");
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("'scheduler_no_such_kind'"), std::string::npos) << e.what();
  }
}

TEST(ddim_config, sdxl_euler_config_loads_as_ddim_with_one_warning) {
  WarningCapture warnings;
  auto c = sa::SchedulerConfig::from_json(kSdxlEulerConfig, "sdxl/scheduler_config.json");
  EXPECT_EQ(c.beta_schedule, sa::BetaSchedule::scaled_linear);
  EXPECT_DOUBLE_EQ(c.beta_start, 0.00085);
  EXPECT_DOUBLE_EQ(c.beta_end, 0.012);
  EXPECT_FALSE(c.clip_sample);
  EXPECT_FALSE(c.set_alpha_to_one);
  EXPECT_EQ(c.steps_offset, 1);
  EXPECT_TRUE(c.trained_betas.empty());
  ASSERT_EQ(warnings.messages.size(), 1u);
  const auto& w = warnings.messages[0];
  for (const char* key : {"interpolation_type", "skip_prk_steps", "use_karras_sigmas", "sdxl/scheduler_config.json"}) {
    EXPECT_NE(w.find(key), std::string::npos) << w;
  }
  for (const char* key : {"_class_name", "_diffusers_version", "beta_end"}) EXPECT_EQ(w.find(key), std::string::npos);

  sa::DDIMScheduler scheduler(c);
  scheduler.set_timesteps(50);
  EXPECT_EQ(scheduler.timestep_list().front(), 981);
  EXPECT_EQ(scheduler.timestep_list().back(), 1);
}

TEST(ddim_config, sd15_pndm_config_loads_as_ddim_with_one_warning) {
  WarningCapture warnings;
  auto c = sa::SchedulerConfig::from_json(kSd15PndmConfig, "sd15/scheduler_config.json");
  EXPECT_EQ(c.timestep_spacing, sa::TimestepSpacing::leading);  // predates the key: the default
  EXPECT_EQ(c.prediction_type, sa::PredictionType::epsilon);
  EXPECT_EQ(c.steps_offset, 1);
  ASSERT_EQ(warnings.messages.size(), 1u);
  EXPECT_NE(warnings.messages[0].find("skip_prk_steps"), std::string::npos);
  EXPECT_EQ(warnings.messages[0].find("_class_name"), std::string::npos);
  sa::NoiseSchedule schedule(c);
  EXPECT_NEAR(schedule.alpha_cumprod(0), 0.99915, 1e-6);  // REFERENCE_NOTES B3
  EXPECT_NEAR(schedule.alpha_cumprod(981), 0.0057755, 1e-7);
  EXPECT_NEAR(schedule.alpha_cumprod(999), 0.004660, 1e-6);
}

TEST(ddim_config, defaults_metadata_and_round_trip_without_warnings) {
  WarningCapture warnings;
  auto c = sa::SchedulerConfig::from_json(R"({"_class_name": "DDIMScheduler", "_use_default_values": ["x"]})");
  EXPECT_EQ(c.num_train_timesteps, 1000);
  EXPECT_EQ(c.beta_schedule, sa::BetaSchedule::linear);
  EXPECT_TRUE(c.clip_sample);
  EXPECT_TRUE(c.set_alpha_to_one);
  EXPECT_EQ(c.timestep_spacing, sa::TimestepSpacing::leading);

  sa::SchedulerConfig custom;
  custom.num_train_timesteps = 4;
  custom.trained_betas = {0.1, 0.2, 0.3, 0.4};
  custom.prediction_type = sa::PredictionType::v_prediction;
  custom.timestep_spacing = sa::TimestepSpacing::trailing;
  custom.thresholding = true;
  custom.dynamic_thresholding_ratio = 0.9;
  custom.sample_max_value = 2.5;
  custom.clip_sample_range = 3.0;
  custom.steps_offset = 1;
  custom.rescale_betas_zero_snr = true;
  auto back = sa::SchedulerConfig::from_json(custom.to_json());
  EXPECT_EQ(back.num_train_timesteps, 4);
  EXPECT_EQ(back.trained_betas, custom.trained_betas);
  EXPECT_EQ(back.prediction_type, sa::PredictionType::v_prediction);
  EXPECT_EQ(back.timestep_spacing, sa::TimestepSpacing::trailing);
  EXPECT_TRUE(back.thresholding);
  EXPECT_EQ(back.dynamic_thresholding_ratio, 0.9);
  EXPECT_EQ(back.sample_max_value, 2.5);
  EXPECT_EQ(back.clip_sample_range, 3.0);
  EXPECT_EQ(back.steps_offset, 1);
  EXPECT_TRUE(back.rescale_betas_zero_snr);
  EXPECT_TRUE(warnings.messages.empty()) << warnings.messages.front();
}

TEST(ddim_config, style_aligned_notebooks_constructor) {
  auto c = sa::SchedulerConfig::style_aligned_notebooks();
  EXPECT_EQ(c.beta_schedule, sa::BetaSchedule::scaled_linear);
  EXPECT_EQ(c.beta_start, 0.00085);
  EXPECT_EQ(c.beta_end, 0.012);
  EXPECT_FALSE(c.clip_sample);
  EXPECT_FALSE(c.set_alpha_to_one);
  EXPECT_EQ(c.steps_offset, 0);
  EXPECT_EQ(c.timestep_spacing, sa::TimestepSpacing::leading);
  sa::DDIMScheduler scheduler(c);
  EXPECT_NEAR(scheduler.final_alpha_cumprod(), 0.99914998, 1e-8);  // STYLEALIGNED_SPEC 3
  EXPECT_NEAR(scheduler.schedule().alpha_cumprod(860), 0.02115582, 1e-8);
  scheduler.set_timesteps(50);
  EXPECT_EQ(scheduler.timestep_list().front(), 980);
  EXPECT_EQ(scheduler.timestep_list().back(), 0);
}

TEST(ddim_config, invalid_values_name_key_and_source) {
  auto parse = [](const std::string& text) { return [text] { sa::SchedulerConfig::from_json(text, "my.json"); }; };
  EXPECT_TRUE(ThrowsNaming(parse(R"({"beta_schedule": "cosine"})"), {"my.json", "beta_schedule", "cosine"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"timestep_spacing": "karras"})"), {"my.json", "timestep_spacing", "karras"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"prediction_type": "flow"})"), {"my.json", "prediction_type", "flow"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"num_train_timesteps": 0})"), {"my.json", "num_train_timesteps"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"num_train_timesteps": -5})"), {"my.json", "num_train_timesteps"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"num_train_timesteps": "1000"})"), {"my.json", "num_train_timesteps"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"num_train_timesteps": 1000.5})"), {"my.json", "num_train_timesteps"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"clip_sample": "false"})"), {"my.json", "clip_sample"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"beta_start": null})"), {"my.json", "beta_start"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"beta_end": 1.5})"), {"my.json", "beta_end"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"steps_offset": -1})"), {"my.json", "steps_offset"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"trained_betas": 0.1})"), {"my.json", "trained_betas"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"trained_betas": [0.1, "x"]})"), {"my.json", "trained_betas"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]})"),
                           {"my.json", "trained_betas", "2", "3"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"dynamic_thresholding_ratio": 0})"), {"my.json", "dynamic_thresholding_ratio"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"set_alpha_to_one": 1})"), {"my.json", "set_alpha_to_one"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"({"beta_schedule": )"), {"my.json", "JSON"}));
  EXPECT_TRUE(ThrowsNaming(parse(R"([1, 2])"), {"my.json", "object"}));
}

TEST(ddim_config, trained_betas_null_means_absent_and_array_is_used) {
  auto absent = sa::SchedulerConfig::from_json(R"({"trained_betas": null})");
  EXPECT_TRUE(absent.trained_betas.empty());
  auto given = sa::SchedulerConfig::from_json(R"({"num_train_timesteps": 3, "trained_betas": [0.1, 0.2, 0.3]})");
  sa::NoiseSchedule schedule(given);
  auto expected = at::tensor(std::vector<double>{0.1, 0.2, 0.3}, at::kDouble).to(at::kFloat);
  EXPECT_TRUE(schedule.betas().equal(expected));
  EXPECT_NEAR(schedule.alpha_cumprod(2), 0.9 * 0.8 * 0.7, 1e-7);
}

TEST(ddim_config, set_alpha_to_zero_is_the_deprecated_set_alpha_to_one) {
  WarningCapture warnings;
  auto c = sa::SchedulerConfig::from_json(R"({"set_alpha_to_one": true, "set_alpha_to_zero": false})", "inv.json");
  EXPECT_FALSE(c.set_alpha_to_one);
  ASSERT_EQ(warnings.messages.size(), 1u);
  EXPECT_NE(warnings.messages[0].find("set_alpha_to_zero"), std::string::npos);
  sa::DDIMInverseScheduler inverse(c);
  EXPECT_EQ(inverse.initial_alpha_cumprod(), inverse.schedule().alpha_cumprod(0));
  auto null_given = sa::SchedulerConfig::from_json(R"({"set_alpha_to_zero": null})");
  EXPECT_TRUE(null_given.set_alpha_to_one);
}

TEST(ddim_config, from_file_reads_and_names_the_path) {
  const auto path = sa_test::scratch_dir("ddim") / "scheduler_config.json";
  {
    std::ofstream out(path);
    out << kSd15PndmConfig;
  }
  WarningCapture warnings;
  auto c = sa::SchedulerConfig::from_file(path);
  EXPECT_EQ(c.steps_offset, 1);
  ASSERT_EQ(warnings.messages.size(), 1u);
  EXPECT_NE(warnings.messages[0].find(path.string()), std::string::npos);
  const auto missing = sa_test::scratch_dir("ddim") / "missing.json";
  EXPECT_TRUE(ThrowsNaming([&] { sa::SchedulerConfig::from_file(missing); }, {missing.string()}));
  {
    std::ofstream out(path);
    out << R"({"timestep_spacing": "bogus"})";
  }
  EXPECT_TRUE(ThrowsNaming([&] { sa::SchedulerConfig::from_file(path); }, {path.string(), "timestep_spacing"}));
}

TEST(ddim_config, inverse_scheduler_rejects_linspace) {
  sa::SchedulerConfig c;
  c.timestep_spacing = sa::TimestepSpacing::linspace;
  EXPECT_TRUE(ThrowsNaming([&] { sa::DDIMInverseScheduler s(c); }, {"timestep_spacing", "linspace"}));
  sa::DDIMScheduler forward(c);  // fine for the forward scheduler
  EXPECT_EQ(to_string(c.timestep_spacing), "linspace");
}

// --- schedules and timesteps ---------------------------------------------------------------------------------

TEST(ddim_schedule, linear_matches_double_linspace) {
  sa::SchedulerConfig c;  // linear 1e-4 .. 0.02
  sa::NoiseSchedule s(c);
  auto betas = s.betas().to(at::kDouble);
  double prod = 1.0;
  for (int64_t i = 0; i < 1000; ++i) {
    const double beta = 0.0001 + (0.02 - 0.0001) * static_cast<double>(i) / 999.0;
    prod *= 1.0 - beta;
    ASSERT_NEAR(betas[i].item<double>(), beta, 1e-6 * beta + 1e-12) << i;
    ASSERT_NEAR(s.alpha_cumprod(i), prod, 2e-6 * prod) << i;
  }
}

TEST(ddim_schedule, squaredcos_cap_v2_is_the_glide_cosine_schedule) {
  sa::SchedulerConfig c;
  c.beta_schedule = sa::BetaSchedule::squaredcos_cap_v2;
  sa::NoiseSchedule s(c);
  const double pi = std::acos(-1.0);
  auto f = [&](double t) { return std::pow(std::cos((t + 0.008) / 1.008 * pi / 2), 2); };
  for (int64_t i : {0, 1, 100, 500, 900, 998}) {
    const double beta = std::min(1 - f((i + 1) / 1000.0) / f(i / 1000.0), 0.999);
    EXPECT_NEAR(s.betas()[i].item<double>(), beta, 1e-7 * beta) << i;
    // ᾱ_t follows the continuous schedule f(t+1)/f(0) until the cap bites.
    EXPECT_NEAR(s.alpha_cumprod(i), f((i + 1) / 1000.0) / f(0), 1e-5) << i;
  }
  EXPECT_EQ(s.betas()[999].item<float>(), 0.999f);  // capped at max_beta
}

TEST(ddim_schedule, rescale_betas_zero_snr_gives_zero_terminal_snr) {
  auto c = sa::SchedulerConfig::style_aligned_notebooks();
  sa::NoiseSchedule plain(c);
  c.rescale_betas_zero_snr = true;
  sa::NoiseSchedule rescaled(c);
  EXPECT_EQ(rescaled.alpha_cumprod(999), 0.0);
  EXPECT_EQ(rescaled.betas()[999].item<float>(), 1.0f);
  EXPECT_NEAR(rescaled.alpha_cumprod(0), plain.alpha_cumprod(0), 1e-6);
  // Algorithm 1 in double: sqrt(ᾱ) shifted so the last is 0, scaled so the first is unchanged.
  const double s0 = std::sqrt(plain.alpha_cumprod(0));
  const double sT = std::sqrt(plain.alpha_cumprod(999));
  for (int64_t i : {1, 10, 300, 700, 990}) {
    const double expected = std::pow((std::sqrt(plain.alpha_cumprod(i)) - sT) * s0 / (s0 - sT), 2);
    EXPECT_NEAR(rescaled.alpha_cumprod(i), expected, 1e-5 * expected + 1e-9) << i;
  }
}

TEST(ddim_timesteps, spacings_follow_diffusers) {
  auto c = sa::SchedulerConfig::style_aligned_notebooks();
  c.steps_offset = 1;
  sa::DDIMScheduler leading(c);
  leading.set_timesteps(50);
  EXPECT_EQ(leading.timestep_list()[1], 961);
  EXPECT_EQ(leading.timesteps().scalar_type(), at::kLong);

  c.timestep_spacing = sa::TimestepSpacing::linspace;
  sa::DDIMScheduler linspace(c);
  linspace.set_timesteps(50);
  const std::vector<int64_t> head(linspace.timestep_list().begin(), linspace.timestep_list().begin() + 4);
  EXPECT_EQ(head, (std::vector<int64_t>{999, 979, 958, 938}));  // REFERENCE_NOTES B3
  EXPECT_EQ(linspace.timestep_list()[48], 20);
  EXPECT_EQ(linspace.timestep_list().back(), 0);
  linspace.set_timesteps(1);
  EXPECT_EQ(linspace.timestep_list(), std::vector<int64_t>{0});
  // round half to even: linspace(0, 9, 3) = [0, 4.5, 9] -> [0, 4, 9]
  c.num_train_timesteps = 10;
  c.steps_offset = 0;
  sa::DDIMScheduler small(c);
  small.set_timesteps(3);
  EXPECT_EQ(small.timestep_list(), (std::vector<int64_t>{9, 4, 0}));

  c = sa::SchedulerConfig::style_aligned_notebooks();
  c.timestep_spacing = sa::TimestepSpacing::trailing;
  sa::DDIMScheduler trailing(c);
  trailing.set_timesteps(13);  // diffusers issue #9261 lists these
  EXPECT_EQ(trailing.timestep_list(),
            (std::vector<int64_t>{999, 922, 845, 768, 691, 614, 537, 461, 384, 307, 230, 153, 76}));
  // numpy's arange gives 62 values for T / 61; diffusers' 62nd timestep would be -1. We keep 61.
  trailing.set_timesteps(61);
  ASSERT_EQ(trailing.timestep_list().size(), 61u);
  EXPECT_EQ(trailing.timestep_list().front(), 999);
  EXPECT_GE(trailing.timestep_list().back(), 0);
  EXPECT_EQ(trailing.timesteps().size(0), 61);

  sa::DDIMInverseScheduler inverse(c);
  inverse.set_timesteps(13);
  EXPECT_EQ(inverse.timestep_list(),
            (std::vector<int64_t>{76, 153, 230, 307, 384, 461, 537, 614, 691, 768, 845, 922, 999}));
}

TEST(ddim_timesteps, invalid_counts_and_timesteps_are_errors) {
  sa::DDIMScheduler s(sa::SchedulerConfig::style_aligned_notebooks());
  auto x = at::randn({1, 4, 2, 2});
  EXPECT_TRUE(ThrowsNaming([&] { s.step(x, 980, x); }, {"set_timesteps"}));
  EXPECT_TRUE(ThrowsNaming([&] { s.inversion_step(x, 980, x); }, {"set_timesteps"}));
  EXPECT_TRUE(ThrowsNaming([&] { s.set_timesteps(0); }, {"num_inference_steps", "0"}));
  EXPECT_TRUE(ThrowsNaming([&] { s.set_timesteps(1001); }, {"num_inference_steps", "1001"}));
  s.set_timesteps(50);
  EXPECT_TRUE(ThrowsNaming([&] { s.step(x, 1000, x); }, {"timestep 1000"}));
  EXPECT_TRUE(ThrowsNaming([&] { s.step(x, -1, x); }, {"timestep -1"}));
  EXPECT_TRUE(ThrowsNaming([&] { s.inversion_step(x, 1000, x); }, {"timestep 1000"}));
  EXPECT_TRUE(ThrowsNaming([&] { s.schedule().alpha_cumprod(1000); }, {"timestep 1000"}));
  EXPECT_TRUE(ThrowsNaming([&] { s.step(x, 980, at::randn({1, 4, 2, 3})); }, {"shape"}));

  sa::DDIMInverseScheduler inv(sa::SchedulerConfig::style_aligned_notebooks());
  EXPECT_TRUE(ThrowsNaming([&] { inv.step(x, 20, x); }, {"set_timesteps"}));
  EXPECT_TRUE(ThrowsNaming([&] { inv.set_timesteps(1001); }, {"num_inference_steps"}));
  inv.set_timesteps(50);
  EXPECT_TRUE(ThrowsNaming([&] { inv.step(x, 1000, x); }, {"timestep 1000"}));

  // leading with steps_offset 1 and n = T would schedule t = T (diffusers issue #10003): an error, not a crash.
  auto c = sa::SchedulerConfig::style_aligned_notebooks();
  c.steps_offset = 1;
  sa::DDIMScheduler offset(c);
  EXPECT_TRUE(ThrowsNaming([&] { offset.set_timesteps(1000); }, {"1000", "steps_offset"}));
  EXPECT_EQ(offset.num_inference_steps(), 0);  // a failed call leaves the scheduler unset
}

// --- steps against hand computations -------------------------------------------------------------------------

double sq(double x) { return std::sqrt(x); }

TEST(ddim_step, eta_noise_from_generator_or_variance_noise) {
  sa::DDIMScheduler s(sa::SchedulerConfig::style_aligned_notebooks());
  s.set_timesteps(10);
  auto gen = at::detail::createCPUGenerator(7);
  auto x = at::randn({2, 4, 3, 3}, gen);
  auto eps = at::randn({2, 4, 3, 3}, gen);
  const int64_t t = 500, prev = 400;

  sa::DDIMStepOptions with_gen;
  with_gen.eta = 0.7;
  with_gen.generator = at::detail::createCPUGenerator(1234);
  auto a = s.step(eps, t, x, with_gen);

  sa::DDIMStepOptions with_noise;
  with_noise.eta = 0.7;
  with_noise.variance_noise = at::randn({2, 4, 3, 3}, at::detail::createCPUGenerator(1234));
  auto b = s.step(eps, t, x, with_noise);
  EXPECT_TRUE(a.prev_sample.equal(b.prev_sample));

  // By hand, in double: σ = η sqrt((1-ᾱp)/(1-ᾱt) (1 - ᾱt/ᾱp)); x' = sqrt(ᾱp) x0 + sqrt(1-ᾱp-σ²) ε + σ z.
  const double at_ = s.schedule().alpha_cumprod(t), ap = s.schedule().alpha_cumprod(prev);
  const double sigma = 0.7 * sq((1 - ap) / (1 - at_) * (1 - at_ / ap));
  auto xd = x.to(at::kDouble), ed = eps.to(at::kDouble), zd = with_noise.variance_noise.to(at::kDouble);
  auto x0 = (xd - sq(1 - at_) * ed) / sq(at_);
  auto expected = sq(ap) * x0 + sq(1 - ap - sigma * sigma) * ed + sigma * zd;
  EXPECT_ALLCLOSE(b.prev_sample, expected, 1e-5);
  EXPECT_ALLCLOSE(b.pred_original_sample, x0, 1e-5);

  // A different draw gives a different sample; eta = 0 ignores the noise entirely.
  with_gen.generator = at::detail::createCPUGenerator(99);
  EXPECT_FALSE(s.step(eps, t, x, with_gen).prev_sample.equal(b.prev_sample));
  sa::DDIMStepOptions eta0;
  eta0.variance_noise = with_noise.variance_noise;
  EXPECT_TRUE(s.step(eps, t, x, eta0).prev_sample.equal(s.step(eps, t, x).prev_sample));

  sa::DDIMStepOptions both = with_noise;
  both.generator = at::detail::createCPUGenerator(1);
  EXPECT_TRUE(ThrowsNaming([&] { s.step(eps, t, x, both); }, {"generator", "variance_noise"}));
  sa::DDIMStepOptions wrong_shape;
  wrong_shape.eta = 0.5;
  wrong_shape.variance_noise = at::randn({1, 4, 3, 3});
  EXPECT_TRUE(ThrowsNaming([&] { s.step(eps, t, x, wrong_shape); }, {"variance_noise", "shape"}));
  sa::DDIMStepOptions negative;
  negative.eta = -0.1;
  EXPECT_TRUE(ThrowsNaming([&] { s.step(eps, t, x, negative); }, {"eta"}));
}

TEST(ddim_step, v_prediction_matches_hand_computation) {
  auto c = sa::SchedulerConfig::style_aligned_notebooks();
  c.prediction_type = sa::PredictionType::v_prediction;
  sa::DDIMScheduler s(c);
  s.set_timesteps(20);
  auto gen = at::detail::createCPUGenerator(3);
  auto x = at::randn({1, 4, 4, 4}, gen), v = at::randn({1, 4, 4, 4}, gen);
  const int64_t t = 650, prev = 600;
  auto out = s.step(v, t, x);
  const double a = s.schedule().alpha_cumprod(t), ap = s.schedule().alpha_cumprod(prev);
  auto xd = x.to(at::kDouble), vd = v.to(at::kDouble);
  auto x0 = sq(a) * xd - sq(1 - a) * vd;
  auto eps = sq(a) * vd + sq(1 - a) * xd;
  EXPECT_ALLCLOSE(out.pred_original_sample, x0, 1e-5);
  EXPECT_ALLCLOSE(out.prev_sample, sq(ap) * x0 + sq(1 - ap) * eps, 1e-5);

  // The inverse scheduler and the inversion step convert v the same way; the last step (t = 50 -> 0) uses ᾱ_0.
  auto next = s.inversion_step(v, t, x);
  EXPECT_ALLCLOSE(next, sq(a) * (sq(ap) * xd - sq(1 - ap) * vd) + sq(1 - a) * (sq(ap) * vd + sq(1 - ap) * xd), 1e-5);
  auto last = s.step(v, 0, x);
  const double a0 = s.schedule().alpha_cumprod(0);
  EXPECT_DOUBLE_EQ(s.final_alpha_cumprod(), a0);
  auto x00 = sq(a0) * xd - sq(1 - a0) * vd;
  EXPECT_ALLCLOSE(last.prev_sample, sq(a0) * x00 + sq(1 - a0) * (sq(a0) * vd + sq(1 - a0) * xd), 1e-5);
}

TEST(ddim_step, dynamic_thresholding_matches_hand_computation) {
  auto c = sa::SchedulerConfig::style_aligned_notebooks();
  c.prediction_type = sa::PredictionType::sample;  // x0 = model output, so the threshold is easy to predict
  c.thresholding = true;
  c.dynamic_thresholding_ratio = 0.9;
  c.sample_max_value = 3.0;
  sa::DDIMScheduler s(c);
  s.set_timesteps(10);
  // Row 0: |x| = 0.5 .. 5.0 in 0.5 steps (10 values): quantile 0.9 at position 8.1 -> 4.5 + 0.1 * 0.5 = 4.55,
  // clamped to sample_max_value 3. Row 1: |x| = 0.1 .. 1.0: quantile 0.91 -> clamped up to 1 (no scaling).
  std::vector<float> row0, row1;
  for (int i = 1; i <= 10; ++i) {
    row0.push_back((i % 2 ? -0.5f : 0.5f) * static_cast<float>(i));
    row1.push_back(0.1f * static_cast<float>(i) * (i % 3 ? 1.f : -1.f));
  }
  auto x0_in = at::stack({at::tensor(row0), at::tensor(row1)}).reshape({2, 10, 1, 1});
  auto sample = at::randn({2, 10, 1, 1}, at::detail::createCPUGenerator(5));
  auto out = s.step(x0_in, 700, sample);
  auto expected0 = at::tensor(row0).clamp(-3.0, 3.0) / 3.0;
  auto expected1 = at::tensor(row1).clamp(-1.0, 1.0);
  EXPECT_ALLCLOSE(out.pred_original_sample[0].flatten(), expected0, 1e-7);
  EXPECT_ALLCLOSE(out.pred_original_sample[1].flatten(), expected1, 1e-7);

  // Quantile between the clamps: sample_max_value 10 keeps s = 4.55 (and 5.0 is clipped to it).
  c.sample_max_value = 10.0;
  sa::DDIMScheduler loose(c);
  loose.set_timesteps(10);
  auto out2 = loose.step(x0_in, 700, sample);
  EXPECT_ALLCLOSE(out2.pred_original_sample[0].flatten(), at::tensor(row0).clamp(-4.55, 4.55) / 4.55, 1e-6);
}

TEST(ddim_step, clip_sample_and_use_clipped_model_output) {
  sa::SchedulerConfig c;  // linear, clip_sample true, range 1
  c.clip_sample_range = 0.5;
  sa::DDIMScheduler s(c);
  s.set_timesteps(10);
  auto gen = at::detail::createCPUGenerator(11);
  auto x = at::randn({1, 4, 4, 4}, gen) * 2, eps = at::randn({1, 4, 4, 4}, gen);
  const int64_t t = 300, prev = 200;
  const double a = s.schedule().alpha_cumprod(t), ap = s.schedule().alpha_cumprod(prev);
  auto xd = x.to(at::kDouble), ed = eps.to(at::kDouble);
  auto x0 = ((xd - sq(1 - a) * ed) / sq(a)).clamp(-0.5, 0.5);
  auto out = s.step(eps, t, x);
  EXPECT_ALLCLOSE(out.pred_original_sample, x0, 1e-6);
  EXPECT_LE(out.pred_original_sample.abs().max().item<float>(), 0.5f);
  EXPECT_ALLCLOSE(out.prev_sample, sq(ap) * x0 + sq(1 - ap) * ed, 1e-5);

  sa::DDIMStepOptions clipped;
  clipped.use_clipped_model_output = true;
  auto out2 = s.step(eps, t, x, clipped);
  auto eps2 = (xd - sq(a) * x0) / sq(1 - a);
  EXPECT_ALLCLOSE(out2.prev_sample, sq(ap) * x0 + sq(1 - ap) * eps2, 1e-5);
  EXPECT_FALSE(out2.prev_sample.equal(out.prev_sample));
}

TEST(ddim_step, inverse_step_undoes_a_forward_step) {
  auto c = sa::SchedulerConfig::style_aligned_notebooks();
  sa::DDIMScheduler forward(c);
  sa::DDIMInverseScheduler inverse(c);
  forward.set_timesteps(25);
  inverse.set_timesteps(25);
  auto gen = at::detail::createCPUGenerator(21);
  auto x = at::randn({2, 4, 4, 4}, gen), eps = at::randn({2, 4, 4, 4}, gen);
  for (int64_t t : {920, 480, 40}) {
    auto down = forward.step(eps, t, x).prev_sample;  // level t - 40
    auto up = inverse.step(eps, t, down);              // back to level t with the same ε
    EXPECT_ALLCLOSE(up.prev_sample, x, 2e-4) << t;
    EXPECT_TRUE(forward.inversion_step(eps, t, down).equal(up.prev_sample)) << t;  // same arithmetic, ε case
  }
  // The first inversion step (t = 0 -> source level ᾱ_0 via final_alpha_cumprod) is the identity.
  EXPECT_ALLCLOSE(forward.inversion_step(eps, 0, x), x, 1e-5);
}

TEST(ddim_step, add_noise_and_velocity) {
  sa::DDIMScheduler s(sa::SchedulerConfig::style_aligned_notebooks());
  auto gen = at::detail::createCPUGenerator(8);
  auto x0 = at::randn({3, 2, 2, 2}, gen), noise = at::randn({3, 2, 2, 2}, gen);
  auto ts = at::tensor(std::vector<int64_t>{0, 500, 999});
  auto noisy = s.add_noise(x0, noise, ts);
  auto velocity = s.get_velocity(x0, noise, ts);
  for (int64_t i = 0; i < 3; ++i) {
    const double a = s.schedule().alpha_cumprod(ts[i].item<int64_t>());
    EXPECT_ALLCLOSE(noisy[i], sq(a) * x0[i].to(at::kDouble) + sq(1 - a) * noise[i].to(at::kDouble), 1e-6);
    EXPECT_ALLCLOSE(velocity[i], sq(a) * noise[i].to(at::kDouble) - sq(1 - a) * x0[i].to(at::kDouble), 1e-6);
  }
  // One timestep for the whole batch (0-dim tensor), and the step's x0 recovers the original.
  auto one = s.add_noise(x0, noise, at::scalar_tensor(980, at::kLong));
  s.set_timesteps(50);
  EXPECT_ALLCLOSE(s.step(noise, 980, one).pred_original_sample, x0, 1e-4);

  EXPECT_TRUE(ThrowsNaming([&] { s.add_noise(x0, noise, at::tensor(std::vector<int64_t>{0, 1000, 2})); },
                           {"add_noise", "timestep 1000"}));
  EXPECT_TRUE(ThrowsNaming([&] { s.add_noise(x0, noise, at::tensor(std::vector<int64_t>{-3, 1, 2})); },
                           {"timestep -3"}));
  EXPECT_TRUE(ThrowsNaming([&] { s.add_noise(x0, noise, at::tensor(std::vector<float>{1.f, 2.f, 3.f})); },
                           {"integer"}));
  EXPECT_TRUE(ThrowsNaming([&] { s.get_velocity(x0, noise, at::tensor(std::vector<int64_t>{1, 2})); },
                           {"get_velocity", "one per batch row"}));
}

TEST(ddim_step, zero_snr_v_prediction_trailing_is_finite) {
  auto c = sa::SchedulerConfig::style_aligned_notebooks();
  c.rescale_betas_zero_snr = true;
  c.prediction_type = sa::PredictionType::v_prediction;
  c.timestep_spacing = sa::TimestepSpacing::trailing;
  c.set_alpha_to_one = true;
  sa::DDIMScheduler s(c);
  s.set_timesteps(10);
  ASSERT_EQ(s.timestep_list().front(), 999);  // ᾱ = 0 here: x0 = -v exactly
  auto gen = at::detail::createCPUGenerator(2);
  auto x = at::randn({1, 4, 2, 2}, gen), v = at::randn({1, 4, 2, 2}, gen);
  auto out = s.step(v, 999, x);
  EXPECT_TRUE(out.pred_original_sample.equal(-v));
  EXPECT_TRUE(out.prev_sample.isfinite().all().item<bool>());
}

}  // namespace
