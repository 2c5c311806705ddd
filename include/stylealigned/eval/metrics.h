// stylealigned/eval/metrics.h: the paper's two evaluation metrics, for any host's images.
//
// Text alignment (StyleAligned, Table 2): the cosine similarity of the CLIP image embedding and the CLIP text
// embedding of the image's own object text (e.g. "a toy train", without the style part of the prompt). Set
// consistency: the mean pairwise cosine similarity of the DINO ViT embeddings (class token) of the images of one set.
// Both are raw cosines (not CLIPScore's 100 * max(cos, 0) or 2.5 * max(cos, 0)). Over several sets, the summary is
// the mean and standard deviation of the per-set values.
//
//   auto evaluator = stylealigned::eval::Evaluator::from_folders(clip_dir, dino_dir);
//   std::vector<at::Tensor> images = ...;                          // uint8 [H, W, 3] RGB each, any size
//   auto set = evaluator.score_set("toy train", images, {"a toy train", "a toy car", ...});
//   auto summary = stylealigned::eval::summarize({set, other_set});
//   fmt::print("{:.3f} +- {:.3f}\n", summary.set_consistency.mean, summary.set_consistency.std);
//
// Images are uint8 tensors (read PNG/JPEG files with stylealigned::image::read_rgb, target stylealigned::image).
// Models load from Hugging Face folders: a CLIPModel folder (config.json, model.safetensors,
// preprocessor_config.json, vocab.json, merges.txt and the tokenizer JSON files), e.g. openai/clip-vit-large-patch14,
// and a ViTModel folder (config.json, model.safetensors, preprocessor_config.json), e.g. facebook/dino-vitb8.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "stylealigned/eval/image_processor.h"
#include "stylealigned/models/loading.h"

namespace stylealigned::eval {

// Metric arithmetic on embeddings ----------------------------------------------------------------------------------

/// Cosine similarity of every row of `a` [N, D] with every row of `b` [M, D]: [N, M], float32 on the CPU. Rows are
/// L2-normalised first, as transformers' CLIPModel does before its logits.
at::Tensor cosine_matrix(const at::Tensor& a, const at::Tensor& b);

/// cos(a[i], b[i]) for each row: [N], float32 on the CPU. Shapes must agree.
at::Tensor paired_cosine(const at::Tensor& a, const at::Tensor& b);

/// The cosines of the n (n - 1) / 2 unordered pairs of rows of `embeds` [n, D], in the order (0,1), (0,2), ...,
/// (0,n-1), (1,2), ...: [n (n - 1) / 2], float32 on the CPU. Throws stylealigned::Error for fewer than two rows.
at::Tensor pairwise_cosine(const at::Tensor& embeds);

/// Set consistency of one set: the mean of pairwise_cosine(embeds) (the diagonal is excluded). Throws
/// stylealigned::Error for fewer than two rows.
double set_consistency(const at::Tensor& embeds);

struct MeanStd {
  double mean = 0.0;
  /// Population standard deviation (numpy's default, ddof = 0); 0 for a single value.
  double std = 0.0;
  int64_t count = 0;
};
/// Mean and standard deviation of `values`. Throws stylealigned::Error when empty.
MeanStd mean_std(const std::vector<double>& values);

// Model-backed scorers ---------------------------------------------------------------------------------------------

struct ScorerOptions {
  /// dtype and device of the model weights (CPU float32 by default; CUDA and half precision work too).
  models::LoadOptions load;
  /// Images per forward pass: bounds memory for large sets.
  int64_t batch_size = 16;
};

/// CLIP text alignment. Cheap to copy (copies share the model); calls are inference-only (no autograd).
class TextAlignmentScorer {
 public:
  /// Loads the CLIPModel, its image processor and its tokenizer from one folder. Throws stylealigned::Error for a
  /// missing folder or file, a config.json whose model_type is not "clip", or bad weights.
  static TextAlignmentScorer from_folder(const std::filesystem::path& clip_folder, const ScorerOptions& options = {});

  /// L2-normalised image embeddings [N, projection_dim] (float32, CPU) of uint8 RGB images of any size.
  at::Tensor image_embeds(const std::vector<at::Tensor>& images) const;
  /// The same from already preprocessed pixel_values [N, 3, S, S].
  at::Tensor image_embeds_from_pixels(const at::Tensor& pixel_values) const;
  /// L2-normalised text embeddings [N, projection_dim] (float32, CPU). A text longer than the tokenizer's 77 tokens
  /// is truncated, as transformers does, with a warning.
  at::Tensor text_embeds(const std::vector<std::string>& texts) const;

  /// Text alignment of each image with its own text: cos(image i, text i). `texts` has one entry per image, or one
  /// entry for all. Throws stylealigned::Error for no images or a count mismatch.
  std::vector<double> score(const std::vector<at::Tensor>& images, const std::vector<std::string>& texts) const;

  const ImageProcessor& processor() const;

 private:
  TextAlignmentScorer() = default;
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

/// DINO set consistency. Cheap to copy (copies share the model); calls are inference-only.
class SetConsistencyScorer {
 public:
  /// Loads the ViTModel and its image processor from one folder. Throws stylealigned::Error for a missing folder or
  /// file, a config.json whose model_type is not "vit", or bad weights.
  static SetConsistencyScorer from_folder(const std::filesystem::path& dino_folder, const ScorerOptions& options = {});

  /// DINO embeddings [N, hidden] (float32, CPU): the class token of last_hidden_state, not normalised.
  at::Tensor embeds(const std::vector<at::Tensor>& images) const;
  /// The same from already preprocessed pixel_values [N, 3, S, S].
  at::Tensor embeds_from_pixels(const at::Tensor& pixel_values) const;

  /// Set consistency of one set of images. Throws stylealigned::Error for fewer than two images.
  double score(const std::vector<at::Tensor>& images) const;

  const ImageProcessor& processor() const;

 private:
  SetConsistencyScorer() = default;
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// Sets and summaries -----------------------------------------------------------------------------------------------

/// The scores of one set of images.
struct SetScores {
  std::string name;
  std::vector<double> text_alignment;  ///< per image, in input order
  double mean_text_alignment = 0.0;    ///< mean of text_alignment
  double set_consistency = 0.0;
};

/// Mean and standard deviation over sets of the per-set values (each set counts once, whatever its size).
struct Summary {
  MeanStd text_alignment;
  MeanStd set_consistency;
};

/// Throws stylealigned::Error for an empty list.
Summary summarize(const std::vector<SetScores>& sets);

/// Both scorers together, for scoring whole sets.
class Evaluator {
 public:
  Evaluator(TextAlignmentScorer clip, SetConsistencyScorer dino);
  static Evaluator from_folders(const std::filesystem::path& clip_folder, const std::filesystem::path& dino_folder,
                                const ScorerOptions& options = {});

  /// Scores one set: `texts` are the object texts, one per image or one for all. Throws stylealigned::Error naming
  /// the set for fewer than two images, a text count mismatch, or a bad image (with its index).
  SetScores score_set(const std::string& name, const std::vector<at::Tensor>& images,
                      const std::vector<std::string>& texts) const;

  const TextAlignmentScorer& clip() const { return clip_; }
  const SetConsistencyScorer& dino() const { return dino_; }

 private:
  TextAlignmentScorer clip_;
  SetConsistencyScorer dino_;
};

}  // namespace stylealigned::eval
