#include "stylealigned/runtime.h"

#include "stylealigned/error.h"

#include <fmt/format.h>

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <unordered_map>

namespace stylealigned {
namespace {
std::string cpuinfo_field(const std::string& key) {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.compare(0, key.size(), key) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 1 + (colon + 1 < line.size() ? 1 : 0));
    }
  }
  return {};
}
constexpr std::size_t kHugePage = std::size_t{2} << 20;

// Lengths of the live large mappings. libtorch frees some buffers through raw_deleter() with the data pointer
// alone (raw_allocate/raw_deallocate in conv and mkldnn paths), so the length cannot live in a DataPtr context.
class MappingTable {
 public:
  void add(void* p, std::size_t length) {
    std::lock_guard<std::mutex> lock(mutex_);
    lengths_.emplace(p, length);
  }
  // The mapping's length, removed from the table; 0 if `p` is not one of ours.
  std::size_t take(void* p) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = lengths_.find(p);
    if (it == lengths_.end()) return 0;
    const std::size_t length = it->second;
    lengths_.erase(it);
    return length;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<void*, std::size_t> lengths_;
};

MappingTable& mappings() {
  static auto* table = new MappingTable();  // never destroyed: tensors may be freed during static destruction
  return *table;
}

// Mappings of dead tensors kept for the next tensor of (about) their size, up to a byte cap. Why: a fresh mapping
// is faulted in one 2 MiB page at a time and the kernel zeroes every page first; a batch-8 SD1.5 forward at 512x512
// allocates ~16 GB of large tensors this way (7.9k huge-page faults), 5-6 s of system CPU per forward. The forward
// repeats the same few sizes, so a small cache serves nearly all of them from pages that are already there.
class MappingCache {
 public:
  // A cached mapping of at least `length` bytes and at most a quarter more, removed from the cache; null if none.
  std::pair<void*, std::size_t> take(std::size_t length) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = free_.lower_bound(length);
    if (it == free_.end() || it->first > length + length / 4) return {nullptr, 0};
    const std::pair<void*, std::size_t> hit{it->second, it->first};
    bytes_ -= it->first;
    free_.erase(it);
    return hit;
  }
  // True if the mapping was kept; false: the caller unmaps it.
  bool keep(void* p, std::size_t length) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (bytes_ + length > cap_) return false;
    free_.emplace(length, p);
    bytes_ += length;
    return true;
  }
  void set_cap(std::size_t cap) {
    std::lock_guard<std::mutex> lock(mutex_);
    cap_ = cap;
  }

 private:
  std::mutex mutex_;
  std::multimap<std::size_t, void*> free_;
  std::size_t bytes_ = 0, cap_ = 0;
};

MappingCache& cached_mappings() {
  static auto* cache = new MappingCache();  // never destroyed, like the table
  return *cache;
}

c10::DeleterFnPtr g_fallback_deleter = nullptr;

void release(void* p) {
  if (p == nullptr) return;
  if (const std::size_t length = mappings().take(p)) {
    if (!cached_mappings().keep(p, length)) ::munmap(p, length);
  } else if (g_fallback_deleter != nullptr) {
    g_fallback_deleter(p);
  }
}

// Large blocks: an anonymous mapping trimmed to a 2 MiB-aligned range (THP only backs aligned ranges), advised
// MADV_HUGEPAGE. Small blocks: the previous allocator, whose heap reuse is already fault-free. Large DataPtrs have
// their data as context and `release` as deleter, the contract raw_allocate() asserts.
class LargePageAllocator final : public c10::Allocator {
 public:
  LargePageAllocator(c10::Allocator* fallback, std::size_t min_bytes) : fallback_(fallback), min_bytes_(min_bytes) {}

  c10::DataPtr allocate(std::size_t n) const override {
    if (n < min_bytes_) return small(n);
    const std::size_t length = (n + kHugePage - 1) / kHugePage * kHugePage;
    if (const auto [p, cached_length] = cached_mappings().take(length); p != nullptr) {
      mappings().add(p, cached_length);
      return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
    }
    void* raw = ::mmap(nullptr, length + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return small(n);  // the fallback reports out-of-memory in libtorch's words
    const auto start = reinterpret_cast<std::uintptr_t>(raw);
    const std::uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
    if (aligned > start) ::munmap(raw, aligned - start);
    const std::uintptr_t tail = start + length + kHugePage - (aligned + length);
    if (tail > 0) ::munmap(reinterpret_cast<void*>(aligned + length), tail);
    void* p = reinterpret_cast<void*>(aligned);
    ::madvise(p, length, MADV_HUGEPAGE);
    mappings().add(p, length);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

 private:
  // Small blocks keep the fallback's own DataPtr (and deleter); only raw_deallocate() of one passes `release`,
  // which hands pointers it does not know to the fallback's deleter.
  c10::DataPtr small(std::size_t n) const { return fallback_->allocate(n); }

  c10::Allocator* fallback_;
  std::size_t min_bytes_;
};

bool transparent_huge_pages_available() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string mode;
  std::getline(in, mode);
  return !mode.empty() && mode.find("[never]") == std::string::npos;
}
}  // namespace

bool configure_large_tensor_pages(std::size_t min_bytes, std::size_t cache_bytes) {
  static std::mutex mutex;
  static bool installed = false;
  std::lock_guard<std::mutex> lock(mutex);
  if (installed) return true;
  const char* env = std::getenv("STYLEALIGNED_HUGE_PAGES");
  if ((env != nullptr && std::string(env) == "0") || !transparent_huge_pages_available()) return false;
  // Lives for the process: tensors allocated through it may outlive any owner we could give it.
  c10::Allocator* fallback = c10::GetCPUAllocator();
  // raw_allocate() callers free through raw_deleter() with the bare pointer; without one to pass small blocks
  // back to, keep the previous allocator rather than break them.
  if (fallback->raw_deleter() == nullptr) return false;
  g_fallback_deleter = fallback->raw_deleter();
  cached_mappings().set_cap(cache_bytes);
  static LargePageAllocator* allocator = new LargePageAllocator(fallback, std::max(min_bytes, kHugePage));
  c10::SetCPUAllocator(allocator, /*priority=*/0);
  installed = true;
  return true;
}

int configure_threads(int threads) {
  if (threads <= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
      threads = CPU_COUNT(&set);
    } else {
      threads = static_cast<int>(std::thread::hardware_concurrency());
    }
    if (threads <= 0) threads = 1;
  }
  at::set_num_threads(threads);
  return at::get_num_threads();
}

bool cpu_has_native_bf16() {
  const std::string flags = " " + cpuinfo_field("flags") + " ";
  return flags.find(" avx512_bf16 ") != std::string::npos || flags.find(" amx_bf16 ") != std::string::npos;
}

bool cpu_supports_fp16_convolution() {
  static const bool supported = [] {
    try {
      at::NoGradGuard no_grad;
      const auto half = at::TensorOptions().dtype(at::kHalf);
      (void)at::conv2d(at::zeros({1, 1, 2, 2}, half), at::zeros({1, 1, 1, 1}, half));
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return supported;
}

namespace {
std::atomic<ConvWeightPacking>& packing_mode() {
  static std::atomic<ConvWeightPacking> mode{[] {
    const char* v = std::getenv("STYLEALIGNED_CONV_PACK");
    if (v == nullptr || *v == '\0') return ConvWeightPacking::automatic;
    return std::string(v) == "0" ? ConvWeightPacking::never : ConvWeightPacking::always;
  }()};
  return mode;
}
}  // namespace

void configure_conv_weight_packing(ConvWeightPacking mode) { packing_mode().store(mode); }

ConvWeightPacking conv_weight_packing() { return packing_mode().load(); }

ConvWeightPacking parse_conv_weight_packing(const std::string& value, const std::string& option) {
  if (value == "auto") return ConvWeightPacking::automatic;
  if (value == "always") return ConvWeightPacking::always;
  if (value == "never") return ConvWeightPacking::never;
  throw Error(fmt::format("{}: expected auto, always or never, got '{}'", option, value));
}

const char* to_string(ConvWeightPacking mode) {
  switch (mode) {
    case ConvWeightPacking::always:
      return "always";
    case ConvWeightPacking::never:
      return "never";
    case ConvWeightPacking::automatic:
      break;
  }
  return "auto";
}

std::string cpu_model_name() {
  auto name = cpuinfo_field("model name");
  return name.empty() ? "unknown CPU" : name;
}

}  // namespace stylealigned
