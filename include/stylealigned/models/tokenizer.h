// stylealigned/models/tokenizer.h: the CLIP byte-level BPE tokenizer of SD1.5 and SDXL folders.
//
// Reads a transformers `CLIPTokenizer` folder (vocab.json, merges.txt, special_tokens_map.json,
// tokenizer_config.json) and gives the ids transformers gives for `tokenizer(prompt, padding="max_length",
// max_length=77, truncation=True)`, the call diffusers' pipelines make, exactly: Unicode prompts, punctuation, literal
// special tokens and SDXL's `tokenizer_2` (pad "!") included. Text is normalised as transformers does when ftfy is not
// installed (its BasicTokenizer: control characters dropped, CJK ideographs split, NFC, full lower-casing, no accent
// stripping).
//
//   auto tokenizer = stylealigned::models::ClipTokenizer::from_folder(model_dir / "tokenizer");
//   std::vector<int64_t> ids = tokenizer.encode("a photo of a cat");   // 77 ids: BOS, 320, 1125, ..., EOS, pad...
//   at::Tensor batch = tokenizer.encode_batch({"a cat", "a dog"});      // int64 [2, 77]
//   if (tokenizer.tokenize(prompt).size() > tokenizer.max_length() - 2) stylealigned::warn("prompt truncated");
//
// A tokenizer is cheap to copy (copies share the vocabulary and the BPE cache) and safe to use from several threads.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace stylealigned::models {

/// The special tokens and lengths of a tokenizer folder (tokenizer_config.json, then special_tokens_map.json, which
/// wins where both name a token, as in transformers). Defaults are CLIP's.
struct TokenizerSettings {
  std::string bos_token = "<|startoftext|>";
  std::string eos_token = "<|endoftext|>";
  std::string unk_token = "<|endoftext|>";
  /// "<|endoftext|>" for SD1.5 and SDXL's first tokenizer; "!" (id 0) for SDXL's `tokenizer_2`.
  std::string pad_token = "<|endoftext|>";
  /// Length of every encoded prompt: BOS, at most model_max_length - 2 ids, EOS, padding. 77 when the config has
  /// none (CLIP's position embedding count; transformers would not truncate at all).
  int64_t model_max_length = 77;
  /// Whether decode() removes the space before punctuation and contractions (transformers' default).
  bool clean_up_tokenization_spaces = true;
  /// Tokens that are matched verbatim in the raw prompt before any normalisation (transformers' "added tokens"),
  /// with their ids; from `added_tokens_decoder`. The four tokens above are always matched too, with ids from the
  /// vocabulary unless listed here. This is why SDXL's `tokenizer_2` turns every "!" of a prompt into id 0.
  std::map<std::string, int64_t> added_tokens;
  /// More special tokens (`additional_special_tokens`), matched like the added tokens; ids from the vocabulary.
  std::vector<std::string> additional_special_tokens;

  /// Reads `folder/tokenizer_config.json` and `folder/special_tokens_map.json`; either may be absent. A token may be
  /// a string or an object {"content": ...}. Throws stylealigned::Error naming the file and key at fault.
  static TokenizerSettings from_folder(const std::filesystem::path& folder);
};

/// CLIP's tokenizer: text normalisation, CLIP's pre-tokenisation pattern and byte-level BPE.
class ClipTokenizer {
 public:
  /// Loads `folder/vocab.json`, `folder/merges.txt` and the settings of TokenizerSettings::from_folder.
  static ClipTokenizer from_folder(const std::filesystem::path& folder);
  /// Loads a vocabulary and merge list with explicit settings. Throws stylealigned::Error naming the file (and line
  /// or token) for a missing or unreadable file, invalid JSON, a vocabulary without the 512 byte symbols, a merge
  /// line that is malformed or names a token missing from the vocabulary, or a special token with no id.
  static ClipTokenizer from_files(const std::filesystem::path& vocab_json, const std::filesystem::path& merges_txt,
                                  const TokenizerSettings& settings = {});

  /// max_length() ids: BOS, the first max_length() - 2 ids of tokenize(text), EOS, then pad_id() up to the length.
  /// `text` must be UTF-8; invalid UTF-8 throws stylealigned::Error giving the byte offset.
  std::vector<int64_t> encode(std::string_view text) const;
  /// encode() of every text, stacked: int64 [texts.size(), max_length()] on the CPU. Errors name the prompt index.
  at::Tensor encode_batch(const std::vector<std::string>& texts) const;
  /// The ids of `text` alone: no BOS/EOS, no truncation, no padding. Its size tells whether encode() truncates.
  std::vector<int64_t> tokenize(std::string_view text) const;

  /// Text of `ids`, as transformers' decode(): byte-level symbols back to UTF-8 (invalid sequences become U+FFFD),
  /// "</w>" word ends become spaces. With `skip_special_tokens`, BOS, EOS, UNK, pad and added tokens are left out
  /// (for tokenizer_2 that drops every "!", as transformers does). Throws stylealigned::Error for an unknown id.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = false) const;

  /// The vocabulary entry of `id` in its byte-level spelling ("photo</w>", "Ã©"). Throws for an unknown id.
  const std::string& token(int64_t id) const;
  /// The id of a vocabulary entry or added token, if any.
  std::optional<int64_t> token_id(std::string_view token) const;

  int64_t bos_id() const;
  int64_t eos_id() const;
  int64_t pad_id() const;
  int64_t unk_id() const;
  int64_t max_length() const;
  /// One past the largest id (49408 for CLIP).
  int64_t vocab_size() const;
  const TokenizerSettings& settings() const;

 private:
  struct Impl;
  explicit ClipTokenizer(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace stylealigned::models
