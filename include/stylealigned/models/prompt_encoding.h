// stylealigned/models/prompt_encoding.h: prompts -> the text conditioning of SD1.x and SDXL, as diffusers'
// StableDiffusionPipeline.encode_prompt / StableDiffusionXLPipeline.encode_prompt (0.25) compute it.
//
//   auto tok = ClipTokenizer::from_folder(dir / "tokenizer"), tok2 = ClipTokenizer::from_folder(dir / "tokenizer_2");
//   auto te = CLIPTextModel::from_pretrained(dir / "text_encoder");
//   auto te2 = CLIPTextModel::from_pretrained(dir / "text_encoder_2");
//   at::NoGradGuard no_grad;
//   PromptEmbeddings e = encode_prompt_sdxl(tok, te, tok2, te2, {"a cat", "a dog"});
//   // UNet batch [negative ; positive]: at::cat({e.negative_prompt_embeds, e.prompt_embeds})
//
// Autograd stays as the caller set it: call under at::NoGradGuard for inference.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "stylealigned/models/clip_text.h"
#include "stylealigned/models/tokenizer.h"

namespace stylealigned::models {

/// diffusers' encode_prompt arguments. A list of one negative prompt applies to every prompt.
struct PromptEncodeOptions {
  /// nullopt is diffusers' `negative_prompt=None`: SD1.x encodes "", SDXL gives zeros when
  /// force_zeros_for_empty_prompt is set.
  std::optional<std::vector<std::string>> negative_prompts;
  /// SDXL: prompts for text_encoder_2 (`prompt_2`); default the prompts.
  std::optional<std::vector<std::string>> prompts_2;
  /// SDXL: negative prompts for text_encoder_2 (`negative_prompt_2`); default the negative prompts.
  std::optional<std::vector<std::string>> negative_prompts_2;
  bool do_classifier_free_guidance = true;
  /// Each prompt's embeddings are repeated this many times, consecutively ([p0, p0, p1, p1]).
  int64_t num_images_per_prompt = 1;
  /// Layers skipped from the end (diffusers' clip_skip). SD1.x: final_layer_norm(hidden_states[-(k+1)]);
  /// SDXL: hidden_states[-(k+2)]. As in diffusers, it applies to the prompts only, never to the negatives.
  std::optional<int64_t> clip_skip;
  /// SDXL (model_index.json): with no negative prompt, the negative embeddings are zeros instead of the encoding
  /// of "".
  bool force_zeros_for_empty_prompt = true;
};

/// Outputs in the text encoders' dtype and device; negatives are undefined without classifier-free guidance.
struct PromptEmbeddings {
  at::Tensor prompt_embeds;                  ///< [n * num_images, 77, C]
  at::Tensor negative_prompt_embeds;         ///< same shape
  at::Tensor pooled_prompt_embeds;           ///< SDXL: [n * num_images, projection_dim] (text_encoder_2's text_embeds)
  at::Tensor negative_pooled_prompt_embeds;  ///< SDXL: same shape
};

/// SD1.x: the last hidden state (after the final LayerNorm) of the one text encoder. Warns (stylealigned::warn)
/// about a prompt truncated to the tokenizer's length, naming the dropped text. Throws stylealigned::Error for an
/// empty prompt list, a negative list of another length, or a clip_skip beyond the encoder's depth.
PromptEmbeddings encode_prompt_sd(const ClipTokenizer& tokenizer, const CLIPTextModel& text_encoder,
                                  const std::vector<std::string>& prompts, const PromptEncodeOptions& options = {});

/// SDXL: the penultimate hidden states of both encoders concatenated on the channel axis (768 + 1280 = 2048 for
/// SDXL base), and text_encoder_2's projected pooled embedding. text_encoder_2 must have a text_projection.
PromptEmbeddings encode_prompt_sdxl(const ClipTokenizer& tokenizer, const CLIPTextModel& text_encoder,
                                    const ClipTokenizer& tokenizer_2, const CLIPTextModel& text_encoder_2,
                                    const std::vector<std::string>& prompts, const PromptEncodeOptions& options = {});

}  // namespace stylealigned::models
