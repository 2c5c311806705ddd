// StyleAligned: golden parity with the official sa_handler.py (tensor ops, switch vectors, 21 attention-layer cases),
// properties of the shared processor and the shared GroupNorm, and a memory bound at 4096 tokens.
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "stylealigned/attention.h"
#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "internal/style_aligned_concat.h"
#include "stylealigned/style_aligned.h"
#include "support/test_support.h"
#include "support/tracking_allocator.h"

using namespace stylealigned;

namespace {

template <class Fn>
void expect_error(Fn&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no stylealigned::Error thrown (expected one mentioning '" << needle << "')";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

// The official processor written out literally (STYLEALIGNED_SPEC 2.3-2.6) in float64: AdaIN of every row, keys
// [K ; λ·K_ref] and values [V ; V_ref] (2N of them, λ = 1 on reference rows), shift on the reference columns. It
// builds the N x 2N logits the library avoids; tests only use it on small shapes.
at::Tensor official_style_aligned(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                  const BatchLayout& layout, const StyleAlignedOptions& o, double scale) {
  auto q = q_in.to(at::kDouble), k = k_in.to(at::kDouble), v = v_in.to(at::kDouble);
  auto plain = [&](const at::Tensor& qq, const at::Tensor& kk, const at::Tensor& vv) {
    return at::matmul(at::softmax(at::matmul(qq, kk.transpose(-2, -1)) * scale, -1), vv);
  };
  if (o.full_attention_share) {
    auto out = at::empty_like(q);
    const int64_t h = q.size(1), n = q.size(2);
    for (const auto& g : layout.groups()) {
      auto seq = [&](const at::Tensor& t) {
        return t.narrow(0, g.begin, g.size()).transpose(0, 1).reshape({1, h, g.size() * n, t.size(3)});
      };
      auto r = plain(seq(q), seq(k), seq(v)).reshape({h, g.size(), n, v.size(3)}).transpose(0, 1);
      out.narrow(0, g.begin, g.size()).copy_(r);
    }
    return out;
  }
  if (o.adain_queries) q = adain(q, layout);
  if (o.adain_keys) k = adain(k, layout);
  if (o.adain_values) v = adain(v, layout);
  if (!o.share_attention) return plain(q, k, v);
  auto kk = concat_first(k, -2, layout, o.shared_score_scale);
  auto vv = concat_first(v, -2, layout);
  auto logits = at::matmul(q, kk.transpose(-2, -1)) * scale;
  logits.narrow(-1, k.size(2), k.size(2)).add_(o.shared_score_shift);
  return at::matmul(at::softmax(logits, -1), vv);
}

at::Tensor run(AttentionProcessor& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const BatchLayout& layout, double scale, AttentionKind kind = AttentionKind::self_attention) {
  AttentionCall call{"down_blocks.1.attentions.0.transformer_blocks.0.attn1", kind, layout, scale};
  return p.attend(q, k, v, call);
}

struct Qkv {
  at::Tensor q, k, v;
};
Qkv random_qkv(int64_t b, int64_t h, int64_t n, int64_t d, uint64_t seed) {
  at::manual_seed(seed);
  // Rows with different means and spreads, so AdaIN has something to do.
  auto scale = at::rand({b, 1, 1, d}) * 2 + 0.2, offset = at::randn({b, 1, 1, d});
  return {at::randn({b, h, n, d}) * scale + offset, at::randn({b, h, n, d}) * scale - offset,
          at::randn({b, h, n, d}) * scale + 0.5 * offset};
}

}  // namespace

// ---- Golden: tensor ops and switch vectors --------------------------------------------------------------------------

TEST(style_aligned_golden, tensor_ops) {
  const auto cases = sa_test::golden_cases("style_aligned_ops");
  for (const auto& c : cases) {
    auto feat = sa_test::golden_tensor(c, c["inputs"]["feat"]);
    ASSERT_EQ(feat.size(0) % 2, 0);
    const double eps = c["options"]["eps"].get<double>();
    const auto layout = BatchLayout::cfg(feat.size(0) / 2);  // upstream: references feat[0] and feat[b // 2]
    auto [mean, std] = calc_mean_std(feat, eps);
    std::map<std::string, at::Tensor> ours = {
        {"adain", adain(feat, layout)},
        {"calc_mean", mean},
        {"calc_std", std},
        {"expand_first", expand_first(feat, layout)},
        {"expand_first_scale0_5", expand_first(feat, layout, 0.5)},
        {"concat_first_dim_m2", concat_first(feat, -2, layout)},
        {"concat_first_dim_m2_scale0_5", concat_first(feat, -2, layout, 0.5)},
    };
    for (const auto& [name, ref] : c["outputs"].items()) {
      ASSERT_TRUE(ours.count(name)) << "golden output '" << name << "' has no counterpart in the test";
      auto expected = sa_test::golden_tensor(c, ref);
      const double atol = ref["suggested_atol"].get<double>();
      EXPECT_ALLCLOSE(ours.at(name), expected, atol) << name;
      std::cout << "  style_aligned_ops " << name << ": max abs diff " << sa_test::max_abs_diff(ours.at(name), expected)
                << " (atol " << atol << ")\n";
    }
    EXPECT_EQ(c["outputs"].size(), ours.size());
  }
  EXPECT_EQ(cases.size(), 1u);
}

TEST(style_aligned_golden, switch_vectors) {
  auto manifest = sa_test::read_json(sa_test::fixture("manifest.json"));
  int combos = 0;
  for (const auto& c : manifest["cases"]) {
    if (c["kind"] != "style_aligned_switch_vec") continue;
    for (const auto& combo : c["inputs"]["combos"]) {
      const int64_t total = combo[0].get<int64_t>();
      const double level = combo[1].get<double>();
      // The key spells the level as Python's str(float) does.
      std::string level_text = fmt::format("{}", level);
      if (level_text.find('.') == std::string::npos) level_text += ".0";
      const std::string key = fmt::format("N{}_level{}", total, level_text);
      ASSERT_TRUE(c["outputs"]["vectors"].contains(key)) << key;
      auto expected = c["outputs"]["vectors"][key].get<std::vector<bool>>();
      EXPECT_EQ(only_self_level_switch(total, level), expected) << key;
      ++combos;
    }
  }
  EXPECT_EQ(combos, 7);
}

TEST(style_aligned, switch_vector_table_and_errors) {
  auto count = [](const std::vector<bool>& v) { return std::count(v.begin(), v.end(), true); };
  EXPECT_EQ(count(only_self_level_switch(70, 0.1)), 7);
  EXPECT_EQ(count(only_self_level_switch(70, 0.25)), 18);
  EXPECT_EQ(count(only_self_level_switch(70, 0.5)), 35);
  EXPECT_EQ(count(only_self_level_switch(70, 0.75)), 52);
  EXPECT_EQ(count(only_self_level_switch(70, 0.9)), 63);
  EXPECT_EQ(count(only_self_level_switch(16, 0.9)), 15);
  // Upstream divides by zero here: a clear error naming the option and the layer count.
  expect_error([] { only_self_level_switch(16, 0.05); }, "only_self_level 0.05 with 16 self-attention layers");
  expect_error([] { only_self_level_switch(10, 0.95); }, "10 self-attention layers");
  expect_error([] { only_self_level_switch(10, 1.5); }, "only_self_level");
}

// ---- Golden: one diffusers Attention layer under the official processor -------------------------------------------

TEST(style_aligned_golden, attention_layer_cases) {
  auto manifest = sa_test::read_json(sa_test::fixture("attention_manifest.json"));
  int cases = 0;
  double worst_ratio = 0.0;
  for (const auto& c : manifest["cases"]) {
    const std::string id = c["id"];
    auto file = io::SafetensorsFile::open(sa_test::fixture(c["file"].get<std::string>()));
    auto in = [&](const char* name) { return file.tensor(c["inputs"][name]["key"].get<std::string>()); };
    const auto& o = c["options"];
    const int64_t heads = o["heads"], head_dim = o["head_dim"], n_images = o["n_images"];
    const double attn_scale = o["attn_scale"];
    const auto& a = o["style_aligned_args"];
    StyleAlignedOptions opts;
    opts.share_group_norm = a["share_group_norm"];
    opts.share_layer_norm = a["share_layer_norm"];
    opts.share_attention = a["share_attention"];
    opts.adain_queries = a["adain_queries"];
    opts.adain_keys = a["adain_keys"];
    opts.adain_values = a["adain_values"];
    opts.full_attention_share = a["full_attention_share"];
    opts.shared_score_scale = a["shared_score_scale"];
    opts.shared_score_shift = a["shared_score_shift"];
    opts.only_self_level = a["only_self_level"];

    // The diffusers Attention layer: y = x Wᵀ, heads are contiguous channel blocks, to_out.0 with bias.
    auto x = in("hidden_states");
    const int64_t batch = x.size(0), tokens = x.size(1);
    auto split = [&](const at::Tensor& t) { return t.view({batch, tokens, heads, head_dim}).transpose(1, 2); };
    auto q = split(at::linear(x, in("to_q.weight"))), k = split(at::linear(x, in("to_k.weight")));
    auto v = split(at::linear(x, in("to_v.weight")));
    auto layer_output = [&](const at::Tensor& heads_out) {
      return at::linear(heads_out.transpose(1, 2).reshape({batch, tokens, heads * head_dim}), in("to_out.0.weight"),
                        in("to_out.0.bias"));
    };
    const BatchLayout layout = BatchLayout::cfg(n_images);
    ASSERT_EQ(layout.groups()[1].reference, o["reference_rows"][1].get<int64_t>()) << id;

    StyleAlignedProcessor shared(opts);
    DefaultAttentionProcessor plain;
    std::map<std::string, at::Tensor> ours = {{"output", layer_output(run(shared, q, k, v, layout, attn_scale))},
                                              {"default_output", layer_output(run(plain, q, k, v, layout, attn_scale))}};
    for (const auto& [name, ref] : c["outputs"].items()) {
      auto expected = sa_test::golden_tensor(c, ref);
      const double atol = ref["suggested_atol"].get<double>();
      EXPECT_ALLCLOSE(ours.at(name), expected, atol) << id << " " << name;
      const double diff = sa_test::max_abs_diff(ours.at(name), expected);
      worst_ratio = std::max(worst_ratio, diff / atol);
      std::cout << "  " << id << " " << name << ": max abs diff " << diff << " (atol " << atol << ")\n";
    }
    ++cases;
  }
  EXPECT_EQ(cases, 21);
  std::cout << "  worst max-diff / atol over all cases: " << worst_ratio << "\n";
}

// ---- Properties of the shared processor ---------------------------------------------------------------------------

TEST(style_aligned, matches_the_official_formulation_for_every_option_set) {
  const auto qkv = random_qkv(6, 3, 24, 8, 11);
  const double scale = 1.0 / std::sqrt(8.0);
  std::vector<StyleAlignedOptions> option_sets;
  for (int mask = 0; mask < 16; ++mask) {
    StyleAlignedOptions o;
    o.share_attention = mask & 1;
    o.adain_queries = mask & 2;
    o.adain_keys = mask & 4;
    o.adain_values = mask & 8;
    o.shared_score_scale = mask % 3 == 0 ? 1.0 : 0.7;
    o.shared_score_shift = mask % 5 == 0 ? 0.0 : std::log(2.0);
    option_sets.push_back(o);
  }
  StyleAlignedOptions full;
  full.full_attention_share = true;
  option_sets.push_back(full);
  const std::vector<BatchLayout> layouts = {
      BatchLayout::cfg(3),                                       // diffusers CFG halves
      BatchLayout::single_group(6),                              // no CFG
      BatchLayout({{0, 1, 0}, {1, 4, 2}, {4, 6, 5}}),            // single-row group, references mid / last
  };
  for (const auto& layout : layouts) {
    for (const auto& o : option_sets) {
      StyleAlignedProcessor p(o, AttentionOptions{97});  // chunked too
      auto ours = run(p, qkv.q, qkv.k, qkv.v, layout, scale);
      auto expected = official_style_aligned(qkv.q, qkv.k, qkv.v, layout, o, scale);
      EXPECT_ALLCLOSE(ours, expected, 1e-5) << layout.to_string() << " " << o.to_string();
    }
  }
}

// The formulation CUDA runs (fused attention over concatenated keys) is checked here on the CPU, where CI runs.
TEST(style_aligned, concatenated_keys_match_the_official_formulation) {
  const auto qkv = random_qkv(6, 3, 24, 8, 13);
  const double scale = 1.0 / std::sqrt(8.0);
  const std::vector<BatchLayout> layouts = {BatchLayout::cfg(3), BatchLayout::single_group(6),
                                            BatchLayout({{0, 1, 0}, {1, 4, 2}, {4, 6, 5}})};
  for (const auto& layout : layouts) {
    for (int mask = 0; mask < 16; ++mask) {
      StyleAlignedOptions o;
      o.adain_queries = mask & 1;
      o.adain_keys = mask & 2;
      o.adain_values = mask & 4;
      o.shared_score_scale = (mask & 8) ? 0.7 : 1.0;
      AttentionCall call{"down_blocks.1.attentions.0.transformer_blocks.0.attn1", AttentionKind::self_attention,
                         layout, scale};
      auto ours = stylealigned::detail::attend_concatenated(qkv.q, qkv.k, qkv.v, call, o, AttentionOptions{97});
      auto expected = official_style_aligned(qkv.q, qkv.k, qkv.v, layout, o, scale);
      EXPECT_ALLCLOSE(ours, expected, 1e-5) << layout.to_string() << " " << o.to_string();
    }
  }
  // Half precision in, half out; AdaIN statistics in fp32.
  StyleAlignedOptions o;
  const auto layout = BatchLayout::cfg(3);
  AttentionCall call{"attn1", AttentionKind::self_attention, layout, scale, /*upcast=*/true};
  auto half = stylealigned::detail::attend_concatenated(qkv.q.to(at::kBFloat16), qkv.k.to(at::kBFloat16),
                                          qkv.v.to(at::kBFloat16), call, o, AttentionOptions{});
  EXPECT_EQ(half.scalar_type(), at::kBFloat16);
  EXPECT_ALLCLOSE(half.to(at::kFloat), official_style_aligned(qkv.q, qkv.k, qkv.v, layout, o, scale), 0.1);
  StyleAlignedOptions shifted;
  shifted.shared_score_shift = 0.5;
  EXPECT_THROW(stylealigned::detail::attend_concatenated(qkv.q, qkv.k, qkv.v, call, shifted, AttentionOptions{}), Error);
}

TEST(style_aligned, reference_rows_equal_plain_attention) {
  const auto qkv = random_qkv(8, 2, 32, 16, 12);
  const auto layout = BatchLayout::cfg(4);
  StyleAlignedOptions o = StyleAlignedOptions::transfer_notebook();
  o.shared_score_scale = 0.5;
  o.adain_values = true;
  StyleAlignedProcessor p(o);
  auto ours = run(p, qkv.q, qkv.k, qkv.v, layout, 0.25);
  auto plain = scaled_dot_product_attention(qkv.q, qkv.k, qkv.v, 0.25);
  for (int64_t r : {0, 4}) EXPECT_ALLCLOSE(ours[r], plain[r], 1e-6) << "reference row " << r;
  EXPECT_GT(sa_test::max_abs_diff(ours[1], plain[1]), 1e-2) << "targets must change";
}

TEST(style_aligned, each_group_sees_only_its_own_reference) {
  auto qkv = random_qkv(6, 2, 20, 8, 13);
  const auto layout = BatchLayout::cfg(3);
  StyleAlignedProcessor p(StyleAlignedOptions::transfer_notebook());
  auto before = run(p, qkv.q, qkv.k, qkv.v, layout, 0.3);
  // Perturb the unconditional half's reference: the conditional half must not move at all.
  for (auto* t : {&qkv.q, &qkv.k, &qkv.v}) (*t)[0].add_(at::randn_like((*t)[0]));
  auto after = run(p, qkv.q, qkv.k, qkv.v, layout, 0.3);
  EXPECT_TRUE(at::equal(before.narrow(0, 3, 3), after.narrow(0, 3, 3)));
  EXPECT_GT(sa_test::max_abs_diff(before.narrow(0, 1, 2), after.narrow(0, 1, 2)), 1e-2);
}

TEST(style_aligned, chunked_equals_unchunked) {
  const auto qkv = random_qkv(4, 2, 40, 8, 14);
  const auto layout = BatchLayout::cfg(2);
  StyleAlignedOptions o;
  o.shared_score_shift = 0.3;
  StyleAlignedProcessor whole(o, AttentionOptions{int64_t{1} << 30}), tiny(o, AttentionOptions{7});
  // Different GEMM blockings round differently: equal to a few float ulps.
  EXPECT_TRUE(sa_test::AllClose(run(tiny, qkv.q, qkv.k, qkv.v, layout, 0.35),
                                run(whole, qkv.q, qkv.k, qkv.v, layout, 0.35), 1e-6, 2e-6));
}

TEST(style_aligned, one_group_and_odd_batch) {
  const auto qkv = random_qkv(5, 2, 16, 8, 15);
  const auto layout = BatchLayout::single_group(5);  // no CFG, odd batch: upstream's B // 2 cannot express this
  StyleAlignedOptions o;
  StyleAlignedProcessor p(o);
  auto ours = run(p, qkv.q, qkv.k, qkv.v, layout, 0.35);
  EXPECT_ALLCLOSE(ours, official_style_aligned(qkv.q, qkv.k, qkv.v, layout, o, 0.35), 1e-5);
  // Every row its own group: plain attention.
  auto independent = run(p, qkv.q, qkv.k, qkv.v, BatchLayout::independent(5), 0.35);
  EXPECT_ALLCLOSE(independent, scaled_dot_product_attention(qkv.q, qkv.k, qkv.v, 0.35), 0.0);
}

TEST(style_aligned, cross_attention_and_half_precision) {
  const auto qkv = random_qkv(4, 2, 16, 8, 16);
  const auto layout = BatchLayout::cfg(2);
  StyleAlignedProcessor p(StyleAlignedOptions{});
  auto ctx_k = at::randn({4, 2, 7, 8}), ctx_v = at::randn({4, 2, 7, 8});
  EXPECT_ALLCLOSE(run(p, qkv.q, ctx_k, ctx_v, layout, 0.35, AttentionKind::cross_attention),
                  scaled_dot_product_attention(qkv.q, ctx_k, ctx_v, 0.35), 0.0);
  auto half = run(p, qkv.q.to(at::kHalf), qkv.k.to(at::kHalf), qkv.v.to(at::kHalf), layout, 0.35);
  EXPECT_EQ(half.scalar_type(), at::kHalf);
  EXPECT_ALLCLOSE(half, run(p, qkv.q, qkv.k, qkv.v, layout, 0.35), 2e-2);
}

// Reduced-precision inputs convert per slice (reference row, AdaIN'd target rows); every branch of the processor
// must still agree with its fp32 result and keep the input dtype: shared and unshared attention, AdaIN on any of
// q/k/v, a reference-logit shift, full attention share. bf16 takes the bf16-product kernel
// on native-bf16 CPUs and fp32 elsewhere; half always computes in fp32.
TEST(style_aligned, reduced_precision_matches_fp32_on_every_branch) {
  const auto qkv = random_qkv(6, 2, 24, 8, 21);
  const auto layout = BatchLayout::cfg(3);
  std::vector<StyleAlignedOptions> variants(5);
  variants[1].adain_values = true;
  variants[2].share_attention = false;
  variants[2].adain_values = true;
  variants[3].shared_score_shift = 0.69;
  variants[3].adain_queries = false;
  variants[4].full_attention_share = true;
  for (size_t i = 0; i < variants.size(); ++i) {
    StyleAlignedProcessor p(variants[i]);
    const auto reference = run(p, qkv.q, qkv.k, qkv.v, layout, 0.35);
    for (const auto dtype : {at::kBFloat16, at::kHalf}) {
      SCOPED_TRACE(fmt::format("variant {}, dtype {}", i, c10::toString(dtype)));
      auto low = run(p, qkv.q.to(dtype), qkv.k.to(dtype), qkv.v.to(dtype), layout, 0.35);
      EXPECT_EQ(low.scalar_type(), dtype);
      // bf16 keeps 8 mantissa bits: inputs and output rounded once each, AdaIN amplifying by ref_std / std.
      EXPECT_ALLCLOSE(low.to(at::kFloat), reference, dtype == at::kBFloat16 ? 6e-2 : 1e-2);
    }
  }
}

TEST(style_aligned, bad_calls_are_clear_errors) {
  const auto qkv = random_qkv(4, 2, 16, 8, 17);
  StyleAlignedProcessor p(StyleAlignedOptions{});
  expect_error([&] { run(p, qkv.q, qkv.k, qkv.v, BatchLayout::cfg(3), 0.3); }, "batch layout describes 6");
  expect_error([&] { run(p, qkv.q, qkv.k, qkv.v, BatchLayout::cfg(3), 0.3); },
               "down_blocks.1.attentions.0.transformer_blocks.0.attn1");
  expect_error([&] { run(p, qkv.q, qkv.k.narrow(2, 0, 8), qkv.v.narrow(2, 0, 8), BatchLayout::cfg(2), 0.3); },
               "as many key tokens");
  expect_error([&] { run(p, qkv.q[0], qkv.k[0], qkv.v[0], BatchLayout::cfg(1), 0.3); }, "[batch, heads");
  expect_error([&] { run(p, qkv.q.narrow(2, 0, 1), qkv.k.narrow(2, 0, 1), qkv.v.narrow(2, 0, 1), BatchLayout::cfg(2), 0.3); },
               "at least 2 tokens");
}

TEST(style_aligned, options_presets_and_validation) {
  StyleAlignedOptions d;
  EXPECT_TRUE(d.share_group_norm && d.share_layer_norm && d.share_attention && d.adain_queries && d.adain_keys);
  EXPECT_FALSE(d.adain_values || d.full_attention_share);
  EXPECT_EQ(d.shared_score_scale, 1.0);
  EXPECT_EQ(d.shared_score_shift, 0.0);
  EXPECT_EQ(d.only_self_level, 0.0);
  auto demo = StyleAlignedOptions::sdxl_demo();
  EXPECT_FALSE(demo.share_group_norm || demo.share_layer_norm);
  EXPECT_TRUE(demo.share_attention && demo.adain_queries && demo.adain_keys && !demo.adain_values);
  auto transfer = StyleAlignedOptions::transfer_notebook();
  EXPECT_TRUE(transfer.share_group_norm && transfer.share_layer_norm);
  EXPECT_DOUBLE_EQ(transfer.shared_score_shift, std::log(2.0));
  EXPECT_EQ(transfer.shared_score_scale, 1.0);
  EXPECT_NE(transfer.to_string().find("shared_score_shift=0.693"), std::string::npos) << transfer.to_string();

  auto bad = d;
  bad.shared_score_scale = std::nan("");
  expect_error([&] { bad.validate(); }, "shared_score_scale");
  bad = d;
  bad.shared_score_shift = INFINITY;
  expect_error([&] { bad.validate(); }, "shared_score_shift");
  bad = d;
  bad.only_self_level = 1.2;
  expect_error([&] { bad.validate(); }, "only_self_level");
  expect_error([&] { StyleAlignedProcessor p(bad); }, "only_self_level");

  // set(): every field by name, round-tripping through to_string(); bad names and values name the field.
  auto named = StyleAlignedOptions::sdxl_demo();
  named.set("share_group_norm", "true");
  named.set("adain_keys", "0");
  named.set("full_attention_share", "1");
  named.set("shared_score_shift", "0.5");
  named.set("shared_score_scale", "2");
  named.set("only_self_level", "0.25");
  EXPECT_TRUE(named.share_group_norm && named.full_attention_share && named.adain_queries);
  EXPECT_FALSE(named.adain_keys);
  EXPECT_EQ(named.shared_score_shift, 0.5);
  EXPECT_EQ(named.shared_score_scale, 2.0);
  EXPECT_EQ(named.only_self_level, 0.25);
  expect_error([&] { named.set("shared_score_shiftt", "1"); }, "shared_score_shiftt");
  expect_error([&] { named.set("adain_values", "yes"); }, "adain_values");
  expect_error([&] { named.set("shared_score_shift", "0.5x"); }, "shared_score_shift");
  expect_error([&] { named.set("only_self_level", ""); }, "only_self_level");
  EXPECT_EQ(named.shared_score_shift, 0.5);  // a failed set leaves the field as it was

  // assign(): only the named fields come over.
  auto overlaid = StyleAlignedOptions::sdxl_demo();
  overlaid.assign(named, {"adain_keys", "shared_score_scale"});
  EXPECT_FALSE(overlaid.adain_keys);
  EXPECT_EQ(overlaid.shared_score_scale, 2.0);
  EXPECT_FALSE(overlaid.share_group_norm || overlaid.full_attention_share);
  EXPECT_EQ(overlaid.shared_score_shift, 0.0);
  expect_error([&] { overlaid.assign(named, {"adain_keyz"}); }, "adain_keyz");

  // fields(): every field once, in declaration order, and what it lists reads back through set().
  const auto fields = named.fields();
  ASSERT_EQ(fields.size(), 10u);
  EXPECT_EQ(fields.front().name, "share_group_norm");
  EXPECT_EQ(fields.back().name, "only_self_level");
  StyleAlignedOptions rebuilt = StyleAlignedOptions::transfer_notebook();
  for (const auto& f : fields) {
    rebuilt.set(f.name, std::holds_alternative<bool>(f.value) ? (std::get<bool>(f.value) ? "1" : "0")
                                                               : fmt::format("{}", std::get<double>(f.value)));
  }
  EXPECT_EQ(rebuilt.to_string(), named.to_string());
  EXPECT_EQ(named.to_string().find("shared_score_scale=2 "), named.to_string().find("shared_score_scale="));
}

TEST(style_aligned, install_follows_only_self_level_in_layer_order) {
  // SD1.5-like layer list: 16 transformer blocks, each with attn1 then attn2.
  std::vector<std::string> layers;
  for (int i = 0; i < 16; ++i) {
    layers.push_back(fmt::format("blocks.{}.transformer_blocks.0.attn1", i));
    layers.push_back(fmt::format("blocks.{}.transformer_blocks.0.attn2", i));
  }
  ProcessorMap map(layers);
  StyleAlignedOptions o;
  o.only_self_level = 0.5;
  auto hook = install_style_aligned(map, o);
  ASSERT_NE(hook, nullptr);
  EXPECT_NE(dynamic_cast<SharedGroupNorm*>(hook.get()), nullptr);
  for (int i = 0; i < 16; ++i) {
    const bool shared = i % 2 == 1;  // level 0.5: even self-attention indices keep the default processor
    EXPECT_EQ(map.at(layers[2 * i]).name(), shared ? "style_aligned" : "default") << layers[2 * i];
    EXPECT_EQ(map.at(layers[2 * i + 1]).name(), "default") << layers[2 * i + 1];
  }
  auto* sa = dynamic_cast<StyleAlignedProcessor*>(&map.at(layers[2]));
  ASSERT_NE(sa, nullptr);
  EXPECT_EQ(sa->options().only_self_level, 0.5);

  // The installed processors compute StyleAligned through the map.
  const auto qkv = random_qkv(4, 2, 16, 8, 18);
  const auto layout = BatchLayout::cfg(2);
  AttentionCall call{layers[2], AttentionKind::self_attention, layout, 0.35};
  EXPECT_ALLCLOSE(map.at(layers[2]).attend(qkv.q, qkv.k, qkv.v, call),
                  official_style_aligned(qkv.q, qkv.k, qkv.v, layout, o, 0.35), 1e-5);

  // Installing again replaces the previous installation; sdxl_demo shares no norms.
  EXPECT_EQ(install_style_aligned(map, StyleAlignedOptions::sdxl_demo()), nullptr);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(map.at(layers[2 * i]).name(), "style_aligned");
  o.only_self_level = 0.03;
  expect_error([&] { install_style_aligned(map, o); }, "16 self-attention layers");
}

// ---- Shared GroupNorm ------------------------------------------------------------------------------------------------

TEST(shared_group_norm, equals_official_concat_and_closed_form) {
  at::manual_seed(21);
  const int64_t b = 6, c = 8, h = 5, w = 7, groups = 4;
  auto x = at::randn({b, c, h, w}) * (at::rand({b, 1, 1, 1}) * 3 + 0.5) + at::randn({b, 1, 1, 1});
  auto weight = at::randn({c}), bias = at::randn({c});
  const double eps = 1e-6;
  const auto layout = BatchLayout::cfg(3);
  SharedGroupNorm hook;
  auto ours = hook.group_norm(x, groups, weight, bias, eps, layout);

  // Official: stack each row's reference under it along H, GroupNorm, keep the first H rows.
  auto stacked = at::cat({x, expand_first(x, layout)}, -2);
  auto official = at::group_norm(stacked, groups, weight, bias, eps).narrow(-2, 0, h);
  EXPECT_ALLCLOSE(ours, official, 2e-5);

  // Closed form for one target row and group (double precision).
  const int64_t row = 4, ref = 3, g = 1, per = c / groups;
  auto own = x[row].narrow(0, g * per, per).to(at::kDouble), other = x[ref].narrow(0, g * per, per).to(at::kDouble);
  const double mo = own.mean().item<double>(), mr = other.mean().item<double>();
  const double vo = own.var(false).item<double>(), vr = other.var(false).item<double>();
  const double mj = (mo + mr) / 2, vj = (vo + vr) / 2 + (mo - mr) * (mo - mr) / 4;
  auto expected = (own - mj) / std::sqrt(vj + eps) * weight.narrow(0, g * per, per).to(at::kDouble).view({per, 1, 1}) +
                  bias.narrow(0, g * per, per).to(at::kDouble).view({per, 1, 1});
  EXPECT_ALLCLOSE(ours[row].narrow(0, g * per, per), expected, 2e-5);

  // Reference rows: plain GroupNorm.
  auto plain = at::group_norm(x, groups, weight, bias, eps);
  for (int64_t r : {0, 3}) EXPECT_ALLCLOSE(ours[r], plain[r], 2e-6);
  // Without affine parameters, and with every row its own group (plain GroupNorm everywhere).
  EXPECT_ALLCLOSE(hook.group_norm(x, groups, {}, {}, eps, BatchLayout::independent(b)),
                  at::group_norm(x, groups, {}, {}, eps), 2e-6);
  expect_error([&] { hook.group_norm(x, 3, weight, bias, eps, layout); }, "8 channels do not split into 3 groups");
  expect_error([&] { hook.group_norm(x, groups, weight, bias, eps, BatchLayout::cfg(2)); }, "SharedGroupNorm");
}

// ---- Memory: no N x 2N score tensor ---------------------------------------------------------------------------------

TEST(style_aligned_memory, no_n_by_2n_scores_at_4096_tokens) {
  const int64_t batch = 4, heads = 2, tokens = 4096, dim = 64;
  const size_t row_score_bytes = sizeof(float) * heads * tokens * 2 * tokens;  // one row's [heads, N, 2N]: 256 MiB
  const size_t qkv_bytes = sizeof(float) * batch * heads * tokens * dim;       // 8 MiB each
  sa_test::ScopedTracking tracking;
  auto q = at::randn({batch, heads, tokens, dim}), k = at::randn({batch, heads, tokens, dim});
  auto v = at::randn({batch, heads, tokens, dim});
  StyleAlignedOptions o = StyleAlignedOptions::transfer_notebook();
  o.adain_values = true;
  StyleAlignedProcessor p(o);
  const auto layout = BatchLayout::cfg(2);  // 2 groups x 2 rows

  tracking.tracker().reset_peak();
  const size_t before = tracking.tracker().live();
  at::Tensor out = run(p, q, k, v, layout, 0.125);
  const size_t peak = tracking.tracker().peak() - before, largest = tracking.tracker().largest();
  std::cout << "  StyleAligned 4x2x4096x64: peak " << peak / (1 << 20) << " MiB above inputs, largest allocation "
            << largest / (1 << 20) << " MiB (one row's N x 2N scores: " << row_score_bytes / (1 << 20) << " MiB)\n";
  EXPECT_TRUE(out.isfinite().all().item<bool>());
  EXPECT_LT(largest, row_score_bytes / 16);
  // The output (8 MiB), AdaIN'd q/k/v of one target row (3 x 2 MiB), two partial results and their merge
  // (3 x 2 MiB) and one score block (<= 16 MiB): bounded well below a single row's N x 2N scores.
  EXPECT_LT(peak, 5 * qkv_bytes);

  // The default processor on the same shapes: no [heads, N, N] tensor (128 MiB for one row) either.
  tracking.tracker().reset_peak();
  out = at::Tensor();
  const size_t before_default = tracking.tracker().live();
  out = scaled_dot_product_attention(q, k, v, 0.125);
  EXPECT_LT(tracking.tracker().largest(), qkv_bytes + 1);
  EXPECT_LT(tracking.tracker().peak() - before_default, 2 * qkv_bytes + (size_t{16} << 20));
}
