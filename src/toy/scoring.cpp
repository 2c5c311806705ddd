#include "stylealigned/toy/scoring.h"

#include <fmt/format.h>

#include <limits>

#include "stylealigned/error.h"

namespace stylealigned::toy {

namespace {
double ratio(int64_t num, int64_t den) {
  return den == 0 ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(num) / static_cast<double>(den);
}
}  // namespace

double SetReport::object_accuracy() const { return ratio(objects_correct, objects_named); }
double SetReport::style_consistency() const { return ratio(targets_consistent, targets_judged); }

SetReport score_set(const std::string& name, const std::vector<at::Tensor>& images,
                    const std::vector<std::string>& prompts) {
  if (images.size() < 2) {
    throw Error(fmt::format("set '{}': {} image(s); a set needs a reference and at least one target", name,
                            images.size()));
  }
  if (prompts.size() != images.size()) {
    throw Error(fmt::format("set '{}': {} prompts for {} images (one prompt per image)", name, prompts.size(),
                            images.size()));
  }
  SetReport report;
  report.name = name;
  for (size_t i = 0; i < images.size(); ++i) {
    report.asked.push_back(parse_caption(prompts[i]));
    try {
      report.seen.push_back(evaluate(images[i]));
    } catch (const Error& e) {
      throw Error(fmt::format("set '{}', image {}: {}", name, i, e.what()));
    }
  }
  const Attributes& reference = report.seen[0].attributes;
  for (size_t i = 0; i < images.size(); ++i) {
    const ParsedCaption& asked = report.asked[i];
    const AttributeSet mentioned = asked.mentioned();
    const Attributes& seen = report.seen[i].attributes;
    if (asked.object) {
      const bool ok = seen.object == *asked.object;
      report.object_correct.push_back(ok ? 1 : 0);
      ++report.objects_named;
      report.objects_correct += ok ? 1 : 0;
    } else {
      report.object_correct.push_back(-1);
    }
    // The style attributes this prompt leaves to chance (or to the reference).
    const AttributeSet left_out = mentioned.with(Attribute::object).complement();
    if (i == 0 || left_out.empty()) {
      report.style_consistent.push_back(-1);
      continue;
    }
    const bool consistent = same(seen, reference, left_out);
    report.style_consistent.push_back(consistent ? 1 : 0);
    ++report.targets_judged;
    report.targets_consistent += consistent ? 1 : 0;
  }
  return report;
}

}  // namespace stylealigned::toy
