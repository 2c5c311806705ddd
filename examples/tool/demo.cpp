// `stylealigned demo`: StyleAligned on one self-attention layer with SDXL's head layout, on synthetic features in
// which every image has its own per-channel "style" (offset and gain). Prints what changes and what must not.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <sys/resource.h>

#include <chrono>

#include "stylealigned/attention.h"
#include "stylealigned/runtime.h"
#include "stylealigned/style_aligned.h"
#include "tool/commands.h"

namespace sa_tool {

void add_demo_options(CLI::App& cmd, DemoOptions& o) {
  cmd.add_option("--images", o.images, "images per set (image 0 is the reference)")->check(CLI::Range(2, 64));
  cmd.add_option("--tokens", o.tokens, "tokens per image (1024 = a 32x32 latent level)")->check(CLI::Range(2, 65536));
  cmd.add_option("--heads", o.heads, "attention heads")->check(CLI::Range(1, 64));
  cmd.add_option("--head-dim", o.head_dim, "channels per head")->check(CLI::Range(1, 512));
  // --seed is the showcase's (it seeds both); the layer demo keeps its own default.
}

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;
}
// Mean |per-channel std - reference's per-channel std| over the target rows of each group.
double stat_gap(const at::Tensor& x, const stylealigned::BatchLayout& layout) {
  auto [mean, std] = stylealigned::calc_mean_std(x);
  double gap = 0;
  int64_t n = 0;
  for (const auto& g : layout.groups()) {
    for (int64_t r = g.begin; r < g.end; ++r) {
      if (r == g.reference) continue;
      gap += (mean[r] - mean[g.reference]).abs().mean().item<double>() +
             (std[r] - std[g.reference]).abs().mean().item<double>();
      ++n;
    }
  }
  return n ? gap / n : 0.0;
}
}  // namespace

int run_demo(const DemoOptions& o) {
  auto gen = at::detail::createCPUGenerator(o.seed);
  auto layout = stylealigned::BatchLayout::cfg(o.images);  // [uncond images ; cond images]
  const int64_t batch = layout.batch_size();
  auto make = [&] {
    auto style_gain = 0.5 + at::rand({batch, o.heads, 1, o.head_dim}, gen) * 1.5;
    auto style_offset = at::randn({batch, o.heads, 1, o.head_dim}, gen);
    return at::randn({batch, o.heads, o.tokens, o.head_dim}, gen) * style_gain + style_offset;
  };
  auto q = make(), k = make(), v = make();
  const double scale = 1.0 / std::sqrt(static_cast<double>(o.head_dim));
  stylealigned::AttentionCall call{"mid_block.attentions.0.transformer_blocks.0.attn1",
                                   stylealigned::AttentionKind::self_attention, layout, scale};

  fmt::print("stylealigned demo on {} ({} threads)\n", stylealigned::cpu_model_name(), at::get_num_threads());
  fmt::print("one self-attention layer: batch {} = {} CFG groups x {} images, {} heads x {}, {} tokens; layout {}\n\n",
             batch, layout.groups().size(), o.images, o.heads, o.head_dim, o.tokens, layout.to_string());

  stylealigned::DefaultAttentionProcessor plain;
  stylealigned::StyleAlignedProcessor aligned(stylealigned::StyleAlignedOptions::sdxl_demo());
  auto t0 = std::chrono::steady_clock::now();
  auto out_plain = plain.attend(q, k, v, call);
  const double t_plain = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  auto out_aligned = aligned.attend(q, k, v, call);
  const double t_aligned = seconds_since(t0);

  // How much softmax mass a target puts on its reference's tokens: sigmoid(lse_ref - lse_own), per query.
  double ref_mass = 0;
  int64_t targets = 0;
  for (const auto& g : layout.groups()) {
    auto ref_k = k.narrow(0, g.reference, 1), ref_v = v.narrow(0, g.reference, 1);
    auto tq = stylealigned::adain(q.narrow(0, g.begin, g.size()), stylealigned::BatchLayout::single_group(g.size()));
    auto tk = stylealigned::adain(k.narrow(0, g.begin, g.size()), stylealigned::BatchLayout::single_group(g.size()));
    auto own = stylealigned::attention_with_lse(tq, tk, v.narrow(0, g.begin, g.size()), scale);
    auto ref = stylealigned::attention_with_lse(tq, ref_k, ref_v, scale);
    auto mass = at::sigmoid(ref.lse - own.lse).mean({1, 2});  // [rows]
    ref_mass += mass.slice(0, 1).sum().item<double>();
    targets += g.size() - 1;
  }

  double ref_rows_change = 0;
  for (const auto& g : layout.groups()) {
    ref_rows_change = std::max(
        ref_rows_change, (out_plain[g.reference] - out_aligned[g.reference]).abs().max().item<double>());
  }
  fmt::print("{:<58} {:>12} {:>12}\n", "", "default", "StyleAligned");
  fmt::print("{:<58} {:>12.4f} {:>12.4f}\n", "target-vs-reference gap of output mean+std (lower=aligned)",
             stat_gap(out_plain, layout), stat_gap(out_aligned, layout));
  fmt::print("{:<58} {:>12.3f} {:>12.3f}\n", "softmax mass targets put on reference tokens", 0.0,
             targets ? ref_mass / targets : 0.0);
  fmt::print("{:<58} {:>12.3f} {:>12.3f}\n", "seconds for the layer", t_plain, t_aligned);
  fmt::print("\nreference rows: max change {:.2e} (StyleAligned leaves the reference as plain attention)\n",
             ref_rows_change);
  fmt::print("peak RSS {:.0f} MB; a materialised [{} x {}] score tensor per row and head would need {:.0f} MB\n",
             peak_rss_mb(), o.tokens, 2 * o.tokens,
             double(batch) * o.heads * o.tokens * 2 * o.tokens * 4 / (1024.0 * 1024.0));
  return ref_rows_change < 1e-4 ? 0 : 1;
}

}  // namespace sa_tool
