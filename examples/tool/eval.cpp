// `stylealigned eval`: the paper's evaluation (CLIP text alignment, DINO set consistency) and, for sets of the
// embedded toy model, the toy world's exact evaluators (object accuracy, set style consistency), over the output
// folders of `generate` / `transfer` or any folder of PNG/JPEG images.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "internal/atomic_file.h"
#include "stylealigned/error.h"
#include "stylealigned/eval/metrics.h"
#include "stylealigned/image.h"
#include "stylealigned/toy/model.h"
#include "stylealigned/toy/scoring.h"
#include "tool/commands.h"
#include "tool/output.h"

namespace sa_tool {
namespace fs = std::filesystem;
using stylealigned::Error;
using Json = nlohmann::ordered_json;

void add_eval_options(CLI::App& cmd, EvalOptions& o) {
  cmd.add_option("--set", o.sets, "A set: an output folder of generate/transfer (settings.json gives the prompts) or "
                                  "any folder of images, the reference first in name order; repeat for more sets")
      ->required();
  cmd.add_option("--clip", o.clip, "CLIPModel folder (Hugging Face layout) for text alignment");
  cmd.add_option("--dino", o.dino, "ViTModel folder (e.g. facebook/dino-vitb8) for set consistency");
  cmd.add_flag("--toy", o.toy,
               "Score with the toy world's evaluators (object accuracy, style consistency); automatic for sets "
               "made by the embedded toy model");
  cmd.add_option("--prompts", o.prompts_file,
                 "Text file, one prompt per line: the text each image is scored against (for CLIP the object text, "
                 "e.g. 'a toy train'). As many lines as one set's images (used for every set) or as all sets' "
                 "images together. Default: the prompts in each set's settings.json");
  cmd.add_option("--json", o.json_out, "Also write the scores as JSON to this file ('-': print JSON instead of the table)");
  cmd.add_flag("--force", o.force, "Overwrite an existing --json file");
  cmd.add_option("--batch-size", o.batch_size, "Images per CLIP/DINO forward pass")->check(CLI::PositiveNumber);
}

namespace {

bool is_image(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg";
}

struct SetInput {
  std::string name;                 // the folder as given
  std::vector<fs::path> images;     // in name order, grid.png excluded
  std::vector<std::string> prompts;  // from settings.json; empty when none
  bool toy_model = false;           // settings.json names a model folder marked as the embedded toy model
};

// The prompts of a generate/transfer output folder, one per image. generate: the prompts as given; transfer: the
// reference caption, then the target prompts (without the style text, which is shared by all targets).
std::vector<std::string> prompts_from_settings(const Json& s, const fs::path& file) {
  auto strings = [&](const char* key) {
    std::vector<std::string> out;
    if (!s.contains(key) || !s[key].is_array()) return out;
    for (const auto& v : s[key]) {
      if (!v.is_string()) throw Error(fmt::format("{}: '{}' must be a list of strings", file.string(), key));
      out.push_back(v.get<std::string>());
    }
    return out;
  };
  if (s.value("command", "") == "transfer") {
    std::vector<std::string> out{s.value("reference_caption", "")};
    for (auto& p : strings("target_prompts")) out.push_back(p);
    return out;
  }
  return strings("prompts");
}

bool model_is_toy(const Json& s) {
  return s.contains("model") && s["model"].is_string() &&
         stylealigned::toy::is_toy_model_folder(s["model"].get<std::string>());
}

SetInput read_set(const std::string& folder) {
  SetInput set;
  set.name = folder;
  const fs::path dir(folder);
  if (!fs::is_directory(dir)) throw Error(fmt::format("--set {}: not a folder", folder));
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file() || !is_image(e.path())) continue;
    if (e.path().stem() == "grid") continue;  // generate's contact sheet, not a member of the set
    set.images.push_back(e.path());
  }
  std::sort(set.images.begin(), set.images.end());
  if (set.images.size() < 2) {
    throw Error(fmt::format("--set {}: {} image(s) found; a set needs at least two (reference first)", folder,
                            set.images.size()));
  }
  const fs::path settings = dir / "settings.json";
  if (fs::exists(settings)) {
    std::ifstream in(settings);
    Json s = Json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (s.is_discarded() || !s.is_object()) throw Error(fmt::format("{}: not a JSON object", settings.string()));
    set.prompts = prompts_from_settings(s, settings);
    set.toy_model = model_is_toy(s);
    if (!set.prompts.empty() && set.prompts.size() != set.images.size()) {
      throw Error(fmt::format("{}: {} prompts for {} images in the folder", settings.string(), set.prompts.size(),
                              set.images.size()));
    }
  }
  return set;
}

std::vector<std::string> read_lines(const fs::path& file) {
  std::ifstream in(file);
  if (!in) throw Error(fmt::format("--prompts {}: cannot read the file", file.string()));
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (!line.empty()) lines.push_back(line);
  }
  return lines;
}

std::string fixed(double v, int digits = 3) { return std::isnan(v) ? "-" : fmt::format("{:.{}f}", v, digits); }
Json number(double v) { return std::isnan(v) ? Json(nullptr) : Json(v); }

// Never replaces a user's file without --force; the write itself is the library's write-then-rename.
void write_json(const fs::path& path, const std::string& text, bool force) {
  if (fs::exists(path) && !force) {
    throw UsageError(fmt::format("--json {}: exists (use --force to overwrite)", path.string()));
  }
  stylealigned::internal::write_file_atomic(path, text);
}

}  // namespace

int run_eval(const EvalOptions& o) {
  std::vector<SetInput> sets;
  for (const auto& s : o.sets) sets.push_back(read_set(s));
  const bool any_toy = std::any_of(sets.begin(), sets.end(), [](const SetInput& s) { return s.toy_model; });
  const bool toy = o.toy || any_toy;
  if (o.clip.empty() && o.dino.empty() && !toy) {
    throw UsageError("nothing to score with: give --clip and/or --dino (or --toy for the toy world's evaluators)");
  }

  // Prompts: --prompts overrides settings.json.
  if (!o.prompts_file.empty()) {
    const std::vector<std::string> lines = read_lines(o.prompts_file);
    size_t total = 0;
    for (const auto& s : sets) total += s.images.size();
    size_t offset = 0;
    for (auto& s : sets) {
      if (lines.size() == s.images.size()) {
        s.prompts = lines;
      } else if (lines.size() == total) {
        s.prompts.assign(lines.begin() + static_cast<std::ptrdiff_t>(offset),
                         lines.begin() + static_cast<std::ptrdiff_t>(offset + s.images.size()));
      } else {
        throw Error(fmt::format("--prompts {}: {} lines, but set {} has {} images and all sets {} (give one or the "
                                "other)",
                                o.prompts_file, lines.size(), s.name, s.images.size(), total));
      }
      offset += s.images.size();
    }
  }
  const bool need_prompts = !o.clip.empty() || toy;
  if (need_prompts) {
    for (const auto& s : sets) {
      if (s.prompts.empty()) {
        throw Error(fmt::format("--set {}: no prompts (no settings.json with prompts there); give --prompts", s.name));
      }
    }
  }

  namespace ev = stylealigned::eval;
  ev::ScorerOptions scorer_options;
  scorer_options.batch_size = o.batch_size;
  std::optional<ev::TextAlignmentScorer> clip;
  std::optional<ev::SetConsistencyScorer> dino;
  if (!o.clip.empty()) clip = ev::TextAlignmentScorer::from_folder(o.clip, scorer_options);
  if (!o.dino.empty()) dino = ev::SetConsistencyScorer::from_folder(o.dino, scorer_options);

  Json out;
  out["sets"] = Json::array();
  std::vector<double> alignment, consistency, object_accuracy, style_consistency;
  int64_t objects_named = 0, objects_correct = 0, targets_judged = 0, targets_consistent = 0;
  std::string table;
  table += fmt::format("{:<32} {:>6} {:>10} {:>11} {:>10} {:>10}\n", "set", "images", "text_align", "consistency",
                       "toy_object", "toy_style");
  for (const auto& s : sets) {
    std::vector<at::Tensor> images;
    for (const auto& p : s.images) images.push_back(stylealigned::image::read_rgb(p));
    Json js;
    js["set"] = s.name;
    js["images"] = Json::array();
    for (const auto& p : s.images) js["images"].push_back(p.filename().string());
    if (!s.prompts.empty()) js["prompts"] = s.prompts;
    double mean_alignment = NAN, set_consistency = NAN, toy_object = NAN, toy_style = NAN;
    if (clip) {
      const std::vector<double> per_image = clip->score(images, s.prompts);
      mean_alignment = 0;
      for (double v : per_image) mean_alignment += v / static_cast<double>(per_image.size());
      js["text_alignment"] = per_image;
      js["mean_text_alignment"] = mean_alignment;
      alignment.push_back(mean_alignment);
    }
    if (dino) {
      set_consistency = dino->score(images);
      js["set_consistency"] = set_consistency;
      consistency.push_back(set_consistency);
    }
    if (toy) {
      const auto report = stylealigned::toy::score_set(s.name, images, s.prompts);
      toy_object = report.object_accuracy();
      toy_style = report.style_consistency();
      Json t;
      t["object_correct"] = report.object_correct;
      t["style_consistent"] = report.style_consistent;
      t["seen"] = Json::array();
      for (const auto& e : report.seen) {
        Json seen;
        for (auto a : stylealigned::toy::kAllAttributes) {
          seen[std::string(stylealigned::toy::attribute_name(a))] =
              std::string(stylealigned::toy::value_name(a, e.attributes.get(a)));
        }
        t["seen"].push_back(seen);
      }
      t["object_accuracy"] = number(toy_object);
      t["style_consistency"] = number(toy_style);
      js["toy"] = t;
      objects_named += report.objects_named;
      objects_correct += report.objects_correct;
      targets_judged += report.targets_judged;
      targets_consistent += report.targets_consistent;
      if (!std::isnan(toy_object)) object_accuracy.push_back(toy_object);
      if (!std::isnan(toy_style)) style_consistency.push_back(toy_style);
    }
    out["sets"].push_back(js);
    std::string name = s.name.size() > 32 ? "..." + s.name.substr(s.name.size() - 29) : s.name;
    table += fmt::format("{:<32} {:>6} {:>10} {:>11} {:>10} {:>10}\n", name, images.size(), fixed(mean_alignment),
                         fixed(set_consistency), fixed(toy_object, 2), fixed(toy_style, 2));
  }

  // Over sets: mean and population std of the per-set values (each set counts once), as the paper reports.
  Json summary;
  auto add = [&](const char* key, const std::vector<double>& values) -> std::string {
    if (values.empty()) return "-";
    const ev::MeanStd m = ev::mean_std(values);
    summary[key] = {{"mean", m.mean}, {"std", m.std}, {"sets", m.count}};
    return fmt::format("{:.3f} +- {:.3f}", m.mean, m.std);
  };
  const std::string a = add("text_alignment", alignment);
  const std::string c = add("set_consistency", consistency);
  const std::string ob = add("toy_object_accuracy", object_accuracy);
  const std::string st = add("toy_style_consistency", style_consistency);
  if (toy) {
    summary["toy_pooled"] = {{"objects_named", objects_named},
                             {"objects_correct", objects_correct},
                             {"targets_judged", targets_judged},
                             {"targets_consistent", targets_consistent}};
  }
  out["summary"] = summary;
  table += fmt::format("\nover {} set(s), mean +- std:\n", sets.size());
  if (clip) table += fmt::format("  text alignment (CLIP)      {}\n", a);
  if (dino) table += fmt::format("  set consistency (DINO)     {}\n", c);
  if (toy) {
    table += fmt::format("  toy object accuracy        {}   ({} of {} images)\n", ob, objects_correct, objects_named);
    table += fmt::format("  toy style consistency      {}   ({} of {} targets)\n", st, targets_consistent,
                         targets_judged);
  }

  const std::string json_text = out.dump(2) + "\n";
  if (o.json_out == "-") {
    fmt::print("{}", json_text);
  } else {
    fmt::print("{}", table);
    if (!o.json_out.empty()) write_json(o.json_out, json_text, o.force);
  }
  return 0;
}

}  // namespace sa_tool
