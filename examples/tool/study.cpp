// `stylealigned demo` and `stylealigned study`: StyleAligned against vanilla on the embedded toy model, measured by
// the toy world's exact evaluators. `demo` is the README's main command (a few sets, grids side by side, a short
// table); `study` is the card's effect table (hundreds of sets, ablation arms, paired-bootstrap intervals, JSON).
#include <ATen/ATen.h>
#include <fmt/format.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "internal/atomic_file.h"
#include "stylealigned/error.h"
#include "stylealigned/image.h"
#include "stylealigned/pipeline.h"
#include "stylealigned/toy/study.h"
#include "tool/commands.h"
#include "tool/output.h"

#ifndef STYLEALIGNED_TOY_MODEL_DIR
#define STYLEALIGNED_TOY_MODEL_DIR "models/toy"
#endif

namespace sa_tool {
namespace fs = std::filesystem;
namespace toy = stylealigned::toy;
using Json = nlohmann::ordered_json;

void add_study_options(CLI::App& cmd, StudyOptions& o, bool demo) {
  cmd.add_option("--model", o.model,
                 "Model folder (default: the embedded toy model, $STYLEALIGNED_TOY_MODEL or " STYLEALIGNED_TOY_MODEL_DIR
                 ")");
  cmd.add_option("--sets", o.sets, "Sets of 4 images (reference + 3 targets, different objects)")
      ->capture_default_str()->check(CLI::Range(1, 100000));
  cmd.add_option("--steps", o.steps, "DDIM steps")->capture_default_str()->check(CLI::Range(1, 1000));
  cmd.add_option("--seed", o.seed, "Seed of the prompts and initial latents of the sets")->capture_default_str();
  cmd.add_option("--guidance", o.guidance, "Classifier-free guidance scale (default: the pipeline's, 7.5 for SD1.x)")
      ->check(CLI::Range(0.0, 100.0));
  cmd.add_option("--sets-per-batch", o.sets_per_batch,
                 "Sets generated together per arm, in one UNet batch (1: one at a time, as before 2026-12-07; scores "
                 "agree up to float rounding)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  if (demo) {
    cmd.add_option("--out", o.out, "Output folder (vanilla.png, style_aligned.png, side_by_side.png, summary.json)")
        ->capture_default_str();
    cmd.add_flag("--force", o.force, "Overwrite existing output files");
    cmd.add_flag("--layer", o.layer,
                 "Instead: StyleAligned on one synthetic SDXL-sized self-attention layer (no model needed)");
  } else {
    cmd.add_option("--arms", o.arms,
                   "Comma-separated: vanilla, style_aligned (the tool's defaults for the model), sdxl_demo (the official "
                   "SDXL demo options), no_adain, full_attention_share, "
                   "shared_group_norm; any of them but vanilla may override StyleAlignedOptions fields, as in "
                   "style_aligned+shared_score_shift=0.69+only_self_level=0.2")
        ->capture_default_str();
    cmd.add_option("--json", o.json_out, "Write the per-arm results and intervals as JSON to this file");
    cmd.add_flag("--force", o.force, "Overwrite an existing --json file");
    cmd.add_flag("--per-image", o.per_image,
                 "In the --json file, also every image's prompt and what the evaluators read from it (to see which "
                 "objects fail and what they became)");
  }
  cmd.add_flag("--quiet", o.quiet, "No progress output");
}

namespace {

fs::path resolve_model(const std::string& given) {
  fs::path p = given;
  if (p.empty()) {
    const char* env = std::getenv("STYLEALIGNED_TOY_MODEL");
    p = env && *env ? fs::path(env) : fs::path(STYLEALIGNED_TOY_MODEL_DIR);
  }
  if (!fs::exists(p / "model_index.json")) {
    throw stylealigned::Error(fmt::format(
        "the model folder {} has no model_index.json (the embedded toy model lives in models/toy of the source tree; "
        "pass --model DIR or set STYLEALIGNED_TOY_MODEL)",
        p.string()));
  }
  return p;
}

std::vector<toy::StudyArm> select_arms(const std::string& list, const stylealigned::StyleAlignedOptions& defaults) {
  const auto all = toy::standard_arms(defaults);
  std::vector<toy::StudyArm> out;
  std::stringstream ss(list);
  std::string spec;
  while (std::getline(ss, spec, ',')) {
    // "style_aligned+shared_score_shift=0.69+only_self_level=0.2": a standard arm with fields overridden.
    std::stringstream parts(spec);
    std::string base;
    std::getline(parts, base, '+');
    auto it = std::find_if(all.begin(), all.end(), [&](const toy::StudyArm& a) { return a.name == base; });
    if (it == all.end()) throw UsageError(fmt::format("--arms: unknown arm '{}'", base));
    toy::StudyArm arm = *it;
    arm.name = spec;
    std::string override_;
    while (std::getline(parts, override_, '+')) {
      const auto eq = override_.find('=');
      if (!arm.style || eq == std::string::npos) {
        throw UsageError(fmt::format("--arms: '{}' in '{}' is not field=value on a StyleAligned arm", override_, spec));
      }
      try {
        arm.style->set(override_.substr(0, eq), override_.substr(eq + 1));
        arm.style->validate();
      } catch (const stylealigned::Error& e) {
        throw UsageError(fmt::format("--arms '{}': {}", spec, e.what()));
      }
    }
    out.push_back(std::move(arm));
  }
  if (out.empty() || out.front().name != "vanilla") throw UsageError("--arms must start with vanilla (the baseline)");
  return out;
}

std::vector<toy::ArmResult> run(const StudyOptions& o, stylealigned::Pipeline& pipe,
                                const std::vector<toy::StudySet>& sets, const std::vector<toy::StudyArm>& arms,
                                bool keep_images) {
  toy::StudyOptions so;
  so.steps = o.steps;
  so.guidance_scale = o.guidance;
  so.keep_images = keep_images;
  so.sets_per_batch = o.sets_per_batch;
  const auto t0 = std::chrono::steady_clock::now();
  const size_t total = sets.size() * arms.size();
  // On a terminal one line redrawn after every set; in a log a line every 10% of the work.
  const bool tty = ::isatty(2) != 0;
  size_t done = 0;
  so.on_set = [&, tty](size_t, size_t) {
    ++done;
    if (o.quiet) return true;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const size_t tenth = std::max<size_t>(1, total / 10);
    if (done == total || (tty ? done % arms.size() == 0 : done % tenth == 0)) {
      fmt::print(stderr, "{}{} / {} generations ({:.0f} s, ETA {:.0f} s){}", tty ? "\r" : "", done, total, s,
                 s / static_cast<double>(done) * static_cast<double>(total - done), tty && done < total ? "   " : "\n");
    }
    return true;
  };
  return toy::run_study(pipe, sets, arms, so);
}

std::string interval(const toy::PairedDifference& d) {
  return fmt::format("{:+.3f} [{:+.3f}, {:+.3f}]", d.mean, d.low, d.high);
}

Json arm_json(const toy::ArmResult& arm, const toy::ArmResult& vanilla) {
  Json j;
  j["name"] = arm.name;
  j["object_accuracy"] = arm.object_accuracy();
  j["target_object_accuracy"] = arm.mean_target_object_accuracy();
  j["style_consistency"] = arm.mean_consistency();
  const auto c = toy::bootstrap_mean(arm.consistency());
  j["style_consistency_ci95"] = {c.low, c.high};
  if (&arm != &vanilla) {
    const auto dc = toy::paired_bootstrap(arm.consistency(), vanilla.consistency());
    const auto dobj = toy::paired_bootstrap(arm.target_object_accuracy(), vanilla.target_object_accuracy());
    j["consistency_gain_vs_vanilla"] = {{"mean", dc.mean}, {"ci95", {dc.low, dc.high}}, {"pairs", dc.pairs}};
    j["target_object_accuracy_change_vs_vanilla"] = {{"mean", dobj.mean}, {"ci95", {dobj.low, dobj.high}}};
  }
  return j;
}

// Per set, per image: the prompt, what the evaluators read (with the object's template match) and the verdicts.
Json per_image_json(const toy::ArmResult& arm, const std::vector<toy::StudySet>& study_sets) {
  Json sets = Json::array();
  for (size_t s = 0; s < arm.reports.size(); ++s) {
    const toy::SetReport& report = arm.reports[s];
    const auto& prompts = study_sets.at(s).prompts;
    Json images = Json::array();
    for (size_t i = 0; i < report.seen.size(); ++i) {
      const toy::Evaluation& e = report.seen[i];
      Json seen;
      for (const toy::Attribute attr : toy::kAllAttributes) {
        seen[std::string(toy::attribute_name(attr))] = std::string(toy::value_name(attr, e.attributes.get(attr)));
      }
      seen["object_match"] = e.object_match;
      seen["object_confidence"] = e.confidence_of(toy::Attribute::object);
      images.push_back({{"prompt", prompts.at(i)},
                        {"seen", std::move(seen)},
                        {"object_correct", report.object_correct[i]},
                        {"style_consistent", report.style_consistent[i]}});
    }
    sets.push_back(std::move(images));
  }
  return sets;
}

void print_table(const std::vector<toy::ArmResult>& results) {
  const auto& vanilla = results.front();
  fmt::print("{:<22} {:>9} {:>9} {:>11}  {:<28} {:<28}\n", "arm", "objects", "targets", "consistency",
             "consistency - vanilla [95%]", "target objects - vanilla [95%]");
  for (const auto& r : results) {
    std::string dc = "", dobj = "";
    if (&r != &vanilla) {
      dc = interval(toy::paired_bootstrap(r.consistency(), vanilla.consistency()));
      dobj = interval(toy::paired_bootstrap(r.target_object_accuracy(), vanilla.target_object_accuracy()));
    }
    fmt::print("{:<22} {:>9.3f} {:>9.3f} {:>11.3f}  {:<28} {:<28}\n", r.name, r.object_accuracy(),
               r.mean_target_object_accuracy(), r.mean_consistency(), dc, dobj);
  }
}

// uint8 [H, W, 3] scaled up by an integer factor (nearest), so 64x64 images are visible in a viewer.
at::Tensor enlarge(const at::Tensor& rgb, int64_t factor) {
  return rgb.repeat_interleave(factor, 0).repeat_interleave(factor, 1).contiguous();
}

at::Tensor arm_grid(const toy::ArmResult& arm) {
  std::vector<at::Tensor> tiles;
  for (const auto& set : arm.images) {
    for (int64_t i = 0; i < set.size(0); ++i) tiles.push_back(enlarge(set[i], 3));
  }
  return stylealigned::image::make_grid(tiles, 4, 6);
}

}  // namespace

int run_showcase(const StudyOptions& o) {
  const fs::path model = resolve_model(o.model);
  // Refuse before minutes of work, not after (OutputSet checks again when it moves the files in).
  for (const char* f : {"vanilla.png", "style_aligned.png", "side_by_side.png", "summary.json"}) {
    if (!o.force && fs::exists(fs::path(o.out) / f)) {
      throw UsageError(fmt::format("{} exists (pass --force to overwrite)", (fs::path(o.out) / f).string()));
    }
  }
  OutputSet output(o.out, o.force);
  const auto t0 = std::chrono::steady_clock::now();
  auto pipe = stylealigned::Pipeline::load(model);
  const auto standard = toy::standard_arms(pipe.style_aligned_defaults());
  const std::vector<toy::StudyArm> arms = {standard[0], standard[1]};  // vanilla, style_aligned
  fmt::print("stylealigned demo: {} sets of 4 images from the embedded toy model ({}), {} DDIM steps\n", o.sets,
             model.string(), o.steps);
  fmt::print("Each prompt names an object and a fill pattern and leaves palette, background and outline to the model;\n"
             "StyleAligned should make the 3 targets of a set take them from the reference (image 0).\n"
             "StyleAligned options (the model's defaults): {}\n\n",
             arms[1].style->to_string());
  const auto results = run(o, pipe, toy::study_sets(o.sets, 4, o.seed), arms, /*keep_images=*/true);
  const at::Tensor vanilla = arm_grid(results[0]), aligned = arm_grid(results[1]);
  const at::Tensor both = stylealigned::image::make_grid({vanilla, aligned}, 2, 24);
  const stylealigned::image::TextChunks text = {{"model", model.string()}, {"steps", std::to_string(o.steps)}};
  output.add_png("vanilla.png", vanilla, text);
  output.add_png("style_aligned.png", aligned, text);
  output.add_png("side_by_side.png", both, text);
  Json summary;
  summary["model"] = model.string();
  summary["sets"] = o.sets;
  summary["steps"] = o.steps;
  summary["sets_per_batch"] = o.sets_per_batch;
  summary["seed"] = o.seed;
  summary["style_aligned_options"] = arms[1].style->to_string();
  summary["arms"] = Json::array();
  for (const auto& r : results) summary["arms"].push_back(arm_json(r, results[0]));
  output.add_text("summary.json", summary.dump(2) + "\n");
  output.commit();
  print_table(results);
  fmt::print("\n(objects: share of all images showing the named object; targets: of images 1-3; consistency: share "
             "of targets matching the reference on palette, background and outline; intervals: paired bootstrap "
             "over {} sets, so wide)\n",
             o.sets);
  fmt::print("images: {} (left vanilla, right StyleAligned; one set per row, reference first); {:.0f} s\n",
             (fs::path(o.out) / "side_by_side.png").string(),
             std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return 0;
}

int run_study(const StudyOptions& o) {
  const fs::path model = resolve_model(o.model);
  select_arms(o.arms, stylealigned::StyleAlignedOptions::sdxl_demo());  // usage errors before the model loads
  if (!o.json_out.empty() && fs::exists(o.json_out) && !o.force) {
    throw UsageError(fmt::format("--json {} exists (pass --force to overwrite)", o.json_out));
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto pipe = stylealigned::Pipeline::load(model);
  const auto arms = select_arms(o.arms, pipe.style_aligned_defaults());
  const auto sets = toy::study_sets(o.sets, 4, o.seed);
  const auto results = run(o, pipe, sets, arms, /*keep_images=*/false);
  print_table(results);
  if (!o.json_out.empty()) {
    Json j;
    j["model"] = model.string();
    j["sets"] = o.sets;
    j["images_per_set"] = 4;
    j["steps"] = o.steps;
    j["sets_per_batch"] = o.sets_per_batch;
    j["seed"] = o.seed;
    if (o.guidance) j["guidance"] = *o.guidance;
    j["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    j["arms"] = Json::array();
    for (size_t i = 0; i < results.size(); ++i) {
      Json a = arm_json(results[i], results.front());
      a["options"] = arms[i].style ? arms[i].style->to_string() : "vanilla";
      if (o.per_image) a["sets"] = per_image_json(results[i], sets);
      j["arms"].push_back(std::move(a));
    }
    stylealigned::internal::write_file_atomic(o.json_out, j.dump(2) + "\n");
  }
  return 0;
}

}  // namespace sa_tool
