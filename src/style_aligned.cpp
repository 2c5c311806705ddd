#include "stylealigned/style_aligned.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>

#include <cmath>
#include <utility>

#include "internal/attention_kernel.h"
#include "internal/style_aligned_concat.h"
#include "stylealigned/error.h"
#include "stylealigned/runtime.h"

namespace stylealigned {
namespace {

bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

at::Tensor reference_index(const BatchLayout& layout, const at::Device& device) {
  const auto& refs = layout.reference_of_row();
  return at::tensor(at::ArrayRef<int64_t>(refs.data(), refs.size()), at::dtype(at::kLong)).to(device);
}

// AdaIN of `x` (rows of one group) to the given reference statistics: ((x - mean) / std) · ref_std + ref_mean,
// taken as x · a + b with a = ref_std / std and b = ref_mean - mean · a per (row, head, channel), one pass over x
// instead of four (and one tensor instead of a temporary plus in-place passes). It differs from the official
// operation order by float rounding only (a few ulps per element), far inside the parity tolerances.
at::Tensor adain_to(const at::Tensor& x, const at::Tensor& ref_mean, const at::Tensor& ref_std) {
  auto [mean, std] = calc_mean_std(x);
  const at::Tensor a = ref_std / std;
  return at::addcmul(ref_mean - mean * a, x, a);
}


}  // namespace

namespace detail {

// StyleAligned self-attention with the reference keys concatenated to each target's own. The row-by-row two-block
// merge of attend() is built for the CPU's cache-sized kernels; on a GPU it runs the attention as fp32 ATen pieces,
// 21x the time of a vanilla forward (SDXL, 1024x1024, 4 images + CFG, fp16, H100). Here all targets of a group are
// one call of scaled_dot_product_attention over [own keys ; λ · reference keys], which libtorch 2.x fuses on CUDA
// (flash / memory-efficient): 1.6x vanilla there. The reference k/v are copied once per target (targets x tokens x
// dim), small beside the score rows the fused kernel never writes. A shift of the reference logits has no such
// form, so it is not accepted here.
at::Tensor attend_concatenated(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionCall& call,
                               const StyleAlignedOptions& o, const AttentionOptions& attention) {
  if (!o.share_attention || o.full_attention_share || o.shared_score_shift != 0.0) {
    throw Error("attend_concatenated: needs share_attention, no full_attention_share and no shared_score_shift");
  }
  at::Tensor out = detail::token_major_output(q.size(0), q.size(1), q.size(2), v.size(3), q.options());
  // Statistics in fp32: an fp16 variance over thousands of tokens loses the digits AdaIN scales by.
  auto adain_rows = [](const at::Tensor& x, const at::Tensor& ref) {
    auto [mean, std] = calc_mean_std(ref.to(at::kFloat));
    return adain_to(x.to(at::kFloat), mean, std).to(x.scalar_type());
  };
  for (const CfgGroup& g : call.layout.groups()) {
    const int64_t r = g.reference;
    const at::Tensor qr = q.narrow(0, r, 1), kr = k.narrow(0, r, 1), vr = v.narrow(0, r, 1);
    out.narrow(0, r, 1).copy_(scaled_dot_product_attention(qr, kr, vr, call.scale, attention, call.upcast));
    std::vector<int64_t> rows;
    for (int64_t t = g.begin; t < g.end; ++t) {
      if (t != r) rows.push_back(t);
    }
    if (rows.empty()) continue;
    const auto n = static_cast<int64_t>(rows.size());
    const at::Tensor idx = at::tensor(rows, at::dtype(at::kLong)).to(q.device());
    at::Tensor qt = q.index_select(0, idx), kt = k.index_select(0, idx), vt = v.index_select(0, idx);
    if (o.adain_queries) qt = adain_rows(qt, qr);
    if (o.adain_keys) kt = adain_rows(kt, kr);
    if (o.adain_values) vt = adain_rows(vt, vr);
    const at::Tensor k_ref = o.shared_score_scale == 1.0 ? kr : kr * o.shared_score_scale;
    const at::Tensor keys = at::cat({kt, k_ref.expand({n, -1, -1, -1})}, 2);
    const at::Tensor values = at::cat({vt, vr.expand({n, -1, -1, -1})}, 2);
    out.index_copy_(0, idx, scaled_dot_product_attention(qt, keys, values, call.scale, attention, call.upcast));
  }
  return out;
}

}  // namespace detail

// ---- Options ---------------------------------------------------------------------------------------------------

StyleAlignedOptions StyleAlignedOptions::sdxl_demo() {
  StyleAlignedOptions o;
  o.share_group_norm = false;
  o.share_layer_norm = false;
  return o;
}

StyleAlignedOptions StyleAlignedOptions::transfer_notebook() {
  StyleAlignedOptions o;
  o.share_group_norm = true;
  o.share_layer_norm = true;
  o.shared_score_shift = std::log(2.0);
  o.shared_score_scale = 1.0;
  return o;
}

namespace {

// Every field by name, for set() and assign(): one table, so a new field is named once.
struct FlagField {
  const char* name;
  bool StyleAlignedOptions::*member;
};
struct NumberField {
  const char* name;
  double StyleAlignedOptions::*member;
};
constexpr FlagField kFlagFields[] = {{"share_group_norm", &StyleAlignedOptions::share_group_norm},
                                     {"share_layer_norm", &StyleAlignedOptions::share_layer_norm},
                                     {"share_attention", &StyleAlignedOptions::share_attention},
                                     {"adain_queries", &StyleAlignedOptions::adain_queries},
                                     {"adain_keys", &StyleAlignedOptions::adain_keys},
                                     {"adain_values", &StyleAlignedOptions::adain_values},
                                     {"full_attention_share", &StyleAlignedOptions::full_attention_share}};
constexpr NumberField kNumberFields[] = {{"shared_score_scale", &StyleAlignedOptions::shared_score_scale},
                                         {"shared_score_shift", &StyleAlignedOptions::shared_score_shift},
                                         {"only_self_level", &StyleAlignedOptions::only_self_level}};

// Calls on_flag(member) or on_number(member) for the field named `field`; throws naming it when there is none.
template <class OnFlag, class OnNumber>
void with_field(const std::string& field, OnFlag on_flag, OnNumber on_number) {
  for (const auto& f : kFlagFields) {
    if (field == f.name) return on_flag(f.member);
  }
  for (const auto& n : kNumberFields) {
    if (field == n.name) return on_number(n.member);
  }
  throw Error(fmt::format("StyleAlignedOptions: unknown option '{}' (the fields are those of to_string())", field));
}

}  // namespace

void StyleAlignedOptions::set(const std::string& field, const std::string& value) {
  const auto parse_flag = [&](bool StyleAlignedOptions::*member) {
    if (value == "true" || value == "1") {
      this->*member = true;
    } else if (value == "false" || value == "0") {
      this->*member = false;
    } else {
      throw Error(fmt::format("StyleAlignedOptions: {} takes true/false/1/0, got '{}'", field, value));
    }
  };
  const auto parse_number = [&](double StyleAlignedOptions::*member) {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(value, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != value.size()) {
      throw Error(fmt::format("StyleAlignedOptions: {} takes a number, got '{}'", field, value));
    }
    this->*member = v;
  };
  with_field(field, parse_flag, parse_number);
}

void StyleAlignedOptions::assign(const StyleAlignedOptions& from, const std::vector<std::string>& fields) {
  for (const std::string& field : fields) {
    with_field(
        field, [&](bool StyleAlignedOptions::*member) { this->*member = from.*member; },
        [&](double StyleAlignedOptions::*member) { this->*member = from.*member; });
  }
}

void StyleAlignedOptions::validate() const {
  if (!std::isfinite(shared_score_scale)) {
    throw Error(fmt::format("StyleAlignedOptions: shared_score_scale must be finite, got {}", shared_score_scale));
  }
  if (!std::isfinite(shared_score_shift)) {
    throw Error(fmt::format("StyleAlignedOptions: shared_score_shift must be finite, got {}", shared_score_shift));
  }
  if (!(only_self_level >= 0.0 && only_self_level <= 1.0)) {
    throw Error(fmt::format("StyleAlignedOptions: only_self_level must lie in [0, 1], got {}", only_self_level));
  }
}

std::vector<StyleAlignedOptions::Field> StyleAlignedOptions::fields() const {
  std::vector<Field> out;
  for (const auto& f : kFlagFields) out.push_back({f.name, this->*f.member});
  for (const auto& n : kNumberFields) out.push_back({n.name, this->*n.member});
  return out;
}

std::string StyleAlignedOptions::to_string() const {
  std::string out;
  for (const Field& f : fields()) {
    if (!out.empty()) out += ' ';
    out += f.name + '=';
    out += std::visit([](auto value) { return fmt::format("{}", value); }, f.value);
  }
  return out;
}

// ---- Tensor helpers --------------------------------------------------------------------------------------------

std::pair<at::Tensor, at::Tensor> calc_mean_std(const at::Tensor& feat, double eps) {
  if (!feat.defined() || feat.dim() < 2) {
    throw Error("calc_mean_std: feat must have a token axis (-2) and a channel axis (-1)");
  }
  // Two passes (mean, then the squared deviations) instead of at::var_mean: libtorch 1.13's Welford reduction over
  // the token axis of token-major q/k is 6x slower (18 ms against 3 ms for 6 rows x 4096 tokens x 320 channels,
  // 2 threads), and the two-pass sum is at least as accurate (relative difference 2e-7 in the variance).
  const at::Tensor mean = feat.mean({-2}, /*keepdim=*/true);
  at::Tensor dev = feat - mean;
  dev = at::GradMode::is_enabled() ? dev.square() : dev.square_();  // in place where no backward needs dev
  at::Tensor var = dev.sum({-2}, /*keepdim=*/true).div_(static_cast<double>(feat.size(-2) - 1));
  return {mean, var.add_(eps).sqrt_()};
}

at::Tensor expand_first(const at::Tensor& feat, const BatchLayout& layout, double scale) {
  if (!feat.defined() || feat.dim() < 1) throw Error("expand_first: feat must have a batch axis");
  layout.check_batch(feat.size(0), "expand_first");
  at::Tensor out = feat.index_select(0, reference_index(layout, feat.device()));
  if (scale != 1.0) {
    std::vector<double> factor(static_cast<size_t>(layout.batch_size()), scale);
    for (const auto& g : layout.groups()) factor[static_cast<size_t>(g.reference)] = 1.0;
    std::vector<int64_t> shape(static_cast<size_t>(feat.dim()), 1);
    shape[0] = layout.batch_size();
    out.mul_(at::tensor(factor, at::dtype(at::kDouble)).to(out.options()).view(shape));
  }
  return out;
}

at::Tensor concat_first(const at::Tensor& feat, int64_t dim, const BatchLayout& layout, double scale) {
  return at::cat({feat, expand_first(feat, layout, scale)}, dim);
}

at::Tensor adain(const at::Tensor& feat, const BatchLayout& layout) {
  if (!feat.defined() || feat.dim() < 3) throw Error("adain: feat must be [batch, ..., tokens, dim]");
  layout.check_batch(feat.size(0), "adain");
  auto [mean, std] = calc_mean_std(feat);
  const at::Tensor idx = reference_index(layout, feat.device());
  at::Tensor out = (feat - mean).div_(std).mul_(std.index_select(0, idx)).add_(mean.index_select(0, idx));
  for (const auto& g : layout.groups()) out[g.reference].copy_(feat[g.reference]);
  return out;
}

std::vector<bool> only_self_level_switch(int64_t self_layers, double level) {
  if (self_layers < 0) throw Error(fmt::format("only_self_level_switch: negative layer count {}", self_layers));
  if (!(level >= 0.0 && level <= 1.0)) {
    throw Error(fmt::format("only_self_level must lie in [0, 1], got {}", level));
  }
  const auto n = static_cast<size_t>(self_layers);
  if (level == 0.0) return std::vector<bool>(n, false);
  if (level == 1.0) return std::vector<bool>(n, true);
  // Same double arithmetic as the Python original, so float rounding lands on the same layers.
  const bool flip = level > 0.5;
  const double folded = flip ? 1.0 - level : level;
  const auto switched = static_cast<int64_t>(folded * static_cast<double>(self_layers));
  if (switched == 0) {
    throw Error(fmt::format(
        "only_self_level {} with {} self-attention layers selects no layer pattern (int({} * {}) = 0; the official "
        "_get_switch_vec divides by zero here): use 0, 1, or a level in [{:.4g}, {:.4g}]",
        level, self_layers, folded, self_layers, 1.0 / static_cast<double>(std::max<int64_t>(self_layers, 1)),
        1.0 - 1.0 / static_cast<double>(std::max<int64_t>(self_layers, 1))));
  }
  const int64_t period = self_layers / switched;
  std::vector<bool> out(n);
  for (int64_t i = 0; i < self_layers; ++i) out[static_cast<size_t>(i)] = ((i % period) == 0) != flip;
  return out;
}

// ---- Processor ---------------------------------------------------------------------------------------------------

StyleAlignedProcessor::StyleAlignedProcessor(StyleAlignedOptions options, AttentionOptions attention)
    : options_(options), attention_(attention) {
  options_.validate();
}

at::Tensor StyleAlignedProcessor::attend(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                         const AttentionCall& call) {
  if (call.kind == AttentionKind::cross_attention) {
    return scaled_dot_product_attention(q_in, k_in, v_in, call.scale, attention_, call.upcast);
  }
  const std::string what = fmt::format("StyleAlignedProcessor (layer '{}')", call.layer);
  detail::check_attention_inputs(q_in, k_in, v_in, what, /*allow_kv_broadcast=*/false);
  if (k_in.size(2) != q_in.size(2)) {
    throw Error(fmt::format("{}: self-attention needs as many key tokens as query tokens; got {} and {}", what,
                            k_in.size(2), q_in.size(2)));
  }
  const BatchLayout& layout = call.layout;
  layout.check_batch(q_in.size(0), what);
  if (!layout.has_targets()) return scaled_dot_product_attention(q_in, k_in, v_in, call.scale, attention_, call.upcast);

  const StyleAlignedOptions& o = options_;
  // Off the CPU, libtorch's fused attention over concatenated keys beats the two-block merge below (see
  // detail::attend_concatenated); a reference-logit shift keeps the merge, which is exact for it.
  if (!q_in.device().is_cpu() && o.share_attention && !o.full_attention_share && o.shared_score_shift == 0.0 &&
      (q_in.size(2) >= 2 || !(o.adain_queries || o.adain_keys || o.adain_values))) {
    at::NoGradGuard no_grad;
    return detail::attend_concatenated(q_in, k_in, v_in, call, o, attention_);
  }
  const bool any_adain = !o.full_attention_share && (o.adain_queries || o.adain_keys || o.adain_values);
  if (any_adain && q_in.size(2) < 2) {
    throw Error(fmt::format("{}: AdaIN needs at least 2 tokens (unbiased variance over tokens); got {}", what,
                            q_in.size(2)));
  }

  // The result is assembled in [batch, tokens, heads, dim] memory, like the default kernel's, so callers merge heads
  // with a view.
  const at::ScalarType out_dtype = q_in.scalar_type();
  const int64_t heads = q_in.size(1), tokens = q_in.size(2), dv = v_in.size(3);
  at::Tensor out = detail::token_major_output(q_in.size(0), heads, tokens, dv, q_in.options());

  at::NoGradGuard no_grad;  // inference only: the kernels below use out= and in-place passes
  // Reduced-precision inputs compute in fp32, converted per slice: the reference row (its statistics and, off the
  // bf16 path, its plain attention) and only the target rows AdaIN rewrites, never whole fp32 copies of q, k and v.
  const bool compute_float = is_reduced_float(out_dtype);
  auto fp32 = [compute_float](const at::Tensor& x) { return compute_float ? x.to(at::kFloat) : x; };
  // On native-bf16 CPUs the attention products take bf16 (AdaIN statistics and normalisation stay fp32, rounded
  // once for the product); elsewhere everything runs in fp32.
  const bool bf16_products = out_dtype == at::kBFloat16 && q_in.is_cpu() && cpu_has_native_bf16();
  // The form the attention products read: bf16 originals on the bf16 path, else fp32.
  auto product = [&](const at::Tensor& x) { return bf16_products ? x.to(at::kBFloat16) : fp32(x); };

  for (const CfgGroup& g : layout.groups()) {
    if (o.full_attention_share) {
      // Every row of the group attends to all tokens of all rows of the group: one sequence of size x tokens.
      const int64_t n = g.size();
      auto as_sequence = [&](const at::Tensor& t) {
        return fp32(t.narrow(0, g.begin, n)).transpose(0, 1).reshape({1, heads, n * tokens, t.size(3)});
      };
      at::Tensor seq = scaled_dot_product_attention(as_sequence(q_in), as_sequence(k_in), as_sequence(v_in),
                                                    call.scale, attention_, call.upcast);
      out.narrow(0, g.begin, n).copy_(seq.reshape({heads, n, tokens, dv}).transpose(0, 1));
      continue;
    }

    const int64_t r = g.reference;
    const at::Tensor qr_in = q_in.narrow(0, r, 1), kr_in = k_in.narrow(0, r, 1), vr_in = v_in.narrow(0, r, 1);
    // The reference attends to [own ; own] upstream, which is exactly its plain self-attention.
    out.narrow(0, r, 1).copy_(scaled_dot_product_attention(product(qr_in), product(kr_in), product(vr_in), call.scale,
                                                           attention_, call.upcast));

    at::Tensor q_mean, q_std, k_mean, k_std, v_mean, v_std;
    if (o.adain_queries) std::tie(q_mean, q_std) = calc_mean_std(fp32(qr_in));
    if (o.adain_keys) std::tie(k_mean, k_std) = calc_mean_std(fp32(kr_in));
    if (o.adain_values) std::tie(v_mean, v_std) = calc_mean_std(fp32(vr_in));

    // The targets of a group are at most two runs of consecutive rows (before and after the reference); each run is
    // one kernel call, so its parallel loop covers every target's heads and query blocks and the shared reference
    // keys stay hot across the run (attention benchmark, 4096 tokens, 8 x 40: 0.88 -> 0.95 of the default's rate).
    const std::pair<int64_t, int64_t> runs[] = {{g.begin, r}, {r + 1, g.end}};
    for (const auto& [t, t_end] : runs) {
      const int64_t n = t_end - t;
      if (n <= 0) continue;
      // AdaIN'd rows are fp32; rows AdaIN leaves alone stay in the input dtype until a product needs them.
      auto target = [&](const at::Tensor& x, bool normalise, const at::Tensor& mean, const at::Tensor& std) {
        const at::Tensor rows = x.narrow(0, t, n);
        return normalise ? adain_to(fp32(rows), mean, std) : rows;
      };
      const at::Tensor qt = target(q_in, o.adain_queries, q_mean, q_std);
      const at::Tensor kt = target(k_in, o.adain_keys, k_mean, k_std);
      const at::Tensor vt = target(v_in, o.adain_values, v_mean, v_std);
      if (o.share_attention && bf16_products) {
        // AdaIN'd rows rounded once to bf16; the others are the bf16 originals (no round trip).
        at::Tensor row = detail::token_major_output(n, heads, tokens, dv, q_in.options().dtype(at::kFloat));
        if (detail::attention_over_own_and_reference_cpu(product(qt), product(kt), product(vt), kr_in, vr_in, call.scale,
                                                         o.shared_score_scale, o.shared_score_shift, attention_,
                                                         row)) {
          out.narrow(0, t, n).copy_(row);
          continue;
        }
      }
      if (o.share_attention) {
        const at::Tensor qf = fp32(qt), kf = fp32(kt), vf = fp32(vt), kr = fp32(kr_in), vr = fp32(vr_in);
        if (detail::attention_over_own_and_reference_cpu(qf, kf, vf, kr, vr, call.scale, o.shared_score_scale,
                                                         o.shared_score_shift, attention_, out.narrow(0, t, n))) {
          continue;  // written in place: one softmax over [own ; reference] keys
        }
        // Own block, and the reference block with λ folded into the logit scale and the shift added to every
        // reference logit; the reference's k/v are views of its row, never copied.
        const AttentionWithLse own = attention_with_lse(qf, kf, vf, call.scale, 0.0, attention_);
        const AttentionWithLse shared =
            attention_with_lse(qf, kr, vr, call.scale * o.shared_score_scale, o.shared_score_shift, attention_);
        out.narrow(0, t, n).copy_(merge_attention(own, shared));
      } else {
        out.narrow(0, t, n).copy_(scaled_dot_product_attention(product(qt), product(kt), product(vt), call.scale,
                                                               attention_, call.upcast));
      }
    }
  }
  return out;
}

// ---- Shared GroupNorm ----------------------------------------------------------------------------------------------

at::Tensor SharedGroupNorm::group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight,
                                       const at::Tensor& bias, double eps, const BatchLayout& layout) {
  if (!x.defined() || x.dim() < 2) throw Error("SharedGroupNorm: input must be [batch, channels, ...]");
  const int64_t batch = x.size(0), channels = x.size(1);
  if (groups <= 0 || channels % groups != 0) {
    throw Error(fmt::format("SharedGroupNorm: {} channels do not split into {} groups", channels, groups));
  }
  if ((weight.defined() && weight.numel() != channels) || (bias.defined() && bias.numel() != channels)) {
    throw Error(fmt::format("SharedGroupNorm: weight/bias must have {} elements (one per channel)", channels));
  }
  layout.check_batch(batch, "SharedGroupNorm");
  const bool to_float = is_reduced_float(x.scalar_type());
  const at::Tensor xf = to_float ? x.to(at::kFloat) : x;

  // Biased per-(row, group) statistics, then the joint statistics of each row with its reference (equal counts):
  // mean = (m + m_ref) / 2, var = (v + v_ref) / 2 + (m - m_ref)^2 / 4. A reference row pairs with itself, which
  // gives back its own statistics exactly.
  auto [var, mean] = at::var_mean(xf.reshape({batch, groups, -1}), {-1}, /*unbiased=*/false, /*keepdim=*/false);
  const at::Tensor idx = reference_index(layout, x.device());
  const at::Tensor mean_ref = mean.index_select(0, idx), var_ref = var.index_select(0, idx);
  const at::Tensor joint_mean = (mean + mean_ref).mul_(0.5);
  const at::Tensor joint_var = (var + var_ref).mul_(0.5).add_((mean - mean_ref).square_().mul_(0.25));
  const at::Tensor rstd = joint_var.add(eps).rsqrt_();

  // y = x * a + c per (row, channel), with a = rstd * weight and c = bias - mean * a.
  const int64_t per_group = channels / groups;
  at::Tensor a = rstd.repeat_interleave(per_group, 1);  // [batch, channels]
  if (weight.defined()) a.mul_(weight.to(a.scalar_type()).view({1, channels}));
  at::Tensor c = joint_mean.repeat_interleave(per_group, 1).mul_(a).neg_();
  if (bias.defined()) c.add_(bias.to(c.scalar_type()).view({1, channels}));
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[0] = batch;
  shape[1] = channels;
  at::Tensor y = at::addcmul(c.view(shape), xf, a.view(shape));
  return to_float ? y.to(x.scalar_type()) : y;
}

// ---- Installation --------------------------------------------------------------------------------------------------

std::shared_ptr<NormHook> install_style_aligned(ProcessorMap& processors, const StyleAlignedOptions& options,
                                                AttentionOptions attention) {
  options.validate();
  const std::vector<std::string> self_layers = select_self_attention(processors.layers());
  const std::vector<bool> unshared =
      only_self_level_switch(static_cast<int64_t>(self_layers.size()), options.only_self_level);
  auto processor = std::make_shared<StyleAlignedProcessor>(options, attention);
  processors.reset();
  for (size_t i = 0; i < self_layers.size(); ++i) {
    if (!unshared[i]) processors.set(self_layers[i], processor);
  }
  if (options.share_group_norm) return std::make_shared<SharedGroupNorm>();
  return nullptr;
}

}  // namespace stylealigned
