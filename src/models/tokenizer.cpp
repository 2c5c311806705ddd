// The CLIP BPE tokenizer. The recipe (DECISIONS.md, "Tokenizer (issue 3)") is transformers' slow CLIPTokenizer
// without ftfy: added tokens are split off the raw text first; every other segment goes through BasicTokenizer's
// cleaning (control characters dropped, whitespace to spaces, CJK ideographs spaced out, NFC, full lower-casing of
// each whitespace-separated piece), then CLIP's pre-tokenisation pattern, then byte-level BPE per pattern match.
#include "stylealigned/models/tokenizer.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/ustring.h>
#include <unicode/uchar.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unicode/unistr.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstring>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <utility>

#include "stylealigned/error.h"
#include "models/clip_pretokenizer.h"
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

std::string read_file(const fs::path& path, std::string_view what) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw Error(fmt::format("{}: cannot read the {} (missing or unreadable)", path.string(), what));
  // One allocation of the file's size (a stringstream would grow and copy it).
  const std::streamoff size = in.tellg();
  std::string text(size > 0 ? static_cast<size_t>(size) : 0, '\0');
  in.seekg(0);
  if (size < 0 || !in.read(text.data(), static_cast<std::streamsize>(text.size()))) {
    throw Error(fmt::format("{}: error while reading the {}", path.string(), what));
  }
  return text;
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
// The BPE model: vocab.json and merges.txt in compact, immutable form. Every token's bytes sit in one buffer in id
// order; token -> id and (left id, right id) -> merge rank are open-addressing tables of 32-bit indices into flat
// arrays. About 2 MB for CLIP's 49408 tokens and 48894 merges, against 8-9 MB for node-based hash maps of
// std::string, and every array is allocated once at its final size (no growth, no transient copies left behind
// in the heap). Tokenizers loaded from identical bytes (SDXL's tokenizer and tokenizer_2) share one model.

namespace {

// MurmurHash3's 64-bit finaliser: spreads every input bit over the word.
uint64_t mix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ULL;
  h ^= h >> 33;
  return h;
}

uint64_t hash_token(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a: tokens are a few bytes long
  for (char c : s) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ULL;
  return mix64(h);
}

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// An open-addressing table of int32 entries (-1: empty), at most two thirds full, linear probing. It stores only
// indices; the caller's arrays hold the keys, so a probe compares through them.
class IndexTable {
 public:
  explicit IndexTable(size_t entries = 0) : slots_(entries + entries / 2 + 1, -1) {}
  // First slot to probe for `hash`: the high half of the hash scaled to the capacity (no power-of-two rounding).
  size_t start(uint64_t hash) const { return static_cast<size_t>(((hash >> 32) * slots_.size()) >> 32); }
  size_t next(size_t slot) const { return slot + 1 == slots_.size() ? 0 : slot + 1; }
  int32_t& operator[](size_t slot) { return slots_[slot]; }
  int32_t operator[](size_t slot) const { return slots_[slot]; }

 private:
  std::vector<int32_t> slots_;
};

// 128 bits of a file's bytes: two multiply-rotate lanes over 8-byte words. Not cryptographic; it tells identical
// files apart from different ones (the only question the model cache asks) with a negligible chance of error.
struct ContentHash {
  uint64_t a = 0x9e3779b97f4a7c15ULL, b = 0xc2b2ae3d27d4eb4fULL;
  uint64_t size = 0;
  friend bool operator==(const ContentHash& x, const ContentHash& y) {
    return x.a == y.a && x.b == y.b && x.size == y.size;
  }
};

ContentHash hash_content(std::string_view bytes) {
  auto rotl = [](uint64_t x, int r) { return (x << r) | (x >> (64 - r)); };
  ContentHash h;
  h.size = bytes.size();
  size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, bytes.data() + i, 8);
    h.a = rotl(h.a ^ (w * 0x87c37b91114253d5ULL), 31) * 0x4cf5ad432745937fULL;
    h.b = rotl(h.b ^ (w * 0x52dce729ULL), 27) * 0x9e3779b97f4a7c15ULL + 0x38495ab5ULL;
  }
  uint64_t tail = 0;
  if (i < bytes.size()) std::memcpy(&tail, bytes.data() + i, bytes.size() - i);
  h.a = mix64(h.a ^ tail ^ bytes.size());
  h.b = mix64(h.b ^ rotl(tail, 17) ^ (bytes.size() * 0x9e3779b97f4a7c15ULL));
  return h;
}

// A file's bytes, memory-mapped read-only: the pages belong to the page cache and leave this process when the
// mapping closes, where a heap copy would leave its freed megabytes in the allocator for the rest of the load.
class FileBytes {
 public:
  FileBytes(const fs::path& path, std::string_view what) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error(fmt::format("{}: cannot read the {} (missing or unreadable)", path.string(), what));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw Error(fmt::format("{}: cannot read the {} (not a regular file)", path.string(), what));
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      map_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (map_ == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        throw Error(fmt::format("{}: cannot map the {} ({})", path.string(), what, std::strerror(err)));
      }
    }
    ::close(fd);
  }
  ~FileBytes() {
    if (map_ != nullptr) ::munmap(map_, size_);
  }
  FileBytes(const FileBytes&) = delete;
  FileBytes& operator=(const FileBytes&) = delete;
  std::string_view view() const { return {static_cast<const char*>(map_), size_}; }

 private:
  void* map_ = nullptr;
  size_t size_ = 0;
};

// vocab.json: one flat JSON object {"token": id, ...}. A dedicated parser rather than nlohmann-json (whose DOM
// would hold a node and a std::string per token): it reads straight from the mapped file and hands each member to
// the caller, decoding a key only when it has escapes.
class VocabParser {
 public:
  VocabParser(std::string_view text, const fs::path& path) : text_(text), path_(path) {}

  // Calls member(token, id) for every member in file order; `token` is valid during the call only.
  template <typename Member>
  void parse(Member&& member) {
    pos_ = text_.compare(0, 3, "\xEF\xBB\xBF") == 0 ? 3 : 0;  // a UTF-8 byte order mark, as nlohmann accepts
    skip_space();
    if (peek() != '{') fail("expected an object of token -> id");
    ++pos_;
    skip_space();
    if (peek() == '}') {
      ++pos_;
    } else {
      for (;;) {
        skip_space();
        if (peek() != '"') invalid("expected a string key");
        const std::string_view key = read_string();
        skip_space();
        if (peek() != ':') invalid("expected ':'");
        ++pos_;
        skip_space();
        member(key, read_id(key));
        skip_space();
        const char c = peek();
        ++pos_;
        if (c == '}') break;
        if (c != ',') invalid("expected ',' or '}'");
      }
    }
    skip_space();
    if (pos_ != text_.size()) invalid("unexpected content after the object");
  }

  [[noreturn]] void fail(const std::string& message) const {
    throw Error(fmt::format("{}: {}", path_.string(), message));
  }

 private:
  char peek() const {
    if (pos_ >= text_.size()) invalid("unexpected end of file");
    return text_[pos_];
  }
  void skip_space() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\n' || text_[pos_] == '\r' || text_[pos_] == '\t')) {
      ++pos_;
    }
  }
  [[noreturn]] void invalid(std::string_view what) const {
    fail(fmt::format("invalid JSON at byte {}: {}", pos_, what));
  }
  unsigned hex4() {
    if (pos_ + 4 > text_.size()) invalid("truncated \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k, ++pos_) {
      const char c = text_[pos_];
      v <<= 4;
      if (c >= '0' && c <= '9') {
        v |= static_cast<unsigned>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        v |= static_cast<unsigned>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        v |= static_cast<unsigned>(c - 'A' + 10);
      } else {
        invalid("bad \\u escape");
      }
    }
    return v;
  }
  // The string at pos_ (its opening quote), decoded: a view of the file when it has no escapes (CLIP's vocab.json
  // writes non-ASCII as UTF-8), else of a scratch buffer.
  std::string_view read_string() {
    const size_t begin = ++pos_;
    while (pos_ < text_.size() && text_[pos_] != '"' && text_[pos_] != '\\' &&
           static_cast<unsigned char>(text_[pos_]) >= 0x20) {
      ++pos_;
    }
    if (pos_ < text_.size() && text_[pos_] == '"') {
      const std::string_view plain = text_.substr(begin, pos_ - begin);
      ++pos_;
      if (size_t bad = first_invalid_utf8(plain); bad != std::string_view::npos) {
        pos_ = begin + bad;
        invalid("invalid UTF-8 in a string");
      }
      return plain;
    }
    scratch_.assign(text_.substr(begin, pos_ - begin));
    for (;;) {
      const char c = peek();
      ++pos_;
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) {
        --pos_;
        invalid("control character in a string");
      }
      if (c != '\\') {
        scratch_ += c;
        continue;
      }
      const char e = peek();
      ++pos_;
      switch (e) {
        case '"':
        case '\\':
        case '/':
          scratch_ += e;
          break;
        case 'b':
          scratch_ += '\b';
          break;
        case 'f':
          scratch_ += '\f';
          break;
        case 'n':
          scratch_ += '\n';
          break;
        case 'r':
          scratch_ += '\r';
          break;
        case 't':
          scratch_ += '\t';
          break;
        case 'u': {
          char32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (text_.compare(pos_, 2, "\\u") != 0) invalid("unpaired surrogate escape");
            pos_ += 2;
            const char32_t low = hex4();
            if (low < 0xDC00 || low > 0xDFFF) invalid("unpaired surrogate escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            invalid("unpaired surrogate escape");
          }
          append_utf8(scratch_, cp);
          break;
        }
        default:
          --pos_;
          invalid("bad escape");
      }
    }
    if (size_t bad = first_invalid_utf8(scratch_); bad != std::string_view::npos) {
      invalid("invalid UTF-8 in a string");
    }
    return scratch_;
  }
  int32_t read_id(std::string_view key) {
    auto kind_error = [&](std::string_view kind) {
      fail(fmt::format("token '{}' has a {} id; ids are non-negative integers", key, kind));
    };
    const char c = peek();
    if (c == '"') kind_error("string");
    if (c == '{') kind_error("object");
    if (c == '[') kind_error("array");
    if (c == 't' || c == 'f') kind_error("boolean");
    if (c == 'n') kind_error("null");
    const size_t begin = pos_;
    if (c == '-') ++pos_;
    const size_t digits = pos_;
    int64_t value = 0;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      if (value <= INT32_MAX) value = value * 10 + (text_[pos_] - '0');
      ++pos_;
    }
    if (pos_ == digits) invalid("expected a number");
    if (pos_ < text_.size() && (text_[pos_] == '.' || text_[pos_] == 'e' || text_[pos_] == 'E')) {
      kind_error("fractional");
    }
    if (text_[begin] == '-' || value > INT32_MAX) {
      fail(fmt::format("token '{}' has the invalid id {}", key, text_.substr(begin, pos_ - begin)));
    }
    if (text_[digits] == '0' && pos_ - digits > 1) {
      pos_ = digits;
      invalid("a number with a leading zero");
    }
    return static_cast<int32_t>(value);
  }

  std::string_view text_;
  const fs::path& path_;
  size_t pos_ = 0;
  std::string scratch_;  // keys with escapes, decoded
};

// The largest id accepted in vocab.json or as an added token: ids index flat arrays.
constexpr int32_t kMaxTokenId = (1 << 24) - 1;

class BpeModel {
 public:
  BpeModel(std::string_view vocab_text, const fs::path& vocab_path, std::string_view merges_text,
           const fs::path& merges_path) {
    load_vocab(vocab_text, vocab_path);
    load_merges(merges_text, merges_path, vocab_path);
  }

  /// One past the largest id of vocab.json.
  int32_t size() const { return static_cast<int32_t>(offsets_.size()) - 1; }
  /// The token of `id`; empty when no token has it.
  std::string_view token(int64_t id) const {
    if (id < 0 || id >= size()) return {};
    return std::string_view(chars_.data() + offsets_[id], offsets_[id + 1] - offsets_[id]);
  }
  int32_t find(std::string_view token) const {
    for (size_t i = token_slots_.start(hash_token(token));; i = token_slots_.next(i)) {
      const int32_t id = token_slots_[i];
      if (id < 0 || this->token(id) == token) return id;
    }
  }
  /// The byte a symbol of the byte table stands for, or -1.
  int32_t byte_of_symbol(UChar32 c) const {
    return c >= 0 && static_cast<size_t>(c) < symbol_to_byte_.size() ? symbol_to_byte_[c] : -1;
  }
  /// Appends the BPE ids of one pre-tokenised word (its last symbol carrying "</w>"); cached.
  void encode_word(const std::string& word, std::vector<int64_t>& out) const;

 private:
  void load_vocab(std::string_view text, const fs::path& path);
  void load_merges(std::string_view text, const fs::path& path, const fs::path& vocab_path);
  // Rank of the merge of the pair `key`, or -1.
  int32_t merge_rank(uint64_t key) const {
    for (size_t i = merge_slots_.start(mix64(key));; i = merge_slots_.next(i)) {
      const int32_t rank = merge_slots_[i];
      if (rank < 0 || merge_pairs_[rank] == key) return rank;
    }
  }
  std::vector<int32_t> bpe(const std::string& word) const;

  std::string chars_;               // every token's bytes, in id order
  std::vector<uint32_t> offsets_;   // token id's bytes are chars_[offsets_[id], offsets_[id + 1]); empty: no token
  IndexTable token_slots_;          // ids
  std::vector<uint64_t> merge_pairs_;  // by rank: left id << 32 | right id
  std::vector<int32_t> merge_ids_;     // by rank: id of the merged symbol
  IndexTable merge_slots_;             // ranks
  std::array<int32_t, 256> byte_id_{};         // id of the symbol of each byte
  std::array<int32_t, 256> byte_end_id_{};     // ... with "</w>" (last byte of a word)
  std::array<int16_t, 512> symbol_to_byte_{};  // inverse of the byte table, by code point; -1 elsewhere

  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;  // word -> ids
};

void BpeModel::load_vocab(std::string_view text, const fs::path& path) {
  // Two passes over the mapped file, so every array is allocated once at its final size: the first finds each id's
  // token length (and every error), the second copies the tokens into place.
  VocabParser parser(text, path);
  std::vector<uint32_t> lengths;  // by id, becomes offsets_
  size_t count = 0, total = 0;
  auto first_token_with = [&](int32_t wanted) {  // for the error message only: parse once more
    std::string found;
    parser.parse([&](std::string_view key, int32_t id) {
      if (id == wanted && found.empty()) found = key;
    });
    return found;
  };
  parser.parse([&](std::string_view key, int32_t id) {
    if (key.empty()) parser.fail(fmt::format("an empty token (id {})", id));
    if (id > kMaxTokenId) {
      parser.fail(fmt::format("token '{}' has the id {}; ids above {} are not supported", key, id, kMaxTokenId));
    }
    if (static_cast<size_t>(id) >= lengths.size()) lengths.resize(static_cast<size_t>(id) + 1, 0);
    if (lengths[id] != 0) {
      parser.fail(fmt::format("tokens '{}' and '{}' share the id {}", first_token_with(id), key, id));
    }
    lengths[id] = static_cast<uint32_t>(key.size());
    ++count;
    total += key.size();
  });
  if (count == 0) parser.fail("the vocabulary is empty");
  if (total > UINT32_MAX) parser.fail("the vocabulary is too large");

  offsets_.reserve(lengths.size() + 1);
  offsets_.push_back(0);
  for (uint32_t length : lengths) offsets_.push_back(offsets_.back() + length);
  lengths = {};
  chars_.resize(total);
  parser.parse([&](std::string_view key, int32_t id) { key.copy(chars_.data() + offsets_[id], key.size()); });

  token_slots_ = IndexTable(count);
  for (int32_t id = 0; id < size(); ++id) {
    const std::string_view t = token(id);
    if (t.empty()) continue;
    size_t i = token_slots_.start(hash_token(t));
    for (; token_slots_[i] >= 0; i = token_slots_.next(i)) {
      if (token(token_slots_[i]) == t) parser.fail(fmt::format("token '{}' appears twice", t));
    }
    token_slots_[i] = id;
  }

  auto table = byte_to_unicode();
  symbol_to_byte_.fill(-1);
  std::string symbol;
  for (int b = 0; b < 256; ++b) {
    symbol.clear();
    append_utf8(symbol, table[b]);
    byte_id_[b] = find(symbol);
    byte_end_id_[b] = find(symbol + "</w>");
    if (byte_id_[b] < 0 || byte_end_id_[b] < 0) {
      parser.fail(fmt::format("not a byte-level BPE vocabulary: the symbol '{}' of byte 0x{:02x} (or '{}</w>') is "
                              "missing",
                              symbol, b, symbol));
    }
    symbol_to_byte_[table[b]] = static_cast<int16_t>(b);
  }
}

void BpeModel::load_merges(std::string_view text, const fs::path& path, const fs::path& vocab_path) {
  const size_t lines = static_cast<size_t>(std::count(text.begin(), text.end(), '\n')) + 1;
  merge_pairs_.reserve(std::min(lines, kMaxMerges));
  merge_ids_.reserve(std::min(lines, kMaxMerges));
  std::string_view rest(text);
  size_t line_no = 0;
  std::string joined;
  while (!rest.empty() && merge_pairs_.size() < kMaxMerges) {
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
    const int32_t a = find(left);
    const int32_t b = find(right);
    joined.assign(left).append(right);  // one reused buffer: no allocation per line
    const int32_t merged = find(joined);
    if (a < 0 || b < 0 || merged < 0) {
      std::string missing = a < 0 ? std::string(left) : std::string(right);
      if (a >= 0 && b >= 0) missing = joined;
      throw Error(fmt::format("{}:{}: merge '{} {}' refers to '{}', which is not in {}", path.string(), line_no, left,
                              right, missing, vocab_path.string()));
    }
    merge_pairs_.push_back(pair_key(a, b));
    merge_ids_.push_back(merged);
  }
  if (merge_pairs_.empty()) throw Error(fmt::format("{}: no merges", path.string()));

  merge_slots_ = IndexTable(merge_pairs_.size());
  for (int32_t rank = 0; rank < static_cast<int32_t>(merge_pairs_.size()); ++rank) {
    const uint64_t key = merge_pairs_[rank];
    size_t i = merge_slots_.start(mix64(key));
    while (merge_slots_[i] >= 0 && merge_pairs_[merge_slots_[i]] != key) i = merge_slots_.next(i);
    merge_slots_[i] = rank;  // a repeated pair takes its last rank, as transformers' dict does
  }
}

void BpeModel::encode_word(const std::string& word, std::vector<int64_t>& out) const {
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (auto it = cache_.find(word); it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids = bpe(word);
  out.insert(out.end(), ids.begin(), ids.end());
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (cache_.size() >= kMaxCacheEntries) cache_.clear();
  cache_.emplace(word, std::move(ids));
}

std::vector<int32_t> BpeModel::bpe(const std::string& word) const {
  // Symbols are vocabulary ids: one per byte, the last one carrying "</w>". Repeatedly merge every occurrence
  // (left to right) of the adjacent pair with the lowest rank until no pair has a rank.
  std::vector<int32_t> symbols(word.size());
  for (size_t i = 0; i < word.size(); ++i) {
    auto b = static_cast<unsigned char>(word[i]);
    symbols[i] = i + 1 == word.size() ? byte_end_id_[b] : byte_id_[b];
  }
  std::vector<int32_t> next;
  while (symbols.size() > 1) {
    int32_t best = -1;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      const int32_t rank = merge_rank(pair_key(symbols[i], symbols[i + 1]));
      if (rank >= 0 && (best < 0 || rank < best)) best = rank;
    }
    if (best < 0) break;
    const auto left = static_cast<int32_t>(merge_pairs_[best] >> 32);
    const auto right = static_cast<int32_t>(merge_pairs_[best] & 0xFFFFFFFFu);
    next.clear();
    for (size_t i = 0; i < symbols.size();) {
      if (i + 1 < symbols.size() && symbols[i] == left && symbols[i + 1] == right) {
        next.push_back(merge_ids_[best]);
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

// Process-wide: the models alive now, by the content of their two files. Holding weak references, it keeps no model
// alive by itself; a second tokenizer of the same bytes (SDXL's tokenizer_2) reuses the first one's model.
std::shared_ptr<const BpeModel> shared_model(const fs::path& vocab_path, const fs::path& merges_path) {
  struct Entry {
    ContentHash vocab, merges;
    std::weak_ptr<const BpeModel> model;
  };
  static std::mutex mutex;
  static std::vector<Entry> entries;
  const FileBytes vocab(vocab_path, "vocabulary");
  const FileBytes merges(merges_path, "BPE merge list");
  const ContentHash vocab_hash = hash_content(vocab.view()), merges_hash = hash_content(merges.view());
  auto find = [&]() -> std::shared_ptr<const BpeModel> {
    for (const auto& e : entries) {
      if (e.vocab == vocab_hash && e.merges == merges_hash) {
        if (auto model = e.model.lock()) return model;
      }
    }
    return nullptr;
  };
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (auto model = find()) return model;
  }
  // Parsed outside the lock: loading another tokenizer in parallel need not wait.
  auto model = std::make_shared<const BpeModel>(vocab.view(), vocab_path, merges.view(), merges_path);
  std::lock_guard<std::mutex> lock(mutex);
  if (auto other = find()) return other;  // another thread parsed the same files meanwhile
  entries.erase(std::remove_if(entries.begin(), entries.end(), [](const Entry& e) { return e.model.expired(); }),
                entries.end());
  entries.push_back(Entry{vocab_hash, merges_hash, model});
  return model;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------------
// Pre-tokenisation (see clip_pretokenizer.h)

namespace {

bool has_category(UChar32 c, uint32_t mask) { return (U_GET_GC_MASK(c) & mask) != 0; }

// Membership of the case-insensitive classes [\p{L}] and [\p{N}]: the character or its case folding is in the class.
bool is_letter_ci(UChar32 c) {
  return has_category(c, U_GC_L_MASK) || has_category(u_foldCase(c, U_FOLD_CASE_DEFAULT), U_GC_L_MASK);
}
bool is_number_ci(UChar32 c) {
  return has_category(c, U_GC_N_MASK) || has_category(u_foldCase(c, U_FOLD_CASE_DEFAULT), U_GC_N_MASK);
}

// UTF-16 length of the case-insensitive match of the lower-case ASCII `literal` at text[pos], or 0: each character
// of the text, fully case-folded, must continue the literal, and the literal must end at a character boundary.
int32_t match_literal(const icu::UnicodeString& text, int32_t pos, std::string_view literal) {
  int32_t i = pos;
  size_t k = 0;
  while (k < literal.size()) {
    if (i >= text.length()) return 0;
    const UChar32 c = text.char32At(i);
    UChar unit[2];
    int32_t length = 0;
    U16_APPEND_UNSAFE(unit, length, c);
    UChar folded[8];  // a full case folding is at most three code points
    UErrorCode status = U_ZERO_ERROR;
    const int32_t folded_length = u_strFoldCase(folded, 8, unit, length, U_FOLD_CASE_DEFAULT, &status);
    if (U_FAILURE(status) || static_cast<size_t>(folded_length) > literal.size() - k) return 0;
    for (int32_t j = 0; j < folded_length; ++j) {
      if (folded[j] != static_cast<UChar>(static_cast<unsigned char>(literal[k + j]))) return 0;
    }
    k += static_cast<size_t>(folded_length);
    i += length;
  }
  return i - pos;
}

}  // namespace

namespace detail {

std::vector<std::pair<int32_t, int32_t>> clip_pretokenize(const icu::UnicodeString& text) {
  // The pattern's alternatives in its order: at each position the first that matches wins.
  static constexpr std::string_view kLiterals[] = {"<|startoftext|>", "<|endoftext|>", "'s", "'t", "'re",
                                                   "'ve",             "'m",            "'ll", "'d"};
  std::vector<std::pair<int32_t, int32_t>> matches;
  const int32_t n = text.length();
  auto next = [&](int32_t i) { return i + U16_LENGTH(text.char32At(i)); };
  for (int32_t pos = 0; pos < n;) {
    int32_t end = pos;
    for (std::string_view literal : kLiterals) {
      if (const int32_t length = match_literal(text, pos, literal); length > 0) {
        end = pos + length;
        break;
      }
    }
    if (end == pos) {
      const UChar32 c = text.char32At(pos);
      end = next(pos);
      if (is_letter_ci(c)) {  // [\p{L}]+
        while (end < n && is_letter_ci(text.char32At(end))) end = next(end);
      } else if (is_number_ci(c)) {  // [\p{N}]
      } else if (!u_isUWhiteSpace(c)) {  // [^\s\p{L}\p{N}]+
        while (end < n) {
          const UChar32 d = text.char32At(end);
          if (u_isUWhiteSpace(d) || is_letter_ci(d) || is_number_ci(d)) break;
          end = next(end);
        }
      } else {  // \s: no alternative matches here
        pos = end;
        continue;
      }
    }
    matches.emplace_back(pos, end);
    pos = end;
  }
  return matches;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------------------------------
// Tokenizer state

struct ClipTokenizer::Impl {
  TokenizerSettings settings;
  fs::path vocab_path;
  std::shared_ptr<const BpeModel> model;  // shared with every tokenizer of the same files

  std::vector<std::pair<std::string, int32_t>> added;  // matched before normalisation, longest first
  std::vector<bool> is_special;                        // by id: skipped by decode(skip_special_tokens)
  int32_t vocab_size = 0;                              // the model's, or one past the largest added id
  int32_t bos = 0, eos = 0, pad = 0, unk = 0;
  int32_t startoftext = -1, endoftext = -1;  // the pattern's two literal specials

  const icu::Normalizer2* nfc = nullptr;

  void resolve_specials();
  void init_unicode();

  // Added tokens first: they may extend the vocabulary (and agree with it where both have them).
  int32_t id_of(std::string_view token) const {
    if (auto it = settings.added_tokens.find(std::string(token)); it != settings.added_tokens.end()) {
      return static_cast<int32_t>(it->second);
    }
    return model->find(token);
  }
  std::string_view token_of(int64_t id) const {
    std::string_view t = model->token(id);
    if (!t.empty()) return t;
    for (const auto& [content, added_id] : settings.added_tokens) {
      if (added_id == id) return content;
    }
    return {};
  }
  std::vector<int64_t> tokenize(std::string_view text, std::string_view context) const;
  void tokenize_segment(std::string_view segment, std::vector<int64_t>& out) const;
  void bpe_word(const std::string& word, std::vector<int64_t>& out) const;
};

void ClipTokenizer::Impl::resolve_specials() {
  // Added tokens get their listed ids (they may extend the vocabulary); every special token must have an id.
  vocab_size = model->size();
  for (const auto& [content, id] : settings.added_tokens) {
    if (content.empty()) throw Error(fmt::format("{}: an added token is empty", vocab_path.string()));
    if (id < 0 || id > kMaxTokenId) {
      throw Error(fmt::format("{}: added token '{}' has the unsupported id {}", vocab_path.string(), content, id));
    }
    const int32_t in_vocab = model->find(content);
    if (in_vocab >= 0 && in_vocab != id) {
      throw Error(fmt::format("{}: added token '{}' has id {} but the vocabulary gives it {}", vocab_path.string(),
                              content, id, in_vocab));
    }
    const std::string_view taken = model->token(id);
    if (!taken.empty() && taken != content) {
      throw Error(fmt::format("{}: added token '{}' takes id {}, which is '{}' in the vocabulary", vocab_path.string(),
                              content, id, taken));
    }
    for (const auto& [other, other_id] : settings.added_tokens) {
      if (other_id == id && other != content) {
        throw Error(fmt::format("{}: added tokens '{}' and '{}' share the id {}", vocab_path.string(), other, content,
                                id));
      }
    }
    vocab_size = std::max(vocab_size, static_cast<int32_t>(id) + 1);
  }
  auto special_id = [&](const std::string& content, std::string_view key) {
    int32_t id = content.empty() ? -1 : id_of(content);
    if (id < 0) {
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
  is_special.assign(static_cast<size_t>(vocab_size), false);
  for (const auto& [content, id] : added) is_special[id] = true;
}

void ClipTokenizer::Impl::init_unicode() {
  UErrorCode status = U_ZERO_ERROR;
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

  std::string word;
  for (const auto& [begin, end] : detail::clip_pretokenize(joined)) {
    word.clear();
    joined.tempSubStringBetween(begin, end).toUTF8String(word);
    bpe_word(word, out);
  }
}

void ClipTokenizer::Impl::bpe_word(const std::string& word, std::vector<int64_t>& out) const {
  // The pattern's literal specials (also reached by "<|EndOfText|>" after lower-casing) are whole tokens.
  if (word == "<|startoftext|>" || word == "<|endoftext|>") {
    int32_t id = word[2] == 's' ? startoftext : endoftext;
    out.push_back(id >= 0 ? id : unk);
    return;
  }
  model->encode_word(word, out);
}

// ---------------------------------------------------------------------------------------------------------------------
// Public API

ClipTokenizer::ClipTokenizer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

ClipTokenizer ClipTokenizer::from_files(const std::filesystem::path& vocab_json,
                                        const std::filesystem::path& merges_txt, const TokenizerSettings& settings) {
  auto impl = std::make_shared<Impl>();
  impl->settings = settings;
  impl->vocab_path = vocab_json;
  impl->model = shared_model(vocab_json, merges_txt);
  impl->resolve_specials();
  impl->init_unicode();
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
    const std::string text = token(id);
    if (skip_special_tokens && impl.is_special[id]) continue;
    // Symbols of the byte table become their bytes; anything else (an added token's text) is kept as UTF-8.
    icu::UnicodeString symbols =
        icu::UnicodeString::fromUTF8(icu::StringPiece(text.data(), static_cast<int32_t>(text.size())));
    for (int32_t i = 0; i < symbols.length();) {
      UChar32 c = symbols.char32At(i);
      i += U16_LENGTH(c);
      if (const int32_t byte = impl.model->byte_of_symbol(c); byte >= 0) {
        bytes += static_cast<char>(byte);
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

std::string ClipTokenizer::token(int64_t id) const {
  const std::string_view text = impl_->token_of(id);
  if (text.empty()) {
    throw Error(fmt::format("ClipTokenizer: unknown token id {} (vocabulary of {} from {})", id, impl_->vocab_size,
                            impl_->vocab_path.string()));
  }
  return std::string(text);
}

std::optional<int64_t> ClipTokenizer::token_id(std::string_view token) const {
  int32_t id = impl_->id_of(token);
  if (id < 0) return std::nullopt;
  return id;
}

int64_t ClipTokenizer::bos_id() const { return impl_->bos; }
int64_t ClipTokenizer::eos_id() const { return impl_->eos; }
int64_t ClipTokenizer::pad_id() const { return impl_->pad; }
int64_t ClipTokenizer::unk_id() const { return impl_->unk; }
int64_t ClipTokenizer::max_length() const { return impl_->settings.model_max_length; }
int64_t ClipTokenizer::vocab_size() const { return impl_->vocab_size; }
const TokenizerSettings& ClipTokenizer::settings() const { return impl_->settings; }

}  // namespace stylealigned::models
