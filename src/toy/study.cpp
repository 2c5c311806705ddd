#include "stylealigned/toy/study.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "internal/splitmix.h"
#include "stylealigned/error.h"

namespace stylealigned::toy {
namespace {

using internal::splitmix64;

double mean_of(const std::vector<double>& v) {
  double sum = 0;
  int64_t n = 0;
  for (double x : v) {
    if (std::isfinite(x)) {
      sum += x;
      ++n;
    }
  }
  return n > 0 ? sum / static_cast<double>(n) : std::nan("");
}

}  // namespace

std::vector<StudySet> study_sets(int64_t count, int64_t images, uint64_t seed) {
  const int objects = num_values(Attribute::object), patterns = num_values(Attribute::pattern);
  if (count < 1) throw Error(fmt::format("study_sets: count must be >= 1, got {}", count));
  if (images < 2 || images > objects) {
    throw Error(fmt::format("study_sets: images per set must be in [2, {}] (one object each), got {}", objects, images));
  }
  std::vector<StudySet> sets;
  sets.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    std::mt19937_64 rng(splitmix64(splitmix64(seed) ^ static_cast<uint64_t>(i)));
    std::vector<int> order(static_cast<size_t>(objects));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    StudySet set;
    set.seed = rng() % 1000000007ull;
    for (int64_t k = 0; k < images; ++k) {
      Attributes a;
      a.object = static_cast<Object>(order[static_cast<size_t>(k)]);
      a.pattern = static_cast<Pattern>(static_cast<int>(rng() % static_cast<uint64_t>(patterns)));
      set.prompts.push_back(caption(a, AttributeSet{Attribute::pattern}));
    }
    sets.push_back(std::move(set));
  }
  return sets;
}

std::vector<double> ArmResult::consistency() const {
  std::vector<double> out;
  for (const auto& r : reports) out.push_back(r.style_consistency());
  return out;
}

std::vector<double> ArmResult::target_object_accuracy() const {
  std::vector<double> out;
  for (const auto& r : reports) {
    int64_t named = 0, correct = 0;
    for (size_t i = 1; i < r.object_correct.size(); ++i) {
      if (r.object_correct[i] < 0) continue;
      ++named;
      correct += r.object_correct[i];
    }
    out.push_back(named > 0 ? static_cast<double>(correct) / static_cast<double>(named) : std::nan(""));
  }
  return out;
}

double ArmResult::object_accuracy() const {
  int64_t named = 0, correct = 0;
  for (const auto& r : reports) {
    named += r.objects_named;
    correct += r.objects_correct;
  }
  return named > 0 ? static_cast<double>(correct) / static_cast<double>(named) : std::nan("");
}

double ArmResult::mean_target_object_accuracy() const { return mean_of(target_object_accuracy()); }
double ArmResult::mean_consistency() const { return mean_of(consistency()); }

std::vector<ArmResult> run_study(Pipeline& pipeline, const std::vector<StudySet>& sets,
                                 const std::vector<StudyArm>& arms, const StudyOptions& options) {
  if (sets.empty() || arms.empty()) throw Error("run_study: needs at least one set and one arm");
  std::vector<ArmResult> results(arms.size());
  for (size_t a = 0; a < arms.size(); ++a) results[a].name = arms[a].name;
  if (options.sets_per_batch < 1) {
    throw Error(fmt::format("run_study: sets_per_batch must be positive (got {})", options.sets_per_batch));
  }
  const size_t chunk = static_cast<size_t>(options.sets_per_batch);
  // Chunks of sets outer, arms inner: a cancelled or partial study still compares the arms on (nearly) the same sets.
  for (size_t first = 0; first < sets.size(); first += chunk) {
    const size_t last = std::min(sets.size(), first + chunk);
    for (size_t a = 0; a < arms.size(); ++a) {
      std::vector<GenerationRequest> requests(last - first);
      for (size_t s = first; s < last; ++s) {
        GenerationRequest& request = requests[s - first];
        request.prompts = sets[s].prompts;
        request.steps = options.steps;
        request.seed = sets[s].seed;
        request.guidance_scale = options.guidance_scale;
        request.style_aligned = arms[a].style;
      }
      const std::vector<GenerationResult> outs = pipeline.generate_batch(requests);
      for (size_t s = first; s < last; ++s) {
        const at::Tensor rgb = outs[s - first]
                                   .images.mul(255.0)
                                   .round_()
                                   .clamp_(0, 255)
                                   .to(at::kByte)
                                   .permute({0, 2, 3, 1})
                                   .contiguous();
        std::vector<at::Tensor> images;
        for (int64_t i = 0; i < rgb.size(0); ++i) images.push_back(rgb[i]);
        results[a].reports.push_back(
            score_set(fmt::format("{}/set-{}", arms[a].name, s), images, sets[s].prompts));
        if (options.keep_images) results[a].images.push_back(rgb);
        if (options.on_set && !options.on_set(a, s)) throw Cancelled();
      }
    }
  }
  return results;
}

PairedDifference paired_bootstrap(const std::vector<double>& a, const std::vector<double>& b, int64_t resamples,
                                  uint64_t seed) {
  if (a.size() != b.size()) {
    throw Error(fmt::format("paired_bootstrap: {} and {} samples are not pairs", a.size(), b.size()));
  }
  std::vector<double> d;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isfinite(a[i]) && std::isfinite(b[i])) d.push_back(a[i] - b[i]);
  }
  if (d.empty()) throw Error("paired_bootstrap: no pair with both values defined");
  if (resamples < 100) throw Error(fmt::format("paired_bootstrap: resamples must be >= 100, got {}", resamples));
  PairedDifference out;
  out.pairs = static_cast<int64_t>(d.size());
  out.mean = mean_of(d);
  std::mt19937_64 rng(splitmix64(seed));
  std::uniform_int_distribution<size_t> pick(0, d.size() - 1);
  std::vector<double> means(static_cast<size_t>(resamples));
  for (auto& m : means) {
    double sum = 0;
    for (size_t i = 0; i < d.size(); ++i) sum += d[pick(rng)];
    m = sum / static_cast<double>(d.size());
  }
  std::sort(means.begin(), means.end());
  auto quantile = [&](double q) {
    const double pos = q * static_cast<double>(means.size() - 1);
    const auto lo = static_cast<size_t>(std::floor(pos));
    const size_t hi = std::min(lo + 1, means.size() - 1);
    return means[lo] + (pos - static_cast<double>(lo)) * (means[hi] - means[lo]);
  };
  out.low = quantile(0.025);
  out.high = quantile(0.975);
  return out;
}

PairedDifference bootstrap_mean(const std::vector<double>& a, int64_t resamples, uint64_t seed) {
  return paired_bootstrap(a, std::vector<double>(a.size(), 0.0), resamples, seed);
}

std::vector<StudyArm> standard_arms(const StyleAlignedOptions& defaults) {
  StyleAlignedOptions no_adain = defaults;
  no_adain.adain_queries = no_adain.adain_keys = no_adain.adain_values = false;
  StyleAlignedOptions full_share = defaults;
  full_share.full_attention_share = true;
  StyleAlignedOptions shared_gn = defaults;
  shared_gn.share_group_norm = true;
  return {{"vanilla", std::nullopt},
          {"style_aligned", defaults},
          {"sdxl_demo", StyleAlignedOptions::sdxl_demo()},
          {"no_adain", no_adain},
          {"full_attention_share", full_share},
          {"shared_group_norm", shared_gn}};
}

}  // namespace stylealigned::toy
