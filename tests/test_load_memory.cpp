// Issue 3: peak RSS while loading the tiny SDXL folder stays under 1.3x the weights' size, measured as DECISIONS.md
// says (peak RSS while loading minus RSS before loading) in a fresh process: sa_load_memory_probe. Issue 9: by
// default weights already in the load dtype are mapped, not copied.
#include <gtest/gtest.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "support/test_support.h"

namespace {

nlohmann::json probe(const std::string& folder, const std::string& extra) {
  const std::string command = sa_test::shell_quote(STYLEALIGNED_LOAD_MEMORY_PROBE) + " " +
                              sa_test::shell_quote(folder) + extra;
  const sa_test::CommandResult run = sa_test::run_command(command);  // stdout only: one JSON line
  EXPECT_EQ(run.code, 0) << command << "\n" << run.output;
  if (run.code != 0) return nlohmann::json();
  nlohmann::json m = nlohmann::json::parse(run.output);
  EXPECT_TRUE(m["peak_reset"].get<bool>()) << "peak RSS could not be reset: the peak would include start-up";
  m["weights_mb"] = m["weights_bytes"].get<double>() / (1024.0 * 1024.0);
  EXPECT_GT(m["weights_mb"].get<double>(), 20.0) << "not the whole tiny SDXL folder (21 MB of safetensors)";
  m["ratio"] = (m["peak_rss_mb"].get<double>() - m["rss_before_mb"].get<double>()) / m["weights_mb"].get<double>();
  return m;
}

// Copying every tensor out of the file (map_weights off): the bound of the issue itself. Measured here: about
// 1.24x, of which 1.16x is anonymous memory (the weights, the tokenizer's 1.4 MB of tables, module bookkeeping)
// and the rest file-backed pages (our library's code and ICU's normalisation data, run for the first time).
TEST(load_memory, sdxl_tiny_pipeline_copied_peak_under_1_3x_weights) {
  const nlohmann::json m = probe(sa_test::model_folder("sdxl_tiny").string(), " --copy");
  ASSERT_FALSE(m.is_null());
  const double weights_mb = m["weights_mb"].get<double>(), ratio = m["ratio"].get<double>();
  std::printf("[ info     ] Pipeline::load(sdxl_tiny, copied): weights %.2f MB, peak RSS increase %.3fx (bound 1.3x)\n",
              weights_mb, ratio);
  RecordProperty("increase_over_weights", std::to_string(ratio));
  EXPECT_LE(ratio, 1.3) << m.dump();
  // Our own allocations, tighter: a second copy of even the largest tensor (the 6 MB token embedding) fails this.
  EXPECT_LE(m["anon_change_mb"].get<double>() / weights_mb, 1.2) << m.dump();
  // The pipeline does hold its weights once loaded: a measurement that saw nothing would be broken, not good.
  EXPECT_GE(m["rss_after_mb"].get<double>() - m["rss_before_mb"].get<double>(), 0.8 * weights_mb) << m.dump();
}

// The default: the fixture's fp32 files load as fp32, so every weight aliases its file's mapping and loading
// allocates almost nothing (measured: 3.8 MB of anonymous memory for 21 MB of weights, against 24.3 MB copied).
TEST(load_memory, sdxl_tiny_pipeline_maps_fp32_weights_instead_of_copying) {
  const nlohmann::json m = probe(sa_test::model_folder("sdxl_tiny").string(), "");
  ASSERT_FALSE(m.is_null());
  const double weights_mb = m["weights_mb"].get<double>();
  std::printf("[ info     ] Pipeline::load(sdxl_tiny, mapped): anonymous memory +%.2f MB for %.2f MB of weights\n",
              m["anon_change_mb"].get<double>(), weights_mb);
  EXPECT_LE(m["ratio"].get<double>(), 1.3) << m.dump();
  EXPECT_LE(m["anon_change_mb"].get<double>() / weights_mb, 0.3) << m.dump();
}

}  // namespace
