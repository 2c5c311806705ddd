// Helpers the whole-model benchmarks share (stylealigned_bench_unet, stylealigned_bench_vae): timing, process
// memory from the kernel, the dtype flag, and the GEMM yardsticks every rate is reported against.
#pragma once

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "internal/onednn.h"
#include "stylealigned/error.h"

namespace sa_bench {

namespace sa = stylealigned;
using Json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

inline double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

inline std::vector<double> loadavg() {
  std::ifstream in("/proc/loadavg");
  std::vector<double> out(3, -1.0);
  for (double& x : out) in >> x;
  return out;
}

// Process CPU time (user, system) and minor page faults so far: under a loaded machine CPU time shows the work
// better than wall time, and system time + page faults show what fresh large allocations cost.
struct Usage {
  double user = 0.0, system = 0.0, minor_faults = 0.0;
  static Usage now() {
    rusage r{};
    getrusage(RUSAGE_SELF, &r);
    auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + 1e-6 * static_cast<double>(t.tv_usec); };
    return {sec(r.ru_utime), sec(r.ru_stime), static_cast<double>(r.ru_minflt)};
  }
  Usage operator-(const Usage& o) const { return {user - o.user, system - o.system, minor_faults - o.minor_faults}; }
};

inline double peak_rss_mb() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // Linux reports KiB
}

// VmHWM / VmRSS from /proc/self/status, in MiB (-1 if unavailable).
inline double status_mb(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.compare(0, key.size(), key) == 0 && line.size() > key.size() && line[key.size()] == ':') {
      return std::stod(line.substr(key.size() + 1)) / 1024.0;
    }
  }
  return -1.0;
}

// Resets the kernel's peak-RSS mark (VmHWM) so the forwards' peak can be told apart from the weights' build.
inline bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return static_cast<bool>(out);
}

inline at::ScalarType parse_dtype(const std::string& s) {
  if (s == "fp32") return at::kFloat;
  if (s == "bf16") return at::kBFloat16;
  if (s == "fp16") return at::kHalf;
  throw sa::Error(fmt::format("--dtype: expected fp32, bf16 or fp16, got '{}'", s));
}

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "fp32";
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "fp16";
    default: return "?";
  }
}

// fp32 matrix-product rate (GFLOP/s) of `dtype` n x n x n products on `device`: median of `reps` after a warm-up.
inline double gemm_gflops(at::ScalarType dtype, const at::Device& device, int64_t n = 2048, int reps = 5) {
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  const at::Tensor a = at::randn({n, n}, opts.dtype(at::kFloat)).to(opts);
  const at::Tensor b = at::randn({n, n}, opts.dtype(at::kFloat)).to(opts);
  at::Tensor c = at::mm(a, b);
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    at::mm_out(c, a, b);
    if (device.is_cuda()) (void)c.sum().item<double>();
    times.push_back(seconds_since(t0));
  }
  return 2.0 * static_cast<double>(n) * n * n / median(times) / 1e9;
}

// The same rate through oneDNN's matmul (the kernel the library's fp32 CPU Linear and attention products use), or 0
// where the build has no oneDNN: on CPUs where OpenBLAS is far from the FMA peak this is the truer limit.
inline double onednn_gemm_gflops(int64_t n = 2048, int reps = 5) {
  at::NoGradGuard no_grad;
  const at::Tensor a = at::randn({n, n});
  const at::Tensor b = at::randn({n, n});
  if (!sa::detail::onednn::linear(a, b, {}).defined()) return 0.0;
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    (void)sa::detail::onednn::linear(a, b, {});
    times.push_back(seconds_since(t0));
  }
  return 2.0 * static_cast<double>(n) * n * n / median(times) / 1e9;
}

// --model accepts a diffusers pipeline folder (with `component`/, e.g. unet or vae) or that subfolder itself.
inline std::filesystem::path component_folder(const std::string& model, const std::string& component) {
  const std::filesystem::path dir(model);
  if (std::filesystem::exists(dir / component / "config.json")) return dir / component;
  if (std::filesystem::exists(dir / "config.json")) return dir;
  throw sa::Error(fmt::format("--model {}: neither {} nor {} exists", model,
                              (dir / component / "config.json").string(), (dir / "config.json").string()));
}

inline void print(const Json& j) {
  std::cout << j.dump() << "\n";
  std::cout.flush();
}

}  // namespace sa_bench
