#include "stylealigned/runtime.h"

#include <ATen/Parallel.h>
#include <sched.h>

#include <fstream>
#include <string>
#include <thread>

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
}  // namespace

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

std::string cpu_model_name() {
  auto name = cpuinfo_field("model name");
  return name.empty() ? "unknown CPU" : name;
}

}  // namespace stylealigned
