// AutoencoderKL: parameter names, config parsing and errors, posterior sampling, and parity with diffusers 0.25.1
// (encode and decode) on the tiny SD1.5 / SDXL golden VAEs.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/models/vae.h"
#include "support/test_support.h"

namespace fs = std::filesystem;
using nlohmann::json;
using sa_test::golden_tensor;
using stylealigned::Error;
using stylealigned::models::AutoencoderKL;
using stylealigned::models::VAEConfig;

namespace {

fs::path vae_folder(const std::string& model) { return sa_test::fixture("models/" + model + "/vae"); }

AutoencoderKL& golden_vae(const std::string& model) {
  static std::map<std::string, AutoencoderKL> models;
  auto it = models.find(model);
  if (it == models.end()) {
    auto vae = AutoencoderKL::from_pretrained(vae_folder(model));
    vae->eval();
    it = models.emplace(model, vae).first;
  }
  return it->second;
}

double tolerance(const json& out) { return std::min(1e-4, out.value("suggested_atol", 1e-4)); }

void check(const json& c, const std::string& output, const at::Tensor& actual) {
  const auto& ref = c.at("outputs").at(output);
  const double atol = tolerance(ref);
  const at::Tensor expected = golden_tensor(c, ref);
  std::printf("  %-20s %-18s max abs err %.3g (atol %.3g)\n", c.at("id").get<std::string>().c_str(), output.c_str(),
              sa_test::max_abs_diff(actual, expected), atol);
  EXPECT_ALLCLOSE(actual, expected, atol) << c.at("id") << " " << output;
}

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

}  // namespace

TEST(vae, parameter_names_and_shapes_equal_the_checkpoint) {
  for (const std::string model : {"sd15_tiny", "sdxl_tiny"}) {
    auto folder = vae_folder(model);
    auto vae = AutoencoderKL::from_config(VAEConfig::from_file(folder / "config.json"));
    auto ckpt = stylealigned::io::SafetensorsFile::open(folder / "diffusion_pytorch_model.safetensors");
    std::set<std::string> expected;
    for (const auto& info : ckpt.tensors()) expected.insert(info.name);
    std::set<std::string> actual;
    for (const auto& item : vae->named_parameters()) {
      actual.insert(item.key());
      if (ckpt.contains(item.key())) {
        EXPECT_EQ(item.value().sizes(), c10::IntArrayRef(ckpt.info(item.key()).shape)) << model << " " << item.key();
      }
    }
    EXPECT_EQ(actual, expected) << model;
  }
}

TEST(vae, from_pretrained_loads_every_checkpoint_tensor) {
  for (const std::string model : {"sd15_tiny", "sdxl_tiny"}) {
    auto& vae = golden_vae(model);
    auto ckpt = stylealigned::io::SafetensorsFile::open(vae_folder(model) / "diffusion_pytorch_model.safetensors");
    size_t n = 0;
    for (const auto& item : vae->named_parameters()) {
      EXPECT_EQ(item.value().storage().nbytes(), static_cast<size_t>(item.value().numel()) * sizeof(float))
          << item.key();
      EXPECT_TRUE(item.value().equal(ckpt.tensor(item.key()))) << item.key();
      ++n;
    }
    EXPECT_EQ(n, ckpt.tensors().size());
  }
  expect_error([&] { AutoencoderKL::from_pretrained(sa_test::scratch_dir("vae_empty")); }, {"config.json"});
}

TEST(vae, from_pretrained_reads_deprecated_attention_names) {
  // Checkpoints from before diffusers' attention refactor (SD1.x's VAE) name the mid-block attention projections
  // query/key/value/proj_attn; diffusers renames them on load, and so must we.
  const fs::path legacy = sa_test::scratch_dir("vae_legacy");
  fs::copy_file(vae_folder("sdxl_tiny") / "config.json", legacy / "config.json", fs::copy_options::overwrite_existing);
  std::vector<std::pair<std::string, at::Tensor>> renamed;
  const std::vector<std::pair<std::string, std::string>> renames = {
      {".to_q.", ".query."}, {".to_k.", ".key."}, {".to_v.", ".value."}, {".to_out.0.", ".proj_attn."}};
  for (const auto& [name, tensor] :
       stylealigned::io::load_safetensors(vae_folder("sdxl_tiny") / "diffusion_pytorch_model.safetensors")) {
    std::string new_name = name;
    for (const auto& [from, to] : renames) {
      const auto pos = new_name.find(from);
      if (pos != std::string::npos) new_name.replace(pos, from.size(), to);
    }
    renamed.emplace_back(new_name, tensor);
  }
  stylealigned::io::save_safetensors(legacy / "diffusion_pytorch_model.safetensors", renamed);

  auto vae = AutoencoderKL::from_pretrained(legacy);
  EXPECT_TRUE(vae->config().legacy_attention_names);
  EXPECT_FALSE(golden_vae("sdxl_tiny")->config().legacy_attention_names);
  at::NoGradGuard no_grad;
  const at::Tensor latents = at::randn({1, 4, 2, 2}, at::detail::createCPUGenerator(5));
  EXPECT_TRUE(vae->decode(latents).equal(golden_vae("sdxl_tiny")->decode(latents)));
  const at::Tensor image = at::rand({1, 3, 16, 16}, at::detail::createCPUGenerator(6));
  EXPECT_TRUE(vae->encode(image).mean.equal(golden_vae("sdxl_tiny")->encode(image).mean));
}

TEST(vae_config, golden_configs_parse) {
  auto sd15 = VAEConfig::from_file(vae_folder("sd15_tiny") / "config.json");
  EXPECT_EQ(sd15.block_out_channels, (std::vector<int64_t>{16, 32, 32, 32}));
  EXPECT_EQ(sd15.layers_per_block, 2);
  EXPECT_EQ(sd15.norm_num_groups, 16);
  EXPECT_DOUBLE_EQ(sd15.scaling_factor, 0.18215);
  EXPECT_EQ(sd15.scale_factor(), 8);
  EXPECT_TRUE(sd15.force_upcast);
  EXPECT_FALSE(sd15.shift_factor.has_value());
  auto sdxl = VAEConfig::from_file(vae_folder("sdxl_tiny") / "config.json");
  EXPECT_DOUBLE_EQ(sdxl.scaling_factor, 0.13025);
  EXPECT_EQ(sdxl.layers_per_block, 1);
}

TEST(vae_config, unsupported_values_name_the_key) {
  std::ifstream in(vae_folder("sd15_tiny") / "config.json");
  const json base = json::parse(in);
  auto with = [&](const std::string& key, const json& value) {
    json j = base;
    j[key] = value;
    return j.dump();
  };
  expect_error([&] { VAEConfig::from_json(with("act_fn", "gelu"), "vae.json"); }, {"vae.json", "act_fn"});
  expect_error(
      [&] {
        VAEConfig::from_json(with("latents_mean", json::array({0.1, 0.2, 0.3, 0.4})));
      },
      {"latents_mean"});
  expect_error([&] { VAEConfig::from_json(with("norm_type", "spatial")); }, {"norm_type"});
  expect_error(
      [&] {
        VAEConfig::from_json(with("down_block_types", json::array({"DownEncoderBlock2D", "AttnDownEncoderBlock2D",
                                                                   "DownEncoderBlock2D", "DownEncoderBlock2D"})));
      },
      {"down_block_types"});
  expect_error([&] { VAEConfig::from_json(with("norm_num_groups", 5)); }, {"norm_num_groups"});
  expect_error([&] { VAEConfig::from_json(with("layers_per_block", "2")); }, {"layers_per_block"});
}

TEST(vae, bad_inputs_are_named) {
  auto& vae = golden_vae("sdxl_tiny");
  expect_error([&] { vae->encode(at::zeros({1, 4, 16, 16})); }, {"encode", "3"});
  expect_error([&] { vae->decode(at::zeros({1, 3, 2, 2})); }, {"decode", "4"});
}

TEST(vae, posterior_sample_is_mean_plus_std_times_seeded_noise) {
  auto& vae = golden_vae("sdxl_tiny");
  at::NoGradGuard no_grad;
  auto posterior = vae->encode(at::rand({1, 3, 16, 16}) * 2 - 1);
  EXPECT_EQ(posterior.mean.sizes(), (std::vector<int64_t>{1, 4, 2, 2}));
  auto a = posterior.sample(at::detail::createCPUGenerator(42));
  auto b = posterior.sample(at::detail::createCPUGenerator(42));
  auto noise = at::randn({1, 4, 2, 2}, at::detail::createCPUGenerator(42));
  EXPECT_TRUE(a.equal(b));
  EXPECT_TRUE(a.allclose(posterior.mean + posterior.std * noise));
  EXPECT_TRUE(posterior.mode().equal(posterior.mean));
}

TEST(vae, gradients_flow_through_encode_and_decode) {
  auto vae = AutoencoderKL::from_config(VAEConfig::from_file(vae_folder("sd15_tiny") / "config.json"));
  auto posterior = vae->encode(at::rand({1, 3, 16, 16}));
  auto image = vae->decode(posterior.sample(at::detail::createCPUGenerator(0)));
  (image.square().mean() + posterior.logvar.mean()).backward();
  for (const auto& item : vae->named_parameters()) ASSERT_TRUE(item.value().grad().defined()) << item.key();
}

TEST(vae_parity, encode_matches_diffusers) {
  const auto cases = sa_test::golden_cases("vae_encode");
  ASSERT_EQ(cases.size(), 2u);
  for (const auto& c : cases) {
    auto& vae = golden_vae(c.at("model"));
    at::NoGradGuard no_grad;
    auto posterior = vae->encode(golden_tensor(c, c.at("inputs").at("image")));
    check(c, "posterior_mean", posterior.mean);
    check(c, "posterior_logvar", posterior.logvar);
    check(c, "posterior_std", posterior.std);
    check(c, "latents_scaled", posterior.mean * vae->config().scaling_factor);
    EXPECT_DOUBLE_EQ(vae->config().scaling_factor, c.at("options").at("scaling_factor").get<double>());
  }
}

TEST(vae_parity, decode_matches_diffusers) {
  const auto cases = sa_test::golden_cases("vae_decode");
  ASSERT_EQ(cases.size(), 2u);
  for (const auto& c : cases) {
    auto& vae = golden_vae(c.at("model"));
    at::NoGradGuard no_grad;
    const at::Tensor latents = golden_tensor(c, c.at("inputs").at("latents"));
    const at::Tensor decoded = vae->decode(latents / vae->config().scaling_factor);
    check(c, "decoded", decoded);
    check(c, "image_pt", (decoded / 2 + 0.5).clamp(0, 1));
    EXPECT_EQ(vae->config().scale_factor(), c.at("options").at("vae_scale_factor").get<int64_t>());
  }
}
