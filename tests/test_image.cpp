// Image I/O at the edge: PNG with text metadata, atomic writes, clear errors for bad files.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <fstream>

#include "stylealigned/error.h"
#include "stylealigned/image.h"
#include "support/test_support.h"

namespace fs = std::filesystem;
namespace img = stylealigned::image;

namespace {
at::Tensor test_image(int64_t h, int64_t w) {
  return at::arange(h * w * 3, at::kInt).remainder(251).to(at::kByte).view({h, w, 3});
}
void expect_error_naming(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error";
  } catch (const stylealigned::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(image, png_round_trip_with_text_metadata) {
  auto dir = sa_test::scratch_dir("image");
  auto rgb = test_image(17, 23);
  img::TextChunks text = {{"prompt", "a toy train"}, {"settings", R"({"steps": 50})"}, {"unicode", "東京 café"}};
  img::write_png(dir / "a.png", rgb, text);
  EXPECT_TRUE(img::read_rgb(dir / "a.png").equal(rgb));
  EXPECT_EQ(img::read_png_text(dir / "a.png"), text);
  for (const auto& e : fs::directory_iterator(dir)) {
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos);
  }
}

TEST(image, bad_files_are_named) {
  auto dir = sa_test::scratch_dir("image");
  expect_error_naming([&] { img::read_rgb(dir / "missing.png"); }, "missing.png");
  std::ofstream(dir / "empty.png").close();
  expect_error_naming([&] { img::read_rgb(dir / "empty.png"); }, "empty");
  std::ofstream(dir / "garbage.png") << "this is not an image";
  expect_error_naming([&] { img::read_rgb(dir / "garbage.png"); }, "garbage.png");
  expect_error_naming([&] { img::write_png("/nonexistent-dir/x.png", test_image(4, 4)); }, "/nonexistent-dir/x.png");
  expect_error_naming([&] { img::write_png(dir / "bad.png", at::zeros({4, 4}, at::kFloat)); }, "uint8");
  EXPECT_FALSE(fs::exists(dir / "bad.png"));
}

TEST(image, grid_resize_and_conversions) {
  auto a = test_image(8, 6), b = at::zeros({8, 6, 3}, at::kByte);
  auto grid = img::make_grid({a, b, a}, 2, 2);
  EXPECT_EQ(grid.sizes(), (std::vector<int64_t>{8 * 2 + 2, 6 * 2 + 2, 3}));
  EXPECT_TRUE(grid.narrow(0, 0, 8).narrow(1, 0, 6).equal(a));
  EXPECT_TRUE(grid.narrow(0, 10, 8).narrow(1, 0, 6).equal(a));
  EXPECT_EQ(grid[8][0][0].item<uint8_t>(), 255);  // gap is white

  auto resized = img::resize_rgb(a, 12, 16);
  EXPECT_EQ(resized.sizes(), (std::vector<int64_t>{16, 12, 3}));

  auto x = img::to_model_input(a);
  EXPECT_EQ(x.sizes(), (std::vector<int64_t>{1, 3, 8, 6}));
  EXPECT_LE(x.max().item<float>(), 1.0f);
  EXPECT_GE(x.min().item<float>(), -1.0f);
  auto back = img::to_uint8((x[0] + 1) / 2);
  EXPECT_TRUE(back.equal(a));
}
