// The CLIP BPE tokenizer. The recipe (DECISIONS.md, "Tokenizer (issue 3)") is transformers' slow CLIPTokenizer
// without ftfy: added tokens are split off the raw text first; every other segment goes through BasicTokenizer's
// cleaning (control characters dropped, whitespace to spaces, CJK ideographs spaced out, NFC, full lower-casing of
// each whitespace-separated piece), then CLIP's pre-tokenisation pattern, then byte-level BPE per pattern match.
#include "stylealigned/models/tokenizer.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>

#include <algorithm>
#include <array>
#include <climits>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "stylealigned/error.h"
#include "stylealigned/log.h"

namespace stylealigned::models {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// transformers reads only this many merges of merges.txt (49152 BPE tokens - 256 bytes - 2 specials), whatever the
// file holds; the vocabulary has exactly the symbols they produce.
constexpr size_t kMaxMerges = 49152 - 256 - 2;
// Bounds the per-word BPE cache of a long-running host; prompts repeat few distinct words, so this is rarely hit.
constexpr size_t kMaxCacheEntries = size_t{1} << 16;

// CLIP's pre-tokenisation pattern, applied case-insensitively to the lower-cased text. \p{L} and \p{N} must be the
// real Unicode classes: ASCII classes break accented and Greek words.
constexpr char16_t kClipPattern[] =
    u"<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+";

std::string read_file(const fs::path& path, std::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(fmt::format("{}: cannot read the {} (missing or unreadable)", path.string(), what));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) throw Error(fmt::format("{}: error while reading the {}", path.string(), what));
  return std::move(buffer).str();
}

json parse_json_file(const fs::path& path, std::string_view what) {
  std::string text = read_file(path, what);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: invalid JSON: {}", path.string(), e.what()));
  }
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Byte offset of the first byte that is not part of well-formed UTF-8 (no overlongs, surrogates or values above
// U+10FFFF), or npos.
size_t first_invalid_utf8(std::string_view s) {
  size_t i = 0;
  const size_t n = s.size();
  auto cont = [&](size_t k, unsigned lo = 0x80, unsigned hi = 0xBF) {
    if (k >= n) return false;
    auto b = static_cast<unsigned char>(s[k]);
    return b >= lo && b <= hi;
  };
  while (i < n) {
    auto b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) {
      i += 1;
    } else if (b >= 0xC2 && b <= 0xDF) {
      if (!cont(i + 1)) return i;
      i += 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
      unsigned lo = b == 0xE0 ? 0xA0 : 0x80;
      unsigned hi = b == 0xED ? 0x9F : 0xBF;
      if (!cont(i + 1, lo, hi) || !cont(i + 2)) return i;
      i += 3;
    } else if (b >= 0xF0 && b <= 0xF4) {
      unsigned lo = b == 0xF0 ? 0x90 : 0x80;
      unsigned hi = b == 0xF4 ? 0x8F : 0xBF;
      if (!cont(i + 1, lo, hi) || !cont(i + 2) || !cont(i + 3)) return i;
      i += 4;
    } else {
      return i;
    }
  }
  return std::string_view::npos;
}

// GPT-2's byte-to-symbol table: printable Latin-1 bytes stand for themselves, the other 68 bytes are moved to
// U+0100.. in byte order, so every byte is a visible vocabulary character.
std::array<char32_t, 256> byte_to_unicode() {
  std::array<char32_t, 256> table{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    table[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return table;
}

// BasicTokenizer._is_control: categories C* except tab, newline and carriage return (which are whitespace).
bool is_control(UChar32 c) {
  if (c == '\t' || c == '\n' || c == '\r') return false;
  switch (u_charType(c)) {
    case U_CONTROL_CHAR:
    case U_FORMAT_CHAR:
    case U_PRIVATE_USE_CHAR:
    case U_SURROGATE:
    case U_UNASSIGNED:
      return true;
    default:
      return false;
  }
}

// BasicTokenizer._is_whitespace.
bool is_bert_whitespace(UChar32 c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || u_charType(c) == U_SPACE_SEPARATOR;
}

// Python's str.isspace(), which str.split() uses after normalisation (it adds U+2028/U+2029 and a few controls
// to the whitespace above).
bool is_python_space(UChar32 c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// BasicTokenizer._is_chinese_char: the CJK Unified Ideographs blocks, their extensions and the compatibility
// ideographs (not kana or hangul).
bool is_cjk_ideograph(UChar32 c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

// A special-token value of a tokenizer config: "text" or {"content": "text", ...}; null means "not set".
std::optional<std::string> token_content(const json& value, const fs::path& file, const std::string& key) {
  if (value.is_null()) return std::nullopt;
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string()) {
    return value["content"].get<std::string>();
  }
  throw Error(fmt::format("{}: '{}' must be a string or an object with a string \"content\"", file.string(), key));
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  size_t pos = 0;
  while ((pos = s.find(from, pos)) != std::string::npos) {
    s.replace(pos, from.size(), to);
    pos += to.size();
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------------
// Settings

TokenizerSettings TokenizerSettings::from_folder(const std::filesystem::path& folder) {
  TokenizerSettings settings;
  static const char* const kTokenKeys[] = {"bos_token", "eos_token", "unk_token", "pad_token"};
  std::string* targets[] = {&settings.bos_token, &settings.eos_token, &settings.unk_token, &settings.pad_token};

  auto apply = [&](const fs::path& file) {
    std::error_code ec;
    if (!fs::exists(file, ec)) return;
    json j = parse_json_file(file, "tokenizer settings");
    if (!j.is_object()) throw Error(fmt::format("{}: expected a JSON object", file.string()));
    for (size_t k = 0; k < 4; ++k) {
      if (auto it = j.find(kTokenKeys[k]); it != j.end()) {
        if (auto content = token_content(*it, file, kTokenKeys[k])) *targets[k] = *content;
      }
    }
    if (auto it = j.find("additional_special_tokens"); it != j.end() && !it->is_null()) {
      if (!it->is_array()) {
        throw Error(fmt::format("{}: 'additional_special_tokens' must be an array", file.string()));
      }
      for (const auto& token : *it) {
        if (auto content = token_content(token, file, "additional_special_tokens")) {
          if (std::find(settings.additional_special_tokens.begin(), settings.additional_special_tokens.end(),
                        *content) == settings.additional_special_tokens.end()) {
            settings.additional_special_tokens.push_back(*content);
          }
        }
      }
    }
    if (auto it = j.find("model_max_length"); it != j.end() && !it->is_null()) {
      if (it->is_number_integer() && it->get<int64_t>() >= 2 && it->get<int64_t>() <= (int64_t{1} << 20)) {
        settings.model_max_length = it->get<int64_t>();
      } else if (it->is_number() && !(it->is_number_integer() && it->get<int64_t>() < 2)) {
        // transformers writes 1e30 ("no limit") into configs that never set one; CLIP cannot take more than 77.
        warn(fmt::format("{}: model_max_length {} is not a usable length; using {}", file.string(), it->dump(),
                         settings.model_max_length));
      } else {
        throw Error(
            fmt::format("{}: 'model_max_length' must be an integer of at least 2, got {}", file.string(), it->dump()));
      }
    }
    if (auto it = j.find("clean_up_tokenization_spaces"); it != j.end() && !it->is_null()) {
      if (!it->is_boolean()) {
        throw Error(fmt::format("{}: 'clean_up_tokenization_spaces' must be true or false", file.string()));
      }
      settings.clean_up_tokenization_spaces = it->get<bool>();
    }
    if (auto it = j.find("added_tokens_decoder"); it != j.end() && !it->is_null()) {
      if (!it->is_object()) throw Error(fmt::format("{}: 'added_tokens_decoder' must be an object", file.string()));
      for (const auto& [id_text, token] : it->items()) {
        int64_t id = -1;
        try {
          size_t used = 0;
          id = std::stoll(id_text, &used);
          if (used != id_text.size() || id < 0) id = -1;
        } catch (const std::exception&) {
          id = -1;
        }
        if (id < 0 || id > INT32_MAX) {
          throw Error(fmt::format("{}: added_tokens_decoder key '{}' is not a token id", file.string(), id_text));
        }
        auto content = token_content(token, file, "added_tokens_decoder." + id_text);
        if (content) settings.added_tokens[*content] = id;
      }
    }
  };
  // As in transformers, special_tokens_map.json overrides tokenizer_config.json.
  apply(folder / "tokenizer_config.json");
  apply(folder / "special_tokens_map.json");
  return settings;
}

// ---------------------------------------------------------------------------------------------------------------------
// Tokenizer state

struct ClipTokenizer::Impl {
  TokenizerSettings settings;
  fs::path vocab_path;

  std::unordered_map<std::string, int32_t> vocab;  // vocab.json and added tokens
  std::vector<std::string> id_to_token;            // empty string for ids nobody uses
  std::array<int32_t, 256> byte_id{};              // id of the symbol of each byte
  std::array<int32_t, 256> byte_end_id{};          // ... with "</w>" (last byte of a word)
  std::vector<int16_t> symbol_to_byte;             // inverse of the byte table, by code point; -1 elsewhere

  struct Merge {
    int32_t rank;
    int32_t merged;
  };
  std::unordered_map<uint64_t, Merge> merges;  // (left id << 32 | right id) -> rank and id of the merged symbol

  std::vector<std::pair<std::string, int32_t>> added;  // matched before normalisation, longest first
  std::vector<bool> is_special;                        // by id: skipped by decode(skip_special_tokens)
  int32_t bos = 0, eos = 0, pad = 0, unk = 0;
  int32_t startoftext = -1, endoftext = -1;  // the pattern's two literal specials

  std::unique_ptr<icu::RegexPattern> pattern;
  const icu::Normalizer2* nfc = nullptr;

  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  void load_vocab(const fs::path& path);
  void load_merges(const fs::path& path);
  void resolve_specials();
  void compile_pattern();

  int32_t id_of(const std::string& token) const {
    auto it = vocab.find(token);
    return it == vocab.end() ? -1 : it->second;
  }
  std::vector<int64_t> tokenize(std::string_view text, std::string_view context) const;
  void tokenize_segment(std::string_view segment, std::vector<int64_t>& out) const;
  void bpe_word(const std::string& word, std::vector<int64_t>& out) const;
  std::vector<int32_t> bpe(const std::string& word) const;
};

void ClipTokenizer::Impl::load_vocab(const fs::path& path) {
  vocab_path = path;
  std::string text = read_file(path, "vocabulary");
  // SAX parsing straight into the hash map: building a json object first doubles the load time.
  struct Handler : nlohmann::json_sax<json> {
    Impl& impl;
    const fs::path& path;
    int depth = 0;
    std::string current_key;
    std::string error;
    Handler(Impl& i, const fs::path& p) : impl(i), path(p) {}
    bool fail(std::string message) {
      error = std::move(message);
      return false;
    }
    bool add(int64_t id) {
      if (depth != 1) return fail("expected an object of token -> id");
      if (id < 0 || id > INT32_MAX) return fail(fmt::format("token '{}' has the invalid id {}", current_key, id));
      auto [it, inserted] = impl.vocab.emplace(std::move(current_key), static_cast<int32_t>(id));
      if (!inserted) return fail(fmt::format("token '{}' appears twice", it->first));
      if (static_cast<size_t>(id) >= impl.id_to_token.size()) impl.id_to_token.resize(id + 1);
      if (!impl.id_to_token[id].empty()) {
        return fail(fmt::format("tokens '{}' and '{}' share the id {}", impl.id_to_token[id], it->first, id));
      }
      impl.id_to_token[id] = it->first;
      return true;
    }
    bool value_error(std::string_view kind) {
      return fail(depth == 1 ? fmt::format("token '{}' has a {} id; ids are non-negative integers", current_key, kind)
                             : std::string("expected an object of token -> id"));
    }
    bool null() override { return value_error("null"); }
    bool boolean(bool) override { return value_error("boolean"); }
    bool number_integer(number_integer_t v) override { return add(v); }
    bool number_unsigned(number_unsigned_t v) override {
      return add(v > static_cast<number_unsigned_t>(INT64_MAX) ? -1 : static_cast<int64_t>(v));
    }
    bool number_float(number_float_t, const string_t&) override { return value_error("fractional"); }
    bool string(string_t&) override { return value_error("string"); }
    bool binary(binary_t&) override { return value_error("binary"); }
    bool start_object(std::size_t) override { return ++depth == 1 || value_error("object"); }
    bool key(string_t& k) override {
      current_key = std::move(k);
      return true;
    }
    bool end_object() override {
      --depth;
      return true;
    }
    bool start_array(std::size_t) override { return value_error("array"); }
    bool end_array() override { return true; }
    bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& e) override {
      return fail(fmt::format("invalid JSON at byte {}: {}", position, e.what()));
    }
  };
  Handler handler(*this, path);
  vocab.reserve(1 << 16);
  bool ok = json::sax_parse(text, &handler);
  if (!ok || !handler.error.empty()) {
    throw Error(fmt::format("{}: {}", path.string(), handler.error.empty() ? "invalid JSON" : handler.error));
  }
  if (vocab.empty()) throw Error(fmt::format("{}: the vocabulary is empty", path.string()));

  auto table = byte_to_unicode();
  symbol_to_byte.assign(512, -1);
  for (int b = 0; b < 256; ++b) {
    std::string symbol;
    append_utf8(symbol, table[b]);
    byte_id[b] = id_of(symbol);
    byte_end_id[b] = id_of(symbol + "</w>");
    if (byte_id[b] < 0 || byte_end_id[b] < 0) {
      throw Error(
          fmt::format("{}: not a byte-level BPE vocabulary: the symbol '{}' of byte 0x{:02x} (or '{}</w>') is "
                      "missing",
                      path.string(), symbol, b, symbol));
    }
    symbol_to_byte[table[b]] = static_cast<int16_t>(b);
  }
}

void ClipTokenizer::Impl::load_merges(const fs::path& path) {
  std::string text = read_file(path, "BPE merge list");
  merges.reserve(kMaxMerges * 2);
  std::string_view rest(text);
  size_t line_no = 0;
  int32_t rank = 0;
  std::string lookup;
  while (!rest.empty() && static_cast<size_t>(rank) < kMaxMerges) {
    size_t eol = rest.find('\n');
    std::string_view line = rest.substr(0, eol);
    rest = eol == std::string_view::npos ? std::string_view() : rest.substr(eol + 1);
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line_no == 1 && line.rfind("#version", 0) == 0) continue;
    if (line.find_first_not_of(" \t") == std::string_view::npos) continue;

    // Exactly two symbols separated by blanks.
    const char* const kBlank = " \t";
    size_t a_begin = line.find_first_not_of(kBlank);
    size_t a_end = line.find_first_of(kBlank, a_begin);
    size_t b_begin = line.find_first_not_of(kBlank, a_end);
    size_t b_end = b_begin == std::string_view::npos ? b_begin : line.find_first_of(kBlank, b_begin);
    if (b_begin == std::string_view::npos ||
        (b_end != std::string_view::npos && line.find_first_not_of(kBlank, b_end) != std::string_view::npos)) {
      throw Error(
          fmt::format("{}:{}: expected two symbols separated by a space, got '{}'", path.string(), line_no, line));
    }
    std::string_view left = line.substr(a_begin, a_end - a_begin);
    std::string_view right = line.substr(b_begin, b_end == std::string_view::npos ? b_end : b_end - b_begin);
    // One reused buffer for the lookups: allocating three strings per line made loading ten times slower.
    lookup.assign(left);
    const int32_t a = id_of(lookup);
    lookup.append(right);
    const int32_t merged = id_of(lookup);
    lookup.assign(right);
    const int32_t b = id_of(lookup);
    if (a < 0 || b < 0 || merged < 0) {
      std::string missing = a < 0 ? std::string(left) : std::string(right);
      if (a >= 0 && b >= 0) missing = std::string(left) + missing;
      throw Error(fmt::format("{}:{}: merge '{} {}' refers to '{}', which is not in {}", path.string(), line_no, left,
                              right, missing, vocab_path.string()));
    }
    // A repeated pair takes its last rank, as transformers' dict does.
    merges[(static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b)] = Merge{rank++, merged};
  }
  if (merges.empty()) throw Error(fmt::format("{}: no merges", path.string()));
}

void ClipTokenizer::Impl::resolve_specials() {
  // Added tokens get their listed ids (they may extend the vocabulary); every special token must have an id.
  for (const auto& [content, id] : settings.added_tokens) {
    if (content.empty()) throw Error(fmt::format("{}: an added token is empty", vocab_path.string()));
    auto it = vocab.find(content);
    if (it != vocab.end() && it->second != id) {
      throw Error(fmt::format("{}: added token '{}' has id {} but the vocabulary gives it {}", vocab_path.string(),
                              content, id, it->second));
    }
    if (static_cast<size_t>(id) >= id_to_token.size()) id_to_token.resize(id + 1);
    if (!id_to_token[id].empty() && id_to_token[id] != content) {
      throw Error(fmt::format("{}: added token '{}' takes id {}, which is '{}' in the vocabulary", vocab_path.string(),
                              content, id, id_to_token[id]));
    }
    id_to_token[id] = content;
    vocab[content] = static_cast<int32_t>(id);
  }
  auto special_id = [&](const std::string& content, std::string_view key) {
    int32_t id = id_of(content);
    if (id < 0 || content.empty()) {
      throw Error(fmt::format("{}: {} '{}' is neither in the vocabulary nor an added token", vocab_path.string(), key,
                              content));
    }
    return id;
  };
  bos = special_id(settings.bos_token, "bos_token");
  eos = special_id(settings.eos_token, "eos_token");
  unk = special_id(settings.unk_token, "unk_token");
  pad = special_id(settings.pad_token, "pad_token");
  if (settings.model_max_length < 2) {
    throw Error(
        fmt::format("tokenizer settings: model_max_length must be at least 2, got {}", settings.model_max_length));
  }
  startoftext = id_of("<|startoftext|>");
  endoftext = id_of("<|endoftext|>");

  // transformers splits every added token (the specials included) off the raw text before normalising it: that is
  // how SDXL's tokenizer_2, whose pad token is "!", turns each "!" of a prompt into id 0.
  std::map<std::string, int32_t> matched;
  for (const auto& [content, id] : settings.added_tokens) matched[content] = static_cast<int32_t>(id);
  matched[settings.bos_token] = bos;
  matched[settings.eos_token] = eos;
  matched[settings.unk_token] = unk;
  matched[settings.pad_token] = pad;
  for (const auto& token : settings.additional_special_tokens) {
    matched[token] = special_id(token, "additional_special_tokens entry");
  }
  added.assign(matched.begin(), matched.end());
  std::stable_sort(added.begin(), added.end(),
                   [](const auto& x, const auto& y) { return x.first.size() > y.first.size(); });
  is_special.assign(id_to_token.size(), false);
  for (const auto& [content, id] : added) is_special[id] = true;
}

void ClipTokenizer::Impl::compile_pattern() {
  UErrorCode status = U_ZERO_ERROR;
  UParseError parse_error{};
  pattern.reset(
      icu::RegexPattern::compile(icu::UnicodeString(kClipPattern), UREGEX_CASE_INSENSITIVE, parse_error, status));
  if (U_FAILURE(status)) throw Error(fmt::format("ICU: cannot compile CLIP's pattern: {}", u_errorName(status)));
  nfc = icu::Normalizer2::getNFCInstance(status);
  if (U_FAILURE(status)) throw Error(fmt::format("ICU: no NFC normaliser: {}", u_errorName(status)));
}

// ---------------------------------------------------------------------------------------------------------------------
// Encoding

std::vector<int64_t> ClipTokenizer::Impl::tokenize(std::string_view text, std::string_view context) const {
  if (size_t bad = first_invalid_utf8(text); bad != std::string_view::npos) {
    throw Error(fmt::format("ClipTokenizer: {} is not valid UTF-8 at byte {} (0x{:02x})", context, bad,
                            static_cast<unsigned char>(text[bad])));
  }
  std::vector<int64_t> out;
  size_t segment_begin = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const std::pair<std::string, int32_t>* hit = nullptr;
    for (const auto& entry : added) {  // longest first
      if (text.compare(pos, entry.first.size(), entry.first) == 0) {
        hit = &entry;
        break;
      }
    }
    if (hit == nullptr) {
      ++pos;
      continue;
    }
    tokenize_segment(text.substr(segment_begin, pos - segment_begin), out);
    out.push_back(hit->second);
    pos += hit->first.size();
    segment_begin = pos;
  }
  tokenize_segment(text.substr(segment_begin), out);
  return out;
}

void ClipTokenizer::Impl::tokenize_segment(std::string_view segment, std::vector<int64_t>& out) const {
  if (segment.empty()) return;
  const icu::UnicodeString raw =
      icu::UnicodeString::fromUTF8(icu::StringPiece(segment.data(), static_cast<int32_t>(segment.size())));

  // Clean: drop NUL, U+FFFD and control characters; whitespace becomes a space; CJK ideographs stand alone.
  icu::UnicodeString cleaned;
  for (int32_t i = 0; i < raw.length();) {
    UChar32 c = raw.char32At(i);
    i += U16_LENGTH(c);
    if (c == 0 || c == 0xFFFD || is_control(c)) continue;
    if (is_bert_whitespace(c)) {
      cleaned.append(static_cast<UChar>(' '));
    } else if (is_cjk_ideograph(c)) {
      cleaned.append(static_cast<UChar>(' ')).append(c).append(static_cast<UChar>(' '));
    } else {
      cleaned.append(c);
    }
  }

  UErrorCode status = U_ZERO_ERROR;
  const icu::UnicodeString normalized = nfc->normalize(cleaned, status);
  if (U_FAILURE(status)) throw Error(fmt::format("ICU: NFC normalisation failed: {}", u_errorName(status)));

  // Lower-case each whitespace-separated piece with full case mapping (root locale: "İ" -> "i" + U+0307, final
  // sigma by context, as Python's str.lower()), then join with single spaces.
  icu::UnicodeString joined;
  const icu::Locale& root = icu::Locale::getRoot();
  const int32_t n = normalized.length();
  for (int32_t i = 0; i < n;) {
    UChar32 c = normalized.char32At(i);
    if (is_python_space(c)) {
      i += U16_LENGTH(c);
      continue;
    }
    int32_t end = i;
    while (end < n) {
      UChar32 d = normalized.char32At(end);
      if (is_python_space(d)) break;
      end += U16_LENGTH(d);
    }
    icu::UnicodeString piece(normalized, i, end - i);
    piece.toLower(root);
    if (!joined.isEmpty()) joined.append(static_cast<UChar>(' '));
    joined.append(piece);
    i = end;
  }
  if (joined.isEmpty()) return;

  std::unique_ptr<icu::RegexMatcher> matcher(pattern->matcher(joined, status));
  if (U_FAILURE(status)) throw Error(fmt::format("ICU: cannot create a regex matcher: {}", u_errorName(status)));
  std::string word;
  while (matcher->find(status) && U_SUCCESS(status)) {
    icu::UnicodeString match = matcher->group(status);
    word.clear();
    match.toUTF8String(word);
    bpe_word(word, out);
  }
  if (U_FAILURE(status)) throw Error(fmt::format("ICU: regex matching failed: {}", u_errorName(status)));
}

void ClipTokenizer::Impl::bpe_word(const std::string& word, std::vector<int64_t>& out) const {
  // The pattern's literal specials (also reached by "<|EndOfText|>" after lower-casing) are whole tokens.
  if (word == "<|startoftext|>" || word == "<|endoftext|>") {
    int32_t id = word[2] == 's' ? startoftext : endoftext;
    out.push_back(id >= 0 ? id : unk);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (auto it = cache.find(word); it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids = bpe(word);
  out.insert(out.end(), ids.begin(), ids.end());
  std::lock_guard<std::mutex> lock(cache_mutex);
  if (cache.size() >= kMaxCacheEntries) cache.clear();
  cache.emplace(word, std::move(ids));
}

std::vector<int32_t> ClipTokenizer::Impl::bpe(const std::string& word) const {
  // Symbols are vocabulary ids: one per byte, the last one carrying "</w>". Repeatedly merge every occurrence
  // (left to right) of the adjacent pair with the lowest rank until no pair has a rank.
  std::vector<int32_t> symbols(word.size());
  for (size_t i = 0; i < word.size(); ++i) {
    auto b = static_cast<unsigned char>(word[i]);
    symbols[i] = i + 1 == word.size() ? byte_end_id[b] : byte_id[b];
  }
  std::vector<int32_t> next;
  while (symbols.size() > 1) {
    const Merge* best = nullptr;
    uint64_t best_key = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      uint64_t key = (static_cast<uint64_t>(symbols[i]) << 32) | static_cast<uint32_t>(symbols[i + 1]);
      auto it = merges.find(key);
      if (it != merges.end() && (best == nullptr || it->second.rank < best->rank)) {
        best = &it->second;
        best_key = key;
      }
    }
    if (best == nullptr) break;
    const auto left = static_cast<int32_t>(best_key >> 32);
    const auto right = static_cast<int32_t>(best_key & 0xFFFFFFFFu);
    next.clear();
    for (size_t i = 0; i < symbols.size();) {
      if (i + 1 < symbols.size() && symbols[i] == left && symbols[i + 1] == right) {
        next.push_back(best->merged);
        i += 2;
      } else {
        next.push_back(symbols[i]);
        i += 1;
      }
    }
    symbols.swap(next);
  }
  return symbols;
}

// ---------------------------------------------------------------------------------------------------------------------
// Public API

ClipTokenizer::ClipTokenizer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

ClipTokenizer ClipTokenizer::from_files(const std::filesystem::path& vocab_json,
                                        const std::filesystem::path& merges_txt, const TokenizerSettings& settings) {
  auto impl = std::make_shared<Impl>();
  impl->settings = settings;
  impl->load_vocab(vocab_json);
  impl->load_merges(merges_txt);
  impl->resolve_specials();
  impl->compile_pattern();
  return ClipTokenizer(std::move(impl));
}

ClipTokenizer ClipTokenizer::from_folder(const std::filesystem::path& folder) {
  std::error_code ec;
  if (!fs::is_directory(folder, ec)) {
    throw Error(fmt::format("{}: not a tokenizer folder (no such directory)", folder.string()));
  }
  return from_files(folder / "vocab.json", folder / "merges.txt", TokenizerSettings::from_folder(folder));
}

std::vector<int64_t> ClipTokenizer::tokenize(std::string_view text) const { return impl_->tokenize(text, "prompt"); }

std::vector<int64_t> ClipTokenizer::encode(std::string_view text) const {
  std::vector<int64_t> ids = impl_->tokenize(text, "prompt");
  const auto length = static_cast<size_t>(impl_->settings.model_max_length);
  const size_t kept = std::min(ids.size(), length - 2);
  std::vector<int64_t> out;
  out.reserve(length);
  out.push_back(impl_->bos);
  out.insert(out.end(), ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(kept));
  out.push_back(impl_->eos);
  out.resize(length, impl_->pad);
  return out;
}

at::Tensor ClipTokenizer::encode_batch(const std::vector<std::string>& texts) const {
  const int64_t length = impl_->settings.model_max_length;
  at::Tensor batch = at::empty({static_cast<int64_t>(texts.size()), length}, at::kLong);
  int64_t* data = batch.data_ptr<int64_t>();
  for (size_t i = 0; i < texts.size(); ++i) {
    std::vector<int64_t> ids;
    try {
      ids = encode(texts[i]);
    } catch (const Error& e) {
      throw Error(fmt::format("{} (prompt {} of the batch)", e.what(), i));
    }
    std::copy(ids.begin(), ids.end(), data + static_cast<int64_t>(i) * length);
  }
  return batch;
}

std::string ClipTokenizer::decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  const Impl& impl = *impl_;
  std::string bytes;
  for (int64_t id : ids) {
    const std::string& text = token(id);
    if (skip_special_tokens && impl.is_special[id]) continue;
    // Symbols of the byte table become their bytes; anything else (an added token's text) is kept as UTF-8.
    icu::UnicodeString symbols =
        icu::UnicodeString::fromUTF8(icu::StringPiece(text.data(), static_cast<int32_t>(text.size())));
    for (int32_t i = 0; i < symbols.length();) {
      UChar32 c = symbols.char32At(i);
      i += U16_LENGTH(c);
      if (c >= 0 && c < static_cast<UChar32>(impl.symbol_to_byte.size()) && impl.symbol_to_byte[c] >= 0) {
        bytes += static_cast<char>(impl.symbol_to_byte[c]);
      } else {
        append_utf8(bytes, static_cast<char32_t>(c));
      }
    }
  }
  replace_all(bytes, "</w>", " ");
  // Byte sequences cut inside a character decode to U+FFFD (Python's errors="replace").
  std::string text;
  icu::UnicodeString::fromUTF8(icu::StringPiece(bytes.data(), static_cast<int32_t>(bytes.size()))).toUTF8String(text);
  const char* const kSpace = " \t\n\r\f\v";
  size_t begin = text.find_first_not_of(kSpace);
  if (begin == std::string::npos) return {};
  text = text.substr(begin, text.find_last_not_of(kSpace) - begin + 1);
  if (impl.settings.clean_up_tokenization_spaces) {
    // transformers' clean_up_tokenization, in its order.
    static const char* const kCleanUp[][2] = {{" .", "."},     {" ?", "?"},     {" !", "!"},   {" ,", ","},
                                              {" ' ", "'"},    {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"},
                                              {" 've", "'ve"}, {" 're", "'re"}};
    for (const auto& rule : kCleanUp) replace_all(text, rule[0], rule[1]);
  }
  return text;
}

const std::string& ClipTokenizer::token(int64_t id) const {
  const auto& table = impl_->id_to_token;
  if (id < 0 || id >= static_cast<int64_t>(table.size()) || table[id].empty()) {
    throw Error(fmt::format("ClipTokenizer: unknown token id {} (vocabulary of {} from {})", id, table.size(),
                            impl_->vocab_path.string()));
  }
  return table[id];
}

std::optional<int64_t> ClipTokenizer::token_id(std::string_view token) const {
  int32_t id = impl_->id_of(std::string(token));
  if (id < 0) return std::nullopt;
  return id;
}

int64_t ClipTokenizer::bos_id() const { return impl_->bos; }
int64_t ClipTokenizer::eos_id() const { return impl_->eos; }
int64_t ClipTokenizer::pad_id() const { return impl_->pad; }
int64_t ClipTokenizer::unk_id() const { return impl_->unk; }
int64_t ClipTokenizer::max_length() const { return impl_->settings.model_max_length; }
int64_t ClipTokenizer::vocab_size() const { return static_cast<int64_t>(impl_->id_to_token.size()); }
const TokenizerSettings& ClipTokenizer::settings() const { return impl_->settings; }

}  // namespace stylealigned::models
