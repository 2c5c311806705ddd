#include "stylealigned/attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "internal/attention_kernel.h"
#include "internal/onednn.h"
#include "internal/softmax_rows.h"
#include "internal/torch_compat.h"
#include "stylealigned/error.h"

namespace stylealigned {
namespace {

std::string shape_of(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  return fmt::format("[{}]", fmt::join(t.sizes(), ", "));
}

bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

bool needs_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
}

// Query rows per chunk so that rows_per_chunk x kv_tokens x (batch x heads) scores stay within the limit.
int64_t query_chunk(int64_t q_tokens, int64_t kv_tokens, int64_t batch_heads, int64_t max_score_elements) {
  const int64_t per_query = std::max<int64_t>(1, kv_tokens * batch_heads);
  return std::clamp<int64_t>(max_score_elements / per_query, 1, std::max<int64_t>(q_tokens, 1));
}

// Differentiable reference path: plain libtorch ops per query chunk (score blocks bounded, then concatenated).
detail::KernelResult autograd_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                        double shift, const AttentionOptions& options, bool want_lse) {
  const int64_t nq = q.size(2);
  const int64_t chunk = query_chunk(nq, k.size(2), q.size(0) * q.size(1), options.max_score_elements);
  const at::Tensor kt = k.transpose(-2, -1);
  std::vector<at::Tensor> outs, lses;
  for (int64_t s = 0; s < nq; s += chunk) {
    at::Tensor scores = at::matmul(q.narrow(2, s, std::min(chunk, nq - s)), kt).mul(scale);
    if (want_lse) lses.push_back(at::logsumexp(scores, {-1}).add(shift));
    outs.push_back(at::matmul(at::softmax(scores, -1), v));
  }
  detail::KernelResult r;
  r.out = outs.size() == 1 ? outs[0] : at::cat(outs, 2);
  if (want_lse) r.lse = lses.size() == 1 ? lses[0] : at::cat(lses, 2);
  return r;
}

// The end of an online softmax for `rows` query rows: each output row divided by its row sum and, where `lse` is
// given, lse[i * lse_stride] = row_max + log(row_sum) + shift, summed in double and rounded once.
void finish_rows(float* out, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t dv, const float* row_max,
                 const float* row_sum, double shift, float* lse, int64_t lse_stride) {
  for (int64_t i = 0; i < rows; ++i) {
    const float inv = 1.0f / row_sum[i];
    float* row = out + i * row_stride;
    for (int64_t j = 0; j < dv; ++j) row[j * col_stride] *= inv;
    if (lse != nullptr) {
      lse[i * lse_stride] =
          static_cast<float>(static_cast<double>(row_max[i]) + std::log(static_cast<double>(row_sum[i])) + shift);
    }
  }
}

// finish_rows over one float32 CPU block [heads, rows, dv] (row statistics laid out h * rows + i), in plain loops: a
// block is too small for an ATen parallel region, and the region's thread wake-ups cost far more than the work when
// OpenBLAS's threads share the cores (measured 4x slower at 1024 tokens on 2 cores).
void finish_block_cpu(const at::Tensor& out, const float* row_max, const float* row_sum, double shift,
                      at::Tensor* lse) {
  const int64_t hn = out.size(0), cn = out.size(1), dv = out.size(2);
  float* o = out.data_ptr<float>();
  float* l = lse != nullptr ? lse->data_ptr<float>() : nullptr;
  for (int64_t h = 0; h < hn; ++h) {
    finish_rows(o + h * out.stride(0), out.stride(1), out.stride(2), cn, dv, row_max + h * cn, row_sum + h * cn,
                shift, l != nullptr ? l + h * lse->stride(0) : nullptr, l != nullptr ? lse->stride(1) : 0);
  }
}

// The fused fp32 CPU kernel on oneDNN: each thread takes whole tiles (one batch row, one head, `tile` queries) and
// walks the keys in chunks with an online softmax (flash-attention style: running max and sum per query row, the
// output accumulator rescaled when the max moves), running q·kᵀ, the exp pass and P·V on its own core with its
// tile in its cache; the threads meet once per call instead of after every small product. Splitting each product
// over both cores instead ran the attention core at 125-160 GFLOP/s; whole tiles per thread reach 210-250 at head
// dim 40 (measured on the 2-core EPYC, SD1.5's 4096-token level).
// The keys may come in blocks (StyleAligned: own keys, then the reference's), each with its logit scale ratio and
// shift applied by its q·kᵀ product, so one softmax runs over all of them: exactly the merge of per-block results,
// without their partial outputs, log-sum-exps and merge pass. False when oneDNN cannot plan the products: the
// caller then runs the block loop (or the per-block merge).
struct KeyBlock {
  at::Tensor k, v;           // [B or 1, heads, nk, d] / [B or 1, heads, nk, dv]
  float logit_ratio = 1.0f;  // this block's logits are logit_ratio · (q·k) · scale + shift
  float shift = 0.0f;
};

bool tiled_attention_cpu(const at::Tensor& q, const std::vector<KeyBlock>& blocks, const at::Tensor& out,
                         const at::Tensor& lse, double scale, double shift, int64_t max_score_elements) {
  const int64_t batch = q.size(0), heads = q.size(1), nq = q.size(2), d = q.size(3), dv = out.size(3);
  if (out.stride(3) != 1 || blocks.empty() || scale == 0.0 || out.scalar_type() != at::kFloat) return false;
  // bf16 q/k/v (native bf16 CPUs): both products take bf16 inputs and accumulate in fp32; the scores, the exp pass
  // and the output accumulator stay fp32, and P is rounded to bf16 for P·V, as diffusers casts the probabilities
  // to the value dtype before that product.
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const int64_t esz = static_cast<int64_t>(q.element_size());
  const int64_t threads = std::max(1, at::get_num_threads());
  // 256 query rows x 1024-key chunks: on the 2-core EPYC (SD1.5 and SDXL shapes) tiles of 128-512 rows and chunks
  // of 512-8192 keys all ran within the run-to-run noise (210-250 GFLOP/s); 1024 keys keep the per-thread score
  // block at 1 MiB whatever the key count, so no transient grows with tokens x reference tokens.
  constexpr int64_t kTileRows = 256, kChunkKeys = 1024;
  int64_t widest = 0;
  for (const KeyBlock& kb : blocks) widest = std::max<int64_t>(widest, kb.k.size(2));
  const int64_t kc = std::min(kChunkKeys, widest);
  int64_t tile = std::min(kTileRows, nq);
  tile = std::min(tile, std::max<int64_t>(1, max_score_elements / (threads * kc)));
  const int64_t tiles_per_head = (nq + tile - 1) / tile, last = nq - (tiles_per_head - 1) * tile;

  // Plans per block for (rows, keys) = (tile or last, kc or the block's remainder).
  using Plan = std::unique_ptr<detail::onednn::GemmPlan>;
  struct ChunkPlans {
    Plan qk, pv;
  };
  struct BlockPlans {
    ChunkPlans p[2][2];  // [last tile][remainder chunk]
  };
  std::vector<BlockPlans> plans(blocks.size());
  for (size_t i = 0; i < blocks.size(); ++i) {
    const at::Tensor &k = blocks[i].k, &v = blocks[i].v;
    const int64_t n = k.size(2), rem = n % kc;
    // The block's shift enters before the exp pass multiplies by `scale`, hence shift / scale here.
    const float a = blocks[i].logit_ratio, b = static_cast<float>(blocks[i].shift / scale);
    for (int lt = 0; lt < 2; ++lt) {
      const int64_t rows = lt ? last : tile;
      if (lt && last == tile) continue;
      for (int rc = 0; rc < 2; ++rc) {
        const int64_t cols = rc ? (n > kc ? rem : 0) : std::min(kc, n);
        if (cols == 0) continue;
        ChunkPlans& cp = plans[i].p[lt][rc];
        cp.qk = detail::onednn::plan_gemm(rows, cols, d, q.stride(2), q.stride(3), k.stride(3), k.stride(2), kc, a, b,
                                          /*accumulate=*/false, bf16);
        cp.pv = detail::onednn::plan_gemm(rows, dv, cols, kc, 1, v.stride(2), v.stride(3), out.stride(2), 1.0f, 0.0f,
                                          /*accumulate=*/true, bf16);
        if (!cp.qk || !cp.pv) return false;
      }
    }
  }

  const char* qp = static_cast<const char*>(q.data_ptr());
  float* op = out.data_ptr<float>();
  float* lp = lse.defined() ? lse.data_ptr<float>() : nullptr;
  const int64_t items = batch * heads * tiles_per_head;
  const float alpha = static_cast<float>(scale);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(tile * kc)), row_max(tile), row_sum(tile), corr(tile);
    std::vector<uint16_t> probs(bf16 ? static_cast<size_t>(tile * kc) : 0);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t t = it % tiles_per_head, h = (it / tiles_per_head) % heads, b = it / (tiles_per_head * heads);
      const int64_t s = t * tile, rows = std::min(tile, nq - s);
      const int lt = rows == tile ? 0 : 1;
      const char* qt = qp + (b * q.stride(0) + h * q.stride(1) + s * q.stride(2)) * esz;
      float* ot = op + b * out.stride(0) + h * out.stride(1) + s * out.stride(2);
      for (int64_t i = 0; i < rows; ++i) {
        std::fill_n(ot + i * out.stride(2), dv, 0.0f);
        row_max[i] = -std::numeric_limits<float>::infinity();
        row_sum[i] = 0.0f;
      }
      for (size_t i = 0; i < blocks.size(); ++i) {
        const at::Tensor &k = blocks[i].k, &v = blocks[i].v;
        const int64_t n = k.size(2);
        const char* kt = static_cast<const char*>(k.data_ptr()) +
                         ((k.size(0) == 1 ? 0 : b) * k.stride(0) + h * k.stride(1)) * esz;
        const char* vt = static_cast<const char*>(v.data_ptr()) +
                         ((v.size(0) == 1 ? 0 : b) * v.stride(0) + h * v.stride(1)) * esz;
        for (int64_t c0 = 0; c0 < n; c0 += kc) {
          const int64_t cols = std::min(kc, n - c0);
          const ChunkPlans& cp = plans[i].p[lt][cols == std::min(kc, n) ? 0 : 1];
          cp.qk->run(qt, kt + c0 * k.stride(2) * esz, scores.data());
          detail::exp_rows_online(scores.data(), rows, cols, kc, alpha, row_max.data(), row_sum.data(),
                                  corr.data());
          for (int64_t r = 0; r < rows; ++r) {
            if (corr[r] == 1.0f) continue;
            float* row = ot + r * out.stride(2);
            for (int64_t j = 0; j < dv; ++j) row[j] *= corr[r];
          }
          if (bf16) detail::rows_to_bf16(scores.data(), rows, cols, kc, probs.data(), kc);
          cp.pv->run(bf16 ? static_cast<const void*>(probs.data()) : scores.data(), vt + c0 * v.stride(2) * esz, ot);
        }
      }
      finish_rows(ot, out.stride(2), 1, rows, dv, row_max.data(), row_sum.data(), shift,
                  lp != nullptr ? lp + (b * heads + h) * nq + s : nullptr, 1);
    }
  });
  return true;
}

}  // namespace

namespace detail {

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::string_view what,
                            bool allow_kv_broadcast) {
  if (!q.defined() || !k.defined() || !v.defined()) throw Error(fmt::format("{}: q, k and v must be defined", what));
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) {
    throw Error(fmt::format("{}: q, k, v must be [batch, heads, tokens, head_dim]; got q {}, k {}, v {}", what,
                            shape_of(q), shape_of(k), shape_of(v)));
  }
  const bool batch_ok = k.size(0) == v.size(0) &&
                        (k.size(0) == q.size(0) || (allow_kv_broadcast && k.size(0) == 1));
  if (!batch_ok || q.size(1) != k.size(1) || q.size(1) != v.size(1) || q.size(3) != k.size(3) ||
      k.size(2) != v.size(2)) {
    throw Error(fmt::format(
        "{}: shapes do not fit: q {}, k {}, v {} (need equal heads, q and k head_dim equal, k and v tokens equal, "
        "k/v batch equal to q's{})",
        what, shape_of(q), shape_of(k), shape_of(v), allow_kv_broadcast ? " or 1" : ""));
  }
  if (k.size(2) == 0) throw Error(fmt::format("{}: k and v have no tokens", what));
  if (!at::isFloatingType(q.scalar_type()) || q.scalar_type() != k.scalar_type() ||
      q.scalar_type() != v.scalar_type()) {
    throw Error(fmt::format("{}: q, k, v must share one floating dtype; got {}, {}, {}", what,
                            c10::toString(q.scalar_type()), c10::toString(k.scalar_type()),
                            c10::toString(v.scalar_type())));
  }
  if (q.device() != k.device() || q.device() != v.device()) {
    throw Error(fmt::format("{}: q, k, v must be on one device; got {}, {}, {}", what, q.device().str(),
                            k.device().str(), v.device().str()));
  }
}

BlockShape choose_block(int64_t heads, int64_t q_tokens, int64_t kv_tokens, int64_t max_score_elements) {
  // Blocks of 2^20 scores (4 MiB in float32; 256 query rows x 4096 keys) measured fastest on a 2-core EPYC with
  // OpenBLAS (2^18 and 2^22 were 10-30% slower): big enough for efficient GEMMs, small enough for the shared L3.
  constexpr int64_t kCacheBlockElements = int64_t{1} << 20;
  const int64_t budget = std::max<int64_t>(1, std::min(max_score_elements, kCacheBlockElements));
  BlockShape b;
  b.queries = std::clamp<int64_t>(budget / std::max<int64_t>(kv_tokens, 1), 1, q_tokens);
  if (b.queries < 32 && max_score_elements >= 32 * kv_tokens) b.queries = std::min<int64_t>(32, q_tokens);
  b.heads = 1;
  if (b.queries == q_tokens) {
    b.heads = std::clamp<int64_t>(budget / std::max<int64_t>(q_tokens * kv_tokens, 1), 1, heads);
  }
  return b;
}

at::Tensor token_major_output(int64_t batch, int64_t heads, int64_t tokens, int64_t v_dim,
                              const at::TensorOptions& options) {
  return at::empty({batch, tokens, heads, v_dim}, options).permute({0, 2, 1, 3});
}

KernelResult chunked_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                               double shift, const AttentionOptions& options, bool want_lse, bool upcast) {
  if (q_in.is_cpu() && q_in.scalar_type() == at::kBFloat16 && !upcast && !want_lse && q_in.size(2) > 0 &&
      q_in.size(0) > 0 && detail::fast_exp_rows_available()) {
    // bf16 straight into the tiled kernel's bf16 products (fp32 scores and output), no fp32 copies of q, k, v.
    const int64_t batch = q_in.size(0), heads = q_in.size(1), nq = q_in.size(2), dv = v_in.size(3);
    at::Tensor out = token_major_output(batch, heads, nq, dv, q_in.options().dtype(at::kFloat));
    if (tiled_attention_cpu(q_in, {KeyBlock{k_in, v_in}}, out, at::Tensor(), scale, shift,
                            options.max_score_elements)) {
      return {out, at::Tensor()};
    }
  }
  const bool upcast_now = is_reduced_float(q_in.scalar_type()) && (upcast || want_lse || q_in.is_cpu());
  const at::ScalarType compute = upcast_now ? at::kFloat : q_in.scalar_type();
  const at::Tensor q = q_in.to(compute);
  const at::Tensor k = k_in.to(compute);
  const at::Tensor v = v_in.to(compute);

  const int64_t batch = q.size(0), heads = q.size(1), nq = q.size(2), nk = k.size(2), dv = v.size(3);
  const bool kv_broadcast = k.size(0) == 1 && batch != 1;
  at::Tensor out = token_major_output(batch, heads, nq, dv, q.options());
  at::Tensor lse;
  if (want_lse) lse = at::empty({batch, heads, nq}, q.options().dtype(at::kFloat));
  if (nq == 0 || batch == 0) return {out, lse};

  const bool fused = q.is_cpu() && compute == at::kFloat && detail::fast_exp_rows_available();
  if (fused && tiled_attention_cpu(q, {KeyBlock{k, v}}, out, lse, scale, shift, options.max_score_elements)) {
    return {out, lse};
  }
  const BlockShape block = choose_block(heads, nq, nk, options.max_score_elements);
  at::Tensor scores_buf = at::empty({block.heads * block.queries * nk}, q.options());
  at::Tensor q_buf = fused ? at::Tensor() : at::empty({block.heads * block.queries * q.size(3)}, q.options());
  const at::Tensor scale_t = at::scalar_tensor(scale, q.options());
  at::Tensor max_buf = at::empty({block.heads * block.queries}, q.options());
  at::Tensor sum_buf = at::empty({block.heads * block.queries}, q.options());

  for (int64_t b = 0; b < batch; ++b) {
    const int64_t kb = kv_broadcast ? 0 : b;
    const at::Tensor qb = q[b], ktb = k[kb].transpose(-2, -1), vb = v[kb], ob = out[b];
    for (int64_t h0 = 0; h0 < heads; h0 += block.heads) {
      const int64_t hn = std::min(block.heads, heads - h0);
      const at::Tensor qh = qb.narrow(0, h0, hn), kh = ktb.narrow(0, h0, hn), vh = vb.narrow(0, h0, hn);
      const at::Tensor oh = ob.narrow(0, h0, hn);
      for (int64_t s = 0; s < nq; s += block.queries) {
        const int64_t cn = std::min(block.queries, nq - s);
        const int64_t rows = hn * cn;
        at::Tensor scores = scores_buf.narrow(0, 0, rows * nk).view({hn, cn, nk});
        at::Tensor row_max = max_buf.narrow(0, 0, rows).view({hn, cn, 1});
        at::Tensor row_sum = sum_buf.narrow(0, 0, rows).view({hn, cn, 1});
        at::Tensor oc = oh.narrow(1, s, cn);
        at::Tensor l;
        if (want_lse) l = lse[b].narrow(0, h0, hn).narrow(1, s, cn);
        if (fused) {
          // Raw q·k, then the scale inside the exp pass; P·V, then 1/sum on the [cn, dv] output instead of the
          // [cn, nk] probabilities.
          const at::Tensor qc = qh.narrow(1, s, cn);
          if (!detail::onednn::bmm_out(scores, qc, kh)) at::bmm_out(scores, qc, kh);
          detail::exp_rows_inplace(scores.data_ptr<float>(), rows, nk, nk, static_cast<float>(scale),
                                   row_max.data_ptr<float>(), row_sum.data_ptr<float>());
          if (!detail::onednn::bmm_out(oc, scores, vh)) at::bmm_out(oc, scores, vh);
          finish_block_cpu(oc, row_max.data_ptr<float>(), row_sum.data_ptr<float>(), shift, want_lse ? &l : nullptr);
        } else {
          // The scale goes into the query block rather than into the GEMM: baddbmm's beta = 0 still reads the
          // uninitialised score block on libtorch's small-matrix path, where 0 * NaN poisons it.
          at::Tensor q_scaled = q_buf.narrow(0, 0, rows * q.size(3)).view({hn, cn, q.size(3)});
          at::mul_out(q_scaled, qh.narrow(1, s, cn), scale_t);
          at::bmm_out(scores, q_scaled, kh);
          at::amax_out(row_max, scores, {-1}, /*keepdim=*/true);
          scores.sub_(row_max).exp_();
          at::sum_out(row_sum, scores, {-1}, /*keepdim=*/true);
          at::bmm_out(oc, scores, vh);
          oc.div_(row_sum);
          if (want_lse) l.copy_(row_sum.squeeze(-1).log().add_(row_max.squeeze(-1)).add_(shift));
        }
      }
    }
  }
  return {out, lse};
}

bool attention_over_own_and_reference_cpu(const at::Tensor& q, const at::Tensor& k_own, const at::Tensor& v_own,
                                          const at::Tensor& k_ref, const at::Tensor& v_ref, double scale,
                                          double ref_ratio, double ref_shift, const AttentionOptions& options,
                                          const at::Tensor& out) {
  const std::initializer_list<const at::Tensor*> inputs{&q, &k_own, &v_own, &k_ref, &v_ref};
  const at::ScalarType dtype = q.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16) return false;
  for (const at::Tensor* t : inputs) {
    if (!t->is_cpu() || t->scalar_type() != dtype || t->dim() != 4) return false;
  }
  if (!out.is_cpu() || out.scalar_type() != at::kFloat || out.dim() != 4) return false;
  if (!detail::fast_exp_rows_available() || out.sizes() != at::IntArrayRef({q.size(0), q.size(1), q.size(2),
                                                                             v_own.size(3)})) {
    return false;
  }
  check_attention_inputs(q, k_own, v_own, "attention_over_own_and_reference", /*allow_kv_broadcast=*/false);
  check_attention_inputs(q, k_ref, v_ref, "attention_over_own_and_reference", /*allow_kv_broadcast=*/true);
  if (q.size(2) == 0) return true;
  return tiled_attention_cpu(q,
                             {KeyBlock{k_own, v_own},
                              KeyBlock{k_ref, v_ref, static_cast<float>(ref_ratio), static_cast<float>(ref_shift)}},
                             out, at::Tensor(), scale, 0.0, options.max_score_elements);
}

}  // namespace detail

at::Tensor scaled_dot_product_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                        const AttentionOptions& options, bool upcast) {
  detail::check_attention_inputs(q, k, v, "scaled_dot_product_attention", /*allow_kv_broadcast=*/false);
  const bool to_float = upcast && is_reduced_float(q.scalar_type());
  const bool grad = needs_grad(q, k, v);
  const at::Tensor qc = to_float ? q.to(at::kFloat) : q;
  const at::Tensor kc = to_float ? k.to(at::kFloat) : k;
  const at::Tensor vc = to_float ? v.to(at::kFloat) : v;
#if STYLEALIGNED_HAS_SDPA
  // libtorch's fused kernel where it is the better choice: on accelerators (flash / memory-efficient kernels) and
  // under autograd. CPU inference stays on our chunked kernel: an exact memory bound and the fused exp pass, where
  // the CPU math fallback of 2.0/2.1 would build every score.
  if (!q.is_cpu() || grad) {
    const int64_t nq = q.size(2);
    const int64_t chunk = compat::sdpa_may_materialise_scores(q)
                              ? query_chunk(nq, k.size(2), q.size(0) * q.size(1), options.max_score_elements)
                              : nq;
    std::vector<at::Tensor> outs;
    for (int64_t s = 0; s < nq; s += chunk) {
      outs.push_back(compat::sdpa(qc.narrow(2, s, std::min(chunk, nq - s)), kc, vc, scale));
    }
    at::Tensor out = outs.size() == 1 ? outs[0] : at::cat(outs, 2);
    return out.to(q.scalar_type());
  }
#endif
  if (grad) return autograd_attention(qc, kc, vc, scale, 0.0, options, /*want_lse=*/false).out.to(q.scalar_type());
  return detail::chunked_attention(qc, kc, vc, scale, 0.0, options, /*want_lse=*/false, upcast).out.to(q.scalar_type());
}

AttentionWithLse attention_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                    double logit_shift, const AttentionOptions& options) {
  detail::check_attention_inputs(q, k, v, "attention_with_lse", /*allow_kv_broadcast=*/true);
  if (!std::isfinite(scale) || !std::isfinite(logit_shift)) {
    throw Error(fmt::format("attention_with_lse: scale ({}) and logit_shift ({}) must be finite", scale, logit_shift));
  }
  detail::KernelResult r;
  if (needs_grad(q, k, v)) {
    const bool to_float = is_reduced_float(q.scalar_type());
    r = autograd_attention(to_float ? q.to(at::kFloat) : q, to_float ? k.to(at::kFloat) : k,
                           to_float ? v.to(at::kFloat) : v, scale, logit_shift, options, /*want_lse=*/true);
    r.lse = r.lse.to(at::kFloat);
  } else {
    r = detail::chunked_attention(q, k, v, scale, logit_shift, options, /*want_lse=*/true, /*upcast=*/true);
  }
  return {r.out, r.lse};
}

at::Tensor merge_attention(const AttentionWithLse& a, const AttentionWithLse& b) {
  if (!a.out.defined() || !b.out.defined() || !a.lse.defined() || !b.lse.defined()) {
    throw Error("merge_attention: both results need out and lse");
  }
  if (a.out.sizes() != b.out.sizes() || a.lse.sizes() != b.lse.sizes() ||
      a.lse.sizes() != a.out.sizes().slice(0, a.out.dim() - 1)) {
    throw Error(fmt::format("merge_attention: shapes do not fit: out {} and {}, lse {} and {}", shape_of(a.out),
                            shape_of(b.out), shape_of(a.lse), shape_of(b.lse)));
  }
  // With m = max(lse_a, lse_b): w_a = e^{lse_a - m}, w_b = e^{lse_b - m} (one of them is exactly 1, neither can
  // overflow), out = (w_a out_a + w_b out_b) / (w_a + w_b) = out_b + (w_a / (w_a + w_b)) (out_a - out_b).
  const at::Tensor m = at::maximum(a.lse, b.lse);
  const at::Tensor wa = (a.lse - m).exp_();
  const at::Tensor wb = (b.lse - m).exp_();
  const at::Tensor weight_a = (wa / (wa + wb)).unsqueeze(-1).to(a.out.scalar_type());
  return at::lerp(b.out, a.out, weight_a);
}

at::Tensor DefaultAttentionProcessor::attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const AttentionCall& call) {
  return scaled_dot_product_attention(q, k, v, call.scale, options_, call.upcast);
}

std::shared_ptr<AttentionProcessor> default_attention_processor() {
  static const std::shared_ptr<AttentionProcessor> instance = std::make_shared<DefaultAttentionProcessor>();
  return instance;
}

// ---- ProcessorMap ----------------------------------------------------------------------------------------------

namespace {
constexpr std::string_view kProcessorSuffix = ".processor";

std::string_view strip_processor_suffix(std::string_view name) {
  if (name.size() > kProcessorSuffix.size() &&
      name.substr(name.size() - kProcessorSuffix.size()) == kProcessorSuffix) {
    name.remove_suffix(kProcessorSuffix.size());
  }
  return name;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

std::vector<std::string> select_by_suffix(const std::vector<std::string>& layers, std::string_view suffix) {
  std::vector<std::string> out;
  for (const auto& name : layers) {
    if (ends_with(strip_processor_suffix(name), suffix)) out.push_back(name);
  }
  return out;
}
}  // namespace

ProcessorMap::ProcessorMap(std::vector<std::string> layers, std::shared_ptr<AttentionProcessor> fallback)
    : fallback_(fallback ? std::move(fallback) : default_attention_processor()) {
  layers_.reserve(layers.size());
  for (auto& name : layers) {
    std::string plain(strip_processor_suffix(name));
    if (plain.empty()) throw Error("ProcessorMap: empty layer name");
    if (std::find(layers_.begin(), layers_.end(), plain) != layers_.end()) {
      throw Error(fmt::format("ProcessorMap: layer '{}' is listed twice", plain));
    }
    layers_.push_back(std::move(plain));
  }
  processors_.assign(layers_.size(), fallback_);
}

size_t ProcessorMap::index_of(std::string_view layer) const {
  const std::string_view plain = strip_processor_suffix(layer);
  const auto it = std::find(layers_.begin(), layers_.end(), plain);
  if (it == layers_.end()) {
    throw Error(fmt::format("ProcessorMap: no attention layer named '{}' (the model has {} attention layers{}{})",
                            layer, layers_.size(), layers_.empty() ? "" : ", e.g. ",
                            layers_.empty() ? "" : layers_.front()));
  }
  return static_cast<size_t>(it - layers_.begin());
}

bool ProcessorMap::contains(std::string_view layer) const {
  return std::find(layers_.begin(), layers_.end(), strip_processor_suffix(layer)) != layers_.end();
}

void ProcessorMap::set(std::string_view layer, std::shared_ptr<AttentionProcessor> processor) {
  const size_t i = index_of(layer);
  if (!processor) throw Error(fmt::format("ProcessorMap::set: null processor for layer '{}'", layer));
  processors_[i] = std::move(processor);
}

void ProcessorMap::set(const std::vector<std::string>& layers, const std::shared_ptr<AttentionProcessor>& processor) {
  // Validate every name first so a bad list leaves the map unchanged.
  std::vector<size_t> indices;
  indices.reserve(layers.size());
  for (const auto& name : layers) indices.push_back(index_of(name));
  if (!processor) throw Error("ProcessorMap::set: null processor");
  for (size_t i : indices) processors_[i] = processor;
}

void ProcessorMap::set_all(const std::shared_ptr<AttentionProcessor>& processor) {
  if (!processor) throw Error("ProcessorMap::set_all: null processor");
  std::fill(processors_.begin(), processors_.end(), processor);
}

void ProcessorMap::reset() { std::fill(processors_.begin(), processors_.end(), fallback_); }

AttentionProcessor& ProcessorMap::at(std::string_view layer) const { return *processors_[index_of(layer)]; }

std::shared_ptr<AttentionProcessor> ProcessorMap::get(std::string_view layer) const {
  return processors_[index_of(layer)];
}

std::vector<std::string> select_self_attention(const std::vector<std::string>& layers) {
  return select_by_suffix(layers, "attn1");
}

std::vector<std::string> select_cross_attention(const std::vector<std::string>& layers) {
  return select_by_suffix(layers, "attn2");
}

}  // namespace stylealigned
