// Peak resident memory of one piece of work in this process (Linux /proc), for the load benchmark and the load
// memory test (issue 3: peak RSS while loading minus RSS before loading, against the weights' size). Header-only and
// not part of the library: only the benchmark and the tests include it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

namespace stylealigned::internal {

/// The memory fields of /proc/self/status, in MiB; -1 where absent (not Linux).
struct ProcStatus {
  double rss = -1, peak_rss = -1, anon = -1, file = -1;  ///< VmRSS, VmHWM, RssAnon, RssFile
};

/// One read of /proc/self/status, so the fields describe the same moment.
inline ProcStatus read_proc_status() {
  ProcStatus s;
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    const std::string key = line.substr(0, colon);
    double* field = key == "VmRSS" ? &s.rss : key == "VmHWM" ? &s.peak_rss : key == "RssAnon" ? &s.anon
                  : key == "RssFile" ? &s.file : nullptr;
    if (field != nullptr) *field = std::stod(line.substr(colon + 1)) / 1024.0;
  }
  return s;
}

/// Sets the peak RSS (VmHWM) back to the current RSS (Linux 4.0+), so a later peak belongs to what ran since.
inline bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return out.good();
}

/// Bytes of every *.safetensors file below `folder` (links followed: the test model folders are made of links).
inline uint64_t safetensors_bytes(const std::filesystem::path& folder) {
  namespace fs = std::filesystem;
  uint64_t total = 0;
  for (const auto& e : fs::recursive_directory_iterator(folder, fs::directory_options::follow_directory_symlink)) {
    if (e.path().extension() == ".safetensors" && fs::is_regular_file(e.path())) total += fs::file_size(e.path());
  }
  return total;
}

struct MemoryDelta {
  double before_mib = 0;  ///< RSS just before the work
  double peak_mib = 0;    ///< peak RSS during the work
  double after_mib = 0;   ///< RSS after it
  bool peak_reset = false;  ///< false: the peak could not be reset and may predate the work
  /// Of the RSS change: anonymous memory (heap, tensors) and file-backed pages (code and data of the libraries that
  /// the work ran for the first time, page cache of mapped files still touched).
  double anon_change_mib = 0;
  double file_change_mib = 0;
  double increase_mib() const { return peak_mib - before_mib; }
};

/// libtorch initialises lazily (thread pools, BLAS and oneDNN buffers); doing that first keeps it out of a
/// measurement of loading.
inline void warm_up_torch() {
  at::Tensor x = at::randn({1, 8, 16, 16});
  at::Tensor y = at::conv2d(x, at::randn({8, 8, 3, 3}), {}, 1, 1);
  at::Tensor z = at::matmul(y.flatten(1), at::randn({y.flatten(1).size(1), 16}));
  (void)z.sum().item<float>();
  // The conversions and copies loading runs (libtorch code pages, dispatch tables), on tensors of no size to speak of.
  at::Tensor w = at::empty({64, 64});
  w.view({-1}).narrow(0, 0, 1024).copy_(at::ones({1024}, at::kHalf));
  w.copy_(at::ones({64, 64}, at::kBFloat16));
  w.set_data(at::ones({64, 64}, at::kDouble).to(at::kFloat, false, true));
}

/// RSS before, peak RSS during and RSS after `work`.
inline MemoryDelta measure_memory(const std::function<void()>& work) {
  MemoryDelta m;
  m.peak_reset = reset_peak_rss();
  const ProcStatus before = read_proc_status();
  work();
  const ProcStatus after = read_proc_status();
  m.before_mib = before.rss;
  m.peak_mib = after.peak_rss;
  m.after_mib = after.rss;
  m.anon_change_mib = after.anon - before.anon;
  m.file_change_mib = after.file - before.file;
  return m;
}

}  // namespace stylealigned::internal
