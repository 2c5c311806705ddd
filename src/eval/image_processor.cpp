#include "stylealigned/eval/image_processor.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "stylealigned/error.h"
#include "stylealigned/log.h"

namespace stylealigned::eval {
namespace {

using nlohmann::json;
using Kind = ImageProcessorConfig::Kind;

std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  return fmt::format("{} [{}]", c10::toString(t.scalar_type()), fmt::join(t.sizes(), ", "));
}

struct Reader {
  const std::filesystem::path& file;
  const json& j;

  [[noreturn]] void fail(const char* key, const std::string& what) const {
    throw Error(fmt::format("{}: '{}' {}", file.string(), key, what));
  }
  const json* find(const char* key) const {
    auto it = j.find(key);
    return (it == j.end() || it->is_null()) ? nullptr : &*it;
  }
  void read_bool(const char* key, bool& out) const {
    if (const json* v = find(key)) {
      if (!v->is_boolean()) fail(key, fmt::format("must be true or false, got {}", v->dump()));
      out = v->get<bool>();
    }
  }
  void read_number(const char* key, double& out) const {
    if (const json* v = find(key)) {
      if (!v->is_number()) fail(key, fmt::format("must be a number, got {}", v->dump()));
      out = v->get<double>();
    }
  }
  static int64_t positive_int(const Reader& r, const char* key, const json& v) {
    if (!v.is_number_integer() || v.get<int64_t>() < 1) {
      r.fail(key, fmt::format("must hold positive integers, got {}", v.dump()));
    }
    return v.get<int64_t>();
  }
  void read_triple(const char* key, std::array<double, 3>& out) const {
    if (const json* v = find(key)) {
      if (v->is_number()) {  // one value for every channel, as transformers allows
        out.fill(v->get<double>());
      } else if (v->is_array() && v->size() == 3 && (*v)[0].is_number() && (*v)[1].is_number() && (*v)[2].is_number()) {
        for (size_t i = 0; i < 3; ++i) out[i] = (*v)[i].get<double>();
      } else {
        fail(key, fmt::format("must be a number or a list of 3 numbers (RGB), got {}", v->dump()));
      }
    }
  }
};

Kind kind_of_class(const std::string& name, const std::filesystem::path& file, const char* key) {
  if (name == "CLIPImageProcessor" || name == "CLIPFeatureExtractor" || name == "BitImageProcessor") return Kind::clip;
  if (name == "ViTImageProcessor" || name == "ViTFeatureExtractor") return Kind::vit;
  throw Error(
      fmt::format("{}: '{}' \"{}\" is not a supported image processor (CLIPImageProcessor, "
                  "CLIPFeatureExtractor, BitImageProcessor, ViTImageProcessor, ViTFeatureExtractor)",
                  file.string(), key, name));
}

}  // namespace

ImageProcessorConfig ImageProcessorConfig::defaults(Kind kind) {
  ImageProcessorConfig c;
  c.kind = kind;
  if (kind == Kind::vit) {
    c.class_name = "ViTImageProcessor";
    c.shortest_edge = 0;
    c.height = c.width = 224;
    c.resample = Resample::bilinear;
    c.do_center_crop = false;
    c.image_mean = {0.5, 0.5, 0.5};  // transformers' IMAGENET_STANDARD_MEAN / STD
    c.image_std = {0.5, 0.5, 0.5};
  }
  return c;
}

ImageProcessorConfig ImageProcessorConfig::from_file(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw Error(fmt::format("{}: cannot open the image processor config", file.string()));
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: invalid JSON: {}", file.string(), e.what()));
  }
  if (!j.is_object()) throw Error(fmt::format("{}: expected a JSON object", file.string()));
  const Reader r{file, j};

  // The class decides the defaults and how a plain integer `size` reads (shortest edge for CLIP, a square for ViT).
  std::string class_name;
  const char* class_key = nullptr;
  for (const char* key : {"image_processor_type", "feature_extractor_type"}) {
    if (const json* v = r.find(key)) {
      if (!v->is_string()) r.fail(key, fmt::format("must be a string, got {}", v->dump()));
      class_name = v->get<std::string>();
      class_key = key;
      break;
    }
  }
  Kind kind;
  if (class_key) {
    kind = kind_of_class(class_name, file, class_key);
  } else {
    kind = (j.contains("crop_size") || j.contains("do_center_crop")) ? Kind::clip : Kind::vit;
    class_name = kind == Kind::clip ? "CLIPImageProcessor" : "ViTImageProcessor";
    warn(fmt::format("{}: names no image_processor_type or feature_extractor_type; reading it as a {}", file.string(),
                     class_name));
  }
  ImageProcessorConfig c = defaults(kind);
  c.class_name = class_name;

  r.read_bool("do_resize", c.do_resize);
  if (const json* v = r.find("size")) {
    if (v->is_number_integer()) {
      const int64_t n = Reader::positive_int(r, "size", *v);
      if (kind == Kind::clip) {
        c.shortest_edge = n, c.height = c.width = 0;
      } else {
        c.shortest_edge = 0, c.height = c.width = n;
      }
    } else if (v->is_array() && v->size() == 2) {  // (height, width)
      c.shortest_edge = 0;
      c.height = Reader::positive_int(r, "size", (*v)[0]);
      c.width = Reader::positive_int(r, "size", (*v)[1]);
    } else if (v->is_object() && v->contains("shortest_edge")) {
      if (kind == Kind::vit) {
        r.fail("size", fmt::format("must give 'height' and 'width' for {} (it has no shortest-edge resize), got {}",
                                   class_name, v->dump()));
      }
      c.shortest_edge = Reader::positive_int(r, "size", v->at("shortest_edge"));
      c.height = c.width = 0;
    } else if (v->is_object() && v->contains("height") && v->contains("width")) {
      c.shortest_edge = 0;
      c.height = Reader::positive_int(r, "size", v->at("height"));
      c.width = Reader::positive_int(r, "size", v->at("width"));
    } else {
      r.fail("size", fmt::format("must be an integer, [height, width], {{\"shortest_edge\": n}} or {{\"height\": h, "
                                 "\"width\": w}}, got {}",
                                 v->dump()));
    }
  }
  if (const json* v = r.find("resample")) {
    if (!v->is_number_integer() || v->get<int64_t>() < 0 || v->get<int64_t>() > 5) {
      r.fail("resample", fmt::format("must be a PIL filter code 0-5 (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, "
                                     "4 box, 5 hamming), got {}",
                                     v->dump()));
    }
    c.resample = static_cast<Resample>(v->get<int>());
  }
  if (kind == Kind::clip) {  // ViTImageProcessor ignores crop keys, as transformers does
    r.read_bool("do_center_crop", c.do_center_crop);
    if (const json* v = r.find("crop_size")) {
      if (v->is_number_integer()) {
        c.crop_height = c.crop_width = Reader::positive_int(r, "crop_size", *v);
      } else if (v->is_object() && v->contains("height") && v->contains("width")) {
        c.crop_height = Reader::positive_int(r, "crop_size", v->at("height"));
        c.crop_width = Reader::positive_int(r, "crop_size", v->at("width"));
      } else {
        r.fail("crop_size", fmt::format("must be an integer or {{\"height\": h, \"width\": w}}, got {}", v->dump()));
      }
    }
  }
  r.read_bool("do_rescale", c.do_rescale);
  r.read_number("rescale_factor", c.rescale_factor);
  r.read_bool("do_normalize", c.do_normalize);
  r.read_triple("image_mean", c.image_mean);
  r.read_triple("image_std", c.image_std);
  try {
    c.validate();
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", file.string(), e.what()));
  }
  return c;
}

void ImageProcessorConfig::validate() const {
  if (do_resize) {
    if (shortest_edge < 0 || (shortest_edge == 0 && (height < 1 || width < 1))) {
      throw Error(
          fmt::format("image processor: the resize needs a positive shortest_edge or height and width, got "
                      "shortest_edge {}, height {}, width {}",
                      shortest_edge, height, width));
    }
  }
  if (do_center_crop && (crop_height < 1 || crop_width < 1)) {
    throw Error(fmt::format("image processor: 'crop_size' must be positive, got {}x{}", crop_height, crop_width));
  }
  if (do_rescale && !(std::isfinite(rescale_factor) && rescale_factor > 0.0)) {
    throw Error(fmt::format("image processor: 'rescale_factor' must be positive, got {}", rescale_factor));
  }
  for (double s : image_std) {
    if (do_normalize && !(std::isfinite(s) && s != 0.0)) {
      throw Error(fmt::format("image processor: 'image_std' must be finite and non-zero, got [{}]",
                              fmt::join(image_std, ", ")));
    }
  }
}

std::array<int64_t, 2> resize_output_size(const ImageProcessorConfig& c, int64_t height, int64_t width) {
  if (c.shortest_edge <= 0) return {c.height, c.width};
  const bool portrait = width <= height;
  const int64_t short_side = portrait ? width : height, long_side = portrait ? height : width;
  // transformers: int(size * long / short), a float division truncated.
  const int64_t new_long = int64_t(double(c.shortest_edge * long_side) / double(short_side));
  return portrait ? std::array<int64_t, 2>{new_long, c.shortest_edge}
                  : std::array<int64_t, 2>{c.shortest_edge, new_long};
}

ImageProcessor::ImageProcessor(ImageProcessorConfig config) : config_(std::move(config)) { config_.validate(); }

ImageProcessor ImageProcessor::from_folder(const std::filesystem::path& folder) {
  if (!std::filesystem::is_directory(folder)) {
    throw Error(fmt::format("{}: no such model folder (expected preprocessor_config.json inside)", folder.string()));
  }
  return ImageProcessor(ImageProcessorConfig::from_file(folder / "preprocessor_config.json"));
}

at::Tensor ImageProcessor::resize(const at::Tensor& rgb) const {
  if (!config_.do_resize) return rgb;
  const auto hw = resize_output_size(config_, rgb.size(0), rgb.size(1));
  return resize_like_pil(rgb, hw[1], hw[0], config_.resample);
}

at::Tensor ImageProcessor::center_crop(const at::Tensor& rgb) const {
  if (!config_.do_center_crop) return rgb;
  const int64_t h = rgb.size(0), w = rgb.size(1), ch = config_.crop_height, cw = config_.crop_width;
  const int64_t top = (h - ch) >= 0 ? (h - ch) / 2 : -((ch - h + 1) / 2);  // floor division
  const int64_t left = (w - cw) >= 0 ? (w - cw) / 2 : -((cw - w + 1) / 2);
  if (top >= 0 && left >= 0) return rgb.narrow(0, top, ch).narrow(1, left, cw).contiguous();
  // Smaller than the crop: centre it on zeros. transformers 4.36 floors the padding and then returns a crop one
  // pixel short for odd differences; later versions round the padding up and return the requested size, as here.
  const int64_t nh = std::max(h, ch), nw = std::max(w, cw);
  const int64_t top_pad = (nh - h + 1) / 2, left_pad = (nw - w + 1) / 2;
  at::Tensor canvas = at::zeros({nh, nw, rgb.size(2)}, rgb.options());
  canvas.narrow(0, top_pad, h).narrow(1, left_pad, w).copy_(rgb);
  return canvas.narrow(0, top + top_pad, ch).narrow(1, left + left_pad, cw).contiguous();
}

at::Tensor ImageProcessor::normalize(const at::Tensor& rgb) const {
  // numpy's arithmetic: uint8 * python float is float64, cast to float32; then float32 (x - mean) / std.
  at::Tensor x =
      config_.do_rescale ? (rgb.to(at::kDouble) * config_.rescale_factor).to(at::kFloat) : rgb.to(at::kFloat);
  if (config_.do_normalize) {
    const at::Tensor mean =
        at::tensor(std::vector<double>(config_.image_mean.begin(), config_.image_mean.end())).to(at::kFloat);
    const at::Tensor stdev =
        at::tensor(std::vector<double>(config_.image_std.begin(), config_.image_std.end())).to(at::kFloat);
    x = (x - mean) / stdev;
  }
  return x.permute({2, 0, 1}).unsqueeze(0).contiguous();
}

at::Tensor ImageProcessor::preprocess(const at::Tensor& image) const {
  if (!image.defined() || image.scalar_type() != at::kByte || image.dim() < 2 || image.dim() > 3 || image.size(0) < 1 ||
      image.size(1) < 1) {
    throw Error(
        fmt::format("{}: expected a uint8 [height, width, 3] RGB image, got {}", config_.class_name, describe(image)));
  }
  at::Tensor rgb = image.dim() == 2 ? image.unsqueeze(-1) : image;
  const int64_t channels = rgb.size(2);
  if (channels == 1) {
    rgb = rgb.expand({rgb.size(0), rgb.size(1), 3});
  } else if (channels == 4) {
    rgb = rgb.narrow(2, 0, 3);
  } else if (channels != 3) {
    throw Error(fmt::format("{}: expected 1, 3 or 4 channels, got {}", config_.class_name, describe(image)));
  }
  rgb = rgb.to(at::kCPU).contiguous();
  return normalize(center_crop(resize(rgb)));
}

at::Tensor ImageProcessor::preprocess(const std::vector<at::Tensor>& images) const {
  if (images.empty()) throw Error(fmt::format("{}: no images to preprocess", config_.class_name));
  std::vector<at::Tensor> out;
  out.reserve(images.size());
  for (size_t i = 0; i < images.size(); ++i) {
    try {
      out.push_back(preprocess(images[i]));
    } catch (const Error& e) {
      throw Error(fmt::format("image {}: {}", i, e.what()));
    }
    if (out.back().sizes() != out.front().sizes()) {
      throw Error(fmt::format(
          "{}: image {} becomes [{}] but image 0 becomes [{}]; this configuration does not give "
          "one size for every picture (no crop and no fixed resize)",
          config_.class_name, i, fmt::join(out.back().sizes(), ", "), fmt::join(out.front().sizes(), ", ")));
    }
  }
  return at::cat(out, 0);
}

}  // namespace stylealigned::eval
