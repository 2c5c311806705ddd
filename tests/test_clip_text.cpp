// CLIP text encoders against transformers 4.36 (golden kind `text_encoder`), plus config, pooling and input checks.
#include <fstream>
#include <nlohmann/json.hpp>

#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/models/clip_text.h"
#include "support/test_support.h"

namespace fs = std::filesystem;
namespace io = stylealigned::io;
namespace models = stylealigned::models;
using stylealigned::Error;

namespace {

// The issue's bar for the text encoders; a case's suggested_atol wins when tighter.
constexpr double kMaxAtol = 1e-4;

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

models::CLIPTextConfig tiny_config() {
  models::CLIPTextConfig c;
  c.vocab_size = 100;
  c.hidden_size = 16;
  c.intermediate_size = 32;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.max_position_embeddings = 12;
  return c;
}

}  // namespace

TEST(clip_text, matches_transformers_on_every_golden_case) {
  const auto cases = sa_test::golden_cases("text_encoder");
  ASSERT_EQ(cases.size(), 3u);
  at::NoGradGuard no_grad;
  for (const auto& c : cases) {
    const std::string id = c.at("id");
    SCOPED_TRACE(id);
    const std::string folder = fmt::format("models/{}/{}", c.at("model").get<std::string>(),
                                           c.at("inputs").at("component").get<std::string>());
    auto model = models::CLIPTextModel::from_pretrained(sa_test::fixture(folder));
    const at::Tensor ids = sa_test::golden_tensor(c, c.at("inputs").at("input_ids"));
    const auto out = model->forward(ids, {/*output_hidden_states=*/true});
    const int64_t layers = model->config().num_hidden_layers;
    ASSERT_EQ(out.hidden_states.size(), size_t(layers + 1));

    std::map<std::string, at::Tensor> actual = {
        {"last_hidden_state", out.last_hidden_state},
        {"hidden_states_penultimate", out.hidden_states[layers - 1]},
        {"pooler_output", out.pooler_output},
        {"text_embeds", out.text_embeds},
        {"all_hidden_states_prompt0", at::stack(out.hidden_states).select(1, 0)},
    };
    EXPECT_EQ(model->config().with_projection, c.at("outputs").contains("text_embeds"));
    for (const auto& [name, ref] : c.at("outputs").items()) {
      ASSERT_TRUE(actual.count(name)) << "no output for golden key " << name;
      const at::Tensor expected = sa_test::golden_tensor(c, ref);
      const double atol = std::min(kMaxAtol, ref.value("suggested_atol", kMaxAtol));
      const double err = sa_test::max_abs_diff(actual[name], expected);
      std::printf("  %-40s %-28s max abs err %.3g (atol %.3g)\n", id.c_str(), name.c_str(), err, atol);
      EXPECT_ALLCLOSE(actual[name], expected, atol) << name;
    }
  }
}

TEST(clip_text, reads_transformers_configs) {
  const auto te2 = models::CLIPTextConfig::from_file(sa_test::fixture("models/sdxl_tiny/text_encoder_2/config.json"));
  EXPECT_TRUE(te2.with_projection);
  EXPECT_EQ(te2.hidden_act, "gelu");
  EXPECT_EQ(te2.hidden_size, 40);
  EXPECT_EQ(te2.projection_dim, 32);
  EXPECT_EQ(te2.eos_token_id, 2);
  const auto te1 = models::CLIPTextConfig::from_file(sa_test::fixture("models/sd15_tiny/text_encoder/config.json"));
  EXPECT_FALSE(te1.with_projection);
  EXPECT_EQ(te1.hidden_act, "quick_gelu");
  EXPECT_EQ(te1.num_hidden_layers, 2);
  EXPECT_EQ(te1.num_attention_heads, 2);

  const auto dir = sa_test::scratch_dir("clip_config");
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir / name) << text;
    return dir / name;
  };
  auto error_of = [](const fs::path& p) -> std::string {
    try {
      models::CLIPTextConfig::from_file(p);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  const auto bad_act = write("bad_act.json", R"({"hidden_act": "relu6", "hidden_size": 8, "num_attention_heads": 2})");
  std::string msg = error_of(bad_act);
  EXPECT_TRUE(contains(msg, bad_act.string()) && contains(msg, "hidden_act") && contains(msg, "relu6")) << msg;
  msg = error_of(write("heads.json", R"({"hidden_size": 10, "num_attention_heads": 4})"));
  EXPECT_TRUE(contains(msg, "num_attention_heads")) << msg;
  msg = error_of(write("type.json", R"({"hidden_size": "big"})"));
  EXPECT_TRUE(contains(msg, "hidden_size")) << msg;
  msg = error_of(write("vision.json", R"({"model_type": "clip_vision_model"})"));
  EXPECT_TRUE(contains(msg, "clip_vision_model")) << msg;
  msg = error_of(dir / "absent.json");
  EXPECT_TRUE(contains(msg, "absent.json")) << msg;
}

TEST(clip_text, registers_transformers_names) {
  auto config = tiny_config();
  config.with_projection = true;
  models::CLIPTextModel model(config);
  const auto params = model->named_parameters();
  for (const char* name :
       {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.1.self_attn.q_proj.weight", "text_model.encoder.layers.0.self_attn.out_proj.bias",
        "text_model.encoder.layers.1.layer_norm1.weight", "text_model.encoder.layers.0.mlp.fc1.weight",
        "text_model.encoder.layers.0.mlp.fc2.bias", "text_model.encoder.layers.1.layer_norm2.bias",
        "text_model.final_layer_norm.weight", "text_projection.weight"}) {
    EXPECT_TRUE(params.contains(name)) << name;
  }
  EXPECT_FALSE(params.contains("text_projection.bias"));
  // 4 (embeddings, final norm) + 16 per layer + projection.
  EXPECT_EQ(params.size(), 4u + 16u * 2u + 1u);
}

TEST(clip_text, pools_at_the_end_token_and_is_causal) {
  at::manual_seed(3);
  at::NoGradGuard no_grad;
  auto config = tiny_config();
  config.eos_token_id = 2;  // legacy: argmax of the ids, first occurrence on ties
  models::CLIPTextModel legacy(config);
  legacy->eval();
  const at::Tensor ids = at::tensor({98, 5, 99, 7, 99, 99, 0, 0}, at::kLong).view({1, 8});
  auto out = legacy->forward(ids);
  EXPECT_TRUE(out.pooler_output.equal(out.last_hidden_state.select(1, 2)));
  EXPECT_TRUE(out.hidden_states.empty());
  EXPECT_FALSE(out.text_embeds.defined());

  config.eos_token_id = 7;  // new-style configs: first position of eos_token_id
  models::CLIPTextModel modern(config);
  modern->eval();
  out = modern->forward(ids);
  EXPECT_TRUE(out.pooler_output.equal(out.last_hidden_state.select(1, 3)));

  // Causality: changing token 5 leaves positions 0..4 unchanged and changes position 5.
  at::Tensor other = ids.clone();
  other[0][5] = 42;
  const auto a = modern->forward(ids, {true}), b = modern->forward(other, {true});
  for (size_t layer = 0; layer < a.hidden_states.size(); ++layer) {
    EXPECT_TRUE(a.hidden_states[layer].narrow(1, 0, 5).equal(b.hidden_states[layer].narrow(1, 0, 5))) << layer;
  }
  EXPECT_FALSE(a.last_hidden_state.narrow(1, 5, 1).equal(b.last_hidden_state.narrow(1, 5, 1)));

  // An all-ones attention mask changes nothing; masking a key removes its influence on later queries.
  const auto masked = modern->forward(ids, {false, at::ones({1, 8}, at::kLong)});
  EXPECT_TRUE(masked.last_hidden_state.equal(a.last_hidden_state));
  at::Tensor mask = at::ones({1, 8}, at::kLong);
  mask[0][1] = 0;
  at::Tensor changed = ids.clone();
  changed[0][1] = 60;
  const auto m1 = modern->forward(ids, {false, mask}), m2 = modern->forward(changed, {false, mask});
  EXPECT_TRUE(m1.last_hidden_state.narrow(1, 2, 6).allclose(m2.last_hidden_state.narrow(1, 2, 6), 0, 1e-6));
}

TEST(clip_text, rejects_bad_input_ids) {
  models::CLIPTextModel model(tiny_config());
  auto error_of = [&](const at::Tensor& ids) -> std::string {
    try {
      model->forward(ids);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_TRUE(contains(error_of(at::zeros({1, 13}, at::kLong)), "max_position_embeddings"));
  EXPECT_TRUE(contains(error_of(at::full({1, 4}, 100, at::kLong)), "outside the vocabulary"));
  EXPECT_TRUE(contains(error_of(at::full({1, 4}, -1, at::kLong)), "outside the vocabulary"));
  EXPECT_TRUE(contains(error_of(at::zeros({4}, at::kLong)), "[batch, tokens]"));
  EXPECT_TRUE(contains(error_of(at::zeros({1, 4}, at::kFloat)), "integer"));
  EXPECT_THROW(
      {
        auto c = tiny_config();
        c.num_attention_heads = 3;
        models::CLIPTextModel bad(c);
      },
      Error);
}

TEST(clip_text, loads_half_precision_checkpoints) {
  // The sd15 text encoder stored as F16 (model.fp16.safetensors, as diffusers' fp16 variant) loads into fp32 and
  // agrees with the fp32 model to fp16 rounding.
  const auto source = sa_test::fixture("models/sd15_tiny/text_encoder");
  const auto dir = sa_test::scratch_dir("clip_fp16") / "text_encoder";
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(source / "config.json", dir / "config.json");
  std::vector<std::pair<std::string, at::Tensor>> half;
  for (auto& [name, t] : io::load_safetensors(source / "model.safetensors")) half.emplace_back(name, t.to(at::kHalf));
  io::save_safetensors(dir / "model.fp16.safetensors", half);

  at::NoGradGuard no_grad;
  auto full = models::CLIPTextModel::from_pretrained(source);
  auto from_half = models::CLIPTextModel::from_pretrained(dir);
  EXPECT_EQ(from_half->named_parameters()["text_model.final_layer_norm.weight"].scalar_type(), at::kFloat);
  const at::Tensor ids = at::tensor({49406, 320, 1125, 539, 49407, 49407}, at::kLong).view({1, 6});
  const auto a = full->forward(ids), b = from_half->forward(ids);
  const double err = sa_test::max_abs_diff(a.last_hidden_state, b.last_hidden_state);
  EXPECT_GT(err, 0.0);   // really the rounded weights
  EXPECT_LT(err, 5e-2);  // and only rounded
}
