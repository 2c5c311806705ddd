// The tool's subcommands. Each has an options struct, a function that registers its CLI options, and a runner that
// returns the process exit code (0 ok, 1 runtime failure; usage errors exit 2 in main).
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>

namespace sa_tool {

struct DemoOptions {
  int64_t images = 4;     // per CFG half; image 0 is the reference
  int64_t tokens = 1024;  // 32x32 latent level
  int64_t heads = 10;
  int64_t head_dim = 64;
  uint64_t seed = 1234;
};
void add_demo_options(CLI::App& cmd, DemoOptions& options);
int run_demo(const DemoOptions& options);

}  // namespace sa_tool
