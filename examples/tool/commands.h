// The tool's subcommands. Each has an options struct, a function that registers its CLI options, and a runner that
// returns the process exit code (0 ok, 1 runtime failure; usage errors exit 2 in main).
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "stylealigned/style_aligned.h"

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

// `demo` (the toy-model showcase, README's main command) and `study` (the model card's effect table).
struct StudyOptions {
  std::string model;  // empty: the embedded toy model
  int64_t sets = 4;
  int64_t steps = 25;
  uint64_t seed = 0;
  std::optional<double> guidance;  // unset: the pipeline's default
  int64_t sets_per_batch = 4;      // toy::StudyOptions::sets_per_batch
  std::string arms = "vanilla,style_aligned,no_adain,full_attention_share,shared_group_norm";  // study only
  std::string out = "out/demo";  // demo only
  std::string json_out;          // study only
  bool force = false;
  bool quiet = false;
  bool per_image = false;  // study only: what the evaluators read from every image, in the --json file
  bool layer = false;  // demo --layer: the synthetic one-layer demo instead
};
void add_study_options(CLI::App& cmd, StudyOptions& options, bool demo);
int run_showcase(const StudyOptions& options);
int run_study(const StudyOptions& options);

// Options shared by `generate` and `transfer`.
struct GenerateOptions {
  std::string model;
  std::vector<std::string> prompts;
  std::string prompts_file;
  std::string style;
  std::optional<std::string> negative_prompt;
  int64_t steps = 50;
  std::optional<double> guidance;
  double guidance_rescale = 0.0;
  std::optional<int64_t> width, height;
  uint64_t seed = 0;
  std::string latents_file;
  std::string save_latents;
  std::string scheduler_config;
  double eta = 0.0;
  std::string out = "out";
  std::string device = "cpu";
  std::string dtype = "fp32";
  std::string vae_dtype = "auto";  ///< auto: bf16 with --dtype bf16, else fp32 (PipelineLoadOptions::vae_dtype)
  bool force = false;
  bool quiet = false;
  // StyleAligned (defaults: the official SDXL demo; `transfer` switches to the transfer notebook's)
  bool no_style_align = false;
  stylealigned::StyleAlignedOptions sa = stylealigned::StyleAlignedOptions::sdxl_demo();
  // The StyleAlignedOptions fields given on the command line: `generate` starts from the model's
  // Pipeline::style_aligned_defaults() and keeps these from `sa`.
  std::vector<std::string> sa_given;
  // transfer only
  std::string reference;
  std::string reference_caption;
  double inversion_guidance = 2.0;
  int64_t inversion_offset = 5;
};
void add_generate_options(CLI::App& cmd, GenerateOptions& options, bool transfer);
int run_generate(GenerateOptions options, bool transfer);

struct EvalOptions {
  std::vector<std::string> sets;
  std::string clip;
  std::string dino;
  bool toy = false;
  std::string prompts_file;
  std::string json_out;
  bool force = false;
  int64_t batch_size = 16;
};
void add_eval_options(CLI::App& cmd, EvalOptions& options);
int run_eval(const EvalOptions& options);

struct InfoOptions {
  std::string model;
};
void add_info_options(CLI::App& cmd, InfoOptions& options);
int run_info(const InfoOptions& options);

}  // namespace sa_tool
