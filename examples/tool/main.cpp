// stylealigned: the sample command-line tool.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <exception>

#include "stylealigned/error.h"
#include "stylealigned/runtime.h"
#include "tool/commands.h"

int main(int argc, char** argv) {
  CLI::App app{
      "stylealigned: style-aligned image sets with shared attention (StyleAligned, Hertz et al., CVPR 2024)"};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "CPU threads for libtorch (default: all cores)");

  sa_tool::DemoOptions demo;
  auto* demo_cmd = app.add_subcommand(
      "demo", "Show what the StyleAligned processor does to one SDXL-sized self-attention layer: reference rows "
              "unchanged, targets pulled to the reference's statistics and attending to its tokens, memory linear");
  sa_tool::add_demo_options(*demo_cmd, demo);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    stylealigned::configure_threads(threads);
    if (demo_cmd->parsed()) return sa_tool::run_demo(demo);
  } catch (const stylealigned::Error& e) {
    fmt::print(stderr, "stylealigned: error: {}\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "stylealigned: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
