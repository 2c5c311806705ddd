// UNet2DConditionModel: parameter names, processor order, config parsing and errors, hooks, and parity with
// diffusers 0.25.1 on the tiny SD1.5 / SDXL golden models (plain and with StyleAligned installed).
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "internal/onednn.h"
#include "models/layers.h"
#include "stylealigned/attention.h"
#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/models/unet.h"
#include "stylealigned/runtime.h"
#include "stylealigned/style_aligned.h"
#include "support/test_support.h"

namespace fs = std::filesystem;
using nlohmann::json;
using sa_test::golden_tensor;
using stylealigned::BatchLayout;
using stylealigned::Error;
using stylealigned::models::UNet2DConditionModel;
using stylealigned::models::UNetConfig;
using stylealigned::models::UNetForwardOptions;

namespace {

fs::path unet_folder(const std::string& model) { return sa_test::fixture("models/" + model + "/unet"); }

// One loaded model per golden folder, shared by the tests (building and loading is the slow part).
UNet2DConditionModel& golden_unet(const std::string& model) {
  static std::map<std::string, UNet2DConditionModel> models;
  auto it = models.find(model);
  if (it == models.end()) {
    auto unet = UNet2DConditionModel::from_pretrained(unet_folder(model));
    unet->eval();
    it = models.emplace(model, unet).first;
  }
  return it->second;
}

double tolerance(const json& out) { return std::min(1e-4, out.value("suggested_atol", 1e-4)); }

at::Tensor run_case(UNet2DConditionModel& unet, const json& c, const BatchLayout* layout = nullptr) {
  const auto& in = c.at("inputs");
  UNetForwardOptions opts;
  opts.layout = layout;
  if (in.contains("text_embeds")) {
    opts.text_embeds = golden_tensor(c, in.at("text_embeds"));
    opts.time_ids = golden_tensor(c, in.at("time_ids"));
  }
  at::NoGradGuard no_grad;
  return unet->forward(golden_tensor(c, in.at("sample")), golden_tensor(c, in.at("timestep")),
                       golden_tensor(c, in.at("encoder_hidden_states")), opts);
}

// Sets the convolution weight packing for one scope (the setting is process-wide).
class ScopedConvPacking {
 public:
  explicit ScopedConvPacking(stylealigned::ConvWeightPacking mode) : saved_(stylealigned::conv_weight_packing()) {
    stylealigned::configure_conv_weight_packing(mode);
  }
  ~ScopedConvPacking() { stylealigned::configure_conv_weight_packing(saved_); }
  ScopedConvPacking(const ScopedConvPacking&) = delete;
  ScopedConvPacking& operator=(const ScopedConvPacking&) = delete;

 private:
  stylealigned::ConvWeightPacking saved_;
};

// Both convolution layouts: plain NCHW (fp32's default) and packed weights on channels-last activations.
const std::vector<std::pair<stylealigned::ConvWeightPacking, const char*>> kConvLayouts{
    {stylealigned::ConvWeightPacking::never, "plain"}, {stylealigned::ConvWeightPacking::always, "packed"}};

std::string unet_config_text(const std::string& model) {
  std::ifstream in(unet_folder(model) / "config.json");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Expects `fn` to throw a stylealigned::Error whose message contains every needle.
template <class Fn>
void expect_error(Fn&& fn, const std::vector<std::string>& needles) {
  try {
    fn();
    ADD_FAILURE() << "no stylealigned::Error thrown";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& needle : needles)
      EXPECT_NE(msg.find(needle), std::string::npos) << "'" << needle << "' not in: " << msg;
  }
}

// Records every attention call and delegates to the default processor.
class RecordingProcessor : public stylealigned::AttentionProcessor {
 public:
  struct Call {
    std::string layer;
    stylealigned::AttentionKind kind;
    std::vector<int64_t> q, k;
    double scale;
  };
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const stylealigned::AttentionCall& call) override {
    calls.push_back({std::string(call.layer), call.kind, q.sizes().vec(), k.sizes().vec(), call.scale});
    return stylealigned::default_attention_processor()->attend(q, k, v, call);
  }
  std::string name() const override { return "recording"; }
  std::vector<Call> calls;
};

// Plain GroupNorm that counts its calls.
class CountingNorm : public stylealigned::NormHook {
 public:
  at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                        double eps, const BatchLayout& layout) override {
    ++calls;
    EXPECT_EQ(layout.batch_size(), x.size(0));
    return at::group_norm(x, groups, weight, bias, eps);
  }
  int calls = 0;
};

}  // namespace

// ---- Structure --------------------------------------------------------------------------------------------------

TEST(unet, parameter_names_and_shapes_equal_the_checkpoint) {
  for (const std::string model : {"sd15_tiny", "sdxl_tiny"}) {
    auto folder = unet_folder(model);
    auto unet = UNet2DConditionModel::from_config(UNetConfig::from_file(folder / "config.json"));
    auto ckpt = stylealigned::io::SafetensorsFile::open(folder / "diffusion_pytorch_model.safetensors");
    std::set<std::string> expected;
    for (const auto& info : ckpt.tensors()) expected.insert(info.name);
    std::set<std::string> actual;
    for (const auto& item : unet->named_parameters()) {
      actual.insert(item.key());
      if (ckpt.contains(item.key())) {
        EXPECT_EQ(item.value().sizes(), c10::IntArrayRef(ckpt.info(item.key()).shape)) << model << " " << item.key();
      }
    }
    EXPECT_EQ(actual, expected) << model;
    EXPECT_EQ(unet->named_buffers().size(), 0u);
  }
}

TEST(unet, from_pretrained_loads_every_checkpoint_tensor) {
  for (const std::string model : {"sd15_tiny", "sdxl_tiny"}) {
    auto& unet = golden_unet(model);
    auto ckpt = stylealigned::io::SafetensorsFile::open(unet_folder(model) / "diffusion_pytorch_model.safetensors");
    size_t n = 0;
    for (const auto& item : unet->named_parameters()) {
      const at::Tensor& p = item.value();
      EXPECT_TRUE(p.is_contiguous()) << item.key();  // a real tensor, not the pre-load placeholder
      EXPECT_EQ(p.storage().nbytes(), static_cast<size_t>(p.numel()) * sizeof(float)) << item.key();
      EXPECT_TRUE(p.equal(ckpt.tensor(item.key()))) << item.key();
      ++n;
    }
    EXPECT_EQ(n, ckpt.tensors().size());
    EXPECT_EQ(unet->config().block_out_channels,
              UNetConfig::from_file(unet_folder(model) / "config.json").block_out_channels);
  }
}

TEST(unet, from_pretrained_errors_name_the_file_and_tensors) {
  const fs::path empty = sa_test::scratch_dir("unet_empty");
  expect_error([&] { UNet2DConditionModel::from_pretrained(empty); }, {(empty / "config.json").string()});
  // SD1.5 config with SDXL weights: every mismatch is reported by name.
  const fs::path mixed = sa_test::scratch_dir("unet_mixed");
  fs::copy_file(unet_folder("sd15_tiny") / "config.json", mixed / "config.json", fs::copy_options::overwrite_existing);
  fs::remove(mixed / "diffusion_pytorch_model.safetensors");
  fs::create_symlink(unet_folder("sdxl_tiny") / "diffusion_pytorch_model.safetensors",
                     mixed / "diffusion_pytorch_model.safetensors");
  expect_error([&] { UNet2DConditionModel::from_pretrained(mixed); },
               {"diffusion_pytorch_model.safetensors", "add_embedding.linear_1.weight",
                "down_blocks.0.attentions.0.norm.weight"});
}

TEST(unet, processor_layers_follow_diffusers_attn_processors_order) {
  for (const std::string model : {"sd15_tiny", "sdxl_tiny"}) {
    auto unet = UNet2DConditionModel::from_config(UNetConfig::from_file(unet_folder(model) / "config.json"));
    std::vector<std::string> expected;
    for (const auto& key : sa_test::golden_manifest().at("models").at(model).at("unet_attention_processors_in_order")) {
      std::string name = key.get<std::string>();
      expected.push_back(name.substr(0, name.size() - std::string(".processor").size()));
    }
    EXPECT_EQ(unet->attention_layer_names(), expected) << model;
    EXPECT_EQ(unet->processors().layers(), expected) << model;
  }
}

TEST(unet, real_architectures_have_diffusers_layer_counts) {
  // REFERENCE_NOTES B2: SD1.5 has 32 attention processors, SDXL 140 (70 self-attention layers).
  auto sd15 = UNetConfig::stable_diffusion_v1_5();
  auto sdxl = UNetConfig::stable_diffusion_xl_base();
  EXPECT_EQ(sd15.num_attention_heads, (std::vector<int64_t>{8, 8, 8, 8}));
  EXPECT_EQ(sdxl.transformer_layers_per_block, (std::vector<int64_t>{1, 2, 10}));
  // Placeholder parameters (what from_pretrained builds before loading) keep this cheap: no weights are allocated.
  stylealigned::models::layers::PlaceholderParametersGuard placeholders;
  for (const auto& [config, layers, parameters] : {std::make_tuple(sd15, size_t{32}, int64_t{859520964}),
                                                   std::make_tuple(sdxl, size_t{140}, int64_t{2567463684})}) {
    auto unet = UNet2DConditionModel::from_config(config);
    EXPECT_EQ(unet->attention_layer_names().size(), layers);
    EXPECT_EQ(unet->attention_layer_names().back(),
              fmt::format("mid_block.attentions.0.transformer_blocks.{}.attn2", layers == 32 ? 0 : 9));
    int64_t count = 0;
    size_t stored = 0;
    for (const auto& p : unet->parameters()) {
      count += p.numel();
      stored += p.storage().nbytes();
    }
    EXPECT_EQ(count, parameters);  // diffusers' parameter counts of the real SD1.5 and SDXL-base UNets
    EXPECT_LT(stored, size_t{1} << 20);
  }
}

// ---- Config -----------------------------------------------------------------------------------------------------

TEST(unet_config, golden_configs_parse_with_diffusers_semantics) {
  auto sd15 = UNetConfig::from_file(unet_folder("sd15_tiny") / "config.json");
  EXPECT_EQ(sd15.num_attention_heads, (std::vector<int64_t>{2, 2, 2, 2}));  // attention_head_dim = head count
  EXPECT_EQ(sd15.cross_attention_dim, (std::vector<int64_t>{24, 24, 24, 24}));
  EXPECT_EQ(sd15.layers_per_block, (std::vector<int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(sd15.sample_size, 16);
  EXPECT_TRUE(sd15.addition_embed_type.empty());
  EXPECT_FALSE(sd15.use_linear_projection);

  auto sdxl = UNetConfig::from_file(unet_folder("sdxl_tiny") / "config.json");
  EXPECT_EQ(sdxl.num_attention_heads, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(sdxl.transformer_layers_per_block, (std::vector<int64_t>{1, 2, 2}));
  EXPECT_EQ(sdxl.addition_embed_type, "text_time");
  EXPECT_EQ(sdxl.addition_time_embed_dim, 8);
  EXPECT_EQ(sdxl.projection_class_embeddings_input_dim, 80);
  EXPECT_TRUE(sdxl.use_linear_projection);
  EXPECT_EQ(sdxl.time_embed_dim(), 64);
}

TEST(unet_config, hub_configs_of_sd15_and_sdxl_parse_to_the_real_architectures) {
  // The published unet/config.json files (abridged to the keys they set): SD1.5's predates most keys, SDXL's sets
  // upcast_attention to null.
  const auto sd15 = UNetConfig::from_json(R"({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
      "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
      "center_input_sample": false, "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D",
      "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"], "downsample_padding": 1,
      "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
      "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D",
      "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]})");
  const auto sdxl = UNetConfig::from_json(R"({"_class_name": "UNet2DConditionModel", "act_fn": "silu",
      "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
      "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": false,
      "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3, "conv_out_kernel": 3,
      "cross_attention_dim": 2048, "cross_attention_norm": null, "down_block_types": ["DownBlock2D",
      "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1, "dual_cross_attention": false,
      "encoder_hid_dim": null, "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0,
      "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
      "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
      "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
      "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
      "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
      "time_embedding_act_fn": null, "time_embedding_dim": null, "time_embedding_type": "positional",
      "timestep_post_act": null, "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D",
      "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": null, "use_linear_projection": true})");
  for (const auto& [parsed, expected] : {std::make_pair(sd15, UNetConfig::stable_diffusion_v1_5()),
                                         std::make_pair(sdxl, UNetConfig::stable_diffusion_xl_base())}) {
    EXPECT_EQ(parsed.block_out_channels, expected.block_out_channels);
    EXPECT_EQ(parsed.down_block_types, expected.down_block_types);
    EXPECT_EQ(parsed.up_block_types, expected.up_block_types);
    EXPECT_EQ(parsed.layers_per_block, expected.layers_per_block);
    EXPECT_EQ(parsed.num_attention_heads, expected.num_attention_heads);
    EXPECT_EQ(parsed.cross_attention_dim, expected.cross_attention_dim);
    EXPECT_EQ(parsed.transformer_layers_per_block, expected.transformer_layers_per_block);
    EXPECT_EQ(parsed.use_linear_projection, expected.use_linear_projection);
    EXPECT_EQ(parsed.upcast_attention, expected.upcast_attention);
    EXPECT_EQ(parsed.addition_embed_type, expected.addition_embed_type);
    EXPECT_EQ(parsed.addition_time_embed_dim, expected.addition_time_embed_dim);
    EXPECT_EQ(parsed.projection_class_embeddings_input_dim, expected.projection_class_embeddings_input_dim);
    EXPECT_EQ(parsed.sample_size, expected.sample_size);
    EXPECT_EQ(parsed.time_embed_dim(), expected.time_embed_dim());
  }
}

TEST(unet_config, num_attention_heads_wins_over_attention_head_dim) {
  auto c = UNetConfig::from_json(R"({"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D",
      "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 8,
      "num_attention_heads": [2, 4], "some_future_key": {"x": 1}})");
  EXPECT_EQ(c.num_attention_heads, (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(c.layers_per_block, (std::vector<int64_t>{2, 2}));  // diffusers default, repeated per level
}

TEST(unet_config, unsupported_values_name_the_key) {
  const std::string base = unet_config_text("sd15_tiny");
  auto with = [&](const std::string& key, const json& value) {
    json j = json::parse(base);
    j[key] = value;
    return j.dump();
  };
  const std::vector<std::pair<std::string, json>> unsupported = {
      {"class_embed_type", "timestep"},
      {"encoder_hid_dim", 32},
      {"time_cond_proj_dim", 16},
      {"attention_type", "gated"},
      {"dual_cross_attention", true},
      {"only_cross_attention", true},
      {"only_cross_attention", json::array({false, true, false, false})},
      {"resnet_time_scale_shift", "scale_shift"},
      {"reverse_transformer_layers_per_block", json::array({json::array({1}), json::array({1})})},
      {"addition_embed_type", "text"},
      {"act_fn", "gelu"},
      {"mid_block_type", "UNetMidBlock2DSimpleCrossAttn"},
      {"mid_block_type", nullptr},
      {"time_embedding_type", "fourier"},
      {"num_class_embeds", 10},
  };
  for (const auto& [key, value] : unsupported) {
    SCOPED_TRACE(key + " = " + value.dump());
    expect_error([&] { UNetConfig::from_json(with(key, value), "cfg.json"); }, {"cfg.json", key});
  }
  expect_error(
      [&] {
        UNetConfig::from_json(with("down_block_types", json::array({"CrossAttnDownBlock2D", "AttnDownBlock2D",
                                                                    "DownBlock2D", "DownBlock2D"})));
      },
      {"down_block_types", "AttnDownBlock2D"});
  expect_error([&] { UNetConfig::from_json(with("layers_per_block", json::array({1, 2}))); }, {"layers_per_block"});
  expect_error([&] { UNetConfig::from_json(with("norm_num_groups", "16")); }, {"norm_num_groups"});
  expect_error([&] { UNetConfig::from_json("[1, 2]", "cfg.json"); }, {"cfg.json"});
  expect_error([&] { UNetConfig::from_file("/nonexistent/config.json"); }, {"/nonexistent/config.json"});
}

// ---- Forward contract -------------------------------------------------------------------------------------------

TEST(unet, every_attention_layer_calls_its_processor_with_head_split_tensors) {
  auto& unet = golden_unet("sd15_tiny");
  auto recorder = std::make_shared<RecordingProcessor>();
  unet->processors().set_all(recorder);
  auto c = sa_test::golden_cases("unet").front();
  for (const auto& cc : sa_test::golden_cases("unet")) {
    if (cc.at("model") == "sd15_tiny") c = cc;
  }
  const at::Tensor with_recorder = run_case(unet, c);
  unet->processors().reset();
  const at::Tensor plain = run_case(unet, c);
  EXPECT_TRUE(with_recorder.equal(plain));

  const auto& layers = unet->attention_layer_names();
  ASSERT_EQ(recorder->calls.size(), layers.size());
  std::set<std::string> seen;
  const int64_t batch = golden_tensor(c, c.at("inputs").at("sample")).size(0);
  for (const auto& call : recorder->calls) {
    seen.insert(call.layer);
    const bool self = call.layer.size() > 5 && call.layer.substr(call.layer.size() - 5) == "attn1";
    EXPECT_EQ(call.kind,
              self ? stylealigned::AttentionKind::self_attention : stylealigned::AttentionKind::cross_attention)
        << call.layer;
    ASSERT_EQ(call.q.size(), 4u);
    EXPECT_EQ(call.q[0], batch);
    EXPECT_EQ(call.q[1], 2) << call.layer;  // 2 heads in the tiny SD1.5 model
    EXPECT_DOUBLE_EQ(call.scale, 1.0 / std::sqrt(static_cast<double>(call.q[3]))) << call.layer;
    if (!self) EXPECT_EQ(call.k[2], 77) << call.layer;  // cross-attention keys are the text tokens
  }
  EXPECT_EQ(seen, std::set<std::string>(layers.begin(), layers.end()));
}

TEST(unet, every_group_norm_goes_through_the_norm_hook) {
  auto& unet = golden_unet("sdxl_tiny");
  auto c = sa_test::golden_cases("unet").front();
  ASSERT_EQ(c.at("model"), "sdxl_tiny");
  const at::Tensor plain = run_case(unet, c);
  auto counter = std::make_shared<CountingNorm>();
  unet->set_norm_hook(counter);
  const at::Tensor hooked = run_case(unet, c);
  unet->set_norm_hook(nullptr);
  EXPECT_TRUE(hooked.equal(plain));
  // Two per ResNet block, one per Transformer2DModel, plus conv_norm_out.
  int64_t expected = 0;
  for (const auto& item : unet->named_modules()) {
    if (item.value()->name() == "ResnetBlock2D") expected += 2;
    if (item.value()->name() == "Transformer2DModel") expected += 1;
  }
  EXPECT_EQ(counter->calls, expected + 1);
  EXPECT_GT(expected, 20);
}

TEST(unet, timestep_forms_are_equivalent) {
  // diffusers broadcasts a 0-d or [1] timestep to the batch and embeds integer and float timesteps alike.
  auto& unet = golden_unet("sd15_tiny");
  at::NoGradGuard no_grad;
  const at::Tensor sample = at::randn({2, 4, 8, 8}, at::detail::createCPUGenerator(3));
  const at::Tensor text = at::randn({2, 5, 24}, at::detail::createCPUGenerator(4));
  const at::Tensor reference = unet->forward(sample, at::scalar_tensor(500, at::kLong), text);
  for (const at::Tensor& t :
       {at::full({1}, 500, at::kLong), at::full({2}, 500, at::kLong), at::scalar_tensor(500.0, at::kFloat),
        at::full({2}, 500.0, at::kDouble), at::full({2}, 500, at::kInt)}) {
    EXPECT_TRUE(unet->forward(sample, t, text).equal(reference)) << t;
  }
  EXPECT_FALSE(unet->forward(sample, at::tensor({500, 499}, at::kLong), text).equal(reference));
}

TEST(unet, bad_inputs_are_named) {
  auto& xl = golden_unet("sdxl_tiny");
  const auto c = sa_test::golden_cases("unet").front();
  ASSERT_EQ(c.at("model"), "sdxl_tiny");
  const auto& in = c.at("inputs");
  at::Tensor sample = golden_tensor(c, in.at("sample"));
  at::Tensor t = golden_tensor(c, in.at("timestep"));
  at::Tensor ehs = golden_tensor(c, in.at("encoder_hidden_states"));
  UNetForwardOptions opts;
  expect_error([&] { xl->forward(sample, t, ehs, opts); }, {"text_embeds"});
  opts.text_embeds = golden_tensor(c, in.at("text_embeds"));
  expect_error([&] { xl->forward(sample, t, ehs, opts); }, {"time_ids"});
  opts.time_ids = golden_tensor(c, in.at("time_ids"));
  const BatchLayout wrong = BatchLayout::cfg(2);
  opts.layout = &wrong;
  expect_error([&] { xl->forward(sample, t, ehs, opts); }, {"layout"});
  opts.layout = nullptr;
  expect_error([&] { xl->forward(sample.narrow(1, 0, 3), t, ehs, opts); }, {"sample"});
  expect_error([&] { xl->forward(sample, t, ehs.narrow(2, 0, 10), opts); }, {"encoder_hidden_states"});
  expect_error([&] { xl->forward(sample, at::zeros({3}, at::kLong), ehs, opts); }, {"timestep"});
}

TEST(unet, gradients_flow_to_every_parameter) {
  auto unet = UNet2DConditionModel::from_config(UNetConfig::from_file(unet_folder("sd15_tiny") / "config.json"));
  auto out = unet->forward(at::randn({2, 4, 8, 8}), at::tensor({10, 500}), at::randn({2, 7, 24}));
  out.square().mean().backward();
  for (const auto& item : unet->named_parameters()) {
    ASSERT_TRUE(item.value().grad().defined()) << item.key();
  }
}

// ---- Parity with diffusers ----------------------------------------------------------------------------------------

TEST(unet_parity, plain_forward_matches_diffusers) {
  const auto cases = sa_test::golden_cases("unet");
  ASSERT_EQ(cases.size(), 8u);
  for (const auto& [mode, layout_name] : kConvLayouts) {
    ScopedConvPacking packing(mode);
    for (const auto& c : cases) {
      auto& unet = golden_unet(c.at("model"));
      const auto& out = c.at("outputs").at("noise_pred");
      const at::Tensor expected = golden_tensor(c, out);
      const at::Tensor actual = run_case(unet, c);
      const double atol = tolerance(out);
      std::printf("  %-32s %-6s max abs err %.3g (atol %.3g)\n", c.at("id").get<std::string>().c_str(), layout_name,
                  sa_test::max_abs_diff(actual, expected), atol);
      EXPECT_TRUE(actual.is_contiguous()) << c.at("id") << " " << layout_name;
      EXPECT_ALLCLOSE(actual, expected, atol) << c.at("id") << " " << layout_name;
    }
  }
}

TEST(unet_parity, style_aligned_forward_matches_the_official_handler) {
  const auto cases = sa_test::golden_cases("unet_style_aligned");
  ASSERT_EQ(cases.size(), 4u);
  for (const auto& [mode, layout_name] : kConvLayouts) {
  ScopedConvPacking packing(mode);
  for (const auto& c : cases) {
    auto& unet = golden_unet(c.at("model"));
    const auto& args = c.at("options").at("style_aligned_args");
    stylealigned::StyleAlignedOptions opts;
    opts.share_group_norm = args.at("share_group_norm");
    opts.share_layer_norm = args.at("share_layer_norm");
    opts.share_attention = args.at("share_attention");
    opts.adain_queries = args.at("adain_queries");
    opts.adain_keys = args.at("adain_keys");
    opts.adain_values = args.at("adain_values");
    opts.full_attention_share = args.at("full_attention_share");
    opts.shared_score_scale = args.at("shared_score_scale");
    opts.shared_score_shift = args.at("shared_score_shift");
    opts.only_self_level = args.at("only_self_level");
    auto hook = stylealigned::install_style_aligned(unet->processors(), opts);
    EXPECT_EQ(hook != nullptr, opts.share_group_norm);
    unet->set_norm_hook(hook);

    const int64_t batch = golden_tensor(c, c.at("inputs").at("sample")).size(0);
    const BatchLayout layout = BatchLayout::cfg(batch / 2);  // [uncond ref, uncond 1, cond ref, cond 1]
    const auto& out = c.at("outputs").at("noise_pred");
    const at::Tensor expected = golden_tensor(c, out);
    const at::Tensor actual = run_case(unet, c, &layout);
    unet->processors().reset();
    unet->set_norm_hook(nullptr);

    const double atol = tolerance(out);
    std::printf("  %-32s %-6s max abs err %.3g (atol %.3g)\n", c.at("id").get<std::string>().c_str(), layout_name,
                sa_test::max_abs_diff(actual, expected), atol);
    EXPECT_ALLCLOSE(actual, expected, atol) << c.at("id") << " " << layout_name;
    // StyleAligned must actually change the targets (the case would be vacuous otherwise).
    const at::Tensor plain = run_case(unet, c, &layout);
    EXPECT_GT(sa_test::max_abs_diff(plain, expected), 10 * atol) << c.at("id");
  }
  }
}

// fp32 CPU inference sends Linear products through oneDNN's matmul (internal/onednn.h); it must equal at::linear
// (summation order aside) for every input rank, with and without bias, on column slices (GEGLU's halves), and
// leave autograd and small inputs alone.
TEST(layers, linear_through_onednn_equals_at_linear) {
#if STYLEALIGNED_EXPECT_ONEDNN
  // Built with oneDNN: the fast path must really run (a silent fallback would pass every comparison below).
  {
    at::NoGradGuard no_grad;
    ASSERT_TRUE(stylealigned::detail::onednn::enabled());
    EXPECT_TRUE(stylealigned::detail::onednn::linear(at::randn({64, 32}), at::randn({16, 32}), {}).defined());
  }
#endif
  {
    at::NoGradGuard no_grad;
    const at::Tensor wide = at::randn({2, 300, 640});
    const at::Tensor half = wide.narrow(-1, 320, 320);  // rows 640 apart
    const at::Tensor w = at::randn({96, 320}), b = at::randn({96});
    stylealigned::models::layers::Linear lin(320, 96, true);
    lin->weight.copy_(w);
    lin->bias.copy_(b);
    EXPECT_LT((lin->forward(half) - at::linear(half.contiguous(), w, b)).abs().max().item<float>(), 1e-4);
    // A slice that is not one matrix with uniform row stride (a transposed view) must still be right.
    const at::Tensor t = at::randn({320, 600}).t();
    EXPECT_LT((lin->forward(t) - at::linear(t.contiguous(), w, b)).abs().max().item<float>(), 1e-4);
  }
  at::manual_seed(3);
  for (bool bias : {true, false}) {
    stylealigned::models::layers::Linear lin(320, 1280, bias);
    for (const std::vector<int64_t>& shape :
         std::vector<std::vector<int64_t>>{{2, 4096, 320}, {8192, 320}, {3, 7, 320}}) {
      const at::Tensor x = at::randn(shape);
      const at::Tensor expected = at::linear(x, lin->weight, lin->bias);
      at::Tensor got;
      {
        at::NoGradGuard no_grad;
        got = lin->forward(x);
      }
      ASSERT_EQ(got.sizes(), expected.sizes());
      EXPECT_LT((got - expected).abs().max().item<float>(), 1e-4) << "bias " << bias << " rows " << x.numel() / 320;
    }
  }
  // Under autograd the product stays differentiable.
  stylealigned::models::layers::Linear lin(16, 8, true);
  const at::Tensor x = at::randn({2048, 16}).set_requires_grad(true);
  lin->forward(x).sum().backward();
  EXPECT_TRUE(x.grad().defined());
}

// Every convolution kind the models use: 3x3 same, 3x3 stride 2 with and without padding, 1x1, with and without bias.
struct ConvCase {
  int64_t n, cin, cout, hw, kernel, stride, padding;
  bool bias;
};
const std::vector<ConvCase> kConvCases{{2, 4, 32, 16, 3, 1, 1, true},
                                       {1, 64, 48, 9, 3, 2, 1, true},
                                       {3, 16, 16, 8, 3, 2, 0, true},
                                       {2, 40, 24, 12, 1, 1, 0, true},
                                       {2, 32, 32, 8, 3, 1, 1, false}};

stylealigned::models::layers::Conv2d make_case_conv(const ConvCase& c) {
  stylealigned::models::layers::Conv2d conv(c.cin, c.cout, c.kernel, c.stride, c.padding);
  if (!c.bias) conv->bias = at::Tensor();
  return conv;
}

// fp32 CPU inference sends convolutions through oneDNN on the plain NCHW / OIHW layout; every kind the models
// use (3x3 same, 3x3 stride 2 with and without padding, 1x1, with and without bias) must equal at::conv2d.
TEST(layers, conv_through_onednn_equals_at_conv2d) {
  at::manual_seed(5);
  at::NoGradGuard no_grad;
  for (const ConvCase& c : kConvCases) {
    stylealigned::models::layers::Conv2d conv = make_case_conv(c);
    const at::Tensor x = at::randn({c.n, c.cin, c.hw, c.hw});
    const at::Tensor expected = at::conv2d(x, conv->weight, conv->bias, {c.stride, c.stride}, {c.padding, c.padding});
    const at::Tensor got = conv->forward(x);
    ASSERT_EQ(got.sizes(), expected.sizes()) << c.cin << "->" << c.cout << " k" << c.kernel << " s" << c.stride;
    EXPECT_LT((got - expected).abs().max().item<float>(), 1e-4) << c.cin << "->" << c.cout << " k" << c.kernel;
#if STYLEALIGNED_EXPECT_ONEDNN
    EXPECT_TRUE(stylealigned::detail::onednn::conv2d(x, conv->weight, conv->bias, c.stride, c.padding).defined());
#endif
  }
  // A channels-last input is not the layout the plain kernel is set up for: the module copies it to NCHW first.
  ScopedConvPacking never(stylealigned::ConvWeightPacking::never);
  stylealigned::models::layers::Conv2d conv(8, 8, 3, 1, 1);
  const at::Tensor x = at::randn({1, 8, 6, 6}).contiguous(at::MemoryFormat::ChannelsLast);
  EXPECT_FALSE(stylealigned::detail::onednn::conv2d(x, conv->weight, conv->bias, 1, 1).defined());
  EXPECT_LT((conv->forward(x) - at::conv2d(x, conv->weight, conv->bias, 1, 1)).abs().max().item<float>(), 1e-4);
}

// Packed convolutions (ConvWeightPacking::always, bf16's default): weights reordered once per module for oneDNN's
// blocked kernels, activations channels-last. Same cases as above, from NCHW and channels-last inputs, must equal
// at::conv2d; an in-place weight update or a new weight tensor must never be served from the stale packed copy.
TEST(layers, packed_conv_equals_at_conv2d_and_follows_weight_updates) {
  at::manual_seed(6);
  at::NoGradGuard no_grad;
  ScopedConvPacking always(stylealigned::ConvWeightPacking::always);
  const auto cl = at::MemoryFormat::ChannelsLast;
  for (const ConvCase& c : kConvCases) {
    stylealigned::models::layers::Conv2d conv = make_case_conv(c);
    const std::string what = fmt::format("{}->{} k{} s{}", c.cin, c.cout, c.kernel, c.stride);
    for (const bool channels_last : {false, true}) {
      at::Tensor x = at::randn({c.n, c.cin, c.hw, c.hw});
      if (channels_last) x = x.contiguous(cl);
      const at::Tensor expected =
          at::conv2d(x.contiguous(), conv->weight, conv->bias, {c.stride, c.stride}, {c.padding, c.padding});
      const at::Tensor got = conv->forward(x);
      ASSERT_EQ(got.sizes(), expected.sizes()) << what;
      EXPECT_LT((got - expected).abs().max().item<float>(), 1e-4) << what << " channels_last " << channels_last;
#if STYLEALIGNED_EXPECT_ONEDNN
      const at::Tensor direct = stylealigned::detail::onednn::conv2d_packed(
          x, conv->weight, conv->bias, c.stride, c.padding, stylealigned::detail::onednn::PackedConvWeights());
      ASSERT_TRUE(direct.defined()) << what;
      EXPECT_TRUE(direct.is_contiguous(cl)) << what;
      EXPECT_TRUE(got.is_contiguous(cl)) << what;
#endif
    }
    // In place (what load_state_dict does) and replaced (what .to(dtype) does): the next call repacks.
    const at::Tensor x = at::randn({c.n, c.cin, c.hw, c.hw});
    conv->forward(x);
    conv->weight.mul_(-2.0);
    EXPECT_LT((conv->forward(x) - at::conv2d(x, conv->weight, conv->bias, c.stride, c.padding)).abs().max().item<float>(),
              1e-4)
        << what << " after an in-place update";
    conv->weight = at::randn_like(conv->weight);
    EXPECT_LT((conv->forward(x) - at::conv2d(x, conv->weight, conv->bias, c.stride, c.padding)).abs().max().item<float>(),
              1e-4)
        << what << " after a new weight tensor";
  }
}

// A module converted under InferenceMode (a host that loads and casts inside its inference scope) holds weights
// without a version counter; the packed path must still run, and still see an in-place edit made there.
TEST(layers, packed_conv_takes_inference_mode_weights) {
  at::manual_seed(7);
  ScopedConvPacking always(stylealigned::ConvWeightPacking::always);
  c10::InferenceMode inference;
  stylealigned::models::layers::Conv2d conv = make_case_conv(kConvCases[0]);
  conv->to(at::kDouble);
  conv->to(at::kFloat);  // now inference tensors
  ASSERT_TRUE(conv->weight.is_inference());
  const ConvCase& c = kConvCases[0];
  const at::Tensor x = at::randn({c.n, c.cin, c.hw, c.hw});
  auto error = [&] {
    return (conv->forward(x) - at::conv2d(x, conv->weight, conv->bias, c.stride, c.padding)).abs().max().item<float>();
  };
  EXPECT_LT(error(), 1e-4);
  conv->weight.mul_(-2.0);
  EXPECT_LT(error(), 1e-4) << "after an in-place update of an inference weight";
}

// bf16 on the packed path (the CPU default where bf16 is native; elsewhere ATen's bf16 kernel): equal to the fp32
// convolution of the same bf16-rounded values within bf16 output rounding.
TEST(layers, bf16_conv_matches_fp32_of_the_rounded_values) {
  at::manual_seed(7);
  at::NoGradGuard no_grad;
  stylealigned::models::layers::Conv2d conv(64, 32, 3, 1, 1);
  conv->weight = conv->weight.to(at::kBFloat16);
  conv->bias = conv->bias.to(at::kBFloat16);
  const at::Tensor x = at::randn({2, 64, 12, 12}).to(at::kBFloat16);
  const at::Tensor expected = at::conv2d(x.to(at::kFloat), conv->weight.to(at::kFloat), conv->bias.to(at::kFloat), 1, 1);
  const at::Tensor got = conv->forward(x);
  ASSERT_EQ(got.scalar_type(), at::kBFloat16);
  // Outputs are O(1): one bf16 rounding of the result is <= 2^-8 relative; 3e-2 absolute covers |y| up to ~4.
  const double err = (got.to(at::kFloat) - expected).abs().max().item<double>();
  std::printf("  bf16 conv max abs err %.3g (max |y| %.3g)\n", err, expected.abs().max().item<double>());
  EXPECT_LT(err, 3e-2 * std::max(1.0, expected.abs().max().item<double>() / 4.0));
#if STYLEALIGNED_EXPECT_ONEDNN
  if (stylealigned::cpu_has_native_bf16()) {
    EXPECT_TRUE(stylealigned::detail::onednn::pack_conv_weights(at::kBFloat16));
    EXPECT_TRUE(got.is_contiguous(at::MemoryFormat::ChannelsLast));
  }
#endif
}
