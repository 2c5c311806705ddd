// stylealigned/toy/scoring.h: scores a generated set of toy-world images against what its prompts asked for.
//
// The embedded toy model draws the world of toy/world.h, whose evaluators read every attribute back from an image.
// That makes the two questions StyleAligned is about exactly measurable:
//   - object accuracy: does each image show the object its prompt names (the model still follows the text)?
//   - set style consistency: does each target (image 1, 2, ...) match the reference (image 0) on every style
//     attribute its own prompt leaves out (palette, pattern, background, outline)? Attributes a prompt names are
//     decided by the text, so only the left-out ones measure whether the style was shared.
//
//   std::vector<at::Tensor> images = ...;   // uint8 [H, W, 3] each, image 0 the reference
//   auto report = stylealigned::toy::score_set("set-0", images, prompts);
//   fmt::print("{:.2f} {:.2f}\n", report.object_accuracy(), report.style_consistency());
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "stylealigned/toy/world.h"

namespace stylealigned::toy {

/// What one set asked for and what its images show.
struct SetReport {
  std::string name;
  std::vector<ParsedCaption> asked;  ///< per image: the prompt read word by word
  std::vector<Evaluation> seen;      ///< per image: what the evaluators read
  /// Per image: 1 shows the named object, 0 does not, -1 the prompt names no object (not counted).
  std::vector<int> object_correct;
  /// Per image: 1 a target consistent with the reference on every style attribute its prompt leaves out, 0 not,
  /// -1 not judged (the reference itself, or a prompt that names every style attribute).
  std::vector<int> style_consistent;
  int64_t objects_named = 0, objects_correct = 0;
  int64_t targets_judged = 0, targets_consistent = 0;

  /// objects_correct / objects_named; NaN when no prompt names an object.
  double object_accuracy() const;
  /// targets_consistent / targets_judged; NaN when no target was judged.
  double style_consistency() const;
};

/// Scores one set: `images` uint8 [H, W, 3] (or float [3, H, W] in [0, 1]), image 0 the reference; `prompts` one per
/// image. Throws stylealigned::Error naming the set for fewer than two images, a prompt count that differs from the
/// image count, or an image the evaluators cannot read (with its index).
SetReport score_set(const std::string& name, const std::vector<at::Tensor>& images,
                    const std::vector<std::string>& prompts);

}  // namespace stylealigned::toy
