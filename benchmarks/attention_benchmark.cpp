// Attention core throughput on SDXL-like shapes: the default processor, the StyleAligned processor and an fp32 GEMM
// measured in the same run, so the attention rate can be stated as a fraction of the machine's GEMM rate.
//
//   build/benchmarks/stylealigned_bench_attention                       # all cases
//   build/benchmarks/stylealigned_bench_attention --benchmark_filter=4096 --benchmark_repetitions=3
//
// Counters: GFLOP/s (useful attention FLOPs: 4·N²·d per head and row and key block, i.e. two GEMMs), GFLOP/cpu_s
// (the same work per CPU-second of all the process's threads: the fair figure on a shared machine), peak_rss_MiB
// (process high-water mark, getrusage), tracked_peak_MiB (highest live CPU-allocator bytes during the call above what
// was live before it: the attention's own working memory, output included). STYLEALIGNED_BENCH_THREADS sets ATen's
// intra-op threads (default: libtorch's own choice). OpenBLAS runs the GEMMs on its own thread pool either way; with
// Debian's OpenBLAS (pthreads) and more than one ATen thread, small ATen elementwise ops right after a GEMM can wait
// for OpenBLAS threads that still spin on the same cores (seen on 2 cores: the merge of two partial results took
// 35 ms instead of 0.8 ms), so compare both settings on a new machine.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <benchmark/benchmark.h>
#include <sys/resource.h>

#include <cstdlib>
#include <string>

#include "stylealigned/attention.h"
#include "stylealigned/batch_layout.h"
#include "stylealigned/runtime.h"
#include "stylealigned/style_aligned.h"
#include "support/tracking_allocator.h"

namespace {

constexpr int64_t kImages = 4;  // 4 images x CFG

// Benchmark arguments: (tokens, heads, head_dim); SDXL's 64x64 level is (4096, 10, 64), SD1.5's (4096, 8, 40).
int64_t heads_of(const benchmark::State& state) { return state.range(1); }
int64_t dim_of(const benchmark::State& state) { return state.range(2); }

// User + system CPU seconds of the whole process (all threads): on a shared machine, GFLOP per CPU-second is the
// load-independent measure of how well the cores we did get were used.
double process_cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  auto secs = [](const timeval& t) { return static_cast<double>(t.tv_sec) + 1e-6 * static_cast<double>(t.tv_usec); };
  return secs(usage.ru_utime) + secs(usage.ru_stime);
}

double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // KiB on Linux
}

struct Qkv {
  at::Tensor q, k, v;
};

// Projected hidden states split into heads as a model does it (a view + transpose, so not contiguous).
Qkv make_qkv(int64_t batch, int64_t tokens, int64_t heads, int64_t dim) {
  at::manual_seed(0);
  at::Tensor x = at::randn({3, batch, tokens, heads * dim});
  auto split = [&](const at::Tensor& t) { return t.view({batch, tokens, heads, dim}).transpose(1, 2); };
  return {split(x[0]), split(x[1]), split(x[2])};
}

sa_test::TrackingAllocator& tracker() {
  static sa_test::ScopedTracking* tracking = new sa_test::ScopedTracking();  // for the whole process
  return tracking->tracker();
}

void report(benchmark::State& state, double flops_per_call, size_t live_before, double cpu_seconds) {
  const double gflop = flops_per_call * 1e-9 * static_cast<double>(state.iterations());
  state.counters["GFLOP/s"] = benchmark::Counter(gflop, benchmark::Counter::kIsRate);
  state.counters["GFLOP/cpu_s"] = gflop / cpu_seconds;
  state.counters["peak_rss_MiB"] = peak_rss_mib();
  state.counters["tracked_peak_MiB"] = static_cast<double>(tracker().peak() - live_before) / (1 << 20);
  state.counters["threads"] = at::get_num_threads();
}

void run_processor(benchmark::State& state, stylealigned::AttentionProcessor& processor, double flops_per_call,
                   at::ScalarType dtype = at::kFloat) {
  at::NoGradGuard no_grad;
  const int64_t tokens = state.range(0), batch = 2 * kImages;
  Qkv x = make_qkv(batch, tokens, heads_of(state), dim_of(state));
  if (dtype != at::kFloat) x = {x.q.to(dtype), x.k.to(dtype), x.v.to(dtype)};
  const auto layout = stylealigned::BatchLayout::cfg(kImages);
  const stylealigned::AttentionCall call{"down_blocks.1.attentions.0.transformer_blocks.0.attn1",
                                         stylealigned::AttentionKind::self_attention, layout,
                                         1.0 / std::sqrt(static_cast<double>(dim_of(state)))};
  tracker().reset_peak();
  const size_t live_before = tracker().live();
  const double cpu_before = process_cpu_seconds();
  for (auto _ : state) {
    at::Tensor out = processor.attend(x.q, x.k, x.v, call);
    benchmark::DoNotOptimize(out.data_ptr());
  }
  report(state, flops_per_call, live_before, process_cpu_seconds() - cpu_before);
}

double attention_flops(const benchmark::State& state, int64_t rows) {
  const auto tokens = static_cast<double>(state.range(0));
  return 4.0 * static_cast<double>(rows * heads_of(state) * dim_of(state)) * tokens * tokens;
}

void BM_default_attention(benchmark::State& state) {
  stylealigned::DefaultAttentionProcessor processor;
  run_processor(state, processor, attention_flops(state, 2 * kImages));
}

// StyleAligned as the SDXL demo runs it: the 2 reference rows do plain attention, the 6 target rows attend to their
// own and their reference's keys (twice the keys), plus AdaIN of q and k.
void BM_style_aligned_attention(benchmark::State& state) {
  stylealigned::StyleAlignedProcessor processor(stylealigned::StyleAlignedOptions::sdxl_demo());
  const int64_t refs = 2, targets = 2 * kImages - refs;
  run_processor(state, processor, attention_flops(state, refs + 2 * targets));
}

// bf16 inputs (a UNet run with --dtype bf16): on a native-bf16 CPU the products take bf16, AdaIN stays fp32 on the
// rows it rewrites. Compare with the default processor's bf16 case of the same shape.
void BM_default_attention_bf16(benchmark::State& state) {
  stylealigned::DefaultAttentionProcessor processor;
  run_processor(state, processor, attention_flops(state, 2 * kImages), at::kBFloat16);
}

void BM_style_aligned_attention_bf16(benchmark::State& state) {
  stylealigned::StyleAlignedProcessor processor(stylealigned::StyleAlignedOptions::sdxl_demo());
  const int64_t refs = 2, targets = 2 * kImages - refs;
  run_processor(state, processor, attention_flops(state, refs + 2 * targets), at::kBFloat16);
}

// The transfer notebook's settings (shift ln 2): same work, the shift is folded into the reference block's lse.
void BM_style_aligned_attention_shift(benchmark::State& state) {
  stylealigned::StyleAlignedProcessor processor(stylealigned::StyleAlignedOptions::transfer_notebook());
  const int64_t refs = 2, targets = 2 * kImages - refs;
  run_processor(state, processor, attention_flops(state, refs + 2 * targets));
}

// fp32 GEMM yardstick: a large square product, the machine's practical GEMM rate.
void BM_gemm_fp32_square(benchmark::State& state) {
  const int64_t n = state.range(0);
  at::Tensor a = at::randn({n, n}), b = at::randn({n, n}), c = at::empty({n, n});
  at::mm_out(c, a, b);  // warm-up: page in the output, start BLAS threads
  tracker().reset_peak();
  const size_t live_before = tracker().live();
  const double cpu_before = process_cpu_seconds();
  for (auto _ : state) {
    at::mm_out(c, a, b);
    benchmark::DoNotOptimize(c.data_ptr());
  }
  report(state, 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n), live_before,
         process_cpu_seconds() - cpu_before);
}

// The attention kernel's own GEMMs at its block size (256 query rows per head against all keys): Q·Kᵀ writes a
// [256 x N] block with an inner dimension of only 64, P·V reads it back.
void BM_gemm_fp32_attention_blocks(benchmark::State& state) {
  const int64_t n = state.range(0), rows = 256, heads = heads_of(state), dim = dim_of(state);
  at::Tensor q = at::randn({heads, rows, dim}), kt = at::randn({heads, dim, n});
  at::Tensor v = at::randn({heads, n, dim});
  at::Tensor s = at::empty({heads, rows, n}), o = at::empty({heads, rows, dim});
  at::bmm_out(s, q, kt);  // warm-up
  at::bmm_out(o, s, v);
  tracker().reset_peak();
  const size_t live_before = tracker().live();
  const double cpu_before = process_cpu_seconds();
  for (auto _ : state) {
    at::bmm_out(s, q, kt);
    at::bmm_out(o, s, v);
    benchmark::DoNotOptimize(o.data_ptr());
  }
  report(state, 4.0 * static_cast<double>(heads * rows * dim) * static_cast<double>(n), live_before,
         process_cpu_seconds() - cpu_before);
}

BENCHMARK(BM_gemm_fp32_square)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(3.0);
BENCHMARK(BM_gemm_fp32_attention_blocks)
    ->Args({4096, 10, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(3.0);
BENCHMARK(BM_default_attention)
    ->Args({1024, 10, 64})
    ->Args({4096, 10, 64})
    ->Args({4096, 8, 40})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_style_aligned_attention)
    ->Args({1024, 10, 64})
    ->Args({4096, 10, 64})
    ->Args({4096, 8, 40})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_default_attention_bf16)->Args({4096, 8, 40})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_style_aligned_attention_bf16)->Args({4096, 8, 40})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_style_aligned_attention_shift)->Args({4096, 10, 64})->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  // Threads from the hardware like the tool and the UNet benchmark (Debian's libtorch starts at 1);
  // STYLEALIGNED_BENCH_THREADS=N for a fixed count.
  const char* env = std::getenv("STYLEALIGNED_BENCH_THREADS");
  stylealigned::configure_threads(env ? std::atoi(env) : 0);
  // The tool's allocator (huge pages for large tensors), then the tracker over it, before any tensor exists.
  const bool large_pages = stylealigned::configure_large_tensor_pages();
  tracker();
  benchmark::AddCustomContext("aten_threads", std::to_string(at::get_num_threads()));
  benchmark::AddCustomContext("large_tensor_pages", large_pages ? "on" : "off");
  benchmark::AddCustomContext("shapes", "batch 8 (2 CFG groups x 4 images); arguments: tokens / heads / head_dim");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
