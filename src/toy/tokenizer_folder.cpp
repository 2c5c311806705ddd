// The embedded model's CLIP tokenizer folder, built from the toy world's words.
//
// Layout of the vocabulary, as CLIP's own: ids 0..255 the byte-level symbols (GPT-2's byte table, printable bytes
// first), 256..511 the same with "</w>", then one token per merge in rank order, then <|startoftext|> and
// <|endoftext|>. The merges are chosen by simulating BPE: for each word, while it still splits into several
// tokens, add a merge of its first two tokens. A new merge ranks after every earlier one, so it never fires inside a
// word that earlier merges already assemble, and every word ends as exactly one token.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "internal/atomic_file.h"
#include "stylealigned/error.h"
#include "stylealigned/toy/model.h"
#include "stylealigned/toy/world.h"

namespace stylealigned::toy {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kBos = "<|startoftext|>";
constexpr const char* kEos = "<|endoftext|>";

// GPT-2 / CLIP byte table, in CLIP's vocabulary order: printable bytes keep their code point, the others move to
// U+0100.. in byte order. Returns (byte, UTF-8 symbol) in id order.
std::vector<std::pair<int, std::string>> byte_symbols() {
  auto utf8 = [](unsigned cp) {
    std::string s;
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else {  // the table stays below U+0800
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    return s;
  };
  std::vector<std::pair<int, std::string>> printable, moved;
  unsigned next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool is_printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    if (is_printable) {
      printable.emplace_back(b, utf8(static_cast<unsigned>(b)));
    } else {
      moved.emplace_back(b, utf8(next++));
    }
  }
  printable.insert(printable.end(), moved.begin(), moved.end());
  return printable;
}

// The pre-tokens CLIP's pattern makes of ASCII text: runs of letters, single digits, runs of other non-space
// characters (lower-cased, as the tokenizer lower-cases prompts).
std::vector<std::string> ascii_pieces(std::string_view text, std::string_view source) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < text.size()) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x80) {
      throw Error(fmt::format("toy tokenizer: the world word '{}' ({}) is not ASCII; the vocabulary builder splits "
                              "ASCII only",
                              text, source));
    }
    if (std::isspace(c)) {
      ++i;
      continue;
    }
    size_t j = i + 1;
    if (std::isalpha(c)) {
      while (j < text.size() && std::isalpha(static_cast<unsigned char>(text[j]))) ++j;
    } else if (!std::isdigit(c)) {
      while (j < text.size()) {
        const auto d = static_cast<unsigned char>(text[j]);
        if (d >= 0x80 || std::isspace(d) || std::isalnum(d)) break;
        ++j;
      }
    }
    std::string piece(text.substr(i, j - i));
    for (char& ch : piece) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    out.push_back(std::move(piece));
    i = j;
  }
  return out;
}

// Every pre-token a toy caption can contain: the caption vocabulary (which tests/test_world.cpp checks against every
// caption the caption code makes) and every attribute value name, so prompts written with the names ("stripes")
// tokenize as well as captions ("striped").
std::vector<std::string> world_words() {
  std::set<std::string> words;
  for (const std::string& w : vocabulary()) {
    for (auto& piece : ascii_pieces(w, "toy::vocabulary()")) words.insert(std::move(piece));
  }
  for (Attribute a : kAllAttributes) {
    for (int v = 0; v < num_values(a); ++v) {
      for (auto& piece : ascii_pieces(value_name(a, v), "toy::value_name()")) words.insert(std::move(piece));
    }
  }
  return {words.begin(), words.end()};
}

struct Vocabulary {
  std::vector<std::string> tokens;  // by id
  std::vector<std::pair<std::string, std::string>> merges;  // by rank
};

// BPE of one pre-token with the merges so far: symbols are strings, the last one carrying "</w>".
std::vector<std::string> bpe(const std::string& word, const std::map<std::pair<std::string, std::string>, size_t>& ranks,
                             const std::map<int, std::string>& symbol_of_byte) {
  std::vector<std::string> s;
  for (size_t i = 0; i < word.size(); ++i) {
    std::string sym = symbol_of_byte.at(static_cast<unsigned char>(word[i]));
    if (i + 1 == word.size()) sym += "</w>";
    s.push_back(std::move(sym));
  }
  while (s.size() > 1) {
    size_t best = SIZE_MAX;
    std::pair<std::string, std::string> best_pair;
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      auto it = ranks.find({s[i], s[i + 1]});
      if (it != ranks.end() && it->second < best) {
        best = it->second;
        best_pair = it->first;
      }
    }
    if (best == SIZE_MAX) break;
    std::vector<std::string> next;
    for (size_t i = 0; i < s.size();) {
      if (i + 1 < s.size() && s[i] == best_pair.first && s[i + 1] == best_pair.second) {
        next.push_back(s[i] + s[i + 1]);
        i += 2;
      } else {
        next.push_back(s[i]);
        i += 1;
      }
    }
    s.swap(next);
  }
  return s;
}

Vocabulary build_vocabulary() {
  Vocabulary v;
  std::map<int, std::string> symbol_of_byte;
  const auto table = byte_symbols();
  for (const auto& [b, sym] : table) {
    symbol_of_byte[b] = sym;
    v.tokens.push_back(sym);
  }
  for (const auto& entry : table) v.tokens.push_back(entry.second + "</w>");
  std::set<std::string> known(v.tokens.begin(), v.tokens.end());
  std::map<std::pair<std::string, std::string>, size_t> ranks;
  for (const std::string& word : world_words()) {
    for (;;) {
      const auto parts = bpe(word, ranks, symbol_of_byte);
      if (parts.size() <= 1) break;
      // parts is a fixed point of the merges so far, so this pair is new.
      ranks.emplace(std::make_pair(parts[0], parts[1]), v.merges.size());
      v.merges.emplace_back(parts[0], parts[1]);
      std::string joined = parts[0] + parts[1];
      if (known.insert(joined).second) v.tokens.push_back(std::move(joined));
    }
  }
  v.tokens.emplace_back(kBos);
  v.tokens.emplace_back(kEos);
  return v;
}

const Vocabulary& vocabulary_once() {
  static const Vocabulary v = build_vocabulary();
  return v;
}

json token_entry(const char* content) {
  return {{"content", content}, {"lstrip", false}, {"normalized", true}, {"rstrip", false}, {"single_word", false}};
}

}  // namespace

int64_t tokenizer_vocab_size() { return static_cast<int64_t>(vocabulary_once().tokens.size()); }
int64_t tokenizer_bos_id() { return tokenizer_vocab_size() - 2; }
int64_t tokenizer_eos_id() { return tokenizer_vocab_size() - 1; }

void write_tokenizer_folder(const fs::path& dir) {
  const Vocabulary& v = vocabulary_once();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir)) {
    throw Error(fmt::format("{}: cannot create the tokenizer folder ({})", dir.string(),
                            ec ? ec.message() : "not a directory"));
  }

  json vocab = json::object();  // keys sorted, as transformers' tokenizers write it
  for (size_t id = 0; id < v.tokens.size(); ++id) vocab[v.tokens[id]] = id;
  internal::write_file_atomic(dir / "vocab.json", vocab.dump(2) + "\n");

  std::string merges = "#version: 0.2\n";
  for (const auto& [a, b] : v.merges) merges += a + " " + b + "\n";
  internal::write_file_atomic(dir / "merges.txt", merges);

  const json special = {{"bos_token", token_entry(kBos)},
                        {"eos_token", token_entry(kEos)},
                        {"pad_token", kEos},
                        {"unk_token", token_entry(kEos)}};
  internal::write_file_atomic(dir / "special_tokens_map.json", special.dump(2) + "\n");

  json added = json::object();
  for (const char* token : {kBos, kEos}) {
    json entry = token_entry(token);
    entry["special"] = true;
    const int64_t id = token == kBos ? tokenizer_bos_id() : tokenizer_eos_id();
    added[std::to_string(id)] = std::move(entry);
  }
  const json config = {{"added_tokens_decoder", added},
                       {"bos_token", kBos},
                       {"clean_up_tokenization_spaces", true},
                       {"eos_token", kEos},
                       {"errors", "replace"},
                       {"model_max_length", 77},
                       {"pad_token", kEos},
                       {"tokenizer_class", "CLIPTokenizer"},
                       {"unk_token", kEos}};
  internal::write_file_atomic(dir / "tokenizer_config.json", config.dump(2) + "\n");
}

}  // namespace stylealigned::toy
