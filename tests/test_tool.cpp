// The `stylealigned` binary, run as a user would: golden latents in, golden latents out; files, metadata, exit codes.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <fstream>

#include "stylealigned/eval/metrics.h"
#include "stylealigned/image.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/toy/world.h"
#include "support/test_support.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

sa_test::CommandResult run_tool(const std::string& args) {
  return sa_test::run_command(std::string(STYLEALIGNED_TOOL) + " " + args + " 2>&1");
}

std::string quote(const std::string& s) { return sa_test::shell_quote(s); }

const json& golden_case(const std::string& id) {
  for (const auto& c : sa_test::golden_manifest()["cases"]) {
    if (c["id"] == id) return c;
  }
  throw std::runtime_error("no golden case " + id);
}

}  // namespace

TEST(tool, generate_reproduces_golden_latents_through_files) {
  const auto& c = golden_case("pipeline/sd15_sa_default");
  auto golden = stylealigned::io::SafetensorsFile::open(sa_test::fixture(c["file"].get<std::string>()));
  auto dir = sa_test::scratch_dir("tool_generate");
  fs::remove_all(dir);
  fs::create_directories(dir);
  stylealigned::io::save_safetensors(dir / "initial.safetensors",
                                     {{"latents", golden.tensor(c["inputs"]["latents"]["key"].get<std::string>())}});
  std::string args = "generate --model " + quote(sa_test::model_folder("sd15_tiny").string());
  for (const auto& p : c["inputs"]["prompts"]) args += " --prompt " + quote(p.get<std::string>());
  args += " --steps 5 --guidance 7.5 --width 128 --height 128 --share-group-norm --share-layer-norm";
  args += " --latents " + quote((dir / "initial.safetensors").string());
  args += " --save-latents " + quote((dir / "final.safetensors").string());
  args += " --out " + quote((dir / "set").string()) + " --quiet --threads 2";
  auto r = run_tool(args);
  ASSERT_EQ(r.code, 0) << r.output;

  auto final_latents = stylealigned::io::SafetensorsFile::open(dir / "final.safetensors").tensor("latents");
  auto expected = golden.tensor(c["outputs"]["latents_final"]["key"].get<std::string>());
  EXPECT_ALLCLOSE(final_latents, expected, 1e-3);
  std::printf("  tool final latents max err %.3g\n", sa_test::max_abs_diff(final_latents, expected));

  for (const char* name : {"00-reference.png", "01.png", "02.png", "03.png", "grid.png", "settings.json"}) {
    EXPECT_TRUE(fs::exists(dir / "set" / name)) << name;
  }
  auto settings = sa_test::read_json(dir / "set" / "settings.json");
  EXPECT_EQ(settings["prompts"].size(), 4u);
  EXPECT_EQ(settings["steps"], 5);
  EXPECT_EQ(settings["style_aligned_options"]["share_group_norm"], true);
  EXPECT_EQ(settings["dtype"], "fp32");      // what ran
  EXPECT_EQ(settings["vae_dtype"], "fp32");  // auto with an fp32 pipeline
  auto text = stylealigned::image::read_png_text(dir / "set" / "01.png");
  bool has_settings = false;
  for (const auto& [k, v] : text) has_settings |= (k == "settings" && json::parse(v)["steps"] == 5);
  EXPECT_TRUE(has_settings);
  auto img = stylealigned::image::read_rgb(dir / "set" / "00-reference.png");
  EXPECT_EQ(img.sizes(), (std::vector<int64_t>{128, 128, 3}));
  for (const auto& e : fs::directory_iterator(dir / "set")) {
    EXPECT_EQ(e.path().filename().string().find("staging"), std::string::npos) << e.path();
  }

  // A second run must not overwrite the user's files without --force.
  auto before = fs::last_write_time(dir / "set" / "01.png");
  r = run_tool(args);
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("--force"), std::string::npos) << r.output;
  EXPECT_EQ(fs::last_write_time(dir / "set" / "01.png"), before);
  r = run_tool(args + " --force");
  EXPECT_EQ(r.code, 0) << r.output;
}

// A model folder's _stylealigned_options replace the SDXL demo's defaults of `generate`; flags given still win, and
// settings.json records what ran. A bad field fails the load naming model_index.json and the field.
TEST(tool, model_style_aligned_defaults_and_flags) {
  const fs::path dir = sa_test::scratch_dir("tool_model_defaults");
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path model = dir / "model";
  fs::copy(sa_test::model_folder("sd15_tiny"), model, fs::copy_options::recursive | fs::copy_options::copy_symlinks);
  json index = sa_test::read_json(model / "model_index.json");
  auto write_index = [&](const json& options) {
    json j = index;
    j["_stylealigned_options"] = options;
    fs::remove(model / "model_index.json");
    std::ofstream(model / "model_index.json") << j.dump(2);
  };
  const std::string base = "generate --model " + quote(model.string()) +
                           " --prompt 'a cat' --prompt 'a dog' --steps 1 --width 128 --height 128 --quiet";
  write_index({{"adain_values", true}, {"shared_score_shift", 0.5}});
  auto r = run_tool(base + " --out " + quote((dir / "a").string()));
  ASSERT_EQ(r.code, 0) << r.output;
  auto sa = sa_test::read_json(dir / "a" / "settings.json")["style_aligned_options"];
  EXPECT_EQ(sa["adain_values"], true);
  EXPECT_EQ(sa["shared_score_shift"], 0.5);
  EXPECT_EQ(sa["share_group_norm"], false);  // the demo's default, not named by the model
  r = run_tool(base + " --no-adain-values --share-group-norm --out " + quote((dir / "b").string()));
  ASSERT_EQ(r.code, 0) << r.output;
  sa = sa_test::read_json(dir / "b" / "settings.json")["style_aligned_options"];
  EXPECT_EQ(sa["adain_values"], false);
  EXPECT_EQ(sa["share_group_norm"], true);
  EXPECT_EQ(sa["shared_score_shift"], 0.5);

  write_index({{"adain_value", true}});
  r = run_tool(base + " --out " + quote((dir / "c").string()));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("model_index.json"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("adain_value"), std::string::npos) << r.output;
  write_index({{"only_self_level", "half"}});
  r = run_tool(base + " --out " + quote((dir / "c").string()));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("only_self_level"), std::string::npos) << r.output;
  write_index({{"only_self_level", 3}});
  r = run_tool(base + " --out " + quote((dir / "c").string()));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("only_self_level"), std::string::npos) << r.output;
  EXPECT_TRUE(!fs::exists(dir / "c") || fs::is_empty(dir / "c"));  // nothing written
}

TEST(tool, bad_input_exit_codes_and_messages) {
  auto dir = sa_test::scratch_dir("tool_bad");
  const std::string model = quote(sa_test::model_folder("sd15_tiny").string());
  const std::string base = "generate --model " + model + " --prompt 'a cat' --prompt 'a dog' --quiet --steps 2";
  // usage errors: exit 2
  EXPECT_EQ(run_tool("generate --prompt x").code, 2);
  EXPECT_EQ(run_tool("frobnicate").code, 2);
  auto r = run_tool(base + " --steps 0 --out " + quote((dir / "a").string()));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--steps"), std::string::npos) << r.output;
  r = run_tool(base + " --width 100 --out " + quote((dir / "a").string()));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--width"), std::string::npos) << r.output;
  r = run_tool(base + " --guidance nan --out " + quote((dir / "a").string()));
  EXPECT_EQ(r.code, 2) << r.output;
  // runtime failures: exit 1 with the culprit named
  r = run_tool("generate --model " + quote((dir / "no_model").string()) + " --prompt x --quiet --out " +
               quote((dir / "b").string()));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("no_model"), std::string::npos) << r.output;
  stylealigned::io::save_safetensors(dir / "wrong.safetensors", {{"latents", at::zeros({2, 4, 8, 8})}});
  r = run_tool(base + " --latents " + quote((dir / "wrong.safetensors").string()) + " --out " +
               quote((dir / "c").string()));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("latents"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "c" / "00-reference.png"));
  r = run_tool(base + " --out /proc/stylealigned-cannot-write");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("/proc/stylealigned-cannot-write"), std::string::npos) << r.output;
  std::ofstream(dir / "empty.png").close();
  r = run_tool("transfer --model " + model + " --reference " + quote((dir / "empty.png").string()) +
               " --reference-caption x --prompt y --quiet --steps 2 --out " + quote((dir / "d").string()));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("empty.png"), std::string::npos) << r.output;
}

// The embedded toy model knows only its world's words: generate warns once per prompt, naming each unknown word, and
// still generates. Its VAE factor is 4, so 68 px is a valid width there and 66 a usage error naming the factor.
TEST(tool, toy_model_warns_about_unknown_words_and_takes_its_vae_factor) {
  const fs::path toy = fs::weakly_canonical(sa_test::data_dir() / ".." / ".." / "models" / "toy");
  const fs::path dir = sa_test::scratch_dir("tool_toy");
  fs::remove_all(dir);
  const std::string base = "generate --model " + quote(toy.string()) + " --quiet --steps 2 --no-style-align ";
  auto r = run_tool(base + "--prompt 'a zebra star' --prompt 'a Heart, striped zebra quokka zebra' --out " +
                    quote((dir / "a").string()));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("prompt 0 ('a zebra star'): the toy model was trained only on its world's captions and has "
                          "never seen 'zebra': it will draw something arbitrary for it"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("has never seen 'zebra', 'quokka': it will draw something arbitrary for them"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("The words it knows: a background candy"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(dir / "a" / "01.png"));

  r = run_tool(base + "--prompt 'a heart in pastel striped style, outlined' --width 68 --out " +
               quote((dir / "b").string()));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(r.output.find("warning"), std::string::npos) << r.output;
  EXPECT_EQ(stylealigned::image::read_rgb(dir / "b" / "00-reference.png").size(1), 68);

  r = run_tool(base + "--prompt 'a heart' --width 66 --out " + quote((dir / "c").string()));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--width must be a multiple of 4"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "c" / "00-reference.png"));
}

TEST(tool, info_lists_layers) {
  auto r = run_tool("info --model " + quote(sa_test::model_folder("sdxl_tiny").string()));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("sdxl"), std::string::npos);
  EXPECT_NE(r.output.find("mid_block.attentions.0.transformer_blocks.1.attn1"), std::string::npos);
}

// `stylealigned eval` ------------------------------------------------------------------------------------------------

namespace {

namespace toy = stylealigned::toy;

// A set folder of rendered toy images: reference a star in `ref_palette`, targets a heart and a circle in
// `target_palette`, all striped on a plain background without outline; grid.png added as generate writes it.
fs::path write_toy_set(const fs::path& dir, toy::Palette ref_palette, toy::Palette target_palette) {
  fs::create_directories(dir);
  const toy::Object objects[] = {toy::Object::star, toy::Object::heart, toy::Object::circle};
  std::vector<at::Tensor> images;
  for (int i = 0; i < 3; ++i) {
    toy::AttributeConstraints c;
    c.object = objects[i];
    c.palette = i == 0 ? ref_palette : target_palette;
    c.pattern = toy::Pattern::stripes;
    c.background = toy::Background::plain;
    c.outline = toy::Outline::none;
    images.push_back(toy::render(toy::sample_scene(500 + i, c)));
    stylealigned::image::write_png(dir / (i == 0 ? "00-reference.png" : "0" + std::to_string(i) + ".png"),
                                   images.back());
  }
  stylealigned::image::write_png(dir / "grid.png", stylealigned::image::make_grid(images, 3));
  return dir;
}

}  // namespace

TEST(tool, eval_scores_sets_with_the_toy_evaluators_and_clip_dino) {
  const fs::path root = sa_test::scratch_dir("tool_eval");
  fs::remove_all(root);
  const fs::path same = write_toy_set(root / "same", toy::Palette::ocean, toy::Palette::ocean);
  const fs::path mixed = write_toy_set(root / "mixed", toy::Palette::ocean, toy::Palette::candy);
  // One set's prompts come from a settings.json as generate writes it, the other's from --prompts.
  // Its model folder carries the embedded toy model's marker, so eval picks the toy evaluators without --toy.
  fs::create_directories(root / "toy_model");
  std::ofstream(root / "toy_model" / "model_index.json") << R"({"_stylealigned_toy_world": 1})";
  {
    json settings = {{"command", "generate"},
                     {"model", (root / "toy_model").string()},
                     {"prompts", {"a star in striped style", "a heart in striped style", "a circle in striped style"}}};
    std::ofstream(mixed / "settings.json") << settings.dump();
  }
  const fs::path prompts = root / "prompts.txt";
  std::ofstream(prompts) << "a star in striped style\na heart in striped style\na square in striped style\n";
  const fs::path out = root / "scores.json";

  // --prompts has one set's worth of lines: it applies to both sets (overriding settings.json).
  auto r = run_tool("eval --toy --set " + quote(same.string()) + " --set " + quote(mixed.string()) + " --prompts " +
                   quote(prompts.string()) + " --json " + quote(out.string()));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("toy style consistency"), std::string::npos) << r.output;
  json j = sa_test::read_json(out);
  ASSERT_EQ(j["sets"].size(), 2u);
  // Same palette everywhere: both targets consistent; the prompt's "square" is not the circle drawn.
  EXPECT_EQ(j["sets"][0]["toy"]["style_consistent"], json({-1, 1, 1}));
  EXPECT_EQ(j["sets"][0]["toy"]["object_correct"], json({1, 1, 0}));
  EXPECT_EQ(j["sets"][1]["toy"]["style_consistent"], json({-1, 0, 0}));
  EXPECT_EQ(j["sets"][0]["images"], json({"00-reference.png", "01.png", "02.png"})) << "grid.png is no member";
  EXPECT_DOUBLE_EQ(j["summary"]["toy_style_consistency"]["mean"].get<double>(), 0.5);
  EXPECT_EQ(j["summary"]["toy_pooled"]["targets_consistent"].get<int>(), 2);

  // An existing --json file is kept without --force.
  r = run_tool("eval --toy --set " + quote(mixed.string()) + " --json " + quote(out.string()));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_EQ(sa_test::read_json(out), j);
  // Without --prompts the mixed set's settings.json gives the prompts (all objects right), and without --toy its
  // model's marker selects the toy evaluators.
  r = run_tool("eval --set " + quote(mixed.string()) + " --json -");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(json::parse(r.output)["sets"][0]["toy"]["object_correct"], json({1, 1, 1}));

  // CLIP and DINO (the golden tiny models): the command's scores are the library's.
  const fs::path clip = sa_test::assembled_folder("eval/models/clip_tiny");
  const fs::path dino = sa_test::fixture("eval/models/dino_tiny");
  r = run_tool("eval --set " + quote(mixed.string()) + " --clip " + quote(clip.string()) + " --dino " +
               quote(dino.string()) + " --json -");
  ASSERT_EQ(r.code, 0) << r.output;
  const json scored = json::parse(r.output)["sets"][0];
  std::vector<at::Tensor> images;
  for (const char* name : {"00-reference.png", "01.png", "02.png"}) {
    images.push_back(stylealigned::image::read_rgb(mixed / name));
  }
  const auto evaluator = stylealigned::eval::Evaluator::from_folders(clip, dino);
  const auto expected = evaluator.score_set(
      "mixed", images, {"a star in striped style", "a heart in striped style", "a circle in striped style"});
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_NEAR(scored["text_alignment"][i].get<double>(), expected.text_alignment[i], 1e-6);
  }
  EXPECT_NEAR(scored["set_consistency"].get<double>(), expected.set_consistency, 1e-6);
}

TEST(tool, eval_errors_name_the_culprit) {
  const fs::path root = sa_test::scratch_dir("tool_eval_errors");
  fs::remove_all(root);
  const fs::path set = write_toy_set(root / "set", toy::Palette::earth, toy::Palette::earth);
  auto r = run_tool("eval --set " + quote(set.string()));
  EXPECT_EQ(r.code, 2) << r.output;  // nothing to score with
  EXPECT_NE(r.output.find("--clip"), std::string::npos) << r.output;
  r = run_tool("eval --toy --set " + quote((root / "missing").string()));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("missing"), std::string::npos) << r.output;
  r = run_tool("eval --toy --set " + quote(set.string()));  // no settings.json, no --prompts
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("--prompts"), std::string::npos) << r.output;
  fs::create_directories(root / "single");
  fs::copy_file(set / "01.png", root / "single" / "01.png");
  r = run_tool("eval --toy --set " + quote((root / "single").string()));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("single"), std::string::npos) << r.output;
  std::ofstream(set / "broken.png") << "not a png";
  std::ofstream(root / "p.txt") << "a star\na heart\na circle\na square\n";
  r = run_tool("eval --toy --set " + quote(set.string()) + " --prompts " + quote((root / "p.txt").string()));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("broken.png"), std::string::npos) << r.output;
}

// The README's main command on the embedded model (small here: 1 set, few steps), and the card's study command.
TEST(tool, demo_writes_both_grids_and_the_table_and_study_writes_json) {
  const fs::path root = sa_test::scratch_dir("tool_demo");
  fs::remove_all(root);
  auto r = run_tool("demo --sets 1 --steps 4 --quiet --out " + quote((root / "demo").string()));
  ASSERT_EQ(r.code, 0) << r.output;
  for (const char* f : {"vanilla.png", "style_aligned.png", "side_by_side.png", "summary.json"}) {
    EXPECT_TRUE(fs::exists(root / "demo" / f)) << f;
  }
  EXPECT_NE(r.output.find("style_aligned"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("side_by_side.png"), std::string::npos) << r.output;
  const at::Tensor both = stylealigned::image::read_rgb(root / "demo" / "side_by_side.png");
  const at::Tensor one = stylealigned::image::read_rgb(root / "demo" / "vanilla.png");
  EXPECT_EQ(both.size(0), one.size(0));
  EXPECT_GT(both.size(1), 2 * one.size(1));
  const json summary = sa_test::read_json(root / "demo" / "summary.json");
  ASSERT_EQ(summary["arms"].size(), 2u);
  EXPECT_EQ(summary["arms"][1]["name"], "style_aligned");
  EXPECT_TRUE(summary["arms"][1].contains("consistency_gain_vs_vanilla"));

  // A second run refuses to overwrite; nothing is lost.
  r = run_tool("demo --sets 1 --steps 4 --quiet --out " + quote((root / "demo").string()));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--force"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(root / "demo" / "summary.json"));

  const fs::path js = root / "study.json";
  r = run_tool("study --sets 2 --steps 3 --quiet --arms vanilla,style_aligned,no_adain --json " + quote(js.string()));
  ASSERT_EQ(r.code, 0) << r.output;
  const json j = sa_test::read_json(js);
  ASSERT_EQ(j["arms"].size(), 3u);
  EXPECT_EQ(j["arms"][2]["name"], "no_adain");
  EXPECT_EQ(j["arms"][1]["consistency_gain_vs_vanilla"]["pairs"], 2);
  // An arm with fields overridden runs under its full spec as name; a bad override is a usage error naming it.
  const fs::path js2 = root / "study_override.json";
  r = run_tool("study --sets 1 --steps 2 --quiet --guidance 5 --per-image --arms "
               "vanilla,style_aligned+shared_score_shift=0.7 --json " + quote(js2.string()));
  ASSERT_EQ(r.code, 0) << r.output;
  const json j2 = sa_test::read_json(js2);
  EXPECT_EQ(j2["arms"][1]["name"], "style_aligned+shared_score_shift=0.7");
  EXPECT_EQ(j2["guidance"], 5.0);
  // --per-image: every image's prompt and reading, consistent with the arm's aggregate.
  for (const auto& arm : j2["arms"]) {
    ASSERT_EQ(arm["sets"].size(), 1u);
    const auto& images = arm["sets"][0];
    ASSERT_EQ(images.size(), 4u);
    double targets_correct = 0;
    for (size_t i = 0; i < 4; ++i) {
      EXPECT_EQ(images[i]["prompt"], j2["arms"][0]["sets"][0][i]["prompt"]);  // same prompts in every arm
      EXPECT_EQ(images[i]["prompt"].get<std::string>().rfind("a ", 0), 0u) << images[i]["prompt"];
      EXPECT_TRUE(images[i]["seen"]["object"].is_string());
      EXPECT_TRUE(images[i]["seen"]["palette"].is_string());
      if (i > 0) targets_correct += images[i]["object_correct"].get<int>();
    }
    EXPECT_DOUBLE_EQ(targets_correct / 3.0, arm["target_object_accuracy"].get<double>());
  }
  r = run_tool("study --sets 1 --arms vanilla,style_aligned+only_self_level=2");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("only_self_level"), std::string::npos) << r.output;
  r = run_tool("study --sets 1 --arms vanilla,no_adain+bogus=1");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("bogus"), std::string::npos) << r.output;
  r = run_tool("study --sets 1 --arms style_aligned");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("vanilla"), std::string::npos) << r.output;
  r = run_tool("demo --model " + quote((root / "nowhere").string()));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("model_index.json"), std::string::npos) << r.output;
}
