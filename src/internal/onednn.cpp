#include "internal/onednn.h"

#include "stylealigned/runtime.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>

#include <cstdlib>
#include <cstring>
#include <string>

#if STYLEALIGNED_HAS_ONEDNN
#include <dnnl.hpp>

#include <initializer_list>
#include <mutex>
#include <unordered_map>
#include <vector>
#endif

namespace stylealigned::detail::onednn {

#if !STYLEALIGNED_HAS_ONEDNN

bool enabled() { return false; }
at::Tensor linear(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return {}; }
at::Tensor geglu(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return {}; }
at::Tensor conv2d(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t) { return {}; }
bool bmm_out(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return false; }
struct PackedConvWeights::State {};
PackedConvWeights::PackedConvWeights() : state_(std::make_shared<State>()) {}
at::Tensor conv2d_packed(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                         const PackedConvWeights&) {
  return {};
}
bool pack_conv_weights(at::ScalarType) { return false; }
struct GemmPlan::Impl {};
void GemmPlan::run(const void*, const void*, float*) const {}
std::unique_ptr<GemmPlan> plan_gemm(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float,
                                    float, bool, bool) {
  return nullptr;
}

#else

namespace {

using dims = dnnl::memory::dims;
using md = dnnl::memory::desc;
constexpr auto f32 = dnnl::memory::data_type::f32;

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& cpu_stream() {
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

// One cached primitive with the memory descriptors its arguments are created from. `usable` is false when oneDNN
// offers only its reference implementation (or none): those shapes go back to ATen, remembered so it is asked once.
struct Entry {
  bool usable = false;
  dnnl::primitive primitive;
  md src, weights, bias, dst;
  md scratchpad;  // only for primitives made with a user scratchpad (GemmPlan)
};

// Keys are the primitive kind plus every dim and stride that defines it. The UNet has ~100 distinct shapes per
// resolution; the bound only guards a host that feeds endless new shapes.
class PrimitiveCache {
 public:
  template <class Make>
  Entry get(const std::vector<int64_t>& key, Make make) {
    const std::string k(reinterpret_cast<const char*>(key.data()), key.size() * sizeof(int64_t));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = map_.find(k);
      if (it != map_.end()) return it->second;
    }
    Entry e;
    try {
      e = make();
    } catch (const dnnl::error&) {
      e = Entry{};  // unsupported configuration: ATen takes it
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (map_.size() >= kMaxEntries) map_.clear();
    map_.emplace(k, e);
    return e;
  }

 private:
  static constexpr size_t kMaxEntries = 4096;
  std::mutex mutex_;
  std::unordered_map<std::string, Entry> map_;
};

PrimitiveCache& cache() {
  static PrimitiveCache c;
  return c;
}

bool fast_impl(const dnnl::primitive_desc_base& pd) {
  const std::string impl = pd.impl_info_str();
  return impl.rfind("ref", 0) != 0;
}

bool plain_fp32_cpu(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided;
}

// fp32 or bf16 CPU strided tensors, all of one dtype (bias may be undefined): that dtype, else `undef`.
dnnl::memory::data_type product_dtype(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  auto ok = [](const at::Tensor& t) { return t.defined() && t.device().is_cpu() && t.layout() == at::kStrided; };
  if (!ok(x) || !ok(w) || x.scalar_type() != w.scalar_type() ||
      (bias.defined() && (!ok(bias) || bias.scalar_type() != x.scalar_type()))) {
    return dnnl::memory::data_type::undef;
  }
  if (x.scalar_type() == at::kFloat) return dnnl::memory::data_type::f32;
  // Without native bf16 oneDNN would emulate it slowly; ATen then keeps the case (and the tool runs fp32 there).
  if (x.scalar_type() == at::kBFloat16 && cpu_has_native_bf16()) return dnnl::memory::data_type::bf16;
  return dnnl::memory::data_type::undef;
}

bool under_autograd(std::initializer_list<const at::Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : ts) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

// The stride between consecutive rows when x [..., K] is one [rows, K] matrix with unit element stride; -1 if not.
int64_t uniform_row_stride(const at::Tensor& x) {
  const int64_t d = x.dim();
  if (d < 2 || x.stride(d - 1) != 1) return -1;
  const int64_t row = x.stride(d - 2);
  int64_t expected = row;
  for (int64_t i = d - 2; i >= 0; --i) {
    if (x.size(i) != 1 && x.stride(i) != expected) return -1;
    expected *= x.size(i);
  }
  return row;
}

// `post_op_src` is the second operand of a binary first post-op, laid out as the destination.
void execute(const Entry& e, void* src, void* weights, void* bias, void* dst, void* post_op_src = nullptr) {
  auto& engine = cpu_engine();
  dnnl::memory src_m(e.src, engine, src), weights_m(e.weights, engine, weights), dst_m(e.dst, engine, dst);
  std::unordered_map<int, dnnl::memory> args{
      {DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, weights_m}, {DNNL_ARG_DST, dst_m}};
  if (bias != nullptr) args.emplace(DNNL_ARG_BIAS, dnnl::memory(e.bias, engine, bias));
  if (post_op_src != nullptr) {
    args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, dnnl::memory(e.dst, engine, post_op_src));
  }
  e.primitive.execute(cpu_stream(), args);
  cpu_stream().wait();
}

}  // namespace

bool enabled() {
  static const bool on = [] {
    const char* v = std::getenv("STYLEALIGNED_ONEDNN");
    return !(v != nullptr && std::string(v) == "0");
  }();
  return on;
}

namespace {

// x [..., K] as one [m, K] matrix with row stride lda, times wᵀ for a contiguous w [N, K] (+ bias [N]).
struct WeightProduct {
  dnnl::memory::data_type dt = dnnl::memory::data_type::undef;  // undef: not oneDNN's case
  int64_t m = 0, k = 0, lda = 0;
};

WeightProduct weight_product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const auto dt = product_dtype(x, w, bias);
  if (!enabled() || dt == dnnl::memory::data_type::undef || under_autograd({&x, &w, &bias}) || w.dim() != 2 ||
      !w.is_contiguous() || x.size(-1) != w.size(1) ||
      (bias.defined() && (bias.dim() != 1 || bias.size(0) != w.size(0) || !bias.is_contiguous()))) {
    return {};
  }
  const int64_t lda = uniform_row_stride(x);
  const int64_t k = w.size(1), m = x.numel() / std::max<int64_t>(k, 1);
  if (lda < 0 || m == 0 || k == 0 || w.size(0) == 0) return {};
  return {dt, m, k, lda};
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const WeightProduct p = weight_product(x, w, bias);
  if (p.dt == dnnl::memory::data_type::undef) return {};
  const auto dt = p.dt;
  const int64_t k = p.k, n = w.size(0), m = p.m, lda = p.lda;
  const std::vector<int64_t> key{1, m, k, n, lda, bias.defined() ? 1 : 0, static_cast<int64_t>(dt)};
  const Entry e = cache().get(key, [&] {
    Entry r;
    r.src = md(dims{m, k}, dt, dims{lda, 1});
    r.weights = md(dims{k, n}, dt, dims{1, k});  // w [N, K] row-major is wᵀ [K, N] column-major: no copy
    r.dst = md(dims{m, n}, dt, dims{n, 1});
    if (bias.defined()) r.bias = md(dims{1, n}, dt, dims{n, 1});
    const dnnl::matmul::primitive_desc pd(
        bias.defined() ? dnnl::matmul::desc(r.src, r.weights, r.bias, r.dst) : dnnl::matmul::desc(r.src, r.weights, r.dst),
        cpu_engine());
    r.usable = fast_impl(pd);
    if (r.usable) r.primitive = dnnl::matmul(pd);
    return r;
  });
  if (!e.usable) return {};
  RECORD_FUNCTION("stylealigned::linear", std::vector<c10::IValue>());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  execute(e, x.data_ptr(), w.data_ptr(), bias.defined() ? bias.data_ptr() : nullptr, y.data_ptr());
  return y;
}

at::Tensor geglu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  if (!bias.defined() || w.dim() != 2 || w.size(0) % 2 != 0) return {};
  const WeightProduct p = weight_product(x, w, bias);
  if (p.dt == dnnl::memory::data_type::undef) return {};
  const auto dt = p.dt;
  const int64_t k = p.k, n = w.size(0) / 2, m = p.m;
  // One half's product [m, k]·[k, n] with w's rows as the columns of a column-major [k, n] (no copy), then the
  // gate's gelu or the multiply by the gate.
  auto make = [&](bool gate) {
    return cache().get({gate ? 6 : 7, m, k, n, p.lda, static_cast<int64_t>(dt)}, [&] {
      Entry r;
      r.src = md(dims{m, k}, dt, dims{p.lda, 1});
      r.weights = md(dims{k, n}, dt, dims{1, k});
      r.bias = md(dims{1, n}, dt, dims{n, 1});
      r.dst = md(dims{m, n}, dt, dims{n, 1});
      dnnl::post_ops ops;
      if (gate) {
        ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_gelu_erf, 0.0f, 0.0f);
      } else {
        ops.append_binary(dnnl::algorithm::binary_mul, r.dst);
      }
      dnnl::primitive_attr attr;
      attr.set_post_ops(ops);
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(r.src, r.weights, r.bias, r.dst), attr, cpu_engine());
      r.usable = fast_impl(pd);
      if (r.usable) r.primitive = dnnl::matmul(pd);
      return r;
    });
  };
  const Entry gate_e = make(true);
  if (!gate_e.usable) return {};
  const Entry value_e = make(false);
  if (!value_e.usable) return {};
  RECORD_FUNCTION("stylealigned::geglu", std::vector<c10::IValue>());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor gate = at::empty(shape, x.options());
  at::Tensor y = at::empty(shape, x.options());
  const int64_t elem = x.element_size();
  char* w_ptr = static_cast<char*>(w.data_ptr());
  char* b_ptr = static_cast<char*>(bias.data_ptr());
  execute(gate_e, x.data_ptr(), w_ptr + n * k * elem, b_ptr + n * elem, gate.data_ptr());
  execute(value_e, x.data_ptr(), w_ptr, b_ptr, y.data_ptr(), gate.data_ptr());
  return y;
}

namespace {

// A cached convolution primitive and its output shape.
struct ConvCall {
  Entry entry;
  int64_t n = 0, o = 0, oh = 0, ow = 0;
};

// The primitive for x * w (+ bias) in the plain layout (NCHW activations, OIHW weights as stored: x must be
// NCHW-contiguous) or the packed one (NHWC activations, weights in the blocked layout oneDNN picks, read from
// entry.weights: x may be NCHW- or channels-last-contiguous). Unusable entry: oneDNN does not take the call.
ConvCall conv_call(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t stride, int64_t padding,
                   bool packed) {
  const auto dt = product_dtype(x, w, bias);
  const bool x_layout_ok =
      packed ? x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast) : x.is_contiguous();
  if (!enabled() || dt == dnnl::memory::data_type::undef || under_autograd({&x, &w, &bias}) || x.dim() != 4 ||
      w.dim() != 4 || !x_layout_ok || !w.is_contiguous() || x.size(1) != w.size(1) || w.size(2) != w.size(3) ||
      stride < 1 || padding < 0 ||
      (bias.defined() && (bias.dim() != 1 || bias.size(0) != w.size(0) || !bias.is_contiguous()))) {
    return {};
  }
  ConvCall call;
  const int64_t c = x.size(1), h = x.size(2), wd = x.size(3), kk = w.size(2);
  call.n = x.size(0);
  call.o = w.size(0);
  call.oh = (h + 2 * padding - kk) / stride + 1;
  call.ow = (wd + 2 * padding - kk) / stride + 1;
  const int64_t n = call.n, o = call.o, oh = call.oh, ow = call.ow;
  if (n == 0 || oh <= 0 || ow <= 0) return {};
  const std::vector<int64_t> key{packed ? 5 : 2, n, c, h, wd, o, kk, stride, padding, bias.defined() ? 1 : 0,
                                 static_cast<int64_t>(dt)};
  call.entry = cache().get(key, [&] {
    Entry r;
    using tag = dnnl::memory::format_tag;
    const tag activations = packed ? tag::nhwc : tag::nchw;
    r.src = md(dims{n, c, h, wd}, dt, activations);
    // Plain: the gemm-based kernel reads the weight as stored. Packed: oneDNN picks, and the weight is reordered.
    const md weights(dims{o, c, kk, kk}, dt, packed ? tag::any : tag::oihw);
    r.dst = md(dims{n, o, oh, ow}, dt, activations);
    if (bias.defined()) r.bias = md(dims{o}, dt, tag::x);
    const dims strides{stride, stride}, pad{padding, padding};
    const auto desc = bias.defined()
                          ? dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                                            dnnl::algorithm::convolution_direct, r.src, weights,
                                                            r.bias, r.dst, strides, pad, pad)
                          : dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                                            dnnl::algorithm::convolution_direct, r.src, weights,
                                                            r.dst, strides, pad, pad);
    const dnnl::convolution_forward::primitive_desc pd(desc, cpu_engine());
    r.weights = pd.weights_desc();
    r.usable = fast_impl(pd) && pd.src_desc() == r.src && pd.dst_desc() == r.dst && (packed || r.weights == weights);
    if (r.usable) r.primitive = dnnl::convolution_forward(pd);
    return r;
  });
  return call;
}

}  // namespace

at::Tensor conv2d(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t stride, int64_t padding) {
  const ConvCall call = conv_call(x, w, bias, stride, padding, /*packed=*/false);
  if (!call.entry.usable) return {};
  RECORD_FUNCTION("stylealigned::conv2d", std::vector<c10::IValue>());
  at::Tensor y = at::empty({call.n, call.o, call.oh, call.ow}, x.options());
  execute(call.entry, x.data_ptr(), w.data_ptr(), bias.defined() ? bias.data_ptr() : nullptr, y.data_ptr());
  return y;
}

// One reordered copy per weight layout asked for (one in practice: the layout depends on the channel counts and
// the ISA, not on the image size), valid for one (storage, version) of the plain weight.
struct PackedConvWeights::State {
  std::mutex mutex;
  const void* source = nullptr;
  int64_t version = -1;
  std::vector<std::pair<md, at::Tensor>> copies;
};

PackedConvWeights::PackedConvWeights() : state_(std::make_shared<State>()) {}

bool pack_conv_weights(at::ScalarType dtype) {
  if (!enabled()) return false;
  switch (conv_weight_packing()) {
    case ConvWeightPacking::always:
      return true;
    case ConvWeightPacking::never:
      return false;
    case ConvWeightPacking::automatic:
      break;
  }
  return dtype == at::kBFloat16;
}

at::Tensor conv2d_packed(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t stride,
                         int64_t padding, const PackedConvWeights& packed) {
  const ConvCall call = conv_call(x, w, bias, stride, padding, /*packed=*/true);
  const Entry& e = call.entry;
  if (!e.usable) return {};
  RECORD_FUNCTION("stylealigned::conv2d", std::vector<c10::IValue>());

  auto reorder = [&] {
    at::Tensor blocked_copy = at::empty({static_cast<int64_t>(e.weights.get_size())}, w.options().dtype(at::kByte));
    auto& engine = cpu_engine();
    const md stored(dims(w.sizes().begin(), w.sizes().end()), e.weights.data_type(), dnnl::memory::format_tag::oihw);
    dnnl::memory plain(stored, engine, w.data_ptr());
    dnnl::memory blocked(e.weights, engine, blocked_copy.data_ptr());
    dnnl::reorder(plain, blocked).execute(cpu_stream(), plain, blocked);
    cpu_stream().wait();
    return blocked_copy;
  };
  at::Tensor weights;
  if (w.is_inference()) {
    // A weight made under InferenceMode (e.g. converted with .to(dtype) there) has no version counter, so an
    // in-place edit of it could not be told from the cached copy: reorder it on every call instead (a weight-sized
    // copy, small next to the convolution) rather than risk a stale result.
    weights = reorder();
  } else {
    PackedConvWeights::State& s = packed.state();
    std::lock_guard<std::mutex> lock(s.mutex);
    if (s.source != w.data_ptr() || s.version != static_cast<int64_t>(w._version())) {
      s.copies.clear();
      s.source = w.data_ptr();
      s.version = static_cast<int64_t>(w._version());
    }
    for (const auto& [layout, copy] : s.copies) {
      if (layout == e.weights) weights = copy;
    }
    if (!weights.defined()) {
      weights = reorder();
      s.copies.emplace_back(e.weights, weights);
    }
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor src = x.is_contiguous(cl) ? x : x.contiguous(cl);
  at::Tensor y = at::empty({call.n, call.o, call.oh, call.ow}, x.options().memory_format(cl));
  execute(e, src.data_ptr(), weights.data_ptr(), bias.defined() ? bias.data_ptr() : nullptr, y.data_ptr());
  return y;
}

bool bmm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (!enabled() || !plain_fp32_cpu(out) || !plain_fp32_cpu(a) || !plain_fp32_cpu(b) || a.dim() != 3 ||
      b.dim() != 3 || out.dim() != 3) {
    return false;
  }
  const int64_t batch = a.size(0), m = a.size(1), k = a.size(2), n = b.size(2);
  if (b.size(1) != k || (b.size(0) != batch && b.size(0) != 1) || out.size(0) != batch || out.size(1) != m ||
      out.size(2) != n || batch == 0 || m == 0 || n == 0 || k == 0) {
    return false;
  }
  // A broadcast batch is a zero stride to oneDNN's descriptors only through dims of 1, so b keeps its own batch.
  const int64_t bb = b.size(0);
  auto st = [](const at::Tensor& t, int64_t i) { return t.size(i) == 1 ? int64_t{0} : t.stride(i); };
  const std::vector<int64_t> key{3,         batch,     m,         k,         n,         bb,        st(a, 0),
                                 a.stride(1), a.stride(2), st(b, 0), b.stride(1), b.stride(2), st(out, 0), out.stride(1),
                                 out.stride(2)};
  const Entry e = cache().get(key, [&] {
    Entry r;
    auto desc_of = [](const at::Tensor& t) {
      dims strides(t.strides().begin(), t.strides().end());
      for (int64_t i = 0; i < t.dim(); ++i) {
        if (t.size(i) == 1) strides[i] = 0;
      }
      // oneDNN wants a real stride even on a dim of 1; the dense product of the others is always valid there.
      for (int64_t i = 0; i < t.dim(); ++i) {
        if (strides[i] == 0) strides[i] = t.size(1) * t.size(2);
      }
      return md(dims(t.sizes().begin(), t.sizes().end()), f32, strides);
    };
    r.src = desc_of(a);
    r.weights = desc_of(b);
    r.dst = desc_of(out);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(r.src, r.weights, r.dst), cpu_engine());
    r.usable = fast_impl(pd);
    if (r.usable) r.primitive = dnnl::matmul(pd);
    return r;
  });
  if (!e.usable) return false;
  execute(e, a.data_ptr(), b.data_ptr(), nullptr, out.data_ptr());
  return true;
}

struct GemmPlan::Impl {
  Entry entry;
};

void GemmPlan::run(const void* a, const void* b, float* c) const {
  const Entry& e = impl_->entry;
  auto& engine = cpu_engine();
  thread_local std::vector<char> scratch;
  if (scratch.size() < e.scratchpad.get_size()) scratch.resize(e.scratchpad.get_size());
  dnnl::memory a_m(e.src, engine, const_cast<void*>(a)), b_m(e.weights, engine, const_cast<void*>(b));
  dnnl::memory c_m(e.dst, engine, c), s_m(e.scratchpad, engine, scratch.data());
  e.primitive.execute(cpu_stream(), {{DNNL_ARG_SRC, a_m}, {DNNL_ARG_WEIGHTS, b_m}, {DNNL_ARG_DST, c_m},
                                     {DNNL_ARG_SCRATCHPAD, s_m}});
  cpu_stream().wait();
}

std::unique_ptr<GemmPlan> plan_gemm(int64_t m, int64_t n, int64_t k, int64_t a_row, int64_t a_col, int64_t b_row,
                                    int64_t b_col, int64_t c_row, float out_scale, float out_shift, bool accumulate,
                                    bool bf16_inputs) {
  if (!enabled() || m <= 0 || n <= 0 || k <= 0) return nullptr;
  if (bf16_inputs && !cpu_has_native_bf16()) return nullptr;
  const auto in = bf16_inputs ? dnnl::memory::data_type::bf16 : f32;
  if (accumulate && (out_scale != 1.0f || out_shift != 0.0f)) return nullptr;
  const bool affine = out_scale != 1.0f || out_shift != 0.0f;
  auto bits = [](float f) {
    int32_t i;
    std::memcpy(&i, &f, sizeof i);
    return static_cast<int64_t>(i);
  };
  const std::vector<int64_t> key{4,     m, n, k, a_row, a_col, b_row, b_col, c_row, bits(out_scale), bits(out_shift),
                                 accumulate ? 1 : 0, bf16_inputs ? 1 : 0};
  const Entry e = cache().get(key, [&] {
    Entry r;
    r.src = md(dims{m, k}, in, dims{a_row, a_col});
    r.weights = md(dims{k, n}, in, dims{b_row, b_col});
    r.dst = md(dims{m, n}, f32, dims{c_row, 1});
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (affine || accumulate) {
      dnnl::post_ops ops;
      if (accumulate) ops.append_sum(1.0f);
      if (affine) ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_linear, out_scale, out_shift);
      attr.set_post_ops(ops);
    }
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(r.src, r.weights, r.dst), attr, cpu_engine());
    r.usable = fast_impl(pd);
    if (r.usable) {
      r.primitive = dnnl::matmul(pd);
      r.scratchpad = pd.scratchpad_desc();
    }
    return r;
  });
  if (!e.usable) return nullptr;
  auto impl = std::make_shared<GemmPlan::Impl>();
  impl->entry = e;
  return std::make_unique<GemmPlan>(std::move(impl));
}

#endif

}  // namespace stylealigned::detail::onednn
