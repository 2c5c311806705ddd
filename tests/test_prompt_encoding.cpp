// encode_prompt for SD1.x and SDXL against diffusers 0.25 (golden kind `encode_prompt`), plus the option semantics.
#include <nlohmann/json.hpp>

#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/log.h"
#include "stylealigned/models/prompt_encoding.h"
#include "support/test_support.h"

namespace io = stylealigned::io;
namespace models = stylealigned::models;
using stylealigned::Error;

namespace {

constexpr double kMaxAtol = 1e-4;

struct Encoders {
  models::ClipTokenizer tokenizer, tokenizer_2;
  models::CLIPTextModel text_encoder{nullptr}, text_encoder_2{nullptr};
};

// Loaded once per model: the tests only read them.
const Encoders& encoders(const std::string& model) {
  static std::map<std::string, Encoders> cache;
  auto it = cache.find(model);
  if (it != cache.end()) return it->second;
  const std::string root = "models/" + model;
  const bool xl = model == "sdxl_tiny";
  Encoders e{
      models::ClipTokenizer::from_folder(sa_test::tokenizer_folder(root + "/tokenizer")),
      models::ClipTokenizer::from_folder(sa_test::tokenizer_folder(root + (xl ? "/tokenizer_2" : "/tokenizer"))),
      models::CLIPTextModel::from_pretrained(sa_test::fixture(root + "/text_encoder")),
      models::CLIPTextModel::from_pretrained(sa_test::fixture(root + (xl ? "/text_encoder_2" : "/text_encoder")))};
  return cache.emplace(model, std::move(e)).first->second;
}

models::PromptEmbeddings encode(const std::string& model, const std::vector<std::string>& prompts,
                                const models::PromptEncodeOptions& options) {
  const auto& e = encoders(model);
  if (model == "sdxl_tiny") {
    return models::encode_prompt_sdxl(e.tokenizer, e.text_encoder, e.tokenizer_2, e.text_encoder_2, prompts, options);
  }
  return models::encode_prompt_sd(e.tokenizer, e.text_encoder, prompts, options);
}

const std::vector<std::string> kPrompts = {"a toy train. macro photo. 3d game asset",
                                           "A toy train. Macro photo, 3D game asset!"};

}  // namespace

TEST(encode_prompt, matches_diffusers_on_every_golden_case) {
  const auto manifest = sa_test::read_json(sa_test::fixture("manifest.json"));
  at::NoGradGuard no_grad;
  int cases = 0;
  for (const auto& c : manifest.at("cases")) {
    if (c.at("kind") != "encode_prompt") continue;
    ++cases;
    const std::string id = c.at("id");
    SCOPED_TRACE(id);
    const auto data = io::SafetensorsFile::open(sa_test::fixture(c.at("file")));
    const auto& in = c.at("inputs");
    const auto& opt = c.at("options");
    models::PromptEncodeOptions options;
    if (!in.at("negative_prompt").is_null())
      options.negative_prompts = in.at("negative_prompt").get<std::vector<std::string>>();
    if (in.contains("clip_skip") && !in.at("clip_skip").is_null())
      options.clip_skip = in.at("clip_skip").get<int64_t>();
    options.do_classifier_free_guidance = opt.at("do_classifier_free_guidance").get<bool>();
    options.num_images_per_prompt = opt.at("num_images_per_prompt").get<int64_t>();
    if (!opt.at("force_zeros_for_empty_prompt").is_null()) {
      options.force_zeros_for_empty_prompt = opt.at("force_zeros_for_empty_prompt").get<bool>();
    }
    const auto out = encode(c.at("model"), in.at("prompts").get<std::vector<std::string>>(), options);
    const std::map<std::string, at::Tensor> actual = {
        {"prompt_embeds", out.prompt_embeds},
        {"negative_prompt_embeds", out.negative_prompt_embeds},
        {"pooled_prompt_embeds", out.pooled_prompt_embeds},
        {"negative_pooled_prompt_embeds", out.negative_pooled_prompt_embeds},
    };
    for (const auto& [name, ref] : c.at("outputs").items()) {
      ASSERT_TRUE(actual.at(name).defined()) << name;
      const at::Tensor expected = data.tensor(ref.at("key").get<std::string>());
      const double atol = std::min(kMaxAtol, ref.value("suggested_atol", kMaxAtol));
      std::printf("  %-34s %-30s max abs err %.3g (atol %.3g)\n", id.c_str(), name.c_str(),
                  sa_test::max_abs_diff(actual.at(name), expected), atol);
      EXPECT_ALLCLOSE(actual.at(name), expected, atol) << name;
    }
    if (c.at("model") == "sd15_tiny") EXPECT_FALSE(out.pooled_prompt_embeds.defined());
  }
  EXPECT_EQ(cases, 6);
}

TEST(encode_prompt, repeats_each_prompt_consecutively) {
  at::NoGradGuard no_grad;
  for (const std::string model : {"sd15_tiny", "sdxl_tiny"}) {
    SCOPED_TRACE(model);
    models::PromptEncodeOptions one, three;
    one.negative_prompts = three.negative_prompts = std::vector<std::string>{"blurry"};
    three.num_images_per_prompt = 3;
    const auto a = encode(model, kPrompts, one), b = encode(model, kPrompts, three);
    ASSERT_EQ(b.prompt_embeds.size(0), 6);
    EXPECT_TRUE(b.prompt_embeds.equal(a.prompt_embeds.repeat_interleave(3, 0)));
    EXPECT_TRUE(b.negative_prompt_embeds.equal(a.negative_prompt_embeds.repeat_interleave(3, 0)));
    EXPECT_FALSE(b.prompt_embeds[2].equal(b.prompt_embeds[3]));
    if (model == "sdxl_tiny") {
      EXPECT_TRUE(b.pooled_prompt_embeds.equal(a.pooled_prompt_embeds.repeat_interleave(3, 0)));
      EXPECT_TRUE(b.negative_pooled_prompt_embeds.equal(a.negative_pooled_prompt_embeds.repeat_interleave(3, 0)));
    }
  }
}

TEST(encode_prompt, sdxl_options_follow_diffusers) {
  at::NoGradGuard no_grad;
  const auto& e = encoders("sdxl_tiny");
  const int64_t c1 = e.text_encoder->config().hidden_size;

  // Without CFG there are no negatives.
  models::PromptEncodeOptions no_cfg;
  no_cfg.do_classifier_free_guidance = false;
  auto out = encode("sdxl_tiny", kPrompts, no_cfg);
  EXPECT_FALSE(out.negative_prompt_embeds.defined());
  EXPECT_FALSE(out.negative_pooled_prompt_embeds.defined());
  EXPECT_EQ(out.prompt_embeds.size(2), c1 + e.text_encoder_2->config().hidden_size);

  // Without force_zeros, the negative is the encoding of "" (for both encoders).
  models::PromptEncodeOptions empty_negative;
  empty_negative.force_zeros_for_empty_prompt = false;
  out = encode("sdxl_tiny", kPrompts, empty_negative);
  const auto empty = encode("sdxl_tiny", {"", ""}, no_cfg);
  EXPECT_TRUE(out.negative_prompt_embeds.equal(empty.prompt_embeds));
  EXPECT_TRUE(out.negative_pooled_prompt_embeds.equal(empty.pooled_prompt_embeds));

  // clip_skip moves the prompts one layer down, but not the negatives (diffusers' behaviour).
  models::PromptEncodeOptions skip;
  skip.clip_skip = 1;
  skip.negative_prompts = std::vector<std::string>{"blurry"};
  models::PromptEncodeOptions no_skip = skip;
  no_skip.clip_skip.reset();
  const auto skipped = encode("sdxl_tiny", kPrompts, skip), plain = encode("sdxl_tiny", kPrompts, no_skip);
  EXPECT_FALSE(skipped.prompt_embeds.equal(plain.prompt_embeds));
  EXPECT_TRUE(skipped.pooled_prompt_embeds.equal(plain.pooled_prompt_embeds));
  EXPECT_TRUE(skipped.negative_prompt_embeds.equal(plain.negative_prompt_embeds));

  // prompts_2 feeds text_encoder_2 only: the first encoder's channels stay, the second's and the pooled change.
  models::PromptEncodeOptions second;
  second.do_classifier_free_guidance = false;
  second.prompts_2 = std::vector<std::string>{"an oil painting"};
  const auto with_2 = encode("sdxl_tiny", kPrompts, second), without_2 = encode("sdxl_tiny", kPrompts, no_cfg);
  EXPECT_TRUE(with_2.prompt_embeds.narrow(2, 0, c1).equal(without_2.prompt_embeds.narrow(2, 0, c1)));
  EXPECT_FALSE(with_2.prompt_embeds.narrow(2, c1, 40).equal(without_2.prompt_embeds.narrow(2, c1, 40)));
  const auto painting = encode("sdxl_tiny", {"an oil painting", "an oil painting"}, no_cfg);
  EXPECT_TRUE(with_2.pooled_prompt_embeds.equal(painting.pooled_prompt_embeds));

  // A text_encoder_2 without projection is refused by name.
  try {
    models::encode_prompt_sdxl(e.tokenizer, e.text_encoder, e.tokenizer_2, e.text_encoder, kPrompts);
    ADD_FAILURE() << "accepted a text_encoder_2 without text_projection";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("text_projection"), std::string::npos) << err.what();
  }
}

TEST(encode_prompt, sd_clip_skip_and_negatives) {
  at::NoGradGuard no_grad;
  const auto& e = encoders("sd15_tiny");
  auto& te = *e.text_encoder.ptr();
  // clip_skip 1 = final_layer_norm(penultimate hidden state); the negatives stay the plain "" encoding.
  models::PromptEncodeOptions skip;
  skip.clip_skip = 1;
  const auto out = encode("sd15_tiny", kPrompts, skip);
  const auto states = te.forward(e.tokenizer.encode_batch(kPrompts), {true});
  const auto n = states.hidden_states.size();
  EXPECT_TRUE(out.prompt_embeds.equal(te.final_layer_norm(states.hidden_states[n - 2])));
  const auto empty = te.forward(e.tokenizer.encode_batch({"", ""}));
  EXPECT_TRUE(out.negative_prompt_embeds.equal(empty.last_hidden_state));
  // clip_skip = number of layers reaches the embeddings; one more is an error.
  skip.clip_skip = e.text_encoder->config().num_hidden_layers;
  EXPECT_NO_THROW(encode("sd15_tiny", kPrompts, skip));
  skip.clip_skip = *skip.clip_skip + 1;
  EXPECT_THROW(encode("sd15_tiny", kPrompts, skip), Error);
}

TEST(encode_prompt, rejects_bad_arguments_and_warns_on_truncation) {
  at::NoGradGuard no_grad;
  models::PromptEncodeOptions wrong;
  wrong.negative_prompts = std::vector<std::string>{"a", "b", "c"};
  try {
    encode("sd15_tiny", kPrompts, wrong);
    ADD_FAILURE() << "3 negatives for 2 prompts accepted";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("negative_prompts has 3 entries for 2 prompts"), std::string::npos)
        << err.what();
  }
  EXPECT_THROW(encode("sdxl_tiny", {}, {}), Error);
  models::PromptEncodeOptions zero;
  zero.num_images_per_prompt = 0;
  EXPECT_THROW(encode("sdxl_tiny", kPrompts, zero), Error);

  std::vector<std::string> warnings;
  auto previous = stylealigned::set_warning_handler([&](std::string_view m) { warnings.emplace_back(m); });
  std::string long_prompt;
  for (int i = 0; i < 80; ++i) long_prompt += "cat ";
  long_prompt += "zebra";
  encode("sd15_tiny", {"short", long_prompt}, {});
  stylealigned::set_warning_handler(previous);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("prompt 1"), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[0].find("zebra"), std::string::npos) << warnings[0];
}
