// world_sample: contact sheets of the toy world, for a person to look at, and a quick evaluator check.
//
//   world_sample [--out DIR] [--seed N] [--scale K]
//
// Writes into DIR (default "world_sample"):
//   objects.png   one row per object, 12 random styles each (captions in objects.txt, row by row)
//   styles.png    one row per palette: the five patterns plain/no outline, then textured/outlined
//   degraded.png  the objects sheet's first 4 columns three times: blur 1.0 px + noise 8; blur 1.5 px + noise 12 +
//                 colour shift 15; warp 2 px + blur 1.0 px + noise 8 + colour shift 10
// and prints what the evaluators read from every image of the sheets (mismatches listed).
#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "stylealigned/error.h"
#include "stylealigned/image.h"
#include "stylealigned/toy/world.h"

namespace toy = stylealigned::toy;
namespace img = stylealigned::image;

namespace {

at::Tensor upscale(const at::Tensor& rgb, int64_t k) {
  return k <= 1 ? rgb : rgb.repeat_interleave(k, 0).repeat_interleave(k, 1).contiguous();
}

struct Sheet {
  std::vector<at::Tensor> images;
  std::vector<toy::Attributes> truth;
  std::vector<std::string> captions;
};

int check(const Sheet& sheet, const std::string& label) {
  int wrong = 0;
  for (size_t i = 0; i < sheet.images.size(); ++i) {
    const auto ev = toy::evaluate(sheet.images[i]);
    if (ev.attributes != sheet.truth[i]) {
      ++wrong;
      std::string diff;
      for (auto a : toy::kAllAttributes) {
        if (ev.attributes.get(a) != sheet.truth[i].get(a)) {
          diff += fmt::format(" {}: {} read as {};", toy::attribute_name(a),
                              toy::value_name(a, sheet.truth[i].get(a)), toy::value_name(a, ev.attributes.get(a)));
        }
      }
      fmt::print("  {} #{}:{}\n", label, i, diff);
    }
  }
  fmt::print("{}: {} of {} images read back exactly\n", label, sheet.images.size() - wrong, sheet.images.size());
  return wrong;
}

}  // namespace

int main(int argc, char** argv) {
  std::filesystem::path out = "world_sample";
  uint64_t seed = 2024;
  int64_t scale = 2;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--out" || arg == "--seed" || arg == "--scale") && i + 1 < argc) {
      const std::string v = argv[++i];
      if (arg == "--out") out = v;
      if (arg == "--seed") seed = std::stoull(v);
      if (arg == "--scale") scale = std::stoll(v);
    } else {
      fmt::print(stderr, "usage: world_sample [--out DIR] [--seed N] [--scale K]\n");
      return 2;
    }
  }
  try {
    std::filesystem::create_directories(out);
    std::mt19937_64 rng(seed);

    Sheet objects;
    const int columns = 12;
    for (int o = 0; o < toy::num_values(toy::Attribute::object); ++o) {
      for (int c = 0; c < columns; ++c) {
        toy::AttributeConstraints fixed;
        fixed.object = static_cast<toy::Object>(o);
        const auto scene = toy::sample_scene(rng, fixed);
        objects.images.push_back(toy::render(scene));
        objects.truth.push_back(scene.attributes);
        toy::AttributeSet mentioned;
        objects.captions.push_back(toy::random_caption(scene.attributes, rng, &mentioned));
      }
    }

    Sheet styles;
    for (int p = 0; p < toy::num_values(toy::Attribute::palette); ++p) {
      for (int variant = 0; variant < 2; ++variant) {
        for (int pat = 0; pat < toy::num_values(toy::Attribute::pattern); ++pat) {
          toy::AttributeConstraints fixed;
          fixed.palette = static_cast<toy::Palette>(p);
          fixed.pattern = static_cast<toy::Pattern>(pat);
          fixed.background = variant ? toy::Background::textured : toy::Background::plain;
          fixed.outline = variant ? toy::Outline::outlined : toy::Outline::none;
          const auto scene = toy::sample_scene(rng, fixed);
          styles.images.push_back(toy::render(scene));
          styles.truth.push_back(scene.attributes);
          styles.captions.push_back(toy::caption(scene.attributes, toy::AttributeSet::all()));
        }
      }
    }

    Sheet degraded;
    toy::Degradation light, heavy;
    light.blur_sigma = 1.0;
    light.noise_sigma = 8.0;
    heavy.blur_sigma = 1.5;
    heavy.noise_sigma = 12.0;
    heavy.color_shift = 15.0;
    toy::Degradation wobbly;
    wobbly.warp = 2.0;
    wobbly.blur_sigma = 1.0;
    wobbly.noise_sigma = 8.0;
    wobbly.color_shift = 10.0;
    const toy::Degradation* levels[3] = {&light, &heavy, &wobbly};
    for (int level = 0; level < 3; ++level) {
      for (int o = 0; o < toy::num_values(toy::Attribute::object); ++o) {
        for (int c = 0; c < 4; ++c) {
          const size_t i = static_cast<size_t>(o * columns + c);
          degraded.images.push_back(toy::degrade(objects.images[i], *levels[level], i));
          degraded.truth.push_back(objects.truth[i]);
        }
      }
    }

    auto write = [&](const Sheet& sheet, const std::string& file, int64_t cols) {
      std::vector<at::Tensor> big;
      for (const auto& im : sheet.images) big.push_back(upscale(im, scale));
      img::write_png(out / file, img::make_grid(big, cols, 2 * scale), {{"Title", "stylealigned toy world: " + file}});
    };
    write(objects, "objects.png", columns);
    write(styles, "styles.png", 10);
    write(degraded, "degraded.png", 8);
    std::ofstream txt(out / "objects.txt");
    for (size_t i = 0; i < objects.captions.size(); ++i) {
      txt << objects.captions[i] << ((i + 1) % columns == 0 ? "\n" : " | ");
    }
    std::ofstream stxt(out / "styles.txt");
    for (const auto& c : styles.captions) stxt << c << "\n";

    int wrong = check(objects, "objects.png") + check(styles, "styles.png");
    check(degraded, "degraded.png");
    fmt::print("sheets written to {}\n", out.string());
    return wrong == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "world_sample: error: {}\n", e.what());
    return 1;
  }
}
