// Typed, error-reporting access to a diffusers config.json (used by the UNet and VAE configs).
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "stylealigned/error.h"

namespace stylealigned::models::cfg {

/// A parsed config object. Every accessor returns the given default when the key is absent or null (diffusers'
/// behaviour for keys an older writer did not know), and throws stylealigned::Error naming the source and key when
/// the value has the wrong type.
class JsonConfig {
 public:
  JsonConfig(std::string_view text, std::string_view source) : source_(source) {
    try {
      json_ = nlohmann::json::parse(text.begin(), text.end());
    } catch (const nlohmann::json::exception& e) {
      throw Error(fmt::format("{}: not valid JSON ({})", source_, e.what()));
    }
    if (!json_.is_object()) throw Error(fmt::format("{}: expected a JSON object at the top level", source_));
  }

  const std::string& source() const { return source_; }
  bool has(const std::string& key) const { return json_.contains(key) && !json_.at(key).is_null(); }
  /// Present and explicitly null (which, unlike absence, can mean "this part is switched off").
  bool is_null(const std::string& key) const { return json_.contains(key) && json_.at(key).is_null(); }
  std::string text(const std::string& key) const { return json_.contains(key) ? json_.at(key).dump() : "(absent)"; }

  [[noreturn]] void fail(const std::string& key, std::string_view why) const {
    throw Error(fmt::format("{}: key '{}' = {}: {}", source_, key, text(key), why));
  }

  int64_t get_int(const std::string& key, int64_t fallback) const {
    if (!has(key)) return fallback;
    return as_int(key, json_.at(key));
  }

  double get_double(const std::string& key, double fallback) const {
    if (!has(key)) return fallback;
    const auto& v = json_.at(key);
    if (!v.is_number()) fail(key, "expected a number");
    return v.get<double>();
  }

  bool get_bool(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    const auto& v = json_.at(key);
    if (!v.is_boolean()) fail(key, "expected true or false");
    return v.get<bool>();
  }

  std::string get_string(const std::string& key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const auto& v = json_.at(key);
    if (!v.is_string()) fail(key, "expected a string");
    return v.get<std::string>();
  }

  /// An int (returned as a one-element list) or a list of ints.
  std::vector<int64_t> get_int_list(const std::string& key, const std::vector<int64_t>& fallback) const {
    if (!has(key)) return fallback;
    const auto& v = json_.at(key);
    if (v.is_array()) {
      std::vector<int64_t> out;
      for (const auto& item : v) out.push_back(as_int(key, item));
      return out;
    }
    return {as_int(key, v)};
  }

  std::vector<std::string> get_string_list(const std::string& key, const std::vector<std::string>& fallback) const {
    if (!has(key)) return fallback;
    const auto& v = json_.at(key);
    if (!v.is_array()) fail(key, "expected a list of strings");
    std::vector<std::string> out;
    for (const auto& item : v) {
      if (!item.is_string()) fail(key, "expected a list of strings");
      out.push_back(item.get<std::string>());
    }
    return out;
  }

  const nlohmann::json& raw(const std::string& key) const { return json_.at(key); }

  /// Throws unless the key is absent, null, or equal to one of the accepted values (our implementation's limits).
  void require(const std::string& key, std::initializer_list<nlohmann::json> accepted) const {
    if (!has(key)) return;
    for (const auto& a : accepted) {
      if (json_.at(key) == a) return;
    }
    std::string list;
    for (const auto& a : accepted) list += (list.empty() ? "" : ", ") + a.dump();
    fail(key, fmt::format("not supported (supported: {})", list.empty() ? "null" : list));
  }

 private:
  int64_t as_int(const std::string& key, const nlohmann::json& v) const {
    if (v.is_number_integer()) return v.get<int64_t>();
    // JSON writers sometimes emit 2.0 for an integer field.
    if (v.is_number_float() && v.get<double>() == static_cast<double>(static_cast<int64_t>(v.get<double>()))) {
      return static_cast<int64_t>(v.get<double>());
    }
    fail(key, "expected an integer");
  }

  std::string source_;
  nlohmann::json json_;
};

}  // namespace stylealigned::models::cfg
