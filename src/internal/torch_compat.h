// The one place that knows which libtorch we are built against (Debian's 1.13 here, 2.x with CUDA elsewhere).
#pragma once

#include <torch/csrc/api/include/torch/version.h>

#include <ATen/core/Tensor.h>

#include <cmath>

#if TORCH_VERSION_MAJOR >= 2
#define STYLEALIGNED_HAS_SDPA 1
#include <ATen/ops/scaled_dot_product_attention.h>
#else
#define STYLEALIGNED_HAS_SDPA 0
#endif

namespace stylealigned::compat {

#if STYLEALIGNED_HAS_SDPA
/// libtorch's fused softmax(q kᵀ · scale) v. The `scale` argument exists from 2.1; 2.0 always uses head_dim^-1/2,
/// so there q is pre-multiplied to get the requested scale.
inline at::Tensor sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 1
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/false, scale);
#else
  const double builtin_scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  return at::scaled_dot_product_attention(q * (scale / builtin_scale), k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                          /*is_causal=*/false);
#endif
}

/// Whether sdpa() may build the whole score matrix for inputs on this device, so the caller should chunk queries.
/// CUDA picks flash / memory-efficient kernels; the CPU math fallback materialises scores before 2.2's CPU flash
/// kernel (which can still fall back for some shapes), so on CPU we always chunk.
inline bool sdpa_may_materialise_scores(const at::Tensor& q) { return !q.is_cuda(); }
#endif

}  // namespace stylealigned::compat
