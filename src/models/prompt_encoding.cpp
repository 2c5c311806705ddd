#include "stylealigned/models/prompt_encoding.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include "stylealigned/error.h"
#include "stylealigned/log.h"

namespace stylealigned::models {
namespace {

void check_options(const std::vector<std::string>& prompts, const PromptEncodeOptions& options) {
  if (prompts.empty()) throw Error("encode_prompt: no prompts given");
  if (options.num_images_per_prompt < 1) {
    throw Error(
        fmt::format("encode_prompt: num_images_per_prompt must be at least 1, got {}", options.num_images_per_prompt));
  }
  if (options.clip_skip && *options.clip_skip < 0) {
    throw Error(fmt::format("encode_prompt: clip_skip must not be negative, got {}", *options.clip_skip));
  }
}

// One entry per prompt; a single entry applies to all (C++ has no str-or-list argument as Python does).
std::vector<std::string> per_prompt(const std::vector<std::string>& list, size_t count, const char* what) {
  if (list.size() == count) return list;
  if (list.size() == 1) return std::vector<std::string>(count, list.front());
  throw Error(fmt::format("encode_prompt: {} has {} entries for {} prompts", what, list.size(), count));
}

// diffusers logs the part of a prompt that CLIP's 77-token window cuts off; so do we.
void warn_if_truncated(const ClipTokenizer& tokenizer, const std::vector<std::string>& prompts) {
  const size_t keep = static_cast<size_t>(tokenizer.max_length() - 2);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int64_t> ids = tokenizer.tokenize(prompts[i]);
    if (ids.size() <= keep) continue;
    const std::string dropped = tokenizer.decode(std::vector<int64_t>(ids.begin() + keep, ids.end()));
    warn(fmt::format("prompt {} is longer than the text encoder's {} tokens; this part was dropped: \"{}\"", i,
                     tokenizer.max_length(), dropped));
  }
}

// hidden_states[-from_end], Python-style, with a clear error where Python would raise IndexError.
const at::Tensor& hidden_from_end(const CLIPTextOutput& out, int64_t from_end, int64_t clip_skip) {
  const auto count = static_cast<int64_t>(out.hidden_states.size());
  if (from_end > count) {
    throw Error(fmt::format("encode_prompt: clip_skip {} skips more layers than the text encoder has ({})", clip_skip,
                            count - 1));
  }
  return out.hidden_states[count - from_end];
}

CLIPTextForwardOptions with_hidden_states() {
  CLIPTextForwardOptions options;
  options.output_hidden_states = true;
  return options;
}

at::Tensor repeat_per_prompt(const at::Tensor& t, int64_t times) {
  return (!t.defined() || times == 1) ? t : t.repeat_interleave(times, 0);
}

void repeat_all(PromptEmbeddings& e, int64_t times) {
  e.prompt_embeds = repeat_per_prompt(e.prompt_embeds, times);
  e.negative_prompt_embeds = repeat_per_prompt(e.negative_prompt_embeds, times);
  e.pooled_prompt_embeds = repeat_per_prompt(e.pooled_prompt_embeds, times);
  e.negative_pooled_prompt_embeds = repeat_per_prompt(e.negative_pooled_prompt_embeds, times);
}

}  // namespace

PromptEmbeddings encode_prompt_sd(const ClipTokenizer& tokenizer, const CLIPTextModel& text_encoder,
                                  const std::vector<std::string>& prompts, const PromptEncodeOptions& options) {
  check_options(prompts, options);
  CLIPTextModelImpl& te = *text_encoder.ptr();
  PromptEmbeddings e;
  warn_if_truncated(tokenizer, prompts);
  const at::Tensor ids = tokenizer.encode_batch(prompts);
  if (!options.clip_skip) {
    e.prompt_embeds = te.forward(ids).last_hidden_state;
  } else {
    // An earlier layer, but through the final LayerNorm like the last one, as diffusers does.
    const CLIPTextOutput out = te.forward(ids, with_hidden_states());
    e.prompt_embeds = te.final_layer_norm(hidden_from_end(out, *options.clip_skip + 1, *options.clip_skip));
  }
  if (options.do_classifier_free_guidance) {
    const std::vector<std::string> negatives =
        options.negative_prompts ? per_prompt(*options.negative_prompts, prompts.size(), "negative_prompts")
                                 : std::vector<std::string>(prompts.size(), "");
    // diffusers encodes the negatives without clip_skip.
    e.negative_prompt_embeds = te.forward(tokenizer.encode_batch(negatives)).last_hidden_state;
  }
  repeat_all(e, options.num_images_per_prompt);
  return e;
}

PromptEmbeddings encode_prompt_sdxl(const ClipTokenizer& tokenizer, const CLIPTextModel& text_encoder,
                                    const ClipTokenizer& tokenizer_2, const CLIPTextModel& text_encoder_2,
                                    const std::vector<std::string>& prompts, const PromptEncodeOptions& options) {
  check_options(prompts, options);
  if (!text_encoder_2->config().with_projection) {
    throw Error(
        "encode_prompt: text_encoder_2 has no text_projection (expected CLIPTextModelWithProjection), so it "
        "gives no pooled text embeddings");
  }
  const ClipTokenizer* tokenizers[2] = {&tokenizer, &tokenizer_2};
  CLIPTextModelImpl* encoders[2] = {text_encoder.ptr().get(), text_encoder_2.ptr().get()};
  const size_t n = prompts.size();
  const int64_t skip = options.clip_skip.value_or(0);

  PromptEmbeddings e;
  const std::vector<std::string> prompts_2 =
      options.prompts_2 ? per_prompt(*options.prompts_2, n, "prompts_2") : prompts;
  const std::vector<std::string>* texts[2] = {&prompts, &prompts_2};
  std::vector<at::Tensor> parts;
  for (int i = 0; i < 2; ++i) {
    warn_if_truncated(*tokenizers[i], *texts[i]);
    const CLIPTextOutput out = encoders[i]->forward(tokenizers[i]->encode_batch(*texts[i]), with_hidden_states());
    // SDXL always conditions on the penultimate layer; clip_skip counts from there.
    parts.push_back(hidden_from_end(out, skip + 2, skip));
    e.pooled_prompt_embeds = out.text_embeds;  // only the last encoder's counts
  }
  e.prompt_embeds = at::cat(parts, -1);

  if (options.do_classifier_free_guidance) {
    if (!options.negative_prompts && options.force_zeros_for_empty_prompt) {
      e.negative_prompt_embeds = at::zeros_like(e.prompt_embeds);
      e.negative_pooled_prompt_embeds = at::zeros_like(e.pooled_prompt_embeds);
    } else {
      const std::vector<std::string> negatives = options.negative_prompts
                                                     ? per_prompt(*options.negative_prompts, n, "negative_prompts")
                                                     : std::vector<std::string>(n, "");
      const std::vector<std::string> negatives_2 =
          options.negative_prompts_2 ? per_prompt(*options.negative_prompts_2, n, "negative_prompts_2") : negatives;
      const std::vector<std::string>* neg_texts[2] = {&negatives, &negatives_2};
      parts.clear();
      for (int i = 0; i < 2; ++i) {
        const CLIPTextOutput out =
            encoders[i]->forward(tokenizers[i]->encode_batch(*neg_texts[i]), with_hidden_states());
        parts.push_back(hidden_from_end(out, 2, 0));  // diffusers ignores clip_skip for the negatives
        e.negative_pooled_prompt_embeds = out.text_embeds;
      }
      e.negative_prompt_embeds = at::cat(parts, -1);
    }
  }
  repeat_all(e, options.num_images_per_prompt);
  return e;
}

}  // namespace stylealigned::models
