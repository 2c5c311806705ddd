#include "internal/softmax_rows.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <limits>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define STYLEALIGNED_X86_AVX2_KERNEL 1
#include <immintrin.h>
#else
#define STYLEALIGNED_X86_AVX2_KERNEL 0
#endif

namespace stylealigned::detail {
namespace {

uint16_t float_to_bf16(float f) { return c10::BFloat16(f).x; }  // c10 rounds to nearest even, NaN stays NaN

// With `correction` (online mode) row_max / row_sum come in holding the running max and sum of earlier key chunks:
// the new max is max(old, chunk), the old sum is rescaled by correction[r] = e^(old max - new max), which the
// caller also applies to its output accumulator.
inline float fold_running(float m, const float* row_max, const float* row_sum, float* correction, int64_t r,
                          float& carried) {
  if (correction == nullptr) {
    carried = 0.0f;
    return m;
  }
  const float old = row_max[r], m_new = std::max(m, old);
  const float c = old == m_new ? 1.0f : std::exp(old - m_new);  // old = -inf on the first chunk: c = 0
  correction[r] = c;
  carried = row_sum[r] * c;
  return m_new;
}

void exp_rows_scalar(float* data, int64_t rows, int64_t cols, int64_t ld, float alpha, float* row_max,
                     float* row_sum, float* correction) {
  for (int64_t r = 0; r < rows; ++r) {
    float* x = data + r * ld;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < cols; ++j) m = std::max(m, alpha * x[j]);
    float carried;
    m = fold_running(m, row_max, row_sum, correction, r, carried);
    double s = carried;
    for (int64_t j = 0; j < cols; ++j) {
      x[j] = std::exp(alpha * x[j] - m);
      s += x[j];
    }
    row_max[r] = m;
    row_sum[r] = static_cast<float>(s);
  }
}

#if STYLEALIGNED_X86_AVX2_KERNEL

// e^x for x <= 0 (the caller subtracts the row max): Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, and
// the Cephes single-precision minimax polynomial for e^r (about 1 ulp). Inputs below -87.3 are clamped there, so
// they give ~1e-38 instead of 0: nothing next to the row maximum's e^0 = 1. NaN stays NaN.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);  // max_ps returns its second operand for NaN: NaN propagates
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

__attribute__((target("avx2,fma"))) inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) void exp_rows_avx2(float* data, int64_t rows, int64_t cols, int64_t ld,
                                                       float alpha, float* row_max, float* row_sum,
                                                       float* correction) {
  const int64_t vec_end = cols - cols % 8;
  const __m256 va = _mm256_set1_ps(alpha);
  for (int64_t r = 0; r < rows; ++r) {
    float* x = data + r * ld;
    __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < vec_end; j += 8) vmax = _mm256_max_ps(vmax, _mm256_mul_ps(va, _mm256_loadu_ps(x + j)));
    float m = hmax(vmax);
    for (int64_t j = vec_end; j < cols; ++j) m = std::max(m, alpha * x[j]);
    float carried;
    m = fold_running(m, row_max, row_sum, correction, r, carried);
    // alpha * x - max in one FMA (the product unrounded: the maximum's exponent is then within half an ulp of
    // max(alpha * x) from 0 rather than exactly 0). Four accumulators keep the float sum short.
    const __m256 vm = _mm256_set1_ps(m);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t j = 0;
    for (; j + 32 <= vec_end; j += 32) {
      const __m256 e0 = exp_nonpositive(_mm256_fmsub_ps(va, _mm256_loadu_ps(x + j), vm));
      const __m256 e1 = exp_nonpositive(_mm256_fmsub_ps(va, _mm256_loadu_ps(x + j + 8), vm));
      const __m256 e2 = exp_nonpositive(_mm256_fmsub_ps(va, _mm256_loadu_ps(x + j + 16), vm));
      const __m256 e3 = exp_nonpositive(_mm256_fmsub_ps(va, _mm256_loadu_ps(x + j + 24), vm));
      _mm256_storeu_ps(x + j, e0);
      _mm256_storeu_ps(x + j + 8, e1);
      _mm256_storeu_ps(x + j + 16, e2);
      _mm256_storeu_ps(x + j + 24, e3);
      s0 = _mm256_add_ps(s0, e0);
      s1 = _mm256_add_ps(s1, e1);
      s2 = _mm256_add_ps(s2, e2);
      s3 = _mm256_add_ps(s3, e3);
    }
    for (; j < vec_end; j += 8) {
      const __m256 e = exp_nonpositive(_mm256_fmsub_ps(va, _mm256_loadu_ps(x + j), vm));
      _mm256_storeu_ps(x + j, e);
      s0 = _mm256_add_ps(s0, e);
    }
    float s = carried + hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; j < cols; ++j) {
      x[j] = std::exp(alpha * x[j] - m);
      s += x[j];
    }
    row_max[r] = m;
    row_sum[r] = s;
  }
}

// The same kernel on 16 lanes: on CPUs with full-width AVX-512 units (Zen 5, Xeons) it halves the exp pass,
// which at head_dim 40 otherwise costs as much as both attention GEMMs together (0.47 ns vs 0.25 ns per score per
// core measured in the SD1.5 attention core on the 2-core EPYC). Its exp is base 2 with AVX-512's scalef: the
// whole SD1.5 4096-token attention core ran 4-6% faster than with the Cephes kernel (interleaved in one process).
// GCC 12 flags the _mm512_undefined_ps() pass-through operands inside its own intrinsics (a known false
// positive); nothing here reads an uninitialised value.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// 2^y for y <= 0: y = n + f, |f| <= 1/2, a degree-6 minimax polynomial for 2^f (relative error 1.9e-9 before
// float rounding, 7.6e-8 after: under 1 ulp, like the AVX2 Cephes kernel above), and scalef for the 2^n, which
// also takes results gracefully through the denormals to 0. With the product by log2 e, ten vector operations
// against the Cephes kernel's fifteen. Clamped at -150, where 2^y is 0 in float, so -inf gives 0 and not NaN;
// max_ps passes a NaN (second operand) through.
__attribute__((target("avx512f"))) inline __m512 exp2_nonpositive16(__m512 y) {
  y = _mm512_max_ps(_mm512_set1_ps(-150.0f), y);
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(1.5345812426e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399930904e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6184890717e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503286421e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022646248e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718246e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// e^d for d = alpha · row - max (one FMA, as in the AVX2 kernel), as 2^(d · log2 e). The product is taken after
// the subtraction: folding log2 e into alpha and the max instead rounds both, which moves d by up to 3e-6 at
// logits of 60 and e^d next to the maximum by as much.
__attribute__((target("avx512f"))) inline __m512 exp_via2(__m512 d) {
  return exp2_nonpositive16(_mm512_mul_ps(d, _mm512_set1_ps(1.44269504088896341f)));
}

__attribute__((target("avx512f"))) void exp_rows_avx512(float* data, int64_t rows, int64_t cols, int64_t ld,
                                                         float alpha, float* row_max, float* row_sum,
                                                         float* correction) {
  const int64_t vec_end = cols - cols % 16;
  const __m512 va = _mm512_set1_ps(alpha);
  for (int64_t r = 0; r < rows; ++r) {
    float* x = data + r * ld;
    __m512 vmax0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vmax1 = vmax0;
    int64_t j = 0;
    for (; j + 32 <= vec_end; j += 32) {
      vmax0 = _mm512_max_ps(vmax0, _mm512_mul_ps(va, _mm512_loadu_ps(x + j)));
      vmax1 = _mm512_max_ps(vmax1, _mm512_mul_ps(va, _mm512_loadu_ps(x + j + 16)));
    }
    for (; j < vec_end; j += 16) vmax0 = _mm512_max_ps(vmax0, _mm512_mul_ps(va, _mm512_loadu_ps(x + j)));
    float m = _mm512_reduce_max_ps(_mm512_max_ps(vmax0, vmax1));
    for (j = vec_end; j < cols; ++j) m = std::max(m, alpha * x[j]);
    float carried;
    m = fold_running(m, row_max, row_sum, correction, r, carried);
    const __m512 vm = _mm512_set1_ps(m);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    j = 0;
    for (; j + 64 <= vec_end; j += 64) {
      const __m512 e0 = exp_via2(_mm512_fmsub_ps(va, _mm512_loadu_ps(x + j), vm));
      const __m512 e1 = exp_via2(_mm512_fmsub_ps(va, _mm512_loadu_ps(x + j + 16), vm));
      const __m512 e2 = exp_via2(_mm512_fmsub_ps(va, _mm512_loadu_ps(x + j + 32), vm));
      const __m512 e3 = exp_via2(_mm512_fmsub_ps(va, _mm512_loadu_ps(x + j + 48), vm));
      _mm512_storeu_ps(x + j, e0);
      _mm512_storeu_ps(x + j + 16, e1);
      _mm512_storeu_ps(x + j + 32, e2);
      _mm512_storeu_ps(x + j + 48, e3);
      s0 = _mm512_add_ps(s0, e0);
      s1 = _mm512_add_ps(s1, e1);
      s2 = _mm512_add_ps(s2, e2);
      s3 = _mm512_add_ps(s3, e3);
    }
    for (; j < vec_end; j += 16) {
      const __m512 e = exp_via2(_mm512_fmsub_ps(va, _mm512_loadu_ps(x + j), vm));
      _mm512_storeu_ps(x + j, e);
      s0 = _mm512_add_ps(s0, e);
    }
    float s = carried + _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    for (; j < cols; ++j) {
      x[j] = std::exp(alpha * x[j] - m);
      s += x[j];
    }
    row_max[r] = m;
    row_sum[r] = s;
  }
}

// fp32 -> bf16, round to nearest even (quiet NaNs, the ones arithmetic makes, stay NaN).
__attribute__((target("avx512f"))) void to_bf16_avx512(const float* src, int64_t n, uint16_t* dst) {
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i x = _mm512_castps_si512(_mm512_loadu_ps(src + j));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), one);
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(bias, lsb)), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm512_cvtepi32_epi16(r));
  }
  for (; j < n; ++j) dst[j] = float_to_bf16(src[j]);
}

#pragma GCC diagnostic pop

bool cpu_has_avx512f() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
  }();
  return has;
}

bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();  // may run before libgcc's own initialiser when called from a static constructor
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

#endif

}  // namespace

bool fast_exp_rows_available() {
#if STYLEALIGNED_X86_AVX2_KERNEL
  return cpu_has_avx2_fma();
#else
  return false;
#endif
}

namespace {

void exp_rows_serial(float* data, int64_t rows, int64_t cols, int64_t ld, float alpha, float* row_max,
                     float* row_sum, float* correction) {
#if STYLEALIGNED_X86_AVX2_KERNEL
  if (fast_exp_rows_available()) {
    if (cpu_has_avx512f()) {
      exp_rows_avx512(data, rows, cols, ld, alpha, row_max, row_sum, correction);
    } else {
      exp_rows_avx2(data, rows, cols, ld, alpha, row_max, row_sum, correction);
    }
    return;
  }
#endif
  exp_rows_scalar(data, rows, cols, ld, alpha, row_max, row_sum, correction);
}

}  // namespace

void exp_rows_inplace(float* data, int64_t rows, int64_t cols, int64_t ld, float alpha, float* row_max,
                      float* row_sum) {
  // About 64k elements per task: enough work to amortise a thread hand-off, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    exp_rows_serial(data + begin * ld, end - begin, cols, ld, alpha, row_max + begin, row_sum + begin, nullptr);
  });
}

void exp_rows_online(float* data, int64_t rows, int64_t cols, int64_t ld, float alpha, float* row_max,
                     float* row_sum, float* correction) {
  exp_rows_serial(data, rows, cols, ld, alpha, row_max, row_sum, correction);
}

void rows_to_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
#if STYLEALIGNED_X86_AVX2_KERNEL
    if (cpu_has_avx512f()) {
      to_bf16_avx512(src + r * ld_src, cols, dst + r * ld_dst);
      continue;
    }
#endif
    for (int64_t j = 0; j < cols; ++j) dst[r * ld_dst + j] = float_to_bf16(src[r * ld_src + j]);
  }
}

}  // namespace stylealigned::detail
