// stylealigned_bench_unet: times whole UNet forwards (a real checkpoint or a config with random weights) and says
// where the time goes.
//
//   stylealigned_bench_unet --config sd15 --batch 8 --threads 2              # StyleAligned (SDXL demo options)
//   stylealigned_bench_unet --config sd15 --batch 8 --no-style-align         # vanilla
//   stylealigned_bench_unet --model /models/sdxl-base --width 1024 --height 1024 --dtype bf16
//   stylealigned_bench_unet --config sd15 --width 512 --height 512 --batch 1 --count-only   # FLOP count only
//
// After a warm-up it prints one JSON object per timed forward, then one extra forward with the time split by
// operator class (the split has its own pass so its bookkeeping never slows the timed ones), then a summary line.
// Rates: `gflops` is the analytic FLOP count of one forward over its median time; `gemm_gflops` an fp32
// 2048^3 matrix product measured in this process, before and after the forwards; `efficiency` their ratio.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <fmt/format.h>
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bench_common.h"
#include "internal/onednn.h"
#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/log.h"
#include "stylealigned/models/unet.h"
#include "stylealigned/runtime.h"
#include "stylealigned/style_aligned.h"

namespace {

namespace sa = stylealigned;
using sa::models::UNetConfig;
using namespace sa_bench;  // NOLINT: the shared timing, memory and GEMM-yardstick helpers

// ---- Analytic FLOP count ------------------------------------------------------------------------------------------
//
// A walk over the UNet's structure as UNet2DConditionModelImpl builds it (diffusers' layout), counting
// multiply-accumulates of every convolution, linear layer and both attention matmuls (q·kᵀ and p·v); norms,
// activations, softmax and AdaIN are left out. 1 MAC = 2 FLOPs. It also counts parameters, which checks the walk
// against the built model.

struct StyleSharing {
  bool enabled = false;
  sa::StyleAlignedOptions options;
  const sa::BatchLayout* layout = nullptr;
};

class FlopCount {
 public:
  enum class Op { conv, linear, attention };

  FlopCount(const UNetConfig& config, int64_t batch, int64_t latent_h, int64_t latent_w, int64_t text_tokens,
            const StyleSharing& style)
      : c_(config.normalized()), batch_(batch), text_tokens_(text_tokens), style_(style) {
    walk(latent_h, latent_w);
  }

  double flops(Op op) const { return 2.0 * macs_[static_cast<size_t>(op)]; }
  double total_flops() const { return flops(Op::conv) + flops(Op::linear) + flops(Op::attention); }
  double params() const { return params_; }
  /// Share of the reference block StyleAligned adds to shared self-attention layers (in the attention total).
  double style_aligned_extra_flops() const { return 2.0 * style_extra_macs_; }
  int64_t shared_self_attention_layers() const { return shared_layers_; }

  /// GMACs in the buckets of REFERENCE_NOTES D1 (convs, self-attention projections and scores, cross-attention,
  /// feed-forward, proj_in/out, time embeddings, StyleAligned's reference block).
  Json buckets_gmac() const {
    Json j;
    for (const auto& [name, macs] : buckets_) j[name] = macs / 1e9;
    return j;
  }

 private:
  struct SelfAttentionLayer {
    int64_t tokens;
    int64_t inner;
  };

  void add(Op op, const std::string& bucket, double macs) {
    macs_[static_cast<size_t>(op)] += macs;
    buckets_[bucket] += macs;
  }
  void conv(int64_t cin, int64_t cout, int64_t k, int64_t out_h, int64_t out_w, const char* bucket = "convs") {
    add(Op::conv, bucket, static_cast<double>(batch_) * cout * cin * k * k * out_h * out_w);
    params_ += static_cast<double>(cout) * cin * k * k + cout;
  }
  void linear(int64_t in, int64_t out, bool bias, double rows, const char* bucket) {
    add(Op::linear, bucket, rows * in * out);
    params_ += static_cast<double>(in) * out + (bias ? out : 0);
  }
  void norm(int64_t channels) { params_ += 2.0 * channels; }

  void resnet(int64_t cin, int64_t cout, int64_t h, int64_t w) {
    norm(cin);
    conv(cin, cout, 3, h, w);
    linear(c_.time_embed_dim(), cout, true, static_cast<double>(batch_), "time_embeddings");
    norm(cout);
    conv(cout, cout, 3, h, w);
    if (cin != cout) conv(cin, cout, 1, h, w);
  }

  void transformer(int64_t channels, int64_t heads, int64_t layers, int64_t cross_dim, int64_t h, int64_t w,
                   std::vector<SelfAttentionLayer>& self_layers) {
    const int64_t inner = heads * (channels / heads);
    const int64_t n = h * w;
    const double rows = static_cast<double>(batch_) * n;
    const double text_rows = static_cast<double>(batch_) * text_tokens_;
    norm(channels);
    if (c_.use_linear_projection) {
      linear(channels, inner, true, rows, "proj_in_out");
    } else {
      conv(channels, inner, 1, h, w, "proj_in_out");
    }
    for (int64_t l = 0; l < layers; ++l) {
      norm(inner);
      for (int i = 0; i < 3; ++i) linear(inner, inner, false, rows, "self_attention_qkv_out");
      linear(inner, inner, true, rows, "self_attention_qkv_out");
      add(Op::attention, "self_attention_scores", 2.0 * batch_ * static_cast<double>(n) * n * inner);
      self_layers.push_back({n, inner});
      norm(inner);
      linear(inner, inner, false, rows, "cross_attention");
      linear(cross_dim, inner, false, text_rows, "cross_attention");
      linear(cross_dim, inner, false, text_rows, "cross_attention");
      linear(inner, inner, true, rows, "cross_attention");
      add(Op::attention, "cross_attention", 2.0 * batch_ * static_cast<double>(n) * text_tokens_ * inner);
      norm(inner);
      linear(inner, inner * 8, true, rows, "feed_forward");  // GEGLU projection to 2 x 4 x inner
      linear(inner * 4, inner, true, rows, "feed_forward");
    }
    if (c_.use_linear_projection) {
      linear(inner, channels, true, rows, "proj_in_out");
    } else {
      conv(inner, channels, 1, h, w, "proj_in_out");
    }
  }

  // The extra reference block of every self-attention layer StyleAligned shares (diffusers' processor order:
  // down, up, mid; only_self_level picks the unshared ones exactly as install_style_aligned does).
  void style_aligned(const std::vector<SelfAttentionLayer>& layers) {
    if (!style_.enabled || style_.layout == nullptr || !style_.layout->has_targets()) return;
    const sa::StyleAlignedOptions& o = style_.options;
    if (!o.share_attention && !o.full_attention_share) return;
    const auto unshared = sa::only_self_level_switch(static_cast<int64_t>(layers.size()), o.only_self_level);
    for (size_t i = 0; i < layers.size(); ++i) {
      if (unshared[i]) continue;
      ++shared_layers_;
      const double n2i = static_cast<double>(layers[i].tokens) * layers[i].tokens * layers[i].inner;
      double extra = 0.0;
      for (const auto& g : style_.layout->groups()) {
        const double rows = static_cast<double>(g.size());
        // full share: one sequence of rows x tokens per group; else each target adds a tokens x tokens block.
        extra += o.full_attention_share ? 2.0 * (rows * rows - rows) * n2i : 2.0 * (rows - 1.0) * n2i;
      }
      style_extra_macs_ += extra;
      add(Op::attention, "style_aligned_reference_block", extra);
    }
  }

  void walk(int64_t height, int64_t width) {
    const auto levels = static_cast<size_t>(c_.levels());
    const int64_t temb = c_.time_embed_dim();
    const double rows = static_cast<double>(batch_);
    conv(c_.in_channels, c_.block_out_channels[0], c_.conv_in_kernel, height, width);
    linear(c_.block_out_channels[0], temb, true, rows, "time_embeddings");
    linear(temb, temb, true, rows, "time_embeddings");
    if (c_.addition_embed_type == "text_time") {
      linear(c_.projection_class_embeddings_input_dim, temb, true, rows, "time_embeddings");
      linear(temb, temb, true, rows, "time_embeddings");
    }

    struct Skip {
      int64_t channels, h, w;
    };
    std::vector<Skip> skips{{c_.block_out_channels[0], height, width}};
    std::vector<SelfAttentionLayer> down_self, mid_self, up_self;
    int64_t ch = c_.block_out_channels[0], h = height, w = width;
    for (size_t i = 0; i < levels; ++i) {
      const int64_t out = c_.block_out_channels[i];
      for (int64_t j = 0; j < c_.layers_per_block[i]; ++j) {
        resnet(ch, out, h, w);
        ch = out;
        if (c_.down_block_types[i] == "CrossAttnDownBlock2D") {
          transformer(ch, c_.num_attention_heads[i], c_.transformer_layers_per_block[i], c_.cross_attention_dim[i], h,
                      w, down_self);
        }
        skips.push_back({ch, h, w});
      }
      if (i + 1 < levels) {
        const int64_t pad = c_.downsample_padding;
        const int64_t extra = pad == 0 ? 1 : 0;  // Downsample2D pads right/bottom by one when padding is 0
        h = (h + extra + 2 * pad - 3) / 2 + 1;
        w = (w + extra + 2 * pad - 3) / 2 + 1;
        conv(ch, ch, 3, h, w);
        skips.push_back({ch, h, w});
      }
    }

    resnet(ch, ch, h, w);
    transformer(ch, c_.num_attention_heads.back(), c_.transformer_layers_per_block.back(),
                c_.cross_attention_dim.back(), h, w, mid_self);
    resnet(ch, ch, h, w);

    for (size_t i = 0; i < levels; ++i) {
      const size_t r = levels - 1 - i;
      const int64_t out = c_.block_out_channels[r];
      for (int64_t j = 0; j < c_.layers_per_block[r] + 1; ++j) {
        const Skip skip = skips.back();
        skips.pop_back();
        resnet(ch + skip.channels, out, h, w);
        ch = out;
        if (c_.up_block_types[i] == "CrossAttnUpBlock2D") {
          transformer(ch, c_.num_attention_heads[r], c_.transformer_layers_per_block[r], c_.cross_attention_dim[r], h,
                      w, up_self);
        }
      }
      if (i + 1 < levels) {  // nearest upsampling to the next skip's size, then a 3x3 conv
        h = skips.back().h;
        w = skips.back().w;
        conv(ch, ch, 3, h, w);
      }
    }
    norm(c_.block_out_channels[0]);
    conv(c_.block_out_channels[0], c_.out_channels, c_.conv_out_kernel, h, w);

    std::vector<SelfAttentionLayer> self_layers = down_self;
    self_layers.insert(self_layers.end(), up_self.begin(), up_self.end());
    self_layers.insert(self_layers.end(), mid_self.begin(), mid_self.end());
    style_aligned(self_layers);
  }

  UNetConfig c_;
  int64_t batch_;
  int64_t text_tokens_;
  StyleSharing style_;
  double macs_[3] = {0.0, 0.0, 0.0};
  std::map<std::string, double> buckets_;
  double params_ = 0.0;
  double style_extra_macs_ = 0.0;
  int64_t shared_layers_ = 0;
};

// ---- Time split -----------------------------------------------------------------------------------------------------
//
// During the split pass: attention processors and the norm hook are timed by decorators; every other top-level ATen
// op on the benchmark thread is timed through a RecordFunction callback (nested ops and worker threads are ignored
// thanks to a thread-local depth counter, so each moment is counted once).

struct SplitState {
  bool active = false;
  bool cuda = false;
  double attention_self = 0.0;
  double attention_cross = 0.0;
  double norm_hook = 0.0;
  std::map<std::string, double> ops;  // top-level ATen op name -> seconds
  std::map<std::string, int64_t> op_calls;
};
SplitState g_split;
thread_local bool tl_benchmark_thread = false;
thread_local int tl_depth = 0;
thread_local Clock::time_point tl_start;

void sync_device() {
  if (!g_split.cuda) return;
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  impl.getStream(c10::Device(c10::DeviceType::CUDA, impl.getDevice().index())).synchronize();
}

std::unique_ptr<at::ObserverContext> on_op_start(const at::RecordFunction& /*fn*/) {
  if (!tl_benchmark_thread) return nullptr;
  if (tl_depth++ == 0) {
    sync_device();
    tl_start = Clock::now();
  }
  return nullptr;
}

void on_op_end(const at::RecordFunction& fn, at::ObserverContext* /*ctx*/) {
  if (!tl_benchmark_thread) return;
  if (--tl_depth == 0) {
    sync_device();
    const char* name = fn.name();
    const std::string key = name != nullptr ? name : "?";
    g_split.ops[key] += seconds_since(tl_start);
    ++g_split.op_calls[key];
  }
}

// Times a section of the benchmark thread as one top-level unit (ops inside it are not counted again).
class TimedSection {
 public:
  explicit TimedSection(double& sink) : sink_(g_split.active && tl_benchmark_thread && tl_depth == 0 ? &sink : nullptr) {
    ++tl_depth;
    if (sink_ != nullptr) {
      sync_device();
      start_ = Clock::now();
    }
  }
  ~TimedSection() {
    if (sink_ != nullptr) {
      sync_device();
      *sink_ += seconds_since(start_);
    }
    --tl_depth;
  }
  TimedSection(const TimedSection&) = delete;
  TimedSection& operator=(const TimedSection&) = delete;

 private:
  double* sink_;
  Clock::time_point start_;
};

class TimedProcessor : public sa::AttentionProcessor {
 public:
  explicit TimedProcessor(std::shared_ptr<sa::AttentionProcessor> inner) : inner_(std::move(inner)) {}
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const sa::AttentionCall& call) override {
    if (!g_split.active) return inner_->attend(q, k, v, call);
    TimedSection section(call.kind == sa::AttentionKind::self_attention ? g_split.attention_self
                                                                        : g_split.attention_cross);
    return inner_->attend(q, k, v, call);
  }
  std::string name() const override { return inner_->name(); }

 private:
  std::shared_ptr<sa::AttentionProcessor> inner_;
};

class TimedNormHook : public sa::NormHook {
 public:
  explicit TimedNormHook(std::shared_ptr<sa::NormHook> inner) : inner_(std::move(inner)) {}
  at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                        double eps, const sa::BatchLayout& layout) override {
    if (!g_split.active) return inner_->group_norm(x, groups, weight, bias, eps, layout);
    TimedSection section(g_split.norm_hook);
    return inner_->group_norm(x, groups, weight, bias, eps, layout);
  }

 private:
  std::shared_ptr<sa::NormHook> inner_;
};

enum class OpClass { convolution, linear, normalisation, other };

OpClass classify(const std::string& op) {
  static const char* const conv[] = {"aten::conv2d", "aten::convolution", "aten::_convolution",
                                     "aten::mkldnn_convolution", "stylealigned::conv2d", "aten::slow_conv2d_forward",
                                     "aten::_slow_conv2d_forward", "aten::cudnn_convolution"};
  // stylealigned::geglu is the feed-forward's projection with its gelu and multiply fused in as oneDNN post-ops.
  static const char* const linear[] = {"aten::linear", "stylealigned::linear", "stylealigned::geglu", "aten::addmm",
                                       "aten::mm",     "aten::matmul",         "aten::bmm",           "aten::baddbmm"};
  static const char* const norm[] = {"aten::group_norm", "aten::native_group_norm", "aten::layer_norm",
                                     "aten::native_layer_norm"};
  for (const char* n : conv)
    if (op == n) return OpClass::convolution;
  for (const char* n : linear)
    if (op == n) return OpClass::linear;
  for (const char* n : norm)
    if (op == n) return OpClass::normalisation;
  return OpClass::other;
}

// ---- Options ------------------------------------------------------------------------------------------------------

struct Options {
  std::string model;
  std::string config;
  int64_t batch = 8;
  int64_t width = 0;
  int64_t height = 0;
  int threads = 0;
  int reps = 3;
  int warmup = 1;
  std::string dtype = "fp32";
  std::string device = "cpu";
  bool no_style_align = false;
  bool no_split = false;
  bool count_only = false;
  bool compare_vanilla = false;
  int64_t text_tokens = 77;
  double timestep = 500.0;
  uint64_t seed = 0;
  std::string save_output;
  std::string conv_packing;  // empty: the process default (STYLEALIGNED_CONV_PACK, else auto)
};

UNetConfig config_for(const Options& o) {
  if (!o.model.empty()) return UNetConfig::from_file(component_folder(o.model, "unet") / "config.json");
  if (o.config == "sd15") return UNetConfig::stable_diffusion_v1_5();
  if (o.config == "sdxl") return UNetConfig::stable_diffusion_xl_base();
  return UNetConfig::from_file(o.config);
}

// One forward with the per-op bookkeeping on; returns the split of its wall time.
template <class Forward>
Json split_pass(Forward&& forward, const FlopCount& flops, double gemm_rate) {
  g_split = SplitState{true, g_split.cuda};
  const at::CallbackHandle handle =
      at::addGlobalCallback(at::RecordFunctionCallback(&on_op_start, &on_op_end).scopes({at::RecordScope::FUNCTION}));
  const auto t0 = Clock::now();
  forward();
  const double total = seconds_since(t0);
  at::removeCallback(handle);
  g_split.active = false;
  if (tl_depth != 0) sa::warn(fmt::format("split pass: unbalanced op callbacks (depth {})", tl_depth));

  double by_class[4] = {0.0, 0.0, 0.0, 0.0};
  std::vector<std::pair<double, std::string>> rest_ops;
  double in_ops = 0.0;
  for (const auto& [op, s] : g_split.ops) {
    const OpClass k = classify(op);
    by_class[static_cast<int>(k)] += s;
    in_ops += s;
    if (k == OpClass::other) rest_ops.emplace_back(s, op);
  }
  std::sort(rest_ops.rbegin(), rest_ops.rend());
  const double attention = g_split.attention_self + g_split.attention_cross;
  const double norm = by_class[static_cast<int>(OpClass::normalisation)] + g_split.norm_hook;
  const double conv = by_class[static_cast<int>(OpClass::convolution)];
  const double lin = by_class[static_cast<int>(OpClass::linear)];
  const double rest = total - attention - norm - conv - lin;
  auto rate = [](double flop, double s) { return s > 0 ? flop / s / 1e9 : 0.0; };
  const double conv_rate = rate(flops.flops(FlopCount::Op::conv), conv);
  const double lin_rate = rate(flops.flops(FlopCount::Op::linear), lin);
  const double attn_rate = rate(flops.flops(FlopCount::Op::attention), attention);

  Json split;
  split["seconds"] = total;
  split["convolution"] = conv;
  split["linear"] = lin;
  split["attention_core"] = attention;
  split["normalisation"] = norm;
  split["rest"] = rest;
  split["attention_self"] = g_split.attention_self;
  split["attention_cross"] = g_split.attention_cross;
  split["fraction"] = {{"convolution", conv / total},
                       {"linear", lin / total},
                       {"attention_core", attention / total},
                       {"normalisation", norm / total},
                       {"rest", rest / total}};
  split["gflops"] = {{"convolution", conv_rate}, {"linear", lin_rate}, {"attention_core", attn_rate}};
  split["efficiency"] = {{"convolution", conv_rate / gemm_rate},
                         {"linear", lin_rate / gemm_rate},
                         {"attention_core", attn_rate / gemm_rate}};
  Json top = Json::array();
  for (size_t i = 0; i < rest_ops.size() && i < 8; ++i) {
    top.push_back({{"op", rest_ops[i].second},
                   {"seconds", rest_ops[i].first},
                   {"calls", g_split.op_calls[rest_ops[i].second]}});
  }
  split["rest_top_ops"] = top;
  split["rest_outside_ops"] = total - attention - g_split.norm_hook - in_ops;
  split["method"] =
      "separate pass: attention processors and the norm hook timed by decorators; other top-level ATen ops on the "
      "benchmark thread timed with a RecordFunction callback (thread-local depth counter); rest = wall - classified";
  return split;
}

int run(const Options& o) {
  // What to build.
  const UNetConfig config = config_for(o);
  const int64_t latent_h = o.height > 0 ? o.height / 8 : (config.sample_size > 0 ? config.sample_size : 64);
  const int64_t latent_w = o.width > 0 ? o.width / 8 : (config.sample_size > 0 ? config.sample_size : 64);
  if (o.batch <= 0) throw sa::Error(fmt::format("--batch must be positive, got {}", o.batch));
  if ((o.width > 0 && o.width % 8 != 0) || (o.height > 0 && o.height % 8 != 0)) {
    throw sa::Error(fmt::format("--width/--height must be multiples of 8, got {}x{}", o.width, o.height));
  }
  const bool style_align = !o.no_style_align;
  if (style_align && o.batch % 2 != 0) {
    throw sa::Error(fmt::format("--batch {}: StyleAligned runs a CFG batch ([uncond n ; cond n]), so it must be even "
                                "(or pass --no-style-align)",
                                o.batch));
  }
  const sa::BatchLayout layout =
      o.batch % 2 == 0 ? sa::BatchLayout::cfg(o.batch / 2) : sa::BatchLayout::independent(o.batch);
  const sa::StyleAlignedOptions style_options = sa::StyleAlignedOptions::sdxl_demo();
  const FlopCount flops(config, o.batch, latent_h, latent_w, o.text_tokens,
                        StyleSharing{style_align, style_options, &layout});
  const FlopCount flops_vanilla(config, o.batch, latent_h, latent_w, o.text_tokens, StyleSharing{});
  if (o.compare_vanilla && !style_align) throw sa::Error("--compare-vanilla needs StyleAligned on (drop --no-style-align)");

  const std::string source = !o.model.empty() ? component_folder(o.model, "unet").string() : o.config;
  Json head;
  head["model"] = source;
  head["weights"] = o.model.empty() ? "random (from_config: PyTorch default init)" : "checkpoint";
  head["batch"] = o.batch;
  head["width"] = latent_w * 8;
  head["height"] = latent_h * 8;
  head["latent"] = {latent_h, latent_w};
  head["text_tokens"] = o.text_tokens;
  head["style_aligned"] = style_align;
  if (style_align) head["style_options"] = style_options.to_string();
  head["layout"] = layout.to_string();
  head["gflop_per_forward"] = flops.total_flops() / 1e9;
  head["flop_method"] =
      "analytic walk over the configured UNet (diffusers layout): MACs of every conv, linear and both attention "
      "matmuls (q.k^T and p.v, incl. StyleAligned's reference block on shared self-attention layers for target "
      "rows); norms, activations, softmax and AdaIN not counted; 1 MAC = 2 FLOP";
  head["gflop_split"] = {{"convolution", flops.flops(FlopCount::Op::conv) / 1e9},
                         {"linear", flops.flops(FlopCount::Op::linear) / 1e9},
                         {"attention_core", flops.flops(FlopCount::Op::attention) / 1e9}};
  head["gmac_buckets"] = flops.buckets_gmac();
  head["style_aligned_extra_gflop"] = flops.style_aligned_extra_flops() / 1e9;
  head["shared_self_attention_layers"] = flops.shared_self_attention_layers();
  head["params_analytic"] = flops.params();
  if (o.count_only) {
    head["summary"] = true;
    print(head);
    return 0;
  }

  // Device, dtype, threads.
  const at::Device device = o.device == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  if (o.device != "cpu" && o.device != "cuda") throw sa::Error(fmt::format("--device: expected cpu or cuda, got '{}'", o.device));
  if (device.is_cuda() && !at::hasCUDA()) {
    throw sa::Error("--device cuda: this libtorch has no CUDA support or no GPU is visible");
  }
  at::ScalarType dtype = parse_dtype(o.dtype);
  if (!device.is_cuda() && dtype == at::kBFloat16 && !sa::cpu_has_native_bf16()) {
    sa::warn("--dtype bf16: this CPU has no native bf16 (AVX-512 BF16 / AMX); running fp32 instead");
    dtype = at::kFloat;
  }
  if (!device.is_cuda() && dtype == at::kHalf) {
    sa::warn("--dtype fp16: libtorch has no fp16 CPU convolution kernels; running fp32 instead");
    dtype = at::kFloat;
  }
  if (!o.conv_packing.empty()) sa::configure_conv_weight_packing(sa::parse_conv_weight_packing(o.conv_packing));
  const int threads = sa::configure_threads(o.threads);
  const bool large_pages = sa::configure_large_tensor_pages();
  g_split.cuda = device.is_cuda();
  tl_benchmark_thread = true;
  at::manual_seed(o.seed);

  head["dtype"] = dtype_name(dtype);
  head["dtype_requested"] = o.dtype;
  head["device"] = device.str();
  head["threads"] = threads;
  head["large_tensor_pages"] = large_pages;
  head["conv_packing"] = sa::to_string(sa::conv_weight_packing());
  head["cpu"] = sa::cpu_model_name();
  head["native_bf16"] = sa::cpu_has_native_bf16();
  head["loadavg_start"] = loadavg();
  const double rss_start = status_mb("VmRSS");

  std::vector<double> gemm;
  gemm.push_back(gemm_gflops(at::kFloat, device));

  // Model. Random weights: from_config's default init (one fp32 copy), then converted tensor by tensor. Seeded
  // here, after the GEMM yardstick drew its operands (from the CPU generator on a CPU run only), so every device
  // and dtype gets the same weights and inputs and --save-output files compare.
  at::manual_seed(o.seed);
  auto t_build = Clock::now();
  sa::models::UNet2DConditionModel unet{nullptr};
  if (!o.model.empty()) {
    sa::models::LoadOptions load;
    load.dtype = dtype;
    load.device = device;
    unet = sa::models::UNet2DConditionModel::from_pretrained(component_folder(o.model, "unet"), load);
  } else {
    unet = sa::models::UNet2DConditionModel::from_config(config);
    if (dtype != at::kFloat || device != at::Device(at::kCPU)) unet->to(device, dtype);
  }
  unet->eval();
  const double build_seconds = seconds_since(t_build);
  double params = 0.0, weight_bytes = 0.0;
  for (const auto& p : unet->parameters()) {
    params += static_cast<double>(p.numel());
    weight_bytes += static_cast<double>(p.numel()) * static_cast<double>(p.element_size());
  }

  // The processors of one mode (StyleAligned or vanilla), each wrapped by the split pass's timer.
  auto configure = [&](bool with_style) {
    sa::ProcessorMap& processors = unet->processors();
    processors.reset();
    std::shared_ptr<sa::NormHook> hook;
    if (with_style) hook = sa::install_style_aligned(processors, style_options);
    for (const auto& layer : processors.layers()) {
      processors.set(layer, std::make_shared<TimedProcessor>(processors.get(layer)));
    }
    unet->set_norm_hook(hook ? std::make_shared<TimedNormHook>(hook) : nullptr);
  };

  // Inputs.
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  const at::Tensor sample = at::randn({o.batch, config.in_channels, latent_h, latent_w}).to(opts);
  const at::Tensor timestep = at::full({}, o.timestep, at::TensorOptions().dtype(at::kFloat).device(device));
  const at::Tensor context = at::randn({o.batch, o.text_tokens, config.cross_attention_dim[0]}).to(opts);
  sa::models::UNetForwardOptions forward_options;
  forward_options.layout = &layout;
  if (config.addition_embed_type == "text_time") {
    const int64_t pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim;
    forward_options.text_embeds = at::randn({o.batch, pooled}).to(opts);
    const auto h = static_cast<double>(latent_h * 8), w = static_cast<double>(latent_w * 8);
    forward_options.time_ids =
        at::tensor({h, w, 0.0, 0.0, h, w}, at::dtype(at::kFloat)).to(opts).unsqueeze(0).expand({o.batch, 6});
  }

  c10::InferenceMode inference;
  const bool peak_reset = reset_peak_rss();
  const double rss_before_forward = status_mb("VmRSS");
  bool finite = true;
  at::Tensor last_output;
  auto forward = [&] {
    at::Tensor out = unet->forward(sample, timestep, context, forward_options);
    if (!o.save_output.empty()) last_output = out;
    // Reading a value also synchronises an asynchronous device.
    finite = finite && at::isfinite(out).all().item<bool>();
  };

  head["params"] = params;
  head["weights_mb"] = weight_bytes / (1024.0 * 1024.0);
  head["build_seconds"] = build_seconds;
  if (o.compare_vanilla) head["compare_vanilla"] = true;
  head["summary"] = false;
  head["phase"] = "setup";
  print(head);

  // Modes: the requested one, and with --compare-vanilla the vanilla one interleaved (order alternating per rep), so
  // their ratio sees the same machine load.
  struct Mode {
    bool style;
    const FlopCount* flops;
    std::vector<double> times, cpu_times, system_times, faults;
    Json split;
  };
  std::vector<Mode> modes{{style_align, &flops, {}, {}, {}, {}, Json()}};
  if (o.compare_vanilla) modes.push_back({false, &flops_vanilla, {}, {}, {}, {}, Json()});
  auto mode_name = [](const Mode& m) { return m.style ? "style_aligned" : "vanilla"; };

  for (int i = 0; i < o.warmup; ++i) {
    for (auto& m : modes) {
      configure(m.style);
      const auto t0 = Clock::now();
      forward();
      print(Json{{"phase", "warmup"}, {"mode", mode_name(m)}, {"rep", i}, {"seconds", seconds_since(t0)},
                 {"loadavg", loadavg()}});
    }
  }
  std::vector<double> pair_ratios;
  for (int i = 0; i < o.reps; ++i) {
    std::vector<size_t> order(modes.size());
    for (size_t k = 0; k < order.size(); ++k) order[k] = i % 2 == 0 ? k : order.size() - 1 - k;
    for (size_t k : order) {
      Mode& m = modes[k];
      configure(m.style);
      const Usage u0 = Usage::now();
      const auto t0 = Clock::now();
      forward();
      const double s = seconds_since(t0);
      const Usage u = Usage::now() - u0;
      m.times.push_back(s);
      m.cpu_times.push_back(u.user + u.system);
      m.system_times.push_back(u.system);
      m.faults.push_back(u.minor_faults);
      print(Json{{"phase", "timed"},
                 {"mode", mode_name(m)},
                 {"rep", i},
                 {"seconds", s},
                 {"gflops", m.flops->total_flops() / s / 1e9},
                 {"cpu_seconds", u.user + u.system},
                 {"system_seconds", u.system},
                 {"minor_faults", u.minor_faults},
                 {"peak_rss_mb", peak_rss_mb()},
                 {"loadavg", loadavg()}});
    }
    if (modes.size() == 2) pair_ratios.push_back(modes[0].times.back() / modes[1].times.back());
  }

  if (!o.no_split) {
    for (auto& m : modes) {
      configure(m.style);
      m.split = split_pass(forward, *m.flops, gemm.front());
      print(Json{{"phase", "split"}, {"mode", mode_name(m)}, {"seconds", m.split["seconds"]}, {"loadavg", loadavg()}});
    }
  }

  gemm.push_back(gemm_gflops(at::kFloat, device));
  const double gemm_rate = median(gemm);
  auto mode_summary = [&](const Mode& m, Json& j) {
    const double med = median(m.times);
    j["seconds"] = med;
    j["seconds_min"] = m.times.empty() ? 0.0 : *std::min_element(m.times.begin(), m.times.end());
    j["seconds_all"] = m.times;
    j["cpu_seconds"] = median(m.cpu_times);
    j["system_seconds"] = median(m.system_times);
    j["minor_faults"] = median(m.faults);
    j["gflops"] = med > 0 ? m.flops->total_flops() / med / 1e9 : 0.0;
    j["gemm_gflops"] = gemm_rate;
    j["efficiency"] = gemm_rate > 0 && med > 0 ? m.flops->total_flops() / med / 1e9 / gemm_rate : 0.0;
    if (!m.split.is_null()) j["split"] = m.split;
  };

  Json summary = head;
  summary["summary"] = true;
  summary.erase("phase");
  summary["reps"] = o.reps;
  mode_summary(modes[0], summary);
  summary["gemm_gflops_runs"] = gemm;
  summary["gemm_method"] = "fp32 at::mm 2048x2048x2048, median of 5 after one warm-up, before and after the forwards";
  if (device.is_cpu()) {
    const double onednn_rate = onednn_gemm_gflops();
    summary["gemm_onednn_gflops"] = onednn_rate;
    if (onednn_rate > 0 && median(modes[0].times) > 0) {
      summary["efficiency_vs_onednn"] = modes[0].flops->total_flops() / median(modes[0].times) / 1e9 / onednn_rate;
    }
  }
  if (dtype != at::kFloat) summary["gemm_gflops_dtype"] = gemm_gflops(dtype, device);
  if (modes.size() == 2) {
    Json vanilla;
    vanilla["gflop_per_forward"] = flops_vanilla.total_flops() / 1e9;
    mode_summary(modes[1], vanilla);
    summary["vanilla"] = vanilla;
    summary["ratio_vs_vanilla"] = median(modes[0].times) / median(modes[1].times);
    summary["ratio_vs_vanilla_pairs"] = pair_ratios;
    summary["ratio_vs_vanilla_cpu"] = median(modes[0].cpu_times) / median(modes[1].cpu_times);
    summary["ratio_flops_vs_vanilla"] = flops.total_flops() / flops_vanilla.total_flops();
  }
  summary["peak_rss_mb"] = peak_rss_mb();
  summary["rss_start_mb"] = rss_start;
  summary["rss_before_forward_mb"] = rss_before_forward;
  if (peak_reset) summary["forward_peak_rss_mb"] = status_mb("VmHWM");
  summary["output_finite"] = finite;
  if (!o.save_output.empty() && last_output.defined()) {
    // Same seed, same weights and inputs on every device and dtype: outputs compare across runs (CPU vs CUDA).
    sa::io::save_safetensors(o.save_output, {{"output", last_output.to(at::kCPU, at::kFloat).contiguous()}},
                             {{"device", device.str()}, {"dtype", dtype_name(dtype)}});
    summary["saved_output"] = o.save_output;
  }
  summary["loadavg_end"] = loadavg();
  print(summary);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Times UNet forwards (StyleAligned or vanilla) and splits the time by operator class"};
  Options o;
  auto* source = app.add_option_group("model", "What to run: exactly one of --model, --config");
  source->add_option("--model", o.model, "A diffusers folder or its unet/ subfolder");
  source->add_option("--config", o.config,
                     "A unet/config.json (random weights), or sd15 / sdxl for the built-in real architectures");
  source->require_option(1);
  app.add_option("--batch", o.batch, "CFG batch: 2 x images (8 = 4 images with guidance)")->capture_default_str();
  app.add_option("--width", o.width, "Image width in pixels (latent = /8); default: the config's sample_size x 8");
  app.add_option("--height", o.height, "Image height in pixels (latent = /8)");
  app.add_option("--threads", o.threads, "Intra-op threads (0: all cores available)")->capture_default_str();
  app.add_option("--reps", o.reps, "Timed forwards")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--warmup", o.warmup, "Untimed forwards first")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--dtype", o.dtype, "fp32, bf16 or fp16")->capture_default_str()->check(
      CLI::IsMember({"fp32", "bf16", "fp16"}));
  app.add_option("--device", o.device, "cpu or cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_flag("--no-style-align", o.no_style_align, "Vanilla attention (default: StyleAligned, SDXL demo options)");
  app.add_option("--conv-packing", o.conv_packing,
                 "auto, always or never: convolution weights reordered once for oneDNN's blocked kernels "
                 "(default auto: bf16 only; costs a second copy of the conv weights)")
      ->check(CLI::IsMember({"auto", "always", "never"}));
  app.add_flag("--no-split", o.no_split, "Skip the extra forward that splits the time by operator class");
  app.add_flag("--compare-vanilla", o.compare_vanilla,
               "Also time vanilla forwards, interleaved with the StyleAligned ones on the same weights; the summary "
               "adds `vanilla` and `ratio_vs_vanilla`");
  app.add_flag("--count-only", o.count_only, "Print the analytic FLOP and parameter count and exit");
  app.add_option("--text-tokens", o.text_tokens, "Text tokens of the cross-attention context")->capture_default_str();
  app.add_option("--save-output", o.save_output,
                 "Write the last forward's output (fp32, safetensors tensor 'output') to compare devices and dtypes");
  app.add_option("--seed", o.seed, "Seed of the random weights and inputs")->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::cerr << "stylealigned_bench_unet: " << e.what() << "\n";
    return 1;
  }
}
