// The StyleAligned attention formulation for devices with fused attention kernels; internal, but tests call it on
// the CPU to check it against the official formulation (CI has no GPU).
#pragma once

#include <ATen/core/Tensor.h>

#include "stylealigned/attention.h"
#include "stylealigned/style_aligned.h"

namespace stylealigned::detail {

/// StyleAligned self-attention as one attention call per CFG group: each target attends to [own keys ; λ · the
/// reference's keys] after AdaIN, the reference to itself. Needs share_attention, no full_attention_share and
/// shared_score_shift == 0 (throws otherwise). Inputs [batch, heads, tokens, head_dim]; result in q's dtype.
at::Tensor attend_concatenated(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionCall& call,
                               const StyleAlignedOptions& options, const AttentionOptions& attention);

}  // namespace stylealigned::detail
