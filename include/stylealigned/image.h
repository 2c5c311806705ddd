// stylealigned/image.h: image files at the edge of the library (target stylealigned::image, needs OpenCV).
//
// Images are uint8 tensors [height, width, 3] in RGB order. PNG output can carry text metadata (tEXt chunks, e.g.
// the generation settings) and is written atomically.
//
//   at::Tensor rgb = stylealigned::image::read_rgb("reference.jpg");
//   stylealigned::image::write_png("out/00-reference.png", rgb, {{"prompt", "a toy train"}});
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace stylealigned::image {

using TextChunks = std::vector<std::pair<std::string, std::string>>;

/// Decodes any format OpenCV reads into uint8 [H, W, 3] RGB (gray and alpha are converted). Throws
/// stylealigned::Error naming the file if it is missing, empty, unreadable or not an image.
at::Tensor read_rgb(const std::filesystem::path& path);

/// Encodes uint8 [H, W, 3] RGB as PNG with the given tEXt chunks (keys 1-79 Latin-1 characters, values UTF-8 are
/// stored as iTXt) and writes it atomically. Throws stylealigned::Error naming the file or the bad tensor.
void write_png(const std::filesystem::path& path, const at::Tensor& rgb, const TextChunks& text = {});

/// PNG bytes in memory (same rules as write_png).
std::string encode_png(const at::Tensor& rgb, const TextChunks& text = {});

/// The text chunks of a PNG file (tEXt and uncompressed iTXt), in file order.
TextChunks read_png_text(const std::filesystem::path& path);

/// Bicubic resize with OpenCV (for reference images; the evaluation code has its own PIL-exact resampler).
at::Tensor resize_rgb(const at::Tensor& rgb, int64_t width, int64_t height);

/// Tiles images (all of the same size) into a grid with `columns` columns and `gap` pixels of white between them.
at::Tensor make_grid(const std::vector<at::Tensor>& images, int64_t columns, int64_t gap = 4);

/// uint8 [H, W, 3] -> float [1, 3, H, W] in [-1, 1] (x / 255 * 2 - 1), the VAE's input convention.
at::Tensor to_model_input(const at::Tensor& rgb);
/// float [3, H, W] in [0, 1] -> uint8 [H, W, 3] with diffusers' rounding ((x * 255).round()).
at::Tensor to_uint8(const at::Tensor& chw_unit);

}  // namespace stylealigned::image
