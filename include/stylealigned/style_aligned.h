// stylealigned/style_aligned.h: StyleAligned shared attention (Hertz et al., CVPR 2024) as an AttentionProcessor.
//
// Every target row of a group attends to its own tokens and to its group's reference tokens, after AdaIN of its
// queries and keys to the reference's per-channel statistics. The numbers reproduce the official `sa_handler.py`
// (see docs: STYLEALIGNED_SPEC sections 2.3-2.8), but memory stays linear in the token count: the own and the
// reference key blocks are attended separately and merged by log-sum-exp, so no [tokens x 2 tokens] score tensor
// ever exists.
//
//   stylealigned::StyleAlignedOptions opts = stylealigned::StyleAlignedOptions::sdxl_demo();
//   auto processor = std::make_shared<stylealigned::StyleAlignedProcessor>(opts);
//   stylealigned::install_style_aligned(unet.processors(), opts);   // or processor->attend(q, k, v, call) directly
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "stylealigned/attention.h"

namespace stylealigned {

/// Every field of the official `StyleAlignedArgs`, same names and defaults.
struct StyleAlignedOptions {
  /// GroupNorm statistics of each target are taken jointly over its own and its reference's feature map.
  bool share_group_norm = true;
  /// Accepted for API parity; a numerical no-op (LayerNorm normalises each token on its own).
  bool share_layer_norm = true;
  /// Targets attend to their reference's keys and values as well as their own.
  bool share_attention = true;
  bool adain_queries = true;
  bool adain_keys = true;
  bool adain_values = false;
  /// Ablation: every row attends to all tokens of all rows of its group; no AdaIN, scale or shift.
  bool full_attention_share = false;
  /// λ: multiplies the logits of reference keys in target rows.
  double shared_score_scale = 1.0;
  /// s: added to the logits of reference keys in target rows (ln 2 makes each reference token count double).
  double shared_score_shift = 0.0;
  /// Fraction of self-attention layers left unshared, laid out as the official `_get_switch_vec`.
  double only_self_level = 0.0;

  /// The official SDXL demo and text-to-image notebook: norms not shared, attention with AdaIN on q and k.
  static StyleAlignedOptions sdxl_demo();
  /// The official transfer notebook: shared norms, shift ln 2.
  static StyleAlignedOptions transfer_notebook();

  /// Sets one field by its name above from text ("true"/"false"/"1"/"0" for flags, a number for the rest), so
  /// command lines and config files can name options without a flag per field (the study tool's arm overrides).
  /// Throws stylealigned::Error naming the field for an unknown name or a value that does not parse.
  void set(const std::string& field, const std::string& value);
  /// One field by name and value, in declaration order: flags as bool, the rest as double.
  struct Field {
    std::string name;
    std::variant<bool, double> value;
  };
  /// Every field with its value, so settings files and logs list them without naming each one again (names as in
  /// set(): a file written from fields() reads back through set()).
  std::vector<Field> fields() const;
  /// Copies the named fields (names as in set()) from `from`, leaving the others: defaults overlaid with what a user
  /// gave. Throws stylealigned::Error naming an unknown field.
  void assign(const StyleAlignedOptions& from, const std::vector<std::string>& fields);

  /// Throws stylealigned::Error naming the option for non-finite or out-of-range values.
  void validate() const;
  std::string to_string() const;
};

// ---- The tensor helpers of sa_handler.py, generalised to explicit groups. Tensors are [batch, ..., tokens, dim].

/// Per-channel mean and std over the token axis (-2): std = sqrt(unbiased var + eps). Shapes [..., 1, dim].
std::pair<at::Tensor, at::Tensor> calc_mean_std(const at::Tensor& feat, double eps = 1e-5);
/// Every row replaced by its group's reference row; target rows are multiplied by `scale`, reference rows are not.
at::Tensor expand_first(const at::Tensor& feat, const BatchLayout& layout, double scale = 1.0);
/// [feat ; expand_first(feat, scale)] along `dim`.
at::Tensor concat_first(const at::Tensor& feat, int64_t dim, const BatchLayout& layout, double scale = 1.0);
/// AdaIN of every row to its group's reference statistics (reference rows are returned unchanged).
at::Tensor adain(const at::Tensor& feat, const BatchLayout& layout);

/// The official `_get_switch_vec(total, level)`: true = that self-attention layer is NOT shared (keeps the default
/// processor). Throws stylealigned::Error (naming only_self_level and the layer count) for the levels where the
/// official code divides by zero.
std::vector<bool> only_self_level_switch(int64_t self_layers, double level);

/// Shared self-attention. Cross-attention calls (and rows of single-row groups) get plain attention. The reference
/// row of each group is computed as plain self-attention. Inference only (no autograd guarantees).
class StyleAlignedProcessor : public AttentionProcessor {
 public:
  explicit StyleAlignedProcessor(StyleAlignedOptions options, AttentionOptions attention = {});
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const AttentionCall& call) override;
  std::string name() const override { return "style_aligned"; }
  const StyleAlignedOptions& options() const { return options_; }

 private:
  StyleAlignedOptions options_;
  AttentionOptions attention_;
};

/// GroupNorm whose target rows use statistics joint over their own and their reference's values (official shared
/// GroupNorm, STYLEALIGNED_SPEC 2.7). Reference rows and single-row groups are plain GroupNorm.
class SharedGroupNorm : public NormHook {
 public:
  at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                        double eps, const BatchLayout& layout) override;
};

/// Installs StyleAligned on a model's processor map: a StyleAlignedProcessor on every self-attention layer that
/// `only_self_level` leaves shared, the default processor elsewhere. Returns the norm hook the model should use
/// (a SharedGroupNorm if `share_group_norm`, else nullptr).
std::shared_ptr<NormHook> install_style_aligned(ProcessorMap& processors, const StyleAlignedOptions& options,
                                                AttentionOptions attention = {});

}  // namespace stylealigned
