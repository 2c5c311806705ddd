// `stylealigned info`: what a model folder holds, as our loader sees it.
#include <fmt/format.h>

#include "stylealigned/attention.h"
#include "stylealigned/pipeline.h"
#include "tool/commands.h"

namespace sa_tool {

void add_info_options(CLI::App& cmd, InfoOptions& o) {
  cmd.add_option("--model", o.model, "diffusers model folder")->required();
}

int run_info(const InfoOptions& o) {
  auto pipe = stylealigned::Pipeline::load(o.model);
  fmt::print("{}\n", pipe.describe());
  fmt::print("scheduler: {}\n", pipe.scheduler_config().to_json());
  auto layers = pipe.attention_layers();
  auto self = stylealigned::select_self_attention(layers);
  auto shared = stylealigned::only_self_level_switch(static_cast<int64_t>(self.size()), 0.0);
  fmt::print("attention layers ({}; StyleAligned replaces the {} self-attention layers):\n", layers.size(),
             self.size());
  for (const auto& name : layers) {
    const bool is_self = name.size() >= 5 && name.compare(name.size() - 5, 5, "attn1") == 0;
    fmt::print("  {:<70} {}\n", name, is_self ? "self  -> style_aligned" : "cross -> default");
  }
  return 0;
}

}  // namespace sa_tool
