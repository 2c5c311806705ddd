// The chunked exact-attention kernel shared by the default and the StyleAligned processors (not part of the API).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string_view>

#include "stylealigned/attention.h"

namespace stylealigned::detail {

struct KernelResult {
  at::Tensor out;  ///< [batch, heads, q_tokens, v_dim]; memory in [batch, q_tokens, heads, v_dim] order
  at::Tensor lse;  ///< [batch, heads, q_tokens] float32, defined only if asked for
};

/// Throws stylealigned::Error (prefixed by `what`) unless q, k, v are [batch, heads, tokens, dim] tensors that fit
/// together; with `allow_kv_broadcast`, k and v may have batch 1.
void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::string_view what,
                            bool allow_kv_broadcast);

/// Heads and query rows per score block.
struct BlockShape {
  int64_t heads = 1;
  int64_t queries = 1;
};
/// At most max(options limit, one query row) scores per block, sized to stay cache-resident.
BlockShape choose_block(int64_t heads, int64_t q_tokens, int64_t kv_tokens, int64_t max_score_elements);

/// An attention output [batch, heads, tokens, v_dim] viewing [batch, tokens, heads, v_dim] memory, the layout every
/// kernel here writes: the caller's head merge is then a free view.
at::Tensor token_major_output(int64_t batch, int64_t heads, int64_t tokens, int64_t v_dim,
                              const at::TensorOptions& options);

/// softmax(q kᵀ · scale + shift) v without autograd support (uses out= kernels and in-place passes). k and v with
/// batch 1 are broadcast over q's batch. Reduced-precision inputs are computed in float32 when `upcast`, when an lse
/// is wanted, or on CPU; the output keeps the compute dtype.
KernelResult chunked_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                               double shift, const AttentionOptions& options, bool want_lse, bool upcast);

/// softmax over [q·k_ownᵀ · scale ; q·k_refᵀ · scale · ref_ratio + ref_shift] times [v_own ; v_ref], written into
/// `out` ([batch, heads, q_tokens, v_dim] with unit last stride): StyleAligned's target rows in one pass over both
/// key blocks instead of two attention passes and a log-sum-exp merge. k_ref/v_ref may have batch 1. fp32 CPU with
/// oneDNN only; false (nothing written) otherwise, and the caller merges per-block results.
bool attention_over_own_and_reference_cpu(const at::Tensor& q, const at::Tensor& k_own, const at::Tensor& v_own,
                                          const at::Tensor& k_ref, const at::Tensor& v_ref, double scale,
                                          double ref_ratio, double ref_shift, const AttentionOptions& options,
                                          const at::Tensor& out);

}  // namespace stylealigned::detail
