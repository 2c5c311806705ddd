// stylealigned/eval/image_processor.h: the image preprocessing of transformers' CLIP and ViT image processors.
//
// The evaluation models were trained, and the paper's numbers measured, on pictures that transformers' image
// processors prepared with PIL. Small resampling differences move the scores (OpenCV's bicubic lands up to 86 uint8
// levels away on the golden pictures), so this header reproduces PIL's resampler in integer arithmetic: an
// antialiased separable filter whose support grows with the downscale factor, the width pass first, rounding and
// clamping to uint8 between the passes and at the end.
//
//   auto processor = stylealigned::eval::ImageProcessor::from_folder(clip_dir);   // preprocessor_config.json
//   at::Tensor rgb = stylealigned::image::read_rgb("cat.png");                    // uint8 [H, W, 3]
//   at::Tensor pixel_values = processor.preprocess(rgb);                          // float [1, 3, 224, 224]
//
// Needs no OpenCV: images are uint8 tensors [height, width, channels], RGB.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace stylealigned::eval {

/// PIL's resampling filters, numbered as `PIL.Image.Resampling` (and the `resample` key of preprocessor_config.json).
enum class Resample : int { nearest = 0, lanczos = 1, bilinear = 2, bicubic = 3, box = 4, hamming = 5 };

/// "bicubic" etc. for messages.
const char* to_string(Resample filter);

/// Resizes a uint8 [H, W, C] image (C = 1..4) to [height, width, C] exactly as Pillow's `Image.resize((width,
/// height), filter)` does for 8-bit images (reducing_gap None): per axis, filter weights at the output pixel centres
/// with the support scaled by max(1, in / out), normalised, converted to 22-bit fixed point; the horizontal pass
/// runs first and its result is rounded and clamped to uint8 before the vertical pass. An axis whose size does not
/// change is not resampled. `nearest` takes the source pixel under each output pixel centre. Throws
/// stylealigned::Error for a bad image or a size below 1.
at::Tensor resize_like_pil(const at::Tensor& image, int64_t width, int64_t height, Resample filter);

/// The settings of a transformers image processor, from its `preprocessor_config.json`.
///
/// Both file formats load: the current one (`image_processor_type`, `size` as {"shortest_edge": n} or
/// {"height": h, "width": w}, `crop_size` as {"height", "width"}) and the legacy feature-extractor one
/// (`feature_extractor_type`, `size` and `crop_size` as plain integers, `do_rescale` / `rescale_factor` absent).
/// Keys a file omits take the processor class's defaults, as `AutoImageProcessor` does.
struct ImageProcessorConfig {
  enum class Kind {
    clip,  ///< CLIPImageProcessor / CLIPFeatureExtractor (and BitImageProcessor): shortest edge, centre crop
    vit,   ///< ViTImageProcessor / ViTFeatureExtractor (DINO): fixed height x width, never cropped
  };
  Kind kind = Kind::clip;
  /// The class named in the file (for messages), e.g. "CLIPImageProcessor".
  std::string class_name = "CLIPImageProcessor";

  bool do_resize = true;
  /// > 0: resize so the shorter side has this length and the longer side int(shortest_edge * long / short)
  /// (truncated, as transformers does); 0: resize to `height` x `width`.
  int64_t shortest_edge = 224;
  int64_t height = 0;
  int64_t width = 0;
  Resample resample = Resample::bicubic;

  bool do_center_crop = true;
  int64_t crop_height = 224;
  int64_t crop_width = 224;

  bool do_rescale = true;
  double rescale_factor = 1.0 / 255.0;

  bool do_normalize = true;
  std::array<double, 3> image_mean = {0.48145466, 0.4578275, 0.40821073};  // OpenAI CLIP
  std::array<double, 3> image_std = {0.26862954, 0.26130258, 0.27577711};

  /// transformers' defaults for CLIPImageProcessor or ViTImageProcessor.
  static ImageProcessorConfig defaults(Kind kind);
  /// Reads a preprocessor_config.json. Throws stylealigned::Error naming the file and key for a missing or invalid
  /// file, an unknown processor class, a bad value (non-positive size, wrong-length mean, unknown resample code).
  static ImageProcessorConfig from_file(const std::filesystem::path& preprocessor_config_json);
  /// Checks the values. Throws stylealigned::Error naming the field at fault.
  void validate() const;
};

/// The output size (height, width) of the resize step for an input of `height` x `width`.
std::array<int64_t, 2> resize_output_size(const ImageProcessorConfig& config, int64_t height, int64_t width);

/// transformers' image processor: resize (PIL-exact), centre crop, rescale, normalise, in that order, in float32 as
/// numpy computes it.
class ImageProcessor {
 public:
  explicit ImageProcessor(ImageProcessorConfig config);
  /// Reads `<folder>/preprocessor_config.json`. Throws stylealigned::Error for a missing folder or file.
  static ImageProcessor from_folder(const std::filesystem::path& folder);

  /// The resize step alone: uint8 [H, W, 3] -> uint8 [h, w, 3] (the image itself when do_resize is false).
  at::Tensor resize(const at::Tensor& rgb) const;
  /// The centre crop step alone (transformers' center_crop: top = (h - crop_h) / 2 floored; zero padding when the
  /// image is smaller than the crop).
  at::Tensor center_crop(const at::Tensor& rgb) const;
  /// Rescale and normalise a uint8 [H, W, 3] picture: float32 [1, 3, H, W].
  at::Tensor normalize(const at::Tensor& rgb) const;

  /// Every step: uint8 [H, W, 3] RGB -> float32 [1, 3, h, w] pixel_values. Gray [H, W] / [H, W, 1] and RGBA images
  /// are converted to RGB first (PIL's convert("RGB"): gray replicated, alpha dropped). Throws stylealigned::Error
  /// for anything else.
  at::Tensor preprocess(const at::Tensor& image) const;
  /// preprocess() of every image, concatenated: [N, 3, h, w]. The output size must agree (it does whenever the
  /// config crops or resizes to a fixed size). Errors name the image index.
  at::Tensor preprocess(const std::vector<at::Tensor>& images) const;

  const ImageProcessorConfig& config() const { return config_; }

 private:
  ImageProcessorConfig config_;
};

}  // namespace stylealigned::eval
