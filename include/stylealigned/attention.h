// stylealigned/attention.h: the attention-processor interface and the exact, memory-bounded default processor.
//
// A model's attention layer owns its weights (to_q, to_k, to_v, to_out) and delegates the attention itself to an
// AttentionProcessor, as diffusers does. A host application with its own transformer only needs this header and
// style_aligned.h:
//
//   stylealigned::BatchLayout layout = stylealigned::BatchLayout::cfg(n_images);
//   stylealigned::AttentionCall call{"my_block.attn1", stylealigned::AttentionKind::self_attention, layout,
//                                    1.0 / std::sqrt(head_dim)};
//   at::Tensor out = processor->attend(q, k, v, call);   // q, k, v: [batch, heads, tokens, head_dim]
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "stylealigned/batch_layout.h"

namespace stylealigned {

enum class AttentionKind { self_attention, cross_attention };

/// Describes one attention call. It refers to data owned by the caller and is only valid during the call.
struct AttentionCall {
  /// The layer's diffusers module path, e.g. "up_blocks.0.attentions.1.transformer_blocks.3.attn1".
  std::string_view layer;
  AttentionKind kind = AttentionKind::self_attention;
  /// Which rows form each CFG group and which row is each group's reference.
  const BatchLayout& layout;
  /// Multiplier of q·k (diffusers `attn.scale`, head_dim^-0.5 unless configured otherwise).
  double scale = 1.0;
  /// diffusers `upcast_attention`: compute scores and softmax in float32 when q is half precision.
  bool upcast = false;
};

/// The computation of one attention layer after projection and head split.
///
/// `q` is [batch, heads, q_tokens, head_dim]; `k` and `v` are [batch, heads, kv_tokens, head_dim] (kv_tokens differs
/// from q_tokens for cross-attention). Returns [batch, heads, q_tokens, head_dim] in q's dtype. The result need not be
/// contiguous: our kernels lay it out as [batch, q_tokens, heads, head_dim] in memory, so merging the heads back
/// (`out.transpose(1, 2).reshape({batch, q_tokens, heads * head_dim})`) is a view.
class AttentionProcessor {
 public:
  virtual ~AttentionProcessor() = default;
  virtual at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const AttentionCall& call) = 0;
  /// A short name for `stylealigned info` and logs.
  virtual std::string name() const = 0;
};

/// Limits for the attention kernels.
struct AttentionOptions {
  /// Largest score block (elements of q_chunk x kv_tokens, summed over the heads and rows in the block) materialised
  /// at once. The query axis (and the heads) are chunked to stay below it, but one query row's kv_tokens scores always
  /// exist. The result is exact softmax attention, not an approximation. The CPU kernel picks smaller,
  /// cache-friendly blocks on its own (2^20 scores); this is the hard limit.
  int64_t max_score_elements = int64_t{1} << 22;
};

/// softmax(q kᵀ · scale) v, exact, chunked over queries so no more than `options.max_score_elements` scores exist at
/// once. With libtorch >= 2 it uses libtorch's fused scaled_dot_product_attention off the CPU and under autograd; CPU
/// inference (and everything on libtorch 1.13) runs our chunked kernel. Works under autograd. `upcast` computes half
/// and bfloat16 inputs in float32 (on CPU they always are) and casts the result back.
at::Tensor scaled_dot_product_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                        const AttentionOptions& options = {}, bool upcast = false);

/// Attention output together with the log-sum-exp of each query's logits, so two key blocks can be merged exactly:
/// out = (e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b}).
struct AttentionWithLse {
  at::Tensor out;  ///< [batch, heads, q_tokens, head_dim]; float32 for half/bfloat16 inputs, else q's dtype
  at::Tensor lse;  ///< [batch, heads, q_tokens], float32
};

/// Like scaled_dot_product_attention, with `logit_shift` added to every logit, returning the log-sum-exp too.
/// k and v may have batch size 1 while q has more rows (they are broadcast, never copied). Half and bfloat16 inputs
/// are computed in float32 so that merging stays accurate. Works under autograd (a slower, unfused path).
AttentionWithLse attention_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                    double logit_shift = 0.0, const AttentionOptions& options = {});

/// Merges two attention results over disjoint key sets by their log-sum-exp, in the stable form: with
/// m = max(lse_a, lse_b), w = e^{lse - m} for each side, out = (w_a out_a + w_b out_b) / (w_a + w_b).
at::Tensor merge_attention(const AttentionWithLse& a, const AttentionWithLse& b);

/// Plain attention for every layer: what diffusers' AttnProcessor2_0 computes.
class DefaultAttentionProcessor : public AttentionProcessor {
 public:
  explicit DefaultAttentionProcessor(AttentionOptions options = {}) : options_(options) {}
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const AttentionCall& call) override;
  std::string name() const override { return "default"; }

 private:
  AttentionOptions options_;
};

/// A shared default processor instance.
std::shared_ptr<AttentionProcessor> default_attention_processor();

/// Processors per attention layer, keyed by diffusers layer names. The layer list and its order come from the model
/// (diffusers' `attn_processors` order: down_blocks, up_blocks, mid_block; attn1 before attn2 in each block).
class ProcessorMap {
 public:
  ProcessorMap() = default;
  explicit ProcessorMap(std::vector<std::string> layers,
                        std::shared_ptr<AttentionProcessor> fallback = default_attention_processor());

  const std::vector<std::string>& layers() const { return layers_; }
  bool contains(std::string_view layer) const;

  /// Sets the processor of one layer. A trailing ".processor" (diffusers' key form) is accepted. Throws
  /// stylealigned::Error for a layer name the model does not have.
  void set(std::string_view layer, std::shared_ptr<AttentionProcessor> processor);
  void set(const std::vector<std::string>& layers, const std::shared_ptr<AttentionProcessor>& processor);
  void set_all(const std::shared_ptr<AttentionProcessor>& processor);
  /// Every layer back to the fallback (default) processor.
  void reset();

  /// The processor of `layer`; throws stylealigned::Error for an unknown layer.
  AttentionProcessor& at(std::string_view layer) const;
  std::shared_ptr<AttentionProcessor> get(std::string_view layer) const;

 private:
  size_t index_of(std::string_view layer) const;
  std::vector<std::string> layers_;
  std::vector<std::shared_ptr<AttentionProcessor>> processors_;
  std::shared_ptr<AttentionProcessor> fallback_;
};

/// The self-attention layers (module name ends in "attn1"), in the given order.
std::vector<std::string> select_self_attention(const std::vector<std::string>& layers);
/// The cross-attention layers (module name ends in "attn2"), in the given order.
std::vector<std::string> select_cross_attention(const std::vector<std::string>& layers);

/// A GroupNorm replacement hook. Models ask their forward context for one before every GroupNorm; StyleAligned's
/// shared GroupNorm (SharedGroupNorm in style_aligned.h) is the implementation we ship.
class NormHook {
 public:
  virtual ~NormHook() = default;
  /// x is [batch, channels, ...]; weight and bias are [channels] (may be undefined: no affine).
  virtual at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, const BatchLayout& layout) = 0;
};

}  // namespace stylealigned
