// Reading transformers config.json files for the evaluation models: typed fields with errors that name the file and
// the (possibly nested) key.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "stylealigned/error.h"

namespace stylealigned::models::config_reading {

inline void expect_folder(const std::filesystem::path& folder, const char* what) {
  if (!std::filesystem::is_directory(folder)) {
    throw Error(fmt::format("{}: no such {} model folder (expected config.json and model.safetensors inside)",
                            folder.string(), what));
  }
}

inline nlohmann::json read_json_object(const std::filesystem::path& file, const char* what) {
  std::ifstream in(file);
  if (!in) throw Error(fmt::format("{}: cannot open the {}", file.string(), what));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: invalid JSON: {}", file.string(), e.what()));
  }
  if (!j.is_object()) throw Error(fmt::format("{}: expected a JSON object", file.string()));
  return j;
}

/// A config.json names its architecture in `model_type`; loading weights into the wrong class would fail later with
/// a list of tensor names, so say what is wrong up front. A missing model_type is accepted.
inline void expect_model_type(const nlohmann::json& j, const std::filesystem::path& file, const char* expected,
                              const char* what) {
  auto it = j.find("model_type");
  if (it == j.end() || it->is_null()) return;
  if (!it->is_string() || it->get<std::string>() != expected) {
    throw Error(
        fmt::format("{}: model_type {} is not {} (expected \"{}\")", file.string(), it->dump(), what, expected));
  }
}

/// Typed reads of optional keys of one JSON object; `prefix` ("vision_config.") only changes messages.
struct Fields {
  const std::filesystem::path& file;
  const nlohmann::json& j;
  std::string prefix;

  const nlohmann::json* find(const char* key) const {
    auto it = j.find(key);
    return (it == j.end() || it->is_null()) ? nullptr : &*it;
  }
  [[noreturn]] void fail(const char* key, const char* expected, const nlohmann::json& v) const {
    throw Error(fmt::format("{}: '{}{}' must be {}, got {}", file.string(), prefix, key, expected, v.dump()));
  }
  void read(const char* key, int64_t& out) const {
    if (const auto* v = find(key)) {
      if (!v->is_number_integer()) fail(key, "an integer", *v);
      out = v->get<int64_t>();
    }
  }
  void read(const char* key, double& out) const {
    if (const auto* v = find(key)) {
      if (!v->is_number()) fail(key, "a number", *v);
      out = v->get<double>();
    }
  }
  void read(const char* key, bool& out) const {
    if (const auto* v = find(key)) {
      if (!v->is_boolean()) fail(key, "true or false", *v);
      out = v->get<bool>();
    }
  }
  void read(const char* key, std::string& out) const {
    if (const auto* v = find(key)) {
      if (!v->is_string()) fail(key, "a string", *v);
      out = v->get<std::string>();
    }
  }
};

}  // namespace stylealigned::models::config_reading
