// stylealigned: the sample command-line tool.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <exception>

#include "stylealigned/error.h"
#include "stylealigned/runtime.h"
#include "tool/commands.h"
#include "tool/output.h"

int main(int argc, char** argv) {
  CLI::App app{
      "stylealigned: style-aligned image sets with shared attention (StyleAligned, Hertz et al., CVPR 2024)"};
  app.require_subcommand(1);
  // Global options (--threads) may also follow the subcommand: `stylealigned generate ... --threads 2`.
  app.fallthrough();
  int threads = 0;
  app.add_option("--threads", threads, "CPU threads for libtorch (default: all cores)");
  std::string conv_packing;
  app.add_option("--conv-packing", conv_packing,
                 "auto, always or never: convolution weights reordered once for oneDNN's fast blocked kernels "
                 "(auto: bf16 only, as it costs a second copy of the convolution weights)")
      ->check(CLI::IsMember({"auto", "always", "never"}));

  sa_tool::StudyOptions showcase;
  auto* demo_cmd = app.add_subcommand(
      "demo", "StyleAligned vs vanilla on the embedded toy model: a few sets, both grids side by side, and the toy "
              "world's exact scores (object accuracy, set style consistency). --layer: one synthetic SDXL-sized "
              "self-attention layer instead");
  sa_tool::add_study_options(*demo_cmd, showcase, /*demo=*/true);
  sa_tool::DemoOptions demo;
  sa_tool::add_demo_options(*demo_cmd, demo);

  sa_tool::StudyOptions study;
  auto* study_cmd = app.add_subcommand(
      "study", "The StyleAligned effect table on the embedded toy model: many sets, vanilla vs StyleAligned and the "
               "paper's ablations, paired-bootstrap intervals");
  sa_tool::add_study_options(*study_cmd, study, /*demo=*/false);

  sa_tool::GenerateOptions gen;
  auto* gen_cmd = app.add_subcommand(
      "generate", "Generate a style-aligned set: the first prompt is the style reference, every other image shares "
                  "its style. Writes 00-reference.png, 01.png, ..., grid.png and settings.json");
  sa_tool::add_generate_options(*gen_cmd, gen, /*transfer=*/false);

  sa_tool::GenerateOptions transfer;
  auto* transfer_cmd = app.add_subcommand(
      "transfer", "Use a real image as the style reference: DDIM-invert it with its caption, then generate the "
                  "target prompts in its style");
  sa_tool::add_generate_options(*transfer_cmd, transfer, /*transfer=*/true);

  sa_tool::InfoOptions info;
  auto* info_cmd = app.add_subcommand("info", "Describe a model folder: family, sizes, attention layers");
  sa_tool::add_info_options(*info_cmd, info);

  sa_tool::EvalOptions eval;
  auto* eval_cmd = app.add_subcommand(
      "eval", "Score sets of images: CLIP text alignment and DINO set consistency as in the paper's Table 2, or the "
              "toy world's exact evaluators for sets of the embedded model; a table, and JSON with --json");
  sa_tool::add_eval_options(*eval_cmd, eval);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    stylealigned::configure_threads(threads);
    if (!conv_packing.empty()) {
      stylealigned::configure_conv_weight_packing(stylealigned::parse_conv_weight_packing(conv_packing));
    }
    stylealigned::configure_large_tensor_pages();
    if (demo_cmd->parsed()) return showcase.layer ? sa_tool::run_demo(demo) : sa_tool::run_showcase(showcase);
    if (study_cmd->parsed()) return sa_tool::run_study(study);
    if (gen_cmd->parsed()) return sa_tool::run_generate(gen, false);
    if (transfer_cmd->parsed()) return sa_tool::run_generate(transfer, true);
    if (info_cmd->parsed()) return sa_tool::run_info(info);
    if (eval_cmd->parsed()) return sa_tool::run_eval(eval);
  } catch (const sa_tool::UsageError& e) {
    fmt::print(stderr, "stylealigned: usage error: {}\n", e.what());
    return 2;
  } catch (const stylealigned::Error& e) {
    fmt::print(stderr, "stylealigned: error: {}\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "stylealigned: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
