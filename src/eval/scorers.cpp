// The model-backed scorers: CLIP text alignment, DINO set consistency, and whole sets.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>

#include <algorithm>
#include <utility>

#include "stylealigned/error.h"
#include "stylealigned/eval/metrics.h"
#include "stylealigned/log.h"
#include "stylealigned/models/clip.h"
#include "stylealigned/models/tokenizer.h"
#include "stylealigned/models/vit.h"

namespace stylealigned::eval {
namespace {

void check_options(const ScorerOptions& options) {
  if (options.batch_size < 1) {
    throw Error(fmt::format("evaluation: batch_size must be at least 1, got {}", options.batch_size));
  }
}

// Runs `embed` over slices of at most batch_size preprocessed images and concatenates the rows.
template <typename Embed>
at::Tensor batched(const std::vector<at::Tensor>& images, const ImageProcessor& processor, int64_t batch_size,
                   const char* what, Embed&& embed) {
  if (images.empty()) throw Error(fmt::format("{}: no images", what));
  std::vector<at::Tensor> rows;
  at::Tensor first;
  for (size_t begin = 0; begin < images.size(); begin += size_t(batch_size)) {
    const size_t end = std::min(images.size(), begin + size_t(batch_size));
    std::vector<at::Tensor> chunk;
    for (size_t i = begin; i < end; ++i) {
      try {
        chunk.push_back(processor.preprocess(images[i]));
      } catch (const Error& e) {
        throw Error(fmt::format("{}: image {}: {}", what, i, e.what()));
      }
      if (!first.defined()) first = chunk.back();
      if (chunk.back().sizes() != first.sizes()) {
        throw Error(
            fmt::format("{}: image {} preprocesses to {}x{} pixels but image 0 to {}x{}; this {} "
                        "configuration gives no common size (no crop and no fixed resize)",
                        what, i, chunk.back().size(2), chunk.back().size(3), first.size(2), first.size(3),
                        processor.config().class_name));
      }
    }
    rows.push_back(embed(at::cat(chunk, 0)));
  }
  return at::cat(rows, 0);
}

}  // namespace

// TextAlignmentScorer ----------------------------------------------------------------------------------------------

struct TextAlignmentScorer::Impl {
  models::CLIPModel model;
  ImageProcessor processor;
  models::ClipTokenizer tokenizer;
  int64_t batch_size;
};

TextAlignmentScorer TextAlignmentScorer::from_folder(const std::filesystem::path& folder,
                                                     const ScorerOptions& options) {
  check_options(options);
  auto model = models::CLIPModel::from_pretrained(folder, options.load);  // checks the folder and model_type first
  auto processor = ImageProcessor::from_folder(folder);
  auto tokenizer = models::ClipTokenizer::from_folder(folder);
  TextAlignmentScorer scorer;
  scorer.impl_ =
      std::make_shared<Impl>(Impl{std::move(model), std::move(processor), std::move(tokenizer), options.batch_size});
  return scorer;
}

at::Tensor TextAlignmentScorer::image_embeds_from_pixels(const at::Tensor& pixel_values) const {
  at::NoGradGuard no_grad;
  const at::Tensor e = impl_->model->get_image_features(pixel_values).to(at::kCPU, at::kFloat);
  return e / e.norm(2, {-1}, true);
}

at::Tensor TextAlignmentScorer::image_embeds(const std::vector<at::Tensor>& images) const {
  return batched(images, impl_->processor, impl_->batch_size, "CLIP image embeddings",
                 [this](const at::Tensor& pixels) { return image_embeds_from_pixels(pixels); });
}

at::Tensor TextAlignmentScorer::text_embeds(const std::vector<std::string>& texts) const {
  if (texts.empty()) throw Error("CLIP text embeddings: no texts");
  const auto& tok = impl_->tokenizer;
  for (size_t i = 0; i < texts.size(); ++i) {
    const auto n = int64_t(tok.tokenize(texts[i]).size());
    if (n > tok.max_length() - 2) {
      const std::string shown = texts[i].size() > 60 ? texts[i].substr(0, 57) + "..." : texts[i];
      warn(fmt::format("text {} (\"{}\") has {} tokens; CLIP reads only the first {}", i, shown, n,
                       tok.max_length() - 2));
    }
  }
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> rows;
  for (size_t begin = 0; begin < texts.size(); begin += size_t(impl_->batch_size)) {
    const size_t end = std::min(texts.size(), begin + size_t(impl_->batch_size));
    const at::Tensor ids =
        tok.encode_batch(std::vector<std::string>(texts.begin() + long(begin), texts.begin() + long(end)));
    rows.push_back(impl_->model->get_text_features(ids).to(at::kCPU, at::kFloat));
  }
  const at::Tensor e = at::cat(rows, 0);
  return e / e.norm(2, {-1}, true);
}

std::vector<double> TextAlignmentScorer::score(const std::vector<at::Tensor>& images,
                                               const std::vector<std::string>& texts) const {
  if (images.empty()) throw Error("text alignment: no images");
  if (texts.size() != images.size() && texts.size() != 1) {
    throw Error(fmt::format("text alignment: {} images but {} texts (give one text per image, or one for all)",
                            images.size(), texts.size()));
  }
  const at::Tensor img = image_embeds(images);
  at::Tensor txt = text_embeds(texts);
  if (txt.size(0) == 1) txt = txt.expand({img.size(0), txt.size(1)});
  const at::Tensor cos = paired_cosine(img, txt).to(at::kDouble).contiguous();
  return std::vector<double>(cos.data_ptr<double>(), cos.data_ptr<double>() + cos.numel());
}

const ImageProcessor& TextAlignmentScorer::processor() const { return impl_->processor; }

// SetConsistencyScorer ---------------------------------------------------------------------------------------------

struct SetConsistencyScorer::Impl {
  models::ViTModel model;
  ImageProcessor processor;
  int64_t batch_size;
};

SetConsistencyScorer SetConsistencyScorer::from_folder(const std::filesystem::path& folder,
                                                       const ScorerOptions& options) {
  check_options(options);
  auto model = models::ViTModel::from_pretrained(folder, options.load);
  auto processor = ImageProcessor::from_folder(folder);
  SetConsistencyScorer scorer;
  scorer.impl_ = std::make_shared<Impl>(Impl{std::move(model), std::move(processor), options.batch_size});
  return scorer;
}

at::Tensor SetConsistencyScorer::embeds_from_pixels(const at::Tensor& pixel_values) const {
  at::NoGradGuard no_grad;
  return impl_->model->forward(pixel_values).cls_embeds().to(at::kCPU, at::kFloat);
}

at::Tensor SetConsistencyScorer::embeds(const std::vector<at::Tensor>& images) const {
  return batched(images, impl_->processor, impl_->batch_size, "DINO embeddings",
                 [this](const at::Tensor& pixels) { return embeds_from_pixels(pixels); });
}

double SetConsistencyScorer::score(const std::vector<at::Tensor>& images) const {
  if (images.size() < 2) {
    throw Error(fmt::format("set consistency needs at least two images, got {}", images.size()));
  }
  return set_consistency(embeds(images));
}

const ImageProcessor& SetConsistencyScorer::processor() const { return impl_->processor; }

// Evaluator --------------------------------------------------------------------------------------------------------

Evaluator::Evaluator(TextAlignmentScorer clip, SetConsistencyScorer dino)
    : clip_(std::move(clip)), dino_(std::move(dino)) {}

Evaluator Evaluator::from_folders(const std::filesystem::path& clip_folder, const std::filesystem::path& dino_folder,
                                  const ScorerOptions& options) {
  return Evaluator(TextAlignmentScorer::from_folder(clip_folder, options),
                   SetConsistencyScorer::from_folder(dino_folder, options));
}

SetScores Evaluator::score_set(const std::string& name, const std::vector<at::Tensor>& images,
                               const std::vector<std::string>& texts) const {
  try {
    if (images.size() < 2) {
      throw Error(fmt::format("set consistency needs at least two images, got {}", images.size()));
    }
    SetScores out;
    out.name = name;
    out.text_alignment = clip_.score(images, texts);
    out.mean_text_alignment = mean_std(out.text_alignment).mean;
    out.set_consistency = dino_.score(images);
    return out;
  } catch (const Error& e) {
    throw Error(fmt::format("set \"{}\": {}", name, e.what()));
  }
}

}  // namespace stylealigned::eval
