// CLIP tokenizer: exact ids for every golden prompt of the three golden tokenizers (SD1.5, SDXL tokenizer and
// tokenizer_2), the pad "!" behaviour, decoding, and errors that name the file or prompt position at fault.
#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/models/tokenizer.h"
#include "support/test_support.h"

namespace {

namespace fs = std::filesystem;
using stylealigned::Error;
using stylealigned::models::ClipTokenizer;
using stylealigned::models::TokenizerSettings;

std::vector<nlohmann::json> tokenizer_cases() {
  std::vector<nlohmann::json> cases;
  const nlohmann::json manifest = sa_test::read_json(sa_test::fixture("manifest.json"));
  for (const auto& c : manifest["cases"]) {
    if (c["kind"] == "tokenizer") cases.push_back(c);
  }
  return cases;
}

std::vector<int64_t> tensor_row(const at::Tensor& t, int64_t row) {
  at::Tensor r = t[row].to(at::kLong).contiguous();
  return {r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel()};
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The message of the stylealigned::Error that `fn` throws ("" and a test failure if it throws none).
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a stylealigned::Error";
  return {};
}

class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto start = std::chrono::steady_clock::now();
    sd15_ = new ClipTokenizer(ClipTokenizer::from_folder(sa_test::tokenizer_folder("models/sd15_tiny/tokenizer")));
    auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    // Informational only (no wall-clock assertion): vocab.json + merges.txt parse time.
    std::printf("[ info     ] tokenizer load (vocab.json + merges.txt): %.1f ms\n", seconds * 1e3);
    sdxl_2_ = new ClipTokenizer(ClipTokenizer::from_folder(sa_test::tokenizer_folder("models/sdxl_tiny/tokenizer_2")));
  }
  static void TearDownTestSuite() {
    delete sd15_;
    delete sdxl_2_;
  }
  static ClipTokenizer* sd15_;
  static ClipTokenizer* sdxl_2_;
};
ClipTokenizer* TokenizerTest::sd15_ = nullptr;
ClipTokenizer* TokenizerTest::sdxl_2_ = nullptr;

// Every golden prompt of every golden tokenizer: padded ids (against the safetensors file and the manifest), the
// untruncated ids, the BPE token strings and the attention mask.
TEST(tokenizer_golden, all_prompts_exact) {
  auto cases = tokenizer_cases();
  ASSERT_EQ(cases.size(), 3u);
  auto golden = stylealigned::io::SafetensorsFile::open(sa_test::fixture("data/tokenizer.safetensors"));
  size_t checked = 0;
  for (const auto& c : cases) {
    const auto& options = c["options"];
    const std::string id = c["id"];
    SCOPED_TRACE(id);
    const std::string folder = "models/" + options["tokenizer_folder"].get<std::string>();
    auto tokenizer = ClipTokenizer::from_folder(sa_test::tokenizer_folder(folder));
    EXPECT_EQ(tokenizer.bos_id(), options["bos_token_id"].get<int64_t>());
    EXPECT_EQ(tokenizer.eos_id(), options["eos_token_id"].get<int64_t>());
    EXPECT_EQ(tokenizer.pad_id(), options["pad_token_id"].get<int64_t>());
    EXPECT_EQ(tokenizer.settings().pad_token, options["pad_token"].get<std::string>());
    EXPECT_EQ(tokenizer.max_length(), options["max_length"].get<int64_t>());
    EXPECT_EQ(tokenizer.vocab_size(), options["vocab_size"].get<int64_t>());

    std::vector<std::string> prompts = c["inputs"]["prompts"];
    at::Tensor expected_ids = golden.tensor(c["outputs"]["input_ids"]["key"].get<std::string>());
    at::Tensor expected_mask = golden.tensor(c["outputs"]["attention_mask"]["key"].get<std::string>());
    ASSERT_EQ(expected_ids.size(0), static_cast<int64_t>(prompts.size()));
    at::Tensor batch = tokenizer.encode_batch(prompts);
    EXPECT_EQ(batch.scalar_type(), at::kLong);
    EXPECT_TRUE(batch.equal(expected_ids.to(at::kLong))) << "encode_batch differs from " << id;

    const auto& per_prompt = c["per_prompt"];
    ASSERT_EQ(per_prompt.size(), prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      const auto& p = per_prompt[i];
      SCOPED_TRACE("prompt " + std::to_string(i) + ": " + prompts[i]);
      ASSERT_EQ(p["prompt"].get<std::string>(), prompts[i]);
      std::vector<int64_t> ids = tokenizer.encode(prompts[i]);
      EXPECT_EQ(ids, tensor_row(expected_ids, static_cast<int64_t>(i)));
      EXPECT_EQ(ids, p["input_ids"].get<std::vector<int64_t>>());

      std::vector<int64_t> bare = tokenizer.tokenize(prompts[i]);
      std::vector<int64_t> untruncated{tokenizer.bos_id()};
      untruncated.insert(untruncated.end(), bare.begin(), bare.end());
      untruncated.push_back(tokenizer.eos_id());
      EXPECT_EQ(untruncated, p["untruncated_ids"].get<std::vector<int64_t>>());

      std::vector<std::string> strings;
      for (int64_t t : bare) strings.push_back(tokenizer.token(t));
      EXPECT_EQ(strings, p["bpe_tokens"].get<std::vector<std::string>>());

      // The mask transformers returns: 1 over BOS..EOS (whatever their ids), 0 over padding.
      const int64_t used = std::min<int64_t>(static_cast<int64_t>(bare.size()) + 2, tokenizer.max_length());
      std::vector<int64_t> mask(tokenizer.max_length(), 0);
      std::fill(mask.begin(), mask.begin() + used, 1);
      EXPECT_EQ(mask, tensor_row(expected_mask, static_cast<int64_t>(i)));
      ++checked;
    }
  }
  EXPECT_EQ(checked, 36u);
}

TEST_F(TokenizerTest, special_ids_and_lengths) {
  EXPECT_EQ(sd15_->bos_id(), 49406);
  EXPECT_EQ(sd15_->eos_id(), 49407);
  EXPECT_EQ(sd15_->pad_id(), 49407);
  EXPECT_EQ(sd15_->unk_id(), 49407);
  EXPECT_EQ(sdxl_2_->pad_id(), 0);
  EXPECT_EQ(sd15_->token(0), "!");
  EXPECT_EQ(sd15_->token(256), "!</w>");
  EXPECT_EQ(sd15_->token_id("photo</w>"), 1125);
  EXPECT_FALSE(sd15_->token_id("no-such-token</w>").has_value());
}

// SDXL's tokenizer_2 pads with "!" (id 0), which makes "!" an added token: every "!" of a prompt is split off
// before the pattern and becomes id 0, where SD1.5's tokenizer BPE-encodes runs of "!" ("!!!</w>" = 995).
TEST_F(TokenizerTest, pad_bang_splits_every_exclamation_mark) {
  EXPECT_EQ(sd15_->tokenize("wow!!!"), (std::vector<int64_t>{sd15_->tokenize("wow")[0], 995}));
  EXPECT_EQ(sdxl_2_->tokenize("wow!!!"), (std::vector<int64_t>{sd15_->tokenize("wow")[0], 0, 0, 0}));
  // Split off before the pattern, not as an alternative inside it: "?!?" is "?", "!", "?" rather than one run.
  std::vector<int64_t> question = sd15_->tokenize("?");
  ASSERT_EQ(question.size(), 1u);
  EXPECT_EQ(sdxl_2_->tokenize("?!?"), (std::vector<int64_t>{question[0], 0, question[0]}));
  EXPECT_NE(sd15_->tokenize("?!?"), sdxl_2_->tokenize("?!?"));

  std::vector<int64_t> ids = sdxl_2_->encode("a cat!");
  ASSERT_EQ(ids.size(), 77u);
  EXPECT_EQ((std::vector<int64_t>(ids.begin(), ids.begin() + 5)), (std::vector<int64_t>{49406, 320, 2368, 0, 49407}));
  for (size_t i = 5; i < ids.size(); ++i) EXPECT_EQ(ids[i], 0) << i;

  // The same files with explicit settings: only the pad token decides.
  const fs::path folder = sa_test::tokenizer_folder("models/sd15_tiny/tokenizer");
  TokenizerSettings bang;
  bang.pad_token = "!";
  auto with_bang = ClipTokenizer::from_files(folder / "vocab.json", folder / "merges.txt", bang);
  auto plain = ClipTokenizer::from_files(folder / "vocab.json", folder / "merges.txt");
  EXPECT_EQ(with_bang.tokenize("hi!"), sdxl_2_->tokenize("hi!"));
  EXPECT_EQ(plain.tokenize("hi!"), sd15_->tokenize("hi!"));
  EXPECT_EQ(with_bang.encode("hi").back(), 0);
  EXPECT_EQ(plain.encode("hi").back(), 49407);
}

TEST_F(TokenizerTest, literal_special_tokens) {
  // Exact text is split off the raw prompt; other spellings reach them through lower-casing and the pattern.
  EXPECT_EQ(sd15_->tokenize("a<|endoftext|>b"), (std::vector<int64_t>{320, 49407, 321}));
  EXPECT_EQ(sd15_->tokenize("a <|EndOfText|> b"), (std::vector<int64_t>{320, 49407, 321}));
  EXPECT_EQ(sd15_->tokenize("<|STARTOFTEXT|>"), (std::vector<int64_t>{49406}));
}

TEST_F(TokenizerTest, normalisation) {
  // Whitespace of every kind separates words; control and format characters vanish.
  EXPECT_EQ(sd15_->tokenize("a\u2028photo\u00a0of\u3000a\x01 cat\u200b"), sd15_->tokenize("a photo of a cat"));
  // NFC: a decomposed e + combining acute equals the precomposed é.
  EXPECT_EQ(sd15_->tokenize("cafe\u0301"), sd15_->tokenize("caf\u00e9"));
  // Full lower-casing (Python's str.lower()): upper case and title case fold like the golden prompts.
  EXPECT_EQ(sd15_->tokenize("CAFÉ Photo"), sd15_->tokenize("café photo"));
  // CJK ideographs stand alone (no "</w>"-joined run), kana does not.
  std::vector<int64_t> east = sd15_->tokenize("東"), capital = sd15_->tokenize("京");
  east.insert(east.end(), capital.begin(), capital.end());
  EXPECT_EQ(sd15_->tokenize("東京"), east);
  EXPECT_EQ(sd15_->tokenize(""), std::vector<int64_t>{});
  EXPECT_EQ(sd15_->tokenize(" \t\n "), std::vector<int64_t>{});
}

TEST_F(TokenizerTest, truncation_keeps_bos_and_eos) {
  std::string prompt;
  for (int i = 0; i < 100; ++i) prompt += "cat ";
  EXPECT_EQ(sd15_->tokenize(prompt).size(), 100u);
  std::vector<int64_t> ids = sd15_->encode(prompt);
  ASSERT_EQ(ids.size(), 77u);
  EXPECT_EQ(ids.front(), 49406);
  EXPECT_EQ(ids.back(), 49407);
  for (size_t i = 1; i < 76; ++i) EXPECT_EQ(ids[i], 2368) << i;
}

TEST_F(TokenizerTest, decode_round_trip) {
  EXPECT_EQ(sd15_->decode(sd15_->encode("A photo of a cat"), true), "a photo of a cat");
  EXPECT_EQ(sd15_->decode(sd15_->tokenize("Café crème brûlée, 東京 🌃")),  // "," loses its space
            "café crème brûlée, 東 京 🌃");
  EXPECT_EQ(sd15_->decode({49406, 320, 2368, 49407}), "<|startoftext|>a cat <|endoftext|>");
  // Clean-up of spaces before punctuation and contractions, as transformers' decode.
  // (Its list has " 's" and " n't" but not " 't", so "don 't" keeps its space there too.)
  EXPECT_EQ(sd15_->decode(sd15_->tokenize("don't stop, it's here.")), "don 't stop, it's here.");
  // A byte sequence cut inside a character becomes U+FFFD: "Ã" is the lone lead byte 0xC3.
  EXPECT_EQ(sd15_->decode({sd15_->token_id("Ã").value()}), "\xEF\xBF\xBD");
  // tokenizer_2 drops its "!" pad tokens when skipping specials.
  EXPECT_EQ(sdxl_2_->decode(sdxl_2_->encode("hi!"), true), "hi");
}

TEST_F(TokenizerTest, copies_share_state_across_threads) {
  const std::vector<std::string> prompts = {"a photo of a cat", "Café crème — naïve", "東京の夜景, neon 🌃",
                                            "don't stop, it's the CAT's toy"};
  std::vector<std::vector<int64_t>> expected;
  for (const auto& p : prompts) expected.push_back(sd15_->encode(p));
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t, copy = *sd15_] {
      for (int round = 0; round < 50; ++round) {
        for (size_t i = 0; i < prompts.size(); ++i) mismatches[t] += copy.encode(prompts[i]) != expected[i];
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

// Errors --------------------------------------------------------------------------------------------------------------

TEST_F(TokenizerTest, invalid_utf8_names_the_position) {
  std::string msg = error_of([&] {
    sd15_->encode(
        "ab\xff"
        "cd");
  });
  EXPECT_NE(msg.find("UTF-8"), std::string::npos) << msg;
  EXPECT_NE(msg.find("byte 2"), std::string::npos) << msg;
  // A truncated sequence and an encoded surrogate are invalid too.
  EXPECT_NE(error_of([&] { sd15_->tokenize("caf\xc3"); }).find("byte 3"), std::string::npos);
  EXPECT_NE(error_of([&] { sd15_->tokenize("\xed\xa0\x80"); }).find("byte 0"), std::string::npos);
  msg = error_of([&] { sd15_->encode_batch({"fine", "also fine", "bad \xc0\xaf"}); });
  EXPECT_NE(msg.find("prompt 2"), std::string::npos) << msg;
  EXPECT_NE(msg.find("byte 4"), std::string::npos) << msg;
}

TEST_F(TokenizerTest, unknown_ids) {
  EXPECT_NE(error_of([&] { sd15_->token(49408); }).find("49408"), std::string::npos);
  EXPECT_NE(error_of([&] { sd15_->decode({320, -1}); }).find("-1"), std::string::npos);
}

class TokenizerFileErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    source_ = sa_test::tokenizer_folder("models/sd15_tiny/tokenizer");
    dir_ = sa_test::scratch_dir(std::string("tokenizer_errors_") +
                                ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::copy_file(source_ / "vocab.json", dir_ / "vocab.json", fs::copy_options::overwrite_existing);
    fs::copy_file(source_ / "merges.txt", dir_ / "merges.txt", fs::copy_options::overwrite_existing);
  }
  std::string load_error() {
    return error_of([&] { ClipTokenizer::from_files(dir_ / "vocab.json", dir_ / "merges.txt"); });
  }
  fs::path source_, dir_;
};

TEST_F(TokenizerFileErrors, missing_files) {
  fs::remove(dir_ / "merges.txt");
  std::string msg = load_error();
  EXPECT_NE(msg.find((dir_ / "merges.txt").string()), std::string::npos) << msg;
  fs::remove(dir_ / "vocab.json");
  msg = load_error();
  EXPECT_NE(msg.find((dir_ / "vocab.json").string()), std::string::npos) << msg;
  msg = error_of([&] { ClipTokenizer::from_folder(dir_ / "nowhere"); });
  EXPECT_NE(msg.find("nowhere"), std::string::npos) << msg;
  msg = error_of([&] { ClipTokenizer::from_folder(dir_); });  // a folder without vocab.json
  EXPECT_NE(msg.find("vocab.json"), std::string::npos) << msg;
}

TEST_F(TokenizerFileErrors, invalid_vocab_json) {
  write_text(dir_ / "vocab.json", "{\"a\": 1, \"b\": ");
  std::string msg = load_error();
  EXPECT_NE(msg.find("vocab.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("invalid JSON"), std::string::npos) << msg;

  write_text(dir_ / "vocab.json", "{\"a\": 1, \"b\": \"two\"}");
  msg = load_error();
  EXPECT_NE(msg.find("'b'"), std::string::npos) << msg;

  write_text(dir_ / "vocab.json", "[1, 2]");
  EXPECT_NE(load_error().find("vocab.json"), std::string::npos);

  // Valid JSON, but not a byte-level vocabulary.
  write_text(dir_ / "vocab.json", "{\"a\": 0, \"b\": 1}");
  msg = load_error();
  EXPECT_NE(msg.find("byte"), std::string::npos) << msg;
}

TEST_F(TokenizerFileErrors, merge_with_unknown_token) {
  write_text(dir_ / "merges.txt", "#version: 0.2\ni n\nt h\nqzx vwq\n");
  std::string msg = load_error();
  EXPECT_NE(msg.find("merges.txt:4"), std::string::npos) << msg;
  EXPECT_NE(msg.find("qzx"), std::string::npos) << msg;

  write_text(dir_ / "merges.txt", "#version: 0.2\ni n\nt h e\n");
  msg = load_error();
  EXPECT_NE(msg.find("merges.txt:3"), std::string::npos) << msg;
}

TEST_F(TokenizerFileErrors, settings) {
  fs::copy_file(source_ / "tokenizer_config.json", dir_ / "tokenizer_config.json",
                fs::copy_options::overwrite_existing);
  write_text(dir_ / "special_tokens_map.json", "{\"pad_token\": 5}");
  std::string msg = error_of([&] { ClipTokenizer::from_folder(dir_); });
  EXPECT_NE(msg.find("special_tokens_map.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("pad_token"), std::string::npos) << msg;

  write_text(dir_ / "special_tokens_map.json", "{\"pad_token\": {\"content\": \"<|no-such-token|>\"}}");
  msg = error_of([&] { ClipTokenizer::from_folder(dir_); });
  EXPECT_NE(msg.find("<|no-such-token|>"), std::string::npos) << msg;

  write_text(dir_ / "special_tokens_map.json", "{not json");
  msg = error_of([&] { ClipTokenizer::from_folder(dir_); });
  EXPECT_NE(msg.find("special_tokens_map.json"), std::string::npos) << msg;

  // The object form of a token is accepted, and special_tokens_map.json wins over tokenizer_config.json.
  write_text(dir_ / "special_tokens_map.json", "{\"pad_token\": {\"content\": \"!\", \"lstrip\": false}}");
  auto tokenizer = ClipTokenizer::from_folder(dir_);
  EXPECT_EQ(tokenizer.pad_id(), 0);
  EXPECT_EQ(tokenizer.settings().pad_token, "!");
}

}  // namespace
