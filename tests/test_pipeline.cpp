// Whole-pipeline parity with diffusers (+ the official StyleAligned handler and transfer procedure) on the tiny
// golden SD1.5 and SDXL folders, and the tool run as a user would run it.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <map>

#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/pipeline.h"
#include "stylealigned/runtime.h"
#include "support/test_support.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

stylealigned::Pipeline& pipeline_for(const std::string& model) {
  static std::map<std::string, std::unique_ptr<stylealigned::Pipeline>> cache;
  auto& slot = cache[model];
  if (!slot) {
    slot = std::make_unique<stylealigned::Pipeline>(
        stylealigned::Pipeline::load(sa_test::model_folder(model)));
  }
  return *slot;
}

stylealigned::StyleAlignedOptions sa_options(const json& a) {
  stylealigned::StyleAlignedOptions o;
  o.share_group_norm = a.at("share_group_norm").get<bool>();
  o.share_layer_norm = a.at("share_layer_norm").get<bool>();
  o.share_attention = a.at("share_attention").get<bool>();
  o.adain_queries = a.at("adain_queries").get<bool>();
  o.adain_keys = a.at("adain_keys").get<bool>();
  o.adain_values = a.at("adain_values").get<bool>();
  o.full_attention_share = a.at("full_attention_share").get<bool>();
  o.shared_score_scale = a.at("shared_score_scale").get<double>();
  o.shared_score_shift = a.at("shared_score_shift").get<double>();
  o.only_self_level = a.at("only_self_level").get<double>();
  return o;
}

struct Golden {
  stylealigned::io::SafetensorsFile file;
  const json& c;
  at::Tensor out(const std::string& name) const { return file.tensor(c["outputs"][name]["key"].get<std::string>()); }
  at::Tensor in(const std::string& name) const { return file.tensor(c["inputs"][name]["key"].get<std::string>()); }
  double atol(const std::string& name, double cap) const {
    return std::min(cap, c["outputs"][name].value("suggested_atol", cap));
  }
};

// Images compared as a user sees them: after quantisation to uint8, within `levels`.
::testing::AssertionResult images_close(const at::Tensor& ours, const at::Tensor& golden, int levels) {
  auto q = [](const at::Tensor& x) { return x.clamp(0, 1).mul(255).round().to(at::kInt); };
  return sa_test::AllClose(q(ours), q(golden), levels);
}

void check_generation(const Golden& g, const stylealigned::GenerationResult& r) {
  const auto steps = g.out("step_latents");
  ASSERT_EQ(static_cast<int64_t>(r.step_latents.size()), steps.size(0));
  for (int64_t i = 0; i < steps.size(0); ++i) {
    SCOPED_TRACE("step " + std::to_string(i));
    EXPECT_ALLCLOSE(r.step_latents[i], steps[i], g.atol("step_latents", 1e-3));
  }
  const auto ts = g.out("timesteps");
  ASSERT_EQ(static_cast<int64_t>(r.timesteps.size()), ts.size(0));
  for (int64_t i = 0; i < ts.size(0); ++i) EXPECT_EQ(r.timesteps[i], ts[i].item<int64_t>());
  EXPECT_ALLCLOSE(r.latents, g.out("latents_final"), g.atol("latents_final", 1e-3));
  EXPECT_ALLCLOSE(r.decoded, g.out("decoded_raw"), g.atol("decoded_raw", 1e-3));
  EXPECT_TRUE(images_close(r.images, g.out("images"), 2));
  std::printf("  %s: final latents max err %.3g, decoded max err %.3g\n", g.c["id"].get<std::string>().c_str(),
              sa_test::max_abs_diff(r.latents, g.out("latents_final")),
              sa_test::max_abs_diff(r.decoded, g.out("decoded_raw")));
}

}  // namespace

TEST(pipeline, golden_generation_cases) {
  int checked = 0;
  for (const auto& c : sa_test::golden_manifest()["cases"]) {
    if (c["kind"] != "pipeline") continue;
    SCOPED_TRACE(c["id"].get<std::string>());
    Golden g{stylealigned::io::SafetensorsFile::open(sa_test::fixture(c["file"].get<std::string>())), c};
    const auto& o = c["options"];
    stylealigned::GenerationRequest req;
    req.prompts = c["inputs"]["prompts"].get<std::vector<std::string>>();
    req.latents = g.in("latents");
    req.steps = o["num_inference_steps"].get<int64_t>();
    req.guidance_scale = o["guidance_scale"].get<double>();
    req.width = o["width"].get<int64_t>();
    req.height = o["height"].get<int64_t>();
    req.eta = o["eta"].get<double>();
    if (o.contains("style_aligned_args")) req.style_aligned = sa_options(o["style_aligned_args"]);
    req.scheduler = stylealigned::SchedulerConfig::from_json(o["scheduler_config"].dump(), "golden scheduler");
    req.record_steps = true;
    auto& pipe = pipeline_for(c["model"].get<std::string>());
    auto r = pipe.generate(req);
    check_generation(g, r);
    ++checked;
  }
  EXPECT_EQ(checked, 5);
}

TEST(pipeline, golden_inversion_transfer) {
  int checked = 0;
  for (const auto& c : sa_test::golden_manifest()["cases"]) {
    if (c["kind"] != "inversion") continue;
    Golden g{stylealigned::io::SafetensorsFile::open(sa_test::fixture(c["file"].get<std::string>())), c};
    const auto& o = c["options"];
    auto& pipe = pipeline_for(c["model"].get<std::string>());
    auto rgb = g.in("image_uint8_hwc");
    auto z0 = pipe.encode_image(rgb);
    EXPECT_ALLCLOSE(z0, g.out("z0_encoded"), g.atol("z0_encoded", 1e-4));

    auto prompts = c["inputs"]["prompts"].get<std::vector<std::string>>();
    stylealigned::GenerationRequest req;
    req.prompts.assign(prompts.begin() + 1, prompts.end());
    stylealigned::ReferenceImage ref;
    ref.rgb = rgb;
    ref.caption = c["inputs"]["src_prompt"].get<std::string>();
    ref.inversion_guidance = o["inversion_guidance_scale"].get<double>();
    ref.offset = o["offset"].get<int64_t>();
    req.reference = ref;
    req.latents = g.in("random_latents");
    req.steps = o["num_inference_steps"].get<int64_t>();
    req.guidance_scale = o["guidance_scale"].get<double>();
    req.width = o["width"].get<int64_t>();
    req.height = o["height"].get<int64_t>();
    req.style_aligned = sa_options(o["style_aligned_args"]);
    req.scheduler = stylealigned::SchedulerConfig::from_json(o["scheduler_config"].dump(), "golden scheduler");
    req.record_steps = true;
    auto r = pipe.generate(req);
    EXPECT_ALLCLOSE(r.inversion_trajectory, g.out("zts"), g.atol("zts", 5e-3));
    EXPECT_ALLCLOSE(r.initial_latents, g.out("latents_initial"), g.atol("latents_initial", 5e-3));
    check_generation(g, r);
    ++checked;

    // Two transfer sets in one batch (generate_batch): each keeps its own inverted reference row.
    stylealigned::GenerationRequest other = req;
    other.reference->rgb = rgb.flip({1}).contiguous();
    other.latents = req.latents.flip({0}).contiguous();
    other.record_steps = false;
    const auto both = pipe.generate_batch({req, other});
    const auto alone = pipe.generate(other);
    EXPECT_ALLCLOSE(both[0].latents, r.latents, 1e-4);
    EXPECT_ALLCLOSE(both[1].latents, alone.latents, 1e-4);
    EXPECT_TRUE(both[1].inversion_trajectory.equal(alone.inversion_trajectory));
    EXPECT_GT(sa_test::max_abs_diff(both[1].latents, both[0].latents), 0.1);  // the sets really differ
  }
  EXPECT_EQ(checked, 1);
}

TEST(pipeline, seeds_draw_diffusers_initial_latents) {
  auto file = stylealigned::io::SafetensorsFile::open(sa_test::fixture("data/initial_latents.safetensors"));
  auto meta = sa_test::read_json(sa_test::fixture("data/initial_latents.json"));
  int checked = 0;
  for (const auto& c : meta["cases"]) {
    auto shape = c["shape"].get<std::vector<int64_t>>();
    auto ours = stylealigned::initial_latents(c["seed"].get<uint64_t>(), shape[0], shape[1], shape[2], shape[3]);
    EXPECT_TRUE(ours.equal(file.tensor(c["key"].get<std::string>()))) << c["key"];
    ++checked;
  }
  EXPECT_EQ(checked, 9);
}

TEST(pipeline, same_seed_same_bytes_and_no_cfg_runs) {
  auto& pipe = pipeline_for("sdxl_tiny");
  stylealigned::GenerationRequest req;
  req.prompts = {"a toy train", "a toy boat", "a toy car"};
  req.steps = 3;
  req.seed = 7;
  req.width = req.height = 64;
  req.style_aligned = stylealigned::StyleAlignedOptions::sdxl_demo();
  auto a = pipe.generate(req), b = pipe.generate(req);
  EXPECT_TRUE(a.latents.equal(b.latents));
  EXPECT_TRUE(a.images.equal(b.images));
  // guidance <= 1: one group without CFG, odd set size (the official code fails here).
  req.guidance_scale = 1.0;
  auto c = pipe.generate(req);
  EXPECT_EQ(c.latents.sizes(), a.latents.sizes());
  EXPECT_TRUE(at::isfinite(c.latents).all().item<bool>());
  EXPECT_FALSE(c.latents.equal(a.latents));
  // The reference row of a StyleAligned set equals a vanilla run of the reference alone (same latent).
  stylealigned::GenerationRequest solo = req;
  solo.prompts = {req.prompts[0]};
  solo.latents = a.initial_latents.narrow(0, 0, 1);
  solo.guidance_scale = 5.0;
  solo.style_aligned.reset();
  stylealigned::GenerationRequest set = req;
  set.guidance_scale = 5.0;
  set.latents = a.initial_latents;
  auto r_solo = pipe.generate(solo), r_set = pipe.generate(set);
  EXPECT_ALLCLOSE(r_set.latents.narrow(0, 0, 1), r_solo.latents, 1e-4);
}

// Several sets in one loop (generate_batch): each result matches generate() of its own request within float rounding
// (the batch changes GEMM blocking), on both families (SDXL: pooled embeddings and time ids per row), with sets of
// different sizes, seeds, negative prompts and guidance (one without CFG) sharing the StyleAligned options, so no set
// sees another's reference. One request gives generate()'s bytes; requests that disagree on a shared field are
// refused, naming the request and the field.
TEST(pipeline, batch_of_sets_matches_separate_sets) {
  for (const char* model : {"sd15_tiny", "sdxl_tiny"}) {
    SCOPED_TRACE(model);
    auto& pipe = pipeline_for(model);
    std::vector<stylealigned::GenerationRequest> reqs(3);
    reqs[0].prompts = {"a toy train", "a toy boat", "a toy car"};
    reqs[1].prompts = {"a red house", "a blue house"};
    reqs[1].negative_prompt = "blurry";
    reqs[1].guidance_scale = 3.0;
    reqs[2].prompts = {"a cat", "a dog", "a bird", "a fish"};
    reqs[2].guidance_scale = 1.0;
    for (size_t k = 0; k < reqs.size(); ++k) {
      reqs[k].seed = 11 + k;
      reqs[k].steps = 3;
      reqs[k].style_aligned = stylealigned::StyleAlignedOptions::sdxl_demo();
    }
    int steps_seen = 0;
    reqs[1].on_step = [&](const stylealigned::StepInfo& info) {
      EXPECT_EQ(info.latents->size(0), 2);
      ++steps_seen;
      return true;
    };
    const auto batch = pipe.generate_batch(reqs);
    ASSERT_EQ(batch.size(), reqs.size());
    EXPECT_EQ(steps_seen, 3);
    for (size_t k = 0; k < reqs.size(); ++k) {
      SCOPED_TRACE("set " + std::to_string(k));
      const auto one = pipe.generate(reqs[k]);
      EXPECT_TRUE(batch[k].initial_latents.equal(one.initial_latents));
      EXPECT_ALLCLOSE(batch[k].latents, one.latents, 1e-4);
      EXPECT_ALLCLOSE(batch[k].images, one.images, 1e-4);
      std::printf("  %s set %zu: batched vs alone, final latents max diff %.3g\n", model, k,
                  sa_test::max_abs_diff(batch[k].latents, one.latents));
    }
    EXPECT_TRUE(pipe.generate_batch({reqs[0]})[0].latents.equal(pipe.generate(reqs[0]).latents));

    const auto refused = [&](std::vector<stylealigned::GenerationRequest> bad, const std::string& needle) {
      try {
        pipe.generate_batch(bad);
        ADD_FAILURE() << "no error for " << needle;
      } catch (const stylealigned::Error& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      }
    };
    auto bad = reqs;
    bad[2].steps = 4;
    refused(bad, "requests[2]: steps differs");
    bad = reqs;
    bad[1].style_aligned->adain_values = true;
    refused(bad, "requests[1]: style_aligned differs");
    bad = reqs;
    bad[1].width = 2 * pipe.default_width();
    refused(bad, "requests[1]: width x height differs");
    bad = reqs;
    bad[2].eta = -1;
    refused(bad, "requests[2]: eta must be");
    refused({}, "no requests");
  }
}

// The VAE's dtype: fp32 unless asked (or the pipeline is bf16). A bf16 VAE decodes the same fp32 latents to fp32
// pixels within bf16 rounding (golden decodes span about [-1, 1]; bf16 keeps 8 bits of mantissa), and not bit for bit,
// which shows it ran in bf16.
TEST(pipeline, bf16_vae_decodes_within_bf16_rounding) {
  auto& fp32 = pipeline_for("sd15_tiny");
  EXPECT_EQ(fp32.vae_dtype(), at::kFloat);
  stylealigned::PipelineLoadOptions lo;
  lo.vae_dtype = at::kBFloat16;
  auto bf16 = stylealigned::Pipeline::load(sa_test::model_folder("sd15_tiny"), lo);
  EXPECT_EQ(bf16.vae_dtype(), at::kBFloat16);
  stylealigned::GenerationRequest req;
  req.prompts = {"a red cube", "a blue ball"};
  req.steps = 2;
  req.seed = 3;
  req.width = req.height = 64;
  const auto a = fp32.generate(req), b = bf16.generate(req);
  EXPECT_TRUE(a.latents.equal(b.latents));  // the UNet ran in fp32 in both
  ASSERT_EQ(b.decoded.scalar_type(), at::kFloat);
  ASSERT_EQ(b.images.scalar_type(), at::kFloat);
  const double err = sa_test::max_abs_diff(b.decoded, a.decoded);
  const double rel_l2 = ((b.decoded - a.decoded).norm() / a.decoded.norm()).item<double>();
  std::printf("  bf16 VAE decode: max |bf16 - fp32| %.3g (fp32 max |x| %.3g), relative L2 %.3g\n", err,
              a.decoded.abs().max().item<double>(), rel_l2);
  // Measured 0.042 / 1.7% (AVX-512 bf16): bounds with room for ATen's bf16 kernels on other CPUs, far below a
  // wrong decode (relative L2 of order 1).
  EXPECT_LT(err, 0.1);
  EXPECT_LT(rel_l2, 0.05);
  EXPECT_GT(err, 0.0);
  // A bf16 pipeline gets a bf16 VAE by default; an fp16 one keeps fp32 (force_upcast); other dtypes are refused.
  stylealigned::PipelineLoadOptions half;
  half.dtype = at::kHalf;
  if (stylealigned::cpu_supports_fp16_convolution()) {
    EXPECT_EQ(stylealigned::Pipeline::load(sa_test::model_folder("sd15_tiny"), half).vae_dtype(), at::kFloat);
  } else {
    // libtorch 1.13: no fp16 CPU convolution, so fp16 on the CPU is refused at load, naming the option.
    try {
      stylealigned::Pipeline::load(sa_test::model_folder("sd15_tiny"), half);
      ADD_FAILURE() << "an fp16 pipeline on the CPU loaded although this libtorch has no fp16 CPU convolution";
    } catch (const stylealigned::Error& e) {
      EXPECT_NE(std::string(e.what()).find("dtype float16 on the CPU"), std::string::npos) << e.what();
    }
    stylealigned::PipelineLoadOptions half_vae;
    half_vae.vae_dtype = at::kHalf;
    EXPECT_THROW(stylealigned::Pipeline::load(sa_test::model_folder("sd15_tiny"), half_vae), stylealigned::Error);
  }
  stylealigned::PipelineLoadOptions brain;
  brain.dtype = at::kBFloat16;
  EXPECT_EQ(stylealigned::Pipeline::load(sa_test::model_folder("sd15_tiny"), brain).vae_dtype(), at::kBFloat16);
  stylealigned::PipelineLoadOptions wide;
  wide.vae_dtype = at::kDouble;
  EXPECT_THROW(stylealigned::Pipeline::load(sa_test::model_folder("sd15_tiny"), wide), stylealigned::Error);
}

TEST(pipeline, callback_observes_and_cancels) {
  auto& pipe = pipeline_for("sd15_tiny");
  stylealigned::GenerationRequest req;
  req.prompts = {"a cat", "a dog"};
  req.steps = 4;
  int seen = 0;
  req.on_step = [&](const stylealigned::StepInfo& info) {
    EXPECT_EQ(info.step, seen);
    EXPECT_EQ(info.steps, 4);
    ++seen;
    return info.step < 1;  // cancel after the second step
  };
  EXPECT_THROW(pipe.generate(req), stylealigned::Cancelled);
  EXPECT_EQ(seen, 2);
}

TEST(pipeline, bad_requests_name_the_field) {
  auto& pipe = pipeline_for("sd15_tiny");
  auto expect_error = [&](stylealigned::GenerationRequest req, const std::string& needle) {
    try {
      pipe.generate(req);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const stylealigned::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  stylealigned::GenerationRequest ok;
  ok.prompts = {"a cat", "a dog"};
  ok.steps = 2;
  auto r = ok;
  r.steps = 0;
  expect_error(r, "steps");
  r = ok;
  r.guidance_scale = std::nan("");
  expect_error(r, "guidance");
  r = ok;
  r.guidance_scale = -1;
  expect_error(r, "guidance");
  r = ok;
  r.width = 100;
  expect_error(r, "multiples of 8");
  r = ok;
  r.latents = at::zeros({3, 4, 16, 16});
  expect_error(r, "latents");
  r = ok;
  r.latents = at::zeros({2, 4, 16, 16}, at::kLong);
  expect_error(r, "latents");
  r = ok;
  r.prompts.clear();
  expect_error(r, "prompt");
  EXPECT_THROW(stylealigned::Pipeline::load(sa_test::scratch_dir("pipeline") / "nope"), stylealigned::Error);
}
