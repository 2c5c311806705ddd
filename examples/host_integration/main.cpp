// A renderer that owns a toy transformer block (its own weights, its own attention layer) and makes a batch of
// frames share the style of frame 0 by swapping in stylealigned's processor. Only public headers are used.
//
// The few lines a host needs:
//   auto layout = stylealigned::BatchLayout::single_group(frames);            // frame 0 is the reference
//   auto sa = std::make_shared<stylealigned::StyleAlignedProcessor>(stylealigned::StyleAlignedOptions::sdxl_demo());
//   stylealigned::AttentionCall call{"block0.attn1", stylealigned::AttentionKind::self_attention, layout, scale};
//   at::Tensor out = sa->attend(q, k, v, call);                                  // q, k, v: [B, heads, tokens, dim]
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <memory>

#include "stylealigned/attention.h"
#include "stylealigned/style_aligned.h"

namespace {

// The host's own block: pre-norm self-attention with its own projections.
struct ToyBlock {
  int64_t channels = 64, heads = 4;
  at::Tensor wq, wk, wv, wo;
  explicit ToyBlock(uint64_t seed) {
    auto gen = at::detail::createCPUGenerator(seed);
    auto init = [&] { return at::randn({channels, channels}, gen) / std::sqrt(double(channels)); };
    wq = init(), wk = init(), wv = init(), wo = init();
  }
  // x: [frames, tokens, channels]
  at::Tensor forward(const at::Tensor& x, stylealigned::AttentionProcessor& processor,
                     const stylealigned::BatchLayout& layout) const {
    const int64_t b = x.size(0), n = x.size(1), d = channels / heads;
    auto h = at::layer_norm(x, {channels});
    auto split = [&](const at::Tensor& t) { return t.view({b, n, heads, d}).transpose(1, 2); };
    auto q = split(at::matmul(h, wq.t())), k = split(at::matmul(h, wk.t())), v = split(at::matmul(h, wv.t()));
    stylealigned::AttentionCall call{"toy.block0.attn1", stylealigned::AttentionKind::self_attention, layout,
                                     1.0 / std::sqrt(double(d))};
    auto a = processor.attend(q, k, v, call).transpose(1, 2).reshape({b, n, channels});
    return x + at::matmul(a, wo.t());
  }
};

// Mean over frames 1.. of the distance between a frame's per-channel (mean, std) and frame 0's.
double style_distance(const at::Tensor& x) {
  auto mean = x.mean(1), std = x.std(1);
  auto dm = (mean.slice(0, 1) - mean.slice(0, 0, 1)).abs().mean();
  auto ds = (std.slice(0, 1) - std.slice(0, 0, 1)).abs().mean();
  return (dm + ds).item<double>();
}

}  // namespace

int main() {
  const int64_t frames = 4, tokens = 256;
  ToyBlock block(7);
  // Frames with different "styles": each has its own per-channel offset and gain.
  auto gen = at::detail::createCPUGenerator(11);
  auto x = at::randn({frames, tokens, block.channels}, gen) * (1 + at::rand({frames, 1, block.channels}, gen)) +
           at::randn({frames, 1, block.channels}, gen);

  auto layout = stylealigned::BatchLayout::single_group(frames);
  stylealigned::DefaultAttentionProcessor plain;
  stylealigned::StyleAlignedProcessor aligned(stylealigned::StyleAlignedOptions::sdxl_demo());

  at::Tensor y_plain = x, y_aligned = x;
  for (int layer = 0; layer < 4; ++layer) {  // the same block applied 4 times, like a deeper network
    y_plain = block.forward(y_plain, plain, layout);
    y_aligned = block.forward(y_aligned, aligned, layout);
  }
  const double ref_change = (y_plain[0] - y_aligned[0]).abs().max().item<double>();
  std::printf("host_integration: %lld frames x %lld tokens, frame 0 is the reference\n", (long long)frames,
              (long long)tokens);
  std::printf("  style distance to frame 0, default attention: %.4f\n", style_distance(y_plain));
  std::printf("  style distance to frame 0, StyleAligned:      %.4f\n", style_distance(y_aligned));
  std::printf("  reference frame changed by StyleAligned:      %.2e (must stay ~0)\n", ref_change);
  const bool ok = style_distance(y_aligned) < style_distance(y_plain) && ref_change < 1e-4;
  std::printf("%s\n", ok ? "OK: targets moved toward the reference style" : "FAILED");
  return ok ? 0 : 1;
}
