// Issue 3: peak RSS while loading the tiny SDXL folder stays under 1.3x the weights' size, measured as DECISIONS.md
// says (peak RSS while loading minus RSS before loading) in a fresh process: sa_load_memory_probe.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <string>

#include "support/test_support.h"

namespace {

TEST(load_memory, sdxl_tiny_pipeline_peak_under_1_3x_weights) {
  const std::string folder = sa_test::model_folder("sdxl_tiny").string();
  const std::string command =
      sa_test::shell_quote(STYLEALIGNED_LOAD_MEMORY_PROBE) + " " + sa_test::shell_quote(folder);
  const sa_test::CommandResult run = sa_test::run_command(command);  // stdout only: one JSON line
  ASSERT_EQ(run.code, 0) << command << "\n" << run.output;
  const std::string& output = run.output;

  const nlohmann::json m = nlohmann::json::parse(output);
  ASSERT_TRUE(m["peak_reset"].get<bool>()) << "peak RSS could not be reset: the peak would include start-up";
  const double weights_mb = m["weights_bytes"].get<double>() / (1024.0 * 1024.0);
  ASSERT_GT(weights_mb, 20.0) << "not the whole tiny SDXL folder (21 MB of safetensors)";
  const double increase_mb = m["peak_rss_mb"].get<double>() - m["rss_before_mb"].get<double>();
  const double ratio = increase_mb / weights_mb;
  std::printf("[ info     ] Pipeline::load(sdxl_tiny): weights %.2f MB, peak RSS increase %.2f MB = %.3fx (bound 1.3x)\n",
              weights_mb, increase_mb, ratio);
  RecordProperty("increase_over_weights", std::to_string(ratio));
  // The bound of the issue itself. Measured here: about 1.24x, of which 1.16x is anonymous memory (the weights, the
  // tokenizer's 1.4 MB of tables, module bookkeeping) and the rest file-backed pages (our library's code and ICU's
  // normalisation data, run for the first time).
  EXPECT_LE(ratio, 1.3) << output;
  // Our own allocations, tighter: a second copy of even the largest tensor (the 6 MB token embedding) fails this.
  EXPECT_LE(m["anon_change_mb"].get<double>() / weights_mb, 1.2) << output;
  // The pipeline does hold its weights once loaded: a measurement that saw nothing would be broken, not good.
  EXPECT_GE(m["rss_after_mb"].get<double>() - m["rss_before_mb"].get<double>(), 0.8 * weights_mb) << output;
}

}  // namespace
