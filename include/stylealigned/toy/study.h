// stylealigned/toy/study.h: the StyleAligned effect study on the embedded toy model (issue 8's table).
//
// A study set is `images` prompts that name an object (all different) and a fill pattern, and leave palette,
// background and outline to the model: exactly the ambiguity StyleAligned resolves. Every arm (vanilla,
// StyleAligned, ablations) generates every set from the same seed, so the arms differ only in the attention;
// toy::score_set reads the images back, and paired_bootstrap gives the interval of an arm's gain over another.
//
//   auto pipe = stylealigned::Pipeline::load("models/toy");
//   auto sets = stylealigned::toy::study_sets(200);
//   std::vector<stylealigned::toy::StudyArm> arms = {{"vanilla", std::nullopt},
//                                                  {"style_aligned", stylealigned::StyleAlignedOptions::sdxl_demo()}};
//   auto results = stylealigned::toy::run_study(pipe, sets, arms);
//   auto gain = stylealigned::toy::paired_bootstrap(results[1].consistency(), results[0].consistency());
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "stylealigned/pipeline.h"
#include "stylealigned/style_aligned.h"
#include "stylealigned/toy/scoring.h"

namespace stylealigned::toy {

struct StudySet {
  std::vector<std::string> prompts;  ///< prompts[0] is the reference
  uint64_t seed = 0;                 ///< initial latents of the set
};

/// `count` deterministic sets (a function of `seed` and the set's index): `images` different objects, each with a
/// random pattern word ("a star in striped style"); palette, background and outline are never named.
std::vector<StudySet> study_sets(int64_t count, int64_t images = 4, uint64_t seed = 0);

/// One way of generating the sets: vanilla (`style` unset) or StyleAligned with the given options.
struct StudyArm {
  std::string name;
  std::optional<StyleAlignedOptions> style;
};

struct ArmResult {
  std::string name;
  std::vector<SetReport> reports;  ///< one per set, in set order
  std::vector<at::Tensor> images;  ///< per set, uint8 [n, H, W, 3] (kept only with StudyOptions::keep_images)

  /// Per set: share of targets consistent with the reference (toy::SetReport::style_consistency).
  std::vector<double> consistency() const;
  /// Per set: share of targets (images 1..n-1) that show their named object.
  std::vector<double> target_object_accuracy() const;
  /// Pooled over sets: all images / targets only / targets consistent.
  double object_accuracy() const;
  double mean_target_object_accuracy() const;
  double mean_consistency() const;
};

struct StudyOptions {
  int64_t steps = 25;
  std::optional<double> guidance_scale;  ///< unset: the pipeline's default (7.5 for SD1.x)
  bool keep_images = false;
  /// Sets generated together per arm (Pipeline::generate_batch): 4 keeps two cores busier on the toy model (its
  /// UNet 1.3x the throughput of one set at a time); 1 generates each set alone, as studies did before 2026-12-07.
  /// The scores agree up to float rounding of the batched matrix products (an image near an evaluator's decision
  /// boundary may flip).
  int64_t sets_per_batch = 4;
  /// Called after every generated set (arm index, set index); return false to cancel (throws Cancelled).
  std::function<bool(size_t arm, size_t set)> on_set;
};

/// Generates every set with every arm and scores it.
std::vector<ArmResult> run_study(Pipeline& pipeline, const std::vector<StudySet>& sets,
                                 const std::vector<StudyArm>& arms, const StudyOptions& options = {});

/// Mean of a - b over paired samples and its percentile-bootstrap 95% interval (sets resampled with replacement,
/// `resamples` times, from a fixed seed). Throws for unequal or empty inputs.
struct PairedDifference {
  double mean = 0, low = 0, high = 0;
  int64_t pairs = 0;
};
PairedDifference paired_bootstrap(const std::vector<double>& a, const std::vector<double>& b,
                                  int64_t resamples = 10000, uint64_t seed = 0);
/// The same interval for one sample's mean (a - 0).
PairedDifference bootstrap_mean(const std::vector<double>& a, int64_t resamples = 10000, uint64_t seed = 0);

/// The arms of the card's table: vanilla; style_aligned, StyleAligned with `defaults` (the tool passes the model's
/// Pipeline::style_aligned_defaults()); sdxl_demo, the official SDXL demo options whatever the model; and the
/// paper's ablations of `defaults` (no_adain: no AdaIN on q, k or v; full_attention_share; shared_group_norm on).
std::vector<StudyArm> standard_arms(const StyleAlignedOptions& defaults = StyleAlignedOptions::sdxl_demo());

}  // namespace stylealigned::toy
