// CLIP's pre-tokenisation pattern, matched by hand (internal; tokenizer.cpp and test_tokenizer use it).
//
// transformers splits the normalised text with
//   <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
// case-insensitively. This matcher gives exactly the matches of ICU's regex with UREGEX_CASE_INSENSITIVE (which the
// tokenizer used before; test_tokenizer compares the two over every code point): literals compare by full case
// folding and may not end inside a character's folding; a class contains every character case-equivalent to a
// member (so U+0345, whose folding is the letter U+03B9, counts as a letter); \s is the Unicode White_Space property.
// It spares loading ICU's regex engine and building its property sets, about 1.3 MB of resident memory per process.
#pragma once

#include <unicode/unistr.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace stylealigned::models::detail {

/// The [begin, end) UTF-16 ranges of the pattern's successive matches in `text`, as RegexMatcher::find() gives them.
std::vector<std::pair<int32_t, int32_t>> clip_pretokenize(const icu::UnicodeString& text);

}  // namespace stylealigned::models::detail
