#include "stylealigned/image.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <array>
#include <fstream>
#include <iterator>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "internal/atomic_file.h"
#include "stylealigned/error.h"

namespace stylealigned::image {
namespace {

void check_rgb(const at::Tensor& rgb, std::string_view what) {
  if (!rgb.defined() || rgb.dim() != 3 || rgb.size(2) != 3 || rgb.scalar_type() != at::kByte || rgb.size(0) < 1 ||
      rgb.size(1) < 1) {
    throw Error(fmt::format("{}: expected a uint8 [height, width, 3] RGB image, got {} {}", what,
                            rgb.defined() ? c10::toString(rgb.scalar_type()) : "undefined",
                            rgb.defined() ? fmt::format("{}", fmt::join(rgb.sizes(), "x")) : ""));
  }
}

cv::Mat to_bgr_mat(const at::Tensor& rgb) {
  auto c = rgb.contiguous();
  cv::Mat view(static_cast<int>(c.size(0)), static_cast<int>(c.size(1)), CV_8UC3, c.data_ptr());
  cv::Mat bgr;
  cv::cvtColor(view, bgr, cv::COLOR_RGB2BGR);
  return bgr;
}

at::Tensor from_bgr_mat(const cv::Mat& bgr) {
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  auto t = at::empty({rgb.rows, rgb.cols, 3}, at::kByte);
  for (int r = 0; r < rgb.rows; ++r) {
    std::memcpy(t.data_ptr<uint8_t>() + static_cast<size_t>(r) * rgb.cols * 3, rgb.ptr(r),
                static_cast<size_t>(rgb.cols) * 3);
  }
  return t;
}

uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

void put_u32(std::string& out, uint32_t v) {
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

std::string chunk(const std::string& type, const std::string& data) {
  std::string out;
  put_u32(out, static_cast<uint32_t>(data.size()));
  std::string body = type + data;
  out += body;
  put_u32(out, crc32(reinterpret_cast<const uint8_t*>(body.data()), body.size()));
  return out;
}

bool is_ascii(const std::string& s) {
  for (unsigned char c : s) {
    if (c >= 0x80) return false;
  }
  return true;
}

}  // namespace

at::Tensor read_rgb(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw Error(fmt::format("{}: image file not found", path.string()));
  if (std::filesystem::file_size(path, ec) == 0) throw Error(fmt::format("{}: image file is empty", path.string()));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(fmt::format("{}: cannot open image file", path.string()));
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  cv::Mat decoded;
  try {
    decoded = cv::imdecode(bytes, cv::IMREAD_COLOR);
  } catch (const cv::Exception& e) {
    throw Error(fmt::format("{}: cannot decode image ({})", path.string(), e.what()));
  }
  if (decoded.empty() || decoded.rows < 1 || decoded.cols < 1) {
    throw Error(fmt::format("{}: not a readable image (unknown format or corrupt data)", path.string()));
  }
  return from_bgr_mat(decoded);
}

std::string encode_png(const at::Tensor& rgb, const TextChunks& text) {
  check_rgb(rgb, "encode_png");
  std::vector<uint8_t> png;
  if (!cv::imencode(".png", to_bgr_mat(rgb), png)) throw Error("encode_png: OpenCV could not encode the image");
  // Insert text chunks right after IHDR (8-byte signature + 25-byte IHDR chunk).
  constexpr size_t kAfterIhdr = 8 + 25;
  std::string out(png.begin(), png.begin() + kAfterIhdr);
  for (const auto& [key, value] : text) {
    if (key.empty() || key.size() > 79 || !is_ascii(key)) {
      throw Error(fmt::format("encode_png: invalid PNG text key '{}' (1-79 ASCII characters)", key));
    }
    if (is_ascii(value)) {
      out += chunk("tEXt", key + '\0' + value);
    } else {  // iTXt: keyword, NUL, compression flag 0, method 0, empty language tag, NUL, empty translated key, NUL
      out += chunk("iTXt", key + '\0' + '\0' + '\0' + '\0' + '\0' + value);
    }
  }
  out.append(png.begin() + kAfterIhdr, png.end());
  return out;
}

void write_png(const std::filesystem::path& path, const at::Tensor& rgb, const TextChunks& text) {
  check_rgb(rgb, path.string());
  internal::write_file_atomic(path, encode_png(rgb, text));
}

TextChunks read_png_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(fmt::format("{}: cannot open PNG file", path.string()));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() < 8 || bytes.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0) {
    throw Error(fmt::format("{}: not a PNG file", path.string()));
  }
  TextChunks out;
  size_t pos = 8;
  while (pos + 12 <= bytes.size()) {
    uint32_t len = 0;
    for (int i = 0; i < 4; ++i) len = (len << 8) | static_cast<uint8_t>(bytes[pos + i]);
    std::string type = bytes.substr(pos + 4, 4);
    if (pos + 12 + len > bytes.size()) throw Error(fmt::format("{}: truncated PNG chunk", path.string()));
    std::string data = bytes.substr(pos + 8, len);
    auto nul = data.find('\0');
    if (type == "tEXt" && nul != std::string::npos) {
      out.emplace_back(data.substr(0, nul), data.substr(nul + 1));
    } else if (type == "iTXt" && nul != std::string::npos && nul + 2 < data.size() && data[nul + 1] == 0) {
      auto lang_end = data.find('\0', nul + 3);
      auto tkey_end = lang_end == std::string::npos ? lang_end : data.find('\0', lang_end + 1);
      if (tkey_end != std::string::npos) out.emplace_back(data.substr(0, nul), data.substr(tkey_end + 1));
    }
    if (type == "IEND") break;
    pos += 12 + len;
  }
  return out;
}

at::Tensor resize_rgb(const at::Tensor& rgb, int64_t width, int64_t height) {
  check_rgb(rgb, "resize_rgb");
  if (width < 1 || height < 1) throw Error(fmt::format("resize_rgb: invalid target size {}x{}", width, height));
  if (rgb.size(1) == width && rgb.size(0) == height) return rgb.contiguous();
  cv::Mat out;
  cv::resize(to_bgr_mat(rgb), out, cv::Size(static_cast<int>(width), static_cast<int>(height)), 0, 0,
             cv::INTER_CUBIC);
  return from_bgr_mat(out);
}

at::Tensor make_grid(const std::vector<at::Tensor>& images, int64_t columns, int64_t gap) {
  if (images.empty()) throw Error("make_grid: no images");
  for (const auto& im : images) check_rgb(im, "make_grid");
  const int64_t h = images[0].size(0), w = images[0].size(1);
  for (const auto& im : images) {
    if (im.size(0) != h || im.size(1) != w) throw Error("make_grid: images differ in size");
  }
  columns = std::max<int64_t>(1, std::min<int64_t>(columns, static_cast<int64_t>(images.size())));
  const int64_t rows = (static_cast<int64_t>(images.size()) + columns - 1) / columns;
  auto grid = at::full({rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, 3}, 255, at::kByte);
  for (size_t i = 0; i < images.size(); ++i) {
    const int64_t r = static_cast<int64_t>(i) / columns, c = static_cast<int64_t>(i) % columns;
    grid.narrow(0, r * (h + gap), h).narrow(1, c * (w + gap), w).copy_(images[i]);
  }
  return grid;
}

at::Tensor to_model_input(const at::Tensor& rgb) {
  check_rgb(rgb, "to_model_input");
  return rgb.permute({2, 0, 1}).unsqueeze(0).to(at::kFloat).div(255.0).mul(2.0).sub(1.0).contiguous();
}

at::Tensor to_uint8(const at::Tensor& chw_unit) {
  if (!chw_unit.defined() || chw_unit.dim() != 3 || chw_unit.size(0) != 3) {
    throw Error("to_uint8: expected a float [3, height, width] image in [0, 1]");
  }
  return chw_unit.detach().to(at::kCPU, at::kFloat).clamp(0, 1).mul(255).round().to(at::kByte).permute({1, 2, 0})
      .contiguous();
}

}  // namespace stylealigned::image
