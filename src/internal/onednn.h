// fp32 (and native bf16) CPU inference products through oneDNN's own primitives (not part of the API).
//
// Why not ATen's: Debian's libtorch 1.13 sends fp32 matrix products to OpenBLAS (0.3.21, 140-190 GFLOP/s on a
// 2-core AVX-512 EPYC), while oneDNN's brgemm kernels reach 300-410 GFLOP/s on the same shapes; and its
// convolutions go through ideep, which reorders a plain OIHW weight into a blocked layout on every call (0.6 GB/s:
// a 1280-channel 3x3 convolution at 8x8 ran at 40 GFLOP/s). oneDNN's convolution on the plain NCHW / OIHW layout
// needs no reorder and no second copy of any weight (300 GFLOP/s there). Primitives are made once per shape and
// stride pattern and cached.
//
// Every entry point returns "not done" (undefined tensor / false) instead of computing slowly or wrongly: when the
// library was built without oneDNN (libtorch 2.x builds, the GPU machine), when STYLEALIGNED_ONEDNN=0 is set, when
// the tensors are not fp32 CPU ones, or when oneDNN offers only its reference kernel for the layout. Callers then
// use the ATen op, so results never depend on which path ran beyond summation order.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <utility>

namespace stylealigned::detail::onednn {

/// Built with oneDNN, and STYLEALIGNED_ONEDNN=0 (read once) does not switch it off.
bool enabled();

/// y = x·wᵀ + bias for fp32 or bf16 (all one dtype; bf16 where the CPU runs it natively) CPU x [..., K] whose rows have one stride and unit element stride (any contiguous
/// tensor, or a column slice of one), w [N, K] contiguous, bias [N] or undefined. Not under autograd.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias);

/// diffusers' GEGLU after its projection, (x·wᵥᵀ + bᵥ) ⊙ gelu(x·w_gᵀ + b_g), where w [2I, K] and bias [2I] are the
/// projection's weight and bias as stored (value rows first, gate rows second) and gelu is the exact (erf) one:
/// result [..., I], contiguous. Same constraints on x, w and bias as linear() (bias required). Two products on the
/// two halves of w in place: the gate's gelu runs as oneDNN's post-op on the tile it just computed, and the value
/// product multiplies by the gate as it writes, so neither the [tokens, 2I] projection nor a separate gelu and
/// multiply pass over it exists (16 of them ran at 0.5 G elements/s in an SD1.5 forward: 3.5% of its time).
at::Tensor geglu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias);

/// at::conv2d for fp32 or bf16 (all one dtype) CPU NCHW-contiguous x and OIHW-contiguous w, square stride and zero padding, groups 1.
at::Tensor conv2d(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t stride, int64_t padding);

/// Conv2d weights reordered once into the blocked layout oneDNN's brgconv kernels read (bf16 on this EPYC: 460-550
/// GFLOP/s against 280-360 for the plain-layout gemm kernel; fp32 230-250 against 190-200). One per Conv2d module;
/// copies share the cache. The price is a second copy of the weight, kept while the module lives.
class PackedConvWeights {
 public:
  PackedConvWeights();
  struct State;
  State& state() const { return *state_; }

 private:
  std::shared_ptr<State> state_;
};

/// at::conv2d with the constraints of conv2d() on channels-last activations: x NCHW- or channels-last-contiguous
/// (the former is reordered), result channels-last. Weights come from `packed`, made on the first call and remade
/// when w's storage or version counter changes, so an in-place weight update is never served stale. A weight made
/// under InferenceMode has no version counter: it is reordered on every call, never cached.
at::Tensor conv2d_packed(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t stride,
                         int64_t padding, const PackedConvWeights& packed);

/// Whether Conv2d should take conv2d_packed for activations of `dtype`, under configure_conv_weight_packing().
bool pack_conv_weights(at::ScalarType dtype);

/// out = a·b for fp32 CPU 3-D tensors with any strides, a [B, M, K], b [B, K, N] (b's batch may be 1: broadcast),
/// out [B, M, N] written in place. False: nothing was written.
bool bmm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

/// A planned fp32 product c[m, n] = a[m, k]·b[k, n] on raw pointers with fixed shapes and element strides, made
/// once outside a parallel region and run from inside one (an at::parallel_for body): every run brings its own
/// scratchpad, so concurrent runs do not share state, and oneDNN runs a nested call on the calling thread. This is
/// what lets the attention kernel give each thread whole (query block x all keys) tiles instead of splitting every
/// small product across the cores with a barrier after each.
class GemmPlan {
 public:
  struct Impl;
  explicit GemmPlan(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  void run(const void* a, const void* b, float* c) const;

 private:
  std::shared_ptr<const Impl> impl_;
};

/// Null when oneDNN is off or offers only its reference kernel. Strides are (row, column) in elements. The result
/// is c = out_scale · (a·b) + out_shift, or with `accumulate` c += a·b (out_scale 1, out_shift 0 only). a and b
/// are fp32, or bf16 with `bf16_inputs` (native bf16 CPUs only; c stays fp32, accumulated in fp32).
std::unique_ptr<GemmPlan> plan_gemm(int64_t m, int64_t n, int64_t k, int64_t a_row, int64_t a_col, int64_t b_row,
                                    int64_t b_col, int64_t c_row, float out_scale = 1.0f, float out_shift = 0.0f,
                                    bool accumulate = false, bool bf16_inputs = false);

}  // namespace stylealigned::detail::onednn
