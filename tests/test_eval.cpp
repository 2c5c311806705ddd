// Evaluation models and metrics (issue 6) against transformers 4.36 + Pillow 9.4 (golden eval/manifest.json): PIL-exact
// preprocessing, CLIPModel, DINO ViTModel, text alignment, set consistency, and the errors a user can cause.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "stylealigned/error.h"
#include "stylealigned/eval/image_processor.h"
#include "stylealigned/eval/metrics.h"
#ifdef SA_TEST_HAVE_IMAGE
#include "stylealigned/image.h"
#endif
#include "stylealigned/io/safetensors.h"
#include "stylealigned/log.h"
#include "stylealigned/models/clip.h"
#include "stylealigned/models/tokenizer.h"
#include "stylealigned/models/vit.h"
#include "support/test_support.h"

namespace fs = std::filesystem;
namespace eval = stylealigned::eval;
namespace io = stylealigned::io;
namespace models = stylealigned::models;
using stylealigned::Error;

namespace {

// The issue's bars: embeddings and scores within 1e-4 on golden pixel_values; preprocessing within 1 uint8 level;
// scores within 1e-3 when computed from the PNG files. A case's suggested_atol wins when tighter.
constexpr double kEmbedAtol = 1e-4;
constexpr double kFromPngAtol = 1e-3;

const nlohmann::json& manifest() {
  static const nlohmann::json m = sa_test::read_json(sa_test::fixture("eval/manifest.json"));
  return m;
}

std::vector<nlohmann::json> cases_of(const std::string& kind) {
  std::vector<nlohmann::json> out;
  for (const auto& c : manifest().at("cases")) {
    if (c.at("kind") == kind) out.push_back(c);
  }
  return out;
}

nlohmann::json case_by_id(const std::string& id) {
  for (const auto& c : manifest().at("cases")) {
    if (c.at("id") == id) return c;
  }
  throw std::runtime_error("no golden case " + id);
}

const io::SafetensorsFile& data(const std::string& file) {
  static std::map<std::string, io::SafetensorsFile> files;
  auto it = files.find(file);
  if (it == files.end()) it = files.emplace(file, io::SafetensorsFile::open(sa_test::fixture("eval/" + file))).first;
  return it->second;
}

at::Tensor golden(const nlohmann::json& c, const nlohmann::json& ref) {
  return data(c.at("file")).tensor(ref.at("key").get<std::string>());
}
at::Tensor output(const nlohmann::json& c, const std::string& name) { return golden(c, c.at("outputs").at(name)); }
at::Tensor input(const nlohmann::json& c, const std::string& name) { return golden(c, c.at("inputs").at(name)); }

double atol_of(const nlohmann::json& c, const std::string& name, double cap = kEmbedAtol) {
  return std::min(cap, c.at("outputs").at(name).value("suggested_atol", cap));
}

// Compares, prints the observed error (for the report) and asserts the tolerance.
void expect_close(const std::string& what, const at::Tensor& actual, const at::Tensor& expected, double atol) {
  const double err = sa_test::max_abs_diff(actual, expected);
  std::printf("  %-58s max abs err %.3g (atol %.3g)\n", what.c_str(), err, atol);
  EXPECT_ALLCLOSE(actual, expected, atol) << what;
}

void copy_into(const fs::path& from, const fs::path& folder) {
  fs::copy_file(from, folder / from.filename(), fs::copy_options::overwrite_existing);
  fs::permissions(folder / from.filename(), fs::perms::owner_write, fs::perm_options::add);
}

// The golden CLIP folder, assembled in the build tree around the one committed copy of vocab.json / merges.txt.
fs::path clip_folder() { return sa_test::assembled_folder("eval/models/clip_tiny"); }

fs::path dino_folder() { return sa_test::fixture("eval/models/dino_tiny"); }

models::CLIPModel& clip_model() {
  static models::CLIPModel m = models::CLIPModel::from_pretrained(clip_folder());
  return m;
}
models::ViTModel& dino_model() {
  static models::ViTModel m = models::ViTModel::from_pretrained(dino_folder());
  return m;
}

// A golden picture as a user would have it: decoded from its PNG file (stylealigned::image), or, in builds without
// OpenCV, the golden uint8 copy, which golden_pictures_decode_identically_from_png shows to be the same pixels.
at::Tensor load_picture(const std::string& image_name) {
#ifdef SA_TEST_HAVE_IMAGE
  return stylealigned::image::read_rgb(sa_test::fixture("eval/inputs/" + image_name + ".png"));
#else
  return data("data/clip.safetensors").tensor("clip/preprocess/" + image_name + "/in/image_uint8_hwc");
#endif
}

std::vector<std::string> image_names() {
  std::vector<std::string> names;
  for (const auto& im : manifest().at("images")) names.push_back(im.at("name"));
  return names;
}

void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "no stylealigned::Error thrown (expected one mentioning " << needles.front() << ")";
  } catch (const Error& e) {
    std::printf("  error: %s\n", e.what());
    for (const auto& n : needles) {
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << "message lacks \"" << n << "\": " << e.what();
    }
  }
}

void write_text(const fs::path& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

}  // namespace

// Preprocessing ----------------------------------------------------------------------------------------------------

TEST(eval_preprocess, pil_resample_hand_computed_values) {
  // Downscale 4 -> 2 (bilinear, support 1 * 2): output 0 centres at 1.0 and reads x = 0..2 with triangle weights
  // 0.75, 0.75, 0.25; output 1 centres at 3.0 and reads x = 1..3 with 0.25, 0.75, 0.75 (x = 4 is outside); each
  // row normalised by its sum 1.75.
  const at::Tensor row = at::tensor({0, 100, 200, 255}, at::kByte).view({1, 4, 1});
  const at::Tensor out = eval::resize_like_pil(row, 2, 1, eval::Resample::bilinear);
  const double v0 = (0 * 0.75 + 100 * 0.75 + 200 * 0.25) / 1.75;    // 71.43
  const double v1 = (100 * 0.25 + 200 * 0.75 + 255 * 0.75) / 1.75;  // 209.29
  EXPECT_EQ(out[0][0][0].item<int>(), int(std::lround(v0)));
  EXPECT_EQ(out[0][1][0].item<int>(), int(std::lround(v1)));
  // Height-only resizes go through the vertical pass alone; the same numbers come out.
  EXPECT_TRUE(
      eval::resize_like_pil(row.view({4, 1, 1}), 1, 2, eval::Resample::bilinear).view({2}).equal(out.view({2})));
  // Bicubic rings at a hard edge (8 black, 8 white pixels, upscaled to 37): outputs 15 and 16 sit where only the
  // negative lobe reaches the white side, outputs 20 and up where only it reaches the black side. Their values below
  // 0 and above 255 must clamp, not wrap around.
  const at::Tensor edge = at::cat({at::zeros({1, 8, 3}, at::kByte), at::full({1, 8, 3}, 255, at::kByte)}, 1);
  const at::Tensor up = eval::resize_like_pil(edge, 37, 1, eval::Resample::bicubic);
  EXPECT_EQ(up.narrow(1, 0, 17).max().item<int>(), 0);
  EXPECT_EQ(up.narrow(1, 20, 17).min().item<int>(), 255);
  EXPECT_GT(up[0][18][0].item<int>(), 0);
  EXPECT_LT(up[0][18][0].item<int>(), 255);
  // A constant picture stays constant under every filter and direction.
  const at::Tensor flat = at::full({9, 13, 3}, 77, at::kByte);
  for (auto f : {eval::Resample::nearest, eval::Resample::box, eval::Resample::bilinear, eval::Resample::hamming,
                 eval::Resample::bicubic, eval::Resample::lanczos}) {
    SCOPED_TRACE(eval::to_string(f));
    EXPECT_TRUE(eval::resize_like_pil(flat, 5, 20, f).eq(77).all().item<bool>());
    EXPECT_TRUE(eval::resize_like_pil(flat, 31, 4, f).eq(77).all().item<bool>());
  }
  // Same size: an unchanged copy. Nearest: the source pixel under each output centre.
  EXPECT_TRUE(eval::resize_like_pil(edge, 16, 1, eval::Resample::bicubic).equal(edge));
  const at::Tensor ramp = at::arange(6, at::kByte).view({1, 6, 1});
  EXPECT_TRUE(
      eval::resize_like_pil(ramp, 3, 1, eval::Resample::nearest).view({3}).equal(at::tensor({1, 3, 5}, at::kByte)));
  expect_error([&] { eval::resize_like_pil(at::zeros({4, 4, 3}), 2, 2, eval::Resample::bilinear); }, {"uint8"});
  expect_error([&] { eval::resize_like_pil(flat, 0, 2, eval::Resample::bilinear); }, {"positive"});
}

#ifdef SA_TEST_HAVE_IMAGE
TEST(eval_preprocess, golden_pictures_decode_identically_from_png) {
  for (const auto& kind : {"clip_image_preprocess", "dino_image_preprocess"}) {
    for (const auto& c : cases_of(kind)) {
      SCOPED_TRACE(c.at("id").get<std::string>());
      const at::Tensor png =
          stylealigned::image::read_rgb(sa_test::fixture("eval/" + c.at("inputs").at("image_png").get<std::string>()));
      EXPECT_TRUE(png.equal(input(c, "image_uint8_hwc")));
    }
  }
}
#endif

TEST(eval_preprocess, resize_crop_normalise_match_transformers) {
  const auto clip = eval::ImageProcessor::from_folder(clip_folder());
  const auto dino = eval::ImageProcessor::from_folder(dino_folder());
  int checked = 0;
  for (const auto& kind : {"clip_image_preprocess", "dino_image_preprocess"}) {
    const bool is_clip = std::string(kind) == "clip_image_preprocess";
    const eval::ImageProcessor& processor = is_clip ? clip : dino;
    for (const auto& c : cases_of(kind)) {
      const std::string id = c.at("id");
      SCOPED_TRACE(id);
      const at::Tensor picture = input(c, "image_uint8_hwc");
      const auto hw = c.at("options").at("resize_hw");
      const auto size = eval::resize_output_size(processor.config(), picture.size(0), picture.size(1));
      EXPECT_EQ(size[0], hw[0].get<int64_t>());
      EXPECT_EQ(size[1], hw[1].get<int64_t>());

      // Resize: the issue allows 1 level; Pillow's integer arithmetic reproduced exactly gives 0.
      const at::Tensor resized = processor.resize(picture);
      const at::Tensor expected_resized = output(c, "resized_uint8_hwc");
      ASSERT_EQ(resized.sizes(), expected_resized.sizes());
      const double levels = sa_test::max_abs_diff(resized, expected_resized);
      const double off =
          (resized.to(at::kInt) - expected_resized.to(at::kInt)).ne(0).to(at::kDouble).mean().item<double>();
      std::printf("  %-40s resize max %.0f levels, %.2f%% of values differ\n", id.c_str(), levels, 100 * off);
      EXPECT_LE(levels, 1.0);

      // Crop and normalisation alone, from the golden intermediate pictures.
      at::Tensor cropped_golden = expected_resized;
      if (is_clip) {
        cropped_golden = output(c, "cropped_uint8_hwc");
        EXPECT_TRUE(processor.center_crop(expected_resized).equal(cropped_golden));
      }
      const double atol = atol_of(c, "pixel_values");
      expect_close(id + " normalize(golden picture)", processor.normalize(cropped_golden), output(c, "pixel_values"),
                   atol);
      // The whole chain from the uint8 picture.
      expect_close(id + " preprocess", processor.preprocess(picture), output(c, "pixel_values"), atol);
      ++checked;
    }
  }
  EXPECT_EQ(checked, 10);
}

TEST(eval_preprocess, both_config_formats_load) {
  // Current format (CLIPImageProcessor, dict sizes).
  const auto clip = eval::ImageProcessorConfig::from_file(clip_folder() / "preprocessor_config.json");
  EXPECT_EQ(clip.kind, eval::ImageProcessorConfig::Kind::clip);
  EXPECT_EQ(clip.shortest_edge, 28);
  EXPECT_TRUE(clip.do_center_crop);
  EXPECT_EQ(clip.crop_height, 28);
  EXPECT_EQ(clip.crop_width, 28);
  EXPECT_EQ(clip.resample, eval::Resample::bicubic);
  EXPECT_DOUBLE_EQ(clip.image_std[2], 0.27577711);
  // Legacy format (ViTFeatureExtractor, `size` an int, no rescale keys): a square resize, no crop, rescale 1/255.
  const auto dino = eval::ImageProcessorConfig::from_file(dino_folder() / "preprocessor_config.json");
  EXPECT_EQ(dino.kind, eval::ImageProcessorConfig::Kind::vit);
  EXPECT_EQ(dino.class_name, "ViTFeatureExtractor");
  EXPECT_EQ(dino.shortest_edge, 0);
  EXPECT_EQ(dino.height, 32);
  EXPECT_EQ(dino.width, 32);
  EXPECT_FALSE(dino.do_center_crop);
  EXPECT_TRUE(dino.do_rescale);
  EXPECT_DOUBLE_EQ(dino.rescale_factor, 1.0 / 255.0);
  EXPECT_EQ(dino.resample, eval::Resample::bilinear);
  EXPECT_DOUBLE_EQ(dino.image_mean[0], 0.485);

  // Legacy CLIP feature extractor (openai/clip-vit-* before image processors): int size = shortest edge, int crop.
  const fs::path dir = sa_test::scratch_dir("eval_configs");
  write_text(dir / "legacy_clip.json",
             R"({"feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224,
                 "do_center_crop": true, "resample": 3})");
  const auto legacy = eval::ImageProcessorConfig::from_file(dir / "legacy_clip.json");
  EXPECT_EQ(legacy.kind, eval::ImageProcessorConfig::Kind::clip);
  EXPECT_EQ(legacy.shortest_edge, 224);
  EXPECT_EQ(legacy.crop_height, 224);
  EXPECT_EQ(legacy.crop_width, 224);
  EXPECT_DOUBLE_EQ(legacy.image_mean[1], 0.4578275);  // CLIP's defaults, not ImageNet's
  EXPECT_EQ((eval::resize_output_size(legacy, 480, 640)), (std::array<int64_t, 2>{224, 298}));  // int(224*640/480)

  // Bad files name the file and the key.
  write_text(dir / "unknown.json", R"({"image_processor_type": "SiglipImageProcessor"})");
  expect_error([&] { eval::ImageProcessorConfig::from_file(dir / "unknown.json"); },
               {"unknown.json", "image_processor_type", "SiglipImageProcessor"});
  write_text(dir / "bad_size.json", R"({"image_processor_type": "CLIPImageProcessor", "size": {"longest": 3}})");
  expect_error([&] { eval::ImageProcessorConfig::from_file(dir / "bad_size.json"); }, {"bad_size.json", "'size'"});
  write_text(dir / "bad_resample.json", R"({"image_processor_type": "ViTImageProcessor", "resample": 9})");
  expect_error([&] { eval::ImageProcessorConfig::from_file(dir / "bad_resample.json"); }, {"'resample'"});
  write_text(dir / "bad_mean.json", R"({"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5]})");
  expect_error([&] { eval::ImageProcessorConfig::from_file(dir / "bad_mean.json"); }, {"'image_mean'"});
  expect_error([&] { eval::ImageProcessorConfig::from_file(dir / "missing.json"); }, {"missing.json"});
  expect_error([&] { eval::ImageProcessor::from_folder(dir / "no_such_model"); }, {"no_such_model"});
}

TEST(eval_preprocess, crop_pads_small_pictures_and_converts_channels) {
  eval::ImageProcessorConfig c;  // CLIP defaults, then a crop larger than the resize
  c.shortest_edge = 4;
  c.crop_height = c.crop_width = 6;
  const eval::ImageProcessor p(c);
  const at::Tensor small = at::full({4, 5, 3}, 200, at::kByte);
  const at::Tensor cropped = p.center_crop(small);
  ASSERT_EQ(cropped.sizes(), (at::IntArrayRef{6, 6, 3}));
  EXPECT_EQ(cropped.sum().item<int64_t>(), int64_t(200) * 4 * 5 * 3);  // the picture intact, zeros around it
  EXPECT_EQ(cropped[0][0][0].item<int>(), 0);
  EXPECT_EQ(cropped[1][1][0].item<int>(), 200);
  // Gray and RGBA pictures become RGB the way PIL's convert("RGB") does.
  const at::Tensor gray = at::full({8, 8}, 90, at::kByte);
  const at::Tensor rgba = at::full({8, 8, 4}, 90, at::kByte);
  const at::Tensor rgb = at::full({8, 8, 3}, 90, at::kByte);
  EXPECT_TRUE(p.preprocess(gray).equal(p.preprocess(rgb)));
  EXPECT_TRUE(p.preprocess(rgba).equal(p.preprocess(rgb)));
  expect_error([&] { p.preprocess(at::zeros({8, 8, 2}, at::kByte)); }, {"channels"});
  expect_error([&] { p.preprocess(std::vector<at::Tensor>{rgb, at::zeros({8, 8, 3})}); }, {"image 1", "uint8"});
}

// Models -----------------------------------------------------------------------------------------------------------

TEST(eval_models, clip_tokenizer_matches_golden_ids) {
  const auto c = case_by_id("clip/tokenize");
  const auto tokenizer = models::ClipTokenizer::from_folder(clip_folder());
  const auto prompts = c.at("inputs").at("prompts").get<std::vector<std::string>>();
  EXPECT_TRUE(tokenizer.encode_batch(prompts).equal(output(c, "input_ids")));
}

TEST(eval_models, clip_vision_matches_transformers) {
  const auto c = case_by_id("clip/vision");
  at::NoGradGuard no_grad;
  auto& model = clip_model();
  const at::Tensor pixels = input(c, "pixel_values");
  const auto out = model->encode_image(pixels, /*output_hidden_states=*/true);
  ASSERT_EQ(out.hidden_states.size(), size_t(model->config().vision.num_hidden_layers + 1));
  const std::map<std::string, at::Tensor> actual = {
      {"vision_embeddings_out", model->vision_embeddings(pixels)},
      {"vision_hidden_states", at::stack(out.hidden_states)},
      {"vision_last_hidden_state", out.last_hidden_state},
      {"vision_pooler_output", out.pooler_output},
      {"image_embeds_unnorm", out.image_embeds},
      {"image_embeds", out.image_embeds / out.image_embeds.norm(2, {-1}, true)},
  };
  for (const auto& [name, ref] : c.at("outputs").items()) {
    ASSERT_TRUE(actual.count(name)) << "no output for golden key " << name;
    expect_close("clip/vision " + name, actual.at(name), output(c, name), atol_of(c, name));
  }
  EXPECT_TRUE(model->get_image_features(pixels).equal(out.image_embeds));
}

TEST(eval_models, clip_text_matches_transformers) {
  const auto c = case_by_id("clip/text");
  at::NoGradGuard no_grad;
  auto& model = clip_model();
  models::CLIPTextForwardOptions options;
  options.output_hidden_states = true;
  options.attention_mask = input(c, "attention_mask");
  const at::Tensor ids = input(c, "input_ids");
  const auto out = model->encode_text(ids, options);
  const std::map<std::string, at::Tensor> actual = {
      {"text_hidden_states", at::stack(out.hidden_states)},
      {"text_last_hidden_state", out.last_hidden_state},
      {"text_pooler_output", out.pooler_output},
      {"text_embeds_unnorm", out.text_embeds},
      {"text_embeds", out.text_embeds / out.text_embeds.norm(2, {-1}, true)},
  };
  for (const auto& [name, ref] : c.at("outputs").items()) {
    ASSERT_TRUE(actual.count(name)) << "no output for golden key " << name;
    expect_close("clip/text " + name, actual.at(name), output(c, name), atol_of(c, name));
  }
  // The pooled output does not depend on the padding mask (causal attention); get_text_features passes none.
  expect_close("clip/text get_text_features without mask", model->get_text_features(ids),
               output(c, "text_embeds_unnorm"), atol_of(c, "text_embeds_unnorm"));
  // logit_scale is a parameter of the checkpoint (set to log(100) in the golden model).
  const auto a = case_by_id("clip/text_alignment");
  expect_close("clip logit_scale.exp()", model->logit_scale().exp(), output(a, "logit_scale_exp"),
               atol_of(a, "logit_scale_exp"));
}

TEST(eval_models, dino_matches_transformers) {
  const auto c = case_by_id("dino/embed");
  at::NoGradGuard no_grad;
  auto& model = dino_model();
  EXPECT_DOUBLE_EQ(model->config().layer_norm_eps, 1e-12);
  const auto out = model->forward(input(c, "pixel_values"), /*output_hidden_states=*/true);
  const at::Tensor cls = out.cls_embeds();
  const std::map<std::string, at::Tensor> actual = {
      {"hidden_states", at::stack(out.hidden_states)},
      {"last_hidden_state", out.last_hidden_state},
      {"cls_embeds", cls},
      {"cls_embeds_normalized", cls / cls.norm(2, {-1}, true)},
      {"cosine_all", eval::cosine_matrix(cls, cls)},
  };
  for (const auto& [name, ref] : c.at("outputs").items()) {
    ASSERT_TRUE(actual.count(name)) << "no output for golden key " << name;
    expect_close("dino/embed " + name, actual.at(name), output(c, name), atol_of(c, name));
  }
  // A picture of another size is a clear error (position embeddings are not interpolated).
  expect_error([&] { model->forward(at::zeros({1, 3, 48, 48})); }, {"pixel_values", "32"});
}

TEST(eval_models, real_sized_configs_have_transformers_parameter_counts) {
  // Default configs are transformers' defaults: CLIPModel() is openai/clip-vit-base-patch32 (151,277,313 parameters)
  // and ViTModel(add_pooling_layer=False) is ViT-B/16 (85,798,656). Built without initialisation: no weights touched.
  auto count = [](const torch::nn::Module& m) {
    int64_t n = 0;
    for (const auto& p : m.parameters()) n += p.numel();
    return n;
  };
  const auto clip = std::make_shared<models::CLIPModelImpl>(models::CLIPConfig{}, /*initialize=*/false);
  EXPECT_EQ(count(*clip), 151277313);
  const auto names = clip->named_parameters().keys();
  for (const char* name : {"logit_scale", "text_projection.weight", "visual_projection.weight",
                           "vision_model.pre_layrnorm.weight", "vision_model.embeddings.class_embedding",
                           "vision_model.encoder.layers.11.mlp.fc2.bias",
                           "text_model.encoder.layers.11.self_attn.out_proj.weight"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), name), names.end()) << name;
  }
  const auto vit = std::make_shared<models::ViTModelImpl>(models::ViTConfig{}, /*initialize=*/false);
  EXPECT_EQ(count(*vit), 85798656);
  models::ViTConfig dino_b8;
  dino_b8.patch_size = 8;  // facebook/dino-vitb8
  EXPECT_EQ(count(models::ViTModelImpl(dino_b8, false)), 85807872);
}

// Metrics on golden embeddings --------------------------------------------------------------------------------------

TEST(eval_metrics, text_alignment_matches_golden) {
  const auto c = case_by_id("clip/text_alignment");
  const at::Tensor img = input(c, "image_embeds"), txt = input(c, "text_embeds"), pairs = input(c, "pairs");
  const at::Tensor cos = eval::cosine_matrix(img, txt);
  expect_close("text_alignment cosine", cos, output(c, "cosine"), atol_of(c, "cosine"));
  const double scale = clip_model()->logit_scale().exp().item<double>();
  expect_close("text_alignment logits_per_image", cos * scale, output(c, "logits_per_image"),
               atol_of(c, "logits_per_image"));
  expect_close("text_alignment logits_per_text", cos.t() * scale, output(c, "logits_per_text"),
               atol_of(c, "logits_per_text"));
  const at::Tensor pair =
      eval::paired_cosine(img.index_select(0, pairs.select(1, 0)), txt.index_select(0, pairs.select(1, 1)));
  expect_close("text_alignment pair_cosine", pair, output(c, "pair_cosine"), atol_of(c, "pair_cosine"));
  const double mean =
      eval::mean_std(std::vector<double>(pair.data_ptr<float>(), pair.data_ptr<float>() + pair.numel())).mean;
  expect_close("text_alignment mean", at::scalar_tensor(mean), output(c, "text_alignment"),
               atol_of(c, "text_alignment"));
}

TEST(eval_metrics, set_consistency_and_summary_match_golden) {
  std::vector<eval::SetScores> sets;
  for (const auto& c : cases_of("dino_set_consistency")) {
    const std::string id = c.at("id");
    const at::Tensor cls = input(c, "cls_embeds");
    expect_close(id + " cosine", eval::cosine_matrix(cls, cls), output(c, "cosine"), atol_of(c, "cosine"));
    expect_close(id + " pair_cosine", eval::pairwise_cosine(cls), output(c, "pair_cosine"), atol_of(c, "pair_cosine"));
    const double sc = eval::set_consistency(cls);
    expect_close(id + " set_consistency", at::scalar_tensor(sc), output(c, "set_consistency"),
                 atol_of(c, "set_consistency"));
    eval::SetScores s;
    s.name = id;
    s.set_consistency = sc;
    s.mean_text_alignment = 0.0;
    sets.push_back(s);
  }
  ASSERT_EQ(sets.size(), 2u);
  const auto summary_case = case_by_id("metrics/summary");
  const auto summary = eval::summarize(sets);
  EXPECT_EQ(summary.set_consistency.count, 2);
  expect_close("metrics/summary set_consistency_mean", at::scalar_tensor(summary.set_consistency.mean),
               output(summary_case, "set_consistency_mean"), atol_of(summary_case, "set_consistency_mean"));
  // Population std of the two per-set values.
  const auto per_set = summary_case.at("values").at("set_consistency_per_set").get<std::vector<double>>();
  EXPECT_NEAR(summary.set_consistency.std, std::abs(per_set[0] - per_set[1]) / 2, 1e-5);
}

TEST(eval_metrics, statistics) {
  const auto ms = eval::mean_std({1.0, 2.0, 3.0, 4.0});
  EXPECT_DOUBLE_EQ(ms.mean, 2.5);
  EXPECT_DOUBLE_EQ(ms.std, std::sqrt(1.25));
  EXPECT_EQ(ms.count, 4);
  EXPECT_DOUBLE_EQ(eval::mean_std({0.3}).std, 0.0);
  expect_error([] { eval::mean_std({}); }, {"no values"});
  // Orthogonal unit vectors have cosine 0, a vector with itself 1, scale does not matter.
  const at::Tensor e = at::tensor({3.0f, 0.0f, 0.0f, 0.0f, 2.0f, 0.0f, 5.0f, 0.0f, 0.0f}).view({3, 3});
  EXPECT_TRUE(eval::pairwise_cosine(e).equal(at::tensor({0.0f, 1.0f, 0.0f})));
  EXPECT_NEAR(eval::set_consistency(e), 1.0 / 3.0, 1e-7);
  expect_error([] { eval::cosine_matrix(at::ones({2, 3}), at::ones({2, 4})); }, {"sizes differ"});
}

// From PNG files to scores ------------------------------------------------------------------------------------------

TEST(eval_end_to_end, scores_from_png_files_match_golden) {
  const auto evaluator = eval::Evaluator::from_folders(clip_folder(), dino_folder(), {{}, /*batch_size=*/2});
  const auto names = image_names();
  std::vector<at::Tensor> images;
  for (const auto& n : names) images.push_back(load_picture(n));

  // Embeddings from the golden pixel_values through the scorers (1e-4), then from the PNGs.
  const auto vision = case_by_id("clip/vision");
  expect_close("scorer CLIP image embeds (golden pixels)",
               evaluator.clip().image_embeds_from_pixels(input(vision, "pixel_values")), output(vision, "image_embeds"),
               atol_of(vision, "image_embeds"));
  expect_close("scorer CLIP image embeds (PNG)", evaluator.clip().image_embeds(images), output(vision, "image_embeds"),
               kFromPngAtol);
  const auto text = case_by_id("clip/text");
  const auto prompts = text.at("inputs").at("prompts").get<std::vector<std::string>>();
  std::vector<std::string> warnings;
  auto previous = stylealigned::set_warning_handler([&](std::string_view m) { warnings.emplace_back(m); });
  expect_close("scorer CLIP text embeds", evaluator.clip().text_embeds(prompts), output(text, "text_embeds"),
               atol_of(text, "text_embeds"));
  stylealigned::set_warning_handler(previous);
  ASSERT_EQ(warnings.size(), 1u);  // the 98-token prompt is truncated, as transformers does
  EXPECT_NE(warnings[0].find("text 4"), std::string::npos) << warnings[0];
  const auto embed = case_by_id("dino/embed");
  expect_close("scorer DINO embeds (golden pixels)", evaluator.dino().embeds_from_pixels(input(embed, "pixel_values")),
               output(embed, "cls_embeds"), atol_of(embed, "cls_embeds"));

  // Text alignment: image i against prompt i (the golden pairs are the diagonal).
  const auto alignment = case_by_id("clip/text_alignment");
  const auto pair_golden = alignment.at("values").at("pair_cosine").get<std::vector<double>>();
  const auto scored = evaluator.clip().score(images, prompts);
  ASSERT_EQ(scored.size(), pair_golden.size());
  for (size_t i = 0; i < scored.size(); ++i) {
    std::printf("  text alignment from PNG, image %zu: %.6f vs golden %.6f (err %.2g, atol %.0e)\n", i, scored[i],
                pair_golden[i], std::abs(scored[i] - pair_golden[i]), kFromPngAtol);
    EXPECT_NEAR(scored[i], pair_golden[i], kFromPngAtol);
  }

  // Set consistency per golden set, then the summary.
  std::vector<eval::SetScores> sets;
  for (const auto& c : cases_of("dino_set_consistency")) {
    std::vector<at::Tensor> members;
    std::vector<std::string> texts;
    for (const auto& n : c.at("inputs").at("images")) {
      const auto it = std::find(names.begin(), names.end(), n.get<std::string>());
      members.push_back(images[size_t(it - names.begin())]);
      texts.push_back(prompts[size_t(it - names.begin())]);
    }
    const auto s = evaluator.score_set(c.at("id"), members, texts);
    const double expected = c.at("values").at("set_consistency");
    std::printf("  set consistency from PNG, %s: %.6f vs golden %.6f (err %.2g, atol %.0e)\n",
                c.at("id").get<std::string>().c_str(), s.set_consistency, expected,
                std::abs(s.set_consistency - expected), kFromPngAtol);
    EXPECT_NEAR(s.set_consistency, expected, kFromPngAtol);
    ASSERT_EQ(s.text_alignment.size(), members.size());
    sets.push_back(s);
  }
  const auto summary = eval::summarize(sets);
  const double expected_mean = case_by_id("metrics/summary").at("values").at("set_consistency_mean");
  EXPECT_NEAR(summary.set_consistency.mean, expected_mean, kFromPngAtol);
  EXPECT_EQ(summary.text_alignment.count, 2);
}

// Errors a user can cause -------------------------------------------------------------------------------------------

TEST(eval_errors, missing_folder_wrong_model_type_unreadable_image_small_set) {
  const fs::path dir = sa_test::scratch_dir("eval_errors");
  // Missing folders.
  expect_error([&] { eval::TextAlignmentScorer::from_folder(dir / "no_clip_here"); }, {"no_clip_here", "CLIP"});
  expect_error([&] { eval::SetConsistencyScorer::from_folder(dir / "no_dino_here"); }, {"no_dino_here"});
  // A DINO folder given as CLIP and the other way round: model_type says so before any weight is read.
  expect_error([&] { eval::TextAlignmentScorer::from_folder(dino_folder()); },
               {"config.json", "model_type", "\"vit\"", "clip"});
  expect_error([&] { eval::SetConsistencyScorer::from_folder(clip_folder()); },
               {"config.json", "model_type", "\"clip\"", "vit"});
  // A folder with a config but no weights.
  const fs::path empty = dir / "config_only";
  fs::create_directories(empty);
  copy_into(dino_folder() / "config.json", empty);
  expect_error([&] { models::ViTModel::from_pretrained(empty); }, {"config_only"});
  // Unreadable images (stylealigned::image) and bad tensors (the library API).
#ifdef SA_TEST_HAVE_IMAGE
  write_text(dir / "broken.png", "this is not a PNG");
  expect_error([&] { stylealigned::image::read_rgb(dir / "broken.png"); }, {"broken.png"});
#endif
  const auto evaluator = eval::Evaluator::from_folders(clip_folder(), dino_folder());
  const at::Tensor a = at::full({20, 30, 3}, 10, at::kByte), b = at::full({30, 20, 3}, 200, at::kByte);
  expect_error([&] { evaluator.dino().embeds({a, at::zeros({20, 30, 3})}); }, {"image 1", "uint8"});
  // Sets need two images.
  expect_error([&] { evaluator.score_set("lonely", {a}, {"a cat"}); }, {"lonely", "at least two images"});
  expect_error([&] { evaluator.dino().score({a}); }, {"at least two images"});
  expect_error([&] { eval::set_consistency(at::ones({1, 8})); }, {"at least two"});
  // A processor configuration that leaves pictures of different shapes at different sizes cannot batch them.
  const fs::path uncropped = dir / "clip_uncropped";
  fs::create_directories(uncropped);
  for (const auto& entry : fs::directory_iterator(clip_folder())) copy_into(entry.path(), uncropped);
  write_text(
      uncropped / "preprocessor_config.json",
      R"({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28}, "do_center_crop": false})");
  expect_error(
      [&] {
        eval::TextAlignmentScorer::from_folder(uncropped).image_embeds({a, b});
      },
      {"image 1", "no common size"});
  // Text counts must match (or be one for all).
  expect_error([&] { evaluator.score_set("mismatch", {a, b}, {"x", "y", "z"}); }, {"mismatch", "2 images but 3 texts"});
  const auto one_text = evaluator.score_set("shared text", {a, b}, {"a photo"});
  EXPECT_EQ(one_text.text_alignment.size(), 2u);
  EXPECT_TRUE(std::isfinite(one_text.set_consistency));
}
