// Attention core: exact chunked softmax attention, log-sum-exp merging, autograd, the processor map.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "internal/attention_kernel.h"
#include "internal/onednn.h"
#include "internal/softmax_rows.h"
#include "stylealigned/attention.h"
#include "stylealigned/error.h"
#include "stylealigned/runtime.h"
#include "stylealigned/runtime.h"
#include "support/test_support.h"

using namespace stylealigned;

namespace {

// softmax(q kᵀ · scale + shift) v in float64 with plain libtorch ops: the yardstick.
at::Tensor reference_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  auto s = at::matmul(q.to(at::kDouble), k.to(at::kDouble).transpose(-2, -1)) * scale;
  return at::matmul(at::softmax(s, -1), v.to(at::kDouble));
}

at::Tensor reference_lse(const at::Tensor& q, const at::Tensor& k, double scale, double shift) {
  auto s = at::matmul(q.to(at::kDouble), k.to(at::kDouble).transpose(-2, -1)) * scale + shift;
  return at::logsumexp(s, {-1});
}

// Expects `fn` to throw stylealigned::Error whose message contains `needle`.
template <class Fn>
void expect_error(Fn&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no stylealigned::Error thrown (expected one mentioning '" << needle << "')";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

}  // namespace

TEST(attention, matches_reference_for_self_and_cross_shapes) {
  at::manual_seed(1);
  struct Shape {
    int64_t b, h, nq, nk, d, dv;
  };
  for (const Shape s : {Shape{2, 3, 17, 17, 8, 8}, Shape{1, 2, 64, 77, 16, 16}, Shape{3, 1, 1, 5, 4, 6},
                        Shape{2, 4, 130, 33, 64, 32}}) {
    auto q = at::randn({s.b, s.h, s.nq, s.d}), k = at::randn({s.b, s.h, s.nk, s.d});
    auto v = at::randn({s.b, s.h, s.nk, s.dv});
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.d));
    auto out = scaled_dot_product_attention(q, k, v, scale);
    ASSERT_EQ(out.sizes(), (std::vector<int64_t>{s.b, s.h, s.nq, s.dv}));
    EXPECT_ALLCLOSE(out, reference_attention(q, k, v, scale), 2e-6);
  }
}

TEST(attention, chunked_equals_unchunked) {
  at::manual_seed(2);
  auto q = at::randn({2, 3, 50, 8}), k = at::randn({2, 3, 50, 8}), v = at::randn({2, 3, 50, 8});
  auto whole = scaled_dot_product_attention(q, k, v, 0.3, AttentionOptions{int64_t{1} << 30});
  for (int64_t limit : {1, 37, 50 * 7, 6 * 50 * 13}) {
    auto chunked = scaled_dot_product_attention(q, k, v, 0.3, AttentionOptions{limit});
    EXPECT_ALLCLOSE(chunked, whole, 1e-6) << "max_score_elements " << limit;
  }
  EXPECT_ALLCLOSE(whole, reference_attention(q, k, v, 0.3), 2e-6);
}

TEST(attention, non_contiguous_inputs_as_a_model_passes_them) {
  // A model projects [B, N, C] and splits heads with a view + transpose: q, k, v arrive non-contiguous.
  at::manual_seed(3);
  const int64_t b = 2, n = 40, h = 4, d = 16;
  auto x = at::randn({3, b, n, h * d});
  auto split = [&](const at::Tensor& t) { return t.view({b, n, h, d}).transpose(1, 2); };
  auto q = split(x[0]), k = split(x[1]), v = split(x[2]);
  ASSERT_FALSE(q.is_contiguous());
  auto out = scaled_dot_product_attention(q, k, v, 0.25, AttentionOptions{200});
  EXPECT_ALLCLOSE(out, reference_attention(q, k, v, 0.25), 2e-6);
  // The result is laid out so that merging heads back to [B, N, C] is a view.
  EXPECT_TRUE(out.transpose(1, 2).is_contiguous());
}

TEST(attention, double_precision_uses_the_generic_path_exactly) {
  at::manual_seed(4);
  auto q = at::randn({1, 2, 33, 8}, at::kDouble), k = at::randn({1, 2, 21, 8}, at::kDouble);
  auto v = at::randn({1, 2, 21, 8}, at::kDouble);
  auto out = scaled_dot_product_attention(q, k, v, 0.4, AttentionOptions{100});
  EXPECT_EQ(out.scalar_type(), at::kDouble);
  EXPECT_ALLCLOSE(out, reference_attention(q, k, v, 0.4), 1e-12);
}

TEST(attention, half_inputs_with_upcast) {
  at::manual_seed(5);
  auto q = at::randn({1, 2, 24, 16}), k = at::randn({1, 2, 24, 16}), v = at::randn({1, 2, 24, 16});
  for (bool upcast : {true, false}) {
    auto out = scaled_dot_product_attention(q.to(at::kHalf), k.to(at::kHalf), v.to(at::kHalf), 0.25, {}, upcast);
    EXPECT_EQ(out.scalar_type(), at::kHalf);
    // Inputs rounded to half already move the result by ~1e-3.
    EXPECT_ALLCLOSE(out, reference_attention(q.to(at::kHalf), k.to(at::kHalf), v.to(at::kHalf), 0.25), 2e-3);
  }
}

TEST(attention, large_logits_stay_finite) {
  auto q = at::randn({1, 1, 8, 4}) * 100, k = at::randn({1, 1, 300, 4}) * 100, v = at::randn({1, 1, 300, 4});
  auto out = scaled_dot_product_attention(q, k, v, 1.0);
  EXPECT_TRUE(out.isfinite().all().item<bool>());
  EXPECT_ALLCLOSE(out, reference_attention(q, k, v, 1.0), 1e-5);
}

TEST(attention, fused_exp_rows_kernel) {
  // Rows of awkward lengths (vector tails) and a wide value range, including values far below the row max.
  at::manual_seed(6);
  for (int64_t cols : {1, 7, 8, 31, 33, 4096 + 5}) {
   for (float alpha : {1.0f, 0.3f, -0.7f}) {
    auto x = at::randn({5, cols}) * 20;
    x.index_put_({0, 0}, -200.0f);
    auto ref = x.to(at::kDouble) * static_cast<double>(alpha);
    auto ref_max = std::get<0>(ref.max(-1, true));
    auto y = x.clone();
    std::vector<float> row_max(5), row_sum(5);
    stylealigned::detail::exp_rows_inplace(y.data_ptr<float>(), 5, cols, cols, alpha, row_max.data(),
                                           row_sum.data());
    // The kernel's max is max(alpha * x) rounded to float (half an ulp); relative to it, every exp is accurate to
    // a few float ulps.
    auto ref_exp = (ref - at::tensor(row_max, at::kFloat).to(at::kDouble).view({5, 1})).exp();
    EXPECT_ALLCLOSE(y, ref_exp, 4e-7) << "cols " << cols << " alpha " << alpha;
    for (int64_t r = 0; r < 5; ++r) {
      EXPECT_NEAR(row_max[r], ref_max[r][0].item<double>(), 6e-8 * std::abs(ref_max[r][0].item<double>()));
      EXPECT_NEAR(row_sum[r], ref_exp[r].sum().item<double>(), 1e-6 * ref_exp[r].sum().item<double>());
    }
   }
  }
  auto nan_row = at::zeros({1, 16});
  nan_row.index_put_({0, 3}, std::numeric_limits<float>::quiet_NaN());
  float m = 0, s = 0;
  stylealigned::detail::exp_rows_inplace(nan_row.data_ptr<float>(), 1, 16, 16, 1.0f, &m, &s);
  EXPECT_TRUE(std::isnan(s)) << "a NaN logit must not be hidden";
}

TEST(attention, lse_and_merge_equal_attention_over_concatenated_keys) {
  at::manual_seed(7);
  const double scale = 0.35, lambda = 0.6, shift = std::log(2.0);
  auto q = at::randn({3, 2, 19, 8}), k_own = at::randn({3, 2, 19, 8}), v_own = at::randn({3, 2, 19, 8});
  auto k_ref = at::randn({1, 2, 23, 8}), v_ref = at::randn({1, 2, 23, 8});
  for (int64_t limit : {int64_t{1} << 22, int64_t{50}}) {
    AttentionOptions opts{limit};
    auto own = attention_with_lse(q, k_own, v_own, scale, 0.0, opts);
    auto ref = attention_with_lse(q, k_ref, v_ref, scale * lambda, shift, opts);  // k/v broadcast from batch 1
    EXPECT_EQ(own.lse.scalar_type(), at::kFloat);
    EXPECT_ALLCLOSE(own.lse, reference_lse(q, k_own, scale, 0.0), 2e-6);
    EXPECT_ALLCLOSE(ref.lse, reference_lse(q, k_ref.expand({3, -1, -1, -1}), scale * lambda, shift), 2e-6);
    EXPECT_ALLCLOSE(ref.out, reference_attention(q, k_ref.expand({3, -1, -1, -1}), v_ref.expand({3, -1, -1, -1}),
                                                 scale * lambda),
                    2e-6);
    // The same numbers from explicit logits over [K_own ; λ K_ref] with the shift on the reference columns.
    auto kk = at::cat({k_own, k_ref.expand({3, -1, -1, -1}) * lambda}, 2).to(at::kDouble);
    auto vv = at::cat({v_own, v_ref.expand({3, -1, -1, -1})}, 2).to(at::kDouble);
    auto logits = at::matmul(q.to(at::kDouble), kk.transpose(-2, -1)) * scale;
    logits.narrow(-1, 19, 23).add_(shift);
    auto expected = at::matmul(at::softmax(logits, -1), vv);
    EXPECT_ALLCLOSE(merge_attention(own, ref), expected, 2e-6);
  }
}

TEST(attention, tiles_with_a_remainder_on_model_strides_and_broadcast_keys) {
  // 300 queries against 300 keys: one 256-query tile and a 44-query remainder per (row, head) on the fused CPU
  // kernel; q/k/v as a model passes them ([B, T, H, D] memory seen as [B, H, T, D]) and reference keys broadcast.
  at::manual_seed(8);
  const auto q = at::randn({2, 300, 3, 40}).permute({0, 2, 1, 3});
  const auto k = at::randn({2, 300, 3, 40}).permute({0, 2, 1, 3});
  const auto v = at::randn({2, 300, 3, 24}).permute({0, 2, 1, 3});
  const auto k1 = at::randn({1, 300, 3, 40}).permute({0, 2, 1, 3});
  const auto v1 = at::randn({1, 300, 3, 24}).permute({0, 2, 1, 3});
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    auto own = attention_with_lse(q, k, v, 0.2, 0.5);
    EXPECT_ALLCLOSE(own.out, reference_attention(q, k, v, 0.2), 2e-6) << threads << " threads";
    EXPECT_ALLCLOSE(own.lse, reference_lse(q, k, 0.2, 0.5), 2e-6);
    auto ref = attention_with_lse(q, k1, v1, 0.2, 0.0);
    EXPECT_ALLCLOSE(ref.out, reference_attention(q, k1.expand({2, -1, -1, -1}), v1.expand({2, -1, -1, -1}), 0.2),
                    2e-6);
  }
}

TEST(attention, one_pass_over_own_and_reference_keys_equals_softmax_over_both) {
  // StyleAligned's target rows on the CPU: [own ; λ-scaled, shifted reference] logits in one softmax, written
  // into a [B, T, H, D] output view; 300 queries give a tile remainder.
  at::manual_seed(9);
  const double scale = 0.18, lambda = 0.7, shift = -0.4;
  const auto q = at::randn({2, 300, 3, 40}).permute({0, 2, 1, 3});
  const auto k = at::randn({2, 300, 3, 40}).permute({0, 2, 1, 3});
  const auto v = at::randn({2, 300, 3, 24}).permute({0, 2, 1, 3});
  const auto kr = at::randn({1, 280, 3, 40}).permute({0, 2, 1, 3});
  const auto vr = at::randn({1, 280, 3, 24}).permute({0, 2, 1, 3});
  at::Tensor out = at::full({2, 300, 3, 24}, 9.0).permute({0, 2, 1, 3});
  const bool done = stylealigned::detail::attention_over_own_and_reference_cpu(q, k, v, kr, vr, scale, lambda, shift,
                                                                 AttentionOptions{}, out);
#if STYLEALIGNED_EXPECT_ONEDNN
  ASSERT_TRUE(done);
#endif
  if (!done) return;
  auto kk = at::cat({k, kr.expand({2, -1, -1, -1}) * lambda}, 2).to(at::kDouble);
  auto vv = at::cat({v, vr.expand({2, -1, -1, -1})}, 2).to(at::kDouble);
  auto logits = at::matmul(q.to(at::kDouble), kk.transpose(-2, -1)) * scale;
  logits.narrow(-1, 300, 280).add_(shift);
  EXPECT_ALLCLOSE(out, at::matmul(at::softmax(logits, -1), vv), 2e-6);
  // Not its case (double): refused, nothing written.
  at::Tensor od = at::full({2, 3, 300, 24}, 9.0, at::kDouble);
  EXPECT_FALSE(stylealigned::detail::attention_over_own_and_reference_cpu(q.to(at::kDouble), k.to(at::kDouble),
                                                            v.to(at::kDouble), kr.to(at::kDouble),
                                                            vr.to(at::kDouble), scale, lambda, shift,
                                                            AttentionOptions{}, od));
  EXPECT_EQ(od.min().item<double>(), 9.0);
}

TEST(attention, lse_of_half_inputs_is_computed_in_float) {
  at::manual_seed(10);
  auto q = at::randn({2, 2, 12, 8}).to(at::kHalf), k = at::randn({1, 2, 9, 8}).to(at::kHalf);
  auto v = at::randn({1, 2, 9, 8}).to(at::kHalf);
  auto r = attention_with_lse(q, k, v, 0.3, -0.5);
  EXPECT_EQ(r.out.scalar_type(), at::kFloat);
  EXPECT_EQ(r.lse.scalar_type(), at::kFloat);
  auto k2 = k.expand({2, -1, -1, -1}), v2 = v.expand({2, -1, -1, -1});
  EXPECT_ALLCLOSE(r.out, reference_attention(q, k2, v2, 0.3), 1e-5);
  EXPECT_ALLCLOSE(r.lse, reference_lse(q, k2, 0.3, -0.5), 1e-5);
}

TEST(attention, merge_is_stable_for_far_apart_lse) {
  AttentionWithLse a{at::ones({1, 1, 2, 3}), at::tensor({1000.0f, -1000.0f}).view({1, 1, 2})};
  AttentionWithLse b{at::zeros({1, 1, 2, 3}), at::tensor({-1000.0f, 1000.0f}).view({1, 1, 2})};
  auto m = merge_attention(a, b);
  EXPECT_TRUE(m.isfinite().all().item<bool>());
  EXPECT_ALLCLOSE(m[0][0][0], at::ones({3}), 0.0);
  EXPECT_ALLCLOSE(m[0][0][1], at::zeros({3}), 0.0);
  expect_error([&] { merge_attention(a, AttentionWithLse{at::zeros({1, 1, 3, 3}), b.lse}); }, "shapes");
}

TEST(attention, autograd_through_default_processor_matches_softmax_reference) {
  at::manual_seed(8);
  auto make = [](std::vector<int64_t> shape) { return at::randn(shape, at::kDouble).requires_grad_(); };
  auto q = make({2, 2, 13, 4}), k = make({2, 2, 9, 4}), v = make({2, 2, 9, 5});
  auto w = at::randn({2, 2, 13, 5}, at::kDouble);
  BatchLayout layout = BatchLayout::single_group(2);
  DefaultAttentionProcessor proc(AttentionOptions{40});  // chunked: 40 scores per block
  AttentionCall call{"down_blocks.0.attentions.0.transformer_blocks.0.attn2", AttentionKind::cross_attention, layout,
                     0.5};
  auto out = proc.attend(q, k, v, call);
  ASSERT_TRUE(out.requires_grad());
  (out * w).sum().backward();
  auto gq = q.grad().clone(), gk = k.grad().clone(), gv = v.grad().clone();

  auto q2 = q.detach().clone().requires_grad_(), k2 = k.detach().clone().requires_grad_();
  auto v2 = v.detach().clone().requires_grad_();
  auto ref = at::matmul(at::softmax(at::matmul(q2, k2.transpose(-2, -1)) * 0.5, -1), v2);
  (ref * w).sum().backward();
  EXPECT_ALLCLOSE(out, ref, 1e-12);
  EXPECT_ALLCLOSE(gq, q2.grad(), 1e-12);
  EXPECT_ALLCLOSE(gk, k2.grad(), 1e-12);
  EXPECT_ALLCLOSE(gv, v2.grad(), 1e-12);

  // And a finite-difference check of one input coordinate in float64.
  const double eps = 1e-6;
  auto loss = [&](const at::Tensor& qq) {
    at::NoGradGuard g;
    return (scaled_dot_product_attention(qq, k.detach(), v.detach(), 0.5, AttentionOptions{40}) * w)
        .sum()
        .item<double>();
  };
  auto qp = q.detach().clone(), qm = q.detach().clone();
  qp[1][0][7][2] += eps;
  qm[1][0][7][2] -= eps;
  EXPECT_NEAR((loss(qp) - loss(qm)) / (2 * eps), gq[1][0][7][2].item<double>(), 1e-6);
}

TEST(attention, autograd_through_attention_with_lse) {
  at::manual_seed(9);
  auto q = at::randn({1, 1, 6, 4}, at::kDouble).requires_grad_();
  auto k = at::randn({1, 1, 5, 4}, at::kDouble), v = at::randn({1, 1, 5, 4}, at::kDouble);
  auto r = attention_with_lse(q, k, v, 0.5, 0.25);
  (r.out.sum() + r.lse.sum()).backward();
  auto q2 = q.detach().clone().requires_grad_();
  auto s = at::matmul(q2, k.transpose(-2, -1)) * 0.5 + 0.25;
  (at::matmul(at::softmax(s, -1), v).sum() + at::logsumexp(s, {-1}).sum()).backward();
  EXPECT_ALLCLOSE(q.grad(), q2.grad(), 1e-12);
}

TEST(attention, bad_inputs_name_the_problem) {
  auto q = at::randn({2, 2, 4, 8}), k = at::randn({2, 2, 4, 8}), v = at::randn({2, 2, 4, 8});
  expect_error([&] { scaled_dot_product_attention(q[0], k, v, 1.0); }, "[batch, heads, tokens, head_dim]");
  expect_error([&] { scaled_dot_product_attention(q, at::randn({2, 2, 4, 7}), v, 1.0); }, "head_dim");
  expect_error([&] { scaled_dot_product_attention(q, k, at::randn({2, 2, 5, 8}), 1.0); }, "shapes do not fit");
  expect_error([&] { scaled_dot_product_attention(q, k.narrow(0, 0, 1), v.narrow(0, 0, 1), 1.0); },
               "shapes do not fit");
  expect_error([&] { scaled_dot_product_attention(q, k.to(at::kDouble), v, 1.0); }, "dtype");
  expect_error([&] { attention_with_lse(q, k, v, std::nan(""), 0.0); }, "finite");
}

// ---- Processor map ------------------------------------------------------------------------------------------------

namespace {
std::vector<std::string> toy_layers() {
  return {"down_blocks.0.attentions.0.transformer_blocks.0.attn1", "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
          "up_blocks.1.attentions.0.transformer_blocks.0.attn1", "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
          "mid_block.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.0.attn2"};
}

class NamedProcessor : public AttentionProcessor {
 public:
  at::Tensor attend(const at::Tensor& q, const at::Tensor&, const at::Tensor&, const AttentionCall&) override {
    return q;
  }
  std::string name() const override { return "named"; }
};
}  // namespace

TEST(processor_map, set_get_reset_and_suffix) {
  ProcessorMap map(toy_layers());
  EXPECT_EQ(map.layers().size(), 6u);
  EXPECT_EQ(map.at(toy_layers()[0]).name(), "default");
  auto custom = std::make_shared<NamedProcessor>();
  map.set("mid_block.attentions.0.transformer_blocks.0.attn1.processor", custom);  // diffusers' key form
  EXPECT_TRUE(map.contains("mid_block.attentions.0.transformer_blocks.0.attn1"));
  EXPECT_EQ(map.get("mid_block.attentions.0.transformer_blocks.0.attn1"), custom);
  EXPECT_EQ(map.at("mid_block.attentions.0.transformer_blocks.0.attn1.processor").name(), "named");
  EXPECT_EQ(map.at(toy_layers()[1]).name(), "default");
  map.set_all(custom);
  for (const auto& l : map.layers()) EXPECT_EQ(map.get(l), custom);
  map.reset();
  for (const auto& l : map.layers()) EXPECT_EQ(map.get(l), default_attention_processor());
  EXPECT_EQ(default_attention_processor(), default_attention_processor());
}

TEST(processor_map, unknown_names_are_errors_naming_the_layer) {
  ProcessorMap map(toy_layers());
  auto custom = std::make_shared<NamedProcessor>();
  expect_error([&] { map.set("down_blocks.9.attn1", custom); }, "down_blocks.9.attn1");
  expect_error([&] { map.at("nope"); }, "'nope'");
  // A list with one bad name changes nothing.
  expect_error([&] { map.set(std::vector<std::string>{toy_layers()[0], "bogus.attn1"}, custom); }, "bogus.attn1");
  EXPECT_EQ(map.get(toy_layers()[0]), default_attention_processor());
  expect_error([&] { map.set(toy_layers()[0], nullptr); }, toy_layers()[0]);
  EXPECT_FALSE(map.contains("bogus"));
}

TEST(processor_map, select_self_and_cross_in_order) {
  auto self = select_self_attention(toy_layers());
  auto cross = select_cross_attention(toy_layers());
  ASSERT_EQ(self.size(), 3u);
  ASSERT_EQ(cross.size(), 3u);
  EXPECT_EQ(self[0], toy_layers()[0]);
  EXPECT_EQ(self[1], toy_layers()[2]);
  EXPECT_EQ(self[2], toy_layers()[4]);
  EXPECT_EQ(cross[2], toy_layers()[5]);
  // diffusers' ".processor" keys select the same way.
  EXPECT_EQ(select_self_attention({"a.attn1.processor", "a.attn2.processor", "attn10"}).size(), 1u);
}

// The attention kernel's products through oneDNN: strided views as the kernel makes them (q and v in [tokens,
// heads, dim] memory, k transposed, the output permuted), a broadcast batch, and views it must refuse.
TEST(onednn, bmm_out_equals_at_bmm_on_strided_views) {
  at::manual_seed(11);
  const at::Tensor q = at::randn({300, 5, 40}).permute({1, 0, 2});   // [5, 300, 40], token stride 200
  const at::Tensor k = at::randn({257, 5, 40}).permute({1, 2, 0});   // [5, 40, 257] (kᵀ)
  at::Tensor scores = at::empty({5, 300, 257});
  const bool done = stylealigned::detail::onednn::bmm_out(scores, q, k);
#if STYLEALIGNED_EXPECT_ONEDNN
  ASSERT_TRUE(done);
#endif
  if (done) EXPECT_LT((scores - at::bmm(q, k)).abs().max().item<float>(), 1e-4);

  const at::Tensor v = at::randn({257, 5, 24}).permute({1, 0, 2});   // [5, 257, 24]
  at::Tensor out_mem = at::zeros({300, 5, 24});
  at::Tensor out = out_mem.permute({1, 0, 2});                        // written through the permuted view
  if (stylealigned::detail::onednn::bmm_out(out, scores, v)) {
    EXPECT_LT((out_mem.permute({1, 0, 2}) - at::bmm(scores, v)).abs().max().item<float>(), 1e-4);
  }

  const at::Tensor b1 = at::randn({1, 40, 33});
  at::Tensor bc = at::empty({5, 300, 33});
  if (stylealigned::detail::onednn::bmm_out(bc, q, b1)) {
    EXPECT_LT((bc - at::bmm(q, b1.expand({5, 40, 33}))).abs().max().item<float>(), 1e-4);
  }
  // Shapes that do not fit, and other dtypes, are refused without writing.
  at::Tensor wrong = at::full({5, 300, 256}, 7.0);
  EXPECT_FALSE(stylealigned::detail::onednn::bmm_out(wrong, q, k));
  EXPECT_EQ(wrong.max().item<float>(), 7.0f);
  at::Tensor d = at::empty({5, 300, 257}, at::kDouble);
  EXPECT_FALSE(stylealigned::detail::onednn::bmm_out(d, q.to(at::kDouble), k.to(at::kDouble)));
}

TEST(onednn, gemm_plans_run_concurrently_inside_parallel_regions) {
  // The attention kernel's contract: one plan, run from many threads at once on different tiles, each exact.
  at::manual_seed(12);
  const at::Tensor a = at::randn({64, 96, 3, 40}).permute({2, 0, 1, 3});  // [3, 64, 96, 40] in [64, 96, 3, 40]
  const at::Tensor b = at::randn({3, 40, 130});
  auto plan = stylealigned::detail::onednn::plan_gemm(96, 130, 40, a.stride(2), a.stride(3), b.stride(1),
                                                      b.stride(2), 130);
#if STYLEALIGNED_EXPECT_ONEDNN
  ASSERT_NE(plan, nullptr);
#endif
  if (!plan) return;
  at::Tensor c = at::empty({3, 64, 96, 130});
  at::set_num_threads(2);
  at::parallel_for(0, 3 * 64, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / 64, r = i % 64;
      plan->run(a[h][r].data_ptr<float>(), b[h].data_ptr<float>(), c[h][r].data_ptr<float>());
    }
  });
  EXPECT_LT((c - at::matmul(a, b.unsqueeze(1))).abs().max().item<float>(), 1e-4);
}

TEST(onednn, bf16_linear_and_conv_match_fp32_where_the_cpu_has_native_bf16) {
  at::manual_seed(13);
  const at::Tensor x = at::randn({2, 300, 320}), w = at::randn({640, 320}) * 0.05, bias = at::randn({640});
  const at::Tensor y = stylealigned::detail::onednn::linear(x.to(at::kBFloat16), w.to(at::kBFloat16),
                                                           bias.to(at::kBFloat16));
  const at::Tensor xc = at::randn({2, 64, 17, 19}), wc = at::randn({96, 64, 3, 3}) * 0.05, bc = at::randn({96});
  const at::Tensor yc = stylealigned::detail::onednn::conv2d(xc.to(at::kBFloat16), wc.to(at::kBFloat16),
                                                            bc.to(at::kBFloat16), 1, 1);
#if STYLEALIGNED_EXPECT_ONEDNN
  // On a CPU without native bf16 both refuse (ATen keeps the case); with it both run.
  ASSERT_EQ(y.defined(), stylealigned::cpu_has_native_bf16());
  ASSERT_EQ(yc.defined(), stylealigned::cpu_has_native_bf16());
#endif
  // bf16 inputs and output: relative error of a few bf16 ulps (2^-8) against the fp32 product of the same inputs.
  if (y.defined()) {
    const at::Tensor ref = at::linear(x.to(at::kBFloat16).to(at::kFloat), w.to(at::kBFloat16).to(at::kFloat),
                                      bias.to(at::kBFloat16).to(at::kFloat));
    EXPECT_EQ(y.scalar_type(), at::kBFloat16);
    EXPECT_LT(((y.to(at::kFloat) - ref).norm() / ref.norm()).item<float>(), 1e-2);
  }
  if (yc.defined()) {
    const at::Tensor ref = at::conv2d(xc.to(at::kBFloat16).to(at::kFloat), wc.to(at::kBFloat16).to(at::kFloat),
                                      bc.to(at::kBFloat16).to(at::kFloat), 1, 1);
    EXPECT_LT(((yc.to(at::kFloat) - ref).norm() / ref.norm()).item<float>(), 1e-2);
  }
}

// The feed-forward's fused projection: both halves of the stored weight in place, the gate's exact gelu as a
// post-op, the product written multiplied. Against diffusers' formula in fp64: the input as the transformer block
// hands it (contiguous) and as a column slice (rows further apart than K), shapes off any tile size.
TEST(onednn, geglu_equals_value_times_gelu_of_gate) {
  at::manual_seed(14);
  const at::Tensor w = at::randn({2 * 328, 136}) * 0.1, bias = at::randn({2 * 328});
  const at::Tensor wide = at::randn({2, 301, 150});
  for (const at::Tensor& x : {at::randn({2, 301, 136}), wide.narrow(-1, 7, 136)}) {
    const at::Tensor y = stylealigned::detail::onednn::geglu(x, w, bias);
#if STYLEALIGNED_EXPECT_ONEDNN
    ASSERT_TRUE(y.defined());
#endif
    if (!y.defined()) continue;
    const auto parts = at::linear(x.to(at::kDouble), w.to(at::kDouble), bias.to(at::kDouble)).chunk(2, -1);
    const at::Tensor ref = parts[0] * at::gelu(parts[1]);
    EXPECT_EQ(y.sizes(), ref.sizes());
    EXPECT_TRUE(y.is_contiguous());
    // |ref| reaches ~10; fp32 products of 136 terms and oneDNN's erf (error ~1e-7) keep it within 1e-4.
    EXPECT_LT((y.to(at::kDouble) - ref).abs().max().item<double>(), 1e-4);
  }
  // Not its case: an odd projection width, no bias, a mismatched K, doubles.
  EXPECT_FALSE(stylealigned::detail::onednn::geglu(at::randn({4, 136}), at::randn({5, 136}), at::randn({5})).defined());
  EXPECT_FALSE(stylealigned::detail::onednn::geglu(at::randn({4, 136}), w, at::Tensor()).defined());
  EXPECT_FALSE(stylealigned::detail::onednn::geglu(at::randn({4, 135}), w, bias).defined());
  EXPECT_FALSE(
      stylealigned::detail::onednn::geglu(at::randn({4, 136}, at::kDouble), w.to(at::kDouble), bias.to(at::kDouble))
          .defined());
}

namespace {

TEST(attention, bf16_products_on_native_bf16_cpus_match_the_fp64_softmax_of_the_bf16_values) {
  // bf16 q/k/v go into the bf16 GEMMs directly (fp32 scores and accumulation, P rounded to bf16 for P·V), default
  // kernel and StyleAligned's [own ; reference] kernel alike; on other CPUs the same calls run in fp32.
  at::manual_seed(4);
  const double scale = 0.16;
  const auto bf = [](const at::Tensor& t) { return t.to(at::kBFloat16); };
  const auto q = bf(at::randn({2, 300, 3, 40})).permute({0, 2, 1, 3});
  const auto k = bf(at::randn({2, 1100, 3, 40})).permute({0, 2, 1, 3});  // > one 1024-key chunk
  const auto v = bf(at::randn({2, 1100, 3, 24})).permute({0, 2, 1, 3});
  auto reference = [&](const at::Tensor& kk, const at::Tensor& vv, const at::Tensor& logit_shift) {
    auto logits = at::matmul(q.to(at::kDouble), kk.to(at::kDouble).transpose(-2, -1)) * scale;
    if (logit_shift.defined()) logits.add_(logit_shift);
    return at::matmul(at::softmax(logits, -1), vv.to(at::kDouble));
  };
  // |out| <= max |v| ~ 4; P's bf16 rounding (2^-9 relative) and bf16 output rounding give ~1e-2 at most.
  const at::Tensor out = stylealigned::scaled_dot_product_attention(q, k, v, scale, {}, /*upcast=*/false);
  EXPECT_EQ(out.scalar_type(), at::kBFloat16);
  EXPECT_ALLCLOSE(out, reference(k, v, at::Tensor()), 2e-2);

  const double lambda = 0.8, shift = 0.3;
  const auto kr = bf(at::randn({1, 500, 3, 40})).permute({0, 2, 1, 3});
  const auto vr = bf(at::randn({1, 500, 3, 24})).permute({0, 2, 1, 3});
  at::Tensor joint = at::empty({2, 300, 3, 24}).permute({0, 2, 1, 3});
  const bool done = stylealigned::detail::attention_over_own_and_reference_cpu(q, k, v, kr, vr, scale, lambda,
                                                                               shift, AttentionOptions{}, joint);
#if STYLEALIGNED_EXPECT_ONEDNN
  EXPECT_EQ(done, stylealigned::cpu_has_native_bf16());
#endif
  if (!done) return;
  at::Tensor logit_shift = at::zeros({1600}, at::kDouble);
  logit_shift.narrow(0, 1100, 500).fill_(shift);
  const auto kk = at::cat({k.to(at::kDouble), kr.to(at::kDouble).expand({2, -1, -1, -1}) * lambda}, 2);
  const auto vv = at::cat({v, vr.expand({2, -1, -1, -1})}, 2);
  EXPECT_ALLCLOSE(joint, reference(kk, vv, logit_shift), 1e-2);
}

}  // namespace
